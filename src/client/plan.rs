//! Dry runs (`-n`): what a put or get would do with each file, decided from listings and local metadata, with nothing moved.
//!
//! The real run decides "already there" by BLAKE3 on both sides; a dry run
//! reads no file, so it says "skip" where size and mtime agree (the case
//! the real run then confirms by hash) and "refuse" where a different file
//! holds the name and --force was not given, the refusals the real run
//! would report with exit code 1.

use std::collections::{BTreeSet, HashMap};

use serde::Serialize;

use crate::exchange::to_timestamp;
use crate::protocol::{Entry, EntryKind, ErrorCode};

use super::{Client, Direction, FileError, Job};

/// What a run would do with one file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Action {
    /// Send it.
    Send,
    /// Leave it: the same file is already there.
    Skip,
    /// Refuse it: the real run fails this file.
    Refuse,
}

/// One file of a dry run.
#[derive(Debug, Clone, Serialize)]
pub struct Planned {
    /// What would happen.
    pub action: Action,
    /// The file, as the run would name it.
    pub name: String,
    /// Its size, where known.
    pub size: Option<u64>,
    /// Why, for skips and refusals (and replacements under --force).
    pub reason: Option<String>,
}

/// The remote entries of the directories `jobs` name, by remote path: one
/// listing per directory.
async fn remote_entries(
    client: &Client,
    jobs: &[Job],
) -> Result<HashMap<String, Entry>, FileError> {
    let dirs: BTreeSet<&str> = jobs
        .iter()
        .map(|job| job.remote.rsplit_once('/').map_or("", |(p, _)| p))
        .collect();
    let mut out = HashMap::new();
    for dir in &dirs {
        let entries = match client.list(dir).await {
            Ok(e) => e,
            // Nothing there yet (or a file where the directory would be:
            // the real run's put says so; the dry run just sees no entries).
            Err(FileError::Remote(e))
                if e.code == ErrorCode::NotFound || e.code == ErrorCode::NotDirectory =>
            {
                continue
            }
            Err(e) => return Err(e),
        };
        // Listing a file lists the file itself: a file is where the
        // directory would be, which the real run refuses.
        let dir_name = dir.rsplit('/').next().unwrap_or(dir);
        if let [only] = entries.as_slice() {
            if !dir.is_empty() && only.kind != EntryKind::Dir && only.name == dir_name {
                out.insert((*dir).to_owned(), only.clone());
                continue;
            }
        }
        for e in entries {
            let path = if dir.is_empty() {
                e.name.clone()
            } else {
                format!("{dir}/{}", e.name)
            };
            out.insert(path, e);
        }
    }
    Ok(out)
}

/// What a put or get of `jobs` would do, in order. With `sync`, a file
/// whose size and mtime match the other side's is skipped (rsync's quick
/// check: neither side reads it) and any other existing file is replaced.
pub async fn dry_run(
    client: &Client,
    direction: Direction,
    jobs: &[Job],
    force: bool,
    sync: bool,
) -> Result<Vec<Planned>, FileError> {
    let remote = remote_entries(client, jobs).await?;
    let mut out = Vec::with_capacity(jobs.len());
    for job in jobs {
        let there = remote.get(&job.remote);
        let local = std::fs::symlink_metadata(&job.local).ok();
        let local_mtime = local
            .as_ref()
            .and_then(|m| m.modified().ok())
            .and_then(to_timestamp);
        let planned = |action, size, reason: Option<&str>| Planned {
            action,
            name: job.label.clone(),
            size,
            reason: reason.map(str::to_owned),
        };
        let same = |e: &Entry| {
            local
                .as_ref()
                .is_some_and(|m| m.is_file() && m.len() == e.size)
                && local_mtime.is_some()
                && e.mtime == local_mtime
        };
        let parent = job.remote.rsplit_once('/').map(|(p, _)| p);
        let file_above = parent
            .and_then(|p| remote.get(p))
            .is_some_and(|e| e.kind != EntryKind::Dir);
        out.push(match direction {
            Direction::Put if file_above => planned(
                Action::Refuse,
                local.as_ref().map(|m| m.len()),
                Some("a file on the server is where its directory would be"),
            ),
            Direction::Put => {
                let size = local.as_ref().map(|m| m.len());
                match there {
                    None => planned(Action::Send, size, None),
                    Some(e) if e.kind == EntryKind::Dir => planned(
                        Action::Refuse,
                        size,
                        Some("a directory on the server has that name"),
                    ),
                    Some(e) if e.kind != EntryKind::File => planned(
                        Action::Refuse,
                        size,
                        Some("a link or special file on the server has that name"),
                    ),
                    Some(e) if sync && same(e) => {
                        planned(Action::Skip, size, Some("unchanged (same size and mtime)"))
                    }
                    Some(_) if sync => planned(
                        Action::Send,
                        size,
                        Some("replaces the server's file: size or mtime differ (--sync)"),
                    ),
                    Some(_) if force => planned(
                        Action::Send,
                        size,
                        Some("replaces the server's file (--force)"),
                    ),
                    Some(e) if same(e) => planned(
                        Action::Skip,
                        size,
                        Some("already there (same size and mtime; the real run compares BLAKE3)"),
                    ),
                    Some(_) => planned(
                        Action::Refuse,
                        size,
                        Some("exists on the server; use --force to overwrite it"),
                    ),
                }
            }
            Direction::Get => {
                let size = there.map(|e| e.size).or(job.size_hint);
                match (there, &local) {
                    (None, _) => planned(Action::Refuse, None, Some("not found on the server")),
                    (Some(e), _) if e.kind != EntryKind::File => planned(
                        Action::Refuse,
                        size,
                        Some("not a regular file on the server"),
                    ),
                    (Some(_), Some(m)) if m.is_dir() => planned(
                        Action::Refuse,
                        size,
                        Some("a local directory has that name"),
                    ),
                    (Some(_), None) => planned(Action::Send, size, None),
                    (Some(e), Some(_)) if sync && same(e) => {
                        planned(Action::Skip, size, Some("unchanged (same size and mtime)"))
                    }
                    (Some(_), Some(_)) if sync => planned(
                        Action::Send,
                        size,
                        Some("replaces the local file: size or mtime differ (--sync)"),
                    ),
                    (Some(_), Some(_)) if force => planned(
                        Action::Send,
                        size,
                        Some("replaces the local file (--force)"),
                    ),
                    (Some(e), Some(_)) if same(e) => planned(
                        Action::Skip,
                        size,
                        Some("already there (same size and mtime; the real run compares BLAKE3)"),
                    ),
                    (Some(_), Some(_)) => planned(
                        Action::Refuse,
                        size,
                        Some("exists locally; use --force to overwrite it"),
                    ),
                }
            }
        });
    }
    Ok(out)
}

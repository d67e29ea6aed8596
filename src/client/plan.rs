//! Dry runs (`-n`): what a put or get would do with each file, decided from listings and local metadata, with nothing moved.
//!
//! The real run decides "already there" by BLAKE3 on both sides; a dry run
//! reads no file, so it says "skip" where size and mtime agree (the case
//! the real run then confirms by hash) and "refuse" where a different file
//! holds the name and --force was not given, the refusals the real run
//! would report with exit code 1.

use std::collections::{BTreeSet, HashMap};

use serde::Serialize;

use crate::exchange::{blocking, file_digest, to_timestamp, DELTA_MIN, KEPT_MODE_BITS};
use crate::protocol::{Digest, Entry, EntryKind, ErrorCode, FileMeta, MAX_DIGEST_PATHS};

use super::{Client, Direction, FileError, Job};

/// What a run would do with one file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub(crate) enum Action {
    /// Send it.
    Send,
    /// Leave it: the same file is already there.
    Skip,
    /// Refuse it: the real run fails this file.
    Refuse,
}

/// One file of a dry run.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct Planned {
    /// What would happen.
    pub action: Action,
    /// The file, as the run would name it.
    pub name: String,
    /// Its size, where known.
    pub size: Option<u64>,
    /// Why, for skips and refusals (and replacements under --force).
    pub reason: Option<String>,
    /// It would replace a file as a delta (`--sync`, 1 MiB or more): only
    /// the chunks the receiver's version lacks would cross, which nothing
    /// short of reading both versions can tell in advance.
    pub delta: bool,
    /// It would be left alone but given the source's mtime or mode, which
    /// differ (`--sync`: rsync -a does the same).
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub sets_meta: bool,
    /// What that takes.
    #[serde(skip)]
    pub(crate) fix: Option<MetaFix>,
}

/// The mtime and mode a file left alone takes from its source: `meta` is
/// the source's, `digest` what both sides hashed (`--checksum`; without
/// it the size and mtime matched).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct MetaFix {
    pub(crate) meta: FileMeta,
    pub(crate) digest: Option<Digest>,
}

/// The remote entries of the directories `jobs` name, by remote path. A
/// tree costs one recursive listing of its top directory, not one round
/// trip per directory (a re-sync of a tree of 300 directories over 30 ms
/// spent 9 s listing them one after another); directories that are not
/// beneath one another are listed at once. The server's root is never
/// listed recursively (it may hold far more than this run names): with
/// jobs there and deeper, it gets a listing of its own level.
async fn remote_entries(
    client: &Client,
    jobs: &[Job],
) -> Result<HashMap<String, Entry>, FileError> {
    let mut dirs: BTreeSet<&str> = jobs
        .iter()
        .map(|job| job.remote.rsplit_once('/').map_or("", |(p, _)| p))
        .collect();
    let mut listings = Vec::new();
    if dirs.remove("") {
        listings.push(("", false));
    }
    while let Some(&top) = dirs.first() {
        let beneath =
            |d: &&str| *d == top || d.strip_prefix(top).is_some_and(|r| r.starts_with('/'));
        let under: Vec<&str> = dirs.iter().copied().filter(beneath).collect();
        for d in &under {
            dirs.remove(d);
        }
        listings.push((top, under.len() > 1));
    }
    let listed = futures::future::join_all(listings.iter().map(|&(dir, tree)| async move {
        let entries = if tree {
            client.list_tree(dir).await
        } else {
            client.list(dir).await
        };
        (dir, entries)
    }))
    .await;
    let mut out = HashMap::new();
    for (dir, entries) in listed {
        let entries = match entries {
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
                out.insert(dir.to_owned(), only.clone());
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
pub(crate) async fn dry_run(
    client: &Client,
    direction: Direction,
    jobs: &[Job],
    force: bool,
    sync: bool,
    checksum: bool,
) -> Result<Vec<Planned>, FileError> {
    Ok(
        plan_with_listing(client, direction, jobs, force, sync, checksum)
            .await?
            .0,
    )
}

/// [`dry_run`], and the remote entries it decided from, by remote path
/// (what `--sync` needs to leave directories that match alone too). With
/// `checksum` (and `sync`), files of the same size on both sides are
/// compared by BLAKE3 instead of mtime: this side hashes its own, the
/// server sends its digests, [`MAX_DIGEST_PATHS`] a request.
pub(crate) async fn plan_with_listing(
    client: &Client,
    direction: Direction,
    jobs: &[Job],
    force: bool,
    sync: bool,
    checksum: bool,
) -> Result<(Vec<Planned>, HashMap<String, Entry>), FileError> {
    let remote = remote_entries(client, jobs).await?;
    let locals: Vec<Option<std::fs::Metadata>> = jobs
        .iter()
        .map(|job| std::fs::symlink_metadata(&job.local).ok())
        .collect();
    let equal = if sync && checksum {
        equal_digests(client, jobs, &locals, &remote).await?
    } else {
        HashMap::new()
    };
    let unchanged = if checksum {
        "unchanged (same BLAKE3)"
    } else {
        "unchanged (same size and mtime)"
    };
    let mut out = Vec::with_capacity(jobs.len());
    for (job, local) in jobs.iter().zip(locals) {
        let there = remote.get(&job.remote);
        let local_mtime = local
            .as_ref()
            .and_then(|m| m.modified().ok())
            .and_then(to_timestamp);
        let planned = |action, size, reason: Option<&str>| Planned {
            action,
            name: job.label.clone(),
            size,
            reason: reason.map(str::to_owned),
            delta: false,
            sets_meta: false,
            fix: None,
        };
        // A file left alone by --sync whose mtime or mode differ from its
        // source's takes them (the mode as a transfer would give it).
        let local_mode = local.as_ref().map(|m| {
            use std::os::unix::fs::PermissionsExt;
            m.permissions().mode() & 0o7777
        });
        let fixing = |mut p: Planned, e: &Entry| {
            let (source, dest_mtime, dest_mode) = match direction {
                Direction::Put => (
                    FileMeta {
                        size: e.size,
                        mtime: local_mtime,
                        mode: local_mode,
                    },
                    e.mtime,
                    e.mode,
                ),
                Direction::Get => (
                    FileMeta {
                        size: e.size,
                        mtime: e.mtime,
                        mode: e.mode,
                    },
                    local_mtime,
                    local_mode,
                ),
            };
            let mtime_differs = source.mtime.is_some() && source.mtime != dest_mtime;
            let mode_differs =
                matches!((source.mode, dest_mode), (Some(s), Some(d)) if s & KEPT_MODE_BITS != d);
            if mtime_differs || mode_differs {
                p.sets_meta = true;
                p.fix = Some(MetaFix {
                    meta: source,
                    digest: equal.get(&job.remote).copied(),
                });
                if let Some(r) = &mut p.reason {
                    r.push_str("; takes the source's mtime and mode");
                }
            }
            p
        };
        // The new version must reach the threshold, and for a get (where
        // this side describes its file) the old one too.
        let as_delta = |mut p: Planned, old_usable: bool| {
            p.delta = old_usable && p.size.is_some_and(|s| s >= DELTA_MIN);
            p
        };
        let same = |e: &Entry| {
            if sync && checksum {
                return equal.contains_key(&job.remote);
            }
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
                        fixing(planned(Action::Skip, size, Some(unchanged)), e)
                    }
                    Some(_) if sync => as_delta(
                        planned(
                            Action::Send,
                            size,
                            Some("replaces the server's file: size or mtime differ (--sync)"),
                        ),
                        // The server describes whatever it holds.
                        true,
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
                        fixing(planned(Action::Skip, size, Some(unchanged)), e)
                    }
                    (Some(_), Some(m)) if sync => as_delta(
                        planned(
                            Action::Send,
                            size,
                            Some("replaces the local file: size or mtime differ (--sync)"),
                        ),
                        m.is_file() && m.len() >= DELTA_MIN,
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
    Ok((out, remote))
}

/// Which `jobs` hold the same contents on both sides (`--checksum`): of
/// the regular files of equal size here and on the server, those whose
/// BLAKE3 agree, with it. This side hashes its files in the disk pool while the
/// server's digests are asked for, up to 16 requests (16,384 files) at once.
async fn equal_digests(
    client: &Client,
    jobs: &[Job],
    locals: &[Option<std::fs::Metadata>],
    remote: &HashMap<String, Entry>,
) -> Result<HashMap<String, Digest>, FileError> {
    use futures::StreamExt;
    let candidates: Vec<&Job> = jobs
        .iter()
        .zip(locals)
        .filter(|(job, local)| {
            remote.get(&job.remote).is_some_and(|e| {
                e.kind == EntryKind::File
                    && local
                        .as_ref()
                        .is_some_and(|m| m.is_file() && m.len() == e.size)
            })
        })
        .map(|(job, _)| job)
        .collect();
    // Hashed in groups of up to 64 files or 16 MiB per trip to the disk
    // pool: a source tree's files are small, and a trip each cost more
    // than hashing them.
    let mut groups: Vec<Vec<std::path::PathBuf>> = Vec::new();
    let mut group_bytes = 0u64;
    for job in &candidates {
        let size = remote.get(&job.remote).map_or(0, |e| e.size);
        match groups.last_mut() {
            Some(g) if g.len() < 64 && group_bytes + size <= 16 << 20 => {
                g.push(job.local.clone());
                group_bytes += size;
            }
            _ => {
                groups.push(vec![job.local.clone()]);
                group_bytes = size;
            }
        }
    }
    let ours = futures::stream::iter(groups.into_iter().map(|paths| {
        blocking(move || {
            paths
                .iter()
                .map(|p| {
                    std::fs::File::open(p)
                        .and_then(|mut f| file_digest(&mut f))
                        .ok()
                })
                .collect::<Vec<Option<Digest>>>()
        })
    }))
    .buffered(8)
    .collect::<Vec<Vec<Option<Digest>>>>();
    let paths: Vec<String> = candidates.iter().map(|j| j.remote.clone()).collect();
    let theirs = futures::stream::iter(digest_batches(&paths))
        .map(|batch| client.digests(batch))
        .buffered(16)
        .collect::<Vec<_>>();
    let (ours, theirs) = tokio::join!(ours, theirs);
    let ours: Vec<Option<Digest>> = ours.into_iter().flatten().collect();
    let mut theirs_all = Vec::with_capacity(paths.len());
    for batch in theirs {
        theirs_all.extend(batch?);
    }
    Ok(candidates
        .iter()
        .zip(ours.iter().zip(theirs_all))
        .filter_map(|(job, (a, b))| match (a, b) {
            (Some(a), Some(b)) if *a == b => Some((job.remote.clone(), b)),
            _ => None,
        })
        .collect())
}

/// `paths` in requests: at most [`MAX_DIGEST_PATHS`] and 48 KiB of names each.
fn digest_batches(paths: &[String]) -> Vec<&[String]> {
    let mut out = Vec::new();
    let (mut start, mut bytes) = (0, 0);
    for (i, p) in paths.iter().enumerate() {
        if i - start == MAX_DIGEST_PATHS || (bytes + p.len() + 8 > 48 * 1024 && i > start) {
            out.push(&paths[start..i]);
            start = i;
            bytes = 0;
        }
        bytes += p.len() + 8;
    }
    if start < paths.len() {
        out.push(&paths[start..]);
    }
    out
}

/// Gives each file `--sync` left alone its source's mtime and mode, where
/// they differ: on the server through [`Client::set_meta`] (16 at once),
/// here through the file's descriptor (opened without following a link).
/// Returns the labels of those done and the failures, one line each.
pub(crate) async fn fix_meta(
    client: &Client,
    direction: Direction,
    fixes: Vec<(Job, MetaFix)>,
) -> (Vec<String>, Vec<String>) {
    use futures::StreamExt;
    let results: Vec<(String, Result<(), String>)> = match direction {
        Direction::Put => {
            futures::stream::iter(fixes)
                .map(|(job, fix)| async move {
                    let done = client
                        .set_meta(&job.remote, fix.meta, fix.digest)
                        .await
                        .map_err(|e| e.to_string());
                    (job.label, done)
                })
                .buffered(16)
                .collect()
                .await
        }
        Direction::Get => {
            blocking(move || {
                fixes
                    .into_iter()
                    .map(|(job, fix)| {
                        let done = fix_local_meta(&job.local, &fix).map_err(|e| {
                            format!("cannot set its mtime and mode: {e}; check the file's owner and permissions")
                        });
                        (job.label, done)
                    })
                    .collect()
            })
            .await
        }
    };
    let (mut done, mut failed) = (Vec::new(), Vec::new());
    for (label, result) in results {
        match result {
            Ok(()) => done.push(label),
            Err(e) => failed.push(format!("{label}: {e}")),
        }
    }
    (done, failed)
}

/// [`fix_meta`] for one local file: it must still be the regular file of
/// the size compared (and without a digest, of the mtime). Blocking.
fn fix_local_meta(path: &std::path::Path, fix: &MetaFix) -> std::io::Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK | libc::O_NOCTTY)
        .open(path)?;
    let md = file.metadata()?;
    let mtime = md.modified().ok().and_then(to_timestamp);
    if !md.is_file()
        || md.len() != fix.meta.size
        || (fix.digest.is_none() && mtime != fix.meta.mtime)
    {
        return Err(std::io::Error::other("it changed since it was compared"));
    }
    crate::exchange::set_mode_and_mtime(&file, fix.meta.mode, fix.meta.mtime)
}

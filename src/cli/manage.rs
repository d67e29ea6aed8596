//! The commands that manage a server's files (`ls`, `rm`, `mv`, `mkdir`) and the deletions of `--delete`.

use super::args::{LsArgs, MkdirArgs, MvArgs, RmArgs};
use super::progress::Progress;
use super::report::{file_error, format_entry, report_deleted, report_not_deleted};
use super::{close_checked, connect, exit, outcome};
use crate::client::tree::{self, Tree};
use crate::client::RetryPolicy;
use crate::client::{Client, FileError, Filter};
use crate::protocol::EntryKind;
use anyhow::{bail, Result};
use std::io::Write;
use std::process::ExitCode;

/// `qxfer rm`: each name removed in turn; a failure is reported and the
/// others still go. Exit code 1 if any failed.
pub(super) async fn rm(args: RmArgs, verbose: bool) -> Result<ExitCode> {
    let progress = Progress::hidden();
    let client = connect(&args.client, None, true, &progress).await?;
    let (mut failed, mut lost) = (0, 0);
    for name in &args.names {
        match client.remove(name, args.recursive).await {
            Ok(()) if verbose => eprintln!("qxfer: removed {name}"),
            Ok(()) => {}
            Err(e) => {
                failed += 1;
                lost += usize::from(e.is_transient());
                eprintln!("qxfer: error: {}", file_error(name, &e));
            }
        }
    }
    close_checked(client).await?;
    if failed > 0 {
        eprintln!("qxfer: {failed} of {} not removed", args.names.len());
    }
    // Every failure the connection's: a connection failure (exit code 3).
    if failed > 0 && lost == failed {
        return Ok(ExitCode::from(exit::CONNECTION));
    }
    Ok(outcome(failed))
}

/// `qxfer mv FROM TO`.
pub(super) async fn mv(args: MvArgs) -> Result<ExitCode> {
    let progress = Progress::hidden();
    let client = connect(&args.client, None, true, &progress).await?;
    let result = client.rename(&args.from, &args.to).await;
    close_checked(client).await?;
    match result {
        Ok(()) => Ok(ExitCode::SUCCESS),
        Err(e) => {
            eprintln!("qxfer: error: {}", file_error(&args.from, &e));
            Ok(ExitCode::from(if e.is_transient() {
                exit::CONNECTION
            } else {
                exit::SOME_FAILED
            }))
        }
    }
}

/// `qxfer mkdir [-p] DIR...`. Without -p, as mkdir: the parent must exist
/// and the directory must not (checked with a listing first; the server's
/// mkdir itself always creates parents and accepts what exists).
pub(super) async fn mkdir(args: MkdirArgs) -> Result<ExitCode> {
    let progress = Progress::hidden();
    let client = connect(&args.client, None, true, &progress).await?;
    let mut failed = 0;
    for dir in &args.dirs {
        let checked = if args.parents {
            Ok(())
        } else {
            mkdir_preconditions(&client, dir).await
        };
        let result = match checked {
            Ok(()) => client
                .mkdir(dir, None)
                .await
                .map_err(|e| file_error(dir, &e)),
            Err(e) => Err(e),
        };
        if let Err(e) = result {
            failed += 1;
            eprintln!("qxfer: error: {e}");
        }
    }
    close_checked(client).await?;
    Ok(outcome(failed))
}

/// Why `mkdir DIR` without -p must not go ahead: DIR exists, or its parent
/// does not.
pub(super) async fn mkdir_preconditions(client: &Client, dir: &str) -> Result<(), String> {
    let trimmed = dir.trim_end_matches('/');
    let (parent, base) = trimmed.rsplit_once('/').unwrap_or(("", trimmed));
    let parent_name = parent.rsplit('/').next().unwrap_or(parent);
    match client.list(parent).await {
        // Listing a file lists the file itself.
        Ok(entries)
            if !parent.is_empty()
                && matches!(entries.as_slice(), [only] if only.kind != EntryKind::Dir && only.name == parent_name) =>
        {
            Err(format!(
                "cannot create '{dir}': '{parent}' on the server is a file, not a directory"
            ))
        }
        Ok(entries) => match entries.iter().find(|e| e.name == base) {
            Some(_) => Err(format!(
                "'{dir}' already exists on the server (mkdir -p accepts that)"
            )),
            None => Ok(()),
        },
        Err(FileError::Remote(e)) if e.code == crate::protocol::ErrorCode::NotFound => Err(
            format!("cannot create '{dir}': its parent '{parent}' does not exist on the server; use mkdir -p"),
        ),
        Err(e) => Err(file_error(dir, &e)),
    }
}

/// `--delete` after a put: removes on the server what the uploaded trees
/// no longer have, if every file arrived (else says nothing was removed).
/// Returns the failures.
pub(super) async fn delete_remote(
    client: &Client,
    planned: &Tree,
    filter: &Filter,
    all_arrived: bool,
    quiet: bool,
    progress: &Progress,
) -> Vec<(String, FileError)> {
    if !all_arrived {
        report_not_deleted(quiet, progress);
        return Vec::new();
    }
    let extras = match tree::remote_extras(client, planned, filter).await {
        Ok(extras) => extras,
        Err(e) => return vec![("--delete".to_owned(), e)],
    };
    let mut failed = Vec::new();
    for (path, is_dir) in extras.paths {
        match client.remove(&path, is_dir).await {
            Ok(()) => report_deleted(&path, is_dir, quiet, progress),
            Err(e) => failed.push((path, e)),
        }
    }
    failed
}

/// `--delete` after a get: removes locally what the server's trees no
/// longer have, if every file arrived. Returns the failures.
pub(super) fn delete_local(
    planned: &Tree,
    filter: &Filter,
    all_arrived: bool,
    quiet: bool,
    progress: &Progress,
) -> Vec<(String, FileError)> {
    if !all_arrived {
        report_not_deleted(quiet, progress);
        return Vec::new();
    }
    let extras = match tree::local_extras(planned, filter) {
        Ok(extras) => extras,
        Err(e) => return vec![("--delete".to_owned(), e)],
    };
    let mut failed = Vec::new();
    for extra in extras {
        // Through a handle on its directory, reached from the top without
        // following a link (one swapped in since the walk is refused), and
        // following none inside: remove_dir_all removes links as links.
        let shown = extra.path.display().to_string();
        match crate::client::remove_below(&extra.top, &extra.path, extra.is_dir) {
            Ok(()) => report_deleted(&shown, extra.is_dir, quiet, progress),
            Err(e) => failed.push((shown, e)),
        }
    }
    failed
}

pub(super) async fn ls(args: LsArgs) -> Result<ExitCode> {
    let progress = Progress::hidden();
    let mut backoff = RetryPolicy::new(args.retries).backoff();
    let mut attempt = 0;
    let listed = loop {
        // An unreachable server fails at once, as for every command; only
        // a connection lost before the listing arrived is tried again.
        let client = connect(&args.client, None, false, &progress).await?;
        let listed = if args.recursive {
            client.list_tree(&args.dir).await
        } else {
            client.list(&args.dir).await
        };
        if let Some(refused) = client.refusal() {
            return Err(refused.into());
        }
        match listed {
            Err(e) if attempt < args.retries && e.is_transient() => {
                attempt += 1;
                let why = client.lost().unwrap_or_else(|| e.to_string());
                eprintln!(
                    "qxfer: {why}; reconnecting in {:.1} s (attempt {attempt} of {})",
                    backoff.next().as_secs_f64(),
                    args.retries
                );
                client.close().await;
                backoff.wait().await;
            }
            done => {
                client.close().await;
                break done;
            }
        }
    };
    let entries = match listed {
        Ok(e) => e,
        Err(e) => bail!("{}: {e}", if args.dir.is_empty() { "/" } else { &args.dir }),
    };
    let mut out = std::io::stdout().lock();
    if args.json {
        writeln!(out, "{}", serde_json::to_string_pretty(&entries)?)?;
    } else {
        for e in &entries {
            writeln!(out, "{}", format_entry(e))?;
        }
    }
    Ok(ExitCode::SUCCESS)
}

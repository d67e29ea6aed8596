//! `qxfer put` and `qxfer get`: files, trees and pipes, planned, quick-checked and run as batches that survive lost connections.

use super::args::{GetArgs, PutArgs, TransferArgs};
use super::manage::{delete_local, delete_remote};
use super::progress::{summary, Progress};
use super::report::{finish_batch, finish_dry_run, named, report_excluded, report_skipped};
use super::{connect, connect_with, downloads_dir, exit};
use crate::client::tree::{self, Tree};
use crate::client::{self, BatchOptions, RetryEvent, RetryPolicy};
use crate::client::{
    dry_run, fix_meta, plan_with_listing, Action, BatchReport, Client, ClientConfig, Direction,
    FileError, Filter, Job, Watch,
};
use crate::paths::join_remote;
use crate::protocol::{DirMeta, Entry, EntryKind};
use anyhow::{Context, Result};
use std::collections::HashMap;
use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

pub(super) async fn put(
    args: PutArgs,
    quiet: bool,
    verbose: bool,
    progress: &Progress,
) -> Result<ExitCode> {
    if reads_stdin(&args) {
        return put_from_stdin(args, quiet, progress).await;
    }
    if args.files.iter().any(|f| f.as_os_str() == "-") {
        eprintln!("qxfer: error: - (standard input) comes first and alone: qxfer put - NAME; a local file named '-' is ./-");
        return Ok(ExitCode::from(exit::USAGE));
    }
    let filter = Filter::new(&args.transfer.exclude, &args.transfer.exclude_from)?;
    let mut tree = Tree::default();
    let mut bad = Vec::new();
    for file in &args.files {
        let Some(name) = file_name(file) else {
            bad.push(format!("{}: has no usable file name", file.display()));
            continue;
        };
        let remote = join_remote(args.to.as_deref(), &name);
        let is_dir = std::fs::symlink_metadata(file).is_ok_and(|m| m.is_dir());
        if is_dir && !args.recursive {
            bad.push(format!(
                "{}: is a directory; use -r to upload it and everything in it",
                file.display()
            ));
        } else if is_dir {
            match tree::walk_local(file, &remote, &name, &filter) {
                Ok(t) => tree.extend(t),
                Err(e) => bad.push(e.to_string()),
            }
        } else {
            tree.jobs.push(Job {
                label: file.display().to_string(),
                local: file.clone(),
                remote,
                size_hint: None,
                within: None,
            });
        }
    }
    report_skipped(&tree.skipped, quiet, progress);
    report_excluded(&tree.excluded, verbose, progress);
    bad.extend(tree.failed.iter().cloned());
    let (client, config) =
        connect_with(&args.client, Some(&args.transfer), quiet, progress).await?;
    if args.transfer.dry_run {
        let plan = dry_run(
            &client,
            Direction::Put,
            &tree.jobs,
            args.transfer.force,
            args.transfer.sync,
            args.transfer.checksum,
        )
        .await;
        let deletes = if args.transfer.delete {
            tree::remote_extras(&client, &tree, &filter)
                .await
                .map(|e| e.paths)
        } else {
            Ok(Vec::new())
        };
        client.close().await;
        return finish_dry_run(
            "put",
            plan?,
            &deletes?,
            &tree.excluded,
            bad,
            args.transfer.json,
            quiet,
        );
    }
    let planned = tree.clone();
    let (jobs, unchanged, listed) =
        quick_check(&client, Direction::Put, &args.transfer, tree.jobs, &mut bad).await?;
    // A re-sync leaves directories that match on the server alone (unless
    // --delete may remove something in them).
    let (dirs, all_exist) = match &listed {
        Some(remote) if !args.transfer.delete => tree::dirs_to_finish(&tree.dirs, remote, &jobs),
        _ => (tree.dirs.clone(), false),
    };
    let replace = args.transfer.force || args.transfer.sync;
    let (client, mut report) = run_batch_resilient(
        client,
        &config,
        Direction::Put,
        jobs,
        &args.transfer,
        replace,
        quiet,
        progress,
    )
    .await?;
    // Deletions first, so that the directory times applied next stick.
    if args.transfer.delete && client.refusal().is_none() {
        let all_arrived = report.failed.is_empty() && bad.is_empty();
        let failed = delete_remote(&client, &planned, &filter, all_arrived, quiet, progress).await;
        report.failed.extend(failed);
    }
    if !dirs.is_empty() {
        report
            .failed
            .extend(tree::finish_remote_dirs(&client, &dirs, all_exist).await);
    }
    if let Some(refused) = client.refusal() {
        progress.finish();
        return Err(refused.into());
    }
    client.close().await;
    finish_batch(
        "put",
        report,
        &unchanged,
        bad,
        args.transfer.json,
        quiet,
        progress,
    )
}

/// Whether a put uploads standard input (`qxfer put - NAME`).
pub(super) fn reads_stdin(args: &PutArgs) -> bool {
    args.files.first().is_some_and(|f| f.as_os_str() == "-")
}

/// `qxfer put - NAME`: standard input, until it ends, under NAME (placed
/// in --to DIR if given). Its length is unknown until the end, so there
/// is no resume: an interrupted or failed run leaves nothing on the
/// server, and the pipeline must run again.
pub(super) async fn put_from_stdin(
    args: PutArgs,
    quiet: bool,
    progress: &Progress,
) -> Result<ExitCode> {
    let usage = |why: &str| -> Result<ExitCode> {
        eprintln!("qxfer: error: put - {why}");
        Ok(ExitCode::from(exit::USAGE))
    };
    let name = match args.files.as_slice() {
        [_, name] => name,
        [_] => return usage("needs the name to store standard input under: qxfer put - NAME"),
        _ => return usage("uploads standard input under one name: qxfer put - NAME (a local file named '-' is ./-)"),
    };
    let Some(name) = name.to_str() else {
        return usage("NAME must be UTF-8");
    };
    if name.is_empty() {
        return usage("needs a NAME that is not empty");
    }
    let t = &args.transfer;
    if args.recursive || t.delete || !t.exclude.is_empty() || !t.exclude_from.is_empty() {
        return usage("uploads one stream: -r, --delete and --exclude apply to directories");
    }
    let remote = join_remote(args.to.as_deref(), name);
    let label = format!("- (standard input) as {remote}");
    let client = connect(&args.client, Some(&args.transfer), quiet, progress).await?;
    if t.dry_run {
        // As a put of a file of unknown size and mtime: nothing reads
        // standard input, so "skip" never applies.
        let job = Job {
            label,
            local: PathBuf::new(),
            remote,
            size_hint: None,
            within: None,
        };
        let plan = dry_run(
            &client,
            Direction::Put,
            &[job],
            args.transfer.force,
            false,
            false,
        )
        .await;
        client.close().await;
        return finish_dry_run(
            "put",
            plan?,
            &[],
            &[],
            Vec::new(),
            args.transfer.json,
            quiet,
        );
    }
    let stdin = std::io::stdin();
    if stdin.is_terminal() && !quiet {
        progress.suspend(|| eprintln!("qxfer: reading standard input (a terminal) until Ctrl-D"));
    }
    let bar = progress.pipe_bar(&label);
    let started = std::time::Instant::now();
    let result = client
        .put_stream(stdin, &remote, args.transfer.force, &bar)
        .await;
    let before_any = bar.position() == 0;
    bar.finish();
    if let Some(refused) = client.refusal() {
        progress.finish();
        return Err(refused.into());
    }
    client.close().await;
    let mut report = BatchReport {
        done: Vec::new(),
        failed: Vec::new(),
        retry: Vec::new(),
        elapsed: started.elapsed(),
    };
    let (errors, lost) = match result {
        Ok(mut r) => {
            r.seconds = report.elapsed.as_secs_f64();
            report.done.push(r);
            (Vec::new(), false)
        }
        Err(e) => {
            let msg = e.to_string();
            let mut error = if msg.contains(&remote) || msg.contains("standard input") {
                msg
            } else {
                format!("{label}: {msg}")
            };
            // What the server refused or failed, it says itself (and it
            // kept nothing); an upload cut short must start over; one whose
            // answer went missing may have been saved (the error says so).
            if e.is_transient() {
                error.push_str("; nothing was saved on the server (a piped upload cannot resume: run the pipeline again)");
            } else if !matches!(e, FileError::Unconfirmed { .. }) && !error.contains("saved") {
                error.push_str("; nothing was saved on the server");
            }
            (vec![error], e.is_transient() && before_any)
        }
    };
    let code = finish_batch(
        "put",
        report,
        &Unchanged::default(),
        errors,
        args.transfer.json,
        quiet,
        progress,
    )?;
    // As for any transfer: a connection lost before anything moved is
    // exit code 3; a failure once data moved is 1.
    Ok(if lost {
        ExitCode::from(exit::CONNECTION)
    } else {
        code
    })
}

/// The last component of a local path in its wire form (bytes that are
/// not UTF-8 escaped: see paths.rs; `.` and `..` resolved, so `put -r .`
/// uploads the current directory under its own name).
pub(super) fn file_name(path: &Path) -> Option<String> {
    if let Some(n) = path.file_name() {
        return Some(crate::paths::name_to_wire(n));
    }
    let abs = std::fs::canonicalize(path).ok()?;
    Some(crate::paths::name_to_wire(abs.file_name()?))
}

pub(super) async fn get(
    args: GetArgs,
    quiet: bool,
    verbose: bool,
    progress: &Progress,
) -> Result<ExitCode> {
    if args.output.as_deref() == Some(Path::new("-")) {
        return get_to_stdout(args, quiet, progress).await;
    }
    let filter = Filter::new(&args.transfer.exclude, &args.transfer.exclude_from)?;
    let out_dir = match args.output {
        Some(dir) => dir,
        None => downloads_dir()?,
    };
    if !args.transfer.dry_run {
        std::fs::create_dir_all(&out_dir)
            .with_context(|| format!("cannot create the download folder {}", out_dir.display()))?;
    }
    let (client, config) =
        connect_with(&args.client, Some(&args.transfer), quiet, progress).await?;
    let mut tree = Tree::default();
    let mut bad = Vec::new();
    for name in &args.names {
        let Some(base) = local_name(name) else {
            bad.push(format!("{name}: does not name a file"));
            continue;
        };
        let local = out_dir.join(base);
        if args.recursive {
            match remote_dir_meta(&client, name).await {
                Ok(Some(meta)) => match client.list_tree(name).await {
                    Ok(entries) => {
                        tree.extend(tree::from_listing(&entries, name, &local, meta, &filter));
                        continue;
                    }
                    Err(e) => {
                        bad.push(format!("{name}: {e}"));
                        continue;
                    }
                },
                Ok(None) => {}
                Err(e) => {
                    bad.push(format!("{name}: {e}"));
                    continue;
                }
            }
        }
        tree.jobs.push(Job {
            label: name.clone(),
            local,
            remote: name.clone(),
            size_hint: None,
            within: None,
        });
    }
    report_skipped(&tree.skipped, quiet, progress);
    report_excluded(&tree.excluded, verbose, progress);
    bad.extend(tree.failed.iter().cloned());
    if args.transfer.dry_run {
        let plan = dry_run(
            &client,
            Direction::Get,
            &tree.jobs,
            args.transfer.force,
            args.transfer.sync,
            args.transfer.checksum,
        )
        .await;
        client.close().await;
        let deletes = if args.transfer.delete {
            tree::local_extras(&tree, &filter)?
                .into_iter()
                .map(|e| (e.path.display().to_string(), e.is_dir))
                .collect()
        } else {
            Vec::new()
        };
        return finish_dry_run(
            "get",
            plan?,
            &deletes,
            &tree.excluded,
            bad,
            args.transfer.json,
            quiet,
        );
    }
    let planned = tree.clone();
    let mut failed_dirs = tree::create_local_dirs(&tree.dirs);
    let (jobs, unchanged, _) =
        quick_check(&client, Direction::Get, &args.transfer, tree.jobs, &mut bad).await?;
    let replace = args.transfer.force || args.transfer.sync;
    let (client, mut report) = run_batch_resilient(
        client,
        &config,
        Direction::Get,
        jobs,
        &args.transfer,
        replace,
        quiet,
        progress,
    )
    .await?;
    // Deletions first, so that the directory times applied next stick.
    if args.transfer.delete && client.refusal().is_none() {
        let all_arrived = report.failed.is_empty() && failed_dirs.is_empty() && bad.is_empty();
        report.failed.extend(delete_local(
            &planned,
            &filter,
            all_arrived,
            quiet,
            progress,
        ));
    }
    failed_dirs.extend(tree::finish_local_dirs(&tree.dirs));
    report.failed.extend(failed_dirs);
    if let Some(refused) = client.refusal() {
        progress.finish();
        return Err(refused.into());
    }
    client.close().await;
    finish_batch(
        "got",
        report,
        &unchanged,
        bad,
        args.transfer.json,
        quiet,
        progress,
    )
}

/// `qxfer get NAME -o -`: the file to standard output, verified; bars and
/// messages on stderr only.
pub(super) async fn get_to_stdout(
    args: GetArgs,
    quiet: bool,
    progress: &Progress,
) -> Result<ExitCode> {
    let usage = |why: &str| -> Result<ExitCode> {
        eprintln!("qxfer: error: -o - {why}");
        Ok(ExitCode::from(exit::USAGE))
    };
    if args.names.len() != 1 {
        return usage("writes one file to standard output; name exactly one");
    }
    if args.recursive || args.transfer.delete {
        return usage("writes one file; -r and --delete need a directory (-o DIR)");
    }
    if args.transfer.json || args.transfer.dry_run {
        return usage(
            "keeps standard output for the file's bytes: --json and --dry-run do not apply",
        );
    }
    let name = &args.names[0];
    let client = connect(&args.client, Some(&args.transfer), quiet, progress).await?;
    let watch: Arc<dyn Watch> = Arc::new(progress.clone());
    let bar = watch.file(name, 0, false);
    let started = std::time::Instant::now();
    let result = client.get_to_stdout(name, &*bar).await;
    bar.finish();
    progress.finish();
    if let Some(refused) = client.refusal() {
        return Err(refused.into());
    }
    client.close().await;
    match result {
        Ok(r) => {
            if !quiet {
                eprintln!(
                    "{}",
                    summary(
                        "got",
                        1,
                        r.bytes,
                        r.bytes_sent,
                        started.elapsed().as_secs_f64()
                    )
                );
            }
            Ok(ExitCode::SUCCESS)
        }
        Err(e) => {
            // Nothing of a download to standard output can be resumed: what
            // went out is already in the reader's hands.
            let mut line = named(name, &e);
            if e.is_transient() {
                line.push_str(" (the server may be down or unreachable); what was written to standard output is incomplete: discard it and run the command again");
            }
            eprintln!("qxfer: error: {line}");
            Ok(ExitCode::from(exit::SOME_FAILED))
        }
    }
}

/// If the remote `name` is a directory, its metadata (from a listing of
/// its parent); `None` if it is anything else.
pub(super) async fn remote_dir_meta(client: &Client, name: &str) -> Result<Option<DirMeta>> {
    let trimmed = name.trim_end_matches('/');
    let (parent, base) = match trimmed.rsplit_once('/') {
        Some((p, b)) => (p, b),
        None => ("", trimmed),
    };
    let entries = client.list(parent).await?;
    Ok(entries
        .iter()
        .find(|e| e.name == base && e.kind == EntryKind::Dir)
        .map(|e| DirMeta {
            mode: e.mode,
            mtime: e.mtime,
        }))
}

/// The local file name for a remote path: its last component as bytes
/// (escapes undone, paths.rs), if that is a plain name (never `..`, so a
/// download stays in the output folder).
pub(super) fn local_name(remote: &str) -> Option<std::ffi::OsString> {
    let base = remote.trim_end_matches('/').rsplit('/').next()?;
    match base {
        "" | "." | ".." => None,
        b => crate::paths::name_from_wire(b),
    }
}

/// `--sync`'s quick check (rsync's): of `jobs`, those whose size and
/// mtime (with `--checksum`, BLAKE3) match the other side's are left
/// alone; the rest run, replacing what differs. One listing of each tree
/// decides. Files the run would refuse (a directory or link in the way)
/// are reported in `bad` and not run. Those left alone whose mtime or
/// mode differ from their source's take the source's. Returns the jobs to
/// run, those left alone and the listing: without --sync, every job, none
/// and none.
pub(super) async fn quick_check(
    client: &Client,
    direction: Direction,
    transfer: &TransferArgs,
    jobs: Vec<Job>,
    bad: &mut Vec<String>,
) -> Result<(Vec<Job>, Unchanged, Option<HashMap<String, Entry>>)> {
    if !transfer.sync {
        return Ok((jobs, Unchanged::default(), None));
    }
    let (plan, listed) =
        plan_with_listing(client, direction, &jobs, false, true, transfer.checksum).await?;
    let mut run = Vec::with_capacity(jobs.len());
    let mut unchanged = Vec::new();
    let mut fixes = Vec::new();
    for (job, planned) in jobs.into_iter().zip(plan) {
        match planned.action {
            Action::Send => run.push(job),
            Action::Skip => {
                unchanged.push(job.label.clone());
                if let Some(fix) = planned.fix {
                    fixes.push((job, fix));
                }
            }
            Action::Refuse => bad.push(format!(
                "{}: {}",
                job.label,
                planned.reason.as_deref().unwrap_or("refused")
            )),
        }
    }
    // Left alone, but with the source's mtime and mode (rsync -a does the
    // same): without it a --checksum run would leave the times apart, and
    // every later quick check would see the file as changed.
    let (meta_set, failed) = fix_meta(client, direction, fixes).await;
    bad.extend(failed);
    Ok((
        run,
        Unchanged {
            labels: unchanged,
            meta_set,
        },
        Some(listed),
    ))
}

/// The files `--sync` left alone, and those of them that took their
/// source's mtime or mode.
#[derive(Default)]
pub(super) struct Unchanged {
    pub(super) labels: Vec<String>,
    pub(super) meta_set: Vec<String>,
}

/// Runs a batch that survives lost connections (see
/// [`client::run_resilient`]), saying on stderr when it reconnects.
#[allow(clippy::too_many_arguments)]
async fn run_batch_resilient(
    client: Client,
    config: &ClientConfig,
    direction: Direction,
    jobs: Vec<Job>,
    transfer: &TransferArgs,
    replace: bool,
    quiet: bool,
    progress: &Progress,
) -> Result<(Client, BatchReport)> {
    let watch: Arc<dyn Watch> = Arc::new(progress.clone());
    let options = BatchOptions {
        direction,
        parallel: transfer.parallel.into(),
        force: replace,
    };
    let events = |e: RetryEvent<'_>| match e {
        RetryEvent::Reconnecting {
            why,
            files,
            attempt,
            of,
            wait,
        } => {
            if !quiet {
                progress.suspend(|| {
                    eprintln!(
                        "qxfer: {why}; reconnecting in {:.1} s to resume {files} file(s) (attempt {attempt} of {of})",
                        wait.as_secs_f64(),
                    )
                });
            }
            progress.set_status(format!("reconnecting (attempt {attempt})"));
        }
        RetryEvent::ConnectFailed(e) => {
            if !quiet {
                progress.suspend(|| eprintln!("qxfer: {}", with_causes(e)));
            }
        }
    };
    let policy = RetryPolicy::new(transfer.retries);
    Ok(client::run_resilient(client, config, options, jobs, policy, &watch, events).await?)
}

/// An error and its causes, as `anyhow`'s `{:#}` prints them.
fn with_causes(e: &dyn std::error::Error) -> String {
    let mut msg = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        msg = format!("{msg}: {c}");
        cause = c.source();
    }
    msg
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn local_names_stay_in_the_output_folder() {
        let some = |s: &str| Some(std::ffi::OsString::from(s));
        assert_eq!(local_name("a/b.txt"), some("b.txt"));
        assert_eq!(local_name("b.txt"), some("b.txt"));
        assert_eq!(local_name("a/.."), None);
        assert_eq!(local_name(""), None);
        assert_eq!(local_name("dir/"), some("dir"));
        assert_eq!(
            local_name("a\\b"),
            some("a\\b"),
            "a backslash is a plain byte"
        );
        assert_eq!(
            local_name("caf\u{FDDE}\u{FDE9}"),
            Some(std::os::unix::ffi::OsStringExt::from_vec(
                b"caf\xe9".to_vec()
            ))
        );
        assert_eq!(
            local_name("x\u{FDD2}"),
            None,
            "not the one form of any name"
        );
    }
}

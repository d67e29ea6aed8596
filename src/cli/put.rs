//! `qxfer put`: files and trees (`-r`), and standard input (`put - NAME`).

use super::args::PutArgs;
use super::manage::delete_remote;
use super::progress::Progress;
use super::report::{finish_batch, finish_dry_run, report_excluded, report_skipped};
use super::transfer::{quick_check, run_batch_resilient, Unchanged};
use super::{connect, connect_with, exit};
use crate::client::tree::{self, Tree};
use crate::client::{dry_run, BatchReport, Direction, FileError, Filter, Job, PathWatch};
use crate::paths::join_remote;
use anyhow::Result;
use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

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
        let filled = report.done.iter().map(|r| r.dest.as_str());
        report
            .failed
            .extend(tree::finish_remote_dirs(&client, &dirs, all_exist, filled).await);
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
        &args.transfer,
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
    let watch = client.watch_path(Direction::Put);
    let result = client
        .put_stream(stdin, &remote, args.transfer.force, &bar)
        .await;
    let path = watch.map(PathWatch::finish);
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
        path,
        lost: Default::default(),
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
        &args.transfer,
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

//! `qxfer get`: files and trees (`-r`) into a folder, and one file to standard output (`-o -`).

use super::args::GetArgs;
use super::manage::delete_local;
use super::progress::{summary, Progress};
use super::report::{finish_batch, finish_dry_run, named, report_excluded, report_skipped};
use super::transfer::{quick_check, run_batch_resilient};
use super::{connect, connect_with, downloads_dir, exit};
use crate::client::tree::{self, Tree};
use crate::client::{dry_run, Client, Direction, Filter, Job, Watch};
use crate::protocol::{DirMeta, EntryKind};
use anyhow::{Context, Result};
use std::path::Path;
use std::process::ExitCode;
use std::sync::Arc;

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
            // Whether it is a directory, and its listing if so, asked at
            // once: the listing of a big tree is the wait before the first
            // file, and a round trip more on a long path. (The listing of a
            // name that turns out to be a file is thrown away.)
            let (meta, listing) =
                tokio::join!(remote_dir_meta(&client, name), client.list_tree(name));
            match meta {
                Ok(Some(meta)) => match listing {
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
        &args.transfer,
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

//! What put and get share: the quick check of `--sync`, and running a batch that survives lost connections.

use super::args::TransferArgs;
use super::progress::Progress;
use crate::client::{self, BatchOptions, RetryEvent, RetryPolicy};
use crate::client::{
    fix_meta, plan_with_listing, Action, BatchReport, Client, ClientConfig, Direction, Job, Watch,
};
use crate::protocol::Entry;
use anyhow::Result;
use std::collections::HashMap;
use std::sync::Arc;

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
pub(super) async fn run_batch_resilient(
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
        RetryEvent::FailedOver { from, to } => {
            if !quiet {
                progress.suspend(|| {
                    eprintln!("qxfer: {from} is lost; continuing through {to}, the same server's other address")
                });
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

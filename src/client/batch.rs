//! Batches: many files over one connection at once, small ones from a budget of their own, each with its own end.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::Semaphore;

use crate::endpoint;
use crate::exchange::blocking;

use super::path::{PathReport, PathWatch};
use super::{Client, FileError, TransferReport};

/// One file to move: its label for messages and both ends.
#[derive(Debug, Clone)]
pub struct Job {
    /// What the user typed (for messages).
    pub label: String,
    /// The local path (source for put, destination for get).
    pub local: PathBuf,
    /// The remote path (destination for put, source for get).
    pub remote: String,
    /// The size, if known before the transfer (a get from a listing).
    pub size_hint: Option<u64>,
    /// For a get into a tree (`get -r`): the tree's local top, below which
    /// the download never follows a link. `None` for a file on its own.
    pub within: Option<PathBuf>,
}

/// What a batch tells whoever watches it as files move. The command line
/// draws progress bars from it (`cli::progress::Progress`); a library
/// user may pass [`Unwatched`]. The client itself knows nothing of terminals.
pub trait Watch: Send + Sync {
    /// More bytes to move in all (a put knows its sizes up front, a get
    /// learns each from the server's answer).
    fn add_total(&self, bytes: u64);
    /// A one-line status, such as "12/2000 files".
    fn set_status(&self, msg: String);
    /// A file starts moving; `small` ones are only counted in the total.
    fn file(&self, name: &str, size: u64, small: bool) -> Box<dyn WatchFile>;
}

/// One file as it moves.
pub trait WatchFile: Send + Sync {
    /// `n` more bytes moved.
    fn inc(&self, n: u64);
    /// `n` bytes the other side already had (where a resumed transfer
    /// starts, or a whole file already there): done, but not moved in this
    /// run, so no rate counts them.
    fn kept(&self, n: u64);
    /// The file's size, once known.
    fn set_length(&self, size: u64);
    /// The file is done (or failed).
    fn finish(self: Box<Self>);
}

/// A plain closure watches a file by the bytes it reaches: moved and kept
/// alike (what `Client::put` and `Client::get` callers pass).
impl<F: Fn(u64) + Send + Sync> WatchFile for F {
    fn inc(&self, n: u64) {
        self(n);
    }
    fn kept(&self, n: u64) {
        self(n);
    }
    fn set_length(&self, _: u64) {}
    fn finish(self: Box<Self>) {}
}

/// A batch nobody watches.
#[derive(Debug, Clone, Copy, Default)]
pub struct Unwatched;

impl Watch for Unwatched {
    fn add_total(&self, _: u64) {}
    fn set_status(&self, _: String) {}
    fn file(&self, _: &str, _: u64, _: bool) -> Box<dyn WatchFile> {
        Box::new(Self)
    }
}

impl WatchFile for Unwatched {
    fn inc(&self, _: u64) {}
    fn kept(&self, _: u64) {}
    fn set_length(&self, _: u64) {}
    fn finish(self: Box<Self>) {}
}

/// Files smaller than this are "small": they do not count against
/// `--parallel` and get no bar of their own.
pub(crate) const SMALL_FILE: u64 = 1024 * 1024;

/// Small files in flight at once, at most: as many as a server grants
/// streams by default ([`endpoint::DEFAULT_MAX_STREAMS`]), so that a
/// thousand small files wait on one another for a round trip, not fifty.
/// Each holds one stream and at most its own bytes in memory.
pub(crate) const SMALL_FILE_STREAMS: usize = endpoint::DEFAULT_MAX_STREAMS as usize;

/// Bytes of small files in flight at once, at most: keeps memory flat
/// when the small files are near [`SMALL_FILE`] in size (each in flight
/// holds its bytes once read, and again once framed for the wire). 16 MiB
/// is twenty times the bandwidth-delay product of a 200 Mbit/s, 30 ms path.
pub(super) const SMALL_FILE_BUDGET: u64 = 16 * 1024 * 1024;

/// The unit [`SMALL_FILE_BUDGET`] is counted in.
pub(super) const BUDGET_UNIT: u64 = 4096;

/// Which way files move.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    /// Local to server.
    Put,
    /// Server to local.
    Get,
}

/// The outcome of a batch: what succeeded and what failed, and how long it took.
#[derive(Debug)]
pub struct BatchReport {
    /// Completed transfers, in completion order.
    pub done: Vec<TransferReport>,
    /// Failed transfers: the label and the error.
    pub failed: Vec<(String, FileError)>,
    /// The jobs among `failed` whose error is transient
    /// ([`FileError::is_transient`]): worth another try over a new connection.
    pub retry: Vec<Job>,
    /// Wall time for the whole batch.
    pub elapsed: Duration,
    /// The path and what limited the batch (`--stats`); `None` without a
    /// QUIC connection.
    pub path: Option<PathReport>,
    /// What lost connections cost: see [`Lost`].
    pub lost: Lost,
}

/// Bytes that crossed connections a batch left behind (lost, or with files
/// refused as busy) for files that did not finish over them: what a
/// failover or retry sent (or received) twice, less what the other end had
/// kept and the retry resumed from.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Lost {
    /// Connections left behind with files still to go (each retry runs
    /// them over a new one).
    pub connections: u32,
    /// Bytes that crossed those connections (as QUIC counted them, framing
    /// included) beyond the files that finished over them.
    pub unfinished: u64,
    /// Of those, the bytes the retried files resumed from.
    pub kept: u64,
}

impl Lost {
    /// About how many bytes went twice: what crossed a lost connection for
    /// files that did not finish there and was not resumed.
    pub fn twice(&self) -> u64 {
        self.unfinished.saturating_sub(self.kept)
    }
}

/// Runs `jobs` over `client` with at most `parallel` large files in flight,
/// each with its own progress bar, and up to [`SMALL_FILE_STREAMS`] small
/// ones (within [`SMALL_FILE_BUDGET`] bytes). Every job runs to its own
/// end, whatever the others do.
///
/// A job's task is spawned only once it holds its permits: a task is a few
/// kilobytes before it starts, so spawning all of a 9,000-file tree at once
/// cost 150 MB. Small and large files are fed from queues of their own, so
/// a large file waiting for its turn never holds up small ones.
pub async fn run_batch(
    client: &Client,
    direction: Direction,
    jobs: Vec<Job>,
    parallel: usize,
    force: bool,
    progress: &Arc<dyn Watch>,
) -> BatchReport {
    let start = Instant::now();
    let watch = client.watch_path(direction);
    let queued = jobs.len();
    progress.set_status(format!("0/{queued} files"));
    let (mut small, mut large) = (Vec::new(), Vec::new());
    // A put's size is known up front, so the total bar is right from the
    // start; a get learns its size from the server's answer. The stats run
    // off the async threads (a slow or hung filesystem must not stall them).
    let sized = blocking(move || {
        jobs.into_iter()
            .map(|job| {
                let size = match direction {
                    Direction::Put => std::fs::metadata(&job.local).map(|m| m.len()).ok(),
                    Direction::Get => job.size_hint,
                };
                (job, size)
            })
            .collect::<Vec<_>>()
    })
    .await;
    for (job, size) in sized {
        if direction == Direction::Put {
            progress.add_total(size.unwrap_or(0));
        }
        match size {
            Some(size) if size < SMALL_FILE => small.push((job, size)),
            _ => large.push((job, size.unwrap_or(0))),
        }
    }
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let run = BatchRun {
        client: client.clone(),
        direction,
        force,
        progress: progress.clone(),
        done: tx,
    };
    let feed_small = run.feed(
        small,
        Arc::new(Semaphore::new(SMALL_FILE_STREAMS.max(parallel))),
        Some(Arc::new(Semaphore::new(
            (SMALL_FILE_BUDGET / BUDGET_UNIT) as usize,
        ))),
    );
    let feed_large = run.feed(large, Arc::new(Semaphore::new(parallel.max(1))), None);
    drop(run);
    let mut report = BatchReport {
        done: Vec::new(),
        failed: Vec::new(),
        retry: Vec::new(),
        elapsed: Duration::ZERO,
        path: None,
        lost: Lost::default(),
    };
    let collect = async {
        while let Some((job, result)) = rx.recv().await {
            match result {
                Ok(r) => report.done.push(r),
                Err(e) => {
                    tracing::debug!("{}: {e}", job.label);
                    if e.is_transient() {
                        report.retry.push(job.clone());
                    }
                    report.failed.push((job.label, e));
                }
            }
            progress.set_status(format!(
                "{}/{queued} files",
                report.done.len() + report.failed.len()
            ));
        }
    };
    tokio::join!(feed_small, feed_large, collect);
    report.elapsed = start.elapsed();
    report.path = watch.map(PathWatch::finish);
    report
}

/// What every job of a batch shares.
pub(super) struct BatchRun {
    client: Client,
    direction: Direction,
    force: bool,
    progress: Arc<dyn Watch>,
    /// Where finished jobs report; the batch ends when every sender is gone.
    done: tokio::sync::mpsc::UnboundedSender<(Job, Result<TransferReport, FileError>)>,
}

impl BatchRun {
    /// Starts `jobs` one by one as `pool` (and, for small files, `budget`)
    /// lets them.
    pub(super) fn feed(
        &self,
        jobs: Vec<(Job, u64)>,
        pool: Arc<Semaphore>,
        budget: Option<Arc<Semaphore>>,
    ) -> impl std::future::Future<Output = ()> + 'static {
        let this = self.clone_parts();
        async move {
            for (job, size) in jobs {
                let permit = pool.clone().acquire_owned().await.expect("never closed");
                let bytes = match &budget {
                    Some(budget) => {
                        let units = size.div_ceil(BUDGET_UNIT).max(1) as u32;
                        Some(
                            budget
                                .clone()
                                .acquire_many_owned(units)
                                .await
                                .expect("never closed"),
                        )
                    }
                    None => None,
                };
                let this = this.clone_parts();
                let small = budget.is_some();
                tokio::spawn(async move {
                    let result = this.run(&job, size, small).await;
                    drop((permit, bytes));
                    let _ = this.done.send((job, result));
                });
            }
        }
    }

    pub(super) fn clone_parts(&self) -> Self {
        Self {
            client: self.client.clone(),
            direction: self.direction,
            force: self.force,
            progress: self.progress.clone(),
            done: self.done.clone(),
        }
    }

    /// Moves one file, with a bar of its own unless it is small.
    pub(super) async fn run(
        &self,
        job: &Job,
        size: u64,
        small: bool,
    ) -> Result<TransferReport, FileError> {
        let started = Instant::now();
        let progress = &self.progress;
        let known = if self.direction == Direction::Put {
            size
        } else {
            0
        };
        let bar = progress.file(&job.label, known, small);
        let result = match self.direction {
            Direction::Put => {
                self.client
                    .put(&job.local, &job.remote, self.force, &*bar)
                    .await
            }
            Direction::Get => {
                self.client
                    .get_sized(
                        &job.remote,
                        &job.local,
                        job.within.as_deref(),
                        job.size_hint,
                        self.force,
                        &|size| {
                            bar.set_length(size);
                            progress.add_total(size);
                        },
                        &*bar,
                    )
                    .await
            }
        };
        if let Ok(r) = &result {
            if r.already_there && self.direction == Direction::Put {
                // Counted in the total up front; nothing will move.
                bar.kept(r.bytes);
            }
        }
        bar.finish();
        result.map(|mut r| {
            r.seconds = started.elapsed().as_secs_f64();
            r
        })
    }
}

//! Group commits of small files: one thread per filesystem links every small file ready to be committed there, with one shared sync between each batch.
//!
//! A small file's commit needs two syncs: its data must be durable before
//! its name appears (or a crash could show the final name with missing
//! bytes), and its name after. Each used to wait for them in a disk thread
//! of its own: with thousands of small files, 32 threads asleep on one
//! condition variable, all woken (and all fighting for its lock) at the end
//! of every sync, and the disk pool full of sleepers while other files'
//! work queued behind them. Profiles of `get -r` of 10,000 files put a
//! quarter of the client's CPU there.
//!
//! Here, the thread that wrote a small file hands it over ([`submit`]) and
//! goes back to the pool at once; the file's task waits without a thread,
//! on a channel. One committer thread per filesystem then loops: one
//! `syncfs` (which makes the files handed over so far durable, and the
//! names linked in its previous round), the answers for those names, then
//! the new files linked under their names. So in a steady stream of small
//! files each round costs one sync, whatever the number of files in it.
//! The thread exits as soon as it has nothing to do. Linux only (`syncfs`);
//! elsewhere each small file is synced on its own.

use std::collections::HashMap;
use std::fs::File;
use std::sync::{Arc, Mutex};

use tokio::sync::oneshot;

use super::{CommitError, IncomingFile};

/// A small file whose data and metadata are written, waiting for the
/// sync before its name appears.
pub(super) struct Ready {
    pub(super) file: IncomingFile,
    pub(super) overwrite: bool,
    pub(super) answer: oneshot::Sender<Result<(), CommitError>>,
}

/// The files waiting on one filesystem, and whether its thread runs.
#[derive(Default)]
struct Queue {
    waiting: Vec<Ready>,
    running: bool,
}

/// One queue per filesystem (by device number). A queue stays in the map
/// once made: there is one per filesystem the process ever commits to.
static QUEUES: Mutex<Option<HashMap<u64, Arc<Mutex<Queue>>>>> = Mutex::new(None);

/// Rounds run so far, process-wide (each one sync): for tests.
#[cfg(test)]
pub(crate) static ROUNDS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// Hands `ready` to the committer of filesystem `dev`, starting it if it
/// is not running. Its answer comes on the channel `ready` carries.
pub(super) fn submit(dev: u64, ready: Ready) {
    let queue = {
        let mut all = QUEUES.lock().unwrap_or_else(|e| e.into_inner());
        all.get_or_insert_with(HashMap::new)
            .entry(dev)
            .or_default()
            .clone()
    };
    let mut q = queue.lock().unwrap_or_else(|e| e.into_inner());
    q.waiting.push(ready);
    if q.running {
        return;
    }
    q.running = true;
    drop(q);
    let worker = queue.clone();
    let spawned = std::thread::Builder::new()
        .name("qxfer-commit".into())
        .spawn(move || commit_rounds(&worker));
    if let Err(e) = spawned {
        // No thread: every file waiting is answered with why, none hangs.
        let mut q = queue.lock().unwrap_or_else(|e| e.into_inner());
        q.running = false;
        for r in q.waiting.drain(..) {
            let label = r.file.label().to_owned();
            let _ = r.answer.send(Err(CommitError::Io {
                path: label,
                source: std::io::Error::new(e.kind(), format!("cannot start a commit thread: {e}")),
            }));
        }
    }
}

/// The committer's loop, until a round finds nothing to do.
fn commit_rounds(queue: &Mutex<Queue>) {
    // If this panics, the queue is left so that the next submit starts a
    // new thread, and nothing waiting hangs: dropping a `Ready` closes its
    // channel, which its task reads as a failed commit. (Only then: after
    // a normal end another thread may already own the queue.)
    struct Stop<'a>(&'a Mutex<Queue>);
    impl Drop for Stop<'_> {
        fn drop(&mut self) {
            if std::thread::panicking() {
                let mut q = self.0.lock().unwrap_or_else(|e| e.into_inner());
                q.running = false;
                q.waiting.clear();
            }
        }
    }
    let _stop = Stop(queue);
    // Linked in the last round, waiting for the sync that makes their names
    // durable.
    let mut linked: Vec<Ready> = Vec::new();
    loop {
        let arrived = {
            let mut q = queue.lock().unwrap_or_else(|e| e.into_inner());
            if q.waiting.is_empty() && linked.is_empty() {
                q.running = false;
                return;
            }
            std::mem::take(&mut q.waiting)
        };
        let any = arrived
            .first()
            .or(linked.first())
            .expect("one of them is not empty");
        let synced = sync_filesystem(any.file.handle());
        #[cfg(test)]
        ROUNDS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        for r in linked.drain(..) {
            let result = copy_result(&synced, r.file.label());
            let _ = r.answer.send(result);
        }
        for mut r in arrived {
            let placed = match &synced {
                Ok(()) => r.file.place(r.overwrite),
                Err(_) => copy_result(&synced, r.file.label()).map_err(|e| r.file.failed(e)),
            };
            match placed {
                Ok(()) => linked.push(r),
                Err(e) => {
                    let _ = r.answer.send(Err(e));
                }
            }
        }
    }
}

/// The sync's outcome for one file (an io::Error cannot be cloned).
fn copy_result(synced: &std::io::Result<()>, label: &std::path::Path) -> Result<(), CommitError> {
    match synced {
        Ok(()) => Ok(()),
        Err(e) => Err(CommitError::Io {
            path: label.to_owned(),
            source: match e.raw_os_error() {
                Some(code) => std::io::Error::from_raw_os_error(code),
                None => std::io::Error::new(e.kind(), e.to_string()),
            },
        }),
    }
}

/// Syncs the filesystem `file` is on: its data, metadata and every
/// directory entry on it.
fn sync_filesystem(file: &File) -> std::io::Result<()> {
    rustix::fs::syncfs(file).map_err(Into::into)
}

//! A server's description of a large file it has just received whole, made in the background at idle priority, so that the file's first delta need not wait for it.
//!
//! The first delta of a file uploaded whole used to begin with the server
//! reading and cutting the whole old version (a gigabyte: about a second
//! of one core, and the read), while the client cut its own. After a
//! whole upload of at least [`DESCRIBE_AFTER_UPLOAD`] bytes into a local
//! root, the server now cuts the committed file into chunks and takes the
//! values of its 1 MiB blocks on a thread of its own, and keeps the result
//! in the root's descriptions cache (bounded as ever; see
//! `files::described`). The thread works only while the server serves no
//! stream, checked before every block, and is in the idle scheduling class
//! for both the CPU and the disk besides: measured on loopback, a
//! description running beside the next 1 GiB upload slowed it by half,
//! even at idle priority. A file changed before the description is done
//! is not remembered; one that still has to wait for a quiet moment
//! [`MOST_WAIT`] after it was queued is given up (its descriptor would
//! hold a deleted file's space); at most
//! [`WAITING`] files wait, and one past that is left for its first delta to
//! describe, as before.

use std::sync::mpsc::{sync_channel, SyncSender};
use std::sync::OnceLock;

use super::*;

/// Whole uploads at least this large are described after they commit.
/// A smaller file's first delta describes it in a few tens of
/// milliseconds; a gigabyte takes about a second.
pub(crate) const DESCRIBE_AFTER_UPLOAD: u64 = 64 << 20;

/// Files waiting for the describing thread, at most.
const WAITING: usize = 16;

/// How long after it was queued a file may still wait for a moment
/// without transfers (in the queue or between its blocks).
const MOST_WAIT: std::time::Duration = std::time::Duration::from_secs(120);

/// How often a waiting description checks whether it may go on.
const RECHECK: std::time::Duration = std::time::Duration::from_millis(100);

/// Whether the background work may go on now (no transfer is served).
pub(crate) type Quiet = Arc<dyn Fn() -> bool + Send + Sync>;

/// One file to describe.
struct Job {
    src: FileBytes,
    size: u64,
    quiet: Quiet,
    queued: std::time::Instant,
}

/// Queues `src` (`size` bytes, a local file just committed) to be
/// described in the background while `quiet` says so; does nothing if the
/// queue is full or the thread could not be started.
pub(crate) fn describe_in_background(src: FileBytes, size: u64, quiet: Quiet) {
    static QUEUE: OnceLock<Option<SyncSender<Job>>> = OnceLock::new();
    let queue = QUEUE.get_or_init(|| {
        let (tx, rx) = sync_channel::<Job>(WAITING);
        std::thread::Builder::new()
            .name("qxfer-describe".into())
            .spawn(move || {
                idle_priority();
                for job in rx {
                    let began = std::time::Instant::now();
                    let mut wait = || {
                        while !(job.quiet)() {
                            if job.queued.elapsed() >= MOST_WAIT {
                                return false;
                            }
                            std::thread::sleep(RECHECK);
                        }
                        true
                    };
                    let done = describe_when(&job.src, job.size, &mut wait);
                    tracing::debug!(
                        described = done,
                        ms = began.elapsed().as_millis() as u64,
                        "background description of an upload"
                    );
                }
            })
            .ok()
            .map(|_| tx)
    });
    if let Some(tx) = queue {
        let queued = std::time::Instant::now();
        let _ = tx.try_send(Job {
            src,
            size,
            quiet,
            queued,
        });
    }
}

/// Describes `src` (`size` bytes) and remembers it in its descriptions
/// cache, unless it is already known or changed meanwhile: its chunks as
/// the receiver of a delta cuts them, its BLAKE3 and its blocks' values.
/// Whether it was remembered. Blocking (reads the whole file).
#[cfg(test)]
pub(crate) fn describe_now(src: &FileBytes, size: u64) -> bool {
    describe_when(src, size, &mut || true)
}

/// Describes as `describe_now` does, asking `may_go_on` before each block (it may wait
/// for a quiet moment; false gives the description up).
fn describe_when(src: &FileBytes, size: u64, may_go_on: &mut dyn FnMut() -> bool) -> bool {
    let Some(key) = src.key else {
        return false;
    };
    let Some(mut describer) = Describer::new(size) else {
        return false;
    };
    if !src.descriptions.receivers_keep() || src.recall(size, describer.avg()).is_some() {
        return false;
    }
    let (mut buf, mut at) = (Vec::new(), 0);
    while at < size {
        if !may_go_on() {
            return false;
        }
        // A block at a time: this thread holds little memory beside the
        // transfers it must not slow.
        let want = (size - at).min(BLOCK) as usize;
        if read_exact_into(&src.file, at, want, &mut buf).is_err() {
            return false;
        }
        describer.feed(&buf);
        at += want as u64;
    }
    let Some((avg, description)) = describer.finish() else {
        return false;
    };
    if Snapshot::of(&src.file) != src.before {
        return false;
    }
    src.descriptions.remember(key, avg, description);
    true
}

/// Cuts a file into chunks as the receiver of a delta does and takes its
/// BLAKE3 by 1 MiB blocks, as its bytes pass in order: the background
/// description above, and a client's download in sync mode (whose next
/// delta then reads nothing of it to describe it). Blocking (CPU).
pub(crate) struct Describer {
    cutter: Cutter,
    chunks: Chunks,
    blocks: Blocks,
    sums: Vec<ChunkSum>,
    taken: u64,
    size: u64,
}

impl Describer {
    /// For a file of `size` bytes, if one that large can be described.
    pub(crate) fn new(size: u64) -> Option<Self> {
        let cutter = Cutter::for_size(size);
        cutter.can_describe(size).then(|| Self {
            cutter,
            chunks: Chunks::new(cutter),
            blocks: Blocks::new(size),
            sums: Vec::new(),
            taken: 0,
            size,
        })
    }

    /// The average chunk size it cuts at.
    pub(crate) fn avg(&self) -> u32 {
        self.cutter.avg()
    }

    /// Takes the file's next bytes.
    pub(crate) fn feed(&mut self, bytes: &[u8]) {
        if self.taken + bytes.len() as u64 > self.size {
            // More than the file holds: what follows cannot be its description.
            self.taken = u64::MAX;
            return;
        }
        self.blocks.update(bytes);
        self.chunks.push(bytes);
        self.sums.extend(self.chunks.sums(false));
        self.taken += bytes.len() as u64;
    }

    /// The average and the description, if it took exactly the whole file.
    pub(crate) fn finish(mut self) -> Option<(u32, Description)> {
        if self.taken != self.size {
            return None;
        }
        self.sums.extend(self.chunks.sums(true));
        let values: Arc<[_]> = self.blocks.values().into();
        let digest = self.blocks.finish();
        Some((
            self.cutter.avg(),
            Description {
                chunks: self.sums.into(),
                digest: Some(digest),
                values: Some(values),
            },
        ))
    }
}

/// Puts the calling thread in the idle scheduling class, for the CPU and
/// for the disk: it runs only when nothing else wants to.
fn idle_priority() {
    #[cfg(target_os = "linux")]
    {
        let param = libc::sched_param { sched_priority: 0 };
        // SAFETY: sched_setscheduler reads `param`, which lives through the
        // call; pid 0 is the calling thread.
        unsafe {
            libc::sched_setscheduler(0, libc::SCHED_IDLE, &param);
        }
        // ioprio_set(IOPRIO_WHO_PROCESS, this thread, IOPRIO_CLASS_IDLE):
        // integer arguments only.
        const IOPRIO_WHO_PROCESS: libc::c_long = 1;
        const IOPRIO_CLASS_IDLE: libc::c_long = 3;
        // SAFETY: a system call on integers, no memory passed.
        unsafe {
            libc::syscall(
                libc::SYS_ioprio_set,
                IOPRIO_WHO_PROCESS,
                0,
                IOPRIO_CLASS_IDLE << 13,
            );
        }
    }
}

//! The bounded pool of blocking threads every disk call goes through.

use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Blocking filesystem calls running at once, per process. Every disk call
/// of every transfer goes through this pool, one chunk or one metadata
/// operation at a time, so an idle transfer (a slow peer, a rate limit)
/// holds no thread, thousands of small files do not spawn hundreds of
/// threads, and the kernel is not asked to serialise hundreds of creates
/// and renames on one directory's lock at once (with 512 threads it spent
/// most of its time spinning on that lock).
const DISK_THREADS: usize = 32;

static DISK_SLOTS: tokio::sync::Semaphore = tokio::sync::Semaphore::const_new(DISK_THREADS);

/// How long at least one [`blocking`] call has been running, process-wide
/// as the pool is: read only to tell a user what limited a transfer
/// (`--stats`). Not a sum over threads: thirty calls waiting on one disk at
/// once are one busy disk.
static DISK_BUSY: Mutex<Busy> = Mutex::new(Busy {
    running: 0,
    since: None,
    total: Duration::ZERO,
});

struct Busy {
    running: usize,
    since: Option<Instant>,
    total: Duration,
}

impl Busy {
    fn start(&mut self) {
        if self.running == 0 {
            self.since = Some(Instant::now());
        }
        self.running += 1;
    }

    fn end(&mut self) {
        self.running -= 1;
        if self.running == 0 {
            if let Some(t) = self.since.take() {
                self.total += t.elapsed();
            }
        }
    }
}

/// The time so far during which the disk threads had work (file reads,
/// writes, syncs, and the hashing beside them), at least one at a time.
pub(crate) fn disk_busy() -> Duration {
    let b = DISK_BUSY.lock().unwrap_or_else(|e| e.into_inner());
    b.total + b.since.map_or(Duration::ZERO, |t| t.elapsed())
}

/// Runs blocking filesystem work off the async threads, at most
/// [`DISK_THREADS`] at once.
///
/// A panic in `f` is passed on. A task that never ran because the runtime
/// is shutting down (a client stopped with Ctrl-C) leaves its caller
/// waiting, to be dropped by the same shutdown: that is not a panic
/// (it used to print one, with a backtrace, on every interrupted get).
pub(crate) async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    let _slot = DISK_SLOTS.acquire().await.expect("never closed");
    let timed = move || {
        DISK_BUSY.lock().unwrap_or_else(|e| e.into_inner()).start();
        // Counted as done even if `f` panics.
        struct Done;
        impl Drop for Done {
            fn drop(&mut self) {
                DISK_BUSY.lock().unwrap_or_else(|e| e.into_inner()).end();
            }
        }
        let _done = Done;
        f()
    };
    match tokio::task::spawn_blocking(timed).await {
        Ok(v) => v,
        Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
        Err(_) => std::future::pending().await,
    }
}

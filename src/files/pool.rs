//! The bounded pool of blocking threads every disk call goes through.

use std::sync::atomic::{AtomicBool, Ordering};
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

/// Counts one disk call as running (for [`disk_busy`]) until dropped, so
/// it is counted as done even if it panics.
struct BusyNow;

impl BusyNow {
    fn start() -> Self {
        DISK_BUSY.lock().unwrap_or_else(|e| e.into_inner()).start();
        Self
    }
}

impl Drop for BusyNow {
    fn drop(&mut self) {
        DISK_BUSY.lock().unwrap_or_else(|e| e.into_inner()).end();
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
        let _busy = BusyNow::start();
        f()
    };
    match tokio::task::spawn_blocking(timed).await {
        Ok(v) => v,
        Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
        Err(_) => std::future::pending().await,
    }
}

/// Whether a [`quick`] call is running inline on an async thread now.
static INLINE_BUSY: AtomicBool = AtomicBool::new(false);

/// Runs one small file's disk work (open, read or write, and begin its
/// commit: tens of microseconds on a local disk) on the calling async
/// thread when no other such call is running inline, and on the disk
/// threads otherwise.
///
/// Why: on a put -r of 50,000 x 1 KiB over loopback the hand-off to a disk
/// thread and back (a task queued, a thread woken, the caller woken) was
/// 30-40% of each side's CPU, more than the disk work it carried. Why one
/// at a time: a call that blocks for long (a disk that stalls) holds one
/// async thread, never more, and every call meanwhile takes the disk
/// threads as before, so everyone else is still served.
pub(crate) async fn quick<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    if INLINE_BUSY
        .compare_exchange(false, true, Ordering::Acquire, Ordering::Relaxed)
        .is_err()
    {
        return blocking(f).await;
    }
    // Freed even if `f` panics.
    struct Slot;
    impl Drop for Slot {
        fn drop(&mut self) {
            INLINE_BUSY.store(false, Ordering::Release);
        }
    }
    let _slot = Slot;
    let _busy = BusyNow::start();
    f()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::mpsc;
    use std::thread;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_stalled_quick_call_does_not_hold_up_the_next() {
        // The first call holds the inline slot until the second has run:
        // were the second to wait for the slot, neither would finish.
        let (ran, wait) = mpsc::channel::<()>();
        let first = tokio::spawn(quick(move || wait.recv_timeout(Duration::from_secs(10))));
        // Let the first take its slot (if another test holds it, the first
        // runs on a disk thread and this test holds all the same).
        tokio::time::sleep(Duration::from_millis(50)).await;
        quick(move || ran.send(()).expect("the first waits")).await;
        let waited = tokio::time::timeout(Duration::from_secs(10), first)
            .await
            .expect("the first call finished")
            .expect("no panic");
        assert!(
            waited.is_ok(),
            "the second call ran while the first was stalled"
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_quick_call_that_panics_frees_its_slot_and_passes_the_panic_on() {
        let failed = tokio::spawn(quick(|| panic!("deliberate"))).await;
        assert!(failed.expect_err("the panic is passed on").is_panic());
        // Afterwards calls run inline again: on the caller's own thread.
        let mut inline = false;
        for _ in 0..100 {
            let here = thread::current().id();
            if quick(move || thread::current().id() == here).await {
                inline = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert!(inline, "the slot was never free again");
    }
}

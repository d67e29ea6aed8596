//! The bounded pool of blocking threads every disk call goes through.

/// Blocking filesystem calls running at once, per process. Every disk call
/// of every transfer goes through this pool, one chunk or one metadata
/// operation at a time, so an idle transfer (a slow peer, a rate limit)
/// holds no thread, thousands of small files do not spawn hundreds of
/// threads, and the kernel is not asked to serialise hundreds of creates
/// and renames on one directory's lock at once (with 512 threads it spent
/// most of its time spinning on that lock).
const DISK_THREADS: usize = 32;

static DISK_SLOTS: tokio::sync::Semaphore = tokio::sync::Semaphore::const_new(DISK_THREADS);

/// Runs blocking filesystem work off the async threads, at most
/// [`DISK_THREADS`] at once.
///
/// A panic in `f` is passed on. A task that never ran because the runtime
/// is shutting down (a client stopped with Ctrl-C) leaves its caller
/// waiting, to be dropped by the same shutdown: that is not a panic
/// (it used to print one, with a backtrace, on every interrupted get).
pub(crate) async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    let _slot = DISK_SLOTS.acquire().await.expect("never closed");
    match tokio::task::spawn_blocking(f).await {
        Ok(v) => v,
        Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
        Err(_) => std::future::pending().await,
    }
}

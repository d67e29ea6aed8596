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
pub(crate) async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    let _slot = DISK_SLOTS.acquire().await.expect("never closed");
    tokio::task::spawn_blocking(f)
        .await
        .expect("filesystem task panicked")
}

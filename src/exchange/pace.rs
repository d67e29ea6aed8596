//! `--limit-rate`: one shared pacer per client, paced on the disk side.

use std::time::Duration;

/// A shared rate limit (`--limit-rate`): every transfer using the same
/// pacer together moves at most `rate` bytes per second. It paces the disk
/// side, so a limited download reads slowly and flow control slows the
/// sender. The wait is a timer on the async side: a limited transfer holds
/// no thread while it waits.
#[derive(Debug)]
pub(crate) struct Pacer {
    rate: u64,
    next: std::sync::Mutex<tokio::time::Instant>,
}

impl Pacer {
    /// A pacer for `rate` bytes per second.
    pub(crate) fn new(rate: u64) -> Self {
        Self {
            rate: rate.max(1),
            next: std::sync::Mutex::new(tokio::time::Instant::now()),
        }
    }

    /// The most bytes to move between two waits: about a quarter second's
    /// worth, so a slow limit still moves data every second (the peer's
    /// stall timeout sees progress) instead of one large chunk per minute.
    pub(crate) fn slice(&self) -> usize {
        (self.rate / 4).clamp(1024, 256 * 1024) as usize
    }

    /// Books `n` bytes and waits until they are due.
    pub(crate) async fn take(&self, n: usize) {
        let due = {
            let mut next = self.next.lock().unwrap_or_else(|e| e.into_inner());
            let begin = (*next).max(tokio::time::Instant::now());
            *next = begin + Duration::from_secs_f64(n as f64 / self.rate as f64);
            *next
        };
        tokio::time::sleep_until(due).await;
    }
}

//! The memory an object root's uploads hold in buffers, bounded server-wide and per client identity: an upload reserves what it will hold before it is accepted.
//!
//! An upload into an object store buffers its bytes: a file smaller than a
//! part whole (it becomes one PUT), a larger one a part being filled and
//! the parts being stored. Without a bound on the total, one client with
//! 32 connections of 512 streams each could make a server hold some
//! 128 GiB. Each upload therefore reserves, before the server accepts it,
//! all it will ever hold (never a part at a time: uploads that each held
//! some and waited for more could wait for each other forever), and gives
//! it back when it ends. A reservation that cannot be had within
//! [`WAIT`] is refused as [`ErrorCode::Busy`], which clients retry; one
//! larger than the whole budget is refused as too large.
//!
//! Each upload reserves at least [`AT_LEAST`], however small its file: the
//! budget then bounds how many uploads run at once too (256 with the
//! default budget, 64 per identity), and with them the leases on names
//! this server keeps fresh in a shared store (see leases.rs): 512 small
//! files of one `put -r` each holding a lease while they queued for the
//! store once kept so many leases to rewrite that some lapsed.
//!
//! One client identity may hold at most a quarter of the budget (see
//! [`SHARE`]): a flood of stalled uploads from one identity (640 of 2 MiB
//! in the load test) would otherwise take all of it, and every other
//! client's upload would wait and then be refused as busy.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::paths::RemotePath;
use crate::protocol::{ErrorCode, RemoteError};
use crate::tls::Fingerprint;

/// Default budget: 1 GiB, some forty uploads of 8 MiB parts at once.
pub(crate) const DEFAULT_UPLOAD_MEMORY: u64 = 1 << 30;

/// The budget is counted in units of this many bytes (a semaphore counts
/// in u32 per acquisition; 64 KiB units reach 256 TiB).
const UNIT: u64 = 64 << 10;

/// How long an upload waits for memory before it is refused as busy: well
/// within a client's wait for an answer (60 s by default). Most waits are
/// for the client's own earlier uploads (a tree of thousands of small
/// files, hundreds at once, into a busy store).
const WAIT: Duration = Duration::from_secs(40);

/// The least an upload reserves (see the module's notes).
const AT_LEAST: u64 = 4 << 20;

/// One client identity may hold 1/SHARE of the budget.
const SHARE: u64 = 4;

/// Identities whose share is remembered before idle ones are forgotten.
const REMEMBERED: usize = 1024;

/// The budget.
#[derive(Debug)]
pub(super) struct UploadMemory {
    free: Arc<Semaphore>,
    units: u64,
    /// The least one upload reserves, in bytes ([`AT_LEAST`], or the
    /// whole budget if smaller).
    at_least: u64,
    /// What each client identity may still take of its share.
    shares: Mutex<HashMap<Fingerprint, Arc<Semaphore>>>,
}

/// Memory reserved by one upload, given back when dropped.
#[derive(Debug)]
pub(super) struct Reserved {
    _permits: Option<(OwnedSemaphorePermit, OwnedSemaphorePermit)>,
}

impl UploadMemory {
    /// A budget of `bytes` (at least one unit).
    pub(super) fn new(bytes: u64) -> Self {
        let units = (bytes / UNIT).clamp(1, u64::from(u32::MAX));
        Self {
            free: Arc::new(Semaphore::new(units as usize)),
            units,
            at_least: AT_LEAST.min(units * UNIT),
            shares: Mutex::default(),
        }
    }

    /// A budget of `bytes` where an upload reserves only what it asks.
    #[cfg(test)]
    fn by_bytes(bytes: u64) -> Self {
        Self {
            at_least: 0,
            ..Self::new(bytes)
        }
    }

    /// Units one client identity may hold at once.
    fn share(&self) -> u64 {
        (self.units / SHARE).max(1)
    }

    /// What `client` may still take of its share.
    fn share_of(&self, client: &Fingerprint) -> Arc<Semaphore> {
        let mut shares = self.shares.lock().unwrap_or_else(|e| e.into_inner());
        if shares.len() >= REMEMBERED {
            // An identity holding nothing and waiting for nothing.
            shares.retain(|_, s| Arc::strong_count(s) > 1);
        }
        shares
            .entry(*client)
            .or_insert_with(|| Arc::new(Semaphore::new(self.share() as usize)))
            .clone()
    }

    /// Reserves `bytes` for an upload of `path` by `client`, waiting up to
    /// [`WAIT`] for uploads in flight to give memory back.
    pub(super) async fn reserve(
        &self,
        bytes: u64,
        client: &Fingerprint,
        path: &RemotePath,
    ) -> Result<Reserved, RemoteError> {
        self.reserve_within(bytes, client, path, WAIT).await
    }

    async fn reserve_within(
        &self,
        bytes: u64,
        client: &Fingerprint,
        path: &RemotePath,
        wait: Duration,
    ) -> Result<Reserved, RemoteError> {
        let units = bytes.max(self.at_least).max(1).div_ceil(UNIT);
        if units > self.units {
            return Err(RemoteError::new(
                ErrorCode::TooLarge,
                format!(
                    "'{path}' would need {} MiB of the server's memory to be stored in its object store, more than all its uploads together may hold ({} MiB, its --upload-memory); ask its operator",
                    bytes.div_ceil(1 << 20),
                    (self.units * UNIT) >> 20
                ),
            ));
        }
        // The client's share first, then the budget: a client past its
        // share waits on its own uploads only. An upload larger than a
        // share (a file of hundreds of GiB, with parts to match) takes the
        // whole share, so its client holds nothing else meanwhile.
        let share = self.share_of(client);
        let of_share = units.min(self.share()) as u32;
        let both = async {
            let mine = share
                .acquire_many_owned(of_share)
                .await
                .expect("shares are never closed");
            let all = self
                .free
                .clone()
                .acquire_many_owned(units as u32)
                .await
                .expect("the budget is never closed");
            (mine, all)
        };
        match tokio::time::timeout(wait, both).await {
            Ok(permits) => Ok(Reserved {
                _permits: Some(permits),
            }),
            Err(_) => Err(RemoteError::new(
                ErrorCode::Busy,
                format!("'{path}': the server is at the limit of the memory its uploads may hold (--upload-memory, a quarter of it per client); try again shortly"),
            )),
        }
    }

    /// Bytes not reserved now.
    #[cfg(test)]
    fn free(&self) -> u64 {
        self.free.available_permits() as u64 * UNIT
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn path() -> RemotePath {
        RemotePath::parse("f", false).unwrap()
    }

    fn client(n: u8) -> Fingerprint {
        Fingerprint::of(&rustls::pki_types::CertificateDer::from(vec![n]))
    }

    #[tokio::test]
    async fn every_upload_takes_at_least_its_floor_so_few_run_at_once() {
        let memory = UploadMemory::new(64 * AT_LEAST);
        let c: Vec<_> = (0..4).map(client).collect();
        let mut held = Vec::new();
        for n in 0..64 {
            held.push(memory.reserve(10, &c[n % 4], &path()).await.unwrap());
        }
        assert_eq!(memory.free(), 0, "64 one-byte uploads take the budget");
        let e = memory
            .reserve_within(10, &client(9), &path(), Duration::from_millis(100))
            .await
            .unwrap_err();
        assert_eq!(e.code, ErrorCode::Busy);
        // A budget smaller than the floor: one upload at a time, not none.
        let small = UploadMemory::new(UNIT);
        let one = small.reserve(10, &client(1), &path()).await.unwrap();
        drop(one);
        assert_eq!(small.free(), UNIT);
    }

    #[tokio::test]
    async fn reservations_come_back_when_dropped() {
        let memory = UploadMemory::by_bytes(16 * UNIT);
        let a = memory.reserve(3 * UNIT, &client(1), &path()).await.unwrap();
        assert_eq!(memory.free(), 13 * UNIT);
        let b = memory.reserve(1, &client(2), &path()).await.unwrap();
        assert_eq!(memory.free(), 12 * UNIT, "a byte takes a whole unit");
        drop(a);
        assert_eq!(memory.free(), 15 * UNIT);
        drop(b);
        assert_eq!(memory.free(), 16 * UNIT);
    }

    #[tokio::test]
    async fn more_than_the_whole_budget_is_too_large_at_once() {
        let memory = UploadMemory::by_bytes(4 * UNIT);
        let e = memory
            .reserve(4 * UNIT + 1, &client(1), &path())
            .await
            .unwrap_err();
        assert_eq!(e.code, ErrorCode::TooLarge);
        assert!(e.message.contains("--upload-memory"), "{}", e.message);
        assert_eq!(memory.free(), 4 * UNIT);
    }

    #[tokio::test]
    async fn a_full_budget_waits_then_says_busy() {
        let memory = Arc::new(UploadMemory::by_bytes(8 * UNIT));
        let wait = Duration::from_millis(300);
        let held: Vec<_> = (0..4).map(client).collect();
        let mut reserved = Vec::new();
        for c in &held {
            reserved.push(memory.reserve(2 * UNIT, c, &path()).await.unwrap());
        }
        // Freed within the wait: the reservation goes through.
        let m = memory.clone();
        let waiting = tokio::spawn(async move {
            m.reserve_within(UNIT, &client(9), &path(), wait)
                .await
                .map(|_| ())
        });
        tokio::time::sleep(Duration::from_millis(50)).await;
        drop(reserved.pop());
        waiting.await.unwrap().unwrap();
        // Never freed: busy after the wait.
        let _more = memory.reserve(2 * UNIT, &client(3), &path()).await.unwrap();
        let e = memory
            .reserve_within(UNIT, &client(9), &path(), wait)
            .await
            .unwrap_err();
        assert_eq!(e.code, ErrorCode::Busy);
    }

    #[tokio::test]
    async fn one_client_cannot_take_what_others_need() {
        let memory = UploadMemory::by_bytes(16 * UNIT);
        let wait = Duration::from_millis(200);
        let greedy = client(1);
        // Its share is a quarter: 4 units, then it waits on itself.
        let mut held = Vec::new();
        for _ in 0..4 {
            held.push(memory.reserve(UNIT, &greedy, &path()).await.unwrap());
        }
        let e = memory
            .reserve_within(UNIT, &greedy, &path(), wait)
            .await
            .unwrap_err();
        assert_eq!(e.code, ErrorCode::Busy);
        // Everyone else still finds the rest.
        let other = memory.reserve(8 * UNIT, &client(2), &path()).await;
        assert!(other.is_ok());
        // A single upload larger than a share takes the whole share.
        drop(held);
        drop(other);
        let big = memory.reserve(10 * UNIT, &greedy, &path()).await.unwrap();
        assert_eq!(memory.free(), 6 * UNIT);
        let e = memory
            .reserve_within(UNIT, &greedy, &path(), wait)
            .await
            .unwrap_err();
        assert_eq!(e.code, ErrorCode::Busy);
        drop(big);
    }
}

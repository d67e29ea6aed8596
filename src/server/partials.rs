//! Resumable uploads on this server: their names, one writer each (a newer one takes over), and the periodic sweep of stale ones.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tracing::{info, warn};

use crate::paths::RemotePath;
use crate::protocol::FileMeta;
use crate::store::InUse;
use crate::tls::Fingerprint;

use super::ServeConfig;

/// Which resumable partials are being written, so that only one upload
/// writes a partial at a time, and a newer one takes over from an older one
/// (a client that was killed and reruns the same put before the server has
/// noticed the old connection is gone).
#[derive(Debug, Default)]
pub(super) struct Partials {
    slots: Mutex<HashMap<String, Arc<PartialSlot>>>,
}

#[derive(Debug)]
struct PartialSlot {
    lock: Arc<tokio::sync::Mutex<()>>,
    /// Bumped by each new claimant; the holder stops when it changes.
    generation: tokio::sync::watch::Sender<u64>,
}

/// The right to write one partial, until dropped.
pub(super) struct PartialLease {
    _guard: tokio::sync::OwnedMutexGuard<()>,
    slot: Arc<PartialSlot>,
    generation: u64,
    watch: tokio::sync::watch::Receiver<u64>,
    name: String,
    partials: Arc<Partials>,
}

/// How long a newer upload waits for an older one of the same partial to stop.
const TAKEOVER_TIMEOUT: Duration = Duration::from_secs(10);

impl Partials {
    /// How many partials are claimed by an upload now.
    pub(super) fn writing(&self) -> usize {
        self.slots.lock().unwrap_or_else(|e| e.into_inner()).len()
    }

    /// Claims `name`, telling any current holder to stop and waiting for it.
    pub(super) async fn acquire(self: &Arc<Self>, name: &str) -> Option<PartialLease> {
        let slot = {
            let mut slots = self.slots.lock().unwrap_or_else(|e| e.into_inner());
            slots
                .entry(name.to_owned())
                .or_insert_with(|| {
                    Arc::new(PartialSlot {
                        lock: Arc::default(),
                        generation: tokio::sync::watch::Sender::new(0),
                    })
                })
                .clone()
        };
        let mut generation = 0;
        slot.generation.send_modify(|g| {
            *g += 1;
            generation = *g;
        });
        let watch = slot.generation.subscribe();
        let guard = tokio::time::timeout(TAKEOVER_TIMEOUT, slot.lock.clone().lock_owned())
            .await
            .ok()?;
        Some(PartialLease {
            _guard: guard,
            slot,
            generation,
            watch,
            name: name.to_owned(),
            partials: self.clone(),
        })
    }

    /// Whether an upload is writing `name` now.
    pub(super) fn in_use(&self, name: &str) -> bool {
        let slots = self.slots.lock().unwrap_or_else(|e| e.into_inner());
        slots
            .get(name)
            .is_some_and(|slot| slot.lock.try_lock().is_err())
    }
}

impl PartialLease {
    /// Completes when a newer upload of the same partial wants it.
    pub(super) async fn superseded(&mut self) {
        let mine = self.generation;
        let _ = self.watch.wait_for(|g| *g != mine).await;
    }
}

impl Drop for PartialLease {
    fn drop(&mut self) {
        let mut slots = self
            .partials
            .slots
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        // Only the map and this lease hold the slot: nobody is waiting.
        if Arc::strong_count(&self.slot) == 2 {
            slots.remove(&self.name);
        }
    }
}

/// Deletes what interrupted uploads left in the store once it is older
/// than `--partial-ttl`: at start, then every hour (or every TTL, if shorter).
pub(super) async fn sweep_partials_forever(config: Arc<ServeConfig>, partials: Arc<Partials>) {
    let every = config.partial_ttl.min(Duration::from_secs(3600));
    loop {
        let held = partials.clone();
        let in_use: InUse = Arc::new(move |name: &str| held.in_use(name));
        match config.store.sweep(config.partial_ttl, in_use).await {
            Ok(0) => {}
            Ok(n) => info!(
                "removed {n} stale partial upload(s) older than {:?}",
                config.partial_ttl
            ),
            Err(e) => warn!("cannot clean the partial store: {e}"),
        }
        tokio::time::sleep(every).await;
    }
}

/// The partial store name for an upload: a digest of the client identity
/// and remote path, then one of the source's size and mtime. The first part
/// finds earlier versions of the same upload; the second tells them apart.
pub(super) fn partial_name(client: &Fingerprint, path: &RemotePath, meta: &FileMeta) -> String {
    let mut who = blake3::Hasher::new();
    who.update(client.as_bytes());
    who.update(path.wire().as_bytes());
    let mut version = blake3::Hasher::new();
    version.update(&meta.size.to_le_bytes());
    if let Some(t) = meta.mtime {
        version.update(&t.secs.to_le_bytes());
        version.update(&t.nanos.to_le_bytes());
    }
    format!(
        "{}{}-{}",
        PART_PREFIX,
        &who.finalize().to_hex()[..32],
        &version.finalize().to_hex()[..16]
    )
}

/// A fresh name for an upload from a pipe (`put -`): such uploads are
/// never resumed, so nothing else ever has the same name.
pub(super) fn pipe_name() -> String {
    format!(
        "pipe-{:016x}{:016x}",
        crate::exchange::random_u64(),
        crate::exchange::random_u64()
    )
}

/// Prefix of resumable partials in the partial store.
const PART_PREFIX: &str = "part-";

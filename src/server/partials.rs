//! The partial store: one writer per resumable upload (a newer one takes over), and the sweep of stale partials.

use std::collections::HashMap;
use std::io;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use cap_fs_ext::DirExt;
use cap_std::fs::Dir;
use tracing::{info, warn};

use crate::paths::RemotePath;
use crate::protocol::FileMeta;
use crate::tls::Fingerprint;
use crate::transfer::{self, blocking};

use super::{ServeConfig, PARTIAL_DIR};

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

/// Deletes what interrupted uploads left in the partial store once it is
/// older than `--partial-ttl`: at start, then every hour (or every TTL, if shorter).
pub(super) async fn sweep_partials_forever(config: Arc<ServeConfig>, partials: Arc<Partials>) {
    let every = config.partial_ttl.min(Duration::from_secs(3600));
    loop {
        let (c, p) = (config.clone(), partials.clone());
        match blocking(move || sweep_partials(&c.root_dir, c.partial_ttl, &p)).await {
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

fn sweep_partials(root: &Dir, ttl: Duration, partials: &Partials) -> io::Result<usize> {
    let store = match root.open_dir_nofollow(PARTIAL_DIR) {
        Ok(d) => d,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(0),
        Err(e) => return Err(e),
    };
    let now = SystemTime::now();
    let mut removed = 0;
    for entry in store.entries()?.flatten() {
        let name = entry.file_name();
        let name = name.to_string_lossy();
        let Ok(md) = store.symlink_metadata(&*name) else {
            continue;
        };
        let age = md
            .modified()
            .ok()
            .and_then(|m| now.duration_since(m.into_std()).ok())
            .unwrap_or_default();
        if age > ttl
            && !partials.in_use(&name)
            && !(md.is_file() && transfer::is_being_written(&store, &name))
            && store.remove_file(&*name).is_ok()
        {
            removed += 1;
        }
    }
    Ok(removed)
}

/// The partial store name for an upload: a digest of the client identity
/// and remote path, then one of the source's size and mtime. The first part
/// finds earlier versions of the same upload; the second tells them apart.
pub(super) fn partial_name(client: &Fingerprint, path: &RemotePath, meta: &FileMeta) -> String {
    let mut who = blake3::Hasher::new();
    who.update(client.as_bytes());
    who.update(path.to_string().as_bytes());
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

/// Prefix of resumable partials in the partial store.
const PART_PREFIX: &str = "part-";

/// Opens (creating it, mode 0700, if needed) the partial store in the root.
/// It must be a real directory: a symlink there is refused, not followed.
pub(super) fn partial_store(root: &Dir) -> io::Result<Dir> {
    let mut builder = cap_std::fs::DirBuilder::new();
    cap_std::fs::DirBuilderExt::mode(&mut builder, 0o700);
    match root.create_dir_with(PARTIAL_DIR, &builder) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(e),
    }
    root.open_dir_nofollow(PARTIAL_DIR)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::transfer::IncomingFile;
    use cap_std::ambient_authority;
    use std::path::PathBuf;

    /// Sets a file's mtime `ago` in the past.
    fn age(dir: &Dir, name: &str, ago: Duration) {
        let f = dir.open(name).unwrap().into_std();
        f.set_modified(SystemTime::now() - ago).unwrap();
    }

    #[test]
    fn the_sweep_removes_only_stale_files_nobody_is_writing() {
        let tmp = tempfile::tempdir().unwrap();
        let root = Dir::open_ambient_dir(tmp.path(), ambient_authority()).unwrap();
        let store = partial_store(&root).unwrap();
        let hour = Duration::from_secs(3600);
        // Abandoned: old, nobody holds it.
        store.write("part-abandoned", b"x").unwrap();
        age(&store, "part-abandoned", 2 * hour);
        // Recent: kept for a resume.
        store.write("part-recent", b"x").unwrap();
        // A slow upload's named temporary: old mtime, but open and locked.
        let slow = IncomingFile::create_in(
            partial_store(&root).unwrap(),
            root.try_clone().unwrap(),
            "dest",
            PathBuf::from("dest"),
        )
        .unwrap();
        std::os::unix::fs::FileExt::write_all_at(&slow.file().unwrap(), b"data", 0).unwrap();
        let slow_name = store
            .entries()
            .unwrap()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .find(|n| n.starts_with(transfer::TMP_PREFIX))
            .unwrap();
        age(&store, &slow_name, 2 * hour);

        let removed = sweep_partials(&root, hour, &Partials::default()).unwrap();
        assert_eq!(removed, 1);
        let mut left: Vec<_> = store
            .entries()
            .unwrap()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        left.sort();
        assert_eq!(left, vec![slow_name.clone(), "part-recent".to_owned()]);

        // Once the upload is gone (its temporary deleted with it), nothing is in use.
        drop(slow);
        assert!(!store.exists(&slow_name));
    }
}

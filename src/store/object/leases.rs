//! Leases on names in the object store, which every server sharing the bucket honours: what closes the race of two uploads to one name on a store without conditional writes.
//!
//! Garage (as of 2.5) ignores `If-None-Match: *`, so two servers that each
//! checked that a name was free could both write it, and one client told
//! "saved" would find the other's data. A writer therefore holds a lease
//! on the name from before it checks the name until after it has written:
//!
//! 1. it writes a lease object of its own,
//!    `.qxfer-leases/NAME/.qxfer-lease/<holder>-<random id>`;
//! 2. it lists the leases on NAME and beneath it (`.qxfer-leases/NAME/`)
//!    and those on each directory above NAME
//!    (`.qxfer-leases/DIR/.qxfer-lease/`): a file `a` and a file `a/b`
//!    cannot both be, and a rename of `a` moves `a/b`. Each listing holds
//!    only leases related to NAME, so its cost does not grow with the
//!    uploads in flight beside it (one listing of every lease beneath the
//!    top directory made a 2,000-file `put -r` ten times slower). If
//!    another lease there is fresh (younger than [`TTL`] by the store's
//!    own clock, compared with the time of its own lease), it withdraws
//!    and tries again a little later, or gives up with [`ErrorCode::Busy`];
//! 3. only then does it check the name and write, and finally deletes its
//!    lease.
//!
//! A rename leases its old and new names, so nothing beneath either can be
//! written while it moves them.
//!
//! Of two writers, each writes its lease before it lists; the later of the
//! two lists therefore sees the other's lease (a store whose listings show
//! every write that completed before them, as Garage's quorum reads do),
//! so at most one of them goes on. Both may see each other and both
//! withdraw: they retry after random delays. A lease is kept fresh while
//! its writer lives (rewritten every [`REFRESH`]): an upload holds it for
//! as long as its data takes, so a second upload of the name is refused at
//! once instead of after its data, and a server that died frees its names
//! within [`TTL`]. A writer whose lease could not be refreshed for too
//! long gives up before it writes: it can no longer be sure it is alone.
//!
//! A directory's lease, which small uploads share (dir_leases.rs), is held
//! for seconds, not for an upload's life: it is rewritten every 4 s and
//! counts as fresh for 24 s (its id says which kind it is), so a server
//! that dies holding one blocks the directory for 24 s at most.
//!
//! A server restarted after a crash would otherwise wait out its own dead
//! leases: each server's lease ids start with a holder tag (a hash of its
//! host, network namespace, listening address and root: no two live
//! servers share one, since two cannot listen on one address), and a
//! server deletes the leases of its own tag when it starts ([`adopt`]).
//!
//! What remains: another program writing the bucket directly, and a server
//! paused (not dead) for longer than [`TTL`] between its last check and
//! its write.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use futures::stream::{self, StreamExt, TryStreamExt};
use object_store::path::Path as Key;
use object_store::{ObjectStore, ObjectStoreExt, PutPayload};
use tracing::warn;

use crate::paths::RemotePath;
use crate::protocol::{ErrorCode, RemoteError};

use super::{is_not_found, rand_u64, store_error, Inner};

/// Where leases live, beneath the root's prefix.
pub(super) const LEASE_DIR: &str = ".qxfer-leases";

/// A lease not rewritten for this long is taken for one whose server died.
/// Long enough that a store slowed down by a flood of other requests does
/// not make live leases lapse (CI once saw a rewrite 20 s late); a server
/// restarted after a crash takes its own back at once ([`adopt`]), others
/// wait this long for a dead server's names.
pub(super) const TTL: Duration = Duration::from_secs(60);

/// How often a holder rewrites its lease.
const REFRESH: Duration = Duration::from_secs(10);

/// A holder whose last rewrite is older than this no longer writes under
/// the lease: others may soon take it for dead.
const TRUSTED_FOR: Duration = Duration::from_secs(45);

/// A lease's times: how long it counts as fresh to others, how often its
/// holder rewrites it, and how long after its last rewrite the holder
/// still writes under it (always well short of its life to others).
#[derive(Debug, Clone, Copy)]
struct Timing {
    ttl: Duration,
    refresh: Duration,
    trusted_for: Duration,
    /// What the lease's id has after its holder's tag.
    mark: &'static str,
}

/// A name's lease ([`TTL`], [`REFRESH`], [`TRUSTED_FOR`]).
const NAME_TIMING: Timing = Timing {
    ttl: TTL,
    refresh: REFRESH,
    trusted_for: TRUSTED_FOR,
    mark: "-",
};

/// A directory's lease for small files (dir_leases.rs): held for seconds,
/// so rewritten often and given a shorter life: a server that dies holding
/// one blocks the directory for 24 s, where a name's lease blocks only
/// its name, for 60 s.
const DIR_TIMING: Timing = Timing {
    ttl: Duration::from_secs(24),
    refresh: Duration::from_secs(4),
    trusted_for: Duration::from_secs(16),
    mark: DIR_ID,
};

/// What the ids of directory leases have after their holder's tag.
const DIR_ID: &str = "-dir-";

/// How long the lease with the id `id` counts as fresh.
fn ttl_of(id: &str) -> Duration {
    if id.contains(DIR_ID) {
        DIR_TIMING.ttl
    } else {
        NAME_TIMING.ttl
    }
}

/// How long a writer keeps trying while others hold the name, before it
/// gives up as busy (two writers that saw each other both retry within it).
const TRY_FOR: Duration = Duration::from_secs(3);

/// Leases written, or listings made, at once by one [`Leases::take_all`].
const WRITES_AT_ONCE: usize = 16;

/// The name of the directory that holds the lease objects on a name,
/// inside that name's lease directory (reserved: no name of a user's can
/// be it).
const LEAF: &str = ".qxfer-lease";

/// The leases one writer holds (one name, or every name a rename moves),
/// kept fresh until released or dropped.
#[derive(Debug)]
pub(super) struct Leases {
    inner: Arc<Inner>,
    /// The names leased.
    names: Vec<Vec<String>>,
    /// The lease objects.
    keys: Vec<Key>,
    /// When they were last all written, and whether they ever went
    /// unwritten for too long.
    fresh: Arc<Mutex<Freshness>>,
    refresher: tokio::task::JoinHandle<()>,
    released: bool,
    /// Tells this holder's leases apart in [`Held`].
    serial: u64,
    /// Keeps this server's directory leases off the names, for as long as
    /// these are held ([`super::dir_leases`]); none for a directory lease.
    _block: Option<super::dir_leases::Block>,
}

impl Leases {
    /// Leases on every name in `names` (none of them the root), checked
    /// against every fresh lease on a name related to one of them.
    pub(super) async fn take_all(
        inner: &Arc<Inner>,
        names: Vec<Vec<String>>,
        path: &RemotePath,
    ) -> Result<Self, RemoteError> {
        let (lease, ()) = Self::take_checking(inner, names, path, || async {}).await?;
        Ok(lease)
    }

    /// Like [`Leases::take_all`], running `check` (the checks of the names
    /// the leases make safe) beside the search for other leases, once the
    /// leases are written: a writer that reads the names after its lease
    /// is written and finds no other lease sees everything written under
    /// another lease before, and nobody writes under one after (they would
    /// see ours). One round trip to the store fewer than one after the
    /// other. What `check` gives with the leases is its last run's.
    pub(super) async fn take_checking<T, F, Fut>(
        inner: &Arc<Inner>,
        names: Vec<Vec<String>>,
        path: &RemotePath,
        check: F,
    ) -> Result<(Self, T), RemoteError>
    where
        F: Fn() -> Fut,
        Fut: std::future::Future<Output = T>,
    {
        // This server's directory leases step aside for these names (they
        // would otherwise be in the way for as long as their directories
        // are busy).
        let block = inner.dirs.block(&names);
        let none = HashSet::new();
        let (mut lease, checked) =
            Self::attempt(inner, names, path, check, TRY_FOR, &none, NAME_TIMING).await?;
        lease._block = Some(block);
        Ok((lease, checked))
    }

    /// A directory lease for [`super::dir_leases`]: like
    /// [`Leases::take_checking`] on the one name `dir`, tried once (a
    /// busy directory is not waited for: its files go the usual way).
    /// This server's other directory leases (ids in `ours`) are not in its
    /// way: dir_leases.rs keeps their uploads apart itself.
    pub(super) async fn take_dir<T, F, Fut>(
        inner: &Arc<Inner>,
        dir: Vec<String>,
        path: &RemotePath,
        check: F,
        ours: &HashSet<String>,
    ) -> Result<(Self, T), RemoteError>
    where
        F: Fn() -> Fut,
        Fut: std::future::Future<Output = T>,
    {
        Self::attempt(
            inner,
            vec![dir],
            path,
            check,
            Duration::ZERO,
            ours,
            DIR_TIMING,
        )
        .await
    }

    /// The id of the lease objects.
    pub(super) fn id(&self) -> &str {
        self.keys
            .first()
            .and_then(|k| k.filename())
            .unwrap_or_default()
    }

    /// Writes leases on `names` and looks for others until none is in the
    /// way, for up to `patience`.
    async fn attempt<T, F, Fut>(
        inner: &Arc<Inner>,
        names: Vec<Vec<String>>,
        path: &RemotePath,
        check: F,
        patience: Duration,
        ours: &HashSet<String>,
        timing: Timing,
    ) -> Result<(Self, T), RemoteError>
    where
        F: Fn() -> Fut,
        Fut: std::future::Future<Output = T>,
    {
        let failed = |e| store_error(e, path, "cannot lease the name of");
        let started = Instant::now();
        let mut attempt = 0u32;
        loop {
            let mark = timing.mark;
            let id = format!(
                "{}{mark}{:016x}{:016x}",
                inner.holder(),
                rand_u64(),
                rand_u64()
            );
            let keys: Vec<Key> = names.iter().map(|n| lease_key(inner, n, &id)).collect();
            let written_at = Instant::now();
            write_all(inner, &keys).await.map_err(failed)?;
            let (conflict, checked) = tokio::join!(others(inner, &names, &id, ours), check());
            let conflict = match conflict {
                Ok(c) => c,
                Err(e) => {
                    delete_all(inner, keys).await;
                    return Err(failed(e));
                }
            };
            if !conflict {
                let fresh = Arc::new(Mutex::new(Freshness {
                    last: written_at,
                    broken: false,
                    trusted_for: timing.trusted_for,
                }));
                let serial = inner.held.next.fetch_add(1, Ordering::Relaxed);
                inner.held.enter(&names, serial, &fresh);
                let refresher = tokio::spawn(refresh(
                    inner.clone(),
                    keys.clone(),
                    fresh.clone(),
                    timing.refresh,
                ));
                let lease = Self {
                    inner: inner.clone(),
                    names,
                    keys,
                    fresh,
                    refresher,
                    released: false,
                    serial,
                    _block: None,
                };
                return Ok((lease, checked));
            }
            delete_all(inner, keys).await;
            attempt += 1;
            if started.elapsed() >= patience {
                return Err(RemoteError::new(
                    ErrorCode::Busy,
                    format!("'{path}' (or a name above or beneath it) is being written or renamed through another connection right now, on this server or another one sharing its store; try again shortly"),
                ));
            }
            // Two writers that saw each other both stepped back: random
            // delays, growing, let one of them through.
            let ms = 20 + rand_u64() % (60 * u64::from(attempt.min(8)));
            tokio::time::sleep(Duration::from_millis(ms)).await;
        }
    }

    /// Whether the leases are still sure to be this writer's alone.
    pub(super) fn is_trusted(&self) -> bool {
        trusted(&self.fresh)
    }

    /// Whether the leases are still sure to be this writer's alone: an
    /// error for `path` if they were not kept fresh, to refuse the write.
    pub(super) fn check(&self, path: &RemotePath) -> Result<(), RemoteError> {
        let fresh = *self.fresh.lock().unwrap_or_else(|e| e.into_inner());
        let last = fresh.last;
        if last.elapsed() < fresh.trusted_for && !fresh.broken {
            return Ok(());
        }
        Err(RemoteError::new(
            ErrorCode::Internal,
            format!("'{path}' was not saved: the server could not keep its hold on the name for {} s (the object store did not answer); try again", last.elapsed().as_secs()),
        ))
    }

    /// Gives the leases up: at once for this server, and for the others
    /// as soon as their objects are deleted, which goes on in the
    /// background (the writer's client need not wait a store round trip
    /// for it; a writer of the name meanwhile tries again a moment later).
    pub(super) fn release(mut self) {
        self.released = true;
        self.refresher.abort();
        self.inner.held.leave(&self.names, self.serial);
        let (inner, keys) = (self.inner.clone(), std::mem::take(&mut self.keys));
        self.inner
            .background
            .spawn(async move { delete_all(&inner, keys).await });
    }

    /// Gives the leases up and waits until their objects are deleted (or
    /// the store failed to delete them: they lapse by themselves).
    pub(super) async fn release_and_wait(mut self) {
        self.released = true;
        self.refresher.abort();
        self.inner.held.leave(&self.names, self.serial);
        let keys = std::mem::take(&mut self.keys);
        delete_all(&self.inner, keys).await;
    }
}

impl Drop for Leases {
    fn drop(&mut self) {
        self.refresher.abort();
        if !self.released {
            self.inner.held.leave(&self.names, self.serial);
        }
        if !self.released && !self.keys.is_empty() {
            let (inner, keys) = (self.inner.clone(), std::mem::take(&mut self.keys));
            // Dropped on an error path: deleted in the background (a lease
            // left behind only delays the next writer of the name).
            self.inner
                .background
                .spawn(async move { delete_all(&inner, keys).await });
        }
    }
}

/// The key of the lease `id` on the name `parts`.
fn lease_key(inner: &Inner, parts: &[String], id: &str) -> Key {
    let mut all: Vec<&str> = vec![LEASE_DIR];
    all.extend(parts.iter().map(String::as_str));
    all.push(LEAF);
    all.push(id);
    inner.key_of(&all)
}

/// The listings that show every lease related to one of `names`: each
/// name's own lease directory (its leases and those beneath it), and the
/// leases on each directory above it.
///
/// The leases on a directory this server holds a trusted lease beneath are
/// not looked for (see [`Held`]): in a tree upload, all but the first
/// files of a directory need one listing, not one per level.
fn related_listings(inner: &Inner, names: &[Vec<String>]) -> Vec<Key> {
    let mut keys = Vec::new();
    for name in names {
        let mut all: Vec<&str> = vec![LEASE_DIR];
        all.extend(name.iter().map(String::as_str));
        keys.push(inner.key_of(&all));
        for n in 1..name.len() {
            if inner.held.epoch(&name[..n].join("/")).is_some() {
                continue;
            }
            let mut above: Vec<&str> = vec![LEASE_DIR];
            above.extend(name[..n].iter().map(String::as_str));
            above.push(LEAF);
            keys.push(inner.key_of(&above));
        }
    }
    keys.sort_unstable_by(|a, b| a.as_ref().cmp(b.as_ref()));
    keys.dedup();
    keys
}

/// Every lease object the listings of `names` show.
async fn related_leases(
    inner: &Inner,
    names: &[Vec<String>],
) -> object_store::Result<Vec<object_store::ObjectMeta>> {
    let listings: Vec<Vec<object_store::ObjectMeta>> = stream::iter(related_listings(inner, names))
        .map(|key| async move {
            let _slot = inner.lease_slot().await;
            inner.s3.list(Some(&key)).try_collect::<Vec<_>>().await
        })
        .buffer_unordered(WRITES_AT_ONCE)
        .try_collect()
        .await?;
    Ok(listings.into_iter().flatten().collect())
}

/// The name a lease object is on (its key's parts between the lease
/// directory and the lease's id), if it is one.
fn leased_name(inner: &Inner, key: &Key) -> Option<Vec<String>> {
    let mut parts = inner.names_of(key);
    let n = parts.len();
    if n < 4 || parts[0] != LEASE_DIR || parts[n - 2] != LEAF {
        return None;
    }
    parts.truncate(n - 2);
    parts.remove(0);
    Some(parts)
}

/// Whether one of two names is the other or lies beneath it.
pub(super) fn related(a: &[String], b: &[String]) -> bool {
    a.starts_with(b) || b.starts_with(a)
}

async fn write_all(inner: &Inner, keys: &[Key]) -> object_store::Result<()> {
    stream::iter(keys.to_vec())
        .map(|key| async move {
            let _slot = inner.lease_slot().await;
            inner
                .s3
                .put(&key, PutPayload::from_static(b"qxfer lease"))
                .await
                .map(|_| ())
        })
        .buffer_unordered(WRITES_AT_ONCE)
        .try_collect::<Vec<()>>()
        .await
        .map(|_| ())
}

async fn delete_all(inner: &Inner, keys: Vec<Key>) {
    let deleted: object_store::Result<Vec<()>> = stream::iter(keys)
        .map(|key| async move {
            let _slot = inner.lease_slot().await;
            match inner.s3.delete(&key).await {
                Err(e) if !is_not_found(&e) => Err(e),
                _ => Ok(()),
            }
        })
        .buffer_unordered(WRITES_AT_ONCE)
        .try_collect()
        .await;
    if let Err(e) = deleted {
        warn!("cannot delete a lease: {e}; it lapses by itself within {TTL:?}");
    }
}

/// Whether a fresh lease other than those with the id `id` is held on a
/// name related to one of `names`. Freshness is judged by the store's
/// clock: against the time this writer's own lease was written.
async fn others(
    inner: &Inner,
    names: &[Vec<String>],
    id: &str,
    skip: &HashSet<String>,
) -> object_store::Result<bool> {
    let seen = related_leases(inner, names).await?;
    let ours = seen
        .iter()
        .filter(|o| o.location.filename() == Some(id))
        .map(|o| SystemTime::from(o.last_modified))
        .max();
    let Some(now) = ours else {
        // Our own lease does not show: the store's listing is behind its
        // writes, and nothing can be concluded from it.
        return Err(object_store::Error::Generic {
            store: "qxfer",
            source: "a lease just written does not show in the store's listing".into(),
        });
    };
    Ok(seen.iter().any(|o| {
        let ttl = ttl_of(o.location.filename().unwrap_or_default());
        let fresh = now
            .duration_since(SystemTime::from(o.last_modified))
            .map_or(true, |age| age < ttl);
        o.location.filename() != Some(id)
            && !o.location.filename().is_some_and(|f| skip.contains(f))
            && fresh
            && leased_name(inner, &o.location)
                .is_some_and(|theirs| names.iter().any(|n| related(n, &theirs)))
    }))
}

/// When a holder's leases were last written.
#[derive(Debug, Clone, Copy)]
struct Freshness {
    /// When the last rewrite that succeeded began.
    last: Instant,
    /// A rewrite came [`TRUSTED_FOR`] or more after the one before: others
    /// may have taken the leases for dead meanwhile and written the name,
    /// so the holder must never write under them, however fresh they are
    /// again.
    broken: bool,
    /// How long after a rewrite the holder still writes under it.
    trusted_for: Duration,
}

/// Rewrites the leases every [`REFRESH`] while their holder lives (sooner
/// after a failure). The rewrites take no slot: they are what keeps the
/// leases of uploads queued for slots valid, and they are bounded by the
/// leases held, one each.
async fn refresh(inner: Arc<Inner>, keys: Vec<Key>, fresh: Arc<Mutex<Freshness>>, every: Duration) {
    let mut wait = every;
    loop {
        tokio::time::sleep(wait).await;
        let at = Instant::now();
        let written = stream::iter(keys.clone())
            .map(|key| {
                let inner = &inner;
                async move {
                    inner
                        .s3
                        .put(&key, PutPayload::from_static(b"qxfer lease"))
                        .await
                        .map(|_| ())
                }
            })
            .buffer_unordered(WRITES_AT_ONCE)
            .try_collect::<Vec<()>>()
            .await;
        tracing::debug!(took = ?at.elapsed(), ok = written.is_ok(), "lease rewritten");
        let mut f = fresh.lock().unwrap_or_else(|e| e.into_inner());
        if f.last.elapsed() >= f.trusted_for {
            f.broken = true;
        }
        match written {
            Ok(_) => {
                f.last = at;
                wait = every;
            }
            Err(e) => {
                warn!("cannot refresh a lease: {e}");
                wait = Duration::from_secs(1);
            }
        }
    }
}

/// Whether a name related to `parts` has a fresh lease (someone is
/// writing or renaming it): the sweep leaves the uploads of such a name alone.
pub(super) async fn is_leased(inner: &Inner, parts: &[String]) -> object_store::Result<bool> {
    if parts.is_empty() {
        return Ok(false);
    }
    let names = [parts.to_vec()];
    let listing = related_leases(inner, &names).await?;
    let now = SystemTime::now();
    Ok(listing.iter().any(|o| {
        now.duration_since(SystemTime::from(o.last_modified))
            .map_or(true, |age| {
                age < ttl_of(o.location.filename().unwrap_or_default())
            })
            && leased_name(inner, &o.location).is_some_and(|theirs| related(parts, &theirs))
    }))
}

/// The names this server holds leases beneath, and since when: what it
/// learned of a directory while it has held a trusted lease beneath it all
/// along stays true, since no other writer could take a lease on that
/// directory's name meanwhile (it would see ours beneath and withdraw):
/// nobody can have made a file of that name, and a new lease beneath it
/// need not look for leases on it ([`others`]).
#[derive(Debug, Default)]
pub(super) struct Held {
    /// Per directory (names joined with `/`): the epoch that began when
    /// the directory last went from no trusted lease beneath it to one,
    /// and the leases beneath it (by serial).
    dirs: Mutex<HashMap<String, (u64, Vec<HeldLease>)>>,
    next: AtomicU64,
}

impl Held {
    /// Counts the lease `serial` on `names` beneath each of their
    /// directories.
    fn enter(&self, names: &[Vec<String>], serial: u64, fresh: &Arc<Mutex<Freshness>>) {
        let mut dirs = self.dirs.lock().unwrap_or_else(|e| e.into_inner());
        for name in names {
            for n in 1..name.len() {
                let entry = dirs.entry(name[..n].join("/")).or_default();
                if !entry.1.iter().any(|(_, f)| trusted(f)) {
                    entry.0 = self.next.fetch_add(1, Ordering::Relaxed) + 1;
                }
                entry.1.push((serial, fresh.clone()));
            }
        }
    }

    /// Uncounts the lease `serial` on `names`.
    fn leave(&self, names: &[Vec<String>], serial: u64) {
        let mut dirs = self.dirs.lock().unwrap_or_else(|e| e.into_inner());
        for name in names {
            for n in 1..name.len() {
                let dir = name[..n].join("/");
                if let Some(entry) = dirs.get_mut(&dir) {
                    entry.1.retain(|(s, _)| *s != serial);
                    if entry.1.is_empty() {
                        dirs.remove(&dir);
                    }
                }
            }
        }
    }

    /// The epoch of the trusted leases this server holds beneath `dir`
    /// without a break, if it holds one now.
    pub(super) fn epoch(&self, dir: &str) -> Option<u64> {
        let dirs = self.dirs.lock().unwrap_or_else(|e| e.into_inner());
        let (epoch, leases) = dirs.get(dir)?;
        leases.iter().any(|(_, f)| trusted(f)).then_some(*epoch)
    }
}

/// One lease in [`Held`]: its serial and its freshness.
type HeldLease = (u64, Arc<Mutex<Freshness>>);

/// Whether a lease has been kept fresh all along, and still is: once not,
/// never again (see [`Freshness::broken`]).
fn trusted(fresh: &Mutex<Freshness>) -> bool {
    let f = *fresh.lock().unwrap_or_else(|e| e.into_inner());
    !f.broken && f.last.elapsed() < f.trusted_for
}

/// Deletes leases left by servers that died, long past their time.
pub(super) async fn sweep(inner: &Inner) -> object_store::Result<usize> {
    let dir = inner.key_of(&[LEASE_DIR]);
    let now = SystemTime::now();
    let stale: Vec<Key> = {
        let _slot = inner.slot().await;
        inner
            .s3
            .list(Some(&dir))
            .try_filter_map(|o| async move {
                let old = now
                    .duration_since(SystemTime::from(o.last_modified))
                    .is_ok_and(|age| age > 10 * TTL);
                Ok(old.then_some(o.location))
            })
            .try_collect()
            .await?
    };
    let n = stale.len();
    match inner.delete_all(stale).await {
        Err(e) if !is_not_found(&e) => Err(e),
        _ => Ok(n),
    }
}

/// Deletes the leases a server of `holder`'s tag left when it died (this
/// server, before a crash and restart: see the module's notes), and makes
/// `holder` the tag of this server's leases from now on.
pub(super) async fn adopt(inner: &Inner, holder: &str) -> object_store::Result<usize> {
    inner.set_holder(holder);
    let dir = inner.key_of(&[LEASE_DIR]);
    let tag = format!("{holder}-");
    let left: Vec<Key> = {
        let _slot = inner.slot().await;
        inner
            .s3
            .list(Some(&dir))
            .try_filter_map(|o| {
                let ours = o.location.filename().is_some_and(|f| f.starts_with(&tag));
                async move { Ok(ours.then_some(o.location)) }
            })
            .try_collect()
            .await?
    };
    let n = left.len();
    match inner.delete_all(left).await {
        Err(e) if !is_not_found(&e) => Err(e),
        _ => Ok(n),
    }
}

/// A holder tag for a server listening at `listening` and serving `root`
/// (see the module's notes): 16 hex digits.
pub(crate) fn holder_tag(listening: &str, root: &str) -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
    let netns = std::fs::read_link("/proc/self/ns/net")
        .map(|p| p.display().to_string())
        .unwrap_or_default();
    let mut h = blake3::Hasher::new();
    for part in [host.trim(), &netns, listening, root] {
        h.update(&(part.len() as u64).to_le_bytes());
        h.update(part.as_bytes());
    }
    h.finalize().to_hex()[..16].to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_directory_lease_says_so_in_its_id_and_lapses_sooner() {
        let root = super::super::ObjectRoot::in_memory();
        let inner = &root.inner;
        let path = RemotePath::parse("d/f", false).unwrap();
        let none = HashSet::new();
        let (dir, ()) = Leases::take_dir(inner, vec!["d".to_owned()], &path, || async {}, &none)
            .await
            .unwrap();
        let (name, ()) = Leases::take_checking(
            inner,
            vec![vec!["e".to_owned(), "f".to_owned()]],
            &path,
            || async {},
        )
        .await
        .unwrap();
        assert!(dir.id().contains(DIR_ID), "{}", dir.id());
        assert!(!name.id().contains(DIR_ID), "{}", name.id());
        assert_eq!(ttl_of(dir.id()), Duration::from_secs(24));
        assert_eq!(ttl_of(name.id()), TTL);
        // The holder stops trusting either well before others may take it
        // for dead.
        for t in [NAME_TIMING, DIR_TIMING] {
            assert!(
                t.refresh * 3 < t.trusted_for && t.trusted_for + Duration::from_secs(8) <= t.ttl
            );
        }
        assert!(dir.is_trusted() && name.is_trusted());
        dir.release_and_wait().await;
        name.release();
    }
}

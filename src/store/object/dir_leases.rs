//! Directory leases for small files: one lease on a directory and one listing of it, shared by every small upload into it on this server, instead of a lease written, listed and deleted and two lookups per file.
//!
//! A small file (one PUT) under its own lease cost the store three writes
//! (the lease, the object, the lease's delete) and four reads (the
//! leases' listing, a HEAD, a LIST of the name: is it a directory?), and
//! on Garage a LIST costs about as much CPU as a 4 KiB PUT (BENCHMARKS.md,
//! "Leases, before and after"): a tree of small files moved at a fifth of
//! the rate of its plain PUTs. Under a lease on its directory, a name the
//! directory's listing did not hold costs its PUT alone; a name it held
//! costs a HEAD besides (is it the same file? may it be replaced?), and a
//! name it showed as a directory, a LIST besides (is it still one?).
//!
//! Why that is as safe (see leases.rs for the protocol): a lease on the
//! directory `D` is related to every name beneath `D`, so while this
//! server holds it no other server writes or renames by lease anything
//! beneath `D` or above it: a name absent from `D`'s listing, taken under
//! the lease, stays absent unless this server writes it, and nothing can
//! make `D` or a directory above it a file (checked once, with the
//! listing). Within this server: uploads of one name are kept apart here,
//! a file upload into `D` and a directory lease on the same name beneath
//! `D` exclude each other, names this server writes or makes directories
//! of are noted ([`DirLeases::changed`]), and every name-by-name lease it
//! takes first makes the directory leases related to it step aside
//! ([`Block`]). What is not covered is what is not covered today either:
//! `mkdir` on another server takes no lease, so a directory it makes in
//! `D` while this server holds `D`'s lease can meet a file of the same
//! name (the window is the lease's life, at most [`MAX_HOLD`], where it
//! was one file's checks), and removals take none (a name removed
//! meanwhile is looked up, not trusted).
//!
//! A directory lease is taken on the first small upload into its
//! directory, in one attempt: if another server's lease is in the way
//! (its uploads there, a rename) the uploads go name by name as before,
//! and the directory is tried again after [`COOL_DOWN`]. It is given up
//! [`LINGER`] after its last upload ended, and after [`MAX_HOLD`] it takes
//! no new uploads until it is given up, so that other servers' writers
//! of the directory, retrying, get their turn (and the next lease lists
//! the directory afresh).

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use object_store::ObjectStore;
use tokio::sync::{watch, OnceCell};

use crate::paths::{RemotePath, RESERVED_PREFIX};
use crate::protocol::{ErrorCode, RemoteError};

use super::index;
use super::leases::{related, Leases};
use super::{decoded, Inner};
use crate::protocol::Timestamp;

/// How long an idle directory lease is kept for the next upload.
const LINGER: Duration = Duration::from_millis(250);

/// The longest a directory lease takes new uploads.
const MAX_HOLD: Duration = Duration::from_secs(5);

/// How long after a directory lease could not be had its files go name by name.
const COOL_DOWN: Duration = Duration::from_secs(2);

/// How long an upload waits for a retired lease of its directory to be given up.
const HANDOVER_TIMEOUT: Duration = Duration::from_secs(10);

/// The most names a directory lease keeps from its listing; past them
/// every name is looked up.
const MAX_LISTED: usize = 200_000;

/// This server's directory leases, and the names it leases one by one now.
#[derive(Debug, Default)]
pub(super) struct DirLeases {
    state: Arc<Mutex<State>>,
}

#[derive(Debug, Default)]
struct State {
    /// By directory (names joined with `/`).
    dirs: HashMap<String, Weak<DirLease>>,
    /// Names this server leases (or is about to) one by one, counted.
    blocked: HashMap<Vec<String>, usize>,
    /// Directories whose lease is being given up (its objects deleted):
    /// the next lease on one is taken after that.
    departing: HashMap<String, watch::Receiver<bool>>,
    /// The ids of the directory leases held now.
    ids: HashSet<String>,
}

/// One directory's lease and the uploads under it.
#[derive(Debug)]
pub(super) struct DirLease {
    dir: Vec<String>,
    taken: OnceCell<Taken>,
    /// When the lease was first tried.
    since: Instant,
    /// Takes no new uploads (held too long, or something else needs the names).
    retired: std::sync::atomic::AtomicBool,
    /// The names being uploaded under it now.
    writing: Mutex<HashSet<String>>,
    /// What the directory holds, from its listing under the lease and
    /// what was written or changed since.
    listing: Mutex<Listing>,
    /// True once the lease is given up and its objects deleted.
    gone: watch::Sender<bool>,
    state: Arc<Mutex<State>>,
    key: String,
    /// The files written under it, for the directory's listing index.
    wrote: Mutex<Vec<index::Wrote>>,
    inner: Arc<Inner>,
}

/// A directory's names as its lease knows them.
#[derive(Debug, Default)]
struct Listing {
    /// Its files and directories as listed under the lease (`None` until
    /// then, or if there were too many).
    listed: Option<(HashSet<String>, HashSet<String>)>,
    /// Changed by this server outside the lease, or made directories by a
    /// lease beneath: looked up.
    changed: HashSet<String>,
}

/// What a directory lease knows of a name in its directory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Known {
    /// Not there: nothing to look up.
    Absent,
    /// A file: its HEAD says which.
    File,
    /// A directory, or not known: a HEAD and a LIST say.
    Unsure,
}

/// What [`DirLeases::step`] decided.
enum Step {
    Go(Arc<DirLease>),
    Done(Result<Option<Ticket>, RemoteError>),
    Wait(watch::Receiver<bool>),
}

/// What taking the lease came to.
#[derive(Debug)]
enum Taken {
    /// Held: uploads into the directory may use it.
    Held(Mutex<Option<Leases>>),
    /// Something was in the way, or the directory or a name above it is
    /// a file: its uploads go name by name.
    Not,
}

/// An upload's place under a directory lease: its name is its own until
/// dropped.
#[derive(Debug)]
pub(super) struct Ticket {
    lease: Arc<DirLease>,
    leaf: String,
}

/// Keeps this server's directory leases off some names while it holds (or
/// is taking) leases on them one by one.
#[derive(Debug)]
pub(super) struct Block {
    names: Vec<Vec<String>>,
    state: Arc<Mutex<State>>,
}

impl DirLeases {
    /// Keeps directory leases off `names` until the guard is dropped: those
    /// related to one of them take no new uploads (they are given up once
    /// their uploads end), and no new one is taken meanwhile.
    pub(super) fn block(&self, names: &[Vec<String>]) -> Block {
        // Dropped after the lock (a lease's last drop takes it).
        let mut seen: Vec<Arc<DirLease>> = Vec::new();
        let mut state = lock(&self.state);
        for name in names {
            *state.blocked.entry(name.clone()).or_default() += 1;
        }
        seen.extend(state.dirs.values().filter_map(Weak::upgrade));
        drop(state);
        for lease in &seen {
            if names.iter().any(|n| related(n, &lease.dir)) {
                lease.retire();
            }
        }
        Block {
            names: names.to_vec(),
            state: self.state.clone(),
        }
    }

    /// Notes that this server changed `path` outside the directory leases
    /// (made a directory of it, removed or renamed it): the lease of its
    /// directory looks it up from now on.
    pub(super) fn changed(&self, path: &RemotePath) {
        let Some((leaf, dir)) = path.components().split_last() else {
            return;
        };
        let lease = lock(&self.state)
            .dirs
            .get(&dir.join("/"))
            .and_then(Weak::upgrade);
        if let Some(lease) = lease {
            lock(&lease.listing).changed.insert(leaf.clone());
        }
    }

    /// Notes that the directory `dir`'s marker was just written (with
    /// `etag`, `mtime` and `mode`): if this server holds the directory's
    /// lease, the marker goes into the directory's index with its files
    /// (`put -r` sets a directory's mode and mtime right after its files).
    pub(super) fn marker_written(
        &self,
        dir: &RemotePath,
        etag: Option<String>,
        mtime: Option<Timestamp>,
        mode: Option<u32>,
    ) {
        let Some(etag) = etag else {
            return;
        };
        let lease = lock(&self.state)
            .dirs
            .get(&dir.components().join("/"))
            .and_then(Weak::upgrade);
        if let Some(lease) = lease.filter(|l| matches!(l.taken.get(), Some(Taken::Held(_)))) {
            lock(&lease.wrote).push(index::Wrote {
                leaf: super::DIR_MARKER.to_owned(),
                etag,
                size: 0,
                mtime,
                mode,
            });
        }
    }

    /// A place for the upload of `path` (a name beneath a directory other
    /// than the root) under its directory's lease, taking the lease if
    /// this server does not hold it; `None` if the upload is to go name by
    /// name. An error if the name is being uploaded through this lease
    /// already, or something beneath it is being uploaded.
    pub(super) async fn join(
        &self,
        inner: &Arc<Inner>,
        path: &RemotePath,
    ) -> Result<Option<Ticket>, RemoteError> {
        let Some((leaf, dir)) = path.components().split_last() else {
            return Ok(None);
        };
        if dir.is_empty() {
            return Ok(None);
        }
        let key = dir.join("/");
        let started = Instant::now();
        let mut late = false;
        let lease = loop {
            let wait = match self.step(inner, dir, leaf, &key, path, late) {
                Step::Go(lease) => break lease,
                Step::Done(result) => return result,
                Step::Wait(gone) => gone,
            };
            // The directory's last lease is being given up: the next is
            // taken once it is gone.
            let mut gone = wait;
            let left = HANDOVER_TIMEOUT.saturating_sub(started.elapsed());
            if tokio::time::timeout(left, gone.wait_for(|gone| *gone))
                .await
                .is_err()
            {
                if late {
                    return Ok(None);
                }
                // Its uploads are slow (a slow client's, say): this one
                // joins them rather than wait longer (name by name, it
                // would wait for this very lease).
                late = true;
            }
        };
        // From here the ticket owns the name: dropped, it gives it back.
        let ticket = Ticket {
            lease,
            leaf: leaf.clone(),
        };
        let taken = ticket
            .lease
            .taken
            .get_or_init(|| self.take(inner, &ticket.lease, path))
            .await;
        if matches!(taken, Taken::Not) {
            keep_for(ticket.lease.clone(), COOL_DOWN);
            return Ok(None);
        }
        Ok(Some(ticket))
    }

    /// [`DirLeases::join`]'s decision, made under the lock: the lease to
    /// join (the name reserved in it), the answer, or a lease to wait for.
    /// `late`: the wait for a retired lease ran out, and its uploads are
    /// joined instead (unless something on this server needs the names).
    fn step(
        &self,
        inner: &Arc<Inner>,
        dir: &[String],
        leaf: &str,
        key: &str,
        path: &RemotePath,
        late: bool,
    ) -> Step {
        // Dropped after the lock (a lease's last drop takes it).
        let mut near: Vec<Arc<DirLease>> = Vec::new();
        let found: Option<Arc<DirLease>>;
        let mut state = lock(&self.state);
        if state.blocked.keys().any(|n| related(n, dir)) {
            return Step::Done(Ok(None));
        }
        // Uploads beneath this name (a directory lease on it or below)
        // and an upload of this name as a file exclude each other.
        let mut name = dir.to_vec();
        name.push(leaf.to_owned());
        near.extend(state.dirs.values().filter_map(Weak::upgrade));
        if near
            .iter()
            .any(|l| l.dir.starts_with(&name) && !lock(&l.writing).is_empty())
        {
            return Step::Done(Err(busy_beneath(path)));
        }
        if near.iter().any(|l| {
            dir.starts_with(&l.dir) && l.dir.len() < dir.len() && l.is_writing(&dir[l.dir.len()])
        }) {
            // A file of a name above is being uploaded now.
            return Step::Done(Ok(None));
        }
        found = state.dirs.get(key).and_then(Weak::upgrade);
        // Borrowed: `found` goes after the lock.
        let Some(lease) = found.as_ref() else {
            if let Some(gone) = state.departing.get(key) {
                return Step::Wait(gone.clone());
            }
            let lease = Arc::new(DirLease {
                dir: dir.to_vec(),
                taken: OnceCell::new(),
                since: Instant::now(),
                retired: false.into(),
                writing: Mutex::default(),
                listing: Mutex::default(),
                gone: watch::Sender::new(false),
                state: self.state.clone(),
                key: key.to_owned(),
                wrote: Mutex::default(),
                inner: inner.clone(),
            });
            state.dirs.insert(key.to_owned(), Arc::downgrade(&lease));
            // The directories above learn that this one is one.
            for above in &near {
                if dir.starts_with(&above.dir) && above.dir.len() < dir.len() {
                    lock(&above.listing)
                        .changed
                        .insert(dir[above.dir.len()].clone());
                }
            }
            // The name is this upload's from now (reserved under the lock,
            // where the checks above were made).
            lock(&lease.writing).insert(leaf.to_owned());
            return Step::Go(lease);
        };
        if matches!(lease.taken.get(), Some(Taken::Not)) {
            // Not to be had lately: name by name for a while.
            return Step::Done(Ok(None));
        }
        if late || (!lease.is_retired() && lease.since.elapsed() < MAX_HOLD) {
            if !lock(&lease.writing).insert(leaf.to_owned()) {
                return Step::Done(Err(RemoteError::new(
                    ErrorCode::Busy,
                    format!("'{path}' is being uploaded through another connection right now; try again shortly"),
                )));
            }
            return Step::Go(lease.clone());
        }
        // Given up, or about to be: waited for.
        lease.retire();
        Step::Wait(lease.gone.subscribe())
    }

    /// Takes the lease on `lease`'s directory and lists the directory,
    /// checking that neither it nor a name above it is a file (which,
    /// under the lease, stays so).
    async fn take(&self, inner: &Arc<Inner>, lease: &DirLease, path: &RemotePath) -> Taken {
        let ours = lock(&self.state).ids.clone();
        let check = || async {
            futures::try_join!(
                inner.file_on_the_way(path),
                list_children(inner, &lease.dir)
            )
        };
        match Leases::take_dir(inner, lease.dir.clone(), path, check, &ours).await {
            Ok((held, Ok((false, listing)))) => {
                lock(&self.state).ids.insert(held.id().to_owned());
                lock(&lease.listing).listed = listing;
                Taken::Held(Mutex::new(Some(held)))
            }
            Ok((held, _)) => {
                // A file above, or the check failed: the name-by-name way says why.
                held.release();
                Taken::Not
            }
            Err(_) => Taken::Not,
        }
    }
}

/// What `dir` holds, by one listing (many requests for a large one);
/// `None` past [`MAX_LISTED`] names.
async fn list_children(
    inner: &Inner,
    dir: &[String],
) -> object_store::Result<Option<(HashSet<String>, HashSet<String>)>> {
    let parts: Vec<&str> = dir.iter().map(String::as_str).collect();
    let key = inner.key_of(&parts);
    let _slot = inner.slot().await;
    let listed = inner.s3.list_with_delimiter(Some(&key)).await?;
    if listed.objects.len() + listed.common_prefixes.len() > MAX_LISTED {
        return Ok(None);
    }
    let name = |k: &object_store::path::Path| k.filename().map(decoded);
    let files = listed
        .objects
        .iter()
        .filter_map(|o| name(&o.location))
        .filter(|n| !n.starts_with(RESERVED_PREFIX))
        .collect();
    let dirs = listed.common_prefixes.iter().filter_map(name).collect();
    Ok(Some((files, dirs)))
}

fn busy_beneath(path: &RemotePath) -> RemoteError {
    RemoteError::new(
        ErrorCode::Busy,
        format!("files beneath '{path}' are being uploaded right now; try again shortly"),
    )
}

impl DirLease {
    fn retire(&self) {
        self.retired
            .store(true, std::sync::atomic::Ordering::Relaxed);
    }

    fn is_retired(&self) -> bool {
        self.retired.load(std::sync::atomic::Ordering::Relaxed)
    }

    fn is_writing(&self, leaf: &str) -> bool {
        lock(&self.writing).contains(leaf)
    }
}

impl Ticket {
    /// Whether the lease is still sure to be this server's alone (see
    /// [`Leases::check`]): an error for `path` if not.
    pub(super) fn check(&self, path: &RemotePath) -> Result<(), RemoteError> {
        match self.lease.taken.get() {
            Some(Taken::Held(held)) => match &*lock(held) {
                Some(lease) => lease.check(path),
                None => Err(lost(path)),
            },
            _ => Err(lost(path)),
        }
    }

    /// What the directory's lease knows of this upload's name.
    pub(super) fn known(&self) -> Known {
        // A directory lease of this server on the name or beneath it: the
        // name may have become a directory since the listing.
        let mut name = self.lease.dir.clone();
        name.push(self.leaf.clone());
        let beneath: Vec<Arc<DirLease>> = lock(&self.lease.state)
            .dirs
            .values()
            .filter_map(Weak::upgrade)
            .collect();
        if beneath.iter().any(|l| l.dir.starts_with(&name)) {
            return Known::Unsure;
        }
        drop(beneath);
        let listing = lock(&self.lease.listing);
        match &listing.listed {
            _ if listing.changed.contains(&self.leaf) => Known::Unsure,
            Some((_, dirs)) if dirs.contains(&self.leaf) => Known::Unsure,
            Some((files, _)) if files.contains(&self.leaf) => Known::File,
            Some(_) => Known::Absent,
            None => Known::Unsure,
        }
    }

    /// Notes that the name is a file now, written with `etag`, `size`,
    /// `mtime` and `mode` (for the directory's index).
    pub(super) fn wrote(
        &self,
        etag: Option<String>,
        size: u64,
        mtime: Option<Timestamp>,
        mode: Option<u32>,
    ) {
        if let Some(etag) = etag {
            lock(&self.lease.wrote).push(index::Wrote {
                leaf: self.leaf.clone(),
                etag,
                size,
                mtime,
                mode,
            });
        }
        let mut listing = lock(&self.lease.listing);
        listing.changed.remove(&self.leaf);
        if let Some((files, dirs)) = &mut listing.listed {
            dirs.remove(&self.leaf);
            files.insert(self.leaf.clone());
        }
    }
}

fn lost(path: &RemotePath) -> RemoteError {
    RemoteError::new(
        ErrorCode::Internal,
        format!("'{path}': the upload no longer holds its directory; try again"),
    )
}

impl Drop for Ticket {
    fn drop(&mut self) {
        lock(&self.lease.writing).remove(&self.leaf);
        // The last upload keeps the lease a moment for the next one.
        keep_for(self.lease.clone(), LINGER);
    }
}

/// Keeps `lease` alive for `how_long` (a directory lease lasts as long as
/// an upload or one of these holds it).
fn keep_for(lease: Arc<DirLease>, how_long: Duration) {
    if lease.is_retired() {
        return;
    }
    let inner = lease.inner.clone();
    inner.background.spawn(async move {
        tokio::time::sleep(how_long).await;
        drop(lease);
    });
}

impl Drop for DirLease {
    fn drop(&mut self) {
        let lease = match self.taken.take() {
            Some(Taken::Held(held)) => held.into_inner().unwrap_or_else(|e| e.into_inner()),
            _ => None,
        };
        let runtime = tokio::runtime::Handle::try_current();
        {
            let mut state = lock(&self.state);
            if state
                .dirs
                .get(&self.key)
                .is_some_and(|w| w.strong_count() == 0)
            {
                state.dirs.remove(&self.key);
            }
            if let Some(lease) = &lease {
                state.ids.remove(lease.id());
                if runtime.is_ok() {
                    state
                        .departing
                        .insert(self.key.clone(), self.gone.subscribe());
                }
            }
        }
        let gone = self.gone.clone();
        match (lease, runtime) {
            (Some(lease), Ok(_)) => {
                let (state, key) = (self.state.clone(), self.key.clone());
                let wrote = std::mem::take(&mut *lock(&self.wrote));
                let (inner, dir) = (self.inner.clone(), self.dir.clone());
                self.inner.background.spawn(async move {
                    // Still under the lease: what it wrote goes into the
                    // directory's index (a listing would look it up otherwise).
                    if lease.is_trusted() {
                        if let Err(e) = index::record(&inner, &dir, wrote).await {
                            tracing::warn!("cannot index what was uploaded into '{key}': {e}");
                        }
                    }
                    lease.release_and_wait().await;
                    let mut state = lock(&state);
                    if state
                        .departing
                        .get(&key)
                        .is_some_and(|r| r.same_channel(&gone.subscribe()))
                    {
                        state.departing.remove(&key);
                    }
                    drop(state);
                    gone.send_replace(true);
                });
            }
            (lease, _) => {
                drop(lease);
                gone.send_replace(true);
            }
        }
    }
}

impl Drop for Block {
    fn drop(&mut self) {
        let mut state = lock(&self.state);
        for name in &self.names {
            if let Some(n) = state.blocked.get_mut(name) {
                *n -= 1;
                if *n == 0 {
                    state.blocked.remove(name);
                }
            }
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}
#[cfg(test)]
mod tests {
    use std::io::Write;
    use std::sync::atomic::Ordering;

    use super::super::counted::Counted;
    use super::super::ObjectRoot;
    use super::*;
    use crate::files::{TransferError, Whole};
    use crate::protocol::{Digest, FileMeta};
    use crate::store::{Prepared, PutPlan, Store, Upload};
    use crate::tls::Fingerprint;

    struct Data(Vec<u8>);

    impl Whole for Data {
        fn write_to(self: Box<Self>, out: &mut dyn Write) -> Result<Digest, TransferError> {
            out.write_all(&self.0).map_err(TransferError::Write)?;
            Ok(*blake3::hash(&self.0).as_bytes())
        }
    }

    fn path(s: &str) -> RemotePath {
        RemotePath::parse(s, false).unwrap()
    }

    fn plan(name: &str, size: u64, force: bool) -> PutPlan {
        PutPlan {
            path: path(name),
            meta: FileMeta {
                size,
                mtime: None,
                mode: None,
            },
            force,
            partial: None,
            resume: false,
            stream: false,
            client: Fingerprint::of(&rustls::pki_types::CertificateDer::from(vec![1])),
        }
    }

    /// An upload of `name` prepared (holding its name), or why not.
    async fn prepare(
        root: &ObjectRoot,
        name: &str,
        force: bool,
    ) -> Result<Box<dyn Upload>, RemoteError> {
        match root.prepare_put(plan(name, 5, force)).await? {
            Prepared::Receive { upload, .. } => Ok(upload),
            _ => panic!("'{name}': not an upload"),
        }
    }

    async fn refused(root: &ObjectRoot, name: &str) -> RemoteError {
        match prepare(root, name, false).await {
            Ok(_) => panic!("'{name}' was taken"),
            Err(e) => e,
        }
    }

    async fn commit(upload: Box<dyn Upload>, data: &[u8]) -> Result<Digest, RemoteError> {
        let meta = FileMeta {
            size: data.len() as u64,
            mtime: None,
            mode: None,
        };
        let digest = *blake3::hash(data).as_bytes();
        upload
            .commit_whole(Box::new(Data(data.to_vec())), digest, meta, false)
            .await
    }

    fn two_servers() -> (Arc<Counted>, ObjectRoot, ObjectRoot) {
        let store = Arc::new(Counted::default());
        let a = ObjectRoot::over(store.clone(), vec!["r".to_owned()], 1 << 30);
        let b = ObjectRoot::over(store.clone(), vec!["r".to_owned()], 1 << 30);
        (store, a, b)
    }

    #[tokio::test]
    async fn small_files_in_one_directory_share_one_lease() {
        let (store, a, _) = two_servers();
        let mut uploads = Vec::new();
        for i in 0..40 {
            uploads.push(prepare(&a, &format!("d/f{i}"), false).await.unwrap());
        }
        for u in uploads {
            commit(u, b"hello").await.unwrap();
        }
        assert_eq!(
            store.lease_puts.load(Ordering::Relaxed),
            1,
            "one lease for 40 files"
        );
        let listed = a.list(&path("d"), false).await.unwrap();
        assert_eq!(listed.len(), 40);
        // Under the directory's lease, a name is still checked: taken
        // without --force, a directory, or being uploaded right now.
        let e = refused(&a, "d/f3").await;
        assert_eq!(e.code, ErrorCode::AlreadyExists, "{}", e.message);
        commit(prepare(&a, "d/sub/x", false).await.unwrap(), b"x")
            .await
            .unwrap();
        let e = refused(&a, "d/sub").await;
        assert_eq!(e.code, ErrorCode::IsDirectory, "{}", e.message);
        let first = prepare(&a, "d/new", false).await.unwrap();
        let e = refused(&a, "d/new").await;
        assert_eq!(e.code, ErrorCode::Busy, "{}", e.message);
        commit(first, b"first").await.unwrap();
        // A file where the directory would be: refused as without the lease.
        commit(prepare(&a, "plain", false).await.unwrap(), b"f")
            .await
            .unwrap();
        let e = refused(&a, "plain/x").await;
        assert_eq!(e.code, ErrorCode::NotDirectory, "{}", e.message);
    }

    #[tokio::test]
    async fn what_a_directory_lease_wrote_lists_without_a_lookup() {
        let (store, a, _) = two_servers();
        for i in 0..5 {
            commit(prepare(&a, &format!("d/f{i}"), false).await.unwrap(), b"x")
                .await
                .unwrap();
        }
        // put -r sets a directory's mode right after its files.
        let meta = crate::protocol::DirMeta {
            mode: Some(0o711),
            mtime: None,
        };
        a.mkdir(&path("d"), Some(meta)).await.unwrap();
        // Given up 250 ms after its last upload, the lease stores the index.
        let index = index::index_dir(&a.inner, &["d".to_owned()]);
        let started = Instant::now();
        while a.inner.keys_under(&index).await.unwrap().is_empty() {
            assert!(started.elapsed() < Duration::from_secs(5), "no index");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let heads = store.heads.load(Ordering::Relaxed);
        let listed = a
            .list(&RemotePath::parse("", true).unwrap(), true)
            .await
            .unwrap();
        assert_eq!(
            store.heads.load(Ordering::Relaxed),
            heads,
            "no lookup: {listed:?}"
        );
        assert_eq!(listed.len(), 6);
        let d = listed.iter().find(|e| e.name == "d").unwrap();
        assert_eq!(d.mode, Some(0o711));
    }

    #[tokio::test]
    async fn another_server_waits_for_a_held_directory_and_gets_it_once_given_up() {
        let (_store, a, b) = two_servers();
        let held = prepare(&a, "d/x", false).await.unwrap();
        // B's upload of another name in the directory, name by name: the
        // directory's lease is in the way until A gives it up.
        let b_put = tokio::spawn(async move {
            let u = prepare(&b, "d/y", false).await?;
            commit(u, b"from b").await
        });
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert!(
            !b_put.is_finished(),
            "B went ahead under A's directory lease"
        );
        commit(held, b"from a").await.unwrap();
        b_put.await.unwrap().unwrap();
        let names: Vec<String> = a
            .list(&path("d"), false)
            .await
            .unwrap()
            .into_iter()
            .map(|e| e.name)
            .collect();
        assert_eq!(names, ["x", "y"]);
    }

    #[tokio::test]
    async fn a_directory_another_server_writes_in_goes_name_by_name() {
        let (store, a, b) = two_servers();
        // B holds a lease beneath the directory (a large upload, say).
        let (b_lease, ()) = Leases::take_checking(
            &b.inner,
            vec![vec!["d".to_owned(), "big".to_owned()]],
            &path("d/big"),
            || async {},
        )
        .await
        .unwrap();
        let before = store.lease_puts.load(Ordering::Relaxed);
        for i in 0..3 {
            commit(prepare(&a, &format!("d/f{i}"), false).await.unwrap(), b"a")
                .await
                .unwrap();
        }
        // One try at the directory, then a lease per name.
        assert_eq!(store.lease_puts.load(Ordering::Relaxed) - before, 1 + 3);
        b_lease.release();
    }

    #[tokio::test]
    async fn a_name_leased_alone_on_this_server_makes_the_directory_lease_step_aside() {
        let (_store, a, _) = two_servers();
        let held = prepare(&a, "d/x", false).await.unwrap();
        // A rename (or a large upload) on the same server leases names one
        // by one: the directory's lease takes no new uploads meanwhile and
        // is given up once its upload ends.
        let inner = a.inner.clone();
        let renaming = tokio::spawn(async move {
            Leases::take_checking(&inner, vec![vec!["d".to_owned()]], &path("d"), || async {})
                .await
                .map(|(lease, ())| lease)
        });
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(a
            .inner
            .dirs
            .join(&a.inner, &path("d/z"))
            .await
            .unwrap()
            .is_none());
        commit(held, b"x").await.unwrap();
        let lease = renaming.await.unwrap().unwrap();
        lease.release();
    }
}

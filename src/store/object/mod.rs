//! The object store: files kept in an S3-compatible bucket (Garage, MinIO, AWS S3) through the `object_store` crate, shared by any number of servers.
//!
//! Layout under the root `s3://BUCKET/PREFIX` (every key below starts with `PREFIX/`):
//! - `a/b/file`: a file, its bytes the object's; its mtime, mode and (when
//!   known before the write) BLAKE3 in the object's metadata
//!   (`x-amz-meta-qxfer-mtime`, `-qxfer-mode`, `-qxfer-blake3`).
//! - `a/b/.qxfer-dir`: a directory's marker: it makes an empty directory
//!   exist and carries the directory's mtime and mode. A directory also
//!   exists without a marker as long as something lies beneath it.
//! - `.qxfer-sums/a/b/file`: for a file uploaded in parts, the BLAKE3 of
//!   the whole and of each part (their chaining values, see
//!   [`super::tree_hash`]) with the object's ETag: what lets a server prove a
//!   prefix to a resuming client, and send the digest, without reading the
//!   object back. A stale one (the object replaced by another tool) no
//!   longer matches the ETag and is ignored.
//! - `.qxfer-partial/NAME/upload` and `.qxfer-partial/NAME/part-NNNNN` or
//!   `part-FIRST-LAST`: a multipart upload in progress (NAME is the partial
//!   name: client identity, path, size and mtime): its upload id, then the
//!   parts stored (ETag and chaining value each), those stored within a
//!   second of each other in one record (upload/parts.rs, `RECORD_EVERY`).
//!   Any server can continue it.
//!
//! - `.qxfer-leases/NAME/.qxfer-lease/ID`: a writer's hold on a name (or,
//!   for small files, on their directory): see leases.rs and dir_leases.rs.
//! - `.qxfer-index/a/b/.qxfer-entries`: what listings learned of the files
//!   of `a/b` (their mtimes and modes, which LIST does not return), checked
//!   against what each listing shows: see index.rs.
//!
//! Names are validated as for a local root before they become keys, the
//! reserved `.qxfer-` names are refused and hidden, and every key is built
//! beneath the prefix: nothing outside it is read, listed or written.
//!
//! Uploads: files smaller than one part (8 MiB or more, see
//! [`tree_hash::part_size`]) are kept in memory and written with one PUT
//! once their BLAKE3 matched; larger ones become multipart uploads whose
//! parts are stored as they fill, three at a time, a part filling only when it can be stored (memory: three parts, 24 MiB, per upload), and
//! the object appears only when the upload is completed, after the digest
//! matched. The client is answered then; the upload's sums and the removal
//! of its record follow, under the name's lease (background.rs counts such
//! work, and a server shutting down waits for it). An abandoned upload is
//! aborted; the sweep aborts those left by a server that died.
//!
//! No-clobber between servers: S3 has no rename, so an upload without
//! `--force` checks that the name is free when it starts and again just
//! before it completes, and single PUTs also send `If-None-Match: *`. A
//! store that honours that header (AWS S3) refuses the second of two
//! simultaneous creators; one that ignores it (Garage 2.5) lets the last of
//! two uploads that complete within the same few milliseconds win.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use futures::stream::{self, StreamExt, TryStreamExt};
use object_store::path::Path as Key;
use object_store::{
    Attributes, GetOptions, GetResult, ObjectStore, ObjectStoreExt, PutMode, PutOptions, PutPayload,
};
use tracing::warn;

use crate::paths::RemotePath;
use crate::protocol::{DirMeta, Entry, ErrorCode, Prefix, RemoteError};

use super::{
    tree_too_large, InUse, Opened, Prepared, PutPlan, Store, MAX_TREE_ENTRIES, MAX_TREE_NAME_BYTES,
};

mod attrs;
mod background;
mod connect;
#[cfg(test)]
mod counted;
mod dir_leases;
mod errors;
mod index;
mod leases;
mod list;
mod manage;
mod memory;
mod read;
mod upload;

use attrs::*;
#[cfg(test)]
use connect::parse_url;
use errors::*;
use list::*;

pub(crate) use connect::tune_allocator;
pub(crate) use leases::holder_tag;
pub(crate) use memory::DEFAULT_UPLOAD_MEMORY;

/// A bucket (and a prefix in it) served as the root.
#[derive(Debug)]
pub(crate) struct ObjectRoot {
    inner: Arc<Inner>,
}

/// What qxfer needs of an object store: objects, and multipart uploads
/// driven part by part (S3's own API; object_store's in-memory store has
/// it too, which is what lets the handlers' tests run without a cluster).
pub(crate) trait Bucket: ObjectStore + object_store::multipart::MultipartStore {}

impl<T: ObjectStore + object_store::multipart::MultipartStore> Bucket for T {}

/// What every request of an object root needs.
#[derive(Debug)]
struct Inner {
    /// The store: S3 (Garage, AWS...) when served; object_store's
    /// in-memory store in the handlers' tests.
    s3: Arc<dyn Bucket>,
    /// The prefix every key starts with (empty: the whole bucket).
    prefix: Vec<String>,
    /// Directories (names joined with `/`) seen to be no file, with the
    /// epoch of this server's leases beneath them then: the parents of a
    /// put must not be files, and a tree upload would otherwise ask that
    /// of the same few directories for every file. Trusted only while the
    /// epoch lasts ([`leases::Held`]).
    no_file: std::sync::Mutex<std::collections::HashMap<String, u64>>,
    /// The leases this server holds, by directory.
    held: leases::Held,
    /// The directory leases small uploads share ([`dir_leases`]).
    dirs: dir_leases::DirLeases,
    /// Slots for requests to the store (see [`MAX_REQUESTS`]).
    slots: tokio::sync::Semaphore,
    /// Slots for the requests of leases (see [`LEASE_REQUESTS`]).
    lease_slots: tokio::sync::Semaphore,
    /// Slots for listings' lookups (see [`LOOKUP_REQUESTS`]).
    lookup_slots: tokio::sync::Semaphore,
    /// The tag this server's lease ids start with ([`leases::adopt`]).
    holder: std::sync::Mutex<String>,
    /// The memory uploads may hold in buffers, server-wide.
    memory: memory::UploadMemory,
    /// What runs on after its answer (see [`Store::finish_background`]).
    background: background::Background,
}

/// Requests to the store in flight at once, per server. Each holds an HTTP
/// connection while it runs, so without a bound a flood of small requests
/// (one client's 640 stalled puts each checking its name) opened some 900
/// sockets, kept idle for a minute and a half afterwards. A download's
/// streaming read takes no slot: a client that stops reading would
/// otherwise hold one, and those are bounded by the streams a server admits.
const MAX_REQUESTS: usize = 64;

/// Requests for leases in flight at once, per server: apart from the
/// others, so that a lease is taken and kept fresh while data requests
/// queue (512 puts of a tree waiting for [`MAX_REQUESTS`] slots once kept
/// the leases of the last ones from being rewritten for 20 s).
const LEASE_REQUESTS: usize = 32;

/// Idle connections to the store kept for reuse, and for how long.
const IDLE_CONNECTIONS: usize = 16;

const IDLE_FOR: Duration = Duration::from_secs(20);

/// Most keys remembered in [`Inner::no_file`].
const NO_FILE_MAX: usize = 10_000;

/// Marker object of a directory.
const DIR_MARKER: &str = ".qxfer-dir";

/// Where the digests of multipart files live.
const SUMS_DIR: &str = ".qxfer-sums";
/// Where multipart uploads in progress are recorded.
use crate::paths::PARTIAL_DIR;

/// Lookups in flight at once for one listing's metadata.
const LIST_CONCURRENCY: usize = 16;

/// Lookups for listings in flight at once, per server, from slots apart
/// from [`MAX_REQUESTS`]: two `ls -r` of big trees once took 64 of the 64
/// slots (32 each), and every other request queued behind their lookups.
const LOOKUP_REQUESTS: usize = 24;

/// Metadata names (sent as `x-amz-meta-<name>`).
const META_MTIME: &str = "qxfer-mtime";

const META_MODE: &str = "qxfer-mode";

const META_BLAKE3: &str = "qxfer-blake3";

/// Why an object root cannot be served.
#[derive(Debug, thiserror::Error)]
pub(crate) enum ObjectRootError {
    /// The root is not `s3://BUCKET[/PREFIX]`.
    #[error("{0}")]
    BadUrl(String),
    /// The store could not be used.
    #[error("{0}")]
    Unusable(String),
}

/// How to reach an S3-compatible store. What is not given here comes from
/// the standard environment variables (`AWS_ACCESS_KEY_ID`,
/// `AWS_SECRET_ACCESS_KEY`, `AWS_SESSION_TOKEN`, `AWS_REGION` or
/// `AWS_DEFAULT_REGION`).
#[derive(Debug, Clone, Default)]
pub struct S3Options {
    /// The store's address, e.g. `http://127.0.0.1:3900` (default: AWS S3).
    pub endpoint: Option<String>,
    /// Access key id.
    pub access_key_id: Option<String>,
    /// Secret access key.
    pub secret_access_key: Option<String>,
    /// Region (Garage's default is `garage`).
    pub region: Option<String>,
    /// The most memory all uploads together may hold in buffers (a part
    /// being filled and the parts being stored, per upload); default
    /// [`DEFAULT_UPLOAD_MEMORY`] (`serve --upload-memory`).
    pub upload_memory: Option<u64>,
}

impl Inner {
    /// The key of `parts` beneath the prefix.
    fn key_of(&self, parts: &[&str]) -> Key {
        Key::from_iter(
            self.prefix
                .iter()
                .map(String::as_str)
                .chain(parts.iter().copied()),
        )
    }

    /// The names (decoded) of `key`'s parts beneath the prefix.
    fn names_of(&self, key: &Key) -> Vec<String> {
        key.parts()
            .skip(self.prefix.len())
            .map(|p| decoded(p.as_ref()))
            .collect()
    }

    /// The key of a remote path.
    fn key(&self, path: &RemotePath) -> Key {
        let parts: Vec<&str> = path.components().iter().map(String::as_str).collect();
        self.key_of(&parts)
    }

    /// The key a directory's contents start with (the prefix itself for the root).
    fn dir_key(&self, parts: &[&str]) -> Key {
        self.key_of(parts)
    }

    /// Waits for a slot to send the store a request (see [`MAX_REQUESTS`]).
    /// Held for one request and the reading of its answer, never across
    /// another request, so slots cannot deadlock.
    async fn slot(&self) -> tokio::sync::SemaphorePermit<'_> {
        self.slots
            .acquire()
            .await
            .expect("the slots are never closed")
    }

    /// Waits for a slot to send the store a lease's request (see
    /// [`LEASE_REQUESTS`]); held like [`Inner::slot`].
    async fn lease_slot(&self) -> tokio::sync::SemaphorePermit<'_> {
        self.lease_slots
            .acquire()
            .await
            .expect("the slots are never closed")
    }

    /// Waits for a slot for a listing's lookup (see [`LOOKUP_REQUESTS`]);
    /// held like [`Inner::slot`].
    async fn lookup_slot(&self) -> tokio::sync::SemaphorePermit<'_> {
        self.lookup_slots
            .acquire()
            .await
            .expect("the slots are never closed")
    }

    /// The tag this server's lease ids start with.
    fn holder(&self) -> String {
        self.holder
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    fn set_holder(&self, holder: &str) {
        *self.holder.lock().unwrap_or_else(|e| e.into_inner()) = holder.to_owned();
    }

    /// A HEAD that returns the object's metadata too; `None` if there is no such object.
    async fn head(&self, key: &Key) -> object_store::Result<Option<GetResult>> {
        let opts = GetOptions {
            head: true,
            ..GetOptions::default()
        };
        let _slot = self.slot().await;
        self.head_now(key, opts).await
    }

    /// [`Inner::head`] for a listing's lookup of one entry: from slots of
    /// their own ([`LOOKUP_REQUESTS`]), so listings of big trees, however
    /// many at once, leave the store's other slots to every other request.
    async fn head_listed(&self, key: &Key) -> object_store::Result<Option<GetResult>> {
        let opts = GetOptions {
            head: true,
            ..GetOptions::default()
        };
        let _slot = self.lookup_slot().await;
        self.head_now(key, opts).await
    }

    async fn head_now(
        &self,
        key: &Key,
        opts: GetOptions,
    ) -> object_store::Result<Option<GetResult>> {
        match self.s3.get_opts(key, opts).await {
            Ok(r) => Ok(Some(r)),
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Whether anything lies beneath `key` (so it is a directory).
    async fn has_children(&self, key: &Key) -> object_store::Result<bool> {
        let _slot = self.slot().await;
        let mut listing = self.s3.list(Some(key));
        Ok(listing.try_next().await?.is_some())
    }

    /// Whether an ancestor of `path` is a file (where a directory must be).
    async fn file_on_the_way(&self, path: &RemotePath) -> object_store::Result<bool> {
        let parts: Vec<&str> = path.components().iter().map(String::as_str).collect();
        let dirs: Vec<String> = (1..parts.len())
            .map(|n| parts[..n].join("/"))
            .filter(|d| !self.known_no_file(d))
            .collect();
        let checks = dirs.iter().map(|dir| async move {
            let parts: Vec<&str> = dir.split('/').collect();
            let epoch = self.held.epoch(dir);
            let found = self.head(&self.key_of(&parts)).await?.is_some();
            if let (false, Some(epoch)) = (found, epoch) {
                self.saw_no_file(dir, epoch);
            }
            Ok::<_, object_store::Error>(found)
        });
        let found = futures::future::try_join_all(checks).await?;
        Ok(found.into_iter().any(|f| f))
    }

    /// Whether `dir` was seen to be no file while this server has held a
    /// lease beneath it, without a break, ever since (see leases.rs:
    /// no server can have made a file of that name meanwhile).
    fn known_no_file(&self, dir: &str) -> bool {
        let Some(now) = self.held.epoch(dir) else {
            return false;
        };
        let seen = self.no_file.lock().unwrap_or_else(|e| e.into_inner());
        seen.get(dir) == Some(&now)
    }

    fn saw_no_file(&self, dir: &str, epoch: u64) {
        let mut seen = self.no_file.lock().unwrap_or_else(|e| e.into_inner());
        if seen.len() >= NO_FILE_MAX {
            seen.retain(|d, e| self.held.epoch(d) == Some(*e));
            if seen.len() >= NO_FILE_MAX {
                seen.clear();
            }
        }
        seen.insert(dir.to_owned(), epoch);
    }

    /// Every key beneath `prefix` (whole path segments: `a/b` lists `a/b/...`).
    async fn keys_under(&self, prefix: &Key) -> object_store::Result<Vec<Key>> {
        let _slot = self.slot().await;
        self.s3
            .list(Some(prefix))
            .map_ok(|o| o.location)
            .try_collect()
            .await
    }

    /// Deletes `keys` in as few requests as the store allows (S3's
    /// DeleteObjects takes 1,000 keys a request: a directory of 2,000 files
    /// is two requests, not 2,000 in a row); keys already gone are no
    /// error. One slot for the lot: object_store sends at most 20 of those
    /// requests at once, and only past 20,000 keys.
    async fn delete_all(&self, keys: Vec<Key>) -> object_store::Result<()> {
        if keys.is_empty() {
            return Ok(());
        }
        let slot = self.slot().await;
        let mut deleted = self
            .s3
            .delete_stream(stream::iter(keys.clone().into_iter().map(Ok)).boxed());
        let mut failed = None;
        while let Some(result) = deleted.next().await {
            match result {
                Err(e) if !is_not_found(&e) => failed = Some(e),
                _ => {}
            }
        }
        drop((deleted, slot));
        // A key the bulk request could not delete is reported inside its
        // answer, which no retry covers: delete each key on its own then
        // (with the client's retries; those already gone cost a request).
        if let Some(e) = failed {
            warn!("a bulk delete failed in part ({e}); deleting key by key");
            for key in &keys {
                self.delete_if_there(key).await?;
            }
        }
        Ok(())
    }

    /// Deletes everything beneath `prefix`.
    async fn delete_under(&self, prefix: &Key) -> object_store::Result<()> {
        let keys = self.keys_under(prefix).await?;
        self.delete_all(keys).await
    }

    /// Deletes `key`; one already gone is no error.
    async fn delete_if_there(&self, key: &Key) -> object_store::Result<()> {
        let _slot = self.slot().await;
        match self.s3.delete(key).await {
            Err(e) if !is_not_found(&e) => Err(e),
            _ => Ok(()),
        }
    }

    /// Forgets that `key` held no object (it has become a file).
    fn forget_no_file(&self, dir: &str) {
        let mut seen = self.no_file.lock().unwrap_or_else(|e| e.into_inner());
        seen.remove(dir);
    }

    /// The metadata of a directory from its marker, if it has one.
    async fn dir_meta(&self, dir: &[String]) -> object_store::Result<Option<DirMeta>> {
        let mut parts: Vec<&str> = dir.iter().map(String::as_str).collect();
        parts.push(DIR_MARKER);
        Ok(self.head_listed(&self.key_of(&parts)).await?.map(|h| {
            let (mtime, mode) = times_and_mode(&h.attributes);
            DirMeta { mode, mtime }
        }))
    }
}

#[async_trait]
impl Store for ObjectRoot {
    async fn list(&self, path: &RemotePath, recursive: bool) -> Result<Vec<Entry>, RemoteError> {
        let inner = &self.inner;
        let failed = |e| store_error(e, path, "cannot list");
        let parts: Vec<&str> = path.components().iter().map(String::as_str).collect();
        if !parts.is_empty() {
            if let Some(h) = inner.head(&inner.key(path)).await.map_err(failed)? {
                let name = path.file_name().unwrap_or_default().to_owned();
                return Ok(vec![file_entry(name, &h.meta, &h.attributes)]);
            }
        }
        let dir = inner.dir_key(&parts);
        let mut out = if recursive {
            list_tree(inner, &dir, &parts, path).await?
        } else {
            list_dir(inner, &dir, &parts, path).await?
        };
        if out.is_empty()
            && !parts.is_empty()
            && inner
                .dir_meta(path.components())
                .await
                .map_err(failed)?
                .is_none()
        {
            return Err(RemoteError::new(
                ErrorCode::NotFound,
                format!("cannot list '{path}' on the server: no such file or directory; check the name with `qxfer ls`"),
            ));
        }
        out.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(out)
    }

    async fn mkdir(&self, path: &RemotePath, meta: Option<DirMeta>) -> Result<(), RemoteError> {
        let inner = &self.inner;
        let failed = |e| store_error(e, path, "cannot create the directory");
        if inner.file_on_the_way(path).await.map_err(failed)? {
            return Err(not_a_directory(path));
        }
        if inner
            .head(&inner.key(path))
            .await
            .map_err(failed)?
            .is_some()
        {
            return Err(RemoteError::new(
                ErrorCode::NotDirectory,
                format!("cannot create the directory '{path}' on the server: a file has that name"),
            ));
        }
        let mut parts: Vec<&str> = path.components().iter().map(String::as_str).collect();
        parts.push(DIR_MARKER);
        let mut attributes = Attributes::new();
        if let Some(meta) = meta {
            put_times_and_mode(&mut attributes, meta.mtime, meta.mode);
        }
        let opts = PutOptions {
            attributes,
            ..PutOptions::default()
        };
        let slot = inner.slot().await;
        let made = inner
            .s3
            .put_opts(&inner.key_of(&parts), PutPayload::new(), opts)
            .await;
        drop(slot);
        // A directory now, as far as a lease on its parent knew.
        inner.dirs.changed(path);
        let made = made.map_err(failed)?;
        let (mtime, mode) = as_stored(meta.and_then(|m| m.mtime), meta.and_then(|m| m.mode));
        inner.dirs.marker_written(path, made.e_tag, mtime, mode);
        Ok(())
    }

    async fn open(&self, path: &RemotePath, resume: Option<Prefix>) -> Result<Opened, RemoteError> {
        read::open(&self.inner, path, resume).await
    }

    async fn remove(&self, path: &RemotePath, recursive: bool) -> Result<(), RemoteError> {
        let removed = manage::remove(&self.inner, path, recursive).await;
        self.inner.dirs.changed(path);
        removed
    }

    async fn rename(&self, from: &RemotePath, to: &RemotePath) -> Result<(), RemoteError> {
        let renamed = manage::rename(&self.inner, from, to).await;
        self.inner.dirs.changed(from);
        self.inner.dirs.changed(to);
        renamed
    }

    async fn prepare_put(&self, plan: PutPlan) -> Result<Prepared, RemoteError> {
        upload::prepare(&self.inner, plan).await
    }

    async fn sweep(&self, ttl: Duration, in_use: InUse) -> Result<usize, String> {
        upload::sweep(&self.inner, ttl, in_use)
            .await
            .map_err(|e| e.to_string())
    }

    async fn held_partials(&self) -> Result<usize, String> {
        upload::recorded_uploads(&self.inner)
            .await
            .map(|uploads| uploads.len())
            .map_err(|e| e.to_string())
    }

    async fn adopt(&self, holder: &str) -> Result<usize, String> {
        leases::adopt(&self.inner, holder)
            .await
            .map_err(|e| e.to_string())
    }

    async fn probe(&self) -> Result<(), String> {
        // A key no file has: "not found" is an answer, and the cheapest.
        let key = self
            .inner
            .key_of(&[&format!("{}health-probe", crate::paths::RESERVED_PREFIX)]);
        match self.inner.s3.head(&key).await {
            Ok(_) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(format!("the object store: {}", short_error(&e))),
        }
    }

    async fn finish_background(&self) {
        self.inner.background.idle().await;
    }
}

fn rand_u64() -> u64 {
    let mut b = [0u8; 8];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut b)
        .expect("the system RNG works");
    u64::from_le_bytes(b)
}

/// A put `mode` that refuses to replace unless `force`.
fn put_mode(force: bool) -> PutMode {
    if force {
        PutMode::Overwrite
    } else {
        PutMode::Create
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::Timestamp;
    use object_store::{Attribute, Attributes};

    #[test]
    fn urls_name_a_bucket_and_a_safe_prefix() {
        assert_eq!(parse_url("s3://b").unwrap(), ("b".to_owned(), vec![]));
        assert_eq!(
            parse_url("s3://b/x/y/").unwrap(),
            ("b".to_owned(), vec!["x".to_owned(), "y".to_owned()])
        );
        for bad in [
            "b/x",
            "s3://",
            "s3:///x",
            "s3://b/../x",
            "s3://b/.qxfer-partial",
            "file:///tmp",
        ] {
            assert!(parse_url(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn times_and_modes_round_trip_through_metadata() {
        let mut a = Attributes::new();
        let t = Timestamp { secs: -5, nanos: 7 };
        put_times_and_mode(&mut a, Some(t), Some(0o104777));
        assert_eq!(
            times_and_mode(&a),
            (Some(t), Some(0o755)),
            "as a local root keeps it"
        );
        let mut bad = Attributes::new();
        bad.insert(
            Attribute::Metadata(META_MTIME.into()),
            "1.9999999999".into(),
        );
        bad.insert(Attribute::Metadata(META_MODE.into()), "9".into());
        assert_eq!(times_and_mode(&bad), (None, None));
    }
}

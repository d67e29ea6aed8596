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
//! - `.qxfer-partial/NAME/upload` and `.qxfer-partial/NAME/part-NNNNN`: a
//!   multipart upload in progress (NAME is the partial name: client
//!   identity, path, size and mtime): its upload id, then one record per
//!   part stored (ETag and chaining value). Any server can continue it.
//!
//! Names are validated as for a local root before they become keys, the
//! reserved `.qxfer-` names are refused and hidden, and every key is built
//! beneath the prefix: nothing outside it is read, listed or written.
//!
//! Uploads: files smaller than one part (8 MiB or more, see
//! [`tree_hash::part_size`]) are kept in memory and written with one PUT
//! once their BLAKE3 matched; larger ones become multipart uploads whose
//! parts are stored as they fill, three at a time (memory: four parts, 32 MiB, per upload), and
//! the object appears only when the upload is completed, after the digest
//! matched. An abandoned upload is aborted; the sweep aborts those left by
//! a server that died.
//!
//! No-clobber between servers: S3 has no rename, so an upload without
//! `--force` checks that the name is free when it starts and again just
//! before it completes, and single PUTs also send `If-None-Match: *`. A
//! store that honours that header (AWS S3) refuses the second of two
//! simultaneous creators; one that ignores it (Garage 2.5) lets the last of
//! two uploads that complete within the same few milliseconds win.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use futures::stream::{self, StreamExt, TryStreamExt};
use object_store::aws::AmazonS3Builder;
use object_store::path::Path as Key;
use object_store::{
    Attribute, AttributeValue, Attributes, ClientOptions, GetOptions, GetResult, ObjectMeta,
    ObjectStore, ObjectStoreExt, PutMode, PutOptions, PutPayload, RetryConfig,
};
use tracing::warn;

use crate::files::{to_timestamp, KEPT_MODE_BITS};
use crate::paths::{RemotePath, RESERVED_PREFIX};
use crate::protocol::{
    Digest, DirMeta, Entry, EntryKind, ErrorCode, FileMeta, Prefix, RemoteError, Timestamp,
};

use super::{
    tree_too_large, InUse, Opened, Prepared, PutPlan, Store, MAX_TREE_ENTRIES, MAX_TREE_NAME_BYTES,
};

mod leases;
mod manage;
mod memory;
mod read;
mod upload;

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

impl ObjectRoot {
    /// Connects to the bucket `url` names (`s3://BUCKET[/PREFIX]`) as
    /// `options` say, and checks it can list and (unless `read_only`) write
    /// there.
    pub(crate) async fn connect(
        url: &str,
        options: &S3Options,
        read_only: bool,
    ) -> Result<Self, ObjectRootError> {
        // https endpoints go through reqwest's rustls, which takes the
        // process's default provider: ring, as for QUIC.
        let _ = rustls::crypto::ring::default_provider().install_default();
        fixed_mmap_threshold();
        let (bucket, prefix) = parse_url(url)?;
        let endpoint = options.endpoint.as_deref();
        let build = |retry: RetryConfig| {
            let mut b = AmazonS3Builder::from_env().with_bucket_name(&bucket);
            if let Some(id) = &options.access_key_id {
                b = b.with_access_key_id(id);
            }
            if let Some(secret) = &options.secret_access_key {
                b = b.with_secret_access_key(secret);
            }
            if let Some(region) = &options.region {
                b = b.with_region(region);
            }
            // Payloads go unsigned (no SHA-256 of every part on either
            // side): what protects the bytes is the BLAKE3 every client
            // checks end to end, and on an untrusted network the endpoint
            // must be https anyway, since S3 signs no response.
            let mut b = b
                .with_unsigned_payload(true)
                .with_retry(retry)
                .with_client_options(
                    ClientOptions::new()
                        .with_connect_timeout(Duration::from_secs(5))
                        .with_timeout(Duration::from_secs(120))
                        .with_pool_max_idle_per_host(IDLE_CONNECTIONS)
                        .with_pool_idle_timeout(IDLE_FOR),
                );
            if let Some(ep) = endpoint {
                b = b
                    .with_endpoint(ep)
                    .with_allow_http(ep.starts_with("http://"));
            }
            b.build().map_err(|e| {
                ObjectRootError::Unusable(format!(
                    "cannot use {url}: {e}; check --s3-endpoint and the AWS_* variables"
                ))
            })
        };
        let s3: Arc<dyn Bucket> = Arc::new(build(RetryConfig {
            max_retries: 4,
            retry_timeout: Duration::from_secs(30),
            ..RetryConfig::default()
        })?);
        // The start-up check fails fast (no long retries on a store that is
        // not there) but rides out a hiccup of a cluster that just started.
        let probe = Inner {
            s3: Arc::new(build(RetryConfig {
                max_retries: 3,
                retry_timeout: Duration::from_secs(5),
                ..RetryConfig::default()
            })?),
            prefix: prefix.clone(),
            no_file: Default::default(),
            held: Default::default(),
            slots: tokio::sync::Semaphore::new(MAX_REQUESTS),
            lease_slots: tokio::sync::Semaphore::new(LEASE_REQUESTS),
            lookup_slots: tokio::sync::Semaphore::new(LOOKUP_REQUESTS),
            holder: std::sync::Mutex::new(random_holder()),
            memory: memory::UploadMemory::new(0),
        };
        let at = endpoint.unwrap_or("AWS S3");
        let unusable = |doing: &str, e: object_store::Error| {
            let advice = match trouble(&e) {
                Trouble::Missing => format!(
                    "does bucket '{bucket}' exist? Create it (garage bucket create {bucket}) or fix --root"
                ),
                Trouble::Credentials => format!(
                    "check AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY and AWS_REGION, and that the key may {} bucket '{bucket}'",
                    if read_only { "read" } else { "read and write" }
                ),
                Trouble::Unreachable => {
                    "check --s3-endpoint and that the store is running".to_owned()
                }
            };
            ObjectRootError::Unusable(format!(
                "cannot {doing} {url} at {at}: {}; {advice}",
                short_error(&e)
            ))
        };
        probe
            .s3
            .list_with_delimiter(Some(&probe.dir_key(&[])))
            .await
            .map_err(|e| unusable("list", e))?;
        if !read_only {
            // Not in the partial store: Garage's listings may show a
            // deleted key for a moment, and a probe is no upload.
            let key = probe.key_of(&[&format!("{RESERVED_PREFIX}probe-{:016x}", rand_u64())]);
            probe
                .s3
                .put(&key, PutPayload::from_static(b"qxfer write check"))
                .await
                .map_err(|e| unusable("write to", e))?;
            probe
                .s3
                .delete(&key)
                .await
                .map_err(|e| unusable("delete in", e))?;
        }
        let memory = options.upload_memory.unwrap_or(DEFAULT_UPLOAD_MEMORY);
        Ok(Self::over(s3, prefix, memory))
    }

    /// Serves what is under `prefix` in `s3`, uploads holding at most
    /// `memory` bytes in buffers together.
    fn over(s3: Arc<dyn Bucket>, prefix: Vec<String>, memory: u64) -> Self {
        Self {
            inner: Arc::new(Inner {
                s3,
                prefix,
                no_file: Default::default(),
                held: Default::default(),
                slots: tokio::sync::Semaphore::new(MAX_REQUESTS),
                lease_slots: tokio::sync::Semaphore::new(LEASE_REQUESTS),
                lookup_slots: tokio::sync::Semaphore::new(LOOKUP_REQUESTS),
                holder: std::sync::Mutex::new(random_holder()),
                memory: memory::UploadMemory::new(memory),
            }),
        }
    }

    /// A root in object_store's in-memory store, under a prefix: the same
    /// code as over S3 (leases, multipart parts, conditional writes),
    /// without a cluster, for the handlers' tests. Unlike Garage, the
    /// in-memory store honours If-None-Match.
    #[cfg(test)]
    pub(crate) fn in_memory() -> Self {
        let s3 = Arc::new(object_store::memory::InMemory::new());
        Self::over(s3, vec!["served".to_owned()], DEFAULT_UPLOAD_MEMORY)
    }
}

/// Makes glibc give every part buffer (megabytes each) its own mapping,
/// returned to the system when freed. By default glibc raises its mmap
/// threshold to the size of the largest block freed, so after the first
/// part, parts come from the heap arenas of whichever threads freed them
/// and stay resident: a 1 GiB upload held 90 MiB where its buffers are 32.
fn fixed_mmap_threshold() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only sets an allocator tunable; any value is valid.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 1 << 20);
    }
}

/// A holder tag for a server that was never told its own (one per process
/// run: nothing of a predecessor's is adopted).
fn random_holder() -> String {
    format!("{:016x}", rand_u64())
}

/// Splits `s3://BUCKET[/PREFIX]`; the prefix's parts obey the rules of remote paths.
fn parse_url(url: &str) -> Result<(String, Vec<String>), ObjectRootError> {
    let bad = |why: &str| {
        ObjectRootError::BadUrl(format!(
            "--root {url:?}: {why}; an object store root looks like s3://BUCKET or s3://BUCKET/PREFIX"
        ))
    };
    let rest = url
        .strip_prefix("s3://")
        .ok_or_else(|| bad("not an s3:// address"))?;
    let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
    if bucket.is_empty() {
        return Err(bad("no bucket named"));
    }
    let prefix = RemotePath::parse(prefix, true)
        .map_err(|e| bad(&e.message))?
        .components()
        .to_vec();
    Ok((bucket.to_owned(), prefix))
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
        let _slot = self
            .lookup_slots
            .acquire()
            .await
            .expect("the slots are never closed");
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
        let _slot = inner.slot().await;
        inner
            .s3
            .put_opts(&inner.key_of(&parts), PutPayload::new(), opts)
            .await
            .map_err(failed)?;
        Ok(())
    }

    async fn open(&self, path: &RemotePath, resume: Option<Prefix>) -> Result<Opened, RemoteError> {
        read::open(&self.inner, path, resume).await
    }

    async fn remove(&self, path: &RemotePath, recursive: bool) -> Result<(), RemoteError> {
        manage::remove(&self.inner, path, recursive).await
    }

    async fn rename(&self, from: &RemotePath, to: &RemotePath) -> Result<(), RemoteError> {
        manage::rename(&self.inner, from, to).await
    }

    async fn prepare_put(&self, plan: PutPlan) -> Result<Prepared, RemoteError> {
        upload::prepare(&self.inner, plan).await
    }

    async fn sweep(&self, ttl: Duration, in_use: InUse) -> Result<usize, String> {
        upload::sweep(&self.inner, ttl, in_use)
            .await
            .map_err(|e| e.to_string())
    }

    async fn adopt(&self, holder: &str) -> Result<usize, String> {
        leases::adopt(&self.inner, holder)
            .await
            .map_err(|e| e.to_string())
    }
}

/// One level of a directory: its files (with their metadata, one HEAD
/// each, since listings carry none) and subdirectories.
async fn list_dir(
    inner: &Arc<Inner>,
    dir: &Key,
    parts: &[&str],
    path: &RemotePath,
) -> Result<Vec<Entry>, RemoteError> {
    let failed = |e| store_error(e, path, "cannot list");
    let slot = inner.slot().await;
    let listing = inner
        .s3
        .list_with_delimiter(Some(dir))
        .await
        .map_err(failed)?;
    drop(slot);
    let files = listing.objects.into_iter().filter_map(|o| {
        let name = decoded(o.location.filename()?);
        (!name.starts_with(RESERVED_PREFIX)).then_some((name, o))
    });
    let dirs = listing.common_prefixes.into_iter().filter_map(|p| {
        let name = decoded(p.filename()?);
        (!name.starts_with(RESERVED_PREFIX)).then_some(name)
    });
    let mut out = file_entries(inner, files.collect(), path).await?;
    let dirs: Vec<String> = dirs.collect();
    let subs = dirs.iter().map(|name| {
        let mut sub: Vec<String> = parts.iter().map(|p| (*p).to_owned()).collect();
        sub.push(name.clone());
        sub
    });
    let metas = dir_metas(inner, subs).await.map_err(failed)?;
    out.extend(
        dirs.into_iter()
            .zip(metas)
            .map(|(name, meta)| dir_entry(name, meta)),
    );
    Ok(out)
}

/// Everything beneath a directory, names relative to it, bounded like a
/// local listing. Directories are those with a marker and those that
/// something lies beneath.
async fn list_tree(
    inner: &Arc<Inner>,
    dir: &Key,
    parts: &[&str],
    path: &RemotePath,
) -> Result<Vec<Entry>, RemoteError> {
    let failed = |e| store_error(e, path, "cannot list");
    let depth = inner.prefix.len() + parts.len();
    let mut files = Vec::new();
    // Each directory, and whether it has a marker.
    let mut dirs: BTreeMap<String, bool> = BTreeMap::new();
    let mut name_bytes = 0;
    let slot = inner.slot().await;
    let mut listing = inner.s3.list(Some(dir));
    while let Some(object) = listing.try_next().await.map_err(failed)? {
        let rel: Vec<String> = object
            .location
            .parts()
            .skip(depth)
            .map(|p| decoded(p.as_ref()))
            .collect();
        let Some((last, above)) = rel.split_last() else {
            continue;
        };
        if above.iter().any(|c| c.starts_with(RESERVED_PREFIX)) {
            continue;
        }
        for n in 1..=above.len() {
            dirs.entry(above[..n].join("/")).or_insert(false);
        }
        if last == DIR_MARKER {
            if !above.is_empty() {
                dirs.insert(above.join("/"), true);
            }
            continue;
        }
        if last.starts_with(RESERVED_PREFIX) {
            continue;
        }
        let name = rel.join("/");
        name_bytes += name.len();
        files.push((name, object));
        if files.len() + dirs.len() > MAX_TREE_ENTRIES || name_bytes > MAX_TREE_NAME_BYTES {
            return Err(tree_too_large(path));
        }
    }
    drop((listing, slot));
    let mut out = file_entries(inner, files, path).await?;
    let marked: Vec<&String> = dirs.iter().filter(|(_, m)| **m).map(|(d, _)| d).collect();
    let subs = marked.iter().map(|d| {
        let mut sub: Vec<String> = parts.iter().map(|p| (*p).to_owned()).collect();
        sub.extend(d.split('/').map(str::to_owned));
        sub
    });
    let metas = dir_metas(inner, subs).await.map_err(failed)?;
    let mut metas: BTreeMap<&String, Option<DirMeta>> = marked.into_iter().zip(metas).collect();
    for d in dirs.keys() {
        let meta = metas.remove(d).flatten();
        out.push(dir_entry(d.clone(), meta));
    }
    Ok(out)
}

/// The metadata of each directory in `dirs` (each given by its parts), in
/// order, [`LIST_CONCURRENCY`] lookups at a time.
async fn dir_metas(
    inner: &Arc<Inner>,
    dirs: impl Iterator<Item = Vec<String>>,
) -> object_store::Result<Vec<Option<DirMeta>>> {
    let lookups: Vec<_> = dirs
        .map(|sub| {
            let inner = inner.clone();
            async move { inner.dir_meta(&sub).await }
        })
        .collect();
    stream::iter(lookups)
        .buffered(LIST_CONCURRENCY)
        .try_collect()
        .await
}

/// Entries for listed objects, each with its mtime and mode from a HEAD.
async fn file_entries(
    inner: &Arc<Inner>,
    files: Vec<(String, ObjectMeta)>,
    path: &RemotePath,
) -> Result<Vec<Entry>, RemoteError> {
    let lookups: Vec<_> = files
        .into_iter()
        .map(|(name, object)| {
            let inner = inner.clone();
            async move {
                match inner.head_listed(&object.location).await? {
                    Some(h) => Ok(Some(file_entry(name, &h.meta, &h.attributes))),
                    // Deleted since it was listed: not part of the listing.
                    None => Ok(None),
                }
            }
        })
        .collect();
    stream::iter(lookups)
        .buffered(LIST_CONCURRENCY)
        .try_filter_map(|e| async move { Ok(e) })
        .try_collect()
        .await
        .map_err(|e| store_error(e, path, "cannot list"))
}

fn file_entry(name: String, object: &ObjectMeta, attributes: &Attributes) -> Entry {
    let (mtime, mode) = times_and_mode(attributes);
    Entry {
        name,
        kind: EntryKind::File,
        size: object.size,
        mtime: mtime.or_else(|| to_timestamp(SystemTime::from(object.last_modified))),
        mode,
    }
}

fn dir_entry(name: String, meta: Option<DirMeta>) -> Entry {
    Entry {
        name,
        kind: EntryKind::Dir,
        size: 0,
        mtime: meta.and_then(|m| m.mtime),
        mode: meta.and_then(|m| m.mode),
    }
}

/// A name as listed. Garage sends the keys of a listing percent-encoded
/// where they are not ASCII (as S3 does when asked for `encoding-type=url`)
/// and object_store passes them on as they came: decoded here, they are
/// the names the files were stored under. Requests keep using the listed
/// key itself, which object_store sends as it is.
fn decoded(listed: &str) -> String {
    percent_encoding::percent_decode_str(listed)
        .decode_utf8()
        .map_or_else(|_| listed.to_owned(), |s| s.into_owned())
}

/// A file's metadata from its object's: size, and mtime and mode as stored
/// (else the time the object was written, and no mode).
fn file_meta(object: &ObjectMeta, attributes: &Attributes) -> FileMeta {
    let (mtime, mode) = times_and_mode(attributes);
    FileMeta {
        size: object.size,
        mtime: mtime.or_else(|| to_timestamp(SystemTime::from(object.last_modified))),
        mode,
    }
}

/// Reads the mtime and mode qxfer stored with an object.
fn times_and_mode(attributes: &Attributes) -> (Option<Timestamp>, Option<u32>) {
    let get = |name: &'static str| {
        attributes
            .get(&Attribute::Metadata(name.into()))
            .map(|v| v.as_ref().to_owned())
    };
    let mtime = get(META_MTIME).and_then(|v| {
        let (secs, nanos) = v.split_once('.')?;
        Some(Timestamp {
            secs: secs.parse().ok()?,
            nanos: nanos.parse().ok().filter(|n| *n < 1_000_000_000)?,
        })
    });
    let mode = get(META_MODE)
        .and_then(|v| u32::from_str_radix(&v, 8).ok())
        .map(|m| m & 0o7777);
    (mtime, mode)
}

/// Stores an mtime and mode with an object.
fn put_times_and_mode(attributes: &mut Attributes, mtime: Option<Timestamp>, mode: Option<u32>) {
    if let Some(t) = mtime {
        attributes.insert(
            Attribute::Metadata(META_MTIME.into()),
            AttributeValue::from(format!("{}.{:09}", t.secs, t.nanos)),
        );
    }
    if let Some(m) = mode {
        attributes.insert(
            Attribute::Metadata(META_MODE.into()),
            AttributeValue::from(format!("{:o}", m & KEPT_MODE_BITS)),
        );
    }
}

/// The BLAKE3 qxfer stored with an object written in one piece.
fn stored_digest(attributes: &Attributes) -> Option<Digest> {
    let hex = attributes.get(&Attribute::Metadata(META_BLAKE3.into()))?;
    blake3::Hash::from_hex(hex.as_ref())
        .ok()
        .map(|h| *h.as_bytes())
}

fn not_a_directory(path: &RemotePath) -> RemoteError {
    RemoteError::new(
        ErrorCode::NotDirectory,
        format!("cannot create the directory for '{path}' on the server: a parent of this path is a file, not a directory"),
    )
}

/// An object store error in a line: the store's own status and error code
/// when it answered (`403 Forbidden (AccessDenied)`), else the first line
/// of the error, without the request dump some carry.
fn short_error(e: &object_store::Error) -> String {
    let text = e.to_string();
    let between = |open: &str, close: &str| {
        let start = text.find(open)? + open.len();
        let len = text[start..].find(close)?;
        Some(text[start..start + len].to_owned())
    };
    if let Some(status) = between("status code: ", ":") {
        return match between("<Code>", "</Code>") {
            Some(code) => format!("the store answered {status} ({code})"),
            None => format!("the store answered {status}"),
        };
    }
    let line = text.lines().next().unwrap_or_default();
    if line.len() <= 300 {
        return line.to_owned();
    }
    let mut end = 300;
    while !line.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}...", &line[..end])
}

/// What an object store error is about, for the advice that goes with it.
#[derive(Debug, PartialEq, Eq)]
enum Trouble {
    Missing,
    Credentials,
    Unreachable,
}

fn trouble(e: &object_store::Error) -> Trouble {
    match e {
        object_store::Error::NotFound { .. } => return Trouble::Missing,
        object_store::Error::PermissionDenied { .. }
        | object_store::Error::Unauthenticated { .. } => return Trouble::Credentials,
        _ => {}
    }
    let text = e.to_string();
    let has = |s: &str| text.contains(s);
    if has("NoSuchBucket") || has("404 Not Found") {
        Trouble::Missing
    } else if has("403 Forbidden")
        || has("AccessDenied")
        || has("InvalidAccessKeyId")
        || has("SignatureDoesNotMatch")
        || has("401 Unauthorized")
    {
        Trouble::Credentials
    } else {
        Trouble::Unreachable
    }
}

/// Turns an object store error on `path` into what the client is told.
fn store_error(e: object_store::Error, path: &RemotePath, doing: &str) -> RemoteError {
    let written_meanwhile = matches!(
        e,
        object_store::Error::AlreadyExists { .. } | object_store::Error::Precondition { .. }
    );
    let (code, advice) = match trouble(&e) {
        _ if written_meanwhile => (
            ErrorCode::AlreadyExists,
            "it was written meanwhile; use --force to overwrite it",
        ),
        Trouble::Missing => (ErrorCode::NotFound, "check the name with `qxfer ls`"),
        Trouble::Credentials => (
            ErrorCode::PermissionDenied,
            "the object store refused the server's credentials; ask its operator",
        ),
        Trouble::Unreachable => (
            ErrorCode::Internal,
            "the server's object store failed or did not answer; try again shortly (the server's log has details)",
        ),
    };
    warn!(path = %path, "object store: {doing}: {e}");
    RemoteError::new(
        code,
        format!(
            "{doing} '{path}' on the server: {}; {advice}",
            short_error(&e)
        ),
    )
}

/// Whether an object store error says the object is not there.
fn is_not_found(e: &object_store::Error) -> bool {
    matches!(e, object_store::Error::NotFound { .. })
}

fn rand_u64() -> u64 {
    let mut b = [0u8; 8];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut b)
        .expect("the system RNG works");
    u64::from_le_bytes(b)
}

/// The error for a put onto a name that is taken.
fn exists(path: &RemotePath) -> RemoteError {
    RemoteError::new(
        ErrorCode::AlreadyExists,
        format!("'{path}' already exists on the server; use --force to overwrite it"),
    )
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

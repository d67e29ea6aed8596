//! Reaching a bucket: the S3 client built from the options, the start-up checks, and the root over any store (the in-memory one in tests).

use std::sync::Arc;
use std::time::Duration;

use object_store::aws::AmazonS3Builder;
use object_store::{ClientOptions, ObjectStore, ObjectStoreExt, PutPayload, RetryConfig};

use crate::paths::{RemotePath, RESERVED_PREFIX};

use super::*;

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
            dirs: Default::default(),
            slots: tokio::sync::Semaphore::new(MAX_REQUESTS),
            lease_slots: tokio::sync::Semaphore::new(LEASE_REQUESTS),
            lookup_slots: tokio::sync::Semaphore::new(LOOKUP_REQUESTS),
            holder: std::sync::Mutex::new(random_holder()),
            memory: memory::UploadMemory::new(0),
            background: Default::default(),
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
    pub(super) fn over(s3: Arc<dyn Bucket>, prefix: Vec<String>, memory: u64) -> Self {
        Self {
            inner: Arc::new(Inner {
                s3,
                prefix,
                no_file: Default::default(),
                held: Default::default(),
                dirs: Default::default(),
                slots: tokio::sync::Semaphore::new(MAX_REQUESTS),
                lease_slots: tokio::sync::Semaphore::new(LEASE_REQUESTS),
                lookup_slots: tokio::sync::Semaphore::new(LOOKUP_REQUESTS),
                holder: std::sync::Mutex::new(random_holder()),
                memory: memory::UploadMemory::new(memory),
                background: Default::default(),
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

/// Tunes glibc's allocator for a server over an object store: the whole
/// process's, so the CLI calls it, before the async runtime starts (the
/// arena limit holds only for threads that have not yet allocated), and
/// opening a root does not.
///
/// - Every buffer of more than 2 MiB gets its own mapping, returned to the
///   system when freed. By default glibc raises its mmap threshold to the
///   size of the largest block freed, so after the first such buffer, all
///   come from the heap arenas of whichever threads freed them and stay
///   resident: a 1 GiB upload held 90 MiB where its 8 MiB part buffers
///   were 32. (Parts are now the network's 1 MiB pieces, see
///   `upload::parts::Filling`, which the heap serves.)
/// - The threshold is 2 MiB, above a transfer's 1 MiB chunks (with their
///   block header) and quinn's copies of them, and an arena keeps up to
///   8 MiB free at its top: a fixed threshold also fixes the trim
///   threshold, at 128 KiB, and with 1 MiB (each chunk mapped and
///   unmapped, each freed buffer handed back at once) a third of a
///   server's CPU sending 1 GiB from the store went to page faults.
/// - One arena for every thread. A chunk is read on one thread and freed
///   on another (the part's store task, the hashing thread), and each
///   arena kept its own free memory: a 1 GiB put with three parts in
///   flight peaked at 71-73 MiB with glibc's default of one arena a
///   thread, 64-65 MiB with one for all, at the same server CPU (2.42
///   against 2.49 s for the put, 2.16 against 2.21 s for the get, medians
///   of 4 alternating runs; 2 cores, so few threads ever wait on its
///   lock).
pub(crate) fn tune_allocator() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only sets allocator tunables; any value is valid.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 2 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 8 << 20);
        libc::mallopt(libc::M_ARENA_MAX, 1);
    }
}

/// A holder tag for a server that was never told its own (one per process
/// run: nothing of a predecessor's is adopted).
pub(super) fn random_holder() -> String {
    format!("{:016x}", rand_u64())
}

/// Splits `s3://BUCKET[/PREFIX]`; the prefix's parts obey the rules of remote paths.
pub(super) fn parse_url(url: &str) -> Result<(String, Vec<String>), ObjectRootError> {
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

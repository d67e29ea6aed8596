//! What a test server's root holds, on either backend: placing and reading files, partial uploads and their bytes, objects and their metadata, a byte flipped on disk.
#![allow(dead_code, unreachable_pub)]

use super::*;

impl TestServer {
    /// A server over a fresh root of `backend`.
    pub async fn start_on(backend: Backend, label: &str) -> Self {
        match backend {
            Backend::Local => Self::start().await,
            Backend::Object => Self::start_object(&garage::garage().fresh_root(label), 0).await,
        }
    }

    /// The bucket and prefix of an object root, if this is one.
    fn object_root(&self) -> Option<(String, String)> {
        object_parts(&self.root)
    }

    /// The bytes stored under the remote name `name`, read from the root
    /// itself (the directory, or the bucket), not through qxfer.
    pub async fn stored(&self, name: &str) -> Vec<u8> {
        stored_at(&self.root, name)
            .await
            .unwrap_or_else(|| panic!("{name} is not stored"))
    }

    /// Everything the root holds, listed as [`tree`] lists a directory:
    /// files and directories by relative name, the partial store left out
    /// but anything in it shown. In a bucket, a directory is a name that
    /// something lies beneath (or its marker), and the digests kept for
    /// files uploaded in parts are left out as part of their files.
    pub async fn stored_tree(&self) -> Vec<String> {
        use futures::TryStreamExt;
        use object_store::ObjectStore;
        let Some((_, prefix)) = self.object_root() else {
            return tree(&self.root);
        };
        let listed: Vec<_> = garage::bucket()
            .list(Some(&object_store::path::Path::from(prefix.as_str())))
            .try_collect()
            .await
            .unwrap();
        let mut out = std::collections::BTreeSet::new();
        for o in listed {
            let rel = &o.location.as_ref()[prefix.len() + 1..];
            // Bookkeeping: digests of files, leases on names being
            // written (deleted as they end, but Garage's listings may show
            // a deleted key for a moment), start-up probes, listings'
            // indexes.
            if rel.starts_with(".qxfer-sums/")
                || rel.starts_with(".qxfer-leases/")
                || rel.starts_with(".qxfer-probe-")
                || rel.starts_with(".qxfer-index/")
            {
                continue;
            }
            let rel = rel.strip_suffix("/.qxfer-dir").unwrap_or(rel);
            // Names as qxfer reads them back: object_store percent-encodes
            // some characters of a key's parts (a backslash, a newline).
            let rel = rel
                .split('/')
                .map(|p| {
                    percent_encoding::percent_decode_str(p)
                        .decode_utf8()
                        .map_or_else(|_| p.to_owned(), |d| d.into_owned())
                })
                .collect::<Vec<_>>()
                .join("/");
            let rel = rel.as_str();
            let parts: Vec<&str> = rel.split('/').collect();
            for n in 1..parts.len() {
                if !(n == 1 && parts[0] == qxfer::paths::PARTIAL_DIR) {
                    out.insert(parts[..n].join("/"));
                }
            }
            out.insert(rel.to_owned());
        }
        out.into_iter().collect()
    }

    /// Every object beneath `dir` in an object root (bookkeeping other than
    /// directory markers left out), by name relative to `dir`: its bytes
    /// and its metadata (`x-amz-meta-` names without the prefix).
    pub async fn stored_objects(&self, dir: &str) -> Vec<(String, StoredObject)> {
        use futures::TryStreamExt;
        use object_store::{Attribute, ObjectStore, ObjectStoreExt};
        let (_, prefix) = self.object_root().expect("an object root");
        let base = format!("{prefix}/{dir}");
        let bucket = garage::bucket();
        let listed: Vec<_> = bucket
            .list(Some(&object_store::path::Path::from(base.as_str())))
            .try_collect()
            .await
            .unwrap();
        let mut out = Vec::new();
        for o in listed {
            let rel = o.location.as_ref()[base.len() + 1..].to_owned();
            let rel = percent_encoding::percent_decode_str(&rel)
                .decode_utf8()
                .unwrap()
                .into_owned();
            let got = bucket.get(&o.location).await.unwrap();
            let attributes = got
                .attributes
                .iter()
                .filter_map(|(k, v)| match k {
                    Attribute::Metadata(name) => Some((name.to_string(), v.to_string())),
                    _ => None,
                })
                .collect();
            let bytes = got.bytes().await.unwrap().to_vec();
            out.push((rel, StoredObject { bytes, attributes }));
        }
        out
    }

    /// Whether this server keeps its files in the object store.
    pub fn is_object(&self) -> bool {
        self.object_root().is_some()
    }

    /// A server over a fresh root of `backend`, its policy adjusted by `configure`.
    pub async fn start_on_with(
        backend: Backend,
        label: &str,
        configure: impl FnOnce(&mut ServeConfig),
    ) -> Self {
        Self::start_on_full(backend, label, configure, ServerLimits::default()).await
    }

    /// Like `start_on_with`, with transport limits too.
    pub async fn start_on_full(
        backend: Backend,
        label: &str,
        configure: impl FnOnce(&mut ServeConfig),
        limits: ServerLimits,
    ) -> Self {
        let dirs = tempfile::tempdir().unwrap();
        match backend {
            Backend::Local => {
                let root = dirs.path().join("root");
                Self::start_full(dirs, &root, configure, limits).await
            }
            Backend::Object => {
                let certs = dirs.path().join("certs");
                let url = garage::garage().fresh_root(label);
                Self::start_object_full(dirs, &certs, &url, 0, configure, limits).await
            }
        }
    }

    /// Puts `data` under `name` in the root from outside qxfer, as another
    /// program on the server (or another S3 client) would: a plain file, or
    /// a plain object without qxfer's metadata.
    pub async fn place(&self, name: &str, data: &[u8]) {
        place_at(&self.root, name, data).await
    }

    /// Removes the file `name` from the root, from outside qxfer.
    pub async fn remove(&self, name: &str) {
        use object_store::ObjectStoreExt;
        match self.object_root() {
            None => std::fs::remove_file(self.root.join(name)).unwrap(),
            Some((_, prefix)) => {
                let key = object_store::path::Path::from(format!("{prefix}/{name}"));
                garage::bucket().delete(&key).await.unwrap();
            }
        }
    }

    /// Bytes of uploads in progress that a resume could continue from.
    pub async fn partial_bytes(&self) -> u64 {
        partial_bytes_at(&self.root).await
    }

    /// The uploads in progress in the root's partial store, by name.
    pub async fn partials(&self) -> Vec<String> {
        // What a completed upload leaves it removes just after its answer.
        self.settled().await;
        partials_at(&self.root).await
    }

    /// Damages the (one) upload in progress so that it no longer matches
    /// the source: a flipped byte in a local partial; in an object store,
    /// where the server proves a partial from its record of the parts (it
    /// never reads them back), the first part's recorded hashes flipped.
    pub async fn corrupt_partial(&self) {
        match self.object_root() {
            None => {
                let names = self.partials().await;
                assert_eq!(names.len(), 1, "one upload in progress: {names:?}");
                let store = self.root.join(qxfer::paths::PARTIAL_DIR);
                flip_byte(&store.join(&names[0]), 1000)
            }
            Some(_) => self.flip_part_record(&["cv", "root"]).await,
        }
    }

    /// In an object store, flips the first character of each of `fields`
    /// in the first part's record of the (one) upload in progress (in a
    /// record of several parts, the first of them).
    pub async fn flip_part_record(&self, fields: &[&str]) {
        use futures::TryStreamExt;
        use object_store::{ObjectStore, ObjectStoreExt, PutPayload};
        let names = self.partials().await;
        assert_eq!(names.len(), 1, "one upload in progress: {names:?}");
        let (_, prefix) = self.object_root().expect("an object root");
        let dir = format!("{prefix}/{}/{}", qxfer::paths::PARTIAL_DIR, names[0]);
        let bucket = garage::bucket();
        let listed: Vec<_> = bucket
            .list(Some(&object_store::path::Path::from(dir.as_str())))
            .try_collect()
            .await
            .unwrap();
        let key = listed
            .into_iter()
            .map(|o| o.location)
            .find(|k| {
                k.filename()
                    .and_then(recorded_range)
                    .is_some_and(|(first, _)| first == 0)
            })
            .expect("a record of the first part");
        let body = bucket.get(&key).await.unwrap().bytes().await.unwrap();
        let mut record: serde_json::Value = serde_json::from_slice(&body).unwrap();
        let first = if record.is_array() {
            &mut record[0]
        } else {
            &mut record
        };
        for field in fields {
            let hex = first[field].as_str().expect("a recorded hash").to_owned();
            let flipped = if hex.starts_with('0') { "1" } else { "0" };
            first[field] = format!("{flipped}{}", &hex[1..]).into();
        }
        let body = serde_json::to_vec(&record).unwrap();
        bucket.put(&key, PutPayload::from(body)).await.unwrap();
    }

    /// Removes every upload in progress (aborting the object store's
    /// multipart uploads), as the sweep would once they are stale.
    pub async fn clear_partials(&self) {
        use futures::TryStreamExt;
        use object_store::multipart::MultipartStore;
        use object_store::{ObjectStore, ObjectStoreExt};
        let Some((_, prefix)) = self.object_root() else {
            let store = self.root.join(qxfer::paths::PARTIAL_DIR);
            for name in self.partials().await {
                std::fs::remove_file(store.join(name)).unwrap();
            }
            return;
        };
        let bucket = garage::bucket();
        for name in self.partials().await {
            let dir = format!("{prefix}/{}/{name}", qxfer::paths::PARTIAL_DIR);
            if let Some(header) = upload_header(&dir).await {
                let key = object_store::path::Path::from(header["key"].as_str().unwrap());
                let id = header["upload_id"].as_str().unwrap().to_owned();
                bucket.abort_multipart(&key, &id).await.unwrap();
            }
            let keys: Vec<_> = bucket
                .list(Some(&object_store::path::Path::from(dir.as_str())))
                .map_ok(|o| o.location)
                .try_collect()
                .await
                .unwrap();
            for key in keys {
                bucket.delete(&key).await.unwrap();
            }
        }
    }
}

/// The bucket prefix of an `s3://BUCKET/PREFIX` root, if `root` is one.
pub(crate) fn object_prefix(root: &Path) -> Option<String> {
    object_parts(root).map(|(_, prefix)| prefix)
}

/// The bucket and prefix of an `s3://BUCKET/PREFIX` root, if `root` is one.
pub(crate) fn object_parts(root: &Path) -> Option<(String, String)> {
    let rest = root.to_str()?.strip_prefix("s3://")?;
    let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
    Some((bucket.to_owned(), prefix.to_owned()))
}

/// Runs a finished command line off the async threads (a server under
/// test may live on them) and returns what it printed and how it exited.
pub async fn output(mut cmd: Command) -> std::process::Output {
    tokio::task::spawn_blocking(move || cmd.output().unwrap())
        .await
        .unwrap()
}

/// Puts `data` under `name` in `root` (a directory or an s3:// root) from
/// outside qxfer.
pub async fn place_at(root: &Path, name: &str, data: &[u8]) {
    use object_store::{ObjectStoreExt, PutPayload};
    match object_prefix(root) {
        None => {
            let path = root.join(name);
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            std::fs::write(path, data).unwrap();
        }
        Some(prefix) => {
            let key = object_store::path::Path::from(format!("{prefix}/{name}"));
            garage::bucket()
                .put(&key, PutPayload::from(data.to_vec()))
                .await
                .unwrap();
        }
    }
}

/// The bytes under `name` in `root` (a directory or an s3:// root), read
/// from the root itself; `None` if there is no such file.
pub async fn stored_at(root: &Path, name: &str) -> Option<Vec<u8>> {
    use object_store::ObjectStoreExt;
    match object_prefix(root) {
        None => std::fs::read(root.join(name)).ok(),
        Some(prefix) => {
            let key = object_store::path::Path::from(format!("{prefix}/{name}"));
            match garage::bucket().get(&key).await {
                Ok(got) => Some(got.bytes().await.unwrap().to_vec()),
                Err(object_store::Error::NotFound { .. }) => None,
                Err(e) => panic!("reading {key}: {e}"),
            }
        }
    }
}

/// The uploads in progress in the partial store of `root`, by name: files
/// in a local root's partial store; records in an object store's.
pub async fn partials_at(root: &Path) -> Vec<String> {
    use futures::TryStreamExt;
    use object_store::ObjectStore;
    let mut names: Vec<String> = match object_prefix(root) {
        None => std::fs::read_dir(root.join(qxfer::paths::PARTIAL_DIR))
            .map(|d| {
                d.flatten()
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .collect()
            })
            .unwrap_or_default(),
        Some(prefix) => {
            let dir = format!("{prefix}/{}", qxfer::paths::PARTIAL_DIR);
            let listed: Vec<_> = garage::bucket()
                .list(Some(&object_store::path::Path::from(dir.as_str())))
                .try_collect()
                .await
                .unwrap();
            let mut names: Vec<String> = listed
                .iter()
                .filter_map(|o| {
                    let rel = &o.location.as_ref()[dir.len() + 1..];
                    rel.split_once('/').map(|(name, _)| name.to_owned())
                })
                .collect();
            names.dedup();
            names
        }
    };
    names.sort();
    names.dedup();
    names
}

/// What an object store upload's record header says (key, upload_id,
/// size, part_size), if the record under `dir` has one.
async fn upload_header(dir: &str) -> Option<serde_json::Value> {
    use object_store::ObjectStoreExt;
    let key = object_store::path::Path::from(format!("{dir}/upload"));
    match garage::bucket().get(&key).await {
        Ok(got) => Some(serde_json::from_slice(&got.bytes().await.unwrap()).unwrap()),
        Err(object_store::Error::NotFound { .. }) => None,
        Err(e) => panic!("reading {key}: {e}"),
    }
}

/// Bytes of uploads in progress in `root` that a resume could continue
/// from: the partial files of a local root; the stored parts of an object
/// store's multipart uploads (whole parts only: what a server holds in
/// memory of a part not yet stored is lost with it).
pub async fn partial_bytes_at(root: &Path) -> u64 {
    use futures::TryStreamExt;
    use object_store::ObjectStore;
    let Some(prefix) = object_prefix(root) else {
        let store = root.join(qxfer::paths::PARTIAL_DIR);
        return partials_at(root)
            .await
            .iter()
            .filter(|n| n.starts_with("part-"))
            .map(|n| std::fs::metadata(store.join(n)).map_or(0, |m| m.len()))
            .sum();
    };
    let mut total = 0;
    for name in partials_at(root).await {
        let dir = format!("{prefix}/{}/{name}", qxfer::paths::PARTIAL_DIR);
        let Some(header) = upload_header(&dir).await else {
            continue;
        };
        let listed: Vec<_> = garage::bucket()
            .list(Some(&object_store::path::Path::from(dir.as_str())))
            .try_collect()
            .await
            .unwrap();
        let parts: usize = listed
            .iter()
            .filter_map(|o| o.location.filename().and_then(recorded_range))
            .map(|(first, last)| last - first + 1)
            .sum();
        let parts = parts as u64;
        let size = header["size"].as_u64().unwrap();
        total += (parts * header["part_size"].as_u64().unwrap()).min(size);
    }
    total
}

/// Flips one byte of the file at `path`, at `at`.
pub fn flip_byte(path: &Path, at: u64) {
    use std::os::unix::fs::FileExt;
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .unwrap();
    let mut b = [0u8];
    f.read_exact_at(&mut b, at).unwrap();
    f.write_all_at(&[b[0] ^ 0x55], at).unwrap();
}

/// One object as the bucket holds it.
pub struct StoredObject {
    pub bytes: Vec<u8>,
    pub attributes: std::collections::HashMap<String, String>,
}

/// The parts an object-store upload's record object holds, by its name:
/// `part-N` one, `part-A-B` those from A to B (a server records the parts
/// it stored in the last second together).
pub fn recorded_range(name: &str) -> Option<(usize, usize)> {
    let numbers = name.strip_prefix("part-")?;
    match numbers.split_once('-') {
        None => numbers.parse().ok().map(|n| (n, n)),
        Some((a, b)) => Some((a.parse().ok()?, b.parse().ok()?)),
    }
}

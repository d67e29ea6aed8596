//! Reading a file from the object store: its metadata and digest, the proof of a resuming client's prefix, a ranged read of the rest, and ranged reads for a delta.

use crate::files::{self, ByteSource, ByteStream};
use async_trait::async_trait;
use blake3::hazmat::HasherExt;
use futures::{StreamExt, TryStreamExt};
use object_store::path::Path as Key;
use object_store::{GetOptions, GetRange, ObjectStore, ObjectStoreExt};
use serde::{Deserialize, Serialize};

use crate::paths::RemotePath;
use crate::protocol::{Digest, ErrorCode, Prefix, RemoteError};
use crate::store::tree_hash::{self, Piece};
use crate::store::Opened;

use super::{file_meta, is_not_found, store_error, stored_digest, Inner, SUMS_DIR};

/// What `.qxfer-sums/PATH` holds for a file uploaded in parts.
#[derive(Debug, Serialize, Deserialize)]
pub(super) struct Sums {
    /// The ETag of the object these sums describe.
    pub(super) etag: String,
    pub(super) size: u64,
    /// BLAKE3 of the whole file.
    #[serde(with = "hex32")]
    pub(super) digest: Digest,
    pub(super) part_size: u64,
    /// The chaining value of each part, in order.
    #[serde(with = "hex32_vec")]
    pub(super) parts: Vec<Digest>,
    /// The first part's own BLAKE3.
    #[serde(with = "hex32")]
    pub(super) first_root: Digest,
}

impl Sums {
    /// The pieces of the first `n` parts.
    fn pieces(&self, n: usize) -> Vec<Piece> {
        self.parts[..n]
            .iter()
            .enumerate()
            .map(|(i, cv)| Piece {
                offset: i as u64 * self.part_size,
                len: self.part_size.min(self.size - i as u64 * self.part_size),
                cv: *cv,
            })
            .collect()
    }
}

/// The key of a file's sums.
pub(super) fn sums_key(inner: &Inner, path: &RemotePath) -> Key {
    let mut parts = vec![SUMS_DIR];
    parts.extend(path.components().iter().map(String::as_str));
    inner.key_of(&parts)
}

/// The sums of the object `path` as it is now (its ETag), if there are any.
pub(super) async fn sums_of(inner: &Inner, path: &RemotePath, etag: Option<&str>) -> Option<Sums> {
    let etag = etag?;
    let slot = inner.slot().await;
    let body = match inner.s3.get(&sums_key(inner, path)).await {
        Ok(r) => r.bytes().await.ok()?,
        Err(_) => return None,
    };
    drop(slot);
    let sums: Sums = serde_json::from_slice(&body).ok()?;
    let parts_needed = sums.size.div_ceil(sums.part_size.max(1)) as usize;
    let sane = sums.etag == etag
        && sums.part_size.is_power_of_two()
        && sums.part_size >= 1024
        && sums.parts.len() == parts_needed;
    sane.then_some(sums)
}

/// Opens `path` for sending and agrees where sending starts.
pub(super) async fn open(
    inner: &Inner,
    path: &RemotePath,
    resume: Option<Prefix>,
) -> Result<Opened, RemoteError> {
    let key = inner.key(path);
    let failed = |e| store_error(e, path, "cannot open");
    // A small file in one request: its bytes with its metadata (a HEAD
    // and then a GET were two, and a tree of small files waits on the
    // store for each).
    let (head, held) = match small_whole(inner, &key).await {
        Ok(Some((head, body))) => (Some(head), Some(body)),
        Ok(None) => (None, None),
        // Any other answer is asked again the plain way.
        Err(_) => {
            let head = inner.head(&key).await.map_err(failed)?;
            (
                head.map(|h| Head {
                    meta: h.meta,
                    attributes: h.attributes,
                }),
                None,
            )
        }
    };
    let Some(head) = head else {
        let is_dir = inner.has_children(&key).await.map_err(failed)?;
        return Err(if is_dir {
            RemoteError::new(
                ErrorCode::IsDirectory,
                format!("'{path}' is a directory on the server; use `qxfer get -r {path}` to download it and its contents"),
            )
        } else {
            RemoteError::new(
                ErrorCode::NotFound,
                format!("cannot open '{path}' on the server: no such file; check the name with `qxfer ls`"),
            )
        });
    };
    let meta = file_meta(&head.meta, &head.attributes);
    let size = meta.size;
    let etag = head.meta.e_tag.clone();
    let sums = match stored_digest(&head.attributes) {
        Some(_) => None,
        None => sums_of(inner, path, etag.as_deref()).await,
    };
    let digest = stored_digest(&head.attributes).or(sums.as_ref().map(|s| s.digest));
    let reading = Reading {
        inner,
        key: &key,
        etag: etag.as_deref(),
        path,
    };
    // Where to start, and the hash so far when the digest must be computed.
    let (offset, hasher) = match resume {
        Some(p) if p.offset > 0 && p.offset <= size => {
            match reading.prove(p, size, digest, sums.as_ref()).await? {
                Proof::Matches(hasher) => (p.offset, hasher.map(|h| *h)),
                Proof::Differs => (0, None),
            }
        }
        _ => (0, None),
    };
    let hasher = match (digest, hasher) {
        (Some(_), _) => None,
        (None, Some(h)) => Some(h),
        (None, None) => Some(blake3::Hasher::new()),
    };
    let bytes: Box<dyn ByteSource> = match held {
        Some(Body::Whole(held)) if held.len() as u64 == size => Box::new(HeldBytes(held)),
        held => Box::new(ObjectBytes {
            s3: inner.s3.clone(),
            key,
            etag,
            size,
            whole: std::sync::Mutex::new(match held {
                Some(Body::Coming(body)) => Some(body),
                _ => None,
            }),
        }),
    };
    Ok(Opened {
        meta,
        offset,
        hasher,
        digest,
        bytes,
    })
}

/// The largest object [`open`] reads whole with its metadata.
const FIRST_BYTES: u64 = 64 << 10;

/// What [`open`] needs of an object's HEAD.
struct Head {
    meta: object_store::ObjectMeta,
    attributes: object_store::Attributes,
}

/// An object's body as [`small_whole`] left it.
enum Body {
    /// All of it.
    Whole(bytes::Bytes),
    /// A larger object's, still coming, for the send from its start.
    Coming(ByteStream),
}

/// The object's metadata and its body, read whole if it is at most
/// [`FIRST_BYTES`] long, in one request; `None` if there is no such
/// object.
///
/// A plain GET, not one ranged over the first [`FIRST_BYTES`] as before:
/// Garage answers a ranged GET of a 4 KiB object in 4.3 ms against 3.2 ms
/// for a plain one, and 2,000 of them, 64 at once, took 1.69 s against
/// 1.58 s (measured 2026-12-05). An empty object, which no range fits,
/// no longer needs a second request either. A larger object's body is
/// kept coming for the send, which reads it from the start unless it
/// resumes; if unused it is dropped, and with it the connection it came on.
async fn small_whole(inner: &Inner, key: &Key) -> object_store::Result<Option<(Head, Body)>> {
    let slot = inner.slot().await;
    let got = match inner.s3.get_opts(key, GetOptions::default()).await {
        Ok(got) => got,
        Err(e) if is_not_found(&e) => return Ok(None),
        Err(e) => return Err(e),
    };
    let head = Head {
        meta: got.meta.clone(),
        attributes: got.attributes.clone(),
    };
    let mut body = got.into_stream();
    if head.meta.size > FIRST_BYTES {
        // A streaming read holds no slot (see MAX_REQUESTS).
        drop(slot);
        let body = body.map_err(std::io::Error::other).boxed();
        return Ok(Some((head, Body::Coming(body))));
    }
    // The size is the store's word; the body is read with a bound of its
    // own all the same.
    let mut pieces = Vec::new();
    let mut len = 0;
    while let Some(piece) = body.try_next().await? {
        len += piece.len() as u64;
        if len > FIRST_BYTES {
            return Err(object_store::Error::Generic {
                store: "S3",
                source: format!(
                    "the store sent more than the {} bytes it said the object has",
                    head.meta.size
                )
                .into(),
            });
        }
        pieces.push(piece);
    }
    let bytes = match pieces.len() {
        1 => pieces.pop().expect("one"),
        _ => pieces.concat().into(),
    };
    drop(slot);
    Ok(Some((head, Body::Whole(bytes))))
}

/// A small object's bytes, read whole at open.
struct HeldBytes(bytes::Bytes);

#[async_trait]
impl ByteSource for HeldBytes {
    async fn range(&self, from: u64, to: u64) -> std::io::Result<ByteStream> {
        let len = self.0.len() as u64;
        if from > to || to > len {
            return Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                "past the end of the object",
            ));
        }
        let part = self.0.slice(from as usize..to as usize);
        Ok(futures::stream::iter([Ok(part)]).boxed())
    }
}

/// Bytes of a ranged read hashed at a time.
const HASH_BATCH: usize = 4 << 20;

/// What a resuming client's prefix proved.
enum Proof {
    /// The object starts with the same bytes (and, where the digest is not
    /// stored, the hash of those bytes to continue from).
    Matches(Option<Box<blake3::Hasher>>),
    /// It does not: start over.
    Differs,
}

/// One object being read, pinned to its ETag.
struct Reading<'a> {
    inner: &'a Inner,
    key: &'a Key,
    etag: Option<&'a str>,
    path: &'a RemotePath,
}

impl Reading<'_> {
    /// Checks the client's prefix against the object, reading as little of
    /// it as the stored digests allow: nothing when the client holds the
    /// whole file, at most one part when the file was uploaded in parts,
    /// and the prefix itself otherwise.
    async fn prove(
        &self,
        prefix: Prefix,
        size: u64,
        digest: Option<Digest>,
        sums: Option<&Sums>,
    ) -> Result<Proof, RemoteError> {
        let k = prefix.offset;
        let verdict = |ours: Digest| {
            if ours == prefix.digest {
                Proof::Matches(None)
            } else {
                Proof::Differs
            }
        };
        if let (Some(d), true) = (digest, k == size) {
            return Ok(verdict(d));
        }
        if let Some(sums) = sums {
            let whole = (k / sums.part_size) as usize;
            let mut pieces = sums.pieces(whole);
            let tail_at = whole as u64 * sums.part_size;
            let mut first_root = (whole > 0).then_some(sums.first_root);
            if k > tail_at {
                let mut hasher = blake3::Hasher::new();
                if tail_at > 0 {
                    hasher.set_input_offset(tail_at);
                }
                let hasher = self.hash_range(tail_at, k, hasher).await?;
                let piece = Piece {
                    offset: tail_at,
                    len: k - tail_at,
                    cv: hasher.finalize_non_root(),
                };
                pieces.push(piece);
                first_root = first_root.or((tail_at == 0).then(|| *hasher.finalize().as_bytes()));
            }
            return Ok(match tree_hash::digest(&pieces, first_root) {
                Some(ours) => verdict(ours),
                None => Proof::Differs,
            });
        }
        let hasher = self.hash_range(0, k, blake3::Hasher::new()).await?;
        Ok(if *hasher.finalize().as_bytes() == prefix.digest {
            Proof::Matches(Some(Box::new(hasher)))
        } else {
            Proof::Differs
        })
    }

    /// Feeds the bytes `from..to` of the object (if it is still the version
    /// opened) to `hasher` as they arrive: a few MiB in memory at a time,
    /// however long the range (a finished download asked again proves the
    /// whole file). Like a download's read, it takes no request slot for
    /// the time the bytes take to come.
    async fn hash_range(
        &self,
        from: u64,
        to: u64,
        mut hasher: blake3::Hasher,
    ) -> Result<blake3::Hasher, RemoteError> {
        let failed = |e| store_error(e, self.path, "cannot read");
        let opts = GetOptions {
            range: Some(GetRange::Bounded(from..to)),
            if_match: self.etag.map(str::to_owned),
            ..GetOptions::default()
        };
        let got = self
            .inner
            .s3
            .get_opts(self.key, opts)
            .await
            .map_err(failed)?;
        let mut chunks = got.into_stream();
        let mut batch = Vec::new();
        let (mut batched, mut seen) = (0usize, 0u64);
        loop {
            let next = chunks.try_next().await.map_err(failed)?;
            if let Some(chunk) = &next {
                seen += chunk.len() as u64;
                if seen > to - from {
                    break;
                }
                batched += chunk.len();
            }
            let end = next.is_none();
            if let Some(chunk) = next {
                batch.push(chunk);
            }
            // Hashing is CPU work: off the async threads, a batch at a time.
            if batched >= HASH_BATCH || (end && batched > 0) {
                let chunks = std::mem::take(&mut batch);
                hasher = files::blocking(move || {
                    for c in &chunks {
                        hasher.update(c);
                    }
                    hasher
                })
                .await;
                batched = 0;
            }
            if end {
                break;
            }
        }
        if seen != to - from {
            return Err(RemoteError::new(
                ErrorCode::Internal,
                format!("cannot read '{}' on the server: the object store returned {seen} bytes or more instead of {}; try again", self.path, to - from),
            ));
        }
        Ok(hasher)
    }
}

/// An object's bytes: ranged reads pinned to the ETag it was opened with,
/// so a replaced object fails the read rather than mixing versions. A
/// read takes no request slot (see `MAX_REQUESTS`): it lasts as long as
/// the client takes to receive it.
struct ObjectBytes {
    s3: std::sync::Arc<dyn super::Bucket>,
    key: Key,
    etag: Option<String>,
    size: u64,
    /// The whole object's body from the GET that opened it, if it is
    /// still to be read (see [`small_whole`]).
    whole: std::sync::Mutex<Option<ByteStream>>,
}

#[async_trait]
impl ByteSource for ObjectBytes {
    async fn range(&self, from: u64, to: u64) -> std::io::Result<ByteStream> {
        if from >= to {
            return Ok(futures::stream::empty().boxed());
        }
        let whole = self.whole.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let (Some(body), true) = (whole, from == 0 && to == self.size) {
            return Ok(body);
        }
        let opts = GetOptions {
            range: Some(GetRange::Bounded(from..to)),
            if_match: self.etag.clone(),
            ..GetOptions::default()
        };
        let got = self.s3.get_opts(&self.key, opts).await.map_err(|e| {
            if is_not_found(&e) {
                std::io::Error::new(std::io::ErrorKind::NotFound, "the object is gone")
            } else {
                std::io::Error::other(e)
            }
        })?;
        Ok(got.into_stream().map_err(std::io::Error::other).boxed())
    }
}

/// Serde for a digest as hex.
pub(super) mod hex32 {
    use serde::{Deserialize, Deserializer, Serializer};

    pub(crate) fn serialize<S: Serializer>(d: &[u8; 32], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&blake3::Hash::from_bytes(*d).to_hex())
    }

    pub(crate) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<[u8; 32], D::Error> {
        let s = String::deserialize(d)?;
        blake3::Hash::from_hex(s)
            .map(|h| *h.as_bytes())
            .map_err(serde::de::Error::custom)
    }
}

/// Serde for a list of digests as hex.
pub(super) mod hex32_vec {
    use serde::{Deserialize, Deserializer, Serializer};

    pub(crate) fn serialize<S: Serializer>(v: &[[u8; 32]], s: S) -> Result<S::Ok, S::Error> {
        s.collect_seq(
            v.iter()
                .map(|d| blake3::Hash::from_bytes(*d).to_hex().to_string()),
        )
    }

    pub(crate) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<[u8; 32]>, D::Error> {
        Vec::<String>::deserialize(d)?
            .into_iter()
            .map(|s| {
                blake3::Hash::from_hex(s)
                    .map(|h| *h.as_bytes())
                    .map_err(serde::de::Error::custom)
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::Ordering;
    use std::sync::Arc;

    use futures::TryStreamExt;
    use object_store::{ObjectStoreExt, PutPayload};

    use super::super::counted::Counted;
    use super::super::ObjectRoot;
    use super::FIRST_BYTES;
    use crate::paths::RemotePath;
    use crate::protocol::Prefix;
    use crate::store::Store;

    async fn stored(counted: &Arc<Counted>, name: &str, data: &[u8]) -> RemotePath {
        let key = object_store::path::Path::from(format!("r/{name}"));
        counted
            .store
            .put(&key, PutPayload::from(data.to_vec()))
            .await
            .unwrap();
        RemotePath::parse(name, false).unwrap()
    }

    async fn all(opened: &crate::store::Opened, from: u64) -> Vec<u8> {
        let chunks: Vec<bytes::Bytes> = opened
            .bytes
            .range(from, opened.meta.size)
            .await
            .unwrap()
            .try_collect()
            .await
            .unwrap();
        chunks.concat()
    }

    /// Opening a file and sending it from its start costs one GET, small,
    /// empty or large: the small one's bytes come with its metadata (no
    /// range, which Garage answers more slowly), the empty one needs no
    /// HEAD, and the large one's body is the one the send reads. A resume
    /// reads from where it starts, in a request of its own.
    #[tokio::test]
    async fn a_file_sent_from_its_start_costs_the_get_that_opened_it() {
        let counted = Arc::new(Counted::default());
        let root = ObjectRoot::over(counted.clone(), vec!["r".to_owned()], 1 << 30);
        let large: Vec<u8> = (0..FIRST_BYTES as usize * 3 + 17)
            .map(|i| (i % 251) as u8)
            .collect();
        for (name, data) in [
            ("small", b"four".to_vec()),
            ("empty", Vec::new()),
            ("edge", vec![7u8; FIRST_BYTES as usize]),
            ("large", large.clone()),
        ] {
            let path = stored(&counted, name, &data).await;
            let (reads, heads) = (
                counted.file_reads.load(Ordering::Relaxed),
                counted.heads.load(Ordering::Relaxed),
            );
            let opened = root.open(&path, None).await.unwrap();
            assert_eq!(opened.meta.size, data.len() as u64, "{name}");
            assert_eq!(all(&opened, 0).await, data, "{name}");
            assert_eq!(
                counted.file_reads.load(Ordering::Relaxed) - reads,
                1,
                "{name}: one GET"
            );
            assert_eq!(
                counted.heads.load(Ordering::Relaxed),
                heads,
                "{name}: no HEAD"
            );
        }

        // A resume past the first half: the prefix is proved, and the rest
        // read by a ranged GET (the opening body is not used).
        let path = RemotePath::parse("large", false).unwrap();
        let half = large.len() as u64 / 2;
        let prefix = Prefix {
            offset: half,
            digest: *blake3::hash(&large[..half as usize]).as_bytes(),
        };
        let opened = root.open(&path, Some(prefix)).await.unwrap();
        assert_eq!(opened.offset, half);
        assert_eq!(all(&opened, half).await, &large[half as usize..]);
    }
}

//! Per-directory indexes of what listings learned (`.qxfer-index/DIR/.qxfer-entries`): a file's mtime and mode, which S3 listings do not carry, kept beside the ETag, size and time the listing showed, so that a later listing costs its LIST requests and one read per directory instead of one HEAD per file.
//!
//! A listing of an object root gets names, sizes, ETags and store times
//! from LIST (1,000 keys a request), but a file's mtime and mode live in
//! its own metadata, which only a HEAD (or GET) returns. Without an index
//! `ls -r` of 10,000 files is 10 LISTs and 10,000 HEADs.
//!
//! An index entry is only a cache: it is used for a listed object only if
//! the listing shows the same size, the same ETag and the same store time
//! (to the millisecond where the store gives them) as when the entry was
//! made. Any write of the object, by qxfer or any other tool, gives it a
//! new store time, so a replaced file is looked up again rather than shown
//! with stale metadata; what the listing does not show any more is not
//! shown. Objects listed without an ETag are always looked up.
//!
//! Listings write the indexes: after looking up files its directory's
//! index did not cover, a listing stores the directory's index anew with
//! every entry it now knows. A small file's commit stays one PUT; what a
//! directory lease's uploads wrote is added to the directory's index when
//! the lease is given up ([`record`]); the first listing after files
//! written otherwise pays their HEADs once. A tree's listing reads the
//! indexes beneath it while its LIST runs ([`Early`]). Two servers that
//! write one index at once: the later write wins, both are made of checked
//! entries, and what the other learned is looked up again next time.
//! Removing a directory removes its indexes; an index whose directory
//! another tool removed stays behind, unused (a few bytes an entry).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;

use futures::future::{BoxFuture, FutureExt, Shared};
use futures::stream::{self, StreamExt, TryStreamExt};
use object_store::path::Path as Key;
use object_store::{ObjectMeta, ObjectStoreExt, PutPayload};
use serde::{Deserialize, Serialize};
use tracing::warn;

use crate::protocol::Timestamp;

use super::*;

/// Where the indexes live, beneath the root's prefix.
pub(super) const INDEX_DIR: &str = ".qxfer-index";

/// The name of a directory's index object inside its index directory
/// (reserved: no user's name can be it, so `a/.qxfer-entries` and the
/// index of a directory `a/x` never meet).
const INDEX_LEAF: &str = ".qxfer-entries";

/// The most entries one index keeps: files of a larger directory beyond
/// it are looked up every time. Bounds what a listing reads and holds for
/// one directory (about 200 bytes an entry).
const MAX_ENTRIES: usize = 20_000;

/// The largest index a listing reads; a larger object there (not one a
/// server wrote) is ignored and replaced.
const MAX_INDEX_BYTES: u64 = 8 << 20;

/// One file as a listing saw it, and its metadata.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct Seen {
    size: u64,
    etag: String,
    /// The store's time of the object, in milliseconds since the epoch.
    stored_ms: i64,
    mtime: Option<Timestamp>,
    mode: Option<u32>,
}

/// What `.qxfer-index/DIR/.qxfer-entries` holds: a directory's files by name.
#[derive(Debug, Default, Serialize, Deserialize)]
struct Index {
    files: BTreeMap<String, Seen>,
}

/// The key of the index of the directory `dir` (its names beneath the prefix).
fn index_key(inner: &Inner, dir: &[String]) -> Key {
    let mut parts: Vec<&str> = vec![INDEX_DIR];
    parts.extend(dir.iter().map(String::as_str));
    parts.push(INDEX_LEAF);
    inner.key_of(&parts)
}

/// The key everything the indexes hold for `dir` and beneath starts with.
pub(super) fn index_dir(inner: &Inner, dir: &[String]) -> Key {
    let mut parts: Vec<&str> = vec![INDEX_DIR];
    parts.extend(dir.iter().map(String::as_str));
    inner.key_of(&parts)
}

fn stored_ms(object: &ObjectMeta) -> i64 {
    object.last_modified.timestamp_millis()
}

impl Seen {
    /// Whether this entry describes `object` as listed now.
    fn describes(&self, object: &ObjectMeta) -> bool {
        object.e_tag.as_deref() == Some(self.etag.as_str())
            && object.size == self.size
            && stored_ms(object) == self.stored_ms
    }
}

/// Reads a directory's index; a missing, oversized or unreadable one is empty.
async fn read_index(inner: &Inner, dir: &[String]) -> object_store::Result<Index> {
    let key = index_key(inner, dir);
    let _slot = inner.lookup_slot().await;
    let got = match inner.s3.get(&key).await {
        Ok(got) => got,
        Err(e) if is_not_found(&e) => return Ok(Index::default()),
        Err(e) => return Err(e),
    };
    if got.meta.size > MAX_INDEX_BYTES {
        warn!(key = %key, "ignoring an index of {} bytes (at most {MAX_INDEX_BYTES} are read)", got.meta.size);
        return Ok(Index::default());
    }
    let body = got.bytes().await?;
    Ok(serde_json::from_slice(&body).unwrap_or_default())
}

/// Stores a directory's index.
async fn write_index(inner: &Inner, dir: &[String], index: &Index) -> object_store::Result<()> {
    let body = serde_json::to_vec(index).expect("an index serializes");
    let _slot = inner.slot().await;
    inner
        .s3
        .put(&index_key(inner, dir), PutPayload::from(body))
        .await
        .map(|_| ())
}

/// The indexes beneath a tree, read as its listing starts, while the
/// LIST's pages come: a directory's index was read once the LIST had gone
/// past the directory, so the last page's directories were read after the
/// LIST ended (2,000 files in 20 directories: 50-90 ms after a LIST of
/// 90-220 ms, on the 3-node Garage cluster, 2026-12-05). One more LIST,
/// of the tree's index keys, tells which directories have one at all; a
/// directory without one costs no read.
///
/// At most [`EARLY_INDEXES`] indexes of at most [`EARLY_BYTES`] in all are
/// read early; a tree with more reads them as before. An index written
/// after that LIST (another server's listing stored it) is missed: its
/// directory's files are looked up as if it had none, as happens when two
/// listings meet (see the module's doc).
#[derive(Clone)]
pub(super) struct Early(Shared<BoxFuture<'static, Arc<EarlyIndexes>>>);

/// What [`Early`] read.
#[derive(Default)]
pub(super) struct EarlyIndexes {
    /// Indexes read, by directory, until a listing takes them.
    read: std::sync::Mutex<HashMap<Vec<String>, Index>>,
    /// Every directory beneath the tree that has an index, if all were
    /// listed.
    listed: Option<HashSet<Vec<String>>>,
}

/// Most indexes one listing reads before its directories are listed.
const EARLY_INDEXES: usize = 256;

/// Most bytes of indexes one listing holds before its directories are
/// listed.
const EARLY_BYTES: u64 = 16 << 20;

impl Early {
    /// Nothing read early: every directory's index is read when it is
    /// listed.
    pub(super) fn none() -> Self {
        Self(
            futures::future::ready(Arc::new(EarlyIndexes::default()))
                .boxed()
                .shared(),
        )
    }

    /// Starts reading the indexes beneath the directory `tree` (its names).
    pub(super) fn start(inner: &Arc<Inner>, tree: &[&str]) -> Self {
        let inner = inner.clone();
        let tree: Vec<String> = tree.iter().map(|s| (*s).to_owned()).collect();
        Self(
            async move { Arc::new(read_early(&inner, &tree).await) }
                .boxed()
                .shared(),
        )
    }

    /// Reads what is read early; the listing polls it beside its LIST.
    pub(super) async fn run(&self) {
        self.0.clone().await;
    }

    /// The index of `dir`: read early, known to be missing, or read now.
    async fn index_of(&self, inner: &Inner, dir: &[String]) -> object_store::Result<Index> {
        let early = self.0.clone().await;
        let taken = early
            .read
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(dir);
        match taken {
            Some(index) => Ok(index),
            None if early.listed.as_ref().is_some_and(|l| !l.contains(dir)) => Ok(Index::default()),
            None => read_index(inner, dir).await,
        }
    }
}

/// Lists the indexes beneath `tree` and reads them, within [`EARLY_INDEXES`]
/// and [`EARLY_BYTES`]; what fails is left to be read when its directory
/// is listed.
async fn read_early(inner: &Inner, tree: &[String]) -> EarlyIndexes {
    let mut found: Vec<(Vec<String>, u64)> = Vec::new();
    let mut all_listed = true;
    {
        let _slot = inner.lookup_slot().await;
        let mut keys = inner.s3.list(Some(&index_dir(inner, tree)));
        loop {
            match keys.try_next().await {
                Ok(Some(object)) => {
                    let mut names = inner.names_of(&object.location);
                    if names.len() < 2 || names.pop().as_deref() != Some(INDEX_LEAF) {
                        continue;
                    }
                    names.remove(0);
                    if found.len() == EARLY_INDEXES {
                        // Too many to hold: each is read as its directory is.
                        return EarlyIndexes::default();
                    }
                    found.push((names, object.size));
                }
                Ok(None) => break,
                Err(e) => {
                    tracing::debug!("cannot list the indexes of a tree being listed: {e}");
                    all_listed = false;
                    break;
                }
            }
        }
    }
    let listed = all_listed.then(|| found.iter().map(|(d, _)| d.clone()).collect());
    let mut budget = EARLY_BYTES;
    let wanted: Vec<Vec<String>> = found
        .into_iter()
        .filter(|(_, size)| {
            let fits = *size <= MAX_INDEX_BYTES && *size <= budget;
            if fits {
                budget -= size;
            }
            fits
        })
        .map(|(dir, _)| dir)
        .collect();
    let read: HashMap<Vec<String>, Index> = stream::iter(wanted)
        .map(|dir| async move {
            let index = read_index(inner, &dir).await;
            (dir, index)
        })
        .buffer_unordered(LIST_CONCURRENCY)
        .filter_map(|(dir, index)| async move { index.ok().map(|i| (dir, i)) })
        .collect()
        .await;
    EarlyIndexes {
        read: std::sync::Mutex::new(read),
        listed,
    }
}

/// One listed object: its name in the listing and its object.
pub(super) struct Listed {
    pub(super) name: String,
    pub(super) object: ObjectMeta,
}

/// A listed object with the mtime and mode qxfer stored with it (none if
/// it has none).
pub(super) struct Described {
    pub(super) name: String,
    pub(super) object: ObjectMeta,
    pub(super) mtime: Option<Timestamp>,
    pub(super) mode: Option<u32>,
}

/// The mtimes and modes of listed objects: from their directories' indexes
/// where those describe them, else from a HEAD each (after which the
/// directory's index is stored anew). An object gone by its HEAD is left
/// out, as a listing a moment later would.
pub(super) async fn describe(
    inner: &Arc<Inner>,
    listed: Vec<Listed>,
    early: &Early,
) -> object_store::Result<Vec<Described>> {
    // By directory (the object's key without its last part).
    let mut by_dir: HashMap<Vec<String>, Vec<Listed>> = HashMap::new();
    for f in listed {
        let mut names = inner.names_of(&f.object.location);
        names.pop();
        by_dir.entry(names).or_default().push(f);
    }
    let lookups = by_dir.into_iter().map(|(dir, files)| {
        let (inner, early) = (inner.clone(), early.clone());
        async move { describe_dir(&inner, dir, files, &early).await }
    });
    let per_dir: Vec<Vec<Described>> = stream::iter(lookups)
        .buffer_unordered(LIST_CONCURRENCY)
        .try_collect()
        .await?;
    Ok(per_dir.into_iter().flatten().collect())
}

/// A file a directory lease wrote: its name in the directory, the ETag its
/// PUT was answered with, and its metadata.
#[derive(Debug, Clone)]
pub(super) struct Wrote {
    pub(super) leaf: String,
    pub(super) etag: String,
    pub(super) size: u64,
    pub(super) mtime: Option<Timestamp>,
    pub(super) mode: Option<u32>,
}

/// Adds what a directory lease wrote to its directory's index, so that the
/// next listing need not look those files up: one listing of the directory
/// (for the store times, which a PUT's answer lacks), one read and one
/// write of the index. Called while the lease is still held, so no other
/// server wrote the names meanwhile; a name listed with another ETag than
/// its PUT's (another program wrote it since) is left to be looked up.
pub(super) async fn record(
    inner: &Inner,
    dir: &[String],
    wrote: Vec<Wrote>,
) -> object_store::Result<()> {
    if wrote.is_empty() {
        return Ok(());
    }
    let parts: Vec<&str> = dir.iter().map(String::as_str).collect();
    let key = inner.key_of(&parts);
    let listed = {
        let _slot = inner.slot().await;
        inner.s3.list_with_delimiter(Some(&key)).await?
    };
    let mut index = read_index(inner, dir).await?;
    let listed: HashMap<String, &ObjectMeta> = listed
        .objects
        .iter()
        .filter_map(|o| Some((o.location.filename().map(decoded)?, o)))
        .collect();
    // Entries that no longer describe what is listed go.
    index
        .files
        .retain(|leaf, k| listed.get(leaf).is_some_and(|o| k.describes(o)));
    for w in wrote {
        let Some(object) = listed.get(&w.leaf) else {
            continue;
        };
        if object.e_tag.as_deref() != Some(w.etag.as_str()) || object.size != w.size {
            continue;
        }
        if index.files.len() >= MAX_ENTRIES && !index.files.contains_key(&w.leaf) {
            continue;
        }
        index.files.insert(
            w.leaf,
            Seen {
                size: w.size,
                etag: w.etag,
                stored_ms: stored_ms(object),
                mtime: w.mtime,
                mode: w.mode,
            },
        );
    }
    write_index(inner, dir, &index).await
}

/// [`describe`] for the objects of one directory.
async fn describe_dir(
    inner: &Arc<Inner>,
    dir: Vec<String>,
    listed: Vec<Listed>,
    early: &Early,
) -> object_store::Result<Vec<Described>> {
    let index = early.index_of(inner, &dir).await?;
    let mut out = Vec::with_capacity(listed.len());
    let mut fresh = Index::default();
    let mut missing = Vec::new();
    for f in listed {
        let leaf = f
            .object
            .location
            .filename()
            .map(decoded)
            .unwrap_or_default();
        match index.files.get(&leaf) {
            Some(k) if k.describes(&f.object) => {
                out.push(Described {
                    name: f.name,
                    object: f.object,
                    mtime: k.mtime,
                    mode: k.mode,
                });
                fresh.files.insert(leaf, k.clone());
            }
            _ => missing.push((leaf, f)),
        }
    }
    if missing.is_empty() {
        return Ok(out);
    }
    let lookups = missing.into_iter().map(|(leaf, f)| {
        let inner = inner.clone();
        async move {
            let head = inner.head_listed(&f.object.location).await?;
            Ok::<_, object_store::Error>(head.map(|h| (leaf, f, h)))
        }
    });
    let found: Vec<_> = stream::iter(lookups)
        .buffered(LIST_CONCURRENCY)
        .try_filter_map(|h| async move { Ok(h) })
        .try_collect()
        .await?;
    // The index anew: what it still described, and what was just looked up
    // as the listing showed it (if the HEAD found that same object).
    for (leaf, f, h) in found {
        let (mtime, mode) = times_and_mode(&h.attributes);
        let same_object = h.meta.e_tag.is_some()
            && h.meta.e_tag == f.object.e_tag
            && h.meta.size == f.object.size;
        if let (true, Some(etag)) = (same_object, f.object.e_tag.clone()) {
            if fresh.files.len() < MAX_ENTRIES {
                fresh.files.insert(
                    leaf,
                    Seen {
                        size: f.object.size,
                        etag,
                        stored_ms: stored_ms(&f.object),
                        mtime,
                        mode,
                    },
                );
            }
        }
        out.push(Described {
            name: f.name,
            object: h.meta,
            mtime,
            mode,
        });
    }
    if let Err(e) = write_index(inner, &dir, &fresh).await {
        // The listing itself is right; the next one looks these up again.
        warn!("cannot store the index of a listed directory: {e}");
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::Ordering;

    use object_store::PutOptions;

    use super::super::counted::Counted;
    use super::*;
    use crate::paths::RemotePath;
    use crate::protocol::{DirMeta, EntryKind, FileMeta};
    use crate::store::Store;

    fn path(s: &str) -> RemotePath {
        RemotePath::parse(s, false).unwrap()
    }

    fn meta(size: u64, secs: i64, mode: u32) -> FileMeta {
        FileMeta {
            size,
            mtime: Some(Timestamp { secs, nanos: 5 }),
            mode: Some(mode),
        }
    }

    /// Stores `data` at `name` with qxfer's metadata, as an upload does.
    async fn put(root: &ObjectRoot, name: &str, data: &[u8], m: FileMeta, _force: bool) {
        let mut attributes = Attributes::new();
        put_times_and_mode(&mut attributes, m.mtime, m.mode);
        let opts = PutOptions {
            attributes,
            ..PutOptions::default()
        };
        root.inner
            .s3
            .put_opts(
                &root.inner.key(&path(name)),
                PutPayload::from(data.to_vec()),
                opts,
            )
            .await
            .unwrap();
    }

    fn counts(c: &Counted) -> (u64, u64) {
        (
            c.heads.load(Ordering::Relaxed),
            c.lists.load(Ordering::Relaxed),
        )
    }

    #[tokio::test]
    async fn a_second_listing_takes_metadata_from_the_index_and_a_changed_file_is_looked_up() {
        let counted = Arc::new(Counted::default());
        let root = ObjectRoot::over(counted.clone(), vec!["r".to_owned()], 1 << 30);
        for i in 0..30 {
            let dir = if i % 3 == 0 { "t/a" } else { "t/b/c" };
            put(
                &root,
                &format!("{dir}/f{i}"),
                b"x",
                meta(1, 1000 + i, 0o640),
                false,
            )
            .await;
        }
        for (dir, mode) in [("t/b", 0o750), ("t/a", 0o700)] {
            // t/a's marker lies beside files: one index holds both.
            let meta = DirMeta {
                mode: Some(mode),
                mtime: None,
            };
            root.mkdir(&path(dir), Some(meta)).await.unwrap();
        }
        let index_reads = || counted.index_reads.load(Ordering::Relaxed);
        let first = root.list(&path("t"), true).await.unwrap();
        // No index yet, and the early LIST of the indexes says so: none is
        // read.
        assert_eq!(index_reads(), 0);
        let before = counts(&counted);
        let second = root.list(&path("t"), true).await.unwrap();
        let (heads, lists) = counts(&counted);
        assert_eq!(first, second, "the same listing, from the indexes");
        // One HEAD of the name itself (is "t" a file?); no HEAD per file or
        // marker; the LIST of the tree and the LIST of its indexes.
        assert_eq!((heads - before.0, lists - before.1), (1, 2));
        // Those of t/a, t/b (its marker) and t/b/c, each once.
        assert_eq!(index_reads(), 3);
        let f7 = second.iter().find(|e| e.name == "b/c/f7").unwrap();
        assert_eq!(
            (f7.mtime, f7.mode),
            (
                Some(Timestamp {
                    secs: 1007,
                    nanos: 5
                }),
                Some(0o640)
            )
        );
        let b = second.iter().find(|e| e.name == "b").unwrap();
        assert_eq!((b.kind, b.mode), (EntryKind::Dir, Some(0o750)));

        // A file replaced (same size, other mtime and mode) is looked up
        // again, not shown as the index knew it; a removed one is gone.
        tokio::time::sleep(Duration::from_millis(5)).await;
        put(&root, "t/b/c/f7", b"y", meta(1, 99, 0o600), true).await;
        root.remove(&path("t/a/f3"), false).await.unwrap();
        let before = counts(&counted);
        let third = root.list(&path("t"), true).await.unwrap();
        let f7 = third.iter().find(|e| e.name == "b/c/f7").unwrap();
        assert_eq!(
            (f7.mtime, f7.mode),
            (Some(Timestamp { secs: 99, nanos: 5 }), Some(0o600))
        );
        assert!(!third.iter().any(|e| e.name == "a/f3"));
        assert_eq!(counts(&counted).0 - before.0, 2, "the name's HEAD and f7's");
        let before = counts(&counted);
        assert_eq!(root.list(&path("t"), true).await.unwrap(), third);
        assert_eq!(counts(&counted).0 - before.0, 1, "f7 is in the index again");

        // One level: the same indexes serve its files.
        let before = counts(&counted);
        let level = root.list(&path("t/b/c"), false).await.unwrap();
        assert_eq!(level.len(), 20);
        assert_eq!(counts(&counted).0 - before.0, 1);

        // Removing the tree removes its indexes.
        root.remove(&path("t"), true).await.unwrap();
        let left: Vec<ObjectMeta> = counted
            .store
            .list(Some(&index_dir(&root.inner, &["t".to_owned()])))
            .try_collect()
            .await
            .unwrap();
        assert!(left.is_empty(), "{left:?}");
    }

    /// A tree listing describes each directory as soon as the LIST is past
    /// it: a directory whose files lie on both sides of a subdirectory's
    /// keys ("p/a", "p/q/x", "p/q0", "p/z"), or beside a name that sorts
    /// just before its "/" ("p/q.txt"), is still described as one, so its
    /// index holds every file and the next listing looks none up.
    #[tokio::test]
    async fn a_directory_split_by_its_subdirectories_keys_is_indexed_whole() {
        let counted = Arc::new(Counted::default());
        let root = ObjectRoot::over(counted.clone(), vec!["r".to_owned()], 1 << 30);
        let names = [
            "t/p/a",
            "t/p/q.txt",
            "t/p/q/x",
            "t/p/q/r/y",
            "t/p/q/s",
            "t/p/q0",
            "t/p/z",
            "t/top",
        ];
        for (i, name) in names.iter().enumerate() {
            put(&root, name, b"x", meta(1, 500 + i as i64, 0o644), false).await;
        }
        let marker = DirMeta {
            mode: Some(0o711),
            mtime: None,
        };
        root.mkdir(&path("t/p/q"), Some(marker)).await.unwrap();
        let first = root.list(&path("t"), true).await.unwrap();
        let files: Vec<&str> = first
            .iter()
            .filter(|e| e.kind == EntryKind::File)
            .map(|e| e.name.as_str())
            .collect();
        assert_eq!(files.len(), names.len(), "{first:?}");
        let q = first.iter().find(|e| e.name == "p/q").unwrap();
        assert_eq!((q.kind, q.mode), (EntryKind::Dir, Some(0o711)));
        let before = counts(&counted);
        let second = root.list(&path("t"), true).await.unwrap();
        assert_eq!(first, second);
        assert_eq!(
            counts(&counted).0 - before.0,
            1,
            "the name's own HEAD only: every file came from an index"
        );
    }

    #[tokio::test]
    async fn a_listed_object_that_an_index_does_not_describe_is_looked_up() {
        let counted = Arc::new(Counted::default());
        let root = ObjectRoot::over(counted.clone(), vec!["r".to_owned()], 1 << 30);
        put(&root, "d/f", b"abc", meta(3, 5, 0o644), false).await;
        // An index entry that lies (another ETag): not used.
        let mut index = Index::default();
        index.files.insert(
            "f".to_owned(),
            Seen {
                size: 3,
                etag: "not-this".to_owned(),
                stored_ms: 0,
                mtime: Some(Timestamp { secs: 1, nanos: 0 }),
                mode: Some(0o777),
            },
        );
        write_index(&root.inner, &["d".to_owned()], &index)
            .await
            .unwrap();
        let listed = root.list(&path("d"), false).await.unwrap();
        assert_eq!(
            (listed[0].mtime.unwrap().secs, listed[0].mode),
            (5, Some(0o644))
        );
        // Nor one too large to read.
        let key = index_key(&root.inner, &["d".to_owned()]);
        let big = vec![b' '; MAX_INDEX_BYTES as usize + 1];
        counted
            .store
            .put(&key, PutPayload::from(big))
            .await
            .unwrap();
        let listed = root.list(&path("d"), false).await.unwrap();
        assert_eq!(listed[0].mode, Some(0o644));
    }
}

//! Listings of an object root: one directory by delimiter, a whole tree, and the metadata of directories and files.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::SystemTime;

use futures::stream::{self, StreamExt, TryStreamExt};
use object_store::path::Path as Key;
use object_store::{Attributes, ObjectMeta, ObjectStore};

use crate::files::to_timestamp;
use crate::paths::{RemotePath, RESERVED_PREFIX};
use crate::protocol::{DirMeta, Entry, EntryKind, RemoteError, Timestamp};

use super::*;

/// One level of a directory: its files (with their metadata, one HEAD
/// each, since listings carry none) and subdirectories.
pub(super) async fn list_dir(
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
///
/// The files' metadata comes from their directories' indexes (index.rs),
/// and each directory's is looked up as soon as the LIST has gone past it,
/// while the next pages of the LIST still come: keys come in order, so a
/// directory's objects (its files and its marker) all lie before the first
/// key outside it. A tree of 2,000 files in 20 directories took 160 ms to
/// LIST and then 60-100 ms to read the indexes one after the other; the
/// indexes beneath the tree are now read as the LIST starts
/// ([`index::Early`]).
pub(super) async fn list_tree(
    inner: &Arc<Inner>,
    dir: &Key,
    parts: &[&str],
    path: &RemotePath,
) -> Result<Vec<Entry>, RemoteError> {
    let failed = |e| store_error(e, path, "cannot list");
    let depth = inner.prefix.len() + parts.len();
    let started = std::time::Instant::now();
    // Directories whose objects are all listed, with those objects: files
    // and markers go together, since a directory's index holds both (two
    // goes would each store it with only their own).
    let (complete, described) = futures::channel::mpsc::unbounded::<Vec<index::Listed>>();
    let early = index::Early::start(inner, parts);
    let describing = described
        .map(|listed| index::describe(inner, listed, &early))
        .buffer_unordered(LIST_CONCURRENCY)
        .try_concat();
    let listing = async move {
        let mut n_files = 0;
        // Each directory, and whether it has a marker.
        let mut dirs: BTreeMap<String, bool> = BTreeMap::new();
        let mut name_bytes = 0;
        // The objects of the directories the listing may not be past yet
        // (those the last key lies in), by the key of each directory.
        let mut open: Vec<(String, Vec<index::Listed>)> = Vec::new();
        let slot = inner.slot().await;
        let mut listing = inner.s3.list(Some(dir));
        while let Some(object) = listing.try_next().await.map_err(failed)? {
            let key = object.location.as_ref();
            // The directories this key is not inside are complete.
            while open.last().is_some_and(|(d, _)| {
                !(key.starts_with(d.as_str()) && key[d.len()..].starts_with('/'))
            }) {
                let (_, listed) = open.pop().expect("just seen");
                let _ = complete.unbounded_send(listed);
            }
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
            let name = if last == DIR_MARKER {
                if above.is_empty() {
                    continue;
                }
                dirs.insert(above.join("/"), true);
                above.join("/")
            } else if last.starts_with(RESERVED_PREFIX) {
                continue;
            } else {
                let name = rel.join("/");
                name_bytes += name.len();
                n_files += 1;
                name
            };
            if n_files + dirs.len() > MAX_TREE_ENTRIES || name_bytes > MAX_TREE_NAME_BYTES {
                return Err(tree_too_large(path));
            }
            let parent = key.rsplit_once('/').map_or("", |(p, _)| p);
            if open.last().is_none_or(|(d, _)| d != parent) {
                open.push((parent.to_owned(), Vec::new()));
            }
            let group = &mut open.last_mut().expect("just pushed").1;
            group.push(index::Listed { name, object });
        }
        drop((listing, slot));
        let listed_in = started.elapsed();
        for (_, listed) in open {
            let _ = complete.unbounded_send(listed);
        }
        Ok((n_files, dirs, listed_in))
    };
    // The describing ends once the listing, and with it `complete`, has.
    // The early reads run beside the listing (a shared future runs only
    // while one of its holders polls it).
    let (listed, described, ()) = tokio::join!(listing, describing, early.run());
    let (n_files, dirs, listed_in) = listed?;
    let described = described.map_err(failed)?;
    tracing::debug!(?listed_in, took = ?started.elapsed(), files = n_files, "tree listed");
    let mut out = Vec::with_capacity(n_files + dirs.len());
    let mut metas: BTreeMap<String, DirMeta> = BTreeMap::new();
    for d in described {
        if d.object.location.filename() == Some(DIR_MARKER) {
            let meta = DirMeta {
                mode: d.mode,
                mtime: d.mtime,
            };
            metas.insert(d.name, meta);
        } else {
            out.push(described_file(d.name, &d.object, d.mtime, d.mode));
        }
    }
    for d in dirs.keys() {
        let meta = metas.remove(d);
        out.push(dir_entry(d.clone(), meta));
    }
    Ok(out)
}

/// The metadata of each directory in `dirs` (each given by its parts), in
/// order, [`LIST_CONCURRENCY`] lookups at a time.
pub(super) async fn dir_metas(
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

/// Entries for listed objects, with their mtimes and modes from their
/// directories' indexes, or a HEAD each where those do not describe them
/// (see index.rs).
pub(super) async fn file_entries(
    inner: &Arc<Inner>,
    files: Vec<(String, ObjectMeta)>,
    path: &RemotePath,
) -> Result<Vec<Entry>, RemoteError> {
    let listed = files
        .into_iter()
        .map(|(name, object)| index::Listed { name, object })
        .collect();
    let described = index::describe(inner, listed, &index::Early::none())
        .await
        .map_err(|e| store_error(e, path, "cannot list"))?;
    Ok(described
        .into_iter()
        .map(|d| described_file(d.name, &d.object, d.mtime, d.mode))
        .collect())
}

pub(super) fn file_entry(name: String, object: &ObjectMeta, attributes: &Attributes) -> Entry {
    let (mtime, mode) = times_and_mode(attributes);
    described_file(name, object, mtime, mode)
}

/// A file's entry from its object and the mtime and mode stored with it
/// (without an mtime, the time the object was written).
fn described_file(
    name: String,
    object: &ObjectMeta,
    mtime: Option<Timestamp>,
    mode: Option<u32>,
) -> Entry {
    Entry {
        name,
        kind: EntryKind::File,
        size: object.size,
        mtime: mtime.or_else(|| to_timestamp(SystemTime::from(object.last_modified))),
        mode,
    }
}

pub(super) fn dir_entry(name: String, meta: Option<DirMeta>) -> Entry {
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
pub(super) fn decoded(listed: &str) -> String {
    percent_encoding::percent_decode_str(listed)
        .decode_utf8()
        .map_or_else(|_| listed.to_owned(), |s| s.into_owned())
}

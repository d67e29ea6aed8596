//! Removing and renaming in the object store: a file is its object (and its sums), a directory every key beneath its prefix, its marker included.
//!
//! S3 has no rename: a rename copies every object to its new key (metadata
//! kept), then deletes the old keys, only once every copy succeeded. An
//! interrupted rename of a directory therefore leaves both names with
//! everything under the old one, never a file lost; running it again
//! reports that the new name exists. A single CopyObject takes at most
//! 5 GiB on AWS S3; a larger file there cannot be renamed this way.

use futures::stream::{self, StreamExt, TryStreamExt};
use object_store::path::Path as Key;
use object_store::ObjectStoreExt;

use crate::paths::RemotePath;
use crate::protocol::{ErrorCode, RemoteError};
use crate::store::{not_empty, rename_target_exists};

use std::sync::Arc;

use super::index::index_dir;
use super::leases::Leases;
use super::read::sums_key;
use super::{not_a_directory, store_error, Inner, DIR_MARKER, SUMS_DIR};

/// Objects a rename copies at once.
const COPIES_AT_ONCE: usize = 16;

/// The sums kept for the files beneath the directory `path`.
fn sums_dir(inner: &Inner, path: &RemotePath) -> Key {
    let mut parts = vec![SUMS_DIR];
    parts.extend(path.components().iter().map(String::as_str));
    inner.key_of(&parts)
}

fn not_found(path: &RemotePath, doing: &str) -> RemoteError {
    RemoteError::new(
        ErrorCode::NotFound,
        format!("{doing} '{path}' on the server: no such file or directory; check the name with `qxfer ls`"),
    )
}

/// Removes the file `path`, or the directory `path` (with `recursive`,
/// and everything in it).
pub(super) async fn remove(
    inner: &Inner,
    path: &RemotePath,
    recursive: bool,
) -> Result<(), RemoteError> {
    let failed = |e| store_error(e, path, "cannot remove");
    let key = inner.key(path);
    if inner.head(&key).await.map_err(failed)?.is_some() {
        inner.delete_if_there(&key).await.map_err(failed)?;
        // Without its object the sums describe nothing (and a later object
        // of this name has another ETag, so they would never be used).
        inner
            .delete_if_there(&sums_key(inner, path))
            .await
            .map_err(failed)?;
        return Ok(());
    }
    let keys = inner.keys_under(&key).await.map_err(failed)?;
    if keys.is_empty() {
        return Err(not_found(path, "cannot remove"));
    }
    let mut marker = path.components().to_vec();
    marker.push(DIR_MARKER.to_owned());
    let marker = inner.key_of(&marker.iter().map(String::as_str).collect::<Vec<_>>());
    if !recursive && keys.iter().any(|k| *k != marker) {
        return Err(not_empty(path));
    }
    // The marker last: until then the directory still lists, even if
    // some deletes fail and the user has to run the remove again.
    let files: Vec<Key> = keys.into_iter().filter(|k| *k != marker).collect();
    inner.delete_all(files).await.map_err(failed)?;
    inner
        .delete_under(&sums_dir(inner, path))
        .await
        .map_err(failed)?;
    inner
        .delete_under(&index_dir(inner, path.components()))
        .await
        .map_err(failed)?;
    inner.delete_if_there(&marker).await.map_err(failed)?;
    Ok(())
}

/// Renames the file or directory `from` to `to`.
///
/// Every name it moves is leased, under both names (see leases.rs), and
/// no lease may be held beneath either name meanwhile: an upload to a name
/// under `to` cannot be overwritten by a copy, nor one to a name under
/// `from` (`--force`) deleted after its old version was copied. Uploads of
/// such names wait (as busy) until the rename is done.
pub(super) async fn rename(
    inner: &Arc<Inner>,
    from: &RemotePath,
    to: &RemotePath,
) -> Result<(), RemoteError> {
    let failed = |e| store_error(e, from, "cannot rename");
    let failed_to = |e| store_error(e, to, "cannot rename to");
    let (from_key, to_key) = (inner.key(from), inner.key(to));
    let moves: Vec<(Key, Key)> = if inner.head(&from_key).await.map_err(failed)?.is_some() {
        vec![(from_key.clone(), to_key.clone())]
    } else {
        let keys = inner.keys_under(&from_key).await.map_err(failed)?;
        if keys.is_empty() {
            return Err(not_found(from, "cannot rename"));
        }
        let depth = from_key.parts().count();
        keys.into_iter()
            .map(|k| {
                let rest: Vec<_> = k.parts().skip(depth).collect();
                let new = Key::from_iter(to_key.parts().chain(rest));
                (k, new)
            })
            .collect()
    };
    // Both names are leased: nothing beneath either is written meanwhile.
    let names = vec![from.components().to_vec(), to.components().to_vec()];
    let leases = Leases::take_all(inner, names, from).await?;
    // The new name: free, and its directory there (the root, or a name
    // something lies beneath, not a file).
    let (taken, has_children, file_above) = futures::try_join!(
        inner.head(&to_key),
        inner.has_children(&to_key),
        inner.file_on_the_way(to),
    )
    .map_err(failed_to)?;
    if taken.is_some() || has_children {
        return Err(rename_target_exists(from, to));
    }
    if file_above {
        return Err(not_a_directory(to));
    }
    if let Some(parent) = to
        .components()
        .split_last()
        .map(|(_, p)| p)
        .filter(|p| !p.is_empty())
    {
        let parts: Vec<&str> = parent.iter().map(String::as_str).collect();
        if !inner
            .has_children(&inner.key_of(&parts))
            .await
            .map_err(failed_to)?
        {
            return Err(RemoteError::new(
                ErrorCode::NotFound,
                format!("cannot rename '{from}' to '{to}': the directory '{}' does not exist on the server; create it with `qxfer mkdir -p`", parent.join("/")),
            ));
        }
    }
    // Copies go COPIES_AT_ONCE at a time (each takes a store slot): a
    // directory of 2,000 files took 2,000 copies in a row.
    stream::iter(moves.clone())
        .map(|(old, new)| async move {
            let _slot = inner.slot().await;
            inner.s3.copy(&old, &new).await
        })
        .buffer_unordered(COPIES_AT_ONCE)
        .try_collect::<Vec<()>>()
        .await
        .map_err(|e| {
            let e = store_error(e, from, "cannot rename");
            RemoteError::new(
                e.code,
                format!("{}. '{from}' is untouched; a partial copy may be under '{to}': remove it with `qxfer rm -r {to}` before trying again", e.message),
            )
        })?;
    leases.check(from)?;
    let olds = moves.into_iter().map(|(old, _)| old).collect();
    inner.delete_all(olds).await.map_err(|e| {
        let e = store_error(e, from, "cannot remove the old name after renaming");
        RemoteError::new(
            e.code,
            format!(
                "{}. Everything is under '{to}' now; finish with `qxfer rm -r {from}`",
                e.message
            ),
        )
    })?;
    // The sums describe objects by ETag, which a copy may change: drop
    // them (gets of these files hash as they send instead).
    inner
        .delete_if_there(&sums_key(inner, from))
        .await
        .map_err(failed)?;
    inner
        .delete_under(&sums_dir(inner, from))
        .await
        .map_err(failed)?;
    // And the listings' indexes of what was under the old name (those of
    // the new one are made by its first listing).
    inner
        .delete_under(&index_dir(inner, from.components()))
        .await
        .map_err(failed)?;
    inner.forget_no_file(&to.to_string());
    leases.release();
    Ok(())
}

//! Listing a local root: one directory, or a whole tree (bounded), symlinks and special files listed as such and never followed.

use std::io;

use cap_fs_ext::DirExt;
use cap_std::fs::Dir;

use crate::exchange::to_timestamp;
use crate::paths::{RemotePath, RESERVED_PREFIX};
use crate::protocol::{Entry, EntryKind, RemoteError};

use super::fs_error;
use crate::store::{tree_too_large, MAX_TREE_ENTRIES, MAX_TREE_NAME_BYTES};

/// Lists the directory `path` names (with `recursive`, everything beneath
/// it, names relative to it), or the single entry if it is not a directory.
/// qxfer's own names are hidden; symlinks and special files are listed as
/// such and never followed.
pub(super) fn list(
    root: &Dir,
    path: &RemotePath,
    recursive: bool,
) -> Result<Vec<Entry>, RemoteError> {
    let listing = |e: io::Error| fs_error(&e, path, "cannot list");
    let rel = path.relative();
    // Resolve (following links only while they stay inside the root) to see
    // what the name is; a link out of the root fails here.
    if !root.metadata(&rel).map_err(listing)?.is_dir() {
        let md = root.symlink_metadata(&rel).map_err(listing)?;
        let name = path.file_name().unwrap_or_default().to_owned();
        return Ok(vec![entry(name, &md)]);
    }
    let dir = root.open_dir(&rel).map_err(listing)?;
    let mut out = if recursive {
        walk_tree(dir, path)?
    } else {
        visible_entries(&dir, path)?
            .into_iter()
            .map(|(name, md)| entry(name, &md))
            .collect()
    };
    out.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(out)
}

/// Everything beneath `dir`, depth first, names relative to it.
fn walk_tree(dir: Dir, path: &RemotePath) -> Result<Vec<Entry>, RemoteError> {
    let mut out = Vec::new();
    let mut name_bytes = 0;
    // (directory handle, its path relative to the listed one, its path for messages)
    let mut stack = vec![(dir, String::new(), path.clone())];
    while let Some((dir, prefix, shown)) = stack.pop() {
        // One that cannot be read fails the listing: a `get -r` must not
        // report success with a subtree silently missing.
        for (name, md) in visible_entries(&dir, &shown)? {
            let full = if prefix.is_empty() {
                name.clone()
            } else {
                format!("{prefix}/{name}")
            };
            if md.is_dir() {
                let joined = match path.to_string() {
                    p if p.is_empty() => full.clone(),
                    p => format!("{p}/{full}"),
                };
                let sub = RemotePath::parse(&joined, false).unwrap_or_else(|_| path.clone());
                // open_dir_nofollow: a directory swapped for a link since
                // the lstat is refused, not followed. One deleted meanwhile
                // is simply gone.
                match dir.open_dir_nofollow(&name) {
                    Ok(handle) => stack.push((handle, full.clone(), sub)),
                    Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                    Err(e) => return Err(fs_error(&e, &sub, "cannot list")),
                }
            }
            name_bytes += full.len();
            out.push(entry(full, &md));
            if out.len() > MAX_TREE_ENTRIES || name_bytes > MAX_TREE_NAME_BYTES {
                return Err(tree_too_large(path));
            }
        }
    }
    Ok(out)
}

/// The entries of `dir` with their lstat metadata, qxfer's own names
/// hidden. An entry removed between readdir and lstat is simply skipped.
fn visible_entries(
    dir: &Dir,
    path: &RemotePath,
) -> Result<Vec<(String, cap_std::fs::Metadata)>, RemoteError> {
    let listing = |e: io::Error| fs_error(&e, path, "cannot list");
    let mut out = Vec::new();
    for item in dir.entries().map_err(listing)? {
        let item = item.map_err(listing)?;
        let name = item.file_name().to_string_lossy().into_owned();
        if name.starts_with(RESERVED_PREFIX) {
            continue;
        }
        match dir.symlink_metadata(item.file_name()) {
            Ok(md) => out.push((name, md)),
            // Deleted since the directory was read: not part of the listing.
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(listing(e)),
        }
    }
    Ok(out)
}

fn entry(name: String, md: &cap_std::fs::Metadata) -> Entry {
    let ft = md.file_type();
    let kind = if ft.is_symlink() {
        EntryKind::Symlink
    } else if ft.is_dir() {
        EntryKind::Dir
    } else if ft.is_file() {
        EntryKind::File
    } else {
        EntryKind::Other
    };
    Entry {
        name,
        kind,
        mode: Some(cap_std::fs::PermissionsExt::mode(&md.permissions()) & 0o7777),
        size: md.len(),
        mtime: md.modified().ok().and_then(|t| to_timestamp(t.into_std())),
    }
}

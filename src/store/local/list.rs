//! Listing a local root: one directory, or a whole tree (bounded), symlinks and special files listed as such and never followed.

use std::io;

use cap_fs_ext::DirExt;
use cap_std::fs::Dir;

use crate::files::to_timestamp;
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

/// Directory handles a tree listing keeps open at most: those of the
/// directories along the path being walked, the deepest ones. A handle per
/// directory still to walk (as this once kept) ran a tree of more
/// directories than the descriptor limit out of descriptors, failing the
/// listing and every other request of the server meanwhile.
const MAX_OPEN: usize = 16;

/// One directory on the path being walked.
struct Frame {
    /// Its handle, unless it was closed to stay within [`MAX_OPEN`].
    dir: Option<Dir>,
    /// Its name in its parent (empty for the listed directory).
    name: std::ffi::OsString,
    /// Its device and inode, to reopen it by name and know it is the same.
    id: (u64, u64),
    /// Its path for messages.
    shown: RemotePath,
    /// Its subdirectories not walked yet, last first.
    subdirs: Vec<(std::ffi::OsString, String)>,
}

/// Everything beneath `dir`, depth first, names relative to it.
fn walk_tree(dir: Dir, path: &RemotePath) -> Result<Vec<Entry>, RemoteError> {
    let mut out = Vec::new();
    let mut name_bytes = 0;
    let top_id = dir_id(&dir).map_err(|e| fs_error(&e, path, "cannot list"))?;
    let mut stack = Vec::new();
    enter(
        &mut stack,
        dir,
        std::ffi::OsString::new(),
        top_id,
        String::new(),
        path.clone(),
        path,
        &mut out,
        &mut name_bytes,
    )?;
    while let Some(top) = stack.last_mut() {
        let Some((name, full)) = top.subdirs.pop() else {
            stack.pop();
            continue;
        };
        let parent = reopened(&mut stack)?;
        let sub = sub_path(path, &full);
        // open_dir_nofollow: a directory swapped for a link since the
        // lstat is refused, not followed. One deleted meanwhile is gone.
        let handle = match parent.open_dir_nofollow(&name) {
            Ok(handle) => handle,
            Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
            Err(e) => return Err(fs_error(&e, &sub, "cannot list")),
        };
        let id = dir_id(&handle).map_err(|e| fs_error(&e, &sub, "cannot list"))?;
        enter(
            &mut stack,
            handle,
            name,
            id,
            full,
            sub,
            path,
            &mut out,
            &mut name_bytes,
        )?;
    }
    Ok(out)
}

/// Lists the directory `dir` into `out` and pushes it on the walk's stack,
/// closing the handle of the directory [`MAX_OPEN`] levels up.
#[allow(clippy::too_many_arguments)]
fn enter(
    stack: &mut Vec<Frame>,
    dir: Dir,
    name: std::ffi::OsString,
    id: (u64, u64),
    prefix: String,
    shown: RemotePath,
    path: &RemotePath,
    out: &mut Vec<Entry>,
    name_bytes: &mut usize,
) -> Result<(), RemoteError> {
    let mut subdirs = Vec::new();
    // One that cannot be read fails the listing: a `get -r` must not
    // report success with a subtree silently missing.
    for (entry_name, md) in visible_entries(&dir, &shown)? {
        let full = if prefix.is_empty() {
            entry_name.clone()
        } else {
            format!("{prefix}/{entry_name}")
        };
        if md.is_dir() {
            subdirs.push((local_name(&entry_name), full.clone()));
        }
        *name_bytes += full.len();
        out.push(entry(full, &md));
        if out.len() > MAX_TREE_ENTRIES || *name_bytes > MAX_TREE_NAME_BYTES {
            return Err(tree_too_large(path));
        }
    }
    subdirs.reverse();
    stack.push(Frame {
        dir: Some(dir),
        name,
        id,
        shown,
        subdirs,
    });
    // The listed directory's own handle stays: every other can be
    // reopened from it.
    if stack.len() > MAX_OPEN + 1 {
        let far = stack.len() - MAX_OPEN - 1;
        stack[far].dir = None;
    }
    Ok(())
}

/// The handle of the deepest directory on the stack, reopened by name from
/// the nearest one still open if it was closed (each step without
/// following links, and checked to be the very directory listed before).
fn reopened(stack: &mut [Frame]) -> Result<&Dir, RemoteError> {
    let last = stack.len() - 1;
    if stack[last].dir.is_none() {
        let open = stack
            .iter()
            .rposition(|f| f.dir.is_some())
            .expect("the listed directory's handle stays open");
        for i in open + 1..=last {
            let (above, below) = stack.split_at_mut(i);
            let frame = &mut below[0];
            let parent = above[i - 1].dir.as_ref().expect("opened on the way down");
            let moved = || {
                fs_error(
                    &io::Error::other("it was moved or replaced while being listed; list it again"),
                    &frame.shown,
                    "cannot list",
                )
            };
            let dir = parent
                .open_dir_nofollow(&frame.name)
                .map_err(|e| fs_error(&e, &frame.shown, "cannot list"))?;
            if dir_id(&dir).map_err(|e| fs_error(&e, &frame.shown, "cannot list"))? != frame.id {
                return Err(moved());
            }
            frame.dir = Some(dir);
        }
        // Stay within the bound: the reopened ones replace those above.
        let keep_from = (last + 1).saturating_sub(MAX_OPEN);
        for f in stack.iter_mut().take(keep_from).skip(1) {
            f.dir = None;
        }
    }
    Ok(stack[last].dir.as_ref().expect("just reopened"))
}

/// A directory's device and inode.
fn dir_id(dir: &Dir) -> io::Result<(u64, u64)> {
    use cap_std::fs::MetadataExt;
    let md = dir.dir_metadata()?;
    Ok((md.dev(), md.ino()))
}

/// The path of `full` (relative to the listed `path`) for messages.
fn sub_path(path: &RemotePath, full: &str) -> RemotePath {
    let joined = match path.wire() {
        p if p.is_empty() => full.to_owned(),
        p => format!("{p}/{full}"),
    };
    RemotePath::parse(&joined, false).unwrap_or_else(|_| path.clone())
}

/// The local name (bytes) of a name [`visible_entries`] gave.
fn local_name(wire: &str) -> std::ffi::OsString {
    crate::paths::name_from_wire(wire).expect("names listed here are wire forms of local names")
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
        // Any name is listed, in its wire form (bytes that are not UTF-8
        // escaped: paths.rs), never skipped or mangled.
        let name = crate::paths::name_to_wire(&item.file_name());
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

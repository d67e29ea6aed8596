//! What --delete removes: the files and directories on the receiving side that the sending tree does not have (filters apply to both).

use std::path::{Path, PathBuf};

use crate::client::{Client, FileError, Filter};
use crate::paths::join_remote;
use crate::protocol::EntryKind;

use super::*;

/// What `--delete` removes at the destination of a tree transfer: every
/// name beneath a transferred directory that the source does not have,
/// except what `filter` excludes and what the walk skipped (links, special
/// files: protected, as with rsync's --delete). A directory is listed once,
/// without its contents.
#[derive(Debug, Default)]
pub(crate) struct Extras {
    /// Remote paths, with whether each is a directory.
    pub(crate) paths: Vec<(String, bool)>,
    /// The directories among them, to leave out what lies beneath.
    dirs: std::collections::HashSet<String>,
}

impl Extras {
    /// Keeps `path` unless a directory already listed contains it (paths
    /// come sorted, so a directory comes before its contents).
    fn push(&mut self, path: String, is_dir: bool) {
        let mut above = path.as_str();
        while let Some((parent, _)) = above.rsplit_once('/') {
            if self.dirs.contains(parent) {
                return;
            }
            above = parent;
        }
        if is_dir {
            self.dirs.insert(path.clone());
        }
        self.paths.push((path, is_dir));
    }
}

/// What the server holds beneath the uploaded trees that `tree` does not.
pub(crate) async fn remote_extras(
    client: &Client,
    tree: &Tree,
    filter: &Filter,
) -> Result<Extras, FileError> {
    let keep: std::collections::HashSet<&str> = tree
        .jobs
        .iter()
        .map(|j| j.remote.as_str())
        .chain(tree.dirs.iter().map(|d| d.remote.as_str()))
        .chain(tree.protected_remote.iter().map(String::as_str))
        .collect();
    let mut extras = Extras::default();
    for top in tree.dirs.iter().filter(|d| d.depth == 0) {
        let top_name = top.remote.rsplit('/').next().unwrap_or(&top.remote);
        let mut listed = match client.list_tree(&top.remote).await {
            Ok(listed) => listed,
            // Not on the server yet (a dry run before the first upload).
            Err(FileError::Remote(e)) if e.code == crate::protocol::ErrorCode::NotFound => continue,
            Err(e) => return Err(e),
        };
        // A file where the tree goes lists as itself: nothing beneath it.
        if let [only] = listed.as_slice() {
            if only.kind != EntryKind::Dir && only.name == top_name {
                continue;
            }
        }
        listed.sort_by(|a, b| a.name.cmp(&b.name));
        for e in listed {
            let path = join_remote(Some(&top.remote), &e.name);
            let is_dir = e.kind == EntryKind::Dir;
            if keep.contains(path.as_str())
                || filter.excludes(&format!("{top_name}/{}", e.name), is_dir)
            {
                continue;
            }
            extras.push(path, is_dir);
        }
    }
    Ok(extras)
}

/// A name at the destination of a tree download that the server's tree
/// does not have (what `--delete` removes).
#[derive(Debug, Clone)]
pub(crate) struct LocalExtra {
    /// The top of its tree, below which it is reached without links.
    pub(crate) top: PathBuf,
    /// Its path.
    pub(crate) path: PathBuf,
    /// Whether it is a directory (removed with everything in it).
    pub(crate) is_dir: bool,
}

/// What the local trees `tree` downloads into hold that the server's do
/// not. Walked through directory handles opened without following links:
/// a link is listed as itself, never followed, and one swapped in for a
/// directory meanwhile is refused; a tree whose top is a link is refused.
pub(crate) fn local_extras(tree: &Tree, filter: &Filter) -> Result<Vec<LocalExtra>, FileError> {
    use cap_std::fs::Dir;
    let keep: std::collections::HashSet<&Path> = tree
        .jobs
        .iter()
        .map(|j| j.local.as_path())
        .chain(tree.dirs.iter().map(|d| d.local.as_path()))
        .chain(tree.protected_local.iter().map(PathBuf::as_path))
        .collect();
    let mut out = Vec::new();
    for top in tree.dirs.iter().filter(|d| d.depth == 0) {
        match std::fs::symlink_metadata(&top.local) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(source) => {
                return Err(FileError::Local {
                    path: top.local.clone(),
                    source,
                })
            }
            Ok(md) if !md.is_dir() => {
                return Err(FileError::Local {
                    path: top.local.clone(),
                    source: std::io::Error::other(
                        "is not a directory (a link?); --delete works only inside real directories",
                    ),
                })
            }
            Ok(_) => {}
        }
        let top_name = top
            .local
            .file_name()
            .map_or_else(String::new, crate::paths::name_to_wire);
        // Directories still to walk, by path below the top: each is opened
        // when its turn comes (a handle per pending directory could run out
        // of descriptors in a wide tree).
        let mut stack = vec![(PathBuf::new(), top_name)];
        let mut found = Vec::new();
        while let Some((rel_dir, rel)) = stack.pop() {
            let dir: Dir = crate::client::dest::open_below(&top.local, &rel_dir, false)?;
            let listing_error = |source| FileError::Local {
                path: top.local.join(&rel_dir),
                source,
            };
            for item in dir.entries().map_err(listing_error)? {
                let item = item.map_err(listing_error)?;
                let name = item.file_name();
                let path = top.local.join(&rel_dir).join(&name);
                // The entry's own type: a link to a directory is a link.
                let is_dir = item.file_type().is_ok_and(|t| t.is_dir());
                let rel = format!("{rel}/{}", crate::paths::name_to_wire(&name));
                if filter.excludes(&rel, is_dir) {
                    continue;
                }
                if !keep.contains(path.as_path()) {
                    found.push(LocalExtra {
                        top: top.local.clone(),
                        path,
                        is_dir,
                    });
                } else if is_dir {
                    stack.push((rel_dir.join(&name), rel));
                }
            }
        }
        found.sort_by(|a, b| a.path.cmp(&b.path));
        out.extend(found);
    }
    Ok(out)
}

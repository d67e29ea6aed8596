//! Directory trees for `put -r` and `get -r`: walking a local tree, mapping a remote listing to local paths, and directory metadata applied deepest first.
//!
//! Symlink policy: links are never followed and never recreated. A tree
//! upload skips every symlink it meets (with a message), so nothing outside
//! the tree is ever read; a tree download skips the links the server lists.
//! Sockets, FIFOs and devices are skipped the same way. Files keep their
//! permission bits (without group/other write and set-id bits) and mtimes;
//! directories too, applied after their contents so the mtimes stick.

use std::path::{Path, PathBuf};

use crate::client::{Client, FileError, Filter, Job};
use crate::exchange::to_timestamp;
use crate::paths::{join_remote, RemotePath};
use crate::protocol::{DirMeta, Entry, EntryKind};

/// What a tree transfer moves.
#[derive(Debug, Clone, Default)]
pub(crate) struct Tree {
    /// One job per regular file.
    pub(crate) jobs: Vec<Job>,
    /// Every directory, the top one included, empty or not.
    pub(crate) dirs: Vec<TreeDir>,
    /// What was left out, and why (for the user).
    pub(crate) skipped: Vec<String>,
    /// What --exclude left out, as the filter saw it (`top/dir/` for a
    /// directory); beneath an excluded directory nothing is listed.
    pub(crate) excluded: Vec<String>,
    /// Remote names of what a tree upload skipped (links, special files):
    /// --delete leaves those names alone on the server.
    pub(crate) protected_remote: Vec<String>,
    /// Local paths of what a tree download skipped (the server's links and
    /// special files): --delete leaves those names alone locally.
    pub(crate) protected_local: Vec<PathBuf>,
}

/// One directory of a tree, at both ends.
#[derive(Debug, Clone)]
pub(crate) struct TreeDir {
    /// Its path on the server.
    pub(crate) remote: String,
    /// Its local path.
    pub(crate) local: PathBuf,
    /// Mode and mtime to give it.
    pub(crate) meta: DirMeta,
    /// Components below the top of the tree (the top is 0).
    pub(crate) depth: usize,
}

impl Tree {
    /// Adds `other` to this tree.
    pub(crate) fn extend(&mut self, other: Self) {
        self.jobs.extend(other.jobs);
        self.dirs.extend(other.dirs);
        self.skipped.extend(other.skipped);
        self.excluded.extend(other.excluded);
        self.protected_remote.extend(other.protected_remote);
        self.protected_local.extend(other.protected_local);
    }
}

fn dir_meta(md: &std::fs::Metadata) -> DirMeta {
    use std::os::unix::fs::PermissionsExt;
    DirMeta {
        mode: Some(md.permissions().mode() & 0o7777),
        mtime: md.modified().ok().and_then(to_timestamp),
    }
}

/// Walks the local directory `top` (without following links) for upload
/// to the remote directory `remote_top`, leaving out what `filter`
/// excludes (matched against paths that start with `top_name`, the name
/// the tree has on the server).
pub(crate) fn walk_local(
    top: &Path,
    remote_top: &str,
    top_name: &str,
    filter: &Filter,
) -> Result<Tree, FileError> {
    let local_err = |p: &Path| {
        let p = p.to_owned();
        move |source| FileError::Local { path: p, source }
    };
    let md = std::fs::symlink_metadata(top).map_err(local_err(top))?;
    let mut tree = Tree::default();
    tree.dirs.push(TreeDir {
        remote: remote_top.to_owned(),
        local: top.to_owned(),
        meta: dir_meta(&md),
        depth: 0,
    });
    let mut stack = vec![(
        top.to_owned(),
        remote_top.to_owned(),
        top_name.to_owned(),
        0usize,
    )];
    while let Some((dir, remote, rel_dir, depth)) = stack.pop() {
        let mut items: Vec<_> = std::fs::read_dir(&dir)
            .map_err(local_err(&dir))?
            .collect::<Result<_, _>>()
            .map_err(local_err(&dir))?;
        items.sort_by_key(|e| e.file_name());
        for item in items {
            let path = item.path();
            let Some(name) = item.file_name().to_str().map(str::to_owned) else {
                tree.skipped
                    .push(format!("{}: not a UTF-8 name; skipped", path.display()));
                continue;
            };
            let remote = join_remote(Some(&remote), &name);
            let md = match std::fs::symlink_metadata(&path) {
                Ok(md) => md,
                Err(e) => {
                    tree.skipped
                        .push(format!("{}: {e}; skipped", path.display()));
                    tree.protected_remote.push(remote);
                    continue;
                }
            };
            let rel = format!("{rel_dir}/{name}");
            let ft = md.file_type();
            if filter.excludes(&rel, ft.is_dir()) {
                tree.excluded
                    .push(if ft.is_dir() { format!("{rel}/") } else { rel });
                continue;
            }
            if ft.is_dir() {
                tree.dirs.push(TreeDir {
                    remote: remote.clone(),
                    local: path.clone(),
                    meta: dir_meta(&md),
                    depth: depth + 1,
                });
                stack.push((path, remote, rel, depth + 1));
            } else if ft.is_file() && name.ends_with(crate::client::PART_SUFFIX) {
                tree.skipped.push(format!(
                    "{}: an unfinished qxfer download; skipped",
                    path.display()
                ));
                tree.protected_remote.push(remote);
            } else if ft.is_file() {
                tree.jobs.push(Job {
                    label: path.display().to_string(),
                    local: path,
                    remote,
                    size_hint: Some(md.len()),
                });
            } else if ft.is_symlink() {
                tree.skipped.push(format!(
                    "{}: a symbolic link; skipped (links are never followed or copied)",
                    path.display()
                ));
                tree.protected_remote.push(remote);
            } else {
                tree.skipped.push(format!(
                    "{}: a socket, FIFO or device; skipped (only regular files and directories are copied)",
                    path.display()
                ));
                tree.protected_remote.push(remote);
            }
        }
    }
    Ok(tree)
}

/// Maps a recursive listing of the remote directory `remote_top` (whose own
/// metadata is `top_meta`) onto the local directory `local_top`, leaving
/// out what `filter` excludes (matched against paths that start with the
/// local top's name). Names are validated like any remote path, so a
/// hostile server cannot make a download land outside `local_top`.
pub(crate) fn from_listing(
    entries: &[Entry],
    remote_top: &str,
    local_top: &Path,
    top_meta: DirMeta,
    filter: &Filter,
) -> Tree {
    let top_name = local_top
        .file_name()
        .map_or_else(String::new, |n| n.to_string_lossy().into_owned());
    let mut tree = Tree::default();
    tree.dirs.push(TreeDir {
        remote: remote_top.to_owned(),
        local: local_top.to_owned(),
        meta: top_meta,
        depth: 0,
    });
    for e in entries {
        let remote = join_remote(Some(remote_top), &e.name);
        let Ok(rel) = RemotePath::parse(&e.name, false) else {
            tree.skipped
                .push(format!("{remote}: not a safe relative name; skipped"));
            continue;
        };
        let local = local_top.join(rel.relative());
        let inside = format!("{top_name}/{}", e.name);
        let is_dir = e.kind == EntryKind::Dir;
        if filter.excludes(&inside, is_dir) {
            // Listed once, at the excluded name itself, not for everything beneath it.
            if filter.excludes_itself(&inside, is_dir) {
                tree.excluded
                    .push(if is_dir { format!("{inside}/") } else { inside });
            }
            continue;
        }
        match e.kind {
            EntryKind::File => tree.jobs.push(Job {
                label: remote.clone(),
                local,
                remote,
                size_hint: Some(e.size),
            }),
            EntryKind::Dir => tree.dirs.push(TreeDir {
                remote,
                local,
                meta: DirMeta {
                    mode: e.mode,
                    mtime: e.mtime,
                },
                depth: rel.relative().components().count(),
            }),
            EntryKind::Symlink => {
                tree.skipped.push(format!(
                    "{remote}: a symbolic link on the server; skipped (links are never followed or copied)"
                ));
                tree.protected_local.push(local);
            }
            EntryKind::Other => {
                tree.skipped.push(format!(
                    "{remote}: not a regular file or directory; skipped"
                ));
                tree.protected_local.push(local);
            }
        }
    }
    tree
}

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

/// What the local trees `tree` downloads into hold that the server's do
/// not, as local paths with whether each is a directory. Links are listed
/// as themselves, never followed; a tree whose top is a link is refused.
pub(crate) fn local_extras(
    tree: &Tree,
    filter: &Filter,
) -> Result<Vec<(PathBuf, bool)>, FileError> {
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
            .map_or_else(String::new, |n| n.to_string_lossy().into_owned());
        let mut stack = vec![(top.local.clone(), top_name)];
        let mut found = Vec::new();
        while let Some((dir, rel)) = stack.pop() {
            let items = std::fs::read_dir(&dir).map_err(|source| FileError::Local {
                path: dir.clone(),
                source,
            })?;
            for item in items {
                let item = item.map_err(|source| FileError::Local {
                    path: dir.clone(),
                    source,
                })?;
                let path = item.path();
                // file_type() does not follow links: a link to a directory is a link.
                let is_dir = item.file_type().is_ok_and(|t| t.is_dir());
                let rel = format!("{rel}/{}", item.file_name().to_string_lossy());
                if filter.excludes(&rel, is_dir) {
                    continue;
                }
                if !keep.contains(path.as_path()) {
                    found.push((path, is_dir));
                } else if is_dir {
                    stack.push((path, rel));
                }
            }
        }
        found.sort();
        out.extend(found);
    }
    Ok(out)
}

/// Creates every directory on the server and applies its metadata, deepest
/// first (a directory's mtime is set after everything inside it exists).
/// Directories at one depth go in parallel, as many at a time as small
/// files do: each is one round trip, and a source tree has thousands (2,070
/// in qxfer's vendored dependencies, which took 4 s over 30 ms at 16 at a
/// time). Returns the failures.
pub(crate) async fn finish_remote_dirs(
    client: &Client,
    dirs: &[TreeDir],
) -> Vec<(String, FileError)> {
    let mut failed = Vec::new();
    let limit = std::sync::Arc::new(tokio::sync::Semaphore::new(
        crate::client::SMALL_FILE_STREAMS,
    ));
    for level in levels(dirs) {
        let mut tasks = tokio::task::JoinSet::new();
        for d in level {
            let (client, limit, d) = (client.clone(), limit.clone(), d.clone());
            tasks.spawn(async move {
                let _permit = limit.acquire_owned().await.expect("never closed");
                let r = client.mkdir(&d.remote, Some(d.meta)).await;
                (d.remote, r)
            });
        }
        while let Some(joined) = tasks.join_next().await {
            if let (name, Err(e)) = joined.expect("mkdir task panicked") {
                failed.push((name, e));
            }
        }
    }
    failed
}

/// Creates every local directory of a download (before its files arrive).
pub(crate) fn create_local_dirs(dirs: &[TreeDir]) -> Vec<(String, FileError)> {
    dirs.iter()
        .filter_map(|d| {
            std::fs::create_dir_all(&d.local).err().map(|source| {
                (
                    d.remote.clone(),
                    FileError::Local {
                        path: d.local.clone(),
                        source,
                    },
                )
            })
        })
        .collect()
}

/// Applies the downloaded directories' metadata, deepest first.
pub(crate) fn finish_local_dirs(dirs: &[TreeDir]) -> Vec<(String, FileError)> {
    let mut failed = Vec::new();
    for level in levels(dirs) {
        for d in level {
            if let Err(source) = apply_local(d) {
                failed.push((
                    d.remote.clone(),
                    FileError::Local {
                        path: d.local.clone(),
                        source,
                    },
                ));
            }
        }
    }
    failed
}

fn apply_local(d: &TreeDir) -> std::io::Result<()> {
    crate::exchange::set_dir_meta(&std::fs::File::open(&d.local)?, &d.meta)
}

/// Directories grouped by depth, deepest group first.
fn levels(dirs: &[TreeDir]) -> Vec<Vec<&TreeDir>> {
    let deepest = dirs.iter().map(|d| d.depth).max().unwrap_or(0);
    (0..=deepest)
        .rev()
        .map(|depth| dirs.iter().filter(|d| d.depth == depth).collect())
        .filter(|l: &Vec<_>| !l.is_empty())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hostile_listing_names_stay_inside_the_download() {
        let entry = |name: &str, kind| Entry {
            name: name.into(),
            kind,
            size: 1,
            mtime: None,
            mode: Some(0o644),
        };
        let listing = [
            entry("ok/file", EntryKind::File),
            entry("../escape", EntryKind::File),
            entry("/etc/passwd", EntryKind::File),
            entry("a/../../b", EntryKind::Dir),
            entry("link", EntryKind::Symlink),
            entry("ok", EntryKind::Dir),
        ];
        let top = Path::new("/dl/t");
        let meta = DirMeta {
            mode: None,
            mtime: None,
        };
        let tree = from_listing(&listing, "t", top, meta, &Filter::default());
        assert_eq!(tree.jobs.len(), 1);
        assert_eq!(tree.jobs[0].local, Path::new("/dl/t/ok/file"));
        assert_eq!(tree.jobs[0].remote, "t/ok/file");
        assert_eq!(tree.dirs.len(), 2);
        assert!(tree.dirs.iter().all(|d| d.local.starts_with(top)));
        assert_eq!(tree.skipped.len(), 4, "{:?}", tree.skipped);
    }

    #[test]
    fn levels_go_deepest_first() {
        let d = |depth| TreeDir {
            remote: String::new(),
            local: PathBuf::new(),
            meta: DirMeta {
                mode: None,
                mtime: None,
            },
            depth,
        };
        let dirs = [d(0), d(2), d(1), d(2)];
        let l = levels(&dirs);
        assert_eq!(
            l.iter().map(|l| (l[0].depth, l.len())).collect::<Vec<_>>(),
            [(2, 2), (1, 1), (0, 1)]
        );
    }
}

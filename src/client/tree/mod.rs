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
mod extras;
pub(crate) use extras::*;

/// What a tree transfer moves.
#[derive(Debug, Clone, Default)]
pub(crate) struct Tree {
    /// One job per regular file.
    pub(crate) jobs: Vec<Job>,
    /// Every directory, the top one included, empty or not.
    pub(crate) dirs: Vec<TreeDir>,
    /// What was left out, and why (for the user).
    pub(crate) skipped: Vec<String>,
    /// What could not be read or named, and why: each one a failure of
    /// the command (exit 1, listed in `--json`'s errors), never a silent gap.
    pub(crate) failed: Vec<String>,
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
    /// The local top of its tree (itself for the top).
    pub(crate) top: PathBuf,
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
        self.failed.extend(other.failed);
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
        top: top.to_owned(),
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
        let items = std::fs::read_dir(&dir).and_then(|d| d.collect::<Result<Vec<_>, _>>());
        let mut items = match items {
            Ok(items) => items,
            // The top itself: nothing of the tree can be sent.
            Err(e) if depth == 0 => return Err(local_err(&dir)(e)),
            // A directory inside that cannot be read fails on its own (as
            // an unreadable file does): what is beside and around it is
            // still sent, its name on the server is left alone by
            // --delete, and the command says what is missing.
            Err(e) => {
                tree.failed.push(format!(
                    "{}: cannot read this directory ({e}); nothing in it was sent",
                    dir.display()
                ));
                tree.protected_remote.push(remote);
                continue;
            }
        };
        items.sort_by_key(|e| e.file_name());
        for item in items {
            let path = item.path();
            // Any name travels: bytes that are not UTF-8 in their escape
            // (paths.rs), so a tree arrives whole on a Linux server.
            let name = crate::paths::name_to_wire(&item.file_name());
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
                    top: top.to_owned(),
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
                    label: crate::paths::shown_local(&path),
                    local: path,
                    remote,
                    size_hint: Some(md.len()),
                    within: None,
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
        .map_or_else(String::new, crate::paths::name_to_wire);
    let mut tree = Tree::default();
    tree.dirs.push(TreeDir {
        remote: remote_top.to_owned(),
        local: local_top.to_owned(),
        top: local_top.to_owned(),
        meta: top_meta,
        depth: 0,
    });
    for e in entries {
        let remote = join_remote(Some(remote_top), &e.name);
        let shown = crate::paths::shown(&remote);
        // A name this side cannot make (or a hostile server's unsafe one)
        // fails that file: the copy is incomplete and the exit code says so.
        let Ok(rel) = RemotePath::parse(&e.name, false) else {
            tree.failed.push(format!(
                "{shown}: the server listed a name that is not a safe relative name here; not downloaded"
            ));
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
                label: shown,
                local,
                remote,
                size_hint: Some(e.size),
                within: Some(local_top.to_owned()),
            }),
            EntryKind::Dir => tree.dirs.push(TreeDir {
                remote,
                local,
                top: local_top.to_owned(),
                meta: DirMeta {
                    mode: e.mode,
                    mtime: e.mtime,
                },
                depth: rel.relative().components().count(),
            }),
            EntryKind::Symlink => {
                tree.skipped.push(format!(
                    "{shown}: a symbolic link on the server; skipped (links are never followed or copied)"
                ));
                tree.protected_local.push(local);
            }
            EntryKind::Other => {
                tree.skipped
                    .push(format!("{shown}: not a regular file or directory; skipped"));
                tree.protected_local.push(local);
            }
        }
    }
    tree
}

/// Creates every directory on the server and applies its metadata, deepest
/// first (a directory's mtime is set after everything inside it exists).
/// Directories at one depth go in parallel, as many at a time as small
/// files do: each is one round trip, and a source tree has thousands (2,070
/// in qxfer's vendored dependencies, which took 4 s over 30 ms at 16 at a
/// time). Returns the failures.
///
/// Directories that hold a file this upload committed (`filled`: the
/// files' remote paths) exist already: applying metadata to one moves no
/// other directory's mtime, so once the missing ones are made (deepest
/// first, one round trip per depth), all of those go at once, one round
/// trip in all instead of one per depth (a tree nine deep over 30 ms spent
/// 0.4 s there). With `all_exist` (a re-sync's listing found every one of
/// them on the server), nothing is created and all go at once.
pub(crate) async fn finish_remote_dirs<'a>(
    client: &Client,
    dirs: &[TreeDir],
    all_exist: bool,
    filled: impl IntoIterator<Item = &'a str>,
) -> Vec<(String, FileError)> {
    let mut failed = Vec::new();
    let limit = std::sync::Arc::new(tokio::sync::Semaphore::new(
        crate::client::SMALL_FILE_STREAMS,
    ));
    let mut present = std::collections::HashSet::new();
    for file in filled {
        let mut at = file;
        while let Some((parent, _)) = at.rsplit_once('/') {
            if !present.insert(parent) {
                break;
            }
            at = parent;
        }
    }
    let (exist, missing): (Vec<&TreeDir>, Vec<&TreeDir>) = dirs
        .iter()
        .partition(|d| all_exist || present.contains(d.remote.as_str()));
    let missing: Vec<TreeDir> = missing.into_iter().cloned().collect();
    let mut rounds = levels(&missing);
    rounds.push(exist);
    for level in rounds {
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

/// The directories of a `--sync` upload that need a request, and whether
/// all of them exist on the server already (see [`finish_remote_dirs`]).
/// A directory needs none when the server lists it with this mode and
/// mtime, no file is sent into it, and no directory is created in it
/// (either would move its mtime): a no-op re-sync of a tree then sends no
/// request per directory at all.
pub(crate) fn dirs_to_finish(
    dirs: &[TreeDir],
    remote: &std::collections::HashMap<String, Entry>,
    sent: &[Job],
) -> (Vec<TreeDir>, bool) {
    let parent = |p: &str| p.rsplit_once('/').map_or("", |(d, _)| d).to_owned();
    let listed = |d: &TreeDir| remote.get(&d.remote).filter(|e| e.kind == EntryKind::Dir);
    let mut touched: std::collections::HashSet<String> =
        sent.iter().map(|j| parent(&j.remote)).collect();
    touched.extend(
        dirs.iter()
            .filter(|d| listed(d).is_none())
            .map(|d| parent(&d.remote)),
    );
    let needed: Vec<TreeDir> = dirs
        .iter()
        .filter(|d| {
            touched.contains(&d.remote)
                || !listed(d).is_some_and(|e| e.mode == d.meta.mode && e.mtime == d.meta.mtime)
        })
        .cloned()
        .collect();
    let all_exist = needed.iter().all(|d| listed(d).is_some());
    (needed, all_exist)
}

/// Creates every local directory of a download (before its files
/// arrive): the top as named, everything below it through handles that
/// follow no link (see the `dest` module).
pub(crate) fn create_local_dirs(dirs: &[TreeDir]) -> Vec<(String, FileError)> {
    dirs.iter()
        .filter_map(|d| {
            let made = if d.depth == 0 {
                std::fs::create_dir_all(&d.local).map_err(|source| FileError::Local {
                    path: d.local.clone(),
                    source,
                })
            } else {
                below(d).and_then(|rel| super::dest::open_below(&d.top, rel, true).map(drop))
            };
            made.err().map(|e| (d.remote.clone(), e))
        })
        .collect()
}

/// Applies the downloaded directories' metadata, deepest first.
pub(crate) fn finish_local_dirs(dirs: &[TreeDir]) -> Vec<(String, FileError)> {
    let mut failed = Vec::new();
    for level in levels(dirs) {
        for d in level {
            if let Err(e) = apply_local(d) {
                failed.push((d.remote.clone(), e));
            }
        }
    }
    failed
}

/// Sets a downloaded directory's mode and mtime through its handle (below
/// the top, reached without following a link).
fn apply_local(d: &TreeDir) -> Result<(), FileError> {
    let local = |source| FileError::Local {
        path: d.local.clone(),
        source,
    };
    let dir = if d.depth == 0 {
        cap_std::fs::Dir::open_ambient_dir(&d.local, cap_std::ambient_authority()).map_err(local)?
    } else {
        super::dest::open_below(&d.top, below(d)?, false)?
    };
    let handle = crate::exchange::open_dir_handle(&dir).map_err(local)?;
    crate::exchange::set_dir_meta(&handle, &d.meta).map_err(local)
}

/// A directory's path relative to its tree's top.
fn below(d: &TreeDir) -> Result<&Path, FileError> {
    d.local.strip_prefix(&d.top).map_err(|_| FileError::Local {
        path: d.local.clone(),
        source: std::io::Error::other("is not below its tree's top"),
    })
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
        // The unsafe names fail (the copy is incomplete); the link is skipped.
        assert_eq!(tree.failed.len(), 3, "{:?}", tree.failed);
        assert_eq!(tree.skipped.len(), 1, "{:?}", tree.skipped);
    }

    #[test]
    fn levels_go_deepest_first() {
        let d = |depth| TreeDir {
            remote: String::new(),
            local: PathBuf::new(),
            top: PathBuf::new(),
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

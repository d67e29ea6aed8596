//! The local store: a directory on this machine, every name resolved beneath it by cap-std.
//!
//! The filesystem sandbox: the root is opened once as a cap-std [`Dir`], and
//! every path a client names is resolved beneath it by cap-std (openat2 with
//! RESOLVE_BENEATH on Linux, or its own component-by-component walk with
//! O_NOFOLLOW), so neither `..` nor a symlink can lead out of the root, and
//! there is no window between checking a path and using it. Symlinks that
//! stay inside the root are followed for get and ls; a put never replaces
//! or writes through a symlink at its destination name.
//!
//! Uploads are written into the partial store `<root>/.qxfer-partial/`
//! (or an anonymous O_TMPFILE in the destination directory) and renamed
//! into their directory only once complete and verified ([`IncomingFile`]).
//! Names starting with `.qxfer-` are refused by path validation and hidden
//! from listings, so temporaries are never listed, never downloadable and
//! never mistaken for (or clobbered by) user files.

use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use cap_std::ambient_authority;
use cap_std::fs::{Dir, OpenOptions, OpenOptionsExt};

use crate::files;

use crate::files::{blocking, file_meta, Descriptions, FileBytes, Start, TransferError};
use crate::paths::RemotePath;
use crate::protocol::{Digest, DirMeta, Entry, ErrorCode, FileMeta, Prefix, RemoteError};
use crate::space::Space;

use super::{
    appeared, corrupt, receive_error, Held, InUse, Opened, PatchedUpload, Prepared, PutPlan,
    Sinking, Store, Upload, Whole, WholePut,
};

mod digests;
mod list;
mod partials;
mod upload;
use digests::*;
use upload::*;

/// A directory served as the root.
#[derive(Debug)]
pub(crate) struct LocalStore {
    root: Arc<Dir>,
    /// Disk space reserved by uploads in flight.
    space: Arc<Space>,
    /// Digests hashed for `--checksum`.
    digests: Arc<DigestCache>,
    /// The chunks of files cut for deltas (or made by one), for the next
    /// delta of the same file in either direction: a server sees the same
    /// files again and again (see `files::described`).
    descriptions: Descriptions,
}

/// [`Store::set_meta`] in place: the file is opened beneath the root
/// without following a link at its name, checked (size, and the digest or
/// the mtime), and given the mode and mtime through its descriptor, so
/// what changes is the file that was checked. The change is not synced:
/// lost in a crash, it is made again by the next run. Blocking.
fn set_meta(
    root: &Dir,
    p: &RemotePath,
    meta: &FileMeta,
    digest: Option<Digest>,
    cache: &DigestCache,
) -> Result<(), RemoteError> {
    use std::os::unix::fs::MetadataExt;
    let mut opts = OpenOptions::new();
    opts.read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY | libc::O_NOFOLLOW);
    let mut file = match root.open_with(p.relative(), &opts) {
        Ok(f) => f.into_std(),
        Err(e) if e.raw_os_error() == Some(libc::ELOOP) => {
            return Err(RemoteError::new(
                ErrorCode::Symlink,
                format!(
                    "'{p}' is a symbolic link on the server; its mtime and mode were left alone"
                ),
            ))
        }
        Err(e) => return Err(fs_error(&e, p, "cannot open")),
    };
    let setting = |e: io::Error| fs_error(&e, p, "cannot set the mtime and mode of");
    let md = file.metadata().map_err(setting)?;
    if !md.is_file() {
        return Err(RemoteError::new(
            ErrorCode::NotFound,
            format!(
                "'{p}' is not a regular file on the server; its mtime and mode were left alone"
            ),
        ));
    }
    super::check_set_meta(p, &file_meta(&md), meta, digest)?;
    if let Some(wanted) = digest {
        let found = cached_digest(&mut file, &md, cache).map_err(setting)?;
        if found != wanted {
            return Err(RemoteError::new(
                ErrorCode::Corrupt,
                format!("'{p}' changed on the server since it was compared; its mtime and mode were left alone, run the command again"),
            ));
        }
    }
    files::set_mode_and_mtime(&file, meta.mode, meta.mtime).map_err(setting)?;
    // The contents are the ones hashed: the new ctime keeps the digest.
    if let Some(d) = digest {
        let md = file.metadata().map_err(setting)?;
        cache.keep((md.dev(), md.ino()), stamp(&md), d);
    }
    Ok(())
}

/// Errors that stop a local root from being used.
#[derive(Debug, thiserror::Error)]
pub enum RootError {
    /// The root exists but is not a directory.
    #[error("root {0} exists but is not a directory; pass --root with a directory")]
    NotDir(PathBuf),
    /// The root could not be created or written to.
    #[error("root {path} is not usable: {source}; pass --root with a writable directory")]
    Unusable {
        /// The root.
        path: PathBuf,
        /// The OS error.
        source: io::Error,
    },
}

impl LocalStore {
    /// Prepares `root`: creates it if missing, checks it is a writable
    /// directory, and opens it. Returns the store and the root's absolute path.
    pub(crate) fn open_root(root: &Path) -> Result<(Self, PathBuf), RootError> {
        let unusable = |source| RootError::Unusable {
            path: root.to_owned(),
            source,
        };
        match std::fs::metadata(root) {
            Ok(md) if !md.is_dir() => return Err(RootError::NotDir(root.to_owned())),
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                std::fs::create_dir_all(root).map_err(unusable)?
            }
            Err(e) => return Err(unusable(e)),
        }
        // An unnamed temporary file proves we can create files here and leaves nothing behind.
        tempfile::tempfile_in(root).map_err(unusable)?;
        let root = std::fs::canonicalize(root).map_err(unusable)?;
        let dir = Dir::open_ambient_dir(&root, ambient_authority()).map_err(unusable)?;
        let store = Self {
            root: Arc::new(dir),
            space: Arc::default(),
            digests: Arc::default(),
            descriptions: Descriptions::in_memory(),
        };
        Ok((store, root))
    }
}

#[async_trait]
impl Store for LocalStore {
    async fn list(&self, path: &RemotePath, recursive: bool) -> Result<Vec<Entry>, RemoteError> {
        let (root, p) = (self.root.clone(), path.clone());
        blocking(move || list::list(&root, &p, recursive)).await
    }

    async fn mkdir(&self, path: &RemotePath, meta: Option<DirMeta>) -> Result<(), RemoteError> {
        let (root, p) = (self.root.clone(), path.clone());
        blocking(move || -> Result<(), RemoteError> {
            let dir = open_or_create_dir(&root, &p.relative(), &p)?;
            if let Some(meta) = meta {
                files::apply_dir_meta(&dir, &meta)
                    .map_err(|e| fs_error(&e, &p, "cannot set the metadata of"))?;
            }
            Ok(())
        })
        .await
    }

    async fn open(&self, path: &RemotePath, resume: Option<Prefix>) -> Result<Opened, RemoteError> {
        let (root, p, kept) = (self.root.clone(), path.clone(), self.descriptions.clone());
        blocking(move || open_for_reading(&root, &p, resume, kept)).await
    }

    async fn open_small(
        &self,
        path: &RemotePath,
        resume: Option<Prefix>,
    ) -> Result<(Opened, Option<Result<files::SmallRead, TransferError>>), RemoteError> {
        let (root, p, kept) = (self.root.clone(), path.clone(), self.descriptions.clone());
        files::quick(move || {
            let opened = open_for_reading(&root, &p, resume, kept)?;
            let size = opened.meta.size;
            let small = match opened.bytes.as_file() {
                Some(file) if opened.offset == 0 && size <= files::SMALL_READ_MAX => Some(
                    file.reader_at(0)
                        .map_err(TransferError::Read)
                        .and_then(|f| files::read_small(f, size)),
                ),
                _ => None,
            };
            Ok((opened, small))
        })
        .await
    }

    async fn digest(&self, path: &RemotePath) -> Result<Option<Digest>, RemoteError> {
        let (root, p, cache) = (self.root.clone(), path.clone(), self.digests.clone());
        blocking(move || digest_of(&root, &p, &cache)).await
    }

    async fn digests(&self, paths: Vec<RemotePath>) -> Vec<Option<Digest>> {
        use futures::StreamExt;
        let groups: Vec<Vec<RemotePath>> = paths.chunks(64).map(<[_]>::to_vec).collect();
        let done: Vec<Vec<Option<Digest>>> = futures::stream::iter(groups)
            .map(|group| {
                let (root, cache) = (self.root.clone(), self.digests.clone());
                blocking(move || {
                    group
                        .iter()
                        .map(|p| digest_of(&root, p, &cache).ok().flatten())
                        .collect()
                })
            })
            .buffered(2)
            .collect()
            .await;
        done.into_iter().flatten().collect()
    }

    async fn remove(&self, path: &RemotePath, recursive: bool) -> Result<(), RemoteError> {
        let (root, p) = (self.root.clone(), path.clone());
        blocking(move || remove(&root, &p, recursive)).await
    }

    async fn rename(&self, from: &RemotePath, to: &RemotePath) -> Result<(), RemoteError> {
        let (root, from, to) = (self.root.clone(), from.clone(), to.clone());
        blocking(move || rename(&root, &from, &to)).await
    }

    async fn set_meta(
        &self,
        path: &RemotePath,
        meta: FileMeta,
        digest: Option<Digest>,
        _client: crate::tls::Fingerprint,
    ) -> Result<(), RemoteError> {
        let (root, p, cache) = (self.root.clone(), path.clone(), self.digests.clone());
        blocking(move || set_meta(&root, &p, &meta, digest, &cache)).await
    }

    fn holds_local_files(&self) -> bool {
        true
    }

    async fn prepare_put(&self, plan: PutPlan) -> Result<Prepared, RemoteError> {
        let (root, space, kept) = (
            self.root.clone(),
            self.space.clone(),
            self.descriptions.clone(),
        );
        blocking(move || prepare_put(&root, &plan, &space, kept)).await
    }

    async fn put_whole(
        &self,
        plan: PutPlan,
        data: Box<dyn Whole>,
        expected: Digest,
    ) -> Result<WholePut, RemoteError> {
        let (root, space, kept) = (
            self.root.clone(),
            self.space.clone(),
            self.descriptions.clone(),
        );
        let path = plan.path.clone();
        // Present: the digest of what is there; else what was written, its
        // commit begun, and the upload, holding the reservation until the
        // commit is done.
        let started = files::quick(move || match prepare_local(&root, &plan, &space, kept)? {
            LocalPrepared::Present(digest) => Ok(Err(digest)),
            LocalPrepared::Receive { upload, .. } => upload
                .write_whole(data, expected, plan.meta, plan.force)
                .map(Ok),
        })
        .await?;
        let (digest, committing, _reserved) = match started {
            Ok(written) => written,
            Err(present) => return Ok(WholePut::Present(present)),
        };
        committing
            .finished()
            .await
            .map_err(|e| commit_error(e, &path))?;
        Ok(WholePut::Committed(digest))
    }

    async fn sweep(&self, ttl: Duration, in_use: InUse) -> Result<usize, String> {
        let root = self.root.clone();
        blocking(move || partials::sweep(&root, ttl, &*in_use))
            .await
            .map_err(|e| e.to_string())
    }

    async fn held_partials(&self) -> Result<usize, String> {
        let root = self.root.clone();
        blocking(move || partials::count(&root))
            .await
            .map_err(|e| e.to_string())
    }

    async fn probe(&self) -> Result<(), String> {
        let root = self.root.clone();
        blocking(move || root.dir_metadata().map(drop))
            .await
            .map_err(|e| format!("the served directory: {e}"))
    }
}

/// The directory `path` lies in, opened beneath the root (links inside the
/// root followed, none out of it), and its own name there.
fn parent_of(
    root: &Dir,
    path: &RemotePath,
    doing: &str,
) -> Result<(Dir, std::ffi::OsString), RemoteError> {
    let name = path
        .local_file_name()
        .expect("a validated path is never the root");
    let dir = match path.parent() {
        Some(parent) => root.open_dir(parent),
        None => root.try_clone(),
    }
    .map_err(|e| fs_error(&e, path, doing))?;
    Ok((dir, name))
}

/// Removes a file, a link (not what it points at), an empty directory, or
/// with `recursive` a directory and everything in it (cap-std removes
/// beneath the root only, following no link). Blocking.
fn remove(root: &Dir, p: &RemotePath, recursive: bool) -> Result<(), RemoteError> {
    let (dir, name) = parent_of(root, p, "cannot remove")?;
    let name = name.as_os_str();
    let md = dir
        .symlink_metadata(name)
        .map_err(|e| fs_error(&e, p, "cannot remove"))?;
    if !md.is_dir() {
        return dir
            .remove_file(name)
            .map_err(|e| fs_error(&e, p, "cannot remove"));
    }
    match dir.remove_dir(name) {
        Ok(()) => Ok(()),
        Err(e)
            if e.raw_os_error() == Some(libc::ENOTEMPTY)
                || e.raw_os_error() == Some(libc::EEXIST) =>
        {
            if !recursive {
                return Err(super::not_empty(p));
            }
            dir.remove_dir_all(name)
                .map_err(|e| fs_error(&e, p, "cannot remove"))
        }
        Err(e) => Err(fs_error(&e, p, "cannot remove")),
    }
}

/// Renames `from` to `to` without ever replacing `to` (RENAME_NOREPLACE).
/// Blocking.
fn rename(root: &Dir, from: &RemotePath, to: &RemotePath) -> Result<(), RemoteError> {
    let (from_dir, from_name) = parent_of(root, from, "cannot rename")?;
    let from_name = from_name.as_os_str();
    from_dir
        .symlink_metadata(from_name)
        .map_err(|e| fs_error(&e, from, "cannot rename"))?;
    let (to_dir, to_name) = parent_of(root, to, "cannot rename to")?;
    let to_name = to_name.as_os_str();
    files::rename_noreplace(&from_dir, from_name, &to_dir, to_name).map_err(|e| {
        if e.kind() == io::ErrorKind::AlreadyExists {
            super::rename_target_exists(from, to)
        } else {
            fs_error(&e, from, "cannot rename")
        }
    })
}

/// Opens `path` for reading and agrees where sending starts. Blocking.
fn open_for_reading(
    root: &Dir,
    p: &RemotePath,
    resume: Option<Prefix>,
    descriptions: Descriptions,
) -> Result<Opened, RemoteError> {
    // O_NONBLOCK: opening a FIFO someone left in the root must not hang
    // this task; it is refused below as not a regular file.
    let mut opts = OpenOptions::new();
    opts.read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY);
    let file = root
        .open_with(p.relative(), &opts)
        .map_err(|e| fs_error(&e, p, "cannot open"))?
        .into_std();
    let md = file
        .metadata()
        .map_err(|e| fs_error(&e, p, "cannot read"))?;
    if md.is_dir() {
        return Err(RemoteError::new(
            ErrorCode::IsDirectory,
            format!("'{p}' is a directory on the server; use `qxfer get -r {p}` to download it and its contents"),
        ));
    }
    if !md.is_file() {
        return Err(RemoteError::new(
            ErrorCode::NotFound,
            format!("'{p}' is not a regular file on the server"),
        ));
    }
    let meta = file_meta(&md);
    // The client holds a prefix: continue after it if ours hashes the
    // same (the file is unchanged there), else start over.
    let mut file = file;
    let start = match resume {
        Some(prefix) => files::matching_start(&mut file, meta.size, prefix.offset, &prefix.digest)
            .map_err(|e| fs_error(&e, p, "cannot read"))?,
        None => Start::default(),
    };
    Ok(Opened {
        meta,
        offset: start.offset,
        hasher: Some(start.hasher),
        digest: None,
        bytes: Box::new(FileBytes::new(file, descriptions)),
    })
}

/// Opens the directory `dir` beneath the root, creating it and its parents
/// if missing. Errors name the real reason: a link out of the root, or a
/// file where a directory should be.
fn open_or_create_dir(root: &Dir, dir: &Path, path: &RemotePath) -> Result<Dir, RemoteError> {
    let open_error = |e: io::Error| fs_error(&e, path, "cannot open the directory for");
    match root.open_dir(dir) {
        Ok(d) => return Ok(d),
        Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(open_error(e)),
        Err(_) => {}
    }
    if let Err(e) = root.create_dir_all(dir) {
        // Creating failed: opening again says why (an escape, a file in the way).
        return Err(match root.open_dir(dir) {
            Err(open) if is_escape(&open) => open_error(open),
            _ if e.kind() == io::ErrorKind::AlreadyExists => RemoteError::new(
                ErrorCode::NotDirectory,
                format!("cannot create the directory for '{path}' on the server: this path or a parent of it is a file or a link, not a directory"),
            ),
            _ => fs_error(&e, path, "cannot create the directory for"),
        });
    }
    root.open_dir(dir).map_err(open_error)
}

/// Whether cap-std refused to resolve a path because it would leave the
/// root. It reports that as PermissionDenied without an OS error number,
/// which a real EACCES always has.
fn is_escape(e: &io::Error) -> bool {
    e.kind() == io::ErrorKind::PermissionDenied && e.raw_os_error().is_none()
}

/// Turns a filesystem error on `path` into what the client is told.
fn fs_error(e: &io::Error, path: &RemotePath, doing: &str) -> RemoteError {
    if is_escape(e) {
        return RemoteError::new(
            ErrorCode::OutsideRoot,
            format!("{doing} '{path}' on the server: it leads outside the served directory (through a symbolic link), which the server never follows"),
        );
    }
    if e.raw_os_error() == Some(libc::EXDEV) {
        return RemoteError::new(
            ErrorCode::Internal,
            format!("{doing} '{path}' on the server: its directory is on another filesystem than the served root (a mount point inside the root), where uploads cannot be placed; choose another directory"),
        );
    }
    if e.raw_os_error() == Some(libc::ELOOP) {
        return RemoteError::new(
            ErrorCode::Symlink,
            format!("{doing} '{path}' on the server: too many levels of symbolic links"),
        );
    }
    let (code, advice) = match e.kind() {
        io::ErrorKind::NotFound => (ErrorCode::NotFound, "check the name with `qxfer ls`"),
        io::ErrorKind::PermissionDenied => (
            ErrorCode::PermissionDenied,
            "the server's user may not access it; ask its operator",
        ),
        io::ErrorKind::IsADirectory => (ErrorCode::IsDirectory, "name a file, not a directory"),
        io::ErrorKind::NotADirectory => (
            ErrorCode::NotDirectory,
            "this path or a parent of it is a file, not a directory",
        ),
        io::ErrorKind::AlreadyExists => (ErrorCode::AlreadyExists, "use --force to overwrite"),
        _ if files::is_disk_full(e) => (
            ErrorCode::NoSpace,
            "the server's disk is full; free space there and retry",
        ),
        _ => (ErrorCode::Internal, "see the server's log"),
    };
    RemoteError::new(
        code,
        format!("{doing} '{path}' on the server: {e}; {advice}"),
    )
}

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

use crate::files;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use cap_std::ambient_authority;
use cap_std::fs::{Dir, OpenOptions, OpenOptionsExt};

use crate::files::{
    blocking, described, file_meta, to_timestamp, CommitError, Description, FileBytes, FileKey,
    FileSink, IncomingFile, Received, Sink, Start, TransferError, Whole,
};
use crate::paths::RemotePath;
use crate::protocol::{Digest, DirMeta, Entry, ErrorCode, FileMeta, Prefix, RemoteError};
use crate::space::{Reservation, Space};

use super::{
    appeared, corrupt, receive_error, Held, InUse, Opened, PatchedUpload, Prepared, PutPlan,
    Sinking, Store, Upload,
};

mod list;
mod partials;

/// A directory served as the root.
#[derive(Debug)]
pub(crate) struct LocalStore {
    root: Arc<Dir>,
    /// Disk space reserved by uploads in flight.
    space: Arc<Space>,
    /// Digests hashed for `--checksum`.
    digests: Arc<DigestCache>,
}

/// The digests this server hashed for `--checksum`, by device and inode,
/// each valid while the file's size, mtime and ctime stay as they were
/// (any write moves the ctime, even one that puts the mtime back), so an
/// unchanged tree is hashed once per server run, not once per re-sync.
/// Emptied when it reaches [`DIGEST_CACHE`] entries (about 8 MB).
#[derive(Debug, Default)]
struct DigestCache(std::sync::Mutex<std::collections::HashMap<(u64, u64), (Stamp, Digest)>>);

/// Size, mtime and ctime: what tells a file's versions apart without reading it.
type Stamp = (u64, (i64, i64), (i64, i64));

const DIGEST_CACHE: usize = 100_000;

fn stamp(md: &std::fs::Metadata) -> Stamp {
    use std::os::unix::fs::MetadataExt;
    (
        md.len(),
        (md.mtime(), md.mtime_nsec()),
        (md.ctime(), md.ctime_nsec()),
    )
}

/// The digest of the regular file `p` (None if there is none), from the
/// cache while the file is as it was when hashed. Blocking.
fn digest_of(
    root: &Dir,
    p: &RemotePath,
    cache: &DigestCache,
) -> Result<Option<Digest>, RemoteError> {
    let mut opts = OpenOptions::new();
    opts.read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY);
    let mut file = match root.open_with(p.relative(), &opts) {
        Ok(f) => f.into_std(),
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(fs_error(&e, p, "cannot open")),
    };
    let reading = |e: io::Error| fs_error(&e, p, "cannot read");
    let md = file.metadata().map_err(reading)?;
    if !md.is_file() {
        return Ok(None);
    }
    cached_digest(&mut file, &md, cache)
        .map(Some)
        .map_err(reading)
}

/// The digest of the open regular `file` (whose metadata is `md`), from
/// the cache while the file is as it was when hashed. Blocking.
fn cached_digest(
    file: &mut std::fs::File,
    md: &std::fs::Metadata,
    cache: &DigestCache,
) -> io::Result<Digest> {
    use std::os::unix::fs::MetadataExt;
    let (key, before) = ((md.dev(), md.ino()), stamp(md));
    let held = cache.0.lock().unwrap_or_else(|e| e.into_inner());
    if let Some((s, d)) = held.get(&key) {
        if *s == before {
            return Ok(*d);
        }
    }
    drop(held);
    let digest = files::file_digest(file)?;
    // Written to while it was read: the digest is of no version; the
    // client sends the file, which is what a changing file needs anyway.
    if stamp(&file.metadata()?) == before {
        cache.keep(key, before, digest);
    }
    Ok(digest)
}

impl DigestCache {
    fn keep(&self, key: (u64, u64), stamp: Stamp, digest: Digest) {
        let mut held = self.0.lock().unwrap_or_else(|e| e.into_inner());
        if held.len() >= DIGEST_CACHE {
            held.clear();
        }
        held.insert(key, (stamp, digest));
    }
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
        let (root, p) = (self.root.clone(), path.clone());
        blocking(move || open_for_reading(&root, &p, resume)).await
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

    async fn prepare_put(&self, plan: PutPlan) -> Result<Prepared, RemoteError> {
        let (root, space) = (self.root.clone(), self.space.clone());
        blocking(move || prepare_put(&root, &plan, &space)).await
    }

    async fn sweep(&self, ttl: Duration, in_use: InUse) -> Result<usize, String> {
        let root = self.root.clone();
        blocking(move || partials::sweep(&root, ttl, &*in_use))
            .await
            .map_err(|e| e.to_string())
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
        bytes: Box::new(FileBytes::new(file)),
    })
}

/// Checks the destination, the free space, and creates the temporary for a
/// put. The destination's directory is opened here, beneath the root, and
/// the commit renames into that handle: swapping a directory on the path for
/// a symlink while the upload runs cannot move where the file lands. Blocking.
fn prepare_put(root: &Dir, plan: &PutPlan, space: &Arc<Space>) -> Result<Prepared, RemoteError> {
    let PutPlan {
        path, meta, force, ..
    } = plan;
    let (size, meta_mtime) = (meta.size, meta.mtime);
    let name = path
        .local_file_name()
        .expect("a put path is never the root");
    let name = name.as_os_str();
    let dest_dir = match path.parent() {
        Some(parent) => open_or_create_dir(root, &parent, path)?,
        None => root
            .try_clone()
            .map_err(|e| fs_error(&e, path, "cannot open the directory for"))?,
    };
    match dest_dir.symlink_metadata(name) {
        Ok(md) if md.is_dir() => {
            return Err(RemoteError::new(
                ErrorCode::IsDirectory,
                format!("'{path}' is a directory on the server; choose another name or --to"),
            ))
        }
        Ok(md) if md.file_type().is_symlink() => {
            return Err(RemoteError::new(
                ErrorCode::Symlink,
                format!("'{path}' is a symbolic link on the server; uploads never replace or write through links, so choose another name"),
            ))
        }
        Ok(md) if !force => {
            // The same size and mtime: most likely this very file, from an
            // earlier run of the same command. Let the client check the
            // contents instead of failing.
            let same = md.is_file()
                && md.len() == size
                && meta_mtime.is_some()
                && md.modified().ok().and_then(|t| to_timestamp(t.into_std())) == meta_mtime;
            if same {
                let digest = dest_dir
                    .open(name)
                    .and_then(|f| files::file_digest(&mut f.into_std()))
                    .map_err(|e| fs_error(&e, path, "cannot read"))?;
                return Ok(Prepared::Present(digest));
            }
            return Err(RemoteError::new(
                ErrorCode::AlreadyExists,
                format!("'{path}' already exists on the server; use --force to overwrite it"),
            ));
        }
        Ok(_) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(fs_error(&e, path, "cannot check")),
    }
    let creating = |e: io::Error| fs_error(&e, path, "cannot create the upload of");
    let label = PathBuf::from(path.wire());
    // Data from a pipe cannot be resumed: a temporary like a small file's,
    // whatever name the server leased for it.
    let Some(partial) = plan.partial.as_deref().filter(|_| !plan.stream) else {
        // Not resumable: an anonymous temporary in the destination directory
        // where the system allows, else a named one in the partial store.
        let reserved = reserve_space(space, &dest_dir, size, path)?;
        let anonymous = IncomingFile::create_anonymous(
            dest_dir.try_clone().map_err(creating)?,
            name,
            label.clone(),
        )
        .map_err(|e| fs_error(&e, path, "cannot create"))?;
        let incoming = match anonymous {
            Some(incoming) => incoming,
            None => {
                let store = partials::partial_store(root).map_err(creating)?;
                IncomingFile::create_in(store, dest_dir, name, label)
                    .map_err(|e| fs_error(&e, path, "cannot create"))?
            }
        };
        let room = plan.stream.then(|| space.clone());
        return Ok(receive(
            incoming,
            Start::default(),
            reserved,
            room,
            path,
            false,
        ));
    };
    let store = partials::partial_store(root).map_err(creating)?;
    // Partials of other versions of this upload (the source changed) go.
    let (same_upload, _) = partial
        .rsplit_once('-')
        .expect("partial names have a version");
    let mut discarded_stale = false;
    for entry in store.entries().map_err(creating)?.flatten() {
        let other = entry.file_name();
        let other = other.to_string_lossy();
        if other.starts_with(same_upload) && other != partial {
            discarded_stale |= store.remove_file(&*other).is_ok();
        }
    }
    let store_fs = store.try_clone().map_err(creating)?;
    let incoming = IncomingFile::open_partial(store, partial, dest_dir, name, label)
        .map_err(|e| fs_error(&e, path, "cannot open the partial upload of"))?;
    let held = incoming.held().map_err(creating)?;
    let start = if plan.resume && held > 0 && held <= size {
        incoming.prefix(held)
    } else {
        incoming.restart()
    }
    .map_err(creating)?;
    let reserved = reserve_space(space, &store_fs, size - start.offset, path)?;
    Ok(receive(
        incoming,
        start,
        reserved,
        None,
        path,
        discarded_stale,
    ))
}

/// A put that will receive into `incoming` from `start`.
fn receive(
    incoming: IncomingFile,
    start: Start,
    reserved: Reservation,
    room: Option<Arc<Space>>,
    path: &RemotePath,
    discarded_stale: bool,
) -> Prepared {
    let held = Held {
        offset: start.offset,
        prefix: start.prefix_digest(),
    };
    Prepared::Receive {
        upload: Box::new(LocalUpload {
            incoming: Some(incoming),
            start: Some(start),
            reserved: Arc::new(reserved),
            room,
            path: path.clone(),
            described: None,
        }),
        held,
        discarded_stale,
    }
}

/// An upload into a temporary or partial file beside its destination.
struct LocalUpload {
    /// Taken by the call that consumes it.
    incoming: Option<IncomingFile>,
    /// Where the data starts; taken by `sink`.
    start: Option<Start>,
    /// The disk space held until the commit (and told of each write).
    reserved: Arc<Reservation>,
    /// For data of unknown length (which reserved nothing): the space to
    /// check before each write.
    room: Option<Arc<Space>>,
    path: RemotePath,
    /// The chunks of a file made by a delta, to remember once committed.
    described: Option<(u32, Description)>,
}

impl LocalUpload {
    fn incoming(&self) -> &IncomingFile {
        self.incoming.as_ref().expect("the upload is still open")
    }

    fn writing(&self) -> impl Fn(io::Error) -> RemoteError + '_ {
        |e| fs_error(&e, &self.path, "cannot write")
    }

    /// Receiving failed with `e`: what a full disk cut short is not kept
    /// for a resume (its bytes are the space the next upload, or this
    /// one's retry, needs). The error to answer with.
    fn failed(&mut self, e: TransferError) -> RemoteError {
        if matches!(&e, TransferError::Write(io) if files::is_disk_full(io)) {
            if let Some(incoming) = self.incoming.take() {
                incoming.discard();
            }
        }
        self.receive_error(e)
    }

    /// The error for data that did not arrive as it should.
    fn receive_error(&self, e: TransferError) -> RemoteError {
        match e {
            TransferError::Write(ref io) => fs_error(io, &self.path, "cannot write"),
            other => receive_error(other, &self.path),
        }
    }
}

#[async_trait]
impl Upload for LocalUpload {
    async fn restart(&mut self) -> Result<(), RemoteError> {
        let start = self.incoming().restart().map_err(self.writing())?;
        self.start = Some(start);
        Ok(())
    }

    async fn sink(&mut self, size: u64) -> Result<Sinking, RemoteError> {
        let file = self.incoming().file().map_err(self.writing())?;
        let start = self.start.take().unwrap_or_default();
        let from = start.offset;
        let sink = FileSink::new(
            file,
            start,
            size,
            self.room.clone(),
            Some(self.reserved.clone()),
        );
        Ok(Sinking {
            sink: Box::new(sink),
            from,
            most: size,
        })
    }

    async fn received(
        &mut self,
        sink: Box<dyn Sink>,
        ended: Result<u64, TransferError>,
    ) -> Result<Received, RemoteError> {
        let sink = sink
            .into_any()
            .downcast::<FileSink>()
            .expect("a local upload is written through its own sink");
        sink.finish(ended).await.map_err(|e| self.failed(e))
    }

    fn patch_target(&mut self) -> Option<Result<std::fs::File, RemoteError>> {
        // Only a fresh temporary (not a resumed partial, not data of
        // unknown length) can start as a clone.
        if self.start.as_ref().is_some_and(|s| s.offset > 0) || self.room.is_some() {
            return None;
        }
        Some(self.incoming().file().map_err(self.writing()))
    }

    async fn patched(
        &mut self,
        made: Result<PatchedUpload, TransferError>,
    ) -> Result<Received, RemoteError> {
        made.map(|made| {
            self.described = made.described;
            made.received
        })
        .map_err(|e| self.failed(e))
    }

    async fn commit_whole(
        mut self: Box<Self>,
        data: Box<dyn Whole>,
        expected: Digest,
        meta: FileMeta,
        force: bool,
    ) -> Result<Digest, RemoteError> {
        let incoming = self.incoming.take().expect("the upload is still open");
        let path = self.path.clone();
        // The reservation is held until the commit, however this ends.
        let _reserved = self;
        blocking(move || -> Result<Digest, RemoteError> {
            let mut file = incoming
                .file()
                .map_err(|e| fs_error(&e, &path, "cannot write"))?;
            let digest = data.write_to(&mut file).map_err(|e| match e {
                TransferError::Write(ref io) => fs_error(io, &path, "cannot write"),
                other => receive_error(other, &path),
            })?;
            if digest != expected {
                return Err(corrupt(&path));
            }
            incoming
                .commit(&meta, force)
                .map_err(|e| commit_error(e, &path))?;
            Ok(digest)
        })
        .await
    }

    async fn commit(mut self: Box<Self>, meta: FileMeta, force: bool) -> Result<(), RemoteError> {
        let incoming = self.incoming.take().expect("the upload is still open");
        let path = self.path.clone();
        let described = self.described.take();
        blocking(move || {
            let file = described.as_ref().and_then(|_| incoming.file().ok());
            incoming.commit(&meta, force)?;
            // Known as it is committed: its next delta, either way, need
            // not read it again (see `files::described`).
            if let (Some((avg, d)), Some(key)) = (described, file.as_ref().and_then(FileKey::of)) {
                described::remember(key, avg, d);
            }
            Ok(())
        })
        .await
        .map_err(|e| commit_error(e, &path))
    }

    async fn abandon(mut self: Box<Self>) {
        if let Some(incoming) = self.incoming.take() {
            incoming.discard();
        }
    }
}

/// The error for a commit that failed.
fn commit_error(e: CommitError, path: &RemotePath) -> RemoteError {
    match e {
        CommitError::Exists(_) => appeared(path),
        CommitError::Io { source, .. } => fs_error(&source, path, "cannot commit"),
    }
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

/// Refuses a put that cannot fit, before any byte is written: the space
/// available to the server's user (statvfs f_bavail), less what uploads in
/// flight will still write, must hold what this one will write.
fn reserve_space(
    space: &Arc<Space>,
    dir: &Dir,
    size: u64,
    path: &RemotePath,
) -> Result<Reservation, RemoteError> {
    space.reserve(dir, size).map_err(|no| {
        RemoteError::new(
            ErrorCode::NoSpace,
            format!(
                "'{path}' needs {} bytes but the server has only {} bytes free (uploads in flight included); free space there and retry",
                no.needed, no.free
            ),
        )
    })
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

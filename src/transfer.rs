//! File bytes to stream and back, written once and used by both the server and the client.
//!
//! Disk I/O runs on a blocking thread and network I/O on the async side, with
//! a small bounded queue of chunks between them, so the disk and the network
//! overlap and memory stays at a few chunks per transfer whatever the file
//! size. Both sides hash with BLAKE3 on the disk thread as the bytes pass.
//! A received file is written under a hidden temporary name, synced, and only
//! then renamed into place ([`IncomingFile`]).

use std::fs::{File, Metadata};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use cap_std::ambient_authority;
use cap_std::fs::{Dir, OpenOptions, OpenOptionsExt};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::mpsc;

use crate::protocol::{Digest, FileMeta, Timestamp};

/// Called with the number of bytes each time data moves (drives progress bars).
pub type Advance<'a> = dyn Fn(u64) + Send + Sync + 'a;

/// Size of one chunk passed between the disk thread and the network.
const CHUNK: usize = 1024 * 1024;

/// Chunks queued between disk and network: enough to ride out a slow
/// `write` or a burst of packets, small enough to keep memory flat.
const QUEUE: usize = 4;

/// What went wrong moving one file's bytes.
#[derive(Debug, thiserror::Error)]
pub enum TransferError {
    /// Reading the source file failed.
    #[error("cannot read the file: {0}")]
    Read(#[source] std::io::Error),
    /// Writing the destination file failed.
    #[error("cannot write the file: {0}")]
    Write(#[source] std::io::Error),
    /// The source became shorter than announced while it was being sent.
    #[error("the file shrank from {expected} to {found} bytes while being sent; send it again once it stops changing")]
    SourceChanged {
        /// Size announced to the peer.
        expected: u64,
        /// Bytes actually read.
        found: u64,
    },
    /// The peer stopped sending before all the data arrived.
    #[error("the connection ended after {got} of {expected} bytes")]
    Truncated {
        /// Bytes received.
        got: u64,
        /// Bytes announced.
        expected: u64,
    },
    /// The stream failed.
    #[error("network error: {0}")]
    Network(#[source] std::io::Error),
    /// The receiver was told to stop (a newer transfer of the same file took over).
    #[error("stopped: a newer transfer of the same file took over")]
    Stopped,
}

/// Whether an I/O error means "no space left" (ENOSPC or EDQUOT).
pub fn is_disk_full(e: &std::io::Error) -> bool {
    e.kind() == std::io::ErrorKind::StorageFull
        || e.kind() == std::io::ErrorKind::QuotaExceeded
        || matches!(e.raw_os_error(), Some(libc::ENOSPC) | Some(libc::EDQUOT))
}

/// A shared rate limit (`--limit-rate`): every transfer using the same
/// pacer together moves at most `rate` bytes per second. It paces the disk
/// side, so a limited download reads slowly and flow control slows the
/// sender.
#[derive(Debug)]
pub struct Pacer {
    rate: u64,
    next: std::sync::Mutex<std::time::Instant>,
}

impl Pacer {
    /// A pacer for `rate` bytes per second.
    pub fn new(rate: u64) -> Self {
        Self {
            rate: rate.max(1),
            next: std::sync::Mutex::new(std::time::Instant::now()),
        }
    }

    /// Books `n` bytes and sleeps until they are due. Blocking.
    fn take(&self, n: usize) {
        let due = {
            let mut next = self.next.lock().unwrap_or_else(|e| e.into_inner());
            let now = std::time::Instant::now();
            let begin = (*next).max(now);
            *next = begin + Duration::from_secs_f64(n as f64 / self.rate as f64);
            *next
        };
        let now = std::time::Instant::now();
        if due > now {
            std::thread::sleep(due - now);
        }
    }
}

/// Where a transfer starts: `offset` bytes already at the receiver, and the
/// BLAKE3 state after hashing them, so the final digest covers the whole file.
#[derive(Debug, Clone, Default)]
pub struct Start {
    /// Bytes already in place.
    pub offset: u64,
    /// BLAKE3 of those bytes, not finalized.
    pub hasher: blake3::Hasher,
}

impl Start {
    /// The digest of the prefix, for comparing with the peer's.
    pub fn prefix_digest(&self) -> Digest {
        *self.hasher.finalize().as_bytes()
    }
}

/// Hashes the first `len` bytes of `file` from its start, leaving the file
/// positioned at `len`. Fails if the file is shorter. Blocking.
pub fn hash_prefix(file: &mut File, len: u64) -> std::io::Result<Start> {
    use std::io::Seek;
    file.seek(std::io::SeekFrom::Start(0))?;
    let mut hasher = blake3::Hasher::new();
    let copied = std::io::copy(&mut (&mut *file).take(len), &mut hasher)?;
    if copied != len {
        return Err(std::io::Error::new(
            std::io::ErrorKind::UnexpectedEof,
            format!("expected {len} bytes, found {copied}"),
        ));
    }
    Ok(Start {
        offset: len,
        hasher,
    })
}

/// Where to continue a file of `size` bytes whose first `offset` bytes the
/// peer holds, hashing to `digest`: after them if ours hash the same, else
/// from the start. Leaves `file` positioned there. Blocking.
pub fn matching_start(
    file: &mut File,
    size: u64,
    offset: u64,
    digest: &Digest,
) -> std::io::Result<Start> {
    use std::io::Seek;
    if offset > 0 && offset <= size {
        if let Ok(start) = hash_prefix(file, offset) {
            if start.prefix_digest() == *digest {
                return Ok(start);
            }
        }
    }
    file.seek(std::io::SeekFrom::Start(0))?;
    Ok(Start::default())
}

/// The BLAKE3 of all of `file`. Blocking.
pub fn file_digest(file: &mut File) -> std::io::Result<Digest> {
    let len = file.metadata()?.len();
    Ok(hash_prefix(file, len)?.prefix_digest())
}

/// Runs blocking filesystem work off the async threads.
pub async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    tokio::task::spawn_blocking(f)
        .await
        .expect("filesystem task panicked")
}

/// Sends the bytes of `file` from `start.offset` up to `size` to `out`
/// (`file` must be positioned at the offset), returning the BLAKE3 digest of
/// the whole file.
pub async fn send_file<W>(
    file: File,
    size: u64,
    start: Start,
    pace: Option<Arc<Pacer>>,
    out: &mut W,
    progress: &Advance<'_>,
) -> Result<Digest, TransferError>
where
    W: AsyncWrite + Unpin,
{
    let (tx, mut rx) = mpsc::channel::<Vec<u8>>(QUEUE);
    let reader = tokio::task::spawn_blocking(move || read_chunks(file, size, start, pace, tx));
    let mut net = Ok(());
    while let Some(chunk) = rx.recv().await {
        if let Err(e) = out.write_all(&chunk).await {
            net = Err(TransferError::Network(e));
            break;
        }
        progress(chunk.len() as u64);
    }
    drop(rx); // unblocks the reader if the network side gave up
    let disk = reader.await.expect("disk reader panicked");
    // A read error explains an early end of the queue better than the network.
    let digest = disk?;
    net?;
    Ok(digest)
}

fn read_chunks(
    mut file: File,
    size: u64,
    start: Start,
    pace: Option<Arc<Pacer>>,
    tx: mpsc::Sender<Vec<u8>>,
) -> Result<Digest, TransferError> {
    let mut hasher = start.hasher;
    let mut sent = start.offset;
    while sent < size {
        let want = (size - sent).min(CHUNK as u64) as usize;
        let mut buf = vec![0u8; want];
        let mut filled = 0;
        while filled < want {
            match file.read(&mut buf[filled..]) {
                Ok(0) => {
                    return Err(TransferError::SourceChanged {
                        expected: size,
                        found: sent + filled as u64,
                    })
                }
                Ok(n) => filled += n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(TransferError::Read(e)),
            }
        }
        hasher.update(&buf);
        sent += want as u64;
        if let Some(p) = &pace {
            p.take(want);
        }
        if tx.blocking_send(buf).is_err() {
            break; // the network side failed and reports why
        }
    }
    Ok(*hasher.finalize().as_bytes())
}

/// Receives the bytes from `start.offset` up to `size` from `input` into
/// `file` (positioned at the offset), fsyncs it, and returns the BLAKE3
/// digest of the whole file. If `stop` completes first, the bytes already
/// received are written and synced, and the result is
/// [`TransferError::Stopped`]: the partial file is consistent for a resume.
pub async fn receive_file<R>(
    input: &mut R,
    size: u64,
    file: File,
    start: Start,
    pace: Option<Arc<Pacer>>,
    progress: &Advance<'_>,
    stop: impl std::future::Future<Output = ()>,
) -> Result<Digest, TransferError>
where
    R: AsyncRead + Unpin,
{
    let (tx, rx) = mpsc::channel::<Vec<u8>>(QUEUE);
    let offset = start.offset;
    let writer = tokio::task::spawn_blocking(move || write_chunks(file, start, pace, rx));
    tokio::pin!(stop);
    let net = async {
        let mut got = offset;
        while got < size {
            let want = (size - got).min(CHUNK as u64) as usize;
            let mut buf = vec![0u8; want];
            let mut filled = 0;
            while filled < want {
                let n = tokio::select! {
                    r = input.read(&mut buf[filled..]) => r.map_err(TransferError::Network)?,
                    _ = &mut stop => {
                        // Keep what arrived: a resume continues after it.
                        buf.truncate(filled);
                        let _ = tx.send(buf).await;
                        return Err(TransferError::Stopped);
                    }
                };
                if n == 0 {
                    return Err(TransferError::Truncated {
                        got: got + filled as u64,
                        expected: size,
                    });
                }
                filled += n;
                progress(n as u64);
            }
            got += want as u64;
            if tx.send(buf).await.is_err() {
                break; // the writer failed and reports why
            }
        }
        Ok(())
    }
    .await;
    drop(tx);
    let disk = writer.await.expect("disk writer panicked");
    // A disk error (say, a full disk) is the real cause when both failed.
    let digest = disk?;
    net?;
    Ok(digest)
}

fn write_chunks(
    mut file: File,
    start: Start,
    pace: Option<Arc<Pacer>>,
    mut rx: mpsc::Receiver<Vec<u8>>,
) -> Result<Digest, TransferError> {
    let mut hasher = start.hasher;
    let mut written = start.offset;
    while let Some(buf) = rx.blocking_recv() {
        if let Some(p) = &pace {
            p.take(buf.len());
        }
        file.write_all(&buf).map_err(TransferError::Write)?;
        start_writeback(&file, written, buf.len() as u64);
        written += buf.len() as u64;
        hasher.update(&buf);
    }
    file.sync_all().map_err(TransferError::Write)?;
    Ok(*hasher.finalize().as_bytes())
}

/// Asks the kernel to start writing a just-written range to disk now, while
/// the network keeps delivering, so the final fsync has little left to wait
/// for. Without it all the dirty pages are flushed at the end, in series
/// with the transfer. A hint only: errors surface at the fsync.
#[cfg(target_os = "linux")]
fn start_writeback(file: &File, offset: u64, len: u64) {
    use std::os::fd::AsRawFd;
    // SAFETY: sync_file_range only reads its integer arguments; the fd is
    // valid for the duration of the call because `file` is borrowed.
    unsafe {
        libc::sync_file_range(
            file.as_raw_fd(),
            offset as libc::off64_t,
            len as libc::off64_t,
            libc::SYNC_FILE_RANGE_WRITE,
        );
    }
}

#[cfg(not(target_os = "linux"))]
fn start_writeback(_file: &File, _offset: u64, _len: u64) {}

/// A file being received: a hidden temporary that becomes the destination
/// only through [`IncomingFile::commit`]. Dropped uncommitted, the temporary
/// is deleted, so a failed transfer leaves nothing behind.
///
/// Both places are held as open directory handles, never re-resolved by
/// path: the server opens them beneath its root with cap-std, so a directory
/// swapped for a symlink mid-transfer cannot redirect the commit. The
/// destination is always a single name inside `dest_dir`.
#[derive(Debug)]
pub struct IncomingFile {
    tmp_dir: Dir,
    tmp_name: String,
    file: File,
    dest_dir: Dir,
    dest_name: String,
    /// The destination as shown in messages.
    label: PathBuf,
    done: bool,
    /// A resumable partial: kept when dropped uncommitted.
    keep: bool,
}

/// Why a received file could not be put under its final name.
#[derive(Debug, thiserror::Error)]
pub enum CommitError {
    /// Something now exists under the final name and overwriting was not asked for.
    #[error("{0} already exists")]
    Exists(PathBuf),
    /// The rename or metadata update failed.
    #[error("{path}: {source}")]
    Io {
        /// The destination.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
}

/// Prefix of the temporaries [`IncomingFile`] creates.
pub const TMP_PREFIX: &str = ".qxfer-tmp-";

impl IncomingFile {
    /// Creates the temporary beside the local path `dest`, whose directory
    /// must exist (the client's downloads).
    pub fn create(dest: &Path) -> std::io::Result<Self> {
        let dir = match dest.parent() {
            Some(d) if !d.as_os_str().is_empty() => d,
            _ => Path::new("."),
        };
        let name = dest
            .file_name()
            .and_then(|n| n.to_str())
            .ok_or_else(|| std::io::Error::other("destination has no UTF-8 file name"))?;
        let dir = Dir::open_ambient_dir(dir, ambient_authority())?;
        Self::create_in(dir.try_clone()?, dir, name, dest.to_owned())
    }

    /// Creates the temporary (mode 0600, a random name starting with
    /// [`TMP_PREFIX`]) in `tmp_dir`, to become `dest_name` in `dest_dir`
    /// (which must be on the same filesystem). `label` names it in errors.
    pub fn create_in(
        tmp_dir: Dir,
        dest_dir: Dir,
        dest_name: &str,
        label: PathBuf,
    ) -> std::io::Result<Self> {
        debug_assert!(!dest_name.contains('/') && !dest_name.is_empty());
        let mut opts = OpenOptions::new();
        opts.read(true).write(true).create_new(true).mode(0o600);
        let mut attempt = 0;
        loop {
            let tmp_name = format!("{TMP_PREFIX}{:016x}", random_u64());
            match tmp_dir.open_with(&tmp_name, &opts) {
                Ok(f) => {
                    return Ok(Self {
                        tmp_dir,
                        tmp_name,
                        file: f.into_std(),
                        dest_dir,
                        dest_name: dest_name.to_owned(),
                        label,
                        done: false,
                        keep: false,
                    })
                }
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists && attempt < 8 => {
                    attempt += 1
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// Opens the resumable partial `name` in `tmp_dir` (creating it, mode
    /// 0600, if missing), to become `dest_name` in `dest_dir`. Unlike a
    /// temporary it survives a failed transfer, for the next attempt to
    /// continue; [`Self::discard`] removes it. An exclusive advisory lock
    /// keeps two transfers from writing the same partial at once.
    pub fn open_partial(
        tmp_dir: Dir,
        name: &str,
        dest_dir: Dir,
        dest_name: &str,
        label: PathBuf,
    ) -> std::io::Result<Self> {
        let mut opts = OpenOptions::new();
        opts.read(true).write(true).create(true).mode(0o600);
        let file = tmp_dir.open_with(name, &opts)?.into_std();
        #[cfg(unix)]
        rustix::fs::flock(&file, rustix::fs::FlockOperation::NonBlockingLockExclusive).map_err(
            |e| {
                if e == rustix::io::Errno::WOULDBLOCK {
                    std::io::Error::new(
                        std::io::ErrorKind::ResourceBusy,
                        "another transfer of this file is in progress",
                    )
                } else {
                    e.into()
                }
            },
        )?;
        Ok(Self {
            tmp_dir,
            tmp_name: name.to_owned(),
            file,
            dest_dir,
            dest_name: dest_name.to_owned(),
            label,
            done: false,
            keep: true,
        })
    }

    /// Bytes already in the partial.
    pub fn held(&self) -> std::io::Result<u64> {
        Ok(self.file.metadata()?.len())
    }

    /// Hashes the first `len` bytes and positions the file after them, ready
    /// to continue there. Blocking.
    pub fn prefix(&self, len: u64) -> std::io::Result<Start> {
        hash_prefix(&mut self.file.try_clone()?, len)
    }

    /// Throws away the contents: the transfer starts from zero.
    pub fn restart(&self) -> std::io::Result<Start> {
        use std::io::Seek;
        self.file.set_len(0)?;
        (&self.file).seek(std::io::SeekFrom::Start(0))?;
        Ok(Start::default())
    }

    /// Deletes the partial (its data is known to be bad).
    pub fn discard(mut self) {
        self.keep = false;
    }

    /// A handle for writing the data (it shares the file position).
    pub fn file(&self) -> std::io::Result<File> {
        self.file.try_clone()
    }

    /// Applies `meta` (mode without group/other write and set-id bits; mtime),
    /// syncs, and renames the temporary to the destination: atomically
    /// replacing it if `overwrite`, else failing if it exists (renameat2 with
    /// RENAME_NOREPLACE, so there is no check-then-rename race).
    pub fn commit(mut self, meta: &FileMeta, overwrite: bool) -> Result<(), CommitError> {
        let label = self.label.clone();
        let io = |source| CommitError::Io {
            path: label.clone(),
            source,
        };
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = meta.mode.unwrap_or(0o644) & 0o755;
            self.file
                .set_permissions(std::fs::Permissions::from_mode(mode))
                .map_err(io)?;
        }
        if let Some(t) = meta.mtime.and_then(to_system_time) {
            self.file.set_modified(t).map_err(io)?;
        }
        self.file.sync_all().map_err(io)?;
        if overwrite {
            self.tmp_dir
                .rename(&self.tmp_name, &self.dest_dir, &self.dest_name)
                .map_err(io)?;
        } else {
            match rename_noreplace(
                &self.tmp_dir,
                &self.tmp_name,
                &self.dest_dir,
                &self.dest_name,
            ) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                    return Err(CommitError::Exists(self.label.clone()))
                }
                Err(e) => return Err(io(e)),
            }
        }
        self.done = true;
        // Make the rename itself durable.
        sync_dir(&self.dest_dir).map_err(io)?;
        Ok(())
    }
}

impl Drop for IncomingFile {
    fn drop(&mut self) {
        // An empty partial is not worth keeping (the transfer never started).
        let empty = || self.held().map(|n| n == 0).unwrap_or(true);
        if !self.done && (!self.keep || empty()) {
            let _ = self.tmp_dir.remove_file(&self.tmp_name);
        }
    }
}

/// Applies a tree transfer's directory metadata to `dir`.
pub fn apply_dir_meta(dir: &Dir, meta: &crate::protocol::DirMeta) -> std::io::Result<()> {
    set_dir_meta(&open_dir_handle(dir)?, meta)
}

/// Sets permission bits (without group/other write and set-id bits, as for
/// files) and mtime on an open directory.
pub fn set_dir_meta(dir: &File, meta: &crate::protocol::DirMeta) -> std::io::Result<()> {
    if let Some(mode) = meta.mode {
        use std::os::unix::fs::PermissionsExt;
        dir.set_permissions(std::fs::Permissions::from_mode(mode & 0o755))?;
    }
    if let Some(t) = meta.mtime.and_then(to_system_time) {
        dir.set_modified(t)?;
    }
    Ok(())
}

/// A readable handle on the directory `dir` refers to. cap-std holds
/// directories as O_PATH handles, which can be neither synced nor changed,
/// so this opens "." beneath it.
fn open_dir_handle(dir: &Dir) -> std::io::Result<File> {
    use rustix::fs::{openat, Mode, OFlags};
    let fd = openat(
        dir,
        ".",
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
        Mode::empty(),
    )?;
    Ok(File::from(fd))
}

/// fsyncs the directory `dir` refers to.
fn sync_dir(dir: &Dir) -> std::io::Result<()> {
    open_dir_handle(dir)?.sync_all()
}

/// Renames `from` in `from_dir` to `to` in `to_dir` unless `to` exists.
/// Where the filesystem lacks RENAME_NOREPLACE, a hard link (which never
/// replaces) followed by removing the old name does the same.
fn rename_noreplace(from_dir: &Dir, from: &str, to_dir: &Dir, to: &str) -> std::io::Result<()> {
    #[cfg(any(target_os = "linux", target_os = "android"))]
    {
        use rustix::fs::{renameat_with, RenameFlags};
        match renameat_with(from_dir, from, to_dir, to, RenameFlags::NOREPLACE) {
            Ok(()) => return Ok(()),
            Err(e) if e == rustix::io::Errno::INVAL || e == rustix::io::Errno::NOSYS => {}
            Err(e) => return Err(e.into()),
        }
    }
    from_dir.hard_link(from, to_dir, to)?;
    from_dir.remove_file(from)
}

/// A random number for temporary names (from the OS, via ring).
fn random_u64() -> u64 {
    use ring::rand::SecureRandom;
    let mut b = [0u8; 8];
    ring::rand::SystemRandom::new()
        .fill(&mut b)
        .expect("the OS random source works");
    u64::from_le_bytes(b)
}

/// The metadata qxfer carries for a local file.
pub fn file_meta(md: &Metadata) -> FileMeta {
    #[cfg(unix)]
    let mode = {
        use std::os::unix::fs::PermissionsExt;
        Some(md.permissions().mode() & 0o7777)
    };
    #[cfg(not(unix))]
    let mode = None;
    FileMeta {
        size: md.len(),
        mtime: md.modified().ok().and_then(to_timestamp),
        mode,
    }
}

/// Converts a `SystemTime` to the wire timestamp.
pub fn to_timestamp(t: SystemTime) -> Option<Timestamp> {
    match t.duration_since(UNIX_EPOCH) {
        Ok(d) => Some(Timestamp {
            secs: i64::try_from(d.as_secs()).ok()?,
            nanos: d.subsec_nanos(),
        }),
        Err(e) => {
            let d = e.duration();
            let mut secs = -i64::try_from(d.as_secs()).ok()?;
            let mut nanos = d.subsec_nanos();
            if nanos > 0 {
                secs -= 1;
                nanos = 1_000_000_000 - nanos;
            }
            Some(Timestamp { secs, nanos })
        }
    }
}

/// Converts a wire timestamp to a `SystemTime`, if it is representable.
pub fn to_system_time(t: Timestamp) -> Option<SystemTime> {
    if t.nanos >= 1_000_000_000 {
        return None;
    }
    if t.secs >= 0 {
        UNIX_EPOCH.checked_add(Duration::new(t.secs as u64, t.nanos))
    } else {
        UNIX_EPOCH
            .checked_sub(Duration::from_secs(t.secs.unsigned_abs()))?
            .checked_add(Duration::from_nanos(u64::from(t.nanos)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn file_round_trips_through_a_pipe_with_matching_digests() {
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().join("src");
        let data: Vec<u8> = (0..3 * CHUNK + 17).map(|i| (i * 31 % 251) as u8).collect();
        std::fs::write(&src, &data).unwrap();
        let dest = dir.path().join("dest");
        let incoming = IncomingFile::create(&dest).unwrap();
        let (mut a, mut b) = tokio::io::duplex(64 * 1024);
        let size = data.len() as u64;
        let out = incoming.file().unwrap();
        let bar = |_: u64| {};
        let (sent, got) = tokio::join!(
            async {
                let d = send_file(
                    File::open(&src).unwrap(),
                    size,
                    Start::default(),
                    None,
                    &mut a,
                    &bar,
                )
                .await;
                drop(a);
                d
            },
            receive_file(
                &mut b,
                size,
                out,
                Start::default(),
                None,
                &bar,
                std::future::pending()
            )
        );
        assert_eq!(sent.unwrap(), got.unwrap());
        assert!(!dest.exists(), "nothing under the final name before commit");
        let meta = file_meta(&std::fs::metadata(&src).unwrap());
        incoming.commit(&meta, false).unwrap();
        assert_eq!(std::fs::read(&dest).unwrap(), data);
        assert_eq!(
            std::fs::metadata(&dest).unwrap().modified().unwrap(),
            std::fs::metadata(&src).unwrap().modified().unwrap()
        );
    }

    #[tokio::test]
    async fn truncated_stream_is_an_error_and_leaves_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let dest = dir.path().join("dest");
        let incoming = IncomingFile::create(&dest).unwrap();
        let mut short: &[u8] = &[1, 2, 3];
        let err = receive_file(
            &mut short,
            10,
            incoming.file().unwrap(),
            Start::default(),
            None,
            &|_| {},
            std::future::pending(),
        )
        .await
        .unwrap_err();
        assert!(
            matches!(
                err,
                TransferError::Truncated {
                    got: 3,
                    expected: 10
                }
            ),
            "{err:?}"
        );
        drop(incoming);
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
    }

    #[tokio::test]
    async fn shrunken_source_is_reported() {
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().join("src");
        std::fs::write(&src, b"abc").unwrap();
        let mut sink = tokio::io::sink();
        let err = send_file(
            File::open(&src).unwrap(),
            10,
            Start::default(),
            None,
            &mut sink,
            &|_| {},
        )
        .await
        .unwrap_err();
        assert!(matches!(
            err,
            TransferError::SourceChanged {
                expected: 10,
                found: 3
            }
        ));
    }

    #[test]
    fn commit_without_overwrite_refuses_existing() {
        let dir = tempfile::tempdir().unwrap();
        let dest = dir.path().join("dest");
        std::fs::write(&dest, b"old").unwrap();
        let incoming = IncomingFile::create(&dest).unwrap();
        incoming.file().unwrap().write_all(b"new").unwrap();
        let meta = FileMeta {
            size: 3,
            mtime: None,
            mode: None,
        };
        assert!(matches!(
            incoming.commit(&meta, false),
            Err(CommitError::Exists(_))
        ));
        assert_eq!(std::fs::read(&dest).unwrap(), b"old");
        assert_eq!(
            std::fs::read_dir(dir.path()).unwrap().count(),
            1,
            "temporary removed"
        );
        let incoming = IncomingFile::create(&dest).unwrap();
        incoming.file().unwrap().write_all(b"new").unwrap();
        incoming.commit(&meta, true).unwrap();
        assert_eq!(std::fs::read(&dest).unwrap(), b"new");
    }

    #[test]
    fn timestamps_convert_both_ways() {
        for t in [
            UNIX_EPOCH + Duration::new(1_700_000_000, 123),
            UNIX_EPOCH - Duration::new(5, 250),
            UNIX_EPOCH,
        ] {
            assert_eq!(to_system_time(to_timestamp(t).unwrap()), Some(t));
        }
    }
}

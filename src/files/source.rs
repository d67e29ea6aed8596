//! A file's bytes as a delta or a hash reads them: the `ByteSource` a store or a local file offers, read in stretches into reused memory.

use std::fs::File;
use std::sync::Arc;

use async_trait::async_trait;
use bytes::Bytes;
use futures::stream::{BoxStream, StreamExt};

use crate::protocol::{ChunkSum, Digest};

use super::{blocking, Description, Descriptions, FileKey, TransferError, CHUNK};

/// A file's bytes as a delta reads them: a local file, or a store's file
/// (the old version a receiver holds, or the new one a server sends).
#[async_trait]
pub(crate) trait ByteSource: Send + Sync {
    /// The bytes `from..to`, as they come. A file that ends before `to`
    /// yields an error (of kind `UnexpectedEof`) when the stream ends.
    async fn range(&self, from: u64, to: u64) -> std::io::Result<ByteStream>;

    /// Fails if the file changed since it was opened (it was read while
    /// being written). A store whose reads are pinned to one version
    /// cannot change under them and says so.
    async fn check_unchanged(&self) -> Result<(), TransferError> {
        Ok(())
    }

    /// The local file behind it, if it is one: a delta against it may be
    /// made by sharing its data (see exchange's `assemble_cloned`).
    fn as_file(&self) -> Option<&FileBytes> {
        None
    }
}

/// What [`ByteSource::range`] gives.
pub(crate) type ByteStream = BoxStream<'static, std::io::Result<Bytes>>;

/// A local file read through the disk pool, a chunk at a time. A clone
/// shares the open file, the version it was opened as and the cache.
#[derive(Clone)]
pub(crate) struct FileBytes {
    pub(crate) file: Arc<File>,
    pub(crate) before: Option<Snapshot>,
    /// Which version of which file it is, for the descriptions cache.
    pub(crate) key: Option<FileKey>,
    /// What is remembered of files' chunks where this file was opened
    /// (the server's store, the client's connection).
    pub(crate) descriptions: Descriptions,
}

impl FileBytes {
    /// `file`, its chunks recalled from and remembered in `descriptions`.
    pub(crate) fn new(file: File, descriptions: Descriptions) -> Self {
        let before = Snapshot::of(&file);
        let key = FileKey::of(&file);
        Self {
            file: Arc::new(file),
            before,
            key,
            descriptions,
        }
    }

    /// The file for reading in order from `offset` (its own descriptor's
    /// position: the reads here are positional and never move it).
    pub(crate) fn reader_at(&self, offset: u64) -> std::io::Result<File> {
        use std::io::Seek;
        let mut file = self.file.try_clone()?;
        file.seek(std::io::SeekFrom::Start(offset))?;
        Ok(file)
    }

    /// Forgets what is kept of this file: a delta built on it failed its
    /// hash, and whatever was wrong is not used again.
    pub(crate) fn forget(&self) {
        if let Some(key) = &self.key {
            self.descriptions.forget(key);
        }
    }

    /// What is remembered of the file cut into chunks of average `avg`
    /// (see `described`), if it is `size` bytes as expected.
    pub(crate) fn recall(&self, size: u64, avg: u32) -> Option<Description> {
        let key = self.key.as_ref()?;
        let d = self.descriptions.recall(key, avg)?;
        (d.chunks.iter().map(|c| u64::from(c.len)).sum::<u64>() == size).then_some(d)
    }

    /// Remembers the file's chunks (and digest), if it did not change
    /// while they were computed.
    pub(crate) async fn remember(&self, avg: u32, chunks: Arc<[ChunkSum]>, digest: Option<Digest>) {
        if let Some(key) = self.key {
            if self.check_unchanged().await.is_ok() {
                let values = None;
                self.descriptions.remember(
                    key,
                    avg,
                    Description {
                        chunks,
                        digest,
                        values,
                    },
                );
            }
        }
    }
}

#[async_trait]
impl ByteSource for FileBytes {
    async fn range(&self, from: u64, to: u64) -> std::io::Result<ByteStream> {
        let file = self.file.clone();
        let stream = futures::stream::try_unfold(from, move |at| {
            let file = file.clone();
            async move {
                if at >= to {
                    return Ok(None);
                }
                let want = (to - at).min(CHUNK as u64) as usize;
                let buf = blocking(move || read_exact_at(&file, at, want)).await?;
                Ok(Some((Bytes::from(buf), at + want as u64)))
            }
        });
        Ok(stream.boxed())
    }

    fn as_file(&self) -> Option<&FileBytes> {
        Some(self)
    }

    async fn check_unchanged(&self) -> Result<(), TransferError> {
        let (file, before) = (self.file.clone(), self.before);
        let after = blocking(move || Snapshot::of(&file)).await;
        match (before, after) {
            (Some(b), Some(a)) if b.size != a.size => {
                Err(TransferError::ChangedWhileSent("its size changed"))
            }
            (Some(b), Some(a)) if b != a => {
                Err(TransferError::ChangedWhileSent("it was written to"))
            }
            _ => Ok(()),
        }
    }
}

/// The `want` bytes of `file` at `at`, read into memory that is not
/// zeroed first (positional reads: the descriptor's offset, which its
/// clones share, never moves). Zeroing a fresh buffer for every read cost
/// a tenth of a delta's cut (docs/BENCHMARKS.md).
pub(crate) fn read_exact_at(file: &File, at: u64, want: usize) -> std::io::Result<Vec<u8>> {
    let mut buf = Vec::new();
    read_exact_into(file, at, want, &mut buf)?;
    Ok(buf)
}

/// [`read_exact_at`] into `buf` (emptied first; its memory is reused).
pub(crate) fn read_exact_into(
    file: &File,
    at: u64,
    want: usize,
    buf: &mut Vec<u8>,
) -> std::io::Result<()> {
    buf.clear();
    buf.reserve_exact(want);
    while buf.len() < want {
        let pos = at + buf.len() as u64;
        // Fills the spare capacity, which may be more than `want`: what
        // is read past it is dropped below.
        match rustix::io::pread(file, rustix::buffer::spare_capacity(buf), pos) {
            Ok(0) => return Err(std::io::ErrorKind::UnexpectedEof.into()),
            Ok(_) => {}
            Err(rustix::io::Errno::INTR) => {}
            Err(e) => return Err(e.into()),
        }
    }
    buf.truncate(want);
    Ok(())
}

/// Reads a source in order, a stretch of pieces of about [`CHUNK`]
/// bytes at a time: a local file in one blocking call a stretch, into the
/// memory of pieces given back (a fresh buffer costs a page fault every
/// 4 KiB, a fifth of a delta's cut of a 1 GiB file); any other source as
/// [`Pieces`] streams it.
pub(crate) struct Stretches {
    pub(crate) how: StretchesOf,
    pub(crate) at: u64,
    pub(crate) to: u64,
    pub(crate) spare: Vec<Vec<u8>>,
}

pub(crate) enum StretchesOf {
    File(Arc<File>),
    Stream(Pieces),
}

/// How much a cut, a description or a hash reads at a time (while the
/// stretch before is worked on).
pub(crate) const STRETCH: u64 = 4 << 20;

/// Pieces given back that [`Stretches`] keeps for its next reads.
pub(crate) const SPARE_PIECES: usize = 16;

impl Stretches {
    /// Reads `from..to` of `src`.
    pub(crate) async fn open(src: &dyn ByteSource, from: u64, to: u64) -> std::io::Result<Self> {
        let how = match src.as_file() {
            Some(f) => StretchesOf::File(f.file.clone()),
            None => StretchesOf::Stream(Pieces::open(src, from, to).await?),
        };
        Ok(Self {
            how,
            at: from,
            to,
            spare: Vec::new(),
        })
    }

    /// The next pieces, at least `len` bytes of them (fewer at the end,
    /// none past it).
    pub(crate) async fn next(&mut self, len: u64) -> std::io::Result<Vec<Arc<Vec<u8>>>> {
        let to = (self.at + len).min(self.to);
        let mut out = Vec::new();
        match &mut self.how {
            StretchesOf::File(file) => {
                let (file, from, mut spare) =
                    (file.clone(), self.at, std::mem::take(&mut self.spare));
                let (read, spare) = blocking(move || {
                    let mut at = from;
                    let mut read = Vec::new();
                    while at < to {
                        let want = (to - at).min(CHUNK as u64) as usize;
                        let mut buf = spare.pop().unwrap_or_default();
                        if let Err(e) = read_exact_into(&file, at, want, &mut buf) {
                            return (Err(e), spare);
                        }
                        at += want as u64;
                        read.push(Arc::new(buf));
                    }
                    (Ok(read), spare)
                })
                .await;
                self.spare = spare;
                out = read?;
            }
            StretchesOf::Stream(pieces) => {
                let mut at = self.at;
                while at < to {
                    let p = pieces
                        .next()
                        .await?
                        .ok_or_else(|| std::io::Error::from(std::io::ErrorKind::UnexpectedEof))?;
                    at += p.len() as u64;
                    out.push(Arc::new(p));
                }
            }
        }
        self.at += out.iter().map(|p| p.len() as u64).sum::<u64>();
        Ok(out)
    }

    /// Pieces done with: their memory is read into again.
    pub(crate) fn give_back(&mut self, pieces: impl IntoIterator<Item = Arc<Vec<u8>>>) {
        for p in pieces {
            if self.spare.len() >= SPARE_PIECES {
                break;
            }
            if let Ok(buf) = Arc::try_unwrap(p) {
                self.spare.push(buf);
            }
        }
    }
}

/// Reads `from..to` of `src` in pieces of about [`CHUNK`] bytes (a store
/// streams smaller ones), checking that exactly that many come.
pub(crate) struct Pieces {
    pub(crate) stream: ByteStream,
    pub(crate) left: u64,
    pub(crate) held: Vec<u8>,
}

impl Pieces {
    pub(crate) async fn open(src: &dyn ByteSource, from: u64, to: u64) -> std::io::Result<Self> {
        Ok(Self {
            stream: src.range(from, to).await?,
            left: to - from,
            held: Vec::new(),
        })
    }

    /// The next piece, or None once all arrived.
    pub(crate) async fn next(&mut self) -> std::io::Result<Option<Vec<u8>>> {
        let want = self.left.min(CHUNK as u64) as usize;
        if want == 0 {
            return Ok(None);
        }
        while self.held.len() < want {
            match self.stream.next().await {
                Some(bytes) => {
                    let bytes = bytes?;
                    if (self.held.len() + bytes.len()) as u64 > self.left {
                        return Err(std::io::Error::new(
                            std::io::ErrorKind::InvalidData,
                            "the file is longer than announced",
                        ));
                    }
                    if self.held.is_empty() && bytes.len() == want {
                        self.held = Vec::from(bytes);
                    } else {
                        self.held.extend_from_slice(&bytes);
                    }
                }
                None => {
                    return Err(std::io::Error::new(
                        std::io::ErrorKind::UnexpectedEof,
                        "the file ended early",
                    ))
                }
            }
        }
        let rest = self.held.split_off(want);
        let piece = std::mem::replace(&mut self.held, rest);
        self.left -= want as u64;
        Ok(Some(piece))
    }
}

/// The BLAKE3 of the `size` bytes of `src`, hashed off the async threads.
pub(crate) async fn hash_source(src: &dyn ByteSource, size: u64) -> std::io::Result<Digest> {
    let mut reader = Stretches::open(src, 0, size).await?;
    let mut hasher = blake3::Hasher::new();
    let mut fresh = reader.next(STRETCH).await?;
    while !fresh.is_empty() {
        // The next stretch is read while this one is hashed.
        let (next, (h, back)) = tokio::join!(
            reader.next(STRETCH),
            blocking(move || {
                for p in &fresh {
                    hasher.update(p);
                }
                (hasher, fresh)
            })
        );
        hasher = h;
        reader.give_back(back);
        fresh = next?;
    }
    Ok(*hasher.finalize().as_bytes())
}

/// No earlier version (nothing under the name): a description of it is
/// empty, and a delta against it can copy nothing.
pub(crate) struct NoVersion;

#[async_trait]
impl ByteSource for NoVersion {
    async fn range(&self, from: u64, to: u64) -> std::io::Result<ByteStream> {
        if from >= to {
            return Ok(futures::stream::empty().boxed());
        }
        Err(std::io::Error::new(
            std::io::ErrorKind::NotFound,
            "there is no earlier version",
        ))
    }
}

/// Files up to this size are read whole in the disk call that opens them
/// ([`read_small`]): a small file's second trip to the disk threads, and
/// the task switches around it, cost more than its bytes. Small enough
/// that framing it (zstd) outside the disk threads takes no time worth
/// one.
pub(crate) const SMALL_READ_MAX: u64 = 64 * 1024;

/// Spare bytes [`read_small`] leaves before the data: room for the wire's
/// block header, so a block sent raw needs no copy.
pub(crate) const SMALL_READ_ROOM: usize = crate::protocol::BlockHeader::LEN;

/// A small file read whole: [`SMALL_READ_ROOM`] spare bytes, then its
/// bytes; and their BLAKE3.
pub(crate) struct SmallRead {
    pub(crate) buf: Vec<u8>,
    pub(crate) digest: Digest,
}

/// Reads all `size` bytes of `file` (positioned at its start; `size` at
/// most [`SMALL_READ_MAX`]) and hashes them, checking, as a sender does at
/// the end of any file, that it ends there and was not written to while
/// read. Blocking.
pub(crate) fn read_small(mut file: File, size: u64) -> Result<SmallRead, TransferError> {
    use std::io::Read;
    debug_assert!(size <= SMALL_READ_MAX);
    let before = Snapshot::of(&file);
    match before {
        Some(b) if b.size < size => {
            return Err(TransferError::SourceChanged {
                expected: size,
                found: b.size,
            })
        }
        Some(b) if b.size > size => return Err(TransferError::ChangedWhileSent("it grew")),
        _ => {}
    }
    let room = SMALL_READ_ROOM;
    let mut buf = vec![0u8; room + size as usize];
    let mut filled = room;
    // One byte more than the size: reading it means the file grew.
    let mut probe = [0u8; 1];
    loop {
        let got = if filled < buf.len() {
            file.read(&mut buf[filled..])
        } else {
            file.read(&mut probe)
        };
        match got {
            Ok(0) if filled < buf.len() => {
                return Err(TransferError::SourceChanged {
                    expected: size,
                    found: (filled - room) as u64,
                })
            }
            Ok(0) => break,
            Ok(_) if filled == buf.len() => return Err(TransferError::ChangedWhileSent("it grew")),
            Ok(n) => filled += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(TransferError::Read(e)),
        }
    }
    if let (Some(before), Some(after)) = (before, Snapshot::of(&file)) {
        if before.size != after.size {
            return Err(TransferError::ChangedWhileSent("its size changed"));
        }
        if before != after {
            return Err(TransferError::ChangedWhileSent("it was written to"));
        }
    }
    let digest = *blake3::hash(&buf[room..]).as_bytes();
    Ok(SmallRead { buf, digest })
}

/// What tells a file's versions apart without reading it: size,
/// modification time and change time (the latter moves on any write, even
/// one that restores the mtime).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Snapshot {
    pub(crate) size: u64,
    mtime: (i64, i64),
    ctime: (i64, i64),
}

impl Snapshot {
    #[cfg(unix)]
    pub(crate) fn of(file: &File) -> Option<Self> {
        use std::os::unix::fs::MetadataExt;
        let md = file.metadata().ok()?;
        Some(Self {
            size: md.len(),
            mtime: (md.mtime(), md.mtime_nsec()),
            ctime: (md.ctime(), md.ctime_nsec()),
        })
    }

    #[cfg(not(unix))]
    pub(crate) fn of(_file: &File) -> Option<Self> {
        None
    }
}

//! Delta transfer, both ends: the receiver describes the version it holds in content-defined chunks, the sender sends its new version as copies of those chunks and new blocks, and the receiver assembles the result.
//!
//! Chunks are cut with FastCDC (2020), so an insertion or a deletion moves
//! only the chunks around it; a fixed-block scheme would see every block
//! after an insertion at the start as new. Each chunk is named by its
//! BLAKE3. Whatever the delta says, the receiver checks the file it
//! assembled against the sender's BLAKE3 of the whole new version before
//! anything is committed, so a chunk that matched by accident, a hostile
//! sender's copies or an old version that changed meanwhile can only fail
//! the transfer, never corrupt a file.
//!
//! The sequence on the wire: the receiver's [`DeltaBase`] and its
//! [`ChunkBatch`]es ([`send_chunks`] / [`read_chunks`]), then the sender's
//! [`DeltaOp`]s ([`send_delta`] / [`assemble`]), then the usual trailer.
//! The server's put and get handlers and the client's put and get all use
//! these four; who describes and who sends depends only on the direction.

use std::collections::{HashMap, VecDeque};
use std::fs::File;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use async_trait::async_trait;
use bytes::Bytes;
use fastcdc::v2020::{cut, select_masks, Normalization};
use futures::stream::{BoxStream, StreamExt};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::protocol::{
    read_frame, write_frame, BlockHeader, ChunkBatch, ChunkSum, DeltaBase, DeltaOp, Digest,
    FrameError, CHUNKS_PER_BATCH, MAX_AVG_CHUNK, MAX_DELTA_CHUNKS, MIN_AVG_CHUNK,
};

use super::blocks::{Blocks, BLOCK};
use super::described;
use super::*;

/// Files smaller than this are sent whole even when an older version is
/// there: describing the old version and matching chunks costs a round
/// trip and a read of both versions, which for a small file takes longer
/// than sending it (docs/BENCHMARKS.md, "Delta threshold").
pub(crate) const DELTA_MIN: u64 = 1 << 20;

/// Chunks the receiver aims for when it picks the average size from its
/// version's size: 8,192 chunks of 16 KiB up to 128 MiB, then larger
/// chunks (a 1 GiB file: 128 KiB), so the description stays near
/// 300 KB and the sender's index near 1 MiB.
const CHUNKS_PER_FILE: u64 = 8192;

/// How a file is cut into chunks: FastCDC 2020 with normalisation level 1,
/// the minimum a quarter and the maximum four times the average.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Cutter {
    min: usize,
    avg: usize,
    max: usize,
    mask_s: u64,
    mask_l: u64,
}

impl Cutter {
    /// The cutter a receiver uses for its version of `size` bytes.
    pub(crate) fn for_size(size: u64) -> Self {
        let avg = (size / CHUNKS_PER_FILE)
            .next_power_of_two()
            .clamp(u64::from(MIN_AVG_CHUNK), u64::from(MAX_AVG_CHUNK));
        Self::with_avg(avg as u32).expect("a power of two within the bounds")
    }

    /// The cutter of average `avg`, if it is one a [`DeltaBase`] may name.
    pub(crate) fn with_avg(avg: u32) -> Option<Self> {
        if !avg.is_power_of_two() || !(MIN_AVG_CHUNK..=MAX_AVG_CHUNK).contains(&avg) {
            return None;
        }
        let avg = avg as usize;
        let (mask_s, mask_l) = select_masks(avg, Normalization::Level1);
        Some(Self {
            min: avg / 4,
            avg,
            max: avg * 4,
            mask_s,
            mask_l,
        })
    }

    /// Whether a version of `size` bytes can be described within
    /// [`MAX_DELTA_CHUNKS`] however it is cut (every chunk the minimum):
    /// up to 128 GiB. A larger file is sent whole.
    pub(crate) fn can_describe(&self, size: u64) -> bool {
        size / (self.min as u64) < MAX_DELTA_CHUNKS
    }

    /// The average chunk size, as a [`DeltaBase`] names it.
    pub(crate) fn avg(&self) -> u32 {
        self.avg as u32
    }

    /// The length of the chunk at the start of `buf`, if the bytes there
    /// decide it: a cut found before the end of `buf`, a chunk of the
    /// maximum length, or (`last`: nothing follows `buf`) the rest.
    fn next(&self, buf: &[u8], last: bool) -> Option<usize> {
        if buf.is_empty() {
            return None;
        }
        let (_, n) = cut(
            buf,
            self.min,
            self.avg,
            self.max,
            self.mask_s,
            self.mask_l,
            self.mask_s << 1,
            self.mask_l << 1,
        );
        (n < buf.len() || last || buf.len() >= self.max).then_some(n)
    }
}

/// Cuts a byte stream into chunks as it is read: push what was read, take
/// the chunks it completes. Holds at most one read and one chunk.
struct Chunks {
    cutter: Cutter,
    buf: Vec<u8>,
    at: usize,
}

impl Chunks {
    fn new(cutter: Cutter) -> Self {
        Self {
            cutter,
            buf: Vec::new(),
            at: 0,
        }
    }

    fn push(&mut self, data: &[u8]) {
        self.buf.drain(..self.at);
        self.at = 0;
        self.buf.extend_from_slice(data);
    }

    /// Every chunk the bytes so far decide (with `last`, all there are),
    /// each with its BLAKE3. Blocking (CPU).
    fn sums(&mut self, last: bool) -> Vec<ChunkSum> {
        let mut sums = Vec::new();
        while let Some(c) = self.next(last) {
            sums.push(ChunkSum {
                len: c.len() as u32,
                digest: *blake3::hash(c).as_bytes(),
            });
        }
        sums
    }

    /// The next chunk the bytes so far decide (with `last`, all there are).
    fn next(&mut self, last: bool) -> Option<&[u8]> {
        let n = self.cutter.next(&self.buf[self.at..], last)?;
        let start = self.at;
        self.at += n;
        Some(&self.buf[start..start + n])
    }
}

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
    /// made by sharing its data (see [`assemble_cloned`]).
    fn as_file(&self) -> Option<&FileBytes> {
        None
    }
}

/// What [`ByteSource::range`] gives.
pub(crate) type ByteStream = BoxStream<'static, std::io::Result<Bytes>>;

/// A local file read through the disk pool, a chunk at a time.
pub(crate) struct FileBytes {
    file: Arc<File>,
    before: Option<Snapshot>,
    /// Which version of which file it is, for the descriptions cache.
    key: Option<FileKey>,
}

impl FileBytes {
    pub(crate) fn new(file: File) -> Self {
        let before = Snapshot::of(&file);
        let key = FileKey::of(&file);
        Self {
            file: Arc::new(file),
            before,
            key,
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
            described::forget(key);
        }
    }

    /// What this process remembers of the file cut by `cutter` (see
    /// `described`), if it is `size` bytes as expected.
    fn recall(&self, size: u64, cutter: Cutter) -> Option<Description> {
        let key = self.key.as_ref()?;
        let d = described::recall(key, cutter.avg())?;
        (d.chunks.iter().map(|c| u64::from(c.len)).sum::<u64>() == size).then_some(d)
    }

    /// Remembers the file's chunks (and digest), if it did not change
    /// while they were computed.
    async fn remember(&self, cutter: Cutter, chunks: Arc<[ChunkSum]>, digest: Option<Digest>) {
        if let Some(key) = self.key {
            if self.check_unchanged().await.is_ok() {
                let values = None;
                described::remember(
                    key,
                    cutter.avg(),
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
fn read_exact_into(file: &File, at: u64, want: usize, buf: &mut Vec<u8>) -> std::io::Result<()> {
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
struct Stretches {
    how: StretchesOf,
    at: u64,
    to: u64,
    spare: Vec<Vec<u8>>,
}

enum StretchesOf {
    File(Arc<File>),
    Stream(Pieces),
}

/// How much a cut, a description or a hash reads at a time (while the
/// stretch before is worked on).
const STRETCH: u64 = 4 << 20;

/// Pieces given back that [`Stretches`] keeps for its next reads.
const SPARE_PIECES: usize = 16;

impl Stretches {
    /// Reads `from..to` of `src`.
    async fn open(src: &dyn ByteSource, from: u64, to: u64) -> std::io::Result<Self> {
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
    async fn next(&mut self, len: u64) -> std::io::Result<Vec<Arc<Vec<u8>>>> {
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
    fn give_back(&mut self, pieces: impl IntoIterator<Item = Arc<Vec<u8>>>) {
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
struct Pieces {
    stream: ByteStream,
    left: u64,
    held: Vec<u8>,
}

impl Pieces {
    async fn open(src: &dyn ByteSource, from: u64, to: u64) -> std::io::Result<Self> {
        Ok(Self {
            stream: src.range(from, to).await?,
            left: to - from,
            held: Vec::new(),
        })
    }

    /// The next piece, or None once all arrived.
    async fn next(&mut self) -> std::io::Result<Option<Vec<u8>>> {
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

fn network(e: FrameError) -> TransferError {
    match e {
        FrameError::Io(io) => TransferError::Network(io),
        FrameError::Truncated => TransferError::Network(std::io::Error::new(
            std::io::ErrorKind::UnexpectedEof,
            e.to_string(),
        )),
        other => TransferError::Malformed(other.to_string()),
    }
}

/// Versions at least this large are described in two halves at once,
/// each on its own thread: the description is what the other side waits
/// for. The second half's chunks start at its first byte instead of where
/// a cut of the whole would put them, which costs a chunk or two of
/// matching around the middle (a sender that follows the description,
/// see [`cut_along`], loses nothing).
const DESCRIBE_IN_HALVES: u64 = 64 << 20;

/// The receiver's side, first: describes its version `old` (`size` bytes,
/// cut by `cutter`) as [`ChunkBatch`] frames to `out`. The caller has sent
/// the [`DeltaBase`] naming `size` and `cutter`.
pub(crate) async fn send_chunks<W>(
    old: &dyn ByteSource,
    size: u64,
    cutter: Cutter,
    out: &mut W,
) -> Result<(), TransferError>
where
    W: AsyncWrite + Unpin,
{
    send_chunks_halving(old, size, cutter, out, DESCRIBE_IN_HALVES).await
}

/// [`send_chunks`], in halves from `halves` bytes on.
pub(crate) async fn send_chunks_halving<W>(
    old: &dyn ByteSource,
    size: u64,
    cutter: Cutter,
    out: &mut W,
    halves: u64,
) -> Result<(), TransferError>
where
    W: AsyncWrite + Unpin,
{
    // Cut before, and unchanged since: nothing to read. Else the chunks
    // go out in batches as they are cut (a peer waits at most a minute
    // for the next), the second half's once the first half's are out.
    let recalled = old.as_file().and_then(|f| f.recall(size, cutter));
    let fresh = recalled.is_none();
    let (chunks, sent): (Arc<[ChunkSum]>, usize) = match recalled {
        Some(d) => (d.chunks, 0),
        None if size >= halves => {
            let mid = size / 2;
            let (first, second) = tokio::join!(
                describe_range(old, 0, mid, cutter, Some(&mut *out)),
                describe_range::<W>(old, mid, size, cutter, None)
            );
            let (mut all, sent) = first?;
            all.extend(second?.0);
            (all.into(), sent)
        }
        None => {
            let (all, sent) = describe_range(old, 0, size, cutter, Some(&mut *out)).await?;
            (all.into(), sent)
        }
    };
    let mut batches = chunks[sent..].chunks(CHUNKS_PER_BATCH).peekable();
    while let Some(b) = batches.next() {
        let batch = ChunkBatch {
            chunks: b.to_vec(),
            more: batches.peek().is_some(),
        };
        write_stalled(out, &batch).await?;
    }
    if chunks.len() == sent {
        let end = ChunkBatch {
            chunks: Vec::new(),
            more: false,
        };
        write_stalled(out, &end).await?;
    }
    if let Some(f) = old
        .as_file()
        .filter(|_| fresh && described::receivers_keep())
    {
        f.remember(cutter, chunks, None).await;
    }
    Ok(())
}

/// Cuts `from..to` of `old` into chunks (the last ending at `to`), reading
/// the next piece while the current one is cut and hashed; with `out`,
/// writes each full batch of them as it fills. All the chunks, and how
/// many of them were written.
async fn describe_range<W>(
    old: &dyn ByteSource,
    from: u64,
    to: u64,
    cutter: Cutter,
    mut out: Option<&mut W>,
) -> Result<(Vec<ChunkSum>, usize), TransferError>
where
    W: AsyncWrite + Unpin,
{
    let mut reader = Stretches::open(old, from, to)
        .await
        .map_err(TransferError::OldVersion)?;
    let mut chunks = Chunks::new(cutter);
    let (mut all, mut sent) = (Vec::new(), 0);
    let mut fresh = reader
        .next(STRETCH)
        .await
        .map_err(TransferError::OldVersion)?;
    loop {
        let last = fresh.is_empty();
        // Cutting and hashing are CPU work, off the async threads, while
        // the next stretch is read.
        let (next, (c, sums, back)) = tokio::join!(
            async {
                match last {
                    true => Ok(Vec::new()),
                    false => reader.next(STRETCH).await,
                }
            },
            blocking(move || {
                let mut sums = Vec::new();
                for p in &fresh {
                    chunks.push(p);
                    sums.extend(chunks.sums(false));
                }
                if last {
                    sums.extend(chunks.sums(true));
                }
                (chunks, sums, fresh)
            })
        );
        reader.give_back(back);
        chunks = c;
        all.extend(sums);
        if let Some(out) = out.as_mut() {
            while all.len() - sent > CHUNKS_PER_BATCH {
                let batch = ChunkBatch {
                    chunks: all[sent..sent + CHUNKS_PER_BATCH].to_vec(),
                    more: true,
                };
                write_stalled(&mut **out, &batch).await?;
                sent += CHUNKS_PER_BATCH;
            }
        }
        fresh = next.map_err(TransferError::OldVersion)?;
        if last {
            return Ok((all, sent));
        }
    }
}

/// Writes one frame, failing if the peer takes none of it for [`STALL_TIMEOUT`].
async fn write_stalled<W, T>(out: &mut W, msg: &T) -> Result<(), TransferError>
where
    W: AsyncWrite + Unpin,
    T: serde::Serialize,
{
    tokio::time::timeout(STALL_TIMEOUT, write_frame(out, msg))
        .await
        .map_err(|_| TransferError::Stalled)?
        .map_err(network)
}

/// Reads one frame, failing if nothing arrives for [`STALL_TIMEOUT`].
async fn read_stalled<R, T>(input: &mut R) -> Result<T, TransferError>
where
    R: AsyncRead + Unpin,
    T: serde::de::DeserializeOwned,
{
    tokio::time::timeout(STALL_TIMEOUT, read_frame(input))
        .await
        .map_err(|_| TransferError::Stalled)?
        .map_err(network)
}

/// A stream that ended in the middle is a transfer cut short.
fn ended(e: TransferError, got: u64, expected: u64) -> TransferError {
    match e {
        TransferError::Network(io) if io.kind() == std::io::ErrorKind::UnexpectedEof => {
            TransferError::Truncated { got, expected }
        }
        e => e,
    }
}

/// The receiver's version as the sender knows it: where each chunk is.
pub(crate) struct BaseIndex {
    cutter: Cutter,
    /// The chunks, shared with the threads that match against them.
    view: Arc<BaseView>,
}

/// The sender's side, first: reads the receiver's description of its
/// version (`base`, whose chunks follow on `input`), checking it as it
/// comes: a valid average, chunks no longer than the cutter makes, no
/// more than [`MAX_DELTA_CHUNKS`] of them, adding up to `base.size`.
pub(crate) async fn read_chunks<R>(
    input: &mut R,
    base: DeltaBase,
) -> Result<BaseIndex, TransferError>
where
    R: AsyncRead + Unpin,
{
    let bad = |why: String| {
        TransferError::Malformed(format!("the description of the old version: {why}"))
    };
    let cutter = Cutter::with_avg(base.avg_chunk)
        .ok_or_else(|| bad(format!("average chunk of {} bytes", base.avg_chunk)))?;
    let mut chunks = HashMap::new();
    let mut list = Vec::new();
    let (mut offset, mut count) = (0u64, 0u64);
    loop {
        let batch: ChunkBatch = read_stalled(input)
            .await
            .map_err(|e| ended(e, offset, base.size))?;
        count += batch.chunks.len() as u64;
        if count > MAX_DELTA_CHUNKS {
            return Err(bad(format!("more than {MAX_DELTA_CHUNKS} chunks")));
        }
        for c in batch.chunks {
            if c.len == 0 || c.len as usize > cutter.max {
                return Err(bad(format!("a chunk of {} bytes", c.len)));
            }
            if offset + u64::from(c.len) > base.size {
                return Err(bad(format!("chunks past its {} bytes", base.size)));
            }
            chunks.entry(c.digest).or_insert((offset, c.len));
            list.push((offset, c.len, c.digest));
            offset += u64::from(c.len);
        }
        if !batch.more {
            break;
        }
    }
    if offset != base.size {
        return Err(bad(format!(
            "chunks of {offset} bytes for a version of {}",
            base.size
        )));
    }
    Ok(BaseIndex {
        cutter,
        view: Arc::new(BaseView {
            list,
            by_digest: chunks,
        }),
    })
}

/// What crossed in a delta: bytes of the new version copied from the old
/// one, and bytes sent anew (before compression).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub(crate) struct DeltaSent {
    pub(crate) copied: u64,
    pub(crate) literal: u64,
}

/// The sender's own version cut into chunks: each chunk's offset, length
/// and BLAKE3, and the whole file's BLAKE3. The sender cuts while the
/// receiver describes its version (the two take about as long), so the
/// match that follows costs nothing but lookups.
pub(crate) struct Cut {
    cutter: Cutter,
    chunks: Vec<(u64, u32, Digest)>,
    digest: Digest,
}

/// The sender's side, first: cuts `src` (`size` bytes) as `cutter` does.
#[cfg(test)]
pub(crate) async fn cut_source(
    src: &dyn ByteSource,
    size: u64,
    cutter: Cutter,
) -> Result<Cut, TransferError> {
    cut_counted(src, size, cutter, &AtomicU64::new(0)).await
}

/// [`cut_source`], counting in `done` the bytes cut so far.
async fn cut_counted(
    src: &dyn ByteSource,
    size: u64,
    cutter: Cutter,
    done: &AtomicU64,
) -> Result<Cut, TransferError> {
    // Cut before, and unchanged since: at most a hash to take.
    if let Some(d) = src.as_file().and_then(|f| f.recall(size, cutter)) {
        let digest = match d.digest {
            Some(digest) => digest,
            None => hash_source(src, size).await.map_err(read_error)?,
        };
        let mut pos = 0;
        let chunks = d
            .chunks
            .iter()
            .map(|c| {
                pos += u64::from(c.len);
                (pos - u64::from(c.len), c.len, c.digest)
            })
            .collect();
        return Ok(Cut {
            cutter,
            chunks,
            digest,
        });
    }
    let mut reader = Stretches::open(src, 0, size).await.map_err(read_error)?;
    let (mut chunks, mut hasher, mut list, mut pos) =
        (Chunks::new(cutter), blake3::Hasher::new(), Vec::new(), 0u64);
    let mut fresh = reader.next(STRETCH).await.map_err(read_error)?;
    loop {
        let last = fresh.is_empty();
        // Cutting and hashing are CPU work, off the async threads; the
        // whole file's hash, the chunks and the next read go side by
        // side (a sender's file is cut while the receiver describes its
        // own, so this is the time the delta waits for).
        let (p1, p2) = (fresh.clone(), fresh);
        let (next, (h, back), c) = tokio::join!(
            async {
                match last {
                    true => Ok(Vec::new()),
                    false => reader.next(STRETCH).await,
                }
            },
            blocking(move || {
                for p in &p1 {
                    hasher.update(p);
                }
                (hasher, p1)
            }),
            blocking(move || {
                for p in p2 {
                    chunks.push(&p);
                    for c in chunks.sums(false) {
                        list.push((pos, c.len, c.digest));
                        pos += u64::from(c.len);
                    }
                }
                if last {
                    for c in chunks.sums(true) {
                        list.push((pos, c.len, c.digest));
                        pos += u64::from(c.len);
                    }
                }
                (chunks, list, pos)
            })
        );
        hasher = h;
        (chunks, list, pos) = c;
        reader.give_back(back);
        done.store(pos, Ordering::Relaxed);
        fresh = next.map_err(read_error)?;
        if last {
            let chunks = list;
            let digest = *hasher.finalize().as_bytes();
            if let Some(f) = src.as_file().filter(|_| described::keeping()) {
                let sums = chunks
                    .iter()
                    .map(|&(_, len, digest)| ChunkSum { len, digest })
                    .collect();
                f.remember(cutter, sums, Some(digest)).await;
            }
            return Ok(Cut {
                cutter,
                chunks,
                digest,
            });
        }
    }
}

/// The sender's side, first, as the peers run it: cuts `src` (`size`
/// bytes) while the receiver's description (`base`, its chunks following
/// on `input`) arrives. A description that arrives before a quarter of
/// the file is cut (the receiver remembered it, or its version is small)
/// is followed instead ([`cut_along`]): where the versions agree that
/// hashes the sender's bytes at the receiver's chunks, without cutting
/// them, in about half the time of a cut. One that arrives later (the
/// receiver read and cut its version meanwhile) finds the cut far enough
/// along that finishing it is cheaper than starting again.
pub(crate) async fn cut_while_described<R>(
    input: &mut R,
    base: DeltaBase,
    src: &dyn ByteSource,
    size: u64,
    cutter: Cutter,
) -> (Result<BaseIndex, TransferError>, Result<Cut, TransferError>)
where
    R: AsyncRead + Unpin,
{
    let (began, done) = (std::time::Instant::now(), AtomicU64::new(0));
    let reading = read_chunks(input, base);
    let cutting = cut_counted(src, size, cutter, &done);
    tokio::pin!(reading, cutting);
    // What a slow delta waited for, at debug level (`-vv`).
    let ms = |t: std::time::Instant| t.elapsed().as_millis() as u64;
    tokio::select! {
        index = &mut reading => {
            let (described_ms, cut) = (ms(began), done.load(Ordering::Relaxed));
            match index {
                Ok(index) if cut < size / 4 && index.cutter == cutter => {
                    let cut = cut_along(src, size, &index).await;
                    tracing::debug!(described_ms, cut_ms = ms(began), bytes = size, "followed the receiver's chunks");
                    (Ok(index), cut)
                }
                index => {
                    let cut = cutting.await;
                    tracing::debug!(described_ms, cut_ms = ms(began), bytes = size, "cut the new version");
                    (index, cut)
                }
            }
        }
        cut = &mut cutting => {
            let cut_ms = ms(began);
            let index = reading.await;
            tracing::debug!(described_ms = ms(began), cut_ms, bytes = size, "cut the new version");
            (index, cut)
        }
    }
}

/// How far ahead of the current position [`cut_along`] holds the file.
const LOOKAHEAD: u64 = 8 << 20;

/// The sender's version cut along the receiver's chunks: at each position
/// the receiver's next chunk is tried first (the sender's bytes of its
/// length hashed and compared); where they differ, the sender's own bytes
/// are cut as [`cut_source`] cuts them until a chunk found again among
/// the receiver's puts it back in step. An edit in place costs a hash of
/// each chunk and the cut of the chunks around the edit; an insertion or
/// a deletion, the cut up to where the data agrees again. The whole file
/// is hashed at the same time, on another thread.
pub(crate) async fn cut_along(
    src: &dyn ByteSource,
    size: u64,
    base: &BaseIndex,
) -> Result<Cut, TransferError> {
    let mut reader = Stretches::open(src, 0, size).await.map_err(read_error)?;
    let mut window = Window::default();
    let mut state = Along::default();
    let mut hasher = blake3::Hasher::new();
    let (cutter, index) = (base.cutter, base.view.clone());
    // The first stretch, then each next one read while the one before is
    // hashed and followed: reads, the whole file's hash and the chunks'
    // hashes go side by side.
    let ahead = LOOKAHEAD + cutter.max as u64;
    let mut fresh = reader.next(ahead).await.map_err(read_error)?;
    while state.pos < size {
        for p in &fresh {
            window.push(p.clone());
        }
        let (w, idx) = (window.clone(), index.clone());
        let (next, h, st) = tokio::join!(
            reader.next(ahead),
            blocking(move || {
                for p in fresh {
                    hasher.update(&p);
                }
                hasher
            }),
            blocking(move || {
                state.advance(&w, size, cutter, &idx);
                state
            })
        );
        (hasher, state) = (h, st);
        fresh = next.map_err(read_error)?;
        reader.give_back(window.forget_before(state.pos));
    }
    debug_assert!(fresh.is_empty());
    Ok(Cut {
        cutter,
        chunks: state.chunks,
        digest: *hasher.finalize().as_bytes(),
    })
}

/// The receiver's chunks as the sender holds them.
struct BaseView {
    /// In order: offset, length, BLAKE3.
    list: Vec<(u64, u32, Digest)>,
    /// Each chunk's offset and length, by BLAKE3 (the first of equal ones).
    by_digest: HashMap<Digest, (u64, u32)>,
}

/// The sender's bytes [`cut_along`] holds: pieces in order, `end` the
/// offset just past the last.
#[derive(Clone, Default)]
struct Window {
    pieces: VecDeque<(u64, Arc<Vec<u8>>)>,
    end: u64,
}

impl Window {
    fn push(&mut self, p: Arc<Vec<u8>>) {
        let n = p.len() as u64;
        self.pieces.push_back((self.end, p));
        self.end += n;
    }

    /// Drops the pieces wholly before `pos`.
    fn forget_before(&mut self, pos: u64) -> Vec<Arc<Vec<u8>>> {
        let mut gone = Vec::new();
        while let Some((at, p)) = self.pieces.front() {
            if at + p.len() as u64 > pos {
                break;
            }
            gone.extend(self.pieces.pop_front().map(|(_, p)| p));
        }
        gone
    }

    /// The bytes `from..to` (held), as slices in order.
    fn slices(&self, from: u64, to: u64) -> impl Iterator<Item = &[u8]> {
        self.pieces.iter().filter_map(move |(at, p)| {
            let end = at + p.len() as u64;
            if end <= from || *at >= to {
                return None;
            }
            let a = from.max(*at) - at;
            let b = to.min(end) - at;
            Some(&p[a as usize..b as usize])
        })
    }

    fn hash(&self, from: u64, to: u64) -> Digest {
        let mut h = blake3::Hasher::new();
        for s in self.slices(from, to) {
            h.update(s);
        }
        *h.finalize().as_bytes()
    }
}

/// Where [`cut_along`] is: the sender's position, the receiver's chunk
/// tried next (while in step), and the chunks so far.
#[derive(Default)]
struct Along {
    pos: u64,
    next: usize,
    cutting: bool,
    chunks: Vec<(u64, u32, Digest)>,
}

impl Along {
    /// Goes as far as the bytes held allow. Blocking (CPU).
    fn advance(&mut self, w: &Window, size: u64, cutter: Cutter, base: &BaseView) {
        while self.pos < size {
            if !self.cutting {
                match base.list.get(self.next) {
                    Some(&(_, len, digest)) if self.pos + u64::from(len) <= size => {
                        let end = self.pos + u64::from(len);
                        if end > w.end {
                            return;
                        }
                        if w.hash(self.pos, end) == digest {
                            self.chunks.push((self.pos, len, digest));
                            self.pos = end;
                            self.next += 1;
                            continue;
                        }
                        self.cutting = true;
                    }
                    _ => self.cutting = true,
                }
            }
            // Out of step: cut the sender's bytes until a chunk is found
            // again (or more bytes are needed), taking a few chunks' worth
            // of them at a time.
            let (mut held, mut held_to, mut at) = (Vec::new(), self.pos, 0);
            while self.cutting {
                let rest = &held[at..];
                let Some(n) = cutter.next(rest, held_to == size) else {
                    if held_to == w.end {
                        return;
                    }
                    let to = (held_to + 4 * cutter.max as u64).min(w.end);
                    held.drain(..at);
                    at = 0;
                    for piece in w.slices(held_to, to) {
                        held.extend_from_slice(piece);
                    }
                    held_to = to;
                    continue;
                };
                let digest = *blake3::hash(&rest[..n]).as_bytes();
                self.chunks.push((self.pos, n as u32, digest));
                self.pos += n as u64;
                at += n;
                if let Some(&(from, len)) = base.by_digest.get(&digest) {
                    if len as usize == n {
                        // Back in step after that chunk of the receiver's.
                        if let Ok(i) = base.list.binary_search_by_key(&from, |c| c.0) {
                            self.next = i + 1;
                            self.cutting = false;
                        }
                    }
                }
            }
        }
    }
}

/// What the receiver is told to do with a stretch of the new version.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Step {
    /// Copy `len` bytes of its version from `from`.
    Copy { from: u64, len: u64 },
    /// Take `len` new bytes: the sender's from `at`.
    New { at: u64, len: u64 },
}

/// The steps that make the new version from `start` on, in order, with
/// neighbouring copies and neighbouring new stretches merged.
fn steps(cut: &Cut, base: &BaseIndex, start: u64) -> Vec<Step> {
    let mut out: Vec<Step> = Vec::new();
    for &(pos, len, digest) in &cut.chunks {
        let (pos, len) = (pos, u64::from(len));
        if pos + len <= start {
            continue;
        }
        let skip = start.saturating_sub(pos);
        let found = base
            .view
            .by_digest
            .get(&digest)
            .filter(|(_, l)| u64::from(*l) == len)
            .map(|(from, _)| *from);
        let step = match found {
            Some(from) => Step::Copy {
                from: from + skip,
                len: len - skip,
            },
            None => Step::New {
                at: pos + skip,
                len: len - skip,
            },
        };
        match (out.last_mut(), step) {
            (Some(Step::Copy { from, len }), Step::Copy { from: f, len: l })
                if *from + *len == f =>
            {
                *len += l
            }
            (Some(Step::New { at, len }), Step::New { at: a, len: l }) if *at + *len == a => {
                *len += l
            }
            _ => out.push(step),
        }
    }
    out
}

/// The sender's side, then: sends the new version `src` (`size` bytes, cut
/// as `cut`, the receiver holding the first `start` already) to `out` as
/// copies of the receiver's chunks in `base` and new blocks framed by
/// `framing`, ending with [`DeltaOp::End`]. New bytes are read again from
/// `src` as they go (a source that changed since it was cut fails).
/// Returns the BLAKE3 of the whole new version and what crossed;
/// `progress` counts new bytes as they go, `kept` the bytes the receiver
/// copies.
#[allow(clippy::too_many_arguments)]
pub(crate) async fn send_cut<W>(
    src: &dyn ByteSource,
    cut: Cut,
    start: u64,
    base: &BaseIndex,
    framing: Framing,
    pace: Option<Arc<Pacer>>,
    out: &mut W,
    progress: &Advance<'_>,
    kept: &Advance<'_>,
) -> Result<(Digest, DeltaSent), TransferError>
where
    W: AsyncWrite + Unpin,
{
    if cut.cutter != base.cutter {
        return Err(TransferError::Malformed(
            "the old version was cut with other chunk sizes than the new".to_owned(),
        ));
    }
    let mut framer = Some(Framer::new(framing));
    let mut sent = DeltaSent::default();
    for step in steps(&cut, base, start) {
        match step {
            Step::Copy { from, len } => {
                write_stalled(out, &DeltaOp::Copy { from, len }).await?;
                sent.copied += len;
                kept(len);
            }
            Step::New { at, len } => {
                let mut pieces = Pieces::open(src, at, at + len).await.map_err(read_error)?;
                while let Some(piece) = pieces.next().await.map_err(read_error)? {
                    let mut f = framer.take().expect("kept");
                    let (f, block) = blocking(move || {
                        let mut buf = vec![0u8; f.room()];
                        buf.extend_from_slice(&piece);
                        let block = f.frame(buf);
                        (f, block)
                    })
                    .await;
                    framer = Some(f);
                    write_stalled(out, &DeltaOp::Block).await?;
                    write_paced(out, &block.bytes, pace.as_deref()).await?;
                    sent.literal += block.raw as u64;
                    progress(block.raw as u64);
                }
            }
        }
    }
    src.check_unchanged().await?;
    write_stalled(out, &DeltaOp::End).await?;
    Ok((cut.digest, sent))
}

/// Both of the sender's steps, one after the other: cuts `src` (`size`
/// bytes) as `base` was cut, then sends it (see [`send_cut`]). The peers
/// overlap the two with the receiver's description; tests need not.
#[cfg(test)]
#[allow(clippy::too_many_arguments)]
pub(crate) async fn send_delta<W>(
    src: &dyn ByteSource,
    size: u64,
    start: u64,
    base: Arc<BaseIndex>,
    framing: Framing,
    pace: Option<Arc<Pacer>>,
    out: &mut W,
    progress: &Advance<'_>,
    kept: &Advance<'_>,
) -> Result<(Digest, DeltaSent), TransferError>
where
    W: AsyncWrite + Unpin,
{
    let cut = cut_source(src, size, base.cutter).await?;
    send_cut(src, cut, start, &base, framing, pace, out, progress, kept).await
}

/// A read of the sender's own file failed: it shrank (the stream ended
/// early), grew, or could not be read.
fn read_error(e: std::io::Error) -> TransferError {
    match e.kind() {
        std::io::ErrorKind::UnexpectedEof => TransferError::ChangedWhileSent("it shrank"),
        std::io::ErrorKind::InvalidData => TransferError::ChangedWhileSent("it grew"),
        _ => TransferError::Read(e),
    }
}

/// The receiver's side: reads a delta from `input` and writes the bytes
/// it makes, exactly `expect` of them, to `made`: copies read from `old`
/// (its version, of `old_size` bytes), new blocks decoded (read no faster
/// than `pace` allows). `progress` counts new bytes, `kept` copied ones. Every op is
/// checked before it is acted on: a copy within the old version, nothing
/// past `expect`, blocks as [`BlockHeader::decode`] allows.
#[allow(clippy::too_many_arguments)]
pub(crate) async fn assemble<R, W>(
    input: &mut R,
    old: &dyn ByteSource,
    old_size: u64,
    expect: u64,
    made: &mut W,
    pace: Option<&Pacer>,
    progress: &Advance<'_>,
    kept: &Advance<'_>,
) -> Result<DeltaSent, TransferError>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut target = Target::Stream(made);
    apply(
        input,
        old,
        old_size,
        expect,
        &mut target,
        pace,
        progress,
        kept,
    )
    .await
}

/// Where [`apply`] puts the new version.
enum Target<'a, W> {
    /// Written out in order, copies included.
    Stream(&'a mut W),
    /// Patched into a file that already holds the old version's data.
    Patch(&'a mut Patched),
}

/// The op loop of [`assemble`] and [`assemble_cloned`].
#[allow(clippy::too_many_arguments)]
async fn apply<R, W>(
    input: &mut R,
    old: &dyn ByteSource,
    old_size: u64,
    expect: u64,
    made: &mut Target<'_, W>,
    pace: Option<&Pacer>,
    progress: &Advance<'_>,
    kept: &Advance<'_>,
) -> Result<DeltaSent, TransferError>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut got = DeltaSent::default();
    let mut written = 0u64;
    let past = |n: u64, written: u64| {
        TransferError::Malformed(format!(
            "a delta that makes more than the {expect} bytes announced ({} or more)",
            written + n
        ))
    };
    loop {
        let op = read_stalled::<_, DeltaOp>(input)
            .await
            .map_err(|e| ended(e, written, expect))?;
        match op {
            DeltaOp::Copy { from, len } => {
                if len == 0 || from.checked_add(len).is_none_or(|end| end > old_size) {
                    return Err(TransferError::Malformed(format!(
                        "a copy of {len} bytes at {from} of an old version of {old_size} bytes"
                    )));
                }
                if written + len > expect {
                    return Err(past(len, written));
                }
                match made {
                    Target::Stream(w) => {
                        let mut pieces = Pieces::open(old, from, from + len)
                            .await
                            .map_err(TransferError::OldVersion)?;
                        while let Some(p) =
                            pieces.next().await.map_err(TransferError::OldVersion)?
                        {
                            w.write_all(&p).await.map_err(TransferError::Write)?;
                        }
                    }
                    Target::Patch(p) => p.copy(from, len).await?,
                }
                written += len;
                got.copied += len;
                kept(len);
            }
            DeltaOp::Block => {
                let mut head = [0u8; BlockHeader::LEN];
                read_exact_stalled(input, &mut head).await?;
                let header = BlockHeader::decode(&head)
                    .map_err(|e| TransferError::Malformed(e.to_string()))?;
                let raw_len = u64::from(header.raw_len);
                if written + raw_len > expect {
                    return Err(past(raw_len, written));
                }
                let mut payload = vec![0u8; header.wire_len as usize];
                // `--limit-rate` on a download: new bytes are read as
                // they are due, and flow control slows the sender.
                let step = pace.map_or(payload.len().max(1), Pacer::slice);
                for slice in payload.chunks_mut(step) {
                    if let Some(p) = pace {
                        p.take(slice.len()).await;
                    }
                    read_exact_stalled(input, slice).await?;
                }
                let bytes = if header.compressed {
                    let raw = header.raw_len as usize;
                    blocking(move || decompress_block(&payload, raw)).await?
                } else {
                    payload
                };
                match made {
                    Target::Stream(w) => w.write_all(&bytes).await.map_err(TransferError::Write)?,
                    Target::Patch(p) => p.write(bytes).await?,
                }
                written += raw_len;
                got.literal += raw_len;
                progress(raw_len);
            }
            DeltaOp::End => {
                if written != expect {
                    return Err(TransferError::Truncated {
                        got: written,
                        expected: expect,
                    });
                }
                if let Target::Stream(w) = made {
                    w.flush().await.map_err(TransferError::Write)?;
                }
                return Ok(got);
            }
        }
    }
}

/// Shares all of `old`'s data with `made` (FICLONE), if the filesystem
/// can share extents between files (XFS, btrfs, bcachefs) and both are on
/// it. Blocking.
fn share_data(made: &File, old: &File) -> bool {
    #[cfg(target_os = "linux")]
    {
        rustix::fs::ioctl_ficlone(made, old).is_ok()
    }
    #[cfg(not(target_os = "linux"))]
    {
        let _ = (made, old);
        false
    }
}

/// A new version being made in a file that starts as a clone of the old
/// one: a copy from where it already sits costs a read for the hash and
/// no write; everything else is written at its place. Every byte up to
/// `pos` is the new version's. On the way it tells the new version's
/// chunks (copies are whole chunks of the old version as described here,
/// new bytes are cut here), for the descriptions cache.
pub(crate) struct Patched {
    made: Arc<File>,
    old: Arc<File>,
    pos: u64,
    /// The new version hashed so far.
    blocks: Option<Blocks>,
    /// The chaining values of the old version's whole blocks, where this
    /// process remembers them: a block an in-place copy covers whole is
    /// taken by its value, not read.
    old_values: Option<Arc<[blake3::hazmat::ChainingValue]>>,
    cutter: Cutter,
    /// The new version's chunks so far; None once they cannot be told (a
    /// copy that is not of whole chunks, or too many of them).
    chunks: Option<Vec<ChunkSum>>,
    /// The old version's chunks as described here, and where each starts.
    old_chunks: Option<(Arc<[ChunkSum]>, Vec<u64>)>,
    /// New bytes not yet cut into whole chunks.
    cutting: Option<Chunks>,
}

impl Patched {
    /// Copies `len` bytes of the old version at `from` to `pos`, hashing them.
    async fn copy(&mut self, from: u64, len: u64) -> Result<(), TransferError> {
        self.end_new().await;
        self.take_old(from, len);
        // Where the bytes already are (the clone put them there), nothing
        // is written: that is what sharing saves; and a whole block whose
        // value is known is not even read.
        let in_place = from == self.pos;
        let end = from + len;
        let mut at = from;
        while at < end {
            match self.next_known(at, end).filter(|_| in_place) {
                Some(k) if k == at => {
                    let values = self.old_values.as_ref().expect("known");
                    let value = values[(k / BLOCK) as usize];
                    self.blocks.as_mut().expect("kept").push_value(value);
                    self.pos += BLOCK;
                    at += BLOCK;
                }
                Some(k) => {
                    self.copy_bytes(at, k, in_place).await?;
                    at = k;
                }
                None => {
                    self.copy_bytes(at, end, in_place).await?;
                    at = end;
                }
            }
        }
        Ok(())
    }

    /// The first block boundary from `at` on whose whole block ends by
    /// `end` and has a known value, if any.
    fn next_known(&self, at: u64, end: u64) -> Option<u64> {
        let values = self.old_values.as_ref()?;
        if !self.blocks.as_ref()?.takes_values() {
            return None;
        }
        let k = at.div_ceil(BLOCK) * BLOCK;
        (k + BLOCK <= end && ((k / BLOCK) as usize) < values.len()).then_some(k)
    }

    /// Copies the old version's bytes `from..end` to `pos` (unless they are
    /// already there), hashing them; the next piece is read while this one
    /// is hashed.
    async fn copy_bytes(
        &mut self,
        from: u64,
        end: u64,
        in_place: bool,
    ) -> Result<(), TransferError> {
        let read = |at: u64| {
            let old = self.old.clone();
            async move {
                if at >= end {
                    return Ok(None);
                }
                let want = (end - at).min(CHUNK as u64) as usize;
                blocking(move || {
                    use std::os::unix::fs::FileExt;
                    let mut buf = vec![0u8; want];
                    old.read_exact_at(&mut buf, at).map(|()| Some(buf))
                })
                .await
                .map_err(TransferError::OldVersion)
            }
        };
        let mut at = from;
        let mut piece = read(at).await?;
        while let Some(buf) = piece.take() {
            let n = buf.len() as u64;
            let (made, to) = (self.made.clone(), self.pos);
            let mut blocks = self.blocks.take().expect("kept");
            let (next, done) = tokio::join!(
                read(at + n),
                blocking(move || {
                    use std::os::unix::fs::FileExt;
                    if !in_place {
                        made.write_all_at(&buf, to).map_err(TransferError::Write)?;
                    }
                    blocks.update(&buf);
                    Ok::<_, TransferError>(blocks)
                })
            );
            self.blocks = Some(done?);
            self.pos += n;
            at += n;
            piece = next?;
        }
        Ok(())
    }

    /// Writes new bytes at `pos`, hashing them and cutting them into chunks.
    async fn write(&mut self, bytes: Vec<u8>) -> Result<(), TransferError> {
        let (made, to) = (self.made.clone(), self.pos);
        let mut blocks = self.blocks.take().expect("kept");
        let tell = self.chunks.is_some();
        let mut cutting = self
            .cutting
            .take()
            .unwrap_or_else(|| Chunks::new(self.cutter));
        let n = bytes.len() as u64;
        let (blocks, cutting, sums) = blocking(move || {
            use std::os::unix::fs::FileExt;
            made.write_all_at(&bytes, to)
                .map_err(TransferError::Write)?;
            blocks.update(&bytes);
            let mut sums = Vec::new();
            if tell {
                cutting.push(&bytes);
                sums = cutting.sums(false);
            }
            Ok::<_, TransferError>((blocks, cutting, sums))
        })
        .await?;
        self.blocks = Some(blocks);
        self.cutting = Some(cutting);
        self.add(sums);
        self.pos += n;
        Ok(())
    }

    /// Cuts the rest of a stretch of new bytes (a copy or the end follows).
    async fn end_new(&mut self) {
        let Some(mut cutting) = self.cutting.take() else {
            return;
        };
        if self.chunks.is_none() {
            return;
        }
        let sums = blocking(move || cutting.sums(true)).await;
        self.add(sums);
    }

    /// Tells the chunks of a copy: whole chunks of the old version, or
    /// (a copy that starts or ends inside one) no longer anything.
    fn take_old(&mut self, from: u64, len: u64) {
        let Some((sums, starts)) = &self.old_chunks else {
            self.chunks = None;
            return;
        };
        let Ok(first) = starts.binary_search(&from) else {
            self.chunks = None;
            return;
        };
        let end = from + len;
        let count = starts[first..].partition_point(|&s| s < end);
        let last = first + count - 1;
        if starts[last] + u64::from(sums[last].len) != end {
            self.chunks = None;
            return;
        }
        let taken = sums[first..first + count].to_vec();
        self.add(taken);
    }

    fn add(&mut self, sums: Vec<ChunkSum>) {
        if let Some(list) = &mut self.chunks {
            if list.len() + sums.len() > MAX_DELTA_CHUNKS as usize {
                self.chunks = None;
            } else {
                list.extend(sums);
            }
        }
    }
}

/// The receiver's side on a filesystem that shares data between files:
/// like [`assemble`] into the empty file `made`, but `made` first becomes
/// a clone of `old` (no data copied), so copies from where they already
/// sit are only read for the hash, and only the new bytes and moved ones
/// are written: the commit then syncs those alone, not the whole file.
/// Returns None, having read nothing, where the filesystem cannot share
/// (ext4, tmpfs, another filesystem than `old`'s); else what [`assemble`]
/// returns and the new version's size and BLAKE3. The old version is
/// read for the hash (its data is in memory from the description), so it
/// must not have changed since it was opened: that is checked at the end.
/// However this ends, `made` then holds a prefix of the new version (the
/// rest of the clone cut off), which a resume can build on.
#[allow(clippy::too_many_arguments)]
pub(crate) async fn assemble_cloned<R>(
    input: &mut R,
    old: &FileBytes,
    old_size: u64,
    made: File,
    expect: u64,
    cutter: Cutter,
    pace: Option<&Pacer>,
    progress: &Advance<'_>,
    kept: &Advance<'_>,
    stop: impl std::future::Future<Output = ()>,
) -> Option<Result<Cloned, TransferError>>
where
    R: AsyncRead + Unpin,
{
    let made = Arc::new(made);
    let (m, o) = (made.clone(), old.file.clone());
    if !blocking(move || share_data(&m, &o)).await {
        return None;
    }
    Some(
        assemble_patched(
            input, old, old_size, made, expect, cutter, pace, progress, kept, stop,
        )
        .await,
    )
}

/// [`assemble_cloned`] once `made` holds the old version's data.
#[allow(clippy::too_many_arguments)]
pub(crate) async fn assemble_patched<R>(
    input: &mut R,
    old: &FileBytes,
    old_size: u64,
    made: Arc<File>,
    expect: u64,
    cutter: Cutter,
    pace: Option<&Pacer>,
    progress: &Advance<'_>,
    kept: &Advance<'_>,
    stop: impl std::future::Future<Output = ()>,
) -> Result<Cloned, TransferError>
where
    R: AsyncRead + Unpin,
{
    let began = std::time::Instant::now();
    let recalled = old.recall(old_size, cutter);
    let old_values = recalled.as_ref().and_then(|d| d.values.clone());
    let old_values_known = old_values.is_some();
    let old_chunks = recalled.map(|d| {
        let mut at = 0;
        let starts = d
            .chunks
            .iter()
            .map(|c| {
                at += u64::from(c.len);
                at - u64::from(c.len)
            })
            .collect();
        (d.chunks, starts)
    });
    let mut patched = Patched {
        made: made.clone(),
        old: old.file.clone(),
        pos: 0,
        blocks: Some(Blocks::new(expect)),
        old_values,
        cutter,
        chunks: Some(Vec::new()),
        old_chunks,
        cutting: None,
    };
    let result = {
        let mut target = Target::<tokio::io::Sink>::Patch(&mut patched);
        let applying = apply(
            input,
            old,
            old_size,
            expect,
            &mut target,
            pace,
            progress,
            kept,
        );
        tokio::select! {
            r = applying => r,
            () = stop => Err(TransferError::Stopped),
        }
    };
    if result.is_ok() {
        patched.end_new().await;
    }
    let result = match result {
        Ok(d) => old.check_unchanged().await.map(|()| d).map_err(|_| {
            TransferError::OldVersion(std::io::Error::other(
                "the old version changed while the new one was made from it",
            ))
        }),
        Err(e) => Err(e),
    };
    // What lies past `pos` is the old version's, not the new one's.
    let (pos, m) = (patched.pos, made.clone());
    let cut = blocking(move || m.set_len(pos)).await;
    let sent = result.and_then(|d| cut.map(|()| d).map_err(TransferError::Write));
    let sent = sent?;
    let blocks = patched.blocks.take().expect("kept");
    let values: Arc<[_]> = blocks.values().into();
    let digest = blocks.finish();
    tracing::debug!(
        ms = began.elapsed().as_millis() as u64,
        new_bytes = sent.literal,
        remembered = old_values_known,
        "patched the clone of the old version"
    );
    Ok(Cloned {
        sent,
        received: Received { size: pos, digest },
        described: patched.chunks.map(|c| Description {
            chunks: c.into(),
            digest: Some(digest),
            values: Some(values),
        }),
    })
}

/// What [`assemble_cloned`] made.
pub(crate) struct Cloned {
    pub(crate) sent: DeltaSent,
    pub(crate) received: Received,
    /// The new version's chunks, where they could be told: to remember
    /// once it is committed (see `described`).
    pub(crate) described: Option<Description>,
}

/// Fills `buf` from `input`, failing if nothing arrives for [`STALL_TIMEOUT`].
async fn read_exact_stalled<R>(input: &mut R, buf: &mut [u8]) -> Result<(), TransferError>
where
    R: AsyncRead + Unpin,
{
    match tokio::time::timeout(STALL_TIMEOUT, input.read_exact(buf)).await {
        Err(_) => Err(TransferError::Stalled),
        Ok(Err(e)) if e.kind() == std::io::ErrorKind::UnexpectedEof => Err(
            TransferError::Malformed("the delta broke off inside a block".to_owned()),
        ),
        Ok(Err(e)) => Err(TransferError::Network(e)),
        Ok(Ok(_)) => Ok(()),
    }
}

/// Runs a delta's receiving end: `assemble` writes into one end of an
/// in-memory pipe while `receive` reads the other as plain bytes (the
/// store's or the local file's usual receiving path: its temporary, hash,
/// sync and commit). Each takes its end and drops it when done, so the
/// assembler failing ends the receiver (its data ends early); the
/// receiver failing (a full disk, a newer upload taking over) ends the
/// assembler at once, even one waiting for the peer's next op. The error
/// returned is the one that ended the transfer.
pub(crate) async fn through_pipe<A, B, T, E>(
    assemble: impl FnOnce(tokio::io::DuplexStream) -> A,
    receive: impl FnOnce(tokio::io::DuplexStream) -> B,
) -> Result<(DeltaSent, T), PipeError<E>>
where
    A: std::future::Future<Output = Result<DeltaSent, TransferError>>,
    B: std::future::Future<Output = Result<T, E>>,
{
    let (w, r) = tokio::io::duplex(2 * CHUNK);
    let assembling = assemble(w);
    let receiving = receive(r);
    tokio::pin!(assembling, receiving);
    tokio::select! {
        made = &mut assembling => match (made, receiving.await) {
            (Ok(d), Ok(t)) => Ok((d, t)),
            // The receiving end stopped taking bytes first: its reason.
            (Err(TransferError::Write(_)) | Ok(_), Err(e)) => Err(PipeError::Received(e)),
            (Err(e), _) => Err(PipeError::Made(e)),
        },
        received = &mut receiving => match received {
            // All bytes are in; the assembler still reads the end mark.
            Ok(t) => assembling.await.map(|d| (d, t)).map_err(PipeError::Made),
            Err(e) => Err(PipeError::Received(e)),
        },
    }
}

/// Why a delta's receiving end failed: the delta itself, or the receiver.
#[derive(Debug)]
pub(crate) enum PipeError<E> {
    Made(TransferError),
    Received(E),
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

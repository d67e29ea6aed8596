//! Sending a file: reading ahead from disk, framing (raw or compressed blocks), pacing, hashing as the bytes pass.

use std::fs::File;
use std::io::Read;
use std::sync::Arc;
use std::time::Duration;

use crate::protocol::{BlockHeader, Compression, Digest, Encoding};

use super::*;

/// How a sender puts a file on the wire: the encoding, and whether to try
/// compressing its blocks.
#[derive(Debug, Clone)]
pub(crate) struct Framing {
    /// Raw bytes or blocks.
    pub encoding: Encoding,
    /// With blocks: when to compress each block that shrinks.
    pub compress: Compressing,
}

/// When a sender compresses a block.
#[derive(Debug, Clone)]
pub(crate) enum Compressing {
    /// Never.
    No,
    /// Always (it is still sent raw if it does not shrink).
    Yes,
    /// While this connection's path is slower than [`FAST_LINK`], judged
    /// again for every block: a long file that starts on a cold connection
    /// stops compressing once the path proves fast.
    WhenSlow(quinn::Connection),
}

/// Above this rate (bytes per second) a link counts as fast: compressing
/// would cost more time than the bytes it saves. zstd at level 3 packs 200
/// to 300 MB/s per core here, and the same cores also encrypt, hash and run
/// the network stack.
const FAST_LINK: f64 = 100e6;

/// Paths with a round trip shorter than this (loopback, a LAN) count as fast
/// whatever their window says: early in a connection the window is still
/// small, and compressing a long file on loopback would halve its speed.
const LOCAL_RTT: Duration = Duration::from_millis(2);

impl Framing {
    /// Raw bytes, no blocks: what peers that do not compress exchange.
    pub(crate) const RAW: Self = Self {
        encoding: Encoding::Raw,
        compress: Compressing::No,
    };

    /// The framing for sending under `mode` over `conn`: blocks unless
    /// compression is off.
    pub(crate) fn for_sending(mode: Compression, conn: Option<&quinn::Connection>) -> Self {
        let compress = match (mode, conn) {
            (Compression::Never, _) => return Self::RAW,
            (Compression::Always, _) => Compressing::Yes,
            (Compression::Auto, Some(conn)) => Compressing::WhenSlow(conn.clone()),
            // No path to judge (an in-memory pipe): as on a fast link.
            (Compression::Auto, None) => Compressing::No,
        };
        Self {
            encoding: Encoding::Blocks,
            compress,
        }
    }
}

impl Compressing {
    /// Whether to try compressing the next block.
    pub(super) fn now(&self) -> bool {
        match self {
            Self::No => false,
            Self::Yes => true,
            Self::WhenSlow(conn) => {
                let rtt = conn.rtt();
                rtt >= LOCAL_RTT && (conn.stats().path.cwnd as f64 / rtt.as_secs_f64()) < FAST_LINK
            }
        }
    }
}

/// With `--compress auto`: after blocks in a row that did not compress,
/// stop trying for a while (twice as long after each further miss, up to
/// this many blocks): random or already compressed data costs one attempt
/// per 64 MiB, not one per block.
const MAX_SKIP: u32 = 64;

/// The reading end of a transfer: the file, the hash so far, how far it
/// got, and how it frames what it reads.
struct Source {
    file: File,
    hasher: blake3::Hasher,
    pos: u64,
    size: u64,
    framer: Framer,
    /// The file's state when sending began, to tell whether it changed
    /// while it was read.
    before: Option<Snapshot>,
}

/// Puts chunks of file bytes into the wire's framing, compressing blocks
/// while that pays.
pub(super) struct Framer {
    pub(super) framing: Framing,
    /// Blocks in a row that did not compress, and blocks left to send
    /// without trying.
    misses: u32,
    skip: u32,
}

impl Framer {
    pub(super) fn new(framing: Framing) -> Self {
        Self {
            framing,
            misses: 0,
            skip: 0,
        }
    }

    /// Spare bytes a chunk needs in front of it for its block header.
    pub(super) fn room(&self) -> usize {
        match self.framing.encoding {
            Encoding::Raw => 0,
            Encoding::Blocks | Encoding::Stream | Encoding::Delta => BlockHeader::LEN,
        }
    }

    /// Frames `buf`, whose first [`Framer::room`] bytes are spare: a
    /// block sent raw is the buffer itself, not a copy. Blocking (it may
    /// compress).
    pub(super) fn frame(&mut self, mut buf: Vec<u8>) -> WireChunk {
        let room = self.room();
        let raw = buf.len() - room;
        if room == 0 {
            return WireChunk { bytes: buf, raw };
        }
        if self.framing.compress.now() {
            // `--compress always` tries every block: a long stretch that
            // does not compress (a packed archive in a tar) may be followed
            // by one that does. zstd gives up on a block that cannot
            // shrink early (its output buffer is smaller than the input).
            let always = matches!(self.framing.compress, Compressing::Yes);
            if self.skip > 0 && !always {
                self.skip -= 1;
            } else if let Some(bytes) = compress_block(&buf[room..]) {
                self.misses = 0;
                return WireChunk { bytes, raw };
            } else if !always {
                self.misses = (self.misses + 1).min(6);
                self.skip = (1u32 << self.misses).min(MAX_SKIP) - 1;
            }
        }
        let header = BlockHeader {
            compressed: false,
            raw_len: raw as u32,
            wire_len: raw as u32,
        };
        buf[..room].copy_from_slice(&header.encode());
        WireChunk { bytes: buf, raw }
    }
}

/// A chunk ready for the wire: the bytes to send and how many bytes of the
/// file they carry.
pub(super) struct WireChunk {
    pub(super) bytes: Vec<u8>,
    pub(super) raw: usize,
}

type SourceTask = tokio::task::JoinHandle<(Source, Result<WireChunk, TransferError>)>;

impl Source {
    /// Reads and hashes the next chunk in the disk pool, as a task of its own
    /// so it runs while the previous chunk goes out.
    fn read_ahead(self) -> SourceTask {
        tokio::spawn(blocking(move || self.next_chunk()))
    }

    /// Reads, hashes and frames the next chunk. Blocking.
    fn next_chunk(mut self) -> (Self, Result<WireChunk, TransferError>) {
        let chunk = self.next_chunk_mut();
        (self, chunk)
    }

    /// [`Self::next_chunk`] in place.
    fn next_chunk_mut(&mut self) -> Result<WireChunk, TransferError> {
        // The bytes are read behind room for a block header.
        let room = self.framer.room();
        let buf = self.read_raw(room)?;
        Ok(self.framer.frame(buf))
    }

    /// Reads and hashes the next chunk of the file into a buffer that starts
    /// with `room` spare bytes. Blocking.
    fn read_raw(&mut self, room: usize) -> Result<Vec<u8>, TransferError> {
        let want = (self.size - self.pos).min(CHUNK as u64) as usize;
        // Read into the buffer's spare capacity: zeroing a megabyte first,
        // only to overwrite it, was 4% of a client's CPU putting 1 GiB.
        // `with_capacity` gives exactly the capacity asked (Vec's
        // guarantees), so no read goes past this chunk.
        let mut buf = Vec::with_capacity(room + want);
        debug_assert_eq!(buf.capacity(), room + want);
        buf.resize(room, 0);
        while buf.len() < room + want {
            match rustix::io::read(&self.file, rustix::buffer::spare_capacity(&mut buf)) {
                Ok(0) => {
                    let found = self.pos + (buf.len() - room) as u64;
                    let expected = self.size;
                    return Err(TransferError::SourceChanged { expected, found });
                }
                Ok(_) => {}
                Err(rustix::io::Errno::INTR) => {}
                Err(e) => return Err(TransferError::Read(e.into())),
            }
        }
        self.hasher.update(&buf[room..]);
        self.pos += want as u64;
        if self.pos >= self.size {
            self.check_unchanged()?;
        }
        Ok(buf)
    }

    /// After the last byte: the file must not have grown, nor been written
    /// to since sending began (a rewrite in place keeps the size, so the
    /// read alone cannot tell). Blocking.
    fn check_unchanged(&mut self) -> Result<(), TransferError> {
        let mut probe = [0u8; 1];
        loop {
            match self.file.read(&mut probe) {
                Ok(0) => break,
                Ok(_) => return Err(TransferError::ChangedWhileSent("it grew")),
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(TransferError::Read(e)),
            }
        }
        if let (Some(before), Some(after)) = (self.before, Snapshot::of(&self.file)) {
            if before.size != after.size {
                return Err(TransferError::ChangedWhileSent("its size changed"));
            }
            if before != after {
                return Err(TransferError::ChangedWhileSent("it was written to"));
            }
        }
        Ok(())
    }
}

/// The file's state now, which must be `size` bytes long.
fn snapshot_of_size(file: &File, size: u64) -> Result<Option<Snapshot>, TransferError> {
    let before = Snapshot::of(file);
    match before {
        Some(b) if b.size < size => Err(TransferError::SourceChanged {
            expected: size,
            found: b.size,
        }),
        Some(b) if b.size > size => Err(TransferError::ChangedWhileSent("it grew")),
        _ => Ok(before),
    }
}

/// A small file read, hashed and framed whole, for [`send_primed`] to
/// send without going back to the disk.
pub(crate) struct Primed {
    /// None for an empty file.
    chunk: Option<WireChunk>,
    digest: Digest,
}

/// Files up to this size are read whole where they are opened (see
/// `files::read_small`).
pub(crate) const PRIME_MAX: u64 = SMALL_READ_MAX;

/// Reads, hashes and frames all `size` bytes of `file` (at most
/// [`PRIME_MAX`]), positioned at its start. Blocking.
pub(crate) fn prime(file: File, size: u64, framing: Framing) -> Result<Primed, TransferError> {
    Ok(frame_small(read_small(file, size)?, framing))
}

/// Frames a small file read whole, as [`send_file`] would have framed it
/// (it may compress: cheap at this size).
pub(crate) fn frame_small(small: SmallRead, framing: Framing) -> Primed {
    let SmallRead { mut buf, digest } = small;
    if buf.len() == SMALL_READ_ROOM {
        return Primed {
            chunk: None,
            digest,
        };
    }
    let framer_room = Framer::new(framing.clone()).room();
    // The read left room for a block header; raw bytes need none.
    buf.drain(..SMALL_READ_ROOM - framer_room);
    Primed {
        chunk: Some(Framer::new(framing).frame(buf)),
        digest,
    }
}

/// Sends a file [`prime`] read: what [`send_file`] would have sent from
/// its start, and the same digest.
pub(crate) async fn send_primed<W>(
    primed: Primed,
    pace: Option<Arc<Pacer>>,
    out: &mut W,
    progress: &Advance<'_>,
) -> Result<Digest, TransferError>
where
    W: ChunkWrite + ?Sized,
{
    if let Some(chunk) = primed.chunk {
        write_paced(out, chunk.bytes.into(), pace.as_deref()).await?;
        progress(chunk.raw as u64);
    }
    Ok(primed.digest)
}

/// Sends the bytes of `file` from `start.offset` up to `size` to `out`
/// (`file` must be positioned at the offset), framed as `framing` says,
/// returning the BLAKE3 digest of the whole file (of its bytes, whatever
/// the framing). The next chunk is read while the current one is sent.
pub(crate) async fn send_file<W>(
    file: File,
    size: u64,
    start: Start,
    framing: Framing,
    pace: Option<Arc<Pacer>>,
    out: &mut W,
    progress: &Advance<'_>,
) -> Result<Digest, TransferError>
where
    W: ChunkWrite + ?Sized,
{
    let before = snapshot_of_size(&file, size)?;
    let mut src = Source {
        file,
        hasher: start.hasher,
        pos: start.offset,
        size,
        framer: Framer::new(framing),
        before,
    };
    if src.pos >= size {
        // Nothing to read (an empty file, or all of it already there):
        // still, it must not have grown.
        return blocking(move || {
            src.check_unchanged()?;
            Ok(*src.hasher.finalize().as_bytes())
        })
        .await;
    }
    let mut pending = src.read_ahead();
    loop {
        let (src, chunk) = pending.await.expect("disk reader panicked");
        // A read error explains an early end better than the network.
        let chunk = chunk?;
        let done = src.pos >= size;
        let (next, digest) = if done {
            (None, Some(*src.hasher.finalize().as_bytes()))
        } else {
            (Some(src.read_ahead()), None)
        };
        write_paced(out, chunk.bytes.into(), pace.as_deref()).await?;
        progress(chunk.raw as u64);
        match (next, digest) {
            (Some(task), _) => pending = task,
            (None, Some(digest)) => return Ok(digest),
            (None, None) => unreachable!("either more to read or a digest"),
        }
    }
}

/// Sends the bytes `offset..size` of a store's file `source` to `out`,
/// framed as `framing` says. With `hasher` (the BLAKE3 state after the
/// first `offset` bytes) it returns the whole file's digest; without, it
/// returns `None` and the caller has the digest the store keeps. A local
/// file is read in order in the disk pool, the next chunk while this one
/// goes out ([`send_file`]); any other source as its ranged read streams.
pub(crate) async fn send_source<W>(
    source: &dyn ByteSource,
    offset: u64,
    size: u64,
    hasher: Option<blake3::Hasher>,
    framing: Framing,
    out: &mut W,
    progress: &Advance<'_>,
) -> Result<Option<Digest>, TransferError>
where
    W: SendHalf + ?Sized,
{
    if let Some(file) = source.as_file() {
        let file = file.reader_at(offset).map_err(TransferError::Read)?;
        let start = Start {
            offset,
            hasher: hasher.unwrap_or_default(),
        };
        return send_file(file, size, start, framing, None, out, progress)
            .await
            .map(Some);
    }
    let chunks = match source.range(offset, size).await {
        Ok(chunks) => chunks,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(TransferError::SourceChanged {
                expected: size,
                found: 0,
            })
        }
        Err(e) => return Err(TransferError::Read(e)),
    };
    send_stream(chunks, size, offset, hasher, framing, out, progress).await
}

/// Writes `bytes` to `out`, in slices paced by `pace` if given; fails if
/// the peer takes none of a slice for [`STALL_TIMEOUT`]. Each slice is
/// handed over whole, not copied again (see [`ChunkWrite`]).
pub(super) async fn write_paced<W>(
    out: &mut W,
    bytes: bytes::Bytes,
    pace: Option<&Pacer>,
) -> Result<(), TransferError>
where
    W: ChunkWrite + ?Sized,
{
    let step = pace.map_or(bytes.len().max(1), Pacer::slice);
    let mut at = 0;
    while at < bytes.len() {
        let slice = bytes.slice(at..bytes.len().min(at + step));
        at += slice.len();
        if let Some(p) = pace {
            p.take(slice.len()).await;
        }
        tokio::time::timeout(STALL_TIMEOUT, out.write_chunk(slice))
            .await
            .map_err(|_| TransferError::Stalled)?
            .map_err(TransferError::Network)?;
    }
    Ok(())
}

/// Chunks of at most this many bytes are framed on the async thread by
/// [`send_stream`]: hashing 64 KiB takes about 10 us here, compressing
/// it (when the link is slow) well under a millisecond.
const FRAME_INLINE: usize = 64 * 1024;

/// Sends the bytes `offset..size` of a file that arrive as `chunks` (an
/// object store's ranged read) to `out`, framed as `framing` says. With
/// `hasher` (the BLAKE3 state after the first `offset` bytes) it hashes
/// them and returns the whole file's digest; without, it returns `None`
/// and the caller supplies the digest it stored with the file.
#[allow(clippy::too_many_arguments)]
pub(crate) async fn send_stream<S, W>(
    mut chunks: S,
    size: u64,
    offset: u64,
    mut hasher: Option<blake3::Hasher>,
    framing: Framing,
    out: &mut W,
    progress: &Advance<'_>,
) -> Result<Option<Digest>, TransferError>
where
    S: futures::Stream<Item = std::io::Result<bytes::Bytes>> + Unpin + Send,
    W: SendHalf + ?Sized,
{
    use futures::StreamExt;
    let mut framer = Framer::new(framing);
    let room = framer.room();
    let mut pos = offset;
    let mut leftover = bytes::Bytes::new();
    // The next bytes from the store; fails if it sends nothing for STALL_TIMEOUT.
    async fn more<S>(chunks: &mut S) -> Result<Option<bytes::Bytes>, TransferError>
    where
        S: futures::Stream<Item = std::io::Result<bytes::Bytes>> + Unpin,
    {
        match tokio::time::timeout(STALL_TIMEOUT, chunks.next()).await {
            Err(_) => Err(TransferError::Read(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                format!("the object store sent nothing for {STALL_TIMEOUT:?}"),
            ))),
            Ok(None) => Ok(None),
            Ok(Some(r)) => r.map(Some).map_err(TransferError::Read),
        }
    }
    while pos < size {
        let want = (size - pos).min(CHUNK as u64) as usize;
        let mut buf = Vec::with_capacity(room + want);
        buf.resize(room, 0);
        while buf.len() < room + want {
            if leftover.is_empty() {
                leftover = match more(&mut chunks).await? {
                    Some(b) => b,
                    None => {
                        let found = pos + (buf.len() - room) as u64;
                        return Err(TransferError::SourceChanged {
                            expected: size,
                            found,
                        });
                    }
                };
            }
            let take = (room + want - buf.len()).min(leftover.len());
            buf.extend_from_slice(&leftover.split_to(take));
        }
        pos += want as u64;
        let frame = move || {
            if let Some(h) = hasher.as_mut() {
                h.update(&buf[room..]);
            }
            let chunk = framer.frame(buf);
            (framer, hasher, chunk)
        };
        // A small file's one chunk is framed (and hashed) where it is:
        // microseconds of work, where the trip to a disk thread and back
        // (a thread woken, then this task) cost more than the work.
        let (f, h, chunk) = if want <= FRAME_INLINE {
            frame()
        } else {
            blocking(frame).await
        };
        (framer, hasher) = (f, h);
        write_paced(out, chunk.bytes.into(), None).await?;
        progress(chunk.raw as u64);
    }
    while leftover.is_empty() {
        match more(&mut chunks).await? {
            Some(b) => leftover = b,
            None => break,
        }
    }
    if !leftover.is_empty() {
        return Err(TransferError::ChangedWhileSent("it grew"));
    }
    Ok(hasher.map(|h| *h.finalize().as_bytes()))
}

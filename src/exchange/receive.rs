//! Receiving a file: pieces off the stream, decompressed and hashed, written behind the network; whole small files buffered.

use std::fs::File;
use std::io::Write;
use std::sync::Arc;

use tokio::io::{AsyncRead, AsyncReadExt};

use crate::protocol::{BlockHeader, Digest, Encoding, StreamMark};

use super::*;

/// Where received pieces go: each write runs as a task of its own, so the
/// network keeps delivering the next piece meanwhile, and hands the sink
/// back with its result.
trait PieceSink: Send + Sized + 'static {
    /// Writes (and hashes) one piece, decompressing it first if need be.
    fn write(
        self,
        piece: Piece,
    ) -> impl std::future::Future<Output = (Self, Result<(), TransferError>)> + Send + 'static;
}

/// A [`Sink`] fed pieces as they come off the stream: a compressed block
/// is unpacked (in the disk pool) before the store sees its bytes.
struct Unframed(Box<dyn Sink>);

impl PieceSink for Unframed {
    async fn write(self, piece: Piece) -> (Self, Result<(), TransferError>) {
        let bytes = match piece {
            Piece::Raw(bytes) => bytes,
            packed => match blocking(move || packed.into_bytes()).await {
                Ok(bytes) => bytes,
                Err(e) => return (self, Err(e)),
            },
        };
        let (sink, result) = self.0.write(bytes).await;
        (Self(sink), result)
    }
}

/// Receives a file's bytes from `from` up to `most` from `input` into a
/// store's `sink`, framed as `encoding` says (with [`Encoding::Stream`],
/// up to its end mark, `most` being the most it may hold): the next piece
/// is read from the network while the store writes the previous one.
/// Returns the sink (whatever happened) and how it ended: where the data
/// ended, or why it failed.
pub(crate) async fn receive_into<R>(
    input: &mut R,
    sink: Box<dyn Sink>,
    from: u64,
    most: u64,
    encoding: Encoding,
    progress: &Advance<'_>,
    stop: impl std::future::Future<Output = ()>,
) -> (Box<dyn Sink>, Result<u64, TransferError>)
where
    R: AsyncRead + Unpin + ?Sized,
{
    let (Unframed(sink), ended) = receive_pieces(
        input,
        most,
        from,
        Unframed(sink),
        encoding,
        None,
        progress,
        stop,
    )
    .await;
    (sink, ended)
}

/// What arrived for the disk: file bytes, or a compressed block of them.
pub(crate) enum Piece {
    Raw(Vec<u8>),
    Zstd { payload: Vec<u8>, raw_len: usize },
}

impl Piece {
    /// The file bytes it carries, decompressed. Blocking (CPU) for a block.
    pub(crate) fn into_bytes(self) -> Result<Vec<u8>, TransferError> {
        match self {
            Self::Raw(buf) => Ok(buf),
            Self::Zstd { payload, raw_len } => decompress_block(&payload, raw_len),
        }
    }
}

impl PieceSink for FileSink {
    /// Writes and hashes `piece` in the disk pool.
    fn write(
        self,
        piece: Piece,
    ) -> impl std::future::Future<Output = (Self, Result<(), TransferError>)> + Send + 'static {
        blocking(move || match piece.into_bytes() {
            Ok(buf) => self.write_bytes(&buf),
            Err(e) => (self, Err(e)),
        })
    }
}

/// Why [`fill`] stopped short.
enum Shortfall {
    /// The stream ended.
    Eof,
    /// The stream failed.
    Failed(std::io::Error),
    /// `stop` fired.
    Stopped,
    /// Nothing arrived for [`STALL_TIMEOUT`].
    Stalled,
}

impl Shortfall {
    /// The error for a file of `expected` bytes cut short after `got`.
    fn into_error(self, got: u64, expected: u64) -> TransferError {
        match self {
            Self::Eof => TransferError::Truncated { got, expected },
            Self::Failed(e) => TransferError::Network(e),
            Self::Stopped => TransferError::Stopped,
            Self::Stalled => TransferError::Stalled,
        }
    }
}

/// Reads `input` onto the end of `buf` until it holds `len` bytes, unless
/// the stream ends or fails, nothing arrives for [`STALL_TIMEOUT`], or
/// `stop` fires first: how many bytes it holds, and why it stopped short.
/// With `pace`, reads at most a slice at a time and waits for each to be
/// due. The bytes land in the buffer's spare capacity: zeroing each
/// megabyte before the network overwrote it was 2% of a server's CPU
/// taking 1 GiB.
async fn fill<R, F>(
    input: &mut R,
    buf: &mut Vec<u8>,
    len: usize,
    pace: Option<&Pacer>,
    stop: &mut std::pin::Pin<&mut F>,
) -> (usize, Option<Shortfall>)
where
    R: AsyncRead + Unpin + ?Sized,
    F: std::future::Future<Output = ()>,
{
    use bytes::BufMut;
    buf.reserve_exact(len.saturating_sub(buf.len()));
    while buf.len() < len {
        let step = pace.map_or(len, Pacer::slice).min(len - buf.len());
        // At most `step` bytes: never past `len`, whatever the capacity.
        let mut room = (&mut *buf).limit(step);
        tokio::select! {
            r = tokio::time::timeout(STALL_TIMEOUT, input.read_buf(&mut room)) => match r {
                Err(_) => return (buf.len(), Some(Shortfall::Stalled)),
                Ok(Ok(0)) => return (buf.len(), Some(Shortfall::Eof)),
                Ok(Ok(n)) => {
                    if let Some(p) = pace {
                        p.take(n).await;
                    }
                }
                Ok(Err(e)) => return (buf.len(), Some(Shortfall::Failed(e))),
            },
            _ = stop.as_mut() => return (buf.len(), Some(Shortfall::Stopped)),
        }
    }
    (buf.len(), None)
}

/// Reads a block header: [`fill`] into a small buffer.
async fn fill_header<R, F>(
    input: &mut R,
    pace: Option<&Pacer>,
    stop: &mut std::pin::Pin<&mut F>,
) -> Result<[u8; BlockHeader::LEN], Shortfall>
where
    R: AsyncRead + Unpin + ?Sized,
    F: std::future::Future<Output = ()>,
{
    let mut head = Vec::with_capacity(BlockHeader::LEN);
    if let (_, Some(why)) = fill(input, &mut head, BlockHeader::LEN, pace, stop).await {
        return Err(why);
    }
    Ok(head.try_into().expect("filled to the header's length"))
}

/// What the next read of a file's data found.
enum Next {
    /// A piece carrying this many of the file's bytes; if the stream ended
    /// or failed within it, why.
    Piece(Piece, usize, Option<Shortfall>),
    /// The end mark of [`Encoding::Stream`].
    End,
}

/// Reads the next piece of a file's data at byte `got`: a chunk of raw
/// bytes, or one block. `size` is the file's size, or with
/// [`Encoding::Stream`] the most it may hold. A raw chunk cut short comes
/// back with what arrived and why it ended; a block cut short is an error
/// (its bytes are of no use without the rest).
async fn read_piece<R, F>(
    input: &mut R,
    size: u64,
    got: u64,
    encoding: Encoding,
    pace: Option<&Pacer>,
    stop: &mut std::pin::Pin<&mut F>,
) -> Result<Next, TransferError>
where
    R: AsyncRead + Unpin + ?Sized,
    F: std::future::Future<Output = ()>,
{
    // Data of unknown length that ends without its end mark was cut off.
    let short = |why: Shortfall| match (why, encoding) {
        (Shortfall::Eof, Encoding::Stream) => TransferError::StreamCut { got },
        (why, _) => why.into_error(got, size),
    };
    let malformed = |e: crate::protocol::FrameError| TransferError::Malformed(e.to_string());
    let header = match encoding {
        // A delta is assembled first (see `delta`), and what it makes
        // arrives here raw; its ops never reach this reader.
        Encoding::Delta => {
            return Err(TransferError::Malformed(
                "delta data where a file's bytes were expected".to_owned(),
            ))
        }
        Encoding::Raw => {
            let want = (size - got).min(CHUNK as u64) as usize;
            let mut buf = Vec::new();
            let (n, ended) = fill(input, &mut buf, want, pace, stop).await;
            return Ok(Next::Piece(Piece::Raw(buf), n, ended));
        }
        Encoding::Blocks => {
            let head = fill_header(input, pace, stop).await.map_err(short)?;
            let header = BlockHeader::decode(&head).map_err(malformed)?;
            if got + u64::from(header.raw_len) > size {
                return Err(TransferError::Malformed(format!(
                    "more data than the {size} bytes announced"
                )));
            }
            header
        }
        Encoding::Stream => {
            let paused = std::time::Instant::now();
            let header = loop {
                let head = fill_header(input, pace, stop).await.map_err(short)?;
                match BlockHeader::decode_stream(&head).map_err(malformed)? {
                    StreamMark::Block(header) => break header,
                    StreamMark::End => return Ok(Next::End),
                    StreamMark::Pause if paused.elapsed() > STREAM_PAUSE_MAX => {
                        return Err(TransferError::PausedTooLong);
                    }
                    StreamMark::Pause => {}
                }
            };
            if got + u64::from(header.raw_len) > size {
                return Err(TransferError::TooLong { limit: size });
            }
            header
        }
    };
    let raw_len = header.raw_len as usize;
    let mut payload = Vec::new();
    let wire_len = header.wire_len as usize;
    if let (_, Some(why)) = fill(input, &mut payload, wire_len, pace, stop).await {
        return Err(short(why));
    }
    let piece = if header.compressed {
        Piece::Zstd { payload, raw_len }
    } else {
        Piece::Raw(payload)
    };
    Ok(Next::Piece(piece, raw_len, None))
}

/// A small file's data, read whole from the stream before any disk work,
/// so that creating, writing and committing it is one trip to the disk
/// pool instead of three (see the server's small uploads).
pub(crate) struct Buffered {
    pieces: Vec<Piece>,
}

impl Buffered {
    /// Reads all `size` bytes of a file framed as `encoding` (of a known size).
    pub(crate) async fn read<R>(
        input: &mut R,
        size: u64,
        encoding: Encoding,
    ) -> Result<Self, TransferError>
    where
        R: AsyncRead + Unpin + ?Sized,
    {
        let stop = std::future::pending::<()>();
        tokio::pin!(stop);
        let mut pieces = Vec::new();
        let mut got = 0;
        while got < size {
            let Next::Piece(piece, raw, ended) =
                read_piece(input, size, got, encoding, None, &mut stop).await?
            else {
                return Err(TransferError::Malformed(
                    "the end of a stream in data of a known size".into(),
                ));
            };
            got += raw as u64;
            if ended.is_some() {
                return Err(TransferError::Truncated {
                    got,
                    expected: size,
                });
            }
            pieces.push(piece);
        }
        Ok(Self { pieces })
    }
}

impl Whole for Buffered {
    /// Writes (decompressing as need be) the data to `out`, returning its
    /// BLAKE3. Blocking.
    fn write_to(self: Box<Self>, out: &mut dyn Write) -> Result<Digest, TransferError> {
        let mut hasher = blake3::Hasher::new();
        for piece in self.pieces {
            let buf = match piece {
                Piece::Raw(buf) => buf,
                Piece::Zstd { payload, raw_len } => decompress_block(&payload, raw_len)?,
            };
            out.write_all(&buf).map_err(TransferError::Write)?;
            hasher.update(&buf);
        }
        Ok(*hasher.finalize().as_bytes())
    }
}

/// Receives the bytes from `start.offset` up to `size` from `input` into
/// `file` (positioned at the offset), framed as `encoding` says (with
/// [`Encoding::Stream`], up to its end, `size` being the most it may
/// hold), and returns the whole file's size and BLAKE3. With `room`, each
/// write first checks the free space left beside what uploads in flight
/// reserved (for data of unknown length). The data is not synced:
/// [`IncomingFile::commit`] syncs it with its metadata in one go. If `stop`
/// completes first, the bytes already received are written and synced, and
/// the result is [`TransferError::Stopped`]: the partial file is consistent
/// for a resume (a block that arrived only in part is dropped whole). With
/// `observer`, it is shown the bytes in order as they are written.
#[allow(clippy::too_many_arguments)]
pub(crate) async fn receive_file<R>(
    input: &mut R,
    size: u64,
    file: File,
    start: Start,
    encoding: Encoding,
    pace: Option<Arc<Pacer>>,
    room: Option<Arc<crate::space::Space>>,
    observer: Option<Observer>,
    progress: &Advance<'_>,
    stop: impl std::future::Future<Output = ()>,
) -> Result<Received, TransferError>
where
    R: AsyncRead + Unpin + ?Sized,
{
    let from = start.offset;
    let sink = FileSink::new(file, start, size, room, None).observed(observer);
    let (sink, result) =
        receive_pieces(input, size, from, sink, encoding, pace, progress, stop).await;
    sink.finish(result).await
}

/// The writing end of a transfer into any writer (standard output): the
/// bytes in order, hashed as they pass.
struct WriterSink<W> {
    out: W,
    hasher: blake3::Hasher,
}

impl<W: Write + Send + 'static> PieceSink for WriterSink<W> {
    fn write(
        mut self,
        piece: Piece,
    ) -> impl std::future::Future<Output = (Self, Result<(), TransferError>)> + Send + 'static {
        blocking(move || {
            let result = piece.into_bytes().and_then(|buf| {
                self.out.write_all(&buf).map_err(TransferError::Write)?;
                self.hasher.update(&buf);
                Ok(())
            });
            (self, result)
        })
    }
}

/// Receives a whole file of `size` bytes from `input` into `out` (a pipe:
/// nothing to resume, nothing to commit), flushed at the end. Returns the
/// BLAKE3 of what was written, for the caller to compare with the sender's.
pub(crate) async fn receive_to_writer<R, W>(
    input: &mut R,
    size: u64,
    out: W,
    encoding: Encoding,
    pace: Option<Arc<Pacer>>,
    progress: &Advance<'_>,
) -> Result<Digest, TransferError>
where
    R: AsyncRead + Unpin + ?Sized,
    W: Write + Send + 'static,
{
    let sink = WriterSink {
        out,
        hasher: blake3::Hasher::new(),
    };
    let (sink, result) = receive_pieces(
        input,
        size,
        0,
        sink,
        encoding,
        pace,
        progress,
        std::future::pending(),
    )
    .await;
    result?;
    let WriterSink { mut out, hasher } = sink;
    blocking(move || out.flush())
        .await
        .map_err(TransferError::Write)?;
    Ok(*hasher.finalize().as_bytes())
}

/// Receives the bytes from `got` up to `size` from `input` into `sink`,
/// framed as `encoding` says (with [`Encoding::Stream`], up to its end
/// mark, `size` being the most it may hold): the next piece is read from
/// the network while the previous one is written. Returns the sink
/// (whatever happened) and how it ended: where the data ended, or why it
/// failed. A disk error is the real cause when both sides failed.
#[allow(clippy::too_many_arguments)]
async fn receive_pieces<R, K>(
    input: &mut R,
    size: u64,
    mut got: u64,
    sink: K,
    encoding: Encoding,
    pace: Option<Arc<Pacer>>,
    progress: &Advance<'_>,
    stop: impl std::future::Future<Output = ()>,
) -> (K, Result<u64, TransferError>)
where
    R: AsyncRead + Unpin + ?Sized,
    K: PieceSink,
{
    type Task<K> = tokio::task::JoinHandle<(K, Result<(), TransferError>)>;
    let mut sink = Some(sink);
    let mut pending: Option<Task<K>> = None;
    // The previous piece's write, waited for before the next is handed over.
    async fn settle<K>(
        pending: &mut Option<Task<K>>,
        sink: &mut Option<K>,
    ) -> Result<(), TransferError> {
        if let Some(task) = pending.take() {
            let (back, result) = task.await.expect("writer panicked");
            *sink = Some(back);
            result?;
        }
        Ok(())
    }
    tokio::pin!(stop);
    let net: Result<u64, TransferError> = loop {
        if encoding.is_sized() && got >= size {
            break Ok(got);
        }
        let (piece, raw, ended) =
            match read_piece(input, size, got, encoding, pace.as_deref(), &mut stop).await {
                Ok(Next::Piece(piece, raw, ended)) => (piece, raw, ended),
                Ok(Next::End) => break Ok(got),
                Err(e) => break Err(e),
            };
        progress(raw as u64);
        if let Err(e) = settle(&mut pending, &mut sink).await {
            return (sink.expect("the sink is back after settling"), Err(e));
        }
        let s = sink.take().expect("the sink is back after settling");
        pending = Some(tokio::spawn(s.write(piece)));
        got += raw as u64;
        if let Some(why) = ended {
            break Err(why.into_error(got, size));
        }
    };
    let disk = settle(&mut pending, &mut sink).await;
    let sink = sink.expect("the sink is back after settling");
    (sink, disk.and(net))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Reading onto a buffer with room to spare stops at the length asked
    /// for, even paced in slices: the bytes after it stay in the stream
    /// for the next read, and what was in the buffer before is kept.
    #[tokio::test]
    async fn fill_stops_at_the_length_asked_whatever_the_room() {
        let data: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
        for pace in [None, Some(Pacer::new(1 << 30))] {
            let mut input = &data[..];
            let stop = std::future::pending::<()>();
            tokio::pin!(stop);
            let mut buf = Vec::with_capacity(1 << 20);
            buf.extend_from_slice(b"kept");
            let (n, short) =
                fill(&mut input, &mut buf, 4 + 150_000, pace.as_ref(), &mut stop).await;
            assert!(short.is_none());
            assert_eq!(n, 150_004);
            assert_eq!(&buf[..4], b"kept");
            assert_eq!(&buf[4..], &data[..150_000]);
            assert_eq!(input, &data[150_000..], "nothing read past the length");
            // The rest, then the end of the stream.
            let mut rest = Vec::new();
            let (n, short) = fill(&mut input, &mut rest, 60_000, pace.as_ref(), &mut stop).await;
            assert_eq!(n, 50_000);
            assert!(matches!(short, Some(Shortfall::Eof)));
            assert_eq!(rest, &data[150_000..]);
        }
    }
}

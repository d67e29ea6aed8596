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
//!
//! One file per step: `describe`, `cut`, `send` and `assemble`, and
//! `background` (a server's description of a large upload, made after it
//! commits); a file's bytes are read through `crate::files`' byte
//! sources. The cutter, the frames' timeouts and the errors they share
//! are here.

use std::collections::{HashMap, VecDeque};
use std::fs::File;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use fastcdc::v2020::{cut, select_masks, Normalization};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::protocol::{
    read_frame, write_frame, BlockHeader, ChunkBatch, ChunkSum, DeltaBase, DeltaOp, Digest,
    FrameError, CHUNKS_PER_BATCH, MAX_AVG_CHUNK, MAX_DELTA_CHUNKS, MIN_AVG_CHUNK,
};

use super::blocks::{Blocks, BLOCK};
use super::*;

mod assemble;
mod background;
mod cut;
mod describe;
mod send;

pub(crate) use assemble::*;
#[cfg(test)]
pub(crate) use background::describe_now;
pub(crate) use background::{describe_in_background, Describer, DESCRIBE_AFTER_UPLOAD};
pub(crate) use cut::*;
pub(crate) use describe::*;
pub(crate) use send::*;

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

/// What crossed in a delta: bytes of the new version copied from the old
/// one, and bytes sent anew (before compression).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub(crate) struct DeltaSent {
    pub(crate) copied: u64,
    pub(crate) literal: u64,
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

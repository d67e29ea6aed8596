//! The data phase's block encoding: a 9-byte header in front of each (raw or zstd) block.

use super::*;

/// Largest block of [`Encoding::Blocks`], before compression: what one
/// decompression may produce, so what a hostile sender can make a receiver
/// allocate per block.
pub const MAX_BLOCK: u32 = 1024 * 1024;

/// The 9-byte header in front of each block of [`Encoding::Blocks`]: a
/// kind (0 raw, 1 zstd), then the block's length before and after encoding
/// (u32, big-endian). A zstd block must be shorter than its raw form (else
/// the sender sends it raw), so a block never costs more than 9 bytes over
/// the data.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlockHeader {
    /// Whether the payload is zstd-compressed.
    pub compressed: bool,
    /// Bytes the block holds once decoded (1 to [`MAX_BLOCK`]).
    pub raw_len: u32,
    /// Bytes of payload on the wire after the header.
    pub wire_len: u32,
}

/// What a header of [`Encoding::Stream`] says: a block follows, the
/// sender's input is silent for now, or the data is over.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StreamMark {
    /// A block of data.
    Block(BlockHeader),
    /// Nothing yet: the sender waits for its input.
    Pause,
    /// The data is complete; the trailer follows.
    End,
}

impl BlockHeader {
    /// Its size on the wire.
    pub const LEN: usize = 9;

    /// The end of an [`Encoding::Stream`]: a raw block of no bytes.
    pub const END: [u8; Self::LEN] = [0; Self::LEN];

    /// A pause in an [`Encoding::Stream`]: kind 2, no bytes.
    pub const PAUSE: [u8; Self::LEN] = [2, 0, 0, 0, 0, 0, 0, 0, 0];

    /// Parses a header of [`Encoding::Stream`]: a block, a pause or the end.
    pub fn decode_stream(b: &[u8; Self::LEN]) -> Result<StreamMark, FrameError> {
        Ok(match *b {
            Self::END => StreamMark::End,
            Self::PAUSE => StreamMark::Pause,
            _ => StreamMark::Block(Self::decode(b)?),
        })
    }

    /// The header's bytes.
    pub fn encode(&self) -> [u8; Self::LEN] {
        let mut b = [0u8; Self::LEN];
        b[0] = u8::from(self.compressed);
        b[1..5].copy_from_slice(&self.raw_len.to_be_bytes());
        b[5..9].copy_from_slice(&self.wire_len.to_be_bytes());
        b
    }

    /// Parses and checks a header.
    pub fn decode(b: &[u8; Self::LEN]) -> Result<Self, FrameError> {
        let raw_len = u32::from_be_bytes([b[1], b[2], b[3], b[4]]);
        let wire_len = u32::from_be_bytes([b[5], b[6], b[7], b[8]]);
        let compressed = match b[0] {
            0 => false,
            1 => true,
            k => return Err(FrameError::Malformed(format!("unknown block kind {k}"))),
        };
        if raw_len == 0 || raw_len > MAX_BLOCK {
            return Err(FrameError::Malformed(format!("block of {raw_len} bytes")));
        }
        let fits = if compressed {
            wire_len > 0 && wire_len < raw_len
        } else {
            wire_len == raw_len
        };
        if !fits {
            return Err(FrameError::Malformed(format!(
                "block of {raw_len} bytes sent as {wire_len}"
            )));
        }
        Ok(Self {
            compressed,
            raw_len,
            wire_len,
        })
    }
}

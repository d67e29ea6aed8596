//! Frames: a 4-byte big-endian length, then one bincode-encoded message, capped and decoded exactly.

use serde::de::DeserializeOwned;
use serde::Serialize;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use super::*;

/// Decoding config: the limit bounds what a hostile length field inside the
/// payload (a string's or vector's) can make the decoder allocate.
const DECODE: bincode::config::Configuration<
    bincode::config::BigEndian,
    bincode::config::Varint,
    bincode::config::Limit<MAX_FRAME>,
> = bincode::config::standard()
    .with_big_endian()
    .with_limit::<MAX_FRAME>();

/// Encoding config: the same format without the limit, so an oversized
/// message is measured and reported as [`FrameError::TooLarge`].
const ENCODE: bincode::config::Configuration<bincode::config::BigEndian, bincode::config::Varint> =
    bincode::config::standard().with_big_endian();

/// What can go wrong reading or writing a frame.
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    /// The stream ended before a complete frame arrived.
    #[error("stream ended in the middle of a message")]
    Truncated,
    /// The length prefix exceeds the limit (at most [`MAX_FRAME`]).
    #[error("message of {0} bytes exceeds the {1}-byte limit")]
    TooLarge(usize, usize),
    /// The payload is not a valid encoding of the expected message.
    #[error("malformed message: {0}")]
    Malformed(String),
    /// The payload decoded but left bytes unread.
    #[error("malformed message: {0} trailing bytes")]
    Trailing(usize),
    /// The underlying stream failed.
    #[error(transparent)]
    Io(#[from] std::io::Error),
}

/// Encodes `msg` as a complete frame (length prefix plus payload).
pub fn encode<T: Serialize>(msg: &T) -> Result<Vec<u8>, FrameError> {
    let payload = bincode::serde::encode_to_vec(msg, ENCODE)
        .map_err(|e| FrameError::Malformed(e.to_string()))?;
    if payload.len() > MAX_FRAME {
        return Err(FrameError::TooLarge(payload.len(), MAX_FRAME));
    }
    let mut frame = Vec::with_capacity(4 + payload.len());
    frame.extend_from_slice(&(payload.len() as u32).to_be_bytes());
    frame.extend_from_slice(&payload);
    Ok(frame)
}

/// Decodes one frame's payload (without the length prefix), rejecting trailing bytes.
pub fn decode<T: DeserializeOwned>(payload: &[u8]) -> Result<T, FrameError> {
    let (msg, used) = bincode::serde::decode_from_slice(payload, DECODE)
        .map_err(|e| FrameError::Malformed(e.to_string()))?;
    if used != payload.len() {
        return Err(FrameError::Trailing(payload.len() - used));
    }
    Ok(msg)
}

/// Writes `msg` as one frame.
pub(crate) async fn write_frame<W, T>(w: &mut W, msg: &T) -> Result<(), FrameError>
where
    W: AsyncWrite + Unpin,
    T: Serialize,
{
    let frame = encode(msg)?;
    w.write_all(&frame).await?;
    Ok(())
}

/// Reads one frame and decodes it as `T`.
pub async fn read_frame<R, T>(r: &mut R) -> Result<T, FrameError>
where
    R: AsyncRead + Unpin,
    T: DeserializeOwned,
{
    read_frame_limited(r, MAX_FRAME).await
}

/// Reads one frame of at most `limit` bytes (capped at [`MAX_FRAME`]) and
/// decodes it as `T`. The server reads request headers with its configured
/// `--max-header-size`.
pub(crate) async fn read_frame_limited<R, T>(r: &mut R, limit: usize) -> Result<T, FrameError>
where
    R: AsyncRead + Unpin,
    T: DeserializeOwned,
{
    let limit = limit.min(MAX_FRAME);
    let mut len = [0u8; 4];
    r.read_exact(&mut len).await.map_err(eof_is_truncated)?;
    let len = u32::from_be_bytes(len) as usize;
    if len > limit {
        return Err(FrameError::TooLarge(len, limit));
    }
    let mut payload = vec![0u8; len];
    r.read_exact(&mut payload).await.map_err(eof_is_truncated)?;
    decode(&payload)
}

fn eof_is_truncated(e: std::io::Error) -> FrameError {
    if e.kind() == std::io::ErrorKind::UnexpectedEof {
        FrameError::Truncated
    } else {
        FrameError::Io(e)
    }
}

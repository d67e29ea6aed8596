//! The qxfer wire protocol: typed messages and their length-prefixed bincode framing.
//!
//! Every frame is a 4-byte big-endian length followed by that many bytes of
//! bincode (v2, standard config) encoding one message. Frames are capped at
//! [`MAX_FRAME`] and must decode exactly, with no trailing bytes. The functions
//! here are generic over `AsyncRead`/`AsyncWrite`, so they run unchanged over a
//! QUIC stream or an in-memory pipe. See docs/PROTOCOL.md for the exchange.

use std::fmt;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// ALPN protocol id; the version lives here so an incompatible change gets a new id.
pub const ALPN: &[u8] = b"qxfer/3";

/// Largest frame either side accepts. Headers are small; the cap stops a peer
/// from making us allocate on the strength of a length prefix.
pub const MAX_FRAME: usize = 64 * 1024;

/// Longest remote path accepted, in bytes (Linux PATH_MAX).
pub const MAX_PATH_LEN: usize = 4096;

/// A BLAKE3 digest of a file's contents.
pub type Digest = [u8; 32];

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

/// The first frame on every stream, sent by the client. New kinds of request
/// are added as new variants at the end, so existing ones keep their tags.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Request {
    /// Upload a file; its bytes follow this frame on the same stream.
    Put(PutRequest),
    /// Download a file.
    Get(GetRequest),
    /// List a directory.
    List(ListRequest),
    /// Create a directory (and its parents) and optionally set its metadata.
    Mkdir(MkdirRequest),
}

/// Create the directory `path` if missing; then apply `meta` if given.
/// Tree uploads send this for every directory, deepest first, once the
/// files are in, so empty directories exist and mtimes stick.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MkdirRequest {
    /// The directory, relative to the server root.
    pub path: String,
    /// Permission bits and mtime to apply.
    pub meta: Option<DirMeta>,
}

/// Metadata a directory carries in a tree transfer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct DirMeta {
    /// Unix permission bits, if known.
    pub mode: Option<u32>,
    /// Last modification time.
    pub mtime: Option<Timestamp>,
}

/// Upload one file to `path` (relative to the server root, `/`-separated).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PutRequest {
    /// Destination, relative to the server root.
    pub path: String,
    /// Source metadata; `meta.size` is the exact number of data bytes that
    /// follow the header.
    pub meta: FileMeta,
    /// Replace an existing file instead of refusing.
    pub force: bool,
    /// Resume mode: the client waits for the server's [`PutOffer`], answers
    /// with [`Continue`], and only then sends the data (from the agreed
    /// offset). Without it the data follows the header at once, from 0.
    pub resume: bool,
    /// How the data is framed.
    pub encoding: Encoding,
}

/// How a file's bytes travel on a stream.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum Encoding {
    /// The bytes as they are: exactly `size - offset` of them.
    #[default]
    Raw,
    /// Blocks of at most [`MAX_BLOCK`] bytes each, every one sent as it is
    /// or zstd-compressed, as the sender chose for it (see [`BlockHeader`]).
    Blocks,
}

/// Whether the sender may compress (the `--compress` option).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
pub enum Compression {
    /// Compress blocks that shrink, when the link is slower than the
    /// compressor; data that does not compress is soon sent as it is.
    #[default]
    Auto,
    /// Compress every block that shrinks, however fast the link.
    Always,
    /// Never compress (the bytes travel raw).
    Never,
}

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

impl BlockHeader {
    /// Its size on the wire.
    pub const LEN: usize = 9;

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

/// Files at least this large are uploaded in resume mode and kept as
/// resumable partials when interrupted; smaller ones are cheaper to send
/// again than to wait a round trip for an offer.
pub const RESUME_MIN: u64 = 4 * 1024 * 1024;

/// What the server already holds of an upload.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct PutOffer {
    /// Bytes of this file (same client, path, size and mtime) the server
    /// holds from an interrupted upload; 0 if none.
    pub offset: u64,
    /// BLAKE3 of those bytes, for the client to compare with its own.
    pub prefix: Digest,
    /// A partial of a different version of the file (another size or
    /// mtime) was found and thrown away.
    pub discarded_stale: bool,
}

/// The client's answer to a [`PutOffer`] in resume mode: where its data
/// starts. Either the offered offset (the prefixes matched) or 0.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Continue {
    /// First byte that follows.
    pub offset: u64,
}

/// Download the file at `path` (relative to the server root).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GetRequest {
    /// Source, relative to the server root.
    pub path: String,
    /// What the client already holds from an interrupted download.
    pub resume: Option<Prefix>,
    /// Whether the server may compress what it sends.
    pub compression: Compression,
}

/// The first `offset` bytes of a file and their BLAKE3.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Prefix {
    /// Length of the prefix.
    pub offset: u64,
    /// BLAKE3 of it.
    pub digest: Digest,
}

/// The server's answer to a get: the file's metadata and where its data starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct GetOffer {
    /// The file's metadata.
    pub meta: FileMeta,
    /// First byte that follows: the client's prefix length if the server's
    /// own prefix hashes the same, else 0 (start over).
    pub offset: u64,
    /// How the data is framed.
    pub encoding: Encoding,
}

/// List the directory at `path` (relative to the server root; empty means the root).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ListRequest {
    /// Directory (or single file) to list.
    pub path: String,
    /// List the whole tree beneath it: entry names are then relative paths.
    /// Symlinks are listed, never followed.
    pub recursive: bool,
}

/// Modification time as seconds and nanoseconds since the Unix epoch.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Timestamp {
    /// Whole seconds since 1970-01-01T00:00:00Z (negative before).
    pub secs: i64,
    /// Nanoseconds within the second.
    pub nanos: u32,
}

/// Metadata that travels with a file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileMeta {
    /// Size in bytes.
    pub size: u64,
    /// Last modification time, if the platform reports one.
    pub mtime: Option<Timestamp>,
    /// Unix permission bits (`st_mode & 0o7777`), if known.
    pub mode: Option<u32>,
}

/// The server's first frame on a stream: the request is accepted or refused.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Response {
    /// The upload is accepted; the server is reading the data.
    PutAccepted(PutOffer),
    /// The file exists; its bytes from `offset` follow this frame.
    GetAccepted(GetOffer),
    /// The listing follows as [`ListBatch`] frames.
    ListAccepted,
    /// The request was refused; nothing follows.
    Refused(RemoteError),
    /// The directory exists and has the requested metadata.
    MkdirDone,
    /// A put without `force` names a file that exists with the same size
    /// and mtime: here is the BLAKE3 of what the server holds, for the
    /// client to compare with its own. Nothing is written (the rerun of a
    /// finished transfer skips what is already there).
    AlreadyThere(Digest),
}

/// Sent by the sender after the data: what the receiver must have. A
/// mismatch means the data was corrupted and is not committed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Trailer {
    /// BLAKE3 of the whole file (including any resumed prefix).
    pub digest: Digest,
}

/// The receiver's final word on a transfer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Receipt {
    /// The file is complete, synced and under its final name.
    Committed {
        /// Bytes written.
        size: u64,
        /// BLAKE3 of what was written.
        digest: Digest,
    },
    /// The transfer failed and nothing was committed.
    Failed(RemoteError),
}

/// One frame of a directory listing.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ListBatch {
    /// Entries in this batch, sorted by name across the whole listing.
    pub entries: Vec<Entry>,
    /// Whether more batches follow.
    pub more: bool,
}

/// Kind of a directory entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum EntryKind {
    /// A regular file.
    File,
    /// A directory.
    Dir,
    /// A symbolic link (not followed).
    Symlink,
    /// Anything else: socket, device, FIFO.
    Other,
}

/// One entry of a directory listing.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    /// File name (one path component), or the path relative to the listed
    /// directory in a recursive listing.
    pub name: String,
    /// What the entry is.
    pub kind: EntryKind,
    /// Size in bytes (as `lstat` reports it).
    pub size: u64,
    /// Last modification time.
    pub mtime: Option<Timestamp>,
    /// Unix permission bits, if known.
    pub mode: Option<u32>,
}

/// Why a request failed, as a code a program can match plus a message for people.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ErrorCode {
    /// No such file or directory.
    NotFound,
    /// A file was expected but this is a directory.
    IsDirectory,
    /// A directory was expected but this is not one.
    NotDirectory,
    /// The server's OS refused access.
    PermissionDenied,
    /// The path is not a safe relative path.
    InvalidPath,
    /// The destination exists and `force` was not set.
    AlreadyExists,
    /// The disk (or quota) is full.
    NoSpace,
    /// The data did not match the declared size or digest.
    Corrupt,
    /// The peer broke the protocol (bad frame, wrong order, timeout).
    Protocol,
    /// Anything else on the server's side.
    Internal,
    /// The server accepts no uploads (`serve --read-only`).
    ReadOnly,
    /// The file exceeds the server's `--max-file-size`.
    TooLarge,
    /// The path leads outside the served directory (through a symbolic link).
    OutsideRoot,
    /// The name is a symbolic link, which a put never replaces or writes through.
    Symlink,
}

/// Stream codes both sides use to reset or stop a stream.
pub mod stream {
    /// Reset: the sender could not finish sending the file (it could not be
    /// read, or it changed while being sent); drop what arrived.
    pub const RESET_SOURCE_FAILED: u32 = 1;
    /// Stop: the receiver will not take more data (refused or failed).
    pub const STOP_REFUSED: u32 = 2;
}

/// Application close codes a server may end a connection with.
pub mod close {
    /// Normal end: the client is done or the server shuts down.
    pub const DONE: u32 = 0;
    /// This client identity already has `--max-connections-per-client` open.
    pub const TOO_MANY_FROM_CLIENT: u32 = 2;
    /// The server is shutting down (also the reset code of streams it will
    /// no longer serve): reconnect and resume, to it once restarted or to
    /// another server.
    pub const SHUTTING_DOWN: u32 = 3;
}

impl fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = match self {
            Self::NotFound => "not found",
            Self::IsDirectory => "is a directory",
            Self::NotDirectory => "not a directory",
            Self::PermissionDenied => "permission denied",
            Self::InvalidPath => "invalid path",
            Self::AlreadyExists => "already exists",
            Self::NoSpace => "no space left",
            Self::Corrupt => "data corrupted",
            Self::Protocol => "protocol error",
            Self::Internal => "internal error",
            Self::ReadOnly => "read-only server",
            Self::TooLarge => "file too large",
            Self::OutsideRoot => "outside the served directory",
            Self::Symlink => "symbolic link",
        };
        f.write_str(s)
    }
}

/// An error reported by the peer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[error("{message}")]
pub struct RemoteError {
    /// Machine-readable reason.
    pub code: ErrorCode,
    /// Human-readable explanation, naming the file and what to do.
    pub message: String,
}

impl RemoteError {
    /// Builds an error from a code and message.
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
        }
    }
}

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
pub async fn write_frame<W, T>(w: &mut W, msg: &T) -> Result<(), FrameError>
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
pub async fn read_frame_limited<R, T>(r: &mut R, limit: usize) -> Result<T, FrameError>
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

#[cfg(test)]
mod tests {
    use super::*;

    fn put() -> Request {
        Request::Put(PutRequest {
            path: "dir/ä file.txt".into(),
            meta: FileMeta {
                size: 42,
                mtime: Some(Timestamp {
                    secs: 1_700_000_000,
                    nanos: 5,
                }),
                mode: Some(0o644),
            },
            force: false,
            resume: true,
            encoding: Encoding::Raw,
        })
    }

    #[tokio::test]
    async fn round_trip_over_pipe() {
        let (mut a, mut b) = tokio::io::duplex(1024);
        write_frame(&mut a, &put()).await.unwrap();
        write_frame(
            &mut a,
            &Response::GetAccepted(GetOffer {
                meta: FileMeta {
                    size: 1,
                    mtime: None,
                    mode: None,
                },
                offset: 0,
                encoding: Encoding::Raw,
            }),
        )
        .await
        .unwrap();
        let got: Request = read_frame(&mut b).await.unwrap();
        assert_eq!(got, put());
        let got: Response = read_frame(&mut b).await.unwrap();
        assert_eq!(
            got,
            Response::GetAccepted(GetOffer {
                meta: FileMeta {
                    size: 1,
                    mtime: None,
                    mode: None
                },
                offset: 0,
                encoding: Encoding::Raw,
            })
        );
    }

    #[tokio::test]
    async fn truncated_frames_are_reported() {
        let frame = encode(&put()).unwrap();
        for cut in [0, 2, 4, frame.len() - 1] {
            let mut r = &frame[..cut];
            let err = read_frame::<_, Request>(&mut r).await.unwrap_err();
            assert!(matches!(err, FrameError::Truncated), "cut {cut}: {err:?}");
        }
    }

    #[tokio::test]
    async fn oversized_length_is_refused_before_allocating() {
        let mut frame = ((MAX_FRAME + 1) as u32).to_be_bytes().to_vec();
        frame.extend_from_slice(&[0; 16]);
        let err = read_frame::<_, Request>(&mut &frame[..]).await.unwrap_err();
        assert!(matches!(err, FrameError::TooLarge(n, MAX_FRAME) if n == MAX_FRAME + 1));
    }

    #[tokio::test]
    async fn garbage_and_trailing_bytes_are_refused() {
        let mut garbage = 3u32.to_be_bytes().to_vec();
        garbage.extend_from_slice(&[0xff, 0xff, 0xff]);
        let err = read_frame::<_, Request>(&mut &garbage[..])
            .await
            .unwrap_err();
        assert!(matches!(err, FrameError::Malformed(_)), "{err:?}");

        let mut payload = encode(&put()).unwrap()[4..].to_vec();
        payload.push(0);
        let mut frame = (payload.len() as u32).to_be_bytes().to_vec();
        frame.extend_from_slice(&payload);
        let err = read_frame::<_, Request>(&mut &frame[..]).await.unwrap_err();
        assert!(matches!(err, FrameError::Trailing(1)), "{err:?}");
    }

    #[test]
    fn oversized_message_is_not_encoded() {
        let req = Request::Get(GetRequest {
            resume: None,
            path: "x".repeat(MAX_FRAME + 1),
            compression: Compression::Never,
        });
        assert!(matches!(encode(&req), Err(FrameError::TooLarge(..))));
    }

    #[test]
    fn unknown_variant_is_malformed() {
        // Tag 9 names no Request variant.
        let err = decode::<Request>(&[9]).unwrap_err();
        assert!(matches!(err, FrameError::Malformed(_)));
    }

    /// Decodes `payload` as `T`; whatever decodes must re-encode to a frame
    /// that decodes to the same message.
    fn decodes_consistently<T>(payload: &[u8])
    where
        T: DeserializeOwned + Serialize + PartialEq + fmt::Debug,
    {
        if let Ok(msg) = decode::<T>(payload) {
            let frame = encode(&msg).unwrap();
            assert_eq!(decode::<T>(&frame[4..]).unwrap(), msg);
        }
    }

    // The long run is the cargo-fuzz target in tests/fuzz; this keeps the
    // same properties checked on every `cargo test`.
    proptest::proptest! {
        #[test]
        fn arbitrary_bytes_never_panic_the_decoders(
            bytes in proptest::collection::vec(proptest::num::u8::ANY, 0..512)
        ) {
            decodes_consistently::<Request>(&bytes);
            decodes_consistently::<Response>(&bytes);
            decodes_consistently::<Receipt>(&bytes);
            decodes_consistently::<Trailer>(&bytes);
            decodes_consistently::<ListBatch>(&bytes);
            decodes_consistently::<Continue>(&bytes);
        }

        #[test]
        fn block_headers_decode_only_within_their_limits(
            bytes in proptest::array::uniform9(proptest::num::u8::ANY)
        ) {
            if let Ok(h) = BlockHeader::decode(&bytes) {
                assert!(h.raw_len >= 1 && h.raw_len <= MAX_BLOCK);
                assert!(if h.compressed { h.wire_len < h.raw_len } else { h.wire_len == h.raw_len });
                assert_eq!(h.encode(), bytes);
            }
        }

        #[test]
        fn corrupted_valid_frames_never_panic_the_decoders(
            at in 0usize..64, value in proptest::num::u8::ANY, cut in 0usize..64
        ) {
            let mut frame = encode(&put()).unwrap()[4..].to_vec();
            let i = at % frame.len();
            frame[i] = value;
            frame.truncate(frame.len() - cut % frame.len());
            decodes_consistently::<Request>(&frame);
        }
    }
}

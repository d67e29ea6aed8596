//! The qxfer wire protocol: typed messages and their length-prefixed bincode framing.
//!
//! Every frame is a 4-byte big-endian length followed by that many bytes of
//! bincode (v2, standard config) encoding one message. Frames are capped at
//! [`MAX_FRAME`] and must decode exactly, with no trailing bytes. The functions
//! here are generic over `AsyncRead`/`AsyncWrite`, so they run unchanged over a
//! QUIC stream or an in-memory pipe. See docs/PROTOCOL.md for the exchange.
//!
//! `messages` (what travels), `frame` (how a message is framed), `block`
//! (the data phase's blocks), `codes` (error, stream and close codes).

mod block;
mod codes;
mod frame;
mod messages;
#[cfg(test)]
mod tests;

pub use block::*;
pub use codes::*;
pub use frame::*;
pub use messages::*;

/// ALPN protocol id; the version lives here so an incompatible change gets a new id.
pub const ALPN: &[u8] = b"qxfer/3";

/// Largest frame either side accepts. Headers are small; the cap stops a peer
/// from making us allocate on the strength of a length prefix.
pub(crate) const MAX_FRAME: usize = 64 * 1024;

/// Longest remote path accepted, in bytes (Linux PATH_MAX).
pub(crate) const MAX_PATH_LEN: usize = 4096;

/// Smallest and largest average chunk size of a [`DeltaBase`].
pub(crate) const MIN_AVG_CHUNK: u32 = 16 * 1024;
pub(crate) const MAX_AVG_CHUNK: u32 = 4 * 1024 * 1024;

/// Most chunks a [`DeltaBase`] may have: what the sender of a delta holds
/// in memory to find them (about 6 MiB). A receiver whose version could
/// need more (past 128 GiB) describes none, and gets the whole file.
pub(crate) const MAX_DELTA_CHUNKS: u64 = 1 << 17;

/// Most chunks in one [`ChunkBatch`] frame (37 bytes each, within [`MAX_FRAME`]).
pub(crate) const CHUNKS_PER_BATCH: usize = 1024;

/// Most files one [`DigestsRequest`] names: their answer (33 bytes each)
/// fits one frame.
pub(crate) const MAX_DIGEST_PATHS: usize = 1024;

/// A BLAKE3 digest of a file's contents.
pub(crate) type Digest = [u8; 32];

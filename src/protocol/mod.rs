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
pub const MAX_FRAME: usize = 64 * 1024;

/// Longest remote path accepted, in bytes (Linux PATH_MAX).
pub const MAX_PATH_LEN: usize = 4096;

/// A BLAKE3 digest of a file's contents.
pub type Digest = [u8; 32];

//! Work on local files that both sides' transfers and the server's stores do: the disk pool, byte sources and sinks, atomic commits, mtimes and modes, resume prefixes, remembered chunks.
//!
//! Below both `exchange` (which frames bytes for the wire, and runs each
//! exchange's sequence) and `store` (where the server keeps files), so
//! that a store needs nothing of the wire: a store offers its files as a
//! [`ByteSource`] and takes uploads through a [`Sink`] (or a [`Whole`]
//! small file), and exchange moves bytes between those and a stream.
//!
//! One file per job: `pool` (the bounded disk threads every blocking call
//! goes through), `source` (reading a file's bytes, in stretches into
//! reused memory), `sink` (writing them, hashed as they pass), `commit`
//! (temporaries, atomic commits, renames), `grouped` (the thread that
//! commits small files in rounds, one sync each), `meta` (timestamps
//! and modes), `start` (checking a resume prefix), `described` (the
//! chunks of files cut before), `error` (what can go wrong moving a
//! file's bytes).

mod commit;
pub(crate) mod described;
mod error;
#[cfg(target_os = "linux")]
pub(crate) mod grouped;
mod meta;
mod pool;
mod sink;
mod source;
mod start;

pub(crate) use commit::*;
pub(crate) use described::{Description, Descriptions, FileKey};
pub use error::TransferError;
pub(crate) use error::{STALL_TIMEOUT, STREAM_PAUSE_MAX};
pub(crate) use meta::*;
pub(crate) use pool::*;
pub(crate) use sink::*;
pub(crate) use source::*;
pub(crate) use start::*;

/// Size of one chunk passed between the disk and the network: one block of
/// the wire's `Encoding::Blocks`, and what a byte source yields at a time.
pub(crate) const CHUNK: usize = crate::protocol::MAX_BLOCK as usize;

//! File bytes to stream and back, written once and used by both the server and the client.
//!
//! Disk work runs in a bounded pool of blocking threads, one chunk (or one
//! metadata operation) per call, and network I/O on the async side: the
//! next chunk is read while the current one is sent, and the previous chunk
//! is written while the next one arrives, so the disk and the network
//! overlap while memory stays at two chunks per transfer and an idle
//! transfer holds no thread. Both sides hash with BLAKE3 in the disk calls
//! as the bytes pass. A received file is written under a hidden temporary
//! name, synced, and only then renamed into place ([`IncomingFile`]).
//!
//! One module per job: `send` and `receive` (the two ends of a file's
//! bytes), `pipe` (`put -`'s data of unknown length), `delta` (a changed
//! file as copies of the receiver's old version and new blocks), `blocks`
//! (a file's BLAKE3 from its 1 MiB blocks' values), `compress` (zstd
//! blocks), `pace` (`--limit-rate`), `stream` (the halves of a stream
//! both sides are written against), `counted` (bytes on the wire). The disk pool, byte sources and sinks,
//! commits, metadata, resume prefixes, remembered chunks and the transfer
//! error are in `crate::files`, below this and the stores, and
//! re-exported here.

mod blocks;
mod compress;
mod counted;
mod delta;
mod pace;
mod pipe;
mod receive;
mod send;
mod stream;
#[cfg(test)]
pub(crate) mod tests;

pub use crate::files::TransferError;
use compress::*;
pub(crate) use counted::Counted;
pub(crate) use delta::*;
pub(crate) use pace::*;
pub(crate) use pipe::*;
pub(crate) use receive::*;
pub(crate) use send::*;
pub(crate) use stream::*;

// The file work below both sides, used throughout.
pub(crate) use crate::files::*;

/// Called with the number of bytes each time data moves (drives progress bars).
pub(crate) type Advance<'a> = dyn Fn(u64) + Send + Sync + 'a;

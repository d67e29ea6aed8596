//! What can go wrong moving one file's bytes, and the stall limit both sides apply.

use std::time::Duration;

/// What went wrong moving one file's bytes.
#[derive(Debug, thiserror::Error)]
pub enum TransferError {
    /// Reading the source file failed.
    #[error("cannot read the file: {0}")]
    Read(#[source] std::io::Error),
    /// Writing the destination file failed.
    #[error("cannot write the file: {0}")]
    Write(#[source] std::io::Error),
    /// The source became shorter than announced while it was being sent.
    #[error("the file shrank from {expected} to {found} bytes while being sent; send it again once it stops changing")]
    SourceChanged {
        /// Size announced to the peer.
        expected: u64,
        /// Bytes actually read.
        found: u64,
    },
    /// The source was modified while it was being read (it grew, or its
    /// modification or change time moved): what was sent mixes versions.
    #[error("the file changed while being sent ({0}); nothing was kept: send it again once it stops changing")]
    ChangedWhileSent(&'static str),
    /// The peer stopped sending before all the data arrived.
    #[error("the connection ended after {got} of {expected} bytes")]
    Truncated {
        /// Bytes received.
        got: u64,
        /// Bytes announced.
        expected: u64,
    },
    /// The stream failed.
    #[error("network error: {0}")]
    Network(#[source] std::io::Error),
    /// The receiver was told to stop (a newer transfer of the same file took over).
    #[error("stopped: a newer transfer of the same file took over")]
    Stopped,
    /// The earlier version a delta builds on could not be read (it went
    /// away or changed while the new one was assembled from it).
    #[error("cannot read the earlier version the changes apply to: {0}; send the file again")]
    OldVersion(#[source] std::io::Error),
    /// The peer's data did not follow the protocol (a malformed block).
    #[error("malformed data from the peer: {0}")]
    Malformed(String),
    /// No byte moved for [`STALL_TIMEOUT`]: the peer stopped reading or sending.
    #[error("no data moved for {} s: the other side stopped answering; rerun the command to resume", STALL_TIMEOUT.as_secs())]
    Stalled,
    /// Data of unknown length (a pipe) ended without its end mark: the
    /// sender was interrupted, so what arrived may be only a part.
    #[error(
        "the piped data broke off after {got} bytes, before its end (the sender was interrupted)"
    )]
    StreamCut {
        /// Bytes received.
        got: u64,
    },
    /// Data of unknown length went past the most the receiver takes.
    #[error("the piped data went past {limit} bytes, the most taken in one piped upload")]
    TooLong {
        /// The most accepted.
        limit: u64,
    },
    /// The sender of data of unknown length said for too long that its
    /// input was silent.
    #[error("the sender's input gave nothing for {} minutes", STREAM_PAUSE_MAX.as_secs() / 60)]
    PausedTooLong,
}

/// How long a transfer may go without moving a byte before it fails. QUIC
/// keep-alives hold a connection open while its peer's process is stuck, so
/// the connection's idle timeout alone would never end such a transfer. A
/// rate-limited transfer moves a few bytes every second (see
/// exchange's `Pacer::slice`), so only a peer that stopped reading or sending
/// reaches this.
pub(crate) const STALL_TIMEOUT: Duration = Duration::from_secs(60);

impl TransferError {
    /// Whether the failure is the sender's own file (unreadable, or changed
    /// while being read), so the peer must be told to drop what it got.
    pub(crate) fn is_source_failure(&self) -> bool {
        matches!(
            self,
            Self::Read(_) | Self::SourceChanged { .. } | Self::ChangedWhileSent(_)
        )
    }
}

/// How long the sender of an [`Encoding::Stream`] may go on pausing
/// (its input silent) before the receiver gives up: a producer that wrote
/// nothing for an hour is taken for one that hangs.
pub(crate) const STREAM_PAUSE_MAX: Duration = Duration::from_secs(3600);

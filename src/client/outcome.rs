//! What a transfer ends with: a finished file's report, or the error that names the file and what to do.

use std::path::{Path, PathBuf};

use crate::exchange;
use crate::protocol::{Digest, FrameError, RemoteError, Response};

use super::*;

/// Why one file's transfer failed.
#[derive(Debug, thiserror::Error)]
pub enum FileError {
    /// The server refused or failed the request.
    #[error("{0}")]
    Remote(#[from] RemoteError),
    /// A local file problem.
    #[error("{path}: {source}")]
    Local {
        /// The local file.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// The local destination exists.
    #[error("{0} already exists; use --force to overwrite it")]
    LocalExists(PathBuf),
    /// Moving the bytes failed.
    #[error("{path}: {source}")]
    Transfer {
        /// The local file.
        path: PathBuf,
        /// What failed.
        source: TransferError,
    },
    /// The data arrived but did not match what the sender hashed.
    #[error("{0}: data corrupted in transit (BLAKE3 mismatch); nothing was saved, try again")]
    Corrupt(PathBuf),
    /// Data streamed to standard output did not match the sender's BLAKE3:
    /// it has been written already, so whoever reads it must discard it.
    #[error("{0}: the bytes written to standard output do not match the server's BLAKE3 (corrupted in transit); discard that output and try again")]
    CorruptOutput(String),
    /// The server broke the protocol or the stream failed.
    #[error("{0}")]
    Protocol(String),
    /// All of an upload from a pipe was sent, but the server's word on it
    /// never came: it may or may not have been saved.
    #[error("'{name}': all of standard input was sent, but the server's answer did not come ({why}); it may have been saved: check with `qxfer ls {name}` before running the pipeline again")]
    Unconfirmed {
        /// The remote name.
        name: String,
        /// What happened instead of the answer.
        why: String,
    },
}

impl FileError {
    pub(super) fn local(path: &Path) -> impl FnOnce(std::io::Error) -> Self + '_ {
        move |source| {
            if exchange::is_disk_full(&source) {
                Self::Local {
                    path: path.to_owned(),
                    source: std::io::Error::new(
                        source.kind(),
                        format!("{source}; the local disk is full, free space and retry"),
                    ),
                }
            } else {
                Self::Local {
                    path: path.to_owned(),
                    source,
                }
            }
        }
    }
}

impl FileError {
    /// Whether the failure was the connection's or the server's state, not
    /// the file's: the same transfer may well succeed over a new connection
    /// (a network outage, a server restart or shutdown, a stalled peer, a
    /// timeout), and resumes where it stopped.
    pub(crate) fn is_transient(&self) -> bool {
        match self {
            Self::Transfer { source, .. } => matches!(
                source,
                TransferError::Network(_)
                    | TransferError::Truncated { .. }
                    | TransferError::Stalled
            ),
            Self::Protocol(_) => true,
            Self::Remote(e) => e.code == crate::protocol::ErrorCode::Busy,
            Self::Local { .. }
            | Self::LocalExists(_)
            | Self::Corrupt(_)
            | Self::CorruptOutput(_)
            | Self::Unconfirmed { .. } => false,
        }
    }
}

impl From<FrameError> for FileError {
    fn from(e: FrameError) -> Self {
        Self::Protocol(format!("talking to the server: {e}"))
    }
}

/// A finished transfer, as reported in summaries and `--json`.
#[derive(Debug, Clone, serde::Serialize)]
pub struct TransferReport {
    /// The name the user gave.
    pub name: String,
    /// Where it ended up (remote path for put, local path for get).
    pub dest: String,
    /// Bytes moved.
    pub bytes: u64,
    /// BLAKE3 of the contents (hex in JSON).
    #[serde(serialize_with = "serialize_hex")]
    pub blake3: Digest,
    /// Bytes that were already at the receiver from an interrupted
    /// transfer and were not sent again.
    pub resumed_from: u64,
    /// Bytes of the file's contents that crossed the network this time
    /// (after a resume, before compression).
    pub bytes_sent: u64,
    /// Bytes its data took on the wire this time: `bytes_sent` after
    /// compression, with the framing of its blocks.
    pub wire_bytes: u64,
    /// Things the user should know (a resume that had to start over...).
    pub notes: Vec<String>,
    /// The destination already held this file (same contents, checked by
    /// BLAKE3 on both sides), so nothing moved: a rerun of a finished command.
    pub already_there: bool,
    /// It went as a delta against the version the receiver held (`--sync`):
    /// `bytes_sent` counts only the new bytes, the rest was copied there.
    pub delta: bool,
    /// Seconds from this file's request to its commit (its stream's share
    /// of a batch, for per-file rates when many move at once).
    pub seconds: f64,
}

impl TransferReport {
    /// A file found complete at the destination: nothing moved.
    pub(super) fn already_there(name: String, dest: String, size: u64, blake3: Digest) -> Self {
        Self {
            name,
            dest,
            bytes: size,
            blake3,
            resumed_from: size,
            bytes_sent: 0,
            wire_bytes: 0,
            notes: Vec::new(),
            already_there: true,
            delta: false,
            seconds: 0.0,
        }
    }
}

pub(super) fn unexpected(msg: &Response) -> FileError {
    FileError::Protocol(format!("the server sent an unexpected message: {msg:?}"))
}

/// Hex of a digest, for reports.
pub fn hex(d: &Digest) -> String {
    d.iter().map(|b| format!("{b:02x}")).collect()
}

pub(super) fn serialize_hex<S: serde::Serializer>(d: &Digest, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&hex(d))
}

//! Error codes, stream reset/stop codes and connection close codes: every wire constant both sides interpret.

use std::fmt;

use serde::{Deserialize, Serialize};

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
    /// A directory to remove has something in it, and `recursive` was not set.
    NotEmpty,
    /// The server is at one of its limits right now (the memory its uploads
    /// may hold, say): the same request may well succeed shortly.
    Busy,
}

/// Stream codes both sides use to reset or stop a stream.
pub mod stream {
    /// Reset: the sender could not finish sending the file (it could not be
    /// read, or it changed while being sent); drop what arrived.
    pub(crate) const RESET_SOURCE_FAILED: u32 = 1;
    /// Stop: the receiver will not take more data (refused or failed).
    pub(crate) const STOP_REFUSED: u32 = 2;
}

/// Application close codes a server may end a connection with.
pub mod close {
    /// Normal end: the client is done or the server shuts down.
    pub(crate) const DONE: u32 = 0;
    /// This client identity already has `--max-connections-per-client` open.
    pub(crate) const TOO_MANY_FROM_CLIENT: u32 = 2;
    /// The server is shutting down (also the reset code of streams it will
    /// no longer serve): reconnect and resume, to it once restarted or to
    /// another server.
    pub(crate) const SHUTTING_DOWN: u32 = 3;
    /// The server serves as many connections as it allows
    /// (`--max-connections`); this one completed its handshake just as
    /// the last slot went. Try again later, as for a refused handshake.
    pub(crate) const BUSY: u32 = 4;
    /// The server cannot reach its store (its probes failed for
    /// [`crate::server`]'s `STORE_DOWN_AFTER`): reconnect to another
    /// address of the same server, or try again later.
    pub(crate) const STORE_DOWN: u32 = 5;
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
            Self::NotEmpty => "directory not empty",
            Self::Busy => "server busy",
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

//! What an object store's errors mean for a client, in words that say what to check.

use tracing::warn;

use crate::paths::RemotePath;
use crate::protocol::{ErrorCode, RemoteError};

pub(super) fn not_a_directory(path: &RemotePath) -> RemoteError {
    RemoteError::new(
        ErrorCode::NotDirectory,
        format!("cannot create the directory for '{path}' on the server: a parent of this path is a file, not a directory"),
    )
}

/// An object store error in a line: the store's own status and error code
/// when it answered (`403 Forbidden (AccessDenied)`), else the first line
/// of the error, without the request dump some carry.
pub(super) fn short_error(e: &object_store::Error) -> String {
    let text = e.to_string();
    let between = |open: &str, close: &str| {
        let start = text.find(open)? + open.len();
        let len = text[start..].find(close)?;
        Some(text[start..start + len].to_owned())
    };
    if let Some(status) = between("status code: ", ":") {
        return match between("<Code>", "</Code>") {
            Some(code) => format!("the store answered {status} ({code})"),
            None => format!("the store answered {status}"),
        };
    }
    let line = text.lines().next().unwrap_or_default();
    if line.len() <= 300 {
        return line.to_owned();
    }
    let mut end = 300;
    while !line.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}...", &line[..end])
}

/// What an object store error is about, for the advice that goes with it.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Trouble {
    Missing,
    Credentials,
    Unreachable,
}

pub(super) fn trouble(e: &object_store::Error) -> Trouble {
    match e {
        object_store::Error::NotFound { .. } => return Trouble::Missing,
        object_store::Error::PermissionDenied { .. }
        | object_store::Error::Unauthenticated { .. } => return Trouble::Credentials,
        _ => {}
    }
    let text = e.to_string();
    let has = |s: &str| text.contains(s);
    if has("NoSuchBucket") || has("404 Not Found") {
        Trouble::Missing
    } else if has("403 Forbidden")
        || has("AccessDenied")
        || has("InvalidAccessKeyId")
        || has("SignatureDoesNotMatch")
        || has("401 Unauthorized")
    {
        Trouble::Credentials
    } else {
        Trouble::Unreachable
    }
}

/// Turns an object store error on `path` into what the client is told.
pub(super) fn store_error(e: object_store::Error, path: &RemotePath, doing: &str) -> RemoteError {
    let written_meanwhile = matches!(
        e,
        object_store::Error::AlreadyExists { .. } | object_store::Error::Precondition { .. }
    );
    let (code, advice) = match trouble(&e) {
        _ if written_meanwhile => (
            ErrorCode::AlreadyExists,
            "it was written meanwhile; use --force to overwrite it",
        ),
        Trouble::Missing => (ErrorCode::NotFound, "check the name with `qxfer ls`"),
        Trouble::Credentials => (
            ErrorCode::PermissionDenied,
            "the object store refused the server's credentials; ask its operator",
        ),
        // Busy, which clients retry (through another server of the same
        // name, where they have one): a store that does not answer now
        // may well answer shortly. Anything S3 says that is not one of
        // the cases above lands here too; the retries are bounded.
        Trouble::Unreachable => (
            ErrorCode::Busy,
            "the server's object store failed or did not answer; try again shortly (the server's log has details)",
        ),
    };
    if !written_meanwhile && !matches!(code, ErrorCode::NotFound) {
        metrics::counter!(crate::store::STORE_ERRORS_METRIC).increment(1);
    }
    warn!(path = %path, "object store: {doing}: {e}");
    RemoteError::new(
        code,
        format!(
            "{doing} '{path}' on the server: {}; {advice}",
            short_error(&e)
        ),
    )
}

/// Whether an object store error says the object is not there.
pub(super) fn is_not_found(e: &object_store::Error) -> bool {
    matches!(e, object_store::Error::NotFound { .. })
}

/// The error for a put onto a name that is taken.
pub(super) fn exists(path: &RemotePath) -> RemoteError {
    RemoteError::new(
        ErrorCode::AlreadyExists,
        format!("'{path}' already exists on the server; use --force to overwrite it"),
    )
}

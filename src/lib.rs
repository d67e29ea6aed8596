//! qxfer: secure, fast file transfer over QUIC.
//!
//! The pieces, from the wire up:
//! - [`protocol`]: request/response messages and their length-prefixed bincode
//!   framing, generic over `AsyncRead`/`AsyncWrite` (see docs/PROTOCOL.md);
//! - [`paths`]: validation of remote paths, the gate every name from the wire passes;
//! - [`tls`]: self-signed identities, fingerprints, known_hosts and the pinning verifier;
//! - [`endpoint`]: QUIC endpoints and the transport settings both sides share;
//! - `exchange`: file bytes to stream and back, with hashing and atomic commit,
//!   used by both the server and the client;
//! - `store`: where the server keeps files: a local directory or an
//!   S3-compatible bucket, behind one trait;
//! - [`server`]: accepts connections and serves each stream's request through its store;
//! - [`client`]: connects, pins, and runs batches of transfers over one
//!   connection, and directory trees for `put -r` / `get -r`;
//! - `progress`: progress bars and a log writer that does not tear them;
//! - [`cli`]: the command line, a thin layer over the rest.

/// Runs the test function `$name(Backend)` once per store, as
/// `$name::local` and `$name::object`: the crate's tests of the server's
/// handlers, alone (server/tests.rs) or with the client (pipe_tests.rs).
#[cfg(test)]
macro_rules! on_both_stores {
    ($name:ident) => {
        mod $name {
            #[tokio::test]
            async fn local() {
                super::$name($crate::server::Backend::Local).await
            }

            #[tokio::test]
            async fn object() {
                super::$name($crate::server::Backend::Object).await
            }
        }
    };
}

pub mod cli;
pub mod client;
mod congestion;
pub mod endpoint;
mod exchange;
mod files;
pub mod paths;
#[cfg(test)]
mod pipe_tests;
pub mod protocol;
pub mod server;
mod space;
mod store;
pub mod tls;

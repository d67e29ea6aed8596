//! The client: connects with server pinning, and runs puts, gets and listings over one connection.
//!
//! Each file moves on its own bidirectional stream; [`run_batch`] keeps up to
//! `parallel` of them in flight and records every file's outcome, so one
//! failure never stops the others.
//!
//! Here: the [`Client`] handle, its connection's lifetime and the requests
//! without file data (list, mkdir). [`connect`] opens and pins the
//! connection, [`put`] and [`get`] move one file each, [`batch`] runs many,
//! and [`state`] keeps what the client remembers between runs.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use quinn::VarInt;

use crate::exchange::{RecvHalf, SendHalf};

use crate::endpoint;
use crate::endpoint::TransportOpts;
use crate::exchange::{Descriptions, Pacer};
use crate::protocol::stream::STOP_REFUSED;
use crate::protocol::{
    close, read_frame, write_frame, Compression, Digest, DigestsRequest, DirMeta, Entry, FileMeta,
    FrameError, ListBatch, ListRequest, MkdirRequest, RemoveRequest, RenameRequest, Request,
    Response, SetMetaRequest,
};
use crate::tls::Fingerprint;

mod batch;
mod connect;
mod dest;
mod filter;
mod get;
mod outcome;
mod path;
mod plan;
mod put;
mod receive;
mod retry;
mod servers;
mod state;
pub(crate) mod tree;
use outcome::*;
pub use outcome::{hex, FileError, TransferReport};
pub(crate) use path::PathWatch;
pub use path::{Limit, PathReport};

/// Why one file's bytes did not move (inside [`FileError::Transfer`]).
pub use crate::exchange::TransferError;
pub(crate) use batch::SMALL_FILE_STREAMS;
pub use batch::{run_batch, BatchReport, Direction, Job, Lost, Unwatched, Watch, WatchFile};
pub(crate) use connect::known_hosts_key;
use connect::refusal;
pub(crate) use connect::{describe_close, split_server};
pub use connect::{ConnectError, DEFAULT_CONNECT_TIMEOUT};
pub(crate) use dest::remove_below;
pub(crate) use filter::{Filter, FilterError};
pub use get::{part_path, PART_SUFFIX};
pub(crate) use plan::{dry_run, Action, Planned};
pub(crate) use plan::{fix_meta, plan_with_listing};
pub(crate) use retry::{run_resilient, BatchOptions, RetryEvent, RetryPolicy};
pub(crate) use servers::{ClientFile, ConfigError};
use state::{PathMemories, UploadJournal};

/// Port used when `--server` names only a host.
pub(crate) const DEFAULT_PORT: u16 = 65432;

/// Longest wait for the close packet to leave in [`Client::close`].
const CLOSE_FLUSH: Duration = Duration::from_millis(200);

/// Name of the client identity's files (`client.crt`, `client.key`) in the config directory.
pub const CLIENT_IDENTITY: &str = "client";

/// Where and how to connect.
#[derive(Debug, Clone)]
pub struct ClientConfig {
    /// `HOST:PORT`, `HOST`, `IPv4:PORT` or `[IPv6]:PORT`.
    pub server: String,
    /// Accept only this server fingerprint (and do not consult known_hosts).
    pub pin: Option<Fingerprint>,
    /// Holds known_hosts and this client's identity (generated on first use).
    pub config_dir: PathBuf,
    /// QUIC transport options.
    pub transport: TransportOpts,
    /// Continue interrupted transfers (`--no-resume` clears it).
    pub resume: bool,
    /// Cap on the bytes per second of all transfers together (`--limit-rate`).
    pub limit_rate: Option<u64>,
    /// Whether files may travel compressed (`--compress`).
    pub compression: Compression,
    /// Send a file that replaces another as a delta against it (`--sync`):
    /// only the chunks the receiver's version lacks cross.
    pub delta: bool,
    /// How long to wait for the server's answer to a request (`--timeout`).
    pub reply_timeout: Duration,
    /// How long a connection attempt may go unanswered (`--connect-timeout`).
    pub connect_timeout: Duration,
    /// Other addresses of the same server (several `--server` values, or a
    /// name's `address = [...]`): servers that share one identity and one
    /// store. A connection goes to one of them all, chosen at random; after
    /// a lost connection the others are tried first (see
    /// [`Client::connect_avoiding`]).
    pub failover: Vec<String>,
}

/// A connection to one qxfer server.
#[derive(Debug, Clone)]
pub struct Client {
    /// Kept so the UDP socket lives as long as the connection; listed for
    /// [`close_all`] until the last clone of this client goes.
    _endpoint: Option<Arc<Registered>>,
    link: Link,
    /// `None` if the config directory cannot hold it: then every large put
    /// asks the server for an offer first, as if interrupted.
    journal: Option<UploadJournal>,
    /// Where to record what this connection learns about its path, and
    /// under which server key.
    paths: Option<(PathMemories, String)>,
    server: String,
    fingerprint: Fingerprint,
    resume: bool,
    pace: Option<Arc<Pacer>>,
    compression: Compression,
    delta: bool,
    reply_timeout: Duration,
    /// What is remembered of the chunks of files this client made by a
    /// delta (on disk, between runs) and of the versions it described.
    descriptions: Descriptions,
    /// Set when this connection was the first contact and the fingerprint was
    /// added to known_hosts.
    pub first_contact: Option<(Fingerprint, PathBuf)>,
}

/// What a client reaches its server over.
#[derive(Clone)]
enum Link {
    /// A QUIC connection.
    Quic(quinn::Connection),
    /// In-memory pipes to a server's handlers, a stream per call (the
    /// tests of client and server together, without QUIC).
    #[cfg(test)]
    Pipes(Arc<OpenPipe>),
}

/// Opens one stream to an in-memory server.
#[cfg(test)]
pub(crate) type OpenPipe = dyn Fn() -> Streams + Send + Sync;

/// The halves of one stream to the server.
pub(crate) type Streams = (Box<dyn SendHalf>, Box<dyn RecvHalf>);

impl std::fmt::Debug for Link {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Quic(conn) => conn.fmt(f),
            #[cfg(test)]
            Self::Pipes(_) => f.write_str("in-memory pipes"),
        }
    }
}

impl Link {
    /// The QUIC connection, if this is one.
    fn quic(&self) -> Option<&quinn::Connection> {
        match self {
            Self::Quic(conn) => Some(conn),
            #[cfg(test)]
            Self::Pipes(_) => None,
        }
    }
}

/// Every client endpoint of this process, so that an interrupted command
/// can close its connections before it exits: the server then frees their
/// slots and stops their transfers at once instead of after its idle
/// timeout (30 s).
static ENDPOINTS: std::sync::Mutex<Vec<(u64, quinn::Endpoint)>> = std::sync::Mutex::new(Vec::new());

/// An endpoint listed in [`ENDPOINTS`] while this lives.
#[derive(Debug)]
struct Registered(u64);

impl Registered {
    fn new(endpoint: quinn::Endpoint) -> Arc<Self> {
        static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let id = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        endpoints().push((id, endpoint));
        Arc::new(Self(id))
    }
}

impl Drop for Registered {
    fn drop(&mut self) {
        endpoints().retain(|(id, _)| *id != self.0);
    }
}

fn endpoints() -> std::sync::MutexGuard<'static, Vec<(u64, quinn::Endpoint)>> {
    ENDPOINTS.lock().unwrap_or_else(|e| e.into_inner())
}

/// Closes every connection of every client of this process (Ctrl-C) with
/// `reason`, and waits briefly for the close packets to leave.
pub async fn close_all(reason: &str) {
    let open: Vec<_> = endpoints().iter().map(|(_, e)| e.clone()).collect();
    for endpoint in &open {
        endpoint.close(VarInt::from_u32(close::DONE), reason.as_bytes());
    }
    if !open.is_empty() {
        tokio::time::sleep(CLOSE_FLUSH).await;
    }
}

#[cfg(test)]
impl Client {
    /// A client with `config`'s options whose every stream comes from
    /// `open` (in-memory pipes to a server's handlers), known to the
    /// server as `fingerprint`. It keeps its upload journal in
    /// `config.config_dir`, as over QUIC.
    pub(crate) fn over_pipes(
        open: Arc<OpenPipe>,
        config: &ClientConfig,
        fingerprint: Fingerprint,
    ) -> Self {
        Self {
            _endpoint: None,
            link: Link::Pipes(open),
            journal: UploadJournal::open(&config.config_dir, "pipes".to_owned()).ok(),
            paths: None,
            server: config.server.clone(),
            fingerprint,
            resume: config.resume,
            pace: config.limit_rate.map(|r| Arc::new(Pacer::new(r))),
            compression: config.compression,
            delta: config.delta,
            reply_timeout: config.reply_timeout,
            descriptions: state::descriptions(&config.config_dir),
            first_contact: None,
        }
    }
}

impl Client {
    /// If the server has closed this connection because it refused this
    /// client (unknown identity, or too many connections from it), the error
    /// to report instead of the per-file failures that followed.
    ///
    /// In TLS 1.3 the client finishes its handshake before the server has
    /// checked the client certificate, so a refusal can arrive after
    /// [`Client::connect`] returned; callers check this when requests fail.
    pub fn refusal(&self) -> Option<ConnectError> {
        let reason = self.link.quic()?.close_reason()?;
        refusal(&reason, &self.server, self.fingerprint)
    }

    /// The address this client is connected to, as given.
    pub fn server(&self) -> &str {
        &self.server
    }

    /// Why the connection ended, in words for the user, if it has.
    pub fn lost(&self) -> Option<String> {
        Some(describe_close(&self.link.quic()?.close_reason()?))
    }

    /// Starts watching the connection for `--stats` (see [`PathWatch`]);
    /// `None` over in-memory pipes.
    pub(crate) fn watch_path(&self, direction: Direction) -> Option<PathWatch> {
        self.link.quic().map(|c| PathWatch::start(c, direction))
    }

    /// The underlying QUIC connection, for callers that speak the protocol
    /// directly (tests of the server's handling of malformed streams).
    ///
    /// # Panics
    /// On a client over in-memory pipes (the crate's own unit tests).
    pub fn connection(&self) -> &quinn::Connection {
        self.link.quic().expect("a client over QUIC")
    }

    /// Closes the connection politely and waits for the close to be sent.
    ///
    /// Only until the close packet has left: `Endpoint::wait_idle` would
    /// also wait out the draining period (three probe timeouts, 0.3 s on a
    /// 100 ms path, seconds on a satellite link), which a client that is
    /// about to exit has no use for. The server frees the connection's slot
    /// as soon as the close arrives.
    pub async fn close(self) {
        let Some(conn) = self.link.quic() else {
            return; // pipes: nothing to close
        };
        if conn.close_reason().is_some() {
            return; // already closed by the server: nothing to send
        }
        tracing::debug!(stats = ?conn.stats(), "closing");
        if let (Some((paths, key)), Some(memory)) = (&self.paths, endpoint::learned(conn)) {
            paths.remember(key, memory);
        }
        let sent = || conn.stats().udp_tx.datagrams;
        let before = sent();
        conn.close(VarInt::from_u32(0), b"done");
        let deadline = Instant::now() + CLOSE_FLUSH;
        while sent() == before && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        // Counted when handed to the socket task; let it write.
        tokio::task::yield_now().await;
    }

    async fn open(&self) -> Result<Streams, FileError> {
        match &self.link {
            Link::Quic(conn) => {
                let (send, recv) = conn
                    .open_bi()
                    .await
                    .map_err(|e| FileError::Protocol(format!("connection lost: {e}")))?;
                Ok((Box::new(send), Box::new(recv)))
            }
            #[cfg(test)]
            Link::Pipes(open) => Ok(open()),
        }
    }

    /// Lists the remote directory `path` ("" for the root).
    pub async fn list(&self, path: &str) -> Result<Vec<Entry>, FileError> {
        self.list_with(path, false).await
    }

    /// Lists everything beneath the remote directory `path`; names are
    /// relative to it. Links are listed, never followed.
    pub async fn list_tree(&self, path: &str) -> Result<Vec<Entry>, FileError> {
        self.list_with(path, true).await
    }

    /// The BLAKE3 of each remote file in `paths` (at most
    /// [`MAX_DIGEST_PATHS`](crate::protocol::MAX_DIGEST_PATHS)), in order;
    /// `None` where the server has no regular file.
    pub(crate) async fn digests(&self, paths: &[String]) -> Result<Vec<Option<Digest>>, FileError> {
        let request = Request::Digests(DigestsRequest {
            paths: paths.to_vec(),
        });
        // The server may have to read every file.
        match self.ask(&request, 10 * self.reply_timeout).await? {
            Response::Digests(d) if d.len() == paths.len() => Ok(d),
            Response::Digests(d) => Err(FileError::Protocol(format!(
                "the server sent {} digests for {} files",
                d.len(),
                paths.len()
            ))),
            Response::Refused(e) => Err(e.into()),
            other => Err(unexpected(&other)),
        }
    }

    /// Gives the server's file `path`, whose contents this side holds too
    /// (the same BLAKE3 `digest`, or without one the same size and mtime),
    /// the mtime and mode of `meta`.
    pub(crate) async fn set_meta(
        &self,
        path: &str,
        meta: FileMeta,
        digest: Option<Digest>,
    ) -> Result<(), FileError> {
        let request = Request::SetMeta(SetMetaRequest {
            path: path.to_owned(),
            meta,
            digest,
        });
        // An object store writes the file again.
        match self.ask(&request, 10 * self.reply_timeout).await? {
            Response::MetaSet => Ok(()),
            Response::Refused(e) => Err(e.into()),
            other => Err(unexpected(&other)),
        }
    }

    /// Creates the remote directory `path` (and parents) and applies `meta`.
    pub async fn mkdir(&self, path: &str, meta: Option<DirMeta>) -> Result<(), FileError> {
        let request = Request::Mkdir(MkdirRequest {
            path: path.to_owned(),
            meta,
        });
        match self.ask(&request, self.reply_timeout).await? {
            Response::MkdirDone => Ok(()),
            Response::Refused(e) => Err(e.into()),
            other => Err(unexpected(&other)),
        }
    }

    /// Removes the remote file or directory `path`: a file or an empty
    /// directory, or with `recursive` a directory and everything in it.
    pub async fn remove(&self, path: &str, recursive: bool) -> Result<(), FileError> {
        let request = Request::Remove(RemoveRequest {
            path: path.to_owned(),
            recursive,
        });
        match self.ask(&request, 5 * self.reply_timeout).await? {
            Response::Removed => Ok(()),
            Response::Refused(e) => Err(e.into()),
            other => Err(unexpected(&other)),
        }
    }

    /// Renames the remote file or directory `from` to `to` (which must not exist).
    pub async fn rename(&self, from: &str, to: &str) -> Result<(), FileError> {
        let request = Request::Rename(RenameRequest {
            from: from.to_owned(),
            to: to.to_owned(),
        });
        match self.ask(&request, 5 * self.reply_timeout).await? {
            Response::Renamed => Ok(()),
            Response::Refused(e) => Err(e.into()),
            other => Err(unexpected(&other)),
        }
    }

    /// Sends a request that carries no data and reads the one answer,
    /// waiting `within` for it (a recursive remove or a directory rename
    /// in an object store takes a request per object: callers allow more).
    async fn ask(&self, request: &Request, within: Duration) -> Result<Response, FileError> {
        let (mut send, mut recv) = self.open().await?;
        write_frame(&mut send, request).await?;
        send.finish();
        Ok(reply::<Response>(&mut recv, within).await?)
    }

    async fn list_with(&self, path: &str, recursive: bool) -> Result<Vec<Entry>, FileError> {
        let (mut send, mut recv) = self.open().await?;
        write_frame(
            &mut send,
            &Request::List(ListRequest {
                path: path.to_owned(),
                recursive,
            }),
        )
        .await?;
        send.finish();
        // The server walks a whole tree before it answers a recursive listing.
        let first = if recursive {
            5 * self.reply_timeout
        } else {
            self.reply_timeout
        };
        match reply::<Response>(&mut recv, first).await? {
            Response::ListAccepted => {}
            Response::Refused(e) => return Err(e.into()),
            other => return Err(unexpected(&other)),
        }
        let mut entries = Vec::new();
        let mut name_bytes = 0;
        loop {
            let batch: ListBatch = reply(&mut recv, self.reply_timeout).await?;
            name_bytes += batch.entries.iter().map(|e| e.name.len()).sum::<usize>();
            entries.extend(batch.entries);
            if entries.len() > MAX_LIST_ENTRIES || name_bytes > MAX_LIST_NAME_BYTES {
                recv.stop(STOP_REFUSED);
                return Err(FileError::Protocol(format!(
                    "the listing of '{path}' has more than {MAX_LIST_ENTRIES} entries or {} MiB of names; list or fetch its subdirectories one at a time",
                    MAX_LIST_NAME_BYTES >> 20
                )));
            }
            if !batch.more {
                return Ok(entries);
            }
        }
    }
}

/// Default for [`ClientConfig::reply_timeout`].
pub const DEFAULT_REPLY_TIMEOUT: Duration = Duration::from_secs(60);

impl Client {
    /// How long the answer to a request about `size` bytes may take:
    /// `--timeout` beyond the time to hash `size` bytes at a slow disk's
    /// 50 MiB/s (the server may hash an existing copy, or the part it
    /// holds, before it answers). Keep-alives hold the connection open
    /// while a server's process is stuck, so without this a request it
    /// never answered would hang the client forever.
    fn within(&self, size: u64) -> Duration {
        self.reply_timeout + Duration::from_secs(size / (50 << 20))
    }

    /// How long a receipt may take after the data: the server syncs the file first.
    fn receipt_within(&self, size: u64) -> Duration {
        self.reply_timeout + self.within(size)
    }
}

/// Reads the server's next message, failing if it does not come `within`.
async fn reply<T: serde::de::DeserializeOwned>(
    recv: &mut Box<dyn RecvHalf>,
    within: Duration,
) -> Result<T, FrameError> {
    tokio::time::timeout(within, read_frame::<_, T>(recv))
        .await
        .unwrap_or_else(|_| {
            Err(FrameError::Io(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                format!(
                    "no answer within {} s (the server may be overloaded or stuck); rerun the command to resume",
                    within.as_secs()
                ),
            )))
        })
}

/// Most entries a recursive listing may hold, and most bytes of names (the
/// server's own limits): a hostile or broken server cannot make the client
/// buffer without end.
const MAX_LIST_ENTRIES: usize = 1_000_000;
const MAX_LIST_NAME_BYTES: usize = 64 << 20;

#[cfg(test)]
mod tests;

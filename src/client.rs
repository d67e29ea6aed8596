//! The client: connects with server pinning, and runs puts, gets and listings over one connection.
//!
//! Each file moves on its own bidirectional stream; [`run_batch`] keeps up to
//! `parallel` of them in flight and records every file's outcome, so one
//! failure never stops the others.

use std::fs::File;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use quinn::{ConnectionError, RecvStream, SendStream, TransportErrorCode, VarInt};
use tokio::sync::Semaphore;

use crate::congestion::{self, PathMemory};
use crate::endpoint::{self, EndpointError, TransportOpts};
use crate::progress::Progress;
use crate::protocol::stream::{RESET_SOURCE_FAILED, STOP_REFUSED};
use crate::protocol::{
    close, read_frame, write_frame, Compression, Continue, Digest, DirMeta, Entry, ErrorCode,
    FileMeta, FrameError, GetOffer, GetRequest, ListBatch, ListRequest, MkdirRequest, Prefix,
    PutRequest, Receipt, RemoteError, Request, Response, Trailer, ALPN, RESUME_MIN,
};
use crate::tls::{Fingerprint, Identity, KnownHosts, PinnedServerVerifier, TrustError};
use crate::transfer::{
    self, blocking, file_meta, Advance, CommitError, Framing, IncomingFile, Pacer, Start,
    TransferError,
};

/// Port used when `--server` names only a host.
pub const DEFAULT_PORT: u16 = 65432;

/// How long to wait for a server to answer before calling it unreachable.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// How long a handshake the server has started answering may take to finish.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(30);

/// An unanswered handshake is started afresh this often (see [`Attempt::once`]).
const RESTART_UNANSWERED: Duration = Duration::from_secs(3);

/// Longest wait for the close packet to leave in [`Client::close`].
const CLOSE_FLUSH: Duration = Duration::from_millis(200);

/// The TLS alert QUIC carries when no ALPN protocol is shared (RFC 8446 no_application_protocol).
const ALERT_NO_APPLICATION_PROTOCOL: u8 = 120;

/// The TLS alert a qxfer server sends for a client it does not admit (access_denied).
const ALERT_ACCESS_DENIED: u8 = 49;

/// The TLS alert for a client that presented no certificate (certificate_required).
const ALERT_CERTIFICATE_REQUIRED: u8 = 116;

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
    /// How long to wait for the server's answer to a request (`--timeout`).
    pub reply_timeout: Duration,
    /// How long a connection attempt may go unanswered (`--connect-timeout`).
    pub connect_timeout: Duration,
}

/// Why no connection was made.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    /// `--server` is not of the form HOST[:PORT].
    #[error(
        "invalid server address {0:?}: expected HOST:PORT, e.g. example.com:65432 or [::1]:65432"
    )]
    BadAddress(String),
    /// Name resolution failed.
    #[error("cannot resolve {server}: {source}")]
    Resolve {
        /// As given.
        server: String,
        /// The resolver's error.
        source: std::io::Error,
    },
    /// No answer in time.
    #[error("no answer from {server} ({addr}) within {} s; check that `qxfer serve` runs there and that UDP port {} is reachable (on a very lossy path, raise --connect-timeout)", after.as_secs_f64(), addr.port())]
    Unreachable {
        /// How long the attempt waited.
        after: Duration,
        /// As given.
        server: String,
        /// As resolved.
        addr: SocketAddr,
    },
    /// The peer speaks QUIC but not qxfer.
    #[error(
        "{server} ({addr}) is not a qxfer server: it does not speak the {} protocol",
        String::from_utf8_lossy(ALPN)
    )]
    NotQxfer {
        /// As given.
        server: String,
        /// As resolved.
        addr: SocketAddr,
    },
    /// The server is at its connection limit.
    #[error("{server} ({addr}) refused the connection: it is serving as many clients as it allows (--max-connections); try again later")]
    Busy {
        /// As given.
        server: String,
        /// As resolved.
        addr: SocketAddr,
    },
    /// The server does not admit this client's identity.
    #[error("the server {server} refused this client: it does not know this client's identity.\nGive the server's operator your fingerprint, which `qxfer id` prints:\n    {fingerprint}\nand ask them to run `qxfer serve --allow {fingerprint}` (or add it to certs/authorized_clients).")]
    Refused {
        /// As given.
        server: String,
        /// This client's fingerprint.
        fingerprint: Fingerprint,
    },
    /// The server closed the connection because this identity holds too many.
    #[error("the server {server} closed the connection: this client already has as many connections open as it allows (--max-connections-per-client); close some and try again")]
    TooManyFromClient {
        /// As given.
        server: String,
    },
    /// The server's fingerprint differs from the stored one.
    #[error("SERVER IDENTITY CHANGED for {server}: it presented {got}, but {} line {line} says {want}. Someone may be intercepting the connection. If the server's certificate was deliberately replaced, delete that line and connect again.", file.display())]
    HostKeyChanged {
        /// As given.
        server: String,
        /// Fingerprint presented.
        got: Fingerprint,
        /// Fingerprint on record.
        want: Fingerprint,
        /// The known_hosts file.
        file: PathBuf,
        /// The line with the old entry.
        line: usize,
    },
    /// The server's fingerprint differs from `--pin`.
    #[error("{server} presented {got}, not the pinned {want}; refusing to connect")]
    PinMismatch {
        /// As given.
        server: String,
        /// Fingerprint presented.
        got: Fingerprint,
        /// Fingerprint pinned.
        want: Fingerprint,
    },
    /// Any other handshake or transport failure.
    #[error("connecting to {server} ({addr}): {source}")]
    Connection {
        /// As given.
        server: String,
        /// As resolved.
        addr: SocketAddr,
        /// quinn's error.
        source: ConnectionError,
    },
    /// quinn refused to start the connection (bad address family, ...).
    #[error("cannot connect to {server}: {source}")]
    Setup {
        /// As given.
        server: String,
        /// quinn's error.
        source: quinn::ConnectError,
    },
    /// Setting up the local endpoint failed.
    #[error(transparent)]
    Endpoint(#[from] EndpointError),
    /// known_hosts could not be read or written.
    #[error(transparent)]
    Trust(#[from] TrustError),
}

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
    /// The server broke the protocol or the stream failed.
    #[error("{0}")]
    Protocol(String),
}

impl FileError {
    fn local(path: &Path) -> impl FnOnce(std::io::Error) -> Self + '_ {
        move |source| {
            if transfer::is_disk_full(&source) {
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
    pub fn is_transient(&self) -> bool {
        match self {
            Self::Transfer { source, .. } => matches!(
                source,
                TransferError::Network(_)
                    | TransferError::Truncated { .. }
                    | TransferError::Stalled
            ),
            Self::Protocol(_) => true,
            Self::Remote(_) | Self::Local { .. } | Self::LocalExists(_) | Self::Corrupt(_) => false,
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
    /// Bytes that crossed the network for this file this time.
    pub bytes_sent: u64,
    /// Things the user should know (a resume that had to start over...).
    pub notes: Vec<String>,
    /// The destination already held this file (same contents, checked by
    /// BLAKE3 on both sides), so nothing moved: a rerun of a finished command.
    pub already_there: bool,
    /// Seconds from this file's request to its commit (its stream's share
    /// of a batch, for per-file rates when many move at once).
    pub seconds: f64,
}

impl TransferReport {
    /// A file found complete at the destination: nothing moved.
    fn already_there(name: String, dest: String, size: u64, blake3: Digest) -> Self {
        Self {
            name,
            dest,
            bytes: size,
            blake3,
            resumed_from: size,
            bytes_sent: 0,
            notes: Vec::new(),
            already_there: true,
            seconds: 0.0,
        }
    }
}

/// Large uploads started and not yet finished, remembered across runs in
/// the config directory (`uploads/`, one empty file per upload).
///
/// Why: asking the server what it kept of an earlier attempt costs a round
/// trip before the first byte (0.1 s on a long path, 0.75 s over a
/// satellite). Only an interrupted upload can have left anything, and the
/// client that was interrupted is the one that knows: with no entry here a
/// large put streams its data right behind its header, as small ones do;
/// with an entry it asks first. An entry is written before the data flows
/// and removed once the server has committed the file, so a killed client
/// leaves it behind for the rerun. Losing an entry (a crash before it
/// reached the disk) costs only a resend from the start.
#[derive(Debug, Clone)]
struct UploadJournal {
    dir: PathBuf,
    /// Whose server: `host:port` as in known_hosts.
    server: String,
}

/// Entries older than this belong to uploads nobody retried; the server
/// sweeps their partials after a day by default.
const JOURNAL_MAX_AGE: Duration = Duration::from_secs(30 * 24 * 3600);

impl UploadJournal {
    fn open(config_dir: &Path, server: String) -> std::io::Result<Self> {
        let dir = config_dir.join("uploads");
        std::fs::create_dir_all(&dir)?;
        let now = std::time::SystemTime::now();
        for entry in std::fs::read_dir(&dir)?.flatten() {
            let old = entry
                .metadata()
                .and_then(|m| m.modified())
                .is_ok_and(|t| now.duration_since(t).unwrap_or_default() > JOURNAL_MAX_AGE);
            if old {
                let _ = std::fs::remove_file(entry.path());
            }
        }
        Ok(Self { dir, server })
    }

    /// The entry of one version (size, mtime) of one upload: keyed like the
    /// server's partial (our identity, the remote path, size and mtime).
    fn entry(&self, remote: &str, meta: &FileMeta) -> PathBuf {
        let mut h = blake3::Hasher::new();
        for part in [self.server.as_bytes(), remote.as_bytes()] {
            h.update(&(part.len() as u64).to_le_bytes());
            h.update(part);
        }
        h.update(&meta.size.to_le_bytes());
        if let Some(t) = meta.mtime {
            h.update(&t.secs.to_le_bytes());
            h.update(&t.nanos.to_le_bytes());
        }
        self.dir.join(&h.finalize().to_hex()[..32])
    }
}

/// What earlier connections learned about the path to each server
/// (`paths` in the config directory: one `host:port rate_bytes_per_s
/// min_rtt_us unix_time` line each), so the next connection's congestion
/// controller can start near the path's rate instead of from scratch (see
/// `congestion::ModelConfig`). Best effort: a file that cannot be read or
/// written only costs the fast start.
#[derive(Debug, Clone)]
struct PathMemories {
    file: PathBuf,
}

/// How long a remembered path is trusted: networks change (a laptop moves),
/// and the controller only checks the round-trip time before it jumps.
const PATH_MEMORY_MAX_AGE: Duration = Duration::from_secs(24 * 3600);

impl PathMemories {
    fn new(config_dir: &Path) -> Self {
        Self {
            file: config_dir.join("paths"),
        }
    }

    fn entries(&self) -> Vec<(String, PathMemory, u64)> {
        let text = std::fs::read_to_string(&self.file).unwrap_or_default();
        text.lines()
            .filter_map(|line| {
                let mut f = line.split_whitespace();
                let key = f.next()?.to_owned();
                let bw: f64 = f.next()?.parse().ok()?;
                let rtt_us: u64 = f.next()?.parse().ok()?;
                let when: u64 = f.next()?.parse().ok()?;
                let memory = PathMemory {
                    bw,
                    min_rtt: Duration::from_micros(rtt_us),
                };
                Some((key, memory, when))
            })
            .collect()
    }

    fn recall(&self, key: &str) -> Option<PathMemory> {
        let now = unix_now();
        self.entries()
            .into_iter()
            .find(|(k, _, when)| {
                k == key && now.saturating_sub(*when) < PATH_MEMORY_MAX_AGE.as_secs()
            })
            .map(|(_, m, _)| m)
    }

    /// Records `memory` for `key`, replacing its old line (written to a
    /// temporary and renamed, so a concurrent reader never sees half a file).
    fn remember(&self, key: &str, memory: PathMemory) {
        let now = unix_now();
        let mut text = String::new();
        for (k, m, when) in self.entries() {
            if k != key && now.saturating_sub(when) < PATH_MEMORY_MAX_AGE.as_secs() {
                text.push_str(&format!(
                    "{k} {:.0} {} {when}\n",
                    m.bw,
                    m.min_rtt.as_micros()
                ));
            }
        }
        text.push_str(&format!(
            "{key} {:.0} {} {now}\n",
            memory.bw,
            memory.min_rtt.as_micros()
        ));
        let tmp = self
            .file
            .with_extension(format!("tmp{}", std::process::id()));
        if std::fs::write(&tmp, text).is_ok() && std::fs::rename(&tmp, &self.file).is_err() {
            let _ = std::fs::remove_file(&tmp);
        }
    }
}

fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// A connection to one qxfer server.
#[derive(Debug, Clone)]
pub struct Client {
    /// Kept so the UDP socket lives as long as the connection; listed for
    /// [`close_all`] until the last clone of this client goes.
    _endpoint: Arc<Registered>,
    conn: quinn::Connection,
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
    reply_timeout: Duration,
    /// Set when this connection was the first contact and the fingerprint was
    /// added to known_hosts.
    pub first_contact: Option<(Fingerprint, PathBuf)>,
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

/// Splits `server` into host and port; the host keeps no brackets.
pub fn split_server(server: &str) -> Result<(String, u16), ConnectError> {
    let bad = || ConnectError::BadAddress(server.to_owned());
    if let Ok(addr) = server.parse::<SocketAddr>() {
        return Ok((addr.ip().to_string(), addr.port()));
    }
    if let Some(rest) = server.strip_prefix('[') {
        let (host, tail) = rest.split_once(']').ok_or_else(bad)?;
        let port = match tail {
            "" => DEFAULT_PORT,
            _ => tail
                .strip_prefix(':')
                .and_then(|p| p.parse().ok())
                .ok_or_else(bad)?,
        };
        return Ok((host.to_owned(), port));
    }
    if server.parse::<std::net::Ipv6Addr>().is_ok() {
        return Ok((server.to_owned(), DEFAULT_PORT));
    }
    let (host, port) = match server.rsplit_once(':') {
        Some((h, p)) => (h, p.parse().map_err(|_| bad())?),
        None => (server, DEFAULT_PORT),
    };
    if host.is_empty() || host.contains(':') || host.contains(char::is_whitespace) {
        return Err(bad());
    }
    Ok((host.to_owned(), port))
}

/// The key a server is filed under in known_hosts: `host:port`, lower case,
/// IPv6 in brackets.
fn known_hosts_key(host: &str, port: u16) -> String {
    let host = host.to_ascii_lowercase();
    if host.contains(':') {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    }
}

impl Client {
    /// Connects to `config.server`, verifying it against `--pin` or
    /// known_hosts, and recording it on first contact.
    pub async fn connect(config: &ClientConfig) -> Result<Self, ConnectError> {
        let server = config.server.as_str();
        let (host, port) = split_server(server)?;
        let resolved: Vec<SocketAddr> = tokio::net::lookup_host((host.as_str(), port))
            .await
            .map_err(|source| ConnectError::Resolve {
                server: server.to_owned(),
                source,
            })?
            .collect();
        // IPv4 first, then IPv6, one address of each: `localhost` often
        // resolves to ::1 first while servers listen on 127.0.0.1 by default.
        let mut candidates: Vec<SocketAddr> = Vec::new();
        for v4 in [true, false] {
            if let Some(a) = resolved.iter().find(|a| a.is_ipv4() == v4) {
                candidates.push(*a);
            }
        }
        if candidates.is_empty() {
            return Err(ConnectError::Resolve {
                server: server.to_owned(),
                source: std::io::Error::other("no addresses found"),
            });
        }

        let identity = Identity::load_or_generate(&config.config_dir, CLIENT_IDENTITY)?;
        let key = known_hosts_key(&host, port);
        let mut known = KnownHosts::load(&config.config_dir.join("known_hosts"))?;
        let on_record = known.lookup(&key);
        let expected = config.pin.or(on_record.map(|(fp, _)| fp));
        // SNI carries the host name when there is one; the verifier ignores it.
        let sni = if host.parse::<std::net::IpAddr>().is_ok() {
            "qxfer"
        } else {
            host.as_str()
        };

        let paths = PathMemories::new(&config.config_dir);
        let mut transport = config.transport.clone();
        transport.path_memory = paths.recall(&key);

        let mut last = None;
        let mut established = None;
        for addr in candidates {
            let verifier = PinnedServerVerifier::new(expected);
            let tries = Attempt {
                transport: &transport,
                identity: &identity,
                server,
                sni,
                silence: config.connect_timeout,
            };
            match tries.once(addr, verifier.clone()).await {
                Ok((endpoint, conn)) => {
                    established = Some((endpoint, conn, verifier));
                    break;
                }
                Err(e @ ConnectError::Unreachable { .. }) => last = Some(e),
                Err(e) => {
                    let Some(got) = verifier.mismatch() else {
                        return Err(e);
                    };
                    let want = expected.expect("a mismatch implies an expected fingerprint");
                    return Err(match (config.pin, on_record) {
                        (None, Some((_, line))) => ConnectError::HostKeyChanged {
                            server: server.to_owned(),
                            got,
                            want,
                            file: known.path().to_owned(),
                            line,
                        },
                        _ => ConnectError::PinMismatch {
                            server: server.to_owned(),
                            got,
                            want,
                        },
                    });
                }
            }
        }
        let Some((endpoint, conn, verifier)) = established else {
            return Err(last.expect("at least one address was tried"));
        };

        let mut first_contact = None;
        if expected.is_none() {
            let fp = verifier
                .seen()
                .expect("a completed handshake has verified a certificate");
            known.add(&key, fp)?;
            first_contact = Some((fp, known.path().to_owned()));
        }
        endpoint::tune_receive_window(conn.clone());
        let journal = UploadJournal::open(&config.config_dir, key.clone()).ok();
        Ok(Self {
            _endpoint: Registered::new(endpoint),
            conn,
            journal,
            paths: Some((paths, key)),
            server: server.to_owned(),
            fingerprint: identity.fingerprint(),
            resume: config.resume,
            pace: config.limit_rate.map(|r| Arc::new(Pacer::new(r))),
            compression: config.compression,
            reply_timeout: config.reply_timeout,
            first_contact,
        })
    }

    /// If the server has closed this connection because it refused this
    /// client (unknown identity, or too many connections from it), the error
    /// to report instead of the per-file failures that followed.
    ///
    /// In TLS 1.3 the client finishes its handshake before the server has
    /// checked the client certificate, so a refusal can arrive after
    /// [`Client::connect`] returned; callers check this when requests fail.
    pub fn refusal(&self) -> Option<ConnectError> {
        let reason = self.conn.close_reason()?;
        refusal(&reason, &self.server, self.fingerprint)
    }

    /// Why the connection ended, in words for the user, if it has.
    pub fn lost(&self) -> Option<String> {
        Some(describe_close(&self.conn.close_reason()?))
    }

    /// The underlying QUIC connection, for callers that speak the protocol
    /// directly (tests of the server's handling of malformed streams).
    pub fn connection(&self) -> &quinn::Connection {
        &self.conn
    }

    /// Closes the connection politely and waits for the close to be sent.
    ///
    /// Only until the close packet has left: `Endpoint::wait_idle` would
    /// also wait out the draining period (three probe timeouts, 0.3 s on a
    /// 100 ms path, seconds on a satellite link), which a client that is
    /// about to exit has no use for. The server frees the connection's slot
    /// as soon as the close arrives.
    pub async fn close(self) {
        if self.conn.close_reason().is_some() {
            return; // already closed by the server: nothing to send
        }
        tracing::debug!(stats = ?self.conn.stats(), "closing");
        if let (Some((paths, key)), Some(memory)) = (&self.paths, congestion::learned(&self.conn)) {
            paths.remember(key, memory);
        }
        let sent = || self.conn.stats().udp_tx.datagrams;
        let before = sent();
        self.conn.close(VarInt::from_u32(0), b"done");
        let deadline = Instant::now() + CLOSE_FLUSH;
        while sent() == before && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        // Counted when handed to the socket task; let it write.
        tokio::task::yield_now().await;
    }

    async fn open(&self) -> Result<(SendStream, RecvStream), FileError> {
        self.conn
            .open_bi()
            .await
            .map_err(|e| FileError::Protocol(format!("connection lost: {e}")))
    }

    /// Uploads `local` to the remote path `remote`. Returns once the server
    /// has committed the file under its final name.
    ///
    /// The data follows the header at once (pipelined), which saves a round
    /// trip per file. A file of [`RESUME_MIN`] bytes or more whose earlier
    /// upload was interrupted goes in resume mode instead: the server offers
    /// what it holds of it, the client checks that prefix against its own
    /// and sends only the rest.
    pub async fn put(
        &self,
        local: &Path,
        remote: &str,
        force: bool,
        progress: &Advance<'_>,
    ) -> Result<TransferReport, FileError> {
        let path = local.to_owned();
        let (file, meta) = blocking(move || open_source(&path)).await?;
        // A large file goes in resume mode (offer first) only if an earlier
        // run left it unfinished; see [`UploadJournal`].
        let entry = (self.resume && meta.size >= RESUME_MIN)
            .then(|| self.journal.as_ref().map(|j| j.entry(remote, &meta)));
        let resume = match &entry {
            None => false,
            Some(None) => true,
            Some(Some(path)) => {
                let path = path.clone();
                blocking(move || path.exists() || std::fs::write(path, b"").is_err()).await
            }
        };
        let finished = || async {
            if let Some(Some(path)) = &entry {
                let path = path.clone();
                blocking(move || std::fs::remove_file(path)).await.ok();
            }
        };
        let result = self
            .put_with(local, remote, force, progress, file, meta, resume)
            .await;
        if result.is_ok() {
            finished().await;
        }
        result
    }

    #[allow(clippy::too_many_arguments)]
    async fn put_with(
        &self,
        local: &Path,
        remote: &str,
        force: bool,
        progress: &Advance<'_>,
        file: File,
        meta: FileMeta,
        resume: bool,
    ) -> Result<TransferReport, FileError> {
        let (mut send, mut recv) = self.open().await?;
        let framing = Framing::for_sending(self.compression, &self.conn);
        let request = Request::Put(PutRequest {
            path: remote.to_owned(),
            meta,
            force,
            resume,
            encoding: framing.encoding,
        });
        write_frame(&mut send, &request).await?;
        let mut notes = Vec::new();
        let (file, start) = if resume {
            let offer = match reply::<Response>(&mut recv, self.within(meta.size)).await? {
                Response::PutAccepted(offer) => offer,
                Response::AlreadyThere(digest) => {
                    return already_on_server(local, remote, meta.size, digest).await
                }
                Response::Refused(e) => return Err(e.into()),
                other => return Err(unexpected(&other)),
            };
            if offer.discarded_stale {
                notes.push(format!(
                    "{}: the file changed since an earlier interrupted upload; starting over",
                    local.display()
                ));
            }
            let (file, start) = check_offer(file, meta.size, offer.offset, offer.prefix)
                .await
                .map_err(FileError::local(local))?;
            if offer.offset > 0 && start.offset == 0 {
                notes.push(format!(
                    "{}: what the server kept of an earlier upload does not match this file; starting over",
                    local.display()
                ));
            }
            write_frame(
                &mut send,
                &Continue {
                    offset: start.offset,
                },
            )
            .await?;
            progress(start.offset);
            (file, start)
        } else {
            (file, Start::default())
        };
        let resumed_from = start.offset;
        let pace = self.pace.clone();
        let source_failed = tokio::sync::Notify::new();
        let sending = async {
            let sent =
                transfer::send_file(file, meta.size, start, framing, pace, &mut send, progress)
                    .await;
            let digest = match sent {
                Ok(digest) => digest,
                Err(e) => {
                    // Our own file failed us (unreadable, shrank, changed):
                    // tell the server to drop what it has, so it does not
                    // wait for the rest, and let the other files go on.
                    if e.is_source_failure() {
                        let _ = send.reset(VarInt::from_u32(RESET_SOURCE_FAILED));
                        source_failed.notify_one();
                    }
                    return Err(e);
                }
            };
            write_frame(&mut send, &Trailer { digest })
                .await
                .map_err(|e| match e {
                    FrameError::Io(io) => TransferError::Network(io),
                    other => TransferError::Network(std::io::Error::other(other)),
                })?;
            let _ = send.finish();
            Ok::<_, TransferError>(digest)
        };
        // Pipelined, the response arrives while the data goes out (unless
        // our own file fails first: then the answer no longer matters).
        let (sent, response) = if resume {
            (sending.await, None)
        } else {
            tokio::join!(sending, async {
                tokio::select! {
                    r = reply::<Response>(&mut recv, self.within(meta.size)) => Some(r),
                    _ = source_failed.notified() => None,
                }
            })
        };
        let sent = match sent {
            Err(e) if e.is_source_failure() => {
                let _ = recv.stop(VarInt::from_u32(STOP_REFUSED));
                return Err(FileError::Transfer {
                    path: local.to_owned(),
                    source: e,
                });
            }
            other => other,
        };
        match response.transpose() {
            Ok(None) => {}
            Ok(Some(Response::PutAccepted(offer))) => {
                if offer.discarded_stale {
                    notes.push(format!(
                        "{}: the file changed since an earlier interrupted upload; the server dropped what it kept and took it whole",
                        local.display()
                    ));
                }
            }
            Ok(Some(Response::AlreadyThere(digest))) => {
                return already_on_server(local, remote, meta.size, digest).await;
            }
            Ok(Some(Response::Refused(e))) => return Err(e.into()),
            Ok(Some(other)) => return Err(unexpected(&other)),
            Err(e) => {
                return Err(match sent {
                    Err(source) => FileError::Transfer {
                        path: local.to_owned(),
                        source,
                    },
                    Ok(_) => e.into(),
                })
            }
        }
        // Even when sending failed, the receipt usually says why (full disk...).
        let receipt = reply::<Receipt>(&mut recv, self.receipt_within(meta.size)).await;
        match (receipt, sent) {
            (Ok(Receipt::Failed(e)), _) => Err(e.into()),
            (_, Err(source)) => Err(FileError::Transfer {
                path: local.to_owned(),
                source,
            }),
            (Ok(Receipt::Committed { size, digest }), Ok(ours)) => {
                if digest != ours || size != meta.size {
                    return Err(FileError::Corrupt(local.to_owned()));
                }
                Ok(TransferReport {
                    name: local.display().to_string(),
                    dest: remote.to_owned(),
                    bytes: size,
                    blake3: digest,
                    resumed_from,
                    bytes_sent: size - resumed_from,
                    notes,
                    already_there: false,
                    seconds: 0.0,
                })
            }
            (Err(e), Ok(_)) => Err(e.into()),
        }
    }

    /// Downloads the remote file `remote` to the local path `dest`. Returns
    /// once the file is complete, synced and under its final name.
    ///
    /// The data goes to `DEST.qxfer-part` first. If an earlier download was
    /// interrupted, that file holds its bytes: the client sends their length
    /// and BLAKE3, and the server sends only the rest if its own file has
    /// the same prefix (else everything, and the part is rewritten).
    pub async fn get(
        &self,
        remote: &str,
        dest: &Path,
        force: bool,
        on_start: &Advance<'_>,
        progress: &Advance<'_>,
    ) -> Result<TransferReport, FileError> {
        self.get_sized(remote, dest, None, force, on_start, progress)
            .await
    }

    /// [`Client::get`] of a file whose size is known from a listing. A file
    /// under [`RESUME_MIN`] bytes is received into an anonymous temporary
    /// beside `dest` instead of `DEST.qxfer-part`: it is not worth resuming,
    /// and a thousand small downloads then leave no names to create, lock
    /// and rename, nor anything behind if interrupted.
    pub async fn get_sized(
        &self,
        remote: &str,
        dest: &Path,
        size_hint: Option<u64>,
        force: bool,
        on_start: &Advance<'_>,
        progress: &Advance<'_>,
    ) -> Result<TransferReport, FileError> {
        let d = dest.to_owned();
        if blocking(move || check_local_dest(&d, force)).await? {
            return self.already_here(remote, dest).await;
        }
        let small = size_hint.is_some_and(|s| s < RESUME_MIN);
        let anonymous = if small {
            open_anonymous_download(dest).await?
        } else {
            None
        };
        let (incoming, start) = match anonymous {
            Some(incoming) => (incoming, Start::default()),
            None => open_download(dest, self.resume).await?,
        };
        let (mut send, mut recv) = self.open().await?;
        let request = Request::Get(GetRequest {
            path: remote.to_owned(),
            resume: (start.offset > 0).then(|| Prefix {
                offset: start.offset,
                digest: start.prefix_digest(),
            }),
            compression: self.compression,
        });
        write_frame(&mut send, &request).await?;
        let offer = match reply::<Response>(&mut recv, self.within(start.offset)).await? {
            Response::GetAccepted(offer) => offer,
            Response::Refused(e) => return Err(e.into()),
            other => return Err(unexpected(&other)),
        };
        if offer.offset > offer.meta.size {
            return Err(FileError::Protocol(format!(
                "the server offered to continue {remote} at byte {} of a {}-byte file",
                offer.offset, offer.meta.size
            )));
        }
        let mut notes = Vec::new();
        let start = if offer.offset == start.offset {
            start
        } else if offer.offset == 0 {
            notes.push(format!(
                "{remote}: changed on the server since the interrupted download (or the partial file {} was damaged); starting over",
                part_path(dest).display()
            ));
            incoming.restart().map_err(FileError::local(dest))?
        } else {
            return Err(FileError::Protocol(format!(
                "the server offered to continue {remote} at byte {} but we hold {}",
                offer.offset, start.offset
            )));
        };
        on_start(offer.meta.size);
        progress(start.offset);
        let resumed_from = start.offset;
        let result = receive_get(
            &mut recv,
            dest,
            incoming,
            start,
            &offer,
            force,
            self.pace.clone(),
            progress,
        )
        .await;
        let receipt = match &result {
            Ok(digest) => Receipt::Committed {
                size: offer.meta.size,
                digest: *digest,
            },
            Err(e) => {
                let _ = recv.stop(VarInt::from_u32(STOP_REFUSED));
                Receipt::Failed(RemoteError::new(ErrorCode::Internal, e.to_string()))
            }
        };
        // The receipt only informs the server's log; the file is already safe.
        // Wait briefly for it to be acknowledged, so closing the connection
        // right after does not discard it.
        if write_frame(&mut send, &receipt).await.is_ok() && send.finish().is_ok() {
            let _ = tokio::time::timeout(Duration::from_secs(1), send.stopped()).await;
        }
        result.map(|digest| TransferReport {
            name: remote.to_owned(),
            dest: dest.display().to_string(),
            bytes: offer.meta.size,
            blake3: digest,
            resumed_from,
            bytes_sent: offer.meta.size - resumed_from,
            notes,
            already_there: false,
            seconds: 0.0,
        })
    }

    /// `dest` exists: done if it is the remote file already (the server
    /// finds its whole BLAKE3 equal to the prefix we send, which is all of
    /// our file), else the usual "exists, use --force" error.
    async fn already_here(&self, remote: &str, dest: &Path) -> Result<TransferReport, FileError> {
        let d = dest.to_owned();
        let size = blocking(move || std::fs::metadata(d))
            .await
            .map_err(FileError::local(dest))?
            .len();
        let ours = hash_file(dest).await?;
        let (mut send, mut recv) = self.open().await?;
        let request = Request::Get(GetRequest {
            path: remote.to_owned(),
            resume: Some(Prefix {
                offset: size,
                digest: ours,
            }),
            compression: Compression::Never,
        });
        write_frame(&mut send, &request).await?;
        let offer = match reply::<Response>(&mut recv, self.within(size)).await? {
            Response::GetAccepted(offer) => offer,
            Response::Refused(e) => return Err(e.into()),
            other => return Err(unexpected(&other)),
        };
        let same = offer.offset == size && offer.meta.size == size;
        let theirs = if same {
            Some(reply::<Trailer>(&mut recv, self.within(size)).await?.digest)
        } else {
            None
        };
        if theirs != Some(ours) {
            let _ = recv.stop(VarInt::from_u32(STOP_REFUSED));
            let _ = send.finish();
            return Err(FileError::LocalExists(dest.to_owned()));
        }
        let receipt = Receipt::Committed { size, digest: ours };
        if write_frame(&mut send, &receipt).await.is_ok() && send.finish().is_ok() {
            let _ = tokio::time::timeout(Duration::from_secs(1), send.stopped()).await;
        }
        Ok(TransferReport::already_there(
            remote.to_owned(),
            dest.display().to_string(),
            size,
            ours,
        ))
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

    /// Creates the remote directory `path` (and parents) and applies `meta`.
    pub async fn mkdir(&self, path: &str, meta: Option<DirMeta>) -> Result<(), FileError> {
        let (mut send, mut recv) = self.open().await?;
        let request = Request::Mkdir(MkdirRequest {
            path: path.to_owned(),
            meta,
        });
        write_frame(&mut send, &request).await?;
        let _ = send.finish();
        match reply::<Response>(&mut recv, self.reply_timeout).await? {
            Response::MkdirDone => Ok(()),
            Response::Refused(e) => Err(e.into()),
            other => Err(unexpected(&other)),
        }
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
        let _ = send.finish();
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
                let _ = recv.stop(VarInt::from_u32(STOP_REFUSED));
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

/// The refusal a connection error stands for, if it is one.
fn refusal(e: &ConnectionError, server: &str, fingerprint: Fingerprint) -> Option<ConnectError> {
    let denied = [
        TransportErrorCode::crypto(ALERT_ACCESS_DENIED),
        TransportErrorCode::crypto(ALERT_CERTIFICATE_REQUIRED),
    ];
    match e {
        ConnectionError::ConnectionClosed(c) if denied.contains(&c.error_code) => {
            Some(ConnectError::Refused {
                server: server.to_owned(),
                fingerprint,
            })
        }
        ConnectionError::ApplicationClosed(c)
            if c.error_code == VarInt::from_u32(close::TOO_MANY_FROM_CLIENT) =>
        {
            Some(ConnectError::TooManyFromClient {
                server: server.to_owned(),
            })
        }
        _ => None,
    }
}

/// Why a connection ended, as the user should read it.
pub fn describe_close(reason: &ConnectionError) -> String {
    match reason {
        ConnectionError::ApplicationClosed(c)
            if c.error_code == VarInt::from_u32(close::SHUTTING_DOWN) =>
        {
            "the server is shutting down".into()
        }
        ConnectionError::Reset => "the server restarted and no longer knows this connection".into(),
        ConnectionError::TimedOut => {
            "the server stopped answering (a network outage, or the server is down)".into()
        }
        other => other.to_string(),
    }
}

/// How long the server may take to answer a request, beyond the time to
/// hash `size` bytes at a slow disk's 50 MiB/s (it may hash an existing
/// copy, or the part it holds, before it answers). Keep-alives hold the
/// connection open while a server's process is stuck, so without this a
/// request it never answered would hang the client forever.
fn reply_timeout(base: Duration, size: u64) -> Duration {
    base + Duration::from_secs(size / (50 << 20))
}

/// Default for [`ClientConfig::reply_timeout`].
pub const DEFAULT_REPLY_TIMEOUT: Duration = Duration::from_secs(60);

impl Client {
    /// How long the answer to a request about `size` bytes may take.
    fn within(&self, size: u64) -> Duration {
        reply_timeout(self.reply_timeout, size)
    }

    /// How long a receipt may take after the data: the server syncs the file first.
    fn receipt_within(&self, size: u64) -> Duration {
        self.reply_timeout + self.within(size)
    }
}

/// Reads the server's next message, failing if it does not come `within`.
async fn reply<T: serde::de::DeserializeOwned>(
    recv: &mut RecvStream,
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

/// One connection attempt to one address, with the unreachable timeout.
struct Attempt<'a> {
    transport: &'a TransportOpts,
    identity: &'a Identity,
    server: &'a str,
    sni: &'a str,
    /// How long the server may stay silent.
    silence: Duration,
}

impl Attempt<'_> {
    /// Connects to `addr`. Silence for `silence` means nobody is there;
    /// within it, an unanswered handshake is started afresh every
    /// [`RESTART_UNANSWERED`]: QUIC doubles the wait between its
    /// retransmissions of the first packet (1, 2, 4, 8 s...), so on a path
    /// losing 30% of packets one long attempt tries only a few times, and
    /// fresh ones try far more often. Once the server has answered (its
    /// handshake data arrived), a lossy path only slows the rest of the
    /// handshake down, so it gets [`HANDSHAKE_TIMEOUT`].
    async fn once(
        &self,
        addr: SocketAddr,
        verifier: Arc<PinnedServerVerifier>,
    ) -> Result<(quinn::Endpoint, quinn::Connection), ConnectError> {
        let Self {
            transport,
            identity,
            server,
            sni,
            silence,
        } = *self;
        let deadline = Instant::now() + silence;
        loop {
            let endpoint =
                endpoint::client_endpoint(addr, verifier.clone(), Some(identity), transport)?;
            let mut connecting = endpoint
                .connect(addr, sni)
                .or_else(|_| endpoint.connect(addr, "qxfer"))
                .map_err(|source| ConnectError::Setup {
                    server: server.to_owned(),
                    source,
                })?;
            let window = RESTART_UNANSWERED.min(deadline.saturating_duration_since(Instant::now()));
            let answered =
                tokio::time::timeout(window, async { connecting.handshake_data().await.is_ok() })
                    .await;
            let done = match answered {
                Ok(true) => tokio::time::timeout(HANDSHAKE_TIMEOUT, connecting).await,
                // Failed outright: the error says why.
                Ok(false) => Ok(connecting.await),
                Err(_) => {
                    endpoint.close(VarInt::from_u32(0), b"timeout");
                    if Instant::now() < deadline {
                        continue;
                    }
                    return Err(ConnectError::Unreachable {
                        after: silence,
                        server: server.to_owned(),
                        addr,
                    });
                }
            };
            return match done {
                Ok(Ok(conn)) => Ok((endpoint, conn)),
                Err(_) => {
                    endpoint.close(VarInt::from_u32(0), b"timeout");
                    Err(ConnectError::Unreachable {
                        after: silence + HANDSHAKE_TIMEOUT,
                        server: server.to_owned(),
                        addr,
                    })
                }
                Ok(Err(source)) => Err(connect_failure(
                    source,
                    server,
                    addr,
                    identity.fingerprint(),
                )),
            };
        }
    }
}

/// Names why a handshake failed.
fn connect_failure(
    source: ConnectionError,
    server: &str,
    addr: SocketAddr,
    fingerprint: Fingerprint,
) -> ConnectError {
    if let Some(refused) = refusal(&source, server, fingerprint) {
        return refused;
    }
    let server = server.to_owned();
    match source {
        e if is_alpn_refusal(&e) => ConnectError::NotQxfer { server, addr },
        ConnectionError::ConnectionClosed(close)
            if close.error_code == TransportErrorCode::CONNECTION_REFUSED =>
        {
            ConnectError::Busy { server, addr }
        }
        source => ConnectError::Connection {
            server,
            addr,
            source,
        },
    }
}

/// Whether the handshake failed because the server does not offer our ALPN.
fn is_alpn_refusal(e: &ConnectionError) -> bool {
    let want = TransportErrorCode::crypto(ALERT_NO_APPLICATION_PROTOCOL);
    match e {
        ConnectionError::ConnectionClosed(close) => close.error_code == want,
        ConnectionError::TransportError(t) => t.code == want,
        _ => false,
    }
}

fn unexpected(msg: &Response) -> FileError {
    FileError::Protocol(format!("the server sent an unexpected message: {msg:?}"))
}

/// Hex of a digest, for reports.
pub fn hex(d: &Digest) -> String {
    d.iter().map(|b| format!("{b:02x}")).collect()
}

fn serialize_hex<S: serde::Serializer>(d: &Digest, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&hex(d))
}

/// Opens a local file to send and reads its metadata.
///
/// Opened without blocking (O_NONBLOCK): opening a FIFO for reading would
/// otherwise wait for a writer forever; it is refused below as not a
/// regular file, as the server refuses it.
fn open_source(local: &Path) -> Result<(File, FileMeta), FileError> {
    let mut opts = std::fs::OpenOptions::new();
    opts.read(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        opts.custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY);
    }
    let file = opts.open(local).map_err(FileError::local(local))?;
    let md = file.metadata().map_err(FileError::local(local))?;
    if !md.is_file() {
        let why = if md.is_dir() {
            "is a directory"
        } else {
            "is not a regular file"
        };
        return Err(FileError::Local {
            path: local.to_owned(),
            source: std::io::Error::other(format!("{why}; only regular files can be sent")),
        });
    }
    Ok((file, file_meta(&md)))
}

/// Checks the local destination: `Ok(true)` if a regular file is there and
/// `force` is off (it may be this very file, from an earlier run), an error
/// for a directory or something else in the way.
fn check_local_dest(dest: &Path, force: bool) -> Result<bool, FileError> {
    match std::fs::symlink_metadata(dest) {
        Ok(md) if md.is_dir() => Err(FileError::Local {
            path: dest.to_owned(),
            source: std::io::Error::other("is a directory; choose another -o or name"),
        }),
        Ok(md) if !force && md.is_file() => Ok(true),
        Ok(_) if !force => Err(FileError::LocalExists(dest.to_owned())),
        _ => Ok(false),
    }
}

/// The BLAKE3 of the whole local file at `path`.
async fn hash_file(path: &Path) -> Result<Digest, FileError> {
    let p = path.to_owned();
    blocking(move || File::open(&p).and_then(|mut f| transfer::file_digest(&mut f)))
        .await
        .map_err(FileError::local(path))
}

/// The server holds a file of the same size and mtime at `remote`, with
/// BLAKE3 `theirs`: done if ours is the same, else the usual "exists" error.
async fn already_on_server(
    local: &Path,
    remote: &str,
    size: u64,
    theirs: Digest,
) -> Result<TransferReport, FileError> {
    let ours = hash_file(local).await?;
    if ours != theirs {
        return Err(FileError::Remote(RemoteError::new(
            ErrorCode::AlreadyExists,
            format!("'{remote}' already exists on the server with other contents; use --force to overwrite it"),
        )));
    }
    Ok(TransferReport::already_there(
        local.display().to_string(),
        remote.to_owned(),
        size,
        ours,
    ))
}

/// Where a download to `dest` keeps its bytes until it is complete.
pub fn part_path(dest: &Path) -> PathBuf {
    let mut name = dest.file_name().unwrap_or_default().to_os_string();
    name.push(PART_SUFFIX);
    dest.with_file_name(name)
}

/// Suffix of partial downloads beside their destination.
pub const PART_SUFFIX: &str = ".qxfer-part";

/// An anonymous temporary beside `dest`, if the system allows one.
async fn open_anonymous_download(dest: &Path) -> Result<Option<IncomingFile>, FileError> {
    let d = dest.to_owned();
    blocking(move || {
        let dir = match d.parent() {
            Some(p) if !p.as_os_str().is_empty() => p,
            _ => Path::new("."),
        };
        let Some(name) = d.file_name().and_then(|n| n.to_str()) else {
            return Ok(None); // open_download explains
        };
        let dir = cap_std::fs::Dir::open_ambient_dir(dir, cap_std::ambient_authority())
            .map_err(FileError::local(&d))?;
        IncomingFile::create_anonymous(dir, name, d.clone()).map_err(FileError::local(&d))
    })
    .await
}

/// Opens `DEST.qxfer-part` and, if `resume` and it holds bytes, hashes them.
async fn open_download(dest: &Path, resume: bool) -> Result<(IncomingFile, Start), FileError> {
    let d = dest.to_owned();
    blocking(move || {
        let local = FileError::local(&d);
        let dir = match d.parent() {
            Some(p) if !p.as_os_str().is_empty() => p,
            _ => Path::new("."),
        };
        let name = d
            .file_name()
            .and_then(|n| n.to_str())
            .ok_or_else(|| FileError::Local {
                path: d.clone(),
                source: std::io::Error::other("has no UTF-8 file name"),
            })?;
        let part = part_path(&d);
        let part_name = part.file_name().and_then(|n| n.to_str()).expect("UTF-8");
        let open = || -> std::io::Result<(IncomingFile, Start)> {
            let dir = cap_std::fs::Dir::open_ambient_dir(dir, cap_std::ambient_authority())?;
            let incoming =
                IncomingFile::open_partial(dir.try_clone()?, part_name, dir, name, d.clone())?;
            let held = incoming.held()?;
            let start = if resume && held > 0 {
                incoming.prefix(held)?
            } else {
                incoming.restart()?
            };
            Ok((incoming, start))
        };
        open().map_err(|e| {
            if e.kind() == std::io::ErrorKind::ResourceBusy {
                FileError::Local {
                    path: part.clone(),
                    source: std::io::Error::new(
                        e.kind(),
                        "another qxfer is downloading to this file right now",
                    ),
                }
            } else {
                local(e)
            }
        })
    })
    .await
}

/// Receives the rest of a download into `incoming`, checks it against the
/// server's trailer and commits it under `dest`: the file's BLAKE3.
#[allow(clippy::too_many_arguments)]
async fn receive_get(
    recv: &mut RecvStream,
    dest: &Path,
    incoming: IncomingFile,
    start: Start,
    offer: &GetOffer,
    force: bool,
    pace: Option<Arc<Pacer>>,
    progress: &Advance<'_>,
) -> Result<Digest, FileError> {
    let meta = &offer.meta;
    let file = incoming.file().map_err(FileError::local(dest))?;
    let received = transfer::receive_file(
        recv,
        meta.size,
        file,
        start,
        offer.encoding,
        pace,
        progress,
        std::future::pending(),
    )
    .await;
    let digest = received.map_err(|e| match e {
        TransferError::Write(io) => FileError::local(dest)(io),
        TransferError::Network(ref io) if is_source_reset(io) => FileError::Protocol(
            "the server could not read the file to the end (it may have changed); try again".into(),
        ),
        other => FileError::Transfer {
            path: dest.to_owned(),
            source: other,
        },
    })?;
    let trailer: Trailer = reply(recv, transfer::STALL_TIMEOUT).await?;
    if trailer.digest != digest {
        // Never resume from bytes known to be bad.
        incoming.discard();
        return Err(FileError::Corrupt(dest.to_owned()));
    }
    let meta = *meta;
    let d = dest.to_owned();
    blocking(move || incoming.commit(&meta, force))
        .await
        .map_err(|e| match e {
            CommitError::Exists(p) => FileError::LocalExists(p),
            CommitError::Io { source, .. } => FileError::local(&d)(source),
        })?;
    Ok(digest)
}

/// Compares the server's offer (`offset` bytes hashing to `prefix`) with
/// the local file: the start to send from, and the file positioned there.
async fn check_offer(
    file: File,
    size: u64,
    offset: u64,
    prefix: Digest,
) -> std::io::Result<(File, Start)> {
    blocking(move || {
        let mut file = file;
        let start = transfer::matching_start(&mut file, size, offset, &prefix)?;
        Ok((file, start))
    })
    .await
}

fn is_source_reset(e: &std::io::Error) -> bool {
    matches!(
        e.get_ref().and_then(|inner| inner.downcast_ref::<quinn::ReadError>()),
        Some(quinn::ReadError::Reset(code)) if *code == VarInt::from_u32(RESET_SOURCE_FAILED)
    )
}

/// One file to move: its label for messages and both ends.
#[derive(Debug, Clone)]
pub struct Job {
    /// What the user typed (for messages).
    pub label: String,
    /// The local path (source for put, destination for get).
    pub local: PathBuf,
    /// The remote path (destination for put, source for get).
    pub remote: String,
    /// The size, if known before the transfer (a get from a listing).
    pub size_hint: Option<u64>,
}

/// Files smaller than this are "small": they do not count against
/// `--parallel` and get no bar of their own.
pub const SMALL_FILE: u64 = 1024 * 1024;

/// Small files in flight at once, at most: as many as a server grants
/// streams by default ([`endpoint::DEFAULT_MAX_STREAMS`]), so that a
/// thousand small files wait on one another for a round trip, not fifty.
/// Each holds one stream and at most its own bytes in memory.
pub const SMALL_FILE_STREAMS: usize = endpoint::DEFAULT_MAX_STREAMS as usize;

/// Bytes of small files in flight at once, at most: keeps memory flat
/// when the small files are near [`SMALL_FILE`] in size (each in flight
/// holds its bytes once read, and again once framed for the wire). 16 MiB
/// is twenty times the bandwidth-delay product of a 200 Mbit/s, 30 ms path.
const SMALL_FILE_BUDGET: u64 = 16 * 1024 * 1024;

/// The unit [`SMALL_FILE_BUDGET`] is counted in.
const BUDGET_UNIT: u64 = 4096;

/// Which way files move.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    /// Local to server.
    Put,
    /// Server to local.
    Get,
}

/// The outcome of a batch: what succeeded and what failed, and how long it took.
#[derive(Debug)]
pub struct BatchReport {
    /// Completed transfers, in completion order.
    pub done: Vec<TransferReport>,
    /// Failed transfers: the label and the error.
    pub failed: Vec<(String, FileError)>,
    /// The jobs among `failed` whose error is transient
    /// ([`FileError::is_transient`]): worth another try over a new connection.
    pub retry: Vec<Job>,
    /// Wall time for the whole batch.
    pub elapsed: Duration,
}

/// Runs `jobs` over `client` with at most `parallel` large files in flight,
/// each with its own progress bar, and up to [`SMALL_FILE_STREAMS`] small
/// ones (within [`SMALL_FILE_BUDGET`] bytes). Every job runs to its own
/// end, whatever the others do.
///
/// A job's task is spawned only once it holds its permits: a task is a few
/// kilobytes before it starts, so spawning all of a 9,000-file tree at once
/// cost 150 MB. Small and large files are fed from queues of their own, so
/// a large file waiting for its turn never holds up small ones.
pub async fn run_batch(
    client: &Client,
    direction: Direction,
    jobs: Vec<Job>,
    parallel: usize,
    force: bool,
    progress: &Progress,
) -> BatchReport {
    let start = Instant::now();
    let queued = jobs.len();
    progress.set_status(format!("0/{queued} files"));
    let (mut small, mut large) = (Vec::new(), Vec::new());
    // A put's size is known up front, so the total bar is right from the
    // start; a get learns its size from the server's answer. The stats run
    // off the async threads (a slow or hung filesystem must not stall them).
    let sized = blocking(move || {
        jobs.into_iter()
            .map(|job| {
                let size = match direction {
                    Direction::Put => std::fs::metadata(&job.local).map(|m| m.len()).ok(),
                    Direction::Get => job.size_hint,
                };
                (job, size)
            })
            .collect::<Vec<_>>()
    })
    .await;
    for (job, size) in sized {
        if direction == Direction::Put {
            progress.add_total(size.unwrap_or(0));
        }
        match size {
            Some(size) if size < SMALL_FILE => small.push((job, size)),
            _ => large.push((job, size.unwrap_or(0))),
        }
    }
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let run = BatchRun {
        client: client.clone(),
        direction,
        force,
        progress: progress.clone(),
        done: tx,
    };
    let feed_small = run.feed(
        small,
        Arc::new(Semaphore::new(SMALL_FILE_STREAMS.max(parallel))),
        Some(Arc::new(Semaphore::new(
            (SMALL_FILE_BUDGET / BUDGET_UNIT) as usize,
        ))),
    );
    let feed_large = run.feed(large, Arc::new(Semaphore::new(parallel.max(1))), None);
    drop(run);
    let mut report = BatchReport {
        done: Vec::new(),
        failed: Vec::new(),
        retry: Vec::new(),
        elapsed: Duration::ZERO,
    };
    let collect = async {
        while let Some((job, result)) = rx.recv().await {
            match result {
                Ok(r) => report.done.push(r),
                Err(e) => {
                    tracing::debug!("{}: {e}", job.label);
                    if e.is_transient() {
                        report.retry.push(job.clone());
                    }
                    report.failed.push((job.label, e));
                }
            }
            progress.set_status(format!(
                "{}/{queued} files",
                report.done.len() + report.failed.len()
            ));
        }
    };
    tokio::join!(feed_small, feed_large, collect);
    report.elapsed = start.elapsed();
    report
}

/// What every job of a batch shares.
struct BatchRun {
    client: Client,
    direction: Direction,
    force: bool,
    progress: Progress,
    /// Where finished jobs report; the batch ends when every sender is gone.
    done: tokio::sync::mpsc::UnboundedSender<(Job, Result<TransferReport, FileError>)>,
}

impl BatchRun {
    /// Starts `jobs` one by one as `pool` (and, for small files, `budget`)
    /// lets them.
    fn feed(
        &self,
        jobs: Vec<(Job, u64)>,
        pool: Arc<Semaphore>,
        budget: Option<Arc<Semaphore>>,
    ) -> impl std::future::Future<Output = ()> + 'static {
        let this = self.clone_parts();
        async move {
            for (job, size) in jobs {
                let permit = pool.clone().acquire_owned().await.expect("never closed");
                let bytes = match &budget {
                    Some(budget) => {
                        let units = size.div_ceil(BUDGET_UNIT).max(1) as u32;
                        Some(
                            budget
                                .clone()
                                .acquire_many_owned(units)
                                .await
                                .expect("never closed"),
                        )
                    }
                    None => None,
                };
                let this = this.clone_parts();
                let small = budget.is_some();
                tokio::spawn(async move {
                    let result = this.run(&job, size, small).await;
                    drop((permit, bytes));
                    let _ = this.done.send((job, result));
                });
            }
        }
    }

    fn clone_parts(&self) -> Self {
        Self {
            client: self.client.clone(),
            direction: self.direction,
            force: self.force,
            progress: self.progress.clone(),
            done: self.done.clone(),
        }
    }

    /// Moves one file, with a bar of its own unless it is small.
    async fn run(&self, job: &Job, size: u64, small: bool) -> Result<TransferReport, FileError> {
        let started = Instant::now();
        let progress = &self.progress;
        let bar = if small {
            progress.total_only()
        } else {
            progress.file_bar(
                &job.label,
                if self.direction == Direction::Put {
                    size
                } else {
                    0
                },
            )
        };
        let result = match self.direction {
            Direction::Put => {
                self.client
                    .put(&job.local, &job.remote, self.force, &|n| bar.inc(n))
                    .await
            }
            Direction::Get => {
                self.client
                    .get_sized(
                        &job.remote,
                        &job.local,
                        job.size_hint,
                        self.force,
                        &|size| {
                            bar.set_length(size);
                            progress.add_total(size);
                        },
                        &|n| bar.inc(n),
                    )
                    .await
            }
        };
        bar.finish();
        result.map(|mut r| {
            r.seconds = started.elapsed().as_secs_f64();
            r
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn server_addresses_parse() {
        assert_eq!(split_server("h:1").unwrap(), ("h".into(), 1));
        assert_eq!(split_server("h").unwrap(), ("h".into(), DEFAULT_PORT));
        assert_eq!(split_server("[::1]:9").unwrap(), ("::1".into(), 9));
        assert_eq!(split_server("[::1]").unwrap(), ("::1".into(), DEFAULT_PORT));
        assert_eq!(split_server("::1").unwrap(), ("::1".into(), DEFAULT_PORT));
        assert_eq!(split_server("10.0.0.1:5").unwrap(), ("10.0.0.1".into(), 5));
        assert!(split_server("h:notaport").is_err());
        assert!(split_server(":5").is_err());
        assert_eq!(known_hosts_key("::1", 9), "[::1]:9");
        assert_eq!(known_hosts_key("Host", 9), "host:9");
    }

    #[test]
    fn path_memories_round_trip_expire_and_skip_garbage() {
        let dir = tempfile::tempdir().unwrap();
        let paths = PathMemories::new(dir.path());
        assert_eq!(paths.recall("h:1"), None, "nothing remembered yet");
        let m = PathMemory {
            bw: 62_500_000.0,
            min_rtt: Duration::from_micros(100_250),
        };
        paths.remember("h:1", m);
        paths.remember("h:2", PathMemory { bw: 1.0, ..m });
        assert_eq!(paths.recall("h:1"), Some(m));
        // A newer measurement replaces the old one; others stay.
        let newer = PathMemory { bw: 1e6, ..m };
        paths.remember("h:1", newer);
        assert_eq!(paths.recall("h:1"), Some(newer));
        assert!(paths.recall("h:2").is_some());
        // Lines that do not parse are ignored; old ones are not trusted.
        let old = unix_now() - PATH_MEMORY_MAX_AGE.as_secs() - 1;
        let mut text = std::fs::read_to_string(dir.path().join("paths")).unwrap();
        text.push_str("garbage\nh:3 nan\n");
        text.push_str(&format!("h:4 1000 1000 {old}\n"));
        std::fs::write(dir.path().join("paths"), text).unwrap();
        assert_eq!(paths.recall("h:1"), Some(newer));
        assert_eq!(paths.recall("h:4"), None);
    }

    #[test]
    fn upload_journal_entries_name_one_version_of_one_upload() {
        let dir = tempfile::tempdir().unwrap();
        let journal = UploadJournal::open(dir.path(), "h:1".into()).unwrap();
        let meta = FileMeta {
            size: 10,
            mtime: Some(crate::protocol::Timestamp { secs: 5, nanos: 0 }),
            mode: None,
        };
        let a = journal.entry("a", &meta);
        assert_eq!(a, journal.entry("a", &meta), "stable");
        assert_ne!(a, journal.entry("b", &meta), "per remote path");
        assert_ne!(
            a,
            journal.entry("a", &FileMeta { size: 11, ..meta }),
            "per size"
        );
        let other = UploadJournal::open(dir.path(), "h:2".into()).unwrap();
        assert_ne!(a, other.entry("a", &meta), "per server");
        // Entries nobody came back for are swept when the journal opens.
        std::fs::write(&a, b"").unwrap();
        let f = File::options().write(true).open(&a).unwrap();
        f.set_modified(std::time::SystemTime::now() - JOURNAL_MAX_AGE - Duration::from_secs(60))
            .unwrap();
        UploadJournal::open(dir.path(), "h:1".into()).unwrap();
        assert!(!a.exists());
    }

    #[test]
    fn digests_print_as_hex() {
        assert_eq!(hex(&[0xab; 32]), "ab".repeat(32));
    }
}

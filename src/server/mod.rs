//! The server: accepts connections and answers each stream's request against its root directory.
//!
//! Every connection runs in its own task and every stream in its own task
//! within it, so one client's failure (a bad header, a full disk, a dropped
//! link) ends only that stream and the server keeps serving everyone else.
//!
//! Everything the server does with files goes through its [`Store`]: a
//! local directory sandboxed with cap-std, or an S3-compatible bucket that
//! several servers share (see [`crate::store`]).
//!
//! This module accepts connections and reads each stream's request and
//! hands it to the module that serves it: [`put`], [`get`], [`list`],
//! [`mkdir`], [`manage`]; `connection` runs one connection within the
//! limits on handshakes and per client; [`partials`] owns the partial
//! store.

use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use quinn::VarInt;
use tracing::{debug, info, info_span, warn, Instrument};

use crate::protocol::{
    close, read_frame_limited, write_frame, ErrorCode, FrameError, PutRequest, RemoteError,
    Request, Response, MAX_FRAME,
};
use crate::store::local::LocalStore;
use crate::store::Store;
use crate::tls::Fingerprint;

mod connection;
mod get;
mod list;
mod manage;
mod metrics;
mod mkdir;
mod partials;
mod put;
#[cfg(test)]
mod tests;
use connection::*;

use crate::exchange::{RecvHalf, SendHalf};
use get::{serve_get, serve_get_delta};
use list::{serve_digests, serve_list};
use manage::{serve_remove, serve_rename, serve_set_meta};
use mkdir::serve_mkdir;
use partials::{sweep_partials_forever, Partials};
use put::serve_put;

/// Default for [`ServeConfig::header_timeout`].
pub(crate) const DEFAULT_HEADER_TIMEOUT: Duration = Duration::from_secs(10);

/// Default for [`ServeConfig::max_connections_per_client`].
pub(crate) const DEFAULT_MAX_CONNECTIONS_PER_CLIENT: usize = 32;

/// How long to wait for a trailer or receipt that should follow the data at once.
/// The client's receipt for a get comes after it fsyncs a possibly large file.
const RECEIPT_TIMEOUT: Duration = Duration::from_secs(120);

use crate::protocol::stream::{RESET_SOURCE_FAILED, STOP_REFUSED};

/// What the server serves, and its limits.
#[derive(Debug, Clone)]
pub struct ServeConfig {
    /// The root as shown in messages: a directory's absolute path, or the
    /// bucket's `s3://` address.
    pub root: PathBuf,
    /// Where the files are.
    pub(crate) store: Arc<dyn Store>,
    /// Refuse every put.
    pub read_only: bool,
    /// Refuse puts that declare more bytes than this.
    pub max_file_size: Option<u64>,
    /// Most connections served at once; more are refused at the handshake.
    pub max_connections: usize,
    /// Most connections one client identity may hold at once, so one client
    /// cannot take every slot from the others.
    pub max_connections_per_client: usize,
    /// How long a client has to send its request header after opening a stream.
    pub header_timeout: Duration,
    /// Largest request header accepted, in bytes (at most 64 KiB).
    pub max_header_size: usize,
    /// Interrupted uploads untouched for this long are deleted.
    pub partial_ttl: Duration,
    /// On shutdown, how long requests in flight may take to finish before
    /// the connections close (`--grace`).
    pub grace: Duration,
    /// Byte counters, for logs and tests.
    pub stats: Arc<ServeStats>,
    /// Uploads of at least this many bytes into a local root are described
    /// in the background once committed, for their first delta (see
    /// exchange's `describe_in_background`); lowered by tests.
    pub(crate) describe_uploads_from: u64,
}

/// Default for [`ServeConfig::grace`].
pub(crate) const DEFAULT_GRACE: Duration = Duration::from_secs(10);

/// Default for [`ServeConfig::partial_ttl`].
pub(crate) const DEFAULT_PARTIAL_TTL: Duration = Duration::from_secs(24 * 3600);

/// What the server has moved since it started.
#[derive(Debug, Default)]
pub struct ServeStats {
    /// File bytes received from clients (puts).
    pub bytes_received: AtomicU64,
    /// File bytes sent to clients (gets).
    pub bytes_sent: AtomicU64,
}

/// Default for [`ServeConfig::max_connections`].
pub(crate) const DEFAULT_MAX_CONNECTIONS: usize = 256;

/// Errors that stop the server from starting.
pub use crate::store::local::RootError as StartupError;
pub use crate::store::object::S3Options;
pub use metrics::{Exporter, MetricsError};

/// Default for [`S3Options::upload_memory`] (`serve --upload-memory`).
pub(crate) const DEFAULT_UPLOAD_MEMORY: u64 = crate::store::object::DEFAULT_UPLOAD_MEMORY;

/// Which store a test's server serves (see `on_both_stores!`).
#[cfg(test)]
#[derive(Debug, Clone, Copy)]
pub(crate) enum Backend {
    /// A directory (a temporary one).
    Local,
    /// A bucket in object_store's in-memory store.
    Object,
}

impl ServeConfig {
    /// Waits until the store has done what it does after its answers (an
    /// object root writes a large upload's sums and removes its record
    /// once the client was told it is saved), as a server shutting down
    /// does: for tests that look into the store right after a put.
    pub async fn settled(&self) {
        self.store.finish_background().await;
    }

    /// Serves the directory `root`: creates it if missing, checks it is a
    /// writable directory, and resolves it to an absolute path.
    pub fn prepare(root: &Path) -> Result<Self, StartupError> {
        let (store, root) = LocalStore::open_root(root)?;
        Ok(Self::with_store(root, Arc::new(store)))
    }

    /// Serves the bucket `url` names (`s3://BUCKET[/PREFIX]`) of the object
    /// store `options` describe, after checking it can be listed and (unless
    /// `read_only`) written to. The error says what to check.
    pub async fn object_store(
        url: &str,
        options: &S3Options,
        read_only: bool,
    ) -> Result<Self, String> {
        let store = crate::store::object::ObjectRoot::connect(url, options, read_only)
            .await
            .map_err(|e| e.to_string())?;
        Ok(Self::with_store(PathBuf::from(url), Arc::new(store)))
    }

    /// A test server's configuration over `backend`: a local root in
    /// `root`, or a bucket in object_store's in-memory store.
    #[cfg(test)]
    pub(crate) fn for_test(backend: Backend, root: &Path) -> Self {
        match backend {
            Backend::Local => Self::prepare(root).expect("a temporary root"),
            Backend::Object => Self::with_store(
                "memory://served".into(),
                Arc::new(crate::store::object::ObjectRoot::in_memory()),
            ),
        }
    }

    /// Serves `store`, shown as `root`, with the default limits.
    pub(crate) fn with_store(root: PathBuf, store: Arc<dyn Store>) -> Self {
        Self {
            root,
            store,
            read_only: false,
            max_file_size: None,
            max_connections: DEFAULT_MAX_CONNECTIONS,
            max_connections_per_client: DEFAULT_MAX_CONNECTIONS_PER_CLIENT,
            header_timeout: DEFAULT_HEADER_TIMEOUT,
            max_header_size: MAX_FRAME,
            partial_ttl: DEFAULT_PARTIAL_TTL,
            grace: DEFAULT_GRACE,
            stats: Arc::default(),
            describe_uploads_from: crate::exchange::DESCRIBE_AFTER_UPLOAD,
        }
    }
}

/// Serves `endpoint` until `shutdown` completes, then stops gracefully
/// (see [`run_until`]).
pub async fn run(
    endpoint: quinn::Endpoint,
    config: ServeConfig,
    shutdown: impl Future<Output = ()>,
) {
    run_until(endpoint, config, shutdown, std::future::pending(), None).await
}

/// Serves `endpoint` until `shutdown` completes, then stops gracefully: no
/// new connection is admitted and no new request started (they are
/// refused, and clients retry elsewhere or later), requests in flight get
/// up to [`ServeConfig::grace`] to finish, and then every connection is
/// closed with [`close::SHUTTING_DOWN`], which clients report as "the
/// server is shutting down". `stop_now` (a second Ctrl-C) cuts the grace
/// short. Interrupted uploads keep their partials either way.
pub(crate) async fn run_until(
    endpoint: quinn::Endpoint,
    config: ServeConfig,
    shutdown: impl Future<Output = ()>,
    stop_now: impl Future<Output = ()>,
    exporter: Option<Exporter>,
) {
    // Before the first request: what a crashed run of this same server
    // (same host, address and root) still held in a shared store is let go.
    if let Ok(addr) = endpoint.local_addr() {
        let tag =
            crate::store::object::holder_tag(&addr.to_string(), &config.root.display().to_string());
        match config.store.adopt(&tag).await {
            Ok(0) => {}
            Ok(n) => info!("let go of {n} lease(s) a previous run of this server left"),
            Err(e) => warn!("cannot look for leases a previous run of this server left: {e}"),
        }
    }
    let slots = Arc::new(tokio::sync::Semaphore::new(config.max_connections));
    let per_client: PerClient = Arc::default();
    let partials: Arc<Partials> = Arc::default();
    let config = Arc::new(config);
    let sweeper = tokio::spawn(sweep_partials_forever(config.clone(), partials.clone()));
    let handshaking = Handshakes::new();
    let activity = Activity::default();
    // The store's health, probed while the server runs (see watch_store).
    let watcher = tokio::spawn(watch_store(config.clone(), activity.store_down.clone()));
    // Metrics and health on HTTP, for as long as the server runs.
    let exporting = exporter.map(|e| {
        tokio::spawn(e.serve(metrics::Watched {
            config: config.clone(),
            partials: partials.clone(),
            requests: activity.requests.clone(),
            held_counted: Default::default(),
        }))
    });
    tokio::pin!(shutdown);
    loop {
        let incoming = tokio::select! {
            _ = &mut shutdown => break,
            incoming = endpoint.accept() => incoming,
        };
        let Some(incoming) = incoming else { break };
        // Stateless retry under load: while many handshakes are in progress,
        // an address that has not proven it can receive our packets gets a
        // token first, so spoofed sources cannot tie up connection slots or
        // handshake work. Otherwise the round trip a retry costs (100 ms on
        // a long path, on every connection) is not worth it: QUIC already
        // caps what an unvalidated address is sent at three times what it
        // sent (RFC 9000, 8.1), so nothing is amplified toward a victim.
        if !incoming.remote_address_validated() && handshaking.count() >= RETRY_ABOVE_HANDSHAKES {
            let _ = incoming.retry();
            continue;
        }
        // Every slot taken by an established client: no handshake at all.
        if slots.available_permits() == 0 {
            warn!(remote = %incoming.remote_address(), "connection refused: {} connections already open (--max-connections)", config.max_connections);
            metrics::refused("busy");
            incoming.refuse();
            continue;
        }
        // Handshakes have a budget of their own (and one address only a
        // share of it under pressure): a flood of Initials that answer the
        // Retry and then fall silent takes no established client's slot.
        let Some(handshake) = handshaking.start(incoming.remote_address().ip()) else {
            debug!(remote = %incoming.remote_address(), "handshake refused: too many in flight");
            metrics::refused("handshakes");
            incoming.refuse();
            continue;
        };
        let span = info_span!("conn", remote = %incoming.remote_address());
        let (config, per_client, partials) = (config.clone(), per_client.clone(), partials.clone());
        let activity = activity.clone();
        let all = slots.clone();
        tokio::spawn(
            async move {
                let max = config.max_connections;
                handle_connection(
                    incoming, handshake, &all, config, per_client, partials, activity,
                )
                .await;
                if all.available_permits() == max {
                    release_memory().await;
                }
            }
            .instrument(span),
        );
    }
    // Draining: refuse what is new, let what runs finish.
    activity.draining.send_replace(true);
    let in_flight = *activity.requests.borrow();
    if in_flight > 0 {
        info!(
            "shutting down: letting {in_flight} request(s) in flight finish (up to {:?}, --grace); a second signal stops at once",
            config.grace
        );
    }
    let refuser = tokio::spawn({
        let endpoint = endpoint.clone();
        async move {
            while let Some(incoming) = endpoint.accept().await {
                metrics::refused("draining");
                incoming.refuse();
            }
        }
    });
    let mut requests = activity.requests.subscribe();
    // The requests, then what the store does after their answers (an
    // object root's bookkeeping of uploads already saved), within the grace.
    let finished = async {
        let _ = requests.wait_for(|n| *n == 0).await;
        config.store.finish_background().await;
    };
    tokio::select! {
        _ = finished => {}
        _ = tokio::time::sleep(config.grace) => {
            let running = *activity.requests.borrow();
            if running > 0 {
                warn!("{running} request(s) still running after {:?}; closing them (uploads keep their partials for a resume)", config.grace);
            } else {
                warn!("the store's bookkeeping of saved uploads did not finish within {:?}; what it leaves (records, sums) the sweep and later gets deal with", config.grace);
            }
        }
        _ = stop_now => warn!("second signal: stopping at once (uploads keep their partials for a resume)"),
    }
    refuser.abort();
    info!(
        received = config.stats.bytes_received.load(Ordering::Relaxed),
        sent = config.stats.bytes_sent.load(Ordering::Relaxed),
        "shutting down"
    );
    sweeper.abort();
    watcher.abort();
    if let Some(exporting) = exporting {
        exporting.abort();
    }
    endpoint.close(
        VarInt::from_u32(close::SHUTTING_DOWN),
        b"server shutting down",
    );
    // Let the close frames go out; never hang on a peer that vanished.
    let _ = tokio::time::timeout(Duration::from_secs(2), endpoint.wait_idle()).await;
}

/// How often the server probes its store.
const STORE_PROBE_EVERY: Duration = Duration::from_secs(5);

/// Probes that must fail in a row before the store counts as down: one
/// slow answer is no reason to send every client elsewhere.
const STORE_DOWN_AFTER: u32 = 2;

/// Probes the store every [`STORE_PROBE_EVERY`] (each bounded by the
/// health timeout) and says through `down` whether it has stopped
/// answering: [`STORE_DOWN_AFTER`] failures in a row make it down, one
/// answer makes it up again. While it is down the server closes its
/// connections with [`close::STORE_DOWN`] and takes no new ones, so that
/// clients given several addresses of this server resume through another
/// (a local root practically never fails its probe: a stat of the root).
async fn watch_store(config: Arc<ServeConfig>, down: Arc<tokio::sync::watch::Sender<bool>>) {
    let mut failed = 0;
    let mut every = tokio::time::interval(STORE_PROBE_EVERY);
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        every.tick().await;
        match tokio::time::timeout(metrics::HEALTH_TIMEOUT, config.store.probe()).await {
            Ok(Ok(())) => {
                failed = 0;
                metrics::store_answered(true);
                if down.send_replace(false) {
                    info!("the store answers again; taking connections");
                }
            }
            outcome => {
                failed += 1;
                metrics::store_answered(false);
                let why = match outcome {
                    Ok(Err(e)) => e,
                    _ => format!("no answer within {} s", metrics::HEALTH_TIMEOUT.as_secs()),
                };
                if failed >= STORE_DOWN_AFTER && !down.send_replace(true) {
                    warn!("the store does not answer ({why}); closing connections so that clients move to another server, until it answers again");
                }
            }
        }
    }
}

/// Hands memory freed during a burst back to the system once the last
/// connection has gone. glibc's allocator keeps what a busy server freed (a
/// load of 16 clients left 236 MiB resident with nothing running, against
/// 12 MiB at start); `malloc_trim` returns the free pages of every arena.
///
/// One trim at a time: when a thousand clients leave together, many of
/// their tasks see every slot free, and each trim took a blocking thread
/// of its own (a hundred threads for one release).
async fn release_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        use std::sync::atomic::{AtomicBool, Ordering};
        static TRIMMING: AtomicBool = AtomicBool::new(false);
        if TRIMMING.swap(true, Ordering::AcqRel) {
            return;
        }
        // SAFETY: malloc_trim only walks the allocator's own free lists.
        let _ = tokio::task::spawn_blocking(|| unsafe { libc::malloc_trim(0) }).await;
        TRIMMING.store(false, Ordering::Release);
    }
}

/// What a stream's handler needs besides the stream.
struct Ctx {
    config: Arc<ServeConfig>,
    /// The client identity this connection was admitted with.
    client: Fingerprint,
    partials: Arc<Partials>,
    /// The connection, for its path estimate (whether to compress a get);
    /// none over an in-memory pipe.
    conn: Option<quinn::Connection>,
    /// How many requests the server has in flight (graceful shutdown
    /// waits for none; so does background work).
    requests: Arc<tokio::sync::watch::Sender<usize>>,
}

/// A server's handlers over in-memory pipes: each call opens one stream,
/// served by its own task as a QUIC stream would be, for a client known
/// by `client`. The crate's tests run the real client against the real
/// handlers through it, without QUIC or certificates.
#[cfg(test)]
pub(crate) fn over_pipes(
    config: Arc<ServeConfig>,
    client: Fingerprint,
) -> impl Fn() -> (Box<dyn SendHalf>, Box<dyn RecvHalf>) + Send + Sync {
    use crate::exchange::pipes::pipe;
    let partials = Arc::new(Partials::default());
    let requests = Arc::<tokio::sync::watch::Sender<usize>>::default();
    move || {
        let (to_server, server_in) = pipe(1 << 20);
        let (server_out, from_server) = pipe(1 << 20);
        let in_flight = InFlight::start(&requests);
        let ctx = Ctx {
            config: config.clone(),
            client,
            partials: partials.clone(),
            conn: None,
            requests: requests.clone(),
        };
        tokio::spawn(async move {
            handle_stream(server_out, server_in, ctx).await;
            drop(in_flight);
        });
        (Box::new(to_server), Box::new(from_server))
    }
}

/// Reads a stream's request and serves it: the whole life of one request,
/// over a QUIC stream or, in the unit tests, an in-memory pipe.
async fn handle_stream(mut send: impl SendHalf, mut recv: impl RecvHalf, ctx: Ctx) {
    let config = ctx.config.clone();
    let limit = config.max_header_size;
    let timeout = config.header_timeout;
    let request = match tokio::time::timeout(
        timeout,
        read_frame_limited::<_, Request>(&mut recv, limit),
    )
    .await
    {
        Ok(Ok(req)) => req,
        Ok(Err(e)) => {
            warn!("bad request header: {e}");
            metrics::request_done("bad", false, false, Duration::ZERO);
            return refuse(&mut send, &mut recv, protocol_error(&e)).await;
        }
        Err(_) => {
            warn!("no request header within {timeout:?}");
            // Busy, which clients try again: the server cannot tell a
            // client that stalls from a path that lost the rest of the
            // request over and over (at 30% loss, retransmissions
            // backing off once took longer than 10 s), and to a
            // stalling client the answer is the same refusal.
            let secs = timeout.as_secs_f64();
            let err = RemoteError::new(
                ErrorCode::Busy,
                format!("no request arrived within {secs} s of opening the stream (a lossy path, or a stalled client); try again"),
            );
            metrics::request_done("bad", false, false, Duration::ZERO);
            return refuse(&mut send, &mut recv, err).await;
        }
    };
    debug!(?request, "request");
    let started = std::time::Instant::now();
    let kind = match &request {
        Request::Put(_) => "put",
        Request::Get(_) => "get",
        Request::GetDelta(_) => "get_delta",
        Request::Digests(_) => "digests",
        Request::List(_) => "list",
        Request::Mkdir(_) => "mkdir",
        Request::Remove(_) => "remove",
        Request::Rename(_) => "rename",
        Request::SetMeta(_) => "set_meta",
    };
    let result = match request {
        Request::Put(req) => match check_put_allowed(&req, &config) {
            Ok(()) => serve_put(req, &ctx, &mut send, &mut recv).await,
            Err(e) => Err(e),
        },
        Request::Get(req) => serve_get(req, &ctx, &mut send, &mut recv).await,
        Request::GetDelta(req) => serve_get_delta(req, &ctx, &mut send, &mut recv).await,
        // Requests answered without data from the client: (request, context, answer).
        Request::Digests(req) => serve_digests(req, &ctx, &mut send).await,
        Request::List(req) => serve_list(req, &ctx, &mut send).await,
        Request::Mkdir(req) => serve_mkdir(req, &ctx, &mut send).await,
        Request::Remove(req) => serve_remove(req, &ctx, &mut send).await,
        Request::Rename(req) => serve_rename(req, &ctx, &mut send).await,
        Request::SetMeta(req) => serve_set_meta(req, &ctx, &mut send).await,
    };
    let store_failed = matches!(
        &result,
        Err(e) if matches!(e.code, ErrorCode::Internal | ErrorCode::NoSpace)
    );
    metrics::request_done(kind, result.is_ok(), store_failed, started.elapsed());
    if let Err(err) = result {
        info!("refused: {}", err.message);
        refuse(&mut send, &mut recv, err).await;
    }
    // The request counts as done once its last answer has reached the
    // client: on shutdown the connection closes as soon as no request is in
    // flight, and a close discards whatever the peer has not acknowledged
    // (a receipt lost that way failed a put that had in fact committed).
    send.acknowledged(ANSWER_FLUSH).await;
}

/// How long a finished request waits for its answer to be acknowledged.
const ANSWER_FLUSH: Duration = Duration::from_secs(2);

/// Applies the server's policy to a put before anything is touched.
fn check_put_allowed(req: &PutRequest, config: &ServeConfig) -> Result<(), RemoteError> {
    if config.read_only {
        return Err(RemoteError::new(
            ErrorCode::ReadOnly,
            format!("'{}' was not uploaded: this server is read-only", req.path),
        ));
    }
    match config.max_file_size {
        Some(max) if req.meta.size > max => Err(RemoteError::new(
            ErrorCode::TooLarge,
            format!(
                "'{}' is {} bytes; this server accepts files of at most {max} bytes",
                req.path, req.meta.size
            ),
        )),
        _ => Ok(()),
    }
}

/// Refuses a change to the root of a read-only server: `what` says what
/// did not happen ("'a' was not created").
fn writable(config: &ServeConfig, what: impl FnOnce() -> String) -> Result<(), RemoteError> {
    if config.read_only {
        return Err(RemoteError::new(
            ErrorCode::ReadOnly,
            format!("{}: this server is read-only", what()),
        ));
    }
    Ok(())
}

/// Sends a refusal as the response header and stops the client's data.
async fn refuse(send: &mut impl SendHalf, recv: &mut impl RecvHalf, err: RemoteError) {
    let _ = write_frame(send, &Response::Refused(err)).await;
    send.finish();
    recv.stop(STOP_REFUSED);
}

fn protocol_error(e: &FrameError) -> RemoteError {
    RemoteError::new(ErrorCode::Protocol, format!("bad request: {e}"))
}

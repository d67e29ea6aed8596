//! The server: accepts connections and answers each stream's request against its root directory.
//!
//! Every connection runs in its own task and every stream in its own task
//! within it, so one client's failure (a bad header, a full disk, a dropped
//! link) ends only that stream and the server keeps serving everyone else.
//!
//! The filesystem sandbox: the root is opened once as a cap-std [`Dir`], and
//! every path a client names is resolved beneath it by cap-std (openat2 with
//! RESOLVE_BENEATH on Linux, or its own component-by-component walk with
//! O_NOFOLLOW), so neither `..` nor a symlink can lead out of the root, and
//! there is no window between checking a path and using it. Paths are also
//! validated as strings first ([`RemotePath`]) to give clear errors early.
//! Symlinks that stay inside the root are followed for get and ls; a put
//! never replaces or writes through a symlink at its destination name.
//!
//! Uploads are written into the partial store `<root>/.qxfer-partial/` under
//! random hidden names and renamed into their directory only once complete
//! and verified. Names starting with `.qxfer-` are refused by path validation
//! and hidden from listings, so temporaries are never listed, never
//! downloadable and never mistaken for (or clobbered by) user files.

use std::collections::HashMap;
use std::future::Future;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use cap_fs_ext::DirExt;
use cap_std::ambient_authority;
use cap_std::fs::{Dir, OpenOptions, OpenOptionsExt};
use quinn::{ConnectionError, RecvStream, SendStream, VarInt};
use tracing::{debug, info, info_span, warn, Instrument};

use crate::paths::{RemotePath, RESERVED_PREFIX};
use crate::protocol::{
    close, read_frame, read_frame_limited, write_frame, Continue, Digest, Entry, EntryKind,
    ErrorCode, FileMeta, FrameError, GetOffer, GetRequest, ListBatch, ListRequest, MkdirRequest,
    PutOffer, PutRequest, Receipt, RemoteError, Request, Response, Trailer, MAX_FRAME, RESUME_MIN,
};
use crate::space::{Reservation, Space};
use crate::tls::{peer_fingerprint, Fingerprint};
use crate::transfer::{
    self, blocking, file_meta, to_timestamp, Buffered, Framing, IncomingFile, Start, TransferError,
};

/// Default for [`ServeConfig::header_timeout`].
pub const DEFAULT_HEADER_TIMEOUT: Duration = Duration::from_secs(10);

/// Default for [`ServeConfig::max_connections_per_client`].
pub const DEFAULT_MAX_CONNECTIONS_PER_CLIENT: usize = 32;

/// The partial store: a hidden directory in the root holding uploads in progress.
pub const PARTIAL_DIR: &str = ".qxfer-partial";

/// How long to wait for a trailer or receipt that should follow the data at once.
/// The client's receipt for a get comes after it fsyncs a possibly large file.
const RECEIPT_TIMEOUT: Duration = Duration::from_secs(120);

/// Entries per listing frame: 128 names of at most 255 bytes, plus metadata,
/// stay well under the 64 KiB frame limit.
const LIST_BATCH: usize = 128;

/// Stream reset / stop code: the server could not finish sending the file.
pub const RESET_SOURCE_FAILED: u32 = 1;

/// Stream stop code: the receiver will not take more data (refused or failed).
pub const STOP_REFUSED: u32 = 2;

/// What the server serves, and its limits.
#[derive(Debug, Clone)]
pub struct ServeConfig {
    /// The root, as an absolute path (for messages).
    pub root: PathBuf,
    /// The root, opened: every remote path is resolved beneath this handle.
    pub root_dir: Arc<Dir>,
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
    /// Disk space reserved by uploads in flight.
    pub(crate) space: Arc<Space>,
}

/// Default for [`ServeConfig::grace`].
pub const DEFAULT_GRACE: Duration = Duration::from_secs(10);

/// Default for [`ServeConfig::partial_ttl`].
pub const DEFAULT_PARTIAL_TTL: Duration = Duration::from_secs(24 * 3600);

/// What the server has moved since it started.
#[derive(Debug, Default)]
pub struct ServeStats {
    /// File bytes received from clients (puts).
    pub bytes_received: AtomicU64,
    /// File bytes sent to clients (gets).
    pub bytes_sent: AtomicU64,
}

/// Default for [`ServeConfig::max_connections`].
pub const DEFAULT_MAX_CONNECTIONS: usize = 256;

/// Errors that stop the server from starting.
#[derive(Debug, thiserror::Error)]
pub enum StartupError {
    /// The root exists but is not a directory.
    #[error("root {0} exists but is not a directory; pass --root with a directory")]
    RootNotDir(PathBuf),
    /// The root could not be created or written to.
    #[error("root {path} is not usable: {source}; pass --root with a writable directory")]
    RootUnusable {
        /// The root.
        path: PathBuf,
        /// The OS error.
        source: io::Error,
    },
}

impl ServeConfig {
    /// Prepares `root`: creates it if missing, checks it is a writable
    /// directory, and resolves it to an absolute path.
    pub fn prepare(root: &Path) -> Result<Self, StartupError> {
        let unusable = |source| StartupError::RootUnusable {
            path: root.to_owned(),
            source,
        };
        match std::fs::metadata(root) {
            Ok(md) if !md.is_dir() => return Err(StartupError::RootNotDir(root.to_owned())),
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                std::fs::create_dir_all(root).map_err(unusable)?
            }
            Err(e) => return Err(unusable(e)),
        }
        // An unnamed temporary file proves we can create files here and leaves nothing behind.
        tempfile::tempfile_in(root).map_err(unusable)?;
        let root = std::fs::canonicalize(root).map_err(unusable)?;
        let root_dir = Dir::open_ambient_dir(&root, ambient_authority()).map_err(unusable)?;
        Ok(Self {
            root,
            root_dir: Arc::new(root_dir),
            read_only: false,
            max_file_size: None,
            max_connections: DEFAULT_MAX_CONNECTIONS,
            max_connections_per_client: DEFAULT_MAX_CONNECTIONS_PER_CLIENT,
            header_timeout: DEFAULT_HEADER_TIMEOUT,
            max_header_size: MAX_FRAME,
            partial_ttl: DEFAULT_PARTIAL_TTL,
            grace: DEFAULT_GRACE,
            stats: Arc::default(),
            space: Arc::default(),
        })
    }
}

/// Serves `endpoint` until `shutdown` completes, then stops gracefully
/// (see [`run_until`]).
pub async fn run(
    endpoint: quinn::Endpoint,
    config: ServeConfig,
    shutdown: impl Future<Output = ()>,
) {
    run_until(endpoint, config, shutdown, std::future::pending()).await
}

/// Serves `endpoint` until `shutdown` completes, then stops gracefully: no
/// new connection is admitted and no new request started (they are
/// refused, and clients retry elsewhere or later), requests in flight get
/// up to [`ServeConfig::grace`] to finish, and then every connection is
/// closed with [`close::SHUTTING_DOWN`], which clients report as "the
/// server is shutting down". `stop_now` (a second Ctrl-C) cuts the grace
/// short. Interrupted uploads keep their partials either way.
pub async fn run_until(
    endpoint: quinn::Endpoint,
    config: ServeConfig,
    shutdown: impl Future<Output = ()>,
    stop_now: impl Future<Output = ()>,
) {
    let slots = Arc::new(tokio::sync::Semaphore::new(config.max_connections));
    let per_client: PerClient = Arc::default();
    let partials: Arc<Partials> = Arc::default();
    let config = Arc::new(config);
    let sweeper = tokio::spawn(sweep_partials_forever(config.clone(), partials.clone()));
    let handshaking = Arc::new(AtomicUsize::new(0));
    let activity = Activity::default();
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
        if !incoming.remote_address_validated()
            && handshaking.load(Ordering::Relaxed) >= RETRY_ABOVE_HANDSHAKES
        {
            let _ = incoming.retry();
            continue;
        }
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            warn!(remote = %incoming.remote_address(), "connection refused: {} connections already open (--max-connections)", config.max_connections);
            incoming.refuse();
            continue;
        };
        let span = info_span!("conn", remote = %incoming.remote_address());
        let (config, per_client, partials) = (config.clone(), per_client.clone(), partials.clone());
        let handshake = Handshaking::start(&handshaking);
        let activity = activity.clone();
        let all = slots.clone();
        tokio::spawn(
            async move {
                let max = config.max_connections;
                handle_connection(incoming, handshake, config, per_client, partials, activity)
                    .await;
                drop(slot);
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
                incoming.refuse();
            }
        }
    });
    let mut requests = activity.requests.subscribe();
    tokio::select! {
        _ = requests.wait_for(|n| *n == 0) => {}
        _ = tokio::time::sleep(config.grace) => {
            warn!("{} request(s) still running after {:?}; closing them (uploads keep their partials for a resume)", *activity.requests.borrow(), config.grace);
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
    endpoint.close(
        VarInt::from_u32(close::SHUTTING_DOWN),
        b"server shutting down",
    );
    // Let the close frames go out; never hang on a peer that vanished.
    let _ = tokio::time::timeout(Duration::from_secs(2), endpoint.wait_idle()).await;
}

/// Hands memory freed during a burst back to the system once the last
/// connection has gone. glibc's allocator keeps what a busy server freed (a
/// load of 16 clients left 236 MiB resident with nothing running, against
/// 12 MiB at start); `malloc_trim` returns the free pages of every arena.
async fn release_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        // SAFETY: malloc_trim only walks the allocator's own free lists.
        let _ = tokio::task::spawn_blocking(|| unsafe { libc::malloc_trim(0) }).await;
    }
}

/// What graceful shutdown watches: whether the server is draining, and how
/// many requests are in flight.
#[derive(Clone, Default)]
struct Activity {
    draining: Arc<tokio::sync::watch::Sender<bool>>,
    requests: Arc<tokio::sync::watch::Sender<usize>>,
}

/// Counts one request in flight until dropped.
struct InFlight(Arc<tokio::sync::watch::Sender<usize>>);

impl InFlight {
    fn start(requests: &Arc<tokio::sync::watch::Sender<usize>>) -> Self {
        requests.send_modify(|n| *n += 1);
        Self(requests.clone())
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.send_modify(|n| *n -= 1);
    }
}

/// Handshakes in progress above which new addresses must pass a stateless
/// retry first. Legitimate clients rarely overlap this many handshakes;
/// a flood of spoofed ones reaches it at once and then stalls.
const RETRY_ABOVE_HANDSHAKES: usize = 16;

/// Counts one handshake in progress until dropped.
struct Handshaking(Arc<AtomicUsize>);

impl Handshaking {
    fn start(count: &Arc<AtomicUsize>) -> Self {
        count.fetch_add(1, Ordering::Relaxed);
        Self(count.clone())
    }
}

impl Drop for Handshaking {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Open connections per client identity.
type PerClient = Arc<Mutex<HashMap<Fingerprint, usize>>>;

/// Holds one of a client's connection slots; frees it when dropped.
struct ClientSlot {
    fp: Fingerprint,
    counts: PerClient,
}

impl ClientSlot {
    /// Takes a slot for `fp`, or `None` if it already holds `max`.
    fn take(counts: &PerClient, fp: Fingerprint, max: usize) -> Option<Self> {
        let mut map = counts.lock().unwrap_or_else(|e| e.into_inner());
        let n = map.entry(fp).or_insert(0);
        if *n >= max {
            return None;
        }
        *n += 1;
        Some(Self {
            fp,
            counts: counts.clone(),
        })
    }
}

impl Drop for ClientSlot {
    fn drop(&mut self) {
        let mut map = self.counts.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(n) = map.get_mut(&self.fp) {
            *n -= 1;
            if *n == 0 {
                map.remove(&self.fp);
            }
        }
    }
}

async fn handle_connection(
    incoming: quinn::Incoming,
    handshake: Handshaking,
    config: Arc<ServeConfig>,
    per_client: PerClient,
    partials: Arc<Partials>,
    activity: Activity,
) {
    // Awaiting the full handshake (never `into_0rtt`) means no request is
    // read before the client has proven its identity: 0-RTT never starts a put.
    let established = incoming.await;
    drop(handshake);
    let conn = match established {
        Ok(conn) => conn,
        Err(e) => {
            info!("handshake failed: {e}");
            return;
        }
    };
    let Some(fp) = peer_fingerprint(&conn) else {
        // The verifier makes a certificate mandatory; this is defence in depth.
        warn!("connection without a client certificate; closing");
        conn.close(
            VarInt::from_u32(close::DONE),
            b"client certificate required",
        );
        return;
    };
    let Some(_slot) = ClientSlot::take(&per_client, fp, config.max_connections_per_client) else {
        warn!(client = %fp, "connection refused: this client already has {} connections open (--max-connections-per-client)", config.max_connections_per_client);
        conn.close(
            VarInt::from_u32(close::TOO_MANY_FROM_CLIENT),
            b"too many connections from this client",
        );
        return;
    };
    info!(client = %fp, "connected");
    crate::endpoint::tune_receive_window(conn.clone());
    let mut draining = activity.draining.subscribe();
    loop {
        let accepted = tokio::select! {
            biased;
            _ = async { draining.wait_for(|d| *d).await.is_ok() } => {
                // No new requests: streams opened from now on are reset with
                // the shutdown code (the client retries them after
                // reconnecting); the connection closes once those in flight end.
                loop {
                    match conn.accept_bi().await {
                        Ok((mut send, mut recv)) => {
                            let code = VarInt::from_u32(close::SHUTTING_DOWN);
                            let _ = send.reset(code);
                            let _ = recv.stop(code);
                        }
                        Err(_) => return,
                    }
                }
            }
            accepted = conn.accept_bi() => accepted,
        };
        match accepted {
            Ok((send, recv)) => {
                let in_flight = InFlight::start(&activity.requests);
                let span = info_span!("stream", id = %send.id());
                let ctx = Ctx {
                    config: config.clone(),
                    client: fp,
                    partials: partials.clone(),
                    conn: conn.clone(),
                };
                tokio::spawn(
                    async move {
                        handle_stream(send, recv, ctx).await;
                        drop(in_flight);
                    }
                    .instrument(span),
                );
            }
            Err(ConnectionError::ApplicationClosed(_)) => {
                info!("disconnected");
                break;
            }
            Err(e) => {
                info!("connection ended: {e}");
                break;
            }
        }
    }
}

/// What a stream's handler needs besides the stream.
struct Ctx {
    config: Arc<ServeConfig>,
    /// The client identity this connection was admitted with.
    client: Fingerprint,
    partials: Arc<Partials>,
    /// The connection, for its path estimate (whether to compress a get).
    conn: quinn::Connection,
}

async fn handle_stream(mut send: SendStream, mut recv: RecvStream, ctx: Ctx) {
    let config = ctx.config.clone();
    let limit = config.max_header_size;
    let timeout = config.header_timeout;
    let request =
        match tokio::time::timeout(timeout, read_frame_limited::<_, Request>(&mut recv, limit))
            .await
        {
            Ok(Ok(req)) => req,
            Ok(Err(e)) => {
                warn!("bad request header: {e}");
                return refuse(&mut send, &mut recv, protocol_error(&e)).await;
            }
            Err(_) => {
                warn!("no request header within {timeout:?}");
                let err = RemoteError::new(
                    ErrorCode::Protocol,
                    format!(
                        "no request arrived within {} s of opening the stream",
                        timeout.as_secs_f64()
                    ),
                );
                return refuse(&mut send, &mut recv, err).await;
            }
        };
    debug!(?request, "request");
    let root = config.root_dir.clone();
    let result = match request {
        Request::Put(req) => match check_put_allowed(&req, &config) {
            Ok(()) => serve_put(req, &ctx, &mut send, &mut recv).await,
            Err(e) => Err(e),
        },
        Request::Get(req) => serve_get(req, &ctx, &mut send, &mut recv).await,
        Request::List(req) => serve_list(req, root, &mut send).await,
        Request::Mkdir(req) => serve_mkdir(req, &config, &mut send).await,
    };
    if let Err(err) = result {
        info!("refused: {}", err.message);
        refuse(&mut send, &mut recv, err).await;
    }
}

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

/// Sends a refusal as the response header and stops the client's data.
async fn refuse(send: &mut SendStream, recv: &mut RecvStream, err: RemoteError) {
    let _ = write_frame(send, &Response::Refused(err)).await;
    let _ = send.finish();
    let _ = recv.stop(VarInt::from_u32(STOP_REFUSED));
}

fn protocol_error(e: &FrameError) -> RemoteError {
    RemoteError::new(ErrorCode::Protocol, format!("bad request: {e}"))
}

/// Which resumable partials are being written, so that only one upload
/// writes a partial at a time, and a newer one takes over from an older one
/// (a client that was killed and reruns the same put before the server has
/// noticed the old connection is gone).
#[derive(Debug, Default)]
struct Partials {
    slots: Mutex<HashMap<String, Arc<PartialSlot>>>,
}

#[derive(Debug)]
struct PartialSlot {
    lock: Arc<tokio::sync::Mutex<()>>,
    /// Bumped by each new claimant; the holder stops when it changes.
    generation: tokio::sync::watch::Sender<u64>,
}

/// The right to write one partial, until dropped.
struct PartialLease {
    _guard: tokio::sync::OwnedMutexGuard<()>,
    slot: Arc<PartialSlot>,
    generation: u64,
    watch: tokio::sync::watch::Receiver<u64>,
    name: String,
    partials: Arc<Partials>,
}

/// How long a newer upload waits for an older one of the same partial to stop.
const TAKEOVER_TIMEOUT: Duration = Duration::from_secs(10);

impl Partials {
    /// Claims `name`, telling any current holder to stop and waiting for it.
    async fn acquire(self: &Arc<Self>, name: &str) -> Option<PartialLease> {
        let slot = {
            let mut slots = self.slots.lock().unwrap_or_else(|e| e.into_inner());
            slots
                .entry(name.to_owned())
                .or_insert_with(|| {
                    Arc::new(PartialSlot {
                        lock: Arc::default(),
                        generation: tokio::sync::watch::Sender::new(0),
                    })
                })
                .clone()
        };
        let mut generation = 0;
        slot.generation.send_modify(|g| {
            *g += 1;
            generation = *g;
        });
        let watch = slot.generation.subscribe();
        let guard = tokio::time::timeout(TAKEOVER_TIMEOUT, slot.lock.clone().lock_owned())
            .await
            .ok()?;
        Some(PartialLease {
            _guard: guard,
            slot,
            generation,
            watch,
            name: name.to_owned(),
            partials: self.clone(),
        })
    }

    /// Whether an upload is writing `name` now.
    fn in_use(&self, name: &str) -> bool {
        let slots = self.slots.lock().unwrap_or_else(|e| e.into_inner());
        slots
            .get(name)
            .is_some_and(|slot| slot.lock.try_lock().is_err())
    }
}

impl PartialLease {
    /// Completes when a newer upload of the same partial wants it.
    async fn superseded(&mut self) {
        let mine = self.generation;
        let _ = self.watch.wait_for(|g| *g != mine).await;
    }
}

impl Drop for PartialLease {
    fn drop(&mut self) {
        let mut slots = self
            .partials
            .slots
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        // Only the map and this lease hold the slot: nobody is waiting.
        if Arc::strong_count(&self.slot) == 2 {
            slots.remove(&self.name);
        }
    }
}

/// Deletes what interrupted uploads left in the partial store once it is
/// older than `--partial-ttl`: at start, then every hour (or every TTL, if shorter).
async fn sweep_partials_forever(config: Arc<ServeConfig>, partials: Arc<Partials>) {
    let every = config.partial_ttl.min(Duration::from_secs(3600));
    loop {
        let (c, p) = (config.clone(), partials.clone());
        match blocking(move || sweep_partials(&c.root_dir, c.partial_ttl, &p)).await {
            Ok(0) => {}
            Ok(n) => info!(
                "removed {n} stale partial upload(s) older than {:?}",
                config.partial_ttl
            ),
            Err(e) => warn!("cannot clean the partial store: {e}"),
        }
        tokio::time::sleep(every).await;
    }
}

fn sweep_partials(root: &Dir, ttl: Duration, partials: &Partials) -> io::Result<usize> {
    let store = match root.open_dir_nofollow(PARTIAL_DIR) {
        Ok(d) => d,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(0),
        Err(e) => return Err(e),
    };
    let now = SystemTime::now();
    let mut removed = 0;
    for entry in store.entries()?.flatten() {
        let name = entry.file_name();
        let name = name.to_string_lossy();
        let Ok(md) = store.symlink_metadata(&*name) else {
            continue;
        };
        let age = md
            .modified()
            .ok()
            .and_then(|m| now.duration_since(m.into_std()).ok())
            .unwrap_or_default();
        if age > ttl
            && !partials.in_use(&name)
            && !(md.is_file() && transfer::is_being_written(&store, &name))
            && store.remove_file(&*name).is_ok()
        {
            removed += 1;
        }
    }
    Ok(removed)
}

/// Whether cap-std refused to resolve a path because it would leave the
/// root. It reports that as PermissionDenied without an OS error number,
/// which a real EACCES always has.
fn is_escape(e: &io::Error) -> bool {
    e.kind() == io::ErrorKind::PermissionDenied && e.raw_os_error().is_none()
}

/// Turns a filesystem error on `path` into what the client is told.
fn fs_error(e: &io::Error, path: &RemotePath, doing: &str) -> RemoteError {
    if is_escape(e) {
        return RemoteError::new(
            ErrorCode::OutsideRoot,
            format!("{doing} '{path}' on the server: it leads outside the served directory (through a symbolic link), which the server never follows"),
        );
    }
    if e.raw_os_error() == Some(libc::EXDEV) {
        return RemoteError::new(
            ErrorCode::Internal,
            format!("{doing} '{path}' on the server: its directory is on another filesystem than the served root (a mount point inside the root), where uploads cannot be placed; choose another directory"),
        );
    }
    if e.raw_os_error() == Some(libc::ELOOP) {
        return RemoteError::new(
            ErrorCode::Symlink,
            format!("{doing} '{path}' on the server: too many levels of symbolic links"),
        );
    }
    let (code, advice) = match e.kind() {
        io::ErrorKind::NotFound => (ErrorCode::NotFound, "check the name with `qxfer ls`"),
        io::ErrorKind::PermissionDenied => (
            ErrorCode::PermissionDenied,
            "the server's user may not access it; ask its operator",
        ),
        io::ErrorKind::IsADirectory => (ErrorCode::IsDirectory, "name a file, not a directory"),
        io::ErrorKind::NotADirectory => (
            ErrorCode::NotDirectory,
            "a parent of this path is a file, not a directory",
        ),
        io::ErrorKind::AlreadyExists => (ErrorCode::AlreadyExists, "use --force to overwrite"),
        _ if transfer::is_disk_full(e) => (
            ErrorCode::NoSpace,
            "the server's disk is full; free space there and retry",
        ),
        _ => (ErrorCode::Internal, "see the server's log"),
    };
    RemoteError::new(
        code,
        format!("{doing} '{path}' on the server: {e}; {advice}"),
    )
}

async fn serve_put(
    req: PutRequest,
    ctx: &Ctx,
    send: &mut SendStream,
    recv: &mut RecvStream,
) -> Result<(), RemoteError> {
    let path = RemotePath::parse(&req.path, false)?;
    if !req.resume && req.meta.size < WHOLE_PUT_MAX {
        let units = req.meta.size.div_ceil(WHOLE_UNIT).max(1) as u32;
        if let Ok(budget) = WHOLE_PUT_BUDGET.try_acquire_many(units) {
            let result = serve_whole_put(&req, &path, ctx, send, recv).await;
            drop(budget);
            return result;
        }
    }
    // Large files go to a partial keyed by who sends which version of what,
    // kept if the upload is interrupted; only one upload may write it at a
    // time, and a newer one (the client retrying) takes over from an older.
    let keyed = req.meta.size >= RESUME_MIN;
    let mut lease = None;
    let partial = if keyed {
        let name = partial_name(&ctx.client, &path, &req.meta);
        lease = Some(ctx.partials.acquire(&name).await.ok_or_else(|| {
            RemoteError::new(
                ErrorCode::Protocol,
                format!("'{path}' is already being uploaded by this client and that upload did not stop; try again shortly"),
            )
        })?);
        Some(name)
    } else {
        None
    };
    let root = ctx.config.root_dir.clone();
    let (p, force, meta, resume) = (path.clone(), req.force, req.meta, req.resume);
    let space = ctx.config.space.clone();
    let prepared =
        blocking(move || prepare_put(&root, &p, force, &meta, partial.as_deref(), resume, &space))
            .await?;
    let Some((incoming, start, reserved)) = answer_put(prepared, &path, send, recv).await? else {
        return Ok(());
    };
    if start.offset > 0 {
        info!(path = %path, offset = start.offset, "offering to resume");
    }

    let stop = async {
        match lease.as_mut() {
            Some(l) => l.superseded().await,
            None => std::future::pending().await,
        }
    };
    let upload = Upload {
        incoming,
        start,
        reserved,
    };
    let receipt = match receive_put(&req, &path, upload, recv, ctx, stop).await {
        Ok(receipt) => {
            info!(path = %path, bytes = req.meta.size, "put committed");
            receipt
        }
        Err(err) => {
            info!(path = %path, "put failed: {}", err.message);
            let _ = recv.stop(VarInt::from_u32(STOP_REFUSED));
            Receipt::Failed(err)
        }
    };
    drop(lease);
    let _ = write_frame(send, &receipt).await;
    let _ = send.finish();
    Ok(())
}

/// Uploads smaller than this are read whole into memory before any disk
/// work, then created, written and committed in one call to the disk pool:
/// a small file's three trips there (and the task switches around each)
/// cost more than its bytes. Larger ones stream to disk as they arrive.
const WHOLE_PUT_MAX: u64 = 256 * 1024;

/// Memory all connections together may hold in whole uploads (in units of
/// [`WHOLE_UNIT`]); past it, uploads stream instead. A client that sends
/// slowly holds its share for at most [`RECEIPT_TIMEOUT`].
static WHOLE_PUT_BUDGET: tokio::sync::Semaphore =
    tokio::sync::Semaphore::const_new((64 << 20) / WHOLE_UNIT as usize);
const WHOLE_UNIT: u64 = 4096;

/// A small pipelined upload, read whole before its one trip to the disk:
/// the checks and the creation of its temporary file come first (and the
/// answer goes back at once, as for any put), then the data and trailer are
/// read into memory, and writing, comparing the digest and committing
/// happen together in one blocking call instead of two, with no task in
/// between.
async fn serve_whole_put(
    req: &PutRequest,
    path: &RemotePath,
    ctx: &Ctx,
    send: &mut SendStream,
    recv: &mut RecvStream,
) -> Result<(), RemoteError> {
    let size = req.meta.size;
    let root = ctx.config.root_dir.clone();
    let (p, force, meta) = (path.clone(), req.force, req.meta);
    let space = ctx.config.space.clone();
    let prepared =
        blocking(move || prepare_put(&root, &p, force, &meta, None, false, &space)).await?;
    // The reservation is held until the commit, however this ends.
    let Some((incoming, _, _reserved)) = answer_put(prepared, path, send, recv).await? else {
        return Ok(());
    };
    let received = async {
        let data = tokio::time::timeout(RECEIPT_TIMEOUT, Buffered::read(recv, size, req.encoding))
            .await
            .map_err(|_| {
                RemoteError::new(
                    ErrorCode::Protocol,
                    format!("'{path}': the data did not arrive within {RECEIPT_TIMEOUT:?}"),
                )
            })?
            .map_err(|e| receive_error(e, path))?;
        let trailer = read_trailer(recv, path).await?;
        ctx.config
            .stats
            .bytes_received
            .fetch_add(size, Ordering::Relaxed);
        let (p, meta) = (path.clone(), req.meta);
        blocking(move || -> Result<Digest, RemoteError> {
            let mut file = incoming
                .file()
                .map_err(|e| fs_error(&e, &p, "cannot write"))?;
            let digest = data.write_to(&mut file).map_err(|e| receive_error(e, &p))?;
            if digest != trailer.digest {
                return Err(corrupt(&p));
            }
            incoming
                .commit(&meta, force)
                .map_err(|e| commit_error(e, &p))?;
            Ok(digest)
        })
        .await
    };
    let receipt = match received.await {
        Ok(digest) => {
            info!(path = %path, bytes = size, "put committed");
            Receipt::Committed { size, digest }
        }
        Err(err) => {
            info!(path = %path, "put failed: {}", err.message);
            let _ = recv.stop(VarInt::from_u32(STOP_REFUSED));
            Receipt::Failed(err)
        }
    };
    let _ = write_frame(send, &receipt).await;
    let _ = send.finish();
    Ok(())
}

/// Answers a prepared put: `PutAccepted` with what the server holds of it
/// (and the upload's file and start to receive into), or, if the same file
/// is already there, `AlreadyThere` and no more (None).
async fn answer_put(
    prepared: Prepared,
    path: &RemotePath,
    send: &mut SendStream,
    recv: &mut RecvStream,
) -> Result<Option<(IncomingFile, Start, Reservation)>, RemoteError> {
    let (incoming, start, discarded_stale, reserved) = match prepared {
        Prepared::Receive(incoming, start, discarded, reserved) => {
            (incoming, *start, discarded, reserved)
        }
        Prepared::Present(digest) => {
            info!(path = %path, "already there (same size and mtime); nothing to receive");
            let _ = write_frame(send, &Response::AlreadyThere(digest)).await;
            let _ = send.finish();
            let _ = recv.stop(VarInt::from_u32(STOP_REFUSED));
            return Ok(None);
        }
    };
    let offer = PutOffer {
        offset: start.offset,
        prefix: start.prefix_digest(),
        discarded_stale,
    };
    write_frame(send, &Response::PutAccepted(offer))
        .await
        .map_err(|e| protocol_error(&e))?;
    Ok(Some((incoming, start, reserved)))
}

/// The error for data that did not arrive as it should.
fn receive_error(e: TransferError, path: &RemotePath) -> RemoteError {
    match e {
        TransferError::Write(ref io) => fs_error(io, path, "cannot write"),
        other => RemoteError::new(ErrorCode::Protocol, format!("receiving '{path}': {other}")),
    }
}

/// The error for data whose BLAKE3 is not the sender's.
fn corrupt(path: &RemotePath) -> RemoteError {
    RemoteError::new(
        ErrorCode::Corrupt,
        format!("'{path}' arrived corrupted (BLAKE3 mismatch) and was discarded; send it again"),
    )
}

/// The error for a commit that failed.
fn commit_error(e: transfer::CommitError, path: &RemotePath) -> RemoteError {
    match e {
        transfer::CommitError::Exists(_) => RemoteError::new(
            ErrorCode::AlreadyExists,
            format!(
                "'{path}' was created on the server during the upload; use --force to overwrite it"
            ),
        ),
        transfer::CommitError::Io { source, .. } => fs_error(&source, path, "cannot commit"),
    }
}

/// How long the client may take to answer a resume offer: it hashes the
/// offered prefix of its file first, so allow for a slow disk (50 MiB/s)
/// on top of the usual two minutes.
fn continue_timeout(offset: u64) -> Duration {
    RECEIPT_TIMEOUT + Duration::from_secs(offset / (50 << 20))
}

/// The partial store name for an upload: a digest of the client identity
/// and remote path, then one of the source's size and mtime. The first part
/// finds earlier versions of the same upload; the second tells them apart.
fn partial_name(client: &Fingerprint, path: &RemotePath, meta: &FileMeta) -> String {
    let mut who = blake3::Hasher::new();
    who.update(client.as_bytes());
    who.update(path.to_string().as_bytes());
    let mut version = blake3::Hasher::new();
    version.update(&meta.size.to_le_bytes());
    if let Some(t) = meta.mtime {
        version.update(&t.secs.to_le_bytes());
        version.update(&t.nanos.to_le_bytes());
    }
    format!(
        "{}{}-{}",
        PART_PREFIX,
        &who.finalize().to_hex()[..32],
        &version.finalize().to_hex()[..16]
    )
}

/// Prefix of resumable partials in the partial store.
const PART_PREFIX: &str = "part-";

/// What a put will do.
enum Prepared {
    /// Receive into this file from this start; whether a stale partial
    /// went; the disk space held for it.
    Receive(IncomingFile, Box<Start>, bool, Reservation),
    /// The file is already there (same size and mtime); its BLAKE3.
    Present(Digest),
}

/// Checks the destination, the free space, and creates the temporary for a
/// put. The destination's directory is opened here, beneath the root, and
/// the commit renames into that handle: swapping a directory on the path for
/// a symlink while the upload runs cannot move where the file lands.
fn prepare_put(
    root: &Dir,
    path: &RemotePath,
    force: bool,
    meta: &FileMeta,
    partial: Option<&str>,
    resume: bool,
    space: &Arc<Space>,
) -> Result<Prepared, RemoteError> {
    let (size, meta_mtime) = (meta.size, meta.mtime);
    let name = path.file_name().expect("a put path is never the root");
    let dest_dir = match path.parent() {
        Some(parent) => open_or_create_dir(root, &parent, path)?,
        None => root
            .try_clone()
            .map_err(|e| fs_error(&e, path, "cannot open the directory for"))?,
    };
    match dest_dir.symlink_metadata(name) {
        Ok(md) if md.is_dir() => {
            return Err(RemoteError::new(
                ErrorCode::IsDirectory,
                format!("'{path}' is a directory on the server; choose another name or --to"),
            ))
        }
        Ok(md) if md.file_type().is_symlink() => {
            return Err(RemoteError::new(
                ErrorCode::Symlink,
                format!("'{path}' is a symbolic link on the server; uploads never replace or write through links, so choose another name"),
            ))
        }
        Ok(md) if !force => {
            // The same size and mtime: most likely this very file, from an
            // earlier run of the same command. Let the client check the
            // contents instead of failing.
            let same = md.is_file()
                && md.len() == size
                && meta_mtime.is_some()
                && md.modified().ok().and_then(|t| to_timestamp(t.into_std())) == meta_mtime;
            if same {
                let digest = dest_dir
                    .open(name)
                    .and_then(|f| transfer::file_digest(&mut f.into_std()))
                    .map_err(|e| fs_error(&e, path, "cannot read"))?;
                return Ok(Prepared::Present(digest));
            }
            return Err(RemoteError::new(
                ErrorCode::AlreadyExists,
                format!("'{path}' already exists on the server; use --force to overwrite it"),
            ));
        }
        Ok(_) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(fs_error(&e, path, "cannot check")),
    }
    let creating = |e: io::Error| fs_error(&e, path, "cannot create the upload of");
    let label = PathBuf::from(path.to_string());
    let Some(partial) = partial else {
        // Not resumable: an anonymous temporary in the destination directory
        // where the system allows, else a named one in the partial store.
        let reserved = reserve_space(space, &dest_dir, size, path)?;
        let anonymous = IncomingFile::create_anonymous(
            dest_dir.try_clone().map_err(creating)?,
            name,
            label.clone(),
        )
        .map_err(|e| fs_error(&e, path, "cannot create"))?;
        let incoming = match anonymous {
            Some(incoming) => incoming,
            None => {
                let store = partial_store(root).map_err(creating)?;
                IncomingFile::create_in(store, dest_dir, name, label)
                    .map_err(|e| fs_error(&e, path, "cannot create"))?
            }
        };
        return Ok(Prepared::Receive(incoming, Box::default(), false, reserved));
    };
    let store = partial_store(root).map_err(creating)?;
    // Partials of other versions of this upload (the source changed) go.
    let (same_upload, _) = partial
        .rsplit_once('-')
        .expect("partial names have a version");
    let mut discarded_stale = false;
    for entry in store.entries().map_err(creating)?.flatten() {
        let other = entry.file_name();
        let other = other.to_string_lossy();
        if other.starts_with(same_upload) && other != partial {
            discarded_stale |= store.remove_file(&*other).is_ok();
        }
    }
    let store_fs = store.try_clone().map_err(creating)?;
    let incoming = IncomingFile::open_partial(store, partial, dest_dir, name, label)
        .map_err(|e| fs_error(&e, path, "cannot open the partial upload of"))?;
    let held = incoming.held().map_err(creating)?;
    let start = if resume && held > 0 && held <= size {
        incoming.prefix(held)
    } else {
        incoming.restart()
    }
    .map_err(creating)?;
    let reserved = reserve_space(space, &store_fs, size - start.offset, path)?;
    Ok(Prepared::Receive(
        incoming,
        Box::new(start),
        discarded_stale,
        reserved,
    ))
}

/// Opens the directory `dir` beneath the root, creating it and its parents
/// if missing. Errors name the real reason: a link out of the root, or a
/// file where a directory should be.
fn open_or_create_dir(root: &Dir, dir: &Path, path: &RemotePath) -> Result<Dir, RemoteError> {
    let open_error = |e: io::Error| fs_error(&e, path, "cannot open the directory for");
    match root.open_dir(dir) {
        Ok(d) => return Ok(d),
        Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(open_error(e)),
        Err(_) => {}
    }
    if let Err(e) = root.create_dir_all(dir) {
        // Creating failed: opening again says why (an escape, a file in the way).
        return Err(match root.open_dir(dir) {
            Err(open) if is_escape(&open) => open_error(open),
            _ if e.kind() == io::ErrorKind::AlreadyExists => RemoteError::new(
                ErrorCode::NotDirectory,
                format!("cannot create the directory for '{path}' on the server: a parent of this path is a file or a link, not a directory"),
            ),
            _ => fs_error(&e, path, "cannot create the directory for"),
        });
    }
    root.open_dir(dir).map_err(open_error)
}

/// Opens (creating it, mode 0700, if needed) the partial store in the root.
/// It must be a real directory: a symlink there is refused, not followed.
fn partial_store(root: &Dir) -> io::Result<Dir> {
    let mut builder = cap_std::fs::DirBuilder::new();
    cap_std::fs::DirBuilderExt::mode(&mut builder, 0o700);
    match root.create_dir_with(PARTIAL_DIR, &builder) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(e),
    }
    root.open_dir_nofollow(PARTIAL_DIR)
}

/// Refuses a put that cannot fit, before any byte is written: the space
/// available to the server's user (statvfs f_bavail), less what uploads in
/// flight will still write, must hold what this one will write.
fn reserve_space(
    space: &Arc<Space>,
    dir: &Dir,
    size: u64,
    path: &RemotePath,
) -> Result<Reservation, RemoteError> {
    space.reserve(dir, size).map_err(|no| {
        RemoteError::new(
            ErrorCode::NoSpace,
            format!(
                "'{path}' needs {} bytes but the server has only {} bytes free (uploads in flight included); free space there and retry",
                no.needed, no.free
            ),
        )
    })
}

/// An accepted upload: where it goes, where its data starts, the disk space held for it.
struct Upload {
    incoming: IncomingFile,
    start: Start,
    reserved: Reservation,
}

async fn receive_put(
    req: &PutRequest,
    path: &RemotePath,
    upload: Upload,
    recv: &mut RecvStream,
    ctx: &Ctx,
    stop: impl Future<Output = ()>,
) -> Result<Receipt, RemoteError> {
    let writing = |e: io::Error| fs_error(&e, path, "cannot write");
    let Upload {
        incoming,
        mut start,
        reserved,
    } = upload;
    if req.resume {
        // The client has compared prefixes and says where its data starts.
        let answer = tokio::time::timeout(
            continue_timeout(start.offset),
            read_frame::<_, Continue>(recv),
        )
        .await
        .map_err(|_| RemoteError::new(ErrorCode::Protocol, "no answer to the resume offer"))?
        .map_err(|e| protocol_error(&e))?;
        if answer.offset != start.offset {
            if answer.offset != 0 {
                return Err(RemoteError::new(
                    ErrorCode::Protocol,
                    format!(
                        "'{path}': the client continued at {} instead of {} or 0",
                        answer.offset, start.offset
                    ),
                ));
            }
            info!(path = %path, "the client's data differs from the partial upload; starting over");
            start = incoming.restart().map_err(writing)?;
        }
    }
    let file = incoming.file().map_err(writing)?;
    let stats = &ctx.config.stats;
    let received = transfer::receive_file(
        recv,
        req.meta.size,
        file,
        start,
        req.encoding,
        None,
        &|n| {
            stats.bytes_received.fetch_add(n, Ordering::Relaxed);
            reserved.wrote(n);
        },
        stop,
    )
    .await;
    let digest = match received {
        Ok(digest) => digest,
        Err(e) => {
            // What a full disk cut short is not kept for a resume: its bytes
            // are the space the next upload (or this one's retry) needs.
            if matches!(&e, TransferError::Write(io) if transfer::is_disk_full(io)) {
                incoming.discard();
            }
            return Err(receive_error(e, path));
        }
    };
    let trailer: Trailer = read_trailer(recv, path).await?;
    if trailer.digest != digest {
        // Never resume from bytes known to be bad.
        incoming.discard();
        return Err(corrupt(path));
    }
    let meta = req.meta;
    let force = req.force;
    let p = path.clone();
    blocking(move || incoming.commit(&meta, force))
        .await
        .map_err(|e| commit_error(e, &p))?;
    Ok(Receipt::Committed {
        size: req.meta.size,
        digest,
    })
}

/// Reads the trailer and checks the stream ends right after it: bytes beyond
/// the declared size are an error, not silently dropped.
async fn read_trailer(recv: &mut RecvStream, path: &RemotePath) -> Result<Trailer, RemoteError> {
    let mismatch = |e: FrameError| {
        RemoteError::new(
            ErrorCode::Corrupt,
            format!("'{path}': the data did not match its declared size ({e}); nothing was saved"),
        )
    };
    let trailer = tokio::time::timeout(RECEIPT_TIMEOUT, read_frame::<_, Trailer>(recv))
        .await
        .map_err(|_| RemoteError::new(ErrorCode::Protocol, "no trailer after the data"))?
        .map_err(mismatch)?;
    let mut extra = [0u8; 1];
    match recv.read(&mut extra).await {
        Ok(None) | Ok(Some(0)) => Ok(trailer),
        Ok(Some(_)) => Err(RemoteError::new(
            ErrorCode::Corrupt,
            format!("'{path}': more data arrived than declared; nothing was saved"),
        )),
        Err(e) => Err(RemoteError::new(ErrorCode::Protocol, e.to_string())),
    }
}

async fn serve_get(
    req: GetRequest,
    ctx: &Ctx,
    send: &mut SendStream,
    recv: &mut RecvStream,
) -> Result<(), RemoteError> {
    let root = ctx.config.root_dir.clone();
    let stats = &ctx.config.stats;
    let path = RemotePath::parse(&req.path, false)?;
    let p = path.clone();
    let (file, meta, start) = blocking(move || -> Result<_, RemoteError> {
        // O_NONBLOCK: opening a FIFO someone left in the root must not hang
        // this task; it is refused below as not a regular file.
        let mut opts = OpenOptions::new();
        opts.read(true)
            .custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY);
        let file = root
            .open_with(p.relative(), &opts)
            .map_err(|e| fs_error(&e, &p, "cannot open"))?
            .into_std();
        let md = file
            .metadata()
            .map_err(|e| fs_error(&e, &p, "cannot read"))?;
        if md.is_dir() {
            return Err(RemoteError::new(
                ErrorCode::IsDirectory,
                format!("'{p}' is a directory on the server; use `qxfer get -r {p}` to download it and its contents"),
            ));
        }
        if !md.is_file() {
            return Err(RemoteError::new(
                ErrorCode::NotFound,
                format!("'{p}' is not a regular file on the server"),
            ));
        }
        let meta = file_meta(&md);
        // The client holds a prefix: continue after it if ours hashes the
        // same (the file is unchanged there), else start over.
        let mut file = file;
        let start = match req.resume {
            Some(prefix) => {
                transfer::matching_start(&mut file, meta.size, prefix.offset, &prefix.digest)
                    .map_err(|e| fs_error(&e, &p, "cannot read"))?
            }
            None => Start::default(),
        };
        Ok((file, meta, start))
    })
    .await?;
    let framing = Framing::for_sending(req.compression, &ctx.conn);
    let offer = GetOffer {
        meta,
        offset: start.offset,
        encoding: framing.encoding,
    };
    write_frame(send, &Response::GetAccepted(offer))
        .await
        .map_err(|e| protocol_error(&e))?;
    let counted = |n| {
        stats.bytes_sent.fetch_add(n, Ordering::Relaxed);
    };
    let digest =
        match transfer::send_file(file, meta.size, start, framing, None, send, &counted).await {
            Ok(d) => d,
            Err(e) => {
                // The client sees the reset and reports the transfer failed.
                warn!(path = %path, "get failed: {e}");
                let _ = send.reset(VarInt::from_u32(RESET_SOURCE_FAILED));
                return Ok(());
            }
        };
    if write_frame(send, &Trailer { digest }).await.is_err() || send.finish().is_err() {
        info!(path = %path, "get aborted by the client");
        return Ok(());
    }
    match tokio::time::timeout(RECEIPT_TIMEOUT, read_frame::<_, Receipt>(recv)).await {
        Ok(Ok(Receipt::Committed { .. })) => {
            info!(path = %path, bytes = meta.size, "get completed")
        }
        Ok(Ok(Receipt::Failed(e))) => {
            info!(path = %path, "get failed on the client: {}", e.message)
        }
        Ok(Err(e)) => info!(path = %path, "get: no receipt from the client: {e}"),
        Err(_) => info!(path = %path, "get: no receipt from the client in time"),
    }
    Ok(())
}

async fn serve_list(
    req: ListRequest,
    root: Arc<Dir>,
    send: &mut SendStream,
) -> Result<(), RemoteError> {
    let path = RemotePath::parse(&req.path, true)?;
    let p = path.clone();
    let recursive = req.recursive;
    let entries = blocking(move || list(&root, &p, recursive)).await?;
    let send_all = async {
        write_frame(send, &Response::ListAccepted).await?;
        let mut batches = batches(entries).into_iter().peekable();
        while let Some(entries) = batches.next() {
            let more = batches.peek().is_some();
            write_frame(send, &ListBatch { entries, more }).await?;
        }
        Ok::<_, FrameError>(())
    };
    match send_all.await {
        Ok(()) => {
            let _ = send.finish();
            info!(path = %path, "listed");
        }
        Err(e) => info!(path = %path, "listing aborted: {e}"),
    }
    Ok(())
}

/// Splits a listing into frames: at most [`LIST_BATCH`] entries and
/// [`LIST_BATCH_BYTES`] of names each (a recursive listing's names are whole
/// paths of up to 4 KiB), and always at least one frame.
fn batches(entries: Vec<Entry>) -> Vec<Vec<Entry>> {
    let mut out = vec![Vec::new()];
    let mut bytes = 0;
    for e in entries {
        let last = out.last_mut().expect("never empty");
        if last.len() == LIST_BATCH || bytes + e.name.len() > LIST_BATCH_BYTES {
            out.push(Vec::new());
            bytes = 0;
        }
        bytes += e.name.len();
        out.last_mut().expect("never empty").push(e);
    }
    out
}

/// Name bytes per listing frame, leaving room under the 64 KiB frame limit
/// for the other fields (at most ~40 bytes per entry, 128 entries).
const LIST_BATCH_BYTES: usize = 48 * 1024;

/// Most entries a recursive listing returns, and most bytes of names: a
/// bigger tree is an error rather than an unbounded amount of server memory.
const MAX_TREE_ENTRIES: usize = 1_000_000;
const MAX_TREE_NAME_BYTES: usize = 64 << 20;

/// Lists the directory `path` names (with `recursive`, everything beneath
/// it, names relative to it), or the single entry if it is not a directory.
/// qxfer's own names are hidden; symlinks and special files are listed as
/// such and never followed.
fn list(root: &Dir, path: &RemotePath, recursive: bool) -> Result<Vec<Entry>, RemoteError> {
    let listing = |e: io::Error| fs_error(&e, path, "cannot list");
    let rel = path.relative();
    // Resolve (following links only while they stay inside the root) to see
    // what the name is; a link out of the root fails here.
    if !root.metadata(&rel).map_err(listing)?.is_dir() {
        let md = root.symlink_metadata(&rel).map_err(listing)?;
        let name = path.file_name().unwrap_or_default().to_owned();
        return Ok(vec![entry(name, &md)]);
    }
    let dir = root.open_dir(&rel).map_err(listing)?;
    let mut out = if recursive {
        walk_tree(dir, path)?
    } else {
        visible_entries(&dir, path)?
            .into_iter()
            .map(|(name, md)| entry(name, &md))
            .collect()
    };
    out.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(out)
}

/// Everything beneath `dir`, depth first, names relative to it.
fn walk_tree(dir: Dir, path: &RemotePath) -> Result<Vec<Entry>, RemoteError> {
    let mut out = Vec::new();
    let mut name_bytes = 0;
    // (directory handle, its path relative to the listed one, its path for messages)
    let mut stack = vec![(dir, String::new(), path.clone())];
    while let Some((dir, prefix, shown)) = stack.pop() {
        // One that cannot be read fails the listing: a `get -r` must not
        // report success with a subtree silently missing.
        for (name, md) in visible_entries(&dir, &shown)? {
            let full = if prefix.is_empty() {
                name.clone()
            } else {
                format!("{prefix}/{name}")
            };
            if md.is_dir() {
                let joined = match path.to_string() {
                    p if p.is_empty() => full.clone(),
                    p => format!("{p}/{full}"),
                };
                let sub = RemotePath::parse(&joined, false).unwrap_or_else(|_| path.clone());
                // open_dir_nofollow: a directory swapped for a link since
                // the lstat is refused, not followed. One deleted meanwhile
                // is simply gone.
                match dir.open_dir_nofollow(&name) {
                    Ok(handle) => stack.push((handle, full.clone(), sub)),
                    Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                    Err(e) => return Err(fs_error(&e, &sub, "cannot list")),
                }
            }
            name_bytes += full.len();
            out.push(entry(full, &md));
            if out.len() > MAX_TREE_ENTRIES || name_bytes > MAX_TREE_NAME_BYTES {
                return Err(RemoteError::new(
                    ErrorCode::TooLarge,
                    format!("'{path}' holds more than {MAX_TREE_ENTRIES} entries or {} MiB of names; list or fetch a smaller part of it", MAX_TREE_NAME_BYTES >> 20),
                ));
            }
        }
    }
    Ok(out)
}

/// Creates a directory beneath the root and applies its metadata.
async fn serve_mkdir(
    req: MkdirRequest,
    config: &ServeConfig,
    send: &mut SendStream,
) -> Result<(), RemoteError> {
    let path = RemotePath::parse(&req.path, false)?;
    if config.read_only {
        return Err(RemoteError::new(
            ErrorCode::ReadOnly,
            format!("'{path}' was not created: this server is read-only"),
        ));
    }
    let root = config.root_dir.clone();
    let p = path.clone();
    blocking(move || -> Result<(), RemoteError> {
        let dir = open_or_create_dir(&root, &p.relative(), &p)?;
        if let Some(meta) = req.meta {
            transfer::apply_dir_meta(&dir, &meta)
                .map_err(|e| fs_error(&e, &p, "cannot set the metadata of"))?;
        }
        Ok(())
    })
    .await?;
    write_frame(send, &Response::MkdirDone)
        .await
        .map_err(|e| protocol_error(&e))?;
    let _ = send.finish();
    info!(path = %path, "directory ready");
    Ok(())
}

/// The entries of `dir` with their lstat metadata, qxfer's own names
/// hidden. An entry removed between readdir and lstat is simply skipped.
fn visible_entries(
    dir: &Dir,
    path: &RemotePath,
) -> Result<Vec<(String, cap_std::fs::Metadata)>, RemoteError> {
    let listing = |e: io::Error| fs_error(&e, path, "cannot list");
    let mut out = Vec::new();
    for item in dir.entries().map_err(listing)? {
        let item = item.map_err(listing)?;
        let name = item.file_name().to_string_lossy().into_owned();
        if name.starts_with(RESERVED_PREFIX) {
            continue;
        }
        match dir.symlink_metadata(item.file_name()) {
            Ok(md) => out.push((name, md)),
            // Deleted since the directory was read: not part of the listing.
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(listing(e)),
        }
    }
    Ok(out)
}

fn entry(name: String, md: &cap_std::fs::Metadata) -> Entry {
    let ft = md.file_type();
    let kind = if ft.is_symlink() {
        EntryKind::Symlink
    } else if ft.is_dir() {
        EntryKind::Dir
    } else if ft.is_file() {
        EntryKind::File
    } else {
        EntryKind::Other
    };
    Entry {
        name,
        kind,
        mode: Some(cap_std::fs::PermissionsExt::mode(&md.permissions()) & 0o7777),
        size: md.len(),
        mtime: md.modified().ok().and_then(|t| to_timestamp(t.into_std())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Sets a file's mtime `ago` in the past.
    fn age(dir: &Dir, name: &str, ago: Duration) {
        let f = dir.open(name).unwrap().into_std();
        f.set_modified(SystemTime::now() - ago).unwrap();
    }

    #[test]
    fn the_sweep_removes_only_stale_files_nobody_is_writing() {
        let tmp = tempfile::tempdir().unwrap();
        let root = Dir::open_ambient_dir(tmp.path(), ambient_authority()).unwrap();
        let store = partial_store(&root).unwrap();
        let hour = Duration::from_secs(3600);
        // Abandoned: old, nobody holds it.
        store.write("part-abandoned", b"x").unwrap();
        age(&store, "part-abandoned", 2 * hour);
        // Recent: kept for a resume.
        store.write("part-recent", b"x").unwrap();
        // A slow upload's named temporary: old mtime, but open and locked.
        let slow = IncomingFile::create_in(
            partial_store(&root).unwrap(),
            root.try_clone().unwrap(),
            "dest",
            PathBuf::from("dest"),
        )
        .unwrap();
        std::os::unix::fs::FileExt::write_all_at(&slow.file().unwrap(), b"data", 0).unwrap();
        let slow_name = store
            .entries()
            .unwrap()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .find(|n| n.starts_with(transfer::TMP_PREFIX))
            .unwrap();
        age(&store, &slow_name, 2 * hour);

        let removed = sweep_partials(&root, hour, &Partials::default()).unwrap();
        assert_eq!(removed, 1);
        let mut left: Vec<_> = store
            .entries()
            .unwrap()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        left.sort();
        assert_eq!(left, vec![slow_name.clone(), "part-recent".to_owned()]);

        // Once the upload is gone (its temporary deleted with it), nothing is in use.
        drop(slow);
        assert!(!store.exists(&slow_name));
    }
}

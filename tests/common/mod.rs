//! Test helpers: an in-process server on a loopback port, clients for it, and the real binary (`binary`); what a root holds (`stored`); a Garage cluster (`garage`).
#![allow(dead_code, unreachable_pub)]

pub mod garage;

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use std::sync::Arc;

use qxfer::client::{Client, ClientConfig, CLIENT_IDENTITY};
use qxfer::endpoint::{server_endpoint, ServerLimits, TransportOpts};
use qxfer::server::{self, ServeConfig};
use qxfer::tls::{AuthorizedClients, ClientVerifier, Fingerprint, Identity, AUTHORIZED_CLIENTS};
use tempfile::TempDir;
use tokio::sync::oneshot;

mod binary;
mod logs;
mod metrics;
mod stored;

// Not every test binary uses both.
#[allow(unused_imports)]
pub use binary::*;
#[allow(unused_imports)]
pub use logs::server_log;
#[allow(unused_imports)]
pub use metrics::*;
#[allow(unused_imports)]
pub use stored::*;

/// A real server running in this process over a temp root, stopped on drop.
pub struct TestServer {
    pub addr: SocketAddr,
    pub fingerprint: Fingerprint,
    pub root: PathBuf,
    /// The server's authorized_clients file.
    pub allowlist: PathBuf,
    /// The server's byte counters.
    pub stats: Arc<server::ServeStats>,
    /// Its configuration, for [`ServeConfig::settled`].
    config: ServeConfig,
    stop: Option<oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<()>>,
    _dirs: TempDir,
}

impl TestServer {
    /// Starts a server on 127.0.0.1:0 with a fresh root and identity.
    pub async fn start() -> Self {
        let dirs = tempfile::tempdir().unwrap();
        let root = dirs.path().join("root");
        Self::start_in(dirs, &root).await
    }

    /// Starts a server over `root` (created if missing), keeping `dirs` alive.
    pub async fn start_in(dirs: TempDir, root: &Path) -> Self {
        Self::start_with(dirs, root, |_| {}).await
    }

    /// Like `start_in`, with the server's policy adjusted by `configure`.
    pub async fn start_with(
        dirs: TempDir,
        root: &Path,
        configure: impl FnOnce(&mut ServeConfig),
    ) -> Self {
        Self::start_full(dirs, root, configure, ServerLimits::default()).await
    }

    /// Starts a server over `url` (an s3:// root in the test Garage
    /// cluster), reaching the cluster through node `node`.
    pub async fn start_object(url: &str, node: usize) -> Self {
        let dirs = tempfile::tempdir().unwrap();
        Self::start_object_in(dirs, url, node).await
    }

    /// Like `start_object`, with the identity kept in `dirs` (servers that
    /// share it share one identity and one allowlist).
    pub async fn start_object_in(dirs: TempDir, url: &str, node: usize) -> Self {
        let certs = dirs.path().join("certs");
        Self::start_object_with(dirs, &certs, url, node).await
    }

    /// Like `start_object`, with the identity and allowlist in `certs`:
    /// servers started with the same `certs` share one identity and one
    /// allowlist, as servers behind one name do.
    pub async fn start_object_with(dirs: TempDir, certs: &Path, url: &str, node: usize) -> Self {
        Self::start_object_configured(dirs, certs, url, node, |_| {}).await
    }

    /// Like `start_object_with`, with the server's policy adjusted by `configure`.
    pub async fn start_object_configured(
        dirs: TempDir,
        certs: &Path,
        url: &str,
        node: usize,
        configure: impl FnOnce(&mut ServeConfig),
    ) -> Self {
        let limits = ServerLimits::default();
        Self::start_object_full(dirs, certs, url, node, configure, limits).await
    }

    /// Like `start_object_configured`, with transport limits too.
    pub async fn start_object_full(
        dirs: TempDir,
        certs: &Path,
        url: &str,
        node: usize,
        configure: impl FnOnce(&mut ServeConfig),
        limits: ServerLimits,
    ) -> Self {
        let options = garage::garage().options(node);
        let mut config = ServeConfig::object_store(url, &options, false)
            .await
            .unwrap();
        configure(&mut config);
        Self::start_certs(dirs, certs, config, limits).await
    }

    /// Like `start_with`, with transport limits too.
    pub async fn start_full(
        dirs: TempDir,
        root: &Path,
        configure: impl FnOnce(&mut ServeConfig),
        limits: ServerLimits,
    ) -> Self {
        let mut config = ServeConfig::prepare(root).unwrap();
        configure(&mut config);
        Self::start_config(dirs, config, limits).await
    }

    /// Starts a server with `config`; its identity lives in `dirs/certs`.
    pub async fn start_config(dirs: TempDir, config: ServeConfig, limits: ServerLimits) -> Self {
        let certs = dirs.path().join("certs");
        Self::start_certs(dirs, &certs, config, limits).await
    }

    /// Starts a server with `config` and the identity in `certs`.
    pub async fn start_certs(
        dirs: TempDir,
        certs: &Path,
        config: ServeConfig,
        limits: ServerLimits,
    ) -> Self {
        logs::capture_server_logs();
        let (endpoint, identity, allowlist) = endpoint_in(certs, &limits);
        let addr = endpoint.local_addr().unwrap();
        let (stop, stopped) = oneshot::channel::<()>();
        let root = config.root.clone();
        let stats = config.stats.clone();
        let kept = config.clone();
        let task = tokio::spawn(server::run(endpoint, config, async {
            let _ = stopped.await;
        }));
        Self {
            addr,
            fingerprint: identity.fingerprint(),
            root,
            allowlist,
            stats,
            config: kept,
            stop: Some(stop),
            task: Some(task),
            _dirs: dirs,
        }
    }

    /// Waits until the server's store has done what follows its answers
    /// (see [`ServeConfig::settled`]).
    pub async fn settled(&self) {
        self.config.settled().await;
    }

    /// A client config for this server using `config_dir`, whose client
    /// identity (generated if needed) is added to the server's allowlist.
    pub fn client_config(&self, config_dir: &Path) -> ClientConfig {
        self.authorize(config_dir);
        client_config(self.addr, config_dir)
    }

    /// Adds the client identity in `config_dir` (generating it) to the allowlist.
    pub fn authorize(&self, config_dir: &Path) -> Fingerprint {
        let fp = client_identity(config_dir);
        AuthorizedClients::append(&self.allowlist, fp, "test client").unwrap();
        fp
    }

    /// Connects a fresh client (first contact, known_hosts in a temp dir).
    pub async fn client(&self) -> (Client, TempDir) {
        let cfg = tempfile::tempdir().unwrap();
        let client = Client::connect(&self.client_config(cfg.path()))
            .await
            .unwrap();
        (client, cfg)
    }

    /// Stops the server and waits for it to finish.
    pub async fn stop(mut self) {
        let _ = self.stop.take().unwrap().send(());
        self.task.take().unwrap().await.unwrap();
    }

    /// Proves the server still serves a well-behaved client: a put, a get and a list.
    pub async fn assert_healthy(&self) {
        let (client, _cfg) = self.client().await;
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().join("probe");
        std::fs::write(&src, b"still serving").unwrap();
        let name = format!("probe-{}", rand_suffix());
        client.put(&src, &name, false, &|_| {}).await.unwrap();
        let back = dir.path().join("back");
        client
            .get(&name, &back, false, &|_| {}, &|_| {})
            .await
            .unwrap();
        assert_eq!(std::fs::read(&back).unwrap(), b"still serving");
        assert!(client
            .list("")
            .await
            .unwrap()
            .iter()
            .any(|e| e.name == name));
        self.remove(&name).await;
        client.close().await;
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

/// A client config for any address, with known_hosts in `config_dir`.
pub fn client_config(addr: SocketAddr, config_dir: &Path) -> ClientConfig {
    ClientConfig {
        server: addr.to_string(),
        pin: None,
        config_dir: config_dir.to_owned(),
        transport: TransportOpts::default(),
        resume: true,
        limit_rate: None,
        compression: Default::default(),
        reply_timeout: qxfer::client::DEFAULT_REPLY_TIMEOUT,
        delta: false,
        connect_timeout: qxfer::client::DEFAULT_CONNECT_TIMEOUT,
        failover: Vec::new(),
    }
}

/// Connects with `config` and asks for a listing: the client if the
/// server served it, else the refusal. A server refuses at the handshake
/// or, where two clients raced for its last slot, by closing a connection
/// just made, which the client learns on its first request (the CLI asks
/// `Client::refusal` then too).
pub async fn admitted(config: ClientConfig) -> Result<Client, qxfer::client::ConnectError> {
    let client = Client::connect(&config).await?;
    match client.list("").await {
        Ok(_) => Ok(client),
        Err(e) => Err(client
            .refusal()
            .unwrap_or_else(|| panic!("neither served nor refused: {e}"))),
    }
}

/// The server's error code and message from a client call that must have
/// been refused by the server.
pub fn remote_code(
    r: Result<impl std::fmt::Debug, qxfer::client::FileError>,
) -> (qxfer::protocol::ErrorCode, String) {
    match r {
        Err(qxfer::client::FileError::Remote(e)) => (e.code, e.message),
        other => panic!("expected an error from the server, got {other:?}"),
    }
}

/// The fingerprint of the client identity in `config_dir`, generated if needed.
pub fn client_identity(config_dir: &Path) -> Fingerprint {
    Identity::load_or_generate(config_dir, CLIENT_IDENTITY)
        .unwrap()
        .fingerprint()
}

fn rand_suffix() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    N.fetch_add(1, Ordering::Relaxed)
}

/// Deterministic pseudo-random bytes (xorshift), so files do not compress or repeat.
pub fn pattern(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out.truncate(len);
    out
}

/// Names of every entry under `dir`, recursively, relative to it. The
/// server's partial store directory itself is left out (it is created on the
/// first put), but anything inside it is listed: a leftover temporary shows.
pub fn tree(dir: &Path) -> Vec<String> {
    let mut out = Vec::new();
    fn walk(base: &Path, dir: &Path, out: &mut Vec<String>) {
        for e in std::fs::read_dir(dir).unwrap() {
            let e = e.unwrap();
            let p = e.path();
            if e.file_name() != qxfer::paths::PARTIAL_DIR || dir != base {
                out.push(p.strip_prefix(base).unwrap().display().to_string());
            }
            if e.file_type().unwrap().is_dir() {
                walk(base, &p, out);
            }
        }
    }
    walk(dir, dir, &mut out);
    out.sort();
    out
}

/// The JSON a successful `--json` run printed (the run must have succeeded).
pub fn json_of(out: &std::process::Output) -> serde_json::Value {
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

/// The frame of a raw put request for `path` declaring `size` bytes, raw encoding.
pub fn put_header(path: &str, size: u64) -> Vec<u8> {
    use qxfer::protocol::{encode, Encoding, FileMeta, PutRequest, Request};
    encode(&Request::Put(PutRequest {
        path: path.into(),
        meta: FileMeta {
            size,
            mtime: None,
            mode: None,
        },
        force: false,
        resume: false,
        encoding: Encoding::Raw,
    }))
    .unwrap()
}

/// A real server endpoint on a loopback port with a fresh identity in
/// `certs`, admitting the clients listed in `certs/authorized_clients`.
pub fn endpoint_in(certs: &Path, limits: &ServerLimits) -> (quinn::Endpoint, Identity, PathBuf) {
    let identity = Identity::load_or_generate(certs, "server").unwrap();
    let allowlist = certs.join(AUTHORIZED_CLIENTS);
    let clients = Arc::new(AuthorizedClients::new(&allowlist, Vec::new(), false));
    let endpoint = server_endpoint(
        "127.0.0.1:0".parse().unwrap(),
        &identity,
        ClientVerifier::new(clients),
        &TransportOpts::default(),
        limits,
    )
    .unwrap();
    (endpoint, identity, allowlist)
}

/// Whether this process runs as root (root bypasses file permissions, so
/// permission tests must drop to another user).
pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

/// Runs the async test body `$body(Backend)` twice, as `$name::local` and
/// `$name::object`.
#[macro_export]
macro_rules! both_backends {
    ($name:ident, $body:ident) => {
        mod $name {
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn local() {
                super::$body($crate::common::Backend::Local).await
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn object() {
                super::$body($crate::common::Backend::Object).await
            }
        }
    };
}

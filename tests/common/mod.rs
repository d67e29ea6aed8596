//! Test helpers: an in-process server on a loopback port, clients for it, and the real binary.
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

/// A real server running in this process over a temp root, stopped on drop.
pub struct TestServer {
    pub addr: SocketAddr,
    pub fingerprint: Fingerprint,
    pub root: PathBuf,
    /// The server's authorized_clients file.
    pub allowlist: PathBuf,
    /// The server's byte counters.
    pub stats: Arc<server::ServeStats>,
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
        let (endpoint, identity, allowlist) = endpoint_in(certs, &limits);
        let addr = endpoint.local_addr().unwrap();
        let (stop, stopped) = oneshot::channel::<()>();
        let root = config.root.clone();
        let stats = config.stats.clone();
        let task = tokio::spawn(server::run(endpoint, config, async {
            let _ = stopped.await;
        }));
        Self {
            addr,
            fingerprint: identity.fingerprint(),
            root,
            allowlist,
            stats,
            stop: Some(stop),
            task: Some(task),
            _dirs: dirs,
        }
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

/// The `qxfer` binary, with HOME and the config dir pointed at `home` so a
/// test never touches the real ones.
pub fn qxfer(home: &Path) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_qxfer"));
    cmd.env("HOME", home)
        .env("XDG_CONFIG_HOME", home.join(".config"))
        .env("QXFER_CONFIG_DIR", home.join("qxfer-config"))
        .env_remove("XDG_DOWNLOAD_DIR")
        .env_remove("QXFER_SERVER")
        .env_remove("RUST_LOG");
    cmd
}

/// The `qxfer` binary as in [`qxfer`], talking to the server at `server`.
pub fn qxfer_at(home: &Path, server: SocketAddr) -> Command {
    let mut cmd = qxfer(home);
    cmd.env("QXFER_SERVER", server.to_string());
    cmd
}

/// A temp home for [`qxfer`] whose client identity `server` admits.
pub fn home_for(server: &TestServer) -> TempDir {
    let home = tempfile::tempdir().unwrap();
    server.authorize(&home.path().join("qxfer-config"));
    home
}

/// The real `qxfer serve` binary on an ephemeral port; killed on drop.
pub struct ServeProcess {
    pub child: Child,
    pub addr: SocketAddr,
    pub fingerprint: String,
    pub banner: Vec<String>,
    /// What it printed on stdout after the banner, as it arrives.
    pub after_banner: Arc<std::sync::Mutex<Vec<String>>>,
}

impl ServeProcess {
    /// Starts `cmd` (a `qxfer serve` command line) and waits for its banner.
    pub fn spawn(cmd: Command) -> Self {
        Self::spawn_logging(cmd, Stdio::null())
    }

    /// Like `spawn`, sending the server's log (stderr) to `log`.
    pub fn spawn_logging(mut cmd: Command, log: impl Into<Stdio>) -> Self {
        let mut child = cmd.stdout(Stdio::piped()).stderr(log).spawn().unwrap();
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        let mut banner = Vec::new();
        for _ in 0..3 {
            banner.push(lines.next().expect("serve printed its banner").unwrap());
        }
        let addr = banner[1]
            .strip_prefix("listening on udp ")
            .expect("listen line")
            .parse()
            .unwrap();
        let fingerprint = banner[2]
            .strip_prefix("fingerprint ")
            .expect("fingerprint line")
            .to_owned();
        // Keep draining stdout so the server never blocks on a full pipe.
        let after_banner = Arc::new(std::sync::Mutex::new(Vec::new()));
        let kept = after_banner.clone();
        std::thread::spawn(move || {
            for line in lines.map_while(Result::ok) {
                kept.lock().unwrap().push(line);
            }
        });
        Self {
            child,
            addr,
            fingerprint,
            banner,
            after_banner,
        }
    }

    /// Waits (up to 5 s) for a line after the banner containing `text`.
    pub fn wait_for_line(&self, text: &str) -> String {
        let start = std::time::Instant::now();
        loop {
            if let Some(l) = self
                .after_banner
                .lock()
                .unwrap()
                .iter()
                .find(|l| l.contains(text))
            {
                return l.clone();
            }
            assert!(
                start.elapsed() < std::time::Duration::from_secs(5),
                "serve never printed {text:?}: {:?}",
                self.after_banner.lock().unwrap()
            );
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
    }
}

impl Drop for ServeProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Where a test server keeps its files: the tests that concern the server
/// run against both (see `both_backends!`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    /// A temporary directory.
    Local,
    /// A prefix of its own in the test Garage cluster's bucket.
    Object,
}

impl Backend {
    /// A fresh root of this kind for `qxfer serve` run as a process: the
    /// directory `dir`, or a new prefix in the test bucket.
    pub fn root_for_process(self, dir: PathBuf, label: &str) -> PathBuf {
        match self {
            Self::Local => dir,
            Self::Object => garage::garage().fresh_root(label).into(),
        }
    }
}

/// Adds `--root root` to a `qxfer serve` command line, and for an s3://
/// root the test cluster's endpoint and credentials.
pub fn serve_root(cmd: &mut Command, root: &Path) {
    cmd.arg("--root").arg(root);
    if object_prefix(root).is_some() {
        let g = garage::garage();
        g.env(cmd);
        cmd.args(["--s3-endpoint", &g.endpoint]);
    }
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

impl TestServer {
    /// A server over a fresh root of `backend`.
    pub async fn start_on(backend: Backend, label: &str) -> Self {
        match backend {
            Backend::Local => Self::start().await,
            Backend::Object => Self::start_object(&garage::garage().fresh_root(label), 0).await,
        }
    }

    /// The bucket and prefix of an object root, if this is one.
    fn object_root(&self) -> Option<(String, String)> {
        object_parts(&self.root)
    }

    /// The bytes stored under the remote name `name`, read from the root
    /// itself (the directory, or the bucket), not through qxfer.
    pub async fn stored(&self, name: &str) -> Vec<u8> {
        stored_at(&self.root, name)
            .await
            .unwrap_or_else(|| panic!("{name} is not stored"))
    }

    /// Everything the root holds, listed as [`tree`] lists a directory:
    /// files and directories by relative name, the partial store left out
    /// but anything in it shown. In a bucket, a directory is a name that
    /// something lies beneath (or its marker), and the digests kept for
    /// files uploaded in parts are left out as part of their files.
    pub async fn stored_tree(&self) -> Vec<String> {
        use futures::TryStreamExt;
        use object_store::ObjectStore;
        let Some((_, prefix)) = self.object_root() else {
            return tree(&self.root);
        };
        let listed: Vec<_> = garage::bucket()
            .list(Some(&object_store::path::Path::from(prefix.as_str())))
            .try_collect()
            .await
            .unwrap();
        let mut out = std::collections::BTreeSet::new();
        for o in listed {
            let rel = &o.location.as_ref()[prefix.len() + 1..];
            // Bookkeeping: digests of files, leases on names being
            // written (deleted as they end, but Garage's listings may show
            // a deleted key for a moment), start-up probes.
            if rel.starts_with(".qxfer-sums/")
                || rel.starts_with(".qxfer-leases/")
                || rel.starts_with(".qxfer-probe-")
            {
                continue;
            }
            let rel = rel.strip_suffix("/.qxfer-dir").unwrap_or(rel);
            // Names as qxfer reads them back: object_store percent-encodes
            // some characters of a key's parts (a backslash, a newline).
            let rel = rel
                .split('/')
                .map(|p| {
                    percent_encoding::percent_decode_str(p)
                        .decode_utf8()
                        .map_or_else(|_| p.to_owned(), |d| d.into_owned())
                })
                .collect::<Vec<_>>()
                .join("/");
            let rel = rel.as_str();
            let parts: Vec<&str> = rel.split('/').collect();
            for n in 1..parts.len() {
                if !(n == 1 && parts[0] == qxfer::paths::PARTIAL_DIR) {
                    out.insert(parts[..n].join("/"));
                }
            }
            out.insert(rel.to_owned());
        }
        out.into_iter().collect()
    }

    /// Every object beneath `dir` in an object root (bookkeeping other than
    /// directory markers left out), by name relative to `dir`: its bytes
    /// and its metadata (`x-amz-meta-` names without the prefix).
    pub async fn stored_objects(&self, dir: &str) -> Vec<(String, StoredObject)> {
        use futures::TryStreamExt;
        use object_store::{Attribute, ObjectStore, ObjectStoreExt};
        let (_, prefix) = self.object_root().expect("an object root");
        let base = format!("{prefix}/{dir}");
        let bucket = garage::bucket();
        let listed: Vec<_> = bucket
            .list(Some(&object_store::path::Path::from(base.as_str())))
            .try_collect()
            .await
            .unwrap();
        let mut out = Vec::new();
        for o in listed {
            let rel = o.location.as_ref()[base.len() + 1..].to_owned();
            let rel = percent_encoding::percent_decode_str(&rel)
                .decode_utf8()
                .unwrap()
                .into_owned();
            let got = bucket.get(&o.location).await.unwrap();
            let attributes = got
                .attributes
                .iter()
                .filter_map(|(k, v)| match k {
                    Attribute::Metadata(name) => Some((name.to_string(), v.to_string())),
                    _ => None,
                })
                .collect();
            let bytes = got.bytes().await.unwrap().to_vec();
            out.push((rel, StoredObject { bytes, attributes }));
        }
        out
    }

    /// Whether this server keeps its files in the object store.
    pub fn is_object(&self) -> bool {
        self.object_root().is_some()
    }

    /// A server over a fresh root of `backend`, its policy adjusted by `configure`.
    pub async fn start_on_with(
        backend: Backend,
        label: &str,
        configure: impl FnOnce(&mut ServeConfig),
    ) -> Self {
        Self::start_on_full(backend, label, configure, ServerLimits::default()).await
    }

    /// Like `start_on_with`, with transport limits too.
    pub async fn start_on_full(
        backend: Backend,
        label: &str,
        configure: impl FnOnce(&mut ServeConfig),
        limits: ServerLimits,
    ) -> Self {
        let dirs = tempfile::tempdir().unwrap();
        match backend {
            Backend::Local => {
                let root = dirs.path().join("root");
                Self::start_full(dirs, &root, configure, limits).await
            }
            Backend::Object => {
                let certs = dirs.path().join("certs");
                let url = garage::garage().fresh_root(label);
                Self::start_object_full(dirs, &certs, &url, 0, configure, limits).await
            }
        }
    }

    /// Puts `data` under `name` in the root from outside qxfer, as another
    /// program on the server (or another S3 client) would: a plain file, or
    /// a plain object without qxfer's metadata.
    pub async fn place(&self, name: &str, data: &[u8]) {
        place_at(&self.root, name, data).await
    }

    /// Removes the file `name` from the root, from outside qxfer.
    pub async fn remove(&self, name: &str) {
        use object_store::ObjectStoreExt;
        match self.object_root() {
            None => std::fs::remove_file(self.root.join(name)).unwrap(),
            Some((_, prefix)) => {
                let key = object_store::path::Path::from(format!("{prefix}/{name}"));
                garage::bucket().delete(&key).await.unwrap();
            }
        }
    }

    /// Bytes of uploads in progress that a resume could continue from.
    pub async fn partial_bytes(&self) -> u64 {
        partial_bytes_at(&self.root).await
    }

    /// The uploads in progress in the root's partial store, by name.
    pub async fn partials(&self) -> Vec<String> {
        partials_at(&self.root).await
    }

    /// Damages the (one) upload in progress so that it no longer matches
    /// the source: a flipped byte in a local partial; in an object store,
    /// where the server proves a partial from its record of the parts (it
    /// never reads them back), the first part's recorded hashes flipped.
    pub async fn corrupt_partial(&self) {
        match self.object_root() {
            None => {
                let names = self.partials().await;
                assert_eq!(names.len(), 1, "one upload in progress: {names:?}");
                let store = self.root.join(qxfer::paths::PARTIAL_DIR);
                flip_byte(&store.join(&names[0]), 1000)
            }
            Some(_) => self.flip_part_record(&["cv", "root"]).await,
        }
    }

    /// In an object store, flips the first character of each of `fields`
    /// in the first part's record of the (one) upload in progress.
    pub async fn flip_part_record(&self, fields: &[&str]) {
        use object_store::{ObjectStoreExt, PutPayload};
        let names = self.partials().await;
        assert_eq!(names.len(), 1, "one upload in progress: {names:?}");
        let (_, prefix) = self.object_root().expect("an object root");
        let key = object_store::path::Path::from(format!(
            "{prefix}/{}/{}/part-00000",
            qxfer::paths::PARTIAL_DIR,
            names[0]
        ));
        let bucket = garage::bucket();
        let body = bucket.get(&key).await.unwrap().bytes().await.unwrap();
        let mut record: serde_json::Value = serde_json::from_slice(&body).unwrap();
        for field in fields {
            let hex = record[field].as_str().expect("a recorded hash").to_owned();
            let flipped = if hex.starts_with('0') { "1" } else { "0" };
            record[field] = format!("{flipped}{}", &hex[1..]).into();
        }
        let body = serde_json::to_vec(&record).unwrap();
        bucket.put(&key, PutPayload::from(body)).await.unwrap();
    }

    /// Removes every upload in progress (aborting the object store's
    /// multipart uploads), as the sweep would once they are stale.
    pub async fn clear_partials(&self) {
        use futures::TryStreamExt;
        use object_store::multipart::MultipartStore;
        use object_store::{ObjectStore, ObjectStoreExt};
        let Some((_, prefix)) = self.object_root() else {
            let store = self.root.join(qxfer::paths::PARTIAL_DIR);
            for name in self.partials().await {
                std::fs::remove_file(store.join(name)).unwrap();
            }
            return;
        };
        let bucket = garage::bucket();
        for name in self.partials().await {
            let dir = format!("{prefix}/{}/{name}", qxfer::paths::PARTIAL_DIR);
            if let Some(header) = upload_header(&dir).await {
                let key = object_store::path::Path::from(header["key"].as_str().unwrap());
                let id = header["upload_id"].as_str().unwrap().to_owned();
                bucket.abort_multipart(&key, &id).await.unwrap();
            }
            let keys: Vec<_> = bucket
                .list(Some(&object_store::path::Path::from(dir.as_str())))
                .map_ok(|o| o.location)
                .try_collect()
                .await
                .unwrap();
            for key in keys {
                bucket.delete(&key).await.unwrap();
            }
        }
    }
}

/// The bucket prefix of an `s3://BUCKET/PREFIX` root, if `root` is one.
fn object_prefix(root: &Path) -> Option<String> {
    object_parts(root).map(|(_, prefix)| prefix)
}

/// The bucket and prefix of an `s3://BUCKET/PREFIX` root, if `root` is one.
fn object_parts(root: &Path) -> Option<(String, String)> {
    let rest = root.to_str()?.strip_prefix("s3://")?;
    let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
    Some((bucket.to_owned(), prefix.to_owned()))
}

/// Runs a finished command line off the async threads (a server under
/// test may live on them) and returns what it printed and how it exited.
pub async fn output(mut cmd: Command) -> std::process::Output {
    tokio::task::spawn_blocking(move || cmd.output().unwrap())
        .await
        .unwrap()
}

/// Puts `data` under `name` in `root` (a directory or an s3:// root) from
/// outside qxfer.
pub async fn place_at(root: &Path, name: &str, data: &[u8]) {
    use object_store::{ObjectStoreExt, PutPayload};
    match object_prefix(root) {
        None => {
            let path = root.join(name);
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            std::fs::write(path, data).unwrap();
        }
        Some(prefix) => {
            let key = object_store::path::Path::from(format!("{prefix}/{name}"));
            garage::bucket()
                .put(&key, PutPayload::from(data.to_vec()))
                .await
                .unwrap();
        }
    }
}

/// The bytes under `name` in `root` (a directory or an s3:// root), read
/// from the root itself; `None` if there is no such file.
pub async fn stored_at(root: &Path, name: &str) -> Option<Vec<u8>> {
    use object_store::ObjectStoreExt;
    match object_prefix(root) {
        None => std::fs::read(root.join(name)).ok(),
        Some(prefix) => {
            let key = object_store::path::Path::from(format!("{prefix}/{name}"));
            match garage::bucket().get(&key).await {
                Ok(got) => Some(got.bytes().await.unwrap().to_vec()),
                Err(object_store::Error::NotFound { .. }) => None,
                Err(e) => panic!("reading {key}: {e}"),
            }
        }
    }
}

/// The uploads in progress in the partial store of `root`, by name: files
/// in a local root's partial store; records in an object store's.
pub async fn partials_at(root: &Path) -> Vec<String> {
    use futures::TryStreamExt;
    use object_store::ObjectStore;
    let mut names: Vec<String> = match object_prefix(root) {
        None => std::fs::read_dir(root.join(qxfer::paths::PARTIAL_DIR))
            .map(|d| {
                d.flatten()
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .collect()
            })
            .unwrap_or_default(),
        Some(prefix) => {
            let dir = format!("{prefix}/{}", qxfer::paths::PARTIAL_DIR);
            let listed: Vec<_> = garage::bucket()
                .list(Some(&object_store::path::Path::from(dir.as_str())))
                .try_collect()
                .await
                .unwrap();
            let mut names: Vec<String> = listed
                .iter()
                .filter_map(|o| {
                    let rel = &o.location.as_ref()[dir.len() + 1..];
                    rel.split_once('/').map(|(name, _)| name.to_owned())
                })
                .collect();
            names.dedup();
            names
        }
    };
    names.sort();
    names.dedup();
    names
}

/// What an object store upload's record header says (key, upload_id,
/// size, part_size), if the record under `dir` has one.
async fn upload_header(dir: &str) -> Option<serde_json::Value> {
    use object_store::ObjectStoreExt;
    let key = object_store::path::Path::from(format!("{dir}/upload"));
    match garage::bucket().get(&key).await {
        Ok(got) => Some(serde_json::from_slice(&got.bytes().await.unwrap()).unwrap()),
        Err(object_store::Error::NotFound { .. }) => None,
        Err(e) => panic!("reading {key}: {e}"),
    }
}

/// Bytes of uploads in progress in `root` that a resume could continue
/// from: the partial files of a local root; the stored parts of an object
/// store's multipart uploads (whole parts only: what a server holds in
/// memory of a part not yet stored is lost with it).
pub async fn partial_bytes_at(root: &Path) -> u64 {
    use futures::TryStreamExt;
    use object_store::ObjectStore;
    let Some(prefix) = object_prefix(root) else {
        let store = root.join(qxfer::paths::PARTIAL_DIR);
        return partials_at(root)
            .await
            .iter()
            .filter(|n| n.starts_with("part-"))
            .map(|n| std::fs::metadata(store.join(n)).map_or(0, |m| m.len()))
            .sum();
    };
    let mut total = 0;
    for name in partials_at(root).await {
        let dir = format!("{prefix}/{}/{name}", qxfer::paths::PARTIAL_DIR);
        let Some(header) = upload_header(&dir).await else {
            continue;
        };
        let listed: Vec<_> = garage::bucket()
            .list(Some(&object_store::path::Path::from(dir.as_str())))
            .try_collect()
            .await
            .unwrap();
        let parts = listed
            .iter()
            .filter(|o| {
                o.location
                    .filename()
                    .is_some_and(|f| f.starts_with("part-"))
            })
            .count() as u64;
        let size = header["size"].as_u64().unwrap();
        total += (parts * header["part_size"].as_u64().unwrap()).min(size);
    }
    total
}

/// Flips one byte of the file at `path`, at `at`.
pub fn flip_byte(path: &Path, at: u64) {
    use std::os::unix::fs::FileExt;
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .unwrap();
    let mut b = [0u8];
    f.read_exact_at(&mut b, at).unwrap();
    f.write_all_at(&[b[0] ^ 0x55], at).unwrap();
}

/// One object as the bucket holds it.
pub struct StoredObject {
    pub bytes: Vec<u8>,
    pub attributes: std::collections::HashMap<String, String>,
}

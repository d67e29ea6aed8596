//! A three-node Garage cluster for the object store tests: started once per test binary by tests/garage/cluster, stopped when the binary exits.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::{Mutex, OnceLock};

use qxfer::server::S3Options;

/// The running cluster: where it answers and the key the tests use.
#[derive(Debug)]
pub struct Garage {
    pub endpoint: String,
    /// Each node's S3 address (the first is `endpoint`).
    pub endpoints: Vec<String>,
    pub bucket: String,
    pub key_id: String,
    pub secret: String,
    pub region: String,
    /// The nodes' process ids, for fault tests.
    pub pids: Vec<u32>,
    /// The script that runs the cluster: it stops the nodes when this
    /// process exits and closes its standard input.
    _runner: Mutex<Child>,
}

/// The cluster, started on first use. A cluster that cannot start fails
/// the test loudly: the object store tests never skip.
pub fn garage() -> &'static Garage {
    static CLUSTER: OnceLock<Garage> = OnceLock::new();
    CLUSTER.get_or_init(start)
}

fn start() -> Garage {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/garage/cluster");
    let mut child = Command::new("python3")
        .arg(script)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("python3 runs tests/garage/cluster (install python3)");
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let info: serde_json::Value = serde_json::from_str(&line).unwrap_or_else(|_| {
        panic!("tests/garage/cluster did not start a Garage cluster (see its messages above); it printed {line:?}")
    });
    let text = |k: &str| info[k].as_str().unwrap().to_owned();
    Garage {
        endpoint: text("endpoint"),
        endpoints: info["endpoints"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| e.as_str().unwrap().to_owned())
            .collect(),
        bucket: text("bucket"),
        key_id: text("key_id"),
        secret: text("secret"),
        region: text("region"),
        pids: info["pids"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| p.as_u64().unwrap() as u32)
            .collect(),
        _runner: Mutex::new(child),
    }
}

impl Garage {
    /// A root in the test bucket under a prefix no other test uses.
    pub fn fresh_root(&self, label: &str) -> String {
        use std::sync::atomic::{AtomicU64, Ordering};
        static N: AtomicU64 = AtomicU64::new(0);
        format!(
            "s3://{}/{label}-{}-{}",
            self.bucket,
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        )
    }

    /// How a server reaches the cluster (through node `node`).
    pub fn options(&self, node: usize) -> S3Options {
        S3Options {
            endpoint: Some(self.endpoints[node].clone()),
            access_key_id: Some(self.key_id.clone()),
            secret_access_key: Some(self.secret.clone()),
            region: Some(self.region.clone()),
            upload_memory: None,
        }
    }

    /// The environment `qxfer serve --root s3://...` reads its credentials from.
    pub fn env(&self, cmd: &mut Command) {
        cmd.env("AWS_ACCESS_KEY_ID", &self.key_id)
            .env("AWS_SECRET_ACCESS_KEY", &self.secret)
            .env("AWS_REGION", &self.region)
            .env_remove("AWS_SESSION_TOKEN")
            .env_remove("AWS_PROFILE");
    }
}

/// The test bucket, read directly (to see what the servers stored).
pub fn bucket() -> object_store::aws::AmazonS3 {
    // The S3 client's TLS needs a crypto provider (qxfer installs ring
    // when a server connects; a test may read the bucket before any does).
    let _ = rustls::crypto::ring::default_provider().install_default();
    let g = garage();
    object_store::aws::AmazonS3Builder::new()
        .with_endpoint(&g.endpoint)
        .with_allow_http(true)
        .with_bucket_name(&g.bucket)
        .with_access_key_id(&g.key_id)
        .with_secret_access_key(&g.secret)
        .with_region(&g.region)
        .build()
        .unwrap()
}

/// Every key under an `s3://BUCKET/PREFIX` root, relative to it, sorted
/// (leases and probes left out).
pub async fn keys(url: &str) -> Vec<String> {
    use futures::TryStreamExt;
    use object_store::ObjectStore;
    let prefix = url.split_once("://").unwrap().1.split_once('/').unwrap().1;
    let listed: Vec<_> = bucket()
        .list(Some(&object_store::path::Path::from(prefix)))
        .try_collect()
        .await
        .unwrap();
    // Leases on names and start-up probes are left out: they go as soon
    // as their writer is done, but Garage's listings may show a deleted
    // key for a moment.
    let mut out: Vec<String> = listed
        .into_iter()
        .map(|o| o.location.as_ref()[prefix.len() + 1..].to_owned())
        .filter(|k| !k.starts_with(".qxfer-leases/") && !k.starts_with(".qxfer-probe-"))
        .collect();
    out.sort();
    out
}

/// Waits until the root `url` holds at least `n` stored parts of uploads in progress.
pub async fn wait_for_parts(url: &str, n: usize) {
    let start = std::time::Instant::now();
    loop {
        let stored = keys(url).await;
        let parts: usize = stored
            .iter()
            .filter_map(|k| k.rsplit('/').next().and_then(super::recorded_range))
            .map(|(first, last)| last - first + 1)
            .sum();
        if parts >= n {
            return;
        }
        assert!(
            start.elapsed() < std::time::Duration::from_secs(60),
            "no parts stored: {stored:?}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
}

/// A TCP relay between a qxfer server and the cluster's first node that
/// counts the bytes the store sends back: what a server read from the
/// store, seen from outside it.
pub struct CountingProxy {
    /// The address to give the server as its S3 endpoint.
    pub endpoint: String,
    read: std::sync::Arc<std::sync::atomic::AtomicU64>,
    /// Connections open now, and the most at once.
    open: std::sync::Arc<(std::sync::atomic::AtomicU64, std::sync::atomic::AtomicU64)>,
    task: tokio::task::JoinHandle<()>,
    /// Every relay's task, for [`CountingProxy::cut`].
    relays: std::sync::Arc<Mutex<Vec<tokio::task::AbortHandle>>>,
    /// Every request relayed: its method and target (path and query).
    requests: std::sync::Arc<Mutex<Vec<(String, String)>>>,
}

/// Follows the requests in one connection's bytes to the store (HTTP/1.1,
/// bodies with a Content-Length, as object_store sends them).
#[derive(Default)]
struct RequestLog {
    head: Vec<u8>,
    body_left: u64,
    /// A body this does not follow (chunked): nothing more is logged.
    lost: bool,
}

impl RequestLog {
    fn feed(&mut self, bytes: &[u8], out: &Mutex<Vec<(String, String)>>) {
        // What is still to read: the bytes given, after a head its rest.
        let mut pending = bytes.to_vec();
        while !pending.is_empty() && !self.lost {
            if self.body_left > 0 {
                let n = (self.body_left as usize).min(pending.len());
                self.body_left -= n as u64;
                pending.drain(..n);
                continue;
            }
            self.head.append(&mut pending);
            let Some(end) = self.head.windows(4).position(|w| w == b"\r\n\r\n") else {
                return;
            };
            pending = self.head.split_off(end + 4);
            let head = String::from_utf8_lossy(&self.head).into_owned();
            self.head.clear();
            let mut lines = head.split("\r\n");
            let mut first = lines.next().unwrap_or_default().split(' ');
            let method = first.next().unwrap_or_default().to_owned();
            let target = first.next().unwrap_or_default().to_owned();
            for line in lines {
                let lower = line.to_ascii_lowercase();
                if let Some(v) = lower.strip_prefix("content-length:") {
                    self.body_left = v.trim().parse().unwrap_or(0);
                } else if lower.starts_with("transfer-encoding:") {
                    self.lost = true;
                }
            }
            out.lock().unwrap().push((method, target));
        }
    }
}

impl CountingProxy {
    /// Starts relaying to the cluster's first node.
    pub async fn start() -> Self {
        Self::start_slowed(std::time::Duration::ZERO).await
    }

    /// Like [`CountingProxy::start`], holding each answer of the store back
    /// by `delay` (a store far away, or busy): requests overlap as they
    /// would on such a store.
    pub async fn start_slowed(delay: std::time::Duration) -> Self {
        use std::sync::atomic::{AtomicU64, Ordering};
        use std::sync::Arc;
        let target = garage()
            .endpoint
            .strip_prefix("http://")
            .unwrap()
            .to_owned();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let endpoint = format!("http://{}", listener.local_addr().unwrap());
        let read = Arc::new(AtomicU64::new(0));
        let counted = read.clone();
        let open = Arc::new((AtomicU64::new(0), AtomicU64::new(0)));
        let gauge = open.clone();
        let relays = Arc::new(Mutex::new(Vec::new()));
        let started = relays.clone();
        let requests = Arc::new(Mutex::new(Vec::new()));
        let logging = requests.clone();
        let task = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let (target, counted) = (target.clone(), counted.clone());
                let gauge = gauge.clone();
                let logged = logging.clone();
                let now = gauge.0.fetch_add(1, Ordering::SeqCst) + 1;
                gauge.1.fetch_max(now, Ordering::SeqCst);
                let relay = tokio::spawn(async move {
                    struct Closed(Arc<(AtomicU64, AtomicU64)>);
                    impl Drop for Closed {
                        fn drop(&mut self) {
                            self.0 .0.fetch_sub(1, Ordering::SeqCst);
                        }
                    }
                    let _closed = Closed(gauge);
                    let Ok(store) = tokio::net::TcpStream::connect(&target).await else {
                        return;
                    };
                    let (mut cr, mut cw) = client.into_split();
                    let (mut sr, mut sw) = store.into_split();
                    let logged = logged.clone();
                    let up = tokio::spawn(async move {
                        use tokio::io::{AsyncReadExt, AsyncWriteExt};
                        let mut log = RequestLog::default();
                        let mut buf = vec![0u8; 64 << 10];
                        loop {
                            let n = match cr.read(&mut buf).await {
                                Ok(0) | Err(_) => break,
                                Ok(n) => n,
                            };
                            log.feed(&buf[..n], &logged);
                            if sw.write_all(&buf[..n]).await.is_err() {
                                break;
                            }
                        }
                        let _ = sw.shutdown().await;
                    });
                    let mut buf = vec![0u8; 64 << 10];
                    loop {
                        use tokio::io::{AsyncReadExt, AsyncWriteExt};
                        let n = match sr.read(&mut buf).await {
                            Ok(0) | Err(_) => break,
                            Ok(n) => n,
                        };
                        if !delay.is_zero() {
                            tokio::time::sleep(delay).await;
                        }
                        counted.fetch_add(n as u64, Ordering::Relaxed);
                        if cw.write_all(&buf[..n]).await.is_err() {
                            break;
                        }
                    }
                    up.abort();
                });
                started.lock().unwrap().push(relay.abort_handle());
            }
        });
        Self {
            endpoint,
            read,
            open,
            task,
            relays,
            requests,
        }
    }

    /// The requests relayed so far, each as its method and target.
    pub fn requests(&self) -> Vec<(String, String)> {
        self.requests.lock().unwrap().clone()
    }

    /// Cuts the store off: no new connection is taken and every open one
    /// is dropped, as when the store's host goes away.
    pub fn cut(&self) {
        self.task.abort();
        for relay in self.relays.lock().unwrap().drain(..) {
            relay.abort();
        }
    }

    /// The most connections to the store open at once so far: with HTTP/1
    /// one request each, so the most requests in flight at once.
    pub fn most_open(&self) -> u64 {
        self.open.1.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Bytes the store has sent back so far.
    pub fn read_from_store(&self) -> u64 {
        self.read.load(std::sync::atomic::Ordering::Relaxed)
    }
}

impl Drop for CountingProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

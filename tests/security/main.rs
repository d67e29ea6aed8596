//! Hostile and mistaken clients against a real in-process server, driven at the protocol level.
//!
//! Every case runs inside an [`Arena`]: a server whose root sits beside an
//! `outside` directory holding a secret. While the hostile client does its
//! worst, a well-behaved client with its own identity keeps putting, getting
//! and listing on its own connection ([`Arena::during`]). Afterwards
//! [`Arena::check`] asserts that nothing outside the root was created,
//! changed or read (names, sizes, contents, mtimes and atimes), that the
//! root holds exactly the expected user-visible names, and that no partial
//! upload is left behind.
//!
//! The cases that concern what the server stores run against both back
//! ends (`both_backends!`). Over the object store the arena's root is a
//! prefix of the test bucket with a sibling prefix `<root>-outside` holding
//! the secret, and `check` also asserts that every key in the whole bucket
//! lies under some test's root. S3 keeps no access times, so there a read
//! of the outside shows only in what the hostile client got back (every
//! case asserts it was refused). Cases about links, special files and a
//! directory swapped mid-put stay on a local root: a bucket has none of them.
//!
//! The cases, by what they attack: `sandbox` (escapes from the root),
//! `limits` (malformed, oversized and flooding requests), `identity` (who
//! may connect and what they may do). The arena is here.

#[path = "../common/mod.rs"]
mod common;

use std::collections::BTreeMap;
use std::fs::FileTimes;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime};

use common::{client_identity, garage, pattern, remote_code, Backend, TestServer};
use quinn::{ConnectionError, TransportErrorCode};
use qxfer::client::{Client, ConnectError};
use qxfer::endpoint::{client_endpoint, ServerLimits, TransportOpts};
use qxfer::paths::PARTIAL_DIR;
use qxfer::protocol::{
    encode, read_frame, Compression, Encoding, EntryKind, ErrorCode, FileMeta, GetRequest,
    ListRequest, PutRequest, Receipt, RemoteError, Request, Response, Trailer,
};
use qxfer::server::ServeConfig;
use qxfer::tls::{Fingerprint, PinnedServerVerifier};
use tempfile::TempDir;

mod identity;
mod limits;
mod sandbox;

const SECRET: &[u8] = b"top secret: must never leave the outside directory";

/// What a file outside the root looked like: kind, size, contents, mtime, atime.
type Snapshot = BTreeMap<PathBuf, (String, u64, Vec<u8>, SystemTime, SystemTime)>;

/// Records everything under `dir` without disturbing it: times are taken
/// before contents are read, and put back afterwards (futimens on a
/// read-only handle), so reading for the snapshot does not look like a read
/// by the server.
fn snapshot(dir: &Path) -> Snapshot {
    let mut out = Snapshot::new();
    walk(dir, dir, &mut out);
    out
}

fn walk(base: &Path, dir: &Path, out: &mut Snapshot) {
    let mut names: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    names.sort();
    for p in names {
        let md = std::fs::symlink_metadata(&p).unwrap();
        let (atime, mtime) = (md.accessed().unwrap(), md.modified().unwrap());
        let ft = md.file_type();
        let (kind, contents) = if ft.is_symlink() {
            let target = std::fs::read_link(&p).unwrap();
            ("link", target.display().to_string().into_bytes())
        } else {
            let contents = if ft.is_dir() {
                walk(base, &p, out);
                Vec::new()
            } else {
                std::fs::read(&p).unwrap()
            };
            std::fs::File::open(&p)
                .unwrap()
                .set_times(FileTimes::new().set_accessed(atime).set_modified(mtime))
                .unwrap();
            (if ft.is_dir() { "dir" } else { "file" }, contents)
        };
        let rel = p.strip_prefix(base).unwrap().to_owned();
        out.insert(rel, (kind.into(), md.len(), contents, mtime, atime));
    }
}

/// A server over `<tmp>/root` with `<tmp>/outside` beside it (over the
/// object store: a fresh prefix, with `<prefix>-outside` beside it too),
/// and a well-behaved client connected with its own identity.
struct Arena {
    server: TestServer,
    outer: TempDir,
    outside: PathBuf,
    before: Snapshot,
    /// The sibling prefix holding a secret, over the object store.
    outside_prefix: Option<String>,
    before_prefix: Snapshot,
    good: Client,
    _good_cfg: TempDir,
    work: TempDir,
    /// The server refuses puts: the well-behaved client only reads.
    read_only: bool,
}

/// A file every arena's root starts with, for read-only round trips.
const SEED: &str = "seed.txt";

impl Arena {
    async fn new(backend: Backend) -> Self {
        Self::with(backend, |_| {}, ServerLimits::default()).await
    }

    async fn with(
        backend: Backend,
        configure: impl FnOnce(&mut ServeConfig),
        limits: ServerLimits,
    ) -> Self {
        let outer = tempfile::tempdir().unwrap();
        let outside = outer.path().join("outside");
        std::fs::create_dir_all(outside.join("dir")).unwrap();
        let secret = outside.join("secret.txt");
        std::fs::write(&secret, SECRET).unwrap();
        // An atime older than the mtime: under relatime (and strictatime)
        // any read of the secret moves the atime, which check() would see.
        let old = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000_000);
        std::fs::File::options()
            .write(true)
            .open(&secret)
            .unwrap()
            .set_times(FileTimes::new().set_accessed(old))
            .unwrap();
        let mut read_only = false;
        let configure = |c: &mut ServeConfig| {
            configure(c);
            read_only = c.read_only;
        };
        let server = match backend {
            Backend::Local => {
                let root = outer.path().join("root");
                let certs = tempfile::tempdir().unwrap();
                TestServer::start_full(certs, &root, configure, limits).await
            }
            Backend::Object => {
                TestServer::start_on_full(backend, "security", configure, limits).await
            }
        };
        let outside_prefix = server.root.to_str().and_then(|r| {
            let rest = r.strip_prefix("s3://")?;
            Some(format!("{}-outside", rest.split_once('/')?.1))
        });
        if let Some(prefix) = &outside_prefix {
            let outer_root = PathBuf::from(format!("s3://{}/{prefix}", garage::garage().bucket));
            common::place_at(&outer_root, "secret.txt", SECRET).await;
            common::place_at(&outer_root, "dir/keep", b"kept").await;
        }
        server.place(SEED, &pattern(100_000, 77)).await;
        let good_cfg = tempfile::tempdir().unwrap();
        let good = Client::connect(&server.client_config(good_cfg.path()))
            .await
            .unwrap();
        let before_prefix = match &outside_prefix {
            Some(p) => prefix_snapshot(p).await,
            None => Snapshot::new(),
        };
        Self {
            before: snapshot(&outside),
            before_prefix,
            outside_prefix,
            server,
            outer,
            outside,
            good,
            _good_cfg: good_cfg,
            work: tempfile::tempdir().unwrap(),
            read_only,
        }
    }

    fn root(&self) -> &Path {
        &self.server.root
    }

    /// A local file with `contents`, to upload.
    fn local(&self, name: &str, contents: &[u8]) -> PathBuf {
        let p = self.work.path().join(name);
        std::fs::write(&p, contents).unwrap();
        p
    }

    /// A client with a new identity that the server admits.
    async fn client(&self) -> (Client, TempDir) {
        self.server.client().await
    }

    /// Runs `hostile` while the well-behaved client keeps doing full
    /// put/get/list round trips on its own connection. Every one of those
    /// must succeed, and at least one must overlap `hostile`.
    async fn during<T>(&self, hostile: impl Future<Output = T>) -> T {
        static ROUND: AtomicU64 = AtomicU64::new(0);
        let done = AtomicBool::new(false);
        let good = async {
            let mut rounds = 0;
            loop {
                let n = ROUND.fetch_add(1, Ordering::Relaxed);
                if self.read_only {
                    self.read_round(n).await;
                    rounds += 1;
                    if done.load(Ordering::Relaxed) {
                        return rounds;
                    }
                    continue;
                }
                let name = format!("good-{n}");
                let data = pattern(64 * 1024 + n as usize, n);
                let src = self.local(&name, &data);
                self.good
                    .put(&src, &name, false, &|_| {})
                    .await
                    .expect("the well-behaved client's put");
                let back = self.work.path().join(format!("{name}.back"));
                self.good
                    .get(&name, &back, false, &|_| {}, &|_| {})
                    .await
                    .expect("the well-behaved client's get");
                assert_eq!(std::fs::read(&back).unwrap(), data);
                let listed = self.good.list("").await.expect("the well-behaved ls");
                assert!(listed.iter().any(|e| e.name == name));
                self.server.remove(&name).await;
                rounds += 1;
                if done.load(Ordering::Relaxed) {
                    return rounds;
                }
            }
        };
        let hostile = async {
            let r = hostile.await;
            done.store(true, Ordering::Relaxed);
            r
        };
        let (r, rounds) = tokio::join!(hostile, good);
        assert!(rounds >= 1);
        r
    }

    /// A get of the seed file and a listing, by the well-behaved client.
    async fn read_round(&self, n: u64) {
        let back = self.work.path().join(format!("seed-{n}"));
        self.good
            .get(SEED, &back, false, &|_| {}, &|_| {})
            .await
            .expect("the well-behaved client's get");
        assert_eq!(std::fs::read(&back).unwrap(), pattern(100_000, 77));
        let listed = self.good.list("").await.expect("the well-behaved ls");
        assert!(listed.iter().any(|e| e.name == SEED));
    }

    /// The invariants every case ends with: the outside untouched (and
    /// unread), nothing new beside the root, the root holding exactly
    /// `expected` (plus the hidden, empty partial store), and a server that
    /// still serves a brand-new client.
    async fn check(&self, expected: &[&str]) {
        assert_eq!(
            snapshot(&self.outside),
            self.before,
            "something outside the root was created, changed or read"
        );
        let mut beside: Vec<_> = std::fs::read_dir(self.outer.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        beside.sort();
        let mut want_beside = vec!["outside"];
        if let Some(prefix) = &self.outside_prefix {
            assert_eq!(
                prefix_snapshot(prefix).await,
                self.before_prefix,
                "something beside the root's prefix was created or changed"
            );
            assert_every_key_is_in_a_test_root().await;
        } else {
            want_beside.push("root");
        }
        assert_eq!(beside, want_beside);
        let mut want: Vec<String> = expected.iter().map(|s| s.to_string()).collect();
        want.push(SEED.to_owned());
        want.sort();
        assert_eq!(self.server.stored_tree().await, want, "root contents");
        if self.read_only {
            self.read_round(u64::MAX).await;
        } else {
            self.server.assert_healthy().await;
        }
    }
}

/// What lies under `prefix` in the test bucket: each object's size, bytes
/// and modification time (S3 keeps no access time: it stands in for both).
async fn prefix_snapshot(prefix: &str) -> Snapshot {
    use futures::TryStreamExt;
    use object_store::{ObjectStore, ObjectStoreExt};
    let bucket = garage::bucket();
    let listed: Vec<_> = bucket
        .list(Some(&object_store::path::Path::from(prefix)))
        .try_collect()
        .await
        .unwrap();
    let mut out = Snapshot::new();
    for o in listed {
        let bytes = bucket
            .get(&o.location)
            .await
            .unwrap()
            .bytes()
            .await
            .unwrap();
        let when = SystemTime::from(o.last_modified);
        let name = PathBuf::from(o.location.as_ref());
        out.insert(name, ("object".into(), o.size, bytes.to_vec(), when, when));
    }
    out
}

/// Every key in the whole test bucket starts with a test root's prefix
/// (`LABEL-PID-N`, or an arena's `LABEL-PID-N-outside`): nothing any server
/// did escaped its prefix into the rest of the bucket.
async fn assert_every_key_is_in_a_test_root() {
    use futures::TryStreamExt;
    use object_store::ObjectStore;
    let listed: Vec<_> = garage::bucket().list(None).try_collect().await.unwrap();
    for o in listed {
        let key = o.location.as_ref();
        let first = key.split('/').next().unwrap();
        let first = first.strip_suffix("-outside").unwrap_or(first);
        let mut parts = first.rsplitn(3, '-');
        let numeric = |p: Option<&str>| {
            p.is_some_and(|p| !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()))
        };
        let in_root = numeric(parts.next()) && numeric(parts.next()) && parts.next().is_some();
        assert!(
            in_root && key.contains('/'),
            "key {key:?} is outside every test root"
        );
    }
}

/// Sends a whole small put at once, as a client pipelines it: the header
/// declaring `size` bytes, then `body` (the data and whatever follows it,
/// trailer or not), and the end of the stream.
async fn pipelined_raw_put(
    client: &Client,
    path: &str,
    size: u64,
    body: &[u8],
) -> quinn::RecvStream {
    let (mut send, recv) = client.connection().open_bi().await.unwrap();
    send.write_all(&common::put_header(path, size))
        .await
        .unwrap();
    let _ = send.write_all(body).await;
    let _ = send.finish();
    recv
}

/// The error a failed put answers with: `Refused`, or `PutAccepted` and a
/// failed receipt. A small upload is answered once its data is in, so its
/// failures of any kind come as `Refused`; a large one's data errors come
/// after it was accepted.
async fn put_failure(recv: &mut quinn::RecvStream) -> RemoteError {
    match read_frame::<_, Response>(recv).await.unwrap() {
        Response::Refused(e) => e,
        Response::PutAccepted(_) => match read_frame::<_, Receipt>(recv).await.unwrap() {
            Receipt::Failed(e) => e,
            other => panic!("{other:?}"),
        },
        other => panic!("{other:?}"),
    }
}

/// Sends a put header for `path` declaring `size` bytes and waits for the
/// server to accept it, returning the open stream. Only for uploads of
/// 256 KiB or more: a smaller one is answered only once its data is in.
async fn start_raw_put(
    client: &Client,
    path: &str,
    size: u64,
    force: bool,
) -> (quinn::SendStream, quinn::RecvStream) {
    let (mut send, mut recv) = client.connection().open_bi().await.unwrap();
    let req = Request::Put(PutRequest {
        path: path.into(),
        meta: FileMeta {
            size,
            mtime: None,
            mode: None,
        },
        force,
        resume: false,
        encoding: Encoding::Raw,
    });
    send.write_all(&encode(&req).unwrap()).await.unwrap();
    match read_frame::<_, Response>(&mut recv).await.unwrap() {
        Response::PutAccepted(_) => (send, recv),
        other => panic!("put of {path} not accepted: {other:?}"),
    }
}

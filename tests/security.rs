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
    ListRequest, PutRequest, Receipt, Request, Response, Trailer,
};
use qxfer::server::ServeConfig;
use qxfer::tls::{Fingerprint, PinnedServerVerifier};
use tempfile::TempDir;

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

both_backends!(
    name_traversal_in_every_form_is_refused,
    name_traversal_in_every_form_is_refused_on
);

async fn name_traversal_in_every_form_is_refused_on(backend: Backend) {
    let arena = Arena::new(backend).await;
    let (client, _cfg) = arena.client().await;
    let src = arena.local("payload", b"payload");
    let secret = arena.outside.join("secret.txt").display().to_string();
    let too_long = "a/".repeat(2049);
    let long_component = "b".repeat(4096);
    let cases: Vec<(&str, String)> = vec![
        ("leading ..", "../outside/secret.txt".into()),
        ("leading .. alone", "..".into()),
        ("inner ..", "a/../../outside/secret.txt".into()),
        ("inner .. staying inside", "a/../b".into()),
        ("trailing ..", "a/..".into()),
        ("trailing .. with slash", "a/b/../".into()),
        ("dot then ..", "./../outside/secret.txt".into()),
        ("absolute", secret.clone()),
        ("absolute root file", "/etc/passwd".into()),
        ("bare slash", "/".into()),
        ("NUL", "a\0b".into()),
        ("NUL hiding ..", "ok\0/../../x".into()),
        ("drive with backslash", "C:\\secret".into()),
        ("drive relative", "c:secret".into()),
        ("drive with slash", "D:/secret".into()),
        ("4,098 bytes", too_long),
        ("4,096-byte component", long_component),
        ("reserved partial store", format!("{PARTIAL_DIR}/x")),
        ("reserved temporary", ".qxfer-tmp-0123".into()),
        ("empty", String::new()),
    ];
    let hostile = async {
        for (what, name) in &cases {
            let (code, msg) = remote_code(client.put(&src, name, true, &|_| {}).await);
            assert_eq!(code, ErrorCode::InvalidPath, "put {what}: {msg}");
            assert!(msg.contains("invalid remote path"), "put {what}: {msg}");
            let dest = arena.work.path().join("got");
            let (code, msg) = remote_code(client.get(name, &dest, true, &|_| {}, &|_| {}).await);
            assert_eq!(code, ErrorCode::InvalidPath, "get {what}: {msg}");
            assert!(!dest.exists());
            if !name.is_empty() && name != "/" {
                let (code, msg) = remote_code(client.list(name).await);
                assert_eq!(code, ErrorCode::InvalidPath, "ls {what}: {msg}");
            }
            // rm and mv validate every name the same way, on either side of a rename.
            let (code, msg) = remote_code(client.remove(name, true).await);
            assert_eq!(code, ErrorCode::InvalidPath, "rm -r {what}: {msg}");
            let (code, msg) = remote_code(client.rename(name, "renamed").await);
            assert_eq!(code, ErrorCode::InvalidPath, "mv {what} renamed: {msg}");
            let (code, msg) = remote_code(client.rename(SEED, name).await);
            assert_eq!(code, ErrorCode::InvalidPath, "mv seed {what}: {msg}");
        }
    };
    arena.during(hostile).await;
    // A backslash or a control character is a plain byte of a Linux name
    // (refused before issue 18, so such files could not be copied): each
    // such name is one file inside the root, never a way out of it.
    let plain = ["..\\outside\\secret.txt", "a\\b", "a\nb"];
    for name in plain {
        client.put(&src, name, true, &|_| {}).await.unwrap();
    }
    client.close().await;
    arena.check(&plain).await;
}

#[tokio::test]
async fn symlinks_out_of_the_root_are_refused_for_get_put_and_ls() {
    use std::os::unix::fs::symlink;
    let arena = Arena::new(Backend::Local).await;
    let root = arena.root().to_owned();
    symlink("../outside", root.join("rel-dir")).unwrap();
    symlink(&arena.outside, root.join("abs-dir")).unwrap();
    symlink("../outside/secret.txt", root.join("rel-file")).unwrap();
    symlink(arena.outside.join("secret.txt"), root.join("abs-file")).unwrap();
    std::fs::create_dir(root.join("inner")).unwrap();
    symlink("../../outside", root.join("inner/deep-dir")).unwrap();
    // A link that stays inside the root is followed for get and ls.
    std::fs::write(root.join("shared.txt"), b"inside").unwrap();
    symlink("../shared.txt", root.join("inner/ok")).unwrap();
    symlink(&arena.outside, root.join("gone-link")).unwrap();
    let (client, _cfg) = arena.client().await;
    let src = arena.local("new.txt", b"must not land outside");
    let dest = arena.work.path().join("got");

    let hostile = async {
        for name in [
            "rel-file",
            "abs-file",
            "rel-dir/secret.txt",
            "abs-dir/secret.txt",
            "inner/deep-dir/secret.txt",
        ] {
            let (code, msg) = remote_code(client.get(name, &dest, true, &|_| {}, &|_| {}).await);
            assert_eq!(code, ErrorCode::OutsideRoot, "get {name}: {msg}");
            assert!(
                msg.contains(&format!("'{name}'")) && msg.contains("outside the served"),
                "{msg}"
            );
            assert!(!dest.exists());
        }
        for name in [
            "rel-dir/new.txt",
            "abs-dir/new.txt",
            "rel-dir/sub/new.txt",
            "inner/deep-dir/new.txt",
            "rel-dir/dir/new.txt",
        ] {
            let (code, msg) = remote_code(client.put(&src, name, true, &|_| {}).await);
            assert_eq!(code, ErrorCode::OutsideRoot, "put {name}: {msg}");
        }
        // A put onto a link is refused whatever it points at, with or without --force.
        for (name, force) in [("rel-file", false), ("abs-file", true), ("inner/ok", true)] {
            let (code, msg) = remote_code(client.put(&src, name, force, &|_| {}).await);
            assert_eq!(code, ErrorCode::Symlink, "put {name}: {msg}");
        }
        for name in [
            "rel-dir",
            "abs-dir",
            "rel-file",
            "inner/deep-dir",
            "rel-dir/dir",
        ] {
            let (code, msg) = remote_code(client.list(name).await);
            assert_eq!(code, ErrorCode::OutsideRoot, "ls {name}: {msg}");
        }
        // rm and mv go through no link out either; a link itself is
        // removed as a link, and what it points at stays.
        for name in [
            "rel-dir/secret.txt",
            "abs-dir/secret.txt",
            "inner/deep-dir/secret.txt",
        ] {
            let (code, msg) = remote_code(client.remove(name, false).await);
            assert_eq!(code, ErrorCode::OutsideRoot, "rm {name}: {msg}");
            let (code, msg) = remote_code(client.rename(name, "stolen").await);
            assert_eq!(code, ErrorCode::OutsideRoot, "mv {name} stolen: {msg}");
        }
        let (code, msg) = remote_code(client.rename(SEED, "rel-dir/planted").await);
        assert_eq!(code, ErrorCode::OutsideRoot, "mv into a link out: {msg}");
        // rm -r of a link to a directory outside removes the link, and
        // nothing it points at (check() compares the outside afterwards).
        client.remove("gone-link", true).await.unwrap();
        assert!(std::fs::symlink_metadata(root.join("gone-link")).is_err());
        // Listing the root shows the links as links, without following them.
        let listed = client.list("").await.unwrap();
        let kind = |n: &str| listed.iter().find(|e| e.name == n).map(|e| e.kind);
        assert_eq!(kind("rel-dir"), Some(EntryKind::Symlink));
        assert_eq!(kind("abs-file"), Some(EntryKind::Symlink));
        let file_link = listed.iter().find(|e| e.name == "rel-file").unwrap();
        assert_ne!(file_link.size, SECRET.len() as u64, "lstat, not stat");
        // Inside the root, links work.
        client
            .get("inner/ok", &dest, true, &|_| {}, &|_| {})
            .await
            .unwrap();
        assert_eq!(std::fs::read(&dest).unwrap(), b"inside");
        assert_eq!(client.list("inner/ok").await.unwrap().len(), 1);
    };
    arena.during(hostile).await;
    client.close().await;
    arena
        .check(&[
            "abs-dir",
            "abs-file",
            "inner",
            "inner/deep-dir",
            "inner/ok",
            "rel-dir",
            "rel-file",
            "shared.txt",
        ])
        .await;
}

/// Sends a put header for `path` declaring `size` bytes and waits for the
/// server to accept it, returning the open stream.
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

#[tokio::test]
async fn a_directory_swapped_for_a_symlink_during_a_put_cannot_redirect_it() {
    let arena = Arena::new(Backend::Local).await;
    let root = arena.root().to_owned();
    std::fs::create_dir(root.join("d")).unwrap();
    let (client, _cfg) = arena.client().await;
    let data = pattern(4 << 20, 11);
    let hostile = async {
        let (mut send, mut recv) =
            start_raw_put(&client, "d/victim", data.len() as u64, true).await;
        send.write_all(&data[..1 << 20]).await.unwrap();
        // Mid-upload, the directory is moved away and replaced by a link out.
        std::fs::rename(root.join("d"), root.join("d-moved")).unwrap();
        std::os::unix::fs::symlink(&arena.outside, root.join("d")).unwrap();
        send.write_all(&data[1 << 20..]).await.unwrap();
        let digest = *blake3::hash(&data).as_bytes();
        send.write_all(&encode(&Trailer { digest }).unwrap())
            .await
            .unwrap();
        send.finish().unwrap();
        read_frame::<_, Receipt>(&mut recv).await.unwrap()
    };
    let receipt = arena.during(hostile).await;
    // The upload finishes where it started: in the directory it opened.
    assert!(
        matches!(receipt, Receipt::Committed { size, .. } if size == data.len() as u64),
        "{receipt:?}"
    );
    assert_eq!(std::fs::read(root.join("d-moved/victim")).unwrap(), data);
    // And a new put through the swapped-in link is refused.
    let src = arena.local("again", b"again");
    let (code, _) = remote_code(client.put(&src, "d/again", false, &|_| {}).await);
    assert_eq!(code, ErrorCode::OutsideRoot);
    client.close().await;
    arena.check(&["d", "d-moved", "d-moved/victim"]).await;
}

/// Opens a raw stream, sends `bytes` as the request side, and returns the refusal.
async fn raw_refusal(client: &Client, bytes: &[u8], finish: bool) -> String {
    let (mut send, mut recv) = client.connection().open_bi().await.unwrap();
    send.write_all(bytes).await.unwrap();
    if finish {
        send.finish().unwrap();
    }
    let resp = tokio::time::timeout(Duration::from_secs(15), read_frame(&mut recv))
        .await
        .expect("the server answers")
        .unwrap();
    match resp {
        Response::Refused(e) => {
            assert_eq!(e.code, ErrorCode::Protocol, "{e:?}");
            e.message
        }
        other => panic!("expected a refusal, got {other:?}"),
    }
}

both_backends!(
    oversized_garbage_truncated_and_silent_headers_are_refused,
    oversized_garbage_truncated_and_silent_headers_are_refused_on
);

async fn oversized_garbage_truncated_and_silent_headers_are_refused_on(backend: Backend) {
    let arena = Arena::with(
        backend,
        |c| c.header_timeout = Duration::from_secs(2),
        ServerLimits::default(),
    )
    .await;
    let (client, _cfg) = arena.client().await;
    let hostile = async {
        // Oversized: a length prefix of 1 GiB, and a real 70,000-byte frame.
        let msg = raw_refusal(&client, &(1u32 << 30).to_be_bytes(), true).await;
        assert!(msg.contains("exceeds the 65536-byte limit"), "{msg}");
        let mut big = 70_000u32.to_be_bytes().to_vec();
        big.extend(std::iter::repeat_n(7u8, 70_000));
        let msg = raw_refusal(&client, &big, false).await;
        assert!(msg.contains("limit"), "{msg}");
        // Garbage: a plausible length, then bytes that decode to nothing.
        let mut garbage = 5u32.to_be_bytes().to_vec();
        garbage.extend_from_slice(&[0xde, 0xad, 0xbe, 0xef, 0xff]);
        let msg = raw_refusal(&client, &garbage, true).await;
        assert!(msg.contains("malformed"), "{msg}");
        // A valid frame with bytes left over inside it.
        let mut frame = encode(&Request::List(ListRequest {
            path: String::new(),
            recursive: false,
        }))
        .unwrap();
        frame.push(0);
        let len = (frame.len() - 4) as u32;
        frame[..4].copy_from_slice(&len.to_be_bytes());
        let msg = raw_refusal(&client, &frame, true).await;
        assert!(msg.contains("trailing"), "{msg}");
        // Truncated: half a header, then the stream ends.
        let frame = encode(&Request::Get(GetRequest {
            path: "some/file".into(),
            resume: None,
            compression: Compression::Never,
        }))
        .unwrap();
        let msg = raw_refusal(&client, &frame[..frame.len() / 2], true).await;
        assert!(msg.contains("ended"), "{msg}");
        // Silence: two bytes, then nothing; the server gives up at its
        // --header-timeout (2 s here; 10 s by default).
        let start = Instant::now();
        let msg = raw_refusal(&client, &[0, 0], false).await;
        assert!(msg.contains("within 2 s"), "{msg}");
        assert!(start.elapsed() >= Duration::from_millis(1900));
    };
    arena.during(hostile).await;
    client.close().await;
    arena.check(&[]).await;

    // A smaller --max-header-size applies to real requests too.
    let arena = Arena::with(
        backend,
        |c| c.max_header_size = 1024,
        ServerLimits::default(),
    )
    .await;
    let (client, _cfg) = arena.client().await;
    let src = arena.local("f", b"f");
    let long_name = format!("{}/f", "d".repeat(250)).repeat(5);
    let hostile = async {
        let err = client
            .put(&src, &long_name, false, &|_| {})
            .await
            .unwrap_err();
        assert!(err.to_string().contains("1024-byte limit"), "{err}");
    };
    arena.during(hostile).await;
    client.close().await;
    arena.check(&[]).await;
}

/// A raw put declaring `declared` bytes and sending `data` and its digest.
async fn raw_put(client: &Client, name: &str, declared: u64, data: &[u8]) -> Receipt {
    let (mut send, mut recv) = client.connection().open_bi().await.unwrap();
    send.write_all(&common::put_header(name, declared))
        .await
        .unwrap();
    let _ = send.write_all(data).await;
    let digest = *blake3::hash(data).as_bytes();
    let _ = send.write_all(&encode(&Trailer { digest }).unwrap()).await;
    let _ = send.finish();
    assert!(matches!(
        read_frame::<_, Response>(&mut recv).await.unwrap(),
        Response::PutAccepted(_)
    ));
    read_frame(&mut recv).await.unwrap()
}

both_backends!(
    declared_sizes_shorter_or_longer_than_the_data_are_refused,
    declared_sizes_shorter_or_longer_than_the_data_are_refused_on
);

async fn declared_sizes_shorter_or_longer_than_the_data_are_refused_on(backend: Backend) {
    let arena = Arena::new(backend).await;
    let (client, _cfg) = arena.client().await;
    let data = pattern(3 << 20, 9);
    let hostile = async {
        // Declared shorter than the data: the bytes after it are not a trailer.
        match raw_put(&client, "short", 1 << 20, &data).await {
            Receipt::Failed(e) => {
                assert_eq!(e.code, ErrorCode::Corrupt, "{e:?}");
                assert!(e.message.contains("'short'"), "{e:?}");
            }
            other => panic!("{other:?}"),
        }
        // Declared longer: the stream ends early.
        match raw_put(&client, "long", 5 << 20, &data).await {
            Receipt::Failed(e) => assert!(
                e.message.contains("'long'") && e.message.contains("ended"),
                "{e:?}"
            ),
            other => panic!("{other:?}"),
        }
        // Right size, wrong digest.
        let (mut send, mut recv) = start_raw_put(&client, "bad-digest", 3, false).await;
        send.write_all(b"abc").await.unwrap();
        send.write_all(&encode(&Trailer { digest: [0; 32] }).unwrap())
            .await
            .unwrap();
        send.finish().unwrap();
        match read_frame::<_, Receipt>(&mut recv).await.unwrap() {
            Receipt::Failed(e) => assert_eq!(e.code, ErrorCode::Corrupt),
            other => panic!("{other:?}"),
        }
        // Extra bytes after a correct trailer.
        let (mut send, mut recv) = start_raw_put(&client, "extra", 3, false).await;
        send.write_all(b"abc").await.unwrap();
        let digest = *blake3::hash(b"abc").as_bytes();
        send.write_all(&encode(&Trailer { digest }).unwrap())
            .await
            .unwrap();
        send.write_all(b"more").await.unwrap();
        send.finish().unwrap();
        match read_frame::<_, Receipt>(&mut recv).await.unwrap() {
            Receipt::Failed(e) => assert!(e.message.contains("more data"), "{e:?}"),
            other => panic!("{other:?}"),
        }
    };
    arena.during(hostile).await;
    // The upload that ended early was interrupted like any dropped
    // connection: on a local root its bytes wait, hidden in the partial
    // store, for a resume (or for --partial-ttl). Over the object store a
    // file smaller than one part (8 MiB) goes up in one PUT after its
    // digest matched, so there is nothing to resume and nothing is kept.
    // Either way nothing is visible under a user name.
    let kept = arena.server.partials().await;
    match backend {
        Backend::Local => {
            assert_eq!(kept.len(), 1, "{kept:?}");
            assert!(kept[0].starts_with("part-"), "{kept:?}");
        }
        Backend::Object => assert!(kept.is_empty(), "{kept:?}"),
    }
    arena.server.clear_partials().await;
    client.close().await;
    arena.check(&[]).await;
}

both_backends!(
    a_thousand_streams_at_once_are_all_served_within_the_stream_limit,
    a_thousand_streams_at_once_are_all_served_within_the_stream_limit_on
);

async fn a_thousand_streams_at_once_are_all_served_within_the_stream_limit_on(backend: Backend) {
    let arena = Arena::new(backend).await;
    arena.server.place("small.txt", b"small file").await;
    let (client, _cfg) = arena.client().await;
    let hostile = async {
        let mut tasks = tokio::task::JoinSet::new();
        for i in 0..1000 {
            let conn = client.connection().clone();
            tasks.spawn(async move {
                // Opening blocks while 64 streams are open: the server's limit.
                let (mut send, mut recv) = conn.open_bi().await.unwrap();
                let req = if i % 2 == 0 {
                    Request::Get(GetRequest {
                        path: "small.txt".into(),
                        resume: None,
                        compression: Compression::Never,
                    })
                } else {
                    Request::List(ListRequest {
                        path: String::new(),
                        recursive: false,
                    })
                };
                send.write_all(&encode(&req).unwrap()).await.unwrap();
                send.finish().unwrap();
                match read_frame::<_, Response>(&mut recv).await.unwrap() {
                    Response::GetAccepted(offer) => {
                        let mut data = vec![0; offer.meta.size as usize];
                        recv.read_exact(&mut data).await.unwrap();
                        assert_eq!(data, b"small file");
                        let _: Trailer = read_frame(&mut recv).await.unwrap();
                    }
                    Response::ListAccepted => {}
                    other => panic!("{other:?}"),
                }
            });
        }
        let mut served = 0;
        while let Some(r) = tasks.join_next().await {
            r.unwrap();
            served += 1;
        }
        served
    };
    assert_eq!(arena.during(hostile).await, 1000);
    client.close().await;
    arena.check(&["small.txt"]).await;
}

/// Connects `n` clients at once from the identities in `dirs` (cycled) and
/// asks each for a listing. Returns the clients that were served (still
/// open) and the errors of the others.
async fn connect_many(
    server: &TestServer,
    dirs: &[PathBuf],
    n: usize,
) -> (Vec<Client>, Vec<ConnectError>) {
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..n {
        let mut config = common::client_config(server.addr, &dirs[i % dirs.len()]);
        config.pin = Some(server.fingerprint);
        tasks.spawn(async move {
            let client = Client::connect(&config).await?;
            match client.list("").await {
                Ok(_) => Ok(client),
                Err(e) => Err(client
                    .refusal()
                    .unwrap_or_else(|| panic!("a failure that is not a refusal: {e}"))),
            }
        });
    }
    let (mut ok, mut refused) = (Vec::new(), Vec::new());
    while let Some(r) = tasks.join_next().await {
        match r.unwrap() {
            Ok(c) => ok.push(c),
            Err(e) => refused.push(e),
        }
    }
    (ok, refused)
}

/// Closes every client at once (each waits for its close to go out).
async fn close_all(clients: Vec<Client>) {
    let mut tasks = tokio::task::JoinSet::new();
    for c in clients {
        tasks.spawn(c.close());
    }
    while tasks.join_next().await.is_some() {}
}

both_backends!(
    three_hundred_connections_at_once_hit_clear_limits,
    three_hundred_connections_at_once_hit_clear_limits_on
);

async fn three_hundred_connections_at_once_hit_clear_limits_on(backend: Backend) {
    let arena = Arena::new(backend).await;
    // One identity opening 300 connections gets its 32 and no more.
    let one = tempfile::tempdir().unwrap();
    arena.server.authorize(one.path());
    let dirs = vec![one.path().to_owned()];
    // The identity is known only after the handshake, so while 300
    // handshakes are in flight some meet the global limit first.
    let (ok, refused) = arena.during(connect_many(&arena.server, &dirs, 300)).await;
    assert_eq!(ok.len(), 32, "--max-connections-per-client default");
    assert_eq!(refused.len(), 268);
    let mut per_client = 0;
    for e in &refused {
        match e {
            ConnectError::TooManyFromClient { .. } => {
                assert!(
                    e.to_string().contains("--max-connections-per-client"),
                    "{e}"
                );
                per_client += 1;
            }
            ConnectError::Busy { .. } => {}
            other => panic!("{other:?}"),
        }
    }
    assert!(per_client > 0, "the per-client limit refused none");
    close_all(ok).await;

    // 300 different identities fill the server's 256 slots (one is the
    // well-behaved client's); the rest are told the server is busy.
    let homes: Vec<TempDir> = (0..300).map(|_| tempfile::tempdir().unwrap()).collect();
    for h in &homes {
        arena.server.authorize(h.path());
    }
    let dirs: Vec<PathBuf> = homes.iter().map(|h| h.path().to_owned()).collect();
    let (ok, refused) = arena.during(connect_many(&arena.server, &dirs, 300)).await;
    assert_eq!(ok.len() + refused.len(), 300);
    assert!(
        (250..=255).contains(&ok.len()),
        "{} admitted with 255 slots free",
        ok.len()
    );
    for e in &refused {
        assert!(matches!(e, ConnectError::Busy { .. }), "{e:?}");
        assert!(e.to_string().contains("--max-connections"), "{e}");
    }
    close_all(ok).await;
    arena.check(&[]).await;
}

both_backends!(
    unknown_and_missing_client_certificates_are_refused,
    unknown_and_missing_client_certificates_are_refused_on
);

async fn unknown_and_missing_client_certificates_are_refused_on(backend: Backend) {
    let arena = Arena::new(backend).await;
    let src = arena.local("f", b"f");
    // A client the server has never heard of.
    let stranger = tempfile::tempdir().unwrap();
    let fp = client_identity(stranger.path());
    let config = common::client_config(arena.server.addr, stranger.path());
    let hostile = async {
        let err = match Client::connect(&config).await {
            Err(e) => e,
            Ok(client) => {
                // TLS 1.3: the refusal may arrive just after our handshake ends.
                client.put(&src, "f", false, &|_| {}).await.unwrap_err();
                client.refusal().expect("the failure is a refusal")
            }
        };
        let msg = err.to_string();
        assert!(matches!(err, ConnectError::Refused { .. }), "{err:?}");
        assert!(
            msg.contains("refused this client")
                && msg.contains(&fp.to_string())
                && msg.contains("qxfer id"),
            "{msg}"
        );
        // No certificate at all.
        let verifier = PinnedServerVerifier::new(Some(arena.server.fingerprint));
        let endpoint =
            client_endpoint(arena.server.addr, verifier, None, &TransportOpts::default()).unwrap();
        let connecting = endpoint.connect(arena.server.addr, "qxfer").unwrap();
        let reason = match connecting.await {
            Err(e) => e,
            Ok(conn) => {
                let request = async {
                    let (mut send, mut recv) = conn.open_bi().await?;
                    let list = Request::List(ListRequest {
                        path: String::new(),
                        recursive: false,
                    });
                    send.write_all(&encode(&list).unwrap()).await?;
                    read_frame::<_, Response>(&mut recv).await?;
                    anyhow::Ok(())
                };
                assert!(request.await.is_err(), "served without a certificate");
                conn.closed().await
            }
        };
        let closed = match &reason {
            ConnectionError::ConnectionClosed(c) => Some(c.error_code),
            _ => None,
        };
        // TLS certificate_required (116), carried as QUIC crypto error 0x174.
        assert_eq!(closed, Some(TransportErrorCode::crypto(116)), "{reason}");
    };
    arena.during(hostile).await;
    arena.check(&[]).await;
}

both_backends!(
    authorized_clients_is_reread_when_it_changes,
    authorized_clients_is_reread_when_it_changes_on
);

async fn authorized_clients_is_reread_when_it_changes_on(backend: Backend) {
    let arena = Arena::new(backend).await;
    let cfg = tempfile::tempdir().unwrap();
    let config = common::client_config(arena.server.addr, cfg.path());
    let list_ok = || async {
        let client = Client::connect(&config).await.ok()?;
        let r = client.list("").await.ok();
        client.close().await;
        r
    };
    assert!(list_ok().await.is_none(), "not yet authorized");
    let fp = arena.server.authorize(cfg.path());
    assert!(list_ok().await.is_some(), "admitted without a restart");
    let kept: String = std::fs::read_to_string(&arena.server.allowlist)
        .unwrap()
        .lines()
        .filter(|l| !l.contains(&fp.to_string()))
        .map(|l| format!("{l}\n"))
        .collect();
    std::fs::write(&arena.server.allowlist, kept).unwrap();
    assert!(list_ok().await.is_none(), "removed again");
    // The well-behaved client, admitted earlier, keeps its connection.
    arena.check(&[]).await;
}

both_backends!(
    a_changed_server_key_and_a_wrong_pin_are_refused_by_the_client,
    a_changed_server_key_and_a_wrong_pin_are_refused_by_the_client_on
);

async fn a_changed_server_key_and_a_wrong_pin_are_refused_by_the_client_on(backend: Backend) {
    let arena = Arena::new(backend).await;
    let cfg = tempfile::tempdir().unwrap();
    let mut config = arena.server.client_config(cfg.path());
    let hostile = async {
        // Recorded on first contact...
        let client = Client::connect(&config).await.unwrap();
        let (fp, file) = client.first_contact.clone().unwrap();
        assert_eq!(fp, arena.server.fingerprint);
        client.close().await;
        // ...then the same address presents another key.
        let other: Fingerprint = "SHA256:AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA"
            .parse()
            .unwrap();
        std::fs::write(&file, format!("# comment\n{} {other}\n", config.server)).unwrap();
        let err = Client::connect(&config).await.unwrap_err();
        let msg = err.to_string();
        assert!(
            matches!(err, ConnectError::HostKeyChanged { line: 2, .. }),
            "{err:?}"
        );
        assert!(
            msg.contains("IDENTITY CHANGED")
                && msg.contains(&file.display().to_string())
                && msg.contains(&arena.server.fingerprint.to_string()),
            "{msg}"
        );
        // The record is left for the user to fix, not silently rewritten.
        assert!(std::fs::read_to_string(&file)
            .unwrap()
            .contains(&other.to_string()));
        // A wrong --pin is refused, and never recorded.
        std::fs::remove_file(&file).unwrap();
        config.pin = Some(other);
        let err = Client::connect(&config).await.unwrap_err();
        assert!(matches!(err, ConnectError::PinMismatch { .. }), "{err:?}");
        assert!(err.to_string().contains("pinned"), "{err}");
        assert!(!file.exists());
    };
    arena.during(hostile).await;
    arena.check(&[]).await;
}

both_backends!(
    a_put_to_an_existing_name_needs_force,
    a_put_to_an_existing_name_needs_force_on
);

async fn a_put_to_an_existing_name_needs_force_on(backend: Backend) {
    let arena = Arena::new(backend).await;
    arena.server.place("f", b"original").await;
    let (client, _cfg) = arena.client().await;
    let src = arena.local("f", &pattern(3 << 20, 3));
    let hostile = async {
        let (code, msg) = remote_code(client.put(&src, "f", false, &|_| {}).await);
        assert_eq!(code, ErrorCode::AlreadyExists);
        assert!(msg.contains("'f'") && msg.contains("--force"), "{msg}");
        // Raw: the data arrives anyway (pipelined); it is dropped, not written.
        let (mut send, mut recv) = client.connection().open_bi().await.unwrap();
        let req = Request::Put(PutRequest {
            path: "f".into(),
            meta: FileMeta {
                size: 5,
                mtime: None,
                mode: None,
            },
            force: false,
            resume: false,
            encoding: Encoding::Raw,
        });
        send.write_all(&encode(&req).unwrap()).await.unwrap();
        let _ = send.write_all(b"evil!").await;
        let _ = send.finish();
        match read_frame::<_, Response>(&mut recv).await.unwrap() {
            Response::Refused(e) => assert_eq!(e.code, ErrorCode::AlreadyExists),
            other => panic!("{other:?}"),
        }
    };
    arena.during(hostile).await;
    assert_eq!(arena.server.stored("f").await, b"original");
    client.close().await;
    arena.check(&["f"]).await;
}

both_backends!(
    a_read_only_server_refuses_every_put,
    a_read_only_server_refuses_every_put_on
);

async fn a_read_only_server_refuses_every_put_on(backend: Backend) {
    let arena = Arena::with(backend, |c| c.read_only = true, ServerLimits::default()).await;
    arena.server.place("shared", b"read me").await;
    let (client, _cfg) = arena.client().await;
    let src = arena.local("up", &pattern(2 << 20, 5));
    let hostile = async {
        for (name, force) in [("up", false), ("shared", true), ("new/dir/up", false)] {
            let (code, msg) = remote_code(client.put(&src, name, force, &|_| {}).await);
            assert_eq!(code, ErrorCode::ReadOnly, "{name}");
            assert!(
                msg.contains(&format!("'{name}'")) && msg.contains("read-only"),
                "{msg}"
            );
        }
        // Nor may it create directories.
        let (code, msg) = remote_code(client.mkdir("newdir", None).await);
        assert_eq!(code, ErrorCode::ReadOnly, "{msg}");
        // Reads still work.
        let back = arena.work.path().join("shared");
        client
            .get("shared", &back, false, &|_| {}, &|_| {})
            .await
            .unwrap();
        assert_eq!(std::fs::read(&back).unwrap(), b"read me");
    };
    arena.during(hostile).await;
    client.close().await;
    arena.check(&["shared"]).await;
}

#[tokio::test]
async fn special_files_and_a_hijacked_partial_store_cannot_hang_or_escape_the_server() {
    let arena = Arena::new(Backend::Local).await;
    let root = arena.root().to_owned();
    // A FIFO: opening it for reading would block forever without O_NONBLOCK.
    let fifo = std::ffi::CString::new(root.join("pipe").as_os_str().as_encoded_bytes()).unwrap();
    // SAFETY: mkfifo reads a valid NUL-terminated path.
    assert_eq!(unsafe { libc::mkfifo(fifo.as_ptr(), 0o644) }, 0);
    // Someone on the server replaced the partial store with a link out.
    std::os::unix::fs::symlink(&arena.outside, root.join(PARTIAL_DIR)).unwrap();
    let (client, _cfg) = arena.client().await;
    let src = arena.local("x", b"x");
    let big = arena.local("big", &vec![1u8; qxfer::protocol::RESUME_MIN as usize]);
    let hostile = async {
        let dest = arena.work.path().join("pipe");
        let start = Instant::now();
        let (code, msg) = remote_code(client.get("pipe", &dest, false, &|_| {}, &|_| {}).await);
        assert_eq!(code, ErrorCode::NotFound, "{msg}");
        assert!(msg.contains("not a regular file"), "{msg}");
        assert!(start.elapsed() < Duration::from_secs(5));
        let listed = client.list("").await.unwrap();
        let pipe = listed.iter().find(|e| e.name == "pipe").unwrap();
        assert_eq!(pipe.kind, EntryKind::Other);
        assert!(
            !listed.iter().any(|e| e.name.starts_with(".qxfer-")),
            "the partial store is never listed"
        );
        // With the store hijacked, resumable (large) puts, which are
        // assembled there, fail clearly instead of writing outside; small
        // ones never touch the store and land in the root.
        let err = client.put(&big, "big", false, &|_| {}).await.unwrap_err();
        assert!(err.to_string().contains("'big'"), "{err}");
        client.put(&src, "x", false, &|_| {}).await.unwrap();
    };
    // The well-behaved client's puts need the store too: restore it once the
    // hostile part is over, then run the usual checks.
    hostile.await;
    std::fs::remove_file(root.join(PARTIAL_DIR)).unwrap();
    arena.during(async {}).await;
    client.close().await;
    arena.check(&["pipe", "x"]).await;
}

#[tokio::test]
async fn mkdir_and_recursive_listings_stay_inside_the_root() {
    use qxfer::protocol::DirMeta;
    use std::os::unix::fs::symlink;
    let arena = Arena::new(Backend::Local).await;
    let root = arena.root().to_owned();
    symlink("../outside", root.join("rel-dir")).unwrap();
    symlink(&arena.outside, root.join("abs-dir")).unwrap();
    std::fs::create_dir_all(root.join("tree/sub")).unwrap();
    std::fs::write(root.join("tree/sub/f"), b"f").unwrap();
    symlink("../../../outside", root.join("tree/sub/out")).unwrap();
    let (client, _cfg) = arena.client().await;
    let meta = DirMeta {
        mode: Some(0o4777),
        mtime: None,
    };
    let hostile = async {
        // Mkdir resolves names like any other path (invalid names and modes
        // are checked on both back ends in `mkdir_names_and_modes_are_checked`).
        for name in [
            "rel-dir/new",
            "abs-dir/new/deeper",
            "tree/sub/out/new",
            "rel-dir",
        ] {
            let (code, msg) = remote_code(client.mkdir(name, Some(meta)).await);
            assert_eq!(code, ErrorCode::OutsideRoot, "mkdir {name:?}: {msg}");
        }
        // Recursive listings list links as links and never descend into them.
        let listed = client.list_tree("").await.unwrap();
        let names: Vec<&str> = listed.iter().map(|e| e.name.as_str()).collect();
        assert!(names.contains(&"tree/sub/out"), "{names:?}");
        assert!(
            !names
                .iter()
                .any(|n| n.contains("secret") || n.starts_with("rel-dir/")),
            "{names:?}"
        );
        assert!(!names.iter().any(|n| n.contains(".qxfer-")), "{names:?}");
        let kind = |n: &str| listed.iter().find(|e| e.name == n).map(|e| e.kind);
        assert_eq!(kind("abs-dir"), Some(EntryKind::Symlink));
        for name in ["rel-dir", "abs-dir", "tree/sub/out"] {
            let (code, msg) = remote_code(client.list_tree(name).await);
            assert_eq!(code, ErrorCode::OutsideRoot, "ls -r {name}: {msg}");
        }
    };
    arena.during(hostile).await;
    client.close().await;
    arena
        .check(&[
            "abs-dir",
            "rel-dir",
            "tree",
            "tree/sub",
            "tree/sub/f",
            "tree/sub/out",
        ])
        .await;
}

both_backends!(mkdir_names_and_modes_are_checked, mkdir_names_and_modes_on);

/// What mkdir does with hostile names and modes, on either back end (the
/// links of the test above exist only on a local root).
async fn mkdir_names_and_modes_on(backend: Backend) {
    use qxfer::protocol::DirMeta;
    let arena = Arena::new(backend).await;
    arena.server.place("file", b"f").await;
    let (client, _cfg) = arena.client().await;
    let meta = DirMeta {
        mode: Some(0o4777),
        mtime: None,
    };
    let hostile = async {
        for name in [
            "../escape",
            "/tmp/abs",
            "",
            "a/../../b",
            ".qxfer-partial/x",
            ".qxfer-sums/x",
            ".qxfer-tmp-1",
            "C:\\x",
            "a\0b",
        ] {
            let (code, msg) = remote_code(client.mkdir(name, Some(meta)).await);
            assert_eq!(code, ErrorCode::InvalidPath, "mkdir {name:?}: {msg}");
        }
        // A file is in the way: neither it nor anything beneath it becomes a directory.
        let (code, msg) = remote_code(client.mkdir("file", Some(meta)).await);
        assert_eq!(code, ErrorCode::NotDirectory, "mkdir file: {msg}");
        assert!(msg.contains("'file'") && msg.contains("a file"), "{msg}");
        let (code, msg) = remote_code(client.mkdir("file/below", Some(meta)).await);
        assert_eq!(code, ErrorCode::NotDirectory, "mkdir file/below: {msg}");
        assert!(msg.contains("parent"), "{msg}");
        // A legitimate mkdir never sets set-id or group/other write bits.
        client.mkdir("made/here", Some(meta)).await.unwrap();
        let listed = client.list("made").await.unwrap();
        assert_eq!(listed.len(), 1, "{listed:?}");
        assert_eq!(listed[0].kind, EntryKind::Dir);
        assert_eq!(listed[0].mode, Some(0o755), "{listed:?}");
    };
    arena.during(hostile).await;
    client.close().await;
    arena.check(&["file", "made", "made/here"]).await;
}

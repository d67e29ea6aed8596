//! Errors an ordinary user can meet (missing files, full disks, unreachable servers...): each is reported clearly and the server keeps serving, over a local root and, where the case concerns what the server stores, over the object store too. Hostile input is in security.rs.

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{is_root, pattern, remote_code, tree, Backend, TestServer};
use qxfer::client::{Client, ConnectError};
use qxfer::protocol::{encode, read_frame, ErrorCode, FileMeta, Receipt, Response};
use qxfer::tls::Identity;

both_backends!(
    missing_file_and_directory_are_clear_errors,
    missing_file_and_directory_are_clear_errors_on
);

async fn missing_file_and_directory_are_clear_errors_on(backend: Backend) {
    let server = TestServer::start_on(backend, "errors").await;
    let (client, _cfg) = server.client().await;
    let dir = tempfile::tempdir().unwrap();
    let dest = dir.path().join("out");

    let (code, msg) = remote_code(client.get("nope.txt", &dest, false, &|_| {}, &|_| {}).await);
    assert_eq!(code, ErrorCode::NotFound);
    assert!(
        msg.contains("'nope.txt'") && msg.contains("qxfer ls"),
        "{msg}"
    );
    assert!(!dest.exists());

    // A directory made by someone else on the server (over the object
    // store: a name something lies beneath).
    server.place("adir/inside", b"").await;
    let (code, msg) = remote_code(client.get("adir", &dest, false, &|_| {}, &|_| {}).await);
    assert_eq!(code, ErrorCode::IsDirectory);
    assert!(msg.contains("'adir' is a directory"), "{msg}");

    let src = dir.path().join("f");
    std::fs::write(&src, b"x").unwrap();
    let (code, _) = remote_code(client.put(&src, "adir", false, &|_| {}).await);
    assert_eq!(code, ErrorCode::IsDirectory);
    let (code, msg) = remote_code(client.list("nope").await);
    assert_eq!(code, ErrorCode::NotFound, "{msg}");

    // Putting a directory is refused locally, naming it.
    let err = client
        .put(dir.path(), "d", false, &|_| {})
        .await
        .unwrap_err();
    assert!(err.to_string().contains("is a directory"), "{err}");
    let err = client
        .put(&dir.path().join("missing"), "m", false, &|_| {})
        .await
        .unwrap_err();
    assert!(err.to_string().contains("missing"), "{err}");
    server.assert_healthy().await;
}

#[tokio::test]
async fn unreachable_server_fails_within_seconds_naming_the_address() {
    // A bound socket that never answers: the handshake can only time out.
    let silent = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let addr = silent.local_addr().unwrap();
    let cfg = tempfile::tempdir().unwrap();
    let config = common::client_config(addr, cfg.path());
    let start = Instant::now();
    let err = Client::connect(&config).await.unwrap_err();
    let took = start.elapsed();
    assert!(matches!(err, ConnectError::Unreachable { .. }), "{err:?}");
    assert!(err.to_string().contains(&addr.to_string()), "{err}");
    assert!(took < Duration::from_secs(8), "took {took:?}");
    assert!(!cfg.path().join("known_hosts").exists(), "nothing trusted");
}

#[tokio::test]
async fn a_quic_server_of_another_protocol_is_named_as_such() {
    let dirs = tempfile::tempdir().unwrap();
    let identity = Identity::load_or_generate(dirs.path(), "other").unwrap();
    let mut tls = rustls::ServerConfig::builder_with_provider(qxfer::tls::crypto_provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(vec![identity.cert.clone()], identity.key.clone_key())
        .unwrap();
    tls.alpn_protocols = vec![b"h3".to_vec()];
    let crypto = quinn::crypto::rustls::QuicServerConfig::try_from(tls).unwrap();
    let endpoint = quinn::Endpoint::server(
        quinn::ServerConfig::with_crypto(Arc::new(crypto)),
        "127.0.0.1:0".parse().unwrap(),
    )
    .unwrap();
    let addr = endpoint.local_addr().unwrap();
    let ep = endpoint.clone();
    tokio::spawn(async move {
        while let Some(incoming) = ep.accept().await {
            let _ = incoming.await;
        }
    });
    let cfg = tempfile::tempdir().unwrap();
    let config = common::client_config(addr, cfg.path());
    let err = Client::connect(&config).await.unwrap_err();
    assert!(matches!(err, ConnectError::NotQxfer { .. }), "{err:?}");
    assert!(err.to_string().contains("is not a qxfer server"), "{err}");
    endpoint.close(0u32.into(), b"");
}

/// Local root only: file permissions of the server's user; an object
/// store's refusals (a wrong key, a missing bucket) are start-up errors,
/// tested in tests/object_store.rs.
#[tokio::test]
async fn permission_denied_on_the_server_is_reported() {
    if is_root() {
        println!("skipped here: root bypasses file permissions; tests/cli.rs covers this by running the binaries as nobody");
        return;
    }
    use std::os::unix::fs::PermissionsExt;
    let server = TestServer::start().await;
    let (client, _cfg) = server.client().await;
    let locked = server.root.join("locked");
    std::fs::write(&locked, b"x").unwrap();
    std::fs::set_permissions(&locked, std::fs::Permissions::from_mode(0o000)).unwrap();
    let ro = server.root.join("ro");
    std::fs::create_dir(&ro).unwrap();
    std::fs::set_permissions(&ro, std::fs::Permissions::from_mode(0o555)).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let (code, _) = remote_code(
        client
            .get("locked", &dir.path().join("l"), false, &|_| {}, &|_| {})
            .await,
    );
    assert_eq!(code, ErrorCode::PermissionDenied);
    let src = dir.path().join("f");
    std::fs::write(&src, b"x").unwrap();
    let (code, msg) = remote_code(client.put(&src, "ro/f", false, &|_| {}).await);
    assert_eq!(code, ErrorCode::PermissionDenied, "{msg}");
    // Locally: an unwritable destination folder.
    let local_ro = dir.path().join("ro");
    std::fs::create_dir(&local_ro).unwrap();
    std::fs::set_permissions(&local_ro, std::fs::Permissions::from_mode(0o555)).unwrap();
    std::fs::write(server.root.join("ok"), b"ok").unwrap();
    let err = client
        .get("ok", &local_ro.join("ok"), false, &|_| {}, &|_| {})
        .await
        .unwrap_err();
    assert!(err.to_string().contains("ermission denied"), "{err}");
    std::fs::set_permissions(&ro, std::fs::Permissions::from_mode(0o755)).unwrap();
    server.assert_healthy().await;
}

/// A small tmpfs mounted in a private mount namespace would need unshare;
/// as root we mount it directly in a temp dir and unmount on drop.
struct TinyDisk {
    dir: tempfile::TempDir,
}

impl TinyDisk {
    fn mount(size: &str) -> Option<Self> {
        if !is_root() {
            println!("skipped: filling a disk needs root to mount a small tmpfs");
            return None;
        }
        let dir = tempfile::tempdir().unwrap();
        let ok = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir.path())
            .status()
            .map(|s| s.success())
            .unwrap_or(false);
        if !ok {
            println!("skipped: cannot mount a tmpfs here");
            return None;
        }
        Some(Self { dir })
    }
}

impl Drop for TinyDisk {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg(self.dir.path())
            .status();
    }
}

/// Opens a raw put of `size` bytes for `name` over `client`'s connection
/// and waits for the server to accept it (its space reserved), the data
/// not yet sent.
async fn accepted_put(
    client: &Client,
    name: &str,
    size: u64,
) -> (quinn::SendStream, quinn::RecvStream) {
    let (mut send, mut recv) = client.connection().open_bi().await.unwrap();
    send.write_all(&common::put_header(name, size))
        .await
        .unwrap();
    assert!(matches!(
        read_frame::<_, Response>(&mut recv).await.unwrap(),
        Response::PutAccepted(_)
    ));
    (send, recv)
}

/// Local root only: a tmpfs that fills up. The object store's nearest
/// failure, a store that stops answering, is tested in tests/object_faults.rs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_disks_are_reported_on_either_side() {
    let Some(disk) = TinyDisk::mount("1m") else {
        return;
    };
    let root = disk.dir.path().join("root");
    let server = TestServer::start_in(tempfile::tempdir().unwrap(), &root).await;
    let (client, _cfg) = server.client().await;
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("big");
    std::fs::write(&src, pattern(4 << 20, 4)).unwrap();

    // Refused up front: the declared size does not fit in the free space.
    let (code, msg) = remote_code(client.put(&src, "big", false, &|_| {}).await);
    assert_eq!(code, ErrorCode::NoSpace, "{msg}");
    assert!(msg.contains("'big'") && msg.contains("free"), "{msg}");
    assert!(tree(&server.root).is_empty(), "{:?}", tree(&server.root));

    // Running out mid-write: a raw put of 700 KiB passes the free-space
    // check while the disk is empty, then another writer on the server's
    // machine fills the disk (qxfer's own uploads would count the space the
    // first one reserved), and only then does the first one send its data.
    let (mut send, mut recv) = accepted_put(&client, "late", 700 << 10).await;
    std::fs::write(server.root.join("first"), pattern(700 << 10, 5)).unwrap();
    let data = pattern(700 << 10, 6);
    let _ = send.write_all(&data).await;
    let _ = send.finish();
    let msg = match read_frame::<_, Receipt>(&mut recv).await.unwrap() {
        Receipt::Failed(e) => {
            assert_eq!(e.code, ErrorCode::NoSpace, "{}", e.message);
            e.message
        }
        other => panic!("{other:?}"),
    };
    assert!(
        msg.contains("'late'") && msg.contains("disk is full"),
        "{msg}"
    );
    assert_eq!(
        tree(&server.root),
        vec!["first".to_owned()],
        "partial upload removed"
    );
    std::fs::remove_file(server.root.join("first")).unwrap();
    server.assert_healthy().await;

    // Data of unknown length (put -) reserves nothing up front: it runs
    // out mid-write, is named, and leaves nothing behind.
    let input = std::fs::File::open(&src).unwrap();
    let err = client
        .put_stream(input, "piped", false, &|_| {})
        .await
        .unwrap_err();
    let msg = err.to_string();
    assert!(
        msg.contains("'piped'") && msg.contains("disk is full"),
        "{msg}"
    );
    assert!(tree(&server.root).is_empty(), "{:?}", tree(&server.root));
    server.assert_healthy().await;

    // Nor does it take the space a sized upload in flight was promised:
    // 700 KiB are reserved (header sent, data not yet), so 500 KiB from a
    // pipe do not fit, and the reserved upload then completes.
    let (mut send, mut recv) = accepted_put(&client, "promised", 700 << 10).await;
    let small = dir.path().join("small");
    std::fs::write(&small, pattern(500 << 10, 8)).unwrap();
    let err = client
        .put_stream(
            std::fs::File::open(&small).unwrap(),
            "piped",
            false,
            &|_| {},
        )
        .await
        .unwrap_err();
    let msg = err.to_string();
    assert!(
        msg.contains("'piped'") && msg.contains("promised to uploads in flight"),
        "{msg}"
    );
    let data = pattern(700 << 10, 9);
    send.write_all(&data).await.unwrap();
    send.write_all(
        &encode(&qxfer::protocol::Trailer {
            digest: *blake3::hash(&data).as_bytes(),
        })
        .unwrap(),
    )
    .await
    .unwrap();
    send.finish().unwrap();
    assert!(matches!(
        read_frame::<_, Receipt>(&mut recv).await.unwrap(),
        Receipt::Committed { .. }
    ));
    assert_eq!(tree(&server.root), ["promised"]);
    std::fs::remove_file(server.root.join("promised")).unwrap();

    // The client's disk: download a file bigger than the tiny disk into it.
    let other = TestServer::start().await;
    std::fs::copy(&src, other.root.join("big")).unwrap();
    let (client2, _cfg2) = other.client().await;
    let out = disk.dir.path().join("downloads");
    std::fs::create_dir(&out).unwrap();
    let err = client2
        .get("big", &out.join("big"), false, &|_| {}, &|_| {})
        .await
        .unwrap_err();
    let msg = err.to_string();
    assert!(msg.contains("disk is full") && msg.contains("big"), "{msg}");
    // Nothing under the final name, and nothing kept: the bytes that fit
    // are the space the rerun (or any other download) needs, so the
    // unfinished download is deleted, and the message says so.
    assert!(msg.contains("was deleted"), "{msg}");
    assert!(tree(&out).is_empty(), "{:?}", tree(&out));
    let small = dir.path().join("small");
    std::fs::write(&small, pattern(300 << 10, 10)).unwrap();
    std::fs::copy(&small, other.root.join("small")).unwrap();
    client2
        .get("small", &out.join("small"), false, &|_| {}, &|_| {})
        .await
        .expect("a later download finds the space");
    other.assert_healthy().await;
    client.close().await;
    client2.close().await;
    drop(server);
}

both_backends!(
    size_limits_refuse_puts_clearly,
    size_limits_refuse_puts_clearly_on
);

async fn size_limits_refuse_puts_clearly_on(backend: Backend) {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("up");
    std::fs::write(&src, pattern(2 << 20, 5)).unwrap();
    let server =
        TestServer::start_on_with(backend, "errors", |c| c.max_file_size = Some(1 << 20)).await;
    let (client, _cfg) = server.client().await;
    let (code, msg) = remote_code(client.put(&src, "up", false, &|_| {}).await);
    assert_eq!(code, ErrorCode::TooLarge);
    assert!(msg.contains("at most 1048576 bytes"), "{msg}");
    assert!(server.stored_tree().await.is_empty());
    client.close().await;
    server.assert_healthy().await;
}

both_backends!(
    connections_beyond_the_limit_are_refused_clearly,
    connections_beyond_the_limit_are_refused_clearly_on
);

async fn connections_beyond_the_limit_are_refused_clearly_on(backend: Backend) {
    let server = TestServer::start_on_with(backend, "errors", |c| c.max_connections = 1).await;
    let (first, _cfg) = server.client().await;
    let cfg = tempfile::tempdir().unwrap();
    let err = Client::connect(&server.client_config(cfg.path()))
        .await
        .unwrap_err();
    assert!(matches!(err, ConnectError::Busy { .. }), "{err:?}");
    assert!(err.to_string().contains("--max-connections"), "{err}");
    // The admitted client is unaffected, and its slot frees when it leaves.
    assert!(first.list("").await.unwrap().is_empty());
    first.close().await;
    let start = Instant::now();
    loop {
        match Client::connect(&server.client_config(cfg.path())).await {
            Ok(c) => {
                c.close().await;
                break;
            }
            Err(ConnectError::Busy { .. }) if start.elapsed() < Duration::from_secs(5) => {
                tokio::time::sleep(Duration::from_millis(50)).await
            }
            Err(e) => panic!("slot never freed: {e}"),
        }
    }
}

/// Local root only: a bucket has no mount points.
#[tokio::test]
async fn a_mount_point_inside_the_root_is_a_clear_error() {
    let Some(disk) = TinyDisk::mount("1m") else {
        return;
    };
    // The served root contains a separate filesystem at "mnt". Resumable
    // (large) uploads are assembled in the root's partial store and cannot be
    // renamed across; small ones are made in their destination directory and
    // land there.
    let dirs = tempfile::tempdir().unwrap();
    let root = dirs.path().join("root");
    std::fs::create_dir(&root).unwrap();
    let status = std::process::Command::new("mount")
        .args(["--bind"])
        .arg(disk.dir.path())
        .arg({
            std::fs::create_dir(root.join("mnt")).unwrap();
            root.join("mnt")
        })
        .status()
        .unwrap();
    assert!(status.success());
    struct Unmount(std::path::PathBuf);
    impl Drop for Unmount {
        fn drop(&mut self) {
            let _ = std::process::Command::new("umount").arg(&self.0).status();
        }
    }
    let unmount = Unmount(root.join("mnt"));
    let server = TestServer::start_in(dirs, &root).await;
    let (client, _cfg) = server.client().await;
    let src = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(src.path(), vec![7u8; qxfer::protocol::RESUME_MIN as usize]).unwrap();
    let (code, msg) = remote_code(client.put(src.path(), "mnt/f", false, &|_| {}).await);
    assert_eq!(code, ErrorCode::Internal, "{msg}");
    assert!(
        msg.contains("'mnt/f'") && msg.contains("another filesystem"),
        "{msg}"
    );
    assert!(tree(&root.join("mnt")).is_empty());
    let small = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(small.path(), b"data").unwrap();
    client
        .put(small.path(), "mnt/g", false, &|_| {})
        .await
        .unwrap();
    assert_eq!(std::fs::read(root.join("mnt/g")).unwrap(), b"data");
    client.close().await;
    server.assert_healthy().await;
    // Unmount before the server's temp dir is removed.
    drop(unmount);
}

/// A client whose transfers go at `rate` bytes per second, so a test can
/// change a source while it is being sent.
async fn slow_client(server: &TestServer, rate: u64) -> (Client, tempfile::TempDir) {
    let cfg = tempfile::tempdir().unwrap();
    let mut config = server.client_config(cfg.path());
    config.limit_rate = Some(rate);
    (Client::connect(&config).await.unwrap(), cfg)
}

/// Puts `src` while `change` runs on it a second in, alongside a small
/// well-behaved file; returns the big file's error. The batch must end
/// promptly, the small file must arrive, and nothing may be committed under
/// the big file's name.
async fn put_while_changing(
    backend: Backend,
    change: impl FnOnce(&std::path::Path) + Send + 'static,
) -> String {
    use qxfer::client::{run_batch, Direction, Job};
    use qxfer::client::{Unwatched, Watch};
    let server = TestServer::start_on(backend, "errors").await;
    let (client, _cfg) = slow_client(&server, 8 << 20).await;
    let dir = tempfile::tempdir().unwrap();
    let big = dir.path().join("big");
    std::fs::write(&big, pattern(40 << 20, 21)).unwrap();
    let small = dir.path().join("small");
    std::fs::write(&small, b"small").unwrap();
    let jobs = [&big, &small]
        .into_iter()
        .map(|p| Job {
            label: p.display().to_string(),
            local: p.clone(),
            remote: p.file_name().unwrap().to_str().unwrap().to_owned(),
            size_hint: None,
            within: None,
        })
        .collect();
    let target = big.clone();
    let changer = tokio::spawn(async move {
        tokio::time::sleep(Duration::from_secs(1)).await;
        tokio::task::spawn_blocking(move || change(&target))
            .await
            .unwrap();
    });
    let started = Instant::now();
    let watch: Arc<dyn Watch> = Arc::new(Unwatched);
    let report = tokio::time::timeout(
        Duration::from_secs(60),
        run_batch(&client, Direction::Put, jobs, 4, false, &watch),
    )
    .await
    .expect("the batch must not hang");
    changer.await.unwrap();
    assert!(
        started.elapsed() < Duration::from_secs(20),
        "the batch took {:?}",
        started.elapsed()
    );
    assert_eq!(report.done.len(), 1, "the small file still arrives");
    assert_eq!(server.stored("small").await, b"small");
    assert!(
        common::stored_at(&server.root, "big").await.is_none(),
        "no mix committed"
    );
    assert_eq!(report.failed.len(), 1);
    let msg = report.failed[0].1.to_string();
    assert!(msg.contains("big"), "the message names the file: {msg}");
    client.close().await;
    server.assert_healthy().await;
    msg
}

both_backends!(
    a_source_that_shrinks_mid_put_fails_that_file_only,
    a_source_that_shrinks_mid_put_fails_that_file_only_on
);

async fn a_source_that_shrinks_mid_put_fails_that_file_only_on(backend: Backend) {
    let msg = put_while_changing(backend, |p| {
        std::fs::OpenOptions::new()
            .write(true)
            .open(p)
            .unwrap()
            .set_len(8 << 20)
            .unwrap()
    })
    .await;
    assert!(msg.contains("shrank"), "{msg}");
}

both_backends!(
    a_source_rewritten_in_place_mid_put_is_not_committed,
    a_source_rewritten_in_place_mid_put_is_not_committed_on
);

async fn a_source_rewritten_in_place_mid_put_is_not_committed_on(backend: Backend) {
    use std::os::unix::fs::FileExt;
    let msg = put_while_changing(backend, |p| {
        let f = std::fs::OpenOptions::new().write(true).open(p).unwrap();
        let mib = vec![0xEE; 1 << 20];
        f.write_all_at(&mib, 0).unwrap();
        f.write_all_at(&mib, (40 << 20) - (1 << 20)).unwrap();
    })
    .await;
    assert!(msg.contains("changed while being sent"), "{msg}");
}

both_backends!(
    a_source_that_grows_mid_put_is_not_cut_silently,
    a_source_that_grows_mid_put_is_not_cut_silently_on
);

async fn a_source_that_grows_mid_put_is_not_cut_silently_on(backend: Backend) {
    let msg = put_while_changing(backend, |p| {
        use std::io::Write;
        let mut f = std::fs::OpenOptions::new().append(true).open(p).unwrap();
        f.write_all(&[1u8; 4096]).unwrap();
    })
    .await;
    assert!(msg.contains("changed while being sent"), "{msg}");
}

both_backends!(
    putting_a_fifo_fails_at_once,
    putting_a_fifo_fails_at_once_on
);

async fn putting_a_fifo_fails_at_once_on(backend: Backend) {
    let server = TestServer::start_on(backend, "errors").await;
    let (client, _cfg) = server.client().await;
    let dir = tempfile::tempdir().unwrap();
    let fifo = dir.path().join("pipe");
    let c = std::ffi::CString::new(fifo.as_os_str().as_encoded_bytes()).unwrap();
    // SAFETY: mkfifo reads a valid NUL-terminated path.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o644) }, 0);
    let started = Instant::now();
    let err = tokio::time::timeout(
        Duration::from_secs(5),
        client.put(&fifo, "pipe", false, &|_| {}),
    )
    .await
    .expect("a put of a FIFO must not hang")
    .unwrap_err();
    assert!(
        err.to_string().contains("not a regular file"),
        "{err} after {:?}",
        started.elapsed()
    );
    assert!(server.stored_tree().await.is_empty());
    client.close().await;
}

/// Bytes held in a server root's partial store.
fn partial_bytes(root: &std::path::Path) -> u64 {
    std::fs::read_dir(root.join(qxfer::paths::PARTIAL_DIR))
        .map(|d| d.flatten().map(|e| e.metadata().unwrap().len()).sum())
        .unwrap_or(0)
}

/// Puts `(local, remote)` from two slow clients at once; returns both results.
async fn two_slow_puts(
    server: &TestServer,
    a: (&std::path::Path, &str),
    b: (&std::path::Path, &str),
) -> [Result<(), qxfer::client::FileError>; 2] {
    let (one, _c1) = slow_client(server, 16 << 20).await;
    let (two, _c2) = slow_client(server, 16 << 20).await;
    let (r1, r2) = tokio::join!(
        one.put(a.0, a.1, false, &|_| {}),
        two.put(b.0, b.1, false, &|_| {})
    );
    one.close().await;
    two.close().await;
    [r1.map(drop), r2.map(drop)]
}

/// Local root only: space reservations against the disk's free space; an
/// object store reports no free space to reserve against.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn uploads_that_do_not_fit_together_leave_the_server_usable() {
    let Some(disk) = TinyDisk::mount("48m") else {
        return;
    };
    let root = disk.dir.path().join("root");
    let server = TestServer::start_in(tempfile::tempdir().unwrap(), &root).await;
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = (dir.path().join("a"), dir.path().join("b"));
    std::fs::write(&a, pattern(28 << 20, 31)).unwrap();
    std::fs::write(&b, pattern(28 << 20, 32)).unwrap();

    // Each fits alone, not both: the second is refused up front, counting
    // what the first will still write, and the first completes.
    let results = two_slow_puts(&server, (&a, "a"), (&b, "b")).await;
    let failed: Vec<_> = results.iter().filter_map(|r| r.as_ref().err()).collect();
    assert_eq!(failed.len(), 1, "{results:?}");
    let msg = failed[0].to_string();
    assert!(msg.contains("free"), "{msg}");
    assert_eq!(tree(&server.root).len(), 1, "{:?}", tree(&server.root));
    assert_eq!(partial_bytes(&server.root), 0, "no partial holds the disk");

    // Nothing is wedged: a small put goes through at once.
    let (client, _cfg) = server.client().await;
    let tiny = dir.path().join("tiny");
    std::fs::write(&tiny, b"6 byte").unwrap();
    client.put(&tiny, "tiny", false, &|_| {}).await.unwrap();
    client.close().await;
    server.assert_healthy().await;
    drop(server);
}

both_backends!(
    the_loser_of_a_no_clobber_race_frees_its_partial,
    the_loser_of_a_no_clobber_race_frees_its_partial_on
);

async fn the_loser_of_a_no_clobber_race_frees_its_partial_on(backend: Backend) {
    let server = TestServer::start_on(backend, "errors").await;
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = (dir.path().join("a"), dir.path().join("b"));
    std::fs::write(&a, pattern(16 << 20, 33)).unwrap();
    std::fs::write(&b, pattern(16 << 20, 34)).unwrap();
    let results = two_slow_puts(&server, (&a, "same"), (&b, "same")).await;
    let failed: Vec<_> = results.iter().filter_map(|r| r.as_ref().err()).collect();
    assert_eq!(failed.len(), 1, "{results:?}");
    let msg = failed[0].to_string();
    assert!(msg.contains("--force"), "{msg}");
    let stored = server.stored("same").await;
    assert!(stored == std::fs::read(&a).unwrap() || stored == std::fs::read(&b).unwrap());
    assert_eq!(
        server.partials().await,
        Vec::<String>::new(),
        "the refused upload's partial is gone"
    );
    // Small files (one write each, no partial) race the same way.
    let (one, _c1) = server.client().await;
    let (two, _c2) = server.client().await;
    let (x, y) = (dir.path().join("x"), dir.path().join("y"));
    std::fs::write(&x, b"x").unwrap();
    std::fs::write(&y, b"y").unwrap();
    for i in 0..8 {
        let name = format!("small-{i}");
        let (r1, r2) = tokio::join!(
            one.put(&x, &name, false, &|_| {}),
            two.put(&y, &name, false, &|_| {})
        );
        assert!(r1.is_ok() != r2.is_ok(), "{name}: {r1:?} {r2:?}");
        let won: &[u8] = if r1.is_ok() { b"x" } else { b"y" };
        assert_eq!(server.stored(&name).await, won);
    }
    one.close().await;
    two.close().await;
    server.assert_healthy().await;
}

/// Gets "g" into `dest` from a hostile server: it must fail, and soon.
async fn failing_get(client: &Client, dest: &std::path::Path) -> qxfer::client::FileError {
    tokio::time::timeout(
        Duration::from_secs(20),
        client.get("g", dest, false, &|_| {}, &|_| {}),
    )
    .await
    .expect("get must not hang")
    .unwrap_err()
}

/// A real qxfer endpoint (TLS, ALPN, the client in `cfg` admitted) whose
/// every stream gets `answer` (if any) to its request and then nothing more,
/// the connection kept alive.
fn hostile_server(cfg: &std::path::Path, answer: Option<Response>) -> quinn::Endpoint {
    hostile_server_raw(cfg, answer.map(|a| encode(&a).unwrap()))
}

/// Like [`hostile_server`], answering every stream with `raw` bytes.
fn hostile_server_raw(cfg: &std::path::Path, answer: Option<Vec<u8>>) -> quinn::Endpoint {
    let dirs = tempfile::tempdir().unwrap();
    let (endpoint, _, allowlist) =
        common::endpoint_in(dirs.path(), &qxfer::endpoint::ServerLimits::default());
    qxfer::tls::AuthorizedClients::append(&allowlist, common::client_identity(cfg), "t").unwrap();
    let ep = endpoint.clone();
    tokio::spawn(async move {
        let _dirs = dirs;
        while let Some(incoming) = ep.accept().await {
            let answer = answer.clone();
            tokio::spawn(async move {
                let Ok(conn) = incoming.await else { return };
                let mut held = Vec::new();
                while let Ok((mut send, mut recv)) = conn.accept_bi().await {
                    let mut buf = [0u8; 4096];
                    let _ = recv.read(&mut buf).await;
                    if let Some(a) = &answer {
                        let _ = send.write_all(a).await;
                    }
                    held.push((send, recv));
                }
            });
        }
    });
    endpoint
}

#[tokio::test]
async fn a_server_that_never_answers_does_not_hang_the_client() {
    let cfg = tempfile::tempdir().unwrap();
    let endpoint = hostile_server(cfg.path(), None);
    let mut config = common::client_config(endpoint.local_addr().unwrap(), cfg.path());
    config.reply_timeout = Duration::from_secs(2);
    let client = Client::connect(&config).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("f");
    std::fs::write(&src, b"hello").unwrap();
    let started = Instant::now();
    let limit = Duration::from_secs(20);
    let put = tokio::time::timeout(limit, client.put(&src, "f", false, &|_| {}))
        .await
        .expect("put must not hang")
        .unwrap_err();
    let get = tokio::time::timeout(
        limit,
        client.get("f", &dir.path().join("g"), false, &|_| {}, &|_| {}),
    )
    .await
    .expect("get must not hang")
    .unwrap_err();
    let ls = tokio::time::timeout(limit, client.list(""))
        .await
        .expect("ls must not hang")
        .unwrap_err();
    for err in [put, get, ls] {
        assert!(err.to_string().contains("no answer within 2 s"), "{err}");
    }
    assert!(started.elapsed() < Duration::from_secs(15));
    assert!(!dir.path().join("g").exists());
    endpoint.close(0u32.into(), b"");
}

#[tokio::test]
async fn a_resume_offer_beyond_the_file_is_refused() {
    use qxfer::protocol::{Encoding, GetOffer};
    let cfg = tempfile::tempdir().unwrap();
    let held = 5u64 << 20;
    let offer = Response::GetAccepted(GetOffer {
        meta: FileMeta {
            size: 1,
            mtime: None,
            mode: None,
        },
        offset: held,
        encoding: Encoding::Raw,
    });
    let endpoint = hostile_server(cfg.path(), Some(offer));
    let config = common::client_config(endpoint.local_addr().unwrap(), cfg.path());
    let client = Client::connect(&config).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let dest = dir.path().join("g");
    std::fs::write(
        dir.path().join(format!("g{}", qxfer::client::PART_SUFFIX)),
        pattern(held as usize, 40),
    )
    .unwrap();
    let err = failing_get(&client, &dest).await;
    assert!(err.to_string().contains("offered to continue"), "{err}");
    assert!(!dest.exists());
    endpoint.close(0u32.into(), b"");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_download_to_stdout_that_does_not_match_its_digest_fails() {
    use qxfer::protocol::{Encoding, GetOffer, Trailer};
    let home = tempfile::tempdir().unwrap();
    let cfg = home.path().join("qxfer-config");
    let mut raw = encode(&Response::GetAccepted(GetOffer {
        meta: FileMeta {
            size: 5,
            mtime: None,
            mode: None,
        },
        offset: 0,
        encoding: Encoding::Raw,
    }))
    .unwrap();
    raw.extend_from_slice(b"hello");
    raw.extend(encode(&Trailer { digest: [0; 32] }).unwrap());
    let endpoint = hostile_server_raw(&cfg, Some(raw));
    let mut cmd = common::qxfer_at(home.path(), endpoint.local_addr().unwrap());
    cmd.args(["get", "x", "-o", "-", "--timeout", "5s"]);
    let out = common::output(cmd).await;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert_eq!(out.stdout, b"hello", "streamed as it came");
    assert!(
        stderr.contains("do not match the server's BLAKE3"),
        "{stderr}"
    );
    endpoint.close(0u32.into(), b"");
}

/// A download framed as data of unknown length (which only uploads use)
/// is refused before anything is written; an upload from a pipe to a
/// server that never answers fails in time instead of waiting forever.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hostile_server_cannot_misuse_data_of_unknown_length() {
    use qxfer::protocol::{BlockHeader, Encoding, GetOffer};
    let cfg = tempfile::tempdir().unwrap();
    let mut raw = encode(&Response::GetAccepted(GetOffer {
        meta: FileMeta {
            size: 5,
            mtime: None,
            mode: None,
        },
        offset: 0,
        encoding: Encoding::Stream,
    }))
    .unwrap();
    raw.extend_from_slice(&BlockHeader::END);
    let endpoint = hostile_server_raw(cfg.path(), Some(raw));
    let config = common::client_config(endpoint.local_addr().unwrap(), cfg.path());
    let client = Client::connect(&config).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let dest = dir.path().join("g");
    let err = failing_get(&client, &dest).await;
    assert!(err.to_string().contains("unknown length"), "{err}");
    assert!(tree(dir.path()).is_empty(), "{:?}", tree(dir.path()));
    endpoint.close(0u32.into(), b"");

    let endpoint = hostile_server(cfg.path(), None);
    let mut config = common::client_config(endpoint.local_addr().unwrap(), cfg.path());
    config.reply_timeout = Duration::from_secs(2);
    let client = Client::connect(&config).await.unwrap();
    let (r, w) = rustix::pipe::pipe().unwrap();
    let (r, w) = (std::fs::File::from(r), std::fs::File::from(w));
    let err = tokio::time::timeout(
        Duration::from_secs(20),
        client.put_stream(r, "p", false, &|_| {}),
    )
    .await
    .expect("put - must not hang")
    .unwrap_err();
    assert!(err.to_string().contains("no answer"), "{err}");
    drop(w);
    endpoint.close(0u32.into(), b"");
}

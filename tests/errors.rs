//! Every error a user can meet: each is reported clearly, and the server keeps serving.

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{is_root, pattern, tree, TestServer};
use qxfer::client::{Client, ConnectError, FileError};
use qxfer::protocol::{
    encode, read_frame, ErrorCode, FileMeta, PutRequest, Receipt, Request, Response, Trailer,
};
use qxfer::tls::{Fingerprint, Identity};

fn remote_code(r: Result<impl std::fmt::Debug, FileError>) -> (ErrorCode, String) {
    match r {
        Err(FileError::Remote(e)) => (e.code, e.message),
        other => panic!("expected a remote error, got {other:?}"),
    }
}

#[tokio::test]
async fn missing_file_and_directory_are_clear_errors() {
    let server = TestServer::start().await;
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

    std::fs::create_dir(server.root.join("adir")).unwrap();
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
async fn names_escaping_the_root_are_refused() {
    let outer = tempfile::tempdir().unwrap();
    let root = outer.path().join("root");
    let server = TestServer::start_in(tempfile::tempdir().unwrap(), &root).await;
    std::fs::write(outer.path().join("secret"), b"outside").unwrap();
    let (client, _cfg) = server.client().await;
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("f");
    std::fs::write(&src, b"payload").unwrap();
    let secret = outer.path().join("secret");
    let absolute = secret.display().to_string();
    let long = "a".repeat(4097);
    for bad in [
        "../secret",
        "a/../../secret",
        "..",
        absolute.as_str(),
        "a\0b",
        "..\\secret",
        "C:\\secret",
        "c:secret",
        "",
        long.as_str(),
    ] {
        let (code, msg) = remote_code(client.put(&src, bad, true, &|_| {}).await);
        assert_eq!(code, ErrorCode::InvalidPath, "put {bad:?}: {msg}");
        let (code, _) = remote_code(
            client
                .get(bad, &dir.path().join("g"), false, &|_| {}, &|_| {})
                .await,
        );
        assert_eq!(code, ErrorCode::InvalidPath, "get {bad:?}");
        if !bad.is_empty() {
            let (code, _) = remote_code(client.list(bad).await);
            assert_eq!(code, ErrorCode::InvalidPath, "ls {bad:?}");
        }
    }
    assert_eq!(std::fs::read(&secret).unwrap(), b"outside");
    assert_eq!(tree(outer.path()), ["root", "secret"]);
    assert!(!dir.path().join("g").exists());
    server.assert_healthy().await;
}

#[tokio::test]
async fn existing_files_are_not_overwritten_without_force() {
    let server = TestServer::start().await;
    let (client, _cfg) = server.client().await;
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("f");
    std::fs::write(&src, pattern(3 << 20, 3)).unwrap();
    std::fs::write(server.root.join("f"), b"original").unwrap();

    let (code, msg) = remote_code(client.put(&src, "f", false, &|_| {}).await);
    assert_eq!(code, ErrorCode::AlreadyExists);
    assert!(msg.contains("--force"), "{msg}");
    assert_eq!(std::fs::read(server.root.join("f")).unwrap(), b"original");
    assert_eq!(tree(&server.root), ["f"], "no temporary left behind");

    let local = dir.path().join("local");
    std::fs::write(&local, b"mine").unwrap();
    let err = client
        .get("f", &local, false, &|_| {}, &|_| {})
        .await
        .unwrap_err();
    assert!(matches!(err, FileError::LocalExists(_)), "{err:?}");
    assert!(err.to_string().contains("--force"), "{err}");
    assert_eq!(std::fs::read(&local).unwrap(), b"mine");
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

#[tokio::test]
async fn changed_server_identity_is_a_hard_error_naming_known_hosts() {
    let server = TestServer::start().await;
    let cfg = tempfile::tempdir().unwrap();
    let config = server.client_config(cfg.path());

    // First contact records the fingerprint.
    let client = Client::connect(&config).await.unwrap();
    let (fp, file) = client.first_contact.clone().unwrap();
    assert_eq!(fp, server.fingerprint);
    client.close().await;
    let known = std::fs::read_to_string(&file).unwrap();
    assert!(known.contains(&server.fingerprint.to_string()), "{known}");

    // Second contact is silent.
    let client = Client::connect(&config).await.unwrap();
    assert!(client.first_contact.is_none());
    client.close().await;

    // Same address, different recorded key: as if the server's key changed.
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
        msg.contains(&file.display().to_string()) && msg.contains("line 2"),
        "{msg}"
    );
    assert!(msg.contains(&server.fingerprint.to_string()), "{msg}");
    // The file is left for the user to fix, not silently rewritten.
    assert!(std::fs::read_to_string(&file)
        .unwrap()
        .contains(&other.to_string()));
    server.assert_healthy().await;
}

#[tokio::test]
async fn pins_are_enforced_and_not_recorded() {
    let server = TestServer::start().await;
    let cfg = tempfile::tempdir().unwrap();
    let mut config = server.client_config(cfg.path());
    config.pin = Some(
        "SHA256:AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA"
            .parse()
            .unwrap(),
    );
    let err = Client::connect(&config).await.unwrap_err();
    assert!(matches!(err, ConnectError::PinMismatch { .. }), "{err:?}");
    assert!(err.to_string().contains("pinned"), "{err}");

    config.pin = Some(server.fingerprint);
    let client = Client::connect(&config).await.unwrap();
    assert!(client.first_contact.is_none());
    client.close().await;
    assert!(!cfg.path().join("known_hosts").exists());
}

/// Opens a raw stream and sends `bytes` as the whole request side.
async fn raw_exchange(client: &Client, bytes: &[u8], finish: bool) -> Response {
    let (mut send, mut recv) = client.connection().open_bi().await.unwrap();
    send.write_all(bytes).await.unwrap();
    if finish {
        send.finish().unwrap();
    }
    let resp = tokio::time::timeout(Duration::from_secs(15), read_frame(&mut recv))
        .await
        .expect("the server answers")
        .unwrap();
    resp
}

#[tokio::test]
async fn malformed_headers_get_protocol_errors_and_the_server_carries_on() {
    let server = TestServer::start().await;
    let (client, _cfg) = server.client().await;
    let refused = |r: Response| match r {
        Response::Refused(e) => {
            assert_eq!(e.code, ErrorCode::Protocol, "{e:?}");
            e.message
        }
        other => panic!("expected a refusal, got {other:?}"),
    };
    // Garbage.
    let mut garbage = 5u32.to_be_bytes().to_vec();
    garbage.extend_from_slice(&[0xde, 0xad, 0xbe, 0xef, 0xff]);
    refused(raw_exchange(&client, &garbage, true).await);
    // Oversized length prefix.
    let msg = refused(raw_exchange(&client, &(1u32 << 30).to_be_bytes(), true).await);
    assert!(msg.contains("limit"), "{msg}");
    // Truncated: half a header, then the stream ends.
    let frame = encode(&Request::List(qxfer::protocol::ListRequest {
        path: String::new(),
    }))
    .unwrap();
    let msg = refused(raw_exchange(&client, &frame[..frame.len() / 2], true).await);
    assert!(msg.contains("ended"), "{msg}");
    // Silence: the header never comes; the server gives up after 10 s.
    let start = Instant::now();
    let msg = refused(raw_exchange(&client, &[0, 0], false).await);
    assert!(msg.contains("10 s"), "{msg}");
    assert!(start.elapsed() >= Duration::from_secs(9));
    client.close().await;
    server.assert_healthy().await;
}

async fn raw_put(client: &Client, name: &str, declared: u64, data: &[u8]) -> Receipt {
    let (mut send, mut recv) = client.connection().open_bi().await.unwrap();
    let req = Request::Put(PutRequest {
        path: name.into(),
        meta: FileMeta {
            size: declared,
            mtime: None,
            mode: None,
        },
        force: false,
    });
    send.write_all(&encode(&req).unwrap()).await.unwrap();
    let _ = send.write_all(data).await;
    let digest = *blake3::hash(data).as_bytes();
    let _ = send.write_all(&encode(&Trailer { digest }).unwrap()).await;
    let _ = send.finish();
    assert_eq!(
        read_frame::<_, Response>(&mut recv).await.unwrap(),
        Response::PutAccepted
    );
    read_frame(&mut recv).await.unwrap()
}

#[tokio::test]
async fn declared_size_must_match_the_data() {
    let server = TestServer::start().await;
    let (client, _cfg) = server.client().await;
    let data = pattern(100_000, 9);
    // Longer than declared: the "trailer" position holds data.
    match raw_put(&client, "short", 50_000, &data).await {
        Receipt::Failed(e) => assert_eq!(e.code, ErrorCode::Corrupt, "{e:?}"),
        other => panic!("{other:?}"),
    }
    // Shorter than declared: the stream ends early.
    match raw_put(&client, "long", 200_000, &data).await {
        Receipt::Failed(e) => assert!(e.message.contains("ended"), "{e:?}"),
        other => panic!("{other:?}"),
    }
    // A wrong digest.
    let (mut send, mut recv) = client.connection().open_bi().await.unwrap();
    let req = Request::Put(PutRequest {
        path: "bad-digest".into(),
        meta: FileMeta {
            size: 3,
            mtime: None,
            mode: None,
        },
        force: false,
    });
    send.write_all(&encode(&req).unwrap()).await.unwrap();
    send.write_all(b"abc").await.unwrap();
    send.write_all(&encode(&Trailer { digest: [0; 32] }).unwrap())
        .await
        .unwrap();
    send.finish().unwrap();
    let _: Response = read_frame(&mut recv).await.unwrap();
    match read_frame::<_, Receipt>(&mut recv).await.unwrap() {
        Receipt::Failed(e) => assert_eq!(e.code, ErrorCode::Corrupt),
        other => panic!("{other:?}"),
    }
    assert!(tree(&server.root).is_empty(), "{:?}", tree(&server.root));
    client.close().await;
    server.assert_healthy().await;
}

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
    // check while the disk is empty, then a regular 700 KiB put fills it,
    // and only then does the first one send its data.
    let (mut send, mut recv) = client.connection().open_bi().await.unwrap();
    let req = Request::Put(PutRequest {
        path: "late".into(),
        meta: FileMeta {
            size: 700 << 10,
            mtime: None,
            mode: None,
        },
        force: false,
    });
    send.write_all(&encode(&req).unwrap()).await.unwrap();
    assert!(matches!(
        read_frame::<_, Response>(&mut recv).await.unwrap(),
        Response::PutAccepted
    ));
    let first = dir.path().join("first");
    std::fs::write(&first, pattern(700 << 10, 5)).unwrap();
    client.put(&first, "first", false, &|_| {}).await.unwrap();
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
    assert!(
        tree(&out).is_empty(),
        "partial download removed: {:?}",
        tree(&out)
    );
    other.assert_healthy().await;
    client.close().await;
    client2.close().await;
    drop(server);
}

#[tokio::test]
async fn read_only_servers_and_size_limits_refuse_puts_clearly() {
    let dirs = tempfile::tempdir().unwrap();
    let root = dirs.path().join("root");
    let server = TestServer::start_with(dirs, &root, |c| c.read_only = true).await;
    std::fs::write(server.root.join("shared"), b"read me").unwrap();
    let (client, _cfg) = server.client().await;
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("up");
    std::fs::write(&src, pattern(2 << 20, 5)).unwrap();
    let (code, msg) = remote_code(client.put(&src, "up", false, &|_| {}).await);
    assert_eq!(code, ErrorCode::ReadOnly);
    assert!(msg.contains("'up'") && msg.contains("read-only"), "{msg}");
    // Reads still work.
    let back = dir.path().join("shared");
    client
        .get("shared", &back, false, &|_| {}, &|_| {})
        .await
        .unwrap();
    assert_eq!(std::fs::read(&back).unwrap(), b"read me");
    assert_eq!(tree(&server.root), ["shared"]);
    client.close().await;

    let dirs = tempfile::tempdir().unwrap();
    let root = dirs.path().join("root");
    let server = TestServer::start_with(dirs, &root, |c| c.max_file_size = Some(1 << 20)).await;
    let (client, _cfg) = server.client().await;
    let (code, msg) = remote_code(client.put(&src, "up", false, &|_| {}).await);
    assert_eq!(code, ErrorCode::TooLarge);
    assert!(msg.contains("at most 1048576 bytes"), "{msg}");
    assert!(tree(&server.root).is_empty());
    client.close().await;
    server.assert_healthy().await;
}

#[tokio::test]
async fn connections_beyond_the_limit_are_refused_clearly() {
    let dirs = tempfile::tempdir().unwrap();
    let root = dirs.path().join("root");
    let server = TestServer::start_with(dirs, &root, |c| c.max_connections = 1).await;
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

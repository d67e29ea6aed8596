//! Servers over an S3 bucket in a real three-node Garage cluster: round trips, trees, metadata, no-clobber, many servers over one bucket, resume across servers, and start-up errors.

mod common;

use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use common::garage::{garage, keys, wait_for_parts};
use common::{client_config, pattern, qxfer, ServeProcess, TestServer};
use qxfer::client::Client;
use qxfer::protocol::{EntryKind, ErrorCode};

const MIB: usize = 1 << 20;

/// A client of `server` whose identity lives in `cfg`.
async fn client_in(server: &TestServer, cfg: &Path) -> Client {
    Client::connect(&server.client_config(cfg)).await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn files_of_every_size_round_trip_with_their_metadata() {
    let url = garage().fresh_root("roundtrip");
    let server = TestServer::start_object(&url, 0).await;
    let (client, _cfg) = server.client().await;
    let dir = tempfile::tempdir().unwrap();
    // Empty, small (one PUT), a whole part, and several parts with a tail.
    let sizes = [0, 1000, 5 * MIB, 8 * MIB, 21 * MIB + 7];
    for (i, size) in sizes.into_iter().enumerate() {
        let src = dir.path().join(format!("f{i}"));
        let data = pattern(size, i as u64);
        std::fs::write(&src, &data).unwrap();
        std::fs::set_permissions(&src, std::os::unix::fs::PermissionsExt::from_mode(0o640))
            .unwrap();
        let mtime =
            std::time::SystemTime::UNIX_EPOCH + Duration::from_secs(1_600_000_000 + i as u64);
        std::fs::File::options()
            .write(true)
            .open(&src)
            .unwrap()
            .set_modified(mtime)
            .unwrap();
        let sent = client
            .put(&src, &format!("d/f{i}"), false, &|_| {})
            .await
            .unwrap();
        assert_eq!(sent.blake3, *blake3::hash(&data).as_bytes());

        let back = dir.path().join(format!("back{i}"));
        let got = client
            .get(&format!("d/f{i}"), &back, false, &|_| {}, &|_| {})
            .await
            .unwrap();
        assert_eq!(got.blake3, sent.blake3);
        assert_eq!(std::fs::read(&back).unwrap(), data, "size {size}");
        let md = std::fs::metadata(&back).unwrap();
        assert_eq!(md.modified().unwrap(), mtime, "size {size}");
        assert_eq!(
            std::os::unix::fs::PermissionsExt::mode(&md.permissions()) & 0o777,
            0o640
        );
    }
    let listed = client.list("d").await.unwrap();
    let names: Vec<_> = listed.iter().map(|e| (e.name.as_str(), e.size)).collect();
    assert_eq!(
        names,
        [
            ("f0", 0),
            ("f1", 1000),
            ("f2", 5 * MIB as u64),
            ("f3", 8 * MIB as u64),
            ("f4", 21 * MIB as u64 + 7)
        ]
    );
    assert!(listed
        .iter()
        .all(|e| e.kind == EntryKind::File && e.mode == Some(0o640)));
    let root = client.list("").await.unwrap();
    assert_eq!(root.len(), 1, "bookkeeping stays hidden: {root:?}");
    assert_eq!((root[0].name.as_str(), root[0].kind), ("d", EntryKind::Dir));

    // The big file's sums are kept beside it; no upload is left open
    // (both done just after the client's answer).
    server.settled().await;
    let stored = keys(&url).await;
    assert!(
        stored.contains(&".qxfer-sums/d/f4".to_owned()),
        "{stored:?}"
    );
    assert!(
        !stored.iter().any(|k| k.starts_with(".qxfer-partial")),
        "{stored:?}"
    );
    client.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn existing_names_are_refused_without_force_and_same_files_are_recognised() {
    let url = garage().fresh_root("clobber");
    let server = TestServer::start_object(&url, 0).await;
    let (client, _cfg) = server.client().await;
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = (dir.path().join("a"), dir.path().join("b"));
    std::fs::write(&a, pattern(10 * MIB, 1)).unwrap();
    std::fs::write(&b, b"other").unwrap();
    client.put(&a, "x", false, &|_| {}).await.unwrap();
    // Same size and mtime: recognised as already there, nothing sent.
    let again = client.put(&a, "x", false, &|_| {}).await.unwrap();
    assert!(again.already_there);
    let (code, msg) = common::remote_code(client.put(&b, "x", false, &|_| {}).await);
    assert_eq!(code, ErrorCode::AlreadyExists, "{msg}");
    assert!(msg.contains("--force"), "{msg}");
    client.put(&b, "x", true, &|_| {}).await.unwrap();
    let back = dir.path().join("back");
    client
        .get("x", &back, false, &|_| {}, &|_| {})
        .await
        .unwrap();
    assert_eq!(std::fs::read(&back).unwrap(), b"other");
    // A file where a directory must be, and a directory where a file must be.
    let (code, _) = common::remote_code(client.put(&b, "x/y", false, &|_| {}).await);
    assert_eq!(code, ErrorCode::NotDirectory);
    client.put(&b, "d/y", false, &|_| {}).await.unwrap();
    let (code, _) = common::remote_code(client.put(&b, "d", false, &|_| {}).await);
    assert_eq!(code, ErrorCode::IsDirectory);
    let (code, _) = common::remote_code(
        client
            .get("d", &dir.path().join("d"), false, &|_| {}, &|_| {})
            .await,
    );
    assert_eq!(code, ErrorCode::IsDirectory);
    let (code, _) = common::remote_code(
        client
            .get("nope", &dir.path().join("n"), false, &|_| {}, &|_| {})
            .await,
    );
    assert_eq!(code, ErrorCode::NotFound);
    client.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trees_with_empty_directories_go_up_and_come_back_through_the_binary() {
    let url = garage().fresh_root("tree");
    let server = TestServer::start_object(&url, 0).await;
    let home = common::home_for(&server);
    let src = home.path().join("proj");
    std::fs::create_dir_all(src.join("a/b")).unwrap();
    std::fs::create_dir_all(src.join("empty")).unwrap();
    std::fs::write(src.join("top.txt"), b"top").unwrap();
    std::fs::write(src.join("a/b/deep.bin"), pattern(9 * MIB, 3)).unwrap();
    let (h, addr) = (home.path().to_owned(), server.addr);
    let run = move |args: Vec<String>| {
        let h = h.clone();
        tokio::task::spawn_blocking(move || {
            let out = common::qxfer_at(&h, addr).args(&args).output().unwrap();
            assert!(
                out.status.success(),
                "{args:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            String::from_utf8(out.stdout).unwrap()
        })
    };
    let args = |a: &[&str]| a.iter().map(|s| (*s).to_owned()).collect::<Vec<_>>();
    let src_arg = src.to_str().unwrap();
    run(args(&["put", "-q", "-r", src_arg])).await.unwrap();
    let listing = run(args(&["ls", "-r", "proj"])).await.unwrap();
    for name in ["a/b/deep.bin", "empty", "top.txt"] {
        assert!(listing.contains(name), "{name} missing from:\n{listing}");
    }
    let dest = home.path().join("back");
    run(args(&[
        "get",
        "-q",
        "-r",
        "proj",
        "-o",
        dest.to_str().unwrap(),
    ]))
    .await
    .unwrap();
    assert_eq!(common::tree(&dest.join("proj")), common::tree(&src));
    assert_eq!(
        std::fs::read(dest.join("proj/a/b/deep.bin")).unwrap(),
        pattern(9 * MIB, 3)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn servers_over_one_bucket_see_each_others_files() {
    let url = garage().fresh_root("shared");
    // Through different Garage nodes, as servers on different machines would be.
    let one = TestServer::start_object(&url, 0).await;
    let two = TestServer::start_object(&url, 1).await;
    let three = TestServer::start_object(&url, 2).await;
    let cfg = tempfile::tempdir().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("shared.bin");
    let data = pattern(12 * MIB, 9);
    std::fs::write(&src, &data).unwrap();
    let other = dir.path().join("other");
    std::fs::write(&other, b"another file").unwrap();
    let c1 = client_in(&one, cfg.path()).await;
    c1.put(&src, "shared.bin", false, &|_| {}).await.unwrap();
    for server in [&two, &three] {
        let c = client_in(server, cfg.path()).await;
        let listed = c.list("").await.unwrap();
        assert_eq!(listed.len(), 1);
        assert_eq!(
            (listed[0].name.as_str(), listed[0].size),
            ("shared.bin", data.len() as u64)
        );
        let back = dir.path().join(format!("back-{}", server.addr.port()));
        let got = c
            .get("shared.bin", &back, false, &|_| {}, &|_| {})
            .await
            .unwrap();
        assert_eq!(got.blake3, *blake3::hash(&data).as_bytes());
        assert_eq!(std::fs::read(&back).unwrap(), data);
        // Another server refuses to clobber what the first wrote.
        let (code, msg) = common::remote_code(c.put(&other, "shared.bin", false, &|_| {}).await);
        assert_eq!(code, ErrorCode::AlreadyExists, "{msg}");
        c.close().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upload_interrupted_on_one_server_resumes_through_another() {
    let url = garage().fresh_root("resume");
    // One identity and allowlist for both, as for servers behind one name.
    let shared = tempfile::tempdir().unwrap();
    let certs = shared.path().join("certs");
    let one = TestServer::start_object_with(tempfile::tempdir().unwrap(), &certs, &url, 0).await;
    let two = TestServer::start_object_with(tempfile::tempdir().unwrap(), &certs, &url, 1).await;
    let cfg = tempfile::tempdir().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("big");
    let size = 48 * MIB;
    let data = pattern(size, 5);
    std::fs::write(&src, &data).unwrap();

    // Upload through the first server, slowly, and cut the connection once
    // at least two parts are stored.
    let mut config = one.client_config(cfg.path());
    config.limit_rate = Some(16 * MIB as u64);
    let client = Client::connect(&config).await.unwrap();
    let c = client.clone();
    let s = src.clone();
    let upload = tokio::spawn(async move { c.put(&s, "big", false, &|_| {}).await });
    wait_for_parts(&url, 2).await;
    client.connection().close(0u32.into(), b"gone");
    assert!(upload.await.unwrap().is_err());
    assert!(
        !keys(&url).await.contains(&"big".to_owned()),
        "nothing under the final name"
    );

    // The same client continues through the second server.
    let c2 = client_in(&two, cfg.path()).await;
    let r = c2.put(&src, "big", false, &|_| {}).await.unwrap();
    assert_eq!(r.blake3, *blake3::hash(&data).as_bytes());
    assert!(
        r.resumed_from >= 16 * MIB as u64,
        "resumed from {}",
        r.resumed_from
    );
    assert_eq!(
        r.resumed_from % (8 * MIB as u64),
        0,
        "resumes on a part boundary"
    );
    let back = dir.path().join("back");
    client_in(&one, cfg.path())
        .await
        .get("big", &back, false, &|_| {}, &|_| {})
        .await
        .unwrap();
    assert_eq!(std::fs::read(&back).unwrap(), data);
    two.settled().await;
    let stored = keys(&url).await;
    assert!(
        !stored.iter().any(|k| k.starts_with(".qxfer-partial")),
        "{stored:?}"
    );
    c2.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resumed_get_reads_only_the_rest_and_is_verified() {
    let url = garage().fresh_root("getresume");
    let server = TestServer::start_object(&url, 0).await;
    let (client, _cfg) = server.client().await;
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src");
    let data = pattern(30 * MIB + 123, 8);
    std::fs::write(&src, &data).unwrap();
    client.put(&src, "f", false, &|_| {}).await.unwrap();
    // A download that stopped after 13 MiB + 5 bytes (not on a part boundary).
    let dest = dir.path().join("dest");
    let held = 13 * MIB + 5;
    std::fs::write(qxfer::client::part_path(&dest), &data[..held]).unwrap();
    let sent_before = server
        .stats
        .bytes_sent
        .load(std::sync::atomic::Ordering::Relaxed);
    let r = client
        .get("f", &dest, false, &|_| {}, &|_| {})
        .await
        .unwrap();
    assert_eq!(r.resumed_from, held as u64);
    assert_eq!(std::fs::read(&dest).unwrap(), data);
    let sent = server
        .stats
        .bytes_sent
        .load(std::sync::atomic::Ordering::Relaxed)
        - sent_before;
    assert_eq!(sent, (data.len() - held) as u64);
    // A partial that differs from the file starts over.
    let dest2 = dir.path().join("dest2");
    let mut wrong = data[..held].to_vec();
    wrong[100] ^= 1;
    std::fs::write(qxfer::client::part_path(&dest2), &wrong).unwrap();
    let r = client
        .get("f", &dest2, false, &|_| {}, &|_| {})
        .await
        .unwrap();
    assert_eq!(r.resumed_from, 0);
    assert_eq!(std::fs::read(&dest2).unwrap(), data);
    client.close().await;
}

/// `qxfer serve --root s3://...` with the environment of the test cluster, plus `extra`.
fn serve_cmd(home: &Path, url: &str, endpoint: &str) -> std::process::Command {
    let mut cmd = qxfer(home);
    garage().env(&mut cmd);
    cmd.args([
        "serve",
        "--listen",
        "127.0.0.1:0",
        "--root",
        url,
        "--s3-endpoint",
        endpoint,
    ])
    .arg("--certs")
    .arg(home.join("certs"));
    cmd
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_binary_serves_a_bucket_and_refuses_to_start_on_a_bad_one() {
    let g = garage();
    let home = tempfile::tempdir().unwrap();
    let url = g.fresh_root("binary");
    let server = ServeProcess::spawn(serve_cmd(home.path(), &url, &g.endpoint));
    assert!(server.banner[0].contains(&url), "{:?}", server.banner);
    let cfg = tempfile::tempdir().unwrap();
    let fp = common::client_identity(cfg.path());
    qxfer::tls::AuthorizedClients::append(
        &home
            .path()
            .join("certs")
            .join(qxfer::tls::AUTHORIZED_CLIENTS),
        fp,
        "t",
    )
    .unwrap();
    let client = Client::connect(&client_config(server.addr, cfg.path()))
        .await
        .unwrap();
    let src = cfg.path().join("hello");
    std::fs::write(&src, b"hello").unwrap();
    client.put(&src, "hello", false, &|_| {}).await.unwrap();
    assert_eq!(client.list("").await.unwrap()[0].name, "hello");
    client.close().await;

    let refused = |mut cmd: std::process::Command| {
        let out = cmd
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .output()
            .unwrap();
        assert!(!out.status.success());
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    // Wrong secret.
    let mut cmd = serve_cmd(home.path(), &url, &g.endpoint);
    cmd.env("AWS_SECRET_ACCESS_KEY", "not-the-secret");
    let err = refused(cmd);
    assert!(err.contains("AWS_SECRET_ACCESS_KEY"), "{err}");
    // No bucket of that name.
    let err = refused(serve_cmd(home.path(), "s3://no-such-bucket/x", &g.endpoint));
    assert!(err.contains("no-such-bucket"), "{err}");
    // Nothing listening there.
    let started = Instant::now();
    let err = refused(serve_cmd(home.path(), &url, "http://127.0.0.1:9"));
    assert!(err.contains("--s3-endpoint"), "{err}");
    assert!(
        started.elapsed() < Duration::from_secs(30),
        "gave up after {:?}",
        started.elapsed()
    );
    // Not an s3:// address, and an endpoint without one.
    let err = refused(serve_cmd(home.path(), "s3://", &g.endpoint));
    assert!(err.contains("s3://BUCKET"), "{err}");
    let mut cmd = qxfer(home.path());
    cmd.args(["serve", "--listen", "127.0.0.1:0", "--root"])
        .arg(home.path().join("dir"))
        .args(["--s3-endpoint", &g.endpoint]);
    let err = refused(cmd);
    assert!(err.contains("--s3-endpoint needs"), "{err}");
}

//! The object store under faults, in a Garage cluster of its own: a node killed mid-transfer, and uploads abandoned by their server.

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use common::garage::{garage, keys, wait_for_parts};
use common::{pattern, TestServer};
use qxfer::client::Client;

const MIB: usize = 1 << 20;

/// Puts `src` as `name`, rate-limited, through a client whose identity is in `cfg`.
async fn slow_client(server: &TestServer, cfg: &Path, rate: u64) -> Client {
    let mut config = server.client_config(cfg);
    config.limit_rate = Some(rate);
    Client::connect(&config).await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_killed_mid_transfer_loses_nothing() {
    let g = garage();
    let url = g.fresh_root("nodekill");
    let server = TestServer::start_object(&url, 0).await;
    let cfg = tempfile::tempdir().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("big");
    let data = pattern(64 * MIB, 11);
    std::fs::write(&src, &data).unwrap();

    let client = slow_client(&server, cfg.path(), 24 * MIB as u64).await;
    let c = client.clone();
    let s = src.clone();
    let upload = tokio::spawn(async move { c.put(&s, "big", false, &|_| {}).await });
    wait_for_parts(&url, 1).await;
    // SIGKILL the third node (not the one the server talks to): two of
    // three replicas remain, a quorum for every read and write.
    // SAFETY: kill(2) with a pid the cluster script started and a valid signal.
    assert_eq!(unsafe { libc::kill(g.pids[2] as i32, libc::SIGKILL) }, 0);
    let first = upload.await.unwrap();
    let report = match first {
        Ok(r) => r,
        // Had it failed, a rerun must resume and finish.
        Err(e) => {
            eprintln!("the put failed while the node died ({e}); running it again");
            client.put(&src, "big", false, &|_| {}).await.unwrap()
        }
    };
    assert_eq!(report.blake3, *blake3::hash(&data).as_bytes());
    let back = dir.path().join("back");
    client
        .get("big", &back, false, &|_| {}, &|_| {})
        .await
        .unwrap();
    assert_eq!(std::fs::read(&back).unwrap(), data);
    // Small files and listings go on with the node down.
    let small = dir.path().join("small");
    std::fs::write(&small, b"after the node died").unwrap();
    client.put(&small, "small", false, &|_| {}).await.unwrap();
    let names: Vec<_> = client
        .list("")
        .await
        .unwrap()
        .into_iter()
        .map(|e| e.name)
        .collect();
    assert_eq!(names, ["big", "small"]);
    client.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_sweep_aborts_uploads_nobody_came_back_for() {
    let g = garage();
    let url = g.fresh_root("sweep");
    let shared = tempfile::tempdir().unwrap();
    let certs = shared.path().join("certs");
    let first = TestServer::start_object_with(tempfile::tempdir().unwrap(), &certs, &url, 0).await;
    let cfg = tempfile::tempdir().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("big");
    std::fs::write(&src, pattern(40 * MIB, 12)).unwrap();
    let client = slow_client(&first, cfg.path(), 16 * MIB as u64).await;
    let c = client.clone();
    let s = src.clone();
    let upload = tokio::spawn(async move { c.put(&s, "big", false, &|_| {}).await });
    wait_for_parts(&url, 1).await;
    client.connection().close(0u32.into(), b"gone");
    assert!(upload.await.unwrap().is_err());
    drop(first);
    assert!(keys(&url)
        .await
        .iter()
        .any(|k| k.starts_with(".qxfer-partial/")));

    // A server started later with a short TTL finds the record stale and aborts it.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let _second =
        TestServer::start_object_configured(tempfile::tempdir().unwrap(), &certs, &url, 1, |c| {
            c.partial_ttl = Duration::from_secs(1)
        })
        .await;
    let start = Instant::now();
    loop {
        let left = keys(&url).await;
        if !left.iter().any(|k| k.starts_with(".qxfer-partial/")) {
            assert!(left.is_empty(), "{left:?}");
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "not swept: {left:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// The sweep never takes a piped upload that is still running for one its
/// server left behind: with a TTL of one second, an upload from a pipe
/// that stored a part and then waits on its input for three seconds
/// (sweeps run meanwhile) still completes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_sweep_leaves_a_running_piped_upload_alone() {
    use std::io::Write;
    let g = garage();
    let url = g.fresh_root("pipesweep");
    let dirs = tempfile::tempdir().unwrap();
    let server = TestServer::start_object_configured(
        tempfile::tempdir().unwrap(),
        &dirs.path().join("certs"),
        &url,
        0,
        |c| c.partial_ttl = Duration::from_secs(1),
    )
    .await;
    let cfg = tempfile::tempdir().unwrap();
    let client = Client::connect(&server.client_config(cfg.path()))
        .await
        .unwrap();
    let data = pattern(10 * MIB, 13);
    let (r, w) = rustix::pipe::pipe().unwrap();
    let (r, mut w) = (std::fs::File::from(r), std::fs::File::from(w));
    let c = client.clone();
    let upload = tokio::spawn(async move { c.put_stream(r, "piped", false, &|_| {}).await });
    let (head, tail) = data.split_at(9 * MIB);
    let (head, tail) = (head.to_vec(), tail.to_vec());
    let mut w = tokio::task::spawn_blocking(move || {
        w.write_all(&head).unwrap();
        w
    })
    .await
    .unwrap();
    wait_for_parts(&url, 1).await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    tokio::task::spawn_blocking(move || {
        w.write_all(&tail).unwrap();
    })
    .await
    .unwrap();
    let report = upload.await.unwrap().unwrap();
    assert_eq!(report.bytes, data.len() as u64);
    assert!(server.stored("piped").await == data);
    assert!(!keys(&url)
        .await
        .iter()
        .any(|k| k.starts_with(".qxfer-partial/")));
    client.close().await;
}

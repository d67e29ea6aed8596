//! Fairness under load: one admitted identity flooding the server with stalled uploads never delays another identity's requests.

mod common;

use std::time::{Duration, Instant};

use common::{pattern, TestServer};
use qxfer::client::Client;

/// Descriptors this process holds open.
fn open_fds() -> usize {
    std::fs::read_dir("/proc/self/fd").unwrap().count()
}

/// The flood of the original report (9 processes of one identity, 64
/// stalled uploads each, at --limit-rate 1K), made harsher: 8 connections
/// of one identity, 80 uploads each, every one declaring 2 MiB, sending
/// 1 KiB and then nothing. Meanwhile a second identity lists, puts and gets,
/// and each of its requests must be answered within a second. Afterwards
/// the flood's connections close and the server's descriptors and files
/// return to where they were.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_identity_flooding_stalled_uploads_does_not_delay_another() {
    let server = TestServer::start().await;
    let baseline = open_fds();
    let flood_cfg = tempfile::tempdir().unwrap();
    let config = server.client_config(flood_cfg.path());
    let mut flooders = Vec::new();
    let mut held = Vec::new();
    for c in 0..8 {
        let client = Client::connect(&config).await.unwrap();
        for s in 0..80 {
            let (mut send, recv) = client.connection().open_bi().await.unwrap();
            let header = common::put_header(&format!("flood/{c}-{s}"), 2 << 20);
            send.write_all(&header).await.unwrap();
            send.write_all(&[7u8; 1024]).await.unwrap();
            held.push((send, recv));
        }
        flooders.push(client);
    }
    // Let the server take in all 640 requests.
    tokio::time::sleep(Duration::from_millis(500)).await;

    let (other, _cfg) = server.client().await;
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("small");
    std::fs::write(&src, pattern(64 << 10, 61)).unwrap();
    let mut slowest = Duration::ZERO;
    for round in 0..5 {
        let name = format!("other-{round}");
        let t = Instant::now();
        other.list("").await.unwrap();
        slowest = slowest.max(t.elapsed());
        let t = Instant::now();
        other.put(&src, &name, false, &|_| {}).await.unwrap();
        slowest = slowest.max(t.elapsed());
        let t = Instant::now();
        let back = dir.path().join(&name);
        other
            .get(&name, &back, false, &|_| {}, &|_| {})
            .await
            .unwrap();
        slowest = slowest.max(t.elapsed());
        assert_eq!(std::fs::read(&back).unwrap(), std::fs::read(&src).unwrap());
    }
    assert!(
        slowest < Duration::from_secs(1),
        "a request of the other identity took {slowest:?}"
    );
    other.close().await;

    // The flood ends: everything it held is released.
    drop(held);
    for client in flooders {
        client.close().await;
    }
    let start = Instant::now();
    while open_fds() > baseline + 8 {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "descriptors: {} now, {baseline} before the flood",
            open_fds()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        !server.root.join("flood").exists()
            || std::fs::read_dir(server.root.join("flood"))
                .unwrap()
                .count()
                == 0,
        "nothing of the stalled uploads committed"
    );
    let partials = std::fs::read_dir(server.root.join(qxfer::server::PARTIAL_DIR))
        .map(|d| d.count())
        .unwrap_or(0);
    assert_eq!(partials, 0, "no temporaries left behind");
    server.assert_healthy().await;
}

//! Fairness under load: one admitted identity flooding the server with stalled uploads never delays another identity's requests.

mod common;

use std::time::{Duration, Instant};

use common::{pattern, Backend, TestServer};
use qxfer::client::Client;

/// Descriptors this process holds open.
fn open_fds() -> usize {
    std::fs::read_dir("/proc/self/fd").unwrap().count()
}

both_backends!(
    one_identity_flooding_stalled_uploads_does_not_delay_another,
    flood_on
);

/// The flood of the original report (9 processes of one identity, 64
/// stalled uploads each, at --limit-rate 1K), made harsher: 8 connections
/// of one identity, 80 uploads each, every one declaring 2 MiB, sending
/// 1 KiB and then nothing. Meanwhile a second identity lists, puts and gets,
/// and each of its requests must be answered within a second. Afterwards
/// the flood's connections close and the server's descriptors and files
/// return to where they were.
async fn flood_on(backend: Backend) {
    let server = TestServer::start_on(backend, "load").await;
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
    // Over the object store the server keeps up to 16 idle connections to
    // the store for reuse (IDLE_CONNECTIONS in src/store/object/mod.rs).
    let allowed = baseline
        + match backend {
            Backend::Local => 8,
            Backend::Object => 8 + 16,
        };
    let start = Instant::now();
    while open_fds() > allowed {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "descriptors: {} now, {baseline} before the flood",
            open_fds()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let stored = server.stored_tree().await;
    assert!(
        !stored.iter().any(|n| n.starts_with("flood/")),
        "nothing of the stalled uploads committed: {stored:?}"
    );
    assert_eq!(
        server.partials().await.len(),
        0,
        "no temporaries left behind"
    );
    server.assert_healthy().await;
}

//! Round trips through a real in-process server, over a local root and over the object store: put, get and ls compared byte for byte.

mod common;

use common::{pattern, Backend, TestServer};
use qxfer::client::{run_batch, Direction, Job};
use qxfer::client::{Unwatched, Watch};
use qxfer::protocol::EntryKind;

both_backends!(empty_file_round_trips, empty_file_round_trips_on);

async fn empty_file_round_trips_on(backend: Backend) {
    let server = TestServer::start_on(backend, "roundtrip").await;
    let (client, _cfg) = server.client().await;
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("empty");
    std::fs::write(&src, b"").unwrap();

    let put = client.put(&src, "empty", false, &|_| {}).await.unwrap();
    assert_eq!(put.bytes, 0);
    assert_eq!(server.stored("empty").await, b"");

    let back = dir.path().join("back");
    let got = client
        .get("empty", &back, false, &|_| {}, &|_| {})
        .await
        .unwrap();
    assert_eq!(got.bytes, 0);
    assert_eq!(got.blake3, put.blake3);
    assert_eq!(std::fs::read(&back).unwrap(), b"");

    let listing = client.list("").await.unwrap();
    assert_eq!(listing.len(), 1);
    assert_eq!(listing[0].name, "empty");
    assert_eq!(listing[0].kind, EntryKind::File);
    assert_eq!(listing[0].size, 0);
    client.close().await;
}

both_backends!(
    hundred_mib_file_round_trips,
    hundred_mib_file_round_trips_on
);

async fn hundred_mib_file_round_trips_on(backend: Backend) {
    let server = TestServer::start_on(backend, "roundtrip").await;
    let (client, _cfg) = server.client().await;
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("big.bin");
    let data = pattern(100 * 1024 * 1024, 1);
    std::fs::write(&src, &data).unwrap();

    let moved = std::sync::atomic::AtomicU64::new(0);
    let advance = |n| {
        moved.fetch_add(n, std::sync::atomic::Ordering::Relaxed);
    };
    let put = client.put(&src, "big.bin", false, &advance).await.unwrap();
    assert_eq!(put.bytes, data.len() as u64);
    assert_eq!(
        moved.load(std::sync::atomic::Ordering::Relaxed),
        data.len() as u64
    );
    assert_eq!(put.blake3, *blake3::hash(&data).as_bytes());
    assert!(server.stored("big.bin").await == data);

    let back = dir.path().join("back.bin");
    let got = client
        .get("big.bin", &back, false, &|_| {}, &|_| {})
        .await
        .unwrap();
    assert_eq!(got.blake3, put.blake3);
    assert!(std::fs::read(&back).unwrap() == data);
    // Only the final names exist: no temporaries left on either side.
    assert_eq!(server.stored_tree().await, ["big.bin"]);
    assert_eq!(common::tree(dir.path()), ["back.bin", "big.bin"]);
    client.close().await;
}

both_backends!(
    two_hundred_files_at_once_over_one_connection,
    two_hundred_files_at_once_over_one_connection_on
);

async fn two_hundred_files_at_once_over_one_connection_on(backend: Backend) {
    let server = TestServer::start_on(backend, "roundtrip").await;
    let (client, _cfg) = server.client().await;
    let dir = tempfile::tempdir().unwrap();
    let up = dir.path().join("up");
    let down = dir.path().join("down");
    std::fs::create_dir_all(&up).unwrap();
    std::fs::create_dir_all(&down).unwrap();
    let mut jobs = Vec::new();
    for i in 0..200 {
        let name = format!("f{i:03}.dat");
        std::fs::write(up.join(&name), pattern(i * 997, i as u64)).unwrap();
        jobs.push(Job {
            label: name.clone(),
            local: up.join(&name),
            remote: format!("many/{name}"),
            size_hint: None,
            within: None,
        });
    }
    let progress: std::sync::Arc<dyn Watch> = std::sync::Arc::new(Unwatched);
    // --parallel 2: the small files still go 64 at a time.
    let report = run_batch(&client, Direction::Put, jobs.clone(), 2, false, &progress).await;
    assert!(report.failed.is_empty(), "{:?}", report.failed);
    assert_eq!(report.done.len(), 200);

    let listing = client.list("many").await.unwrap();
    assert_eq!(listing.len(), 200, "listing spans several frames");
    assert!(listing.windows(2).all(|w| w[0].name < w[1].name), "sorted");

    let gets: Vec<Job> = jobs
        .iter()
        .map(|j| Job {
            label: j.label.clone(),
            local: down.join(&j.label),
            remote: j.remote.clone(),
            size_hint: None,
            within: None,
        })
        .collect();
    let report = run_batch(&client, Direction::Get, gets, 64, false, &progress).await;
    assert!(report.failed.is_empty(), "{:?}", report.failed);
    for i in 0..200 {
        let name = format!("f{i:03}.dat");
        assert_eq!(
            std::fs::read(down.join(&name)).unwrap(),
            pattern(i * 997, i as u64),
            "{name}"
        );
    }
    client.close().await;
}

both_backends!(
    names_with_spaces_and_non_ascii_round_trip,
    names_with_spaces_and_non_ascii_round_trip_on
);

async fn names_with_spaces_and_non_ascii_round_trip_on(backend: Backend) {
    let server = TestServer::start_on(backend, "roundtrip").await;
    let (client, _cfg) = server.client().await;
    let dir = tempfile::tempdir().unwrap();
    for (i, name) in [
        "with space.txt",
        "naïve café.txt",
        "日本語 ファイル",
        "emoji 🚀.bin",
        "100% done.txt",
    ]
    .iter()
    .enumerate()
    {
        let src = dir.path().join(name);
        let data = pattern(1000 + i, i as u64);
        std::fs::write(&src, &data).unwrap();
        let remote = format!("sub dir/ü/{name}");
        client.put(&src, &remote, false, &|_| {}).await.unwrap();
        assert_eq!(server.stored(&format!("sub dir/ü/{name}")).await, data);
        let back = dir.path().join(format!("back {name}"));
        client
            .get(&remote, &back, false, &|_| {}, &|_| {})
            .await
            .unwrap();
        assert_eq!(std::fs::read(&back).unwrap(), data);
    }
    let listing = client.list("sub dir/ü").await.unwrap();
    let mut names: Vec<_> = listing.iter().map(|e| e.name.as_str()).collect();
    names.sort();
    assert_eq!(
        names,
        [
            "100% done.txt",
            "emoji 🚀.bin",
            "naïve café.txt",
            "with space.txt",
            "日本語 ファイル"
        ]
    );
    let top = client.list("").await.unwrap();
    assert_eq!(top.len(), 1);
    assert_eq!(
        (top[0].name.as_str(), top[0].kind),
        ("sub dir", EntryKind::Dir)
    );
    client.close().await;
}

both_backends!(
    metadata_travels_and_force_overwrites,
    metadata_travels_and_force_overwrites_on
);

async fn metadata_travels_and_force_overwrites_on(backend: Backend) {
    use std::os::unix::fs::PermissionsExt;
    let server = TestServer::start_on(backend, "roundtrip").await;
    let (client, _cfg) = server.client().await;
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("script.sh");
    std::fs::write(&src, b"#!/bin/sh\n").unwrap();
    std::fs::set_permissions(&src, std::fs::Permissions::from_mode(0o777)).unwrap();
    let old = std::time::SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(1_600_000_000);
    std::fs::File::options()
        .write(true)
        .open(&src)
        .unwrap()
        .set_modified(old)
        .unwrap();

    client.put(&src, "script.sh", false, &|_| {}).await.unwrap();
    if !server.is_object() {
        let md = std::fs::metadata(server.root.join("script.sh")).unwrap();
        assert_eq!(md.modified().unwrap(), old);
        assert_eq!(
            md.permissions().mode() & 0o7777,
            0o755,
            "group/other write stripped"
        );
    }
    let listing = client.list("script.sh").await.unwrap();
    assert_eq!(listing.len(), 1, "listing a file lists that file");
    assert_eq!(listing[0].mode, Some(0o755), "group/other write stripped");
    assert_eq!(
        listing[0]
            .mtime
            .map(|t| std::time::UNIX_EPOCH + std::time::Duration::new(t.secs as u64, t.nanos)),
        Some(old)
    );

    std::fs::write(&src, b"new contents").unwrap();
    client.put(&src, "script.sh", true, &|_| {}).await.unwrap();
    assert_eq!(server.stored("script.sh").await, b"new contents");

    let back = dir.path().join("back");
    std::fs::write(&back, b"local").unwrap();
    client
        .get("script.sh", &back, true, &|_| {}, &|_| {})
        .await
        .unwrap();
    assert_eq!(std::fs::read(&back).unwrap(), b"new contents");
    client.close().await;
}

both_backends!(
    compressible_files_travel_compressed_and_arrive_intact,
    compressible_files_travel_compressed_and_arrive_intact_on
);

async fn compressible_files_travel_compressed_and_arrive_intact_on(backend: Backend) {
    use qxfer::client::Client;
    use qxfer::protocol::Compression;
    let server = TestServer::start_on(backend, "roundtrip").await;
    let dir = tempfile::tempdir().unwrap();
    // 16 MiB of text-like data (it shrinks about 50 times), and 4 MiB of
    // noise (it does not shrink), in one file.
    let mut data: Vec<u8> = (0..16 * 1024 * 1024)
        .map(|i| b"let x = compress(block); // qxfer\n"[i % 34])
        .collect();
    data.extend(pattern(4 * 1024 * 1024, 9));
    let src = dir.path().join("mixed");
    std::fs::write(&src, &data).unwrap();
    let digest = *blake3::hash(&data).as_bytes();
    let cfg = tempfile::tempdir().unwrap();
    // Bytes this client sent / received while `f` ran.
    async fn counted<F: std::future::Future<Output = ()>>(c: &Client, f: F) -> (u64, u64) {
        let before = c.connection().stats();
        f.await;
        let after = c.connection().stats();
        (
            after.udp_tx.bytes - before.udp_tx.bytes,
            after.udp_rx.bytes - before.udp_rx.bytes,
        )
    }
    for (mode, compressed) in [(Compression::Always, true), (Compression::Never, false)] {
        let mut config = server.client_config(cfg.path());
        config.compression = mode;
        let client = Client::connect(&config).await.unwrap();
        let name = format!("{mode:?}");
        let (sent, _) = counted(&client, async {
            let r = client.put(&src, &name, true, &|_| {}).await.unwrap();
            assert_eq!(r.blake3, digest);
        })
        .await;
        assert_eq!(server.stored(&name).await, data);
        let back = dir.path().join(format!("back-{name}"));
        let (_, received) = counted(&client, async {
            let r = client
                .get(&name, &back, true, &|_| {}, &|_| {})
                .await
                .unwrap();
            assert_eq!(r.blake3, digest);
        })
        .await;
        assert_eq!(std::fs::read(&back).unwrap(), data);
        // Compressed, the text costs next to nothing and the noise its size.
        let limit = if compressed { 6 << 20 } else { 20 << 20 };
        for (what, n) in [("sent", sent), ("received", received)] {
            if compressed {
                assert!(n < limit, "{mode:?}: {what} {n} bytes");
            } else {
                assert!(n > limit, "{mode:?}: {what} {n} bytes");
            }
        }
        client.close().await;
    }
}

//! The sweep of abandoned uploads: what nobody came back for is aborted (whatever its name), a running piped upload and another server's slow live one are left alone.

use super::*;

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
    server.settled().await;
    assert!(!keys(&url)
        .await
        .iter()
        .any(|k| k.starts_with(".qxfer-partial/")));
    client.close().await;
}

/// The record of an upload keeps its key as the store spells it
/// (percent-encoded past ASCII); aborting once encoded that again, the
/// store answered 404 for the wrong key, and the parts stayed for good.
/// Here an interrupted upload of `ü.bin` is made stale (its source
/// changed): the next put aborts it, and its upload id is gone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_abandoned_upload_of_a_non_ascii_name_is_really_aborted() {
    use object_store::multipart::MultipartStore;
    let url = garage().fresh_root("umlaut");
    let server = TestServer::start_object(&url, 0).await;
    let cfg = tempfile::tempdir().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("ü.bin");
    std::fs::write(&src, pattern(40 * MIB, 22)).unwrap();
    let client = slow_client(&server, cfg.path(), 16 * MIB as u64).await;
    let c = client.clone();
    let s = src.clone();
    let upload = tokio::spawn(async move { c.put(&s, "ü.bin", false, &|_| {}).await });
    wait_for_parts(&url, 1).await;
    client.connection().close(0u32.into(), b"gone");
    assert!(upload.await.unwrap().is_err());
    let record = keys(&url)
        .await
        .into_iter()
        .find(|k| k.starts_with(".qxfer-partial/") && k.ends_with("/upload"))
        .expect("the interrupted upload is recorded");
    let header: serde_json::Value =
        serde_json::from_slice(&common::stored_at(Path::new(&url), &record).await.unwrap())
            .unwrap();
    let key = object_store::path::Path::parse(header["key"].as_str().unwrap()).unwrap();
    let id = header["upload_id"].as_str().unwrap().to_owned();
    // The probe: a part more for the upload, taken while it exists.
    let probe = || async {
        bucket()
            .put_part(&key, &id, 3, object_store::PutPayload::from_static(b"x"))
            .await
    };
    probe().await.expect("the interrupted upload takes parts");
    // The source changes: its old upload is stale, and the put aborts it.
    let f = std::fs::File::options().write(true).open(&src).unwrap();
    f.set_modified(std::time::SystemTime::now() - Duration::from_secs(60))
        .unwrap();
    drop(f);
    // The same client identity: its upload of this name, another version,
    // slowed down so that the old upload is looked at before the new one
    // completes (Garage drops the uploads of a key older than one that
    // completes, which would hide the leak).
    let fresh = slow_client(&server, cfg.path(), 16 * MIB as u64).await;
    let c = fresh.clone();
    let s = src.clone();
    let second = tokio::spawn(async move { c.put(&s, "ü.bin", false, &|_| {}).await });
    let started = Instant::now();
    while keys(&url).await.contains(&record) {
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "never replaced"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        probe().await.is_err(),
        "the abandoned upload {id} of {key} still takes parts"
    );
    let report = second.await.unwrap().unwrap();
    assert!(
        report.notes.iter().any(|n| n.contains("changed")),
        "{:?}",
        report.notes
    );
    server.settled().await;
    assert!(!keys(&url)
        .await
        .iter()
        .any(|k| k.starts_with(".qxfer-partial/")));
    fresh.close().await;
}

/// One server's sweep once aborted another server's live upload whose
/// next part took longer than the sweeper's TTL (the record had not
/// changed for that long). A live upload holds a lease on its name, kept
/// fresh however slow its data, and the sweep leaves leased names alone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_servers_sweep_leaves_a_slow_live_upload_alone() {
    let url = garage().fresh_root("slowlive");
    let shared = tempfile::tempdir().unwrap();
    let certs = shared.path().join("certs");
    let uploader =
        TestServer::start_object_with(tempfile::tempdir().unwrap(), &certs, &url, 0).await;
    let _sweeper =
        TestServer::start_object_configured(tempfile::tempdir().unwrap(), &certs, &url, 1, |c| {
            c.partial_ttl = Duration::from_secs(1)
        })
        .await;
    let cfg = tempfile::tempdir().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("slow");
    // 8 MiB parts at 3 MiB/s: 2.7 s between parts, the sweeper's TTL 1 s.
    let data = pattern(24 * MIB, 28);
    std::fs::write(&src, &data).unwrap();
    let client = slow_client(&uploader, cfg.path(), 3 * MIB as u64).await;
    let report = client.put(&src, "slow", false, &|_| {}).await.unwrap();
    assert_eq!(report.bytes, data.len() as u64);
    assert!(uploader.stored("slow").await == data);
    client.close().await;
}

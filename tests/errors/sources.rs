//! Sources that change while they are sent (shrink, rewritten, grow) or are not files (a FIFO): that file fails, nothing is committed.

use super::*;

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

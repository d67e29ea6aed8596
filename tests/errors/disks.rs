//! Disks that fill or refuse: a full disk on either side, uploads that do not fit together, the loser of a no-clobber race, a mount point inside the root.

use super::*;

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

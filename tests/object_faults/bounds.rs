//! What a server asks of the store and holds in memory: declared sizes no store takes, proving a prefix, uploads' memory over the whole server, listings beside other requests.

use super::*;

/// A declared size no store takes once made the server reserve a part
/// buffer of 1/10,000 of it (512 TiB for 4 EiB) and abort, every client
/// lost. Through the binary: the put is refused, naming the limit, and the
/// same server process goes on serving.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_declared_size_no_store_takes_is_refused_and_the_server_lives() {
    let home = tempfile::tempdir().unwrap();
    let h = home.path().to_owned();
    let root = common::Backend::Object.root_for_process(h.join("root"), "huge");
    let mut cmd = qxfer(&h);
    cmd.args(["serve", "--listen", "127.0.0.1:0", "--certs"])
        .arg(h.join("certs"));
    serve_root(&mut cmd, &root);
    let mut serve = ServeProcess::spawn(cmd);
    // Sparse files on tmpfs (a disk's filesystem caps files at 16 TiB).
    let shm = tempfile::tempdir_in("/dev/shm").unwrap();
    for (name, size) in [("huge", 4u64 << 60), ("biggest", i64::MAX as u64)] {
        let path = shm.path().join(name);
        std::fs::File::create(&path).unwrap().set_len(size).unwrap();
        let out = common::output({
            let mut c = qxfer_at(&h, serve.addr);
            c.arg("put").arg(&path);
            c
        })
        .await;
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{err}");
        assert!(err.contains(name) && err.contains("5 TiB"), "{err}");
        assert!(
            serve.child.try_wait().unwrap().is_none(),
            "the server died: {err}"
        );
    }
    let small = shm.path().join("small");
    std::fs::write(&small, b"still serving").unwrap();
    let mut put = qxfer_at(&h, serve.addr);
    put.arg("put").arg(&small);
    let out = common::output(put).await;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The peak resident memory of process `pid`, in bytes.
fn peak_memory(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .unwrap()
        .trim()
        .trim_end_matches(" kB")
        .trim()
        .parse()
        .unwrap();
    kib << 10
}

/// A file with neither a stored BLAKE3 nor sums (written by another tool,
/// or renamed) is proven to a resuming client by reading its prefix: that
/// read once went into one buffer, so asking again for a finished download
/// (the prefix is the whole file) cost the server the file's size in memory.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proving_a_prefix_holds_a_few_mib_however_long_it_is() {
    let home = tempfile::tempdir().unwrap();
    let h = home.path().to_owned();
    let url = garage().fresh_root("prove");
    let mut cmd = qxfer(&h);
    cmd.args(["serve", "--listen", "127.0.0.1:0", "--certs"])
        .arg(h.join("certs"));
    serve_root(&mut cmd, Path::new(&url));
    let serve = ServeProcess::spawn(cmd);
    let size = 160 * MIB;
    let data = pattern(size, 21);
    common::place_at(Path::new(&url), "plain", &data).await;
    let out_dir = h.join("out");
    let get = || {
        let mut c = qxfer_at(&h, serve.addr);
        c.args(["get", "plain", "-o"]).arg(&out_dir);
        c
    };
    let first = common::output(get()).await;
    assert!(
        first.status.success(),
        "{}",
        String::from_utf8_lossy(&first.stderr)
    );
    let before = peak_memory(serve.child.id());
    // Again: the whole file is the prefix the server must prove.
    let again = common::output(get()).await;
    assert!(
        again.status.success(),
        "{}",
        String::from_utf8_lossy(&again.stderr)
    );
    let grew = peak_memory(serve.child.id()).saturating_sub(before);
    assert!(
        grew < 48 * MIB as u64,
        "proving a {size}-byte prefix raised the server's peak by {grew} bytes"
    );
    assert_eq!(std::fs::read(out_dir.join("plain")).unwrap(), data);
}

/// Memory for uploads is reserved server-wide before a put is accepted: a
/// put that needs more than the whole budget is refused at once, naming
/// it; one that does not fit beside those in flight waits for them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upload_memory_is_bounded_for_the_whole_server() {
    let url = garage().fresh_root("memory");
    let mut options = garage().options(0);
    options.upload_memory = Some(MIB as u64);
    let config = ServeConfig::object_store(&url, &options, false)
        .await
        .unwrap();
    let server = TestServer::start_config(
        tempfile::tempdir().unwrap(),
        config,
        ServerLimits::default(),
    )
    .await;
    let dir = tempfile::tempdir().unwrap();
    // A multipart upload holds three 8 MiB parts: more than the budget.
    let big = dir.path().join("big");
    std::fs::write(&big, pattern(12 * MIB, 24)).unwrap();
    let (client, _cfg) = server.client().await;
    let (code, msg) = common::remote_code(client.put(&big, "big", false, &|_| {}).await);
    assert_eq!(code, ErrorCode::TooLarge, "{msg}");
    assert!(
        msg.contains("'big'") && msg.contains("--upload-memory"),
        "{msg}"
    );
    // Two files of 700 KiB do not fit together: the second waits until
    // the first (slowed down) is done.
    let (a, b) = (dir.path().join("a"), dir.path().join("b"));
    std::fs::write(&a, pattern(700 << 10, 25)).unwrap();
    std::fs::write(&b, pattern(700 << 10, 26)).unwrap();
    let cfg = tempfile::tempdir().unwrap();
    let slow = slow_client(&server, cfg.path(), 350 << 10).await;
    let first = tokio::spawn(async move {
        slow.put(&a, "a", false, &|_| {}).await.unwrap();
        Instant::now()
    });
    tokio::time::sleep(Duration::from_millis(500)).await;
    client.put(&b, "b", false, &|_| {}).await.unwrap();
    let second_done = Instant::now();
    let first_done = first.await.unwrap();
    assert!(
        second_done >= first_done,
        "the second put did not wait for the memory the first held"
    );
    client.close().await;
}

/// A listing looks up every file it shows (a HEAD each: listings carry no
/// metadata), 32 at a time, once from the server's 64 store slots: two big
/// `ls -r` took every slot and every other request queued behind them.
/// Lookups now have slots of their own: four listings of 600 entries at
/// once, through a store that answers in 20 ms, keep at most some 30
/// requests in flight, and a put made meanwhile is not held up by them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn listings_leave_the_store_to_other_requests() {
    use futures::StreamExt;
    let url = garage().fresh_root("lookups");
    let prefix = url
        .split_once("://")
        .unwrap()
        .1
        .split_once('/')
        .unwrap()
        .1
        .to_owned();
    let placing = (0..600).map(|i| {
        let key = object_store::path::Path::from(format!("{prefix}/t/d{}/f{i}", i % 6));
        async move { bucket().put(&key, vec![b'x'; 16].into()).await.unwrap() }
    });
    futures::stream::iter(placing)
        .buffer_unordered(32)
        .collect::<Vec<_>>()
        .await;
    let proxy = CountingProxy::start_slowed(Duration::from_millis(20)).await;
    let server = server_via(&url, &proxy.endpoint, |_| {}).await;
    let cfg = tempfile::tempdir().unwrap();
    let client = Client::connect(&server.client_config(cfg.path()))
        .await
        .unwrap();
    let listings = (0..4).map(|_| {
        let c = client.clone();
        tokio::spawn(async move { c.list_tree("t").await })
    });
    let listings: Vec<_> = listings.collect();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("small");
    std::fs::write(&src, b"small").unwrap();
    let started = Instant::now();
    client.put(&src, "small", false, &|_| {}).await.unwrap();
    let put_took = started.elapsed();
    for l in listings {
        assert_eq!(l.await.unwrap().unwrap().len(), 606);
    }
    let most = proxy.most_open();
    assert!(
        most <= 40,
        "{most} requests to the store in flight at once while four listings ran"
    );
    assert!(
        put_took < Duration::from_secs(2),
        "the put took {put_took:?}"
    );
    client.close().await;
}

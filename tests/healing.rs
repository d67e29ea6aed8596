//! Faults the product heals by itself, with the real binaries: a server killed and restarted mid-transfer, a graceful stop, signals on either side; the cases with transfers in flight at the server run over a local root and over the object store.

mod common;

use std::io::Read;
use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::{
    partials_at, pattern, place_at, qxfer, qxfer_at, serve_root, stored_at, Backend, ServeProcess,
};

/// A `qxfer serve` over `root` with certs in `<home>/certs` on `listen`,
/// with `extra` arguments; its log goes to `<home>/serve.log`.
fn serve_over(home: &Path, root: &Path, listen: &str, extra: &[&str]) -> ServeProcess {
    let mut cmd = qxfer(home);
    cmd.args(["serve", "--listen", listen, "--certs"])
        .arg(home.join("certs"))
        .args(extra);
    serve_root(&mut cmd, root);
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(home.join("serve.log"))
        .unwrap();
    ServeProcess::spawn_logging(cmd, log)
}

/// Starts a client command in the background, its stderr captured.
fn spawn(mut cmd: Command) -> Child {
    cmd.stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

/// Waits up to `limit` for `child` to exit; kills it and panics otherwise.
fn finish(mut child: Child, limit: Duration) -> Output {
    let start = Instant::now();
    while child.try_wait().unwrap().is_none() {
        if start.elapsed() > limit {
            let _ = child.kill();
            let mut err = String::new();
            let _ = child.stderr.take().unwrap().read_to_string(&mut err);
            panic!("still running after {limit:?}; stderr so far:\n{err}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    child.wait_with_output().unwrap()
}

/// A `qxfer serve` over `<home>/root`, as [`serve_over`].
fn serve(home: &Path, listen: &str, extra: &[&str]) -> ServeProcess {
    serve_over(home, &home.join("root"), listen, extra)
}

/// Waits until the server has an upload in its partial store, i.e. the
/// transfer is under way (not merely requested): some bytes in a local
/// partial; over the object store, the upload's record (made when the
/// multipart upload is created, as the data starts to arrive).
async fn wait_for_upload(root: &Path) {
    let start = Instant::now();
    loop {
        let held: u64 = match std::fs::read_dir(root.join(".qxfer-partial")) {
            Ok(d) => d
                .flatten()
                .filter_map(|e| e.metadata().ok())
                .map(|m| m.len())
                .sum(),
            Err(_) => partials_at(root).await.len() as u64,
        };
        if held > 0 {
            return;
        }
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "the upload never started"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn signal(child: &Child, sig: i32) {
    // SAFETY: kill(2) on our own child's pid has no memory-safety preconditions.
    unsafe { libc::kill(child.id() as i32, sig) };
}

/// Kills the server with SIGKILL mid-transfer (no close frame, no
/// partial flushed politely), restarts it on the same port a moment
/// later, and checks the client finished by itself: it learned at once
/// that its connection was gone (the restarted server's stateless reset;
/// the idle timeout alone is 30 s), reconnected and resumed.
async fn survives_restart(get: bool, backend: Backend) {
    let home = tempfile::tempdir().unwrap();
    let h = home.path();
    let root = backend.root_for_process(h.join("root"), "healing");
    std::fs::create_dir_all(h.join("out")).unwrap();
    let data = pattern(24 << 20, 51);
    let src = h.join("big");
    std::fs::write(&src, &data).unwrap();
    if get {
        place_at(&root, "big", &data).await;
    }
    let mut server = serve_over(h, &root, "127.0.0.1:0", &[]);
    let addr = server.addr;
    let mut cmd = qxfer_at(h, addr);
    if get {
        cmd.args(["get", "big", "-o"]).arg(h.join("out"));
    } else {
        cmd.arg("put").arg(&src);
    }
    cmd.args(["--limit-rate", "6M"]);
    let started = Instant::now();
    let client = spawn(cmd);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    server.child.kill().unwrap();
    server.child.wait().unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let restarted = serve_over(h, &root, &addr.to_string(), &[]);
    assert_eq!(restarted.fingerprint, server.fingerprint, "same identity");
    let out = finish(client, Duration::from_secs(60));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(stderr.contains("reconnecting"), "{stderr}");
    assert!(
        stderr.contains("restarted") || stderr.contains("stopped answering"),
        "{stderr}"
    );
    let landed = if get {
        std::fs::read(h.join("out/big")).unwrap()
    } else {
        stored_at(&root, "big").await.unwrap()
    };
    assert!(landed == data, "contents intact");
    // 24 MiB at 6 MiB/s is 4 s; the outage costs the reset's round trip
    // and the backoff, not the 30 s idle timeout.
    let took = started.elapsed();
    assert!(took < Duration::from_secs(20), "took {took:?}:\n{stderr}");
}

both_backends!(
    a_put_survives_the_server_killed_and_restarted,
    put_restart_on
);

async fn put_restart_on(backend: Backend) {
    survives_restart(false, backend).await;
}

both_backends!(
    a_get_survives_the_server_killed_and_restarted,
    get_restart_on
);

async fn get_restart_on(backend: Backend) {
    survives_restart(true, backend).await;
}

both_backends!(
    a_stopping_server_finishes_transfers_in_flight,
    stopping_server_on
);

async fn stopping_server_on(backend: Backend) {
    let home = tempfile::tempdir().unwrap();
    let h = home.path();
    let root = backend.root_for_process(h.join("root"), "healing");
    // Larger than one part of an object store upload (8 MiB), so that it
    // is a multipart upload there; 4 s at 3 MiB/s, well within the grace.
    std::fs::write(h.join("f"), pattern(12 << 20, 52)).unwrap();
    let mut server = serve_over(h, &root, "127.0.0.1:0", &[]);
    let mut cmd = qxfer_at(h, server.addr);
    cmd.arg("put").arg(h.join("f")).args(["--limit-rate", "3M"]);
    let client = spawn(cmd);
    wait_for_upload(&root).await;
    signal(&server.child, libc::SIGTERM);
    let out = finish(client, Duration::from_secs(20));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        stored_at(&root, "f").await.unwrap(),
        std::fs::read(h.join("f")).unwrap()
    );
    let status = server.child.wait().unwrap();
    assert!(status.success(), "{status:?}");
}

both_backends!(
    past_the_grace_clients_hear_the_server_is_shutting_down_and_resume_later,
    past_the_grace_on
);

async fn past_the_grace_on(backend: Backend) {
    let home = tempfile::tempdir().unwrap();
    let h = home.path();
    let root = backend.root_for_process(h.join("root"), "healing");
    let data = pattern(24 << 20, 53);
    std::fs::write(h.join("f"), &data).unwrap();
    let mut server = serve_over(h, &root, "127.0.0.1:0", &["--grace", "1s"]);
    let addr = server.addr;
    let mut cmd = qxfer_at(h, addr);
    cmd.arg("put")
        .arg(h.join("f"))
        .args(["--limit-rate", "6M", "--retries", "8"]);
    let client = spawn(cmd);
    wait_for_upload(&root).await;
    signal(&server.child, libc::SIGTERM);
    let stopped = Instant::now();
    let status = server.child.wait().unwrap();
    assert!(status.success(), "{status:?}");
    assert!(stopped.elapsed() < Duration::from_secs(5), "grace of 1 s");
    let log = std::fs::read_to_string(h.join("serve.log")).unwrap();
    assert!(log.contains("still running after"), "{log}");
    let _restarted = serve_over(h, &root, &addr.to_string(), &[]);
    let out = finish(client, Duration::from_secs(60));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(stderr.contains("the server is shutting down"), "{stderr}");
    assert!(stored_at(&root, "f").await.unwrap() == data);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_signal_stops_the_server_at_once() {
    let home = tempfile::tempdir().unwrap();
    let h = home.path();
    std::fs::write(h.join("f"), pattern(8 << 20, 54)).unwrap();
    let mut server = serve(h, "127.0.0.1:0", &["--grace", "60s"]);
    let mut cmd = qxfer_at(h, server.addr);
    cmd.arg("put")
        .arg(h.join("f"))
        .args(["--limit-rate", "1M", "--retries", "0"]);
    let client = spawn(cmd);
    wait_for_upload(&h.join("root")).await;
    signal(&server.child, libc::SIGINT);
    std::thread::sleep(Duration::from_millis(300));
    assert!(
        server.child.try_wait().unwrap().is_none(),
        "first signal: draining, still running"
    );
    signal(&server.child, libc::SIGINT);
    let start = Instant::now();
    let status = server.child.wait().unwrap();
    assert!(status.success(), "{status:?}");
    assert!(start.elapsed() < Duration::from_secs(4));
    let out = finish(client, Duration::from_secs(20));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("the server is shutting down"), "{stderr}");
    assert!(stderr.contains("run the same command again"), "{stderr}");
    // The error names the file once.
    let line = stderr
        .lines()
        .find(|l| l.starts_with("qxfer: error:"))
        .unwrap();
    let path = h.join("f").display().to_string();
    assert_eq!(line.matches(&path).count(), 1, "{line}");
    // The interrupted upload's partial is kept for that rerun.
    let partials = std::fs::read_dir(h.join("root/.qxfer-partial"))
        .unwrap()
        .flatten()
        .map(|e| e.metadata().unwrap().len())
        .sum::<u64>();
    assert!(partials > 0, "partial kept");
    assert!(!h.join("root/f").exists());
}

#[test]
fn an_interrupted_client_exits_130_and_says_how_to_resume() {
    let home = tempfile::tempdir().unwrap();
    let h = home.path();
    std::fs::write(h.join("f"), pattern(8 << 20, 55)).unwrap();
    let server = serve(h, "127.0.0.1:0", &[]);
    let mut cmd = qxfer_at(h, server.addr);
    cmd.arg("put").arg(h.join("f")).args(["--limit-rate", "2M"]);
    let client = spawn(cmd);
    // Long enough for whole 1 MiB blocks to reach the server's disk.
    std::thread::sleep(Duration::from_millis(2500));
    signal(&client, libc::SIGINT);
    let out = finish(client, Duration::from_secs(10));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(130), "{stderr}");
    assert!(stderr.contains("run the same command again"), "{stderr}");
    // And the rerun resumes, sending only the rest.
    let out = qxfer_at(h, server.addr)
        .arg("put")
        .arg(h.join("f"))
        .arg("--json")
        .output()
        .unwrap();
    let doc = common::json_of(&out);
    let resumed = doc["files"][0]["resumed_from"].as_u64().unwrap();
    assert!(resumed > 0, "{doc}");
}

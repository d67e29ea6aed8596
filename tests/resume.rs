//! Interrupted transfers continue where they stopped: after SIGKILL of either side, a dropped connection, with corrupted or stale partials; over a local root and over the object store.

mod common;

use std::path::Path;
use std::process::{Child, Output};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use common::{
    flip_byte, home_for, output, partial_bytes_at, pattern, qxfer, qxfer_at, serve_root, stored_at,
    tree, Backend, ServeProcess, TestServer,
};
use qxfer::client::{hex, Client, TransferReport, PART_SUFFIX};
use qxfer::paths::PARTIAL_DIR;

const MIB: usize = 1 << 20;

/// Waits until `len()` reports at least `at_least` bytes.
async fn wait_for_bytes<F: std::future::Future<Output = u64>>(
    what: &str,
    at_least: u64,
    len: impl Fn() -> F,
) {
    let start = Instant::now();
    loop {
        let now = len().await;
        if now >= at_least {
            return;
        }
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "{what} never reached {at_least} bytes (at {now})"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn kill(child: &mut Child) {
    // SIGKILL: no destructor, no cleanup, like a crash or `kill -9`.
    child.kill().unwrap();
    child.wait().unwrap();
}

fn file_len(p: &Path) -> u64 {
    std::fs::metadata(p).map(|m| m.len()).unwrap_or(0)
}

/// The one file report of a `--json` run.
fn report(out: &Output) -> serde_json::Value {
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let doc: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(doc["files"].as_array().unwrap().len(), 1, "{doc}");
    doc["files"][0].clone()
}

both_backends!(
    a_get_killed_with_sigkill_resumes_and_resends_at_most_a_window,
    get_killed_on
);

async fn get_killed_on(backend: Backend) {
    let server = TestServer::start_on(backend, "resume").await;
    let size = 200 * MIB;
    let data = pattern(size, 42);
    server.place("big", &data).await;
    let home = home_for(&server);
    let out = home.path().join("out");
    let part = out.join(format!("big{PART_SUFFIX}"));
    let get = |extra: &[&str]| {
        let mut cmd = qxfer_at(home.path(), server.addr);
        cmd.args(["get", "big", "-q", "-o"]).arg(&out).args(extra);
        cmd
    };

    let mut child = get(&["--limit-rate", "40M"]).spawn().unwrap();
    wait_for_bytes("the partial download", 40 * MIB as u64, || async {
        file_len(&part)
    })
    .await;
    kill(&mut child);
    let held = file_len(&part);
    assert!(held < size as u64, "killed in the middle");
    assert!(!out.join("big").exists(), "nothing under the final name");

    let r = report(&output(get(&["--json"])).await);
    assert_eq!(r["blake3"], hex(blake3::hash(&data).as_bytes()));
    assert_eq!(r["resumed_from"], held, "continued after every byte kept");
    assert_eq!(r["bytes_sent"], size as u64 - held);
    assert_eq!(std::fs::read(out.join("big")).unwrap(), data);
    assert!(!part.exists());
    // The server's counter: everything it ever sent for this file, minus one
    // copy. What a killed client loses is what it had been sent but not yet
    // written: at most its stream's flow-control window (sized for long,
    // lossy paths), plus the chunks queued for its disk.
    let resent = server.stats.bytes_sent.load(Ordering::Relaxed) - size as u64;
    assert!(
        resent < u64::from(qxfer::endpoint::STREAM_RECEIVE_WINDOW) + 8 * MIB as u64,
        "{resent} bytes sent twice of {size}"
    );
}

both_backends!(
    a_put_killed_with_sigkill_resumes_and_resends_little,
    put_killed_on
);

async fn put_killed_on(backend: Backend) {
    let server = TestServer::start_on(backend, "resume").await;
    let size = 200 * MIB;
    let data = pattern(size, 43);
    let home = home_for(&server);
    let src = home.path().join("big");
    std::fs::write(&src, &data).unwrap();
    let put = |extra: &[&str]| {
        let mut cmd = qxfer_at(home.path(), server.addr);
        cmd.args(["put", "-q"]).arg(&src).args(extra);
        cmd
    };

    let mut child = put(&["--limit-rate", "40M"]).spawn().unwrap();
    wait_for_bytes("the server's partial", 40 * MIB as u64, || {
        server.partial_bytes()
    })
    .await;
    kill(&mut child);
    assert!(
        stored_at(&server.root, "big").await.is_none(),
        "nothing under the final name"
    );

    // The server has not noticed the client is gone (that takes the idle
    // timeout); the rerun takes the partial over from the stale upload.
    // Without -q, so that the summary is printed.
    let mut rerun = qxfer_at(home.path(), server.addr);
    rerun.arg("put").arg(&src).arg("--json");
    let out = output(rerun).await;
    let r = report(&out);
    // The run's own figures count only what it sent.
    let doc: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(doc["bytes"], size as u64);
    assert_eq!(doc["bytes_sent"], r["bytes_sent"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("put 1 file: ")
            && stderr.contains(" sent in ")
            && stderr.contains("were already there"),
        "{stderr}"
    );
    assert_eq!(r["blake3"], hex(blake3::hash(&data).as_bytes()));
    let resumed = r["resumed_from"].as_u64().unwrap();
    assert!(resumed >= 40 * MIB as u64, "resumed from {resumed}");
    assert_eq!(r["bytes_sent"], size as u64 - resumed);
    assert_eq!(server.stored("big").await, data);
    assert_eq!(server.stored_tree().await, ["big"], "no partial left");
    // A local root keeps every byte written before the kill: what is sent
    // twice is what was in flight. An object store keeps whole parts only
    // (8 MiB; a server holds at most one part filling and 3 being stored),
    // so up to 4 parts more may be sent again there.
    let resent = server.stats.bytes_received.load(Ordering::Relaxed) - size as u64;
    let allowed = match backend {
        Backend::Local => size as u64 / 10,
        Backend::Object => size as u64 / 10 + 4 * 8 * MIB as u64,
    };
    assert!(resent < allowed, "{resent} bytes received twice of {size}");
}

both_backends!(
    a_put_survives_the_server_being_killed_and_restarted,
    server_killed_on
);

async fn server_killed_on(backend: Backend) {
    let home = tempfile::tempdir().unwrap();
    let h = home.path().to_owned();
    let root = backend.root_for_process(h.join("root"), "resume");
    let serve = |listen: &str| {
        let mut cmd = qxfer(&h);
        cmd.args(["serve", "--listen", listen, "--certs"])
            .arg(h.join("certs"));
        serve_root(&mut cmd, &root);
        ServeProcess::spawn(cmd)
    };
    let mut server = serve("127.0.0.1:0");
    let addr = server.addr;
    let size = 200 * MIB;
    let data = pattern(size, 44);
    let src = h.join("big");
    std::fs::write(&src, &data).unwrap();
    let put = |extra: &[&str]| {
        let mut cmd = qxfer_at(&h, addr);
        cmd.args(["put", "-q"]).arg(&src).args(extra);
        cmd
    };
    let mut client = put(&["--limit-rate", "40M"]).spawn().unwrap();
    wait_for_bytes("the server's partial", 40 * MIB as u64, || {
        partial_bytes_at(&root)
    })
    .await;
    kill(&mut server.child);
    let held = partial_bytes_at(&root).await;
    // The client would wait out the idle timeout; a user would Ctrl-C it.
    kill(&mut client);

    let _restarted = serve(&addr.to_string());
    let r = report(&output(put(&["--json"])).await);
    assert_eq!(r["blake3"], hex(blake3::hash(&data).as_bytes()));
    let resumed = r["resumed_from"].as_u64().unwrap();
    assert!(
        resumed > 0 && resumed <= held,
        "resumed from {resumed}, {held} held"
    );
    assert_eq!(stored_at(&root, "big").await.unwrap(), data);
}

/// Uploads `src` over a rate-limited connection and drops the connection
/// once the server holds at least `bytes`, like a network that goes away.
async fn interrupted_put(server: &TestServer, cfg: &Path, src: &Path, name: &str, bytes: u64) {
    let mut config = server.client_config(cfg);
    config.limit_rate = Some(20 * MIB as u64);
    let client = Client::connect(&config).await.unwrap();
    let (src, name) = (src.to_owned(), name.to_owned());
    let c = client.clone();
    let upload = tokio::spawn(async move { c.put(&src, &name, false, &|_| {}).await });
    wait_for_bytes("the server's partial", bytes, || server.partial_bytes()).await;
    client.connection().close(0u32.into(), b"gone");
    assert!(upload.await.unwrap().is_err());
    // Let the server finish writing what it received: on an object root a
    // part still in flight lands after the drop (a fixed 200 ms once saw
    // 8 MiB, and the resume then 16), so wait until its partial stops
    // growing.
    let mut last = server.partial_bytes().await;
    for _ in 0..50 {
        tokio::time::sleep(Duration::from_millis(300)).await;
        let now = server.partial_bytes().await;
        if now == last {
            break;
        }
        last = now;
    }
}

/// A put from the client identity in `cfg` (partials belong to an identity).
async fn put(
    server: &TestServer,
    cfg: &Path,
    src: &Path,
    name: &str,
    resume: bool,
) -> TransferReport {
    let mut config = server.client_config(cfg);
    config.resume = resume;
    let client = Client::connect(&config).await.unwrap();
    let r = client.put(src, name, false, &|_| {}).await.unwrap();
    client.close().await;
    r
}

both_backends!(
    dropped_connections_resume_and_flipped_bytes_are_caught,
    dropped_connections_on
);

async fn dropped_connections_on(backend: Backend) {
    let server = TestServer::start_on(backend, "resume").await;
    let work = tempfile::tempdir().unwrap();
    let data = pattern(24 * MIB, 45);
    let src = work.path().join("f");
    std::fs::write(&src, &data).unwrap();
    let digest = *blake3::hash(&data).as_bytes();
    let cfg = tempfile::tempdir().unwrap();
    let cfg = cfg.path();

    // A dropped connection, then a plain rerun: it continues. The client's
    // upload journal is what tells the rerun to ask for an offer first.
    let journal = || std::fs::read_dir(cfg.join("uploads")).map_or(0, |d| d.count());
    interrupted_put(&server, cfg, &src, "a", 4 * MIB as u64).await;
    assert_eq!(journal(), 1, "the interrupted upload is remembered");
    let held = server.partial_bytes().await;
    let r = put(&server, cfg, &src, "a", true).await;
    assert_eq!((r.blake3, r.resumed_from), (digest, held));
    assert!(r.notes.is_empty(), "{:?}", r.notes);
    assert_eq!(server.stored("a").await, data);
    assert_eq!(journal(), 0, "and forgotten once committed");
    let left = server.partials().await;
    assert!(left.is_empty(), "the committed upload left {left:?}");

    // One byte flipped in the server's partial: the prefixes differ, the
    // upload starts over, says so, and the result is still right.
    interrupted_put(&server, cfg, &src, "b", 4 * MIB as u64).await;
    server.corrupt_partial().await;
    let r = put(&server, cfg, &src, "b", true).await;
    assert_eq!((r.blake3, r.resumed_from), (digest, 0));
    assert!(r.notes[0].contains("does not match"), "{:?}", r.notes);
    assert_eq!(server.stored("b").await, data);

    if backend == Backend::Object {
        // A record whose hashes disagree with each other (the first part's
        // own hash, which proves a one-part prefix, intact; its chaining
        // value, which goes into the whole file's digest, flipped): the
        // resume is accepted, the end-to-end check fails, nothing is
        // committed, and the upload is discarded, so the rerun starts over.
        interrupted_put(&server, cfg, &src, "b2", 4 * MIB as u64).await;
        server.flip_part_record(&["cv"]).await;
        let mut config = server.client_config(cfg);
        config.resume = true;
        let client = Client::connect(&config).await.unwrap();
        let err = client.put(&src, "b2", false, &|_| {}).await.unwrap_err();
        assert!(err.to_string().contains("corrupted"), "{err}");
        client.close().await;
        let left = server.partials().await;
        assert!(
            left.is_empty(),
            "the upload is discarded, yet {left:?} remain; the servers warned:\n{}",
            common::server_log()
        );
        assert!(stored_at(&server.root, "b2").await.is_none());
        let r = put(&server, cfg, &src, "b2", true).await;
        assert_eq!((r.blake3, r.resumed_from), (digest, 0));
        assert_eq!(server.stored("b2").await, data);
    }

    // --no-resume starts over although a good partial is there.
    interrupted_put(&server, cfg, &src, "c", 4 * MIB as u64).await;
    let r = put(&server, cfg, &src, "c", false).await;
    assert_eq!((r.blake3, r.resumed_from), (digest, 0));

    // The source changed (new contents and mtime): the old partial is
    // thrown away, and the user is told.
    interrupted_put(&server, cfg, &src, "d", 4 * MIB as u64).await;
    let changed = pattern(24 * MIB, 46);
    std::fs::write(&src, &changed).unwrap();
    let r = put(&server, cfg, &src, "d", true).await;
    assert_eq!(r.resumed_from, 0);
    assert!(r.notes[0].contains("changed"), "{:?}", r.notes);
    assert_eq!(server.stored("d").await, changed);
    assert_eq!(
        server.stored_tree().await,
        if backend == Backend::Local {
            &["a", "b", "c", "d"][..]
        } else {
            &["a", "b", "b2", "c", "d"][..]
        },
        "no partial left"
    );
    // Partials belong to the client identity that sent them: another
    // client uploading the same file to the same name starts from zero.
    interrupted_put(&server, cfg, &src, "e", 4 * MIB as u64).await;
    let other = tempfile::tempdir().unwrap();
    let r = put(&server, other.path(), &src, "e", true).await;
    assert_eq!(r.resumed_from, 0);
    server.assert_healthy().await;
}

both_backends!(
    downloads_continue_from_a_good_part_and_restart_from_a_bad_one,
    download_parts_on
);

async fn download_parts_on(backend: Backend) {
    let server = TestServer::start_on(backend, "resume").await;
    let data = pattern(8 * MIB, 47);
    server.place("f", &data).await;
    let digest = *blake3::hash(&data).as_bytes();
    let (client, _cfg) = server.client().await;
    let out = tempfile::tempdir().unwrap();
    let dest = out.path().join("f");
    let part = out.path().join(format!("f{PART_SUFFIX}"));
    let get = || client.get("f", &dest, true, &|_| {}, &|_| {});

    std::fs::write(&part, &data[..3 * MIB]).unwrap();
    let r = get().await.unwrap();
    assert_eq!((r.blake3, r.resumed_from), (digest, 3 * MIB as u64));
    assert_eq!(r.bytes_sent, 5 * MIB as u64);
    assert_eq!(std::fs::read(&dest).unwrap(), data);
    assert!(!part.exists());

    std::fs::write(&part, &data[..3 * MIB]).unwrap();
    flip_byte(&part, 2 * MIB as u64);
    let r = get().await.unwrap();
    assert_eq!((r.blake3, r.resumed_from), (digest, 0));
    assert!(r.notes[0].contains("starting over"), "{:?}", r.notes);
    assert_eq!(std::fs::read(&dest).unwrap(), data);

    // --no-resume ignores a good part and starts over.
    let cfg = tempfile::tempdir().unwrap();
    let mut config = server.client_config(cfg.path());
    config.resume = false;
    let fresh = Client::connect(&config).await.unwrap();
    std::fs::write(&part, &data[..3 * MIB]).unwrap();
    let r = fresh.get("f", &dest, true, &|_| {}, &|_| {}).await.unwrap();
    assert_eq!((r.blake3, r.resumed_from), (digest, 0));
    fresh.close().await;

    // A part longer than the file is no prefix of it.
    std::fs::write(&part, pattern(9 * MIB, 1)).unwrap();
    let r = get().await.unwrap();
    assert_eq!((r.blake3, r.resumed_from), (digest, 0));
    assert_eq!(std::fs::read(&dest).unwrap(), data);
    assert_eq!(tree(out.path()), ["f"]);
    client.close().await;
}

/// Local root only: the object store's sweep (records older than the TTL,
/// their multipart uploads aborted) is tested against Garage in
/// tests/object_faults.rs, where the TTL can be short without racing the
/// other tests' uploads.
#[tokio::test]
async fn stale_partials_are_removed_after_the_ttl() {
    let dirs = tempfile::tempdir().unwrap();
    let root = dirs.path().join("root");
    let store = root.join(PARTIAL_DIR);
    std::fs::create_dir_all(&store).unwrap();
    let old = store.join("part-old");
    let fresh = store.join("part-fresh");
    std::fs::write(&old, b"old").unwrap();
    std::fs::write(&fresh, b"fresh").unwrap();
    let two_days_ago = std::time::SystemTime::now() - Duration::from_secs(48 * 3600);
    std::fs::File::options()
        .write(true)
        .open(&old)
        .unwrap()
        .set_modified(two_days_ago)
        .unwrap();
    let server = TestServer::start_in(dirs, &root).await;
    let start = Instant::now();
    while old.exists() {
        assert!(start.elapsed() < Duration::from_secs(5), "never swept");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(fresh.exists(), "a partial younger than 24 h stays");
    server.assert_healthy().await;
}

both_backends!(a_get_stopped_with_ctrl_c_resumes, ctrl_c_on);

async fn ctrl_c_on(backend: Backend) {
    let server = TestServer::start_on(backend, "resume").await;
    let size = 64 * MIB;
    let data = pattern(size, 48);
    server.place("f", &data).await;
    let home = home_for(&server);
    let out = home.path().join("out");
    let part = out.join(format!("f{PART_SUFFIX}"));
    let get = |extra: &[&str]| {
        let mut cmd = qxfer_at(home.path(), server.addr);
        cmd.args(["get", "f", "-q", "-o"]).arg(&out).args(extra);
        cmd
    };
    let mut cmd = get(&["--limit-rate", "20M"]);
    // A terminal delivers Ctrl-C with SIGINT at its default action; a test
    // runner started in the background may have it ignored, and children
    // inherit that, so restore the default in the child.
    // SAFETY: signal(2) is async-signal-safe, as pre_exec requires.
    unsafe {
        std::os::unix::process::CommandExt::pre_exec(&mut cmd, || {
            libc::signal(libc::SIGINT, libc::SIG_DFL);
            Ok(())
        });
    }
    let mut child = cmd.spawn().unwrap();
    wait_for_bytes("the partial download", 8 * MIB as u64, || async {
        file_len(&part)
    })
    .await;
    // SAFETY: kill(2) with a pid we own and a valid signal number.
    assert_eq!(unsafe { libc::kill(child.id() as i32, libc::SIGINT) }, 0);
    let status = child.wait().unwrap();
    assert!(!status.success());
    let held = file_len(&part);
    assert!(held >= 8 * MIB as u64 && held < size as u64);
    let r = report(&output(get(&["--json"])).await);
    assert_eq!(r["resumed_from"], held);
    assert_eq!(std::fs::read(out.join("f")).unwrap(), data);
}

/// Ctrl-C during a download to standard output: exit code 130, and the
/// message says the output is incomplete instead of offering a resume.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_download_to_stdout_stopped_with_ctrl_c_says_its_output_is_incomplete() {
    use std::io::Read;
    let server = TestServer::start().await;
    server.place("f", &pattern(64 * MIB, 49)).await;
    let home = home_for(&server);
    let mut cmd = qxfer_at(home.path(), server.addr);
    cmd.args(["get", "f", "-o", "-", "--limit-rate", "8M"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    // SAFETY: signal(2) is async-signal-safe, as pre_exec requires.
    unsafe {
        std::os::unix::process::CommandExt::pre_exec(&mut cmd, || {
            libc::signal(libc::SIGINT, libc::SIG_DFL);
            Ok(())
        });
    }
    let mut child = cmd.spawn().unwrap();
    // Read what it writes, so it never blocks on a full pipe, until some arrived.
    let mut stdout = child.stdout.take().unwrap();
    let reader = std::thread::spawn(move || {
        let mut got = Vec::new();
        let _ = stdout.read_to_end(&mut got);
        got.len()
    });
    tokio::time::sleep(Duration::from_millis(1500)).await;
    // SAFETY: kill(2) with a pid we own and a valid signal number.
    assert_eq!(unsafe { libc::kill(child.id() as i32, libc::SIGINT) }, 0);
    let out = tokio::task::spawn_blocking(move || child.wait_with_output().unwrap())
        .await
        .unwrap();
    let got = reader.join().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(130), "{stderr}");
    assert!(
        got > 0 && got < 64 * MIB,
        "{got} bytes before the interrupt"
    );
    assert!(stderr.contains("incomplete: discard it"), "{stderr}");
    assert!(!stderr.contains("to resume where it stopped"), "{stderr}");
}

both_backends!(
    an_interrupted_delta_resumes_in_both_directions,
    delta_killed_on
);

/// A delta (`--sync`, issue 19) killed half way resumes like any
/// transfer: the rerun continues after what the receiver kept, still as a
/// delta, and the result is the sender's file exactly. Half of the new
/// version is new bytes, sent at a limited rate so the kill lands in them.
async fn delta_killed_on(backend: Backend) {
    let server = TestServer::start_on(backend, "delta-resume").await;
    let size = 64 * MIB;
    let v1 = pattern(size, 50);
    let v2 = [&v1[..size / 2], &pattern(size / 2, 51)[..]].concat();
    let home = home_for(&server);
    let h = home.path();
    let src = h.join("big");
    std::fs::write(&src, &v1).unwrap();
    let q = |args: &[&str]| {
        let mut cmd = qxfer_at(h, server.addr);
        cmd.args(args).current_dir(h);
        cmd
    };
    report(&output(q(&["put", "big", "--json"])).await);
    report(&output(q(&["get", "big", "-o", "dl", "--json"])).await);

    // Upload: the server holds v1; v2 goes as a delta and is killed.
    std::fs::write(&src, &v2).unwrap();
    let mut child = q(&["put", "big", "-q", "--sync", "--limit-rate", "8M"])
        .spawn()
        .unwrap();
    wait_for_bytes("the server's partial", 40 * MIB as u64, || {
        server.partial_bytes()
    })
    .await;
    kill(&mut child);
    assert!(
        server.stored("big").await == v1,
        "v1 stays until v2 is whole"
    );
    let r = report(&output(q(&["put", "big", "--sync", "--json"])).await);
    assert_eq!(r["delta"], true, "{r}");
    let resumed = r["resumed_from"].as_u64().unwrap();
    assert!(resumed >= 40 * MIB as u64, "{r}");
    assert!(
        r["bytes_sent"].as_u64().unwrap() <= (size as u64 - resumed),
        "{r}"
    );
    assert_eq!(r["blake3"], hex(blake3::hash(&v2).as_bytes()));
    assert!(server.stored("big").await == v2);

    // Download: dl/big is v1, the server's is v2.
    let part = h.join(format!("dl/big{PART_SUFFIX}"));
    let mut child = q(&[
        "get",
        "big",
        "-q",
        "-o",
        "dl",
        "--sync",
        "--limit-rate",
        "8M",
    ])
    .spawn()
    .unwrap();
    wait_for_bytes("the partial download", 40 * MIB as u64, || async {
        file_len(&part)
    })
    .await;
    kill(&mut child);
    assert!(std::fs::read(h.join("dl/big")).unwrap() == v1, "v1 stays");
    let r = report(&output(q(&["get", "big", "-o", "dl", "--sync", "--json"])).await);
    assert_eq!(r["delta"], true, "{r}");
    let resumed = r["resumed_from"].as_u64().unwrap();
    assert!(resumed >= 40 * MIB as u64, "{r}");
    assert!(std::fs::read(h.join("dl/big")).unwrap() == v2);
    assert!(!part.exists());
}

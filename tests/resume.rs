//! Interrupted transfers continue where they stopped: after SIGKILL of either side, a dropped connection, with corrupted or stale partials.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Output};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use common::{home_for, pattern, qxfer, qxfer_at, tree, ServeProcess, TestServer};
use qxfer::client::{hex, Client, TransferReport, PART_SUFFIX};
use qxfer::server::PARTIAL_DIR;

const MIB: usize = 1 << 20;

/// Runs a finished command line off the async threads (the server under
/// test lives on them).
async fn output(mut cmd: std::process::Command) -> Output {
    tokio::task::spawn_blocking(move || cmd.output().unwrap())
        .await
        .unwrap()
}

/// Waits until `len()` reports at least `at_least` bytes.
async fn wait_for_bytes(what: &str, at_least: u64, len: impl Fn() -> u64) {
    let start = Instant::now();
    while len() < at_least {
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "{what} never reached {at_least} bytes (at {})",
            len()
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

/// Size of the resumable partial in a server root's partial store.
fn stored_partial(root: &Path) -> u64 {
    std::fs::read_dir(root.join(PARTIAL_DIR))
        .map(|d| {
            d.flatten()
                .filter(|e| e.file_name().to_string_lossy().starts_with("part-"))
                .map(|e| e.metadata().unwrap().len())
                .sum()
        })
        .unwrap_or(0)
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_get_killed_with_sigkill_resumes_and_resends_at_most_a_window() {
    let server = TestServer::start().await;
    let size = 200 * MIB;
    let data = pattern(size, 42);
    std::fs::write(server.root.join("big"), &data).unwrap();
    let home = home_for(&server);
    let out = home.path().join("out");
    let part = out.join(format!("big{PART_SUFFIX}"));
    let get = |extra: &[&str]| {
        let mut cmd = qxfer_at(home.path(), server.addr);
        cmd.args(["get", "big", "-q", "-o"]).arg(&out).args(extra);
        cmd
    };

    let mut child = get(&["--limit-rate", "40M"]).spawn().unwrap();
    wait_for_bytes("the partial download", 40 * MIB as u64, || file_len(&part)).await;
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_put_killed_with_sigkill_resumes_and_resends_under_a_tenth() {
    let server = TestServer::start().await;
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
        stored_partial(&server.root)
    })
    .await;
    kill(&mut child);
    assert!(
        !server.root.join("big").exists(),
        "nothing under the final name"
    );

    // The server has not noticed the client is gone (that takes the idle
    // timeout); the rerun takes the partial over from the stale upload.
    let r = report(&output(put(&["--json"])).await);
    assert_eq!(r["blake3"], hex(blake3::hash(&data).as_bytes()));
    let resumed = r["resumed_from"].as_u64().unwrap();
    assert!(resumed >= 40 * MIB as u64, "resumed from {resumed}");
    assert_eq!(r["bytes_sent"], size as u64 - resumed);
    assert_eq!(std::fs::read(server.root.join("big")).unwrap(), data);
    assert_eq!(tree(&server.root), ["big"], "no partial left");
    let resent = server.stats.bytes_received.load(Ordering::Relaxed) - size as u64;
    assert!(
        resent < size as u64 / 10,
        "{resent} bytes received twice of {size}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_put_survives_the_server_being_killed_and_restarted() {
    let home = tempfile::tempdir().unwrap();
    let h = home.path().to_owned();
    let serve = |listen: &str| {
        let mut cmd = qxfer(&h);
        cmd.args(["serve", "--listen", listen, "--root"])
            .arg(h.join("root"))
            .arg("--certs")
            .arg(h.join("certs"));
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
    let root = h.join("root");
    wait_for_bytes("the server's partial", 40 * MIB as u64, || {
        stored_partial(&root)
    })
    .await;
    kill(&mut server.child);
    let held = stored_partial(&root);
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
    assert_eq!(std::fs::read(root.join("big")).unwrap(), data);
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
    wait_for_bytes("the server's partial", bytes, || {
        stored_partial(&server.root)
    })
    .await;
    client.connection().close(0u32.into(), b"gone");
    assert!(upload.await.unwrap().is_err());
    // Let the server finish writing what it received.
    tokio::time::sleep(Duration::from_millis(200)).await;
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

fn partial_path(root: &Path) -> PathBuf {
    std::fs::read_dir(root.join(PARTIAL_DIR))
        .unwrap()
        .flatten()
        .find(|e| e.file_name().to_string_lossy().starts_with("part-"))
        .expect("a partial upload")
        .path()
}

fn flip_byte(path: &Path, at: u64) {
    use std::os::unix::fs::FileExt;
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .unwrap();
    let mut b = [0u8];
    f.read_exact_at(&mut b, at).unwrap();
    f.write_all_at(&[b[0] ^ 0x55], at).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropped_connections_resume_and_flipped_bytes_are_caught() {
    let server = TestServer::start().await;
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
    let held = file_len(&partial_path(&server.root));
    let r = put(&server, cfg, &src, "a", true).await;
    assert_eq!((r.blake3, r.resumed_from), (digest, held));
    assert!(r.notes.is_empty(), "{:?}", r.notes);
    assert_eq!(std::fs::read(server.root.join("a")).unwrap(), data);
    assert_eq!(journal(), 0, "and forgotten once committed");

    // One byte flipped in the server's partial: the prefixes differ, the
    // upload starts over, says so, and the result is still right.
    interrupted_put(&server, cfg, &src, "b", 4 * MIB as u64).await;
    flip_byte(&partial_path(&server.root), 1000);
    let r = put(&server, cfg, &src, "b", true).await;
    assert_eq!((r.blake3, r.resumed_from), (digest, 0));
    assert!(r.notes[0].contains("does not match"), "{:?}", r.notes);
    assert_eq!(std::fs::read(server.root.join("b")).unwrap(), data);

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
    assert_eq!(std::fs::read(server.root.join("d")).unwrap(), changed);
    assert_eq!(tree(&server.root), ["a", "b", "c", "d"], "no partial left");
    // Partials belong to the client identity that sent them: another
    // client uploading the same file to the same name starts from zero.
    interrupted_put(&server, cfg, &src, "e", 4 * MIB as u64).await;
    let other = tempfile::tempdir().unwrap();
    let r = put(&server, other.path(), &src, "e", true).await;
    assert_eq!(r.resumed_from, 0);
    server.assert_healthy().await;
}

#[tokio::test]
async fn downloads_continue_from_a_good_part_and_restart_from_a_bad_one() {
    let server = TestServer::start().await;
    let data = pattern(8 * MIB, 47);
    std::fs::write(server.root.join("f"), &data).unwrap();
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_get_stopped_with_ctrl_c_resumes() {
    let server = TestServer::start().await;
    let size = 64 * MIB;
    let data = pattern(size, 48);
    std::fs::write(server.root.join("f"), &data).unwrap();
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
    wait_for_bytes("the partial download", 8 * MIB as u64, || file_len(&part)).await;
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

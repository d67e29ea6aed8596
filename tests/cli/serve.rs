//! qxfer serve from the command line: allowed clients, listening on IPv6, roots, identities kept across restarts, ctrl-c, --read-only.

use super::*;

#[test]
fn unknown_clients_are_refused_until_allowed_and_open_admits_anyone() {
    let ops = tempfile::tempdir().unwrap();
    let server = serve(ops.path(), "127.0.0.1:0");
    // The banner comes first; what start-up has to say follows it, alike.
    assert!(
        server.banner[0].starts_with("qxfer "),
        "{:?}",
        server.banner
    );
    server.wait_for_line("admitting 0 client(s) listed in");
    let user = tempfile::tempdir().unwrap();
    let u = user.path();
    std::fs::write(u.join("f.txt"), b"hello").unwrap();

    // `qxfer id` makes the identity once and prints its fingerprint.
    let id = |home: &Path| {
        let out = qxfer(home).arg("id").output().unwrap();
        assert!(out.status.success());
        String::from_utf8(out.stdout).unwrap().trim().to_owned()
    };
    let fp = id(u);
    assert!(fp.starts_with("SHA256:") && fp.len() == 50, "{fp}");
    assert_eq!(id(u), fp, "stable across runs");
    let key = u.join("qxfer-config/client.key");
    assert_eq!(
        std::fs::metadata(&key).unwrap().permissions().mode() & 0o777,
        0o600
    );

    // A stranger is refused, told why, and shown its fingerprint: a
    // trust failure (exit code 4).
    client(u, &server)
        .current_dir(u)
        .args(["put", "f.txt"])
        .assert()
        .code(4)
        .stderr(
            predicate::str::contains("refused this client")
                .and(predicate::str::contains(fp.as_str()))
                .and(predicate::str::contains("qxfer id")),
        );
    client(u, &server)
        .arg("ls")
        .assert()
        .failure()
        .stderr(predicate::str::contains("refused this client"));
    assert!(!ops.path().join("root/f.txt").exists());

    // The operator allows it (a second `serve` with --allow, as they would
    // run it; the running server picks the change up without a restart).
    let mut allow = qxfer(ops.path());
    allow
        .args(["serve", "--listen", "127.0.0.1:0", "--allow", &fp, "--root"])
        .arg(ops.path().join("root"))
        .arg("--certs")
        .arg(ops.path().join("certs"));
    drop(ServeProcess::spawn(allow));
    let list = std::fs::read_to_string(ops.path().join("certs/authorized_clients")).unwrap();
    assert_eq!(list.matches(&fp).count(), 1, "{list}");
    client(u, &server)
        .current_dir(u)
        .args(["put", "f.txt"])
        .assert()
        .success();
    assert_eq!(
        std::fs::read(ops.path().join("root/f.txt")).unwrap(),
        b"hello"
    );

    // --open admits a client nobody listed, and says so loudly.
    let open_home = tempfile::tempdir().unwrap();
    let log = std::fs::File::create(open_home.path().join("log")).unwrap();
    let mut cmd = qxfer(open_home.path());
    cmd.args(["serve", "--open", "--listen", "127.0.0.1:0", "--root"])
        .arg(open_home.path().join("root"))
        .arg("--certs")
        .arg(open_home.path().join("certs"));
    let open = ServeProcess::spawn_logging(cmd, log);
    client(u, &open).arg("ls").assert().success();
    open.wait_for_line("--open: ANY client");
}

#[test]
fn ipv6_listen_and_connect() {
    if std::net::UdpSocket::bind("[::1]:0").is_err() {
        println!("skipped: no IPv6 loopback on this machine");
        return;
    }
    let home = tempfile::tempdir().unwrap();
    let h = home.path();
    let server = serve(h, "[::1]:0");
    assert!(server.addr.is_ipv6());
    std::fs::write(h.join("f"), b"six").unwrap();
    qxfer(h)
        .current_dir(h)
        .args(["put", "f", "--server", &server.addr.to_string()])
        .assert()
        .success();
    assert_eq!(std::fs::read(h.join("root/f")).unwrap(), b"six");
}

#[test]
fn bad_roots_are_clear_startup_errors_and_missing_roots_are_created() {
    let home = tempfile::tempdir().unwrap();
    let h = home.path();
    std::fs::write(h.join("afile"), b"").unwrap();
    qxfer(h)
        .args(["serve", "--listen", "127.0.0.1:0", "--root"])
        .arg(h.join("afile"))
        .arg("--certs")
        .arg(h.join("certs"))
        .assert()
        .failure()
        .stderr(predicate::str::contains("not a directory").and(predicate::str::contains("afile")));
    // A partial TTL so short that the sweep would run without pause.
    qxfer(h)
        .args(["serve", "--listen", "127.0.0.1:0", "--partial-ttl", "1ms"])
        .assert()
        .code(2)
        .stderr(predicate::str::contains("at least 1m"));
    let server = serve(h, "127.0.0.1:0");
    assert!(h.join("root").is_dir(), "root created");
    drop(server);
}

#[test]
fn identity_survives_restarts_and_a_changed_one_is_refused() {
    let home = tempfile::tempdir().unwrap();
    let h = home.path();
    let first = serve(h, "127.0.0.1:0");
    let addr = first.addr;
    let fp = first.fingerprint.clone();
    client(h, &first).arg("ls").assert().success();
    drop(first);
    let again = serve(h, &addr.to_string());
    assert_eq!(again.fingerprint, fp, "same identity after restart");
    client(h, &again)
        .arg("ls")
        .assert()
        .success()
        .stderr(predicate::str::contains("first contact").not());
    drop(again);

    // New certificate at the same address: the client refuses and says where to look.
    std::fs::remove_dir_all(h.join("certs")).unwrap();
    let changed = serve(h, &addr.to_string());
    assert_ne!(changed.fingerprint, fp);
    client(h, &changed).arg("ls").assert().code(4).stderr(
        predicate::str::contains("SERVER IDENTITY CHANGED")
            .and(predicate::str::contains("known_hosts"))
            .and(predicate::str::contains(changed.fingerprint.as_str())),
    );
    // An explicit pin to the new key connects; a wrong pin does not.
    client(h, &changed)
        .args(["ls", "--pin", &changed.fingerprint])
        .assert()
        .success();
    client(h, &changed)
        .args(["ls", "--pin", &fp])
        .assert()
        .code(4)
        .stderr(predicate::str::contains("pinned"));
    client(h, &changed)
        .args(["ls", "--pin", "SHA256:nonsense"])
        .assert()
        .code(2)
        .stderr(predicate::str::contains("invalid fingerprint"));
}

#[test]
fn ctrl_c_stops_the_server_cleanly() {
    let home = tempfile::tempdir().unwrap();
    let mut server = serve(home.path(), "127.0.0.1:0");
    // SAFETY: kill(2) on our own child's pid has no memory-safety preconditions.
    unsafe { libc::kill(server.child.id() as i32, libc::SIGINT) };
    let start = Instant::now();
    loop {
        if let Some(status) = server.child.try_wait().unwrap() {
            assert!(status.success(), "{status:?}");
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "server did not stop on SIGINT"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

both_backends!(read_only_flag_refuses_uploads, read_only_on);

async fn read_only_on(backend: Backend) {
    let home = tempfile::tempdir().unwrap();
    let h = home.path();
    let root = backend.root_for_process(h.join("root"), "cli");
    let server = serve_over(h, &root, "127.0.0.1:0", &["--read-only"]);
    std::fs::write(h.join("f"), b"x").unwrap();
    client(h, &server)
        .current_dir(h)
        .args(["put", "f"])
        .assert()
        .failure()
        .stderr(predicate::str::contains("read-only"));
    assert!(stored_at(&root, "f").await.is_none());
}

#[test]
fn metrics_and_health_are_served_over_http_in_prometheus_format() {
    let home = tempfile::tempdir().unwrap();
    let h = home.path();
    let server = serve_over(
        h,
        &h.join("root"),
        "127.0.0.1:0",
        &["--metrics", "127.0.0.1:0"],
    );
    let at = metrics_addr(&server);
    std::fs::write(h.join("f"), b"hello").unwrap();
    client(h, &server)
        .current_dir(h)
        .args(["put", "f"])
        .assert()
        .success();
    client(h, &server)
        .args(["get", "f", "-o"])
        .arg(h.join("back"))
        .assert()
        .success();
    client(h, &server)
        .args(["get", "missing", "-o"])
        .arg(h.join("nothing"))
        .assert()
        .failure();

    let (status, text) = http_get(at, "/metrics");
    assert_eq!(status, 200, "{text}");
    promtool_check(&text);
    let count = |series: &str| sample(&text, series).unwrap_or_else(|| panic!("{series}:\n{text}"));
    assert_eq!(
        count(r#"qxfer_requests_total{kind="put",outcome="ok"}"#),
        1.0
    );
    assert_eq!(
        count(r#"qxfer_requests_total{kind="get",outcome="ok"}"#),
        1.0
    );
    assert_eq!(
        count(r#"qxfer_requests_total{kind="get",outcome="refused"}"#),
        1.0,
        "the missing file"
    );
    assert_eq!(count("qxfer_received_bytes_total"), 5.0);
    assert_eq!(count("qxfer_sent_bytes_total"), 5.0);
    assert_eq!(count("qxfer_commit_seconds_count"), 1.0);
    assert_eq!(
        count("qxfer_connections_open"),
        0.0,
        "every client has gone"
    );
    assert_eq!(count("qxfer_requests_in_flight"), 0.0);
    assert_eq!(count("qxfer_store_errors_total"), 0.0);
    assert_eq!(count("qxfer_resumed_uploads_total"), 0.0);
    assert_eq!(count("qxfer_store_up"), 1.0);
    assert!(text.contains("# HELP qxfer_commit_seconds "), "{text}");

    // A stranger's refusal is counted by its reason.
    let stranger = tempfile::tempdir().unwrap();
    client(stranger.path(), &server)
        .arg("ls")
        .assert()
        .failure();
    let (_, text) = http_get(at, "/metrics");
    assert!(
        sample(
            &text,
            r#"qxfer_connections_refused_total{reason="handshake_failed"}"#
        )
        .is_some_and(|n| n >= 1.0),
        "{text}"
    );

    let (status, body) = http_get(at, "/health");
    assert_eq!((status, body.as_str()), (200, "ok\n"));
    let (status, body) = http_get(at, "/nothing-here");
    assert_eq!(status, 404, "{body}");
    assert!(body.contains("/metrics"), "{body}");
}

/// An upload interrupted (the client stopped with Ctrl-C) leaves a partial
/// for its resume: the metrics count it as held, and no longer once the
/// rerun has finished it.
#[test]
fn an_interrupted_upload_counts_as_a_partial_held_until_resumed() {
    let home = tempfile::tempdir().unwrap();
    let h = home.path();
    let root = h.join("root");
    let server = serve_over(h, &root, "127.0.0.1:0", &["--metrics", "127.0.0.1:0"]);
    let at = metrics_addr(&server);
    std::fs::write(h.join("big"), pattern(8 << 20, 3)).unwrap();
    let mut put = client(h, &server)
        .current_dir(h)
        .args(["put", "big", "--limit-rate", "1M"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let partials = root.join(qxfer::paths::PARTIAL_DIR);
    let started = Instant::now();
    // Interrupted once some of it has arrived (a partial holding nothing
    // is not kept).
    let arrived = || {
        std::fs::read_dir(&partials).map_or(0, |d| {
            d.flatten()
                .map(|e| e.metadata().map_or(0, |m| m.len()))
                .sum::<u64>()
        })
    };
    while arrived() < 1 << 20 {
        assert!(started.elapsed() < Duration::from_secs(20), "no partial");
        std::thread::sleep(Duration::from_millis(50));
    }
    // SAFETY: kill only sends a signal to the child we started.
    unsafe { libc::kill(put.id() as i32, libc::SIGINT) };
    assert!(!put.wait().unwrap().success());
    let held = || {
        let (status, text) = http_get(at, "/metrics");
        assert_eq!(status, 200, "{text}");
        promtool_check(&text);
        sample(&text, "qxfer_partials_held").unwrap_or_else(|| panic!("{text}"))
    };
    assert_eq!(held(), 1.0);
    client(h, &server)
        .current_dir(h)
        .args(["put", "big"])
        .assert()
        .success()
        .stderr(predicate::str::contains("resumed"));
    // The count stands for 10 s, then the next scrape counts again.
    let started = Instant::now();
    while held() != 0.0 {
        assert!(started.elapsed() < Duration::from_secs(20), "still held");
        std::thread::sleep(Duration::from_millis(500));
    }
}

#[test]
fn a_metrics_address_in_use_stops_serve_with_a_clear_error() {
    let home = tempfile::tempdir().unwrap();
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().to_string();
    qxfer(home.path())
        .args([
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--metrics",
            &port,
            "--root",
        ])
        .arg(home.path().join("root"))
        .arg("--certs")
        .arg(home.path().join("certs"))
        .assert()
        .failure()
        .stderr(
            predicate::str::contains(format!("cannot listen for metrics on {port}"))
                .and(predicate::str::contains("--metrics")),
        );
}

#[test]
fn json_logs_are_one_object_a_line() {
    let home = tempfile::tempdir().unwrap();
    let h = home.path();
    let log = h.join("log");
    let mut cmd = qxfer(h);
    cmd.args([
        "serve",
        "--listen",
        "127.0.0.1:0",
        "--log-format",
        "json",
        "--root",
    ])
    .arg(h.join("root"))
    .arg("--certs")
    .arg(h.join("certs"));
    let server = ServeProcess::spawn_logging(cmd, std::fs::File::create(&log).unwrap());
    std::fs::write(h.join("f"), b"x").unwrap();
    client(h, &server)
        .current_dir(h)
        .args(["put", "f"])
        .assert()
        .success();
    let start = Instant::now();
    let lines = loop {
        let text = std::fs::read_to_string(&log).unwrap();
        if text.contains("put committed") {
            break text;
        }
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "no commit logged: {text}"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    for line in lines.lines() {
        let v: serde_json::Value =
            serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {line:?}"));
        assert!(v["level"].is_string() && v["fields"].is_object(), "{line}");
    }
    assert!(
        lines.lines().any(|l| l.contains(r#""path":"f""#)),
        "the commit's fields are in the object: {lines}"
    );
}

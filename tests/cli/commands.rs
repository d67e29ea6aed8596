//! The client's commands end to end: help, completions and the man page, put, get, ls, rm and mv against a served root, named servers, unreachable servers, permissions.

use super::*;

#[test]
fn help_and_version() {
    let home = tempfile::tempdir().unwrap();
    qxfer(home.path()).arg("--help").assert().success().stdout(
        predicate::str::contains("serve")
            .and(predicate::str::contains("put"))
            .and(predicate::str::contains("get"))
            .and(predicate::str::contains("ls")),
    );
    for sub in ["serve", "put", "get", "ls"] {
        qxfer(home.path()).args([sub, "--help"]).assert().success();
    }
    qxfer(home.path())
        .args(["put", "--help"])
        .assert()
        .stdout(predicate::str::contains("--parallel").and(predicate::str::contains("--to")));
    qxfer(home.path())
        .arg("--version")
        .assert()
        .success()
        .stdout(predicate::str::contains(env!("CARGO_PKG_VERSION")));
    // Usage errors exit 2, and --help documents every exit code.
    qxfer(home.path()).arg("put").assert().code(2);
    qxfer(home.path())
        .args(["get", "--no-such-flag", "x"])
        .assert()
        .code(2);
    qxfer(home.path()).arg("--help").assert().stdout(
        predicate::str::contains("Exit codes:")
            .and(predicate::str::contains("3    connection failure"))
            .and(predicate::str::contains("4    trust failure")),
    );
}

#[test]
fn completions_and_man_page_are_generated() {
    let home = tempfile::tempdir().unwrap();
    qxfer(home.path())
        .args(["completions", "bash"])
        .assert()
        .success()
        .stdout(predicate::str::contains("complete -F").and(predicate::str::contains("qxfer")));
    for shell in ["zsh", "fish", "powershell", "elvish"] {
        qxfer(home.path())
            .args(["completions", shell])
            .assert()
            .success()
            .stdout(predicate::str::contains("put"));
    }
    qxfer(home.path())
        .args(["completions", "tcsh"])
        .assert()
        .code(2)
        .stderr(predicate::str::contains("invalid value"));
    qxfer(home.path()).arg("man").assert().success().stdout(
        predicate::str::contains(".TH qxfer")
            .and(predicate::str::contains("serve"))
            .and(predicate::str::contains("Exit codes")),
    );
}

both_backends!(serve_put_ls_get_end_to_end, end_to_end_on);

async fn end_to_end_on(backend: Backend) {
    let home = tempfile::tempdir().unwrap();
    let h = home.path();
    let root = backend.root_for_process(h.join("root"), "cli");
    let server = serve_over(h, &root, "127.0.0.1:0", &[]);
    assert!(server.banner[0].contains(&root.display().to_string()));
    assert!(server.fingerprint.starts_with("SHA256:"));
    let key_mode = std::fs::metadata(h.join("certs/server.key"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(key_mode & 0o777, 0o600);

    let src = h.join("src");
    std::fs::create_dir(&src).unwrap();
    for (i, name) in ["a", "b", "c d", "é"].iter().enumerate() {
        std::fs::write(src.join(name), pattern(100_000 * (i + 1), i as u64)).unwrap();
    }
    client(h, &server)
        .current_dir(&src)
        .args(["put", "a", "b", "c d", "é", "--to", "up/load", "--stats"])
        .assert()
        .success()
        .stderr(
            predicate::str::contains("first contact")
                .and(predicate::str::contains(server.fingerprint.as_str()))
                .and(predicate::str::contains("put 4 files"))
                // --stats: the path, this side's load, and the verdict.
                .and(predicate::str::contains("qxfer: path: round trip "))
                .and(predicate::str::contains("Mbit/s on the wire"))
                .and(predicate::str::contains("qxfer: this side: "))
                .and(predicate::str::contains("qxfer: limited by ")),
        );
    let known = std::fs::read_to_string(h.join("qxfer-config/known_hosts")).unwrap();
    assert!(known.contains(&server.fingerprint), "{known}");

    client(h, &server)
        .args(["ls", "up/load"])
        .assert()
        .success()
        .stdout(
            predicate::str::contains(" a\n")
                .and(predicate::str::contains("c d"))
                .and(predicate::str::contains("400000")),
        );
    let out = client(h, &server)
        .args(["ls", "--json", "up"])
        .output()
        .unwrap();
    let entries: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(entries[0]["name"], "load");
    assert_eq!(entries[0]["kind"], "dir");

    let dl = h.join("dl");
    let out = client(h, &server)
        .args([
            "get",
            "up/load/a",
            "up/load/c d",
            "up/load/é",
            "--json",
            "-o",
        ])
        .arg(&dl)
        .output()
        .unwrap();
    let report = common::json_of(&out);
    assert_eq!(report["files"].as_array().unwrap().len(), 3);
    // What the path was and what limited the download, always in --json.
    let path = &report["path"];
    assert!(path["rtt_ms"].as_f64().unwrap() > 0.0, "{path}");
    assert!(path["rate_mbit"].as_f64().unwrap() > 0.0, "{path}");
    assert!(path["cpu_cores"].as_f64().unwrap() >= 0.0, "{path}");
    // A download cannot see the sender's losses.
    assert!(path["loss"].is_null(), "{path}");
    let limits = [
        "link",
        "cpu",
        "disk",
        "flow_control",
        "receiver",
        "congestion",
        "round_trips",
    ];
    assert!(limits.contains(&path["limit"].as_str().unwrap()), "{path}");
    assert!(!path["why"].as_str().unwrap().is_empty(), "{path}");
    let a_hash = blake3::hash(&std::fs::read(src.join("a")).unwrap())
        .to_hex()
        .to_string();
    assert!(report["files"]
        .as_array()
        .unwrap()
        .iter()
        .any(|f| f["blake3"] == a_hash.as_str()));
    // Each file's own time, from its request to its commit.
    for f in report["files"].as_array().unwrap() {
        let secs = f["seconds"].as_f64().unwrap();
        assert!(
            secs > 0.0 && secs <= report["seconds"].as_f64().unwrap(),
            "{f}"
        );
    }
    for name in ["a", "c d", "é"] {
        assert_eq!(
            std::fs::read(dl.join(name)).unwrap(),
            std::fs::read(src.join(name)).unwrap()
        );
    }

    // Again without --force: the same file is already there, so nothing
    // moves; a different local file is refused and left untouched; with
    // --force it is replaced.
    client(h, &server)
        .args(["get", "up/load/a", "-o"])
        .arg(&dl)
        .assert()
        .success()
        .stderr(predicate::str::contains(
            "already there with the same contents",
        ));
    std::fs::write(dl.join("a"), b"mine").unwrap();
    client(h, &server)
        .args(["get", "up/load/a", "-o"])
        .arg(&dl)
        .assert()
        .failure()
        .stderr(
            predicate::str::contains("already exists").and(predicate::str::contains("--force")),
        );
    assert_eq!(std::fs::read(dl.join("a")).unwrap(), b"mine");
    client(h, &server)
        .args(["get", "up/load/a", "--force", "-q", "-o"])
        .arg(&dl)
        .assert()
        .success()
        .stderr("");
}

both_backends!(
    one_failure_does_not_stop_the_others_and_sets_the_exit_code,
    one_failure_on
);

async fn one_failure_on(backend: Backend) {
    let home = tempfile::tempdir().unwrap();
    let h = home.path();
    let root = backend.root_for_process(h.join("root"), "cli");
    let server = serve_over(h, &root, "127.0.0.1:0", &[]);
    std::fs::write(h.join("good"), b"good").unwrap();
    std::fs::write(h.join("taken"), b"new").unwrap();
    place_at(&root, "taken", b"old").await;
    client(h, &server)
        .current_dir(h)
        .args(["put", "taken", "missing", "good"])
        .assert()
        .code(1)
        .stderr(
            predicate::str::contains("error: 'taken' already exists on the server")
                .and(predicate::str::contains("missing:"))
                .and(predicate::str::contains("2 of 3 files failed")),
        );
    assert_eq!(stored_at(&root, "good").await.unwrap(), b"good");
    assert_eq!(stored_at(&root, "taken").await.unwrap(), b"old");
}

#[test]
fn get_defaults_to_the_downloads_folder_under_home() {
    let home = tempfile::tempdir().unwrap();
    let h = home.path();
    let server = serve(h, "127.0.0.1:0");
    std::fs::write(h.join("root/report.pdf"), b"%PDF").unwrap();
    client(h, &server)
        .args(["get", "report.pdf"])
        .assert()
        .success();
    assert_eq!(
        std::fs::read(h.join("Downloads/report.pdf")).unwrap(),
        b"%PDF"
    );
}

#[test]
fn server_flag_and_host_names_work() {
    let home = tempfile::tempdir().unwrap();
    let h = home.path();
    let server = serve(h, "127.0.0.1:0");
    std::fs::write(h.join("root/x"), b"x").unwrap();
    // `localhost` resolves (often to ::1 first); the client still finds the IPv4 listener.
    qxfer(h)
        .args([
            "ls",
            "--server",
            &format!("localhost:{}", server.addr.port()),
        ])
        .assert()
        .success()
        .stdout(predicate::str::contains(" x"));
}

#[test]
fn unreachable_server_fails_fast_naming_it() {
    let home = tempfile::tempdir().unwrap();
    let silent = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let addr = silent.local_addr().unwrap().to_string();
    let start = Instant::now();
    qxfer(home.path())
        .args(["ls", "--server", &addr])
        .assert()
        .code(3)
        .stderr(predicate::str::contains(addr.as_str()).and(predicate::str::contains("no answer")));
    assert!(start.elapsed() < Duration::from_secs(8));
}

/// Permission errors need a user that file permissions apply to: as root,
/// run both binaries as `nobody`.
#[test]
fn permission_denied_on_either_side() {
    use std::os::unix::process::CommandExt;
    if !is_root() {
        println!("skipped here: tests/errors.rs covers permissions for non-root users");
        return;
    }
    const NOBODY: u32 = 65534;
    let home = tempfile::tempdir().unwrap();
    let h = home.path();
    std::fs::set_permissions(h, std::fs::Permissions::from_mode(0o755)).unwrap();
    for d in ["root", "certs", "qxfer-config", "mine"] {
        std::fs::create_dir(h.join(d)).unwrap();
        std::os::unix::fs::chown(h.join(d), Some(NOBODY), Some(NOBODY)).unwrap();
    }
    // Owned by root inside the served root: unreadable file, unwritable directory.
    std::fs::write(h.join("root/secret"), b"s").unwrap();
    std::fs::set_permissions(
        h.join("root/secret"),
        std::fs::Permissions::from_mode(0o600),
    )
    .unwrap();
    std::fs::create_dir(h.join("root/locked")).unwrap();
    std::fs::write(h.join("root/public"), b"p").unwrap();
    std::fs::set_permissions(
        h.join("root/public"),
        std::fs::Permissions::from_mode(0o644),
    )
    .unwrap();
    std::os::unix::fs::chown(h.join("root/public"), Some(NOBODY), Some(NOBODY)).unwrap();
    // A tree with a subdirectory the server cannot open.
    std::fs::create_dir_all(h.join("root/tree/closed")).unwrap();
    std::fs::write(h.join("root/tree/closed/hidden"), b"h").unwrap();
    std::fs::set_permissions(
        h.join("root/tree/closed"),
        std::fs::Permissions::from_mode(0o700),
    )
    .unwrap();
    std::fs::write(h.join("root/tree/open"), b"o").unwrap();
    std::os::unix::fs::chown(h.join("root/tree"), Some(NOBODY), Some(NOBODY)).unwrap();
    std::os::unix::fs::chown(h.join("root/tree/open"), Some(NOBODY), Some(NOBODY)).unwrap();
    // Local side: a root-owned unreadable file and a root-owned folder.
    std::fs::write(h.join("private"), b"x").unwrap();
    std::fs::set_permissions(h.join("private"), std::fs::Permissions::from_mode(0o600)).unwrap();
    std::fs::create_dir(h.join("rootdir")).unwrap();
    std::fs::write(h.join("mine/ok"), b"ok").unwrap();
    std::os::unix::fs::chown(h.join("mine/ok"), Some(NOBODY), Some(NOBODY)).unwrap();

    let mut cmd = qxfer(h);
    cmd.args(["serve", "--listen", "127.0.0.1:0", "--root"])
        .arg(h.join("root"))
        .arg("--certs")
        .arg(h.join("certs"))
        .uid(NOBODY)
        .gid(NOBODY);
    let server = ServeProcess::spawn(cmd);
    let as_nobody = || {
        let mut c = client(h, &server);
        c.uid(NOBODY).gid(NOBODY);
        c
    };
    as_nobody()
        .args(["get", "secret", "-o"])
        .arg(h.join("mine"))
        .assert()
        .failure()
        .stderr(
            predicate::str::contains("ermission denied").and(predicate::str::contains("'secret'")),
        );
    as_nobody()
        .arg("put")
        .arg(h.join("mine/ok"))
        .args(["--to", "locked"])
        .assert()
        .failure()
        .stderr(
            predicate::str::contains("ermission denied").and(predicate::str::contains("locked/ok")),
        );
    as_nobody()
        .arg("put")
        .arg(h.join("private"))
        .assert()
        .failure()
        .stderr(
            predicate::str::contains("private").and(predicate::str::contains("ermission denied")),
        );
    as_nobody()
        .args(["get", "public", "-o"])
        .arg(h.join("rootdir"))
        .assert()
        .failure()
        .stderr(
            predicate::str::contains("rootdir").and(predicate::str::contains("ermission denied")),
        );
    // A recursive get does not report success with a subtree missing.
    as_nobody()
        .args(["get", "-r", "tree", "-o"])
        .arg(h.join("mine"))
        .assert()
        .failure()
        .stderr(
            predicate::str::contains("tree/closed")
                .and(predicate::str::contains("ermission denied")),
        );
    // And the server still serves.
    as_nobody()
        .args(["get", "public", "-o"])
        .arg(h.join("mine"))
        .assert()
        .success();
    assert!(!h.join("root/private").exists() && !h.join("root/locked/ok").exists());
}

#[test]
fn servers_by_name_from_config_toml() {
    let home = tempfile::tempdir().unwrap();
    let h = home.path();
    let server = serve(h, "127.0.0.1:0");
    let cfg = h.join("qxfer-config");
    std::fs::create_dir_all(&cfg).unwrap();
    std::fs::write(
        cfg.join("config.toml"),
        format!(
            "# my servers\n[servers.home]\naddress = \"{}\"\n\n[servers.pinned]\naddress = \"{}\"\npin = \"{}\"\n",
            server.addr, server.addr, server.fingerprint
        ),
    )
    .unwrap();
    // Listed before any contact, with its pin.
    qxfer(h).arg("servers").assert().success().stdout(
        predicate::str::contains(format!(
            "home    {}  no pin  not contacted yet",
            server.addr
        ))
        .and(predicate::str::contains(format!(
            "pin {}",
            server.fingerprint
        ))),
    );
    // --server NAME and QXFER_SERVER=NAME reach it.
    std::fs::write(h.join("f"), b"by name").unwrap();
    qxfer(h)
        .current_dir(h)
        .args(["put", "f", "--server", "home"])
        .assert()
        .success();
    qxfer(h)
        .env("QXFER_SERVER", "pinned")
        .arg("ls")
        .assert()
        .success()
        .stdout(predicate::str::contains(" f\n"));
    qxfer(h)
        .arg("servers")
        .assert()
        .success()
        .stdout(predicate::str::contains(format!(
            "known {}",
            server.fingerprint
        )));
    // A name that is neither in the file nor a host.
    qxfer(h)
        .args(["ls", "--server", "nosuchserver"])
        .assert()
        .code(3)
        .stderr(
            predicate::str::contains("unknown server name 'nosuchserver'")
                .and(predicate::str::contains("names there: home, pinned")),
        );
    // A wrong pin in the file is refused like a wrong --pin.
    let other = "SHA256:AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA";
    std::fs::write(
        cfg.join("config.toml"),
        format!(
            "[servers.home]\naddress = \"{}\"\npin = \"{other}\"\n",
            server.addr
        ),
    )
    .unwrap();
    qxfer(h)
        .args(["ls", "--server", "home"])
        .assert()
        .code(4)
        .stderr(predicate::str::contains("pinned"));
    // A file that does not parse: its path and line, exit code 2.
    std::fs::write(cfg.join("config.toml"), "[servers.home]\naddress = 5\n").unwrap();
    let path = cfg.join("config.toml").display().to_string();
    for args in [&["ls", "--server", "home"][..], &["servers"][..]] {
        qxfer(h)
            .args(args)
            .assert()
            .code(2)
            .stderr(predicate::str::contains(format!("{path}:2: ")));
    }
}

//! The real binary end to end: `qxfer serve` in a child process, client commands through assert_cmd; the transfers through it over a local root and over the object store.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use assert_cmd::assert::OutputAssertExt;
use common::{
    is_root, pattern, place_at, qxfer, qxfer_at, serve_root, stored_at, Backend, ServeProcess,
};
use predicates::prelude::*;

/// A `qxfer serve` over `<home>/root` with certs in `<home>/certs`.
fn serve(home: &Path, listen: &str) -> ServeProcess {
    serve_over(home, &home.join("root"), listen, &[])
}

/// A `qxfer serve` over `root` with certs in `<home>/certs`, plus `extra`.
fn serve_over(home: &Path, root: &Path, listen: &str, extra: &[&str]) -> ServeProcess {
    let mut cmd = qxfer(home);
    cmd.args(["serve", "--listen", listen, "--certs"])
        .arg(home.join("certs"))
        .args(extra);
    serve_root(&mut cmd, root);
    ServeProcess::spawn(cmd)
}

fn client(home: &Path, server: &ServeProcess) -> Command {
    qxfer_at(home, server.addr)
}

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
        .args(["put", "a", "b", "c d", "é", "--to", "up/load"])
        .assert()
        .success()
        .stderr(
            predicate::str::contains("first contact")
                .and(predicate::str::contains(server.fingerprint.as_str()))
                .and(predicate::str::contains("put 4 files")),
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

both_backends!(
    a_file_goes_to_standard_output_and_nothing_else_does,
    stdout_on
);

async fn stdout_on(backend: Backend) {
    let server = common::TestServer::start_on(backend, "stdout").await;
    let data = pattern(3 << 20, 12);
    server.place("big.log", &data).await;
    let home = common::home_for(&server);
    let q = |args: &[&str]| {
        let mut cmd = qxfer_at(home.path(), server.addr);
        cmd.args(args);
        common::output(cmd)
    };
    // The bytes and only them on stdout; the summary on stderr.
    let out = q(&["get", "big.log", "-o", "-", "--compress", "always"]).await;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.stdout == data, "stdout holds exactly the file");
    assert!(String::from_utf8_lossy(&out.stderr).contains("got 1 file: 3.0 MiB sent"));
    // Errors: a missing file; usage mistakes (exit 2); stdout stays empty.
    let out = q(&["get", "nope", "-o", "-"]).await;
    assert_eq!(out.status.code(), Some(1));
    assert!(out.stdout.is_empty());
    assert!(String::from_utf8_lossy(&out.stderr).contains("'nope'"));
    for args in [
        &["get", "big.log", "big.log", "-o", "-"][..],
        &["get", "-r", "big.log", "-o", "-"],
        &["get", "big.log", "-o", "-", "--json"],
    ] {
        let out = q(args).await;
        assert_eq!(out.status.code(), Some(2), "{args:?}");
        assert!(out.stdout.is_empty());
    }
}

/// Runs `cmd` with `input` on its standard input (fed from a thread, so a
/// command that stops reading early never blocks the test).
async fn with_stdin(mut cmd: Command, input: Vec<u8>) -> std::process::Output {
    use std::io::Write;
    use std::process::Stdio;
    cmd.stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    tokio::task::spawn_blocking(move || {
        let mut child = cmd.spawn().unwrap();
        let mut stdin = child.stdin.take().unwrap();
        let feeder = std::thread::spawn(move || {
            let _ = stdin.write_all(&input);
        });
        let out = child.wait_with_output().unwrap();
        feeder.join().unwrap();
        out
    })
    .await
    .unwrap()
}

both_backends!(standard_input_goes_up_under_a_name, stdin_on);

async fn stdin_on(backend: Backend) {
    use std::io::Seek;
    let server = common::TestServer::start_on(backend, "stdin").await;
    let home = common::home_for(&server);
    let q = |args: &[&str]| {
        let mut cmd = qxfer_at(home.path(), server.addr);
        cmd.args(args);
        cmd
    };
    // Longer than two parts of an object-store upload, and not a whole
    // number of them; then one smaller than a part; then nothing at all.
    let big = pattern((20 << 20) + 12_345, 31);
    let out = with_stdin(q(&["put", "-", "dump.tar", "--json"]), big.clone()).await;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    let report = common::json_of(&out);
    assert_eq!(report["bytes"], big.len() as u64);
    assert_eq!(report["bytes_sent"], big.len() as u64);
    assert!(stderr.contains("put 1 file: 20.0 MiB sent"), "{stderr}");
    assert!(server.stored("dump.tar").await == big);
    for (name, data) in [
        ("small.txt", b"hello, pipe\n".to_vec()),
        ("empty", Vec::new()),
    ] {
        let out = with_stdin(q(&["put", "-", name, "--to", "in/here"]), data.clone()).await;
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(server.stored(&format!("in/here/{name}")).await, data);
    }
    // And back through a pipe, verified.
    let out = common::output(q(&["get", "dump.tar", "-o", "-"])).await;
    assert!(out.status.success());
    assert!(out.stdout == big);
    // No upload left behind (an object store's multipart uploads included).
    assert!(
        server.partials().await.is_empty(),
        "{:?}",
        server.partials().await
    );

    // A name that exists is refused before standard input is read: the
    // input (a file here, so its offset shows it) is left untouched.
    let input_dir = tempfile::tempdir().unwrap();
    let input_path = input_dir.path().join("input");
    std::fs::write(&input_path, b"replacement").unwrap();
    let mut input = std::fs::File::open(&input_path).unwrap();
    let mut cmd = q(&["put", "-", "dump.tar"]);
    cmd.stdin(input.try_clone().unwrap());
    let out = common::output(cmd).await;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("'dump.tar' already exists") && stderr.contains("--force"),
        "{stderr}"
    );
    assert!(stderr.contains("nothing was saved"), "{stderr}");
    assert_eq!(
        input.stream_position().unwrap(),
        0,
        "not a byte of the input read"
    );
    assert!(server.stored("dump.tar").await == big);
    // --force replaces it.
    let out = with_stdin(q(&["put", "-", "dump.tar", "--force"]), b"new".to_vec()).await;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(server.stored("dump.tar").await, b"new");

    // A dry run reads nothing and says what the run would do.
    let out = with_stdin(q(&["put", "-", "fresh", "-n"]), b"x".to_vec()).await;
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).contains("send    - (standard input) as fresh"));
    let out = with_stdin(q(&["put", "-", "dump.tar", "-n"]), b"x".to_vec()).await;
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stdout).contains("refuse  - (standard input) as dump.tar"));
    assert!(stored_at(&server.root, "fresh").await.is_none());

    // Usage mistakes: exit 2, nothing sent.
    for args in [
        &["put", "-"][..],
        &["put", "-", "a", "b"],
        &["put", "Cargo.toml", "-"],
        &["put", "-r", "-", "a"],
        &["put", "-", "a", "--exclude", "*.o"],
    ] {
        let out = with_stdin(q(args), b"x".to_vec()).await;
        assert_eq!(out.status.code(), Some(2), "{args:?}");
    }
    assert!(stored_at(&server.root, "a").await.is_none());
}

both_backends!(
    standard_input_that_stops_early_saves_nothing,
    stdin_early_on
);

/// "Standard input closed early", as qxfer can see it: the command is
/// interrupted while its input is still open, its input fails, or its
/// input runs past what the server takes. Each time nothing appears under
/// the name and nothing is left behind on the server.
async fn stdin_early_on(backend: Backend) {
    use std::io::Write;
    use std::process::Stdio;
    let server = common::TestServer::start_on_with(backend, "stdin-early", |c| {
        c.max_file_size = Some(30 << 20)
    })
    .await;
    let home = common::home_for(&server);
    let q = |args: &[&str]| {
        let mut cmd = qxfer_at(home.path(), server.addr);
        cmd.args(args);
        cmd
    };
    // Interrupted: 12 MiB written (a part stored in an object store), the
    // pipe still open, then Ctrl-C.
    let mut cmd = q(&["put", "-", "cut.tar"]);
    cmd.stdin(Stdio::piped()).stderr(Stdio::piped());
    // SAFETY: signal(2) is async-signal-safe, as pre_exec requires.
    unsafe {
        std::os::unix::process::CommandExt::pre_exec(&mut cmd, || {
            libc::signal(libc::SIGINT, libc::SIG_DFL);
            Ok(())
        });
    }
    let mut child = cmd.spawn().unwrap();
    let mut stdin = child.stdin.take().unwrap();
    let data = pattern(12 << 20, 5);
    let fed = tokio::task::spawn_blocking(move || {
        stdin.write_all(&data).unwrap();
        stdin
    })
    .await
    .unwrap();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    // SAFETY: kill(2) with a pid we own and a valid signal number.
    assert_eq!(unsafe { libc::kill(child.id() as i32, libc::SIGINT) }, 0);
    let out = tokio::task::spawn_blocking(move || child.wait_with_output().unwrap())
        .await
        .unwrap();
    drop(fed);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(130), "{stderr}");
    assert!(
        stderr.contains("nothing was saved on the server"),
        "{stderr}"
    );
    assert!(!stderr.contains("resume where"), "{stderr}");

    // Its input fails (a directory cannot be read): exit 1, named.
    let dir = tempfile::tempdir().unwrap();
    let mut cmd = q(&["put", "-", "unreadable"]);
    cmd.stdin(std::fs::File::open(dir.path()).unwrap());
    let out = common::output(cmd).await;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("standard input") && stderr.contains("nothing was saved"),
        "{stderr}"
    );

    // More than the server takes (--max-file-size 30 MiB): refused, named.
    let out = with_stdin(q(&["put", "-", "huge"]), pattern(31 << 20, 6)).await;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("'huge' was not saved") && stderr.contains("went past"),
        "{stderr}"
    );

    // Nothing under any of the names; no upload left behind. The server
    // notices the interrupted client's stream end at once; give it a moment.
    for name in ["cut.tar", "unreadable", "huge"] {
        assert!(stored_at(&server.root, name).await.is_none(), "{name}");
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    while !server.partials().await.is_empty() && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        server.partials().await.is_empty(),
        "{:?}",
        server.partials().await
    );
    assert!(
        server.stored_tree().await.is_empty(),
        "{:?}",
        server.stored_tree().await
    );
    server.assert_healthy().await;
}

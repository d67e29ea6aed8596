//! Several addresses of one server (one identity, one store): the client moves to another when the one it uses is lost, within the same command, and says so once; with all of them down it says so and exits 3.

use super::*;

/// A server over `root` with certs in `<home>/certs`, logging to `log`,
/// quick to call a silent client gone (and a client quick to notice it).
fn serve_logged(home: &Path, root: &Path, log: &Path) -> ServeProcess {
    let mut cmd = qxfer(home);
    cmd.args([
        "serve",
        "--listen",
        "127.0.0.1:0",
        "--idle-timeout",
        "2s",
        "--certs",
    ])
    .arg(home.join("certs"));
    serve_root(&mut cmd, root);
    ServeProcess::spawn_logging(cmd, std::fs::File::create(log).unwrap())
}

#[test]
fn a_lost_server_is_replaced_by_another_address_of_the_same_server() {
    let home = tempfile::tempdir().unwrap();
    let h = home.path();
    // Two servers of one identity (one certs directory) over one root.
    let root = h.join("root");
    let logs = [h.join("a.log"), h.join("b.log")];
    let mut servers = [
        serve_logged(h, &root, &logs[0]),
        serve_logged(h, &root, &logs[1]),
    ];
    let src = h.join("src");
    std::fs::create_dir_all(src.join("d")).unwrap();
    let mut files = Vec::new();
    for i in 0..200 {
        let name = format!("d/f{i:03}");
        std::fs::write(src.join(&name), pattern(32 << 10, i)).unwrap();
        files.push(name);
    }
    std::fs::write(src.join("big"), pattern(16 << 20, 999)).unwrap();
    files.push("big".to_owned());

    let addrs: Vec<String> = servers.iter().map(|s| s.addr.to_string()).collect();
    let err_file = h.join("client.err");
    let mut client = spawn_into(
        qxfer(h)
            .args([
                "put",
                "-r",
                "--limit-rate",
                "6M",
                "--retries",
                "5",
                "--to",
                "up",
            ])
            .arg(&src)
            .args(["--server", &addrs[0], "--server", &addrs[1]]),
        &err_file,
    );
    // Whichever server the client chose (at random) is killed once it has
    // committed something.
    let start = Instant::now();
    let chosen = loop {
        if let Some(i) = (0..2).find(|&i| log_has(&logs[i], "put committed")) {
            break i;
        }
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "nothing committed"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    std::thread::sleep(Duration::from_millis(300));
    servers[chosen].child.kill().unwrap();
    let _ = servers[chosen].child.wait();

    let status = client.wait().unwrap();
    let err = std::fs::read_to_string(&err_file).unwrap();
    assert!(status.success(), "{status:?}: {err}");
    // The first contact names the address reached, whichever was first.
    let said = format!("first contact with {}: trusting", addrs[chosen]);
    assert_eq!(err.matches(&said).count(), 1, "{err}");
    let other = &addrs[1 - chosen];
    let said = format!("continuing through {other}");
    assert_eq!(err.matches(&said).count(), 1, "said once: {err}");
    // And what the lost connection cost, beside the summary of the files.
    assert!(
        err.contains("moved twice (over a connection that ended"),
        "{err}"
    );
    assert!(log_has(&logs[1 - chosen], "put committed"), "{err}");
    for name in &files {
        assert_eq!(
            std::fs::read(root.join("up/src").join(name)).unwrap(),
            std::fs::read(src.join(name)).unwrap(),
            "{name}"
        );
    }
}

#[test]
fn all_addresses_down_is_a_clear_error_and_exit_3() {
    let home = tempfile::tempdir().unwrap();
    let h = home.path();
    // Two ports nobody serves on.
    let dead: Vec<String> = (0..2)
        .map(|_| {
            let s = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
            s.local_addr().unwrap().to_string()
        })
        .collect();
    std::fs::write(h.join("f"), b"x").unwrap();
    let out = qxfer(h)
        .current_dir(h)
        .args(["put", "f", "--connect-timeout", "1s"])
        .args(["--server", &dead[0], "--server", &dead[1]])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(3), "{err}");
    assert!(err.contains("no answer from"), "{err}");
}

#[test]
fn an_address_with_another_identity_is_refused() {
    let home = tempfile::tempdir().unwrap();
    let h = home.path();
    let first = serve_over(h, &h.join("root"), "127.0.0.1:0", &[]);
    std::fs::write(h.join("f"), b"x").unwrap();
    client(h, &first)
        .current_dir(h)
        .args(["put", "f"])
        .assert()
        .success();
    // Another server with certs of its own, named as the same server.
    let other_home = h.join("other");
    let mut cmd = qxfer(h);
    cmd.args(["serve", "--listen", "127.0.0.1:0", "--root"])
        .arg(other_home.join("root"))
        .arg("--certs")
        .arg(other_home.join("certs"));
    let other = ServeProcess::spawn(cmd);
    let first_addr = first.addr.to_string();
    drop(first);
    // The first address (known, now dead) and the other, as one server.
    let out = qxfer(h)
        .current_dir(h)
        .args(["put", "f", "--force", "--connect-timeout", "1s"])
        .args(["--server", &first_addr, "--server", &other.addr.to_string()])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    // The dead address is passed over; the other identity is not taken for
    // the same server: a trust failure, exit 4.
    assert_eq!(out.status.code(), Some(4), "{err}");
    assert!(err.contains("same identity"), "{err}");
    assert!(
        !std::fs::read_to_string(h.join("qxfer-config/known_hosts"))
            .unwrap()
            .contains(&format!("127.0.0.1:{}", other.addr.port())),
        "the other identity was not recorded"
    );
}

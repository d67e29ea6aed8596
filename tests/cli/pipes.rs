//! Pipes: get -o - to standard output and put - from standard input, whole, early-ended and cut off.

use super::*;

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

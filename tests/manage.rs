//! Remote management through the real binary, over a local root and over the object store: `qxfer rm`, `mv` and `mkdir`, their refusals, and a read-only server.

mod common;

use std::process::Output;
use std::time::{Duration, Instant};

use common::{home_for, output, qxfer_at, stored_at, Backend, TestServer};

/// Asserts `out` failed with exit code `code` and said `text` on stderr.
fn failed_with(out: &Output, code: i32, text: &str) {
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(code), "{stderr}");
    assert!(stderr.contains(text), "expected {text:?} in: {stderr}");
}

fn succeeded(out: &Output) {
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

both_backends!(rm_mv_and_mkdir_work_and_refuse_clearly, manage_on);

async fn manage_on(backend: Backend) {
    let server = TestServer::start_on(backend, "manage").await;
    for (name, data) in [
        ("a.txt", &b"a"[..]),
        ("dir/x", b"x"),
        ("dir/sub/y", b"y"),
        ("keep", b"k"),
    ] {
        server.place(name, data).await;
    }
    let home = home_for(&server);
    let q = |args: &[&str]| {
        let mut cmd = qxfer_at(home.path(), server.addr);
        cmd.args(args);
        output(cmd)
    };
    succeeded(&q(&["mkdir", "empty"]).await);

    // rm: a file; a missing name; a directory with files, without -r; an
    // empty directory.
    succeeded(&q(&["rm", "a.txt"]).await);
    assert!(stored_at(&server.root, "a.txt").await.is_none());
    failed_with(&q(&["rm", "missing"]).await, 1, "'missing'");
    failed_with(&q(&["rm", "dir"]).await, 1, "use `qxfer rm -r`");
    assert_eq!(server.stored("dir/x").await, b"x", "nothing removed");
    succeeded(&q(&["rm", "empty"]).await);
    // One failure does not stop the others.
    let out = q(&["rm", "nope", "keep"]).await;
    failed_with(&out, 1, "1 of 2 not removed");
    assert!(stored_at(&server.root, "keep").await.is_none());

    // mv: a file into a subdirectory; onto an existing name; a directory
    // with everything in it; a missing name; a directory into itself.
    succeeded(&q(&["mv", "dir/x", "dir/sub/x2"]).await);
    assert_eq!(server.stored("dir/sub/x2").await, b"x");
    assert!(stored_at(&server.root, "dir/x").await.is_none());
    failed_with(
        &q(&["mv", "dir/sub/y", "dir/sub/x2"]).await,
        1,
        "already exists",
    );
    assert_eq!(server.stored("dir/sub/y").await, b"y", "nothing replaced");
    failed_with(&q(&["mv", "dir/sub/y", "nodir/y"]).await, 1, "nodir");
    succeeded(&q(&["mv", "dir", "moved"]).await);
    assert_eq!(server.stored("moved/sub/y").await, b"y");
    assert_eq!(server.stored("moved/sub/x2").await, b"x");
    failed_with(&q(&["mv", "dir", "other"]).await, 1, "'dir'");
    failed_with(&q(&["mv", "moved", "moved/inner"]).await, 1, "into itself");
    failed_with(&q(&["mv", "moved", "moved"]).await, 1, "to itself");

    // mkdir: without -p as mkdir (exists, missing parent), with -p as mkdir -p.
    succeeded(&q(&["mkdir", "new"]).await);
    failed_with(&q(&["mkdir", "new"]).await, 1, "already exists");
    failed_with(&q(&["mkdir", "p/q"]).await, 1, "use mkdir -p");
    server.place("file", b"f").await;
    failed_with(
        &q(&["mkdir", "file/file"]).await,
        1,
        "is a file, not a directory",
    );
    succeeded(&q(&["rm", "file"]).await);
    succeeded(&q(&["mkdir", "-p", "p/q", "new"]).await);
    let out = q(&["ls", "-r", "--json"]).await;
    succeeded(&out);
    let listed: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let mut names: Vec<&str> = listed
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["name"].as_str().unwrap())
        .collect();
    names.sort();
    assert_eq!(
        names,
        [
            "moved",
            "moved/sub",
            "moved/sub/x2",
            "moved/sub/y",
            "new",
            "p",
            "p/q"
        ]
    );

    // rm -r: a whole tree.
    succeeded(&q(&["rm", "-r", "moved", "p"]).await);
    assert_eq!(server.stored_tree().await, ["new"]);
}

both_backends!(a_read_only_server_refuses_rm_mv_and_mkdir, read_only_on);

async fn read_only_on(backend: Backend) {
    let server = TestServer::start_on_with(backend, "manage", |c| c.read_only = true).await;
    server.place("f", b"f").await;
    let home = home_for(&server);
    let q = |args: &[&str]| {
        let mut cmd = qxfer_at(home.path(), server.addr);
        cmd.args(args);
        output(cmd)
    };
    for args in [
        &["rm", "f"][..],
        &["rm", "-r", "f"],
        &["mv", "f", "g"],
        &["mkdir", "-p", "d"],
    ] {
        failed_with(&q(args).await, 1, "read-only");
    }
    assert_eq!(server.stored_tree().await, ["f"]);
}

both_backends!(
    a_tree_of_more_than_a_thousand_files_moves_and_goes,
    big_tree_on
);

/// More files than one bulk delete takes (1,000 keys a request in an
/// object store): a rename and then a remove of the whole tree leave
/// nothing behind, under either name.
async fn big_tree_on(backend: Backend) {
    let server = TestServer::start_on(backend, "bigtree").await;
    let names: Vec<String> = (0..1_010)
        .map(|i| format!("big/d{}/f{i:04}", i % 7))
        .collect();
    futures::future::join_all(names.iter().map(|n| server.place(n, n.as_bytes()))).await;
    let home = home_for(&server);
    let q = |args: &[&str]| {
        let mut cmd = qxfer_at(home.path(), server.addr);
        cmd.args(args);
        output(cmd)
    };
    succeeded(&q(&["mv", "big", "moved"]).await);
    assert_eq!(
        stored_at(&server.root, "moved/d3/f0003").await.as_deref(),
        Some(&b"big/d3/f0003"[..])
    );
    assert!(stored_at(&server.root, "big/d3/f0003").await.is_none());
    succeeded(&q(&["rm", "-r", "moved"]).await);
    // Read back for a few seconds: once in CI (2026-12-06) a listing right
    // after the remove showed 3 names ("moved" first) that this test could
    // not tell apart from keys left behind for good, since it printed only
    // one; a store whose listing lags its deletes settles within this
    // time, keys truly left do not, and all of them are named.
    let start = Instant::now();
    let left = loop {
        let left = server.stored_tree().await;
        if left.is_empty() || start.elapsed() > Duration::from_secs(5) {
            break left;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert!(left.is_empty(), "{} left: {left:?}", left.len());
}

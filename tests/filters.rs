//! `--exclude` and `--exclude-from` on put -r and get -r, through the real binary, over a local root and over the object store.

mod common;

use std::path::Path;
use std::process::Output;

use common::{home_for, output, qxfer_at, Backend, TestServer};

/// Every path under `dir`, relative, sorted (directories included).
fn local_tree(dir: &Path) -> Vec<String> {
    let mut out = Vec::new();
    fn walk(base: &Path, dir: &Path, out: &mut Vec<String>) {
        for e in std::fs::read_dir(dir).unwrap() {
            let p = e.unwrap().path();
            out.push(p.strip_prefix(base).unwrap().display().to_string());
            if p.is_dir() {
                walk(base, &p, out);
            }
        }
    }
    walk(dir, dir, &mut out);
    out.sort();
    out
}

both_backends!(excluded_entries_are_neither_sent_nor_created, exclude_on);

async fn exclude_on(backend: Backend) {
    let server = TestServer::start_on(backend, "filters").await;
    let home = home_for(&server);
    let h = home.path();
    for f in [
        "tree/a.txt",
        "tree/b.tmp",
        "tree/keep.tmp",
        "tree/node_modules/x.js",
        "tree/sub/c.txt",
        "tree/sub/node_modules/y.js",
        "tree/sub/raw/d.jpg",
    ] {
        let p = h.join(f);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(&p, f).unwrap();
    }
    std::fs::create_dir_all(h.join("tree/empty-excluded")).unwrap();
    std::fs::write(
        h.join("excludes"),
        "# dependencies\nnode_modules/\n\nempty-excluded/\n",
    )
    .unwrap();
    let q = |args: &[&str]| {
        let mut cmd = qxfer_at(h, server.addr);
        cmd.args(args).current_dir(h);
        output(cmd)
    };
    let out = q(&[
        "put",
        "-r",
        "-v",
        "tree",
        "--exclude",
        "*.tmp",
        "--exclude",
        "!keep.tmp",
        "--exclude",
        "tree/sub/raw",
        "--exclude-from",
        "excludes",
    ])
    .await;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    for listed in [
        "excluded tree/b.tmp",
        "excluded tree/node_modules/",
        "excluded tree/sub/node_modules/",
        "excluded tree/sub/raw/",
        "excluded tree/empty-excluded/",
    ] {
        assert!(stderr.contains(listed), "{listed:?} in {stderr}");
    }
    assert!(!stderr.contains("excluded tree/keep.tmp"), "{stderr}");
    assert_eq!(
        server.stored_tree().await,
        [
            "tree",
            "tree/a.txt",
            "tree/keep.tmp",
            "tree/sub",
            "tree/sub/c.txt"
        ]
    );

    // A download leaves out what its own patterns match.
    let out = q(&["get", "-r", "tree", "-o", "dl", "--exclude", "sub/"]).await;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        local_tree(&h.join("dl")),
        ["tree", "tree/a.txt", "tree/keep.tmp"]
    );

    // Mistakes: named, exit code 2, nothing moved.
    let out = q(&["put", "-r", "tree", "--exclude", "a{b", "--to", "other"]).await;
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--exclude \"a{b\""));
    std::fs::write(h.join("bad"), "ok/\nsrc/[z-a]\n").unwrap();
    let out = q(&["get", "-r", "tree", "-o", "dl2", "--exclude-from", "bad"]).await;
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains(":2: pattern"));
    let out = q(&[
        "put",
        "-r",
        "tree",
        "--exclude-from",
        "nope",
        "--to",
        "other",
    ])
    .await;
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--exclude-from nope"));
    assert!(!h.join("dl2").exists() || local_tree(&h.join("dl2")).is_empty());
    assert!(!server
        .stored_tree()
        .await
        .iter()
        .any(|n| n.starts_with("other")));
}

both_backends!(dry_runs_list_what_would_move_and_move_nothing, dry_run_on);

async fn dry_run_on(backend: Backend) {
    let server = TestServer::start_on(backend, "dryrun").await;
    let home = home_for(&server);
    let h = home.path();
    std::fs::create_dir_all(h.join("tree")).unwrap();
    for f in ["same.txt", "changed.txt", "skip.tmp"] {
        std::fs::write(h.join("tree").join(f), f).unwrap();
    }
    let q = |args: &[&str]| {
        let mut cmd = qxfer_at(h, server.addr);
        cmd.args(args).current_dir(h);
        output(cmd)
    };
    let out = q(&["put", "-r", "tree"]).await;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let before = server.stored_tree().await;
    std::fs::write(h.join("tree/changed.txt"), "changed, longer").unwrap();
    std::fs::write(h.join("tree/new.txt"), "new").unwrap();

    let out = q(&["put", "-r", "tree", "-n", "--exclude", "*.tmp"]).await;
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        out.status.code(),
        Some(1),
        "a refusal, as the real run: {stderr}"
    );
    for line in [
        "send    tree/new.txt\n",
        "skip    tree/same.txt  (already there",
        "refuse  tree/changed.txt  (exists on the server; use --force",
        "exclude tree/skip.tmp\n",
    ] {
        assert!(stdout.contains(line), "{line:?} in {stdout}");
    }
    assert!(
        stderr.contains("dry run, nothing moved: put would send 1 file"),
        "{stderr}"
    );
    assert_eq!(server.stored_tree().await, before, "nothing moved");

    // With --force the changed file would be replaced: no refusal.
    let out = q(&["put", "-r", "tree", "--dry-run", "--force", "--json"]).await;
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let doc: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let action = |name: &str| {
        doc["files"]
            .as_array()
            .unwrap()
            .iter()
            .find(|f| f["name"] == name)
            .map(|f| f["action"].as_str().unwrap().to_owned())
    };
    assert_eq!(action("tree/changed.txt").as_deref(), Some("send"));
    assert_eq!(
        action("tree/same.txt").as_deref(),
        Some("send"),
        "--force sends even what is already there, as the real run does"
    );
    assert_eq!(server.stored_tree().await, before, "nothing moved");

    // A download's dry run creates nothing, not even its folder.
    let out = q(&["get", "-r", "tree", "-o", "dl", "-n"]).await;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("send    tree/same.txt\n"));
    assert!(!h.join("dl").exists());
}

both_backends!(delete_removes_what_the_source_no_longer_has, delete_on);

async fn delete_on(backend: Backend) {
    let server = TestServer::start_on(backend, "delete").await;
    let home = home_for(&server);
    let h = home.path();
    for f in ["tree/a", "tree/sub/b", "tree/note.log"] {
        let p = h.join(f);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(&p, f).unwrap();
    }
    let q = |args: &[&str]| {
        let mut cmd = qxfer_at(h, server.addr);
        cmd.args(args).current_dir(h);
        output(cmd)
    };
    let ok = |out: &Output| {
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        )
    };
    ok(&q(&["put", "-r", "tree"]).await);
    // What the source does not have: at the top, in a subdirectory, a
    // whole directory; an excluded name; and a name outside the tree.
    for f in [
        "tree/old",
        "tree/sub/stale",
        "tree/gone/x",
        "tree/gone/y",
        "tree/keep.log",
        "other/z",
    ] {
        server.place(f, b"extra").await;
    }

    let out = q(&["put", "-r", "tree", "--delete", "--exclude", "*.log", "-n"]).await;
    ok(&out);
    let stdout = String::from_utf8_lossy(&out.stdout);
    let deletes: Vec<&str> = stdout.lines().filter(|l| l.starts_with("delete")).collect();
    assert_eq!(
        deletes,
        [
            "delete  tree/gone/",
            "delete  tree/old",
            "delete  tree/sub/stale"
        ],
        "listed first, nothing excluded: {stdout}"
    );
    assert!(stdout.starts_with("delete"), "{stdout}");
    assert_eq!(
        server.stored("tree/old").await,
        b"extra",
        "a dry run deletes nothing"
    );

    let out = q(&["put", "-r", "tree", "--delete", "--exclude", "*.log"]).await;
    ok(&out);
    assert!(String::from_utf8_lossy(&out.stderr).contains("deleted tree/gone/"));
    assert_eq!(
        server.stored_tree().await,
        [
            "other",
            "other/z",
            "tree",
            "tree/a",
            "tree/keep.log",
            "tree/note.log",
            "tree/sub",
            "tree/sub/b"
        ]
    );

    // What an upload skips (a local link) protects that name on the server.
    server.place("tree/link", b"the server's own file").await;
    std::os::unix::fs::symlink(h.join("tree/a"), h.join("tree/link")).unwrap();
    ok(&q(&["put", "-r", "tree", "--delete", "--exclude", "*.log"]).await);
    assert_eq!(server.stored("tree/link").await, b"the server's own file");
    std::fs::remove_file(h.join("tree/link")).unwrap();
    server.remove("tree/link").await;

    // A file that fails: nothing is deleted, and a dry run says so.
    server.place("tree/extra", b"extra").await;
    server.place("tree/conflict", b"theirs").await;
    std::fs::write(h.join("tree/conflict"), b"ours, different").unwrap();
    let out = q(&["put", "-r", "tree", "--delete", "-n"]).await;
    assert_eq!(out.status.code(), Some(1));
    assert!(!String::from_utf8_lossy(&out.stdout).contains("delete"));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--delete would remove nothing"));
    let out = q(&["put", "-r", "tree", "--delete"]).await;
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("nothing removed"));
    assert_eq!(server.stored("tree/extra").await, b"extra");
    std::fs::remove_file(h.join("tree/conflict")).unwrap();

    // A download removes what the server's tree no longer has, locally.
    ok(&q(&["get", "-r", "tree", "-o", "dl"]).await);
    std::fs::write(h.join("dl/tree/local-only"), b"l").unwrap();
    std::fs::create_dir_all(h.join("dl/tree/sub/old-dir")).unwrap();
    std::fs::write(h.join("dl/tree/sub/old-dir/f"), b"f").unwrap();
    std::fs::write(h.join("dl/tree/mine.log"), b"m").unwrap();
    std::os::unix::fs::symlink(h.join("tree"), h.join("dl/tree/link")).unwrap();
    ok(&q(&[
        "get",
        "-r",
        "tree",
        "-o",
        "dl",
        "--delete",
        "--exclude",
        "*.log",
    ])
    .await);
    assert!(!h.join("dl/tree/local-only").exists());
    assert!(!h.join("dl/tree/sub/old-dir").exists());
    assert!(
        std::fs::symlink_metadata(h.join("dl/tree/link")).is_err(),
        "the link, not its target"
    );
    assert!(h.join("tree/a").exists(), "the link's target untouched");
    assert!(
        h.join("dl/tree/mine.log").exists(),
        "excluded names are kept"
    );
    assert!(h.join("dl/tree/a").exists() && h.join("dl/tree/sub/b").exists());
    // Deleting came before the directories' times were applied: they stick.
    let out = q(&["ls", "--json"]).await;
    ok(&out);
    let listed: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let tree_entry = listed
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["name"] == "tree")
        .unwrap();
    let local = std::fs::metadata(h.join("dl/tree"))
        .unwrap()
        .modified()
        .unwrap()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap();
    assert_eq!(
        tree_entry["mtime"]["secs"].as_u64(),
        Some(local.as_secs()),
        "{tree_entry}"
    );
}

both_backends!(delete_is_refused_by_a_read_only_server, delete_read_only_on);

async fn delete_read_only_on(backend: Backend) {
    let server = TestServer::start_on_with(backend, "delete", |c| c.read_only = true).await;
    server.place("tree/extra", b"extra").await;
    let home = home_for(&server);
    let h = home.path();
    std::fs::create_dir_all(h.join("tree")).unwrap();
    let mut cmd = qxfer_at(h, server.addr);
    cmd.args(["put", "-r", "tree", "--delete"]).current_dir(h);
    let out = output(cmd).await;
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("read-only"));
    assert_eq!(server.stored("tree/extra").await, b"extra");
}

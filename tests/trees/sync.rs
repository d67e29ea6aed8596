//! Re-runs with --sync: only what changed is sent, changed files as deltas both ways, and --checksum for what size and mtime miss.

use super::*;

both_backends!(sync_sends_what_changed_and_leaves_the_rest_unread, sync_on);

/// The names (relative to the top directory `proj`) in a `--json`
/// report's list `field`, sorted.
fn reported(out: &Output, field: &str) -> Vec<String> {
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let mut names: Vec<String> = report[field]
        .as_array()
        .unwrap_or_else(|| panic!("no {field} in {report}"))
        .iter()
        .map(|v| {
            let name = v.get("name").unwrap_or(v).as_str().unwrap();
            name[name.find("proj/").expect("under proj/") + 5..].to_owned()
        })
        .collect();
    names.sort();
    names
}

/// `--sync` (issue 19, first slice): a re-run sends new files and files
/// whose size or mtime differ, replacing them, and leaves the rest alone
/// without reading them (rsync's quick check), in both directions; a
/// re-run without it still refuses a changed file.
async fn sync_on(backend: Backend) {
    let server = TestServer::start_on(backend, "sync").await;
    let home = home_for(&server);
    let h = home.path();
    let src = h.join("proj");
    std::fs::create_dir_all(src.join("sub")).unwrap();
    std::fs::write(src.join("a"), pattern(1000, 1)).unwrap();
    std::fs::write(src.join("b"), pattern(2000, 2)).unwrap();
    std::fs::write(src.join("sub/c"), pattern(3000, 3)).unwrap();
    let client = |args: &[&str]| {
        let mut cmd = qxfer_at(h, server.addr);
        cmd.args(args).current_dir(h);
        cmd
    };
    let set_mtime = |p: &Path, t: SystemTime| {
        std::fs::File::options()
            .write(true)
            .open(p)
            .unwrap()
            .set_modified(t)
            .unwrap();
    };
    let at = |secs: u64| UNIX_EPOCH + Duration::from_secs(secs);
    run(client(&["put", "-r", "proj", "--json"])).await;

    // b changes (same size, another mtime), d is new.
    std::fs::write(src.join("b"), pattern(2000, 22)).unwrap();
    set_mtime(&src.join("b"), at(1_700_000_000));
    std::fs::write(src.join("sub/d"), pattern(500, 4)).unwrap();
    let out = run(client(&["put", "-r", "proj", "--sync", "--json"])).await;
    assert_eq!(reported(&out, "files"), ["b", "sub/d"]);
    assert_eq!(reported(&out, "unchanged"), ["a", "sub/c"]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("2 file(s) unchanged"));
    assert_eq!(server.stored("proj/b").await, pattern(2000, 22));
    assert_eq!(server.stored("proj/sub/d").await, pattern(500, 4));
    let mut want = manifest(&src);
    let mut got = stored_manifest(&server, "proj").await;
    // Directory times are not what this test is about.
    want.retain(|_, v| v.0 == "file");
    got.retain(|_, v| v.0 == "file");
    assert_eq!(got, want, "the server holds the source's files");
    // Directories too: those the re-sync changed something in (a file
    // replaced in proj, one created in sub) got their times back in one
    // round of requests; the others were left alone.
    assert_eq!(
        stored_manifest(&server, "proj").await,
        manifest(&src),
        "directories' modes and mtimes"
    );

    // --force re-sends everything: it and --sync contradict each other.
    let out = common::output(client(&["put", "-r", "proj", "--sync", "--force"])).await;
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("cannot be used with"));

    // Without --sync a changed file is still refused, as before.
    std::fs::write(src.join("a"), pattern(1000, 11)).unwrap();
    set_mtime(&src.join("a"), at(1_700_000_100));
    let out = common::output(client(&["put", "-r", "proj", "--json"])).await;
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--force"));
    assert_eq!(server.stored("proj/a").await, pattern(1000, 1));

    // Downloads: a first get, then one file changes on the server.
    run(client(&["get", "-r", "proj", "-o", "dl", "--json"])).await;
    let out = run(client(&[
        "put", "proj/a", "--to", "proj", "--sync", "--json",
    ]))
    .await;
    assert_eq!(reported(&out, "files"), ["a"]);
    let out = run(client(&[
        "get", "-r", "proj", "-o", "dl", "--sync", "--json",
    ]))
    .await;
    assert_eq!(reported(&out, "files"), ["a"]);
    assert_eq!(reported(&out, "unchanged"), ["b", "sub/c", "sub/d"]);
    assert_eq!(
        std::fs::read(h.join("dl/proj/a")).unwrap(),
        pattern(1000, 11)
    );

    // The quick check reads nothing: a file changed behind its size and
    // mtime is left alone (as rsync leaves it; a digest comparison is
    // what would catch it).
    if !server.is_object() {
        let a = server.root.join("proj/a");
        let mtime = std::fs::metadata(&a).unwrap().modified().unwrap();
        std::fs::write(&a, pattern(1000, 99)).unwrap();
        set_mtime(&a, mtime);
        let out = run(client(&["put", "-r", "proj", "--sync", "--json"])).await;
        assert_eq!(reported(&out, "files"), Vec::<String>::new());
        assert_eq!(server.stored("proj/a").await, pattern(1000, 99));
    }
}

both_backends!(sync_sends_a_changed_file_as_a_delta_both_ways, delta_on);

/// `--sync` replaces a changed file with a delta against the version the
/// receiver holds (issue 19): only the chunks around a change cross, in
/// both directions, whether the change rewrites bytes in place or shifts
/// everything after it; the result is the sender's file exactly. A file
/// below the delta threshold, or one whose receiver has nothing to build
/// on, goes whole.
async fn delta_on(backend: Backend) {
    const MIB: usize = 1 << 20;
    let server = TestServer::start_on(backend, "delta").await;
    let home = home_for(&server);
    let h = home.path();
    let client = |args: &[&str]| {
        let mut cmd = qxfer_at(h, server.addr);
        cmd.args(args).current_dir(h);
        cmd
    };
    let v1 = pattern(12 * MIB, 1);
    std::fs::write(h.join("big"), &v1).unwrap();
    run(client(&["put", "big", "--json"])).await;

    // 1 MiB rewritten in the middle; the size stays.
    let v2 = [&v1[..5 * MIB], &pattern(MIB, 2), &v1[6 * MIB..]].concat();
    std::fs::write(h.join("big"), &v2).unwrap();
    let f = the_file(&run(client(&["put", "big", "--sync", "--json"])).await);
    assert_eq!(f["delta"], true, "{f}");
    let sent = f["bytes_sent"].as_u64().unwrap();
    assert!(sent >= MIB as u64 && sent < (MIB + MIB / 2) as u64, "{f}");
    assert!(f["wire_bytes"].as_u64().unwrap() < 2 * MIB as u64, "{f}");
    assert_eq!(f["bytes"], 12 * MIB);
    assert!(server.stored("big").await == v2, "the server holds v2");

    // 100 bytes inserted at the start shift everything after them.
    let v3 = [&pattern(100, 3), &v2[..]].concat();
    std::fs::write(h.join("big"), &v3).unwrap();
    let f = the_file(&run(client(&["put", "big", "--sync", "--json"])).await);
    assert_eq!(f["delta"], true, "{f}");
    assert!(f["bytes_sent"].as_u64().unwrap() < 300_000, "{f}");
    assert!(server.stored("big").await == v3);

    // Downloads: a copy here, then the server's version changes.
    run(client(&["get", "big", "-o", "dl", "--json"])).await;
    let v4 = [&v3[..2 * MIB], &v3[2 * MIB + 4096..], &pattern(MIB, 4)].concat();
    std::fs::write(h.join("big"), &v4).unwrap();
    run(client(&["put", "big", "--sync", "--json"])).await;
    let f = the_file(&run(client(&["get", "big", "-o", "dl", "--sync", "--json"])).await);
    assert_eq!(f["delta"], true, "{f}");
    let sent = f["bytes_sent"].as_u64().unwrap();
    assert!(sent >= MIB as u64 && sent < (MIB + MIB / 2) as u64, "{f}");
    assert!(
        std::fs::read(h.join("dl/big")).unwrap() == v4,
        "the download is v4"
    );

    // Shrunk below the threshold: whole. Emptied: whole (nothing to send).
    std::fs::write(h.join("big"), pattern(100_000, 5)).unwrap();
    let f = the_file(&run(client(&["put", "big", "--sync", "--json"])).await);
    assert_eq!(f["delta"], false, "{f}");
    assert_eq!(server.stored("big").await, pattern(100_000, 5));
    // A server version below the threshold, a large new one: nothing to
    // build on, so the delta is all new bytes, still correct.
    let v5 = pattern(3 * MIB, 6);
    std::fs::write(h.join("big"), &v5).unwrap();
    let f = the_file(&run(client(&["put", "big", "--sync", "--json"])).await);
    assert_eq!(f["bytes_sent"], 3 * MIB, "{f}");
    assert!(server.stored("big").await == v5);
    std::fs::write(h.join("big"), b"").unwrap();
    run(client(&["put", "big", "--sync", "--json"])).await;
    assert_eq!(server.stored("big").await, b"");
    assert!(server.partials().await.is_empty(), "no temporaries left");
}

both_backends!(checksum_catches_what_size_and_mtime_miss, checksum_on);

/// `--checksum` (issue 19) compares files of the same size by BLAKE3, as
/// rsync's: a file changed behind an unchanged size and mtime, which the
/// quick check leaves alone, is sent, both ways, and files that match are
/// left alone (a rerun sends nothing).
async fn checksum_on(backend: Backend) {
    let server = TestServer::start_on(backend, "checksum").await;
    let home = home_for(&server);
    let h = home.path();
    let src = h.join("proj");
    std::fs::create_dir_all(src.join("sub")).unwrap();
    std::fs::write(src.join("a"), pattern(1000, 1)).unwrap();
    std::fs::write(src.join("b"), pattern(2000, 2)).unwrap();
    std::fs::write(src.join("sub/c"), pattern(3 << 20, 3)).unwrap();
    let client = |args: &[&str]| {
        let mut cmd = qxfer_at(h, server.addr);
        cmd.args(args).current_dir(h);
        cmd
    };
    // Rewrites `p` with other bytes of the same length and puts its mtime back.
    let behind_its_back = |p: &Path, seed: u64| {
        let md = std::fs::metadata(p).unwrap();
        std::fs::write(p, pattern(md.len() as usize, seed)).unwrap();
        std::fs::File::options()
            .write(true)
            .open(p)
            .unwrap()
            .set_modified(md.modified().unwrap())
            .unwrap();
    };
    run(client(&["put", "-r", "proj", "--json"])).await;
    behind_its_back(&src.join("a"), 11);
    behind_its_back(&src.join("sub/c"), 33);
    let out = run(client(&["put", "-r", "proj", "--sync", "--json"])).await;
    assert_eq!(
        reported(&out, "files"),
        Vec::<String>::new(),
        "the quick check misses it"
    );
    let out = run(client(&["put", "-r", "proj", "--checksum", "--json"])).await;
    assert_eq!(reported(&out, "files"), ["a", "sub/c"]);
    assert_eq!(reported(&out, "unchanged"), ["b"]);
    assert_eq!(server.stored("proj/a").await, pattern(1000, 11));
    assert!(server.stored("proj/sub/c").await == pattern(3 << 20, 33));
    // Everything matches now: nothing is sent (the server answers from
    // what it hashed the last time, or keeps with the object).
    let out = run(client(&["put", "-r", "proj", "--checksum", "--json"])).await;
    assert_eq!(reported(&out, "files"), Vec::<String>::new());
    assert_eq!(reported(&out, "unchanged"), ["a", "b", "sub/c"]);
    assert_eq!(reported(&out, "meta_set"), Vec::<String>::new());

    // Same contents, another mtime (a) or mode (b): left alone, but given
    // the source's, as rsync -a does; nothing is sent, and a quick check
    // afterwards finds them unchanged.
    let then = SystemTime::UNIX_EPOCH + Duration::new(1_500_000_000, 250_000_000);
    set_mtime(&src.join("a"), then);
    std::fs::set_permissions(src.join("b"), std::fs::Permissions::from_mode(0o700)).unwrap();
    let dry = run(client(&["put", "-r", "proj", "--checksum", "-n", "--json"])).await;
    let dry = String::from_utf8_lossy(&dry.stdout);
    assert_eq!(dry.matches("\"sets_meta\": true").count(), 2, "{dry}");
    let out = run(client(&["put", "-r", "proj", "--checksum", "--json"])).await;
    assert_eq!(reported(&out, "files"), Vec::<String>::new());
    assert_eq!(reported(&out, "meta_set"), ["a", "b"]);
    let stored = stored_manifest(&server, "proj").await;
    let here = manifest(&src);
    for name in ["a", "b", "sub/c"] {
        assert_eq!(
            stored[name], here[name],
            "{name}: the server's copy takes the source's mtime and mode"
        );
    }
    let out = run(client(&["put", "-r", "proj", "--sync", "--json"])).await;
    assert_eq!(reported(&out, "files"), Vec::<String>::new());
    assert_eq!(reported(&out, "meta_set"), Vec::<String>::new());
    // The quick check matched, the mode alone differs: it takes it too.
    std::fs::set_permissions(src.join("a"), std::fs::Permissions::from_mode(0o750)).unwrap();
    let out = run(client(&["put", "-r", "proj", "--sync", "--json"])).await;
    assert_eq!(reported(&out, "meta_set"), ["a"]);
    assert_eq!(
        stored_manifest(&server, "proj").await["a"],
        manifest(&src)["a"]
    );

    run(client(&["get", "-r", "proj", "-o", "dl", "--json"])).await;
    let get_checksum = || client(&["get", "-r", "proj", "-o", "dl", "--checksum", "--json"]);
    // The other way: this side's copy takes the server's mtime.
    set_mtime(&h.join("dl/proj/sub/c"), then);
    let out = run(get_checksum()).await;
    assert_eq!(reported(&out, "files"), Vec::<String>::new());
    assert_eq!(reported(&out, "meta_set"), ["sub/c"]);
    assert_eq!(
        manifest(&h.join("dl/proj"))["sub/c"],
        manifest(&src)["sub/c"]
    );
    behind_its_back(&h.join("dl/proj/b"), 22);
    let out = run(get_checksum()).await;
    assert_eq!(reported(&out, "files"), ["b"]);
    assert_eq!(
        std::fs::read(h.join("dl/proj/b")).unwrap(),
        pattern(2000, 2)
    );
    let out = common::output(client(&["put", "-r", "proj", "--checksum", "--force"])).await;
    assert_eq!(
        out.status.code(),
        Some(2),
        "--checksum and --force contradict"
    );
}

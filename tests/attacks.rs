//! Attacks and odd inputs through the real binary: names at the limits, unreadable directories, compression that must keep going, malformed trust files, downloads to standard output cut short, and trees deeper and wider than the server's descriptors.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use common::{
    home_for, is_root, output, pattern, qxfer, qxfer_at, Backend, ServeProcess, TestServer,
};

const MIB: usize = 1 << 20;

/// `qxfer ARGS` against `server`, with `home` as its home.
fn q(home: &Path, server: &TestServer, args: &[&str]) -> Command {
    let mut cmd = qxfer_at(home, server.addr);
    cmd.args(args);
    cmd
}

/// Asserts a finished command succeeded, showing its messages if not.
fn ok(out: &std::process::Output) {
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

both_backends!(
    names_of_up_to_255_bytes_come_back,
    names_of_up_to_255_bytes_come_back_on
);

/// A name of 245 to 255 bytes uploads, and must download too: the
/// download's temporary (`NAME.qxfer-part`) once passed the 255 bytes a
/// file name may have, so such files could be put but never got back.
async fn names_of_up_to_255_bytes_come_back_on(backend: Backend) {
    let server = TestServer::start_on(backend, "longnames").await;
    let home = home_for(&server);
    let h = home.path();
    let src = h.join("src");
    std::fs::create_dir_all(src.join("tree")).unwrap();
    let single = "s".repeat(250);
    let small = format!("{}é", "t".repeat(245));
    let large = "L".repeat(255);
    std::fs::write(src.join(&single), b"one file").unwrap();
    std::fs::write(src.join("tree").join(&small), b"small in a tree").unwrap();
    // Large enough to download through a partial file (resumable).
    let big = pattern(5 * MIB, 41);
    std::fs::write(src.join("tree").join(&large), &big).unwrap();
    ok(&output(q(h, &server, &["put", src.join(&single).to_str().unwrap()])).await);
    ok(&output(q(
        h,
        &server,
        &["put", "-r", src.join("tree").to_str().unwrap()],
    ))
    .await);

    let out_dir = h.join("out");
    let mut get = q(h, &server, &["get", &single, "-o"]);
    get.arg(&out_dir);
    ok(&output(get).await);
    assert_eq!(std::fs::read(out_dir.join(&single)).unwrap(), b"one file");
    let mut get = q(h, &server, &["get", "-r", "tree", "-o"]);
    get.arg(&out_dir);
    ok(&output(get).await);
    assert_eq!(
        std::fs::read(out_dir.join("tree").join(&small)).unwrap(),
        b"small in a tree"
    );
    assert!(std::fs::read(out_dir.join("tree").join(&large)).unwrap() == big);
    // Nothing left beside them.
    let mut left: Vec<_> = std::fs::read_dir(out_dir.join("tree"))
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    left.sort();
    assert_eq!(left, [large, small]);
}

/// One unreadable directory inside a tree once aborted the whole upload
/// ("put 0 files"); it now fails alone, as an unreadable file does: named,
/// listed in `--json`'s errors, exit 1, and everything beside and around
/// it is sent. (Root reads everything: the client runs as `nobody`.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreadable_directory_fails_alone_in_a_tree_upload() {
    use std::os::unix::process::CommandExt;
    if !is_root() {
        println!("skipped: root reads every directory, so this test runs the client as nobody, which needs root");
        return;
    }
    const NOBODY: u32 = 65534;
    let server = TestServer::start().await;
    let home = home_for(&server);
    let h = home.path();
    std::fs::set_permissions(h, std::fs::Permissions::from_mode(0o755)).unwrap();
    let proj = h.join("proj");
    std::fs::create_dir_all(proj.join("sub")).unwrap();
    std::fs::create_dir_all(proj.join("locked")).unwrap();
    std::fs::write(proj.join("a.txt"), b"a").unwrap();
    std::fs::write(proj.join("sub/b.txt"), b"b").unwrap();
    std::fs::write(proj.join("locked/c.txt"), b"c").unwrap();
    chown_tree(&h.join("qxfer-config"), NOBODY);
    for p in ["proj", "proj/a.txt", "proj/sub", "proj/sub/b.txt"] {
        std::os::unix::fs::chown(h.join(p), Some(NOBODY), Some(NOBODY)).unwrap();
    }
    // proj/locked stays root's, mode 0700: nobody cannot read it.
    std::fs::set_permissions(proj.join("locked"), std::fs::Permissions::from_mode(0o700)).unwrap();
    let mut put = q(h, &server, &["put", "-r", "--json"]);
    put.arg(&proj).uid(NOBODY).gid(NOBODY);
    let out = output(put).await;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("locked") && stderr.contains("cannot read this directory"),
        "{stderr}"
    );
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let errors = report["errors"].as_array().unwrap();
    assert!(
        errors
            .iter()
            .any(|e| e.as_str().unwrap().contains("locked")),
        "{report}"
    );
    assert_eq!(std::fs::read(server.root.join("proj/a.txt")).unwrap(), b"a");
    assert_eq!(
        std::fs::read(server.root.join("proj/sub/b.txt")).unwrap(),
        b"b"
    );
    assert!(!server.root.join("proj/locked/c.txt").exists());
}

fn chown_tree(p: &Path, id: u32) {
    std::os::unix::fs::chown(p, Some(id), Some(id)).unwrap();
    if p.is_dir() {
        for e in std::fs::read_dir(p).unwrap() {
            chown_tree(&e.unwrap().path(), id);
        }
    }
}

/// `--compress always` once stopped trying after a long stretch that did
/// not compress: 32 MiB of random bytes then 32 MiB of text all went raw.
/// It tries every block now, both ways, and `--json` says what the data
/// took on the wire (`wire_bytes`) beside `bytes_sent`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compress_always_compresses_after_a_stretch_that_does_not() {
    let server = TestServer::start().await;
    let home = home_for(&server);
    let h = home.path();
    let mut data = pattern(32 * MIB, 42);
    let line = b"fn main() { println!(\"a line of source code, as text compresses\"); }\n";
    while data.len() < 64 * MIB {
        data.extend_from_slice(line);
    }
    data.truncate(64 * MIB);
    let src = h.join("mixed");
    std::fs::write(&src, &data).unwrap();
    let out = output(q(
        h,
        &server,
        &[
            "put",
            src.to_str().unwrap(),
            "--compress",
            "always",
            "--json",
        ],
    ))
    .await;
    let report = common::json_of(&out);
    assert_eq!(report["bytes_sent"], data.len() as u64);
    let wire = report["wire_bytes"].as_u64().unwrap();
    assert!(wire < 36 * MIB as u64, "put: {wire} bytes on the wire");
    assert!(std::fs::read(server.root.join("mixed")).unwrap() == data);

    let mut get = q(
        h,
        &server,
        &["get", "mixed", "--compress", "always", "--json", "-o"],
    );
    get.arg(h.join("back"));
    let report = common::json_of(&output(get).await);
    let wire = report["wire_bytes"].as_u64().unwrap();
    assert!(wire < 36 * MIB as u64, "get: {wire} bytes on the wire");
    assert!(std::fs::read(h.join("back/mixed")).unwrap() == data);
    // Without compression the wire carries the file and its framing only.
    let mut get = q(
        h,
        &server,
        &[
            "get",
            "mixed",
            "--compress",
            "never",
            "--json",
            "--force",
            "-o",
        ],
    );
    get.arg(h.join("back"));
    let report = common::json_of(&output(get).await);
    assert_eq!(report["wire_bytes"], data.len() as u64);
}

/// A malformed line in known_hosts is named with how to fix that line; the
/// message once advised moving the file away "to generate a new identity"
/// (it holds none, and moving it away makes every server a first contact).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_malformed_known_hosts_line_is_named_with_its_fix() {
    let server = TestServer::start().await;
    let home = home_for(&server);
    let h = home.path();
    let known = h.join("qxfer-config/known_hosts");
    std::fs::write(&known, format!("{} SHA256:not-base64!\n", server.addr)).unwrap();
    let out = output(q(h, &server, &["ls"])).await;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains("known_hosts line 1") && stderr.contains("fix that line"),
        "{stderr}"
    );
    assert!(
        !stderr.contains("move it away") && !stderr.contains("identity"),
        "{stderr}"
    );
}

/// A download to standard output cut short cannot be resumed: the message
/// says the output is incomplete, never "run the same command again to resume".
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_download_to_stdout_cut_short_says_its_output_is_incomplete() {
    let home = tempfile::tempdir().unwrap();
    let h = home.path().to_owned();
    std::fs::create_dir_all(h.join("root")).unwrap();
    std::fs::write(h.join("root/big"), pattern(24 * MIB, 43)).unwrap();
    let mut cmd = qxfer(&h);
    cmd.args([
        "serve",
        "--listen",
        "127.0.0.1:0",
        "--grace",
        "100ms",
        "--root",
    ])
    .arg(h.join("root"))
    .arg("--certs")
    .arg(h.join("certs"));
    let serve = ServeProcess::spawn(cmd);
    let mut get = qxfer_at(&h, serve.addr);
    get.args(["get", "big", "-o", "-", "--limit-rate", "2M"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped());
    let child = get.spawn().unwrap();
    tokio::time::sleep(Duration::from_secs(2)).await;
    // SAFETY: kill(2) on the server process this test started.
    unsafe { libc::kill(serve.child.id() as i32, libc::SIGTERM) };
    let out = tokio::task::spawn_blocking(move || child.wait_with_output().unwrap())
        .await
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(stderr.contains("incomplete"), "{stderr}");
    assert!(!stderr.contains("to resume"), "{stderr}");
}

/// `ls -r` on a local root once kept a directory handle open for every
/// directory still to walk: a tree with more directories than the
/// server's descriptor limit failed to list (and other requests failed
/// meanwhile). Here the server may hold 96 descriptors, the tree has 300
/// directories side by side and a chain 60 deep.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn listing_a_tree_wider_and_deeper_than_the_descriptor_limit() {
    let home = tempfile::tempdir().unwrap();
    let h = home.path().to_owned();
    let root = h.join("root");
    for i in 0..300 {
        let d = root.join(format!("wide/d{i:03}"));
        std::fs::create_dir_all(&d).unwrap();
        std::fs::write(d.join("f"), b"x").unwrap();
    }
    let mut deep = root.join("deep");
    for i in 0..60 {
        deep = deep.join(format!("l{i}"));
    }
    std::fs::create_dir_all(&deep).unwrap();
    std::fs::write(deep.join("bottom"), b"y").unwrap();
    let mut cmd = qxfer(&h);
    cmd.args(["serve", "--listen", "127.0.0.1:0", "--root"])
        .arg(&root)
        .arg("--certs")
        .arg(h.join("certs"));
    let serve = ServeProcess::spawn(cmd);
    let limit = libc::rlimit {
        rlim_cur: 96,
        rlim_max: 96,
    };
    // SAFETY: prlimit(2) on the server process this test started, with a
    // valid limit and no old value asked for.
    let set = unsafe {
        libc::prlimit(
            serve.child.id() as i32,
            libc::RLIMIT_NOFILE,
            &limit,
            std::ptr::null_mut(),
        )
    };
    assert_eq!(set, 0);
    for dir in ["wide", "deep", ""] {
        let mut ls = qxfer_at(&h, serve.addr);
        ls.args(["ls", "-r", "--json", dir]);
        let out = output(ls).await;
        ok(&out);
        let entries: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        let n = entries.as_array().unwrap().len();
        let expected = match dir {
            "wide" => 600,
            "deep" => 61,
            _ => 600 + 61 + 2,
        };
        assert_eq!(n, expected, "ls -r {dir}");
    }
    let mut ls = qxfer_at(&h, serve.addr);
    ls.args(["ls", "-r", "deep"]);
    let out = output(ls).await;
    ok(&out);
    assert!(String::from_utf8_lossy(&out.stdout).contains("bottom"));
}

both_backends!(
    a_tree_download_never_writes_through_a_local_link,
    a_tree_download_never_writes_through_a_local_link_on
);

/// `get -r` once wrote through a symbolic link in the destination tree:
/// with `proj/sub2 -> /outside` here and a real `proj/sub2/` on the
/// server, files landed in `/outside`, exit 0. Below the directory the
/// user named, no link is followed: the files under it fail, named, and
/// everything else arrives; with `--delete` too.
async fn a_tree_download_never_writes_through_a_local_link_on(backend: Backend) {
    let server = TestServer::start_on(backend, "locallink").await;
    let home = home_for(&server);
    let h = home.path();
    let src = h.join("src/proj");
    std::fs::create_dir_all(src.join("sub2/deeper")).unwrap();
    std::fs::create_dir_all(src.join("ok")).unwrap();
    std::fs::write(src.join("top.txt"), b"top").unwrap();
    std::fs::write(src.join("ok/fine.txt"), b"fine").unwrap();
    std::fs::write(src.join("sub2/evil.txt"), b"evil").unwrap();
    std::fs::write(src.join("sub2/deeper/more.txt"), b"more").unwrap();
    ok(&output(q(h, &server, &["put", "-r", src.to_str().unwrap()])).await);

    for delete in [false, true] {
        let out_dir = h.join(format!("out-{delete}"));
        let outside = h.join(format!("outside-{delete}"));
        std::fs::create_dir_all(out_dir.join("proj")).unwrap();
        std::fs::create_dir_all(&outside).unwrap();
        std::fs::write(outside.join("precious"), b"keep me").unwrap();
        std::os::unix::fs::symlink(&outside, out_dir.join("proj/sub2")).unwrap();
        let mut get = q(h, &server, &["get", "-r", "proj", "-o"]);
        get.arg(&out_dir);
        if delete {
            get.arg("--delete");
        }
        let out = output(get).await;
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{stderr}");
        assert!(
            stderr.contains("sub2") && stderr.contains("symbolic link"),
            "{stderr}"
        );
        let mut there: Vec<_> = std::fs::read_dir(&outside)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        there.sort();
        assert_eq!(
            there,
            ["precious"],
            "nothing written or deleted through the link"
        );
        assert_eq!(std::fs::read(out_dir.join("proj/top.txt")).unwrap(), b"top");
        assert_eq!(
            std::fs::read(out_dir.join("proj/ok/fine.txt")).unwrap(),
            b"fine"
        );
        assert!(std::fs::symlink_metadata(out_dir.join("proj/sub2"))
            .unwrap()
            .file_type()
            .is_symlink());
    }
}

both_backends!(
    any_linux_name_goes_and_comes_back_byte_for_byte,
    any_linux_name_goes_and_comes_back_on
);

/// Names that are not UTF-8, or hold a newline, a backslash or a terminal
/// escape, were silently left out ("not a UTF-8 name; skipped", exit 0) or
/// dropped with everything under them. They now travel byte for byte,
/// Linux to Linux, both ways, through `put -r`, `ls -r` and `get -r`; `ls`
/// shows them escaped and quoted, never raw.
async fn any_linux_name_goes_and_comes_back_on(backend: Backend) {
    use std::ffi::OsStr;
    use std::os::unix::ffi::OsStrExt;
    let server = TestServer::start_on(backend, "oddnames").await;
    let home = home_for(&server);
    let h = home.path();
    let top = h.join("odd");
    let names: [&[u8]; 5] = [
        b"caf\xe9.txt",
        b"line\nbreak",
        b"back\\slash",
        b"\x1b[31mred",
        "\u{FDD0} noncharacter".as_bytes(),
    ];
    let odd_dir = top.join(OsStr::from_bytes(b"dir \xff\xfe"));
    std::fs::create_dir_all(&odd_dir).unwrap();
    for (i, n) in names.iter().enumerate() {
        std::fs::write(top.join(OsStr::from_bytes(n)), format!("file {i}")).unwrap();
    }
    std::fs::write(odd_dir.join(OsStr::from_bytes(b"inner\xc0")), b"inside").unwrap();

    let mut put = q(h, &server, &["put", "-r", "--json"]);
    put.arg(&top);
    let out = output(put).await;
    ok(&out);
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["files"].as_array().unwrap().len(), 6, "{report}");
    if backend == Backend::Local {
        // The server's directory holds the very bytes.
        let stored = server.root.join("odd");
        for n in names {
            assert!(stored.join(OsStr::from_bytes(n)).is_file(), "{n:?}");
        }
        assert!(stored
            .join(OsStr::from_bytes(b"dir \xff\xfe"))
            .join(OsStr::from_bytes(b"inner\xc0"))
            .is_file());
    }

    let out = output(q(h, &server, &["ls", "-r", "odd"])).await;
    ok(&out);
    let listed = String::from_utf8(out.stdout).unwrap();
    assert_eq!(listed.lines().count(), 7, "{listed}");
    assert!(listed.contains("\"caf\\xe9.txt\""), "{listed}");
    assert!(listed.contains("\"line\\nbreak\""), "{listed}");
    assert!(listed.contains("\"back\\\\slash\""), "{listed}");
    assert!(!listed.contains('\x1b'), "a raw escape: {listed:?}");

    let dl = h.join("dl");
    let mut get = q(h, &server, &["get", "-r", "odd", "--json", "-o"]);
    get.arg(&dl);
    let out = output(get).await;
    ok(&out);
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["files"].as_array().unwrap().len(), 6, "{report}");
    for (i, n) in names.iter().enumerate() {
        let got = std::fs::read(dl.join("odd").join(OsStr::from_bytes(n))).unwrap();
        assert_eq!(got, format!("file {i}").as_bytes(), "{n:?}");
    }
    let inner = dl
        .join("odd")
        .join(OsStr::from_bytes(b"dir \xff\xfe"))
        .join(OsStr::from_bytes(b"inner\xc0"));
    assert_eq!(std::fs::read(inner).unwrap(), b"inside");
}

/// A name another program made in a bucket that is not the one wire form
/// of any name (a lone escape character) cannot be made here: `get -r`
/// once skipped such names with exit 0. It fails that file, named, exit 1,
/// listed in `--json`'s errors; the rest arrives.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_name_that_cannot_be_made_here_fails_its_file() {
    let server = TestServer::start_on(Backend::Object, "badname").await;
    let home = home_for(&server);
    let h = home.path();
    server.place("t/fine", b"fine").await;
    server.place("t/bad\u{FDD2}", b"bad").await;
    let dl = h.join("dl");
    let mut get = q(h, &server, &["get", "-r", "t", "--json", "-o"]);
    get.arg(&dl);
    let out = output(get).await;
    assert_eq!(
        out.status.code(),
        Some(1),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("bad"), "{stderr}");
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let errors = report["errors"].to_string();
    assert!(errors.contains("bad"), "{report}");
    assert_eq!(std::fs::read(dl.join("t/fine")).unwrap(), b"fine");
}

both_backends!(
    a_hostile_delta_put_is_refused_and_the_old_version_stays,
    hostile_delta_on
);

/// A client that sends a delta put (issue 19) whose ops copy past the
/// server's version, make more than the declared size, or assemble a file
/// that does not hash to its trailer: each is refused with a message that
/// says what was wrong, nothing is committed, the file the server held is
/// untouched, nothing is left behind, and the server goes on serving.
async fn hostile_delta_on(backend: Backend) {
    use qxfer::protocol::{
        encode, read_frame, BlockHeader, ChunkBatch, DeltaBase, DeltaOp, Encoding, FileMeta,
        PutRequest, Receipt, Request, Response, Trailer,
    };
    let server = TestServer::start_on(backend, "hostile-delta").await;
    let (client, _cfg) = server.client().await;
    let dir = tempfile::tempdir().unwrap();
    let old = pattern(2 * MIB, 1);
    std::fs::write(dir.path().join("f"), &old).unwrap();
    client
        .put(&dir.path().join("f"), "f", false, &|_| {})
        .await
        .unwrap();
    let size = (2 * MIB) as u64;
    let attempt = |ops: Vec<u8>, digest: [u8; 32]| {
        let client = &client;
        async move {
            let (mut send, mut recv) = client.connection().open_bi().await.unwrap();
            let request = Request::Put(PutRequest {
                path: "f".into(),
                meta: FileMeta {
                    size,
                    mtime: None,
                    mode: None,
                },
                force: true,
                resume: false,
                encoding: Encoding::Delta,
            });
            send.write_all(&encode(&request).unwrap()).await.unwrap();
            let accepted = read_frame::<_, Response>(&mut recv).await.unwrap();
            assert!(matches!(accepted, Response::PutAccepted(_)), "{accepted:?}");
            let base = read_frame::<_, DeltaBase>(&mut recv).await.unwrap();
            assert_eq!(base.size, size, "the server describes what it holds");
            while read_frame::<_, ChunkBatch>(&mut recv).await.unwrap().more {}
            let _ = send.write_all(&ops).await;
            let _ = send.write_all(&encode(&Trailer { digest }).unwrap()).await;
            let _ = send.finish();
            match read_frame::<_, Receipt>(&mut recv).await.unwrap() {
                Receipt::Failed(e) => e.message,
                other => panic!("a hostile delta was taken: {other:?}"),
            }
        }
    };
    let frames =
        |ops: &[DeltaOp]| -> Vec<u8> { ops.iter().flat_map(|o| encode(o).unwrap()).collect() };
    let right = *blake3::hash(&old).as_bytes();

    let msg = attempt(
        frames(&[
            DeltaOp::Copy {
                from: size - 10,
                len: 20,
            },
            DeltaOp::End,
        ]),
        right,
    )
    .await;
    assert!(
        msg.contains("'f'") && msg.contains("copy of 20 bytes"),
        "{msg}"
    );
    let msg = attempt(
        frames(&[
            DeltaOp::Copy { from: 0, len: size },
            DeltaOp::Copy { from: 0, len: 1 },
            DeltaOp::End,
        ]),
        right,
    )
    .await;
    assert!(msg.contains("more than the"), "{msg}");
    // Well-formed ops, a file that is not what the trailer says.
    let block = [
        frames(&[
            DeltaOp::Copy {
                from: 0,
                len: size - 4,
            },
            DeltaOp::Block,
        ]),
        BlockHeader {
            compressed: false,
            raw_len: 4,
            wire_len: 4,
        }
        .encode()
        .to_vec(),
        b"evil".to_vec(),
        frames(&[DeltaOp::End]),
    ]
    .concat();
    let msg = attempt(block, right).await;
    assert!(msg.contains("corrupted"), "{msg}");

    assert!(server.stored("f").await == old, "the old version is intact");
    assert!(
        server.partials().await.is_empty(),
        "{:?}",
        server.partials().await
    );
    client.list("").await.expect("the server goes on serving");
    server.assert_healthy().await;
}

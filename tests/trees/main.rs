//! Whole directory trees through the real binary: `put -r`, `get -r` and `ls -r` keep layout, empty directories, modes and mtimes.
//!
//! Re-runs with `--sync` and `--checksum` are in `sync`.

#[path = "../common/mod.rs"]
mod common;

use std::collections::BTreeMap;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;
use std::process::Output;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use common::{home_for, pattern, qxfer_at, Backend, TestServer};

mod sync;

/// path -> (kind, size, mode, mtime, BLAKE3 of contents)
type Manifest = BTreeMap<String, (&'static str, u64, u32, (i64, i64), String)>;

fn manifest(top: &Path) -> Manifest {
    let mut out = Manifest::new();
    let mut stack = vec![top.to_owned()];
    while let Some(dir) = stack.pop() {
        for e in std::fs::read_dir(&dir).unwrap() {
            let p = e.unwrap().path();
            let md = std::fs::symlink_metadata(&p).unwrap();
            let rel = p.strip_prefix(top).unwrap().display().to_string();
            let (kind, size, digest) = if md.is_dir() {
                stack.push(p.clone());
                ("dir", 0, String::new())
            } else if !md.is_file() {
                ("special", 0, String::new())
            } else {
                let data = std::fs::read(&p).unwrap();
                ("file", md.len(), blake3::hash(&data).to_hex().to_string())
            };
            let mode = md.permissions().mode() & 0o7777;
            out.insert(
                rel,
                (kind, size, mode, (md.mtime(), md.mtime_nsec()), digest),
            );
        }
    }
    out
}

/// The manifest of `dir` as the server's root holds it: read from the
/// directory, or from the bucket (contents, and the mode and mtime stored
/// as object metadata, a directory's on its marker).
async fn stored_manifest(server: &TestServer, dir: &str) -> Manifest {
    if !server.is_object() {
        return manifest(&server.root.join(dir));
    }
    let mut out = Manifest::new();
    for (rel, object) in server.stored_objects(dir).await {
        let meta = |name: &str| object.attributes.get(name).cloned();
        let mode = meta("qxfer-mode").map_or(0, |m| u32::from_str_radix(&m, 8).unwrap());
        let mtime = meta("qxfer-mtime").map_or((0, 0), |t| {
            let (s, n) = t.split_once('.').unwrap();
            (s.parse().unwrap(), n.parse().unwrap())
        });
        match rel.strip_suffix(".qxfer-dir") {
            Some(d) => {
                let d = d.trim_end_matches('/');
                if !d.is_empty() {
                    out.insert(d.to_owned(), ("dir", 0, mode, mtime, String::new()));
                }
            }
            None => {
                let digest = blake3::hash(&object.bytes).to_hex().to_string();
                let size = object.bytes.len() as u64;
                out.insert(rel, ("file", size, mode, mtime, digest));
            }
        }
    }
    out
}

/// How many files the server's root holds beneath `dir`.
async fn stored_files(server: &TestServer, dir: &str) -> usize {
    if !server.is_object() {
        return std::fs::read_dir(server.root.join(dir))
            .map(|ds| {
                ds.flatten()
                    .map(|d| std::fs::read_dir(d.path()).map(|f| f.count()).unwrap_or(0))
                    .sum::<usize>()
            })
            .unwrap_or(0);
    }
    server
        .stored_tree()
        .await
        .iter()
        .filter(|k| k.starts_with(&format!("{dir}/")) && k.matches('/').count() == 2)
        .count()
}

fn set_mtime(p: &Path, t: SystemTime) {
    std::fs::File::open(p).unwrap().set_modified(t).unwrap();
}

/// `files` files in 50 directories (some empty, some nested), with varied
/// sizes, modes and mtimes, plus a symlink and a FIFO that must be skipped.
fn build_tree(top: &Path, files: usize) {
    let dir_modes = [0o755, 0o750, 0o700];
    let file_modes = [0o644, 0o600, 0o640, 0o755, 0o700, 0o444];
    let dirs: Vec<String> = (0..50)
        .map(|i| match i % 5 {
            0 | 1 => format!("d{i:02}"),
            2 | 3 => format!("d{:02}/sub{i:02}", i - 2),
            _ => format!("d{:02}/sub{:02}/deep{i:02}", i - 4, i - 2),
        })
        .collect();
    for d in &dirs {
        std::fs::create_dir_all(top.join(d)).unwrap();
    }
    // Every tenth directory stays empty; the rest share the files.
    let full: Vec<&String> = dirs
        .iter()
        .enumerate()
        .filter(|(i, _)| i % 10 != 7)
        .map(|(_, d)| d)
        .collect();
    let base = UNIX_EPOCH + Duration::new(1_600_000_000, 0);
    for i in 0..files {
        let p = top
            .join(full[i % full.len()])
            .join(format!("file {i:04}.dat"));
        std::fs::write(&p, pattern(i * 37 % 20_000, i as u64)).unwrap();
        std::fs::set_permissions(
            &p,
            std::fs::Permissions::from_mode(file_modes[i % file_modes.len()]),
        )
        .unwrap();
        let t = base + Duration::new(i as u64 * 3_600, (i as u32 * 7_919) % 1_000_000_000);
        std::fs::File::options()
            .write(true)
            .open(&p)
            .or_else(|_| std::fs::File::open(&p))
            .unwrap()
            .set_modified(t)
            .unwrap();
    }
    std::os::unix::fs::symlink("/etc/passwd", top.join("d00/link")).unwrap();
    let fifo = std::ffi::CString::new(top.join("d01/fifo").as_os_str().as_encoded_bytes()).unwrap();
    // SAFETY: mkfifo reads a valid NUL-terminated path.
    assert_eq!(unsafe { libc::mkfifo(fifo.as_ptr(), 0o644) }, 0);
    // Directory modes and mtimes last, deepest first, as a user's tree would have them.
    let mut all: Vec<&String> = dirs.iter().collect();
    all.sort_by_key(|d| std::cmp::Reverse(d.matches('/').count()));
    for (i, d) in all.iter().enumerate() {
        let p = top.join(d);
        set_mtime(&p, base + Duration::new(i as u64 * 86_400, 500));
        std::fs::set_permissions(
            &p,
            std::fs::Permissions::from_mode(dir_modes[i % dir_modes.len()]),
        )
        .unwrap();
    }
    set_mtime(top, base);
}

async fn run(cmd: std::process::Command) -> Output {
    let out = common::output(cmd).await;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

both_backends!(
    a_tree_of_2000_files_round_trips_identically,
    a_tree_of_2000_files_round_trips_identically_on
);

async fn a_tree_of_2000_files_round_trips_identically_on(backend: Backend) {
    let server = TestServer::start_on(backend, "tree").await;
    let home = home_for(&server);
    let h = home.path();
    let src = h.join("tree");
    // On an object root each new file costs the three-node test cluster
    // some nine requests (checks, its lease, the write), and CPU-bound it
    // takes ~50 ms a file: 600 files show the same (every kind of entry,
    // mode and mtime, nesting, empty directories); the throughput of many
    // small files into a store is measured in docs/bench/run.
    let files = match backend {
        Backend::Local => 2000,
        Backend::Object => 600,
    };
    build_tree(&src, files);
    let mut want = manifest(&src);
    want.remove("d00/link");
    want.remove("d01/fifo");
    assert_eq!(want.values().filter(|v| v.0 == "file").count(), files);
    assert_eq!(want.values().filter(|v| v.0 == "dir").count(), 50);
    let client = |args: &[&str]| {
        let mut cmd = qxfer_at(h, server.addr);
        cmd.args(args).current_dir(h);
        cmd
    };

    let out = run(client(&["put", "-r", "tree", "--parallel", "32", "--json"])).await;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("d00/link: a symbolic link; skipped"),
        "{stderr}"
    );
    assert!(stderr.contains("d01/fifo: a socket, FIFO or device; skipped"));
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["files"].as_array().unwrap().len(), files);
    assert!(report["files"][0]["blake3"].as_str().unwrap().len() == 64);
    assert_eq!(
        stored_manifest(&server, "tree").await,
        want,
        "on the server"
    );

    let out = run(client(&["ls", "-r", "tree", "--json"])).await;
    let listed: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(listed.as_array().unwrap().len(), files + 50);

    let dl = h.join("dl");
    run(client(&[
        "get",
        "-r",
        "tree",
        "-o",
        "dl",
        "--parallel",
        "32",
    ]))
    .await;
    assert_eq!(manifest(&dl.join("tree")), want, "downloaded");
    let top = |p: &Path| std::fs::metadata(p).unwrap().modified().unwrap();
    assert_eq!(
        top(&dl.join("tree")),
        top(&src),
        "the top directory's mtime"
    );
}

both_backends!(
    an_interrupted_tree_upload_completes_when_run_again,
    interrupted_tree_on
);

async fn interrupted_tree_on(backend: Backend) {
    let server = TestServer::start_on(backend, "interrupted-tree").await;
    let home = home_for(&server);
    let h = home.path();
    let src = h.join("tree");
    for d in 0..10 {
        std::fs::create_dir_all(src.join(format!("d{d}"))).unwrap();
        for f in 0..20 {
            let data = pattern(64 * 1024, d * 100 + f);
            std::fs::write(src.join(format!("d{d}/f{f}")), data).unwrap();
        }
    }
    let client = |args: &[&str]| {
        let mut cmd = qxfer_at(h, server.addr);
        cmd.args(args).current_dir(h);
        cmd
    };
    // 12.5 MiB at 1 MiB/s: killed once 20 files are in, part way through
    // (an object store commits each file some 50 ms after its data).
    let mut first = client(&["put", "-r", "tree", "-q", "--limit-rate", "1M"])
        .spawn()
        .unwrap();
    let start = std::time::Instant::now();
    while stored_files(&server, "tree").await < 20 {
        assert!(start.elapsed() < Duration::from_secs(20), "no progress");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    first.kill().unwrap();
    first.wait().unwrap();
    let done_before = stored_files(&server, "tree").await;
    assert!(
        done_before < 200,
        "killed part way ({done_before} files in)"
    );

    let out = run(client(&["put", "-r", "tree", "--json"])).await;
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let files = report["files"].as_array().unwrap();
    assert_eq!(files.len(), 200);
    let skipped = files.iter().filter(|f| f["already_there"] == true).count();
    assert!(skipped >= 20, "{skipped} skipped");
    assert!(skipped < 200);
    // Every file in place, and the rerun applied directory metadata too.
    assert_eq!(stored_manifest(&server, "tree").await, manifest(&src));
}

/// A filesystem of its own (XFS in a loop-mounted image), unmounted on drop.
struct SharingFs {
    mnt: std::path::PathBuf,
    _dir: tempfile::TempDir,
}

impl SharingFs {
    /// An XFS (which shares data between files) of 512 MiB, if this
    /// machine can make one: root, mkfs.xfs and a loop device. Else why not.
    fn make() -> Result<Self, String> {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            return Err("not root (a loop mount needs it)".into());
        }
        let dir = tempfile::tempdir().unwrap();
        let img = dir.path().join("xfs.img");
        let mnt = dir.path().join("mnt");
        std::fs::File::create(&img)
            .unwrap()
            .set_len(512 << 20)
            .unwrap();
        std::fs::create_dir(&mnt).unwrap();
        let ok = |cmd: &mut std::process::Command| {
            cmd.output()
                .map_err(|e| format!("{cmd:?}: {e}"))
                .and_then(|o| {
                    o.status
                        .success()
                        .then_some(())
                        .ok_or_else(|| format!("{cmd:?}: {}", String::from_utf8_lossy(&o.stderr)))
                })
        };
        ok(std::process::Command::new("mkfs.xfs")
            .args(["-q", "-f"])
            .arg(&img))?;
        ok(std::process::Command::new("mount")
            .args(["-o", "loop"])
            .arg(&img)
            .arg(&mnt))?;
        Ok(Self { mnt, _dir: dir })
    }
}

impl Drop for SharingFs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(&self.mnt)
            .status();
    }
}

/// Whether `path`'s data shares extents with another file (filefrag's
/// "shared" flag).
fn shares_data(path: &Path) -> bool {
    let out = std::process::Command::new("filefrag")
        .arg("-v")
        .arg(path)
        .output()
        .expect("filefrag (e2fsprogs)");
    String::from_utf8_lossy(&out.stdout).contains("shared")
}

/// On a filesystem that shares data between files (issue 19: the 1 GiB
/// delta), a delta in either direction starts the new version as a clone
/// of the old and writes only what changed: the result is the new version,
/// and it shares the unchanged data with the old one (kept here under a
/// second name to see it), on the server for a put and on the client for
/// a get.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_delta_on_a_filesystem_that_shares_data_writes_only_what_changed() {
    const MIB: usize = 1 << 20;
    let fs = match SharingFs::make() {
        Ok(fs) => fs,
        Err(why) => {
            eprintln!("skipped: cannot make an XFS to test on: {why}");
            return;
        }
    };
    let root = fs.mnt.join("root");
    let server = TestServer::start_in(tempfile::tempdir().unwrap(), &root).await;
    let home = home_for(&server);
    let work = fs.mnt.join("work");
    std::fs::create_dir(&work).unwrap();
    let client = |args: &[&str]| {
        let mut cmd = qxfer_at(home.path(), server.addr);
        cmd.args(args).current_dir(&work);
        cmd
    };
    let v1 = pattern(16 * MIB, 1);
    std::fs::write(work.join("big"), &v1).unwrap();
    run(client(&["put", "big", "--json"])).await;
    run(client(&["get", "big", "-o", "dl", "--json"])).await;

    // Upload: 1 MiB rewritten in the middle.
    std::fs::hard_link(root.join("big"), root.join("v1")).unwrap();
    let v2 = [&v1[..7 * MIB], &pattern(MIB, 2), &v1[8 * MIB..]].concat();
    std::fs::write(work.join("big"), &v2).unwrap();
    let f = the_file(&run(client(&["put", "big", "--sync", "--json"])).await);
    assert_eq!(f["delta"], true, "{f}");
    assert!(server.stored("big").await == v2, "the server holds v2");
    assert!(std::fs::read(root.join("v1")).unwrap() == v1, "v1 intact");
    assert!(shares_data(&root.join("big")), "v2 shares v1's data");

    // Again, against the version the last delta made (whose chunks the
    // server remembers), now with 100 bytes inserted at the start.
    let v3 = [&pattern(100, 3), &v2[..]].concat();
    std::fs::write(work.join("big"), &v3).unwrap();
    let f = the_file(&run(client(&["put", "big", "--sync", "--json"])).await);
    assert_eq!(f["delta"], true, "{f}");
    assert!(f["bytes_sent"].as_u64().unwrap() < 300_000, "{f}");
    assert!(server.stored("big").await == v3, "the server holds v3");

    // Download of v3 over the client's v1: everything moved by 100 bytes,
    // so nothing can be shared (only written), but it is still a delta.
    let f = the_file(&run(client(&["get", "big", "-o", "dl", "--sync", "--json"])).await);
    assert_eq!(f["delta"], true, "{f}");
    assert!(
        std::fs::read(work.join("dl/big")).unwrap() == v3,
        "the download is v3"
    );

    // The client kept the chunks of the v3 it made, for the next delta
    // (its config directory's `described/`), so it need not read its v3
    // again to describe it.
    let kept = || -> Vec<std::path::PathBuf> {
        let mut found = Vec::new();
        let mut stack = vec![home.path().to_owned()];
        while let Some(d) = stack.pop() {
            for e in std::fs::read_dir(&d).unwrap().flatten() {
                let p = e.path();
                if p.is_dir() {
                    stack.push(p);
                } else if d.file_name().is_some_and(|n| n == "described") {
                    found.push(p);
                }
            }
        }
        found
    };
    assert_eq!(kept().len(), 1, "the client keeps what it made by a delta");

    // Download of v4 (1 MiB rewritten in place) over the client's v3.
    std::fs::hard_link(work.join("dl/big"), work.join("dl-v3")).unwrap();
    let v4 = [&v3[..3 * MIB], &pattern(MIB, 4), &v3[4 * MIB..]].concat();
    std::fs::write(work.join("big"), &v4).unwrap();
    run(client(&["put", "big", "--sync", "--json"])).await;
    let f = the_file(&run(client(&["get", "big", "-o", "dl", "--sync", "--json"])).await);
    assert_eq!(f["delta"], true, "{f}");
    assert!(
        std::fs::read(work.join("dl/big")).unwrap() == v4,
        "the download is v4"
    );
    assert!(
        std::fs::read(work.join("dl-v3")).unwrap() == v3,
        "v3 intact"
    );
    assert!(
        shares_data(&work.join("dl/big")),
        "the download shares v3's data"
    );
    assert_eq!(kept().len(), 2, "v3's (still linked as dl-v3) and v4's");

    // What is kept is checked before use: damaged, it is not used, and
    // the delta still comes out right.
    for p in kept() {
        std::fs::write(p, b"not a description").unwrap();
    }
    let v5 = [&v4[..9 * MIB], &pattern(MIB, 5), &v4[10 * MIB..]].concat();
    std::fs::write(work.join("big"), &v5).unwrap();
    run(client(&["put", "big", "--sync", "--json"])).await;
    let f = the_file(&run(client(&["get", "big", "-o", "dl", "--sync", "--json"])).await);
    assert_eq!(f["delta"], true, "{f}");
    assert!(
        std::fs::read(work.join("dl/big")).unwrap() == v5,
        "the download is v5"
    );
    assert!(server.partials().await.is_empty(), "no temporaries left");
}

/// The `files` entry of a one-file `--json` report.
fn the_file(out: &Output) -> serde_json::Value {
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    report["files"][0].clone()
}

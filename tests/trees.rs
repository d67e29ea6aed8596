//! Whole directory trees through the real binary: `put -r`, `get -r` and `ls -r` keep layout, empty directories, modes and mtimes.

mod common;

use std::collections::BTreeMap;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;
use std::process::Output;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use common::{home_for, pattern, qxfer_at, TestServer};

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

fn set_mtime(p: &Path, t: SystemTime) {
    std::fs::File::open(p).unwrap().set_modified(t).unwrap();
}

/// 2,000 files in 50 directories (some empty, some nested), with varied
/// sizes, modes and mtimes, plus a symlink and a FIFO that must be skipped.
fn build_tree(top: &Path) {
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
    // Every tenth directory stays empty; the rest share the 2,000 files.
    let full: Vec<&String> = dirs
        .iter()
        .enumerate()
        .filter(|(i, _)| i % 10 != 7)
        .map(|(_, d)| d)
        .collect();
    let base = UNIX_EPOCH + Duration::new(1_600_000_000, 0);
    for i in 0..2000usize {
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

async fn run(mut cmd: std::process::Command) -> Output {
    let out = tokio::task::spawn_blocking(move || cmd.output().unwrap())
        .await
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tree_of_2000_files_round_trips_identically() {
    let server = TestServer::start().await;
    let home = home_for(&server);
    let h = home.path();
    let src = h.join("tree");
    build_tree(&src);
    let mut want = manifest(&src);
    want.remove("d00/link");
    want.remove("d01/fifo");
    assert_eq!(want.values().filter(|v| v.0 == "file").count(), 2000);
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
    assert_eq!(report["files"].as_array().unwrap().len(), 2000);
    assert!(report["files"][0]["blake3"].as_str().unwrap().len() == 64);
    assert_eq!(manifest(&server.root.join("tree")), want, "on the server");

    let out = run(client(&["ls", "-r", "tree", "--json"])).await;
    let listed: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(listed.as_array().unwrap().len(), 2050);

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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_interrupted_tree_upload_completes_when_run_again() {
    let server = TestServer::start().await;
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
    // 12.5 MiB at 4 MiB/s: killed after a second, part way through.
    let mut first = client(&["put", "-r", "tree", "-q", "--limit-rate", "4M"])
        .spawn()
        .unwrap();
    let start = std::time::Instant::now();
    let count = || {
        std::fs::read_dir(server.root.join("tree"))
            .map(|ds| {
                ds.flatten()
                    .map(|d| std::fs::read_dir(d.path()).map(|f| f.count()).unwrap_or(0))
                    .sum::<usize>()
            })
            .unwrap_or(0)
    };
    while count() < 20 {
        assert!(start.elapsed() < Duration::from_secs(20), "no progress");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    first.kill().unwrap();
    first.wait().unwrap();
    let done_before = count();
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
    assert_eq!(manifest(&server.root.join("tree")), manifest(&src));
}

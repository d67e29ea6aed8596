//! What the store is asked, counted at the wire: small files into a directory cost their PUTs, and a listing its LISTs, once it has been listed.

use std::collections::HashMap;

use super::server_via;
use crate::common::garage::{garage, CountingProxy};
use crate::common::{home_for, qxfer_at};

/// Requests by kind: `PUT lease`, `PUT object`, `HEAD`, `LIST`, `GET`, `DELETE`...
fn kinds(requests: &[(String, String)]) -> HashMap<String, usize> {
    let mut out = HashMap::new();
    for (method, target) in requests {
        let kind = match method.as_str() {
            "GET" if target.contains("list-type=2") => "LIST".to_owned(),
            "PUT" | "DELETE" if target.contains(".qxfer-leases") => format!("{method} lease"),
            "PUT" if target.contains(".qxfer-index") => "PUT index".to_owned(),
            "GET" if target.contains(".qxfer-index") => "GET index".to_owned(),
            other => other.to_owned(),
        };
        *out.entry(kind).or_default() += 1;
    }
    out
}

fn run(cmd: &mut std::process::Command) -> String {
    let out = std::process::Command::output(cmd).unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A tree of small files through the real binary: one lease and one
/// listing a directory, then a PUT a file (each file used to cost three
/// lease requests, two lookups and its PUT). Listing it afterwards: the
/// first listing looks every file up once and stores the directories'
/// indexes; the second costs its LISTs and one index read a directory,
/// and shows the same.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn small_files_cost_their_puts_and_a_listed_tree_its_lists() {
    let proxy = CountingProxy::start().await;
    let url = garage().fresh_root("costs");
    let server = server_via(&url, &proxy.endpoint, |_| {}).await;
    let home = home_for(&server);
    let h = home.path();
    let tree = h.join("tree");
    for d in 0..3 {
        std::fs::create_dir_all(tree.join(format!("d{d}"))).unwrap();
        for f in 0..40 {
            std::fs::write(tree.join(format!("d{d}/f{f}")), format!("{d}/{f}")).unwrap();
        }
    }
    let before = proxy.requests().len();
    run(qxfer_at(h, server.addr).args(["put", "-r"]).arg(&tree));
    let put = kinds(&proxy.requests()[before..]);
    let objects = put.get("PUT").copied().unwrap_or(0);
    // 120 files and the directories' markers (4, with their modes).
    assert!((120..=130).contains(&objects), "{put:?}");
    // A lease (and a listing) per directory at most a few times over, not per file.
    let leases = put.get("PUT lease").copied().unwrap_or(0);
    assert!(leases <= 12, "{leases} leases for 120 small files: {put:?}");
    assert!(put.get("LIST").copied().unwrap_or(0) <= 20, "{put:?}");
    assert!(put.get("HEAD").copied().unwrap_or(0) <= 20, "{put:?}");

    let listing = || {
        let before = proxy.requests().len();
        let shown = run(qxfer_at(h, server.addr).args(["ls", "-r", "--json", "tree"]));
        (shown, kinds(&proxy.requests()[before..]))
    };
    let (first, asked) = listing();
    assert!(asked.get("HEAD").copied().unwrap_or(0) >= 120, "{asked:?}");
    // One index a directory holding files (three).
    assert_eq!(asked.get("PUT index").copied(), Some(3), "{asked:?}");
    let (second, asked) = listing();
    assert_eq!(first, second);
    assert!(first.contains("d1/f7"), "{first}");
    assert!(asked.get("HEAD").copied().unwrap_or(0) <= 2, "{asked:?}");
    assert_eq!(asked.get("GET index").copied(), Some(3), "{asked:?}");
    assert!(asked.get("LIST").copied().unwrap_or(0) <= 2, "{asked:?}");
}

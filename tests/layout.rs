//! The layout's nevers (README.md, "Layout"), checked on the source: which module may import which, and where clap and indicatif may appear.
//!
//! A module's imports are the `crate::NAME` paths in its files (comments
//! left out), so a new arrow that breaks a rule fails here with the file
//! and the line, before anyone has to find it in a review.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// Every `.rs` file under `dir`.
fn sources(dir: &Path, out: &mut Vec<PathBuf>) {
    for e in std::fs::read_dir(dir).unwrap() {
        let path = e.unwrap().path();
        if path.is_dir() {
            sources(&path, out);
        } else if path.extension().is_some_and(|x| x == "rs") {
            out.push(path);
        }
    }
}

/// The top-level module a file of src/ belongs to (`cli` for
/// src/cli/args.rs, `paths` for src/paths.rs).
fn module_of(src: &Path, file: &Path) -> String {
    let rel = file.strip_prefix(src).unwrap();
    let first = rel.components().next().unwrap().as_os_str();
    Path::new(first)
        .file_stem()
        .unwrap()
        .to_string_lossy()
        .into_owned()
}

/// A file's lines without their comments (`//` to the end of the line).
fn code_lines(text: &str) -> impl Iterator<Item = (usize, &str)> {
    text.lines()
        .enumerate()
        .map(|(i, l)| (i + 1, l.split("//").next().unwrap_or("")))
}

/// One use of something outside the file's own module.
#[derive(Debug)]
struct Arrow {
    from: String,
    to: String,
    at: String,
}

/// Every `crate::NAME` in src/, and every file that names `words`.
fn scan(words: &[&str]) -> (Vec<Arrow>, BTreeMap<String, Vec<String>>) {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    sources(&src, &mut files);
    files.sort();
    let (mut arrows, mut named) = (Vec::new(), BTreeMap::new());
    for file in &files {
        let from = module_of(&src, file);
        let text = std::fs::read_to_string(file).unwrap();
        let shown = file.strip_prefix(&src).unwrap().display().to_string();
        for (n, line) in code_lines(&text) {
            for piece in line.split("crate::").skip(1) {
                let to: String = piece
                    .chars()
                    .take_while(|c| c.is_alphanumeric() || *c == '_')
                    .collect();
                if !to.is_empty() && to != from {
                    arrows.push(Arrow {
                        from: from.clone(),
                        to,
                        at: format!("src/{shown}:{n}"),
                    });
                }
            }
            for w in words {
                if line.contains(&format!("{w}::")) || line.contains(&format!("use {w}")) {
                    named
                        .entry(w.to_string())
                        .or_insert_with(Vec::new)
                        .push(format!("src/{shown}:{n}"));
                }
            }
        }
    }
    (arrows, named)
}

/// The arrows from `from` to any of `to`.
fn arrows_between<'a>(arrows: &'a [Arrow], from: &str, to: &[&str]) -> Vec<&'a Arrow> {
    arrows
        .iter()
        .filter(|a| a.from == from && to.contains(&a.to.as_str()))
        .collect()
}

#[test]
fn the_layout_keeps_its_nevers() {
    let (arrows, named) = scan(&["clap", "indicatif"]);
    assert!(
        arrows.len() > 50,
        "the scan found the crate's imports: {}",
        arrows.len()
    );
    let mut broken = Vec::new();
    let mut check = |rule: &str, found: Vec<&Arrow>| {
        for a in found {
            broken.push(format!("{rule}: {} -> {} at {}", a.from, a.to, a.at));
        }
    };
    // The wire format stands on its own.
    check(
        "protocol imports nothing of the crate",
        arrows.iter().filter(|a| a.from == "protocol").collect(),
    );
    // Neither side knows the other; what both need lives below them.
    check(
        "client never imports server",
        arrows_between(&arrows, "client", &["server"]),
    );
    check(
        "server never imports client",
        arrows_between(&arrows, "server", &["client"]),
    );
    // The stores are below everything that serves or transfers.
    // A store offers bytes and takes them (`files`' sources and sinks);
    // framing them for the wire is exchange's, above it.
    check(
        "store imports nothing of server, client, exchange or the CLI",
        arrows_between(&arrows, "store", &["server", "client", "exchange", "cli"]),
    );
    // exchange is shared by both sides, below them.
    check(
        "exchange imports nothing of server, client or the CLI",
        arrows_between(&arrows, "exchange", &["server", "client", "cli", "store"]),
    );
    // The file work is below both exchange and the stores.
    check(
        "files imports nothing above it",
        arrows_between(
            &arrows,
            "files",
            &["server", "client", "cli", "store", "exchange"],
        ),
    );
    // Nothing imports the command line (the binary calls it).
    check(
        "nothing imports the CLI",
        arrows.iter().filter(|a| a.to == "cli").collect(),
    );
    for (word, places) in &named {
        for at in places {
            if !at.starts_with("src/cli/") {
                broken.push(format!("only the CLI uses {word}: {at}"));
            }
        }
    }
    assert!(
        named.contains_key("clap"),
        "the scan sees the CLI's own use of clap"
    );
    assert!(broken.is_empty(), "{}", broken.join("\n"));
}

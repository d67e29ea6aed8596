//! Reading `serve --metrics`: a plain HTTP GET, the metrics server's address from the banner, and `promtool check metrics`.

use std::io::{Read, Write};
use std::net::SocketAddr;
use std::time::Duration;

use super::ServeProcess;

/// `GET path` from `addr` over HTTP/1.1: the status code and the body.
pub fn http_get(addr: SocketAddr, path: &str) -> (u16, String) {
    let mut s = std::net::TcpStream::connect(addr).expect("the metrics port answers");
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut raw = String::new();
    s.read_to_string(&mut raw).expect("a whole answer");
    let (head, body) = raw.split_once("\r\n\r\n").expect("headers, then a body");
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("no status in {head:?}"));
    (status, body.to_owned())
}

/// Where a server started with `--metrics` answers HTTP (from its banner).
pub fn metrics_addr(server: &ServeProcess) -> SocketAddr {
    let line = server.wait_for_line("metrics on http://");
    line.strip_prefix("metrics on http://")
        .and_then(|rest| rest.split('/').next())
        .and_then(|a| a.parse().ok())
        .unwrap_or_else(|| panic!("no address in {line:?}"))
}

/// The value of the sample named exactly `series` (name and labels as
/// printed), if present.
pub fn sample(text: &str, series: &str) -> Option<f64> {
    text.lines().filter(|l| !l.starts_with('#')).find_map(|l| {
        l.strip_prefix(series)?
            .strip_prefix(' ')?
            .trim()
            .parse()
            .ok()
    })
}

/// Runs `promtool check metrics` on `text`: Prometheus's own parser and
/// linter. Where promtool is missing the check is skipped with a reason,
/// except as root (as CI runs, which installs Debian's prometheus package).
pub fn promtool_check(text: &str) {
    let child = std::process::Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn();
    let mut child = match child {
        Ok(c) => c,
        Err(e) if !super::is_root() => {
            eprintln!("skipping promtool check metrics: {e} (apt-get install prometheus)");
            return;
        }
        Err(e) => panic!("promtool: {e}; install Debian's prometheus package"),
    };
    child
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "promtool check metrics: {}{}\n{text}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

//! The real binary end to end: `qxfer serve` in a child process, client commands through assert_cmd; the transfers through it over a local root and over the object store.
//!
//! The cases: `commands` (the client's commands end to end), `serve` (the
//! server's own command line), `pipes` (standard input and output),
//! `failover` (several addresses of one server).

#[path = "../common/mod.rs"]
mod common;

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use assert_cmd::assert::OutputAssertExt;
use common::{
    http_get, is_root, log_has, metrics_addr, pattern, place_at, promtool_check, qxfer, qxfer_at,
    sample, serve_root, spawn_into, stored_at, Backend, ServeProcess,
};
use predicates::prelude::*;

mod commands;
mod failover;
mod pipes;
mod serve;

/// A `qxfer serve` over `<home>/root` with certs in `<home>/certs`.
fn serve(home: &Path, listen: &str) -> ServeProcess {
    serve_over(home, &home.join("root"), listen, &[])
}

/// A `qxfer serve` over `root` with certs in `<home>/certs`, plus `extra`.
fn serve_over(home: &Path, root: &Path, listen: &str, extra: &[&str]) -> ServeProcess {
    let mut cmd = qxfer(home);
    cmd.args(["serve", "--listen", listen, "--certs"])
        .arg(home.join("certs"))
        .args(extra);
    serve_root(&mut cmd, root);
    ServeProcess::spawn(cmd)
}

fn client(home: &Path, server: &ServeProcess) -> Command {
    qxfer_at(home, server.addr)
}

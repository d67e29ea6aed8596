//! What the in-process servers of a test binary logged at warn and above, kept in memory for a failing assertion to show.

use std::io::Write;
use std::sync::{Mutex, OnceLock};

/// The most recent lines kept; older ones are dropped.
const KEPT_LINES: usize = 200;

static LINES: Mutex<Vec<String>> = Mutex::new(Vec::new());

/// Installs the capture once per test binary. Warnings go to memory, not
/// to stdout: the tests provoke many on purpose (hostile peers, cut
/// stores), and a multi-threaded runtime's output escapes the harness's
/// per-test capture.
pub fn capture_server_logs() {
    static INSTALLED: OnceLock<()> = OnceLock::new();
    INSTALLED.get_or_init(|| {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::new("qxfer=warn"))
            .with_ansi(false)
            .with_writer(|| Capture(Vec::new()))
            .try_init();
    });
}

/// The warnings logged so far by this binary's servers, oldest first.
pub fn server_log() -> String {
    let lines = LINES.lock().unwrap_or_else(|e| e.into_inner());
    lines.concat()
}

/// One event's text, added to [`LINES`] when dropped.
struct Capture(Vec<u8>);

impl Write for Capture {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Drop for Capture {
    fn drop(&mut self) {
        if self.0.is_empty() {
            return;
        }
        let mut lines = LINES.lock().unwrap_or_else(|e| e.into_inner());
        if lines.len() >= KEPT_LINES {
            lines.remove(0);
        }
        lines.push(String::from_utf8_lossy(&self.0).into_owned());
    }
}

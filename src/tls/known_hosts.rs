//! known_hosts: the fingerprint each server had when this client first met it, as ssh keeps host keys.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

use super::*;

/// The client's record of server fingerprints, one `HOST:PORT SHA256:...` per
/// line, like ssh's known_hosts. Lines starting with `#` are comments.
#[derive(Debug)]
pub(crate) struct KnownHosts {
    path: PathBuf,
    entries: Vec<(String, Fingerprint, usize)>,
}

impl KnownHosts {
    /// Reads the file at `path`; a missing file is an empty list.
    pub(crate) fn load(path: &Path) -> Result<Self, TrustError> {
        let text = read_or_empty(path).map_err(io_err(path))?;
        let mut entries = Vec::new();
        for (n, line) in content_lines(&text) {
            let mut parts = line.split_whitespace();
            let (Some(host), Some(fp)) = (parts.next(), parts.next()) else {
                return Err(TrustError::BadLine {
                    path: path.to_owned(),
                    line: n,
                    why: "no fingerprint after the address".to_owned(),
                });
            };
            let fp = fp
                .parse()
                .map_err(|e: BadFingerprint| TrustError::BadLine {
                    path: path.to_owned(),
                    line: n,
                    why: e.to_string(),
                })?;
            entries.push((host.to_owned(), fp, n));
        }
        Ok(Self {
            path: path.to_owned(),
            entries,
        })
    }

    /// The file this list lives in.
    pub(crate) fn path(&self) -> &Path {
        &self.path
    }

    /// The fingerprint stored for `host` and the line it is on.
    pub(crate) fn lookup(&self, host: &str) -> Option<(Fingerprint, usize)> {
        self.entries
            .iter()
            .find(|(h, _, _)| h == host)
            .map(|(_, fp, line)| (*fp, *line))
    }

    /// Appends `host fp` to the file, creating it (and its directory) if needed.
    pub(crate) fn add(&mut self, host: &str, fp: Fingerprint) -> Result<(), TrustError> {
        if let Some(dir) = self.path.parent() {
            create_private_dir(dir)?;
        }
        let mut f = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.path)
            .map_err(io_err(&self.path))?;
        writeln!(f, "{host} {fp}").map_err(io_err(&self.path))?;
        self.entries.push((host.to_owned(), fp, 0));
        Ok(())
    }
}

//! authorized_clients: the fingerprints a server admits, re-read whenever the file changes.

use std::collections::HashSet;
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::SystemTime;

use tracing::{info, warn};

use super::*;

/// The allowlist of client fingerprints a server admits.
///
/// The file holds one `SHA256:...` per line, optionally followed by a comment;
/// blank lines and lines starting with `#` are ignored. It is re-read whenever
/// its size, modification time or inode changes, so an operator can add or
/// remove a client without restarting the server. A line that does not parse
/// is skipped with a warning naming the file and line (as sshd does with
/// authorized_keys): one typo must not lock every client out.
#[derive(Debug)]
pub struct AuthorizedClients {
    path: PathBuf,
    /// Admitted whatever the file says (the server user's own client identity).
    extra: Vec<Fingerprint>,
    /// Admit every client (`serve --open`).
    open: bool,
    cache: Mutex<Cache>,
}

#[derive(Debug, Default)]
struct Cache {
    /// (mtime, size, inode) of the file when last read; None if it was missing.
    stamp: Option<(Option<SystemTime>, u64, u64)>,
    loaded: bool,
    entries: HashSet<Fingerprint>,
}

/// The file name of the allowlist inside the server's certificate directory.
pub const AUTHORIZED_CLIENTS: &str = "authorized_clients";

impl AuthorizedClients {
    /// An allowlist backed by `path`, also admitting `extra`. With `open`,
    /// every client is admitted (their fingerprints are still logged).
    pub fn new(path: &Path, extra: Vec<Fingerprint>, open: bool) -> Self {
        let list = Self {
            path: path.to_owned(),
            extra,
            open,
            cache: Mutex::new(Cache::default()),
        };
        list.refresh();
        list
    }

    /// The file this list is read from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// How many fingerprints the file lists now.
    pub fn len(&self) -> usize {
        self.refresh();
        self.cache
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entries
            .len()
    }

    /// Whether the file lists no fingerprints.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Whether `fp` may connect, re-reading the file first if it changed.
    pub fn admits(&self, fp: &Fingerprint) -> bool {
        if self.open || self.extra.contains(fp) {
            return true;
        }
        self.refresh();
        self.cache
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entries
            .contains(fp)
    }

    /// Re-reads the file if its size, mtime or inode changed since last time.
    /// Called from the TLS handshake, which runs on an async worker thread:
    /// on a multi-threaded runtime the worker first hands its other tasks to
    /// another thread (`block_in_place`), so a slow or hung filesystem under
    /// the allowlist delays this handshake, not every connection's tasks.
    fn refresh(&self) {
        let on_multi_thread = tokio::runtime::Handle::try_current()
            .is_ok_and(|h| h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread);
        if on_multi_thread {
            tokio::task::block_in_place(|| self.refresh_now())
        } else {
            self.refresh_now()
        }
    }

    fn refresh_now(&self) {
        let stamp = match fs::metadata(&self.path) {
            Ok(md) => Some((md.modified().ok(), md.len(), inode(&md))),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
            Err(e) => {
                warn!(
                    "cannot read {}: {e}; admitting only the clients already loaded",
                    self.path.display()
                );
                return;
            }
        };
        let mut cache = self.cache.lock().unwrap_or_else(|e| e.into_inner());
        if cache.loaded && cache.stamp == stamp {
            return;
        }
        let text = match read_or_empty(&self.path) {
            Ok(t) => t,
            Err(e) => {
                warn!(
                    "cannot read {}: {e}; admitting only the clients already loaded",
                    self.path.display()
                );
                return;
            }
        };
        let mut entries = HashSet::new();
        for (n, line) in content_lines(&text) {
            let first = line.split_whitespace().next().unwrap_or_default();
            match first.parse::<Fingerprint>() {
                Ok(fp) => {
                    entries.insert(fp);
                }
                Err(e) => warn!("{} line {n}: {e}; line ignored", self.path.display()),
            }
        }
        if cache.loaded {
            info!(
                "{} changed: {} client fingerprints now authorized",
                self.path.display(),
                entries.len()
            );
        }
        *cache = Cache {
            stamp,
            loaded: true,
            entries,
        };
    }

    /// Appends `fp` to the allowlist file at `path` (creating it, mode 0600)
    /// unless it is already listed. Returns whether it was added.
    pub fn append(path: &Path, fp: Fingerprint, comment: &str) -> Result<bool, TrustError> {
        let current = read_or_empty(path).map_err(io_err(path))?;
        let listed = content_lines(&current).any(|(_, l)| {
            l.split_whitespace()
                .next()
                .and_then(|w| w.parse::<Fingerprint>().ok())
                == Some(fp)
        });
        if listed {
            return Ok(false);
        }
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            create_private_dir(dir)?;
        }
        let mut opts = fs::OpenOptions::new();
        opts.create(true).append(true);
        #[cfg(unix)]
        std::os::unix::fs::OpenOptionsExt::mode(&mut opts, 0o600);
        let mut f = opts.open(path).map_err(io_err(path))?;
        // Never glue the new entry onto a last line that lacks its newline.
        let sep = if current.is_empty() || current.ends_with('\n') {
            ""
        } else {
            "\n"
        };
        writeln!(f, "{sep}{fp} {comment}").map_err(io_err(path))?;
        f.sync_all().map_err(io_err(path))?;
        Ok(true)
    }
}

#[cfg(unix)]
pub(super) fn inode(md: &fs::Metadata) -> u64 {
    std::os::unix::fs::MetadataExt::ino(md)
}

#[cfg(not(unix))]
pub(super) fn inode(_md: &fs::Metadata) -> u64 {
    0
}

//! What the client remembers between runs in its config directory: unfinished uploads and learned paths.

use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::endpoint::PathMemory;
use crate::exchange::Descriptions;
use crate::protocol::FileMeta;

/// Large uploads started and not yet finished, remembered across runs in
/// the config directory (`uploads/`, one empty file per upload).
///
/// Why: asking the server what it kept of an earlier attempt costs a round
/// trip before the first byte (0.1 s on a long path, 0.75 s over a
/// satellite). Only an interrupted upload can have left anything, and the
/// client that was interrupted is the one that knows: with no entry here a
/// large put streams its data right behind its header, as small ones do;
/// with an entry it asks first. An entry is written before the data flows
/// and removed once the server has committed the file, so a killed client
/// leaves it behind for the rerun. Losing an entry (a crash before it
/// reached the disk) costs only a resend from the start.
#[derive(Debug, Clone)]
pub(super) struct UploadJournal {
    dir: PathBuf,
    /// Whose server: its identity's fingerprint.
    server: String,
}

/// Entries older than this belong to uploads nobody retried; the server
/// sweeps their partials after a day by default.
pub(super) const JOURNAL_MAX_AGE: Duration = Duration::from_secs(30 * 24 * 3600);

impl UploadJournal {
    pub(super) fn open(config_dir: &Path, server: String) -> std::io::Result<Self> {
        let dir = config_dir.join("uploads");
        std::fs::create_dir_all(&dir)?;
        let now = std::time::SystemTime::now();
        for entry in std::fs::read_dir(&dir)?.flatten() {
            let old = entry
                .metadata()
                .and_then(|m| m.modified())
                .is_ok_and(|t| now.duration_since(t).unwrap_or_default() > JOURNAL_MAX_AGE);
            if old {
                let _ = std::fs::remove_file(entry.path());
            }
        }
        Ok(Self { dir, server })
    }

    /// The entry of one version (size, mtime) of one upload: keyed like the
    /// server's partial (our identity, the remote path, size and mtime).
    pub(super) fn entry(&self, remote: &str, meta: &FileMeta) -> PathBuf {
        let mut h = blake3::Hasher::new();
        for part in [self.server.as_bytes(), remote.as_bytes()] {
            h.update(&(part.len() as u64).to_le_bytes());
            h.update(part);
        }
        h.update(&meta.size.to_le_bytes());
        if let Some(t) = meta.mtime {
            h.update(&t.secs.to_le_bytes());
            h.update(&t.nanos.to_le_bytes());
        }
        self.dir.join(&h.finalize().to_hex()[..32])
    }
}

/// What earlier connections learned about the path to each server
/// (`paths` in the config directory: one `host:port rate_bytes_per_s
/// min_rtt_us unix_time` line each), so the next connection's congestion
/// controller can start near the path's rate instead of from scratch (see
/// `congestion::ModelConfig`). Best effort: a file that cannot be read or
/// written only costs the fast start.
#[derive(Debug, Clone)]
pub(super) struct PathMemories {
    file: PathBuf,
}

/// How long a remembered path is trusted: networks change (a laptop moves),
/// and the controller only checks the round-trip time before it jumps.
pub(super) const PATH_MEMORY_MAX_AGE: Duration = Duration::from_secs(24 * 3600);

impl PathMemories {
    pub(super) fn new(config_dir: &Path) -> Self {
        Self {
            file: config_dir.join("paths"),
        }
    }

    pub(super) fn entries(&self) -> Vec<(String, PathMemory, u64)> {
        let text = std::fs::read_to_string(&self.file).unwrap_or_default();
        text.lines()
            .filter_map(|line| {
                let mut f = line.split_whitespace();
                let key = f.next()?.to_owned();
                let bw: f64 = f.next()?.parse().ok()?;
                let rtt_us: u64 = f.next()?.parse().ok()?;
                let when: u64 = f.next()?.parse().ok()?;
                let memory = PathMemory {
                    bw,
                    min_rtt: Duration::from_micros(rtt_us),
                };
                Some((key, memory, when))
            })
            .collect()
    }

    pub(super) fn recall(&self, key: &str) -> Option<PathMemory> {
        let now = unix_now();
        self.entries()
            .into_iter()
            .find(|(k, _, when)| {
                k == key && now.saturating_sub(*when) < PATH_MEMORY_MAX_AGE.as_secs()
            })
            .map(|(_, m, _)| m)
    }

    /// Records `memory` for `key`, replacing its old line (written to a
    /// temporary and renamed, so a concurrent reader never sees half a file).
    pub(super) fn remember(&self, key: &str, memory: PathMemory) {
        let now = unix_now();
        let mut text = String::new();
        for (k, m, when) in self.entries() {
            if k != key && now.saturating_sub(when) < PATH_MEMORY_MAX_AGE.as_secs() {
                text.push_str(&format!(
                    "{k} {:.0} {} {when}\n",
                    m.bw,
                    m.min_rtt.as_micros()
                ));
            }
        }
        text.push_str(&format!(
            "{key} {:.0} {} {now}\n",
            memory.bw,
            memory.min_rtt.as_micros()
        ));
        let tmp = self
            .file
            .with_extension(format!("tmp{}", std::process::id()));
        if std::fs::write(&tmp, text).is_ok() && std::fs::rename(&tmp, &self.file).is_err() {
            let _ = std::fs::remove_file(&tmp);
        }
    }
}

pub(super) fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// What this client keeps of the chunks of files it made (`described/` in
/// `config_dir`), for the next delta of the same file (see
/// `files::described`); without it (a config directory that cannot hold
/// it), a delta costs reading the file to describe it.
pub(super) fn descriptions(config_dir: &Path) -> Descriptions {
    Descriptions::on_disk(config_dir.join("described")).unwrap_or_default()
}

//! What a process remembers of the local files it cut into chunks, so a file described once (or made by a delta) is not read and cut again while it stays as it was.
//!
//! A delta needs both versions cut into chunks: the receiver describes its
//! version, the sender cuts its own. On a server the same files come back
//! again and again (a nightly backup of a disk image replaces one file by
//! a delta each night, and a restore reads it), and cutting a gigabyte
//! costs about a second of CPU on each side. So the chunks of each local
//! file cut here are kept, by device and inode, while its size, mtime and
//! ctime stay as they were (any write moves the ctime, even one that puts
//! the mtime back): a file made by a delta is remembered as it is
//! committed, and its next delta in either direction reads nothing on this
//! side but the new bytes. Everything in it was computed here from the
//! bytes themselves: nothing a peer sent is kept.
//!
//! Bounded by [`MAX_CACHED_CHUNKS`] chunks (about 50 MB); emptied when
//! full, as the server's digest cache is. Only a process that says so
//! ([`keep`]: the server) remembers anything: a client sees each file once
//! a run, and would only hold the memory.

use std::collections::HashMap;
use std::fs::File;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, LazyLock, Mutex};

use crate::protocol::{ChunkSum, Digest};

/// Chunks kept at most, over all files: 1 GiB files at 8,192 chunks each,
/// 128 of them (about 50 MB with the map's overhead).
const MAX_CACHED_CHUNKS: usize = 1 << 20;

/// Which file, and which version of it: device, inode, size, mtime and ctime.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) struct FileKey {
    dev: u64,
    ino: u64,
    size: u64,
    mtime: (i64, i64),
    ctime: (i64, i64),
}

impl FileKey {
    /// The key of `file` as it is now. Blocking (a stat).
    pub(crate) fn of(file: &File) -> Option<Self> {
        #[cfg(unix)]
        {
            use std::os::unix::fs::MetadataExt;
            let md = file.metadata().ok()?;
            md.is_file().then(|| Self {
                dev: md.dev(),
                ino: md.ino(),
                size: md.len(),
                mtime: (md.mtime(), md.mtime_nsec()),
                ctime: (md.ctime(), md.ctime_nsec()),
            })
        }
        #[cfg(not(unix))]
        {
            let _ = file;
            None
        }
    }
}

/// A file cut into chunks of one average size.
#[derive(Clone)]
pub(crate) struct Description {
    pub(crate) chunks: Arc<[ChunkSum]>,
    /// The whole file's BLAKE3, where it was hashed too.
    pub(crate) digest: Option<Digest>,
    /// The BLAKE3 chaining values of its whole 1 MiB blocks, where they
    /// were taken (see `blocks`).
    pub(crate) values: Option<Arc<[blake3::hazmat::ChainingValue]>>,
}

#[derive(Default)]
struct Held {
    by_file: HashMap<(u64, u64), (FileKey, u32, Description)>,
    chunks: usize,
}

static HELD: LazyLock<Mutex<Held>> = LazyLock::new(Mutex::default);

static KEEPING: AtomicBool = AtomicBool::new(false);

/// From now on, this process remembers the descriptions it makes.
pub(crate) fn keep() {
    KEEPING.store(true, Ordering::Relaxed);
}

/// Whether this process remembers descriptions (else nothing need be
/// gathered for [`remember`]).
pub(crate) fn keeping() -> bool {
    KEEPING.load(Ordering::Relaxed)
}

fn held() -> std::sync::MutexGuard<'static, Held> {
    HELD.lock().unwrap_or_else(|e| e.into_inner())
}

/// The description of the file version `key` cut at average `avg`, if
/// this process cut it (or made it) and it has not changed since.
pub(crate) fn recall(key: &FileKey, avg: u32) -> Option<Description> {
    let held = held();
    let (k, a, d) = held.by_file.get(&(key.dev, key.ino))?;
    (k == key && *a == avg).then(|| d.clone())
}

/// Keeps the description of the file version `key` cut at average `avg`
/// (replacing what was kept for an older version of that file; what is
/// kept of this very version and not in `description`, such as its
/// digest, stays).
pub(crate) fn remember(key: FileKey, avg: u32, mut description: Description) {
    let n = description.chunks.len();
    if !keeping() || n > MAX_CACHED_CHUNKS {
        return;
    }
    let mut held = held();
    if let Some((k, a, kept)) = held.by_file.get(&(key.dev, key.ino)) {
        if *k == key && *a == avg {
            description.digest = description.digest.or(kept.digest);
            description.values = description.values.take().or_else(|| kept.values.clone());
        }
    }
    if held.chunks + n > MAX_CACHED_CHUNKS {
        held.by_file.clear();
        held.chunks = 0;
    }
    if let Some((_, _, old)) = held
        .by_file
        .insert((key.dev, key.ino), (key, avg, description))
    {
        held.chunks -= old.chunks.len();
    }
    held.chunks += n;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_description_without_a_digest_or_values_keeps_those_already_kept() {
        keep();
        let file = tempfile::tempfile().unwrap();
        file.set_len(3 << 20).unwrap();
        let key = FileKey::of(&file).unwrap();
        let chunks: Arc<[ChunkSum]> = vec![ChunkSum {
            len: 3 << 20,
            digest: [1; 32],
        }]
        .into();
        let full = Description {
            chunks: chunks.clone(),
            digest: Some([2; 32]),
            values: Some(vec![[3; 32]; 3].into()),
        };
        remember(key, 1 << 20, full);
        let bare = Description {
            chunks,
            digest: None,
            values: None,
        };
        remember(key, 1 << 20, bare);
        let d = recall(&key, 1 << 20).unwrap();
        assert_eq!(d.digest, Some([2; 32]));
        assert_eq!(d.values.unwrap().len(), 3);
        assert!(
            recall(&key, 1 << 19).is_none(),
            "another average is another cut"
        );
    }
}

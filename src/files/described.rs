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
//! full, as the server's digest cache is. What is kept is a
//! [`Descriptions`] handle that whoever opens the files holds and passes
//! on (the local root a server serves, a client's connection), not a
//! process-wide setting: two clients in one process (the tests) keep their
//! own, and a server's cache is its store's. Only a server keeps the cuts
//! it makes as a sender ([`Descriptions::in_memory`]): a client sees each
//! file once a run, and would only hold the memory.
//!
//! A client keeps instead, between runs ([`Descriptions::on_disk`]:
//! `described/` in its config directory), the descriptions of the files it made by a
//! delta (and, for this run only, in memory, those of the versions it
//! described as a receiver: a delta tells the chunks of what it makes from
//! those of the version it copies from): the next `get --sync` of such a file, unchanged here since,
//! reads nothing of it to describe it, and takes the BLAKE3 of the blocks
//! a copy leaves in place from there. At most [`DISK_ENTRIES`] files, the
//! oldest going first; each entry carries its own BLAKE3, and one that
//! does not check out, or is of another version, is not used.

use std::collections::HashMap;
use std::fs::File;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

use serde::{Deserialize, Serialize};

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

/// What a process remembers of its files' chunks (see the module's doc):
/// nothing (the default), the server's cache in memory
/// ([`Descriptions::in_memory`]), or a client's on disk between runs with
/// what its deltas need in memory for this connection
/// ([`Descriptions::on_disk`]). A clone shares the same cache.
#[derive(Clone, Default)]
pub(crate) struct Descriptions(Option<Arc<Kept>>);

struct Kept {
    /// Whether the cuts made as a sender are kept too (a server's).
    senders: bool,
    held: Mutex<Held>,
    /// Where descriptions of files made by a delta are kept between runs.
    disk: Option<PathBuf>,
}

impl std::fmt::Debug for Descriptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.0 {
            None => f.write_str("Descriptions(none)"),
            Some(k) => write!(
                f,
                "Descriptions(senders: {}, disk: {:?})",
                k.senders, k.disk
            ),
        }
    }
}

impl Descriptions {
    /// A server's: every description it makes or cuts, in memory.
    pub(crate) fn in_memory() -> Self {
        Self(Some(Arc::new(Kept {
            senders: true,
            held: Mutex::default(),
            disk: None,
        })))
    }

    /// A client's: the descriptions of the files it makes by a delta, in
    /// `dir` (created if missing), found there in later runs; and for this
    /// connection, in memory, those of the versions it describes as a
    /// receiver (a delta tells the chunks of what it makes from them).
    pub(crate) fn on_disk(dir: PathBuf) -> std::io::Result<Self> {
        std::fs::create_dir_all(&dir)?;
        Ok(Self(Some(Arc::new(Kept {
            senders: false,
            held: Mutex::default(),
            disk: Some(dir),
        }))))
    }

    /// Whether the cuts made as a sender are remembered (else nothing need
    /// be gathered for [`Descriptions::remember`]).
    pub(crate) fn keeping(&self) -> bool {
        self.0.as_ref().is_some_and(|k| k.senders)
    }

    /// Whether the description a receiver makes of its version is kept.
    pub(crate) fn receivers_keep(&self) -> bool {
        self.0.is_some()
    }

    fn held(&self) -> Option<MutexGuard<'_, Held>> {
        let kept = self.0.as_ref()?;
        Some(kept.held.lock().unwrap_or_else(|e| e.into_inner()))
    }

    fn disk(&self) -> Option<&Path> {
        self.0.as_ref()?.disk.as_deref()
    }

    /// The description of the file version `key` cut at average `avg`, if
    /// it was cut (or made) here and has not changed since, or (a client)
    /// it was made by a delta in an earlier run. Blocking where it reads
    /// the disk: one small file, once a delta.
    pub(crate) fn recall(&self, key: &FileKey, avg: u32) -> Option<Description> {
        if let Some(held) = self.held() {
            if let Some((k, a, d)) = held.by_file.get(&(key.dev, key.ino)) {
                if k == key && *a == avg {
                    return Some(d.clone());
                }
            }
        }
        recall_from_disk(self.disk()?, key, avg)
    }

    /// Forgets what is kept of the file `key` (a delta built on it failed
    /// its hash: whatever was wrong, it is not used again).
    pub(crate) fn forget(&self, key: &FileKey) {
        if let Some(mut held) = self.held() {
            if let Some((_, _, old)) = held.by_file.remove(&(key.dev, key.ino)) {
                held.chunks -= old.chunks.len();
            }
        }
        if let Some(dir) = self.disk() {
            let _ = std::fs::remove_file(disk_entry(dir, key));
        }
    }

    /// Keeps the description of the file version `key` cut at average
    /// `avg` (replacing what was kept for an older version of that file;
    /// what is kept of this very version and not in `description`, such as
    /// its digest, stays).
    pub(crate) fn remember(&self, key: FileKey, avg: u32, mut description: Description) {
        let n = description.chunks.len();
        if n > MAX_CACHED_CHUNKS {
            return;
        }
        let Some(mut held) = self.held() else {
            return;
        };
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

    /// Keeps the description of the file version `key` (made here by a
    /// delta) on disk, if this handle keeps any there. Written whole under
    /// another name and renamed, so a crash leaves the old entry or the
    /// new one; the oldest entries past [`DISK_ENTRIES`] go. Blocking.
    pub(crate) fn remember_on_disk(&self, key: FileKey, avg: u32, description: &Description) {
        if let Some(dir) = self.disk() {
            write_to_disk(dir, key, avg, description);
        }
    }
}

/// Files whose descriptions are kept on disk, at most (a 1 GiB file's
/// takes some 600 KB).
pub(crate) const DISK_ENTRIES: usize = 64;

/// The largest entry read back: [`MAX_CACHED_CHUNKS`] chunks and the block
/// values of the largest file that many chunks can describe.
const DISK_ENTRY_MAX: u64 = 80 << 20;

/// An entry on disk: the version, the average and the description.
#[derive(Serialize, Deserialize)]
struct OnDisk {
    dev: u64,
    ino: u64,
    size: u64,
    mtime: (i64, i64),
    ctime: (i64, i64),
    avg: u32,
    chunks: Vec<ChunkSum>,
    digest: Option<Digest>,
    values: Option<Vec<Digest>>,
}

const DISK_FORMAT: bincode::config::Configuration<
    bincode::config::LittleEndian,
    bincode::config::Varint,
    bincode::config::Limit<{ DISK_ENTRY_MAX as usize }>,
> = bincode::config::standard().with_limit::<{ DISK_ENTRY_MAX as usize }>();

fn disk_entry(dir: &Path, key: &FileKey) -> PathBuf {
    dir.join(format!("{:x}-{:x}", key.dev, key.ino))
}

fn recall_from_disk(dir: &Path, key: &FileKey, avg: u32) -> Option<Description> {
    let file = File::open(disk_entry(dir, key)).ok()?;
    let mut bytes = Vec::new();
    file.take(DISK_ENTRY_MAX).read_to_end(&mut bytes).ok()?;
    let (payload, sum) = bytes.split_at(bytes.len().checked_sub(32)?);
    if blake3::hash(payload).as_bytes() != sum {
        return None;
    }
    let (d, used): (OnDisk, usize) =
        bincode::serde::decode_from_slice(payload, DISK_FORMAT).ok()?;
    let kept = FileKey {
        dev: d.dev,
        ino: d.ino,
        size: d.size,
        mtime: d.mtime,
        ctime: d.ctime,
    };
    let whole = d.chunks.iter().map(|c| u64::from(c.len)).sum::<u64>() == d.size;
    let sane = used == payload.len() && whole && d.chunks.iter().all(|c| c.len > 0);
    (sane && kept == *key && d.avg == avg).then(|| Description {
        chunks: d.chunks.into(),
        digest: d.digest,
        values: d.values.map(Into::into),
    })
}

/// Writes the description of the file version `key` into `dir` (see
/// [`Descriptions::remember_on_disk`]).
fn write_to_disk(dir: &Path, key: FileKey, avg: u32, description: &Description) {
    if description.chunks.len() > MAX_CACHED_CHUNKS {
        return;
    }
    let entry = OnDisk {
        dev: key.dev,
        ino: key.ino,
        size: key.size,
        mtime: key.mtime,
        ctime: key.ctime,
        avg,
        chunks: description.chunks.to_vec(),
        digest: description.digest,
        values: description.values.as_deref().map(<[Digest]>::to_vec),
    };
    let Ok(mut bytes) = bincode::serde::encode_to_vec(&entry, DISK_FORMAT) else {
        return;
    };
    let sum = *blake3::hash(&bytes).as_bytes();
    bytes.extend_from_slice(&sum);
    let path = disk_entry(dir, &key);
    let tmp = path.with_extension(format!("tmp{}", std::process::id()));
    let written = File::create(&tmp)
        .and_then(|mut f| f.write_all(&bytes))
        .and_then(|()| std::fs::rename(&tmp, &path));
    if written.is_err() {
        let _ = std::fs::remove_file(&tmp);
        return;
    }
    prune(dir);
}

/// Removes the oldest entries past [`DISK_ENTRIES`].
fn prune(dir: &Path) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    let mut all: Vec<(std::time::SystemTime, PathBuf)> = entries
        .flatten()
        .filter_map(|e| Some((e.metadata().ok()?.modified().ok()?, e.path())))
        .collect();
    if all.len() <= DISK_ENTRIES {
        return;
    }
    all.sort();
    for (_, p) in &all[..all.len() - DISK_ENTRIES] {
        let _ = std::fs::remove_file(p);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_description_without_a_digest_or_values_keeps_those_already_kept() {
        let kept = Descriptions::in_memory();
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
        kept.remember(key, 1 << 20, full);
        let bare = Description {
            chunks,
            digest: None,
            values: None,
        };
        kept.remember(key, 1 << 20, bare);
        let d = kept.recall(&key, 1 << 20).unwrap();
        assert_eq!(d.digest, Some([2; 32]));
        assert_eq!(d.values.unwrap().len(), 3);
        assert!(
            kept.recall(&key, 1 << 19).is_none(),
            "another average is another cut"
        );
    }

    #[test]
    fn a_description_kept_on_disk_is_found_in_a_later_run_while_the_file_is_unchanged() {
        let dir = tempfile::tempdir().unwrap();
        let kept = Descriptions::on_disk(dir.path().join("described")).unwrap();
        let disk = kept.disk().unwrap();
        let mut file = tempfile::tempfile().unwrap();
        file.write_all(&[7u8; 5000]).unwrap();
        let key = FileKey::of(&file).unwrap();
        let chunks: Arc<[ChunkSum]> = vec![
            ChunkSum {
                len: 3000,
                digest: [1; 32],
            },
            ChunkSum {
                len: 2000,
                digest: [2; 32],
            },
        ]
        .into();
        let d = Description {
            chunks: chunks.clone(),
            digest: Some([3; 32]),
            values: Some(vec![[4; 32]].into()),
        };
        kept.remember_on_disk(key, 4096, &d);
        // A later run holds nothing in memory: the disk has it.
        let later = Descriptions::on_disk(dir.path().join("described")).unwrap();
        assert!(later.recall(&key, 4096).is_some(), "found by a later run");
        let back = recall_from_disk(disk, &key, 4096).expect("kept");
        assert_eq!(&back.chunks[..], &chunks[..]);
        assert_eq!(back.digest, Some([3; 32]));
        assert_eq!(back.values.as_deref(), Some(&[[4u8; 32]][..]));
        assert!(recall_from_disk(disk, &key, 8192).is_none(), "another cut");

        // Damaged on disk: not used.
        let entry = disk_entry(disk, &key);
        let mut bytes = std::fs::read(&entry).unwrap();
        bytes[5] ^= 1;
        std::fs::write(&entry, &bytes).unwrap();
        assert!(recall_from_disk(disk, &key, 4096).is_none(), "damaged");

        // Written to since: another version, not used.
        kept.remember_on_disk(key, 4096, &d);
        file.write_all(b"more").unwrap();
        let now = FileKey::of(&file).unwrap();
        assert!(recall_from_disk(disk, &now, 4096).is_none(), "changed");
        kept.forget(&key);
        assert!(!entry.exists(), "forgotten");

        // Bounded: the oldest go.
        for i in 0..DISK_ENTRIES as u64 + 5 {
            let other = FileKey {
                ino: key.ino + 1_000_000 + i,
                ..key
            };
            kept.remember_on_disk(other, 4096, &d);
        }
        assert_eq!(std::fs::read_dir(disk).unwrap().count(), DISK_ENTRIES);
    }

    #[test]
    fn each_handle_keeps_its_own_and_none_keeps_nothing() {
        let file = tempfile::tempfile().unwrap();
        file.set_len(1 << 20).unwrap();
        let key = FileKey::of(&file).unwrap();
        let d = Description {
            chunks: vec![ChunkSum {
                len: 1 << 20,
                digest: [1; 32],
            }]
            .into(),
            digest: None,
            values: None,
        };
        let (one, other, none) = (
            Descriptions::in_memory(),
            Descriptions::in_memory(),
            Descriptions::default(),
        );
        one.remember(key, 1 << 18, d.clone());
        none.remember(key, 1 << 18, d);
        assert!(
            one.clone().recall(&key, 1 << 18).is_some(),
            "a clone shares"
        );
        assert!(
            other.recall(&key, 1 << 18).is_none(),
            "another handle does not"
        );
        assert!(none.recall(&key, 1 << 18).is_none(), "none keeps nothing");
        assert!(!none.receivers_keep() && !none.keeping());
        one.forget(&key);
        assert!(one.recall(&key, 1 << 18).is_none(), "forgotten");
        assert_eq!(
            one.held().unwrap().chunks,
            0,
            "its chunks are no longer counted"
        );
    }
}

//! The local root's cache of BLAKE3 digests for --checksum, keyed by device, inode, size, mtime and ctime.

use std::io;

use cap_std::fs::{Dir, OpenOptions, OpenOptionsExt};

use crate::files;
use crate::paths::RemotePath;
use crate::protocol::{Digest, RemoteError};

use super::*;

/// The digests this server hashed for `--checksum`, by device and inode,
/// each valid while the file's size, mtime and ctime stay as they were
/// (any write moves the ctime, even one that puts the mtime back), so an
/// unchanged tree is hashed once per server run, not once per re-sync.
/// Emptied when it reaches [`DIGEST_CACHE`] entries (about 8 MB).
#[derive(Debug, Default)]
pub(super) struct DigestCache(
    std::sync::Mutex<std::collections::HashMap<(u64, u64), (Stamp, Digest)>>,
);

/// Size, mtime and ctime: what tells a file's versions apart without reading it.
pub(super) type Stamp = (u64, (i64, i64), (i64, i64));

pub(super) const DIGEST_CACHE: usize = 100_000;

pub(super) fn stamp(md: &std::fs::Metadata) -> Stamp {
    use std::os::unix::fs::MetadataExt;
    (
        md.len(),
        (md.mtime(), md.mtime_nsec()),
        (md.ctime(), md.ctime_nsec()),
    )
}

/// The digest of the regular file `p` (None if there is none), from the
/// cache while the file is as it was when hashed. Blocking.
pub(super) fn digest_of(
    root: &Dir,
    p: &RemotePath,
    cache: &DigestCache,
) -> Result<Option<Digest>, RemoteError> {
    let mut opts = OpenOptions::new();
    opts.read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY);
    let mut file = match root.open_with(p.relative(), &opts) {
        Ok(f) => f.into_std(),
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(fs_error(&e, p, "cannot open")),
    };
    let reading = |e: io::Error| fs_error(&e, p, "cannot read");
    let md = file.metadata().map_err(reading)?;
    if !md.is_file() {
        return Ok(None);
    }
    cached_digest(&mut file, &md, cache)
        .map(Some)
        .map_err(reading)
}

/// The digest of the open regular `file` (whose metadata is `md`), from
/// the cache while the file is as it was when hashed. Blocking.
pub(super) fn cached_digest(
    file: &mut std::fs::File,
    md: &std::fs::Metadata,
    cache: &DigestCache,
) -> io::Result<Digest> {
    use std::os::unix::fs::MetadataExt;
    let (key, before) = ((md.dev(), md.ino()), stamp(md));
    let held = cache.0.lock().unwrap_or_else(|e| e.into_inner());
    if let Some((s, d)) = held.get(&key) {
        if *s == before {
            return Ok(*d);
        }
    }
    drop(held);
    let digest = files::file_digest(file)?;
    // Written to while it was read: the digest is of no version; the
    // client sends the file, which is what a changing file needs anyway.
    if stamp(&file.metadata()?) == before {
        cache.keep(key, before, digest);
    }
    Ok(digest)
}

impl DigestCache {
    pub(super) fn keep(&self, key: (u64, u64), stamp: Stamp, digest: Digest) {
        let mut held = self.0.lock().unwrap_or_else(|e| e.into_inner());
        if held.len() >= DIGEST_CACHE {
            held.clear();
        }
        held.insert(key, (stamp, digest));
    }
}

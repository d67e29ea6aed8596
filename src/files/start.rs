//! Where a transfer starts: the BLAKE3 state of a prefix both sides hold, for resume.

use std::fs::File;
use std::io::Read;

use crate::protocol::Digest;

/// Where a transfer starts: `offset` bytes already at the receiver, and the
/// BLAKE3 state after hashing them, so the final digest covers the whole file.
#[derive(Debug, Clone, Default)]
pub(crate) struct Start {
    /// Bytes already in place.
    pub offset: u64,
    /// BLAKE3 of those bytes, not finalized.
    pub hasher: blake3::Hasher,
}

impl Start {
    /// The digest of the prefix, for comparing with the peer's.
    pub(crate) fn prefix_digest(&self) -> Digest {
        *self.hasher.finalize().as_bytes()
    }
}

/// Hashes the first `len` bytes of `file` from its start, leaving the file
/// positioned at `len`. Fails if the file is shorter. Blocking.
pub(crate) fn hash_prefix(file: &mut File, len: u64) -> std::io::Result<Start> {
    use std::io::Seek;
    file.seek(std::io::SeekFrom::Start(0))?;
    let mut hasher = blake3::Hasher::new();
    let copied = std::io::copy(&mut (&mut *file).take(len), &mut hasher)?;
    if copied != len {
        return Err(std::io::Error::new(
            std::io::ErrorKind::UnexpectedEof,
            format!("expected {len} bytes, found {copied}"),
        ));
    }
    Ok(Start {
        offset: len,
        hasher,
    })
}

/// Where to continue a file of `size` bytes whose first `offset` bytes the
/// peer holds, hashing to `digest`: after them if ours hash the same, else
/// from the start. Leaves `file` positioned there. Blocking.
pub(crate) fn matching_start(
    file: &mut File,
    size: u64,
    offset: u64,
    digest: &Digest,
) -> std::io::Result<Start> {
    use std::io::Seek;
    if offset > 0 && offset <= size {
        if let Ok(start) = hash_prefix(file, offset) {
            if start.prefix_digest() == *digest {
                return Ok(start);
            }
        }
    }
    file.seek(std::io::SeekFrom::Start(0))?;
    Ok(Start::default())
}

/// The BLAKE3 of all of `file`. Blocking.
pub(crate) fn file_digest(file: &mut File) -> std::io::Result<Digest> {
    let len = file.metadata()?.len();
    Ok(hash_prefix(file, len)?.prefix_digest())
}

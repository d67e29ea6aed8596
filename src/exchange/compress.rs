//! zstd for blocks: pooled contexts, and the rule for when compressing a block pays.

use crate::protocol::BlockHeader;

use super::*;

/// zstd's level: 3 (its default) packs source code 5.8 to 1, within 12% of
/// zlib level 6 over a whole tree, at several times zlib's speed.
const ZSTD_LEVEL: i32 = 3;

/// A block saved less than this share of its size is sent raw: decompressing
/// it would cost more than the bytes saved.
const MIN_SAVING: usize = 16;

/// zstd contexts kept for reuse, and how many exist. A context at level 3
/// holds about 1.3 MB of tables; one per disk thread (the pool's threads
/// come and go) made 130 MB of them. Compression is CPU work, so a few, as
/// many as cores, is all that can run at once anyway.
struct ContextPool<T> {
    free: std::sync::Mutex<(Vec<T>, usize)>,
    returned: std::sync::Condvar,
}

impl<T> ContextPool<T> {
    const fn new() -> Self {
        Self {
            free: std::sync::Mutex::new((Vec::new(), 0)),
            returned: std::sync::Condvar::new(),
        }
    }

    /// Runs `f` with a context, made by `make` if fewer than the limit exist,
    /// else waiting for one to be returned. Blocking.
    fn with<R>(
        &self,
        make: impl FnOnce() -> std::io::Result<T>,
        f: impl FnOnce(&mut T) -> R,
    ) -> std::io::Result<R> {
        // Asked once: each ask is a system call (sched_getaffinity), and
        // this runs for every block compressed or unpacked, a small file's
        // included.
        static LIMIT: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
        let limit = *LIMIT.get_or_init(|| {
            std::thread::available_parallelism().map_or(2, |n| n.get().clamp(2, 8))
        });
        let mut ctx = {
            let mut free = self.free.lock().unwrap_or_else(|e| e.into_inner());
            loop {
                if let Some(ctx) = free.0.pop() {
                    break ctx;
                }
                if free.1 < limit {
                    free.1 += 1;
                    drop(free);
                    match make() {
                        Ok(ctx) => break ctx,
                        Err(e) => {
                            self.free.lock().unwrap_or_else(|e| e.into_inner()).1 -= 1;
                            return Err(e);
                        }
                    }
                }
                free = self.returned.wait(free).unwrap_or_else(|e| e.into_inner());
            }
        };
        let r = f(&mut ctx);
        self.free
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .0
            .push(ctx);
        self.returned.notify_one();
        Ok(r)
    }
}

static COMPRESSORS: ContextPool<zstd::bulk::Compressor<'static>> = ContextPool::new();
static DECOMPRESSORS: ContextPool<zstd::bulk::Decompressor<'static>> = ContextPool::new();

/// Compresses `raw` into a block (header and payload) if it shrinks by at
/// least 1/[`MIN_SAVING`]. Blocking (runs in the disk pool).
pub(super) fn compress_block(raw: &[u8]) -> Option<Vec<u8>> {
    let limit = raw.len() - raw.len() / MIN_SAVING;
    if limit == 0 {
        return None;
    }
    let mut out = vec![0u8; BlockHeader::LEN + limit];
    // A destination smaller than the input makes zstd give up as soon as
    // the output would not fit: incompressible data costs little.
    let n = COMPRESSORS
        .with(
            || zstd::bulk::Compressor::new(ZSTD_LEVEL),
            |z| z.compress_to_buffer(raw, &mut out[BlockHeader::LEN..]),
        )
        .ok()?
        .ok()?;
    let header = BlockHeader {
        compressed: true,
        raw_len: raw.len() as u32,
        wire_len: n as u32,
    };
    out[..BlockHeader::LEN].copy_from_slice(&header.encode());
    out.truncate(BlockHeader::LEN + n);
    out.shrink_to_fit();
    Some(out)
}

/// Decompresses a block's payload into exactly `raw_len` bytes. Blocking.
pub(super) fn decompress_block(payload: &[u8], raw_len: usize) -> Result<Vec<u8>, TransferError> {
    let mut out = vec![0u8; raw_len];
    // The buffer is the declared size: a block that would inflate past it
    // is an error, never an allocation.
    let n = DECOMPRESSORS
        .with(zstd::bulk::Decompressor::new, |z| {
            z.decompress_to_buffer(payload, &mut out)
        })
        .map_err(TransferError::Write)?
        .map_err(|e| {
            TransferError::Malformed(format!("a compressed block does not decode: {e}"))
        })?;
    if n != raw_len {
        return Err(TransferError::Malformed(format!(
            "a compressed block decoded to {n} bytes, not the {raw_len} announced"
        )));
    }
    Ok(out)
}

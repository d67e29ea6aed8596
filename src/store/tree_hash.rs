//! BLAKE3 of a file put together from the chaining values of its parts, so an object-store upload can be proven and verified without reading back what the store already holds.
//!
//! BLAKE3 is a binary tree over 1 KiB chunks. A run of chunks whose length
//! is a power of two, starting at a multiple of that length, is always a
//! subtree of the tree of any longer input, and its chaining value (the
//! subtree's non-root hash) depends only on its bytes and its offset. An
//! upload split into parts of one power-of-two size therefore needs only
//! each part's 32-byte chaining value to compute, later and on any server,
//! the BLAKE3 of any prefix that ends on a part boundary and of the whole
//! file. The pieces are combined exactly as BLAKE3 builds its tree: split
//! at the largest power of two below the length, recursively
//! ([`blake3::hazmat::left_subtree_len`]). The tests compare every result
//! with [`blake3::hash`] of the same bytes.

use blake3::hazmat::{self, ChainingValue, HasherExt, Mode};
use serde::{Deserialize, Serialize};

use crate::protocol::Digest;

/// A hashed stretch of a file: where it starts, how long it is, and its
/// chaining value. All but the last piece of a file are one part size
/// long, a power of two of at least one chunk, and start at a multiple of
/// it; the last may be shorter.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Piece {
    pub(crate) offset: u64,
    pub(crate) len: u64,
    pub(crate) cv: ChainingValue,
}

/// [`hash_piece_of`] for a piece held in one slice.
#[cfg(test)]
pub(crate) fn hash_piece(offset: u64, bytes: &[u8]) -> (Piece, Option<Digest>) {
    hash_piece_of(offset, [bytes])
}

/// Hashes the bytes of one piece (never empty), which are the bytes of
/// `chunks` in order (an object store's part as the network delivered
/// it). With offset 0 it also returns the piece's own BLAKE3, which is the
/// file's when the file is this one piece (a chaining value cannot stand
/// for a root).
pub(crate) fn hash_piece_of<'a>(
    offset: u64,
    chunks: impl IntoIterator<Item = &'a [u8]>,
) -> (Piece, Option<Digest>) {
    let mut hasher = blake3::Hasher::new();
    if offset > 0 {
        hasher.set_input_offset(offset);
    }
    let mut len = 0;
    for chunk in chunks {
        hasher.update(chunk);
        len += chunk.len() as u64;
    }
    assert!(len > 0, "a piece holds at least one byte");
    let piece = Piece {
        offset,
        len,
        cv: hasher.finalize_non_root(),
    };
    let root = (offset == 0).then(|| *hasher.finalize().as_bytes());
    (piece, root)
}

/// The BLAKE3 of the bytes the pieces cover, which must tile `[0, end)` in
/// order. `first_root` is the first piece's own BLAKE3 (from
/// [`hash_piece_of`]), used when it is the only piece. No pieces: the empty
/// input.
pub(crate) fn digest(pieces: &[Piece], first_root: Option<Digest>) -> Option<Digest> {
    match pieces {
        [] => Some(*blake3::hash(b"").as_bytes()),
        [_] => first_root,
        [first, .., last] => {
            let len = last.offset + last.len;
            let (left, right) = split(pieces, first.offset, len);
            Some(*hazmat::merge_subtrees_root(&left, &right, Mode::Hash).as_bytes())
        }
    }
}

/// The chaining values of the two halves of `[start, start + len)`.
fn split(pieces: &[Piece], start: u64, len: u64) -> (ChainingValue, ChainingValue) {
    let left = hazmat::left_subtree_len(len);
    let at = pieces.partition_point(|p| p.offset < start + left);
    (
        subtree(&pieces[..at], start, left),
        subtree(&pieces[at..], start + left, len - left),
    )
}

/// The chaining value of the subtree `[start, start + len)`.
fn subtree(pieces: &[Piece], start: u64, len: u64) -> ChainingValue {
    match pieces {
        [only] => {
            debug_assert_eq!((only.offset, only.len), (start, len), "pieces out of line");
            only.cv
        }
        _ => {
            let (left, right) = split(pieces, start, len);
            hazmat::merge_subtrees_non_root(&left, &right, Mode::Hash)
        }
    }
}

/// The part size for a file of `size` bytes: a power of two of at least
/// 8 MiB (S3 wants parts of 5 MiB or more, and BLAKE3 subtrees are powers
/// of two), doubled until the file fits in S3's 10,000 parts. Memory per
/// upload is three parts (see the object store), so up to 80 GiB it is 24 MiB.
pub(crate) fn part_size(size: u64) -> u64 {
    const MIN: u64 = 8 << 20;
    // Never wraps (the quotient is far below 2^63 for any u64); callers
    // bound the size before it sizes memory.
    MIN.max(size.div_ceil(MAX_PARTS).next_power_of_two())
}

/// S3's limit on the parts of one multipart upload.
pub(crate) const MAX_PARTS: u64 = 10_000;

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// Pieces of `part` bytes (a power of two of at least 1 KiB) over `data`.
    fn pieces(data: &[u8], part: usize) -> (Vec<Piece>, Option<Digest>) {
        let mut first = None;
        let pieces = data
            .chunks(part)
            .enumerate()
            .map(|(i, c)| {
                let (p, root) = hash_piece((i * part) as u64, c);
                first = first.or(root);
                p
            })
            .collect();
        (pieces, first)
    }

    #[test]
    fn edges_match_blake3() {
        for part in [1024usize, 2048, 8192] {
            for len in [
                0,
                1,
                1023,
                1024,
                1025,
                part - 1,
                part,
                part + 1,
                2 * part,
                3 * part + 7,
                5 * part,
                8 * part + 1,
            ] {
                let data: Vec<u8> = (0..len).map(|i| (i * 31 % 251) as u8).collect();
                let (p, first) = pieces(&data, part);
                assert_eq!(
                    digest(&p, first),
                    Some(*blake3::hash(&data).as_bytes()),
                    "len {len}, part {part}"
                );
            }
        }
    }

    proptest! {
        #[test]
        fn any_length_and_part_size_matches_blake3(len in 0usize..70_000, shift in 10u32..14, seed: u8) {
            let part = 1usize << shift;
            let data: Vec<u8> = (0..len).map(|i| (i as u8).wrapping_mul(seed | 1)).collect();
            let (p, first) = pieces(&data, part);
            prop_assert_eq!(digest(&p, first), Some(*blake3::hash(&data).as_bytes()));
            // Every prefix ending on a part boundary, from the same pieces.
            for m in 1..=p.len() {
                let end = (m * part).min(len);
                prop_assert_eq!(digest(&p[..m], first), Some(*blake3::hash(&data[..end]).as_bytes()));
            }
        }
    }

    #[test]
    fn part_sizes_are_powers_of_two_within_the_part_limit() {
        for size in [0, 1, 8 << 20, 80 << 30, (80 << 30) + 1, 5 << 40, u64::MAX] {
            let p = part_size(size);
            assert!(p.is_power_of_two() && p >= 8 << 20);
            assert!(size.div_ceil(p) <= MAX_PARTS, "{size}");
        }
        assert_eq!(part_size(1 << 30), 8 << 20);
    }
}

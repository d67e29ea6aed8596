//! A file's BLAKE3 from the chaining values of its 1 MiB blocks, so a receiver that knows the values of blocks it did not change need not read them again.
//!
//! BLAKE3 is a tree: the hash of a file is the root of a binary tree over
//! its 1 KiB chunks in which every left subtree is a power of two long.
//! Every subtree of at least 1 MiB therefore splits at a multiple of 1 MiB,
//! so the root follows from the chaining values of the aligned 1 MiB blocks
//! (the last one possibly shorter), and a block's value depends only on its
//! bytes and where it sits. A file assembled by a delta in a clone of its
//! old version (`delta`'s `Patched`) keeps, for each block that an in-place
//! copy covers whole, the old version's value, and hashes only the others.
//! The values of a file so made are remembered with its chunks
//! (`described`), which makes its next delta's check cost only the
//! changed blocks. What is hashed is the same function as [`blake3::hash`]:
//! the tests compare the two.

use blake3::hazmat::{
    left_subtree_len, merge_subtrees_non_root, merge_subtrees_root, ChainingValue, HasherExt, Mode,
};

use crate::protocol::Digest;

/// The block size: a power of two of at least BLAKE3's 1 KiB chunk.
pub(crate) const BLOCK: u64 = 1 << 20;

/// A file's bytes hashed in order, block by block; whole blocks may be
/// given by their value instead (in a file of more than one block).
pub(crate) struct Blocks {
    /// The file's final size.
    size: u64,
    /// The values of the whole blocks so far.
    values: Vec<ChainingValue>,
    /// The block being filled, and how many bytes it holds.
    current: blake3::Hasher,
    filled: u64,
    /// The first block's hasher, kept whole: a file of one block has no
    /// tree, and its hash is that hasher's root.
    first: Option<blake3::Hasher>,
}

impl Blocks {
    /// For a file of `size` bytes.
    pub(crate) fn new(size: u64) -> Self {
        Self {
            size,
            values: Vec::new(),
            current: blake3::Hasher::new(),
            filled: 0,
            first: None,
        }
    }

    /// Whether whole blocks may be given by value: the file has a tree
    /// (more than one block), whose root follows from the values.
    pub(crate) fn takes_values(&self) -> bool {
        self.size > BLOCK
    }

    /// Bytes taken so far.
    pub(crate) fn len(&self) -> u64 {
        self.values.len() as u64 * BLOCK + self.filled
    }

    /// Takes the next bytes of the file.
    pub(crate) fn update(&mut self, mut bytes: &[u8]) {
        while !bytes.is_empty() {
            let room = (BLOCK - self.filled) as usize;
            let n = room.min(bytes.len());
            self.current.update(&bytes[..n]);
            self.filled += n as u64;
            bytes = &bytes[n..];
            if self.filled == BLOCK {
                let value = self.current.finalize_non_root();
                if self.values.is_empty() {
                    self.first = Some(self.current.clone());
                }
                self.next_block(value);
            }
        }
    }

    /// Takes a whole block by its value (at a block boundary, in a file
    /// that [takes values](Self::takes_values)).
    pub(crate) fn push_value(&mut self, value: ChainingValue) {
        debug_assert_eq!(self.filled, 0, "a block's value at a block boundary");
        debug_assert!(self.takes_values());
        self.next_block(value);
    }

    /// Ends the current block with its value.
    fn next_block(&mut self, value: ChainingValue) {
        self.values.push(value);
        self.current = blake3::Hasher::new();
        self.current
            .set_input_offset(self.values.len() as u64 * BLOCK);
        self.filled = 0;
    }

    /// The values of the whole blocks so far.
    pub(crate) fn values(&self) -> &[ChainingValue] {
        &self.values
    }

    /// The BLAKE3 of all the bytes taken.
    pub(crate) fn finish(self) -> Digest {
        let len = self.len();
        if len <= BLOCK {
            // No tree above the first block: its own root.
            let h = match (self.values.is_empty(), self.first) {
                (true, _) => self.current,
                (false, first) => first.expect("a one-block file's block is hashed, not given"),
            };
            return *h.finalize().as_bytes();
        }
        let mut leaves = self.values;
        if self.filled > 0 {
            leaves.push(self.current.finalize_non_root());
        }
        let left = left_subtree_len(len);
        let n = (left / BLOCK) as usize;
        let (l, r) = (
            subtree(&leaves[..n], left),
            subtree(&leaves[n..], len - left),
        );
        *merge_subtrees_root(&l, &r, Mode::Hash).as_bytes()
    }
}

/// The value of the subtree of `len` bytes whose blocks' values are `leaves`.
fn subtree(leaves: &[ChainingValue], len: u64) -> ChainingValue {
    if len <= BLOCK {
        return leaves[0];
    }
    let left = left_subtree_len(len);
    let n = (left / BLOCK) as usize;
    let (l, r) = (
        subtree(&leaves[..n], left),
        subtree(&leaves[n..], len - left),
    );
    merge_subtrees_non_root(&l, &r, Mode::Hash)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The chaining value of the whole block `index`.
    fn block_value(index: u64, bytes: &[u8]) -> ChainingValue {
        let mut h = blake3::Hasher::new();
        h.set_input_offset(index * BLOCK);
        h.update(bytes);
        h.finalize_non_root()
    }

    #[test]
    fn the_hash_from_blocks_is_blake3_whatever_the_length() {
        let data = crate::exchange::tests::noise(5 * BLOCK as usize + 3000, 71);
        let b = BLOCK as usize;
        for len in [
            0,
            1,
            1024,
            1025,
            b - 1,
            b,
            b + 1,
            2 * b,
            2 * b + 1,
            3 * b,
            3 * b + 7,
            4 * b,
            5 * b + 3000,
        ] {
            let data = &data[..len];
            // In odd pieces.
            let mut blocks = Blocks::new(len as u64);
            for piece in data.chunks(333_333) {
                blocks.update(piece);
            }
            assert_eq!(
                blocks.finish(),
                *blake3::hash(data).as_bytes(),
                "{len} bytes"
            );
            // Whole blocks given by value where they can be (the first
            // too, as long as more follows).
            let mut blocks = Blocks::new(len as u64);
            for (i, block) in data.chunks(b).enumerate() {
                if block.len() == b && blocks.takes_values() {
                    blocks.push_value(block_value(i as u64, block));
                } else {
                    blocks.update(block);
                }
            }
            assert_eq!(
                blocks.finish(),
                *blake3::hash(data).as_bytes(),
                "{len} bytes, by value"
            );
        }
    }
}

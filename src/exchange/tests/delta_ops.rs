//! Deltas in memory: what crosses for edits and shifts, resumed and compressed deltas, and hostile ops and descriptions refused before they are acted on.

use std::sync::Arc;

use patching::*;

use crate::protocol::{BlockHeader, Digest, Encoding};

use super::*;

/// A file held in memory, streamed in pieces of 100,000 bytes (as an
/// object store streams a ranged read in pieces of its own size).
pub(super) struct Mem(pub(super) bytes::Bytes);

#[async_trait::async_trait]
impl ByteSource for Mem {
    async fn range(&self, from: u64, to: u64) -> std::io::Result<ByteStream> {
        use futures::StreamExt;
        let end = (to as usize).min(self.0.len());
        let b = self.0.slice((from as usize).min(end)..end);
        let pieces: Vec<std::io::Result<bytes::Bytes>> = b
            .chunks(100_000)
            .map(|c| Ok(bytes::Bytes::copy_from_slice(c)))
            .collect();
        Ok(futures::stream::iter(pieces).boxed())
    }
}

/// Bytes that look random (content-defined chunking needs variety).
pub(crate) fn noise(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

pub(super) const DELTA_FRAMING: Framing = Framing {
    encoding: Encoding::Delta,
    compress: Compressing::No,
};

/// Runs a whole delta in memory: `old` describes itself, `new` (the
/// receiver holding its first `start` bytes) is sent against it and
/// assembled. The bytes made, the sender's digest, and what crossed.
pub(super) async fn delta_of(old: &[u8], new: &[u8], start: u64) -> (Vec<u8>, Digest, DeltaSent) {
    let (old_src, new_src) = (
        Mem(bytes::Bytes::copy_from_slice(old)),
        Mem(bytes::Bytes::copy_from_slice(new)),
    );
    let size = old.len() as u64;
    let cutter = Cutter::for_size(size);
    let mut described = Vec::new();
    send_chunks(&old_src, size, cutter, &mut described)
        .await
        .unwrap();
    let (ops, digest, sent) =
        send_against(&described, size, cutter, &new_src, new.len() as u64, start).await;
    let mut made = Vec::new();
    let expect = new.len() as u64 - start;
    let got = assemble(
        &mut &ops[..],
        &old_src,
        size,
        expect,
        &mut made,
        None,
        &|_| {},
        &|_| {},
    )
    .await
    .unwrap();
    assert_eq!(got, sent, "both ends count the same copies and new bytes");
    assert_eq!(sent.copied + sent.literal, expect);
    (made, digest, sent)
}

/// The changes the delta tests make to `old` (8 MiB of noise): what, the
/// new version, and how many of its bytes are new (at most).
pub(super) fn edits_of(old: &[u8]) -> Vec<(&'static str, Vec<u8>, usize)> {
    const MIB: usize = 1 << 20;
    let mut small = old.to_vec();
    for at in [MIB / 3, 3 * MIB, 5 * MIB + 77, 7 * MIB] {
        small[at..at + 1000].copy_from_slice(&noise(1000, at as u64));
    }
    vec![
        ("unchanged", old.to_vec(), 0),
        (
            "1 MiB rewritten in the middle",
            [&old[..3 * MIB], &noise(MIB, 2), &old[4 * MIB..]].concat(),
            MIB,
        ),
        (
            "100 bytes inserted at the start",
            [&noise(100, 3), old].concat(),
            100,
        ),
        (
            "100 bytes inserted in the middle",
            [&old[..5 * MIB], &noise(100, 4), &old[5 * MIB..]].concat(),
            100,
        ),
        (
            "10 KiB deleted in the middle",
            [&old[..2 * MIB], &old[2 * MIB + 10_240..]].concat(),
            0,
        ),
        ("four small edits", small, 4 * 1000),
        ("grown", [old, &noise(MIB, 5)].concat(), MIB),
        ("shrunk", old[..5 * MIB].to_vec(), 0),
        (
            "the first half moved to the end",
            [&old[4 * MIB..], &old[..4 * MIB]].concat(),
            0,
        ),
        ("all new", noise(3 * MIB, 6), 3 * MIB),
        ("emptied", Vec::new(), 0),
    ]
}

/// The most new bytes a delta of the change `what` (of `changed` bytes)
/// may send: the chunks each edit touches, at most two of the largest
/// (4 x 16 KiB here) around it.
pub(super) fn allowed(what: &str, changed: usize) -> u64 {
    let edits = if what == "four small edits" { 4 } else { 1 };
    (changed + edits * 2 * 64 * 1024) as u64
}

#[tokio::test]
pub(super) async fn a_delta_sends_only_what_changed_whatever_moved() {
    let old = noise(8 << 20, 1);
    for (what, new, changed) in edits_of(&old) {
        let (made, digest, sent) = delta_of(&old, &new, 0).await;
        assert!(made == new, "{what}: the assembled file differs");
        assert_eq!(digest, *blake3::hash(&new).as_bytes(), "{what}");
        assert!(
            sent.literal <= allowed(what, changed),
            "{what}: {} new bytes for a change of {changed}",
            sent.literal
        );
    }
    let all_new = noise(3 << 20, 6);
    let (made, _, sent) = delta_of(&[], &all_new, 0).await;
    assert!(
        made == all_new && sent.copied == 0,
        "no old version: all new"
    );
}

#[tokio::test]
pub(super) async fn a_resumed_delta_makes_only_the_rest_and_still_hashes_the_whole() {
    let old = noise(4 << 20, 7);
    let new = [&old[..1 << 20], &noise(5000, 8), &old[1 << 20..]].concat();
    for start in [
        0,
        1,
        1 << 20,
        (1 << 20) + 2500,
        new.len() as u64 as usize - 3,
    ] {
        let (made, digest, _) = delta_of(&old, &new, start as u64).await;
        assert!(made == new[start..], "from {start}");
        assert_eq!(digest, *blake3::hash(&new).as_bytes());
    }
}

#[tokio::test]
pub(super) async fn compressed_new_blocks_of_a_delta_assemble() {
    let old = noise(2 << 20, 9);
    let text = b"the same line of text, again and again\n".repeat(30_000);
    let new = [&old[..1 << 20], &text[..], &old[1 << 20..]].concat();
    let mut ops = Vec::new();
    let (old_src, new_src) = (
        Mem(bytes::Bytes::from(old.clone())),
        Mem(bytes::Bytes::from(new.clone())),
    );
    let cutter = Cutter::for_size(old.len() as u64);
    let mut described = Vec::new();
    send_chunks(&old_src, old.len() as u64, cutter, &mut described)
        .await
        .unwrap();
    let base = crate::protocol::DeltaBase {
        size: old.len() as u64,
        avg_chunk: cutter.avg(),
    };
    let index = read_chunks(&mut &described[..], base).await.unwrap();
    let framing = Framing {
        encoding: Encoding::Delta,
        compress: Compressing::Yes,
    };
    let (_, sent) = send_delta(
        &new_src,
        new.len() as u64,
        0,
        Arc::new(index),
        framing,
        None,
        &mut ops,
        &|_| {},
        &|_| {},
    )
    .await
    .unwrap();
    assert!(
        (ops.len() as u64) < sent.literal / 10,
        "{} bytes of ops for {} new bytes",
        ops.len(),
        sent.literal
    );
    let mut made = Vec::new();
    assemble(
        &mut &ops[..],
        &old_src,
        old.len() as u64,
        new.len() as u64,
        &mut made,
        None,
        &|_| {},
        &|_| {},
    )
    .await
    .unwrap();
    assert!(made == new);
}

/// Delta ops as a hostile sender would write them.
pub(super) fn ops(list: &[crate::protocol::DeltaOp]) -> Vec<u8> {
    list.iter()
        .flat_map(|op| crate::protocol::encode(op).unwrap())
        .collect()
}

#[tokio::test]
pub(super) async fn a_hostile_delta_is_refused_before_it_is_acted_on() {
    use crate::protocol::DeltaOp::{Block, Copy, End};
    let old = Mem(bytes::Bytes::from(noise(1000, 10)));
    let run = |wire: Vec<u8>, expect: u64| {
        let old = &old;
        async move {
            let mut made = Vec::new();
            let r = assemble(
                &mut &wire[..],
                old,
                1000,
                expect,
                &mut made,
                None,
                &|_| {},
                &|_| {},
            )
            .await;
            (r, made)
        }
    };
    let cases: Vec<(&str, Vec<u8>, u64, &str)> = vec![
        (
            "past the old version",
            ops(&[
                Copy {
                    from: 900,
                    len: 200,
                },
                End,
            ]),
            200,
            "copy of 200 bytes at 900",
        ),
        (
            "overflowing",
            ops(&[
                Copy {
                    from: u64::MAX,
                    len: 2,
                },
                End,
            ]),
            2,
            "copy of 2 bytes",
        ),
        (
            "empty copy",
            ops(&[Copy { from: 0, len: 0 }, End]),
            0,
            "copy of 0 bytes",
        ),
        (
            "more than announced",
            ops(&[Copy { from: 0, len: 600 }, End]),
            500,
            "more than the 500 bytes",
        ),
        (
            "short",
            ops(&[Copy { from: 0, len: 100 }, End]),
            500,
            "after 100 of 500",
        ),
        (
            "no end",
            ops(&[Copy { from: 0, len: 100 }]),
            100,
            "connection",
        ),
        (
            "a block cut off",
            [ops(&[Block]), vec![0, 0, 0, 0, 9, 0, 0, 0, 9, 1]].concat(),
            9,
            "broke off inside a block",
        ),
        (
            "a bad block",
            [ops(&[Block]), vec![7; 9]].concat(),
            9,
            "unknown block kind",
        ),
        (
            "a block past the size",
            [
                ops(&[Block]),
                BlockHeader {
                    compressed: false,
                    raw_len: 10,
                    wire_len: 10,
                }
                .encode()
                .to_vec(),
                vec![1; 10],
                ops(&[End]),
            ]
            .concat(),
            5,
            "more than the 5 bytes",
        ),
    ];
    for (what, wire, expect, says) in cases {
        let (r, made) = run(wire, expect).await;
        let e = r.expect_err(what).to_string();
        assert!(e.contains(says), "{what}: {e}");
        assert!(
            made.len() as u64 <= expect,
            "{what}: nothing past the size was written"
        );
    }
}

#[tokio::test]
pub(super) async fn a_hostile_description_of_the_old_version_is_refused() {
    use crate::protocol::{encode, ChunkBatch, ChunkSum, DeltaBase, MAX_DELTA_CHUNKS};
    let base = |size| DeltaBase {
        size,
        avg_chunk: 16384,
    };
    let batch = |lens: &[u32], more| {
        encode(&ChunkBatch {
            chunks: lens
                .iter()
                .map(|&len| ChunkSum {
                    len,
                    digest: [len as u8; 32],
                })
                .collect(),
            more,
        })
        .unwrap()
    };
    let read = |wire: Vec<u8>, b: DeltaBase| async move {
        read_chunks(&mut &wire[..], b)
            .await
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default()
    };
    let bad_avg = DeltaBase {
        size: 10,
        avg_chunk: 20000,
    };
    assert!(read(batch(&[10], false), bad_avg)
        .await
        .contains("average chunk of 20000"));
    assert!(read(batch(&[70000], false), base(70000))
        .await
        .contains("a chunk of 70000"));
    assert!(read(batch(&[0], false), base(0))
        .await
        .contains("a chunk of 0"));
    assert!(read(batch(&[10, 10], false), base(15))
        .await
        .contains("past its 15"));
    assert!(read(batch(&[10], false), base(15))
        .await
        .contains("10 bytes for a version of 15"));
    assert!(read(batch(&[10], true), base(15))
        .await
        .contains("connection"));
    let many: Vec<u8> = (0..=MAX_DELTA_CHUNKS / 1024)
        .flat_map(|_| batch(&[1; 1024], true))
        .collect();
    assert!(read(many, base(1 << 30))
        .await
        .contains("more than 131072 chunks"));
}

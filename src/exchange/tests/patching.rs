//! Deltas against files on disk: described and cut from the file, patched into a clone of the old version, remembered between deltas, cut along the receiver's chunks.

use std::fs::File;
use std::io::Write;
use std::path::Path;
use std::sync::Arc;

use crate::protocol::Digest;

use super::*;

/// What these tests remember of their files' chunks, as a server's store
/// would: one cache for them all (each test uses files of its own).
fn kept() -> Descriptions {
    static KEPT: std::sync::LazyLock<Descriptions> =
        std::sync::LazyLock::new(Descriptions::in_memory);
    KEPT.clone()
}

/// Describes the local file `path` as a receiver does (through the
/// descriptions cache): the chunks it sends.
pub(super) async fn describe_file(path: &Path, cutter: Cutter) -> Vec<crate::protocol::ChunkSum> {
    let (described, _) = described_file(path, cutter).await;
    let mut chunks = Vec::new();
    let mut input = &described[..];
    loop {
        let batch: crate::protocol::ChunkBatch =
            crate::protocol::read_frame(&mut input).await.unwrap();
        chunks.extend(batch.chunks);
        if !batch.more {
            return chunks;
        }
    }
}

/// The frames a receiver sends to describe the local file `path`, and its size.
pub(super) async fn described_file(path: &Path, cutter: Cutter) -> (Vec<u8>, u64) {
    let src = FileBytes::new(File::open(path).unwrap(), kept());
    let size = std::fs::metadata(path).unwrap().len();
    let mut described = Vec::new();
    send_chunks(&src, size, cutter, &mut described)
        .await
        .unwrap();
    (described, size)
}

/// A whole delta between two local files: the receiver describes `old`,
/// the sender cuts `new` and sends it against that. The ops, the
/// sender's digest, and what it sent.
pub(super) async fn delta_between(
    old: &Path,
    new: &Path,
    cutter: Cutter,
) -> (Vec<u8>, Digest, DeltaSent) {
    let (described, size) = described_file(old, cutter).await;
    let new_src = FileBytes::new(File::open(new).unwrap(), kept());
    let new_len = std::fs::metadata(new).unwrap().len();
    send_against(&described, size, cutter, &new_src, new_len, 0).await
}

/// The sender's side of a delta of `new_src` (`new_len` bytes, the
/// receiver holding its first `start`) against the receiver's version of
/// `old_size` bytes that `described` describes: the ops, the sender's
/// digest, and what it sent.
pub(super) async fn send_against(
    described: &[u8],
    old_size: u64,
    cutter: Cutter,
    new_src: &dyn ByteSource,
    new_len: u64,
    start: u64,
) -> (Vec<u8>, Digest, DeltaSent) {
    let base = crate::protocol::DeltaBase {
        size: old_size,
        avg_chunk: cutter.avg(),
    };
    let index = read_chunks(&mut &described[..], base).await.unwrap();
    let mut ops = Vec::new();
    let (digest, sent) = send_delta(
        new_src,
        new_len,
        start,
        Arc::new(index),
        DELTA_FRAMING,
        None,
        &mut ops,
        &|_| {},
        &|_| {},
    )
    .await
    .unwrap();
    (ops, digest, sent)
}

/// Makes `made` a copy of `old` (what a clone gives) and patches the new
/// version of `new_len` bytes into it from `ops`.
pub(super) async fn patch_copy(
    old: &Path,
    made: &Path,
    ops: &[u8],
    new_len: u64,
    cutter: Cutter,
) -> Result<Cloned, TransferError> {
    std::fs::copy(old, made).unwrap();
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(made)
        .unwrap();
    let old_src = FileBytes::new(File::open(old).unwrap(), kept());
    assemble_patched(
        &mut &ops[..],
        &old_src,
        std::fs::metadata(old).unwrap().len(),
        Arc::new(file),
        new_len,
        cutter,
        None,
        &|_| {},
        &|_| {},
        std::future::pending(),
    )
    .await
}

#[tokio::test]
pub(super) async fn a_delta_patched_into_a_copy_of_the_old_version_makes_the_new_and_tells_its_chunks(
) {
    // What a filesystem that shares data does with a clone is what a copy
    // of the old file's bytes gives here: the same start for the patching.
    let dir = tempfile::tempdir().unwrap();
    let old = noise(8 << 20, 11);
    let cutter = Cutter::for_size(old.len() as u64);
    for (i, (what, new, _)) in edits_of(&old).into_iter().enumerate() {
        let path = |name: &str| dir.path().join(format!("{name}{i}"));
        std::fs::write(path("old"), &old).unwrap();
        std::fs::write(path("new"), &new).unwrap();
        let (ops, digest, sent) = delta_between(&path("old"), &path("new"), cutter).await;
        let got = patch_copy(&path("old"), &path("made"), &ops, new.len() as u64, cutter)
            .await
            .unwrap();
        assert!(
            std::fs::read(path("made")).unwrap() == new,
            "{what}: the file made differs"
        );
        assert_eq!(got.sent, sent, "{what}");
        assert_eq!(got.received.size, new.len() as u64, "{what}");
        assert_eq!(got.received.digest, digest, "{what}");
        assert_eq!(digest, *blake3::hash(&new).as_bytes(), "{what}");
        // The chunks it tells are the new version's as a cut of it finds.
        let told = got.described.expect("the chunks of an honest delta");
        let fresh = describe_file(&path("new"), cutter).await;
        assert!(
            told.chunks[..] == fresh[..],
            "{what}: other chunks than a cut finds"
        );
        assert_eq!(told.digest, Some(digest));
    }
}

#[tokio::test]
pub(super) async fn a_patched_delta_cut_short_leaves_a_prefix_of_the_new_version() {
    const MIB: usize = 1 << 20;
    let dir = tempfile::tempdir().unwrap();
    let old = noise(4 * MIB, 21);
    let new = [&old[..MIB], &noise(MIB, 22), &old[2 * MIB..]].concat();
    let path = |name: &str| dir.path().join(name);
    std::fs::write(path("old"), &old).unwrap();
    std::fs::write(path("new"), &new).unwrap();
    let cutter = Cutter::for_size(old.len() as u64);
    let (ops, _, _) = delta_between(&path("old"), &path("new"), cutter).await;
    // The connection breaks a little past the new block.
    let cut_at = ops.len() * 2 / 3;
    let err = patch_copy(
        &path("old"),
        &path("made"),
        &ops[..cut_at],
        new.len() as u64,
        cutter,
    )
    .await
    .err()
    .expect("a delta cut short fails");
    assert!(
        matches!(
            err,
            TransferError::Truncated { .. } | TransferError::Malformed(_)
        ),
        "{err}"
    );
    let held = std::fs::read(path("made")).unwrap();
    assert!(
        !held.is_empty() && held.len() < new.len(),
        "{} bytes held",
        held.len()
    );
    assert!(
        held == new[..held.len()],
        "what is held is a prefix of the new version"
    );
}

#[tokio::test]
pub(super) async fn a_remembered_description_is_used_only_while_the_file_is_unchanged() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("f");
    let data = noise(3 << 20, 31);
    std::fs::write(&path, &data).unwrap();
    let cutter = Cutter::for_size(data.len() as u64);
    let first = describe_file(&path, cutter).await;
    assert_eq!(describe_file(&path, cutter).await, first, "recalled as cut");
    // Rewritten in place with its size and mtime kept: the ctime moved,
    // so the file is cut again.
    let mtime = std::fs::metadata(&path).unwrap().modified().unwrap();
    let changed = [
        &data[..1 << 20],
        &noise(4096, 32),
        &data[(1 << 20) + 4096..],
    ]
    .concat();
    {
        let mut f = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
        f.write_all(&changed).unwrap();
        f.set_modified(mtime).unwrap();
    }
    let again = describe_file(&path, cutter).await;
    assert_ne!(again, first);
    let copy = dir.path().join("copy");
    std::fs::write(&copy, &changed).unwrap();
    assert_eq!(
        again,
        describe_file(&copy, cutter).await,
        "the changed file's own chunks"
    );
}

#[tokio::test]
pub(super) async fn a_delta_cut_along_the_receivers_chunks_sends_only_what_changed() {
    // What a sender does when the description arrives first: hash its
    // bytes at the receiver's chunks, and cut only where they differ.
    let old = noise(8 << 20, 41);
    let old_src = Mem(bytes::Bytes::copy_from_slice(&old));
    let size = old.len() as u64;
    let cutter = Cutter::for_size(size);
    let mut described = Vec::new();
    send_chunks(&old_src, size, cutter, &mut described)
        .await
        .unwrap();
    for (what, new, changed) in edits_of(&old) {
        let base = crate::protocol::DeltaBase {
            size,
            avg_chunk: cutter.avg(),
        };
        let index = read_chunks(&mut &described[..], base).await.unwrap();
        let new_src = Mem(bytes::Bytes::copy_from_slice(&new));
        let cut = cut_along(&new_src, new.len() as u64, &index).await.unwrap();
        let (made, digest, sent) = send_and_assemble(&old_src, &new_src, cut, &index, size).await;
        assert_eq!(digest, *blake3::hash(&new).as_bytes(), "{what}");
        assert!(made == new, "{what}: the assembled file differs");
        assert!(
            sent.literal <= allowed(what, changed),
            "{what}: {} new bytes for a change of {changed}",
            sent.literal
        );
    }
}

/// Sends `new_src` as `cut` against `index` (the receiver's `old_src` of
/// `old_size` bytes) and assembles it: the bytes made, the sender's
/// digest, and what crossed (both ends counting the same).
pub(super) async fn send_and_assemble(
    old_src: &Mem,
    new_src: &Mem,
    cut: Cut,
    index: &BaseIndex,
    old_size: u64,
) -> (Vec<u8>, Digest, DeltaSent) {
    let mut ops = Vec::new();
    let (digest, sent) = send_cut(
        new_src,
        cut,
        0,
        index,
        DELTA_FRAMING,
        None,
        &mut ops,
        &|_| {},
        &|_| {},
    )
    .await
    .unwrap();
    let mut made = Vec::new();
    let got = assemble(
        &mut &ops[..],
        old_src,
        old_size,
        new_src.0.len() as u64,
        &mut made,
        None,
        &|_| {},
        &|_| {},
    )
    .await
    .unwrap();
    assert_eq!(got, sent, "both ends count the same copies and new bytes");
    (made, digest, sent)
}

#[tokio::test]
pub(super) async fn a_version_described_in_halves_still_makes_small_deltas() {
    const MIB: usize = 1 << 20;
    let old = noise(8 * MIB, 51);
    let size = old.len() as u64;
    let cutter = Cutter::for_size(size);
    let old_src = Mem(bytes::Bytes::copy_from_slice(&old));
    let mut described = Vec::new();
    send_chunks_halving(&old_src, size, cutter, &mut described, MIB as u64)
        .await
        .unwrap();
    let base = crate::protocol::DeltaBase {
        size,
        avg_chunk: cutter.avg(),
    };
    let index = read_chunks(&mut &described[..], base).await.unwrap();
    let (mut input, mut at, mut bounds) = (&described[..], 0, Vec::new());
    loop {
        let batch: crate::protocol::ChunkBatch =
            crate::protocol::read_frame(&mut input).await.unwrap();
        for c in &batch.chunks {
            at += u64::from(c.len);
            bounds.push(at);
        }
        if !batch.more {
            break;
        }
    }
    assert!(
        bounds.contains(&(size / 2)),
        "the halves meet at a chunk boundary"
    );
    assert_eq!(at, size);
    // An edit either side of the middle, sent by a sender that cuts its
    // own file and by one that follows the description.
    let mut new = old.clone();
    new[MIB..MIB + 500].copy_from_slice(&noise(500, 52));
    new[6 * MIB..6 * MIB + 500].copy_from_slice(&noise(500, 53));
    let index = Arc::new(index);
    let new_src = Mem(bytes::Bytes::copy_from_slice(&new));
    let cut = cut_along(&new_src, size, &index).await.unwrap();
    for (how, cut) in [
        ("along", cut),
        ("own cut", cut_source(&new_src, size, cutter).await.unwrap()),
    ] {
        let (made, _, sent) = send_and_assemble(&old_src, &new_src, cut, &index, size).await;
        assert!(made == new, "{how}: the assembled file differs");
        // Two edits of at most two chunks each, and for the sender's own
        // cut the chunks it sees differently around the middle.
        let most = if how == "along" { 4 } else { 8 } * 64 * 1024;
        assert!(sent.literal <= most, "{how}: {} new bytes", sent.literal);
    }
}

#[tokio::test]
pub(super) async fn a_second_patched_delta_builds_on_what_the_first_remembered() {
    // The server remembers a file made by a delta with its chunks and its
    // blocks' values; the next delta against it takes the blocks it
    // leaves in place by value and must still make the right file.
    const MIB: usize = 1 << 20;
    let dir = tempfile::tempdir().unwrap();
    let v1 = noise(5 * MIB + 12_345, 61);
    let v2 = [
        &v1[..2 * MIB + 100],
        &noise(3000, 62),
        &v1[2 * MIB + 3100..],
    ]
    .concat();
    let v3 = [
        &v2[..4 * MIB + 7],
        &noise(200_000, 63),
        &v2[4 * MIB + 200_007..],
    ]
    .concat();
    let cutter = Cutter::for_size(v1.len() as u64);
    let mut old_path = dir.path().join("v1");
    std::fs::write(&old_path, &v1).unwrap();
    for (i, new) in [&v2, &v3].into_iter().enumerate() {
        let new_path = dir.path().join(format!("new{i}"));
        let made_path = dir.path().join(format!("made{i}"));
        std::fs::write(&new_path, new).unwrap();
        let (ops, _, _) = delta_between(&old_path, &new_path, cutter).await;
        let got = patch_copy(&old_path, &made_path, &ops, new.len() as u64, cutter)
            .await
            .unwrap();
        assert!(std::fs::read(&made_path).unwrap() == *new, "delta {i}");
        assert_eq!(
            got.received.digest,
            *blake3::hash(new).as_bytes(),
            "delta {i}"
        );
        let told = got.described.expect("told");
        assert_eq!(told.values.as_ref().map(|v| v.len()), Some(new.len() / MIB));
        // As the store does once the file is committed.
        let key = FileKey::of(&File::open(&made_path).unwrap()).unwrap();
        kept().remember(key, cutter.avg(), told);
        old_path = made_path;
    }
}

#[tokio::test]
async fn a_file_described_in_the_background_is_cut_as_a_receiver_cuts_it() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("f");
    let data = noise(5 << 20 | 1234, 21);
    std::fs::write(&path, &data).unwrap();
    let size = data.len() as u64;
    let cutter = Cutter::for_size(size);
    let kept = Descriptions::in_memory();
    let src = FileBytes::new(File::open(&path).unwrap(), kept.clone());
    assert!(
        blocking(move || describe_now(&src, size)).await,
        "described"
    );
    let src = FileBytes::new(File::open(&path).unwrap(), kept.clone());
    let d = src.recall(size, cutter.avg()).expect("remembered");
    assert_eq!(d.digest, Some(*blake3::hash(&data).as_bytes()));
    assert_eq!(d.values.as_ref().map(|v| v.len()), Some(5));
    // The same chunks a receiver that knew nothing of it would describe
    // (these tests' own cache never saw this file).
    let cut = describe_file(&path, cutter).await;
    assert!(cut
        .iter()
        .zip(d.chunks.iter())
        .all(|(a, b)| a.len == b.len && a.digest == b.digest));
    assert_eq!(cut.len(), d.chunks.len());
    // Known already: not read again.
    assert!(!blocking(move || describe_now(&src, size)).await);
    // Nothing is kept without a cache, nor of a file written to meanwhile.
    let none = FileBytes::new(File::open(&path).unwrap(), Descriptions::default());
    assert!(!blocking(move || describe_now(&none, size)).await);
    let other = Descriptions::in_memory();
    let changing = FileBytes::new(File::open(&path).unwrap(), other.clone());
    std::fs::OpenOptions::new()
        .append(true)
        .open(&path)
        .unwrap()
        .write_all(b"more")
        .unwrap();
    assert!(!blocking(move || describe_now(&changing, size)).await);
}

#[test]
fn a_description_made_as_bytes_pass_does_not_depend_on_their_pieces() {
    let data = noise(3 << 20 | 77, 22);
    let whole = {
        let mut d = Describer::new(data.len() as u64).unwrap();
        d.feed(&data);
        d.finish().unwrap()
    };
    let mut d = Describer::new(data.len() as u64).unwrap();
    for piece in data.chunks(65_537) {
        d.feed(piece);
    }
    let (avg, pieces) = d.finish().unwrap();
    assert_eq!(avg, whole.0);
    assert_eq!(pieces.digest, Some(*blake3::hash(&data).as_bytes()));
    assert_eq!(pieces.digest, whole.1.digest);
    assert_eq!(pieces.values.as_deref(), whole.1.values.as_deref());
    assert!(pieces
        .chunks
        .iter()
        .zip(whole.1.chunks.iter())
        .all(|(a, b)| a.len == b.len && a.digest == b.digest));
    // Short or long of the file: no description.
    let mut short = Describer::new(data.len() as u64).unwrap();
    short.feed(&data[..100]);
    assert!(short.finish().is_none());
    let mut long = Describer::new(10).unwrap();
    long.feed(&data[..11]);
    assert!(long.finish().is_none());
}

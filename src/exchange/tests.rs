//! Unit tests of sending, receiving and committing files through pipes.

use std::fs::File;
use std::io::Write;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, UNIX_EPOCH};

use cap_std::ambient_authority;
use cap_std::fs::Dir;
use tokio::io::AsyncWrite;

use crate::protocol::{BlockHeader, Digest, Encoding, FileMeta, MAX_BLOCK};

use super::*;
use crate::files::{group_sync, random_u64};

#[tokio::test]
async fn file_round_trips_through_a_pipe_with_matching_digests() {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src");
    let data: Vec<u8> = (0..3 * CHUNK + 17).map(|i| (i * 31 % 251) as u8).collect();
    std::fs::write(&src, &data).unwrap();
    let dest = dir.path().join("dest");
    let incoming = incoming_at(&dest).unwrap();
    let (_, got) = pipe(&src, Framing::RAW, incoming.file().unwrap()).await;
    got.unwrap();
    assert!(!dest.exists(), "nothing under the final name before commit");
    let meta = file_meta(&std::fs::metadata(&src).unwrap());
    incoming.commit(&meta, false).unwrap();
    assert_eq!(std::fs::read(&dest).unwrap(), data);
    assert_eq!(
        std::fs::metadata(&dest).unwrap().modified().unwrap(),
        std::fs::metadata(&src).unwrap().modified().unwrap()
    );
}

/// Sends the file `src` framed as `framing` through a pipe into `out`:
/// the bytes that crossed, and the receiver's digest (checked against
/// the sender's) or error.
async fn pipe(src: &Path, framing: Framing, out: File) -> (usize, Result<Digest, String>) {
    let encoding = framing.encoding;
    let size = std::fs::metadata(src).unwrap().len();
    let (mut a, mut b) = tokio::io::duplex(256 * 1024);
    let counted = std::sync::atomic::AtomicUsize::new(0);
    let (sent, got) = tokio::join!(
        async {
            let mut counting = CountingWriter(&mut a, &counted);
            let d = send_file(
                File::open(src).unwrap(),
                size,
                Start::default(),
                framing,
                None,
                &mut counting,
                &|_| {},
            )
            .await;
            drop(a);
            d
        },
        receive_file(
            &mut b,
            size,
            out,
            Start::default(),
            encoding,
            None,
            None,
            &|_| {},
            std::future::pending()
        )
    );
    let got = got.map(|r| r.digest).map_err(|e| e.to_string());
    if let Ok(digest) = &got {
        assert_eq!(sent.unwrap(), *digest, "both sides hash the file's bytes");
    }
    (counted.load(std::sync::atomic::Ordering::Relaxed), got)
}

/// Sends `data` framed as `framing` through a pipe and back into a file:
/// the bytes that crossed, and what the receiver made of them.
async fn through_pipe(data: &[u8], framing: Framing) -> (usize, Result<Vec<u8>, String>) {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src");
    std::fs::write(&src, data).unwrap();
    let out = File::create(dir.path().join("out")).unwrap();
    let (wire, got) = pipe(&src, framing, out).await;
    (
        wire,
        got.map(|_| std::fs::read(dir.path().join("out")).unwrap()),
    )
}

struct CountingWriter<'a, W>(&'a mut W, &'a std::sync::atomic::AtomicUsize);

impl<W: AsyncWrite + Unpin> AsyncWrite for CountingWriter<'_, W> {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        let r = std::pin::Pin::new(&mut *self.0).poll_write(cx, buf);
        if let std::task::Poll::Ready(Ok(n)) = &r {
            self.1.fetch_add(*n, std::sync::atomic::Ordering::Relaxed);
        }
        r
    }
    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut *self.0).poll_flush(cx)
    }
    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut *self.0).poll_shutdown(cx)
    }
}

#[tokio::test]
async fn blocks_compress_what_shrinks_and_send_the_rest_as_it_is() {
    let blocks = Framing {
        encoding: Encoding::Blocks,
        compress: Compressing::Yes,
    };
    // Text-like data shrinks several times over.
    let text: Vec<u8> = (0..3 * CHUNK + 5)
        .map(|i| b"fn main() { println!(\"hi\"); }\n"[i % 30])
        .collect();
    let (wire, back) = through_pipe(&text, blocks.clone()).await;
    assert_eq!(back.unwrap(), text);
    assert!(wire < text.len() / 4, "{wire} bytes for {}", text.len());
    // Random data does not: it goes raw, a header per block more.
    let random: Vec<u8> = (0..3 * CHUNK)
        .map(|i| (i as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15).to_be_bytes()[3])
        .collect();
    let (wire, back) = through_pipe(&random, blocks.clone()).await;
    assert_eq!(back.unwrap(), random);
    assert!(wire <= random.len() + 3 * BlockHeader::LEN, "{wire}");
    // Blocks without compression, and an empty file.
    let plain = Framing {
        encoding: Encoding::Blocks,
        compress: Compressing::No,
    };
    let (wire, back) = through_pipe(&text, plain).await;
    assert_eq!(back.unwrap(), text);
    assert_eq!(wire, text.len() + 4 * BlockHeader::LEN);
    assert_eq!(through_pipe(b"", blocks).await, (0, Ok(Vec::new())));
}

/// Feeds `wire` to a receiver expecting `size` bytes in blocks.
async fn receive_blocks(wire: &[u8], size: u64) -> Result<Vec<u8>, TransferError> {
    receive_encoded(wire, size, Encoding::Blocks).await
}

/// Receives `wire`, framed as `encoding`, into a file: what it holds.
async fn receive_encoded(
    wire: &[u8],
    size: u64,
    encoding: Encoding,
) -> Result<Vec<u8>, TransferError> {
    let dir = tempfile::tempdir().unwrap();
    let out = File::create(dir.path().join("out")).unwrap();
    let mut input = wire;
    let received = receive_file(
        &mut input,
        size,
        out,
        Start::default(),
        encoding,
        None,
        None,
        &|_| {},
        std::future::pending(),
    )
    .await?;
    let data = std::fs::read(dir.path().join("out")).unwrap();
    assert_eq!(received.size, data.len() as u64);
    assert_eq!(received.digest, *blake3::hash(&data).as_bytes());
    Ok(data)
}

/// Sends `input` as a pipe would through an in-memory stream, compressing
/// as `compress` says, and receives it with at most `most` bytes taken:
/// what the sender counted and hashed, and what the receiver kept.
async fn through_stream(
    input: Vec<u8>,
    compress: Compressing,
    most: u64,
) -> (
    Result<(u64, Digest), TransferError>,
    Result<Vec<u8>, TransferError>,
) {
    let (mut a, mut b) = tokio::io::duplex(64 * 1024);
    let framing = Framing {
        encoding: Encoding::Stream,
        compress,
    };
    let moved = std::sync::atomic::AtomicU64::new(0);
    // A real pipe, written in uneven pieces with a pause (longer than a
    // block waits for more) after the first few bytes.
    let (r, w) = rustix::pipe::pipe().unwrap();
    let (r, mut w) = (File::from(r), File::from(w));
    let writer = std::thread::spawn(move || {
        let (first, rest) = input.split_at(input.len().min(10));
        w.write_all(first).unwrap();
        std::thread::sleep(Duration::from_millis(30));
        for piece in rest.chunks(300_000) {
            w.write_all(piece).unwrap();
        }
    });
    let (sent, got) = tokio::join!(
        async {
            let sent = send_pipe(r, framing, None, &mut a, &|n| {
                moved.fetch_add(n, std::sync::atomic::Ordering::Relaxed);
            })
            .await;
            drop(a);
            sent
        },
        async {
            let mut wire = Vec::new();
            tokio::io::AsyncReadExt::read_to_end(&mut b, &mut wire)
                .await
                .unwrap();
            receive_encoded(&wire, most, Encoding::Stream).await
        }
    );
    writer.join().unwrap();
    if let Ok((size, _)) = &sent {
        assert_eq!(moved.into_inner(), *size, "progress counts every byte");
    }
    (sent, got)
}

#[tokio::test]
async fn data_of_unknown_length_arrives_whole_up_to_its_end_mark() {
    // Several chunks and a bit, plain and compressed; and nothing at all.
    let data = pattern_bytes(3 * CHUNK + 777);
    for compress in [Compressing::No, Compressing::Yes] {
        let (sent, got) = through_stream(data.clone(), compress, u64::MAX).await;
        let (size, digest) = sent.unwrap();
        assert_eq!(size, data.len() as u64);
        assert_eq!(digest, *blake3::hash(&data).as_bytes());
        assert!(got.unwrap() == data);
    }
    let (sent, got) = through_stream(Vec::new(), Compressing::No, u64::MAX).await;
    assert_eq!(sent.unwrap(), (0, *blake3::hash(b"").as_bytes()));
    assert!(got.unwrap().is_empty());
    // Exactly at the receiver's limit is fine; a byte more is refused.
    let (_, got) = through_stream(data.clone(), Compressing::No, data.len() as u64).await;
    assert!(got.unwrap() == data);
    let (_, got) = through_stream(data.clone(), Compressing::No, data.len() as u64 - 1).await;
    let err = got.unwrap_err();
    assert!(
        matches!(err, TransferError::TooLong { limit } if limit == data.len() as u64 - 1),
        "{err:?}"
    );
}

#[tokio::test]
async fn a_stream_without_its_end_mark_is_cut_and_marks_are_checked() {
    let block = |bytes: &[u8]| {
        let header = BlockHeader {
            compressed: false,
            raw_len: bytes.len() as u32,
            wire_len: bytes.len() as u32,
        };
        [&header.encode()[..], bytes].concat()
    };
    let stream =
        |wire: Vec<u8>| async move { receive_encoded(&wire, u64::MAX, Encoding::Stream).await };
    // Pauses are skipped; the end mark ends it.
    let wire = [
        BlockHeader::PAUSE.to_vec(),
        block(b"abc"),
        BlockHeader::PAUSE.to_vec(),
        block(b"de"),
        BlockHeader::END.to_vec(),
    ]
    .concat();
    assert_eq!(stream(wire).await.unwrap(), b"abcde");
    // The sender went away between blocks, or within one: cut, not done.
    for wire in [
        block(b"abc"),
        [block(b"abc"), block(b"defg")[..6].to_vec()].concat(),
        [block(b"abc"), BlockHeader::PAUSE[..4].to_vec()].concat(),
    ] {
        let err = stream(wire).await.unwrap_err();
        assert!(
            matches!(err, TransferError::StreamCut { got: 3 }),
            "{err:?}"
        );
    }
    // Data of a known size has no marks: an end or pause mark there is malformed.
    for mark in [BlockHeader::END, BlockHeader::PAUSE] {
        let wire = [block(b"ab"), mark.to_vec()].concat();
        let err = receive_blocks(&wire, 4).await.unwrap_err();
        assert!(matches!(err, TransferError::Malformed(_)), "{err:?}");
    }
}

/// `n` bytes of a pattern that compresses, though not to nothing.
fn pattern_bytes(n: usize) -> Vec<u8> {
    (0..n)
        .map(|i| ((i / 7) % 251) as u8 ^ (i % 3) as u8)
        .collect()
}

#[tokio::test]
async fn malformed_blocks_are_refused_without_inflating() {
    let header = |compressed, raw_len, wire_len| {
        BlockHeader {
            compressed,
            raw_len,
            wire_len,
        }
        .encode()
        .to_vec()
    };
    let bad = |r: Result<Vec<u8>, TransferError>| {
        assert!(matches!(r, Err(TransferError::Malformed(_))), "{r:?}");
    };
    // An unknown kind, an empty block, a block above the maximum, a raw
    // block whose lengths disagree, a "compressed" one no smaller.
    let mut unknown = header(false, 4, 4);
    unknown[0] = 7;
    bad(receive_blocks(&[unknown, b"abcd".to_vec()].concat(), 4).await);
    bad(receive_blocks(&header(false, 0, 0), 4).await);
    bad(receive_blocks(&header(false, MAX_BLOCK + 1, MAX_BLOCK + 1), 1 << 21).await);
    bad(receive_blocks(&[header(false, 4, 3), b"abc".to_vec()].concat(), 4).await);
    bad(receive_blocks(&[header(true, 4, 4), b"abcd".to_vec()].concat(), 4).await);
    // More data than the file's size.
    bad(receive_blocks(&[header(false, 8, 8), vec![1; 8]].concat(), 4).await);
    // A zstd frame of 1 MiB of zeros announced as 1 KiB: refused, and the
    // receiver never holds more than the 1 KiB it was told.
    let bomb = zstd::bulk::compress(&vec![0u8; CHUNK], 3).unwrap();
    let wire = [header(true, 1024, bomb.len() as u32), bomb].concat();
    bad(receive_blocks(&wire, 1024).await);
    // Garbage where a zstd frame should be.
    bad(receive_blocks(&[header(true, 100, 10), vec![0xAB; 10]].concat(), 100).await);
    // A stream that ends inside a block: truncated, not malformed.
    let r = receive_blocks(&[header(false, 4, 4), b"ab".to_vec()].concat(), 4).await;
    assert!(
        matches!(r, Err(TransferError::Truncated { got: 0, .. })),
        "{r:?}"
    );
    // And a well-formed one for contrast.
    let good = [header(false, 4, 4), b"abcd".to_vec()].concat();
    assert_eq!(receive_blocks(&good, 4).await.unwrap(), b"abcd");
}

#[tokio::test]
async fn truncated_stream_is_an_error_and_leaves_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let dest = dir.path().join("dest");
    let incoming = incoming_at(&dest).unwrap();
    let mut short: &[u8] = &[1, 2, 3];
    let err = receive_file(
        &mut short,
        10,
        incoming.file().unwrap(),
        Start::default(),
        Encoding::Raw,
        None,
        None,
        &|_| {},
        std::future::pending(),
    )
    .await
    .unwrap_err();
    assert!(
        matches!(
            err,
            TransferError::Truncated {
                got: 3,
                expected: 10
            }
        ),
        "{err:?}"
    );
    drop(incoming);
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
}

#[tokio::test]
async fn shrunken_source_is_reported() {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src");
    std::fs::write(&src, b"abc").unwrap();
    let mut sink = tokio::io::sink();
    let err = send_file(
        File::open(&src).unwrap(),
        10,
        Start::default(),
        Framing::RAW,
        None,
        &mut sink,
        &|_| {},
    )
    .await
    .unwrap_err();
    assert!(matches!(
        err,
        TransferError::SourceChanged {
            expected: 10,
            found: 3
        }
    ));
}

#[test]
fn commit_without_overwrite_refuses_existing() {
    let dir = tempfile::tempdir().unwrap();
    let dest = dir.path().join("dest");
    std::fs::write(&dest, b"old").unwrap();
    let incoming = incoming_at(&dest).unwrap();
    incoming.file().unwrap().write_all(b"new").unwrap();
    let meta = FileMeta {
        size: 3,
        mtime: None,
        mode: None,
    };
    assert!(matches!(
        incoming.commit(&meta, false),
        Err(CommitError::Exists(_))
    ));
    assert_eq!(std::fs::read(&dest).unwrap(), b"old");
    assert_eq!(
        std::fs::read_dir(dir.path()).unwrap().count(),
        1,
        "temporary removed"
    );
    let incoming = incoming_at(&dest).unwrap();
    incoming.file().unwrap().write_all(b"new").unwrap();
    incoming.commit(&meta, true).unwrap();
    assert_eq!(std::fs::read(&dest).unwrap(), b"new");
}

#[cfg(target_os = "linux")]
#[test]
fn anonymous_temporaries_have_no_name_until_committed() {
    let dir = tempfile::tempdir().unwrap();
    let open = || Dir::open_ambient_dir(dir.path(), ambient_authority()).unwrap();
    let names = || -> Vec<String> {
        std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect()
    };
    let meta = FileMeta {
        size: 3,
        mtime: None,
        mode: Some(0o640),
    };
    let make = |contents: &[u8]| {
        let f = IncomingFile::create_anonymous(open(), "dest", "dest".into()).unwrap()?;
        f.file().unwrap().write_all(contents).unwrap();
        Some(f)
    };
    let Some(first) = make(b"one") else {
        eprintln!("skipped: this filesystem or process cannot link O_TMPFILE files");
        return;
    };
    assert!(names().is_empty(), "nothing visible while receiving");
    drop(make(b"gone"));
    assert!(names().is_empty(), "an abandoned upload leaves nothing");
    first.commit(&meta, false).unwrap();
    assert_eq!(std::fs::read(dir.path().join("dest")).unwrap(), b"one");
    let clash = make(b"two").unwrap();
    assert!(matches!(
        clash.commit(&meta, false),
        Err(CommitError::Exists(_))
    ));
    make(b"two").unwrap().commit(&meta, true).unwrap();
    assert_eq!(std::fs::read(dir.path().join("dest")).unwrap(), b"two");
    assert_eq!(names(), ["dest"], "no temporary names left behind");
}

#[test]
fn concurrent_commits_share_syncs_that_start_after_them() {
    use std::sync::atomic::{AtomicU64, Ordering};
    let syncs = Arc::new(AtomicU64::new(0));
    // Each caller notes when it was called; each sync, when it started.
    let started = Arc::new(std::sync::Mutex::new(Vec::new()));
    let key = (u64::MAX, random_u64());
    let threads: Vec<_> = (0..16)
        .map(|_| {
            let (syncs, started) = (syncs.clone(), started.clone());
            std::thread::spawn(move || {
                let called = std::time::Instant::now();
                group_sync(key, || {
                    started.lock().unwrap().push(std::time::Instant::now());
                    syncs.fetch_add(1, Ordering::SeqCst);
                    std::thread::sleep(Duration::from_millis(30));
                    Ok(())
                })
                .unwrap();
                // Some sync that covers this caller started after it was called.
                let covered = started.lock().unwrap().iter().any(|&t| t >= called);
                assert!(
                    covered,
                    "returned before a sync that started after the call"
                );
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    let n = syncs.load(Ordering::SeqCst);
    assert!((1..=4).contains(&n), "16 commits took {n} syncs");
    // A failed sync is reported to the caller that ran it, and the next
    // caller runs a sync of its own instead of trusting it.
    let err = group_sync(key, || Err(std::io::Error::other("disk gone")));
    assert!(err.is_err());
    let ran = std::sync::atomic::AtomicBool::new(false);
    group_sync(key, || {
        ran.store(true, Ordering::SeqCst);
        Ok(())
    })
    .unwrap();
    assert!(ran.load(Ordering::SeqCst));
}

#[test]
fn timestamps_convert_both_ways() {
    for t in [
        UNIX_EPOCH + Duration::new(1_700_000_000, 123),
        UNIX_EPOCH - Duration::new(5, 250),
        UNIX_EPOCH,
    ] {
        assert_eq!(to_timestamp(t).unwrap().to_system_time(), Some(t));
    }
}

/// A temporary beside the local path `dest` (whose directory exists), to
/// become `dest` when committed.
fn incoming_at(dest: &Path) -> std::io::Result<IncomingFile> {
    let dir = Dir::open_ambient_dir(dest.parent().unwrap(), ambient_authority())?;
    let name = dest.file_name().unwrap().to_str().unwrap();
    IncomingFile::create_in(dir.try_clone()?, dir, name, dest.to_owned())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_trickling_pipe_has_its_bytes_sent_before_a_block_fills() {
    use std::sync::atomic::{AtomicBool, Ordering};
    use tokio::io::AsyncReadExt;
    // A byte every 2 ms (no gap long enough to end a block) for 1.2 s.
    let (r, w) = rustix::pipe::pipe().unwrap();
    let (r, mut w) = (File::from(r), File::from(w));
    let done = Arc::new(AtomicBool::new(false));
    let writer = {
        let done = done.clone();
        std::thread::spawn(move || {
            for _ in 0..600 {
                w.write_all(b"x").unwrap();
                std::thread::sleep(Duration::from_millis(2));
            }
            done.store(true, Ordering::SeqCst);
        })
    };
    let (mut a, mut b) = tokio::io::duplex(64 * 1024);
    let framing = Framing {
        encoding: Encoding::Stream,
        compress: Compressing::No,
    };
    let (sent, first_block_early) = tokio::join!(
        async {
            let sent = send_pipe(r, framing, None, &mut a, &|_| {}).await;
            drop(a);
            sent
        },
        async {
            let mut head = [0u8; BlockHeader::LEN];
            b.read_exact(&mut head).await.unwrap();
            let early = !done.load(Ordering::SeqCst);
            let mut rest = Vec::new();
            b.read_to_end(&mut rest).await.unwrap();
            early
        }
    );
    writer.join().unwrap();
    assert_eq!(sent.unwrap().0, 600);
    assert!(
        first_block_early,
        "the first bytes went out while the input was still trickling"
    );
}

/// A file held in memory, streamed in pieces of 100,000 bytes (as an
/// object store streams a ranged read in pieces of its own size).
struct Mem(bytes::Bytes);

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
pub(super) fn noise(len: usize, seed: u64) -> Vec<u8> {
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

const DELTA_FRAMING: Framing = Framing {
    encoding: Encoding::Delta,
    compress: Compressing::No,
};

/// Runs a whole delta in memory: `old` describes itself, `new` (the
/// receiver holding its first `start` bytes) is sent against it and
/// assembled. The bytes made, the sender's digest, and what crossed.
async fn delta_of(old: &[u8], new: &[u8], start: u64) -> (Vec<u8>, Digest, DeltaSent) {
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
fn edits_of(old: &[u8]) -> Vec<(&'static str, Vec<u8>, usize)> {
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
fn allowed(what: &str, changed: usize) -> u64 {
    let edits = if what == "four small edits" { 4 } else { 1 };
    (changed + edits * 2 * 64 * 1024) as u64
}

#[tokio::test]
async fn a_delta_sends_only_what_changed_whatever_moved() {
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
async fn a_resumed_delta_makes_only_the_rest_and_still_hashes_the_whole() {
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
async fn compressed_new_blocks_of_a_delta_assemble() {
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
fn ops(list: &[crate::protocol::DeltaOp]) -> Vec<u8> {
    list.iter()
        .flat_map(|op| crate::protocol::encode(op).unwrap())
        .collect()
}

#[tokio::test]
async fn a_hostile_delta_is_refused_before_it_is_acted_on() {
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
async fn a_hostile_description_of_the_old_version_is_refused() {
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

/// Describes the local file `path` as a receiver does (through the
/// descriptions cache): the chunks it sends.
async fn describe_file(path: &Path, cutter: Cutter) -> Vec<crate::protocol::ChunkSum> {
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
async fn described_file(path: &Path, cutter: Cutter) -> (Vec<u8>, u64) {
    keep_descriptions();
    let src = FileBytes::new(File::open(path).unwrap());
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
async fn delta_between(old: &Path, new: &Path, cutter: Cutter) -> (Vec<u8>, Digest, DeltaSent) {
    let (described, size) = described_file(old, cutter).await;
    let new_src = FileBytes::new(File::open(new).unwrap());
    let new_len = std::fs::metadata(new).unwrap().len();
    send_against(&described, size, cutter, &new_src, new_len, 0).await
}

/// The sender's side of a delta of `new_src` (`new_len` bytes, the
/// receiver holding its first `start`) against the receiver's version of
/// `old_size` bytes that `described` describes: the ops, the sender's
/// digest, and what it sent.
async fn send_against(
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
async fn patch_copy(
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
    let old_src = FileBytes::new(File::open(old).unwrap());
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
async fn a_delta_patched_into_a_copy_of_the_old_version_makes_the_new_and_tells_its_chunks() {
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
async fn a_patched_delta_cut_short_leaves_a_prefix_of_the_new_version() {
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
async fn a_remembered_description_is_used_only_while_the_file_is_unchanged() {
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
async fn a_delta_cut_along_the_receivers_chunks_sends_only_what_changed() {
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
async fn send_and_assemble(
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
async fn a_version_described_in_halves_still_makes_small_deltas() {
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
async fn a_second_patched_delta_builds_on_what_the_first_remembered() {
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
        described::remember(key, cutter.avg(), told);
        old_path = made_path;
    }
}

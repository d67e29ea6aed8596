//! Unit tests of sending, receiving and committing files through pipes; deltas in `delta_ops` (in memory) and `patching` (files on disk).

use std::fs::File;
use std::io::Write;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, UNIX_EPOCH};

use cap_std::ambient_authority;
use cap_std::fs::Dir;
use tokio::io::AsyncWrite;

use crate::files::{group_sync, random_u64};
use crate::protocol::{BlockHeader, Digest, Encoding, FileMeta, MAX_BLOCK};

use super::*;

mod delta_ops;
mod patching;

pub(crate) use delta_ops::noise;
use delta_ops::*;

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

impl<W: AsyncWrite + Unpin + Send> ChunkWrite for CountingWriter<'_, W> {}

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

/// Small files committed at once through `commit_start` share their
/// filesystem's syncs (the grouped committer: one sync a round, not two a
/// file), land whole under their names, and a clash is refused as alone.
#[cfg(target_os = "linux")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn small_files_committed_at_once_share_their_syncs() {
    use crate::files::{blocking, grouped::ROUNDS};
    use std::sync::atomic::Ordering;
    let dir = tempfile::tempdir().unwrap();
    let n = 200;
    let meta = |size| FileMeta {
        size,
        mtime: None,
        mode: Some(0o640),
    };
    let before = ROUNDS.load(Ordering::Relaxed);
    let commits: Vec<_> = (0..n)
        .map(|i| {
            let dest = dir.path().join(format!("f{i}"));
            tokio::spawn(async move {
                let committing = blocking(move || {
                    let incoming = incoming_at(&dest).unwrap();
                    incoming
                        .file()
                        .unwrap()
                        .write_all(format!("file {i}").as_bytes())
                        .unwrap();
                    incoming.commit_start(&meta(7), false)
                })
                .await
                .unwrap();
                assert!(matches!(committing, Committing::Grouped { .. }));
                committing.finished().await
            })
        })
        .collect();
    for c in commits {
        c.await.unwrap().unwrap();
    }
    let rounds = ROUNDS.load(Ordering::Relaxed) - before;
    assert!(
        rounds <= n / 4,
        "{n} small files took {rounds} rounds of syncs"
    );
    for i in 0..n {
        let path = dir.path().join(format!("f{i}"));
        assert_eq!(
            std::fs::read(&path).unwrap(),
            format!("file {i}").as_bytes()
        );
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(
            std::fs::metadata(&path).unwrap().permissions().mode() & 0o777,
            0o640
        );
    }
    // A name that exists is refused through the committer too, the old
    // file kept and the temporary gone; with overwrite it is replaced.
    let dest = dir.path().join("f0");
    for overwrite in [false, true] {
        let d = dest.clone();
        let committing = blocking(move || {
            let incoming = incoming_at(&d).unwrap();
            incoming.file().unwrap().write_all(b"newer").unwrap();
            incoming.commit_start(&meta(5), overwrite)
        })
        .await
        .unwrap();
        let result = committing.finished().await;
        if overwrite {
            result.unwrap();
            assert_eq!(std::fs::read(&dest).unwrap(), b"newer");
        } else {
            assert!(matches!(result, Err(CommitError::Exists(_))), "{result:?}");
            assert_eq!(std::fs::read(&dest).unwrap(), b"file 0");
        }
    }
    assert_eq!(
        std::fs::read_dir(dir.path()).unwrap().count(),
        n as usize,
        "no temporaries left"
    );
    // Commits that trickle in, so that the committer often finds its queue
    // empty and stops just as another file arrives: none is lost there.
    let trickle: Vec<_> = (0..150)
        .map(|i| {
            let dest = dir.path().join(format!("t{i}"));
            tokio::spawn(async move {
                tokio::time::sleep(Duration::from_micros(random_u64() % 3000)).await;
                blocking(move || {
                    let incoming = incoming_at(&dest).unwrap();
                    incoming.file().unwrap().write_all(b"t").unwrap();
                    incoming.commit_start(&meta(1), false)
                })
                .await
                .unwrap()
                .finished()
                .await
            })
        })
        .collect();
    for t in trickle {
        t.await.unwrap().unwrap();
    }
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

//! Unit tests of the request handlers over in-memory pipes: the whole life of a request (header, checks, data, receipt) against a real store, with no QUIC in the way.
//!
//! Tests marked `on_both_stores!` run twice: over a local root in a
//! temporary directory, and over an object root in object_store's
//! in-memory store (the object store's own code, leases and multipart
//! uploads included; Garage stays the real component of tests/).

use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt, DuplexStream};

use super::partials::Partials;
use super::{handle_stream, Backend, Ctx, ServeConfig};
use crate::exchange::pipes::{PipeRecv, PipeSend};
use crate::protocol::{
    encode, read_frame, write_frame, Compression, Encoding, EntryKind, ErrorCode, FileMeta,
    GetRequest, ListBatch, ListRequest, MkdirRequest, PutRequest, Receipt, Request, Response,
    SetMetaRequest, Timestamp, Trailer,
};
use crate::tls::Fingerprint;

/// A server over a temporary root, and its handlers' context.
struct Harness {
    config: Arc<ServeConfig>,
    partials: Arc<Partials>,
    root: tempfile::TempDir,
}

/// One request in flight: the client's ends of its pipes, and how the
/// server closed its own.
struct Exchange {
    to_server: DuplexStream,
    from_server: DuplexStream,
    stopped: Arc<Mutex<Option<u32>>>,
    reset: Arc<Mutex<Option<u32>>>,
    served: tokio::task::JoinHandle<()>,
}

impl Harness {
    fn new(configure: impl FnOnce(&mut ServeConfig)) -> Self {
        Self::on(Backend::Local, configure)
    }

    /// A server over `backend`, its configuration changed by `configure`.
    fn on(backend: Backend, configure: impl FnOnce(&mut ServeConfig)) -> Self {
        let root = tempfile::tempdir().unwrap();
        let mut config = ServeConfig::for_test(backend, root.path());
        config.header_timeout = Duration::from_secs(2);
        configure(&mut config);
        Self {
            config: Arc::new(config),
            partials: Arc::default(),
            root,
        }
    }

    /// Opens a stream to the handler and sends `frames` on it.
    async fn open(&self, frames: &[Vec<u8>]) -> Exchange {
        let (mut to_server, server_in) = tokio::io::duplex(1 << 20);
        let (server_out, from_server) = tokio::io::duplex(1 << 20);
        let stopped = Arc::new(Mutex::new(None));
        let reset = Arc::new(Mutex::new(None));
        let ctx = Ctx {
            config: self.config.clone(),
            client: Fingerprint::of(&rustls::pki_types::CertificateDer::from(vec![7u8; 8])),
            partials: self.partials.clone(),
            conn: None,
            requests: Arc::default(),
        };
        let request = PipeRecv {
            inner: Some(server_in),
            stopped: stopped.clone(),
            peer_reset: Default::default(),
        };
        let reply = PipeSend {
            inner: Some(server_out),
            reset: reset.clone(),
        };
        let served = tokio::spawn(handle_stream(reply, request, ctx));
        for f in frames {
            // The server may stop reading early (a refusal); that is its answer.
            let _ = to_server.write_all(f).await;
        }
        Exchange {
            to_server,
            from_server,
            stopped,
            reset,
            served,
        }
    }

    fn path(&self, name: &str) -> std::path::PathBuf {
        self.root.path().join(name)
    }
}

/// A get of `path` through the handler (so the same for every store):
/// the offer's metadata and the bytes, their BLAKE3 checked against the
/// trailer and acknowledged by a receipt; None if the server says it is
/// not there.
async fn fetch(h: &Harness, path: &str) -> Option<(FileMeta, Vec<u8>)> {
    let get = encode(&Request::Get(GetRequest {
        path: path.into(),
        resume: None,
        compression: Compression::Never,
    }))
    .unwrap();
    let mut x = h.open(&[get]).await;
    let offer = match read_frame::<_, Response>(&mut x.from_server).await.unwrap() {
        Response::GetAccepted(offer) => offer,
        Response::Refused(e) if e.code == ErrorCode::NotFound => return None,
        other => panic!("{path}: {other:?}"),
    };
    let mut got = vec![0u8; offer.meta.size as usize];
    x.from_server.read_exact(&mut got).await.unwrap();
    let trailer: Trailer = read_frame(&mut x.from_server).await.unwrap();
    assert_eq!(trailer.digest, *blake3::hash(&got).as_bytes());
    let receipt = Receipt::Committed {
        size: offer.meta.size,
        digest: trailer.digest,
    };
    write_frame(&mut x.to_server, &receipt).await.unwrap();
    x.served.await.unwrap();
    assert_eq!(
        *x.reset.lock().unwrap(),
        None,
        "{path}: the answer was not reset"
    );
    Some((offer.meta, got))
}

/// The bytes of the file `path` as a get returns them ([`fetch`]).
async fn read(h: &Harness, path: &str) -> Option<Vec<u8>> {
    fetch(h, path).await.map(|(_, data)| data)
}

fn put_frames(path: &str, data: &[u8]) -> Vec<Vec<u8>> {
    let header = encode(&Request::Put(PutRequest {
        path: path.into(),
        meta: FileMeta {
            size: data.len() as u64,
            mtime: None,
            mode: Some(0o600),
        },
        force: false,
        resume: false,
        encoding: Encoding::Raw,
    }))
    .unwrap();
    let trailer = encode(&Trailer {
        digest: *blake3::hash(data).as_bytes(),
    })
    .unwrap();
    vec![header, data.to_vec(), trailer]
}

/// Puts `data` as `path` and returns the server's receipt.
async fn put(h: &Harness, path: &str, data: &[u8]) -> (Response, Option<Receipt>) {
    let mut x = h.open(&put_frames(path, data)).await;
    drop(std::mem::replace(&mut x.to_server, tokio::io::duplex(1).0));
    let response: Response = read_frame(&mut x.from_server).await.unwrap();
    let receipt = match response {
        Response::PutAccepted(_) => Some(read_frame(&mut x.from_server).await.unwrap()),
        _ => None,
    };
    x.served.await.unwrap();
    (response, receipt)
}

on_both_stores!(a_small_put_is_committed_and_a_get_returns_it);
async fn a_small_put_is_committed_and_a_get_returns_it(backend: Backend) {
    let h = Harness::on(backend, |_| {});
    let data = b"over an in-memory pipe".to_vec();
    let (response, receipt) = put(&h, "dir/file", &data).await;
    assert!(
        matches!(response, Response::PutAccepted(ref o) if o.offset == 0),
        "{response:?}"
    );
    assert!(matches!(receipt, Some(Receipt::Committed { size, .. }) if size == data.len() as u64));
    let (meta, got) = fetch(&h, "dir/file").await.unwrap();
    assert_eq!(meta.size, data.len() as u64);
    assert_eq!(meta.mode, Some(0o600));
    assert_eq!(got, data);

    // Large enough to go up in parts on an object root (8 MiB or more
    // each) and to be read back in ranges.
    let big: Vec<u8> = (0..(20u32 << 20)).map(|i| (i % 251) as u8).collect();
    let (response, receipt) = put(&h, "dir/big", &big).await;
    assert!(matches!(response, Response::PutAccepted(_)), "{response:?}");
    assert!(matches!(receipt, Some(Receipt::Committed { size, .. }) if size == big.len() as u64));
    assert!(
        read(&h, "dir/big").await.unwrap() == big,
        "20 MiB round trip"
    );
}

on_both_stores!(data_that_does_not_match_its_header_or_digest_is_never_committed);
async fn data_that_does_not_match_its_header_or_digest_is_never_committed(backend: Backend) {
    let h = Harness::on(backend, |_| {});
    // One byte more than declared.
    let mut frames = put_frames("long", b"1234");
    frames[1].push(b'5');
    let mut x = h.open(&frames).await;
    drop(std::mem::replace(&mut x.to_server, tokio::io::duplex(1).0));
    assert_failed(&mut x.from_server, ErrorCode::Corrupt).await;
    x.served.await.unwrap();
    // The wrong digest, small (read whole before any disk work) and large
    // (streamed to disk as it arrives).
    for (name, size) in [("bad", 4), ("bad-large", 300 << 10)] {
        let data = vec![b'a'; size];
        let mut frames = put_frames(name, &data);
        let last = frames.len() - 1;
        frames[last] = encode(&Trailer { digest: [0; 32] }).unwrap();
        let mut x = h.open(&frames).await;
        drop(std::mem::replace(&mut x.to_server, tokio::io::duplex(1).0));
        assert_failed(&mut x.from_server, ErrorCode::Corrupt).await;
        x.served.await.unwrap();
        assert_eq!(read(&h, name).await, None);
    }
    assert_eq!(read(&h, "long").await, None);
}

/// Reads a put's answer, which must be a failure with `code`: `Refused`
/// (a small upload is answered once its data is in: see `serve_whole_put`)
/// or `PutAccepted` and a failed receipt (a large one fails after it was
/// accepted).
async fn assert_failed(from_server: &mut (impl AsyncRead + Unpin), code: ErrorCode) {
    match read_frame::<_, Response>(from_server).await.unwrap() {
        Response::Refused(e) => assert_eq!(e.code, code, "{}", e.message),
        Response::PutAccepted(_) => match read_frame::<_, Receipt>(from_server).await.unwrap() {
            Receipt::Failed(e) => assert_eq!(e.code, code, "{}", e.message),
            other => panic!("{other:?}"),
        },
        other => panic!("{other:?}"),
    }
}

on_both_stores!(refusals_name_the_reason_and_stop_the_clients_data);
async fn refusals_name_the_reason_and_stop_the_clients_data(backend: Backend) {
    let read_only = Harness::on(backend, |c| c.read_only = true);
    let (response, _) = put(&read_only, "f", b"x").await;
    assert!(
        matches!(response, Response::Refused(ref e) if e.code == ErrorCode::ReadOnly),
        "{response:?}"
    );

    let h = Harness::on(backend, |_| {});
    for (path, code) in [
        ("../escape", ErrorCode::InvalidPath),
        (".qxfer-partial/x", ErrorCode::InvalidPath),
        ("/abs", ErrorCode::InvalidPath),
    ] {
        let (response, _) = put(&h, path, b"x").await;
        assert!(
            matches!(response, Response::Refused(ref e) if e.code == code),
            "{path}: {response:?}"
        );
    }
    // Not a request at all.
    let mut x = h.open(&[vec![0, 0, 0, 3, 0xff, 0xff, 0xff]]).await;
    match read_frame::<_, Response>(&mut x.from_server).await.unwrap() {
        Response::Refused(e) => assert_eq!(e.code, ErrorCode::Protocol),
        other => panic!("{other:?}"),
    }
    x.served.await.unwrap();
    assert!(
        x.stopped.lock().unwrap().is_some(),
        "the client's data is stopped"
    );
    // Nothing at all, within the header timeout: Busy, which a client
    // tries again (a lossy path loses a request as a stalled client
    // withholds it).
    let mut x = h.open(&[]).await;
    match read_frame::<_, Response>(&mut x.from_server).await.unwrap() {
        Response::Refused(e) => assert_eq!(e.code, ErrorCode::Busy, "{}", e.message),
        other => panic!("{other:?}"),
    }
    x.served.await.unwrap();
}

on_both_stores!(listings_and_mkdir_go_through_the_store);
async fn listings_and_mkdir_go_through_the_store(backend: Backend) {
    let h = Harness::on(backend, |_| {});
    put(&h, "a/one", b"1").await;
    let mkdir = encode(&Request::Mkdir(MkdirRequest {
        path: "a/empty".into(),
        meta: None,
    }))
    .unwrap();
    let mut x = h.open(&[mkdir]).await;
    assert_eq!(
        read_frame::<_, Response>(&mut x.from_server).await.unwrap(),
        Response::MkdirDone
    );
    x.served.await.unwrap();

    let list = encode(&Request::List(ListRequest {
        path: "a".into(),
        recursive: false,
    }))
    .unwrap();
    let mut x = h.open(&[list]).await;
    assert_eq!(
        read_frame::<_, Response>(&mut x.from_server).await.unwrap(),
        Response::ListAccepted
    );
    let batch: ListBatch = read_frame(&mut x.from_server).await.unwrap();
    assert!(!batch.more);
    let names: Vec<_> = batch
        .entries
        .iter()
        .map(|e| (e.name.as_str(), e.kind))
        .collect();
    assert_eq!(names, [("empty", EntryKind::Dir), ("one", EntryKind::File)]);
    x.served.await.unwrap();
}

/// Sends a put header for `path` (with an mtime), waits for the answer,
/// lets `meanwhile` run on the root, then sends the data and returns the receipt.
async fn put_with_a_file_appearing(
    h: &Harness,
    path: &str,
    data: &[u8],
    meanwhile: impl FnOnce(&std::path::Path, std::time::SystemTime),
) -> Receipt {
    let mtime = std::time::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
    let mut frames = put_frames(path, data);
    frames[0] = encode(&Request::Put(PutRequest {
        path: path.into(),
        meta: FileMeta {
            size: data.len() as u64,
            mtime: crate::exchange::to_timestamp(mtime),
            mode: Some(0o600),
        },
        force: false,
        resume: false,
        encoding: Encoding::Raw,
    }))
    .unwrap();
    let mut x = h.open(&frames[..1]).await;
    let response: Response = read_frame(&mut x.from_server).await.unwrap();
    assert!(matches!(response, Response::PutAccepted(_)), "{response:?}");
    meanwhile(&h.path(path), mtime);
    for f in &frames[1..] {
        x.to_server.write_all(f).await.unwrap();
    }
    drop(std::mem::replace(&mut x.to_server, tokio::io::duplex(1).0));
    let receipt = read_frame(&mut x.from_server).await.unwrap();
    x.served.await.unwrap();
    receipt
}

#[tokio::test]
async fn a_name_taken_meanwhile_by_this_very_file_is_no_conflict() {
    let h = Harness::new(|_| {});
    // Large enough to stream to disk as it arrives (a small upload is read
    // whole, then checked and committed at once, leaving no time between).
    let data: Vec<u8> = (0..300u32 << 10).map(|i| (i % 253) as u8).collect();
    let place = |contents: Vec<u8>| {
        move |p: &std::path::Path, mtime: std::time::SystemTime| {
            std::fs::write(p, &contents).unwrap();
            std::fs::File::options()
                .write(true)
                .open(p)
                .unwrap()
                .set_modified(mtime)
                .unwrap();
        }
    };
    // The same bytes, size and mtime: the put succeeds, the file is intact.
    let receipt = put_with_a_file_appearing(&h, "same", &data, place(data.clone())).await;
    assert!(
        matches!(receipt, Receipt::Committed { size, .. } if size == data.len() as u64),
        "{receipt:?}"
    );
    assert_eq!(std::fs::read(h.path("same")).unwrap(), data);
    // Other bytes of the same size and mtime: a real conflict, refused.
    let mut other = data.clone();
    other[0] ^= 1;
    let receipt = put_with_a_file_appearing(&h, "other", &data, place(other.clone())).await;
    match receipt {
        Receipt::Failed(e) => assert_eq!(e.code, ErrorCode::AlreadyExists, "{e:?}"),
        other => panic!("{other:?}"),
    }
    assert_eq!(std::fs::read(h.path("other")).unwrap(), other);
}

/// The request of a put of data of unknown length, declaring `size`
/// (which must be 0).
fn stream_header(path: &str, size: u64) -> Vec<u8> {
    encode(&Request::Put(PutRequest {
        path: path.into(),
        meta: FileMeta {
            size,
            mtime: None,
            mode: None,
        },
        force: false,
        resume: false,
        encoding: Encoding::Stream,
    }))
    .unwrap()
}

/// The frames of a put of `data` as data of unknown length, in blocks of
/// `block` bytes, with its end mark (`ended`) or without.
fn stream_frames(path: &str, data: &[u8], block: usize, ended: bool) -> Vec<Vec<u8>> {
    let mut frames = vec![stream_header(path, 0)];
    for b in data.chunks(block) {
        let h = crate::protocol::BlockHeader {
            compressed: false,
            raw_len: b.len() as u32,
            wire_len: b.len() as u32,
        };
        frames.push([&h.encode()[..], b].concat());
    }
    if ended {
        frames.push(crate::protocol::BlockHeader::END.to_vec());
        frames.push(
            encode(&Trailer {
                digest: *blake3::hash(data).as_bytes(),
            })
            .unwrap(),
        );
    }
    frames
}

/// Sends `frames`, closes the request, and returns the receipt (after an
/// accepted put) or the refusal.
async fn send_put(
    h: &Harness,
    frames: &[Vec<u8>],
) -> Result<Receipt, crate::protocol::RemoteError> {
    let mut x = h.open(frames).await;
    drop(std::mem::replace(&mut x.to_server, tokio::io::duplex(1).0));
    let receipt = match read_frame::<_, Response>(&mut x.from_server).await.unwrap() {
        Response::PutAccepted(_) => read_frame(&mut x.from_server).await.unwrap(),
        Response::Refused(e) => return Err(e),
        other => panic!("{other:?}"),
    };
    x.served.await.unwrap();
    Ok(receipt)
}

on_both_stores!(data_of_unknown_length_is_committed_at_its_end_mark_and_only_then);
async fn data_of_unknown_length_is_committed_at_its_end_mark_and_only_then(backend: Backend) {
    let h = Harness::on(backend, |c| c.max_file_size = Some(10_000));
    let data: Vec<u8> = (0..9_000u32).map(|i| (i % 253) as u8).collect();
    match send_put(&h, &stream_frames("piped", &data, 4096, true)).await {
        Ok(Receipt::Committed { size, digest }) => {
            assert_eq!(size, data.len() as u64, "the receipt gives the size");
            assert_eq!(digest, *blake3::hash(&data).as_bytes());
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(read(&h, "piped").await.unwrap(), data);
    // Cut off before the end mark: nothing under the name, nothing left over.
    match send_put(&h, &stream_frames("cut", &data, 4096, false)).await {
        Ok(Receipt::Failed(e)) => {
            assert!(e.message.contains("'cut' was not saved"), "{}", e.message)
        }
        other => panic!("{other:?}"),
    }
    // Past the server's largest file: refused as too large.
    let big = vec![7u8; 10_001];
    match send_put(&h, &stream_frames("big", &big, 4096, true)).await {
        Ok(Receipt::Failed(e)) => assert_eq!(e.code, ErrorCode::TooLarge, "{}", e.message),
        other => panic!("{other:?}"),
    }
    // A name that exists is refused before any data is taken.
    match send_put(&h, &stream_frames("piped", b"other", 4096, true)).await {
        Err(e) => assert_eq!(e.code, ErrorCode::AlreadyExists, "{}", e.message),
        other => panic!("{other:?}"),
    }
    assert_eq!(read(&h, "piped").await.unwrap(), data);
    assert_eq!(read(&h, "cut").await, None, "nothing half-written");
    assert_eq!(read(&h, "big").await, None);
    if let Backend::Local = backend {
        let names: Vec<_> = std::fs::read_dir(h.root.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .filter(|n| !n.starts_with(".qxfer-partial"))
            .collect();
        assert_eq!(names, ["piped"], "no temporaries, nothing half-written");
    }
    // A stream that claims a size or a resume is a malformed request.
    let mut frames = stream_frames("odd", b"x", 1, true);
    frames[0] = stream_header("odd", 1);
    assert_eq!(
        send_put(&h, &frames).await.unwrap_err().code,
        ErrorCode::Protocol
    );
}

/// `put --sync` sets the mtime and mode of a file it leaves alone, and
/// only of the file the client compared: the same size and BLAKE3 (or
/// without a digest, the same mtime). A wrong digest, a changed size or
/// mtime, a link at the name or a read-only server change nothing.
#[tokio::test]
async fn mtime_and_mode_are_set_only_on_the_file_compared() {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    let h = Harness::new(|_| {});
    put(&h, "f", b"hello").await;
    let digest = *blake3::hash(b"hello").as_bytes();
    let stamp = |p: &std::path::Path| {
        let md = std::fs::metadata(p).unwrap();
        (md.mtime(), md.permissions().mode() & 0o7777)
    };
    let before = stamp(&h.path("f"));
    let ask = |path: &str, meta: FileMeta, digest| {
        encode(&Request::SetMeta(SetMetaRequest {
            path: path.into(),
            meta,
            digest,
        }))
        .unwrap()
    };
    let wanted = FileMeta {
        size: 5,
        mtime: Some(Timestamp {
            secs: 1_500_000_000,
            nanos: 0,
        }),
        mode: Some(0o600),
    };
    let refused = |r: Response, code: ErrorCode| match r {
        Response::Refused(e) => assert_eq!(e.code, code, "{e:?}"),
        other => panic!("expected a refusal, got {other:?}"),
    };
    let wrong = *blake3::hash(b"other").as_bytes();
    refused(
        answer(&h, ask("f", wanted, Some(wrong))).await,
        ErrorCode::Corrupt,
    );
    let longer = FileMeta { size: 6, ..wanted };
    refused(
        answer(&h, ask("f", longer, Some(digest))).await,
        ErrorCode::Corrupt,
    );
    // No digest: the mtime must already be the one asked for.
    refused(answer(&h, ask("f", wanted, None)).await, ErrorCode::Corrupt);
    std::os::unix::fs::symlink("f", h.path("link")).unwrap();
    refused(
        answer(&h, ask("link", wanted, Some(digest))).await,
        ErrorCode::Symlink,
    );
    refused(
        answer(&h, ask("missing", wanted, Some(digest))).await,
        ErrorCode::NotFound,
    );
    assert_eq!(stamp(&h.path("f")), before, "nothing changed");

    assert_eq!(
        answer(&h, ask("f", wanted, Some(digest))).await,
        Response::MetaSet
    );
    assert_eq!(stamp(&h.path("f")), (1_500_000_000, 0o600));
    assert_eq!(std::fs::read(h.path("f")).unwrap(), b"hello");
    // The quick check's case: same mtime, another mode.
    let mode_only = FileMeta {
        mode: Some(0o644),
        ..wanted
    };
    assert_eq!(
        answer(&h, ask("f", mode_only, None)).await,
        Response::MetaSet
    );
    assert_eq!(stamp(&h.path("f")), (1_500_000_000, 0o644));

    let ro = Harness::new(|c| c.read_only = true);
    std::fs::write(ro.path("f"), b"hello").unwrap();
    refused(
        answer(&ro, ask("f", wanted, Some(digest))).await,
        ErrorCode::ReadOnly,
    );
}

/// Sends one request that carries no data and returns the answer.
async fn answer(h: &Harness, frame: Vec<u8>) -> Response {
    let mut x = h.open(&[frame]).await;
    let r: Response = read_frame(&mut x.from_server).await.unwrap();
    x.served.await.unwrap();
    r
}

/// Local only: a bucket's objects are not local files, whose chunks the
/// root's cache keeps.
#[tokio::test]
async fn a_large_upload_is_described_for_its_first_delta_once_committed() {
    let h = Harness::new(|c| c.describe_uploads_from = 2 << 20);
    let data = crate::exchange::tests::noise(3 << 20, 5);
    let (_, receipt) = put(&h, "big", &data).await;
    assert!(
        matches!(receipt, Some(Receipt::Committed { .. })),
        "{receipt:?}"
    );
    let cutter = crate::exchange::Cutter::for_size(data.len() as u64);
    let path = crate::paths::RemotePath::parse("big", false).unwrap();
    // Described in the background: a few tens of milliseconds here.
    let mut known = None;
    for _ in 0..200 {
        let opened = h.config.store.open(&path, None).await.unwrap();
        known = opened
            .bytes
            .as_file()
            .and_then(|f| f.recall(data.len() as u64, cutter.avg()));
        if known.is_some() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    let d = known.expect("the upload was described after its commit");
    assert_eq!(d.digest, Some(*blake3::hash(&data).as_bytes()));
    assert_eq!(
        d.values.as_ref().map(|v| v.len()),
        Some(3),
        "its 1 MiB blocks' values"
    );
    assert_eq!(
        d.chunks.iter().map(|c| u64::from(c.len)).sum::<u64>(),
        data.len() as u64
    );
    // A smaller upload is left for its first delta to describe.
    let small = crate::exchange::tests::noise(1 << 20, 6);
    put(&h, "small", &small).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let opened = h
        .config
        .store
        .open(
            &crate::paths::RemotePath::parse("small", false).unwrap(),
            None,
        )
        .await
        .unwrap();
    let avg = crate::exchange::Cutter::for_size(small.len() as u64).avg();
    assert!(opened
        .bytes
        .as_file()
        .unwrap()
        .recall(1 << 20, avg)
        .is_none());
}

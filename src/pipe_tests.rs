//! The real client against the real server's handlers over in-memory pipes: whole puts, gets, resumes and listings, with no QUIC, sockets or certificates in the way.
//!
//! Both sides use the same stream seam (`exchange::SendHalf` and
//! `RecvHalf`); here the client's streams come from
//! [`crate::server::over_pipes`] instead of a QUIC connection. Every test
//! runs over a local root and over object_store's in-memory store.

use std::path::Path;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use futures::future::BoxFuture;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use crate::client::{Client, ClientConfig, FileError, OpenPipe, Streams, PART_SUFFIX};
use crate::endpoint::TransportOpts;
use crate::exchange::{ChunkWrite, RecvHalf, SendHalf};
use crate::protocol::{Compression, EntryKind, ErrorCode, RESUME_MIN};
use crate::server::{self, Backend, ServeConfig};
use crate::tls::Fingerprint;

/// A server over `backend` and a client's configuration, in temporary
/// directories that live as long as this.
struct Pair {
    config: Arc<ServeConfig>,
    client: ClientConfig,
    fingerprint: Fingerprint,
    _root: tempfile::TempDir,
    /// The client's files: its config directory and what it moves.
    here: tempfile::TempDir,
}

impl Pair {
    fn new(backend: Backend) -> Self {
        let root = tempfile::tempdir().unwrap();
        let config = ServeConfig::for_test(backend, root.path());
        let here = tempfile::tempdir().unwrap();
        let client = ClientConfig {
            server: "pipes".to_owned(),
            pin: None,
            config_dir: here.path().join("config"),
            transport: TransportOpts::default(),
            resume: true,
            limit_rate: None,
            compression: Compression::Auto,
            delta: false,
            reply_timeout: Duration::from_secs(10),
            connect_timeout: Duration::from_secs(5),
            failover: Vec::new(),
        };
        std::fs::create_dir_all(&client.config_dir).unwrap();
        Self {
            config: Arc::new(config),
            client,
            fingerprint: Fingerprint::of(&rustls::pki_types::CertificateDer::from(vec![9u8; 8])),
            _root: root,
            here,
        }
    }

    /// A client whose streams go to this server's handlers.
    fn connect(&self) -> Client {
        let serve = server::over_pipes(self.config.clone(), self.fingerprint);
        Client::over_pipes(Arc::new(serve), &self.client, self.fingerprint)
    }

    /// A client whose first stream breaks after `bytes` bytes of what it
    /// sends (a connection lost mid-upload); later streams are whole.
    fn connect_cut_after(&self, bytes: usize) -> Client {
        let serve = server::over_pipes(self.config.clone(), self.fingerprint);
        let opened = AtomicUsize::new(0);
        let open: Arc<OpenPipe> = Arc::new(move || -> Streams {
            let (send, recv) = serve();
            match opened.fetch_add(1, Ordering::SeqCst) {
                0 => {
                    let broken = Arc::new(AtomicBool::new(false));
                    let send = CutAfter {
                        inner: Some(send),
                        left: bytes,
                        broken: broken.clone(),
                    };
                    let recv = Broken {
                        inner: recv,
                        broken,
                    };
                    (Box::new(send), Box::new(recv))
                }
                _ => (send, recv),
            }
        });
        Client::over_pipes(open, &self.client, self.fingerprint)
    }

    /// A file of `len` bytes here, named `name`.
    fn file(&self, name: &str, len: usize) -> (std::path::PathBuf, Vec<u8>) {
        let data: Vec<u8> = (0..len).map(|i| (i * 7 % 251) as u8).collect();
        let path = self.here.path().join(name);
        std::fs::write(&path, &data).unwrap();
        (path, data)
    }

    fn dir(&self, name: &str) -> std::path::PathBuf {
        let d = self.here.path().join(name);
        std::fs::create_dir_all(&d).unwrap();
        d
    }
}

/// A sending half that breaks once `left` bytes have gone through, as a
/// lost connection does: the server sees its data end, and the client's
/// reading half ([`Broken`]) fails too.
struct CutAfter {
    inner: Option<Box<dyn SendHalf>>,
    left: usize,
    broken: Arc<AtomicBool>,
}

fn lost() -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::ConnectionReset, "connection lost")
}

// Bytes go through its own write, which counts them and cuts.
impl ChunkWrite for CutAfter {}

impl AsyncWrite for CutAfter {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        if self.left == 0 {
            self.inner = None;
            self.broken.store(true, Ordering::SeqCst);
            return Poll::Ready(Err(lost()));
        }
        let n = buf.len().min(self.left);
        let Some(inner) = self.inner.as_mut() else {
            return Poll::Ready(Err(lost()));
        };
        let polled = Pin::new(inner).poll_write(cx, &buf[..n]);
        if let Poll::Ready(Ok(sent)) = polled {
            self.left -= sent;
        }
        polled
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.inner.as_mut() {
            Some(inner) => Pin::new(inner).poll_flush(cx),
            None => Poll::Ready(Err(lost())),
        }
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.inner.as_mut() {
            Some(inner) => Pin::new(inner).poll_shutdown(cx),
            None => Poll::Ready(Err(lost())),
        }
    }
}

impl SendHalf for CutAfter {
    fn finish(&mut self) {
        if let Some(inner) = self.inner.as_mut() {
            inner.finish()
        }
    }

    fn reset(&mut self, code: u32) {
        if let Some(inner) = self.inner.as_mut() {
            inner.reset(code)
        }
    }

    fn acknowledged(&mut self, limit: Duration) -> BoxFuture<'_, ()> {
        match self.inner.as_mut() {
            Some(inner) => inner.acknowledged(limit),
            None => Box::pin(async {}),
        }
    }
}

/// A reading half that fails once its stream's [`CutAfter`] broke.
struct Broken {
    inner: Box<dyn RecvHalf>,
    broken: Arc<AtomicBool>,
}

impl AsyncRead for Broken {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        if self.broken.load(Ordering::SeqCst) {
            return Poll::Ready(Err(lost()));
        }
        // Woken again soon to see a break that happens meanwhile.
        let polled = Pin::new(&mut self.inner).poll_read(cx, buf);
        if polled.is_pending() {
            let waker = cx.waker().clone();
            tokio::spawn(async move {
                tokio::time::sleep(Duration::from_millis(20)).await;
                waker.wake();
            });
        }
        polled
    }
}

impl RecvHalf for Broken {
    fn stop(&mut self, code: u32) {
        self.inner.stop(code)
    }
}

/// Gets `remote` into `dir` and returns the report and the bytes.
async fn get(
    client: &Client,
    remote: &str,
    dest: &Path,
    force: bool,
) -> Result<(crate::client::TransferReport, Vec<u8>), FileError> {
    let report = client.get(remote, dest, force, &|_| {}, &|_| {}).await?;
    Ok((report, std::fs::read(dest).unwrap()))
}

on_both_stores!(put_list_and_get_round_trip_over_pipes);
async fn put_list_and_get_round_trip_over_pipes(backend: Backend) {
    let pair = Pair::new(backend);
    let client = pair.connect();
    let (small, small_data) = pair.file("small", 1000);
    let large_len = RESUME_MIN as usize + (1 << 20) + 17;
    let (large, large_data) = pair.file("large", large_len);

    let r = client.put(&small, "d/small", false, &|_| {}).await.unwrap();
    assert_eq!((r.bytes, r.bytes_sent, r.resumed_from), (1000, 1000, 0));
    let r = client.put(&large, "d/large", false, &|_| {}).await.unwrap();
    assert_eq!(r.bytes, large_len as u64);

    // The same file again is already there; another under its name is
    // refused without --force.
    let r = client.put(&small, "d/small", false, &|_| {}).await.unwrap();
    assert!(r.already_there && r.bytes_sent == 0, "{r:?}");
    let (other, _) = pair.file("other", 999);
    match client.put(&other, "d/small", false, &|_| {}).await {
        Err(FileError::Remote(e)) => assert_eq!(e.code, ErrorCode::AlreadyExists, "{e:?}"),
        other => panic!("{other:?}"),
    }

    let mut listed: Vec<_> = client
        .list("d")
        .await
        .unwrap()
        .into_iter()
        .map(|e| (e.name, e.kind, e.size))
        .collect();
    listed.sort_by(|a, b| a.0.cmp(&b.0));
    assert_eq!(
        listed,
        [
            ("large".to_owned(), EntryKind::File, large_len as u64),
            ("small".to_owned(), EntryKind::File, 1000),
        ]
    );
    let tree = client.list_tree("").await.unwrap();
    assert!(tree.iter().any(|e| e.name == "d/large"), "{tree:?}");

    let out = pair.dir("out");
    let (r, got) = get(&client, "d/small", &out.join("small"), false)
        .await
        .unwrap();
    assert_eq!((r.bytes, got), (1000, small_data));
    let (_, got) = get(&client, "d/large", &out.join("large"), false)
        .await
        .unwrap();
    assert!(got == large_data, "the large file round-trips");
    // The same file here already is left alone; another is not replaced
    // without --force.
    let (r, _) = get(&client, "d/small", &out.join("small"), false)
        .await
        .unwrap();
    assert!(r.already_there && r.bytes_sent == 0, "{r:?}");
    std::fs::write(out.join("small"), b"mine").unwrap();
    match get(&client, "d/small", &out.join("small"), false).await {
        Err(FileError::LocalExists(p)) => assert_eq!(p, out.join("small")),
        other => panic!("{other:?}"),
    }
    assert_eq!(std::fs::read(out.join("small")).unwrap(), b"mine");
    match get(&client, "d/missing", &out.join("missing"), false).await {
        Err(FileError::Remote(e)) => assert_eq!(e.code, ErrorCode::NotFound, "{e:?}"),
        other => panic!("{other:?}"),
    }
    assert!(!out.join("missing").exists());
    client.close().await;
}

on_both_stores!(an_interrupted_get_resumes_from_its_part_file);
async fn an_interrupted_get_resumes_from_its_part_file(backend: Backend) {
    let pair = Pair::new(backend);
    let client = pair.connect();
    let len = RESUME_MIN as usize + 123_457;
    let (file, data) = pair.file("f", len);
    client.put(&file, "f", false, &|_| {}).await.unwrap();
    // What an interrupted download left.
    let dest = pair.dir("out").join("f");
    let held = 3 << 20;
    let part = dest.with_file_name(format!("f{PART_SUFFIX}"));
    std::fs::write(&part, &data[..held]).unwrap();
    let (r, got) = get(&client, "f", &dest, false).await.unwrap();
    assert_eq!(r.resumed_from, held as u64, "only the rest crossed");
    assert_eq!(r.bytes_sent, (len - held) as u64);
    assert!(got == data);
    assert!(!part.exists(), "the part file became the file");
}

on_both_stores!(an_interrupted_put_resumes_from_what_the_server_kept);
async fn an_interrupted_put_resumes_from_what_the_server_kept(backend: Backend) {
    let pair = Pair::new(backend);
    let len = 3 * RESUME_MIN as usize;
    let (file, data) = pair.file("f", len);
    // The connection breaks 9 MiB into the upload.
    let cut = pair.connect_cut_after(9 << 20);
    let err = cut.put(&file, "f", false, &|_| {}).await.unwrap_err();
    assert!(
        err.is_transient(),
        "a lost connection, worth a retry: {err}"
    );
    // Nothing under the name meanwhile.
    assert!(cut.list("").await.unwrap().iter().all(|e| e.name != "f"));
    // The server may still be storing what arrived when the client comes
    // back (a real client waits 0.5 s first): until it is done, it says
    // the file is busy.
    let client = pair.connect();
    let mut tries = 0;
    let r = loop {
        match client.put(&file, "f", false, &|_| {}).await {
            Err(FileError::Remote(e)) if e.message.contains("in progress") && tries < 50 => {
                tries += 1;
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            other => break other.unwrap(),
        }
    };
    assert!(
        r.resumed_from > 0 && r.resumed_from <= 9 << 20,
        "resumed from what the server kept: {}",
        r.resumed_from
    );
    assert_eq!(r.bytes_sent, len as u64 - r.resumed_from);
    let out = pair.dir("out");
    let (_, got) = get(&client, "f", &out.join("f"), false).await.unwrap();
    assert!(got == data, "the resumed file is the file");
}

/// The client's side only, so one store: a whole download in sync mode
/// of a large file is cut into chunks as it arrives and kept in the
/// client's `described/` with the file, for its first delta; outside sync
/// mode nothing is kept.
#[tokio::test]
async fn a_large_download_in_sync_mode_is_described_as_it_arrives() {
    use crate::exchange::{Cutter, Descriptions, FileKey, DESCRIBE_AFTER_UPLOAD};
    let mut pair = Pair::new(Backend::Local);
    pair.client.delta = true;
    let len = DESCRIBE_AFTER_UPLOAD as usize + 4321;
    let (big, data) = pair.file("big", len);
    let client = pair.connect();
    client.put(&big, "big", false, &|_| {}).await.unwrap();
    let out = pair.dir("out");
    get(&client, "big", &out.join("big"), false).await.unwrap();
    client.close().await;
    let kept = Descriptions::on_disk(pair.client.config_dir.join("described")).unwrap();
    let avg = Cutter::for_size(len as u64).avg();
    let key = FileKey::of(&std::fs::File::open(out.join("big")).unwrap()).unwrap();
    let d = kept.recall(&key, avg).expect("described as it arrived");
    assert_eq!(d.digest, Some(*blake3::hash(&data).as_bytes()));
    assert_eq!(
        d.chunks.iter().map(|c| u64::from(c.len)).sum::<u64>(),
        len as u64
    );
    assert_eq!(d.values.map(|v| v.len()), Some(len >> 20));

    pair.client.delta = false;
    let client = pair.connect();
    get(&client, "big", &out.join("plain"), false)
        .await
        .unwrap();
    client.close().await;
    let key = FileKey::of(&std::fs::File::open(out.join("plain")).unwrap()).unwrap();
    assert!(kept.recall(&key, avg).is_none(), "kept only in sync mode");
}

//! Servers that never answer or lie (a resume offer past the end, a digest that does not match, data of unknown length misused): the client fails clearly and never hangs.

use super::*;

/// Gets "g" into `dest` from a hostile server: it must fail, and soon.
async fn failing_get(client: &Client, dest: &std::path::Path) -> qxfer::client::FileError {
    tokio::time::timeout(
        Duration::from_secs(20),
        client.get("g", dest, false, &|_| {}, &|_| {}),
    )
    .await
    .expect("get must not hang")
    .unwrap_err()
}

/// A real qxfer endpoint (TLS, ALPN, the client in `cfg` admitted) whose
/// every stream gets `answer` (if any) to its request and then nothing more,
/// the connection kept alive.
fn hostile_server(cfg: &std::path::Path, answer: Option<Response>) -> quinn::Endpoint {
    hostile_server_raw(cfg, answer.map(|a| encode(&a).unwrap()))
}

/// Like [`hostile_server`], answering every stream with `raw` bytes.
fn hostile_server_raw(cfg: &std::path::Path, answer: Option<Vec<u8>>) -> quinn::Endpoint {
    let dirs = tempfile::tempdir().unwrap();
    let (endpoint, _, allowlist) =
        common::endpoint_in(dirs.path(), &qxfer::endpoint::ServerLimits::default());
    qxfer::tls::AuthorizedClients::append(&allowlist, common::client_identity(cfg), "t").unwrap();
    let ep = endpoint.clone();
    tokio::spawn(async move {
        let _dirs = dirs;
        while let Some(incoming) = ep.accept().await {
            let answer = answer.clone();
            tokio::spawn(async move {
                let Ok(conn) = incoming.await else { return };
                let mut held = Vec::new();
                while let Ok((mut send, mut recv)) = conn.accept_bi().await {
                    let mut buf = [0u8; 4096];
                    let _ = recv.read(&mut buf).await;
                    if let Some(a) = &answer {
                        let _ = send.write_all(a).await;
                    }
                    held.push((send, recv));
                }
            });
        }
    });
    endpoint
}

#[tokio::test]
async fn a_server_that_never_answers_does_not_hang_the_client() {
    let cfg = tempfile::tempdir().unwrap();
    let endpoint = hostile_server(cfg.path(), None);
    let mut config = common::client_config(endpoint.local_addr().unwrap(), cfg.path());
    config.reply_timeout = Duration::from_secs(2);
    let client = Client::connect(&config).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("f");
    std::fs::write(&src, b"hello").unwrap();
    let started = Instant::now();
    let limit = Duration::from_secs(20);
    let put = tokio::time::timeout(limit, client.put(&src, "f", false, &|_| {}))
        .await
        .expect("put must not hang")
        .unwrap_err();
    let get = tokio::time::timeout(
        limit,
        client.get("f", &dir.path().join("g"), false, &|_| {}, &|_| {}),
    )
    .await
    .expect("get must not hang")
    .unwrap_err();
    let ls = tokio::time::timeout(limit, client.list(""))
        .await
        .expect("ls must not hang")
        .unwrap_err();
    for err in [put, get, ls] {
        assert!(err.to_string().contains("no answer within 2 s"), "{err}");
    }
    assert!(started.elapsed() < Duration::from_secs(15));
    assert!(!dir.path().join("g").exists());
    endpoint.close(0u32.into(), b"");
}

#[tokio::test]
async fn a_resume_offer_beyond_the_file_is_refused() {
    use qxfer::protocol::{Encoding, GetOffer};
    let cfg = tempfile::tempdir().unwrap();
    let held = 5u64 << 20;
    let offer = Response::GetAccepted(GetOffer {
        meta: FileMeta {
            size: 1,
            mtime: None,
            mode: None,
        },
        offset: held,
        encoding: Encoding::Raw,
    });
    let endpoint = hostile_server(cfg.path(), Some(offer));
    let config = common::client_config(endpoint.local_addr().unwrap(), cfg.path());
    let client = Client::connect(&config).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let dest = dir.path().join("g");
    std::fs::write(
        dir.path().join(format!("g{}", qxfer::client::PART_SUFFIX)),
        pattern(held as usize, 40),
    )
    .unwrap();
    let err = failing_get(&client, &dest).await;
    assert!(err.to_string().contains("offered to continue"), "{err}");
    assert!(!dest.exists());
    endpoint.close(0u32.into(), b"");
}

/// A get's whole answer: "hello" offered, sent, and a trailer whose
/// BLAKE3 is not its.
fn hello_with_a_wrong_digest() -> Vec<u8> {
    use qxfer::protocol::{Encoding, GetOffer, Trailer};
    let mut raw = encode(&Response::GetAccepted(GetOffer {
        meta: FileMeta {
            size: 5,
            mtime: None,
            mode: None,
        },
        offset: 0,
        encoding: Encoding::Raw,
    }))
    .unwrap();
    raw.extend_from_slice(b"hello");
    raw.extend(encode(&Trailer { digest: [0; 32] }).unwrap());
    raw
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_download_to_stdout_that_does_not_match_its_digest_fails() {
    let home = tempfile::tempdir().unwrap();
    let cfg = home.path().join("qxfer-config");
    let endpoint = hostile_server_raw(&cfg, Some(hello_with_a_wrong_digest()));
    let mut cmd = common::qxfer_at(home.path(), endpoint.local_addr().unwrap());
    cmd.args(["get", "x", "-o", "-", "--timeout", "5s"]);
    let out = common::output(cmd).await;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert_eq!(out.stdout, b"hello", "streamed as it came");
    assert!(
        stderr.contains("do not match the server's BLAKE3"),
        "{stderr}"
    );
    endpoint.close(0u32.into(), b"");
}

/// A small download (read whole, then written and committed in one go)
/// whose bytes do not match the server's BLAKE3 is never committed, and
/// nothing of it is kept: no name, no partial.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_small_download_that_does_not_match_its_digest_leaves_nothing() {
    let cfg = tempfile::tempdir().unwrap();
    let endpoint = hostile_server_raw(cfg.path(), Some(hello_with_a_wrong_digest()));
    let config = common::client_config(endpoint.local_addr().unwrap(), cfg.path());
    let client = Client::connect(&config).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let dest = dir.path().join("g");
    let err = failing_get(&client, &dest).await;
    assert!(err.to_string().contains("BLAKE3"), "{err}");
    assert!(tree(dir.path()).is_empty(), "{:?}", tree(dir.path()));
    endpoint.close(0u32.into(), b"");
}

/// A download framed as data of unknown length (which only uploads use)
/// is refused before anything is written; an upload from a pipe to a
/// server that never answers fails in time instead of waiting forever.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hostile_server_cannot_misuse_data_of_unknown_length() {
    use qxfer::protocol::{BlockHeader, Encoding, GetOffer};
    let cfg = tempfile::tempdir().unwrap();
    let mut raw = encode(&Response::GetAccepted(GetOffer {
        meta: FileMeta {
            size: 5,
            mtime: None,
            mode: None,
        },
        offset: 0,
        encoding: Encoding::Stream,
    }))
    .unwrap();
    raw.extend_from_slice(&BlockHeader::END);
    let endpoint = hostile_server_raw(cfg.path(), Some(raw));
    let config = common::client_config(endpoint.local_addr().unwrap(), cfg.path());
    let client = Client::connect(&config).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let dest = dir.path().join("g");
    let err = failing_get(&client, &dest).await;
    assert!(err.to_string().contains("unknown length"), "{err}");
    assert!(tree(dir.path()).is_empty(), "{:?}", tree(dir.path()));
    endpoint.close(0u32.into(), b"");

    let endpoint = hostile_server(cfg.path(), None);
    let mut config = common::client_config(endpoint.local_addr().unwrap(), cfg.path());
    config.reply_timeout = Duration::from_secs(2);
    let client = Client::connect(&config).await.unwrap();
    let (r, w) = rustix::pipe::pipe().unwrap();
    let (r, w) = (std::fs::File::from(r), std::fs::File::from(w));
    let err = tokio::time::timeout(
        Duration::from_secs(20),
        client.put_stream(r, "p", false, &|_| {}),
    )
    .await
    .expect("put - must not hang")
    .unwrap_err();
    assert!(err.to_string().contains("no answer"), "{err}");
    drop(w);
    endpoint.close(0u32.into(), b"");
}

/// A server run with an idle timeout shorter than the clients' keep-alive
/// period pings its clients itself: a client that is only waiting (for a
/// lease another server holds, say) keeps its connection, where it used
/// to be closed under it after the server's timeout. (Not hostile: it
/// lives here for the raw endpoint above.)
#[tokio::test]
async fn a_short_server_idle_timeout_does_not_drop_a_waiting_client() {
    let cfg = tempfile::tempdir().unwrap();
    let dirs = tempfile::tempdir().unwrap();
    let limits = qxfer::endpoint::ServerLimits {
        idle_timeout: Duration::from_millis(900),
        ..Default::default()
    };
    let (endpoint, _, allowlist) = common::endpoint_in(dirs.path(), &limits);
    qxfer::tls::AuthorizedClients::append(&allowlist, common::client_identity(cfg.path()), "t")
        .unwrap();
    let config = common::client_config(endpoint.local_addr().unwrap(), cfg.path());
    let (client, accepted) = tokio::join!(Client::connect(&config), async {
        endpoint.accept().await.unwrap().await.unwrap()
    });
    let client = client.unwrap();
    // Four timeouts with nothing to send: the connection is still open.
    tokio::time::sleep(Duration::from_millis(3600)).await;
    assert!(
        accepted.close_reason().is_none(),
        "closed: {:?}",
        accepted.close_reason()
    );
    // And the connection still ends when the client goes.
    client.close().await;
    let started = Instant::now();
    let reason = tokio::time::timeout(Duration::from_secs(5), accepted.closed())
        .await
        .expect("the server notices the client is gone");
    assert!(started.elapsed() < Duration::from_secs(5), "{reason:?}");
}

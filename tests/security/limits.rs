//! Malformed and oversized requests, sizes that lie, and floods of streams and connections: refused or bounded, the server serving everyone else.

use super::*;

/// Opens a raw stream, sends `bytes` as the request side, and returns the
/// refusal (a protocol error).
async fn raw_refusal(client: &Client, bytes: &[u8], finish: bool) -> String {
    raw_refusal_as(client, bytes, finish, ErrorCode::Protocol).await
}

/// [`raw_refusal`], the refusal being `code`.
async fn raw_refusal_as(client: &Client, bytes: &[u8], finish: bool, code: ErrorCode) -> String {
    let (mut send, mut recv) = client.connection().open_bi().await.unwrap();
    send.write_all(bytes).await.unwrap();
    if finish {
        send.finish().unwrap();
    }
    let resp = tokio::time::timeout(Duration::from_secs(15), read_frame(&mut recv))
        .await
        .expect("the server answers")
        .unwrap();
    match resp {
        Response::Refused(e) => {
            assert_eq!(e.code, code, "{e:?}");
            e.message
        }
        other => panic!("expected a refusal, got {other:?}"),
    }
}

both_backends!(
    oversized_garbage_truncated_and_silent_headers_are_refused,
    oversized_garbage_truncated_and_silent_headers_are_refused_on
);

async fn oversized_garbage_truncated_and_silent_headers_are_refused_on(backend: Backend) {
    let arena = Arena::with(
        backend,
        |c| c.header_timeout = Duration::from_secs(2),
        ServerLimits::default(),
    )
    .await;
    let (client, _cfg) = arena.client().await;
    let hostile = async {
        // Oversized: a length prefix of 1 GiB, and a real 70,000-byte frame.
        let msg = raw_refusal(&client, &(1u32 << 30).to_be_bytes(), true).await;
        assert!(msg.contains("exceeds the 65536-byte limit"), "{msg}");
        let mut big = 70_000u32.to_be_bytes().to_vec();
        big.extend(std::iter::repeat_n(7u8, 70_000));
        let msg = raw_refusal(&client, &big, false).await;
        assert!(msg.contains("limit"), "{msg}");
        // Garbage: a plausible length, then bytes that decode to nothing.
        let mut garbage = 5u32.to_be_bytes().to_vec();
        garbage.extend_from_slice(&[0xde, 0xad, 0xbe, 0xef, 0xff]);
        let msg = raw_refusal(&client, &garbage, true).await;
        assert!(msg.contains("malformed"), "{msg}");
        // A valid frame with bytes left over inside it.
        let mut frame = encode(&Request::List(ListRequest {
            path: String::new(),
            recursive: false,
        }))
        .unwrap();
        frame.push(0);
        let len = (frame.len() - 4) as u32;
        frame[..4].copy_from_slice(&len.to_be_bytes());
        let msg = raw_refusal(&client, &frame, true).await;
        assert!(msg.contains("trailing"), "{msg}");
        // Truncated: half a header, then the stream ends.
        let frame = encode(&Request::Get(GetRequest {
            path: "some/file".into(),
            resume: None,
            compression: Compression::Never,
        }))
        .unwrap();
        let msg = raw_refusal(&client, &frame[..frame.len() / 2], true).await;
        assert!(msg.contains("ended"), "{msg}");
        // Silence: two bytes, then nothing; the server gives up at its
        // --header-timeout (2 s here; 10 s by default), with Busy: the
        // client may try again, as a lossy path is as likely as a stall.
        let start = Instant::now();
        let msg = raw_refusal_as(&client, &[0, 0], false, ErrorCode::Busy).await;
        assert!(msg.contains("within 2 s"), "{msg}");
        assert!(start.elapsed() >= Duration::from_millis(1900));
    };
    arena.during(hostile).await;
    client.close().await;
    arena.check(&[]).await;

    // A smaller --max-header-size applies to real requests too.
    let arena = Arena::with(
        backend,
        |c| c.max_header_size = 1024,
        ServerLimits::default(),
    )
    .await;
    let (client, _cfg) = arena.client().await;
    let src = arena.local("f", b"f");
    let long_name = format!("{}/f", "d".repeat(250)).repeat(5);
    let hostile = async {
        let err = client
            .put(&src, &long_name, false, &|_| {})
            .await
            .unwrap_err();
        assert!(err.to_string().contains("1024-byte limit"), "{err}");
    };
    arena.during(hostile).await;
    client.close().await;
    arena.check(&[]).await;
}

/// A raw put declaring `declared` bytes and sending `data` and its digest.
async fn raw_put(client: &Client, name: &str, declared: u64, data: &[u8]) -> Receipt {
    let (mut send, mut recv) = client.connection().open_bi().await.unwrap();
    send.write_all(&common::put_header(name, declared))
        .await
        .unwrap();
    let _ = send.write_all(data).await;
    let digest = *blake3::hash(data).as_bytes();
    let _ = send.write_all(&encode(&Trailer { digest }).unwrap()).await;
    let _ = send.finish();
    assert!(matches!(
        read_frame::<_, Response>(&mut recv).await.unwrap(),
        Response::PutAccepted(_)
    ));
    read_frame(&mut recv).await.unwrap()
}

both_backends!(
    declared_sizes_shorter_or_longer_than_the_data_are_refused,
    declared_sizes_shorter_or_longer_than_the_data_are_refused_on
);

async fn declared_sizes_shorter_or_longer_than_the_data_are_refused_on(backend: Backend) {
    let arena = Arena::new(backend).await;
    let (client, _cfg) = arena.client().await;
    let data = pattern(3 << 20, 9);
    let hostile = async {
        // Declared shorter than the data: the bytes after it are not a trailer.
        match raw_put(&client, "short", 1 << 20, &data).await {
            Receipt::Failed(e) => {
                assert_eq!(e.code, ErrorCode::Corrupt, "{e:?}");
                assert!(e.message.contains("'short'"), "{e:?}");
            }
            other => panic!("{other:?}"),
        }
        // Declared longer: the stream ends early.
        match raw_put(&client, "long", 5 << 20, &data).await {
            Receipt::Failed(e) => assert!(
                e.message.contains("'long'") && e.message.contains("ended"),
                "{e:?}"
            ),
            other => panic!("{other:?}"),
        }
        // Right size, wrong digest.
        let mut body = b"abc".to_vec();
        body.extend(encode(&Trailer { digest: [0; 32] }).unwrap());
        let mut recv = pipelined_raw_put(&client, "bad-digest", 3, &body).await;
        assert_eq!(put_failure(&mut recv).await.code, ErrorCode::Corrupt);
        // Extra bytes after a correct trailer.
        let mut body = b"abc".to_vec();
        let digest = *blake3::hash(b"abc").as_bytes();
        body.extend(encode(&Trailer { digest }).unwrap());
        body.extend(b"more");
        let mut recv = pipelined_raw_put(&client, "extra", 3, &body).await;
        let e = put_failure(&mut recv).await;
        assert!(e.message.contains("more data"), "{e:?}");
    };
    arena.during(hostile).await;
    // The upload that ended early was interrupted like any dropped
    // connection: on a local root its bytes wait, hidden in the partial
    // store, for a resume (or for --partial-ttl). Over the object store a
    // file smaller than one part (8 MiB) goes up in one PUT after its
    // digest matched, so there is nothing to resume and nothing is kept.
    // Either way nothing is visible under a user name.
    let kept = arena.server.partials().await;
    match backend {
        Backend::Local => {
            assert_eq!(kept.len(), 1, "{kept:?}");
            assert!(kept[0].starts_with("part-"), "{kept:?}");
        }
        Backend::Object => assert!(kept.is_empty(), "{kept:?}"),
    }
    arena.server.clear_partials().await;
    client.close().await;
    arena.check(&[]).await;
}

both_backends!(
    a_thousand_streams_at_once_are_all_served_within_the_stream_limit,
    a_thousand_streams_at_once_are_all_served_within_the_stream_limit_on
);

async fn a_thousand_streams_at_once_are_all_served_within_the_stream_limit_on(backend: Backend) {
    let arena = Arena::new(backend).await;
    arena.server.place("small.txt", b"small file").await;
    let (client, _cfg) = arena.client().await;
    let hostile = async {
        let mut tasks = tokio::task::JoinSet::new();
        for i in 0..1000 {
            let conn = client.connection().clone();
            tasks.spawn(async move {
                // Opening blocks while 64 streams are open: the server's limit.
                let (mut send, mut recv) = conn.open_bi().await.unwrap();
                let req = if i % 2 == 0 {
                    Request::Get(GetRequest {
                        path: "small.txt".into(),
                        resume: None,
                        compression: Compression::Never,
                    })
                } else {
                    Request::List(ListRequest {
                        path: String::new(),
                        recursive: false,
                    })
                };
                send.write_all(&encode(&req).unwrap()).await.unwrap();
                send.finish().unwrap();
                match read_frame::<_, Response>(&mut recv).await.unwrap() {
                    Response::GetAccepted(offer) => {
                        let mut data = vec![0; offer.meta.size as usize];
                        recv.read_exact(&mut data).await.unwrap();
                        assert_eq!(data, b"small file");
                        let _: Trailer = read_frame(&mut recv).await.unwrap();
                    }
                    Response::ListAccepted => {}
                    other => panic!("{other:?}"),
                }
            });
        }
        let mut served = 0;
        while let Some(r) = tasks.join_next().await {
            r.unwrap();
            served += 1;
        }
        served
    };
    assert_eq!(arena.during(hostile).await, 1000);
    client.close().await;
    arena.check(&["small.txt"]).await;
}

/// Connects `n` clients at once from the identities in `dirs` (cycled) and
/// asks each for a listing. Returns the clients that were served (still
/// open) and the errors of the others.
async fn connect_many(
    server: &TestServer,
    dirs: &[PathBuf],
    n: usize,
) -> (Vec<Client>, Vec<ConnectError>) {
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..n {
        let mut config = common::client_config(server.addr, &dirs[i % dirs.len()]);
        config.pin = Some(server.fingerprint);
        tasks.spawn(common::admitted(config));
    }
    let (mut ok, mut refused) = (Vec::new(), Vec::new());
    while let Some(r) = tasks.join_next().await {
        match r.unwrap() {
            Ok(c) => ok.push(c),
            Err(e) => refused.push(e),
        }
    }
    (ok, refused)
}

/// Closes every client at once (each waits for its close to go out).
async fn close_all(clients: Vec<Client>) {
    let mut tasks = tokio::task::JoinSet::new();
    for c in clients {
        tasks.spawn(c.close());
    }
    while tasks.join_next().await.is_some() {}
}

both_backends!(
    three_hundred_connections_at_once_hit_clear_limits,
    three_hundred_connections_at_once_hit_clear_limits_on
);

async fn three_hundred_connections_at_once_hit_clear_limits_on(backend: Backend) {
    let arena = Arena::new(backend).await;
    // One identity opening 300 connections gets its 32 and no more.
    let one = tempfile::tempdir().unwrap();
    arena.server.authorize(one.path());
    let dirs = vec![one.path().to_owned()];
    // The identity is known only after the handshake, so while 300
    // handshakes are in flight some meet the global limit first.
    let (ok, refused) = arena.during(connect_many(&arena.server, &dirs, 300)).await;
    assert_eq!(ok.len(), 32, "--max-connections-per-client default");
    assert_eq!(refused.len(), 268);
    let mut per_client = 0;
    for e in &refused {
        match e {
            ConnectError::TooManyFromClient { .. } => {
                assert!(
                    e.to_string().contains("--max-connections-per-client"),
                    "{e}"
                );
                per_client += 1;
            }
            ConnectError::Busy { .. } => {}
            other => panic!("{other:?}"),
        }
    }
    assert!(per_client > 0, "the per-client limit refused none");
    close_all(ok).await;

    // 300 different identities fill the server's 256 slots (one is the
    // well-behaved client's); the rest are told the server is busy.
    let homes: Vec<TempDir> = (0..300).map(|_| tempfile::tempdir().unwrap()).collect();
    for h in &homes {
        arena.server.authorize(h.path());
    }
    let dirs: Vec<PathBuf> = homes.iter().map(|h| h.path().to_owned()).collect();
    let (ok, refused) = arena.during(connect_many(&arena.server, &dirs, 300)).await;
    assert_eq!(ok.len() + refused.len(), 300);
    assert!(
        (250..=255).contains(&ok.len()),
        "{} admitted with 255 slots free",
        ok.len()
    );
    for e in &refused {
        assert!(matches!(e, ConnectError::Busy { .. }), "{e:?}");
        assert!(e.to_string().contains("--max-connections"), "{e}");
    }
    close_all(ok).await;
    arena.check(&[]).await;
}

//! Who may connect and what they may do: unknown or missing client certificates, authorized_clients reloaded, a changed server key or a wrong pin, --force and --read-only.

use super::*;

both_backends!(
    unknown_and_missing_client_certificates_are_refused,
    unknown_and_missing_client_certificates_are_refused_on
);

async fn unknown_and_missing_client_certificates_are_refused_on(backend: Backend) {
    let arena = Arena::new(backend).await;
    let src = arena.local("f", b"f");
    // A client the server has never heard of.
    let stranger = tempfile::tempdir().unwrap();
    let fp = client_identity(stranger.path());
    let config = common::client_config(arena.server.addr, stranger.path());
    let hostile = async {
        let err = match Client::connect(&config).await {
            Err(e) => e,
            Ok(client) => {
                // TLS 1.3: the refusal may arrive just after our handshake ends.
                client.put(&src, "f", false, &|_| {}).await.unwrap_err();
                client.refusal().expect("the failure is a refusal")
            }
        };
        let msg = err.to_string();
        assert!(matches!(err, ConnectError::Refused { .. }), "{err:?}");
        assert!(
            msg.contains("refused this client")
                && msg.contains(&fp.to_string())
                && msg.contains("qxfer id"),
            "{msg}"
        );
        // No certificate at all.
        let verifier = PinnedServerVerifier::new(Some(arena.server.fingerprint));
        let endpoint =
            client_endpoint(arena.server.addr, verifier, None, &TransportOpts::default()).unwrap();
        let connecting = endpoint.connect(arena.server.addr, "qxfer").unwrap();
        let reason = match connecting.await {
            Err(e) => e,
            Ok(conn) => {
                let request = async {
                    let (mut send, mut recv) = conn.open_bi().await?;
                    let list = Request::List(ListRequest {
                        path: String::new(),
                        recursive: false,
                    });
                    send.write_all(&encode(&list).unwrap()).await?;
                    read_frame::<_, Response>(&mut recv).await?;
                    anyhow::Ok(())
                };
                assert!(request.await.is_err(), "served without a certificate");
                conn.closed().await
            }
        };
        let closed = match &reason {
            ConnectionError::ConnectionClosed(c) => Some(c.error_code),
            _ => None,
        };
        // TLS certificate_required (116), carried as QUIC crypto error 0x174.
        assert_eq!(closed, Some(TransportErrorCode::crypto(116)), "{reason}");
    };
    arena.during(hostile).await;
    arena.check(&[]).await;
}

both_backends!(
    authorized_clients_is_reread_when_it_changes,
    authorized_clients_is_reread_when_it_changes_on
);

async fn authorized_clients_is_reread_when_it_changes_on(backend: Backend) {
    let arena = Arena::new(backend).await;
    let cfg = tempfile::tempdir().unwrap();
    let config = common::client_config(arena.server.addr, cfg.path());
    let list_ok = || async {
        let client = Client::connect(&config).await.ok()?;
        let r = client.list("").await.ok();
        client.close().await;
        r
    };
    assert!(list_ok().await.is_none(), "not yet authorized");
    let fp = arena.server.authorize(cfg.path());
    assert!(list_ok().await.is_some(), "admitted without a restart");
    let kept: String = std::fs::read_to_string(&arena.server.allowlist)
        .unwrap()
        .lines()
        .filter(|l| !l.contains(&fp.to_string()))
        .map(|l| format!("{l}\n"))
        .collect();
    std::fs::write(&arena.server.allowlist, kept).unwrap();
    assert!(list_ok().await.is_none(), "removed again");
    // The well-behaved client, admitted earlier, keeps its connection.
    arena.check(&[]).await;
}

both_backends!(
    a_changed_server_key_and_a_wrong_pin_are_refused_by_the_client,
    a_changed_server_key_and_a_wrong_pin_are_refused_by_the_client_on
);

async fn a_changed_server_key_and_a_wrong_pin_are_refused_by_the_client_on(backend: Backend) {
    let arena = Arena::new(backend).await;
    let cfg = tempfile::tempdir().unwrap();
    let mut config = arena.server.client_config(cfg.path());
    let hostile = async {
        // Recorded on first contact...
        let client = Client::connect(&config).await.unwrap();
        let (fp, file) = client.first_contact.clone().unwrap();
        assert_eq!(fp, arena.server.fingerprint);
        client.close().await;
        // ...then the same address presents another key.
        let other: Fingerprint = "SHA256:AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA"
            .parse()
            .unwrap();
        std::fs::write(&file, format!("# comment\n{} {other}\n", config.server)).unwrap();
        let err = Client::connect(&config).await.unwrap_err();
        let msg = err.to_string();
        assert!(
            matches!(err, ConnectError::HostKeyChanged { line: 2, .. }),
            "{err:?}"
        );
        assert!(
            msg.contains("IDENTITY CHANGED")
                && msg.contains(&file.display().to_string())
                && msg.contains(&arena.server.fingerprint.to_string()),
            "{msg}"
        );
        // The record is left for the user to fix, not silently rewritten.
        assert!(std::fs::read_to_string(&file)
            .unwrap()
            .contains(&other.to_string()));
        // A wrong --pin is refused, and never recorded.
        std::fs::remove_file(&file).unwrap();
        config.pin = Some(other);
        let err = Client::connect(&config).await.unwrap_err();
        assert!(matches!(err, ConnectError::PinMismatch { .. }), "{err:?}");
        assert!(err.to_string().contains("pinned"), "{err}");
        assert!(!file.exists());
    };
    arena.during(hostile).await;
    arena.check(&[]).await;
}

both_backends!(
    a_put_to_an_existing_name_needs_force,
    a_put_to_an_existing_name_needs_force_on
);

async fn a_put_to_an_existing_name_needs_force_on(backend: Backend) {
    let arena = Arena::new(backend).await;
    arena.server.place("f", b"original").await;
    let (client, _cfg) = arena.client().await;
    let src = arena.local("f", &pattern(3 << 20, 3));
    let hostile = async {
        let (code, msg) = remote_code(client.put(&src, "f", false, &|_| {}).await);
        assert_eq!(code, ErrorCode::AlreadyExists);
        assert!(msg.contains("'f'") && msg.contains("--force"), "{msg}");
        // Raw: the data arrives anyway (pipelined); it is dropped, not
        // written. Whole and well formed, the name is what is refused;
        // without its trailer, the data (a small upload is read whole
        // before the name is checked).
        let mut body = b"evil!".to_vec();
        let digest = *blake3::hash(&body).as_bytes();
        body.extend(encode(&Trailer { digest }).unwrap());
        let mut recv = pipelined_raw_put(&client, "f", 5, &body).await;
        assert_eq!(put_failure(&mut recv).await.code, ErrorCode::AlreadyExists);
        let mut recv = pipelined_raw_put(&client, "f", 5, b"evil!").await;
        assert_eq!(put_failure(&mut recv).await.code, ErrorCode::Corrupt);
    };
    arena.during(hostile).await;
    assert_eq!(arena.server.stored("f").await, b"original");
    client.close().await;
    arena.check(&["f"]).await;
}

both_backends!(
    a_read_only_server_refuses_every_put,
    a_read_only_server_refuses_every_put_on
);

async fn a_read_only_server_refuses_every_put_on(backend: Backend) {
    let arena = Arena::with(backend, |c| c.read_only = true, ServerLimits::default()).await;
    arena.server.place("shared", b"read me").await;
    let (client, _cfg) = arena.client().await;
    let src = arena.local("up", &pattern(2 << 20, 5));
    let hostile = async {
        for (name, force) in [("up", false), ("shared", true), ("new/dir/up", false)] {
            let (code, msg) = remote_code(client.put(&src, name, force, &|_| {}).await);
            assert_eq!(code, ErrorCode::ReadOnly, "{name}");
            assert!(
                msg.contains(&format!("'{name}'")) && msg.contains("read-only"),
                "{msg}"
            );
        }
        // Nor may it create directories.
        let (code, msg) = remote_code(client.mkdir("newdir", None).await);
        assert_eq!(code, ErrorCode::ReadOnly, "{msg}");
        // Reads still work.
        let back = arena.work.path().join("shared");
        client
            .get("shared", &back, false, &|_| {}, &|_| {})
            .await
            .unwrap();
        assert_eq!(std::fs::read(&back).unwrap(), b"read me");
    };
    arena.during(hostile).await;
    client.close().await;
    arena.check(&["shared"]).await;
}

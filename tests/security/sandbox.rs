//! Escapes from the root: names that traverse, symlinks out, a directory swapped for a link mid-put, special files and a hijacked partial store, mkdir and recursive listings.

use super::*;

both_backends!(
    name_traversal_in_every_form_is_refused,
    name_traversal_in_every_form_is_refused_on
);

async fn name_traversal_in_every_form_is_refused_on(backend: Backend) {
    let arena = Arena::new(backend).await;
    let (client, _cfg) = arena.client().await;
    let src = arena.local("payload", b"payload");
    let secret = arena.outside.join("secret.txt").display().to_string();
    let too_long = "a/".repeat(2049);
    let long_component = "b".repeat(4096);
    let cases: Vec<(&str, String)> = vec![
        ("leading ..", "../outside/secret.txt".into()),
        ("leading .. alone", "..".into()),
        ("inner ..", "a/../../outside/secret.txt".into()),
        ("inner .. staying inside", "a/../b".into()),
        ("trailing ..", "a/..".into()),
        ("trailing .. with slash", "a/b/../".into()),
        ("dot then ..", "./../outside/secret.txt".into()),
        ("absolute", secret.clone()),
        ("absolute root file", "/etc/passwd".into()),
        ("bare slash", "/".into()),
        ("NUL", "a\0b".into()),
        ("NUL hiding ..", "ok\0/../../x".into()),
        ("drive with backslash", "C:\\secret".into()),
        ("drive relative", "c:secret".into()),
        ("drive with slash", "D:/secret".into()),
        ("4,098 bytes", too_long),
        ("4,096-byte component", long_component),
        ("reserved partial store", format!("{PARTIAL_DIR}/x")),
        ("reserved temporary", ".qxfer-tmp-0123".into()),
        ("empty", String::new()),
    ];
    let hostile = async {
        for (what, name) in &cases {
            let (code, msg) = remote_code(client.put(&src, name, true, &|_| {}).await);
            assert_eq!(code, ErrorCode::InvalidPath, "put {what}: {msg}");
            assert!(msg.contains("invalid remote path"), "put {what}: {msg}");
            let dest = arena.work.path().join("got");
            let (code, msg) = remote_code(client.get(name, &dest, true, &|_| {}, &|_| {}).await);
            assert_eq!(code, ErrorCode::InvalidPath, "get {what}: {msg}");
            assert!(!dest.exists());
            if !name.is_empty() && name != "/" {
                let (code, msg) = remote_code(client.list(name).await);
                assert_eq!(code, ErrorCode::InvalidPath, "ls {what}: {msg}");
            }
            // rm and mv validate every name the same way, on either side of a rename.
            let (code, msg) = remote_code(client.remove(name, true).await);
            assert_eq!(code, ErrorCode::InvalidPath, "rm -r {what}: {msg}");
            let (code, msg) = remote_code(client.rename(name, "renamed").await);
            assert_eq!(code, ErrorCode::InvalidPath, "mv {what} renamed: {msg}");
            let (code, msg) = remote_code(client.rename(SEED, name).await);
            assert_eq!(code, ErrorCode::InvalidPath, "mv seed {what}: {msg}");
        }
    };
    arena.during(hostile).await;
    // A backslash or a control character is a plain byte of a Linux name
    // (refused before issue 18, so such files could not be copied): each
    // such name is one file inside the root, never a way out of it.
    let plain = ["..\\outside\\secret.txt", "a\\b", "a\nb"];
    for name in plain {
        client.put(&src, name, true, &|_| {}).await.unwrap();
    }
    client.close().await;
    arena.check(&plain).await;
}

#[tokio::test]
async fn symlinks_out_of_the_root_are_refused_for_get_put_and_ls() {
    use std::os::unix::fs::symlink;
    let arena = Arena::new(Backend::Local).await;
    let root = arena.root().to_owned();
    symlink("../outside", root.join("rel-dir")).unwrap();
    symlink(&arena.outside, root.join("abs-dir")).unwrap();
    symlink("../outside/secret.txt", root.join("rel-file")).unwrap();
    symlink(arena.outside.join("secret.txt"), root.join("abs-file")).unwrap();
    std::fs::create_dir(root.join("inner")).unwrap();
    symlink("../../outside", root.join("inner/deep-dir")).unwrap();
    // A link that stays inside the root is followed for get and ls.
    std::fs::write(root.join("shared.txt"), b"inside").unwrap();
    symlink("../shared.txt", root.join("inner/ok")).unwrap();
    symlink(&arena.outside, root.join("gone-link")).unwrap();
    let (client, _cfg) = arena.client().await;
    let src = arena.local("new.txt", b"must not land outside");
    let dest = arena.work.path().join("got");

    let hostile = async {
        for name in [
            "rel-file",
            "abs-file",
            "rel-dir/secret.txt",
            "abs-dir/secret.txt",
            "inner/deep-dir/secret.txt",
        ] {
            let (code, msg) = remote_code(client.get(name, &dest, true, &|_| {}, &|_| {}).await);
            assert_eq!(code, ErrorCode::OutsideRoot, "get {name}: {msg}");
            assert!(
                msg.contains(&format!("'{name}'")) && msg.contains("outside the served"),
                "{msg}"
            );
            assert!(!dest.exists());
        }
        for name in [
            "rel-dir/new.txt",
            "abs-dir/new.txt",
            "rel-dir/sub/new.txt",
            "inner/deep-dir/new.txt",
            "rel-dir/dir/new.txt",
        ] {
            let (code, msg) = remote_code(client.put(&src, name, true, &|_| {}).await);
            assert_eq!(code, ErrorCode::OutsideRoot, "put {name}: {msg}");
        }
        // A put onto a link is refused whatever it points at, with or without --force.
        for (name, force) in [("rel-file", false), ("abs-file", true), ("inner/ok", true)] {
            let (code, msg) = remote_code(client.put(&src, name, force, &|_| {}).await);
            assert_eq!(code, ErrorCode::Symlink, "put {name}: {msg}");
        }
        for name in [
            "rel-dir",
            "abs-dir",
            "rel-file",
            "inner/deep-dir",
            "rel-dir/dir",
        ] {
            let (code, msg) = remote_code(client.list(name).await);
            assert_eq!(code, ErrorCode::OutsideRoot, "ls {name}: {msg}");
        }
        // rm and mv go through no link out either; a link itself is
        // removed as a link, and what it points at stays.
        for name in [
            "rel-dir/secret.txt",
            "abs-dir/secret.txt",
            "inner/deep-dir/secret.txt",
        ] {
            let (code, msg) = remote_code(client.remove(name, false).await);
            assert_eq!(code, ErrorCode::OutsideRoot, "rm {name}: {msg}");
            let (code, msg) = remote_code(client.rename(name, "stolen").await);
            assert_eq!(code, ErrorCode::OutsideRoot, "mv {name} stolen: {msg}");
        }
        let (code, msg) = remote_code(client.rename(SEED, "rel-dir/planted").await);
        assert_eq!(code, ErrorCode::OutsideRoot, "mv into a link out: {msg}");
        // rm -r of a link to a directory outside removes the link, and
        // nothing it points at (check() compares the outside afterwards).
        client.remove("gone-link", true).await.unwrap();
        assert!(std::fs::symlink_metadata(root.join("gone-link")).is_err());
        // Listing the root shows the links as links, without following them.
        let listed = client.list("").await.unwrap();
        let kind = |n: &str| listed.iter().find(|e| e.name == n).map(|e| e.kind);
        assert_eq!(kind("rel-dir"), Some(EntryKind::Symlink));
        assert_eq!(kind("abs-file"), Some(EntryKind::Symlink));
        let file_link = listed.iter().find(|e| e.name == "rel-file").unwrap();
        assert_ne!(file_link.size, SECRET.len() as u64, "lstat, not stat");
        // Inside the root, links work.
        client
            .get("inner/ok", &dest, true, &|_| {}, &|_| {})
            .await
            .unwrap();
        assert_eq!(std::fs::read(&dest).unwrap(), b"inside");
        assert_eq!(client.list("inner/ok").await.unwrap().len(), 1);
    };
    arena.during(hostile).await;
    client.close().await;
    arena
        .check(&[
            "abs-dir",
            "abs-file",
            "inner",
            "inner/deep-dir",
            "inner/ok",
            "rel-dir",
            "rel-file",
            "shared.txt",
        ])
        .await;
}

#[tokio::test]
async fn a_directory_swapped_for_a_symlink_during_a_put_cannot_redirect_it() {
    let arena = Arena::new(Backend::Local).await;
    let root = arena.root().to_owned();
    std::fs::create_dir(root.join("d")).unwrap();
    let (client, _cfg) = arena.client().await;
    let data = pattern(4 << 20, 11);
    let hostile = async {
        let (mut send, mut recv) =
            start_raw_put(&client, "d/victim", data.len() as u64, true).await;
        send.write_all(&data[..1 << 20]).await.unwrap();
        // Mid-upload, the directory is moved away and replaced by a link out.
        std::fs::rename(root.join("d"), root.join("d-moved")).unwrap();
        std::os::unix::fs::symlink(&arena.outside, root.join("d")).unwrap();
        send.write_all(&data[1 << 20..]).await.unwrap();
        let digest = *blake3::hash(&data).as_bytes();
        send.write_all(&encode(&Trailer { digest }).unwrap())
            .await
            .unwrap();
        send.finish().unwrap();
        read_frame::<_, Receipt>(&mut recv).await.unwrap()
    };
    let receipt = arena.during(hostile).await;
    // The upload finishes where it started: in the directory it opened.
    assert!(
        matches!(receipt, Receipt::Committed { size, .. } if size == data.len() as u64),
        "{receipt:?}"
    );
    assert_eq!(std::fs::read(root.join("d-moved/victim")).unwrap(), data);
    // And a new put through the swapped-in link is refused.
    let src = arena.local("again", b"again");
    let (code, _) = remote_code(client.put(&src, "d/again", false, &|_| {}).await);
    assert_eq!(code, ErrorCode::OutsideRoot);
    client.close().await;
    arena.check(&["d", "d-moved", "d-moved/victim"]).await;
}

#[tokio::test]
async fn special_files_and_a_hijacked_partial_store_cannot_hang_or_escape_the_server() {
    let arena = Arena::new(Backend::Local).await;
    let root = arena.root().to_owned();
    // A FIFO: opening it for reading would block forever without O_NONBLOCK.
    let fifo = std::ffi::CString::new(root.join("pipe").as_os_str().as_encoded_bytes()).unwrap();
    // SAFETY: mkfifo reads a valid NUL-terminated path.
    assert_eq!(unsafe { libc::mkfifo(fifo.as_ptr(), 0o644) }, 0);
    // Someone on the server replaced the partial store with a link out.
    std::os::unix::fs::symlink(&arena.outside, root.join(PARTIAL_DIR)).unwrap();
    let (client, _cfg) = arena.client().await;
    let src = arena.local("x", b"x");
    let big = arena.local("big", &vec![1u8; qxfer::protocol::RESUME_MIN as usize]);
    let hostile = async {
        let dest = arena.work.path().join("pipe");
        let start = Instant::now();
        let (code, msg) = remote_code(client.get("pipe", &dest, false, &|_| {}, &|_| {}).await);
        assert_eq!(code, ErrorCode::NotFound, "{msg}");
        assert!(msg.contains("not a regular file"), "{msg}");
        assert!(start.elapsed() < Duration::from_secs(5));
        let listed = client.list("").await.unwrap();
        let pipe = listed.iter().find(|e| e.name == "pipe").unwrap();
        assert_eq!(pipe.kind, EntryKind::Other);
        assert!(
            !listed.iter().any(|e| e.name.starts_with(".qxfer-")),
            "the partial store is never listed"
        );
        // With the store hijacked, resumable (large) puts, which are
        // assembled there, fail clearly instead of writing outside; small
        // ones never touch the store and land in the root.
        let err = client.put(&big, "big", false, &|_| {}).await.unwrap_err();
        assert!(err.to_string().contains("'big'"), "{err}");
        client.put(&src, "x", false, &|_| {}).await.unwrap();
    };
    // The well-behaved client's puts need the store too: restore it once the
    // hostile part is over, then run the usual checks.
    hostile.await;
    std::fs::remove_file(root.join(PARTIAL_DIR)).unwrap();
    arena.during(async {}).await;
    client.close().await;
    arena.check(&["pipe", "x"]).await;
}

#[tokio::test]
async fn mkdir_and_recursive_listings_stay_inside_the_root() {
    use qxfer::protocol::DirMeta;
    use std::os::unix::fs::symlink;
    let arena = Arena::new(Backend::Local).await;
    let root = arena.root().to_owned();
    symlink("../outside", root.join("rel-dir")).unwrap();
    symlink(&arena.outside, root.join("abs-dir")).unwrap();
    std::fs::create_dir_all(root.join("tree/sub")).unwrap();
    std::fs::write(root.join("tree/sub/f"), b"f").unwrap();
    symlink("../../../outside", root.join("tree/sub/out")).unwrap();
    let (client, _cfg) = arena.client().await;
    let meta = DirMeta {
        mode: Some(0o4777),
        mtime: None,
    };
    let hostile = async {
        // Mkdir resolves names like any other path (invalid names and modes
        // are checked on both back ends in `mkdir_names_and_modes_are_checked`).
        for name in [
            "rel-dir/new",
            "abs-dir/new/deeper",
            "tree/sub/out/new",
            "rel-dir",
        ] {
            let (code, msg) = remote_code(client.mkdir(name, Some(meta)).await);
            assert_eq!(code, ErrorCode::OutsideRoot, "mkdir {name:?}: {msg}");
        }
        // Recursive listings list links as links and never descend into them.
        let listed = client.list_tree("").await.unwrap();
        let names: Vec<&str> = listed.iter().map(|e| e.name.as_str()).collect();
        assert!(names.contains(&"tree/sub/out"), "{names:?}");
        assert!(
            !names
                .iter()
                .any(|n| n.contains("secret") || n.starts_with("rel-dir/")),
            "{names:?}"
        );
        assert!(!names.iter().any(|n| n.contains(".qxfer-")), "{names:?}");
        let kind = |n: &str| listed.iter().find(|e| e.name == n).map(|e| e.kind);
        assert_eq!(kind("abs-dir"), Some(EntryKind::Symlink));
        for name in ["rel-dir", "abs-dir", "tree/sub/out"] {
            let (code, msg) = remote_code(client.list_tree(name).await);
            assert_eq!(code, ErrorCode::OutsideRoot, "ls -r {name}: {msg}");
        }
    };
    arena.during(hostile).await;
    client.close().await;
    arena
        .check(&[
            "abs-dir",
            "rel-dir",
            "tree",
            "tree/sub",
            "tree/sub/f",
            "tree/sub/out",
        ])
        .await;
}

both_backends!(mkdir_names_and_modes_are_checked, mkdir_names_and_modes_on);

/// What mkdir does with hostile names and modes, on either back end (the
/// links of the test above exist only on a local root).
async fn mkdir_names_and_modes_on(backend: Backend) {
    use qxfer::protocol::DirMeta;
    let arena = Arena::new(backend).await;
    arena.server.place("file", b"f").await;
    let (client, _cfg) = arena.client().await;
    let meta = DirMeta {
        mode: Some(0o4777),
        mtime: None,
    };
    let hostile = async {
        for name in [
            "../escape",
            "/tmp/abs",
            "",
            "a/../../b",
            ".qxfer-partial/x",
            ".qxfer-sums/x",
            ".qxfer-tmp-1",
            "C:\\x",
            "a\0b",
        ] {
            let (code, msg) = remote_code(client.mkdir(name, Some(meta)).await);
            assert_eq!(code, ErrorCode::InvalidPath, "mkdir {name:?}: {msg}");
        }
        // A file is in the way: neither it nor anything beneath it becomes a directory.
        let (code, msg) = remote_code(client.mkdir("file", Some(meta)).await);
        assert_eq!(code, ErrorCode::NotDirectory, "mkdir file: {msg}");
        assert!(msg.contains("'file'") && msg.contains("a file"), "{msg}");
        let (code, msg) = remote_code(client.mkdir("file/below", Some(meta)).await);
        assert_eq!(code, ErrorCode::NotDirectory, "mkdir file/below: {msg}");
        assert!(msg.contains("parent"), "{msg}");
        // A legitimate mkdir never sets set-id or group/other write bits.
        client.mkdir("made/here", Some(meta)).await.unwrap();
        let listed = client.list("made").await.unwrap();
        assert_eq!(listed.len(), 1, "{listed:?}");
        assert_eq!(listed[0].kind, EntryKind::Dir);
        assert_eq!(listed[0].mode, Some(0o755), "{listed:?}");
    };
    arena.during(hostile).await;
    client.close().await;
    arena.check(&["file", "made", "made/here"]).await;
}

//! The local partial store: a hidden directory in the root holding uploads in progress, and its sweep.

use std::io;
use std::time::{Duration, SystemTime};

use cap_fs_ext::DirExt;
use cap_std::fs::Dir;

use crate::files;

/// The partial store: a hidden directory in the root holding uploads in progress.
pub(crate) use crate::paths::PARTIAL_DIR;

/// Opens (creating it, mode 0700, if needed) the partial store in the root.
/// It must be a real directory: a symlink there is refused, not followed.
pub(super) fn partial_store(root: &Dir) -> io::Result<Dir> {
    let mut builder = cap_std::fs::DirBuilder::new();
    cap_std::fs::DirBuilderExt::mode(&mut builder, 0o700);
    match root.create_dir_with(PARTIAL_DIR, &builder) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(e),
    }
    root.open_dir_nofollow(PARTIAL_DIR)
}

/// Deletes what interrupted uploads left in the partial store once it is
/// older than `ttl`, except partials an upload of this server holds
/// (`in_use`) and files any process holds locked for writing. Blocking.
pub(super) fn sweep(root: &Dir, ttl: Duration, in_use: &dyn Fn(&str) -> bool) -> io::Result<usize> {
    let store = match root.open_dir_nofollow(PARTIAL_DIR) {
        Ok(d) => d,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(0),
        Err(e) => return Err(e),
    };
    let now = SystemTime::now();
    let mut removed = 0;
    for entry in store.entries()?.flatten() {
        let name = entry.file_name();
        let name = name.to_string_lossy();
        let Ok(md) = store.symlink_metadata(&*name) else {
            continue;
        };
        let age = md
            .modified()
            .ok()
            .and_then(|m| now.duration_since(m.into_std()).ok())
            .unwrap_or_default();
        if age > ttl
            && !in_use(&name)
            && !(md.is_file() && files::is_being_written(&store, &name))
            && store.remove_file(&*name).is_ok()
        {
            removed += 1;
        }
    }
    Ok(removed)
}

/// How many uploads' partials the partial store holds (each is one file).
/// Blocking.
pub(super) fn count(root: &Dir) -> io::Result<usize> {
    match root.open_dir_nofollow(PARTIAL_DIR) {
        Ok(store) => Ok(store.entries()?.count()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(0),
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::files::IncomingFile;
    use cap_std::ambient_authority;
    use std::path::PathBuf;

    /// Sets a file's mtime `ago` in the past.
    fn age(dir: &Dir, name: &str, ago: Duration) {
        let f = dir.open(name).unwrap().into_std();
        f.set_modified(SystemTime::now() - ago).unwrap();
    }

    #[test]
    fn the_sweep_removes_only_stale_files_nobody_is_writing() {
        let tmp = tempfile::tempdir().unwrap();
        let root = Dir::open_ambient_dir(tmp.path(), ambient_authority()).unwrap();
        let store = partial_store(&root).unwrap();
        let hour = Duration::from_secs(3600);
        // Abandoned: old, nobody holds it.
        store.write("part-abandoned", b"x").unwrap();
        age(&store, "part-abandoned", 2 * hour);
        // Old, but an upload of this server holds it.
        store.write("part-held", b"x").unwrap();
        age(&store, "part-held", 2 * hour);
        // Recent: kept for a resume.
        store.write("part-recent", b"x").unwrap();
        // A slow upload's named temporary: old mtime, but open and locked.
        let slow = IncomingFile::create_in(
            partial_store(&root).unwrap(),
            root.try_clone().unwrap(),
            "dest",
            PathBuf::from("dest"),
        )
        .unwrap();
        std::os::unix::fs::FileExt::write_all_at(&slow.file().unwrap(), b"data", 0).unwrap();
        let slow_name = store
            .entries()
            .unwrap()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .find(|n| n.starts_with(crate::paths::TMP_PREFIX))
            .unwrap();
        age(&store, &slow_name, 2 * hour);

        let removed = sweep(&root, hour, &|name| name == "part-held").unwrap();
        assert_eq!(removed, 1);
        let mut left: Vec<_> = store
            .entries()
            .unwrap()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        left.sort();
        assert_eq!(
            left,
            vec![
                slow_name.clone(),
                "part-held".to_owned(),
                "part-recent".to_owned()
            ]
        );

        // Once the upload is gone (its temporary deleted with it), nothing is in use.
        drop(slow);
        assert!(!store.exists(&slow_name));
    }
}

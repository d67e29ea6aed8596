//! Where a download lands on this machine: the destination's directory held as a handle, reached below a tree's top without ever following a link.
//!
//! A tree download (`get -r`) writes only beneath the directory the user
//! named: every directory below that top is opened one name at a time with
//! `O_NOFOLLOW` (and created if missing), and files are created, checked,
//! committed and deleted relative to those handles, never by path. A
//! symbolic link inside the destination tree (`proj/sub -> /elsewhere`),
//! planted before the download or swapped in while it runs, is refused
//! with an error that names it, instead of being written through. The top
//! itself, and the directory of a single-file download, are the user's own
//! choice and are opened as given.

use std::ffi::OsString;
use std::io;
use std::path::{Component, Path, PathBuf};

use cap_fs_ext::DirExt;
use cap_std::fs::Dir;

use super::FileError;

/// A download's destination: its directory (open), its name there, and
/// its path for messages.
#[derive(Debug)]
pub(crate) struct Dest {
    pub(crate) dir: Dir,
    pub(crate) name: OsString,
    pub(crate) path: PathBuf,
}

impl Dest {
    /// Opens the directory of `dest`: beneath the tree top `within`
    /// without following links (created if missing), or, for a file the
    /// user named on its own, as given. Blocking.
    pub(crate) fn open(dest: &Path, within: Option<&Path>) -> Result<Self, FileError> {
        let name = dest
            .file_name()
            .ok_or_else(|| FileError::Local {
                path: dest.to_owned(),
                source: io::Error::other("does not name a file"),
            })?
            .to_owned();
        let parent = match dest.parent() {
            Some(p) if !p.as_os_str().is_empty() => p,
            _ => Path::new("."),
        };
        let dir = match within {
            Some(top) if parent.starts_with(top) => {
                let rel = parent.strip_prefix(top).expect("checked");
                open_below(top, rel, true)?
            }
            _ => Dir::open_ambient_dir(parent, cap_std::ambient_authority()).map_err(|source| {
                FileError::Local {
                    path: parent.to_owned(),
                    source,
                }
            })?,
        };
        Ok(Self {
            dir,
            name,
            path: dest.to_owned(),
        })
    }
}

/// The directory `rel` beneath the directory `top`: `top` opened as given,
/// then each name of `rel` opened without following a link (and, with
/// `create`, made first if missing). A link on the way is an error that
/// names it. Blocking.
pub(crate) fn open_below(top: &Path, rel: &Path, create: bool) -> Result<Dir, FileError> {
    let local = |path: &Path| {
        let path = path.to_owned();
        move |source| FileError::Local { path, source }
    };
    let mut dir = Dir::open_ambient_dir(top, cap_std::ambient_authority()).map_err(local(top))?;
    let mut at = top.to_owned();
    for c in rel.components() {
        let Component::Normal(name) = c else {
            return Err(FileError::Local {
                path: top.join(rel),
                source: io::Error::other("is not a plain path below the download's directory"),
            });
        };
        at.push(name);
        let next = match dir.open_dir_nofollow(name) {
            Err(e) if e.kind() == io::ErrorKind::NotFound && create => match dir.create_dir(name) {
                Err(e) if e.kind() != io::ErrorKind::AlreadyExists => return Err(local(&at)(e)),
                _ => dir.open_dir_nofollow(name),
            },
            other => other,
        };
        dir = next.map_err(|e| in_the_way(&dir, name.as_ref(), &at, e))?;
    }
    Ok(dir)
}

/// The error for `name` in `dir` that could not be opened as a directory:
/// a link (never followed), something else that is not a directory, or
/// the OS's own reason.
fn in_the_way(dir: &Dir, name: &Path, at: &Path, e: io::Error) -> FileError {
    let source = match dir.symlink_metadata(name) {
        Ok(md) if md.file_type().is_symlink() => io::Error::other(
            "is a symbolic link; a download never writes through a link inside its directory (it could lead anywhere): remove the link, or download somewhere else",
        ),
        Ok(md) if !md.is_dir() => {
            io::Error::other("is in the way: it is not a directory; move it away, or download somewhere else")
        }
        _ => e,
    };
    FileError::Local {
        path: at.to_owned(),
        source,
    }
}

/// Removes `path`, a file or (`is_dir`) a directory and everything in it,
/// which lies below the tree top `top`: through a handle on its directory
/// opened without following links, and following none inside. Blocking.
pub(crate) fn remove_below(top: &Path, path: &Path, is_dir: bool) -> Result<(), FileError> {
    let rel = path.strip_prefix(top).map_err(|_| FileError::Local {
        path: path.to_owned(),
        source: io::Error::other("is not below the download's directory"),
    })?;
    let (Some(parent), Some(name)) = (rel.parent(), rel.file_name()) else {
        return Err(FileError::Local {
            path: path.to_owned(),
            source: io::Error::other("is the download's directory itself"),
        });
    };
    let dir = open_below(top, parent, false)?;
    let gone = if is_dir {
        dir.remove_dir_all(name)
    } else {
        dir.remove_file(name)
    };
    gone.map_err(|source| FileError::Local {
        path: path.to_owned(),
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn links_below_the_top_are_refused_and_named() {
        let tmp = tempfile::tempdir().unwrap();
        let (top, outside) = (tmp.path().join("top"), tmp.path().join("outside"));
        std::fs::create_dir_all(top.join("real")).unwrap();
        std::fs::create_dir(&outside).unwrap();
        std::os::unix::fs::symlink(&outside, top.join("link")).unwrap();
        std::fs::write(top.join("file"), b"f").unwrap();
        // Made as needed, below a real directory.
        let d = Dest::open(&top.join("real/new/deeper/x"), Some(&top)).unwrap();
        assert_eq!(d.name, "x");
        assert!(top.join("real/new/deeper").is_dir());
        for (dest, why) in [
            ("link/x", "symbolic link"),
            ("link/sub/x", "symbolic link"),
            ("file/x", "in the way"),
        ] {
            let e = Dest::open(&top.join(dest), Some(&top)).unwrap_err();
            let msg = e.to_string();
            assert!(msg.contains(why), "{dest}: {msg}");
        }
        assert!(
            std::fs::read_dir(&outside).unwrap().next().is_none(),
            "nothing outside"
        );
        // A top that is itself a link is the user's choice.
        std::os::unix::fs::symlink(&top, tmp.path().join("via")).unwrap();
        Dest::open(
            &tmp.path().join("via/real/y"),
            Some(&tmp.path().join("via")),
        )
        .unwrap();
        // Removal goes through handles too: not through the link.
        std::fs::write(outside.join("keep"), b"k").unwrap();
        let e = remove_below(&top, &top.join("link/keep"), false).unwrap_err();
        assert!(e.to_string().contains("symbolic link"), "{e}");
        assert!(outside.join("keep").exists());
        remove_below(&top, &top.join("real"), true).unwrap();
        assert!(!top.join("real").exists());
    }
}

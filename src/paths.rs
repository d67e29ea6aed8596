//! Remote path validation: the only way a name from the wire becomes a path under a root.
//!
//! A remote path is `/`-separated and relative to the server root. Anything
//! that could name a place outside the root, or that a different OS would read
//! differently, is refused here before the filesystem is touched: `..`, an
//! absolute path, NUL, backslash, a drive prefix such as `C:`, over-long names.
//! Names starting with [`RESERVED_PREFIX`] belong to qxfer's temporary files
//! and are refused too, so a client can neither read nor clobber them.

use std::path::PathBuf;

use crate::protocol::{ErrorCode, RemoteError, MAX_PATH_LEN};

/// Prefix of qxfer's own temporary files; such names are hidden and reserved.
pub const RESERVED_PREFIX: &str = ".qxfer-";

/// Longest single path component, in bytes (NAME_MAX on Linux).
const MAX_COMPONENT_LEN: usize = 255;

/// A validated relative path: a non-empty list of normal components.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RemotePath {
    components: Vec<String>,
}

impl RemotePath {
    /// Validates `raw`. Empty components and `.` are skipped (`a//./b` is
    /// `a/b`); everything else that is not a plain name is an error.
    /// An empty result (the root itself) is allowed only if `allow_root`.
    pub fn parse(raw: &str, allow_root: bool) -> Result<Self, RemoteError> {
        let invalid = |why: &str| {
            RemoteError::new(
                ErrorCode::InvalidPath,
                format!("invalid remote path {:?}: {why}", truncate_for_display(raw)),
            )
        };
        if raw.len() > MAX_PATH_LEN {
            return Err(invalid("longer than 4096 bytes"));
        }
        if raw.contains('\0') {
            return Err(invalid("contains a NUL byte"));
        }
        if raw.contains('\\') {
            return Err(invalid(
                "contains a backslash; use / to separate directories",
            ));
        }
        if raw.starts_with('/') {
            return Err(invalid(
                "absolute paths are not allowed; give a path relative to the server root",
            ));
        }
        let bytes = raw.as_bytes();
        if bytes.len() >= 2 && bytes[0].is_ascii_alphabetic() && bytes[1] == b':' {
            return Err(invalid("drive prefixes are not allowed"));
        }
        let mut components = Vec::new();
        for c in raw.split('/') {
            match c {
                "" | "." => continue,
                ".." => return Err(invalid("'..' is not allowed")),
                _ if c.len() > MAX_COMPONENT_LEN => {
                    return Err(invalid("a path component is longer than 255 bytes"))
                }
                _ if c.starts_with(RESERVED_PREFIX) => {
                    return Err(invalid("names starting with .qxfer- are reserved"))
                }
                _ if c.chars().any(char::is_control) => {
                    return Err(invalid("contains a control character"))
                }
                _ => components.push(c.to_owned()),
            }
        }
        if components.is_empty() && !allow_root {
            return Err(invalid("empty path"));
        }
        Ok(Self { components })
    }

    /// This path relative to the root, for cap-std's root-confined calls
    /// (`.` for the root itself).
    pub fn relative(&self) -> PathBuf {
        if self.components.is_empty() {
            return PathBuf::from(".");
        }
        self.components.iter().collect()
    }

    /// The directory part, relative to the root; `None` for a name in the root.
    pub fn parent(&self) -> Option<PathBuf> {
        match self.components.len() {
            0 | 1 => None,
            n => Some(self.components[..n - 1].iter().collect()),
        }
    }

    /// The components, in order (none for the root).
    pub(crate) fn components(&self) -> &[String] {
        &self.components
    }

    /// The last component, if any.
    pub fn file_name(&self) -> Option<&str> {
        self.components.last().map(String::as_str)
    }
}

impl std::fmt::Display for RemotePath {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.components.join("/"))
    }
}

/// Shortens hostile names before they go into messages and logs.
fn truncate_for_display(raw: &str) -> String {
    const MAX: usize = 80;
    if raw.len() <= MAX {
        return raw.to_owned();
    }
    let mut end = MAX;
    while !raw.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}...", &raw[..end])
}

/// Joins a local directory and a remote subdirectory (`--to`) with a file name.
pub fn join_remote(dir: Option<&str>, name: &str) -> String {
    match dir.map(|d| d.trim_end_matches('/')) {
        Some(d) if !d.is_empty() => format!("{d}/{name}"),
        _ => name.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_paths_pass() {
        let p = RemotePath::parse("a/b c/ü.txt", false).unwrap();
        assert_eq!(p.to_string(), "a/b c/ü.txt");
        assert_eq!(p.relative(), PathBuf::from("a/b c/ü.txt"));
        assert_eq!(p.parent(), Some(PathBuf::from("a/b c")));
        assert_eq!(RemotePath::parse("x", false).unwrap().parent(), None);
        assert_eq!(
            RemotePath::parse("", true).unwrap().relative(),
            PathBuf::from(".")
        );
        assert_eq!(
            RemotePath::parse("a//./b/", false).unwrap().to_string(),
            "a/b"
        );
        assert_eq!(RemotePath::parse("", true).unwrap().to_string(), "");
        assert!(
            RemotePath::parse("notes 10:30.txt", false).is_ok(),
            "colons are fine outside a drive prefix"
        );
    }

    #[test]
    fn escapes_are_refused() {
        for bad in [
            "..",
            "../x",
            "a/../../x",
            "a/..",
            "/etc/passwd",
            "//x",
            "a\0b",
            "a\\b",
            "..\\x",
            "C:",
            "c:/x",
            "",
            ".",
            "a/.qxfer-tmp-1",
            "line\nbreak",
        ] {
            let err = RemotePath::parse(bad, false).unwrap_err();
            assert_eq!(err.code, ErrorCode::InvalidPath, "{bad:?}");
        }
        let long = "a/".repeat(2100);
        assert!(RemotePath::parse(&long, false).is_err());
        assert!(RemotePath::parse(&"x".repeat(256), false).is_err());
    }

    #[test]
    fn qxfers_own_names_are_all_reserved() {
        for own in [crate::exchange::TMP_PREFIX, crate::server::PARTIAL_DIR] {
            assert!(own.starts_with(RESERVED_PREFIX), "{own}");
            assert!(RemotePath::parse(own, true).is_err());
            assert!(RemotePath::parse(&format!("{own}/x"), true).is_err());
        }
    }

    #[test]
    fn join_remote_handles_trailing_slash() {
        assert_eq!(join_remote(None, "f"), "f");
        assert_eq!(join_remote(Some("d/"), "f"), "d/f");
        assert_eq!(join_remote(Some(""), "f"), "f");
    }
}

//! Remote path validation: the only way a name from the wire becomes a path under a root; and how names that are not UTF-8 travel.
//!
//! A remote path is `/`-separated and relative to the server root. Anything
//! that could name a place outside the root is refused here before the
//! filesystem is touched: `..`, an absolute path, NUL, a drive prefix such
//! as `C:`, over-long names. Names starting with [`RESERVED_PREFIX`] belong
//! to qxfer's temporary files and are refused too, so a client can neither
//! read nor clobber them.
//!
//! Names are bytes on Linux, UTF-8 on the wire. A name's bytes that are not
//! UTF-8 travel as pairs of Unicode noncharacters (code points U+FDD0 to
//! U+FDEF, which Unicode sets aside for a program's internal use): byte `b`
//! becomes U+FDD0 + (b >> 4) followed by U+FDE0 + (b & 15). The same
//! escape carries a name's own noncharacters of that range (byte by byte),
//! so every name has exactly one wire form and comes back byte for byte
//! ([`name_to_wire`], [`name_from_wire`]); a wire name that is not that one
//! form is refused. Control characters and backslashes are plain bytes of
//! a Linux name and travel as they are; whoever prints a name shows it
//! with [`shown`], never raw.

use std::ffi::{OsStr, OsString};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::path::PathBuf;

use crate::protocol::{ErrorCode, RemoteError, MAX_PATH_LEN};

/// Prefix of qxfer's own temporary files; such names are hidden and reserved.
pub(crate) const RESERVED_PREFIX: &str = ".qxfer-";

/// The partial store of a server's root: a hidden directory holding
/// uploads in progress (both stores keep it under this name).
pub const PARTIAL_DIR: &str = ".qxfer-partial";

/// Prefix of the temporaries a file is written to before its commit.
pub(crate) const TMP_PREFIX: &str = ".qxfer-tmp-";

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
                // Bounded before decoding; the limit is on the name's own
                // bytes (an escaped byte takes six on the wire).
                _ if c.len() > 6 * MAX_COMPONENT_LEN => {
                    return Err(invalid("a path component is longer than 255 bytes"))
                }
                _ if c.starts_with(RESERVED_PREFIX) => {
                    return Err(invalid("names starting with .qxfer- are reserved"))
                }
                _ => match name_from_wire(c) {
                    Some(name) if name.len() > MAX_COMPONENT_LEN => {
                        return Err(invalid("a path component is longer than 255 bytes"))
                    }
                    Some(name) if name != "." && name != ".." => components.push(c.to_owned()),
                    _ => {
                        return Err(invalid(
                            "a name's escaped bytes are not in their one valid form",
                        ))
                    }
                },
            }
        }
        if components.is_empty() && !allow_root {
            return Err(invalid("empty path"));
        }
        Ok(Self { components })
    }

    /// This path relative to the root, as the filesystem names it (bytes,
    /// escapes undone), for cap-std's root-confined calls (`.` for the root).
    pub fn relative(&self) -> PathBuf {
        if self.components.is_empty() {
            return PathBuf::from(".");
        }
        self.components.iter().map(|c| local_name(c)).collect()
    }

    /// The directory part, relative to the root, as the filesystem names
    /// it; `None` for a name in the root.
    pub fn parent(&self) -> Option<PathBuf> {
        match self.components.len() {
            0 | 1 => None,
            n => Some(
                self.components[..n - 1]
                    .iter()
                    .map(|c| local_name(c))
                    .collect(),
            ),
        }
    }

    /// The last component as the filesystem names it (bytes), if any.
    pub(crate) fn local_file_name(&self) -> Option<OsString> {
        self.components.last().map(|c| local_name(c))
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

/// Shown with [`shown`]: a name that needs escapes is quoted and escaped,
/// so that messages and logs never carry a name's control characters raw.
impl std::fmt::Display for RemotePath {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&shown(&self.components.join("/")))
    }
}

impl RemotePath {
    /// The path as it travels (wire form, `/`-separated), for requests and
    /// keys; [`Display`](std::fmt::Display) is for people.
    pub fn wire(&self) -> String {
        self.components.join("/")
    }
}

/// The first and last code points of the escape (see the module's notes).
const ESCAPE_HIGH: u32 = 0xFDD0;
const ESCAPE_LOW: u32 = 0xFDE0;

fn is_escape_char(c: char) -> bool {
    (ESCAPE_HIGH..ESCAPE_LOW + 16).contains(&u32::from(c))
}

/// A local name (bytes) in its wire form: UTF-8 as it is, except bytes
/// that are not UTF-8 and the noncharacters U+FDD0..U+FDEF, which are
/// escaped byte by byte. Total and one-to-one: [`name_from_wire`] undoes it.
pub(crate) fn name_to_wire(name: &OsStr) -> String {
    let bytes = name.as_bytes();
    let mut out = String::with_capacity(bytes.len());
    let mut rest = bytes;
    while !rest.is_empty() {
        let (valid, bad) = match std::str::from_utf8(rest) {
            Ok(s) => (s, 0),
            Err(e) => {
                let valid = std::str::from_utf8(&rest[..e.valid_up_to()]).expect("valid prefix");
                (valid, e.error_len().unwrap_or(rest.len() - e.valid_up_to()))
            }
        };
        for c in valid.chars() {
            if is_escape_char(c) {
                let mut b = [0u8; 4];
                for byte in c.encode_utf8(&mut b).bytes() {
                    push_escaped(&mut out, byte);
                }
            } else {
                out.push(c);
            }
        }
        let at = valid.len();
        for &byte in &rest[at..at + bad] {
            push_escaped(&mut out, byte);
        }
        rest = &rest[at + bad..];
    }
    out
}

fn push_escaped(out: &mut String, byte: u8) {
    let high = char::from_u32(ESCAPE_HIGH + u32::from(byte >> 4)).expect("a noncharacter");
    let low = char::from_u32(ESCAPE_LOW + u32::from(byte & 15)).expect("a noncharacter");
    out.push(high);
    out.push(low);
}

/// The local name (bytes) a wire name stands for, if the wire name is the
/// one form [`name_to_wire`] gives for those bytes: escapes in pairs, only
/// for bytes that need them, and no NUL or `/` among the bytes.
pub(crate) fn name_from_wire(wire: &str) -> Option<OsString> {
    let mut bytes = Vec::with_capacity(wire.len());
    let mut chars = wire.chars();
    while let Some(c) = chars.next() {
        if !is_escape_char(c) {
            let mut b = [0u8; 4];
            bytes.extend_from_slice(c.encode_utf8(&mut b).as_bytes());
            continue;
        }
        let high = u32::from(c).checked_sub(ESCAPE_HIGH).filter(|h| *h < 16)?;
        let low = chars
            .next()
            .map(u32::from)?
            .checked_sub(ESCAPE_LOW)
            .filter(|l| *l < 16)?;
        bytes.push((high << 4 | low) as u8);
    }
    if bytes.contains(&0) || bytes.contains(&b'/') {
        return None;
    }
    let name = OsString::from_vec(bytes);
    (name_to_wire(&name) == wire).then_some(name)
}

/// Whether `c` reorders the text around it on a terminal (bidirectional
/// embeddings, overrides and isolates): a name could otherwise look like
/// another one.
fn is_bidi(c: char) -> bool {
    matches!(u32::from(c), 0x200E | 0x200F | 0x202A..=0x202E | 0x2066..=0x2069)
}

/// The local name of a component already validated (see [`RemotePath::parse`]).
fn local_name(component: &str) -> OsString {
    name_from_wire(component).expect("validated components decode")
}

/// A name (wire form) as people should see it: as it is when that is
/// unambiguous and harmless; else in double quotes, with `\n`, `\t`,
/// `\\`, `\"` and `\xNN` for control characters, backslashes, quotes
/// and bytes that are not UTF-8 (so a name can never move the cursor or
/// recolour a terminal, and no two names look alike).
pub fn shown(wire: &str) -> String {
    let plain = !wire.starts_with('"')
        && !wire
            .chars()
            .any(|c| c.is_control() || c == '\\' || is_escape_char(c) || is_bidi(c));
    if plain {
        return wire.to_owned();
    }
    let mut out = String::from("\"");
    let mut chars = wire.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\t' => out.push_str("\\t"),
            '\r' => out.push_str("\\r"),
            c if is_escape_char(c) => {
                let high = u32::from(c).wrapping_sub(ESCAPE_HIGH) & 15;
                let low = chars
                    .next()
                    .map_or(0, |l| u32::from(l).wrapping_sub(ESCAPE_LOW) & 15);
                out.push_str(&format!("\\x{:02x}", high << 4 | low));
            }
            c if c.is_control() && u32::from(c) < 0x80 => {
                out.push_str(&format!("\\x{:02x}", u32::from(c)));
            }
            c if c.is_control() || is_bidi(c) => {
                out.push_str(&format!("\\u{{{:x}}}", u32::from(c)))
            }
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// A local path as people should see it: [`shown`] of its wire form
/// (bytes that are not UTF-8 as `\xNN`, control characters escaped).
pub(crate) fn shown_local(path: &std::path::Path) -> String {
    shown(&name_to_wire(path.as_os_str()))
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
pub(crate) fn join_remote(dir: Option<&str>, name: &str) -> String {
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
            "C:",
            "c:/x",
            "",
            ".",
            "a/.qxfer-tmp-1",
            // An escape that is not the one form of its bytes: a plain
            // byte escaped, a half pair, an escaped slash or dot-dot.
            "\u{FDD6}\u{FDE1}",
            "x\u{FDD8}",
            "\u{FDD2}\u{FDEF}",
            "\u{FDD2}\u{FDEE}\u{FDD2}\u{FDEE}",
        ] {
            let err = RemotePath::parse(bad, false).unwrap_err();
            assert_eq!(err.code, ErrorCode::InvalidPath, "{bad:?}");
        }
        let long = "a/".repeat(2100);
        assert!(RemotePath::parse(&long, false).is_err());
        assert!(RemotePath::parse(&"x".repeat(256), false).is_err());
        // The limit counts the name's own bytes, not its escapes.
        let widest = name_to_wire(OsStr::from_bytes(&[0xff; 255]));
        assert!(RemotePath::parse(&widest, false).is_ok());
        let too_wide = name_to_wire(OsStr::from_bytes(&[0xff; 256]));
        assert!(RemotePath::parse(&too_wide, false).is_err());
    }

    #[test]
    fn any_linux_name_travels_and_comes_back_byte_for_byte() {
        let names: [&[u8]; 8] = [
            b"plain.txt",
            "ü and ✓".as_bytes(),
            b"caf\xe9",
            b"\xff\xfe\x80",
            b"line\nbreak\\back",
            "\u{FDD0} own noncharacter".as_bytes(),
            b"\xef\xb7",
            b"\x1b[31mred",
        ];
        for bytes in names {
            let name = OsStr::from_bytes(bytes);
            let wire = name_to_wire(name);
            assert_eq!(name_from_wire(&wire).as_deref(), Some(name), "{bytes:?}");
            let path = RemotePath::parse(&format!("d/{wire}"), false).unwrap();
            assert_eq!(path.local_file_name().as_deref(), Some(name));
            assert_eq!(path.relative(), PathBuf::from("d").join(name));
            let seen = path.to_string();
            assert!(!seen.chars().any(char::is_control), "{seen:?}");
        }
        assert_eq!(shown("plain.txt"), "plain.txt");
        assert_eq!(
            shown(&name_to_wire(OsStr::from_bytes(b"caf\xe9"))),
            "\"caf\\xe9\""
        );
        assert_eq!(shown("a\nb"), "\"a\\nb\"");
        assert_eq!(
            shown("a\\nb"),
            "\"a\\\\nb\"",
            "a backslash is shown escaped"
        );
        assert_ne!(shown("\"x\""), shown("x"));
        assert_eq!(shown("a\u{202e}b"), "\"a\\u{202e}b\"");
    }

    proptest::proptest! {
        #[test]
        fn wire_names_are_one_to_one(bytes in proptest::collection::vec(1u8..=255, 1..40)) {
            proptest::prop_assume!(!bytes.contains(&b'/'));
            let name = OsStr::from_bytes(&bytes);
            let wire = name_to_wire(name);
            let back = name_from_wire(&wire);
            proptest::prop_assert_eq!(back.as_deref(), Some(name));
        }
    }

    #[test]
    fn qxfers_own_names_are_all_reserved() {
        for own in [TMP_PREFIX, PARTIAL_DIR] {
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

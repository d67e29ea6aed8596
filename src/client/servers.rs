//! Servers by name: `config.toml` in the client's config directory, so that `--server home` (or QXFER_SERVER=home) stands for an address and, optionally, a pinned fingerprint.
//!
//! ```toml
//! [servers.home]
//! address = "nas.example.net:65432"
//! pin = "SHA256:..."          # optional
//!
//! [servers.fleet]             # servers of one identity over one store
//! address = ["a.example.net:65432", "b.example.net:65432"]
//! ```
//!
//! As with ssh's config, a name defined here wins over a host of the same
//! name; anything else given to `--server` is an address. A file that does
//! not parse is an error naming the file, the line and what is wrong.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::tls::Fingerprint;

/// The file's name in the client's config directory.
pub(crate) const CONFIG_FILE: &str = "config.toml";

/// One named server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct NamedServer {
    /// Its name in the file.
    pub name: String,
    /// HOST:PORT (or HOST, for the default port): one, or several for
    /// servers that share one identity and one store (`address = [...]`).
    pub addresses: Vec<String>,
    /// The fingerprint to accept, if pinned.
    pub pin: Option<Fingerprint>,
}

/// What `config.toml` says.
#[derive(Debug, Default)]
pub(crate) struct ClientFile {
    /// Where it was read from.
    pub path: PathBuf,
    /// The servers, by name.
    pub servers: BTreeMap<String, NamedServer>,
}

/// A config file that cannot be used.
#[derive(Debug, thiserror::Error)]
pub(crate) enum ConfigError {
    /// It exists but cannot be read.
    #[error("cannot read {}: {source}", path.display())]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    /// It does not parse, or a value is wrong.
    #[error("{}:{line}: {message}; fix or remove the file (see `qxfer servers --help`)", path.display())]
    Invalid {
        path: PathBuf,
        line: usize,
        message: String,
    },
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Raw {
    #[serde(default)]
    servers: BTreeMap<String, toml::Spanned<RawServer>>,
}

/// `address = "HOST:PORT"` or `address = ["HOST:PORT", ...]`.
#[derive(Deserialize)]
#[serde(untagged)]
enum Addresses {
    One(String),
    Many(Vec<String>),
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawServer {
    address: toml::Spanned<Addresses>,
    pin: Option<toml::Spanned<String>>,
}

impl ClientFile {
    /// Reads `config.toml` from `dir`; no file means no names.
    pub(crate) fn load(dir: &Path) -> Result<Self, ConfigError> {
        let path = dir.join(CONFIG_FILE);
        let text = match std::fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Ok(Self {
                    path,
                    servers: BTreeMap::new(),
                })
            }
            Err(source) => return Err(ConfigError::Read { path, source }),
        };
        Self::parse(&text, path)
    }

    /// Parses the text of a config file read from `path`.
    pub(crate) fn parse(text: &str, path: PathBuf) -> Result<Self, ConfigError> {
        let invalid = |at: usize, message: String| ConfigError::Invalid {
            path: path.clone(),
            line: line_of(text, at),
            message,
        };
        let raw: Raw = toml::from_str(text).map_err(|e| {
            let at = e.span().map_or(0, |s| s.start);
            invalid(at, e.message().trim_end_matches('\n').to_owned())
        })?;
        let mut servers = BTreeMap::new();
        for (name, entry) in raw.servers {
            let at = entry.span().start;
            let entry = entry.into_inner();
            if name.is_empty() || name.contains(|c: char| c.is_whitespace() || c == ':') {
                return Err(invalid(
                    at,
                    format!("server name {name:?} must be a word without spaces or ':'"),
                ));
            }
            let given = match entry.address.get_ref() {
                Addresses::One(a) => vec![a.trim().to_owned()],
                Addresses::Many(all) => all.iter().map(|a| a.trim().to_owned()).collect(),
            };
            if given.is_empty() {
                return Err(invalid(
                    entry.address.span().start,
                    format!("server '{name}': address = [] names no address"),
                ));
            }
            for address in &given {
                crate::client::split_server(address).map_err(|_| {
                    invalid(
                        entry.address.span().start,
                        format!("server '{name}': address {address:?} is not HOST:PORT"),
                    )
                })?;
            }
            let pin =
                match entry.pin {
                    None => None,
                    Some(p) => Some(p.get_ref().parse::<Fingerprint>().map_err(|e| {
                        invalid(p.span().start, format!("server '{name}': pin: {e}"))
                    })?),
                };
            servers.insert(
                name.clone(),
                NamedServer {
                    name,
                    addresses: given,
                    pin,
                },
            );
        }
        Ok(Self { path, servers })
    }

    /// The server `--server` names, if it is a name defined here.
    pub(crate) fn named(&self, server: &str) -> Option<&NamedServer> {
        self.servers.get(server)
    }
}

/// The 1-based line of byte offset `at` in `text`.
fn line_of(text: &str, at: usize) -> usize {
    text.as_bytes()[..at.min(text.len())]
        .iter()
        .filter(|b| **b == b'\n')
        .count()
        + 1
}

#[cfg(test)]
mod tests {
    use super::*;

    const PIN: &str = "SHA256:AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA";

    fn parse(text: &str) -> Result<ClientFile, ConfigError> {
        ClientFile::parse(text, PathBuf::from("/cfg/config.toml"))
    }

    #[test]
    fn servers_are_read_with_optional_pins() {
        let file = parse(&format!(
            "# mine\n[servers.home]\naddress = \"nas.lan:65432\"\npin = \"{PIN}\"\n\n[servers.lab]\naddress = \"[::1]:7000\"\n"
        ))
        .unwrap();
        let home = file.named("home").unwrap();
        assert_eq!(home.addresses, ["nas.lan:65432"]);
        assert_eq!(home.pin, Some(PIN.parse().unwrap()));
        assert_eq!(file.named("lab").unwrap().pin, None);
        assert!(file.named("nas.lan:65432").is_none());
        assert!(parse("").unwrap().servers.is_empty());
    }

    #[test]
    fn a_server_may_have_several_addresses() {
        let file = parse("[servers.fleet]\naddress = [\"a.lan:1\", \" b.lan:2 \"]\n").unwrap();
        assert_eq!(
            file.named("fleet").unwrap().addresses,
            ["a.lan:1", "b.lan:2"]
        );
        let m = parse("[servers.fleet]\naddress = [\"a.lan:1\", \"b:c:d\"]\n")
            .unwrap_err()
            .to_string();
        assert!(m.contains("b:c:d") && m.contains("HOST:PORT"), "{m}");
        let m = parse("[servers.fleet]\naddress = []\n")
            .unwrap_err()
            .to_string();
        assert!(m.contains("no address"), "{m}");
    }

    #[test]
    fn mistakes_name_the_file_and_line() {
        let msg = |text: &str| parse(text).unwrap_err().to_string();
        let m = msg("[servers.home]\naddress = \"a:1\"\n\n[servers.bad\n");
        assert!(m.starts_with("/cfg/config.toml:4: "), "{m}");
        let m = msg("[servers.home]\naddress = \"a:1\"\nport = 5\n");
        assert!(
            m.starts_with("/cfg/config.toml:3: ") && m.contains("port"),
            "{m}"
        );
        let m = msg("[servers.home]\naddress = \"a:1\"\npin = \"SHA256:nope\"\n");
        assert!(
            m.starts_with("/cfg/config.toml:3: ") && m.contains("'home'"),
            "{m}"
        );
        let m = msg("[servers.home]\naddress = \"a:b:c\"\n");
        assert!(
            m.starts_with("/cfg/config.toml:2: ") && m.contains("HOST:PORT"),
            "{m}"
        );
        let m = msg("[servers.home]\npin = \"x\"\n");
        assert!(m.contains("address"), "{m}");
        let m = msg("[servers.\"my home\"]\naddress = \"a:1\"\n");
        assert!(m.contains("without spaces"), "{m}");
    }

    #[test]
    fn no_file_means_no_names() {
        let dir = tempfile::tempdir().unwrap();
        let file = ClientFile::load(dir.path()).unwrap();
        assert!(file.servers.is_empty());
        std::fs::write(
            dir.path().join(CONFIG_FILE),
            "[servers.x]\naddress = \"h:1\"\n",
        )
        .unwrap();
        assert_eq!(ClientFile::load(dir.path()).unwrap().servers.len(), 1);
    }
}

//! TLS identities and trust: self-signed certificates, fingerprints, known_hosts, and pinning.
//!
//! qxfer does not use certificate authorities. A peer is identified by the
//! SHA-256 fingerprint of its self-signed certificate, as ssh identifies hosts
//! by their key. The client's [`PinnedServerVerifier`] accepts exactly one
//! fingerprint (from `--pin` or known_hosts) or, on first contact, records the
//! one it saw so the caller can store it. Either way it still verifies the
//! TLS 1.3 handshake signature, which proves the server holds the private key.
//!
//! Clients are identified the same way. The server's [`ClientVerifier`]
//! requires a client certificate and admits only the fingerprints in
//! [`AuthorizedClients`] (`<certs>/authorized_clients`, like ssh's
//! authorized_keys), again after checking the handshake signature.

use std::fmt;
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::Arc;

use base64::engine::general_purpose::STANDARD_NO_PAD;
use base64::Engine as _;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

use crate::protocol::ALPN;

mod authorized;
mod known_hosts;
mod verify;

pub use authorized::*;
pub(crate) use known_hosts::*;
pub use verify::*;

/// The SHA-256 digest of a certificate's DER encoding, shown as `SHA256:<base64>`
/// like OpenSSH's key fingerprints.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Fingerprint([u8; 32]);

impl Fingerprint {
    /// The 32 digest bytes.
    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }

    /// Fingerprint of a DER-encoded certificate.
    pub fn of(cert: &CertificateDer<'_>) -> Self {
        let d = ring::digest::digest(&ring::digest::SHA256, cert.as_ref());
        let mut out = [0u8; 32];
        out.copy_from_slice(d.as_ref());
        Self(out)
    }
}

impl fmt::Display for Fingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SHA256:{}", STANDARD_NO_PAD.encode(self.0))
    }
}

impl fmt::Debug for Fingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

/// Why a fingerprint string was not accepted.
#[derive(Debug, thiserror::Error)]
#[error("invalid fingerprint {0:?}: expected SHA256: followed by 43 base64 characters, as `qxfer serve` prints")]
pub struct BadFingerprint(String);

impl FromStr for Fingerprint {
    type Err = BadFingerprint;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || BadFingerprint(s.to_owned());
        let b64 = s.trim().strip_prefix("SHA256:").ok_or_else(bad)?;
        let bytes = STANDARD_NO_PAD
            .decode(b64.trim_end_matches('='))
            .map_err(|_| bad())?;
        Ok(Self(bytes.try_into().map_err(|_| bad())?))
    }
}

/// Errors loading or creating an identity or a trust file.
#[derive(Debug, thiserror::Error)]
pub enum TrustError {
    /// A file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file concerned.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// A certificate or key file exists but cannot be used.
    #[error("{path}: {why}; move it away to generate a new identity")]
    BadFile {
        /// The file concerned.
        path: PathBuf,
        /// What is wrong with it.
        why: String,
    },
    /// A line of a list of fingerprints (known_hosts) cannot be read. The
    /// file holds no identity: the advice is to fix that one line, never to
    /// move the file away (which would make every server a first contact).
    #[error("{path} line {line}: {why}; each line reads `HOST:PORT SHA256:...` (as qxfer writes it on a first contact): fix that line, or delete it to learn that server's fingerprint again on the next contact")]
    BadLine {
        /// The file concerned.
        path: PathBuf,
        /// The line number, from 1.
        line: usize,
        /// What is wrong with it.
        why: String,
    },
    /// rcgen failed to generate a certificate.
    #[error("generating a certificate: {0}")]
    Generate(#[from] rcgen::Error),
    /// rustls refused the configuration.
    #[error("TLS configuration: {0}")]
    Tls(#[from] rustls::Error),
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> TrustError + '_ {
    move |source| TrustError::Io {
        path: path.to_owned(),
        source,
    }
}

/// A certificate and its private key: who this endpoint is.
#[derive(Debug)]
pub struct Identity {
    /// The self-signed certificate, DER.
    pub cert: CertificateDer<'static>,
    /// Its private key.
    pub key: PrivateKeyDer<'static>,
}

impl Identity {
    /// Loads `<dir>/<name>.crt` and `<dir>/<name>.key`, or generates both with
    /// rcgen if neither exists. The key is written with mode 0600 and both
    /// files appear atomically, so a crash never leaves half an identity.
    pub fn load_or_generate(dir: &Path, name: &str) -> Result<Self, TrustError> {
        let cert_path = dir.join(format!("{name}.crt"));
        let key_path = dir.join(format!("{name}.key"));
        if cert_path.exists() && key_path.exists() {
            return Self::load(&cert_path, &key_path);
        }
        // Several processes may start on a fresh directory at once (servers
        // sharing one --certs, clients run in parallel): one generates while
        // the others wait on this lock, then load what it wrote.
        create_private_dir(dir)?;
        let lock_path = dir.join(format!(".{name}.lock"));
        let lock = fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .map_err(io_err(&lock_path))?;
        rustix::fs::flock(&lock, rustix::fs::FlockOperation::LockExclusive)
            .map_err(|e| io_err(&lock_path)(e.into()))?;
        match (cert_path.exists(), key_path.exists()) {
            (true, true) => Self::load(&cert_path, &key_path),
            (false, false) => Self::generate(dir, &cert_path, &key_path),
            (true, false) => Err(TrustError::BadFile {
                path: cert_path,
                why: format!("its key {} is missing", key_path.display()),
            }),
            (false, true) => Err(TrustError::BadFile {
                path: key_path,
                why: format!("its certificate {} is missing", cert_path.display()),
            }),
        }
    }

    fn load(cert_path: &Path, key_path: &Path) -> Result<Self, TrustError> {
        let cert = CertificateDer::from_pem_file(cert_path).map_err(|e| TrustError::BadFile {
            path: cert_path.to_owned(),
            why: format!("not a PEM certificate ({e})"),
        })?;
        let key = PrivateKeyDer::from_pem_file(key_path).map_err(|e| TrustError::BadFile {
            path: key_path.to_owned(),
            why: format!("not a PEM private key ({e})"),
        })?;
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = fs::metadata(key_path)
                .map_err(io_err(key_path))?
                .permissions()
                .mode();
            if mode & 0o077 != 0 {
                tracing::warn!(
                    "private key {} is readable by other users (mode {:o}); run chmod 600 on it",
                    key_path.display(),
                    mode & 0o777
                );
            }
        }
        Ok(Self { cert, key })
    }

    fn generate(dir: &Path, cert_path: &Path, key_path: &Path) -> Result<Self, TrustError> {
        create_private_dir(dir)?;
        let rcgen::CertifiedKey { cert, signing_key } =
            rcgen::generate_simple_self_signed(vec!["qxfer".to_owned(), "localhost".to_owned()])?;
        // Key first: a certificate without its key would be unusable.
        write_new_file(key_path, signing_key.serialize_pem().as_bytes())?;
        write_new_file(cert_path, cert.pem().as_bytes())?;
        Ok(Self {
            cert: cert.der().clone(),
            key: PrivateKeyDer::Pkcs8(signing_key.serialize_der().into()),
        })
    }

    /// This identity's fingerprint.
    pub fn fingerprint(&self) -> Fingerprint {
        Fingerprint::of(&self.cert)
    }
}

/// Creates `dir` (and parents) if missing; new directories get mode 0700.
pub(crate) fn create_private_dir(dir: &Path) -> Result<(), TrustError> {
    let mut b = fs::DirBuilder::new();
    b.recursive(true);
    #[cfg(unix)]
    std::os::unix::fs::DirBuilderExt::mode(&mut b, 0o700);
    b.create(dir).map_err(io_err(dir))
}

/// Writes a new file atomically with mode 0600; fails if `path` already exists
/// (another process generated an identity first).
fn write_new_file(path: &Path, contents: &[u8]) -> Result<(), TrustError> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let mut tmp = tempfile::Builder::new()
        .prefix(".qxfer-new-")
        .tempfile_in(dir)
        .map_err(io_err(dir))?;
    tmp.write_all(contents).map_err(io_err(path))?;
    tmp.as_file().sync_all().map_err(io_err(path))?;
    tmp.persist_noclobber(path)
        .map_err(|e| io_err(path)(e.error))?;
    Ok(())
}

/// A trust file's text; a missing file reads as empty.
fn read_or_empty(path: &Path) -> std::io::Result<String> {
    match fs::read_to_string(path) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(String::new()),
        other => other,
    }
}

/// The lines of a trust file that say something: (1-based line number,
/// trimmed text), without blank lines and `#` comments.
fn content_lines(text: &str) -> impl Iterator<Item = (usize, &str)> {
    text.lines()
        .map(str::trim)
        .enumerate()
        .map(|(i, l)| (i + 1, l))
        .filter(|(_, l)| !l.is_empty() && !l.starts_with('#'))
}

/// The rustls crypto provider qxfer uses everywhere (ring).
pub fn crypto_provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// rustls configuration for a server presenting `identity` and admitting
/// clients through `clients`; TLS 1.3 only, never 0-RTT.
pub(crate) fn server_crypto(
    identity: &Identity,
    clients: Arc<ClientVerifier>,
) -> Result<rustls::ServerConfig, TrustError> {
    let mut cfg = rustls::ServerConfig::builder_with_provider(crypto_provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(clients)
        .with_single_cert(vec![identity.cert.clone()], identity.key.clone_key())?;
    cfg.alpn_protocols = vec![ALPN.to_vec()];
    // No 0-RTT: early data can be replayed by an attacker, and a replayed put
    // would write a file twice. Zero is rustls' default; stated here on purpose.
    cfg.max_early_data_size = 0;
    Ok(cfg)
}

/// rustls configuration for a client presenting `identity` (none only in
/// tests of the server's refusal) and trusting servers through `verifier`.
pub(crate) fn client_crypto(
    verifier: Arc<PinnedServerVerifier>,
    identity: Option<&Identity>,
) -> Result<rustls::ClientConfig, TrustError> {
    let builder = rustls::ClientConfig::builder_with_provider(crypto_provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(verifier);
    let mut cfg = match identity {
        Some(id) => builder.with_client_auth_cert(vec![id.cert.clone()], id.key.clone_key())?,
        None => builder.with_no_client_auth(),
    };
    cfg.alpn_protocols = vec![ALPN.to_vec()];
    cfg.enable_early_data = false;
    Ok(cfg)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn processes_starting_on_one_fresh_directory_share_one_identity() {
        // Servers started together over one --certs: one generates, the
        // others load it (the loser used to fail with "File exists").
        for _ in 0..20 {
            let dir = tempfile::tempdir().unwrap();
            let fps: Vec<Fingerprint> = std::thread::scope(|s| {
                let handles: Vec<_> = (0..4)
                    .map(|_| s.spawn(|| Identity::load_or_generate(dir.path(), "server")))
                    .collect();
                handles
                    .into_iter()
                    .map(|h| h.join().unwrap().unwrap().fingerprint())
                    .collect()
            });
            assert!(fps.windows(2).all(|w| w[0] == w[1]), "{fps:?}");
        }
    }

    #[test]
    fn fingerprint_round_trips_through_text() {
        let fp = Fingerprint([7; 32]);
        let s = fp.to_string();
        assert!(s.starts_with("SHA256:") && s.len() == 7 + 43, "{s}");
        assert_eq!(s.parse::<Fingerprint>().unwrap(), fp);
        assert!("SHA256:abc".parse::<Fingerprint>().is_err());
        assert!("MD5:xyz".parse::<Fingerprint>().is_err());
    }

    #[test]
    fn identity_is_generated_once_and_reloaded() {
        let dir = tempfile::tempdir().unwrap();
        let a = Identity::load_or_generate(dir.path(), "server").unwrap();
        let b = Identity::load_or_generate(dir.path(), "server").unwrap();
        assert_eq!(a.fingerprint(), b.fingerprint());
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = fs::metadata(dir.path().join("server.key"))
                .unwrap()
                .permissions()
                .mode();
            assert_eq!(mode & 0o777, 0o600);
        }
        fs::remove_file(dir.path().join("server.key")).unwrap();
        let err = Identity::load_or_generate(dir.path(), "server").unwrap_err();
        assert!(err.to_string().contains("server.key is missing"), "{err}");
    }

    #[test]
    fn known_hosts_add_and_lookup() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub/known_hosts");
        let mut kh = KnownHosts::load(&path).unwrap();
        assert!(kh.lookup("h:1").is_none());
        kh.add("h:1", Fingerprint([1; 32])).unwrap();
        kh.add("h:2", Fingerprint([2; 32])).unwrap();
        let kh = KnownHosts::load(&path).unwrap();
        assert_eq!(kh.lookup("h:2"), Some((Fingerprint([2; 32]), 2)));
        fs::write(&path, "# c\nh:1 nonsense\n").unwrap();
        let err = KnownHosts::load(&path).unwrap_err().to_string();
        assert!(err.contains("line 2"), "{err}");
    }

    #[test]
    fn authorized_clients_reload_on_change_and_skip_bad_lines() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(AUTHORIZED_CLIENTS);
        let (a, b, own) = (
            Fingerprint([1; 32]),
            Fingerprint([2; 32]),
            Fingerprint([3; 32]),
        );
        let list = AuthorizedClients::new(&path, vec![own], false);
        assert!(list.admits(&own), "the extra identity needs no file");
        assert!(!list.admits(&a));
        assert!(AuthorizedClients::append(&path, a, "alice").unwrap());
        assert!(!AuthorizedClients::append(&path, a, "again").unwrap());
        assert!(list.admits(&a), "re-read after the file changed");
        assert!(!list.admits(&b));
        fs::write(
            &path,
            format!("# team\n\nnot-a-fingerprint\n{b} bob laptop\n"),
        )
        .unwrap();
        assert!(list.admits(&b), "the good line counts despite the bad one");
        assert!(!list.admits(&a), "a removed line no longer admits");
        assert_eq!(list.len(), 1);
        let open = AuthorizedClients::new(&path, Vec::new(), true);
        assert!(open.admits(&Fingerprint([9; 32])));
    }

    #[test]
    fn no_early_data_on_either_side() {
        let dir = tempfile::tempdir().unwrap();
        let id = Identity::load_or_generate(dir.path(), "server").unwrap();
        let list = Arc::new(AuthorizedClients::new(&dir.path().join("a"), vec![], false));
        let server = server_crypto(&id, ClientVerifier::new(list)).unwrap();
        assert_eq!(server.max_early_data_size, 0);
        let client = client_crypto(PinnedServerVerifier::new(None), Some(&id)).unwrap();
        assert!(!client.enable_early_data);
    }
}

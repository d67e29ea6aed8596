//! Connecting: resolving the server, the handshake (restarted while unanswered), pinning, and what a refusal means.

use super::Link;
use crate::endpoint::PathMemory;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use quinn::{ConnectionError, TransportErrorCode, VarInt};

use crate::endpoint::{self, EndpointError, TransportOpts};
use crate::exchange::Pacer;
use crate::protocol::{close, ALPN};
use crate::tls::{Fingerprint, Identity, KnownHosts, PinnedServerVerifier, TrustError};

use super::state::{PathMemories, UploadJournal};
use super::{Client, ClientConfig, Registered, CLIENT_IDENTITY, DEFAULT_PORT};

/// How long to wait for a server to answer before calling it unreachable.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// How long a handshake the server has started answering may take to finish.
pub(super) const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(30);

/// An unanswered handshake is started afresh this often (see [`Attempt::once`]).
pub(super) const RESTART_UNANSWERED: Duration = Duration::from_secs(3);

/// The TLS alert QUIC carries when no ALPN protocol is shared (RFC 8446 no_application_protocol).
pub(super) const ALERT_NO_APPLICATION_PROTOCOL: u8 = 120;

/// The TLS alert a qxfer server sends for a client it does not admit (access_denied).
pub(super) const ALERT_ACCESS_DENIED: u8 = 49;

/// The TLS alert for a client that presented no certificate (certificate_required).
pub(super) const ALERT_CERTIFICATE_REQUIRED: u8 = 116;

/// Why no connection was made.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    /// `--server` is not of the form HOST[:PORT].
    #[error(
        "invalid server address {0:?}: expected HOST:PORT, e.g. example.com:65432 or [::1]:65432"
    )]
    BadAddress(String),
    /// Name resolution failed.
    #[error("cannot resolve {server}")]
    Resolve {
        /// As given.
        server: String,
        /// The resolver's error.
        source: std::io::Error,
    },
    /// No answer in time.
    #[error("no answer from {server} ({addr}) within {} s; check that `qxfer serve` runs there and that UDP port {} is reachable (on a very lossy path, raise --connect-timeout)", after.as_secs_f64(), addr.port())]
    Unreachable {
        /// How long the attempt waited.
        after: Duration,
        /// As given.
        server: String,
        /// As resolved.
        addr: SocketAddr,
    },
    /// The peer speaks QUIC but not qxfer.
    #[error(
        "{server} ({addr}) is not a qxfer server: it does not speak the {} protocol",
        String::from_utf8_lossy(ALPN)
    )]
    NotQxfer {
        /// As given.
        server: String,
        /// As resolved.
        addr: SocketAddr,
    },
    /// The server is at its connection limit.
    #[error("{server} refused the connection: it is serving as many clients as it allows (--max-connections); try again later")]
    Busy {
        /// As given.
        server: String,
    },
    /// The server does not admit this client's identity.
    #[error("the server {server} refused this client: it does not know this client's identity.\nGive the server's operator your fingerprint, which `qxfer id` prints:\n    {fingerprint}\nand ask them to run `qxfer serve --allow {fingerprint}` (or add it to certs/authorized_clients).")]
    Refused {
        /// As given.
        server: String,
        /// This client's fingerprint.
        fingerprint: Fingerprint,
    },
    /// The server closed the connection because this identity holds too many.
    #[error("the server {server} closed the connection: this client already has as many connections open as it allows (--max-connections-per-client); close some and try again")]
    TooManyFromClient {
        /// As given.
        server: String,
    },
    /// The server's fingerprint differs from the stored one.
    #[error("SERVER IDENTITY CHANGED for {server}: it presented {got}, but {} line {line} says {want}. Someone may be intercepting the connection. If the server's certificate was deliberately replaced, delete that line and connect again.", file.display())]
    HostKeyChanged {
        /// As given.
        server: String,
        /// Fingerprint presented.
        got: Fingerprint,
        /// Fingerprint on record.
        want: Fingerprint,
        /// The known_hosts file.
        file: PathBuf,
        /// The line with the old entry.
        line: usize,
    },
    /// The server's fingerprint differs from `--pin`.
    #[error("{server} presented {got}, not the pinned {want}; refusing to connect")]
    PinMismatch {
        /// As given.
        server: String,
        /// Fingerprint presented.
        got: Fingerprint,
        /// Fingerprint pinned.
        want: Fingerprint,
    },
    /// One address of a server presented another identity than the others.
    #[error("{server} presented {got}, but the other addresses of this server present {want}: every address of one server must serve with the same identity (the same certs directory); refusing to connect")]
    NotTheSameServer {
        /// As given.
        server: String,
        /// Fingerprint presented.
        got: Fingerprint,
        /// The fingerprint the other addresses have.
        want: Fingerprint,
    },
    /// Any other handshake or transport failure.
    #[error("connecting to {server} ({addr}): {source}")]
    Connection {
        /// As given.
        server: String,
        /// As resolved.
        addr: SocketAddr,
        /// quinn's error.
        source: ConnectionError,
    },
    /// quinn refused to start the connection (bad address family, ...).
    #[error("cannot connect to {server}: {source}")]
    Setup {
        /// As given.
        server: String,
        /// quinn's error.
        source: quinn::ConnectError,
    },
    /// Setting up the local endpoint failed.
    #[error(transparent)]
    Endpoint(#[from] EndpointError),
    /// known_hosts could not be read or written.
    #[error(transparent)]
    Trust(#[from] TrustError),
}

/// Splits `server` into host and port; the host keeps no brackets.
pub(crate) fn split_server(server: &str) -> Result<(String, u16), ConnectError> {
    let bad = || ConnectError::BadAddress(server.to_owned());
    if let Ok(addr) = server.parse::<SocketAddr>() {
        return Ok((addr.ip().to_string(), addr.port()));
    }
    if let Some(rest) = server.strip_prefix('[') {
        let (host, tail) = rest.split_once(']').ok_or_else(bad)?;
        let port = match tail {
            "" => DEFAULT_PORT,
            _ => tail
                .strip_prefix(':')
                .and_then(|p| p.parse().ok())
                .ok_or_else(bad)?,
        };
        return Ok((host.to_owned(), port));
    }
    if server.parse::<std::net::Ipv6Addr>().is_ok() {
        return Ok((server.to_owned(), DEFAULT_PORT));
    }
    let (host, port) = match server.rsplit_once(':') {
        Some((h, p)) => (h, p.parse().map_err(|_| bad())?),
        None => (server, DEFAULT_PORT),
    };
    if host.is_empty() || host.contains(':') || host.contains(char::is_whitespace) {
        return Err(bad());
    }
    Ok((host.to_owned(), port))
}

/// The key a server is filed under in known_hosts: `host:port`, lower case,
/// IPv6 in brackets.
pub(crate) fn known_hosts_key(host: &str, port: u16) -> String {
    let host = host.to_ascii_lowercase();
    if host.contains(':') {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    }
}

/// The addresses of `config`'s server, in the order to try them: at random
/// (clients spread over the servers of a name), `avoid` (the server just
/// lost) last.
fn in_order(config: &ClientConfig, avoid: Option<&str>) -> Vec<String> {
    let mut all: Vec<String> = Vec::with_capacity(1 + config.failover.len());
    for a in std::iter::once(&config.server).chain(&config.failover) {
        if !all.contains(a) {
            all.push(a.clone());
        }
    }
    // Fisher-Yates with the system's randomness (ring, as for TLS).
    let rng = ring::rand::SystemRandom::new();
    for i in (1..all.len()).rev() {
        let mut b = [0u8; 8];
        let j = match ring::rand::SecureRandom::fill(&rng, &mut b) {
            Ok(()) => (u64::from_le_bytes(b) % (i as u64 + 1)) as usize,
            Err(_) => i,
        };
        all.swap(i, j);
    }
    if let Some(lost) = avoid {
        if let Some(at) = all.iter().position(|a| a == lost) {
            let lost = all.remove(at);
            all.push(lost);
        }
    }
    all
}

/// Whether the next address of the same server is worth trying after `e`:
/// this one did not answer or could not take the client now. A trust
/// failure (a changed identity, a pin not matched, this client refused) is
/// never passed over to another address.
fn try_next(e: &ConnectError) -> bool {
    super::retry::is_transient_connect(e) || matches!(e, ConnectError::Resolve { .. })
}

impl Client {
    /// Connects to `config.server` or, when it has several addresses, to
    /// one of them (see [`ClientConfig::failover`]), verifying it against
    /// `--pin` or known_hosts, and recording it on first contact.
    pub async fn connect(config: &ClientConfig) -> Result<Self, ConnectError> {
        Self::connect_avoiding(config, None).await
    }

    /// Connects as [`Client::connect`] does, trying `avoid` (a server just
    /// lost) only after every other address of the same server. Every
    /// address must present the one identity: the pin, else the
    /// fingerprint known_hosts holds for any of them (a server of another
    /// identity is refused, as a changed key is). Addresses that do not
    /// answer are passed over; the last one's error is returned when none
    /// does.
    pub async fn connect_avoiding(
        config: &ClientConfig,
        avoid: Option<&str>,
    ) -> Result<Self, ConnectError> {
        let order = in_order(config, avoid);
        // Read once for every address: the identity they share, and what
        // each has on record.
        let mut known = KnownHosts::load(&config.config_dir.join("known_hosts"))?;
        let group = config.pin.or_else(|| {
            order.iter().find_map(|a| {
                let (host, port) = split_server(a).ok()?;
                known
                    .lookup(&known_hosts_key(&host, port))
                    .map(|(fp, _)| fp)
            })
        });
        let mut last = None;
        for server in &order {
            match Self::connect_to(config, server, group, &mut known).await {
                Ok(client) => return Ok(client),
                Err(e) if order.len() > 1 && try_next(&e) => last = Some(e),
                Err(e) => return Err(e),
            }
        }
        Err(last.expect("a server has at least one address"))
    }

    /// Connects to `server`, one address of `config`'s server, expecting
    /// `group` (the identity its other addresses have) where neither the
    /// pin nor known_hosts says what this one must present.
    async fn connect_to(
        config: &ClientConfig,
        server: &str,
        group: Option<Fingerprint>,
        known: &mut KnownHosts,
    ) -> Result<Self, ConnectError> {
        let (host, port) = split_server(server)?;
        let resolved: Vec<SocketAddr> = tokio::net::lookup_host((host.as_str(), port))
            .await
            .map_err(|source| ConnectError::Resolve {
                server: server.to_owned(),
                source,
            })?
            .collect();
        // Every address the name resolves to, IPv4 first (`localhost` often
        // resolves to ::1 first while servers listen on 127.0.0.1 by
        // default), each in the resolver's order: a name with several
        // records is several servers, one tried after another that does
        // not answer.
        let mut candidates: Vec<SocketAddr> = Vec::new();
        for v4 in [true, false] {
            for a in resolved.iter().filter(|a| a.is_ipv4() == v4) {
                if !candidates.contains(a) {
                    candidates.push(*a);
                }
            }
        }
        if candidates.is_empty() {
            return Err(ConnectError::Resolve {
                server: server.to_owned(),
                source: std::io::Error::other("no addresses found"),
            });
        }

        let identity = Identity::load_or_generate(&config.config_dir, CLIENT_IDENTITY)?;
        let key = known_hosts_key(&host, port);
        let on_record = known.lookup(&key);
        let expected = config.pin.or(on_record.map(|(fp, _)| fp)).or(group);
        // SNI carries the host name when there is one; the verifier ignores it.
        let sni = if host.parse::<std::net::IpAddr>().is_ok() {
            "qxfer"
        } else {
            host.as_str()
        };

        let paths = PathMemories::new(&config.config_dir);
        let (transport, memory) = (config.transport, paths.recall(&key));

        let mut last = None;
        let mut established = None;
        for addr in candidates {
            let verifier = PinnedServerVerifier::new(expected);
            let tries = Attempt {
                transport: &transport,
                memory,
                identity: &identity,
                server,
                sni,
                silence: config.connect_timeout,
            };
            match tries.once(addr, verifier.clone()).await {
                Ok((endpoint, conn)) => {
                    established = Some((endpoint, conn, verifier));
                    break;
                }
                Err(e @ ConnectError::Unreachable { .. }) => last = Some(e),
                Err(e) => {
                    let Some(got) = verifier.mismatch() else {
                        return Err(e);
                    };
                    let want = expected.expect("a mismatch implies an expected fingerprint");
                    return Err(match (config.pin, on_record) {
                        (None, Some((_, line))) => ConnectError::HostKeyChanged {
                            server: server.to_owned(),
                            got,
                            want,
                            file: known.path().to_owned(),
                            line,
                        },
                        (Some(_), _) => ConnectError::PinMismatch {
                            server: server.to_owned(),
                            got,
                            want,
                        },
                        (None, None) => ConnectError::NotTheSameServer {
                            server: server.to_owned(),
                            got,
                            want,
                        },
                    });
                }
            }
        }
        let Some((endpoint, conn, verifier)) = established else {
            return Err(last.expect("at least one address was tried"));
        };

        let server_fp = verifier
            .seen()
            .expect("a completed handshake has verified a certificate");
        let mut first_contact = None;
        if config.pin.is_none() && on_record.is_none() {
            // A first contact; with other addresses of this server on
            // record it presented their identity (checked above).
            known.add(&key, server_fp)?;
            first_contact = Some((server_fp, known.path().to_owned()));
        }
        endpoint::tune_receive_window(conn.clone());
        // Keyed by the server's identity, not its address: servers that
        // share one identity over one store (a scaled-out deployment) share
        // their partial uploads, so an upload begun through one resumes
        // through another.
        let journal = UploadJournal::open(&config.config_dir, server_fp.to_string()).ok();
        let descriptions = super::state::descriptions(&config.config_dir);
        Ok(Self {
            _endpoint: Some(Registered::new(endpoint)),
            link: Link::Quic(conn),
            journal,
            paths: Some((paths, key)),
            server: server.to_owned(),
            fingerprint: identity.fingerprint(),
            resume: config.resume,
            pace: config.limit_rate.map(|r| Arc::new(Pacer::new(r))),
            compression: config.compression,
            delta: config.delta,
            reply_timeout: config.reply_timeout,
            descriptions,
            first_contact,
        })
    }
}

/// The refusal a connection error stands for, if it is one.
pub(super) fn refusal(
    e: &ConnectionError,
    server: &str,
    fingerprint: Fingerprint,
) -> Option<ConnectError> {
    let denied = [
        TransportErrorCode::crypto(ALERT_ACCESS_DENIED),
        TransportErrorCode::crypto(ALERT_CERTIFICATE_REQUIRED),
    ];
    match e {
        ConnectionError::ConnectionClosed(c) if denied.contains(&c.error_code) => {
            Some(ConnectError::Refused {
                server: server.to_owned(),
                fingerprint,
            })
        }
        ConnectionError::ApplicationClosed(c)
            if c.error_code == VarInt::from_u32(close::TOO_MANY_FROM_CLIENT) =>
        {
            Some(ConnectError::TooManyFromClient {
                server: server.to_owned(),
            })
        }
        ConnectionError::ApplicationClosed(c) if c.error_code == VarInt::from_u32(close::BUSY) => {
            Some(ConnectError::Busy {
                server: server.to_owned(),
            })
        }
        _ => None,
    }
}

/// Why a connection ended, as the user should read it.
pub(crate) fn describe_close(reason: &ConnectionError) -> String {
    match reason {
        ConnectionError::ApplicationClosed(c)
            if c.error_code == VarInt::from_u32(close::SHUTTING_DOWN) =>
        {
            "the server is shutting down".into()
        }
        ConnectionError::ApplicationClosed(c)
            if c.error_code == VarInt::from_u32(close::STORE_DOWN) =>
        {
            "the server cannot reach its store".into()
        }
        ConnectionError::Reset => "the server restarted and no longer knows this connection".into(),
        ConnectionError::TimedOut => {
            "the server stopped answering (a network outage, or the server is down)".into()
        }
        other => other.to_string(),
    }
}

/// One connection attempt to one address, with the unreachable timeout.
pub(super) struct Attempt<'a> {
    transport: &'a TransportOpts,
    /// What an earlier connection learned about the path.
    memory: Option<PathMemory>,
    identity: &'a Identity,
    server: &'a str,
    sni: &'a str,
    /// How long the server may stay silent.
    silence: Duration,
}

impl Attempt<'_> {
    /// Connects to `addr`. Silence for `silence` means nobody is there;
    /// within it, an unanswered handshake is started afresh every
    /// [`RESTART_UNANSWERED`]: QUIC doubles the wait between its
    /// retransmissions of the first packet (1, 2, 4, 8 s...), so on a path
    /// losing 30% of packets one long attempt tries only a few times, and
    /// fresh ones try far more often. Once the server has answered (its
    /// handshake data arrived), a lossy path only slows the rest of the
    /// handshake down, so it gets [`HANDSHAKE_TIMEOUT`].
    pub(super) async fn once(
        &self,
        addr: SocketAddr,
        verifier: Arc<PinnedServerVerifier>,
    ) -> Result<(quinn::Endpoint, quinn::Connection), ConnectError> {
        let Self {
            transport,
            memory,
            identity,
            server,
            sni,
            silence,
        } = *self;
        let deadline = Instant::now() + silence;
        loop {
            let endpoint = endpoint::client_endpoint_resuming(
                addr,
                verifier.clone(),
                Some(identity),
                transport,
                memory,
            )?;
            let mut connecting = endpoint
                .connect(addr, sni)
                .or_else(|_| endpoint.connect(addr, "qxfer"))
                .map_err(|source| ConnectError::Setup {
                    server: server.to_owned(),
                    source,
                })?;
            let window = RESTART_UNANSWERED.min(deadline.saturating_duration_since(Instant::now()));
            let answered =
                tokio::time::timeout(window, async { connecting.handshake_data().await.is_ok() })
                    .await;
            let done = match answered {
                Ok(true) => tokio::time::timeout(HANDSHAKE_TIMEOUT, connecting).await,
                // Failed outright: the error says why.
                Ok(false) => Ok(connecting.await),
                Err(_) => {
                    endpoint.close(VarInt::from_u32(0), b"timeout");
                    if Instant::now() < deadline {
                        continue;
                    }
                    return Err(ConnectError::Unreachable {
                        after: silence,
                        server: server.to_owned(),
                        addr,
                    });
                }
            };
            return match done {
                Ok(Ok(conn)) => Ok((endpoint, conn)),
                Err(_) => {
                    endpoint.close(VarInt::from_u32(0), b"timeout");
                    Err(ConnectError::Unreachable {
                        after: silence + HANDSHAKE_TIMEOUT,
                        server: server.to_owned(),
                        addr,
                    })
                }
                Ok(Err(source)) => Err(connect_failure(
                    source,
                    server,
                    addr,
                    identity.fingerprint(),
                )),
            };
        }
    }
}

/// Names why a handshake failed.
pub(super) fn connect_failure(
    source: ConnectionError,
    server: &str,
    addr: SocketAddr,
    fingerprint: Fingerprint,
) -> ConnectError {
    if let Some(refused) = refusal(&source, server, fingerprint) {
        return refused;
    }
    let server = server.to_owned();
    match source {
        e if is_alpn_refusal(&e) => ConnectError::NotQxfer { server, addr },
        ConnectionError::ConnectionClosed(close)
            if close.error_code == TransportErrorCode::CONNECTION_REFUSED =>
        {
            ConnectError::Busy { server }
        }
        source => ConnectError::Connection {
            server,
            addr,
            source,
        },
    }
}

/// Whether the handshake failed because the server does not offer our ALPN.
pub(super) fn is_alpn_refusal(e: &ConnectionError) -> bool {
    let want = TransportErrorCode::crypto(ALERT_NO_APPLICATION_PROTOCOL);
    match e {
        ConnectionError::ConnectionClosed(close) => close.error_code == want,
        ConnectionError::TransportError(t) => t.code == want,
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(server: &str, failover: &[&str]) -> ClientConfig {
        ClientConfig {
            server: server.to_owned(),
            pin: None,
            config_dir: PathBuf::from("/nonexistent"),
            transport: TransportOpts::default(),
            resume: true,
            limit_rate: None,
            compression: crate::protocol::Compression::Auto,
            delta: false,
            reply_timeout: Duration::from_secs(60),
            connect_timeout: DEFAULT_CONNECT_TIMEOUT,
            failover: failover.iter().map(|s| (*s).to_owned()).collect(),
        }
    }

    #[test]
    fn every_address_is_tried_once_in_a_random_order_the_lost_one_last() {
        let c = config("a:1", &["b:1", "c:1", "a:1"]);
        let mut firsts = std::collections::HashSet::new();
        for _ in 0..200 {
            let order = in_order(&c, None);
            let mut sorted = order.clone();
            sorted.sort();
            assert_eq!(sorted, ["a:1", "b:1", "c:1"], "each once: {order:?}");
            firsts.insert(order[0].clone());
            assert_eq!(in_order(&c, Some("b:1"))[2], "b:1", "the lost one last");
        }
        assert_eq!(firsts.len(), 3, "each address comes first sometimes");
        assert_eq!(in_order(&config("a:1", &[]), Some("a:1")), ["a:1"]);
    }
}

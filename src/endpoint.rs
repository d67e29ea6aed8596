//! QUIC endpoints and the transport knobs both sides share.
//!
//! Every transport setting lives in [`TransportOpts::transport_config`], as in
//! quinn's perf tool, so the client and server cannot drift apart.

use std::net::{SocketAddr, UdpSocket};
use std::sync::Arc;
use std::time::Duration;

use quinn::crypto::rustls::{QuicClientConfig, QuicServerConfig};
use quinn::{congestion, EndpointConfig, IdleTimeout, TransportConfig, VarInt};
use socket2::{Domain, Protocol, Socket, Type};

pub(crate) use crate::congestion::PathMemory;
use crate::congestion::{ModelConfig, ACK_EVERY};
use crate::tls::{self, ClientVerifier, Identity, PinnedServerVerifier, TrustError};

/// Default for [`ServerLimits::max_streams`]: most streams (files in
/// flight) a client may have open at once on one connection. Small files
/// each hold a stream for about two round trips, so this is what decides a
/// tree of many small files on a long path: 64 held 2,000 files over 50 ms
/// to about 640 a second, 512 lets the link decide. What a stream costs
/// while it waits is a task and, for an upload, an open temporary file; the
/// flow-control windows below bound memory whatever this is, and disk work
/// runs in a fixed pool of threads (src/exchange/pool.rs).
pub(crate) const DEFAULT_MAX_STREAMS: u32 = 512;

/// Per-stream receive window. On a lossy path the receiver cannot hand
/// data past a lost packet to the application until its retransmission
/// arrives (one to three round trips later), so the window must cover
/// several bandwidth-delay products, not one: 32 MiB is five round trips of
/// a 500 Mbit/s, 100 ms path (an 8 MiB window held such a path at 43% of
/// its rate at 0.5% loss). It also bounds quinn's reassembly work: at 2%
/// loss a 32 MiB window holds about 460 gaps, well under the 1,024 quinn
/// allows a stream before it closes the connection.
pub const STREAM_RECEIVE_WINDOW: u32 = 32 * 1024 * 1024;

/// Connection-wide receive window at the start: caps the unread data a
/// peer can make us buffer, however many streams it opens. It then grows
/// with the path ([`tune_receive_window`]) up to
/// [`CONNECTION_RECEIVE_WINDOW`]: where the disk is slower than the
/// network (loopback), a large window would only fill with data waiting
/// for the disk (a fixed 48 MiB window held 80 MiB on a loopback put).
const INITIAL_RECEIVE_WINDOW: u64 = 8 * 1024 * 1024;

/// Most a connection's receive window grows to: one full stream window plus
/// room for others; it bounds memory per connection.
pub(crate) const CONNECTION_RECEIVE_WINDOW: u32 = 48 * 1024 * 1024;

/// The connection window is kept at this many times the data the path
/// delivers in one round trip: enough to carry on while a lost packet's
/// retransmission (one to three round trips) holds up the stream behind it.
const WINDOW_ROUND_TRIPS: f64 = 4.0;

/// How often the window is reconsidered.
const WINDOW_TUNING: Duration = Duration::from_millis(50);

/// Grows `conn`'s receive window with the data rate and round-trip time it
/// measures, from [`INITIAL_RECEIVE_WINDOW`] up to
/// [`CONNECTION_RECEIVE_WINDOW`], until the connection closes. A window that
/// limits the rate is soon outgrown: the rate it allows times the round
/// trip times four is four times the window. Never shrinks (quinn applies a
/// smaller window only as data is read anyway).
pub(crate) fn tune_receive_window(conn: quinn::Connection) {
    tokio::spawn(async move {
        let mut window = INITIAL_RECEIVE_WINDOW;
        let mut last = (std::time::Instant::now(), conn.stats().udp_rx.bytes);
        loop {
            tokio::select! {
                _ = conn.closed() => return,
                _ = tokio::time::sleep(WINDOW_TUNING) => {}
            }
            let now = (std::time::Instant::now(), conn.stats().udp_rx.bytes);
            let rate = (now.1 - last.1) as f64 / (now.0 - last.0).as_secs_f64();
            last = now;
            let want = (rate * conn.rtt().as_secs_f64() * WINDOW_ROUND_TRIPS) as u64;
            let want = want.min(u64::from(CONNECTION_RECEIVE_WINDOW));
            if want > window {
                window = want;
                if let Ok(w) = VarInt::from_u64(window) {
                    conn.set_receive_window(w);
                }
                if window >= u64::from(CONNECTION_RECEIVE_WINDOW) {
                    return; // as far as it goes
                }
            }
        }
    });
}

/// Data a sender may buffer per connection, written but not yet
/// acknowledged (retransmissions come from it). Like the receiver, it must
/// hold what follows a lost packet until the loss is repaired: 24 MiB keeps
/// 100 ms / 500 Mbit/s at 82% of its rate at 2% loss where 16 MiB fell to
/// 69%, and 48 MiB gained nothing but 12 MiB more memory.
pub(crate) const SEND_WINDOW: u64 = 24 * 1024 * 1024;

/// UDP socket buffers asked of the kernel (it may grant less): small default
/// buffers drop bursts at high rates, and every drop costs a loss recovery.
const SOCKET_BUFFER: usize = 4 * 1024 * 1024;

/// Default for [`ServerLimits::idle_timeout`]: a connection with no traffic
/// for this long is closed. Clients ask for the same.
pub(crate) const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(30);

/// Clients ping this often so an idle-looking connection (a server busy
/// syncing a large file, say) is not closed under them.
const KEEP_ALIVE: Duration = Duration::from_secs(10);

/// How often a server whose idle timeout is `idle` pings its clients
/// itself. A connection's idle timeout is the shorter of the two sides',
/// so a server run with `--idle-timeout` under three of the clients'
/// [`KEEP_ALIVE`] periods would close connections that are only waiting
/// (for a lease on a name another server held, say) before the client's
/// next ping: such a server pings every third of its timeout. A peer that
/// is gone still times out: a ping it does not answer does not count as
/// traffic. A timeout of zero (none at all) needs no pings.
fn server_keep_alive(idle: Duration) -> Option<Duration> {
    (!idle.is_zero() && idle < KEEP_ALIVE * 3).then(|| idle / 3)
}

/// Congestion controller choice.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Congestion {
    /// qxfer's own model-based controller (src/congestion/): keeps its
    /// rate under random loss and the bottleneck queue short.
    #[default]
    Model,
    /// quinn's BBR (an early BBRv1): ignores random loss but overfills queues.
    Bbr,
    /// Cubic: quinn's default; backs off on every loss.
    Cubic,
    /// NewReno: the classic loss-based controller.
    NewReno,
}

/// Transport options shared by `serve` and the client commands.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TransportOpts {
    /// Congestion controller. `Model` is the default: loss-based
    /// controllers slow to a crawl on lossy long-distance paths, and quinn's
    /// BBR overflows the bottleneck's queue (docs/BENCHMARKS.md).
    pub congestion: Congestion,
}

/// What a connection learned about its path (its bottleneck rate and
/// RTT), if its controller is qxfer's and it filled the pipe at least
/// once: for the next connection over the same path to start from
/// ([`client_endpoint_resuming`]).
pub(crate) fn learned(conn: &quinn::Connection) -> Option<PathMemory> {
    crate::congestion::learned(conn)
}

/// The bytes `conn` has had delivered, and of them those sent while the
/// application had nothing more to send (qxfer's controller only).
pub(crate) fn delivered(conn: &quinn::Connection) -> Option<(u64, u64)> {
    crate::congestion::delivered(conn)
}

/// The server's transport limits (`serve --max-streams`, `--idle-timeout`).
#[derive(Debug, Clone, Copy)]
pub struct ServerLimits {
    /// Streams a client may have open at once on one connection.
    pub max_streams: u32,
    /// Close a connection silent for this long.
    pub idle_timeout: Duration,
}

impl Default for ServerLimits {
    fn default() -> Self {
        Self {
            max_streams: DEFAULT_MAX_STREAMS,
            idle_timeout: DEFAULT_IDLE_TIMEOUT,
        }
    }
}

impl TransportOpts {
    /// The quinn transport configuration for these options: `max_streams`
    /// is how many streams the peer may open, `idle` the idle timeout, and
    /// `keep_alive` how often we ping while otherwise silent, if at all
    /// (clients do; servers only with a short idle timeout).
    ///
    /// Memory stays bounded at any stream count: each stream may have at most
    /// 32 MiB unread and the whole connection at most 8 MiB at first, then
    /// what [`tune_receive_window`] grants (48 MiB at most), so a server
    /// buffers at most 48 MiB per connection times `--max-connections`.
    /// `memory`: what an earlier connection learned about this path, for
    /// the `Model` controller to resume from.
    pub(crate) fn transport_config(
        &self,
        max_streams: u32,
        idle: Duration,
        keep_alive: Option<Duration>,
        memory: Option<PathMemory>,
    ) -> TransportConfig {
        let mut t = TransportConfig::default();
        let idle = IdleTimeout::try_from(idle)
            .unwrap_or_else(|_| IdleTimeout::try_from(DEFAULT_IDLE_TIMEOUT).expect("fits"));
        t.max_concurrent_bidi_streams(VarInt::from_u32(max_streams))
            .max_concurrent_uni_streams(VarInt::from_u32(0))
            .stream_receive_window(VarInt::from_u32(STREAM_RECEIVE_WINDOW))
            .receive_window(VarInt::from_u64(INITIAL_RECEIVE_WINDOW).expect("fits"))
            .send_window(SEND_WINDOW)
            .max_idle_timeout(Some(idle))
            .keep_alive_interval(keep_alive);
        // Fewer acknowledgements: the peer acknowledges every
        // `ACK_EVERY` packets instead of every other one (QUIC's ACK
        // frequency extension; both sides ask it of each other).
        let mut acks = quinn::AckFrequencyConfig::default();
        acks.ack_eliciting_threshold(VarInt::from_u32(ACK_EVERY));
        t.ack_frequency_config(Some(acks));
        match self.congestion {
            Congestion::Model => t.congestion_controller_factory(Arc::new(ModelConfig { memory })),
            Congestion::Bbr => {
                t.congestion_controller_factory(Arc::new(congestion::BbrConfig::default()))
            }
            Congestion::Cubic => {
                t.congestion_controller_factory(Arc::new(congestion::CubicConfig::default()))
            }
            Congestion::NewReno => {
                t.congestion_controller_factory(Arc::new(congestion::NewRenoConfig::default()))
            }
        };
        t
    }
}

/// Binds a UDP socket with enlarged buffers. An IPv6 wildcard also accepts
/// IPv4 where the OS allows it.
fn bind_udp(addr: SocketAddr) -> std::io::Result<UdpSocket> {
    let socket = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP))?;
    if addr.is_ipv6() && addr.ip().is_unspecified() {
        let _ = socket.set_only_v6(false);
    }
    // Best effort: the kernel caps these at net.core.[rw]mem_max.
    let _ = socket.set_recv_buffer_size(SOCKET_BUFFER);
    let _ = socket.set_send_buffer_size(SOCKET_BUFFER);
    socket.bind(&addr.into())?;
    Ok(socket.into())
}

/// Errors setting up an endpoint.
#[derive(Debug, thiserror::Error)]
pub enum EndpointError {
    /// The UDP socket could not be bound.
    #[error("cannot listen on UDP {addr}: {source}")]
    Bind {
        /// The address asked for.
        addr: SocketAddr,
        /// The OS error.
        source: std::io::Error,
    },
    /// TLS setup failed.
    #[error(transparent)]
    Trust(#[from] TrustError),
    /// The TLS configuration is not usable for QUIC.
    #[error("TLS configuration unusable for QUIC: {0}")]
    Quic(String),
}

/// The server's endpoint settings, with a stateless reset key derived from
/// its identity's private key.
///
/// Why: quinn draws a random reset key per process, so a server restarted
/// (after a crash, an upgrade, a kill -9) cannot prove to its predecessor's
/// clients that their connections are gone; they wait out the idle timeout
/// (30 s) before they notice. With the key derived from the identity, the
/// new process answers a packet of an old connection with a stateless reset
/// whose token the client was given by the old one, and the client knows at
/// once (and reconnects, with `--retries`). The key is secret as long as
/// the identity's key is: only the holder of the server's identity can
/// reset its connections, and anyone holding that could impersonate the
/// server anyway.
fn server_endpoint_config(identity: &Identity) -> EndpointConfig {
    let secret = blake3::derive_key(
        "qxfer 2026-11 QUIC stateless reset key",
        identity.key.secret_der(),
    );
    let mut config = EndpointConfig::new(Arc::new(ring::hmac::Key::new(
        ring::hmac::HMAC_SHA256,
        &secret,
    )));
    // quinn only answers packets whose connection ID its generator
    // recognises (a keyed hash inside the ID); with a random key per
    // process, a restarted server would drop the old connections' packets
    // instead of resetting them. The same derivation keeps the key stable.
    let cid_secret = blake3::derive_key(
        "qxfer 2026-11 QUIC connection ID validation key",
        identity.key.secret_der(),
    );
    let cid_key = u64::from_le_bytes(cid_secret[..8].try_into().expect("8 bytes"));
    config.cid_generator(move || {
        Box::new(quinn_proto::HashedConnectionIdGenerator::from_key(cid_key))
    });
    config
}

/// A server endpoint on `addr` presenting `identity` and admitting clients
/// through `clients`.
pub fn server_endpoint(
    addr: SocketAddr,
    identity: &Identity,
    clients: Arc<ClientVerifier>,
    opts: &TransportOpts,
    limits: &ServerLimits,
) -> Result<quinn::Endpoint, EndpointError> {
    let crypto = QuicServerConfig::try_from(tls::server_crypto(identity, clients)?)
        .map_err(|e| EndpointError::Quic(e.to_string()))?;
    let mut cfg = quinn::ServerConfig::with_crypto(Arc::new(crypto));
    cfg.transport_config(Arc::new(opts.transport_config(
        limits.max_streams,
        limits.idle_timeout,
        server_keep_alive(limits.idle_timeout),
        None,
    )));
    let socket = bind_udp(addr).map_err(|source| EndpointError::Bind { addr, source })?;
    quinn::Endpoint::new(
        server_endpoint_config(identity),
        Some(cfg),
        socket,
        Arc::new(quinn::TokioRuntime),
    )
    .map_err(|source| EndpointError::Bind { addr, source })
}

/// A client endpoint able to reach `server` (bound to the wildcard address of
/// the same family), presenting `identity` and trusting servers through
/// `verifier`.
pub fn client_endpoint(
    server: SocketAddr,
    verifier: Arc<PinnedServerVerifier>,
    identity: Option<&Identity>,
    opts: &TransportOpts,
) -> Result<quinn::Endpoint, EndpointError> {
    client_endpoint_resuming(server, verifier, identity, opts, None)
}

/// [`client_endpoint`], its controller starting from `memory`: what an
/// earlier connection over the same path learned ([`learned`]).
pub(crate) fn client_endpoint_resuming(
    server: SocketAddr,
    verifier: Arc<PinnedServerVerifier>,
    identity: Option<&Identity>,
    opts: &TransportOpts,
    memory: Option<PathMemory>,
) -> Result<quinn::Endpoint, EndpointError> {
    let crypto = QuicClientConfig::try_from(tls::client_crypto(verifier, identity)?)
        .map_err(|e| EndpointError::Quic(e.to_string()))?;
    let mut cfg = quinn::ClientConfig::new(Arc::new(crypto));
    // The server never opens streams toward a client.
    cfg.transport_config(Arc::new(opts.transport_config(
        0,
        DEFAULT_IDLE_TIMEOUT,
        Some(KEEP_ALIVE),
        memory,
    )));
    let bind: SocketAddr = if server.is_ipv6() {
        "[::]:0".parse().expect("valid address")
    } else {
        "0.0.0.0:0".parse().expect("valid address")
    };
    let socket = bind_udp(bind).map_err(|source| EndpointError::Bind { addr: bind, source })?;
    let mut endpoint = quinn::Endpoint::new(
        EndpointConfig::default(),
        None,
        socket,
        Arc::new(quinn::TokioRuntime),
    )
    .map_err(|source| EndpointError::Bind { addr: bind, source })?;
    endpoint.set_default_client_config(cfg);
    Ok(endpoint)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_server_pings_its_clients_only_under_a_short_idle_timeout() {
        assert_eq!(DEFAULT_IDLE_TIMEOUT, KEEP_ALIVE * 3);
        assert_eq!(server_keep_alive(DEFAULT_IDLE_TIMEOUT), None);
        assert_eq!(server_keep_alive(Duration::from_secs(60)), None);
        assert_eq!(
            server_keep_alive(Duration::from_secs(2)),
            Some(Duration::from_secs(2) / 3)
        );
        assert_eq!(server_keep_alive(Duration::ZERO), None);
    }
}

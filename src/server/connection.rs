//! One connection's life: the limits on handshakes and on connections per client, the handshake, then a task per stream until it closes.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use quinn::{ConnectionError, VarInt};
use tracing::{debug, info, info_span, warn, Instrument};

use crate::protocol::close;
use crate::tls::{peer_fingerprint, Fingerprint};

use super::*;

/// What graceful shutdown watches: whether the server is draining, and how
/// many requests are in flight.
#[derive(Clone, Default)]
pub(super) struct Activity {
    pub(super) draining: Arc<tokio::sync::watch::Sender<bool>>,
    pub(super) requests: Arc<tokio::sync::watch::Sender<usize>>,
    /// Whether the store has stopped answering (see `watch_store`): the
    /// server then closes its connections so that clients move to another
    /// server of the same name.
    pub(super) store_down: Arc<tokio::sync::watch::Sender<bool>>,
}

/// Counts one request in flight until dropped.
pub(super) struct InFlight(Arc<tokio::sync::watch::Sender<usize>>);

impl InFlight {
    pub(super) fn start(requests: &Arc<tokio::sync::watch::Sender<usize>>) -> Self {
        requests.send_modify(|n| *n += 1);
        Self(requests.clone())
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.send_modify(|n| *n -= 1);
    }
}

/// Handshakes in progress above which new addresses must pass a stateless
/// retry first. Legitimate clients rarely overlap this many handshakes;
/// a flood of spoofed ones reaches it at once and then stalls.
pub(super) const RETRY_ABOVE_HANDSHAKES: usize = 16;

/// Most handshakes in progress at once. They hold no connection slot (the
/// slot is taken once the client has proven who it is), only a few KiB
/// of state each, for at most [`HANDSHAKE_TIMEOUT`].
pub(super) const MAX_HANDSHAKES: usize = 1024;

/// Past this many handshakes in progress, one address may have at most
/// [`PER_ADDRESS_UNDER_PRESSURE`] of them: a flood from one place cannot
/// keep everyone else's handshakes out, while a burst of many clients
/// behind one address (a NAT, a CI farm) is never refused on an idle server.
pub(super) const PRESSURE_ABOVE: usize = 256;
pub(super) const PER_ADDRESS_UNDER_PRESSURE: usize = 32;

/// A handshake not complete within this long is dropped (QUIC's own limit
/// is the idle timeout, 30 s): a peer that answered the Retry and then
/// fell silent holds its share of the handshake budget no longer.
/// Generous for a lossy path: a client's own patience is 5 s of silence
/// plus 30 s once the server answered, and it tries again.
pub(super) const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// The handshakes in progress, in all and per address.
#[derive(Clone)]
pub(super) struct Handshakes(Arc<Mutex<(usize, HashMap<std::net::IpAddr, usize>)>>);

impl Handshakes {
    pub(super) fn new() -> Self {
        Self(Arc::default())
    }

    pub(super) fn count(&self) -> usize {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).0
    }

    /// Counts a handshake from `ip`, unless the budget (or, under
    /// pressure, that address's share of it) is spent.
    pub(super) fn start(&self, ip: std::net::IpAddr) -> Option<Handshaking> {
        let mut guard = self.0.lock().unwrap_or_else(|e| e.into_inner());
        let (total, per_ip) = &mut *guard;
        let mine = per_ip.get(&ip).copied().unwrap_or(0);
        let pressed = *total >= PRESSURE_ABOVE && mine >= PER_ADDRESS_UNDER_PRESSURE;
        if *total >= MAX_HANDSHAKES || pressed {
            return None;
        }
        *total += 1;
        *per_ip.entry(ip).or_insert(0) += 1;
        Some(Handshaking {
            all: self.clone(),
            ip,
        })
    }
}

/// Counts one handshake in progress until dropped.
pub(super) struct Handshaking {
    all: Handshakes,
    ip: std::net::IpAddr,
}

impl Drop for Handshaking {
    fn drop(&mut self) {
        let mut guard = self.all.0.lock().unwrap_or_else(|e| e.into_inner());
        let (total, per_ip) = &mut *guard;
        *total -= 1;
        if let Some(n) = per_ip.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                per_ip.remove(&self.ip);
            }
        }
    }
}

/// Open connections per client identity.
pub(super) type PerClient = Arc<Mutex<HashMap<Fingerprint, usize>>>;

/// Holds one of a client's connection slots; frees it when dropped.
pub(super) struct ClientSlot {
    fp: Fingerprint,
    counts: PerClient,
}

impl ClientSlot {
    /// Takes a slot for `fp`, or `None` if it already holds `max`.
    fn take(counts: &PerClient, fp: Fingerprint, max: usize) -> Option<Self> {
        let mut map = counts.lock().unwrap_or_else(|e| e.into_inner());
        let n = map.entry(fp).or_insert(0);
        if *n >= max {
            return None;
        }
        *n += 1;
        Some(Self {
            fp,
            counts: counts.clone(),
        })
    }
}

impl Drop for ClientSlot {
    fn drop(&mut self) {
        let mut map = self.counts.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(n) = map.get_mut(&self.fp) {
            *n -= 1;
            if *n == 0 {
                map.remove(&self.fp);
            }
        }
    }
}

pub(super) async fn handle_connection(
    incoming: quinn::Incoming,
    handshake: Handshaking,
    slots: &Arc<tokio::sync::Semaphore>,
    config: Arc<ServeConfig>,
    per_client: PerClient,
    partials: Arc<Partials>,
    activity: Activity,
) {
    // Awaiting the full handshake (never `into_0rtt`) means no request is
    // read before the client has proven its identity: 0-RTT never starts a
    // put. Dropped unfinished, the connection is closed.
    let established = tokio::time::timeout(HANDSHAKE_TIMEOUT, incoming).await;
    drop(handshake);
    let conn = match established {
        Ok(Ok(conn)) => conn,
        Ok(Err(e)) => {
            info!("handshake failed: {e}");
            // An identity not admitted, mostly; or a path that broke.
            metrics::refused("handshake_failed");
            return;
        }
        Err(_) => {
            debug!("handshake not complete within {HANDSHAKE_TIMEOUT:?}; dropped");
            metrics::refused("handshake_timeout");
            return;
        }
    };
    // The slot is taken only now, by a client that completed its
    // handshake (the check before it began may have raced with others).
    let Ok(_slot) = slots.clone().try_acquire_owned() else {
        warn!(
            "connection closed: {} connections already open (--max-connections)",
            config.max_connections
        );
        metrics::refused("busy");
        conn.close(VarInt::from_u32(close::BUSY), b"server busy");
        return;
    };
    let Some(fp) = peer_fingerprint(&conn) else {
        // The verifier makes a certificate mandatory; this is defence in depth.
        warn!("connection without a client certificate; closing");
        conn.close(
            VarInt::from_u32(close::DONE),
            b"client certificate required",
        );
        return;
    };
    let Some(_slot) = ClientSlot::take(&per_client, fp, config.max_connections_per_client) else {
        warn!(client = %fp, "connection refused: this client already has {} connections open (--max-connections-per-client)", config.max_connections_per_client);
        metrics::refused("client_limit");
        conn.close(
            VarInt::from_u32(close::TOO_MANY_FROM_CLIENT),
            b"too many connections from this client",
        );
        return;
    };
    let mut store_down = activity.store_down.subscribe();
    if *store_down.borrow_and_update() {
        info!(client = %fp, "connection closed: the store does not answer");
        metrics::refused("store_down");
        conn.close(
            VarInt::from_u32(close::STORE_DOWN),
            b"the server cannot reach its store",
        );
        return;
    }
    info!(client = %fp, "connected");
    let _open = metrics::OpenConnection::start();
    crate::endpoint::tune_receive_window(conn.clone());
    let mut draining = activity.draining.subscribe();
    loop {
        let accepted = tokio::select! {
            biased;
            _ = async { store_down.wait_for(|d| *d).await.is_ok() } => {
                // What runs would fail at the store: the client hears why
                // and resumes through another server of the same name.
                info!(client = %fp, "closing the connection: the store does not answer");
                conn.close(
                    VarInt::from_u32(close::STORE_DOWN),
                    b"the server cannot reach its store",
                );
                return;
            }
            _ = async { draining.wait_for(|d| *d).await.is_ok() } => {
                // No new requests: streams opened from now on are reset with
                // the shutdown code (the client retries them after
                // reconnecting); the connection closes once those in flight end.
                loop {
                    match conn.accept_bi().await {
                        Ok((mut send, mut recv)) => {
                            let code = VarInt::from_u32(close::SHUTTING_DOWN);
                            let _ = send.reset(code);
                            let _ = recv.stop(code);
                        }
                        Err(_) => return,
                    }
                }
            }
            accepted = conn.accept_bi() => accepted,
        };
        match accepted {
            Ok((send, recv)) => {
                let in_flight = InFlight::start(&activity.requests);
                let span = info_span!("stream", id = %send.id());
                let ctx = Ctx {
                    config: config.clone(),
                    client: fp,
                    partials: partials.clone(),
                    conn: Some(conn.clone()),
                    requests: activity.requests.clone(),
                };
                tokio::spawn(
                    async move {
                        handle_stream(send, recv, ctx).await;
                        drop(in_flight);
                    }
                    .instrument(span),
                );
            }
            Err(ConnectionError::ApplicationClosed(_)) => {
                info!("disconnected");
                break;
            }
            Err(e) => {
                info!("connection ended: {e}");
                break;
            }
        }
    }
}

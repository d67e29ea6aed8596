//! What an operator watches: the server's metrics in Prometheus's text format and whether its store answers, on HTTP (`serve --metrics ADDR`).
//!
//! The server's code records through the `metrics` crate's macros, which do
//! nothing until a recorder is installed: library callers and the in-process
//! tests pay nothing for them. `serve --metrics` installs
//! `metrics-exporter-prometheus`'s recorder for the process and answers
//!
//! - `GET /metrics`: every metric below, in the text exposition format
//!   (version 0.0.4) that Prometheus scrapes and `promtool check metrics`
//!   accepts (`qxfer_store_up` is the server's own probe, every 5 s);
//! - `GET /health`: 200 `ok` when the store answers a probe within
//!   [`HEALTH_TIMEOUT`], else 503 and why (a load balancer or a client's
//!   failover takes that server out).
//!
//! The names are documented in the README ("Metrics"); [`names`] is the
//! one list of them.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use http_body_util::Full;
use hyper::body::Bytes;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use metrics::{counter, describe_counter, describe_gauge, describe_histogram, gauge, Unit};
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use tracing::{debug, warn};

use super::partials::Partials;
use super::ServeConfig;

/// The metrics' names, one place for the code and the README.
pub(crate) mod names {
    /// Gauge: connections past their handshake, open now.
    pub(crate) const CONNECTIONS_OPEN: &str = "qxfer_connections_open";
    /// Counter, by `reason`: connections refused before or at the handshake.
    pub(crate) const CONNECTIONS_REFUSED: &str = "qxfer_connections_refused_total";
    /// Counter, by `kind` and `outcome`: requests served.
    pub(crate) const REQUESTS: &str = "qxfer_requests_total";
    /// Histogram, by `kind`: how long requests took, start to last answer.
    pub(crate) const REQUEST_SECONDS: &str = "qxfer_request_seconds";
    /// Gauge: requests (transfers, listings, ...) in flight now.
    pub(crate) const IN_FLIGHT: &str = "qxfer_requests_in_flight";
    /// Counter: file bytes received from clients.
    pub(crate) const BYTES_RECEIVED: &str = "qxfer_received_bytes_total";
    /// Counter: file bytes sent to clients.
    pub(crate) const BYTES_SENT: &str = "qxfer_sent_bytes_total";
    /// Histogram: how long a put's commit took (durable under its name).
    pub(crate) const COMMIT_SECONDS: &str = "qxfer_commit_seconds";
    /// Gauge: resumable uploads writing their partial now.
    pub(crate) const PARTIALS_OPEN: &str = "qxfer_partials_open";
    /// Gauge: interrupted uploads the store keeps for a resume (in a
    /// shared bucket, every server's), counted at most every
    /// [`super::HELD_FRESH`].
    pub(crate) const PARTIALS_HELD: &str = "qxfer_partials_held";
    /// Counter: requests that failed because the store did.
    pub(crate) const STORE_ERRORS: &str = crate::store::STORE_ERRORS_METRIC;
    /// Histogram: how long a health probe of the store took.
    pub(crate) const STORE_PROBE_SECONDS: &str = "qxfer_store_probe_seconds";
    /// Gauge: 1 if the last probe of the store succeeded, else 0.
    pub(crate) const STORE_UP: &str = "qxfer_store_up";
    /// Counter: uploads that resumed from what an earlier connection left
    /// (a client that came back after losing its connection or its server).
    pub(crate) const RESUMED_UPLOADS: &str = "qxfer_resumed_uploads_total";
}

/// How long a count of the partials held stands before a scrape counts
/// again: a count is a listing of the partial store (a LIST a thousand
/// uploads in a bucket), so anyone who reaches the port, scraping as fast
/// as it can, costs the store at most one listing in this long.
const HELD_FRESH: Duration = Duration::from_secs(10);

/// How long `/health` waits for the store's answer.
pub(crate) const HEALTH_TIMEOUT: Duration = Duration::from_secs(5);

/// Most HTTP connections served at once: the port answers anyone who
/// reaches it, so its work is bounded like the rest.
const MAX_HTTP_CONNECTIONS: usize = 64;

/// How often histogram samples are folded into their buckets.
const UPKEEP_EVERY: Duration = Duration::from_secs(5);

/// A request's headers must arrive within this long.
const HEADER_TIMEOUT: Duration = Duration::from_secs(10);

/// The latency histograms' buckets, in seconds: from a small file's commit
/// on a local disk (a millisecond) to a large object's in a store (a minute).
const BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
];

/// Why `serve --metrics` cannot start.
#[derive(Debug, thiserror::Error)]
pub enum MetricsError {
    /// The address cannot be bound.
    #[error("cannot listen for metrics on {addr}: {source}; choose another --metrics address")]
    Bind {
        /// As given.
        addr: SocketAddr,
        /// The system's error.
        source: std::io::Error,
    },
    /// Another recorder is installed in this process already.
    #[error("metrics are already being recorded in this process: {0}")]
    Recorder(String),
}

/// What the HTTP side reads when asked.
#[derive(Clone)]
pub(super) struct Watched {
    pub(super) config: Arc<ServeConfig>,
    pub(super) partials: Arc<Partials>,
    pub(super) requests: Arc<tokio::sync::watch::Sender<usize>>,
    /// When the partials held were last counted; one count at a time.
    pub(super) held_counted: Arc<tokio::sync::Mutex<Option<Instant>>>,
}

/// The installed recorder and the bound HTTP listener; [`Exporter::serve`]
/// answers on it once the server's state exists.
pub struct Exporter {
    handle: PrometheusHandle,
    listener: tokio::net::TcpListener,
}

impl Exporter {
    /// Installs the process's recorder and binds `addr`, so that a taken
    /// port is an error at start, not later.
    pub async fn bind(addr: SocketAddr) -> Result<Self, MetricsError> {
        let recorder = PrometheusBuilder::new()
            .set_buckets(BUCKETS)
            .map_err(|e| MetricsError::Recorder(e.to_string()))?
            .build_recorder();
        let handle = recorder.handle();
        metrics::set_global_recorder(recorder)
            .map_err(|e| MetricsError::Recorder(e.to_string()))?;
        describe();
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .map_err(|source| MetricsError::Bind { addr, source })?;
        Ok(Self { handle, listener })
    }

    /// The bound address (a port of 0 becomes the one chosen).
    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// Answers HTTP requests until dropped (the task is aborted).
    pub(super) async fn serve(self, watched: Watched) {
        // The recorder keeps each histogram's samples until they are
        // folded into its buckets: done here every few seconds, so a
        // server nobody scrapes holds no more than that.
        let upkeep = {
            let handle = self.handle.clone();
            tokio::spawn(async move {
                let mut every = tokio::time::interval(UPKEEP_EVERY);
                loop {
                    every.tick().await;
                    handle.run_upkeep();
                }
            })
        };
        struct Stop(tokio::task::JoinHandle<()>);
        impl Drop for Stop {
            fn drop(&mut self) {
                self.0.abort();
            }
        }
        let _upkeep = Stop(upkeep);
        let slots = Arc::new(tokio::sync::Semaphore::new(MAX_HTTP_CONNECTIONS));
        loop {
            let (stream, peer) = match self.listener.accept().await {
                Ok(accepted) => accepted,
                Err(e) => {
                    // Out of file descriptors, say: wait, as a busy server does.
                    warn!("metrics: cannot accept a connection: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            let Ok(slot) = slots.clone().try_acquire_owned() else {
                debug!(%peer, "metrics: too many connections; closing this one");
                continue;
            };
            let (handle, watched) = (self.handle.clone(), watched.clone());
            tokio::spawn(async move {
                let service = hyper::service::service_fn(move |req| {
                    let (handle, watched) = (handle.clone(), watched.clone());
                    async move { Ok::<_, Infallible>(answer(req, &handle, &watched).await) }
                });
                let served = hyper::server::conn::http1::Builder::new()
                    .timer(TokioTimer::new())
                    .header_read_timeout(HEADER_TIMEOUT)
                    .keep_alive(false)
                    .serve_connection(TokioIo::new(stream), service);
                // A client that stops reading cannot hold its slot forever.
                match tokio::time::timeout(HEALTH_TIMEOUT * 2, served).await {
                    Ok(Err(e)) => debug!(%peer, "metrics: {e}"),
                    Err(_) => debug!(%peer, "metrics: connection too slow; closed"),
                    Ok(Ok(())) => {}
                }
                drop(slot);
            });
        }
    }
}

/// One HTTP request's answer.
async fn answer<B>(
    req: Request<B>,
    handle: &PrometheusHandle,
    watched: &Watched,
) -> Response<Full<Bytes>> {
    if req.method() != Method::GET && req.method() != Method::HEAD {
        return text(StatusCode::METHOD_NOT_ALLOWED, "only GET\n".to_owned());
    }
    match req.uri().path() {
        "/metrics" => {
            count_held(watched).await;
            sample(watched);
            let mut response = text(StatusCode::OK, handle.render());
            response.headers_mut().insert(
                hyper::header::CONTENT_TYPE,
                hyper::header::HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
            );
            response
        }
        "/health" => match probe(watched).await {
            Ok(()) => text(StatusCode::OK, "ok\n".to_owned()),
            Err(why) => text(
                StatusCode::SERVICE_UNAVAILABLE,
                format!("unhealthy: {why}\n"),
            ),
        },
        _ => text(
            StatusCode::NOT_FOUND,
            "not found; try /metrics or /health\n".to_owned(),
        ),
    }
}

fn text(status: StatusCode, body: String) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    response
}

/// Whether the store answers, within [`HEALTH_TIMEOUT`]; recorded too.
async fn probe(watched: &Watched) -> Result<(), String> {
    let started = Instant::now();
    let result = match tokio::time::timeout(HEALTH_TIMEOUT, watched.config.store.probe()).await {
        Ok(result) => result,
        Err(_) => Err(format!(
            "the store did not answer within {} s",
            HEALTH_TIMEOUT.as_secs()
        )),
    };
    metrics::histogram!(names::STORE_PROBE_SECONDS).record(started.elapsed().as_secs_f64());
    store_answered(result.is_ok());
    if let Err(why) = &result {
        warn!("health: {why}");
    }
    result
}

/// Counts the partials the store holds, unless that was done within
/// [`HELD_FRESH`] (the gauge then keeps the last count). A store that does
/// not answer within [`HEALTH_TIMEOUT`] leaves the last count, and says so.
async fn count_held(watched: &Watched) {
    let mut last = watched.held_counted.lock().await;
    if last.is_some_and(|at| at.elapsed() < HELD_FRESH) {
        return;
    }
    *last = Some(Instant::now());
    match tokio::time::timeout(HEALTH_TIMEOUT, watched.config.store.held_partials()).await {
        Ok(Ok(n)) => gauge!(names::PARTIALS_HELD).set(n as f64),
        Ok(Err(e)) => warn!("metrics: cannot count the partial uploads held: {e}"),
        Err(_) => warn!(
            "metrics: the store did not list the partial uploads held within {} s",
            HEALTH_TIMEOUT.as_secs()
        ),
    }
}

/// The values kept elsewhere, read as a scrape asks for them.
fn sample(watched: &Watched) {
    let stats = &watched.config.stats;
    counter!(names::BYTES_RECEIVED).absolute(stats.bytes_received.load(Ordering::Relaxed));
    counter!(names::BYTES_SENT).absolute(stats.bytes_sent.load(Ordering::Relaxed));
    gauge!(names::IN_FLIGHT).set(*watched.requests.borrow() as f64);
    gauge!(names::PARTIALS_OPEN).set(watched.partials.writing() as f64);
}

/// Help texts, shown in the exposition.
fn describe() {
    use names::*;
    describe_gauge!(
        CONNECTIONS_OPEN,
        "Connections past their handshake, open now."
    );
    describe_counter!(
        CONNECTIONS_REFUSED,
        "Connections refused, by reason: busy (--max-connections), handshakes (too many in progress), handshake_failed (mostly a client not admitted), handshake_timeout, client_limit (--max-connections-per-client), draining (shutting down), store_down (the store does not answer)."
    );
    describe_counter!(
        REQUESTS,
        "Requests served, by kind (put, get, get_delta, digests, list, mkdir, remove, rename, set_meta, bad) and outcome (ok, refused)."
    );
    describe_histogram!(
        REQUEST_SECONDS,
        Unit::Seconds,
        "How long requests took, from their header to their last answer, by kind."
    );
    describe_gauge!(IN_FLIGHT, "Requests in flight now.");
    describe_counter!(
        BYTES_RECEIVED,
        Unit::Bytes,
        "File bytes received from clients."
    );
    describe_counter!(BYTES_SENT, Unit::Bytes, "File bytes sent to clients.");
    describe_histogram!(
        COMMIT_SECONDS,
        Unit::Seconds,
        "How long a put's commit took, until the file was durable under its name."
    );
    describe_gauge!(
        PARTIALS_HELD,
        "Interrupted uploads the store keeps for a resume (in a shared bucket, every server's), counted at most every 10 s."
    );
    describe_gauge!(
        PARTIALS_OPEN,
        "Resumable uploads (large files) writing their partial on this server now."
    );
    describe_counter!(
        STORE_ERRORS,
        "Requests that failed on the server's side: the object store failed or refused the server, or the local disk did (errors Internal and NoSpace)."
    );
    describe_histogram!(
        STORE_PROBE_SECONDS,
        Unit::Seconds,
        "How long the store took to answer a health probe."
    );
    describe_gauge!(
        STORE_UP,
        "1 if the store answered the last health probe, else 0."
    );
    describe_counter!(
        RESUMED_UPLOADS,
        "Uploads resumed from what an earlier connection left: clients that came back."
    );
    // Present from the start, at zero, so that a rate or an alert on them
    // sees a series before the first event.
    counter!(STORE_ERRORS).increment(0);
    counter!(RESUMED_UPLOADS).increment(0);
    gauge!(CONNECTIONS_OPEN).increment(0.0);
}

/// Records one connection refused, for `reason`.
pub(crate) fn refused(reason: &'static str) {
    counter!(names::CONNECTIONS_REFUSED, "reason" => reason).increment(1);
}

/// Counts an open connection until dropped.
pub(crate) struct OpenConnection(());

impl OpenConnection {
    pub(crate) fn start() -> Self {
        gauge!(names::CONNECTIONS_OPEN).increment(1.0);
        Self(())
    }
}

impl Drop for OpenConnection {
    fn drop(&mut self) {
        gauge!(names::CONNECTIONS_OPEN).decrement(1.0);
    }
}

/// Records one request served.
pub(crate) fn request_done(kind: &'static str, ok: bool, store_failed: bool, took: Duration) {
    let outcome = if ok { "ok" } else { "refused" };
    counter!(names::REQUESTS, "kind" => kind, "outcome" => outcome).increment(1);
    metrics::histogram!(names::REQUEST_SECONDS, "kind" => kind).record(took.as_secs_f64());
    if store_failed {
        counter!(names::STORE_ERRORS).increment(1);
    }
}

/// Records one commit's time.
pub(crate) fn committed(took: Duration) {
    metrics::histogram!(names::COMMIT_SECONDS).record(took.as_secs_f64());
}

/// Records whether the store answered a probe.
pub(crate) fn store_answered(up: bool) {
    gauge!(names::STORE_UP).set(if up { 1.0 } else { 0.0 });
}

/// Records an upload resumed from a partial.
pub(crate) fn resumed() {
    counter!(names::RESUMED_UPLOADS).increment(1);
}

//! Reconnect and resume: the files of a batch that failed for the connection's sake run again over a new connection, with growing waits between attempts.
//!
//! Each file resumes where it stopped (the server keeps the partial of an
//! upload, the client that of a download), so a retry sends only the
//! rest. The loop is generic over the connection ([`Session`]), so its
//! policy is tested here without a network; [`run_resilient`] runs it over
//! a [`Client`].

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;

use super::{run_batch, BatchReport, Client, ClientConfig, ConnectError, Direction, FileError};
use super::{Job, Watch};

/// How often and how patiently a batch reconnects.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct RetryPolicy {
    /// Reconnections at most (`--retries`); 0 gives up at once.
    pub retries: u32,
    /// The wait before the first reconnection; it doubles after each.
    pub first_wait: Duration,
    /// The longest wait.
    pub max_wait: Duration,
}

impl RetryPolicy {
    /// `retries` reconnections, 0.5 s apart at first, doubling up to 10 s.
    pub(crate) fn new(retries: u32) -> Self {
        Self {
            retries,
            first_wait: Duration::from_millis(500),
            max_wait: Duration::from_secs(10),
        }
    }

    /// The waits of this policy, one reconnection after another.
    pub(crate) fn backoff(&self) -> Backoff {
        Backoff {
            next: self.first_wait,
            max: self.max_wait,
        }
    }
}

/// The wait before each reconnection: doubling, up to a ceiling.
#[derive(Debug, Clone)]
pub(crate) struct Backoff {
    next: Duration,
    max: Duration,
}

impl Backoff {
    /// How long the next [`Backoff::wait`] waits.
    pub(crate) fn next(&self) -> Duration {
        self.next
    }

    /// Waits the current delay and doubles the next one.
    pub(crate) async fn wait(&mut self) {
        tokio::time::sleep(self.next).await;
        self.next = (self.next * 2).min(self.max);
    }
}

/// What the loop tells its caller as it goes (the command line prints it).
#[derive(Debug)]
pub(crate) enum RetryEvent<'a> {
    /// Reconnecting in `wait` to run `files` files again, because `why`.
    Reconnecting {
        why: &'a str,
        files: usize,
        attempt: u32,
        of: u32,
        wait: Duration,
    },
    /// A reconnection failed, in a way worth another try.
    ConnectFailed(&'a ConnectError),
    /// The reconnection went to another address of the same server (`to`)
    /// than the one lost (`from`).
    FailedOver { from: &'a str, to: &'a str },
}

/// A connection a batch runs over, as the retry loop sees it.
#[async_trait]
pub(crate) trait Session: Send + Sync + Sized {
    /// Runs `jobs`; the report's `retry` lists those worth another try.
    async fn run(&self, jobs: Vec<Job>) -> BatchReport;
    /// Why the connection ended, if it did.
    fn lost(&self) -> Option<String>;
    /// Whether the server refused this client for good (no retry helps).
    fn refused(&self) -> bool;
    /// The address it is connected to (as given).
    fn server(&self) -> String;
    /// Bytes the batch's data crossed this connection with so far (sent
    /// for a put, received for a get), framing included.
    fn moved(&self) -> u64;
    /// Closes the connection.
    async fn close(self);
}

/// Whether a failed reconnection is worth another try: the server is
/// down, restarting, draining or busy, not refusing this client for good.
pub(crate) fn is_transient_connect(e: &ConnectError) -> bool {
    matches!(
        e,
        ConnectError::Unreachable { .. }
            | ConnectError::Busy { .. }
            | ConnectError::TooManyFromClient { .. }
            | ConnectError::Connection { .. }
    )
}

/// Runs `jobs` over `first`; while some fail for the connection's sake,
/// reconnects (`reconnect`) after the policy's wait and runs those again,
/// up to `policy.retries` times. Returns the last session and the merged
/// report; a reconnection that fails for good (not
/// [`is_transient_connect`]) ends it with that error.
pub(crate) async fn retrying<S, F, Fut>(
    first: S,
    jobs: Vec<Job>,
    policy: RetryPolicy,
    mut reconnect: F,
    events: &mut (dyn FnMut(RetryEvent<'_>) + Send),
) -> Result<(S, BatchReport), ConnectError>
where
    S: Session,
    F: FnMut(&S) -> Fut,
    Fut: Future<Output = Result<S, ConnectError>>,
{
    let mut session = first;
    // What had crossed the connection before its run (a listing, the
    // handshake), and where its finished files start in `report.done`.
    let mut moved_before = session.moved();
    let mut report = session.run(jobs).await;
    let mut since = 0;
    let mut backoff = policy.backoff();
    for attempt in 1..=policy.retries {
        if report.retry.is_empty() || session.refused() {
            break;
        }
        let retry = std::mem::take(&mut report.retry);
        let why = session.lost().unwrap_or_else(|| {
            let first = report.failed.iter().find(|(l, _)| *l == retry[0].label);
            first.map_or_else(String::new, |(_, e)| e.to_string())
        });
        events(RetryEvent::Reconnecting {
            why: &why,
            files: retry.len(),
            attempt,
            of: policy.retries,
            wait: backoff.next(),
        });
        backoff.wait().await;
        let fresh = match reconnect(&session).await {
            Ok(fresh) => fresh,
            Err(e) if is_transient_connect(&e) => {
                events(RetryEvent::ConnectFailed(&e));
                report.retry = retry;
                continue;
            }
            Err(e) => return Err(e),
        };
        let (from, to) = (session.server(), fresh.server());
        if from != to {
            events(RetryEvent::FailedOver {
                from: &from,
                to: &to,
            });
        }
        // What crossed the connection left behind for files that did not
        // finish on it.
        let finished: u64 = report.done[since..].iter().map(|r| r.wire_bytes).sum();
        report.lost.connections += 1;
        report.lost.unfinished += session.moved().saturating_sub(moved_before + finished);
        session.close().await;
        session = fresh;
        // The files to run again leave the failures; what fails again returns.
        report
            .failed
            .retain(|(label, _)| !retry.iter().any(|j| j.label == *label));
        moved_before = session.moved();
        let again = session.run(retry).await;
        since = report.done.len();
        // What the retried files resumed from was kept across the loss.
        report.lost.kept += again
            .done
            .iter()
            .filter(|r| !r.already_there)
            .map(|r| r.resumed_from)
            .sum::<u64>();
        report.done.extend(again.done);
        report.failed.extend(again.failed);
        report.retry = again.retry;
        report.elapsed += again.elapsed;
        // The last connection's path: the one the retried files crossed.
        report.path = again.path.or(report.path);
    }
    // Retries spent: what still failed for the connection's sake says why
    // the connection ended, if it did ("the server is shutting down"),
    // rather than only "connection lost".
    if let Some(why) = session.lost() {
        for (label, e) in &mut report.failed {
            if report.retry.iter().any(|j| j.label == *label) {
                let detail = match &*e {
                    FileError::Transfer { source, .. } => source.to_string(),
                    other => other.to_string(),
                };
                *e = FileError::Protocol(format!("{why}; {detail}"));
            }
        }
    }
    Ok((session, report))
}

/// How the files of a batch move: which way, how many large ones at once,
/// and whether they replace what is there.
#[derive(Debug, Clone, Copy)]
pub(crate) struct BatchOptions {
    pub direction: Direction,
    /// Large files in flight at once.
    pub parallel: usize,
    /// Replace existing files (`--force`, `--sync`).
    pub force: bool,
}

/// A [`Client`] running batches with fixed options.
struct Over {
    client: Client,
    options: BatchOptions,
    watch: Arc<dyn Watch>,
}

#[async_trait]
impl Session for Over {
    async fn run(&self, jobs: Vec<Job>) -> BatchReport {
        let o = self.options;
        run_batch(
            &self.client,
            o.direction,
            jobs,
            o.parallel,
            o.force,
            &self.watch,
        )
        .await
    }

    fn lost(&self) -> Option<String> {
        self.client.lost()
    }

    fn refused(&self) -> bool {
        self.client.refusal().is_some()
    }

    fn server(&self) -> String {
        self.client.server().to_owned()
    }

    fn moved(&self) -> u64 {
        let stats = self.client.connection().stats();
        match self.options.direction {
            Direction::Put => stats.udp_tx.bytes,
            Direction::Get => stats.udp_rx.bytes,
        }
    }

    async fn close(self) {
        self.client.close().await;
    }
}

/// [`run_batch`] that survives lost connections: runs `jobs` over
/// `client` and, while some fail for the connection's sake (see
/// [`FileError::is_transient`]), reconnects with `config` and runs those
/// again, as `policy` allows. `events` hears of each reconnection.
/// Returns the last connection and the merged report.
pub(crate) async fn run_resilient(
    client: Client,
    config: &ClientConfig,
    options: BatchOptions,
    jobs: Vec<Job>,
    policy: RetryPolicy,
    watch: &Arc<dyn Watch>,
    mut events: impl FnMut(RetryEvent<'_>) + Send,
) -> Result<(Client, BatchReport), ConnectError> {
    let first = Over {
        client,
        options,
        watch: watch.clone(),
    };
    // After a lost connection, the server's other addresses first: the
    // one just lost is likely down (see `Client::connect_avoiding`). After
    // a retry for another reason (files refused as busy) the connection
    // was fine: the address last lost, if any, is still the one avoided.
    let down: std::sync::Mutex<Option<String>> = std::sync::Mutex::new(None);
    let reconnect = |prev: &Over| {
        let mut down = down.lock().unwrap_or_else(|e| e.into_inner());
        if prev.client.lost().is_some() {
            *down = Some(prev.client.server().to_owned());
        }
        let avoid = down.clone();
        async move {
            Client::connect_avoiding(config, avoid.as_deref())
                .await
                .map(|client| Over {
                    client,
                    options,
                    watch: watch.clone(),
                })
        }
    };
    let (last, report) = retrying(first, jobs, policy, reconnect, &mut events).await?;
    Ok((last.client, report))
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;
    use std::sync::atomic::{AtomicU32, Ordering};
    use std::sync::Mutex;

    use super::*;
    use crate::exchange::TransferError;

    /// Each run: the connection's number and the files it was given.
    type Runs = Arc<Mutex<Vec<(u32, Vec<String>)>>>;

    /// A connection that fails the files it is told to for the
    /// connection's sake (they come back in `retry`) and lets the rest
    /// through.
    struct Fake {
        /// Which connection this is (0: the first).
        nth: u32,
        /// Files that fail on the connections before this number.
        fails_until: u32,
        refused: bool,
        closed: Arc<AtomicU32>,
        runs: Runs,
    }

    fn job(label: &str) -> Job {
        Job {
            label: label.to_owned(),
            local: PathBuf::from(label),
            remote: label.to_owned(),
            size_hint: None,
            within: None,
        }
    }

    fn lost_error(label: &str) -> FileError {
        FileError::Transfer {
            path: PathBuf::from(label),
            source: TransferError::Network(std::io::ErrorKind::ConnectionReset.into()),
        }
    }

    #[async_trait]
    impl Session for Fake {
        async fn run(&self, jobs: Vec<Job>) -> BatchReport {
            let labels = jobs.iter().map(|j| j.label.clone()).collect();
            self.runs.lock().unwrap().push((self.nth, labels));
            let mut report = BatchReport {
                done: Vec::new(),
                failed: Vec::new(),
                retry: Vec::new(),
                elapsed: Duration::from_secs(1),
                path: None,
                lost: Default::default(),
            };
            for j in jobs {
                if j.label.starts_with("flaky") && self.nth < self.fails_until {
                    report.failed.push((j.label.clone(), lost_error(&j.label)));
                    report.retry.push(j);
                } else if j.label.starts_with("bad") {
                    let e = FileError::Protocol(format!("{}: refused", j.label));
                    report.failed.push((j.label.clone(), e));
                }
            }
            report
        }

        fn lost(&self) -> Option<String> {
            (self.nth < self.fails_until).then(|| format!("connection {} lost", self.nth))
        }

        fn refused(&self) -> bool {
            self.refused
        }

        fn server(&self) -> String {
            "s".to_owned()
        }

        fn moved(&self) -> u64 {
            // A connection that is lost carried 1,000 bytes of its files
            // once it ran them.
            let ran = self
                .runs
                .lock()
                .unwrap()
                .iter()
                .any(|(n, _)| *n == self.nth);
            if ran && self.nth < self.fails_until {
                1_000
            } else {
                0
            }
        }

        async fn close(self) {
            self.closed.fetch_add(1, Ordering::SeqCst);
        }
    }

    struct Run {
        report: Result<(u32, BatchReport), ConnectError>,
        runs: Vec<(u32, Vec<String>)>,
        events: Vec<String>,
        closed: u32,
        waited: Duration,
    }

    /// Runs `jobs` with `retries`, files named `flaky*` failing on the
    /// first `fails_until` connections, and reconnections answering as
    /// `connects` says in turn (then succeeding).
    async fn run(
        labels: &[&str],
        retries: u32,
        fails_until: u32,
        connects: Vec<Result<(), ConnectError>>,
    ) -> Run {
        let runs = Arc::new(Mutex::new(Vec::new()));
        let closed = Arc::new(AtomicU32::new(0));
        let fake = |nth| Fake {
            nth,
            fails_until,
            refused: false,
            closed: closed.clone(),
            runs: runs.clone(),
        };
        let connects = Mutex::new(connects.into_iter());
        let made = AtomicU32::new(0);
        let reconnect = |_: &Fake| async {
            match connects.lock().unwrap().next() {
                Some(Err(e)) => Err(e),
                _ => Ok(fake(made.fetch_add(1, Ordering::SeqCst) + 1)),
            }
        };
        let mut events = Vec::new();
        let started = tokio::time::Instant::now();
        let report = retrying(
            fake(0),
            labels.iter().map(|l| job(l)).collect(),
            RetryPolicy::new(retries),
            reconnect,
            &mut |e| events.push(format!("{e:?}")),
        )
        .await
        .map(|(s, r)| (s.nth, r));
        let waited = started.elapsed();
        let runs = runs.lock().unwrap().clone();
        Run {
            report,
            runs,
            events,
            closed: closed.load(Ordering::SeqCst),
            waited,
        }
    }

    fn unreachable() -> ConnectError {
        ConnectError::Unreachable {
            after: Duration::from_secs(5),
            server: "s".into(),
            addr: "127.0.0.1:9".parse().unwrap(),
        }
    }

    #[tokio::test(start_paused = true)]
    async fn files_lost_with_the_connection_run_again_over_a_new_one() {
        let r = run(&["a", "flaky1", "bad", "flaky2"], 5, 2, vec![]).await;
        let (last, report) = r.report.unwrap();
        assert_eq!(last, 2, "two reconnections");
        assert_eq!(
            r.runs,
            vec![
                (
                    0,
                    vec!["a".into(), "flaky1".into(), "bad".into(), "flaky2".into()]
                ),
                (1, vec!["flaky1".into(), "flaky2".into()]),
                (2, vec!["flaky1".into(), "flaky2".into()]),
            ],
            "only the files lost with the connection run again"
        );
        let failed: Vec<&str> = report.failed.iter().map(|(l, _)| l.as_str()).collect();
        assert_eq!(
            failed,
            ["bad"],
            "a file that failed for its own sake is not retried"
        );
        assert!(report.retry.is_empty());
        assert_eq!(report.elapsed, Duration::from_secs(3));
        assert_eq!(r.closed, 2, "each replaced connection is closed");
        // What the two lost connections carried for the files run again.
        let lost = crate::client::batch::Lost {
            connections: 2,
            unfinished: 2_000,
            kept: 0,
        };
        assert_eq!((report.lost, report.lost.twice()), (lost, 2_000));
        // 0.5 s, then 1 s.
        assert_eq!(r.waited, Duration::from_millis(1500));
        assert_eq!(r.events.len(), 2);
        assert!(r.events[0].contains("connection 0 lost"), "{:?}", r.events);
        assert!(r.events[1].contains("attempt: 2"), "{:?}", r.events);
    }

    #[tokio::test(start_paused = true)]
    async fn retries_end_with_the_reason_the_connection_ended() {
        let r = run(&["flaky"], 3, 10, vec![]).await;
        let (last, report) = r.report.unwrap();
        assert_eq!(last, 3);
        assert_eq!(r.runs.len(), 4, "the first run and three retries");
        assert_eq!(report.retry.len(), 1, "still worth another try");
        let (label, e) = &report.failed[0];
        assert_eq!(label, "flaky");
        assert!(
            e.to_string().starts_with("connection 3 lost; "),
            "the failure names why the connection ended: {e}"
        );
        // 0.5 + 1 + 2 s.
        assert_eq!(r.waited, Duration::from_millis(3500));
    }

    #[tokio::test(start_paused = true)]
    async fn waits_double_up_to_ten_seconds() {
        let mut b = RetryPolicy::new(9).backoff();
        let mut waits = Vec::new();
        for _ in 0..7 {
            waits.push(b.next().as_millis());
            b.wait().await;
        }
        assert_eq!(waits, [500, 1000, 2000, 4000, 8000, 10000, 10000]);
    }

    #[tokio::test(start_paused = true)]
    async fn no_retries_gives_up_at_once() {
        let r = run(&["flaky"], 0, 1, vec![]).await;
        let (last, report) = r.report.unwrap();
        assert_eq!((last, r.runs.len(), r.waited), (0, 1, Duration::ZERO));
        assert_eq!(report.failed.len(), 1);
        assert!(r.events.is_empty());
    }

    #[tokio::test(start_paused = true)]
    async fn a_server_still_down_costs_an_attempt_and_the_next_one_tries_again() {
        let r = run(&["flaky"], 5, 1, vec![Err(unreachable()), Ok(())]).await;
        let (last, report) = r.report.unwrap();
        assert_eq!(last, 1);
        assert!(report.failed.is_empty(), "{:?}", report.failed);
        assert_eq!(r.runs.len(), 2);
        assert!(r.events[1].starts_with("ConnectFailed"), "{:?}", r.events);
        assert_eq!(r.closed, 1);
    }

    #[tokio::test(start_paused = true)]
    async fn a_failure_for_good_ends_the_retries_with_its_error() {
        let bad = ConnectError::BadAddress("nowhere".into());
        let r = run(&["flaky"], 5, 1, vec![Err(bad)]).await;
        assert!(matches!(r.report, Err(ConnectError::BadAddress(_))));
        assert_eq!(r.runs.len(), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn a_session_refused_by_the_server_is_not_retried() {
        let runs = Arc::new(Mutex::new(Vec::new()));
        let fake = Fake {
            nth: 0,
            fails_until: 1,
            refused: true,
            closed: Arc::new(AtomicU32::new(0)),
            runs: runs.clone(),
        };
        let reconnect = |_: &Fake| async { Err::<Fake, _>(unreachable()) };
        let (_, report) = retrying(
            fake,
            vec![job("flaky")],
            RetryPolicy::new(5),
            reconnect,
            &mut |_| {},
        )
        .await
        .unwrap();
        assert_eq!(runs.lock().unwrap().len(), 1);
        assert_eq!(report.retry.len(), 1);
    }
}

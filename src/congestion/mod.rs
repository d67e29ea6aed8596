//! qxfer's congestion controller: a model of the path (bottleneck rate and
//! round-trip time) sizes the window, so random loss does not slow a
//! transfer and the bottleneck queue stays short.
//!
//! Why our own. quinn ships three controllers; measured over an emulated
//! 100 ms / 500 Mbit/s path with a one-BDP drop-tail queue (docs/BENCHMARKS.md):
//! - Cubic and NewReno halve their window on every loss, so 0.5% random
//!   loss (not congestion at all) stalls them: a 200 MiB copy took minutes.
//! - BBR (an early BBRv1, marked experimental upstream) ignores random loss,
//!   but its startup keeps doubling for three rounds after the pipe is full
//!   and overflows the queue: 27 to 42% of its packets were dropped there.
//!
//! This one keeps BBR's model and drops what hurt:
//! - Every acknowledgement gives a delivery-rate sample (bytes delivered
//!   between a packet's send and its ack, over the longer of the send and
//!   ack intervals, as in BBR); the bottleneck rate `bw` is the largest
//!   sample of the last ten rounds, and `min_rtt` the smallest RTT of the
//!   last ten seconds. Their product is the bandwidth-delay product (BDP).
//! - Startup doubles the window each round, like slow start, and ends on
//!   the first of: the RTT rising (a queue is building, HyStart++'s test),
//!   the rate no longer growing (BBR's test), or heavy loss. The RTT test
//!   fires about one round after the pipe fills, so startup overshoots by
//!   about a round instead of three.
//! - Drain: window = BDP until the queue built in startup is gone.
//! - Cruise: window = 1.25 x BDP plus a few milliseconds of headroom for
//!   bursty acknowledgements. One round in eight probes for more bandwidth
//!   at 1.5 x BDP; the next drains at 1 x BDP, which also lets `min_rtt`
//!   be re-measured with an empty queue.
//! - Loss below 5% of a round's packets is taken as noise (wireless, a
//!   lossy path); above it the model is cut by 15%, which lets loss-based
//!   TCP flows sharing the bottleneck keep their share.
//!
//! quinn paces at 1.25 x window / smoothed RTT, so the window is the only
//! actuator: a window near the BDP also means a pacing rate near the
//! bottleneck rate.
//!
//! This file is the model itself (its constants, state and the round-end
//! decisions above), about 600 lines that read as one state machine and
//! are kept together on purpose; `adapter` is how quinn calls it (the
//! factory, the `Controller` trait, what a connection learned) and
//! `tests` drives it over simulated paths.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

mod adapter;
pub(crate) use adapter::{delivered, learned, ModelConfig};

/// Packets in the initial window. RFC 9002 suggests ten; with pacing, 32
/// costs nothing on today's links and saves almost two rounds of startup,
/// which on a 750 ms satellite path is 1.3 s (as Google's QUIC deployment
/// did).
const INITIAL_WINDOW_PACKETS: u64 = 32;

/// The window never drops below this many packets.
const MIN_WINDOW_PACKETS: u64 = 4;

/// Rounds over which the bottleneck rate is the largest sample seen.
const BW_WINDOW_ROUNDS: u64 = 10;

/// How long a `min_rtt` measurement stands before it is re-measured.
const MIN_RTT_WINDOW: Duration = Duration::from_secs(10);

/// How long ProbeRtt holds the window at half the BDP.
const PROBE_RTT_TIME: Duration = Duration::from_millis(200);

/// Startup: the rate must grow by this factor within [`FULL_BW_ROUNDS`]
/// rounds, else the pipe is full.
const FULL_BW_GROWTH: f64 = 1.25;
const FULL_BW_ROUNDS: u32 = 3;

/// Startup's window cap as a multiple of the measured BDP (BBR's 2/ln 2):
/// enough to double every round.
const STARTUP_GAIN: f64 = 2.885;

/// Startup's RTT test: a round's smallest RTT this much above `min_rtt`
/// means a queue is building (RFC 9406 bounds: 4 to 16 ms, else 1/8 RTT).
const RTT_RISE_MIN: Duration = Duration::from_millis(4);
const RTT_RISE_MAX: Duration = Duration::from_millis(16);

/// Consecutive RTT samples above the threshold that end startup: one late
/// ack is scheduling noise, a run of them is a queue. Checked on every ack,
/// not once a round: a round's packets were sent over a whole round, so
/// waiting for its end would let startup double once more into the queue.
const RTT_SAMPLES: u32 = 8;

/// The cruise cycle, one round per phase, as multiples of the queueing
/// allowance (see [`Model::allowance`]) on top of the BDP: probe with two,
/// drain with none, cruise with one.
const CYCLE: [f64; 8] = [2.0, 0.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0];

/// The queueing allowance is a quarter of the round-trip time, but never
/// more than this: a queue is bounded in time (here a router's buffer of
/// 100 ms), not in RTTs, so on a 750 ms path a quarter RTT (190 ms) would
/// overflow it every round, while on a 100 ms path 25 ms of queue is what
/// keeps the link busy between bursts of acknowledgements.
const MAX_ALLOWANCE: Duration = Duration::from_millis(25);

/// Queueing allowed on top of the model in every state but ProbeRtt:
/// acknowledgements arrive in bursts (the receiver batches them, the OS
/// schedules it late), and on short paths a window of exactly the BDP would
/// leave the link idle between bursts.
const HEADROOM: Duration = Duration::from_millis(3);

/// Ack-eliciting packets a receiver takes before it acknowledges them
/// (QUIC's ACK frequency extension; `endpoint` asks it of every peer).
/// Every other packet is the default: over 100 ms / 500 Mbit/s a quarter
/// of the sender's CPU went to acknowledgements, and 8 cut its CPU per GiB
/// by a fifth (both sides, 14.3 to 11.4 s) at the same rate. A fixed 32
/// cut more but held a 10 Mbit/s path to a tenth of its rate: below 32
/// packets of window the receiver waits out its ack delay before each
/// acknowledgement. The window's headroom covers the packets a receiver
/// holds before it acknowledges ([`Model::model_window`]), so a slow path
/// keeps sending while they wait.
pub(crate) const ACK_EVERY: u32 = 8;

/// A round losing more than this share of its bytes is congestion, not noise.
const LOSS_THRESHOLD: f64 = 0.05;

/// ...and only if it lost at least this many packets' worth: a handful of
/// losses in a short round is noise whatever the share.
const LOSS_MIN_PACKETS: u64 = 8;

/// The cut applied to the model after a congested round.
const LOSS_BACKOFF: f64 = 0.85;

/// Send records kept for rate samples; beyond this the oldest are dropped
/// (their packets' acks then give no sample, nothing worse).
const MAX_RECORDS: usize = 1 << 16;

/// What an earlier connection learned about a path: its bottleneck rate
/// (bytes per second) and round-trip time, measured with the pipe full.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct PathMemory {
    /// Bottleneck rate, bytes per second.
    pub(crate) bw: f64,
    /// Smallest round-trip time seen.
    pub(crate) min_rtt: Duration,
}

/// A remembered path counts as the same if its RTT is within this factor.
const MEMORY_RTT_MATCH: f64 = 2.0;

#[derive(Debug, Clone, Copy, PartialEq)]
enum State {
    Startup,
    Drain,
    /// The cruise cycle; the index into [`CYCLE`] and the round it began.
    Cruise {
        phase: usize,
        since: u64,
    },
    /// Re-measuring `min_rtt`: until when, and the state to go back to.
    ProbeRtt {
        until: Option<Instant>,
    },
}

/// What was known when a batch of packets was sent, for rate samples.
#[derive(Debug, Clone, Copy)]
struct SendRecord {
    sent: Instant,
    /// Bytes delivered (acknowledged) when it was sent.
    delivered: u64,
    /// When that count last grew.
    delivered_time: Instant,
    /// Send time of the newest packet acknowledged by then.
    first_sent_time: Instant,
    /// Sent while the application had too little to send.
    app_limited: bool,
}

/// The largest value over the last few rounds (a monotone deque).
#[derive(Debug, Clone, Default)]
struct WindowedMax {
    samples: VecDeque<(u64, f64)>,
}

impl WindowedMax {
    fn update(&mut self, round: u64, value: f64, window: u64) {
        while self.samples.back().is_some_and(|&(_, v)| v <= value) {
            self.samples.pop_back();
        }
        self.samples.push_back((round, value));
        self.expire(round, window);
    }

    fn expire(&mut self, round: u64, window: u64) {
        while self.samples.len() > 1
            && self
                .samples
                .front()
                .is_some_and(|&(r, _)| r + window <= round)
        {
            self.samples.pop_front();
        }
    }

    fn get(&self) -> f64 {
        self.samples.front().map_or(0.0, |&(_, v)| v)
    }

    fn scale(&mut self, factor: f64) {
        for s in &mut self.samples {
            s.1 *= factor;
        }
    }
}

/// The rate sample being assembled from one batch of acknowledgements.
#[derive(Debug, Clone, Copy)]
struct Sample {
    prior_delivered: u64,
    prior_time: Instant,
    send_elapsed: Duration,
    app_limited: bool,
}

/// qxfer's model-based congestion controller (see the module docs).
#[derive(Debug, Clone)]
pub(crate) struct Model {
    mtu: u64,
    state: State,
    window: u64,

    /// Bytes acknowledged so far, and when that last changed.
    delivered: u64,
    delivered_time: Instant,
    /// Send time of the most recently sent packet acknowledged so far.
    first_sent_time: Instant,
    records: VecDeque<SendRecord>,
    /// Packets sent before `delivered` reaches this were app-limited.
    app_limited_until: u64,
    in_flight: u64,

    /// This batch of acknowledgements: bytes, newest packet's record, RTTs.
    batch_acked: u64,
    sample: Option<Sample>,

    bw: WindowedMax,
    min_rtt: Option<Duration>,
    min_rtt_stamp: Instant,

    round: u64,
    next_round_delivered: u64,
    round_lost: u64,
    round_delivered_start: u64,
    round_min_rtt: Option<Duration>,
    round_app_limited: bool,
    /// Consecutive RTT samples above `min_rtt` by the startup threshold.
    rtt_risen: u32,

    full_bw: f64,
    full_bw_rounds: u32,
    /// When startup ended (losses of packets sent before are its overshoot).
    startup_end: Option<Instant>,
    /// A remembered path to resume from, until used or found different.
    memory: Option<PathMemory>,
    /// The memory startup jumped on, until confirmed or startup ends.
    resuming: Option<PathMemory>,
    /// The bottleneck rate once startup found the pipe full (0 before).
    full_bw_seen: f64,
    /// The rate when the current probe began.
    probe_bw: f64,
    /// Of the bytes delivered, those sent while the application left the
    /// window unused (it had nothing more to send): for `--stats`.
    delivered_app_limited: u64,
}

impl Model {
    fn new(now: Instant, mtu: u16) -> Self {
        let mtu = u64::from(mtu);
        Self {
            mtu,
            state: State::Startup,
            window: INITIAL_WINDOW_PACKETS * mtu,
            delivered: 0,
            delivered_time: now,
            first_sent_time: now,
            records: VecDeque::new(),
            app_limited_until: 0,
            in_flight: 0,
            batch_acked: 0,
            sample: None,
            bw: WindowedMax::default(),
            min_rtt: None,
            min_rtt_stamp: now,
            round: 0,
            next_round_delivered: 0,
            round_lost: 0,
            round_delivered_start: 0,
            round_min_rtt: None,
            round_app_limited: false,
            rtt_risen: 0,
            full_bw: 0.0,
            full_bw_rounds: 0,
            startup_end: None,
            memory: None,
            resuming: None,
            full_bw_seen: 0.0,
            probe_bw: 0.0,
            delivered_app_limited: 0,
        }
    }

    fn min_window(&self) -> u64 {
        MIN_WINDOW_PACKETS * self.mtu
    }

    /// Bottleneck rate in bytes per second (0 until measured).
    fn bandwidth(&self) -> f64 {
        self.bw.get()
    }

    /// The window for `gain` x BDP plus `allowances` queueing allowances
    /// and the headroom, once the model has data.
    fn model_window(&self, gain: f64, allowances: f64, headroom: bool) -> Option<u64> {
        let rtt = self.min_rtt?;
        let bw = self.bandwidth();
        if bw <= 0.0 {
            return None;
        }
        let mut secs = gain * rtt.as_secs_f64() + allowances * self.allowance(rtt).as_secs_f64();
        // The packets the receiver holds before it acknowledges them.
        let mut held = 0;
        if headroom {
            secs += HEADROOM.as_secs_f64();
            held = u64::from(ACK_EVERY + 1) * self.mtu;
        }
        Some(((bw * secs) as u64 + held).max(self.min_window()))
    }

    /// Queueing the cruise window allows beyond the BDP (see [`MAX_ALLOWANCE`]).
    fn allowance(&self, min_rtt: Duration) -> Duration {
        (min_rtt / 4).min(MAX_ALLOWANCE)
    }

    /// Takes one RTT sample (`rtt`, raw: it includes the peer's ack delay)
    /// and the smoothed RTT (`smoothed`, quinn's, corrected for ack delay).
    ///
    /// The minimum comes from raw samples: the smallest is an ack sent at
    /// once. The startup test uses the smoothed RTT: a receiver that gets
    /// little data delays its acks by up to 25 ms, which raw samples would
    /// take for a queue (seen with many small files: startup ended at a few
    /// Mbit/s on a 100 Mbit/s path).
    fn record_rtt(&mut self, now: Instant, rtt: Duration, smoothed: Duration) {
        self.round_min_rtt = Some(self.round_min_rtt.map_or(rtt, |m| m.min(rtt)));
        if let Some(min) = self.min_rtt {
            let rise = (min / 8).clamp(RTT_RISE_MIN, RTT_RISE_MAX);
            if smoothed >= min + rise {
                self.rtt_risen += 1;
            } else {
                self.rtt_risen = 0;
            }
        }
        let expired = now.saturating_duration_since(self.min_rtt_stamp) > MIN_RTT_WINDOW;
        if self.min_rtt.is_none_or(|m| rtt <= m) || (expired && self.state_allows_rtt_reset()) {
            self.min_rtt = Some(rtt);
            self.min_rtt_stamp = now;
        }
    }

    /// An expired `min_rtt` is replaced by a fresh sample only in ProbeRtt,
    /// whose short window has emptied the queue (else a standing queue
    /// would be mistaken for path delay).
    fn state_allows_rtt_reset(&self) -> bool {
        matches!(self.state, State::ProbeRtt { .. })
    }

    /// Ends a round: returns whether one ended.
    fn advance_round(&mut self, sample: &Sample) -> bool {
        if sample.prior_delivered < self.next_round_delivered {
            return false;
        }
        self.round += 1;
        self.next_round_delivered = self.delivered;
        true
    }

    /// Startup's loss and rate tests, run once per round (the RTT test runs
    /// on every ack, in `on_end_acks`).
    fn pipe_full(&mut self) -> bool {
        if self.round_app_limited {
            return false;
        }
        let bw = self.bandwidth();
        if bw >= self.full_bw * FULL_BW_GROWTH {
            self.full_bw = bw;
            self.full_bw_rounds = 0;
            return false;
        }
        self.full_bw_rounds += 1;
        self.full_bw_rounds >= FULL_BW_ROUNDS
    }

    fn on_round_end(&mut self, now: Instant) {
        let delivered = self.delivered - self.round_delivered_start;
        tracing::trace!(
            round = self.round,
            state = ?self.state,
            bw_mbit = self.bandwidth() * 8e-6,
            min_rtt = ?self.min_rtt,
            round_min_rtt = ?self.round_min_rtt,
            window = self.window,
            in_flight = self.in_flight,
            delivered,
            lost = self.round_lost,
            app_limited = self.round_app_limited,
            "round"
        );
        let lossy = self.round_lost >= LOSS_MIN_PACKETS * self.mtu
            && self.round_lost as f64 > LOSS_THRESHOLD * (delivered + self.round_lost) as f64;
        match self.state {
            State::Startup => {
                if lossy {
                    self.end_startup(now, "loss");
                } else if self.pipe_full() {
                    self.end_startup(now, "rate stopped growing");
                } else if self.resume_confirmed() {
                    self.end_startup(now, "remembered path confirmed");
                }
            }
            State::Drain => {}
            State::Cruise { phase, since } => {
                if lossy {
                    // Congestion: shrink the model and drain before cruising on.
                    self.bw.scale(LOSS_BACKOFF);
                    self.state = State::Cruise {
                        phase: 1,
                        since: self.round,
                    };
                } else if self.round > since {
                    // A probe whose rate grew by a quarter (measured in the
                    // round after it, as samples lag a round) is repeated at
                    // once: the link had room, perhaps a startup ended early
                    // on a noisy RTT or a competing flow left, and waiting
                    // eight rounds per step would take seconds to fill it.
                    let grew = self.bandwidth() >= self.probe_bw * FULL_BW_GROWTH;
                    let next = match phase {
                        1 if grew => 0,
                        p => (p + 1) % CYCLE.len(),
                    };
                    if next == 0 {
                        self.probe_bw = self.bandwidth();
                    }
                    self.state = State::Cruise {
                        phase: next,
                        since: self.round,
                    };
                }
            }
            State::ProbeRtt { until } => {
                if until.is_some_and(|t| now >= t) {
                    self.min_rtt_stamp = now;
                    self.enter_cruise();
                }
            }
        }
        self.round_lost = 0;
        self.round_delivered_start = self.delivered;
        self.round_min_rtt = None;
        self.round_app_limited = false;
    }

    /// The pipe is full: drain the queue startup built, then cruise. The
    /// rate measured while it filled is the bottleneck's, losses or not.
    fn end_startup(&mut self, now: Instant, why: &str) {
        tracing::trace!(
            why,
            bw_mbit = self.bandwidth() * 8e-6,
            window = self.window,
            "startup ends"
        );
        self.state = State::Drain;
        self.startup_end = Some(now);
        self.memory = None;
        self.resuming = None;
    }

    /// Careful resume (see [`ModelConfig`]): jump once the path is confirmed.
    fn resume_from_memory(&mut self) {
        let (Some(memory), Some(rtt)) = (self.memory, self.min_rtt) else {
            return;
        };
        self.memory = None;
        let (then, now) = (memory.min_rtt.as_secs_f64(), rtt.as_secs_f64());
        if now > then * MEMORY_RTT_MATCH || now * MEMORY_RTT_MATCH < then {
            return; // another path: start afresh
        }
        let bdp = (memory.bw * then) as u64;
        if bdp / 2 <= self.window {
            return; // a path no wider than startup's own window: nothing to skip
        }
        self.window = bdp / 2;
        self.resuming = Some(memory);
    }

    /// A resumed startup whose window reached the remembered BDP without
    /// loss has confirmed the memory: take its rate as a sample (real ones
    /// lag a round behind) and stop growing, instead of doubling once more
    /// into the queue as a fresh startup must.
    fn resume_confirmed(&mut self) -> bool {
        let Some(memory) = self.resuming else {
            return false;
        };
        let bdp = (memory.bw * memory.min_rtt.as_secs_f64()) as u64;
        if self.window < bdp {
            return false;
        }
        self.bw.update(self.round, memory.bw, BW_WINDOW_ROUNDS);
        true
    }

    fn enter_cruise(&mut self) {
        // Start on a cruise phase: the probe comes after a few quiet rounds.
        self.state = State::Cruise {
            phase: 2,
            since: self.round,
        };
    }

    fn update_window(&mut self, now: Instant, app_limited: bool) {
        let min = self.min_window();
        match self.state {
            State::Startup => {
                // Slow start; while the application leaves the window
                // unused, growth stops at the model's cap (a connection
                // moving small files must not build a huge unproven window).
                let mut grown = self.window + self.batch_acked;
                if let Some(m) = self.resuming {
                    // Resuming: no further than the remembered pipe.
                    grown = grown.min(((m.bw * m.min_rtt.as_secs_f64()) as u64).max(self.window));
                }
                self.window = match self.model_window(STARTUP_GAIN, 0.0, true) {
                    Some(cap) if app_limited => grown.min(cap.max(self.window)),
                    _ => grown,
                };
            }
            State::Drain => {
                if let Some(bdp) = self.model_window(1.0, 0.0, true) {
                    self.window = bdp;
                    if self.in_flight <= bdp {
                        self.enter_cruise();
                    }
                }
            }
            State::Cruise { phase, .. } => {
                if let Some(w) = self.model_window(1.0, CYCLE[phase], true) {
                    self.window = w;
                }
                let stale = now.saturating_duration_since(self.min_rtt_stamp) > MIN_RTT_WINDOW;
                if stale {
                    self.state = State::ProbeRtt { until: None };
                }
            }
            State::ProbeRtt { until } => {
                if let Some(w) = self.model_window(0.5, 0.0, false) {
                    self.window = w;
                }
                if until.is_none() && self.in_flight <= self.window {
                    self.state = State::ProbeRtt {
                        until: Some(now + PROBE_RTT_TIME),
                    };
                }
            }
        }
        self.window = self.window.max(min);
    }

    /// One packet (or GSO batch) acknowledged: counts it, takes its RTT,
    /// and finds the newest send record of this batch for the rate sample.
    fn acked(
        &mut self,
        now: Instant,
        sent: Instant,
        bytes: u64,
        app_limited: bool,
        smoothed_rtt: Duration,
    ) {
        self.delivered += bytes;
        if app_limited {
            self.delivered_app_limited += bytes;
        }
        self.delivered_time = now;
        self.batch_acked += bytes;
        self.round_app_limited |= app_limited;
        self.record_rtt(now, now.saturating_duration_since(sent), smoothed_rtt);
        let Some(rec) = self.find_record(sent) else {
            return;
        };
        if self
            .sample
            .is_none_or(|s| rec.delivered >= s.prior_delivered)
        {
            self.sample = Some(Sample {
                prior_delivered: rec.delivered,
                prior_time: rec.delivered_time,
                send_elapsed: rec.sent.saturating_duration_since(rec.first_sent_time),
                app_limited: rec.app_limited,
            });
            self.first_sent_time = rec.sent;
        }
    }

    /// The end of a batch of acknowledgements: the rate sample, round
    /// accounting, state changes and the new window.
    fn end_acks(&mut self, now: Instant, in_flight: u64, app_limited: bool) {
        self.in_flight = in_flight;
        if app_limited {
            self.app_limited_until = self.delivered + in_flight.max(1);
        }
        if let Some(sample) = self.sample.take() {
            // Records of packets sent before this one are acked or lost.
            let newest = self.first_sent_time;
            while self.records.front().is_some_and(|r| r.sent < newest) {
                self.records.pop_front();
            }
            let ack_elapsed = now.saturating_duration_since(sample.prior_time);
            let interval = ack_elapsed.max(sample.send_elapsed);
            let delivered = self.delivered - sample.prior_delivered;
            let round_ended = self.advance_round(&sample);
            // Intervals shorter than the path's RTT overstate the rate (acks
            // compressed in time); BBR discards them too.
            if !interval.is_zero() && self.min_rtt.is_some_and(|m| interval >= m) {
                let rate = delivered as f64 / interval.as_secs_f64();
                if !sample.app_limited || rate >= self.bandwidth() {
                    self.bw.update(self.round, rate, BW_WINDOW_ROUNDS);
                }
                // What the next connection may resume from: rates measured
                // with the pipe full, never while the application idled.
                if !sample.app_limited && self.startup_end.is_some() {
                    self.full_bw_seen = self.full_bw_seen.max(rate.min(self.bandwidth()));
                }
            }
            self.bw.expire(self.round, BW_WINDOW_ROUNDS);
            if round_ended {
                self.on_round_end(now);
            }
        }
        if self.state == State::Startup {
            if self.rtt_risen >= RTT_SAMPLES {
                self.end_startup(now, "RTT rose");
            } else if self.memory.is_some() {
                self.resume_from_memory();
            }
        }
        self.update_window(now, app_limited);
        self.batch_acked = 0;
    }

    fn find_record(&self, sent: Instant) -> Option<SendRecord> {
        let i = self.records.partition_point(|r| r.sent < sent);
        self.records.get(i).filter(|r| r.sent == sent).copied()
    }
}

#[cfg(test)]
mod tests;

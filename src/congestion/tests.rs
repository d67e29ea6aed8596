//! The controller driven through a deterministic packet-level model of
//! one path, in virtual time: no sockets, no clocks, same result every
//! run. The path is what linkem emulates (random loss, then a drop-tail
//! queue in front of a fixed-rate link, then a fixed delay); the sender
//! paces as quinn does (1.25 windows per smoothed RTT, in bursts of
//! 2 ms) and declares a packet lost once one sent three later is acked.

use quinn::congestion::Controller;

use super::*;
use std::collections::BTreeMap;

const PACKET: u64 = 1400;

#[derive(Clone, Copy)]
struct Path {
    /// Bottleneck rate, bits per second.
    rate_bps: f64,
    rtt: Duration,
    /// Drop-tail queue depth, as time at the bottleneck rate.
    queue: Duration,
    /// Random loss of data packets, as a fraction.
    loss: f64,
}

impl Path {
    fn new(rate_mbit: f64, rtt_ms: u64, loss_percent: f64) -> Self {
        Self {
            rate_bps: rate_mbit * 1e6,
            rtt: Duration::from_millis(rtt_ms),
            queue: Duration::from_millis(100),
            loss: loss_percent / 100.0,
        }
    }

    fn bytes_per_sec(&self) -> f64 {
        self.rate_bps / 8.0
    }
}

struct Outcome {
    seconds: f64,
    sent: u64,
    queue_drops: u64,
    /// Queue drops of packets sent after `late` seconds.
    late_queue_drops: u64,
    late_sent: u64,
    learned: Option<PathMemory>,
    max_window: u64,
}

impl Outcome {
    /// Share of the link the transfer used, start to last ack.
    fn utilization(&self, path: &Path, bytes: u64) -> f64 {
        bytes as f64 / self.seconds / path.bytes_per_sec()
    }

    fn drop_share(&self) -> f64 {
        self.queue_drops as f64 / self.sent as f64
    }
}

/// xorshift64*: deterministic loss.
struct Rng(u64);

impl Rng {
    fn unit(&mut self) -> f64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        (self.0.wrapping_mul(0x2545_f491_4f6c_dd1d) >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// Sends `bytes` over `path` (the application supplying at most
/// `app_rate` bytes per second, if given), returning what happened.
fn transfer(
    path: Path,
    bytes: u64,
    memory: Option<PathMemory>,
    app_rate: Option<f64>,
    late: f64,
) -> Outcome {
    let t0 = Instant::now();
    let mut cc = Model::new(t0, PACKET as u16);
    cc.memory = memory;
    let rate = path.bytes_per_sec();
    let one_way = path.rtt / 2;
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let mut t = Duration::ZERO;
    let mut to_send = bytes; // new data and retransmissions
    let mut delivered = 0u64;
    let mut in_flight: BTreeMap<u64, (Duration, u64)> = BTreeMap::new();
    let mut in_flight_bytes = 0u64;
    let mut acks: VecDeque<(Duration, u64)> = VecDeque::new();
    let mut busy_until = Duration::ZERO;
    let mut next_pn = 0u64;
    let mut srtt: Option<Duration> = None;
    let mut tokens = 0f64;
    let mut last_refill = Duration::ZERO;
    let mut out = Outcome {
        seconds: 0.0,
        sent: 0,
        queue_drops: 0,
        late_queue_drops: 0,
        late_sent: 0,
        learned: None,
        max_window: 0,
    };
    while delivered < bytes {
        assert!(t < Duration::from_secs(600), "transfer stalled");
        // The application's supply so far.
        let supplied = app_rate.map_or(bytes, |r| ((t.as_secs_f64() * r) as u64).min(bytes));
        let sendable = to_send.min(supplied.saturating_sub(bytes - to_send));
        // Pacing, as quinn: 1.25 windows per smoothed RTT, bursts of 2 ms.
        let window = cc.window();
        out.max_window = out.max_window.max(window);
        let rtt_est = srtt.unwrap_or(Duration::from_millis(333));
        let fill = 1.25 * window as f64 / rtt_est.as_secs_f64();
        let capacity = (window as f64 * 0.002 / rtt_est.as_secs_f64())
            .clamp(10.0 * PACKET as f64, 256.0 * PACKET as f64);
        tokens = (tokens + fill * (t - last_refill).as_secs_f64()).min(capacity);
        last_refill = t;
        while sendable > 0
            && in_flight_bytes + PACKET <= cc.window()
            && tokens >= PACKET as f64
            && to_send > 0
        {
            let size = PACKET.min(to_send);
            to_send -= size;
            tokens -= size as f64;
            let pn = next_pn;
            next_pn += 1;
            cc.on_sent(t0 + t, size, pn);
            out.sent += 1;
            let late_packet = t.as_secs_f64() >= late;
            out.late_sent += u64::from(late_packet);
            in_flight.insert(pn, (t, size));
            in_flight_bytes += size;
            if rng.unit() < path.loss {
                continue; // lost at random before the queue, as linkem
            }
            let start = busy_until.max(t);
            if start - t > path.queue {
                out.queue_drops += 1;
                out.late_queue_drops += u64::from(late_packet);
                continue;
            }
            busy_until = start + Duration::from_secs_f64(size as f64 / rate);
            acks.push_back((busy_until + one_way + one_way, pn));
            if sendable <= PACKET {
                break;
            }
        }
        // Next event: an ack, a pacing token, more application data, or a loss timeout.
        let next_ack = acks.front().map(|&(at, _)| at);
        let app_blocked = in_flight_bytes + PACKET > cc.window();
        let mut next = next_ack.unwrap_or(Duration::MAX);
        if !app_blocked && to_send > 0 {
            let need = (PACKET as f64 - tokens).max(0.0) / fill;
            next = next.min(t + Duration::from_secs_f64(need.max(1e-6)));
        }
        if next_ack.is_none() && !in_flight.is_empty() {
            // Tail loss: nothing will be acked; time out after 1.5 RTT.
            let oldest = in_flight.values().map(|&(s, _)| s).min().unwrap();
            let pto = oldest + rtt_est * 3 / 2;
            if pto <= t || next == Duration::MAX {
                t = t.max(pto);
                let lost: u64 = in_flight.values().map(|&(_, s)| s).sum();
                let (&last, _) = in_flight.iter().next_back().unwrap();
                let sent_at = in_flight[&last].0;
                in_flight.clear();
                in_flight_bytes = 0;
                to_send += lost;
                cc.on_congestion_event(t0 + t, t0 + sent_at, false, lost);
                continue;
            }
            next = next.min(pto);
        }
        if next == Duration::MAX {
            // Waiting for the application only.
            next = t + Duration::from_millis(1);
        }
        t = next.max(t);
        // Every ack due now, as one batch.
        let mut largest = None;
        let app_limited = supplied < bytes && to_send == 0;
        while acks.front().is_some_and(|&(at, _)| at <= t) {
            let (_, pn) = acks.pop_front().unwrap();
            let Some((sent_at, size)) = in_flight.remove(&pn) else {
                continue;
            };
            in_flight_bytes -= size;
            delivered += size;
            let sample = t - sent_at;
            srtt = Some(srtt.map_or(sample, |s| (s * 7 + sample) / 8));
            largest = Some(pn);
            // The inherent method, as RttEstimator cannot be built
            // outside quinn (the controller does not use it).
            cc.acked(t0 + t, t0 + sent_at, size, app_limited, srtt.unwrap());
        }
        if let Some(largest) = largest {
            // Packet threshold: lost once three later ones are acked.
            let lost: Vec<u64> = in_flight
                .range(..largest.saturating_sub(2))
                .map(|(&pn, _)| pn)
                .collect();
            if let Some(&last) = lost.last() {
                let sent_at = in_flight[&last].0;
                let mut bytes_lost = 0;
                for pn in lost {
                    let (_, size) = in_flight.remove(&pn).unwrap();
                    in_flight_bytes -= size;
                    bytes_lost += size;
                }
                to_send += bytes_lost;
                cc.on_congestion_event(t0 + t, t0 + sent_at, false, bytes_lost);
            }
            cc.on_end_acks(t0 + t, in_flight_bytes, app_limited, Some(largest));
            out.learned = learned_from(&cc);
        }
    }
    out.seconds = t.as_secs_f64();
    eprintln!(
        "{:.0} Mbit/s, {:?}, {:.1}% loss: {:.2} s, {} sent, {} queue drops ({} late of {})",
        path.rate_bps / 1e6,
        path.rtt,
        path.loss * 100.0,
        out.seconds,
        out.sent,
        out.queue_drops,
        out.late_queue_drops,
        out.late_sent
    );
    out
}

fn learned_from(m: &Model) -> Option<PathMemory> {
    (m.full_bw_seen > 0.0).then_some(PathMemory {
        bw: m.full_bw_seen,
        min_rtt: m.min_rtt?,
    })
}

const MIB: u64 = 1 << 20;

#[test]
fn fills_a_long_fat_path_without_overflowing_its_queue() {
    let path = Path::new(100.0, 100, 0.0);
    let out = transfer(path, 40 * MIB, None, None, 0.0);
    let used = out.utilization(&path, 40 * MIB);
    assert!(used > 0.8, "used {used:.2} of the link");
    assert!(
        out.drop_share() < 0.05,
        "{} queue drops of {}",
        out.queue_drops,
        out.sent
    );
    // It measured the path it filled.
    let learned = out.learned.expect("the pipe was filled");
    assert!(
        (learned.bw / path.bytes_per_sec() - 1.0).abs() < 0.1,
        "{learned:?}"
    );
    assert!(learned.min_rtt >= path.rtt && learned.min_rtt < path.rtt + Duration::from_millis(5));
}

#[test]
fn random_loss_is_not_taken_for_congestion() {
    for loss in [0.5, 2.0] {
        let path = Path::new(100.0, 100, loss);
        let out = transfer(path, 40 * MIB, None, None, 0.0);
        let used = out.utilization(&path, 40 * MIB);
        // Loss-based controllers fall below 10% of such a link.
        assert!(used > 0.75, "{loss}% loss: used {used:.2} of the link");
        assert!(
            out.drop_share() < 0.05,
            "{loss}% loss: {} queue drops",
            out.queue_drops
        );
    }
}

#[test]
fn cruising_fits_a_queue_much_shorter_than_the_path() {
    // A satellite-like path: 750 ms of delay, 100 ms of buffer.
    let path = Path::new(50.0, 750, 0.0);
    let out = transfer(path, 60 * MIB, None, None, 8.0);
    assert!(out.late_sent > 10_000);
    assert!(
        (out.late_queue_drops as f64) < 0.01 * out.late_sent as f64,
        "{} of {} packets dropped after startup",
        out.late_queue_drops,
        out.late_sent
    );
}

#[test]
fn a_remembered_path_skips_most_of_startup() {
    let path = Path::new(100.0, 100, 0.0);
    let cold = transfer(path, 40 * MIB, None, None, 0.0);
    let memory = cold.learned.expect("learned");
    let warm = transfer(path, 40 * MIB, Some(memory), None, 0.0);
    // Startup needs about log2(BDP / initial window) = 5 rounds to fill
    // this pipe; resuming needs two.
    assert!(
        warm.seconds < cold.seconds - 2.5 * path.rtt.as_secs_f64(),
        "warm {:.2} s, cold {:.2} s",
        warm.seconds,
        cold.seconds
    );
    assert!(
        warm.queue_drops <= cold.queue_drops,
        "{} > {}",
        warm.queue_drops,
        cold.queue_drops
    );
    // Memory of another path (a quarter of the RTT) is not used.
    let elsewhere = PathMemory {
        min_rtt: memory.min_rtt / 4,
        ..memory
    };
    let other = transfer(path, 40 * MIB, Some(elsewhere), None, 0.0);
    assert!(
        (other.seconds - cold.seconds).abs() < 0.05,
        "{} vs {}",
        other.seconds,
        cold.seconds
    );
}

#[test]
fn a_window_left_unused_stops_growing() {
    // The application supplies 1 Mbit/s on a 100 Mbit/s path.
    let path = Path::new(100.0, 100, 0.0);
    let out = transfer(path, MIB / 2, None, Some(125_000.0), 0.0);
    assert!(
        out.max_window < 512 * 1024,
        "window grew to {}",
        out.max_window
    );
}

#[test]
fn persistent_congestion_resets_the_window() {
    let t0 = Instant::now();
    let mut m = Model::new(t0, 1200);
    m.window = 10 * 1024 * 1024;
    m.on_congestion_event(t0, t0, true, 1200);
    assert_eq!(m.window(), m.min_window());
    assert_eq!(m.state, State::Startup);
}

//! Why a batch went as fast as it did (`--stats`): the path's round trip, loss and rate, and what held the transfer back, read from the connection and this process while the files moved.
//!
//! A [`PathWatch`] is taken when a batch starts and read when it ends. What
//! it reports comes from quinn's connection statistics (round-trip time,
//! packets sent and lost, bytes on the wire, and the flow-control
//! `DATA_BLOCKED` frames a sender sends when the receiver's window stops
//! it), from qxfer's own congestion controller (the bottleneck rate it
//! measured, when this side sent the data), from this process's CPU time,
//! from the machine's (`/proc/stat`, which on one host covers a server on
//! loopback too) and from the time during which the disk threads had file
//! reads or writes to do (with the hashing that runs beside them).
//!
//! The verdict takes the first of these that holds, in this order, because
//! each one hides the ones after it:
//! 1. **CPU**: this process kept one core busy (a connection's packets are
//!    handled by one task, so one core is its ceiling), or the machine's
//!    cores were at least 90% busy;
//! 2. **disk**: the disk threads were busy 80% of the time or more;
//! 3. on an upload, whose rate this side's controller sets: **link** if the
//!    rate reached 70% of the bottleneck the controller measured; else, if
//!    the receiver's window stopped the sender in at least half of the
//!    round trips, **flow control** when the path holds more than half of
//!    the largest connection window, **receiver** (the server's disk or
//!    CPU) otherwise; else **round trips** if the controller never filled
//!    the path or the transfer lasted under 30 round trips (a short one
//!    spends much of them ramping up), or if this side had nothing more to send
//!    while half the data or more went out (many small files, each waiting
//!    on its own exchange); **congestion** otherwise (the controller held
//!    the rate below the path's, after losses);
//! 4. on a download the server's controller sets the rate and this side
//!    cannot see it: **flow control** or **receiver** (this side, when its
//!    disk threads or its CPU were half busy) as above, else **link** (the
//!    link or the server's sending).
//!
//! A sender that meets the window's edge now and then says nothing: quinn
//! sends a `DATA_BLOCKED` frame whenever it reaches the limit before the
//! receiver's next window update arrives, which over 30 ms / 200 Mbit/s
//! happened in most round trips of a transfer at 95% of the link.

use std::time::{Duration, Instant};

use crate::endpoint;

use super::Direction;

/// What limited a transfer, as `--stats` and `--json` name it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Limit {
    /// The path's rate.
    Link,
    /// The CPU of this side (or of the machine both sides share).
    Cpu,
    /// Reading or writing files.
    Disk,
    /// The receiver's window is smaller than the path holds.
    FlowControl,
    /// The receiving side took the data more slowly than the path brought it.
    Receiver,
    /// The congestion controller held the rate below the path's.
    Congestion,
    /// Too little data per round trip to fill the path.
    RoundTrips,
}

/// The path and what limited a batch (see the module's text).
#[derive(Debug, Clone, serde::Serialize)]
pub struct PathReport {
    /// The batch's time, seconds.
    pub seconds: f64,
    /// Smoothed round-trip time at the end, milliseconds.
    pub rtt_ms: f64,
    /// Share of this side's packets declared lost (on a put, the data's;
    /// on a get only acknowledgements go this way, so `None`).
    pub loss: Option<f64>,
    /// Bytes on the wire in the data's direction over the batch's time, in
    /// Mbit/s (compressed data counts as sent).
    pub rate_mbit: f64,
    /// The bottleneck rate qxfer's controller measured, in Mbit/s, when this
    /// side sent the data and filled the path at least once.
    pub bottleneck_mbit: Option<f64>,
    /// CPU this process used over the batch's time, in cores.
    pub cpu_cores: f64,
    /// Share of the machine's CPU time that was busy (all processes), where
    /// the OS tells.
    pub machine_busy: Option<f64>,
    /// Share of the batch's time during which the disk threads had work
    /// (reading, writing and syncing files, and the hashing beside it).
    pub disk_busy: f64,
    /// Times the sender was stopped by the receiver's flow-control window.
    pub window_blocked: u64,
    /// On an upload: the share of the data sent while this side had nothing
    /// more to send, the window left unused (per-file work, round trips).
    pub sender_idle: Option<f64>,
    /// UDP datagrams per system call this side sent and received: above 1
    /// where segmentation offload (GSO) and receive coalescing (GRO) work.
    pub datagrams_per_send: f64,
    /// The same for receiving (GRO).
    pub datagrams_per_receive: f64,
    /// What limited the batch.
    pub limit: Limit,
    /// That, in words.
    pub why: String,
}

/// The connection's and the process's counters when a batch started.
pub(crate) struct PathWatch {
    conn: quinn::Connection,
    direction: Direction,
    started: Instant,
    stats: quinn::ConnectionStats,
    cpu: Duration,
    machine: Option<(u64, u64)>,
    disk: Duration,
    delivered: Option<(u64, u64)>,
}

/// A transfer of fewer round trips spends much of its time ramping up (a
/// fresh start takes about 7 to fill 500 Mbit/s over 100 ms).
const SHORT_ROUNDS: f64 = 30.0;

/// The largest connection receive window (the connection's tuner grows it to
/// this); a path holding more than half of it in flight outgrows it.
const MOST_WINDOW: f64 = endpoint::CONNECTION_RECEIVE_WINDOW as f64;

impl PathWatch {
    pub(crate) fn start(conn: &quinn::Connection, direction: Direction) -> Self {
        Self {
            conn: conn.clone(),
            direction,
            started: Instant::now(),
            stats: conn.stats(),
            cpu: process_cpu(),
            machine: machine_cpu(),
            disk: crate::files::disk_busy(),
            delivered: endpoint::delivered(conn),
        }
    }

    pub(crate) fn finish(self) -> PathReport {
        let wall = self.started.elapsed().as_secs_f64().max(1e-6);
        let now = self.conn.stats();
        let put = matches!(self.direction, Direction::Put);
        let bytes = if put {
            now.udp_tx.bytes - self.stats.udp_tx.bytes
        } else {
            now.udp_rx.bytes - self.stats.udp_rx.bytes
        };
        let sent = now.path.sent_packets - self.stats.path.sent_packets;
        let lost = now.path.lost_packets - self.stats.path.lost_packets;
        // The sender says when the receiver's window stopped it.
        let blocked = |f: &quinn::FrameStats| f.data_blocked + f.stream_data_blocked;
        let window_blocked = if put {
            blocked(&now.frame_tx) - blocked(&self.stats.frame_tx)
        } else {
            blocked(&now.frame_rx) - blocked(&self.stats.frame_rx)
        };
        let machine_busy = match (self.machine, machine_cpu()) {
            (Some((b0, t0)), Some((b1, t1))) if t1 > t0 => {
                Some((b1 - b0) as f64 / (t1 - t0) as f64)
            }
            _ => None,
        };
        let learned = put.then(|| endpoint::learned(&self.conn)).flatten();
        let sender_idle = match (self.delivered, endpoint::delivered(&self.conn)) {
            (Some((d0, i0)), Some((d1, i1))) if put && d1 > d0 => {
                Some((i1 - i0) as f64 / (d1 - d0) as f64)
            }
            _ => None,
        };
        let rtt = now.path.rtt;
        let mut report = PathReport {
            seconds: wall,
            rtt_ms: rtt.as_secs_f64() * 1e3,
            loss: (put && sent > 0).then(|| lost as f64 / sent as f64),
            rate_mbit: bytes as f64 * 8.0 / wall / 1e6,
            bottleneck_mbit: learned.map(|m| m.bw * 8.0 / 1e6),
            cpu_cores: (process_cpu() - self.cpu).as_secs_f64() / wall,
            machine_busy,
            disk_busy: (crate::files::disk_busy() - self.disk).as_secs_f64() / wall,
            window_blocked,
            sender_idle,
            datagrams_per_send: per_call(&now.udp_tx, &self.stats.udp_tx),
            datagrams_per_receive: per_call(&now.udp_rx, &self.stats.udp_rx),
            limit: Limit::Link,
            why: String::new(),
        };
        (report.limit, report.why) = verdict(&report, put);
        report
    }
}

/// What limited a batch, and why, from its figures (see the module's text).
fn verdict(r: &PathReport, put: bool) -> (Limit, String) {
    if r.cpu_cores >= 0.9 || r.machine_busy.is_some_and(|m| m >= 0.9) {
        let machine = r.machine_busy.map_or_else(String::new, |m| {
            format!(", the machine {:.0}% busy", m * 100.0)
        });
        return (
            Limit::Cpu,
            format!("CPU: this side used {:.2} cores{machine}", r.cpu_cores),
        );
    }
    if r.disk_busy >= 0.8 {
        return (
            Limit::Disk,
            format!(
                "the disk: reading and writing files (with their hashing) took {:.0}% of the time",
                r.disk_busy * 100.0
            ),
        );
    }
    if let Some(b) = r.bottleneck_mbit.filter(|b| put && r.rate_mbit >= 0.7 * b) {
        return (
            Limit::Link,
            format!(
                "the link: {:.0} of the ~{b:.0} Mbit/s the path carries",
                r.rate_mbit
            ),
        );
    }
    let rtt = r.rtt_ms / 1e3;
    let rounds = if rtt > 0.0 { r.seconds / rtt } else { 0.0 };
    let stopped = r.window_blocked > 0 && r.window_blocked as f64 >= rounds / 2.0;
    let in_flight = r.rate_mbit * 1e6 / 8.0 * rtt;
    if stopped && in_flight > MOST_WINDOW / 2.0 {
        return (
            Limit::FlowControl,
            format!(
                "flow control: the path holds {:.0} MiB in flight, more than the receive window allows",
                in_flight / f64::from(1u32 << 20)
            ),
        );
    }
    let busy_here = r.disk_busy >= 0.5 || r.cpu_cores >= 0.5;
    if stopped && (put || busy_here) {
        let who = if put { "the server" } else { "this side" };
        return (
            Limit::Receiver,
            format!(
                "the receiver: {who} took the data more slowly than the path brought it (its disk or CPU); the sender waited for its window {} time(s)",
                r.window_blocked
            ),
        );
    }
    if !put {
        return (
            Limit::Link,
            "the link, or the server's sending (on a download the server's congestion controller sets the rate)".to_owned(),
        );
    }
    let idle = r.sender_idle.unwrap_or(0.0);
    match r.bottleneck_mbit {
        None => (
            Limit::RoundTrips,
            "round trips: the transfer never filled the path (too short, or many small files whose exchanges each cost a round trip)".to_owned(),
        ),
        Some(_) if rounds < SHORT_ROUNDS => (
            Limit::RoundTrips,
            format!(
                "round trips: the transfer lasted {rounds:.0} round trips, much of them spent reaching the path's rate"
            ),
        ),
        Some(_) if idle >= 0.5 => (
            Limit::RoundTrips,
            format!(
                "round trips and per-file work: this side had nothing more to send while {:.0}% of the data went out (files waiting on their exchanges, not on the path)",
                idle * 100.0
            ),
        ),
        Some(b) => (
            Limit::Congestion,
            format!(
                "congestion control: {:.0} of the ~{b:.0} Mbit/s the path carries, {:.2}% of packets lost",
                r.rate_mbit,
                r.loss.unwrap_or(0.0) * 100.0
            ),
        ),
    }
}

/// Datagrams per I/O call between two readings of a direction's counters.
fn per_call(now: &quinn::UdpStats, then: &quinn::UdpStats) -> f64 {
    let ios = now.ios - then.ios;
    if ios == 0 {
        return 0.0;
    }
    (now.datagrams - then.datagrams) as f64 / ios as f64
}

/// This process's CPU time, user and system.
fn process_cpu() -> Duration {
    // SAFETY: getrusage only writes the struct it is given.
    let mut u: libc::rusage = unsafe { std::mem::zeroed() };
    if unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut u) } != 0 {
        return Duration::ZERO;
    }
    let tv = |t: libc::timeval| Duration::new(t.tv_sec as u64, t.tv_usec as u32 * 1000);
    tv(u.ru_utime) + tv(u.ru_stime)
}

/// The machine's busy and total CPU time so far, in clock ticks, from
/// `/proc/stat` (Linux only).
fn machine_cpu() -> Option<(u64, u64)> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    let line = stat.lines().next()?.strip_prefix("cpu ")?;
    let v: Vec<u64> = line
        .split_whitespace()
        .filter_map(|x| x.parse().ok())
        .collect();
    // user nice system idle iowait irq softirq steal ...
    let total: u64 = v.iter().take(8).sum();
    let idle = v.get(3)? + v.get(4).copied().unwrap_or(0);
    Some((total - idle, total))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An upload over 30 ms at 190 of 200 Mbit/s for 10 s (333 round trips).
    fn figures() -> PathReport {
        PathReport {
            seconds: 10.0,
            rtt_ms: 30.0,
            loss: Some(0.0),
            rate_mbit: 190.0,
            bottleneck_mbit: Some(200.0),
            cpu_cores: 0.3,
            machine_busy: Some(0.3),
            disk_busy: 0.1,
            window_blocked: 0,
            sender_idle: Some(0.0),
            datagrams_per_send: 1.0,
            datagrams_per_receive: 1.0,
            limit: Limit::Link,
            why: String::new(),
        }
    }

    #[test]
    fn each_limit_is_named_by_the_first_figure_that_holds() {
        assert_eq!(verdict(&figures(), true).0, Limit::Link);
        let slower = PathReport {
            rate_mbit: 80.0,
            loss: Some(0.02),
            ..figures()
        };
        let (limit, why) = verdict(&slower, true);
        assert_eq!(limit, Limit::Congestion);
        assert!(why.contains("2.00% of packets lost"), "{why}");
        let never_filled = PathReport {
            bottleneck_mbit: None,
            ..figures()
        };
        assert_eq!(verdict(&never_filled, true).0, Limit::RoundTrips);
        // Filled the path once, but mostly had nothing to send.
        let short = PathReport {
            seconds: 0.6,
            rate_mbit: 80.0,
            ..figures()
        };
        assert_eq!(verdict(&short, true).0, Limit::RoundTrips);
        let idle = PathReport {
            rate_mbit: 80.0,
            sender_idle: Some(0.8),
            ..figures()
        };
        let (limit, why) = verdict(&idle, true);
        assert_eq!(limit, Limit::RoundTrips);
        assert!(why.contains("80%"), "{why}");
        // A busy core hides everything after it.
        let cpu = PathReport {
            cpu_cores: 0.95,
            disk_busy: 0.9,
            window_blocked: 300,
            ..figures()
        };
        assert_eq!(verdict(&cpu, true).0, Limit::Cpu);
        let machine = PathReport {
            machine_busy: Some(0.97),
            ..figures()
        };
        let (limit, why) = verdict(&machine, true);
        assert_eq!(limit, Limit::Cpu);
        assert!(why.contains("97% busy"), "{why}");
        let disk = PathReport {
            disk_busy: 0.85,
            window_blocked: 300,
            ..figures()
        };
        assert_eq!(verdict(&disk, false).0, Limit::Disk);
    }

    #[test]
    fn a_sender_at_the_links_rate_blames_the_link_however_often_it_met_the_window() {
        // As measured over 30 ms / 200 Mbit/s: blocked in most round trips
        // at 95% of the link.
        let at_rate = PathReport {
            window_blocked: 192,
            ..figures()
        };
        assert_eq!(verdict(&at_rate, true).0, Limit::Link);
        // The same on a download, whose receiver (this side) was idle.
        let download = PathReport {
            loss: None,
            bottleneck_mbit: None,
            window_blocked: 192,
            ..figures()
        };
        let (limit, why) = verdict(&download, false);
        assert_eq!(limit, Limit::Link);
        assert!(why.contains("server"), "{why}");
    }

    #[test]
    fn a_sender_held_by_the_window_blames_it_only_when_the_path_outgrows_it() {
        // Blocked in most round trips, well below the link: about 0.3 MiB
        // in flight, far below the window, so the receiver was slow.
        let slow = PathReport {
            rate_mbit: 80.0,
            window_blocked: 200,
            ..figures()
        };
        let (limit, why) = verdict(&slow, true);
        assert_eq!(limit, Limit::Receiver);
        assert!(why.contains("the server"), "{why}");
        // A download: this side is the receiver, and it was busy.
        let busy = PathReport {
            disk_busy: 0.6,
            ..slow.clone()
        };
        let (limit, why) = verdict(&busy, false);
        assert_eq!(limit, Limit::Receiver);
        assert!(why.contains("this side"), "{why}");
        // Blocked now and then only: not the receiver's doing.
        let rarely = PathReport {
            window_blocked: 20,
            ..slow.clone()
        };
        assert_eq!(verdict(&rarely, true).0, Limit::Congestion);
        // 5 Gbit/s x 100 ms is about 60 MiB: more than the window.
        let long_fat = PathReport {
            seconds: 10.0,
            rtt_ms: 100.0,
            rate_mbit: 5_000.0,
            bottleneck_mbit: Some(10_000.0),
            window_blocked: 80,
            ..figures()
        };
        assert_eq!(verdict(&long_fat, true).0, Limit::FlowControl);
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn the_machine_and_process_counters_move() {
        let (b0, t0) = machine_cpu().expect("Linux has /proc/stat");
        let c0 = process_cpu();
        let spin = Instant::now();
        let mut x = 0u64;
        while spin.elapsed() < Duration::from_millis(50) {
            x = x.wrapping_add(std::hint::black_box(1));
        }
        assert!(x > 0);
        let (b1, t1) = machine_cpu().unwrap();
        assert!(t1 > t0 && b1 > b0, "({b0}, {t0}) -> ({b1}, {t1})");
        assert!(process_cpu() > c0);
    }
}

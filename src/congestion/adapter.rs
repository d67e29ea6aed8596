//! The controller as quinn sees it: the factory a connection's transport takes (with what a path remembered), the Controller trait's calls, and what a connection learned.

use std::any::Any;
use std::sync::Arc;
use std::time::Instant;

use quinn::congestion::{Controller, ControllerFactory, ControllerMetrics};
use quinn_proto::RttEstimator;

use super::*;

/// Builds qxfer's controller for each connection.
///
/// With a [`PathMemory`] of the same path, startup resumes from it, after
/// draft-ietf-tsvwg-careful-resume: once the first RTT sample confirms
/// the path (within half to twice the remembered RTT), the window jumps to
/// half the remembered bandwidth-delay product, paced over a round, and
/// startup goes on from there with its usual exits (a rising RTT or heavy
/// loss ends it within a round if the path got worse). A fresh start takes
/// about log2(BDP / initial window) rounds to fill the pipe: 7 rounds (0.7 s)
/// on a 100 ms / 500 Mbit/s path, 8 (6 s) on a 750 ms satellite path.
#[derive(Debug, Clone, Default)]
pub(crate) struct ModelConfig {
    pub(crate) memory: Option<PathMemory>,
}

impl ControllerFactory for ModelConfig {
    fn build(self: Arc<Self>, now: Instant, current_mtu: u16) -> Box<dyn Controller> {
        let mut model = Model::new(now, current_mtu);
        model.memory = self.memory.filter(|m| m.bw.is_finite() && m.bw > 0.0);
        Box::new(model)
    }
}

/// What `conn` has learned about its path, if its controller is ours and it
/// filled the pipe at least once (a connection that only moved small files
/// never measured the bottleneck and teaches nothing).
pub(crate) fn learned(conn: &quinn::Connection) -> Option<PathMemory> {
    let model = model_of(conn)?;
    let min_rtt = model.min_rtt?;
    (model.full_bw_seen > 0.0).then_some(PathMemory {
        bw: model.full_bw_seen,
        min_rtt,
    })
}

/// The bytes `conn`'s controller has seen delivered, and of them those
/// sent while the application had nothing more to send, if the controller
/// is ours: how much of a transfer's time the sender, not the path, set.
pub(crate) fn delivered(conn: &quinn::Connection) -> Option<(u64, u64)> {
    let model = model_of(conn)?;
    Some((model.delivered, model.delivered_app_limited))
}

/// A copy of `conn`'s controller, if it is ours.
fn model_of(conn: &quinn::Connection) -> Option<Box<Model>> {
    conn.congestion_state().into_any().downcast::<Model>().ok()
}

impl Controller for Model {
    fn on_sent(&mut self, now: Instant, bytes: u64, _last_packet_number: u64) {
        if self.in_flight == 0 {
            // Restarting from idle: intervals start now, not at the last ack.
            self.first_sent_time = now;
            self.delivered_time = now;
        }
        self.in_flight += bytes;
        if self.records.back().is_some_and(|r| r.sent == now) {
            return; // same instant: the earlier record already describes it
        }
        if self.records.len() >= MAX_RECORDS {
            self.records.pop_front();
        }
        self.records.push_back(SendRecord {
            sent: now,
            delivered: self.delivered,
            delivered_time: self.delivered_time,
            first_sent_time: self.first_sent_time,
            app_limited: self.app_limited_until > self.delivered,
        });
    }

    fn on_ack(
        &mut self,
        now: Instant,
        sent: Instant,
        bytes: u64,
        app_limited: bool,
        rtt: &RttEstimator,
    ) {
        self.acked(now, sent, bytes, app_limited, rtt.get());
    }

    fn on_end_acks(
        &mut self,
        now: Instant,
        in_flight: u64,
        app_limited: bool,
        _largest_packet_num_acked: Option<u64>,
    ) {
        self.end_acks(now, in_flight, app_limited);
    }
    fn on_congestion_event(
        &mut self,
        now: Instant,
        sent: Instant,
        is_persistent_congestion: bool,
        lost_bytes: u64,
    ) {
        // lost_bytes is 0 for an ECN mark: count it as one lost packet.
        let lost = if lost_bytes == 0 {
            self.mtu
        } else {
            lost_bytes
        };
        // Startup's overshoot is detected for a round or two after it ends;
        // the drain already answers it, so it must not cut the model again.
        if self.startup_end.is_none_or(|end| sent >= end) {
            self.round_lost += lost;
        }
        self.in_flight = self.in_flight.saturating_sub(lost_bytes);
        if is_persistent_congestion {
            // Nothing got through for a long while: the model is void.
            *self = Self {
                mtu: self.mtu,
                ..Self::new(now, self.mtu as u16)
            };
            self.window = self.min_window();
        }
    }

    fn on_mtu_update(&mut self, new_mtu: u16) {
        self.mtu = u64::from(new_mtu);
        self.window = self.window.max(self.min_window());
    }

    fn window(&self) -> u64 {
        self.window
    }

    fn metrics(&self) -> ControllerMetrics {
        let mut m = ControllerMetrics::default();
        m.congestion_window = self.window;
        m.pacing_rate = Some((self.bandwidth() * 8.0) as u64);
        m
    }

    fn clone_box(&self) -> Box<dyn Controller> {
        Box::new(self.clone())
    }

    fn initial_window(&self) -> u64 {
        INITIAL_WINDOW_PACKETS * self.mtu
    }

    fn into_any(self: Box<Self>) -> Box<dyn Any> {
        self
    }
}

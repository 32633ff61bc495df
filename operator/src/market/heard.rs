//! What a renter heard from a lease's provider, and when that is worth a
//! write to its Lease.
//!
//! Heartbeats and reports land in memory; the renter's grace window reads
//! them from there. The Lease keeps a copy for people, for the AiJob mirror
//! and for after a restart, and each copy is an API write in the renter's
//! cluster, the placement pipeline's scarcest resource. So:
//! - a new workload phase is written at once (the AiJob mirrors it, and a
//!   pod Running in another organisation is what a renter waits for);
//! - a changed pod state rides the next message at least [`DETAIL_DELAY_MS`]
//!   after the last write (a phase change usually brings it sooner);
//! - a changed exit code or message, or nothing new, rides the timed write:
//!   an exit code matters with the terminal phase, which comes with its own
//!   write;
//! - a Lease whose close was asked for gets no timed writes: its provider
//!   reports until it sees the close on chain, and the renter's record of
//!   those beats is of no use to anyone.
//!
//! In a burst of 100 jobs this took the renter's market writes from 8.6 per
//! lease (a beat before any report, five report changes, two beats after the
//! close) to about three.

use gpupool_proto::peer::v1::LeaseStatus;

use super::renter::moves_forward;

/// How long a changed pod state may wait for company.
pub const DETAIL_DELAY_MS: u64 = 1_000;

/// The least time between two timed writes of a running lease's Lease.
///
/// The renter's grace window runs on the beats in memory, and a renter that
/// starts or takes over leadership starts a window of its own, so the
/// recorded `lastHeartbeat` is for people only. Refreshing it every half
/// grace window (7.5 s at the defaults) cost every running pool lease 7.5
/// writes a minute in the renter's cluster for as long as it ran: 1,000
/// leases, 125 writes a second of nothing new. A minute is as fresh as a
/// person reading `kubectl get` needs, and keeps a day-long lease's cost to
/// one write a minute.
pub const RECORD_EVERY_MS: u64 = 60_000;

/// How often a running lease's Lease gets its timed write: half the grace
/// window, and never more often than [`RECORD_EVERY_MS`].
pub fn record_every_ms(grace_ms: u64) -> u64 {
    (grace_ms / 2).max(RECORD_EVERY_MS)
}

/// What a renter last heard from a lease's provider.
#[derive(Clone, Debug, Default)]
pub struct Heard {
    pub heard_ms: u64,
    /// When the lease offer was first sent: the grace window starts there,
    /// not at the on-chain confirmation, which a busy renter may act on late.
    pub offered_ms: u64,
    pub written_ms: u64,
    /// Expiry of the newest applied status: messages handled concurrently may
    /// finish out of order, and an older report must not overwrite a newer one.
    pub applied_expires_ms: u64,
    /// The newest report, written or not.
    pub report: Option<LeaseStatus>,
    /// The Lease must be written with the next message: the report has a
    /// phase it does not show yet, or the last write failed.
    pub urgent: bool,
    /// The report has a pod state the Lease does not show yet.
    pub detail_unwritten: bool,
}

impl Heard {
    /// Takes in one message: a beat (`None`) or a report that expires at
    /// `expires_at_ms`. Returns whether it changed the phase: the AiJob's
    /// reconcile is woken for that.
    pub fn absorb(&mut self, now_ms: u64, report: Option<LeaseStatus>, expires_at_ms: u64) -> bool {
        self.heard_ms = self.heard_ms.max(now_ms);
        let Some(new) = report else { return false };
        if expires_at_ms < self.applied_expires_ms {
            return false; // an older report that finished after a newer one
        }
        // A workload never goes back from finished to running: a report that
        // says so was read from a stale cache on the provider's side.
        if !moves_forward(self.report.as_ref().map(|r| r.phase.as_str()), &new.phase) {
            return false;
        }
        let (phase, detail) = match &self.report {
            None => (true, false),
            Some(old) => (old.phase != new.phase, old.pod_state != new.pod_state),
        };
        self.urgent |= phase;
        self.detail_unwritten |= detail;
        self.applied_expires_ms = expires_at_ms;
        self.report = Some(new);
        phase
    }

    /// Whether the Lease should be written now. `write_every` paces the
    /// timed write; `closing` says the renter asked for the lease's close.
    pub fn write_due(&self, now_ms: u64, write_every_ms: u64, closing: bool) -> bool {
        if self.urgent {
            return true;
        }
        if closing {
            return false;
        }
        // A fresh lease's first timed write counts from its offer, so the
        // provider's first beat is not a write of its own.
        let since = now_ms.saturating_sub(self.written_ms.max(self.offered_ms));
        (self.detail_unwritten && since >= DETAIL_DELAY_MS) || since >= write_every_ms
    }

    /// Marks the newest report as being written.
    pub fn writing(&mut self, now_ms: u64) {
        self.written_ms = now_ms;
        self.urgent = false;
        self.detail_unwritten = false;
    }

    /// A write failed: the next message writes again, whatever it carries.
    pub fn write_failed(&mut self) {
        self.urgent = true;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const EVERY: u64 = 7_500;

    fn report(phase: &str, pod: &str, exit: Option<i32>) -> Option<LeaseStatus> {
        Some(LeaseStatus {
            phase: phase.into(),
            pod_state: pod.into(),
            exit_code: exit,
            ..Default::default()
        })
    }

    /// Absorbs and, when due, writes: returns the times it wrote at.
    fn run(h: &mut Heard, msgs: &[(u64, Option<LeaseStatus>)], closing_from: u64) -> Vec<u64> {
        let mut writes = vec![];
        for (i, (t, r)) in msgs.iter().enumerate() {
            h.absorb(*t, r.clone(), u64::try_from(i).unwrap() + 1);
            if h.write_due(*t, EVERY, *t >= closing_from) {
                h.writing(*t);
                writes.push(*t);
            }
        }
        writes
    }

    #[test]
    fn a_running_lease_is_recorded_once_a_minute_or_every_half_grace_window() {
        assert_eq!(record_every_ms(15_000), 60_000, "the defaults");
        assert_eq!(record_every_ms(4_000), 60_000, "the tests' short grace");
        assert_eq!(record_every_ms(300_000), 150_000, "a long grace");
        // An hour of beats every 2 s from a running lease: 60 writes, not 480.
        let mut h = Heard {
            offered_ms: 0,
            ..Default::default()
        };
        h.absorb(1_000, report("Running", "", None), 1);
        let mut writes = 0;
        for t in (1_000..=3_600_000).step_by(2_000) {
            h.absorb(t, None, 0);
            if h.write_due(t, record_every_ms(15_000), false) {
                h.writing(t);
                writes += 1;
            }
        }
        assert_eq!(writes, 60);
    }

    #[test]
    fn one_lease_is_written_once_per_phase() {
        // What a provider sent for one job in the burst, beat by beat.
        let mut h = Heard {
            offered_ms: 1_000,
            ..Default::default()
        };
        let msgs = [
            (3_000, None),
            (4_000, report("Pending", "", None)),
            (4_700, report("Pending", "PlacedLocally", None)),
            (6_400, report("Running", "PlacedLocally", None)),
            (8_800, report("Running", "PlacedLocally", Some(0))),
            (9_900, report("Succeeded", "PlacedLocally", Some(0))),
            (10_500, None),
            (18_500, None),
        ];
        assert_eq!(run(&mut h, &msgs, 13_500), vec![4_000, 6_400, 9_900]);
        assert_eq!(h.report.unwrap().exit_code, Some(0));
    }

    #[test]
    fn a_detail_alone_waits_for_company_but_not_for_ever() {
        let mut h = Heard::default();
        let msgs = [
            (10_000, report("Running", "", None)),
            (10_300, report("Running", "Ready", None)),
            (10_600, None),
            (11_100, None),
        ];
        assert_eq!(run(&mut h, &msgs, u64::MAX), vec![10_000, 11_100]);
    }

    #[test]
    fn beats_are_written_on_the_timer_and_not_after_a_close() {
        let mut h = Heard {
            offered_ms: 1_000,
            ..Default::default()
        };
        let msgs = [
            (3_000, None),
            (8_600, None),
            (9_000, None),
            (17_000, None),
            (30_000, None),
        ];
        assert_eq!(run(&mut h, &msgs, 20_000), vec![8_600, 17_000]);
    }

    #[test]
    fn a_final_phase_is_written_even_after_a_close() {
        let mut h = Heard::default();
        let msgs = [
            (1_000, report("Running", "", None)),
            (2_000, report("Failed", "Error", Some(1))),
        ];
        assert_eq!(run(&mut h, &msgs, 1_500), vec![1_000, 2_000]);
    }

    #[test]
    fn old_and_backward_reports_change_nothing() {
        let mut h = Heard::default();
        assert!(h.absorb(1_000, report("Succeeded", "", Some(0)), 50));
        h.writing(1_000);
        assert!(!h.absorb(1_100, report("Running", "", None), 60));
        assert!(!h.absorb(1_200, report("Failed", "", Some(1)), 40));
        assert_eq!(h.report.as_ref().unwrap().phase, "Succeeded");
        assert!(!h.urgent && !h.detail_unwritten);
        assert_eq!(h.heard_ms, 1_200);
    }

    #[test]
    fn a_failed_write_is_retried_with_the_next_message() {
        let mut h = Heard {
            offered_ms: 1_000,
            ..Default::default()
        };
        h.absorb(2_000, report("Running", "", None), 1);
        assert!(h.write_due(2_000, EVERY, false));
        h.writing(2_000);
        h.write_failed();
        h.absorb(2_100, None, 0);
        assert!(h.write_due(2_100, EVERY, false));
    }
}

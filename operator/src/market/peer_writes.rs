//! When a peer's PoolPeer is written: what a person needs to see soon lands
//! within a second, and the rest is paced so that a member's writes do not
//! grow with the size of the pool.
//!
//! Each member keeps one PoolPeer per peer. Written on every change at most
//! once a second and every 15 s regardless, a member of a pool of 200 wrote
//! 13 PoolPeers a second while nothing changed, and up to 200 a second under
//! load, when every peer's advert changes several times a second. Capacity
//! changes now share a budget of [`CAPACITY_WRITES_PER_SEC`] across all
//! peers, and `lastSeen` is refreshed once a minute. The market decides on
//! what it holds in memory; the PoolPeers are for people and the CLI.

/// A change a person acts on (connected or not, identity, reputation) lands
/// this soon.
pub const CHANGE_EVERY_MS: u64 = 1_000;

/// A peer heard from has its PoolPeer (and `lastSeen`) written at least this often.
pub const LAST_SEEN_EVERY_MS: u64 = 60_000;

/// Capacity-only changes, across all peers, written per second at most.
pub const CAPACITY_WRITES_PER_SEC: u64 = 5;

/// How often one peer's capacity changes may be written in a pool of
/// `peers`: every second in a small pool, every `peers / 5` seconds in a
/// large one, so that all of them together stay within the budget.
pub fn capacity_every_ms(peers: usize) -> u64 {
    let peers = u64::try_from(peers).unwrap_or(u64::MAX);
    CHANGE_EVERY_MS.max(peers.saturating_mul(1_000) / CAPACITY_WRITES_PER_SEC)
}

/// One peer's PoolPeer writes.
#[derive(Clone, Debug, Default)]
pub struct Pacing {
    /// Last time its PoolPeer was written.
    pub written_ms: u64,
    /// A change a person acts on, not yet written.
    pub changed: bool,
    /// A change in its advertised capacity, not yet written.
    pub capacity_changed: bool,
}

impl Pacing {
    /// Whether something is waiting to be written.
    pub fn pending(&self) -> bool {
        self.changed || self.capacity_changed
    }

    /// Has the next chance write it, whatever was written last.
    pub fn write_next(&mut self) {
        self.written_ms = 0;
        self.changed = true;
    }

    /// Whether to write the PoolPeer now, in a pool of `peers`; if so, the
    /// write is counted as done.
    pub fn due(&mut self, now: u64, peers: usize) -> bool {
        let since = now.saturating_sub(self.written_ms);
        let due = (self.changed && since >= CHANGE_EVERY_MS)
            || (self.capacity_changed && since >= capacity_every_ms(peers))
            || since >= LAST_SEEN_EVERY_MS;
        if due {
            self.written_ms = now;
            self.changed = false;
            self.capacity_changed = false;
        }
        due
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_change_lands_within_a_second_and_nothing_new_writes_once_a_minute() {
        let mut p = Pacing::default();
        let t0 = 100_000;
        assert!(p.due(t0, 3), "first sight is written");
        p.changed = true;
        assert!(!p.due(t0 + 300, 3), "a change within a second waits");
        assert!(p.due(t0 + 1_000, 3), "and lands a second later");
        assert!(!p.due(t0 + 30_000, 3), "nothing new, nothing written");
        assert!(p.due(t0 + 61_000, 3), "lastSeen refreshed once a minute");
        p.capacity_changed = true;
        assert!(
            p.due(t0 + 62_000, 3),
            "in a small pool, capacity lands within a second too"
        );
    }

    #[test]
    fn in_a_large_pool_capacity_waits_its_turn_but_connection_changes_do_not() {
        let mut p = Pacing {
            changed: true,
            ..Pacing::default()
        };
        assert!(p.due(1_000, 200), "first sight is written");
        p.capacity_changed = true;
        assert!(!p.due(2_000, 200), "one of 200 peers: every 40 s");
        assert!(!p.due(40_999, 200));
        assert!(p.due(41_000, 200));
        p.capacity_changed = true;
        p.write_next();
        assert!(p.due(41_001, 200), "a connection change goes at once");
    }

    /// 200 peers whose adverts change every 400 ms for ten minutes, and the
    /// same pool idle: what one member writes per second.
    #[test]
    fn a_members_writes_stay_within_budget_whatever_the_pool_size() {
        fn writes_per_sec(peers: usize, changing: bool) -> f64 {
            let end = 600_000u64;
            let mut writes = 0u64;
            // Peers are paced each on its own: one at a time, adverts every
            // 400 ms, staggered by peer.
            for i in 0..peers as u64 {
                let mut p = Pacing::default();
                let mut t = 1 + i * 7 % 400;
                while t < end {
                    p.capacity_changed |= changing;
                    if p.due(t, peers) {
                        writes += 1;
                    }
                    t += 400;
                }
            }
            writes as f64 / (end / 1_000) as f64
        }
        let budget = CAPACITY_WRITES_PER_SEC as f64 + 200.0 / (LAST_SEEN_EVERY_MS / 1_000) as f64;
        let busy = writes_per_sec(200, true);
        assert!(busy <= budget + 0.5, "200 changing peers: {busy}/s, budget {budget}/s");
        assert!(busy >= 4.0, "and capacity still flows: {busy}/s");
        let idle = writes_per_sec(200, false);
        assert!(idle <= 3.5, "200 idle peers: {idle}/s (was 13.3/s)");
        let small = writes_per_sec(3, true);
        // Adverts every 400 ms: each lands at the first one a second after the last write.
        assert!(small >= 2.4, "3 changing peers: each every 1.2 s ({small}/s)");
    }
}

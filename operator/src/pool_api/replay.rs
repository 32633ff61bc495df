//! Freshness and replay memory for signed Pool API requests.
//!
//! A signed request is good for `window` either side of our clock; within it
//! each (wallet, nonce) pair is accepted once. Entries older than the window
//! are forgotten, since their timestamps alone refuse them, so memory is
//! bounded by the request rate times the window, and a hard cap refuses new
//! nonces (not old ones) when a flood exceeds even that.

use std::collections::{HashMap, VecDeque};

use gpupool_chain::Address;

#[derive(thiserror::Error, Debug, PartialEq, Eq)]
pub enum Refused {
    #[error(
        "the request was signed at {signed_ms} ms, {skew_ms} ms from this operator's clock; at most {window_ms} ms is accepted (check the clock, then sign again)"
    )]
    Stale {
        signed_ms: u64,
        skew_ms: u64,
        window_ms: u64,
    },
    #[error("this nonce was already used: a replayed request is refused (sign each request with a fresh nonce)")]
    Replayed,
    #[error("too many signed requests in flight; retry in a few seconds")]
    Full,
}

pub struct ReplayGuard {
    window_ms: u64,
    cap: usize,
    seen: HashMap<(Address, String), u64>,
    /// Insertion order with each entry's expiry, for pruning.
    order: VecDeque<(u64, Address, String)>,
}

impl ReplayGuard {
    pub fn new(window_ms: u64, cap: usize) -> Self {
        Self {
            window_ms,
            cap,
            seen: HashMap::new(),
            order: VecDeque::new(),
        }
    }

    /// Accepts the request once, or says why not. Changes nothing when it refuses.
    pub fn admit(&mut self, wallet: Address, nonce: &str, signed_ms: u64, now_ms: u64) -> Result<(), Refused> {
        let skew_ms = signed_ms.abs_diff(now_ms);
        if skew_ms > self.window_ms {
            return Err(Refused::Stale {
                signed_ms,
                skew_ms,
                window_ms: self.window_ms,
            });
        }
        self.prune(now_ms);
        let key = (wallet, nonce.to_string());
        if self.seen.contains_key(&key) {
            return Err(Refused::Replayed);
        }
        if self.seen.len() >= self.cap {
            return Err(Refused::Full);
        }
        // Refused by its timestamp from then on, so forgettable.
        let expires = signed_ms.saturating_add(self.window_ms);
        self.seen.insert(key, expires);
        self.order.push_back((expires, wallet, nonce.to_string()));
        Ok(())
    }

    fn prune(&mut self, now_ms: u64) {
        // Expiries are not pushed in order (signing times vary within the
        // window); stop at the first live one and let later passes catch up,
        // which keeps every call O(pruned).
        while let Some((expires, _, _)) = self.order.front() {
            if *expires >= now_ms {
                break;
            }
            if let Some((_, w, n)) = self.order.pop_front() {
                self.seen.remove(&(w, n));
            }
        }
    }

    pub fn len(&self) -> usize {
        self.seen.len()
    }

    pub fn is_empty(&self) -> bool {
        self.seen.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: u64 = 1_800_000_000_000;

    #[test]
    fn a_nonce_is_accepted_once_within_the_window() {
        let mut g = ReplayGuard::new(60_000, 100);
        let a = Address::repeat_byte(1);
        assert_eq!(g.admit(a, "n1", NOW, NOW), Ok(()));
        assert_eq!(g.admit(a, "n1", NOW, NOW + 1), Err(Refused::Replayed));
        // Another wallet's identical nonce is its own.
        assert_eq!(g.admit(Address::repeat_byte(2), "n1", NOW, NOW), Ok(()));
        // Too old or too far ahead: refused without being remembered.
        assert!(matches!(
            g.admit(a, "n2", NOW - 60_001, NOW),
            Err(Refused::Stale { .. })
        ));
        assert!(matches!(
            g.admit(a, "n2", NOW + 60_001, NOW),
            Err(Refused::Stale { .. })
        ));
        assert_eq!(g.len(), 2);
        // After the window, the replay is refused by its timestamp, and forgotten.
        assert!(matches!(
            g.admit(a, "n1", NOW, NOW + 60_001),
            Err(Refused::Stale { .. })
        ));
        assert_eq!(g.admit(a, "n3", NOW + 61_000, NOW + 61_000), Ok(()));
        assert_eq!(g.len(), 1, "expired entries are pruned");
    }

    #[test]
    fn a_flood_is_bounded() {
        let mut g = ReplayGuard::new(60_000, 1_000);
        let a = Address::repeat_byte(1);
        for i in 0..1_000 {
            g.admit(a, &format!("n{i}"), NOW, NOW).unwrap();
        }
        assert_eq!(g.admit(a, "one-more", NOW, NOW), Err(Refused::Full));
        assert_eq!(g.admit(a, "n5", NOW, NOW), Err(Refused::Replayed));
        assert_eq!(g.len(), 1_000);
        // Once they expire, room again.
        assert_eq!(g.admit(a, "later", NOW + 60_001, NOW + 60_001), Ok(()));
        assert_eq!(g.len(), 1);
    }
}

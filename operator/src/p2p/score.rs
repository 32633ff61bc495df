//! Per-peer scores from dropped messages. Pure: time comes in as an argument.
//!
//! A peer starts at 0. Each drop subtracts its reason's penalty; the score
//! recovers linearly towards 0 so an honest peer's occasional stale message is
//! forgotten, while a forger crosses the ban line at once and stays there for
//! a while.

use std::collections::HashMap;

use libp2p::PeerId;

use super::envelope::DropReason;

#[derive(Clone, Copy, Debug)]
pub struct ScoreParams {
    /// At or below this a peer's messages are ignored and it is disconnected.
    pub ban_below: f64,
    /// Points regained per second.
    pub recovery_per_sec: f64,
}

impl Default for ScoreParams {
    fn default() -> Self {
        Self {
            ban_below: -50.0,
            recovery_per_sec: 0.1,
        }
    }
}

#[derive(Clone, Copy, Debug)]
struct Entry {
    score: f64,
    at_ms: u64,
}

#[derive(Debug, Default)]
pub struct PeerScores {
    params: ScoreParams,
    peers: HashMap<PeerId, Entry>,
}

impl PeerScores {
    pub fn new(params: ScoreParams) -> Self {
        Self {
            params,
            peers: HashMap::new(),
        }
    }

    fn recovered(&self, e: Entry, now_ms: u64) -> f64 {
        let secs = now_ms.saturating_sub(e.at_ms) as f64 / 1000.0;
        (e.score + secs * self.params.recovery_per_sec).min(0.0)
    }

    /// The peer's score now.
    pub fn score(&self, peer: &PeerId, now_ms: u64) -> f64 {
        self.peers.get(peer).map_or(0.0, |e| self.recovered(*e, now_ms))
    }

    pub fn is_banned(&self, peer: &PeerId, now_ms: u64) -> bool {
        self.score(peer, now_ms) <= self.params.ban_below
    }

    /// Lowers the peer's score for `reason`; returns the new score.
    pub fn penalise(&mut self, peer: PeerId, reason: DropReason, now_ms: u64) -> f64 {
        let current = self.score(&peer, now_ms);
        let score = current - reason.penalty();
        self.peers.insert(peer, Entry { score, at_ms: now_ms });
        // Peers back at 0 need no entry; keeps the map to the misbehaving few.
        self.peers.retain(|_, e| e.score < 0.0);
        score
    }

    /// Scores of every peer with a penalty, for the metric.
    pub fn snapshot(&self, now_ms: u64) -> Vec<(PeerId, f64)> {
        self.peers
            .iter()
            .map(|(p, e)| (*p, self.recovered(*e, now_ms)))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn forgers_are_banned_and_stale_senders_recover() {
        let mut s = PeerScores::new(ScoreParams::default());
        let forger = PeerId::random();
        let honest = PeerId::random();
        for _ in 0..3 {
            s.penalise(forger, DropReason::BadSignature, 0);
        }
        assert!(s.is_banned(&forger, 0));
        s.penalise(honest, DropReason::Expired, 0);
        assert_eq!(s.score(&honest, 0), -1.0);
        assert!(!s.is_banned(&honest, 0));
        assert_eq!(s.score(&honest, 10_000), 0.0, "recovers within 10 s");
        assert!(s.is_banned(&forger, 60_000), "a minute later still banned");
        assert!(!s.is_banned(&forger, 200_000_000));
        assert_eq!(s.score(&PeerId::random(), 0), 0.0);
        // Racing a close is not misbehaviour, nor is reaching a member
        // whose replay guard others have filled.
        let late = PeerId::random();
        for _ in 0..1000 {
            s.penalise(late, DropReason::Late, 0);
            s.penalise(late, DropReason::Overloaded, 0);
        }
        assert_eq!(s.score(&late, 0), 0.0);
        // A flooder's excess counts against it.
        let flooder = PeerId::random();
        for _ in 0..25 {
            s.penalise(flooder, DropReason::Flooding, 0);
        }
        assert!(s.is_banned(&flooder, 0));
    }
}

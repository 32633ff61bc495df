//! The connections the swarm holds to each peer, and which relayed ones it
//! closes around a hole punch. Pure: the swarm (I/O) reports what opened and
//! closed and closes what this names; time comes in as an argument, so the
//! rules are tested without sockets or clocks.
//!
//! Why close relayed connections at all: libp2p spreads requests over every
//! connection to a peer (gossipsub keeps to the first), so a relayed one left
//! open beside a punched direct one keeps the relay carrying the traffic.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use libp2p::swarm::ConnectionId;
use libp2p::{Multiaddr, PeerId};

/// One live connection to a peer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Link {
    /// The peer's end: the address dialled, or where its dial came from.
    pub remote: Multiaddr,
    /// Carried by a relay (`/p2p-circuit`), not straight between the two.
    pub relayed: bool,
    /// This member dialled it (else the peer did).
    pub dialled: bool,
    /// When it opened: a circuit that lands just after a hole punch belongs
    /// to the same race (see [`PUNCH_RACE`]).
    pub established: Instant,
}

/// How long after a hole punch a circuit to the same peer is taken for one
/// dialled in the same race, and closed. Later, a peer that dials through
/// the relay while a direct connection looks alive here has most likely
/// restarted behind its NAT (an old QUIC connection looks alive until its
/// idle timeout, a TCP one until a ping fails): its circuit is kept, and is
/// all it can reach us by, and the direct connection is closed
/// ([`Links::outlived`]).
pub const PUNCH_RACE: Duration = Duration::from_secs(10);

/// Every live connection, by peer.
#[derive(Debug, Default)]
pub struct Links {
    by_peer: HashMap<PeerId, HashMap<ConnectionId, Link>>,
}

impl Links {
    pub fn opened(&mut self, peer: PeerId, id: ConnectionId, link: Link) {
        self.by_peer.entry(peer).or_default().insert(id, link);
    }

    pub fn closed(&mut self, peer: PeerId, id: ConnectionId) {
        if let Some(links) = self.by_peer.get_mut(&peer) {
            links.remove(&id);
            if links.is_empty() {
                self.by_peer.remove(&peer);
            }
        }
    }

    /// The connections to `peer`, in no particular order.
    pub fn of(&self, peer: PeerId) -> Vec<Link> {
        self.by_peer
            .get(&peer)
            .map(|l| l.values().cloned().collect())
            .unwrap_or_default()
    }

    pub fn get(&self, peer: PeerId, id: ConnectionId) -> Option<&Link> {
        self.by_peer.get(&peer)?.get(&id)
    }

    pub fn reached_directly(&self, peer: PeerId) -> bool {
        self.by_peer.get(&peer).is_some_and(|l| l.values().any(|l| !l.relayed))
    }

    /// A direct connection to `peer` opened within [`PUNCH_RACE`] of `now`.
    pub fn punched_lately(&self, peer: PeerId, now: Instant) -> bool {
        self.by_peer.get(&peer).is_some_and(|l| {
            l.values()
                .any(|l| !l.relayed && now.saturating_duration_since(l.established) < PUNCH_RACE)
        })
    }

    /// Every relayed connection to `peer`: what a successful punch closes.
    pub fn relayed(&self, peer: PeerId) -> Vec<ConnectionId> {
        self.picked(peer, |_| true)
    }

    /// A circuit `id` to `peer` just opened: whether it is late in a punch
    /// that has already won (both ends dialled through the relay at once, and
    /// the direct connection landed first), so the relay need not carry it.
    pub fn late_circuit(&self, peer: PeerId, id: ConnectionId, now: Instant) -> bool {
        self.get(peer, id).is_some_and(|l| l.relayed) && self.punched_lately(peer, now)
    }

    /// A circuit `id` that `peer` dialled to us, outside a punch race, while
    /// we hold direct connections to it: the direct ones to close. A member
    /// dials only a peer it holds no connection to, so the peer has lost its
    /// end of them: it restarted behind its NAT, or its NAT forgot the
    /// mapping. Ours look alive until a ping or QUIC's idle timeout says
    /// otherwise, and libp2p spreads requests over every connection to a
    /// peer: until then every other message to it would wait out its timeout.
    pub fn outlived(&self, peer: PeerId, id: ConnectionId, now: Instant) -> Vec<ConnectionId> {
        let theirs = self.get(peer, id).is_some_and(|l| l.relayed && !l.dialled);
        if !theirs || self.punched_lately(peer, now) {
            return vec![];
        }
        self.by_peer
            .get(&peer)
            .map(|l| l.iter().filter(|(_, l)| !l.relayed).map(|(c, _)| *c).collect())
            .unwrap_or_default()
    }

    /// Two members that dialled each other through the relay at once hold
    /// two relayed connections, and each gets its own hole punch: over TCP
    /// both punches dial between the same two ports, collide, and fail until
    /// one retries alone (20 s later, seen in the NAT test). Both ends keep
    /// the circuit the smaller peer id dialled, so they agree without a
    /// word and one punch runs. The circuits to close for that; none while
    /// the one to keep has not opened yet.
    pub fn crossed(&self, local: PeerId, peer: PeerId) -> Vec<ConnectionId> {
        let smaller_is_us = local < peer;
        let kept_is_here = self
            .by_peer
            .get(&peer)
            .is_some_and(|l| l.values().any(|l| l.relayed && l.dialled == smaller_is_us));
        if kept_is_here {
            self.picked(peer, |l| l.dialled != smaller_is_us)
        } else {
            vec![]
        }
    }

    /// The relayed connections to `peer` that `which` picks.
    fn picked(&self, peer: PeerId, which: impl Fn(&Link) -> bool) -> Vec<ConnectionId> {
        self.by_peer
            .get(&peer)
            .map(|l| {
                l.iter()
                    .filter(|(_, l)| l.relayed && which(l))
                    .map(|(id, _)| *id)
                    .collect()
            })
            .unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn link(relayed: bool, dialled: bool, established: Instant) -> Link {
        Link {
            remote: Multiaddr::empty(),
            relayed,
            dialled,
            established,
        }
    }

    fn id(n: usize) -> ConnectionId {
        ConnectionId::new_unchecked(n)
    }

    fn sorted(mut ids: Vec<ConnectionId>) -> Vec<ConnectionId> {
        ids.sort();
        ids
    }

    /// Two peer ids, the smaller first.
    fn ordered() -> (PeerId, PeerId) {
        let (x, y) = (PeerId::random(), PeerId::random());
        if x < y { (x, y) } else { (y, x) }
    }

    #[test]
    fn a_punch_closes_every_relayed_connection_and_keeps_the_direct_one() {
        let (peer, t0) = (PeerId::random(), Instant::now());
        let mut links = Links::default();
        links.opened(peer, id(1), link(true, true, t0));
        links.opened(peer, id(2), link(true, false, t0));
        links.opened(peer, id(3), link(false, true, t0));
        links.opened(PeerId::random(), id(4), link(true, true, t0));
        assert_eq!(sorted(links.relayed(peer)), vec![id(1), id(2)]);
        assert!(links.reached_directly(peer));
    }

    #[test]
    fn a_circuit_within_the_race_is_late_and_one_after_it_is_kept() {
        let (peer, t0) = (PeerId::random(), Instant::now());
        let mut links = Links::default();
        links.opened(peer, id(1), link(false, true, t0));
        links.opened(peer, id(2), link(true, false, t0 + Duration::from_secs(1)));
        assert!(links.late_circuit(peer, id(2), t0 + Duration::from_secs(1)));
        // The same circuit opening after the race: a peer that restarted
        // behind its NAT while the old direct connection looks alive.
        let late = t0 + PUNCH_RACE + Duration::from_millis(1);
        assert!(!links.punched_lately(peer, late));
        assert!(!links.late_circuit(peer, id(2), late));
        // A direct connection is never "late", nor an unknown one.
        assert!(!links.late_circuit(peer, id(1), t0));
        assert!(!links.late_circuit(peer, id(9), t0));
    }

    #[test]
    fn a_circuit_the_peer_dials_after_the_race_outlives_the_direct_connection() {
        let (peer, t0) = (PeerId::random(), Instant::now());
        let late = t0 + PUNCH_RACE + Duration::from_secs(1);
        let mut links = Links::default();
        links.opened(peer, id(1), link(false, true, t0));
        links.opened(peer, id(2), link(false, false, t0));
        // The peer restarted and dialled us through the relay.
        links.opened(peer, id(3), link(true, false, late));
        assert_eq!(sorted(links.outlived(peer, id(3), late)), vec![id(1), id(2)]);
        assert!(!links.late_circuit(peer, id(3), late));
        // Within the race the circuit is the late one, not the direct ones.
        assert!(links.outlived(peer, id(3), t0 + Duration::from_secs(1)).is_empty());
    }

    #[test]
    fn a_circuit_we_dialled_or_a_direct_connection_outlives_nothing() {
        let (peer, t0) = (PeerId::random(), Instant::now());
        let late = t0 + PUNCH_RACE + Duration::from_secs(1);
        let mut links = Links::default();
        links.opened(peer, id(1), link(false, true, t0));
        links.opened(peer, id(2), link(true, true, late));
        links.opened(peer, id(3), link(false, false, late));
        assert!(links.outlived(peer, id(2), late).is_empty());
        assert!(links.outlived(peer, id(3), late).is_empty());
        assert!(links.outlived(peer, id(9), late).is_empty());
    }

    #[test]
    fn a_circuit_with_no_direct_connection_is_never_late() {
        let (peer, t0) = (PeerId::random(), Instant::now());
        let mut links = Links::default();
        links.opened(peer, id(1), link(true, true, t0));
        assert!(!links.late_circuit(peer, id(1), t0));
        assert!(!links.reached_directly(peer));
    }

    #[test]
    fn crossed_circuits_keep_the_one_the_smaller_peer_dialled_at_both_ends() {
        let (small, big) = ordered();
        let t0 = Instant::now();
        // At the smaller end: it dialled id 1; the bigger end's dial is id 2.
        let mut at_small = Links::default();
        at_small.opened(big, id(1), link(true, true, t0));
        at_small.opened(big, id(2), link(true, false, t0));
        assert_eq!(at_small.crossed(small, big), vec![id(2)]);
        // At the bigger end the same two connections, seen from the other side.
        let mut at_big = Links::default();
        at_big.opened(small, id(7), link(true, false, t0));
        at_big.opened(small, id(8), link(true, true, t0));
        assert_eq!(at_big.crossed(big, small), vec![id(8)]);
    }

    #[test]
    fn a_lone_circuit_is_not_crossed() {
        let (small, big) = ordered();
        let t0 = Instant::now();
        // Only the bigger peer's dial has landed at the smaller end: the one
        // to keep has not opened, so nothing is closed yet.
        let mut links = Links::default();
        links.opened(big, id(1), link(true, false, t0));
        assert!(links.crossed(small, big).is_empty());
        let mut theirs = Links::default();
        theirs.opened(small, id(1), link(true, true, t0));
        assert!(theirs.crossed(big, small).is_empty());
    }

    #[test]
    fn closing_the_last_connection_forgets_the_peer() {
        let (peer, t0) = (PeerId::random(), Instant::now());
        let mut links = Links::default();
        links.opened(peer, id(1), link(true, true, t0));
        links.closed(peer, id(1));
        assert!(links.of(peer).is_empty());
        assert!(links.by_peer.is_empty());
        links.closed(peer, id(1));
    }
}

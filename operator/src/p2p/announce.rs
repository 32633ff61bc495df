//! Which addresses a member tells the pool it can be reached at. Behind a
//! LoadBalancer, a NodePort or a NAT's forwarded port, the addresses the
//! operator listens on (a pod's IP, loopback) mean nothing outside its own
//! network: peers that learned them would dial addresses that lead nowhere,
//! or to someone else. Configured announce addresses replace them.

use libp2p::multiaddr::Protocol;
use libp2p::{Multiaddr, PeerId};

/// The announce addresses when there are any; else every listen address,
/// which is right where members share one network (loopback tests, a flat
/// private network). Addresses through a relay (`reachable_anywhere`) are
/// told either way: the relay is what makes them reachable.
pub fn advertised<'a>(
    announce: &[Multiaddr],
    listening: impl IntoIterator<Item = &'a Multiaddr>,
    reachable_anywhere: impl Fn(&Multiaddr) -> bool,
) -> Vec<Multiaddr> {
    if announce.is_empty() {
        listening.into_iter().cloned().collect()
    } else {
        let mut out = announce.to_vec();
        out.extend(listening.into_iter().filter(|a| reachable_anywhere(a)).cloned());
        out
    }
}

/// `addr` ending in `/p2p/<peer>`, as members dial it. An address through a
/// relay ends so already (`.../p2p-circuit/p2p/<peer>`), and one twice so
/// names no peer at all.
pub fn with_peer(addr: &Multiaddr, peer: PeerId) -> Multiaddr {
    match addr.iter().last() {
        Some(Protocol::P2p(p)) if p == peer => addr.clone(),
        _ => addr.clone().with(Protocol::P2p(peer)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addrs(list: &[&str]) -> Vec<Multiaddr> {
        list.iter().map(|a| a.parse().unwrap()).collect()
    }

    #[test]
    fn announced_addresses_replace_the_listen_addresses() {
        let listening = addrs(&["/ip4/10.42.0.7/tcp/4001", "/ip4/127.0.0.1/tcp/4001"]);
        let announce = addrs(&["/dns4/pool.dc1.example.org/tcp/4001"]);
        assert_eq!(advertised(&announce, &listening, |_| false), announce);
    }

    #[test]
    fn addresses_through_a_relay_are_told_beside_the_announced_ones() {
        let circuit = "/ip4/203.0.113.9/tcp/4001/p2p/12D3KooWDpJ7As7BWAwRMfu1VU2WCqNjvq387JEYKDBj4kx6nXTN/p2p-circuit";
        let listening = addrs(&["/ip4/10.42.0.7/tcp/4001", circuit]);
        let announce = addrs(&["/dns4/pool.dc1.example.org/tcp/4001"]);
        let relayed = |a: &Multiaddr| a.to_string().contains("p2p-circuit");
        assert_eq!(
            advertised(&announce, &listening, relayed),
            addrs(&["/dns4/pool.dc1.example.org/tcp/4001", circuit])
        );
        assert_eq!(advertised(&[], &listening, relayed), listening);
    }

    #[test]
    fn an_address_names_its_peer_once() {
        let peer: PeerId = "12D3KooWLpR72Ectc8gy5wMdnrgd3ddxGxJhuuNcReJdxct584h8".parse().unwrap();
        let relay = "/ip4/127.0.0.1/tcp/4001/p2p/12D3KooWDpJ7As7BWAwRMfu1VU2WCqNjvq387JEYKDBj4kx6nXTN/p2p-circuit";
        let direct = addrs(&["/ip4/127.0.0.1/tcp/4001"]).remove(0);
        assert_eq!(
            with_peer(&direct, peer).to_string(),
            format!("/ip4/127.0.0.1/tcp/4001/p2p/{peer}")
        );
        let through = addrs(&[&format!("{relay}/p2p/{peer}")]).remove(0);
        assert_eq!(with_peer(&through, peer), through);
        let bare = addrs(&[relay]).remove(0);
        assert_eq!(with_peer(&bare, peer), through);
    }

    #[test]
    fn without_announce_members_hear_the_listen_addresses() {
        let listening = addrs(&["/ip4/127.0.0.1/tcp/4001", "/ip4/127.0.0.1/udp/4001/quic-v1"]);
        assert_eq!(advertised(&[], &listening, |_| false), listening);
    }
}

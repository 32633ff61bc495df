//! Which addresses a member tells the pool it can be reached at. Behind a
//! LoadBalancer, a NodePort or a NAT's forwarded port, the addresses the
//! operator listens on (a pod's IP, loopback) mean nothing outside its own
//! network: peers that learned them would dial addresses that lead nowhere,
//! or to someone else. Configured announce addresses replace them.

use libp2p::Multiaddr;

/// The announce addresses when there are any; else every listen address,
/// which is right where members share one network (loopback tests, a flat
/// private network).
pub fn advertised<'a>(announce: &[Multiaddr], listening: impl IntoIterator<Item = &'a Multiaddr>) -> Vec<Multiaddr> {
    if announce.is_empty() {
        listening.into_iter().cloned().collect()
    } else {
        announce.to_vec()
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
        assert_eq!(advertised(&announce, &listening), announce);
    }

    #[test]
    fn without_announce_members_hear_the_listen_addresses() {
        let listening = addrs(&["/ip4/127.0.0.1/tcp/4001", "/ip4/127.0.0.1/udp/4001/quic-v1"]);
        assert_eq!(advertised(&[], &listening), listening);
    }
}

//! Hole punching through real NATs (see `gpupool_e2e::nat`): a relay on a
//! public network and two members, each behind its own router that
//! masquerades and drops whatever arrives unasked. The members can reach the
//! relay and nothing else; each listens through the relay; DCUtR must turn
//! the relayed connection between them into a direct one through both NATs.
//!
//! Needs no test environment, but root (network namespaces, veth) and `nft`
//! (`.ci/run` installs nftables where it is missing). Without them the test
//! fails and says so: it is not skipped.

use std::time::Duration;

use gpupool_e2e::nat::{
    A_PUBLIC, B_LAN, B_PUBLIC, Member, Nat, Nets, Transport, behind_nat_as, direct_only, listening_through_relay, relay,
};
use gpupool_operator::p2p::links::PUNCH_RACE;
use gpupool_operator::p2p::resend::resent_on_close;
use gpupool_operator::p2p::swarm::{HolePunch, Inbound, P2p, PingTimes, is_circuit};
use libp2p::identity::Keypair;
use libp2p::multiaddr::Protocol;
use libp2p::{Multiaddr, PeerId};

const LIMIT: Duration = Duration::from_secs(30);
const PORT: u16 = 4001;
const STEP: Duration = Duration::from_millis(50);

async fn punch_outcome(m: &mut Member) -> Option<HolePunch> {
    tokio::time::timeout(LIMIT, async {
        loop {
            match m.inbound.recv().await {
                Some(Inbound::HolePunch { outcome, .. }) => return Some(outcome),
                Some(_) => {}
                None => return None,
            }
        }
    })
    .await
    .ok()
    .flatten()
}

/// Whether a hole punch succeeds, past any attempt that failed.
async fn punched(m: &mut Member) -> bool {
    tokio::time::timeout(LIMIT, async {
        while let Some(outcome) = punch_outcome(m).await {
            if outcome == HolePunch::Direct {
                return true;
            }
        }
        false
    })
    .await
    .unwrap_or(false)
}

fn ip_of(addr: &Multiaddr) -> Option<String> {
    addr.iter().find_map(|p| match p {
        Protocol::Ip4(ip) => Some(ip.to_string()),
        _ => None,
    })
}

fn port_of(addr: &Multiaddr) -> Option<u16> {
    addr.iter().find_map(|p| match p {
        Protocol::Tcp(port) | Protocol::Udp(port) => Some(port),
        _ => None,
    })
}

/// The relay, and members a and b behind their NATs, each listening
/// through the relay. Held to the test's end: dropped, they stop.
struct Pool {
    nets: Nets,
    relay: Member,
    relay_addr: Multiaddr,
    a: Member,
    b: Member,
    /// b's identity, for starting b again.
    b_key: Keypair,
}

async fn pool(t: Transport, nat: Nat, tag: &str) -> Pool {
    pool_pinging(t, nat, tag, PingTimes::default()).await
}

async fn pool_pinging(t: Transport, nat: Nat, tag: &str, ping: PingTimes) -> Pool {
    // RUST_LOG=gpupool_operator=debug,libp2p_dcutr=debug shows the punch.
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
    let nets = Nets::build(tag, nat).expect("the namespaces and NATs");
    let (relay, relay_addr) = relay(&nets, t, PORT).expect("the relay starts");
    let b_key = Keypair::generate_ed25519();
    let a = behind_nat_as(&nets, "a", Keypair::generate_ed25519(), t, PORT, &relay_addr, ping).expect("a starts");
    let b = behind_nat_as(&nets, "b", b_key.clone(), t, PORT, &relay_addr, ping).expect("b starts");
    assert!(listening_through_relay(&a, LIMIT).await, "a listens through the relay");
    assert!(listening_through_relay(&b, LIMIT).await, "b listens through the relay");
    // The NATs are real: nothing from outside gets to b unasked, at its
    // private address or at its NAT's.
    for to in [B_PUBLIC, B_LAN] {
        let to = format!("{to}:{PORT}").parse().expect("a socket address");
        assert!(
            !nets.dialable_from_public(to).expect("the probe runs"),
            "{to} is not reachable unasked"
        );
    }
    Pool {
        nets,
        relay,
        relay_addr,
        a,
        b,
        b_key,
    }
}

/// `m`'s address through the relay.
async fn circuit_of(m: &Member) -> Multiaddr {
    m.p2p
        .info()
        .await
        .listen
        .into_iter()
        .find(is_circuit)
        .expect("a circuit address")
}

/// a's connections to b once it holds none, or what it still holds after
/// [`LIMIT`].
async fn let_go(a: &Member, b: PeerId) -> Vec<gpupool_operator::p2p::swarm::Link> {
    let mut links = a.p2p.links(b).await;
    let _ = tokio::time::timeout(LIMIT, async {
        while !links.is_empty() {
            tokio::time::sleep(STEP).await;
            links = a.p2p.links(b).await;
        }
    })
    .await;
    links
}

/// a finds b (the relay's DHT knows b's circuit) and sends to it: the first
/// connection is relayed, and over it both ends try to punch.
async fn a_reaches_b(p: &Pool) {
    let b_id = p.b.p2p.local_peer_id();
    let sent = tokio::time::timeout(LIMIT, async {
        while p.a.p2p.send(b_id, b"bid".to_vec()).await.is_err() {
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
    })
    .await;
    assert!(sent.is_ok(), "a reaches b through the relay");
}

/// TCP: both ends dial from the port they listen on and the SYNs cross
/// (simultaneous open).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn members_behind_two_nats_punch_a_direct_tcp_connection() {
    punches(Transport::Tcp, "t").await;
}

/// QUIC: one end dials, the other sprays UDP packets from its one socket,
/// which opens its NAT's mapping to the dialler.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn members_behind_two_nats_punch_a_direct_quic_connection() {
    punches(Transport::Quic, "q").await;
}

async fn punches(t: Transport, tag: &str) {
    let mut p = pool(t, Nat::KeepsPorts, tag).await;
    a_reaches_b(&p).await;
    // Where both ends dialled each other through the relay, each relayed
    // connection gets its own attempt, and TCP's two attempts use the same
    // ports: one may fail while the other succeeds.
    assert!(punched(&mut p.a).await, "a's hole punch succeeds");
    assert!(punched(&mut p.b).await, "b's hole punch succeeds");

    let (a_id, b_id) = (p.a.p2p.local_peer_id(), p.b.p2p.local_peer_id());
    let links = direct_only(&p.a, b_id, LIMIT, STEP)
        .await
        .expect("a's relayed connection to b is closed and a direct one remains");
    assert!(
        links.iter().all(|l| ip_of(&l.remote).as_deref() == Some(B_PUBLIC)),
        "a reaches b at b's NAT's public address: {links:?}"
    );
    let back = direct_only(&p.b, a_id, LIMIT, STEP)
        .await
        .expect("b's relayed connections to a are closed and a direct one remains");
    assert!(
        back.iter().all(|l| ip_of(&l.remote).as_deref() == Some(A_PUBLIC)),
        "b reaches a at a's NAT's public address: {back:?}"
    );
    // Both ways over the punched connection alone.
    p.a.p2p.send(b_id, b"lease offer".to_vec()).await.expect("a → b direct");
    p.b.p2p.send(a_id, b"status".to_vec()).await.expect("b → a direct");
    assert!(
        direct_only(&p.a, b_id, LIMIT, STEP).await.is_some(),
        "still direct after traffic"
    );
}

/// A burst each way across the punch: a and b, each told the other's
/// circuit, send at once, so their first messages dial through the relay
/// (often both ways, crossed) and the punch and the closing of the relayed
/// connections happen under the rest. None may be lost, and together the
/// bursts are more than a TCP connection's 512 yamux streams: before each
/// member kept a window of messages per peer, yamux ended the punched
/// connection and every message on it failed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_of_messages_each_way_across_the_punch_all_arrive() {
    for (t, tag) in [(Transport::Tcp, "ft"), (Transport::Quic, "fq")] {
        let mut p = pool(t, Nat::KeepsPorts, tag).await;
        let (a_id, b_id) = (p.a.p2p.local_peer_id(), p.b.p2p.local_peer_id());
        for (from, to, to_id) in [(&p.a, &p.b, b_id), (&p.b, &p.a, a_id)] {
            from.p2p.add_peer(to_id, circuit_of(to).await).await;
        }
        let batch = |from: &P2p, to, side: &str| {
            (0..IN_FLIGHT)
                .map(|i| {
                    let (from, body) = (from.clone(), format!("{side}:{i}").into_bytes());
                    // As the market sends every direct message: again
                    // while a connection closes under it. Both ends dial
                    // at once here, so a message can meet the crossed
                    // circuit's close and then the punch's (seen in CI:
                    // the whole TCP burst failed at once, and again with
                    // a single resend).
                    async move { resent_on_close(|| from.send(to, body.clone())).await }
                })
                .collect::<Vec<_>>()
        };
        let (from_a, from_b) = tokio::join!(
            futures::future::join_all(batch(&p.a.p2p, b_id, "a")),
            futures::future::join_all(batch(&p.b.p2p, a_id, "b")),
        );
        let failed: Vec<_> = from_a.iter().chain(&from_b).filter_map(|r| r.as_ref().err()).collect();
        assert!(
            failed.is_empty(),
            "{t:?}: every send in flight across the punch is taken: {failed:?}"
        );
        assert!(
            direct_only(&p.a, b_id, LIMIT, STEP).await.is_some(),
            "{t:?}: the punch succeeded and the relayed connection is gone"
        );
        for (m, side) in [(&mut p.b, "a"), (&mut p.a, "b")] {
            let got = received(m, side).await;
            assert_eq!(got.len(), IN_FLIGHT, "{t:?}: every message from {side} arrived");
        }
    }
}

/// Messages sent in each direction by `a_burst_of_messages_...`.
const IN_FLIGHT: usize = 300;

/// The distinct messages from `side` that `m` received, waiting up to
/// [`LIMIT`] for all [`IN_FLIGHT`] of them.
async fn received(m: &mut Member, side: &str) -> std::collections::HashSet<Vec<u8>> {
    let mut got = std::collections::HashSet::new();
    let _ = tokio::time::timeout(LIMIT, async {
        while got.len() < IN_FLIGHT {
            match m.inbound.recv().await {
                Some(Inbound::Direct { bytes, .. }) if bytes.starts_with(format!("{side}:").as_bytes()) => {
                    got.insert(bytes);
                }
                Some(_) => {}
                None => return,
            }
        }
    })
    .await;
    got
}

/// Behind NATs that give every flow a new port, the punch fails and says so
/// (the event its metric counts), and the members go on talking through the
/// relay.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn members_behind_nats_that_change_ports_stay_on_the_relay() {
    let mut p = pool(Transport::Quic, Nat::NewPortPerFlow, "s").await;
    a_reaches_b(&p).await;
    // Only the end that took the relayed connection counts its attempts and
    // reports giving up: b for a's dial, a where b dialled first.
    let outcome = tokio::select! {
        o = punch_outcome(&mut p.a) => o,
        o = punch_outcome(&mut p.b) => o,
    };
    assert_eq!(outcome, Some(HolePunch::Failed), "the hole punch");
    let (a_id, b_id) = (p.a.p2p.local_peer_id(), p.b.p2p.local_peer_id());
    let links = p.a.p2p.links(b_id).await;
    assert!(
        !links.is_empty() && links.iter().all(|l| l.relayed),
        "a reaches b only through the relay: {links:?}"
    );
    p.a.p2p
        .send(b_id, b"lease offer".to_vec())
        .await
        .expect("a → b relayed");
    p.b.p2p.send(a_id, b"status".to_vec()).await.expect("b → a relayed");
}

/// b is punched through to a, then its host goes silent and b starts again
/// behind its NAT, with its identity, on another port (a new pod). The new
/// b finds a (the relay's DHT) and dials it through the relay while a's
/// direct connection to the old b still looks alive (a TCP connection until
/// a ping fails, a QUIC one until its idle timeout). a keeps that circuit,
/// since it is all the new b can reach it by, and closes the dead
/// connection, on which every other message would have waited out its
/// timeout. Then the two punch again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_that_starts_again_behind_its_nat_is_reached_at_once() {
    for (t, tag) in [(Transport::Tcp, "rt"), (Transport::Quic, "rq")] {
        let mut p = pool(t, Nat::KeepsPorts, tag).await;
        a_reaches_b(&p).await;
        assert!(punched(&mut p.a).await, "{t:?}: a's hole punch succeeds");
        let (a_id, b_id) = (p.a.p2p.local_peer_id(), p.b.p2p.local_peer_id());
        let old = direct_only(&p.a, b_id, LIMIT, STEP)
            .await
            .expect("a reaches b directly");
        assert!(old.iter().all(|l| port_of(&l.remote) == Some(PORT)), "{old:?}");
        // Past the punch's race: a circuit from b now is not one of its.
        tokio::time::sleep(PUNCH_RACE + Duration::from_secs(1)).await;

        p.nets.silence("b", PORT).expect("b's host goes silent");
        let again = behind_nat_as(
            &p.nets,
            "b",
            p.b_key.clone(),
            t,
            PORT + 1,
            &p.relay_addr,
            PingTimes::default(),
        )
        .expect("b starts again");
        drop(std::mem::replace(&mut p.b, again));
        assert!(
            listening_through_relay(&p.b, LIMIT).await,
            "{t:?}: the new b listens through the relay"
        );
        // One connection to the relay: it allows a member 4, and the old b's
        // silent ones count until they time out there. Before the bootstrap,
        // relay and DHT dials were coalesced, each member opened 3 or 4, and
        // the new b was refused until the old ones timed out (QUIC: ~13 s).
        let to_relay = p.b.p2p.links(p.relay.p2p.local_peer_id()).await;
        assert_eq!(
            to_relay.len(),
            1,
            "{t:?}: the new b's connections to the relay: {to_relay:?}"
        );
        p.b.p2p.add_peer(a_id, circuit_of(&p.a).await).await;
        // At once, as the market sends: again if the punch that the
        // circuit starts closes it under the first copy (seen in CI).
        let b = &p.b.p2p;
        resent_on_close(move || b.send(a_id, b"back again".to_vec()))
            .await
            .expect("the new b reaches a through the relay at once");
        // Sent at once while a and the new b punch again: the punch closes
        // the circuit under some of them, which are sent again, as the
        // market sends every direct message (`resent_on_close`).
        let a = &p.a.p2p;
        let sends = (0..20).map(|i| {
            let body = format!("to the new b {i}").into_bytes();
            resent_on_close(move || a.send(b_id, body.clone()))
        });
        let failed: Vec<_> = futures::future::join_all(sends)
            .await
            .into_iter()
            .filter_map(Result::err)
            .collect();
        assert!(
            failed.is_empty(),
            "{t:?}: every message from a reaches the new b: {failed:?}"
        );
        // Once a reaches the new b directly, nothing is left of the old one:
        // its connection was closed when the new b dialled through the
        // relay, not when pings (about a minute) or QUIC's idle timeout
        // (10 s) gave up.
        let links = direct_only(&p.a, b_id, LIMIT, STEP)
            .await
            .expect("a and the new b punch again and the relay carries nothing");
        assert!(
            links.iter().all(|l| port_of(&l.remote) == Some(PORT + 1)),
            "{t:?}: a holds no connection to the old b: {links:?}"
        );
    }
}

/// b's host goes silent for good, with no FIN or RST: over TCP a would hold
/// the connection for as long as the kernel retries (many minutes) and keep
/// sending on it. Two pings in a row that go unanswered close it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_that_vanishes_without_a_word_is_let_go() {
    let quick = PingTimes {
        interval: Duration::from_secs(1),
        timeout: Duration::from_secs(2),
    };
    let mut p = pool_pinging(Transport::Tcp, Nat::KeepsPorts, "v", quick).await;
    a_reaches_b(&p).await;
    assert!(punched(&mut p.a).await, "a's hole punch succeeds");
    let b_id = p.b.p2p.local_peer_id();
    direct_only(&p.a, b_id, LIMIT, STEP)
        .await
        .expect("a reaches b directly");
    p.nets.silence("b", PORT).expect("b's host goes silent");
    let left = let_go(&p.a, b_id).await;
    assert!(left.is_empty(), "a closes its connections to the silent b: {left:?}");
}

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
    A_PUBLIC, B_LAN, B_PUBLIC, Member, Nat, Nets, Transport, behind_nat, direct_only, listening_through_relay, relay,
};
use gpupool_operator::p2p::swarm::{HolePunch, Inbound, P2p, is_circuit};
use libp2p::Multiaddr;
use libp2p::multiaddr::Protocol;

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

/// The relay, and members a and b behind their NATs, each listening
/// through the relay. Held to the test's end: dropped, they stop.
struct Pool {
    _nets: Nets,
    _relay: Member,
    a: Member,
    b: Member,
}

async fn pool(t: Transport, nat: Nat, tag: &str) -> Pool {
    // RUST_LOG=gpupool_operator=debug,libp2p_dcutr=debug shows the punch.
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
    let nets = Nets::build(tag, nat).expect("the namespaces and NATs");
    let (relay, relay_addr) = relay(&nets, t, PORT).expect("the relay starts");
    let a = behind_nat(&nets, "a", t, PORT, &relay_addr).expect("a starts");
    let b = behind_nat(&nets, "b", t, PORT, &relay_addr).expect("b starts");
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
        _nets: nets,
        _relay: relay,
        a,
        b,
    }
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
            let circuit = to.p2p.info().await.listen.into_iter().find(is_circuit);
            from.p2p.add_peer(to_id, circuit.expect("a circuit address")).await;
        }
        let batch = |from: &P2p, to, side: &str| {
            (0..IN_FLIGHT)
                .map(|i| {
                    let (from, body) = (from.clone(), format!("{side}:{i}").into_bytes());
                    async move { from.send(to, body).await }
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

//! Hole punching through real NATs. Five network namespaces: a public
//! network with the relay, and two members each behind its own router that
//! masquerades (Linux conntrack, nftables) and drops whatever arrives
//! unasked, as a home or office NAT does. The members can reach the relay
//! and nothing else; each listens through the relay; DCUtR must turn the
//! relayed connection between them into a direct one through both NATs.
//!
//! Needs no test environment, but root (network namespaces, veth) and `nft`
//! (`.ci/run` installs nftables where it is missing). Without them the test
//! fails and says so: it is not skipped.

use std::net::{SocketAddr, TcpStream};
use std::os::fd::AsRawFd;
use std::process::Command;
use std::time::Duration;

use gpupool_operator::p2p::swarm::{self, HolePunch, Inbound, Link, P2p, RelayService, SwarmConfig};
use libp2p::identity::Keypair;
use libp2p::multiaddr::Protocol;
use libp2p::{Multiaddr, PeerId};
use tokio::sync::{mpsc, oneshot};

const PUBLIC_RELAY: &str = "10.99.0.1";
const LIMIT: Duration = Duration::from_secs(30);

/// How the routers map a member's ports.
#[derive(Clone, Copy)]
enum Nat {
    /// A port keeps its public port whatever it sends to (endpoint-
    /// independent mapping), as most home and office NATs and Linux's own
    /// masquerade do: hole punching works.
    KeepsPorts,
    /// Each flow gets a random public port (a "symmetric" NAT; masquerade
    /// with fully-random, as some CNIs set it): the port a peer observed is
    /// useless to anyone else, and hole punching cannot work.
    NewPortPerFlow,
}

/// The namespaces, deleted (with their links) when dropped.
struct Nets {
    prefix: String,
}

/// Runs `cmd`, failing the test with what it printed.
fn sh(cmd: &str) {
    let out = Command::new("sh").arg("-c").arg(cmd).output().expect("sh runs");
    assert!(
        out.status.success(),
        "`{cmd}` failed: {}{}\nthis test needs root (network namespaces, veth) and nft (apt-get install nftables)",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

impl Nets {
    fn ns(&self, name: &str) -> String {
        format!("{}-{name}", self.prefix)
    }

    /// pub: 10.99.0.0/24 on a bridge, the relay at .1; nat-a (.2) and nat-b
    /// (.3) route 192.168.10.0/24 and 192.168.20.0/24 for members a and b.
    fn build(tag: &str, nat: Nat) -> Nets {
        let nets = Nets {
            prefix: format!("gph{}{tag}", std::process::id()),
        };
        let p = nets.ns("pub");
        sh(&format!("ip netns add {p}"));
        sh(&format!(
            "ip -n {p} link set lo up && ip -n {p} link add br0 type bridge && \
             ip -n {p} addr add {PUBLIC_RELAY}/24 dev br0 && ip -n {p} link set br0 up"
        ));
        let kind = nat;
        for (side, wan, lan) in [("a", "10.99.0.2", "192.168.10"), ("b", "10.99.0.3", "192.168.20")] {
            let (nat, host) = (nets.ns(&format!("nat{side}")), nets.ns(side));
            sh(&format!("ip netns add {nat} && ip netns add {host}"));
            sh(&format!(
                "ip -n {nat} link add wan type veth peer name port{side} netns {p} && \
                 ip -n {p} link set port{side} master br0 up && \
                 ip -n {nat} addr add {wan}/24 dev wan && ip -n {nat} link set wan up && \
                 ip -n {nat} link add lan type veth peer name eth0 netns {host} && \
                 ip -n {nat} addr add {lan}.1/24 dev lan && ip -n {nat} link set lan up && \
                 ip -n {host} addr add {lan}.2/24 dev eth0 && ip -n {host} link set eth0 up && \
                 ip -n {host} link set lo up && ip -n {host} route add default via {lan}.1 && \
                 ip netns exec {nat} sysctl -q -w net.ipv4.ip_forward=1"
            ));
            // Masquerade out of the WAN; drop every new flow into it: only
            // answers to what the member sent get in.
            let masquerade = match kind {
                Nat::KeepsPorts => "masquerade",
                Nat::NewPortPerFlow => "masquerade fully-random",
            };
            sh(&format!(
                "ip netns exec {nat} nft -f - <<'NFT'\n\
                 table ip nat {{ chain post {{ type nat hook postrouting priority srcnat; oifname \"wan\" {masquerade}; }}; }}\n\
                 table inet filter {{\n\
                   chain input {{ type filter hook input priority 0; iifname \"wan\" ct state new drop; }};\n\
                   chain forward {{ type filter hook forward priority 0; iifname \"wan\" ct state new drop; }};\n\
                 }}\n\
                 NFT"
            ));
        }
        nets
    }
}

impl Drop for Nets {
    fn drop(&mut self) {
        for n in ["a", "b", "nata", "natb", "pub"] {
            let _ = Command::new("ip").args(["netns", "del", &self.ns(n)]).status();
        }
    }
}

/// Moves this thread into namespace `ns`: every socket it (and any thread
/// it starts) opens from now on lives there.
fn enter(ns: &str) {
    let f = std::fs::File::open(format!("/var/run/netns/{ns}")).expect("the namespace exists");
    // SAFETY: setns on a namespace file descriptor we hold open; it changes
    // only this thread's network namespace.
    let rc = unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) };
    assert_eq!(rc, 0, "setns into {ns}: {}", std::io::Error::last_os_error());
}

/// A swarm running on its own thread inside a namespace. Dropping it stops
/// the thread's runtime, and with it the swarm.
struct Member {
    p2p: P2p,
    inbound: mpsc::Receiver<Inbound>,
    _stop: oneshot::Sender<()>,
}

fn member_in(ns: String, cfg: SwarmConfig) -> Member {
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let (stop, stopped) = oneshot::channel::<()>();
    std::thread::spawn(move || {
        enter(&ns);
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("a runtime");
        rt.block_on(async move {
            let started = swarm::start(Keypair::generate_ed25519(), cfg).await;
            let ok = started.is_ok();
            let _ = ready_tx.send(started);
            if ok {
                let _ = stopped.await;
            }
        });
    });
    let (p2p, inbound) = ready_rx
        .recv_timeout(LIMIT)
        .expect("the swarm starts")
        .expect("the swarm listens");
    Member {
        p2p,
        inbound,
        _stop: stop,
    }
}

#[derive(Clone, Copy)]
enum Transport {
    Tcp,
    Quic,
}

fn at(t: Transport, ip: &str) -> Multiaddr {
    match t {
        Transport::Tcp => format!("/ip4/{ip}/tcp/4001"),
        Transport::Quic => format!("/ip4/{ip}/udp/4001/quic-v1"),
    }
    .parse()
    .expect("an address")
}

async fn listening_through_relay(m: &Member) -> bool {
    tokio::time::timeout(LIMIT, async {
        while !m.p2p.info().await.listen.iter().any(swarm::is_circuit) {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await
    .is_ok()
}

/// The links from `m` to `peer` once none is relayed any more.
async fn direct_only(m: &Member, peer: PeerId) -> Option<Vec<Link>> {
    tokio::time::timeout(LIMIT, async {
        loop {
            let links = m.p2p.links(peer).await;
            if !links.is_empty() && links.iter().all(|l| !l.relayed) {
                return links;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await
    .ok()
}

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

/// Whether a fresh TCP connection from the public network reaches `to`.
fn dialable_from_public(nets: &Nets, to: SocketAddr) -> bool {
    let ns = nets.ns("pub");
    std::thread::spawn(move || {
        enter(&ns);
        TcpStream::connect_timeout(&to, Duration::from_secs(2)).is_ok()
    })
    .join()
    .expect("the probe thread")
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
    let nets = Nets::build(tag, nat);
    let relay = member_in(
        nets.ns("pub"),
        SwarmConfig {
            listen: vec![at(t, PUBLIC_RELAY)],
            relay_service: Some(RelayService::default()),
            ..Default::default()
        },
    );
    let relay_addr = at(t, PUBLIC_RELAY).with(Protocol::P2p(relay.p2p.local_peer_id()));
    let behind_nat = |ns: String, lan_ip: &str| {
        member_in(
            ns,
            SwarmConfig {
                listen: vec![at(t, lan_ip), relay_addr.clone().with(Protocol::P2pCircuit)],
                bootstrap: vec![relay_addr.clone()],
                ..Default::default()
            },
        )
    };
    let a = behind_nat(nets.ns("a"), "192.168.10.2");
    let b = behind_nat(nets.ns("b"), "192.168.20.2");
    assert!(listening_through_relay(&a).await, "a listens through the relay");
    assert!(listening_through_relay(&b).await, "b listens through the relay");
    // The NATs are real: nothing from outside gets to b unasked, at its
    // private address or at its NAT's.
    assert!(!dialable_from_public(&nets, "10.99.0.3:4001".parse().expect("addr")));
    assert!(!dialable_from_public(&nets, "192.168.20.2:4001".parse().expect("addr")));
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
    let links = direct_only(&p.a, b_id)
        .await
        .expect("a's relayed connection to b is closed and a direct one remains");
    assert!(
        links.iter().all(|l| ip_of(&l.remote).as_deref() == Some("10.99.0.3")),
        "a reaches b at b's NAT's public address: {links:?}"
    );
    let back = direct_only(&p.b, a_id)
        .await
        .expect("b's relayed connections to a are closed and a direct one remains");
    assert!(
        back.iter().all(|l| ip_of(&l.remote).as_deref() == Some("10.99.0.2")),
        "b reaches a at a's NAT's public address: {back:?}"
    );
    // Both ways over the punched connection alone.
    p.a.p2p.send(b_id, b"lease offer".to_vec()).await.expect("a → b direct");
    p.b.p2p.send(a_id, b"status".to_vec()).await.expect("b → a direct");
    assert!(direct_only(&p.a, b_id).await.is_some(), "still direct after traffic");
}

/// Behind NATs that give every flow a new port, the punch fails, says so in
/// its metric, and the members go on talking through the relay.
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

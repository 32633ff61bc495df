//! Real NATs on one machine, for the hole-punching test and benchmark. Five
//! network namespaces: a public network (10.99.0.0/24 on a bridge, where the
//! relay sits at .1) and two members, a and b, each behind its own router
//! (a at 192.168.10.2 behind 10.99.0.2, b at 192.168.20.2 behind 10.99.0.3)
//! that masquerades (Linux conntrack, nftables) and drops whatever arrives
//! unasked, as a home or office NAT does. Each swarm runs on a thread moved
//! into its namespace, so every socket it opens lives there.
//!
//! Needs root (network namespaces, veth) and `nft` (`.ci/run` installs
//! nftables where it is missing); without them, building fails and says so.

use std::net::{SocketAddr, TcpStream};
use std::os::fd::AsRawFd;
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, bail};
use gpupool_operator::p2p::swarm::{self, Inbound, Link, P2p, PingTimes, SwarmConfig};
use libp2p::identity::Keypair;
use libp2p::{Multiaddr, PeerId};
use tokio::sync::{mpsc, oneshot};

pub const PUBLIC_RELAY: &str = "10.99.0.1";
pub const A_LAN: &str = "192.168.10.2";
pub const B_LAN: &str = "192.168.20.2";
/// Where a's and b's routers meet the public network: their NATs' addresses.
pub const A_PUBLIC: &str = "10.99.0.2";
pub const B_PUBLIC: &str = "10.99.0.3";

/// How the routers map a member's ports.
#[derive(Clone, Copy, Debug)]
pub enum Nat {
    /// A port keeps its public port whatever it sends to (endpoint-
    /// independent mapping), as most home and office NATs and Linux's own
    /// masquerade do: hole punching works.
    KeepsPorts,
    /// Each flow gets a random public port (a "symmetric" NAT; masquerade
    /// with fully-random, as some CNIs set it): the port a peer observed is
    /// useless to anyone else, and hole punching cannot work.
    NewPortPerFlow,
}

#[derive(Clone, Copy, Debug)]
pub enum Transport {
    Tcp,
    Quic,
}

/// `ip`'s address on `port` over `t`.
pub fn at(t: Transport, ip: &str, port: u16) -> anyhow::Result<Multiaddr> {
    let a = match t {
        Transport::Tcp => format!("/ip4/{ip}/tcp/{port}"),
        Transport::Quic => format!("/ip4/{ip}/udp/{port}/quic-v1"),
    };
    a.parse().with_context(|| format!("address {a}"))
}

/// The namespaces, deleted (with their links) when dropped.
pub struct Nets {
    prefix: String,
}

fn sh(cmd: &str) -> anyhow::Result<()> {
    let out = Command::new("sh").arg("-c").arg(cmd).output().context("running sh")?;
    if !out.status.success() {
        bail!(
            "`{cmd}` failed: {}{}\nthis needs root (network namespaces, veth) and nft (apt-get install nftables)",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(())
}

impl Nets {
    /// Builds the five namespaces, named after this process and `tag` so
    /// that concurrent tests do not meet.
    pub fn build(tag: &str, nat: Nat) -> anyhow::Result<Nets> {
        // Made first, so a failure half-way still deletes what was built.
        let nets = Nets {
            prefix: format!("gph{}{tag}", std::process::id()),
        };
        let p = nets.ns("pub");
        sh(&format!("ip netns add {p}"))?;
        sh(&format!(
            "ip -n {p} link set lo up && ip -n {p} link add br0 type bridge && \
             ip -n {p} addr add {PUBLIC_RELAY}/24 dev br0 && ip -n {p} link set br0 up"
        ))?;
        let masquerade = match nat {
            Nat::KeepsPorts => "masquerade",
            Nat::NewPortPerFlow => "masquerade fully-random",
        };
        for (side, wan, lan) in [("a", A_PUBLIC, "192.168.10"), ("b", B_PUBLIC, "192.168.20")] {
            let (router, host) = (nets.ns(&format!("nat{side}")), nets.ns(side));
            sh(&format!("ip netns add {router} && ip netns add {host}"))?;
            sh(&format!(
                "ip -n {router} link add wan type veth peer name port{side} netns {p} && \
                 ip -n {p} link set port{side} master br0 up && \
                 ip -n {router} addr add {wan}/24 dev wan && ip -n {router} link set wan up && \
                 ip -n {router} link add lan type veth peer name eth0 netns {host} && \
                 ip -n {router} addr add {lan}.1/24 dev lan && ip -n {router} link set lan up && \
                 ip -n {host} addr add {lan}.2/24 dev eth0 && ip -n {host} link set eth0 up && \
                 ip -n {host} link set lo up && ip -n {host} route add default via {lan}.1 && \
                 ip netns exec {router} sysctl -q -w net.ipv4.ip_forward=1"
            ))?;
            // Masquerade out of the WAN; drop every new flow into it: only
            // answers to what the member sent get in.
            sh(&format!(
                "ip netns exec {router} nft -f - <<'NFT'\n\
                 table ip nat {{ chain post {{ type nat hook postrouting priority srcnat; oifname \"wan\" {masquerade}; }}; }}\n\
                 table inet filter {{\n\
                   chain input {{ type filter hook input priority 0; iifname \"wan\" ct state new drop; }};\n\
                   chain forward {{ type filter hook forward priority 0; iifname \"wan\" ct state new drop; }};\n\
                 }}\n\
                 NFT"
            ))?;
        }
        Ok(nets)
    }

    /// The namespace `pub`, `a`, `b`, `nata` or `natb`.
    pub fn ns(&self, name: &str) -> String {
        format!("{}-{name}", self.prefix)
    }

    /// Makes `port` on member `side`'s host go silent both ways, as when its
    /// pod is killed or its node loses power: nothing sent from it leaves
    /// (no FIN, no RST, no QUIC close), nothing sent to it arrives, and its
    /// peers hear nothing more.
    pub fn silence(&self, side: &str, port: u16) -> anyhow::Result<()> {
        let host = self.ns(side);
        sh(&format!(
            "ip netns exec {host} nft -f - <<'NFT'\n\
             table inet vanished {{\n\
               chain out {{ type filter hook output priority 0; tcp sport {port} drop; udp sport {port} drop; }};\n\
               chain in {{ type filter hook input priority 0; tcp dport {port} drop; udp dport {port} drop; }};\n\
             }}\n\
             NFT"
        ))
    }

    /// Whether a fresh TCP connection from the public network reaches `to`
    /// within 2 s.
    pub fn dialable_from_public(&self, to: SocketAddr) -> anyhow::Result<bool> {
        let ns = self.ns("pub");
        std::thread::spawn(move || -> anyhow::Result<bool> {
            enter(&ns)?;
            Ok(TcpStream::connect_timeout(&to, Duration::from_secs(2)).is_ok())
        })
        .join()
        .map_err(|_| anyhow::anyhow!("the probe thread panicked"))?
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
pub fn enter(ns: &str) -> anyhow::Result<()> {
    let f = std::fs::File::open(format!("/var/run/netns/{ns}")).with_context(|| format!("namespace {ns}"))?;
    // SAFETY: setns on a namespace file descriptor held open for the call;
    // it changes only this thread's network namespace.
    let rc = unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) };
    if rc != 0 {
        bail!("setns into {ns}: {}", std::io::Error::last_os_error());
    }
    Ok(())
}

/// A swarm running on its own thread inside a namespace. Dropping it stops
/// the thread's runtime, and with it the swarm.
pub struct Member {
    pub p2p: P2p,
    pub inbound: mpsc::Receiver<Inbound>,
    _stop: oneshot::Sender<()>,
}

/// Starts a swarm with identity `key` in namespace `ns`.
pub fn member_in(ns: String, key: Keypair, cfg: SwarmConfig) -> anyhow::Result<Member> {
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let (stop, stopped) = oneshot::channel::<()>();
    std::thread::spawn(move || {
        let rt = enter(&ns).and_then(|()| Ok(tokio::runtime::Builder::new_current_thread().enable_all().build()?));
        let rt = match rt {
            Ok(rt) => rt,
            Err(e) => {
                let _ = ready_tx.send(Err(e));
                return;
            }
        };
        rt.block_on(async move {
            match swarm::start(key, cfg).await {
                Ok(started) => {
                    let _ = ready_tx.send(Ok(started));
                    let _ = stopped.await;
                }
                Err(e) => {
                    let _ = ready_tx.send(Err(anyhow::Error::from(e)));
                }
            }
        });
    });
    let (p2p, inbound) = ready_rx
        .recv_timeout(Duration::from_secs(30))
        .context("the swarm did not start")??;
    Ok(Member {
        p2p,
        inbound,
        _stop: stop,
    })
}

/// Whether `m` listens through a relay within `limit`.
pub async fn listening_through_relay(m: &Member, limit: Duration) -> bool {
    tokio::time::timeout(limit, async {
        while !m.p2p.info().await.listen.iter().any(swarm::is_circuit) {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .is_ok()
}

/// The links from `m` to `peer` once none is relayed any more (polled every
/// `every`), or None after `limit`.
pub async fn direct_only(m: &Member, peer: PeerId, limit: Duration, every: Duration) -> Option<Vec<Link>> {
    tokio::time::timeout(limit, async {
        loop {
            let links = m.p2p.links(peer).await;
            if !links.is_empty() && links.iter().all(|l| !l.relayed) {
                return links;
            }
            tokio::time::sleep(every).await;
        }
    })
    .await
    .ok()
}

/// The relay, on the public network at `port`, and the address members
/// listen through it by (`.../p2p/<relay>`).
pub fn relay(nets: &Nets, t: Transport, port: u16) -> anyhow::Result<(Member, Multiaddr)> {
    let addr = at(t, PUBLIC_RELAY, port)?;
    let relay = member_in(
        nets.ns("pub"),
        Keypair::generate_ed25519(),
        SwarmConfig {
            listen: vec![addr.clone()],
            relay_service: Some(gpupool_operator::p2p::swarm::RelayService::default()),
            ..Default::default()
        },
    )?;
    let named = addr.with(libp2p::multiaddr::Protocol::P2p(relay.p2p.local_peer_id()));
    Ok((relay, named))
}

/// Member `side` ("a" or "b") behind its NAT, with a new identity, listening
/// on its private address at `port` and through `relay`, which it knows and
/// nothing else.
pub fn behind_nat(nets: &Nets, side: &str, t: Transport, port: u16, relay: &Multiaddr) -> anyhow::Result<Member> {
    let key = Keypair::generate_ed25519();
    behind_nat_as(nets, side, key, t, port, relay, PingTimes::default())
}

/// As [`behind_nat`], with identity `key` (a member started again keeps its
/// identity, as an operator's comes from its Secret) and its pings' timing.
pub fn behind_nat_as(
    nets: &Nets,
    side: &str,
    key: Keypair,
    t: Transport,
    port: u16,
    relay: &Multiaddr,
    ping: PingTimes,
) -> anyhow::Result<Member> {
    let lan = match side {
        "a" => A_LAN,
        "b" => B_LAN,
        other => bail!("no member {other} behind a NAT"),
    };
    member_in(
        nets.ns(side),
        key,
        SwarmConfig {
            listen: vec![
                at(t, lan, port)?,
                relay.clone().with(libp2p::multiaddr::Protocol::P2pCircuit),
            ],
            bootstrap: vec![relay.clone()],
            ping,
            ..Default::default()
        },
    )
}

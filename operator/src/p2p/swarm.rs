//! The libp2p swarm: TCP + noise + yamux and QUIC, identify, Kademlia,
//! gossipsub with strict signing and application validation, request-response
//! for direct messages, connection limits, circuit relay v2 (a member behind
//! NAT listens through a relay; any member may serve as one) and hole punching
//! (DCUtR), which replaces a relayed connection with a direct one where both
//! NATs allow it. It owns no market state: it moves bytes and reports what
//! arrived. This module builds the swarm and hands out the `P2p` handle;
//! `event_loop` runs it.

use std::time::Duration;

use futures::StreamExt;
use libp2p::gossipsub::{self, IdentTopic, MessageAcceptance, MessageAuthenticity, MessageId, ValidationMode};
use libp2p::identity::Keypair;
use libp2p::kad::{self, store::MemoryStore};
use libp2p::multiaddr::Protocol;
use libp2p::request_response::{self, ProtocolSupport};
use libp2p::swarm::behaviour::toggle::Toggle;
use libp2p::swarm::{NetworkBehaviour, SwarmEvent};
use libp2p::{Multiaddr, PeerId, connection_limits, dcutr, identify, noise, ping, relay, tcp, yamux};

use tokio::sync::{mpsc, oneshot};
use tracing::info;

use super::codec::{DIRECT_PROTOCOL, EnvelopeCodec};
use super::event_loop::{Loop, WINDOW_PER_PEER};

pub const TOPIC_ADVERTS: &str = "gpupool/adverts/v1";
pub const TOPIC_ORDERS: &str = "gpupool/orders/v1";

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Topic {
    Adverts,
    Orders,
}

impl Topic {
    pub(super) fn name(self) -> &'static str {
        match self {
            Topic::Adverts => TOPIC_ADVERTS,
            Topic::Orders => TOPIC_ORDERS,
        }
    }
}

#[derive(Clone, Debug)]
pub struct SwarmConfig {
    pub listen: Vec<Multiaddr>,
    /// Peers to dial at start and whenever the pool looks empty; `/p2p/<id>`
    /// is optional (noise tells us who answered).
    pub bootstrap: Vec<Multiaddr>,
    pub idle_timeout: Duration,
    pub request_timeout: Duration,
    /// Walk the DHT to find members beyond the bootstrap peers. Off, the swarm
    /// knows only its bootstrap peers and whoever dials it: where many swarms
    /// share one process (the fan-out benchmark), walks connect every member
    /// to every other, 20k sockets for 200 swarms.
    pub discovery: bool,
    pub limits: PeerLimits,
    /// Where other members reach this one when that is not where it listens:
    /// a LoadBalancer's or NodePort's address, a NAT's forwarded port. When
    /// set, these are the only addresses it tells peers (identify, and the
    /// identity record through `SwarmInfo::advertised`); its listen
    /// addresses, private to its own network, are kept to itself.
    pub announce: Vec<Multiaddr>,
    /// Serve other members as a circuit relay: those behind NAT that nobody
    /// can dial listen through it (`.../p2p/<this peer>/p2p-circuit` in their
    /// `listen`). Off by default: a relay carries others' traffic.
    pub relay_service: Option<RelayService>,
    /// How often each connection is pinged, and how long an answer may
    /// take before the connection is taken for dead and closed. A peer that
    /// vanishes without a word (its node lost power, a NAT forgot it) leaves
    /// a TCP connection that looks alive for as long as the kernel retries,
    /// many minutes; libp2p spreads requests over every connection to a peer,
    /// so each one sent on it would wait out its timeout.
    pub ping: PingTimes,
}

/// See [`SwarmConfig::ping`]. The defaults are libp2p's, and libp2p reports
/// only the second unanswered ping in a row: a dead connection is closed
/// within about 70 s. Failover does not wait on it (a lease's heartbeat
/// grace decides that); closing only stops messages going onto it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PingTimes {
    pub interval: Duration,
    pub timeout: Duration,
}

impl Default for PingTimes {
    fn default() -> Self {
        Self {
            interval: Duration::from_secs(15),
            timeout: Duration::from_secs(20),
        }
    }
}

/// What a member's relay service gives the members that listen through it.
/// libp2p's defaults (circuits of 2 minutes and 128 KiB) suit hole punching,
/// not a member whose whole pool traffic runs over the circuit: its circuits
/// last an hour and carry any number of bytes, then are dialled again.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RelayService {
    /// Members holding a reservation (listening through this relay) at once.
    pub max_reservations: usize,
    /// Relayed connections at once, and to or from one member.
    pub max_circuits: usize,
    pub max_circuits_per_peer: usize,
    /// How long one relayed connection lasts before its ends dial it again.
    pub max_circuit_duration: Duration,
}

impl Default for RelayService {
    fn default() -> Self {
        Self {
            max_reservations: 128,
            max_circuits: 256,
            max_circuits_per_peer: 16,
            max_circuit_duration: Duration::from_secs(3600),
        }
    }
}

impl RelayService {
    fn config(self) -> relay::Config {
        relay::Config {
            max_reservations: self.max_reservations,
            max_reservations_per_peer: 4,
            max_circuits: self.max_circuits,
            max_circuits_per_peer: self.max_circuits_per_peer,
            max_circuit_duration: self.max_circuit_duration,
            // No cap on bytes: the circuit carries the member's pool traffic.
            max_circuit_bytes: 0,
            // libp2p's per-peer and per-IP rate limits on new reservations
            // and circuits stay: a member redials an hour-long circuit once
            // an hour, and a flood of requests is refused.
            ..relay::Config::default()
        }
    }
}

/// Whether `addr` is reached through a relay (`/p2p-circuit`).
pub fn is_circuit(addr: &Multiaddr) -> bool {
    addr.iter().any(|p| p == Protocol::P2pCircuit)
}

/// A circuit listen address must name its relay (`.../p2p/<relay>/p2p-circuit`):
/// the relay client asks that peer, and no other, for a reservation.
fn check_circuit(addr: &Multiaddr) -> Result<(), StartError> {
    let mut relay_named = false;
    for p in addr.iter() {
        match p {
            Protocol::P2p(_) => relay_named = true,
            Protocol::P2pCircuit => break,
            _ => {}
        }
    }
    if relay_named {
        Ok(())
    } else {
        Err(StartError::Listen {
            addr: addr.clone(),
            reason: "a relay address names the relay: /ip4/<ip>/tcp/<port>/p2p/<relay peer id>/p2p-circuit".into(),
        })
    }
}

/// How many connections the swarm keeps, so a flood of dials (or one peer
/// opening connection after connection) costs sockets and handshakes only up
/// to a bound. A pool has tens to a few hundred members, each needing one
/// connection; the defaults leave room for that and no more.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PeerLimits {
    /// Established connections that others opened to us.
    pub max_incoming: u32,
    /// Incoming connections still in their handshake.
    pub max_pending_incoming: u32,
    /// Connections to one peer. Two members that dial each other at the
    /// same moment end up with two; more is a misbehaving peer.
    pub max_per_peer: u32,
}

impl Default for PeerLimits {
    fn default() -> Self {
        Self {
            max_incoming: 512,
            max_pending_incoming: 128,
            max_per_peer: 4,
        }
    }
}

impl Default for SwarmConfig {
    fn default() -> Self {
        Self {
            listen: vec![],
            bootstrap: vec![],
            idle_timeout: Duration::from_secs(600),
            request_timeout: Duration::from_secs(10),
            discovery: true,
            limits: PeerLimits::default(),
            announce: vec![],
            relay_service: None,
            ping: PingTimes::default(),
        }
    }
}

/// What arrived from the network, before any check.
#[derive(Debug)]
pub enum Inbound {
    Gossip {
        topic: Topic,
        /// The gossipsub author, verified by gossipsub's strict signing.
        author: Option<PeerId>,
        propagation_source: PeerId,
        id: MessageId,
        bytes: Vec<u8>,
    },
    Direct {
        peer: PeerId,
        bytes: Vec<u8>,
    },
    /// The codec refused a frame before reading it.
    Oversized {
        peer: PeerId,
    },
    Connected {
        peer: PeerId,
    },
    Disconnected {
        peer: PeerId,
    },
    /// This member's relay service served (or refused) another member.
    Relayed(RelayServed),
    /// An attempt to replace a relayed connection to `peer` with a direct
    /// one ended.
    HolePunch {
        peer: PeerId,
        outcome: HolePunch,
    },
}

/// How a hole punch (DCUtR) over a relayed connection ended, for its metric.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HolePunch {
    /// A direct connection now carries the peer's traffic; the relayed one
    /// was closed.
    Direct,
    /// Every dial over one relayed connection failed (a NAT that maps each
    /// destination to a new port, a firewall, or a second attempt between
    /// the same two ports at once); unless another attempt succeeds, the
    /// peer stays on the relay.
    Failed,
}

impl HolePunch {
    pub const ALL: [HolePunch; 2] = [Self::Direct, Self::Failed];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Direct => "direct",
            Self::Failed => "failed",
        }
    }
}

/// What a relay service did, for its metric.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RelayServed {
    /// A member now listens through us.
    Reservation,
    /// A connection between two members now runs through us.
    Circuit,
    /// A reservation or circuit was refused (limits, rate limits, no reservation).
    Refused,
}

impl RelayServed {
    pub const ALL: [RelayServed; 3] = [Self::Reservation, Self::Circuit, Self::Refused];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Reservation => "reservation",
            Self::Circuit => "circuit",
            Self::Refused => "refused",
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SendError {
    #[error("the swarm has stopped")]
    Stopped,
    #[error("no route to or no answer from {peer}: {reason}")]
    Failed { peer: PeerId, reason: String },
    /// The connection the message went out on closed before the answer
    /// came (see `resend`): the peer may well be reachable on another.
    #[error("the connection to {0} closed under the message")]
    ConnectionClosed(PeerId),
    #[error("{0} is busy")]
    Busy(PeerId),
    #[error("publishing: {0}")]
    Publish(String),
}

pub(super) enum Command {
    Publish {
        topic: Topic,
        bytes: Vec<u8>,
        done: oneshot::Sender<Result<(), SendError>>,
    },
    Send {
        peer: PeerId,
        bytes: Vec<u8>,
        done: oneshot::Sender<Result<(), SendError>>,
    },
    Validated {
        id: MessageId,
        source: PeerId,
        accept: MessageAcceptance,
    },
    Ban {
        peer: PeerId,
    },
    AddPeer {
        peer: PeerId,
        addr: Multiaddr,
    },
    Info {
        done: oneshot::Sender<SwarmInfo>,
    },
    AddressesOf {
        peer: PeerId,
        done: oneshot::Sender<Vec<Multiaddr>>,
    },
    Links {
        peer: PeerId,
        done: oneshot::Sender<Vec<Link>>,
    },
}

pub use super::links::Link;

#[derive(Clone, Debug, Default)]
pub struct SwarmInfo {
    pub listen: Vec<Multiaddr>,
    /// The addresses peers should dial: the announce addresses, or else the
    /// listen addresses.
    pub advertised: Vec<Multiaddr>,
    pub connected: Vec<PeerId>,
}

/// A cheap handle to the running swarm.
#[derive(Clone, Debug)]
pub struct P2p {
    local: PeerId,
    cmd: mpsc::Sender<Command>,
}

impl P2p {
    pub fn local_peer_id(&self) -> PeerId {
        self.local
    }

    async fn call<T>(&self, make: impl FnOnce(oneshot::Sender<T>) -> Command) -> Option<T> {
        let (tx, rx) = oneshot::channel();
        self.cmd.send(make(tx)).await.ok()?;
        rx.await.ok()
    }

    pub async fn publish(&self, topic: Topic, bytes: Vec<u8>) -> Result<(), SendError> {
        self.call(|done| Command::Publish { topic, bytes, done })
            .await
            .unwrap_or(Err(SendError::Stopped))
    }

    /// Sends one direct message and waits for the receiver to take it.
    pub async fn send(&self, peer: PeerId, bytes: Vec<u8>) -> Result<(), SendError> {
        self.call(|done| Command::Send { peer, bytes, done })
            .await
            .unwrap_or(Err(SendError::Stopped))
    }

    /// Tells gossipsub what the application made of a message, so it forwards
    /// only good ones and scores the peer that relayed a bad one.
    pub async fn validated(&self, id: MessageId, source: PeerId, accept: MessageAcceptance) {
        let _ = self.cmd.send(Command::Validated { id, source, accept }).await;
    }

    pub async fn ban(&self, peer: PeerId) {
        let _ = self.cmd.send(Command::Ban { peer }).await;
    }

    pub async fn add_peer(&self, peer: PeerId, addr: Multiaddr) {
        let _ = self.cmd.send(Command::AddPeer { peer, addr }).await;
    }

    pub async fn info(&self) -> SwarmInfo {
        self.call(|done| Command::Info { done }).await.unwrap_or_default()
    }

    /// Where this swarm would dial `peer`: its entry in the DHT's routing
    /// table, which identify, dials and other members' answers fill.
    pub async fn addresses_of(&self, peer: PeerId) -> Vec<Multiaddr> {
        self.call(|done| Command::AddressesOf { peer, done })
            .await
            .unwrap_or_default()
    }

    /// The live connections to `peer`: whether it is reached directly or
    /// through a relay, and at which address.
    pub async fn links(&self, peer: PeerId) -> Vec<Link> {
        self.call(|done| Command::Links { peer, done })
            .await
            .unwrap_or_default()
    }
}

#[derive(NetworkBehaviour)]
pub(super) struct Behaviour {
    /// First, so a connection over the limits is refused before any other
    /// behaviour sets up state for it.
    pub(super) limits: connection_limits::Behaviour,
    /// Dials and listens through relays (`/p2p-circuit` addresses).
    pub(super) relay_client: relay::client::Behaviour,
    /// Present only where this member serves as a relay.
    pub(super) relay: Toggle<relay::Behaviour>,
    /// Over each relayed connection, both ends swap the addresses their
    /// peers observed (identify) and dial each other at once: where both
    /// NATs keep a port's mapping whatever the destination, the dials cross
    /// and open a direct connection, and the relay stops carrying traffic.
    pub(super) dcutr: dcutr::Behaviour,
    pub(super) gossipsub: gossipsub::Behaviour,
    /// Present only with discovery: even unused, Kademlia bootstraps on its own
    /// whenever its routing table grows, and its walks dial every member.
    pub(super) kad: Toggle<kad::Behaviour<MemoryStore>>,
    pub(super) identify: identify::Behaviour,
    pub(super) ping: ping::Behaviour,
    pub(super) direct: request_response::Behaviour<EnvelopeCodec>,
}

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("building the swarm: {0}")]
    Build(String),
    #[error("listening on {addr}: {reason}")]
    Listen { addr: Multiaddr, reason: String },
}

fn behaviour(
    key: &Keypair,
    cfg: &SwarmConfig,
    relay_client: relay::client::Behaviour,
) -> Result<Behaviour, StartError> {
    let local = key.public().to_peer_id();
    let gs_config = gossipsub::ConfigBuilder::default()
        .validation_mode(ValidationMode::Strict)
        .validate_messages()
        // Room for an envelope at the limit plus gossipsub's own framing.
        .max_transmit_size(gpupool_proto::MAX_MESSAGE_BYTES + 4096)
        .heartbeat_interval(Duration::from_millis(700))
        .build()
        .map_err(|e| StartError::Build(e.to_string()))?;
    let gossipsub = gossipsub::Behaviour::new(MessageAuthenticity::Signed(key.clone()), gs_config)
        .map_err(|e| StartError::Build(e.to_string()))?;
    let kad = cfg.discovery.then(|| {
        let mut config = kad::Config::new(kad::PROTOCOL_NAME);
        // Our own loop walks the DHT on its schedule; no second timer.
        config.set_periodic_bootstrap_interval(None);
        let mut kad = kad::Behaviour::with_config(local, MemoryStore::new(local), config);
        kad.set_mode(Some(kad::Mode::Server));
        kad
    });
    let identify = identify::Behaviour::new(
        identify::Config::new("/gpupool/1.0.0".into(), key.public())
            // With announce addresses, peers hear only those (they are the
            // swarm's external addresses, which identify always sends).
            .with_hide_listen_addrs(!cfg.announce.is_empty())
            // A member behind NAT gets its address through a relay only after
            // it has connected: peers must hear it then, not at the next
            // identify round minutes later.
            .with_push_listen_addr_updates(true),
    );
    let direct = request_response::Behaviour::with_codec(
        EnvelopeCodec,
        [(DIRECT_PROTOCOL, ProtocolSupport::Full)],
        request_response::Config::default()
            .with_request_timeout(cfg.request_timeout)
            // Our own window, the peer's, and room for a peer that opens a
            // few more: streams past this are refused one by one, before
            // yamux would end the connection over them.
            .with_max_concurrent_streams(2 * WINDOW_PER_PEER + 64),
    );
    let limits = connection_limits::ConnectionLimits::default()
        .with_max_established_incoming(Some(cfg.limits.max_incoming))
        .with_max_pending_incoming(Some(cfg.limits.max_pending_incoming))
        .with_max_established_per_peer(Some(cfg.limits.max_per_peer));
    let relay = cfg.relay_service.map(|r| relay::Behaviour::new(local, r.config()));
    Ok(Behaviour {
        limits: connection_limits::Behaviour::new(limits),
        relay_client,
        relay: Toggle::from(relay),
        dcutr: dcutr::Behaviour::new(local),
        gossipsub,
        kad: Toggle::from(kad),
        identify,
        ping: ping::Behaviour::new(
            ping::Config::new()
                .with_interval(cfg.ping.interval)
                .with_timeout(cfg.ping.timeout),
        ),
        direct,
    })
}

/// Starts the swarm; returns the handle and the stream of what arrives.
pub async fn start(key: Keypair, cfg: SwarmConfig) -> Result<(P2p, mpsc::Receiver<Inbound>), StartError> {
    let local = key.public().to_peer_id();
    let (circuits, direct): (Vec<Multiaddr>, Vec<Multiaddr>) = cfg.listen.iter().cloned().partition(is_circuit);
    for addr in &circuits {
        check_circuit(addr)?;
    }
    let mut swarm = libp2p::SwarmBuilder::with_existing_identity(key)
        .with_tokio()
        .with_tcp(
            tcp::Config::default().nodelay(true),
            noise::Config::new,
            yamux::Config::default,
        )
        .map_err(|e| StartError::Build(e.to_string()))?
        // QUIC: one round trip to a secured, multiplexed connection instead
        // of TCP + noise + yamux's several, and no head-of-line blocking
        // between a bid and a heartbeat. Used where a member listens on a
        // `/udp/<port>/quic-v1` address; TCP stays for UDP-hostile networks.
        .with_quic()
        // /dns4/pool.example.org/tcp/4001: members name each other (bootstrap
        // lists, announce addresses) by DNS name, resolved as the system does.
        .with_dns()
        .map_err(|e| StartError::Build(format!("DNS resolver: {e}")))?
        // Relayed connections get their own noise + yamux inside the circuit:
        // the relay carries bytes it cannot read.
        .with_relay_client(noise::Config::new, yamux::Config::default)
        .map_err(|e| StartError::Build(e.to_string()))?
        .with_behaviour(|key, relay_client| {
            behaviour(key, &cfg, relay_client).map_err(|e| Box::new(e) as Box<dyn std::error::Error + Send + Sync>)
        })
        .map_err(|e| StartError::Build(e.to_string()))?
        .with_swarm_config(|c| c.with_idle_connection_timeout(cfg.idle_timeout))
        .build();
    for t in [Topic::Adverts, Topic::Orders] {
        swarm
            .behaviour_mut()
            .gossipsub
            .subscribe(&IdentTopic::new(t.name()))
            .map_err(|e| StartError::Build(e.to_string()))?;
    }
    for addr in &direct {
        swarm.listen_on(addr.clone()).map_err(|e| StartError::Listen {
            addr: addr.clone(),
            reason: format!("{e:?}"),
        })?;
    }
    // Wait for the listeners so callers (and tests) can read real ports.
    // Not for relays: one that is down must not stop the member starting;
    // the loop listens through it as soon as it answers.
    let mut pending = direct.len();
    while pending > 0 {
        match swarm.select_next_some().await {
            SwarmEvent::NewListenAddr { address, .. } => {
                info!(%address, peer = %local, "p2p listening");
                pending -= 1;
            }
            SwarmEvent::ListenerError { error, .. } | SwarmEvent::ListenerClosed { reason: Err(error), .. } => {
                return Err(StartError::Listen {
                    addr: direct.first().cloned().unwrap_or(Multiaddr::empty()),
                    reason: format!("{error:?}"),
                });
            }
            _ => {}
        }
    }
    for addr in &cfg.announce {
        info!(%addr, peer = %local, "p2p announcing");
        swarm.add_external_address(addr.clone());
    }
    // A relay tells the members that listen through it where it is reached
    // (their circuit addresses start with it), and libp2p's relay serves no
    // one until it has such an address: the announce addresses, or else the
    // listen addresses, as for `advertised`.
    if cfg.relay_service.is_some() && cfg.announce.is_empty() {
        let listening: Vec<Multiaddr> = swarm.listeners().cloned().collect();
        for addr in listening {
            swarm.add_external_address(addr);
        }
    }
    let (cmd_tx, cmd_rx) = mpsc::channel(1024);
    let (in_tx, in_rx) = mpsc::channel(4096);
    let lp = Loop::new(swarm, in_tx, cfg.bootstrap, cfg.announce, circuits);
    tokio::spawn(lp.run(cmd_rx));
    Ok((P2p { local, cmd: cmd_tx }, in_rx))
}

#[cfg(test)]
mod tests {
    //! Real swarms on loopback: QUIC carries both kinds of message, and the
    //! connection limits refuse what is over them.
    use std::sync::Arc;

    use super::*;

    const LIMIT: Duration = Duration::from_secs(20);

    async fn listening(cfg: SwarmConfig) -> (P2p, mpsc::Receiver<Inbound>, Multiaddr) {
        let (p2p, rx) = start(Keypair::generate_ed25519(), cfg).await.unwrap();
        let addr = p2p.info().await.listen.into_iter().next().unwrap();
        let addr = addr.with(Protocol::P2p(p2p.local_peer_id()));
        (p2p, rx, addr)
    }

    async fn next_direct(rx: &mut mpsc::Receiver<Inbound>) -> (PeerId, Vec<u8>) {
        tokio::time::timeout(LIMIT, async {
            loop {
                if let Some(Inbound::Direct { peer, bytes }) = rx.recv().await {
                    return (peer, bytes);
                }
            }
        })
        .await
        .expect("a direct message within the limit")
    }

    /// Sends until `to` takes a message (the first tries may find no route
    /// yet while the DHT fills); false after 40 s.
    async fn sends_until_taken(from: &P2p, to: PeerId) -> bool {
        tokio::time::timeout(Duration::from_secs(40), async {
            while from.send(to, b"bid".to_vec()).await.is_err() {
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        })
        .await
        .is_ok()
    }

    async fn connected_to(p2p: &P2p, peer: PeerId) -> bool {
        tokio::time::timeout(LIMIT, async {
            while !p2p.info().await.connected.contains(&peer) {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        })
        .await
        .is_ok()
    }

    #[tokio::test]
    async fn quic_carries_direct_messages_and_gossip() {
        let quic: Multiaddr = "/ip4/127.0.0.1/udp/0/quic-v1".parse().unwrap();
        let (a, mut a_in, a_addr) = listening(SwarmConfig {
            listen: vec![quic.clone()],
            ..Default::default()
        })
        .await;
        assert!(a_addr.iter().any(|p| matches!(p, Protocol::QuicV1)), "{a_addr}");
        let (b, _b_in, _) = listening(SwarmConfig {
            listen: vec![quic],
            bootstrap: vec![a_addr],
            ..Default::default()
        })
        .await;
        assert!(connected_to(&b, a.local_peer_id()).await, "b dials a over QUIC");

        b.send(a.local_peer_id(), b"offer".to_vec()).await.unwrap();
        assert_eq!(next_direct(&mut a_in).await, (b.local_peer_id(), b"offer".to_vec()));

        // Gossip needs the subscriptions exchanged first: publish until one
        // arrives, a bounded number of times.
        let got = tokio::time::timeout(LIMIT, async {
            loop {
                let _ = b.publish(Topic::Orders, b"order".to_vec()).await;
                let wait = tokio::time::sleep(Duration::from_millis(300));
                tokio::pin!(wait);
                loop {
                    tokio::select! {
                        m = a_in.recv() => if let Some(Inbound::Gossip { topic, author, bytes, .. }) = m {
                            return (topic, author, bytes);
                        },
                        _ = &mut wait => break,
                    }
                }
            }
        })
        .await
        .expect("gossip over QUIC within the limit");
        assert_eq!(got, (Topic::Orders, Some(b.local_peer_id()), b"order".to_vec()));
    }

    /// Members name each other by DNS name in bootstrap lists and announce
    /// addresses, over TCP and QUIC alike.
    /// Distinct direct messages `rx` receives, up to `n`, within the limit.
    async fn directs(rx: &mut mpsc::Receiver<Inbound>, n: usize) -> std::collections::HashSet<Vec<u8>> {
        let mut got = std::collections::HashSet::new();
        let _ = tokio::time::timeout(LIMIT, async {
            while got.len() < n {
                match rx.recv().await {
                    Some(Inbound::Direct { bytes, .. }) => {
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

    /// More messages at once than a connection has streams for: every
    /// message is a yamux stream, and yamux ends a TCP connection past 512
    /// of them, both directions together (with every message on it, before
    /// the window). Each end's window keeps the connection under that.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn more_messages_at_once_than_a_connection_has_streams_all_arrive() {
        const N: usize = 2_000;
        let tcp: Multiaddr = "/ip4/127.0.0.1/tcp/0".parse().unwrap();
        let (a, mut a_in, a_addr) = listening(SwarmConfig {
            listen: vec![tcp.clone()],
            ..Default::default()
        })
        .await;
        let (b, mut b_in, _) = listening(SwarmConfig {
            listen: vec![tcp],
            bootstrap: vec![a_addr],
            ..Default::default()
        })
        .await;
        assert!(connected_to(&b, a.local_peer_id()).await, "b dials a");
        let batch = |from: &P2p, to: PeerId| {
            futures::future::join_all((0..N).map(|i| {
                let from = from.clone();
                async move { from.send(to, i.to_le_bytes().to_vec()).await }
            }))
        };
        let (from_a, from_b) = tokio::join!(batch(&a, b.local_peer_id()), batch(&b, a.local_peer_id()));
        let failed: Vec<_> = from_a.iter().chain(&from_b).filter_map(|r| r.as_ref().err()).collect();
        assert!(
            failed.is_empty(),
            "every message is taken: {} failed, first {:?}",
            failed.len(),
            failed.first()
        );
        assert_eq!(directs(&mut b_in, N).await.len(), N, "a's messages all arrived");
        assert_eq!(directs(&mut a_in, N).await.len(), N, "b's messages all arrived");
        assert_eq!(
            a.info().await.connected,
            vec![b.local_peer_id()],
            "the connection is still up"
        );
    }

    #[tokio::test]
    async fn members_dial_each_other_by_dns_name() {
        for listen in ["/ip4/127.0.0.1/tcp/0", "/ip4/127.0.0.1/udp/0/quic-v1"] {
            let (a, mut a_in, a_addr) = listening(SwarmConfig {
                listen: vec![listen.parse().unwrap()],
                ..Default::default()
            })
            .await;
            let by_name: Multiaddr = a_addr
                .iter()
                .map(|p| match p {
                    Protocol::Ip4(_) => Protocol::Dns4("localhost".into()),
                    other => other,
                })
                .collect();
            let (b, _b_in, _) = listening(SwarmConfig {
                listen: vec![listen.parse().unwrap()],
                bootstrap: vec![by_name.clone()],
                ..Default::default()
            })
            .await;
            assert!(connected_to(&b, a.local_peer_id()).await, "b dials {by_name}");
            b.send(a.local_peer_id(), b"bid".to_vec()).await.unwrap();
            assert_eq!(next_direct(&mut a_in).await, (b.local_peer_id(), b"bid".to_vec()));
        }
    }

    /// A TCP forwarder standing in for a LoadBalancer in front of a member:
    /// what reaches its port goes on to `target` (set once the member
    /// listens).
    async fn load_balancer(
        target: Arc<std::sync::OnceLock<std::net::SocketAddr>>,
    ) -> (u16, tokio::task::JoinHandle<()>) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let task = tokio::spawn(async move {
            while let Ok((mut inbound, _)) = listener.accept().await {
                let Some(to) = target.get().copied() else { continue };
                tokio::spawn(async move {
                    if let Ok(mut outbound) = tokio::net::TcpStream::connect(to).await {
                        let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                    }
                });
            }
        });
        (port, task)
    }

    /// A member behind a LoadBalancer announces the balancer's address. A
    /// member that never had that address configured finds it through the
    /// pool (identify, then the DHT) and delivers to it; neither peer ever
    /// holds the address it listens on, which outside its own network leads
    /// nowhere. (Which side dials is libp2p's business: a may well dial b
    /// first, so the balancer's traffic is not what is checked.)
    #[tokio::test]
    async fn members_reach_a_member_at_the_address_it_announces() {
        let tcp: Multiaddr = "/ip4/127.0.0.1/tcp/0".parse().unwrap();
        let target = Arc::new(std::sync::OnceLock::new());
        let (port, balancer) = load_balancer(target.clone()).await;
        let public: Multiaddr = format!("/ip4/127.0.0.1/tcp/{port}").parse().unwrap();
        let (a, mut a_in, a_private) = listening(SwarmConfig {
            listen: vec![tcp.clone()],
            announce: vec![public.clone()],
            ..Default::default()
        })
        .await;
        let private_port = a_private.iter().find_map(|p| match p {
            Protocol::Tcp(port) => Some(port),
            _ => None,
        });
        target
            .set(std::net::SocketAddr::from(([127, 0, 0, 1], private_port.unwrap())))
            .unwrap();
        let info = a.info().await;
        assert_eq!(
            info.advertised,
            vec![public.clone()],
            "what the identity record carries"
        );
        assert_ne!(info.listen, info.advertised);

        // c joins through the balancer, as members outside a's network do.
        let (c, _c_in, c_addr) = listening(SwarmConfig {
            listen: vec![tcp.clone()],
            bootstrap: vec![public.clone().with(Protocol::P2p(a.local_peer_id()))],
            ..Default::default()
        })
        .await;
        assert!(
            connected_to(&c, a.local_peer_id()).await,
            "c reaches a through the balancer"
        );
        let without_id = |addrs: Vec<Multiaddr>| -> Vec<Multiaddr> {
            addrs
                .into_iter()
                .map(|a| a.into_iter().filter(|p| !matches!(p, Protocol::P2p(_))).collect())
                .collect()
        };
        // identify told c nothing but the announced address.
        let heard = tokio::time::timeout(LIMIT, async {
            loop {
                let addrs = without_id(c.addresses_of(a.local_peer_id()).await);
                if !addrs.is_empty() {
                    return addrs;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        })
        .await
        .expect("c knows where a is");
        assert_eq!(heard, vec![public.clone()], "c heard a's private address");
        // b knows only c, and finds a through the pool.
        let (b, _b_in, _) = listening(SwarmConfig {
            listen: vec![tcp],
            bootstrap: vec![c_addr],
            request_timeout: Duration::from_secs(3),
            ..Default::default()
        })
        .await;
        assert!(sends_until_taken(&b, a.local_peer_id()).await, "b never reached a");
        assert_eq!(next_direct(&mut a_in).await, (b.local_peer_id(), b"bid".to_vec()));
        assert_eq!(
            without_id(b.addresses_of(a.local_peer_id()).await),
            vec![public],
            "b heard a's private address"
        );
        balancer.abort();
    }

    /// Two members behind NAT, which nobody can dial, listen through a third
    /// member's relay; each knows only the relay, finds the other through the
    /// pool, and their direct messages run over a circuit through it.
    #[tokio::test]
    async fn members_behind_nat_reach_each_other_through_a_relay() {
        let (relay, mut relay_in, relay_addr) = listening(SwarmConfig {
            listen: vec!["/ip4/127.0.0.1/tcp/0".parse().unwrap()],
            relay_service: Some(RelayService::default()),
            ..Default::default()
        })
        .await;
        let behind_nat = || SwarmConfig {
            listen: vec![relay_addr.clone().with(Protocol::P2pCircuit)],
            bootstrap: vec![relay_addr.clone()],
            request_timeout: Duration::from_secs(3),
            ..Default::default()
        };
        let (a, _a_in) = start(Keypair::generate_ed25519(), behind_nat()).await.unwrap();
        let (b, mut b_in) = start(Keypair::generate_ed25519(), behind_nat()).await.unwrap();
        // b's only address is its circuit through the relay, and it says so.
        let b_circuit = tokio::time::timeout(LIMIT, async {
            loop {
                if let Some(addr) = b.info().await.advertised.into_iter().find(is_circuit) {
                    return addr;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        })
        .await
        .expect("b listens through the relay");
        assert!(
            b_circuit.to_string().starts_with(&relay_addr.to_string()),
            "{b_circuit}"
        );
        assert!(
            b.info().await.listen.iter().all(is_circuit),
            "b listens on nothing else"
        );

        assert!(sends_until_taken(&a, b.local_peer_id()).await, "a never reached b");
        assert_eq!(next_direct(&mut b_in).await, (a.local_peer_id(), b"bid".to_vec()));
        let heard = a.addresses_of(b.local_peer_id()).await;
        assert!(
            !heard.is_empty() && heard.iter().all(is_circuit),
            "a dialled b at {heard:?}"
        );
        // The relay served both reservations and the circuit between them.
        let mut served = vec![];
        tokio::time::timeout(LIMIT, async {
            while !served.contains(&RelayServed::Circuit) {
                if let Some(Inbound::Relayed(s)) = relay_in.recv().await {
                    served.push(s);
                }
            }
        })
        .await
        .expect("the relay reports the circuit");
        assert_eq!(
            served.iter().filter(|s| **s == RelayServed::Reservation).count(),
            2,
            "{served:?}"
        );
        drop(relay);
    }

    #[tokio::test]
    async fn a_relay_address_must_name_the_relay() {
        let err = start(
            Keypair::generate_ed25519(),
            SwarmConfig {
                listen: vec!["/ip4/127.0.0.1/tcp/4001/p2p-circuit".parse().unwrap()],
                ..Default::default()
            },
        )
        .await
        .expect_err("refused");
        assert!(err.to_string().contains("/p2p/<relay peer id>/p2p-circuit"), "{err}");
    }

    #[tokio::test]
    async fn connections_over_the_limit_are_refused() {
        let tcp: Multiaddr = "/ip4/127.0.0.1/tcp/0".parse().unwrap();
        let (a, mut a_in, a_addr) = listening(SwarmConfig {
            listen: vec![tcp.clone()],
            limits: PeerLimits {
                max_incoming: 1,
                ..PeerLimits::default()
            },
            ..Default::default()
        })
        .await;
        let (first, _f_in, _) = listening(SwarmConfig {
            listen: vec![tcp.clone()],
            bootstrap: vec![a_addr.clone()],
            ..Default::default()
        })
        .await;
        assert!(
            connected_to(&a, first.local_peer_id()).await,
            "the first member is admitted"
        );

        let (second, _s_in, _) = listening(SwarmConfig {
            listen: vec![tcp],
            request_timeout: Duration::from_secs(5),
            ..Default::default()
        })
        .await;
        second.add_peer(a.local_peer_id(), a_addr).await;
        let refused = second.send(a.local_peer_id(), b"bid".to_vec()).await;
        // The limit refuses the connection once it is up: the message had
        // gone out on it, so it fails as closed under it.
        assert!(
            matches!(refused, Err(SendError::ConnectionClosed(p)) if p == a.local_peer_id()),
            "{refused:?}"
        );
        assert!(!a.info().await.connected.contains(&second.local_peer_id()));

        // The member already admitted is unaffected.
        first.send(a.local_peer_id(), b"bid".to_vec()).await.unwrap();
        assert_eq!(next_direct(&mut a_in).await, (first.local_peer_id(), b"bid".to_vec()));
    }
}

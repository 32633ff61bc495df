//! The swarm's event loop: it runs what the `P2p` handle asks (publish,
//! send, validate, ban, dial), keeps each peer's window of direct messages,
//! listens through relays and dials, and turns what the swarm reports into
//! `Inbound` messages for the market.

use std::collections::HashMap;
use std::time::Duration;

use futures::StreamExt;
use libp2p::core::ConnectedPoint;
use libp2p::core::transport::ListenerId;
use libp2p::gossipsub::{self, IdentTopic, MessageAcceptance, MessageId};
use libp2p::multiaddr::Protocol;
use libp2p::request_response::{self, OutboundRequestId};
use libp2p::swarm::dial_opts::{DialOpts, PeerCondition};
use libp2p::swarm::{ConnectionId, ListenError, SwarmEvent};
use libp2p::{Multiaddr, PeerId, Swarm, dcutr, identify, ping, relay};
use tokio::sync::{mpsc, oneshot};
use tracing::{debug, info, warn};

use super::announce::advertised;
use super::codec::{Ack, Frame};
use super::links::{Link, Links};
use super::swarm::{
    Behaviour, BehaviourEvent, Command, HolePunch, Inbound, RelayServed, SendError, SwarmInfo, TOPIC_ADVERTS,
    TOPIC_ORDERS, Topic, is_circuit,
};

pub(super) struct Loop {
    swarm: Swarm<Behaviour>,
    inbound: mpsc::Sender<Inbound>,
    /// Direct messages awaiting their peer's answer.
    pending: HashMap<OutboundRequestId, oneshot::Sender<Result<(), SendError>>>,
    /// Direct messages sent and unanswered, by peer (at most
    /// [`WINDOW_PER_PEER`]), and those waiting for one of them to finish.
    in_flight: HashMap<PeerId, usize>,
    queued: HashMap<PeerId, std::collections::VecDeque<Outbound>>,
    /// Peers being dialled for a message (see `dial_for_message`), until
    /// a connection to them opens or a dial to them fails.
    dialling: std::collections::HashSet<PeerId>,
    bootstrap: Vec<Multiaddr>,
    announce: Vec<Multiaddr>,
    /// Relay addresses to listen through, each with its listener while it
    /// is up: one that closes (the relay restarted, its reservation lapsed)
    /// is listened on again at the next tick.
    circuits: Vec<(Multiaddr, Option<ListenerId>)>,
    /// Every live connection by peer: which are relayed, to close them once
    /// a hole punch has opened a direct one.
    links: Links,
}

/// A direct message not yet answered, or waiting for a slot in its peer's
/// window.
struct Outbound {
    peer: PeerId,
    bytes: Vec<u8>,
    done: oneshot::Sender<Result<(), SendError>>,
}

/// Direct messages to one peer awaiting an answer at most; more wait in
/// order for one to finish. Every request is a stream, and yamux ends the
/// whole connection once the streams on it pass 512, both directions
/// together: 300 messages each way at once (a provider reporting on its
/// leases with one renter, each report sent on its own) took the
/// connection down with every one of them (seen in the NAT test). With
/// both ends bounded, a connection carries at most twice this. QUIC holds
/// excess streams back by itself.
pub(super) const WINDOW_PER_PEER: usize = 128;

fn peer_of(addr: &Multiaddr) -> Option<PeerId> {
    addr.iter().find_map(|p| match p {
        Protocol::P2p(id) => Some(id),
        _ => None,
    })
}

impl Loop {
    pub(super) fn new(
        swarm: Swarm<Behaviour>,
        inbound: mpsc::Sender<Inbound>,
        bootstrap: Vec<Multiaddr>,
        announce: Vec<Multiaddr>,
        circuits: Vec<Multiaddr>,
    ) -> Self {
        let mut lp = Loop {
            swarm,
            inbound,
            pending: HashMap::new(),
            in_flight: HashMap::new(),
            queued: HashMap::new(),
            dialling: Default::default(),
            bootstrap,
            announce,
            circuits: circuits.into_iter().map(|a| (a, None)).collect(),
            links: Links::default(),
        };
        lp.listen_through_relays();
        lp
    }

    fn dial_bootstrap(&mut self) {
        for addr in self.bootstrap.clone() {
            if let Some(p) = peer_of(&addr)
                && self.swarm.is_connected(&p)
            {
                continue;
            }
            if let Err(e) = Self::dial_once(&mut self.swarm, &addr) {
                debug!(%addr, error = %e, "bootstrap dial failed");
            }
        }
    }

    /// Dials `addr` unless its peer is connected or being dialled already.
    /// At start the bootstrap dial, the dial to listen through the relay
    /// and Kademlia's walk each dialled the same relay: four connections
    /// from one member, which is the relay's limit per peer. A member that
    /// restarted behind its NAT was then refused by the relay (seen in the
    /// NAT test) until its old, silent connections timed out there.
    fn dial_once(swarm: &mut Swarm<Behaviour>, addr: &Multiaddr) -> Result<(), libp2p::swarm::DialError> {
        let opts = match peer_of(addr) {
            Some(peer) => DialOpts::peer_id(peer)
                .addresses(vec![addr.clone()])
                .condition(PeerCondition::DisconnectedAndNotDialing)
                .build(),
            None => DialOpts::unknown_peer_id().address(addr.clone()).build(),
        };
        swarm.dial(opts)
    }

    /// Listens through each relay we are connected to and not yet listening
    /// through, and dials the others: their connection calls this again.
    /// (Listening through a relay not yet dialled races that dial and fails.)
    fn listen_through_relays(&mut self) {
        for (addr, listener) in &mut self.circuits {
            if listener.is_some() {
                continue;
            }
            let relay: Multiaddr = addr.iter().take_while(|p| *p != Protocol::P2pCircuit).collect();
            if peer_of(&relay).is_some_and(|p| self.swarm.is_connected(&p)) {
                match self.swarm.listen_on(addr.clone()) {
                    Ok(id) => *listener = Some(id),
                    Err(e) => warn!(%addr, error = %e, "cannot listen through the relay; trying again"),
                }
            } else if let Err(e) = Self::dial_once(&mut self.swarm, &relay) {
                debug!(%relay, error = %e, "relay dial failed");
            }
        }
    }

    /// A hole punch opened `direct` to `peer`: close the relayed
    /// connections. A request in flight on one fails as closed under it
    /// (seen in the NAT test's restart, 15 of 20 sent as the punch landed),
    /// and the market sends it again (`resend`).
    fn relay_no_more(&mut self, peer: PeerId, direct: ConnectionId) {
        let remote = self
            .links
            .get(peer, direct)
            .map(|l| l.remote.to_string())
            .unwrap_or_default();
        let relayed = self.close_relayed(peer);
        info!(%peer, %remote, relayed, "hole punched: a direct connection replaces the relayed one");
    }

    /// Closes every relayed connection to `peer`; returns how many.
    fn close_relayed(&mut self, peer: PeerId) -> usize {
        let relayed = self.links.relayed(peer);
        let n = relayed.len();
        self.close(peer, relayed);
        n
    }

    fn close(&mut self, peer: PeerId, ids: Vec<ConnectionId>) {
        for id in ids {
            debug!(%peer, "closing a connection");
            self.swarm.close_connection(id);
        }
    }

    /// A circuit listener ended: listen through that relay again next tick.
    fn circuit_closed(&mut self, id: ListenerId, why: &str) {
        if let Some((addr, listener)) = self.circuits.iter_mut().find(|(_, l)| *l == Some(id)) {
            warn!(%addr, reason = why, "no longer listening through the relay; trying again");
            *listener = None;
        }
    }

    pub(super) async fn run(mut self, mut cmds: mpsc::Receiver<Command>) {
        self.dial_bootstrap();
        let mut tick = tokio::time::interval(Duration::from_secs(5));
        let mut ticks = 0u64;
        loop {
            tokio::select! {
                cmd = cmds.recv() => match cmd {
                    Some(c) => self.command(c),
                    None => break,
                },
                ev = self.swarm.select_next_some() => self.event(ev),
                _ = tick.tick() => {
                    // Keep the bootstrap peers dialled while few are connected,
                    // and walk the DHT so new members are found.
                    if self.swarm.connected_peers().count() < self.bootstrap.len() {
                        self.dial_bootstrap();
                    }
                    self.listen_through_relays();
                    // Walks every tick for the first minute (joining), then
                    // once a minute: each walk queries up to 20 members.
                    ticks += 1;
                    if (ticks <= 12 || ticks.is_multiple_of(12))
                        && self.swarm.connected_peers().next().is_some()
                        && let Some(kad) = self.swarm.behaviour_mut().kad.as_mut()
                    {
                        let _ = kad.bootstrap();
                    }
                }
            }
        }
        info!("p2p swarm stopped");
    }

    fn command(&mut self, c: Command) {
        match c {
            Command::Publish { topic, bytes, done } => {
                let r = self
                    .swarm
                    .behaviour_mut()
                    .gossipsub
                    .publish(IdentTopic::new(topic.name()), bytes)
                    .map(|_| ())
                    .map_err(|e| SendError::Publish(e.to_string()));
                let _ = done.send(r);
            }
            Command::Send { peer, bytes, done } => self.send(Outbound { peer, bytes, done }),
            Command::Validated { id, source, accept } => {
                let _ = self
                    .swarm
                    .behaviour_mut()
                    .gossipsub
                    .report_message_validation_result(&id, &source, accept);
            }
            Command::Ban { peer } => {
                warn!(%peer, "banning peer for its score");
                self.swarm.behaviour_mut().gossipsub.blacklist_peer(&peer);
                let _ = self.swarm.disconnect_peer_id(peer);
            }
            Command::AddPeer { peer, addr } => {
                self.remember(peer, addr);
            }
            Command::Info { done } => {
                let _ = done.send(SwarmInfo {
                    listen: self.swarm.listeners().cloned().collect(),
                    advertised: advertised(&self.announce, self.swarm.listeners(), is_circuit),
                    connected: self.swarm.connected_peers().copied().collect(),
                });
            }
            Command::Links { peer, done } => {
                let _ = done.send(self.links.of(peer));
            }
            Command::AddressesOf { peer, done } => {
                let addrs = self
                    .swarm
                    .behaviour_mut()
                    .kad
                    .as_mut()
                    .and_then(|kad| {
                        let bucket = kad.kbucket(peer)?;
                        bucket
                            .iter()
                            .find(|e| *e.node.key.preimage() == peer)
                            .map(|e| e.node.value.iter().cloned().collect())
                    })
                    .unwrap_or_default();
                let _ = done.send(addrs);
            }
        }
    }

    /// Sends a new direct message, or queues it behind a full window.
    fn send(&mut self, out: Outbound) {
        let n = self.in_flight.entry(out.peer).or_default();
        if *n < WINDOW_PER_PEER {
            *n += 1;
            self.dispatch(out);
        } else {
            self.queued.entry(out.peer).or_default().push_back(out);
        }
    }

    /// Puts a message on the wire, in a window slot it already holds.
    fn dispatch(&mut self, out: Outbound) {
        self.dial_for_message(out.peer);
        let id = self
            .swarm
            .behaviour_mut()
            .direct
            .send_request(&out.peer, Frame::Message(out.bytes));
        self.pending.insert(id, out.done);
    }

    /// Dials `peer` for a message, with every address known for it, even
    /// while another dial to it runs. request-response dials only when none
    /// does, and otherwise waits for that dial: a Kademlia walk that found
    /// a member behind NAT dials it at the addresses the DHT has (its LAN's
    /// and its NAT's, which drop what they did not ask for), and that dial
    /// hangs. A first message to such a member waited 0.5 s, or 5 to 7 s,
    /// in about one punch-benchmark round in ten; with this dial, which
    /// includes the circuit address, p99 is ~6 ms. One such dial per peer
    /// at a time, started before the request is handed to request-response,
    /// so that its own dial finds this one running and stands down: a
    /// second dial would open a second circuit, and two circuits punch
    /// twice.
    fn dial_for_message(&mut self, peer: PeerId) {
        if self.swarm.is_connected(&peer) || !self.dialling.insert(peer) {
            return;
        }
        let opts = DialOpts::peer_id(peer).condition(PeerCondition::Always).build();
        if let Err(e) = self.swarm.dial(opts) {
            debug!(%peer, error = %e, "dial for a message failed");
            self.dialling.remove(&peer);
        }
    }

    /// A message to `peer` was answered or given up: its slot goes to the
    /// next one waiting.
    fn settled(&mut self, peer: PeerId) {
        match self.queued.get_mut(&peer).and_then(|q| q.pop_front()) {
            Some(next) => self.dispatch(next),
            None => {
                self.queued.remove(&peer);
                if let Some(n) = self.in_flight.get_mut(&peer) {
                    *n = n.saturating_sub(1);
                    if *n == 0 {
                        self.in_flight.remove(&peer);
                    }
                }
            }
        }
    }

    /// Keeps an address for a peer: for redials by direct messages, and for
    /// the DHT when discovery is on.
    fn remember(&mut self, peer: PeerId, addr: Multiaddr) {
        if let Some(kad) = self.swarm.behaviour_mut().kad.as_mut() {
            kad.add_address(&peer, addr.clone());
        }
        self.swarm.add_peer_address(peer, addr);
    }

    fn deliver(&self, msg: Inbound) {
        // A full queue means the market is behind: drop rather than stall the swarm.
        if let Err(e) = self.inbound.try_send(msg) {
            warn!(error = %e, "inbound queue full; message dropped");
        }
    }

    fn event(&mut self, ev: SwarmEvent<BehaviourEvent>) {
        match ev {
            SwarmEvent::Behaviour(ev) => self.behaviour_event(ev),
            SwarmEvent::ConnectionEstablished {
                peer_id,
                connection_id,
                endpoint,
                num_established,
                ..
            } => self.connection_established(peer_id, connection_id, &endpoint, num_established.get()),
            SwarmEvent::ConnectionClosed {
                peer_id,
                connection_id,
                num_established,
                cause,
                ..
            } => {
                if let Some(link) = self.links.get(peer_id, connection_id) {
                    debug!(peer = %peer_id, remote = %link.remote, relayed = link.relayed, cause = ?cause, "connection closed");
                }
                self.links.closed(peer_id, connection_id);
                if num_established == 0 {
                    debug!(peer = %peer_id, "peer disconnected");
                    self.deliver(Inbound::Disconnected { peer: peer_id });
                }
            }
            SwarmEvent::OutgoingConnectionError { peer_id, error, .. } => {
                debug!(peer = ?peer_id, %error, "dial failed");
                if let Some(peer) = peer_id {
                    self.dialling.remove(&peer);
                }
            }
            SwarmEvent::NewListenAddr { listener_id, address }
                if self.circuits.iter().any(|(_, l)| *l == Some(listener_id)) =>
            {
                // Told to peers even where announce addresses hide the
                // listen addresses: a circuit is reachable from anywhere.
                info!(%address, "listening through a relay");
                self.swarm.add_external_address(address);
            }
            SwarmEvent::ExpiredListenAddr { address, .. } if is_circuit(&address) => {
                self.swarm.remove_external_address(&address);
            }
            SwarmEvent::ListenerClosed {
                listener_id, reason, ..
            } => {
                let why = match reason {
                    Ok(()) => "closed".to_string(),
                    Err(e) => e.to_string(),
                };
                self.circuit_closed(listener_id, &why);
            }
            SwarmEvent::ListenerError { listener_id, error } => {
                // Non-fatal: the listener lives on, and listening again would
                // hold a second reservation at the same relay.
                debug!(listener = ?listener_id, %error, "listener error");
            }
            SwarmEvent::IncomingConnectionError {
                send_back_addr,
                error: error @ ListenError::Denied { .. },
                ..
            } => {
                // The connection limits: worth a line, since a pool at its
                // limit stops admitting members.
                info!(from = %send_back_addr, %error, "incoming connection refused");
            }
            SwarmEvent::IncomingConnectionError {
                send_back_addr, error, ..
            } => {
                debug!(from = %send_back_addr, %error, "incoming connection failed");
            }
            _ => {}
        }
    }

    fn behaviour_event(&mut self, ev: BehaviourEvent) {
        match ev {
            BehaviourEvent::Gossipsub(gossipsub::Event::Message {
                propagation_source,
                message_id,
                message,
            }) => self.gossip(propagation_source, message_id, message),
            BehaviourEvent::Direct(ev) => self.direct_event(ev),
            BehaviourEvent::Identify(identify::Event::Received { peer_id, info, .. }) => {
                for addr in info.listen_addrs {
                    self.remember(peer_id, addr);
                }
            }
            // libp2p reports a ping failure only after a second in a row
            // (the first is free): the timeout, or the ping stream's own
            // negotiation timing out on a peer that no longer answers.
            BehaviourEvent::Ping(ping::Event {
                peer,
                connection,
                result: Err(error),
            }) if !matches!(error, ping::Failure::Unsupported) => {
                let remote = self.links.get(peer, connection).map(|l| l.remote.to_string());
                info!(%peer, remote = remote.unwrap_or_default(), %error, "pings go unanswered: closing the connection");
                self.swarm.close_connection(connection);
            }
            BehaviourEvent::Dcutr(dcutr::Event { remote_peer_id, result }) => self.hole_punch(remote_peer_id, result),
            BehaviourEvent::RelayClient(relay::client::Event::ReservationReqAccepted {
                relay_peer_id,
                renewal: false,
                ..
            }) => {
                info!(relay = %relay_peer_id, "the relay holds a reservation for us");
            }
            BehaviourEvent::Relay(ev) => {
                if let Some(served) = relay_served(ev) {
                    self.deliver(Inbound::Relayed(served));
                }
            }
            _ => {}
        }
    }

    /// A gossip message on one of our topics goes to the market, which
    /// validates it; one on any other topic is rejected here.
    fn gossip(&mut self, propagation_source: PeerId, message_id: MessageId, message: gossipsub::Message) {
        let topic = if message.topic == IdentTopic::new(TOPIC_ORDERS).hash() {
            Topic::Orders
        } else if message.topic == IdentTopic::new(TOPIC_ADVERTS).hash() {
            Topic::Adverts
        } else {
            let _ = self.swarm.behaviour_mut().gossipsub.report_message_validation_result(
                &message_id,
                &propagation_source,
                MessageAcceptance::Reject,
            );
            return;
        };
        self.deliver(Inbound::Gossip {
            topic,
            author: message.source,
            propagation_source,
            id: message_id,
            bytes: message.data,
        });
    }

    /// Direct messages: one that arrives is taken while the market's queue
    /// has room (else answered Busy, and the sender tries again); the answer
    /// to one we sent settles it and frees a place in the peer's window.
    fn direct_event(&mut self, ev: request_response::Event<Frame, Ack>) {
        match ev {
            request_response::Event::Message { peer, message, .. } => match message {
                request_response::Message::Request {
                    request: Frame::Oversized(len),
                    channel,
                    ..
                } => {
                    debug!(%peer, len, "oversized direct message refused unread");
                    let _ = self.swarm.behaviour_mut().direct.send_response(channel, Ack::Busy);
                    self.deliver(Inbound::Oversized { peer });
                }
                request_response::Message::Request {
                    request: Frame::Message(bytes),
                    channel,
                    ..
                } => {
                    let ack = if self.inbound.capacity() > 0 {
                        Ack::Taken
                    } else {
                        Ack::Busy
                    };
                    let _ = self.swarm.behaviour_mut().direct.send_response(channel, ack);
                    if ack == Ack::Taken {
                        self.deliver(Inbound::Direct { peer, bytes });
                    }
                }
                request_response::Message::Response { request_id, response } => {
                    if let Some(done) = self.pending.remove(&request_id) {
                        let _ = done.send(match response {
                            Ack::Taken => Ok(()),
                            Ack::Busy => Err(SendError::Busy(peer)),
                        });
                        self.settled(peer);
                    }
                }
            },
            request_response::Event::OutboundFailure {
                peer,
                request_id,
                error,
                ..
            } => {
                if let Some(done) = self.pending.remove(&request_id) {
                    let _ = done.send(Err(match error {
                        request_response::OutboundFailure::ConnectionClosed => SendError::ConnectionClosed(peer),
                        error => SendError::Failed {
                            peer,
                            reason: format!("{error:?}"),
                        },
                    }));
                    self.settled(peer);
                }
            }
            request_response::Event::InboundFailure { peer, error, .. } => {
                debug!(%peer, %error, "inbound direct message failed");
            }
            request_response::Event::ResponseSent { .. } => {}
        }
    }

    fn connection_established(
        &mut self,
        peer_id: PeerId,
        connection_id: ConnectionId,
        endpoint: &ConnectedPoint,
        connections: u32,
    ) {
        if endpoint.is_dialer() {
            self.remember(peer_id, endpoint.get_remote_address().clone());
        }
        self.dialling.remove(&peer_id);
        let now = std::time::Instant::now();
        self.links.opened(
            peer_id,
            connection_id,
            Link {
                remote: endpoint.get_remote_address().clone(),
                relayed: endpoint.is_relayed(),
                dialled: endpoint.is_dialer(),
                established: now,
            },
        );
        if self.links.late_circuit(peer_id, connection_id, now) {
            debug!(peer = %peer_id, "closing a circuit that lost the race to a hole punch");
            self.swarm.close_connection(connection_id);
        } else if endpoint.is_relayed() {
            let crossed = self.links.crossed(*self.swarm.local_peer_id(), peer_id);
            self.close(peer_id, crossed);
            let outlived = self.links.outlived(peer_id, connection_id, now);
            if !outlived.is_empty() {
                info!(peer = %peer_id, closed = outlived.len(), "the peer dialled through the relay, so it lost our direct connection (a restart behind its NAT?): closing ours");
                self.close(peer_id, outlived);
            }
        }
        // A relay we could not listen through (it was not up yet)
        // answers now: listen through it now, not at the next tick.
        if self
            .circuits
            .iter()
            .any(|(addr, l)| l.is_none() && peer_of(addr) == Some(peer_id))
        {
            self.listen_through_relays();
        }
        // Every connection, not only a peer's first: a peer that
        // restarts reconnects while its old QUIC connection still
        // looks alive here (until the idle timeout), and what a new
        // connection brings (identity, capacity) must go out again.
        debug!(peer = %peer_id, connections, "peer connected");
        self.deliver(Inbound::Connected { peer: peer_id });
    }

    fn hole_punch(&mut self, peer: PeerId, result: Result<ConnectionId, dcutr::Error>) {
        let outcome = match result {
            Ok(direct) => {
                self.relay_no_more(peer, direct);
                HolePunch::Direct
            }
            // Two members that dialled each other through the relay
            // at once punch over both circuits: the first success
            // closes the other circuit, and its attempt then fails
            // on a peer already reached directly. Not a failure.
            Err(error) if self.links.reached_directly(peer) => {
                debug!(%peer, %error, "a second hole punch ended; the peer is reached directly");
                if self.links.punched_lately(peer, std::time::Instant::now()) {
                    self.close_relayed(peer);
                }
                return;
            }
            Err(error) => {
                info!(%peer, %error, "hole punching failed; the peer stays on the relay unless another attempt succeeds");
                HolePunch::Failed
            }
        };
        self.deliver(Inbound::HolePunch { peer, outcome });
    }
}

/// What serving as a relay did, for the metrics.
fn relay_served(ev: relay::Event) -> Option<RelayServed> {
    match ev {
        relay::Event::ReservationReqAccepted { renewed: false, .. } => Some(RelayServed::Reservation),
        relay::Event::CircuitReqAccepted {
            src_peer_id,
            dst_peer_id,
        } => {
            debug!(src = %src_peer_id, dst = %dst_peer_id, "relaying a connection");
            Some(RelayServed::Circuit)
        }
        relay::Event::ReservationReqDenied { src_peer_id, .. } => {
            info!(peer = %src_peer_id, "relay reservation refused");
            Some(RelayServed::Refused)
        }
        relay::Event::CircuitReqDenied {
            src_peer_id,
            dst_peer_id,
            ..
        } => {
            info!(src = %src_peer_id, dst = %dst_peer_id, "relayed connection refused");
            Some(RelayServed::Refused)
        }
        _ => None,
    }
}

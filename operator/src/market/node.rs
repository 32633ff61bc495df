//! This cluster as a member of the pool: the message loop that opens,
//! checks and dispatches every peer message, and the tables the renter and
//! provider sides share. What it knows of the other members is in `peers`,
//! what it lends and advertises in `supply`. Everything here is I/O;
//! decisions come from the pure modules.

use std::collections::{HashMap, HashSet};
use std::str::FromStr;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use gpupool_chain::{Address, EscrowClient};
use gpupool_crds::price::TokenAmount;
use gpupool_crds::{AiJob, GpuNode, Lease, PoolOrder, Reputation};
use gpupool_proto::peer::v1::envelope::Body;
use gpupool_proto::peer::v1::{CapacityAdvert, GpuOffer};
use k8s_openapi::jiff::Timestamp;
use kube::Client;
use kube::runtime::reflector::{ObjectRef, Store};
use libp2p::PeerId;
use libp2p::gossipsub::MessageAcceptance;
use libp2p::identity::Keypair;
use tokio::sync::mpsc;
use tracing::{Instrument, debug, info, info_span};
use tracing_opentelemetry::OpenTelemetrySpanExt;

use super::bidengine::Supply;
use super::heard::Heard;
use super::peer_writes::Pacing;
use super::policy::ProviderPolicy;
use super::renter_funds::{Payer, Pledge, pledged};
use super::selection::{PeerSupply, Wanted, advertises_fit};
use crate::cache::PodCaches;
use crate::p2p::envelope::{DropReason, Opened, Opener, seal};
use crate::p2p::score::{PeerScores, ScoreParams};
use crate::p2p::swarm::{HolePunch, Inbound, P2p, SendError, Topic};
use crate::promised::{PoolPromise, Promised};
use crate::telemetry::Metrics;

pub const MARKET_MANAGER: &str = "gpupool-market";

/// Peer messages handled at once.
const MAX_IN_FLIGHT: usize = 64;

#[derive(Clone, Debug)]
pub struct MarketSettings {
    pub org: String,
    /// The operator's namespace: its identity Secret and provider Lease copies.
    pub namespace: String,
    pub advert_every: Duration,
    pub heartbeat_every: Duration,
    pub heartbeat_grace: Duration,
    /// How long a bid (and the provider's reservation) stays valid.
    pub bid_ttl: Duration,
    /// The deposit covers this much of the job's time (at most its maxDuration).
    pub deposit_seconds: u64,
    pub message_ttl: Duration,
    /// Message nonces remembered against replays; one sender may fill a
    /// sixteenth of it.
    pub replay_capacity: usize,
    pub policy: ProviderPolicy,
    /// How long a closed provider Lease record stays (zero: for good).
    pub closed_lease_retention: Duration,
    /// Fault injection for tests: every direct message goes out twice
    /// (`--fault-deliver-twice`), the second copy this long after the first
    /// was answered (`--fault-second-copy-after-ms`; zero: both at once).
    pub deliver_twice: Option<Duration>,
}

/// What this cluster knows about another member.
#[derive(Clone, Debug, Default)]
pub struct PeerInfo {
    pub org: String,
    pub wallet: Option<Address>,
    pub addresses: Vec<String>,
    pub offers: Vec<GpuOffer>,
    pub last_seen_ms: u64,
    pub connected: bool,
    /// When its advertised offers last changed: capacity that appears after
    /// an order was published is a reason to ask again before the backoff ends.
    pub offers_changed_ms: u64,
    /// When its PoolPeer is written next.
    pub pacing: Pacing,
    /// Its identity changed since its PoolPeer's spec was last written.
    pub spec_unwritten: bool,
}

/// An order this cluster published and still takes bids for.
#[derive(Clone, Debug)]
pub struct OpenOrder {
    pub aijob: ObjectRef<AiJob>,
    pub uid: String,
    pub order: gpupool_proto::peer::v1::Order,
    pub max_price: TokenAmount,
    pub published_ms: u64,
    pub closes_ms: u64,
    /// Not before this may the order be re-published early because capacity
    /// appeared: at most one order per base window while the pool churns.
    pub repeat_after_ms: u64,
    /// The bids this process recorded for the order.
    pub bids: RecordedBids,
}

/// The bids recorded for one order, and the gate that keeps a recording
/// from straddling the award.
///
/// The award chooses from the Bids it listed; a bid whose Bid was being
/// created while it listed would be recorded after it and stay Open, its
/// provider holding GPUs for a lease that went elsewhere until the bid's TTL.
/// A recording holds the gate shared from its check that the order is open
/// until it is written down here; the award holds it exclusively while it
/// closes the order, so every bid recorded before the close is in `names`,
/// and every one after it is answered as late.
#[derive(Clone, Debug, Default)]
pub struct RecordedBids {
    pub gate: Arc<tokio::sync::RwLock<()>>,
    pub recorded: Vec<RecordedBid>,
    /// The API server refused a Bid for this order because the job's
    /// namespace is being deleted: no order for the job goes out again.
    pub namespace_ending: bool,
}

/// A bid recorded as a Bid resource: what its loser's message needs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RecordedBid {
    /// The Bid resource's name.
    pub name: String,
    pub provider: PeerId,
    pub order_id: String,
    /// The provider's own id for the bid, as it sent it.
    pub bid_id: String,
}

/// Recorded bids of `closed` orders that are not among the bids the award
/// `decided`: nobody else will tell them they lost.
pub fn undecided_bids(closed: Vec<OpenOrder>, decided: &HashSet<String>) -> Vec<RecordedBid> {
    closed
        .into_iter()
        .flat_map(|o| o.bids.recorded)
        .filter(|b| !decided.contains(&b.name))
        .collect()
}

/// GPUs this provider promised in a bid, until the bid lapses or loses.
#[derive(Clone, Debug)]
pub struct Reservation {
    pub order: gpupool_proto::peer::v1::Order,
    pub renter: PeerId,
    pub product: String,
    pub count: u32,
    pub price: TokenAmount,
    pub until_ms: u64,
    /// What the bid counts against its payer's funds while it is open. Gone
    /// once the bid is won: the renter opens the lease, and the deposit
    /// leaves the payer's funds on chain, where the next read sees it.
    pub pledge: Option<Pledge>,
}

/// A renter Lease that a provider's status messages update.
#[derive(Clone, Debug)]
pub struct RenterLease {
    pub namespace: String,
    pub name: String,
    pub aijob: String,
    pub provider: PeerId,
}

#[derive(Debug)]
pub(crate) struct State {
    pub opener: Opener,
    pub scores: PeerScores,
    pub peers: HashMap<PeerId, PeerInfo>,
    pub orgs: HashMap<String, PeerId>,
    pub orders: HashMap<String, OpenOrder>,
    pub reservations: HashMap<String, Reservation>,
    /// On-chain lease id (0x hex) → renter Lease.
    pub renter_leases: HashMap<String, RenterLease>,
    /// On-chain lease id → what its provider last said.
    pub heard: HashMap<String, Heard>,
    /// GPUs lent in provider leases that are not closed.
    pub lent: u32,
    /// Lease ids whose offer is being handled, so a resent offer is not run twice.
    pub accepting: std::collections::HashSet<String>,
    /// Bids of ours whose reservation lapsed or was released, and when: an
    /// offer for one is refused without holding it against the renter.
    pub released_bids: HashMap<String, u64>,
    /// Orders that stopped taking bids, and when: late bids for them are not
    /// held against the bidder.
    pub closed_orders: HashMap<String, u64>,
    /// AiJob uid → the order this process last decided for it, and when. The
    /// controller hands reconciles the cached AiJob, whose status can lag our
    /// own last write by more than a requeue under load; an order read back
    /// from a stale status forgot its lease and was published again, which
    /// opened a second live lease for one job.
    pub job_orders: HashMap<String, (PoolOrder, u64)>,
    /// Lease namespace → (renter, on-chain lease id) for the workloads this
    /// provider runs, so a change in one is reported at once, not at the next beat.
    pub workloads: HashMap<String, (PeerId, String)>,
    /// Lease ids whose namespace this provider saw gone or deleted: a closed
    /// Lease stays as a record, and asking after its namespace on every beat
    /// was most of a provider's API requests once leases had come and gone.
    pub cleaned_up: std::collections::HashSet<String>,
    /// When jobs waiting out a backoff were let ask again because capacity
    /// appeared: at most as many at a time as the adverts have room for.
    pub room_claims: Vec<u64>,
    /// On-chain lease id → the turn to write its renter Lease's status.
    pub status_writes: HashMap<String, Arc<tokio::sync::Mutex<()>>>,
    /// Lease namespace → the workload's status as the controller last wrote
    /// it, newer than the controller's cache until the watch catches up.
    pub workload_status: HashMap<String, gpupool_crds::AiJobStatus>,
    /// Last time the renter leases were re-listed for an unknown lease id;
    /// bounds the API calls a stream of bogus status messages can cause.
    pub lease_refresh_ms: u64,
    /// Leases completed and failed by org: read from the PoolPeers once,
    /// then kept here and written with each PoolPeer's status. Read and
    /// written through the API, it was a PoolPeer list per award and a read
    /// and a write per closed lease. None until the first read succeeds.
    pub reputation: Option<HashMap<String, Reputation>>,
    pub closes_asked: super::renter::ClosesAsked,
    /// Lease namespace → the GPUs of a lease this provider accepted, until
    /// the workload's pod shows up bound in the pod cache. Between the
    /// accept (which ends the bid's reservation) and that pod, the GPUs
    /// looked free, and a burst of orders got bids for them: 51 leases
    /// accepted for 48 A100s, three of them paid for and never run.
    pub unbound: HashMap<String, Unbound>,
    /// The latest capacity advert of each connected peer that has not
    /// introduced itself yet, applied when its identity arrives. A peer
    /// sends both straight after connecting, but inbound messages are
    /// handled concurrently, so the advert can be read first; dropped, a
    /// restarted member heard nothing of a lender until its next periodic
    /// advert (5 s by default). At most [`EARLY_ADVERTS`] peers.
    pub early_adverts: HashMap<PeerId, Vec<GpuOffer>>,
    /// Payers' spendable funds as last read from the chain, for orders.
    pub funds_seen: super::renter_funds::FundsSeen,
}

/// Peers whose advert is kept while they have not introduced themselves.
pub const EARLY_ADVERTS: usize = 1024;

/// An accepted lease's GPUs, not yet held by a bound pod.
#[derive(Clone, Debug)]
pub struct Unbound {
    pub product: String,
    pub count: u32,
    pub until_ms: u64,
}

/// How long an accepted lease's GPUs count as taken without a bound pod:
/// past it, a workload that waits is the local controller's to explain.
pub const UNBOUND_HOLD_MS: u64 = 120_000;

impl State {
    /// The GPUs accepted leases hold before their pods are bound, one
    /// promise per lease, leaving out the namespaces in `skip`; forgets the
    /// holds whose pod is bound (`bound`: namespaces with a live pod on a
    /// node) or whose time ran out.
    pub fn held_unbound(&mut self, now: u64, bound: &HashSet<&str>, skip: &HashSet<&str>) -> Vec<PoolPromise> {
        self.unbound
            .retain(|ns, u| u.until_ms > now && !bound.contains(ns.as_str()));
        self.unbound
            .iter()
            .filter(|(ns, _)| !skip.contains(ns.as_str()))
            .map(|(_, u)| PoolPromise {
                product: u.product.clone(),
                count: u.count,
            })
            .collect()
    }

    /// Open and won bids' GPUs, one promise per bid.
    pub fn held_by_bids(&self, now: u64) -> Vec<PoolPromise> {
        self.reservations
            .values()
            .filter(|r| r.until_ms > now)
            .map(|r| PoolPromise {
                product: r.product.clone(),
                count: r.count,
            })
            .collect()
    }

    /// GPUs `renter_org`'s open and won bids hold here, not yet leases.
    pub fn held_for_renter(&self, renter_org: &str, now: u64) -> u32 {
        self.reservations
            .values()
            .filter(|r| r.until_ms > now && r.order.renter_org == renter_org)
            .map(|r| r.count)
            .sum()
    }

    /// What this provider's open bids other than `except` count against
    /// `payer`'s funds.
    pub fn pledged_by(&self, payer: &Payer, except: &str) -> u128 {
        pledged(
            self.reservations
                .iter()
                .filter(|(id, _)| id.as_str() != except)
                .filter_map(|(_, r)| r.pledge.as_ref()),
            payer,
        )
    }

    /// Claims one of `room` orders' worth of advertised capacity for `hold_ms`;
    /// false when earlier claims still hold all of it.
    pub fn claim_room(&mut self, now: u64, hold_ms: u64, room: u32) -> bool {
        self.room_claims.retain(|t| now.saturating_sub(*t) < hold_ms);
        if self.room_claims.len() >= room as usize {
            return false;
        }
        self.room_claims.push(now);
        true
    }

    pub fn new(opener: Opener) -> Self {
        Self {
            opener,
            scores: PeerScores::new(ScoreParams::default()),
            peers: HashMap::new(),
            orgs: HashMap::new(),
            orders: HashMap::new(),
            reservations: HashMap::new(),
            renter_leases: HashMap::new(),
            heard: HashMap::new(),
            lent: 0,
            accepting: Default::default(),
            released_bids: HashMap::new(),
            closed_orders: HashMap::new(),
            workloads: HashMap::new(),
            cleaned_up: Default::default(),
            status_writes: HashMap::new(),
            room_claims: Vec::new(),
            workload_status: HashMap::new(),
            job_orders: HashMap::new(),
            unbound: HashMap::new(),
            lease_refresh_ms: 0,
            reputation: None,
            closes_asked: Default::default(),
            early_adverts: HashMap::new(),
            funds_seen: Default::default(),
        }
    }

    /// Drops one bid's reservation, remembering the bid for ten minutes.
    pub fn release_bid(&mut self, bid_id: &str, now: u64) {
        if self.reservations.remove(bid_id).is_some() {
            self.released_bids.insert(bid_id.to_string(), now);
        }
        if self.released_bids.len() > 10_000 {
            self.released_bids.retain(|_, t| now.saturating_sub(*t) < 600_000);
        }
    }

    /// Drops the reservations whose bids have expired.
    pub fn release_lapsed(&mut self, now: u64) {
        let lapsed: Vec<String> = self
            .reservations
            .iter()
            .filter(|(_, r)| r.until_ms <= now)
            .map(|(id, _)| id.clone())
            .collect();
        for id in lapsed {
            self.release_bid(&id, now);
        }
    }

    /// The further along of the order in a (maybe stale) status and the one
    /// this process last decided: attempts only grow, and within one attempt
    /// a lease is only ever added.
    pub fn latest_order(&self, uid: &str, from_status: PoolOrder) -> PoolOrder {
        let progress = |o: &PoolOrder| (o.attempt, o.lease.is_some());
        match self.job_orders.get(uid) {
            Some((mem, _)) if progress(mem) > progress(&from_status) => mem.clone(),
            _ => from_status,
        }
    }

    /// Remembers the order decided for job `uid`; forgets it once the job is over.
    pub fn remember_order(&mut self, uid: &str, order: &PoolOrder, over: bool, now: u64) {
        if over {
            self.job_orders.remove(uid);
            return;
        }
        if self.job_orders.len() > 50_000 {
            // A cache lags seconds, not an hour.
            self.job_orders.retain(|_, (_, t)| now.saturating_sub(*t) < 3_600_000);
        }
        self.job_orders.insert(uid.to_string(), (order.clone(), now));
    }

    /// Stops taking bids for the orders `drop` selects, remembering them for
    /// ten minutes; returns them.
    pub fn close_orders(&mut self, now: u64, mut drop: impl FnMut(&OpenOrder) -> bool) -> Vec<OpenOrder> {
        let ids: Vec<String> = self
            .orders
            .iter()
            .filter(|(_, o)| drop(o))
            .map(|(k, _)| k.clone())
            .collect();
        let mut closed = Vec::with_capacity(ids.len());
        for id in ids {
            if let Some(o) = self.orders.remove(&id) {
                closed.push(o);
            }
            self.closed_orders.insert(id, now);
        }
        self.closed_orders.retain(|_, t| now.saturating_sub(*t) < 600_000);
        closed
    }
}

/// What the market reads of the controller's: its caches, and its
/// placements in flight.
pub struct Stores {
    pub gpunodes: Store<GpuNode>,
    pub gpunodes_listed: crate::listed::Listed,
    pub pods: PodCaches,
    /// The controller's placements in flight, and the lock both decide under.
    pub promised: Arc<Promised>,
}

impl Stores {
    /// Whether every GPU and every pod that holds one has been listed:
    /// before that, this cluster's free GPUs cannot be counted.
    pub fn counted(&self) -> bool {
        self.gpunodes_listed.is_listed() && self.pods.ours_listed.is_listed() && self.pods.others_listed.is_listed()
    }

    /// Waits until [`Self::counted`].
    pub async fn wait_counted(&self) -> Result<(), crate::listed::WatchStopped> {
        self.gpunodes_listed.wait().await?;
        self.pods.wait_until_ready().await
    }
}

/// One member of the pool.
pub struct Market {
    pub(crate) p2p: P2p,
    pub(crate) key: Keypair,
    pub(crate) client: Client,
    pub(crate) chain: Arc<EscrowClient>,
    pub(crate) wallet: Address,
    /// The wallet's signature binding it to this peer id and org, sent in
    /// every identity record (`gpupool_chain::identity_proof`).
    pub(crate) wallet_proof: Vec<u8>,
    pub(crate) settings: MarketSettings,
    pub(crate) metrics: Arc<Metrics>,
    pub(crate) state: Mutex<State>,
    pub(crate) stores: OnceLock<Stores>,
    /// The renter's Leases as the AiJob controller's watch sees them. Under
    /// a burst, reading each job's Lease from the API server on every step
    /// was the renter's most frequent request.
    pub(crate) lease_cache: OnceLock<(Store<Lease>, crate::listed::Listed)>,
    /// The AiJob controller's cache, where a provider reads the workloads it
    /// runs for its heartbeats.
    pub(crate) aijob_cache: OnceLock<Store<AiJob>>,
    pub(crate) wake: mpsc::Sender<ObjectRef<AiJob>>,
    /// Pokes the advert loop when free capacity here may have changed.
    pub(crate) capacity_changed: tokio::sync::Notify,
    /// When this process started: a provider cannot be blamed for beats
    /// sent while we were down, so no grace window starts earlier.
    pub(crate) started_ms: u64,
}

pub fn now_ms() -> u64 {
    u64::try_from(Timestamp::now().as_millisecond()).unwrap_or(0)
}

fn kind_of(b: &Body) -> &'static str {
    match b {
        Body::Identity(_) => "identity",
        Body::Capacity(_) => "capacity",
        Body::Order(_) => "order",
        Body::Bid(_) => "bid",
        Body::LeaseOffer(_) => "lease_offer",
        Body::LeaseStatus(_) => "lease_status",
        Body::Heartbeat(_) => "heartbeat",
        Body::BidResult(_) => "bid_result",
    }
}

/// PoolPeer names are the organisation, lowercased into a DNS label.
pub fn poolpeer_name(org: &str) -> String {
    let s: String = org
        .to_ascii_lowercase()
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() || c == '-' { c } else { '-' })
        .collect();
    s.trim_matches('-').chars().take(63).collect()
}

impl Market {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        p2p: P2p,
        key: Keypair,
        client: Client,
        chain: Arc<EscrowClient>,
        wallet: &gpupool_chain::Wallet,
        settings: MarketSettings,
        metrics: Arc<Metrics>,
        wake: mpsc::Sender<ObjectRef<AiJob>>,
    ) -> Arc<Self> {
        let wallet_proof = wallet.prove_identity(&key.public().to_peer_id().to_string(), &settings.org);
        let ttl = u64::try_from(settings.message_ttl.as_millis()).unwrap_or(u64::MAX);
        Arc::new(Self {
            p2p,
            key,
            client,
            chain,
            wallet: wallet.address(),
            wallet_proof,
            metrics,
            // Nonces are remembered for at most 15 minutes of messages.
            state: Mutex::new(State::new(Opener::new(
                ttl.max(15 * 60 * 1000),
                settings.replay_capacity,
            ))),
            settings,
            stores: OnceLock::new(),
            lease_cache: OnceLock::new(),
            aijob_cache: OnceLock::new(),
            wake,
            capacity_changed: tokio::sync::Notify::new(),
            started_ms: now_ms(),
        })
    }

    pub fn org(&self) -> &str {
        &self.settings.org
    }

    pub fn peer_id(&self) -> PeerId {
        self.p2p.local_peer_id()
    }

    /// Hands the controller's caches and placements in flight to the market
    /// (GPU supply for bids and adverts).
    pub fn attach_stores(&self, stores: Stores) {
        let _ = self.stores.set(stores);
    }

    /// Hands the market a cache of the renter's Leases, filled by the watch
    /// that wakes the AiJob controller.
    pub fn attach_lease_cache(&self, leases: Store<Lease>, listed: crate::listed::Listed) {
        let _ = self.lease_cache.set((leases, listed));
    }

    /// The Lease cache, once its first list is in; until then callers ask
    /// the API server.
    pub(crate) fn ready_lease_cache(&self) -> Option<&Store<Lease>> {
        self.lease_cache
            .get()
            .filter(|(_, listed)| listed.is_listed())
            .map(|(store, _)| store)
    }

    /// Hands the market the AiJob controller's own cache.
    pub fn attach_aijob_cache(&self, aijobs: Store<AiJob>) {
        let _ = self.aijob_cache.set(aijobs);
    }

    pub(crate) fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        // A panic while holding the lock leaves plain maps; keep going.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub(crate) fn seal(&self, body: Body) -> Vec<u8> {
        // Whatever span sends it (a job's reconcile, the handling of a peer's
        // message) continues on the receiving side.
        seal(
            &self.key,
            body,
            now_ms(),
            self.message_ttl_ms(),
            crate::tracecontext::current_headers(),
        )
    }

    fn message_ttl_ms(&self) -> u64 {
        u64::try_from(self.settings.message_ttl.as_millis()).unwrap_or(60_000)
    }

    /// Sends `body` sealed, and sealed anew while the connection it went
    /// out on closes under it, a few times at most (`p2p::resend`).
    pub(crate) async fn send(&self, peer: PeerId, body: Body) -> Result<(), SendError> {
        let once = || crate::p2p::resend::resent_on_close(|| self.p2p.send(peer, self.seal(body.clone())));
        match self.settings.deliver_twice {
            None => once().await,
            // Both at once: the receiver may still be handling the first copy
            // when the second arrives, as after a real resend.
            Some(after) if after.is_zero() => {
                let (first, second) = tokio::join!(once(), once());
                first.or(second)
            }
            Some(after) => {
                let first = once().await;
                self.send_copy_later(peer, body, after);
                first
            }
        }
    }

    /// Fault injection: a second copy of `body`, sealed anew, `after` the
    /// first was answered, as a resend that waited on a new connection
    /// delivers it, by then behind whatever was sent since. Not awaited: the
    /// caller goes on, and sends its next messages, meanwhile.
    fn send_copy_later(&self, peer: PeerId, body: Body, after: Duration) {
        let (p2p, key, ttl) = (self.p2p.clone(), self.key.clone(), self.message_ttl_ms());
        let headers = crate::tracecontext::current_headers();
        let kind = kind_of(&body);
        tokio::spawn(async move {
            tokio::time::sleep(after).await;
            if let Err(e) = p2p.send(peer, seal(&key, body, now_ms(), ttl, headers)).await {
                debug!(%peer, kind, error = %e, "the late copy of a message was not delivered");
            }
        });
    }

    /// Sends without waiting for the answer. Heartbeats and status reports go
    /// out on a schedule, and one that waits on a connection which died
    /// without closing (a renter killed mid-stream; a QUIC path gone silent)
    /// fails only at the request timeout: awaited, it held back every later
    /// beat, for every lease, past the renters' grace windows. Each send ends
    /// by the request timeout, so at most timeout / interval of them are in
    /// flight per lease. `about` names what was sent, for the log: a lost
    /// one is only logged, because the next one on the schedule follows.
    pub(crate) fn send_detached(self: &Arc<Self>, peer: PeerId, body: Body, about: &str) {
        self.send_detached_in_order(peer, vec![body], 1, about);
    }

    /// [`Self::send_detached`] for messages that must arrive in order: each
    /// is sent once the one before it was answered, up to `attempts` times
    /// (a peer's requests take turns over its connections, and one of them
    /// may be a dead one not yet timed out), and the rest are left once one
    /// is lost.
    pub(crate) fn send_detached_in_order(
        self: &Arc<Self>,
        peer: PeerId,
        bodies: Vec<Body>,
        attempts: u32,
        about: &str,
    ) {
        let me = self.clone();
        let about = about.to_string();
        tokio::spawn(
            async move {
                for body in bodies {
                    let mut sent = false;
                    for _ in 0..attempts.max(1) {
                        match me.send(peer, body.clone()).await {
                            Ok(()) => {
                                sent = true;
                                break;
                            }
                            Err(e) => debug!(%peer, %about, error = %e, "message not delivered"),
                        }
                    }
                    if !sent {
                        break;
                    }
                }
            }
            .in_current_span(),
        );
    }

    /// Counts a dropped message against its sender and bans it past the line.
    pub(crate) async fn drop_message(&self, peer: Option<PeerId>, reason: DropReason, detail: &str) {
        self.metrics.message_dropped(reason.as_str());
        let Some(peer) = peer else { return };
        let now = now_ms();
        let (score, was_banned, banned) = {
            let mut st = self.lock();
            let was_banned = st.scores.is_banned(&peer, now);
            let score = st.scores.penalise(peer, reason, now);
            (score, was_banned, st.scores.is_banned(&peer, now))
        };
        debug!(%peer, reason = reason.as_str(), score, detail, "dropped peer message");
        if banned {
            // Counted once per ban: a flood's messages still in flight when
            // the ban falls are dropped as banned, and each of them counted
            // as another ban.
            if !was_banned {
                self.metrics.peer_banned();
            }
            self.p2p.ban(peer).await;
        }
    }

    /// Runs the message loop and the advert ticker until the swarm stops.
    /// Messages are handled concurrently, up to a bound: most of them wait on
    /// the API server (a bid is two writes), and one at a time fell minutes
    /// behind under a burst of orders, until heartbeats were read too late.
    pub async fn run(self: Arc<Self>, mut inbound: mpsc::Receiver<Inbound>) {
        let adverts = tokio::spawn(self.clone().advertise_forever());
        let provider = tokio::spawn(self.clone().provider_forever());
        let permits = Arc::new(tokio::sync::Semaphore::new(MAX_IN_FLIGHT));
        while let Some(msg) = inbound.recv().await {
            let Ok(permit) = permits.clone().acquire_owned().await else {
                break;
            };
            let me = self.clone();
            tokio::spawn(async move {
                me.handle(msg).await;
                drop(permit);
            });
        }
        adverts.abort();
        provider.abort();
    }

    async fn handle(self: Arc<Self>, msg: Inbound) {
        let now = now_ms();
        match msg {
            Inbound::Gossip {
                author,
                propagation_source,
                id,
                bytes,
                topic,
            } => {
                let banned = author.is_some_and(|a| self.lock().scores.is_banned(&a, now));
                let opened = if banned {
                    Err(DropReason::Banned)
                } else {
                    self.lock().opener.open(&bytes, author, now)
                };
                match opened {
                    Ok(o) if topic_allows(topic, &o.body) => {
                        self.p2p
                            .validated(id, propagation_source, MessageAcceptance::Accept)
                            .await;
                        self.dispatch(o).await;
                    }
                    Ok(o) => {
                        self.p2p
                            .validated(id, propagation_source, MessageAcceptance::Reject)
                            .await;
                        self.drop_message(Some(o.sender), DropReason::Malformed, "wrong topic")
                            .await;
                    }
                    Err(reason) => {
                        // Neither a copy we have seen nor a flooder's excess
                        // is the forwarder's fault; neither travels on.
                        let accept = if matches!(reason, DropReason::Replayed | DropReason::Flooding) {
                            MessageAcceptance::Ignore
                        } else {
                            MessageAcceptance::Reject
                        };
                        self.p2p.validated(id, propagation_source, accept).await;
                        self.drop_message(author.or(Some(propagation_source)), reason, "gossip")
                            .await;
                    }
                }
            }
            Inbound::Direct { peer, bytes } => {
                if self.lock().scores.is_banned(&peer, now) {
                    self.drop_message(Some(peer), DropReason::Banned, "direct").await;
                    return;
                }
                let opened = self.lock().opener.open(&bytes, Some(peer), now);
                match opened {
                    Ok(o) if direct_allows(&o.body) => self.dispatch(o).await,
                    Ok(o) => {
                        self.drop_message(Some(o.sender), DropReason::Malformed, "gossip body sent directly")
                            .await
                    }
                    Err(reason) => self.drop_message(Some(peer), reason, "direct").await,
                }
            }
            Inbound::Oversized { peer } => self.drop_message(Some(peer), DropReason::Oversized, "frame").await,
            Inbound::Relayed(what) => self.metrics.relay_served(what.as_str()),
            Inbound::HolePunch { peer, outcome } => {
                self.metrics.hole_punched(outcome.as_str());
                if outcome == HolePunch::Direct {
                    // Its PoolPeer says Direct from the next flush on.
                    if let Some(p) = self.lock().peers.get_mut(&peer) {
                        p.pacing.write_next();
                    }
                }
            }
            Inbound::Connected { peer } | Inbound::Disconnected { peer } => {
                let connected = matches!(msg, Inbound::Connected { .. });
                let n = {
                    let mut st = self.lock();
                    if let Some(p) = st.peers.get_mut(&peer) {
                        p.connected = connected;
                        p.pacing.write_next();
                    }
                    if !connected {
                        st.early_adverts.remove(&peer);
                    }
                    st.peers.values().filter(|p| p.connected).count()
                };
                let info = self.p2p.info().await;
                self.metrics.peers_connected(info.connected.len().max(n));
                self.observe_pool_supply();
                if connected {
                    // A new peer learns who we are now, not at our next
                    // periodic advert (5 s by default): until then a renter
                    // drops our bids, unable to name the org that sent them,
                    // and our GPUs stay reserved for bids that were lost.
                    // Our capacity follows the identity (a peer reads adverts
                    // only from members it can name), so a member that has
                    // just started can order from us at once instead of
                    // hearing "no peer has room" until the next advert.
                    // Undelivered, the periodic advert carries both.
                    let mut bodies = vec![self.identity_record(&info)];
                    let offers = self.offers();
                    if !offers.is_empty() {
                        bodies.push(Body::Capacity(CapacityAdvert { offers }));
                    }
                    self.send_detached_in_order(peer, bodies, 2, "identity and capacity");
                }
            }
        }
    }

    /// Handles one opened message. One that carries a trace context (sent
    /// on behalf of a job) is handled in a span of that trace; adverts and
    /// heartbeats carry none and get no span, or every beat would be a trace.
    async fn dispatch(self: Arc<Self>, o: Opened) {
        let span = match crate::tracecontext::extract(&o.trace_context) {
            Some(parent) => {
                let span = info_span!("peer.receive", kind = kind_of(&o.body), from = %o.sender);
                // Fails only when spans are not exported.
                let _ = span.set_parent(parent);
                span
            }
            None => tracing::Span::none(),
        };
        self.dispatch_in_span(o).instrument(span).await
    }

    async fn dispatch_in_span(self: Arc<Self>, o: Opened) {
        self.metrics.message_received(kind_of(&o.body));
        let sender = o.sender;
        let result = match o.body {
            Body::Identity(r) => self.on_identity(sender, r).await,
            Body::Capacity(c) => self.on_capacity(sender, c).await,
            Body::Order(order) => self.clone().on_order(sender, order).await,
            Body::Bid(b) => self.on_bid(sender, b).await,
            Body::LeaseOffer(l) => self.clone().on_lease_offer(sender, l).await,
            Body::LeaseStatus(s) => {
                self.on_lease_status(sender, Some(s.clone()), &s.lease_id, o.expires_at_ms)
                    .await
            }
            Body::Heartbeat(h) => self.on_lease_status(sender, None, &h.lease_id, o.expires_at_ms).await,
            Body::BidResult(r) => self.on_bid_result(sender, r).await,
        };
        if let Err((reason, detail)) = result {
            self.drop_message(Some(sender), reason, &detail).await;
        }
    }

    /// The org a sender proved with its identity record.
    pub(crate) fn org_of(&self, peer: &PeerId) -> Option<String> {
        self.lock()
            .peers
            .get(peer)
            .map(|p| p.org.clone())
            .filter(|o| !o.is_empty())
    }

    pub(crate) async fn wake(&self, aijob: ObjectRef<AiJob>) {
        if self.wake.try_send(aijob).is_err() {
            debug!("reconcile trigger queue full");
        }
    }

    pub fn log_started(&self) {
        info!(org = %self.settings.org, peer = %self.peer_id(), wallet = %self.wallet, "pool market started");
    }
}

pub(super) fn peer_supply(p: &PeerInfo) -> PeerSupply {
    PeerSupply {
        org: p.org.clone(),
        offers: p
            .offers
            .iter()
            .map(|o| {
                (
                    Supply {
                        product: o.product.clone(),
                        memory_mib: o.memory_mib,
                        free: o.free,
                        max_per_node: o.max_per_node,
                    },
                    TokenAmount::from_str(&o.price_per_gpu_hour).ok(),
                )
            })
            .collect(),
    }
}

/// Whether one of `peers` advertises what `order` asks, at its price.
pub(super) fn order_fits(order: &OpenOrder, peers: &[PeerSupply]) -> bool {
    let Some(gpus) = order.order.gpus.as_ref() else {
        return false;
    };
    let w = Wanted {
        count: gpus.count,
        models: &gpus.models,
        min_memory_mib: gpus.min_memory_mib,
        max_price: order.max_price,
        allowed_orgs: &order.order.allowed_orgs,
        denied_orgs: &order.order.denied_orgs,
        excluded_orgs: &[],
    };
    advertises_fit(&w, peers)
}

/// Orders belong on gossip; identity and capacity go both ways (to a peer
/// that has just connected, directly); everything else is direct.
fn direct_allows(body: &Body) -> bool {
    !matches!(body, Body::Order(_))
}

/// Identity, capacity and orders belong on gossip; everything else is direct.
fn topic_allows(topic: Topic, body: &Body) -> bool {
    match topic {
        Topic::Adverts => matches!(body, Body::Identity(_) | Body::Capacity(_)),
        Topic::Orders => matches!(body, Body::Order(_)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use gpupool_proto::peer::v1::IdentityRecord;

    #[test]
    fn orders_travel_only_on_gossip_and_adverts_either_way() {
        let order = Body::Order(Default::default());
        let capacity = Body::Capacity(CapacityAdvert::default());
        let identity = Body::Identity(IdentityRecord::default());
        let bid = Body::Bid(Default::default());
        assert!(!direct_allows(&order), "orders go to the whole pool, on gossip");
        assert!(
            direct_allows(&capacity) && direct_allows(&identity),
            "sent to a peer on connect"
        );
        assert!(direct_allows(&bid));
        assert!(topic_allows(Topic::Orders, &order) && !topic_allows(Topic::Adverts, &order));
        assert!(topic_allows(Topic::Adverts, &capacity) && topic_allows(Topic::Adverts, &identity));
        assert!(!topic_allows(Topic::Adverts, &bid) && !topic_allows(Topic::Orders, &bid));
    }

    #[test]
    fn accepted_gpus_count_as_taken_until_their_pod_is_bound_or_the_hold_ends() {
        let mut st = State::new(Opener::new(60_000, 16));
        let unbound = |count, until_ms| Unbound {
            product: "A100".into(),
            count,
            until_ms,
        };
        st.unbound.insert("gpupool-lease-a".into(), unbound(2, 10_000));
        st.unbound.insert("gpupool-lease-b".into(), unbound(1, 10_000));
        st.unbound.insert("gpupool-lease-c".into(), unbound(4, 3_000));
        let none = HashSet::new();
        let total = |held: Vec<PoolPromise>| held.iter().map(|p| p.count).sum::<u32>();
        assert_eq!(total(st.held_unbound(1_000, &none, &none)), 7, "accepted, no pods yet");
        let a = HashSet::from(["gpupool-lease-a"]);
        assert_eq!(
            total(st.held_unbound(1_500, &none, &a)),
            5,
            "a's workload has the controller's promise: counted there, not twice"
        );
        assert_eq!(st.unbound.len(), 3, "a promise elsewhere does not end the hold");
        assert_eq!(
            total(st.held_unbound(2_000, &a, &none)),
            5,
            "a's pod is bound: its GPUs count there"
        );
        assert_eq!(total(st.held_unbound(5_000, &none, &none)), 1, "c's hold ran out");
        assert!(st.held_unbound(10_000, &none, &none).is_empty());
        assert!(st.unbound.is_empty());
    }

    fn reservation(renter: PeerId) -> Reservation {
        Reservation {
            order: Default::default(),
            renter,
            product: "NVIDIA A100-SXM4-40GB".into(),
            count: 1,
            price: "2".parse().unwrap(),
            until_ms: 10_000,
            pledge: None,
        }
    }

    fn order(attempt: i32, lease: Option<&str>) -> PoolOrder {
        PoolOrder {
            id: format!("acme-u-{attempt}"),
            attempt,
            lease: lease.map(String::from),
            ..Default::default()
        }
    }

    #[test]
    fn a_stale_status_never_rolls_an_order_back() {
        let mut st = State::new(Opener::new(60_000, 16));
        // Nothing remembered (a fresh process): the status is the truth.
        assert_eq!(st.latest_order("u", order(2, None)), order(2, None));
        st.remember_order("u", &order(1, Some("j-1")), false, 1_000);
        // The cache still shows the order before the award: memory wins.
        assert_eq!(st.latest_order("u", order(1, None)), order(1, Some("j-1")));
        assert_eq!(st.latest_order("u", PoolOrder::default()), order(1, Some("j-1")));
        // The status caught up, then moved on (another process, a re-auction).
        assert_eq!(st.latest_order("u", order(1, Some("j-1"))), order(1, Some("j-1")));
        assert_eq!(st.latest_order("u", order(2, None)), order(2, None));
        // Other jobs are not affected, and a finished job is forgotten.
        assert_eq!(st.latest_order("v", order(1, None)), order(1, None));
        st.remember_order("u", &order(1, Some("j-1")), true, 2_000);
        assert!(st.job_orders.is_empty());
    }

    #[test]
    fn room_for_two_wakes_two_jobs() {
        let mut st = State::new(Opener::new(60_000, 16));
        assert!(st.claim_room(1_000, 800, 2));
        assert!(st.claim_room(1_010, 800, 2));
        assert!(!st.claim_room(1_020, 800, 2), "a third job waits");
        assert!(!st.claim_room(1_020, 800, 0), "no room, no claim");
        // The first orders' windows are over: their GPUs are won or released.
        assert!(st.claim_room(1_805, 800, 2));
        assert!(st.claim_room(1_900, 800, 2));
        assert!(!st.claim_room(1_900, 800, 2));
    }

    #[test]
    fn a_payers_pledges_are_its_open_bids_here_but_the_one_being_weighed() {
        let mut st = State::new(Opener::new(60_000, 16));
        let renter = PeerId::random();
        let payer = Payer::Own(Address::repeat_byte(0x7e));
        let other = Payer::Own(Address::repeat_byte(0x0b));
        let pledged_to = |p: Payer, deposit: u128| {
            let mut r = reservation(renter);
            r.pledge = Some(Pledge { payer: p, deposit });
            r
        };
        st.reservations.insert("bravo-o-1".into(), pledged_to(payer, 10));
        st.reservations.insert("bravo-o-2".into(), pledged_to(payer, 20));
        st.reservations.insert("bravo-o-3".into(), pledged_to(other, 40));
        st.reservations.insert("bravo-o-4".into(), reservation(renter)); // won
        assert_eq!(st.pledged_by(&payer, "bravo-o-9"), 30);
        assert_eq!(st.pledged_by(&payer, "bravo-o-2"), 10, "not the bid being weighed");
        assert_eq!(st.pledged_by(&other, ""), 40);
        st.release_bid("bravo-o-1", 5_000);
        assert_eq!(st.pledged_by(&payer, ""), 20, "a released bid pledges nothing");
    }

    #[test]
    fn released_bids_are_remembered() {
        let mut st = State::new(Opener::new(60_000, 16));
        let renter = PeerId::random();
        st.reservations.insert("bravo-o-1".into(), reservation(renter));
        st.reservations.insert("bravo-o-2".into(), reservation(renter));
        st.release_bid("bravo-o-1", 5_000);
        assert!(!st.reservations.contains_key("bravo-o-1"));
        assert!(st.reservations.contains_key("bravo-o-2"));
        assert_eq!(st.released_bids.get("bravo-o-1"), Some(&5_000));
        assert!(!st.released_bids.contains_key("bravo-o-2"));
    }

    /// acme's order for job uid `u`: 4×A100 at most 3, corvus denied.
    fn open_order(id: &str) -> OpenOrder {
        OpenOrder {
            aijob: ObjectRef::new("j").within("ns"),
            uid: "u".into(),
            order: gpupool_proto::peer::v1::Order {
                order_id: id.into(),
                renter_org: "acme".into(),
                gpus: Some(gpupool_proto::peer::v1::GpuRequirements {
                    count: 4,
                    models: vec!["A100".into()],
                    ..Default::default()
                }),
                max_price_per_gpu_hour: "3".into(),
                denied_orgs: vec!["corvus".into()],
                ..Default::default()
            },
            max_price: "3".parse().unwrap(),
            published_ms: 0,
            closes_ms: 30_000,
            repeat_after_ms: 300,
            bids: Default::default(),
        }
    }

    #[test]
    fn the_award_hears_of_every_recorded_bid_it_did_not_decide() {
        let mut st = State::new(Opener::new(60_000, 16));
        let (bravo, corvus) = (PeerId::random(), PeerId::random());
        let recorded = |name: &str, provider: PeerId, order_id: &str| RecordedBid {
            name: name.into(),
            provider,
            order_id: order_id.into(),
            bid_id: format!("{name}-wire"),
        };
        // An earlier attempt still taking bids, this attempt, and another job's order.
        let mut first = open_order("acme-u-1");
        first.bids.recorded.push(recorded("j-bravo-1", bravo, "acme-u-1"));
        let mut second = open_order("acme-u-2");
        second.bids.recorded.push(recorded("j-bravo-2", bravo, "acme-u-2"));
        second.bids.recorded.push(recorded("j-corvus-2", corvus, "acme-u-2"));
        let mut other = open_order("acme-v-1");
        other.uid = "v".into();
        other.bids.recorded.push(recorded("k-bravo-1", bravo, "acme-v-1"));
        for o in [first, second, other] {
            st.orders.insert(o.order.order_id.clone(), o);
        }
        let closed = st.close_orders(1_000, |o| o.uid == "u");
        assert_eq!(closed.len(), 2);
        assert!(st.closed_orders.contains_key("acme-u-1") && st.closed_orders.contains_key("acme-u-2"));
        assert!(st.orders.contains_key("acme-v-1"), "another job's order stays open");
        // The award listed bravo's two bids; corvus's was recorded while it chose.
        let decided = HashSet::from(["j-bravo-1".to_string(), "j-bravo-2".to_string()]);
        assert_eq!(
            undecided_bids(closed, &decided),
            vec![recorded("j-corvus-2", corvus, "acme-u-2")]
        );
    }

    #[test]
    fn an_advert_that_fits_wakes_a_waiting_order() {
        let order = open_order("acme-u-2");
        let peer = |org: &str, free: u32, price: &str| PeerSupply {
            org: org.into(),
            offers: vec![(
                Supply {
                    product: "NVIDIA A100-SXM4-40GB".into(),
                    memory_mib: 40960,
                    free,
                    max_per_node: free,
                },
                price.parse().ok(),
            )],
        };
        assert!(order_fits(&order, &[peer("bravo", 8, "2")]));
        assert!(!order_fits(&order, &[peer("bravo", 2, "2")]), "too few on one node");
        assert!(!order_fits(&order, &[peer("bravo", 8, "3.5")]), "too dear");
        assert!(!order_fits(&order, &[peer("corvus", 8, "2")]), "denied");
    }
}

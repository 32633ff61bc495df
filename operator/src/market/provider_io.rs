//! The provider's side: bid on orders, verify and run leases in a namespace
//! of their own, report status and heartbeats, clean up when the lease closes.

use std::collections::BTreeMap;
use std::str::FromStr;
use std::sync::Arc;

use gpupool_crds::price::TokenAmount;
use gpupool_crds::{
    AiJob, AiJobPhase, AiJobStatus, CloseReason, LABEL_LEASE, Lease, LeaseParty, LeaseSide, LeaseState,
};
use gpupool_proto::peer::v1::envelope::Body;
use gpupool_proto::peer::v1::{Bid, BidResult, Heartbeat, LeaseOffer, LeaseStatus, Order};
use k8s_openapi::api::core::v1::{Namespace, PodTemplateSpec};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use kube::api::{DeleteParams, ListParams, Patch, PatchParams, PostParams};
use kube::runtime::reflector::ObjectRef;
use kube::{Api, ResourceExt};
use libp2p::PeerId;
use tracing::{Instrument, debug, info, warn};

use super::bidengine::{Ask, Held, NoBid, Offer, bid_id, evaluate};
use super::lease_check::{Refusal, Terms, check_offer, check_on_chain};
use super::lease_objects::{Accepted, DEFAULT_DENY, WORKLOAD, lease_namespace, lease_objects, provider_lease_name};
use super::lease_records::{Closed, expired};
use super::node::{MARKET_MANAGER, Market, Reservation, now_ms};
use super::renter::moves_forward;
use super::renter_funds::{Funds, Payer, Pledge, can_fund_another, first_deposit, payer_of, spendable};
use crate::deletes::{Deleted, delete_unless_gone};
use crate::p2p::envelope::DropReason;
use crate::settlement_plan::COND_SETTLED;

type Handled = Result<(), (DropReason, String)>;

/// How long an order that arrives before this cluster's GPUs are counted
/// waits for the count (the first lists of GpuNodes and pods, at start-up).
const COUNT_WAIT: std::time::Duration = std::time::Duration::from_secs(5);

/// How long a won bid's GPUs stay promised while the renter opens the lease.
const WON_HOLD_MS: u64 = 5 * 60 * 1000;

impl Market {
    pub(crate) async fn on_order(self: Arc<Self>, sender: PeerId, order: Order) -> Handled {
        let Some(org) = self.org_of(&sender) else {
            // No identity record yet: we cannot tell who asks. Not the sender's fault.
            return Ok(());
        };
        if org != order.renter_org {
            return Err((
                DropReason::Impersonation,
                format!("{org} published an order as {}", order.renter_org),
            ));
        }
        let Some(gpus) = order.gpus.clone() else {
            return Err((DropReason::Malformed, "order without gpus".into()));
        };
        let max_price = TokenAmount::from_str(&order.max_price_per_gpu_hour)
            .map_err(|_| (DropReason::Malformed, "max price".to_string()))?;
        let ask = Ask {
            renter_org: order.renter_org.clone(),
            count: gpus.count,
            models: gpus.models.clone(),
            min_memory_mib: gpus.min_memory_mib,
            max_price,
            allowed_orgs: order.allowed_orgs.clone(),
            denied_orgs: order.denied_orgs.clone(),
        };
        // A member that has just started has not counted its GPUs yet:
        // declining now ("nothing free") would lose the order until the
        // renter publishes it again, a bid lifetime later under Manual
        // selection. Wait for the count, a few seconds at most.
        if let Some(stores) = self.stores.get()
            && !stores.counted()
            && tokio::time::timeout(COUNT_WAIT, stores.wait_counted()).await.is_err()
        {
            debug!(order = %order.order_id, "GPUs not counted yet; not bidding");
            return Ok(());
        }
        let now = now_ms();
        let bid_id = bid_id(&self.settings.org, &order.order_id);
        let offer = {
            // Counted and promised under the decision lock, which the
            // controller places local jobs under too.
            let Some(stores) = self.stores.get() else {
                return Ok(()); // no caches yet: nothing counted, nothing to lend
            };
            let local = stores.promised.decide();
            let (supply, lent) = self.supply_given(stores, &local);
            let mut st = self.lock();
            st.release_lapsed(now);
            if st.reservations.contains_key(&bid_id) {
                return Ok(()); // the same order again (re-published): our bid stands
            }
            let held = Held {
                lent,
                by_renter: st.held_for_renter(&ask.renter_org, now),
            };
            match evaluate(&self.settings.org, &self.settings.policy, &supply, held, &ask) {
                Ok(offer) => {
                    let ttl = u64::try_from(self.settings.bid_ttl.as_millis()).unwrap_or(60_000);
                    st.reservations.insert(
                        bid_id.clone(),
                        Reservation {
                            order: order.clone(),
                            renter: sender,
                            product: offer.product.clone(),
                            count: offer.count,
                            price: offer.price,
                            until_ms: now + ttl,
                            pledge: None,
                        },
                    );
                    Some((offer, now + ttl))
                }
                Err(why) => {
                    self.metrics.order_declined(why.reason());
                    debug!(order = %order.order_id, renter = %org, ?why, "not bidding");
                    None
                }
            }
        };
        let Some((offer, until)) = offer else { return Ok(()) };
        if self.settings.policy.require_renter_funds
            && let Err(why) = self.payer_can_fund(sender, &order, &bid_id, &offer).await
        {
            self.lock().release_bid(&bid_id, now_ms());
            self.metrics.order_declined(why.reason());
            debug!(order = %order.order_id, renter = %org, ?why, "not bidding");
            return Ok(());
        }
        self.capacity_changed.notify_one();
        let bid = Body::Bid(Bid {
            order_id: order.order_id.clone(),
            bid_id: bid_id.clone(),
            provider_org: self.settings.org.clone(),
            gpu_product: offer.product.clone(),
            gpu_count: offer.count,
            price_per_gpu_hour: offer.price.to_string(),
            bid_expires_at_unix_ms: until,
        });
        match self.send(sender, bid).await {
            Ok(()) => {
                self.metrics.bid_sent();
                info!(order = %order.order_id, renter = %org, product = %offer.product, count = offer.count, price = %offer.price, "bid sent");
            }
            Err(e) => {
                warn!(order = %order.order_id, error = %e, "bid not delivered; releasing the reservation");
                self.lock().release_bid(&bid_id, now_ms());
                self.capacity_changed.notify_one();
            }
        }
        Ok(())
    }

    /// Whether the order's payer could fund a first deposit for `offer` on
    /// top of those its other open bids here count on, from the chain (read
    /// at most every few seconds per payer). Bid `bid_id` counts on its
    /// deposit from here on, until it is won or released.
    async fn payer_can_fund(&self, sender: PeerId, order: &Order, bid_id: &str, offer: &Offer) -> Result<(), NoBid> {
        // A price that rounds to no rate at all asks for no deposit.
        let Some(needed) = first_deposit(offer.price, offer.count) else {
            return Ok(());
        };
        // Who pays, what was last read of it and what its other bids count
        // on, under one lock, which also pledges this bid's deposit: of two
        // orders weighed at once, the second counts the first's. The body
        // check took only addresses; a sender has a wallet once it has an
        // identity, which it has to have come this far.
        let (payer, cached, already) = {
            let mut st = self.lock();
            let payer = st
                .peers
                .get(&sender)
                .and_then(|p| p.wallet)
                .and_then(|w| payer_of(w, &order.payer_wallet).ok())
                .ok_or(NoBid::RenterFundsUnknown)?;
            let already = st.pledged_by(&payer, bid_id);
            if let Some(r) = st.reservations.get_mut(bid_id) {
                r.pledge = Some(Pledge { payer, deposit: needed });
            }
            (payer, st.funds_seen.get(&payer, now_ms()), already)
        };
        let spendable = match cached {
            Some(v) => v,
            None => {
                let funds = self.payer_funds(payer).await.map_err(|e| {
                    debug!(error = %e, "could not read the payer's funds");
                    self.metrics.chain_error(e.reason());
                    NoBid::RenterFundsUnknown
                })?;
                let v = spendable(&payer, funds);
                self.lock().funds_seen.put(payer, v, now_ms());
                v
            }
        };
        if !can_fund_another(spendable, already, needed) {
            return Err(NoBid::RenterCannotPay {
                spendable,
                pledged: already,
                needed,
            });
        }
        Ok(())
    }

    /// A payer's figures from the chain, both reads at once.
    pub(super) async fn payer_funds(&self, payer: Payer) -> Result<Funds, gpupool_chain::ChainError> {
        let (account, other) = match payer {
            Payer::Own(w) => tokio::try_join!(self.chain.account(w), self.chain.token_balance(w))?,
            Payer::Agent { renter, agent } => {
                tokio::try_join!(self.chain.account(renter), self.chain.agent_allowance(renter, agent))?
            }
        };
        Ok(Funds { account, other })
    }

    pub(crate) async fn on_bid_result(&self, sender: PeerId, r: BidResult) -> Handled {
        let mut st = self.lock();
        let now = now_ms();
        match st.reservations.get_mut(&r.bid_id) {
            Some(res) if res.renter == sender && res.order.order_id == r.order_id => {
                if r.won {
                    // Opening the lease on chain can take a while under load;
                    // the GPUs stay promised until the offer comes. The
                    // deposit is the lease's now, out of the payer's funds.
                    res.until_ms = res.until_ms.max(now + WON_HOLD_MS);
                    res.pledge = None;
                } else {
                    st.release_bid(&r.bid_id, now);
                    self.capacity_changed.notify_one();
                    debug!(bid = %r.bid_id, "bid lost; reservation released");
                }
                Ok(())
            }
            Some(_) => Err((
                DropReason::WrongSender,
                "result from someone else than the renter".into(),
            )),
            None => Ok(()), // already lapsed or released
        }
    }

    pub(crate) async fn on_lease_offer(self: Arc<Self>, sender: PeerId, l: LeaseOffer) -> Handled {
        let reservation = {
            let st = self.lock();
            st.reservations.get(&l.bid_id).cloned()
        };
        let Some(res) = reservation else {
            // Only now ask the API server: a renter resends its offer until
            // we report, and each resend was a GET.
            if self.provider_lease_exists(&l.lease_id).await {
                return Ok(()); // a resent offer for a lease we already run
            }
            let released = self.lock().released_bids.contains_key(&l.bid_id);
            if released {
                // Our bid, but its GPUs went elsewhere: say so, so the renter
                // closes the lease (refund) and asks the others.
                info!(lease = %l.lease_id, bid = %l.bid_id, "offer for a bid whose reservation lapsed; refusing");
                self.refuse(
                    sender,
                    l.lease_id.clone(),
                    format!("bid {} lapsed before the lease offer arrived", l.bid_id),
                )
                .await;
                return Ok(());
            }
            return Err((DropReason::UnknownOrder, format!("offer for unknown bid {}", l.bid_id)));
        };
        if res.renter != sender || res.order.order_id != l.order_id {
            return Err((DropReason::UnknownOrder, "offer does not match the bid".into()));
        }
        if !self.lock().accepting.insert(l.lease_id.clone()) {
            return Ok(());
        }
        let me = self.clone();
        let accepting = async move {
            let lease_id = l.lease_id.clone();
            // Verifying on chain and creating the workload can outlast the
            // renter's grace window on a busy cluster: beat while accepting,
            // or the renter takes us for failed and re-auctions the job.
            let accept = me.accept_lease(sender, &res, &l);
            tokio::pin!(accept);
            let mut tick = tokio::time::interval(me.settings.heartbeat_every);
            let result = loop {
                tokio::select! {
                    r = &mut accept => break r,
                    _ = tick.tick() => {
                        let beat = Body::Heartbeat(Heartbeat { lease_id: lease_id.clone() });
                        me.send_detached(sender, beat, &format!("heartbeat for lease {lease_id}"));
                    }
                }
            };
            {
                // Under one lock: between the two, a resent offer found the
                // reservation still there and nothing accepting, and accepted
                // the lease a second time.
                let mut st = me.lock();
                if result.is_ok() {
                    st.reservations.remove(&l.bid_id);
                    st.unbound.insert(
                        lease_namespace(&lease_id),
                        super::node::Unbound {
                            product: res.product.clone(),
                            count: res.count,
                            until_ms: now_ms() + super::node::UNBOUND_HOLD_MS,
                        },
                    );
                }
                st.accepting.remove(&lease_id);
            }
            match result {
                Ok(()) => {}
                Err(Refusal::Retry(why)) => {
                    debug!(lease = %lease_id, %why, "lease not usable yet; the renter will resend")
                }
                Err(Refusal::Refuse(why)) => {
                    warn!(lease = %lease_id, %why, "refusing lease offer");
                    me.lock().release_bid(&l.bid_id, now_ms());
                    me.capacity_changed.notify_one();
                    me.refuse(sender, lease_id, why).await;
                }
            }
        };
        // In the renter's trace: the lease's verification and workload.
        tokio::spawn(accepting.in_current_span());
        Ok(())
    }

    /// Tells the renter this provider will not run the lease; it closes it
    /// (refund) and asks the other peers.
    async fn refuse(&self, renter: PeerId, lease_id: String, why: String) {
        let status = LeaseStatus {
            lease_id,
            phase: "Refused".into(),
            pod_state: String::new(),
            exit_code: None,
            message: why,
        };
        if let Err(e) = self.send(renter, Body::LeaseStatus(status)).await {
            debug!(error = %e, "refusal not delivered; the renter's offer resend brings it again");
        }
    }

    async fn provider_lease_exists(&self, lease_id: &str) -> bool {
        let api: Api<Lease> = Api::namespaced(self.client.clone(), &self.settings.namespace);
        matches!(api.get_opt(&provider_lease_name(lease_id)).await, Ok(Some(_)))
    }

    /// Checks the offer and the lease on chain (`lease_check`), then
    /// creates what the lease runs in (`lease_objects`): the namespace, its
    /// network policy, our Lease copy and the workload. Each create is
    /// idempotent, so an offer resent after a failure part-way finishes it.
    async fn accept_lease(self: &Arc<Self>, renter: PeerId, res: &Reservation, l: &LeaseOffer) -> Result<(), Refusal> {
        let terms = Terms {
            our_wallet: self.wallet,
            chain_id: self.chain.config().chain_id,
            escrow: self.chain.config().escrow,
            sender_wallet: self.lock().peers.get(&renter).and_then(|p| p.wallet),
            price_per_gpu_hour: res.price,
            gpus: res.count,
        };
        let offered = check_offer(l, &terms)?;
        let on_chain = self
            .chain
            .lease(offered.lease_id)
            .await
            .map_err(|e| Refusal::Retry(e.to_string()))?;
        let funded_by = check_on_chain(&on_chain, &offered, self.wallet)?;
        let template: PodTemplateSpec =
            serde_json::from_slice(&l.workload).map_err(|e| Refusal::Refuse(format!("workload: {e}")))?;
        let renter_org = res.order.renter_org.clone();
        let o = lease_objects(Accepted {
            offer: l,
            renter: LeaseParty {
                org: renter_org.clone(),
                peer_id: Some(renter.to_string()),
                wallet: Some(offered.renter_wallet.to_string()),
            },
            provider: LeaseParty {
                org: self.settings.org.clone(),
                peer_id: Some(self.peer_id().to_string()),
                wallet: Some(self.wallet.to_string()),
            },
            funded_by,
            gpu_product: &res.product,
            gpu_count: res.count,
            price_per_gpu_hour: res.price,
            template,
            operator_namespace: &self.settings.namespace,
            traceparent: crate::tracecontext::current_traceparent(),
        });
        let ns = o.namespace.name_any();
        let pp = PatchParams::apply(MARKET_MANAGER).force();
        let k = |e: kube::Error| Refusal::Retry(e.to_string());
        Api::<Namespace>::all(self.client.clone())
            .patch(&ns, &pp, &Patch::Apply(&apply_of(&o.namespace, "v1", "Namespace")))
            .await
            .map_err(k)?;
        Api::<NetworkPolicy>::namespaced(self.client.clone(), &ns)
            .patch(
                DEFAULT_DENY,
                &pp,
                &Patch::Apply(&apply_of(&o.deny, "networking.k8s.io/v1", "NetworkPolicy")),
            )
            .await
            .map_err(k)?;
        let lease_api: Api<Lease> = Api::namespaced(self.client.clone(), &self.settings.namespace);
        match lease_api.create(&PostParams::default(), &o.lease).await {
            Ok(_) => {}
            Err(kube::Error::Api(s)) if s.code == 409 => {}
            Err(e) => return Err(k(e)),
        }
        let jobs: Api<AiJob> = Api::namespaced(self.client.clone(), &ns);
        match jobs.create(&PostParams::default(), &o.workload).await {
            Ok(_) => {}
            Err(kube::Error::Api(s)) if s.code == 409 => {}
            Err(e) => return Err(k(e)),
        }
        self.lock().workloads.insert(ns.clone(), (renter, l.lease_id.clone()));
        self.metrics
            .pool_lease(crate::telemetry::PoolLeaseEvent::ProviderAccepted);
        info!(lease = %l.lease_id, renter = %renter_org, namespace = %ns, "lease verified on chain; workload created");
        self.report(renter, &l.lease_id, &ns, None).await;
        Ok(())
    }

    /// The workload in lease namespace `ns` changed phase: tell its renter now
    /// rather than at the next heartbeat, which was up to a beat added to the
    /// renter's apply → Running time.
    /// `status` is what the controller just wrote, newer than its cache.
    pub fn workload_changed(self: &Arc<Self>, ns: &str, status: AiJobStatus) {
        let Some((renter, lease_id)) = ({
            let mut st = self.lock();
            let known = st.workloads.get(ns).cloned();
            if known.is_some() {
                st.workload_status.insert(ns.to_string(), status.clone());
            }
            known
        }) else {
            return;
        };
        let me = self.clone();
        let ns = ns.to_string();
        tokio::spawn(
            async move {
                me.report(renter, &lease_id, &ns, Some(status)).await;
            }
            .in_current_span(),
        );
    }

    /// Sends the workload's state to the renter; returns its phase. Without
    /// `status`, the workload is read from the controller's cache (a beat
    /// that is one watch event behind is corrected by the next change report).
    /// Returns once the report is on its way, not when the renter has it.
    async fn report(
        self: &Arc<Self>,
        renter: PeerId,
        lease_id: &str,
        ns: &str,
        status: Option<AiJobStatus>,
    ) -> Option<AiJobPhase> {
        let status = match status {
            Some(s) => s,
            None => {
                let cached = self
                    .aijob_cache
                    .get()
                    .and_then(|c| c.get(&ObjectRef::new(WORKLOAD).within(ns)));
                let job = match cached {
                    Some(j) => Some((*j).clone()),
                    None => Api::<AiJob>::namespaced(self.client.clone(), ns)
                        .get_opt(WORKLOAD)
                        .await
                        .ok()
                        .flatten(),
                };
                let read = job.and_then(|j| j.status).unwrap_or_default();
                // The cache may not have caught up with the last change we reported.
                match self.lock().workload_status.get(ns) {
                    Some(pushed) if !moves_forward(Some(wire_phase(pushed.phase)), wire_phase(read.phase)) => {
                        pushed.clone()
                    }
                    _ => read,
                }
            }
        };
        let phase = status.phase.unwrap_or(AiJobPhase::Pending);
        let pod_state = status
            .conditions
            .iter()
            .find(|c| c.type_ == crate::status::COND_RUNNING || c.type_ == crate::status::COND_PLACED)
            .map(|c| c.reason.clone())
            .unwrap_or_default();
        let msg = Body::LeaseStatus(LeaseStatus {
            lease_id: lease_id.to_string(),
            phase: wire_phase(Some(phase)).into(),
            pod_state: pod_state.chars().take(64).collect(),
            exit_code: status.exit_code,
            message: format!("{ns}: {}", status.message.unwrap_or_default())
                .chars()
                .take(1000)
                .collect(),
        });
        self.send_detached(renter, msg, &format!("status of lease {lease_id}"));
        Some(phase)
    }

    /// Heartbeats, status and cleanup for every lease this cluster runs.
    pub(crate) async fn provider_forever(self: Arc<Self>) {
        let mut tick = tokio::time::interval(self.settings.heartbeat_every);
        let mut finished_since: BTreeMap<String, u64> = BTreeMap::new();
        let api: Api<Lease> = Api::namespaced(self.client.clone(), &self.settings.namespace);
        loop {
            tick.tick().await;
            let Some(leases) = self.provider_leases(&api).await else {
                continue;
            };
            let mut lent = 0u32;
            let mut closed: Vec<(String, Option<u64>, bool)> = vec![];
            for lease in leases {
                if lease.spec.side != LeaseSide::Provider {
                    continue;
                }
                let Some(lease_id) = lease.spec.escrow.as_ref().and_then(|e| e.lease_id.clone()) else {
                    continue;
                };
                if lease.status.as_ref().and_then(|s| s.state) == Some(LeaseState::Closed) {
                    finished_since.remove(&lease_id);
                    let done = self.closed_lease(&lease_id).await;
                    closed.push((lease.name_any(), closed_ms(&lease), done));
                    continue;
                }
                lent += u32::try_from(lease.spec.gpu_count).unwrap_or(0);
                self.open_lease(&api, &lease, &lease_id, &mut finished_since).await;
            }
            self.lock().lent = lent;
            self.delete_old_records(&api, &closed).await;
            // Leases end and workloads finish between ticks; the advert loop
            // publishes only if the free GPUs actually changed.
            self.capacity_changed.notify_one();
        }
    }

    /// This cluster's provider Lease copies, from the watch cache once it is
    /// in: a list every beat read every Lease this cluster ever lent (the
    /// records stay as history), and under a burst that list was a share of
    /// the API server's work. None when neither answers; the next beat asks
    /// again.
    async fn provider_leases(&self, api: &Api<Lease>) -> Option<Vec<Arc<Lease>>> {
        let cached = self.ready_lease_cache().map(|c| {
            c.state()
                .iter()
                .filter(|l| {
                    l.namespace().as_deref() == Some(self.settings.namespace.as_str())
                        && l.labels().contains_key(LABEL_LEASE)
                })
                .cloned()
                .collect::<Vec<Arc<Lease>>>()
        });
        if cached.is_some() {
            return cached;
        }
        match api.list(&ListParams::default().labels(LABEL_LEASE)).await {
            Ok(l) => Some(l.items.into_iter().map(Arc::new).collect()),
            Err(e) => {
                debug!(error = %e, "listing provider leases");
                None
            }
        }
    }

    /// A closed lease: stop reporting on it and make sure its namespace is
    /// gone. True once it is (remembered, so a cleaned-up lease costs no
    /// more requests).
    async fn closed_lease(&self, lease_id: &str) -> bool {
        let ns = lease_namespace(lease_id);
        {
            let mut st = self.lock();
            st.workloads.remove(&ns);
            st.workload_status.remove(&ns);
            if st.cleaned_up.contains(lease_id) {
                return true;
            }
        }
        if !self.clean_up(lease_id, &ns).await {
            return false;
        }
        let mut st = self.lock();
        if st.cleaned_up.len() > 100_000 {
            // Forgetting only costs one more look each.
            st.cleaned_up.clear();
        }
        st.cleaned_up.insert(lease_id.to_string());
        true
    }

    /// A lease still open: report the workload to its renter, and close the
    /// lease ourselves when the workload finished and the renter has not
    /// closed it for three grace windows (it is gone), so the work done is
    /// paid.
    async fn open_lease(
        self: &Arc<Self>,
        api: &Api<Lease>,
        lease: &Lease,
        lease_id: &str,
        finished_since: &mut BTreeMap<String, u64>,
    ) {
        let Some(renter) = lease
            .spec
            .renter
            .peer_id
            .as_deref()
            .and_then(|p| PeerId::from_str(p).ok())
        else {
            return;
        };
        let ns = lease_namespace(lease_id);
        self.lock().workloads.insert(ns.clone(), (renter, lease_id.to_string()));
        let phase = self.report(renter, lease_id, &ns, None).await;
        if !phase.is_some_and(AiJobPhase::is_terminal) {
            return;
        }
        let since = *finished_since.entry(lease_id.to_string()).or_insert_with(now_ms);
        let wait = u64::try_from(self.settings.heartbeat_grace.as_millis()).unwrap_or(10_000) * 3;
        if now_ms().saturating_sub(since) > wait && lease.spec.close_reason.is_none() {
            info!(lease = %lease_id, "the renter did not close a finished lease; closing it as Completed");
            let patch = serde_json::json!({"spec": {"closeReason": CloseReason::Completed}});
            let _ = api
                .patch(&lease.name_any(), &PatchParams::default(), &Patch::Merge(&patch))
                .await;
        }
    }
}

/// A workload's phase as the peer protocol names it.
fn wire_phase(phase: Option<AiJobPhase>) -> &'static str {
    match phase {
        Some(AiJobPhase::Running) => "Running",
        Some(AiJobPhase::Succeeded) => "Succeeded",
        Some(AiJobPhase::Failed) => "Failed",
        _ => "Pending",
    }
}

/// When a closed lease closed: its `Settling` condition turned True then.
fn closed_ms(lease: &Lease) -> Option<u64> {
    let c = gpupool_crds::conditions::find(&lease.status.as_ref()?.conditions, COND_SETTLED)?;
    (c.status == "True").then(|| u64::try_from(c.last_transition_time.0.as_millisecond()).unwrap_or(0))
}

impl Market {
    /// Deletes the closed records past their retention (see `lease_records`);
    /// the settlement worker's finalizer lets each go once the chain agrees
    /// it is closed. Failures wait for the next beat.
    async fn delete_old_records(&self, api: &Api<Lease>, closed: &[(String, Option<u64>, bool)]) {
        let records: Vec<Closed<'_>> = closed
            .iter()
            .map(|(name, closed_ms, cleaned_up)| Closed {
                name,
                closed_ms: *closed_ms,
                cleaned_up: *cleaned_up,
            })
            .collect();
        let mut deleted = 0usize;
        for name in expired(&records, now_ms(), self.settings.closed_lease_retention) {
            match delete_unless_gone(api, name, &DeleteParams::default()).await {
                Ok(Deleted::Now) => {
                    debug!(lease = %name, "closed lease record past its retention; deleted");
                    deleted += 1;
                }
                Ok(Deleted::AlreadyGone) => {}
                Err(e) => {
                    warn!(lease = %name, error = %e, "could not delete a closed lease record; retrying at the next beat");
                    break;
                }
            }
        }
        if deleted > 0 {
            let retention_s = self.settings.closed_lease_retention.as_secs();
            info!(
                deleted,
                retention_s, "closed lease records past their retention deleted"
            );
        }
    }

    /// The chain says the lease is over: stop the work and give the GPUs
    /// back. Returns whether the namespace is gone or going.
    async fn clean_up(&self, lease_id: &str, ns: &str) -> bool {
        let ns_api: Api<Namespace> = Api::all(self.client.clone());
        match ns_api.get_opt(ns).await {
            Ok(None) => true,
            Ok(Some(n)) if n.metadata.deletion_timestamp.is_some() => true,
            Ok(Some(_)) => {
                info!(lease = %lease_id, namespace = %ns, "lease closed on chain; deleting its namespace");
                match delete_unless_gone(&ns_api, ns, &DeleteParams::default()).await {
                    Ok(Deleted::Now) => {
                        self.metrics
                            .pool_lease(crate::telemetry::PoolLeaseEvent::ProviderCleanedUp);
                        true
                    }
                    Ok(Deleted::AlreadyGone) => true,
                    Err(e) => {
                        warn!(lease = %lease_id, namespace = %ns, error = %e, "could not delete the lease namespace; retrying at the next beat");
                        false
                    }
                }
            }
            Err(e) => {
                debug!(namespace = %ns, error = %e, "reading the lease namespace");
                false
            }
        }
    }
}

/// The object as a server-side-apply body.
fn apply_of<T: serde::Serialize>(obj: &T, api_version: &str, kind: &str) -> serde_json::Value {
    let mut v = serde_json::to_value(obj).unwrap_or_default();
    v["apiVersion"] = api_version.into();
    v["kind"] = kind.into();
    v
}

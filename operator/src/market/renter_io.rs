//! The renter's side: publish orders, record bids, open the lease, hand the
//! workload to the winner, mirror what it reports, close and re-auction.

use std::collections::{BTreeMap, HashSet};
use std::str::FromStr;
use std::time::Duration;

use gpupool_chain::Address;
use gpupool_crds::conditions::find;
use gpupool_crds::price::{TokenAmount, shown};
use gpupool_crds::{
    AiJob, AiJobPhase, Bid, BidSpec, BidState, BidStatus, CloseReason, Escrow, LABEL_AIJOB, LABEL_ORDER,
    LEASE_FINALIZER, Lease, LeaseParty, LeaseSide, LeaseSpec, LeaseState, PoolOrder, RunsOn, WorkloadReport,
};
use gpupool_proto::peer::v1::envelope::Body;
use gpupool_proto::peer::v1::{self as wire, BidResult, LeaseOffer, LeaseStatus};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{OwnerReference, Time};
use k8s_openapi::jiff::Timestamp;
use kube::api::{ListParams, Patch, PatchParams, PostParams};
use kube::runtime::reflector::ObjectRef;
use kube::{Api, Resource, ResourceExt};
use libp2p::PeerId;
use tracing::{debug, info, warn};

use super::node::{MARKET_MANAGER, Market, OpenOrder, RecordedBid, RenterLease, now_ms, undecided_bids};
use super::renter::{LeaseView, Step, View, closing_phase, decide, exclude_after_failure, moves_forward, window_ms};
use super::selection::{
    Candidate, Wanted, advertised_room, advertises_fit, expected_bidders, explain_no_bids, no_bids_reason,
};
use crate::p2p::envelope::DropReason;
use crate::placement::Need;
use crate::settlement_plan::{COND_FUNDS_LOW, lease_funding, rate_per_second};
use crate::status::COND_PLACED;

type Handled = Result<(), (DropReason, String)>;

/// What the pool placement wants the AiJob status to say.
#[derive(Clone, Debug, PartialEq)]
pub struct RemoteOutcome {
    pub phase: AiJobPhase,
    /// Condition reason (CamelCase) for Placed.
    pub reason: &'static str,
    pub message: String,
    pub placed: bool,
    pub order: PoolOrder,
    pub runs_on: Option<RunsOn>,
    pub lease: Option<String>,
    pub exit_code: Option<i32>,
    pub cost: Option<String>,
    pub requeue: Option<Duration>,
    /// (warning, reason, note)
    pub events: Vec<(bool, &'static str, String)>,
}

#[derive(Debug, thiserror::Error)]
pub enum MarketError {
    #[error("kubernetes API: {0}")]
    Kube(#[from] kube::Error),
    #[error("{0}")]
    Invalid(String),
}

/// Times in resources are written with whole seconds; round up so a stored
/// deadline is never earlier than the real one.
fn ms_to_time(ms: u64) -> Option<Time> {
    let secs = ms.div_ceil(1000);
    Timestamp::from_second(i64::try_from(secs).ok()?).ok().map(Time)
}

/// A bidding job's status while its window is open.
fn bids_so_far(order: &str, bids: usize, closes_ms: u64) -> String {
    format!(
        "order {order} open: {bids} bid(s) so far; the window closes at {}",
        rfc3339_ms(closes_ms)
    )
}

/// Milliseconds since the epoch as RFC 3339, for messages that must stay
/// true while they stand (a countdown would be wrong a second later).
fn rfc3339_ms(ms: u64) -> String {
    i64::try_from(ms)
        .ok()
        .and_then(|ms| Timestamp::from_millisecond(ms).ok())
        .map_or_else(|| ms.to_string(), |t| t.to_string())
}

fn time_ms(t: &Time) -> u64 {
    u64::try_from(t.0.as_millisecond()).unwrap_or(0)
}

fn owner(aijob: &AiJob) -> Option<OwnerReference> {
    let mut o = aijob.controller_owner_ref(&())?;
    o.block_owner_deletion = Some(false);
    Some(o)
}

fn bid_name(aijob: &str, bid_id: &str) -> String {
    let mut s: String = format!("{aijob}-{bid_id}")
        .to_ascii_lowercase()
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '.' {
                c
            } else {
                '-'
            }
        })
        .collect();
    s.truncate(253);
    s
}

impl Market {
    pub(crate) async fn on_bid(&self, sender: PeerId, b: wire::Bid) -> Handled {
        let now = now_ms();
        let (order, late) = {
            let st = self.lock();
            (
                st.orders.get(&b.order_id).cloned(),
                st.closed_orders.contains_key(&b.order_id),
            )
        };
        let Some(order) = order.filter(|o| now <= o.closes_ms + 60_000) else {
            if late {
                return self.refuse_late(sender, &b).await;
            }
            return Err((DropReason::UnknownOrder, format!("bid for order {}", b.order_id)));
        };
        let Some(org) = self.org_of(&sender) else {
            return Err((
                DropReason::UnknownOrder,
                "bid from a peer that never introduced itself".into(),
            ));
        };
        if org != b.provider_org {
            return Err((DropReason::Impersonation, format!("{org} bid as {}", b.provider_org)));
        }
        let o = &order.order;
        if o.denied_orgs.contains(&org) || (!o.allowed_orgs.is_empty() && !o.allowed_orgs.contains(&org)) {
            return Err((DropReason::DeniedOrg, format!("bid from {org}")));
        }
        let gpus = o.gpus.clone().unwrap_or_default();
        let price =
            TokenAmount::from_str(&b.price_per_gpu_hour).map_err(|_| (DropReason::Malformed, "price".to_string()))?;
        if b.gpu_count != gpus.count
            || price > order.max_price
            || !crate::matching::product_matches(&gpus.models, &b.gpu_product)
            || b.bid_expires_at_unix_ms <= now
        {
            return Err((DropReason::Malformed, "bid does not answer the order".into()));
        }
        let ns = order.aijob.namespace.clone().unwrap_or_default();
        let name = bid_name(&order.aijob.name, &b.bid_id);
        let mut bid = Bid::new(
            &name,
            BidSpec {
                ai_job: order.aijob.name.clone(),
                order_id: b.order_id.clone(),
                provider_peer_id: sender.to_string(),
                provider_org: org.clone(),
                price_per_gpu_hour: price.to_string(),
                gpu_product: b.gpu_product.clone(),
                gpu_count: i32::try_from(b.gpu_count).unwrap_or(0),
                expires_at: ms_to_time(b.bid_expires_at_unix_ms).unwrap_or(Time(Timestamp::now())),
                signature: None,
            },
        );
        bid.metadata.namespace = Some(ns.clone());
        bid.metadata.labels = Some(BTreeMap::from([
            (LABEL_ORDER.to_string(), b.order_id.clone()),
            (LABEL_AIJOB.to_string(), order.aijob.name.clone()),
        ]));
        bid.metadata.annotations = Some(BTreeMap::from([(
            "gpupool.dev/latency-ms".to_string(),
            now.saturating_sub(order.published_ms).to_string(),
        )]));
        // Owned by the AiJob the order was published for, by uid: if that
        // job is gone, the garbage collector removes the Bid.
        bid.metadata.owner_references = Some(vec![OwnerReference {
            api_version: AiJob::api_version(&()).into_owned(),
            kind: AiJob::kind(&()).into_owned(),
            name: order.aijob.name.clone(),
            uid: order.uid.clone(),
            controller: Some(true),
            block_owner_deletion: Some(false),
        }]);
        // Shared with other recordings, exclusive with the award: from here
        // until the bid is written down the order cannot close under it.
        let gate = order.bids.gate.clone();
        let _recording = gate.read().await;
        if !self.lock().orders.contains_key(&b.order_id) {
            // The award closed it while this bid waited at the gate.
            return self.refuse_late(sender, &b).await;
        }
        let bids: Api<Bid> = Api::namespaced(self.client.clone(), &ns);
        match bids.create(&PostParams::default(), &bid).await {
            Ok(_) => {
                let status = BidStatus {
                    state: Some(BidState::Open),
                    message: Some("waiting for the bid window to close".into()),
                };
                let _ = crate::ssa::apply_status(&bids, &name, MARKET_MANAGER, &status).await;
                if let Some(o) = self.lock().orders.get_mut(&b.order_id) {
                    o.bids.recorded.push(RecordedBid {
                        name: name.clone(),
                        provider: sender,
                        order_id: b.order_id.clone(),
                        bid_id: b.bid_id.clone(),
                    });
                }
                self.metrics.bid_received();
                info!(order = %b.order_id, provider = %org, price = %price, product = %b.gpu_product, "bid recorded");
            }
            Err(kube::Error::Api(s)) if s.code == 409 => {}
            Err(e) => warn!(error = %e, "could not record bid"),
        }
        self.wake(order.aijob.clone()).await;
        Ok(())
    }

    /// Tells the provider of a bid for an order that no longer takes bids
    /// that it lost: its GPUs are reserved for us until the bid expires, and
    /// go back now to the next order (ours or anyone's).
    async fn refuse_late(&self, sender: PeerId, b: &wire::Bid) -> Handled {
        self.tell_bid_result(sender, &b.order_id, &b.bid_id, false).await;
        Err((DropReason::Late, format!("bid for closed order {}", b.order_id)))
    }

    async fn tell_bid_result(&self, provider: PeerId, order_id: &str, bid_id: &str, won: bool) {
        let msg = Body::BidResult(BidResult {
            order_id: order_id.to_string(),
            bid_id: bid_id.chars().take(128).collect(),
            won,
        });
        if let Err(e) = self.send(provider, msg).await {
            debug!(error = %e, order = %order_id, "bid result not delivered; the reservation lapses on its own");
        }
    }

    /// When the provider of lease `l` was last heard from, per memory.
    fn heard_ms(&self, l: &Lease) -> Option<u64> {
        let id = l.status.as_ref()?.lease_id.as_ref()?.to_ascii_lowercase();
        self.lock().heard.get(&id).map(|h| h.heard_ms.max(h.offered_ms))
    }

    async fn renter_lease(&self, lease_id: &str) -> Option<RenterLease> {
        if let Some(l) = self.lock().renter_leases.get(lease_id) {
            return Some(l.clone());
        }
        // After a restart, or before this job's next step registered it:
        // find it among the renter Leases. Without the watch cache, at most
        // every few seconds, so bogus lease ids cannot become API calls.
        let leases: Vec<Lease> = match self.ready_lease_cache() {
            Some(cache) => cache
                .find(|l| {
                    l.status
                        .as_ref()
                        .and_then(|s| s.lease_id.as_deref())
                        .is_some_and(|id| id.eq_ignore_ascii_case(lease_id))
                })
                .map(|l| vec![(*l).clone()])
                .unwrap_or_default(),
            None => {
                {
                    let mut st = self.lock();
                    let now = now_ms();
                    if now.saturating_sub(st.lease_refresh_ms) < 3_000 {
                        return None;
                    }
                    st.lease_refresh_ms = now;
                }
                let api: Api<Lease> = Api::all(self.client.clone());
                api.list(&ListParams::default().labels(LABEL_ORDER)).await.ok()?.items
            }
        };
        for l in leases {
            if l.spec.side != LeaseSide::Renter {
                continue;
            }
            let id = l.status.as_ref().and_then(|s| s.lease_id.clone());
            let (Some(id), Some(ns)) = (id, l.namespace()) else {
                continue;
            };
            if !id.eq_ignore_ascii_case(lease_id) {
                continue;
            }
            let Some(provider) = l
                .spec
                .provider
                .peer_id
                .as_deref()
                .and_then(|p| PeerId::from_str(p).ok())
            else {
                continue;
            };
            let rl = RenterLease {
                namespace: ns,
                name: l.name_any(),
                aijob: l.spec.ai_job.clone().unwrap_or_default(),
                provider,
            };
            self.lock().renter_leases.insert(id.to_ascii_lowercase(), rl);
        }
        self.lock().renter_leases.get(lease_id).cloned()
    }

    /// The renter Lease `ns/name`, from the watch cache when it has it. The
    /// cache can lag our own writes: a missing Lease is asked of the API
    /// server, and a stale one only delays a step, because the watch event
    /// that refreshes it wakes the job again.
    async fn lease_named(&self, ns: &str, name: &str) -> Result<Option<Lease>, MarketError> {
        if let Some(l) = self
            .lease_cache
            .get()
            .and_then(|(c, _)| c.get(&ObjectRef::new(name).within(ns)))
        {
            return Ok(Some((*l).clone()));
        }
        Ok(Api::<Lease>::namespaced(self.client.clone(), ns).get_opt(name).await?)
    }

    /// The renter Leases in `ns` labelled `label=value`: the watch cache, or
    /// the API server until the cache has listed them all (the exactly-once
    /// guards read this, and an unlisted cache would hide a live lease).
    async fn leases_labelled(&self, ns: &str, label: &str, value: &str) -> Result<Vec<Lease>, MarketError> {
        if let Some(cache) = self.ready_lease_cache() {
            return Ok(cache
                .state_filter(|l| {
                    l.namespace().as_deref() == Some(ns) && l.labels().get(label).map(String::as_str) == Some(value)
                })
                .iter()
                .map(|l| (**l).clone())
                .collect());
        }
        let api: Api<Lease> = Api::namespaced(self.client.clone(), ns);
        Ok(api
            .list(&ListParams::default().labels(&format!("{label}={value}")))
            .await?
            .items)
    }

    pub(crate) async fn on_lease_status(
        &self,
        sender: PeerId,
        s: Option<LeaseStatus>,
        lease_id: &str,
        expires_at_ms: u64,
    ) -> Handled {
        let lease_id = lease_id.to_ascii_lowercase();
        let Some(rl) = self.renter_lease(&lease_id).await else {
            // Providers report until they see the close on chain, so status for
            // a lease whose record is gone is normal for a while.
            return Err((DropReason::Late, format!("status for unknown lease {lease_id}")));
        };
        if rl.provider != sender {
            return Err((
                DropReason::WrongSender,
                "status from a peer that is not the lease's provider".into(),
            ));
        }
        let now = now_ms();
        // The beat itself lives in memory; the Lease keeps one for people
        // (a restart starts its own grace window).
        let write_every =
            super::heard::record_every_ms(u64::try_from(self.settings.heartbeat_grace.as_millis()).unwrap_or(u64::MAX));
        // A lease whose close the renter asked for, or that is gone: its
        // provider's beats are not worth a write any more (see `heard`).
        let closing = self.ready_lease_cache().is_some_and(|c| {
            c.get(&ObjectRef::new(&rl.name).within(&rl.namespace))
                .is_none_or(|l| l.spec.close_reason.is_some() || lease_state(&l) == Some(LeaseState::Closed))
        });
        let (write, changed) = {
            let mut st = self.lock();
            if st.heard.len() > 10_000 {
                st.heard
                    .retain(|_, h| now.saturating_sub(h.heard_ms.max(h.offered_ms)) < 600_000);
                let live: std::collections::HashSet<String> = st.heard.keys().cloned().collect();
                st.status_writes.retain(|k, _| live.contains(k));
            }
            let h = st.heard.entry(lease_id.clone()).or_default();
            let changed = h.absorb(now, s, expires_at_ms);
            let write = h.write_due(now, write_every, closing);
            if write {
                h.writing(now);
            }
            (write, changed)
        };
        // The AiJob mirrors the heard report (see `with_heard_workload`), so
        // it need not wait for this write.
        if changed {
            self.wake(ObjectRef::new(&rl.aijob).within(&rl.namespace)).await;
        }
        if !write {
            return Ok(());
        }
        // One write at a time per lease, each carrying the newest report in
        // memory: concurrent writes could land out of order, and one without
        // the report would drop it (server-side apply removes what a manager
        // stops sending).
        let gate = self.lock().status_writes.entry(lease_id.clone()).or_default().clone();
        let _turn = gate.lock().await;
        let report = self.lock().heard.get(&lease_id).and_then(|h| h.report.clone());
        let api: Api<Lease> = Api::namespaced(self.client.clone(), &rl.namespace);
        let mut patch = serde_json::json!({
            "apiVersion": "gpupool.dev/v1alpha1",
            "kind": "Lease",
            "status": {"lastHeartbeat": Time(Timestamp::now())},
        });
        if let Some(s) = &report {
            patch["status"]["workload"] = serde_json::to_value(workload_report(s)).unwrap_or_default();
        }
        if let Err(e) = api
            .patch_status(
                &rl.name,
                &PatchParams::apply(MARKET_MANAGER).force(),
                &Patch::Apply(&patch),
            )
            .await
        {
            debug!(error = %e, "could not record lease status");
            if let Some(h) = self.lock().heard.get_mut(&lease_id) {
                h.write_failed();
            }
        }
        Ok(())
    }

    /// The Lease with the newest workload report known: the one it records,
    /// or the one heard since, which the Lease gets with a later write or
    /// the watch has not brought back yet. Mirroring only what came back
    /// through the watch put seconds between a provider's report and the
    /// AiJob under load; a report only replaces one it does not go back from.
    fn with_heard_workload(&self, mut l: Lease) -> Lease {
        let Some(id) = l.status.as_ref().and_then(|s| s.lease_id.as_deref()) else {
            return l;
        };
        let heard = self
            .lock()
            .heard
            .get(&id.to_ascii_lowercase())
            .and_then(|h| h.report.as_ref().map(workload_report));
        if let (Some(heard), Some(status)) = (heard, l.status.as_mut())
            && moves_forward(status.workload.as_ref().map(|w| w.phase.as_str()), &heard.phase)
        {
            status.workload = Some(heard);
        }
        l
    }

    /// The Lease with the close asked for here, while the cache lags the
    /// patch that asked.
    fn with_close_asked(&self, mut l: Lease) -> Lease {
        let uid = l.metadata.uid.clone().unwrap_or_default();
        l.spec.close_reason = self.lock().closes_asked.plan_with(&uid, l.spec.close_reason);
        l
    }

    /// One step of the pool placement of `aijob`.
    pub async fn reconcile_remote(&self, aijob: &AiJob, need: &Need) -> Result<RemoteOutcome, MarketError> {
        let out = self.step_remote(aijob, need).await?;
        let over = out.requeue.is_none();
        let uid = aijob.metadata.uid.clone().unwrap_or_default();
        self.lock().remember_order(&uid, &out.order, over, now_ms());
        Ok(out)
    }

    /// A lease of this job that is not closed, other than `current`: a job
    /// never gets a new order while one is live, whatever its status says.
    async fn other_live_lease(
        &self,
        ns: &str,
        aijob: &str,
        current: Option<&str>,
    ) -> Result<Option<Lease>, MarketError> {
        // A lease this process created and the cache has not seen yet is in
        // the in-memory order, which the caller already consulted.
        Ok(self
            .leases_labelled(ns, LABEL_AIJOB, aijob)
            .await?
            .into_iter()
            .filter(|l| l.spec.side == LeaseSide::Renter && Some(l.name_any().as_str()) != current)
            .find(|l| lease_state(l) != Some(LeaseState::Closed)))
    }

    async fn step_remote(&self, aijob: &AiJob, need: &Need) -> Result<RemoteOutcome, MarketError> {
        let ns = aijob.namespace().unwrap_or_default();
        let name = aijob.name_any();
        let status = aijob.status.clone().unwrap_or_default();
        let uid = aijob.metadata.uid.clone().unwrap_or_default();
        let mut order = self.lock().latest_order(&uid, status.order.clone().unwrap_or_default());
        let now = now_ms();

        // Dereference: the job's open bids (a late bid for an earlier attempt
        // is as good as one for this attempt while it lasts) and its lease.
        let bids_api: Api<Bid> = Api::namespaced(self.client.clone(), &ns);
        // Once a lease is chosen the bids no longer matter (the award marked them).
        let bids: Vec<Bid> = if order.id.is_empty() || order.lease.is_some() {
            vec![]
        } else {
            bids_api
                .list(&ListParams::default().labels(&format!("{LABEL_AIJOB}={name}")))
                .await?
                .items
                .into_iter()
                .filter(|b| {
                    !matches!(
                        b.status.as_ref().and_then(|s| s.state),
                        Some(BidState::Lost) | Some(BidState::Accepted) | Some(BidState::Expired)
                    )
                })
                .collect()
        };
        let reputations = if bids.is_empty() {
            Default::default()
        } else {
            self.reputations().await
        };
        let candidates: Vec<Candidate> = bids
            .iter()
            .filter_map(|b| {
                let (completed, failed) = reputations
                    .get(&b.spec.provider_org)
                    .map_or((0, 0), |r| (r.completed, r.failed));
                Some(Candidate {
                    name: b.name_any(),
                    org: b.spec.provider_org.clone(),
                    price: TokenAmount::from_str(&b.spec.price_per_gpu_hour).ok()?,
                    completed,
                    failed,
                    latency_ms: b
                        .annotations()
                        .get("gpupool.dev/latency-ms")
                        .and_then(|v| v.parse().ok())
                        .unwrap_or(u64::MAX),
                    expires_at_ms: time_ms(&b.spec.expires_at),
                })
            })
            .collect();
        let leases_api: Api<Lease> = Api::namespaced(self.client.clone(), &ns);
        let lease = match &order.lease {
            Some(l) => self
                .lease_named(&ns, l)
                .await?
                .map(|l| self.with_close_asked(self.with_heard_workload(l))),
            None => None,
        };
        let lease_view = lease.as_ref().map(|l| {
            let heard_of = self.heard_ms(l);
            let st = l.status.clone().unwrap_or_default();
            LeaseView {
                provider_org: l.spec.provider.org.clone(),
                state: st.state,
                close_requested: l.spec.close_reason,
                closed_as: st.close_reason.clone(),
                workload: st.workload.clone(),
                // The grace window runs from the provider's last beat or our
                // first offer, never from the confirmation on chain: a busy
                // renter that saw the confirmation late blamed a provider it
                // had not offered the lease to yet. Nothing heard and nothing
                // offered (a fresh process) means offering first.
                last_heard_ms: st
                    .last_heartbeat
                    .as_ref()
                    .map(time_ms)
                    .max(heard_of.filter(|t| *t > 0))
                    .map(|t| t.max(self.started_ms)),
            }
        });
        if let (Some(l), Some(id)) = (&lease, lease.as_ref().and_then(|l| l.status.as_ref()?.lease_id.clone()))
            && let Some(provider) = l
                .spec
                .provider
                .peer_id
                .as_deref()
                .and_then(|p| PeerId::from_str(p).ok())
        {
            self.lock().renter_leases.insert(
                id.to_ascii_lowercase(),
                RenterLease {
                    namespace: ns.clone(),
                    name: l.name_any(),
                    aijob: name.clone(),
                    provider,
                },
            );
        }
        let window = u64::try_from(std::time::Duration::from(aijob.spec.bidding.window).as_millis()).unwrap_or(5000);
        let max_price = TokenAmount::from_str(&aijob.spec.max_price_per_gpu_hour)
            .map_err(|e| MarketError::Invalid(e.to_string()))?;
        let wanted = Wanted {
            count: need.count,
            models: &need.models,
            min_memory_mib: need.min_memory_mib,
            max_price,
            allowed_orgs: &aijob.spec.placement.allowed_orgs,
            denied_orgs: &aijob.spec.placement.denied_orgs,
            excluded_orgs: &order.excluded_orgs,
        };
        let published = {
            let st = self.lock();
            st.orders.get(&order.id).map(|o| (o.published_ms, o.repeat_after_ms))
        };
        let fresh_capacity = lease.is_none()
            && candidates.is_empty()
            && published.is_some_and(|(published, repeat_after)| {
                // Room that appeared since the order went out, or room that
                // stood while a long backoff ran (a peer that bid nothing on
                // room it advertises only costs an order every few seconds).
                let fits = now >= repeat_after
                    && (advertises_fit(&wanted, &self.pool_supply(Some(published)))
                        || (now.saturating_sub(published) >= super::renter::ROOM_RETRY_MS
                            && advertises_fit(&wanted, &self.pool_supply(None))));
                // Only as many waiting jobs ask as the room advertised fits;
                // a claim lasts until that order's window is over.
                let room = if fits {
                    advertised_room(&wanted, &self.pool_supply(None))
                } else {
                    0
                };
                let claimed = fits && self.lock().claim_room(now, window + 500, room);
                debug!(aijob = %name, fits, room, claimed, "capacity for a waiting job");
                claimed
            });
        // Only asked while a bid is in hand: who else the adverts say could bid.
        let expected_bidders = if candidates.is_empty() || lease.is_some() {
            vec![]
        } else {
            expected_bidders(&wanted, &self.pool_supply(None))
        };
        let view = View {
            now_ms: now,
            order: (!order.id.is_empty()).then(|| (order.attempt, self.closes_ms(&order))),
            selection: aijob.spec.bidding.selection,
            accepted_bid: aijob.spec.bidding.accepted_bid.as_deref(),
            bids: &candidates,
            excluded_orgs: &order.excluded_orgs,
            lease: lease_view.as_ref(),
            heartbeat_grace_ms: u64::try_from(self.settings.heartbeat_grace.as_millis()).unwrap_or(10_000),
            fresh_capacity,
            choose_from_ms: published.map_or(u64::MAX, |(published, _)| published.saturating_add(window)),
            expected_bidders: &expected_bidders,
        };
        let step = decide(&view);
        debug!(aijob = %name, ?step, "pool step");

        let mut out = RemoteOutcome {
            phase: AiJobPhase::Bidding,
            reason: "Bidding",
            message: String::new(),
            placed: false,
            order: order.clone(),
            runs_on: None,
            lease: order.lease.clone(),
            exit_code: None,
            cost: lease.as_ref().and_then(|l| l.status.as_ref()?.paid.clone()),
            requeue: Some(Duration::from_secs(1)),
            events: vec![],
        };
        if matches!(step, Step::Publish { .. } | Step::Reauction { .. })
            && let Some(live) = self.other_live_lease(&ns, &name, order.lease.as_deref()).await?
        {
            // Written by an earlier decision whose status never landed.
            let lease_name = live.name_any();
            let attempt = lease_name
                .rsplit_once('-')
                .and_then(|(_, a)| a.parse::<i32>().ok())
                .unwrap_or(order.attempt);
            warn!(aijob = %name, lease = %lease_name, "the job's status missed a live lease; carrying on with it");
            order.attempt = order.attempt.max(attempt);
            order.lease = Some(lease_name.clone());
            out.order = order;
            out.lease = Some(lease_name.clone());
            out.phase = AiJobPhase::Leased;
            out.reason = "LeaseOpening";
            out.message = format!("carrying on with lease {lease_name}, which is still live");
            out.requeue = Some(Duration::from_millis(200));
            return Ok(out);
        }
        match step {
            Step::Publish { attempt, after_no_bids } => {
                let why = after_no_bids.then(|| explain_no_bids(&wanted, &self.pool_supply(None)));
                // An empty window backs the next one off; an order sent because
                // capacity appeared gets the plain window.
                let this_window = if after_no_bids {
                    window_ms(window, attempt)
                } else {
                    window
                };
                order = self
                    .publish(
                        aijob,
                        need,
                        attempt,
                        order.excluded_orgs.clone(),
                        this_window,
                        window,
                        max_price,
                    )
                    .await;
                out.order = order.clone();
                out.lease = None;
                let closes = self.closes_ms(&order);
                match why {
                    Some((reason, msg)) => {
                        // An absolute time: the message stands for the whole window.
                        out.reason = reason;
                        out.message = format!(
                            "{msg} (order {} published again; its window closes at {})",
                            order.id,
                            rfc3339_ms(closes)
                        );
                        out.events.push((true, reason, out.message.clone()));
                    }
                    None => {
                        // The status says what the window's next reconcile
                        // will (`bids_so_far`), so that reconcile has nothing
                        // to write; the Event says what happened.
                        out.message = bids_so_far(&order.id, 0, closes);
                        out.events.push((
                            false,
                            "OrderPublished",
                            format!(
                                "order {} published to the pool; its bid window closes at {}",
                                order.id,
                                rfc3339_ms(closes)
                            ),
                        ));
                    }
                }
                out.requeue = Some(Duration::from_millis(closes.saturating_sub(now).max(20)));
            }
            Step::WaitBids { until_ms } => {
                self.ensure_registered(aijob, need, &order, window, max_price);
                let placed = aijob.status.as_ref().and_then(|s| find(&s.conditions, COND_PLACED));
                match placed.and_then(|c| Some((no_bids_reason(&c.reason)?, c))) {
                    // The last window was empty and this one is so far: keep
                    // saying why, and what the next step is, until a bid comes.
                    Some((reason, c)) if candidates.is_empty() => {
                        out.reason = reason;
                        out.message = c.message.clone();
                    }
                    // No countdown in the message: every changed message is a
                    // status write, and this step runs until the window closes.
                    _ => out.message = bids_so_far(&order.id, candidates.len(), until_ms),
                }
                out.requeue = Some(Duration::from_millis(until_ms.saturating_sub(now).max(20)));
            }
            Step::WaitChoice { open_bids } => {
                self.ensure_registered(aijob, need, &order, window, max_price);
                out.reason = "AwaitingChoice";
                out.message = format!(
                    "{open_bids} open bid(s) for order {}; accept one with `gpupool accept BID -n {ns}` (list them with `gpupool bids {name} -n {ns}`) or set spec.bidding.acceptedBid",
                    order.id
                );
                out.requeue = Some(Duration::from_secs(2));
            }
            Step::BadChoice { message } => {
                out.reason = "InvalidChoice";
                out.message = message;
                out.requeue = Some(Duration::from_secs(5));
            }
            Step::Award { bid } => {
                let Some(winner) = bids.iter().find(|b| b.name_any() == bid) else {
                    return Err(MarketError::Invalid(format!("bid {bid} vanished")));
                };
                let lease_name = self.award(aijob, need, &order, winner, &bids).await?;
                order.lease = Some(lease_name.clone());
                out.order = order.clone();
                out.lease = Some(lease_name.clone());
                out.phase = AiJobPhase::Leased;
                out.reason = "LeaseOpening";
                out.message = opening_message(
                    &bid,
                    &winner.spec.provider_org,
                    &winner.spec.price_per_gpu_hour,
                    &lease_name,
                );
                out.events.push((false, "BidAccepted", out.message.clone()));
                // The settlement worker's status write (lease id, Active) wakes the job.
                out.requeue = Some(Duration::from_secs(1));
            }
            Step::WaitLease => {
                out.phase = AiJobPhase::Leased;
                out.reason = "LeaseOpening";
                // The award's message still says what is happening: a new
                // one here was a status write per job that said nothing new.
                // The escrow refusing the open (a renter's allowance or
                // account too small, say) is the reason the job waits.
                let refused = lease.as_ref().and_then(|l| {
                    let c = find(&l.status.as_ref()?.conditions, crate::settlement_plan::COND_SETTLED)?;
                    (c.status == "False" && !c.message.is_empty()).then(|| (c.reason.clone(), c.message.clone()))
                });
                out.message = match (lease.as_ref(), refused) {
                    (Some(l), Some((reason, why))) => {
                        out.reason = "LeaseOpenRefused";
                        format!("opening lease {} on chain failed ({reason}): {why}", l.name_any())
                    }
                    (Some(l), None) => opening_message(
                        &l.spec.bid,
                        &l.spec.provider.org,
                        &l.spec.price_per_gpu_hour,
                        &l.name_any(),
                    ),
                    (None, _) => format!("opening lease {} on chain", order.lease.clone().unwrap_or_default()),
                };
                // Woken by the Lease's watch event; this is only a safety net.
                out.requeue = Some(Duration::from_secs(2));
            }
            Step::Offer => {
                let l = lease
                    .as_ref()
                    .ok_or_else(|| MarketError::Invalid("lease missing".into()))?;
                self.offer(aijob, l).await;
                out.phase = AiJobPhase::Leased;
                out.reason = "LeaseActive";
                out.message = format!("lease active on chain; handing the workload to {}", l.spec.provider.org);
                // Resends an offer the provider could not take yet (its view of
                // the chain lagged) or lost; the workload report wakes the job sooner.
                out.requeue = Some(self.settings.heartbeat_every.min(Duration::from_secs(1)));
                out.runs_on = Some(runs_on(l));
            }
            Step::Mirror => {
                let l = lease
                    .as_ref()
                    .ok_or_else(|| MarketError::Invalid("lease missing".into()))?;
                let w = l.status.as_ref().and_then(|s| s.workload.clone()).unwrap_or_default();
                out.phase = if w.phase == "Running" {
                    AiJobPhase::Running
                } else {
                    AiJobPhase::Leased
                };
                out.placed = true;
                out.reason = "PlacedInPool";
                out.message = format!("{} in {}, namespace {}", w.phase, l.spec.provider.org, w.namespace);
                if !w.message.is_empty() {
                    out.message.push_str(&format!(": {}", w.message));
                }
                // A lease about to run dry (a refused top-up, or all of
                // maxDuration spent) ends the job: the renter reads why here.
                if let Some(low) = l
                    .status
                    .as_ref()
                    .and_then(|s| find(&s.conditions, COND_FUNDS_LOW))
                    .filter(|c| c.status == "True")
                {
                    out.message
                        .push_str(&format!("; lease {}: {}", l.name_any(), low.message));
                }
                out.runs_on = Some(runs_on(l));
                out.requeue = Some(self.settings.heartbeat_grace / 2);
            }
            Step::Close(reason) => {
                let l = lease
                    .as_ref()
                    .ok_or_else(|| MarketError::Invalid("lease missing".into()))?;
                let patch = serde_json::json!({"spec": {"closeReason": reason}});
                leases_api
                    .patch(&l.name_any(), &PatchParams::default(), &Patch::Merge(&patch))
                    .await?;
                self.lock()
                    .closes_asked
                    .asked(l.metadata.uid.as_deref().unwrap_or_default(), reason, now_ms());
                out.phase = closing_phase(status.phase, Some(reason));
                out.placed = true;
                out.runs_on = Some(runs_on(l));
                out.reason = "LeaseClosing";
                out.message = closing_message(l, reason, self.settings.heartbeat_grace);
                // A completed workload's close is told by the Succeeded event
                // that follows with the payment: a Normal LeaseClosing before
                // it said the same, one more write per job.
                if reason != CloseReason::Completed {
                    out.events.push((true, "LeaseClosing", out.message.clone()));
                }
                out.requeue = Some(Duration::from_secs(1));
            }
            Step::WaitClose => {
                let l = lease
                    .as_ref()
                    .ok_or_else(|| MarketError::Invalid("lease missing".into()))?;
                out.phase = closing_phase(status.phase, l.spec.close_reason);
                out.placed = true;
                out.runs_on = Some(runs_on(l));
                out.reason = "LeaseClosing";
                // The message of the step that asked for the close: a new
                // one here was an AiJob status write that said nothing new.
                out.message = match l.spec.close_reason {
                    Some(reason) => closing_message(l, reason, self.settings.heartbeat_grace),
                    None => "closing the lease on chain".into(),
                };
                // The close on chain (state Closed) wakes the job.
                out.requeue = Some(Duration::from_secs(2));
            }
            Step::Done => {
                let l = lease
                    .as_ref()
                    .ok_or_else(|| MarketError::Invalid("lease missing".into()))?;
                let w = l.status.as_ref().and_then(|s| s.workload.clone()).unwrap_or_default();
                let st = l.status.clone().unwrap_or_default();
                out.placed = true;
                out.runs_on = Some(runs_on(l));
                out.exit_code = w.exit_code;
                out.phase = if w.phase == "Succeeded" {
                    AiJobPhase::Succeeded
                } else {
                    AiJobPhase::Failed
                };
                out.reason = "PlacedInPool";
                out.message = format!(
                    "{} in {}; lease closed as {}: paid {} tokens, refunded {}",
                    w.phase,
                    l.spec.provider.org,
                    st.close_reason.unwrap_or_default(),
                    shown(st.paid.as_deref().unwrap_or_default()),
                    shown(st.refunded.as_deref().unwrap_or_default())
                );
                out.requeue = None;
                if !status.phase.is_some_and(AiJobPhase::is_terminal) {
                    self.record_outcome(&l.spec.provider.org, true).await;
                    self.metrics
                        .pool_lease(crate::telemetry::PoolLeaseEvent::RenterCompleted);
                }
            }
            Step::OutOfFunds => {
                let l = lease
                    .as_ref()
                    .ok_or_else(|| MarketError::Invalid("lease missing".into()))?;
                let st = l.status.clone().unwrap_or_default();
                out.placed = true;
                out.runs_on = Some(runs_on(l));
                out.phase = AiJobPhase::Failed;
                out.reason = "LeaseOutOfFunds";
                out.message = format!(
                    "lease {} in {} ran out of funds before the workload ended: paid {} of {} tokens deposited",
                    l.name_any(),
                    l.spec.provider.org,
                    shown(st.paid.as_deref().unwrap_or_default()),
                    shown(st.deposited.as_deref().unwrap_or_default())
                );
                if let Some(why) = find(&st.conditions, COND_FUNDS_LOW).filter(|c| c.status == "True") {
                    out.message.push_str(&format!("; {}", why.message));
                }
                out.requeue = None;
                if !status.phase.is_some_and(AiJobPhase::is_terminal) {
                    out.events.push((true, "LeaseOutOfFunds", out.message.clone()));
                    self.metrics
                        .pool_lease(crate::telemetry::PoolLeaseEvent::RenterOutOfFunds);
                }
            }
            Step::Reauction { failed_org, attempt } => {
                if !order.excluded_orgs.contains(&failed_org) {
                    let everyone = Wanted {
                        excluded_orgs: &[],
                        ..wanted.clone()
                    };
                    let usable: Vec<String> = self
                        .pool_supply(None)
                        .into_iter()
                        .map(|p| p.org)
                        .filter(|o| everyone.may_use(o))
                        .collect();
                    order.excluded_orgs = exclude_after_failure(&order.excluded_orgs, &failed_org, &usable);
                    self.record_outcome(&failed_org, false).await;
                    self.metrics
                        .pool_lease(crate::telemetry::PoolLeaseEvent::RenterFailedOver);
                }
                let paid = out.cost.clone().unwrap_or_default();
                order = self
                    .publish(
                        aijob,
                        need,
                        attempt,
                        order.excluded_orgs.clone(),
                        window,
                        window,
                        max_price,
                    )
                    .await;
                out.order = order.clone();
                out.lease = None;
                out.reason = "Reauctioned";
                out.message = format!(
                    "{failed_org} failed the lease (paid {paid} for the time used, the rest refunded); order {} asks the other peers",
                    order.id
                );
                out.events.push((true, "Reauctioned", out.message.clone()));
                out.requeue = Some(Duration::from_millis(
                    self.closes_ms(&order).saturating_sub(now).max(20),
                ));
            }
        }
        Ok(out)
    }

    /// When `order`'s bid window closes. The status keeps whole seconds
    /// (metav1.Time), rounded up; the order published by this process knows
    /// the millisecond, and waiting for the next whole second added half a
    /// second to the average placement.
    fn closes_ms(&self, order: &PoolOrder) -> u64 {
        if let Some(o) = self.lock().orders.get(&order.id) {
            return o.closes_ms;
        }
        order.closes_at.as_ref().map(time_ms).unwrap_or(0)
    }

    /// After a restart, the order in the AiJob's status takes bids again.
    fn ensure_registered(&self, aijob: &AiJob, need: &Need, order: &PoolOrder, window: u64, max_price: TokenAmount) {
        let mut st = self.lock();
        if st.orders.contains_key(&order.id) {
            return;
        }
        let closes = order.closes_at.as_ref().map(time_ms).unwrap_or(0);
        let now = now_ms();
        st.orders.insert(
            order.id.clone(),
            OpenOrder {
                aijob: ObjectRef::from_obj(aijob),
                uid: aijob.metadata.uid.clone().unwrap_or_default(),
                order: wire_order(aijob, need, &self.settings.org, &order.id, &order.excluded_orgs),
                max_price,
                published_ms: closes.saturating_sub(window).min(now),
                closes_ms: closes,
                repeat_after_ms: now + window,
                bids: Default::default(),
            },
        );
    }

    /// Sends order `attempt`, taking bids for `window` ms; it may be re-sent
    /// early for fresh capacity once `base_window` ms have passed.
    #[allow(clippy::too_many_arguments)]
    async fn publish(
        &self,
        aijob: &AiJob,
        need: &Need,
        attempt: i32,
        excluded: Vec<String>,
        window: u64,
        base_window: u64,
        max_price: TokenAmount,
    ) -> PoolOrder {
        let uid = aijob.metadata.uid.clone().unwrap_or_default();
        let id = format!(
            "{}-{}-{attempt}",
            self.settings.org,
            uid.chars().take(8).collect::<String>()
        );
        let now = now_ms();
        let closes = now + window;
        let o = wire_order(aijob, need, &self.settings.org, &id, &excluded);
        {
            let mut st = self.lock();
            // Earlier attempts keep taking bids for a minute after their window.
            st.close_orders(now, |o| o.closes_ms + 60_000 <= now);
            st.orders.insert(
                id.clone(),
                OpenOrder {
                    aijob: ObjectRef::from_obj(aijob),
                    uid,
                    order: o.clone(),
                    max_price,
                    published_ms: now,
                    closes_ms: closes,
                    repeat_after_ms: now + base_window,
                    bids: Default::default(),
                },
            );
        }
        match self
            .p2p
            .publish(crate::p2p::swarm::Topic::Orders, self.seal(Body::Order(o)))
            .await
        {
            Ok(()) => {
                self.metrics.order_published();
                info!(order = %id, aijob = %aijob.name_any(), attempt, "order published");
            }
            Err(e) => warn!(order = %id, error = %e, "order not published"),
        }
        PoolOrder {
            id,
            attempt,
            closes_at: ms_to_time(closes),
            excluded_orgs: excluded,
            lease: None,
        }
    }

    /// Creates the renter Lease for the winning bid and tells every bidder.
    async fn award(
        &self,
        aijob: &AiJob,
        need: &Need,
        order: &PoolOrder,
        winner: &Bid,
        bids: &[Bid],
    ) -> Result<String, MarketError> {
        let ns = aijob.namespace().unwrap_or_default();
        let lease_name = format!("{}-{}", aijob.name_any(), order.attempt);
        // The on-chain lease id derives from the order: an order that already
        // had a lease (a late bid for the attempt a failed provider won) cannot
        // have a second one.
        // The cache serves: a lease that answers an earlier attempt's order
        // was created that attempt ago, never within the cache's lag.
        let taken = self
            .leases_labelled(&ns, LABEL_ORDER, &winner.spec.order_id)
            .await?
            .into_iter()
            .any(|l| l.name_any() != lease_name);
        if taken {
            let bids_api: Api<Bid> = Api::namespaced(self.client.clone(), &ns);
            let status = BidStatus {
                state: Some(BidState::Lost),
                message: Some(format!("order {} already had a lease", winner.spec.order_id)),
            };
            crate::ssa::apply_status(&bids_api, &winner.name_any(), MARKET_MANAGER, &status).await?;
            return Err(MarketError::Invalid(format!(
                "bid {} answers order {}, which already had a lease; choosing again",
                winner.name_any(),
                winner.spec.order_id
            )));
        }
        let provider_peer = PeerId::from_str(&winner.spec.provider_peer_id)
            .map_err(|_| MarketError::Invalid("provider peer id".into()))?;
        let provider_wallet: Address = self
            .lock()
            .peers
            .get(&provider_peer)
            .and_then(|p| p.wallet)
            .ok_or_else(|| MarketError::Invalid(format!("no wallet known for {}", winner.spec.provider_org)))?;
        let price =
            TokenAmount::from_str(&winner.spec.price_per_gpu_hour).map_err(|e| MarketError::Invalid(e.to_string()))?;
        let rate = rate_per_second(price, need.count)
            .ok_or_else(|| MarketError::Invalid("the winning price rounds to zero tokens per second".into()))?;
        let max_secs = std::time::Duration::from(aijob.spec.max_duration).as_secs();
        let (deposit, top_up_to) = lease_funding(rate, max_secs, self.settings.deposit_seconds);
        let mut lease = Lease::new(
            &lease_name,
            LeaseSpec {
                side: LeaseSide::Renter,
                // The winning bid's order: maybe an earlier attempt's.
                order_id: winner.spec.order_id.clone(),
                bid: winner.name_any(),
                ai_job: Some(aijob.name_any()),
                renter: LeaseParty {
                    org: self.settings.org.clone(),
                    peer_id: Some(self.peer_id().to_string()),
                    wallet: Some(self.wallet.to_string()),
                },
                provider: LeaseParty {
                    org: winner.spec.provider_org.clone(),
                    peer_id: Some(winner.spec.provider_peer_id.clone()),
                    wallet: Some(provider_wallet.to_string()),
                },
                price_per_gpu_hour: price.to_string(),
                gpu_count: i32::try_from(need.count).unwrap_or(1),
                gpu_product: winner.spec.gpu_product.clone(),
                escrow: Some(Escrow {
                    chain_id: self.chain.config().chain_id,
                    contract: self.chain.config().escrow.to_string(),
                    lease_id: None,
                    deposit: deposit.to_string(),
                    top_up_to: Some(top_up_to.to_string()),
                    // Checked against the namespace before the job got this far.
                    funded_by: aijob.spec.payer.clone(),
                }),
                close_reason: None,
            },
        );
        lease.metadata.namespace = Some(ns.clone());
        lease.metadata.labels = Some(BTreeMap::from([
            (LABEL_ORDER.to_string(), winner.spec.order_id.clone()),
            (LABEL_AIJOB.to_string(), aijob.name_any()),
        ]));
        lease.metadata.owner_references = owner(aijob).map(|o| vec![o]);
        // Born with the settlement worker's finalizer (the pool always runs
        // it): its first reconcile would add it in a write of its own.
        lease.metadata.finalizers = Some(vec![LEASE_FINALIZER.to_string()]);
        // Settlement on chain continues the job's trace.
        lease.metadata.annotations = crate::tracecontext::current_traceparent()
            .map(|tp| BTreeMap::from([(gpupool_crds::ANNOTATION_TRACEPARENT.to_string(), tp)]));
        let api: Api<Lease> = Api::namespaced(self.client.clone(), &ns);
        match api.create(&PostParams::default(), &lease).await {
            Ok(_) => {
                self.metrics.pool_lease(crate::telemetry::PoolLeaseEvent::RenterOpened);
                info!(lease = %lease_name, provider = %winner.spec.provider_org, price = %price, deposit = %deposit, "lease created for the winning bid");
            }
            Err(kube::Error::Api(s)) if s.code == 409 => {}
            Err(e) => return Err(e.into()),
        }
        // No bid is recorded for the job's orders from here on: a recording
        // under way finishes first, and a later bid is answered as late.
        let uid = aijob.metadata.uid.clone().unwrap_or_default();
        let gates: Vec<_> = self
            .lock()
            .orders
            .values()
            .filter(|o| o.uid == uid)
            .map(|o| o.bids.gate.clone())
            .collect();
        let mut closing = Vec::with_capacity(gates.len());
        for g in &gates {
            closing.push(g.write().await);
        }
        let closed = self.lock().close_orders(now_ms(), |o| o.uid == uid);
        drop(closing);
        let bids_api: Api<Bid> = Api::namespaced(self.client.clone(), &ns);
        let lost = format!("{} won at {}", winner.spec.provider_org, winner.spec.price_per_gpu_hour);
        for b in bids {
            let won = b.name_any() == winner.name_any();
            let status = BidStatus {
                state: Some(if won { BidState::Accepted } else { BidState::Lost }),
                message: Some(if won {
                    format!("won; lease {lease_name}")
                } else {
                    lost.clone()
                }),
            };
            let _ = crate::ssa::apply_status(&bids_api, &b.name_any(), MARKET_MANAGER, &status).await;
            if let Ok(peer) = PeerId::from_str(&b.spec.provider_peer_id) {
                // Each bid answers its own order: maybe an earlier attempt of this job.
                let bid_id = format!("{}-{}", b.spec.provider_org, b.spec.order_id);
                self.tell_bid_result(peer, &b.spec.order_id, &bid_id, won).await;
            }
        }
        // Bids recorded while this award chose: not among `bids`, and lost.
        let decided: HashSet<String> = bids.iter().map(|b| b.name_any()).collect();
        for b in undecided_bids(closed, &decided) {
            info!(bid = %b.name, order = %b.order_id, "a bid recorded while the award chose lost");
            let status = BidStatus {
                state: Some(BidState::Lost),
                message: Some(lost.clone()),
            };
            let _ = crate::ssa::apply_status(&bids_api, &b.name, MARKET_MANAGER, &status).await;
            self.tell_bid_result(b.provider, &b.order_id, &b.bid_id, false).await;
        }
        Ok(lease_name)
    }

    async fn offer(&self, aijob: &AiJob, l: &Lease) {
        let (Some(id), Some(escrow), Some(peer)) = (
            l.status.as_ref().and_then(|s| s.lease_id.clone()),
            l.spec.escrow.as_ref(),
            l.spec
                .provider
                .peer_id
                .as_deref()
                .and_then(|p| PeerId::from_str(p).ok()),
        ) else {
            return;
        };
        // A cached AiJob that ran before (the provider failed, so it is
        // offered again) may have had its template elided.
        let api = Api::<AiJob>::namespaced(self.client.clone(), &aijob.namespace().unwrap_or_default());
        let aijob = match crate::cache::with_template(aijob, &api).await {
            Ok(a) => a,
            Err(e) => {
                debug!(lease = %id, error = %e, "could not read the AiJob's template; offering again later");
                return;
            }
        };
        let workload = serde_json::to_vec(&aijob.spec.template).unwrap_or_default();
        let bid_id = format!("{}-{}", l.spec.provider.org, l.spec.order_id);
        let msg = Body::LeaseOffer(LeaseOffer {
            order_id: l.spec.order_id.clone(),
            bid_id,
            chain_id: escrow.chain_id,
            escrow_contract: escrow.contract.clone(),
            lease_id: id.clone(),
            deposit: l
                .status
                .as_ref()
                .and_then(|s| s.deposited.clone())
                .unwrap_or_else(|| escrow.deposit.clone()),
            renter_wallet: self.wallet.to_string(),
            workload,
            max_duration_seconds: std::time::Duration::from(aijob.spec.max_duration).as_secs().max(1),
        });
        {
            let mut st = self.lock();
            let h = st.heard.entry(id.to_ascii_lowercase()).or_default();
            if h.offered_ms == 0 {
                h.offered_ms = now_ms();
            }
        }
        match self.send(peer, msg).await {
            Ok(()) => debug!(lease = %id, provider = %l.spec.provider.org, "lease offer sent"),
            Err(e) => debug!(lease = %id, error = %e, "lease offer not delivered; resending"),
        }
    }
}

/// A provider's report as the renter's Lease records it. The provider puts
/// the lease namespace in front of its message (`namespace: message`).
fn workload_report(s: &LeaseStatus) -> WorkloadReport {
    WorkloadReport {
        phase: s.phase.clone(),
        pod_state: s.pod_state.clone(),
        exit_code: s.exit_code,
        message: s
            .message
            .split_once(": ")
            .map(|(_, m)| m.to_string())
            .unwrap_or_default(),
        namespace: s
            .message
            .split_once(':')
            .map(|(n, _)| n.to_string())
            .unwrap_or_default(),
    }
}

fn runs_on(l: &Lease) -> RunsOn {
    let w = l.status.as_ref().and_then(|s| s.workload.clone()).unwrap_or_default();
    RunsOn {
        org: l.spec.provider.org.clone(),
        peer_id: l.spec.provider.peer_id.clone(),
        namespace: w.namespace,
        job: super::provider_io::WORKLOAD.into(),
        gpu_product: Some(l.spec.gpu_product.clone()),
    }
}

fn wire_order(aijob: &AiJob, need: &Need, org: &str, id: &str, excluded: &[String]) -> wire::Order {
    let mut denied = aijob.spec.placement.denied_orgs.clone();
    denied.extend(excluded.iter().cloned());
    denied.sort();
    denied.dedup();
    wire::Order {
        order_id: id.to_string(),
        renter_org: org.to_string(),
        gpus: Some(wire::GpuRequirements {
            count: need.count,
            models: need.models.clone(),
            min_memory_mib: need.min_memory_mib,
            interconnect: format!("{:?}", aijob.spec.gpus.interconnect),
        }),
        max_price_per_gpu_hour: aijob.spec.max_price_per_gpu_hour.clone(),
        max_duration_seconds: std::time::Duration::from(aijob.spec.max_duration).as_secs().max(1),
        allowed_orgs: aijob.spec.placement.allowed_orgs.clone(),
        denied_orgs: denied,
    }
}

/// Whether an AiJob's status shows it in the pool path.
pub fn in_pool(status: Option<&gpupool_crds::AiJobStatus>) -> bool {
    status.and_then(|s| s.order.as_ref()).is_some_and(|o| !o.id.is_empty())
}

/// Lease state for logs.
pub fn lease_state(l: &Lease) -> Option<LeaseState> {
    l.status.as_ref().and_then(|s| s.state)
}

/// What the AiJob says from the award until its lease is confirmed: the same
/// words from the winning bid and from the Lease record, which names the bid,
/// provider and price. Prices are written as the Lease writes them.
fn opening_message(bid: &str, provider_org: &str, price: &str, lease: &str) -> String {
    let price = TokenAmount::from_str(price).map_or_else(|_| price.to_string(), |p| p.to_string());
    format!("bid {bid} from {provider_org} at {price} per GPU-hour won; opening lease {lease} on chain")
}

/// What the AiJob says while its lease closes for `reason`.
fn closing_message(l: &Lease, reason: CloseReason, heartbeat_grace: Duration) -> String {
    let refused = l
        .status
        .as_ref()
        .and_then(|s| s.workload.as_ref())
        .filter(|w| w.phase == "Refused");
    match reason {
        // It answered, with a no: that is what the renter needs to read.
        CloseReason::ProviderFailed if let Some(w) = refused => format!(
            "{} refused the lease ({}): closing it as ProviderFailed to re-auction the job",
            l.spec.provider.org, w.message
        ),
        CloseReason::ProviderFailed => format!(
            "{} stopped answering (no heartbeat for {}s): closing the lease as ProviderFailed to re-auction the job",
            l.spec.provider.org,
            heartbeat_grace.as_secs()
        ),
        _ => format!(
            "the workload ended in {}; closing the lease as {}",
            l.spec.provider.org,
            reason.as_str()
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::{closing_message, opening_message};
    use gpupool_crds::{CloseReason, Lease};
    use std::time::Duration;

    #[test]
    fn a_provider_that_refused_is_not_called_silent() {
        let mut l: Lease = serde_json::from_value(serde_json::json!({
            "apiVersion": "gpupool.dev/v1alpha1", "kind": "Lease", "metadata": {"name": "job-2"},
            "spec": {"side": "Renter", "orderId": "o", "bid": "b", "renter": {"org": "acme"},
                "provider": {"org": "bravo"}, "pricePerGpuHour": "2", "gpuCount": 1, "gpuProduct": "A100"}
        }))
        .unwrap();
        let grace = Duration::from_secs(15);
        assert_eq!(
            closing_message(&l, CloseReason::ProviderFailed, grace),
            "bravo stopped answering (no heartbeat for 15s): closing the lease as ProviderFailed to re-auction the job"
        );
        l.status = Some(
            serde_json::from_value(serde_json::json!({
                "workload": {"phase": "Refused", "message": "the deposit covers less than a minute"}
            }))
            .unwrap(),
        );
        assert_eq!(
            closing_message(&l, CloseReason::ProviderFailed, grace),
            "bravo refused the lease (the deposit covers less than a minute): closing it as ProviderFailed to re-auction the job"
        );
    }

    #[test]
    fn the_award_and_the_lease_record_say_the_same_while_it_opens() {
        // The bid's price as its provider wrote it, and as the Lease stores it.
        let from_bid = opening_message("bid-1", "bravo", "2.50", "job-0");
        let from_lease = opening_message("bid-1", "bravo", "2.5", "job-0");
        assert_eq!(from_bid, from_lease);
        assert_eq!(
            from_bid,
            "bid bid-1 from bravo at 2.5 per GPU-hour won; opening lease job-0 on chain"
        );
    }
}

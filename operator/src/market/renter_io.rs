//! The renter's side of one pool job, a step at a time: read its bids and
//! its lease, ask `renter::decide` for the next step, and carry it out:
//! publish an order (`renter_orders`), award a bid (`renter_award`), offer,
//! mirror what the provider reports (`renter_reports`), close and
//! re-auction. What the job's status says comes from `renter_says`.

use std::str::FromStr;
use std::time::Duration;

use gpupool_crds::conditions::find;
use gpupool_crds::price::TokenAmount;
use gpupool_crds::{
    AiJob, AiJobPhase, Bid, BidState, CloseReason, LABEL_AIJOB, Lease, LeaseSide, LeaseState, PoolOrder, RunsOn,
};
use kube::api::{ListParams, Patch, PatchParams};
use kube::runtime::reflector::ObjectRef;
use kube::{Api, ResourceExt};
use tracing::{debug, warn};

use super::node::{Market, now_ms};
use super::renter::{LeaseView, Step, View, closing_phase, decide, exclude_after_failure, window_ms};
use super::renter_funds::{explain_unfunded, payer_of};
use super::renter_orders::time_ms;
use super::renter_reports::renter_lease_of;
use super::renter_says::{
    NAMESPACE_DELETING, awaiting_choice, bids_so_far, closing_message, finished, lease_opening, mirrored,
    namespace_deleting, opening_message, order_published, out_of_funds, published_again, reauctioned, runs_on,
    while_bidding,
};
use super::selection::{
    Candidate, Wanted, advertised_room, advertises_fit, expected_bidders, explain_no_bids, lowest_fitting_ask,
};
use crate::placement::Need;
use crate::status::COND_PLACED;

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

impl Market {
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
    pub(super) async fn leases_labelled(&self, ns: &str, label: &str, value: &str) -> Result<Vec<Lease>, MarketError> {
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

    /// Dereference: the job's open bids (a late bid for an earlier attempt
    /// is as good as one for this attempt while it lasts) and its lease.
    async fn observe(&self, ns: &str, name: &str, order: &PoolOrder) -> Result<Observed, MarketError> {
        // Once a lease is chosen the bids no longer matter (the award marked them).
        let bids: Vec<Bid> = if order.id.is_empty() || order.lease.is_some() {
            vec![]
        } else {
            Api::<Bid>::namespaced(self.client.clone(), ns)
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
        let candidates = self.candidates(&bids).await;
        let lease = match &order.lease {
            Some(l) => self
                .lease_named(ns, l)
                .await?
                .map(|l| self.with_close_asked(self.with_heard_workload(l))),
            None => None,
        };
        // The provider's reports find the job through it from now on.
        if let Some((id, rl)) = lease.as_ref().and_then(renter_lease_of) {
            self.lock().renter_leases.insert(id, rl);
        }
        Ok(Observed {
            bids,
            candidates,
            lease,
        })
    }

    /// The bids as selection ranks them: price, the provider's record here,
    /// and how long its bid took to arrive.
    async fn candidates(&self, bids: &[Bid]) -> Vec<Candidate> {
        if bids.is_empty() {
            return vec![];
        }
        let reputations = self.reputations().await;
        bids.iter()
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
            .collect()
    }

    /// The lease as the decision sees it.
    fn lease_view(&self, l: &Lease) -> LeaseView {
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
    }

    /// Whether a job waiting out a window with no bid should ask again now:
    /// room appeared since its order (published at `published`) went out, or
    /// room stood while a long backoff ran (a peer that bid nothing on room
    /// it advertises only costs an order every few seconds). Only as many
    /// waiting jobs ask as the room advertised fits; a claim lasts until
    /// that order's window is over.
    fn room_appeared(
        &self,
        aijob: &str,
        wanted: &Wanted<'_>,
        (published, repeat_after): (u64, u64),
        window: u64,
        now: u64,
    ) -> bool {
        let fits = now >= repeat_after
            && (advertises_fit(wanted, &self.pool_supply(Some(published)))
                || (now.saturating_sub(published) >= super::renter::ROOM_RETRY_MS
                    && advertises_fit(wanted, &self.pool_supply(None))));
        let room = if fits {
            advertised_room(wanted, &self.pool_supply(None))
        } else {
            0
        };
        let claimed = fits && self.lock().claim_room(now, window + 500, room);
        debug!(aijob = %aijob, fits, room, claimed, "capacity for a waiting job");
        claimed
    }

    /// Dereference, decide, act: the one next step of the job's placement,
    /// and what its status says after it.
    async fn step_remote(&self, aijob: &AiJob, need: &Need) -> Result<RemoteOutcome, MarketError> {
        let ns = aijob.namespace().unwrap_or_default();
        let name = aijob.name_any();
        let status = aijob.status.clone().unwrap_or_default();
        let uid = aijob.metadata.uid.clone().unwrap_or_default();
        let mut order = self.lock().latest_order(&uid, status.order.clone().unwrap_or_default());
        let now = now_ms();

        let seen = self.observe(&ns, &name, &order).await?;
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
        let (published, namespace_ending) = {
            let st = self.lock();
            let current = st.orders.get(&order.id);
            (
                current.map(|o| (o.published_ms, o.repeat_after_ms)),
                current.is_some_and(|o| o.bids.namespace_ending),
            )
        };
        // What this renter learnt before a restart stands: the status says it.
        let namespace_ending =
            namespace_ending || find(&status.conditions, COND_PLACED).is_some_and(|c| c.reason == NAMESPACE_DELETING);
        let fresh_capacity = seen.lease.is_none()
            && seen.candidates.is_empty()
            && published.is_some_and(|p| self.room_appeared(&name, &wanted, p, window, now));
        // Only asked while a bid is in hand: who else the adverts say could bid.
        let expected_bidders = if seen.candidates.is_empty() || seen.lease.is_some() {
            vec![]
        } else {
            expected_bidders(&wanted, &self.pool_supply(None))
        };
        let lease_view = seen.lease.as_ref().map(|l| self.lease_view(l));
        let view = View {
            now_ms: now,
            order: (!order.id.is_empty()).then(|| (order.attempt, self.closes_ms(&order))),
            selection: aijob.spec.bidding.selection,
            accepted_bid: aijob.spec.bidding.accepted_bid.as_deref(),
            bids: &seen.candidates,
            excluded_orgs: &order.excluded_orgs,
            lease: lease_view.as_ref(),
            heartbeat_grace_ms: u64::try_from(self.settings.heartbeat_grace.as_millis()).unwrap_or(10_000),
            fresh_capacity,
            choose_from_ms: published.map_or(u64::MAX, |(published, _)| published.saturating_add(window)),
            expected_bidders: &expected_bidders,
            namespace_ending,
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
            cost: seen.lease.as_ref().and_then(|l| l.status.as_ref()?.paid.clone()),
            requeue: Some(Duration::from_secs(1)),
            events: vec![],
        };
        if matches!(step, Step::Publish { .. } | Step::Reauction { .. })
            && let Some(live) = self.other_live_lease(&ns, &name, order.lease.as_deref()).await?
        {
            return Ok(carry_on_with(&name, &live, order, out));
        }
        let leased = || {
            seen.lease
                .as_ref()
                .ok_or_else(|| MarketError::Invalid("lease missing".into()))
        };
        match step {
            Step::Publish { attempt, after_no_bids } => {
                let why = match after_no_bids.then(|| explain_no_bids(&wanted, &self.pool_supply(None))) {
                    // Room at an acceptable price and still no bid: say so
                    // if it is because the payer cannot fund a first deposit.
                    Some(("NoBids", message)) => Some(
                        self.unfunded(aijob, &wanted)
                            .await
                            .map_or(("NoBids", message), |m| ("PayerCannotFund", m)),
                    ),
                    other => other,
                };
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
                let closes = self.closes_ms(&order);
                match why {
                    Some((reason, why)) => {
                        out.reason = reason;
                        out.message = published_again(&why, &order.id, closes);
                        out.events.push((true, reason, out.message.clone()));
                    }
                    None => {
                        // The status says what the window's next reconcile
                        // will (`bids_so_far`), so that reconcile has nothing
                        // to write; the Event says what happened.
                        out.message = bids_so_far(&order.id, 0, closes);
                        out.events
                            .push((false, "OrderPublished", order_published(&order.id, closes)));
                    }
                }
                out.order = order;
                out.lease = None;
                out.requeue = Some(until(closes, now));
            }
            Step::WaitBids { until_ms } => {
                self.ensure_registered(aijob, need, &order, window, max_price);
                let placed = aijob.status.as_ref().and_then(|s| find(&s.conditions, COND_PLACED));
                (out.reason, out.message) = while_bidding(placed, &order.id, seen.candidates.len(), until_ms);
                out.requeue = Some(until(until_ms, now));
            }
            Step::WaitChoice { open_bids } => {
                self.ensure_registered(aijob, need, &order, window, max_price);
                out.reason = "AwaitingChoice";
                out.message = awaiting_choice(open_bids, &order.id, &ns, &name);
                out.requeue = Some(Duration::from_secs(2));
            }
            Step::NamespaceEnding => {
                out.reason = NAMESPACE_DELETING;
                out.message = namespace_deleting(&ns, &order.id);
                // The job's own deletion comes through the watch; this is a backstop.
                out.requeue = Some(Duration::from_secs(10));
            }
            Step::BadChoice { message } => {
                out.reason = "InvalidChoice";
                out.message = message;
                out.requeue = Some(Duration::from_secs(5));
            }
            Step::Award { bid } => {
                let Some(winner) = seen.bids.iter().find(|b| b.name_any() == bid) else {
                    return Err(MarketError::Invalid(format!("bid {bid} vanished")));
                };
                let lease_name = self.award(aijob, need, &order, winner, &seen.bids).await?;
                order.lease = Some(lease_name.clone());
                out.order = order;
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
                // The award's message still says what is happening: a new
                // one here was a status write per job that said nothing new.
                (out.reason, out.message) =
                    lease_opening(seen.lease.as_ref(), order.lease.as_deref().unwrap_or_default());
                // Woken by the Lease's watch event; this is only a safety net.
                out.requeue = Some(Duration::from_secs(2));
            }
            Step::Offer => {
                let l = leased()?;
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
                let l = leased()?;
                (out.phase, out.message) = mirrored(l);
                out.placed = true;
                out.reason = "PlacedInPool";
                out.runs_on = Some(runs_on(l));
                out.requeue = Some(self.settings.heartbeat_grace / 2);
            }
            Step::Close(reason) => {
                let l = leased()?;
                self.ask_close(l, reason).await?;
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
                let l = leased()?;
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
                let l = leased()?;
                (out.phase, out.exit_code, out.message) = finished(l);
                out.placed = true;
                out.runs_on = Some(runs_on(l));
                out.reason = "PlacedInPool";
                out.requeue = None;
                if !status.phase.is_some_and(AiJobPhase::is_terminal) {
                    self.record_outcome(&l.spec.provider.org, true).await;
                    self.metrics
                        .pool_lease(crate::telemetry::PoolLeaseEvent::RenterCompleted);
                }
            }
            Step::OutOfFunds => {
                let l = leased()?;
                out.placed = true;
                out.runs_on = Some(runs_on(l));
                out.phase = AiJobPhase::Failed;
                out.reason = "LeaseOutOfFunds";
                out.message = out_of_funds(l);
                out.requeue = None;
                if !status.phase.is_some_and(AiJobPhase::is_terminal) {
                    out.events.push((true, "LeaseOutOfFunds", out.message.clone()));
                    self.metrics
                        .pool_lease(crate::telemetry::PoolLeaseEvent::RenterOutOfFunds);
                }
            }
            Step::Reauction { failed_org, attempt } => {
                if !order.excluded_orgs.contains(&failed_org) {
                    order.excluded_orgs = self.exclude(&wanted, &order.excluded_orgs, &failed_org);
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
                out.reason = "Reauctioned";
                out.message = reauctioned(&failed_org, &paid, &order.id);
                out.events.push((true, "Reauctioned", out.message.clone()));
                out.requeue = Some(until(self.closes_ms(&order), now));
                out.order = order;
                out.lease = None;
            }
        }
        Ok(out)
    }

    /// Asks the settlement worker to close lease `l` on chain for `reason`,
    /// and remembers the ask while the cache lags the patch.
    async fn ask_close(&self, l: &Lease, reason: CloseReason) -> Result<(), MarketError> {
        let patch = serde_json::json!({"spec": {"closeReason": reason}});
        Api::<Lease>::namespaced(self.client.clone(), &l.namespace().unwrap_or_default())
            .patch(&l.name_any(), &PatchParams::default(), &Patch::Merge(&patch))
            .await?;
        self.lock()
            .closes_asked
            .asked(l.metadata.uid.as_deref().unwrap_or_default(), reason, now_ms());
        Ok(())
    }

    /// Why this job's payer cannot fund a first deposit at the lowest ask
    /// that fits, alone or next to its other orders holding bids not yet
    /// won or lost (each pledges a deposit at its provider), if it cannot;
    /// `None` when it can, or when the chain does not answer (the plain "no
    /// bids" stands).
    async fn unfunded(&self, aijob: &AiJob, wanted: &Wanted<'_>) -> Option<String> {
        let lowest = lowest_fitting_ask(wanted, &self.pool_supply(None))?;
        let payer = payer_of(self.wallet, aijob.spec.payer.as_deref().unwrap_or_default()).ok()?;
        let funds = self
            .payer_funds(payer)
            .await
            .map_err(|e| debug!(error = %e, "could not read the job's payer's funds"))
            .ok()?;
        let uid = aijob.metadata.uid.as_deref().unwrap_or_default();
        let waiting = self
            .lock()
            .orders
            .values()
            .filter(|o| o.uid != uid && !o.bids.recorded.is_empty())
            .filter(|o| payer_of(self.wallet, &o.order.payer_wallet).ok() == Some(payer))
            .count();
        explain_unfunded(&payer, funds, lowest, wanted.count, waiting)
    }

    /// The organisations a re-auction leaves out after `failed_org` failed
    /// a lease, judged against the connected organisations the job may use.
    fn exclude(&self, wanted: &Wanted<'_>, excluded: &[String], failed_org: &str) -> Vec<String> {
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
        exclude_after_failure(excluded, failed_org, &usable)
    }
}

/// What a step reads before it decides: the job's bids still in play, as
/// they are and as selection ranks them, and the current attempt's lease.
struct Observed {
    bids: Vec<Bid>,
    candidates: Vec<Candidate>,
    lease: Option<Lease>,
}

/// How long until `deadline_ms`, at least a moment.
fn until(deadline_ms: u64, now_ms: u64) -> Duration {
    Duration::from_millis(deadline_ms.saturating_sub(now_ms).max(20))
}

/// The outcome of a step that was about to order again while lease `live`
/// is still open: written by an earlier decision whose status never landed,
/// so the job carries on with it (a job never has two live leases).
fn carry_on_with(aijob: &str, live: &Lease, mut order: PoolOrder, mut out: RemoteOutcome) -> RemoteOutcome {
    let lease_name = live.name_any();
    let attempt = lease_name
        .rsplit_once('-')
        .and_then(|(_, a)| a.parse::<i32>().ok())
        .unwrap_or(order.attempt);
    warn!(aijob = %aijob, lease = %lease_name, "the job's status missed a live lease; carrying on with it");
    order.attempt = order.attempt.max(attempt);
    order.lease = Some(lease_name.clone());
    out.order = order;
    out.lease = Some(lease_name.clone());
    out.phase = AiJobPhase::Leased;
    out.reason = "LeaseOpening";
    out.message = format!("carrying on with lease {lease_name}, which is still live");
    out.requeue = Some(Duration::from_millis(200));
    out
}

/// Whether an AiJob's status shows it in the pool path.
pub fn in_pool(status: Option<&gpupool_crds::AiJobStatus>) -> bool {
    status.and_then(|s| s.order.as_ref()).is_some_and(|o| !o.id.is_empty())
}

/// Lease state for logs.
pub fn lease_state(l: &Lease) -> Option<LeaseState> {
    l.status.as_ref().and_then(|s| s.state)
}

//! The renter's side of one pool placement, as a level-based decision: from
//! what the AiJob status, its Bids and its Lease say now, the one next step.
//! Pure; `market::renter_io` carries steps out.

use gpupool_crds::{AiJobPhase, BidSelection, CloseReason, LeaseState, WorkloadReport};

use super::selection::{Candidate, pick};

/// The current attempt's Lease, as far as the decision needs it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LeaseView {
    pub provider_org: String,
    pub state: Option<LeaseState>,
    /// The reason we asked the chain to close with, if we did.
    pub close_requested: Option<CloseReason>,
    /// The reason the chain recorded.
    pub closed_as: Option<String>,
    pub workload: Option<WorkloadReport>,
    /// Last message from the provider, or when the lease became active.
    pub last_heard_ms: Option<u64>,
}

#[derive(Clone, Debug)]
pub struct View<'a> {
    pub now_ms: u64,
    /// Attempt number and bid-window end of the current order, if any.
    pub order: Option<(i32, u64)>,
    pub selection: BidSelection,
    pub accepted_bid: Option<&'a str>,
    pub bids: &'a [Candidate],
    pub excluded_orgs: &'a [String],
    pub lease: Option<&'a LeaseView>,
    pub heartbeat_grace_ms: u64,
    /// A peer advertised room for this job after the current order went out
    /// (and at least a base window ago): ask again instead of sitting out a
    /// backoff window that capacity has made pointless.
    pub fresh_capacity: bool,
    /// From when Auto selection may take the bids in hand: a base window
    /// after the order went out. A window stretched by backoff is there to
    /// wait for capacity, not for more bids; sitting on a bid until it ended
    /// kept jobs waiting seconds after GPUs came free.
    pub choose_from_ms: u64,
    /// The organisations whose adverts say they could bid (see
    /// `selection::expected_bidders`). Auto selection chooses as soon as
    /// each has a usable bid in, without waiting out the window.
    pub expected_bidders: &'a [String],
    /// The job's namespace is being deleted: the API server refused to
    /// record a bid for the current order there (`NamespaceTerminating`),
    /// or the job's status says so from before this renter (re)started.
    pub namespace_ending: bool,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Step {
    /// Publish order attempt `attempt`; also after a window with no bids.
    Publish { attempt: i32, after_no_bids: bool },
    /// The window is open; look again at `until_ms`.
    WaitBids { until_ms: u64 },
    /// Open a lease for this bid.
    Award { bid: String },
    /// Manual selection: waiting for spec.bidding.acceptedBid.
    WaitChoice { open_bids: usize },
    /// The accepted bid names nothing usable.
    BadChoice { message: String },
    /// The lease is being opened on chain.
    WaitLease,
    /// The lease is active but the provider has not reported: (re)send the offer.
    Offer,
    /// The provider reports; mirror it.
    Mirror,
    /// Ask the chain to close the lease.
    Close(CloseReason),
    /// Closing is under way.
    WaitClose,
    /// The lease closed and the workload ended: the job is done.
    Done,
    /// The provider failed: exclude it and order again.
    Reauction { failed_org: String, attempt: i32 },
    /// The lease ran out of funds before the workload ended: the renter's
    /// money, not the provider, stopped it, so the job fails and says so.
    OutOfFunds,
    /// Its namespace is being deleted, and the job with it: no more orders.
    /// Each would have every provider hold GPUs for bids that cannot be
    /// written down; a busy namespace controller takes seconds to tens of
    /// seconds to reach the job itself.
    NamespaceEnding,
}

/// How far a workload has got, as its provider reports it.
fn workload_rank(phase: &str) -> u8 {
    match phase {
        "Running" => 1,
        "Succeeded" | "Failed" | "Refused" => 2,
        _ => 0,
    }
}

/// Whether a workload report may replace the one applied before: reports
/// only move forward. One that goes back from finished to running was read
/// from a stale cache, or overtaken in flight, and would make a finished job
/// look failed when its lease closes.
pub fn moves_forward(applied: Option<&str>, reported: &str) -> bool {
    applied.is_none_or(|a| workload_rank(reported) >= workload_rank(a))
}

/// The phase an AiJob shows while its lease closes. A workload that ran and
/// ended stays Running until the close is settled, as a batch Job does until
/// it is marked Complete: going back to Leased showed users Running → Leased →
/// Succeeded. A lease that closes before its workload ran, or because its
/// provider was lost (the job is placed again), shows Leased.
pub fn closing_phase(current: Option<AiJobPhase>, reason: Option<CloseReason>) -> AiJobPhase {
    match (current, reason) {
        (Some(AiJobPhase::Running), Some(r)) if r != CloseReason::ProviderFailed => AiJobPhase::Running,
        _ => AiJobPhase::Leased,
    }
}

/// The organisations a re-auction leaves out after `failed` failed a lease.
/// Each failure is left out, until that would leave none of `usable` (the
/// connected organisations the job may use): then only the latest one is,
/// so a job that every organisation failed once (a busy pool misses beats)
/// is not left with nobody to ask.
pub fn exclude_after_failure(excluded: &[String], failed: &str, usable: &[String]) -> Vec<String> {
    let mut out = excluded.to_vec();
    if !out.iter().any(|o| o == failed) {
        out.push(failed.to_string());
    }
    if !usable.is_empty() && usable.iter().all(|o| out.contains(o)) {
        out = vec![failed.to_string()];
    }
    out
}

fn terminal(w: &WorkloadReport) -> bool {
    matches!(w.phase.as_str(), "Succeeded" | "Failed")
}

pub fn decide(v: &View<'_>) -> Step {
    match next_step(v) {
        // Nothing new can be written in an ending namespace: no Bid, so no
        // order is worth sending, and no Lease, so no bid can be awarded.
        // Waiting out a window would write the bidding reason over the one
        // that says why, which a restarted renter reads back.
        Step::Publish { .. }
        | Step::Reauction { .. }
        | Step::WaitBids { .. }
        | Step::WaitChoice { .. }
        | Step::BadChoice { .. }
        | Step::Award { .. }
            if v.namespace_ending =>
        {
            Step::NamespaceEnding
        }
        step => step,
    }
}

fn next_step(v: &View<'_>) -> Step {
    let Some((attempt, closes_at)) = v.order else {
        return Step::Publish {
            attempt: 1,
            after_no_bids: false,
        };
    };
    if let Some(lease) = v.lease {
        let finished = lease.workload.as_ref().is_some_and(terminal);
        let closed = lease.state == Some(LeaseState::Closed);
        if closed {
            return if finished || lease.close_requested == Some(CloseReason::Completed) {
                Step::Done
            } else if lease.closed_as.as_deref() == Some(CloseReason::InsufficientFunds.as_str()) {
                Step::OutOfFunds
            } else {
                // Closed before the work finished: the provider failed (or the
                // funds ran out, or it was closed by hand). Never two live leases:
                // the next order only starts once this one is closed on chain.
                Step::Reauction {
                    failed_org: lease.provider_org.clone(),
                    attempt: attempt + 1,
                }
            };
        }
        if lease.close_requested.is_some() {
            return Step::WaitClose;
        }
        if finished {
            return Step::Close(CloseReason::Completed);
        }
        if lease.workload.as_ref().is_some_and(|w| w.phase == "Refused") {
            return Step::Close(CloseReason::ProviderFailed);
        }
        return match lease.state {
            Some(LeaseState::Active) | Some(LeaseState::InsufficientFunds) => {
                let silent = lease
                    .last_heard_ms
                    .is_some_and(|t| v.now_ms.saturating_sub(t) > v.heartbeat_grace_ms);
                if silent {
                    Step::Close(CloseReason::ProviderFailed)
                } else if lease.workload.is_none() {
                    Step::Offer
                } else {
                    Step::Mirror
                }
            }
            _ => Step::WaitLease,
        };
    }
    let usable: Vec<&Candidate> = v
        .bids
        .iter()
        .filter(|b| b.expires_at_ms > v.now_ms && !v.excluded_orgs.contains(&b.org))
        .collect();
    match v.selection {
        BidSelection::Manual => match v.accepted_bid {
            Some(name) => match v.bids.iter().find(|b| b.name == name) {
                Some(b) if b.expires_at_ms <= v.now_ms => Step::BadChoice {
                    message: format!("bid {name} expired before it was accepted; accept another or wait for new bids"),
                },
                Some(b) if v.excluded_orgs.contains(&b.org) => Step::BadChoice {
                    message: format!("bid {name} is from {}, which failed this job before", b.org),
                },
                Some(_) => Step::Award { bid: name.to_string() },
                None => Step::BadChoice {
                    message: format!(
                        "bidding.acceptedBid names {name}, which is not a bid for this job's current order"
                    ),
                },
            },
            None if usable.is_empty() && v.fresh_capacity => Step::Publish {
                attempt: attempt + 1,
                after_no_bids: false,
            },
            None if v.now_ms < closes_at || !usable.is_empty() => Step::WaitChoice {
                open_bids: usable.len(),
            },
            None => Step::Publish {
                attempt: attempt + 1,
                after_no_bids: true,
            },
        },
        BidSelection::Auto => {
            if v.now_ms < closes_at {
                if usable.is_empty() && v.fresh_capacity {
                    return Step::Publish {
                        attempt: attempt + 1,
                        after_no_bids: false,
                    };
                }
                let choose_from = v.choose_from_ms.min(closes_at);
                let everyone_bid = !usable.is_empty()
                    && v.expected_bidders
                        .iter()
                        .all(|org| usable.iter().any(|b| &b.org == org));
                if !everyone_bid && (usable.is_empty() || v.now_ms < choose_from) {
                    let until_ms = if usable.is_empty() { closes_at } else { choose_from };
                    return Step::WaitBids { until_ms };
                }
            }
            match pick(v.bids, v.now_ms, v.excluded_orgs) {
                Some(b) => Step::Award { bid: b.name.clone() },
                None => Step::Publish {
                    attempt: attempt + 1,
                    after_no_bids: true,
                },
            }
        }
    }
}

/// Renter Lease uid → the close this process asked for in its spec (and
/// when, in ms), until the lease cache shows it. Decided again from a cache
/// that lagged the patch, each requeue asked again: three to five spec
/// patches per lease in a burst, where one says it.
#[derive(Debug, Default)]
pub struct ClosesAsked(std::collections::HashMap<String, (CloseReason, u64)>);

impl ClosesAsked {
    /// A cache lags seconds. An entry this old belongs to a lease that went
    /// away before the cache showed its close (its job was deleted then), and
    /// nothing would ever remove it otherwise.
    const TTL_MS: u64 = 600_000;
    /// Bounds memory even while the watch is broken; forgetting costs one patch again.
    const MAX: usize = 10_000;

    pub fn asked(&mut self, uid: &str, reason: CloseReason, now_ms: u64) {
        // In flight are the closes of the last few seconds: a short walk.
        self.0.retain(|_, (_, at)| now_ms.saturating_sub(*at) < Self::TTL_MS);
        if self.0.len() >= Self::MAX {
            self.0.clear();
        }
        self.0.insert(uid.to_string(), (reason, now_ms));
    }

    /// The close to plan with: the cached lease's, once it shows one (the
    /// memory of asking goes then), else the one asked for here.
    pub fn plan_with(&mut self, uid: &str, cached: Option<CloseReason>) -> Option<CloseReason> {
        if cached.is_some() {
            self.0.remove(uid);
            return cached;
        }
        self.0.get(uid).map(|(reason, _)| *reason)
    }
}

/// A job waiting out a long backoff while the pool advertises room for it
/// asks again after this long, changed adverts or not.
pub const ROOM_RETRY_MS: u64 = 2_000;

/// Bid window of attempt `attempt`: the configured window, plus a backoff
/// after windows that got nothing, so an empty pool is not asked every second.
pub fn window_ms(window_ms: u64, attempt: i32) -> u64 {
    let extra = if attempt <= 1 {
        0
    } else {
        1000u64 << (attempt - 2).clamp(0, 5)
    };
    window_ms + extra.min(30_000)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bid(name: &str, org: &str, price: &str) -> Candidate {
        Candidate {
            name: name.into(),
            org: org.into(),
            price: price.parse().unwrap(),
            completed: 0,
            failed: 0,
            latency_ms: 1,
            expires_at_ms: 100_000,
        }
    }

    fn view<'a>(bids: &'a [Candidate], lease: Option<&'a LeaseView>) -> View<'a> {
        View {
            now_ms: 10_000,
            order: Some((1, 5_000)),
            selection: BidSelection::Auto,
            accepted_bid: None,
            bids,
            excluded_orgs: &[],
            lease,
            heartbeat_grace_ms: 3_000,
            fresh_capacity: false,
            choose_from_ms: u64::MAX,
            // Someone the adverts say could still bid, so the window holds
            // unless a test says otherwise.
            expected_bidders: Box::leak(Box::new(["slowpoke".to_string()])),
            namespace_ending: false,
        }
    }

    #[test]
    fn no_order_goes_out_for_a_job_whose_namespace_is_ending() {
        // An empty window, then fresh capacity: both would order again.
        let mut v = view(&[], None);
        v.namespace_ending = true;
        assert_eq!(decide(&v), Step::NamespaceEnding);
        v.now_ms = 1000;
        v.fresh_capacity = true;
        assert_eq!(decide(&v), Step::NamespaceEnding);
        // A provider failed the lease: no re-auction either.
        let failed = LeaseView {
            state: Some(LeaseState::Closed),
            provider_org: "globex".into(),
            ..LeaseView::default()
        };
        let mut v = view(&[], Some(&failed));
        v.namespace_ending = true;
        assert_eq!(decide(&v), Step::NamespaceEnding);
        // A window still open, a bid in hand: its Lease could not be
        // created there either.
        let mut v = view(&[], None);
        v.now_ms = 1000;
        v.namespace_ending = true;
        assert_eq!(decide(&v), Step::NamespaceEnding);
        let bids = [bid("b1", "globex", "2")];
        let mut v = view(&bids, None);
        v.namespace_ending = true;
        assert_eq!(decide(&v), Step::NamespaceEnding);
        v.selection = BidSelection::Manual;
        v.accepted_bid = Some("b1");
        assert_eq!(decide(&v), Step::NamespaceEnding);
        v.accepted_bid = None;
        assert_eq!(decide(&v), Step::NamespaceEnding);
        // A lease made before: it runs and settles as before (deleting the
        // job cancels it).
        let active = LeaseView {
            state: Some(LeaseState::Active),
            provider_org: "globex".into(),
            last_heard_ms: Some(9_900),
            ..LeaseView::default()
        };
        let mut v = view(&[], Some(&active));
        v.namespace_ending = true;
        assert_eq!(decide(&v), Step::Offer);
    }

    #[test]
    fn a_close_asked_for_stands_until_the_cache_shows_one() {
        let mut asked = ClosesAsked::default();
        assert_eq!(asked.plan_with("u", None), None);
        asked.asked("u", CloseReason::Completed, 1_000);
        // The cache lags the patch: the close still counts as asked.
        assert_eq!(asked.plan_with("u", None), Some(CloseReason::Completed));
        assert_eq!(asked.plan_with("other", None), None);
        // The cache caught up; what it shows wins and the memory goes.
        assert_eq!(
            asked.plan_with("u", Some(CloseReason::ProviderFailed)),
            Some(CloseReason::ProviderFailed)
        );
        assert_eq!(asked.plan_with("u", None), None);
        for i in 0..ClosesAsked::MAX + 3 {
            asked.asked(&i.to_string(), CloseReason::Completed, 2_000);
        }
        assert!(asked.0.len() <= ClosesAsked::MAX);
    }

    #[test]
    fn a_close_whose_lease_went_away_is_forgotten() {
        let mut asked = ClosesAsked::default();
        // Its job was deleted before the cache showed the close: nothing asks about "gone" again.
        asked.asked("gone", CloseReason::RenterCancelled, 1_000);
        asked.asked("recent", CloseReason::Completed, 1_000 + ClosesAsked::TTL_MS - 1);
        asked.asked("now", CloseReason::Completed, 1_000 + ClosesAsked::TTL_MS);
        assert_eq!(asked.plan_with("gone", None), None);
        assert_eq!(asked.plan_with("recent", None), Some(CloseReason::Completed));
        assert_eq!(asked.plan_with("now", None), Some(CloseReason::Completed));
    }

    #[test]
    fn auto_chooses_once_everyone_who_could_bid_has_bid() {
        let expected = ["globex".to_string(), "initech".to_string()];
        let one = [bid("b1", "globex", "2")];
        let mut v = view(&one, None);
        v.order = Some((1, 5_000));
        v.choose_from_ms = 5_000;
        v.now_ms = 1_100;
        v.expected_bidders = &expected;
        // initech advertises room and has not bid: the window holds.
        assert_eq!(decide(&v), Step::WaitBids { until_ms: 5_000 });
        // Both in: the cheaper wins now, not at 5,000.
        let both = [bid("b1", "globex", "2"), bid("b2", "initech", "1.5")];
        v.bids = &both;
        assert_eq!(decide(&v), Step::Award { bid: "b2".into() });
        // An expired bid is no answer.
        let mut stale = both.clone();
        stale[1].expires_at_ms = 1_000;
        v.bids = &stale;
        assert_eq!(decide(&v), Step::WaitBids { until_ms: 5_000 });
        // Nobody advertises room any more: the bid in hand is all there will be.
        v.bids = &one;
        v.expected_bidders = &[];
        assert_eq!(decide(&v), Step::Award { bid: "b1".into() });
        // ... but no bid at all still waits for the window.
        v.bids = &[];
        assert_eq!(decide(&v), Step::WaitBids { until_ms: 5_000 });
        // Manual selection always waits for the renter.
        v.bids = &both;
        v.expected_bidders = &expected;
        v.selection = BidSelection::Manual;
        assert_eq!(decide(&v), Step::WaitChoice { open_bids: 2 });
    }

    #[test]
    fn a_backoff_window_does_not_sit_on_a_bid() {
        // Attempt 4: published at 1,000 with a base window of 300 ms, stretched to 5,000.
        let bids = [bid("b1", "globex", "2")];
        let mut v = view(&bids, None);
        v.order = Some((4, 5_000));
        v.choose_from_ms = 1_300;
        v.now_ms = 1_100;
        assert_eq!(decide(&v), Step::WaitBids { until_ms: 1_300 });
        v.now_ms = 1_400;
        assert_eq!(decide(&v), Step::Award { bid: "b1".into() });
        // No bid yet: the stretched window still holds.
        let mut v = view(&[], None);
        v.order = Some((4, 5_000));
        v.choose_from_ms = 1_300;
        v.now_ms = 1_400;
        assert_eq!(decide(&v), Step::WaitBids { until_ms: 5_000 });
    }

    #[test]
    fn auction_steps() {
        let mut v = view(&[], None);
        v.order = None;
        assert_eq!(
            decide(&v),
            Step::Publish {
                attempt: 1,
                after_no_bids: false
            }
        );
        let mut v = view(&[], None);
        v.now_ms = 1000;
        assert_eq!(decide(&v), Step::WaitBids { until_ms: 5000 });
        assert_eq!(
            decide(&view(&[], None)),
            Step::Publish {
                attempt: 2,
                after_no_bids: true
            }
        );
        let bids = [bid("b1", "globex", "2"), bid("b2", "initech", "1")];
        assert_eq!(decide(&view(&bids, None)), Step::Award { bid: "b2".into() });
    }

    #[test]
    fn fresh_capacity_cuts_a_backoff_short() {
        let mut v = view(&[], None);
        v.now_ms = 1000;
        v.fresh_capacity = true;
        let again = Step::Publish {
            attempt: 2,
            after_no_bids: false,
        };
        assert_eq!(decide(&v), again);
        v.selection = BidSelection::Manual;
        assert_eq!(decide(&v), again);
        // A bid in hand is waited on, whatever the pool says.
        let bids = [bid("b1", "globex", "2")];
        let mut v = view(&bids, None);
        v.now_ms = 1000;
        v.fresh_capacity = true;
        assert_eq!(decide(&v), Step::WaitBids { until_ms: 5000 });
        v.selection = BidSelection::Manual;
        assert_eq!(decide(&v), Step::WaitChoice { open_bids: 1 });
    }

    #[test]
    fn manual_selection() {
        let bids = [bid("b1", "globex", "2")];
        let mut v = view(&bids, None);
        v.selection = BidSelection::Manual;
        assert_eq!(decide(&v), Step::WaitChoice { open_bids: 1 });
        v.accepted_bid = Some("b1");
        assert_eq!(decide(&v), Step::Award { bid: "b1".into() });
        v.accepted_bid = Some("nope");
        assert!(matches!(decide(&v), Step::BadChoice { .. }));
    }

    #[test]
    fn lease_life_and_failover() {
        let mut l = LeaseView {
            provider_org: "globex".into(),
            state: Some(LeaseState::Pending),
            ..Default::default()
        };
        assert_eq!(decide(&view(&[], Some(&l))), Step::WaitLease);
        l.state = Some(LeaseState::Active);
        l.last_heard_ms = Some(9_000);
        assert_eq!(decide(&view(&[], Some(&l))), Step::Offer);
        l.workload = Some(WorkloadReport {
            phase: "Running".into(),
            ..Default::default()
        });
        assert_eq!(decide(&view(&[], Some(&l))), Step::Mirror);
        // Silent past the grace window: close as provider-failed, then re-auction once closed.
        l.last_heard_ms = Some(6_000);
        assert_eq!(decide(&view(&[], Some(&l))), Step::Close(CloseReason::ProviderFailed));
        l.close_requested = Some(CloseReason::ProviderFailed);
        assert_eq!(decide(&view(&[], Some(&l))), Step::WaitClose);
        l.state = Some(LeaseState::Closed);
        assert_eq!(
            decide(&view(&[], Some(&l))),
            Step::Reauction {
                failed_org: "globex".into(),
                attempt: 2
            }
        );
        // Run dry before the work ended: the renter's funds, not the
        // provider, stopped it; no re-auction counts it against the provider.
        let dry = LeaseView {
            provider_org: "globex".into(),
            state: Some(LeaseState::Closed),
            closed_as: Some("InsufficientFunds".into()),
            workload: Some(WorkloadReport {
                phase: "Running".into(),
                ..Default::default()
            }),
            ..Default::default()
        };
        assert_eq!(decide(&view(&[], Some(&dry))), Step::OutOfFunds);
        // Finished work closes as completed and ends there.
        let mut done = LeaseView {
            provider_org: "globex".into(),
            state: Some(LeaseState::Active),
            last_heard_ms: Some(9_999),
            workload: Some(WorkloadReport {
                phase: "Succeeded".into(),
                exit_code: Some(0),
                ..Default::default()
            }),
            ..Default::default()
        };
        assert_eq!(decide(&view(&[], Some(&done))), Step::Close(CloseReason::Completed));
        done.close_requested = Some(CloseReason::Completed);
        done.state = Some(LeaseState::Closed);
        assert_eq!(decide(&view(&[], Some(&done))), Step::Done);
    }

    #[test]
    fn backoff_grows_and_caps() {
        assert_eq!(window_ms(2000, 1), 2000);
        assert_eq!(window_ms(2000, 2), 3000);
        assert_eq!(window_ms(2000, 4), 6000);
        assert_eq!(window_ms(2000, 40), 32_000);
    }

    #[test]
    fn workload_reports_never_go_back() {
        assert!(moves_forward(None, "Pending"));
        assert!(moves_forward(Some("Pending"), "Running"));
        assert!(moves_forward(Some("Running"), "Running"));
        assert!(moves_forward(Some("Running"), "Succeeded"));
        assert!(!moves_forward(Some("Succeeded"), "Running"));
        assert!(!moves_forward(Some("Failed"), "Pending"));
        assert!(!moves_forward(Some("Running"), "Pending"));
    }

    #[test]
    fn a_finished_workload_stays_running_while_its_lease_closes() {
        let running = Some(AiJobPhase::Running);
        assert_eq!(
            closing_phase(running, Some(CloseReason::Completed)),
            AiJobPhase::Running
        );
        assert_eq!(
            closing_phase(running, Some(CloseReason::RenterCancelled)),
            AiJobPhase::Running
        );
        assert_eq!(
            closing_phase(running, Some(CloseReason::ProviderFailed)),
            AiJobPhase::Leased
        );
        assert_eq!(
            closing_phase(Some(AiJobPhase::Leased), Some(CloseReason::Completed)),
            AiJobPhase::Leased
        );
        assert_eq!(closing_phase(running, None), AiJobPhase::Leased);
    }

    #[test]
    fn failures_are_left_out_until_nobody_would_be_left() {
        let usable = vec!["bravo".to_string(), "corvus".to_string()];
        let once = exclude_after_failure(&[], "bravo", &usable);
        assert_eq!(once, vec!["bravo".to_string()]);
        // corvus failed too: asking nobody would strand the job, so only
        // corvus, the latest to fail, sits this round out.
        assert_eq!(
            exclude_after_failure(&once, "corvus", &usable),
            vec!["corvus".to_string()]
        );
        // A third organisation is still there to ask: both stay out.
        let three = vec!["bravo".to_string(), "corvus".to_string(), "dyad".to_string()];
        assert_eq!(
            exclude_after_failure(&once, "corvus", &three),
            vec!["bravo".to_string(), "corvus".to_string()]
        );
    }
}

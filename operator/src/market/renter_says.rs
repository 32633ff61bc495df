//! What a pool-placed AiJob says at each step of its placement: the
//! messages a person reads in its status and Events. Pure.

use std::str::FromStr;
use std::time::Duration;

use gpupool_crds::conditions::find;
use gpupool_crds::price::{TokenAmount, shown};
use gpupool_crds::{AiJobPhase, CloseReason, Lease, RunsOn};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use k8s_openapi::jiff::Timestamp;
use kube::ResourceExt;

use super::selection::no_bids_reason;
use crate::settlement_plan::{COND_FUNDS_LOW, COND_SETTLED};

/// A bidding job's status while its window is open.
pub(super) fn bids_so_far(order: &str, bids: usize, closes_ms: u64) -> String {
    format!(
        "order {order} open: {bids} bid(s) so far; the window closes at {}",
        rfc3339_ms(closes_ms)
    )
}

/// Milliseconds since the epoch as RFC 3339, for messages that must stay
/// true while they stand (a countdown would be wrong a second later).
pub(super) fn rfc3339_ms(ms: u64) -> String {
    i64::try_from(ms)
        .ok()
        .and_then(|ms| Timestamp::from_millisecond(ms).ok())
        .map_or_else(|| ms.to_string(), |t| t.to_string())
}

pub(super) fn runs_on(l: &Lease) -> RunsOn {
    let w = l.status.as_ref().and_then(|s| s.workload.clone()).unwrap_or_default();
    RunsOn {
        org: l.spec.provider.org.clone(),
        peer_id: l.spec.provider.peer_id.clone(),
        namespace: w.namespace,
        job: super::lease_objects::WORKLOAD.into(),
        gpu_product: Some(l.spec.gpu_product.clone()),
    }
}

/// What the AiJob says from the award until its lease is confirmed: the same
/// words from the winning bid and from the Lease record, which names the bid,
/// provider and price. Prices are written as the Lease writes them.
pub(super) fn opening_message(bid: &str, provider_org: &str, price: &str, lease: &str) -> String {
    let price = TokenAmount::from_str(price).map_or_else(|_| price.to_string(), |p| p.to_string());
    format!("bid {bid} from {provider_org} at {price} per GPU-hour won; opening lease {lease} on chain")
}

/// What the AiJob says while its lease closes for `reason`.
pub(super) fn closing_message(l: &Lease, reason: CloseReason, heartbeat_grace: Duration) -> String {
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

/// The Event of an order sent because capacity appeared, or a first one.
pub(super) fn order_published(order: &str, closes_ms: u64) -> String {
    format!(
        "order {order} published to the pool; its bid window closes at {}",
        rfc3339_ms(closes_ms)
    )
}

/// The reason a job whose namespace is being deleted shows. Read back too:
/// a namespace's deletion is never undone, so a renter that restarts and
/// finds it on the job orders no more, as the one before it had learnt.
pub(super) const NAMESPACE_DELETING: &str = "NamespaceDeleting";

/// A job whose namespace is being deleted: why no order goes out for it.
pub(super) fn namespace_deleting(ns: &str, order: &str) -> String {
    format!(
        "namespace {ns} is being deleted, so Bids for order {order} cannot be recorded there; \
         this job is not ordered again and goes with its namespace"
    )
}

/// An order sent again after a window without a usable bid: why the last
/// one got none, and when this one's window closes (an absolute time, so the
/// message stands for the whole window).
pub(super) fn published_again(why: &str, order: &str, closes_ms: u64) -> String {
    format!(
        "{why} (order {order} published again; its window closes at {})",
        rfc3339_ms(closes_ms)
    )
}

/// A job's reason and message while its bid window is open. After an empty
/// window, and until a bid comes, it keeps saying why the last one was empty
/// (the `placed` condition holds that). No countdown: every changed message is
/// a status write, and this step runs until the window closes.
pub(super) fn while_bidding(
    placed: Option<&Condition>,
    order: &str,
    bids: usize,
    closes_ms: u64,
) -> (&'static str, String) {
    match placed.and_then(|c| Some((no_bids_reason(&c.reason)?, c))) {
        Some((reason, c)) if bids == 0 => (reason, c.message.clone()),
        _ => ("Bidding", bids_so_far(order, bids, closes_ms)),
    }
}

/// What a renter with `Manual` selection has to do next.
pub(super) fn awaiting_choice(open_bids: usize, order: &str, ns: &str, aijob: &str) -> String {
    format!(
        "{open_bids} open bid(s) for order {order}; accept one with `gpupool accept BID -n {ns}` (list them with `gpupool bids {aijob} -n {ns}`) or set spec.bidding.acceptedBid"
    )
}

/// A job's reason and message while its lease `lease_name` opens on chain.
/// The award's message still says what is happening, unless the escrow
/// refused the open (a renter's allowance or account too small, say): then
/// that is the reason the job waits.
pub(super) fn lease_opening(lease: Option<&Lease>, lease_name: &str) -> (&'static str, String) {
    let Some(l) = lease else {
        return ("LeaseOpening", format!("opening lease {lease_name} on chain"));
    };
    let refused = l
        .status
        .as_ref()
        .and_then(|s| find(&s.conditions, COND_SETTLED))
        .filter(|c| c.status == "False" && !c.message.is_empty());
    match refused {
        Some(c) => (
            "LeaseOpenRefused",
            format!(
                "opening lease {} on chain failed ({}): {}",
                l.name_any(),
                c.reason,
                c.message
            ),
        ),
        None => (
            "LeaseOpening",
            opening_message(
                &l.spec.bid,
                &l.spec.provider.org,
                &l.spec.price_per_gpu_hour,
                &l.name_any(),
            ),
        ),
    }
}

/// The phase and message that mirror what the provider of `l` reports. A
/// lease about to run dry (a refused top-up, or all of maxDuration spent)
/// ends the job: the renter reads why here.
pub(super) fn mirrored(l: &Lease) -> (AiJobPhase, String) {
    let w = l.status.as_ref().and_then(|s| s.workload.clone()).unwrap_or_default();
    let phase = if w.phase == "Running" {
        AiJobPhase::Running
    } else {
        AiJobPhase::Leased
    };
    let mut message = format!("{} in {}, namespace {}", w.phase, l.spec.provider.org, w.namespace);
    if !w.message.is_empty() {
        message.push_str(&format!(": {}", w.message));
    }
    if let Some(low) = funds_low(l) {
        message.push_str(&format!("; lease {}: {}", l.name_any(), low.message));
    }
    (phase, message)
}

/// The phase, exit code and message of a job whose lease closed after its
/// workload ended: where it ran, and what the close paid and refunded.
pub(super) fn finished(l: &Lease) -> (AiJobPhase, Option<i32>, String) {
    let st = l.status.clone().unwrap_or_default();
    let w = st.workload.clone().unwrap_or_default();
    let phase = if w.phase == "Succeeded" {
        AiJobPhase::Succeeded
    } else {
        AiJobPhase::Failed
    };
    let message = format!(
        "{} in {}; lease closed as {}: paid {} tokens, refunded {}",
        w.phase,
        l.spec.provider.org,
        st.close_reason.unwrap_or_default(),
        shown(st.paid.as_deref().unwrap_or_default()),
        shown(st.refunded.as_deref().unwrap_or_default())
    );
    (phase, w.exit_code, message)
}

/// Why a job whose lease ran dry before its workload ended failed.
pub(super) fn out_of_funds(l: &Lease) -> String {
    let st = l.status.clone().unwrap_or_default();
    let mut message = format!(
        "lease {} in {} ran out of funds before the workload ended: paid {} of {} tokens deposited",
        l.name_any(),
        l.spec.provider.org,
        shown(st.paid.as_deref().unwrap_or_default()),
        shown(st.deposited.as_deref().unwrap_or_default())
    );
    if let Some(why) = funds_low(l) {
        message.push_str(&format!("; {}", why.message));
    }
    message
}

/// The lease's FundsLow condition, while it holds.
fn funds_low(l: &Lease) -> Option<&Condition> {
    l.status
        .as_ref()
        .and_then(|s| find(&s.conditions, COND_FUNDS_LOW))
        .filter(|c| c.status == "True")
}

/// A re-auction after `failed_org` failed the lease.
pub(super) fn reauctioned(failed_org: &str, paid: &str, order: &str) -> String {
    format!(
        "{failed_org} failed the lease (paid {paid} for the time used, the rest refunded); order {order} asks the other peers"
    )
}

#[cfg(test)]
mod tests {
    use super::{closing_message, finished, lease_opening, mirrored, opening_message, out_of_funds, while_bidding};
    use gpupool_crds::{AiJobPhase, CloseReason, Lease};
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
    use std::time::Duration;

    /// bravo's lease `job-0` for bid `bid-1` at 2.5, with `status` as given.
    fn lease(status: serde_json::Value) -> Lease {
        serde_json::from_value(serde_json::json!({
            "apiVersion": "gpupool.dev/v1alpha1", "kind": "Lease", "metadata": {"name": "job-0"},
            "spec": {"side": "Renter", "orderId": "o", "bid": "bid-1", "renter": {"org": "acme"},
                "provider": {"org": "bravo"}, "pricePerGpuHour": "2.5", "gpuCount": 1, "gpuProduct": "A100"},
            "status": status
        }))
        .unwrap()
    }

    fn condition(type_: &str, status: &str, reason: &str, message: &str) -> serde_json::Value {
        serde_json::json!({"type": type_, "status": status, "reason": reason, "message": message,
            "lastTransitionTime": "2026-11-29T08:00:00Z"})
    }

    #[test]
    fn a_job_keeps_saying_why_its_last_window_was_empty_until_a_bid_comes() {
        let placed: Condition = serde_json::from_value(condition(
            "Placed",
            "False",
            "PriceTooLow",
            "lowest ask is above your max price",
        ))
        .unwrap();
        // 2026-11-29T08:00:05Z
        let closes = 1_795_939_205_000;
        assert_eq!(
            while_bidding(Some(&placed), "acme-1", 0, closes),
            ("PriceTooLow", "lowest ask is above your max price".to_string())
        );
        let counting = (
            "Bidding",
            "order acme-1 open: 1 bid(s) so far; the window closes at 2026-11-29T08:00:05Z".to_string(),
        );
        assert_eq!(while_bidding(Some(&placed), "acme-1", 1, closes), counting);
        let published: Condition =
            serde_json::from_value(condition("Placed", "False", "Bidding", "order acme-1 open")).unwrap();
        assert_eq!(while_bidding(Some(&published), "acme-1", 1, closes), counting);
        assert_eq!(while_bidding(None, "acme-1", 1, closes), counting);
    }

    #[test]
    fn an_escrow_that_refuses_the_open_is_the_reason_the_job_waits() {
        assert_eq!(
            lease_opening(None, "job-0"),
            ("LeaseOpening", "opening lease job-0 on chain".to_string())
        );
        let opening = lease(serde_json::json!({}));
        assert_eq!(
            lease_opening(Some(&opening), "job-0"),
            (
                "LeaseOpening",
                "bid bid-1 from bravo at 2.5 per GPU-hour won; opening lease job-0 on chain".to_string()
            )
        );
        let refused = lease(serde_json::json!({"conditions": [condition(
            "Settling", "False", "AllowanceTooLow", "approve the escrow for 10 tokens")]}));
        assert_eq!(
            lease_opening(Some(&refused), "job-0"),
            (
                "LeaseOpenRefused",
                "opening lease job-0 on chain failed (AllowanceTooLow): approve the escrow for 10 tokens".to_string()
            )
        );
    }

    #[test]
    fn the_renter_mirrors_the_providers_report_and_a_lease_running_dry() {
        let pending = lease(serde_json::json!({"workload": {"phase": "Pending", "namespace": "lease-7"}}));
        assert_eq!(
            mirrored(&pending),
            (AiJobPhase::Leased, "Pending in bravo, namespace lease-7".to_string())
        );
        let running = lease(serde_json::json!({
            "workload": {"phase": "Running", "namespace": "lease-7", "message": "pod train-abc running"},
            "conditions": [condition("FundsLow", "False", "Funded", "enough")]
        }));
        assert_eq!(
            mirrored(&running),
            (
                AiJobPhase::Running,
                "Running in bravo, namespace lease-7: pod train-abc running".to_string()
            )
        );
        let dry = lease(serde_json::json!({
            "workload": {"phase": "Running", "namespace": "lease-7"},
            "conditions": [condition("FundsLow", "True", "TopUpRefused", "funds run out at 09:00")]
        }));
        assert_eq!(
            mirrored(&dry).1,
            "Running in bravo, namespace lease-7; lease job-0: funds run out at 09:00"
        );
    }

    #[test]
    fn a_finished_job_says_where_it_ran_and_what_the_close_paid() {
        let done = lease(serde_json::json!({
            "workload": {"phase": "Succeeded", "exitCode": 0},
            "closeReason": "Completed", "paid": "0.004888888888888888", "refunded": "4.995111111111111112"
        }));
        assert_eq!(
            finished(&done),
            (
                AiJobPhase::Succeeded,
                Some(0),
                "Succeeded in bravo; lease closed as Completed: paid 0.004889 tokens, refunded 4.995111".to_string()
            )
        );
        let failed =
            lease(serde_json::json!({"workload": {"phase": "Failed", "exitCode": 3}, "closeReason": "Completed"}));
        let (phase, exit, _) = finished(&failed);
        assert_eq!((phase, exit), (AiJobPhase::Failed, Some(3)));
    }

    #[test]
    fn a_lease_that_ran_dry_says_what_it_paid_of_its_deposit_and_why() {
        let dry = lease(serde_json::json!({
            "paid": "5", "deposited": "5",
            "conditions": [condition("FundsLow", "True", "MaxDurationSpent", "all of maxDuration (1h) is spent")]
        }));
        assert_eq!(
            out_of_funds(&dry),
            "lease job-0 in bravo ran out of funds before the workload ended: paid 5 of 5 tokens deposited; all of maxDuration (1h) is spent"
        );
    }

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

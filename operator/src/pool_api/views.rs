//! What the Pool API shows and accepts, as pure functions of the resources:
//! the renter's namespace, the spec a submission becomes, and the messages a
//! job, a bid and an offer become.

use std::str::FromStr;

use gpupool_chain::{Address, B256};
use gpupool_crds::conditions::find;
use gpupool_crds::market_view::{Offer, bid_state};
use gpupool_crds::{AiJob, AiJobSpec, Bid, Lease, LeaseState, PlacementMode};
use gpupool_proto::pool::v1 as api;

use crate::settlement_plan::{COND_CHAIN, COND_FUNDS_LOW, COND_SETTLED};

/// The namespace the Pool API keeps one renter's jobs in. A renter sees and
/// changes only this namespace, so "its own jobs" is enforced by where they live.
pub fn renter_namespace(wallet: Address) -> String {
    // 15 + 40 characters: within a namespace name's 63.
    format!("gpupool-renter-{}", wallet_label(wallet).trim_start_matches("0x"))
}

/// The wallet as the namespace label and `spec.payer` carry it: lower-case hex.
pub fn wallet_label(wallet: Address) -> String {
    wallet.to_string().to_ascii_lowercase()
}

/// The AiJob spec a submission becomes: as the renter wrote it, except that
/// it runs only in the pool and is paid from the renter's own account.
pub fn submitted_spec(spec_json: &str, payer: Address) -> Result<AiJobSpec, String> {
    let mut spec: AiJobSpec =
        serde_json::from_str(spec_json).map_err(|e| format!("spec_json is not an AiJob spec: {e}"))?;
    spec.placement.mode = PlacementMode::PoolOnly;
    spec.payer = Some(wallet_label(payer));
    Ok(spec)
}

pub fn job(j: &AiJob) -> api::Job {
    let status = j.status.clone().unwrap_or_default();
    api::Job {
        name: j.metadata.name.clone().unwrap_or_default(),
        phase: status.phase.map(|p| format!("{p:?}")).unwrap_or_default(),
        message: status.message.unwrap_or_default(),
        runs_on_org: status.runs_on.map(|r| r.org).unwrap_or_default(),
        lease: status.lease.unwrap_or_default(),
        cost_so_far: status.cost_so_far.unwrap_or_default(),
        exit_code: status.exit_code,
        max_price_per_gpu_hour: j.spec.max_price_per_gpu_hour.clone(),
        selection: format!("{:?}", j.spec.bidding.selection),
        accepted_bid: j.spec.bidding.accepted_bid.clone().unwrap_or_default(),
        created_at: j
            .metadata
            .creation_timestamp
            .as_ref()
            .map(|t| t.0.to_string())
            .unwrap_or_default(),
        deleting: j.metadata.deletion_timestamp.is_some(),
    }
}

pub fn bid(b: &Bid) -> api::BidView {
    api::BidView {
        name: b.metadata.name.clone().unwrap_or_default(),
        provider_org: b.spec.provider_org.clone(),
        gpu_product: b.spec.gpu_product.clone(),
        gpu_count: u32::try_from(b.spec.gpu_count).unwrap_or(0),
        price_per_gpu_hour: b.spec.price_per_gpu_hour.clone(),
        // A bid recorded before its status was written is open.
        state: bid_state(b).map_or_else(|| "Open".to_string(), |s| format!("{s:?}")),
        expires_at: b.spec.expires_at.0.to_string(),
        message: b.status.as_ref().and_then(|s| s.message.clone()).unwrap_or_default(),
    }
}

/// What a renter should read about a lease now: a refusal first, then
/// money running out, then an unreachable chain; once closed, how it closed.
fn lease_message(l: &Lease) -> String {
    let Some(s) = l.status.as_ref() else {
        return String::new();
    };
    let is = |t: &str, status: &str| find(&s.conditions, t).filter(|c| c.status == status);
    is(COND_SETTLED, "False")
        .or_else(|| is(COND_FUNDS_LOW, "True"))
        .or_else(|| is(COND_CHAIN, "False"))
        .or_else(|| {
            (s.state == Some(LeaseState::Closed))
                .then(|| find(&s.conditions, COND_SETTLED))
                .flatten()
        })
        .map(|c| c.message.clone())
        .unwrap_or_default()
}

pub fn lease(l: &Lease) -> api::LeaseView {
    let s = l.status.clone().unwrap_or_default();
    let time = |t: Option<k8s_openapi::apimachinery::pkg::apis::meta::v1::Time>| {
        t.map(|t| t.0.to_string()).unwrap_or_default()
    };
    let escrow = l.spec.escrow.clone();
    api::LeaseView {
        name: l.metadata.name.clone().unwrap_or_default(),
        job: l.spec.ai_job.clone().unwrap_or_default(),
        provider_org: l.spec.provider.org.clone(),
        gpu_product: l.spec.gpu_product.clone(),
        gpu_count: u32::try_from(l.spec.gpu_count).unwrap_or(0),
        price_per_gpu_hour: l.spec.price_per_gpu_hour.clone(),
        state: s.state.map(|st| format!("{st:?}")).unwrap_or_default(),
        lease_id: s
            .lease_id
            .clone()
            .or_else(|| escrow.as_ref().and_then(|e| e.lease_id.clone()))
            .unwrap_or_default(),
        deposited: s
            .deposited
            .clone()
            .or_else(|| escrow.as_ref().map(|e| e.deposit.clone()))
            .unwrap_or_default(),
        top_up_to: escrow.and_then(|e| e.top_up_to).unwrap_or_default(),
        remaining: s.remaining.clone().unwrap_or_default(),
        paid: s.paid.clone().unwrap_or_default(),
        refunded: s.refunded.clone().unwrap_or_default(),
        close_reason: s.close_reason.clone().unwrap_or_default(),
        funds_run_out_at: time(s.funds_run_out_at.clone()),
        last_heartbeat: time(s.last_heartbeat.clone()),
        message: lease_message(l),
        workload_phase: s.workload.as_ref().map(|w| w.phase.clone()).unwrap_or_default(),
        created_at: time(l.metadata.creation_timestamp.clone()),
    }
}

/// The on-chain id of a lease record that is not closed yet.
pub fn open_lease_id(l: &Lease) -> Option<B256> {
    let s = l.status.as_ref()?;
    if s.state == Some(LeaseState::Closed) {
        return None;
    }
    B256::from_str(s.lease_id.as_deref()?).ok()
}

pub fn offer(o: &Offer) -> api::Offer {
    api::Offer {
        org: o.org.clone(),
        gpu_product: o.gpu_product.clone(),
        free_gpus: u32::try_from(o.free).unwrap_or(0),
        gpus_per_node: u32::try_from(o.max_per_node).unwrap_or(0),
        price_per_gpu_hour: o.price_per_gpu_hour.clone(),
        connected: o.connected,
        memory_mib: o.memory_mib,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::str::FromStr;

    #[test]
    fn a_renter_gets_one_namespace_named_for_its_wallet() {
        let w = Address::from_str("0x70997970C51812dc3A010C7d01b50e0d17dc79C8").unwrap();
        let ns = renter_namespace(w);
        assert_eq!(ns, "gpupool-renter-70997970c51812dc3a010c7d01b50e0d17dc79c8");
        assert!(ns.len() <= 63);
        assert_eq!(wallet_label(w), "0x70997970c51812dc3a010c7d01b50e0d17dc79c8");
    }

    #[test]
    fn a_submission_runs_only_in_the_pool_and_pays_from_the_renter() {
        let w = Address::repeat_byte(0xab);
        let json = r#"{"template":{"spec":{"containers":[{"name":"t","image":"x"}]}},
            "gpus":{"count":2},"maxPricePerGpuHour":"3",
            "placement":{"mode":"LocalFirst"},"payer":"0x0000000000000000000000000000000000000001"}"#;
        let spec = submitted_spec(json, w).unwrap();
        assert_eq!(spec.placement.mode, PlacementMode::PoolOnly);
        assert_eq!(
            spec.payer.as_deref(),
            Some("0xabababababababababababababababababababab")
        );
        assert_eq!(spec.gpus.count, 2);
        let bad = submitted_spec(r#"{"gpus":"two"}"#, w).unwrap_err();
        assert!(bad.starts_with("spec_json is not an AiJob spec"), "{bad}");
    }

    #[test]
    fn a_lease_says_what_a_renter_must_know_first() {
        let id = format!("0x{}", "ab".repeat(32));
        let mut l: Lease = serde_json::from_value(serde_json::json!({
            "apiVersion": "gpupool.dev/v1alpha1", "kind": "Lease",
            "metadata": {"name": "eval-2"},
            "spec": {"side": "Renter", "orderId": "o", "bid": "b", "aiJob": "eval",
                "renter": {"org": "acme"}, "provider": {"org": "bravo"},
                "pricePerGpuHour": "2", "gpuCount": 4, "gpuProduct": "A100",
                "escrow": {"chainId": 31337, "contract": format!("0x{}", "11".repeat(20)),
                    "deposit": "0.5", "topUpTo": "2"}},
            "status": {"state": "Active", "leaseId": id, "deposited": "0.6",
                "conditions": [
                    {"type": "ChainReachable", "status": "True", "reason": "Reachable", "message": "the chain answered", "lastTransitionTime": "2026-01-01T00:00:00Z"},
                    {"type": "FundsLow", "status": "True", "reason": "TopUpRefused", "message": "allowance spent", "lastTransitionTime": "2026-01-01T00:00:00Z"},
                    {"type": "Settling", "status": "True", "reason": "Settling", "message": "payments follow the chain", "lastTransitionTime": "2026-01-01T00:00:00Z"}]}
        }))
        .unwrap();
        let v = lease(&l);
        assert_eq!(
            (v.job.as_str(), v.provider_org.as_str(), v.gpu_count, v.state.as_str()),
            ("eval", "bravo", 4, "Active")
        );
        assert_eq!((v.deposited.as_str(), v.top_up_to.as_str()), ("0.6", "2"));
        assert_eq!(v.message, "allowance spent");
        assert_eq!(open_lease_id(&l), Some(B256::from_str(&id).unwrap()));
        // A refusal outranks low funds.
        let st = l.status.as_mut().unwrap();
        st.conditions[2].status = "False".into();
        st.conditions[2].message = "escrow refused".into();
        assert_eq!(lease(&l).message, "escrow refused");
        // Closed: how it closed, and no longer open.
        let st = l.status.as_mut().unwrap();
        st.state = Some(LeaseState::Closed);
        st.conditions[1].status = "False".into();
        st.conditions[2].status = "True".into();
        st.conditions[2].message = "closed as Completed: 1 paid, 0 refunded".into();
        assert_eq!(lease(&l).message, "closed as Completed: 1 paid, 0 refunded");
        assert_eq!(open_lease_id(&l), None);
    }
}

//! What the Pool API shows and accepts, as pure functions of the resources:
//! the renter's namespace, the spec a submission becomes, and the messages a
//! job, a bid and an offer become.

use gpupool_chain::Address;
use gpupool_crds::market_view::{Offer, bid_state};
use gpupool_crds::{AiJob, AiJobSpec, Bid, PlacementMode};
use gpupool_proto::pool::v1 as api;

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
}

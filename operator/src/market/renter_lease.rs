//! What a renter writes down for the bid it chose: its copy of the Lease,
//! which the settlement worker opens on chain, sized from the bid's price
//! and the job's `maxDuration`. Pure: the award reads the cluster and the
//! pool's tables, this builds, the award creates.

use std::collections::BTreeMap;
use std::str::FromStr;

use gpupool_crds::price::TokenAmount;
use gpupool_crds::{
    ANNOTATION_TRACEPARENT, AiJob, Bid, Escrow, LABEL_AIJOB, LABEL_ORDER, LEASE_FINALIZER, Lease, LeaseParty,
    LeaseSide, LeaseSpec,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference;
use kube::{Resource, ResourceExt};

use crate::settlement_plan::{lease_funding, rate_per_second};

/// The renter Lease's name: one per attempt of a job, so a re-auction after
/// a failed provider gets a lease of its own beside the closed one.
pub fn renter_lease_name(aijob: &str, attempt: i32) -> String {
    format!("{aijob}-{attempt}")
}

/// Everything the renter's lease is built from besides the job and the bid.
pub struct Award<'a> {
    pub aijob: &'a AiJob,
    pub winner: &'a Bid,
    pub attempt: i32,
    /// GPUs the job needs (the bid was checked to offer as many).
    pub gpus: u32,
    pub renter: LeaseParty,
    /// The provider's wallet, from its signed identity record: never from
    /// the bid, which only names the peer.
    pub provider_wallet: String,
    pub chain_id: u64,
    pub escrow_contract: String,
    /// How much of the job's run the first deposit covers.
    pub deposit_seconds: u64,
    /// The job's trace, which settlement on chain continues.
    pub traceparent: Option<String>,
}

/// Why a winning bid cannot become a lease.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum Unleasable {
    #[error("the winning price {0:?} is not a token amount")]
    Price(String),
    #[error("the winning price rounds to zero tokens per second")]
    ZeroRate,
}

pub fn renter_lease(a: Award<'_>) -> Result<Lease, Unleasable> {
    let spec = &a.winner.spec;
    let price = TokenAmount::from_str(&spec.price_per_gpu_hour)
        .map_err(|_| Unleasable::Price(spec.price_per_gpu_hour.clone()))?;
    let rate = rate_per_second(price, a.gpus).ok_or(Unleasable::ZeroRate)?;
    let max_secs = std::time::Duration::from(a.aijob.spec.max_duration).as_secs();
    let (deposit, top_up_to) = lease_funding(rate, max_secs, a.deposit_seconds);
    let mut lease = Lease::new(
        &renter_lease_name(&a.aijob.name_any(), a.attempt),
        LeaseSpec {
            side: LeaseSide::Renter,
            // The winning bid's order: maybe an earlier attempt's.
            order_id: spec.order_id.clone(),
            bid: a.winner.name_any(),
            ai_job: Some(a.aijob.name_any()),
            renter: a.renter,
            provider: LeaseParty {
                org: spec.provider_org.clone(),
                peer_id: Some(spec.provider_peer_id.clone()),
                wallet: Some(a.provider_wallet),
            },
            price_per_gpu_hour: price.to_string(),
            gpu_count: i32::try_from(a.gpus).unwrap_or(i32::MAX),
            gpu_product: spec.gpu_product.clone(),
            escrow: Some(Escrow {
                chain_id: a.chain_id,
                contract: a.escrow_contract,
                lease_id: None,
                deposit: deposit.to_string(),
                top_up_to: Some(top_up_to.to_string()),
                // Checked against the namespace before the job got this far.
                funded_by: a.aijob.spec.payer.clone(),
            }),
            close_reason: None,
        },
    );
    lease.metadata.namespace = a.aijob.namespace();
    lease.metadata.labels = Some(BTreeMap::from([
        (LABEL_ORDER.to_string(), spec.order_id.clone()),
        (LABEL_AIJOB.to_string(), a.aijob.name_any()),
    ]));
    lease.metadata.owner_references = owner(a.aijob).map(|o| vec![o]);
    // Born with the settlement worker's finalizer (the pool always runs it):
    // its first reconcile would add it in a write of its own.
    lease.metadata.finalizers = Some(vec![LEASE_FINALIZER.to_string()]);
    lease.metadata.annotations = a
        .traceparent
        .map(|tp| BTreeMap::from([(ANNOTATION_TRACEPARENT.to_string(), tp)]));
    Ok(lease)
}

/// The AiJob owns its lease (deleting the job deletes the lease, whose
/// finalizer closes it on chain), without blocking the job's deletion on it.
fn owner(aijob: &AiJob) -> Option<OwnerReference> {
    let mut o = aijob.controller_owner_ref(&())?;
    o.block_owner_deletion = Some(false);
    Some(o)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn aijob(max_duration: &str, payer: Option<&str>) -> AiJob {
        serde_json::from_value(serde_json::json!({
            "apiVersion": "gpupool.dev/v1alpha1",
            "kind": "AiJob",
            "metadata": {"name": "eval", "namespace": "team-a", "uid": "u-1"},
            "spec": {
                "gpus": {"count": 2, "models": ["A100"]},
                "maxPricePerGpuHour": "3",
                "maxDuration": max_duration,
                "payer": payer,
                "template": {"spec": {"containers": [{"name": "eval", "image": "eval:1"}]}}
            }
        }))
        .unwrap()
    }

    fn bid(price: &str) -> Bid {
        serde_json::from_value(serde_json::json!({
            "apiVersion": "gpupool.dev/v1alpha1",
            "kind": "Bid",
            "metadata": {"name": "eval-bravo-acme-1a2b-0", "namespace": "team-a"},
            "spec": {
                "aiJob": "eval",
                "orderId": "acme-1a2b-0",
                "providerPeerId": "12D3KooWProvider",
                "providerOrg": "bravo",
                "pricePerGpuHour": price,
                "gpuProduct": "NVIDIA-A100-SXM4-40GB",
                "gpuCount": 2,
                "expiresAt": "2026-11-29T12:00:00Z"
            }
        }))
        .unwrap()
    }

    fn award<'a>(aijob: &'a AiJob, winner: &'a Bid, attempt: i32) -> Award<'a> {
        Award {
            aijob,
            winner,
            attempt,
            gpus: 2,
            renter: LeaseParty {
                org: "acme".into(),
                peer_id: Some("12D3KooWRenter".into()),
                wallet: Some("0xacac".into()),
            },
            provider_wallet: "0xb0b0".into(),
            chain_id: 31337,
            escrow_contract: "0xe5e5".into(),
            deposit_seconds: 600,
            traceparent: Some("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01".into()),
        }
    }

    #[test]
    fn the_lease_pays_the_winning_bid_for_a_first_deposit_and_may_grow_to_the_whole_run() {
        let (job, won) = (aijob("1h", None), bid("3.6"));
        let l = renter_lease(award(&job, &won, 1)).unwrap();
        // 2 GPUs at 3.6 an hour: 0.002 tokens a second.
        let per_second = 2_000_000_000_000_000u128;
        let escrow = l.spec.escrow.as_ref().unwrap();
        assert_eq!(
            escrow.deposit,
            TokenAmount(per_second * 600).to_string(),
            "the first 600 s"
        );
        assert_eq!(
            escrow.top_up_to.as_deref(),
            Some(TokenAmount(per_second * (3600 + 60)).to_string().as_str()),
            "maxDuration and a minute to start"
        );
        assert_eq!((escrow.chain_id, escrow.contract.as_str()), (31337, "0xe5e5"));
        assert_eq!(
            escrow.lease_id, None,
            "the chain gives it once the worker opens the lease"
        );
        assert_eq!(l.spec.price_per_gpu_hour, "3.6");
        assert_eq!(l.spec.provider.wallet.as_deref(), Some("0xb0b0"));
        assert_eq!(l.spec.provider.org, "bravo");
        assert_eq!(l.spec.side, LeaseSide::Renter);
    }

    #[test]
    fn a_short_job_deposits_its_whole_run_at_once() {
        let (job, won) = (aijob("2m", None), bid("3.6"));
        let escrow = renter_lease(award(&job, &won, 0)).unwrap().spec.escrow.unwrap();
        assert_eq!(
            Some(escrow.deposit.clone()),
            escrow.top_up_to,
            "120 s and the minute to start are under the 600 s deposit"
        );
    }

    #[test]
    fn the_job_owns_its_lease_which_answers_the_winning_bids_order_and_is_settled_before_it_goes() {
        let (job, won) = (aijob("1h", Some("0x7777")), bid("3.6"));
        let l = renter_lease(award(&job, &won, 3)).unwrap();
        assert_eq!(l.name_any(), "eval-3", "one lease per attempt");
        assert_eq!(l.namespace().as_deref(), Some("team-a"));
        assert_eq!(
            l.spec.order_id, "acme-1a2b-0",
            "the bid's order, maybe an earlier attempt's"
        );
        assert_eq!(l.spec.bid, "eval-bravo-acme-1a2b-0");
        assert_eq!(l.labels().get(LABEL_ORDER).map(String::as_str), Some("acme-1a2b-0"));
        assert_eq!(l.labels().get(LABEL_AIJOB).map(String::as_str), Some("eval"));
        let o = &l.owner_references()[0];
        assert_eq!((o.uid.as_str(), o.controller), ("u-1", Some(true)));
        assert_eq!(o.block_owner_deletion, Some(false));
        assert_eq!(l.finalizers(), [LEASE_FINALIZER.to_string()]);
        assert!(l.annotations().contains_key(ANNOTATION_TRACEPARENT));
        assert_eq!(
            l.spec.escrow.unwrap().funded_by.as_deref(),
            Some("0x7777"),
            "a Pool API renter's account funds it"
        );
    }

    #[test]
    fn a_price_that_rounds_to_nothing_a_second_is_no_lease() {
        let job = aijob("1h", None);
        // 1e-18 an hour for 2 GPUs is under one base unit a second.
        let won = bid("0.000000000000000001");
        assert_eq!(renter_lease(award(&job, &won, 0)).unwrap_err(), Unleasable::ZeroRate);
    }
}

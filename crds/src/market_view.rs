//! What a renter reads and the checks before it acts, shared by the CLI (on a
//! member's kubeconfig) and the operator's Pool API (for renters without a
//! cluster), so both show the same market and refuse the same things. Pure:
//! tested without a server.

use std::str::FromStr;

use k8s_openapi::jiff::Timestamp;

use crate::price::TokenAmount;
use crate::{AiJob, AiJobPhase, Bid, BidSelection, BidState, PoolPeer};

/// Orders by price, an unparsable one (an older peer's) last rather than hidden.
pub fn price_key(price: &str) -> u128 {
    TokenAmount::from_str(price).map_or(u128::MAX, |t| t.0)
}

/// One advertised offer: a peer's free GPUs of one product and their price.
#[derive(serde::Serialize, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct Offer {
    pub org: String,
    pub gpu_product: String,
    pub memory_mib: u64,
    pub free: i32,
    pub max_per_node: i32,
    pub price_per_gpu_hour: String,
    pub connected: bool,
}

/// Every advertised product of every peer, cheapest first: the order a
/// renter reads a price list in.
pub fn offers(peers: &[PoolPeer]) -> Vec<Offer> {
    let mut out: Vec<Offer> = peers
        .iter()
        .flat_map(|p| {
            let s = p.status.clone().unwrap_or_default();
            s.capacity.into_iter().map(move |c| Offer {
                org: p.spec.org.clone(),
                gpu_product: c.gpu_product,
                memory_mib: c.memory_mib,
                free: c.free,
                max_per_node: c.max_per_node,
                price_per_gpu_hour: c.price_per_gpu_hour,
                connected: s.connected,
            })
        })
        .collect();
    out.sort_by(|a, b| {
        price_key(&a.price_per_gpu_hour)
            .cmp(&price_key(&b.price_per_gpu_hour))
            .then_with(|| a.org.cmp(&b.org))
            .then_with(|| a.gpu_product.cmp(&b.gpu_product))
    });
    out
}

/// A job's bids, cheapest first (then by name, so the order is stable).
pub fn sort_bids(bids: &mut [Bid]) {
    bids.sort_by(|a, b| {
        price_key(&a.spec.price_per_gpu_hour)
            .cmp(&price_key(&b.spec.price_per_gpu_hour))
            .then_with(|| a.metadata.name.cmp(&b.metadata.name))
    });
}

pub fn bid_state(b: &Bid) -> Option<BidState> {
    b.status.as_ref().and_then(|s| s.state)
}

fn phase(job: &AiJob) -> Option<AiJobPhase> {
    job.status.as_ref().and_then(|s| s.phase)
}

/// Why accepting `bid` for `job` at `now` would do nothing useful, if it
/// would: the operator would ignore such an acceptedBid, so the CLI says so
/// before writing it.
pub fn accept_refusal(job: &AiJob, bid: &Bid, now: Timestamp) -> Option<String> {
    let job_name = job.metadata.name.clone().unwrap_or_default();
    let bid_name = bid.metadata.name.clone().unwrap_or_default();
    if job.spec.bidding.selection != BidSelection::Manual {
        return Some(format!(
            "AiJob {job_name} picks its bid itself (spec.bidding.selection is Auto); accept works only for jobs submitted with Manual selection"
        ));
    }
    if let Some(p) = phase(job).filter(|p| !matches!(p, AiJobPhase::Pending | AiJobPhase::Bidding)) {
        return Some(format!(
            "AiJob {job_name} is {p:?}: it already has a lease or has ended, so no bid can be accepted"
        ));
    }
    match bid_state(bid) {
        Some(s @ (BidState::Lost | BidState::Expired)) => {
            let why = bid.status.as_ref().and_then(|s| s.message.clone()).unwrap_or_default();
            return Some(format!("bid {bid_name} is {s:?}: {why}"));
        }
        Some(BidState::Accepted) => {
            return Some(format!("bid {bid_name} is already accepted"));
        }
        _ => {}
    }
    if bid.spec.expires_at.0 <= now {
        return Some(format!(
            "bid {bid_name} expired at {}; the operator publishes the order again, so wait for new bids with `gpupool bids {job_name}`",
            bid.spec.expires_at.0
        ));
    }
    None
}

/// Why raising `job`'s max price to `to` would be refused, if it would.
pub fn raise_refusal(job: &AiJob, to: &str) -> Option<String> {
    let name = job.metadata.name.clone().unwrap_or_default();
    let new = match TokenAmount::from_str(to) {
        Ok(t) => t,
        Err(e) => return Some(format!("--max-price: {e}")),
    };
    if let Some(p) = phase(job).filter(|p| !matches!(p, AiJobPhase::Pending | AiJobPhase::Bidding)) {
        return Some(format!(
            "AiJob {name} is {p:?}: its price was agreed in its lease, so raising it changes nothing"
        ));
    }
    let old = &job.spec.max_price_per_gpu_hour;
    match TokenAmount::from_str(old) {
        Ok(old_amount) if new <= old_amount => Some(format!(
            "a raise must be above AiJob {name}'s max price of {old} per GPU-hour (asked for {to})"
        )),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{AiJobStatus, BidSpec, BidStatus, PeerCapacity, PoolPeerSpec, PoolPeerStatus};
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;

    fn job(selection: &str, phase: Option<AiJobPhase>, price: &str) -> AiJob {
        let mut j: AiJob = serde_json::from_value(serde_json::json!({
            "apiVersion": "gpupool.dev/v1alpha1", "kind": "AiJob",
            "metadata": {"name": "train", "namespace": "ml"},
            "spec": {
                "template": {"spec": {"containers": [{"name": "t", "image": "x"}]}},
                "gpus": {"count": 2}, "maxPricePerGpuHour": price,
                "bidding": {"selection": selection}
            }
        }))
        .unwrap();
        j.status = phase.map(|p| AiJobStatus {
            phase: Some(p),
            ..Default::default()
        });
        j
    }

    fn bid(state: Option<BidState>, expires: Timestamp) -> Bid {
        let mut b = Bid::new(
            "train-bravo-1",
            BidSpec {
                ai_job: "train".into(),
                order_id: "o1".into(),
                provider_peer_id: "p".into(),
                provider_org: "bravo".into(),
                price_per_gpu_hour: "2".into(),
                gpu_product: "A100".into(),
                gpu_count: 2,
                expires_at: Time(expires),
                signature: None,
            },
        );
        b.status = state.map(|s| BidStatus {
            state: Some(s),
            message: Some("corvus won at 1.5".into()),
        });
        b
    }

    fn now() -> Timestamp {
        Timestamp::from_second(1_800_000_000).unwrap()
    }

    fn later() -> Timestamp {
        Timestamp::from_second(1_800_000_060).unwrap()
    }

    #[test]
    fn an_open_bid_of_a_bidding_manual_job_is_accepted() {
        let j = job("Manual", Some(AiJobPhase::Bidding), "3");
        assert_eq!(accept_refusal(&j, &bid(Some(BidState::Open), later()), now()), None);
        // A bid recorded before its status was written counts as open.
        assert_eq!(accept_refusal(&j, &bid(None, later()), now()), None);
    }

    #[test]
    fn accepting_says_why_it_would_do_nothing() {
        let open = bid(Some(BidState::Open), later());
        let auto = accept_refusal(&job("Auto", Some(AiJobPhase::Bidding), "3"), &open, now()).unwrap();
        assert!(auto.contains("selection is Auto"), "{auto}");
        let leased = accept_refusal(&job("Manual", Some(AiJobPhase::Running), "3"), &open, now()).unwrap();
        assert!(leased.contains("is Running"), "{leased}");
        let j = job("Manual", Some(AiJobPhase::Bidding), "3");
        let lost = accept_refusal(&j, &bid(Some(BidState::Lost), later()), now()).unwrap();
        assert_eq!(lost, "bid train-bravo-1 is Lost: corvus won at 1.5");
        let expired = accept_refusal(&j, &bid(Some(BidState::Open), now()), now()).unwrap();
        assert!(
            expired.contains("expired at") && expired.contains("gpupool bids train"),
            "{expired}"
        );
        let again = accept_refusal(&j, &bid(Some(BidState::Accepted), later()), now()).unwrap();
        assert!(again.contains("already accepted"), "{again}");
    }

    #[test]
    fn a_raise_must_be_a_valid_higher_price_for_a_waiting_job() {
        let waiting = job("Auto", Some(AiJobPhase::Bidding), "0.5");
        assert_eq!(raise_refusal(&waiting, "0.75"), None);
        assert_eq!(raise_refusal(&job("Auto", None, "0.5"), "1"), None);
        let lower = raise_refusal(&waiting, "0.5").unwrap();
        assert!(lower.contains("must be above") && lower.contains("0.5"), "{lower}");
        let bad = raise_refusal(&waiting, "1,5").unwrap();
        assert!(bad.contains("not a decimal token amount"), "{bad}");
        let leased = raise_refusal(&job("Auto", Some(AiJobPhase::Leased), "0.5"), "9").unwrap();
        assert!(leased.contains("agreed in its lease"), "{leased}");
    }

    fn peer(org: &str, connected: bool, caps: &[(&str, &str, i32)]) -> PoolPeer {
        let mut p = PoolPeer::new(
            org,
            PoolPeerSpec {
                peer_id: format!("peer-{org}"),
                org: org.into(),
                wallet: None,
                addresses: vec![],
            },
        );
        p.status = Some(PoolPeerStatus {
            connected,
            capacity: caps
                .iter()
                .map(|(product, price, free)| PeerCapacity {
                    gpu_product: (*product).into(),
                    memory_mib: 81_920,
                    free: *free,
                    max_per_node: 8,
                    price_per_gpu_hour: (*price).into(),
                })
                .collect(),
            ..Default::default()
        });
        p
    }

    #[test]
    fn offers_are_listed_cheapest_first_across_peers() {
        let peers = [
            peer("bravo", true, &[("A100", "2", 16), ("H100", "3.5", 8)]),
            peer("corvus", false, &[("L40S", "1.25", 4), ("old", "cheap", 1)]),
        ];
        let o = offers(&peers);
        let order: Vec<(&str, &str)> = o.iter().map(|o| (o.org.as_str(), o.gpu_product.as_str())).collect();
        assert_eq!(
            order,
            [
                ("corvus", "L40S"),
                ("bravo", "A100"),
                ("bravo", "H100"),
                ("corvus", "old")
            ]
        );
        assert!(!o[0].connected && o[1].connected);
        assert_eq!(o[1].free, 16);
    }
}

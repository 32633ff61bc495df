//! The market as a member cluster sees it: the peers it knows, what they
//! advertise, the bids for a job, accepting one, and raising a job's price.
//!
//! These read and write the cluster's own resources (PoolPeer, Bid, AiJob)
//! through the kubeconfig, so what the CLI shows is exactly what the operator
//! acts on. The checks before a write are pure (`accept_refusal`,
//! `raise_refusal`) so they are tested without a server; the API server's
//! own validation stays the last word.

use std::str::FromStr;

use anyhow::Context as _;
use gpupool_crds::price::TokenAmount;
use gpupool_crds::{AiJob, AiJobPhase, Bid, BidSelection, BidState, LABEL_AIJOB, PoolPeer};
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, ListParams, Patch, PatchParams};

use crate::output::{Format, structured, table};
use crate::{dash, kube_client};

/// Namespace flags shared by the commands that act on one job or bid.
#[derive(clap::Args, Clone, Debug, Default)]
pub struct NamespaceOpt {
    /// Namespace; the kubeconfig's by default.
    #[arg(short, long)]
    pub namespace: Option<String>,
}

impl NamespaceOpt {
    pub fn api<K>(&self, client: kube::Client) -> Api<K>
    where
        K: kube::Resource<Scope = kube::core::NamespaceResourceScope>,
        <K as kube::Resource>::DynamicType: Default,
    {
        match &self.namespace {
            Some(ns) => Api::namespaced(client, ns),
            None => Api::default_namespaced(client),
        }
    }
}

fn ago(t: Option<&k8s_openapi::apimachinery::pkg::apis::meta::v1::Time>, now: Timestamp) -> String {
    t.map_or_else(
        || "-".into(),
        |t| {
            let secs = now.as_second().saturating_sub(t.0.as_second()).max(0);
            match secs {
                s if s < 120 => format!("{s}s"),
                s if s < 7200 => format!("{}m", s / 60),
                s => format!("{}h", s / 3600),
            }
        },
    )
}

/// Every PoolPeer: the members this cluster's operator knows, with their adverts.
async fn pool_peers() -> anyhow::Result<Vec<PoolPeer>> {
    Ok(Api::<PoolPeer>::all(kube_client().await?)
        .list(&ListParams::default())
        .await
        .context("listing PoolPeers")?
        .items)
}

/// Orders by price, an unparsable one (an older peer's) last rather than hidden.
fn price_key(price: &str) -> u128 {
    TokenAmount::from_str(price).map_or(u128::MAX, |t| t.0)
}

/// `gpupool peers`: every member this cluster's operator knows.
pub async fn peers(format: Format) -> anyhow::Result<String> {
    let peers = pool_peers().await?;
    if !matches!(format, Format::Table) {
        return structured(format, &peers);
    }
    let now = Timestamp::now();
    let rows = peers
        .iter()
        .map(|p| {
            let s = p.status.clone().unwrap_or_default();
            vec![
                p.spec.org.clone(),
                p.spec.peer_id.clone(),
                dash(p.spec.wallet.clone()),
                if s.connected { "yes" } else { "no" }.to_string(),
                ago(s.last_seen.as_ref(), now),
                s.reputation.completed.to_string(),
                s.reputation.failed.to_string(),
            ]
        })
        .collect::<Vec<_>>();
    Ok(table(
        &["ORG", "PEER", "WALLET", "CONNECTED", "LAST-SEEN", "COMPLETED", "FAILED"],
        &rows,
    ))
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

/// `gpupool market`: what the pool advertises, cheapest first.
pub async fn market(format: Format) -> anyhow::Result<String> {
    let peers = pool_peers().await?;
    let offers = offers(&peers);
    if !matches!(format, Format::Table) {
        return structured(format, &offers);
    }
    let rows = offers
        .iter()
        .map(|o| {
            vec![
                o.org.clone(),
                o.gpu_product.clone(),
                format!("{} GiB", o.memory_mib / 1024),
                o.free.to_string(),
                o.max_per_node.to_string(),
                o.price_per_gpu_hour.clone(),
                if o.connected { "yes" } else { "no" }.to_string(),
            ]
        })
        .collect::<Vec<_>>();
    Ok(table(
        &[
            "ORG",
            "PRODUCT",
            "MEMORY",
            "FREE",
            "PER-NODE",
            "PRICE/GPU-H",
            "CONNECTED",
        ],
        &rows,
    ))
}

fn bid_state(b: &Bid) -> Option<BidState> {
    b.status.as_ref().and_then(|s| s.state)
}

/// `gpupool bids JOB`: the bids recorded for one AiJob, cheapest first.
pub async fn bids(format: Format, ns: &NamespaceOpt, job: &str) -> anyhow::Result<String> {
    let client = kube_client().await?;
    let jobs: Api<AiJob> = ns.api(client.clone());
    // A typo in the job's name says so, instead of an empty table.
    jobs.get(job)
        .await
        .map_err(|e| not_found(e, &format!("no AiJob {job}{}", in_ns(ns))))?;
    let api: Api<Bid> = ns.api(client);
    let mut list = api
        .list(&ListParams::default().labels(&format!("{LABEL_AIJOB}={job}")))
        .await
        .context("listing Bids")?
        .items;
    list.sort_by(|a, b| {
        price_key(&a.spec.price_per_gpu_hour)
            .cmp(&price_key(&b.spec.price_per_gpu_hour))
            .then_with(|| a.metadata.name.cmp(&b.metadata.name))
    });
    if !matches!(format, Format::Table) {
        return structured(format, &list);
    }
    let rows = list
        .iter()
        .map(|b| {
            vec![
                b.metadata.name.clone().unwrap_or_default(),
                b.spec.provider_org.clone(),
                b.spec.gpu_product.clone(),
                b.spec.gpu_count.to_string(),
                b.spec.price_per_gpu_hour.clone(),
                b.spec.expires_at.0.to_string(),
                dash(bid_state(b).map(|s| format!("{s:?}"))),
            ]
        })
        .collect::<Vec<_>>();
    Ok(table(
        &["NAME", "PROVIDER", "PRODUCT", "GPUS", "PRICE/GPU-H", "EXPIRES", "STATE"],
        &rows,
    ))
}

fn in_ns(ns: &NamespaceOpt) -> String {
    ns.namespace
        .as_ref()
        .map_or_else(String::new, |n| format!(" in namespace {n}"))
}

/// A 404 as the sentence a person needs; anything else as it came.
fn not_found(e: kube::Error, what: &str) -> anyhow::Error {
    match e {
        kube::Error::Api(s) if s.code == 404 => anyhow::anyhow!("{what}"),
        e => anyhow::Error::new(e).context(what.to_string()),
    }
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

/// `gpupool accept BID`: names the bid in its AiJob's `spec.bidding.acceptedBid`.
pub async fn accept(ns: &NamespaceOpt, bid_name: &str) -> anyhow::Result<(String, String)> {
    let client = kube_client().await?;
    let bids: Api<Bid> = ns.api(client.clone());
    let bid = bids.get(bid_name).await.map_err(|e| {
        not_found(
            e,
            &format!(
                "no bid {bid_name}{}; list a job's bids with `gpupool bids JOB`",
                in_ns(ns)
            ),
        )
    })?;
    let jobs: Api<AiJob> = ns.api(client);
    let job_name = bid.spec.ai_job.clone();
    let job = jobs
        .get(&job_name)
        .await
        .map_err(|e| not_found(e, &format!("bid {bid_name} is for AiJob {job_name}, which is gone")))?;
    if let Some(why) = accept_refusal(&job, &bid, Timestamp::now()) {
        anyhow::bail!(why);
    }
    let patch = serde_json::json!({"spec": {"bidding": {"acceptedBid": bid_name}}});
    jobs.patch(&job_name, &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .with_context(|| format!("setting spec.bidding.acceptedBid on AiJob {job_name}"))?;
    Ok((
        job_name.clone(),
        format!(
            "accepted bid {bid_name}: {}×{} from {} at {} per GPU-hour for AiJob {job_name}\n",
            bid.spec.gpu_count, bid.spec.gpu_product, bid.spec.provider_org, bid.spec.price_per_gpu_hour
        ),
    ))
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

/// `gpupool bid JOB --max-price P`: raises what a waiting job pays at most.
/// The operator's next order for it carries the new price.
pub async fn raise(ns: &NamespaceOpt, job_name: &str, to: &str) -> anyhow::Result<String> {
    let jobs: Api<AiJob> = ns.api(kube_client().await?);
    let job = jobs
        .get(job_name)
        .await
        .map_err(|e| not_found(e, &format!("no AiJob {job_name}{}", in_ns(ns))))?;
    if let Some(why) = raise_refusal(&job, to) {
        anyhow::bail!(why);
    }
    let patch = serde_json::json!({"spec": {"maxPricePerGpuHour": to}});
    jobs.patch(job_name, &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .with_context(|| format!("raising AiJob {job_name}'s max price"))?;
    Ok(format!(
        "AiJob {job_name} now pays at most {to} per GPU-hour (was {}); its next order carries the new price\n",
        job.spec.max_price_per_gpu_hour
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use gpupool_crds::{AiJobStatus, BidSpec, BidStatus, PeerCapacity, PoolPeerSpec, PoolPeerStatus};
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

//! The market as a member cluster sees it: the peers it knows, what they
//! advertise, the bids for a job, accepting one, and raising a job's price.
//!
//! These read and write the cluster's own resources (PoolPeer, Bid, AiJob)
//! through the kubeconfig, so what the CLI shows is exactly what the operator
//! acts on. The checks before a write are pure and shared with the Pool API
//! (`gpupool_crds::market_view`); the API server's own validation stays the
//! last word.

use anyhow::Context as _;
use gpupool_crds::market_view::{Offer, accept_refusal, bid_state, offers, raise_refusal, sort_bids};
use gpupool_crds::{AiJob, Bid, LABEL_AIJOB, PeerVia, PoolPeer};
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
                match s.via {
                    Some(PeerVia::Direct) => "direct",
                    Some(PeerVia::Relay) => "relay",
                    None => "-",
                }
                .to_string(),
                ago(s.last_seen.as_ref(), now),
                s.reputation.completed.to_string(),
                s.reputation.failed.to_string(),
            ]
        })
        .collect::<Vec<_>>();
    Ok(table(
        &[
            "ORG",
            "PEER",
            "WALLET",
            "CONNECTED",
            "VIA",
            "LAST-SEEN",
            "COMPLETED",
            "FAILED",
        ],
        &rows,
    ))
}

/// `gpupool market`: what the pool advertises, cheapest first.
pub async fn market(format: Format) -> anyhow::Result<String> {
    let peers = pool_peers().await?;
    render_offers(format, &offers(&peers))
}

/// Offers as a table or structured output; the Pool API's market prints the same.
pub fn render_offers(format: Format, offers: &[Offer]) -> anyhow::Result<String> {
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
    sort_bids(&mut list);
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

/// `gpupool cancel JOB`: deletes the AiJob. Its finalizer closes the lease on
/// chain (refunding the unused deposit) and tells the provider to stop.
pub async fn cancel(ns: &NamespaceOpt, job_name: &str) -> anyhow::Result<String> {
    let jobs: Api<AiJob> = ns.api(kube_client().await?);
    jobs.delete(job_name, &kube::api::DeleteParams::default())
        .await
        .map_err(|e| not_found(e, &format!("no AiJob {job_name}{}", in_ns(ns))))?;
    Ok(format!(
        "aijob/{job_name} cancelled: its lease closes on chain and the unused deposit is refunded\n"
    ))
}

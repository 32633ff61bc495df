//! The Pool API's gRPC service: signed requests from renters without a
//! cluster, turned into AiJobs in the renter's own namespace of this member
//! cluster. The controllers then place them as they place any job; the
//! lease is opened as the renter's agent, from the renter's escrow account.
//!
//! Dereference (the caller's wallet, from its signature) → validate (the
//! request, the shared market rules) → apply (kube writes) → answer.

use std::sync::{Arc, Mutex};

use futures::StreamExt as _;
use gpupool_chain::request_auth::{
    AuthError, HEADER_NONCE, HEADER_SIGNATURE, HEADER_TIMESTAMP, HEADER_WALLET, SignedHeaders, verify,
};
use gpupool_chain::{Address, EscrowClient, LeaseOnChain};
use gpupool_crds::market_view::{accept_refusal, offers, raise_refusal, sort_bids};
use gpupool_crds::price::TokenAmount;
use gpupool_crds::{ANNOTATION_TRACEPARENT, AiJob, Bid, LABEL_AIJOB, LABEL_RENTER_WALLET, Lease, PoolPeer};
use gpupool_proto::pool::v1 as api;
use gpupool_proto::pool::v1::pool_server::{Pool, SERVICE_NAME};
use k8s_openapi::api::core::v1::Namespace;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, DeleteParams, ListParams, ObjectMeta, Patch, PatchParams, PostParams};
use kube::runtime::watcher::watch_object;
use prost::Message;
use tonic::codegen::BoxStream;
use tonic::{Code, Request, Response, Status};
use tracing::{Instrument as _, info, warn};

use super::replay::{Refused, ReplayGuard};
use super::views;
use crate::market::node::now_ms;
use crate::telemetry::Metrics;

/// Field manager of the Pool API's writes.
const MANAGER: &str = "gpupool-pool-api";
/// Label on the AiJobs the Pool API created.
const LABEL_SUBMITTED_VIA: &str = "gpupool.dev/submitted-via";

pub struct PoolService {
    client: kube::Client,
    /// Read-only: whether a renter has funded its account and approved us.
    chain: EscrowClient,
    /// Our wallet: the agent renters approve.
    agent: Address,
    info: api::InfoResponse,
    guard: Mutex<ReplayGuard>,
    metrics: Arc<Metrics>,
}

/// A Kubernetes error as the status a renter can act on. The API server's
/// own message travels for refusals (validation, conflicts); anything else
/// is the member's problem, and says so.
fn kube_status(e: kube::Error, what: &str) -> Status {
    match e {
        kube::Error::Api(s) if s.code == 404 => Status::not_found(what.to_string()),
        kube::Error::Api(s) if s.code == 409 => Status::already_exists(format!("{what}: {}", s.message)),
        kube::Error::Api(s) if s.code == 422 || s.code == 400 => Status::invalid_argument(s.message),
        e => {
            warn!(error = %e, what, "Pool API: the member's API server failed");
            Status::unavailable(format!("{what}: this member's API server failed ({e}); retry later"))
        }
    }
}

impl PoolService {
    pub fn new(client: kube::Client, chain: EscrowClient, agent: Address, org: String, metrics: Arc<Metrics>) -> Self {
        let config = chain.config();
        let info = api::InfoResponse {
            org,
            agent: agent.to_string(),
            chain_id: config.chain_id,
            escrow: config.escrow.to_string(),
            token: config.token.to_string(),
        };
        Self {
            client,
            chain,
            agent,
            info,
            // One minute either side of our clock; at most 100k nonces held.
            guard: Mutex::new(ReplayGuard::new(60_000, 100_000)),
            metrics,
        }
    }

    /// The caller's wallet, if the request is signed, fresh and new.
    fn authenticate<T: Message>(&self, req: &Request<T>, method: &str) -> Result<Address, Status> {
        let md = req.metadata();
        let header = |k: &'static str| {
            md.get(k)
                .and_then(|v| v.to_str().ok())
                .map(str::to_string)
                .ok_or_else(|| Status::unauthenticated(AuthError::Missing(k).to_string()))
        };
        let headers = SignedHeaders {
            wallet: header(HEADER_WALLET)?,
            timestamp_ms: header(HEADER_TIMESTAMP)?,
            nonce: header(HEADER_NONCE)?,
            signature: header(HEADER_SIGNATURE)?,
        };
        let path = format!("/{SERVICE_NAME}/{method}");
        let body = req.get_ref().encode_to_vec();
        let v = verify(&headers, &path, &body).map_err(|e| Status::unauthenticated(e.to_string()))?;
        // A poisoned lock only means another request panicked mid-admit; the map is still whole.
        let mut guard = self.guard.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        guard
            .admit(v.wallet, &v.nonce, v.timestamp_ms, now_ms())
            .map_err(|e| match e {
                Refused::Full => Status::resource_exhausted(e.to_string()),
                Refused::Stale { .. } | Refused::Replayed => Status::unauthenticated(e.to_string()),
            })?;
        Ok(v.wallet)
    }

    fn jobs(&self, renter: Address) -> Api<AiJob> {
        Api::namespaced(self.client.clone(), &views::renter_namespace(renter))
    }

    fn record<T>(&self, method: &str, r: Result<T, Status>) -> Result<Response<T>, Status> {
        self.metrics
            .pool_api_request(method, r.as_ref().map_or_else(Status::code, |_| Code::Ok));
        r.map(Response::new)
    }

    async fn get_job_of(&self, renter: Address, name: &str) -> Result<AiJob, Status> {
        self.jobs(renter)
            .get(name)
            .await
            .map_err(|e| kube_status(e, &format!("you have no job named {name:?}")))
    }

    /// The renter's namespace, labelled with its wallet: the label is what
    /// lets the operator spend the renter's account for jobs in it.
    async fn ensure_namespace(&self, renter: Address) -> Result<(), Status> {
        let name = views::renter_namespace(renter);
        let label = views::wallet_label(renter);
        let api: Api<Namespace> = Api::all(self.client.clone());
        match api.get_opt(&name).await {
            Ok(Some(ns)) => {
                return match ns.metadata.labels.as_ref().and_then(|l| l.get(LABEL_RENTER_WALLET)) {
                    Some(w) if *w == label => Ok(()),
                    _ => Err(Status::failed_precondition(format!(
                        "namespace {name} exists without the label {LABEL_RENTER_WALLET}={label}; \
                         the member's administrators must remove or label it"
                    ))),
                };
            }
            Ok(None) => {}
            Err(e) => return Err(kube_status(e, "reading the renter's namespace")),
        }
        let ns = Namespace {
            metadata: ObjectMeta {
                name: Some(name.clone()),
                labels: Some(
                    [
                        (LABEL_RENTER_WALLET.to_string(), label),
                        ("app.kubernetes.io/managed-by".to_string(), MANAGER.to_string()),
                    ]
                    .into(),
                ),
                ..Default::default()
            },
            ..Default::default()
        };
        match api.create(&PostParams::default(), &ns).await {
            Ok(_) => {
                info!(namespace = %name, renter = %renter, "Pool API: created the renter's namespace");
                Ok(())
            }
            // Two first submissions at once: the other one created it.
            Err(kube::Error::Api(s)) if s.code == 409 => Ok(()),
            Err(e) => Err(kube_status(e, "creating the renter's namespace")),
        }
    }

    /// Refuses a job whose lease could not be opened at all: without an
    /// allowance for us or without funds it would only wait. (Whether they
    /// cover the winning bid's deposit is known at the award; the job says
    /// so then.)
    async fn check_funding(&self, renter: Address) -> Result<(), Status> {
        let agent = self.agent;
        let chain_down = |e: gpupool_chain::ChainError| {
            Status::unavailable(format!("this member cannot read the chain ({e}); retry later"))
        };
        let (allowed, account) =
            tokio::try_join!(self.chain.agent_allowance(renter, agent), self.chain.account(renter))
                .map_err(chain_down)?;
        if allowed == 0 {
            return Err(Status::failed_precondition(format!(
                "you have not approved this member's operator ({agent}) to open leases from your escrow account: \
                 run `gpupool escrow agent --agent {agent} --amount N`"
            )));
        }
        if account == 0 {
            return Err(Status::failed_precondition(
                "your escrow account is empty: leases open from it; run `gpupool escrow deposit --amount N`"
                    .to_string(),
            ));
        }
        info!(renter = %renter, allowed = %TokenAmount(allowed), account = %TokenAmount(account), "Pool API: renter's funding checked");
        Ok(())
    }

    async fn submit_job(&self, req: Request<api::SubmitRequest>) -> Result<api::Job, Status> {
        let renter = self.authenticate(&req, "Submit")?;
        // The job's trace starts here, under the renter's own when it sends a W3C traceparent.
        let span = tracing::info_span!("pool_api.submit", renter = %renter, job = %req.get_ref().name);
        if let Some(parent) = req
            .metadata()
            .get("traceparent")
            .and_then(|v| v.to_str().ok())
            .and_then(crate::tracecontext::from_traceparent)
        {
            // Fails only when spans are not exported.
            let _ = tracing_opentelemetry::OpenTelemetrySpanExt::set_parent(&span, parent);
        }
        let r = req.into_inner();
        let spec = views::submitted_spec(&r.spec_json, renter).map_err(Status::invalid_argument)?;
        self.check_funding(renter).instrument(span.clone()).await?;
        self.ensure_namespace(renter).instrument(span.clone()).await?;
        let mut job = AiJob::new(&r.name, spec);
        job.metadata.labels = Some([(LABEL_SUBMITTED_VIA.to_string(), "pool-api".to_string())].into());
        // Every reconcile, peer and provider joins this trace through the annotation.
        job.metadata.annotations = span
            .in_scope(crate::tracecontext::current_traceparent)
            .map(|tp| [(ANNOTATION_TRACEPARENT.to_string(), tp)].into());
        let created = self
            .jobs(renter)
            .create(&PostParams::default(), &job)
            .instrument(span)
            .await
            .map_err(|e| kube_status(e, &format!("you already have a job named {:?}", r.name)))?;
        info!(renter = %renter, job = %r.name, "Pool API: job submitted");
        Ok(views::job(&created))
    }

    async fn bids_of(&self, req: Request<api::JobRef>) -> Result<api::ListBidsResponse, Status> {
        let renter = self.authenticate(&req, "ListBids")?;
        let name = req.into_inner().name;
        self.get_job_of(renter, &name).await?;
        let api: Api<Bid> = Api::namespaced(self.client.clone(), &views::renter_namespace(renter));
        let mut list = api
            .list(&ListParams::default().labels(&format!("{LABEL_AIJOB}={name}")))
            .await
            .map_err(|e| kube_status(e, "listing bids"))?
            .items;
        sort_bids(&mut list);
        Ok(api::ListBidsResponse {
            bids: list.iter().map(views::bid).collect(),
        })
    }

    async fn accept(&self, req: Request<api::AcceptBidRequest>) -> Result<api::Job, Status> {
        let renter = self.authenticate(&req, "AcceptBid")?;
        let bid_name = req.into_inner().bid;
        let bids: Api<Bid> = Api::namespaced(self.client.clone(), &views::renter_namespace(renter));
        let bid = bids.get(&bid_name).await.map_err(|e| {
            kube_status(
                e,
                &format!("you have no bid named {bid_name:?}; list a job's bids with ListBids"),
            )
        })?;
        let job = self.get_job_of(renter, &bid.spec.ai_job).await?;
        if let Some(why) = accept_refusal(&job, &bid, Timestamp::now()) {
            return Err(Status::failed_precondition(why));
        }
        let patch = serde_json::json!({"spec": {"bidding": {"acceptedBid": bid_name}}});
        let patched = self
            .jobs(renter)
            .patch(&bid.spec.ai_job, &PatchParams::default(), &Patch::Merge(&patch))
            .await
            .map_err(|e| kube_status(e, "accepting the bid"))?;
        info!(renter = %renter, job = %bid.spec.ai_job, bid = %bid_name, "Pool API: bid accepted");
        Ok(views::job(&patched))
    }

    async fn raise(&self, req: Request<api::RaiseBidRequest>) -> Result<api::Job, Status> {
        let renter = self.authenticate(&req, "RaiseBid")?;
        let r = req.into_inner();
        let job = self.get_job_of(renter, &r.name).await?;
        if let Some(why) = raise_refusal(&job, &r.max_price_per_gpu_hour) {
            return Err(Status::failed_precondition(why));
        }
        let patch = serde_json::json!({"spec": {"maxPricePerGpuHour": r.max_price_per_gpu_hour}});
        let patched = self
            .jobs(renter)
            .patch(&r.name, &PatchParams::default(), &Patch::Merge(&patch))
            .await
            .map_err(|e| kube_status(e, "raising the price"))?;
        Ok(views::job(&patched))
    }

    async fn cancel_job(&self, req: Request<api::JobRef>) -> Result<api::Job, Status> {
        let renter = self.authenticate(&req, "Cancel")?;
        let name = req.into_inner().name;
        let job = self.get_job_of(renter, &name).await?;
        // The AiJob's finalizer closes its lease on chain and tells the provider.
        self.jobs(renter)
            .delete(&name, &DeleteParams::default())
            .await
            .map_err(|e| kube_status(e, &format!("you have no job named {name:?}")))?;
        info!(renter = %renter, job = %name, "Pool API: job cancelled");
        let mut view = views::job(&job);
        view.deleting = true;
        Ok(view)
    }

    async fn watch(&self, req: Request<api::JobRef>) -> Result<BoxStream<api::Job>, Status> {
        let renter = self.authenticate(&req, "WatchJob")?;
        let name = req.into_inner().name;
        self.get_job_of(renter, &name).await?;
        Ok(follow(self.jobs(renter), &name, views::job, |j| {
            matches!(j.phase.as_str(), "Succeeded" | "Failed")
        }))
    }

    fn leases(&self, renter: Address) -> Api<Lease> {
        Api::namespaced(self.client.clone(), &views::renter_namespace(renter))
    }

    async fn list_leases_of(&self, req: Request<api::ListLeasesRequest>) -> Result<api::ListLeasesResponse, Status> {
        let renter = self.authenticate(&req, "ListLeases")?;
        let mut list = self
            .leases(renter)
            .list(&ListParams::default())
            .await
            .map_err(|e| kube_status(e, "listing your leases"))?
            .items;
        list.sort_by(|a, b| b.metadata.creation_timestamp.cmp(&a.metadata.creation_timestamp));
        Ok(api::ListLeasesResponse {
            leases: list.iter().map(views::lease).collect(),
        })
    }

    async fn watch_lease_of(&self, req: Request<api::LeaseRef>) -> Result<BoxStream<api::LeaseView>, Status> {
        let renter = self.authenticate(&req, "WatchLease")?;
        let name = req.into_inner().name;
        let api = self.leases(renter);
        api.get(&name)
            .await
            .map_err(|e| kube_status(e, &format!("you have no lease named {name:?}; ListLeases shows yours")))?;
        Ok(follow(api, &name, views::lease, |l| l.state == "Closed"))
    }

    async fn escrow_of(&self, req: Request<api::EscrowRequest>) -> Result<api::EscrowView, Status> {
        let renter = self.authenticate(&req, "Escrow")?;
        let chain_down = |e: gpupool_chain::ChainError| {
            Status::unavailable(format!("this member cannot read the chain ({e}); retry later"))
        };
        let leases = self
            .leases(renter)
            .list(&ListParams::default())
            .await
            .map_err(|e| kube_status(e, "listing your leases"))?
            .items;
        let (wallet, account, allowed, tip) = tokio::try_join!(
            self.chain.token_balance(renter),
            self.chain.account(renter),
            self.chain.agent_allowance(renter, self.agent),
            self.chain.tip(),
        )
        .map_err(chain_down)?;
        // What the open ones hold now, read at one block: the records' own
        // figures may be seconds old.
        let (mut in_leases, mut open) = (0u128, 0u32);
        for id in leases.iter().filter_map(views::open_lease_id) {
            if let LeaseOnChain::Open { lease, .. } = self.chain.lease_at(id, tip.number).await.map_err(chain_down)? {
                in_leases = in_leases.saturating_add(lease.remaining_at(tip.timestamp));
                open += 1;
            }
        }
        Ok(api::EscrowView {
            wallet: renter.to_string(),
            wallet_balance: TokenAmount(wallet).to_string(),
            account: TokenAmount(account).to_string(),
            agent: self.agent.to_string(),
            agent_allowance: TokenAmount(allowed).to_string(),
            in_leases: TokenAmount(in_leases).to_string(),
            open_leases: open,
        })
    }
}

/// `name` in `api` as `view` shows it, now and at each change that shows,
/// until `ended` says it is over, the object goes, or the caller hangs up.
fn follow<K, V>(api: Api<K>, name: &str, view: fn(&K) -> V, ended: fn(&V) -> bool) -> BoxStream<V>
where
    K: kube::Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug + Send + 'static,
    V: Clone + PartialEq + Send + 'static,
{
    let changes = watch_object(api, name);
    let stream = futures::stream::unfold(
        (Box::pin(changes), None::<V>, false),
        move |(mut changes, last, done)| async move {
            if done {
                return None;
            }
            loop {
                match changes.next().await {
                    None => return None,
                    Some(Ok(Some(obj))) => {
                        let v = view(&obj);
                        if last.as_ref() == Some(&v) {
                            continue;
                        }
                        // The last message of one that ended.
                        let over = ended(&v);
                        return Some((Ok(v.clone()), (changes, Some(v), over)));
                    }
                    // Deleted: the watch is over.
                    Some(Ok(None)) => return None,
                    Some(Err(e)) => {
                        let status = Status::unavailable(format!("the watch was interrupted ({e}); watch again"));
                        return Some((Err(status), (changes, last, true)));
                    }
                }
            }
        },
    );
    Box::pin(stream)
}

#[tonic::async_trait]
impl Pool for PoolService {
    async fn info(&self, _req: Request<api::InfoRequest>) -> Result<Response<api::InfoResponse>, Status> {
        self.record("Info", Ok(self.info.clone()))
    }

    async fn market(&self, _req: Request<api::MarketRequest>) -> Result<Response<api::MarketResponse>, Status> {
        let r = Api::<PoolPeer>::all(self.client.clone())
            .list(&ListParams::default())
            .await
            .map(|l| api::MarketResponse {
                offers: offers(&l.items).iter().map(views::offer).collect(),
            })
            .map_err(|e| kube_status(e, "listing the pool's members"));
        self.record("Market", r)
    }

    async fn submit(&self, req: Request<api::SubmitRequest>) -> Result<Response<api::Job>, Status> {
        let r = self.submit_job(req).await;
        self.record("Submit", r)
    }

    async fn get_job(&self, req: Request<api::JobRef>) -> Result<Response<api::Job>, Status> {
        let r = async {
            let renter = self.authenticate(&req, "GetJob")?;
            Ok(views::job(&self.get_job_of(renter, &req.get_ref().name).await?))
        }
        .await;
        self.record("GetJob", r)
    }

    async fn list_jobs(&self, req: Request<api::ListJobsRequest>) -> Result<Response<api::ListJobsResponse>, Status> {
        let r = async {
            let renter = self.authenticate(&req, "ListJobs")?;
            let list = self
                .jobs(renter)
                .list(&ListParams::default())
                .await
                .map_err(|e| kube_status(e, "listing your jobs"))?;
            Ok(api::ListJobsResponse {
                jobs: list.items.iter().map(views::job).collect(),
            })
        }
        .await;
        self.record("ListJobs", r)
    }

    async fn list_bids(&self, req: Request<api::JobRef>) -> Result<Response<api::ListBidsResponse>, Status> {
        let r = self.bids_of(req).await;
        self.record("ListBids", r)
    }

    async fn accept_bid(&self, req: Request<api::AcceptBidRequest>) -> Result<Response<api::Job>, Status> {
        let r = self.accept(req).await;
        self.record("AcceptBid", r)
    }

    async fn raise_bid(&self, req: Request<api::RaiseBidRequest>) -> Result<Response<api::Job>, Status> {
        let r = self.raise(req).await;
        self.record("RaiseBid", r)
    }

    async fn cancel(&self, req: Request<api::JobRef>) -> Result<Response<api::Job>, Status> {
        let r = self.cancel_job(req).await;
        self.record("Cancel", r)
    }

    type WatchJobStream = BoxStream<api::Job>;

    async fn watch_job(&self, req: Request<api::JobRef>) -> Result<Response<Self::WatchJobStream>, Status> {
        let r = self.watch(req).await;
        self.record("WatchJob", r)
    }

    async fn list_leases(
        &self,
        req: Request<api::ListLeasesRequest>,
    ) -> Result<Response<api::ListLeasesResponse>, Status> {
        let r = self.list_leases_of(req).await;
        self.record("ListLeases", r)
    }

    type WatchLeaseStream = BoxStream<api::LeaseView>;

    async fn watch_lease(&self, req: Request<api::LeaseRef>) -> Result<Response<Self::WatchLeaseStream>, Status> {
        let r = self.watch_lease_of(req).await;
        self.record("WatchLease", r)
    }

    async fn escrow(&self, req: Request<api::EscrowRequest>) -> Result<Response<api::EscrowView>, Status> {
        let r = self.escrow_of(req).await;
        self.record("Escrow", r)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use gpupool_chain::{ChainConfig, ClientOptions, Wallet};

    // anvil's well-known development key; public, never used outside local chains.
    const KEY: &str = "0x59c6995e998f97a5a0044966f0945389dc9e86dae88c7a8412f4603b6b78690d";

    /// A service whose kube API and chain RPC both refuse connections: what
    /// is decided before either is asked shows, and what needs them fails
    /// as unavailable, never as a refusal of the renter.
    fn service() -> PoolService {
        let chain = EscrowClient::connect(
            ChainConfig {
                rpc_url: "http://127.0.0.1:1".into(),
                chain_id: 31337,
                escrow: Address::repeat_byte(1),
                token: Address::repeat_byte(2),
                from_block: 0,
            },
            None,
            ClientOptions::default(),
        )
        .unwrap();
        let kube = kube::Client::try_from(kube::Config::new("http://127.0.0.1:1".parse().unwrap())).unwrap();
        PoolService::new(
            kube,
            chain,
            Address::repeat_byte(3),
            "acme".into(),
            Arc::new(Metrics::default()),
        )
    }

    fn signed<T: Message>(wallet: &Wallet, method: &str, msg: T, nonce: u8) -> Request<T> {
        let h = wallet.sign_request(
            &format!("/{SERVICE_NAME}/{method}"),
            &msg.encode_to_vec(),
            now_ms(),
            [nonce; 16],
        );
        let mut req = Request::new(msg);
        let md = req.metadata_mut();
        for (k, v) in h.pairs() {
            md.insert(k, v.parse().unwrap());
        }
        req
    }

    #[tokio::test]
    async fn a_chain_that_does_not_answer_makes_submit_unavailable() {
        let e = service().check_funding(Address::repeat_byte(4)).await.unwrap_err();
        assert_eq!(e.code(), Code::Unavailable, "{e:?}");
        assert!(e.message().contains("cannot read the chain"), "{}", e.message());
        assert!(
            !e.message().contains("127.0.0.1:1"),
            "no RPC URL in answers: {}",
            e.message()
        );
    }

    #[tokio::test]
    async fn requests_are_checked_before_anything_is_asked() {
        let svc = service();
        let wallet = Wallet::from_hex(KEY).unwrap();
        let r = signed(&wallet, "ListJobs", api::ListJobsRequest {}, 1);
        assert_eq!(svc.authenticate(&r, "ListJobs").unwrap(), wallet.address());
        // The same nonce again: refused.
        let again = signed(&wallet, "ListJobs", api::ListJobsRequest {}, 1);
        let e = svc.authenticate(&again, "ListJobs").unwrap_err();
        assert_eq!(e.code(), Code::Unauthenticated);
        assert!(e.message().contains("already used"), "{}", e.message());
        // Unsigned and wrong-method requests never reach the API server.
        let e = svc.list_jobs(Request::new(api::ListJobsRequest {})).await.unwrap_err();
        assert_eq!(e.code(), Code::Unauthenticated);
        let e = svc
            .get_job(signed(&wallet, "Cancel", api::JobRef { name: "x".into() }, 2))
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::Unauthenticated);
        // A malformed spec is refused before the chain or the cluster is asked.
        let e = svc
            .submit(signed(
                &wallet,
                "Submit",
                api::SubmitRequest {
                    name: "x".into(),
                    spec_json: "[]".into(),
                },
                3,
            ))
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument);
        // With a good one, the unreachable chain is what it says.
        let spec = r#"{"template":{"spec":{"containers":[{"name":"t","image":"x"}]}},"gpus":{"count":1},"maxPricePerGpuHour":"1"}"#;
        let e = svc
            .submit(signed(
                &wallet,
                "Submit",
                api::SubmitRequest {
                    name: "x".into(),
                    spec_json: spec.into(),
                },
                4,
            ))
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::Unavailable, "{e:?}");
    }
}

//! The AiJob controller: dereference → validate → build → apply → update status.
//! All decisions are made by the pure modules; this file only talks to the API.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::{StreamExt, TryStreamExt};
use gpupool_crds::conditions::find;
use gpupool_crds::pods::PodView;
use gpupool_crds::{
    AIJOB_FINALIZER, ANNOTATION_TRACEPARENT, AiJob, AiJobStatus, GpuNode, LABEL_AIJOB, LABEL_LEASE, LABEL_ORDER, Lease,
    PlacementMode, RunsOn,
};
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::Namespace;
use k8s_openapi::jiff::Timestamp;
use kube::api::{DeleteParams, ListParams, Patch, PatchParams, PostParams, PropagationPolicy};
use kube::runtime::controller::{Action, Config as ControllerConfig, Controller};
use kube::runtime::events::{Event as KubeEvent, EventType, Reporter};
use kube::runtime::finalizer::Event as Finalizer;
use kube::runtime::reflector::{self, ObjectRef, Store};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Client, Resource, ResourceExt};
use tokio::sync::mpsc;

use crate::market::node::{Market, Stores};
use crate::market::renter_io::in_pool;
use tracing::{Instrument, debug, info, info_span, warn};
use tracing_opentelemetry::OpenTelemetrySpanExt;

use crate::cache::{JobView, PodCaches, slim_aijob};
use crate::capacity::inventory;
use crate::deletes::{Deleted, delete_unless_gone};
use crate::events::EventPublisher;
use crate::finalizers::{self, finalizer};
use crate::jobbuild::{self, MANAGED_BY, MANAGER};
use crate::jobstatus::observe;
use crate::listed::Listed;
use crate::placement::{Decision, Need, decide};
use crate::pod_index::PodIndex;
use crate::promised::{self, LOCAL_TTL, LocalPromise, PoolPromise, Promised};
use crate::status::{COND_PLACED, Outcome, goes_back, plan};
use crate::status_memo::StatusMemo;
use crate::telemetry::Metrics;
use crate::tracecontext;

pub const FIELD_MANAGER: &str = "gpupool-operator";

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("kubernetes API: {0}")]
    Kube(#[from] kube::Error),
    #[error("building the Job: {0}")]
    Build(#[from] jobbuild::BuildError),
    #[error("finalizer: {0}")]
    Finalizer(#[source] Box<kube::runtime::finalizer::Error<Error>>),
    #[error("the AiJob has no namespace")]
    NoNamespace,
    #[error("waiting for Job {0} and its pods to be deleted")]
    CleanupPending(String),
    #[error("pool: {0}")]
    Market(#[from] crate::market::renter_io::MarketError),
    #[error("the pod cache stopped before its first list")]
    PodCacheStopped,
}

/// Settings that change behaviour, not wiring.
#[derive(Clone, Debug)]
pub struct Settings {
    /// This cluster's organisation, shown as where local jobs run.
    pub org: String,
    /// How soon a waiting job looks at capacity again.
    pub wait_requeue: Duration,
    /// Concurrent reconciles.
    pub concurrency: u16,
}

pub struct Context {
    client: Client,
    settings: Settings,
    jobs: Store<JobView>,
    /// Our Jobs' pods, and everyone else's live pods (GPUs in use).
    pods: PodCaches,
    gpunodes: Store<GpuNode>,
    recorder: EventPublisher,
    /// Placements whose pods are not bound yet, behind the lock that every
    /// promise of this cluster's GPUs is decided under (the market's too),
    /// so two decisions never book the same free GPUs.
    promised: Arc<Promised>,
    metrics: Arc<Metrics>,
    /// The pool market; None when this cluster only runs its own jobs.
    market: Option<Arc<Market>>,
    /// Statuses written here that the cache may not show yet.
    statuses: StatusMemo<AiJobStatus>,
}

/// The pod caches: this operator's own pods (which wake their AiJob, and
/// are indexed by it) and everyone else's live pods, which hold GPUs too.
/// Returns the caches, the stream of our pods for the controller to watch,
/// and the task that keeps the other pods' cache current.
fn watch_pods(
    pods_api: Api<PodView>,
) -> (
    PodCaches,
    impl futures::Stream<Item = Result<PodView, watcher::Error>>,
    impl std::future::Future<Output = ()>,
) {
    let (ours, ours_writer) = reflector::store();
    let by_aijob = PodIndex::default();
    let index = by_aijob.clone();
    let ours_listed = Listed::default();
    let our_pods = ours_listed
        .follow(
            watcher(pods_api.clone(), watcher::Config::default().labels(LABEL_AIJOB))
                .default_backoff()
                .reflect(ours_writer)
                .inspect_ok(move |ev| index.apply(ev)),
        )
        .applied_objects();
    let (others_live, live_writer) = reflector::store();
    let others_listed = Listed::default();
    let others = others_listed
        .follow(
            watcher(
                pods_api,
                watcher::Config::default()
                    .labels(&format!("!{LABEL_AIJOB}"))
                    .fields("status.phase!=Succeeded,status.phase!=Failed"),
            )
            .default_backoff()
            .reflect(live_writer),
        )
        .for_each(|_| futures::future::ready(()));
    let caches = PodCaches {
        ours,
        others_live,
        by_aijob,
        ours_listed,
        others_listed,
    };
    (caches, our_pods, others)
}

/// The GpuNode cache (managed fields dropped: no reconcile reads them),
/// whether it has listed, and the task that keeps it current.
fn watch_gpunodes(api: Api<GpuNode>) -> (Store<GpuNode>, Listed, impl std::future::Future<Output = ()>) {
    let (gpunodes, writer) = reflector::store();
    let listed = Listed::default();
    let task = listed
        .follow(
            watcher(api, watcher::Config::default())
                .default_backoff()
                .modify(|g: &mut GpuNode| g.meta_mut().managed_fields = None)
                .reflect(writer),
        )
        .for_each(|_| futures::future::ready(()));
    (gpunodes, listed, task)
}

/// The renter's Leases: what wakes a pool job, and the cache the market
/// reads them from on every step (it asks the API server until the first
/// list is in).
fn renter_lease_changes(
    client: Client,
    market: &Market,
) -> impl futures::Stream<Item = Result<Lease, watcher::Error>> + use<> {
    let (leases, writer) = reflector::store();
    let listed = Listed::default();
    market.attach_lease_cache(leases, listed.clone());
    listed
        .follow(
            watcher(
                Api::<Lease>::all(client),
                watcher::Config::default().labels(LABEL_ORDER),
            )
            .default_backoff()
            .modify(|l: &mut Lease| l.meta_mut().managed_fields = None)
            .reflect(writer),
        )
        .touched_objects()
        .predicate_filter(crate::triggers::renter, Default::default())
}

/// Runs the controller until shutdown.
pub async fn run(
    client: Client,
    settings: Settings,
    metrics: Arc<Metrics>,
    market: Option<(Arc<Market>, mpsc::Receiver<ObjectRef<AiJob>>)>,
) -> anyhow::Result<()> {
    let (jobs, jobs_writer) = reflector::store();
    let job_stream = watcher(
        Api::<JobView>::all(client.clone()),
        watcher::Config::default().labels(&format!("{MANAGED_BY}={MANAGER}")),
    )
    .default_backoff()
    .reflect(jobs_writer)
    .applied_objects();
    let (pods, our_pod_stream, others_task) = watch_pods(Api::all(client.clone()));
    let (gpunodes, gpunodes_listed, gpunodes_task) = watch_gpunodes(Api::all(client.clone()));
    tokio::spawn(others_task);
    tokio::spawn(gpunodes_task);

    let reporter = Reporter {
        controller: FIELD_MANAGER.into(),
        instance: std::env::var("POD_NAME").ok(),
    };
    let promised = Arc::new(Promised::default());
    let (market, wake) = match market {
        Some((m, w)) => {
            m.attach_stores(Stores {
                gpunodes: gpunodes.clone(),
                gpunodes_listed: gpunodes_listed.clone(),
                pods: pods.clone(),
                promised: promised.clone(),
            });
            (Some(m), Some(w))
        }
        None => (None, None),
    };
    let others_listed = pods.others_listed.clone();
    let ctx = Arc::new(Context {
        market,
        recorder: EventPublisher::new(client.clone(), reporter),
        client,
        settings: settings.clone(),
        jobs,
        pods,
        gpunodes,
        promised,
        metrics,
        statuses: StatusMemo::default(),
    });

    // Placement decisions on empty caches would tell users there are no GPUs.
    info!("waiting for the pod and GpuNode caches");
    // The controller's own pods arrive through its watch, which runs only
    // with the controller: placement waits for that list itself (`place`).
    others_listed.wait().await?;
    gpunodes_listed.wait().await?;
    info!("caches ready; starting the AiJob controller");

    let wake = futures::stream::unfold(wake, |w| async move {
        match w {
            Some(mut rx) => rx.recv().await.map(|r| (r, Some(rx))),
            None => futures::future::pending().await,
        }
    });
    // The controller's own cache holds every AiJob; managed fields and the
    // templates of started jobs are most of it, and are rarely read.
    let (aijob_store, aijob_writer) = reflector::store();
    let aijob_stream = watcher(Api::<AiJob>::all(ctx.client.clone()), watcher::Config::default())
        .default_backoff()
        .modify(slim_aijob)
        .reflect(aijob_writer)
        .applied_objects();
    let mut controller = Controller::for_stream(aijob_stream, aijob_store)
        .with_config(ControllerConfig::default().concurrency(settings.concurrency))
        .owns_stream(job_stream);
    if let Some(m) = &ctx.market {
        controller = controller
            .owns_stream(renter_lease_changes(ctx.client.clone(), m))
            .reconcile_on(wake);
        m.attach_aijob_cache(controller.store());
    }
    controller
        .watches_stream(our_pod_stream, |pod: PodView| {
            let name = pod.labels().get(LABEL_AIJOB)?.clone();
            Some(ObjectRef::<AiJob>::new(&name).within(&pod.namespace()?))
        })
        .shutdown_on_signal()
        .run(reconcile, error_policy, ctx)
        .for_each(|res| async move {
            if let Err(e) = res {
                debug!(error = %e, "reconcile failed");
            }
        })
        .await;
    info!("controller stopped");
    Ok(())
}

fn error_policy(aijob: Arc<AiJob>, err: &Error, ctx: Arc<Context>) -> Action {
    if let Error::Finalizer(inner) = err
        && let kube::runtime::finalizer::Error::CleanupFailed(Error::CleanupPending(job)) = inner.as_ref()
    {
        debug!(job = %job, "cleanup in progress");
        return Action::requeue(Duration::from_secs(1));
    }
    warn!(aijob = %aijob.name_any(), namespace = aijob.namespace().unwrap_or_default(), error = %err, "reconcile failed; retrying");
    ctx.metrics.reconcile_error();
    Action::requeue(Duration::from_secs(5))
}

async fn reconcile(aijob: Arc<AiJob>, ctx: Arc<Context>) -> Result<Action, Error> {
    let started = Instant::now();
    let ns = aijob.namespace().ok_or(Error::NoNamespace)?;
    let api: Api<AiJob> = Api::namespaced(ctx.client.clone(), &ns);
    if let Some(action) = accept_traced(&aijob, &api).await? {
        ctx.metrics.reconciled(started.elapsed());
        return Ok(action);
    }
    let span = info_span!(
        "aijob.reconcile",
        aijob = %aijob.name_any(),
        namespace = %ns,
        phase = ?aijob.status.as_ref().and_then(|s| s.phase),
    );
    if let Some(parent) = tracecontext::parent_of(aijob.as_ref()) {
        // Fails only when spans are not exported, when there is nothing to join.
        let _ = span.set_parent(parent);
    }
    let result = finalizer(&api, AIJOB_FINALIZER, aijob, |event| async {
        match event {
            Finalizer::Apply(job) => apply(job, &ctx, &api).await,
            Finalizer::Cleanup(job) => cleanup(job, &ctx).await,
        }
    })
    .instrument(span)
    .await
    .map_err(|e| Error::Finalizer(Box::new(e)));
    ctx.metrics.reconciled(started.elapsed());
    result
}

/// A job seen for the first time while spans are exported: its trace starts
/// here, and the annotation that lets every later reconcile, peer and
/// provider join it goes in the same write that adds the finalizer.
/// None: nothing to do here (already accepted, being deleted, or tracing off).
async fn accept_traced(aijob: &AiJob, api: &Api<AiJob>) -> Result<Option<Action>, Error> {
    let accepted = aijob.finalizers().iter().any(|f| f == AIJOB_FINALIZER);
    if accepted
        || aijob.metadata.deletion_timestamp.is_some()
        || aijob.annotations().contains_key(ANNOTATION_TRACEPARENT)
    {
        return Ok(None);
    }
    let span = info_span!("aijob.accept", aijob = %aijob.name_any(), namespace = aijob.namespace().unwrap_or_default());
    let Some(traceparent) = span.in_scope(tracecontext::current_traceparent) else {
        return Ok(None);
    };
    let patch = accept_patch(aijob, &traceparent);
    match api
        .patch(&aijob.name_any(), &PatchParams::default(), &Patch::Json::<()>(patch))
        .instrument(span)
        .await
    {
        // The write wakes the job again; the finalizer is on from then.
        Ok(_) => Ok(Some(Action::await_change())),
        // The finalizers changed since this (cached) copy: most likely our
        // own accept, which the cache has not caught up with. The finalizer
        // helper reads the object and goes on from what it holds.
        Err(e) if finalizers::is_stale_view(&e) => Ok(None),
        Err(e) => Err(e.into()),
    }
}

/// Adds the finalizer, unless someone changed the list since it was read
/// (the API server then refuses the patch), and the trace annotation.
fn accept_patch(aijob: &AiJob, traceparent: &str) -> json_patch::Patch {
    let mut ops = finalizers::add_ops(aijob.finalizers(), AIJOB_FINALIZER);
    ops.push(if aijob.annotations().is_empty() {
        let value = serde_json::Map::from_iter([(ANNOTATION_TRACEPARENT.to_string(), traceparent.into())]);
        serde_json::json!({"op": "add", "path": "/metadata/annotations", "value": value})
    } else {
        // JSON Pointer writes '/' inside a key as "~1".
        let key = ANNOTATION_TRACEPARENT.replace('~', "~0").replace('/', "~1");
        serde_json::json!({"op": "add", "path": format!("/metadata/annotations/{key}"), "value": traceparent})
    });
    finalizers::json_patch(ops)
}

fn key(ns: &str, name: &str) -> String {
    format!("{ns}/{name}")
}

/// The pods of one AiJob's Job, from the cache.
fn pods_of(ctx: &Context, ns: &str, name: &str) -> Vec<Arc<PodView>> {
    ctx.pods.of_aijob(ns, name)
}

/// Whether the namespace is being deleted (or already is). One GET, asked
/// only when a status would go back, so a steady job costs nothing.
async fn namespace_is_going(ctx: &Context, ns: &str) -> Result<bool, Error> {
    let namespace = Api::<Namespace>::all(ctx.client.clone()).get_opt(ns).await?;
    Ok(namespace.is_none_or(|n| n.metadata.deletion_timestamp.is_some()))
}

async fn apply(aijob: Arc<AiJob>, ctx: &Context, api: &Api<AiJob>) -> Result<Action, Error> {
    // The newest status known: the cache's, or the one this process wrote
    // last when the cache has not caught up with it.
    let aijob = ctx.statuses.freshen(aijob);
    let ns = aijob.namespace().ok_or(Error::NoNamespace)?;
    let name = aijob.name_any();
    let old = aijob.status.clone().unwrap_or_default();
    let job_name = jobbuild::job_name(&aijob);

    // Dereference: the Job and its pods, from the caches.
    let mut job = ctx.jobs.get(&ObjectRef::new(&job_name).within(&ns));
    let placed_before = find(&old.conditions, COND_PLACED).is_some_and(|c| c.status == "True");
    if job.is_none() && placed_before && !in_pool(Some(&old)) {
        // The cache may lag behind our own create; ask the API server itself.
        job = Api::<JobView>::namespaced(ctx.client.clone(), &ns)
            .get_opt(&job_name)
            .await?
            .map(Arc::new);
    }

    // A renter's funds pay only for its own Pool API jobs.
    let payer_refused = match &aijob.spec.payer {
        Some(payer) if !placed_before && !in_pool(Some(&old)) => {
            let namespace = Api::<Namespace>::all(ctx.client.clone()).get_opt(&ns).await?;
            let wallet = namespace
                .as_ref()
                .and_then(|n| n.labels().get(gpupool_crds::LABEL_RENTER_WALLET).cloned());
            crate::payer::refusal(payer, aijob.spec.placement.mode, &ns, wallet.as_deref())
        }
        _ => None,
    };

    // Validate, build, apply.
    let need = match payer_refused {
        Some(message) => Err(message),
        None => Need::from_spec(&aijob.spec.gpus).map_err(|e| e.to_string()),
    };
    let outcome = match need {
        Err(message) => Outcome::Invalid { message },
        Ok(need) => match job {
            Some(job) => {
                let pods = pods_of(ctx, &ns, &name);
                let observed = observe(&job, &pods.iter().map(AsRef::as_ref).collect::<Vec<_>>());
                if observed.node.is_some() {
                    ctx.promised.release(&key(&ns, &name));
                }
                let runs_on = RunsOn {
                    org: ctx.settings.org.clone(),
                    peer_id: None,
                    namespace: ns.clone(),
                    job: job_name.clone(),
                    gpu_product: old.runs_on.as_ref().and_then(|r| r.gpu_product.clone()),
                };
                Outcome::Local {
                    runs_on,
                    observed,
                    created_now: false,
                }
            }
            None if old.phase.is_some_and(|p| p.is_terminal()) => return Ok(Action::await_change()),
            None if in_pool(Some(&old)) && ctx.market.is_some() => remote(&aijob, &need, ctx).await?,
            None if placed_before => Outcome::JobLost {
                job: format!("{ns}/{job_name}"),
            },
            None => match place(&aijob, &need, ctx).await? {
                Outcome::Waiting { .. }
                    if ctx.market.is_some() && aijob.spec.placement.mode != PlacementMode::LocalOnly =>
                {
                    remote(&aijob, &need, ctx).await?
                }
                o => o,
            },
        },
    };
    if goes_back(&old, &outcome) && namespace_is_going(ctx, &ns).await? {
        // Its pods and Job went first; the AiJob's own deletion comes next and
        // wakes this controller again, so there is nothing to write.
        debug!(namespace = %ns, aijob = %name, "the namespace is being deleted; keeping the last status");
        return Ok(Action::await_change());
    }
    observe_placement(&aijob, &old, &outcome, ctx);

    // Update status, only when something changed: a steady job costs no writes.
    let (status, events) = plan(&old, aijob.metadata.generation, &outcome, Timestamp::now());
    if status != old {
        let written = patch_status(api, &name, &status).await?;
        ctx.statuses.wrote(
            aijob.metadata.uid.as_deref().unwrap_or_default(),
            written.metadata.resource_version.as_deref(),
            written.status.unwrap_or_default(),
        );
        // A workload run for another organisation's lease: its renter waits on this.
        if status.phase != old.phase
            && aijob.labels().contains_key(LABEL_LEASE)
            && let Some(m) = &ctx.market
        {
            m.workload_changed(&ns, status.clone());
        }
    }
    let reference = aijob.object_ref(&());
    for e in events {
        let ev = KubeEvent {
            type_: if e.warning {
                EventType::Warning
            } else {
                EventType::Normal
            },
            reason: e.reason,
            note: Some(e.note.chars().take(1000).collect()),
            action: e.action.into(),
            secondary: None,
        };
        if let Err(err) = ctx.recorder.publish(&ev, &reference).await {
            warn!(aijob = %name, error = %err, "could not publish event");
        }
    }

    Ok(match (&outcome, status.phase) {
        (Outcome::Remote(r), _) => r.requeue.map_or_else(Action::await_change, Action::requeue),
        (Outcome::Waiting { .. }, _) => Action::requeue(ctx.settings.wait_requeue),
        (_, Some(p)) if p.is_terminal() => Action::await_change(),
        _ => Action::requeue(Duration::from_secs(300)),
    })
}

/// Places the job in the pool (or carries its placement there one step further).
async fn remote(aijob: &AiJob, need: &Need, ctx: &Context) -> Result<Outcome, Error> {
    match &ctx.market {
        Some(m) => Ok(Outcome::Remote(m.reconcile_remote(aijob, need).await?)),
        None => Ok(Outcome::Waiting {
            reason: crate::placement::REASON_POOL_ONLY,
            message: "this cluster is not a member of a pool".into(),
        }),
    }
}

/// Placement latency as users feel it: from the AiJob's creation to the lease
/// being active and to the pod running in another organisation.
fn observe_placement(aijob: &AiJob, old: &AiJobStatus, outcome: &Outcome, ctx: &Context) {
    let Outcome::Remote(r) = outcome else { return };
    let Some(created) = aijob.metadata.creation_timestamp.as_ref() else {
        return;
    };
    let secs = Timestamp::now().duration_since(created.0).as_secs_f64().max(0.0);
    let old_reason = find(&old.conditions, COND_PLACED).map(|c| c.reason.as_str());
    if r.reason == "LeaseActive"
        && old_reason != Some("LeaseActive")
        && old.phase != Some(gpupool_crds::AiJobPhase::Running)
    {
        ctx.metrics.placement("lease_active", secs);
    }
    if r.phase == gpupool_crds::AiJobPhase::Running && old.phase != Some(gpupool_crds::AiJobPhase::Running) {
        ctx.metrics.placement("pod_running", secs);
    }
}

/// Decides and, when it fits, creates the Job.
async fn place(aijob: &AiJob, need: &Need, ctx: &Context) -> Result<Outcome, Error> {
    let ns = aijob.namespace().ok_or(Error::NoNamespace)?;
    let name = aijob.name_any();
    let me = key(&ns, &name);
    // Counting GPUs before every pod is in the caches would place onto GPUs
    // that are taken.
    ctx.pods.wait_until_ready().await.map_err(|_| Error::PodCacheStopped)?;
    // Decide and promise under the decision lock; create the Job outside it,
    // so placements are serialised only for the in-memory bookkeeping.
    let (node, product, products) = {
        let mut local = ctx.promised.decide();
        local.retain(|_, r| r.at.elapsed() < LOCAL_TTL);
        // A promise ends once its pod shows up bound in the cache: one index
        // lookup per placement in flight, not a walk over every pod.
        local.retain(|k, _| {
            let Some((rns, rname)) = k.split_once('/') else {
                return true;
            };
            !ctx.pods
                .of_aijob(rns, rname)
                .iter()
                .any(|p| p.is_live() && p.node_name.is_some())
        });
        // Some: both caches have listed (awaited above), and stay listed.
        let pods = ctx.pods.live().unwrap_or_default();
        let mut nodes = inventory(
            &ctx.gpunodes.state(),
            &pods,
            &promised::by_node(&local),
            Timestamp::now(),
        );
        ctx.metrics.observe_inventory(&nodes);
        // The market's bids and accepted leases hold GPUs too, except the
        // lease this job is the workload of (its own namespace).
        let pool = match &ctx.market {
            Some(m) => {
                let mut skip = promised::namespaces(&local);
                skip.insert(ns.as_str());
                m.pool_promises(&promised::bound_namespaces(&pods), &skip)
            }
            None => vec![],
        };
        let held = promised::spread(&nodes, &pool);
        for n in &mut nodes {
            n.allocated += held.get(&n.node).copied().unwrap_or(0);
        }
        match decide(need, aijob.spec.placement.mode, &nodes) {
            Decision::Wait { reason, message } => {
                return Ok(Outcome::Waiting {
                    reason,
                    message: with_pool_promises(message, reason, need, &pool),
                });
            }
            Decision::Local {
                node,
                product,
                products,
            } => {
                local.insert(
                    me.clone(),
                    LocalPromise {
                        node: node.clone(),
                        gpus: need.count,
                        at: Instant::now(),
                    },
                );
                (node, product, products)
            }
        }
    };

    // Started before and lost its Job: the cache may have elided the template.
    let api = Api::<AiJob>::namespaced(ctx.client.clone(), &ns);
    let full = crate::cache::with_template(aijob, &api).await?;
    let job = jobbuild::build(&full, need, &products)?;
    let api: Api<Job> = Api::namespaced(ctx.client.clone(), &ns);
    let pp = PostParams {
        field_manager: Some(FIELD_MANAGER.into()),
        ..Default::default()
    };
    match api.create(&pp, &job).await {
        Ok(_) => {
            info!(aijob = %name, namespace = %ns, node = %node, gpus = need.count, product = %product, "created Job");
            ctx.metrics.placed_locally();
        }
        // Same deterministic name: the Job is already there, which is fine.
        Err(kube::Error::Api(s)) if s.code == 409 => debug!(aijob = %name, "Job already exists"),
        Err(e) => {
            ctx.promised.release(&me);
            return Err(e.into());
        }
    }
    Ok(Outcome::Local {
        runs_on: RunsOn {
            org: ctx.settings.org.clone(),
            peer_id: None,
            namespace: ns,
            job: jobbuild::job_name(aijob),
            gpu_product: Some(product),
        },
        observed: crate::jobstatus::Observation {
            phase: gpupool_crds::AiJobPhase::Pending,
            reason: "PodStarting".into(),
            message: "the Job was created; waiting for its pod".into(),
            node: None,
            exit_code: None,
            start_time: None,
            completion_time: None,
        },
        created_now: true,
    })
}

/// A job that waits for GPUs the pool holds here says so: without it, "the
/// most free now is 0" beside idle nodes reads like a counting error.
fn with_pool_promises(message: String, reason: &str, need: &Need, pool: &[PoolPromise]) -> String {
    let held: u32 = pool
        .iter()
        .filter(|p| crate::matching::product_matches(&need.models, &p.product))
        .map(|p| p.count)
        .sum();
    if reason != crate::placement::REASON_INSUFFICIENT || held == 0 {
        return message;
    }
    format!(
        "{message} {held} matching GPU(s) here are promised to other organisations (open bids and accepted leases)."
    )
}

/// Deletes the Job (foreground, so its pods go first) and holds the finalizer
/// until the Job is gone: when the AiJob disappears, nothing of it runs.
async fn cleanup(aijob: Arc<AiJob>, ctx: &Context) -> Result<Action, Error> {
    let ns = aijob.namespace().ok_or(Error::NoNamespace)?;
    let name = aijob.name_any();
    ctx.promised.release(&key(&ns, &name));
    ctx.statuses.forget(aijob.metadata.uid.as_deref().unwrap_or_default());
    // In the pool: deleting our Lease closes it on chain as RenterCancelled
    // (its finalizer), which the provider sees and stops the workload for.
    // The status may lag a lease just created, so the leases labelled with
    // this job count too.
    {
        let leases: Api<Lease> = Api::namespaced(ctx.client.clone(), &ns);
        let mut names = BTreeSet::new();
        if ctx.market.is_some() {
            let labelled = leases
                .list(&ListParams::default().labels(&format!("{LABEL_AIJOB}={name}")))
                .await?;
            names.extend(labelled.items.iter().map(|l| l.name_any()));
        }
        names.extend(
            aijob
                .status
                .as_ref()
                .and_then(|s| s.order.as_ref())
                .and_then(|o| o.lease.clone()),
        );
        let mut pending = Vec::new();
        for lease in names {
            if let Some(l) = leases.get_opt(&lease).await? {
                if l.metadata.deletion_timestamp.is_none() {
                    if delete_unless_gone(&leases, &lease, &DeleteParams::default()).await? == Deleted::AlreadyGone {
                        continue;
                    }
                    info!(aijob = %name, namespace = %ns, lease = %lease, "AiJob deleted: cancelling its lease");
                }
                pending.push(lease);
            }
        }
        if !pending.is_empty() {
            return Err(Error::CleanupPending(format!("{ns}/{} (lease)", pending.join(","))));
        }
    }
    let api: Api<Job> = Api::namespaced(ctx.client.clone(), &ns);
    let job_name = jobbuild::job_name(&aijob);
    match api.get_opt(&job_name).await? {
        None => {
            info!(aijob = %name, namespace = %ns, "cleanup done");
            Ok(Action::await_change())
        }
        Some(job) => {
            if job.metadata.deletion_timestamp.is_none() {
                let dp = DeleteParams {
                    propagation_policy: Some(PropagationPolicy::Foreground),
                    ..Default::default()
                };
                if delete_unless_gone(&api, &job_name, &dp).await? == Deleted::AlreadyGone {
                    info!(aijob = %name, namespace = %ns, "cleanup done");
                    return Ok(Action::await_change());
                }
                info!(aijob = %name, namespace = %ns, job = %job_name, "deleting Job");
            }
            // An error keeps the finalizer; the Job's and pods' deletions
            // trigger the next check, and error_policy retries soon anyway.
            Err(Error::CleanupPending(format!("{ns}/{job_name}")))
        }
    }
}

async fn patch_status(api: &Api<AiJob>, name: &str, status: &AiJobStatus) -> Result<AiJob, Error> {
    Ok(crate::ssa::apply_status(api, name, FIELD_MANAGER, status).await?)
}

#[cfg(test)]
mod tests {
    use super::*;

    const TP: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    fn patched(aijob: &AiJob) -> Result<AiJob, json_patch::PatchError> {
        let mut doc = serde_json::to_value(aijob).unwrap();
        // The API server reads a missing list as null for the test op.
        if aijob.metadata.finalizers.is_none() {
            doc["metadata"]["finalizers"] = serde_json::Value::Null;
        }
        json_patch::patch(&mut doc, &accept_patch(aijob, TP))?;
        Ok(serde_json::from_value(doc).unwrap())
    }

    #[test]
    fn accepting_adds_the_finalizer_and_the_trace_in_one_patch() {
        let fresh = crate::jobbuild::tests::aijob();
        let done = patched(&fresh).unwrap();
        assert_eq!(done.finalizers(), [AIJOB_FINALIZER]);
        assert_eq!(
            done.annotations().get(ANNOTATION_TRACEPARENT).map(String::as_str),
            Some(TP)
        );

        // Others' finalizers and annotations stay as they were.
        let mut theirs = fresh.clone();
        theirs.metadata.finalizers = Some(vec!["example.com/keep".into()]);
        theirs.metadata.annotations = Some([("team".to_string(), "nlp".to_string())].into());
        let done = patched(&theirs).unwrap();
        assert_eq!(done.finalizers(), ["example.com/keep", AIJOB_FINALIZER]);
        assert_eq!(done.annotations().get("team").map(String::as_str), Some("nlp"));
        assert_eq!(
            done.annotations().get(ANNOTATION_TRACEPARENT).map(String::as_str),
            Some(TP)
        );

        // A finalizer list that changed since it was read fails the test op,
        // as the API server would refuse it.
        let patch = accept_patch(&fresh, TP);
        let mut moved = serde_json::to_value(&theirs).unwrap();
        assert!(json_patch::patch(&mut moved, &patch).is_err());
    }
}

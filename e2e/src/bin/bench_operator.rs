//! The operator placing many AiJobs at once on one cluster's simulated
//! nodes: time until every Job exists, time until every AiJob is Running,
//! API requests per AiJob (from the API server's audit log), operator RSS,
//! and once every job runs, the operator's CPU and API requests while
//! nothing changes (the steady state DESIGN.md wants near zero).

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use clap::Parser;
use futures::StreamExt;
use gpupool_crds::{AiJob, AiJobPhase, GpuDevice, GpuNode, GpuNodeStatus};
use gpupool_e2e::bench::{Figure, cpu_seconds, memory_kib, write};
use gpupool_e2e::cluster::{ClusterInfo, free_port, simulated_node, simulated_node_status, spawn, stop};
use gpupool_e2e::env::{TestEnv, default_root};
use gpupool_e2e::harness::{aijob_json, namespace};
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::Node;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::Client;
use kube::api::{Api, Patch, PatchParams, PostParams};
use kube::runtime::{WatchStreamExt, reflector, watcher};

#[derive(Parser)]
struct Args {
    #[arg(long)]
    operator: std::path::PathBuf,
    #[arg(long, default_value_t = 1000)]
    jobs: usize,
    #[arg(long, default_value = "target/bench/operator.json")]
    out: std::path::PathBuf,
    /// How long to wait for every AiJob to run before measuring anyway. At
    /// 10,000 jobs on two cores the API server needs about half an hour.
    #[arg(long, default_value_t = 600)]
    window_seconds: u64,
    /// How long to watch the settled operator once every AiJob runs. Running
    /// jobs are looked at again every 5 minutes, spread over the run, so a
    /// couple of minutes samples that work fairly.
    #[arg(long, default_value_t = 120)]
    idle_seconds: u64,
}

const GPUS_PER_NODE: u32 = 8;
const PRODUCT: &str = "NVIDIA H100 80GB HBM3";

/// Extra simulated nodes, with the GpuNodes an agent would write for them
/// (one agent process per node would measure the agents, not the operator).
async fn add_nodes(client: &Client, count: usize) -> anyhow::Result<Vec<String>> {
    let nodes: Api<Node> = Api::all(client.clone());
    let gpunodes: Api<GpuNode> = Api::all(client.clone());
    let names: Vec<String> = (0..count).map(|i| format!("bench-h100-{i}")).collect();
    futures::stream::iter(names.clone())
        .for_each_concurrent(16, |name| {
            let (nodes, gpunodes) = (nodes.clone(), gpunodes.clone());
            async move {
                let node = simulated_node(
                    &name,
                    serde_json::json!({
                        gpupool_crds::LABEL_GPU_PRODUCT: gpupool_crds::product_label_value(PRODUCT),
                        gpupool_crds::LABEL_GPU_MEMORY_MIB: "81559",
                    }),
                )
                .expect("node");
                let _ = nodes.create(&PostParams::default(), &node).await;
                let status = simulated_node_status(GPUS_PER_NODE);
                let _ = nodes
                    .patch_status(&name, &PatchParams::default(), &Patch::Merge(&status))
                    .await;
                let _ = write_gpunode(&gpunodes, &name).await;
            }
        })
        .await;
    Ok(names)
}

async fn write_gpunode(api: &Api<GpuNode>, name: &str) -> Result<(), kube::Error> {
    let gpus = (0..GPUS_PER_NODE)
        .map(|i| GpuDevice {
            index: i,
            uuid: format!("GPU-{name}-{i}"),
            product: PRODUCT.into(),
            memory_mib: 81559,
            ..Default::default()
        })
        .collect();
    let status = GpuNodeStatus {
        backend: Some("simulated".into()),
        gpus,
        product: Some(PRODUCT.into()),
        gpus_total: GPUS_PER_NODE as i32,
        gpus_healthy: GPUS_PER_NODE as i32,
        gpus_free: GPUS_PER_NODE as i32,
        last_heartbeat: Some(Time(k8s_openapi::jiff::Timestamp::now())),
        ..Default::default()
    };
    let pp = PatchParams::apply("gpupool-bench").force();
    api.patch(name, &pp, &Patch::Apply(serde_json::json!({"apiVersion": "gpupool.dev/v1alpha1", "kind": "GpuNode", "metadata": {"name": name}, "spec": {"nodeName": name}}))).await?;
    api.patch_status(name, &pp, &Patch::Apply(serde_json::json!({"apiVersion": "gpupool.dev/v1alpha1", "kind": "GpuNode", "metadata": {"name": name}, "status": status}))).await?;
    Ok(())
}

/// The operator's requests by verb, over the whole audit log.
fn operator_requests(org: &ClusterInfo) -> anyhow::Result<BTreeMap<String, u64>> {
    let mut by_verb = BTreeMap::new();
    for (kind, n) in gpupool_e2e::bench::operator_requests(&org.dir, None) {
        let verb = kind.split_once(' ').map_or(kind.as_str(), |(v, _)| v).to_string();
        *by_verb.entry(verb).or_default() += n;
    }
    Ok(by_verb)
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let env = TestEnv::load(&default_root())?;
    let org = env
        .orgs
        .iter()
        .find(|o| o.org.fleet.product == PRODUCT)
        .unwrap_or(&env.orgs[0])
        .clone();
    let client = gpupool_e2e::cluster::client_for(&org.admin_kubeconfig).await?;
    let node_count = args.jobs.div_ceil(GPUS_PER_NODE as usize);
    let names = add_nodes(&client, node_count).await?;
    // Keep the GpuNodes' heartbeats fresh for the run, as agents would.
    let gpunodes: Api<GpuNode> = Api::all(client.clone());
    let refresher = tokio::spawn(async move {
        loop {
            tokio::time::sleep(Duration::from_secs(60)).await;
            for n in &names {
                let _ = write_gpunode(&gpunodes, n).await;
            }
        }
    });
    tokio::time::sleep(Duration::from_secs(5)).await; // kwok marks the new nodes Ready

    let metrics_port = free_port()?;
    let pid = spawn(
        &args.operator,
        &[
            format!("--org={}", org.org.name),
            format!("--metrics-addr=127.0.0.1:{metrics_port}"),
            "--concurrency=32".into(),
        ],
        &[("KUBECONFIG", &org.operator_kubeconfig)],
        &org.dir.join("logs/bench-operator.log"),
    )?;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let before = operator_requests(&org)?.values().sum::<u64>();
    let ns = namespace(&client, "bench").await;

    let aijobs: Api<AiJob> = Api::namespaced(client.clone(), &ns);
    let start = Instant::now();
    futures::stream::iter(0..args.jobs)
        .for_each_concurrent(32, |i| {
            let aijobs = aijobs.clone();
            async move {
                let j: AiJob = serde_json::from_value(aijob_json(
                    &format!("job-{i:05}"),
                    1,
                    &["H100"],
                    "3600s",
                    serde_json::json!({}),
                ))
                .expect("aijob");
                if let Err(e) = aijobs.create(&PostParams::default(), &j).await {
                    eprintln!("create job-{i}: {e}");
                }
            }
        })
        .await;
    let submitted = start.elapsed().as_secs_f64();
    // Count from watches, not repeated LISTs: polling 1000 full AiJobs
    // twice a second would load the API server more than the operator does.
    let (job_store, job_writer) = reflector::store::<Job>();
    let (aijob_store, aijob_writer) = reflector::store::<AiJob>();
    let jobs_api: Api<Job> = Api::namespaced(client.clone(), &ns);
    tokio::spawn(
        watcher(jobs_api, watcher::Config::default())
            .reflect(job_writer)
            .for_each(|_| async {}),
    );
    tokio::spawn(
        watcher(aijobs.clone(), watcher::Config::default())
            .reflect(aijob_writer)
            .for_each(|_| async {}),
    );
    let deadline = Duration::from_secs(args.window_seconds);
    let mut all_jobs = None;
    let mut all_running = None;
    // Settled: every AiJob Running, or finished. Under a saturated machine
    // kwok's node heartbeats can lag, the node lifecycle controller taints a
    // node NotReady and evicts its pods, and those jobs fail (a job is never
    // started twice); they no longer change either.
    let mut all_settled = None;
    while start.elapsed() < deadline && all_settled.is_none() {
        if all_jobs.is_none() && job_store.state().len() >= args.jobs {
            all_jobs = Some(start.elapsed().as_secs_f64());
        }
        let phases: Vec<Option<AiJobPhase>> = aijob_store
            .state()
            .iter()
            .map(|j| j.status.as_ref().and_then(|s| s.phase))
            .collect();
        let running = phases.iter().filter(|p| **p == Some(AiJobPhase::Running)).count();
        let settled = phases
            .iter()
            .filter(|p| {
                matches!(
                    p,
                    Some(AiJobPhase::Running | AiJobPhase::Succeeded | AiJobPhase::Failed)
                )
            })
            .count();
        if running >= args.jobs {
            all_running = Some(start.elapsed().as_secs_f64());
        }
        if settled >= args.jobs {
            all_settled = Some(start.elapsed().as_secs_f64());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Let the operator settle, then measure what it holds and what it asked.
    tokio::time::sleep(Duration::from_secs(10)).await;
    let (rss, peak) = memory_kib(pid)?;
    // What the operator held when measured: at 10,000 AiJobs the window
    // ends before every job is placed, and memory grows with what is.
    let jobs_existing = job_store.state().len();
    let count = |phase| {
        aijob_store
            .state()
            .iter()
            .filter(|j| j.status.as_ref().and_then(|s| s.phase) == Some(phase))
            .count()
    };
    let (aijobs_running, aijobs_failed) = (count(AiJobPhase::Running), count(AiJobPhase::Failed));
    let by_verb = operator_requests(&org)?;
    let total = by_verb.values().sum::<u64>() - before;
    // The steady state: only meaningful once every job has settled.
    let idle = match all_settled {
        Some(_) => {
            let (cpu0, t0) = (cpu_seconds(pid)?, Instant::now());
            tokio::time::sleep(Duration::from_secs(args.idle_seconds)).await;
            let (cpu1, took) = (cpu_seconds(pid)?, t0.elapsed().as_secs_f64());
            let requests = operator_requests(&org)?.values().sum::<u64>() - before - total;
            Some(((cpu1 - cpu0) / took * 100.0, requests as f64 / took))
        }
        None => {
            println!("not every AiJob settled within the window: no steady-state figures");
            None
        }
    };
    stop(&[pid]);
    refresher.abort();

    let conditions = serde_json::json!({
        "aijobs": args.jobs, "gpus_per_aijob": 1, "nodes": node_count, "gpus_per_node": GPUS_PER_NODE,
        "submit_concurrency": 32, "submit_seconds": submitted, "operator_concurrency": 32, "window_seconds": args.window_seconds,
        "cluster": "real kube-apiserver + kcm + scheduler + kwok on loopback, 2 cores shared with the operator",
        "requests_by_verb_total_run": by_verb,
        "jobs_existing_when_measured": jobs_existing, "aijobs_running_when_measured": aijobs_running,
        "aijobs_failed_when_measured": aijobs_failed, "all_settled_seconds": all_settled,
    });
    let mut figures = vec![
        Figure::new(
            "operator_all_jobs_exist",
            all_jobs.unwrap_or(f64::NAN),
            "s",
            conditions.clone(),
        ),
        Figure::new(
            "operator_all_aijobs_running",
            all_running.unwrap_or(f64::NAN),
            "s",
            conditions.clone(),
        ),
        Figure::new(
            "operator_api_requests_per_aijob",
            total as f64 / args.jobs as f64,
            "requests",
            conditions.clone(),
        ),
        Figure::new("operator_rss", rss as f64 / 1024.0, "MiB", conditions.clone()),
        Figure::new("operator_peak_rss", peak as f64 / 1024.0, "MiB", conditions.clone()),
    ];
    let idle_conditions = serde_json::json!({
        "aijobs_running": args.jobs, "idle_seconds": args.idle_seconds,
        "what": "utime+stime of the operator process, and its requests in the API server's audit log, after every AiJob is Running (or Failed, see the run's conditions) and nothing changes but the GpuNode heartbeats (every 60 s)",
        "run": conditions,
    });
    if let Some((cpu_pct, rps)) = idle {
        println!(
            "steady state over {} s: {cpu_pct:.2} % of a core, {rps:.2} API requests/s",
            args.idle_seconds
        );
        figures.push(Figure::new(
            "operator_steady_cpu",
            cpu_pct,
            "% of a core",
            idle_conditions.clone(),
        ));
        figures.push(Figure::new(
            "operator_steady_api_requests",
            rps,
            "requests/s",
            idle_conditions,
        ));
    }
    write(&args.out, &figures)
}

//! Cross-organisation placement on three real clusters and anvil: from apply
//! to lease Active to pod Running in another organisation, per job (p50/p99),
//! and the sustained rate of such placements. Writes JSON figures.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use clap::Parser;
use futures::StreamExt;
use gpupool_crds::{AiJob, AiJobPhase, Bid, Lease, LeaseState};
use gpupool_e2e::bench::{Figure, cpu_between, cpu_by_component, operator_requests, write};
use gpupool_e2e::env::{TestEnv, default_root};
use gpupool_e2e::harness::{admin, aijob_json, namespace, remove_namespace};
use gpupool_e2e::pool::{Lends, Pool};
use k8s_openapi::api::core::v1::{ConfigMap, Event, Namespace};
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Client, ResourceExt};
use tokio::sync::Mutex;

#[derive(Parser)]
struct Args {
    /// Jobs in the latency run (applied at a steady rate).
    #[arg(long, default_value_t = 100)]
    jobs: usize,
    /// Jobs applied per second in the latency run; 0 applies each job when
    /// the previous one runs (latency without reservation contention).
    #[arg(long, default_value_t = 0.0)]
    rate: f64,
    /// Jobs in the burst run (applied at once).
    #[arg(long, default_value_t = 100)]
    burst: usize,
    /// Long jobs held Running for the steady-state run, after the burst (0: none).
    #[arg(long, default_value_t = 0)]
    steady: usize,
    /// How long the steady-state run measures, once its jobs have run for
    /// a minute. The providers' first withdrawal comes a withdraw period
    /// (300 s by default) after each open: a window shorter than that
    /// leaves it out.
    #[arg(long, default_value_t = 120)]
    steady_seconds: u64,
    #[arg(long, default_value = "target/bench/pool.json")]
    out: std::path::PathBuf,
    /// More operator flags, for comparing settings run to run (recorded in
    /// the figures' conditions).
    #[arg(long = "operator-flag")]
    operator_flags: Vec<String>,
}

#[derive(Default, Clone, Copy)]
struct Times {
    applied: Option<Instant>,
    active: Option<Instant>,
    running: Option<Instant>,
}

type Book = std::sync::Arc<Mutex<HashMap<String, Times>>>;

/// Watches AiJobs and Leases in `ns` and notes when each job's lease became
/// Active and its pod Running.
fn watch(client: &Client, ns: &str, book: Book) {
    let jobs: Api<AiJob> = Api::namespaced(client.clone(), ns);
    let b = book.clone();
    tokio::spawn(async move {
        let mut s = watcher(jobs, watcher::Config::default()).applied_objects().boxed();
        while let Some(Ok(j)) = s.next().await {
            let phase = j.status.as_ref().and_then(|s| s.phase);
            if matches!(phase, Some(AiJobPhase::Running) | Some(AiJobPhase::Succeeded)) {
                let mut b = b.lock().await;
                let t = b.entry(j.name_any()).or_default();
                t.running.get_or_insert_with(Instant::now);
            }
        }
    });
    let leases: Api<Lease> = Api::namespaced(client.clone(), ns);
    tokio::spawn(async move {
        let mut s = watcher(leases, watcher::Config::default()).applied_objects().boxed();
        while let Some(Ok(l)) = s.next().await {
            let state = l.status.as_ref().and_then(|s| s.state);
            if matches!(state, Some(LeaseState::Active) | Some(LeaseState::Closed))
                && let Some(job) = l.spec.ai_job.clone()
            {
                let mut b = book.lock().await;
                b.entry(job).or_default().active.get_or_insert_with(Instant::now);
            }
        }
    });
}

fn pct(v: &mut [f64], p: f64) -> f64 {
    gpupool_e2e::bench::percentile(v, p)
}

fn job(name: &str) -> serde_json::Value {
    aijob_json(
        name,
        1,
        &["A100", "L40S"],
        "1s",
        serde_json::json!({"maxPricePerGpuHour": "3", "placement": {"mode": "PoolOnly"}, "bidding": {"window": "300ms"}}),
    )
}

async fn wait_all(book: &Book, names: &[String], limit: Duration) -> usize {
    let start = Instant::now();
    loop {
        let done = {
            let b = book.lock().await;
            names
                .iter()
                .filter(|n| b.get(*n).and_then(|t| t.running).is_some())
                .count()
        };
        if done == names.len() || start.elapsed() > limit {
            return done;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// CPU the renter's API server spends on one request of each kind the
/// operators make most, one request at a time, before the operators start
/// (nothing else writes then). A placement's API requests times these is
/// most of its CPU: the figure that says what a rate of placements needs.
async fn request_costs(env: &TestEnv, client: &Client, org: &str) -> anyhow::Result<Figure> {
    const N: u32 = 200;
    let component = format!("kube-apiserver {org}");
    let cpu = || cpu_by_component(&env.root).get(&component).copied().unwrap_or(0.0);
    let ns = namespace(client, "bench-requests").await;
    let jobs: Api<AiJob> = Api::namespaced(client.clone(), &ns);
    jobs.create(&PostParams::default(), &serde_json::from_value(job("cost"))?)
        .await?;
    let bids: Api<Bid> = Api::namespaced(client.clone(), &ns);
    let bid: Bid = serde_json::from_value(serde_json::json!({
        "apiVersion": "gpupool.dev/v1alpha1", "kind": "Bid", "metadata": {"name": "cost"},
        "spec": {"aiJob": "cost", "orderId": "o", "providerPeerId": "p", "providerOrg": "bravo",
                 "pricePerGpuHour": "2", "gpuProduct": "A100", "gpuCount": 1, "expiresAt": "2030-01-01T00:00:00Z"}
    }))?;
    bids.create(&PostParams::default(), &bid).await?;
    let events: Api<Event> = Api::namespaced(client.clone(), &ns);
    let maps: Api<ConfigMap> = Api::namespaced(client.clone(), &ns);
    maps.create(
        &PostParams::default(),
        &serde_json::from_value(serde_json::json!({"metadata": {"name": "cost"}, "data": {"a": "0"}}))?,
    )
    .await?;
    let ssa = PatchParams::apply("gpupool-bench").force();
    let status = |kind: &str, i: u32| {
        Patch::Apply(
            serde_json::json!({"apiVersion": "gpupool.dev/v1alpha1", "kind": kind, "status": {"message": format!("m{i}")}}),
        )
    };
    let mut per_request = serde_json::Map::new();
    let mut note = |what: &str, before: f64, after: f64| {
        per_request.insert(
            what.into(),
            serde_json::json!(((after - before) * 1e4 / f64::from(N)).round() / 10.0),
        );
    };
    let t = cpu();
    for i in 0..N {
        jobs.patch_status("cost", &ssa, &status("AiJob", i)).await?;
    }
    note("patch aijobs/status (server-side apply)", t, cpu());
    let t = cpu();
    for i in 0..N {
        bids.patch_status("cost", &ssa, &status("Bid", i)).await?;
    }
    note("patch bids/status (server-side apply)", t, cpu());
    let t = cpu();
    for i in 0..N {
        let patch = serde_json::json!({"data": {"a": i.to_string()}});
        maps.patch("cost", &PatchParams::default(), &Patch::Merge(&patch))
            .await?;
    }
    note("patch configmaps (merge, a core resource)", t, cpu());
    let t = cpu();
    for i in 0..N {
        let ev: Event = serde_json::from_value(serde_json::json!({
            "metadata": {"generateName": "cost-"}, "reason": "Bench", "message": format!("m{i}"), "type": "Normal",
            "involvedObject": {"apiVersion": "gpupool.dev/v1alpha1", "kind": "AiJob", "name": "cost", "namespace": ns}
        }))?;
        events.create(&PostParams::default(), &ev).await?;
    }
    note("create events", t, cpu());
    let t = cpu();
    for _ in 0..N {
        jobs.get("cost").await?;
    }
    note("get aijobs", t, cpu());
    // Gone before the operators start: found lingering, its job was ordered
    // and its namespace's deletion loaded the burst measured next.
    remove_namespace(client, &ns).await;
    let mean = per_request.values().filter_map(|v| v.as_f64()).sum::<f64>() / per_request.len().max(1) as f64;
    Ok(Figure::new(
        "apiserver_cpu_ms_per_request",
        mean,
        "cpu-ms",
        serde_json::json!({"by_kind": per_request, "requests_each": N, "org": org, "figure": "mean over the kinds",
            "measured": "utime+stime of the organisation's kube-apiserver across N sequential requests of one kind over one client connection, before the operators start"}),
    ))
}

/// What running pool leases cost while nothing about them changes: `n`
/// one-GPU jobs that run for hours, measured over `seconds` once every one
/// has run for a minute. Each organisation's API server takes its writes
/// whether a lease is new or a day old, so this is the figure that bounds
/// how many leases a control plane can hold, where the burst bounds how
/// fast it can place them.
async fn steady_state(
    env: &TestEnv,
    acme: &Client,
    n: usize,
    seconds: u64,
    operator_flags: &str,
) -> anyhow::Result<(String, Vec<Figure>)> {
    let ns = namespace(acme, "bench-steady").await;
    let book: Book = Default::default();
    watch(acme, &ns, book.clone());
    let api: Api<AiJob> = Api::namespaced(acme.clone(), &ns);
    let names: Vec<String> = (0..n).map(|i| format!("steady-{i}")).collect();
    for name in &names {
        let job = aijob_json(
            name,
            1,
            &["A100", "L40S"],
            "3h",
            serde_json::json!({"maxPricePerGpuHour": "3", "maxDuration": "4h", "placement": {"mode": "PoolOnly"}, "bidding": {"window": "300ms"}}),
        );
        api.create(&PostParams::default(), &serde_json::from_value(job)?)
            .await?;
    }
    let running = wait_all(&book, &names, Duration::from_secs(300)).await;
    anyhow::ensure!(running == n, "only {running} of {n} steady jobs reached Running");
    // Past the placement's own writes and the first timed ones.
    tokio::time::sleep(Duration::from_secs(60)).await;
    let cpu_before = cpu_by_component(&env.root);
    let from = k8s_openapi::jiff::Timestamp::now();
    tokio::time::sleep(Duration::from_secs(seconds)).await;
    let to = k8s_openapi::jiff::Timestamp::now();
    let cpu = cpu_between(&cpu_before, &cpu_by_component(&env.root));
    let still = api
        .list(&Default::default())
        .await?
        .items
        .iter()
        .filter(|j| j.status.as_ref().and_then(|s| s.phase) == Some(AiJobPhase::Running))
        .count();
    let minutes = seconds as f64 / 60.0;
    let round = |v: f64| (v * 1000.0).round() / 1000.0;
    // A member's own upkeep (its leader election's renewals, the PoolPeers'
    // last-seen refresh) costs the same with no lease or with 10,000; the
    // rest is what the leases cost.
    let upkeep = |kind: &str| kind.contains(".coordination.k8s.io") || kind.contains("poolpeers");
    let (mut total, mut per_lease) = (0u64, 0u64);
    let mut by_org = serde_json::Map::new();
    for o in &env.orgs {
        let counts = operator_requests(&o.dir, Some((from, to)));
        total += counts.values().sum::<u64>();
        per_lease += counts.iter().filter(|(k, _)| !upkeep(k)).map(|(_, c)| c).sum::<u64>();
        let kinds: serde_json::Map<String, serde_json::Value> = counts
            .iter()
            .map(|(k, c)| (k.clone(), serde_json::json!(round(*c as f64 / minutes))))
            .collect();
        by_org.insert(o.org.name.clone(), serde_json::json!({"per_minute_by_kind": kinds}));
    }
    let cores: f64 = cpu.values().sum::<f64>() / seconds as f64;
    let by_component: serde_json::Map<String, serde_json::Value> = cpu
        .iter()
        .map(|(k, v)| {
            (
                k.clone(),
                serde_json::json!((v * 1000.0 / seconds as f64).round() / 1000.0),
            )
        })
        .collect();
    let cond = serde_json::json!({"leases": n, "running_at_the_end": still, "window_seconds": seconds,
        "job": "1 GPU (A100|L40S), PoolOnly, runs 3 h", "operator_flags": operator_flags,
        "by_org": by_org, "cores_busy_by_component": by_component,
        "per_lease": "every request but the members' upkeep (coordination.k8s.io Leases, PoolPeers), per lease and minute",
        "measured": "operators' requests in each organisation's API-server audit log, and utime+stime of every process, over the window, which starts once every lease has run for a minute"});
    Ok((
        ns,
        vec![
            Figure::new(
                "pool_steady_operator_writes_per_lease_minute",
                round(per_lease as f64 / minutes / n as f64),
                "requests/lease/min",
                cond.clone(),
            ),
            Figure::new(
                "pool_steady_operator_api_requests_per_minute",
                round(total as f64 / minutes),
                "requests/min",
                cond.clone(),
            ),
            Figure::new("pool_steady_cores_busy", cores, "cores", cond),
        ],
    ))
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let env = TestEnv::load(&default_root())?;
    let lends = Lends::every_org();
    // The operators run at their defaults (heartbeat every 2 s, 15 s grace,
    // adverts every 5 s, chain re-read every 30 s), as members would: the
    // tests' sub-second timings multiply the messages and writes per lease,
    // and their 4 s grace takes a busy provider for a failed one.
    let mut figures = Vec::new();
    let acme = admin(env.org("acme").ok_or_else(|| anyhow::anyhow!("no acme"))?).await;
    figures.push(request_costs(&env, &acme, "acme").await?);
    let mut flags = vec!["--concurrency=64".to_string()];
    flags.extend(args.operator_flags.iter().cloned());
    let operator_flags = format!("defaults, {}", flags.join(" "));
    // Returns once every member has heard the others' adverts.
    let _pool = Pool::start_with_flags(&env, "bench", &lends, &flags).await?;

    // Namespaces to delete at the end, while the operators still run.
    let mut made = Vec::new();

    // Latency: jobs at a steady rate, each timed on its own.
    if args.jobs > 0 {
        let ns = namespace(&acme, "bench-latency").await;
        made.push(ns.clone());
        let book: Book = Default::default();
        watch(&acme, &ns, book.clone());
        let api: Api<AiJob> = Api::namespaced(acme.clone(), &ns);
        let names: Vec<String> = (0..args.jobs).map(|i| format!("lat-{i}")).collect();
        for n in &names {
            book.lock().await.entry(n.clone()).or_default().applied = Some(Instant::now());
            api.create(&PostParams::default(), &serde_json::from_value(job(n))?)
                .await?;
            if args.rate > 0.0 {
                tokio::time::sleep(Duration::from_secs_f64(1.0 / args.rate)).await;
            } else {
                wait_all(&book, std::slice::from_ref(n), Duration::from_secs(60)).await;
            }
        }
        let done = wait_all(&book, &names, Duration::from_secs(300)).await;
        let (mut to_active, mut to_running) = (Vec::new(), Vec::new());
        for t in book.lock().await.values() {
            if let (Some(a), Some(x)) = (t.applied, t.active) {
                to_active.push(x.duration_since(a).as_secs_f64() * 1000.0);
            }
            if let (Some(a), Some(x)) = (t.applied, t.running) {
                to_running.push(x.duration_since(a).as_secs_f64() * 1000.0);
            }
        }
        {
            let mut all = to_running.clone();
            all.sort_by(|a, b| a.total_cmp(b));
            let tail: Vec<String> = all.iter().rev().take(5).map(|v| format!("{v:.0}")).collect();
            eprintln!("apply → Running, slowest five (ms): {}", tail.join(", "));
        }
        let cond = serde_json::json!({
            "jobs": args.jobs, "reached_running": done, "applied_per_second": if args.rate > 0.0 { serde_json::json!(args.rate) } else { serde_json::json!("one at a time") }, "orgs": 3,
            "job": "1 GPU (A100|L40S), PoolOnly, bid window 300ms, runs 1s", "chain": "anvil automine, 1 confirmation",
            "operator_flags": operator_flags,
            "clusters": "kube-apiserver + kwok per org on loopback", "operator": "debug or release per GPUPOOL_GPUPOOL_OPERATOR_BIN",
            "targets": "p50 <= 1500 ms, p99 <= 5000 ms"
        });
        figures.push(Figure::new(
            "pool_apply_to_lease_active_p50",
            pct(&mut to_active, 50.0),
            "ms",
            cond.clone(),
        ));
        figures.push(Figure::new(
            "pool_apply_to_lease_active_p99",
            pct(&mut to_active, 99.0),
            "ms",
            cond.clone(),
        ));
        figures.push(Figure::new(
            "pool_apply_to_pod_running_p50",
            pct(&mut to_running, 50.0),
            "ms",
            cond.clone(),
        ));
        figures.push(Figure::new(
            "pool_apply_to_pod_running_p99",
            pct(&mut to_running, 99.0),
            "ms",
            cond,
        ));
    }

    // Throughput: a burst, placed as fast as the pool can.
    if args.burst > 0 {
        let ns = namespace(&acme, "bench-burst").await;
        made.push(ns.clone());
        let book: Book = Default::default();
        watch(&acme, &ns, book.clone());
        let api: Api<AiJob> = Api::namespaced(acme.clone(), &ns);
        let names: Vec<String> = (0..args.burst).map(|i| format!("burst-{i}")).collect();
        let cpu_before = cpu_by_component(&env.root);
        let start = Instant::now();
        let started_at = k8s_openapi::jiff::Timestamp::now();
        // Applied at once, as a pipeline would: sixteen requests in flight.
        let created: Vec<anyhow::Result<()>> = futures::stream::iter(names.iter().cloned())
            .map(|n| {
                let (api, book) = (api.clone(), book.clone());
                async move {
                    book.lock().await.entry(n.clone()).or_default().applied = Some(Instant::now());
                    api.create(&PostParams::default(), &serde_json::from_value(job(&n))?)
                        .await?;
                    Ok(())
                }
            })
            .buffer_unordered(16)
            .collect()
            .await;
        created.into_iter().collect::<anyhow::Result<Vec<()>>>()?;
        let done = wait_all(&book, &names, Duration::from_secs(180)).await;
        // Sampled when the last job runs or the wait gives up: slightly after
        // the last Running, never before it.
        let cpu = cpu_between(&cpu_before, &cpu_by_component(&env.root));
        let cpu_window = start.elapsed().as_secs_f64();
        let window = Some((started_at, k8s_openapi::jiff::Timestamp::now()));
        // The rate runs to the last job that got there, not to the time limit:
        // jobs that never run are reported as such, not as a slower rate.
        let last = book.lock().await.values().filter_map(|t| t.running).max();
        let secs = last
            .map_or_else(|| start.elapsed(), |t| t.duration_since(start))
            .as_secs_f64();
        let mut not_running = Vec::new();
        {
            let b = book.lock().await;
            for n in names.iter().filter(|n| b.get(*n).and_then(|t| t.running).is_none()) {
                let j = api.get_opt(n).await?;
                let st = j.and_then(|j| j.status).unwrap_or_default();
                let line = format!("{n}: {:?}: {}", st.phase, st.message.unwrap_or_default());
                eprintln!("not running: {line}");
                not_running.push(line);
            }
        }
        // acme rents; the other organisations lend the GPUs the jobs accept.
        let fleet: Vec<String> = env
            .orgs
            .iter()
            .filter(|o| o.org.name != "acme")
            .map(|o| {
                let f = &o.org.fleet;
                format!("{} {} at {}", f.nodes * f.gpus_per_node, f.product, o.org.name)
            })
            .collect();
        figures.push(Figure::new(
        "pool_placements_per_second",
        done as f64 / secs,
        "jobs/s",
        serde_json::json!({"jobs": args.burst, "reached_running": done, "not_running": not_running, "seconds_to_last_running": secs, "orgs": 3,
            "free_gpus": fleet.join(" + "), "job_runs": "1s", "operator_flags": operator_flags, "applied": "16 creates in flight",
            "target": ">= 100 jobs/s"}),
    ));
        // Where the burst's CPU went, per placement: the figure that says what
        // a rate would need on any machine, where this one's rate only says
        // what two shared cores give.
        let placed = done.max(1) as f64;
        let cpu_total: f64 = cpu.values().sum();
        let per_component: serde_json::Map<String, serde_json::Value> = cpu
            .iter()
            .map(|(k, v)| (k.clone(), serde_json::json!((v * 1000.0 / placed).round())))
            .collect();
        figures.push(Figure::new(
        "pool_burst_cpu_per_placement",
        cpu_total * 1000.0 / placed,
        "cpu-ms/job",
        serde_json::json!({"jobs": args.burst, "reached_running": done, "window_seconds": cpu_window,
            "cores_busy": cpu_total / cpu_window, "cores": std::thread::available_parallelism().map_or(0, |n| n.get()),
            "cpu_ms_per_job_by_component": per_component,
            "measured": "utime+stime from /proc of every test-environment process and operator, from the first apply until the last job Running"}),
    ));
        // The same window's API requests by the operators, per organisation and
        // per placement: what the rate costs the API servers, which is where
        // most of the CPU above goes.
        let mut requests_total = 0u64;
        let mut by_org = serde_json::Map::new();
        for o in &env.orgs {
            let counts = operator_requests(&o.dir, window);
            let sum: u64 = counts.values().sum();
            requests_total += sum;
            let mut top: Vec<(String, u64)> = counts.into_iter().collect();
            top.sort_by_key(|(_, n)| std::cmp::Reverse(*n));
            let per: serde_json::Map<String, serde_json::Value> = top
                .into_iter()
                .take(12)
                .map(|(k, n)| (k, serde_json::json!((n as f64 * 10.0 / placed).round() / 10.0)))
                .collect();
            by_org.insert(
            o.org.name.clone(),
            serde_json::json!({"per_placement": (sum as f64 * 10.0 / placed).round() / 10.0, "top_kinds_per_placement": per}),
        );
        }
        figures.push(Figure::new(
        "pool_burst_operator_api_requests_per_placement",
        requests_total as f64 / placed,
        "requests/job",
        serde_json::json!({"jobs": args.burst, "reached_running": done, "by_org": by_org,
            "measured": "entries for the operators' service account in each organisation's API-server audit log, received from the first apply until the last job Running; the control plane's own requests (controller-manager, scheduler, kwok) are not audited"}),
    ));
    }

    if args.steady > 0 {
        let (ns, mut steady) = steady_state(&env, &acme, args.steady, args.steady_seconds, &operator_flags).await?;
        made.push(ns);
        figures.append(&mut steady);
    }
    write(&args.out, &figures)?;
    // Delete the jobs while the operators still run: their finalizers close
    // the leases on chain, and an environment left with 200 pool jobs would
    // load the next test's operators.
    let nss: Api<Namespace> = Api::all(acme.clone());
    let mut left = Vec::new();
    for ns in made {
        let _ = nss.delete(&ns, &DeleteParams::default()).await;
        left.push(ns);
    }
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(180) {
        let mut gone = 0;
        for ns in &left {
            if matches!(nss.get_opt(ns).await, Ok(None)) {
                gone += 1;
            }
        }
        if gone == left.len() {
            break;
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    Ok(())
}

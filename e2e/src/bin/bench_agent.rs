//! Agent footprint: one agent with 8 simulated GPUs at the default 10 s poll,
//! against a real API server, measured from /proc for a fixed window.

use std::time::{Duration, Instant};

use clap::Parser;
use gpupool_e2e::bench::{Figure, cpu_seconds, memory_kib, write};
use gpupool_e2e::cluster::{spawn, stop};
use gpupool_e2e::env::{TestEnv, default_root};

#[derive(Parser)]
struct Args {
    /// The agent binary to measure (a release build is what users run).
    #[arg(long)]
    agent: std::path::PathBuf,
    /// Seconds to measure, after a warm-up of one poll.
    #[arg(long, default_value_t = 120)]
    seconds: u64,
    #[arg(long, default_value = "target/bench/agent.json")]
    out: std::path::PathBuf,
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let env = TestEnv::load(&default_root())?;
    let org = env
        .orgs
        .iter()
        .find(|o| o.org.fleet.gpus_per_node == 8)
        .unwrap_or(&env.orgs[0]);
    let node = org.nodes[0].clone();
    let inventory = org.dir.join("bench-inventory.yaml");
    std::fs::write(
        &inventory,
        format!(
            "product: {}\nmemoryMib: {}\ncount: 8\n",
            org.org.fleet.product, org.org.fleet.memory_mib
        ),
    )?;
    let pid = spawn(
        &args.agent,
        &[
            format!("--node-name={node}"),
            "--backend=simulated".into(),
            format!("--inventory={}", inventory.display()),
            "--poll-seconds=10".into(),
        ],
        &[("KUBECONFIG", &org.agent_kubeconfig)],
        &org.dir.join("logs/bench-agent.log"),
    )?;
    tokio::time::sleep(Duration::from_secs(12)).await;
    let (cpu0, t0) = (cpu_seconds(pid)?, Instant::now());
    tokio::time::sleep(Duration::from_secs(args.seconds)).await;
    let (cpu1, wall) = (cpu_seconds(pid)?, t0.elapsed().as_secs_f64());
    let (rss, peak) = memory_kib(pid)?;
    stop(&[pid]);
    let conditions = serde_json::json!({
        "gpus": 8, "backend": "simulated", "poll_seconds": 10, "window_seconds": wall,
        "api_server": "real kube-apiserver on loopback", "machine": "2 cores",
    });
    write(
        &args.out,
        &[
            Figure::new("agent_rss", rss as f64 / 1024.0, "MiB", conditions.clone()),
            Figure::new("agent_peak_rss", peak as f64 / 1024.0, "MiB", conditions.clone()),
            Figure::new(
                "agent_cpu_share",
                (cpu1 - cpu0) / wall * 100.0,
                "% of one core",
                conditions,
            ),
        ],
    )
}

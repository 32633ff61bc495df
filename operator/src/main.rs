use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use clap::Parser;
use gpupool_operator::controller::{self, Settings};
use gpupool_operator::telemetry::{self, Metrics};
use tracing_subscriber::EnvFilter;

/// The gpupool operator: places AiJobs on this cluster's GPUs.
#[derive(Parser, Debug)]
#[command(version, about)]
struct Args {
    /// This cluster's organisation name.
    #[arg(long, env = "GPUPOOL_ORG", default_value = "local")]
    org: String,
    /// Address for /metrics, /healthz and /readyz.
    #[arg(long, env = "GPUPOOL_METRICS_ADDR", default_value = "0.0.0.0:8080")]
    metrics_addr: SocketAddr,
    /// Seconds before a waiting AiJob checks capacity again.
    #[arg(long, env = "GPUPOOL_WAIT_REQUEUE_SECONDS", default_value_t = 3)]
    wait_requeue_seconds: u64,
    /// AiJobs reconciled at once.
    #[arg(long, env = "GPUPOOL_CONCURRENCY", default_value_t = 16)]
    concurrency: u16,
    /// Log as JSON lines.
    #[arg(long, env = "GPUPOOL_LOG_JSON")]
    log_json: bool,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info,kube=warn"));
    if args.log_json {
        tracing_subscriber::fmt().json().with_env_filter(filter).init();
    } else {
        tracing_subscriber::fmt().with_env_filter(filter).init();
    }
    let client = kube::Client::try_default()
        .await
        .context("connecting to the Kubernetes API")?;
    let metrics = Arc::new(Metrics::default());
    let bound = telemetry::serve(args.metrics_addr, metrics.clone())
        .await
        .context("binding the metrics address")?;
    tracing::info!(org = %args.org, metrics = %bound, "gpupool operator starting");
    let settings = Settings {
        org: args.org,
        wait_requeue: Duration::from_secs(args.wait_requeue_seconds.max(1)),
        concurrency: args.concurrency.max(1),
    };
    controller::run(client, settings, metrics).await
}

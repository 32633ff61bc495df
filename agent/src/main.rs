use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context as _;
use clap::{Parser, ValueEnum};
use gpupool_agent::agent::{self, Settings};
use gpupool_agent::nvml::NvmlSource;
use gpupool_agent::simulated::SimulatedSource;
use gpupool_agent::source::{GpuSource, Reading, SourceError};
use tracing_subscriber::EnvFilter;

#[derive(Clone, Copy, Debug, ValueEnum)]
enum Backend {
    Nvml,
    Simulated,
}

/// The gpupool node agent: reports this node's NVIDIA GPUs as a GpuNode.
#[derive(Parser, Debug)]
#[command(version, about)]
struct Args {
    /// The Node this agent runs on (the chart passes spec.nodeName).
    #[arg(long, env = "NODE_NAME")]
    node_name: String,
    /// Where GPU readings come from.
    #[arg(long, value_enum, env = "GPUPOOL_AGENT_BACKEND", default_value = "nvml")]
    backend: Backend,
    /// With the simulated backend: the YAML inventory file.
    #[arg(long, env = "GPUPOOL_AGENT_INVENTORY")]
    inventory: Option<PathBuf>,
    /// Seconds between readings.
    #[arg(long, env = "GPUPOOL_AGENT_POLL_SECONDS", default_value_t = 10)]
    poll_seconds: u64,
    /// Seconds between writes when nothing changed.
    #[arg(long, env = "GPUPOOL_AGENT_HEARTBEAT_SECONDS", default_value_t = 60)]
    heartbeat_seconds: u64,
    /// Read the GPUs once, print them as JSON and exit, without a cluster.
    #[arg(long)]
    once: bool,
}

/// Stands in for NVML when it cannot be loaded: every read reports why, so
/// the agent keeps running, keeps the GpuNode's condition current, and picks
/// the GPUs up once the driver is there (it re-tries loading on each read).
struct Unavailable;

impl GpuSource for Unavailable {
    fn name(&self) -> &'static str {
        "nvml"
    }
    fn read(&mut self) -> Result<Reading, SourceError> {
        Err(NvmlSource::init().err().unwrap_or_else(|| {
            SourceError::DriverUnavailable("NVML became available; restarting the agent picks it up".into())
        }))
    }
}

fn source(args: &Args) -> anyhow::Result<Box<dyn GpuSource>> {
    Ok(match args.backend {
        Backend::Simulated => {
            let path = args
                .inventory
                .clone()
                .context("--inventory is required with --backend simulated")?;
            Box::new(SimulatedSource {
                path,
                node: args.node_name.clone(),
            })
        }
        Backend::Nvml => match NvmlSource::init() {
            Ok(s) => Box::new(s),
            Err(e) => {
                tracing::error!(error = %e, "NVML unavailable; reporting that on the GpuNode and retrying");
                Box::new(Unavailable)
            }
        },
    })
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info,kube=warn")))
        .init();
    let args = Args::parse();
    let mut src = source(&args)?;
    if args.once {
        let reading = src.read()?;
        println!(
            "{}",
            serde_json::to_string_pretty(&gpupool_agent::report::status_from_reading(
                src.name(),
                &reading,
                0,
                None,
                k8s_openapi::jiff::Timestamp::now(),
            ))?
        );
        return Ok(());
    }
    let client = kube::Client::try_default()
        .await
        .context("connecting to the Kubernetes API")?;
    let settings = Settings {
        node: args.node_name.clone(),
        poll: Duration::from_secs(args.poll_seconds.max(1)),
        heartbeat: Duration::from_secs(args.heartbeat_seconds.max(args.poll_seconds).max(1)),
        max_backoff: Duration::from_secs(300),
    };
    tokio::select! {
        _ = agent::run(client, src, settings) => {}
        _ = tokio::signal::ctrl_c() => tracing::info!("stopping"),
    }
    Ok(())
}

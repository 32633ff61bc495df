//! `gpupool`: the command line for renters and operators. It reads the
//! cluster's AiJobs and GPUs, and the escrow and leases straight from the chain;
//! the market commands come with the pool work.

mod escrow;
mod output;

use std::io::Write;

use anyhow::Context as _;
use clap::{CommandFactory, Parser, Subcommand};
use gpupool_crds::{AiJob, GpuNode};
use kube::api::{Api, ListParams};
use output::{Format, structured, table};

#[derive(Parser)]
#[command(name = "gpupool", version, about = "Rent and lend GPUs across organisations")]
struct Cli {
    /// Output format.
    #[arg(short, long, value_enum, global = true, default_value = "table")]
    output: Format,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// List AiJobs, their phase and where they run.
    Jobs {
        /// Namespace; the kubeconfig's by default.
        #[arg(short, long)]
        namespace: Option<String>,
        /// Every namespace.
        #[arg(short = 'A', long)]
        all_namespaces: bool,
    },
    /// GPUs in this cluster, per node, as the agents report them.
    Gpus,
    /// Escrow: your balance, topping up a lease, withdrawing what a lease earned.
    Escrow {
        #[command(flatten)]
        chain: escrow::ChainOpts,
        #[command(subcommand)]
        cmd: escrow::EscrowCmd,
    },
    /// Leases you rent or provide, with their on-chain state.
    Leases {
        #[command(flatten)]
        chain: escrow::ChainOpts,
        /// Whose leases; the key file's wallet by default.
        #[arg(long)]
        address: Option<gpupool_chain::Address>,
    },
    /// Print shell completions.
    Completions { shell: clap_complete::Shell },
}

fn dash(s: Option<String>) -> String {
    s.filter(|s| !s.is_empty()).unwrap_or_else(|| "-".into())
}

async fn jobs(format: Format, namespace: Option<String>, all: bool) -> anyhow::Result<String> {
    let client = kube::Client::try_default()
        .await
        .context("connecting to the Kubernetes API")?;
    let api: Api<AiJob> = match (all, namespace) {
        (true, _) => Api::all(client),
        (false, Some(ns)) => Api::namespaced(client, &ns),
        (false, None) => Api::default_namespaced(client),
    };
    let list = api.list(&ListParams::default()).await.context("listing AiJobs")?;
    if !matches!(format, Format::Table) {
        return structured(format, &list.items);
    }
    let rows = list
        .items
        .iter()
        .map(|j| {
            let s = j.status.clone().unwrap_or_default();
            let runs_on = s.runs_on.clone();
            vec![
                j.metadata.namespace.clone().unwrap_or_default(),
                j.metadata.name.clone().unwrap_or_default(),
                dash(s.phase.map(|p| format!("{p:?}"))),
                j.spec.gpus.count.to_string(),
                dash(runs_on.as_ref().and_then(|r| r.gpu_product.clone())),
                dash(runs_on.map(|r| r.org)),
                j.spec.max_price_per_gpu_hour.clone(),
                dash(s.message),
            ]
        })
        .collect::<Vec<_>>();
    Ok(table(
        &[
            "NAMESPACE",
            "NAME",
            "PHASE",
            "GPUS",
            "MODEL",
            "WHERE",
            "MAX-PRICE",
            "REASON",
        ],
        &rows,
    ))
}

async fn gpus(format: Format) -> anyhow::Result<String> {
    let client = kube::Client::try_default()
        .await
        .context("connecting to the Kubernetes API")?;
    let list = Api::<GpuNode>::all(client)
        .list(&ListParams::default())
        .await
        .context("listing GpuNodes")?;
    if !matches!(format, Format::Table) {
        return structured(format, &list.items);
    }
    let rows = list
        .items
        .iter()
        .map(|n| {
            let s = n.status.clone().unwrap_or_default();
            let ready = s.conditions.iter().find(|c| c.type_ == "DriverReady");
            vec![
                n.spec.node_name.clone(),
                dash(s.product),
                s.gpus_total.to_string(),
                s.gpus_healthy.to_string(),
                s.gpus_free.to_string(),
                dash(s.driver_version),
                dash(ready.map(|c| {
                    if c.status == "True" {
                        "Ready".to_string()
                    } else {
                        c.reason.clone()
                    }
                })),
            ]
        })
        .collect::<Vec<_>>();
    Ok(table(
        &["NODE", "PRODUCT", "GPUS", "HEALTHY", "FREE", "DRIVER", "STATE"],
        &rows,
    ))
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let result = match cli.cmd {
        Cmd::Jobs {
            namespace,
            all_namespaces,
        } => jobs(cli.output, namespace, all_namespaces).await,
        Cmd::Gpus => gpus(cli.output).await,
        Cmd::Escrow { chain, cmd } => escrow::escrow(cli.output, &chain, cmd).await,
        Cmd::Leases { chain, address } => escrow::leases(cli.output, &chain, address).await,
        Cmd::Completions { shell } => {
            let mut out = Vec::new();
            clap_complete::generate(shell, &mut Cli::command(), "gpupool", &mut out);
            Ok(String::from_utf8_lossy(&out).into_owned())
        }
    };
    match result {
        Ok(text) => {
            // A closed pipe (`gpupool jobs | head`) is not an error worth a message.
            let _ = std::io::stdout().write_all(text.as_bytes());
            std::process::ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::from(1)
        }
    }
}

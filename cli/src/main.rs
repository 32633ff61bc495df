//! `gpupool`: the command line for renters and operators. The job and market
//! commands act on the member cluster's own resources through the kubeconfig,
//! or through a member's Pool API (`--pool-api`); escrow transactions go
//! straight to the chain.

mod escrow;
mod market;
mod output;
mod pool_api;
mod submit;

use std::io::Write;

use anyhow::Context as _;
use clap::{CommandFactory, Parser, Subcommand};
use gpupool_crds::{AiJob, GpuNode};
use kube::api::{Api, ListParams};
use output::{Format, structured, table};

#[derive(Parser)]
#[command(
    name = "gpupool",
    version,
    about = "Rent and lend GPUs across organisations",
    after_help = "Exit codes: 0 success; 1 an error or a refusal (the message says which); 2 a usage error; \
3 a job waited for ended Failed; 4 --timeout ran out while waiting."
)]
struct Cli {
    /// Output format.
    #[arg(short, long, value_enum, global = true, default_value = "table")]
    output: Format,
    /// A pool member's Pool API (e.g. http://pool.example.org:7443): rent
    /// without a cluster of your own. Jobs, bids and the market then go
    /// through that member, signed with --wallet-key-file, instead of
    /// through a kubeconfig.
    #[arg(long, env = "GPUPOOL_POOL_API", global = true)]
    pool_api: Option<String>,
    /// CA certificate (PEM) that an https:// Pool API's certificate must
    /// chain to; the system's trusted roots when absent.
    #[arg(long, env = "GPUPOOL_POOL_API_CA", global = true)]
    pool_api_ca: Option<std::path::PathBuf>,
    #[command(flatten)]
    chain: escrow::ChainOpts,
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
        #[command(subcommand)]
        cmd: escrow::EscrowCmd,
    },
    /// Leases you rent or provide, with their on-chain state; through
    /// --pool-api, your leases through that member, with what each holds.
    Leases {
        /// Whose leases; the key file's wallet by default (not with --pool-api).
        #[arg(long)]
        address: Option<gpupool_chain::Address>,
        /// With --pool-api: follow this lease, printing each change to
        /// stderr, until it closes.
        #[arg(long, value_name = "LEASE")]
        watch: Option<String>,
        /// How long --watch waits ("90s", "10m"); until the lease closes by default.
        #[arg(long, requires = "watch", value_parser = parse_duration)]
        timeout: Option<std::time::Duration>,
    },
    /// Submit an AiJob, from flags or a file; with --wait, follow it.
    Submit {
        #[command(flatten)]
        ns: market::NamespaceOpt,
        #[command(flatten)]
        job: Box<submit::JobFlags>,
        #[command(flatten)]
        wait: WaitOpts,
    },
    /// Bids recorded for an AiJob, cheapest first.
    Bids {
        #[command(flatten)]
        ns: market::NamespaceOpt,
        /// The AiJob's name.
        job: String,
    },
    /// Accept a bid for an AiJob with Manual selection.
    Accept {
        #[command(flatten)]
        ns: market::NamespaceOpt,
        /// The Bid's name (see `gpupool bids JOB`).
        bid: String,
        #[command(flatten)]
        wait: WaitOpts,
    },
    /// Raise the most a waiting AiJob pays per GPU-hour.
    Bid {
        #[command(flatten)]
        ns: market::NamespaceOpt,
        /// The AiJob's name.
        job: String,
        /// The new max price per GPU-hour, above the current one.
        #[arg(long)]
        max_price: String,
    },
    /// Cancel an AiJob: its lease closes on chain and the unused deposit is refunded.
    Cancel {
        #[command(flatten)]
        ns: market::NamespaceOpt,
        /// The AiJob's name.
        job: String,
    },
    /// With --pool-api: who runs that Pool API, and the agent address to approve.
    PoolInfo,
    /// What the pool's members advertise: free GPUs and prices, cheapest first.
    Market,
    /// The pool's members this cluster knows, and their reputation.
    Peers,
    /// Print shell completions.
    Completions { shell: clap_complete::Shell },
}

/// Waiting for a job after submitting or accepting.
#[derive(clap::Args, Clone, Debug)]
struct WaitOpts {
    /// Follow the job, printing its progress to stderr, until it is this far.
    #[arg(long, value_enum, num_args = 0..=1, default_missing_value = "done")]
    wait: Option<submit::WaitFor>,
    /// How long --wait waits ("90s", "10m").
    #[arg(long, default_value = "10m", value_parser = parse_duration)]
    timeout: std::time::Duration,
}

fn parse_duration(s: &str) -> Result<std::time::Duration, String> {
    s.parse::<kube::core::Duration>()
        .map(std::time::Duration::from)
        .map_err(|e| format!("{s:?} is not a duration such as 90s or 10m: {e}"))
}

impl WaitOpts {
    /// Appends the wait's outcome to `said`, when asked to wait.
    async fn then(&self, ns: &market::NamespaceOpt, job: &str, said: String) -> anyhow::Result<String> {
        let Some(want) = self.wait else {
            return Ok(said);
        };
        // What was done is said before the wait, which may take minutes.
        let _ = std::io::stdout().write_all(said.as_bytes());
        let _ = std::io::stdout().flush();
        submit::wait(ns, job, want, self.timeout).await
    }

    /// The same, following the job through a Pool API.
    async fn then_pool(&self, pool: &mut pool_api::Pool, job: &str, said: String) -> anyhow::Result<String> {
        let Some(want) = self.wait else {
            return Ok(said);
        };
        let _ = std::io::stdout().write_all(said.as_bytes());
        let _ = std::io::stdout().flush();
        pool.wait(job, want, self.timeout).await
    }
}

pub(crate) async fn kube_client() -> anyhow::Result<kube::Client> {
    kube::Client::try_default()
        .await
        .context("connecting to the Kubernetes API (is KUBECONFIG set?)")
}

pub(crate) fn dash(s: Option<String>) -> String {
    s.filter(|s| !s.is_empty()).unwrap_or_else(|| "-".into())
}

async fn jobs(format: Format, namespace: Option<String>, all: bool) -> anyhow::Result<String> {
    let client = kube_client().await?;
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
    let client = kube_client().await?;
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

/// The commands on a member's kubeconfig (and the chain).
async fn on_kubeconfig(chain: &escrow::ChainOpts, output: Format, cmd: Cmd) -> anyhow::Result<String> {
    match cmd {
        Cmd::Jobs {
            namespace,
            all_namespaces,
        } => jobs(output, namespace, all_namespaces).await,
        Cmd::Gpus => gpus(output).await,
        Cmd::Escrow { cmd } => escrow::escrow(output, chain, cmd).await,
        Cmd::Leases { watch: Some(_), .. } => anyhow::bail!(
            "--watch follows a lease through a Pool API (--pool-api); with a kubeconfig, \
             `kubectl get leases.gpupool.dev -w` follows them"
        ),
        Cmd::Leases { address, .. } => escrow::leases(output, chain, address).await,
        Cmd::Submit { ns, job, wait } => {
            let (name, said) = submit::submit(&ns, &job).await?;
            wait.then(&ns, &name, said).await
        }
        Cmd::Bids { ns, job } => market::bids(output, &ns, &job).await,
        Cmd::Accept { ns, bid, wait } => {
            let (job, said) = market::accept(&ns, &bid).await?;
            wait.then(&ns, &job, said).await
        }
        Cmd::Bid { ns, job, max_price } => market::raise(&ns, &job, &max_price).await,
        Cmd::Cancel { ns, job } => market::cancel(&ns, &job).await,
        Cmd::PoolInfo => anyhow::bail!("pool-info asks a Pool API: pass --pool-api URL (or GPUPOOL_POOL_API)"),
        Cmd::Market => market::market(output).await,
        Cmd::Peers => market::peers(output).await,
        Cmd::Completions { shell } => {
            let mut out = Vec::new();
            clap_complete::generate(shell, &mut Cli::command(), "gpupool", &mut out);
            Ok(String::from_utf8_lossy(&out).into_owned())
        }
    }
}

/// The commands through a member's Pool API, for renters without a cluster.
async fn through_pool_api(
    url: &str,
    ca: Option<&std::path::Path>,
    chain: &escrow::ChainOpts,
    output: Format,
    cmd: Cmd,
) -> anyhow::Result<String> {
    // Info and Market are not signed: a renter may look before it has a key file.
    let connect = |signed: bool| async move {
        let wallet = if signed { Some(chain.wallet()?) } else { None };
        pool_api::Pool::connect(url, wallet, ca).await
    };
    match cmd {
        // The member reads the chain for its renters: balances and leases
        // need no RPC of the renter's own.
        Cmd::Escrow {
            cmd: escrow::EscrowCmd::Balance { address: Some(_) },
        }
        | Cmd::Leases { address: Some(_), .. } => anyhow::bail!(
            "through a Pool API you see your own wallet's; --address reads the chain for anyone (drop --pool-api)"
        ),
        Cmd::Escrow {
            cmd: escrow::EscrowCmd::Balance { address: None },
        } => connect(true).await?.escrow(output).await,
        Cmd::Leases {
            watch: Some(name),
            timeout,
            ..
        } => connect(true).await?.watch_lease(&name, timeout).await,
        Cmd::Leases { .. } => connect(true).await?.leases(output).await,
        // Transactions are the renter's own to sign and send; completions need nothing.
        Cmd::Escrow { cmd } => escrow::escrow(output, chain, cmd).await,
        c @ Cmd::Completions { .. } => on_kubeconfig(chain, output, c).await,
        Cmd::Gpus | Cmd::Peers => anyhow::bail!(
            "this command reads a member cluster and needs its kubeconfig; through a Pool API, `gpupool market` shows the pool"
        ),
        Cmd::PoolInfo => connect(false).await?.info(output).await,
        Cmd::Market => connect(false).await?.market(output).await,
        Cmd::Jobs { .. } => connect(true).await?.jobs(output).await,
        Cmd::Submit { job, wait, .. } => {
            let mut pool = connect(true).await?;
            let (name, said) = pool.submit(&job).await?;
            wait.then_pool(&mut pool, &name, said).await
        }
        Cmd::Bids { job, .. } => connect(true).await?.bids(output, &job).await,
        Cmd::Accept { bid, wait, .. } => {
            let mut pool = connect(true).await?;
            let (job, said) = pool.accept(&bid).await?;
            wait.then_pool(&mut pool, &job, said).await
        }
        Cmd::Bid { job, max_price, .. } => connect(true).await?.raise(&job, &max_price).await,
        Cmd::Cancel { job, .. } => connect(true).await?.cancel(&job).await,
    }
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let result = match &cli.pool_api {
        Some(url) => through_pool_api(url, cli.pool_api_ca.as_deref(), &cli.chain, cli.output, cli.cmd).await,
        None => on_kubeconfig(&cli.chain, cli.output, cli.cmd).await,
    };
    match result {
        Ok(text) => {
            // A closed pipe (`gpupool jobs | head`) is not an error worth a message.
            let _ = std::io::stdout().write_all(text.as_bytes());
            std::process::ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {e:#}");
            let code = e.downcast_ref::<submit::WaitEnded>().map_or(1, |w| w.code);
            std::process::ExitCode::from(code)
        }
    }
}

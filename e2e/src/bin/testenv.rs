//! `testenv up --orgs N` / `testenv down`: starts or stops N simulated
//! organisations' clusters on loopback and records them in env.json.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use futures::FutureExt as _;
use gpupool_e2e::chain;
use gpupool_e2e::cluster::{self, Binaries};
use gpupool_e2e::env::{ChainInfo, ENV_FILE, TestEnv, default_root};
use gpupool_e2e::harness::workspace;
use gpupool_e2e::orgs::org_specs;

#[derive(Parser)]
#[command(about = "gpupool's real Kubernetes test environment")]
struct Args {
    /// Where state, certificates, kubeconfigs and logs go.
    #[arg(long, global = true)]
    root: Option<PathBuf>,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Start clusters.
    Up {
        /// How many organisations.
        #[arg(long, default_value_t = 1)]
        orgs: usize,
        /// The gpupool agent binary; one runs per simulated node.
        #[arg(long)]
        agent: Option<PathBuf>,
        /// Control-plane binaries; built (or taken from the cache) when absent.
        #[arg(long, env = "GPUPOOL_TESTENV_BIN")]
        bin_dir: Option<PathBuf>,
        /// GPUs on every simulated node instead of each fleet's own count:
        /// the placement-rate benchmark gives the pool room for its whole
        /// burst, so it measures the pipeline and not the queue.
        #[arg(long, value_parser = clap::value_parser!(u32).range(1..=64))]
        gpus_per_node: Option<u32>,
    },
    /// Stop the clusters and remove their state.
    Down,
    /// Print where each cluster's admin kubeconfig is.
    Kubeconfigs,
}

fn build_binaries() -> anyhow::Result<PathBuf> {
    let script = workspace().join("e2e/testenv/build.sh");
    let out = Command::new("bash")
        .arg(&script)
        .output()
        .with_context(|| format!("running {}", script.display()))?;
    if !out.status.success() {
        anyhow::bail!("{} failed:\n{}", script.display(), String::from_utf8_lossy(&out.stderr));
    }
    let stdout = String::from_utf8(out.stdout)?;
    let dir = stdout.lines().last().context("build.sh printed no directory")?;
    Ok(PathBuf::from(dir.trim()))
}

/// anvil with the escrow deployed; account 0 deploys, account i+1 is the i-th
/// organisation's wallet, then a renter and a provider without a cluster. Every
/// one of them is funded.
async fn start_chain(root: &Path, orgs: &[cluster::ClusterInfo]) -> anyhow::Result<ChainInfo> {
    let dir = root.join("chain");
    let anvil = chain::Anvil::start(&dir).await?;
    let mut names: Vec<String> = orgs.iter().map(|o| o.org.name.clone()).collect();
    // Wallets without a cluster: a renter using only the CLI, and a provider.
    names.push("renter".into());
    names.push("provider".into());
    let funded: Vec<usize> = (1..=names.len()).collect();
    let config = chain::deploy_and_fund(&anvil, &funded).await?;
    let config_path = dir.join("chain.json");
    config.save(&config_path)?;
    let mut wallets = std::collections::BTreeMap::new();
    for (i, name) in names.iter().enumerate() {
        let key = dir.join(format!("{name}.key"));
        std::fs::write(&key, &anvil.keys[i + 1])?;
        wallets.insert(name.clone(), key);
    }
    // Account 0 deployed the development token and may mint it: tests give
    // wallets of their own making tokens with it.
    let deployer = dir.join("deployer.key");
    std::fs::write(&deployer, &anvil.keys[0])?;
    wallets.insert("deployer".into(), deployer);
    let anvil = anvil.detach();
    Ok(ChainInfo {
        pid: anvil.pid,
        url: anvil.url.clone(),
        config: config_path,
        wallets,
    })
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    // The API server is polled until it answers; refused connections on the
    // way are expected, so kube's own error logs stay quiet.
    tracing_subscriber::fmt().with_env_filter("warn,kube_client=off").init();
    let args = Args::parse();
    let root = args.root.unwrap_or_else(default_root);
    match args.cmd {
        Cmd::Up {
            orgs,
            agent,
            bin_dir,
            gpus_per_node,
        } => {
            if root.join(ENV_FILE).exists() {
                anyhow::bail!(
                    "a test environment is already up at {}; run `make testenv-down` first",
                    root.display()
                );
            }
            anyhow::ensure!((1..=8).contains(&orgs), "--orgs must be between 1 and 8");
            let bin_dir = match bin_dir {
                Some(d) => d,
                None => build_binaries()?,
            };
            std::fs::create_dir_all(&root)?;
            let root = root.canonicalize()?;
            let agent = agent
                .map(|a| a.canonicalize())
                .transpose()
                .context("the --agent binary")?;
            let bins = Binaries {
                dir: bin_dir.clone(),
                agent,
            };
            let stages = workspace().join("e2e/testenv/stages.yaml").canonicalize()?;
            // The RBAC the chart ships, rendered by `make manifests`: tests run the
            // operator and agents under exactly what users install.
            let rbac = std::fs::read_to_string(workspace().join("manifests/gpupool.yaml"))?;
            let mut specs = org_specs(orgs);
            if let Some(n) = gpus_per_node {
                for s in &mut specs {
                    s.fleet.gpus_per_node = n;
                }
            }
            let mut all_pids: Vec<Vec<u32>> = vec![Vec::new(); specs.len()];
            // A panic while one cluster starts is caught like an error, so the
            // processes already started are stopped: uncaught, it left an
            // etcd and a kube-apiserver running that `testenv down` (which
            // reads env.json, not yet written) knew nothing of.
            let started = futures::future::join_all(specs.iter().zip(all_pids.iter_mut()).map(|(spec, pids)| {
                std::panic::AssertUnwindSafe(cluster::start(spec, &root, &bins, &stages, &rbac, pids)).catch_unwind()
            }))
            .await;
            let mut infos = Vec::new();
            let mut failure = None;
            for (spec, r) in specs.iter().zip(started) {
                match r {
                    Ok(Ok(info)) => infos.push(info),
                    Ok(Err(e)) => failure = Some(format!("{}: {e:#}", spec.name)),
                    Err(panic) => {
                        let why = panic
                            .downcast_ref::<String>()
                            .map(String::as_str)
                            .or_else(|| panic.downcast_ref::<&str>().copied())
                            .unwrap_or("no message");
                        failure = Some(format!("{}: panicked: {why}", spec.name));
                    }
                }
            }
            if let Some(f) = failure {
                cluster::stop(&all_pids.concat());
                anyhow::bail!("starting the test environment failed: {f}");
            }
            let chain = match start_chain(&root, &infos).await {
                Ok(c) => c,
                Err(e) => {
                    cluster::stop(&all_pids.concat());
                    anyhow::bail!("starting the chain failed: {e:#}");
                }
            };
            let env = TestEnv {
                root: root.clone(),
                orgs: infos,
                chain: Some(chain),
                bin_dir: Some(bin_dir),
            };
            env.save()?;
            for o in &env.orgs {
                println!(
                    "{:<8} {}  {} nodes of {}×{}  KUBECONFIG={}",
                    o.org.name,
                    o.server,
                    o.nodes.len(),
                    o.org.fleet.gpus_per_node,
                    o.org.fleet.product,
                    o.admin_kubeconfig.display()
                );
            }
            if let Some(c) = &env.chain {
                println!("chain    {}  escrow config {}", c.url, c.config.display());
            }
        }
        Cmd::Down => {
            match TestEnv::load(&root) {
                Ok(env) => {
                    let mut pids: Vec<u32> = env.orgs.iter().flat_map(|o| o.pids.iter().copied()).collect();
                    pids.extend(env.chain.iter().map(|c| c.pid));
                    cluster::stop(&pids);
                    println!("stopped {} organisation(s)", env.orgs.len());
                }
                Err(_) => println!("no test environment at {}", root.display()),
            }
            if root.exists() {
                std::fs::remove_dir_all(&root)?;
            }
        }
        Cmd::Kubeconfigs => {
            let env = TestEnv::load(&root)?;
            for o in &env.orgs {
                println!("{}={}", o.org.name, o.admin_kubeconfig.display());
            }
        }
    }
    Ok(())
}

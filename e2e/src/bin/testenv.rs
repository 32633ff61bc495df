//! `testenv up --orgs N` / `testenv down`: starts or stops N simulated
//! organisations' clusters on loopback and records them in env.json.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use gpupool_e2e::cluster::{self, Binaries};
use gpupool_e2e::env::{ENV_FILE, TestEnv, default_root};
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
    },
    /// Stop the clusters and remove their state.
    Down,
    /// Print where each cluster's admin kubeconfig is.
    Kubeconfigs,
}

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
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

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    // The API server is polled until it answers; refused connections on the
    // way are expected, so kube's own error logs stay quiet.
    tracing_subscriber::fmt().with_env_filter("warn,kube_client=off").init();
    let args = Args::parse();
    let root = args.root.unwrap_or_else(default_root);
    match args.cmd {
        Cmd::Up { orgs, agent, bin_dir } => {
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
            let bins = Binaries { dir: bin_dir, agent };
            let stages = workspace().join("e2e/testenv/stages.yaml").canonicalize()?;
            // The RBAC the chart ships, rendered by `make manifests`: tests run the
            // operator and agents under exactly what users install.
            let rbac = std::fs::read_to_string(workspace().join("manifests/gpupool.yaml"))?;
            let specs = org_specs(orgs);
            let mut all_pids: Vec<Vec<u32>> = vec![Vec::new(); specs.len()];
            let started = futures::future::join_all(
                specs
                    .iter()
                    .zip(all_pids.iter_mut())
                    .map(|(spec, pids)| cluster::start(spec, &root, &bins, &stages, &rbac, pids)),
            )
            .await;
            let mut infos = Vec::new();
            let mut failure = None;
            for (spec, r) in specs.iter().zip(started) {
                match r {
                    Ok(info) => infos.push(info),
                    Err(e) => failure = Some(format!("{}: {e:#}", spec.name)),
                }
            }
            if let Some(f) = failure {
                cluster::stop(&all_pids.concat());
                anyhow::bail!("starting the test environment failed: {f}");
            }
            let env = TestEnv {
                root: root.clone(),
                orgs: infos,
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
        }
        Cmd::Down => {
            match TestEnv::load(&root) {
                Ok(env) => {
                    let pids: Vec<u32> = env.orgs.iter().flat_map(|o| o.pids.iter().copied()).collect();
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

//! `gpupool submit`: an AiJob from a file or from flags, and waiting for it
//! with progress and an exit code a script can branch on.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use futures::StreamExt;
use gpupool_crds::{AiJob, AiJobPhase};
use kube::api::{Api, PostParams};
use kube::runtime::{WatchStreamExt, watcher};

use crate::kube_client;
use crate::market::NamespaceOpt;

/// Exit code when the job ended Failed.
pub const EXIT_JOB_FAILED: u8 = 3;
/// Exit code when `--timeout` ran out before the job got where `--wait` asked.
pub const EXIT_TIMED_OUT: u8 = 4;

/// What `--wait` waits for.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum WaitFor {
    /// A lease is agreed (or the job runs locally): phase Leased or later.
    Leased,
    /// The workload runs: phase Running or later.
    Running,
    /// The job ended: Succeeded or Failed.
    Done,
}

/// Placement modes, as the AiJob spells them.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    LocalFirst,
    PoolOnly,
    LocalOnly,
}

impl Mode {
    fn spec(self) -> &'static str {
        match self {
            Mode::LocalFirst => "LocalFirst",
            Mode::PoolOnly => "PoolOnly",
            Mode::LocalOnly => "LocalOnly",
        }
    }
}

/// The job, from flags; `-f` takes a whole AiJob instead.
#[derive(clap::Args, Clone, Debug)]
pub struct JobFlags {
    /// The AiJob's name (with flags; a file names itself).
    #[arg(required_unless_present = "file")]
    pub name: Option<String>,
    /// An AiJob manifest (YAML or JSON) to submit as it is.
    #[arg(short, long, conflicts_with_all = ["name", "image"])]
    pub file: Option<PathBuf>,
    /// Container image to run.
    #[arg(long, required_unless_present = "file")]
    pub image: Option<String>,
    /// GPUs, all on one node.
    #[arg(long, default_value_t = 1)]
    pub gpus: i32,
    /// An acceptable GPU product, matched as a substring ("A100"); repeat for several. Any when absent.
    #[arg(long = "model")]
    pub models: Vec<String>,
    /// Least memory per GPU, a quantity such as 40Gi.
    #[arg(long)]
    pub min_memory: Option<String>,
    /// The most you pay per GPU-hour, in tokens ("2.50").
    #[arg(long)]
    pub max_price: Option<String>,
    /// The longest the job may run ("90m", "24h").
    #[arg(long)]
    pub max_duration: Option<String>,
    /// Where the job may run.
    #[arg(long, value_enum, default_value = "local-first")]
    pub mode: Mode,
    /// Only these organisations may run it; repeat for several.
    #[arg(long = "allow-org")]
    pub allow_orgs: Vec<String>,
    /// These organisations may never run it; repeat for several.
    #[arg(long = "deny-org")]
    pub deny_orgs: Vec<String>,
    /// How long bids are collected ("5s").
    #[arg(long)]
    pub window: Option<String>,
    /// Choose the bid yourself (`gpupool accept`) instead of the cheapest winning.
    #[arg(long)]
    pub manual: bool,
    /// An annotation on the workload's pods, KEY=VALUE; repeat for several.
    #[arg(long = "pod-annotation", value_parser = key_value)]
    pub pod_annotations: Vec<(String, String)>,
    /// The container's command and arguments, after `--`.
    #[arg(last = true)]
    pub command: Vec<String>,
}

fn key_value(s: &str) -> Result<(String, String), String> {
    s.split_once('=')
        .filter(|(k, _)| !k.is_empty())
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .ok_or_else(|| format!("{s:?} is not KEY=VALUE"))
}

/// The AiJob the flags describe. The API server validates it (CEL and
/// schema); this only refuses what flags alone cannot express.
pub fn build(f: &JobFlags) -> anyhow::Result<AiJob> {
    let (Some(name), Some(image)) = (&f.name, &f.image) else {
        anyhow::bail!("a job needs a NAME and --image, or -f FILE");
    };
    let max_price = f
        .max_price
        .clone()
        .context("--max-price is required: the most you pay per GPU-hour, such as 2.50")?;
    let mut container = serde_json::json!({"name": "main", "image": image});
    if !f.command.is_empty() {
        container["command"] = serde_json::json!(f.command);
    }
    let mut gpus = serde_json::json!({"count": f.gpus, "models": f.models});
    if let Some(m) = &f.min_memory {
        gpus["minMemory"] = serde_json::json!(m);
    }
    let mut spec = serde_json::json!({
        "template": {
            "metadata": {"annotations": f.pod_annotations.iter().cloned().collect::<std::collections::BTreeMap<_, _>>()},
            "spec": {"containers": [container], "restartPolicy": "Never"},
        },
        "gpus": gpus,
        "maxPricePerGpuHour": max_price,
        "placement": {"mode": f.mode.spec(), "allowedOrgs": f.allow_orgs, "deniedOrgs": f.deny_orgs},
        "bidding": {"selection": if f.manual { "Manual" } else { "Auto" }},
    });
    if let Some(d) = &f.max_duration {
        spec["maxDuration"] = serde_json::json!(d);
    }
    if let Some(w) = &f.window {
        spec["bidding"]["window"] = serde_json::json!(w);
    }
    serde_json::from_value(serde_json::json!({
        "apiVersion": "gpupool.dev/v1alpha1",
        "kind": "AiJob",
        "metadata": {"name": name},
        "spec": spec,
    }))
    .context("building the AiJob from flags")
}

fn read_file(path: &PathBuf) -> anyhow::Result<AiJob> {
    let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    serde_saphyr::from_str(&text).with_context(|| format!("{} is not an AiJob", path.display()))
}

/// The AiJob `-f` names, or the one the flags describe.
pub fn job_from(f: &JobFlags) -> anyhow::Result<AiJob> {
    match &f.file {
        Some(path) => read_file(path),
        None => build(f),
    }
}

/// `gpupool submit`: creates the AiJob. The API server's refusal (a bad
/// price, a name too long, an unknown mode) comes back as its own message.
pub async fn submit(ns: &NamespaceOpt, f: &JobFlags) -> anyhow::Result<(String, String)> {
    let job = job_from(f)?;
    let name = job.metadata.name.clone().unwrap_or_default();
    // A file's own namespace wins over the kubeconfig's, as with kubectl.
    let ns = NamespaceOpt {
        namespace: ns.namespace.clone().or_else(|| job.metadata.namespace.clone()),
    };
    let api: Api<AiJob> = ns.api(kube_client().await?);
    match api.create(&PostParams::default(), &job).await {
        Ok(_) => {}
        Err(kube::Error::Api(s)) if s.code == 409 => {
            anyhow::bail!("AiJob {name} already exists; pick another name or delete it first")
        }
        Err(kube::Error::Api(s)) if s.code == 422 || s.code == 400 => {
            anyhow::bail!("the API server refused AiJob {name}: {}", s.message)
        }
        Err(e) => return Err(anyhow::Error::new(e).context(format!("creating AiJob {name}"))),
    }
    Ok((name.clone(), format!("aijob/{name} submitted\n")))
}

/// Whether a job in `phase` has got where `want` asks, and if so, with
/// which exit code: a Failed job is never a success, whatever was waited for.
pub fn reached(want: WaitFor, phase: Option<AiJobPhase>) -> Option<u8> {
    use AiJobPhase::*;
    let p = phase?;
    if p == Failed {
        return Some(EXIT_JOB_FAILED);
    }
    let ok = match want {
        WaitFor::Leased => matches!(p, Leased | Running | Succeeded),
        WaitFor::Running => matches!(p, Running | Succeeded),
        WaitFor::Done => p == Succeeded,
    };
    ok.then_some(0)
}

/// A wait that ended anywhere but where it was asked to: main turns it into
/// the exit code.
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct WaitEnded {
    pub code: u8,
    pub message: String,
}

/// Watches one AiJob, printing each change of phase or reason to stderr,
/// until it gets where `want` asks, fails, or `timeout` runs out.
pub async fn wait(ns: &NamespaceOpt, name: &str, want: WaitFor, timeout: Duration) -> anyhow::Result<String> {
    let api: Api<AiJob> = ns.api(kube_client().await?);
    let start = Instant::now();
    let mut stream = watcher(api, watcher::Config::default().fields(&format!("metadata.name={name}")))
        .default_backoff()
        .applied_objects()
        .boxed();
    let mut last = String::new();
    let mut seen: Option<AiJob> = None;
    let watched = tokio::time::timeout(timeout, async {
        while let Some(event) = stream.next().await {
            // The watcher retries on its own with backoff; an error is only news.
            let job = match event {
                Ok(j) => j,
                Err(e) => {
                    eprintln!(
                        "[{:>6.1}s] watch interrupted: {e}; retrying",
                        start.elapsed().as_secs_f64()
                    );
                    continue;
                }
            };
            let st = job.status.clone().unwrap_or_default();
            let line = crate::output::progress_line(
                st.phase.map(|p| format!("{p:?}")).as_deref(),
                st.message.as_deref().unwrap_or_default(),
            );
            if line != last {
                eprintln!("[{:>6.1}s] {line}", start.elapsed().as_secs_f64());
                last = line;
            }
            if let Some(code) = reached(want, st.phase) {
                return Some((code, job));
            }
            seen = Some(job);
        }
        None
    })
    .await;
    match watched {
        Ok(Some((0, job))) => Ok(summary(&job)),
        Ok(Some((code, job))) => Err(WaitEnded {
            code,
            message: format!("AiJob {name} failed: {}", summary(&job).trim_end()),
        }
        .into()),
        Ok(None) => anyhow::bail!("the watch on AiJob {name} ended"),
        Err(_) => Err(WaitEnded {
            code: EXIT_TIMED_OUT,
            message: format!(
                "timed out after {}s waiting for AiJob {name} to be {want:?}; last seen {}",
                timeout.as_secs(),
                seen.as_ref().map_or_else(
                    || "nothing (does it exist?)".into(),
                    |j| summary(j).trim_end().to_string()
                )
            ),
        }
        .into()),
    }
}

/// One line on where a job is, for the end of a wait.
fn summary(job: &AiJob) -> String {
    let name = job.metadata.name.clone().unwrap_or_default();
    let st = job.status.clone().unwrap_or_default();
    let phase = st.phase.map_or_else(|| "Pending".into(), |p| format!("{p:?}"));
    let mut s = format!("aijob/{name} {phase}");
    if let Some(r) = &st.runs_on {
        s.push_str(&format!(" in {}", r.org));
        if let Some(p) = &r.gpu_product {
            s.push_str(&format!(" on {p}"));
        }
    }
    if let Some(code) = st.exit_code {
        s.push_str(&format!(", exit code {code}"));
    }
    if let Some(cost) = &st.cost_so_far {
        s.push_str(&format!(", cost {} tokens", gpupool_crds::price::shown(cost)));
    }
    if let Some(m) = st.message.filter(|m| !m.is_empty()) {
        s.push_str(&format!(": {m}"));
    }
    s + "\n"
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct T {
        #[command(flatten)]
        f: JobFlags,
    }

    fn flags(args: &[&str]) -> JobFlags {
        T::try_parse_from(std::iter::once("t").chain(args.iter().copied()))
            .unwrap()
            .f
    }

    #[test]
    fn flags_make_the_aijob_a_manifest_would() {
        let j = build(&flags(&[
            "train",
            "--image",
            "ghcr.io/x/train:1",
            "--gpus",
            "4",
            "--model",
            "A100",
            "--model",
            "H100",
            "--max-price",
            "2.5",
            "--mode",
            "pool-only",
            "--deny-org",
            "evil",
            "--window",
            "2s",
            "--manual",
            "--pod-annotation",
            "team=vision",
            "--",
            "python",
            "train.py",
        ]))
        .unwrap();
        assert_eq!(j.metadata.name.as_deref(), Some("train"));
        assert_eq!(j.spec.gpus.count, 4);
        assert_eq!(j.spec.gpus.models, ["A100", "H100"]);
        assert_eq!(j.spec.max_price_per_gpu_hour, "2.5");
        assert_eq!(j.spec.placement.denied_orgs, ["evil"]);
        assert_eq!(j.spec.bidding.selection, gpupool_crds::BidSelection::Manual);
        assert_eq!(j.spec.bidding.window, Duration::from_secs(2));
        let c = &j.spec.template.spec.as_ref().unwrap().containers[0];
        assert_eq!(c.image.as_deref(), Some("ghcr.io/x/train:1"));
        assert_eq!(
            c.command.as_deref(),
            Some(&["python".to_string(), "train.py".to_string()][..])
        );
        let ann = j.spec.template.metadata.as_ref().unwrap().annotations.as_ref().unwrap();
        assert_eq!(ann.get("team").map(String::as_str), Some("vision"));
        let v = serde_json::to_value(&j).unwrap();
        assert_eq!(v["spec"]["placement"]["mode"], "PoolOnly");
    }

    #[test]
    fn a_job_from_flags_needs_a_price_and_bad_durations_are_named() {
        let e = build(&flags(&["train", "--image", "x"])).unwrap_err();
        assert!(e.to_string().contains("--max-price is required"), "{e}");
        let e = build(&flags(&[
            "train",
            "--image",
            "x",
            "--max-price",
            "1",
            "--window",
            "soon",
        ]))
        .unwrap_err();
        assert!(format!("{e:#}").contains("building the AiJob"), "{e:#}");
        assert!(
            T::try_parse_from(["t", "train"]).is_err(),
            "an image is required without -f"
        );
        assert!(T::try_parse_from(["t", "-f", "job.yaml"]).is_ok());
        assert!(T::try_parse_from(["t", "j", "--image", "x", "--pod-annotation", "novalue"]).is_err());
    }

    #[test]
    fn waits_end_with_codes_a_script_can_trust() {
        use AiJobPhase::*;
        assert_eq!(reached(WaitFor::Running, Some(Bidding)), None);
        assert_eq!(reached(WaitFor::Running, None), None);
        assert_eq!(reached(WaitFor::Leased, Some(Leased)), Some(0));
        assert_eq!(
            reached(WaitFor::Running, Some(Succeeded)),
            Some(0),
            "ran and already ended"
        );
        assert_eq!(reached(WaitFor::Done, Some(Running)), None);
        assert_eq!(reached(WaitFor::Done, Some(Succeeded)), Some(0));
        for want in [WaitFor::Leased, WaitFor::Running, WaitFor::Done] {
            assert_eq!(reached(want, Some(Failed)), Some(EXIT_JOB_FAILED));
        }
    }
}

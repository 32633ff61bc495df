//! What the end-to-end tests share: the environment, clients, and the
//! operator as a real process they can start, kill and restart.

use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use kube::Client;

use crate::cluster::{ClusterInfo, client_for, free_port, spawn, stop};
use crate::env::{TestEnv, default_root};

pub use crate::cluster::wait_for;

/// The (reason, note) of every Event in `ns` about the object named `name`.
pub async fn events_about(client: &Client, ns: &str, name: &str) -> Vec<(String, String)> {
    let events: kube::Api<k8s_openapi::api::events::v1::Event> = kube::Api::namespaced(client.clone(), ns);
    events
        .list(&kube::api::ListParams::default())
        .await
        .unwrap_or_else(|e| panic!("listing Events in {ns}: {e}"))
        .items
        .into_iter()
        .filter(|e| e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some(name))
        .map(|e| (e.reason.unwrap_or_default(), e.note.unwrap_or_default()))
        .collect()
}

/// The value of one series (`name` or `name{label="value"}`) in an
/// operator's Prometheus text; 0 when it is absent.
pub fn sample(metrics: &str, series: &str) -> f64 {
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0.0)
}

/// The environment `make testenv-up` started. Tests fail, loudly, without one.
pub fn testenv() -> TestEnv {
    match TestEnv::load(&default_root()) {
        Ok(env) => env,
        Err(e) => panic!("{e:#}. The e2e tests run against real clusters: use `make e2e`, which starts them."),
    }
}

/// The repository's root: the chart, the scripts and `target/` are under it.
pub fn workspace() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// A built workspace binary, from `target/<profile>` next to this crate.
pub fn workspace_bin(name: &str) -> PathBuf {
    let var = format!("GPUPOOL_{}_BIN", name.to_uppercase().replace('-', "_"));
    if let Some(p) = std::env::var_os(&var) {
        return PathBuf::from(p);
    }
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace().join("target"));
    let path = target.join("debug").join(name);
    assert!(
        path.exists(),
        "{} is not built; run `cargo build --bins` (or `make e2e`)",
        path.display()
    );
    path
}

pub async fn admin(org: &ClusterInfo) -> Client {
    client_for(&org.admin_kubeconfig).await.expect("admin client")
}

/// The operator, running as its own process under its RBAC identity.
/// Dropping it stops it.
pub struct Operator {
    pid: u32,
    pub metrics_port: u16,
    pub log: PathBuf,
}

impl Operator {
    pub fn start(org: &ClusterInfo, tag: &str) -> Self {
        Self::start_with(org, tag, &[])
    }

    /// Starts it with extra flags (the chain settings, for one).
    pub fn start_with(org: &ClusterInfo, tag: &str, extra: &[String]) -> Self {
        let metrics_port = free_port().expect("port");
        let log = org.dir.join("logs").join(format!("operator-{tag}.log"));
        let mut args = vec![
            format!("--org={}", org.org.name),
            format!("--metrics-addr=127.0.0.1:{metrics_port}"),
            "--wait-requeue-seconds=1".into(),
        ];
        args.extend_from_slice(extra);
        // One replica per organisation at a time, named like a pod whose
        // container restarts: it takes its own leader claim back at once,
        // where a new name would wait out a killed one's.
        let pod_name = format!("gpupool-operator-{}", org.org.name);
        let pid = spawn(
            &workspace_bin("gpupool-operator"),
            &args,
            &[
                ("KUBECONFIG", &org.operator_kubeconfig),
                ("POD_NAME", std::path::Path::new(&pod_name)),
            ],
            &log,
        )
        .expect("start operator");
        Self { pid, metrics_port, log }
    }

    /// Kills it the hard way, as a node failure or OOM would.
    pub fn kill(self) {
        let _ = Command::new("kill")
            .args(["-s", "KILL", "--", &format!("-{}", self.pid)])
            .status();
        std::thread::sleep(Duration::from_millis(200));
        std::mem::forget(self);
    }

    /// The Prometheus text the operator serves, or "" while it is not up.
    pub async fn metrics(&self) -> String {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let Ok(mut conn) = tokio::net::TcpStream::connect(("127.0.0.1", self.metrics_port)).await else {
            return String::new();
        };
        let req = "GET /metrics HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n";
        let mut body = String::new();
        if conn.write_all(req.as_bytes()).await.is_err() || conn.read_to_string(&mut body).await.is_err() {
            return String::new();
        }
        body.split_once("\r\n\r\n")
            .map(|(_, b)| b.to_string())
            .unwrap_or_default()
    }
}

impl Drop for Operator {
    fn drop(&mut self) {
        stop(&[self.pid]);
    }
}

/// A fresh namespace for one test.
pub async fn namespace(client: &Client, prefix: &str) -> String {
    use k8s_openapi::api::core::v1::Namespace;
    use kube::api::{Api, PostParams};
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    let name = format!("{prefix}-{:x}", nanos);
    let ns: Namespace = serde_json::from_value(serde_json::json!({ "metadata": { "name": name } })).expect("namespace");
    Api::<Namespace>::all(client.clone())
        .create(&PostParams::default(), &ns)
        .await
        .expect("create namespace");
    name
}

/// Deletes a test's namespace and waits until it is gone. Called while the
/// test's operators still run, so their finalizers settle what it held
/// (AiJobs, leases) and nothing of it is left for the next test.
pub async fn remove_namespace(client: &Client, ns: &str) {
    use k8s_openapi::api::core::v1::Namespace;
    use kube::api::{Api, DeleteParams};
    let api: Api<Namespace> = Api::all(client.clone());
    let _ = api.delete(ns, &DeleteParams::default()).await;
    wait_for(Duration::from_secs(90), "test namespace gone", || async {
        matches!(api.get_opt(ns).await, Ok(None)).then_some(())
    })
    .await
    .expect("the test namespace to be deleted");
}

/// An AiJob as JSON: `gpus` GPUs of `models`, a pod that runs for
/// `duration` in the simulated cluster, and `extra` merged into the spec.
pub fn aijob_json(
    name: &str,
    gpus: i32,
    models: &[&str],
    duration: &str,
    extra: serde_json::Value,
) -> serde_json::Value {
    let mut spec = serde_json::json!({
        "template": {
            "metadata": { "annotations": { "sim.gpupool.dev/duration": duration } },
            "spec": { "containers": [{ "name": "train", "image": "ghcr.io/example/train:1" }] }
        },
        "gpus": { "count": gpus, "models": models },
        "maxPricePerGpuHour": "2.50",
    });
    if let (Some(base), Some(more)) = (spec.as_object_mut(), extra.as_object()) {
        for (k, v) in more {
            base.insert(k.clone(), v.clone());
        }
    }
    serde_json::json!({
        "apiVersion": "gpupool.dev/v1alpha1",
        "kind": "AiJob",
        "metadata": { "name": name },
        "spec": spec,
    })
}

/// What one run of the `gpupool` CLI did.
pub struct CliRun {
    pub code: Option<i32>,
    pub out: String,
    pub err: String,
}

/// Runs the built `gpupool` CLI with `args` and `env` set, as a user would.
pub fn run_gpupool(args: &[&str], env: &[(&str, &std::ffi::OsStr)]) -> CliRun {
    let out = std::process::Command::new(workspace_bin("gpupool"))
        .args(args)
        .envs(env.iter().copied())
        .output()
        .expect("run gpupool");
    CliRun {
        code: out.status.code(),
        out: String::from_utf8_lossy(&out.stdout).into_owned(),
        err: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

//! Starts one organisation's real control plane on loopback: etcd,
//! kube-apiserver, kube-controller-manager, kube-scheduler and kwok, plus
//! simulated GPU nodes and (optionally) one gpupool agent per node.

use std::fs::File;
use std::net::TcpListener;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use gpupool_crds::GpuNode;
use k8s_openapi::api::core::v1::Node;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Api, ListParams, Patch, PatchParams, PostParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::{Client, Config};
use serde::{Deserialize, Serialize};

use crate::certs::{self, Ca};
use crate::kubeapply::{FIELD_MANAGER, apply_yaml};
use crate::orgs::OrgSpec;

/// The chart's ServiceAccounts, as the API server names them.
pub const OPERATOR_USER: &str = "system:serviceaccount:gpupool-system:gpupool-operator";
pub const AGENT_USER: &str = "system:serviceaccount:gpupool-system:gpupool-agent";

/// What a started cluster left behind for others to use.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ClusterInfo {
    pub org: OrgSpec,
    pub dir: PathBuf,
    pub server: String,
    /// Full rights, for tests and people.
    pub admin_kubeconfig: PathBuf,
    /// The operator's identity, bound by the chart's RBAC.
    pub operator_kubeconfig: PathBuf,
    /// The agents' identity.
    pub agent_kubeconfig: PathBuf,
    pub nodes: Vec<String>,
    /// Simulated inventory file per node, in `nodes` order.
    pub inventories: Vec<PathBuf>,
    /// Process groups to stop on teardown.
    pub pids: Vec<u32>,
}

/// Picks a free loopback port for a server to bind. Ports come from below
/// Linux's ephemeral range (32768+), so outgoing connections of the very
/// processes we start cannot take them first, and none is handed out twice
/// by this process.
pub fn free_port() -> std::io::Result<u16> {
    static GIVEN: std::sync::Mutex<std::collections::BTreeSet<u16>> =
        std::sync::Mutex::new(std::collections::BTreeSet::new());
    let mut given = GIVEN.lock().unwrap_or_else(|e| e.into_inner());
    let seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0)
        ^ std::process::id().rotate_left(16);
    let mut x = u64::from(seed) | 1;
    for _ in 0..1000 {
        // xorshift: cheap spread over the range without another dependency.
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let port = 20000 + (x % 12000) as u16;
        if given.contains(&port) {
            continue;
        }
        // Free for both TCP and UDP: pool members listen on QUIC at the same
        // port number.
        if TcpListener::bind(("127.0.0.1", port)).is_ok() && std::net::UdpSocket::bind(("127.0.0.1", port)).is_ok() {
            given.insert(port);
            return Ok(port);
        }
    }
    Err(std::io::Error::other("no free loopback port in 20000-31999"))
}

/// A Node that kwok plays the kubelet for (it manages nodes annotated
/// `kwok.x-k8s.io/node=fake`), tainted so only GPU pods land on it; `labels` are
/// added to the usual ones.
pub fn simulated_node(name: &str, labels: serde_json::Value) -> anyhow::Result<Node> {
    let mut node = serde_json::json!({
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {
            "name": name,
            "annotations": { "kwok.x-k8s.io/node": "fake", "node.alpha.kubernetes.io/ttl": "0" },
            "labels": {
                "kubernetes.io/hostname": name,
                "kubernetes.io/os": "linux",
                "kubernetes.io/arch": "amd64",
                "type": "kwok",
                // As NVIDIA's GPU feature discovery labels a GPU node: the
                // chart's agent DaemonSet selects it.
                "nvidia.com/gpu.present": "true",
            },
        },
        "spec": { "taints": [{ "key": gpupool_crds::GPU_RESOURCE, "effect": "NoSchedule" }] },
    });
    if let (Some(all), Some(extra)) = (node["metadata"]["labels"].as_object_mut(), labels.as_object()) {
        all.extend(extra.clone());
    }
    Ok(serde_json::from_value(node)?)
}

/// The status patch giving a simulated node its CPU, memory and `gpus` GPUs.
pub fn simulated_node_status(gpus: u32) -> serde_json::Value {
    let capacity = serde_json::json!({
        "cpu": "192", "memory": "2Ti", "pods": "110", "ephemeral-storage": "30Ti",
        gpupool_crds::GPU_RESOURCE: gpus.to_string(),
    });
    serde_json::json!({ "status": { "capacity": capacity, "allocatable": capacity } })
}

/// Starts a process in its own process group, output to `log`.
pub fn spawn(bin: &Path, args: &[String], env: &[(&str, &Path)], log: &Path) -> anyhow::Result<u32> {
    let out = File::create(log)?;
    let mut cmd = Command::new(bin);
    cmd.args(args)
        .stdin(Stdio::null())
        .stdout(out.try_clone()?)
        .stderr(out)
        .process_group(0);
    for (k, v) in env {
        cmd.env(k, v);
    }
    let child = cmd
        .spawn()
        .map_err(|e| anyhow::anyhow!("starting {}: {e}", bin.display()))?;
    Ok(child.id())
}

pub async fn client_for(kubeconfig: &Path) -> anyhow::Result<Client> {
    let kc = Kubeconfig::read_from(kubeconfig)?;
    let config = Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default()).await?;
    Ok(Client::try_from(config)?)
}

async fn wait_ready(client: &Client, what: &str, logs: &Path, timeout: Duration) -> anyhow::Result<()> {
    let start = Instant::now();
    loop {
        let req = http::Request::get("/readyz").body(Vec::new())?;
        match client.request_text(req).await {
            Ok(body) if body.trim() == "ok" => return Ok(()),
            other => {
                if start.elapsed() > timeout {
                    anyhow::bail!(
                        "{what} not ready after {timeout:?} ({other:?}); see logs in {}",
                        logs.display()
                    );
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

pub struct Binaries {
    pub dir: PathBuf,
    /// The gpupool agent; when set, one runs per simulated node.
    pub agent: Option<PathBuf>,
}

/// Starts one organisation's cluster and returns how to reach it.
/// Every process started is pushed to `pids` at once, so the caller can stop
/// them even when a later step fails.
pub async fn start(
    org: &OrgSpec,
    root: &Path,
    bins: &Binaries,
    stages: &Path,
    rbac: &str,
    pids: &mut Vec<u32>,
) -> anyhow::Result<ClusterInfo> {
    let dir = root.join(&org.name);
    let pki = dir.join("pki");
    let logs = dir.join("logs");
    for d in [&pki, &logs] {
        std::fs::create_dir_all(d)?;
    }
    let bin = |name: &str| bins.dir.join(name);
    let first_pid = pids.len();

    let ca = Ca::create(&pki, &org.name)?;
    let serving = ca.server(&pki)?;
    let (sa_key, sa_pub) = certs::service_account_key(&pki)?;
    let (etcd_port, etcd_peer, api_port, kcm_port, sched_port) =
        (free_port()?, free_port()?, free_port()?, free_port()?, free_port()?);
    let server = format!("https://127.0.0.1:{api_port}");
    let kubeconfig = |file: &str, user: &str, groups: &[&str]| -> anyhow::Result<PathBuf> {
        let certs = ca.client(&pki, file, user, groups)?;
        let path = dir.join(format!("{file}.kubeconfig"));
        std::fs::write(
            &path,
            certs::kubeconfig(&server, &ca.cert_path, &certs, &org.name, file),
        )?;
        Ok(path)
    };
    let admin = kubeconfig("admin", "gpupool-admin", &["system:masters"])?;
    let kcm = kubeconfig("controller-manager", "system:kube-controller-manager", &[])?;
    let sched = kubeconfig("scheduler", "system:kube-scheduler", &[])?;
    // kwok plays every kubelet of the fleet; the Node authorizer knows only
    // real kubelets, so it gets full rights in this simulated cluster.
    let kwok = kubeconfig("kwok", "kwok-controller", &["system:masters"])?;
    let operator = kubeconfig("operator", OPERATOR_USER, &[])?;
    let agent = kubeconfig("agent", AGENT_USER, &[])?;

    let s = |p: &Path| p.display().to_string();
    let audit_policy = stages.with_file_name("audit-policy.yaml");
    pids.push(spawn(
        &bin("etcd"),
        &[
            "--name=default".into(),
            format!("--data-dir={}", s(&dir.join("etcd"))),
            format!("--listen-client-urls=http://127.0.0.1:{etcd_port}"),
            format!("--advertise-client-urls=http://127.0.0.1:{etcd_port}"),
            format!("--listen-peer-urls=http://127.0.0.1:{etcd_peer}"),
            format!("--initial-advertise-peer-urls=http://127.0.0.1:{etcd_peer}"),
            format!("--initial-cluster=default=http://127.0.0.1:{etcd_peer}"),
            "--unsafe-no-fsync=true".into(),
            "--quota-backend-bytes=4294967296".into(),
            "--log-level=warn".into(),
        ],
        &[],
        &logs.join("etcd.log"),
    )?);
    pids.push(spawn(
        &bin("kube-apiserver"),
        &[
            format!("--etcd-servers=http://127.0.0.1:{etcd_port}"),
            "--bind-address=127.0.0.1".into(),
            "--advertise-address=127.0.0.1".into(),
            format!("--secure-port={api_port}"),
            format!("--tls-cert-file={}", s(&serving.cert)),
            format!("--tls-private-key-file={}", s(&serving.key)),
            format!("--client-ca-file={}", s(&ca.cert_path)),
            format!("--service-account-key-file={}", s(&sa_pub)),
            format!("--service-account-signing-key-file={}", s(&sa_key)),
            "--service-account-issuer=https://kubernetes.default.svc".into(),
            "--service-cluster-ip-range=10.96.0.0/16".into(),
            "--authorization-mode=Node,RBAC".into(),
            "--endpoint-reconciler-type=none".into(),
            "--allow-privileged=true".into(),
            format!("--cert-dir={}", s(&pki)),
            // As in a default cluster: /debug/pprof (cluster-admin only) is
            // how a benchmark finds where the API server's CPU goes.
            "--profiling=true".into(),
            "--max-requests-inflight=2000".into(),
            "--max-mutating-requests-inflight=1000".into(),
            format!("--audit-policy-file={}", s(&audit_policy)),
            format!("--audit-log-path={}", s(&logs.join("audit.log"))),
            "--audit-log-maxsize=1024".into(),
        ],
        &[],
        &logs.join("kube-apiserver.log"),
    )?);
    let admin_client = client_for(&admin).await?;
    wait_ready(&admin_client, "kube-apiserver", &logs, Duration::from_secs(120)).await?;

    pids.push(spawn(
        &bin("kube-controller-manager"),
        &[
            format!("--kubeconfig={}", s(&kcm)),
            "--bind-address=127.0.0.1".into(),
            format!("--secure-port={kcm_port}"),
            "--leader-elect=false".into(),
            format!("--service-account-private-key-file={}", s(&sa_key)),
            format!("--root-ca-file={}", s(&ca.cert_path)),
            // Each controller acts as its own ServiceAccount with the narrow
            // bootstrap role RBAC gives it, as kubeadm clusters run.
            "--use-service-account-credentials=true".into(),
            "--kube-api-qps=500".into(),
            "--kube-api-burst=1000".into(),
            "--concurrent-job-syncs=50".into(),
            "--concurrent-gc-syncs=50".into(),
        ],
        &[],
        &logs.join("kube-controller-manager.log"),
    )?);
    pids.push(spawn(
        &bin("kube-scheduler"),
        &[
            format!("--kubeconfig={}", s(&sched)),
            "--bind-address=127.0.0.1".into(),
            format!("--secure-port={sched_port}"),
            "--leader-elect=false".into(),
        ],
        &[],
        &logs.join("kube-scheduler.log"),
    )?);

    // CRDs, and the chart's RBAC that our host processes run under.
    let crds: Api<CustomResourceDefinition> = Api::all(admin_client.clone());
    for crd in gpupool_crds::yaml::crds() {
        let name = crd.metadata.name.clone().unwrap_or_default();
        crds.patch(&name, &PatchParams::apply(FIELD_MANAGER).force(), &Patch::Apply(&crd))
            .await?;
    }
    wait_for(Duration::from_secs(60), "CRDs established", || async {
        let list = crds.list(&ListParams::default()).await.ok()?;
        let established = list
            .items
            .iter()
            .filter(|c| c.spec.group == gpupool_crds::GROUP)
            .filter(|c| {
                c.status
                    .as_ref()
                    .and_then(|s| s.conditions.as_ref())
                    .is_some_and(|cs| cs.iter().any(|c| c.type_ == "Established" && c.status == "True"))
            })
            .count();
        (established == gpupool_crds::yaml::crds().len()).then_some(())
    })
    .await?;
    apply_yaml(
        &admin_client,
        rbac,
        &[
            "Namespace",
            "ServiceAccount",
            "ClusterRole",
            "ClusterRoleBinding",
            "Role",
            "RoleBinding",
        ],
    )
    .await?;

    // Simulated GPU nodes, and kwok to play their kubelets.
    let nodes_api: Api<Node> = Api::all(admin_client.clone());
    let names = org.node_names();
    for name in &names {
        let node = simulated_node(name, serde_json::json!({ "gpupool.dev/org": org.name }))?;
        match nodes_api.create(&PostParams::default(), &node).await {
            Ok(_) => {}
            Err(kube::Error::Api(e)) if e.code == 409 => {}
            Err(e) => return Err(e.into()),
        }
        let status = simulated_node_status(org.fleet.gpus_per_node);
        nodes_api
            .patch_status(name, &PatchParams::default(), &Patch::Merge(&status))
            .await?;
    }
    pids.push(spawn(
        &bin("kwok"),
        &[
            format!("--kubeconfig={}", s(&kwok)),
            format!("--config={}", s(stages)),
            "--manage-all-nodes=false".into(),
            "--manage-nodes-with-annotation-selector=kwok.x-k8s.io/node=fake".into(),
            "--node-lease-duration-seconds=40".into(),
            "--cidr=10.0.0.1/24".into(),
            "--node-ip=10.0.0.1".into(),
        ],
        &[],
        &logs.join("kwok.log"),
    )?);
    wait_for(Duration::from_secs(60), "kwok nodes Ready", || async {
        let list = nodes_api.list(&ListParams::default()).await.ok()?;
        let ready = list
            .items
            .iter()
            .filter(|n| {
                n.status
                    .as_ref()
                    .and_then(|s| s.conditions.as_ref())
                    .is_some_and(|cs| cs.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
            })
            .count();
        (ready == names.len()).then_some(())
    })
    .await?;

    // One simulated inventory per node, and an agent reading it.
    let inv_dir = dir.join("inventory");
    std::fs::create_dir_all(&inv_dir)?;
    let mut inventories = Vec::new();
    for name in &names {
        let path = inv_dir.join(format!("{name}.yaml"));
        std::fs::write(
            &path,
            format!(
                "product: {}\nmemoryMib: {}\ncount: {}\nnvlinkLinks: {}\n",
                org.fleet.product, org.fleet.memory_mib, org.fleet.gpus_per_node, org.fleet.nvlink_links
            ),
        )?;
        inventories.push(path);
    }
    if let Some(agent_bin) = &bins.agent {
        for (name, inv) in names.iter().zip(&inventories) {
            pids.push(spawn(
                agent_bin,
                &[
                    format!("--node-name={name}"),
                    "--backend=simulated".into(),
                    format!("--inventory={}", s(inv)),
                    "--poll-seconds=1".into(),
                    "--heartbeat-seconds=30".into(),
                ],
                &[("KUBECONFIG", &agent)],
                &logs.join(format!("agent-{name}.log")),
            )?);
        }
        let gpunodes: Api<GpuNode> = Api::all(admin_client.clone());
        wait_for(Duration::from_secs(60), "agents' GpuNodes", || async {
            let list = gpunodes.list(&ListParams::default()).await.ok()?;
            (list
                .items
                .iter()
                .filter(|g| g.status.as_ref().is_some_and(|s| s.gpus_total > 0))
                .count()
                == names.len())
            .then_some(())
        })
        .await?;
    }

    Ok(ClusterInfo {
        org: org.clone(),
        dir,
        server,
        admin_kubeconfig: admin,
        operator_kubeconfig: operator,
        agent_kubeconfig: agent,
        nodes: names,
        inventories,
        pids: pids[first_pid..].to_vec(),
    })
}

/// Polls `f` until it returns Some, or fails after `timeout` naming `what`.
pub async fn wait_for<T, F, Fut>(timeout: Duration, what: &str, mut f: F) -> anyhow::Result<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let start = Instant::now();
    loop {
        if let Some(v) = f().await {
            return Ok(v);
        }
        if start.elapsed() > timeout {
            anyhow::bail!("timed out after {timeout:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Stops process groups: TERM, a grace period, then KILL.
pub fn stop(pids: &[u32]) {
    for pid in pids {
        let _ = Command::new("kill")
            .args(["-s", "TERM", "--", &format!("-{pid}")])
            .stderr(Stdio::null())
            .status();
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    while Instant::now() < deadline
        && pids
            .iter()
            .any(|p| Path::new(&format!("/proc/{p}")).exists() && !is_zombie(*p))
    {
        std::thread::sleep(Duration::from_millis(100));
    }
    for pid in pids {
        let _ = Command::new("kill")
            .args(["-s", "KILL", "--", &format!("-{pid}")])
            .stderr(Stdio::null())
            .status();
    }
}

fn is_zombie(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|s| s.contains(") Z "))
        .unwrap_or(true)
}

//! The chart, installed by Helm into a real cluster the way a data centre
//! joins the pool: bad values are refused before anything reaches the
//! cluster; good ones install an operator and agents that the control plane
//! schedules and kwok runs; an upgrade with a new price list rolls the
//! operator (it reads its policy once, at start); a refused upgrade leaves
//! the release as it was; a chart whose CRDs changed brings them along on
//! upgrade; monitoring on finds the operators' /metrics and a
//! standby gets a disruption budget; uninstalling removes what the release
//! made and keeps the CRDs, and with them every AiJob.
//!
//! kwok plays the pods, so no image is pulled: this checks the chart, its
//! schema and its RBAC against the API server, not the operator's own work,
//! which every other e2e test checks under the same rendered RBAC.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use gpupool_chain::ChainConfig;
use gpupool_e2e::cluster::ClusterInfo;
use gpupool_e2e::harness::{admin, namespace, remove_namespace, testenv, wait_for, workspace, workspace_bin};
use gpupool_operator::market::policy::ProviderPolicy;
use k8s_openapi::api::apps::v1::{DaemonSet, Deployment};
use k8s_openapi::api::authorization::v1::{ResourceAttributes, SubjectAccessReview, SubjectAccessReviewSpec};
use k8s_openapi::api::core::v1::{ConfigMap, Pod, Secret, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::api::networking::v1::NetworkPolicy;
use k8s_openapi::api::node::v1::RuntimeClass;
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use k8s_openapi::api::rbac::v1::ClusterRole;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::Client;
use kube::api::{Api, DeleteParams, DynamicObject, ListParams, Patch, PatchParams, PostParams, ResourceExt};
use kube::core::ApiResource;

const H100: &str = "NVIDIA H100 80GB HBM3";

/// Helm against one test cluster, with its own config and cache directories
/// so a person's Helm repositories and settings play no part. The release is
/// named after the test's namespace, so its cluster-scoped names are this
/// run's alone.
struct Helm {
    bin: PathBuf,
    kubeconfig: PathBuf,
    home: PathBuf,
    ns: String,
    chart: PathBuf,
    values: PathBuf,
}

impl Helm {
    fn run(&self, args: &[&str]) -> Output {
        let out = Command::new(&self.bin)
            .args(args)
            .args(["--namespace", &self.ns, "--kubeconfig"])
            .arg(&self.kubeconfig)
            .env("HELM_CONFIG_HOME", self.home.join("config"))
            .env("HELM_CACHE_HOME", self.home.join("cache"))
            .env("HELM_DATA_HOME", self.home.join("data"))
            .env("HELM_CONTENT_CACHE", self.home.join("content"))
            .output()
            .unwrap_or_else(|e| panic!("running {}: {e}", self.bin.display()));
        eprintln!(
            "helm {}: {}\n{}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        out
    }

    /// `helm install|upgrade` of the chart with the test's values and `extra` flags.
    fn deploy(&self, verb: &str, extra: &[&str]) -> Output {
        let chart = self.chart.to_string_lossy().into_owned();
        let values = self.values.to_string_lossy().into_owned();
        let mut args = vec![verb, self.ns.as_str(), chart.as_str(), "--values", values.as_str()];
        args.extend_from_slice(extra);
        self.run(&args)
    }

    fn releases(&self) -> String {
        // Every state a release can be in, a failed install's included.
        let out = self.run(&[
            "list",
            "--short",
            "--deployed",
            "--failed",
            "--pending",
            "--uninstalling",
        ]);
        assert!(out.status.success(), "helm list failed");
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    }

    fn revision(&self) -> i64 {
        let out = self.run(&["status", &self.ns, "--output", "json"]);
        assert!(out.status.success(), "helm status failed");
        let status: serde_json::Value = serde_json::from_slice(&out.stdout).expect("helm status JSON");
        assert_eq!(status["info"]["status"], "deployed", "{status}");
        status["version"].as_i64().expect("a revision")
    }
}

/// The values a data centre writes: its org, the chain, its wallet Secret,
/// bootstrap peers and a price list. The simulated agent backend and the
/// tolerations are there because kwok's nodes stand in for GPU nodes.
/// A cold wallet the chart sweeps earnings to.
const SWEEP_TO: &str = "0x00000000000000000000000000000000000c01d5";

fn values(chain: &ChainConfig) -> serde_json::Value {
    serde_json::json!({
        "org": "helm-dc",
        "image": { "tag": "e2e" },
        "operator": {
            "tolerations": [{ "key": gpupool_crds::GPU_RESOURCE, "operator": "Exists", "effect": "NoSchedule" }],
            "networkPolicy": { "enabled": true, "poolApiFrom": [{ "ipBlock": { "cidr": RENTERS } }] },
        },
        "chain": {
            "rpcUrl": chain.rpc_url,
            "chainId": chain.chain_id,
            "escrowAddress": chain.escrow.to_string(),
            "tokenAddress": chain.token.to_string(),
            "walletSecret": { "name": "gpupool-wallet", "key": "key" },
            "sweep": { "to": SWEEP_TO, "keep": "50" },
        },
        "pool": {
            "enabled": true,
            "bootstrap": ["/ip4/127.0.0.1/tcp/4001"],
            "announce": ["/dns4/pool.helm-dc.example.org/tcp/4001", "/dns4/pool.helm-dc.example.org/udp/4001/quic-v1"],
            "relay": { "via": [RELAY], "serve": true, "maxCircuits": 64 },
            "api": { "enabled": true },
            "ping": { "everySeconds": 5, "timeoutSeconds": 10 },
            "policy": {
                "prices": [{ "model": "H100", "pricePerGpuHour": "2.50" }],
                "maxLentGpus": 8,
                "maxHeldGpusPerRenter": 4,
                "deniedOrgs": ["evil"],
            },
        },
        "agent": {
            "backend": "simulated",
            "simulatedInventory": { "product": H100, "memoryMib": 81559, "count": 8 },
            "runtimeClassName": "nvidia",
        },
    })
}

/// Where this data centre's renters call its Pool API from.
const RENTERS: &str = "203.0.113.0/24";

/// A member serving as a relay, as `pool.relay.via` names it.
const RELAY: &str = "/dns4/pool.relay.example.org/tcp/4001/p2p/12D3KooWDpJ7As7BWAwRMfu1VU2WCqNjvq387JEYKDBj4kx6nXTN";

/// The policy the chart rendered, read by the operator's own loader.
async fn rendered_policy(client: &Client, ns: &str, dir: &Path) -> ProviderPolicy {
    let cm = Api::<ConfigMap>::namespaced(client.clone(), ns)
        .get("gpupool-policy")
        .await
        .expect("the policy ConfigMap");
    let text = cm
        .data
        .and_then(|mut d| d.remove("policy.yaml"))
        .expect("policy.yaml in the ConfigMap");
    let path = dir.join("policy.yaml");
    std::fs::write(&path, text).expect("write policy");
    ProviderPolicy::load(&path).unwrap_or_else(|e| panic!("the operator refuses the chart's policy: {e}"))
}

fn env_value(d: &Deployment, name: &str) -> Option<String> {
    d.spec
        .as_ref()?
        .template
        .spec
        .as_ref()?
        .containers
        .first()?
        .env
        .as_ref()?
        .iter()
        .find(|e| e.name == name)?
        .value
        .clone()
}

fn policy_checksum(d: &Deployment) -> String {
    d.spec
        .as_ref()
        .and_then(|s| s.template.metadata.as_ref())
        .and_then(|m| m.annotations.as_ref())
        .and_then(|a| a.get("checksum/policy").cloned())
        .expect("the operator's pod template carries checksum/policy")
}

/// Whether the operator's ServiceAccount in `ns` may do `verb` on `resource`.
async fn operator_may(client: &Client, ns: &str, verb: &str, group: &str, resource: &str, in_ns: Option<&str>) -> bool {
    let review = SubjectAccessReview {
        spec: SubjectAccessReviewSpec {
            user: Some(format!("system:serviceaccount:{ns}:gpupool-operator")),
            resource_attributes: Some(ResourceAttributes {
                verb: Some(verb.into()),
                group: Some(group.into()),
                resource: Some(resource.into()),
                namespace: in_ns.map(str::to_owned),
                ..Default::default()
            }),
            ..Default::default()
        },
        ..Default::default()
    };
    let out = Api::<SubjectAccessReview>::all(client.clone())
        .create(&PostParams::default(), &review)
        .await
        .expect("SubjectAccessReview");
    out.status.is_some_and(|s| s.allowed)
}

/// The Prometheus Operator kinds the chart renders: (kind, plural).
const MONITORING_KINDS: [(&str, &str); 2] = [
    ("ServiceMonitor", "servicemonitors"),
    ("PrometheusRule", "prometheusrules"),
];

fn monitoring_resource(kind: &str, plural: &str) -> ApiResource {
    ApiResource {
        group: "monitoring.coreos.com".into(),
        version: "v1".into(),
        api_version: "monitoring.coreos.com/v1".into(),
        kind: kind.into(),
        plural: plural.into(),
    }
}

/// The Prometheus Operator's ServiceMonitor and PrometheusRule kinds, so the
/// API server serves them and Helm sees them among the cluster's
/// capabilities. Only their group, version and kind stand in for the real
/// CRDs: what the test checks is what the chart renders into them.
async fn add_monitoring_crds(client: &Client) {
    let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
    for (kind, plural) in MONITORING_KINDS {
        let name = format!("{plural}.monitoring.coreos.com");
        let crd: CustomResourceDefinition = serde_json::from_value(serde_json::json!({
            "metadata": { "name": name },
            "spec": {
                "group": "monitoring.coreos.com",
                "scope": "Namespaced",
                "names": { "plural": plural, "singular": kind.to_lowercase(), "kind": kind, "listKind": format!("{kind}List") },
                "versions": [{
                    "name": "v1", "served": true, "storage": true,
                    "schema": { "openAPIV3Schema": { "type": "object", "x-kubernetes-preserve-unknown-fields": true } },
                }],
            },
        }))
        .expect("CRD");
        crds.patch(&name, &PatchParams::apply("gpupool-e2e").force(), &Patch::Apply(&crd))
            .await
            .unwrap_or_else(|e| panic!("apply the {kind} CRD: {e}"));
        wait_for(Duration::from_secs(30), "the kind served", || async {
            let api = Api::<DynamicObject>::all_with(client.clone(), &monitoring_resource(kind, plural));
            api.list(&ListParams::default().limit(1)).await.ok().map(|_| ())
        })
        .await
        .unwrap_or_else(|e| panic!("the {kind} CRD established: {e}"));
    }
}

async fn remove_monitoring_crds(client: &Client) {
    let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
    for (_, plural) in MONITORING_KINDS {
        crds.delete(&format!("{plural}.monitoring.coreos.com"), &DeleteParams::default())
            .await
            .unwrap_or_else(|e| panic!("delete the {plural} CRD: {e}"));
    }
}

/// A copy of the chart at `to`, to change as a next release would.
fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).expect("create a chart directory");
    for entry in std::fs::read_dir(from).expect("read the chart") {
        let entry = entry.expect("a chart entry");
        let target = to.join(entry.file_name());
        if entry.file_type().expect("file type").is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), &target).expect("copy a chart file");
        }
    }
}

/// The operator Deployment once `replicas` pods of its current template are available.
async fn available(deployments: &Api<Deployment>, replicas: i32) -> Option<Deployment> {
    let d = deployments.get("gpupool-operator").await.ok()?;
    let s = d.status.as_ref()?;
    let rolled = s.observed_generation >= d.metadata.generation
        && s.updated_replicas == Some(replicas)
        && s.available_replicas == Some(replicas)
        && s.replicas == Some(replicas);
    rolled.then_some(d)
}

#[tokio::test]
async fn a_data_centre_installs_upgrades_and_removes_the_chart_with_helm() {
    let env = testenv();
    let org: &ClusterInfo = env.orgs.last().expect("an org");
    let chain_info = env.chain.as_ref().expect("the test environment's chain");
    let chain = ChainConfig::load(&chain_info.config).expect("chain config");
    let client = admin(org).await;
    let ns = namespace(&client, "helm").await;
    let home = env.root.join(format!("helm-{ns}"));
    std::fs::create_dir_all(&home).expect("helm home");
    let values_path = home.join("values.json");
    std::fs::write(&values_path, values(&chain).to_string()).expect("values");
    let helm = Helm {
        bin: env.tool("helm").expect("helm"),
        kubeconfig: org.admin_kubeconfig.clone(),
        home: home.clone(),
        ns: ns.clone(),
        chart: workspace().join("charts/gpupool"),
        values: values_path,
    };

    add_monitoring_crds(&client).await;
    // The NVIDIA runtime's class, as the GPU operator installs it: the API
    // server refuses pods that name a class it does not know.
    let runtime: RuntimeClass = serde_json::from_value(serde_json::json!({
        "metadata": { "name": "nvidia" },
        "handler": "nvidia",
    }))
    .expect("RuntimeClass");
    let runtimes: Api<RuntimeClass> = Api::all(client.clone());
    runtimes
        .patch(
            "nvidia",
            &PatchParams::apply("gpupool-e2e").force(),
            &Patch::Apply(&runtime),
        )
        .await
        .expect("apply the nvidia RuntimeClass");

    // The wallet Secret the chart mounts, as a data centre creates it.
    let key = std::fs::read_to_string(&chain_info.wallets[&org.org.name]).expect("wallet key");
    let secret: Secret = serde_json::from_value(serde_json::json!({
        "metadata": { "name": "gpupool-wallet" },
        "stringData": { "key": key.trim() },
    }))
    .expect("secret");
    Api::<Secret>::namespaced(client.clone(), &ns)
        .create(&PostParams::default(), &secret)
        .await
        .expect("create the wallet Secret");

    // 1. Mistakes are refused with what to change, and nothing is installed.
    let mistakes: &[(&[&str], &[&str])] = &[
        (
            &["--set", "pool.policy.maxLentGPUs=3"],
            &["/pool/policy", "additional properties 'maxLentGPUs' not allowed"],
        ),
        (
            &[
                "--set",
                "pool.policy.prices[0].model=H100,pool.policy.prices[0].pricePerGpuHour=two",
            ],
            &["/pool/policy/prices/0/pricePerGpuHour", "does not match pattern"],
        ),
        (
            &["--set", "pool.policy.maxLentGpus=-1"],
            &["/pool/policy/maxLentGpus", "minimum"],
        ),
        (
            &["--set", "pool.policy.maxHeldGpusPerRenter=-4"],
            &["/pool/policy/maxHeldGpusPerRenter", "minimum"],
        ),
        (
            &["--set", "pool.policy.requireRenterFunds=maybe"],
            &["/pool/policy/requireRenterFunds", "boolean"],
        ),
        (&["--set", "chain.escrowAddress=0x12"], &["/chain/escrowAddress"]),
        (&["--set", "org=Acme Corp"], &["/org", "does not match pattern"]),
        (&["--set", "pool.bootstrap={10.0.0.1:4001}"], &["/pool/bootstrap/0"]),
        (
            &["--set", "pool.announce={pool.example.org:4001}"],
            &["/pool/announce/0"],
        ),
        (
            // A relay is asked by its peer id.
            &["--set", "pool.relay.via={/dns4/pool.example.org/tcp/4001}"],
            &["/pool/relay/via/0"],
        ),
        (&["--set", "agent.backend=docker"], &["/agent/backend"]),
        (
            &["--set", "pool.ping.everySeconds=0"],
            &["/pool/ping/everySeconds", "minimum"],
        ),
        (
            &["--set", "pool.heartbeatGraceMs=1000"],
            &["pool.heartbeatGraceMs (1000) must be longer than pool.heartbeatEveryMs (2000)"],
        ),
        (
            &["--set", "operator.replicas=2,operator.leaderElection.enabled=false"],
            &["operator.replicas > 1 needs operator.leaderElection.enabled"],
        ),
        (
            &["--set", "pool.policy.allowedOrgs={evil}"],
            &["organisation \"evil\" is in both allowedOrgs and deniedOrgs"],
        ),
        (&["--set", "chain.rpcUrl="], &["pool.enabled needs chain.rpcUrl"]),
        (
            &["--set", "chain.sweep.keep=lots"],
            &["/chain/sweep/keep", "does not match pattern"],
        ),
        (
            &["--set", "chain.sweep.to=0x0000000000000000000000000000000000000000"],
            &["chain.sweep.to is the zero address"],
        ),
        (
            // The chain's own addresses come later; any address will do, as
            // long as the sweep names the escrow's, in another case.
            &[
                "--set",
                "chain.escrowAddress=0x00000000000000000000000000000000000E5C40,chain.sweep.to=0x00000000000000000000000000000000000e5c40",
            ],
            &["chain.sweep.to is the escrow or the token contract"],
        ),
        (
            &[
                "--set",
                "chain.tokenAddress=0x0000000000000000000000000000000000070CE4,chain.sweep.to=0x0000000000000000000000000000000000070ce4",
            ],
            &["chain.sweep.to is the escrow or the token contract"],
        ),
        (
            // An empty peer would let everyone in, which an empty list says plainly.
            &["--set-json", "operator.networkPolicy.metricsFrom=[{}]"],
            &["/operator/networkPolicy/metricsFrom/0", "minProperties"],
        ),
        (
            &["--set-json", "operator.networkPolicy.poolApiFrom=[{\"ipBlock\":{}}]"],
            &["/operator/networkPolicy/poolApiFrom/0/ipBlock", "cidr"],
        ),
    ];
    for (flags, expected) in mistakes {
        let out = helm.deploy("install", flags);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "helm installed with {flags:?}");
        for e in *expected {
            assert!(stderr.contains(e), "with {flags:?}, helm said {stderr:?}, not {e:?}");
        }
    }
    assert_eq!(helm.releases(), "", "a refused install left a release behind");
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), &ns);
    assert!(
        deployments.get_opt("gpupool-operator").await.expect("get").is_none(),
        "a refused install created the operator"
    );

    // 2. A good install: the operator and one agent per GPU node come up.
    // The test environment applied the CRDs before, as a data centre that
    // started from manifests/gpupool.yaml has: the release adopts them.
    // Adopting them changes no schema: the chart renders the same CRDs
    // (its files are crds/yaml's, copied by `make crds`), so their
    // generations stay.
    let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
    let mut generations = Vec::new();
    for crd in gpupool_crds::yaml::crds() {
        let name = crd.metadata.name.expect("a CRD name");
        let generation = crds.get(&name).await.expect("get a CRD").metadata.generation;
        generations.push((name, generation));
    }
    let out = helm.deploy("install", &["--wait", "--timeout", "180s", "--take-ownership"]);
    assert!(out.status.success(), "helm install failed");
    for (name, generation) in &generations {
        let live = crds.get(name).await.expect("get a CRD");
        let annotations = live.annotations();
        assert_eq!(
            annotations.get("meta.helm.sh/release-name"),
            Some(&ns),
            "{name} is not part of the release"
        );
        assert_eq!(
            annotations.get("helm.sh/resource-policy").map(String::as_str),
            Some("keep"),
            "{name} would be deleted with the release"
        );
        assert_eq!(
            live.metadata.generation, *generation,
            "the chart's {name} differs from crds/yaml"
        );
    }
    // The notes tell the data centre what it lends, at what price.
    let notes = String::from_utf8_lossy(&out.stdout);
    assert!(
        notes.contains("It lends up to 8 GPUs at H100 2.50/GPU-hour.")
            && notes.contains("One renter's bids not yet leased hold at most 4 of them at a time."),
        "{notes}"
    );
    assert_eq!(helm.revision(), 1);
    let operator = wait_for(Duration::from_secs(60), "the operator Deployment available", || {
        available(&deployments, 1)
    })
    .await
    .expect("the operator Deployment becomes available");
    assert_eq!(
        env_value(&operator, "GPUPOOL_BOOTSTRAP").as_deref(),
        Some("/ip4/127.0.0.1/tcp/4001")
    );
    assert_eq!(
        (
            env_value(&operator, "GPUPOOL_SWEEP_TO").as_deref(),
            env_value(&operator, "GPUPOOL_SWEEP_KEEP").as_deref()
        ),
        (Some(SWEEP_TO), Some("50")),
        "earnings beyond 50 tokens go to the cold wallet"
    );
    assert_eq!(
        env_value(&operator, "GPUPOOL_ESCROW_ADDRESS"),
        Some(chain.escrow.to_string())
    );
    assert_eq!(
        env_value(&operator, "GPUPOOL_POOL_API_ADDR").as_deref(),
        Some("0.0.0.0:7443")
    );
    assert_eq!(
        env_value(&operator, "GPUPOOL_P2P_ANNOUNCE").as_deref(),
        Some("/dns4/pool.helm-dc.example.org/tcp/4001,/dns4/pool.helm-dc.example.org/udp/4001/quic-v1")
    );
    // It listens through the relay too, and serves as one.
    assert_eq!(
        env_value(&operator, "GPUPOOL_P2P_LISTEN"),
        Some(format!(
            "/ip4/0.0.0.0/tcp/4001,/ip4/0.0.0.0/udp/4001/quic-v1,{RELAY}/p2p-circuit"
        ))
    );
    assert_eq!(
        env_value(&operator, "GPUPOOL_P2P_RELAY_SERVICE").as_deref(),
        Some("true")
    );
    assert_eq!(
        env_value(&operator, "GPUPOOL_P2P_RELAY_MAX_CIRCUITS").as_deref(),
        Some("64")
    );
    // Helm reads a YAML integer as a float: a million rendered as "1e+06",
    // which the operator's integer flags refuse.
    assert_eq!(
        env_value(&operator, "GPUPOOL_P2P_REPLAY_CAPACITY").as_deref(),
        Some("1000000")
    );
    let env = operator
        .spec
        .as_ref()
        .and_then(|s| s.template.spec.as_ref())
        .and_then(|s| s.containers.first())
        .and_then(|c| c.env.clone())
        .unwrap_or_default();
    for e in &env {
        let v = e.value.as_deref().unwrap_or_default();
        assert!(
            !(v.contains("e+")
                && v.trim_start_matches(|c: char| c.is_ascii_digit() || c == '.')
                    .starts_with("e+")),
            "{} is rendered in exponent form: {v}",
            e.name
        );
    }
    assert_eq!(
        (
            env_value(&operator, "GPUPOOL_P2P_PING_EVERY_SECONDS").as_deref(),
            env_value(&operator, "GPUPOOL_P2P_PING_TIMEOUT_SECONDS").as_deref()
        ),
        (Some("5"), Some("10"))
    );
    let agents: Api<DaemonSet> = Api::namespaced(client.clone(), &ns);
    // Every flag and GPUPOOL_ variable the chart sets is one its binary
    // reads: a flag renamed in one place only would leave a value silently
    // ignored (a variable) or the pods crash-looping (a flag).
    let agent_set = agents.get("gpupool-agent").await.expect("the agent DaemonSet");
    for (template, bin) in [
        (operator.spec.as_ref().map(|s| &s.template), "gpupool-operator"),
        (agent_set.spec.as_ref().map(|s| &s.template), "gpupool-agent"),
    ] {
        let help = Command::new(workspace_bin(bin)).arg("--help").output().expect("--help");
        let help = String::from_utf8_lossy(&help.stdout);
        let containers = template
            .and_then(|t| t.spec.as_ref())
            .map(|s| s.containers.clone())
            .unwrap_or_default();
        let mut set = 0;
        for c in &containers {
            let checked = gpupool_e2e::chart_settings::check(bin, &help, c);
            assert!(checked.unread.is_empty(), "{}", checked.unread.join("; "));
            set += checked.settings;
            // And the values themselves parse, as the binary reads them.
            if let Some(refused) = gpupool_e2e::chart_settings::refused_values(&workspace_bin(bin), c) {
                panic!("{bin} refuses what the chart gives it: {refused}");
            }
        }
        assert!(set >= 3, "{bin}: nothing set in {containers:#?}");
    }
    // The NetworkPolicy lets in exactly the ports the operator opens: the
    // pool's from anyone, the Pool API from the renters' network only.
    let policy = Api::<NetworkPolicy>::namespaced(client.clone(), &ns)
        .get("gpupool-operator")
        .await
        .expect("the operator's NetworkPolicy");
    let template = &operator.spec.as_ref().expect("a Deployment spec").template;
    let gaps = gpupool_e2e::network_policy::gaps(&policy, template);
    assert!(gaps.is_empty(), "{}", gaps.join("; "));
    let rules = policy.spec.as_ref().and_then(|s| s.ingress.clone()).unwrap_or_default();
    let from_for = |port: &str| {
        rules
            .iter()
            .find(|r| {
                r.ports
                    .iter()
                    .flatten()
                    .any(|p| p.port == Some(IntOrString::String(port.into())))
            })
            .map(|r| serde_json::to_value(&r.from).expect("peers as JSON"))
            .unwrap_or_else(|| panic!("no rule for {port}"))
    };
    assert_eq!(
        from_for("pool-api"),
        serde_json::json!([{ "ipBlock": { "cidr": RENTERS } }])
    );
    assert_eq!(
        from_for("p2p"),
        serde_json::Value::Null,
        "members dial in from anywhere"
    );
    assert_eq!(from_for("metrics"), serde_json::json!([{ "namespaceSelector": {} }]));

    let nodes = i32::try_from(org.nodes.len()).expect("node count");
    wait_for(Duration::from_secs(60), "an agent ready on every GPU node", || async {
        let s = agents.get("gpupool-agent").await.ok()?.status?;
        (s.desired_number_scheduled == nodes && s.number_ready == nodes).then_some(())
    })
    .await
    .expect("the agents run on every node");
    let agent_pods = Api::<Pod>::namespaced(client.clone(), &ns)
        .list(&ListParams::default().labels("app.kubernetes.io/component=agent"))
        .await
        .expect("list agent pods");
    assert!(
        agent_pods
            .items
            .iter()
            .all(|p| p.spec.as_ref().and_then(|s| s.runtime_class_name.as_deref()) == Some("nvidia")),
        "the agents do not run with the NVIDIA runtime class"
    );
    let inventory = Api::<ConfigMap>::namespaced(client.clone(), &ns)
        .get("gpupool-agent-inventory")
        .await
        .expect("the simulated inventory");
    let inventory = inventory
        .data
        .unwrap_or_default()
        .remove("inventory.yaml")
        .unwrap_or_default();
    assert!(
        inventory.contains(H100) && inventory.contains("count: 8"),
        "{inventory}"
    );

    let policy = rendered_policy(&client, &ns, &home).await;
    assert_eq!(policy.price_of(H100), Some("2.5".parse().expect("price")));
    assert_eq!(policy.max_lent_gpus, 8);
    assert_eq!(policy.max_held_gpus_per_renter, 4);
    assert!(policy.require_renter_funds, "the chart's default checks payers' funds");
    assert!(policy.serves("acme") && !policy.serves("evil"));

    // The release's RBAC binds its own ServiceAccount, in its own namespace.
    for (verb, group, resource, in_ns) in [
        ("patch", "gpupool.dev", "aijobs/status", None),
        ("create", "batch", "jobs", Some("default")),
        ("create", "", "namespaces", None),
        ("create", "coordination.k8s.io", "leases", Some(ns.as_str())),
        ("create", "", "secrets", Some(ns.as_str())),
    ] {
        assert!(
            operator_may(&client, &ns, verb, group, resource, in_ns).await,
            "the operator may not {verb} {resource}"
        );
    }
    assert!(
        !operator_may(&client, &ns, "get", "", "secrets", Some("default")).await,
        "the operator reads Secrets outside its namespace"
    );

    // 3. A new price list rolls the operator, so the new prices are the ones it bids with.
    let before = policy_checksum(&operator);
    let out = helm.deploy(
        "upgrade",
        &[
            "--set-string",
            "pool.policy.prices[0].model=H100,pool.policy.prices[0].pricePerGpuHour=3.10",
            "--wait",
            "--timeout",
            "180s",
        ],
    );
    assert!(out.status.success(), "helm upgrade failed");
    assert_eq!(helm.revision(), 2);
    let rolled = wait_for(Duration::from_secs(60), "the operator rolled out again", || async {
        available(&deployments, 1)
            .await
            .filter(|d| d.metadata.generation >= Some(2))
    })
    .await
    .expect("the operator rolls out with the new policy");
    assert_ne!(
        policy_checksum(&rolled),
        before,
        "the new policy did not change the pod template"
    );
    let policy = rendered_policy(&client, &ns, &home).await;
    assert_eq!(policy.price_of(H100), Some("3.1".parse().expect("price")));

    // 4. A refused upgrade changes nothing.
    let out = helm.deploy("upgrade", &["--set", "pool.p2pPort=70000"]);
    assert!(!out.status.success(), "helm upgraded to port 70000");
    assert!(String::from_utf8_lossy(&out.stderr).contains("/pool/p2pPort"));
    assert_eq!(helm.revision(), 2);
    assert_eq!(
        rendered_policy(&client, &ns, &home).await.price_of(H100),
        Some("3.1".parse().expect("price"))
    );

    // 5. A chart whose CRDs changed brings them along on upgrade (Helm never
    // upgrades a chart's crds/ directory; the old schema would prune what a
    // new operator writes). The next chart here is this one with a Bid
    // printer column more. The test environment's own field manager also
    // owns the adopted CRDs, as kubectl's does after a server-side apply, so
    // the first upgrade that changes them takes them over.
    let next = home.join("chart-next");
    copy_dir(&helm.chart, &next);
    let bid_crd = next.join("files/crds/bids.gpupool.dev.yaml");
    let text = std::fs::read_to_string(&bid_crd).expect("the Bid CRD");
    let probe = "  - additionalPrinterColumns:\n    - jsonPath: .metadata.uid\n      name: Probe\n      type: string\n";
    let text = text.replacen("  - additionalPrinterColumns:\n", probe, 1);
    assert!(
        text.contains("name: Probe"),
        "the Bid CRD has no printer columns to extend"
    );
    std::fs::write(&bid_crd, text).expect("write the Bid CRD");
    let columns = || async {
        let crd = crds.get("bids.gpupool.dev").await.expect("the Bid CRD");
        crd.spec.versions[0]
            .additional_printer_columns
            .iter()
            .flatten()
            .map(|c| c.name.clone())
            .collect::<Vec<_>>()
    };
    let next_chart = next.to_string_lossy().into_owned();
    let out = helm.run(&["upgrade", &ns, &next_chart, "--reuse-values", "--force-conflicts"]);
    assert!(
        out.status.success(),
        "helm upgrade to a chart with a changed CRD failed"
    );
    assert_eq!(helm.revision(), 3);
    assert_eq!(columns().await.first().map(String::as_str), Some("Probe"));
    // And back: now the release alone owns them.
    let out = helm.run(&["upgrade", &ns, &helm.chart.to_string_lossy(), "--reuse-values"]);
    assert!(out.status.success(), "helm upgrade back to this chart failed");
    assert_eq!(helm.revision(), 4);
    assert!(
        !columns().await.iter().any(|c| c == "Probe"),
        "the CRD kept the old chart's column"
    );

    // 6. What an SRE turns on: a ServiceMonitor that finds the operators'
    // /metrics, and with a standby, a disruption budget that keeps a drain
    // from taking both down. And a member without a LoadBalancer exposes
    // its p2p port on a node port it chose, so it can announce it.
    let node_port = 30000 + ns.bytes().map(u32::from).sum::<u32>() % 2768;
    let out = helm.run(&[
        "upgrade",
        &ns,
        &helm.chart.to_string_lossy(),
        "--reuse-values",
        "--set",
        "operator.replicas=2,operator.serviceMonitor.enabled=true,operator.serviceMonitor.labels.release=prom,operator.prometheusRule.enabled=true,operator.prometheusRule.labels.release=prom",
        "--set",
        &format!("pool.service.type=NodePort,pool.service.nodePort={node_port}"),
        "--wait",
        "--timeout",
        "180s",
    ]);
    assert!(out.status.success(), "helm upgrade with monitoring failed");
    assert_eq!(helm.revision(), 5);
    wait_for(Duration::from_secs(60), "two operators available", || {
        available(&deployments, 2)
    })
    .await
    .expect("a leader and a standby");
    let p2p = Api::<Service>::namespaced(client.clone(), &ns)
        .get("gpupool-p2p")
        .await
        .expect("the p2p Service");
    let ports: Vec<(String, Option<i32>)> = p2p
        .spec
        .and_then(|s| s.ports)
        .unwrap_or_default()
        .into_iter()
        .map(|p| (p.protocol.unwrap_or_default(), p.node_port))
        .collect();
    let expected = i32::try_from(node_port).expect("a port");
    assert_eq!(
        ports,
        [("TCP".to_string(), Some(expected)), ("UDP".to_string(), Some(expected))],
        "TCP and QUIC on the chosen node port"
    );
    let budgets: Api<PodDisruptionBudget> = Api::namespaced(client.clone(), &ns);
    wait_for(Duration::from_secs(60), "the budget counts both operators", || async {
        let b = budgets.get("gpupool-operator").await.ok()?;
        let s = b.status?;
        (s.expected_pods == Some(2) && s.current_healthy == Some(2) && s.disruptions_allowed == Some(1)).then_some(())
    })
    .await
    .expect("a PodDisruptionBudget over the operators");
    let monitor = Api::<DynamicObject>::namespaced_with(
        client.clone(),
        &ns,
        &monitoring_resource("ServiceMonitor", "servicemonitors"),
    )
    .get("gpupool-operator")
    .await
    .expect("the ServiceMonitor");
    assert_eq!(
        monitor.labels().get("release").map(String::as_str),
        Some("prom"),
        "Prometheus selects monitors by the labels given"
    );
    let selector = monitor.data["spec"]["selector"]["matchLabels"]
        .as_object()
        .expect("a matchLabels selector")
        .iter()
        .map(|(k, v)| format!("{k}={}", v.as_str().unwrap_or_default()))
        .collect::<Vec<_>>()
        .join(",");
    let port = monitor.data["spec"]["endpoints"][0]["port"]
        .as_str()
        .expect("an endpoint port");
    let services = Api::<Service>::namespaced(client.clone(), &ns)
        .list(&ListParams::default().labels(&selector))
        .await
        .expect("list Services");
    let names: Vec<_> = services.items.iter().filter_map(|s| s.metadata.name.clone()).collect();
    assert_eq!(
        names,
        ["gpupool-operator-metrics"],
        "the monitor selects only the metrics Service"
    );
    // Prometheus scrapes the endpoints behind that port: both operators.
    let slices: Api<EndpointSlice> = Api::namespaced(client.clone(), &ns);
    wait_for(
        Duration::from_secs(60),
        "both operators behind the metrics port",
        || async {
            let list = slices
                .list(&ListParams::default().labels("kubernetes.io/service-name=gpupool-operator-metrics"))
                .await
                .ok()?;
            let ready: usize = list
                .items
                .iter()
                .filter(|s| {
                    s.ports
                        .iter()
                        .flatten()
                        .any(|p| p.name.as_deref() == Some(port) && p.port == Some(8080))
                })
                .map(|s| {
                    s.endpoints
                        .iter()
                        .flatten()
                        .filter(|e| e.conditions.as_ref().and_then(|c| c.ready) == Some(true))
                        .count()
                })
                .sum();
            (ready == 2).then_some(())
        },
    )
    .await
    .expect("the metrics Service's endpoints hold both operators on port 8080");
    // And the alerting rules, all of them with the pool on, for the same
    // Prometheus: each is the rule file's, which the operator's unit tests
    // hold to the metrics it exports.
    let rules = Api::<DynamicObject>::namespaced_with(
        client.clone(),
        &ns,
        &monitoring_resource("PrometheusRule", "prometheusrules"),
    )
    .get("gpupool-operator")
    .await
    .expect("the PrometheusRule");
    assert_eq!(rules.labels().get("release").map(String::as_str), Some("prom"));
    let file: serde_json::Value = serde_saphyr::from_str(
        &std::fs::read_to_string(helm.chart.join("alerts/gpupool.rules.yaml")).expect("the rule file"),
    )
    .expect("the rule file is YAML");
    assert_eq!(
        rules.data["spec"]["groups"], file["groups"],
        "the PrometheusRule holds the rule file's groups"
    );

    // 7. Uninstalling removes the release's objects, its ClusterRoles included,
    // and keeps the CRDs (crds.keep): AiJobs outlive the chart.
    let out = helm.run(&["uninstall", &ns, "--wait", "--timeout", "120s"]);
    assert!(out.status.success(), "helm uninstall failed");
    assert_eq!(helm.releases(), "");
    assert!(deployments.get_opt("gpupool-operator").await.expect("get").is_none());
    let roles: Api<ClusterRole> = Api::all(client.clone());
    assert!(roles.get_opt(&format!("{ns}-operator")).await.expect("get").is_none());
    assert!(
        roles.get_opt("gpupool-operator").await.expect("get").is_some(),
        "uninstalling one release removed another install's ClusterRole"
    );
    for crd in gpupool_crds::yaml::crds() {
        let name = crd.metadata.name.expect("a CRD name");
        assert!(
            crds.get_opt(&name).await.expect("get").is_some(),
            "uninstalling deleted {name}"
        );
    }

    assert!(budgets.get_opt("gpupool-operator").await.expect("get").is_none());

    remove_namespace(&client, &ns).await;
    remove_monitoring_crds(&client).await;
    runtimes
        .delete("nvidia", &DeleteParams::default())
        .await
        .expect("delete the RuntimeClass");
    std::fs::remove_dir_all(&home).ok();
}

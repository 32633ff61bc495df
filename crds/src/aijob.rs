//! AiJob: a GPU workload and what its owner will pay for it.

use k8s_openapi::api::core::v1::PodTemplateSpec;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::core::Duration;
use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// The workload, the GPUs it needs, what its owner pays at most, and where it may run.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "gpupool.dev",
    version = "v1alpha1",
    kind = "AiJob",
    plural = "aijobs",
    singular = "aijob",
    shortname = "aij",
    category = "gpupool",
    namespaced,
    status = "AiJobStatus",
    validation = Rule::new("size(self.metadata.name) <= 63").message("AiJob names must be at most 63 characters: the name is reused for its batch Job and pod labels"),
    doc = "AiJob is a GPU workload that gpupool runs to completion, in this cluster or on another member organisation's GPUs, at no more than the price its owner set.",
    printcolumn(name = "Phase", type_ = "string", json_path = ".status.phase", description = "Where the job is in its life"),
    printcolumn(name = "GPUs", type_ = "integer", json_path = ".spec.gpus.count", description = "GPUs the job needs"),
    printcolumn(name = "Model", type_ = "string", json_path = ".status.runsOn.gpuProduct", description = "GPU product it runs on"),
    printcolumn(name = "Where", type_ = "string", json_path = ".status.runsOn.org", description = "Organisation whose GPUs run it"),
    printcolumn(name = "Max-Price", type_ = "string", json_path = ".spec.maxPricePerGpuHour", description = "Most the owner pays per GPU-hour"),
    printcolumn(name = "Cost", type_ = "string", json_path = ".status.costSoFar", description = "Tokens spent so far", priority = 1),
    printcolumn(name = "Payer", type_ = "string", json_path = ".spec.payer", description = "The renter wallet whose escrow account pays, for Pool API jobs", priority = 1),
    printcolumn(name = "Reason", type_ = "string", json_path = ".status.message", description = "Why it waits or failed", priority = 1),
    printcolumn(name = "Age", type_ = "date", json_path = ".metadata.creationTimestamp")
)]
#[serde(rename_all = "camelCase")]
pub struct AiJobSpec {
    /// The pod that runs the workload. gpupool adds the GPU limit and node
    /// selection; everything else is used as written.
    #[x_kube(
        validation = Rule::new("has(self.spec) && size(self.spec.containers) > 0").message("template.spec.containers must list at least one container to run"),
        validation = Rule::new("!has(self.spec) || !has(self.spec.restartPolicy) || self.spec.restartPolicy != 'Always'").message("template.spec.restartPolicy must be Never or OnFailure: an AiJob runs to completion"),
        validation = Rule::new("self == oldSelf").message("template cannot change after the job is created: its Job (here or in another organisation) was built from it; delete and re-create the AiJob"),
    )]
    pub template: PodTemplateSpec,

    /// The GPUs the job needs, all on one node.
    #[x_kube(validation = Rule::new("self == oldSelf").message("gpus cannot change after the job is created; delete and re-create the AiJob"))]
    pub gpus: GpuRequirements,

    /// The most the owner pays per GPU per hour, in whole tokens as a decimal
    /// string, for example "2.50".
    #[x_kube(validation = Rule::new(r"self.matches('^(0|[1-9][0-9]{0,11})([.][0-9]{1,18})?$')").message("maxPricePerGpuHour must be a non-negative decimal number of tokens such as \"2.50\" (at most 18 decimal places)"))]
    #[schemars(length(max = 32))]
    pub max_price_per_gpu_hour: String,

    /// The longest the job may run, as a duration such as "90m" or "24h".
    /// It is stopped when this runs out. In the pool it also caps what the
    /// lease may take: the first deposit covers part of it, and the lease is
    /// topped up as the job runs, never past this much time at its price.
    /// Fixed once the job is created: the Job's deadline, the order that
    /// bidders priced and the lease's funding are all sized by it.
    #[serde(default = "default_max_duration")]
    #[x_kube(
        validation = Rule::new("duration(self) >= duration('1m') && duration(self) <= duration('8760h')").message("maxDuration must be a duration such as \"90m\" or \"24h\", between 1m and 8760h"),
        validation = Rule::new("self == oldSelf").message("maxDuration cannot change after the job is created: its Job's deadline and its lease's funding were sized by it; delete and re-create the AiJob"),
    )]
    #[schemars(length(max = 32))]
    pub max_duration: Duration,

    /// Where the job may run.
    #[serde(default)]
    pub placement: Placement,

    /// How bids from other organisations are collected and chosen.
    #[serde(default)]
    pub bidding: Bidding,

    /// A renter's wallet whose escrow account pays this job's leases, with this
    /// member's operator as the agent the renter approved (`gpupool escrow
    /// agent`). The Pool API sets it for renters without a cluster; the
    /// operator honours it only in the namespace the Pool API keeps for that
    /// wallet (label `gpupool.dev/renter-wallet`). Left out, the operator's own
    /// wallet pays.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(
        validation = Rule::new(r"self.matches('^0x[0-9a-fA-F]{40}$')").message("payer must be a 0x-prefixed 20-byte hex address"),
        validation = Rule::new("self == oldSelf").message("payer cannot change after the job is created"),
    )]
    pub payer: Option<String>,
}

fn default_max_duration() -> Duration {
    std::time::Duration::from_secs(24 * 3600).into()
}

/// The GPUs a job needs.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct GpuRequirements {
    /// How many GPUs, all on one node.
    #[x_kube(validation = Rule::new("self >= 1 && self <= 16").message("gpus.count must be between 1 and 16: an AiJob runs as one pod on one node"))]
    pub count: i32,

    /// GPU products the job accepts, matched case-insensitively against the
    /// product name, so "H100" matches "NVIDIA H100 80GB HBM3". Empty means any.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 16), inner(length(min = 1, max = 128)))]
    pub models: Vec<String>,

    /// The least memory each GPU must have, as a quantity such as "40Gi".
    /// Compared with what NVML reports: an "80GB" H100 has 81559 MiB (79.6Gi).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new("isQuantity(self) && quantity(self).isGreaterThan(quantity('0'))").message("gpus.minMemory must be a positive quantity such as \"40Gi\""))]
    #[schemars(length(max = 32))]
    pub min_memory: Option<String>,

    /// The link the GPUs need between them.
    #[serde(default)]
    pub interconnect: Interconnect,
}

/// GPU-to-GPU links a job can ask for.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Interconnect {
    /// Any link will do.
    #[default]
    Any,
    /// GPUs joined by NVLink.
    NVLink,
    /// PCIe is enough.
    PCIe,
}

/// Where a job may run.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("!has(self.allowedOrgs) || !has(self.deniedOrgs) || self.allowedOrgs.all(o, !(o in self.deniedOrgs))").message("an organisation cannot be in both placement.allowedOrgs and placement.deniedOrgs"))]
pub struct Placement {
    /// LocalFirst runs here when there is room and asks the pool otherwise;
    /// PoolOnly always asks the pool; LocalOnly never leaves this cluster.
    #[serde(default)]
    pub mode: PlacementMode,
    /// If set, only these organisations may run the job.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 64), inner(length(min = 1, max = 63)))]
    pub allowed_orgs: Vec<String>,
    /// These organisations never run the job.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 64), inner(length(min = 1, max = 63)))]
    pub denied_orgs: Vec<String>,
}

/// Placement modes.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum PlacementMode {
    /// Run in this cluster when it has room; otherwise ask the pool.
    #[default]
    LocalFirst,
    /// Always run on another organisation's GPUs.
    PoolOnly,
    /// Never leave this cluster.
    LocalOnly,
}

/// How bids are collected and chosen.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("(has(self.selection) && self.selection == 'Manual') || !has(self.acceptedBid)").message("bidding.acceptedBid can only be set when bidding.selection is Manual; with Auto the operator picks the best bid itself"))]
pub struct Bidding {
    /// How long bids are collected after the order is published, such as "5s".
    /// With Auto selection the choice comes sooner once every member whose
    /// capacity advert shows room for the job has bid.
    #[serde(default = "default_bid_window")]
    #[x_kube(validation = Rule::new("duration(self) >= duration('100ms') && duration(self) <= duration('10m')").message("bidding.window must be a duration between 100ms and 10m, such as \"5s\""))]
    #[schemars(length(max = 32))]
    pub window: Duration,
    /// Auto takes the lowest price, then the best reputation, then the lowest
    /// latency; Manual waits for acceptedBid.
    #[serde(default)]
    pub selection: BidSelection,
    /// With Manual selection, the name of the Bid to accept.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 253))]
    pub accepted_bid: Option<String>,
}

fn default_bid_window() -> Duration {
    std::time::Duration::from_secs(5).into()
}

impl Default for Bidding {
    fn default() -> Self {
        Self {
            window: default_bid_window(),
            selection: BidSelection::default(),
            accepted_bid: None,
        }
    }
}

/// Bid selection modes.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum BidSelection {
    /// The operator picks when the bid window closes.
    #[default]
    Auto,
    /// A person names the bid in acceptedBid.
    Manual,
}

/// What happened to the job so far.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct AiJobStatus {
    /// Where the job is in its life.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<AiJobPhase>,
    /// The latest observations, Kubernetes style: Accepted, Scheduled, Running, Finished.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
    /// Where it runs, once placed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub runs_on: Option<RunsOn>,
    /// The Lease that pays for it, when it runs on another organisation's GPUs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lease: Option<String>,
    /// Tokens spent so far.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cost_so_far: Option<String>,
    /// Why the job waits or failed, in words a person can act on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    /// The exit code of the workload's first container, once it ended.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exit_code: Option<i32>,
    /// When the workload started running.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub start_time: Option<Time>,
    /// When the workload ended.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub completion_time: Option<Time>,
    /// The generation of the spec this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// The order in the pool, while the job is placed there.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub order: Option<PoolOrder>,
}

/// The AiJob's current order in the pool. Each re-auction is a new attempt
/// with a new order id, so late bids for an old order are refused.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct PoolOrder {
    /// The order id peers bid on.
    pub id: String,
    /// 1 for the first order, +1 for each re-auction.
    pub attempt: i32,
    /// When the bid window of this attempt closes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub closes_at: Option<Time>,
    /// Organisations that failed this job's leases; they are not asked again.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub excluded_orgs: Vec<String>,
    /// The Lease (in the AiJob's namespace) that runs this attempt, once a bid won.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lease: Option<String>,
}

/// The life of a job.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
pub enum AiJobPhase {
    /// Accepted, waiting for GPUs.
    Pending,
    /// The order is out and bids are coming in.
    Bidding,
    /// A lease is agreed; the workload is being started.
    Leased,
    /// The workload runs, or it ended and its lease is being settled (as a
    /// batch Job stays Running until it is marked Complete).
    Running,
    /// The workload finished successfully.
    Succeeded,
    /// The workload failed or could not be placed for good.
    Failed,
}

impl AiJobPhase {
    pub fn is_terminal(self) -> bool {
        matches!(self, AiJobPhase::Succeeded | AiJobPhase::Failed)
    }
}

/// Where a job runs.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct RunsOn {
    /// The organisation whose GPUs run it.
    pub org: String,
    /// That organisation's peer id, when it is not this cluster.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub peer_id: Option<String>,
    /// The namespace of the batch Job that runs it.
    pub namespace: String,
    /// The name of the batch Job that runs it.
    pub job: String,
    /// The GPU product it was placed on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gpu_product: Option<String>,
}

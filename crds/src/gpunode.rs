//! GpuNode: what the node agent read from one node's GPUs.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// The node a GpuNode describes. The object is named after the Node too.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[kube(
    group = "gpupool.dev",
    version = "v1alpha1",
    kind = "GpuNode",
    plural = "gpunodes",
    shortname = "gpn",
    category = "gpupool",
    status = "GpuNodeStatus",
    doc = "GpuNode is the node agent's report of one node's NVIDIA GPUs: what they are, whether they are healthy and how many are free. It is written by the agent and read by the operator.",
    printcolumn(name = "Product", type_ = "string", json_path = ".status.product"),
    printcolumn(name = "GPUs", type_ = "integer", json_path = ".status.gpusTotal"),
    printcolumn(name = "Free", type_ = "integer", json_path = ".status.gpusFree"),
    printcolumn(name = "Driver", type_ = "string", json_path = ".status.driverVersion"),
    printcolumn(name = "Backend", type_ = "string", json_path = ".status.backend", priority = 1),
    printcolumn(name = "Heartbeat", type_ = "date", json_path = ".status.lastHeartbeat"),
    printcolumn(name = "Age", type_ = "date", json_path = ".metadata.creationTimestamp")
)]
#[serde(rename_all = "camelCase")]
pub struct GpuNodeSpec {
    /// The Node this report is about.
    #[x_kube(validation = Rule::new("self == oldSelf").message("nodeName cannot change"))]
    #[schemars(length(min = 1, max = 253))]
    pub node_name: String,
}

/// The agent's latest reading.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct GpuNodeStatus {
    /// Where the reading came from: nvml, or simulated in test environments.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backend: Option<String>,
    /// Each GPU on the node.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub gpus: Vec<GpuDevice>,
    /// The product of the node's GPUs (the first one's, when they differ).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub product: Option<String>,
    /// GPUs on the node.
    #[serde(default)]
    pub gpus_total: i32,
    /// Healthy GPUs.
    #[serde(default)]
    pub gpus_healthy: i32,
    /// Healthy GPUs that no pod on the node has claimed.
    #[serde(default)]
    pub gpus_free: i32,
    /// NVIDIA driver version.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub driver_version: Option<String>,
    /// CUDA driver API version, such as "12.4".
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cuda_version: Option<String>,
    /// DriverReady says whether the agent could read the GPUs at all, and why not.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
    /// When the agent last wrote this status.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_heartbeat: Option<Time>,
}

/// One GPU.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct GpuDevice {
    /// NVML index on the node.
    pub index: u32,
    /// NVML UUID, such as GPU-8f2c...
    pub uuid: String,
    /// Product name, such as "NVIDIA H100 80GB HBM3".
    pub product: String,
    /// Total memory in MiB.
    pub memory_mib: u64,
    /// Memory in use in MiB.
    #[serde(default)]
    pub memory_used_mib: u64,
    /// Streaming multiprocessor use over the last sample, 0 to 100.
    #[serde(default)]
    pub utilization_percent: u32,
    /// Multi-instance GPU mode.
    #[serde(default)]
    pub mig_mode: MigMode,
    /// Health from NVML and XID events.
    #[serde(default)]
    pub health: GpuHealth,
    /// Why the GPU is unhealthy, such as the last critical XID.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub health_message: Option<String>,
    /// PCIe link generation, if NVML reports it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pcie_generation: Option<u32>,
    /// PCIe link width, if NVML reports it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pcie_width: Option<u32>,
    /// Active NVLink links.
    #[serde(default)]
    pub nvlink_links: u32,
}

/// MIG modes.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum MigMode {
    /// The GPU does not support MIG.
    #[default]
    Unsupported,
    Disabled,
    Enabled,
}

/// GPU health.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum GpuHealth {
    #[default]
    Healthy,
    Unhealthy,
}

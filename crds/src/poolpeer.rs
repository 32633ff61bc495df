//! PoolPeer: one known member of the pool, as this cluster sees it.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// A member of the pool, as it introduced itself.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[kube(
    group = "gpupool.dev",
    version = "v1alpha1",
    kind = "PoolPeer",
    plural = "poolpeers",
    shortname = "pp",
    category = "gpupool",
    status = "PoolPeerStatus",
    doc = "PoolPeer is one member organisation of the pool as this cluster knows it: its identity, wallet, last advertised capacity and prices, and how reliably it served leases.",
    printcolumn(name = "Org", type_ = "string", json_path = ".spec.org"),
    printcolumn(name = "Peer", type_ = "string", json_path = ".spec.peerId", priority = 1),
    printcolumn(name = "Address", type_ = "string", json_path = ".spec.addresses[0]", priority = 1),
    printcolumn(name = "Connected", type_ = "boolean", json_path = ".status.connected"),
    printcolumn(name = "Via", type_ = "string", json_path = ".status.via"),
    printcolumn(name = "Completed", type_ = "integer", json_path = ".status.reputation.completed"),
    printcolumn(name = "Failed", type_ = "integer", json_path = ".status.reputation.failed"),
    printcolumn(name = "Last-Seen", type_ = "date", json_path = ".status.lastSeen")
)]
#[serde(rename_all = "camelCase")]
pub struct PoolPeerSpec {
    /// libp2p peer id.
    #[schemars(length(min = 1, max = 128))]
    pub peer_id: String,
    /// Organisation name, bound to the peer id by a signed record.
    #[schemars(length(min = 1, max = 63))]
    pub org: String,
    /// The wallet that gets paid, 0x-prefixed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new("self.matches('^0x[0-9a-fA-F]{40}$')").message("wallet must be a 0x-prefixed 20-byte hex address"))]
    #[schemars(length(max = 42))]
    pub wallet: Option<String>,
    /// Where other members reach it: the addresses it announces
    /// (`--p2p-announce`, the chart's `pool.announce`), or else the ones it
    /// listens on.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 32), inner(length(max = 256)))]
    pub addresses: Vec<String>,
}

/// What this cluster last heard from the peer.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct PoolPeerStatus {
    #[serde(default)]
    pub connected: bool,
    /// How this member reaches the peer while connected: `Direct`, or only
    /// through a member's circuit relay (`Relay`), which carries every byte
    /// between them until a hole punch opens a direct connection.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub via: Option<PeerVia>,
    /// Free GPUs by product. Bounded so the API server can cost its CEL rules.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 64))]
    pub capacity: Vec<PeerCapacity>,
    /// When this member last heard from the peer, as of the last write of
    /// this status: refreshed once a minute while the peer is heard, so up
    /// to a minute old; `connected` changes land within a second.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_seen: Option<Time>,
    #[serde(default)]
    pub reputation: Reputation,
}

/// The path to a connected peer.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
pub enum PeerVia {
    /// At least one connection straight between the two members (dialled,
    /// or punched through their NATs).
    Direct,
    /// Only connections through a relay.
    Relay,
}

/// Free GPUs of one product and their price, as advertised.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct PeerCapacity {
    pub gpu_product: String,
    pub memory_mib: u64,
    pub free: i32,
    /// Largest number of free GPUs on one node.
    pub max_per_node: i32,
    /// Price per GPU-hour in tokens, as a decimal string.
    #[x_kube(validation = Rule::new(r"self.matches('^(0|[1-9][0-9]{0,11})([.][0-9]{1,18})?$')").message("pricePerGpuHour must be a non-negative decimal number of tokens"))]
    #[schemars(length(max = 32))]
    pub price_per_gpu_hour: String,
}

/// Leases the peer saw through, and those it failed.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct Reputation {
    pub completed: u64,
    pub failed: u64,
}

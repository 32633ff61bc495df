//! Every gpupool custom resource, in API group `gpupool.dev/v1alpha1`.
//!
//! The types carry their own OpenAPI schema, CEL rules and printer columns so
//! that the API server, not the operator, refuses a bad spec: a platform team
//! sees the mistake at `kubectl apply` time instead of in a status later.

// kube-derive takes one `printcolumn(...)` per column; clippy reads the repeated
// `type_ = "string"` inside them as duplicated attributes.
#![allow(clippy::duplicated_attributes)]

pub mod aijob;
pub mod bid;
pub mod conditions;
pub mod gpunode;
pub mod lease;
pub mod market_view;
pub mod org;
pub mod pods;
pub mod poolpeer;
pub mod price;
pub mod yaml;

pub use aijob::{
    AiJob, AiJobPhase, AiJobSpec, AiJobStatus, BidSelection, Bidding, GpuRequirements, Interconnect, Placement,
    PlacementMode, PoolOrder, RunsOn,
};
pub use bid::{Bid, BidSpec, BidState, BidStatus};
pub use gpunode::{GpuDevice, GpuHealth, GpuNode, GpuNodeSpec, GpuNodeStatus, MigMode};
pub use lease::{
    CloseReason, Escrow, Lease, LeaseParty, LeaseSide, LeaseSpec, LeaseState, LeaseStatus, WorkloadReport,
};
pub use poolpeer::{PeerCapacity, PeerVia, PoolPeer, PoolPeerSpec, PoolPeerStatus, Reputation};

/// Finalizer on Leases with an escrow: the on-chain side is settled before the record goes.
pub const LEASE_FINALIZER: &str = "gpupool.dev/settlement";

/// The API group of every gpupool resource.
pub const GROUP: &str = "gpupool.dev";
/// The one served and stored version.
pub const VERSION: &str = "v1alpha1";

/// Label on every object the operator creates for an AiJob, naming that AiJob.
pub const LABEL_AIJOB: &str = "gpupool.dev/aijob";
/// Label on Nodes with the GPU product, as the agent read it (sanitised for a label value).
pub const LABEL_GPU_PRODUCT: &str = "gpupool.dev/gpu-product";
/// Label on Nodes with the memory of one GPU in MiB.
pub const LABEL_GPU_MEMORY_MIB: &str = "gpupool.dev/gpu-memory-mib";
/// Label on Nodes with the number of GPUs the agent found.
pub const LABEL_GPU_COUNT: &str = "gpupool.dev/gpu-count";
/// The extended resource the NVIDIA device plugin advertises.
pub const GPU_RESOURCE: &str = "nvidia.com/gpu";
/// Finalizer the operator puts on AiJobs, so deletion waits for cleanup.
/// On Bids: the order they answer. On Leases: the order they fulfil.
pub const LABEL_ORDER: &str = "gpupool.dev/order-id";
/// On a namespace the Pool API keeps for one renter: that renter's wallet,
/// lower-case. An AiJob's `spec.payer` is honoured only in its renter's namespace.
pub const LABEL_RENTER_WALLET: &str = "gpupool.dev/renter-wallet";
/// On a provider's lease namespace and Lease copy: the on-chain lease id's first 12 hex digits.
pub const LABEL_LEASE: &str = "gpupool.dev/lease";
/// Marks a provider's namespace that runs one lease's workload.
pub const LABEL_LEASE_NAMESPACE: &str = "gpupool.dev/lease-namespace";
pub const AIJOB_FINALIZER: &str = "gpupool.dev/aijob-cleanup";
/// W3C `traceparent` of the trace that follows an AiJob or a Lease through
/// every organisation it touches. Set it when applying an AiJob to join the
/// job to a trace of your own (a CI pipeline's, say); otherwise the operator
/// starts one when it first accepts the job, if it exports traces.
pub const ANNOTATION_TRACEPARENT: &str = "gpupool.dev/traceparent";

/// Turns a GPU product name into a valid label value the way NVIDIA's GPU
/// feature discovery does ("NVIDIA H100 80GB HBM3" -> "NVIDIA-H100-80GB-HBM3"),
/// so node selectors written by hand for GFD read the same.
pub fn product_label_value(product: &str) -> String {
    let mut out: String = product
        .trim()
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '.' || c == '_' || c == '-' {
                c
            } else {
                '-'
            }
        })
        .collect();
    while out.contains("--") {
        out = out.replace("--", "-");
    }
    let out = out.trim_matches(|c: char| !c.is_ascii_alphanumeric());
    out.chars()
        .take(63)
        .collect::<String>()
        .trim_end_matches(|c: char| !c.is_ascii_alphanumeric())
        .to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn product_label_values_are_valid_labels() {
        assert_eq!(product_label_value("NVIDIA H100 80GB HBM3"), "NVIDIA-H100-80GB-HBM3");
        assert_eq!(product_label_value("NVIDIA A100-SXM4-40GB"), "NVIDIA-A100-SXM4-40GB");
        assert_eq!(product_label_value("  NVIDIA L40S (rev 2) "), "NVIDIA-L40S-rev-2");
        let long = "X".repeat(100);
        assert_eq!(product_label_value(&long).len(), 63);
        assert_eq!(product_label_value("GPU -"), "GPU");
    }
}

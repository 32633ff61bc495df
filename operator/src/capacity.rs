//! Free GPUs per node, from the agents' GpuNodes and the pods that hold GPUs.

use std::borrow::Borrow;
use std::collections::BTreeMap;

use gpupool_crds::pods::PodView;
use gpupool_crds::{GpuHealth, GpuNode};
use k8s_openapi::jiff::{SignedDuration, Timestamp};

/// GPUs of one node as the operator counts them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NodeGpus {
    pub node: String,
    pub product: String,
    pub memory_mib: u64,
    /// Healthy GPUs the agent reported.
    pub healthy: u32,
    /// GPUs held by pods bound to the node, plus placements not yet visible.
    pub allocated: u32,
}

impl NodeGpus {
    pub fn free(&self) -> u32 {
        self.healthy.saturating_sub(self.allocated)
    }
}

/// How old a GpuNode heartbeat may be before the node is left out: an agent
/// that stopped reporting may be on a node whose GPUs are gone.
pub const STALE_AFTER: SignedDuration = SignedDuration::from_mins(5);

/// Counts free GPUs on every node whose agent reported recently. `extra`
/// adds GPUs of placements the pod cache does not show yet, by node.
pub fn inventory(
    gpunodes: &[impl Borrow<GpuNode>],
    pods: &[impl Borrow<PodView>],
    extra: &BTreeMap<String, u32>,
    now: Timestamp,
) -> Vec<NodeGpus> {
    let mut allocated: BTreeMap<&str, u32> = BTreeMap::new();
    for pod in pods.iter().map(Borrow::borrow) {
        if let Some(node) = pod.node_name.as_deref()
            && pod.is_live()
        {
            *allocated.entry(node).or_default() += pod.gpus;
        }
    }
    let mut out = Vec::new();
    for gn in gpunodes.iter().map(Borrow::borrow) {
        let Some(status) = &gn.status else { continue };
        let fresh = status
            .last_heartbeat
            .as_ref()
            .is_some_and(|t| now.duration_since(t.0) <= STALE_AFTER);
        if !fresh {
            continue;
        }
        let healthy: Vec<_> = status.gpus.iter().filter(|g| g.health == GpuHealth::Healthy).collect();
        let Some(first) = healthy.first() else { continue };
        let node = gn.spec.node_name.as_str();
        out.push(NodeGpus {
            node: node.to_string(),
            product: first.product.clone(),
            memory_mib: healthy.iter().map(|g| g.memory_mib).min().unwrap_or(0),
            healthy: healthy.len() as u32,
            allocated: allocated.get(node).copied().unwrap_or(0) + extra.get(node).copied().unwrap_or(0),
        });
    }
    out.sort_by(|a, b| a.node.cmp(&b.node));
    out
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use gpupool_crds::{GpuDevice, GpuNodeSpec, GpuNodeStatus};
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;

    pub fn now() -> Timestamp {
        "2026-06-01T12:00:00Z".parse().unwrap()
    }

    pub fn gpunode(node: &str, product: &str, mem: u64, n: u32, unhealthy: u32) -> GpuNode {
        let gpus = (0..n)
            .map(|i| GpuDevice {
                index: i,
                uuid: format!("GPU-{node}-{i}"),
                product: product.into(),
                memory_mib: mem,
                health: if i < unhealthy {
                    GpuHealth::Unhealthy
                } else {
                    GpuHealth::Healthy
                },
                ..Default::default()
            })
            .collect();
        let mut g = GpuNode::new(node, GpuNodeSpec { node_name: node.into() });
        g.status = Some(GpuNodeStatus {
            gpus,
            last_heartbeat: Some(Time(now() - SignedDuration::from_secs(30))),
            ..Default::default()
        });
        g
    }

    /// A cached pod; how one is read from the API server's JSON is tested
    /// with `PodView` itself.
    pub fn pod(node: Option<&str>, gpus: u32, phase: &str) -> PodView {
        PodView {
            node_name: node.map(Into::into),
            gpus,
            phase: Some(phase.into()),
            ..Default::default()
        }
    }

    #[test]
    fn counts_live_pods_and_healthy_gpus() {
        let nodes = vec![
            gpunode("a", "NVIDIA H100 80GB HBM3", 81559, 8, 1),
            gpunode("b", "NVIDIA H100 80GB HBM3", 81559, 8, 0),
        ];
        let pods = vec![
            pod(Some("a"), 2, "Running"),
            pod(Some("a"), 4, "Succeeded"),
            pod(Some("b"), 3, "Pending"),
            pod(None, 8, "Pending"),
        ];
        let extra = BTreeMap::from([("b".to_string(), 1)]);
        let inv = inventory(&nodes, &pods, &extra, now());
        assert_eq!(inv.len(), 2);
        assert_eq!((inv[0].healthy, inv[0].allocated, inv[0].free()), (7, 2, 5));
        assert_eq!((inv[1].healthy, inv[1].allocated, inv[1].free()), (8, 4, 4));
    }

    #[test]
    fn leaves_out_stale_and_gpu_less_nodes() {
        let mut stale = gpunode("s", "X", 1, 8, 0);
        stale.status.as_mut().unwrap().last_heartbeat = Some(Time(now() - SignedDuration::from_mins(6)));
        let broken = gpunode("u", "X", 1, 2, 2);
        let inv = inventory(&[stale, broken], &Vec::<PodView>::new(), &BTreeMap::new(), now());
        assert!(inv.is_empty());
    }
}

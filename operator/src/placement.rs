//! The local placement decision: run here now, or wait and say exactly why.

use std::collections::BTreeSet;

use gpupool_crds::{GpuRequirements, PlacementMode};

use crate::capacity::NodeGpus;
use crate::matching::product_matches;
use crate::quantity;

/// What a job needs, parsed once from its spec.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Need {
    pub count: u32,
    pub models: Vec<String>,
    pub min_memory_mib: u64,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum NeedError {
    #[error("gpus.count must be at least 1")]
    Count,
    #[error("gpus.minMemory: {0}")]
    Memory(#[from] quantity::QuantityError),
}

impl Need {
    pub fn from_spec(gpus: &GpuRequirements) -> Result<Self, NeedError> {
        let count = u32::try_from(gpus.count)
            .ok()
            .filter(|c| *c > 0)
            .ok_or(NeedError::Count)?;
        let min_memory_mib = gpus
            .min_memory
            .as_deref()
            .map(quantity::to_mib)
            .transpose()?
            .unwrap_or(0);
        Ok(Self {
            count,
            models: gpus.models.clone(),
            min_memory_mib,
        })
    }

    fn accepts(&self, n: &NodeGpus) -> bool {
        product_matches(&self.models, &n.product) && n.memory_mib >= self.min_memory_mib
    }

    /// "8×H100 (≥ 81920 MiB)" in words for messages.
    pub fn describe(&self) -> String {
        let models = if self.models.is_empty() {
            "GPUs".to_string()
        } else {
            self.models.join("|")
        };
        let mem = if self.min_memory_mib > 0 {
            format!(" with at least {} MiB each", self.min_memory_mib)
        } else {
            String::new()
        };
        format!("{}×{models}{mem}", self.count)
    }
}

/// Where a job goes, or why it waits.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Decision {
    /// Run here. `node` is the best fit, for accounting until the scheduler
    /// binds the pod; `products` are all products the Job may be scheduled on.
    Local {
        node: String,
        product: String,
        products: Vec<String>,
    },
    /// Wait; `reason` is a CamelCase condition reason, `message` a sentence.
    Wait { reason: &'static str, message: String },
}

pub const REASON_POOL_ONLY: &str = "PoolNotEnabled";
pub const REASON_NO_MATCH: &str = "NoMatchingGpus";
pub const REASON_TOO_MANY: &str = "TooManyGpusForOneNode";
pub const REASON_INSUFFICIENT: &str = "InsufficientFreeGpus";

const POOL_LATER: &str = "placement in the pool is not enabled on this cluster yet, so the job waits here.";

/// Decides local placement. Best fit: the eligible node with the fewest free
/// GPUs that still fit, so large jobs keep finding whole nodes.
pub fn decide(need: &Need, mode: PlacementMode, nodes: &[NodeGpus]) -> Decision {
    if mode == PlacementMode::PoolOnly {
        return Decision::Wait {
            reason: REASON_POOL_ONLY,
            message: format!(
                "placement.mode is PoolOnly, but {POOL_LATER} Use LocalFirst or LocalOnly to run on this cluster's GPUs."
            ),
        };
    }
    let pool_hint = if mode == PlacementMode::LocalFirst {
        format!(" LocalFirst would ask the pool next, but {POOL_LATER}")
    } else {
        String::new()
    };
    let eligible: Vec<&NodeGpus> = nodes.iter().filter(|n| need.accepts(n)).collect();
    if eligible.is_empty() {
        return Decision::Wait {
            reason: REASON_NO_MATCH,
            message: format!(
                "no node in this cluster has {}; GPUs here: {}.{pool_hint}",
                need.describe(),
                summarize(nodes)
            ),
        };
    }
    let largest = eligible.iter().map(|n| n.healthy).max().unwrap_or(0);
    if largest < need.count {
        return Decision::Wait {
            reason: REASON_TOO_MANY,
            message: format!(
                "no node has {} matching GPUs; the largest matching node has {largest}. An AiJob runs on one node: lower gpus.count.{pool_hint}",
                need.count
            ),
        };
    }
    let best = eligible
        .iter()
        .filter(|n| n.free() >= need.count)
        .min_by_key(|n| (n.free(), n.node.clone()));
    match best {
        Some(n) => {
            let products: BTreeSet<String> = eligible.iter().map(|e| e.product.clone()).collect();
            Decision::Local {
                node: n.node.clone(),
                product: n.product.clone(),
                products: products.into_iter().collect(),
            }
        }
        None => {
            let most = eligible
                .iter()
                .max_by_key(|n| n.free())
                .map(|n| format!("{} on {}", n.free(), n.node))
                .unwrap_or_default();
            Decision::Wait {
                reason: REASON_INSUFFICIENT,
                message: format!(
                    "waiting for {} free on one node; the most free now is {most}.{pool_hint}",
                    need.describe()
                ),
            }
        }
    }
}

/// "2×8 NVIDIA H100 80GB HBM3 (81559 MiB), 1×4 NVIDIA L40S (46068 MiB)"
fn summarize(nodes: &[NodeGpus]) -> String {
    if nodes.is_empty() {
        return "none reported by any gpupool agent".into();
    }
    let mut groups: std::collections::BTreeMap<(String, u64, u32), u32> = Default::default();
    for n in nodes {
        *groups.entry((n.product.clone(), n.memory_mib, n.healthy)).or_default() += 1;
    }
    groups
        .iter()
        .map(|((p, m, h), c)| format!("{c} node(s) of {h}× {p} ({m} MiB)"))
        .collect::<Vec<_>>()
        .join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(name: &str, product: &str, mem: u64, healthy: u32, allocated: u32) -> NodeGpus {
        NodeGpus {
            node: name.into(),
            product: product.into(),
            memory_mib: mem,
            healthy,
            allocated,
        }
    }

    fn need(count: u32, models: &[&str], mem: u64) -> Need {
        Need {
            count,
            models: models.iter().map(|s| s.to_string()).collect(),
            min_memory_mib: mem,
        }
    }

    const H100: &str = "NVIDIA H100 80GB HBM3";
    const L40S: &str = "NVIDIA L40S";

    #[test]
    fn best_fit_packs_nodes() {
        let nodes = [
            node("a", H100, 81559, 8, 0),
            node("b", H100, 81559, 8, 6),
            node("c", H100, 81559, 8, 4),
        ];
        let d = decide(&need(2, &["H100"], 0), PlacementMode::LocalFirst, &nodes);
        assert_eq!(
            d,
            Decision::Local {
                node: "b".into(),
                product: H100.into(),
                products: vec![H100.into()]
            }
        );
        let d = decide(&need(4, &[], 0), PlacementMode::LocalOnly, &nodes);
        assert!(matches!(d, Decision::Local { node, .. } if node == "c"));
    }

    #[test]
    fn memory_and_model_filter() {
        let nodes = [node("l", L40S, 46068, 4, 0), node("h", H100, 81559, 8, 0)];
        assert!(
            matches!(decide(&need(1, &[], 70 * 1024), PlacementMode::LocalOnly, &nodes), Decision::Local { node, .. } if node == "h")
        );
        match decide(&need(1, &["B200"], 0), PlacementMode::LocalOnly, &nodes) {
            Decision::Wait { reason, message } => {
                assert_eq!(reason, REASON_NO_MATCH);
                assert!(message.contains("1×B200"), "{message}");
                assert!(message.contains("NVIDIA L40S (46068 MiB)"), "{message}");
                assert!(!message.contains("pool"), "{message}");
            }
            d => panic!("{d:?}"),
        }
    }

    #[test]
    fn too_many_for_one_node() {
        let nodes = [node("a", H100, 81559, 8, 0)];
        match decide(&need(16, &[], 0), PlacementMode::LocalFirst, &nodes) {
            Decision::Wait { reason, message } => {
                assert_eq!(reason, REASON_TOO_MANY);
                assert!(message.contains("largest matching node has 8"), "{message}");
                assert!(message.contains("LocalFirst would ask the pool next"), "{message}");
            }
            d => panic!("{d:?}"),
        }
    }

    #[test]
    fn waits_for_free_gpus() {
        let nodes = [node("a", H100, 81559, 8, 6), node("b", H100, 81559, 8, 5)];
        match decide(&need(4, &["H100"], 0), PlacementMode::LocalOnly, &nodes) {
            Decision::Wait { reason, message } => {
                assert_eq!(reason, REASON_INSUFFICIENT);
                assert!(message.contains("the most free now is 3 on b"), "{message}");
            }
            d => panic!("{d:?}"),
        }
    }

    #[test]
    fn pool_only_waits_and_empty_cluster_says_so() {
        assert!(matches!(
            decide(&need(1, &[], 0), PlacementMode::PoolOnly, &[]),
            Decision::Wait {
                reason: REASON_POOL_ONLY,
                ..
            }
        ));
        match decide(&need(1, &[], 0), PlacementMode::LocalOnly, &[]) {
            Decision::Wait { message, .. } => assert!(message.contains("none reported by any gpupool agent")),
            d => panic!("{d:?}"),
        }
    }

    #[test]
    fn need_parses_spec() {
        let spec = gpupool_crds::GpuRequirements {
            count: 2,
            models: vec![],
            min_memory: Some("40Gi".into()),
            interconnect: Default::default(),
        };
        assert_eq!(Need::from_spec(&spec).unwrap().min_memory_mib, 40960);
        let bad = gpupool_crds::GpuRequirements {
            count: 0,
            ..spec.clone()
        };
        assert_eq!(Need::from_spec(&bad), Err(NeedError::Count));
        let bad = gpupool_crds::GpuRequirements {
            min_memory: Some("lots".into()),
            ..spec
        };
        assert!(matches!(Need::from_spec(&bad), Err(NeedError::Memory(_))));
    }
}

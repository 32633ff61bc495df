//! The simulated organisations: each has its own GPU fleet, so placement
//! across them is a real choice.

use serde::{Deserialize, Serialize};

/// One kind of simulated GPU node.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct Fleet {
    pub nodes: u32,
    pub gpus_per_node: u32,
    pub product: String,
    pub memory_mib: u64,
    pub nvlink_links: u32,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct OrgSpec {
    pub name: String,
    /// Short product tag used in node names.
    pub tag: String,
    pub fleet: Fleet,
}

/// The first organisations, in order; more are named org4, org5, … and
/// cycle through the same fleets.
pub fn org_specs(n: usize) -> Vec<OrgSpec> {
    let base = [
        (
            "acme",
            "h100",
            Fleet {
                nodes: 4,
                gpus_per_node: 8,
                product: "NVIDIA H100 80GB HBM3".into(),
                memory_mib: 81559,
                nvlink_links: 18,
            },
        ),
        (
            "bravo",
            "a100",
            Fleet {
                nodes: 3,
                gpus_per_node: 8,
                product: "NVIDIA A100-SXM4-40GB".into(),
                memory_mib: 40960,
                nvlink_links: 12,
            },
        ),
        (
            "corvus",
            "l40s",
            Fleet {
                nodes: 4,
                gpus_per_node: 4,
                product: "NVIDIA L40S".into(),
                memory_mib: 46068,
                nvlink_links: 0,
            },
        ),
    ];
    (0..n)
        .map(|i| {
            let (name, tag, fleet) = &base[i % base.len()];
            let name = if i < base.len() {
                name.to_string()
            } else {
                format!("org{}", i + 1)
            };
            OrgSpec {
                name,
                tag: tag.to_string(),
                fleet: fleet.clone(),
            }
        })
        .collect()
}

impl OrgSpec {
    pub fn node_names(&self) -> Vec<String> {
        (0..self.fleet.nodes)
            .map(|i| format!("{}-{}-{i}", self.name, self.tag))
            .collect()
    }
}

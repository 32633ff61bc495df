//! GPUs promised but not yet held by a bound pod, and the one lock under
//! which this operator promises more of them.
//!
//! Two parts of the operator promise this cluster's GPUs: the controller,
//! when it creates a Job (for a moment its pod is not bound), and the
//! market, when it bids for an order and then accepts the lease (the
//! workload comes later). Each used to count only its own promises, so a
//! local job could take GPUs that an open bid held, and a bid could offer
//! GPUs that a local Job was about to use: the renter then paid for a lease
//! whose pod could not be scheduled. Both now decide while holding
//! [`Promised::decide`], and each counts the other's promises.

use std::borrow::Borrow;
use std::collections::{BTreeMap, HashSet};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use gpupool_crds::pods::PodView;

use crate::capacity::NodeGpus;

/// A Job the controller created whose pod is not bound yet, counted on the
/// node the decision picked (the scheduler usually agrees: best fit).
#[derive(Clone, Debug)]
pub struct LocalPromise {
    pub node: String,
    pub gpus: u32,
    pub at: Instant,
}

/// How long a local promise counts without a bound pod: past it, the
/// pod's own state (Pending, unschedulable) explains the job.
pub const LOCAL_TTL: Duration = Duration::from_secs(120);

/// Local promises by AiJob (`namespace/name`).
pub type Local = BTreeMap<String, LocalPromise>;

/// The local promises, behind the decision lock.
#[derive(Debug, Default)]
pub struct Promised {
    local: Mutex<Local>,
}

impl Promised {
    /// The decision lock, with the local promises. Hold it while counting
    /// free GPUs and recording a new promise, never across an await. Lock
    /// order: this first, then the market's state; the market's state is
    /// never held while taking this.
    pub fn decide(&self) -> MutexGuard<'_, Local> {
        // A panic while holding the lock leaves a plain map; keep going.
        self.local.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Forgets one AiJob's promise: its pod is bound, or its Job is gone.
    pub fn release(&self, aijob_key: &str) {
        self.decide().remove(aijob_key);
    }
}

/// Local promises as extra GPUs by node, for [`crate::capacity::inventory`].
pub fn by_node(local: &Local) -> BTreeMap<String, u32> {
    let mut extra = BTreeMap::new();
    for p in local.values() {
        *extra.entry(p.node.clone()).or_default() += p.gpus;
    }
    extra
}

/// Namespaces holding a local promise. A provider's workload is an AiJob in
/// its lease's namespace: once the controller has promised it GPUs, the
/// lease's own hold on them must not count a second time.
pub fn namespaces(local: &Local) -> HashSet<&str> {
    local
        .keys()
        .filter_map(|k| k.split_once('/').map(|(ns, _)| ns))
        .collect()
}

/// Namespaces with a live pod bound to a node: their GPUs count in the
/// inventory itself.
pub fn bound_namespaces<P: Borrow<PodView>>(pods: &[P]) -> HashSet<&str> {
    pods.iter()
        .map(Borrow::borrow)
        .filter(|p| p.node_name.is_some() && p.is_live())
        .filter_map(|p| p.metadata.namespace.as_deref())
        .collect()
}

/// GPUs of one product that a bid or an accepted lease holds here, on
/// whichever node the scheduler will pick for the workload.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PoolPromise {
    pub product: String,
    pub count: u32,
}

/// Where the pool's promises will land, as extra GPUs by node, so that the
/// controller places local jobs around them: largest first, each on the
/// node of its product with the fewest free GPUs that still fits it (the
/// scheduler's best fit keeps whole nodes for large jobs too). A promise
/// that fits no node any more lands on the one with the most free, so it
/// still counts.
pub fn spread(nodes: &[NodeGpus], promises: &[PoolPromise]) -> BTreeMap<String, u32> {
    let mut free: Vec<(usize, u32)> = nodes.iter().enumerate().map(|(i, n)| (i, n.free())).collect();
    let mut order: Vec<&PoolPromise> = promises.iter().filter(|p| p.count > 0).collect();
    order.sort_by(|a, b| b.count.cmp(&a.count).then_with(|| a.product.cmp(&b.product)));
    let mut extra: BTreeMap<String, u32> = BTreeMap::new();
    for p in order {
        let of_product = free.iter_mut().filter(|(i, _)| nodes[*i].product == p.product);
        let mut best: Option<&mut (usize, u32)> = None;
        let mut most: Option<(usize, u32)> = None;
        for slot in of_product {
            if most.is_none_or(|(_, f)| slot.1 > f) {
                most = Some(*slot);
            }
            let fits = slot.1 >= p.count;
            if fits && best.as_ref().is_none_or(|b| slot.1 < b.1) {
                best = Some(slot);
            }
        }
        let target = match best {
            Some(slot) => {
                slot.1 -= p.count;
                slot.0
            }
            None => match most {
                Some((i, _)) => {
                    if let Some(slot) = free.iter_mut().find(|(j, _)| *j == i) {
                        slot.1 = 0;
                    }
                    i
                }
                // No node of that product: nothing here to keep free.
                None => continue,
            },
        };
        *extra.entry(nodes[target].node.clone()).or_default() += p.count;
    }
    extra
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(name: &str, product: &str, healthy: u32, allocated: u32) -> NodeGpus {
        NodeGpus {
            node: name.into(),
            product: product.into(),
            memory_mib: 40960,
            healthy,
            allocated,
        }
    }

    fn promise(product: &str, count: u32) -> PoolPromise {
        PoolPromise {
            product: product.into(),
            count,
        }
    }

    #[test]
    fn pool_promises_land_best_fit_largest_first() {
        let nodes = [
            node("a", "A100", 8, 0),
            node("b", "A100", 8, 4),
            node("c", "A100", 8, 6),
        ];
        // 4 fits b exactly; 2 fits c exactly; a stays whole for a local 8.
        let extra = spread(&nodes, &[promise("A100", 2), promise("A100", 4)]);
        assert_eq!(extra, BTreeMap::from([("b".into(), 4), ("c".into(), 2)]));
        // 8 fits only a.
        let extra = spread(&nodes, &[promise("A100", 8), promise("A100", 2)]);
        assert_eq!(extra, BTreeMap::from([("a".into(), 8), ("c".into(), 2)]));
    }

    #[test]
    fn a_promise_of_one_node_is_never_split_across_two() {
        // Summed, 8 would fill b and c and leave a (8 free) to a local job,
        // and the lease's 8-GPU pod would then fit nowhere.
        let nodes = [
            node("a", "A100", 8, 0),
            node("b", "A100", 8, 4),
            node("c", "A100", 8, 4),
        ];
        let extra = spread(&nodes, &[promise("A100", 8)]);
        assert_eq!(extra, BTreeMap::from([("a".into(), 8)]));
    }

    #[test]
    fn promises_that_fit_nowhere_still_count_and_other_products_are_untouched() {
        let nodes = [
            node("a", "A100", 8, 6),
            node("b", "A100", 8, 7),
            node("h", "H100", 8, 0),
        ];
        let extra = spread(&nodes, &[promise("A100", 4), promise("L40S", 2)]);
        assert_eq!(
            extra,
            BTreeMap::from([("a".into(), 4)]),
            "on the most free; L40S has no node"
        );
        let mut after = nodes.clone();
        for n in &mut after {
            n.allocated += extra.get(&n.node).copied().unwrap_or(0);
        }
        assert_eq!(after.iter().map(NodeGpus::free).collect::<Vec<_>>(), vec![0, 1, 8]);
    }

    #[test]
    fn local_promises_count_by_node_and_name_their_namespaces() {
        let at = Instant::now();
        let local = Local::from([
            (
                "gpupool-lease-ab/workload".to_string(),
                LocalPromise {
                    node: "a".into(),
                    gpus: 4,
                    at,
                },
            ),
            (
                "team/train".to_string(),
                LocalPromise {
                    node: "a".into(),
                    gpus: 2,
                    at,
                },
            ),
        ]);
        assert_eq!(by_node(&local), BTreeMap::from([("a".into(), 6)]));
        assert_eq!(namespaces(&local), HashSet::from(["gpupool-lease-ab", "team"]));
    }
}

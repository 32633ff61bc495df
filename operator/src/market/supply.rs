//! What this member can lend and what the others offer: free GPUs after
//! every promise, the identity and capacity adverts that tell the pool, and
//! the pool's advertised supply that the renter side reads.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use gpupool_proto::peer::v1::envelope::Body;
use gpupool_proto::peer::v1::{CapacityAdvert, GpuOffer, IdentityRecord};
use k8s_openapi::jiff::Timestamp;
use tracing::debug;

use super::bidengine::Supply;
use super::node::{Market, Stores, now_ms, peer_supply};
use super::selection::PeerSupply;
use crate::capacity::inventory;
use crate::p2p::swarm::Topic;
use crate::promised::{self, PoolPromise};

impl Market {
    /// Our signed identity: the org and wallet this peer id answers for.
    pub(super) fn identity_record(&self, info: &crate::p2p::swarm::SwarmInfo) -> Body {
        Body::Identity(IdentityRecord {
            org: self.settings.org.clone(),
            wallet: self.wallet.to_string(),
            addresses: info
                .advertised
                .iter()
                .take(16)
                .map(|a| crate::p2p::announce::with_peer(a, self.peer_id()).to_string())
                .collect(),
            wallet_proof: self.wallet_proof.clone(),
        })
    }

    /// Free GPUs per product here, after every promise (bids, accepted
    /// leases, local placements in flight), capped by what the policy still
    /// lets this cluster lend.
    pub(crate) fn supply(&self) -> (Vec<Supply>, u32) {
        let Some(stores) = self.stores.get() else {
            return (vec![], 0);
        };
        let local = stores.promised.decide();
        self.supply_given(stores, &local)
    }

    /// [`Self::supply`] for a caller that holds the decision lock.
    pub(crate) fn supply_given(&self, stores: &Stores, local: &promised::Local) -> (Vec<Supply>, u32) {
        // Nothing to lend until every pod is counted.
        let Some(pods) = stores.pods.live() else {
            return (vec![], 0);
        };
        let nodes = inventory(
            &stores.gpunodes.state(),
            &pods,
            &promised::by_node(local),
            Timestamp::now(),
        );
        let bound = promised::bound_namespaces(&pods);
        let mut st = self.lock();
        let now = now_ms();
        // Accepted leases count against what is free until their pods do (or
        // the controller's promise for their workload does), but not against
        // the lending limit: `lent` counts their Leases.
        let mut reserved: HashMap<String, u32> = HashMap::new();
        for p in st.held_unbound(now, &bound, &promised::namespaces(local)) {
            *reserved.entry(p.product).or_default() += p.count;
        }
        let mut reserved_total = 0;
        for p in st.held_by_bids(now) {
            reserved_total += p.count;
            *reserved.entry(p.product).or_default() += p.count;
        }
        let lent = st.lent + reserved_total;
        let mut by_product: BTreeMap<String, Supply> = BTreeMap::new();
        for n in &nodes {
            let s = by_product.entry(n.product.clone()).or_insert(Supply {
                product: n.product.clone(),
                memory_mib: n.memory_mib,
                free: 0,
                max_per_node: 0,
            });
            s.free += n.free();
            s.max_per_node = s.max_per_node.max(n.free());
            s.memory_mib = s.memory_mib.min(n.memory_mib);
        }
        let room = self.settings.policy.max_lent_gpus.saturating_sub(lent);
        let out = by_product
            .into_values()
            .map(|mut s| {
                let held = reserved.get(s.product.as_str()).copied().unwrap_or(0);
                s.free = s.free.saturating_sub(held).min(room);
                s.max_per_node = s.max_per_node.min(s.free);
                s
            })
            .collect();
        (out, lent)
    }

    /// The GPUs the market holds here (open bids, accepted leases not yet
    /// bound), for the controller's decisions; `bound` and `skip` as in
    /// [`State::held_unbound`]. The caller holds the decision lock.
    pub fn pool_promises(&self, bound: &HashSet<&str>, skip: &HashSet<&str>) -> Vec<PoolPromise> {
        let mut st = self.lock();
        let now = now_ms();
        let mut held = st.held_by_bids(now);
        held.extend(st.held_unbound(now, bound, skip));
        held
    }

    /// Publishes identity and capacity every `advert_every`, and capacity alone
    /// soon after it changes (reservations, leases), at most five times a second:
    /// renters waiting out a backoff learn of freed GPUs within a fraction of a second.
    pub(super) async fn advertise_forever(self: Arc<Self>) {
        let mut tick = tokio::time::interval(self.settings.advert_every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut last: Option<Vec<GpuOffer>> = None;
        loop {
            let periodic = tokio::select! {
                _ = tick.tick() => true,
                () = self.capacity_changed.notified() => false,
            };
            let offers = self.offers();
            if !periodic && last.as_ref() == Some(&offers) {
                continue;
            }
            let mut bodies = vec![];
            if periodic {
                self.flush_poolpeers().await;
                let info = self.p2p.info().await;
                self.metrics.peers_connected(info.connected.len());
                bodies.push(self.identity_record(&info));
            }
            last = Some(offers.clone());
            bodies.push(Body::Capacity(CapacityAdvert { offers }));
            for body in bodies {
                if let Err(e) = self.p2p.publish(Topic::Adverts, self.seal(body)).await {
                    debug!(error = %e, "advert not published (no peers yet?)");
                }
            }
            if !periodic {
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    }

    /// This cluster's free GPUs as advertised: products the policy prices.
    pub(super) fn offers(&self) -> Vec<GpuOffer> {
        let (supply, _) = self.supply();
        supply
            .into_iter()
            .filter_map(|s| {
                let price = self.settings.policy.price_of(&s.product)?;
                Some(GpuOffer {
                    product: s.product,
                    memory_mib: s.memory_mib,
                    free: s.free,
                    max_per_node: s.max_per_node,
                    price_per_gpu_hour: price.to_string(),
                })
            })
            .collect()
    }

    /// Sets the gauge of what the pool offers from the connected members'
    /// latest adverts. Summed in place: called on every changed advert, it
    /// must not copy every peer's offers.
    pub(super) fn observe_pool_supply(&self) {
        let mut free: BTreeMap<String, u32> = BTreeMap::new();
        {
            let st = self.lock();
            for p in st.peers.values().filter(|p| !p.org.is_empty() && p.connected) {
                for o in &p.offers {
                    let n = free.entry(o.product.clone()).or_default();
                    *n = n.saturating_add(o.free);
                }
            }
        }
        self.metrics.pool_advertised(&free);
    }

    /// What the pool advertises, for no-bid explanations; with `changed_after`,
    /// only peers whose offers changed since then.
    pub(crate) fn pool_supply(&self, changed_after: Option<u64>) -> Vec<PeerSupply> {
        let st = self.lock();
        st.peers
            .values()
            .filter(|p| !p.org.is_empty() && p.connected)
            .filter(|p| changed_after.is_none_or(|t| p.offers_changed_ms > t))
            .map(peer_supply)
            .collect()
    }
}

//! The other members as this one knows them: identity records and capacity
//! adverts as they arrive, the PoolPeer kept for each, and reputation.

use std::collections::HashMap;
use std::str::FromStr;

use gpupool_chain::Address;
use gpupool_chain::identity_proof::check_identity;
use gpupool_crds::{AiJob, PeerCapacity, PeerVia, PoolPeer, PoolPeerSpec, PoolPeerStatus, Reputation};
use gpupool_proto::peer::v1::{CapacityAdvert, IdentityRecord};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use kube::Api;
use kube::api::{Patch, PatchParams};
use kube::runtime::reflector::ObjectRef;
use libp2p::PeerId;
use tracing::warn;

use super::node::{EARLY_ADVERTS, MARKET_MANAGER, Market, PeerInfo, now_ms, order_fits, peer_supply, poolpeer_name};
use crate::p2p::envelope::DropReason;

impl Market {
    pub(super) async fn on_identity(&self, sender: PeerId, r: IdentityRecord) -> Result<(), (DropReason, String)> {
        if r.org != self.settings.org && !self.settings.policy.serves(&r.org) {
            return Err((DropReason::DeniedOrg, r.org));
        }
        let wallet = Address::from_str(&r.wallet).map_err(|_| (DropReason::Malformed, "wallet".to_string()))?;
        // Checked once per sender, org and wallet: the record comes again
        // with every advert round, the same proof each time.
        let known = self
            .lock()
            .peers
            .get(&sender)
            .is_some_and(|p| p.org == r.org && p.wallet == Some(wallet));
        if !known {
            check_identity(wallet, &sender.to_string(), &r.org, &r.wallet_proof)
                .map_err(|e| (DropReason::Impersonation, format!("identity of {}: {e}", r.org)))?;
        }
        let write = {
            let mut st = self.lock();
            if let Some(bound) = st.orgs.get(&r.org)
                && *bound != sender
            {
                return Err((DropReason::Impersonation, format!("{} is bound to {bound}", r.org)));
            }
            if r.org == self.settings.org && sender != self.peer_id() {
                return Err((DropReason::Impersonation, "claims our own organisation".into()));
            }
            st.orgs.insert(r.org.clone(), sender);
            let now = now_ms();
            let peers = st.peers.len();
            let p = st.peers.entry(sender).or_default();
            let changed = p.org != r.org || p.wallet != Some(wallet) || p.addresses != r.addresses;
            p.org = r.org.clone();
            p.wallet = Some(wallet);
            p.addresses = r.addresses.clone();
            p.last_seen_ms = now;
            p.connected = true;
            p.pacing.changed |= changed;
            p.spec_unwritten |= changed;
            let write = p.pacing.due(now, peers).then(|| p.clone());
            (write, st.early_adverts.remove(&sender))
        };
        let (write, early) = write;
        if let Some(offers) = early {
            self.on_capacity(sender, CapacityAdvert { offers }).await?;
        }
        for a in &r.addresses {
            if let Ok(addr) = a.parse() {
                self.p2p.add_peer(sender, addr).await;
            }
        }
        if let Some(p) = write {
            self.write_poolpeer(sender, &p).await;
        }
        Ok(())
    }

    pub(super) async fn on_capacity(&self, sender: PeerId, c: CapacityAdvert) -> Result<(), (DropReason, String)> {
        let (write, wake, changed) = {
            let mut st = self.lock();
            let now = now_ms();
            let peers = st.peers.len();
            let Some(p) = st.peers.get_mut(&sender) else {
                // Unusable before the identity record, which names the org;
                // kept until it arrives (see `State::early_adverts`).
                if st.early_adverts.len() < EARLY_ADVERTS || st.early_adverts.contains_key(&sender) {
                    st.early_adverts.insert(sender, c.offers);
                }
                return Ok(());
            };
            let changed = p.offers != c.offers;
            p.offers = c.offers;
            p.last_seen_ms = now;
            if changed {
                p.offers_changed_ms = now;
            }
            p.pacing.capacity_changed |= changed;
            let write = p.pacing.due(now, peers).then(|| p.clone());
            // Jobs waiting out a backoff that this peer could serve: on a
            // change in its offers, and while room stands for a job that has
            // waited ROOM_RETRY_MS. The oldest first, a few per advert: the
            // renter lets only as many ask as the room fits.
            let supply = [peer_supply(p)];
            let mut waiting: Vec<(u64, ObjectRef<AiJob>)> = st
                .orders
                .values()
                .filter(|o| {
                    o.closes_ms > now
                        && o.repeat_after_ms <= now
                        && (changed || now.saturating_sub(o.published_ms) >= super::renter::ROOM_RETRY_MS)
                        && order_fits(o, &supply)
                })
                .map(|o| (o.published_ms, o.aijob.clone()))
                .collect();
            waiting.sort_by_key(|(t, _)| *t);
            let free: u32 = supply[0].offers.iter().map(|(s, _)| s.free).sum();
            let wake: Vec<ObjectRef<AiJob>> = waiting
                .into_iter()
                .take(usize::try_from(free.saturating_mul(2)).unwrap_or(usize::MAX))
                .map(|(_, j)| j)
                .collect();
            (write, wake, changed)
        };
        if changed {
            self.observe_pool_supply();
        }
        if let Some(p) = write {
            self.write_poolpeer(sender, &p).await;
        }
        // Jobs waiting out a backoff that this peer could now serve look again.
        for aijob in wake {
            self.wake(aijob).await;
        }
        Ok(())
    }

    /// Keeps the peer's PoolPeer current. Failures are logged: the next advert retries.
    async fn write_poolpeer(&self, peer: PeerId, p: &PeerInfo) {
        let api: Api<PoolPeer> = Api::all(self.client.clone());
        let name = poolpeer_name(&p.org);
        if p.spec_unwritten {
            let spec = PoolPeerSpec {
                peer_id: peer.to_string(),
                org: p.org.clone(),
                wallet: p.wallet.map(|w| w.to_string()),
                addresses: p.addresses.iter().take(32).cloned().collect(),
            };
            let patch = serde_json::json!({
                "apiVersion": "gpupool.dev/v1alpha1",
                "kind": "PoolPeer",
                "metadata": {"name": name},
                "spec": spec,
            });
            if let Err(e) = api
                .patch(
                    &name,
                    &PatchParams::apply(MARKET_MANAGER).force(),
                    &Patch::Apply(&patch),
                )
                .await
            {
                warn!(peer = %p.org, error = %e, "could not write PoolPeer");
                return;
            }
            if let Some(info) = self.lock().peers.get_mut(&peer) {
                info.spec_unwritten = false;
            }
        }
        let known = self.reputations().await;
        if self.lock().reputation.is_none() {
            // Unread reputations must not be written over with zeros.
            self.mark_dirty(&peer);
            return;
        }
        let reputation = known.get(&p.org).cloned().unwrap_or_default();
        self.write_poolpeer_status(&api, &name, peer, p, reputation).await;
    }

    async fn write_poolpeer_status(
        &self,
        api: &Api<PoolPeer>,
        name: &str,
        peer: PeerId,
        p: &PeerInfo,
        reputation: Reputation,
    ) {
        let capacity: Vec<PeerCapacity> = p
            .offers
            .iter()
            .take(64)
            .map(|o| PeerCapacity {
                gpu_product: o.product.clone(),
                memory_mib: o.memory_mib,
                free: i32::try_from(o.free).unwrap_or(i32::MAX),
                max_per_node: i32::try_from(o.max_per_node).unwrap_or(i32::MAX),
                price_per_gpu_hour: o.price_per_gpu_hour.clone(),
            })
            .collect();
        let via = if p.connected {
            let links = self.p2p.links(peer).await;
            match links.iter().any(|l| !l.relayed) {
                true => Some(PeerVia::Direct),
                false if !links.is_empty() => Some(PeerVia::Relay),
                // Heard through gossip, with no connection of our own.
                false => None,
            }
        } else {
            None
        };
        let status = PoolPeerStatus {
            connected: p.connected,
            via,
            capacity,
            last_seen: Timestamp::from_millisecond(i64::try_from(p.last_seen_ms).unwrap_or(0))
                .ok()
                .map(Time),
            reputation,
        };
        if let Err(e) = crate::ssa::apply_status(api, name, MARKET_MANAGER, &status).await {
            warn!(peer = %p.org, error = %e, "could not write PoolPeer status");
        }
    }

    /// Has a peer's PoolPeer written again at its next advert.
    fn mark_dirty(&self, peer: &PeerId) {
        if let Some(info) = self.lock().peers.get_mut(peer) {
            info.pacing.changed = true;
        }
    }

    /// Adds one completed or failed lease to a peer's reputation; its
    /// PoolPeer gets it with the peer's next advert.
    pub(crate) async fn record_outcome(&self, org: &str, completed: bool) {
        if self.lock().reputation.is_none() {
            self.reputations().await;
        }
        let unheard = {
            let mut st = self.lock();
            let Some(all) = st.reputation.as_mut() else {
                warn!(peer = %org, completed, "reputations unreadable; this outcome is not counted");
                return;
            };
            let r = all.entry(org.to_string()).or_default();
            if completed {
                r.completed += 1;
            } else {
                r.failed += 1;
            }
            let reputation = r.clone();
            let peer = st.orgs.get(org).copied();
            match peer.and_then(|peer| st.peers.get_mut(&peer)) {
                // Written with the peer's next advert, or the next periodic
                // flush if it has gone quiet (a failed provider usually has).
                Some(info) => {
                    info.pacing.changed = true;
                    None
                }
                None => Some(reputation),
            }
        };
        // A peer this process has not heard from since it started: nothing
        // else will write its PoolPeer, so the count goes now.
        if let Some(reputation) = unheard {
            let api: Api<PoolPeer> = Api::all(self.client.clone());
            let patch = serde_json::json!({"status": {"reputation": reputation}});
            if let Err(e) = api
                .patch_status(&poolpeer_name(org), &PatchParams::default(), &Patch::Merge(&patch))
                .await
            {
                warn!(peer = %org, error = %e, "could not record reputation");
            }
        }
    }

    /// Writes the PoolPeers whose changes no advert has carried: peers that
    /// went quiet after a change (a lost connection, a failed lease).
    pub(super) async fn flush_poolpeers(&self) {
        let due: Vec<(PeerId, PeerInfo)> = {
            let mut st = self.lock();
            let now = now_ms();
            let peers = st.peers.len();
            st.peers
                .iter_mut()
                .filter(|(_, p)| p.pacing.pending() && !p.org.is_empty())
                .filter_map(|(id, p)| p.pacing.due(now, peers).then(|| (*id, p.clone())))
                .collect()
        };
        for (peer, p) in due {
            self.write_poolpeer(peer, &p).await;
        }
    }

    /// Reputation by org: from memory, read from the PoolPeers the first time.
    pub(crate) async fn reputations(&self) -> HashMap<String, Reputation> {
        if let Some(r) = &self.lock().reputation {
            return r.clone();
        }
        let api: Api<PoolPeer> = Api::all(self.client.clone());
        let read: HashMap<String, Reputation> = match api.list(&Default::default()).await {
            Ok(l) => l
                .items
                .into_iter()
                .map(|p| (p.spec.org, p.status.map(|s| s.reputation).unwrap_or_default()))
                .collect(),
            Err(e) => {
                warn!(error = %e, "could not read peer reputations; ranking bids without them");
                return HashMap::new();
            }
        };
        // Outcomes recorded while the list was in flight are not lost: the
        // first reader installs the map, later ones find it there.
        self.lock().reputation.get_or_insert(read).clone()
    }
}

//! From the winning bid to the provider: the renter Lease that opens the
//! escrow, the word to every bidder, and the lease offer.

use std::collections::{BTreeMap, HashSet};
use std::str::FromStr;

use gpupool_chain::Address;
use gpupool_crds::price::TokenAmount;
use gpupool_crds::{
    AiJob, Bid, BidState, BidStatus, Escrow, LABEL_AIJOB, LABEL_ORDER, LEASE_FINALIZER, Lease, LeaseParty, LeaseSide,
    LeaseSpec, PoolOrder,
};
use gpupool_proto::peer::v1::LeaseOffer;
use gpupool_proto::peer::v1::envelope::Body;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference;
use kube::api::PostParams;
use kube::{Api, Resource, ResourceExt};
use libp2p::PeerId;
use tracing::{debug, info};

use super::node::{MARKET_MANAGER, Market, now_ms, undecided_bids};
use super::renter_io::MarketError;
use crate::placement::Need;
use crate::settlement_plan::{lease_funding, rate_per_second};

fn owner(aijob: &AiJob) -> Option<OwnerReference> {
    let mut o = aijob.controller_owner_ref(&())?;
    o.block_owner_deletion = Some(false);
    Some(o)
}

impl Market {
    /// Creates the renter Lease for the winning bid and tells every bidder.
    pub(super) async fn award(
        &self,
        aijob: &AiJob,
        need: &Need,
        order: &PoolOrder,
        winner: &Bid,
        bids: &[Bid],
    ) -> Result<String, MarketError> {
        let ns = aijob.namespace().unwrap_or_default();
        let lease_name = format!("{}-{}", aijob.name_any(), order.attempt);
        // The on-chain lease id derives from the order: an order that already
        // had a lease (a late bid for the attempt a failed provider won) cannot
        // have a second one.
        // The cache serves: a lease that answers an earlier attempt's order
        // was created that attempt ago, never within the cache's lag.
        let taken = self
            .leases_labelled(&ns, LABEL_ORDER, &winner.spec.order_id)
            .await?
            .into_iter()
            .any(|l| l.name_any() != lease_name);
        if taken {
            let bids_api: Api<Bid> = Api::namespaced(self.client.clone(), &ns);
            let status = BidStatus {
                state: Some(BidState::Lost),
                message: Some(format!("order {} already had a lease", winner.spec.order_id)),
            };
            crate::ssa::apply_status(&bids_api, &winner.name_any(), MARKET_MANAGER, &status).await?;
            return Err(MarketError::Invalid(format!(
                "bid {} answers order {}, which already had a lease; choosing again",
                winner.name_any(),
                winner.spec.order_id
            )));
        }
        let provider_peer = PeerId::from_str(&winner.spec.provider_peer_id)
            .map_err(|_| MarketError::Invalid("provider peer id".into()))?;
        let provider_wallet: Address = self
            .lock()
            .peers
            .get(&provider_peer)
            .and_then(|p| p.wallet)
            .ok_or_else(|| MarketError::Invalid(format!("no wallet known for {}", winner.spec.provider_org)))?;
        let price =
            TokenAmount::from_str(&winner.spec.price_per_gpu_hour).map_err(|e| MarketError::Invalid(e.to_string()))?;
        let rate = rate_per_second(price, need.count)
            .ok_or_else(|| MarketError::Invalid("the winning price rounds to zero tokens per second".into()))?;
        let max_secs = std::time::Duration::from(aijob.spec.max_duration).as_secs();
        let (deposit, top_up_to) = lease_funding(rate, max_secs, self.settings.deposit_seconds);
        let mut lease = Lease::new(
            &lease_name,
            LeaseSpec {
                side: LeaseSide::Renter,
                // The winning bid's order: maybe an earlier attempt's.
                order_id: winner.spec.order_id.clone(),
                bid: winner.name_any(),
                ai_job: Some(aijob.name_any()),
                renter: LeaseParty {
                    org: self.settings.org.clone(),
                    peer_id: Some(self.peer_id().to_string()),
                    wallet: Some(self.wallet.to_string()),
                },
                provider: LeaseParty {
                    org: winner.spec.provider_org.clone(),
                    peer_id: Some(winner.spec.provider_peer_id.clone()),
                    wallet: Some(provider_wallet.to_string()),
                },
                price_per_gpu_hour: price.to_string(),
                gpu_count: i32::try_from(need.count).unwrap_or(1),
                gpu_product: winner.spec.gpu_product.clone(),
                escrow: Some(Escrow {
                    chain_id: self.chain.config().chain_id,
                    contract: self.chain.config().escrow.to_string(),
                    lease_id: None,
                    deposit: deposit.to_string(),
                    top_up_to: Some(top_up_to.to_string()),
                    // Checked against the namespace before the job got this far.
                    funded_by: aijob.spec.payer.clone(),
                }),
                close_reason: None,
            },
        );
        lease.metadata.namespace = Some(ns.clone());
        lease.metadata.labels = Some(BTreeMap::from([
            (LABEL_ORDER.to_string(), winner.spec.order_id.clone()),
            (LABEL_AIJOB.to_string(), aijob.name_any()),
        ]));
        lease.metadata.owner_references = owner(aijob).map(|o| vec![o]);
        // Born with the settlement worker's finalizer (the pool always runs
        // it): its first reconcile would add it in a write of its own.
        lease.metadata.finalizers = Some(vec![LEASE_FINALIZER.to_string()]);
        // Settlement on chain continues the job's trace.
        lease.metadata.annotations = crate::tracecontext::current_traceparent()
            .map(|tp| BTreeMap::from([(gpupool_crds::ANNOTATION_TRACEPARENT.to_string(), tp)]));
        let api: Api<Lease> = Api::namespaced(self.client.clone(), &ns);
        match api.create(&PostParams::default(), &lease).await {
            Ok(_) => {
                self.metrics.pool_lease(crate::telemetry::PoolLeaseEvent::RenterOpened);
                info!(lease = %lease_name, provider = %winner.spec.provider_org, price = %price, deposit = %deposit, "lease created for the winning bid");
            }
            Err(kube::Error::Api(s)) if s.code == 409 => {}
            Err(e) => return Err(e.into()),
        }
        // No bid is recorded for the job's orders from here on: a recording
        // under way finishes first, and a later bid is answered as late.
        let uid = aijob.metadata.uid.clone().unwrap_or_default();
        let gates: Vec<_> = self
            .lock()
            .orders
            .values()
            .filter(|o| o.uid == uid)
            .map(|o| o.bids.gate.clone())
            .collect();
        let mut closing = Vec::with_capacity(gates.len());
        for g in &gates {
            closing.push(g.write().await);
        }
        let closed = self.lock().close_orders(now_ms(), |o| o.uid == uid);
        drop(closing);
        let bids_api: Api<Bid> = Api::namespaced(self.client.clone(), &ns);
        let lost = format!("{} won at {}", winner.spec.provider_org, winner.spec.price_per_gpu_hour);
        for b in bids {
            let won = b.name_any() == winner.name_any();
            let status = BidStatus {
                state: Some(if won { BidState::Accepted } else { BidState::Lost }),
                message: Some(if won {
                    format!("won; lease {lease_name}")
                } else {
                    lost.clone()
                }),
            };
            let _ = crate::ssa::apply_status(&bids_api, &b.name_any(), MARKET_MANAGER, &status).await;
            if let Ok(peer) = PeerId::from_str(&b.spec.provider_peer_id) {
                // Each bid answers its own order: maybe an earlier attempt of this job.
                let bid_id = format!("{}-{}", b.spec.provider_org, b.spec.order_id);
                self.tell_bid_result(peer, &b.spec.order_id, &bid_id, won).await;
            }
        }
        // Bids recorded while this award chose: not among `bids`, and lost.
        let decided: HashSet<String> = bids.iter().map(|b| b.name_any()).collect();
        for b in undecided_bids(closed, &decided) {
            info!(bid = %b.name, order = %b.order_id, "a bid recorded while the award chose lost");
            let status = BidStatus {
                state: Some(BidState::Lost),
                message: Some(lost.clone()),
            };
            let _ = crate::ssa::apply_status(&bids_api, &b.name, MARKET_MANAGER, &status).await;
            self.tell_bid_result(b.provider, &b.order_id, &b.bid_id, false).await;
        }
        Ok(lease_name)
    }

    pub(super) async fn offer(&self, aijob: &AiJob, l: &Lease) {
        let (Some(id), Some(escrow), Some(peer)) = (
            l.status.as_ref().and_then(|s| s.lease_id.clone()),
            l.spec.escrow.as_ref(),
            l.spec
                .provider
                .peer_id
                .as_deref()
                .and_then(|p| PeerId::from_str(p).ok()),
        ) else {
            return;
        };
        // A cached AiJob that ran before (the provider failed, so it is
        // offered again) may have had its template elided.
        let api = Api::<AiJob>::namespaced(self.client.clone(), &aijob.namespace().unwrap_or_default());
        let aijob = match crate::cache::with_template(aijob, &api).await {
            Ok(a) => a,
            Err(e) => {
                debug!(lease = %id, error = %e, "could not read the AiJob's template; offering again later");
                return;
            }
        };
        let workload = serde_json::to_vec(&aijob.spec.template).unwrap_or_default();
        let bid_id = format!("{}-{}", l.spec.provider.org, l.spec.order_id);
        let msg = Body::LeaseOffer(LeaseOffer {
            order_id: l.spec.order_id.clone(),
            bid_id,
            chain_id: escrow.chain_id,
            escrow_contract: escrow.contract.clone(),
            lease_id: id.clone(),
            deposit: l
                .status
                .as_ref()
                .and_then(|s| s.deposited.clone())
                .unwrap_or_else(|| escrow.deposit.clone()),
            renter_wallet: self.wallet.to_string(),
            workload,
            max_duration_seconds: std::time::Duration::from(aijob.spec.max_duration).as_secs().max(1),
        });
        {
            let mut st = self.lock();
            let h = st.heard.entry(id.to_ascii_lowercase()).or_default();
            if h.offered_ms == 0 {
                h.offered_ms = now_ms();
            }
        }
        match self.send(peer, msg).await {
            Ok(()) => debug!(lease = %id, provider = %l.spec.provider.org, "lease offer sent"),
            Err(e) => debug!(lease = %id, error = %e, "lease offer not delivered; resending"),
        }
    }
}

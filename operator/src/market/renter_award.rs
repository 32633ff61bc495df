//! From the winning bid to the provider: the renter Lease that opens the
//! escrow, the word to every bidder, and the lease offer.

use std::collections::HashSet;
use std::str::FromStr;

use gpupool_chain::Address;
use gpupool_crds::{AiJob, Bid, BidState, BidStatus, LABEL_ORDER, Lease, LeaseParty, PoolOrder};
use gpupool_proto::peer::v1::LeaseOffer;
use gpupool_proto::peer::v1::envelope::Body;
use kube::api::PostParams;
use kube::{Api, ResourceExt};
use libp2p::PeerId;
use tracing::{debug, info};

use super::bidengine::bid_id;
use super::node::{MARKET_MANAGER, Market, OpenOrder, now_ms, undecided_bids};
use super::renter_io::MarketError;
use super::renter_lease::{Award, renter_lease, renter_lease_name};
use crate::placement::Need;

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
        let lease_name = renter_lease_name(&aijob.name_any(), order.attempt);
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
        let lease = renter_lease(Award {
            aijob,
            winner,
            attempt: order.attempt,
            gpus: need.count,
            renter: LeaseParty {
                org: self.settings.org.clone(),
                peer_id: Some(self.peer_id().to_string()),
                wallet: Some(self.wallet.to_string()),
            },
            provider_wallet: provider_wallet.to_string(),
            chain_id: self.chain.config().chain_id,
            escrow_contract: self.chain.config().escrow.to_string(),
            deposit_seconds: self.settings.deposit_seconds,
            traceparent: crate::tracecontext::current_traceparent(),
        })
        .map_err(|e| MarketError::Invalid(e.to_string()))?;
        let api: Api<Lease> = Api::namespaced(self.client.clone(), &ns);
        match api.create(&PostParams::default(), &lease).await {
            Ok(_) => {
                self.metrics.pool_lease(crate::telemetry::PoolLeaseEvent::RenterOpened);
                let escrow = lease.spec.escrow.as_ref();
                info!(lease = %lease_name, provider = %winner.spec.provider_org, price = %lease.spec.price_per_gpu_hour,
                    deposit = escrow.map_or("", |e| e.deposit.as_str()), "lease created for the winning bid");
            }
            Err(kube::Error::Api(s)) if s.code == 409 => {}
            Err(e) => return Err(e.into()),
        }
        let uid = aijob.metadata.uid.clone().unwrap_or_default();
        let closed = self.close_bidding(&uid).await;
        self.tell_bidders(&ns, winner, bids, closed, &lease_name).await;
        Ok(lease_name)
    }

    /// Closes every order of the job (`uid`) to bids: a recording under way
    /// finishes first, and a later bid is answered as late. Returns the
    /// orders closed: their recorded bids include any written down while the
    /// award chose, which its own list of bids lacks.
    async fn close_bidding(&self, uid: &str) -> Vec<OpenOrder> {
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
        self.lock().close_orders(now_ms(), |o| o.uid == uid)
    }

    /// Marks each bid Accepted or Lost and tells its provider, so the losers
    /// release the GPUs they hold for it now rather than at the bid's TTL.
    async fn tell_bidders(&self, ns: &str, winner: &Bid, bids: &[Bid], closed: Vec<OpenOrder>, lease_name: &str) {
        let bids_api: Api<Bid> = Api::namespaced(self.client.clone(), ns);
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
                let id = bid_id(&b.spec.provider_org, &b.spec.order_id);
                self.tell_bid_result(peer, &b.spec.order_id, &id, won).await;
            }
        }
        // Bids recorded while the award chose: not among `bids`, and lost.
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
        let msg = Body::LeaseOffer(LeaseOffer {
            order_id: l.spec.order_id.clone(),
            bid_id: bid_id(&l.spec.provider.org, &l.spec.order_id),
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

//! The renter's side of bidding: a provider's bid, checked against the
//! order it answers and written down as a Bid, and the word back to every
//! bidder on how its bid fared.

use std::collections::BTreeMap;
use std::str::FromStr;

use gpupool_crds::price::TokenAmount;
use gpupool_crds::{AiJob, Bid, BidSpec, BidState, BidStatus, LABEL_AIJOB, LABEL_ORDER};
use gpupool_proto::peer::v1::envelope::Body;
use gpupool_proto::peer::v1::{self as wire, BidResult};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{OwnerReference, Time};
use k8s_openapi::jiff::Timestamp;
use kube::api::PostParams;
use kube::{Api, Resource};
use libp2p::PeerId;
use tracing::{debug, info, warn};

use super::node::{MARKET_MANAGER, Market, RecordedBid, now_ms};
use super::renter_orders::ms_to_time;
use crate::p2p::envelope::DropReason;

type Handled = Result<(), (DropReason, String)>;

fn bid_name(aijob: &str, bid_id: &str) -> String {
    let mut s: String = format!("{aijob}-{bid_id}")
        .to_ascii_lowercase()
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '.' {
                c
            } else {
                '-'
            }
        })
        .collect();
    s.truncate(253);
    s
}

impl Market {
    pub(crate) async fn on_bid(&self, sender: PeerId, b: wire::Bid) -> Handled {
        let now = now_ms();
        let (order, late) = {
            let st = self.lock();
            (
                st.orders.get(&b.order_id).cloned(),
                st.closed_orders.contains_key(&b.order_id),
            )
        };
        let Some(order) = order.filter(|o| now <= o.closes_ms + 60_000) else {
            if late {
                return self.refuse_late(sender, &b).await;
            }
            return Err((DropReason::UnknownOrder, format!("bid for order {}", b.order_id)));
        };
        let Some(org) = self.org_of(&sender) else {
            return Err((
                DropReason::UnknownOrder,
                "bid from a peer that never introduced itself".into(),
            ));
        };
        if org != b.provider_org {
            return Err((DropReason::Impersonation, format!("{org} bid as {}", b.provider_org)));
        }
        let o = &order.order;
        if o.denied_orgs.contains(&org) || (!o.allowed_orgs.is_empty() && !o.allowed_orgs.contains(&org)) {
            return Err((DropReason::DeniedOrg, format!("bid from {org}")));
        }
        let gpus = o.gpus.clone().unwrap_or_default();
        let price =
            TokenAmount::from_str(&b.price_per_gpu_hour).map_err(|_| (DropReason::Malformed, "price".to_string()))?;
        if b.gpu_count != gpus.count
            || price > order.max_price
            || !crate::matching::product_matches(&gpus.models, &b.gpu_product)
            || b.bid_expires_at_unix_ms <= now
        {
            return Err((DropReason::Malformed, "bid does not answer the order".into()));
        }
        let ns = order.aijob.namespace.clone().unwrap_or_default();
        let name = bid_name(&order.aijob.name, &b.bid_id);
        let mut bid = Bid::new(
            &name,
            BidSpec {
                ai_job: order.aijob.name.clone(),
                order_id: b.order_id.clone(),
                provider_peer_id: sender.to_string(),
                provider_org: org.clone(),
                price_per_gpu_hour: price.to_string(),
                gpu_product: b.gpu_product.clone(),
                gpu_count: i32::try_from(b.gpu_count).unwrap_or(0),
                expires_at: ms_to_time(b.bid_expires_at_unix_ms).unwrap_or(Time(Timestamp::now())),
                signature: None,
            },
        );
        bid.metadata.namespace = Some(ns.clone());
        bid.metadata.labels = Some(BTreeMap::from([
            (LABEL_ORDER.to_string(), b.order_id.clone()),
            (LABEL_AIJOB.to_string(), order.aijob.name.clone()),
        ]));
        bid.metadata.annotations = Some(BTreeMap::from([(
            "gpupool.dev/latency-ms".to_string(),
            now.saturating_sub(order.published_ms).to_string(),
        )]));
        // Owned by the AiJob the order was published for, by uid: if that
        // job is gone, the garbage collector removes the Bid.
        bid.metadata.owner_references = Some(vec![OwnerReference {
            api_version: AiJob::api_version(&()).into_owned(),
            kind: AiJob::kind(&()).into_owned(),
            name: order.aijob.name.clone(),
            uid: order.uid.clone(),
            controller: Some(true),
            block_owner_deletion: Some(false),
        }]);
        // Shared with other recordings, exclusive with the award: from here
        // until the bid is written down the order cannot close under it.
        let gate = order.bids.gate.clone();
        let _recording = gate.read().await;
        if !self.lock().orders.contains_key(&b.order_id) {
            // The award closed it while this bid waited at the gate.
            return self.refuse_late(sender, &b).await;
        }
        let bids: Api<Bid> = Api::namespaced(self.client.clone(), &ns);
        match bids.create(&PostParams::default(), &bid).await {
            Ok(_) => {
                let status = BidStatus {
                    state: Some(BidState::Open),
                    message: Some("waiting for the bid window to close".into()),
                };
                let _ = crate::ssa::apply_status(&bids, &name, MARKET_MANAGER, &status).await;
                if let Some(o) = self.lock().orders.get_mut(&b.order_id) {
                    o.bids.recorded.push(RecordedBid {
                        name: name.clone(),
                        provider: sender,
                        order_id: b.order_id.clone(),
                        bid_id: b.bid_id.clone(),
                    });
                }
                self.metrics.bid_received();
                info!(order = %b.order_id, provider = %org, price = %price, product = %b.gpu_product, "bid recorded");
            }
            Err(kube::Error::Api(s)) if s.code == 409 => {}
            Err(e) => {
                // Only a recorded bid can be chosen: this one's provider gets
                // its GPUs back now, not when the bid expires.
                let ending = matches!(&e, kube::Error::Api(s) if crate::events::namespace_terminating(s));
                if ending {
                    if let Some(o) = self.lock().orders.get_mut(&b.order_id) {
                        o.bids.namespace_ending = true;
                    }
                    info!(order = %b.order_id, namespace = %ns, provider = %org, "bid declined: the job's namespace is being deleted");
                } else {
                    warn!(error = %e, order = %b.order_id, provider = %org, "could not record bid; declining it");
                }
                self.tell_bid_result(sender, &b.order_id, &b.bid_id, false).await;
            }
        }
        self.wake(order.aijob.clone()).await;
        Ok(())
    }

    /// Tells the provider of a bid for an order that no longer takes bids
    /// that it lost: its GPUs are reserved for us until the bid expires, and
    /// go back now to the next order (ours or anyone's).
    async fn refuse_late(&self, sender: PeerId, b: &wire::Bid) -> Handled {
        self.tell_bid_result(sender, &b.order_id, &b.bid_id, false).await;
        Err((DropReason::Late, format!("bid for closed order {}", b.order_id)))
    }

    pub(super) async fn tell_bid_result(&self, provider: PeerId, order_id: &str, bid_id: &str, won: bool) {
        let msg = Body::BidResult(BidResult {
            order_id: order_id.to_string(),
            bid_id: bid_id.chars().take(128).collect(),
            won,
        });
        if let Err(e) = self.send(provider, msg).await {
            debug!(error = %e, order = %order_id, "bid result not delivered; the reservation lapses on its own");
        }
    }
}

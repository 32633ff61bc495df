//! The renter's orders: publishing one to the pool, and taking bids again
//! for the order a restarted process finds in the AiJob's status.

use gpupool_crds::price::TokenAmount;
use gpupool_crds::{AiJob, PoolOrder};
use gpupool_proto::peer::v1::envelope::Body;
use gpupool_proto::peer::v1::{self as wire};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use kube::ResourceExt;
use kube::runtime::reflector::ObjectRef;
use tracing::{info, warn};

use super::node::{Market, OpenOrder, now_ms};
use crate::placement::Need;

/// Times in resources are written with whole seconds; round up so a stored
/// deadline is never earlier than the real one.
pub(super) fn ms_to_time(ms: u64) -> Option<Time> {
    let secs = ms.div_ceil(1000);
    Timestamp::from_second(i64::try_from(secs).ok()?).ok().map(Time)
}

pub(super) fn time_ms(t: &Time) -> u64 {
    u64::try_from(t.0.as_millisecond()).unwrap_or(0)
}

impl Market {
    /// When `order`'s bid window closes. The status keeps whole seconds
    /// (metav1.Time), rounded up; the order published by this process knows
    /// the millisecond, and waiting for the next whole second added half a
    /// second to the average placement.
    pub(super) fn closes_ms(&self, order: &PoolOrder) -> u64 {
        if let Some(o) = self.lock().orders.get(&order.id) {
            return o.closes_ms;
        }
        order.closes_at.as_ref().map(time_ms).unwrap_or(0)
    }

    /// After a restart, the order in the AiJob's status takes bids again.
    pub(super) fn ensure_registered(
        &self,
        aijob: &AiJob,
        need: &Need,
        order: &PoolOrder,
        window: u64,
        max_price: TokenAmount,
    ) {
        let mut st = self.lock();
        if st.orders.contains_key(&order.id) {
            return;
        }
        let closes = order.closes_at.as_ref().map(time_ms).unwrap_or(0);
        let now = now_ms();
        st.orders.insert(
            order.id.clone(),
            OpenOrder {
                aijob: ObjectRef::from_obj(aijob),
                uid: aijob.metadata.uid.clone().unwrap_or_default(),
                order: wire_order(aijob, need, &self.settings.org, &order.id, &order.excluded_orgs),
                max_price,
                published_ms: closes.saturating_sub(window).min(now),
                closes_ms: closes,
                repeat_after_ms: now + window,
                bids: Default::default(),
            },
        );
    }

    /// Sends order `attempt`, taking bids for `window` ms; it may be re-sent
    /// early for fresh capacity once `base_window` ms have passed.
    #[allow(clippy::too_many_arguments)]
    pub(super) async fn publish(
        &self,
        aijob: &AiJob,
        need: &Need,
        attempt: i32,
        excluded: Vec<String>,
        window: u64,
        base_window: u64,
        max_price: TokenAmount,
    ) -> PoolOrder {
        let uid = aijob.metadata.uid.clone().unwrap_or_default();
        let id = format!(
            "{}-{}-{attempt}",
            self.settings.org,
            uid.chars().take(8).collect::<String>()
        );
        let now = now_ms();
        let closes = now + window;
        let o = wire_order(aijob, need, &self.settings.org, &id, &excluded);
        {
            let mut st = self.lock();
            // Earlier attempts keep taking bids for a minute after their window.
            st.close_orders(now, |o| o.closes_ms + 60_000 <= now);
            st.orders.insert(
                id.clone(),
                OpenOrder {
                    aijob: ObjectRef::from_obj(aijob),
                    uid,
                    order: o.clone(),
                    max_price,
                    published_ms: now,
                    closes_ms: closes,
                    repeat_after_ms: now + base_window,
                    bids: Default::default(),
                },
            );
        }
        match self
            .p2p
            .publish(crate::p2p::swarm::Topic::Orders, self.seal(Body::Order(o)))
            .await
        {
            Ok(()) => {
                self.metrics.order_published();
                info!(order = %id, aijob = %aijob.name_any(), attempt, "order published");
            }
            Err(e) => warn!(order = %id, error = %e, "order not published"),
        }
        PoolOrder {
            id,
            attempt,
            closes_at: ms_to_time(closes),
            excluded_orgs: excluded,
            lease: None,
        }
    }
}

fn wire_order(aijob: &AiJob, need: &Need, org: &str, id: &str, excluded: &[String]) -> wire::Order {
    let mut denied = aijob.spec.placement.denied_orgs.clone();
    denied.extend(excluded.iter().cloned());
    denied.sort();
    denied.dedup();
    wire::Order {
        order_id: id.to_string(),
        renter_org: org.to_string(),
        gpus: Some(wire::GpuRequirements {
            count: need.count,
            models: need.models.clone(),
            min_memory_mib: need.min_memory_mib,
            interconnect: format!("{:?}", aijob.spec.gpus.interconnect),
        }),
        max_price_per_gpu_hour: aijob.spec.max_price_per_gpu_hour.clone(),
        max_duration_seconds: std::time::Duration::from(aijob.spec.max_duration).as_secs().max(1),
        allowed_orgs: aijob.spec.placement.allowed_orgs.clone(),
        denied_orgs: denied,
        payer_wallet: aijob.spec.payer.clone().unwrap_or_default(),
    }
}

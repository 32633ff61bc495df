//! Which changes to a Lease wake which controller. Every Lease status write
//! used to wake both the settlement worker and the renter's AiJob, and most
//! writes were heartbeats and accrual figures that change no decision: under
//! a burst of forty leases that was most of the API traffic of the renter.

use std::collections::hash_map::DefaultHasher;
use std::hash::{Hash, Hasher};

use gpupool_crds::Lease;
use kube::ResourceExt;

fn hash_of(parts: impl Hash) -> u64 {
    let mut h = DefaultHasher::new();
    parts.hash(&mut h);
    h.finish()
}

/// What the settlement worker acts on: the spec (a close request, the
/// escrow terms), deletion and finalizers. Its own status writes and the
/// market's heartbeats are not news to it; its requeue re-reads the chain.
pub fn settlement(l: &Lease) -> Option<u64> {
    Some(hash_of((
        l.metadata.generation,
        l.metadata.deletion_timestamp.is_some(),
        l.finalizers(),
    )))
}

/// What the renter's placement decides on: state, close, the workload's
/// report and the refund, but not the heartbeat time or accrual figures (the
/// renter keeps heartbeats in memory and requeues itself for the grace window).
pub fn renter(l: &Lease) -> Option<u64> {
    let s = l.status.clone().unwrap_or_default();
    let workload = s
        .workload
        .map(|w| (w.phase, w.pod_state, w.exit_code, w.message, w.namespace));
    let confirmed: Vec<(String, String)> = s
        .conditions
        .iter()
        .map(|c| (c.type_.clone(), c.status.clone()))
        .collect();
    Some(hash_of((
        l.metadata.generation,
        l.metadata.deletion_timestamp.is_some(),
        s.state.map(|x| format!("{x:?}")),
        s.close_reason,
        s.lease_id,
        s.refunded,
        workload,
        confirmed,
    )))
}

#[cfg(test)]
mod tests {
    use super::*;
    use gpupool_crds::{LeaseState, LeaseStatus, WorkloadReport};
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
    use k8s_openapi::jiff::Timestamp;

    fn lease() -> Lease {
        let mut l: Lease = serde_json::from_value(serde_json::json!({
            "apiVersion": "gpupool.dev/v1alpha1", "kind": "Lease",
            "metadata": {"name": "j-1", "namespace": "ns", "generation": 1},
            "spec": {"side": "Renter", "orderId": "o", "bid": "b", "renter": {"org": "acme"},
                     "provider": {"org": "bravo"}, "pricePerGpuHour": "2", "gpuCount": 1, "gpuProduct": "A100"}
        }))
        .unwrap();
        l.status = Some(LeaseStatus {
            state: Some(LeaseState::Active),
            ..Default::default()
        });
        l
    }

    #[test]
    fn heartbeats_and_figures_wake_nobody() {
        let a = lease();
        let mut b = a.clone();
        let st = b.status.as_mut().unwrap();
        st.last_heartbeat = Some(Time(Timestamp::from_second(1_800_000_000).unwrap()));
        st.remaining = Some("1.5".into());
        st.paid = Some("0.5".into());
        st.confirmations = Some(7);
        assert_eq!(renter(&a), renter(&b));
        assert_eq!(settlement(&a), settlement(&b));
    }

    #[test]
    fn decisions_wake_the_side_that_makes_them() {
        let a = lease();
        // The workload started: the renter mirrors it; settlement does not care.
        let mut b = a.clone();
        b.status.as_mut().unwrap().workload = Some(WorkloadReport {
            phase: "Running".into(),
            ..Default::default()
        });
        assert_ne!(renter(&a), renter(&b));
        assert_eq!(settlement(&a), settlement(&b));
        // Closed on chain: the renter moves on.
        let mut c = a.clone();
        c.status.as_mut().unwrap().state = Some(LeaseState::Closed);
        assert_ne!(renter(&a), renter(&c));
        // A close request (spec, new generation) and deletion wake settlement.
        let mut d = a.clone();
        d.metadata.generation = Some(2);
        assert_ne!(settlement(&a), settlement(&d));
        let mut e = a.clone();
        e.metadata.deletion_timestamp = Some(Time(Timestamp::from_second(1_800_000_000).unwrap()));
        assert_ne!(settlement(&a), settlement(&e));
        assert_ne!(renter(&a), renter(&e));
    }
}

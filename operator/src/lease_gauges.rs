//! What this cluster's Lease records add up to, for gauges: leases by side and
//! state, and GPUs lent (provider side) or rented (renter side) by product
//! while their lease is live. Counters of lease events say what happened;
//! these say where things stand, which is what an SRE's dashboard asks first.

use std::collections::BTreeMap;

use gpupool_crds::{Lease, LeaseSide, LeaseState};

pub const SIDES: [LeaseSide; 2] = [LeaseSide::Renter, LeaseSide::Provider];
pub const STATES: [LeaseState; 4] = [
    LeaseState::Pending,
    LeaseState::Active,
    LeaseState::InsufficientFunds,
    LeaseState::Closed,
];

#[derive(Debug, Default, PartialEq, Eq)]
pub struct LeaseTally {
    /// (side, state) → Lease records; every pair present, zero included, so a
    /// gauge falls back to zero when its last lease moves on.
    pub leases: BTreeMap<(String, String), i64>,
    /// (product, "lent" | "rented") → GPUs under leases that are not closed.
    pub gpus: BTreeMap<(String, String), i64>,
}

pub fn tally<'a>(leases: impl IntoIterator<Item = &'a Lease>) -> LeaseTally {
    let mut t = LeaseTally::default();
    for side in SIDES {
        for state in STATES {
            t.leases.insert((format!("{side:?}"), format!("{state:?}")), 0);
        }
    }
    for lease in leases {
        // A record the settlement worker has not written yet is pending.
        let state = lease
            .status
            .as_ref()
            .and_then(|s| s.state)
            .unwrap_or(LeaseState::Pending);
        let side = lease.spec.side;
        *t.leases.entry((format!("{side:?}"), format!("{state:?}"))).or_default() += 1;
        if state != LeaseState::Closed {
            let how = match side {
                LeaseSide::Provider => "lent",
                LeaseSide::Renter => "rented",
            };
            *t.gpus.entry((lease.spec.gpu_product.clone(), how.into())).or_default() +=
                i64::from(lease.spec.gpu_count.max(0));
        }
    }
    t
}

#[cfg(test)]
mod tests {
    use super::*;
    use gpupool_crds::LeaseStatus;

    fn lease(side: LeaseSide, state: Option<LeaseState>, product: &str, gpus: i32) -> Lease {
        let mut l = crate::test_fixtures::lease("l", side);
        l.spec.gpu_product = product.into();
        l.spec.gpu_count = gpus;
        l.status = state.map(|s| LeaseStatus {
            state: Some(s),
            ..Default::default()
        });
        l
    }

    fn key(a: &str, b: &str) -> (String, String) {
        (a.into(), b.into())
    }

    #[test]
    fn counts_leases_by_side_and_state_and_gpus_under_live_leases() {
        let leases = [
            lease(LeaseSide::Provider, Some(LeaseState::Active), "A100", 4),
            lease(LeaseSide::Provider, Some(LeaseState::InsufficientFunds), "A100", 2),
            lease(LeaseSide::Provider, Some(LeaseState::Closed), "A100", 8),
            lease(LeaseSide::Renter, None, "H100", 1),
            lease(LeaseSide::Renter, Some(LeaseState::Closed), "L40S", 3),
        ];
        let t = tally(&leases);
        assert_eq!(t.leases.len(), 8, "every side × state, zero included");
        assert_eq!(t.leases[&key("Provider", "Active")], 1);
        assert_eq!(t.leases[&key("Provider", "InsufficientFunds")], 1);
        assert_eq!(t.leases[&key("Provider", "Closed")], 1);
        assert_eq!(t.leases[&key("Renter", "Pending")], 1, "no status yet is pending");
        assert_eq!(t.leases[&key("Renter", "Active")], 0);
        // Closed leases hold no GPUs; L40S only ever had a closed one.
        assert_eq!(
            t.gpus,
            BTreeMap::from([(key("A100", "lent"), 6), (key("H100", "rented"), 1)])
        );
    }

    #[test]
    fn nothing_gives_zeros() {
        let t = tally(&[]);
        assert!(t.leases.values().all(|v| *v == 0));
        assert!(t.gpus.is_empty());
    }
}

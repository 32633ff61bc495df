//! Objects that unit tests in several modules build the same way.

use gpupool_crds::{Lease, LeaseParty, LeaseSide, LeaseSpec};

/// A Lease named `name` for one A100 at 1 token per GPU-hour between two
/// parties of org "o", with no escrow, status or namespace yet.
pub fn lease(name: &str, side: LeaseSide) -> Lease {
    let party = LeaseParty {
        org: "o".into(),
        peer_id: None,
        wallet: None,
    };
    Lease::new(
        name,
        LeaseSpec {
            side,
            order_id: "o".into(),
            bid: "b".into(),
            ai_job: None,
            renter: party.clone(),
            provider: party,
            price_per_gpu_hour: "1".into(),
            gpu_count: 1,
            gpu_product: "A100".into(),
            escrow: None,
            close_reason: None,
        },
    )
}

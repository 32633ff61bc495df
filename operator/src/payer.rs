//! When an AiJob may spend a renter's escrow account instead of the member's
//! own wallet.
//!
//! The operator's wallet is the agent a renter approved on chain, so anyone who
//! can create AiJobs in this cluster could otherwise name any such renter as
//! `spec.payer`. Only the Pool API, after checking the renter's signature,
//! creates jobs in the namespace it labels with that renter's wallet, so the
//! label is what ties a payer to a request the renter really signed.

use gpupool_crds::PlacementMode;

/// Why the job may not use `payer`, or `None` when it may.
pub fn refusal(payer: &str, mode: PlacementMode, namespace: &str, namespace_wallet: Option<&str>) -> Option<String> {
    if mode != PlacementMode::PoolOnly {
        return Some(format!(
            "spec.payer is set, so spec.placement.mode must be PoolOnly: a renter's funds pay for leases in other \
             organisations, not for this cluster's own GPUs (mode is {mode:?})"
        ));
    }
    match namespace_wallet {
        Some(w) if w.eq_ignore_ascii_case(payer) => None,
        Some(w) => Some(format!(
            "spec.payer is {payer}, but namespace {namespace} belongs to renter {w}; a job may only spend its own \
             renter's escrow account"
        )),
        None => Some(format!(
            "spec.payer is set, but namespace {namespace} is not a Pool API renter namespace (no \
             gpupool.dev/renter-wallet label); submit through the Pool API (`gpupool --pool-api`) instead"
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const W: &str = "0x00000000000000000000000000000000000000Ab";

    #[test]
    fn only_pool_jobs_in_their_renters_namespace_may_spend_its_account() {
        assert_eq!(refusal(W, PlacementMode::PoolOnly, "r", Some(&W.to_lowercase())), None);
        let local = refusal(W, PlacementMode::LocalFirst, "r", Some(W)).unwrap();
        assert!(local.contains("PoolOnly"), "{local}");
        let other = refusal(
            W,
            PlacementMode::PoolOnly,
            "r",
            Some("0x00000000000000000000000000000000000000cd"),
        )
        .unwrap();
        assert!(other.contains("belongs to renter 0x0000"), "{other}");
        let plain = refusal(W, PlacementMode::PoolOnly, "team-a", None).unwrap();
        assert!(plain.contains("not a Pool API renter namespace"), "{plain}");
    }
}

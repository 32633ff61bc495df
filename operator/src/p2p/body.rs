//! The limits each message body must respect, checked after the signature
//! and before any handler sees it. Pure.

use std::str::FromStr;

use gpupool_crds::price::TokenAmount;
use gpupool_proto::peer::v1::envelope::Body;
use gpupool_proto::peer::v1::{GpuOffer, GpuRequirements};

/// Why a body is malformed, for logs; the metric only says "malformed".
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("{field}: {problem}")]
pub struct BodyError {
    pub field: &'static str,
    pub problem: &'static str,
}

fn bad(field: &'static str, problem: &'static str) -> BodyError {
    BodyError { field, problem }
}

/// Identifiers: order, bid, organisation names. Printable ASCII that is safe
/// in Kubernetes labels and names once lowercased.
fn ident(field: &'static str, s: &str, max: usize) -> Result<(), BodyError> {
    if s.is_empty() || s.len() > max {
        return Err(bad(field, "empty or too long"));
    }
    if !s
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.' || b == b'_')
    {
        return Err(bad(field, "only letters, digits, '-', '.' and '_' are allowed"));
    }
    Ok(())
}

fn text(field: &'static str, s: &str, max: usize) -> Result<(), BodyError> {
    if s.len() > max {
        return Err(bad(field, "too long"));
    }
    Ok(())
}

fn price(field: &'static str, s: &str) -> Result<(), BodyError> {
    TokenAmount::from_str(s)
        .map(|_| ())
        .map_err(|_| bad(field, "not a decimal token amount"))
}

fn hex(field: &'static str, s: &str, bytes: usize) -> Result<(), BodyError> {
    let h = s.strip_prefix("0x").ok_or(bad(field, "must start with 0x"))?;
    if h.len() != bytes * 2 || !h.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(bad(field, "wrong length or not hex"));
    }
    Ok(())
}

fn gpus(g: &GpuRequirements) -> Result<(), BodyError> {
    if !(1..=16).contains(&g.count) {
        return Err(bad("gpus.count", "must be 1..=16"));
    }
    if g.models.len() > 16 || g.models.iter().any(|m| m.is_empty() || m.len() > 128) {
        return Err(bad("gpus.models", "at most 16 names of 1..=128 bytes"));
    }
    text("gpus.interconnect", &g.interconnect, 16)
}

fn offer(o: &GpuOffer) -> Result<(), BodyError> {
    text("offer.product", &o.product, 128)?;
    if o.product.is_empty() {
        return Err(bad("offer.product", "empty"));
    }
    if o.free > 100_000 || o.max_per_node > o.free.max(16) {
        return Err(bad("offer.free", "implausible"));
    }
    price("offer.price_per_gpu_hour", &o.price_per_gpu_hour)
}

fn orgs(field: &'static str, v: &[String]) -> Result<(), BodyError> {
    if v.len() > 64 {
        return Err(bad(field, "at most 64"));
    }
    v.iter().try_for_each(|o| ident(field, o, 63))
}

/// Checks a body against the protocol's limits.
pub fn check_body(body: &Body) -> Result<(), BodyError> {
    match body {
        Body::Identity(r) => {
            ident("identity.org", &r.org, 63)?;
            hex("identity.wallet", &r.wallet, 20)?;
            if r.wallet_proof.len() != 65 {
                return Err(bad("identity.wallet_proof", "must be a 65-byte signature"));
            }
            if r.addresses.len() > 16 || r.addresses.iter().any(|a| a.len() > 256) {
                return Err(bad("identity.addresses", "at most 16 of 256 bytes"));
            }
            Ok(())
        }
        Body::Capacity(c) => {
            if c.offers.len() > 64 {
                return Err(bad("capacity.offers", "at most 64"));
            }
            c.offers.iter().try_for_each(offer)
        }
        Body::Order(o) => {
            ident("order.order_id", &o.order_id, 128)?;
            ident("order.renter_org", &o.renter_org, 63)?;
            gpus(o.gpus.as_ref().ok_or(bad("order.gpus", "missing"))?)?;
            price("order.max_price_per_gpu_hour", &o.max_price_per_gpu_hour)?;
            if o.max_duration_seconds == 0 || o.max_duration_seconds > 366 * 24 * 3600 {
                return Err(bad("order.max_duration_seconds", "must be 1s..=1 year"));
            }
            orgs("order.allowed_orgs", &o.allowed_orgs)?;
            orgs("order.denied_orgs", &o.denied_orgs)?;
            if o.payer_wallet.is_empty() {
                Ok(())
            } else {
                hex("order.payer_wallet", &o.payer_wallet, 20)
            }
        }
        Body::Bid(b) => {
            ident("bid.order_id", &b.order_id, 128)?;
            ident("bid.bid_id", &b.bid_id, 128)?;
            ident("bid.provider_org", &b.provider_org, 63)?;
            text("bid.gpu_product", &b.gpu_product, 128)?;
            if b.gpu_product.is_empty() {
                return Err(bad("bid.gpu_product", "empty"));
            }
            if !(1..=16).contains(&b.gpu_count) {
                return Err(bad("bid.gpu_count", "must be 1..=16"));
            }
            price("bid.price_per_gpu_hour", &b.price_per_gpu_hour)
        }
        Body::LeaseOffer(l) => {
            ident("lease_offer.order_id", &l.order_id, 128)?;
            ident("lease_offer.bid_id", &l.bid_id, 128)?;
            hex("lease_offer.escrow_contract", &l.escrow_contract, 20)?;
            hex("lease_offer.lease_id", &l.lease_id, 32)?;
            hex("lease_offer.renter_wallet", &l.renter_wallet, 20)?;
            price("lease_offer.deposit", &l.deposit)?;
            if l.max_duration_seconds == 0 || l.max_duration_seconds > 366 * 24 * 3600 {
                return Err(bad("lease_offer.max_duration_seconds", "must be 1s..=1 year"));
            }
            serde_json::from_slice::<serde_json::Value>(&l.workload)
                .ok()
                .filter(serde_json::Value::is_object)
                .map(|_| ())
                .ok_or(bad("lease_offer.workload", "not a JSON object"))
        }
        Body::LeaseStatus(s) => {
            hex("lease_status.lease_id", &s.lease_id, 32)?;
            ident("lease_status.phase", &s.phase, 32)?;
            text("lease_status.pod_state", &s.pod_state, 64)?;
            text("lease_status.message", &s.message, 1024)
        }
        Body::Heartbeat(h) => hex("heartbeat.lease_id", &h.lease_id, 32),
        Body::BidResult(r) => {
            ident("bid_result.order_id", &r.order_id, 128)?;
            ident("bid_result.bid_id", &r.bid_id, 128)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use gpupool_proto::peer::v1::{Bid, IdentityRecord, Order};

    fn order() -> Order {
        Order {
            order_id: "acme-train-1".into(),
            renter_org: "acme".into(),
            gpus: Some(GpuRequirements {
                count: 8,
                models: vec!["H100".into()],
                min_memory_mib: 0,
                interconnect: "Any".into(),
            }),
            max_price_per_gpu_hour: "2.5".into(),
            max_duration_seconds: 3600,
            allowed_orgs: vec![],
            denied_orgs: vec!["evil".into()],
            payer_wallet: String::new(),
        }
    }

    #[test]
    fn accepts_a_good_order_and_names_what_is_wrong() {
        assert_eq!(check_body(&Body::Order(order())), Ok(()));
        let mut o = order();
        o.max_price_per_gpu_hour = "-1".into();
        assert_eq!(
            check_body(&Body::Order(o)).unwrap_err().field,
            "order.max_price_per_gpu_hour"
        );
        let mut o = order();
        o.max_duration_seconds = 0;
        assert_eq!(
            check_body(&Body::Order(o)).unwrap_err().field,
            "order.max_duration_seconds"
        );
        let mut o = order();
        o.renter_org = "acme/../x".into();
        assert_eq!(check_body(&Body::Order(o)).unwrap_err().field, "order.renter_org");
        let mut o = order();
        o.gpus = None;
        assert!(check_body(&Body::Order(o)).is_err());
        let mut o = order();
        o.payer_wallet = format!("0x{}", "ab".repeat(20));
        assert_eq!(check_body(&Body::Order(o)), Ok(()), "a Pool API renter pays");
        for wrong in ["ab".repeat(21), "0x12".into(), format!("0x{}", "zz".repeat(20))] {
            let mut o = order();
            o.payer_wallet = wrong;
            assert_eq!(check_body(&Body::Order(o)).unwrap_err().field, "order.payer_wallet");
        }
    }

    #[test]
    fn identity_and_bid_limits() {
        let id = IdentityRecord {
            org: "acme".into(),
            wallet: format!("0x{}", "1".repeat(40)),
            addresses: vec![],
            wallet_proof: vec![1; 65],
        };
        assert_eq!(check_body(&Body::Identity(id.clone())), Ok(()));
        let mut bad_wallet = id.clone();
        bad_wallet.wallet = "0x12".into();
        assert!(check_body(&Body::Identity(bad_wallet)).is_err());
        for len in [0, 64, 66] {
            let mut unproven = id.clone();
            unproven.wallet_proof = vec![1; len];
            assert_eq!(
                check_body(&Body::Identity(unproven)).unwrap_err().field,
                "identity.wallet_proof"
            );
        }
        let bid = Bid {
            order_id: "o-1".into(),
            bid_id: "b-1".into(),
            provider_org: "globex".into(),
            gpu_product: "NVIDIA H100 80GB HBM3".into(),
            gpu_count: 17,
            price_per_gpu_hour: "2".into(),
            bid_expires_at_unix_ms: 1,
        };
        assert_eq!(check_body(&Body::Bid(bid)).unwrap_err().field, "bid.gpu_count");
    }
}

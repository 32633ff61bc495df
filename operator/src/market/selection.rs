//! Choosing among bids, and saying why there are none. Pure.

use gpupool_crds::price::TokenAmount;

use super::bidengine::Supply;
use crate::matching::product_matches;

/// One bid as selection sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Candidate {
    pub name: String,
    pub org: String,
    pub price: TokenAmount,
    pub completed: u64,
    pub failed: u64,
    /// From publishing the order to receiving the bid.
    pub latency_ms: u64,
    pub expires_at_ms: u64,
}

impl Candidate {
    /// Laplace-smoothed success ratio in parts per million: a new peer counts
    /// as 50 %, so it is neither shut out nor preferred over a proven one.
    fn reputation_ppm(&self) -> u64 {
        (self.completed + 1).saturating_mul(1_000_000) / (self.completed + self.failed + 2)
    }
}

/// Auto selection: lowest price, then reputation, then latency; the name
/// breaks ties so every replica picks the same. Expired bids and excluded
/// organisations never win.
pub fn pick<'a>(bids: &'a [Candidate], now_ms: u64, excluded_orgs: &[String]) -> Option<&'a Candidate> {
    bids.iter()
        .filter(|b| b.expires_at_ms > now_ms && !excluded_orgs.contains(&b.org))
        .min_by(|a, b| {
            a.price
                .cmp(&b.price)
                .then(b.reputation_ppm().cmp(&a.reputation_ppm()))
                .then(a.latency_ms.cmp(&b.latency_ms))
                .then(a.name.cmp(&b.name))
        })
}

/// What the pool last advertised, per peer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PeerSupply {
    pub org: String,
    pub offers: Vec<(Supply, Option<TokenAmount>)>,
}

/// What the AiJob needs, for the sentence.
#[derive(Clone, Debug)]
pub struct Wanted<'a> {
    pub count: u32,
    pub models: &'a [String],
    pub min_memory_mib: u64,
    pub max_price: TokenAmount,
    pub allowed_orgs: &'a [String],
    pub denied_orgs: &'a [String],
    pub excluded_orgs: &'a [String],
}

impl Wanted<'_> {
    fn describe(&self) -> String {
        let models = if self.models.is_empty() {
            "GPUs".to_string()
        } else {
            self.models.join("|")
        };
        format!("{}×{models}", self.count)
    }

    /// Whether one node of this advertised supply holds the whole job.
    fn fits_on_one_node(&self, s: &Supply) -> bool {
        s.max_per_node >= self.count && s.memory_mib >= self.min_memory_mib && product_matches(self.models, &s.product)
    }

    pub fn may_use(&self, org: &str) -> bool {
        !self.denied_orgs.iter().any(|o| o == org)
            && !self.excluded_orgs.iter().any(|o| o == org)
            && (self.allowed_orgs.is_empty() || self.allowed_orgs.iter().any(|o| o == org))
    }
}

/// Whether some usable peer advertises room for `w` on one node at or below
/// its max price: the case where only a bid is missing.
pub fn advertises_fit(w: &Wanted<'_>, peers: &[PeerSupply]) -> bool {
    explain_no_bids(w, peers).0 == "NoBids"
}

/// The organisations whose adverts say they could bid on `w`: usable, with
/// room on one node, at an advertised price (if any) within the max. Once
/// each of them has bid, waiting out the rest of the window can bring no
/// better bid, only hold every bidder's reserved GPUs longer.
pub fn expected_bidders(w: &Wanted<'_>, peers: &[PeerSupply]) -> Vec<String> {
    peers
        .iter()
        .filter(|p| w.may_use(&p.org))
        .filter(|p| {
            p.offers
                .iter()
                .any(|(s, price)| w.fits_on_one_node(s) && price.is_none_or(|p| p <= w.max_price))
        })
        .map(|p| p.org.clone())
        .collect()
}

/// How many orders shaped like `w` the pool can answer at once, as far as
/// the adverts say: every fitting peer reserves GPUs for every order it bids
/// on, so orders beyond the roomiest single peer's free GPUs get no bid.
/// Used so that room for three jobs wakes three waiting jobs, not all of
/// them: the rest would only fail their window and back off further.
pub fn advertised_room(w: &Wanted<'_>, peers: &[PeerSupply]) -> u32 {
    let count = w.count.max(1);
    peers
        .iter()
        .filter(|p| w.may_use(&p.org))
        .map(|p| {
            p.offers
                .iter()
                .filter(|(s, price)| w.fits_on_one_node(s) && price.is_none_or(|p| p <= w.max_price))
                .map(|(s, _)| s.free / count)
                .sum::<u32>()
        })
        .max()
        .unwrap_or(0)
}

/// Every reason [`explain_no_bids`] gives. While the window after an empty
/// one is open and still empty, the job keeps showing why the last one was
/// empty: replacing it with "Bidding" at the next reconcile left users (and
/// tests polling for it) a few milliseconds to see it.
pub const NO_BID_REASONS: [&str; 6] = [
    "NoPeers",
    "NoAllowedPeers",
    "NoPeerHasCapacity",
    "PriceTooLow",
    "NoBids",
    "PayerCannotFund",
];

/// The static form of `reason` if it is one of [`NO_BID_REASONS`].
pub fn no_bids_reason(reason: &str) -> Option<&'static str> {
    NO_BID_REASONS.into_iter().find(|r| *r == reason)
}

/// Each usable peer's ask for a product that has room for the job on one
/// node (None: advertised without a price).
fn fitting_asks<'a>(w: &Wanted<'_>, usable: &[&'a PeerSupply]) -> Vec<(&'a str, Option<TokenAmount>)> {
    usable
        .iter()
        .flat_map(|p| {
            p.offers
                .iter()
                .filter(|(s, _)| w.fits_on_one_node(s))
                .map(move |(_, price)| (p.org.as_str(), *price))
        })
        .collect()
}

/// The lowest ask within the renter's max price among the peers it may use
/// that advertise room for the job: what a first deposit is priced at.
pub fn lowest_fitting_ask(w: &Wanted<'_>, peers: &[PeerSupply]) -> Option<TokenAmount> {
    let usable: Vec<&PeerSupply> = peers.iter().filter(|p| w.may_use(&p.org)).collect();
    fitting_asks(w, &usable)
        .into_iter()
        .filter_map(|(_, p)| p)
        .filter(|p| *p <= w.max_price)
        .min()
}

/// A reason (CamelCase) and a sentence a person can act on, for an order
/// that got no usable bid.
pub fn explain_no_bids(w: &Wanted<'_>, peers: &[PeerSupply]) -> (&'static str, String) {
    let usable: Vec<&PeerSupply> = peers.iter().filter(|p| w.may_use(&p.org)).collect();
    if peers.is_empty() {
        return (
            "NoPeers",
            "no other organisation of the pool is connected; check the bootstrap peers".into(),
        );
    }
    if usable.is_empty() {
        return (
            "NoAllowedPeers",
            format!(
                "every connected organisation ({}) is denied, not allowed or failed this job before",
                peers.iter().map(|p| p.org.as_str()).collect::<Vec<_>>().join(", ")
            ),
        );
    }
    let fitting = fitting_asks(w, &usable);
    if fitting.is_empty() {
        return (
            "NoPeerHasCapacity",
            format!("no peer has {} free on one node", w.describe()),
        );
    }
    let lowest = fitting.iter().filter_map(|(o, p)| p.map(|p| (p, *o))).min();
    match lowest {
        Some((price, org)) if price > w.max_price => (
            "PriceTooLow",
            format!(
                "lowest ask is {price} per GPU-hour ({org}), above your max price {}; raise maxPricePerGpuHour",
                w.max_price
            ),
        ),
        _ => (
            "NoBids",
            format!(
                "peers advertise {} free but none bid in the window (a provider can refuse past its lending \
                 limit, past what its policy lets one renter hold in open bids, or when the paying wallet \
                 and escrow account cannot fund a minute of the job); asking again",
                w.describe()
            ),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn c(name: &str, org: &str, price: &str, completed: u64, failed: u64, latency: u64) -> Candidate {
        Candidate {
            name: name.into(),
            org: org.into(),
            price: price.parse().unwrap(),
            completed,
            failed,
            latency_ms: latency,
            expires_at_ms: 10_000,
        }
    }

    #[test]
    fn price_then_reputation_then_latency() {
        let bids = vec![
            c("a", "x", "2", 0, 0, 5),
            c("b", "y", "1.5", 0, 3, 5),
            c("c", "z", "1.5", 5, 0, 50),
            c("d", "w", "1.5", 5, 0, 10),
        ];
        assert_eq!(pick(&bids, 0, &[]).unwrap().name, "d");
        assert_eq!(pick(&bids, 0, &["w".into()]).unwrap().name, "c");
        assert_eq!(pick(&bids, 10_000, &[]), None, "expired bids never win");
        assert_eq!(pick(&[], 0, &[]), None);
    }

    fn supply(product: &str, per_node: u32) -> Supply {
        Supply {
            product: product.into(),
            memory_mib: 81559,
            free: per_node,
            max_per_node: per_node,
        }
    }

    #[test]
    fn explains_each_no_bid_case() {
        let models = vec!["H100".to_string()];
        let w = Wanted {
            count: 8,
            models: &models,
            min_memory_mib: 0,
            max_price: "2".parse().unwrap(),
            allowed_orgs: &[],
            denied_orgs: &[],
            excluded_orgs: &[],
        };
        assert_eq!(explain_no_bids(&w, &[]).0, "NoPeers");
        let small = PeerSupply {
            org: "globex".into(),
            offers: vec![(supply("NVIDIA H100 80GB HBM3", 4), Some("1".parse().unwrap()))],
        };
        let (r, m) = explain_no_bids(&w, std::slice::from_ref(&small));
        assert_eq!(r, "NoPeerHasCapacity");
        assert_eq!(m, "no peer has 8×H100 free on one node");
        let dear = PeerSupply {
            org: "initech".into(),
            offers: vec![(supply("NVIDIA H100 80GB HBM3", 8), Some("3.1".parse().unwrap()))],
        };
        let (r, m) = explain_no_bids(&w, &[small.clone(), dear.clone()]);
        assert_eq!(r, "PriceTooLow");
        assert!(
            m.contains("lowest ask is 3.1 per GPU-hour (initech), above your max price 2"),
            "{m}"
        );
        assert!(!advertises_fit(&w, &[small.clone(), dear.clone()]));
        let fits = PeerSupply {
            org: "hooli".into(),
            offers: vec![(supply("NVIDIA H100 80GB HBM3", 8), Some("1.5".parse().unwrap()))],
        };
        assert!(advertises_fit(&w, &[small.clone(), fits.clone()]));
        assert!(
            !advertises_fit(
                &Wanted {
                    excluded_orgs: &["hooli".to_string()],
                    ..w.clone()
                },
                std::slice::from_ref(&fits)
            ),
            "an excluded org's room does not count"
        );
        assert_eq!(
            advertised_room(&w, &[small.clone(), dear.clone()]),
            0,
            "too small, too dear"
        );
        let roomy = PeerSupply {
            org: "umbrella".into(),
            offers: vec![
                (supply("NVIDIA H100 80GB HBM3", 8), Some("1".parse().unwrap())),
                (supply("NVIDIA H100 SXM", 16), None),
            ],
        };
        // 8 + 16 free H100s at umbrella make three 8-GPU jobs; hooli's one
        // does not add to them, since each order reserves at every peer.
        assert_eq!(advertised_room(&w, &[roomy.clone(), fits.clone()]), 3);
        let denied = vec!["initech".to_string(), "globex".to_string()];
        let w2 = Wanted {
            denied_orgs: &denied,
            ..w.clone()
        };
        assert_eq!(explain_no_bids(&w2, &[small.clone(), dear.clone()]).0, "NoAllowedPeers");
        assert_eq!(explain_no_bids(&w, std::slice::from_ref(&fits)).0, "NoBids");
        // Every reason given is one the job keeps showing through the next window.
        for peers in [
            vec![],
            vec![small.clone()],
            vec![small.clone(), dear.clone()],
            vec![fits],
        ] {
            let r = explain_no_bids(&w, &peers).0;
            assert_eq!(no_bids_reason(r), Some(r));
        }
        assert_eq!(
            no_bids_reason(explain_no_bids(&w2, &[small, dear]).0),
            Some("NoAllowedPeers")
        );
        assert_eq!(no_bids_reason("Bidding"), None);
    }

    #[test]
    fn expects_bids_only_from_peers_that_advertise_room_within_the_price() {
        let models = vec!["H100".to_string()];
        let excluded = vec!["failed-before".to_string()];
        let w = Wanted {
            count: 8,
            models: &models,
            min_memory_mib: 0,
            max_price: "2".parse().unwrap(),
            allowed_orgs: &[],
            denied_orgs: &[],
            excluded_orgs: &excluded,
        };
        let peer = |org: &str, free: u32, price: Option<&str>| PeerSupply {
            org: org.into(),
            offers: vec![(supply("NVIDIA H100 80GB HBM3", free), price.map(|p| p.parse().unwrap()))],
        };
        let peers = [
            peer("roomy", 8, Some("1.5")),
            peer("unpriced", 16, None),
            peer("small", 4, Some("1")),
            peer("dear", 8, Some("3")),
            peer("failed-before", 8, Some("1")),
        ];
        assert_eq!(
            expected_bidders(&w, &peers),
            vec!["roomy".to_string(), "unpriced".to_string()]
        );
        assert!(expected_bidders(&w, &[]).is_empty());
    }
}

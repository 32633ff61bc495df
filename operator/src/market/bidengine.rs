//! The bid engine: given an order and this provider's free GPUs and policy,
//! what to offer, or why not. Pure and allocation-light: it runs for every
//! order on the gossip topic.

use gpupool_crds::price::TokenAmount;

use super::policy::ProviderPolicy;
use crate::matching::product_matches;

/// The id a provider gives its bid for an order. The renter names the bid
/// the same way when it answers (bid results, the lease offer), and the
/// provider finds its reservation by it, so both build it here.
pub fn bid_id(provider_org: &str, order_id: &str) -> String {
    format!("{provider_org}-{order_id}")
}

/// Free GPUs of one product here, after reservations.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Supply {
    pub product: String,
    pub memory_mib: u64,
    pub free: u32,
    /// Most free on one node: an AiJob runs on one node.
    pub max_per_node: u32,
}

/// What an order asks for, parsed once.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Ask {
    pub renter_org: String,
    pub count: u32,
    pub models: Vec<String>,
    pub min_memory_mib: u64,
    pub max_price: TokenAmount,
    pub allowed_orgs: Vec<String>,
    pub denied_orgs: Vec<String>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Offer {
    pub product: String,
    pub count: u32,
    pub price: TokenAmount,
}

/// GPUs already spoken for here when an order arrives.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Held {
    /// Lent in leases or reserved by bids, for every renter.
    pub lent: u32,
    /// Reserved by this order's renter's open and won bids, not yet leases.
    pub by_renter: u32,
}

impl Held {
    pub fn lent(lent: u32) -> Self {
        Self { lent, by_renter: 0 }
    }
}

/// Why this provider does not bid; logged at debug and counted by
/// [`NoBid::reason`], never sent.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum NoBid {
    /// The order excludes this organisation.
    ExcludedByOrder,
    /// This provider's policy does not serve the renter.
    RenterNotServed,
    /// Lending would pass the policy's limit.
    LendingLimit { lent: u32, limit: u32 },
    /// The renter's bids not yet turned into leases would hold more GPUs
    /// here than the policy lets one renter hold.
    RenterHoldLimit { held: u32, limit: u32 },
    /// No product here matches models and memory.
    NoMatchingProduct,
    /// Matching products, but not enough free on one node.
    NotEnoughFree { most: u32 },
    /// Matching and free, but priced above the renter's maximum (or unpriced).
    TooExpensive { cheapest: Option<TokenAmount> },
    /// Our own order.
    OwnOrder,
    /// The order's payer could not fund a first deposit at our price on top
    /// of those its other open bids here count on (`renter_funds`); decided
    /// after `evaluate`, with the chain's figures.
    RenterCannotPay {
        spendable: u128,
        pledged: u128,
        needed: u128,
    },
    /// The payer's funds could not be read (the chain RPC failed): no GPUs
    /// are held for an order that may not be paid.
    RenterFundsUnknown,
}

impl NoBid {
    /// Every [`NoBid::reason`], so dashboards and alerts can be checked
    /// against the set.
    pub const REASONS: [&'static str; 10] = [
        "excluded_by_order",
        "renter_not_served",
        "lending_limit",
        "renter_hold_limit",
        "no_matching_product",
        "not_enough_free",
        "too_expensive",
        "own_order",
        "renter_cannot_pay",
        "renter_funds_unknown",
    ];

    /// A short label for metrics: a closed set, one per variant.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::ExcludedByOrder => "excluded_by_order",
            Self::RenterNotServed => "renter_not_served",
            Self::LendingLimit { .. } => "lending_limit",
            Self::RenterHoldLimit { .. } => "renter_hold_limit",
            Self::NoMatchingProduct => "no_matching_product",
            Self::NotEnoughFree { .. } => "not_enough_free",
            Self::TooExpensive { .. } => "too_expensive",
            Self::OwnOrder => "own_order",
            Self::RenterCannotPay { .. } => "renter_cannot_pay",
            Self::RenterFundsUnknown => "renter_funds_unknown",
        }
    }
}

/// Decides the bid for `ask` from organisation `me`, with `held` GPUs already
/// spoken for. Picks the cheapest matching product that fits.
pub fn evaluate(me: &str, policy: &ProviderPolicy, supply: &[Supply], held: Held, ask: &Ask) -> Result<Offer, NoBid> {
    if ask.renter_org == me {
        return Err(NoBid::OwnOrder);
    }
    if ask.denied_orgs.iter().any(|o| o == me)
        || (!ask.allowed_orgs.is_empty() && !ask.allowed_orgs.iter().any(|o| o == me))
    {
        return Err(NoBid::ExcludedByOrder);
    }
    if !policy.serves(&ask.renter_org) {
        return Err(NoBid::RenterNotServed);
    }
    if held.lent.saturating_add(ask.count) > policy.max_lent_gpus {
        return Err(NoBid::LendingLimit {
            lent: held.lent,
            limit: policy.max_lent_gpus,
        });
    }
    // Bids cost a renter nothing, and each holds GPUs for its lifetime: with
    // no limit, one renter's stream of orders it never leases holds every
    // GPU here against the others.
    if policy.max_held_gpus_per_renter > 0 && held.by_renter.saturating_add(ask.count) > policy.max_held_gpus_per_renter
    {
        return Err(NoBid::RenterHoldLimit {
            held: held.by_renter,
            limit: policy.max_held_gpus_per_renter,
        });
    }
    let mut matching = false;
    let mut most = 0;
    let mut cheapest_fit: Option<(TokenAmount, &Supply)> = None;
    let mut cheapest_any: Option<TokenAmount> = None;
    for s in supply {
        if s.memory_mib < ask.min_memory_mib || !product_matches(&ask.models, &s.product) {
            continue;
        }
        matching = true;
        most = most.max(s.max_per_node);
        if s.max_per_node < ask.count {
            continue;
        }
        let Some(price) = policy.price_of(&s.product) else {
            continue;
        };
        cheapest_any = Some(cheapest_any.map_or(price, |c| c.min(price)));
        if price <= ask.max_price && cheapest_fit.is_none_or(|(p, _)| price < p) {
            cheapest_fit = Some((price, s));
        }
    }
    match cheapest_fit {
        Some((price, s)) => Ok(Offer {
            product: s.product.clone(),
            count: ask.count,
            price,
        }),
        None if !matching => Err(NoBid::NoMatchingProduct),
        None if most < ask.count => Err(NoBid::NotEnoughFree { most }),
        None => Err(NoBid::TooExpensive { cheapest: cheapest_any }),
    }
}

#[cfg(test)]
mod tests {
    use super::super::policy::PriceRule;
    use super::*;

    const H100: &str = "NVIDIA H100 80GB HBM3";
    const A100: &str = "NVIDIA A100-SXM4-80GB";

    fn policy() -> ProviderPolicy {
        ProviderPolicy {
            prices: vec![
                PriceRule {
                    model: "H100".into(),
                    price: "2.5".parse().unwrap(),
                },
                PriceRule {
                    model: "A100".into(),
                    price: "1.5".parse().unwrap(),
                },
            ],
            max_lent_gpus: 16,
            max_held_gpus_per_renter: 0,
            require_renter_funds: true,
            allowed_orgs: vec![],
            denied_orgs: vec!["evil".into()],
        }
    }

    fn supply() -> Vec<Supply> {
        vec![
            Supply {
                product: H100.into(),
                memory_mib: 81559,
                free: 16,
                max_per_node: 8,
            },
            Supply {
                product: A100.into(),
                memory_mib: 81920,
                free: 4,
                max_per_node: 4,
            },
        ]
    }

    fn ask(count: u32, models: &[&str], max: &str) -> Ask {
        Ask {
            renter_org: "acme".into(),
            count,
            models: models.iter().map(|s| s.to_string()).collect(),
            min_memory_mib: 0,
            max_price: max.parse().unwrap(),
            allowed_orgs: vec![],
            denied_orgs: vec![],
        }
    }

    #[test]
    fn cheapest_fitting_product_wins() {
        let o = evaluate("globex", &policy(), &supply(), Held::lent(0), &ask(4, &[], "3")).unwrap();
        assert_eq!((o.product.as_str(), o.price), (A100, "1.5".parse().unwrap()));
        let o = evaluate("globex", &policy(), &supply(), Held::lent(0), &ask(8, &[], "3")).unwrap();
        assert_eq!(o.product, H100, "A100 has only 4 on one node");
    }

    #[test]
    fn every_refusal_says_why() {
        let p = policy();
        let s = supply();
        assert_eq!(
            evaluate("acme", &p, &s, Held::lent(0), &ask(1, &[], "9")),
            Err(NoBid::OwnOrder)
        );
        assert_eq!(
            evaluate("globex", &p, &s, Held::lent(0), &ask(8, &["H100"], "2")),
            Err(NoBid::TooExpensive {
                cheapest: Some("2.5".parse().unwrap())
            })
        );
        assert_eq!(
            evaluate("globex", &p, &s, Held::lent(0), &ask(1, &["B200"], "9")),
            Err(NoBid::NoMatchingProduct)
        );
        assert_eq!(
            evaluate("globex", &p, &s, Held::lent(0), &ask(12, &["H100"], "9")),
            Err(NoBid::NotEnoughFree { most: 8 })
        );
        assert_eq!(
            evaluate("globex", &p, &s, Held::lent(12), &ask(8, &[], "9")),
            Err(NoBid::LendingLimit { lent: 12, limit: 16 })
        );
        let mut a = ask(1, &[], "9");
        a.denied_orgs = vec!["globex".into()];
        assert_eq!(
            evaluate("globex", &p, &s, Held::lent(0), &a),
            Err(NoBid::ExcludedByOrder)
        );
        let mut a = ask(1, &[], "9");
        a.allowed_orgs = vec!["initech".into()];
        assert_eq!(
            evaluate("globex", &p, &s, Held::lent(0), &a),
            Err(NoBid::ExcludedByOrder)
        );
        let mut a = ask(1, &[], "9");
        a.renter_org = "evil".into();
        assert_eq!(
            evaluate("globex", &p, &s, Held::lent(0), &a),
            Err(NoBid::RenterNotServed)
        );
        let mut a = ask(1, &[], "9");
        a.min_memory_mib = 100_000;
        assert_eq!(
            evaluate("globex", &p, &s, Held::lent(0), &a),
            Err(NoBid::NoMatchingProduct)
        );
    }

    #[test]
    fn every_reason_is_listed_once() {
        let all = [
            NoBid::ExcludedByOrder,
            NoBid::RenterNotServed,
            NoBid::LendingLimit { lent: 0, limit: 0 },
            NoBid::RenterHoldLimit { held: 0, limit: 0 },
            NoBid::NoMatchingProduct,
            NoBid::NotEnoughFree { most: 0 },
            NoBid::TooExpensive { cheapest: None },
            NoBid::OwnOrder,
            NoBid::RenterCannotPay {
                spendable: 0,
                pledged: 0,
                needed: 1,
            },
            NoBid::RenterFundsUnknown,
        ];
        let reasons: Vec<&str> = all.iter().map(NoBid::reason).collect();
        assert_eq!(reasons, NoBid::REASONS);
    }

    #[test]
    fn one_renter_holds_no_more_than_the_policy_lets_it() {
        let mut p = policy();
        let s = supply();
        let held = |lent, by_renter| Held { lent, by_renter };
        // No limit: a renter's open bids count only toward maxLentGpus.
        assert!(evaluate("globex", &p, &s, held(12, 12), &ask(4, &[], "9")).is_ok());
        p.max_held_gpus_per_renter = 4;
        assert!(evaluate("globex", &p, &s, held(3, 3), &ask(1, &[], "9")).is_ok());
        assert_eq!(
            evaluate("globex", &p, &s, held(3, 3), &ask(2, &[], "9")),
            Err(NoBid::RenterHoldLimit { held: 3, limit: 4 })
        );
        assert_eq!(
            evaluate("globex", &p, &s, held(0, 0), &ask(8, &[], "9")),
            Err(NoBid::RenterHoldLimit { held: 0, limit: 4 }),
            "one order bigger than the limit is refused too"
        );
        // Other renters' bids leave this one's share alone.
        assert!(evaluate("globex", &p, &s, held(10, 0), &ask(4, &[], "9")).is_ok());
        // The lending limit is checked first: it says more about this provider.
        assert_eq!(
            evaluate("globex", &p, &s, held(16, 4), &ask(1, &[], "9")),
            Err(NoBid::LendingLimit { lent: 16, limit: 16 })
        );
    }
}

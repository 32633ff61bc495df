//! Whether a provider runs the lease a renter offers. A peer can send any
//! offer it likes; what makes one worth GPUs is the lease on chain. So the
//! offer must name the wallet that the sender's identity record binds to its
//! peer id, and our chain and escrow; and the lease on chain must pay our
//! wallet at the rate our bid asked, hold at least a minute of it, and be the
//! sender's own, or opened by the sender as agent for a renter without a
//! cluster (a Pool API job). Pure: the provider asks the chain and hands the
//! answer here.

use std::str::FromStr;

use gpupool_chain::{Address, B256, LeaseOnChain};
use gpupool_crds::price::TokenAmount;
use gpupool_proto::peer::v1::LeaseOffer;

use crate::settlement_plan::{MIN_DEPOSIT_SECS, rate_per_second};

/// Why an offer is not run now.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Refusal {
    /// Try again when the renter resends: the chain or the API server has
    /// not caught up, or did not answer.
    Retry(String),
    /// Tell the renter no: it closes the lease (refund) and asks the others.
    Refuse(String),
}

/// What the provider holds the offer to: its own chain account, and what
/// its bid asked.
#[derive(Clone, Debug)]
pub struct Terms {
    pub our_wallet: Address,
    pub chain_id: u64,
    pub escrow: Address,
    /// The wallet the sender's identity record binds to its peer id, if it
    /// sent one.
    pub sender_wallet: Option<Address>,
    pub price_per_gpu_hour: TokenAmount,
    pub gpus: u32,
}

/// An offer that passed [`check_offer`]: what to ask the chain about, and
/// what the answer must say.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Offered {
    pub lease_id: B256,
    pub renter_wallet: Address,
    /// Tokens per second the lease must pay: the bid's price for its GPUs.
    pub rate: u128,
}

/// The offer on its own, before the chain is asked.
pub fn check_offer(offer: &LeaseOffer, terms: &Terms) -> Result<Offered, Refusal> {
    let lease_id = B256::from_str(&offer.lease_id).map_err(|_| Refusal::Refuse("lease id".into()))?;
    let renter_wallet = Address::from_str(&offer.renter_wallet).map_err(|_| Refusal::Refuse("renter wallet".into()))?;
    if terms.sender_wallet != Some(renter_wallet) {
        return Err(Refusal::Refuse(
            "the renter wallet is not the one its identity record names".into(),
        ));
    }
    if offer.chain_id != terms.chain_id || Address::from_str(&offer.escrow_contract).ok() != Some(terms.escrow) {
        return Err(Refusal::Refuse(
            "the lease is on another chain or escrow than ours".into(),
        ));
    }
    let rate = rate_per_second(terms.price_per_gpu_hour, terms.gpus)
        .ok_or_else(|| Refusal::Refuse("price rounds to zero".into()))?;
    Ok(Offered {
        lease_id,
        renter_wallet,
        rate,
    })
}

/// The lease as the chain holds it, against the offer. Ok carries who
/// funds the workload when that is not the sender: the renter whose escrow
/// account a Pool API job spends, which the sender opened the lease for.
pub fn check_on_chain(
    on_chain: &LeaseOnChain,
    offered: &Offered,
    our_wallet: Address,
) -> Result<Option<String>, Refusal> {
    let lease = match on_chain {
        LeaseOnChain::Open { lease, .. } => lease,
        LeaseOnChain::Unknown => return Err(Refusal::Retry("not on chain yet".into())),
        LeaseOnChain::Closed { .. } => return Err(Refusal::Refuse("the lease is already closed".into())),
    };
    if lease.provider != our_wallet {
        return Err(Refusal::Refuse(format!(
            "the lease pays {}, not our wallet",
            lease.provider
        )));
    }
    // The sender can still close a lease it opened as agent, and answers
    // for it as the renter would.
    let as_agent = lease.agent == offered.renter_wallet && lease.agent != Address::ZERO;
    if lease.renter != offered.renter_wallet && !as_agent {
        return Err(Refusal::Refuse(
            "the lease's renter is not the sender, nor did the sender open it as an agent".into(),
        ));
    }
    if lease.rate_per_second != offered.rate {
        return Err(Refusal::Refuse(format!(
            "the lease pays {} per second, the bid asked {}",
            lease.rate_per_second, offered.rate
        )));
    }
    if lease.balance < offered.rate.saturating_mul(MIN_DEPOSIT_SECS.into()) {
        return Err(Refusal::Refuse("the deposit covers less than a minute".into()));
    }
    Ok(as_agent.then(|| lease.renter.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use gpupool_chain::{CloseReason, OpenLease};

    const US: Address = Address::repeat_byte(0xb0);
    const RENTER: Address = Address::repeat_byte(0xac);
    const ESCROW: Address = Address::repeat_byte(0xe5);

    fn terms() -> Terms {
        Terms {
            our_wallet: US,
            chain_id: 31337,
            escrow: ESCROW,
            sender_wallet: Some(RENTER),
            // 3.6 tokens per GPU-hour for 2 GPUs: 0.002 tokens (2e15 units) a second.
            price_per_gpu_hour: "3.6".parse().unwrap(),
            gpus: 2,
        }
    }

    fn offer() -> LeaseOffer {
        LeaseOffer {
            lease_id: format!("{}", B256::repeat_byte(0x11)),
            renter_wallet: RENTER.to_string(),
            chain_id: 31337,
            escrow_contract: ESCROW.to_string(),
            ..Default::default()
        }
    }

    fn open(renter: Address, agent: Address, provider: Address, rate: u128, balance: u128) -> LeaseOnChain {
        LeaseOnChain::Open {
            lease: OpenLease {
                renter,
                agent,
                provider,
                token: Address::ZERO,
                rate_per_second: rate,
                balance,
                owed: 0,
                settled_at: 0,
            },
            opened_block: 1,
            paid: 0,
            deposited: balance,
        }
    }

    fn refused(r: Result<impl std::fmt::Debug, Refusal>) -> String {
        match r {
            Err(Refusal::Refuse(why)) => why,
            other => panic!("expected a refusal, got {other:?}"),
        }
    }

    const RATE: u128 = 2_000_000_000_000_000;

    #[test]
    fn an_offer_must_come_from_the_wallet_its_sender_proved_on_our_chain() {
        let offered = check_offer(&offer(), &terms()).unwrap();
        assert_eq!(offered.rate, RATE);
        assert_eq!(offered.renter_wallet, RENTER);

        let mut someone_else = offer();
        someone_else.renter_wallet = Address::repeat_byte(0x66).to_string();
        assert!(refused(check_offer(&someone_else, &terms())).contains("not the one its identity record names"));
        let unknown_sender = Terms {
            sender_wallet: None,
            ..terms()
        };
        assert!(refused(check_offer(&offer(), &unknown_sender)).contains("identity record"));

        let mut other_chain = offer();
        other_chain.chain_id = 1;
        assert!(refused(check_offer(&other_chain, &terms())).contains("another chain or escrow"));
        let mut other_escrow = offer();
        other_escrow.escrow_contract = Address::repeat_byte(0x01).to_string();
        assert!(refused(check_offer(&other_escrow, &terms())).contains("another chain or escrow"));

        let mut garbled = offer();
        garbled.lease_id = "0xnothex".into();
        assert_eq!(refused(check_offer(&garbled, &terms())), "lease id");
        let free = Terms {
            price_per_gpu_hour: TokenAmount(0),
            ..terms()
        };
        assert_eq!(refused(check_offer(&offer(), &free)), "price rounds to zero");
    }

    #[test]
    fn the_lease_on_chain_must_pay_us_what_we_bid_for_at_least_a_minute() {
        let offered = check_offer(&offer(), &terms()).unwrap();
        let minute = RATE * 60;
        assert_eq!(
            check_on_chain(&open(RENTER, Address::ZERO, US, RATE, minute), &offered, US),
            Ok(None)
        );
        assert!(
            refused(check_on_chain(
                &open(RENTER, Address::ZERO, Address::repeat_byte(0x99), RATE, minute),
                &offered,
                US
            ))
            .contains("not our wallet")
        );
        assert_eq!(
            refused(check_on_chain(
                &open(RENTER, Address::ZERO, US, RATE / 2, minute),
                &offered,
                US
            )),
            format!("the lease pays {} per second, the bid asked {RATE}", RATE / 2)
        );
        assert_eq!(
            refused(check_on_chain(
                &open(RENTER, Address::ZERO, US, RATE, minute - 1),
                &offered,
                US
            )),
            "the deposit covers less than a minute"
        );
    }

    #[test]
    fn a_lease_is_the_senders_own_or_one_it_opened_as_agent() {
        let offered = check_offer(&offer(), &terms()).unwrap();
        let minute = RATE * 60;
        let pool_api_renter = Address::repeat_byte(0x77);
        // Opened by the sender for a renter without a cluster: that renter funds it.
        assert_eq!(
            check_on_chain(&open(pool_api_renter, RENTER, US, RATE, minute), &offered, US),
            Ok(Some(pool_api_renter.to_string()))
        );
        // Someone else's lease, named in an offer: refused.
        assert!(
            refused(check_on_chain(
                &open(pool_api_renter, Address::ZERO, US, RATE, minute),
                &offered,
                US
            ))
            .contains("nor did the sender open it as an agent")
        );
        assert!(
            refused(check_on_chain(
                &open(pool_api_renter, Address::repeat_byte(0x55), US, RATE, minute),
                &offered,
                US
            ))
            .contains("nor did the sender open it as an agent")
        );
        // A sender whose identity names the zero address does not become the
        // agent of every lease a renter opened itself (agent zero).
        let zero = Terms {
            sender_wallet: Some(Address::ZERO),
            ..terms()
        };
        let mut from_zero = offer();
        from_zero.renter_wallet = Address::ZERO.to_string();
        let offered = check_offer(&from_zero, &zero).unwrap();
        assert!(
            refused(check_on_chain(
                &open(pool_api_renter, Address::ZERO, US, RATE, minute),
                &offered,
                US
            ))
            .contains("nor did the sender open it as an agent")
        );
    }

    #[test]
    fn a_lease_not_on_chain_yet_waits_and_a_closed_one_is_refused() {
        let offered = check_offer(&offer(), &terms()).unwrap();
        assert_eq!(
            check_on_chain(&LeaseOnChain::Unknown, &offered, US),
            Err(Refusal::Retry("not on chain yet".into()))
        );
        let closed = LeaseOnChain::Closed {
            renter: RENTER,
            provider: US,
            reason: CloseReason::Completed,
            closed_by: RENTER,
            opened_block: 1,
            closed_block: 2,
            paid: 1,
            refunded: 1,
            deposited: 2,
        };
        assert_eq!(
            refused(check_on_chain(&closed, &offered, US)),
            "the lease is already closed"
        );
    }
}

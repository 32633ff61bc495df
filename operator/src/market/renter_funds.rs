//! Whether the wallet that would pay for an order can pay a first deposit,
//! decided before a provider holds GPUs for it.
//!
//! A bid holds GPUs for its lifetime. The per-renter hold limit caps what
//! one organisation name can hold, but names cost nothing, and an order
//! from a wallet with nothing in it can never become a lease: the renter
//! could not open one, and a provider refuses a lease whose deposit covers
//! less than a minute (`MIN_DEPOSIT_SECS`). Checking the payer's funds on
//! chain first makes every name that wants GPUs held show real tokens. The
//! wallet is the one the sender proved in its identity record, or a Pool
//! API renter's, which counts only as far as it approved the sender as its
//! agent: naming someone else's rich wallet buys nothing. Pure; the chain
//! reads are in `provider_io`.

use std::collections::HashMap;
use std::str::FromStr;

use gpupool_chain::Address;
use gpupool_crds::price::TokenAmount;

use crate::settlement_plan::{MIN_DEPOSIT_SECS, rate_per_second};

/// Who pays for an order's lease, and from what.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Payer {
    /// The sender's own wallet: its escrow account first, then its wallet
    /// (the renter's operator approves the escrow as it needs).
    Own(Address),
    /// A Pool API renter's escrow account, spent by the sender as its agent,
    /// as far as the renter's approval of that agent goes.
    Agent { renter: Address, agent: Address },
}

/// Whom an order names to pay, given the wallet its sender proved.
pub fn payer_of(sender_wallet: Address, payer_wallet: &str) -> Result<Payer, &'static str> {
    if payer_wallet.is_empty() {
        return Ok(Payer::Own(sender_wallet));
    }
    let renter = Address::from_str(payer_wallet).map_err(|_| "payer_wallet is not an address")?;
    Ok(if renter == sender_wallet {
        Payer::Own(renter)
    } else {
        Payer::Agent {
            renter,
            agent: sender_wallet,
        }
    })
}

/// The chain's figures for a payer, read together.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Funds {
    /// The payer's escrow account.
    pub account: u128,
    /// `Own`: the wallet's token balance. `Agent`: what the renter still
    /// lets the agent spend from its account.
    pub other: u128,
}

/// What the payer could put into a lease now.
pub fn spendable(payer: &Payer, f: Funds) -> u128 {
    match payer {
        Payer::Own(_) => f.account.saturating_add(f.other),
        Payer::Agent { .. } => f.account.min(f.other),
    }
}

/// The least deposit a provider accepts for `count` GPUs at `price`.
pub fn first_deposit(price: TokenAmount, count: u32) -> Option<u128> {
    rate_per_second(price, count).map(|r| r.saturating_mul(MIN_DEPOSIT_SECS.into()))
}

/// Why a renter's own order got no bids when its payer cannot fund the
/// first deposit at the lowest ask that fits: a sentence that says what is
/// short and what to run. `None` when it can (the bids were missing for
/// another reason).
pub fn explain_unfunded(payer: &Payer, f: Funds, lowest_ask: TokenAmount, count: u32) -> Option<String> {
    let needed = first_deposit(lowest_ask, count)?;
    if spendable(payer, f) >= needed {
        return None;
    }
    let shown = |v: u128| TokenAmount(v).shown();
    let ask = format!(
        "a first deposit of {} tokens (a minute of {count} GPU(s) at the lowest ask, {lowest_ask} per GPU-hour)",
        shown(needed)
    );
    Some(match payer {
        Payer::Own(w) => format!(
            "the paying wallet {w} holds {} tokens and its escrow account {}, less than {ask}; providers do not \
             bid for orders that cannot be paid: add tokens to the wallet or `gpupool escrow deposit`",
            shown(f.other),
            shown(f.account)
        ),
        Payer::Agent { renter, .. } => format!(
            "renter {renter}'s escrow account holds {} tokens and lets this member commit {} more, less than \
             {ask}; providers do not bid for orders that cannot be paid: `gpupool escrow deposit` and \
             `gpupool escrow agent` for more",
            shown(f.account),
            shown(f.other)
        ),
    })
}

/// How long a payer's figures are trusted. A renter re-publishes an order
/// after a window or more, so one read serves its burst of orders, and one
/// that has just been funded is heard again within seconds.
pub const FUNDS_FRESH_MS: u64 = 5_000;

/// The most payers remembered; the oldest reads go first.
pub const FUNDS_REMEMBERED: usize = 4_096;

/// Payers' figures as last read.
#[derive(Debug, Default)]
pub struct FundsSeen {
    seen: HashMap<Payer, (u128, u64)>,
}

impl FundsSeen {
    /// The payer's spendable funds as read within [`FUNDS_FRESH_MS`].
    pub fn get(&self, payer: &Payer, now_ms: u64) -> Option<u128> {
        self.seen
            .get(payer)
            .filter(|(_, at)| now_ms.saturating_sub(*at) < FUNDS_FRESH_MS)
            .map(|(v, _)| *v)
    }

    pub fn put(&mut self, payer: Payer, spendable: u128, now_ms: u64) {
        if self.seen.len() >= FUNDS_REMEMBERED && !self.seen.contains_key(&payer) {
            self.seen
                .retain(|_, (_, at)| now_ms.saturating_sub(*at) < FUNDS_FRESH_MS);
            if self.seen.len() >= FUNDS_REMEMBERED
                && let Some(oldest) = self.seen.iter().min_by_key(|(_, (_, at))| *at).map(|(p, _)| *p)
            {
                self.seen.remove(&oldest);
            }
        }
        self.seen.insert(payer, (spendable, now_ms));
    }

    pub fn len(&self) -> usize {
        self.seen.len()
    }

    pub fn is_empty(&self) -> bool {
        self.seen.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ME: Address = Address::repeat_byte(0xac);
    const RENTER: Address = Address::repeat_byte(0x7e);
    const TOKEN: u128 = 1_000_000_000_000_000_000;

    #[test]
    fn an_order_is_paid_by_its_sender_unless_it_names_a_renter_for_whom_the_sender_is_the_agent() {
        assert_eq!(payer_of(ME, ""), Ok(Payer::Own(ME)));
        assert_eq!(payer_of(ME, &ME.to_string()), Ok(Payer::Own(ME)), "itself, named");
        assert_eq!(
            payer_of(ME, &RENTER.to_string()),
            Ok(Payer::Agent {
                renter: RENTER,
                agent: ME
            })
        );
        assert!(payer_of(ME, "0x12").is_err());
    }

    #[test]
    fn an_agent_spends_only_what_the_renter_both_holds_and_approved() {
        let own = Payer::Own(ME);
        let agent = Payer::Agent {
            renter: RENTER,
            agent: ME,
        };
        let f = Funds {
            account: 3 * TOKEN,
            other: 5 * TOKEN,
        };
        assert_eq!(spendable(&own, f), 8 * TOKEN, "account, then wallet");
        assert_eq!(spendable(&agent, f), 3 * TOKEN, "the account bounds the approval");
        let approved_less = Funds {
            account: 3 * TOKEN,
            other: TOKEN,
        };
        assert_eq!(spendable(&agent, approved_less), TOKEN);
        assert_eq!(
            spendable(&agent, Funds::default()),
            0,
            "a stranger's wallet named as payer"
        );
        assert_eq!(
            spendable(
                &own,
                Funds {
                    account: u128::MAX,
                    other: 1
                }
            ),
            u128::MAX,
            "no overflow"
        );
    }

    #[test]
    fn the_first_deposit_is_a_minute_of_the_bid() {
        // 3.6 tokens an hour per GPU is 0.001 a second; 4 GPUs for 60 s: 0.24.
        let price = TokenAmount::from_str("3.6").unwrap();
        assert_eq!(first_deposit(price, 4), Some(240_000_000_000_000_000));
        assert_eq!(first_deposit(TokenAmount(0), 4), None, "no rate, no lease");
    }

    #[test]
    fn a_renter_whose_payer_cannot_fund_a_minute_is_told_what_is_short_and_what_to_run() {
        let price = TokenAmount::from_str("3.6").unwrap(); // 0.24 for 4 GPUs' minute
        let own = Payer::Own(ME);
        let short = Funds {
            account: 100_000_000_000_000_000,
            other: 100_000_000_000_000_000,
        };
        let m = explain_unfunded(&own, short, price, 4).unwrap();
        assert!(m.contains("holds 0.1 tokens and its escrow account 0.1"), "{m}");
        assert!(
            m.contains("first deposit of 0.24 tokens") && m.contains("3.6 per GPU-hour"),
            "{m}"
        );
        assert!(m.contains("gpupool escrow deposit"), "{m}");
        let enough = Funds {
            account: 0,
            other: 240_000_000_000_000_000,
        };
        assert_eq!(
            explain_unfunded(&own, enough, price, 4),
            None,
            "exactly a minute is enough"
        );

        let agent = Payer::Agent {
            renter: RENTER,
            agent: ME,
        };
        let approved_little = Funds {
            account: 5 * TOKEN,
            other: 1_000_000_000_000_000,
        };
        let m = explain_unfunded(&agent, approved_little, price, 4).unwrap();
        assert!(m.contains("lets this member commit 0.001 more"), "{m}");
        assert!(m.contains("gpupool escrow agent"), "{m}");
        assert_eq!(
            explain_unfunded(
                &agent,
                Funds {
                    account: 5 * TOKEN,
                    other: TOKEN
                },
                price,
                4
            ),
            None
        );
    }

    #[test]
    fn figures_are_trusted_for_a_few_seconds_and_memory_stays_bounded() {
        let mut seen = FundsSeen::default();
        let p = Payer::Own(ME);
        seen.put(p, 7, 1_000);
        assert_eq!(seen.get(&p, 1_000 + FUNDS_FRESH_MS - 1), Some(7));
        assert_eq!(seen.get(&p, 1_000 + FUNDS_FRESH_MS), None, "stale: read again");
        for i in 0..(FUNDS_REMEMBERED as u64 + 10) {
            let mut bytes = [0u8; 20];
            bytes[..8].copy_from_slice(&i.to_be_bytes());
            seen.put(Payer::Own(Address::from(bytes)), 1, 2_000 + i);
        }
        assert!(seen.len() <= FUNDS_REMEMBERED, "{}", seen.len());
        let newest = {
            let mut bytes = [0u8; 20];
            bytes[..8].copy_from_slice(&(FUNDS_REMEMBERED as u64 + 9).to_be_bytes());
            Payer::Own(Address::from(bytes))
        };
        assert_eq!(seen.get(&newest, 2_000 + FUNDS_REMEMBERED as u64 + 9), Some(1));
    }
}

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
//! agent: naming someone else's rich wallet buys nothing. A provider's
//! open bids pledge their first deposits against their payer's funds, so a
//! wallet that can fund one lease has one bid at a time here, not one for
//! every order it publishes at once. Pure; the chain reads are in
//! `provider_io`.

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

impl Payer {
    /// The wallet whose tokens pay.
    pub fn wallet(&self) -> Address {
        match self {
            Payer::Own(w) => *w,
            Payer::Agent { renter, .. } => *renter,
        }
    }

    /// What its owner runs to let it pay more.
    fn topping_up(&self) -> &'static str {
        match self {
            Payer::Own(_) => "tokens in the wallet, or `gpupool escrow deposit`",
            Payer::Agent { .. } => "`gpupool escrow deposit` and `gpupool escrow agent`",
        }
    }
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
/// first deposit at the lowest ask that fits, on its own or next to the
/// `waiting` other orders of this member it pays for that hold bids not
/// yet won or lost (providers count each bid they hold against the payer's
/// funds): a sentence that says what is short and what to run. `None` when
/// it can (the bids were missing for another reason).
pub fn explain_unfunded(
    payer: &Payer,
    f: Funds,
    lowest_ask: TokenAmount,
    count: u32,
    waiting: usize,
) -> Option<String> {
    let needed = first_deposit(lowest_ask, count)?;
    let can = spendable(payer, f);
    // The other orders' sizes and asks are their own; a deposit like this
    // one's each is what the sentence can say without reading them all.
    let with_waiting = needed.saturating_mul(u128::try_from(waiting).unwrap_or(u128::MAX).saturating_add(1));
    if can >= with_waiting {
        return None;
    }
    let shown = |v: u128| TokenAmount(v).shown();
    let ask = format!(
        "a first deposit of {} tokens (a minute of {count} GPU(s) at the lowest ask, {lowest_ask} per GPU-hour)",
        shown(needed)
    );
    if can >= needed {
        return Some(format!(
            "the paying wallet {} can fund {} tokens, {} times {ask}, and this member has {waiting} other \
             order(s) it pays for holding bids not yet won or lost; providers hold each bid against the payer's \
             funds until then, so not all of its orders get bids at once: the rest are asked again as bids \
             resolve, or add funds ({})",
            payer.wallet(),
            shown(can),
            can / needed,
            payer.topping_up()
        ));
    }
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

/// What one open bid counts against its payer's funds: the first deposit
/// its lease would need. Without it, a wallet that can fund one lease
/// could have a bid (and GPUs held) for every order it publishes at once.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Pledge {
    pub payer: Payer,
    pub deposit: u128,
}

/// What `pledges` already count against `payer`.
pub fn pledged<'a>(pledges: impl IntoIterator<Item = &'a Pledge>, payer: &Payer) -> u128 {
    pledges
        .into_iter()
        .filter(|p| p.payer == *payer)
        .fold(0u128, |sum, p| sum.saturating_add(p.deposit))
}

/// Whether a payer with `spendable` funds, `already` pledged to this
/// provider's open bids, can fund one more first deposit of `needed`.
pub fn can_fund_another(spendable: u128, already: u128, needed: u128) -> bool {
    already.checked_add(needed).is_some_and(|total| spendable >= total)
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
    fn a_payers_open_bids_count_against_its_funds_and_nobody_elses() {
        let own = Payer::Own(ME);
        let agent = Payer::Agent {
            renter: RENTER,
            agent: ME,
        };
        let pledges = [
            Pledge {
                payer: own,
                deposit: TOKEN,
            },
            Pledge {
                payer: agent,
                deposit: 5 * TOKEN,
            },
            Pledge {
                payer: own,
                deposit: 2 * TOKEN,
            },
        ];
        assert_eq!(pledged(&pledges, &own), 3 * TOKEN);
        assert_eq!(
            pledged(&pledges, &agent),
            5 * TOKEN,
            "the agent's own wallet is another payer"
        );
        assert_eq!(pledged(&pledges, &Payer::Own(RENTER)), 0);

        assert!(can_fund_another(4 * TOKEN, 3 * TOKEN, TOKEN), "exactly enough");
        assert!(!can_fund_another(4 * TOKEN - 1, 3 * TOKEN, TOKEN));
        assert!(can_fund_another(TOKEN, 0, TOKEN), "the first bid needs one deposit");
        assert!(!can_fund_another(u128::MAX, u128::MAX, 1), "no overflow into a yes");
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
        let m = explain_unfunded(&own, short, price, 4, 0).unwrap();
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
            explain_unfunded(&own, enough, price, 4, 0),
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
        let m = explain_unfunded(&agent, approved_little, price, 4, 0).unwrap();
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
                4,
                0
            ),
            None
        );
    }

    #[test]
    fn a_payer_that_funds_one_order_but_not_all_it_waits_on_is_told_so() {
        let price = TokenAmount::from_str("3.6").unwrap(); // 0.24 for 4 GPUs' minute
        let own = Payer::Own(ME);
        let half_a_token = Funds {
            account: 500_000_000_000_000_000,
            other: 0,
        };
        assert_eq!(
            explain_unfunded(&own, half_a_token, price, 4, 1),
            None,
            "two deposits of 0.24 fit in 0.5"
        );
        let m = explain_unfunded(&own, half_a_token, price, 4, 4).unwrap();
        assert!(m.contains(&ME.to_string()), "{m}");
        assert!(
            m.contains("can fund 0.5 tokens, 2 times a first deposit of 0.24 tokens"),
            "{m}"
        );
        assert!(m.contains("4 other order(s)"), "{m}");
        assert!(m.contains("gpupool escrow deposit"), "{m}");

        let agent = Payer::Agent {
            renter: RENTER,
            agent: ME,
        };
        let m = explain_unfunded(
            &agent,
            Funds {
                account: TOKEN,
                other: TOKEN,
            },
            price,
            4,
            9,
        )
        .unwrap();
        assert!(
            m.contains(&RENTER.to_string()) && m.contains("gpupool escrow agent"),
            "{m}"
        );
        assert!(
            explain_unfunded(
                &agent,
                Funds {
                    account: TOKEN,
                    other: TOKEN
                },
                price,
                4,
                usize::MAX
            )
            .is_some(),
            "no overflow"
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

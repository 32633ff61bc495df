//! Moves a member's earnings out of its escrow account on a schedule.
//!
//! A provider is paid into its escrow account, under the wallet whose key
//! the operator holds in a Kubernetes Secret: a hot key. Left there,
//! earnings grow with every lease and all of them are one leaked Secret
//! away from gone. The sweep sends what the account holds beyond `keep` to
//! an address the member names (a cold wallet whose key is not in the
//! cluster, or the operator's own wallet), in transactions of at least
//! `minimum`, so dust does not cost more in gas than it is worth. `keep`
//! stays because the account also funds the member's own leases as a
//! renter, before its wallet does.

use std::sync::Arc;
use std::time::Duration;

use gpupool_chain::{Address, ChainError, EscrowClient};
use gpupool_crds::price::TokenAmount;
use tracing::{debug, info, warn};

use crate::chain_watch::MAX_BLOCKS_PER_POLL;
use crate::telemetry::Metrics;

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SweepPolicy {
    pub to: Address,
    pub keep: TokenAmount,
    pub minimum: TokenAmount,
    pub every: Duration,
}

/// Why tokens sent to `to` would be lost, if they would: no key holds the
/// zero address, and the escrow and the token contract cannot send on what
/// they are sent (tokens the escrow holds beyond its leases and accounts
/// belong to nobody).
pub fn lost_at(to: Address, escrow: Address, token: Address) -> Option<&'static str> {
    if to == Address::ZERO {
        Some("the zero address")
    } else if to == escrow {
        Some("the escrow contract")
    } else if to == token {
        Some("the token contract")
    } else {
        None
    }
}

/// What to send out of an account holding `account`, if anything.
pub fn to_sweep(account: u128, keep: TokenAmount, minimum: TokenAmount) -> Option<u128> {
    let excess = account.checked_sub(keep.0)?;
    (excess > 0 && excess >= minimum.0).then_some(excess)
}

/// The most requests one round of counting makes. After a longer gap the
/// rest waits for the next round: nothing is skipped, only later.
pub const MAX_RANGES_PER_ROUND: u64 = 16;

/// The block ranges still to read for transfers, oldest first: every block
/// after `watched` up to `head`, in requests of at most
/// `MAX_BLOCKS_PER_POLL`, at most `MAX_RANGES_PER_ROUND` of them.
pub fn ranges_to_read(watched: u64, head: u64) -> Vec<(u64, u64)> {
    let mut out = Vec::new();
    let mut from = watched.saturating_add(1);
    while from <= head && (out.len() as u64) < MAX_RANGES_PER_ROUND {
        let to = head.min(from.saturating_add(MAX_BLOCKS_PER_POLL - 1));
        out.push((from, to));
        from = to.saturating_add(1);
    }
    out
}

/// Reads the account every `policy.every` and sweeps the excess. A failed
/// read or a refused transfer (a lease opened from the account in between)
/// is logged, counted by reason, and tried again at the next interval with
/// a fresh read: nothing is lost, the tokens stay in the account.
///
/// What went is counted from the escrow's `FundsWithdrawn` events, not from
/// the answers to the sends: a transfer that reached the chain while its
/// answer was lost (the RPC went away in between) is still counted, once,
/// at the next round. A withdrawal by hand from the same account to the
/// same address counts too: it moved the same tokens the same way.
pub async fn sweep_forever(chain: Arc<EscrowClient>, policy: SweepPolicy, metrics: Arc<Metrics>) {
    let Some(me) = chain.wallet() else {
        return;
    };
    info!(to = %policy.to, keep = %policy.keep.shown(), minimum = %policy.minimum.shown(),
        every_seconds = policy.every.as_secs(), "sweeping the escrow account's earnings");
    let mut counted = Counted::default();
    let mut every = tokio::time::interval(policy.every);
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        every.tick().await;
        // Before any send, so that every transfer lands after the block
        // counting starts from.
        if let Err(e) = counted.catch_up(&chain, me, policy.to, &metrics).await {
            debug!(error = %e, "could not read the escrow's transfers to count the sweeps");
            metrics.chain_error(e.reason());
            continue;
        }
        let account = match chain.account(me).await {
            Ok(a) => a,
            Err(e) => {
                debug!(error = %e, "could not read the escrow account to sweep it");
                metrics.chain_error(e.reason());
                continue;
            }
        };
        let Some(amount) = to_sweep(account, policy.keep, policy.minimum) else {
            continue;
        };
        match chain.withdraw_funds(amount, policy.to).await {
            Ok(()) => {
                debug!(amount = %TokenAmount(amount).shown(), to = %policy.to, "sweep confirmed");
                // Counted now rather than a whole interval later.
                if let Err(e) = counted.catch_up(&chain, me, policy.to, &metrics).await {
                    debug!(error = %e, "could not read the escrow's transfers to count the sweep");
                    metrics.chain_error(e.reason());
                }
            }
            Err(e) => {
                warn!(amount = %TokenAmount(amount).shown(), to = %policy.to, error = %e,
                    "could not sweep the escrow account; trying again at the next interval");
                metrics.chain_error(e.reason());
            }
        }
    }
}

/// How far the escrow's transfers out of this account have been counted.
#[derive(Debug, Default)]
struct Counted {
    /// The last block read; `None` until the chain has answered once. What
    /// went before the process started is not this process's to count.
    through: Option<u64>,
}

impl Counted {
    async fn catch_up(
        &mut self,
        chain: &EscrowClient,
        me: Address,
        to: Address,
        metrics: &Metrics,
    ) -> Result<(), ChainError> {
        let head = chain.head().await?;
        let Some(through) = self.through else {
            self.through = Some(head);
            return Ok(());
        };
        for (from, upto) in ranges_to_read(through, head) {
            for w in chain.funds_withdrawn(me, from, upto).await? {
                if w.to != to {
                    // A transfer by hand (`gpupool escrow withdraw`) elsewhere.
                    continue;
                }
                info!(amount = %TokenAmount(w.amount).shown(), to = %w.to, tx = %w.tx, block = w.block,
                    "swept earnings out of the escrow account");
                metrics.tokens_swept(w.amount);
            }
            // Only once the whole range is counted, so a failure reads it again.
            self.through = Some(upto);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TOKEN: u128 = 1_000_000_000_000_000_000;

    #[test]
    fn what_the_account_holds_beyond_keep_goes_once_it_is_worth_a_transaction() {
        let (keep, minimum) = (TokenAmount(5 * TOKEN), TokenAmount(TOKEN));
        assert_eq!(to_sweep(12 * TOKEN, keep, minimum), Some(7 * TOKEN));
        assert_eq!(
            to_sweep(6 * TOKEN, keep, minimum),
            Some(TOKEN),
            "exactly the minimum goes"
        );
        assert_eq!(to_sweep(6 * TOKEN - 1, keep, minimum), None, "under the minimum waits");
        assert_eq!(to_sweep(5 * TOKEN, keep, minimum), None);
        assert_eq!(
            to_sweep(2 * TOKEN, keep, minimum),
            None,
            "below keep: nothing, never a negative"
        );
    }

    #[test]
    fn tokens_are_never_swept_where_no_one_can_take_them_out() {
        let (escrow, token) = (Address::repeat_byte(0xe5), Address::repeat_byte(0x70));
        assert_eq!(lost_at(Address::ZERO, escrow, token), Some("the zero address"));
        assert_eq!(lost_at(escrow, escrow, token), Some("the escrow contract"));
        assert_eq!(lost_at(token, escrow, token), Some("the token contract"));
        assert_eq!(lost_at(Address::repeat_byte(0xc0), escrow, token), None);
    }

    #[test]
    fn with_nothing_kept_and_no_minimum_every_base_unit_goes_and_an_empty_account_sends_nothing() {
        let zero = TokenAmount(0);
        assert_eq!(to_sweep(1, zero, zero), Some(1));
        assert_eq!(to_sweep(0, zero, zero), None, "no transaction for nothing");
    }

    #[test]
    fn every_block_after_the_last_one_read_is_read_once_in_bounded_requests() {
        assert_eq!(ranges_to_read(10, 10), vec![], "nothing new");
        assert_eq!(
            ranges_to_read(10, 9),
            vec![],
            "a head behind (another RPC node) reads nothing"
        );
        assert_eq!(ranges_to_read(10, 11), vec![(11, 11)]);
        let n = MAX_BLOCKS_PER_POLL;
        assert_eq!(
            ranges_to_read(0, 2 * n + 5),
            vec![(1, n), (n + 1, 2 * n), (2 * n + 1, 2 * n + 5)]
        );
        // A long outage: one round reads a bounded stretch, the next goes on
        // from where it stopped, and no block is skipped.
        let first = ranges_to_read(0, 100 * n);
        assert_eq!(first.len() as u64, MAX_RANGES_PER_ROUND);
        let stopped = first.last().map(|r| r.1).unwrap();
        assert_eq!(stopped, MAX_RANGES_PER_ROUND * n);
        assert_eq!(ranges_to_read(stopped, 100 * n)[0].0, stopped + 1);
        assert!(first.windows(2).all(|w| w[1].0 == w[0].1 + 1), "contiguous");
    }
}

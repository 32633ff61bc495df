//! What the settlement worker should do with one Lease, decided from what the
//! chain shows. Pure: the controller observes, calls `plan`, and carries it out.

use std::time::Duration;

use gpupool_chain::LeaseOnChain;
use gpupool_crds::conditions::ConditionUpdate;
use gpupool_crds::price::TokenAmount;
use gpupool_crds::{CloseReason, LeaseSide, LeaseState};

pub const COND_CONFIRMED: &str = "Confirmed";
pub const COND_FUNDS_LOW: &str = "FundsLow";
pub const COND_CHAIN: &str = "ChainReachable";
pub const COND_SETTLED: &str = "Settling";
/// The FundsLow reason while a top-up the escrow refused is retried.
pub const REASON_TOP_UP_REFUSED: &str = "TopUpRefused";

/// Lease time beyond the job's maxDuration that the renter pays for at
/// most: the lease accrues from its open, a little before the provider
/// starts the job, whose maxDuration counts from then.
pub const START_ALLOWANCE_SECS: u64 = 60;

/// The least a lease's first deposit covers: providers refuse less, as not
/// worth starting a workload for.
pub const MIN_DEPOSIT_SECS: u64 = 60;

#[derive(Clone, Debug)]
pub struct Policy {
    pub side: LeaseSide,
    /// Blocks on top of the open (the open's own included) before the lease is Active.
    pub confirmations: u64,
    /// How often the provider withdraws what has accrued.
    pub withdraw_every: Duration,
    /// Warn the renter when the funds last less than this; the renter tops
    /// up then, when the lease has room to.
    pub warn_below: Duration,
    /// How much of the lease's time one top-up buys.
    pub top_up_for: Duration,
    /// The longest a lease goes unread when nothing is due. Chain events
    /// wake the worker sooner (`chain_watch`); this bounds how late a close
    /// or a warning comes when an event was missed.
    pub resync: Duration,
}

/// What the chain showed, all read at one moment.
#[derive(Clone, Debug)]
pub struct Observed {
    pub onchain: LeaseOnChain,
    pub head: u64,
    /// The chain's clock (latest block time), which accrual follows.
    pub now: u64,
    /// The provider's last withdrawal, chain time, from our status.
    pub last_withdrawal: Option<u64>,
    /// `spec.closeReason`.
    pub close_requested: Option<CloseReason>,
    /// The block our status says the lease was opened in, if it says so.
    pub recorded_open_block: Option<u64>,
    /// `spec.escrow.topUpTo`: the most the lease may hold in all.
    pub top_up_to: Option<u128>,
    /// What the escrow said when it last refused our top-up, from our status.
    pub top_up_refused: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Step {
    Nothing,
    /// Renter: put the deposit in.
    Open,
    Withdraw,
    /// Renter: add this many tokens, so the job runs on.
    TopUp(u128),
    Close(CloseReason),
}

impl Step {
    /// Whether, once this step's transaction has gone through, the status is
    /// left to the read-back that follows at once. A transaction that changes
    /// the lease (open, top-up, close) makes what was read before it stale,
    /// and a write of it was overwritten a moment later: one more write per
    /// open and per close. A withdrawal is written at once: its time is what
    /// paces the next one.
    pub fn leaves_status_to_read_back(&self) -> bool {
        matches!(self, Step::Open | Step::TopUp(_) | Step::Close(_))
    }
}

/// The lease's status as the chain shows it.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Figures {
    pub state: Option<LeaseState>,
    pub close_reason: Option<&'static str>,
    pub paid: Option<u128>,
    pub refunded: Option<u128>,
    pub deposited: Option<u128>,
    pub remaining: Option<u128>,
    pub funds_run_out_at: Option<u64>,
    pub opened_block: Option<u64>,
    pub confirmations: Option<u64>,
}

#[derive(Clone, Debug)]
pub struct Plan {
    pub step: Step,
    pub figures: Figures,
    pub conditions: Vec<ConditionUpdate>,
    /// When to look again; None once the lease is closed.
    pub requeue: Option<Duration>,
}

/// Tokens per second for `gpus` at an hourly price per GPU, rounded down; None
/// when that rounds to nothing (the contract refuses a zero rate).
pub fn rate_per_second(price_per_gpu_hour: TokenAmount, gpus: u32) -> Option<u128> {
    let rate = price_per_gpu_hour.for_gpu_seconds(gpus, 1)?.0;
    (rate > 0).then_some(rate)
}

/// An amount in a sentence for people; the figures stay exact in the
/// Lease's fields.
fn tokens(v: u128) -> String {
    TokenAmount(v).shown()
}

/// A chain time (unix seconds) as people read it.
fn when(unix: u64) -> String {
    i64::try_from(unix)
        .ok()
        .and_then(|s| k8s_openapi::jiff::Timestamp::from_second(s).ok())
        .map_or_else(|| format!("unix time {unix}"), |t| t.to_string())
}

/// What a renter deposits when it opens a lease for a job of `max_secs` at
/// `rate` per second, and the most the lease may hold in all (`topUpTo`):
/// the deposit covers `deposit_secs` of it (at least `MIN_DEPOSIT_SECS`),
/// top-ups the rest as it runs.
pub fn lease_funding(rate: u128, max_secs: u64, deposit_secs: u64) -> (TokenAmount, TokenAmount) {
    let budget_secs = max_secs.saturating_add(START_ALLOWANCE_SECS);
    let deposit_secs = budget_secs.min(deposit_secs.max(MIN_DEPOSIT_SECS));
    (
        TokenAmount(rate.saturating_mul(deposit_secs.into())),
        TokenAmount(rate.saturating_mul(budget_secs.into())),
    )
}

pub fn plan(policy: &Policy, seen: &Observed) -> Plan {
    let mut figures = Figures::default();
    let mut conditions = vec![ConditionUpdate::new(
        COND_CHAIN,
        true,
        "Reachable",
        "the chain answered",
    )];
    match &seen.onchain {
        // The record says the lease was opened, and this chain has never seen
        // it: another chain behind the same addresses (a reset dev chain, a
        // misconfigured RPC URL), a node that lags, or a reorganisation deeper
        // than the confirmations. Opening it again would take a second deposit
        // for a lease that may already be paid and closed, so nothing moves.
        LeaseOnChain::Unknown if let Some(block) = seen.recorded_open_block => {
            conditions.push(ConditionUpdate::new(
                COND_SETTLED,
                false,
                "NotOnChain",
                format!(
                    "this record says the lease was opened in block {block}, but the chain does not know it \
                     (another chain at this RPC URL, a lagging node, or a deep reorganisation); nothing is \
                     deposited again; check the chain configuration"
                ),
            ));
            Plan {
                step: Step::Nothing,
                figures,
                conditions,
                requeue: Some(policy.resync),
            }
        }
        LeaseOnChain::Unknown => {
            figures.state = Some(LeaseState::Pending);
            let (step, message) = match (policy.side, seen.close_requested) {
                (LeaseSide::Renter, None) => (Step::Open, "opening the lease on chain"),
                (LeaseSide::Renter, Some(_)) => (Step::Nothing, "closed before it was opened; nothing was deposited"),
                (LeaseSide::Provider, _) => (Step::Nothing, "waiting for the renter to open the lease on chain"),
            };
            if step == Step::Nothing && policy.side == LeaseSide::Renter {
                figures.state = Some(LeaseState::Closed);
                figures.close_reason = seen.close_requested.map(CloseReason::as_str);
            }
            conditions.push(ConditionUpdate::new(COND_CONFIRMED, false, "NotOpened", message));
            let requeue = (figures.state != Some(LeaseState::Closed)).then_some(Duration::from_secs(2));
            Plan {
                step,
                figures,
                conditions,
                requeue,
            }
        }
        LeaseOnChain::Open {
            lease,
            opened_block,
            paid,
            deposited,
        } => {
            let confirmations = (seen.head + 1).saturating_sub(*opened_block);
            let confirmed = confirmations >= policy.confirmations;
            let overdrawn = lease.overdrawn_at(seen.now);
            let left = lease.seconds_left_at(seen.now);
            figures.paid = Some(*paid);
            figures.deposited = Some(*deposited);
            figures.remaining = Some(lease.remaining_at(seen.now));
            figures.funds_run_out_at = Some(seen.now.saturating_add(left));
            figures.opened_block = Some(*opened_block);
            figures.confirmations = Some(confirmations);
            figures.state = Some(if !confirmed {
                LeaseState::Pending
            } else if overdrawn {
                LeaseState::InsufficientFunds
            } else {
                LeaseState::Active
            });
            // Condition messages stay put while nothing but the chain's clock
            // moves: a message that counted blocks or seconds changed on every
            // read, and every change is a status write on both sides.
            conditions.push(if confirmed {
                ConditionUpdate::new(
                    COND_CONFIRMED,
                    true,
                    "Confirmed",
                    format!(
                        "opened in block {opened_block}, with the {} confirmations this operator waits for",
                        policy.confirmations
                    ),
                )
            } else {
                ConditionUpdate::new(
                    COND_CONFIRMED,
                    false,
                    "AwaitingConfirmations",
                    format!("{confirmations} of {} confirmations", policy.confirmations),
                )
            });
            let low = u128::from(left) < policy.warn_below.as_secs().into();
            // The renter keeps a running job funded up to its maxDuration:
            // one top-up buys `top_up_for`, never past `topUpTo`.
            let room = seen.top_up_to.map(|cap| cap.saturating_sub(*deposited));
            let top_up =
                (policy.side == LeaseSide::Renter && confirmed && !overdrawn && low && seen.close_requested.is_none())
                    .then(|| {
                        room.unwrap_or(0)
                            .min(lease.rate_per_second.saturating_mul(policy.top_up_for.as_secs().into()))
                    })
                    .filter(|a| *a > 0);
            let refused = seen.top_up_refused.as_ref().filter(|_| overdrawn || top_up.is_some());
            conditions.push(if let Some(refused) = refused {
                // Retried as it was, and kept once it ran dry: the message
                // stays until the escrow says otherwise, and tells the renter
                // why the lease ended.
                ConditionUpdate::new(COND_FUNDS_LOW, true, REASON_TOP_UP_REFUSED, refused.clone())
            } else if overdrawn {
                ConditionUpdate::new(
                    COND_FUNDS_LOW,
                    true,
                    "OutOfFunds",
                    "the deposit is used up; the lease closes as InsufficientFunds",
                )
            } else if let Some(amount) = top_up {
                ConditionUpdate::new(
                    COND_FUNDS_LOW,
                    false,
                    "ToppingUp",
                    format!(
                        "adding {} tokens, so the job runs on past {}",
                        tokens(amount),
                        when(seen.now.saturating_add(left))
                    ),
                )
            } else if low && room.is_some() {
                ConditionUpdate::new(
                    COND_FUNDS_LOW,
                    true,
                    "FundsRunningOut",
                    format!(
                        "the deposit runs out at {}: the lease holds all of the job's maxDuration, so it ends then",
                        when(seen.now.saturating_add(left))
                    ),
                )
            } else if low {
                ConditionUpdate::new(
                    COND_FUNDS_LOW,
                    true,
                    "FundsRunningOut",
                    format!(
                        "the deposit runs out at {} at the current rate; top up with `gpupool escrow deposit`",
                        when(seen.now.saturating_add(left))
                    ),
                )
            } else {
                ConditionUpdate::new(
                    COND_FUNDS_LOW,
                    false,
                    "Funded",
                    format!("funded until {}", when(seen.now.saturating_add(left))),
                )
            });

            let may_close = |r: CloseReason| policy.side == LeaseSide::Renter || r != CloseReason::RenterCancelled;
            // A period from the last settlement on chain (the open, or a
            // withdrawal), not from our status: a status written late, or a
            // lease never withdrawn yet, made every new lease withdraw a
            // second's pay at once, a transaction each, sometimes twice.
            let withdrawn_at = seen
                .last_withdrawal
                .map_or(lease.settled_at, |t| t.max(lease.settled_at));
            let withdraw_due = seen.now.saturating_sub(withdrawn_at) >= policy.withdraw_every.as_secs();
            let step = match seen.close_requested {
                Some(r) if may_close(r) && (r != CloseReason::InsufficientFunds || overdrawn) => Step::Close(r),
                _ if overdrawn => Step::Close(CloseReason::InsufficientFunds),
                _ if policy.side == LeaseSide::Provider && confirmed && withdraw_due && lease.owed_at(seen.now) > 0 => {
                    Step::Withdraw
                }
                _ => top_up.map_or(Step::Nothing, Step::TopUp),
            };
            if let Some(r) = seen.close_requested
                && !(may_close(r) && (r != CloseReason::InsufficientFunds || overdrawn))
            {
                conditions.push(ConditionUpdate::new(
                    COND_SETTLED,
                    false,
                    "CloseNotAllowed",
                    format!("this side cannot close with {} now", r.as_str()),
                ));
            } else {
                conditions.push(ConditionUpdate::new(
                    COND_SETTLED,
                    true,
                    "Settling",
                    "payments follow the chain",
                ));
            }
            // Look again when something is due: confirmations, the next withdrawal,
            // the funds warning, the funds running out; at least every resync.
            let mut next = policy.resync;
            if !confirmed {
                next = Duration::from_secs(1);
            }
            if policy.side == LeaseSide::Provider {
                let due = (withdrawn_at + policy.withdraw_every.as_secs()).saturating_sub(seen.now);
                next = next.min(Duration::from_secs(due.max(1)));
            }
            if !low {
                next = next.min(Duration::from_secs(
                    (left - policy.warn_below.as_secs().min(left)).max(1),
                ));
            }
            next = next.min(Duration::from_secs(left.max(1)));
            Plan {
                step,
                figures,
                conditions,
                requeue: Some(next),
            }
        }
        LeaseOnChain::Closed {
            reason,
            paid,
            refunded,
            deposited,
            ..
        } => {
            figures.state = Some(LeaseState::Closed);
            figures.close_reason = Some(reason.as_str());
            figures.paid = Some(*paid);
            figures.refunded = Some(*refunded);
            figures.deposited = Some(*deposited);
            figures.remaining = Some(0);
            conditions.push(match &seen.top_up_refused {
                // Why it ran dry stays on record for the renter to read.
                Some(refused) if *reason == CloseReason::InsufficientFunds => {
                    ConditionUpdate::new(COND_FUNDS_LOW, true, REASON_TOP_UP_REFUSED, refused.clone())
                }
                _ => ConditionUpdate::new(COND_FUNDS_LOW, false, "Closed", "the lease is closed"),
            });
            conditions.push(ConditionUpdate::new(
                COND_SETTLED,
                true,
                "Settled",
                format!(
                    "closed as {}: {} paid, {} refunded",
                    reason.as_str(),
                    tokens(*paid),
                    tokens(*refunded)
                ),
            ));
            Plan {
                step: Step::Nothing,
                figures,
                conditions,
                requeue: None,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use gpupool_chain::{Address, OpenLease};

    const RATE: u128 = 1_000;

    fn policy(side: LeaseSide) -> Policy {
        Policy {
            side,
            confirmations: 2,
            withdraw_every: Duration::from_secs(300),
            warn_below: Duration::from_secs(600),
            top_up_for: Duration::from_secs(3_600),
            resync: Duration::from_secs(30),
        }
    }

    fn open(balance: u128, settled_at: u64) -> LeaseOnChain {
        LeaseOnChain::Open {
            lease: OpenLease {
                renter: Address::repeat_byte(1),
                agent: Address::ZERO,
                provider: Address::repeat_byte(2),
                token: Address::repeat_byte(3),
                rate_per_second: RATE,
                balance,
                owed: 0,
                settled_at,
            },
            opened_block: 10,
            paid: 0,
            deposited: balance,
        }
    }

    fn seen(onchain: LeaseOnChain, head: u64, now: u64) -> Observed {
        Observed {
            onchain,
            head,
            now,
            last_withdrawal: None,
            close_requested: None,
            recorded_open_block: None,
            top_up_to: None,
            top_up_refused: None,
        }
    }

    fn cond<'a>(p: &'a Plan, t: &str) -> &'a ConditionUpdate {
        p.conditions.iter().find(|c| c.type_ == t).unwrap()
    }

    #[test]
    fn renter_opens_provider_waits() {
        let r = plan(&policy(LeaseSide::Renter), &seen(LeaseOnChain::Unknown, 5, 100));
        assert_eq!(r.step, Step::Open);
        assert_eq!(r.figures.state, Some(LeaseState::Pending));
        let p = plan(&policy(LeaseSide::Provider), &seen(LeaseOnChain::Unknown, 5, 100));
        assert_eq!(p.step, Step::Nothing);
        assert!(p.requeue.is_some());
        let mut cancelled = seen(LeaseOnChain::Unknown, 5, 100);
        cancelled.close_requested = Some(CloseReason::RenterCancelled);
        let c = plan(&policy(LeaseSide::Renter), &cancelled);
        assert_eq!((c.step, c.figures.state), (Step::Nothing, Some(LeaseState::Closed)));
    }

    #[test]
    fn a_lease_the_chain_forgot_is_never_opened_twice() {
        let mut forgotten = seen(LeaseOnChain::Unknown, 5, 100);
        forgotten.recorded_open_block = Some(31);
        let r = plan(&policy(LeaseSide::Renter), &forgotten);
        assert_eq!(r.step, Step::Nothing);
        // The figures on record stay as they are.
        assert_eq!(r.figures, Figures::default());
        let c = cond(&r, COND_SETTLED);
        assert_eq!((c.status, c.reason.as_str()), (false, "NotOnChain"));
        assert!(c.message.contains("block 31"), "{}", c.message);
        assert!(r.requeue.is_some());
    }

    #[test]
    fn conditions_hold_still_while_only_the_clock_moves() {
        let p = policy(LeaseSide::Renter);
        for balance in [10_000_000, 500_000] {
            // Funded and running low: blocks and seconds pass, nothing else.
            let a = plan(&p, &seen(open(balance, 100), 20, 130));
            let b = plan(&p, &seen(open(balance, 100), 27, 161));
            assert_eq!(a.conditions, b.conditions, "balance {balance}");
            assert_ne!(a.figures.remaining, b.figures.remaining);
        }
    }

    #[test]
    fn active_only_after_confirmations() {
        let p = policy(LeaseSide::Renter);
        let one = plan(&p, &seen(open(10_000_000, 100), 10, 100));
        assert_eq!(one.figures.state, Some(LeaseState::Pending));
        assert_eq!(one.figures.confirmations, Some(1));
        assert!(!cond(&one, COND_CONFIRMED).status);
        let two = plan(&p, &seen(open(10_000_000, 100), 11, 100));
        assert_eq!(two.figures.state, Some(LeaseState::Active));
    }

    #[test]
    fn provider_withdraws_on_its_period() {
        let p = policy(LeaseSide::Provider);
        let fresh = seen(open(10_000_000, 399), 20, 400);
        assert_eq!(plan(&p, &fresh).step, Step::Nothing, "opened a second ago");
        assert_eq!(plan(&p, &fresh).requeue, Some(Duration::from_secs(30)));
        let mut s = seen(open(10_000_000, 100), 20, 400);
        assert_eq!(plan(&p, &s).step, Step::Withdraw, "a period since the open");
        s.last_withdrawal = Some(200);
        assert_eq!(plan(&p, &s).step, Step::Nothing, "200 s since the last one");
        assert_eq!(plan(&p, &s).requeue, Some(Duration::from_secs(30)));
        s.now = 500;
        assert_eq!(plan(&p, &s).step, Step::Withdraw);
        assert_eq!(
            plan(&policy(LeaseSide::Renter), &s).step,
            Step::Nothing,
            "renters never withdraw"
        );
    }

    #[test]
    fn warns_when_funds_run_low_and_closes_when_out() {
        let p = policy(LeaseSide::Renter);
        // 1,000,000 at 1,000/s lasts 1,000 s from t=100.
        let fine = plan(&p, &seen(open(1_000_000, 100), 20, 200));
        assert!(!cond(&fine, COND_FUNDS_LOW).status);
        assert_eq!(fine.figures.funds_run_out_at, Some(1_100));
        let low = plan(&p, &seen(open(1_000_000, 100), 20, 700));
        assert!(cond(&low, COND_FUNDS_LOW).status);
        assert!(
            cond(&low, COND_FUNDS_LOW)
                .message
                .contains("runs out at 1970-01-01T00:18:20Z"),
            "{}",
            cond(&low, COND_FUNDS_LOW).message
        );
        assert_eq!(low.step, Step::Nothing);
        let out = plan(&p, &seen(open(1_000_000, 100), 20, 1_100));
        assert_eq!(out.figures.state, Some(LeaseState::InsufficientFunds));
        assert_eq!(out.step, Step::Close(CloseReason::InsufficientFunds));
        assert_eq!(
            plan(&policy(LeaseSide::Provider), &seen(open(1_000_000, 100), 20, 5_000)).step,
            Step::Close(CloseReason::InsufficientFunds)
        );
    }

    #[test]
    fn close_requests_respect_who_may_say_what() {
        let mut s = seen(open(10_000_000, 100), 20, 200);
        s.close_requested = Some(CloseReason::RenterCancelled);
        assert_eq!(
            plan(&policy(LeaseSide::Renter), &s).step,
            Step::Close(CloseReason::RenterCancelled)
        );
        let provider = plan(&policy(LeaseSide::Provider), &s);
        assert_ne!(provider.step, Step::Close(CloseReason::RenterCancelled));
        assert_eq!(cond(&provider, COND_SETTLED).reason, "CloseNotAllowed");
        s.close_requested = Some(CloseReason::InsufficientFunds);
        assert_eq!(plan(&policy(LeaseSide::Renter), &s).step, Step::Nothing, "still funded");
        s.close_requested = Some(CloseReason::Completed);
        assert_eq!(
            plan(&policy(LeaseSide::Provider), &s).step,
            Step::Close(CloseReason::Completed)
        );
    }

    #[test]
    fn closed_is_final_and_recorded() {
        let closed = LeaseOnChain::Closed {
            renter: Address::repeat_byte(1),
            provider: Address::repeat_byte(2),
            reason: CloseReason::Completed,
            closed_by: Address::repeat_byte(1),
            opened_block: 1,
            closed_block: 9,
            paid: 30,
            refunded: 70,
            deposited: 100,
        };
        let p = plan(&policy(LeaseSide::Provider), &seen(closed, 20, 200));
        assert_eq!(p.step, Step::Nothing);
        assert_eq!(p.requeue, None);
        assert_eq!(
            (p.figures.paid, p.figures.refunded, p.figures.close_reason),
            (Some(30), Some(70), Some("Completed"))
        );
    }

    #[test]
    fn a_running_lease_is_topped_up_toward_its_jobs_max_duration() {
        let p = policy(LeaseSide::Renter);
        // 1,000,000 at 1,000/s from t=100 lasts until t=1,100; at t=700 it
        // has 400 s left, under the 600 s warning.
        let mut low = seen(open(1_000_000, 100), 20, 700);
        low.top_up_to = Some(10_000_000);
        let r = plan(&p, &low);
        assert_eq!(r.step, Step::TopUp(3_600_000), "an hour at 1,000/s");
        let c = cond(&r, COND_FUNDS_LOW);
        assert_eq!((c.status, c.reason.as_str()), (false, "ToppingUp"));
        // 3,600,000 base units: far below the six places people are shown.
        assert!(c.message.contains("adding <0.000001 tokens"), "{}", c.message);

        // Never past topUpTo: 1,500,000 of room is what it adds.
        low.top_up_to = Some(2_500_000);
        assert_eq!(plan(&p, &low).step, Step::TopUp(1_500_000));

        // All of the budget deposited: the lease ends when it runs out, and says so.
        low.top_up_to = Some(1_000_000);
        let spent = plan(&p, &low);
        assert_eq!(spent.step, Step::Nothing);
        let c = cond(&spent, COND_FUNDS_LOW);
        assert_eq!((c.status, c.reason.as_str()), (true, "FundsRunningOut"));
        assert!(c.message.contains("all of the job's maxDuration"), "{}", c.message);

        // Not yet low, not the renter, not confirmed, or closing: no top-up.
        low.top_up_to = Some(10_000_000);
        let mut early = low.clone();
        early.now = 200;
        assert_eq!(plan(&p, &early).step, Step::Nothing);
        assert_eq!(
            plan(&policy(LeaseSide::Provider), &low).step,
            Step::Withdraw,
            "a provider withdraws, never tops up"
        );
        let mut unconfirmed = low.clone();
        unconfirmed.head = 10;
        assert_eq!(plan(&p, &unconfirmed).step, Step::Nothing);
        let mut ending = low.clone();
        ending.close_requested = Some(CloseReason::Completed);
        assert_eq!(plan(&p, &ending).step, Step::Close(CloseReason::Completed));
        // Out of funds already: it closes; a top-up would not bring back the lost time.
        let mut out = low.clone();
        out.now = 1_100;
        assert_eq!(plan(&p, &out).step, Step::Close(CloseReason::InsufficientFunds));

        // A lease without topUpTo (opened before it existed, or by hand) only warns.
        let mut manual = low.clone();
        manual.top_up_to = None;
        let m = plan(&p, &manual);
        assert_eq!(m.step, Step::Nothing);
        assert!(cond(&m, COND_FUNDS_LOW).message.contains("gpupool escrow deposit"));
    }

    #[test]
    fn a_refused_top_up_is_retried_with_its_reason_standing() {
        let p = policy(LeaseSide::Renter);
        let mut low = seen(open(1_000_000, 100), 20, 700);
        low.top_up_to = Some(10_000_000);
        low.top_up_refused = Some("the renter lets this agent commit 0 more tokens".into());
        let r = plan(&p, &low);
        assert_eq!(
            r.step,
            Step::TopUp(3_600_000),
            "tried again: the renter may have raised it"
        );
        let c = cond(&r, COND_FUNDS_LOW);
        assert_eq!(
            (c.status, c.reason.as_str(), c.message.as_str()),
            (
                true,
                REASON_TOP_UP_REFUSED,
                "the renter lets this agent commit 0 more tokens"
            )
        );
        // Read again after the clock moved: the same conditions, no churn.
        let mut later = low.clone();
        later.now = 760;
        later.head = 27;
        assert_eq!(plan(&p, &later).conditions, r.conditions);
        // Run dry: it closes, and why it could not go on stays on record.
        let mut dry = low.clone();
        dry.now = 1_100;
        let d = plan(&p, &dry);
        assert_eq!(d.step, Step::Close(CloseReason::InsufficientFunds));
        assert_eq!(cond(&d, COND_FUNDS_LOW).reason, REASON_TOP_UP_REFUSED);
        low.onchain = LeaseOnChain::Closed {
            renter: Address::repeat_byte(1),
            provider: Address::repeat_byte(2),
            reason: CloseReason::InsufficientFunds,
            closed_by: Address::repeat_byte(2),
            opened_block: 10,
            closed_block: 30,
            paid: 1_000_000,
            refunded: 0,
            deposited: 1_000_000,
        };
        let closed = plan(&p, &low);
        assert_eq!(closed.step, Step::Nothing);
        assert_eq!(cond(&closed, COND_FUNDS_LOW).reason, REASON_TOP_UP_REFUSED);
    }

    #[test]
    fn the_deposit_covers_a_period_and_top_ups_the_rest_of_max_duration() {
        // Eight hours at 1,000/s, a one-hour deposit: the rest comes in top-ups.
        let (deposit, cap) = lease_funding(1_000, 8 * 3_600, 3_600);
        assert_eq!(deposit, TokenAmount(3_600_000));
        assert_eq!(cap, TokenAmount((8 * 3_600 + START_ALLOWANCE_SECS as u128) * 1_000));
        // A short job is paid for whole at the open.
        let (deposit, cap) = lease_funding(1_000, 30, 3_600);
        assert_eq!(deposit, cap);
        assert_eq!(deposit, TokenAmount(90_000));
        // However short the deposit period, the first deposit covers the minute providers ask for.
        let (deposit, _) = lease_funding(1_000, 3_600, 10);
        assert_eq!(deposit, TokenAmount(60_000));
    }

    #[test]
    fn rate_rounds_down_and_refuses_zero() {
        let price: TokenAmount = "3.6".parse().unwrap();
        assert_eq!(rate_per_second(price, 2), Some(2_000_000_000_000_000));
        assert_eq!(rate_per_second(TokenAmount(1), 1), None);
    }

    #[test]
    fn only_a_withdrawal_is_written_before_the_read_back() {
        for step in [Step::Open, Step::TopUp(1), Step::Close(CloseReason::Completed)] {
            assert!(step.leaves_status_to_read_back(), "{step:?}");
        }
        // The withdrawal's time paces the next one, and no transaction, no read-back.
        assert!(!Step::Withdraw.leaves_status_to_read_back());
        assert!(!Step::Nothing.leaves_status_to_read_back());
    }
}

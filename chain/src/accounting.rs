//! Pure lease arithmetic, mirroring `LeaseEscrow.sol`, and the rebuilding of a
//! lease from its events.
//!
//! The contract keeps one hash per lease; callers hand it the state to act on. This
//! module is how the client knows that state: it folds the lease's events, then the
//! client checks the hash of the result against the chain before trusting it.

use alloy::{
    primitives::{Address, B256, keccak256},
    sol_types::SolValue,
};

use crate::bindings::LeaseEscrow;

/// Why a lease closed: the resource's type, so the chain and the Lease records
/// name reasons the same way.
pub use gpupool_crds::CloseReason;

/// The contract's encoding of a close reason: its position in the Solidity enum.
pub trait ContractCode: Copy {
    fn as_u8(self) -> u8;
    fn from_u8(v: u8) -> Option<Self>;
}

impl ContractCode for CloseReason {
    fn as_u8(self) -> u8 {
        self as u8
    }

    fn from_u8(v: u8) -> Option<Self> {
        Self::ALL.get(usize::from(v)).copied()
    }
}

/// The on-chain lease id for an order: a retried open of the same order can only
/// hit the same id, which the contract opens at most once.
pub fn lease_id(renter: Address, order_id: &str) -> B256 {
    keccak256(("gpupool/lease/v1", renter, order_id).abi_encode())
}

/// An open lease's state, field for field the contract's `Lease` struct.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OpenLease {
    /// Whose account funds the lease and gets the refund.
    pub renter: Address,
    /// Who opened it for the renter and may close it; zero when the renter did.
    pub agent: Address,
    pub provider: Address,
    pub token: Address,
    pub rate_per_second: u128,
    /// Tokens held for the lease, including `owed`.
    pub balance: u128,
    /// Accrued to the provider and not yet paid.
    pub owed: u128,
    pub settled_at: u64,
}

impl OpenLease {
    pub fn to_sol(&self) -> LeaseEscrow::Lease {
        LeaseEscrow::Lease {
            renter: self.renter,
            agent: self.agent,
            provider: self.provider,
            token: self.token,
            ratePerSecond: self.rate_per_second,
            balance: self.balance,
            owed: self.owed,
            settledAt: self.settled_at,
        }
    }

    /// What the contract stores for this state: `keccak256(abi.encode(lease))`.
    pub fn state_hash(&self) -> B256 {
        keccak256(self.to_sol().abi_encode())
    }

    /// Owed to the provider at `now`; accrual stops at the balance.
    pub fn owed_at(&self, now: u64) -> u128 {
        let elapsed = u128::from(now.saturating_sub(self.settled_at));
        self.owed
            .saturating_add(self.rate_per_second.saturating_mul(elapsed))
            .min(self.balance)
    }

    /// What would go back to the renter if the lease closed at `now`.
    pub fn remaining_at(&self, now: u64) -> u128 {
        self.balance - self.owed_at(now)
    }

    pub fn overdrawn_at(&self, now: u64) -> bool {
        self.owed_at(now) == self.balance
    }

    /// Seconds of funding left at `now` (0 when overdrawn).
    pub fn seconds_left_at(&self, now: u64) -> u64 {
        if self.rate_per_second == 0 {
            return u64::MAX;
        }
        u64::try_from(self.remaining_at(now) / self.rate_per_second).unwrap_or(u64::MAX)
    }
}

/// One lease event, decoded, with the block it is in.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LeaseEvent {
    Opened {
        renter: Address,
        agent: Address,
        provider: Address,
        token: Address,
        rate_per_second: u128,
        deposit: u128,
        started_at: u64,
    },
    Withdrawn {
        amount: u128,
        balance: u128,
        settled_at: u64,
    },
    ToppedUp {
        amount: u128,
        balance: u128,
        owed: u128,
        settled_at: u64,
    },
    Closed {
        reason: CloseReason,
        closed_by: Address,
        paid: u128,
        refunded: u128,
    },
}

/// A lease as the chain has it, with the totals both sides record.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LeaseOnChain {
    /// No lease has this id.
    Unknown,
    Open {
        lease: OpenLease,
        opened_block: u64,
        /// Paid to the provider so far (withdrawals).
        paid: u128,
        /// Deposit plus top-ups.
        deposited: u128,
    },
    Closed {
        renter: Address,
        provider: Address,
        reason: CloseReason,
        closed_by: Address,
        opened_block: u64,
        closed_block: u64,
        /// Everything the provider received: withdrawals and the payment at close.
        paid: u128,
        refunded: u128,
        deposited: u128,
    },
}

#[derive(thiserror::Error, Debug, PartialEq, Eq)]
pub enum FoldError {
    #[error("the lease's first event is not LeaseOpened")]
    NotOpenedFirst,
    #[error("event after the lease closed")]
    AfterClose,
    #[error("lease opened twice")]
    OpenedTwice,
    #[error("amounts do not add up")]
    Inconsistent,
}

/// Rebuilds a lease from its events in chain order.
pub fn fold(events: &[(u64, LeaseEvent)]) -> Result<LeaseOnChain, FoldError> {
    let mut state = LeaseOnChain::Unknown;
    for (block, event) in events {
        state = match (state, event) {
            (
                LeaseOnChain::Unknown,
                LeaseEvent::Opened {
                    renter,
                    agent,
                    provider,
                    token,
                    rate_per_second,
                    deposit,
                    started_at,
                },
            ) => LeaseOnChain::Open {
                lease: OpenLease {
                    renter: *renter,
                    agent: *agent,
                    provider: *provider,
                    token: *token,
                    rate_per_second: *rate_per_second,
                    balance: *deposit,
                    owed: 0,
                    settled_at: *started_at,
                },
                opened_block: *block,
                paid: 0,
                deposited: *deposit,
            },
            (LeaseOnChain::Unknown, _) => return Err(FoldError::NotOpenedFirst),
            (LeaseOnChain::Closed { .. }, _) => return Err(FoldError::AfterClose),
            (LeaseOnChain::Open { .. }, LeaseEvent::Opened { .. }) => return Err(FoldError::OpenedTwice),
            (
                LeaseOnChain::Open {
                    mut lease,
                    opened_block,
                    paid,
                    deposited,
                },
                LeaseEvent::Withdrawn {
                    amount,
                    balance,
                    settled_at,
                },
            ) => {
                lease.balance = *balance;
                lease.owed = 0;
                lease.settled_at = *settled_at;
                LeaseOnChain::Open {
                    lease,
                    opened_block,
                    paid: paid.checked_add(*amount).ok_or(FoldError::Inconsistent)?,
                    deposited,
                }
            }
            (
                LeaseOnChain::Open {
                    mut lease,
                    opened_block,
                    paid,
                    deposited,
                },
                LeaseEvent::ToppedUp {
                    amount,
                    balance,
                    owed,
                    settled_at,
                },
            ) => {
                if owed > balance {
                    return Err(FoldError::Inconsistent);
                }
                lease.balance = *balance;
                lease.owed = *owed;
                lease.settled_at = *settled_at;
                LeaseOnChain::Open {
                    lease,
                    opened_block,
                    paid,
                    deposited: deposited.checked_add(*amount).ok_or(FoldError::Inconsistent)?,
                }
            }
            (
                LeaseOnChain::Open {
                    lease,
                    opened_block,
                    paid: paid_before,
                    deposited,
                },
                LeaseEvent::Closed {
                    reason,
                    closed_by,
                    paid,
                    refunded,
                },
            ) => {
                let total_paid = paid_before.checked_add(*paid).ok_or(FoldError::Inconsistent)?;
                // Conservation: everything deposited went to the provider or back to the renter.
                if total_paid.checked_add(*refunded) != Some(deposited) {
                    return Err(FoldError::Inconsistent);
                }
                LeaseOnChain::Closed {
                    renter: lease.renter,
                    provider: lease.provider,
                    reason: *reason,
                    closed_by: *closed_by,
                    opened_block,
                    closed_block: *block,
                    paid: total_paid,
                    refunded: *refunded,
                    deposited,
                }
            }
        };
    }
    Ok(state)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lease() -> OpenLease {
        OpenLease {
            renter: Address::repeat_byte(1),
            agent: Address::ZERO,
            provider: Address::repeat_byte(2),
            token: Address::repeat_byte(3),
            rate_per_second: 10,
            balance: 1_000,
            owed: 0,
            settled_at: 100,
        }
    }

    #[test]
    fn accrual_stops_at_the_balance() {
        let l = lease();
        assert_eq!(l.owed_at(100), 0);
        assert_eq!(l.owed_at(50), 0, "a clock behind settledAt accrues nothing");
        assert_eq!(l.owed_at(150), 500);
        assert_eq!(l.seconds_left_at(150), 50);
        assert!(!l.overdrawn_at(199));
        assert!(l.overdrawn_at(200));
        assert_eq!(l.owed_at(10_000), 1_000);
        assert_eq!(l.remaining_at(10_000), 0);
        let huge = OpenLease {
            rate_per_second: u128::MAX,
            ..lease()
        };
        assert_eq!(huge.owed_at(u64::MAX), 1_000, "no overflow");
    }

    #[test]
    fn lease_ids_depend_on_renter_and_order() {
        let a = Address::repeat_byte(1);
        let b = Address::repeat_byte(2);
        assert_eq!(lease_id(a, "o-1"), lease_id(a, "o-1"));
        assert_ne!(lease_id(a, "o-1"), lease_id(a, "o-2"));
        assert_ne!(lease_id(a, "o-1"), lease_id(b, "o-1"));
    }

    #[test]
    fn close_reasons_round_trip() {
        for r in CloseReason::ALL {
            assert_eq!(CloseReason::from_u8(r.as_u8()), Some(r));
            assert_eq!(CloseReason::parse(r.as_str()), Some(r));
        }
        assert_eq!(CloseReason::from_u8(4), None);
    }

    #[test]
    fn fold_follows_the_lifecycle_and_checks_conservation() {
        let (r, p, t) = (
            Address::repeat_byte(1),
            Address::repeat_byte(2),
            Address::repeat_byte(3),
        );
        let opened = LeaseEvent::Opened {
            renter: r,
            agent: Address::ZERO,
            provider: p,
            token: t,
            rate_per_second: 10,
            deposit: 1_000,
            started_at: 100,
        };
        let events = vec![
            (5, opened.clone()),
            (
                6,
                LeaseEvent::Withdrawn {
                    amount: 300,
                    balance: 700,
                    settled_at: 130,
                },
            ),
            (
                7,
                LeaseEvent::ToppedUp {
                    amount: 500,
                    balance: 1_200,
                    owed: 100,
                    settled_at: 140,
                },
            ),
        ];
        let LeaseOnChain::Open {
            lease,
            opened_block,
            paid,
            deposited,
        } = fold(&events).unwrap()
        else {
            panic!("open expected")
        };
        assert_eq!((opened_block, paid, deposited), (5, 300, 1_500));
        assert_eq!((lease.balance, lease.owed, lease.settled_at), (1_200, 100, 140));

        let mut closed = events.clone();
        closed.push((
            8,
            LeaseEvent::Closed {
                reason: CloseReason::Completed,
                closed_by: r,
                paid: 400,
                refunded: 800,
            },
        ));
        assert!(matches!(
            fold(&closed).unwrap(),
            LeaseOnChain::Closed {
                paid: 700,
                refunded: 800,
                closed_block: 8,
                ..
            }
        ));

        let mut cheating = events.clone();
        cheating.push((
            8,
            LeaseEvent::Closed {
                reason: CloseReason::Completed,
                closed_by: r,
                paid: 400,
                refunded: 900,
            },
        ));
        assert_eq!(fold(&cheating), Err(FoldError::Inconsistent));
        assert_eq!(fold(&events[1..]), Err(FoldError::NotOpenedFirst));
        assert_eq!(fold(&[(1, opened.clone()), (2, opened)]), Err(FoldError::OpenedTwice));
        assert_eq!(fold(&[]), Ok(LeaseOnChain::Unknown));
    }
}

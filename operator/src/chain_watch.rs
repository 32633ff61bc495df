//! Wakes the settlement worker for the leases the chain just acted on.
//!
//! The worker stays level-based: it reads every open lease at least once per
//! resync, and that read alone decides. But chain time and the other side's
//! transactions make no watch event, so a provider learned that its renter
//! had closed a lease only at its next resync (30 s by default), and until
//! then kept the finished lease's namespace and counted its GPUs as lent. One
//! `eth_getLogs` per poll for the whole escrow names the leases that changed;
//! the worker reconciles just those. A failed or skipped poll loses nothing:
//! the resync still comes.

use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use futures::Stream;
use gpupool_chain::{B256, EscrowClient};
use gpupool_crds::Lease;
use kube::runtime::reflector::ObjectRef;
use tracing::debug;

/// The most blocks one poll asks about. After a longer gap (an RPC outage,
/// a paused process) the older blocks are left to the resync rather than
/// asked for in one request that a hosted RPC would refuse.
pub const MAX_BLOCKS_PER_POLL: u64 = 2_000;

/// The blocks the next poll asks about, given the last block already looked
/// at and the chain's head; `None` when there is nothing new.
pub fn next_range(last_seen: u64, head: u64) -> Option<(u64, u64)> {
    if head <= last_seen {
        return None;
    }
    let from = (last_seen + 1).max(head.saturating_sub(MAX_BLOCKS_PER_POLL - 1));
    Some((from, head))
}

/// The on-chain lease a record is about, as far as the record says yet. A
/// renter's record learns its id when it opens the lease; until then it is
/// being reconciled anyway.
fn lease_id_of(lease: &Lease) -> Option<B256> {
    let recorded = lease.status.as_ref().and_then(|s| s.lease_id.as_deref());
    let offered = lease.spec.escrow.as_ref().and_then(|e| e.lease_id.as_deref());
    recorded.or(offered).and_then(|h| B256::from_str(h).ok())
}

/// The records (either side's copy, in any namespace) of the leases `ids`.
pub fn records_for(ids: &[B256], records: &[Arc<Lease>]) -> Vec<ObjectRef<Lease>> {
    if ids.is_empty() {
        return Vec::new();
    }
    records
        .iter()
        .filter(|l| lease_id_of(l).is_some_and(|id| ids.contains(&id)))
        .map(|l| ObjectRef::from_obj(l.as_ref()))
        .collect()
}

/// Ids of the leases the escrow emitted events for, one batch per poll that
/// found any. Starts from the head at the first poll: what happened before
/// the process started is read by the worker's first pass over every record.
pub fn leases_touched(chain: Arc<EscrowClient>, every: Duration) -> impl Stream<Item = Vec<B256>> + Send {
    futures::stream::unfold((chain, None::<u64>), move |(chain, mut last_seen)| async move {
        loop {
            tokio::time::sleep(every).await;
            let head = match chain.head().await {
                Ok(h) => h,
                Err(e) => {
                    debug!(error = %e, "chain watch: reading the head");
                    continue;
                }
            };
            let Some(last) = last_seen else {
                last_seen = Some(head);
                continue;
            };
            let Some((from, to)) = next_range(last, head) else {
                continue;
            };
            match chain.leases_touched(from, to).await {
                Ok(ids) => {
                    last_seen = Some(to);
                    if !ids.is_empty() {
                        debug!(from, to, leases = ids.len(), "chain watch: leases changed on chain");
                        return Some((ids, (chain, last_seen)));
                    }
                }
                // The same blocks are asked for again at the next poll.
                Err(e) => debug!(error = %e, from, to, "chain watch: reading escrow events"),
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use gpupool_crds::{Escrow, LeaseSide, LeaseStatus};

    fn record(name: &str, offered: Option<B256>, recorded: Option<B256>) -> Arc<Lease> {
        let mut l = crate::test_fixtures::lease(name, LeaseSide::Provider);
        l.spec.escrow = Some(Escrow {
            chain_id: 1,
            contract: "0x0".into(),
            lease_id: offered.map(|i| i.to_string()),
            deposit: "1".into(),
            top_up_to: None,
            funded_by: None,
        });
        l.metadata.namespace = Some("ns".into());
        l.status = recorded.map(|i| LeaseStatus {
            lease_id: Some(i.to_string()),
            ..Default::default()
        });
        Arc::new(l)
    }

    #[test]
    fn ranges_start_after_the_last_block_and_skip_long_gaps() {
        assert_eq!(next_range(10, 10), None);
        assert_eq!(
            next_range(10, 9),
            None,
            "a head behind us (a reorg, another node) waits"
        );
        assert_eq!(next_range(10, 11), Some((11, 11)));
        assert_eq!(next_range(10, 15), Some((11, 15)));
        let (from, to) = next_range(0, 1_000_000).unwrap();
        assert_eq!(to, 1_000_000);
        assert_eq!(
            to - from + 1,
            MAX_BLOCKS_PER_POLL,
            "a gap is capped, the resync covers the rest"
        );
    }

    #[test]
    fn records_are_found_by_the_id_they_were_offered_or_opened() {
        let (a, b, c) = (B256::repeat_byte(1), B256::repeat_byte(2), B256::repeat_byte(3));
        let records = vec![
            record("offered", Some(a), None),
            record("opened", None, Some(b)),
            record("other", Some(c), None),
            record("unopened", None, None),
        ];
        let names = |ids: &[B256]| -> Vec<String> { records_for(ids, &records).into_iter().map(|r| r.name).collect() };
        assert_eq!(names(&[a, b]), vec!["offered", "opened"]);
        assert_eq!(names(&[c]), vec!["other"]);
        assert!(names(&[B256::repeat_byte(9)]).is_empty());
        assert!(names(&[]).is_empty());
        let r = &records_for(&[a], &records)[0];
        assert_eq!(r.namespace.as_deref(), Some("ns"));
    }
}

//! How long a provider keeps the record of a lease it lent once the lease
//! has closed. Pure.
//!
//! A provider's Lease copies live in its own namespace and nothing else owns
//! them, so without a limit every lease a data centre ever lent stays in its
//! API server, etcd and the operator's watch cache: a busy member lends
//! thousands a day. Like a Job's `ttlSecondsAfterFinished`, a closed record
//! is deleted once it is older than the retention. The chain keeps the
//! payment for good (the escrow's events), and the renter's copy lives as
//! long as the renter keeps its AiJob.

use std::time::Duration;

/// Records deleted per heartbeat at most: the first beat after an upgrade
/// may find months of records, and deleting them all at once would be a
/// burst of writes on the member's API server.
pub const DELETES_PER_BEAT: usize = 50;

/// One closed record as retention sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Closed<'a> {
    pub name: &'a str,
    /// When it closed (the `Settling` condition turned True), in ms.
    /// Unknown: kept, since its age cannot be told.
    pub closed_ms: Option<u64>,
    /// Whether the lease's namespace is gone: a record is the only way to
    /// find a namespace still to delete, so it stays until then.
    pub cleaned_up: bool,
}

/// The records to delete now, oldest first, at most [`DELETES_PER_BEAT`].
/// A zero retention keeps every record.
pub fn expired<'a>(closed: &[Closed<'a>], now_ms: u64, retention: Duration) -> Vec<&'a str> {
    if retention.is_zero() {
        return vec![];
    }
    let keep_ms = u64::try_from(retention.as_millis()).unwrap_or(u64::MAX);
    let mut old: Vec<(u64, &'a str)> = closed
        .iter()
        .filter(|c| c.cleaned_up)
        .filter_map(|c| Some((c.closed_ms?, c.name)))
        .filter(|(at, _)| now_ms.saturating_sub(*at) > keep_ms)
        .collect();
    old.sort_unstable();
    old.into_iter().take(DELETES_PER_BEAT).map(|(_, n)| n).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn closed(name: &str, closed_ms: Option<u64>, cleaned_up: bool) -> Closed<'_> {
        Closed {
            name,
            closed_ms,
            cleaned_up,
        }
    }

    #[test]
    fn only_cleaned_up_records_older_than_the_retention_go() {
        let day = Duration::from_secs(86_400);
        let now = 10 * 86_400_000;
        let records = [
            closed("fresh", Some(now - 1_000), true),
            closed("old", Some(now - 2 * 86_400_000), true),
            closed("older", Some(now - 3 * 86_400_000), true),
            closed("namespace-left", Some(now - 3 * 86_400_000), false),
            closed("no-time", None, true),
            closed("exactly-a-day", Some(now - 86_400_000), true),
        ];
        assert_eq!(expired(&records, now, day), vec!["older", "old"]);
        assert!(expired(&records, now, Duration::ZERO).is_empty(), "zero keeps all");
    }

    #[test]
    fn a_backlog_goes_a_beat_at_a_time_oldest_first() {
        let names: Vec<String> = (0..DELETES_PER_BEAT * 3).map(|i| format!("l{i}")).collect();
        let records: Vec<Closed<'_>> = names
            .iter()
            .enumerate()
            .map(|(i, n)| closed(n, Some(1_000 + i as u64), true))
            .collect();
        let gone = expired(&records, 1_000_000, Duration::from_millis(10));
        assert_eq!(gone.len(), DELETES_PER_BEAT);
        assert_eq!(gone[0], "l0");
        assert_eq!(gone[DELETES_PER_BEAT - 1], format!("l{}", DELETES_PER_BEAT - 1));
    }
}

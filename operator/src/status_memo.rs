//! The status this process last wrote to each object, for reconciles that run
//! before the watch cache has seen that write.
//!
//! A reconcile woken by something else (a lease change, a wake from the
//! market, a requeue) shortly after a status write reads the object from the
//! cache without it. Planned from that stale status, it wrote the same status
//! again with new condition times and published its Events a second time. In
//! a burst of 100 pool jobs that was about 4 of each job's 12 AiJob status
//! writes, and the Succeeded Event three times over. Planning from the newer
//! of the cached status and the one written here removes both.
//!
//! Resource versions are compared as numbers. The API says to treat them as
//! opaque, so one that does not parse is never called older: the cache wins.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use kube::Resource;
use kube::core::object::HasStatus;

/// How many objects' statuses are kept at most. Entries leave as soon as the
/// cache catches up, so this bounds memory only when the watch is broken.
const MAX_ENTRIES: usize = 10_000;

#[derive(Debug)]
struct Written<S> {
    resource_version: u64,
    status: S,
}

/// Statuses written by this process, by object UID.
#[derive(Debug)]
pub struct StatusMemo<S> {
    written: Mutex<HashMap<String, Written<S>>>,
}

impl<S> Default for StatusMemo<S> {
    fn default() -> Self {
        Self {
            written: Mutex::new(HashMap::new()),
        }
    }
}

fn parse(rv: Option<&str>) -> Option<u64> {
    rv.and_then(|v| v.parse().ok())
}

impl<S: Clone> StatusMemo<S> {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Written<S>>> {
        // Every critical section here is a map operation that cannot leave
        // the map half-changed, so a poisoned lock still guards a sound map.
        self.written.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The status to plan from: the one written here when the cached object
    /// is older than that write, else the cached one (and the memory of the
    /// write is dropped, since the cache now holds it or something newer).
    pub fn freshest(&self, uid: &str, cached_rv: Option<&str>, cached: Option<S>) -> Option<S> {
        let mut written = self.lock();
        let Some(w) = written.get(uid) else { return cached };
        match parse(cached_rv) {
            Some(rv) if rv < w.resource_version => Some(w.status.clone()),
            _ => {
                written.remove(uid);
                cached
            }
        }
    }

    /// `obj` with the status written here when the cache lags that write;
    /// `obj` itself (no copy) when the cache is current.
    pub fn freshen<K>(&self, obj: Arc<K>) -> Arc<K>
    where
        K: Resource + HasStatus<Status = S> + Clone,
        S: PartialEq,
    {
        let uid = obj.meta().uid.clone().unwrap_or_default();
        let status = self.freshest(&uid, obj.meta().resource_version.as_deref(), obj.status().cloned());
        if status.as_ref() == obj.status() {
            return obj;
        }
        let mut fresher = (*obj).clone();
        *fresher.status_mut() = status;
        Arc::new(fresher)
    }

    /// Records a status as written, with the resource version the write returned.
    pub fn wrote(&self, uid: &str, resource_version: Option<&str>, status: S) {
        let mut written = self.lock();
        let Some(rv) = parse(resource_version) else {
            written.remove(uid);
            return;
        };
        if written.len() >= MAX_ENTRIES && !written.contains_key(uid) {
            // Only an optimisation: forgetting makes the next plan use the cache.
            written.clear();
        }
        written.insert(
            uid.to_string(),
            Written {
                resource_version: rv,
                status,
            },
        );
    }

    /// Drops what is known about a deleted object.
    pub fn forget(&self, uid: &str) {
        self.lock().remove(uid);
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.lock().len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_stale_cache_yields_the_status_written_here() {
        let m = StatusMemo::default();
        m.wrote("u", Some("12"), "written");
        assert_eq!(m.freshest("u", Some("11"), Some("cached")), Some("written"));
        // Still remembered: the cache has not caught up yet.
        assert_eq!(m.freshest("u", Some("11"), None), Some("written"));
    }

    #[test]
    fn a_cache_that_caught_up_wins_and_the_memory_goes() {
        let m = StatusMemo::default();
        m.wrote("u", Some("12"), "written");
        assert_eq!(m.freshest("u", Some("12"), Some("cached")), Some("cached"));
        assert_eq!(m.len(), 0);
        m.wrote("u", Some("12"), "written");
        // Someone else wrote after us: theirs is newer.
        assert_eq!(m.freshest("u", Some("15"), Some("theirs")), Some("theirs"));
    }

    #[test]
    fn versions_that_do_not_parse_never_hide_the_cache() {
        let m = StatusMemo::default();
        m.wrote("u", Some("12"), "written");
        assert_eq!(m.freshest("u", Some("opaque"), Some("cached")), Some("cached"));
        m.wrote("u", Some("opaque"), "written");
        assert_eq!(m.freshest("u", Some("1"), Some("cached")), Some("cached"));
        assert_eq!(m.freshest("other", Some("1"), Some("cached")), Some("cached"));
    }

    #[test]
    fn freshen_swaps_in_the_written_status_only_while_the_cache_lags() {
        use gpupool_crds::{LeaseSide, LeaseState, LeaseStatus};
        let mut cached = crate::test_fixtures::lease("l", LeaseSide::Renter);
        cached.metadata.uid = Some("u".into());
        cached.metadata.resource_version = Some("11".into());
        let state = |s| LeaseStatus {
            state: Some(s),
            ..Default::default()
        };
        cached.status = Some(state(LeaseState::Pending));
        let cached = Arc::new(cached);
        let m = StatusMemo::default();
        assert!(
            Arc::ptr_eq(&m.freshen(cached.clone()), &cached),
            "nothing written: the cache as it is"
        );
        m.wrote("u", Some("12"), state(LeaseState::Active));
        let fresher = m.freshen(cached.clone());
        assert_eq!(fresher.status, Some(state(LeaseState::Active)));
        assert_eq!(fresher.metadata, cached.metadata, "only the status is swapped");
        let mut caught_up = (*cached).clone();
        caught_up.metadata.resource_version = Some("12".into());
        caught_up.status = Some(state(LeaseState::Active));
        let caught_up = Arc::new(caught_up);
        assert!(Arc::ptr_eq(&m.freshen(caught_up.clone()), &caught_up));
    }

    #[test]
    fn forgetting_and_the_bound_keep_memory_small() {
        let m = StatusMemo::default();
        m.wrote("u", Some("12"), "written");
        m.forget("u");
        assert_eq!(m.freshest("u", Some("1"), Some("cached")), Some("cached"));
        for i in 0..MAX_ENTRIES + 5 {
            m.wrote(&i.to_string(), Some("2"), "w");
        }
        assert!(m.len() <= MAX_ENTRIES);
    }
}

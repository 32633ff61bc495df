//! Whether a watch has delivered its first full list, for caches that many
//! tasks wait on at once.
//!
//! kube-runtime 5.0's `Store::wait_until_ready` keeps one waker: of several
//! tasks waiting on the same store, only the last to poll it is woken when
//! the list arrives, and the others wait forever (checked against 5.0.0:
//! two waiters, first never woken). Every reconcile that places a job waits
//! for the pod caches, so at start-up with many jobs pending, all but one
//! would have hung with no reason shown. This gate is a `watch` channel,
//! which wakes every waiter.

use std::sync::Arc;

use futures::{Stream, StreamExt};
use kube::runtime::watcher::Event;
use tokio::sync::watch;

#[derive(Clone, Debug)]
pub struct Listed(Arc<watch::Sender<bool>>);

/// The watch that feeds the gate is gone before it listed.
#[derive(Debug, thiserror::Error)]
#[error("the watch stopped before its first list")]
pub struct WatchStopped;

impl Default for Listed {
    fn default() -> Self {
        Self(Arc::new(watch::Sender::new(false)))
    }
}

impl Listed {
    /// Follows the watch; call it after the store has applied the event, so
    /// that a woken waiter finds the list in the store.
    pub fn observe<K>(&self, event: &Event<K>) {
        if matches!(event, Event::InitDone) {
            self.mark();
        }
    }

    /// Passes a watch's events on, marking the gate at the first full list.
    /// Put it after `reflect` (and anything else that must have seen the
    /// list), so a woken waiter finds the list in the store.
    pub fn follow<K, E, S>(&self, events: S) -> impl Stream<Item = Result<Event<K>, E>> + use<K, E, S>
    where
        S: Stream<Item = Result<Event<K>, E>>,
    {
        let gate = self.clone();
        events.inspect(move |ev| {
            if let Ok(ev) = ev {
                gate.observe(ev);
            }
        })
    }

    pub fn mark(&self) {
        self.0.send_if_modified(|listed| !std::mem::replace(listed, true));
    }

    pub fn is_listed(&self) -> bool {
        *self.0.borrow()
    }

    pub async fn wait(&self) -> Result<(), WatchStopped> {
        let mut rx = self.0.subscribe();
        rx.wait_for(|listed| *listed)
            .await
            .map(|_| ())
            .map_err(|_| WatchStopped)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test]
    async fn every_waiter_wakes_when_the_list_arrives() {
        let gate = Listed::default();
        let waiters: Vec<_> = (0..8)
            .map(|_| {
                let g = gate.clone();
                tokio::spawn(async move { g.wait().await.is_ok() })
            })
            .collect();
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(!gate.is_listed());
        gate.observe::<()>(&Event::Init);
        assert!(!gate.is_listed(), "a list that has only begun does not count");
        gate.observe::<()>(&Event::InitDone);
        for w in waiters {
            let woke = tokio::time::timeout(Duration::from_secs(1), w).await;
            assert!(matches!(woke, Ok(Ok(true))), "a waiter was left behind");
        }
        assert!(gate.is_listed());
        // Later relists change nothing; new waiters return at once.
        gate.observe::<()>(&Event::Init);
        assert!(gate.is_listed());
        assert!(gate.wait().await.is_ok());
    }

    #[tokio::test]
    async fn following_a_stream_marks_the_gate_at_its_first_list_and_passes_everything_on() {
        let gate = Listed::default();
        let events = futures::stream::iter(vec![
            Ok::<_, ()>(Event::Init),
            Ok(Event::InitApply(1)),
            Err(()),
            Ok(Event::InitDone),
            Ok(Event::Apply(2)),
        ]);
        let seen: Vec<_> = gate.follow(events).collect().await;
        assert_eq!(seen.len(), 5, "nothing dropped, errors included");
        assert!(gate.is_listed());
        let unfinished = Listed::default();
        let _: Vec<_> = unfinished
            .follow(futures::stream::iter(vec![Ok::<_, ()>(Event::<u8>::Init)]))
            .collect()
            .await;
        assert!(!unfinished.is_listed(), "a list that never finished");
    }
}

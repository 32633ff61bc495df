//! Publishes Kubernetes Events (`events.k8s.io/v1`) about the operator's
//! objects, and turns a repeat of the same event into a series on the first.
//!
//! kube's `Recorder` does the same but keeps every event it sent, whole, in
//! an unbounded map for six minutes: with 2,000 AiJobs placed in a few
//! minutes that map was the operator's largest allocation (18 MB, heaptrack),
//! and it grows with the rate of work, not with what the operator manages.
//! It also keys a repeat without the note, so two events that differ only in
//! what they say ("withdrew 3 tokens", "withdrew 5 tokens") became one
//! series that kept the first note. Here a repeat is the same event, note
//! included, and what is remembered of it is a hash, a name and a count, in a
//! map with a bound.

use std::collections::hash_map::DefaultHasher;
use std::collections::{HashMap, VecDeque};
use std::hash::{Hash, Hasher};
use std::sync::Mutex;

use k8s_openapi::api::core::v1::ObjectReference;
use k8s_openapi::api::events::v1::{Event as K8sEvent, EventSeries};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use k8s_openapi::jiff::{SignedDuration, Timestamp};
use kube::Client;
use kube::api::{Api, Patch, PatchParams, PostParams};
use kube::runtime::events::{Event, EventType, Reporter};

/// How long a repeat still joins the earlier event's series; the same
/// window as client-go and kube use.
const SERIES_WINDOW: SignedDuration = SignedDuration::from_mins(6);

/// Events remembered for series at most. Beyond it the oldest are forgotten
/// first; a repeat of a forgotten event is published as a new one.
const MAX_REMEMBERED: usize = 4096;

/// An event published earlier, as far as a repeat needs it.
#[derive(Clone, Debug, PartialEq)]
struct Sent {
    namespace: String,
    name: String,
    count: i32,
    last: Timestamp,
}

/// What a publish does: create a new Event, or bump an earlier one's series.
#[derive(Clone, Debug, PartialEq)]
enum Publish {
    Create,
    Repeat {
        namespace: String,
        name: String,
        count: i32,
    },
}

/// Recently published events by key hash, oldest first in `order`.
#[derive(Default)]
struct Recent {
    sent: HashMap<u64, Sent>,
    order: VecDeque<u64>,
}

impl Recent {
    /// Decides whether the event with `key` repeats one still in its window.
    fn decide(&mut self, key: u64, now: Timestamp) -> Publish {
        self.forget_expired(now);
        match self.sent.get_mut(&key) {
            Some(s) => {
                s.count = s.count.saturating_add(1);
                s.last = now;
                Publish::Repeat {
                    namespace: s.namespace.clone(),
                    name: s.name.clone(),
                    count: s.count,
                }
            }
            None => Publish::Create,
        }
    }

    /// Remembers an event just created.
    fn created(&mut self, key: u64, namespace: String, name: String, now: Timestamp) {
        if self
            .sent
            .insert(
                key,
                Sent {
                    namespace,
                    name,
                    count: 1,
                    last: now,
                },
            )
            .is_none()
        {
            self.order.push_back(key);
        }
        while self.sent.len() > MAX_REMEMBERED {
            match self.order.pop_front() {
                Some(oldest) => {
                    self.sent.remove(&oldest);
                }
                None => break,
            }
        }
    }

    /// Forgets an event the API server no longer has.
    fn forget(&mut self, key: u64) {
        self.sent.remove(&key);
        self.order.retain(|k| *k != key);
    }

    /// Drops events whose window has closed. `order` is by creation, and a
    /// repeat extends an event's window, so this stops at the first event
    /// still in its window and leaves later, expired ones for a later call.
    fn forget_expired(&mut self, now: Timestamp) {
        while let Some(&oldest) = self.order.front() {
            match self.sent.get(&oldest) {
                Some(s) if s.last + SERIES_WINDOW > now => break,
                _ => {
                    self.order.pop_front();
                    self.sent.remove(&oldest);
                }
            }
        }
    }
}

/// The identity of an event: who reports it, what it is about, and what it says.
fn key(reporter: &Reporter, ev: &Event, regarding: &ObjectReference) -> u64 {
    let mut h = DefaultHasher::new();
    reporter.controller.hash(&mut h);
    reporter.instance.hash(&mut h);
    matches!(ev.type_, EventType::Warning).hash(&mut h);
    ev.reason.hash(&mut h);
    ev.action.hash(&mut h);
    ev.note.hash(&mut h);
    for r in std::iter::once(regarding).chain(ev.secondary.as_ref()) {
        r.api_version.hash(&mut h);
        r.kind.hash(&mut h);
        r.namespace.hash(&mut h);
        r.name.hash(&mut h);
        r.uid.hash(&mut h);
    }
    h.finish()
}

/// Publishes Events for one controller.
pub struct EventPublisher {
    client: Client,
    reporter: Reporter,
    recent: Mutex<Recent>,
}

impl EventPublisher {
    pub fn new(client: Client, reporter: Reporter) -> Self {
        Self {
            client,
            reporter,
            recent: Mutex::new(Recent::default()),
        }
    }

    fn recent(&self) -> std::sync::MutexGuard<'_, Recent> {
        // Every critical section is a map operation that leaves the maps
        // consistent, so a poisoned lock still guards sound data.
        self.recent.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Publishes `ev` about `regarding`, in the object's namespace
    /// ("default" for cluster-scoped objects, as kube's recorder does).
    pub async fn publish(&self, ev: &Event, regarding: &ObjectReference) -> Result<(), kube::Error> {
        let now = Timestamp::now();
        let key = key(&self.reporter, ev, regarding);
        let decided = self.recent().decide(key, now);
        if let Publish::Repeat { namespace, name, count } = decided {
            let api: Api<K8sEvent> = Api::namespaced(self.client.clone(), &namespace);
            let patch = serde_json::json!({"series": EventSeries {
                count,
                last_observed_time: MicroTime(now),
            }});
            match api.patch(&name, &PatchParams::default(), &Patch::Merge(&patch)).await {
                Ok(_) => return Ok(()),
                // Gone (events expire): publish it anew below.
                Err(kube::Error::Api(s)) if s.code == 404 => self.recent().forget(key),
                Err(e) => return Err(e),
            }
        }
        let event = self.build(ev, regarding, now);
        let namespace = event.metadata.namespace.clone().unwrap_or_default();
        let name = event.metadata.name.clone().unwrap_or_default();
        let api: Api<K8sEvent> = Api::namespaced(self.client.clone(), &namespace);
        match api.create(&PostParams::default(), &event).await {
            Ok(_) => {}
            // Its namespace is being deleted, Events and all, so nobody could
            // read this one. A provider that deletes a lease's namespace sees
            // the workload's last transitions there: an expected refusal, not
            // a failure worth a warning on every cancel.
            Err(kube::Error::Api(s)) if namespace_terminating(&s) => {
                tracing::debug!(%namespace, reason = %ev.reason, "event not published: its namespace is being deleted");
                return Ok(());
            }
            Err(e) => return Err(e),
        }
        self.recent().created(key, namespace, name, now);
        Ok(())
    }

    fn build(&self, ev: &Event, regarding: &ObjectReference, now: Timestamp) -> K8sEvent {
        let controller = &self.reporter.controller;
        K8sEvent {
            metadata: ObjectMeta {
                namespace: Some(regarding.namespace.clone().unwrap_or_else(|| "default".into())),
                name: Some(format!(
                    "{}.{:x}",
                    regarding.name.as_deref().unwrap_or(controller),
                    now.as_nanosecond()
                )),
                ..Default::default()
            },
            event_time: Some(MicroTime(now)),
            action: Some(ev.action.clone()),
            reason: Some(ev.reason.clone()),
            note: ev.note.clone(),
            type_: Some(
                match ev.type_ {
                    EventType::Normal => "Normal",
                    EventType::Warning => "Warning",
                }
                .into(),
            ),
            regarding: Some(regarding.clone()),
            related: ev.secondary.clone(),
            reporting_controller: Some(controller.clone()),
            reporting_instance: Some(self.reporter.instance.clone().unwrap_or_else(|| controller.clone())),
            ..Default::default()
        }
    }
}

/// The API server's refusal to create anything in a namespace that is being
/// deleted (its NamespaceLifecycle admission names this cause).
pub fn namespace_terminating(s: &kube::core::Status) -> bool {
    s.code == 403
        && s.details
            .as_ref()
            .is_some_and(|d| d.causes.iter().any(|c| c.reason == "NamespaceTerminating"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(secs: i64) -> Timestamp {
        Timestamp::from_second(1_800_000_000 + secs).unwrap()
    }

    fn event(note: &str) -> Event {
        Event {
            type_: EventType::Normal,
            reason: "Withdrawn".into(),
            note: Some(note.into()),
            action: "Settle".into(),
            secondary: None,
        }
    }

    fn lease(name: &str) -> ObjectReference {
        ObjectReference {
            kind: Some("Lease".into()),
            namespace: Some("ns".into()),
            name: Some(name.into()),
            uid: Some(format!("uid-{name}")),
            ..Default::default()
        }
    }

    fn reporter() -> Reporter {
        Reporter {
            controller: "gpupool-settlement".into(),
            instance: None,
        }
    }

    #[test]
    fn only_a_namespace_being_deleted_lets_an_event_go() {
        let refused = |reason: &str, causes: serde_json::Value| -> kube::core::Status {
            serde_json::from_value(serde_json::json!({
                "kind": "Status", "apiVersion": "v1", "status": "Failure", "code": 403,
                "reason": reason, "message": "events.events.k8s.io \"x\" is forbidden",
                "details": {"name": "x", "group": "events.k8s.io", "kind": "events", "causes": causes},
            }))
            .unwrap()
        };
        // As the API server answers a create in a namespace being deleted.
        let terminating = refused(
            "Forbidden",
            serde_json::json!([{"reason": "NamespaceTerminating", "field": "metadata.namespace",
                "message": "namespace lease-1 is being terminated"}]),
        );
        assert!(namespace_terminating(&terminating));
        // RBAC's refusal is a real failure, and so is any other code.
        assert!(!namespace_terminating(&refused("Forbidden", serde_json::json!([]))));
        let mut not_403 = terminating.clone();
        not_403.code = 422;
        assert!(!namespace_terminating(&not_403));
    }

    #[test]
    fn the_same_event_again_joins_a_series_and_counts() {
        let mut r = Recent::default();
        let k = key(&reporter(), &event("withdrew 3 tokens"), &lease("a"));
        assert_eq!(r.decide(k, at(0)), Publish::Create);
        r.created(k, "ns".into(), "a.1".into(), at(0));
        let repeat = |count| Publish::Repeat {
            namespace: "ns".into(),
            name: "a.1".into(),
            count,
        };
        assert_eq!(r.decide(k, at(10)), repeat(2));
        // Each repeat keeps the series open for another window.
        assert_eq!(r.decide(k, at(300)), repeat(3));
        assert_eq!(r.decide(k, at(600)), repeat(4));
    }

    #[test]
    fn a_different_note_object_or_reporter_is_a_different_event() {
        let base = key(&reporter(), &event("withdrew 3 tokens"), &lease("a"));
        assert_ne!(base, key(&reporter(), &event("withdrew 5 tokens"), &lease("a")));
        assert_ne!(base, key(&reporter(), &event("withdrew 3 tokens"), &lease("b")));
        let other = Reporter {
            controller: "gpupool-operator".into(),
            instance: None,
        };
        assert_ne!(base, key(&other, &event("withdrew 3 tokens"), &lease("a")));
    }

    #[test]
    fn an_event_past_its_window_is_new_again() {
        let mut r = Recent::default();
        let k = key(&reporter(), &event("x"), &lease("a"));
        r.created(k, "ns".into(), "a.1".into(), at(0));
        assert_eq!(r.decide(k, at(6 * 60 + 1)), Publish::Create);
        assert!(r.sent.is_empty() && r.order.is_empty());
    }

    #[test]
    fn memory_is_bounded_and_the_oldest_go_first() {
        let mut r = Recent::default();
        for i in 0..(MAX_REMEMBERED as u64 + 10) {
            r.created(i, "ns".into(), format!("e{i}"), at(0));
        }
        assert_eq!(r.sent.len(), MAX_REMEMBERED);
        assert_eq!(r.order.len(), MAX_REMEMBERED);
        assert_eq!(r.decide(0, at(1)), Publish::Create);
        assert!(matches!(
            r.decide(MAX_REMEMBERED as u64 + 9, at(1)),
            Publish::Repeat { count: 2, .. }
        ));
    }

    #[test]
    fn a_vanished_event_is_forgotten() {
        let mut r = Recent::default();
        r.created(7, "ns".into(), "e7".into(), at(0));
        r.forget(7);
        assert_eq!(r.decide(7, at(1)), Publish::Create);
        assert!(r.order.is_empty());
    }
}

//! Events as the operator publishes them, against a real API server and
//! under the operator's own RBAC identity: a repeat joins the first event's
//! series, a different note is an event of its own, a repeat of an event
//! that is gone is published anew, and an event in a namespace that is being
//! deleted is let go without an error.

use std::time::Duration;

use gpupool_e2e::cluster::{ClusterInfo, client_for};
use gpupool_e2e::harness::{admin, namespace, testenv, wait_for};
use gpupool_operator::events::EventPublisher;
use k8s_openapi::api::core::v1::{ConfigMap, Namespace, ObjectReference};
use k8s_openapi::api::events::v1::Event as K8sEvent;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams};
use kube::runtime::events::{Event, EventType, Reporter};

fn withdrawn(note: &str) -> Event {
    Event {
        type_: EventType::Normal,
        reason: "Withdrawn".into(),
        note: Some(note.into()),
        action: "Settle".into(),
        secondary: None,
    }
}

/// (note, series count) of every event in `ns`, sorted.
async fn seen(api: &Api<K8sEvent>) -> Vec<(String, i32)> {
    let mut v: Vec<(String, i32)> = api
        .list(&ListParams::default())
        .await
        .expect("list events")
        .items
        .into_iter()
        .map(|e| (e.note.unwrap_or_default(), e.series.map_or(1, |s| s.count)))
        .collect();
    v.sort();
    v
}

/// A publisher under the operator's RBAC identity, and a ConfigMap in `ns`
/// for its events to be about.
async fn publisher_in(org: &ClusterInfo, ns: &str) -> (EventPublisher, ObjectReference) {
    let operator = client_for(&org.operator_kubeconfig).await.expect("operator client");
    let publisher = EventPublisher::new(
        operator,
        Reporter {
            controller: "gpupool-e2e".into(),
            instance: None,
        },
    );
    let regarding = ObjectReference {
        api_version: Some("v1".into()),
        kind: Some("ConfigMap".into()),
        namespace: Some(ns.into()),
        name: Some("subject".into()),
        uid: Some("6f1c3c2e-0000-4000-8000-000000000001".into()),
        ..Default::default()
    };
    (publisher, regarding)
}

#[tokio::test]
async fn repeats_join_a_series_and_other_notes_are_events_of_their_own() {
    let env = testenv();
    let org = env.org("acme").expect("acme");
    let admin = admin(org).await;
    let ns = namespace(&admin, "events").await;
    let (publisher, regarding) = publisher_in(org, &ns).await;
    let api: Api<K8sEvent> = Api::namespaced(admin.clone(), &ns);

    for note in ["withdrew 3 tokens", "withdrew 3 tokens", "withdrew 5 tokens"] {
        publisher.publish(&withdrawn(note), &regarding).await.expect("publish");
    }
    assert_eq!(
        seen(&api).await,
        [
            ("withdrew 3 tokens".to_string(), 2),
            ("withdrew 5 tokens".to_string(), 1)
        ]
    );

    // The series' event is gone (events expire): the next repeat is a new event.
    let series = api
        .list(&ListParams::default())
        .await
        .expect("list events")
        .items
        .into_iter()
        .find(|e| e.series.is_some())
        .expect("the series");
    api.delete(&series.metadata.name.expect("name"), &DeleteParams::default())
        .await
        .expect("delete the series");
    publisher
        .publish(&withdrawn("withdrew 3 tokens"), &regarding)
        .await
        .expect("publish after the delete");
    assert_eq!(
        seen(&api).await,
        [
            ("withdrew 3 tokens".to_string(), 1),
            ("withdrew 5 tokens".to_string(), 1)
        ]
    );

    let _ = Api::<Namespace>::all(admin).delete(&ns, &DeleteParams::default()).await;
}

/// A provider deletes a lease's namespace while the workload in it still
/// reports its last transitions. The API server refuses to create anything
/// in a namespace being deleted; that refusal is not an error (it was logged
/// as a warning on every cancel), and nothing is created.
#[tokio::test]
async fn an_event_in_a_namespace_being_deleted_is_let_go() {
    let env = testenv();
    let org = env.org("acme").expect("acme");
    let admin = admin(org).await;
    let ns = namespace(&admin, "events-ending").await;
    let (publisher, regarding) = publisher_in(org, &ns).await;
    // A finalizer holds the namespace in Terminating for as long as the test needs.
    let held: ConfigMap = serde_json::from_value(serde_json::json!({
        "metadata": {"name": "held", "finalizers": ["gpupool.dev/e2e-hold"]},
    }))
    .expect("a ConfigMap");
    let cms: Api<ConfigMap> = Api::namespaced(admin.clone(), &ns);
    cms.create(&PostParams::default(), &held)
        .await
        .expect("create the held ConfigMap");
    let namespaces = Api::<Namespace>::all(admin.clone());
    namespaces
        .delete(&ns, &DeleteParams::default())
        .await
        .expect("delete the namespace");
    wait_for(Duration::from_secs(30), "the namespace terminating", || async {
        let n = namespaces.get(&ns).await.ok()?;
        (n.status?.phase.as_deref() == Some("Terminating")).then_some(())
    })
    .await
    .expect("terminating");

    publisher
        .publish(&withdrawn("withdrew 7 tokens"), &regarding)
        .await
        .expect("an event in a namespace being deleted is let go");
    let api: Api<K8sEvent> = Api::namespaced(admin.clone(), &ns);
    assert!(
        !seen(&api).await.iter().any(|(note, _)| note == "withdrew 7 tokens"),
        "nothing was created"
    );
    // Any other refusal is still an error: the same publisher, about an
    // object in a namespace that does not exist.
    let elsewhere = ObjectReference {
        namespace: Some("no-such-namespace".into()),
        ..regarding.clone()
    };
    assert!(
        publisher
            .publish(&withdrawn("withdrew 8 tokens"), &elsewhere)
            .await
            .is_err()
    );

    cms.patch(
        "held",
        &PatchParams::default(),
        &Patch::Merge(serde_json::json!({"metadata": {"finalizers": null}})),
    )
    .await
    .expect("release the namespace");
}

//! Events as the operator publishes them, against a real API server and
//! under the operator's own RBAC identity: a repeat joins the first event's
//! series, a different note is an event of its own, and a repeat of an event
//! that is gone is published anew.

use gpupool_e2e::cluster::client_for;
use gpupool_e2e::harness::{admin, namespace, testenv};
use gpupool_operator::events::EventPublisher;
use k8s_openapi::api::core::v1::{Namespace, ObjectReference};
use k8s_openapi::api::events::v1::Event as K8sEvent;
use kube::api::{Api, DeleteParams, ListParams};
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

#[tokio::test]
async fn repeats_join_a_series_and_other_notes_are_events_of_their_own() {
    let env = testenv();
    let org = env.org("acme").expect("acme");
    let admin = admin(org).await;
    let ns = namespace(&admin, "events").await;
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
        namespace: Some(ns.clone()),
        name: Some("subject".into()),
        uid: Some("6f1c3c2e-0000-4000-8000-000000000001".into()),
        ..Default::default()
    };
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

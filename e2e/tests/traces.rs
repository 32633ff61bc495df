//! One trace follows a job through the pool: the renter's and the
//! provider's operators, as real processes, export spans over OTLP/gRPC to a
//! receiver on loopback, and the spans of both organisations share the trace
//! the renter's AiJob names in its `gpupool.dev/traceparent` annotation.

use std::collections::BTreeSet;
use std::time::Duration;

use gpupool_crds::{ANNOTATION_TRACEPARENT, AiJob, AiJobPhase};
use gpupool_e2e::harness::{admin, aijob_json, namespace, remove_namespace, testenv, wait_for};
use gpupool_e2e::otlp::{OtlpReceiver, ReceivedSpan};
use gpupool_e2e::pool::{Lends, Pool};
use kube::ResourceExt;
use kube::api::{Api, PostParams};

#[tokio::test]
async fn a_placement_across_two_organisations_is_one_trace() {
    let env = testenv();
    let acme = admin(env.org("acme").unwrap()).await;
    let receiver = OtlpReceiver::start().await.unwrap();
    let lends = [
        Lends {
            org: "acme",
            prices: vec![("H100", "2.5")],
            denied: vec![],
        },
        Lends {
            org: "bravo",
            prices: vec![("A100", "2")],
            denied: vec![],
        },
    ];
    let otlp = format!("--otlp-endpoint={}", receiver.endpoint());
    let _pool = Pool::start(&env, "traces", &lends, &[otlp]).await.unwrap();
    let ns = namespace(&acme, "traces").await;

    // Only bravo has A100s.
    let api: Api<AiJob> = Api::namespaced(acme.clone(), &ns);
    let job = aijob_json(
        "traced",
        2,
        &["A100"],
        "2s",
        serde_json::json!({"maxPricePerGpuHour": "3", "bidding": {"window": "1s"}}),
    );
    api.create(&PostParams::default(), &serde_json::from_value(job).unwrap())
        .await
        .unwrap();
    let done = wait_for(Duration::from_secs(90), "the job Succeeded at bravo", || async {
        let j = api.get("traced").await.ok()?;
        (j.status.as_ref()?.phase == Some(AiJobPhase::Succeeded)).then_some(j)
    })
    .await
    .unwrap();
    assert_eq!(done.status.as_ref().unwrap().runs_on.as_ref().unwrap().org, "bravo");

    // The operator rooted the job's trace when it accepted it.
    let traceparent = done
        .annotations()
        .get(ANNOTATION_TRACEPARENT)
        .cloned()
        .expect("the AiJob names its trace");
    let trace: String = traceparent.split('-').nth(1).unwrap().to_string();
    assert_eq!(trace.len(), 32, "{traceparent}");

    // Spans arrive in batches; wait until both sides' parts are in.
    let has = |spans: &[ReceivedSpan], org: &str, name: &str, kind: Option<&str>| {
        spans
            .iter()
            .any(|s| s.org == org && s.name == name && kind.is_none_or(|k| s.attribute("kind") == Some(k)))
    };
    let spans = wait_for(Duration::from_secs(60), "spans of both organisations", || async {
        let spans: Vec<ReceivedSpan> = receiver.spans().into_iter().filter(|s| s.trace_id == trace).collect();
        let complete = has(&spans, "acme", "aijob.accept", None)
            && has(&spans, "acme", "aijob.reconcile", None)
            && has(&spans, "acme", "lease.settle", None)
            && has(&spans, "acme", "chain.tx", None)
            && has(&spans, "acme", "peer.receive", Some("bid"))
            && has(&spans, "acme", "peer.receive", Some("lease_status"))
            && has(&spans, "bravo", "peer.receive", Some("order"))
            && has(&spans, "bravo", "peer.receive", Some("lease_offer"))
            && has(&spans, "bravo", "aijob.reconcile", None)
            && has(&spans, "bravo", "lease.settle", None);
        complete.then_some(spans)
    })
    .await
    .unwrap_or_else(|e| {
        let seen: BTreeSet<String> = receiver
            .spans()
            .iter()
            .filter(|s| s.trace_id == trace)
            .map(|s| format!("{} {} {:?}", s.org, s.name, s.attribute("kind")))
            .collect();
        panic!("{e}; spans of trace {trace}: {seen:#?}")
    });

    // The trace is one tree: the accept span is its root, and bravo's
    // handling of the order hangs under a span acme exported.
    let roots: Vec<&ReceivedSpan> = spans.iter().filter(|s| s.parent_span_id.is_empty()).collect();
    assert_eq!(roots.len(), 1, "one root: {roots:#?}");
    assert_eq!(
        (roots[0].org.as_str(), roots[0].name.as_str()),
        ("acme", "aijob.accept")
    );
    assert_eq!(traceparent.split('-').nth(2), Some(roots[0].span_id.as_str()));
    let order = spans
        .iter()
        .find(|s| s.org == "bravo" && s.name == "peer.receive" && s.attribute("kind") == Some("order"))
        .unwrap();
    let parent = spans
        .iter()
        .find(|s| s.span_id == order.parent_span_id)
        .expect("the order's sender span was exported");
    assert_eq!((parent.org.as_str(), parent.name.as_str()), ("acme", "aijob.reconcile"));
    // The chain transaction says what it was.
    assert!(
        spans
            .iter()
            .any(|s| s.org == "acme" && s.name == "chain.tx" && s.attribute("call") == Some("open")),
        "acme's open on chain is in the trace"
    );

    // Only the operators' own spans leave the process, not their libraries'.
    let names: BTreeSet<String> = receiver.spans().into_iter().map(|s| s.name).collect();
    let ours = [
        "aijob.accept",
        "aijob.reconcile",
        "lease.settle",
        "chain.tx",
        "peer.receive",
    ];
    assert!(names.iter().all(|n| ours.contains(&n.as_str())), "{names:?}");
    remove_namespace(&acme, &ns).await;
}

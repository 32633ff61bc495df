//! One trace follows a job through the pool: the renter's and the
//! provider's operators, as real processes, export spans over OTLP/gRPC to a
//! receiver on loopback, and the spans of both organisations share the trace
//! the renter's AiJob names in its `gpupool.dev/traceparent` annotation.

use std::collections::BTreeSet;
use std::time::Duration;

use gpupool_crds::{ANNOTATION_TRACEPARENT, AiJob, AiJobPhase};
use gpupool_e2e::harness::{admin, aijob_json, namespace, remove_namespace, testenv, wait_for};
use gpupool_e2e::otlp::{OtlpReceiver, ReceivedPoint, ReceivedSpan};
use gpupool_e2e::pool::{Lends, Pool};
use kube::ResourceExt;
use kube::api::{Api, PostParams};

/// Runs one 2×A100 job applied at acme, which only bravo can take, with
/// both operators exporting to `receiver`; returns the finished AiJob, and
/// the pool, whose operators export until it is dropped.
async fn place_one_across(receiver: &OtlpReceiver, tag: &str) -> (kube::Client, String, AiJob, Pool) {
    let env = testenv();
    let acme = admin(env.org("acme").unwrap()).await;
    // Corvus stays out: the job can only go to bravo.
    let lends: Vec<Lends> = Lends::every_org().into_iter().filter(|l| l.org != "corvus").collect();
    let flags = [
        format!("--otlp-endpoint={}", receiver.endpoint()),
        "--otlp-metrics-interval-ms=500".to_string(),
    ];
    let pool = Pool::start(&env, tag, &lends, &flags).await.unwrap();
    let ns = namespace(&acme, tag).await;

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
    (acme, ns, done, pool)
}

#[tokio::test]
async fn a_placement_across_two_organisations_is_one_trace() {
    let receiver = OtlpReceiver::start().await.unwrap();
    let (acme, ns, done, _pool) = place_one_across(&receiver, "traces").await;

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

#[tokio::test]
async fn both_organisations_export_their_metrics_over_otlp() {
    let receiver = OtlpReceiver::start().await.unwrap();
    let (acme, ns, _done, _pool) = place_one_across(&receiver, "otlpmetrics").await;
    // Exports are cumulative, every 500 ms: wait until one shows the job.
    let has = |points: &[ReceivedPoint], org: &str, metric: &str, kind: &str, f: &dyn Fn(&ReceivedPoint) -> bool| {
        points
            .iter()
            .any(|p| p.org == org && p.metric == metric && p.kind == kind && f(p))
    };
    let points = wait_for(Duration::from_secs(30), "both operators' metrics", || async {
        let points = receiver.points();
        let complete = has(&points, "acme", "gpupool_pool_orders_published", "sum", &|p| {
            p.value >= 1.0
        }) && has(
            &points,
            "acme",
            "gpupool_pool_placement_duration_seconds",
            "histogram",
            &|p| p.attribute("kind") == Some("lease_active") && p.value >= 1.0,
        ) && has(&points, "acme", "gpupool_aijob_reconciles", "sum", &|p| p.value >= 1.0)
            && has(&points, "acme", "gpupool_balance_tokens", "gauge", &|p| {
                p.attribute("held_in") == Some("wallet") && p.value > 0.0
            })
            && has(&points, "acme", "gpupool_leases", "gauge", &|p| {
                p.attribute("side") == Some("Renter") && p.value >= 1.0
            })
            && has(&points, "bravo", "gpupool_pool_bids_sent", "sum", &|p| p.value >= 1.0)
            && has(&points, "bravo", "gpupool_pool_peers_connected", "gauge", &|p| {
                p.value >= 1.0
            })
            && has(&points, "bravo", "gpupool_gpus", "gauge", &|p| {
                p.attribute("product").is_some_and(|m| m.contains("A100")) && p.attribute("state") == Some("free")
            });
        complete.then_some(points)
    })
    .await
    .unwrap_or_else(|e| {
        let seen: BTreeSet<String> = receiver
            .points()
            .iter()
            .map(|p| format!("{} {} {}", p.org, p.metric, p.kind))
            .collect();
        panic!("{e}; metrics received: {seen:#?}")
    });
    // Counters arrive as monotonic sums under their Prometheus names less
    // `_total`; nothing but the operators' own families is sent.
    assert!(points.iter().all(|p| p.metric.starts_with("gpupool_")));
    assert!(!points.iter().any(|p| p.metric.ends_with("_total")));
    remove_namespace(&acme, &ns).await;
}

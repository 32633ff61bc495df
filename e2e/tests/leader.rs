//! Two operator replicas for one organisation, as a Deployment with two
//! pods would run them: one leads and places jobs, the other stands by and
//! does nothing; when the leader dies without letting go, the standby takes
//! over after the lease duration and places the next job; a replica that
//! stops cleanly hands the Lease over at once. Real processes, a real API
//! server.

use std::time::Duration;

use gpupool_crds::{AiJob, AiJobPhase, LABEL_AIJOB};
use gpupool_e2e::harness::{Operator, admin, aijob_json, namespace, remove_namespace, sample, testenv, wait_for};
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::coordination::v1::Lease;
use kube::Client;
use kube::api::{Api, ListParams, PostParams};

const LONG: Duration = Duration::from_secs(90);
/// A Lease of this test's own, so the other tests' operators never compete.
const LEASE: &str = "gpupool-operator-leader-test";

fn flags(identity: &str) -> Vec<String> {
    vec![
        format!("--leader-identity={identity}"),
        format!("--leader-lease={LEASE}"),
        "--leader-lease-seconds=3".into(),
    ]
}

async fn holder(client: &Client) -> Option<String> {
    Api::<Lease>::namespaced(client.clone(), "gpupool-system")
        .get_opt(LEASE)
        .await
        .ok()??
        .spec?
        .holder_identity
        .filter(|h| !h.is_empty())
}

async fn wait_holder(client: &Client, want: Option<&str>) {
    wait_for(LONG, &format!("the leader Lease held by {want:?}"), || async {
        (holder(client).await.as_deref() == want).then_some(())
    })
    .await
    .unwrap_or_else(|e| panic!("{e}"));
}

async fn run_to_success(client: &Client, ns: &str, name: &str) {
    let job: AiJob = serde_json::from_value(aijob_json(name, 1, &["H100"], "1s", serde_json::json!({}))).unwrap();
    let api = Api::<AiJob>::namespaced(client.clone(), ns);
    api.create(&PostParams::default(), &job).await.unwrap();
    wait_for(LONG, &format!("{name} Succeeded"), || async {
        (api.get(name).await.ok()?.status?.phase == Some(AiJobPhase::Succeeded)).then_some(())
    })
    .await
    .unwrap_or_else(|e| panic!("{e}"));
}

fn reconciles(metrics: &str) -> f64 {
    sample(metrics, "gpupool_aijob_reconciles_total")
}

fn leading(metrics: &str) -> f64 {
    sample(metrics, "gpupool_leader")
}

#[tokio::test]
async fn a_standby_replica_takes_over_when_the_leader_dies_and_at_once_when_it_stops() {
    let env = testenv();
    let org = env.org("acme").unwrap();
    let client = admin(org).await;
    let ns = namespace(&client, "leader").await;

    let a = Operator::start_with(org, "leader-a", &flags("replica-a"));
    wait_holder(&client, Some("replica-a")).await;
    let b = Operator::start_with(org, "leader-b", &flags("replica-b"));
    wait_for(LONG, "replica-b standing by", || async {
        std::fs::read_to_string(&b.log)
            .ok()?
            .contains("another replica leads; standing by")
            .then_some(())
    })
    .await
    .unwrap();

    // The leader places; the standby has not reconciled anything.
    run_to_success(&client, &ns, "first").await;
    let (am, bm) = (a.metrics().await, b.metrics().await);
    assert!(reconciles(&am) > 0.0);
    assert_eq!(reconciles(&bm), 0.0, "the standby acted");
    assert_eq!((leading(&am), leading(&bm)), (1.0, 0.0), "the gauge says who leads");

    // The leader dies without letting go: the standby waits out the
    // lease and takes over, and the next job runs.
    a.kill();
    wait_holder(&client, Some("replica-b")).await;
    run_to_success(&client, &ns, "second").await;
    assert_eq!(leading(&b.metrics().await), 1.0);
    let lease = Api::<Lease>::namespaced(client.clone(), "gpupool-system")
        .get(LEASE)
        .await
        .unwrap();
    assert!(
        lease.spec.unwrap().lease_transitions.unwrap_or(0) >= 1,
        "a takeover is a transition"
    );
    // The first job ran once, under one leader: one batch Job.
    let jobs = Api::<Job>::namespaced(client.clone(), &ns)
        .list(&ListParams::default().labels(&format!("{LABEL_AIJOB}=first")))
        .await
        .unwrap();
    assert_eq!(jobs.items.len(), 1);

    // The jobs' finalizers need a leader to release them.
    remove_namespace(&client, &ns).await;

    // A clean stop hands the Lease back at once.
    drop(b);
    wait_for(Duration::from_secs(5), "the Lease released", || async {
        holder(&client).await.is_none().then_some(())
    })
    .await
    .unwrap();
}

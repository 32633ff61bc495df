//! AiJobs placed on the local cluster's simulated GPUs, end to end: a real
//! API server, controller-manager, scheduler and kwok, and the operator as a
//! real process under its own RBAC identity.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use gpupool_crds::{AiJob, AiJobPhase, LABEL_AIJOB};
use gpupool_e2e::harness::{Operator, admin, aijob_json, namespace, testenv, wait_for};
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::{Event, Namespace, Node, Pod};
use kube::Client;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams};
use kube::runtime::watcher;

const ORG: &str = "acme";
const LONG: Duration = Duration::from_secs(90);

async fn create(client: &Client, ns: &str, job: serde_json::Value) -> AiJob {
    let aijob: AiJob = serde_json::from_value(job).expect("AiJob JSON");
    Api::<AiJob>::namespaced(client.clone(), ns)
        .create(&PostParams::default(), &aijob)
        .await
        .expect("create AiJob")
}

async fn wait_phase(client: &Client, ns: &str, name: &str, phase: AiJobPhase) -> AiJob {
    let api = Api::<AiJob>::namespaced(client.clone(), ns);
    wait_for(LONG, &format!("{ns}/{name} to reach {phase:?}"), || async {
        let j = api.get(name).await.ok()?;
        (j.status.as_ref()?.phase == Some(phase)).then_some(j)
    })
    .await
    .unwrap_or_else(|e| panic!("{e}"))
}

fn condition<'a>(j: &'a AiJob, t: &str) -> &'a k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition {
    j.status
        .as_ref()
        .and_then(|s| s.conditions.iter().find(|c| c.type_ == t))
        .unwrap_or_else(|| panic!("no {t} condition on {j:?}"))
}

async fn event_reasons(client: &Client, ns: &str, name: &str) -> Vec<String> {
    let lp = ListParams::default().fields(&format!("involvedObject.name={name},involvedObject.kind=AiJob"));
    Api::<Event>::namespaced(client.clone(), ns)
        .list(&lp)
        .await
        .expect("events")
        .items
        .into_iter()
        .filter_map(|e| e.reason)
        .collect()
}

async fn pods_of(client: &Client, ns: &str, name: &str) -> Vec<Pod> {
    Api::<Pod>::namespaced(client.clone(), ns)
        .list(&ListParams::default().labels(&format!("{LABEL_AIJOB}={name}")))
        .await
        .expect("pods")
        .items
}

async fn cleanup(client: &Client, ns: &str) {
    let api = Api::<AiJob>::namespaced(client.clone(), ns);
    let _ = api
        .delete_collection(&DeleteParams::default(), &ListParams::default())
        .await;
    let _ = wait_for(Duration::from_secs(60), "AiJobs deleted", || async {
        api.list(&ListParams::default())
            .await
            .ok()?
            .items
            .is_empty()
            .then_some(())
    })
    .await;
    let _ = Api::<Namespace>::all(client.clone())
        .delete(ns, &DeleteParams::default())
        .await;
}

#[tokio::test]
async fn aijob_runs_to_success_with_phases_conditions_and_events() {
    let env = testenv();
    let org = env.org(ORG).expect("acme");
    let client = admin(org).await;
    let ns = namespace(&client, "success").await;
    let op = Operator::start(org, "success");

    create(
        &client,
        &ns,
        aijob_json("train", 2, &["H100"], "3s", serde_json::json!({})),
    )
    .await;

    let running = wait_phase(&client, &ns, "train", AiJobPhase::Running).await;
    assert_eq!(condition(&running, "Placed").status, "True");
    assert_eq!(condition(&running, "Running").status, "True");
    let runs_on = running.status.as_ref().unwrap().runs_on.clone().unwrap();
    assert_eq!((runs_on.org.as_str(), runs_on.job.as_str()), (ORG, "train"));
    assert_eq!(runs_on.gpu_product.as_deref(), Some("NVIDIA H100 80GB HBM3"));

    // The Job carries the GPU limit, the product affinity and the owner.
    let job = Api::<Job>::namespaced(client.clone(), &ns)
        .get("train")
        .await
        .expect("Job");
    let owner = &job.metadata.owner_references.as_ref().unwrap()[0];
    assert_eq!(
        (owner.kind.as_str(), owner.uid.as_str()),
        ("AiJob", running.metadata.uid.as_deref().unwrap())
    );
    let pods = pods_of(&client, &ns, "train").await;
    assert_eq!(pods.len(), 1);
    let pod = &pods[0];
    let limits = pod.spec.as_ref().unwrap().containers[0]
        .resources
        .as_ref()
        .unwrap()
        .limits
        .clone()
        .unwrap();
    assert_eq!(limits["nvidia.com/gpu"].0, "2");
    let node_name = pod.spec.as_ref().unwrap().node_name.clone().expect("scheduled");
    let node = Api::<Node>::all(client.clone()).get(&node_name).await.expect("node");
    assert_eq!(
        node.metadata.labels.as_ref().unwrap()["gpupool.dev/gpu-product"],
        "NVIDIA-H100-80GB-HBM3",
        "labelled by the agent"
    );

    let done = wait_phase(&client, &ns, "train", AiJobPhase::Succeeded).await;
    let status = done.status.clone().unwrap();
    assert_eq!(status.exit_code, Some(0));
    assert!(status.completion_time.is_some());
    assert_eq!(condition(&done, "Complete").status, "True");
    assert_eq!(condition(&done, "Running").status, "False");
    assert_eq!(condition(&done, "Accepted").status, "True");

    let reasons = wait_for(Duration::from_secs(20), "events", || async {
        let r = event_reasons(&client, &ns, "train").await;
        ["JobCreated", "Started", "Succeeded"]
            .iter()
            .all(|x| r.iter().any(|e| e == x))
            .then_some(r)
    })
    .await
    .expect("JobCreated, Started and Succeeded events");
    assert!(!reasons.iter().any(|r| r == "Failed"));

    // The operator's metrics count what it did.
    let metrics = op.metrics().await;
    assert!(metrics.contains("gpupool_local_placements_total 1"), "{metrics}");
    assert!(
        metrics.contains("gpupool_gpus{product=\"NVIDIA H100 80GB HBM3\",state=\"total\"} 32"),
        "{metrics}"
    );
    cleanup(&client, &ns).await;
}

#[tokio::test]
async fn failing_workload_marks_the_aijob_failed_with_its_exit_code() {
    let env = testenv();
    let org = env.org(ORG).unwrap();
    let client = admin(org).await;
    let ns = namespace(&client, "fail").await;
    let _op = Operator::start(org, "fail");
    let mut j = aijob_json("crash", 1, &[], "1s", serde_json::json!({}));
    j["spec"]["template"]["metadata"]["annotations"]["sim.gpupool.dev/exit-code"] = "3".into();
    create(&client, &ns, j).await;
    let failed = wait_phase(&client, &ns, "crash", AiJobPhase::Failed).await;
    let status = failed.status.clone().unwrap();
    assert_eq!(status.exit_code, Some(3));
    assert!(
        status.message.as_deref().unwrap_or_default().contains("exit code 3"),
        "{status:?}"
    );
    assert_eq!(condition(&failed, "Failed").status, "True");
    let reasons = wait_for(Duration::from_secs(20), "Failed event", || async {
        let r = event_reasons(&client, &ns, "crash").await;
        r.iter().any(|e| e == "Failed").then_some(r)
    })
    .await;
    assert!(reasons.is_ok());
    cleanup(&client, &ns).await;
}

#[tokio::test]
async fn jobs_that_cannot_fit_wait_with_a_reason_and_start_when_room_frees() {
    let env = testenv();
    let org = env.org(ORG).unwrap();
    let client = admin(org).await;
    let ns = namespace(&client, "fit").await;
    let _op = Operator::start(org, "fit");
    let api = Api::<AiJob>::namespaced(client.clone(), &ns);

    let waits = |name: &'static str, reason: &'static str, needle: &'static str| {
        let api = api.clone();
        async move {
            let j = wait_for(LONG, &format!("{name} waiting with {reason}"), || async {
                let j = api.get(name).await.ok()?;
                let c = j
                    .status
                    .as_ref()?
                    .conditions
                    .iter()
                    .find(|c| c.type_ == "Placed")?
                    .clone();
                (c.reason == reason).then_some(j)
            })
            .await
            .unwrap_or_else(|e| panic!("{e}"));
            let s = j.status.clone().unwrap();
            assert_eq!(s.phase, Some(AiJobPhase::Pending));
            let msg = s.message.unwrap_or_default();
            assert!(msg.contains(needle), "{name}: {msg:?} should mention {needle:?}");
        }
    };

    create(
        &client,
        &ns,
        aijob_json("too-big", 16, &["H100"], "1s", serde_json::json!({})),
    )
    .await;
    create(
        &client,
        &ns,
        aijob_json("no-b200", 1, &["B200"], "1s", serde_json::json!({})),
    )
    .await;
    create(
        &client,
        &ns,
        aijob_json(
            "pool-only",
            1,
            &[],
            "1s",
            serde_json::json!({"placement": {"mode": "PoolOnly"}}),
        ),
    )
    .await;
    waits("too-big", "TooManyGpusForOneNode", "largest matching node has 8").await;
    waits("no-b200", "NoMatchingGpus", "NVIDIA H100 80GB HBM3").await;
    waits("pool-only", "PoolNotEnabled", "PoolOnly").await;

    // Fill all four 8-GPU nodes, then one more must wait for free GPUs.
    for i in 0..4 {
        create(
            &client,
            &ns,
            aijob_json(&format!("fill-{i}"), 8, &["H100"], "600s", serde_json::json!({})),
        )
        .await;
    }
    for i in 0..4 {
        wait_phase(&client, &ns, &format!("fill-{i}"), AiJobPhase::Running).await;
    }
    create(
        &client,
        &ns,
        aijob_json(
            "next",
            4,
            &["H100"],
            "2s",
            serde_json::json!({"placement": {"mode": "LocalOnly"}}),
        ),
    )
    .await;
    waits("next", "InsufficientFreeGpus", "the most free now is 0").await;
    assert!(
        Api::<Job>::namespaced(client.clone(), &ns)
            .get_opt("next")
            .await
            .unwrap()
            .is_none(),
        "no Job while waiting"
    );
    let events = event_reasons(&client, &ns, "next").await;
    assert!(events.iter().any(|e| e == "InsufficientFreeGpus"), "{events:?}");

    // Free a node: the waiting job starts and finishes.
    api.delete("fill-0", &DeleteParams::default()).await.unwrap();
    wait_phase(&client, &ns, "next", AiJobPhase::Succeeded).await;
    cleanup(&client, &ns).await;
}

#[tokio::test]
async fn deleting_a_running_aijob_removes_its_job_and_pods() {
    let env = testenv();
    let org = env.org(ORG).unwrap();
    let client = admin(org).await;
    let ns = namespace(&client, "delete").await;
    let _op = Operator::start(org, "delete");
    create(
        &client,
        &ns,
        aijob_json("doomed", 1, &[], "600s", serde_json::json!({})),
    )
    .await;
    wait_phase(&client, &ns, "doomed", AiJobPhase::Running).await;
    assert_eq!(pods_of(&client, &ns, "doomed").await.len(), 1);

    Api::<AiJob>::namespaced(client.clone(), &ns)
        .delete("doomed", &DeleteParams::default())
        .await
        .unwrap();
    let aijobs = Api::<AiJob>::namespaced(client.clone(), &ns);
    let jobs = Api::<Job>::namespaced(client.clone(), &ns);
    wait_for(LONG, "AiJob, Job and pods gone", || async {
        let gone = aijobs.get_opt("doomed").await.ok()?.is_none()
            && jobs.get_opt("doomed").await.ok()?.is_none()
            && pods_of(&client, &ns, "doomed").await.is_empty();
        gone.then_some(())
    })
    .await
    .unwrap();
    cleanup(&client, &ns).await;
}

#[tokio::test]
async fn restarting_the_operator_mid_job_leaves_exactly_one_job() {
    let env = testenv();
    let org = env.org(ORG).unwrap();
    let client = admin(org).await;
    let ns = namespace(&client, "restart").await;
    let first = Operator::start(org, "restart-1");
    create(&client, &ns, aijob_json("steady", 2, &[], "8s", serde_json::json!({}))).await;
    wait_phase(&client, &ns, "steady", AiJobPhase::Running).await;
    let jobs = Api::<Job>::namespaced(client.clone(), &ns);
    let uid_before = jobs.get("steady").await.unwrap().metadata.uid;
    first.kill();

    let _second = Operator::start(org, "restart-2");
    let done = wait_phase(&client, &ns, "steady", AiJobPhase::Succeeded).await;
    assert_eq!(done.status.unwrap().exit_code, Some(0));
    let all = jobs
        .list(&ListParams::default().labels(&format!("{LABEL_AIJOB}=steady")))
        .await
        .unwrap()
        .items;
    assert_eq!(all.len(), 1, "exactly one Job");
    assert_eq!(all[0].metadata.uid, uid_before, "the same Job, not a new one");
    assert_eq!(pods_of(&client, &ns, "steady").await.len(), 1, "the workload ran once");
    cleanup(&client, &ns).await;
}

/// AiJobs waiting when the operator starts are all placed: they reconcile at
/// once while the caches are still listing. (That every task waiting for a
/// cache's first list is woken, which kube-runtime's own readiness wait does
/// not do, is checked by the unit test in `operator/src/listed.rs`; this run
/// did not hit that race with the old code either.)
#[tokio::test]
async fn jobs_applied_while_the_operator_is_down_all_start_when_it_comes_up() {
    let env = testenv();
    let org = env.org(ORG).unwrap();
    let client = admin(org).await;
    let ns = namespace(&client, "backlog").await;
    let names: Vec<String> = (0..12).map(|i| format!("backlog-{i}")).collect();
    for name in &names {
        create(&client, &ns, aijob_json(name, 1, &[], "30s", serde_json::json!({}))).await;
    }
    let _op = Operator::start(org, "backlog");
    for name in &names {
        wait_phase(&client, &ns, name, AiJobPhase::Running).await;
    }
    cleanup(&client, &ns).await;
}

/// Deleting a namespace deletes its pods and Jobs before the AiJobs in it
/// (discovery order), so for a moment the operator sees a Running AiJob with
/// no pod, or with no Job at all. That says nothing about the workload; the
/// status must not go back to Pending or call the Job lost on its way out.
/// This is also how a provider ends a lease: it deletes the lease namespace.
#[tokio::test]
async fn deleting_the_namespace_of_a_running_aijob_never_takes_its_status_back() {
    let env = testenv();
    let org = env.org(ORG).unwrap();
    let client = admin(org).await;
    let ns = namespace(&client, "ns-gone").await;
    let _op = Operator::start(org, "ns-gone");
    create(
        &client,
        &ns,
        aijob_json("leaving", 1, &[], "600s", serde_json::json!({})),
    )
    .await;
    wait_phase(&client, &ns, "leaving", AiJobPhase::Running).await;

    // Every status the API server holds from here on, in order.
    let api = Api::<AiJob>::namespaced(client.clone(), &ns);
    let seen = Arc::new(Mutex::new(Vec::<(String, String)>::new()));
    let record = seen.clone();
    let watch = tokio::spawn(async move {
        let cfg = watcher::Config::default().fields("metadata.name=leaving");
        let mut events = std::pin::pin!(watcher(api, cfg));
        while let Some(Ok(ev)) = events.next().await {
            if let watcher::Event::Apply(j) | watcher::Event::InitApply(j) = ev {
                let s = j.status.unwrap_or_default();
                let phase = s.phase.map(|p| format!("{p:?}")).unwrap_or_default();
                let reason = s
                    .conditions
                    .iter()
                    .map(|c| c.reason.clone())
                    .collect::<Vec<_>>()
                    .join(",");
                record.lock().unwrap().push((phase, reason));
            }
        }
    });
    // Let the watch list once before the deletion starts.
    wait_for(LONG, "the watch to see the running AiJob", || async {
        (!seen.lock().unwrap().is_empty()).then_some(())
    })
    .await
    .unwrap();

    Api::<Namespace>::all(client.clone())
        .delete(&ns, &DeleteParams::default())
        .await
        .unwrap();
    let namespaces = Api::<Namespace>::all(client.clone());
    wait_for(LONG, "the namespace to be gone", || async {
        namespaces.get_opt(&ns).await.ok()?.is_none().then_some(())
    })
    .await
    .unwrap();
    watch.abort();

    let seen = seen.lock().unwrap().clone();
    assert!(
        seen.iter()
            .all(|(phase, reasons)| phase == "Running" && !reasons.contains("JobLost")),
        "the status went back or called the Job lost while the namespace was deleted: {seen:?}"
    );
}

/// A cleanup reads an object, then deletes it; a namespace being deleted
/// around it can remove it in between. Under the operator's own identity
/// against the real API server: a Job deleted while it exists is `Now`,
/// one already gone is `AlreadyGone`, not an error (it had failed the
/// finalizer's reconcile with a warning and a reconcile error), and a
/// delete the operator is not allowed to make is still an error.
#[tokio::test]
async fn a_delete_that_finds_the_object_gone_is_the_outcome_asked_for() {
    use gpupool_operator::deletes::{Deleted, delete_unless_gone};
    let env = testenv();
    let org = env.org(ORG).unwrap();
    let client = admin(org).await;
    let ns = namespace(&client, "gone").await;
    let operator = gpupool_e2e::cluster::client_for(&org.operator_kubeconfig)
        .await
        .expect("operator client");
    let job: Job = serde_json::from_value(serde_json::json!({
        "metadata": { "name": "short" },
        "spec": { "template": { "spec": {
            "restartPolicy": "Never",
            "containers": [{ "name": "c", "image": "busybox" }]
        } } }
    }))
    .unwrap();
    Api::<Job>::namespaced(client.clone(), &ns)
        .create(&PostParams::default(), &job)
        .await
        .unwrap();
    let jobs: Api<Job> = Api::namespaced(operator.clone(), &ns);
    let background = DeleteParams::background();
    assert_eq!(
        delete_unless_gone(&jobs, "short", &background).await.unwrap(),
        Deleted::Now
    );
    wait_for(LONG, "the Job gone", || async {
        jobs.get_opt("short").await.unwrap().is_none().then_some(())
    })
    .await
    .unwrap();
    assert_eq!(
        delete_unless_gone(&jobs, "short", &background).await.unwrap(),
        Deleted::AlreadyGone
    );
    assert_eq!(
        delete_unless_gone(&jobs, "never-was", &background).await.unwrap(),
        Deleted::AlreadyGone
    );
    // The operator may read pods but not delete them: still an error.
    let pods: Api<Pod> = Api::namespaced(operator, &ns);
    match delete_unless_gone(&pods, "any", &background).await {
        Err(kube::Error::Api(s)) => assert_eq!(s.code, 403, "{s:?}"),
        other => panic!("a forbidden delete must stay an error: {other:?}"),
    }
    let _ = Api::<Namespace>::all(client)
        .delete(&ns, &DeleteParams::default())
        .await;
}

/// The finalizer helper on a real API server, handed copies of an object
/// older than the controller's own writes, as a reconcile gets when its
/// cache lags (kube's helper failed each of these: 422 on the add and on a
/// moved finalizer, 404 on a second removal; a 100-job burst hit 60).
#[tokio::test]
async fn a_finalizer_step_taken_on_a_stale_copy_goes_on_from_what_the_server_holds() {
    use gpupool_operator::finalizers::finalizer;
    use k8s_openapi::api::core::v1::ConfigMap;
    use kube::runtime::controller::Action;
    use kube::runtime::finalizer::Event as Step;
    const MINE: &str = "gpupool.dev/test-finalizer";
    let env = testenv();
    let org = env.org(ORG).unwrap();
    let client = admin(org).await;
    let ns = namespace(&client, "stale").await;
    let maps: Api<ConfigMap> = Api::namespaced(client.clone(), &ns);
    let ran = Arc::new(Mutex::new(Vec::<String>::new()));
    let step = |obj: Arc<ConfigMap>| {
        let ran = ran.clone();
        let maps = maps.clone();
        async move {
            finalizer(&maps, MINE, obj, |event| async move {
                let (what, o) = match event {
                    Step::Apply(o) => ("apply", o),
                    Step::Cleanup(o) => ("cleanup", o),
                };
                let held = o.metadata.finalizers.clone().unwrap_or_default();
                ran.lock().unwrap().push(format!("{what} {}", held.join(",")));
                Ok::<_, std::io::Error>(Action::await_change())
            })
            .await
        }
    };
    let finalizers_of = |name: &'static str| {
        let maps = maps.clone();
        async move { maps.get(name).await.unwrap().metadata.finalizers.unwrap_or_default() }
    };
    let cm = |name: &str, finalizers: &[&str]| -> ConfigMap {
        serde_json::from_value(serde_json::json!({"metadata": {"name": name, "finalizers": finalizers}})).unwrap()
    };

    // Added from a copy without it; then the same stale copy again: the
    // helper reads the object, finds the finalizer on it and applies.
    let created = Arc::new(maps.create(&PostParams::default(), &cm("plain", &[])).await.unwrap());
    step(created.clone()).await.expect("the finalizer added");
    assert_eq!(finalizers_of("plain").await, vec![MINE]);
    assert!(ran.lock().unwrap().is_empty(), "apply waits for the write to come back");
    step(created.clone())
        .await
        .expect("a stale copy goes on from the server's");
    assert_eq!(ran.lock().unwrap().as_slice(), [format!("apply {MINE}")]);
    assert_eq!(finalizers_of("plain").await, vec![MINE], "added once, not twice");

    // Deleted: cleanup, then the finalizer comes off and the object goes.
    // The deleting copy handed in again (its removal already done) is a
    // cleanup that finds nothing to remove, not a 404 error.
    maps.delete("plain", &DeleteParams::default()).await.unwrap();
    let deleting = Arc::new(maps.get("plain").await.unwrap());
    assert!(deleting.metadata.deletion_timestamp.is_some());
    step(deleting.clone()).await.expect("cleanup and removal");
    assert!(
        maps.get_opt("plain").await.unwrap().is_none(),
        "gone once ours came off"
    );
    step(deleting).await.expect("a second removal on a gone object is done");
    assert_eq!(ran.lock().unwrap().len(), 3);

    // Ours moved: another finalizer ahead of it came off after our copy was
    // taken, so the index our copy holds names nothing. Read and removed
    // where it is now; the object goes.
    let shared = maps
        .create(&PostParams::default(), &cm("shared", &["example.com/first", MINE]))
        .await
        .unwrap();
    maps.delete("shared", &DeleteParams::default()).await.unwrap();
    let stale = Arc::new(maps.get("shared").await.unwrap());
    assert_eq!(shared.metadata.finalizers, stale.metadata.finalizers);
    let first_off = serde_json::json!({"metadata": {"finalizers": [MINE]}});
    maps.patch("shared", &PatchParams::default(), &Patch::Merge(&first_off))
        .await
        .unwrap();
    assert_eq!(finalizers_of("shared").await, vec![MINE]);
    step(stale).await.expect("removed where it stands now");
    assert!(maps.get_opt("shared").await.unwrap().is_none(), "nothing holds it");

    // A finalizer of someone else's stays where it is: only ours is touched.
    let other = Arc::new(
        maps.create(&PostParams::default(), &cm("other", &["example.com/keep"]))
            .await
            .unwrap(),
    );
    step(other.clone()).await.expect("ours appended");
    step(other).await.expect("stale copy of a shared list");
    assert_eq!(finalizers_of("other").await, vec!["example.com/keep", MINE]);
    let none = serde_json::json!({"metadata": {"finalizers": null}});
    maps.patch("other", &PatchParams::default(), &Patch::Merge(&none))
        .await
        .unwrap();
    let _ = Api::<Namespace>::all(client)
        .delete(&ns, &DeleteParams::default())
        .await;
}

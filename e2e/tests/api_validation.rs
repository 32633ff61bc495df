//! Bad AiJobs are refused by the real API server, with messages that say
//! what to fix. No operator is involved: the CRD's schema and CEL rules do it.

use gpupool_crds::AiJob;
use gpupool_e2e::harness::{admin, aijob_json, namespace, testenv};
use k8s_openapi::api::core::v1::Namespace;
use kube::Client;
use kube::api::{Api, DeleteParams, DynamicObject, PostParams};
use kube::core::ApiResource;

async fn refused(client: &Client, ns: &str, obj: serde_json::Value) -> String {
    let ar = ApiResource::erase::<AiJob>(&());
    let api: Api<DynamicObject> = Api::namespaced_with(client.clone(), ns, &ar);
    let obj: DynamicObject = serde_json::from_value(obj).expect("object");
    match api.create(&PostParams::default(), &obj).await {
        Ok(o) => panic!("the API server accepted {:?}", o.metadata.name),
        Err(kube::Error::Api(e)) => {
            assert_eq!(e.code, 422, "{e:?}");
            e.message
        }
        Err(e) => panic!("unexpected error {e}"),
    }
}

#[tokio::test]
async fn malformed_aijobs_are_refused_with_actionable_messages() {
    let env = testenv();
    let org = &env.orgs[0];
    let client = admin(org).await;
    let ns = namespace(&client, "validation").await;
    let base = || aijob_json("bad", 1, &["H100"], "1s", serde_json::json!({}));

    let cases: Vec<(&str, serde_json::Value, &str)> = vec![
        (
            "zero GPUs",
            {
                let mut j = base();
                j["spec"]["gpus"]["count"] = 0.into();
                j
            },
            "gpus.count must be between 1 and 16",
        ),
        (
            "absurd GPUs",
            {
                let mut j = base();
                j["spec"]["gpus"]["count"] = 1000.into();
                j
            },
            "gpus.count must be between 1 and 16",
        ),
        (
            "negative price",
            {
                let mut j = base();
                j["spec"]["maxPricePerGpuHour"] = "-1".into();
                j
            },
            "maxPricePerGpuHour must be a non-negative decimal",
        ),
        (
            "unparsable price",
            {
                let mut j = base();
                j["spec"]["maxPricePerGpuHour"] = "two tokens".into();
                j
            },
            "maxPricePerGpuHour must be a non-negative decimal",
        ),
        (
            "unknown placement mode",
            {
                let mut j = base();
                j["spec"]["placement"] = serde_json::json!({"mode": "Anywhere"});
                j
            },
            "supported values: \"LocalFirst\", \"PoolOnly\", \"LocalOnly\"",
        ),
        (
            "no containers",
            {
                let mut j = base();
                j["spec"]["template"]["spec"]["containers"] = serde_json::json!([]);
                j
            },
            "template.spec.containers must list at least one container",
        ),
        (
            "accepted bid on Auto",
            {
                let mut j = base();
                j["spec"]["bidding"] = serde_json::json!({"selection": "Auto", "acceptedBid": "bid-1"});
                j
            },
            "bidding.acceptedBid can only be set when bidding.selection is Manual",
        ),
        (
            "accepted bid with default selection",
            {
                let mut j = base();
                j["spec"]["bidding"] = serde_json::json!({"acceptedBid": "bid-1"});
                j
            },
            "bidding.acceptedBid can only be set when bidding.selection is Manual",
        ),
        (
            "bad duration",
            {
                let mut j = base();
                j["spec"]["maxDuration"] = "1d".into();
                j
            },
            "maxDuration must be a duration such as",
        ),
        (
            "restartPolicy Always",
            {
                let mut j = base();
                j["spec"]["template"]["spec"]["restartPolicy"] = "Always".into();
                j
            },
            "restartPolicy must be Never or OnFailure",
        ),
        (
            "bad memory",
            {
                let mut j = base();
                j["spec"]["gpus"]["minMemory"] = "lots".into();
                j
            },
            "gpus.minMemory must be a positive quantity",
        ),
        (
            "org allowed and denied",
            {
                let mut j = base();
                j["spec"]["placement"] = serde_json::json!({"allowedOrgs": ["acme"], "deniedOrgs": ["acme"]});
                j
            },
            "cannot be in both placement.allowedOrgs and placement.deniedOrgs",
        ),
        (
            "name too long",
            {
                let mut j = base();
                j["metadata"]["name"] = "x".repeat(70).into();
                j
            },
            "at most 63 characters",
        ),
        (
            "payer not an address",
            {
                let mut j = base();
                j["spec"]["payer"] = "alice".into();
                j
            },
            "payer must be a 0x-prefixed 20-byte hex address",
        ),
        (
            "missing price",
            {
                let mut j = base();
                j["spec"].as_object_mut().unwrap().remove("maxPricePerGpuHour");
                j
            },
            "spec.maxPricePerGpuHour: Required value",
        ),
    ];
    for (what, obj, needle) in cases {
        let msg = refused(&client, &ns, obj).await;
        assert!(msg.contains(needle), "{what}: {msg:?} should contain {needle:?}");
    }

    // A good one passes, with defaults filled in by the API server.
    let ar = ApiResource::erase::<AiJob>(&());
    let api: Api<DynamicObject> = Api::namespaced_with(client.clone(), &ns, &ar);
    let good: DynamicObject = serde_json::from_value(base()).unwrap();
    let created = api
        .create(&PostParams::default(), &good)
        .await
        .expect("a valid AiJob is accepted");
    assert_eq!(created.data["spec"]["placement"]["mode"], "LocalFirst");
    assert_eq!(created.data["spec"]["bidding"]["selection"], "Auto");

    // What a job was sized by cannot change after creation: gpus, and the
    // maxDuration and template that the Job's deadline, the order and the
    // lease's funding were built from (nothing would honour a change).
    let typed = Api::<AiJob>::namespaced(client.clone(), &ns);
    type Change = fn(&mut AiJob);
    let changes: [(&str, Change); 3] = [
        ("gpus cannot change after the job is created", |j| j.spec.gpus.count = 4),
        ("maxDuration cannot change after the job is created", |j| {
            j.spec.max_duration = std::time::Duration::from_secs(48 * 3600).into()
        }),
        ("template cannot change after the job is created", |j| {
            j.spec.template.spec.as_mut().expect("the pod spec").containers[0].image = Some("busybox:2".into())
        }),
    ];
    for (needle, change) in changes {
        let mut j = typed.get("bad").await.unwrap();
        change(&mut j);
        match typed.replace("bad", &PostParams::default(), &j).await {
            Err(kube::Error::Api(e)) => assert!(e.message.contains(needle), "{}", e.message),
            other => panic!("a change that should say {needle:?} was not refused: {other:?}"),
        }
    }
    // What may still change does: the bid price, for a renter raising its bid.
    let mut j = typed.get("bad").await.unwrap();
    j.spec.max_price_per_gpu_hour = "9.50".into();
    let raised = typed
        .replace("bad", &PostParams::default(), &j)
        .await
        .expect("raising maxPricePerGpuHour is accepted");
    assert_eq!(raised.spec.max_price_per_gpu_hour, "9.50");
    typed.delete("bad", &DeleteParams::default()).await.unwrap();
    let _ = Api::<Namespace>::all(client.clone())
        .delete(&ns, &DeleteParams::default())
        .await;
}

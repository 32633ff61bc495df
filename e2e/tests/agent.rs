//! The node agent against real clusters: simulated GPUs that match the kwok
//! nodes, health changes, and a node with no NVIDIA driver.

use std::time::Duration;

use gpupool_crds::{GpuNode, LABEL_GPU_COUNT, LABEL_GPU_MEMORY_MIB, LABEL_GPU_PRODUCT};
use gpupool_e2e::cluster::{spawn, stop};
use gpupool_e2e::harness::{admin, testenv, wait_for, workspace_bin};
use k8s_openapi::api::core::v1::Node;
use kube::api::{Api, DeleteParams, ListParams};

#[tokio::test]
async fn simulated_agents_report_gpunodes_matching_the_kwok_nodes_of_each_org() {
    let env = testenv();
    let mut products = std::collections::BTreeSet::new();
    for org in &env.orgs {
        let client = admin(org).await;
        let nodes = Api::<Node>::all(client.clone())
            .list(&ListParams::default().labels("type=kwok"))
            .await
            .unwrap()
            .items;
        let gpunodes = Api::<GpuNode>::all(client.clone());
        assert_eq!(nodes.len(), org.nodes.len(), "{}", org.org.name);
        for node in &nodes {
            let name = node.metadata.name.clone().unwrap();
            let capacity: u32 = node.status.as_ref().unwrap().capacity.as_ref().unwrap()["nvidia.com/gpu"]
                .0
                .parse()
                .unwrap();
            let gn = gpunodes
                .get(&name)
                .await
                .unwrap_or_else(|e| panic!("GpuNode {name}: {e}"));
            let s = gn.status.unwrap();
            assert_eq!(s.gpus_total as u32, capacity, "{name}");
            assert_eq!(s.gpus.len() as u32, capacity);
            assert_eq!(s.backend.as_deref(), Some("simulated"));
            assert_eq!(s.product.as_deref(), Some(org.org.fleet.product.as_str()));
            assert!(s.gpus.iter().all(|g| g.memory_mib == org.org.fleet.memory_mib));
            assert!(
                s.conditions
                    .iter()
                    .any(|c| c.type_ == "DriverReady" && c.status == "True")
            );
            let labels = node.metadata.labels.clone().unwrap();
            assert_eq!(
                labels[LABEL_GPU_PRODUCT],
                gpupool_crds::product_label_value(&org.org.fleet.product)
            );
            assert_eq!(labels[LABEL_GPU_MEMORY_MIB], org.org.fleet.memory_mib.to_string());
            assert_eq!(labels[LABEL_GPU_COUNT], capacity.to_string());
        }
        products.insert(org.org.fleet.product.clone());
    }
    assert_eq!(
        products.len(),
        env.orgs.len().min(3),
        "each organisation has its own kind of GPU"
    );
}

#[tokio::test]
async fn agent_reports_an_unhealthy_gpu_and_its_recovery() {
    let env = testenv();
    let org = env.orgs.last().unwrap();
    let client = admin(org).await;
    let (node, inventory) = (org.nodes[0].clone(), org.inventories[0].clone());
    let original = std::fs::read_to_string(&inventory).unwrap();
    let gpunodes = Api::<GpuNode>::all(client.clone());
    std::fs::write(&inventory, format!("{original}unhealthy: [0]\n")).unwrap();
    let healthy = |n: i32| {
        let gpunodes = gpunodes.clone();
        let node = node.clone();
        async move {
            wait_for(
                Duration::from_secs(30),
                &format!("{node} with {n} healthy GPUs"),
                || async {
                    let s = gpunodes.get(&node).await.ok()?.status?;
                    (s.gpus_healthy == n).then_some(s)
                },
            )
            .await
        }
    };
    let fleet = org.org.fleet.gpus_per_node as i32;
    let s = healthy(fleet - 1).await;
    std::fs::write(&inventory, &original).unwrap();
    let s = s.unwrap();
    assert_eq!(s.gpus[0].health_message.as_deref(), Some("simulated XID 79"));
    healthy(fleet).await.unwrap();
}

#[tokio::test]
async fn agent_on_a_node_without_an_nvidia_driver_reports_it_and_keeps_running() {
    let env = testenv();
    let org = &env.orgs[0];
    let client = admin(org).await;
    let node = "no-driver-node";
    let log = org.dir.join("logs/agent-no-driver.log");
    let pid = spawn(
        &workspace_bin("gpupool-agent"),
        &[
            format!("--node-name={node}"),
            "--backend=nvml".into(),
            "--poll-seconds=1".into(),
        ],
        &[("KUBECONFIG", &org.agent_kubeconfig)],
        &log,
    )
    .unwrap();
    let gpunodes = Api::<GpuNode>::all(client.clone());
    let result = wait_for(Duration::from_secs(30), "GpuNode from the NVML agent", || async {
        gpunodes.get(node).await.ok()?.status
    })
    .await;
    // Give it a few backoff rounds: it must still be alive afterwards.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let alive = std::path::Path::new(&format!("/proc/{pid}")).exists();
    stop(&[pid]);
    let status = result.unwrap();
    let cond = status
        .conditions
        .iter()
        .find(|c| c.type_ == "DriverReady")
        .expect("DriverReady condition");
    if cond.status == "False" {
        // This machine has no NVIDIA driver: the expected case in CI.
        assert_eq!(cond.reason, "DriverUnavailable");
        assert!(cond.message.contains("libnvidia-ml.so"), "{}", cond.message);
        assert_eq!((status.gpus_total, status.gpus_free), (0, 0));
        let logs = std::fs::read_to_string(&log).unwrap();
        assert!(logs.contains("NVML unavailable"), "{logs}");
    } else {
        // A GPU machine: the real GPUs were read.
        assert!(status.gpus_total > 0);
    }
    assert!(alive, "the agent must not exit when the driver is missing");
    let _ = gpunodes.delete(node, &DeleteParams::default()).await;
}

//! Writes the GpuNode and the Node's labels with server-side apply, so the
//! agent owns exactly its fields and never fights other writers.

use std::collections::BTreeMap;

use gpupool_crds::{GpuNode, GpuNodeStatus};
use k8s_openapi::api::core::v1::Node;
use kube::api::{Patch, PatchParams};
use kube::{Api, Client};

pub const FIELD_MANAGER: &str = "gpupool-agent";

pub struct Publisher {
    gpunodes: Api<GpuNode>,
    nodes: Api<Node>,
    node: String,
}

impl Publisher {
    pub fn new(client: Client, node: &str) -> Self {
        Self {
            gpunodes: Api::all(client.clone()),
            nodes: Api::all(client),
            node: node.to_string(),
        }
    }

    pub async fn gpunode(&self, status: &GpuNodeStatus) -> Result<(), kube::Error> {
        let params = PatchParams::apply(FIELD_MANAGER).force();
        let object = serde_json::json!({
            "apiVersion": "gpupool.dev/v1alpha1",
            "kind": "GpuNode",
            "metadata": { "name": self.node },
            "spec": { "nodeName": self.node },
        });
        self.gpunodes.patch(&self.node, &params, &Patch::Apply(&object)).await?;
        let status = serde_json::json!({
            "apiVersion": "gpupool.dev/v1alpha1",
            "kind": "GpuNode",
            "metadata": { "name": self.node },
            "status": status,
        });
        self.gpunodes
            .patch_status(&self.node, &params, &Patch::Apply(&status))
            .await?;
        Ok(())
    }

    pub async fn labels(&self, labels: &BTreeMap<String, String>) -> Result<(), kube::Error> {
        let object = serde_json::json!({
            "apiVersion": "v1",
            "kind": "Node",
            "metadata": { "name": self.node, "labels": labels },
        });
        self.nodes
            .patch(
                &self.node,
                &PatchParams::apply(FIELD_MANAGER).force(),
                &Patch::Apply(&object),
            )
            .await?;
        Ok(())
    }
}

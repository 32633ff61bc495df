//! Writes the GpuNode and the Node's labels with server-side apply, so the
//! agent owns exactly its fields and never fights other writers.

use std::collections::BTreeMap;

use gpupool_crds::{GpuNode, GpuNodeStatus};
use k8s_openapi::api::core::v1::Node;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference;
use kube::api::{Patch, PatchParams};
use kube::{Api, Client, Resource};

pub const FIELD_MANAGER: &str = "gpupool-agent";

pub struct Publisher {
    gpunodes: Api<GpuNode>,
    nodes: Api<Node>,
    node: String,
    /// The Node as owner, so the GpuNode is garbage-collected with it.
    owner: tokio::sync::Mutex<Option<OwnerReference>>,
}

impl Publisher {
    pub fn new(client: Client, node: &str) -> Self {
        Self {
            gpunodes: Api::all(client.clone()),
            nodes: Api::all(client),
            node: node.to_string(),
            owner: tokio::sync::Mutex::new(None),
        }
    }

    /// The Node's owner reference, looked up once it exists. A missing Node
    /// (an agent started before registration) only delays the reference.
    async fn owner(&self) -> Option<OwnerReference> {
        let mut cached = self.owner.lock().await;
        if cached.is_none()
            && let Ok(Some(node)) = self.nodes.get_opt(&self.node).await
        {
            *cached = node.controller_owner_ref(&()).map(|mut r| {
                // A GpuNode describes its Node; it is not controlled by it.
                r.controller = None;
                r.block_owner_deletion = None;
                r
            });
        }
        cached.clone()
    }

    pub async fn gpunode(&self, status: &GpuNodeStatus) -> Result<(), kube::Error> {
        let params = PatchParams::apply(FIELD_MANAGER).force();
        let mut metadata = serde_json::json!({ "name": self.node });
        if let Some(owner) = self.owner().await {
            metadata["ownerReferences"] = serde_json::json!([owner]);
        }
        let object = serde_json::json!({
            "apiVersion": "gpupool.dev/v1alpha1",
            "kind": "GpuNode",
            "metadata": metadata,
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

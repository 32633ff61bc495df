//! Applies YAML documents with server-side apply, as `kubectl apply
//! --server-side` would, resolving each kind through discovery.

use kube::api::{DynamicObject, Patch, PatchParams};
use kube::core::GroupVersionKind;
use kube::discovery::{Scope, pinned_kind};
use kube::{Api, Client};

pub const FIELD_MANAGER: &str = "gpupool-testenv";

#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
    #[error("parsing YAML: {0}")]
    Yaml(String),
    #[error("a document has no apiVersion/kind/name")]
    Incomplete,
    #[error("kubernetes API: {0}")]
    Kube(#[from] kube::Error),
}

/// Applies the documents whose kind is in `kinds` (all when empty).
pub async fn apply_yaml(client: &Client, yaml: &str, kinds: &[&str]) -> Result<(), ApplyError> {
    let docs: Vec<serde_json::Value> =
        serde_saphyr::from_multiple(yaml).map_err(|e| ApplyError::Yaml(e.to_string()))?;
    let wanted = |d: &serde_json::Value| kinds.is_empty() || d["kind"].as_str().is_some_and(|k| kinds.contains(&k));
    for doc in docs.into_iter().filter(|d| !d.is_null() && wanted(d)) {
        let obj: DynamicObject = serde_json::from_value(doc).map_err(|e| ApplyError::Yaml(e.to_string()))?;
        let types = obj.types.clone().ok_or(ApplyError::Incomplete)?;
        let name = obj.metadata.name.clone().ok_or(ApplyError::Incomplete)?;
        let gvk = GroupVersionKind::try_from(&types).map_err(|_| ApplyError::Incomplete)?;
        let (resource, caps) = pinned_kind(client, &gvk).await?;
        let api: Api<DynamicObject> = match (caps.scope, obj.metadata.namespace.as_deref()) {
            (Scope::Namespaced, Some(ns)) => Api::namespaced_with(client.clone(), ns, &resource),
            (Scope::Namespaced, None) => Api::default_namespaced_with(client.clone(), &resource),
            (Scope::Cluster, _) => Api::all_with(client.clone(), &resource),
        };
        api.patch(&name, &PatchParams::apply(FIELD_MANAGER).force(), &Patch::Apply(&obj))
            .await?;
    }
    Ok(())
}

//! The batch/v1 Job that runs an AiJob locally.

use std::collections::BTreeMap;

use gpupool_crds::{AiJob, GPU_RESOURCE, LABEL_AIJOB, LABEL_GPU_MEMORY_MIB, LABEL_GPU_PRODUCT, product_label_value};
use k8s_openapi::api::batch::v1::{Job, JobSpec};
use k8s_openapi::api::core::v1::{
    Affinity, NodeAffinity, NodeSelector, NodeSelectorRequirement, NodeSelectorTerm, ResourceRequirements, Toleration,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::{Resource, ResourceExt};

use crate::placement::Need;

pub const MANAGED_BY: &str = "app.kubernetes.io/managed-by";
pub const MANAGER: &str = "gpupool-operator";

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum BuildError {
    #[error("the AiJob has no namespace or uid yet")]
    Unsaved,
    #[error("template.spec is missing")]
    NoPodSpec,
    #[error("template.spec.containers is empty")]
    NoContainers,
}

/// The Job's name: the AiJob's own, which makes creating it idempotent — a
/// second create after an operator restart hits AlreadyExists instead of
/// starting the workload twice. AiJob names are capped at 63 characters by
/// the CRD so they are always valid Job names.
pub fn job_name(aijob: &AiJob) -> String {
    aijob.name_any()
}

/// Builds the Job: the user's pod template plus the GPU limit on the first
/// container, node affinity to the accepted products (and memory), the
/// common GPU taint tolerated, an owner reference and our labels.
pub fn build(aijob: &AiJob, need: &Need, products: &[String]) -> Result<Job, BuildError> {
    let owner = aijob.controller_owner_ref(&()).ok_or(BuildError::Unsaved)?;
    let namespace = aijob.namespace().ok_or(BuildError::Unsaved)?;
    let name = job_name(aijob);

    let mut template = aijob.spec.template.clone();
    let mut labels: BTreeMap<String, String> = template
        .metadata
        .as_ref()
        .and_then(|m| m.labels.clone())
        .unwrap_or_default();
    labels.insert(LABEL_AIJOB.into(), name.clone());
    labels.insert(MANAGED_BY.into(), MANAGER.into());
    let meta = template.metadata.get_or_insert_with(Default::default);
    meta.labels = Some(labels.clone());

    let pod = template.spec.as_mut().ok_or(BuildError::NoPodSpec)?;
    if pod.containers.is_empty() {
        return Err(BuildError::NoContainers);
    }
    pod.restart_policy.get_or_insert_with(|| "Never".into());
    for (i, c) in pod.containers.iter_mut().enumerate() {
        let res = c.resources.get_or_insert_with(ResourceRequirements::default);
        for map in [&mut res.limits, &mut res.requests].into_iter().flatten() {
            map.remove(GPU_RESOURCE);
        }
        if i == 0 {
            res.limits
                .get_or_insert_with(Default::default)
                .insert(GPU_RESOURCE.into(), Quantity(need.count.to_string()));
        }
    }

    let mut requirements = vec![NodeSelectorRequirement {
        key: LABEL_GPU_PRODUCT.into(),
        operator: "In".into(),
        values: Some(products.iter().map(|p| product_label_value(p)).collect()),
    }];
    if need.min_memory_mib > 0 {
        requirements.push(NodeSelectorRequirement {
            key: LABEL_GPU_MEMORY_MIB.into(),
            operator: "Gt".into(),
            values: Some(vec![(need.min_memory_mib - 1).to_string()]),
        });
    }
    let affinity = pod.affinity.get_or_insert_with(Affinity::default);
    let node_affinity = affinity.node_affinity.get_or_insert_with(NodeAffinity::default);
    let required = node_affinity
        .required_during_scheduling_ignored_during_execution
        .get_or_insert_with(|| NodeSelector {
            node_selector_terms: vec![NodeSelectorTerm::default()],
        });
    if required.node_selector_terms.is_empty() {
        required.node_selector_terms.push(NodeSelectorTerm::default());
    }
    // Terms are ORed: our requirements go into every term so none escapes them.
    for term in &mut required.node_selector_terms {
        term.match_expressions
            .get_or_insert_with(Vec::new)
            .extend(requirements.iter().cloned());
    }
    let tolerations = pod.tolerations.get_or_insert_with(Vec::new);
    if !tolerations.iter().any(|t| t.key.as_deref() == Some(GPU_RESOURCE)) {
        tolerations.push(Toleration {
            key: Some(GPU_RESOURCE.into()),
            operator: Some("Exists".into()),
            effect: Some("NoSchedule".into()),
            ..Default::default()
        });
    }

    let max_duration: std::time::Duration = aijob.spec.max_duration.into();
    let active_deadline = Some(max_duration.as_secs().max(1) as i64);
    Ok(Job {
        metadata: ObjectMeta {
            name: Some(name),
            namespace: Some(namespace),
            labels: Some(BTreeMap::from([
                (LABEL_AIJOB.to_string(), aijob.name_any()),
                (MANAGED_BY.to_string(), MANAGER.to_string()),
            ])),
            owner_references: Some(vec![owner]),
            ..Default::default()
        },
        spec: Some(JobSpec {
            template,
            backoff_limit: Some(0),
            completions: Some(1),
            parallelism: Some(1),
            active_deadline_seconds: active_deadline,
            ..Default::default()
        }),
        status: None,
    })
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use gpupool_crds::{AiJobSpec, GpuRequirements};
    use k8s_openapi::api::core::v1::{Container, PodSpec, PodTemplateSpec};

    pub fn aijob() -> AiJob {
        let mut j = AiJob::new(
            "train",
            AiJobSpec {
                template: PodTemplateSpec {
                    metadata: Some(ObjectMeta {
                        labels: Some(BTreeMap::from([("team".into(), "nlp".into())])),
                        ..Default::default()
                    }),
                    spec: Some(PodSpec {
                        containers: vec![
                            Container {
                                name: "main".into(),
                                image: Some("pytorch".into()),
                                ..Default::default()
                            },
                            Container {
                                name: "side".into(),
                                ..Default::default()
                            },
                        ],
                        ..Default::default()
                    }),
                },
                gpus: GpuRequirements {
                    count: 4,
                    models: vec!["H100".into()],
                    min_memory: None,
                    interconnect: Default::default(),
                },
                max_price_per_gpu_hour: "2".into(),
                max_duration: std::time::Duration::from_secs(3600).into(),
                placement: Default::default(),
                bidding: Default::default(),
                payer: None,
            },
        );
        j.metadata.namespace = Some("ml".into());
        j.metadata.uid = Some("uid-1".into());
        j
    }

    #[test]
    fn builds_gpu_job_owned_by_aijob() {
        let need = Need {
            count: 4,
            models: vec!["H100".into()],
            min_memory_mib: 81920,
        };
        let job = build(&aijob(), &need, &["NVIDIA H100 80GB HBM3".into()]).unwrap();
        assert_eq!(job.metadata.name.as_deref(), Some("train"));
        assert_eq!(job.metadata.namespace.as_deref(), Some("ml"));
        let owner = &job.metadata.owner_references.as_ref().unwrap()[0];
        assert_eq!(
            (owner.kind.as_str(), owner.uid.as_str(), owner.controller),
            ("AiJob", "uid-1", Some(true))
        );
        let spec = job.spec.unwrap();
        assert_eq!(spec.active_deadline_seconds, Some(3600));
        assert_eq!(spec.backoff_limit, Some(0));
        let labels = spec.template.metadata.unwrap().labels.unwrap();
        assert_eq!(labels.get(LABEL_AIJOB).map(String::as_str), Some("train"));
        assert_eq!(labels.get("team").map(String::as_str), Some("nlp"));
        let pod = spec.template.spec.unwrap();
        assert_eq!(pod.restart_policy.as_deref(), Some("Never"));
        let limits = pod.containers[0].resources.as_ref().unwrap().limits.as_ref().unwrap();
        assert_eq!(limits.get(GPU_RESOURCE), Some(&Quantity("4".into())));
        assert!(pod.containers[1].resources.as_ref().unwrap().limits.is_none());
        let terms = pod
            .affinity
            .unwrap()
            .node_affinity
            .unwrap()
            .required_during_scheduling_ignored_during_execution
            .unwrap()
            .node_selector_terms;
        let exprs = terms[0].match_expressions.as_ref().unwrap();
        assert_eq!(
            exprs[0].values.as_ref().unwrap(),
            &vec!["NVIDIA-H100-80GB-HBM3".to_string()]
        );
        assert_eq!(
            (
                exprs[1].operator.as_str(),
                exprs[1].values.as_ref().unwrap()[0].as_str()
            ),
            ("Gt", "81919")
        );
        assert_eq!(pod.tolerations.unwrap()[0].key.as_deref(), Some(GPU_RESOURCE));
    }

    #[test]
    fn user_gpu_limits_are_replaced_not_added() {
        let mut j = aijob();
        let c = &mut j.spec.template.spec.as_mut().unwrap().containers[1];
        c.resources = Some(ResourceRequirements {
            limits: Some(BTreeMap::from([(GPU_RESOURCE.into(), Quantity("8".into()))])),
            ..Default::default()
        });
        let need = Need {
            count: 4,
            models: vec![],
            min_memory_mib: 0,
        };
        let job = build(&j, &need, &["X".into()]).unwrap();
        let pod = job.spec.unwrap().template.spec.unwrap();
        let total: u32 = pod
            .containers
            .iter()
            .filter_map(|c| c.resources.as_ref()?.limits.as_ref()?.get(GPU_RESOURCE))
            .map(|q| q.0.parse::<u32>().unwrap())
            .sum();
        assert_eq!(total, 4);
    }

    #[test]
    fn unsaved_aijob_is_refused() {
        let mut j = aijob();
        j.metadata.uid = None;
        let need = Need {
            count: 1,
            models: vec![],
            min_memory_mib: 0,
        };
        assert_eq!(build(&j, &need, &[]).unwrap_err(), BuildError::Unsaved);
    }
}

//! Pods as the operator and the agent cache them, and how Kubernetes counts
//! the GPUs a pod holds, shared by both so they agree on free GPUs.
//!
//! Both watch pods and keep every one in memory: the agent its node's, the
//! operator its own Jobs' pods and everyone else's live ones. A full
//! `k8s_openapi` Pod is over 2 KB before any field is set (the spec alone is
//! inline), and a typical pod carries several KB more on the heap. At 10,000
//! AiJobs that was the largest part of the operator's memory. [`PodView`] is
//! read straight from the API server's JSON and keeps only what the callers
//! decide on, about a tenth of that.

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use k8s_openapi::{Metadata, NamespaceResourceScope, Resource};
use serde::Deserialize;

/// Labels a cached pod keeps: ours. The operator finds a pod's AiJob by
/// `gpupool.dev/aijob`; nothing reads the Job controller's or users' labels.
const KEPT_LABEL_PREFIX: &str = "gpupool.dev/";

/// One pod, as far as counting GPUs and mirroring a Job's progress go.
#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
#[serde(from = "wire::Pod")]
pub struct PodView {
    /// Name, namespace, uid, resourceVersion, deletion time, and our labels:
    /// what the cache keys on and the watch resumes from.
    pub metadata: ObjectMeta,
    pub node_name: Option<String>,
    /// GPUs the pod holds: the sum over its containers, or its largest init
    /// container if that is more, as the scheduler counts them.
    pub gpus: u32,
    pub phase: Option<String>,
    /// The first terminated container's exit code.
    pub exit_code: Option<i32>,
    /// Why the pod is not running yet, as (reason, message): an unscheduled
    /// pod's condition first, else the first waiting container's state.
    pub waiting: Option<(String, String)>,
}

impl PodView {
    /// Whether the pod still holds its node's resources.
    pub fn is_live(&self) -> bool {
        !matches!(self.phase.as_deref(), Some("Succeeded") | Some("Failed"))
    }

    pub fn is_running(&self) -> bool {
        self.phase.as_deref() == Some("Running")
    }
}

impl Resource for PodView {
    const API_VERSION: &'static str = "v1";
    const GROUP: &'static str = "";
    const KIND: &'static str = "Pod";
    const VERSION: &'static str = "v1";
    const URL_PATH_SEGMENT: &'static str = "pods";
    type Scope = NamespaceResourceScope;
}

impl Metadata for PodView {
    type Ty = ObjectMeta;

    fn metadata(&self) -> &ObjectMeta {
        &self.metadata
    }

    fn metadata_mut(&mut self) -> &mut ObjectMeta {
        &mut self.metadata
    }
}

/// What every cached view keeps of an object's metadata: enough to key on,
/// resume a watch from and see it being deleted. Views add what they read.
pub fn identity(meta: ObjectMeta) -> ObjectMeta {
    ObjectMeta {
        name: meta.name,
        namespace: meta.namespace,
        uid: meta.uid,
        resource_version: meta.resource_version,
        deletion_timestamp: meta.deletion_timestamp,
        ..Default::default()
    }
}

/// A pod's identity plus our own labels; managed fields, annotations, owner
/// references and everyone else's labels are dropped.
fn slim_metadata(mut meta: ObjectMeta) -> ObjectMeta {
    let labels: BTreeMap<String, String> = meta
        .labels
        .take()
        .into_iter()
        .flatten()
        .filter(|(k, _)| k.starts_with(KEPT_LABEL_PREFIX))
        .collect();
    ObjectMeta {
        labels: (!labels.is_empty()).then_some(labels),
        ..identity(meta)
    }
}

/// The shape of a pod in the API server's JSON, reduced to the fields
/// [`PodView`] is built from; serde skips everything else unread.
mod wire {
    use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
    use serde::Deserialize;

    #[derive(Deserialize)]
    pub struct Pod {
        #[serde(default)]
        pub metadata: ObjectMeta,
        pub spec: Option<Spec>,
        pub status: Option<Status>,
    }

    #[derive(Deserialize)]
    #[serde(rename_all = "camelCase")]
    pub struct Spec {
        pub node_name: Option<String>,
        pub containers: Option<Vec<Container>>,
        pub init_containers: Option<Vec<Container>>,
    }

    #[derive(Deserialize)]
    pub struct Container {
        pub resources: Option<Resources>,
    }

    #[derive(Deserialize)]
    pub struct Resources {
        pub limits: Option<Gpus>,
        pub requests: Option<Gpus>,
    }

    /// Only the GPU resource; a test checks the name equals `GPU_RESOURCE`.
    #[derive(Deserialize)]
    pub struct Gpus {
        #[serde(rename = "nvidia.com/gpu")]
        pub gpu: Option<Quantity>,
    }

    #[derive(Deserialize)]
    #[serde(rename_all = "camelCase")]
    pub struct Status {
        pub phase: Option<String>,
        pub conditions: Option<Vec<Condition>>,
        pub container_statuses: Option<Vec<ContainerStatus>>,
    }

    #[derive(Deserialize)]
    pub struct Condition {
        #[serde(rename = "type")]
        pub type_: String,
        pub status: String,
        pub reason: Option<String>,
        pub message: Option<String>,
    }

    #[derive(Deserialize)]
    pub struct ContainerStatus {
        pub state: Option<State>,
    }

    #[derive(Deserialize)]
    pub struct State {
        pub waiting: Option<Waiting>,
        pub terminated: Option<Terminated>,
    }

    #[derive(Deserialize)]
    pub struct Waiting {
        pub reason: Option<String>,
        pub message: Option<String>,
    }

    #[derive(Deserialize)]
    #[serde(rename_all = "camelCase")]
    pub struct Terminated {
        pub exit_code: i32,
    }
}

fn container_gpus(c: &wire::Container) -> u32 {
    c.resources
        .as_ref()
        .and_then(|r| {
            r.limits
                .as_ref()
                .and_then(|l| l.gpu.as_ref())
                .or_else(|| r.requests.as_ref().and_then(|q| q.gpu.as_ref()))
        })
        .and_then(|q| q.0.parse::<u32>().ok())
        .unwrap_or(0)
}

impl From<wire::Pod> for PodView {
    fn from(p: wire::Pod) -> Self {
        let (node_name, gpus) = match p.spec {
            Some(s) => {
                let main: u32 = s.containers.iter().flatten().map(container_gpus).sum();
                let init = s
                    .init_containers
                    .iter()
                    .flatten()
                    .map(container_gpus)
                    .max()
                    .unwrap_or(0);
                (s.node_name, main.max(init))
            }
            None => (None, 0),
        };
        let (phase, exit_code, waiting) = match p.status {
            Some(s) => {
                let statuses = s.container_statuses.unwrap_or_default();
                let exit_code = statuses
                    .iter()
                    .find_map(|c| c.state.as_ref()?.terminated.as_ref().map(|t| t.exit_code));
                let unscheduled = s
                    .conditions
                    .into_iter()
                    .flatten()
                    .find(|c| c.type_ == "PodScheduled" && c.status == "False")
                    .map(|c| {
                        (
                            c.reason.unwrap_or_else(|| "Unschedulable".into()),
                            c.message.unwrap_or_default(),
                        )
                    });
                let waiting = unscheduled.or_else(|| {
                    statuses.into_iter().find_map(|c| {
                        let w = c.state?.waiting?;
                        Some((
                            w.reason.unwrap_or_else(|| "ContainerWaiting".into()),
                            w.message.unwrap_or_default(),
                        ))
                    })
                });
                (s.phase, exit_code, waiting)
            }
            None => (None, None, None),
        };
        PodView {
            metadata: slim_metadata(p.metadata),
            node_name,
            gpus,
            phase,
            exit_code,
            waiting,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::GPU_RESOURCE;
    use k8s_openapi::api::core::v1::{
        Container, ContainerState, ContainerStateTerminated, ContainerStateWaiting, ContainerStatus, EnvVar, Pod,
        PodCondition, PodSpec, PodStatus, ResourceRequirements, Volume,
    };
    use k8s_openapi::apimachinery::pkg::api::resource::Quantity;

    fn view(p: &Pod) -> PodView {
        serde_json::from_value(serde_json::to_value(p).unwrap()).unwrap()
    }

    fn gpus(n: &str, in_limits: bool) -> Option<ResourceRequirements> {
        let q = Some([(GPU_RESOURCE.to_string(), Quantity(n.into()))].into());
        Some(if in_limits {
            ResourceRequirements {
                limits: q,
                ..Default::default()
            }
        } else {
            ResourceRequirements {
                requests: q,
                ..Default::default()
            }
        })
    }

    #[test]
    fn counts_gpus_as_the_scheduler_does() {
        let c = |n: &str, lim: bool| Container {
            name: "c".into(),
            resources: gpus(n, lim),
            env: Some(vec![EnvVar {
                name: "A".into(),
                value: Some("b".into()),
                ..Default::default()
            }]),
            ..Default::default()
        };
        let pod = Pod {
            spec: Some(PodSpec {
                node_name: Some("n1".into()),
                containers: vec![c("2", true), c("1", false), Container::default()],
                init_containers: Some(vec![c("1", true)]),
                volumes: Some(vec![Volume {
                    name: "data".into(),
                    ..Default::default()
                }]),
                ..Default::default()
            }),
            ..Default::default()
        };
        let v = view(&pod);
        assert_eq!((v.gpus, v.node_name.as_deref()), (3, Some("n1")));
        let mut big_init = pod.clone();
        big_init.spec.as_mut().unwrap().init_containers = Some(vec![c("8", false)]);
        assert_eq!(view(&big_init).gpus, 8, "the largest init container, if more");
        assert_eq!(view(&Pod::default()), PodView::default(), "an empty pod holds nothing");
        assert!(PodView::default().is_live(), "a pod with no phase yet holds its GPUs");
    }

    #[test]
    fn keeps_phase_exit_code_and_why_it_waits() {
        let status = |phase: &str, conditions, states: Vec<ContainerState>| Pod {
            status: Some(PodStatus {
                phase: Some(phase.into()),
                conditions,
                container_statuses: Some(
                    states
                        .into_iter()
                        .map(|s| ContainerStatus {
                            name: "c".into(),
                            state: Some(s),
                            ..Default::default()
                        })
                        .collect(),
                ),
                ..Default::default()
            }),
            ..Default::default()
        };
        let done = view(&status(
            "Failed",
            None,
            vec![ContainerState {
                terminated: Some(ContainerStateTerminated {
                    exit_code: 3,
                    ..Default::default()
                }),
                ..Default::default()
            }],
        ));
        assert_eq!(
            (done.exit_code, done.is_live(), done.is_running()),
            (Some(3), false, false)
        );
        let pulling = ContainerState {
            waiting: Some(ContainerStateWaiting {
                reason: Some("ImagePullBackOff".into()),
                message: Some("no such image".into()),
            }),
            ..Default::default()
        };
        let w = view(&status("Pending", None, vec![pulling.clone()]));
        assert_eq!(w.waiting, Some(("ImagePullBackOff".into(), "no such image".into())));
        let unscheduled = Some(vec![PodCondition {
            type_: "PodScheduled".into(),
            status: "False".into(),
            reason: Some("Unschedulable".into()),
            message: Some("0/4 nodes are available".into()),
            ..Default::default()
        }]);
        let w = view(&status("Pending", unscheduled, vec![pulling]));
        assert_eq!(
            w.waiting,
            Some(("Unschedulable".into(), "0/4 nodes are available".into())),
            "scheduling comes first"
        );
        let r = view(&status("Running", None, vec![]));
        assert!(r.is_running() && r.is_live() && r.waiting.is_none());
    }

    #[test]
    fn metadata_keeps_identity_and_our_labels_only() {
        let meta = ObjectMeta {
            name: Some("train-abc".into()),
            namespace: Some("ml".into()),
            uid: Some("u1".into()),
            resource_version: Some("42".into()),
            labels: Some(
                [
                    ("gpupool.dev/aijob".to_string(), "train".to_string()),
                    ("batch.kubernetes.io/job-name".to_string(), "train".to_string()),
                ]
                .into(),
            ),
            annotations: Some([("big".to_string(), "x".repeat(1000))].into()),
            ..Default::default()
        };
        let pod = Pod {
            metadata: meta,
            ..Default::default()
        };
        let m = view(&pod).metadata;
        assert_eq!(
            (m.name.as_deref(), m.namespace.as_deref(), m.uid.as_deref()),
            (Some("train-abc"), Some("ml"), Some("u1"))
        );
        assert_eq!(m.resource_version.as_deref(), Some("42"), "watches resume from it");
        assert_eq!(
            m.labels,
            Some([("gpupool.dev/aijob".to_string(), "train".to_string())].into())
        );
        assert!(m.annotations.is_none());
        assert!(crate::LABEL_AIJOB.starts_with(KEPT_LABEL_PREFIX));
    }

    #[test]
    fn far_smaller_than_a_pod() {
        assert!(
            std::mem::size_of::<PodView>() * 4 < std::mem::size_of::<Pod>(),
            "{} vs {}",
            std::mem::size_of::<PodView>(),
            std::mem::size_of::<Pod>()
        );
    }
}

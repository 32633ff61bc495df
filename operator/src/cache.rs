//! What the operator keeps of cached Pods and Jobs. Caches hold every pod
//! and Job the operator watches, so everything it never reads is dropped on
//! arrival: at thousands of AiJobs, pod specs and Job templates dominate memory.

use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::{Container, Pod, PodSpec, PodStatus};

/// Keeps a pod's identity, labels, node, per-container resources and the
/// status fields that phase and exit-code mirroring read.
pub fn slim_pod(pod: &mut Pod) {
    pod.metadata.managed_fields = None;
    pod.metadata.annotations = None;
    let keep = |c: &Container| Container {
        name: c.name.clone(),
        resources: c.resources.clone(),
        ..Default::default()
    };
    if let Some(spec) = pod.spec.as_mut() {
        *spec = PodSpec {
            node_name: spec.node_name.take(),
            containers: spec.containers.iter().map(keep).collect(),
            init_containers: spec.init_containers.as_ref().map(|v| v.iter().map(keep).collect()),
            ..Default::default()
        };
    }
    if let Some(status) = pod.status.as_mut() {
        *status = PodStatus {
            phase: status.phase.take(),
            conditions: status.conditions.take(),
            container_statuses: status.container_statuses.take(),
            start_time: status.start_time.take(),
            ..Default::default()
        };
    }
}

/// Keeps a Job's metadata (owner references route events to the AiJob) and
/// status; the operator never reads a cached Job's spec.
pub fn slim_job(job: &mut Job) {
    job.metadata.managed_fields = None;
    job.metadata.annotations = None;
    job.spec = None;
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::capacity::{pod_gpus, pod_is_live, tests::pod};
    use crate::jobstatus::observe;
    use k8s_openapi::api::core::v1::{EnvVar, Volume};

    #[test]
    fn slimming_keeps_what_capacity_and_status_read() {
        let mut p = pod(Some("n1"), 4, "Running");
        p.metadata.labels = Some([("gpupool.dev/aijob".to_string(), "train".to_string())].into());
        p.metadata.annotations = Some([("big".to_string(), "x".repeat(1000))].into());
        let spec = p.spec.as_mut().unwrap();
        spec.containers[0].env = Some(vec![EnvVar {
            name: "A".into(),
            value: Some("b".into()),
            ..Default::default()
        }]);
        spec.volumes = Some(vec![Volume {
            name: "data".into(),
            ..Default::default()
        }]);
        let job = Job::default();
        let before = (pod_gpus(&p), pod_is_live(&p), observe(&job, &[&p]));
        let mut slim = p.clone();
        slim_pod(&mut slim);
        assert_eq!((pod_gpus(&slim), pod_is_live(&slim), observe(&job, &[&slim])), before);
        assert_eq!(slim.metadata.labels, p.metadata.labels);
        assert!(slim.metadata.annotations.is_none());
        let s = slim.spec.unwrap();
        assert!(s.volumes.is_none() && s.containers[0].env.is_none());
        assert_eq!(s.node_name.as_deref(), Some("n1"));
    }
}

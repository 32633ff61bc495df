//! What the operator keeps of cached Pods and Jobs. Caches hold every pod
//! and Job the operator watches, so everything it never reads is dropped on
//! arrival: at thousands of AiJobs, pod specs and Job templates dominate memory.

use std::borrow::Cow;
use std::sync::Arc;

use gpupool_crds::{AiJob, AiJobPhase};
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::{Container, Pod, PodSpec, PodStatus, PodTemplateSpec};
use kube::api::Api;
use kube::runtime::reflector::Store;
use kube::runtime::reflector::store::WriterDropped;

use crate::capacity::pod_is_live;

/// The pods the operator counts GPUs from, in two caches that never hold the
/// same pod: its own Jobs' pods in every phase (status mirroring reads exit
/// codes from finished ones), and everyone else's live pods. One cache of all
/// live pods beside the first held each of the operator's running pods twice,
/// at thousands of AiJobs the largest part of its memory after the AiJobs.
#[derive(Clone)]
pub struct PodCaches {
    pub ours: Store<Pod>,
    pub others_live: Store<Pod>,
}

impl PodCaches {
    /// Every live pod on the cluster, what holds GPUs now; None until both
    /// caches have had their first list, when counting would miss pods and
    /// offer GPUs that are taken. The operator's own pods come in through the
    /// controller's watch, so this turns ready only once the controller runs.
    pub fn live(&self) -> Option<Vec<Arc<Pod>>> {
        if !(listed(&self.ours) && listed(&self.others_live)) {
            return None;
        }
        let mut pods = self.others_live.state();
        pods.extend(self.ours.state_filter(pod_is_live));
        Some(pods)
    }

    /// Waits for both caches' first list.
    pub async fn wait_until_ready(&self) -> Result<(), WriterDropped> {
        self.ours.wait_until_ready().await?;
        self.others_live.wait_until_ready().await
    }
}

fn listed(store: &Store<Pod>) -> bool {
    futures::FutureExt::now_or_never(store.wait_until_ready()).is_some_and(|r| r.is_ok())
}

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

/// Drops what no reconcile reads, and the pod template of a job that has
/// started. The template is the largest part of an AiJob; once a job runs,
/// it is read again only when the job must be started anew (its Job was
/// deleted, or its provider failed), and then [`with_template`] fetches it.
/// A status change that sends the job back to bidding arrives as a watch
/// event carrying the whole object, so the cache has the template again by
/// the time the next order goes out.
pub fn slim_aijob(aijob: &mut AiJob) {
    aijob.metadata.managed_fields = None;
    let started = matches!(
        aijob.status.as_ref().and_then(|s| s.phase),
        Some(AiJobPhase::Running | AiJobPhase::Succeeded | AiJobPhase::Failed)
    );
    if started {
        aijob.spec.template = PodTemplateSpec::default();
    }
}

/// Whether [`slim_aijob`] took this cached AiJob's template away: the API
/// server never holds an AiJob without `template.spec` (CEL rule on the
/// CRD), so a missing one can only be the cache's doing.
pub fn template_elided(aijob: &AiJob) -> bool {
    aijob.spec.template.spec.is_none()
}

/// The AiJob with its pod template: the cached object itself, or, when the
/// cache elided the template, the object with the template the API server
/// holds now.
pub async fn with_template<'a>(aijob: &'a AiJob, api: &Api<AiJob>) -> Result<Cow<'a, AiJob>, kube::Error> {
    if !template_elided(aijob) {
        return Ok(Cow::Borrowed(aijob));
    }
    let fresh = api.get(&kube::ResourceExt::name_any(aijob)).await?;
    let mut full = aijob.clone();
    full.spec.template = fresh.spec.template;
    Ok(Cow::Owned(full))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::capacity::{pod_gpus, pod_is_live, tests::pod};
    use crate::jobstatus::observe;
    use k8s_openapi::api::core::v1::{EnvVar, Volume};

    fn store(pods: Vec<Pod>, listed: bool) -> Store<Pod> {
        use kube::runtime::watcher::Event;
        let mut w = kube::runtime::reflector::store::Writer::<Pod>::default();
        w.apply_watcher_event(&Event::Init);
        for p in pods {
            w.apply_watcher_event(&Event::InitApply(p));
        }
        if listed {
            w.apply_watcher_event(&Event::InitDone);
        }
        // The reader keeps the store; the writer would only feed it more.
        w.as_reader()
    }

    fn named(mut p: Pod, name: &str) -> Pod {
        p.metadata.name = Some(name.into());
        p.metadata.namespace = Some("ns".into());
        p
    }

    #[test]
    fn live_pods_are_ours_still_running_and_everyone_elses() {
        let ours = vec![
            named(pod(Some("n1"), 2, "Running"), "ours-running"),
            named(pod(Some("n1"), 4, "Succeeded"), "ours-done"),
        ];
        let theirs = vec![named(pod(Some("n2"), 1, "Pending"), "theirs")];
        let caches = PodCaches {
            ours: store(ours.clone(), true),
            others_live: store(theirs.clone(), true),
        };
        let mut live: Vec<String> = caches
            .live()
            .unwrap()
            .iter()
            .filter_map(|p| p.metadata.name.clone())
            .collect();
        live.sort();
        assert_eq!(live, ["ours-running", "theirs"]);

        // Until the controller's own watch has listed, nothing is counted.
        let starting = PodCaches {
            ours: store(ours, false),
            others_live: store(theirs, true),
        };
        assert!(starting.live().is_none());
    }

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

    #[test]
    fn started_jobs_lose_their_template_and_nothing_else() {
        use gpupool_crds::AiJobStatus;
        let with_phase = |phase: Option<AiJobPhase>| {
            let mut j = crate::jobbuild::tests::aijob();
            j.status = phase.map(|p| AiJobStatus {
                phase: Some(p),
                ..Default::default()
            });
            j
        };
        for phase in [
            None,
            Some(AiJobPhase::Pending),
            Some(AiJobPhase::Bidding),
            Some(AiJobPhase::Leased),
        ] {
            let j = with_phase(phase);
            let mut slim = j.clone();
            slim_aijob(&mut slim);
            let json = |j: &AiJob| serde_json::to_value(j).unwrap();
            assert_eq!(
                json(&slim),
                json(&j),
                "{phase:?}: a job still to be placed keeps its template"
            );
            assert!(!template_elided(&slim));
        }
        for phase in [AiJobPhase::Running, AiJobPhase::Succeeded, AiJobPhase::Failed] {
            let j = with_phase(Some(phase));
            let mut slim = j.clone();
            slim_aijob(&mut slim);
            assert!(template_elided(&slim), "{phase:?}");
            assert_eq!(
                (&slim.spec.gpus, &slim.status, &slim.metadata),
                (&j.spec.gpus, &j.status, &j.metadata)
            );
        }
    }
}

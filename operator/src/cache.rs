//! What the operator keeps of cached Pods and Jobs. Caches hold every pod
//! and Job the operator watches, so they hold views read straight from the
//! API server's JSON with only what the operator decides on: at thousands of
//! AiJobs, full Pod and Job structs (the specs are inline, over 2 KB each
//! before any field is set) were most of its memory after the AiJobs.

use std::borrow::Cow;
use std::sync::Arc;

use gpupool_crds::pods::PodView;
use gpupool_crds::{AiJob, AiJobPhase};
use k8s_openapi::api::batch::v1::JobStatus;
use k8s_openapi::api::core::v1::PodTemplateSpec;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use k8s_openapi::{Metadata, NamespaceResourceScope, Resource};
use kube::api::Api;
use kube::runtime::reflector::{ObjectRef, Store};
use serde::Deserialize;

use crate::listed::{Listed, WatchStopped};
use crate::pod_index::PodIndex;

/// The pods the operator counts GPUs from, in two caches that never hold the
/// same pod: its own Jobs' pods in every phase (status mirroring reads exit
/// codes from finished ones), and everyone else's live pods. One cache of all
/// live pods beside the first held each of the operator's running pods twice,
/// at thousands of AiJobs the largest part of its memory after the AiJobs.
#[derive(Clone)]
pub struct PodCaches {
    pub ours: Store<PodView>,
    pub others_live: Store<PodView>,
    /// `ours` by AiJob, fed by the same watch.
    pub by_aijob: PodIndex,
    /// Whether each cache has had its first list (see `listed`).
    pub ours_listed: Listed,
    pub others_listed: Listed,
}

impl PodCaches {
    /// The cached pods of AiJob `ns/aijob`.
    pub fn of_aijob(&self, ns: &str, aijob: &str) -> Vec<Arc<PodView>> {
        self.by_aijob
            .pods_of(ns, aijob)
            .iter()
            .filter_map(|name| self.ours.get(&ObjectRef::new(name).within(ns)))
            .collect()
    }

    /// Every live pod on the cluster, what holds GPUs now; None until both
    /// caches have had their first list, when counting would miss pods and
    /// offer GPUs that are taken. The operator's own pods come in through the
    /// controller's watch, so this turns ready only once the controller runs.
    pub fn live(&self) -> Option<Vec<Arc<PodView>>> {
        if !(self.ours_listed.is_listed() && self.others_listed.is_listed()) {
            return None;
        }
        let mut pods = self.others_live.state();
        pods.extend(self.ours.state_filter(PodView::is_live));
        Some(pods)
    }

    /// Waits for both caches' first list.
    pub async fn wait_until_ready(&self) -> Result<(), WatchStopped> {
        self.ours_listed.wait().await?;
        self.others_listed.wait().await
    }
}

/// One of the operator's Jobs: its identity, its owner (events route to the
/// AiJob through it) and its status. The operator never reads a cached Job's
/// spec, and `JobSpec` alone is 2 KB inline.
#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
#[serde(from = "JobWire")]
pub struct JobView {
    pub metadata: ObjectMeta,
    pub status: Option<JobStatus>,
}

/// A Job in the API server's JSON, reduced to what [`JobView`] keeps.
#[derive(Deserialize)]
struct JobWire {
    #[serde(default)]
    metadata: ObjectMeta,
    status: Option<JobStatus>,
}

impl From<JobWire> for JobView {
    fn from(j: JobWire) -> Self {
        let mut meta = j.metadata;
        let owner_references = meta.owner_references.take();
        JobView {
            metadata: ObjectMeta {
                owner_references,
                ..gpupool_crds::pods::identity(meta)
            },
            status: j.status,
        }
    }
}

impl Resource for JobView {
    const API_VERSION: &'static str = "batch/v1";
    const GROUP: &'static str = "batch";
    const KIND: &'static str = "Job";
    const VERSION: &'static str = "v1";
    const URL_PATH_SEGMENT: &'static str = "jobs";
    type Scope = NamespaceResourceScope;
}

impl Metadata for JobView {
    type Ty = ObjectMeta;

    fn metadata(&self) -> &ObjectMeta {
        &self.metadata
    }

    fn metadata_mut(&mut self) -> &mut ObjectMeta {
        &mut self.metadata
    }
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
    use crate::capacity::tests::pod;
    use k8s_openapi::api::batch::v1::{Job, JobCondition, JobSpec};
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference;

    fn gate(listed: bool) -> Listed {
        let g = Listed::default();
        if listed {
            g.mark();
        }
        g
    }

    fn store(pods: Vec<PodView>, listed: bool) -> Store<PodView> {
        use kube::runtime::watcher::Event;
        let mut w = kube::runtime::reflector::store::Writer::<PodView>::default();
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

    fn named(mut p: PodView, name: &str) -> PodView {
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
            by_aijob: PodIndex::default(),
            ours_listed: gate(true),
            others_listed: gate(true),
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
            by_aijob: PodIndex::default(),
            ours_listed: gate(false),
            others_listed: gate(true),
        };
        assert!(starting.live().is_none());
    }

    #[test]
    fn a_job_view_keeps_owner_and_status_and_drops_the_spec() {
        let owner = OwnerReference {
            api_version: "gpupool.dev/v1alpha1".into(),
            kind: "AiJob".into(),
            name: "train".into(),
            uid: "u1".into(),
            controller: Some(true),
            ..Default::default()
        };
        let job = Job {
            metadata: ObjectMeta {
                name: Some("train".into()),
                namespace: Some("ml".into()),
                resource_version: Some("7".into()),
                owner_references: Some(vec![owner.clone()]),
                annotations: Some([("big".to_string(), "x".repeat(1000))].into()),
                ..Default::default()
            },
            spec: Some(JobSpec {
                template: crate::jobbuild::tests::aijob().spec.template,
                ..Default::default()
            }),
            status: Some(JobStatus {
                conditions: Some(vec![JobCondition {
                    type_: "Complete".into(),
                    status: "True".into(),
                    ..Default::default()
                }]),
                ..Default::default()
            }),
        };
        let v: JobView = serde_json::from_value(serde_json::to_value(&job).unwrap()).unwrap();
        assert_eq!(v.metadata.owner_references, Some(vec![owner]));
        assert_eq!(v.metadata.resource_version.as_deref(), Some("7"));
        assert!(v.metadata.annotations.is_none());
        assert_eq!(v.status, job.status);
        assert!(std::mem::size_of::<JobView>() * 3 < std::mem::size_of::<Job>());
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

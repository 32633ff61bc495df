//! What the Job and its pod say about a locally placed AiJob.

use gpupool_crds::AiJobPhase;
use gpupool_crds::pods::PodView;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;

use crate::cache::JobView;

/// The AiJob-level view of a Job.
#[derive(Clone, Debug, PartialEq)]
pub struct Observation {
    pub phase: AiJobPhase,
    /// CamelCase reason for the phase.
    pub reason: String,
    /// A sentence for people.
    pub message: String,
    pub node: Option<String>,
    pub exit_code: Option<i32>,
    pub start_time: Option<Time>,
    pub completion_time: Option<Time>,
}

fn job_condition<'a>(job: &'a JobView, type_: &str) -> Option<&'a k8s_openapi::api::batch::v1::JobCondition> {
    job.status
        .as_ref()?
        .conditions
        .as_ref()?
        .iter()
        .find(|c| c.type_ == type_ && c.status == "True")
}

/// Maps a Job and its pods (newest first is not required) to a phase.
pub fn observe(job: &JobView, pods: &[&PodView]) -> Observation {
    let status = job.status.clone().unwrap_or_default();
    let ended_pod = pods.iter().find(|p| p.exit_code.is_some());
    let running_pod = pods.iter().find(|p| p.is_running());
    let node_of = |p: &PodView| p.node_name.clone();
    let base = Observation {
        phase: AiJobPhase::Pending,
        reason: String::new(),
        message: String::new(),
        node: running_pod.or(ended_pod).or(pods.first()).and_then(|p| node_of(p)),
        exit_code: ended_pod.and_then(|p| p.exit_code),
        start_time: status.start_time.clone(),
        completion_time: None,
    };
    if let Some(done) = job_condition(job, "Complete") {
        return Observation {
            phase: AiJobPhase::Succeeded,
            reason: "Completed".into(),
            message: "the workload finished successfully".into(),
            completion_time: status.completion_time.clone().or(done.last_transition_time.clone()),
            ..base
        };
    }
    if let Some(failed) = job_condition(job, "Failed") {
        let why = failed.reason.clone().unwrap_or_else(|| "Failed".into());
        let detail = failed.message.clone().unwrap_or_default();
        let code = base.exit_code.map(|c| format!(" (exit code {c})")).unwrap_or_default();
        return Observation {
            phase: AiJobPhase::Failed,
            message: format!(
                "the workload failed{code}: {why}{}",
                if detail.is_empty() {
                    String::new()
                } else {
                    format!(": {detail}")
                }
            ),
            reason: why,
            completion_time: failed.last_transition_time.clone(),
            ..base
        };
    }
    if let Some(p) = running_pod {
        return Observation {
            phase: AiJobPhase::Running,
            reason: "PodRunning".into(),
            message: format!(
                "pod {} is running on node {}",
                p.metadata.name.clone().unwrap_or_default(),
                node_of(p).unwrap_or_default()
            ),
            ..base
        };
    }
    // The pod ended but the Job controller has not ruled yet: the workload is
    // over, so it is no longer Pending, and success is the Job's call.
    if let Some(p) = ended_pod {
        return Observation {
            phase: AiJobPhase::Running,
            reason: "PodFinished".into(),
            message: format!(
                "pod {} ended with exit code {}; waiting for the Job to record the outcome",
                p.metadata.name.clone().unwrap_or_default(),
                base.exit_code.unwrap_or_default()
            ),
            ..base
        };
    }
    // Still starting: say what the pod waits for, if anything says so.
    let waiting = pods.iter().find_map(|p| p.waiting.clone());
    match waiting {
        Some((reason, message)) => Observation {
            message: format!(
                "the pod is waiting: {reason}{}",
                if message.is_empty() {
                    String::new()
                } else {
                    format!(": {message}")
                }
            ),
            reason,
            ..base
        },
        None => Observation {
            reason: "PodStarting".into(),
            message: if pods.is_empty() {
                "the Job was created; waiting for its pod".into()
            } else {
                "the pod is starting".into()
            },
            ..base
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::batch::v1::{JobCondition, JobStatus};
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

    fn job(cond: Option<(&str, &str)>) -> JobView {
        JobView {
            status: Some(JobStatus {
                conditions: cond.map(|(t, r)| {
                    vec![JobCondition {
                        type_: t.into(),
                        status: "True".into(),
                        reason: Some(r.into()),
                        ..Default::default()
                    }]
                }),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    fn pod(phase: &str, exit: Option<i32>, unschedulable: bool) -> PodView {
        PodView {
            metadata: ObjectMeta {
                name: Some("p".into()),
                ..Default::default()
            },
            node_name: Some("n1".into()),
            gpus: 1,
            phase: Some(phase.into()),
            exit_code: exit,
            waiting: unschedulable.then(|| ("Unschedulable".into(), "0/4 nodes are available".into())),
        }
    }

    #[test]
    fn phases_follow_job_and_pod() {
        assert_eq!(observe(&job(None), &[]).phase, AiJobPhase::Pending);
        let running = pod("Running", None, false);
        let o = observe(&job(None), &[&running]);
        assert_eq!((o.phase, o.node.as_deref()), (AiJobPhase::Running, Some("n1")));
        let ok = pod("Succeeded", Some(0), false);
        let o = observe(&job(Some(("Complete", "CompletionsReached"))), &[&ok]);
        assert_eq!((o.phase, o.exit_code), (AiJobPhase::Succeeded, Some(0)));
        let o = observe(&job(None), &[&ok]);
        assert_eq!(
            (o.phase, o.reason.as_str()),
            (AiJobPhase::Running, "PodFinished"),
            "never back to Pending"
        );
        let bad = pod("Failed", Some(3), false);
        let o = observe(&job(Some(("Failed", "BackoffLimitExceeded"))), &[&bad]);
        assert_eq!(
            (o.phase, o.exit_code, o.reason.as_str()),
            (AiJobPhase::Failed, Some(3), "BackoffLimitExceeded")
        );
        assert!(o.message.contains("exit code 3"), "{}", o.message);
    }

    #[test]
    fn unschedulable_pod_says_why() {
        let p = pod("Pending", None, true);
        let o = observe(&job(None), &[&p]);
        assert_eq!(o.phase, AiJobPhase::Pending);
        assert_eq!(o.reason, "Unschedulable");
        assert!(o.message.contains("0/4 nodes are available"));
    }
}

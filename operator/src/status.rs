//! The AiJob status a reconcile wants, and the Events that mark its changes.
//! Pure: it compares the old status with what was just observed.

use gpupool_crds::conditions::{ConditionUpdate, find, set_condition};
use gpupool_crds::{AiJobPhase, AiJobStatus, RunsOn};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;

use crate::jobstatus::Observation;
use crate::market::renter_io::RemoteOutcome;

pub const COND_ACCEPTED: &str = "Accepted";
pub const COND_PLACED: &str = "Placed";
pub const COND_RUNNING: &str = "Running";
pub const COND_COMPLETE: &str = "Complete";
pub const COND_FAILED: &str = "Failed";

/// What the reconcile found out this time.
#[derive(Clone, Debug, PartialEq)]
#[allow(clippy::large_enum_variant)] // built once per reconcile, never stored
pub enum Outcome {
    /// The spec passed the API server but cannot be acted on.
    Invalid { message: String },
    /// No Job, and none may be created yet.
    Waiting { reason: &'static str, message: String },
    /// A Job runs the workload here; this is what it says.
    Local {
        runs_on: RunsOn,
        observed: Observation,
        created_now: bool,
    },
    /// The Job was placed before but is gone, and the job had not ended.
    JobLost { job: String },
    /// The job is ordered, leased or running in another organisation.
    Remote(RemoteOutcome),
}

/// A Kubernetes Event to publish about the AiJob.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PlannedEvent {
    pub warning: bool,
    pub reason: String,
    pub action: &'static str,
    pub note: String,
}

/// Whether the outcome would take a running job's status back: its pod gone
/// and the Job starting again, or the Job itself gone. Both are true stories
/// in a live namespace (an evicted pod, a Job deleted by hand), but a
/// namespace being deleted removes pods and Jobs before the AiJobs in it, and
/// there they are only the deletion's order. The caller asks the namespace
/// before it believes them.
pub fn goes_back(old: &AiJobStatus, outcome: &Outcome) -> bool {
    match outcome {
        Outcome::JobLost { .. } => true,
        Outcome::Local { observed, .. } => {
            old.phase == Some(AiJobPhase::Running) && observed.phase == AiJobPhase::Pending
        }
        _ => false,
    }
}

/// Computes the next status and the Events for what changed.
pub fn plan(
    old: &AiJobStatus,
    generation: Option<i64>,
    outcome: &Outcome,
    now: Timestamp,
) -> (AiJobStatus, Vec<PlannedEvent>) {
    let mut s = old.clone();
    s.observed_generation = generation;
    let mut events = Vec::new();
    let set = |s: &mut AiJobStatus, c: ConditionUpdate| set_condition(&mut s.conditions, &c, generation, now);

    match outcome {
        Outcome::Invalid { message } => {
            set(
                &mut s,
                ConditionUpdate::new(COND_ACCEPTED, false, "InvalidSpec", message.clone()),
            );
            set(
                &mut s,
                ConditionUpdate::new(COND_FAILED, true, "InvalidSpec", message.clone()),
            );
            s.phase = Some(AiJobPhase::Failed);
            s.message = Some(message.clone());
        }
        Outcome::Waiting { reason, message } => {
            set(
                &mut s,
                ConditionUpdate::new(COND_ACCEPTED, true, "Validated", "the spec is valid"),
            );
            let previous_reason = find(&old.conditions, COND_PLACED).map(|c| c.reason.clone());
            if previous_reason.as_deref() != Some(*reason) {
                events.push(PlannedEvent {
                    warning: false,
                    reason: (*reason).into(),
                    action: "Place",
                    note: message.clone(),
                });
            }
            set(
                &mut s,
                ConditionUpdate::new(COND_PLACED, false, reason, message.clone()),
            );
            s.phase = Some(AiJobPhase::Pending);
            s.message = Some(message.clone());
        }
        Outcome::Local {
            runs_on,
            observed,
            created_now,
        } => {
            set(
                &mut s,
                ConditionUpdate::new(COND_ACCEPTED, true, "Validated", "the spec is valid"),
            );
            let placed_msg = format!("runs in this cluster as Job {}/{}", runs_on.namespace, runs_on.job);
            if *created_now {
                events.push(PlannedEvent {
                    warning: false,
                    reason: "JobCreated".into(),
                    action: "Place",
                    note: placed_msg.clone(),
                });
            }
            set(
                &mut s,
                ConditionUpdate::new(COND_PLACED, true, "PlacedLocally", placed_msg),
            );
            s.runs_on = Some(runs_on.clone());
            if old.phase != Some(observed.phase) {
                let (warning, reason) = match observed.phase {
                    AiJobPhase::Running => (false, "Started"),
                    AiJobPhase::Succeeded => (false, "Succeeded"),
                    AiJobPhase::Failed => (true, "Failed"),
                    _ => (false, "Pending"),
                };
                if !(observed.phase == AiJobPhase::Pending && *created_now) {
                    events.push(PlannedEvent {
                        warning,
                        reason: reason.into(),
                        action: "Run",
                        note: observed.message.clone(),
                    });
                }
            }
            let running = observed.phase == AiJobPhase::Running;
            set(
                &mut s,
                ConditionUpdate::new(COND_RUNNING, running, &observed.reason, observed.message.clone()),
            );
            if observed.phase == AiJobPhase::Succeeded {
                set(
                    &mut s,
                    ConditionUpdate::new(COND_COMPLETE, true, &observed.reason, observed.message.clone()),
                );
            }
            if observed.phase == AiJobPhase::Failed {
                set(
                    &mut s,
                    ConditionUpdate::new(COND_FAILED, true, &observed.reason, observed.message.clone()),
                );
            }
            s.phase = Some(observed.phase);
            s.message = (!running && observed.phase != AiJobPhase::Succeeded).then(|| observed.message.clone());
            s.exit_code = observed.exit_code.or(old.exit_code);
            // Recorded with the first status that says the workload runs (or
            // ran): the Job's start time lands a moment after the Job is
            // created, and taking it then was a status write of its own per
            // job, between two others, that told nobody anything.
            s.start_time = old.start_time.clone().or_else(|| {
                (running || observed.phase.is_terminal()).then(|| observed.start_time.clone().unwrap_or(Time(now)))
            });
            s.completion_time = observed.completion_time.clone().or_else(|| old.completion_time.clone());
            if observed.phase.is_terminal() && s.completion_time.is_none() {
                s.completion_time = Some(Time(now));
            }
        }
        Outcome::JobLost { job } => {
            let message = format!(
                "Job {job} was deleted by someone other than gpupool before it finished; the AiJob is not re-run so the workload never runs twice. Re-create the AiJob to run it again."
            );
            set(
                &mut s,
                ConditionUpdate::new(COND_RUNNING, false, "JobDeleted", message.clone()),
            );
            set(
                &mut s,
                ConditionUpdate::new(COND_FAILED, true, "JobDeleted", message.clone()),
            );
            if old.phase != Some(AiJobPhase::Failed) {
                events.push(PlannedEvent {
                    warning: true,
                    reason: "JobDeleted".into(),
                    action: "Run",
                    note: message.clone(),
                });
            }
            s.phase = Some(AiJobPhase::Failed);
            s.message = Some(message);
        }
        Outcome::Remote(r) => {
            set(
                &mut s,
                ConditionUpdate::new(COND_ACCEPTED, true, "Validated", "the spec is valid"),
            );
            set(
                &mut s,
                ConditionUpdate::new(COND_PLACED, r.placed, r.reason, r.message.clone()),
            );
            for (warning, reason, note) in &r.events {
                events.push(PlannedEvent {
                    warning: *warning,
                    reason: (*reason).into(),
                    action: "Place",
                    note: note.clone(),
                });
            }
            if old.phase != Some(r.phase) {
                let transition = match r.phase {
                    AiJobPhase::Running => Some((false, "Started")),
                    AiJobPhase::Succeeded => Some((false, "Succeeded")),
                    AiJobPhase::Failed => Some((true, "Failed")),
                    _ => None,
                };
                if let Some((warning, reason)) = transition {
                    events.push(PlannedEvent {
                        warning,
                        reason: reason.into(),
                        action: "Run",
                        note: r.message.clone(),
                    });
                }
            }
            let running = r.phase == AiJobPhase::Running;
            set(
                &mut s,
                ConditionUpdate::new(COND_RUNNING, running, r.reason, r.message.clone()),
            );
            if r.phase == AiJobPhase::Succeeded {
                set(
                    &mut s,
                    ConditionUpdate::new(COND_COMPLETE, true, r.reason, r.message.clone()),
                );
            }
            if r.phase == AiJobPhase::Failed {
                set(
                    &mut s,
                    ConditionUpdate::new(COND_FAILED, true, r.reason, r.message.clone()),
                );
            }
            if running && s.start_time.is_none() {
                s.start_time = Some(Time(now));
            }
            if r.phase.is_terminal() && s.completion_time.is_none() {
                s.completion_time = Some(Time(now));
            }
            s.phase = Some(r.phase);
            s.message = Some(r.message.clone());
            s.order = Some(r.order.clone());
            s.lease = r.lease.clone();
            s.runs_on = r
                .runs_on
                .clone()
                .or_else(|| old.runs_on.clone().filter(|_| r.lease.is_some()));
            s.exit_code = r.exit_code.or(old.exit_code);
            s.cost_so_far = r.cost.clone().or_else(|| old.cost_so_far.clone());
        }
    }
    (s, events)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(s: &str) -> Timestamp {
        format!("2026-06-01T12:00:{s}Z").parse().unwrap()
    }

    fn runs_on() -> RunsOn {
        RunsOn {
            org: "acme".into(),
            namespace: "ml".into(),
            job: "train".into(),
            ..Default::default()
        }
    }

    fn obs(phase: AiJobPhase, reason: &str) -> Observation {
        Observation {
            phase,
            reason: reason.into(),
            message: format!("{reason} message"),
            node: None,
            exit_code: None,
            start_time: None,
            completion_time: None,
        }
    }

    #[test]
    fn only_a_running_job_losing_its_pod_or_its_job_goes_back() {
        let running = AiJobStatus {
            phase: Some(AiJobPhase::Running),
            ..Default::default()
        };
        let pending = AiJobStatus {
            phase: Some(AiJobPhase::Pending),
            ..Default::default()
        };
        let local = |phase| Outcome::Local {
            runs_on: runs_on(),
            observed: obs(phase, "PodStarting"),
            created_now: false,
        };
        let lost = Outcome::JobLost { job: "ml/train".into() };
        assert!(goes_back(&running, &local(AiJobPhase::Pending)));
        assert!(goes_back(&running, &lost));
        assert!(goes_back(&pending, &lost), "a lost Job is always worth a second look");
        assert!(!goes_back(&pending, &local(AiJobPhase::Pending)), "still starting");
        assert!(!goes_back(&pending, &local(AiJobPhase::Running)));
        assert!(!goes_back(&running, &local(AiJobPhase::Running)));
        assert!(!goes_back(&running, &local(AiJobPhase::Succeeded)));
        let waiting = Outcome::Waiting {
            reason: "InsufficientFreeGpus",
            message: "waiting".into(),
        };
        assert!(!goes_back(&running, &waiting));
    }

    #[test]
    fn waiting_emits_one_event_per_reason() {
        let w = Outcome::Waiting {
            reason: "InsufficientFreeGpus",
            message: "waiting for 8×H100".into(),
        };
        let (s1, e1) = plan(&AiJobStatus::default(), Some(1), &w, t("00"));
        assert_eq!(s1.phase, Some(AiJobPhase::Pending));
        assert_eq!(e1.len(), 1);
        assert_eq!(
            find(&s1.conditions, COND_PLACED).unwrap().reason,
            "InsufficientFreeGpus"
        );
        let w2 = Outcome::Waiting {
            reason: "InsufficientFreeGpus",
            message: "waiting for 8×H100; 3 free".into(),
        };
        let (s2, e2) = plan(&s1, Some(1), &w2, t("05"));
        assert!(e2.is_empty());
        assert_eq!(s2.message.as_deref(), Some("waiting for 8×H100; 3 free"));
    }

    #[test]
    fn the_start_time_comes_with_the_first_running_status() {
        let mut pending = obs(AiJobPhase::Pending, "PodStarting");
        pending.start_time = Some(Time(t("01")));
        let local = |observed| Outcome::Local {
            runs_on: runs_on(),
            observed,
            created_now: false,
        };
        let (s1, _) = plan(
            &AiJobStatus::default(),
            Some(1),
            &local(obs(AiJobPhase::Pending, "PodStarting")),
            t("00"),
        );
        // The Job's start time alone changes nothing while the pod starts.
        let (s2, _) = plan(&s1, Some(1), &local(pending.clone()), t("01"));
        assert_eq!(s2, s1);
        let mut running = obs(AiJobPhase::Running, "PodRunning");
        running.start_time = Some(Time(t("01")));
        let (s3, _) = plan(&s2, Some(1), &local(running), t("03"));
        assert_eq!(s3.start_time, Some(Time(t("01"))), "the Job's own start time");
        // Kept from then on; a job seen only once it ended gets the time it was seen.
        let (s4, _) = plan(&s3, Some(1), &local(obs(AiJobPhase::Succeeded, "Completed")), t("09"));
        assert_eq!(s4.start_time, Some(Time(t("01"))));
        let (s5, _) = plan(&s1, Some(1), &local(obs(AiJobPhase::Succeeded, "Completed")), t("09"));
        assert_eq!(s5.start_time, Some(Time(t("09"))));
    }

    #[test]
    fn local_lifecycle_conditions_and_events() {
        let created = Outcome::Local {
            runs_on: runs_on(),
            observed: obs(AiJobPhase::Pending, "PodStarting"),
            created_now: true,
        };
        let (s1, e1) = plan(&AiJobStatus::default(), Some(1), &created, t("00"));
        assert_eq!(e1.iter().map(|e| e.reason.as_str()).collect::<Vec<_>>(), ["JobCreated"]);
        assert_eq!(find(&s1.conditions, COND_PLACED).unwrap().status, "True");

        let running = Outcome::Local {
            runs_on: runs_on(),
            observed: obs(AiJobPhase::Running, "PodRunning"),
            created_now: false,
        };
        let (s2, e2) = plan(&s1, Some(1), &running, t("01"));
        assert_eq!(e2[0].reason, "Started");
        assert_eq!(find(&s2.conditions, COND_RUNNING).unwrap().status, "True");
        assert_eq!(s2.message, None);

        let (s2b, e2b) = plan(&s2, Some(1), &running, t("02"));
        assert!(e2b.is_empty());
        assert_eq!(s2b, s2, "a repeated reconcile changes nothing");

        let mut done = obs(AiJobPhase::Succeeded, "Completed");
        done.exit_code = Some(0);
        let (s3, e3) = plan(
            &s2,
            Some(1),
            &Outcome::Local {
                runs_on: runs_on(),
                observed: done,
                created_now: false,
            },
            t("03"),
        );
        assert_eq!((s3.phase, s3.exit_code), (Some(AiJobPhase::Succeeded), Some(0)));
        assert_eq!(find(&s3.conditions, COND_RUNNING).unwrap().status, "False");
        assert_eq!(find(&s3.conditions, COND_COMPLETE).unwrap().status, "True");
        assert!(s3.completion_time.is_some());
        assert_eq!(e3[0].reason, "Succeeded");
    }

    #[test]
    fn failure_is_a_warning() {
        let mut f = obs(AiJobPhase::Failed, "BackoffLimitExceeded");
        f.exit_code = Some(2);
        let (s, e) = plan(
            &AiJobStatus::default(),
            None,
            &Outcome::Local {
                runs_on: runs_on(),
                observed: f,
                created_now: false,
            },
            t("00"),
        );
        assert!(e[0].warning);
        assert_eq!(s.exit_code, Some(2));
        assert_eq!(find(&s.conditions, COND_FAILED).unwrap().reason, "BackoffLimitExceeded");
    }

    #[test]
    fn invalid_and_lost() {
        let (s, _) = plan(
            &AiJobStatus::default(),
            None,
            &Outcome::Invalid { message: "bad".into() },
            t("00"),
        );
        assert_eq!(s.phase, Some(AiJobPhase::Failed));
        assert_eq!(find(&s.conditions, COND_ACCEPTED).unwrap().status, "False");
        let (s, e) = plan(
            &AiJobStatus::default(),
            None,
            &Outcome::JobLost { job: "x".into() },
            t("00"),
        );
        assert_eq!(s.phase, Some(AiJobPhase::Failed));
        assert!(e[0].warning);
    }
}

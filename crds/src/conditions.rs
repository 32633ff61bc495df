//! Kubernetes-style status conditions, shared by every resource's status.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use k8s_openapi::jiff::Timestamp;

/// One condition as a reconciler decides it, before timestamps are applied.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConditionUpdate {
    pub type_: &'static str,
    pub status: bool,
    pub reason: String,
    pub message: String,
}

impl ConditionUpdate {
    pub fn new(type_: &'static str, status: bool, reason: &str, message: impl Into<String>) -> Self {
        Self {
            type_,
            status,
            reason: reason.to_string(),
            message: message.into(),
        }
    }
}

/// Sets a condition in place. The transition time only moves when the status
/// flips, as `kubectl wait` and dashboards expect; reason and message always
/// follow the latest decision.
pub fn set_condition(
    conditions: &mut Vec<Condition>,
    update: &ConditionUpdate,
    generation: Option<i64>,
    now: Timestamp,
) {
    let status = if update.status { "True" } else { "False" };
    if let Some(existing) = conditions.iter_mut().find(|c| c.type_ == update.type_) {
        if existing.status != status {
            existing.last_transition_time = Time(now);
        }
        existing.status = status.to_string();
        existing.reason.clone_from(&update.reason);
        existing.message.clone_from(&update.message);
        existing.observed_generation = generation;
    } else {
        conditions.push(Condition {
            type_: update.type_.to_string(),
            status: status.to_string(),
            reason: update.reason.clone(),
            message: update.message.clone(),
            observed_generation: generation,
            last_transition_time: Time(now),
        });
    }
}

/// Finds a condition by type.
pub fn find<'a>(conditions: &'a [Condition], type_: &str) -> Option<&'a Condition> {
    conditions.iter().find(|c| c.type_ == type_)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transition_time_moves_only_on_flip() {
        let t0: Timestamp = "2026-01-01T00:00:00Z".parse().unwrap();
        let t1: Timestamp = "2026-01-01T00:01:00Z".parse().unwrap();
        let t2: Timestamp = "2026-01-01T00:02:00Z".parse().unwrap();
        let mut c = Vec::new();
        set_condition(
            &mut c,
            &ConditionUpdate::new("Ready", false, "Waiting", "a"),
            Some(1),
            t0,
        );
        set_condition(
            &mut c,
            &ConditionUpdate::new("Ready", false, "StillWaiting", "b"),
            Some(2),
            t1,
        );
        assert_eq!(c.len(), 1);
        assert_eq!(c[0].last_transition_time.0, t0);
        assert_eq!(c[0].reason, "StillWaiting");
        assert_eq!(c[0].observed_generation, Some(2));
        set_condition(&mut c, &ConditionUpdate::new("Ready", true, "Done", "c"), Some(2), t2);
        assert_eq!(c[0].last_transition_time.0, t2);
        assert_eq!(find(&c, "Ready").unwrap().status, "True");
        assert!(find(&c, "Other").is_none());
    }
}

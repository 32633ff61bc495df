//! Turns readings into the GpuNode status and Node labels, and decides when a
//! write is worth it. Pure, so the mapping is tested without NVML or a server.

use std::collections::BTreeMap;

use gpupool_crds::conditions::{ConditionUpdate, set_condition};
use gpupool_crds::{
    GpuHealth, GpuNodeStatus, LABEL_GPU_COUNT, LABEL_GPU_MEMORY_MIB, LABEL_GPU_PRODUCT, product_label_value,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;

use crate::source::{Reading, SourceError};

pub const COND_DRIVER_READY: &str = "DriverReady";

/// The status for a good reading. `allocated` is GPUs claimed by pods on the node.
pub fn status_from_reading(
    backend: &str,
    reading: &Reading,
    allocated: u32,
    previous: Option<&GpuNodeStatus>,
    now: Timestamp,
) -> GpuNodeStatus {
    let healthy = reading.gpus.iter().filter(|g| g.health == GpuHealth::Healthy).count() as i32;
    let mut conditions = previous.map(|p| p.conditions.clone()).unwrap_or_default();
    let message = format!("read {} GPU(s) through {backend}", reading.gpus.len());
    set_condition(
        &mut conditions,
        &ConditionUpdate::new(COND_DRIVER_READY, true, "GpusRead", message),
        None,
        now,
    );
    GpuNodeStatus {
        backend: Some(backend.to_string()),
        product: reading.gpus.first().map(|g| g.product.clone()),
        gpus_total: reading.gpus.len() as i32,
        gpus_healthy: healthy,
        gpus_free: (healthy - allocated as i32).max(0),
        gpus: reading.gpus.clone(),
        driver_version: reading.driver_version.clone(),
        cuda_version: reading.cuda_version.clone(),
        conditions,
        last_heartbeat: Some(Time(now)),
    }
}

/// The status when the GPUs cannot be read: no GPUs are offered, and the
/// condition says why in words an admin can act on.
pub fn status_from_error(
    backend: &str,
    err: &SourceError,
    previous: Option<&GpuNodeStatus>,
    now: Timestamp,
) -> GpuNodeStatus {
    let reason = match err {
        SourceError::DriverUnavailable(_) => "DriverUnavailable",
        SourceError::NoGpus => "NoGpus",
        SourceError::Device { .. } => "DeviceQueryFailed",
        SourceError::Inventory(_) => "InventoryUnreadable",
    };
    let mut conditions = previous.map(|p| p.conditions.clone()).unwrap_or_default();
    set_condition(
        &mut conditions,
        &ConditionUpdate::new(COND_DRIVER_READY, false, reason, err.to_string()),
        None,
        now,
    );
    GpuNodeStatus {
        backend: Some(backend.to_string()),
        conditions,
        last_heartbeat: Some(Time(now)),
        ..Default::default()
    }
}

/// Labels for the Node, so pods select GPUs by product and memory.
/// Mixed nodes are labelled by their first GPU, as GPU feature discovery does.
pub fn node_labels(reading: &Reading) -> BTreeMap<String, String> {
    let mut labels = BTreeMap::new();
    if let Some(first) = reading.gpus.first() {
        labels.insert(LABEL_GPU_PRODUCT.to_string(), product_label_value(&first.product));
        labels.insert(LABEL_GPU_MEMORY_MIB.to_string(), first.memory_mib.to_string());
    }
    labels.insert(LABEL_GPU_COUNT.to_string(), reading.gpus.len().to_string());
    labels
}

/// Whether `next` differs from `prev` in something the operator or a person
/// acts on. Utilisation and memory use move every sample; only a move of ten
/// points or more (or 10% of memory) counts, so the API sees a write when
/// something happened, plus the slow heartbeat.
pub fn meaningful_change(prev: &GpuNodeStatus, next: &GpuNodeStatus) -> bool {
    let strip = |s: &GpuNodeStatus| {
        let mut s = s.clone();
        s.last_heartbeat = None;
        for c in &mut s.conditions {
            c.last_transition_time = Time(Timestamp::UNIX_EPOCH);
        }
        for g in &mut s.gpus {
            g.utilization_percent /= 10;
            g.memory_used_mib = (g.memory_used_mib * 10).checked_div(g.memory_mib).unwrap_or(0);
        }
        s
    };
    strip(prev) != strip(next)
}

#[cfg(test)]
mod tests {
    use super::*;
    use gpupool_crds::conditions::find;
    use gpupool_crds::{GpuDevice, MigMode};

    fn now() -> Timestamp {
        "2026-06-01T12:00:00Z".parse().unwrap()
    }

    fn reading() -> Reading {
        let g = |i: u32, health| GpuDevice {
            index: i,
            uuid: format!("GPU-{i}"),
            product: "NVIDIA H100 80GB HBM3".into(),
            memory_mib: 81559,
            memory_used_mib: 100,
            utilization_percent: 35,
            mig_mode: MigMode::Disabled,
            health,
            ..Default::default()
        };
        Reading {
            driver_version: Some("580.95.05".into()),
            cuda_version: Some("13.0".into()),
            gpus: vec![
                g(0, GpuHealth::Healthy),
                g(1, GpuHealth::Unhealthy),
                g(2, GpuHealth::Healthy),
            ],
        }
    }

    #[test]
    fn maps_reading_to_status() {
        let s = status_from_reading("nvml", &reading(), 1, None, now());
        assert_eq!((s.gpus_total, s.gpus_healthy, s.gpus_free), (3, 2, 1));
        assert_eq!(s.product.as_deref(), Some("NVIDIA H100 80GB HBM3"));
        assert_eq!(s.driver_version.as_deref(), Some("580.95.05"));
        assert_eq!(find(&s.conditions, COND_DRIVER_READY).unwrap().status, "True");
        let over = status_from_reading("nvml", &reading(), 5, None, now());
        assert_eq!(over.gpus_free, 0);
    }

    #[test]
    fn error_offers_no_gpus_and_says_why() {
        let prev = status_from_reading("nvml", &reading(), 0, None, now());
        let err = SourceError::DriverUnavailable("libnvidia-ml.so could not be loaded".into());
        let s = status_from_error("nvml", &err, Some(&prev), now());
        assert_eq!((s.gpus_total, s.gpus_free), (0, 0));
        assert!(s.gpus.is_empty());
        let c = find(&s.conditions, COND_DRIVER_READY).unwrap();
        assert_eq!((c.status.as_str(), c.reason.as_str()), ("False", "DriverUnavailable"));
        assert!(c.message.contains("libnvidia-ml.so"));
    }

    #[test]
    fn labels_follow_first_gpu() {
        let l = node_labels(&reading());
        assert_eq!(l[LABEL_GPU_PRODUCT], "NVIDIA-H100-80GB-HBM3");
        assert_eq!(l[LABEL_GPU_MEMORY_MIB], "81559");
        assert_eq!(l[LABEL_GPU_COUNT], "3");
    }

    #[test]
    fn small_jitter_is_not_a_change() {
        let a = status_from_reading("nvml", &reading(), 0, None, now());
        let mut r = reading();
        r.gpus[0].utilization_percent = 38;
        let b = status_from_reading(
            "nvml",
            &r,
            0,
            Some(&a),
            now() + k8s_openapi::jiff::SignedDuration::from_secs(10),
        );
        assert!(!meaningful_change(&a, &b));
        r.gpus[0].utilization_percent = 90;
        let c = status_from_reading("nvml", &r, 0, Some(&a), now());
        assert!(meaningful_change(&a, &c));
        let d = status_from_reading("nvml", &reading(), 1, Some(&a), now());
        assert!(meaningful_change(&a, &d), "free GPUs changed");
    }
}

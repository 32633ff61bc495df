//! How Kubernetes counts the GPUs a pod holds, shared by the operator (free
//! GPUs per node) and the agent (free GPUs on its node) so both agree.

use k8s_openapi::api::core::v1::Pod;

use crate::GPU_RESOURCE;

/// GPUs one pod holds: the sum over its containers, or its largest init
/// container if that is more, as the scheduler counts it.
pub fn pod_gpus(pod: &Pod) -> u32 {
    let Some(spec) = &pod.spec else { return 0 };
    let of = |c: &k8s_openapi::api::core::v1::Container| -> u32 {
        c.resources
            .as_ref()
            .and_then(|r| {
                r.limits
                    .as_ref()
                    .and_then(|l| l.get(GPU_RESOURCE))
                    .or_else(|| r.requests.as_ref().and_then(|q| q.get(GPU_RESOURCE)))
            })
            .and_then(|q| q.0.parse::<u32>().ok())
            .unwrap_or(0)
    };
    let main: u32 = spec.containers.iter().map(of).sum();
    let init = spec.init_containers.iter().flatten().map(of).max().unwrap_or(0);
    main.max(init)
}

/// Whether a pod still holds its node's resources.
pub fn pod_is_live(pod: &Pod) -> bool {
    let phase = pod.status.as_ref().and_then(|s| s.phase.as_deref());
    !matches!(phase, Some("Succeeded") | Some("Failed"))
}

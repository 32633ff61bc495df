//! What a provider creates for a lease it accepted: a namespace of the
//! lease's own, a NetworkPolicy that denies all traffic in and out of it,
//! the provider's copy of the Lease, and the renter's workload as an AiJob
//! that may only run here (`LocalOnly`: a leased workload must never be
//! ordered into the pool again, at the renter's cost a second time). Pure.

use std::collections::BTreeMap;

use gpupool_crds::price::TokenAmount;
use gpupool_crds::{
    AIJOB_FINALIZER, ANNOTATION_TRACEPARENT, AiJob, AiJobSpec, Bidding, Escrow, GpuRequirements, LABEL_LEASE,
    LABEL_LEASE_NAMESPACE, LABEL_ORDER, LEASE_FINALIZER, Lease, LeaseParty, LeaseSide, LeaseSpec, Placement,
    PlacementMode,
};
use gpupool_proto::peer::v1::LeaseOffer;
use k8s_openapi::api::core::v1::{Namespace, PodTemplateSpec};
use k8s_openapi::api::networking::v1::{NetworkPolicy, NetworkPolicySpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use kube::api::ObjectMeta;

/// The namespace that runs one lease's workload.
pub fn lease_namespace(lease_id: &str) -> String {
    format!("gpupool-lease-{}", lease_short(lease_id))
}

/// The first 12 hex digits of a lease id: unique enough among one provider's leases.
pub fn lease_short(lease_id: &str) -> String {
    lease_id
        .trim_start_matches("0x")
        .chars()
        .take(12)
        .collect::<String>()
        .to_ascii_lowercase()
}

/// The name of the provider's Lease copy for `lease_id`.
pub fn provider_lease_name(lease_id: &str) -> String {
    format!("lease-{}", lease_short(lease_id))
}

/// The AiJob name of a leased workload inside its namespace.
pub const WORKLOAD: &str = "workload";

/// The NetworkPolicy that closes a lease namespace.
pub const DEFAULT_DENY: &str = "default-deny";

/// A lease the provider verified on chain, and what it runs.
#[derive(Clone, Debug)]
pub struct Accepted<'a> {
    pub offer: &'a LeaseOffer,
    pub renter: LeaseParty,
    pub provider: LeaseParty,
    /// Who funds the lease when the renter's agent opened it (see `lease_check`).
    pub funded_by: Option<String>,
    /// What the bid promised: GPUs of one product at a price.
    pub gpu_product: &'a str,
    pub gpu_count: u32,
    pub price_per_gpu_hour: TokenAmount,
    pub template: PodTemplateSpec,
    /// Where the operator keeps its Lease copies.
    pub operator_namespace: &'a str,
    /// The renter's trace, which the lease's settlement and workload continue.
    pub traceparent: Option<String>,
}

/// The four objects, in the order they are created.
#[derive(Clone, Debug)]
pub struct LeaseObjects {
    pub namespace: Namespace,
    pub deny: NetworkPolicy,
    pub lease: Lease,
    pub workload: AiJob,
}

pub fn lease_objects(a: Accepted<'_>) -> LeaseObjects {
    let lease_id = &a.offer.lease_id;
    let ns = lease_namespace(lease_id);
    let short = lease_short(lease_id);
    let labels = BTreeMap::from([
        (LABEL_LEASE.to_string(), short.clone()),
        (LABEL_LEASE_NAMESPACE.to_string(), "true".to_string()),
        (
            "app.kubernetes.io/managed-by".to_string(),
            "gpupool-operator".to_string(),
        ),
    ]);
    let namespace = Namespace {
        metadata: ObjectMeta {
            name: Some(ns.clone()),
            labels: Some(labels.clone()),
            annotations: Some(BTreeMap::from([
                ("gpupool.dev/renter-org".to_string(), a.renter.org.clone()),
                ("gpupool.dev/lease-id".to_string(), lease_id.clone()),
            ])),
            ..Default::default()
        },
        ..Default::default()
    };
    // Default deny: the renter's workload may not reach this cluster's
    // services, and nothing in the cluster may reach it.
    let deny = NetworkPolicy {
        metadata: ObjectMeta {
            name: Some(DEFAULT_DENY.into()),
            namespace: Some(ns.clone()),
            labels: Some(labels),
            ..Default::default()
        },
        spec: Some(NetworkPolicySpec {
            pod_selector: Some(LabelSelector::default()),
            policy_types: Some(vec!["Ingress".into(), "Egress".into()]),
            ..Default::default()
        }),
    };
    let traced = a
        .traceparent
        .map(|tp| BTreeMap::from([(ANNOTATION_TRACEPARENT.to_string(), tp)]));
    let gpu_count = i32::try_from(a.gpu_count).unwrap_or(1);
    let mut lease = Lease::new(
        &provider_lease_name(lease_id),
        LeaseSpec {
            side: LeaseSide::Provider,
            order_id: a.offer.order_id.clone(),
            bid: a.offer.bid_id.clone(),
            ai_job: Some(format!("{ns}/{WORKLOAD}")),
            renter: a.renter,
            provider: a.provider,
            price_per_gpu_hour: a.price_per_gpu_hour.to_string(),
            gpu_count,
            gpu_product: a.gpu_product.to_string(),
            escrow: Some(Escrow {
                chain_id: a.offer.chain_id,
                contract: a.offer.escrow_contract.clone(),
                lease_id: Some(lease_id.clone()),
                deposit: a.offer.deposit.clone(),
                // Top-ups are the renter's to make.
                top_up_to: None,
                funded_by: a.funded_by,
            }),
            close_reason: None,
        },
    );
    lease.metadata.namespace = Some(a.operator_namespace.to_string());
    lease.metadata.labels = Some(BTreeMap::from([
        (LABEL_LEASE.to_string(), short.clone()),
        (LABEL_ORDER.to_string(), a.offer.order_id.clone()),
    ]));
    // Born with the finalizers of the workers that own them, which would
    // each add theirs in a write of its own.
    lease.metadata.finalizers = Some(vec![LEASE_FINALIZER.to_string()]);
    lease.metadata.annotations = traced.clone();
    let mut workload = AiJob::new(
        WORKLOAD,
        AiJobSpec {
            template: a.template,
            gpus: GpuRequirements {
                count: gpu_count,
                models: vec![a.gpu_product.to_string()],
                min_memory: None,
                interconnect: Default::default(),
            },
            max_price_per_gpu_hour: a.price_per_gpu_hour.to_string(),
            max_duration: std::time::Duration::from_secs(a.offer.max_duration_seconds).into(),
            placement: Placement {
                mode: PlacementMode::LocalOnly,
                allowed_orgs: vec![],
                denied_orgs: vec![],
            },
            bidding: Bidding::default(),
            // The lease pays for it; the workload itself pays nothing.
            payer: None,
        },
    );
    workload.metadata.namespace = Some(ns);
    workload.metadata.labels = Some(BTreeMap::from([(LABEL_LEASE.to_string(), short)]));
    workload.metadata.finalizers = Some(vec![AIJOB_FINALIZER.to_string()]);
    workload.metadata.annotations = traced;
    LeaseObjects {
        namespace,
        deny,
        lease,
        workload,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kube::ResourceExt;

    fn accepted(offer: &LeaseOffer) -> Accepted<'_> {
        Accepted {
            offer,
            renter: LeaseParty {
                org: "acme".into(),
                peer_id: Some("12D3KooWRenter".into()),
                wallet: Some("0xacac".into()),
            },
            provider: LeaseParty {
                org: "bravo".into(),
                peer_id: Some("12D3KooWProvider".into()),
                wallet: Some("0xb0b0".into()),
            },
            funded_by: None,
            gpu_product: "NVIDIA-A100-SXM4-40GB",
            gpu_count: 2,
            price_per_gpu_hour: "2.5".parse().unwrap(),
            template: serde_json::from_value(serde_json::json!({
                "spec": {"containers": [{"name": "train", "image": "trainer:1"}], "restartPolicy": "Never"}
            }))
            .unwrap(),
            operator_namespace: "gpupool-system",
            traceparent: Some("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01".into()),
        }
    }

    fn offer() -> LeaseOffer {
        LeaseOffer {
            order_id: "acme-1a2b3c4d-0".into(),
            bid_id: "bravo-acme-1a2b3c4d-0".into(),
            chain_id: 31337,
            escrow_contract: "0xe5e5".into(),
            lease_id: "0xABCDEF0123456789aaaa".into(),
            deposit: "7.5".into(),
            max_duration_seconds: 3600,
            ..Default::default()
        }
    }

    #[test]
    fn a_lease_namespace_is_closed_both_ways_to_every_pod() {
        let offer = offer();
        let o = lease_objects(accepted(&offer));
        assert_eq!(o.namespace.name_any(), "gpupool-lease-abcdef012345");
        assert_eq!(o.deny.namespace().as_deref(), Some("gpupool-lease-abcdef012345"));
        let spec = o.deny.spec.unwrap();
        assert_eq!(
            spec.pod_selector,
            Some(LabelSelector::default()),
            "an empty selector: every pod"
        );
        assert_eq!(
            spec.policy_types,
            Some(vec!["Ingress".to_string(), "Egress".to_string()])
        );
        assert!(
            spec.ingress.is_none() && spec.egress.is_none(),
            "no rule lets anything in or out"
        );
        assert_eq!(
            o.namespace.labels().get(LABEL_LEASE_NAMESPACE).map(String::as_str),
            Some("true"),
            "the cleanup finds lease namespaces by this label"
        );
        assert_eq!(
            o.namespace.annotations().get("gpupool.dev/lease-id"),
            Some(&offer.lease_id)
        );
    }

    #[test]
    fn the_workload_runs_only_here_on_the_gpus_the_bid_promised() {
        let offer = offer();
        let o = lease_objects(accepted(&offer));
        let w = &o.workload;
        assert_eq!(w.name_any(), WORKLOAD);
        assert_eq!(w.namespace().as_deref(), Some("gpupool-lease-abcdef012345"));
        assert_eq!(w.spec.placement.mode, PlacementMode::LocalOnly);
        assert_eq!(w.spec.gpus.count, 2);
        assert_eq!(w.spec.gpus.models, vec!["NVIDIA-A100-SXM4-40GB".to_string()]);
        assert_eq!(w.spec.payer, None, "the lease pays, not an account here");
        assert_eq!(std::time::Duration::from(w.spec.max_duration).as_secs(), 3600);
        assert_eq!(
            w.spec.template.spec.as_ref().unwrap().containers[0].image.as_deref(),
            Some("trainer:1")
        );
        assert_eq!(w.finalizers(), [AIJOB_FINALIZER.to_string()]);
        assert!(w.annotations().contains_key(ANNOTATION_TRACEPARENT));
    }

    #[test]
    fn the_provider_lease_copy_records_the_offer_and_the_bid() {
        let offer = offer();
        let mut a = accepted(&offer);
        a.funded_by = Some("0x7777".into());
        let l = lease_objects(a).lease;
        assert_eq!(l.name_any(), "lease-abcdef012345");
        assert_eq!(l.namespace().as_deref(), Some("gpupool-system"));
        assert_eq!(l.spec.side, LeaseSide::Provider);
        assert_eq!(l.spec.ai_job.as_deref(), Some("gpupool-lease-abcdef012345/workload"));
        assert_eq!(l.spec.price_per_gpu_hour, "2.5");
        assert_eq!(
            (l.spec.gpu_count, l.spec.gpu_product.as_str()),
            (2, "NVIDIA-A100-SXM4-40GB")
        );
        let escrow = l.spec.escrow.unwrap();
        assert_eq!(escrow.lease_id.as_deref(), Some("0xABCDEF0123456789aaaa"));
        assert_eq!(escrow.deposit, "7.5");
        assert_eq!(escrow.top_up_to, None, "top-ups are the renter's");
        assert_eq!(escrow.funded_by.as_deref(), Some("0x7777"));
        assert_eq!(l.metadata.finalizers, Some(vec![LEASE_FINALIZER.to_string()]));
        assert_eq!(
            l.metadata.labels.unwrap().get(LABEL_ORDER).map(String::as_str),
            Some("acme-1a2b3c4d-0")
        );
    }
}

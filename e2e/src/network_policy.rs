//! Whether a NetworkPolicy lets in exactly what a pod template listens on.
//! A port renamed in the Deployment and not in the policy would be dropped
//! by the CNI, and nothing in a cluster without one (the test environment's)
//! would notice: the operator would stop hearing its peers, or its scrapes,
//! only where the policy is enforced.

use k8s_openapi::api::core::v1::PodTemplateSpec;
use k8s_openapi::api::networking::v1::NetworkPolicy;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

/// Each way `policy` and the pods of `template` disagree, as a sentence.
pub fn gaps(policy: &NetworkPolicy, template: &PodTemplateSpec) -> Vec<String> {
    let mut gaps = Vec::new();
    let spec = policy.spec.clone().unwrap_or_default();
    let labels = template
        .metadata
        .as_ref()
        .and_then(|m| m.labels.clone())
        .unwrap_or_default();
    let selector = spec.pod_selector.clone().unwrap_or_default();
    let wanted = selector.match_labels.clone().unwrap_or_default();
    for (key, value) in &wanted {
        if labels.get(key) != Some(value) {
            gaps.push(format!("the policy selects {key}={value}, which the pods do not carry"));
        }
    }
    if wanted.is_empty() || selector.match_expressions.is_some() {
        gaps.push("the policy does not select the pods by their labels alone".into());
    }

    // (name, number, protocol) of every port the pods open.
    let opened: Vec<(String, i32, String)> = template
        .spec
        .iter()
        .flat_map(|s| &s.containers)
        .flat_map(|c| c.ports.iter().flatten())
        .map(|p| {
            (
                p.name.clone().unwrap_or_default(),
                p.container_port,
                p.protocol.clone().unwrap_or_else(|| "TCP".into()),
            )
        })
        .collect();
    let allowed: Vec<(IntOrString, String)> = spec
        .ingress
        .iter()
        .flatten()
        .flat_map(|rule| rule.ports.iter().flatten())
        .filter_map(|p| Some((p.port.clone()?, p.protocol.clone().unwrap_or_else(|| "TCP".into()))))
        .collect();
    let admits = |(port, protocol): &(IntOrString, String), (name, number, proto): &(String, i32, String)| {
        protocol == proto
            && match port {
                IntOrString::String(n) => n == name,
                IntOrString::Int(n) => n == number,
            }
    };
    for open in &opened {
        if !allowed.iter().any(|a| admits(a, open)) {
            gaps.push(format!(
                "port {} ({}/{}) is opened but no ingress rule lets traffic in",
                open.0, open.1, open.2
            ));
        }
    }
    for allow in &allowed {
        if !opened.iter().any(|o| admits(allow, o)) {
            let port = match &allow.0 {
                IntOrString::String(n) => n.clone(),
                IntOrString::Int(n) => n.to_string(),
            };
            gaps.push(format!(
                "the policy lets in port {port}/{}, which no container opens",
                allow.1
            ));
        }
    }
    gaps
}

#[cfg(test)]
mod tests {
    use super::*;

    fn template() -> PodTemplateSpec {
        serde_json::from_value(serde_json::json!({
            "metadata": { "labels": { "app": "gpupool", "component": "operator" } },
            "spec": { "containers": [{
                "name": "operator",
                "ports": [
                    { "name": "metrics", "containerPort": 8080 },
                    { "name": "p2p", "containerPort": 4001 },
                    { "name": "p2p-quic", "containerPort": 4001, "protocol": "UDP" },
                ],
            }]},
        }))
        .expect("a pod template")
    }

    fn policy(selector: serde_json::Value, ports: serde_json::Value) -> NetworkPolicy {
        serde_json::from_value(serde_json::json!({
            "metadata": { "name": "p" },
            "spec": {
                "podSelector": { "matchLabels": selector },
                "policyTypes": ["Ingress"],
                "ingress": [{ "ports": ports }],
            },
        }))
        .expect("a NetworkPolicy")
    }

    fn selector() -> serde_json::Value {
        serde_json::json!({ "app": "gpupool", "component": "operator" })
    }

    #[test]
    fn a_policy_naming_every_port_by_name_or_number_has_no_gaps() {
        let p = policy(
            selector(),
            serde_json::json!([
                { "port": "metrics", "protocol": "TCP" },
                { "port": 4001 },
                { "port": "p2p-quic", "protocol": "UDP" },
            ]),
        );
        assert_eq!(gaps(&p, &template()), Vec::<String>::new());
    }

    #[test]
    fn a_forgotten_port_a_wrong_protocol_and_a_stale_name_are_named() {
        let p = policy(
            selector(),
            serde_json::json!([
                { "port": "metrics" },
                { "port": "p2p-quic", "protocol": "TCP" },
                { "port": "pool-api" },
            ]),
        );
        let g = gaps(&p, &template());
        assert!(g.iter().any(|g| g.contains("port p2p (4001/TCP) is opened")), "{g:?}");
        assert!(
            g.iter().any(|g| g.contains("port p2p-quic (4001/UDP) is opened")),
            "{g:?}"
        );
        assert!(g.iter().any(|g| g.contains("lets in port p2p-quic/TCP")), "{g:?}");
        assert!(g.iter().any(|g| g.contains("lets in port pool-api/TCP")), "{g:?}");
        assert_eq!(g.len(), 4, "{g:?}");
    }

    #[test]
    fn a_selector_the_pods_do_not_match_is_named() {
        let all =
            serde_json::json!([{ "port": "metrics" }, { "port": "p2p" }, { "port": "p2p-quic", "protocol": "UDP" }]);
        let g = gaps(
            &policy(serde_json::json!({ "component": "agent" }), all.clone()),
            &template(),
        );
        assert_eq!(g, ["the policy selects component=agent, which the pods do not carry"]);
        let g = gaps(&policy(serde_json::json!({}), all), &template());
        assert_eq!(g, ["the policy does not select the pods by their labels alone"]);
    }
}

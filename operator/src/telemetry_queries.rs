//! The PromQL the chart ships (the Grafana dashboard's panels and the
//! alerting rules) checked against what the operator exports: every
//! expression parses, every metric it reads is registered, every label it
//! matches or groups by is one that metric carries (or one Prometheus adds
//! to each target), and every value it matches on a closed set of values is
//! in that set. A renamed metric or label would otherwise leave a panel blank
//! and an alert silent, which nobody notices until it was needed.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use gpupool_crds::LeaseState;
use promql_parser::label::{MatchOp, Matcher};
use promql_parser::parser::{self, Expr, VectorSelector};

use crate::capacity::NodeGpus;
use crate::market::bidengine::NoBid;
use crate::p2p::envelope::DropReason;
use crate::p2p::swarm::{HolePunch, RelayServed};
use crate::telemetry::{Metrics, PoolLeaseEvent};

/// Labels Prometheus puts on every series it scrapes through the chart's
/// ServiceMonitor.
const TARGET_LABELS: [&str; 7] = [
    "instance",
    "job",
    "namespace",
    "pod",
    "service",
    "container",
    "endpoint",
];

/// What one expression reads.
#[derive(Debug, Default)]
struct Reads {
    /// Metric name and label matchers of each selector.
    selectors: Vec<(String, Vec<Matcher>)>,
    /// Labels named by `by`, `without`, `on` and `ignoring`.
    grouping: Vec<String>,
}

fn walk(e: &Expr, out: &mut Reads) {
    match e {
        Expr::Aggregate(a) => {
            if let Some(m) = &a.modifier {
                out.grouping.extend(m.labels().labels.iter().cloned());
            }
            walk(&a.expr, out);
            if let Some(p) = &a.param {
                walk(p, out);
            }
        }
        Expr::Unary(u) => walk(&u.expr, out),
        Expr::Binary(b) => {
            if let Some(m) = b.modifier.as_ref().and_then(|m| m.matching.as_ref()) {
                out.grouping.extend(m.labels().labels.iter().cloned());
            }
            walk(&b.lhs, out);
            walk(&b.rhs, out);
        }
        Expr::Paren(p) => walk(&p.expr, out),
        Expr::Subquery(s) => walk(&s.expr, out),
        Expr::VectorSelector(v) => selector(v, out),
        Expr::MatrixSelector(m) => selector(&m.vs, out),
        Expr::Call(c) => c.args.args.iter().for_each(|a| walk(a, out)),
        Expr::NumberLiteral(_) | Expr::StringLiteral(_) | Expr::Extension(_) => {}
    }
}

fn selector(v: &VectorSelector, out: &mut Reads) {
    let name = v
        .name
        .clone()
        .or_else(|| {
            v.matchers
                .matchers
                .iter()
                .find(|m| m.name == "__name__")
                .map(|m| m.value.clone())
        })
        .unwrap_or_default();
    let matchers = v
        .matchers
        .matchers
        .iter()
        .filter(|m| m.name != "__name__")
        .cloned()
        .collect();
    out.selectors.push((name, matchers));
}

fn reads(expr: &str) -> Result<Reads, String> {
    // Grafana's own interval variable, as Grafana substitutes it.
    let expr = expr.replace("$__rate_interval", "5m");
    let mut out = Reads::default();
    walk(&parser::parse(&expr)?, &mut out);
    Ok(out)
}

/// The families the operator exports, each with the labels its series carry,
/// once every labelled family has a series.
fn exported() -> BTreeMap<String, BTreeSet<String>> {
    let m = Metrics::default();
    m.observe_inventory(&[NodeGpus {
        node: "n1".into(),
        product: "NVIDIA A100".into(),
        memory_mib: 81_920,
        healthy: 8,
        allocated: 2,
    }]);
    m.observe_tx(&gpupool_chain::TxRecord {
        call: "open",
        gas_used: 56_000,
        latency: Duration::from_millis(30),
        succeeded: true,
    });
    m.chain_error("Rpc");
    m.balances(1, 2);
    m.observe_leases(&crate::lease_gauges::tally(&[]));
    m.message_received("bid");
    m.message_dropped("replayed");
    m.order_declined("renter_hold_limit");
    m.pool_lease(PoolLeaseEvent::RenterOpened);
    m.placement("lease_active", 0.5);
    m.pool_api_request("Submit", tonic::Code::Unauthenticated);
    m.pool_advertised(&[("NVIDIA L40S".to_string(), 4)].into());
    m.relay_served("circuit");
    m.hole_punched("direct");
    let text = m.render();
    let mut families: BTreeMap<String, BTreeSet<String>> = text
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.split(' ').next())
        .map(|n| (n.to_string(), BTreeSet::new()))
        .collect();
    for line in text.lines().filter(|l| !l.starts_with('#') && !l.is_empty()) {
        let (series, labels) = line
            .split_once('{')
            .unwrap_or((line.split(' ').next().unwrap_or(line), ""));
        let Some(family) = family_of(series, &families) else {
            panic!("{series} belongs to no family");
        };
        let names = labels
            .split(',')
            .filter_map(|kv| kv.split_once('='))
            .map(|(k, _)| k.trim().to_string());
        if let Some(f) = families.get_mut(&family) {
            f.extend(names);
        }
    }
    families
}

/// The family a series name belongs to: the text format adds `_total` to
/// counters and `_bucket`, `_sum` and `_count` to histograms.
fn family_of(series: &str, families: &BTreeMap<String, BTreeSet<String>>) -> Option<String> {
    if families.contains_key(series) {
        return Some(series.to_string());
    }
    ["_total", "_bucket", "_sum", "_count", "_created"]
        .iter()
        .filter_map(|s| series.strip_suffix(s))
        .find(|base| families.contains_key(*base))
        .map(str::to_string)
}

/// Labels whose values are a closed set in the code, so a query that
/// matches a value outside it can never match anything.
fn closed_values() -> BTreeMap<(&'static str, &'static str), BTreeSet<String>> {
    let lease_states = [
        LeaseState::Pending,
        LeaseState::Active,
        LeaseState::InsufficientFunds,
        LeaseState::Closed,
    ]
    .iter()
    .map(|s| {
        // A new state fails to compile here, rather than go unlisted.
        match s {
            LeaseState::Pending | LeaseState::Active | LeaseState::InsufficientFunds | LeaseState::Closed => {}
        }
        serde_json::to_value(s)
            .ok()
            .and_then(|v| v.as_str().map(str::to_string))
            .unwrap_or_default()
    })
    .collect();
    BTreeMap::from([
        (
            ("gpupool_pool_messages_dropped", "reason"),
            DropReason::ALL.iter().map(|r| r.as_str().to_string()).collect(),
        ),
        (
            ("gpupool_pool_orders_declined", "reason"),
            NoBid::REASONS.map(String::from).into(),
        ),
        (
            ("gpupool_pool_leases", "kind"),
            PoolLeaseEvent::ALL.iter().map(|e| e.as_str().to_string()).collect(),
        ),
        (("gpupool_leases", "state"), lease_states),
        (
            ("gpupool_pool_placement_duration_seconds", "kind"),
            ["lease_active", "pod_running"].map(String::from).into(),
        ),
        (
            ("gpupool_pool_hole_punches", "result"),
            HolePunch::ALL.iter().map(|h| h.as_str().to_string()).collect(),
        ),
        (
            ("gpupool_pool_relay_served", "kind"),
            RelayServed::ALL.iter().map(|k| k.as_str().to_string()).collect(),
        ),
        (
            ("gpupool_gpus", "state"),
            ["total", "free", "lent", "rented"].map(String::from).into(),
        ),
    ])
}

/// Checks one expression; returns how many gpupool selectors it has.
fn check(what: &str, expr: &str) -> usize {
    let families = exported();
    let closed = closed_values();
    let r = reads(expr).unwrap_or_else(|e| panic!("{what}: {expr:?} is not PromQL: {e}"));
    let mut labels_read = BTreeSet::new();
    for (name, matchers) in &r.selectors {
        let family = family_of(name, &families)
            .unwrap_or_else(|| panic!("{what} reads {name}, which the operator does not export"));
        let own = &families[&family];
        labels_read.extend(own.iter().cloned());
        for m in matchers {
            assert!(
                own.contains(&m.name)
                    || (m.name == "le" && name.ends_with("_bucket"))
                    || TARGET_LABELS.contains(&m.name.as_str()),
                "{what} matches label {} on {family}, which carries {own:?}",
                m.name
            );
            let Some(set) = closed.get(&(family.as_str(), m.name.as_str())) else {
                continue;
            };
            // Plain alternatives (a|b|c) in a regex are values too.
            let values: Vec<&str> = match &m.op {
                MatchOp::Equal | MatchOp::NotEqual => vec![m.value.as_str()],
                MatchOp::Re(_) | MatchOp::NotRe(_) => m.value.split('|').collect(),
            };
            for v in values {
                assert!(
                    set.contains(v),
                    "{what} matches {family}{{{}={v:?}}}, which the operator never sets (it sets {set:?})",
                    m.name
                );
            }
        }
    }
    for g in &r.grouping {
        assert!(
            labels_read.contains(g) || g == "le" || TARGET_LABELS.contains(&g.as_str()),
            "{what} groups by {g}, which none of its metrics carries"
        );
    }
    r.selectors.len()
}

#[test]
fn reads_finds_selectors_matchers_and_grouping_labels() {
    let r = reads(
        r#"histogram_quantile(0.99, sum by (le) (rate(gpupool_a_bucket{kind="x"}[5m]))) / on (pod) gpupool_b_total"#,
    )
    .expect("PromQL");
    let names: Vec<&str> = r.selectors.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(names, ["gpupool_a_bucket", "gpupool_b_total"]);
    assert_eq!(r.selectors[0].1[0].name, "kind");
    assert_eq!(r.grouping, ["pod", "le"]);
    assert!(reads("sum(rate(x[5m]").is_err());
}

#[test]
#[should_panic(expected = "which the operator never sets")]
fn a_value_outside_a_closed_set_is_caught() {
    check("probe", r#"gpupool_pool_messages_dropped_total{reason="forged"}"#);
}

#[test]
#[should_panic(expected = "which carries")]
fn a_label_the_metric_lacks_is_caught() {
    check("probe", r#"gpupool_leader{state="up"}"#);
}

#[test]
fn every_dashboard_query_reads_what_the_operator_exports() {
    let dashboard: serde_json::Value =
        serde_json::from_str(include_str!("../../charts/gpupool/dashboards/gpupool.json"))
            .expect("the dashboard is JSON");
    let panels = dashboard["panels"].as_array().expect("panels");
    let mut queried = 0;
    for panel in panels.iter().filter(|p| p["type"] != "row") {
        let title = panel["title"].as_str().unwrap_or("?");
        let targets = panel["targets"].as_array().filter(|t| !t.is_empty());
        for target in targets.unwrap_or_else(|| panic!("panel {title} has no query")) {
            let expr = target["expr"].as_str().unwrap_or_default();
            let n = check(&format!("panel {title}"), expr);
            assert!(n > 0, "panel {title}: {expr} reads no gpupool metric");
            queried += n;
        }
    }
    // Every registered family is on the dashboard somewhere.
    for name in exported().keys() {
        assert!(
            panels.iter().any(|p| p.to_string().contains(name.as_str())),
            "{name} is exported but on no panel"
        );
    }
    assert!(queried >= 20, "{queried}");
}

#[derive(serde::Deserialize)]
struct RuleFile {
    groups: Vec<RuleGroup>,
}

#[derive(serde::Deserialize)]
struct RuleGroup {
    name: String,
    rules: Vec<Rule>,
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct Rule {
    alert: String,
    expr: String,
    #[serde(rename = "for")]
    for_: Option<String>,
    labels: BTreeMap<String, String>,
    annotations: BTreeMap<String, String>,
}

#[test]
fn every_alert_rule_reads_what_the_operator_exports_and_says_what_to_do() {
    let file: RuleFile = serde_saphyr::from_str(include_str!("../../charts/gpupool/alerts/gpupool.rules.yaml"))
        .expect("the rule file is YAML of Prometheus' shape");
    let groups: Vec<&str> = file.groups.iter().map(|g| g.name.as_str()).collect();
    // The chart renders the pool's group only with pool.enabled, by name.
    assert_eq!(groups, ["gpupool", "gpupool-pool"]);
    let mut names = BTreeSet::new();
    for rule in file.groups.iter().flat_map(|g| &g.rules) {
        let what = format!("alert {}", rule.alert);
        assert!(names.insert(rule.alert.clone()), "{what} twice");
        assert!(rule.alert.starts_with("Gpupool"), "{what}: not named Gpupool…");
        assert!(check(&what, &rule.expr) > 0, "{what} reads no gpupool metric");
        if let Some(f) = &rule.for_ {
            // Prometheus' duration: a number and one unit.
            let unit = f.trim_start_matches(|c: char| c.is_ascii_digit());
            assert!(
                unit.len() < f.len() && ["s", "m", "h"].contains(&unit),
                "{what}: for {f:?}"
            );
        }
        assert!(
            matches!(
                rule.labels.get("severity").map(String::as_str),
                Some("critical" | "warning")
            ),
            "{what}: severity {:?}",
            rule.labels.get("severity")
        );
        for key in ["summary", "description"] {
            assert!(
                rule.annotations.get(key).is_some_and(|t| t.len() > 20),
                "{what} has no {key} a person can act on"
            );
        }
    }
    assert!(names.len() >= 8, "{names:?}");
}

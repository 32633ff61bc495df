//! Benchmark plumbing: process figures from /proc and JSON output in one
//! shape, `{name, figure, unit, conditions}`, so runs can be compared.

use std::collections::BTreeMap;
use std::path::Path;

use serde::Serialize;

#[derive(Clone, Debug, Serialize)]
pub struct Figure {
    pub name: String,
    pub figure: f64,
    pub unit: String,
    pub conditions: serde_json::Value,
}

impl Figure {
    pub fn new(name: &str, figure: f64, unit: &str, conditions: serde_json::Value) -> Self {
        Self {
            name: name.into(),
            figure,
            unit: unit.into(),
            conditions,
        }
    }
}

/// The `p`th percentile of `v` (nearest rank; NaN when empty). Sorts `v`.
pub fn percentile(v: &mut [f64], p: f64) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(|a, b| a.total_cmp(b));
    v[((p / 100.0) * (v.len() - 1) as f64).round() as usize]
}

/// Writes figures as a JSON array and prints them.
pub fn write(path: &Path, figures: &[Figure]) -> anyhow::Result<()> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let json = serde_json::to_string_pretty(figures)?;
    std::fs::write(path, &json)?;
    println!("{json}");
    Ok(())
}

/// Resident and peak resident memory of a process, in KiB.
pub fn memory_kib(pid: u32) -> anyhow::Result<(u64, u64)> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let field = |name: &str| -> u64 {
        status
            .lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    Ok((field("VmRSS:"), field("VmHWM:")))
}

/// CPU time (user + system) a process has used, in seconds.
pub fn cpu_seconds(pid: u32) -> anyhow::Result<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // Fields after the command name, which is in parentheses and may hold spaces.
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks: f64 = fields.get(11).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0)
        + fields.get(12).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    // USER_HZ is 100 on every Linux we run on.
    Ok(ticks / 100.0)
}

/// CPU seconds used so far by each process of the test environment under
/// `state_root` (every one names a path there on its command line) and by
/// the operators running against it, summed per component such as
/// "kube-apiserver acme" or "anvil". Sampled before and after a run, it says
/// where a run's CPU went on a machine whose cores they all share.
pub fn cpu_by_component(state_root: &Path) -> BTreeMap<String, f64> {
    let root = state_root.to_string_lossy().into_owned();
    let mut out = BTreeMap::new();
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return out;
    };
    for entry in dir.flatten() {
        let Some(pid) = entry.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
            continue;
        };
        let Ok(cmdline) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
            continue;
        };
        let args: Vec<String> = cmdline
            .split(|b| *b == 0)
            .filter(|a| !a.is_empty())
            .map(|a| String::from_utf8_lossy(a).into_owned())
            .collect();
        if !args.iter().any(|a| a.contains(&root)) {
            continue;
        }
        let Ok(seconds) = cpu_seconds(pid) else {
            continue;
        };
        *out.entry(component(&args, &root)).or_default() += seconds;
    }
    out
}

/// "program org" from a command line: the org from `--org=` or from the
/// first directory under the state root that is not the chain's.
fn component(args: &[String], root: &str) -> String {
    let program = args
        .first()
        .and_then(|a| Path::new(a).file_name())
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let org = args
        .iter()
        .find_map(|a| a.strip_prefix("--org=").map(str::to_owned))
        .or_else(|| {
            args.iter().find_map(|a| {
                let under = a.split_once(root)?.1.trim_start_matches('/');
                let first = under.split('/').next()?;
                (!first.is_empty() && first != "chain" && under.contains('/')).then(|| first.to_owned())
            })
        });
    match org {
        Some(org) => format!("{program} {org}"),
        None => program,
    }
}

/// What each component used between two samples of [`cpu_by_component`].
pub fn cpu_between(before: &BTreeMap<String, f64>, after: &BTreeMap<String, f64>) -> BTreeMap<String, f64> {
    after
        .iter()
        .map(|(k, v)| (k.clone(), v - before.get(k).copied().unwrap_or(0.0)))
        .filter(|(_, v)| *v > 0.0)
        .collect()
}

/// The operator's API requests in one organisation's API server, from its
/// audit log (the test environment audits only gpupool's own users), counted
/// by `verb resource[/subresource]`. With `window`, only requests received
/// in it count: a benchmark's phase, not the whole environment's life.
pub fn operator_requests(
    org_dir: &Path,
    window: Option<(k8s_openapi::jiff::Timestamp, k8s_openapi::jiff::Timestamp)>,
) -> BTreeMap<String, u64> {
    let text = std::fs::read_to_string(org_dir.join("logs/audit.log")).unwrap_or_default();
    let mut counts = BTreeMap::new();
    for line in text.lines() {
        let Ok(ev) = serde_json::from_str::<serde_json::Value>(line) else {
            continue;
        };
        if ev["user"]["username"] != crate::cluster::OPERATOR_USER {
            continue;
        }
        if let Some((from, to)) = window {
            let at = ev["requestReceivedTimestamp"]
                .as_str()
                .and_then(|t| t.parse::<k8s_openapi::jiff::Timestamp>().ok());
            if !at.is_some_and(|t| t >= from && t <= to) {
                continue;
            }
        }
        let obj = &ev["objectRef"];
        let mut kind = format!(
            "{} {}",
            ev["verb"].as_str().unwrap_or("?"),
            obj["resource"].as_str().unwrap_or("?")
        );
        // Ours and the core group go unqualified; the others are named, so
        // the leader election's coordination Leases are not taken for ours.
        if let Some(group) = obj["apiGroup"]
            .as_str()
            .filter(|g| !g.is_empty() && *g != gpupool_crds::GROUP)
        {
            kind.push('.');
            kind.push_str(group);
        }
        if let Some(sub) = obj["subresource"].as_str() {
            kind.push('/');
            kind.push_str(sub);
        }
        *counts.entry(kind).or_default() += 1;
    }
    counts
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn components_are_named_by_program_and_org() {
        let root = "/w/e2e/.state";
        assert_eq!(
            component(&args(&["/c/bin/etcd", "--data-dir=/w/e2e/.state/acme/etcd"]), root),
            "etcd acme"
        );
        assert_eq!(
            component(
                &args(&[
                    "target/release/gpupool-operator",
                    "--org=bravo",
                    "--chain-config=/w/e2e/.state/chain/c.json"
                ]),
                root
            ),
            "gpupool-operator bravo"
        );
        assert_eq!(
            component(
                &args(&["/n/bin/anvil", "--config-out", "/w/e2e/.state/chain/accounts.json"]),
                root
            ),
            "anvil"
        );
    }

    #[test]
    fn a_run_costs_what_was_used_between_samples() {
        let before = BTreeMap::from([("etcd acme".to_string(), 1.0), ("anvil".to_string(), 2.0)]);
        let after = BTreeMap::from([
            ("etcd acme".to_string(), 1.5),
            ("anvil".to_string(), 2.0),
            ("kwok bravo".to_string(), 0.25),
        ]);
        assert_eq!(
            cpu_between(&before, &after),
            BTreeMap::from([("etcd acme".to_string(), 0.5), ("kwok bravo".to_string(), 0.25)])
        );
    }
}

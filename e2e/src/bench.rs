//! Benchmark plumbing: process figures from /proc and JSON output in one
//! shape, `{name, figure, unit, conditions}`, so runs can be compared.

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

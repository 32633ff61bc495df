//! Table, JSON and YAML output, the same for every command.

use clap::ValueEnum;
use serde::Serialize;

#[derive(Clone, Copy, Debug, Default, ValueEnum)]
pub enum Format {
    #[default]
    Table,
    Json,
    Yaml,
}

/// Renders rows as an aligned table with a header.
pub fn table(header: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for row in rows {
        for (i, cell) in row.iter().enumerate() {
            if let Some(w) = widths.get_mut(i) {
                *w = (*w).max(cell.chars().count());
            }
        }
    }
    let line = |cells: Vec<String>| {
        cells
            .iter()
            .enumerate()
            .map(|(i, c)| format!("{c:<width$}", width = widths.get(i).copied().unwrap_or(0)))
            .collect::<Vec<_>>()
            .join("  ")
            .trim_end()
            .to_string()
    };
    let mut out = vec![line(header.iter().map(|h| h.to_string()).collect())];
    out.extend(rows.iter().map(|r| line(r.clone())));
    out.join("\n") + "\n"
}

/// JSON or YAML; commands render their own tables, so Table falls back to JSON.
pub fn structured<T: Serialize>(format: Format, value: &T) -> anyhow::Result<String> {
    Ok(match format {
        Format::Json | Format::Table => serde_json::to_string_pretty(value)? + "\n",
        Format::Yaml => serde_saphyr::to_string(value)?,
    })
}

/// One line of a waiting command's progress: the job's phase and what its
/// status says. A job the operator has not picked up yet has neither, and
/// says so rather than print "Pending: " with nothing after it.
pub fn progress_line(phase: Option<&str>, message: &str) -> String {
    match (phase.filter(|p| !p.is_empty()), message.trim()) {
        (None, "") => "Pending: submitted; the operator has not picked it up yet".into(),
        (Some(p), "") => p.into(),
        (p, m) => format!("{}: {m}", p.unwrap_or("Pending")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn progress_never_ends_in_an_empty_message() {
        assert_eq!(
            progress_line(None, ""),
            "Pending: submitted; the operator has not picked it up yet"
        );
        assert_eq!(
            progress_line(Some(""), " "),
            "Pending: submitted; the operator has not picked it up yet"
        );
        assert_eq!(progress_line(Some("Running"), ""), "Running");
        assert_eq!(progress_line(None, "order published"), "Pending: order published");
        assert_eq!(
            progress_line(Some("Bidding"), "0 bid(s) so far"),
            "Bidding: 0 bid(s) so far"
        );
    }

    #[test]
    fn aligns_columns() {
        let t = table(
            &["NAME", "PHASE"],
            &[
                vec!["a".into(), "Running".into()],
                vec!["longer-name".into(), "-".into()],
            ],
        );
        assert_eq!(t, "NAME         PHASE\na            Running\nlonger-name  -\n");
    }

    #[test]
    fn json_and_yaml() {
        let v = serde_json::json!({"a": 1});
        assert_eq!(structured(Format::Json, &v).unwrap(), "{\n  \"a\": 1\n}\n");
        assert!(structured(Format::Yaml, &v).unwrap().contains("a: 1"));
    }
}

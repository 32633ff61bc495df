//! Whether the settings a chart gives a container (its `GPUPOOL_` variables
//! and `--flags`) are ones the container's binary reads, judged from the
//! binary's `--help`. A name changed on one side only leaves a value
//! silently ignored (a variable) or the pods crash-looping (a flag); nothing
//! else would notice before a user does.

use k8s_openapi::api::core::v1::Container;

/// What one container sets and its binary does not read.
#[derive(Debug, Default, PartialEq)]
pub struct Checked {
    /// Settings looked at.
    pub settings: usize,
    /// Each one the binary does not read, as a sentence.
    pub unread: Vec<String>,
}

/// Checks `container`'s settings against `help`, the `--help` of `bin`.
pub fn check(bin: &str, help: &str, container: &Container) -> Checked {
    let flags: Vec<&str> = help
        .lines()
        .flat_map(|l| l.split([' ', ',']))
        .filter(|w| w.starts_with("--"))
        .collect();
    let mut checked = Checked::default();
    let vars = container
        .env
        .iter()
        .flatten()
        .map(|e| &e.name)
        .filter(|n| n.starts_with("GPUPOOL_"));
    for name in vars {
        // clap writes `[env: NAME=value]`, or `[env: NAME]` where the value
        // is hidden (a URL with a key in it).
        let read = [format!("[env: {name}="), format!("[env: {name}]")];
        if !read.iter().any(|r| help.contains(r)) {
            checked
                .unread
                .push(format!("the chart sets {name}, which {bin} does not read"));
        }
        checked.settings += 1;
    }
    for arg in container.args.iter().flatten().filter(|a| a.starts_with("--")) {
        let flag = arg.split('=').next().unwrap_or_default();
        if !flags.contains(&flag) {
            checked
                .unread
                .push(format!("the chart passes {flag}, which {bin} does not take"));
        }
        checked.settings += 1;
    }
    checked
}

/// Whether `bin` accepts the values `container` gives it, not only their
/// names: runs it with exactly the container's literal variables and
/// arguments, nothing else in its environment (no cluster to reach), and
/// says what it refused if it stopped with clap's usage error (exit code
/// 2) within a few seconds. Anything else (stopping later for want of a
/// cluster, a file or a Secret, or still running) means the values parsed.
/// Helm rendered a YAML integer of a million or more as "1e+06", which the
/// names-only check passed and the operator refused at start.
pub fn refused_values(bin: &std::path::Path, container: &Container) -> Option<String> {
    use std::process::{Command, Stdio};
    use std::time::{Duration, Instant};
    let mut cmd = Command::new(bin);
    cmd.env_clear()
        .env("KUBECONFIG", "/nonexistent/gpupool-chart-settings")
        .args(container.args.iter().flatten())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    for e in container.env.iter().flatten() {
        if let Some(v) = &e.value {
            cmd.env(&e.name, v);
        } else if e.value_from.as_ref().is_some_and(|f| f.field_ref.is_some()) {
            // The downward API's node or pod name: any name will do here.
            cmd.env(&e.name, "from-the-downward-api");
        }
    }
    let mut child = match cmd.spawn() {
        Ok(c) => c,
        Err(e) => return Some(format!("{} did not start: {e}", bin.display())),
    };
    let started = Instant::now();
    while started.elapsed() < Duration::from_secs(5) {
        match child.try_wait() {
            Ok(Some(status)) if status.code() == Some(2) => {
                let mut stderr = String::new();
                if let Some(mut err) = child.stderr.take() {
                    let _ = std::io::Read::read_to_string(&mut err, &mut stderr);
                }
                return Some(stderr.lines().next().unwrap_or_default().to_string());
            }
            Ok(Some(_)) => return None,
            Ok(None) => std::thread::sleep(Duration::from_millis(50)),
            Err(e) => return Some(format!("waiting for {}: {e}", bin.display())),
        }
    }
    let _ = child.kill();
    let _ = child.wait();
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The shape of clap's `--help`, as the operator prints it.
    const HELP: &str = "\
Usage: gpupool-operator [OPTIONS]

Options:
      --org <ORG>
          This cluster's organisation [env: GPUPOOL_ORG=acme]
      --chain-rpc-url <CHAIN_RPC_URL>
          JSON-RPC URL [env: GPUPOOL_CHAIN_RPC_URL]
  -c, --concurrency <N>
          AiJobs reconciled at once [env: GPUPOOL_CONCURRENCY=] [default: 16]
      --bid-ttl-seconds <BID_TTL_SECONDS>
          [env: GPUPOOL_BID_TTL_SECONDS=] [default: 30]
";

    fn container(env: &[&str], args: &[&str]) -> Container {
        serde_json::from_value(serde_json::json!({
            "name": "operator",
            "env": env.iter().map(|n| serde_json::json!({"name": n, "value": "1"})).collect::<Vec<_>>(),
            "args": args,
        }))
        .unwrap()
    }

    #[test]
    fn settings_the_binary_reads_pass() {
        let c = container(
            &[
                "GPUPOOL_ORG",
                "GPUPOOL_CHAIN_RPC_URL",
                "GPUPOOL_BID_TTL_SECONDS",
                "RUST_LOG",
            ],
            &["--concurrency=8", "--org", "acme"],
        );
        // RUST_LOG and the flag's value are not the binary's settings to check.
        assert_eq!(
            check("gpupool-operator", HELP, &c),
            Checked {
                settings: 5,
                unread: vec![]
            }
        );
    }

    #[test]
    fn a_name_changed_on_one_side_only_is_named() {
        let c = container(&["GPUPOOL_BID_TTL_SECS", "GPUPOOL_ORG"], &["--concurency=8", "--org"]);
        assert_eq!(
            check("gpupool-operator", HELP, &c).unread,
            [
                "the chart sets GPUPOOL_BID_TTL_SECS, which gpupool-operator does not read",
                "the chart passes --concurency, which gpupool-operator does not take",
            ]
        );
        // A prefix of a real name is not that name.
        let c = container(&["GPUPOOL_CHAIN_RPC"], &["--bid-ttl"]);
        assert_eq!(check("gpupool-operator", HELP, &c).unread.len(), 2);
    }

    fn shell(script: &str, env: &[(&str, &str)]) -> Container {
        serde_json::from_value(serde_json::json!({
            "name": "sh",
            "env": env.iter().map(|(n, v)| serde_json::json!({"name": n, "value": v})).collect::<Vec<_>>(),
            "args": ["-c", script],
        }))
        .unwrap()
    }

    #[test]
    fn a_usage_error_is_reported_and_anything_else_is_not() {
        let sh = std::path::Path::new("/bin/sh");
        let refuses = "echo \"error: invalid value '1e+06' for '--x'\" >&2; exit 2";
        assert_eq!(
            refused_values(sh, &shell(refuses, &[])).as_deref(),
            Some("error: invalid value '1e+06' for '--x'")
        );
        // Stopping later, for want of a cluster, is not the values' fault.
        assert_eq!(refused_values(sh, &shell("exit 1", &[])), None);
        // Exactly the container's variables, and none of ours.
        let reads = "test \"$GPUPOOL_X\" = 7 && test -z \"$HOME\" || exit 2";
        assert_eq!(refused_values(sh, &shell(reads, &[("GPUPOOL_X", "7")])), None);
        assert!(refused_values(sh, &shell(reads, &[("GPUPOOL_X", "8")])).is_some());
    }
}

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
}

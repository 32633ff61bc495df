//! The running test environment as a file: `testenv up` writes it, tests and
//! `testenv down` read it.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::cluster::ClusterInfo;

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct TestEnv {
    pub root: PathBuf,
    pub orgs: Vec<ClusterInfo>,
    /// The chain (anvil) with the escrow deployed, when it was started.
    #[serde(default)]
    pub chain: Option<ChainInfo>,
    /// Where the control plane's binaries are, kubectl and helm with them.
    #[serde(default)]
    pub bin_dir: Option<PathBuf>,
}

/// The test chain as the operators and the CLI find it.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ChainInfo {
    pub pid: u32,
    pub url: String,
    /// `ChainConfig` JSON: RPC URL, chain id, escrow and token addresses.
    pub config: PathBuf,
    /// Wallet key file per organisation, "renter" and "provider" for members
    /// without a cluster, and "deployer", the token's owner, who mints.
    pub wallets: std::collections::BTreeMap<String, PathBuf>,
}

pub const ENV_FILE: &str = "env.json";

/// Where the environment lives: `$GPUPOOL_TESTENV`, else `e2e/.state` in the
/// workspace.
pub fn default_root() -> PathBuf {
    std::env::var_os("GPUPOOL_TESTENV")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join(".state"))
}

impl TestEnv {
    pub fn load(root: &Path) -> anyhow::Result<Self> {
        let path = root.join(ENV_FILE);
        let text = std::fs::read_to_string(&path).map_err(|e| {
            anyhow::anyhow!(
                "no test environment at {} ({e}); start one with `make testenv-up`",
                path.display()
            )
        })?;
        Ok(serde_json::from_str(&text)?)
    }

    pub fn save(&self) -> anyhow::Result<()> {
        std::fs::write(self.root.join(ENV_FILE), serde_json::to_string_pretty(self)?)?;
        Ok(())
    }

    /// One of the test environment's own tools (kubectl, helm), by name.
    pub fn tool(&self, name: &str) -> anyhow::Result<PathBuf> {
        let dir = self
            .bin_dir
            .as_ref()
            .ok_or_else(|| anyhow::anyhow!("this test environment predates bin_dir in env.json; restart it"))?;
        Ok(dir.join(name))
    }

    pub fn org(&self, name: &str) -> Option<&ClusterInfo> {
        self.orgs.iter().find(|o| o.org.name == name)
    }
}

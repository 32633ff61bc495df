//! The test chain: anvil from the npm package `@foundry-rs/anvil-linux-amd64`
//! (installed by `make chain-tools` into contracts/node_modules), bound to
//! loopback, with gpupool's contracts deployed and wallets funded.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context as _;
use gpupool_chain::{ChainConfig, Wallet, deploy};
use serde::{Deserialize, Serialize};

use crate::cluster::{free_port, spawn, stop, wait_for};

/// anvil's chain id; kept explicit so configs written here say what they mean.
pub const CHAIN_ID: u64 = 31337;
/// Every funded wallet gets this many whole tokens.
pub const FUNDING_TOKENS: u128 = 1_000_000;
pub const ONE_TOKEN: u128 = 1_000_000_000_000_000_000;

/// The anvil binary: `$GPUPOOL_ANVIL`, else the npm package under contracts/.
pub fn anvil_bin() -> anyhow::Result<PathBuf> {
    if let Some(p) = std::env::var_os("GPUPOOL_ANVIL") {
        return Ok(PathBuf::from(p));
    }
    let p =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../contracts/node_modules/@foundry-rs/anvil-linux-amd64/bin/anvil");
    anyhow::ensure!(
        p.exists(),
        "anvil is not installed at {}: run `make chain-tools`",
        p.display()
    );
    Ok(p)
}

/// A running anvil. Dropping it stops it unless it was `detach`ed.
#[derive(Debug, Serialize, Deserialize, Clone)]
pub struct Anvil {
    pub pid: u32,
    pub port: u16,
    pub url: String,
    /// Private keys of anvil's funded development accounts (public, well-known
    /// test keys; they exist only on this local chain).
    pub keys: Vec<String>,
    #[serde(skip)]
    owned: bool,
}

#[derive(Deserialize)]
struct AnvilConfigOut {
    private_keys: Vec<String>,
}

impl Anvil {
    /// Starts anvil on a free loopback port, state and log under `dir`.
    pub async fn start(dir: &Path) -> anyhow::Result<Self> {
        std::fs::create_dir_all(dir)?;
        let port = free_port()?;
        let config_out = dir.join("anvil-accounts.json");
        let _ = std::fs::remove_file(&config_out);
        let pid = spawn(
            &anvil_bin()?,
            &[
                "--host".into(),
                "127.0.0.1".into(),
                "--port".into(),
                port.to_string(),
                "--chain-id".into(),
                CHAIN_ID.to_string(),
                "--accounts".into(),
                "12".into(),
                "--config-out".into(),
                config_out.display().to_string(),
            ],
            &[],
            &dir.join("anvil.log"),
        )?;
        let mut anvil = Self {
            pid,
            port,
            url: format!("http://127.0.0.1:{port}"),
            keys: Vec::new(),
            owned: true,
        };
        let keys = wait_for(Duration::from_secs(20), "anvil to write its accounts", || {
            let path = config_out.clone();
            async move {
                let text = std::fs::read_to_string(path).ok()?;
                serde_json::from_str::<AnvilConfigOut>(&text)
                    .ok()
                    .map(|c| c.private_keys)
            }
        })
        .await?;
        anvil.keys = keys;
        let url = anvil.url.clone();
        wait_for(Duration::from_secs(20), "anvil to answer", || {
            let url = url.clone();
            async move {
                std::net::TcpStream::connect(url.trim_start_matches("http://"))
                    .ok()
                    .map(|_| ())
            }
        })
        .await?;
        Ok(anvil)
    }

    pub fn wallet(&self, index: usize) -> anyhow::Result<Wallet> {
        let key = self
            .keys
            .get(index)
            .with_context(|| format!("anvil has no account {index}"))?;
        Ok(Wallet::from_hex(key)?)
    }

    /// Leaves it running after this value is dropped (the test environment's chain).
    pub fn detach(mut self) -> Self {
        self.owned = false;
        self
    }

    pub fn stop(&self) {
        stop(&[self.pid]);
    }
}

impl Drop for Anvil {
    fn drop(&mut self) {
        if self.owned {
            stop(&[self.pid]);
        }
    }
}

/// Deploys the token and escrow with account 0 and mints `FUNDING_TOKENS` to
/// each of `funded` accounts.
pub async fn deploy_and_fund(anvil: &Anvil, funded: &[usize]) -> anyhow::Result<ChainConfig> {
    let deployer = anvil.wallet(0)?;
    let config = deploy::deploy(&anvil.url, &deployer).await?;
    for &i in funded {
        deploy::mint(
            &config,
            &deployer,
            anvil.wallet(i)?.address(),
            FUNDING_TOKENS * ONE_TOKEN,
        )
        .await?;
    }
    Ok(config)
}

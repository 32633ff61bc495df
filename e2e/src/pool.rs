//! A pool of operators over the test environment's clusters: each org's
//! operator joins the pool on its own loopback port, bootstraps from the
//! others, settles on the environment's anvil, and lends at the prices given.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::str::FromStr;

use gpupool_chain::{Address, ChainConfig, ClientOptions, EscrowClient, Wallet};

use crate::cluster::free_port;
use crate::env::TestEnv;
use crate::harness::Operator;

/// One organisation's lending policy in the pool fixture.
#[derive(Clone, Debug)]
pub struct Lends {
    pub org: &'static str,
    /// (model, price per GPU-hour)
    pub prices: Vec<(&'static str, &'static str)>,
    /// Organisations this one refuses to deal with.
    pub denied: Vec<&'static str>,
    /// `maxHeldGpusPerRenter`; 0: no limit.
    pub max_held_per_renter: u32,
}

impl Lends {
    /// The test organisations' price lists: each lends its own fleet (acme
    /// H100 at 2.5, bravo A100 at 2, corvus L40S at 2.2) and denies no one.
    pub fn every_org() -> Vec<Lends> {
        [
            ("acme", "H100", "2.5"),
            ("bravo", "A100", "2"),
            ("corvus", "L40S", "2.2"),
        ]
        .into_iter()
        .map(|(org, model, price)| Lends {
            org,
            prices: vec![(model, price)],
            denied: vec![],
            max_held_per_renter: 0,
        })
        .collect()
    }
}

/// Timings short enough for tests; the defaults are for real pools.
pub fn fast_flags() -> Vec<String> {
    vec![
        "--advert-every-ms=400".into(),
        "--heartbeat-every-ms=400".into(),
        "--heartbeat-grace-ms=4000".into(),
        "--bid-ttl-seconds=30".into(),
        "--confirmations=1".into(),
        "--withdraw-every-seconds=600".into(),
        "--chain-resync-seconds=1".into(),
    ]
}

pub struct Member {
    pub org: String,
    pub port: u16,
    pub args: Vec<String>,
    pub operator: Option<Operator>,
    pub wallet: Address,
}

/// A Pool API served over TLS in a test.
pub struct ServedApi {
    /// https://127.0.0.1:PORT
    pub url: String,
    /// The CA certificate its serving certificate chains to.
    pub ca: PathBuf,
    /// The certificate and key files the operator serves from.
    pub files: crate::certs::CertFiles,
    /// A directory of its own, for more certificates.
    pub dir: PathBuf,
}

pub struct Pool {
    pub members: BTreeMap<String, Member>,
    pub chain: EscrowClient,
    pub config: ChainConfig,
    run: u32,
}

impl Pool {
    /// Starts one operator per `lends` entry, all in one pool, with the
    /// short timings tests use (`fast_flags`).
    pub async fn start(env: &TestEnv, tag: &str, lends: &[Lends], extra: &[String]) -> anyhow::Result<Self> {
        let mut flags = fast_flags();
        flags.extend_from_slice(extra);
        Self::start_with_flags(env, tag, lends, &flags).await
    }

    /// Starts the pool with exactly `flags` besides the membership ones:
    /// the benchmarks run operators at the timings users get by default.
    pub async fn start_with_flags(env: &TestEnv, tag: &str, lends: &[Lends], flags: &[String]) -> anyhow::Result<Self> {
        Self::start_members(env, tag, lends, flags, &|_, _| vec![]).await
    }

    /// Starts the pool with the test timings, `extra(org, port)` adding flags
    /// to each member given its org and its own p2p port; one the pool sets
    /// (`--p2p-listen=…`, `--bootstrap=…`) replaces the pool's.
    pub async fn start_with_extra(
        env: &TestEnv,
        tag: &str,
        lends: &[Lends],
        extra: &dyn Fn(&str, u16) -> Vec<String>,
    ) -> anyhow::Result<Self> {
        Self::start_members(env, tag, lends, &fast_flags(), extra).await
    }

    /// Starts the pool with the test timings and `extra` flags, `org`'s
    /// operator also serving the Pool API over TLS on a loopback port, with
    /// a certificate from a CA made for it; returns the pool and where and
    /// how the API is served.
    pub async fn start_serving_pool_api(
        env: &TestEnv,
        tag: &str,
        lends: &[Lends],
        org: &str,
        extra: &[String],
    ) -> anyhow::Result<(Self, ServedApi)> {
        let port = free_port()?;
        let dir = env
            .org(org)
            .ok_or_else(|| anyhow::anyhow!("no org {org} in the test environment"))?
            .dir
            .join(format!("pool-api-{tag}"));
        std::fs::create_dir_all(&dir)?;
        let ca = crate::certs::Ca::create(&dir, "pool-api")?;
        let serving = ca.serving(&dir, "pool-api", "gpupool-pool-api", &["127.0.0.1", "localhost"])?;
        let mut flags = fast_flags();
        flags.extend_from_slice(extra);
        let api_flags = vec![
            format!("--pool-api-addr=127.0.0.1:{port}"),
            format!("--pool-api-tls-cert={}", serving.cert.display()),
            format!("--pool-api-tls-key={}", serving.key.display()),
        ];
        let pool = Self::start_members(env, tag, lends, &flags, &|o, _| {
            if o == org { api_flags.clone() } else { vec![] }
        })
        .await?;
        Ok((
            pool,
            ServedApi {
                url: format!("https://127.0.0.1:{port}"),
                ca: ca.cert_path,
                files: serving,
                dir,
            },
        ))
    }

    async fn start_members(
        env: &TestEnv,
        tag: &str,
        lends: &[Lends],
        flags: &[String],
        extra_for: &dyn Fn(&str, u16) -> Vec<String>,
    ) -> anyhow::Result<Self> {
        let chain_info = env
            .chain
            .as_ref()
            .ok_or_else(|| anyhow::anyhow!("the test environment has no chain"))?;
        let config = ChainConfig::load(&chain_info.config)?;
        let chain = EscrowClient::connect(config.clone(), None, ClientOptions::default())?;
        let ports: Vec<u16> = lends.iter().map(|_| free_port()).collect::<Result<_, _>>()?;
        let mut members = BTreeMap::new();
        for (i, l) in lends.iter().enumerate() {
            let org = env
                .org(l.org)
                .ok_or_else(|| anyhow::anyhow!("no org {} in the test environment", l.org))?;
            let key = chain_info
                .wallets
                .get(l.org)
                .ok_or_else(|| anyhow::anyhow!("no wallet for {}", l.org))?;
            let wallet = Wallet::from_file(key)?.address();
            let policy = org.dir.join(format!("policy-{tag}.yaml"));
            let mut yaml = String::from("maxLentGpus: 128\nprices:\n");
            for (model, price) in &l.prices {
                yaml.push_str(&format!("- model: {model:?}\n  pricePerGpuHour: {price:?}\n"));
            }
            if !l.denied.is_empty() {
                yaml.push_str(&format!("deniedOrgs: {:?}\n", l.denied));
            }
            if l.max_held_per_renter > 0 {
                yaml.push_str(&format!("maxHeldGpusPerRenter: {}\n", l.max_held_per_renter));
            }
            std::fs::write(&policy, yaml)?;
            // Every member listens on TCP and QUIC; every other one dials over
            // QUIC, so pool traffic crosses both transports.
            let bootstrap: Vec<String> = ports
                .iter()
                .enumerate()
                .filter(|(j, _)| *j != i)
                .map(|(_, p)| {
                    if i % 2 == 1 {
                        format!("/ip4/127.0.0.1/udp/{p}/quic-v1")
                    } else {
                        format!("/ip4/127.0.0.1/tcp/{p}")
                    }
                })
                .collect();
            let mut args = vec![
                "--pool".to_string(),
                format!("--chain-config={}", chain_info.config.display()),
                format!("--wallet-key-file={}", key.display()),
                format!("--policy-file={}", policy.display()),
                format!(
                    "--p2p-listen=/ip4/127.0.0.1/tcp/{0},/ip4/127.0.0.1/udp/{0}/quic-v1",
                    ports[i]
                ),
                format!("--bootstrap={}", bootstrap.join(",")),
            ];
            args.extend_from_slice(flags);
            // An extra flag the pool already sets (`--p2p-listen=`,
            // `--bootstrap=`) replaces it: a member behind NAT listens and
            // bootstraps elsewhere.
            let extra = extra_for(l.org, ports[i]);
            let name = |a: &str| a.split_once('=').map(|(n, _)| n.to_string());
            args.retain(|a| name(a).is_none_or(|n| !extra.iter().any(|e| name(e).as_deref() == Some(n.as_str()))));
            args.extend(extra);
            members.insert(
                l.org.to_string(),
                Member {
                    org: l.org.to_string(),
                    port: ports[i],
                    operator: Some(Operator::start_with(org, &format!("{tag}-{}", l.org), &args)),
                    args,
                    wallet,
                },
            );
        }
        let pool = Self {
            members,
            chain,
            config,
            run: 0,
        };
        pool.wait_until_members_hear_each_other(env, lends).await?;
        Ok(pool)
    }

    /// Waits until every member has heard each other lender's capacity
    /// advert, as its `gpupool_pool_gpus_advertised` gauge shows. An order
    /// published before then misses a member, and a test that counts bids
    /// or expects the cheapest would depend on how fast the swarm formed.
    async fn wait_until_members_hear_each_other(&self, env: &TestEnv, lends: &[Lends]) -> anyhow::Result<()> {
        const WITHIN: std::time::Duration = std::time::Duration::from_secs(30);
        let lenders: Vec<(&str, String)> = lends
            .iter()
            .filter_map(|l| {
                let product = &env.org(l.org)?.org.fleet.product;
                l.prices
                    .iter()
                    .any(|(model, _)| product.contains(model))
                    .then(|| (l.org, format!("gpupool_pool_gpus_advertised{{product=\"{product}\"}}")))
            })
            .collect();
        let deadline = std::time::Instant::now() + WITHIN;
        for m in self.members.values() {
            let Some(op) = &m.operator else { continue };
            loop {
                let text = op.metrics().await;
                let missing: Vec<&str> = lenders
                    .iter()
                    .filter(|(org, series)| *org != m.org && !text.contains(series.as_str()))
                    .map(|(org, _)| *org)
                    .collect();
                if missing.is_empty() {
                    break;
                }
                if std::time::Instant::now() > deadline {
                    anyhow::bail!(
                        "{} has not heard the capacity adverts of {} within {WITHIN:?}; see its log {}",
                        m.org,
                        missing.join(", "),
                        op.log.display()
                    );
                }
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            }
        }
        Ok(())
    }

    pub fn operator(&self, org: &str) -> Option<&Operator> {
        self.members.get(org)?.operator.as_ref()
    }

    /// Kills an org's operator the hard way.
    pub fn kill(&mut self, org: &str) {
        if let Some(op) = self.members.get_mut(org).and_then(|m| m.operator.take()) {
            op.kill();
        }
    }

    /// Starts a killed operator again, same identity and port.
    pub fn restart(&mut self, env: &TestEnv, org: &str) -> anyhow::Result<()> {
        self.run += 1;
        let run = self.run;
        let m = self
            .members
            .get_mut(org)
            .ok_or_else(|| anyhow::anyhow!("no member {org}"))?;
        let cluster = env.org(org).ok_or_else(|| anyhow::anyhow!("no org {org}"))?;
        m.operator = Some(Operator::start_with(cluster, &format!("{org}-restart{run}"), &m.args));
        Ok(())
    }

    /// What the org can spend: its wallet plus its escrow account, where
    /// lease payments and refunds land.
    /// Mines a block every second for at most `limit` seconds (until the
    /// handle is aborted). Anvil mines only on transactions, so its clock,
    /// which the escrow's accrual follows, stands still between them; a live
    /// chain's moves on its own, and a running lease needs it to.
    pub fn mine_every_second(&self, limit: u32) -> tokio::task::JoinHandle<()> {
        use alloy::providers::ext::AnvilApi as _;
        let provider = self.chain.provider().clone();
        tokio::spawn(async move {
            for _ in 0..limit {
                if provider.anvil_mine(Some(1), None).await.is_err() {
                    break;
                }
                tokio::time::sleep(std::time::Duration::from_secs(1)).await;
            }
        })
    }

    pub async fn balance(&self, org: &str) -> anyhow::Result<u128> {
        let w = self
            .members
            .get(org)
            .ok_or_else(|| anyhow::anyhow!("no member {org}"))?
            .wallet;
        Ok(self.chain.holdings(w).await?)
    }
}

/// Tokens as base units from a decimal string ("1.25").
pub fn base_units(s: &str) -> u128 {
    gpupool_crds::price::TokenAmount::from_str(s).map(|t| t.0).unwrap_or(0)
}

/// Where an org's operator logs.
pub fn log_of(env: &TestEnv, org: &str, tag: &str) -> Option<PathBuf> {
    Some(env.org(org)?.dir.join("logs").join(format!("operator-{tag}-{org}.log")))
}

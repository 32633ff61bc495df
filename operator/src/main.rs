use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use std::path::PathBuf;

use anyhow::Context as _;
use clap::Parser;
use gpupool_chain::{Address, ChainConfig, ClientOptions, EscrowClient, Wallet};
use gpupool_crds::price::TokenAmount;
use gpupool_operator::controller::{self, Settings};
use gpupool_operator::leader::{Elector, Timing};
use gpupool_operator::market::node::{Market, MarketSettings};
use gpupool_operator::market::policy::ProviderPolicy;
use gpupool_operator::otlp_metrics;
use gpupool_operator::p2p::identity;
use gpupool_operator::p2p::swarm::{self, PeerLimits, PingTimes, RelayService, SwarmConfig};
use gpupool_operator::settlement::{self, SettlementSettings};
use gpupool_operator::sweep::SweepPolicy;
use gpupool_operator::telemetry::{self, Metrics};
use gpupool_operator::traces;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer};

/// The gpupool operator: places AiJobs on this cluster's GPUs.
#[derive(Parser, Debug)]
#[command(version, about)]
struct Args {
    /// This cluster's organisation name.
    #[arg(long, env = "GPUPOOL_ORG", default_value = "local")]
    org: String,
    /// Address for /metrics, /healthz and /readyz.
    #[arg(long, env = "GPUPOOL_METRICS_ADDR", default_value = "0.0.0.0:8080")]
    metrics_addr: SocketAddr,
    /// Seconds before a waiting AiJob checks capacity again.
    #[arg(long, env = "GPUPOOL_WAIT_REQUEUE_SECONDS", default_value_t = 3)]
    wait_requeue_seconds: u64,
    /// AiJobs reconciled at once.
    #[arg(long, env = "GPUPOOL_CONCURRENCY", default_value_t = 16)]
    concurrency: u16,
    /// Log as JSON lines.
    #[arg(long, env = "GPUPOOL_LOG_JSON")]
    log_json: bool,
    /// OTLP/gRPC endpoint to export traces and metrics to (an OpenTelemetry
    /// Collector; Jaeger or Tempo for traces alone), e.g.
    /// http://otel-collector:4317. Unset: no export.
    #[arg(long, env = "OTEL_EXPORTER_OTLP_ENDPOINT")]
    otlp_endpoint: Option<String>,
    /// Milliseconds between metric exports over OTLP (the OpenTelemetry
    /// variable and default).
    #[arg(long, env = "OTEL_METRIC_EXPORT_INTERVAL", default_value_t = 60_000)]
    otlp_metrics_interval_ms: u64,
    #[command(flatten)]
    chain: ChainArgs,
    #[command(flatten)]
    pool: PoolArgs,
    #[command(flatten)]
    leader: LeaderArgs,
}

/// One active replica among several, through a Lease in the operator's namespace.
#[derive(clap::Args, Debug)]
struct LeaderArgs {
    /// Elect a leader before acting; the others stand by. Off only where one
    /// process is certain to run alone.
    #[arg(long, env = "GPUPOOL_LEADER_ELECT", default_value_t = true, action = clap::ArgAction::Set)]
    leader_elect: bool,
    /// The coordination.k8s.io Lease the replicas compete for.
    #[arg(long, env = "GPUPOOL_LEADER_LEASE", default_value = "gpupool-operator")]
    leader_lease: String,
    /// This replica's name in the Lease: the pod's name (a restarted
    /// container takes its own claim straight back); the host and process
    /// id when unset.
    #[arg(long, env = "POD_NAME")]
    leader_identity: Option<String>,
    /// Seconds a leader's claim lasts without renewal: how long a standby
    /// waits after a leader dies without releasing it.
    #[arg(long, env = "GPUPOOL_LEADER_LEASE_SECONDS", default_value_t = 15)]
    leader_lease_seconds: u64,
}

impl LeaderArgs {
    /// This replica's name: in the leader Lease, and on its exported metrics.
    fn identity(&self) -> String {
        self.leader_identity.clone().unwrap_or_else(|| {
            let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
            format!("{}-{}", host.trim(), std::process::id())
        })
    }

    fn elector(&self, client: &kube::Client, namespace: &str) -> Option<Elector> {
        if !self.leader_elect {
            return None;
        }
        let me = self.identity();
        let duration = Duration::from_secs(self.leader_lease_seconds.max(3));
        let timing = Timing {
            lease_duration: duration,
            // client-go's proportions: renew within two thirds of the
            // duration, try every seventh or so.
            renew_deadline: duration * 2 / 3,
            retry_period: (duration / 7).max(Duration::from_millis(500)),
        };
        Some(Elector::new(client.clone(), namespace, &self.leader_lease, &me, timing))
    }
}

/// Membership of the pool. Needs the chain settings (leases are paid on chain).
#[derive(clap::Args, Debug)]
struct PoolArgs {
    /// Join the pool. Off: this cluster only runs its own jobs.
    #[arg(long, env = "GPUPOOL_POOL", default_value_t = false)]
    pool: bool,
    /// Serve the Pool API (gRPC) here, for renters without a cluster, e.g.
    /// 0.0.0.0:7443. Unset: no Pool API. Needs --pool.
    #[arg(long, env = "GPUPOOL_POOL_API_ADDR")]
    pool_api_addr: Option<SocketAddr>,
    /// Serve the Pool API over TLS with this certificate chain (PEM); needs
    /// --pool-api-tls-key. Without both, it is plain gRPC, for a TLS proxy in front.
    #[arg(long, env = "GPUPOOL_POOL_API_TLS_CERT", requires = "pool_api_tls_key")]
    pool_api_tls_cert: Option<PathBuf>,
    /// The key of --pool-api-tls-cert (PEM).
    #[arg(long, env = "GPUPOOL_POOL_API_TLS_KEY", requires = "pool_api_tls_cert")]
    pool_api_tls_key: Option<PathBuf>,
    /// The operator's namespace: its identity Secret and provider Lease copies live here.
    #[arg(long, env = "POD_NAMESPACE", default_value = "gpupool-system")]
    namespace: String,
    /// Secret holding the libp2p identity (created on first start).
    #[arg(long, env = "GPUPOOL_IDENTITY_SECRET", default_value = "gpupool-identity")]
    identity_secret: String,
    /// Multiaddresses to listen on. A member behind NAT that no member can
    /// dial listens through another member's relay as well:
    /// /dns4/pool.dc1.example.org/tcp/4001/p2p/<relay peer id>/p2p-circuit.
    #[arg(
        long = "p2p-listen",
        env = "GPUPOOL_P2P_LISTEN",
        value_delimiter = ',',
        default_value = "/ip4/0.0.0.0/tcp/4001,/ip4/0.0.0.0/udp/4001/quic-v1"
    )]
    listen: Vec<libp2p::Multiaddr>,
    /// Where other members reach this one, when that is not where it
    /// listens (a LoadBalancer's or NodePort's address, a NAT's forwarded
    /// port), e.g. /dns4/pool.dc1.example.org/tcp/4001. Set, peers hear only
    /// these; unset, they hear the listen addresses.
    #[arg(long = "p2p-announce", env = "GPUPOOL_P2P_ANNOUNCE", value_delimiter = ',')]
    announce: Vec<libp2p::Multiaddr>,
    /// Serve as a circuit relay for members behind NAT. It needs an address
    /// they can dial (--p2p-announce, or a routable listen address).
    #[arg(long = "p2p-relay-service", env = "GPUPOOL_P2P_RELAY_SERVICE")]
    relay_service: bool,
    /// Relayed connections the relay service carries at once.
    #[arg(
        long = "p2p-relay-max-circuits",
        env = "GPUPOOL_P2P_RELAY_MAX_CIRCUITS",
        default_value_t = 256
    )]
    relay_max_circuits: usize,
    /// Connections other members may hold open to this one.
    #[arg(long = "p2p-max-incoming", env = "GPUPOOL_P2P_MAX_INCOMING", default_value_t = 512)]
    max_incoming: u32,
    /// Connections to any one peer.
    #[arg(long = "p2p-max-per-peer", env = "GPUPOOL_P2P_MAX_PER_PEER", default_value_t = 4)]
    max_per_peer: u32,
    /// Peer messages whose nonces are remembered until they expire, so a
    /// copy is refused as a replay: about 100 bytes each. A message beyond
    /// it is dropped as overloaded, and one sender beyond a sixteenth of it
    /// as flooding (which counts against its score): with messages living
    /// 60 s, the default lets one member send about 1,000 a second.
    #[arg(
        long = "p2p-replay-capacity",
        env = "GPUPOOL_P2P_REPLAY_CAPACITY",
        default_value_t = 1_000_000,
        value_parser = clap::value_parser!(u64).range(1_600..=100_000_000)
    )]
    replay_capacity: u64,
    /// How often each connection to a member is pinged. Two unanswered
    /// pings in a row close it, so a member that vanished without closing
    /// its connections (a host gone, a NAT mapping dropped) is let go within
    /// about twice (this + the timeout): 70 s by default. Lower both on
    /// links that drop mappings sooner. Failover never waits on this: a
    /// lease's heartbeat grace decides it.
    #[arg(
        long = "p2p-ping-every-seconds",
        env = "GPUPOOL_P2P_PING_EVERY_SECONDS",
        default_value_t = 15,
        value_parser = clap::value_parser!(u64).range(1..=3600)
    )]
    ping_every_seconds: u64,
    /// How long a ping waits for its answer.
    #[arg(
        long = "p2p-ping-timeout-seconds",
        env = "GPUPOOL_P2P_PING_TIMEOUT_SECONDS",
        default_value_t = 20,
        value_parser = clap::value_parser!(u64).range(1..=3600)
    )]
    ping_timeout_seconds: u64,
    /// Bootstrap peers (multiaddresses; /p2p/<peer id> optional).
    #[arg(long = "bootstrap", env = "GPUPOOL_BOOTSTRAP", value_delimiter = ',')]
    bootstrap: Vec<libp2p::Multiaddr>,
    /// Provider policy (prices, lending limit, org lists), YAML. Without it this cluster rents but never lends.
    #[arg(long, env = "GPUPOOL_POLICY_FILE")]
    policy_file: Option<PathBuf>,
    #[arg(long, env = "GPUPOOL_ADVERT_EVERY_MS", default_value_t = 5000)]
    advert_every_ms: u64,
    #[arg(long, env = "GPUPOOL_HEARTBEAT_EVERY_MS", default_value_t = 2000)]
    heartbeat_every_ms: u64,
    /// A provider silent this long is taken as failed and the job re-auctioned.
    #[arg(long, env = "GPUPOOL_HEARTBEAT_GRACE_MS", default_value_t = 15000)]
    heartbeat_grace_ms: u64,
    /// How long a bid, and the GPUs it reserves, stay valid.
    #[arg(long, env = "GPUPOOL_BID_TTL_SECONDS", default_value_t = 60)]
    bid_ttl_seconds: u64,
    /// The lease deposit covers this much of the job (at most its
    /// maxDuration); while the job runs, each top-up adds as much again,
    /// until the lease holds all of the job's maxDuration. At least 10.
    #[arg(long, env = "GPUPOOL_DEPOSIT_SECONDS", default_value_t = 3600)]
    deposit_seconds: u64,
    /// How long this provider keeps the record (its Lease copy) of a lease
    /// it lent after the lease closed; 0 keeps them for good. 30 days by default.
    #[arg(long, env = "GPUPOOL_CLOSED_LEASE_RETENTION_SECONDS", default_value_t = 30 * 86_400)]
    closed_lease_retention_seconds: u64,
    #[command(flatten)]
    faults: Faults,
}

/// Fault injection, for the end-to-end suite only. Built in with the
/// `fault-injection` feature, which the e2e crate turns on for the binaries
/// `cargo build --workspace` builds; `make image` builds the operator alone,
/// so the binary the chart runs has no such flags and no pool can be run
/// with them by mistake.
#[cfg(feature = "fault-injection")]
#[derive(clap::Args, Debug)]
struct Faults {
    /// Every direct message to a member goes out twice at once, each copy
    /// sealed anew, as a resend does when the connection closed under a
    /// message that had in fact arrived. The end-to-end suite runs a whole
    /// placement so, to show that a second copy of any message changes
    /// nothing. Hidden: no pool wants it.
    #[arg(long = "fault-deliver-twice", hide = true)]
    fault_deliver_twice: bool,
    /// With --fault-deliver-twice: the second copy goes out this many
    /// milliseconds after the first was answered, behind the messages sent
    /// since, as a resend that waited on a new connection arrives. 0: both
    /// at once.
    #[arg(
        long = "fault-second-copy-after-ms",
        hide = true,
        default_value_t = 0,
        requires = "fault_deliver_twice"
    )]
    fault_second_copy_after_ms: u64,
}

#[cfg(feature = "fault-injection")]
impl Faults {
    /// When the second copy of every direct message goes out, if at all.
    fn deliver_twice(&self) -> Option<Duration> {
        self.fault_deliver_twice
            .then_some(Duration::from_millis(self.fault_second_copy_after_ms))
    }
}

/// Without the `fault-injection` feature: no flags, no faults.
#[cfg(not(feature = "fault-injection"))]
#[derive(clap::Args, Debug)]
struct Faults {}

#[cfg(not(feature = "fault-injection"))]
impl Faults {
    fn deliver_twice(&self) -> Option<Duration> {
        None
    }
}

/// The shortest deposit period: a lease topped up more often than this
/// would spend more on gas than on GPUs.
const MIN_DEPOSIT_SECONDS: u64 = 10;

/// Settlement on chain. Without an RPC URL (from the file or the flag) the
/// settlement worker does not run and Leases with an escrow stay untouched.
#[derive(clap::Args, Debug)]
struct ChainArgs {
    /// JSON file with rpcUrl, chainId, escrow, token and fromBlock (the test environment writes one).
    #[arg(long, env = "GPUPOOL_CHAIN_CONFIG")]
    chain_config: Option<PathBuf>,
    /// JSON-RPC URL; overrides the file's. Never logged: hosted URLs carry keys.
    #[arg(long, env = "GPUPOOL_CHAIN_RPC_URL", hide_env_values = true)]
    chain_rpc_url: Option<String>,
    #[arg(long, env = "GPUPOOL_CHAIN_ID")]
    chain_id: Option<u64>,
    #[arg(long, env = "GPUPOOL_ESCROW_ADDRESS")]
    escrow_address: Option<Address>,
    #[arg(long, env = "GPUPOOL_TOKEN_ADDRESS")]
    token_address: Option<Address>,
    /// File holding this organisation's wallet key (mount the Secret here).
    #[arg(long, env = "GPUPOOL_WALLET_KEY_FILE")]
    wallet_key_file: Option<PathBuf>,
    /// Blocks before a lease counts as Active (the open's own block is the first).
    #[arg(long, env = "GPUPOOL_CONFIRMATIONS", default_value_t = 1)]
    confirmations: u64,
    /// How often providers withdraw what has accrued.
    #[arg(long, env = "GPUPOOL_WITHDRAW_EVERY_SECONDS", default_value_t = 300)]
    withdraw_every_seconds: u64,
    /// Warn the renter when a lease's funds last less than this; the
    /// renter's operator tops a running lease up then.
    #[arg(long, env = "GPUPOOL_FUNDS_WARNING_SECONDS", default_value_t = 900)]
    funds_warning_seconds: u64,
    /// Longest time between two reads of an open lease.
    #[arg(long, env = "GPUPOOL_CHAIN_RESYNC_SECONDS", default_value_t = 30)]
    chain_resync_seconds: u64,
    /// How often to poll the escrow's events, so a lease the other side (or
    /// the chain's clock) changed is read now rather than at its resync.
    #[arg(long, env = "GPUPOOL_CHAIN_POLL_MS", default_value_t = 1000)]
    chain_poll_ms: u64,
    /// Sweep earnings out of the escrow account to this address: a cold
    /// wallet whose key is not in the cluster, or this wallet's own. What
    /// the account holds beyond --sweep-keep goes, once it is at least
    /// --sweep-minimum. Without it earnings stay in the account.
    #[arg(long, env = "GPUPOOL_SWEEP_TO")]
    sweep_to: Option<Address>,
    /// Tokens the sweep leaves in the escrow account: they fund this
    /// member's own leases as a renter, before its wallet does.
    #[arg(long, env = "GPUPOOL_SWEEP_KEEP", default_value = "0")]
    sweep_keep: TokenAmount,
    /// The least one sweep sends: smaller excesses wait, so gas is not spent on dust.
    #[arg(long, env = "GPUPOOL_SWEEP_MINIMUM", default_value = "1")]
    sweep_minimum: TokenAmount,
    /// How often the sweep reads the escrow account.
    #[arg(long, env = "GPUPOOL_SWEEP_EVERY_SECONDS", default_value_t = 300)]
    sweep_every_seconds: u64,
}

impl ChainArgs {
    fn sweep(&self, chain: &ChainConfig) -> anyhow::Result<Option<SweepPolicy>> {
        let Some(to) = self.sweep_to else {
            return Ok(None);
        };
        if let Some(what) = gpupool_operator::sweep::lost_at(to, chain.escrow, chain.token) {
            anyhow::bail!("--sweep-to is {what}: tokens swept there would be lost; name a wallet you hold the key to");
        }
        Ok(Some(SweepPolicy {
            to,
            keep: self.sweep_keep,
            minimum: self.sweep_minimum,
            every: Duration::from_secs(self.sweep_every_seconds.max(1)),
        }))
    }

    fn config(&self) -> anyhow::Result<Option<ChainConfig>> {
        let mut config = match &self.chain_config {
            Some(p) => Some(ChainConfig::load(p)?),
            None => None,
        };
        if let Some(url) = &self.chain_rpc_url {
            let c = config.get_or_insert_with(|| ChainConfig {
                rpc_url: String::new(),
                chain_id: 0,
                escrow: Address::ZERO,
                token: Address::ZERO,
                from_block: 0,
            });
            c.rpc_url.clone_from(url);
        }
        let Some(mut c) = config else { return Ok(None) };
        if let Some(v) = self.chain_id {
            c.chain_id = v;
        }
        if let Some(v) = self.escrow_address {
            c.escrow = v;
        }
        if let Some(v) = self.token_address {
            c.token = v;
        }
        anyhow::ensure!(c.chain_id != 0, "--chain-id is required with --chain-rpc-url");
        anyhow::ensure!(
            c.escrow != Address::ZERO,
            "--escrow-address is required with --chain-rpc-url"
        );
        anyhow::ensure!(
            c.token != Address::ZERO,
            "--token-address is required with --chain-rpc-url"
        );
        Ok(Some(c))
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    gpupool_crds::org::check_org_name(&args.org).context("--org")?;
    if args.pool.pool {
        anyhow::ensure!(
            args.pool.heartbeat_grace_ms > args.pool.heartbeat_every_ms,
            "--heartbeat-grace-ms ({}) must be longer than --heartbeat-every-ms ({}): a provider would be taken for failed between two heartbeats",
            args.pool.heartbeat_grace_ms,
            args.pool.heartbeat_every_ms
        );
    }
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info,kube=warn,libp2p_gossipsub=error"));
    let logs = if args.log_json {
        tracing_subscriber::fmt::layer().json().boxed()
    } else {
        tracing_subscriber::fmt::layer().boxed()
    };
    let (spans, tracer_provider) = match args.otlp_endpoint.as_deref().filter(|e| !e.is_empty()) {
        Some(endpoint) => {
            let (layer, provider) = traces::layer(endpoint, &args.org)?;
            (Some(layer), Some(provider))
        }
        None => (None, None),
    };
    tracing_subscriber::registry()
        .with(logs.with_filter(filter))
        .with(spans)
        .init();
    if let Some(endpoint) = &args.otlp_endpoint {
        tracing::info!(%endpoint, "exporting traces over OTLP");
    }
    let result = run(args).await;
    if let Some(p) = tracer_provider
        && let Err(e) = p.shutdown()
    {
        tracing::warn!(error = %e, "could not flush the last spans");
    }
    result
}

async fn run(args: Args) -> anyhow::Result<()> {
    let client = kube::Client::try_default()
        .await
        .context("connecting to the Kubernetes API")?;
    let metrics = Arc::new(Metrics::default());
    let bound = telemetry::serve(args.metrics_addr, metrics.clone())
        .await
        .context("binding the metrics address")?;
    tracing::info!(org = %args.org, metrics = %bound, "gpupool operator starting");
    // Before the election, so a standby reports itself too; each replica's
    // series carry its own service.instance.id.
    if let Some(endpoint) = args.otlp_endpoint.as_deref().filter(|e| !e.is_empty()) {
        let every = Duration::from_millis(args.otlp_metrics_interval_ms.max(100));
        otlp_metrics::start(endpoint, &args.org, &args.leader.identity(), metrics.clone(), every)?;
    }
    // Every replica answers the Pool API: it only writes AiJobs, which the
    // leader's controllers then act on, so a standby behind the same Service
    // serves renters too.
    if let Some(addr) = args.pool.pool_api_addr {
        anyhow::ensure!(
            args.pool.pool,
            "--pool-api-addr needs --pool: the Pool API places jobs in the pool"
        );
        let config = args
            .chain
            .config()?
            .context("--pool-api-addr needs the chain settings")?;
        let key = args
            .chain
            .wallet_key_file
            .as_deref()
            .context("--pool-api-addr needs --wallet-key-file: renters approve its wallet as their agent")?;
        let agent = Wallet::from_file(key)?.address();
        // Read-only: the Pool API only checks a renter's funding; the leader's settlement opens leases.
        let chain = EscrowClient::connect(config, None, ClientOptions::default())?;
        let tls = match (&args.pool.pool_api_tls_cert, &args.pool.pool_api_tls_key) {
            (Some(cert), Some(key)) => Some(gpupool_operator::pool_api::TlsFiles {
                cert: cert.clone(),
                key: key.clone(),
            }),
            _ => None,
        };
        gpupool_operator::pool_api::serve(
            addr,
            tls,
            client.clone(),
            chain,
            agent,
            args.org.clone(),
            metrics.clone(),
        )
        .await?;
    }
    // Nothing that acts (settlement, the pool's identity and swarm, the
    // controllers) starts before this replica leads.
    let elector = args.leader.elector(&client, &args.pool.namespace);
    if let Some(e) = &elector {
        tracing::info!(identity = %e.identity(), lease = %args.leader.leader_lease, "electing a leader");
        metrics.leading(false);
        e.acquire().await?;
    }
    metrics.leading(true);
    let settings = Settings {
        org: args.org,
        wait_requeue: Duration::from_secs(args.wait_requeue_seconds.max(1)),
        concurrency: args.concurrency.max(1),
    };
    let settlement = match args.chain.config()? {
        Some(config) => {
            let sweep = args.chain.sweep(&config)?;
            let key = args
                .chain
                .wallet_key_file
                .as_deref()
                .context("--wallet-key-file is required to settle on chain")?;
            let wallet = Wallet::from_file(key)?;
            let m = metrics.clone();
            let chain = EscrowClient::connect(config, Some(&wallet), ClientOptions::default())?
                .with_observer(Arc::new(move |tx| m.observe_tx(tx)));
            if let Err(e) = chain.verify().await {
                // Not fatal: the RPC may come up later; Leases will say so meanwhile.
                tracing::warn!(error = %e, "the chain is not usable yet");
            }
            tracing::info!(wallet = %wallet.address(), escrow = %chain.config().escrow, chain_id = chain.config().chain_id, "settling leases on chain");
            let s = SettlementSettings {
                confirmations: args.chain.confirmations.max(1),
                withdraw_every: Duration::from_secs(args.chain.withdraw_every_seconds.max(1)),
                warn_below: Duration::from_secs(args.chain.funds_warning_seconds),
                top_up_for: Duration::from_secs(args.pool.deposit_seconds.max(MIN_DEPOSIT_SECONDS)),
                resync: Duration::from_secs(args.chain.chain_resync_seconds.max(1)),
                poll: Duration::from_millis(args.chain.chain_poll_ms.max(50)),
                sweep,
            };
            Some(settlement::run(client.clone(), Arc::new(chain), s, metrics.clone()))
        }
        None => {
            anyhow::ensure!(
                args.chain.sweep_to.is_none(),
                "--sweep-to needs the chain settings (--chain-config or --chain-rpc-url): the sweep is a transaction on chain"
            );
            tracing::info!("no chain configured (--chain-config or --chain-rpc-url): settlement is off");
            None
        }
    };
    let market = if args.pool.pool {
        let config = args
            .chain
            .config()?
            .context("--pool needs the chain settings: leases are paid on chain")?;
        let key = args
            .chain
            .wallet_key_file
            .as_deref()
            .context("--pool needs --wallet-key-file")?;
        let wallet = Wallet::from_file(key)?;
        // Read-only: the market checks leases and funds on chain and signs
        // its identity with the wallet, but only settlement sends. Each
        // client keeps its own nonce counter, so a second sender with the
        // same wallet would race the first for nonces ("nonce too low").
        let chain = EscrowClient::connect(config, None, ClientOptions::default())?;
        let policy = match &args.pool.policy_file {
            Some(p) => ProviderPolicy::load(p)?,
            None => ProviderPolicy::default(),
        };
        let identity = identity::load_or_create(&client, &args.pool.namespace, &args.pool.identity_secret).await?;
        let (p2p, inbound) = swarm::start(
            identity.clone(),
            SwarmConfig {
                listen: args.pool.listen.clone(),
                bootstrap: args.pool.bootstrap.clone(),
                announce: args.pool.announce.clone(),
                relay_service: args.pool.relay_service.then(|| RelayService {
                    max_circuits: args.pool.relay_max_circuits.max(1),
                    ..RelayService::default()
                }),
                limits: PeerLimits {
                    max_incoming: args.pool.max_incoming,
                    max_per_peer: args.pool.max_per_peer,
                    ..PeerLimits::default()
                },
                ping: PingTimes {
                    interval: Duration::from_secs(args.pool.ping_every_seconds),
                    timeout: Duration::from_secs(args.pool.ping_timeout_seconds),
                },
                ..Default::default()
            },
        )
        .await?;
        let (wake_tx, wake_rx) = tokio::sync::mpsc::channel(4096);
        let deliver_twice = args.pool.faults.deliver_twice();
        if let Some(after) = deliver_twice {
            tracing::warn!(
                second_copy_after_ms = after.as_millis() as u64,
                "--fault-deliver-twice is on: every direct message goes out twice; it is for tests"
            );
        }
        let market = Market::new(
            p2p,
            identity,
            client.clone(),
            Arc::new(chain),
            &wallet,
            MarketSettings {
                org: settings.org.clone(),
                namespace: args.pool.namespace.clone(),
                advert_every: Duration::from_millis(args.pool.advert_every_ms.max(100)),
                heartbeat_every: Duration::from_millis(args.pool.heartbeat_every_ms.max(100)),
                heartbeat_grace: Duration::from_millis(args.pool.heartbeat_grace_ms.max(500)),
                bid_ttl: Duration::from_secs(args.pool.bid_ttl_seconds.max(1)),
                deposit_seconds: args.pool.deposit_seconds.max(MIN_DEPOSIT_SECONDS),
                message_ttl: Duration::from_secs(60),
                // Checked by clap to be at most 100 million.
                replay_capacity: usize::try_from(args.pool.replay_capacity).unwrap_or(usize::MAX),
                policy,
                closed_lease_retention: Duration::from_secs(args.pool.closed_lease_retention_seconds),
                deliver_twice,
            },
            metrics.clone(),
            wake_tx,
        );
        market.log_started();
        tokio::spawn(market.clone().run(inbound));
        Some((market, wake_rx))
    } else {
        None
    };
    let metrics_on_exit = metrics.clone();
    let placement = controller::run(client, settings, metrics, market);
    let work = async move {
        match settlement {
            Some(s) => tokio::try_join!(placement, s).map(|_| ()),
            None => placement.await,
        }
    };
    let Some(elector) = elector else {
        return work.await;
    };
    tokio::select! {
        done = work => {
            // A clean stop (SIGTERM): hand over now, not a lease duration later.
            elector.release().await;
            Ok(done?)
        }
        // Another replica may already act: stop at once, and let the
        // Deployment restart this one as a candidate.
        lost = elector.hold() => {
            metrics_on_exit.leading(false);
            Err(anyhow::Error::new(lost))
        }
    }
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::Args;

    /// The binary `make image` builds, and the chart runs, refuses the
    /// fault flags as it refuses any unknown flag.
    #[cfg(not(feature = "fault-injection"))]
    #[test]
    fn without_the_feature_the_fault_flags_are_unknown() {
        for flag in ["--fault-deliver-twice", "--fault-second-copy-after-ms=10"] {
            let err = Args::try_parse_from(["gpupool-operator", flag]).expect_err(flag);
            assert_eq!(err.kind(), clap::error::ErrorKind::UnknownArgument, "{flag}: {err}");
        }
    }

    #[cfg(feature = "fault-injection")]
    #[test]
    fn with_the_feature_a_late_second_copy_needs_the_first() {
        let args = Args::try_parse_from([
            "gpupool-operator",
            "--fault-deliver-twice",
            "--fault-second-copy-after-ms=250",
        ])
        .expect("both flags");
        assert_eq!(
            args.pool.faults.deliver_twice(),
            Some(std::time::Duration::from_millis(250))
        );
        let err = Args::try_parse_from(["gpupool-operator", "--fault-second-copy-after-ms=250"]).expect_err("alone");
        assert_eq!(err.kind(), clap::error::ErrorKind::MissingRequiredArgument, "{err}");
        let plain = Args::try_parse_from(["gpupool-operator"]).expect("no flags");
        assert_eq!(plain.pool.faults.deliver_twice(), None);
    }

    #[test]
    fn a_sweep_names_a_real_address_and_amounts_in_tokens() {
        let args = Args::try_parse_from([
            "gpupool-operator",
            "--sweep-to=0x00000000000000000000000000000000000c01d5",
            "--sweep-keep=2.5",
        ])
        .expect("a sweep");
        let chain = gpupool_chain::ChainConfig {
            rpc_url: "http://127.0.0.1:8545".into(),
            chain_id: 31337,
            escrow: gpupool_chain::Address::repeat_byte(0xe5),
            token: gpupool_chain::Address::repeat_byte(0x70),
            from_block: 0,
        };
        let p = args.chain.sweep(&chain).expect("valid").expect("on");
        assert_eq!(p.keep, gpupool_crds::price::TokenAmount(2_500_000_000_000_000_000));
        assert_eq!(
            p.minimum,
            gpupool_crds::price::TokenAmount(1_000_000_000_000_000_000),
            "one token by default"
        );
        assert_eq!(p.every, std::time::Duration::from_secs(300));

        let none = Args::try_parse_from(["gpupool-operator", "--sweep-keep=2.5"]).expect("no sweep");
        assert_eq!(none.chain.sweep(&chain).expect("valid"), None, "no address, no sweep");

        let zero = Args::try_parse_from([
            "gpupool-operator",
            "--sweep-to=0x0000000000000000000000000000000000000000",
        ])
        .expect("parses");
        let err = zero.chain.sweep(&chain).expect_err("the zero address");
        assert!(err.to_string().contains("zero address"), "{err}");
        let escrow = Args::try_parse_from([
            "gpupool-operator",
            "--sweep-to=0xe5e5e5e5e5e5e5e5e5e5e5e5e5e5e5e5e5e5e5e5",
        ])
        .expect("parses");
        let err = escrow.chain.sweep(&chain).expect_err("the escrow");
        assert!(err.to_string().contains("the escrow contract"), "{err}");

        let err = Args::try_parse_from(["gpupool-operator", "--sweep-keep=lots"]).expect_err("not an amount");
        assert_eq!(err.kind(), clap::error::ErrorKind::ValueValidation, "{err}");
    }
}

//! Prometheus metrics and the health endpoints, served on one port.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::routing::get;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

use crate::capacity::NodeGpus;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ProductState {
    product: String,
    state: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Product {
    product: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Call {
    call: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct SideState {
    side: String,
    state: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct HeldIn {
    held_in: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Reason {
    reason: String,
}

/// The operator's metrics. Names are `gpupool_*`; the chart's dashboard
/// queries only names registered here.
pub struct Metrics {
    registry: Mutex<Registry>,
    reconciles: Counter,
    reconcile_errors: Counter,
    reconcile_seconds: Histogram,
    local_placements: Counter,
    gpus: Family<ProductState, Gauge>,
    chain_tx_gas: Family<Call, Histogram>,
    chain_tx_seconds: Family<Call, Histogram>,
    chain_errors: Family<Reason, Counter>,
    tokens_received: Counter<f64, std::sync::atomic::AtomicU64>,
    tokens_deposited: Counter<f64, std::sync::atomic::AtomicU64>,
    tokens_swept: Counter<f64, std::sync::atomic::AtomicU64>,
    balance: Family<HeldIn, Gauge<f64, std::sync::atomic::AtomicU64>>,
    leases: Family<SideState, Gauge>,
    leader: Gauge,
    pool_api_requests: Family<ApiCall, Counter>,
    /// (product, lent | rented) pairs last set on `gpus`, so that one whose
    /// leases have all closed goes back to zero.
    lease_gpus: Mutex<std::collections::BTreeSet<(String, String)>>,
    pool: PoolMetrics,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ApiCall {
    method: String,
    code: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Kind {
    kind: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PunchResult {
    result: String,
}

/// What happened to a pool lease, the `kind` of `gpupool_pool_leases_total`.
/// A closed set, so alert rules and dashboards can be checked against it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PoolLeaseEvent {
    RenterOpened,
    RenterCompleted,
    RenterOutOfFunds,
    RenterFailedOver,
    ProviderAccepted,
    ProviderCleanedUp,
}

impl PoolLeaseEvent {
    pub const ALL: [PoolLeaseEvent; 6] = [
        Self::RenterOpened,
        Self::RenterCompleted,
        Self::RenterOutOfFunds,
        Self::RenterFailedOver,
        Self::ProviderAccepted,
        Self::ProviderCleanedUp,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::RenterOpened => "renter_opened",
            Self::RenterCompleted => "renter_completed",
            Self::RenterOutOfFunds => "renter_out_of_funds",
            Self::RenterFailedOver => "renter_failed_over",
            Self::ProviderAccepted => "provider_accepted",
            Self::ProviderCleanedUp => "provider_cleaned_up",
        }
    }
}

/// The pool's metrics: messages, peers, the market.
struct PoolMetrics {
    received: Family<Kind, Counter>,
    dropped: Family<Reason, Counter>,
    peers_connected: Gauge,
    /// Free GPUs the connected members advertise, by product.
    gpus_advertised: Family<Product, Gauge>,
    /// Products last set on `gpus_advertised`, so one no member offers any
    /// more goes back to zero instead of showing its last count forever.
    advertised_products: Mutex<std::collections::BTreeSet<String>>,
    banned: Counter,
    /// What this member's relay service did for other members.
    relayed: Family<Kind, Counter>,
    /// How hole punches over relayed connections ended.
    hole_punches: Family<PunchResult, Counter>,
    orders: Counter,
    bids_sent: Counter,
    /// Orders heard and not bid on, by the bid engine's reason.
    orders_declined: Family<Reason, Counter>,
    bids_received: Counter,
    leases: Family<Kind, Counter>,
    placement_seconds: Family<Kind, Histogram>,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("gpupool");
        let reconciles = Counter::default();
        let reconcile_errors = Counter::default();
        let reconcile_seconds = Histogram::new(exponential_buckets(0.0005, 2.0, 16));
        let local_placements = Counter::default();
        let gpus = Family::<ProductState, Gauge>::default();
        registry.register("aijob_reconciles", "AiJob reconciles run", reconciles.clone());
        registry.register(
            "aijob_reconcile_errors",
            "AiJob reconciles that failed and were retried",
            reconcile_errors.clone(),
        );
        registry.register(
            "aijob_reconcile_duration_seconds",
            "Time one AiJob reconcile took",
            reconcile_seconds.clone(),
        );
        registry.register(
            "local_placements",
            "AiJobs placed on this cluster's GPUs",
            local_placements.clone(),
        );
        registry.register(
            "gpus",
            "GPUs by product and state: total and free on this cluster, lent to other organisations' leases, rented from them",
            gpus.clone(),
        );
        let chain_tx_gas =
            Family::<Call, Histogram>::new_with_constructor(|| Histogram::new(exponential_buckets(20_000.0, 1.5, 10)));
        let chain_tx_seconds =
            Family::<Call, Histogram>::new_with_constructor(|| Histogram::new(exponential_buckets(0.01, 2.0, 14)));
        let chain_errors = Family::<Reason, Counter>::default();
        let tokens_received = Counter::<f64, std::sync::atomic::AtomicU64>::default();
        let tokens_deposited = Counter::<f64, std::sync::atomic::AtomicU64>::default();
        let tokens_swept = Counter::<f64, std::sync::atomic::AtomicU64>::default();
        let balance = Family::<HeldIn, Gauge<f64, std::sync::atomic::AtomicU64>>::default();
        let leader = Gauge::default();
        registry.register(
            "leader",
            "1 while this replica holds the leader Lease and acts, 0 while it stands by (always 1 without an election)",
            leader.clone(),
        );
        let pool_api_requests = Family::<ApiCall, Counter>::default();
        registry.register(
            "pool_api_requests",
            "Pool API calls by method and gRPC status code (unauthenticated and replayed calls included)",
            pool_api_requests.clone(),
        );
        let leases = Family::<SideState, Gauge>::default();
        registry.register(
            "leases",
            "Lease records on this cluster by side (Renter, Provider) and state",
            leases.clone(),
        );
        registry.register(
            "balance_tokens",
            "Tokens this operator's wallet can spend, by where they are held (wallet, escrow_account)",
            balance.clone(),
        );
        registry.register(
            "chain_tx_gas",
            "Gas used by escrow transactions, by call",
            chain_tx_gas.clone(),
        );
        registry.register(
            "chain_tx_duration_seconds",
            "From sending an escrow transaction to its receipt, by call",
            chain_tx_seconds.clone(),
        );
        registry.register(
            "chain_errors",
            "Chain RPC failures and refusals, by reason",
            chain_errors.clone(),
        );
        registry.register(
            "tokens_received",
            "Tokens this operator's leases paid it as a provider, into its escrow account",
            tokens_received.clone(),
        );
        registry.register(
            "tokens_deposited",
            "Tokens this operator's wallet deposited into leases as a renter",
            tokens_deposited.clone(),
        );
        registry.register(
            "tokens_swept",
            "Tokens the sweep sent out of this operator's escrow account to the address it names",
            tokens_swept.clone(),
        );
        let pool = PoolMetrics {
            placement_seconds: Family::new_with_constructor(|| Histogram::new(exponential_buckets(0.05, 2.0, 14))),
            received: Default::default(),
            dropped: Default::default(),
            peers_connected: Default::default(),
            gpus_advertised: Default::default(),
            advertised_products: Mutex::default(),
            banned: Default::default(),
            relayed: Default::default(),
            hole_punches: Default::default(),
            orders: Default::default(),
            bids_sent: Default::default(),
            orders_declined: Default::default(),
            bids_received: Default::default(),
            leases: Default::default(),
        };
        registry.register(
            "pool_messages_received",
            "Peer messages that passed every check, by kind",
            pool.received.clone(),
        );
        registry.register(
            "pool_messages_dropped",
            "Peer messages dropped, by reason",
            pool.dropped.clone(),
        );
        registry.register(
            "pool_peers_connected",
            "Peers with an open connection",
            pool.peers_connected.clone(),
        );
        registry.register(
            "pool_gpus_advertised",
            "Free GPUs the connected members of the pool advertise, by product",
            pool.gpus_advertised.clone(),
        );
        registry.register("pool_peers_banned", "Peers banned for their score", pool.banned.clone());
        registry.register(
            "pool_relay_served",
            "What this member's relay service did for members behind NAT: reservations, circuits, refusals",
            pool.relayed.clone(),
        );
        registry.register(
            "pool_hole_punches",
            "Hole punches (DCUtR) over relayed connections, by result: direct (the relay no longer carries the peer's traffic) or failed (it still does)",
            pool.hole_punches.clone(),
        );
        registry.register(
            "pool_orders_published",
            "Orders this cluster published",
            pool.orders.clone(),
        );
        registry.register(
            "pool_bids_sent",
            "Bids this cluster sent as a provider",
            pool.bids_sent.clone(),
        );
        registry.register(
            "pool_orders_declined",
            "Other members' orders this cluster did not bid on, by reason (no matching product, not enough free, too expensive, lending limit, renter hold limit, renter not served, excluded by the order)",
            pool.orders_declined.clone(),
        );
        registry.register(
            "pool_bids_received",
            "Bids recorded for this cluster's orders",
            pool.bids_received.clone(),
        );
        registry.register(
            "pool_leases",
            "Pool leases by side and event (opened, accepted, closed)",
            pool.leases.clone(),
        );
        registry.register(
            "pool_placement_duration_seconds",
            "From AiJob creation to lease active and to pod running in another organisation",
            pool.placement_seconds.clone(),
        );
        Self {
            pool,
            chain_tx_gas,
            chain_tx_seconds,
            chain_errors,
            tokens_received,
            tokens_deposited,
            tokens_swept,
            balance,
            leases,
            leader,
            pool_api_requests,
            lease_gpus: Mutex::default(),
            registry: Mutex::new(registry),
            reconciles,
            reconcile_errors,
            reconcile_seconds,
            local_placements,
            gpus,
        }
    }
}

impl Metrics {
    pub fn reconciled(&self, took: Duration) {
        self.reconciles.inc();
        self.reconcile_seconds.observe(took.as_secs_f64());
    }

    pub fn reconcile_error(&self) {
        self.reconcile_errors.inc();
    }

    pub fn placed_locally(&self) {
        self.local_placements.inc();
    }

    pub fn observe_inventory(&self, nodes: &[NodeGpus]) {
        let mut totals: std::collections::BTreeMap<&str, (i64, i64)> = Default::default();
        for n in nodes {
            let t = totals.entry(n.product.as_str()).or_default();
            t.0 += i64::from(n.healthy);
            t.1 += i64::from(n.free());
        }
        for (product, (total, free)) in totals {
            self.gpus
                .get_or_create(&ProductState {
                    product: product.into(),
                    state: "total".into(),
                })
                .set(total);
            self.gpus
                .get_or_create(&ProductState {
                    product: product.into(),
                    state: "free".into(),
                })
                .set(free);
        }
    }

    /// Feeds the chain client's per-transaction records.
    pub fn observe_tx(&self, tx: &gpupool_chain::TxRecord) {
        let label = Call {
            call: tx.call.to_string(),
        };
        self.chain_tx_gas.get_or_create(&label).observe(tx.gas_used as f64);
        self.chain_tx_seconds
            .get_or_create(&label)
            .observe(tx.latency.as_secs_f64());
    }

    pub fn chain_error(&self, reason: &str) {
        self.chain_errors
            .get_or_create(&Reason {
                reason: reason.to_string(),
            })
            .inc();
    }

    pub fn tokens_received(&self, base_units: u128) {
        self.tokens_received.inc_by(base_units as f64 / 1e18);
    }

    /// Where the Lease records stand (see `lease_gauges`).
    pub fn observe_leases(&self, t: &crate::lease_gauges::LeaseTally) {
        for ((side, state), n) in &t.leases {
            self.leases
                .get_or_create(&SideState {
                    side: side.clone(),
                    state: state.clone(),
                })
                .set(*n);
        }
        // Poisoned only by a panic between these lines; the set is still whole.
        let mut shown = self.lease_gpus.lock().unwrap_or_else(|e| e.into_inner());
        for (product, how) in shown.iter().filter(|k| !t.gpus.contains_key(*k)) {
            self.gpus
                .get_or_create(&ProductState {
                    product: product.clone(),
                    state: how.clone(),
                })
                .set(0);
        }
        for ((product, how), n) in &t.gpus {
            self.gpus
                .get_or_create(&ProductState {
                    product: product.clone(),
                    state: how.clone(),
                })
                .set(*n);
        }
        *shown = t.gpus.keys().cloned().collect();
    }

    /// The wallet's tokens and its escrow account, as last read from the chain.
    pub fn balances(&self, wallet: u128, account: u128) {
        for (held_in, v) in [("wallet", wallet), ("escrow_account", account)] {
            self.balance
                .get_or_create(&HeldIn {
                    held_in: held_in.into(),
                })
                .set(v as f64 / 1e18);
        }
    }

    pub fn tokens_swept(&self, base_units: u128) {
        self.tokens_swept.inc_by(base_units as f64 / 1e18);
    }

    pub fn tokens_deposited(&self, base_units: u128) {
        self.tokens_deposited.inc_by(base_units as f64 / 1e18);
    }

    pub fn message_received(&self, kind: &str) {
        self.pool.received.get_or_create(&Kind { kind: kind.into() }).inc();
    }

    pub fn message_dropped(&self, reason: &str) {
        self.pool.dropped.get_or_create(&Reason { reason: reason.into() }).inc();
    }

    pub fn dropped_count(&self, reason: &str) -> u64 {
        self.pool.dropped.get_or_create(&Reason { reason: reason.into() }).get()
    }

    pub fn pool_api_request(&self, method: &str, code: tonic::Code) {
        self.pool_api_requests
            .get_or_create(&ApiCall {
                method: method.into(),
                code: format!("{code:?}"),
            })
            .inc();
    }

    pub fn leading(&self, leads: bool) {
        self.leader.set(i64::from(leads));
    }

    pub fn peers_connected(&self, n: usize) {
        self.pool.peers_connected.set(i64::try_from(n).unwrap_or(i64::MAX));
    }

    /// What the pool offers now, as the latest adverts of the connected
    /// members say.
    pub fn pool_advertised(&self, free_by_product: &std::collections::BTreeMap<String, u32>) {
        let mut last = self
            .pool
            .advertised_products
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        for gone in last.iter().filter(|p| !free_by_product.contains_key(*p)) {
            self.pool
                .gpus_advertised
                .get_or_create(&Product { product: gone.clone() })
                .set(0);
        }
        for (product, free) in free_by_product {
            self.pool
                .gpus_advertised
                .get_or_create(&Product {
                    product: product.clone(),
                })
                .set(i64::from(*free));
        }
        *last = free_by_product.keys().cloned().collect();
    }

    pub fn peer_banned(&self) {
        self.pool.banned.inc();
    }

    pub fn relay_served(&self, what: &str) {
        self.pool.relayed.get_or_create(&Kind { kind: what.into() }).inc();
    }

    pub fn hole_punched(&self, result: &str) {
        self.pool
            .hole_punches
            .get_or_create(&PunchResult { result: result.into() })
            .inc();
    }

    pub fn order_published(&self) {
        self.pool.orders.inc();
    }

    pub fn bid_sent(&self) {
        self.pool.bids_sent.inc();
    }

    pub fn order_declined(&self, reason: &'static str) {
        self.pool
            .orders_declined
            .get_or_create(&Reason { reason: reason.into() })
            .inc();
    }

    pub fn bid_received(&self) {
        self.pool.bids_received.inc();
    }

    pub fn pool_lease(&self, event: PoolLeaseEvent) {
        self.pool
            .leases
            .get_or_create(&Kind {
                kind: event.as_str().into(),
            })
            .inc();
    }

    /// `stage` is "lease_active" or "pod_running".
    pub fn placement(&self, stage: &str, seconds: f64) {
        self.pool
            .placement_seconds
            .get_or_create(&Kind { kind: stage.into() })
            .observe(seconds);
    }

    /// Every family as Prometheus protobuf, for the OTLP exporter. Empty if
    /// encoding failed, which only a label set that cannot be encoded does.
    pub fn families(
        &self,
    ) -> Vec<prometheus_client::encoding::prometheus_protobuf::prometheus_data_model::MetricFamily> {
        let registry = self.registry.lock().unwrap_or_else(|e| e.into_inner());
        prometheus_client::encoding::prometheus_protobuf::encode(&registry).unwrap_or_default()
    }

    pub fn render(&self) -> String {
        let mut out = String::new();
        // A poisoned lock only means a panic elsewhere mid-encode; the
        // registry itself is still consistent, so keep serving.
        let registry = self.registry.lock().unwrap_or_else(|e| e.into_inner());
        if encode(&mut out, &registry).is_err() {
            out.clear();
        }
        out
    }
}

/// Serves /metrics, /healthz and /readyz until the process ends.
pub async fn serve(addr: SocketAddr, metrics: Arc<Metrics>) -> std::io::Result<SocketAddr> {
    let app = Router::new()
        .route(
            "/metrics",
            get(move || {
                let m = metrics.clone();
                async move { m.render() }
            }),
        )
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(|| async { "ok" }));
    let listener = tokio::net::TcpListener::bind(addr).await?;
    let bound = listener.local_addr()?;
    tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app).await {
            tracing::error!(error = %e, "metrics server stopped");
        }
    });
    Ok(bound)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lent_gpus_go_back_to_zero_when_their_leases_close() {
        use crate::lease_gauges::LeaseTally;
        let m = Metrics::default();
        let lent = |n| LeaseTally {
            gpus: [(("A100".to_string(), "lent".to_string()), n)].into(),
            ..Default::default()
        };
        m.observe_leases(&lent(4));
        assert!(m.render().contains(r#"gpupool_gpus{product="A100",state="lent"} 4"#));
        m.observe_leases(&LeaseTally::default());
        assert!(m.render().contains(r#"gpupool_gpus{product="A100",state="lent"} 0"#));
    }

    #[test]
    fn the_pool_s_advertised_gpus_go_to_zero_when_nobody_offers_them() {
        let m = Metrics::default();
        let shows = |product: &str, n: u32| {
            let text = m.render();
            let line = format!("gpupool_pool_gpus_advertised{{product=\"{product}\"}} {n}");
            assert!(text.contains(&line), "{line} not in {text}");
        };
        m.pool_advertised(&[("NVIDIA A100".to_string(), 24), ("NVIDIA L40S".to_string(), 8)].into());
        shows("NVIDIA A100", 24);
        shows("NVIDIA L40S", 8);
        m.pool_advertised(&[("NVIDIA A100".to_string(), 16)].into());
        shows("NVIDIA A100", 16);
        shows("NVIDIA L40S", 0);
    }
}

//! The settlement worker: keeps each Lease's status following the chain, and acts
//! for its side: the renter opens and (when asked, or out of funds) closes, the
//! provider withdraws on a period and closes leases that ran dry.
//!
//! dereference (the on-chain lease) → validate (chain, contract, wallet) → plan
//! (pure, `settlement_plan`) → act (one chain call) → status by server-side apply.
//! A finalizer settles the chain side before a Lease record can go.

use std::collections::HashMap;
use std::str::FromStr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use gpupool_chain::{Address, B256, ChainError, EscrowClient, LeaseOnChain, OpenOutcome, lease_id};
use gpupool_crds::conditions::{ConditionUpdate, find, set_condition};
use gpupool_crds::price::TokenAmount;
use gpupool_crds::{LEASE_FINALIZER, Lease, LeaseSide, LeaseState, LeaseStatus};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use kube::runtime::controller::{Action, Controller};
use kube::runtime::events::{Event as KubeEvent, EventType, Reporter};
use kube::runtime::finalizer::Event as Finalizer;
use kube::runtime::{WatchStreamExt, reflector, watcher};
use kube::{Api, Client, Resource, ResourceExt};
use tracing::{Instrument, debug, info, warn};

use crate::events::EventPublisher;
use crate::finalizers::finalizer;
use crate::settlement_plan::{
    COND_CHAIN, COND_FUNDS_LOW, COND_SETTLED, Observed, Policy, REASON_TOP_UP_REFUSED, Step, plan, rate_per_second,
};
use crate::status_memo::StatusMemo;
use crate::telemetry::Metrics;

const FIELD_MANAGER: &str = "gpupool-settlement";
const MAX_BACKOFF: Duration = Duration::from_secs(300);

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("kubernetes API: {0}")]
    Kube(#[from] kube::Error),
    #[error("chain: {0}")]
    Chain(#[from] ChainError),
    #[error("finalizer: {0}")]
    Finalizer(#[source] Box<kube::runtime::finalizer::Error<Error>>),
    #[error("the Lease has no namespace")]
    NoNamespace,
}

#[derive(Clone, Debug)]
pub struct SettlementSettings {
    pub confirmations: u64,
    pub withdraw_every: Duration,
    pub warn_below: Duration,
    /// How much of a running lease's time one top-up buys (the renter's
    /// deposit period).
    pub top_up_for: Duration,
    /// The longest a lease goes unread. Chain time moves without any watch event,
    /// so this bounds how late a warning or a close can come.
    pub resync: Duration,
    /// How often the escrow's events are polled for leases to read at once
    /// (`chain_watch`), instead of at their next resync.
    pub poll: Duration,
    /// Earnings out of the escrow account (`crate::sweep`); None: they stay.
    pub sweep: Option<crate::sweep::SweepPolicy>,
}

struct Context {
    client: Client,
    chain: Arc<EscrowClient>,
    settings: SettlementSettings,
    recorder: EventPublisher,
    metrics: Arc<Metrics>,
    /// Consecutive chain failures per lease, for backoff.
    failures: Mutex<HashMap<String, u32>>,
    /// When each lease's status was last written: figures that only tick
    /// with the chain's clock are written at most every FIGURES_EVERY.
    written: Mutex<HashMap<String, std::time::Instant>>,
    /// The status last written here, for reconciles that run before the
    /// watch brings it back (see `crate::status_memo`).
    statuses: StatusMemo<LeaseStatus>,
}

/// How stale the ticking figures (accrued, remaining, confirmations) of an
/// open lease may get. Written on every read they were one status write per
/// lease per resync, on both sides, which under a burst of leases was most of
/// the API server's work.
const FIGURES_EVERY: Duration = Duration::from_secs(15);

/// Whether two statuses differ only in figures that move with the chain's clock.
fn ticking_only(before: &LeaseStatus, after: &LeaseStatus) -> bool {
    let strip = |s: &LeaseStatus| LeaseStatus {
        paid: None,
        remaining: None,
        confirmations: None,
        ..s.clone()
    };
    before.state == after.state && strip(before) == strip(after)
}

impl Context {
    fn figures_fresh(&self, lease: &Lease) -> bool {
        let w = self.written.lock().unwrap_or_else(|e| e.into_inner());
        w.get(&key(lease)).is_some_and(|t| t.elapsed() < FIGURES_EVERY)
    }

    fn figures_stale(&self, lease: &Lease) {
        let mut w = self.written.lock().unwrap_or_else(|e| e.into_inner());
        w.remove(&key(lease));
    }

    /// The record is going: drop what was kept about it. Only a successful
    /// apply cleared its failure count, so a lease deleted while the chain
    /// was failing stayed in the map for the life of the process.
    fn forget(&self, lease: &Lease) {
        let k = key(lease);
        self.failures.lock().unwrap_or_else(|e| e.into_inner()).remove(&k);
        self.written.lock().unwrap_or_else(|e| e.into_inner()).remove(&k);
        self.statuses.forget(lease.metadata.uid.as_deref().unwrap_or_default());
    }

    /// Applies this worker's part of the status and remembers what the
    /// write left, so the next plan starts from it.
    async fn write_status(&self, api: &Api<Lease>, lease: &Lease, status: &LeaseStatus) -> Result<(), Error> {
        // The market owns what the provider reports; leaving those fields out keeps
        // a stale copy read here from overwriting a newer report.
        let mut status = status.clone();
        status.workload = None;
        status.last_heartbeat = None;
        let written = crate::ssa::apply_status(api, &lease.name_any(), FIELD_MANAGER, &status).await?;
        self.statuses.wrote(
            lease.metadata.uid.as_deref().unwrap_or_default(),
            written.metadata.resource_version.as_deref(),
            written.status.unwrap_or_default(),
        );
        Ok(())
    }

    /// Writes `status` when it says something `before` did not; figures
    /// that only tick with the chain's clock at most every FIGURES_EVERY.
    async fn save(
        &self,
        api: &Api<Lease>,
        lease: &Lease,
        before: &LeaseStatus,
        status: &LeaseStatus,
    ) -> Result<(), Error> {
        if status != before && !(ticking_only(before, status) && self.figures_fresh(lease)) {
            self.write_status(api, lease, status).await?;
            self.figures_written(lease);
        }
        Ok(())
    }

    fn figures_written(&self, lease: &Lease) {
        let mut w = self.written.lock().unwrap_or_else(|e| e.into_inner());
        if w.len() > 100_000 {
            w.retain(|_, t| t.elapsed() < FIGURES_EVERY);
        }
        w.insert(key(lease), std::time::Instant::now());
    }
}

pub async fn run(
    client: Client,
    chain: Arc<EscrowClient>,
    settings: SettlementSettings,
    metrics: Arc<Metrics>,
) -> anyhow::Result<()> {
    let leases: Api<Lease> = Api::all(client.clone());
    let reporter = Reporter {
        controller: FIELD_MANAGER.into(),
        instance: std::env::var("POD_NAME").ok(),
    };
    let ctx = Arc::new(Context {
        recorder: EventPublisher::new(client.clone(), reporter),
        client,
        chain,
        settings,
        metrics,
        failures: Mutex::new(HashMap::new()),
        written: Mutex::new(HashMap::new()),
        statuses: StatusMemo::default(),
    });
    info!("starting the settlement worker");
    let (store, writer) = reflector::store();
    // Not `wait_until_ready`: see `crate::listed`.
    let listed = crate::listed::Listed::default();
    let changes = listed
        .follow(
            watcher(leases, watcher::Config::default())
                .default_backoff()
                .reflect(writer),
        )
        .applied_objects()
        .predicate_filter(crate::triggers::settlement, Default::default());
    if let Some(policy) = ctx.settings.sweep.clone() {
        tokio::spawn(crate::sweep::sweep_forever(
            ctx.chain.clone(),
            policy,
            ctx.metrics.clone(),
        ));
    }
    tokio::spawn(watch_gauges(
        ctx.chain.clone(),
        store.clone(),
        listed,
        ctx.metrics.clone(),
    ));
    let records = store.clone();
    let touched = crate::chain_watch::leases_touched(ctx.chain.clone(), ctx.settings.poll)
        .flat_map(move |ids| futures::stream::iter(crate::chain_watch::records_for(&ids, &records.state())));
    Controller::for_stream(changes, store)
        .reconcile_on(touched)
        .shutdown_on_signal()
        .run(reconcile, error_policy, ctx)
        .for_each(|res| async move {
            if let Err(e) = res {
                debug!(error = %e, "settlement reconcile failed");
            }
        })
        .await;
    Ok(())
}

/// How often the wallet's and escrow account's balances are read for the
/// `balance_tokens` gauge (payments land there without any lease changing
/// here), and the lease gauges counted.
const BALANCE_EVERY: Duration = Duration::from_secs(15);

/// Keeps the balance and lease gauges current: the wallet's and escrow
/// account's balances from the chain (when the operator has a wallet), and
/// the leases from the reflector's store once it has listed (before that,
/// an empty store would report zero leases).
async fn watch_gauges(
    chain: Arc<EscrowClient>,
    store: reflector::Store<Lease>,
    listed: crate::listed::Listed,
    metrics: Arc<Metrics>,
) {
    let mut every = tokio::time::interval(BALANCE_EVERY);
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        every.tick().await;
        if let Some(me) = chain.wallet() {
            match tokio::try_join!(chain.token_balance(me), chain.account(me)) {
                Ok((wallet, account)) => metrics.balances(wallet, account),
                // The gauge keeps its last value; lease work reports chain trouble.
                Err(e) => debug!(error = %e, "could not read the wallet's balances"),
            }
        }
        if listed.is_listed() {
            let leases = store.state();
            metrics.observe_leases(&crate::lease_gauges::tally(leases.iter().map(|l| l.as_ref())));
        }
    }
}

fn key(lease: &Lease) -> String {
    format!("{}/{}", lease.namespace().unwrap_or_default(), lease.name_any())
}

fn error_policy(lease: Arc<Lease>, err: &Error, ctx: Arc<Context>) -> Action {
    let n = {
        let mut f = ctx.failures.lock().unwrap_or_else(|e| e.into_inner());
        let n = f.entry(key(&lease)).or_insert(0);
        *n = n.saturating_add(1);
        *n
    };
    let backoff = Duration::from_secs(1u64 << n.min(8)).min(MAX_BACKOFF);
    warn!(lease = %key(&lease), error = %err, retry_in = ?backoff, "settlement failed; retrying");
    Action::requeue(backoff)
}

async fn reconcile(lease: Arc<Lease>, ctx: Arc<Context>) -> Result<Action, Error> {
    if lease.spec.escrow.is_none() {
        return Ok(Action::await_change());
    }
    let ns = lease.namespace().ok_or(Error::NoNamespace)?;
    let api: Api<Lease> = Api::namespaced(ctx.client.clone(), &ns);
    let span = tracing::info_span!(
        "lease.settle",
        lease = %lease.name_any(),
        namespace = %ns,
        side = ?lease.spec.side,
        state = ?lease.status.as_ref().and_then(|s| s.state),
    );
    if let Some(parent) = crate::tracecontext::parent_of(lease.as_ref()) {
        // Fails only when spans are not exported.
        let _ = tracing_opentelemetry::OpenTelemetrySpanExt::set_parent(&span, parent);
    }
    finalizer(&api, LEASE_FINALIZER, lease, |event| async {
        match event {
            Finalizer::Apply(l) => apply(l, &ctx, &api).await,
            Finalizer::Cleanup(l) => cleanup(l, &ctx).await,
        }
    })
    .instrument(span)
    .await
    .map_err(|e| Error::Finalizer(Box::new(e)))
}

/// Which on-chain lease this record is about, or why it cannot say.
fn resolve(lease: &Lease, chain: &EscrowClient) -> Result<(B256, Address), String> {
    let escrow = lease.spec.escrow.as_ref().ok_or("no escrow")?;
    let config = chain.config();
    if escrow.chain_id != config.chain_id {
        return Err(format!(
            "the lease is on chain {}, this operator settles on chain {}",
            escrow.chain_id, config.chain_id
        ));
    }
    let contract = Address::from_str(&escrow.contract).map_err(|_| "escrow.contract is not an address".to_string())?;
    if contract != config.escrow {
        return Err(format!(
            "the lease is in escrow {contract}, this operator uses {}",
            config.escrow
        ));
    }
    let me = chain.wallet().ok_or("no wallet configured")?;
    let (ours, other) = match lease.spec.side {
        LeaseSide::Renter => (&lease.spec.renter, &lease.spec.provider),
        LeaseSide::Provider => (&lease.spec.provider, &lease.spec.renter),
    };
    if let Some(w) = &ours.wallet
        && Address::from_str(w).ok() != Some(me)
    {
        return Err(format!("this side's wallet is {w}, the operator's is {me}"));
    }
    let id = match &escrow.lease_id {
        Some(h) => B256::from_str(h).map_err(|_| "escrow.leaseId is not 32 bytes of hex".to_string())?,
        None if lease.spec.side == LeaseSide::Renter => lease_id(me, &lease.spec.order_id),
        None => return Err("the provider's copy needs escrow.leaseId from the lease offer".into()),
    };
    let counterpart = match (&other.wallet, lease.spec.side) {
        (Some(w), _) => Address::from_str(w).map_err(|_| "the other side's wallet is not an address".to_string())?,
        (None, LeaseSide::Provider) => Address::ZERO,
        (None, LeaseSide::Renter) => return Err("spec.provider.wallet is needed to open the lease".into()),
    };
    Ok((id, counterpart))
}

async fn apply(lease: Arc<Lease>, ctx: &Context, api: &Api<Lease>) -> Result<Action, Error> {
    // Planned from a cache that lagged this worker's own last write, a burst
    // of leases wrote each state twice and announced Active twice.
    let lease = ctx.statuses.freshen(lease);
    let mut status = lease.status.clone().unwrap_or_default();
    let before = status.clone();
    let generation = lease.metadata.generation;
    let now_ts = Timestamp::now();

    let (id, counterpart) = match resolve(&lease, &ctx.chain) {
        Ok(v) => v,
        Err(why) => {
            set_condition(
                &mut status.conditions,
                &ConditionUpdate::new(COND_SETTLED, false, "InvalidEscrow", why.clone()),
                generation,
                now_ts,
            );
            if status != before {
                ctx.event(&lease, EventType::Warning, "InvalidEscrow", &why).await;
                ctx.write_status(api, &lease, &status).await?;
            }
            return Ok(Action::requeue(Duration::from_secs(300)));
        }
    };
    status.lease_id = Some(id.to_string());

    let observed = match observe(&lease, ctx, id).await {
        Ok(o) => o,
        Err(e) => return chain_trouble(&lease, ctx, api, status, &before, e).await,
    };
    let policy = Policy {
        side: lease.spec.side,
        confirmations: ctx.settings.confirmations,
        withdraw_every: ctx.settings.withdraw_every,
        warn_below: ctx.settings.warn_below,
        top_up_for: ctx.settings.top_up_for,
        resync: ctx.settings.resync,
    };
    let decided = plan(&policy, &observed);
    for c in &decided.conditions {
        set_condition(&mut status.conditions, c, generation, now_ts);
    }
    write_figures(&mut status, &decided.figures);

    // Carry out the one step the plan asks for.
    // A warning once when the settling condition turns False for a reason
    // the plan found (a lease the chain does not know): a person must act.
    if let Some(c) = decided.conditions.iter().find(|c| c.type_ == COND_SETTLED && !c.status)
        && find(&before.conditions, COND_SETTLED).map(|b| b.reason.as_str()) != Some(c.reason.as_str())
    {
        ctx.event(&lease, EventType::Warning, &c.reason, &c.message).await;
    }
    let acted = match &decided.step {
        Step::Nothing => Ok(false),
        Step::Open => open(&lease, ctx, id, counterpart).await.map(|_| true),
        Step::TopUp(amount) => top_up(&lease, ctx, id, *amount, &observed).await.map(|()| true),
        Step::Withdraw => match ctx.chain.withdraw(id).await {
            Ok(amount) => {
                status.last_withdrawal = Some(Time(ts(observed.now)));
                ctx.metrics.tokens_received(amount);
                ctx.event(
                    &lease,
                    EventType::Normal,
                    "Withdrawn",
                    &format!(
                        "withdrew {} tokens accrued to this provider",
                        TokenAmount(amount).shown()
                    ),
                )
                .await;
                Ok(true)
            }
            Err(e) => Err(e),
        },
        // No event of its own: the Settled event that the state change to
        // Closed brings says the same with the lease's whole payment, on both
        // sides. Two per close were one more write each in a busy API server.
        Step::Close(reason) => match ctx.chain.close(id, *reason).await {
            Ok(closed) => {
                debug!(
                    lease = %id,
                    reason = reason.as_str(),
                    by_us = closed.by_us,
                    paid_at_close = %TokenAmount(closed.paid),
                    refunded = %TokenAmount(closed.refunded),
                    "closed on chain"
                );
                Ok(true)
            }
            Err(e) => Err(e),
        },
    };
    let acted = match acted {
        Ok(a) => a,
        Err(e) if e.is_transient() => return chain_trouble(&lease, ctx, api, status, &before, e).await,
        // The job runs on what is left; the reason stands on FundsLow, and the
        // top-up is tried again at the next read (the renter may fund it).
        Err(e) if matches!(decided.step, Step::TopUp(_)) => {
            let msg = format!("{e}; the lease ends when its deposit runs out unless a top-up gets through");
            set_condition(
                &mut status.conditions,
                &ConditionUpdate::new(COND_FUNDS_LOW, true, REASON_TOP_UP_REFUSED, msg.clone()),
                generation,
                now_ts,
            );
            if find(&before.conditions, COND_FUNDS_LOW).map(|c| c.message.as_str()) != Some(msg.as_str()) {
                ctx.event(&lease, EventType::Warning, REASON_TOP_UP_REFUSED, &msg).await;
            }
            // Retried every resync: only what changed, not the ticking figures, is written each time.
            ctx.save(api, &lease, &before, &status).await?;
            return Ok(Action::requeue(ctx.settings.resync));
        }
        Err(e) => {
            // The escrow refused: retrying the same thing will not help, so say why and wait.
            let msg = e.to_string();
            set_condition(
                &mut status.conditions,
                &ConditionUpdate::new(COND_SETTLED, false, e.reason(), msg.clone()),
                generation,
                now_ts,
            );
            if find(&before.conditions, COND_SETTLED).map(|c| c.reason.as_str()) != Some(e.reason()) {
                ctx.event(&lease, EventType::Warning, e.reason(), &msg).await;
            }
            ctx.write_status(api, &lease, &status).await?;
            return Ok(Action::requeue(Duration::from_secs(60)));
        }
    };

    let read_back_writes = acted && decided.step.leaves_status_to_read_back();
    if !read_back_writes {
        announce_transitions(&lease, ctx, &before, &status).await;
        ctx.save(api, &lease, &before, &status).await?;
    }
    if acted {
        // These figures were read before the transaction: the read-back
        // that follows writes what it changed (paid, refunded) at once.
        ctx.figures_stale(&lease);
    }
    ctx.failures
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .remove(&key(&lease));
    Ok(match (acted, decided.requeue) {
        // Something changed on chain: read it back at once.
        (true, _) => Action::requeue(Duration::from_millis(20)),
        (false, Some(d)) => Action::requeue(d.min(ctx.settings.resync)),
        (false, None) => Action::await_change(),
    })
}

async fn observe(lease: &Lease, ctx: &Context, id: B256) -> Result<Observed, ChainError> {
    // One block for everything: the lease, the confirmations and the clock agree.
    let tip = ctx.chain.tip().await?;
    let onchain = ctx.chain.lease_at(id, tip.number).await?;
    let last_withdrawal = lease
        .status
        .as_ref()
        .and_then(|s| s.last_withdrawal.as_ref())
        .map(|t| u64::try_from(t.0.as_second()).unwrap_or(0));
    Ok(Observed {
        onchain,
        head: tip.number,
        now: tip.timestamp,
        last_withdrawal,
        close_requested: lease.spec.close_reason,
        recorded_open_block: lease
            .status
            .as_ref()
            .and_then(|s| s.opened_block)
            .and_then(|b| u64::try_from(b).ok()),
        top_up_to: lease
            .spec
            .escrow
            .as_ref()
            .and_then(|e| e.top_up_to.as_deref())
            .and_then(|t| TokenAmount::from_str(t).ok())
            .map(|t| t.0),
        top_up_refused: lease
            .status
            .as_ref()
            .and_then(|s| find(&s.conditions, COND_FUNDS_LOW))
            .filter(|c| c.reason == REASON_TOP_UP_REFUSED)
            .map(|c| c.message.clone()),
    })
}

/// Adds `amount` to a running lease: from our own account and wallet, or, as
/// a Pool API renter's agent, from the renter's account.
async fn top_up(lease: &Lease, ctx: &Context, id: B256, amount: u128, seen: &Observed) -> Result<(), ChainError> {
    let gas = ctx.chain.top_up(id, amount).await?;
    let funded_by = lease.spec.escrow.as_ref().and_then(|e| e.funded_by.as_deref());
    let from = match funded_by {
        Some(renter) => format!(" from renter {renter}'s escrow account, as its agent"),
        None => {
            ctx.metrics.tokens_deposited(amount);
            String::new()
        }
    };
    let cap = seen
        .top_up_to
        .map_or_else(String::new, |c| format!(" of at most {}", TokenAmount(c).shown()));
    let deposited = match &seen.onchain {
        LeaseOnChain::Open { deposited, .. } => TokenAmount(deposited.saturating_add(amount)).shown(),
        _ => "?".into(),
    };
    ctx.event(
        lease,
        EventType::Normal,
        "ToppedUp",
        &format!(
            "added {} tokens{from} so the job runs on: {deposited}{cap} deposited ({gas} gas)",
            TokenAmount(amount).shown()
        ),
    )
    .await;
    info!(lease = %key(lease), amount = %TokenAmount(amount), gas, "topped up on chain");
    Ok(())
}

async fn open(lease: &Lease, ctx: &Context, id: B256, provider: Address) -> Result<(), ChainError> {
    let escrow = lease
        .spec
        .escrow
        .as_ref()
        .ok_or(ChainError::Config("no escrow".into()))?;
    let price = TokenAmount::from_str(&lease.spec.price_per_gpu_hour)
        .map_err(|e| ChainError::Config(format!("pricePerGpuHour: {e}")))?;
    let gpus = u32::try_from(lease.spec.gpu_count).unwrap_or(0);
    let rate = rate_per_second(price, gpus)
        .ok_or_else(|| ChainError::Config("the price per second rounds to zero tokens".into()))?;
    let deposit = TokenAmount::from_str(&escrow.deposit)
        .map_err(|e| ChainError::Config(format!("deposit: {e}")))?
        .0;
    let funded_by = match &escrow.funded_by {
        Some(w) => {
            Some(Address::from_str(w).map_err(|_| ChainError::Config("escrow.fundedBy is not an address".into()))?)
        }
        None => None,
    };
    let opened = match funded_by {
        Some(renter) => ctx.chain.open_for(renter, id, provider, rate, deposit).await?,
        None => ctx.chain.open(id, provider, rate, deposit).await?,
    };
    match opened {
        OpenOutcome::Opened { block, gas_used, .. } => {
            let from = match funded_by {
                Some(renter) => format!(" from renter {renter}'s escrow account, as its agent"),
                None => {
                    // Only tokens that leave this member's own wallet or account count.
                    ctx.metrics.tokens_deposited(deposit);
                    String::new()
                }
            };
            ctx.event(
                lease,
                EventType::Normal,
                "Opened",
                &format!(
                    "opened on chain in block {block} with a deposit of {} tokens{from} ({gas_used} gas)",
                    gpupool_crds::price::shown(&escrow.deposit)
                ),
            )
            .await;
        }
        OpenOutcome::AlreadyOpen { block } => debug!(lease = %key(lease), block, "already open on chain"),
    }
    Ok(())
}

/// The chain is down or answering nonsense: say so on the Lease, keep every
/// figure as it was, and retry with backoff.
async fn chain_trouble(
    lease: &Lease,
    ctx: &Context,
    api: &Api<Lease>,
    mut status: LeaseStatus,
    before: &LeaseStatus,
    e: ChainError,
) -> Result<Action, Error> {
    ctx.metrics.chain_error(e.reason());
    let msg = format!("{e}; retrying with backoff");
    set_condition(
        &mut status.conditions,
        &ConditionUpdate::new(COND_CHAIN, false, e.reason(), msg.clone()),
        lease.metadata.generation,
        Timestamp::now(),
    );
    if find(&before.conditions, COND_CHAIN).map(|c| c.status.as_str()) != Some("False") {
        ctx.event(lease, EventType::Warning, e.reason(), &msg).await;
    }
    ctx.write_status(api, lease, &status).await?;
    Err(Error::Chain(e))
}

async fn announce_transitions(lease: &Lease, ctx: &Context, before: &LeaseStatus, after: &LeaseStatus) {
    // Pending is where every lease starts (the renter's Opened event already
    // names the block): only the states after it are news.
    if before.state != after.state
        && let Some(state) = after.state
        && state != LeaseState::Pending
    {
        let (kind, reason) = match state {
            LeaseState::InsufficientFunds => (EventType::Warning, "InsufficientFunds"),
            LeaseState::Active => (EventType::Normal, "Active"),
            LeaseState::Closed => (EventType::Normal, "Settled"),
            LeaseState::Pending => (EventType::Normal, "Pending"),
        };
        let note = match state {
            LeaseState::Closed => find(&after.conditions, COND_SETTLED)
                .map(|c| c.message.clone())
                .unwrap_or_default(),
            _ => format!("lease is {state:?}"),
        };
        ctx.event(lease, kind, reason, &note).await;
    }
    let low = |s: &LeaseStatus| find(&s.conditions, COND_FUNDS_LOW).is_some_and(|c| c.status == "True");
    if !low(before) && low(after) && after.state != Some(LeaseState::Closed) {
        let msg = find(&after.conditions, COND_FUNDS_LOW)
            .map(|c| c.message.clone())
            .unwrap_or_default();
        ctx.event(lease, EventType::Warning, "FundsLow", &msg).await;
    }
    let chain_back = |s: &LeaseStatus| find(&s.conditions, COND_CHAIN).is_some_and(|c| c.status == "True");
    if !chain_back(before) && chain_back(after) && find(&before.conditions, COND_CHAIN).is_some() {
        ctx.event(lease, EventType::Normal, "ChainReachable", "the chain answers again")
            .await;
    }
}

fn write_figures(status: &mut LeaseStatus, f: &crate::settlement_plan::Figures) {
    let tokens = |v: Option<u128>| v.map(|v| TokenAmount(v).to_string());
    status.state = f.state.or(status.state);
    if let Some(r) = f.close_reason {
        status.close_reason = Some(r.to_string());
    }
    status.paid = tokens(f.paid).or(status.paid.take());
    status.refunded = tokens(f.refunded).or(status.refunded.take());
    status.deposited = tokens(f.deposited).or(status.deposited.take());
    status.remaining = tokens(f.remaining).or(status.remaining.take());
    status.funds_run_out_at = f.funds_run_out_at.map(|t| Time(ts(t)));
    status.opened_block = f
        .opened_block
        .and_then(|b| i64::try_from(b).ok())
        .or(status.opened_block);
    status.confirmations = f
        .confirmations
        .and_then(|b| i64::try_from(b).ok())
        .or(status.confirmations);
}

fn ts(secs: u64) -> Timestamp {
    Timestamp::from_second(i64::try_from(secs).unwrap_or(i64::MAX)).unwrap_or(Timestamp::MAX)
}

/// Before a Lease record goes, its chain side is settled: the renter closes an
/// open lease as cancelled (refunding the rest); the provider takes what it earned.
async fn cleanup(lease: Arc<Lease>, ctx: &Context) -> Result<Action, Error> {
    let Ok((id, _)) = resolve(&lease, &ctx.chain) else {
        ctx.forget(&lease);
        return Ok(Action::await_change());
    };
    if let LeaseOnChain::Open { .. } = ctx.chain.lease(id).await? {
        match lease.spec.side {
            LeaseSide::Renter => {
                let closed = ctx.chain.close(id, gpupool_chain::CloseReason::RenterCancelled).await?;
                info!(lease = %key(&lease), refunded = %TokenAmount(closed.refunded), "lease record deleted: closed on chain");
            }
            LeaseSide::Provider => {
                let amount = ctx.chain.withdraw(id).await?;
                info!(lease = %key(&lease), withdrawn = %TokenAmount(amount), "lease record deleted: withdrew what accrued");
            }
        }
    }
    ctx.forget(&lease);
    Ok(Action::await_change())
}

impl Context {
    async fn event(&self, lease: &Lease, type_: EventType, reason: &str, note: &str) {
        let ev = KubeEvent {
            type_,
            reason: reason.into(),
            note: Some(note.chars().take(1000).collect()),
            action: "Settle".into(),
            secondary: None,
        };
        if let Err(e) = self.recorder.publish(&ev, &lease.object_ref(&())).await {
            debug!(error = %e, "event not recorded");
        }
    }
}

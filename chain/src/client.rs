//! The escrow client: the only place gpupool talks to the chain.
//!
//! One wallet drives many leases at once. Sends are sequenced through one nonce
//! counter; a send that fails for any reason drops the counter so the next send
//! asks the node, which counts anything that did arrive. Receipts are awaited
//! outside that lock, so leases open concurrently. Opens are idempotent: the lease
//! id comes from the order, and the client reads before it writes.

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use alloy::{
    network::{EthereumWallet, TransactionBuilder},
    primitives::{Address, B256, U256},
    providers::{DynProvider, Provider, ProviderBuilder},
    rpc::types::{BlockId, Filter, Log, TransactionReceipt, TransactionRequest},
    sol_types::SolEvent,
    transports::{RpcError, TransportErrorKind},
};
use tokio::sync::Mutex;
use tracing::{debug, warn};

use crate::{
    accounting::{CloseReason, ContractCode, LeaseEvent, LeaseOnChain, OpenLease, fold},
    bindings::{GpuToken, LeaseEscrow},
    config::ChainConfig,
    error::ChainError,
    wallet::Wallet,
};

/// The contract's marker for a closed lease.
const CLOSED: B256 = B256::with_last_byte(1);
/// How often a node on this machine is asked for receipts and blocks.
const LOCAL_POLL: Duration = Duration::from_millis(20);
/// Attempts for a write whose input state changed under it (another party acted).
const STALE_RETRIES: usize = 4;

/// The gas limit sent for a transaction estimated at `estimate`.
///
/// An estimate holds for the state it was made against. One wallet sends
/// many transactions at once, and each changes what the next costs: the
/// escrow account that funded an open when it was estimated runs dry before
/// it is mined, so it also pulls from the wallet (~15k more), or a close
/// pays a provider account that another close has just emptied (~17k more,
/// a storage word from zero). Sent at the bare estimate, such a transaction
/// ran out of gas (two in a burst of 100), was retried, and paid for both.
/// Half again covers these swings; gas not used is not charged.
pub fn gas_limit_for(estimate: u64) -> u64 {
    estimate.saturating_add(estimate / 2)
}

#[derive(Clone, Debug)]
pub struct ClientOptions {
    /// Limit for one RPC request; a hung endpoint becomes an error, not a hang.
    pub rpc_timeout: Duration,
    /// How long to wait for a sent transaction's receipt.
    pub receipt_timeout: Duration,
    /// How often to look for a receipt or a new block. `None` keeps alloy's
    /// guess (7 s for a remote node), except that a node on this machine is
    /// asked every 20 ms: a local dev chain (anvil) mines on arrival, and
    /// alloy's 250 ms local default was a quarter of a second added to every
    /// lease open and close.
    pub poll_interval: Option<Duration>,
}

impl Default for ClientOptions {
    fn default() -> Self {
        Self {
            rpc_timeout: Duration::from_secs(10),
            receipt_timeout: Duration::from_secs(60),
            poll_interval: None,
        }
    }
}

/// One mined transaction, for metrics.
#[derive(Clone, Debug)]
pub struct TxRecord {
    pub call: &'static str,
    pub gas_used: u64,
    /// From handing it to the node to its receipt.
    pub latency: Duration,
    pub succeeded: bool,
}

pub type TxObserver = Arc<dyn Fn(&TxRecord) + Send + Sync>;

/// The latest block, as far as leases care.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Tip {
    pub number: u64,
    pub timestamp: u64,
}

/// One transfer out of an escrow account, from its `FundsWithdrawn` event.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Withdrawal {
    pub to: Address,
    pub amount: u128,
    pub block: u64,
    pub tx: B256,
}

/// What `open` did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum OpenOutcome {
    Opened {
        block: u64,
        tx: B256,
        gas_used: u64,
    },
    /// The lease was already open with these terms (an earlier attempt landed).
    AlreadyOpen {
        block: u64,
    },
}

impl OpenOutcome {
    pub fn block(&self) -> u64 {
        match self {
            Self::Opened { block, .. } | Self::AlreadyOpen { block } => *block,
        }
    }
}

/// What `close` did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Closed {
    pub reason: CloseReason,
    /// Paid at close (not counting earlier withdrawals).
    pub paid: u128,
    pub refunded: u128,
    /// False when someone had already closed it.
    pub by_us: bool,
}

pub struct EscrowClient {
    provider: DynProvider,
    config: ChainConfig,
    wallet: Option<Address>,
    next_nonce: Mutex<Option<u64>>,
    allowance: Mutex<()>,
    /// The escrow was seen allowed (practically) everything: opens skip the
    /// allowance read, which every open serialised on. Cleared when a send
    /// fails, in case someone revoked it.
    unlimited: std::sync::atomic::AtomicBool,
    options: ClientOptions,
    observer: Option<TxObserver>,
}

impl std::fmt::Debug for EscrowClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // No RPC URL: it may hold an API key.
        f.debug_struct("EscrowClient")
            .field("chain_id", &self.config.chain_id)
            .field("escrow", &self.config.escrow)
            .field("wallet", &self.wallet)
            .finish_non_exhaustive()
    }
}

impl EscrowClient {
    /// Connects; without a wallet the client can only read.
    pub fn connect(config: ChainConfig, wallet: Option<&Wallet>, options: ClientOptions) -> Result<Self, ChainError> {
        crate::ensure_crypto_provider();
        let url = reqwest::Url::parse(&config.rpc_url)
            .map_err(|e| ChainError::Config(format!("the RPC URL does not parse: {e}")))?;
        let http = reqwest::Client::builder()
            .timeout(options.rpc_timeout)
            .build()
            .map_err(|e| ChainError::Config(format!("HTTP client: {e}")))?;
        let provider = match wallet {
            Some(w) => ProviderBuilder::new()
                .wallet(EthereumWallet::from(w.signer()))
                .connect_reqwest(http, url)
                .erased(),
            None => ProviderBuilder::new().connect_reqwest(http, url).erased(),
        };
        let client = provider.client();
        match options.poll_interval {
            Some(every) => client.set_poll_interval(every),
            None if client.is_local() => client.set_poll_interval(LOCAL_POLL),
            None => {}
        }
        Ok(Self {
            provider,
            wallet: wallet.map(Wallet::address),
            config,
            next_nonce: Mutex::new(None),
            allowance: Mutex::new(()),
            unlimited: std::sync::atomic::AtomicBool::new(false),
            options,
            observer: None,
        })
    }

    pub fn with_observer(mut self, observer: TxObserver) -> Self {
        self.observer = Some(observer);
        self
    }

    pub fn config(&self) -> &ChainConfig {
        &self.config
    }

    pub fn wallet(&self) -> Option<Address> {
        self.wallet
    }

    pub fn provider(&self) -> &DynProvider {
        &self.provider
    }

    /// The raw contract, for callers that need a call this client does not wrap.
    pub fn escrow(&self) -> LeaseEscrow::LeaseEscrowInstance<&DynProvider> {
        LeaseEscrow::new(self.config.escrow, &self.provider)
    }

    pub fn token(&self) -> GpuToken::GpuTokenInstance<&DynProvider> {
        GpuToken::new(self.config.token, &self.provider)
    }

    /// Checks that the endpoint serves the configured chain and the escrow has code.
    pub async fn verify(&self) -> Result<(), ChainError> {
        let chain_id = self.provider.get_chain_id().await.map_err(|e| rpc("eth_chainId", e))?;
        if chain_id != self.config.chain_id {
            return Err(ChainError::Config(format!(
                "the RPC serves chain {chain_id}, the configuration says {}",
                self.config.chain_id
            )));
        }
        let code = self
            .provider
            .get_code_at(self.config.escrow)
            .await
            .map_err(|e| rpc("eth_getCode", e))?;
        if code.is_empty() {
            return Err(ChainError::Config(format!(
                "no contract at escrow address {}",
                self.config.escrow
            )));
        }
        Ok(())
    }

    pub async fn head(&self) -> Result<u64, ChainError> {
        self.provider
            .get_block_number()
            .await
            .map_err(|e| rpc("eth_blockNumber", e))
    }

    /// The latest block's number and time, from one request.
    pub async fn tip(&self) -> Result<Tip, ChainError> {
        let block = self
            .provider
            .get_block_by_number(alloy::eips::BlockNumberOrTag::Latest)
            .await
            .map_err(|e| rpc("eth_getBlockByNumber", e))?
            .ok_or_else(|| garbage("eth_getBlockByNumber", "no latest block"))?;
        Ok(Tip {
            number: block.header.number,
            timestamp: block.header.timestamp,
        })
    }

    /// The chain's clock: the latest block's timestamp.
    pub async fn now(&self) -> Result<u64, ChainError> {
        Ok(self.tip().await?.timestamp)
    }

    pub async fn token_balance(&self, owner: Address) -> Result<u128, ChainError> {
        let v = self
            .token()
            .balanceOf(owner)
            .call()
            .await
            .map_err(|e| read("balanceOf", e))?;
        to_u128("balanceOf", v)
    }

    /// What `owner` keeps in its escrow account: leases open from it first,
    /// and pay into it.
    pub async fn account(&self, owner: Address) -> Result<u128, ChainError> {
        let v = self
            .escrow()
            .accounts(owner, self.config.token)
            .call()
            .await
            .map_err(|e| read("accounts", e))?;
        to_u128("accounts", v)
    }

    /// Everything `owner` can spend: its wallet plus its escrow account. Open
    /// leases are not counted.
    pub async fn holdings(&self, owner: Address) -> Result<u128, ChainError> {
        let (wallet, account) = tokio::try_join!(self.token_balance(owner), self.account(owner))?;
        wallet
            .checked_add(account)
            .ok_or_else(|| garbage("balanceOf", "wallet plus account overflows"))
    }

    pub async fn allowance(&self, owner: Address) -> Result<u128, ChainError> {
        let v = self
            .token()
            .allowance(owner, self.config.escrow)
            .call()
            .await
            .map_err(|e| read("allowance", e))?;
        Ok(u128::try_from(v).unwrap_or(u128::MAX))
    }

    /// The lease as the chain has it at the latest block; see [`Self::lease_at`].
    pub async fn lease(&self, id: B256) -> Result<LeaseOnChain, ChainError> {
        self.lease_at(id, self.head().await?).await
    }

    /// The lease at block `at`, rebuilt from its events and checked against the
    /// hash the contract stores, both read at that block.
    pub async fn lease_at(&self, id: B256, at: u64) -> Result<LeaseOnChain, ChainError> {
        let stored = self
            .escrow()
            .leaseHash(id)
            .block(BlockId::number(at))
            .call()
            .await
            .map_err(|e| read("leaseHash", e))?;
        if stored == B256::ZERO {
            return Ok(LeaseOnChain::Unknown);
        }
        let filter = Filter::new()
            .address(self.config.escrow)
            .from_block(self.config.from_block)
            .to_block(at)
            .topic1(id);
        let logs = self
            .provider
            .get_logs(&filter)
            .await
            .map_err(|e| rpc("eth_getLogs", e))?;
        let state = fold(&decode_events(logs)?).map_err(|e| garbage("eth_getLogs", e))?;
        let consistent = match &state {
            LeaseOnChain::Open { lease, .. } => lease.state_hash() == stored,
            LeaseOnChain::Closed { .. } => stored == CLOSED,
            LeaseOnChain::Unknown => false,
        };
        if !consistent {
            return Err(garbage(
                "eth_getLogs",
                "the lease's events do not rebuild the state the contract holds",
            ));
        }
        Ok(state)
    }

    /// Ids of the leases the escrow emitted any event for in blocks
    /// `from..=to`, each once, in the order they first appear. One request
    /// however many leases are open, so a watcher can afford it every block.
    pub async fn leases_touched(&self, from: u64, to: u64) -> Result<Vec<B256>, ChainError> {
        // Account events index an owner where lease events index the lease.
        let filter = Filter::new()
            .address(self.config.escrow)
            .from_block(from)
            .to_block(to)
            .event_signature(vec![
                LeaseEscrow::LeaseOpened::SIGNATURE_HASH,
                LeaseEscrow::LeaseWithdrawn::SIGNATURE_HASH,
                LeaseEscrow::LeaseToppedUp::SIGNATURE_HASH,
                LeaseEscrow::LeaseClosed::SIGNATURE_HASH,
            ]);
        let logs = self
            .provider
            .get_logs(&filter)
            .await
            .map_err(|e| rpc("eth_getLogs", e))?;
        Ok(lease_ids(&logs))
    }

    /// What `owner`'s escrow account sent out in blocks `from..=to`, oldest
    /// first, as the chain recorded it: a transfer counts here whether or not
    /// its sender heard the receipt.
    pub async fn funds_withdrawn(&self, owner: Address, from: u64, to: u64) -> Result<Vec<Withdrawal>, ChainError> {
        let filter = Filter::new()
            .address(self.config.escrow)
            .from_block(from)
            .to_block(to)
            .event_signature(LeaseEscrow::FundsWithdrawn::SIGNATURE_HASH)
            .topic1(owner)
            .topic2(self.config.token);
        let mut logs = self
            .provider
            .get_logs(&filter)
            .await
            .map_err(|e| rpc("eth_getLogs", e))?;
        logs.sort_by_key(|l| (l.block_number, l.log_index));
        let mut out = Vec::with_capacity(logs.len());
        for log in logs {
            // A log without a block is not final; a later read finds it mined.
            let (Some(block), Some(tx)) = (log.block_number, log.transaction_hash) else {
                continue;
            };
            let e = log
                .log_decode::<LeaseEscrow::FundsWithdrawn>()
                .map_err(|e| garbage("eth_getLogs", e))?
                .inner
                .data;
            let amount = u128::try_from(e.amount).map_err(|_| garbage("eth_getLogs", "withdrawal above 2^128"))?;
            out.push(Withdrawal {
                to: e.to,
                amount,
                block,
                tx,
            });
        }
        Ok(out)
    }

    /// Lease ids where `party` is renter or provider, oldest first.
    pub async fn lease_ids_of(&self, party: Address) -> Result<Vec<B256>, ChainError> {
        let base = Filter::new()
            .address(self.config.escrow)
            .from_block(self.config.from_block)
            .event_signature(LeaseEscrow::LeaseOpened::SIGNATURE_HASH);
        let mut logs = self
            .provider
            .get_logs(&base.clone().topic2(party))
            .await
            .map_err(|e| rpc("eth_getLogs", e))?;
        logs.extend(
            self.provider
                .get_logs(&base.topic3(party))
                .await
                .map_err(|e| rpc("eth_getLogs", e))?,
        );
        logs.sort_by_key(|l| (l.block_number, l.log_index));
        Ok(lease_ids(&logs))
    }

    /// Opens the lease unless it already is. Safe to call again after any error.
    pub async fn open(
        &self,
        id: B256,
        provider: Address,
        rate_per_second: u128,
        deposit: u128,
    ) -> Result<OpenOutcome, ChainError> {
        self.open_as(None, id, provider, rate_per_second, deposit).await
    }

    /// Opens the lease for `renter` as its agent, funded from the renter's
    /// escrow account within what `approveAgent` allows us. Safe to call again
    /// after any error.
    pub async fn open_for(
        &self,
        renter: Address,
        id: B256,
        provider: Address,
        rate_per_second: u128,
        deposit: u128,
    ) -> Result<OpenOutcome, ChainError> {
        self.open_as(Some(renter), id, provider, rate_per_second, deposit).await
    }

    async fn open_as(
        &self,
        for_renter: Option<Address>,
        id: B256,
        provider: Address,
        rate_per_second: u128,
        deposit: u128,
    ) -> Result<OpenOutcome, ChainError> {
        let me = self.wallet.ok_or(ChainError::NoWallet("open"))?;
        let (renter, agent) = match for_renter {
            Some(r) => (r, me),
            None => (me, Address::ZERO),
        };
        for _ in 0..STALE_RETRIES {
            match self.lease(id).await? {
                LeaseOnChain::Unknown => {}
                LeaseOnChain::Open {
                    lease, opened_block, ..
                } => {
                    let ours = lease.renter == renter
                        && lease.agent == agent
                        && lease.provider == provider
                        && lease.token == self.config.token
                        && lease.rate_per_second == rate_per_second;
                    if !ours {
                        return Err(ChainError::Conflict {
                            lease: id,
                            detail: describe_terms(&lease),
                        });
                    }
                    return Ok(OpenOutcome::AlreadyOpen { block: opened_block });
                }
                LeaseOnChain::Closed { .. } => {
                    return Err(ChainError::Refused {
                        call: "open",
                        code: "LeaseIsClosed",
                        reason: format!("lease {id} was opened and closed already"),
                    });
                }
            }
            let tx = match for_renter {
                None => {
                    self.ensure_allowance(deposit).await?;
                    self.escrow()
                        .open(id, provider, self.config.token, rate_per_second, deposit)
                        .into_transaction_request()
                }
                // Funded from the renter's account only: no token allowance is involved.
                Some(r) => self
                    .escrow()
                    .openFor(r, id, provider, self.config.token, rate_per_second, deposit)
                    .into_transaction_request(),
            };
            match self.send("open", tx).await {
                Ok(r) => {
                    return Ok(OpenOutcome::Opened {
                        block: r.block_number.unwrap_or_default(),
                        tx: r.transaction_hash,
                        gas_used: r.gas_used,
                    });
                }
                // Another attempt (ours, earlier) got there first: read it back.
                Err(
                    ChainError::Refused {
                        code: "LeaseExists", ..
                    }
                    | ChainError::RevertedOnChain { .. },
                ) => continue,
                Err(e) => return Err(e),
            }
        }
        Err(garbage("open", "the lease changed under every attempt"))
    }

    /// Lets `agent` open leases from this wallet's escrow account, up to
    /// `amount` in all, and close them; zero revokes.
    pub async fn approve_agent(&self, agent: Address, amount: u128) -> Result<(), ChainError> {
        let tx = self
            .escrow()
            .approveAgent(agent, self.config.token, U256::from(amount))
            .into_transaction_request();
        self.send("approveAgent", tx).await.map(|_| ())
    }

    /// What `agent` may still commit from `renter`'s escrow account.
    pub async fn agent_allowance(&self, renter: Address, agent: Address) -> Result<u128, ChainError> {
        let v = self
            .escrow()
            .agentAllowance(renter, agent, self.config.token)
            .call()
            .await
            .map_err(|e| read("agentAllowance", e))?;
        Ok(u128::try_from(v).unwrap_or(u128::MAX))
    }

    /// Moves `amount` from the wallet into its escrow account.
    pub async fn deposit(&self, amount: u128) -> Result<(), ChainError> {
        self.ensure_allowance(amount).await?;
        let tx = self
            .escrow()
            .deposit(self.config.token, U256::from(amount))
            .into_transaction_request();
        self.send("deposit", tx).await.map(|_| ())
    }

    /// Sends `amount` from the wallet's escrow account to `to`.
    pub async fn withdraw_funds(&self, amount: u128, to: Address) -> Result<(), ChainError> {
        let tx = self
            .escrow()
            .withdrawFunds(self.config.token, U256::from(amount), to)
            .into_transaction_request();
        self.send("withdrawFunds", tx).await.map(|_| ())
    }

    /// Pays the provider what has accrued, into its escrow account. Provider only.
    pub async fn withdraw(&self, id: B256) -> Result<u128, ChainError> {
        let r = self
            .act("withdraw", id, |escrow, lease| {
                escrow.withdraw(id, lease.to_sol()).into_transaction_request()
            })
            .await?;
        let amount = r
            .decoded_log::<LeaseEscrow::LeaseWithdrawn>()
            .ok_or_else(|| garbage("withdraw", "receipt without LeaseWithdrawn"))?;
        to_u128("withdraw", amount.data.amount)
    }

    /// Adds funds; returns the gas it took. As the renter, from our account
    /// and then our wallet; as the lease's agent, from the renter's account
    /// within what it allows us (no token allowance is involved then).
    pub async fn top_up(&self, id: B256, amount: u128) -> Result<u64, ChainError> {
        let me = self.wallet.ok_or(ChainError::NoWallet("topUp"))?;
        let as_agent = matches!(
            self.lease(id).await?,
            LeaseOnChain::Open { lease, .. } if lease.agent == me && lease.renter != me
        );
        if !as_agent {
            self.ensure_allowance(amount).await?;
        }
        self.act("topUp", id, |escrow, lease| {
            escrow.topUp(id, lease.to_sol(), amount).into_transaction_request()
        })
        .await
        .map(|r| r.gas_used)
    }

    /// Closes the lease; closing one that is closed already reports how it closed.
    pub async fn close(&self, id: B256, reason: CloseReason) -> Result<Closed, ChainError> {
        if let LeaseOnChain::Closed { reason, .. } = self.lease(id).await? {
            return Ok(Closed {
                reason,
                paid: 0,
                refunded: 0,
                by_us: false,
            });
        }
        let result = self
            .act("close", id, |escrow, lease| {
                escrow
                    .close(id, lease.to_sol(), reason.as_u8())
                    .into_transaction_request()
            })
            .await;
        let r = match result {
            Ok(r) => r,
            Err(ChainError::Refused {
                code: "LeaseIsClosed", ..
            }) => {
                if let LeaseOnChain::Closed { reason, .. } = self.lease(id).await? {
                    return Ok(Closed {
                        reason,
                        paid: 0,
                        refunded: 0,
                        by_us: false,
                    });
                }
                return Err(garbage("close", "the escrow says closed, its events do not"));
            }
            Err(e) => return Err(e),
        };
        let log = r
            .decoded_log::<LeaseEscrow::LeaseClosed>()
            .ok_or_else(|| garbage("close", "receipt without LeaseClosed"))?;
        Ok(Closed {
            reason,
            paid: to_u128("close", log.data.paid)?,
            refunded: to_u128("close", log.data.refunded)?,
            by_us: true,
        })
    }

    /// Reads the open lease, sends the call built from it, and starts again when
    /// the other party changed the lease in between.
    async fn act(
        &self,
        call: &'static str,
        id: B256,
        build: impl Fn(&LeaseEscrow::LeaseEscrowInstance<&DynProvider>, &OpenLease) -> TransactionRequest,
    ) -> Result<TransactionReceipt, ChainError> {
        for _ in 0..STALE_RETRIES {
            let lease = match self.lease(id).await? {
                LeaseOnChain::Open { lease, .. } => lease,
                LeaseOnChain::Unknown => {
                    return Err(ChainError::Refused {
                        call,
                        code: "UnknownLease",
                        reason: format!("no lease {id}"),
                    });
                }
                LeaseOnChain::Closed { .. } => {
                    return Err(ChainError::Refused {
                        call,
                        code: "LeaseIsClosed",
                        reason: format!("lease {id} is closed"),
                    });
                }
            };
            match self.send(call, build(&self.escrow(), &lease)).await {
                Err(ChainError::Refused { code: "StaleLease", .. } | ChainError::RevertedOnChain { .. }) => {
                    debug!(call, lease = %id, "lease changed under us; reading it again");
                }
                other => return other,
            }
        }
        Err(garbage(call, "the lease changed under every attempt"))
    }

    /// Approves the escrow for everything once, so that concurrent opens from one
    /// wallet never race on a shrinking allowance.
    async fn ensure_allowance(&self, needed: u128) -> Result<(), ChainError> {
        use std::sync::atomic::Ordering;
        let me = self.wallet.ok_or(ChainError::NoWallet("approve"))?;
        if self.unlimited.load(Ordering::Relaxed) {
            return Ok(());
        }
        let _guard = self.allowance.lock().await;
        let allowed = self.allowance(me).await?;
        if allowed >= u128::MAX / 2 {
            self.unlimited.store(true, Ordering::Relaxed);
            return Ok(());
        }
        if allowed >= needed {
            return Ok(());
        }
        let tx = self
            .token()
            .approve(self.config.escrow, U256::MAX)
            .into_transaction_request();
        self.send("approve", tx).await?;
        self.unlimited.store(true, Ordering::Relaxed);
        Ok(())
    }

    /// Sends a transaction from the wallet and waits for its receipt.
    #[tracing::instrument(name = "chain.tx", skip_all, fields(call = call, tx = tracing::field::Empty, gas_used = tracing::field::Empty))]
    pub async fn send(&self, call: &'static str, mut tx: TransactionRequest) -> Result<TransactionReceipt, ChainError> {
        let from = self.wallet.ok_or(ChainError::NoWallet(call))?;
        tx.set_from(from);
        // Gas, fees and chain id are filled here, before the nonce lock, so
        // concurrent sends overlap these round trips; under the lock only the
        // nonce is set and the signed transaction handed over. Filled inside
        // it, four round trips per send made opens one at a time.
        if tx.gas.is_none() {
            let gas = self
                .provider
                .estimate_gas(tx.clone())
                .await
                .map_err(|e| classify(call, e))?;
            tx.set_gas_limit(gas_limit_for(gas));
        }
        if tx.gas_price.is_none() && tx.max_fee_per_gas.is_none() {
            let fees = self
                .provider
                .estimate_eip1559_fees()
                .await
                .map_err(|e| rpc("eth_feeHistory", e))?;
            tx.set_max_fee_per_gas(fees.max_fee_per_gas);
            tx.set_max_priority_fee_per_gas(fees.max_priority_fee_per_gas);
        }
        tx.set_chain_id(self.config.chain_id);
        let pending = {
            let mut next = self.next_nonce.lock().await;
            let nonce = match *next {
                Some(n) => n,
                None => self
                    .provider
                    .get_transaction_count(from)
                    .pending()
                    .await
                    .map_err(|e| rpc("eth_getTransactionCount", e))?,
            };
            tx.set_nonce(nonce);
            match self.provider.send_transaction(tx).await {
                Ok(p) => {
                    *next = Some(nonce + 1);
                    p
                }
                Err(e) => {
                    // Whether it reached the node is unknown: ask next time.
                    *next = None;
                    self.unlimited.store(false, std::sync::atomic::Ordering::Relaxed);
                    return Err(classify(call, e));
                }
            }
        };
        let hash = *pending.tx_hash();
        tracing::Span::current().record("tx", tracing::field::display(hash));
        let started = Instant::now();
        let receipt = pending
            .with_required_confirmations(1)
            .with_timeout(Some(self.options.receipt_timeout))
            .get_receipt()
            .await;
        let receipt = match receipt {
            Ok(r) => r,
            Err(alloy::providers::PendingTransactionError::TxWatcher(_)) => {
                return Err(ChainError::ReceiptTimeout {
                    call,
                    tx: hash,
                    waited: self.options.receipt_timeout,
                });
            }
            Err(alloy::providers::PendingTransactionError::TransportError(e)) => return Err(rpc("receipt", e)),
            Err(e) => {
                return Err(ChainError::Rpc {
                    during: "receipt",
                    detail: e.to_string(),
                });
            }
        };
        let record = TxRecord {
            call,
            gas_used: receipt.gas_used,
            latency: started.elapsed(),
            succeeded: receipt.status(),
        };
        if let Some(observe) = &self.observer {
            observe(&record);
        }
        tracing::Span::current().record("gas_used", receipt.gas_used);
        debug!(call, tx = %hash, gas = receipt.gas_used, latency_ms = record.latency.as_millis() as u64, "transaction mined");
        if !receipt.status() {
            warn!(call, tx = %hash, "transaction reverted on chain");
            self.unlimited.store(false, std::sync::atomic::Ordering::Relaxed);
            return Err(ChainError::RevertedOnChain { call, tx: hash });
        }
        Ok(receipt)
    }
}

fn describe_terms(lease: &OpenLease) -> String {
    format!(
        "renter {}, agent {}, provider {}, token {}, {} per second",
        lease.renter, lease.agent, lease.provider, lease.token, lease.rate_per_second
    )
}

fn decode_events(mut logs: Vec<Log>) -> Result<Vec<(u64, LeaseEvent)>, ChainError> {
    logs.sort_by_key(|l| (l.block_number, l.log_index));
    let mut events = Vec::with_capacity(logs.len());
    for log in logs {
        // A log without a block is not final; the lease is read again later.
        let Some(block) = log.block_number else { continue };
        let bad = |e: alloy::sol_types::Error| garbage("eth_getLogs", e);
        let event = match log.topic0() {
            Some(&LeaseEscrow::LeaseOpened::SIGNATURE_HASH) => {
                let e = log.log_decode::<LeaseEscrow::LeaseOpened>().map_err(bad)?.inner.data;
                LeaseEvent::Opened {
                    renter: e.renter,
                    agent: e.agent,
                    provider: e.provider,
                    token: e.token,
                    rate_per_second: to_u128("LeaseOpened", e.ratePerSecond)?,
                    deposit: to_u128("LeaseOpened", e.deposit)?,
                    started_at: to_u64("LeaseOpened", e.startedAt)?,
                }
            }
            Some(&LeaseEscrow::LeaseWithdrawn::SIGNATURE_HASH) => {
                let e = log.log_decode::<LeaseEscrow::LeaseWithdrawn>().map_err(bad)?.inner.data;
                LeaseEvent::Withdrawn {
                    amount: to_u128("LeaseWithdrawn", e.amount)?,
                    balance: to_u128("LeaseWithdrawn", e.balance)?,
                    settled_at: to_u64("LeaseWithdrawn", e.settledAt)?,
                }
            }
            Some(&LeaseEscrow::LeaseToppedUp::SIGNATURE_HASH) => {
                let e = log.log_decode::<LeaseEscrow::LeaseToppedUp>().map_err(bad)?.inner.data;
                LeaseEvent::ToppedUp {
                    amount: to_u128("LeaseToppedUp", e.amount)?,
                    balance: to_u128("LeaseToppedUp", e.balance)?,
                    owed: to_u128("LeaseToppedUp", e.owed)?,
                    settled_at: to_u64("LeaseToppedUp", e.settledAt)?,
                }
            }
            Some(&LeaseEscrow::LeaseClosed::SIGNATURE_HASH) => {
                let e = log.log_decode::<LeaseEscrow::LeaseClosed>().map_err(bad)?.inner.data;
                LeaseEvent::Closed {
                    reason: CloseReason::from_u8(e.reason)
                        .ok_or_else(|| garbage("LeaseClosed", "unknown close reason"))?,
                    closed_by: e.closedBy,
                    paid: to_u128("LeaseClosed", e.paid)?,
                    refunded: to_u128("LeaseClosed", e.refunded)?,
                }
            }
            _ => return Err(garbage("eth_getLogs", "a log that is not a lease event")),
        };
        events.push((block, event));
    }
    Ok(events)
}

fn to_u128(during: &'static str, v: U256) -> Result<u128, ChainError> {
    u128::try_from(v).map_err(|_| garbage(during, "amount beyond 128 bits"))
}

fn to_u64(during: &'static str, v: U256) -> Result<u64, ChainError> {
    u64::try_from(v).map_err(|_| garbage(during, "timestamp beyond 64 bits"))
}

/// The leases that escrow events name, each once, in the order of `logs`.
/// Every escrow event names its lease first (topic 1).
fn lease_ids(logs: &[Log]) -> Vec<B256> {
    let mut seen = std::collections::HashSet::new();
    logs.iter()
        .filter_map(|log| log.topics().get(1).copied())
        .filter(|id| seen.insert(*id))
        .collect()
}

fn garbage(during: &'static str, detail: impl std::fmt::Display) -> ChainError {
    ChainError::Garbage {
        during,
        detail: detail.to_string(),
    }
}

fn rpc(during: &'static str, e: RpcError<TransportErrorKind>) -> ChainError {
    match e {
        RpcError::DeserError { err, .. } => garbage(during, err),
        RpcError::NullResp => garbage(during, "null response"),
        other => ChainError::Rpc {
            during,
            detail: other.to_string(),
        },
    }
}

fn read(during: &'static str, e: alloy::contract::Error) -> ChainError {
    match e {
        alloy::contract::Error::TransportError(e) => classify(during, e),
        other => garbage(during, other),
    }
}

/// Turns a send or call error into a refusal (with the contract's own error name)
/// when the node reports a revert, and into an RPC failure otherwise.
fn classify(call: &'static str, e: RpcError<TransportErrorKind>) -> ChainError {
    if let Some(payload) = e.as_error_resp() {
        if let Some(err) = payload.as_decoded_interface_error::<LeaseEscrow::LeaseEscrowErrors>() {
            let (code, reason) = escrow_refusal(&err);
            return ChainError::Refused { call, code, reason };
        }
        if let Some(err) = payload.as_decoded_interface_error::<GpuToken::GpuTokenErrors>() {
            let (code, reason) = token_refusal(&err);
            return ChainError::Refused { call, code, reason };
        }
        if payload.as_revert_data().is_some() || payload.message.contains("revert") {
            return ChainError::Refused {
                call,
                code: "Reverted",
                reason: payload.message.to_string(),
            };
        }
    }
    rpc(call, e)
}

fn escrow_refusal(err: &LeaseEscrow::LeaseEscrowErrors) -> (&'static str, String) {
    use LeaseEscrow::LeaseEscrowErrors as E;
    match err {
        E::LeaseExists(e) => ("LeaseExists", format!("lease {} already exists", e.leaseId)),
        E::UnknownLease(e) => ("UnknownLease", format!("no lease {}", e.leaseId)),
        E::LeaseIsClosed(e) => (
            "LeaseIsClosed",
            format!("lease {} is closed and accepts nothing more", e.leaseId),
        ),
        E::StaleLease(e) => ("StaleLease", format!("lease {} changed since it was read", e.leaseId)),
        E::NotOverdrawn(e) => (
            "NotOverdrawn",
            format!(
                "lease {} still has funds; it cannot close as InsufficientFunds",
                e.leaseId
            ),
        ),
        E::NotRenter(_) => ("NotRenter", "only the lease's renter may do this".into()),
        E::NotProvider(_) => ("NotProvider", "only the lease's provider may do this".into()),
        E::NotParty(_) => (
            "NotParty",
            "only the lease's renter, its agent or its provider may do this".into(),
        ),
        E::ReasonNotAllowed(e) => (
            "ReasonNotAllowed",
            format!(
                "this side may not close with reason {}",
                CloseReason::from_u8(e.reason).map_or("?", CloseReason::as_str)
            ),
        ),
        E::ZeroAmount(_) => ("ZeroAmount", "the amount must be above zero".into()),
        E::ZeroRate(_) => ("ZeroRate", "the rate must be above zero".into()),
        E::InvalidLeaseId(_) => ("InvalidLeaseId", "the lease id is reserved".into()),
        E::InvalidProvider(_) => (
            "InvalidProvider",
            "the provider must be another, non-zero address".into(),
        ),
        E::InvalidToken(_) => ("InvalidToken", "the token address is zero".into()),
        E::InsufficientAccount(e) => (
            "InsufficientAccount",
            format!(
                "the escrow account holds {} tokens, {} were asked for",
                gpupool_crds::price::TokenAmount(u128::try_from(e.available).unwrap_or(u128::MAX)),
                gpupool_crds::price::TokenAmount(u128::try_from(e.requested).unwrap_or(u128::MAX)),
            ),
        ),
        E::InvalidAgent(_) => (
            "InvalidAgent",
            "the agent must be another, non-zero address than the renter".into(),
        ),
        E::InsufficientAgentAllowance(e) => (
            "InsufficientAgentAllowance",
            format!(
                "the renter lets this agent commit {} more tokens, {} were asked for \
                 (the renter raises it with `gpupool escrow agent`)",
                gpupool_crds::price::TokenAmount(u128::try_from(e.available).unwrap_or(u128::MAX)),
                gpupool_crds::price::TokenAmount(u128::try_from(e.requested).unwrap_or(u128::MAX)),
            ),
        ),
        E::InvalidRecipient(_) => (
            "InvalidRecipient",
            "the recipient is the zero address or the escrow itself".into(),
        ),
        other => ("Reverted", format!("{other:?}")),
    }
}

fn token_refusal(err: &GpuToken::GpuTokenErrors) -> (&'static str, String) {
    use GpuToken::GpuTokenErrors as E;
    match err {
        E::ERC20InsufficientBalance(e) => (
            "InsufficientBalance",
            format!(
                "wallet {} holds {} base units, {} needed",
                e.sender, e.balance, e.needed
            ),
        ),
        E::ERC20InsufficientAllowance(e) => (
            "InsufficientAllowance",
            format!("the escrow may spend {} base units, {} needed", e.allowance, e.needed),
        ),
        other => ("TokenRefused", format!("{other:?}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_gas_limit_covers_an_open_that_falls_back_on_the_wallet() {
        // Receipts from bench-escrow: an open from the escrow account, and
        // the same open paid from the wallet once the account ran dry.
        let (from_account, from_wallet) = (56_592, 71_084);
        assert!(gas_limit_for(from_account) >= from_wallet);
        // A close estimated against a provider account that held tokens,
        // mined after another close emptied it: a storage word from zero.
        assert!(gas_limit_for(44_656) >= 44_656 + 17_100);
        assert_eq!(gas_limit_for(u64::MAX), u64::MAX);
    }
}

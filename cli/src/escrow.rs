//! `gpupool escrow …` and `gpupool leases`: a renter's or provider's view of the
//! escrow, straight from the chain (no cluster needed).

use std::path::PathBuf;
use std::str::FromStr;

use anyhow::Context as _;
use gpupool_chain::{Address, B256, ChainConfig, ClientOptions, EscrowClient, LeaseOnChain, Wallet};
use gpupool_crds::price::{TokenAmount, shown};
use serde::Serialize;

use crate::output::{Format, structured, table};

/// Where the chain is and who we are.
#[derive(clap::Args, Debug, Clone)]
pub struct ChainOpts {
    /// JSON file with rpcUrl, chainId, escrow, token, fromBlock (`make testenv-up` writes e2e/.state/chain.json).
    #[arg(long, env = "GPUPOOL_CHAIN_CONFIG", global = true)]
    chain_config: Option<PathBuf>,
    /// JSON-RPC URL (overrides the file's).
    #[arg(long, env = "GPUPOOL_CHAIN_RPC_URL", hide_env_values = true, global = true)]
    rpc_url: Option<String>,
    /// Escrow contract address (overrides the file's).
    #[arg(long, env = "GPUPOOL_ESCROW_ADDRESS", global = true)]
    escrow: Option<Address>,
    /// File holding the wallet's private key: it signs chain transactions and Pool API requests.
    #[arg(long, env = "GPUPOOL_WALLET_KEY_FILE", global = true)]
    wallet_key_file: Option<PathBuf>,
}

impl ChainOpts {
    /// The wallet from --wallet-key-file, which signs what needs signing.
    pub fn wallet(&self) -> anyhow::Result<Wallet> {
        let path = self.wallet_key_file.as_deref().context(
            "pass --wallet-key-file (or GPUPOOL_WALLET_KEY_FILE): Pool API requests are signed with your wallet",
        )?;
        Ok(Wallet::from_file(path)?)
    }

    fn connect(&self) -> anyhow::Result<(EscrowClient, Option<Wallet>)> {
        let path = self
            .chain_config
            .as_deref()
            .context("no chain configured: pass --chain-config (or GPUPOOL_CHAIN_CONFIG)")?;
        let mut config = ChainConfig::load(path)?;
        if let Some(u) = &self.rpc_url {
            config.rpc_url.clone_from(u);
        }
        if let Some(e) = self.escrow {
            config.escrow = e;
        }
        let wallet = self.wallet_key_file.as_deref().map(Wallet::from_file).transpose()?;
        let client = EscrowClient::connect(config, wallet.as_ref(), ClientOptions::default())?;
        Ok((client, wallet))
    }
}

#[derive(clap::Subcommand, Debug)]
pub enum EscrowCmd {
    /// Token balance of a wallet, its escrow account, and what it has in open leases.
    Balance {
        /// The wallet; the key file's by default.
        #[arg(long)]
        address: Option<Address>,
    },
    /// Move tokens from your wallet into your escrow account (leases open from
    /// it first), or with --lease add them to an open lease you rent (a top-up).
    Deposit {
        /// The on-chain lease id (0x + 64 hex digits) to top up.
        #[arg(long)]
        lease: Option<String>,
        /// Tokens, as a decimal (e.g. 25 or 0.5).
        #[arg(long)]
        amount: String,
    },
    /// Take tokens out of your escrow account to a wallet, or with --lease
    /// collect what a lease you provide has accrued into your account.
    Withdraw {
        /// The on-chain lease id whose accrual to collect.
        #[arg(long, conflicts_with_all = ["amount", "to"])]
        lease: Option<String>,
        /// Tokens to take out of the account, as a decimal.
        #[arg(long, required_unless_present = "lease")]
        amount: Option<String>,
        /// Where the tokens go; your own wallet by default.
        #[arg(long)]
        to: Option<Address>,
    },
    /// Let a pool member's operator (its wallet) open leases for you from your
    /// escrow account, up to --amount tokens in all, and close them: what a
    /// job submitted through that member's Pool API needs. `--amount 0` revokes
    /// further opens. Without --amount, shows what the agent may still commit.
    Agent {
        /// The member operator's wallet address (`gpupool pool-info` shows it).
        #[arg(long)]
        agent: Address,
        /// Tokens the agent may commit from now on, as a decimal; replaces any earlier amount.
        #[arg(long)]
        amount: Option<String>,
    },
}

fn lease_arg(s: &str) -> anyhow::Result<B256> {
    B256::from_str(s).map_err(|_| anyhow::anyhow!("--lease must be 0x followed by 64 hex digits"))
}

fn tokens(v: u128) -> String {
    TokenAmount(v).to_string()
}

fn amount_arg(s: &str) -> anyhow::Result<TokenAmount> {
    let amount: TokenAmount = s.parse().map_err(|e| anyhow::anyhow!("--amount: {e}"))?;
    anyhow::ensure!(amount.0 > 0, "--amount must be above zero");
    Ok(amount)
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct Balance {
    address: String,
    wallet: String,
    /// In the escrow account: lease payments and refunds land here, and
    /// leases open from it first.
    account: String,
    /// Remaining in open leases where this address is the renter.
    in_leases_as_renter: String,
    /// Accrued, unpaid, in open leases where this address is the provider.
    owed_as_provider: String,
    open_leases: usize,
}

pub async fn escrow(format: Format, opts: &ChainOpts, cmd: EscrowCmd) -> anyhow::Result<String> {
    let (client, wallet) = opts.connect()?;
    match cmd {
        EscrowCmd::Balance { address } => {
            let who = address
                .or(wallet.as_ref().map(Wallet::address))
                .context("pass --address or --wallet-key-file")?;
            let tip = client.tip().await?;
            let now = tip.timestamp;
            let (mut renting, mut owed, mut open) = (0u128, 0u128, 0usize);
            for id in client.lease_ids_of(who).await? {
                if let LeaseOnChain::Open { lease, .. } = client.lease_at(id, tip.number).await? {
                    open += 1;
                    if lease.renter == who {
                        renting += lease.remaining_at(now);
                    }
                    if lease.provider == who {
                        owed += lease.owed_at(now);
                    }
                }
            }
            let b = Balance {
                address: who.to_string(),
                wallet: tokens(client.token_balance(who).await?),
                account: tokens(client.account(who).await?),
                in_leases_as_renter: tokens(renting),
                owed_as_provider: tokens(owed),
                open_leases: open,
            };
            if !matches!(format, Format::Table) {
                return structured(format, &b);
            }
            Ok(table(
                &[
                    "ADDRESS",
                    "WALLET",
                    "ACCOUNT",
                    "IN-LEASES",
                    "OWED-TO-YOU",
                    "OPEN-LEASES",
                ],
                &[vec![
                    b.address,
                    shown(&b.wallet),
                    shown(&b.account),
                    shown(&b.in_leases_as_renter),
                    shown(&b.owed_as_provider),
                    b.open_leases.to_string(),
                ]],
            ))
        }
        EscrowCmd::Deposit {
            lease: Some(lease),
            amount,
        } => {
            let id = lease_arg(&lease)?;
            let amount = amount_arg(&amount)?;
            client.top_up(id, amount.0).await?;
            Ok(format!("deposited {amount} tokens into lease {id}\n"))
        }
        EscrowCmd::Deposit { lease: None, amount } => {
            let amount = amount_arg(&amount)?;
            client.deposit(amount.0).await?;
            Ok(format!("deposited {amount} tokens into your escrow account\n"))
        }
        EscrowCmd::Withdraw { lease: Some(lease), .. } => {
            let id = lease_arg(&lease)?;
            let got = client.withdraw(id).await?;
            Ok(format!(
                "withdrew {} tokens from lease {id} into your escrow account\n",
                TokenAmount(got).shown()
            ))
        }
        EscrowCmd::Withdraw {
            lease: None,
            amount,
            to,
        } => {
            let amount = amount_arg(amount.as_deref().context("pass --amount, or --lease")?)?;
            let me = wallet.as_ref().map(Wallet::address).context("pass --wallet-key-file")?;
            let to = to.unwrap_or(me);
            client.withdraw_funds(amount.0, to).await?;
            Ok(format!("withdrew {amount} tokens from your escrow account to {to}\n"))
        }
        EscrowCmd::Agent { agent, amount } => {
            let me = wallet.as_ref().map(Wallet::address).context("pass --wallet-key-file")?;
            if let Some(amount) = amount {
                let amount: TokenAmount = amount.parse().map_err(|e| anyhow::anyhow!("--amount: {e}"))?;
                client.approve_agent(agent, amount.0).await?;
            }
            let left = client.agent_allowance(me, agent).await?;
            Ok(format!(
                "agent {agent} may commit {} more tokens from your escrow account (it holds {})\n",
                TokenAmount(left).shown(),
                TokenAmount(client.account(me).await?).shown()
            ))
        }
    }
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct LeaseRow {
    lease_id: String,
    role: &'static str,
    state: String,
    renter: String,
    provider: String,
    paid: String,
    remaining: String,
    close_reason: Option<String>,
}

/// Leases where the wallet (or `--address`) is renter or provider, from the chain.
pub async fn leases(format: Format, opts: &ChainOpts, address: Option<Address>) -> anyhow::Result<String> {
    let (client, wallet) = opts.connect()?;
    let who = address
        .or(wallet.as_ref().map(Wallet::address))
        .context("pass --address or --wallet-key-file")?;
    let tip = client.tip().await?;
    let now = tip.timestamp;
    let mut rows = Vec::new();
    for id in client.lease_ids_of(who).await? {
        let row = match client.lease_at(id, tip.number).await? {
            LeaseOnChain::Open { lease, paid, .. } => LeaseRow {
                lease_id: id.to_string(),
                role: if lease.renter == who { "renter" } else { "provider" },
                state: if lease.overdrawn_at(now) {
                    "InsufficientFunds".into()
                } else {
                    "Open".into()
                },
                renter: lease.renter.to_string(),
                provider: lease.provider.to_string(),
                paid: tokens(paid),
                remaining: tokens(lease.remaining_at(now)),
                close_reason: None,
            },
            LeaseOnChain::Closed {
                renter,
                provider,
                reason,
                paid,
                ..
            } => LeaseRow {
                lease_id: id.to_string(),
                role: if renter == who { "renter" } else { "provider" },
                state: "Closed".into(),
                renter: renter.to_string(),
                provider: provider.to_string(),
                paid: tokens(paid),
                remaining: "0".into(),
                close_reason: Some(reason.as_str().into()),
            },
            LeaseOnChain::Unknown => continue,
        };
        rows.push(row);
    }
    if !matches!(format, Format::Table) {
        return structured(format, &rows);
    }
    let short = |a: &str| format!("{}…{}", &a[..6], &a[a.len() - 4..]);
    Ok(table(
        &[
            "LEASE",
            "ROLE",
            "STATE",
            "RENTER",
            "PROVIDER",
            "PAID",
            "REMAINING",
            "CLOSE-REASON",
        ],
        &rows
            .into_iter()
            .map(|r| {
                vec![
                    r.lease_id,
                    r.role.into(),
                    r.state,
                    short(&r.renter),
                    short(&r.provider),
                    shown(&r.paid),
                    shown(&r.remaining),
                    r.close_reason.unwrap_or_else(|| "-".into()),
                ]
            })
            .collect::<Vec<_>>(),
    ))
}

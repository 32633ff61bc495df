//! The escrow contract and the Rust client against a real chain (anvil), with
//! time moved forward through anvil's RPC.

use std::time::Duration;

use alloy::providers::ext::AnvilApi;
use gpupool_chain::{
    Address, B256, ChainConfig, ChainError, ClientOptions, CloseReason, EscrowClient, LeaseOnChain, OpenOutcome,
    lease_id,
};
use gpupool_e2e::chain::{Anvil, FUNDING_TOKENS, ONE_TOKEN, deploy_and_fund};
use gpupool_e2e::harness::wait_for;
use gpupool_e2e::rpcproxy::RpcProxy;

const RENTER: usize = 1;
const PROVIDER: usize = 2;
const STRANGER: usize = 3;
const RATE: u128 = 1_000_000_000_000_000; // 0.001 token per second

struct Chain {
    anvil: Anvil,
    config: ChainConfig,
    _dir: tempdir::Dir,
}

mod tempdir {
    pub struct Dir(pub std::path::PathBuf);
    impl Dir {
        pub fn new(tag: &str) -> Self {
            let p = std::env::temp_dir().join(format!("gpupool-escrow-{tag}-{}", std::process::id()));
            let _ = std::fs::remove_dir_all(&p);
            std::fs::create_dir_all(&p).unwrap();
            Self(p)
        }
    }
    impl Drop for Dir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}

async fn chain(tag: &str) -> Chain {
    let dir = tempdir::Dir::new(tag);
    let anvil = Anvil::start(&dir.0).await.expect("anvil");
    let config = deploy_and_fund(&anvil, &[1, 2, 3, 4, 5, 6]).await.expect("deploy");
    Chain {
        anvil,
        config,
        _dir: dir,
    }
}

impl Chain {
    fn client(&self, account: usize) -> EscrowClient {
        let wallet = self.anvil.wallet(account).unwrap();
        EscrowClient::connect(self.config.clone(), Some(&wallet), ClientOptions::default()).unwrap()
    }
    fn address(&self, account: usize) -> Address {
        self.anvil.wallet(account).unwrap().address()
    }
    async fn jump(&self, seconds: u64) {
        let c = self.client(0);
        c.provider().anvil_increase_time(seconds).await.unwrap();
        c.provider().evm_mine(None).await.unwrap();
    }
    /// Every token the escrow contract holds: leases' balances and accounts.
    async fn escrow_total(&self) -> u128 {
        self.client(0).token_balance(self.config.escrow).await.unwrap()
    }
    /// The sum of the funded wallets' escrow accounts.
    async fn in_accounts(&self) -> u128 {
        let c = self.client(0);
        let mut sum = 0;
        for i in 1..=6 {
            sum += c.account(self.address(i)).await.unwrap();
        }
        sum
    }
    /// What the escrow holds for open leases: everything but the accounts.
    async fn escrow_holds(&self) -> u128 {
        self.escrow_total().await - self.in_accounts().await
    }
}

fn refused_code(e: &ChainError) -> &'static str {
    match e {
        ChainError::Refused { code, .. } => code,
        other => panic!("expected a refusal, got {other:?}"),
    }
}

fn open_state(s: &LeaseOnChain) -> &gpupool_chain::OpenLease {
    match s {
        LeaseOnChain::Open { lease, .. } => lease,
        other => panic!("expected an open lease, got {other:?}"),
    }
}

#[tokio::test]
async fn full_lifecycle_pays_the_provider_and_refunds_the_rest() {
    let c = chain("lifecycle").await;
    let renter = c.client(RENTER);
    let provider = c.client(PROVIDER);
    let id = lease_id(c.address(RENTER), "order-lifecycle");
    let deposit = 10 * ONE_TOKEN;
    let renter_before = renter.token_balance(c.address(RENTER)).await.unwrap();
    let provider_before = renter.token_balance(c.address(PROVIDER)).await.unwrap();
    assert_eq!(c.in_accounts().await, 0);
    let before_open = renter.head().await.unwrap();

    let opened = renter.open(id, c.address(PROVIDER), RATE, deposit).await.unwrap();
    assert!(matches!(opened, OpenOutcome::Opened { .. }), "{opened:?}");
    // What a watcher polling the escrow's events sees: this lease, once,
    // and nothing in the blocks before it.
    let head = renter.head().await.unwrap();
    assert_eq!(renter.leases_touched(before_open + 1, head).await.unwrap(), vec![id]);
    assert!(renter.leases_touched(0, before_open).await.unwrap().is_empty());
    assert_eq!(c.escrow_holds().await, deposit);
    let start = open_state(&renter.lease(id).await.unwrap()).settled_at;

    c.jump(1_000).await;
    let withdrawn = provider.withdraw(id).await.unwrap();
    let after_withdraw = renter.lease(id).await.unwrap();
    let l = open_state(&after_withdraw);
    assert_eq!(withdrawn, RATE * u128::from(l.settled_at - start), "paid by the second");
    assert!(withdrawn >= 1_000 * RATE);
    assert_eq!(l.balance, deposit - withdrawn);
    assert_eq!(c.escrow_holds().await, l.balance);
    // Paid into the provider's escrow account, not its wallet.
    assert_eq!(renter.account(c.address(PROVIDER)).await.unwrap(), withdrawn);
    assert_eq!(
        renter.token_balance(c.address(PROVIDER)).await.unwrap(),
        provider_before
    );

    c.jump(500).await;
    let before_close = renter.head().await.unwrap();
    let closed = renter.close(id, CloseReason::Completed).await.unwrap();
    assert!(closed.by_us);
    let head = renter.head().await.unwrap();
    assert_eq!(renter.leases_touched(before_close + 1, head).await.unwrap(), vec![id]);
    let LeaseOnChain::Closed {
        reason,
        paid,
        refunded,
        deposited,
        ..
    } = provider.lease(id).await.unwrap()
    else {
        panic!("closed expected")
    };
    assert_eq!(reason, CloseReason::Completed);
    assert_eq!(paid, withdrawn + closed.paid);
    assert_eq!(refunded, closed.refunded);
    assert_eq!(paid + refunded, deposit);
    assert_eq!(deposited, deposit);
    assert!(closed.paid >= 500 * RATE);
    assert_eq!(c.escrow_holds().await, 0);
    // The deposit left the renter's wallet; the refund is in its account,
    // and the provider's whole payment in the provider's.
    assert_eq!(
        renter.token_balance(c.address(RENTER)).await.unwrap(),
        renter_before - deposit
    );
    assert_eq!(renter.account(c.address(RENTER)).await.unwrap(), refunded);
    assert_eq!(renter.holdings(c.address(RENTER)).await.unwrap(), renter_before - paid);
    assert_eq!(renter.account(c.address(PROVIDER)).await.unwrap(), paid);
    assert_eq!(
        renter.holdings(c.address(PROVIDER)).await.unwrap(),
        provider_before + paid
    );
    assert_eq!(c.escrow_total().await, paid + refunded);

    // Each side takes its tokens out to its wallet.
    provider.withdraw_funds(paid, c.address(PROVIDER)).await.unwrap();
    renter.withdraw_funds(refunded, c.address(RENTER)).await.unwrap();
    assert_eq!(
        renter.token_balance(c.address(PROVIDER)).await.unwrap(),
        provider_before + paid
    );
    assert_eq!(
        renter.token_balance(c.address(RENTER)).await.unwrap(),
        renter_before - paid
    );
    assert_eq!(c.escrow_total().await, 0);

    // Closing again is a no-op that reports the close, not a second payment.
    let again = provider.close(id, CloseReason::Completed).await.unwrap();
    assert!(!again.by_us);
    assert_eq!(c.escrow_holds().await, 0);
    // Both sides list it.
    assert_eq!(renter.lease_ids_of(c.address(RENTER)).await.unwrap(), vec![id]);
    assert_eq!(provider.lease_ids_of(c.address(PROVIDER)).await.unwrap(), vec![id]);
}

/// A member's escrow account funds its leases before its wallet does, receives
/// what its leases pay it, and gives back only what it holds.
#[tokio::test]
async fn escrow_accounts_fund_leases_and_hold_payments() {
    let c = chain("accounts").await;
    let renter = c.client(RENTER);
    let provider = c.client(PROVIDER);
    let stranger = c.client(STRANGER);
    let wallet_before = renter.token_balance(c.address(RENTER)).await.unwrap();

    let before = renter.head().await.unwrap();
    renter.deposit(10 * ONE_TOKEN).await.unwrap();
    assert_eq!(renter.account(c.address(RENTER)).await.unwrap(), 10 * ONE_TOKEN);
    assert_eq!(
        renter.token_balance(c.address(RENTER)).await.unwrap(),
        wallet_before - 10 * ONE_TOKEN
    );
    // Account events are not lease events: a lease watcher sees none.
    let head = renter.head().await.unwrap();
    assert!(renter.leases_touched(before + 1, head).await.unwrap().is_empty());

    // Covered by the account: the wallet does not move.
    let a = lease_id(c.address(RENTER), "order-from-account");
    renter.open(a, c.address(PROVIDER), RATE, 4 * ONE_TOKEN).await.unwrap();
    assert_eq!(renter.account(c.address(RENTER)).await.unwrap(), 6 * ONE_TOKEN);
    assert_eq!(
        renter.token_balance(c.address(RENTER)).await.unwrap(),
        wallet_before - 10 * ONE_TOKEN
    );
    // More than the account holds: all of it, and the rest from the wallet.
    let b = lease_id(c.address(RENTER), "order-split");
    renter.open(b, c.address(PROVIDER), RATE, 8 * ONE_TOKEN).await.unwrap();
    assert_eq!(renter.account(c.address(RENTER)).await.unwrap(), 0);
    assert_eq!(
        renter.token_balance(c.address(RENTER)).await.unwrap(),
        wallet_before - 12 * ONE_TOKEN
    );
    assert_eq!(c.escrow_holds().await, 12 * ONE_TOKEN);

    // Payments land in the provider's account; only it can take them out.
    c.jump(100).await;
    let paid = provider.withdraw(a).await.unwrap();
    assert_eq!(provider.account(c.address(PROVIDER)).await.unwrap(), paid);
    let err = stranger.withdraw_funds(paid, c.address(STRANGER)).await.unwrap_err();
    assert_eq!(refused_code(&err), "InsufficientAccount");
    let err = provider
        .withdraw_funds(paid + 1, c.address(PROVIDER))
        .await
        .unwrap_err();
    assert_eq!(refused_code(&err), "InsufficientAccount");
    assert!(err.to_string().contains("asked for"), "{err}");
    assert_eq!(
        refused_code(&provider.withdraw_funds(0, c.address(PROVIDER)).await.unwrap_err()),
        "ZeroAmount"
    );
    for nowhere in [Address::ZERO, c.config.escrow] {
        assert_eq!(
            refused_code(&provider.withdraw_funds(paid, nowhere).await.unwrap_err()),
            "InvalidRecipient"
        );
    }
    assert_eq!(provider.account(c.address(PROVIDER)).await.unwrap(), paid);

    // Paying someone else from the account is allowed: `to` is any address.
    provider.withdraw_funds(paid, c.address(STRANGER)).await.unwrap();
    assert_eq!(provider.account(c.address(PROVIDER)).await.unwrap(), 0);
    assert_eq!(
        stranger.token_balance(c.address(STRANGER)).await.unwrap(),
        FUNDING_TOKENS * ONE_TOKEN + paid
    );
    // The chain's record of what left each account (the sweep counts from
    // it): the one transfer that went, none of the refused ones, nothing
    // of anyone else's.
    let head = provider.head().await.unwrap();
    let out = provider
        .funds_withdrawn(c.address(PROVIDER), before + 1, head)
        .await
        .unwrap();
    assert_eq!(out.len(), 1, "{out:?}");
    assert_eq!((out[0].to, out[0].amount), (c.address(STRANGER), paid));
    assert!(out[0].block > before && out[0].block <= head);
    assert!(
        renter
            .funds_withdrawn(c.address(RENTER), before + 1, head)
            .await
            .unwrap()
            .is_empty()
    );
    assert!(
        provider
            .funds_withdrawn(c.address(PROVIDER), before + 1, out[0].block - 1)
            .await
            .unwrap()
            .is_empty(),
        "blocks before the transfer hold none"
    );

    // A refund funds the next top-up before the wallet does.
    let closed = renter.close(b, CloseReason::RenterCancelled).await.unwrap();
    assert_eq!(renter.account(c.address(RENTER)).await.unwrap(), closed.refunded);
    let wallet_now = renter.token_balance(c.address(RENTER)).await.unwrap();
    renter.top_up(a, ONE_TOKEN).await.unwrap();
    assert_eq!(
        renter.account(c.address(RENTER)).await.unwrap(),
        closed.refunded - ONE_TOKEN
    );
    assert_eq!(renter.token_balance(c.address(RENTER)).await.unwrap(), wallet_now);
    assert_eq!(c.escrow_total().await, c.escrow_holds().await + c.in_accounts().await);
    assert_eq!(
        c.escrow_holds().await,
        open_state(&renter.lease(a).await.unwrap()).balance
    );
}

#[tokio::test]
async fn forbidden_actions_are_refused_and_change_nothing() {
    let c = chain("forbidden").await;
    let renter = c.client(RENTER);
    let provider = c.client(PROVIDER);
    let stranger = c.client(STRANGER);
    let id = lease_id(c.address(RENTER), "order-forbidden");
    let deposit = 5 * ONE_TOKEN;
    renter.open(id, c.address(PROVIDER), RATE, deposit).await.unwrap();
    c.jump(100).await;
    let before = renter.lease(id).await.unwrap();

    // A stranger can neither withdraw nor close; the renter cannot take the provider's share.
    assert_eq!(refused_code(&stranger.withdraw(id).await.unwrap_err()), "NotProvider");
    assert_eq!(
        refused_code(&stranger.close(id, CloseReason::Completed).await.unwrap_err()),
        "NotParty"
    );
    assert_eq!(refused_code(&renter.withdraw(id).await.unwrap_err()), "NotProvider");
    assert_eq!(
        refused_code(&stranger.top_up(id, ONE_TOKEN).await.unwrap_err()),
        "NotRenter"
    );
    // Only the renter may say it cancelled; a funded lease is not out of funds.
    assert_eq!(
        refused_code(&provider.close(id, CloseReason::RenterCancelled).await.unwrap_err()),
        "ReasonNotAllowed"
    );
    assert_eq!(
        refused_code(&renter.close(id, CloseReason::InsufficientFunds).await.unwrap_err()),
        "NotOverdrawn"
    );
    // A duplicate lease id, sent raw (the client itself would read first and not send).
    let dup = renter
        .escrow()
        .open(id, c.address(PROVIDER), c.config.token, RATE, deposit)
        .into_transaction_request();
    assert_eq!(
        refused_code(&renter.send("open", dup).await.unwrap_err()),
        "LeaseExists"
    );
    // Zero deposit, zero top-up, no provider.
    let other = lease_id(c.address(RENTER), "order-zero");
    assert_eq!(
        refused_code(&renter.open(other, c.address(PROVIDER), RATE, 0).await.unwrap_err()),
        "ZeroAmount"
    );
    assert_eq!(refused_code(&renter.top_up(id, 0).await.unwrap_err()), "ZeroAmount");
    assert_eq!(
        refused_code(&renter.open(other, c.address(RENTER), RATE, deposit).await.unwrap_err()),
        "InvalidProvider"
    );
    // A stale state (what a replayed call would carry) is refused.
    let stale = open_state(&before).to_sol();
    c.jump(10).await;
    provider.withdraw(id).await.unwrap();
    let replay = provider.escrow().withdraw(id, stale).into_transaction_request();
    assert_eq!(
        refused_code(&provider.send("withdraw", replay).await.unwrap_err()),
        "StaleLease"
    );

    let held = c.escrow_holds().await;
    assert_eq!(held, open_state(&renter.lease(id).await.unwrap()).balance);

    // Closed twice: the second, sent raw, is refused; a closed lease takes nothing more.
    renter.close(id, CloseReason::RenterCancelled).await.unwrap();
    let closed_state = open_state(&before).to_sol();
    let twice = renter.escrow().close(id, closed_state, 0).into_transaction_request();
    assert_eq!(
        refused_code(&renter.send("close", twice).await.unwrap_err()),
        "LeaseIsClosed"
    );
    assert_eq!(
        refused_code(&renter.top_up(id, ONE_TOKEN).await.unwrap_err()),
        "LeaseIsClosed"
    );
    assert_eq!(refused_code(&provider.withdraw(id).await.unwrap_err()), "LeaseIsClosed");
    assert_eq!(
        refused_code(&renter.open(id, c.address(PROVIDER), RATE, deposit).await.unwrap_err()),
        "LeaseIsClosed"
    );
    assert_eq!(c.escrow_holds().await, 0);
}

#[tokio::test]
async fn a_lease_that_runs_dry_stops_accruing_and_closes_as_insufficient_funds() {
    let c = chain("dry").await;
    let renter = c.client(RENTER);
    let provider = c.client(PROVIDER);
    let id = lease_id(c.address(RENTER), "order-dry");
    let deposit = 60 * RATE; // one minute
    renter.open(id, c.address(PROVIDER), RATE, deposit).await.unwrap();
    c.jump(3_600).await;
    let now = renter.now().await.unwrap();
    let l = open_state(&renter.lease(id).await.unwrap()).clone();
    assert!(l.overdrawn_at(now));
    assert_eq!(l.owed_at(now), deposit, "accrual stops at the balance");
    let closed = provider.close(id, CloseReason::InsufficientFunds).await.unwrap();
    assert_eq!((closed.paid, closed.refunded), (deposit, 0));
    assert_eq!(c.escrow_holds().await, 0);
}

#[tokio::test]
async fn top_up_adds_funds_and_time_out_of_funds_is_not_charged_later() {
    let c = chain("topup").await;
    let renter = c.client(RENTER);
    let provider = c.client(PROVIDER);
    let id = lease_id(c.address(RENTER), "order-topup");
    let deposit = 100 * RATE;
    renter.open(id, c.address(PROVIDER), RATE, deposit).await.unwrap();
    c.jump(30).await;
    renter.top_up(id, 100 * RATE).await.unwrap();
    let l = open_state(&renter.lease(id).await.unwrap()).clone();
    assert_eq!(l.balance, 200 * RATE);
    assert!(
        l.owed >= 30 * RATE,
        "accrual before the top-up is kept for the provider"
    );
    assert_eq!(c.escrow_holds().await, 200 * RATE);

    // Run dry for a long time, then top up: the dry hours are not billed.
    c.jump(10_000).await;
    renter.top_up(id, 50 * RATE).await.unwrap();
    let l = open_state(&renter.lease(id).await.unwrap()).clone();
    assert_eq!((l.owed, l.balance), (200 * RATE, 250 * RATE));
    let paid = provider.withdraw(id).await.unwrap();
    assert!(
        paid <= 202 * RATE,
        "at most a couple of seconds after the top-up: {paid}"
    );
    assert_eq!(c.escrow_holds().await, 250 * RATE - paid);
}

/// Hundreds of mixed actions and time jumps by three renters and three providers,
/// allowed and forbidden, with deposits to and withdrawals from escrow accounts;
/// after every step the escrow holds exactly the sum of open leases' balances and
/// accounts, and no token is created or lost anywhere.
#[tokio::test]
async fn randomised_actions_conserve_tokens() {
    let c = chain("random").await;
    let renters = [1usize, 2, 3];
    let providers = [4usize, 5, 6];
    let clients: Vec<EscrowClient> = (0..=6).map(|i| c.client(i)).collect();
    let all_wallets: Vec<Address> = (1..=6).map(|i| c.address(i)).collect();
    let supply = 6 * FUNDING_TOKENS * ONE_TOKEN;
    let mut seed: u64 = std::env::var("GPUPOOL_ESCROW_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0x5eed_1234);
    println!("seed {seed}");
    let mut next = move |n: u64| {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed % n
    };
    let mut leases: Vec<(B256, usize, usize)> = Vec::new(); // id, renter, provider
    let (mut opened, mut refused, mut closed) = (0, 0, 0);
    for step in 0..300u32 {
        let action = next(12);
        let result: Result<(), ChainError> = match action {
            0 | 1 => {
                let (r, p) = (renters[next(3) as usize], providers[next(3) as usize]);
                let id = lease_id(c.address(r), &format!("order-{step}"));
                let deposit = (1 + u128::from(next(500))) * RATE;
                let rate = RATE / (1 + u128::from(next(4)));
                let res = clients[r].open(id, c.address(p), rate, deposit).await.map(|_| ());
                if res.is_ok() {
                    leases.push((id, r, p));
                    opened += 1;
                }
                res
            }
            2 | 3 if !leases.is_empty() => {
                let (id, _, p) = leases[next(leases.len() as u64) as usize];
                clients[p].withdraw(id).await.map(|_| ())
            }
            4 if !leases.is_empty() => {
                let (id, r, _) = leases[next(leases.len() as u64) as usize];
                clients[r]
                    .top_up(id, (1 + u128::from(next(100))) * RATE)
                    .await
                    .map(|_gas| ())
            }
            5 | 6 if !leases.is_empty() => {
                let (id, r, p) = leases[next(leases.len() as u64) as usize];
                let reason = CloseReason::ALL[next(4) as usize];
                let who = if next(2) == 0 { r } else { p };
                let res = clients[who].close(id, reason).await.map(|_| ());
                if res.is_ok() {
                    closed += 1;
                }
                res
            }
            7 if !leases.is_empty() => {
                // Someone who is not a party tries to take the money.
                let (id, r, p) = leases[next(leases.len() as u64) as usize];
                let stranger = (1..=6).find(|i| *i != r && *i != p).unwrap();
                clients[stranger].withdraw(id).await.map(|_| ())
            }
            8 => {
                let who = 1 + next(6) as usize;
                clients[who].deposit((1 + u128::from(next(200))) * RATE).await
            }
            9 => {
                // Sometimes more than the account holds, which must be refused.
                let who = 1 + next(6) as usize;
                let amount = (1 + u128::from(next(300))) * RATE;
                clients[who].withdraw_funds(amount, c.address(who)).await
            }
            _ => {
                c.jump(1 + next(300)).await;
                Ok(())
            }
        };
        match result {
            Ok(()) => {}
            Err(ChainError::Refused { .. }) => refused += 1,
            Err(e) => panic!("step {step}: chain error {e}"),
        }
        // Drop closed leases from the candidates now and then so most actions hit open ones.
        let mut held = 0u128;
        let mut still_open = Vec::new();
        for &(id, r, p) in &leases {
            match clients[0].lease(id).await.unwrap() {
                LeaseOnChain::Open { lease, .. } => {
                    held += lease.balance;
                    still_open.push((id, r, p));
                }
                LeaseOnChain::Closed {
                    paid,
                    refunded,
                    deposited,
                    ..
                } => {
                    assert_eq!(
                        paid + refunded,
                        deposited,
                        "step {step}: lease {id} lost or created tokens"
                    );
                }
                LeaseOnChain::Unknown => panic!("step {step}: lease {id} vanished"),
            }
        }
        if next(4) == 0 {
            leases = still_open;
        }
        assert_eq!(
            c.escrow_holds().await,
            held,
            "step {step}: escrow balance != sum of open leases + accounts"
        );
        let mut total = c.escrow_total().await;
        for w in &all_wallets {
            total += clients[0].token_balance(*w).await.unwrap();
        }
        assert_eq!(total, supply, "step {step}: tokens created or lost");
    }
    println!("opened {opened}, closed {closed}, refused {refused}");
    assert!(
        opened > 20 && closed > 5 && refused > 5,
        "the mix exercised too little: {opened}/{closed}/{refused}"
    );
}

/// The RPC goes away right after the open transaction reaches the node: the
/// client hears nothing back. Retrying after the RPC returns must find the lease
/// the first attempt opened, not open a second one.
#[tokio::test]
async fn rpc_outage_while_opening_ends_with_exactly_one_lease() {
    let c = chain("outage").await;
    let proxy = RpcProxy::start(&c.anvil.url).await.unwrap();
    let wallet = c.anvil.wallet(RENTER).unwrap();
    let config = ChainConfig {
        rpc_url: proxy.url.clone(),
        ..c.config.clone()
    };
    let options = ClientOptions {
        rpc_timeout: Duration::from_secs(2),
        receipt_timeout: Duration::from_secs(5),
        poll_interval: None,
    };
    let renter = EscrowClient::connect(config, Some(&wallet), options).unwrap();
    // A first lease makes the allowance standing, so the next send is the open itself.
    renter
        .open(
            lease_id(wallet.address(), "warm-up"),
            c.address(PROVIDER),
            RATE,
            ONE_TOKEN,
        )
        .await
        .unwrap();

    let id = lease_id(wallet.address(), "order-outage");
    proxy.cut_after_next_send();
    let first = renter.open(id, c.address(PROVIDER), RATE, 3 * ONE_TOKEN).await;
    let err = first.expect_err("the open's answer was lost");
    assert!(err.is_transient(), "an outage is worth retrying: {err}");
    assert!(proxy.is_down());
    // While down, reads fail cleanly too.
    assert!(renter.lease(id).await.unwrap_err().is_transient());

    proxy.pass();
    let second = renter.open(id, c.address(PROVIDER), RATE, 3 * ONE_TOKEN).await.unwrap();
    assert!(matches!(second, OpenOutcome::AlreadyOpen { .. }), "{second:?}");
    let ids = renter.lease_ids_of(wallet.address()).await.unwrap();
    assert_eq!(ids.iter().filter(|i| **i == id).count(), 1);
    assert_eq!(
        c.escrow_holds().await,
        4 * ONE_TOKEN,
        "one warm-up and exactly one outage lease"
    );
    // And the wallet keeps working: nonces recover after the lost send.
    renter.top_up(id, ONE_TOKEN).await.unwrap();
}

#[tokio::test]
async fn an_rpc_answering_garbage_is_an_error_not_a_state() {
    let c = chain("garbage").await;
    let proxy = RpcProxy::start(&c.anvil.url).await.unwrap();
    let wallet = c.anvil.wallet(RENTER).unwrap();
    let config = ChainConfig {
        rpc_url: proxy.url.clone(),
        ..c.config.clone()
    };
    let renter = EscrowClient::connect(config, Some(&wallet), ClientOptions::default()).unwrap();
    let id = lease_id(wallet.address(), "order-garbage");
    proxy.garbage();
    let err = renter.open(id, c.address(PROVIDER), RATE, ONE_TOKEN).await.unwrap_err();
    assert!(err.is_transient(), "{err}");
    assert!(
        !err.to_string().contains(&proxy.url),
        "errors never carry the RPC URL: {err}"
    );
    proxy.down();
    let err = renter.token_balance(wallet.address()).await.unwrap_err();
    assert_eq!(err.reason(), "ChainUnreachable", "{err}");
    proxy.pass();
    assert_eq!(renter.lease(id).await.unwrap(), LeaseOnChain::Unknown);
    renter.open(id, c.address(PROVIDER), RATE, ONE_TOKEN).await.unwrap();
}

/// Many leases at once from one wallet: nonces never collide.
#[tokio::test]
async fn one_wallet_opens_many_leases_concurrently() {
    let c = chain("concurrent").await;
    let renter = std::sync::Arc::new(c.client(RENTER));
    let provider = c.address(PROVIDER);
    let tasks: Vec<_> = (0..25)
        .map(|i| {
            let renter = renter.clone();
            tokio::spawn(async move {
                let id = lease_id(renter.wallet().unwrap(), &format!("order-{i}"));
                renter.open(id, provider, RATE, ONE_TOKEN).await
            })
        })
        .collect();
    for t in tasks {
        t.await.unwrap().unwrap();
    }
    assert_eq!(renter.lease_ids_of(c.address(RENTER)).await.unwrap().len(), 25);
    assert_eq!(c.escrow_holds().await, 25 * ONE_TOKEN);
}

/// One wallet sends many transactions at once, each estimated against the
/// chain before the others are mined. Two opens estimated while the escrow
/// account held one deposit, then mined in one block: the second finds the
/// account empty and also pulls from the wallet, ~15k gas more than its
/// estimate. Sent with the estimate as its limit it ran out of gas (twice in
/// a 100-job burst) and was retried, paying twice; with the client's
/// headroom both open in that block.
#[tokio::test]
async fn opens_estimated_before_the_account_ran_dry_open_when_mined_together() {
    use alloy::providers::Provider;
    let c = chain("dry").await;
    let renter = std::sync::Arc::new(c.client(RENTER));
    let provider = c.address(PROVIDER);
    let me = c.address(RENTER);
    // A first open, from the wallet, leaves the escrow approved: the two
    // below send nothing else.
    renter
        .open(lease_id(me, "warm-up"), provider, RATE, ONE_TOKEN)
        .await
        .unwrap();
    renter.deposit(ONE_TOKEN).await.unwrap();
    assert_eq!(renter.account(me).await.unwrap(), ONE_TOKEN);
    let node = c.client(0);
    let node = node.provider();
    let mined = node.get_transaction_count(me).await.unwrap();
    node.anvil_set_auto_mine(false).await.unwrap();
    let opens: Vec<_> = ["first", "second"]
        .into_iter()
        .map(|order| {
            let renter = renter.clone();
            tokio::spawn(async move { renter.open(lease_id(me, order), provider, RATE, ONE_TOKEN).await })
        })
        .collect();
    wait_for(Duration::from_secs(30), "both opens sent", || async {
        (node.get_transaction_count(me).pending().await.unwrap() >= mined + 2).then_some(())
    })
    .await
    .unwrap();
    node.evm_mine(None).await.unwrap();
    let block = node
        .get_block_by_number(alloy::eips::BlockNumberOrTag::Latest)
        .await
        .unwrap()
        .unwrap();
    let hashes: Vec<B256> = block.transactions.hashes().collect();
    assert_eq!(hashes.len(), 2, "both opens in one block");
    // Any retry is mined from here on, so a failure shows as a revert, not a hang.
    node.anvil_set_auto_mine(true).await.unwrap();
    for hash in hashes {
        let receipt = node.get_transaction_receipt(hash).await.unwrap().unwrap();
        assert!(
            receipt.status(),
            "an open mined after the account ran dry reverted: {} gas used of its limit",
            receipt.gas_used
        );
    }
    for open in opens {
        assert!(matches!(open.await.unwrap().unwrap(), OpenOutcome::Opened { .. }));
    }
    assert_eq!(
        renter.account(me).await.unwrap(),
        0,
        "one deposit from the account, one from the wallet"
    );
}

/// A renter without a cluster mandates a member's operator: the agent opens
/// from the renter's account only, within the allowance, may close as the
/// renter would, and every refund goes to the renter, never to the agent.
#[tokio::test]
async fn an_agent_opens_tops_up_and_closes_for_a_renter_within_its_allowance() {
    const AGENT: usize = 4;
    let c = chain("agent").await;
    let renter = c.client(RENTER);
    let agent = c.client(AGENT);
    let provider = c.client(PROVIDER);
    let stranger = c.client(STRANGER);
    let (r, a, p) = (c.address(RENTER), c.address(AGENT), c.address(PROVIDER));
    let deposit = 4 * ONE_TOKEN;
    let id = lease_id(a, "order-agent");

    // No mandate yet: refused, nothing moves.
    assert_eq!(
        refused_code(&agent.open_for(r, id, p, RATE, deposit).await.unwrap_err()),
        "InsufficientAgentAllowance"
    );
    renter.approve_agent(a, 6 * ONE_TOKEN).await.unwrap();
    assert_eq!(renter.agent_allowance(r, a).await.unwrap(), 6 * ONE_TOKEN);
    // A mandate, but the account is empty: the renter's wallet is never pulled.
    let wallet_before = renter.token_balance(r).await.unwrap();
    assert_eq!(
        refused_code(&agent.open_for(r, id, p, RATE, deposit).await.unwrap_err()),
        "InsufficientAccount"
    );
    renter.deposit(10 * ONE_TOKEN).await.unwrap();
    assert_eq!(renter.token_balance(r).await.unwrap(), wallet_before - 10 * ONE_TOKEN);
    // The agent may not pay itself, nor name itself as renter.
    let self_paid = lease_id(a, "order-self");
    assert_eq!(
        refused_code(&agent.open_for(r, self_paid, a, RATE, deposit).await.unwrap_err()),
        "InvalidProvider"
    );
    assert_eq!(
        refused_code(&agent.open_for(a, self_paid, p, RATE, deposit).await.unwrap_err()),
        "InvalidAgent"
    );

    let agent_account = agent.account(a).await.unwrap();
    let agent_wallet = agent.token_balance(a).await.unwrap();
    let opened = agent.open_for(r, id, p, RATE, deposit).await.unwrap();
    assert!(matches!(opened, OpenOutcome::Opened { .. }), "{opened:?}");
    // Retried after a lost receipt: the same lease, not a second one.
    assert!(matches!(
        agent.open_for(r, id, p, RATE, deposit).await.unwrap(),
        OpenOutcome::AlreadyOpen { .. }
    ));
    let l = open_state(&renter.lease(id).await.unwrap()).clone();
    assert_eq!((l.renter, l.agent, l.provider, l.balance), (r, a, p, deposit));
    assert_eq!(renter.account(r).await.unwrap(), 6 * ONE_TOKEN);
    assert_eq!(renter.agent_allowance(r, a).await.unwrap(), 2 * ONE_TOKEN);
    // The renter finds the lease under its own wallet.
    assert_eq!(renter.lease_ids_of(r).await.unwrap(), vec![id]);
    // The agent tops the lease up from the renter's account, within the same
    // allowance; a stranger may not, and the agent's own funds never move.
    assert_eq!(
        refused_code(&stranger.top_up(id, ONE_TOKEN).await.unwrap_err()),
        "NotRenter"
    );
    agent.top_up(id, ONE_TOKEN).await.unwrap();
    assert_eq!(renter.account(r).await.unwrap(), 5 * ONE_TOKEN);
    assert_eq!(renter.agent_allowance(r, a).await.unwrap(), ONE_TOKEN);
    assert_eq!(
        open_state(&renter.lease(id).await.unwrap()).balance,
        deposit + ONE_TOKEN
    );
    assert_eq!(
        refused_code(&agent.top_up(id, 2 * ONE_TOKEN).await.unwrap_err()),
        "InsufficientAgentAllowance"
    );
    assert_eq!(
        renter.account(r).await.unwrap(),
        5 * ONE_TOKEN,
        "a refused top-up takes nothing"
    );
    // What is left of the allowance caps the next open.
    let second = lease_id(a, "order-agent-2");
    assert_eq!(
        refused_code(&agent.open_for(r, second, p, RATE, deposit).await.unwrap_err()),
        "InsufficientAgentAllowance"
    );

    c.jump(500).await;
    // A stranger is neither party nor agent.
    assert_eq!(
        refused_code(&stranger.close(id, CloseReason::Completed).await.unwrap_err()),
        "NotParty"
    );
    let closed = agent.close(id, CloseReason::RenterCancelled).await.unwrap();
    assert!(closed.by_us);
    assert!(closed.paid >= 500 * RATE, "{closed:?}");
    assert_eq!(closed.paid + closed.refunded, deposit + ONE_TOKEN);
    // Refund to the renter's account, payment to the provider's; the agent gains nothing.
    assert_eq!(renter.account(r).await.unwrap(), 5 * ONE_TOKEN + closed.refunded);
    assert_eq!(provider.account(p).await.unwrap(), closed.paid);
    assert_eq!(agent.account(a).await.unwrap(), agent_account);
    assert_eq!(agent.token_balance(a).await.unwrap(), agent_wallet);
    assert_eq!(c.escrow_holds().await, 0);

    // Revoked: no more opens.
    renter.approve_agent(a, 0).await.unwrap();
    assert_eq!(
        refused_code(&agent.open_for(r, second, p, RATE, ONE_TOKEN).await.unwrap_err()),
        "InsufficientAgentAllowance"
    );
}

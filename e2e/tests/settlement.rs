//! The settlement worker in two organisations' operators, against real clusters
//! and a real chain: a renter's Lease opens on chain, the provider's copy follows
//! it and withdraws, the renter is warned as funds run low, an RPC outage shows
//! on the Lease and heals, and closes (completed, out of funds, record deleted)
//! leave both copies agreeing with the chain.

use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use alloy::providers::ext::AnvilApi;
use gpupool_chain::{Address, ChainConfig, ClientOptions, CloseReason, EscrowClient, LeaseOnChain, lease_id};
use gpupool_crds::conditions::find;
use gpupool_crds::price::TokenAmount;
use gpupool_crds::{Lease, LeaseState};
use gpupool_e2e::chain::{Anvil, deploy_and_fund};
use gpupool_e2e::env::TestEnv;
use gpupool_e2e::harness::{Operator, admin, events_about, namespace, remove_namespace, sample, testenv, wait_for};
use gpupool_e2e::rpcproxy::RpcProxy;
use kube::ResourceExt;
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams};

const RENTER: usize = 1;
const PROVIDER: usize = 2;
const WAIT: Duration = Duration::from_secs(60);

/// A test's own anvil (in a clean directory under the environment) with the
/// token and escrow deployed and the `funded` wallets funded.
async fn fresh_chain(env: &TestEnv, tag: &str, funded: &[usize]) -> (PathBuf, Anvil, ChainConfig) {
    let dir = env.root.join(tag);
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let anvil = Anvil::start(&dir).await.unwrap();
    let config = deploy_and_fund(&anvil, funded).await.unwrap();
    (dir, anvil, config)
}

fn write_chain_files(dir: &Path, config: &ChainConfig, key: &str, tag: &str) -> (String, String) {
    let cfg = dir.join(format!("chain-{tag}.json"));
    config.save(&cfg).unwrap();
    let key_file = dir.join(format!("wallet-{tag}.key"));
    std::fs::write(&key_file, key).unwrap();
    (cfg.display().to_string(), key_file.display().to_string())
}

// A test fixture: one positional argument per field the cases vary.
#[allow(clippy::too_many_arguments)]
fn lease_json(
    name: &str,
    side: &str,
    order: &str,
    renter: &str,
    provider: &str,
    config: &ChainConfig,
    deposit: &str,
    id: Option<String>,
) -> Lease {
    let mut escrow = serde_json::json!({
        "chainId": config.chain_id,
        "contract": config.escrow.to_string(),
        "deposit": deposit,
    });
    if let Some(id) = id {
        escrow["leaseId"] = id.into();
    }
    serde_json::from_value(serde_json::json!({
        "apiVersion": "gpupool.dev/v1alpha1",
        "kind": "Lease",
        "metadata": { "name": name },
        "spec": {
            "side": side,
            "orderId": order,
            "bid": "bid-1",
            "renter": { "org": "acme", "wallet": renter },
            "provider": { "org": "bravo", "wallet": provider },
            // 36 tokens per GPU-hour = 0.01 token per second.
            "pricePerGpuHour": "36",
            "gpuCount": 1,
            "gpuProduct": "NVIDIA-A100-SXM4-40GB",
            "escrow": escrow,
        }
    }))
    .unwrap()
}

async fn wait_lease(api: &Api<Lease>, name: &str, what: &str, f: impl Fn(&Lease) -> bool) -> Lease {
    let waited = wait_for(WAIT, what, || async {
        let l = api.get(name).await.ok()?;
        f(&l).then_some(l)
    })
    .await;
    match waited {
        Ok(l) => l,
        // Read here, in the runtime: blocking on it inside one hung the test.
        Err(e) => panic!("{e}: last seen {:#?}", api.get(name).await.ok().and_then(|l| l.status)),
    }
}

fn state(l: &Lease) -> Option<LeaseState> {
    l.status.as_ref().and_then(|s| s.state)
}

/// A 50-token lease opened by the renter's operator, and the provider's
/// copy of it, both Active.
async fn open_on_both_sides(
    (renter_leases, job): (&Api<Lease>, &str),
    (provider_leases, order): (&Api<Lease>, &str),
    (rw, pw): (&str, &str),
    config: &ChainConfig,
) {
    renter_leases
        .create(
            &PostParams::default(),
            &lease_json(job, "Renter", order, rw, pw, config, "50", None),
        )
        .await
        .unwrap();
    let l = wait_lease(renter_leases, job, "the lease to be Active", |l| {
        state(l) == Some(LeaseState::Active)
    })
    .await;
    let id = l.status.as_ref().and_then(|s| s.lease_id.clone()).unwrap();
    provider_leases
        .create(
            &PostParams::default(),
            &lease_json(order, "Provider", order, rw, pw, config, "50", Some(id)),
        )
        .await
        .unwrap();
    wait_lease(provider_leases, order, "the provider's copy to be Active", |l| {
        state(l) == Some(LeaseState::Active)
    })
    .await;
}

/// The renter completes its lease `job`.
async fn complete(renter_leases: &Api<Lease>, job: &str) {
    renter_leases
        .patch(
            job,
            &PatchParams::default(),
            &Patch::Merge(serde_json::json!({"spec": {"closeReason": "Completed"}})),
        )
        .await
        .unwrap();
}

/// The renter completes its lease `job`; what the close paid the provider.
async fn complete_and_read_paid(renter_leases: &Api<Lease>, job: &str) -> TokenAmount {
    complete(renter_leases, job).await;
    let closed = wait_lease(renter_leases, job, "the renter's copy to be Closed", |l| {
        state(l) == Some(LeaseState::Closed)
    })
    .await;
    TokenAmount::from_str(closed.status.as_ref().and_then(|s| s.paid.as_deref()).unwrap()).unwrap()
}

fn cond_is(l: &Lease, type_: &str, status: &str) -> bool {
    l.status
        .as_ref()
        .and_then(|s| find(&s.conditions, type_))
        .is_some_and(|c| c.status == status)
}

#[tokio::test]
async fn leases_settle_on_chain_from_both_sides() {
    let env = testenv();
    let (acme, bravo) = (env.org("acme").expect("acme"), env.org("bravo").expect("bravo"));
    let (dir, anvil, config) = fresh_chain(&env, "settlement-test", &[RENTER, PROVIDER]).await;
    let renter_wallet = anvil.wallet(RENTER).unwrap().address();
    let provider_wallet = anvil.wallet(PROVIDER).unwrap().address();

    // The renter's operator reaches the chain through a proxy the test can break.
    let proxy = RpcProxy::start(&anvil.url).await.unwrap();
    let renter_config = ChainConfig {
        rpc_url: proxy.url.clone(),
        ..config.clone()
    };
    let (rcfg, rkey) = write_chain_files(&dir, &renter_config, &anvil.keys[RENTER], "acme");
    let (pcfg, pkey) = write_chain_files(&dir, &config, &anvil.keys[PROVIDER], "bravo");
    let common = |cfg: &str, key: &str| {
        vec![
            format!("--chain-config={cfg}"),
            format!("--wallet-key-file={key}"),
            "--confirmations=2".into(),
            "--withdraw-every-seconds=600".into(),
            "--funds-warning-seconds=3600".into(),
            "--chain-resync-seconds=1".into(),
        ]
    };
    let _renter_op = Operator::start_with(acme, "settlement", &common(&rcfg, &rkey));
    let _provider_op = Operator::start_with(bravo, "settlement", &common(&pcfg, &pkey));

    let acme_client = admin(acme).await;
    let bravo_client = admin(bravo).await;
    let rns = namespace(&acme_client, "lease").await;
    let pns = namespace(&bravo_client, "lease").await;
    let renter_leases: Api<Lease> = Api::namespaced(acme_client.clone(), &rns);
    let provider_leases: Api<Lease> = Api::namespaced(bravo_client.clone(), &pns);
    let reader = EscrowClient::connect(config.clone(), None, ClientOptions::default()).unwrap();
    let mine = || async { reader.provider().anvil_mine(Some(1), None).await.unwrap() };
    let jump = |s: u64| {
        let p = reader.provider().clone();
        async move {
            p.anvil_increase_time(s).await.unwrap();
            p.anvil_mine(Some(1), None).await.unwrap();
        }
    };
    let (rw, pw) = (renter_wallet.to_string(), provider_wallet.to_string());

    // 1. The renter's copy opens the lease on chain; Active after two confirmations.
    let renter_lease = lease_json("job-a", "Renter", "order-a", &rw, &pw, &config, "50", None);
    renter_leases
        .create(&PostParams::default(), &renter_lease)
        .await
        .unwrap();
    let l = wait_lease(&renter_leases, "job-a", "the lease to open on chain", |l| {
        l.status.as_ref().and_then(|s| s.opened_block).is_some()
    })
    .await;
    let id = l.status.as_ref().and_then(|s| s.lease_id.clone()).unwrap();
    assert_eq!(
        id,
        lease_id(renter_wallet, "order-a").to_string(),
        "the id comes from the order"
    );
    assert!(l.finalizers().iter().any(|f| f == gpupool_crds::LEASE_FINALIZER));
    mine().await;
    wait_lease(&renter_leases, "job-a", "Active after 2 confirmations", |l| {
        state(l) == Some(LeaseState::Active)
    })
    .await;
    assert!(matches!(
        reader.lease(id.parse().unwrap()).await.unwrap(),
        LeaseOnChain::Open { .. }
    ));

    // 2. The provider's copy (the lease offer's id) follows and withdraws what accrued.
    let provider_lease = lease_json(
        "order-a",
        "Provider",
        "order-a",
        &rw,
        &pw,
        &config,
        "50",
        Some(id.clone()),
    );
    provider_leases
        .create(&PostParams::default(), &provider_lease)
        .await
        .unwrap();
    // Not before a withdrawal period (600 s here) has passed since the open.
    jump(100).await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let early = provider_leases.get("order-a").await.unwrap();
    assert!(
        early.status.as_ref().and_then(|s| s.last_withdrawal.as_ref()).is_none(),
        "withdrew before a period had passed: {:?}",
        early.status
    );
    jump(600).await;
    let p = wait_lease(&provider_leases, "order-a", "the provider to withdraw", |l| {
        l.status.as_ref().and_then(|s| s.last_withdrawal.as_ref()).is_some()
    })
    .await;
    let paid: f64 = p.status.as_ref().and_then(|s| s.paid.clone()).unwrap().parse().unwrap();
    assert!(paid >= 7.0, "about 700 s at 0.01/s: {paid}");
    assert!(
        events_about(&bravo_client, &pns, "order-a")
            .await
            .iter()
            .any(|(r, _)| r == "Withdrawn")
    );

    // 3. Funds run low (50 tokens last 5,000 s; warn below 3,600 s): a condition and a Warning.
    jump(800).await;
    let l = wait_lease(&renter_leases, "job-a", "the FundsLow warning", |l| {
        cond_is(l, "FundsLow", "True")
    })
    .await;
    let msg = find(&l.status.as_ref().unwrap().conditions, "FundsLow")
        .unwrap()
        .message
        .clone();
    assert!(msg.contains("runs out at") && msg.contains("top up"), "{msg}");
    assert!(
        events_about(&acme_client, &rns, "job-a")
            .await
            .iter()
            .any(|(r, _)| r == "FundsLow")
    );

    // 4. The RPC goes down: the Lease says so and keeps its state; then it heals.
    proxy.down();
    let l = wait_lease(&renter_leases, "job-a", "ChainReachable=False", |l| {
        cond_is(l, "ChainReachable", "False")
    })
    .await;
    assert_eq!(
        state(&l),
        Some(LeaseState::Active),
        "an outage never changes the lease's state"
    );
    let c = find(&l.status.as_ref().unwrap().conditions, "ChainReachable").unwrap();
    assert_eq!(c.reason, "ChainUnreachable");
    assert!(
        !c.message.contains(&proxy.url),
        "no RPC URL in conditions: {}",
        c.message
    );
    proxy.pass();
    wait_lease(&renter_leases, "job-a", "ChainReachable=True again", |l| {
        cond_is(l, "ChainReachable", "True")
    })
    .await;

    // 5. The renter completes it: both copies record the same close, paid and refund.
    complete(&renter_leases, "job-a").await;
    let r = wait_lease(&renter_leases, "job-a", "renter copy Closed", |l| {
        state(l) == Some(LeaseState::Closed)
    })
    .await;
    let p = wait_lease(&provider_leases, "order-a", "provider copy Closed", |l| {
        state(l) == Some(LeaseState::Closed)
    })
    .await;
    let (rs, ps) = (r.status.unwrap(), p.status.unwrap());
    assert_eq!(rs.close_reason.as_deref(), Some("Completed"));
    assert_eq!(
        (&rs.close_reason, &rs.paid, &rs.refunded),
        (&ps.close_reason, &ps.paid, &ps.refunded)
    );
    let LeaseOnChain::Closed { paid, refunded, .. } = reader.lease(id.parse().unwrap()).await.unwrap() else {
        panic!("closed on chain")
    };
    assert_eq!(rs.paid, Some(gpupool_crds::price::TokenAmount(paid).to_string()));
    assert_eq!(
        rs.refunded,
        Some(gpupool_crds::price::TokenAmount(refunded).to_string())
    );
    // Nothing is held for a lease any more: everything the escrow has is
    // in the two parties' accounts, where payments and refunds land.
    let in_accounts = reader.account(renter_wallet).await.unwrap() + reader.account(provider_wallet).await.unwrap();
    assert_eq!(reader.token_balance(config.escrow).await.unwrap(), in_accounts);

    // 6. A lease that runs dry is closed as InsufficientFunds by the worker.
    let dry = lease_json("job-dry", "Renter", "order-dry", &rw, &pw, &config, "0.5", None);
    renter_leases.create(&PostParams::default(), &dry).await.unwrap();
    wait_lease(&renter_leases, "job-dry", "the small lease to open", |l| {
        l.status.as_ref().and_then(|s| s.opened_block).is_some()
    })
    .await;
    jump(100).await;
    let l = wait_lease(&renter_leases, "job-dry", "closed as InsufficientFunds", |l| {
        state(l) == Some(LeaseState::Closed)
    })
    .await;
    assert_eq!(
        l.status.as_ref().unwrap().close_reason.as_deref(),
        Some("InsufficientFunds")
    );
    assert_eq!(l.status.as_ref().unwrap().paid.as_deref(), Some("0.5"));

    // 7. Deleting the renter's record cancels the lease on chain first (finalizer).
    let gone = lease_json("job-gone", "Renter", "order-gone", &rw, &pw, &config, "10", None);
    renter_leases.create(&PostParams::default(), &gone).await.unwrap();
    wait_lease(&renter_leases, "job-gone", "the lease to open", |l| {
        state(l) == Some(LeaseState::Active) || l.status.as_ref().and_then(|s| s.opened_block).is_some()
    })
    .await;
    let gone_id = lease_id(renter_wallet, "order-gone");
    renter_leases
        .delete("job-gone", &DeleteParams::default())
        .await
        .unwrap();
    wait_for(WAIT, "the record to go", || async {
        renter_leases.get_opt("job-gone").await.unwrap().is_none().then_some(())
    })
    .await
    .unwrap();
    match reader.lease(gone_id).await.unwrap() {
        LeaseOnChain::Closed { reason, .. } => assert_eq!(reason, CloseReason::RenterCancelled),
        other => panic!("expected closed on chain, got {other:?}"),
    }
    assert_eq!(
        reader.token_balance(config.escrow).await.unwrap(),
        reader.account(renter_wallet).await.unwrap() + reader.account(provider_wallet).await.unwrap(),
        "nothing left in escrow but the parties' accounts"
    );
    // The records go while their operators still run: later tests share these clusters.
    remove_namespace(&acme_client, &rns).await;
    remove_namespace(&bravo_client, &pns).await;
}

#[tokio::test]
async fn a_lease_for_another_chain_is_refused_with_a_reason() {
    let env = testenv();
    let acme = env.org("acme").expect("acme");
    let (dir, anvil, config) = fresh_chain(&env, "settlement-mismatch", &[RENTER]).await;
    let (cfg, key) = write_chain_files(&dir, &config, &anvil.keys[RENTER], "acme");
    let client = admin(acme).await;
    let ns = namespace(&client, "lease-bad").await;
    let api: Api<Lease> = Api::namespaced(client.clone(), &ns);
    let rw = anvil.wallet(RENTER).unwrap().address().to_string();
    let pw = anvil.wallet(PROVIDER).unwrap().address().to_string();

    // A record that says its lease was opened (and even paid), on a chain
    // that has never seen it: a reset dev chain behind the same addresses.
    // Before the operator starts, so it can only find the record that way.
    api.create(
        &PostParams::default(),
        &lease_json("forgotten", "Renter", "o-0", &rw, &pw, &config, "1", None),
    )
    .await
    .unwrap();
    let recorded = serde_json::json!({"status": {"state": "Closed", "openedBlock": 7, "paid": "0.5"}});
    api.patch_status("forgotten", &PatchParams::default(), &Patch::Merge(&recorded))
        .await
        .unwrap();

    let _op = Operator::start_with(
        acme,
        "settlement-mismatch",
        &[format!("--chain-config={cfg}"), format!("--wallet-key-file={key}")],
    );
    let other_chain = ChainConfig {
        chain_id: 1,
        ..config.clone()
    };
    api.create(
        &PostParams::default(),
        &lease_json("wrong-chain", "Renter", "o-1", &rw, &pw, &other_chain, "1", None),
    )
    .await
    .unwrap();
    let l = wait_lease(&api, "wrong-chain", "InvalidEscrow", |l| {
        cond_is(l, "Settling", "False")
    })
    .await;
    let c = find(&l.status.as_ref().unwrap().conditions, "Settling").unwrap();
    assert_eq!(c.reason, "InvalidEscrow");
    assert!(c.message.contains("chain 1"), "{}", c.message);
    let l = wait_lease(&api, "forgotten", "NotOnChain", |l| cond_is(l, "Settling", "False")).await;
    let c = find(&l.status.as_ref().unwrap().conditions, "Settling").unwrap();
    assert_eq!(c.reason, "NotOnChain");
    assert!(c.message.contains("opened in block 7"), "{}", c.message);
    assert_eq!(state(&l), Some(LeaseState::Closed), "the record keeps what it said");
    let reader = EscrowClient::connect(config.clone(), None, ClientOptions::default()).unwrap();
    assert_eq!(
        reader.token_balance(config.escrow).await.unwrap(),
        0,
        "nothing was opened"
    );
    // And the API server refuses a malformed escrow outright.
    let mut bad = lease_json("bad-wallet", "Renter", "o-2", "0x1234", &pw, &config, "1", None);
    bad.spec.escrow.as_mut().unwrap().deposit = "0".into();
    let err = api.create(&PostParams::default(), &bad).await.unwrap_err().to_string();
    assert!(
        err.contains("wallet must be a 0x-prefixed 20-byte hex address"),
        "{err}"
    );
    assert!(err.contains("deposit must be a positive decimal"), "{err}");
    assert!(
        events_about(&client, &ns, "forgotten")
            .await
            .iter()
            .any(|(reason, _)| reason == "NotOnChain"),
        "a warning Event says so"
    );
    remove_namespace(&client, &ns).await;
}

/// A close the renter makes reaches the provider's copy from the chain's own
/// events, not from the provider's next periodic read: with a resync of ten
/// minutes here, only the event can tell it within the wait. Providers free
/// the lease's namespace and GPUs on it, so a late read kept finished work's
/// GPUs lent for up to a resync.
#[tokio::test]
async fn the_provider_hears_a_close_from_the_chain_at_once() {
    let env = testenv();
    let (acme, bravo) = (env.org("acme").expect("acme"), env.org("bravo").expect("bravo"));
    let (dir, anvil, config) = fresh_chain(&env, "settlement-events", &[RENTER, PROVIDER]).await;
    let (rw, pw) = (
        anvil.wallet(RENTER).unwrap().address().to_string(),
        anvil.wallet(PROVIDER).unwrap().address().to_string(),
    );
    let (rcfg, rkey) = write_chain_files(&dir, &config, &anvil.keys[RENTER], "acme");
    let (pcfg, pkey) = write_chain_files(&dir, &config, &anvil.keys[PROVIDER], "bravo");
    let slow = |cfg: &str, key: &str| {
        vec![
            format!("--chain-config={cfg}"),
            format!("--wallet-key-file={key}"),
            "--withdraw-every-seconds=6000".into(),
            "--funds-warning-seconds=0".into(),
            "--chain-resync-seconds=600".into(),
            "--chain-poll-ms=200".into(),
        ]
    };
    let _renter_op = Operator::start_with(acme, "settlement-events", &slow(&rcfg, &rkey));
    let _provider_op = Operator::start_with(bravo, "settlement-events", &slow(&pcfg, &pkey));
    let acme_client = admin(acme).await;
    let bravo_client = admin(bravo).await;
    let rns = namespace(&acme_client, "lease-ev").await;
    let pns = namespace(&bravo_client, "lease-ev").await;
    let renter_leases: Api<Lease> = Api::namespaced(acme_client.clone(), &rns);
    let provider_leases: Api<Lease> = Api::namespaced(bravo_client.clone(), &pns);

    open_on_both_sides(
        (&renter_leases, "job-e"),
        (&provider_leases, "order-e"),
        (rw.as_str(), pw.as_str()),
        &config,
    )
    .await;

    complete(&renter_leases, "job-e").await;
    let p = wait_lease(&provider_leases, "order-e", "the provider's copy to be Closed", |l| {
        state(l) == Some(LeaseState::Closed)
    })
    .await;
    assert_eq!(
        p.status.as_ref().and_then(|s| s.close_reason.as_deref()),
        Some("Completed")
    );
    remove_namespace(&acme_client, &rns).await;
    remove_namespace(&bravo_client, &pns).await;
}

/// A provider that names a sweep address gets its earnings there, beyond
/// what it keeps in its escrow account: exactly, and only once, after an
/// RPC outage the sweep waits out without losing a token.
#[tokio::test]
async fn a_provider_sweeps_its_earnings_beyond_what_it_keeps_to_a_cold_wallet() {
    let env = testenv();
    let (acme, bravo) = (env.org("acme").expect("acme"), env.org("bravo").expect("bravo"));
    let (dir, anvil, config) = fresh_chain(&env, "settlement-sweep", &[RENTER, PROVIDER]).await;
    let provider_wallet = anvil.wallet(PROVIDER).unwrap().address();
    let (rw, pw) = (
        anvil.wallet(RENTER).unwrap().address().to_string(),
        provider_wallet.to_string(),
    );
    // A wallet whose key is nowhere near the cluster.
    let cold = Address::from_str("0x00000000000000000000000000000000000c01d5").unwrap();
    let keep = TokenAmount::from_str("0.01").unwrap();
    // The provider reaches the chain through a proxy the test can break.
    let proxy = RpcProxy::start(&anvil.url).await.unwrap();
    let provider_config = ChainConfig {
        rpc_url: proxy.url.clone(),
        ..config.clone()
    };
    let (rcfg, rkey) = write_chain_files(&dir, &config, &anvil.keys[RENTER], "acme");
    let (pcfg, pkey) = write_chain_files(&dir, &provider_config, &anvil.keys[PROVIDER], "bravo");
    let common = |cfg: &str, key: &str| {
        vec![
            format!("--chain-config={cfg}"),
            format!("--wallet-key-file={key}"),
            "--withdraw-every-seconds=6000".into(),
            "--funds-warning-seconds=0".into(),
            "--chain-poll-ms=200".into(),
        ]
    };
    let mut sweeping = common(&pcfg, &pkey);
    sweeping.extend([
        format!("--sweep-to={cold}"),
        format!("--sweep-keep={keep}"),
        "--sweep-minimum=0.000001".into(),
        "--sweep-every-seconds=1".into(),
    ]);
    let _renter_op = Operator::start_with(acme, "settlement-sweep", &common(&rcfg, &rkey));
    let provider_op = Operator::start_with(bravo, "settlement-sweep", &sweeping);
    let reader = EscrowClient::connect(config.clone(), None, ClientOptions::default()).unwrap();
    let acme_client = admin(acme).await;
    let bravo_client = admin(bravo).await;
    let rns = namespace(&acme_client, "lease-sw").await;
    let pns = namespace(&bravo_client, "lease-sw").await;
    let renter_leases: Api<Lease> = Api::namespaced(acme_client.clone(), &rns);
    let provider_leases: Api<Lease> = Api::namespaced(bravo_client.clone(), &pns);

    open_on_both_sides(
        (&renter_leases, "job-s"),
        (&provider_leases, "order-s"),
        (rw.as_str(), pw.as_str()),
        &config,
    )
    .await;
    // At 0.01 a second, a few seconds earn more than the provider keeps.
    tokio::time::sleep(Duration::from_secs(4)).await;
    assert_eq!(
        reader.token_balance(cold).await.unwrap(),
        0,
        "nothing earned yet, nothing swept"
    );

    // The provider loses the chain; the renter closes, paying into the
    // provider's account, which the sweep cannot reach.
    proxy.down();
    let paid = complete_and_read_paid(&renter_leases, "job-s").await;
    assert!(paid.0 > keep.0, "the lease paid {paid}, no more than the {keep} kept");
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(
        reader.token_balance(cold).await.unwrap(),
        0,
        "no sweep through a dead RPC"
    );
    assert_eq!(
        reader.account(provider_wallet).await.unwrap(),
        paid.0,
        "the earnings wait in the account"
    );
    assert!(
        sample(
            &provider_op.metrics().await,
            "gpupool_chain_errors_total{reason=\"ChainUnreachable\"}"
        ) > 0.0,
        "the outage is counted"
    );

    // The chain comes back: everything beyond `keep` goes, once.
    proxy.pass();
    wait_for(WAIT, "the sweep to reach the cold wallet", || async {
        (reader.token_balance(cold).await.ok()? > 0).then_some(())
    })
    .await
    .unwrap();
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(reader.token_balance(cold).await.unwrap(), paid.0 - keep.0);
    assert_eq!(reader.account(provider_wallet).await.unwrap(), keep.0);
    wait_swept(&provider_op, paid.0 - keep.0, "the first sweep").await;
    wait_lease(&provider_leases, "order-s", "the provider's copy to be Closed", |l| {
        state(l) == Some(LeaseState::Closed)
    })
    .await;

    // A sweep whose answer is lost: the transfer reaches the chain, the
    // RPC goes away before the operator hears back. It tries again with a
    // fresh read once the chain is back, finds only what it keeps, and
    // sends nothing twice.
    open_on_both_sides(
        (&renter_leases, "job-s2"),
        (&provider_leases, "order-s2"),
        (rw.as_str(), pw.as_str()),
        &config,
    )
    .await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let errors_before = sample(
        &provider_op.metrics().await,
        "gpupool_chain_errors_total{reason=\"ChainUnreachable\"}",
    );
    proxy.cut_after_next_send();
    let paid2 = complete_and_read_paid(&renter_leases, "job-s2").await;
    let both = paid.0 - keep.0 + paid2.0;
    wait_for(WAIT, "the second sweep to reach the cold wallet", || async {
        (reader.token_balance(cold).await.ok()? == both).then_some(())
    })
    .await
    .unwrap();
    // The proxy drops the line a moment after the transfer reaches the node.
    wait_for(
        Duration::from_secs(5),
        "the sweep's transfer to be the send whose answer is lost",
        || async { proxy.is_down().then_some(()) },
    )
    .await
    .unwrap();
    wait_for(WAIT, "the lost answer counted as an outage", || async {
        let m = provider_op.metrics().await;
        (sample(&m, "gpupool_chain_errors_total{reason=\"ChainUnreachable\"}") > errors_before).then_some(())
    })
    .await
    .unwrap();
    proxy.pass();
    // Several sweep periods with the chain back: each reads the account
    // afresh and finds only what is kept.
    tokio::time::sleep(Duration::from_secs(4)).await;
    assert_eq!(reader.token_balance(cold).await.unwrap(), both, "swept once");
    assert_eq!(reader.account(provider_wallet).await.unwrap(), keep.0);
    // The operator never heard the transfer confirmed, but the chain
    // recorded it: the metric counts it, once.
    wait_swept(&provider_op, both, "the transfer whose answer was lost").await;

    // And the wallet still sends after the lost answer: the next earnings
    // are swept too (a nonce left behind would stall every later transfer).
    open_on_both_sides(
        (&renter_leases, "job-s3"),
        (&provider_leases, "order-s3"),
        (rw.as_str(), pw.as_str()),
        &config,
    )
    .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let paid3 = complete_and_read_paid(&renter_leases, "job-s3").await;
    wait_for(WAIT, "the third lease's earnings swept", || async {
        (reader.token_balance(cold).await.ok()? == both + paid3.0).then_some(())
    })
    .await
    .unwrap();
    assert_eq!(reader.account(provider_wallet).await.unwrap(), keep.0);
    let three = both + paid3.0;
    wait_swept(&provider_op, three, "the third sweep").await;

    // A transfer the chain refuses: the sweep has read the account and
    // decided what to send, and before the node sees it something else
    // takes from the account with the same key (here a withdrawal by hand;
    // a lease the member opens as a renter does the same). The refusal is
    // counted, nothing moves to the cold wallet or is counted as swept, and
    // the next rounds read afresh and find only what is kept.
    let elsewhere = Address::from_str("0x00000000000000000000000000000000000b1e55").unwrap();
    open_on_both_sides(
        (&renter_leases, "job-s4"),
        (&provider_leases, "order-s4"),
        (rw.as_str(), pw.as_str()),
        &config,
    )
    .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let refused_before = sample(
        &provider_op.metrics().await,
        "gpupool_chain_errors_total{reason=\"EscrowRefused\"}",
    );
    proxy.hold_next_estimate();
    let paid4 = complete_and_read_paid(&renter_leases, "job-s4").await;
    wait_for(WAIT, "the sweep's transfer to be on its way", || async {
        proxy.is_holding().then_some(())
    })
    .await
    .unwrap();
    let by_hand = EscrowClient::connect(
        config.clone(),
        Some(&anvil.wallet(PROVIDER).unwrap()),
        ClientOptions::default(),
    )
    .unwrap();
    assert_eq!(reader.account(provider_wallet).await.unwrap(), keep.0 + paid4.0);
    by_hand.withdraw_funds(paid4.0, elsewhere).await.unwrap();
    proxy.release();
    wait_for(WAIT, "the refused transfer counted", || async {
        let m = provider_op.metrics().await;
        (sample(&m, "gpupool_chain_errors_total{reason=\"EscrowRefused\"}") > refused_before).then_some(())
    })
    .await
    .unwrap();
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(reader.token_balance(cold).await.unwrap(), three, "nothing more swept");
    assert_eq!(reader.token_balance(elsewhere).await.unwrap(), paid4.0);
    assert_eq!(reader.account(provider_wallet).await.unwrap(), keep.0);
    wait_swept(&provider_op, three, "after the refused transfer").await;

    // The operator's next transaction meets a nonce the hand withdrawal
    // used; it starts again from the chain's count and the next earnings
    // are swept.
    open_on_both_sides(
        (&renter_leases, "job-s5"),
        (&provider_leases, "order-s5"),
        (rw.as_str(), pw.as_str()),
        &config,
    )
    .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let paid5 = complete_and_read_paid(&renter_leases, "job-s5").await;
    wait_for(WAIT, "the fifth lease's earnings swept", || async {
        (reader.token_balance(cold).await.ok()? == three + paid5.0).then_some(())
    })
    .await
    .unwrap();
    assert_eq!(reader.account(provider_wallet).await.unwrap(), keep.0);
    wait_swept(&provider_op, three + paid5.0, "the sweep after the refusal").await;
    remove_namespace(&acme_client, &rns).await;
    remove_namespace(&bravo_client, &pns).await;
}

/// Waits until the operator's `gpupool_tokens_swept_total` says exactly
/// `base_units` went, and stays there a moment (nothing counted twice).
async fn wait_swept(op: &Operator, base_units: u128, what: &str) {
    let expected = base_units as f64 / 1e18;
    let close = |m: f64| (m - expected).abs() < 1e-9;
    let last = &std::cell::Cell::new(0.0);
    let counted = wait_for(WAIT, what, || async move {
        last.set(sample(&op.metrics().await, "gpupool_tokens_swept_total"));
        close(last.get()).then_some(())
    })
    .await;
    assert!(
        counted.is_ok(),
        "{what}: gpupool_tokens_swept_total is {}, the chain moved {expected}",
        last.get()
    );
    tokio::time::sleep(Duration::from_secs(2)).await;
    let later = sample(&op.metrics().await, "gpupool_tokens_swept_total");
    assert!(close(later), "{what}: counted again, {later} against {expected}");
}

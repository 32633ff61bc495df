//! Escrow benchmark against anvil: gas for each call and for a whole lease
//! (open + one withdraw + close), for a member with a funded escrow account
//! and for the worst case, and the latency of one wallet opening 100
//! leases concurrently through the Rust client. JSON in target/bench/escrow.json.

use std::sync::Arc;
use std::time::{Duration, Instant};

use alloy::providers::Provider;
use alloy::providers::ext::AnvilApi;
use clap::Parser;
use gpupool_chain::{ClientOptions, CloseReason, EscrowClient, OpenOutcome, lease_id};
use gpupool_e2e::bench::{Figure, write};
use gpupool_e2e::chain::{Anvil, ONE_TOKEN, deploy_and_fund};
use serde_json::json;

#[derive(Parser)]
struct Args {
    #[arg(long, default_value_t = 100)]
    concurrent: usize,
    #[arg(long, default_value = "target/bench/escrow.json")]
    out: std::path::PathBuf,
}

const RATE: u128 = ONE_TOKEN / 100;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let dir = std::env::temp_dir().join(format!("gpupool-bench-escrow-{}", std::process::id()));
    let anvil = Anvil::start(&dir).await?;
    let config = deploy_and_fund(&anvil, &[1, 2, 3]).await?;
    let renter_w = anvil.wallet(1)?;
    let renter = EscrowClient::connect(config.clone(), Some(&renter_w), ClientOptions::default())?;
    let provider = EscrowClient::connect(config.clone(), Some(&anvil.wallet(2)?), ClientOptions::default())?;
    let provider_addr = provider.wallet().unwrap_or_default();
    let mut figures = Vec::new();
    // The compiler settings decide the gas, so the figures carry the ones the
    // deployed artifact was built with.
    let artifact: serde_json::Value = serde_json::from_str(gpupool_chain::bindings::LEASE_ESCROW_ARTIFACT)?;
    let cond = json!({ "chain": "anvil 1.7.1", "compiler": artifact["compiler"] });

    // Once per member, not per lease: the standing allowance, a warm-up lease
    // that leaves the provider's escrow account holding tokens, and a deposit
    // that funds the renter's account.
    let warm = lease_id(renter_w.address(), "warm-up");
    renter.open(warm, provider_addr, RATE, ONE_TOKEN).await?;
    renter.provider().anvil_increase_time(60).await?;
    renter.provider().anvil_mine(Some(1), None).await?;
    provider.withdraw(warm).await?;
    let before = renter.provider().get_block_number().await?;
    renter.deposit(1_000 * ONE_TOKEN).await?;
    let deposit_gas = gas_of_last_tx(&renter, before).await?;
    println!("deposit into an escrow account: {deposit_gas} gas");
    figures.push(Figure::new(
        "escrow_gas_deposit",
        deposit_gas as f64,
        "gas",
        cond.clone(),
    ));

    // The headline case is a member that keeps a funded account and lends to
    // members who have been paid before; the other is the worst case: the
    // renter's account is empty (the open pulls from its wallet) and the
    // provider has never been paid (its account slot is written from zero).
    let wallet_renter = EscrowClient::connect(config.clone(), Some(&anvil.wallet(3)?), ClientOptions::default())?;
    let fresh = EscrowClient::connect(config.clone(), Some(&anvil.wallet(9)?), ClientOptions::default())?;
    wallet_renter
        .open(
            lease_id(anvil.wallet(3)?.address(), "approve"),
            provider_addr,
            RATE,
            ONE_TOKEN,
        )
        .await?;
    // A Pool API job: a member's operator opens and closes as the renter's
    // agent, from the renter's funded account.
    let agent = EscrowClient::connect(config.clone(), Some(&anvil.wallet(4)?), ClientOptions::default())?;
    renter
        .approve_agent(agent.wallet().unwrap_or_default(), 101 * ONE_TOKEN)
        .await?;
    for (case, renter, payer, provider) in [
        ("renter-account-funded/provider-paid-before", &renter, None, &provider),
        (
            "renter-pays-from-wallet/first-payment-to-a-fresh-provider",
            &wallet_renter,
            None,
            &fresh,
        ),
        (
            "agent-opens-from-renter-account/provider-paid-before",
            &agent,
            Some(renter_w.address()),
            &provider,
        ),
    ] {
        let me = renter.wallet().unwrap_or_default();
        let id = lease_id(me, case);
        let to = provider.wallet().unwrap_or_default();
        let opened = match payer {
            Some(payer) => renter.open_for(payer, id, to, RATE, 100 * ONE_TOKEN).await?,
            None => renter.open(id, to, RATE, 100 * ONE_TOKEN).await?,
        };
        let OpenOutcome::Opened { gas_used: open_gas, .. } = opened else {
            anyhow::bail!("lease already open")
        };
        renter.provider().anvil_increase_time(3600).await?;
        renter.provider().anvil_mine(Some(1), None).await?;
        let before = provider.provider().get_block_number().await?;
        provider.withdraw(id).await?;
        let withdraw_gas = gas_of_last_tx(provider, before).await?;
        // What keeps a long job running: one top-up, by the renter or its
        // agent, from the same place the open took its deposit. Not part of
        // the lifecycle figure, which DESIGN.md defines without it.
        let top_up_gas = renter.top_up(id, ONE_TOKEN).await?;
        renter.provider().anvil_increase_time(600).await?;
        renter.provider().anvil_mine(Some(1), None).await?;
        let before = renter.provider().get_block_number().await?;
        renter.close(id, CloseReason::Completed).await?;
        let close_gas = gas_of_last_tx(renter, before).await?;
        let total = open_gas + withdraw_gas + close_gas;
        let mut cond = cond.clone();
        cond["case"] = json!(case);
        println!(
            "{case}: open {open_gas}, withdraw {withdraw_gas}, close {close_gas}, lifecycle {total} gas; a top-up {top_up_gas}"
        );
        for (what, gas) in [
            ("open", open_gas),
            ("withdraw", withdraw_gas),
            ("close", close_gas),
            ("lifecycle", total),
            ("top_up", top_up_gas),
        ] {
            figures.push(Figure::new(
                &format!("escrow_gas_{what}/{case}"),
                gas as f64,
                "gas",
                cond.clone(),
            ));
        }
    }

    // Taking earnings out to the wallet: once per sweep, however many leases paid in.
    let before = provider.provider().get_block_number().await?;
    let earned = provider.account(provider_addr).await?;
    provider.withdraw_funds(earned, provider_addr).await?;
    let sweep_gas = gas_of_last_tx(&provider, before).await?;
    println!("withdraw an escrow account to the wallet: {sweep_gas} gas");
    figures.push(Figure::new("escrow_gas_withdraw_funds", sweep_gas as f64, "gas", cond));

    // One wallet, many leases at once.
    let renter = Arc::new(renter);
    let leases_before = renter.lease_ids_of(renter_w.address()).await?.len();
    let started = Instant::now();
    let tasks: Vec<_> = (0..args.concurrent)
        .map(|i| {
            let r = renter.clone();
            let me = renter_w.address();
            tokio::spawn(async move {
                let t = Instant::now();
                r.open(lease_id(me, &format!("bench-{i}")), provider_addr, RATE, ONE_TOKEN)
                    .await
                    .map(|_| t.elapsed())
            })
        })
        .collect();
    let mut lat: Vec<Duration> = Vec::new();
    for t in tasks {
        lat.push(t.await??);
    }
    let wall = started.elapsed();
    lat.sort();
    let pct = |p: f64| {
        lat[((lat.len() as f64 * p).ceil() as usize)
            .saturating_sub(1)
            .min(lat.len() - 1)]
        .as_secs_f64()
            * 1000.0
    };
    let cond =
        json!({ "leases": args.concurrent, "wallets": 1, "chain": "anvil automine on loopback", "confirmations": 1 });
    println!(
        "{} concurrent opens from one wallet: all done in {:.0} ms; per open p50 {:.0} ms, p99 {:.0} ms",
        args.concurrent,
        wall.as_secs_f64() * 1000.0,
        pct(0.5),
        pct(0.99)
    );
    figures.push(Figure::new(
        "escrow_concurrent_open_all",
        wall.as_secs_f64() * 1000.0,
        "ms",
        cond.clone(),
    ));
    figures.push(Figure::new("escrow_concurrent_open_p50", pct(0.5), "ms", cond.clone()));
    figures.push(Figure::new("escrow_concurrent_open_p99", pct(0.99), "ms", cond));
    anyhow::ensure!(
        renter.lease_ids_of(renter_w.address()).await?.len() == leases_before + args.concurrent,
        "every open landed once"
    );
    write(&args.out, &figures)?;
    println!("wrote {}", args.out.display());
    drop(anvil);
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}

/// Gas of the one transaction the client just sent (the only one in blocks after `before`).
async fn gas_of_last_tx(c: &EscrowClient, before: u64) -> anyhow::Result<u64> {
    let head = c.provider().get_block_number().await?;
    let mut gas = 0;
    for n in before + 1..=head {
        if let Some(receipts) = c.provider().get_block_receipts(n.into()).await? {
            gas += receipts.iter().map(|r| r.gas_used).sum::<u64>();
        }
    }
    Ok(gas)
}

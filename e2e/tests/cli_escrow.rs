//! `gpupool escrow …` and `gpupool leases` as a user runs them, against anvil.

use std::process::Command;

use alloy::providers::ext::AnvilApi;
use gpupool_chain::{ClientOptions, EscrowClient, lease_id};
use gpupool_e2e::chain::{Anvil, ONE_TOKEN, deploy_and_fund};
use gpupool_e2e::harness::workspace_bin;

fn gpupool(args: &[&str]) -> (bool, String, String) {
    let out = Command::new(workspace_bin("gpupool"))
        .args(args)
        .output()
        .expect("run gpupool");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[tokio::test]
async fn renter_and_provider_manage_a_lease_from_the_cli() {
    let dir = std::env::temp_dir().join(format!("gpupool-cli-escrow-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let anvil = Anvil::start(&dir).await.unwrap();
    let config = deploy_and_fund(&anvil, &[1, 2]).await.unwrap();
    let cfg = dir.join("chain.json");
    config.save(&cfg).unwrap();
    let (rkey, pkey) = (dir.join("renter.key"), dir.join("provider.key"));
    std::fs::write(&rkey, &anvil.keys[1]).unwrap();
    std::fs::write(&pkey, &anvil.keys[2]).unwrap();
    let renter = anvil.wallet(1).unwrap();
    let provider = anvil.wallet(2).unwrap();
    let client = EscrowClient::connect(config.clone(), Some(&renter), ClientOptions::default()).unwrap();
    let id = lease_id(renter.address(), "cli-order");
    client
        .open(id, provider.address(), ONE_TOKEN / 100, 10 * ONE_TOKEN)
        .await
        .unwrap();
    let (cfg, rkey, pkey) = (
        cfg.display().to_string(),
        rkey.display().to_string(),
        pkey.display().to_string(),
    );
    let ids = id.to_string();

    // Table by default, naming the lease and the renter's role.
    let (ok, out, err) = gpupool(&["leases", "--chain-config", &cfg, "--wallet-key-file", &rkey]);
    assert!(ok, "{err}");
    assert!(out.starts_with("LEASE"), "{out}");
    assert!(
        out.contains(&ids) && out.contains("renter") && out.contains("Open"),
        "{out}"
    );

    // Top up 2 tokens as the renter.
    let (ok, out, err) = gpupool(&[
        "escrow",
        "deposit",
        "--chain-config",
        &cfg,
        "--wallet-key-file",
        &rkey,
        "--lease",
        &ids,
        "--amount",
        "2",
    ]);
    assert!(ok, "{err}");
    assert!(out.contains("deposited 2 tokens"), "{out}");

    // The provider withdraws after some time.
    client.provider().anvil_increase_time(100).await.unwrap();
    client.provider().anvil_mine(Some(1), None).await.unwrap();
    let (ok, out, err) = gpupool(&[
        "escrow",
        "withdraw",
        "--chain-config",
        &cfg,
        "--wallet-key-file",
        &pkey,
        "--lease",
        &ids,
    ]);
    assert!(ok, "{err}");
    assert!(out.starts_with("withdrew 1"), "about 100 s at 0.01/s: {out}");

    // Balance as JSON: 1,000,000 minted, 12 in the lease.
    let (ok, out, err) = gpupool(&[
        "escrow",
        "balance",
        "--chain-config",
        &cfg,
        "--wallet-key-file",
        &rkey,
        "-o",
        "json",
    ]);
    assert!(ok, "{err}");
    let b: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(b["wallet"], "999988");
    assert_eq!(b["openLeases"], 1);
    let in_leases: f64 = b["inLeasesAsRenter"].as_str().unwrap().parse().unwrap();
    assert!(in_leases > 10.0 && in_leases < 12.0, "{out}");
    assert_eq!(b["account"], "0");

    // The escrow account: in from the wallet, out to it, never more than it holds.
    let acct = |args: &[&str]| {
        let mut all = vec!["escrow"];
        all.extend_from_slice(args);
        all.extend_from_slice(&["--chain-config", &cfg, "--wallet-key-file", &rkey]);
        gpupool(&all)
    };
    let (ok, out, err) = acct(&["deposit", "--amount", "5"]);
    assert!(ok, "{err}");
    assert!(out.contains("deposited 5 tokens into your escrow account"), "{out}");
    let (ok, out, err) = acct(&["withdraw", "--amount", "3"]);
    assert!(ok, "{err}");
    assert!(
        out.starts_with("withdrew 3 tokens from your escrow account to"),
        "{out}"
    );
    let (ok, _, err) = acct(&["withdraw", "--amount", "100"]);
    assert!(!ok);
    assert!(
        err.contains("the escrow account holds 2 tokens, 100 were asked for"),
        "{err}"
    );
    let (ok, _, err) = acct(&["withdraw"]);
    assert!(!ok);
    assert!(err.contains("--amount"), "{err}");
    let (ok, out, err) = acct(&["balance", "-o", "json"]);
    assert!(ok, "{err}");
    let b: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!((&b["wallet"], &b["account"]), (&"999986".into(), &"2".into()));

    // YAML for the provider's view.
    let (ok, out, _) = gpupool(&[
        "leases",
        "--chain-config",
        &cfg,
        "--wallet-key-file",
        &pkey,
        "-o",
        "yaml",
    ]);
    assert!(ok);
    assert!(out.contains("role: provider"), "{out}");

    // Mistakes get a clear message and a failing exit code.
    let (ok, _, err) = gpupool(&[
        "escrow",
        "withdraw",
        "--chain-config",
        &cfg,
        "--wallet-key-file",
        &rkey,
        "--lease",
        &ids,
    ]);
    assert!(!ok);
    assert!(err.contains("only the lease's provider"), "{err}");
    let (ok, _, err) = gpupool(&[
        "escrow",
        "withdraw",
        "--chain-config",
        &cfg,
        "--wallet-key-file",
        &pkey,
        "--lease",
        "0x12",
    ]);
    assert!(!ok);
    assert!(err.contains("64 hex digits"), "{err}");
    let (ok, _, err) = gpupool(&["escrow", "balance", "--wallet-key-file", &rkey]);
    assert!(!ok);
    assert!(err.contains("--chain-config"), "{err}");
    let _ = std::fs::remove_dir_all(&dir);
}

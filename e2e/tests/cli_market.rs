//! The market commands of `gpupool` as a platform team runs them against its
//! own cluster while the pool's operators run as real processes: `peers`,
//! `market`, `submit`, `bids`, `accept`, `bid` (a raise), the waits and
//! their exit codes, and the refusals.

use std::path::{Path, PathBuf};
use std::time::Duration;

use gpupool_crds::{AiJob, AiJobPhase};
use gpupool_e2e::harness::{CliRun, admin, namespace, remove_namespace, run_gpupool, testenv, wait_for};
use gpupool_e2e::pool::{Lends, Pool};
use kube::api::Api;

const WAIT: Duration = Duration::from_secs(90);

fn gpupool(kubeconfig: &Path, args: &[&str]) -> CliRun {
    run_gpupool(args, &[("KUBECONFIG", kubeconfig.as_os_str())])
}

/// A command line split at spaces (no argument here has one).
fn gpupool_line(kubeconfig: &Path, line: &str) -> CliRun {
    gpupool(kubeconfig, &line.split_whitespace().collect::<Vec<_>>())
}

async fn phase(client: &kube::Client, ns: &str, name: &str) -> Option<AiJobPhase> {
    Api::<AiJob>::namespaced(client.clone(), ns)
        .get(name)
        .await
        .ok()?
        .status?
        .phase
}

/// The pool running, and acme's admin client, kubeconfig and a namespace.
async fn acme_in_a_pool(tag: &str) -> (kube::Client, PathBuf, String, Pool) {
    let env = testenv();
    let org = env.org("acme").unwrap();
    let acme = admin(org).await;
    let pool = Pool::start(&env, tag, &Lends::every_org(), &[]).await.unwrap();
    let ns = namespace(&acme, tag).await;
    (acme, org.admin_kubeconfig.clone(), ns, pool)
}

#[tokio::test]
async fn a_renter_reads_the_market_submits_and_accepts_a_bid_from_the_cli() {
    let (acme, kc, ns, _pool) = acme_in_a_pool("climarket").await;

    // The peers and their adverts, as the operator recorded them.
    let peers = wait_for(WAIT, "bravo and corvus among the peers", || {
        let kc = kc.clone();
        async move {
            let r = gpupool(&kc, &["peers"]);
            (r.code == Some(0) && r.out.contains("bravo") && r.out.contains("corvus")).then_some(r.out)
        }
    })
    .await
    .unwrap();
    assert!(peers.starts_with("ORG"), "{peers}");
    let offers = wait_for(WAIT, "both lenders' adverts", || {
        let kc = kc.clone();
        async move {
            let r = gpupool(&kc, &["market", "-o", "json"]);
            let v: serde_json::Value = serde_json::from_str(&r.out).ok()?;
            let orgs: Vec<String> = v
                .as_array()?
                .iter()
                .filter_map(|o| o["org"].as_str().map(String::from))
                .collect();
            (orgs.contains(&"bravo".to_string()) && orgs.contains(&"corvus".to_string())).then_some(v)
        }
    })
    .await
    .unwrap();
    // Cheapest first: bravo's A100 at 2 before corvus's L40S at 2.2.
    let listed: Vec<(String, String)> = offers
        .as_array()
        .unwrap()
        .iter()
        .map(|o| {
            (
                o["org"].as_str().unwrap().to_string(),
                o["pricePerGpuHour"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    let bravo = listed.iter().position(|(o, _)| o == "bravo").unwrap();
    let corvus = listed.iter().position(|(o, _)| o == "corvus").unwrap();
    assert!(bravo < corvus, "{listed:?}");
    assert_eq!(listed[bravo].1, "2");
    let table = gpupool(&kc, &["market"]);
    assert!(
        table.out.contains("A100") && table.out.contains("L40S"),
        "{}",
        table.out
    );

    // Submit from flags with Manual selection; the job waits for a choice.
    let r = gpupool_line(
        &kc,
        &format!(
            "submit pick -n {ns} --image ghcr.io/example/train:1 --gpus 2 --model A100 --model L40S --max-price 3 --mode pool-only --window 1s --manual"
        ),
    );
    assert_eq!(r.code, Some(0), "{}", r.err);
    assert_eq!(r.out, "aijob/pick submitted\n");
    let bids = wait_for(WAIT, "two bids listed", || {
        let kc = kc.clone();
        let ns = ns.clone();
        async move {
            let r = gpupool(&kc, &["bids", "pick", "-n", &ns, "-o", "json"]);
            let v: serde_json::Value = serde_json::from_str(&r.out).ok()?;
            (v.as_array()?.len() == 2).then_some(v)
        }
    })
    .await
    .unwrap();
    let name_of = |org: &str| {
        bids.as_array()
            .unwrap()
            .iter()
            .find(|b| b["spec"]["providerOrg"] == org)
            .and_then(|b| b["metadata"]["name"].as_str())
            .unwrap()
            .to_string()
    };
    let (bravo_bid, corvus_bid) = (name_of("bravo"), name_of("corvus"));
    let table = gpupool(&kc, &["bids", "pick", "-n", &ns]);
    assert!(
        table.out.starts_with("NAME") && table.out.find(&bravo_bid) < table.out.find(&corvus_bid),
        "cheapest first:\n{}",
        table.out
    );

    // Accept the dearer bid and wait until the job is done: exit 0, with
    // the progress on stderr and where it ran on stdout.
    let r = gpupool(&kc, &["accept", &corvus_bid, "-n", &ns, "--wait", "--timeout", "90s"]);
    assert_eq!(r.code, Some(0), "stdout {}\nstderr {}", r.out, r.err);
    assert!(r.out.contains(&format!("accepted bid {corvus_bid}")), "{}", r.out);
    assert!(r.out.contains("aijob/pick Succeeded in corvus"), "{}", r.out);
    assert!(
        r.err.contains("Bidding") && r.err.contains("Running"),
        "progress: {}",
        r.err
    );

    // Refusals: a bid that lost, an unknown bid, a job that is done.
    let r = gpupool(&kc, &["accept", &bravo_bid, "-n", &ns]);
    assert_eq!(r.code, Some(1));
    assert!(r.err.contains("is Lost") || r.err.contains("is Succeeded"), "{}", r.err);
    let r = gpupool(&kc, &["accept", "no-such-bid", "-n", &ns]);
    assert_eq!(r.code, Some(1));
    assert!(r.err.contains("no bid no-such-bid in namespace"), "{}", r.err);
    let r = gpupool(&kc, &["bid", "pick", "-n", &ns, "--max-price", "9"]);
    assert_eq!(r.code, Some(1));
    assert!(r.err.contains("agreed in its lease"), "{}", r.err);
    remove_namespace(&acme, &ns).await;
}

#[tokio::test]
async fn raises_failures_and_refusals_reach_the_exit_code() {
    let (acme, kc, ns, _pool) = acme_in_a_pool("cliraise").await;

    // Too cheap for anyone: the job says so, and a raise places it.
    let r = gpupool_line(
        &kc,
        &format!("submit cheap -n {ns} --image x --model A100 --max-price 0.5 --mode pool-only --window 1s"),
    );
    assert_eq!(r.code, Some(0), "{}", r.err);
    // A "raise" that is none, and accepting on a job that picks itself.
    let r = gpupool(&kc, &["bid", "cheap", "-n", &ns, "--max-price", "0.5"]);
    assert_eq!(r.code, Some(1));
    assert!(r.err.contains("must be above"), "{}", r.err);
    let r = gpupool(&kc, &["accept", "nothing", "-n", &ns]);
    assert_eq!(r.code, Some(1), "{}", r.err);
    assert!(r.err.contains("no bid nothing"), "{}", r.err);
    wait_for(WAIT, "the price reason", || {
        let acme = acme.clone();
        let ns = ns.clone();
        async move {
            let j = Api::<AiJob>::namespaced(acme, &ns).get("cheap").await.ok()?;
            (j.status?.conditions.iter().any(|c| c.reason == "PriceTooLow")).then_some(())
        }
    })
    .await
    .unwrap();
    let r = gpupool(&kc, &["bid", "cheap", "-n", &ns, "--max-price", "2.5"]);
    assert_eq!(r.code, Some(0), "{}", r.err);
    assert!(
        r.out.contains("now pays at most 2.5 per GPU-hour (was 0.5)"),
        "{}",
        r.out
    );
    wait_for(WAIT, "the raised job running or done", || {
        let acme = acme.clone();
        let ns = ns.clone();
        async move {
            matches!(
                phase(&acme, &ns, "cheap").await,
                Some(AiJobPhase::Running | AiJobPhase::Succeeded)
            )
            .then_some(())
        }
    })
    .await
    .unwrap();

    // A workload that exits 3 in the provider's cluster: --wait exits 3.
    let r = gpupool_line(
        &kc,
        &format!(
            "submit broken -n {ns} --image x --model L40S --max-price 3 --mode pool-only --window 1s --pod-annotation sim.gpupool.dev/exit-code=3 --wait --timeout 90s"
        ),
    );
    assert_eq!(r.code, Some(3), "stdout {}\nstderr {}", r.out, r.err);
    assert!(r.err.contains("AiJob broken failed"), "{}", r.err);

    // Waiting for more than the timeout allows: exit 4.
    let r = gpupool_line(
        &kc,
        &format!(
            "submit slow -n {ns} --image x --model B200 --max-price 3 --mode pool-only --wait running --timeout 3s"
        ),
    );
    assert_eq!(r.code, Some(4), "stdout {}\nstderr {}", r.out, r.err);
    assert!(
        r.err
            .contains("timed out after 3s waiting for AiJob slow to be Running"),
        "{}",
        r.err
    );

    // The API server's refusal, in its own words, and a name taken.
    let r = gpupool(&kc, &["submit", "bad", "-n", &ns, "--image", "x", "--max-price", "1,5"]);
    assert_eq!(r.code, Some(1));
    assert!(
        r.err.contains("maxPricePerGpuHour must be a non-negative decimal"),
        "{}",
        r.err
    );
    let r = gpupool(&kc, &["submit", "slow", "-n", &ns, "--image", "x", "--max-price", "1"]);
    assert_eq!(r.code, Some(1));
    assert!(r.err.contains("AiJob slow already exists"), "{}", r.err);
    remove_namespace(&acme, &ns).await;
}

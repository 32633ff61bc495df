//! The Pool API with the pool's operators running as real processes: a
//! renter without a cluster (a wallet on the chain, no kubeconfig) approves
//! acme's operator as its agent, submits through acme's Pool API with the
//! `gpupool` CLI, and its job runs in another organisation, paid from the
//! renter's own escrow account. Then what must never get through: unsigned,
//! forged, replayed, stale and oversized requests, another renter's jobs,
//! and a cluster user naming someone else's wallet as payer.

use std::path::Path;

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use gpupool_chain::request_auth::HEADER_WALLET;
use gpupool_chain::{ClientOptions, EscrowClient, LeaseOnChain, Wallet};
use gpupool_crds::{ANNOTATION_TRACEPARENT, AiJob, Bid};
use gpupool_e2e::harness::{CliRun, admin, aijob_json, namespace, remove_namespace, run_gpupool, testenv, wait_for};
use gpupool_e2e::otlp::{OtlpReceiver, ReceivedSpan};
use gpupool_e2e::pool::{Lends, Pool, base_units};
use gpupool_proto::pool::v1 as api;
use gpupool_proto::pool::v1::pool_client::PoolClient;
use kube::ResourceExt;
use kube::api::{Api, ListParams, PostParams};
use prost::Message;
use tonic::transport::{Certificate, Channel, ClientTlsConfig};

const WAIT: Duration = Duration::from_secs(120);

/// `gpupool` as a renter without a cluster runs it: no kubeconfig at all.
/// The reason message of `job` in `gpupool jobs -o json` output.
fn job_message(jobs_json: &str, job: &str) -> Option<String> {
    let v: serde_json::Value = serde_json::from_str(jobs_json).ok()?;
    let j = v.as_array()?.iter().find(|j| j["name"] == job)?;
    j["message"].as_str().map(String::from)
}

fn gpupool(chain_config: &Path, key: &Path, ca: &Path, args: &[&str]) -> CliRun {
    run_gpupool(
        args,
        &[
            ("KUBECONFIG", "/nonexistent".as_ref()),
            ("GPUPOOL_POOL_API_CA", ca.as_os_str()),
            ("GPUPOOL_CHAIN_CONFIG", chain_config.as_os_str()),
            ("GPUPOOL_WALLET_KEY_FILE", key.as_os_str()),
        ],
    )
}

fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_millis() as u64
}

/// `msg` signed by `signer` for `method`, claiming to be `claimed`.
fn signed<T: Message>(signer: &Wallet, claimed: Option<&str>, method: &str, msg: T, at_ms: u64) -> tonic::Request<T> {
    let path = format!("/gpupool.pool.v1.Pool/{method}");
    let h = signer.sign_request(&path, &msg.encode_to_vec(), at_ms, rand_nonce());
    let mut req = tonic::Request::new(msg);
    let md = req.metadata_mut();
    for (k, v) in h.pairs() {
        md.insert(k, v.parse().unwrap());
    }
    if let Some(claimed) = claimed {
        md.insert(HEADER_WALLET, claimed.parse().unwrap());
    }
    req
}

fn rand_nonce() -> [u8; 16] {
    let n = SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_nanos();
    n.to_le_bytes()
}

#[tokio::test]
async fn a_renter_without_a_cluster_rents_through_a_members_pool_api() {
    let env = testenv();
    let chain_info = env.chain.as_ref().expect("a chain");
    let cfg = chain_info.config.clone();
    let key = chain_info.wallets["renter"].clone();
    let other_key = chain_info.wallets["provider"].clone();
    let renter = Wallet::from_file(&key).unwrap();
    let acme = admin(env.org("acme").unwrap()).await;
    // Every operator exports its spans: the job's trace starts at the Pool API.
    let receiver = OtlpReceiver::start().await.unwrap();
    let otlp = [format!("--otlp-endpoint={}", receiver.endpoint())];
    let (pool, served) = Pool::start_serving_pool_api(&env, "poolapi", &Lends::every_org(), "acme", &otlp)
        .await
        .unwrap();
    let (url, ca) = (served.url.clone(), served.ca.clone());
    let acme_wallet = pool.members["acme"].wallet;
    let chain = EscrowClient::connect(pool.config.clone(), None, ClientOptions::default()).unwrap();
    let me = renter.address().to_string();
    let renter_ns = format!("gpupool-renter-{}", me.to_lowercase().trim_start_matches("0x"));
    // What an earlier, interrupted run left (of this test or the next, whose
    // renter is the other wallet here), settled by the running operators.
    remove_namespace(&acme, &renter_ns).await;
    let other_address = Wallet::from_file(&other_key).unwrap().address().to_string();
    let other_ns = format!(
        "gpupool-renter-{}",
        other_address.to_lowercase().trim_start_matches("0x")
    );
    remove_namespace(&acme, &other_ns).await;
    let cli = |args: &[&str]| {
        let mut all = vec!["--pool-api", url.as_str()];
        all.extend_from_slice(args);
        gpupool(&cfg, &key, &ca, &all)
    };

    // Who runs it, without a key: the agent to approve is acme's wallet.
    let info = wait_for(WAIT, "the Pool API answering", || async {
        let r = cli(&["pool-info", "-o", "json"]);
        (r.code == Some(0)).then_some(r.out)
    })
    .await
    .unwrap();
    let info: serde_json::Value = serde_json::from_str(&info).unwrap();
    assert_eq!(info["org"], "acme");
    assert_eq!(info["agent"].as_str().unwrap(), acme_wallet.to_string());
    // The market through the API, cheapest first.
    wait_for(WAIT, "both lenders' adverts through the API", || async {
        let r = cli(&["market", "-o", "json"]);
        let v: serde_json::Value = serde_json::from_str(&r.out).ok()?;
        let orgs: Vec<&str> = v.as_array()?.iter().filter_map(|o| o["org"].as_str()).collect();
        (orgs.first() == Some(&"bravo") && orgs.contains(&"corvus")).then_some(())
    })
    .await
    .unwrap();

    // No mandate: refused up front, naming the command that fixes it.
    let agent = acme_wallet.to_string();
    let r = gpupool(
        &cfg,
        &key,
        &ca,
        &["escrow", "agent", "--agent", &agent, "--amount", "0"],
    );
    assert_eq!(r.code, Some(0), "{}", r.err);
    let submit = [
        "submit",
        "eval",
        "--image",
        "ghcr.io/example/eval:1",
        "--model",
        "A100",
        "--max-price",
        "3",
        "--window",
        "1s",
        "--pod-annotation",
        "sim.gpupool.dev/duration=3s",
    ];
    let r = cli(&submit);
    assert_eq!(r.code, Some(1), "{}", r.out);
    assert!(r.err.contains("gpupool escrow agent --agent"), "{}", r.err);

    // Fund the account, approve acme for 10 tokens, and submit with --wait.
    let r = gpupool(&cfg, &key, &ca, &["escrow", "deposit", "--amount", "20"]);
    assert_eq!(r.code, Some(0), "{}", r.err);
    let r = gpupool(
        &cfg,
        &key,
        &ca,
        &["escrow", "agent", "--agent", &agent, "--amount", "10"],
    );
    assert_eq!(r.code, Some(0), "{}", r.err);
    assert!(r.out.contains("may commit 10 more tokens"), "{}", r.out);
    let account_before = chain.account(renter.address()).await.unwrap();
    let acme_before = pool.balance("acme").await.unwrap();
    let bravo_before = pool.balance("bravo").await.unwrap();
    let mut waiting = submit.to_vec();
    waiting.extend_from_slice(&["--wait", "--timeout", "120s"]);
    let r = cli(&waiting);
    assert_eq!(r.code, Some(0), "stdout {}\nstderr {}", r.out, r.err);
    assert!(r.out.contains("aijob/eval submitted through"), "{}", r.out);
    assert!(r.out.contains("aijob/eval Succeeded in bravo"), "{}", r.out);
    assert!(r.err.contains("Running"), "progress: {}", r.err);
    let r = cli(&["jobs"]);
    assert!(r.out.contains("eval") && r.out.contains("Succeeded"), "{}", r.out);

    // On chain: the lease's renter is the renter, acme only its agent, and
    // once closed the renter paid exactly what bravo earned, acme nothing.
    let closed = wait_for(WAIT, "the renter's lease closed on chain", || async {
        let ids = chain.lease_ids_of(renter.address()).await.ok()?;
        for id in ids.iter().rev() {
            if let Ok(LeaseOnChain::Closed {
                renter: r,
                paid,
                refunded,
                deposited,
                ..
            }) = chain.lease(*id).await
                && chain.account(renter.address()).await.ok()? == account_before - paid
            {
                return Some((r, paid, refunded, deposited));
            }
        }
        None
    })
    .await
    .unwrap();
    let (lease_renter, paid, refunded, deposited) = closed;
    assert_eq!(lease_renter, renter.address());
    assert!(paid > 0, "a 3 s workload costs something");
    assert_eq!(paid + refunded, deposited);
    assert_eq!(
        pool.balance("acme").await.unwrap(),
        acme_before,
        "the agent pays nothing"
    );
    assert_eq!(pool.balance("bravo").await.unwrap(), bravo_before + paid);
    // The allowance went down by the deposit; refunds do not restore it.
    let left = chain.agent_allowance(renter.address(), acme_wallet).await.unwrap();
    assert_eq!(left, 10 * 10u128.pow(18) - deposited);

    // One trace from the renter's Submit to bravo's workload: the Pool API's
    // span is its root, and the job's annotation names it.
    let traceparent = Api::<AiJob>::namespaced(acme.clone(), &renter_ns)
        .get("eval")
        .await
        .unwrap()
        .annotations()
        .get(ANNOTATION_TRACEPARENT)
        .cloned()
        .expect("the job names its trace");
    let trace = traceparent.split('-').nth(1).unwrap().to_string();
    let spans = wait_for(WAIT, "the submission's trace across acme and bravo", || async {
        let spans: Vec<ReceivedSpan> = receiver.spans().into_iter().filter(|s| s.trace_id == trace).collect();
        let has = |org: &str, name: &str| spans.iter().any(|s| s.org == org && s.name == name);
        (has("acme", "pool_api.submit")
            && has("acme", "aijob.reconcile")
            && has("acme", "lease.settle")
            && has("bravo", "peer.receive")
            && has("bravo", "aijob.reconcile"))
        .then_some(spans)
    })
    .await
    .unwrap();
    let roots: Vec<&ReceivedSpan> = spans.iter().filter(|s| s.parent_span_id.is_empty()).collect();
    assert_eq!(roots.len(), 1, "{roots:#?}");
    assert_eq!(
        (roots[0].org.as_str(), roots[0].name.as_str()),
        ("acme", "pool_api.submit")
    );
    assert_eq!(traceparent.split('-').nth(2), Some(roots[0].span_id.as_str()));

    // Allowances too small: for the member's deposit (an hour of the job,
    // 2 tokens at bravo's price), the lease is refused on chain; for even
    // a first minute (0.0333), providers do not bid at all. Either way the
    // job says why instead of hanging, and cancelling it leaves nothing
    // behind and costs nothing.
    let account_now = chain.account(renter.address()).await.unwrap();
    for (job, allowance, why, says) in [
        (
            "tight",
            "0.5",
            "escrow refused",
            "lets this agent commit 0.5 more tokens",
        ),
        (
            "tighter",
            "0.001",
            "cannot be paid",
            "lets this member commit 0.001 more",
        ),
    ] {
        let r = gpupool(
            &cfg,
            &key,
            &ca,
            &["escrow", "agent", "--agent", &agent, "--amount", allowance],
        );
        assert_eq!(r.code, Some(0), "{}", r.err);
        let mut tight = submit.to_vec();
        tight[1] = job;
        let r = cli(&tight);
        assert_eq!(r.code, Some(0), "{}", r.err);
        let message = wait_for(WAIT, &format!("{job}: {why} in the job's reason"), || async {
            let m = job_message(&cli(&["jobs", "-o", "json"]).out, job)?;
            m.contains(why).then_some(m)
        })
        .await
        .unwrap();
        assert!(
            message.contains(says) && message.contains("gpupool escrow agent"),
            "{message}"
        );
        let bids = Api::<Bid>::namespaced(acme.clone(), &renter_ns)
            .list(&ListParams::default().labels(&format!("{}={job}", gpupool_crds::LABEL_AIJOB)))
            .await
            .unwrap();
        assert_eq!(
            bids.items.is_empty(),
            job == "tighter",
            "bravo bids only where a minute is covered: {bids:#?}"
        );
        let r = cli(&["cancel", job]);
        assert_eq!(r.code, Some(0), "{}", r.err);
        assert!(r.out.contains(&format!("aijob/{job} cancelled")), "{}", r.out);
        wait_for(WAIT, "the cancelled job gone", || async {
            let r = cli(&["jobs", "-o", "json"]);
            (r.code == Some(0) && !r.out.contains(&format!("\"{job}\""))).then_some(())
        })
        .await
        .unwrap();
        assert_eq!(chain.account(renter.address()).await.unwrap(), account_now);
    }

    // An allowance that funds one first minute (0.0333) but not two: a
    // Manual job holds bravo's bid, unchosen, which pledges its deposit at
    // bravo; a second job submitted meanwhile gets no bid, and its reason
    // says the first one's bid is why. Cancelling both costs nothing.
    let r = gpupool(
        &cfg,
        &key,
        &ca,
        &["escrow", "agent", "--agent", &agent, "--amount", "0.05"],
    );
    assert_eq!(r.code, Some(0), "{}", r.err);
    // bravo trusts what it last read of this payer for a few seconds.
    tokio::time::sleep(Duration::from_millis(
        gpupool_operator::market::renter_funds::FUNDS_FRESH_MS + 500,
    ))
    .await;
    let bids_of = |job: &'static str| {
        let api = Api::<Bid>::namespaced(acme.clone(), &renter_ns);
        async move {
            api.list(&ListParams::default().labels(&format!("{}={job}", gpupool_crds::LABEL_AIJOB)))
                .await
                .unwrap()
                .items
        }
    };
    let mut held = submit.to_vec();
    held[1] = "held";
    held.push("--manual");
    let r = cli(&held);
    assert_eq!(r.code, Some(0), "{}", r.err);
    wait_for(WAIT, "bravo's bid for the held job", || async {
        (!bids_of("held").await.is_empty()).then_some(())
    })
    .await
    .unwrap();
    let mut second = submit.to_vec();
    second[1] = "second";
    let r = cli(&second);
    assert_eq!(r.code, Some(0), "{}", r.err);
    let message = wait_for(WAIT, "the second job saying the held bid is why", || async {
        let m = job_message(&cli(&["jobs", "-o", "json"]).out, "second")?;
        m.contains("other order(s)").then_some(m)
    })
    .await
    .unwrap();
    assert!(
        message.contains("can fund 0.05 tokens, 1 times a first deposit")
            && message.contains("1 other order(s) it pays for holding bids")
            && message.contains("gpupool escrow agent"),
        "{message}"
    );
    assert!(
        bids_of("second").await.is_empty(),
        "no bid while the first holds its deposit"
    );
    for job in ["held", "second"] {
        let r = cli(&["cancel", job]);
        assert_eq!(r.code, Some(0), "{}", r.err);
    }
    wait_for(WAIT, "both cancelled jobs gone", || async {
        let r = cli(&["jobs", "-o", "json"]);
        (r.code == Some(0) && !r.out.contains("\"held\"") && !r.out.contains("\"second\"")).then_some(())
    })
    .await
    .unwrap();
    assert_eq!(chain.account(renter.address()).await.unwrap(), account_now);

    // What must never get through, sent as raw gRPC.
    // Only over TLS: a plaintext client gets nowhere.
    let plain = url.replace("https://", "http://");
    if let Ok(mut c) = PoolClient::connect(plain).await {
        assert!(c.market(api::MarketRequest {}).await.is_err(), "plaintext answered");
    }
    let tls = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(std::fs::read(&ca).unwrap()));
    let channel = Channel::from_shared(url.clone())
        .unwrap()
        .tls_config(tls)
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut raw = PoolClient::new(channel);
    let other = Wallet::from_file(&other_key).unwrap();
    let unsigned = raw.list_jobs(api::ListJobsRequest {}).await.unwrap_err();
    assert_eq!(unsigned.code(), tonic::Code::Unauthenticated);
    assert!(
        unsigned.message().contains("missing x-gpupool-wallet"),
        "{}",
        unsigned.message()
    );
    // Signed by another wallet than it claims.
    let forged = raw
        .list_jobs(signed(&other, Some(&me), "ListJobs", api::ListJobsRequest {}, now_ms()))
        .await
        .unwrap_err();
    assert_eq!(forged.code(), tonic::Code::Unauthenticated);
    assert!(forged.message().contains("the signature is by"), "{}", forged.message());
    // Signed for another method.
    let wrong_method = raw
        .cancel(signed(
            &renter,
            None,
            "GetJob",
            api::JobRef { name: "eval".into() },
            now_ms(),
        ))
        .await
        .unwrap_err();
    assert_eq!(wrong_method.code(), tonic::Code::Unauthenticated);
    // Replayed: the very same request twice.
    let once = signed(&renter, None, "GetJob", api::JobRef { name: "eval".into() }, now_ms());
    let again = {
        let mut r = tonic::Request::new(api::JobRef { name: "eval".into() });
        *r.metadata_mut() = once.metadata().clone();
        r
    };
    assert_eq!(raw.get_job(once).await.unwrap().into_inner().phase, "Succeeded");
    let replayed = raw.get_job(again).await.unwrap_err();
    assert_eq!(replayed.code(), tonic::Code::Unauthenticated);
    assert!(replayed.message().contains("already used"), "{}", replayed.message());
    // Signed two minutes ago.
    let stale = raw
        .get_job(signed(
            &renter,
            None,
            "GetJob",
            api::JobRef { name: "eval".into() },
            now_ms() - 120_000,
        ))
        .await
        .unwrap_err();
    assert!(stale.message().contains("clock"), "{}", stale.message());
    // Oversized: refused before it is decoded, and nothing is created.
    let huge = api::SubmitRequest {
        name: "huge".into(),
        spec_json: "x".repeat(300 * 1024),
    };
    let too_big = raw
        .submit(signed(&renter, None, "Submit", huge, now_ms()))
        .await
        .unwrap_err();
    assert_ne!(too_big.code(), tonic::Code::Ok);
    // Malformed and invalid specs come back with what to fix.
    let bad = raw
        .submit(signed(
            &renter,
            None,
            "Submit",
            api::SubmitRequest {
                name: "bad".into(),
                spec_json: "{\"gpus\": \"two\"}".into(),
            },
            now_ms(),
        ))
        .await
        .unwrap_err();
    assert_eq!(bad.code(), tonic::Code::InvalidArgument);
    assert!(bad.message().contains("not an AiJob spec"), "{}", bad.message());
    let spec = aijob_json(
        "x",
        1,
        &["A100"],
        "1s",
        serde_json::json!({"maxPricePerGpuHour": "1,5"}),
    )["spec"]
        .to_string();
    let invalid = raw
        .submit(signed(
            &renter,
            None,
            "Submit",
            api::SubmitRequest {
                name: "comma".into(),
                spec_json: spec,
            },
            now_ms(),
        ))
        .await
        .unwrap_err();
    assert_eq!(invalid.code(), tonic::Code::InvalidArgument);
    assert!(
        invalid.message().contains("maxPricePerGpuHour must be"),
        "{}",
        invalid.message()
    );
    let jobs: Api<AiJob> = Api::namespaced(acme.clone(), &renter_ns);
    for name in ["huge", "bad", "comma"] {
        assert!(jobs.get_opt(name).await.unwrap().is_none(), "{name} was created");
    }

    // Another renter sees none of it.
    let r = gpupool(&cfg, &other_key, &ca, &["--pool-api", &url, "jobs", "-o", "json"]);
    assert_eq!(r.code, Some(0), "{}", r.err);
    assert_eq!(r.out.trim(), "[]");
    let r = gpupool(&cfg, &other_key, &ca, &["--pool-api", &url, "bids", "eval"]);
    assert_eq!(r.code, Some(1));
    assert!(r.err.contains("no job named \"eval\""), "{}", r.err);
    let r = gpupool(&cfg, &other_key, &ca, &["--pool-api", &url, "cancel", "eval"]);
    assert_eq!(r.code, Some(1));

    // A cluster user cannot make acme spend the renter's account: spec.payer
    // outside the renter's namespace fails the job, and no lease is made.
    let ns = namespace(&acme, "payer").await;
    let mut job: AiJob = serde_json::from_value(aijob_json(
        "freeride",
        1,
        &["A100"],
        "1s",
        serde_json::json!({"payer": me.to_lowercase(), "placement": {"mode": "PoolOnly"}}),
    ))
    .unwrap();
    job.metadata.namespace = Some(ns.clone());
    Api::<AiJob>::namespaced(acme.clone(), &ns)
        .create(&PostParams::default(), &job)
        .await
        .unwrap();
    let why = wait_for(WAIT, "the free ride refused", || {
        let api = Api::<AiJob>::namespaced(acme.clone(), &ns);
        async move {
            let st = api.get("freeride").await.ok()?.status?;
            st.conditions
                .iter()
                .find(|c| c.reason == "InvalidSpec")
                .map(|c| c.message.clone())
        }
    })
    .await
    .unwrap();
    assert!(why.contains("not a Pool API renter namespace"), "{why}");
    let leases: Api<gpupool_crds::Lease> = Api::namespaced(acme.clone(), &ns);
    assert!(leases.list(&Default::default()).await.unwrap().items.is_empty());

    remove_namespace(&acme, &ns).await;
    remove_namespace(&acme, &renter_ns).await;

    // A renewed certificate, here from a new CA, is served without a
    // restart once its files change, as the kubelet swaps a renewed
    // Secret's files: written aside, then renamed into place.
    let renewed_dir = served.dir.join("renewed");
    std::fs::create_dir_all(&renewed_dir).unwrap();
    let new_ca = gpupool_e2e::certs::Ca::create(&renewed_dir, "pool-api-renewed").unwrap();
    let next = new_ca
        .serving(
            &renewed_dir,
            "pool-api",
            "gpupool-pool-api",
            &["127.0.0.1", "localhost"],
        )
        .unwrap();
    for (from, to) in [(&next.key, &served.files.key), (&next.cert, &served.files.cert)] {
        let aside = to.with_extension("next");
        std::fs::copy(from, &aside).unwrap();
        std::fs::rename(&aside, to).unwrap();
    }
    wait_for(Duration::from_secs(30), "the renewed certificate served", || async {
        let r = gpupool(&cfg, &key, &new_ca.cert_path, &["--pool-api", &url, "pool-info"]);
        (r.code == Some(0)).then_some(())
    })
    .await
    .unwrap();
    let r = gpupool(&cfg, &key, &ca, &["--pool-api", &url, "pool-info"]);
    assert_eq!(r.code, Some(1), "the old CA no longer verifies it: {}", r.out);
}

/// A renter's job that outlives its first deposit: acme's operator, the
/// renter's agent, tops the lease up from the renter's account while the
/// renter's allowance lasts. When it no longer does, the job, the lease and
/// the renter's balance say why, all through the Pool API, and the lease
/// ends when its funds do, having paid exactly what was deposited.
// Multi-threaded: the CLI runs block the test's thread while blocks are mined.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_renters_long_job_is_topped_up_by_its_agent_while_the_allowance_lasts() {
    let env = testenv();
    let chain_info = env.chain.as_ref().expect("a chain");
    let cfg = chain_info.config.clone();
    // The second funded wallet rents here, so the first test's renter is untouched.
    let key = chain_info.wallets["provider"].clone();
    let renter = Wallet::from_file(&key).unwrap();
    let acme = admin(env.org("acme").unwrap()).await;
    let flags = [
        "--deposit-seconds=10".to_string(),
        "--funds-warning-seconds=6".to_string(),
    ];
    let (pool, served) = Pool::start_serving_pool_api(&env, "apitopup", &Lends::every_org(), "acme", &flags)
        .await
        .unwrap();
    let (url, ca) = (served.url.clone(), served.ca.clone());
    let agent = pool.members["acme"].wallet.to_string();
    let chain = EscrowClient::connect(pool.config.clone(), None, ClientOptions::default()).unwrap();
    let renter_ns = format!(
        "gpupool-renter-{}",
        renter.address().to_string().to_lowercase().trim_start_matches("0x")
    );
    remove_namespace(&acme, &renter_ns).await;
    let cli = |args: &[&str]| {
        let mut all = vec!["--pool-api", url.as_str()];
        all.extend_from_slice(args);
        gpupool(&cfg, &key, &ca, &all)
    };
    wait_for(WAIT, "bravo's A100s in the market", || async {
        let r = cli(&["market", "-o", "json"]);
        r.out.contains("\"bravo\"").then_some(())
    })
    .await
    .unwrap();

    // bravo asks 2 per GPU-hour: one A100 costs `rate` a second. The first
    // deposit covers a minute, each top-up 10 s; the renter allows the
    // agent exactly the deposit and one top-up.
    let rate = 2 * 10u128.pow(18) / 3600;
    let allowed = 70 * rate;
    let r = cli(&["escrow", "deposit", "--amount", "1"]);
    assert_eq!(r.code, Some(0), "{}", r.err);
    let amount = gpupool_crds::price::TokenAmount(allowed).to_string();
    let r = cli(&["escrow", "agent", "--agent", &agent, "--amount", &amount]);
    assert_eq!(r.code, Some(0), "{}", r.err);
    let account_before = chain.account(renter.address()).await.unwrap();
    let bravo_before = pool.balance("bravo").await.unwrap();
    let failures_before = bravo_failures(&acme).await;

    // Anvil mines only on transactions; a live chain's clock moves on its own.
    let blocks = pool.mine_every_second(300);
    let r = cli(&[
        "submit",
        "long",
        "--image",
        "ghcr.io/example/train:1",
        "--model",
        "A100",
        "--max-price",
        "3",
        "--max-duration",
        "10m",
        "--window",
        "1s",
        "--pod-annotation",
        "sim.gpupool.dev/duration=300s",
    ]);
    assert_eq!(r.code, Some(0), "{}", r.err);

    // One top-up gets through; the next one is refused, and the job says why.
    let message = wait_for(
        Duration::from_secs(150),
        "the refused top-up in the job's reason",
        || async {
            let m = job_message(&cli(&["jobs", "-o", "json"]).out, "long")?;
            m.contains("gpupool escrow agent").then_some(m)
        },
    )
    .await
    .unwrap();
    assert!(message.contains("lease long-"), "{message}");
    let r = cli(&["leases", "-o", "json"]);
    assert_eq!(r.code, Some(0), "{}", r.err);
    let leases: serde_json::Value = serde_json::from_str(&r.out).unwrap();
    let lease = leases.as_array().unwrap()[0].clone();
    assert_eq!(lease["job"], "long");
    assert_eq!(lease["providerOrg"], "bravo");
    assert_eq!(base_units(lease["deposited"].as_str().unwrap()), allowed, "{lease}");
    assert_eq!(base_units(lease["topUpTo"].as_str().unwrap()), (600 + 60) * rate);
    assert!(
        lease["message"]
            .as_str()
            .unwrap()
            .contains("lets this agent commit 0 more tokens"),
        "{lease}"
    );
    // The balance through the member: nothing left to commit, one lease open.
    let r = cli(&["escrow", "balance", "-o", "json"]);
    assert_eq!(r.code, Some(0), "{}", r.err);
    let b: serde_json::Value = serde_json::from_str(&r.out).unwrap();
    assert_eq!(b["agentAllowance"], "0", "{b}");
    assert_eq!(b["openLeases"], 1, "{b}");
    assert_eq!(base_units(b["account"].as_str().unwrap()), account_before - allowed);
    assert!(base_units(b["inLeases"].as_str().unwrap()) <= allowed, "{b}");

    // Followed to its end: the lease runs dry and closes as InsufficientFunds.
    let name = lease["name"].as_str().unwrap().to_string();
    let r = cli(&["leases", "--watch", &name, "--timeout", "120s"]);
    blocks.abort();
    assert_eq!(r.code, Some(0), "stdout {}\nstderr {}", r.out, r.err);
    assert!(r.out.contains("Closed (InsufficientFunds)"), "{}", r.out);
    // All that was deposited went to bravo: paid for 70 s, nothing lost.
    let paid_to_bravo = wait_for(WAIT, "bravo paid", || async {
        let now = pool.balance("bravo").await.ok()?;
        (now > bravo_before).then_some(now - bravo_before)
    })
    .await
    .unwrap();
    assert_eq!(paid_to_bravo, allowed);
    assert_eq!(chain.account(renter.address()).await.unwrap(), account_before - allowed);
    // The job failed for the renter's funds: not re-auctioned, and not
    // counted against bravo, which did nothing wrong.
    let job = wait_for(WAIT, "the job failed for its funds", || async {
        let r = cli(&["jobs", "-o", "json"]);
        let v: serde_json::Value = serde_json::from_str(&r.out).ok()?;
        let job = v.as_array()?.iter().find(|j| j["name"] == "long")?.clone();
        (job["phase"] == "Failed").then_some(job)
    })
    .await
    .unwrap();
    let why = job["message"].as_str().unwrap();
    assert!(why.contains("ran out of funds before the workload ended"), "{why}");
    assert!(why.contains("commit 0 more tokens"), "{why}");
    assert_eq!(
        bravo_failures(&acme).await,
        failures_before,
        "bravo is not blamed for the renter's funds"
    );

    remove_namespace(&acme, &renter_ns).await;
}

/// Leases bravo failed, as acme's PoolPeer for it records them.
async fn bravo_failures(acme: &kube::Client) -> u64 {
    Api::<gpupool_crds::PoolPeer>::all(acme.clone())
        .list(&Default::default())
        .await
        .unwrap()
        .items
        .into_iter()
        .find(|p| p.spec.org == "bravo")
        .and_then(|p| p.status)
        .map_or(0, |s| s.reputation.failed)
}

//! Market benchmarks that need no cluster: the bid engine on one core, a
//! Pool API request's authentication on one core, and a simulated pool of
//! real libp2p swarms in one process (order → every eligible bid). Writes JSON figures `{name, figure, unit, conditions}`.
//!
//! `cargo run --release -p gpupool-operator --example bench_market -- --peers 200 --orders 40 --out target/bench/market.json`

use std::collections::{BTreeMap, HashMap};
use std::hint::black_box;
use std::sync::Arc;
use std::time::{Duration, Instant};

use gpupool_crds::price::TokenAmount;
use gpupool_operator::market::bidengine::{Ask, Held, Supply, evaluate};
use gpupool_operator::market::policy::{PriceRule, ProviderPolicy};
use gpupool_operator::p2p::envelope::{Opener, seal};
use gpupool_operator::p2p::swarm::{self, Inbound, P2p, SwarmConfig, Topic};
use gpupool_proto::peer::v1::envelope::Body;
use gpupool_proto::peer::v1::{Bid, GpuRequirements, Order};
use libp2p::gossipsub::MessageAcceptance;
use libp2p::identity::Keypair;
use tokio::sync::Mutex;

fn arg(name: &str, default: u64) -> u64 {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn out_path() -> String {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == "--out")
        .and_then(|i| args.get(i + 1).cloned())
        .unwrap_or_else(|| "target/bench/market.json".into())
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

const PRODUCTS: [&str; 6] = [
    "NVIDIA H100 80GB HBM3",
    "NVIDIA A100-SXM4-40GB",
    "NVIDIA A100-SXM4-80GB",
    "NVIDIA L40S",
    "NVIDIA B200",
    "NVIDIA RTX 6000 Ada Generation",
];

fn policy() -> ProviderPolicy {
    let prices = [
        ("H100", "2.5"),
        ("A100 80GB", "1.9"),
        ("A100", "1.6"),
        ("L40S", "1.1"),
        ("B200", "4"),
    ];
    ProviderPolicy {
        prices: prices
            .iter()
            .map(|(m, p)| PriceRule {
                model: m.to_string(),
                price: p.parse().unwrap_or_default(),
            })
            .collect(),
        max_lent_gpus: 64,
        max_held_gpus_per_renter: 32,
        // The funds check is chain I/O after `evaluate`; the bench measures the engine.
        require_renter_funds: false,
        allowed_orgs: vec![],
        denied_orgs: vec!["evil".into()],
    }
}

fn supply() -> Vec<Supply> {
    PRODUCTS
        .iter()
        .enumerate()
        .map(|(i, p)| Supply {
            product: p.to_string(),
            memory_mib: 40_000 + 10_000 * i as u64,
            free: 16,
            max_per_node: 8,
        })
        .collect()
}

/// Pure evaluations per second on this thread.
fn bid_engine(n: u64) -> serde_json::Value {
    let models = [
        vec![],
        vec!["H100".to_string()],
        vec!["A100".into(), "L40S".into()],
        vec!["B200".into()],
        vec!["MI300X".into()],
    ];
    let asks: Vec<Ask> = (0..1024u64)
        .map(|i| Ask {
            renter_org: format!("org{}", i % 7),
            count: (i % 8 + 1) as u32,
            models: models[(i % models.len() as u64) as usize].clone(),
            min_memory_mib: (i % 3) * 30_000,
            max_price: TokenAmount(((i % 5) as u128 + 1) * 600_000_000_000_000_000),
            allowed_orgs: vec![],
            denied_orgs: if i % 11 == 0 { vec!["me".into()] } else { vec![] },
        })
        .collect();
    let policy = policy();
    let supply = supply();
    let mut bids = 0u64;
    let start = Instant::now();
    for i in 0..n {
        let ask = &asks[(i % 1024) as usize];
        if black_box(evaluate(
            "me",
            &policy,
            &supply,
            black_box(Held { lent: 3, by_renter: 1 }),
            ask,
        ))
        .is_ok()
        {
            bids += 1;
        }
    }
    let secs = start.elapsed().as_secs_f64();
    serde_json::json!({
        "name": "bid_engine_evaluations_per_second",
        "figure": n as f64 / secs,
        "unit": "evaluations/s",
        "conditions": {"evaluations": n, "bids": bids, "products": PRODUCTS.len(), "threads": 1,
                       "target": ">= 50000", "build": if cfg!(debug_assertions) {"debug"} else {"release"}}
    })
}

/// Opening a signed order, evaluating it and sealing the bid: what a provider
/// does per order, signature checks included.
/// What authenticating one Pool API request costs the operator: an EIP-191
/// signature recovery over a typical submission, and the replay memory. A
/// flood of forged requests costs this much each before it is refused.
fn pool_api_auth(n: u64) -> serde_json::Value {
    use gpupool_chain::Wallet;
    use gpupool_chain::request_auth::verify;
    use gpupool_operator::pool_api::replay::ReplayGuard;
    use prost::Message;
    // anvil's well-known development key; public, never used outside local chains.
    let wallet = Wallet::from_hex("0x59c6995e998f97a5a0044966f0945389dc9e86dae88c7a8412f4603b6b78690d")
        .expect("a valid development key");
    let body = gpupool_proto::pool::v1::SubmitRequest {
        name: "eval".into(),
        spec_json: r#"{"template":{"spec":{"containers":[{"name":"main","image":"ghcr.io/example/eval:1","command":["python","eval.py"]}],"restartPolicy":"Never"}},"gpus":{"count":2,"models":["A100"]},"maxPricePerGpuHour":"3","bidding":{"window":"2s","selection":"Auto"}}"#.into(),
    }
    .encode_to_vec();
    let path = "/gpupool.pool.v1.Pool/Submit";
    let at = now_ms();
    let signed: Vec<_> = (0..n)
        .map(|i| {
            let mut nonce = [0u8; 16];
            nonce[..8].copy_from_slice(&i.to_le_bytes());
            wallet.sign_request(path, &body, at, nonce)
        })
        .collect();
    let mut guard = ReplayGuard::new(60_000, usize::try_from(n).unwrap_or(usize::MAX));
    let start = Instant::now();
    for h in &signed {
        let v = verify(black_box(h), path, &body).expect("a request we signed verifies");
        guard
            .admit(v.wallet, &v.nonce, v.timestamp_ms, at)
            .expect("a fresh nonce");
    }
    let secs = start.elapsed().as_secs_f64();
    serde_json::json!({
        "name": "pool_api_signed_requests_verified_per_second",
        "figure": n as f64 / secs,
        "unit": "requests/s",
        "conditions": {"requests": n, "threads": 1, "body_bytes": body.len(),
            "what": "EIP-191 signature recovery (k256) over method, time, nonce and keccak of the request, plus the replay memory"}
    })
}

fn full_path(n: u64) -> serde_json::Value {
    let renter = Keypair::generate_ed25519();
    let me = Keypair::generate_ed25519();
    let policy = policy();
    let supply = supply();
    let orders: Vec<Vec<u8>> = (0..n)
        .map(|i| {
            seal(
                &renter,
                Body::Order(Order {
                    order_id: format!("o-{i}"),
                    renter_org: "acme".into(),
                    gpus: Some(GpuRequirements {
                        count: 4,
                        models: vec!["A100".into()],
                        min_memory_mib: 0,
                        interconnect: "Any".into(),
                    }),
                    max_price_per_gpu_hour: "3".into(),
                    max_duration_seconds: 3600,
                    allowed_orgs: vec![],
                    denied_orgs: vec![],
                    payer_wallet: String::new(),
                }),
                now_ms(),
                600_000,
                BTreeMap::new(),
            )
        })
        .collect();
    let mut opener = Opener::new(900_000, 1_000_000);
    let start = Instant::now();
    let mut sealed = 0;
    for bytes in &orders {
        let Ok(o) = opener.open(bytes, None, now_ms()) else {
            continue;
        };
        let Body::Order(order) = o.body else { continue };
        let ask = Ask {
            renter_org: order.renter_org.clone(),
            count: 4,
            models: vec!["A100".into()],
            min_memory_mib: 0,
            max_price: TokenAmount(3_000_000_000_000_000_000),
            allowed_orgs: vec![],
            denied_orgs: vec![],
        };
        if let Ok(offer) = evaluate("me", &policy, &supply, Held::default(), &ask) {
            let bid = seal(
                &me,
                Body::Bid(Bid {
                    order_id: order.order_id,
                    bid_id: "b".into(),
                    provider_org: "me".into(),
                    gpu_product: offer.product,
                    gpu_count: 4,
                    price_per_gpu_hour: offer.price.to_string(),
                    bid_expires_at_unix_ms: now_ms() + 60_000,
                }),
                now_ms(),
                60_000,
                BTreeMap::new(),
            );
            sealed += black_box(bid.len()).min(1);
        }
    }
    let secs = start.elapsed().as_secs_f64();
    serde_json::json!({
        "name": "order_open_evaluate_seal_per_second",
        "figure": n as f64 / secs,
        "unit": "orders/s",
        "conditions": {"orders": n, "bids": sealed, "threads": 1, "note": "ed25519 verify of the order + sign of the bid dominate"}
    })
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((p / 100.0) * (sorted.len() - 1) as f64).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

/// `peers` real swarms on loopback in this process: one renter, the rest
/// providers, each knowing the renter and three random earlier peers.
async fn fan_out(peers: usize, orders: usize) -> anyhow::Result<Vec<serde_json::Value>> {
    let listen: libp2p::Multiaddr = "/ip4/127.0.0.1/tcp/0".parse()?;
    let renter_key = Keypair::generate_ed25519();
    let renter_id = renter_key.public().to_peer_id();
    let (renter, mut renter_in) = swarm::start(
        renter_key.clone(),
        SwarmConfig {
            listen: vec![listen.clone()],
            ..Default::default()
        },
    )
    .await?;
    let renter_addr = renter
        .info()
        .await
        .listen
        .first()
        .cloned()
        .ok_or_else(|| anyhow::anyhow!("no listen addr"))?;
    let mut addrs = vec![renter_addr.clone()];
    let mut providers: Vec<P2p> = Vec::new();
    let eligible_every = 4; // every 4th provider has no matching GPUs
    let mut eligible = 0;
    // Order id → when each provider had it open (gossip delivery, before bidding).
    let delivered: Arc<Mutex<HashMap<String, Vec<Instant>>>> = Arc::default();
    let mut seed = 0x9e37_79b9_u64;
    for i in 1..peers {
        let mut boot = vec![renter_addr.clone()];
        for _ in 0..3 {
            seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            boot.push(addrs[(seed >> 33) as usize % addrs.len()].clone());
        }
        let key = Keypair::generate_ed25519();
        let (p2p, mut inbound) = swarm::start(
            key.clone(),
            SwarmConfig {
                listen: vec![listen.clone()],
                bootstrap: boot,
                discovery: false,
                ..Default::default()
            },
        )
        .await?;
        p2p.add_peer(renter_id, renter_addr.clone()).await;
        if let Some(a) = p2p.info().await.listen.first() {
            addrs.push(a.clone());
        }
        let has_gpus = i % eligible_every != 0;
        if has_gpus {
            eligible += 1;
        }
        let supply = if has_gpus { supply() } else { vec![] };
        let policy = policy();
        let me = p2p.clone();
        let delivered = delivered.clone();
        tokio::spawn(async move {
            let mut opener = Opener::new(900_000, 100_000);
            while let Some(msg) = inbound.recv().await {
                let Inbound::Gossip {
                    author,
                    propagation_source,
                    id,
                    bytes,
                    ..
                } = msg
                else {
                    continue;
                };
                let opened = opener.open(&bytes, author, now_ms());
                let accept = if opened.is_ok() {
                    MessageAcceptance::Accept
                } else {
                    MessageAcceptance::Reject
                };
                me.validated(id, propagation_source, accept).await;
                let Ok(o) = opened else { continue };
                let Body::Order(order) = o.body else { continue };
                delivered
                    .lock()
                    .await
                    .entry(order.order_id.clone())
                    .or_default()
                    .push(Instant::now());
                let gpus = order.gpus.clone().unwrap_or_default();
                let ask = Ask {
                    renter_org: order.renter_org.clone(),
                    count: gpus.count,
                    models: gpus.models,
                    min_memory_mib: gpus.min_memory_mib,
                    max_price: order.max_price_per_gpu_hour.parse().unwrap_or_default(),
                    allowed_orgs: vec![],
                    denied_orgs: vec![],
                };
                if let Ok(offer) = evaluate(&format!("p{i}"), &policy, &supply, Held::default(), &ask) {
                    let bid = seal(
                        &key,
                        Body::Bid(Bid {
                            order_id: order.order_id,
                            bid_id: format!("p{i}"),
                            provider_org: format!("p{i}"),
                            gpu_product: offer.product,
                            gpu_count: offer.count,
                            price_per_gpu_hour: offer.price.to_string(),
                            bid_expires_at_unix_ms: now_ms() + 60_000,
                        }),
                        now_ms(),
                        60_000,
                        BTreeMap::new(),
                    );
                    let _ = me.send(o.sender, bid).await;
                }
            }
        });
        providers.push(p2p);
    }
    // Bids land here: order id → arrival times.
    let arrivals: Arc<Mutex<HashMap<String, Vec<Instant>>>> = Arc::default();
    let sink = arrivals.clone();
    let renter_handle = renter.clone();
    tokio::spawn(async move {
        let mut opener = Opener::new(900_000, 1_000_000);
        while let Some(msg) = renter_in.recv().await {
            match msg {
                Inbound::Direct { peer, bytes } => {
                    if let Ok(o) = opener.open(&bytes, Some(peer), now_ms())
                        && let Body::Bid(b) = o.body
                    {
                        sink.lock().await.entry(b.order_id).or_default().push(Instant::now());
                    }
                }
                Inbound::Gossip {
                    propagation_source, id, ..
                } => {
                    renter_handle
                        .validated(id, propagation_source, MessageAcceptance::Accept)
                        .await
                }
                _ => {}
            }
        }
    });
    // Let the mesh form: every provider subscribed and reachable.
    let settle = Instant::now();
    tokio::time::sleep(Duration::from_secs(8)).await;
    let connected = renter.info().await.connected.len();
    let mut latencies = Vec::new();
    let mut firsts = Vec::new();
    let mut deliveries = Vec::new();
    let mut complete = 0;
    let mut bids_seen = 0;
    for k in 0..orders {
        let order_id = format!("bench-{k}");
        let body = Body::Order(Order {
            order_id: order_id.clone(),
            renter_org: "renter".into(),
            gpus: Some(GpuRequirements {
                count: 4,
                models: vec!["A100".into(), "L40S".into()],
                min_memory_mib: 0,
                interconnect: "Any".into(),
            }),
            max_price_per_gpu_hour: "3".into(),
            max_duration_seconds: 3600,
            allowed_orgs: vec![],
            denied_orgs: vec![],
            payer_wallet: String::new(),
        });
        let t0 = Instant::now();
        renter
            .publish(
                Topic::Orders,
                seal(&renter_key, body, now_ms(), 60_000, BTreeMap::new()),
            )
            .await?;
        let deadline = t0 + Duration::from_secs(5);
        loop {
            let n = arrivals.lock().await.get(&order_id).map_or(0, Vec::len);
            if n >= eligible || Instant::now() > deadline {
                break;
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        let got = arrivals.lock().await.get(&order_id).cloned().unwrap_or_default();
        if std::env::var_os("BENCH_TRACE").is_some()
            && let Some(d) = delivered.lock().await.get(&order_id)
        {
            let mut d: Vec<f64> = d.iter().map(|t| t.duration_since(t0).as_secs_f64() * 1000.0).collect();
            d.sort_by(|a, b| a.total_cmp(b));
            let mut g: Vec<f64> = got
                .iter()
                .map(|t| t.duration_since(t0).as_secs_f64() * 1000.0)
                .collect();
            g.sort_by(|a, b| a.total_cmp(b));
            eprintln!(
                "{order_id}: delivered n={} first={:.1} p50={:.1} last={:.1}; bids n={} first={:.1} p50={:.1} last={:.1}",
                d.len(),
                d[0],
                d[d.len() / 2],
                d[d.len() - 1],
                g.len(),
                g.first().unwrap_or(&0.0),
                g.get(g.len() / 2).unwrap_or(&0.0),
                g.last().unwrap_or(&0.0)
            );
        }
        if let Some(last) = delivered
            .lock()
            .await
            .get(&order_id)
            .and_then(|d| d.iter().max().copied())
        {
            deliveries.push(last.duration_since(t0).as_secs_f64() * 1000.0);
        }
        bids_seen += got.len();
        if let Some(first) = got.iter().min() {
            firsts.push(first.duration_since(t0).as_secs_f64() * 1000.0);
        }
        if got.len() >= eligible {
            complete += 1;
            let last = got.iter().max().copied().unwrap_or(t0);
            latencies.push(last.duration_since(t0).as_secs_f64() * 1000.0);
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    latencies.sort_by(|a, b| a.total_cmp(b));
    firsts.sort_by(|a, b| a.total_cmp(b));
    deliveries.sort_by(|a, b| a.total_cmp(b));
    let cond = serde_json::json!({
        "peers": peers, "eligible_providers": eligible, "orders": orders, "orders_with_every_bid": complete,
        "bids_received": bids_seen, "renter_connections": connected, "mesh_settle_s": settle.elapsed().as_secs_f64(),
        "transport": "TCP+noise+yamux on 127.0.0.1, gossipsub strict signing, request-response bids",
        "target_p99_ms": 300
    });
    drop(providers);
    Ok(vec![
        serde_json::json!({"name": "pool_fanout_order_to_all_bids_p50", "figure": percentile(&latencies, 50.0), "unit": "ms", "conditions": cond}),
        serde_json::json!({"name": "pool_fanout_order_to_all_bids_p99", "figure": percentile(&latencies, 99.0), "unit": "ms", "conditions": cond}),
        serde_json::json!({"name": "pool_fanout_order_to_first_bid_p50", "figure": percentile(&firsts, 50.0), "unit": "ms", "conditions": cond}),
        serde_json::json!({"name": "pool_fanout_order_to_every_provider_p99", "figure": percentile(&deliveries, 99.0), "unit": "ms", "conditions": cond}),
    ])
}

#[tokio::main(flavor = "multi_thread")]
async fn main() -> anyhow::Result<()> {
    // Opened first: two hundred swarms in one process use many descriptors.
    let path = out_path();
    if let Some(dir) = std::path::Path::new(&path).parent() {
        std::fs::create_dir_all(dir)?;
    }
    let mut out = std::fs::File::create(&path)?;
    let mut figures = vec![
        bid_engine(arg("--evaluations", 2_000_000)),
        full_path(arg("--signed", 20_000)),
        pool_api_auth(arg("--pool-api-requests", 20_000)),
    ];
    for f in &figures {
        println!("{f}");
    }
    let fan = fan_out(arg("--peers", 200) as usize, arg("--orders", 40) as usize).await?;
    for f in &fan {
        println!("{f}");
    }
    figures.extend(fan);
    std::io::Write::write_all(&mut out, serde_json::to_string_pretty(&figures)?.as_bytes())?;
    println!("wrote {path}");
    Ok(())
}

//! Hole-punching benchmark behind real NATs (`gpupool_e2e::nat`): for each
//! round, a fresh relay and two fresh members behind their NATs that listen
//! through it; a, told b's circuit address, sends to b over a circuit, and
//! both punch.
//! Measured from a's first send: when the message is taken (through the
//! relay), and when a's only connections to b are direct. Over TCP and QUIC.
//! The veths add no delay, so the figures are the protocol's own work, not a
//! WAN's round trips. Needs root and nft. JSON in
//! target/bench/hole_punch.json; `BENCH_TRACE=1` prints each round and each
//! of a's sends, `RUST_LOG` the swarms' logs.

use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::Parser;
use gpupool_e2e::bench::{Figure, percentile, write};
use gpupool_e2e::nat::{Nat, Nets, Transport, behind_nat, direct_only, listening_through_relay, relay};
use serde_json::json;

#[derive(Parser)]
struct Args {
    /// Pairs of members punched, per transport.
    #[arg(long, default_value_t = 20)]
    rounds: u16,
    #[arg(long, default_value = "target/bench/hole_punch.json")]
    out: std::path::PathBuf,
}

const LIMIT: Duration = Duration::from_secs(30);

struct Round {
    relayed_ms: f64,
    direct_ms: Option<f64>,
}

async fn round(nets: &Nets, t: Transport, port: u16, relay_addr: &libp2p::Multiaddr) -> anyhow::Result<Round> {
    let a = behind_nat(nets, "a", t, port, relay_addr)?;
    let b = behind_nat(nets, "b", t, port, relay_addr)?;
    if !listening_through_relay(&a, LIMIT).await || !listening_through_relay(&b, LIMIT).await {
        bail!("a member did not get a reservation at the relay");
    }
    let b_id = b.p2p.local_peer_id();
    // a knows b's circuit, as from an identity record: the figures leave
    // out how long finding b takes.
    let circuit = b
        .p2p
        .info()
        .await
        .listen
        .into_iter()
        .find(gpupool_operator::p2p::swarm::is_circuit)
        .context("b's circuit address")?;
    a.p2p.add_peer(b_id, circuit).await;
    let start = Instant::now();
    tokio::time::timeout(LIMIT, async {
        loop {
            let sent = a.p2p.send(b_id, b"order".to_vec()).await;
            if std::env::var_os("BENCH_TRACE").is_some() {
                eprintln!("send after {:?}: {sent:?}", start.elapsed());
            }
            if sent.is_ok() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await
    .context("a never reached b through the relay")?;
    let relayed_ms = start.elapsed().as_secs_f64() * 1e3;
    let direct = direct_only(&a, b_id, LIMIT, Duration::from_millis(1)).await;
    let direct_ms = direct.map(|_| start.elapsed().as_secs_f64() * 1e3);
    Ok(Round { relayed_ms, direct_ms })
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    // RUST_LOG=gpupool_operator=debug,libp2p_dcutr=debug shows each punch.
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_writer(std::io::stderr)
        .init();
    let mut figures = vec![];
    for (t, name) in [(Transport::Tcp, "tcp"), (Transport::Quic, "quic")] {
        let nets = Nets::build(&format!("b{name}"), Nat::KeepsPorts)?;
        let (mut relayed, mut direct, mut failed) = (vec![], vec![], 0u32);
        for r in 0..args.rounds {
            // A new relay each round: one kept across rounds has every past
            // member in its DHT, each new member dials up to 20 of them
            // through it, and the relay's per-IP circuit limit (the members
            // of a side share their NAT's address) then refused a's circuit
            // to b from about the 15th round on. New ports each round: the
            // routers' conntrack still holds the last round's mappings.
            let (_relay, relay_addr) = relay(&nets, t, 4001 + r)?;
            let got = round(&nets, t, 5000 + r, &relay_addr)
                .await
                .with_context(|| format!("{name}, round {} of {}", r + 1, args.rounds))?;
            if std::env::var_os("BENCH_TRACE").is_some() {
                eprintln!(
                    "{name} round {r}: relayed {:.1} ms, direct {:?} ms",
                    got.relayed_ms, got.direct_ms
                );
            }
            relayed.push(got.relayed_ms);
            match got.direct_ms {
                Some(ms) => direct.push(ms),
                None => failed += 1,
            }
        }
        let conditions = json!({
            "transport": name,
            "rounds": args.rounds,
            "punched": direct.len(),
            "stayed_relayed": failed,
            "nat": "Linux masquerade (port-preserving) + drop of unasked flows, both members",
            "network": "network namespaces joined by veth, no delay added",
            "measured": "from a's first send to b, a knowing b's circuit address",
        });
        for (what, v) in [
            ("first_message_through_relay", &mut relayed),
            ("direct_connection", &mut direct),
        ] {
            for p in [50.0, 99.0] {
                figures.push(Figure::new(
                    &format!("hole_punch_{name}_{what}_p{p:.0}"),
                    percentile(v, p),
                    "ms",
                    conditions.clone(),
                ));
            }
        }
    }
    write(&args.out, &figures)
}

//! Property tests for message decoding and validation: thousands of random
//! and mutated inputs, seeded so a failure replays. Run with
//! `GPUPOOL_PROPERTY_SEED=<n>` to try another seed.

use std::collections::{BTreeMap, HashSet};

use gpupool_proto::peer::v1::envelope::Body;
use gpupool_proto::peer::v1::{Bid, GpuRequirements, Heartbeat, IdentityRecord, LeaseStatus, Order};
use libp2p::identity::Keypair;
use rand::rngs::StdRng;
use rand::{Rng, RngExt, SeedableRng};

use super::body::check_body;
use super::envelope::{DropReason, Opener, seal};

const NOW: u64 = 1_800_000_000_000;

fn seed() -> u64 {
    std::env::var("GPUPOOL_PROPERTY_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0x6770_7570)
}

/// Mostly plausible identifiers, sometimes hostile text.
fn random_string(rng: &mut StdRng, max: usize) -> String {
    const CLEAN: &[u8] = b"abcXYZ019-._";
    const DIRTY: &[u8] = b"abcXYZ019-._/ :0x\xc3\xa9";
    let alphabet = if rng.random_bool(0.8) { CLEAN } else { DIRTY };
    let n = rng.random_range(0..=max);
    let bytes: Vec<u8> = (0..n).map(|_| alphabet[rng.random_range(0..alphabet.len())]).collect();
    String::from_utf8_lossy(&bytes).into_owned()
}

fn random_price(rng: &mut StdRng) -> String {
    match rng.random_range(0..4) {
        0 => format!("{}", rng.random_range(0..100u32)),
        1 => format!("{}.{}", rng.random_range(0..10u32), rng.random_range(0..1000u32)),
        2 => "-1".into(),
        _ => random_string(rng, 40),
    }
}

fn random_body(rng: &mut StdRng) -> Body {
    match rng.random_range(0..5) {
        0 => Body::Identity(IdentityRecord {
            org: random_string(rng, 66),
            wallet: if rng.random_bool(0.5) {
                format!("0x{}", "a".repeat(40))
            } else {
                random_string(rng, 44)
            },
            addresses: (0..rng.random_range(0..20)).map(|_| random_string(rng, 300)).collect(),
            wallet_proof: (0..rng.random_range(60..70)).map(|_| rng.random()).collect(),
        }),
        1 => Body::Order(Order {
            order_id: random_string(rng, 140),
            renter_org: random_string(rng, 70),
            gpus: rng.random_bool(0.9).then(|| GpuRequirements {
                count: rng.random_range(0..20),
                models: (0..rng.random_range(0..20)).map(|_| random_string(rng, 140)).collect(),
                min_memory_mib: rng.random(),
                interconnect: random_string(rng, 20),
            }),
            max_price_per_gpu_hour: random_price(rng),
            max_duration_seconds: rng.random_range(0..40_000_000),
            allowed_orgs: (0..rng.random_range(0..3)).map(|_| random_string(rng, 70)).collect(),
            denied_orgs: vec![],
            payer_wallet: if rng.random_bool(0.5) {
                String::new()
            } else {
                random_string(rng, 44)
            },
        }),
        2 => Body::Bid(Bid {
            order_id: random_string(rng, 140),
            bid_id: random_string(rng, 140),
            provider_org: random_string(rng, 70),
            gpu_product: random_string(rng, 140),
            gpu_count: rng.random_range(0..20),
            price_per_gpu_hour: random_price(rng),
            bid_expires_at_unix_ms: rng.random(),
        }),
        3 => Body::LeaseStatus(LeaseStatus {
            lease_id: if rng.random_bool(0.5) {
                format!("0x{}", "b".repeat(64))
            } else {
                random_string(rng, 70)
            },
            phase: random_string(rng, 40),
            pod_state: random_string(rng, 80),
            exit_code: rng.random_bool(0.5).then(|| rng.random()),
            message: random_string(rng, 1100),
        }),
        _ => Body::Heartbeat(Heartbeat {
            lease_id: random_string(rng, 70),
        }),
    }
}

/// Random bytes never open, and never panic.
#[test]
fn random_bytes_are_always_dropped() {
    let mut rng = StdRng::seed_from_u64(seed());
    let mut opener = Opener::new(60_000, 10_000);
    let mut reasons: BTreeMap<DropReason, u32> = BTreeMap::new();
    for _ in 0..5_000 {
        let len = rng.random_range(0..2048);
        let mut bytes = vec![0u8; len];
        rng.fill_bytes(&mut bytes);
        match opener.open(&bytes, None, NOW) {
            Ok(o) => panic!("random bytes opened as {o:?}"),
            Err(r) => *reasons.entry(r).or_default() += 1,
        }
    }
    assert!(reasons.contains_key(&DropReason::Malformed), "{reasons:?}");
}

/// Any mutation of a sealed message either fails a check or opens to the very
/// same sender and body (protobuf skips unknown trailing fields); and each
/// nonce opens at most once, so a mutated copy is never a second message.
#[test]
fn mutated_messages_never_open_as_something_else() {
    let mut rng = StdRng::seed_from_u64(seed() ^ 1);
    let key = Keypair::generate_ed25519();
    let me = key.public().to_peer_id();
    let mut opener = Opener::new(60_000, 100_000);
    let mut opened_nonces = 0;
    let mut dropped = 0;
    for _ in 0..3_000 {
        let body = random_body(&mut rng);
        let good = seal(&key, body.clone(), NOW, 30_000, BTreeMap::new());
        let mut bad = good.clone();
        match rng.random_range(0..4) {
            0 => {
                let i = rng.random_range(0..bad.len());
                bad[i] ^= 1 << rng.random_range(0..8);
            }
            1 => bad.truncate(rng.random_range(0..bad.len())),
            2 => {
                let mut tail = vec![0u8; rng.random_range(1..64)];
                rng.fill_bytes(&mut tail);
                bad.extend(tail);
            }
            _ => {
                let i = rng.random_range(0..bad.len());
                let j = rng.random_range(0..bad.len());
                bad.swap(i, j);
            }
        }
        let valid_body = check_body(&body).is_ok();
        for bytes in [&bad, &good] {
            match opener.open(bytes, Some(me), NOW) {
                Ok(o) => {
                    assert!(valid_body, "a body that breaks its limits opened: {body:?}");
                    assert_eq!((o.sender, &o.body), (me, &body), "a mutation opened as another message");
                    opened_nonces += 1;
                }
                Err(_) => dropped += 1,
            }
        }
    }
    assert!(opened_nonces <= 3_000, "one opening per nonce at most");
    assert!(dropped >= 3_000, "every pair drops at least once (mutation or replay)");
}

/// Signed messages with random contents: the body checks decide, without panics,
/// and a replay of any opened message is refused.
#[test]
fn signed_random_bodies_are_judged_by_their_limits() {
    let mut rng = StdRng::seed_from_u64(seed() ^ 2);
    let key = Keypair::generate_ed25519();
    let mut opener = Opener::new(60_000, 100_000);
    let mut seen_ok = HashSet::new();
    let (mut ok, mut malformed) = (0, 0);
    for i in 0..4_000u32 {
        let body = random_body(&mut rng);
        let bytes = seal(&key, body.clone(), NOW, 10_000, BTreeMap::new());
        match opener.open(&bytes, None, NOW) {
            Ok(_) => {
                assert!(check_body(&body).is_ok());
                ok += 1;
                seen_ok.insert(i);
                assert_eq!(opener.open(&bytes, None, NOW + 1), Err(DropReason::Replayed));
            }
            Err(DropReason::Malformed) | Err(DropReason::Oversized) => {
                assert!(check_body(&body).is_err() || bytes.len() > gpupool_proto::MAX_MESSAGE_BYTES);
                malformed += 1;
            }
            Err(other) => panic!("unexpected drop {other:?} for {body:?}"),
        }
    }
    assert!(
        ok > 100 && malformed > 100,
        "both outcomes exercised: ok {ok}, malformed {malformed}"
    );
}

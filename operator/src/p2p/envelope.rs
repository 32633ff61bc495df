//! Sealing and opening peer messages. Pure: no sockets, no clock of its own.
//!
//! Everything a peer says travels as a `SignedEnvelope`. Opening one checks,
//! in this order and before anything is trusted: size, framing, signature,
//! that the signer is the claimed sender (and the peer the bytes came from),
//! version, expiry, nonce replay and the body's own limits. The first failure
//! is the drop reason that is counted and scored.

use std::collections::{BTreeMap, HashMap};

use gpupool_proto::peer::v1::{Envelope, SignedEnvelope, envelope::Body};
use gpupool_proto::{MAX_MESSAGE_BYTES, PROTOCOL_VERSION};
use libp2p::PeerId;
use libp2p::identity::{Keypair, PublicKey};
use prost::Message;

use super::body::check_body;

/// Bytes of randomness per message; enough that two honest messages never share one.
pub const NONCE_BYTES: usize = 16;

/// Why a message was dropped. `as_str` is the metric label.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum DropReason {
    /// Larger than the protocol allows.
    Oversized,
    /// Not a well-formed envelope or body.
    Malformed,
    /// No signature or no key.
    Unsigned,
    /// The signature does not verify against the key it carries.
    BadSignature,
    /// Signed by someone other than its claimed sender, or relayed under another peer's name.
    WrongSender,
    /// A protocol version this build does not speak.
    UnsupportedVersion,
    /// Past its expiry, or claiming an expiry too far ahead to be honest.
    Expired,
    /// The same sender and nonce were seen before.
    Replayed,
    /// From an organisation this cluster's policy denies.
    DeniedOrg,
    /// A bid (or result) for an order the sender never saw, or one already closed.
    UnknownOrder,
    /// Claims an organisation already bound to another peer id.
    Impersonation,
    /// The sender is banned for its score.
    Banned,
    /// Too many messages in flight to remember their nonces.
    Overloaded,
    /// The sender has more messages in flight than its share of the replay
    /// guard: a valid member flooding the pool.
    Flooding,
    /// For an order or lease this cluster closed a moment ago: honest peers
    /// race with closes, so this costs no score.
    Late,
}

impl DropReason {
    pub const ALL: [DropReason; 15] = [
        Self::Oversized,
        Self::Malformed,
        Self::Unsigned,
        Self::BadSignature,
        Self::WrongSender,
        Self::UnsupportedVersion,
        Self::Expired,
        Self::Replayed,
        Self::DeniedOrg,
        Self::UnknownOrder,
        Self::Impersonation,
        Self::Banned,
        Self::Overloaded,
        Self::Flooding,
        Self::Late,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Oversized => "oversized",
            Self::Malformed => "malformed",
            Self::Unsigned => "unsigned",
            Self::BadSignature => "bad_signature",
            Self::WrongSender => "wrong_sender",
            Self::UnsupportedVersion => "unsupported_version",
            Self::Expired => "expired",
            Self::Replayed => "replayed",
            Self::DeniedOrg => "denied_org",
            Self::UnknownOrder => "unknown_order",
            Self::Impersonation => "impersonation",
            Self::Banned => "banned",
            Self::Overloaded => "overloaded",
            Self::Flooding => "flooding",
            Self::Late => "late",
        }
    }

    /// How much a drop lowers the sender's score. Honest peers can send a
    /// stale message (clock skew, a restart); they cannot forge a signature.
    /// A full replay guard is this member's limit, not the sender's doing:
    /// only many senders at their share fill it, and each of them is scored
    /// for `Flooding`. Scoring it too would ban honest members one by one
    /// while a flood lasted.
    pub fn penalty(self) -> f64 {
        match self {
            Self::Late | Self::Overloaded => 0.0,
            Self::Expired | Self::UnknownOrder => 1.0,
            Self::Replayed | Self::UnsupportedVersion | Self::Banned | Self::Flooding => 2.0,
            Self::Oversized | Self::Malformed | Self::DeniedOrg => 5.0,
            Self::Unsigned | Self::BadSignature | Self::WrongSender | Self::Impersonation => 20.0,
        }
    }
}

impl std::fmt::Display for DropReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A message that passed every check.
#[derive(Clone, Debug, PartialEq)]
pub struct Opened {
    pub sender: PeerId,
    pub expires_at_ms: u64,
    pub trace_context: BTreeMap<String, String>,
    pub body: Body,
}

/// Signs `body` as `key`, valid for `ttl_ms` from `now_ms`.
pub fn seal(key: &Keypair, body: Body, now_ms: u64, ttl_ms: u64, trace_context: BTreeMap<String, String>) -> Vec<u8> {
    let nonce: [u8; NONCE_BYTES] = rand::random();
    seal_with_nonce(key, body, now_ms.saturating_add(ttl_ms), nonce.to_vec(), trace_context)
}

/// `seal` with a chosen expiry and nonce, for tests that replay or forge.
pub fn seal_with_nonce(
    key: &Keypair,
    body: Body,
    expires_at_ms: u64,
    nonce: Vec<u8>,
    trace_context: BTreeMap<String, String>,
) -> Vec<u8> {
    let envelope = Envelope {
        version: PROTOCOL_VERSION,
        sender: key.public().to_peer_id().to_bytes(),
        expires_at_unix_ms: expires_at_ms,
        nonce,
        trace_context: trace_context.into_iter().collect(),
        body: Some(body),
    }
    .encode_to_vec();
    sign_envelope(key, envelope)
}

/// Wraps already-encoded envelope bytes with `key`'s signature.
pub fn sign_envelope(key: &Keypair, envelope: Vec<u8>) -> Vec<u8> {
    // Signing with an ed25519 key cannot fail; only RSA keys have a fallible path.
    let signature = key.sign(&envelope).unwrap_or_default();
    SignedEnvelope {
        envelope,
        signature,
        public_key: key.public().encode_protobuf(),
    }
    .encode_to_vec()
}

/// Remembers (sender, nonce) pairs until their messages expire.
///
/// Its room is shared: one sender may hold at most a [`SHARE_DIVISOR`]th of
/// it. With one pool for all, a single member sending valid messages fast
/// enough filled it within a minute, and then every other member's messages
/// were dropped as overloaded (and held against them) for as long as the
/// flood's expiries, up to the TTL cap.
#[derive(Debug)]
pub struct ReplayGuard {
    seen: HashMap<(PeerId, [u8; NONCE_BYTES]), u64>,
    /// Entries in `seen` by sender.
    per_sender: HashMap<PeerId, usize>,
    capacity: usize,
    sender_share: usize,
    /// When expired entries were last swept out. A sweep walks every entry,
    /// so a sender at its share does not get one per message: at most one
    /// a second.
    swept_ms: Option<u64>,
}

/// One sender may fill at most 1/16 of the replay guard.
pub const SHARE_DIVISOR: usize = 16;

/// Expired entries are swept at most this often.
const SWEEP_EVERY_MS: u64 = 1_000;

impl ReplayGuard {
    /// `capacity` bounds memory; with the TTL cap it bounds the message rate
    /// the guard can vouch for, and a sixteenth of it one sender's rate.
    pub fn new(capacity: usize) -> Self {
        let capacity = capacity.max(1);
        Self {
            seen: HashMap::new(),
            per_sender: HashMap::new(),
            capacity,
            sender_share: (capacity / SHARE_DIVISOR).max(1),
            swept_ms: None,
        }
    }

    pub fn len(&self) -> usize {
        self.seen.len()
    }

    pub fn is_empty(&self) -> bool {
        self.seen.is_empty()
    }

    /// Forgets expired entries, unless a sweep ran within the last second.
    fn sweep(&mut self, now_ms: u64) {
        if self.swept_ms.is_some_and(|t| now_ms.saturating_sub(t) < SWEEP_EVERY_MS) {
            return;
        }
        self.swept_ms = Some(now_ms);
        let per_sender = &mut self.per_sender;
        self.seen.retain(|(sender, _), exp| {
            let keep = *exp >= now_ms;
            if !keep && let Some(n) = per_sender.get_mut(sender) {
                *n = n.saturating_sub(1);
            }
            keep
        });
        per_sender.retain(|_, n| *n > 0);
    }

    fn admit(
        &mut self,
        sender: PeerId,
        nonce: [u8; NONCE_BYTES],
        expires_at_ms: u64,
        now_ms: u64,
    ) -> Result<(), DropReason> {
        if self.seen.contains_key(&(sender, nonce)) {
            return Err(DropReason::Replayed);
        }
        let held = |g: &Self| g.per_sender.get(&sender).copied().unwrap_or(0);
        if held(self) >= self.sender_share {
            self.sweep(now_ms);
            if held(self) >= self.sender_share {
                return Err(DropReason::Flooding);
            }
        }
        if self.seen.len() >= self.capacity {
            self.sweep(now_ms);
            if self.seen.len() >= self.capacity {
                return Err(DropReason::Overloaded);
            }
        }
        self.seen.insert((sender, nonce), expires_at_ms);
        *self.per_sender.entry(sender).or_default() += 1;
        Ok(())
    }
}

/// The checks every received message goes through.
#[derive(Debug)]
pub struct Opener {
    replay: ReplayGuard,
    /// Messages may not claim to live longer than this, so the replay guard
    /// only has to remember a bounded window.
    max_ttl_ms: u64,
}

impl Opener {
    pub fn new(max_ttl_ms: u64, replay_capacity: usize) -> Self {
        Self {
            replay: ReplayGuard::new(replay_capacity),
            max_ttl_ms,
        }
    }

    pub fn remembered(&self) -> usize {
        self.replay.len()
    }

    /// Opens `bytes` received from `from` (the authenticated transport peer,
    /// or the gossip author) at `now_ms`.
    pub fn open(&mut self, bytes: &[u8], from: Option<PeerId>, now_ms: u64) -> Result<Opened, DropReason> {
        let (opened, nonce) = verify(bytes, from, now_ms, self.max_ttl_ms)?;
        self.replay.admit(opened.sender, nonce, opened.expires_at_ms, now_ms)?;
        Ok(opened)
    }
}

/// Every check except replay; returns the nonce for the replay guard.
pub fn verify(
    bytes: &[u8],
    from: Option<PeerId>,
    now_ms: u64,
    max_ttl_ms: u64,
) -> Result<(Opened, [u8; NONCE_BYTES]), DropReason> {
    if bytes.len() > MAX_MESSAGE_BYTES {
        return Err(DropReason::Oversized);
    }
    let signed = SignedEnvelope::decode(bytes).map_err(|_| DropReason::Malformed)?;
    if signed.signature.is_empty() || signed.public_key.is_empty() {
        return Err(DropReason::Unsigned);
    }
    let key = PublicKey::try_decode_protobuf(&signed.public_key).map_err(|_| DropReason::Malformed)?;
    if !key.verify(&signed.envelope, &signed.signature) {
        return Err(DropReason::BadSignature);
    }
    let envelope = Envelope::decode(signed.envelope.as_slice()).map_err(|_| DropReason::Malformed)?;
    let sender = PeerId::from_bytes(&envelope.sender).map_err(|_| DropReason::Malformed)?;
    if key.to_peer_id() != sender || from.is_some_and(|f| f != sender) {
        return Err(DropReason::WrongSender);
    }
    if envelope.version != PROTOCOL_VERSION {
        return Err(DropReason::UnsupportedVersion);
    }
    if envelope.expires_at_unix_ms < now_ms || envelope.expires_at_unix_ms > now_ms.saturating_add(max_ttl_ms) {
        return Err(DropReason::Expired);
    }
    let nonce: [u8; NONCE_BYTES] = envelope
        .nonce
        .as_slice()
        .try_into()
        .map_err(|_| DropReason::Malformed)?;
    if envelope.trace_context.len() > 4
        || envelope
            .trace_context
            .iter()
            .any(|(k, v)| k.len() > 64 || v.len() > 512)
    {
        return Err(DropReason::Malformed);
    }
    let body = envelope.body.ok_or(DropReason::Malformed)?;
    check_body(&body).map_err(|_| DropReason::Malformed)?;
    Ok((
        Opened {
            sender,
            expires_at_ms: envelope.expires_at_unix_ms,
            trace_context: envelope.trace_context.into_iter().collect(),
            body,
        },
        nonce,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use gpupool_proto::peer::v1::{Bid, Heartbeat};

    const NOW: u64 = 1_800_000_000_000;
    const TTL: u64 = 60_000;

    fn hb() -> Body {
        Body::Heartbeat(Heartbeat {
            lease_id: format!("0x{}", "ab".repeat(32)),
        })
    }

    #[test]
    fn sealed_message_opens_once() {
        let k = Keypair::generate_ed25519();
        let bytes = seal(&k, hb(), NOW, 5_000, BTreeMap::new());
        let mut o = Opener::new(TTL, 100);
        let opened = o.open(&bytes, Some(k.public().to_peer_id()), NOW).unwrap();
        assert_eq!(opened.sender, k.public().to_peer_id());
        assert_eq!(opened.body, hb());
        assert_eq!(o.open(&bytes, None, NOW + 1), Err(DropReason::Replayed));
    }

    #[test]
    fn every_forgery_has_its_reason() {
        let k = Keypair::generate_ed25519();
        let other = Keypair::generate_ed25519();
        let mut o = Opener::new(TTL, 100);
        let good = seal(&k, hb(), NOW, 5_000, BTreeMap::new());

        // Relayed by a peer that is not the signer.
        assert_eq!(
            o.open(&good, Some(other.public().to_peer_id()), NOW),
            Err(DropReason::WrongSender)
        );
        // Envelope names k as sender, but other signs it.
        let env = Envelope {
            version: PROTOCOL_VERSION,
            sender: k.public().to_peer_id().to_bytes(),
            expires_at_unix_ms: NOW + 1000,
            nonce: vec![1; NONCE_BYTES],
            trace_context: Default::default(),
            body: Some(hb()),
        }
        .encode_to_vec();
        assert_eq!(
            o.open(&sign_envelope(&other, env.clone()), None, NOW),
            Err(DropReason::WrongSender)
        );
        // Signature bytes tampered with.
        let mut signed = SignedEnvelope::decode(sign_envelope(&k, env.clone()).as_slice()).unwrap();
        signed.signature[3] ^= 1;
        assert_eq!(
            o.open(&signed.encode_to_vec(), None, NOW),
            Err(DropReason::BadSignature)
        );
        // Envelope changed after signing.
        let mut signed = SignedEnvelope::decode(sign_envelope(&k, env.clone()).as_slice()).unwrap();
        signed.envelope[5] ^= 1;
        assert_eq!(
            o.open(&signed.encode_to_vec(), None, NOW),
            Err(DropReason::BadSignature)
        );
        // No signature at all.
        let unsigned = SignedEnvelope {
            envelope: env,
            signature: vec![],
            public_key: k.public().encode_protobuf(),
        };
        assert_eq!(o.open(&unsigned.encode_to_vec(), None, NOW), Err(DropReason::Unsigned));
        // Expired, and an expiry too far ahead.
        let old = seal_with_nonce(&k, hb(), NOW - 1, vec![2; NONCE_BYTES], BTreeMap::new());
        assert_eq!(o.open(&old, None, NOW), Err(DropReason::Expired));
        let far = seal_with_nonce(&k, hb(), NOW + TTL + 1, vec![3; NONCE_BYTES], BTreeMap::new());
        assert_eq!(o.open(&far, None, NOW), Err(DropReason::Expired));
        // Short nonce, oversized, garbage.
        let short = seal_with_nonce(&k, hb(), NOW + 10, vec![4; 3], BTreeMap::new());
        assert_eq!(o.open(&short, None, NOW), Err(DropReason::Malformed));
        assert_eq!(
            o.open(&vec![0u8; MAX_MESSAGE_BYTES + 1], None, NOW),
            Err(DropReason::Oversized)
        );
        assert_eq!(o.open(b"\xff\xff\xff\xff", None, NOW), Err(DropReason::Malformed));
        // A body that breaks its own limits.
        let bad_bid = Body::Bid(Bid {
            order_id: "o".into(),
            bid_id: "b".into(),
            provider_org: "x".into(),
            gpu_product: "H100".into(),
            gpu_count: 0,
            price_per_gpu_hour: "1".into(),
            bid_expires_at_unix_ms: NOW + 10,
        });
        let b = seal(&k, bad_bid, NOW, 1000, BTreeMap::new());
        assert_eq!(o.open(&b, None, NOW), Err(DropReason::Malformed));
        assert_eq!(o.remembered(), 0, "nothing that failed a check is remembered");
    }

    #[test]
    fn replay_guard_forgets_expired_and_stays_bounded() {
        let keys: Vec<Keypair> = (0..3).map(|_| Keypair::generate_ed25519()).collect();
        let mut o = Opener::new(TTL, 2);
        let a = seal(&keys[0], hb(), NOW, 10, BTreeMap::new());
        let b = seal(&keys[1], hb(), NOW, 10, BTreeMap::new());
        let c = seal(&keys[2], hb(), NOW, 10, BTreeMap::new());
        let k = &keys[2];
        o.open(&a, None, NOW).unwrap();
        o.open(&b, None, NOW).unwrap();
        assert_eq!(o.open(&c, None, NOW), Err(DropReason::Overloaded));
        // Once a and b have expired, and a second has passed since the last
        // sweep, the guard has room again; a is refused as expired.
        let d = seal(k, hb(), NOW + 1_000, 10, BTreeMap::new());
        o.open(&d, None, NOW + 1_000).unwrap();
        assert_eq!(o.open(&a, None, NOW + 1_000), Err(DropReason::Expired));
        assert!(o.remembered() <= 2);
    }

    #[test]
    fn one_sender_fills_no_more_than_its_share() {
        let flooder = Keypair::generate_ed25519();
        let honest = Keypair::generate_ed25519();
        // Room for 64: a sender may hold 4.
        let mut o = Opener::new(TTL, 64);
        for _ in 0..4 {
            o.open(&seal(&flooder, hb(), NOW, 5_000, BTreeMap::new()), None, NOW)
                .unwrap();
        }
        let fifth = seal(&flooder, hb(), NOW, 5_000, BTreeMap::new());
        assert_eq!(o.open(&fifth, None, NOW), Err(DropReason::Flooding));
        assert_eq!(o.remembered(), 4, "a refused message is not remembered");
        // Everyone else still has room.
        for _ in 0..4 {
            o.open(&seal(&honest, hb(), NOW, 5_000, BTreeMap::new()), None, NOW)
                .unwrap();
        }
        // Within the second after a sweep, a sender at its share gets no
        // other: each sweep walks every entry.
        let later = seal(&flooder, hb(), NOW + 6_000, 5_000, BTreeMap::new());
        assert_eq!(o.open(&later, None, NOW + 500), Err(DropReason::Flooding));
        // Once its messages have expired, and a second has passed, it has room again.
        o.open(&later, None, NOW + 6_000).unwrap();
        assert_eq!(o.remembered(), 1, "the expired entries are gone: {}", o.remembered());
    }
}

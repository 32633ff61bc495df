//! Signed Pool API requests: a renter without a cluster proves who it is with
//! the same wallet key that funds its leases, so the Pool API needs no
//! accounts or tokens of its own.
//!
//! The signature is EIP-191 (`personal_sign`), which every Ethereum wallet
//! can produce, over a text naming the method, a timestamp, a nonce and the
//! keccak-256 of the request's protobuf encoding. This module is pure: the
//! server's freshness window and replay memory live with the server.

use std::str::FromStr;

use alloy::{
    primitives::{Address, Signature, keccak256},
    signers::SignerSync,
};

use crate::Wallet;

/// gRPC metadata keys (lower-case, as HTTP/2 requires).
pub const HEADER_WALLET: &str = "x-gpupool-wallet";
pub const HEADER_TIMESTAMP: &str = "x-gpupool-timestamp";
pub const HEADER_NONCE: &str = "x-gpupool-nonce";
pub const HEADER_SIGNATURE: &str = "x-gpupool-signature";

/// The four headers of one signed request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SignedHeaders {
    pub wallet: String,
    pub timestamp_ms: String,
    pub nonce: String,
    pub signature: String,
}

impl SignedHeaders {
    /// The headers as (name, value) pairs, in the order a client sends them.
    pub fn pairs(&self) -> [(&'static str, &str); 4] {
        [
            (HEADER_WALLET, &self.wallet),
            (HEADER_TIMESTAMP, &self.timestamp_ms),
            (HEADER_NONCE, &self.nonce),
            (HEADER_SIGNATURE, &self.signature),
        ]
    }
}

/// A request that is not signed as the Pool API requires; each says what to fix.
#[derive(thiserror::Error, Debug, PartialEq, Eq)]
pub enum AuthError {
    #[error("missing {0}: every Pool API call but Info and Market is signed with the renter's wallet")]
    Missing(&'static str),
    #[error("{0} is malformed: {1}")]
    Malformed(&'static str, &'static str),
    #[error("the signature is by {recovered}, not by {claimed}")]
    WrongSigner { claimed: Address, recovered: Address },
}

/// What the wallet signs.
pub fn signing_text(method: &str, timestamp_ms: u64, nonce: &str, body: &[u8]) -> String {
    format!(
        "gpupool pool api v1\n{method}\n{timestamp_ms}\n{nonce}\n{}",
        keccak256(body)
    )
}

impl Wallet {
    /// Signs one request. `nonce` is 16 random bytes; pass a fresh one per request.
    pub fn sign_request(&self, method: &str, body: &[u8], timestamp_ms: u64, nonce: [u8; 16]) -> SignedHeaders {
        let nonce = alloy::hex::encode(nonce);
        let text = signing_text(method, timestamp_ms, &nonce, body);
        // A local secp256k1 key signs any 32-byte digest: this cannot fail.
        let signature = self
            .signer()
            .sign_message_sync(text.as_bytes())
            .map(|s| alloy::hex::encode_prefixed(s.as_bytes()))
            .unwrap_or_default();
        SignedHeaders {
            wallet: self.address().to_string(),
            timestamp_ms: timestamp_ms.to_string(),
            nonce,
            signature,
        }
    }
}

/// A request whose signature checks out: who sent it, when, and its nonce.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Verified {
    pub wallet: Address,
    pub timestamp_ms: u64,
    pub nonce: String,
}

/// Checks that `headers` sign `body` for `method`. Freshness and replays are
/// the caller's to check, with [`Verified::timestamp_ms`] and [`Verified::nonce`].
pub fn verify(headers: &SignedHeaders, method: &str, body: &[u8]) -> Result<Verified, AuthError> {
    let claimed = Address::from_str(&headers.wallet)
        .map_err(|_| AuthError::Malformed(HEADER_WALLET, "expected 0x and 40 hex digits"))?;
    let timestamp_ms = headers
        .timestamp_ms
        .parse::<u64>()
        .map_err(|_| AuthError::Malformed(HEADER_TIMESTAMP, "expected Unix milliseconds"))?;
    if headers.nonce.len() != 32 || !headers.nonce.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(AuthError::Malformed(HEADER_NONCE, "expected 32 hex digits"));
    }
    let raw = headers
        .signature
        .strip_prefix("0x")
        .and_then(|h| alloy::hex::decode(h).ok())
        .ok_or(AuthError::Malformed(HEADER_SIGNATURE, "expected 0x and 130 hex digits"))?;
    let signature =
        Signature::from_raw(&raw).map_err(|_| AuthError::Malformed(HEADER_SIGNATURE, "not a secp256k1 signature"))?;
    // The nonce is compared as text by the caller, so it is signed as sent.
    let text = signing_text(method, timestamp_ms, &headers.nonce, body);
    let recovered = signature
        .recover_address_from_msg(text.as_bytes())
        .map_err(|_| AuthError::Malformed(HEADER_SIGNATURE, "no key recovers from it"))?;
    if recovered != claimed {
        return Err(AuthError::WrongSigner { claimed, recovered });
    }
    Ok(Verified {
        wallet: claimed,
        timestamp_ms,
        nonce: headers.nonce.to_ascii_lowercase(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    // anvil's well-known development keys; public, never used outside local chains.
    const KEY_A: &str = "0xac0974bec39a17e36ba4a6b4d238ff944bacb478cbed5efcae784d7bf4f2ff80";
    const KEY_B: &str = "0x59c6995e998f97a5a0044966f0945389dc9e86dae88c7a8412f4603b6b78690d";
    const METHOD: &str = "/gpupool.pool.v1.Pool/Submit";

    #[test]
    fn a_signed_request_verifies_as_its_wallet() {
        let w = Wallet::from_hex(KEY_A).unwrap();
        let h = w.sign_request(METHOD, b"body", 1_700_000_000_000, [7; 16]);
        let v = verify(&h, METHOD, b"body").unwrap();
        assert_eq!(v.wallet, w.address());
        assert_eq!(v.timestamp_ms, 1_700_000_000_000);
        assert_eq!(v.nonce, "07".repeat(16));
    }

    #[test]
    fn anything_changed_after_signing_is_refused() {
        let a = Wallet::from_hex(KEY_A).unwrap();
        let b = Wallet::from_hex(KEY_B).unwrap();
        let h = a.sign_request(METHOD, b"body", 1_000, [1; 16]);
        let wrong = |r: Result<Verified, AuthError>| matches!(r, Err(AuthError::WrongSigner { .. }));
        // Another body, method, time or nonce: the signature recovers someone else.
        assert!(wrong(verify(&h, METHOD, b"bodY")));
        assert!(wrong(verify(&h, "/gpupool.pool.v1.Pool/Cancel", b"body")));
        assert!(wrong(verify(
            &SignedHeaders {
                timestamp_ms: "1001".into(),
                ..h.clone()
            },
            METHOD,
            b"body"
        )));
        assert!(wrong(verify(
            &SignedHeaders {
                nonce: "02".repeat(16),
                ..h.clone()
            },
            METHOD,
            b"body"
        )));
        // Claiming to be someone else with one's own signature.
        let forged = SignedHeaders {
            wallet: b.address().to_string(),
            ..h.clone()
        };
        assert_eq!(
            verify(&forged, METHOD, b"body"),
            Err(AuthError::WrongSigner {
                claimed: b.address(),
                recovered: a.address()
            })
        );
        // Malformed headers say which one.
        for (bad, header) in [
            (
                SignedHeaders {
                    wallet: "alice".into(),
                    ..h.clone()
                },
                HEADER_WALLET,
            ),
            (
                SignedHeaders {
                    timestamp_ms: "soon".into(),
                    ..h.clone()
                },
                HEADER_TIMESTAMP,
            ),
            (
                SignedHeaders {
                    nonce: "xyz".into(),
                    ..h.clone()
                },
                HEADER_NONCE,
            ),
            (
                SignedHeaders {
                    signature: "0x1234".into(),
                    ..h.clone()
                },
                HEADER_SIGNATURE,
            ),
        ] {
            match verify(&bad, METHOD, b"body") {
                Err(AuthError::Malformed(which, _)) => assert_eq!(which, header),
                other => panic!("{header}: {other:?}"),
            }
        }
    }
}

//! A member's wallet vouching for its peer identity.
//!
//! A member's identity record names the wallet that is paid for its work
//! and that pays for its leases, and the record is signed by the member's
//! libp2p key. That key alone could name anyone's wallet: a peer could pass
//! itself off as a renter with a rich account. So the wallet signs too, an
//! EIP-191 message binding it to the peer id and the organisation, and a
//! record whose wallet did not sign is dropped. The proof is made once at
//! start and checked once per sender and wallet. Pure.

use alloy::{
    primitives::{Address, Signature},
    signers::SignerSync,
};

use crate::Wallet;

/// What the wallet signs: the peer id and organisation, in a text no other
/// gpupool signature (Pool API requests sign "gpupool pool api v1") uses.
pub fn identity_text(peer_id: &str, org: &str) -> String {
    format!("gpupool member identity v1\npeer {peer_id}\norg {org}")
}

/// Why an identity proof does not hold.
#[derive(thiserror::Error, Debug, PartialEq, Eq)]
pub enum ProofError {
    #[error("the wallet proof is not a 65-byte secp256k1 signature")]
    Malformed,
    #[error("the record names wallet {claimed}, but the proof is signed by {recovered}")]
    WrongSigner { claimed: Address, recovered: Address },
}

impl Wallet {
    /// This wallet's proof that it answers for `peer_id` in `org`.
    pub fn prove_identity(&self, peer_id: &str, org: &str) -> Vec<u8> {
        // A local secp256k1 key signs any message: this cannot fail.
        self.signer()
            .sign_message_sync(identity_text(peer_id, org).as_bytes())
            .map(|s| s.as_bytes().to_vec())
            .unwrap_or_default()
    }
}

/// Checks that `wallet` signed `proof` for `peer_id` in `org`.
pub fn check_identity(wallet: Address, peer_id: &str, org: &str, proof: &[u8]) -> Result<(), ProofError> {
    let signature = Signature::from_raw(proof).map_err(|_| ProofError::Malformed)?;
    let recovered = signature
        .recover_address_from_msg(identity_text(peer_id, org).as_bytes())
        .map_err(|_| ProofError::Malformed)?;
    if recovered != wallet {
        return Err(ProofError::WrongSigner {
            claimed: wallet,
            recovered,
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    // anvil's first two well-known development keys; public, for local chains only.
    const KEY_A: &str = "0xac0974bec39a17e36ba4a6b4d238ff944bacb478cbed5efcae784d7bf4f2ff80";
    const KEY_B: &str = "0x59c6995e998f97a5a0044966f0945389dc9e86dae88c7a8412f4603b6b78690d";
    const PEER: &str = "12D3KooWQYhTNQdmr3ArTeUHRYzFg94BKyTkoWBDWez9kSCVe2Xo";

    #[test]
    fn a_wallet_proves_the_peer_and_organisation_it_signed_for_and_nothing_else() {
        let a = Wallet::from_hex(KEY_A).unwrap();
        let b = Wallet::from_hex(KEY_B).unwrap();
        let proof = a.prove_identity(PEER, "acme");
        assert_eq!(proof.len(), 65);
        assert_eq!(check_identity(a.address(), PEER, "acme", &proof), Ok(()));
        // Someone else's wallet named with this proof.
        assert!(matches!(
            check_identity(b.address(), PEER, "acme", &proof),
            Err(ProofError::WrongSigner { claimed, recovered }) if claimed == b.address() && recovered != b.address()
        ));
        // The proof taken to another peer id or organisation.
        let other_peer = "12D3KooWEyoppNCUx8Yx66oV9fJnriXwCcXwDDUA2kj6vnc6iDEp";
        assert!(check_identity(a.address(), other_peer, "acme", &proof).is_err());
        assert!(check_identity(a.address(), PEER, "bravo", &proof).is_err());
        // No proof, or not a signature.
        assert_eq!(
            check_identity(a.address(), PEER, "acme", &[]),
            Err(ProofError::Malformed)
        );
        assert!(check_identity(a.address(), PEER, "acme", &[7u8; 65]).is_err());
    }
}

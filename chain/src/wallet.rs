//! Wallet keys. A key is read from a file (a mounted Secret in the cluster) and
//! lives only inside the signer: `Debug` and every error show the address at most.

use std::{fmt, path::Path, str::FromStr};

use alloy::{primitives::Address, signers::local::PrivateKeySigner};

use crate::error::ChainError;

#[derive(Clone)]
pub struct Wallet {
    signer: PrivateKeySigner,
}

impl Wallet {
    /// Reads a hex private key (with or without `0x`, surrounding whitespace ignored).
    pub fn from_file(path: &Path) -> Result<Self, ChainError> {
        let text = std::fs::read_to_string(path).map_err(|e| ChainError::WalletKey {
            source_desc: format!("cannot read {}: {}", path.display(), e.kind()),
        })?;
        Self::from_hex(text.trim()).map_err(|_| ChainError::WalletKey {
            source_desc: format!("{} does not hold a hex secp256k1 private key", path.display()),
        })
    }

    /// Parses a hex private key. The error never repeats the input.
    pub fn from_hex(hex: &str) -> Result<Self, ChainError> {
        let signer = PrivateKeySigner::from_str(hex.trim()).map_err(|_| ChainError::WalletKey {
            source_desc: "not a hex secp256k1 private key".into(),
        })?;
        Ok(Self { signer })
    }

    pub fn address(&self) -> Address {
        self.signer.address()
    }

    pub(crate) fn signer(&self) -> PrivateKeySigner {
        self.signer.clone()
    }
}

impl fmt::Debug for Wallet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Wallet")
            .field("address", &self.address())
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // anvil's first well-known development key; public, never used outside local chains.
    const DEV_KEY: &str = "0xac0974bec39a17e36ba4a6b4d238ff944bacb478cbed5efcae784d7bf4f2ff80";

    #[test]
    fn debug_and_errors_never_show_the_key() {
        let wallet = Wallet::from_hex(DEV_KEY).unwrap();
        let shown = format!("{wallet:?}");
        assert!(!shown.contains(&DEV_KEY[2..]), "{shown}");
        assert!(shown.to_lowercase().contains("0xf39fd6e51aad88f6"), "{shown}");
        let bad = "0xnot-a-key-but-secret-looking-material";
        let err = Wallet::from_hex(bad).unwrap_err().to_string();
        assert!(!err.contains("secret-looking"), "{err}");
    }

    #[test]
    fn key_file_with_newline_and_prefix() {
        let dir = std::env::temp_dir().join(format!("gpupool-wallet-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("key");
        std::fs::write(&path, format!("{DEV_KEY}\n")).unwrap();
        assert_eq!(
            Wallet::from_file(&path).unwrap().address().to_string(),
            "0xf39Fd6e51aad88F6F4ce6aB8827279cffFb92266"
        );
        std::fs::write(&path, "garbage").unwrap();
        let err = Wallet::from_file(&path).unwrap_err().to_string();
        assert!(err.contains("does not hold"), "{err}");
        assert!(!err.contains("garbage"), "{err}");
    }
}

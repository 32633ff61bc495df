//! Where the escrow lives. The test environment writes this file; the operator and
//! the CLI read it, and flags override any field.

use std::path::Path;

use alloy::primitives::Address;
use serde::{Deserialize, Serialize};

use crate::error::ChainError;

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct ChainConfig {
    /// JSON-RPC endpoint. May carry an API key, so it is never logged or put in errors.
    pub rpc_url: String,
    pub chain_id: u64,
    /// The `LeaseEscrow` contract.
    pub escrow: Address,
    /// The ERC-20 leases are paid in.
    pub token: Address,
    /// The block the escrow was deployed in: event queries start there.
    #[serde(default)]
    pub from_block: u64,
}

impl ChainConfig {
    pub fn load(path: &Path) -> Result<Self, ChainError> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| ChainError::Config(format!("cannot read {}: {e}", path.display())))?;
        serde_json::from_str(&text)
            .map_err(|e| ChainError::Config(format!("{} is not a chain config: {e}", path.display())))
    }

    pub fn save(&self, path: &Path) -> Result<(), ChainError> {
        let text = serde_json::to_string_pretty(self).map_err(|e| ChainError::Config(e.to_string()))?;
        std::fs::write(path, text + "\n")
            .map_err(|e| ChainError::Config(format!("cannot write {}: {e}", path.display())))
    }
}

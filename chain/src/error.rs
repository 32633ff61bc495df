//! Chain errors, split by what a caller should do about them: retry with backoff
//! (the RPC is down, slow or answering nonsense) or stop and report (the escrow
//! refused, the configuration is wrong).

use std::time::Duration;

use alloy::primitives::B256;

#[derive(thiserror::Error, Debug)]
pub enum ChainError {
    /// The RPC endpoint could not be reached or failed. Its URL is left out on
    /// purpose: hosted RPC URLs carry API keys.
    #[error("chain RPC failed during {during}: {detail}")]
    Rpc { during: &'static str, detail: String },

    /// The endpoint answered, but not with anything an escrow could have produced.
    #[error("chain RPC answered {during} with data that is not a valid escrow response: {detail}")]
    Garbage { during: &'static str, detail: String },

    /// The escrow refused the call; retrying the same call will not help.
    #[error("the escrow refused {call}: {reason}")]
    Refused {
        call: &'static str,
        /// The contract's error name, e.g. `LeaseExists`.
        code: &'static str,
        reason: String,
    },

    /// The transaction was mined and reverted (the state changed between the check
    /// and the inclusion).
    #[error("{call} transaction {tx} was mined but reverted")]
    RevertedOnChain { call: &'static str, tx: B256 },

    /// Sent, but no receipt in time. It may still be mined: callers re-read state.
    #[error("no receipt for {call} transaction {tx} within {waited:?}; it may still be mined")]
    ReceiptTimeout {
        call: &'static str,
        tx: B256,
        waited: Duration,
    },

    #[error("lease {lease} exists on chain with other terms: {detail}")]
    Conflict { lease: B256, detail: String },

    #[error("no wallet key configured: {0} needs one")]
    NoWallet(&'static str),

    #[error("wallet key: {source_desc}")]
    WalletKey { source_desc: String },

    #[error("chain configuration: {0}")]
    Config(String),
}

impl ChainError {
    /// Whether trying again later can succeed without anyone changing anything.
    pub fn is_transient(&self) -> bool {
        matches!(
            self,
            Self::Rpc { .. } | Self::Garbage { .. } | Self::ReceiptTimeout { .. } | Self::RevertedOnChain { .. }
        )
    }

    /// A short CamelCase reason for Kubernetes conditions and metrics labels.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::Rpc { .. } => "ChainUnreachable",
            Self::Garbage { .. } => "ChainInvalidResponse",
            Self::Refused { .. } => "EscrowRefused",
            Self::RevertedOnChain { .. } => "TransactionReverted",
            Self::ReceiptTimeout { .. } => "ReceiptTimeout",
            Self::Conflict { .. } => "LeaseConflict",
            Self::NoWallet(_) | Self::WalletKey { .. } => "WalletUnavailable",
            Self::Config(_) => "ChainMisconfigured",
        }
    }
}

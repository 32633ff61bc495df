//! Chain errors, split by what a caller should do about them: retry with backoff
//! (the RPC is down, slow or answering nonsense) or stop and report (the escrow
//! refused, the configuration is wrong).

use std::time::Duration;

use alloy::primitives::B256;

#[derive(thiserror::Error, Debug)]
pub enum ChainError {
    /// The RPC endpoint could not be reached or failed. Its URL is left out on
    /// purpose: hosted RPC URLs carry API keys.
    #[error("chain RPC failed during {during}: {}", redact_urls(detail))]
    Rpc { during: &'static str, detail: String },

    /// The endpoint answered, but not with anything an escrow could have produced.
    #[error(
        "chain RPC answered {during} with data that is not a valid escrow response: {}",
        redact_urls(detail)
    )]
    Garbage { during: &'static str, detail: String },

    /// The escrow refused the call; retrying the same call will not help.
    #[error("the escrow refused {call}: {}", redact_urls(reason))]
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

/// HTTP client errors name the URL they failed on, and hosted RPC URLs carry API
/// keys in the path or query: every URL in an error's text becomes `<rpc-url>`.
pub fn redact_urls(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(at) = ["http://", "https://", "ws://", "wss://"]
        .iter()
        .filter_map(|p| rest.find(p))
        .min()
    {
        out.push_str(&rest[..at]);
        out.push_str("<rpc-url>");
        let tail = &rest[at..];
        let end = tail
            .find(|c: char| c.is_whitespace() || matches!(c, ')' | '"' | '\'' | ','))
            .unwrap_or(tail.len());
        rest = &tail[end..];
    }
    out.push_str(rest);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_never_survive_into_errors() {
        assert_eq!(
            redact_urls("error sending request for url (https://eth.example/v2/SECRETKEY?x=1)"),
            "error sending request for url (<rpc-url>)"
        );
        assert_eq!(redact_urls("a http://h:1/k b ws://x c"), "a <rpc-url> b <rpc-url> c");
        assert_eq!(redact_urls("nothing here"), "nothing here");
        let e = ChainError::Rpc {
            during: "x",
            detail: "failed for url (http://127.0.0.1:1/key)".into(),
        };
        assert!(!e.to_string().contains("key"), "{e}");
    }
}

//! Contract bindings from the committed artifacts. The artifacts, not hand-written
//! ABI fragments, are the source: `make contracts` regenerates them and CI fails
//! when they drift from `contracts/src`.

// Generated code: `LeaseOpened` has eight fields, and the generated
// constructor takes one argument per field.
#![allow(clippy::too_many_arguments)]

alloy::sol!(
    #[sol(rpc)]
    #[derive(Debug, PartialEq, Eq)]
    LeaseEscrow,
    "../contracts/artifacts/LeaseEscrow.json"
);

alloy::sol!(
    #[sol(rpc)]
    #[derive(Debug, PartialEq, Eq)]
    GpuToken,
    "../contracts/artifacts/GpuToken.json"
);

/// The escrow artifact the bindings above and every deployment come from,
/// for tools that report what it was built with (its `compiler` settings
/// decide the gas a lease costs).
pub const LEASE_ESCROW_ARTIFACT: &str = include_str!("../../contracts/artifacts/LeaseEscrow.json");

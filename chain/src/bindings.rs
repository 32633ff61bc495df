//! Contract bindings from the committed artifacts. The artifacts, not hand-written
//! ABI fragments, are the source: `make contracts` regenerates them and CI fails
//! when they drift from `contracts/src`.

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

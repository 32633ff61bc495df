//! gpupool's test environment: real Kubernetes control planes built from the
//! Go module proxy, one per simulated organisation, on loopback; and helpers
//! the end-to-end tests share.

pub mod bench;
pub mod certs;
pub mod chain;
pub mod chart_settings;
pub mod cluster;
pub mod env;
pub mod harness;
pub mod kubeapply;
pub mod nat;
pub mod network_policy;
pub mod orgs;
pub mod otlp;
pub mod pool;
pub mod rpcproxy;

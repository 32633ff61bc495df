//! Lease: the agreement between a renter and a provider, paid from escrow.
//! Each side keeps its own copy.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// One side's record of a lease.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "gpupool.dev",
    version = "v1alpha1",
    kind = "Lease",
    plural = "leases",
    shortname = "gpl",
    category = "gpupool",
    namespaced,
    status = "LeaseStatus",
    doc = "Lease is one side's record of an agreement for a provider to run an order at a price, paid from an on-chain escrow. The renter and the provider each keep a copy.",
    printcolumn(name = "Side", type_ = "string", json_path = ".spec.side"),
    printcolumn(name = "Renter", type_ = "string", json_path = ".spec.renter.org"),
    printcolumn(name = "Provider", type_ = "string", json_path = ".spec.provider.org"),
    printcolumn(name = "Price", type_ = "string", json_path = ".spec.pricePerGpuHour"),
    printcolumn(name = "State", type_ = "string", json_path = ".status.state"),
    printcolumn(name = "Paid", type_ = "string", json_path = ".status.paid"),
    printcolumn(name = "Remaining", type_ = "string", json_path = ".status.remaining"),
    printcolumn(name = "Age", type_ = "date", json_path = ".metadata.creationTimestamp")
)]
#[serde(rename_all = "camelCase")]
pub struct LeaseSpec {
    /// Which side's copy this is.
    pub side: LeaseSide,
    /// The order the lease fulfils.
    #[schemars(length(min = 1, max = 128))]
    pub order_id: String,
    /// The winning bid.
    #[schemars(length(min = 1, max = 253))]
    pub bid: String,
    /// The AiJob, on the renter's side.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ai_job: Option<String>,
    /// Who pays.
    pub renter: LeaseParty,
    /// Who runs the workload and gets paid.
    pub provider: LeaseParty,
    /// Price per GPU-hour in tokens.
    #[x_kube(validation = Rule::new(r"self.matches('^(0|[1-9][0-9]{0,11})([.][0-9]{1,18})?$')").message("pricePerGpuHour must be a non-negative decimal number of tokens"))]
    #[schemars(length(max = 32))]
    pub price_per_gpu_hour: String,
    /// GPUs leased.
    #[x_kube(validation = Rule::new("self >= 1 && self <= 16").message("gpuCount must be between 1 and 16"))]
    pub gpu_count: i32,
    /// The GPU product leased.
    pub gpu_product: String,
    /// Where the money is held. Without it the lease is not on chain and the
    /// settlement worker leaves it alone.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub escrow: Option<Escrow>,
    /// Set to close the lease on chain with this reason. The renter may use any
    /// reason; the provider may not claim RenterCancelled; InsufficientFunds only
    /// works once the lease has run out.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub close_reason: Option<CloseReason>,
}

/// Why a lease closes; the same codes, in the same order, as the escrow
/// contract's `CloseReason` (the chain crate encodes it by position).
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum CloseReason {
    Completed,
    RenterCancelled,
    ProviderFailed,
    InsufficientFunds,
}

impl CloseReason {
    pub const ALL: [CloseReason; 4] = [
        Self::Completed,
        Self::RenterCancelled,
        Self::ProviderFailed,
        Self::InsufficientFunds,
    ];

    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|r| r.as_str().eq_ignore_ascii_case(s))
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Completed => "Completed",
            Self::RenterCancelled => "RenterCancelled",
            Self::ProviderFailed => "ProviderFailed",
            Self::InsufficientFunds => "InsufficientFunds",
        }
    }
}

/// Which side a Lease copy belongs to.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
pub enum LeaseSide {
    Renter,
    Provider,
}

/// One party to a lease.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct LeaseParty {
    /// Organisation name.
    pub org: String,
    /// libp2p peer id.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub peer_id: Option<String>,
    /// The wallet address that pays or is paid.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new(r"self.matches('^0x[0-9a-fA-F]{40}$')").message("wallet must be a 0x-prefixed 20-byte hex address"))]
    pub wallet: Option<String>,
}

/// The on-chain escrow holding a lease's deposit.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct Escrow {
    /// EVM chain id.
    pub chain_id: u64,
    /// Escrow contract address.
    #[x_kube(validation = Rule::new(r"self.matches('^0x[0-9a-fA-F]{40}$')").message("contract must be a 0x-prefixed 20-byte hex address"))]
    pub contract: String,
    /// The lease id in the contract, 0x-prefixed 32-byte hex. The renter's side
    /// may leave it out: it is then derived from the renter's wallet and the order,
    /// so a retried open can never create a second lease.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new(r"self.matches('^0x[0-9a-fA-F]{64}$')").message("leaseId must be 0x followed by 64 hex digits"))]
    pub lease_id: Option<String>,
    /// Tokens the renter deposits when opening, as a decimal number of tokens.
    #[x_kube(validation = Rule::new(r"self.matches('^(0|[1-9][0-9]{0,11})([.][0-9]{1,18})?$') && !self.matches('^0([.]0+)?$')").message("deposit must be a positive decimal number of tokens, e.g. \"25\" or \"0.5\""))]
    #[schemars(length(max = 32))]
    pub deposit: String,
    /// The most tokens the lease may hold in all, deposit and top-ups
    /// together: the job's maxDuration (plus a minute to start it) at the
    /// lease's rate. While the job runs, the renter's operator tops the lease
    /// up toward it whenever the funds would last less than its funds
    /// warning; without it, the lease is never topped up and ends when its
    /// deposit runs out.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new(r"self.matches('^(0|[1-9][0-9]{0,11})([.][0-9]{1,18})?$')").message("topUpTo must be a decimal number of tokens, e.g. \"25\" or \"0.5\""))]
    #[schemars(length(max = 32))]
    pub top_up_to: Option<String>,
    /// The renter's wallet whose escrow account funds the lease, when this
    /// side's operator opens it as that renter's agent (a Pool API job).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new(r"self.matches('^0x[0-9a-fA-F]{40}$')").message("fundedBy must be a 0x-prefixed 20-byte hex address"))]
    pub funded_by: Option<String>,
}

/// What the lease's side saw of it.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct LeaseStatus {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub state: Option<LeaseState>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
    /// Why the lease closed: Completed, RenterCancelled, ProviderFailed or InsufficientFunds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub close_reason: Option<String>,
    /// Tokens paid to the provider.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub paid: Option<String>,
    /// Tokens refunded to the renter.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub refunded: Option<String>,
    /// When the renter last recorded a beat from the provider: with each
    /// change the provider reports, and at least once a minute while the
    /// lease runs. The renter's failure check uses every beat, in memory.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_heartbeat: Option<Time>,
    /// The on-chain lease id in use.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lease_id: Option<String>,
    /// Tokens put in: the deposit plus top-ups.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deposited: Option<String>,
    /// Tokens left for the renter if the lease closed now.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub remaining: Option<String>,
    /// When, at the current rate, the funds run out.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub funds_run_out_at: Option<Time>,
    /// The provider's last withdrawal (chain time).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_withdrawal: Option<Time>,
    /// Block of the open transaction, and confirmations seen so far.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub opened_block: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub confirmations: Option<i64>,
    /// What the provider last reported about the workload (renter's copy), or
    /// what it runs (provider's copy).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub workload: Option<WorkloadReport>,
}

/// The workload's state as the provider reports it.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct WorkloadReport {
    /// Pending, Running, Succeeded, Failed or Refused.
    pub phase: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub pod_state: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exit_code: Option<i32>,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub message: String,
    /// The provider's namespace that runs it.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub namespace: String,
}

/// Lease states.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
pub enum LeaseState {
    Pending,
    Active,
    InsufficientFunds,
    Closed,
}

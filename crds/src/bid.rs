//! Bid: one provider's signed offer for one order, owned by its AiJob.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// One provider's offer to run an AiJob's order.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "gpupool.dev",
    version = "v1alpha1",
    kind = "Bid",
    plural = "bids",
    category = "gpupool",
    namespaced,
    status = "BidStatus",
    doc = "Bid is one provider organisation's signed offer to run one AiJob's order. It is owned by the AiJob and recorded by the renter's operator.",
    printcolumn(name = "Job", type_ = "string", json_path = ".spec.aiJob"),
    printcolumn(name = "Org", type_ = "string", json_path = ".spec.providerOrg"),
    printcolumn(name = "Price", type_ = "string", json_path = ".spec.pricePerGpuHour"),
    printcolumn(name = "Model", type_ = "string", json_path = ".spec.gpuProduct"),
    printcolumn(name = "State", type_ = "string", json_path = ".status.state"),
    printcolumn(name = "Expires", type_ = "string", json_path = ".spec.expiresAt"),
    printcolumn(name = "Age", type_ = "date", json_path = ".metadata.creationTimestamp")
)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("self == oldSelf").message("a Bid is a signed offer and cannot be changed"))]
pub struct BidSpec {
    /// The AiJob this bid is for.
    #[schemars(length(min = 1, max = 253))]
    pub ai_job: String,
    /// The order id the bid answers.
    #[schemars(length(min = 1, max = 128))]
    pub order_id: String,
    /// The provider's libp2p peer id.
    #[schemars(length(min = 1, max = 128))]
    pub provider_peer_id: String,
    /// The provider's organisation.
    #[schemars(length(min = 1, max = 63))]
    pub provider_org: String,
    /// Price per GPU-hour in tokens, as a decimal string.
    #[x_kube(validation = Rule::new(r"self.matches('^(0|[1-9][0-9]{0,11})([.][0-9]{1,18})?$')").message("pricePerGpuHour must be a non-negative decimal number of tokens"))]
    #[schemars(length(max = 32))]
    pub price_per_gpu_hour: String,
    /// The GPU product the provider will run it on.
    #[schemars(length(min = 1, max = 128))]
    pub gpu_product: String,
    /// How many GPUs the bid reserves.
    #[x_kube(validation = Rule::new("self >= 1 && self <= 16").message("gpuCount must be between 1 and 16"))]
    pub gpu_count: i32,
    /// When the offer lapses.
    pub expires_at: Time,
    /// The provider's signature over the bid message, base64.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 1024))]
    pub signature: Option<String>,
}

/// What became of a bid.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct BidStatus {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub state: Option<BidState>,
    /// Why it is in that state.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
}

/// Bid states.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
pub enum BidState {
    /// Waiting for the renter's choice.
    Open,
    /// Chosen; a lease follows.
    Accepted,
    /// Another bid won.
    Lost,
    /// It lapsed before it was chosen.
    Expired,
}

//! Where GPU readings come from: NVML on real nodes, a file in test environments.

use gpupool_crds::GpuDevice;

/// One reading of a node's GPUs.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Reading {
    pub driver_version: Option<String>,
    pub cuda_version: Option<String>,
    pub gpus: Vec<GpuDevice>,
}

#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
pub enum SourceError {
    /// The driver library could not be loaded or initialised: no driver on
    /// this node, or the container lacks it.
    #[error(
        "the NVIDIA driver is not usable on this node: {0}. Install the NVIDIA driver, or run the agent only on GPU nodes (it is scheduled by the gpupool.dev/gpu-count label or the chart's nodeSelector)"
    )]
    DriverUnavailable(String),
    /// The driver works but reports no GPU.
    #[error("the NVIDIA driver reports no GPU on this node")]
    NoGpus,
    /// A device query failed.
    #[error("reading GPU {index}: {message}")]
    Device { index: u32, message: String },
    /// The simulated inventory could not be read.
    #[error("simulated inventory: {0}")]
    Inventory(String),
}

/// A source of GPU readings.
pub trait GpuSource: Send {
    /// "nvml" or "simulated", reported on the GpuNode.
    fn name(&self) -> &'static str;
    fn read(&mut self) -> Result<Reading, SourceError>;
}

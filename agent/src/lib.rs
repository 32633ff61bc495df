//! gpupool node agent: reads a node's NVIDIA GPUs and reports them as a
//! GpuNode, plus Node labels the operator's Jobs select on.

pub mod agent;
pub mod nvml;
pub mod publish;
pub mod report;
pub mod simulated;
pub mod source;

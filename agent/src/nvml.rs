//! Reads real NVIDIA GPUs through NVML. The library is loaded at run time, so
//! the agent builds and starts on machines without a driver and says so.

use std::collections::HashMap;

use gpupool_crds::{GpuDevice, GpuHealth, MigMode};
use nvml_wrapper::Nvml;
use nvml_wrapper::bitmasks::event::EventTypes;
use nvml_wrapper::enums::device::DeviceArchitecture;
use nvml_wrapper::enums::event::XidError;
use nvml_wrapper::error::NvmlError;
use nvml_wrapper::event::EventSet;

use crate::source::{GpuSource, Reading, SourceError};

/// NVLink links NVML can report per GPU (NVML_NVLINK_MAX_LINKS in nvml.h).
const MAX_NVLINKS: u32 = 18;

pub struct NvmlSource {
    // The event set borrows the library handle; it is declared first so it is
    // dropped first.
    events: Option<EventSet<'static>>,
    nvml: &'static Nvml,
    /// Last critical XID per GPU UUID; an XID marks the GPU unhealthy until
    /// the agent restarts, as the NVIDIA device plugin does.
    xids: HashMap<String, u64>,
}

impl NvmlSource {
    /// Loads NVML. Fails with `DriverUnavailable` when the library is missing.
    pub fn init() -> Result<Self, SourceError> {
        let nvml = Nvml::init().map_err(|e| SourceError::DriverUnavailable(describe(&e)))?;
        // The agent keeps NVML for its whole life; leaking the handle gives the
        // event set the 'static borrow it needs.
        let nvml: &'static Nvml = Box::leak(Box::new(nvml));
        let events = register_xid_events(nvml);
        Ok(Self {
            events,
            nvml,
            xids: HashMap::new(),
        })
    }

    fn drain_xids(&mut self) {
        let Self { events, xids, .. } = self;
        let Some(set) = events else { return };
        loop {
            match set.wait(0) {
                Ok(ev) => {
                    let xid = match ev.event_data {
                        Some(XidError::Value(v)) => v,
                        _ => 0,
                    };
                    if let Ok(uuid) = ev.device.uuid() {
                        tracing::warn!(gpu = %uuid, xid, "critical XID event");
                        xids.insert(uuid, xid);
                    }
                }
                Err(NvmlError::Timeout) => break,
                Err(e) => {
                    tracing::debug!(error = %e, "XID event wait failed");
                    break;
                }
            }
        }
    }
}

fn describe(e: &NvmlError) -> String {
    match e {
        NvmlError::LibloadingError(inner) => format!("libnvidia-ml.so could not be loaded ({inner})"),
        NvmlError::DriverNotLoaded => "the kernel driver is not loaded".into(),
        NvmlError::NoPermission => "no permission to talk to the driver".into(),
        other => other.to_string(),
    }
}

fn register_xid_events(nvml: &'static Nvml) -> Option<EventSet<'static>> {
    let count = nvml.device_count().ok()?;
    let mut set = nvml.create_event_set().ok()?;
    for i in 0..count {
        let device = nvml.device_by_index(i).ok()?;
        set = match device.register_events(EventTypes::CRITICAL_XID_ERROR, set) {
            Ok(s) => s,
            Err(e) => {
                // The failed call consumed the set; go on without XID events.
                tracing::info!(gpu = i, error = %e.error, "XID events not supported; health comes from queries only");
                return None;
            }
        };
    }
    Some(set)
}

impl GpuSource for NvmlSource {
    fn name(&self) -> &'static str {
        "nvml"
    }

    fn read(&mut self) -> Result<Reading, SourceError> {
        self.drain_xids();
        let nvml = self.nvml;
        let count = nvml
            .device_count()
            .map_err(|e| SourceError::DriverUnavailable(describe(&e)))?;
        if count == 0 {
            return Err(SourceError::NoGpus);
        }
        let mut gpus = Vec::with_capacity(count as usize);
        for index in 0..count {
            let dev_err = |e: NvmlError| SourceError::Device {
                index,
                message: e.to_string(),
            };
            let device = nvml.device_by_index(index).map_err(dev_err)?;
            let uuid = device.uuid().map_err(dev_err)?;
            let memory = device.memory_info().map_err(dev_err)?;
            let mig_mode = match device.mig_mode() {
                Ok(m) if m.current == 1 => MigMode::Enabled,
                Ok(_) => MigMode::Disabled,
                Err(_) => MigMode::Unsupported,
            };
            // A GPU that fell off the bus fails its queries: that is unhealthy too.
            let (mut health, mut health_message) = match device.utilization_rates() {
                Err(NvmlError::GpuLost) => (GpuHealth::Unhealthy, Some("the GPU has fallen off the bus".to_string())),
                _ => (GpuHealth::Healthy, None),
            };
            if let Some(xid) = self.xids.get(&uuid) {
                health = GpuHealth::Unhealthy;
                health_message = Some(format!("critical XID {xid}"));
            }
            let nvlink_links = if matches!(
                device.architecture(),
                Ok(DeviceArchitecture::Kepler) | Ok(DeviceArchitecture::Maxwell)
            ) {
                0
            } else {
                (0..MAX_NVLINKS)
                    .filter(|l| device.link_wrapper_for(*l).is_active().unwrap_or(false))
                    .count() as u32
            };
            gpus.push(GpuDevice {
                index,
                uuid,
                product: device.name().map_err(dev_err)?,
                memory_mib: memory.total / (1024 * 1024),
                memory_used_mib: memory.used / (1024 * 1024),
                utilization_percent: device.utilization_rates().map(|u| u.gpu).unwrap_or(0),
                mig_mode,
                health,
                health_message,
                pcie_generation: device.current_pcie_link_gen().ok(),
                pcie_width: device.current_pcie_link_width().ok(),
                nvlink_links,
            });
        }
        let cuda_version = nvml.sys_cuda_driver_version().ok().map(|v| {
            format!(
                "{}.{}",
                nvml_wrapper::cuda_driver_version_major(v),
                nvml_wrapper::cuda_driver_version_minor(v)
            )
        });
        Ok(Reading {
            driver_version: nvml.sys_driver_version().ok(),
            cuda_version,
            gpus,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// On a machine with no NVIDIA driver (CI, laptops) the real NVML path
    /// must report a clear DriverUnavailable error rather than panic. On a GPU
    /// machine it must read at least one GPU.
    #[test]
    fn real_nvml_reads_gpus_or_says_driver_missing() {
        match NvmlSource::init() {
            Err(SourceError::DriverUnavailable(msg)) => {
                assert!(!msg.is_empty());
                let full = SourceError::DriverUnavailable(msg).to_string();
                assert!(full.contains("Install the NVIDIA driver"), "{full}");
            }
            Err(other) => panic!("unexpected error kind: {other}"),
            Ok(mut src) => {
                let r = src.read().expect("a machine with NVML must be readable");
                assert!(!r.gpus.is_empty());
                assert!(r.gpus.iter().all(|g| g.memory_mib > 0 && g.uuid.starts_with("GPU-")));
            }
        }
    }
}

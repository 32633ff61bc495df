//! A simulated GPU inventory for test environments and the demo, read from a
//! YAML file so a test can change it (fail a GPU, say) while the agent runs.

use std::path::PathBuf;

use gpupool_crds::{GpuDevice, GpuHealth, MigMode};
use serde::Deserialize;

use crate::source::{GpuSource, Reading, SourceError};

/// The file's shape.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Inventory {
    pub product: String,
    pub memory_mib: u64,
    pub count: u32,
    #[serde(default = "default_driver")]
    pub driver_version: String,
    #[serde(default = "default_cuda")]
    pub cuda_version: String,
    /// Indexes of GPUs to report unhealthy.
    #[serde(default)]
    pub unhealthy: Vec<u32>,
    #[serde(default)]
    pub nvlink_links: u32,
}

fn default_driver() -> String {
    "580.95.05".into()
}

fn default_cuda() -> String {
    "13.0".into()
}

impl Inventory {
    /// The reading this inventory stands for; UUIDs are stable per node so
    /// restarts do not look like new GPUs.
    pub fn reading(&self, node: &str) -> Reading {
        let gpus = (0..self.count)
            .map(|index| {
                let unhealthy = self.unhealthy.contains(&index);
                GpuDevice {
                    index,
                    uuid: format!("GPU-sim-{}-{index}", node),
                    product: self.product.clone(),
                    memory_mib: self.memory_mib,
                    memory_used_mib: 0,
                    utilization_percent: 0,
                    mig_mode: MigMode::Disabled,
                    health: if unhealthy {
                        GpuHealth::Unhealthy
                    } else {
                        GpuHealth::Healthy
                    },
                    health_message: unhealthy.then(|| "simulated XID 79".to_string()),
                    pcie_generation: Some(5),
                    pcie_width: Some(16),
                    nvlink_links: self.nvlink_links,
                }
            })
            .collect();
        Reading {
            driver_version: Some(self.driver_version.clone()),
            cuda_version: Some(self.cuda_version.clone()),
            gpus,
        }
    }
}

pub struct SimulatedSource {
    pub path: PathBuf,
    pub node: String,
}

impl GpuSource for SimulatedSource {
    fn name(&self) -> &'static str {
        "simulated"
    }

    fn read(&mut self) -> Result<Reading, SourceError> {
        let text = std::fs::read_to_string(&self.path)
            .map_err(|e| SourceError::Inventory(format!("{}: {e}", self.path.display())))?;
        let inv: Inventory = serde_saphyr::from_str(&text)
            .map_err(|e| SourceError::Inventory(format!("{}: {e}", self.path.display())))?;
        if inv.count == 0 {
            return Err(SourceError::NoGpus);
        }
        Ok(inv.reading(&self.node))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_inventory_file_and_reports_bad_ones() {
        let dir = std::env::temp_dir().join(format!("gpupool-sim-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("inv.yaml");
        std::fs::write(
            &path,
            "product: NVIDIA L40S\nmemoryMib: 46068\ncount: 4\nunhealthy: [2]\n",
        )
        .unwrap();
        let mut src = SimulatedSource {
            path: path.clone(),
            node: "n1".into(),
        };
        let r = src.read().unwrap();
        assert_eq!(r.gpus.len(), 4);
        assert_eq!(r.gpus[2].health, GpuHealth::Unhealthy);
        assert_eq!(r.gpus[0].uuid, "GPU-sim-n1-0");

        std::fs::write(&path, "product: X\nmemoryMib: 1\ncount: 0\n").unwrap();
        assert_eq!(src.read().unwrap_err(), SourceError::NoGpus);
        std::fs::write(&path, "product: X\nbogus: 1\n").unwrap();
        assert!(matches!(src.read().unwrap_err(), SourceError::Inventory(_)));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}

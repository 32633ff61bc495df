//! A provider's lending policy: prices per GPU model, how many GPUs it lends
//! at most, and which organisations it serves. Loaded from a file (the chart
//! renders it into a ConfigMap from Helm values) and validated at start, so a
//! typo stops the operator with a message instead of lending at a wrong price.

use std::path::Path;
use std::str::FromStr;

use gpupool_crds::org::check_org_name;
use gpupool_crds::price::TokenAmount;
use serde::Deserialize;

use crate::matching::product_matches;

#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PolicyFile {
    #[serde(default)]
    pub prices: Vec<PriceRuleFile>,
    #[serde(default)]
    pub max_lent_gpus: u32,
    #[serde(default)]
    pub max_held_gpus_per_renter: u32,
    #[serde(default = "yes")]
    pub require_renter_funds: bool,
    #[serde(default)]
    pub allowed_orgs: Vec<String>,
    #[serde(default)]
    pub denied_orgs: Vec<String>,
}

#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PriceRuleFile {
    /// A model name as AiJobs write it ("H100", "A100 80GB"); matched by tokens.
    pub model: String,
    pub price_per_gpu_hour: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PriceRule {
    pub model: String,
    pub price: TokenAmount,
}

/// A checked policy. Lends nothing unless it names at least one price.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ProviderPolicy {
    pub prices: Vec<PriceRule>,
    pub max_lent_gpus: u32,
    /// GPUs one renter organisation may hold here at a time in bids it has
    /// not turned into leases; 0: no limit.
    pub max_held_gpus_per_renter: u32,
    /// Bid only for orders whose payer can fund a first deposit at the
    /// bid's price, as the chain says (`renter_funds`).
    pub require_renter_funds: bool,
    pub allowed_orgs: Vec<String>,
    pub denied_orgs: Vec<String>,
}

fn yes() -> bool {
    true
}

#[derive(Debug, thiserror::Error)]
pub enum PolicyError {
    #[error("reading {path}: {source}")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: {message}")]
    Parse { path: String, message: String },
    #[error("{path}: prices[{index}].pricePerGpuHour: {message}")]
    Price {
        path: String,
        index: usize,
        message: String,
    },
    #[error("{path}: prices[{index}].model must not be empty")]
    Model { path: String, index: usize },
    #[error("{path}: organisation {org:?} is both allowed and denied")]
    Both { path: String, org: String },
    #[error("{path}: {list}[{index}]: {source}")]
    Org {
        path: String,
        list: &'static str,
        index: usize,
        #[source]
        source: gpupool_crds::org::OrgNameError,
    },
}

impl ProviderPolicy {
    pub fn load(path: &Path) -> Result<Self, PolicyError> {
        let p = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|source| PolicyError::Read {
            path: p.clone(),
            source,
        })?;
        let file: PolicyFile = serde_saphyr::from_str(&text).map_err(|e| PolicyError::Parse {
            path: p.clone(),
            message: e.to_string(),
        })?;
        Self::from_file(file, &p)
    }

    pub fn from_file(file: PolicyFile, path: &str) -> Result<Self, PolicyError> {
        let mut prices = Vec::new();
        for (index, r) in file.prices.into_iter().enumerate() {
            if r.model.trim().is_empty() {
                return Err(PolicyError::Model {
                    path: path.into(),
                    index,
                });
            }
            let price = TokenAmount::from_str(&r.price_per_gpu_hour).map_err(|e| PolicyError::Price {
                path: path.into(),
                index,
                message: e.to_string(),
            })?;
            prices.push(PriceRule { model: r.model, price });
        }
        for (list, orgs) in [("allowedOrgs", &file.allowed_orgs), ("deniedOrgs", &file.denied_orgs)] {
            for (index, org) in orgs.iter().enumerate() {
                check_org_name(org).map_err(|source| PolicyError::Org {
                    path: path.into(),
                    list,
                    index,
                    source,
                })?;
            }
        }
        if let Some(org) = file.allowed_orgs.iter().find(|o| file.denied_orgs.contains(o)) {
            return Err(PolicyError::Both {
                path: path.into(),
                org: org.clone(),
            });
        }
        Ok(Self {
            prices,
            max_lent_gpus: file.max_lent_gpus,
            max_held_gpus_per_renter: file.max_held_gpus_per_renter,
            require_renter_funds: file.require_renter_funds,
            allowed_orgs: file.allowed_orgs,
            denied_orgs: file.denied_orgs,
        })
    }

    /// The price of one GPU-hour of `product`: the first rule that matches.
    pub fn price_of(&self, product: &str) -> Option<TokenAmount> {
        self.prices
            .iter()
            .find(|r| product_matches(std::slice::from_ref(&r.model), product))
            .map(|r| r.price)
    }

    /// Whether this provider deals with `org` at all.
    pub fn serves(&self, org: &str) -> bool {
        !self.denied_orgs.iter().any(|d| d == org)
            && (self.allowed_orgs.is_empty() || self.allowed_orgs.iter().any(|a| a == org))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loads_checks_and_prices() {
        let dir = std::env::temp_dir().join(format!("gpupool-policy-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("policy.yaml");
        std::fs::write(
            &path,
            "prices:\n- model: H100\n  pricePerGpuHour: \"2.5\"\n- model: L40S\n  pricePerGpuHour: \"0.9\"\nmaxLentGpus: 16\ndeniedOrgs: [evil]\n",
        )
        .unwrap();
        let p = ProviderPolicy::load(&path).unwrap();
        assert_eq!(p.price_of("NVIDIA H100 80GB HBM3"), Some("2.5".parse().unwrap()));
        assert_eq!(p.price_of("NVIDIA L40"), None);
        assert!(p.serves("acme") && !p.serves("evil"));
        assert_eq!(p.max_held_gpus_per_renter, 0, "no limit unless one is set");
        assert!(
            p.require_renter_funds,
            "renters show funds unless the policy says otherwise"
        );
        std::fs::write(
            &path,
            "requireRenterFunds: false
",
        )
        .unwrap();
        assert!(!ProviderPolicy::load(&path).unwrap().require_renter_funds);
        std::fs::write(
            &path,
            "requireRenterFunds: sometimes
",
        )
        .unwrap();
        let e = ProviderPolicy::load(&path).unwrap_err().to_string();
        assert!(e.contains("requireRenterFunds") || e.contains("bool"), "{e}");

        std::fs::write(&path, "maxLentGpus: 16\nmaxHeldGpusPerRenter: 4\n").unwrap();
        assert_eq!(ProviderPolicy::load(&path).unwrap().max_held_gpus_per_renter, 4);
        std::fs::write(&path, "maxHeldGpusPerRenter: -1\n").unwrap();
        let e = ProviderPolicy::load(&path).unwrap_err().to_string();
        assert!(e.contains("maxHeldGpusPerRenter"), "{e}");

        std::fs::write(&path, "prices:\n- model: H100\n  pricePerGpuHour: \"two\"\n").unwrap();
        let e = ProviderPolicy::load(&path).unwrap_err().to_string();
        assert!(e.contains("prices[0].pricePerGpuHour"), "{e}");
        std::fs::write(&path, "prices: []\nmaxLentGPUs: 3\n").unwrap();
        let e = ProviderPolicy::load(&path).unwrap_err().to_string();
        assert!(e.contains("maxLentGPUs"), "unknown keys are named: {e}");
        std::fs::write(&path, "allowedOrgs: [a]\ndeniedOrgs: [a]\n").unwrap();
        assert!(matches!(ProviderPolicy::load(&path), Err(PolicyError::Both { .. })));
        std::fs::write(&path, "deniedOrgs: [good, \"Evil Corp\"]\n").unwrap();
        let e = ProviderPolicy::load(&path).unwrap_err().to_string();
        assert!(e.contains("deniedOrgs[1]") && e.contains("\"Evil Corp\""), "{e}");
        std::fs::remove_dir_all(&dir).ok();
    }
}

//! Memory quantities ("40Gi", "80G", "1.5Ti") as MiB, for comparing a job's
//! `gpus.minMemory` with what NVML reports (always MiB).

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("{0:?} is not a memory quantity such as \"40Gi\"")]
pub struct QuantityError(pub String);

/// Parses a Kubernetes quantity into whole MiB, rounding up so a job asking
/// for "40G" never lands on a GPU with a few bytes less.
pub fn to_mib(q: &str) -> Result<u64, QuantityError> {
    let err = || QuantityError(q.to_string());
    let split = q.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(q.len());
    let (num, suffix) = q.split_at(split);
    let multiplier: f64 = match suffix {
        "" => 1.0,
        "k" => 1e3,
        "M" => 1e6,
        "G" => 1e9,
        "T" => 1e12,
        "Ki" => 1024.0,
        "Mi" => 1024.0 * 1024.0,
        "Gi" => 1024.0 * 1024.0 * 1024.0,
        "Ti" => 1024.0 * 1024.0 * 1024.0 * 1024.0,
        _ => return Err(err()),
    };
    if num.is_empty() || num.matches('.').count() > 1 {
        return Err(err());
    }
    let value: f64 = num.parse().map_err(|_| err())?;
    let bytes = value * multiplier;
    if !bytes.is_finite() || !(0.0..=1e18).contains(&bytes) {
        return Err(err());
    }
    Ok((bytes / (1024.0 * 1024.0)).ceil() as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_binary_and_decimal_suffixes() {
        assert_eq!(to_mib("40Gi"), Ok(40 * 1024));
        assert_eq!(to_mib("1.5Ti"), Ok(1536 * 1024));
        assert_eq!(to_mib("512Mi"), Ok(512));
        assert_eq!(to_mib("80G"), Ok(76294));
        assert_eq!(to_mib("1"), Ok(1));
    }

    #[test]
    fn refuses_garbage() {
        for q in ["", "Gi", "40GB", "-1Gi", "1.2.3Gi", "40 Gi"] {
            assert!(to_mib(q).is_err(), "{q}");
        }
    }
}

//! What an organisation may be called. The name travels in every order, bid
//! and advert, and other members' `allowedOrgs`/`deniedOrgs` match it
//! exactly, so it is checked where it is set (the operator's `--org`, a
//! provider policy's org lists, the chart's values) rather than where it is
//! compared.

/// The chart's values schema states the same rule (a test keeps them equal).
pub const ORG_NAME_PATTERN: &str = "^[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?$";

/// Longest name: a Kubernetes label value, so an org can label objects.
pub const ORG_NAME_MAX: usize = 63;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "organisation name {name:?} is not valid: use 1 to {ORG_NAME_MAX} letters, digits, '-', '_' or '.', starting and ending with a letter or digit"
)]
pub struct OrgNameError {
    pub name: String,
}

/// Checks `name` against [`ORG_NAME_PATTERN`] and [`ORG_NAME_MAX`].
pub fn check_org_name(name: &str) -> Result<(), OrgNameError> {
    let bytes = name.as_bytes();
    let edge = |b: &u8| b.is_ascii_alphanumeric();
    let inner = |b: &u8| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.');
    let ok = (1..=ORG_NAME_MAX).contains(&bytes.len())
        && bytes.first().is_some_and(edge)
        && bytes.last().is_some_and(edge)
        && bytes.iter().all(inner);
    if ok {
        Ok(())
    } else {
        Err(OrgNameError { name: name.into() })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_names_members_use() {
        for n in [
            "acme",
            "a",
            "Acme-Corp",
            "dc_2.eu-west",
            "0x1",
            &"a".repeat(ORG_NAME_MAX),
        ] {
            assert_eq!(check_org_name(n), Ok(()), "{n}");
        }
    }

    #[test]
    fn refuses_names_that_would_not_match_or_label() {
        for n in [
            "",
            "Acme Corp",
            "-acme",
            "acme-",
            ".a",
            "a/b",
            "ä",
            "acme\n",
            &"a".repeat(ORG_NAME_MAX + 1),
        ] {
            let e = check_org_name(n).unwrap_err();
            assert!(e.to_string().contains("letters, digits"), "{n}: {e}");
        }
    }

    /// The chart refuses exactly what the operator refuses.
    #[test]
    fn the_charts_schema_states_the_same_rule() {
        let schema: serde_json::Value =
            serde_json::from_str(include_str!("../../charts/gpupool/values.schema.json")).unwrap();
        let org = &schema["$defs"]["orgName"];
        assert_eq!(org["pattern"], ORG_NAME_PATTERN);
        assert_eq!(org["maxLength"], ORG_NAME_MAX);
        assert_eq!(org["minLength"], 1);
    }
}

//! Token amounts written as decimal strings ("2.50") in resources, held as
//! integer base units (18 decimals, as ERC-20 tokens usually have) in code, so
//! prices are compared and multiplied without floating-point rounding.

use std::fmt;
use std::str::FromStr;

/// Decimal places of one token.
pub const DECIMALS: u32 = 18;
const SCALE: u128 = 10u128.pow(DECIMALS);

/// The CEL-compatible pattern the CRDs use, kept next to the parser so both
/// accept exactly the same strings.
pub const DECIMAL_PATTERN: &str = "^(0|[1-9][0-9]{0,11})([.][0-9]{1,18})?$";

/// An amount of tokens in base units.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct TokenAmount(pub u128);

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PriceError {
    #[error("{0:?} is not a decimal token amount such as \"2.50\"")]
    Malformed(String),
    #[error("{0:?} has more than {DECIMALS} decimal places")]
    TooPrecise(String),
    #[error("{0:?} is too large")]
    TooLarge(String),
}

impl FromStr for TokenAmount {
    type Err = PriceError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let malformed = || PriceError::Malformed(s.to_string());
        let (whole, frac) = match s.split_once('.') {
            Some((w, f)) => (w, f),
            None => (s, ""),
        };
        if whole.is_empty() || !whole.bytes().all(|b| b.is_ascii_digit()) || (whole.len() > 1 && whole.starts_with('0'))
        {
            return Err(malformed());
        }
        if s.contains('.') && frac.is_empty() {
            return Err(malformed());
        }
        if !frac.bytes().all(|b| b.is_ascii_digit()) {
            return Err(malformed());
        }
        if frac.len() > DECIMALS as usize {
            return Err(PriceError::TooPrecise(s.to_string()));
        }
        let too_large = || PriceError::TooLarge(s.to_string());
        if whole.len() > 12 {
            return Err(too_large());
        }
        let whole: u128 = whole.parse().map_err(|_| too_large())?;
        let mut frac_units: u128 = 0;
        for b in frac.bytes() {
            frac_units = frac_units * 10 + u128::from(b - b'0');
        }
        frac_units *= 10u128.pow(DECIMALS - frac.len() as u32);
        whole
            .checked_mul(SCALE)
            .and_then(|w| w.checked_add(frac_units))
            .map(TokenAmount)
            .ok_or_else(too_large)
    }
}

impl fmt::Display for TokenAmount {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let whole = self.0 / SCALE;
        let frac = self.0 % SCALE;
        if frac == 0 {
            return write!(f, "{whole}");
        }
        let digits = format!("{frac:018}");
        write!(f, "{whole}.{}", digits.trim_end_matches('0'))
    }
}

/// Decimal places shown to people: tables, progress lines, status messages.
pub const SHOWN_DECIMALS: u32 = 6;

impl TokenAmount {
    /// The amount rounded (half up) to [`SHOWN_DECIMALS`] places, for
    /// people. A lease's rate is a whole number of base units per second, so
    /// its deposit and payments come out as 4.3999999999999992 where the
    /// renter thinks 4.4, and a refund as 4.395111111111110312. A positive
    /// amount below the last place shows as `<0.000001`, never as nothing.
    /// What machines read (`-o json|yaml`, resource fields, the Pool API)
    /// stays exact.
    pub fn shown(self) -> String {
        let unit = 10u128.pow(DECIMALS - SHOWN_DECIMALS);
        let rounded = self.0.saturating_add(unit / 2) / unit * unit;
        if rounded == 0 && self.0 > 0 {
            return format!("<{}", TokenAmount(unit));
        }
        TokenAmount(rounded).to_string()
    }

    /// The cost of `gpus` GPUs at this hourly price for `seconds`, rounded down
    /// to a base unit: the renter is never charged for a fraction it did not use.
    pub fn for_gpu_seconds(self, gpus: u32, seconds: u64) -> Option<TokenAmount> {
        self.0
            .checked_mul(u128::from(gpus))?
            .checked_mul(u128::from(seconds))
            .map(|v| TokenAmount(v / 3600))
    }
}

/// A decimal amount from a resource or the Pool API, for people
/// ([`TokenAmount::shown`]); one that does not parse is shown as it is.
pub fn shown(amount: &str) -> String {
    amount
        .parse::<TokenAmount>()
        .map_or_else(|_| amount.to_string(), TokenAmount::shown)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn amounts_are_shown_to_six_places_rounded_half_up() {
        for (exact, shown) in [
            ("4.3999999999999992", "4.4"),
            ("4.395111111111110312", "4.395111"),
            ("0.004888888888888888", "0.004889"),
            ("0.0000005", "0.000001"),
            ("0.000000499999999999", "<0.000001"),
            ("0.000000000000000001", "<0.000001"),
            ("0.9999995", "1"),
            ("0", "0"),
            ("2.5", "2.5"),
            ("999999999999.9999999", "1000000000000"),
        ] {
            assert_eq!(super::shown(exact), shown, "{exact}");
        }
        assert_eq!(super::shown("-"), "-");
        assert_eq!(super::shown(""), "");
    }

    #[test]
    fn parses_and_prints_round_trip() {
        for s in [
            "0",
            "2",
            "2.5",
            "0.000000000000000001",
            "123456789012.123456789012345678",
        ] {
            let a: TokenAmount = s.parse().unwrap();
            assert_eq!(a.to_string(), s);
        }
        assert_eq!("2.50".parse::<TokenAmount>().unwrap().to_string(), "2.5");
        assert_eq!("1.5".parse::<TokenAmount>().unwrap().0, 1_500_000_000_000_000_000);
    }

    #[test]
    fn refuses_bad_amounts() {
        for s in ["", "-1", "1.", ".5", "1e3", "abc", "1.2.3", " 1", "+1", "01"] {
            assert!(matches!(s.parse::<TokenAmount>(), Err(PriceError::Malformed(_))), "{s}");
        }
        assert!(matches!(
            "1.0000000000000000001".parse::<TokenAmount>(),
            Err(PriceError::TooPrecise(_))
        ));
        assert!(matches!(
            "1000000000000".parse::<TokenAmount>(),
            Err(PriceError::TooLarge(_))
        ));
    }

    #[test]
    fn every_crd_price_rule_uses_the_parsers_pattern() {
        let rule = format!("self.matches('{DECIMAL_PATTERN}')");
        for crd in crate::yaml::crds() {
            let json = serde_json::to_string(&crd).unwrap();
            let name = crd.metadata.name.unwrap_or_default();
            if json.contains("pricePerGpuHour") || json.contains("PricePerGpuHour") {
                assert!(json.contains(&rule), "{name} has a price rule other than {rule}");
            }
        }
    }

    /// A price list the chart accepts is one the operator's policy loader accepts.
    #[test]
    fn the_charts_price_rule_is_the_parsers() {
        let schema: serde_json::Value =
            serde_json::from_str(include_str!("../../charts/gpupool/values.schema.json")).unwrap();
        let price = &schema["properties"]["pool"]["properties"]["policy"]["properties"]["prices"]["items"]["properties"]
            ["pricePerGpuHour"];
        assert_eq!(price["pattern"], DECIMAL_PATTERN);
        assert_eq!(
            schema["$defs"]["tokenAmount"]["pattern"], DECIMAL_PATTERN,
            "the sweep's amounts"
        );
    }

    #[test]
    fn cost_is_rounded_down() {
        let p: TokenAmount = "3.6".parse().unwrap();
        assert_eq!(p.for_gpu_seconds(2, 3600).unwrap().to_string(), "7.2");
        assert_eq!(p.for_gpu_seconds(1, 1).unwrap().to_string(), "0.001");
        assert_eq!(TokenAmount(1).for_gpu_seconds(1, 1).unwrap(), TokenAmount(0));
    }
}

//! Whether a GPU product satisfies what a job asked for.

/// Splits a product or model name into lowercase alphanumeric tokens.
fn tokens(s: &str) -> impl Iterator<Item = String> + '_ {
    s.split(|c: char| !c.is_ascii_alphanumeric())
        .filter(|t| !t.is_empty())
        .map(|t| t.to_ascii_lowercase())
}

/// A product matches a model when every token of the model is a token of the
/// product: "H100" and "a100 40gb" match "NVIDIA A100-SXM4-40GB"'s and
/// "NVIDIA H100 80GB HBM3"'s tokens exactly, while "L40" does not match "L40S".
/// An empty model list accepts any product.
pub fn product_matches(models: &[String], product: &str) -> bool {
    if models.is_empty() {
        return true;
    }
    let product_tokens: Vec<String> = tokens(product).collect();
    models.iter().any(|model| {
        let mut model_tokens = tokens(model).peekable();
        model_tokens.peek().is_some() && model_tokens.all(|t| product_tokens.contains(&t))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn m(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn matches_by_whole_tokens() {
        assert!(product_matches(&m(&["H100"]), "NVIDIA H100 80GB HBM3"));
        assert!(product_matches(&m(&["h100-80gb"]), "NVIDIA H100 80GB HBM3"));
        assert!(product_matches(&m(&["A100 40GB"]), "NVIDIA A100-SXM4-40GB"));
        assert!(product_matches(&m(&["NVIDIA-L40S"]), "NVIDIA L40S"));
        assert!(!product_matches(&m(&["L40"]), "NVIDIA L40S"));
        assert!(!product_matches(&m(&["H100"]), "NVIDIA A100-SXM4-40GB"));
        assert!(!product_matches(&m(&["---"]), "NVIDIA A100-SXM4-40GB"));
        assert!(product_matches(&m(&["B200", "A100"]), "NVIDIA A100-SXM4-40GB"));
        assert!(product_matches(&[], "anything"));
    }
}

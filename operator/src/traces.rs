//! Span export over OTLP/gRPC, for SREs who follow a placement through the
//! clusters it crosses. Off unless an endpoint is configured; then every span
//! the operator's own code opens (not those of its libraries, which would
//! bury a job's trace under one trace per HTTP request) is batched and sent.

use opentelemetry::KeyValue;
use opentelemetry::trace::TracerProvider as _;
use opentelemetry_otlp::WithExportConfig;
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::trace::SdkTracerProvider;
use tracing::Subscriber;
use tracing_subscriber::Layer;
use tracing_subscriber::filter::filter_fn;
use tracing_subscriber::registry::LookupSpan;

#[derive(Debug, thiserror::Error)]
pub enum TraceExportError {
    #[error("OTLP exporter for {endpoint}: {source}")]
    Exporter {
        endpoint: String,
        #[source]
        source: opentelemetry_otlp::ExporterBuildError,
    },
}

/// Spans of these crates are exported; everything else only logs.
const OURS: [&str; 2] = ["gpupool_operator", "gpupool_chain"];

fn ours(target: &str) -> bool {
    OURS.iter()
        .any(|c| target == *c || target.starts_with(&format!("{c}::")))
}

/// The tracing layer that exports spans, and the provider to flush at exit.
/// `org` names the organisation on every span, so a trace that crosses
/// clusters shows which of them did what.
pub fn layer<S>(
    endpoint: &str,
    org: &str,
) -> Result<(impl Layer<S> + Send + Sync + 'static, SdkTracerProvider), TraceExportError>
where
    S: Subscriber + for<'a> LookupSpan<'a> + Send + Sync,
{
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_tonic()
        .with_endpoint(endpoint)
        .build()
        .map_err(|source| TraceExportError::Exporter {
            endpoint: endpoint.to_string(),
            source,
        })?;
    let resource = Resource::builder()
        .with_service_name("gpupool-operator")
        .with_attributes([
            KeyValue::new("gpupool.org", org.to_string()),
            KeyValue::new("service.version", env!("CARGO_PKG_VERSION")),
        ])
        .build();
    let provider = SdkTracerProvider::builder()
        .with_batch_exporter(exporter)
        .with_resource(resource)
        .build();
    let tracer = provider.tracer("gpupool-operator");
    let layer = tracing_opentelemetry::layer()
        .with_tracer(tracer)
        .with_filter(filter_fn(|meta| ours(meta.target())));
    Ok((layer, provider))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_our_crates_are_exported() {
        assert!(ours("gpupool_operator"));
        assert!(ours("gpupool_operator::controller"));
        assert!(ours("gpupool_chain::client"));
        assert!(!ours("gpupool_operatorx"));
        assert!(!ours("kube_runtime::controller"));
        assert!(!ours("hyper"));
    }
}

//! Metrics over OTLP/gRPC, beside the Prometheus endpoint, for SREs whose
//! pipeline is an OpenTelemetry Collector rather than a scraper.
//!
//! The Prometheus registry in `telemetry` stays the one place metrics are
//! defined and recorded: every interval its families are read as Prometheus
//! protobuf and translated here, so the two outputs can never disagree on a
//! name, a label or a value. Counters become cumulative monotonic sums
//! without the `_total` suffix (an OTLP-to-Prometheus exporter adds it back,
//! so dashboards query the same names either way), gauges become gauges, and
//! histograms keep their explicit buckets.

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use opentelemetry_proto::tonic::collector::metrics::v1::ExportMetricsServiceRequest;
use opentelemetry_proto::tonic::collector::metrics::v1::metrics_service_client::MetricsServiceClient;
use opentelemetry_proto::tonic::common::v1::{AnyValue, InstrumentationScope, KeyValue, any_value};
use opentelemetry_proto::tonic::metrics::v1::{
    AggregationTemporality, Gauge, Histogram, HistogramDataPoint, Metric, NumberDataPoint, ResourceMetrics,
    ScopeMetrics, Sum, metric, number_data_point,
};
use opentelemetry_proto::tonic::resource::v1::Resource;
use prometheus_client::encoding::prometheus_protobuf::prometheus_data_model as prom;
use tracing::{debug, info, warn};

use crate::telemetry::Metrics;

#[derive(Debug, thiserror::Error)]
pub enum MetricExportError {
    #[error("OTLP metrics endpoint {endpoint:?}: {source}")]
    Endpoint {
        endpoint: String,
        #[source]
        source: tonic::transport::Error,
    },
}

fn text(key: &str, value: &str) -> KeyValue {
    KeyValue {
        key: key.to_string(),
        value: Some(AnyValue {
            value: Some(any_value::Value::StringValue(value.to_string())),
        }),
        ..Default::default()
    }
}

/// The resource every export names: the service, the organisation, so one
/// collector can take the whole pool's metrics apart, and the replica, so
/// the series of a leader and its standby never collide.
pub fn resource(org: &str, instance: &str) -> Resource {
    Resource {
        attributes: vec![
            text("service.name", "gpupool-operator"),
            text("service.version", env!("CARGO_PKG_VERSION")),
            text("service.instance.id", instance),
            text("gpupool.org", org),
        ],
        ..Default::default()
    }
}

fn attributes(m: &prom::Metric) -> Vec<KeyValue> {
    m.label.iter().map(|l| text(&l.name, &l.value)).collect()
}

fn number(m: &prom::Metric, value: f64, start_ns: u64, now_ns: u64) -> NumberDataPoint {
    NumberDataPoint {
        attributes: attributes(m),
        start_time_unix_nano: start_ns,
        time_unix_nano: now_ns,
        value: Some(number_data_point::Value::AsDouble(value)),
        ..Default::default()
    }
}

/// Prometheus buckets are cumulative and end at +Inf; OTLP's count each
/// bucket on its own, with the finite bounds listed and the overflow bucket
/// implied after them.
fn histogram_point(m: &prom::Metric, h: &prom::Histogram, start_ns: u64, now_ns: u64) -> HistogramDataPoint {
    let mut explicit_bounds = Vec::with_capacity(h.bucket.len());
    let mut bucket_counts = Vec::with_capacity(h.bucket.len() + 1);
    let mut below = 0u64;
    for b in &h.bucket {
        bucket_counts.push(b.cumulative_count.saturating_sub(below));
        below = b.cumulative_count;
        if b.upper_bound.is_finite() {
            explicit_bounds.push(b.upper_bound);
        }
    }
    if h.bucket.last().is_none_or(|b| b.upper_bound.is_finite()) {
        bucket_counts.push(h.sample_count.saturating_sub(below));
    }
    HistogramDataPoint {
        attributes: attributes(m),
        start_time_unix_nano: start_ns,
        time_unix_nano: now_ns,
        count: h.sample_count,
        sum: Some(h.sample_sum),
        bucket_counts,
        explicit_bounds,
        ..Default::default()
    }
}

fn translate(f: &prom::MetricFamily, start_ns: u64, now_ns: u64) -> Option<Metric> {
    let cumulative = AggregationTemporality::Cumulative as i32;
    let (name, data) = match prom::MetricType::try_from(f.r#type).ok()? {
        prom::MetricType::Counter => (
            f.name.strip_suffix("_total").unwrap_or(&f.name),
            metric::Data::Sum(Sum {
                data_points: f
                    .metric
                    .iter()
                    .filter_map(|m| Some(number(m, m.counter.as_ref()?.value, start_ns, now_ns)))
                    .collect(),
                aggregation_temporality: cumulative,
                is_monotonic: true,
            }),
        ),
        prom::MetricType::Gauge => (
            f.name.as_str(),
            metric::Data::Gauge(Gauge {
                data_points: f
                    .metric
                    .iter()
                    .filter_map(|m| Some(number(m, m.gauge.as_ref()?.value, start_ns, now_ns)))
                    .collect(),
            }),
        ),
        prom::MetricType::Histogram => (
            f.name.as_str(),
            metric::Data::Histogram(Histogram {
                data_points: f
                    .metric
                    .iter()
                    .filter_map(|m| Some(histogram_point(m, m.histogram.as_ref()?, start_ns, now_ns)))
                    .collect(),
                aggregation_temporality: cumulative,
            }),
        ),
        // The operator registers none of the others.
        _ => return None,
    };
    Some(Metric {
        name: name.to_string(),
        description: f.help.clone(),
        unit: f.unit.clone(),
        data: Some(data),
        ..Default::default()
    })
}

/// One export request from the registry's families. Pure, so the mapping is
/// tested without a collector.
pub fn to_request(
    families: &[prom::MetricFamily],
    resource: Resource,
    start_ns: u64,
    now_ns: u64,
) -> ExportMetricsServiceRequest {
    ExportMetricsServiceRequest {
        resource_metrics: vec![ResourceMetrics {
            resource: Some(resource),
            scope_metrics: vec![ScopeMetrics {
                scope: Some(InstrumentationScope {
                    name: "gpupool-operator".into(),
                    version: env!("CARGO_PKG_VERSION").into(),
                    ..Default::default()
                }),
                metrics: families.iter().filter_map(|f| translate(f, start_ns, now_ns)).collect(),
                schema_url: String::new(),
            }],
            schema_url: String::new(),
        }],
    }
}

fn now_ns() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
}

/// Checks the endpoint and starts exporting every `every` until the
/// process ends. A collector that is down or refuses an export costs one
/// interval's point (the next export carries the cumulative values again)
/// and a log line, never the operator.
pub fn start(
    endpoint: &str,
    org: &str,
    instance: &str,
    metrics: Arc<Metrics>,
    every: Duration,
) -> Result<tokio::task::JoinHandle<()>, MetricExportError> {
    let channel = tonic::transport::Endpoint::from_shared(endpoint.to_string())
        .map_err(|source| MetricExportError::Endpoint {
            endpoint: endpoint.to_string(),
            source,
        })?
        .connect_timeout(Duration::from_secs(5))
        .timeout(Duration::from_secs(10))
        .connect_lazy();
    let mut client = MetricsServiceClient::new(channel);
    let resource = resource(org, instance);
    let endpoint = endpoint.to_string();
    info!(%endpoint, every = ?every, "exporting metrics over OTLP");
    Ok(tokio::spawn(async move {
        let start_ns = now_ns();
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut failing = false;
        loop {
            tick.tick().await;
            let request = to_request(&metrics.families(), resource.clone(), start_ns, now_ns());
            match client.export(request).await {
                Ok(_) if failing => {
                    info!(%endpoint, "OTLP metrics export works again");
                    failing = false;
                }
                Ok(_) => debug!("metrics exported"),
                Err(status) if !failing => {
                    warn!(%endpoint, error = %status, "OTLP metrics export failed; retrying every interval");
                    failing = true;
                }
                Err(status) => debug!(error = %status, "OTLP metrics export still failing"),
            }
        }
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::capacity::NodeGpus;
    use opentelemetry_proto::tonic::metrics::v1::metric::Data;

    fn find<'a>(r: &'a ExportMetricsServiceRequest, name: &str) -> &'a Metric {
        r.resource_metrics[0].scope_metrics[0]
            .metrics
            .iter()
            .find(|m| m.name == name)
            .unwrap_or_else(|| panic!("{name} missing"))
    }

    fn attr(kvs: &[KeyValue], key: &str) -> Option<String> {
        kvs.iter()
            .find(|k| k.key == key)
            .and_then(|k| match k.value.as_ref()?.value.as_ref()? {
                any_value::Value::StringValue(s) => Some(s.clone()),
                _ => None,
            })
    }

    #[test]
    fn every_kind_the_operator_records_is_translated() {
        let m = Metrics::default();
        m.reconciled(Duration::from_millis(3));
        m.reconciled(Duration::from_millis(3));
        m.reconciled(Duration::from_secs(100));
        m.message_dropped("replayed");
        m.observe_inventory(&[NodeGpus {
            node: "n1".into(),
            product: "NVIDIA H100 80GB HBM3".into(),
            memory_mib: 81559,
            healthy: 8,
            allocated: 3,
        }]);
        let r = to_request(&m.families(), resource("acme", "gpupool-operator-7d9f-x2"), 1, 2);
        let attrs = &r.resource_metrics[0].resource.as_ref().unwrap().attributes;
        assert_eq!(attr(attrs, "gpupool.org").as_deref(), Some("acme"));
        assert_eq!(
            attr(attrs, "service.instance.id").as_deref(),
            Some("gpupool-operator-7d9f-x2")
        );

        let Some(Data::Sum(s)) = &find(&r, "gpupool_aijob_reconciles").data else {
            panic!("a counter is a sum")
        };
        assert!(s.is_monotonic && s.aggregation_temporality == AggregationTemporality::Cumulative as i32);
        assert_eq!(s.data_points[0].value, Some(number_data_point::Value::AsDouble(3.0)));
        assert_eq!(
            (s.data_points[0].start_time_unix_nano, s.data_points[0].time_unix_nano),
            (1, 2)
        );

        let Some(Data::Sum(d)) = &find(&r, "gpupool_pool_messages_dropped").data else {
            panic!("labelled counter")
        };
        assert_eq!(
            attr(&d.data_points[0].attributes, "reason").as_deref(),
            Some("replayed")
        );

        let Some(Data::Gauge(g)) = &find(&r, "gpupool_gpus").data else {
            panic!("a gauge")
        };
        let free = g
            .data_points
            .iter()
            .find(|p| attr(&p.attributes, "state").as_deref() == Some("free"))
            .unwrap();
        assert_eq!(free.value, Some(number_data_point::Value::AsDouble(5.0)));

        let Some(Data::Histogram(h)) = &find(&r, "gpupool_aijob_reconcile_duration_seconds").data else {
            panic!("a histogram")
        };
        let p = &h.data_points[0];
        assert_eq!(p.count, 3);
        assert_eq!(
            p.bucket_counts.len(),
            p.explicit_bounds.len() + 1,
            "plus the overflow bucket"
        );
        assert_eq!(p.bucket_counts.iter().sum::<u64>(), 3, "per-bucket, not cumulative");
        assert_eq!(*p.bucket_counts.last().unwrap(), 1, "100 s is past every bound");
        assert!(p.explicit_bounds.iter().all(|b| b.is_finite()));
    }

    #[test]
    fn names_match_the_prometheus_endpoint() {
        let m = Metrics::default();
        m.message_dropped("oversized");
        m.placement("lease_active", 0.4);
        let text = m.render();
        let r = to_request(&m.families(), resource("acme", "a"), 0, 0);
        let metrics = &r.resource_metrics[0].scope_metrics[0].metrics;
        // Labelled families appear once they have a series, as on /metrics.
        for name in [
            "gpupool_aijob_reconciles",
            "gpupool_pool_messages_dropped",
            "gpupool_pool_placement_duration_seconds",
            "gpupool_pool_peers_connected",
        ] {
            assert!(metrics.iter().any(|m| m.name == name), "{name}");
        }
        for metric in metrics {
            let served = match metric.data {
                Some(Data::Sum(_)) => format!("# TYPE {} counter", metric.name),
                Some(Data::Gauge(_)) => format!("# TYPE {} gauge", metric.name),
                Some(Data::Histogram(_)) => format!("# TYPE {} histogram", metric.name),
                _ => unreachable!(),
            };
            assert!(text.contains(&served), "{served} not on /metrics");
        }
    }
}

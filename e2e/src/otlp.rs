//! An OTLP/gRPC receiver for traces and metrics on loopback: the operators
//! under test export to it over the real protocol, as they would to a
//! collector, and tests read back what arrived.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use opentelemetry_proto::tonic::collector::metrics::v1::metrics_service_server::{
    MetricsService, MetricsServiceServer,
};
use opentelemetry_proto::tonic::collector::metrics::v1::{ExportMetricsServiceRequest, ExportMetricsServiceResponse};
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{TraceService, TraceServiceServer};
use opentelemetry_proto::tonic::collector::trace::v1::{ExportTraceServiceRequest, ExportTraceServiceResponse};
use opentelemetry_proto::tonic::common::v1::{AnyValue, KeyValue, any_value};

/// One received span, flattened with its resource's organisation.
#[derive(Clone, Debug)]
pub struct ReceivedSpan {
    /// `gpupool.org` of the exporting operator.
    pub org: String,
    pub name: String,
    pub trace_id: String,
    pub span_id: String,
    /// Empty for a root span.
    pub parent_span_id: String,
    pub attributes: Vec<(String, String)>,
}

impl ReceivedSpan {
    pub fn attribute(&self, key: &str) -> Option<&str> {
        self.attributes.iter().find(|(k, _)| k == key).map(|(_, v)| v.as_str())
    }
}

/// One data point of a received metric, flattened with its resource's
/// organisation.
#[derive(Clone, Debug)]
pub struct ReceivedPoint {
    pub org: String,
    pub metric: String,
    /// "sum" (monotonic), "gauge" or "histogram".
    pub kind: &'static str,
    pub attributes: Vec<(String, String)>,
    /// The number; a histogram's count.
    pub value: f64,
}

impl ReceivedPoint {
    pub fn attribute(&self, key: &str) -> Option<&str> {
        self.attributes.iter().find(|(k, _)| k == key).map(|(_, v)| v.as_str())
    }
}

#[derive(Clone, Default)]
struct Sink {
    spans: Arc<Mutex<Vec<ReceivedSpan>>>,
    points: Arc<Mutex<Vec<ReceivedPoint>>>,
}

fn org_of(resource: Option<opentelemetry_proto::tonic::resource::v1::Resource>) -> String {
    resource
        .map(|r| pairs(&r.attributes))
        .unwrap_or_default()
        .into_iter()
        .find(|(k, _)| k == "gpupool.org")
        .map(|(_, v)| v)
        .unwrap_or_default()
}

fn text(v: &Option<AnyValue>) -> String {
    match v.as_ref().and_then(|v| v.value.as_ref()) {
        Some(any_value::Value::StringValue(s)) => s.clone(),
        Some(any_value::Value::IntValue(i)) => i.to_string(),
        Some(any_value::Value::BoolValue(b)) => b.to_string(),
        Some(any_value::Value::DoubleValue(d)) => d.to_string(),
        Some(other) => format!("{other:?}"),
        None => String::new(),
    }
}

fn pairs(kvs: &[KeyValue]) -> Vec<(String, String)> {
    kvs.iter().map(|kv| (kv.key.clone(), text(&kv.value))).collect()
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[tonic::async_trait]
impl TraceService for Sink {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let mut received = Vec::new();
        for rs in request.into_inner().resource_spans {
            let org = org_of(rs.resource);
            for span in rs.scope_spans.into_iter().flat_map(|s| s.spans) {
                received.push(ReceivedSpan {
                    org: org.clone(),
                    name: span.name,
                    trace_id: hex(&span.trace_id),
                    span_id: hex(&span.span_id),
                    parent_span_id: hex(&span.parent_span_id),
                    attributes: pairs(&span.attributes),
                });
            }
        }
        // Poisoned only if a test panicked while reading; the spans are still good.
        self.spans.lock().unwrap_or_else(|e| e.into_inner()).extend(received);
        Ok(tonic::Response::new(ExportTraceServiceResponse {
            partial_success: None,
        }))
    }
}

#[tonic::async_trait]
impl MetricsService for Sink {
    async fn export(
        &self,
        request: tonic::Request<ExportMetricsServiceRequest>,
    ) -> Result<tonic::Response<ExportMetricsServiceResponse>, tonic::Status> {
        use opentelemetry_proto::tonic::metrics::v1::metric::Data;
        use opentelemetry_proto::tonic::metrics::v1::number_data_point::Value;
        let number = |v: &Option<Value>| match v {
            Some(Value::AsDouble(d)) => *d,
            Some(Value::AsInt(i)) => *i as f64,
            None => f64::NAN,
        };
        let mut received = Vec::new();
        for rm in request.into_inner().resource_metrics {
            let org = org_of(rm.resource);
            for m in rm.scope_metrics.into_iter().flat_map(|s| s.metrics) {
                let point = |kind, attributes: &[KeyValue], value| ReceivedPoint {
                    org: org.clone(),
                    metric: m.name.clone(),
                    kind,
                    attributes: pairs(attributes),
                    value,
                };
                match &m.data {
                    Some(Data::Sum(s)) if s.is_monotonic => received.extend(
                        s.data_points
                            .iter()
                            .map(|p| point("sum", &p.attributes, number(&p.value))),
                    ),
                    Some(Data::Gauge(g)) => received.extend(
                        g.data_points
                            .iter()
                            .map(|p| point("gauge", &p.attributes, number(&p.value))),
                    ),
                    Some(Data::Histogram(h)) => received.extend(
                        h.data_points
                            .iter()
                            .map(|p| point("histogram", &p.attributes, p.count as f64)),
                    ),
                    _ => {}
                }
            }
        }
        self.points.lock().unwrap_or_else(|e| e.into_inner()).extend(received);
        Ok(tonic::Response::new(ExportMetricsServiceResponse {
            partial_success: None,
        }))
    }
}

/// A running receiver; stops when dropped.
pub struct OtlpReceiver {
    pub addr: SocketAddr,
    sink: Sink,
    task: tokio::task::JoinHandle<()>,
}

impl OtlpReceiver {
    pub async fn start() -> anyhow::Result<Self> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let sink = Sink::default();
        let traces = TraceServiceServer::new(sink.clone());
        let metrics = MetricsServiceServer::new(sink.clone());
        let task = tokio::spawn(async move {
            let incoming = tokio_stream_from(listener);
            if let Err(e) = tonic::transport::Server::builder()
                .add_service(traces)
                .add_service(metrics)
                .serve_with_incoming(incoming)
                .await
            {
                tracing::warn!(error = %e, "OTLP receiver stopped");
            }
        });
        Ok(Self { addr, sink, task })
    }

    /// The endpoint to give exporters.
    pub fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Every span received so far.
    pub fn spans(&self) -> Vec<ReceivedSpan> {
        self.sink.spans.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Every metric data point received so far, oldest export first.
    pub fn points(&self) -> Vec<ReceivedPoint> {
        self.sink.points.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

impl Drop for OtlpReceiver {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn tokio_stream_from(
    listener: tokio::net::TcpListener,
) -> impl futures::Stream<Item = std::io::Result<tokio::net::TcpStream>> {
    futures::stream::unfold(listener, |l| async move {
        let conn = l.accept().await.map(|(s, _)| s);
        Some((conn, l))
    })
}

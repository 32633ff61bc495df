//! W3C trace context for jobs and peer messages, so that one trace follows a
//! job from the renter's cluster through every provider it reaches and back.
//!
//! A job's trace is rooted where the operator first accepts it and recorded
//! in its `gpupool.dev/traceparent` annotation; every reconcile of the job,
//! every peer message sent while handling it, and the provider's own copy of
//! the workload continue that trace. When tracing is off, spans carry no
//! OpenTelemetry context and everything here yields nothing.

use std::collections::BTreeMap;

use gpupool_crds::ANNOTATION_TRACEPARENT;
use kube::ResourceExt;
use opentelemetry::Context;
use opentelemetry::propagation::{Extractor, Injector, TextMapPropagator};
use opentelemetry::trace::{SpanContext, SpanId, TraceContextExt, TraceFlags, TraceId, TraceState};
use opentelemetry_sdk::propagation::TraceContextPropagator;
use tracing_opentelemetry::OpenTelemetrySpanExt;

const TRACEPARENT: &str = "traceparent";

struct Carrier<'a>(&'a mut BTreeMap<String, String>);

impl Injector for Carrier<'_> {
    fn set(&mut self, key: &str, value: String) {
        self.0.insert(key.to_string(), value);
    }
}

struct Reader<'a>(&'a BTreeMap<String, String>);

impl Extractor for Reader<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).map(String::as_str)
    }
    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(String::as_str).collect()
    }
}

/// The W3C headers of `cx`; empty when it holds no valid span.
pub fn inject(cx: &Context) -> BTreeMap<String, String> {
    let mut headers = BTreeMap::new();
    if cx.span().span_context().is_valid() {
        TraceContextPropagator::new().inject_context(cx, &mut Carrier(&mut headers));
    }
    headers
}

/// The remote parent that `headers` name; None unless they hold a valid
/// `traceparent`.
pub fn extract(headers: &BTreeMap<String, String>) -> Option<Context> {
    // Peers send these: hold them to the W3C shape before anything parses
    // them (the propagator accepts ids of any length).
    if !headers.get(TRACEPARENT).is_some_and(|v| well_formed(v)) {
        return None;
    }
    let cx = TraceContextPropagator::new().extract(&Reader(headers));
    cx.span().span_context().is_valid().then_some(cx)
}

/// `version-traceid-spanid-flags` as lowercase hex of 2, 32, 16 and 2 digits.
fn well_formed(traceparent: &str) -> bool {
    let parts: Vec<&str> = traceparent.split('-').collect();
    let hex = |s: &str, n: usize| s.len() == n && s.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
    parts.len() == 4 && hex(parts[0], 2) && hex(parts[1], 32) && hex(parts[2], 16) && hex(parts[3], 2)
}

/// The current span's context as W3C headers, for an outgoing message.
pub fn current_headers() -> BTreeMap<String, String> {
    inject(&tracing::Span::current().context())
}

/// The current span's `traceparent`, for an object created on its behalf.
pub fn current_traceparent() -> Option<String> {
    current_headers().remove(TRACEPARENT)
}

/// Parses a `traceparent` value.
pub fn from_traceparent(value: &str) -> Option<Context> {
    extract(&BTreeMap::from([(TRACEPARENT.to_string(), value.to_string())]))
}

/// Where an object's spans hang: its `gpupool.dev/traceparent` annotation,
/// or, for one that has none (created before tracing was turned on), a trace
/// whose id is the object's UID, so that its spans still form one trace.
pub fn parent_of(obj: &impl ResourceExt) -> Option<Context> {
    if let Some(cx) = obj
        .annotations()
        .get(ANNOTATION_TRACEPARENT)
        .and_then(|v| from_traceparent(v))
    {
        return Some(cx);
    }
    uid_context(obj.uid().as_deref()?)
}

/// A sampled remote parent derived from a UID: the UUID's 128 bits are the
/// trace id and its low 64 bits the (never exported) parent span id.
fn uid_context(uid: &str) -> Option<Context> {
    let hex: String = uid.chars().filter(|c| *c != '-').collect();
    let bits = u128::from_str_radix(&hex, 16).ok().filter(|_| hex.len() == 32)?;
    let span = (bits as u64).max(1);
    let sc = SpanContext::new(
        TraceId::from_bytes(bits.to_be_bytes()),
        SpanId::from_bytes(span.to_be_bytes()),
        TraceFlags::SAMPLED,
        true,
        TraceState::NONE,
    );
    sc.is_valid().then(|| Context::new().with_remote_span_context(sc))
}

/// The trace id of a context, as trace UIs print it.
pub fn trace_id(cx: &Context) -> String {
    cx.span().span_context().trace_id().to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    const TP: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    #[test]
    fn traceparent_round_trips_and_garbage_yields_nothing() {
        let cx = from_traceparent(TP).unwrap();
        assert_eq!(trace_id(&cx), "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_eq!(inject(&cx).get(TRACEPARENT).map(String::as_str), Some(TP));
        let upper = TP.to_uppercase();
        for bad in [
            "",
            "00-abc-def-01",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "ff-x",
            &upper,
            &format!("{TP}-extra"),
        ] {
            assert!(from_traceparent(bad).is_none(), "{bad:?}");
        }
        assert!(inject(&Context::new()).is_empty());
        assert!(extract(&BTreeMap::from([("other".into(), TP.into())])).is_none());
    }

    #[test]
    fn objects_hang_on_their_annotation_else_on_their_uid() {
        let mut job = crate::jobbuild::tests::aijob();
        job.metadata.uid = Some("0f8fad5b-d9cb-469f-a165-70867728950e".into());
        let by_uid = parent_of(&job).unwrap();
        assert_eq!(trace_id(&by_uid), "0f8fad5bd9cb469fa16570867728950e");
        assert!(by_uid.span().span_context().is_sampled());

        job.metadata.annotations = Some(BTreeMap::from([(ANNOTATION_TRACEPARENT.into(), TP.into())]));
        assert_eq!(trace_id(&parent_of(&job).unwrap()), "4bf92f3577b34da6a3ce929d0e0e4736");

        // A broken annotation falls back to the UID; no UUID, no parent.
        job.metadata.annotations = Some(BTreeMap::from([(ANNOTATION_TRACEPARENT.into(), "nonsense".into())]));
        assert_eq!(trace_id(&parent_of(&job).unwrap()), "0f8fad5bd9cb469fa16570867728950e");
        job.metadata.annotations = None;
        job.metadata.uid = Some("uid-1".into());
        assert!(parent_of(&job).is_none());
    }

    #[test]
    fn without_an_exporter_spans_carry_no_context() {
        let span = tracing::info_span!("no subscriber");
        let _g = span.enter();
        assert!(current_headers().is_empty());
        assert!(current_traceparent().is_none());
    }
}

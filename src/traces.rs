//! OpenTelemetry traces (OTLP over HTTP, off unless an endpoint is configured).
//!
//! One trace per invocation: the invocation's span (from its creation to its end) continues
//! the `traceparent` its caller sent; each attempt is a span under it, each journal entry an
//! attempt appended is a span under the attempt, and each egress call a span under the
//! attempt (or under the `traceparent` the handler sent along). Handlers get the attempt's
//! `traceparent`, downstream services the egress call's, and a child invocation hangs under
//! the attempt that started it.
//!
//! An invocation lives longer than a process (and, with several nodes, runs on any of
//! them), so its span ids are not kept anywhere: they are derived from the invocation id
//! (and the attempt number or entry index), and only the caller's `traceparent` is stored.
//! Spans are built when what they cover has ended, with the times the journal recorded.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use opentelemetry::trace::{
    SpanBuilder, SpanContext, SpanId, SpanKind, Status as SpanStatus, TraceContextExt, TraceFlags,
    TraceId, TraceState, Tracer, TracerProvider,
};
use opentelemetry::{Context, KeyValue};
use opentelemetry_sdk::trace::{SdkTracer, SdkTracerProvider};
use sha2::{Digest, Sha256};

use crate::ids::InvocationId;
use crate::store::{InvocationRecord, StoredEntry};

/// The W3C trace context header.
pub const TRACEPARENT: &str = "traceparent";

/// Where spans go, or nowhere.
#[derive(Clone, Default)]
pub struct Traces {
    exporter: Option<(SdkTracerProvider, SdkTracer)>,
}

impl Traces {
    /// Exports nothing.
    pub fn off() -> Traces {
        Traces::default()
    }

    /// Exports spans in batches to the OTLP/HTTP (JSON) collector at `endpoint`, its base
    /// URL (`http://collector:4318`: spans go to `/v1/traces`).
    pub fn otlp(endpoint: &str) -> anyhow::Result<Traces> {
        use opentelemetry_otlp::{Protocol, WithExportConfig};
        let exporter = opentelemetry_otlp::SpanExporter::builder()
            .with_http()
            .with_protocol(Protocol::HttpJson)
            .with_endpoint(format!("{}/v1/traces", endpoint.trim_end_matches('/')))
            .build()?;
        let provider = SdkTracerProvider::builder()
            .with_batch_exporter(exporter)
            .with_resource(
                opentelemetry_sdk::Resource::builder()
                    .with_service_name("durin")
                    .build(),
            )
            .build();
        let tracer = provider.tracer("durin");
        Ok(Traces {
            exporter: Some((provider, tracer)),
        })
    }

    pub fn enabled(&self) -> bool {
        self.exporter.is_some()
    }

    /// Sends what is still buffered and stops exporting.
    pub fn shutdown(&self) {
        if let Some((provider, _)) = &self.exporter {
            if let Err(error) = provider.shutdown() {
                tracing::warn!(%error, "could not flush the last spans");
            }
        }
    }

    /// The `traceparent` a handler gets for `record`'s current attempt; `None` when traces
    /// are off.
    pub fn handler_traceparent(&self, record: &InvocationRecord) -> Option<String> {
        self.enabled().then(|| {
            let trace = InvocationTrace::of(record);
            format_traceparent(
                trace.trace_id,
                attempt_span_id(&record.id, record.attempt),
                trace.sampled,
            )
        })
    }

    /// The attempt of `record` that began at `started_ms` has ended as `outcome`; `entries`
    /// are the journal entries it appended (each gets a span of its own).
    pub fn attempt(
        &self,
        record: &InvocationRecord,
        started_ms: i64,
        ended_ms: i64,
        outcome: &str,
        error: Option<&str>,
        entries: &[StoredEntry],
    ) {
        let Some((_, tracer)) = &self.exporter else {
            return;
        };
        let trace = InvocationTrace::of(record);
        if !trace.sampled {
            return;
        }
        let attempt_id = attempt_span_id(&record.id, record.attempt);
        let mut builder = tracer
            .span_builder(format!("attempt {}", record.attempt))
            .with_kind(SpanKind::Client)
            .with_start_time(time(started_ms))
            .with_attributes(vec![
                KeyValue::new("durin.invocation_id", record.id.to_string()),
                KeyValue::new("durin.service", record.service.clone()),
                KeyValue::new("durin.handler", record.handler.clone()),
                KeyValue::new("durin.attempt", i64::from(record.attempt)),
                KeyValue::new("durin.outcome", outcome.to_owned()),
            ]);
        builder.span_id = Some(attempt_id);
        builder.status = match error {
            Some(error) => SpanStatus::error(error.to_owned()),
            None => SpanStatus::Ok,
        };
        let invocation = trace.context(invocation_span_id(&record.id));
        emit(tracer, builder, &invocation, time(ended_ms.max(started_ms)));

        // An entry's span runs from the attempt's previous event to the entry's record:
        // the time the handler spent on it, as far as the journal can tell.
        let attempt = trace.context(attempt_id);
        let mut since = started_ms;
        for entry in entries {
            let at = entry.at_ms.max(since);
            let name = match &entry.name {
                Some(name) => format!("{} {name}", entry.kind.as_str()),
                None => entry.kind.as_str().to_owned(),
            };
            let mut builder = tracer
                .span_builder(name)
                .with_kind(SpanKind::Internal)
                .with_start_time(time(since))
                .with_attributes(vec![
                    KeyValue::new("durin.invocation_id", record.id.to_string()),
                    KeyValue::new("durin.entry.index", i64::from(entry.index)),
                    KeyValue::new("durin.entry.kind", entry.kind.as_str()),
                ]);
            builder.span_id = Some(entry_span_id(&record.id, entry.index));
            if let Some(failure) = &entry.failure {
                builder.status = SpanStatus::error(failure.message.clone());
            }
            emit(tracer, builder, &attempt, time(at));
            since = at;
        }
    }

    /// `record` has ended (completed, failed, cancelled, terminated, continued): its span,
    /// from its creation to its end.
    pub fn invocation(&self, record: &InvocationRecord) {
        let Some((_, tracer)) = &self.exporter else {
            return;
        };
        let trace = InvocationTrace::of(record);
        if !trace.sampled {
            return;
        }
        let ended_ms = record.completed_at_ms.unwrap_or(record.modified_at_ms);
        let mut builder = tracer
            .span_builder(format!("invoke {}/{}", record.service, record.handler))
            .with_kind(SpanKind::Server)
            .with_start_time(time(record.created_at_ms))
            .with_attributes(vec![
                KeyValue::new("durin.invocation_id", record.id.to_string()),
                KeyValue::new("durin.service", record.service.clone()),
                KeyValue::new("durin.handler", record.handler.clone()),
                KeyValue::new("durin.status", record.status.as_str()),
                KeyValue::new("durin.attempts", i64::from(record.attempt)),
            ]);
        builder.span_id = Some(invocation_span_id(&record.id));
        builder.trace_id = Some(trace.trace_id);
        builder.status = match &record.failure {
            Some(failure) => SpanStatus::error(failure.message.clone()),
            None => SpanStatus::Ok,
        };
        let parent = match trace.parent {
            Some(parent) => trace.context(parent),
            None => Context::new(),
        };
        emit(
            tracer,
            builder,
            &parent,
            time(ended_ms.max(record.created_at_ms)),
        );
    }

    /// Starts an egress call of `record`'s `attempt` (or of the `traceparent` the handler
    /// sent with it): the `traceparent` for the downstream service, and the span to end.
    pub fn egress(
        &self,
        trace: &InvocationTrace,
        id: &InvocationId,
        attempt: u32,
        sent: Option<&str>,
        method: &str,
        url: &str,
    ) -> Option<EgressSpan> {
        let (_, tracer) = self.exporter.as_ref()?;
        let parent = sent
            .and_then(parse_traceparent)
            .filter(|p| p.trace_id == trace.trace_id)
            .map(|p| p.context())
            .unwrap_or_else(|| trace.context(attempt_span_id(id, attempt)));
        let span_id = random_span_id();
        Some(EgressSpan {
            traceparent: format_traceparent(trace.trace_id, span_id, trace.sampled),
            sampled: trace.sampled,
            span_id,
            parent,
            started: SystemTime::now(),
            name: format!("egress {method}"),
            attributes: vec![
                KeyValue::new("durin.invocation_id", id.to_string()),
                KeyValue::new("durin.attempt", i64::from(attempt)),
                KeyValue::new("http.request.method", method.to_owned()),
                KeyValue::new("url.full", url.to_owned()),
            ],
            tracer: tracer.clone(),
        })
    }
}

/// An egress call under way.
pub struct EgressSpan {
    /// What the downstream service gets.
    pub traceparent: String,
    sampled: bool,
    span_id: SpanId,
    parent: Context,
    started: SystemTime,
    name: String,
    attributes: Vec<KeyValue>,
    tracer: SdkTracer,
}

impl EgressSpan {
    /// The call ended with `status` (`None`: no answer) and `outcome` (`recorded`,
    /// `replayed`, `failed`).
    pub fn end(self, status: Option<u16>, outcome: &str) {
        if !self.sampled {
            return;
        }
        let mut attributes = self.attributes;
        attributes.push(KeyValue::new("durin.egress.outcome", outcome.to_owned()));
        if let Some(status) = status {
            attributes.push(KeyValue::new(
                "http.response.status_code",
                i64::from(status),
            ));
        }
        let mut builder = SpanBuilder::from_name(self.name)
            .with_kind(SpanKind::Client)
            .with_start_time(self.started)
            .with_attributes(attributes);
        builder.span_id = Some(self.span_id);
        if status.is_none_or(|s| s >= 500) {
            builder.status = SpanStatus::error("no answer or a server error");
        }
        emit(&self.tracer, builder, &self.parent, SystemTime::now());
    }
}

/// The trace an invocation belongs to and the span its own span hangs under.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct InvocationTrace {
    pub trace_id: TraceId,
    /// The caller's span (or the parent invocation's attempt); `None` for a trace's root.
    pub parent: Option<SpanId>,
    pub sampled: bool,
}

impl InvocationTrace {
    /// From the `traceparent` stored with the invocation; an invocation without one is the
    /// root of a trace whose id is derived from its own.
    pub fn of(record: &InvocationRecord) -> InvocationTrace {
        InvocationTrace::from_stored(&record.id, record.traceparent.as_deref())
    }

    pub fn from_stored(id: &InvocationId, traceparent: Option<&str>) -> InvocationTrace {
        traceparent
            .and_then(parse_traceparent)
            .map(|p| InvocationTrace {
                trace_id: p.trace_id,
                parent: Some(p.span_id),
                sampled: p.sampled,
            })
            .unwrap_or_else(|| InvocationTrace {
                trace_id: TraceId::from_bytes(derive::<16>(id, "trace", 0)),
                parent: None,
                sampled: true,
            })
    }

    fn context(&self, span: SpanId) -> Context {
        let flags = if self.sampled {
            TraceFlags::SAMPLED
        } else {
            TraceFlags::default()
        };
        Context::new().with_remote_span_context(SpanContext::new(
            self.trace_id,
            span,
            flags,
            true,
            TraceState::default(),
        ))
    }
}

/// What a child invocation stores as its `traceparent`: it hangs under the attempt of
/// `parent` that started it.
pub fn child_traceparent(parent: &InvocationId, stored: Option<&str>, attempt: u32) -> String {
    let trace = InvocationTrace::from_stored(parent, stored);
    format_traceparent(
        trace.trace_id,
        attempt_span_id(parent, attempt),
        trace.sampled,
    )
}

/// A parsed W3C `traceparent` (version 00).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TraceParent {
    pub trace_id: TraceId,
    pub span_id: SpanId,
    pub sampled: bool,
}

impl TraceParent {
    fn context(&self) -> Context {
        InvocationTrace {
            trace_id: self.trace_id,
            parent: None,
            sampled: self.sampled,
        }
        .context(self.span_id)
    }
}

/// Parses a `traceparent` header; `None` for anything W3C Trace Context says to ignore.
pub fn parse_traceparent(value: &str) -> Option<TraceParent> {
    let mut parts = value.trim().split('-');
    let version = parts.next()?;
    let trace = parts.next()?;
    let span = parts.next()?;
    let flags = parts.next()?;
    let hex = |s: &str, len: usize| s.len() == len && s.bytes().all(|b| b.is_ascii_hexdigit());
    if !hex(version, 2) || version == "ff" || !hex(trace, 32) || !hex(span, 16) || !hex(flags, 2) {
        return None;
    }
    // Version 00 has exactly four fields; a later version may add some.
    if version == "00" && parts.next().is_some() {
        return None;
    }
    if trace.bytes().any(|b| b.is_ascii_uppercase()) || span.bytes().any(|b| b.is_ascii_uppercase())
    {
        return None;
    }
    let trace_id = TraceId::from_hex(trace).ok()?;
    let span_id = SpanId::from_hex(span).ok()?;
    if trace_id == TraceId::INVALID || span_id == SpanId::INVALID {
        return None;
    }
    let flags = u8::from_str_radix(flags, 16).ok()?;
    Some(TraceParent {
        trace_id,
        span_id,
        sampled: flags & 1 == 1,
    })
}

pub fn format_traceparent(trace: TraceId, span: SpanId, sampled: bool) -> String {
    format!("00-{trace}-{span}-{:02x}", u8::from(sampled))
}

pub fn invocation_span_id(id: &InvocationId) -> SpanId {
    SpanId::from_bytes(derive::<8>(id, "invocation", 0))
}

pub fn attempt_span_id(id: &InvocationId, attempt: u32) -> SpanId {
    SpanId::from_bytes(derive::<8>(id, "attempt", attempt))
}

pub fn entry_span_id(id: &InvocationId, index: u32) -> SpanId {
    SpanId::from_bytes(derive::<8>(id, "entry", index))
}

/// `N` bytes of a digest of the invocation id, what they are for and a number; never all
/// zero (an invalid id).
fn derive<const N: usize>(id: &InvocationId, what: &str, n: u32) -> [u8; N] {
    let digest = Sha256::new()
        .chain_update(b"durin-trace\0")
        .chain_update(id.as_str().as_bytes())
        .chain_update([0])
        .chain_update(what.as_bytes())
        .chain_update(n.to_be_bytes())
        .finalize();
    let mut bytes = [0u8; N];
    bytes.copy_from_slice(&digest[..N]);
    if bytes.iter().all(|b| *b == 0) {
        bytes[N - 1] = 1;
    }
    bytes
}

/// Builds a span under `parent` and ends it at `end` (which the SDK then exports).
fn emit(tracer: &SdkTracer, builder: SpanBuilder, parent: &Context, end: SystemTime) {
    use opentelemetry::trace::Span;
    tracer
        .build_with_context(builder, parent)
        .end_with_timestamp(end);
}

fn random_span_id() -> SpanId {
    let bytes = *uuid::Uuid::new_v4().as_bytes();
    let mut id = [0u8; 8];
    id.copy_from_slice(&bytes[..8]);
    if id.iter().all(|b| *b == 0) {
        id[7] = 1;
    }
    SpanId::from_bytes(id)
}

fn time(ms: i64) -> SystemTime {
    UNIX_EPOCH + Duration::from_millis(u64::try_from(ms).unwrap_or(0))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn traceparent_round_trips_and_refuses_what_w3c_says_to_ignore() {
        let value = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        let parsed = parse_traceparent(value).unwrap();
        assert!(parsed.sampled);
        assert_eq!(
            format_traceparent(parsed.trace_id, parsed.span_id, parsed.sampled),
            value
        );
        for bad in [
            "",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
            "00-4bf92f3577b34da6a3ce929d0e0e473-00f067aa0ba902b7-01",
        ] {
            assert_eq!(parse_traceparent(bad), None, "{bad:?}");
        }
        let later = "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00-more";
        assert!(!parse_traceparent(later).unwrap().sampled);
    }

    #[test]
    fn span_ids_are_derived_from_the_invocation_alone() {
        let id = InvocationId::generate();
        let other = InvocationId::generate();
        assert_eq!(attempt_span_id(&id, 2), attempt_span_id(&id, 2));
        assert_ne!(attempt_span_id(&id, 2), attempt_span_id(&id, 3));
        assert_ne!(attempt_span_id(&id, 2), attempt_span_id(&other, 2));
        assert_ne!(invocation_span_id(&id), entry_span_id(&id, 0));
        let root = InvocationTrace::from_stored(&id, None);
        assert_eq!(root.parent, None);
        assert_eq!(root, InvocationTrace::from_stored(&id, Some("garbage")));
        let child = InvocationTrace::from_stored(&other, Some(&child_traceparent(&id, None, 2)));
        assert_eq!(child.trace_id, root.trace_id);
        assert_eq!(child.parent, Some(attempt_span_id(&id, 2)));
    }
}

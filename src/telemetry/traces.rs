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
    SpanBuilder, SpanId, SpanKind, Status as SpanStatus, Tracer, TracerProvider,
};
use opentelemetry::{Context, KeyValue};
use opentelemetry_sdk::trace::{SdkTracer, SdkTracerProvider};

use crate::ids::InvocationId;
use crate::store::{InvocationRecord, StoredEntry};
pub use crate::telemetry::trace_context::*;

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
            let trace = trace_of(record);
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
        let trace = trace_of(record);
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
        let trace = trace_of(record);
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

/// The trace `record` belongs to (see [`InvocationTrace::from_stored`]).
pub fn trace_of(record: &InvocationRecord) -> InvocationTrace {
    InvocationTrace::from_stored(&record.id, record.traceparent.as_deref())
}

//! W3C trace context as Durin keeps it: the `traceparent` header, and the trace and span
//! ids of an invocation, its attempts and its journal entries, derived from the invocation
//! id so that no span state is kept (the store computes a child's `traceparent` with them;
//! `traces.rs` exports the spans).

use opentelemetry::trace::{SpanContext, SpanId, TraceContextExt, TraceFlags, TraceId, TraceState};
use opentelemetry::Context;
use sha2::{Digest, Sha256};

use crate::ids::InvocationId;

/// The W3C trace context header.
pub const TRACEPARENT: &str = "traceparent";

/// The trace an invocation belongs to and the span its own span hangs under.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct InvocationTrace {
    pub trace_id: TraceId,
    /// The caller's span (or the parent invocation's attempt); `None` for a trace's root.
    pub parent: Option<SpanId>,
    pub sampled: bool,
}

impl InvocationTrace {
    /// From the `traceparent` stored with invocation `id`; an invocation without one is
    /// the root of a trace whose id is derived from its own.
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

    pub fn context(&self, span: SpanId) -> Context {
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
    pub fn context(&self) -> Context {
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

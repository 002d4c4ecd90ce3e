//! Traces that follow a task across workers and crashes.
//!
//! A task's submit stores the W3C trace context (`traceparent`, `tracestate`) of its span
//! in the `task_submitted` event's metadata. Every later span of the task (each attempt on
//! any worker, its steps, items, provider calls and appends, and the projector's Notion
//! request) is made a child of that context, so a task is one trace however many workers
//! and restarts it went through. A task submitted without a trace (no exporter at the
//! submitter, or by an earlier build) still gets one: its trace id is the task id
//! ([`TraceContext::of_task`]).
//!
//! The engine only emits `tracing` spans. Parenting them needs feature `otel` and a
//! `tracing-opentelemetry` layer (0.34) in the subscriber of whoever runs the engine; without
//! either, the spans are plain `tracing` spans and [`set_parent`] does nothing. This
//! workspace's binaries wire the exporter (feature `otlp`, `engine::service`).

use crate::event::EventMetadata;
use crate::id::TaskId;

/// The longest `tracestate` kept (W3C: 32 list members; 512 characters is what a
/// propagator must be able to pass on). A longer one is dropped, not truncated.
const TRACESTATE_MAX_CHARS: usize = 512;

/// A W3C trace context (<https://www.w3.org/TR/trace-context/>): the parent of a task's
/// spans. Always valid: built by [`TraceContext::parse`] or [`TraceContext::of_task`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TraceContext {
    /// `00-{trace id: 32 hex}-{parent span id: 16 hex}-{flags: 2 hex}`, lowercase.
    traceparent: String,
    tracestate: Option<String>,
}

/// A `traceparent` (or `tracestate`) that is not W3C trace context.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid trace context: {0}")]
pub struct InvalidTraceContext(String);

impl TraceContext {
    /// Reads a `traceparent` header value (and an optional `tracestate`). Versions above
    /// `00` are read as `00`, as the specification asks; an all-zero trace or span id, a
    /// version `ff`, or anything not lowercase hex in its place is refused. A `tracestate`
    /// that is too long or not printable ASCII is dropped (the parent still holds).
    pub fn parse(
        traceparent: &str,
        tracestate: Option<&str>,
    ) -> Result<TraceContext, InvalidTraceContext> {
        let bad = |why: &str| InvalidTraceContext(format!("{why} in traceparent {traceparent:?}"));
        let value = traceparent.trim();
        let fields: Vec<&str> = value.splitn(5, '-').collect();
        let [version, trace_id, span_id, flags, rest @ ..] = fields.as_slice() else {
            return Err(bad("not four dash-separated fields"));
        };
        let hex = |s: &str, len: usize| {
            s.len() == len && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
        };
        if !hex(version, 2) || *version == "ff" {
            return Err(bad("an invalid version"));
        }
        // Version 00 has exactly four fields; a later version may append more.
        if *version == "00" && !rest.is_empty() {
            return Err(bad("extra fields after version 00's four"));
        }
        if !hex(trace_id, 32) || trace_id.bytes().all(|b| b == b'0') {
            return Err(bad("an invalid trace id"));
        }
        if !hex(span_id, 16) || span_id.bytes().all(|b| b == b'0') {
            return Err(bad("an invalid parent span id"));
        }
        if !hex(flags, 2) {
            return Err(bad("invalid flags"));
        }
        let tracestate = tracestate.map(str::trim).filter(|state| {
            !state.is_empty()
                && state.len() <= TRACESTATE_MAX_CHARS
                && state.bytes().all(|b| (0x20..0x7f).contains(&b))
        });
        Ok(TraceContext {
            traceparent: format!("00-{trace_id}-{span_id}-{flags}"),
            tracestate: tracestate.map(str::to_owned),
        })
    }

    /// The context of a task submitted without one: trace id = the task id (so a task's
    /// trace is found by its id), a parent span id derived from it, sampled. The parent is
    /// never exported itself: tracing tools show the task's spans under a missing root.
    pub fn of_task(task: TaskId) -> TraceContext {
        let trace_id = task.as_uuid().simple().to_string();
        let derived = uuid::Uuid::new_v5(&task.as_uuid(), b"reel.submit");
        let mut span_id = [0u8; 8];
        span_id.copy_from_slice(&derived.as_bytes()[..8]);
        if span_id == [0; 8] {
            span_id[7] = 1;
        }
        let span_id: String = span_id.iter().map(|b| format!("{b:02x}")).collect();
        TraceContext {
            traceparent: format!("00-{trace_id}-{span_id}-01"),
            tracestate: None,
        }
    }

    /// The context stored in an event's metadata, if it holds a valid one.
    pub fn from_metadata(metadata: &EventMetadata) -> Option<TraceContext> {
        let traceparent = metadata.traceparent.as_deref()?;
        TraceContext::parse(traceparent, metadata.tracestate.as_deref()).ok()
    }

    /// What every span of `task` joins: the context its submit stored (`submitted`: the
    /// `task_submitted` event's metadata), else [`TraceContext::of_task`].
    pub fn for_task(task: TaskId, submitted: Option<&EventMetadata>) -> TraceContext {
        submitted
            .and_then(TraceContext::from_metadata)
            .unwrap_or_else(|| TraceContext::of_task(task))
    }

    /// The `traceparent` header value.
    pub fn traceparent(&self) -> &str {
        &self.traceparent
    }

    /// The `tracestate` header value, if any.
    pub fn tracestate(&self) -> Option<&str> {
        self.tracestate.as_deref()
    }

    /// The trace id, 32 lowercase hex digits.
    pub fn trace_id(&self) -> &str {
        &self.traceparent[3..35]
    }

    /// Stores this context in `metadata` (as the `task_submitted` event carries it).
    pub fn write_to(&self, metadata: &mut EventMetadata) {
        metadata.traceparent = Some(self.traceparent.clone());
        metadata.tracestate = self.tracestate.clone();
    }

    /// The context of `span`, when an OpenTelemetry layer records it and it is valid.
    /// Always `None` without feature `otel`.
    pub fn of_span(span: &tracing::Span) -> Option<TraceContext> {
        #[cfg(feature = "otel")]
        {
            otel::of_span(span)
        }
        #[cfg(not(feature = "otel"))]
        {
            let _ = span;
            None
        }
    }
}

impl std::fmt::Display for TraceContext {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.traceparent)
    }
}

/// Makes `span` (not yet entered) a child of `parent`, through the subscriber's
/// OpenTelemetry layer. Does nothing without feature `otel`, without such a layer, or once
/// the span has started.
pub fn set_parent(span: &tracing::Span, parent: &TraceContext) {
    #[cfg(feature = "otel")]
    otel::set_parent(span, parent);
    #[cfg(not(feature = "otel"))]
    let _ = (span, parent);
}

#[cfg(feature = "otel")]
mod otel {
    use opentelemetry::trace::{
        SpanContext, SpanId, TraceContextExt, TraceFlags, TraceId, TraceState,
    };
    use tracing_opentelemetry::OpenTelemetrySpanExt;

    use super::TraceContext;

    pub(super) fn set_parent(span: &tracing::Span, parent: &TraceContext) {
        let Some(remote) = span_context(parent) else {
            return;
        };
        // No layer (the subscriber records no OpenTelemetry data) or a disabled span:
        // nothing to parent.
        let _ = span.set_parent(opentelemetry::Context::new().with_remote_span_context(remote));
    }

    pub(super) fn of_span(span: &tracing::Span) -> Option<TraceContext> {
        let context = span.context();
        let otel_span = context.span();
        let current = otel_span.span_context();
        if !current.is_valid() {
            return None;
        }
        let traceparent = format!(
            "00-{}-{}-{:02x}",
            current.trace_id(),
            current.span_id(),
            current.trace_flags().to_u8()
        );
        let state = current.trace_state().header();
        TraceContext::parse(&traceparent, Some(&state)).ok()
    }

    fn span_context(context: &TraceContext) -> Option<SpanContext> {
        let value = context.traceparent();
        let trace_id = TraceId::from_hex(&value[3..35]).ok()?;
        let span_id = SpanId::from_hex(&value[36..52]).ok()?;
        let flags = u8::from_str_radix(&value[53..55], 16).ok()?;
        let state = context
            .tracestate()
            .and_then(|s| s.parse::<TraceState>().ok())
            .unwrap_or_default();
        Some(SpanContext::new(
            trace_id,
            span_id,
            TraceFlags::new(flags),
            true,
            state,
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_specification_examples_and_refuses_invalid_ones() {
        let valid = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        let parsed = TraceContext::parse(valid, Some("rojo=00f067aa0ba902b7")).expect("valid");
        assert_eq!(parsed.traceparent(), valid);
        assert_eq!(parsed.trace_id(), "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_eq!(parsed.tracestate(), Some("rojo=00f067aa0ba902b7"));
        // A later version is read as 00, its extra fields ignored.
        let later = "cc-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-what-ever";
        assert_eq!(
            TraceContext::parse(later, None)
                .expect("later")
                .traceparent(),
            valid
        );
        for invalid in [
            "",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
            "00-4bf92f3577b34da6a3ce929d0e0e473-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-1",
        ] {
            assert!(
                TraceContext::parse(invalid, None).is_err(),
                "{invalid:?} must be refused"
            );
        }
        // An unusable tracestate is dropped, the parent kept.
        let long = "a=".to_owned() + &"b".repeat(TRACESTATE_MAX_CHARS);
        for state in [long.as_str(), "a=b\nc=d", ""] {
            let parsed = TraceContext::parse(valid, Some(state)).expect("valid parent");
            assert_eq!(parsed.tracestate(), None);
        }
    }

    #[test]
    fn a_task_without_a_stored_context_gets_one_from_its_id() {
        let task = TaskId::new();
        let derived = TraceContext::of_task(task);
        assert_eq!(derived.trace_id(), task.as_uuid().simple().to_string());
        assert_eq!(derived, TraceContext::of_task(task), "deterministic");
        assert!(TraceContext::parse(derived.traceparent(), None).is_ok());
        assert_eq!(TraceContext::for_task(task, None), derived);

        let mut metadata = EventMetadata::default();
        let stored = TraceContext::parse(
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            Some("k=v"),
        )
        .expect("valid");
        stored.write_to(&mut metadata);
        assert_eq!(TraceContext::for_task(task, Some(&metadata)), stored);
        // A stored value this build cannot read falls back to the task's own trace.
        metadata.traceparent = Some("garbage".into());
        assert_eq!(TraceContext::for_task(task, Some(&metadata)), derived);
    }
}

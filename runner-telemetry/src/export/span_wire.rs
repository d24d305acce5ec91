//! A span's OTLP protobuf bytes written straight from the SDK's `SpanData`.
//!
//! opentelemetry-proto's way (`SpanData -> proto Span -> bytes`) builds the
//! whole message first: a `String` per attribute key and string value, a
//! `Vec` per ID, all freed again after encoding. That was most of the CPU a
//! span cost the runner (callgrind: about 8,000 instructions per span of
//! the bench's shape, half of the process's work). Here the lengths are
//! computed from the `SpanData` and the bytes written into one buffer of
//! the right size: the same bytes, field for field (the tests compare with
//! opentelemetry-proto's encoding), for a fraction of the work.
//!
//! Field numbers: `opentelemetry/proto/trace/v1/trace.proto` and
//! `common/v1/common.proto` (as in opentelemetry-proto 0.33's generated
//! types); fields are written in tag order, as prost writes them.

use std::time::{SystemTime, UNIX_EPOCH};

use bytes::BufMut;
use opentelemetry::trace::{SpanKind, Status};
use opentelemetry::{Array, KeyValue, StringValue, Value};
use opentelemetry_sdk::trace::SpanData;
use prost::encoding::{encode_key, encode_varint, encoded_len_varint, key_len, WireType};

/// `SpanFlags.SPAN_FLAGS_CONTEXT_HAS_IS_REMOTE_MASK`.
const HAS_IS_REMOTE: u32 = 0x100;
/// `SpanFlags.SPAN_FLAGS_CONTEXT_IS_REMOTE_MASK`.
const IS_REMOTE: u32 = 0x200;

/// The OTLP `Span` message of `span`.
pub fn encode(span: &SpanData) -> Vec<u8> {
    let fields = SpanFields::of(span);
    let mut buf = Vec::with_capacity(fields.len(span));
    fields.write(span, &mut buf);
    buf
}

/// What the span's encoding needs beyond its own fields.
struct SpanFields {
    trace_state: String,
    flags: u32,
    kind: u64,
    start: u64,
    end: u64,
    status_len: usize,
}

fn nanos(time: SystemTime) -> u64 {
    time.duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0)
}

fn flags(parent_is_remote: bool, trace_flags: u8) -> u32 {
    let mut flags = u32::from(trace_flags) | HAS_IS_REMOTE;
    if parent_is_remote {
        flags |= IS_REMOTE;
    }
    flags
}

fn kind(kind: &SpanKind) -> u64 {
    match kind {
        SpanKind::Internal => 1,
        SpanKind::Server => 2,
        SpanKind::Client => 3,
        SpanKind::Producer => 4,
        SpanKind::Consumer => 5,
    }
}

fn status_code(status: &Status) -> u64 {
    match status {
        Status::Unset => 0,
        Status::Ok => 1,
        Status::Error { .. } => 2,
    }
}

fn status_message(status: &Status) -> &str {
    match status {
        Status::Error { description } => description.as_ref(),
        _ => "",
    }
}

impl SpanFields {
    fn of(span: &SpanData) -> SpanFields {
        let status_len =
            string_len(2, status_message(&span.status)) + varint_len(3, status_code(&span.status));
        SpanFields {
            trace_state: span.span_context.trace_state().header(),
            flags: flags(
                span.parent_span_is_remote,
                span.span_context.trace_flags().to_u8(),
            ),
            kind: kind(&span.span_kind),
            start: nanos(span.start_time),
            end: nanos(span.end_time),
            status_len,
        }
    }

    fn parent(span: &SpanData) -> Option<[u8; 8]> {
        (span.parent_span_id != opentelemetry::trace::SpanId::INVALID)
            .then(|| span.parent_span_id.to_bytes())
    }

    fn len(&self, span: &SpanData) -> usize {
        let ctx = &span.span_context;
        bytes_len(1, &ctx.trace_id().to_bytes())
            + bytes_len(2, &ctx.span_id().to_bytes())
            + string_len(3, &self.trace_state)
            + Self::parent(span).map_or(0, |p| bytes_len(4, &p))
            + fixed32_len(16, self.flags)
            + string_len(5, &span.name)
            + varint_len(6, self.kind)
            + fixed64_len(7, self.start)
            + fixed64_len(8, self.end)
            + attributes_len(9, &span.attributes)
            + varint_len(10, u64::from(span.dropped_attributes_count))
            + span
                .events
                .events
                .iter()
                .map(|e| message_len(11, event_len(e)))
                .sum::<usize>()
            + varint_len(12, u64::from(span.events.dropped_count))
            + span
                .links
                .links
                .iter()
                .map(|l| message_len(13, link_len(l)))
                .sum::<usize>()
            + varint_len(14, u64::from(span.links.dropped_count))
            + message_len(15, self.status_len)
    }

    fn write(&self, span: &SpanData, buf: &mut Vec<u8>) {
        let ctx = &span.span_context;
        put_bytes(1, &ctx.trace_id().to_bytes(), buf);
        put_bytes(2, &ctx.span_id().to_bytes(), buf);
        put_string(3, &self.trace_state, buf);
        if let Some(parent) = Self::parent(span) {
            put_bytes(4, &parent, buf);
        }
        put_string(5, &span.name, buf);
        put_varint(6, self.kind, buf);
        put_fixed64(7, self.start, buf);
        put_fixed64(8, self.end, buf);
        put_attributes(9, &span.attributes, buf);
        put_varint(10, u64::from(span.dropped_attributes_count), buf);
        for event in span.events.events.iter() {
            put_message_header(11, event_len(event), buf);
            put_fixed64(1, nanos(event.timestamp), buf);
            put_string(2, &event.name, buf);
            put_attributes(3, &event.attributes, buf);
            put_varint(4, u64::from(event.dropped_attributes_count), buf);
        }
        put_varint(12, u64::from(span.events.dropped_count), buf);
        for link in span.links.links.iter() {
            let ctx = &link.span_context;
            put_message_header(13, link_len(link), buf);
            put_bytes(1, &ctx.trace_id().to_bytes(), buf);
            put_bytes(2, &ctx.span_id().to_bytes(), buf);
            put_string(3, &ctx.trace_state().header(), buf);
            put_attributes(4, &link.attributes, buf);
            put_varint(5, u64::from(link.dropped_attributes_count), buf);
            put_fixed32(6, flags(ctx.is_remote(), ctx.trace_flags().to_u8()), buf);
        }
        put_varint(14, u64::from(span.links.dropped_count), buf);
        put_message_header(15, self.status_len, buf);
        put_string(2, status_message(&span.status), buf);
        put_varint(3, status_code(&span.status), buf);
        put_fixed32(16, self.flags, buf);
    }
}

fn event_len(event: &opentelemetry::trace::Event) -> usize {
    fixed64_len(1, nanos(event.timestamp))
        + string_len(2, &event.name)
        + attributes_len(3, &event.attributes)
        + varint_len(4, u64::from(event.dropped_attributes_count))
}

fn link_len(link: &opentelemetry::trace::Link) -> usize {
    let ctx = &link.span_context;
    bytes_len(1, &ctx.trace_id().to_bytes())
        + bytes_len(2, &ctx.span_id().to_bytes())
        + string_len(3, &ctx.trace_state().header())
        + attributes_len(4, &link.attributes)
        + varint_len(5, u64::from(link.dropped_attributes_count))
        + fixed32_len(6, flags(ctx.is_remote(), ctx.trace_flags().to_u8()))
}

// proto3 scalars are left out at their default; a message field that is
// set (a `KeyValue`'s value, a span's status) and a oneof member are always
// written, as prost does.

fn message_len(tag: u32, len: usize) -> usize {
    key_len(tag) + encoded_len_varint(len as u64) + len
}

fn bytes_len(tag: u32, bytes: &[u8]) -> usize {
    match bytes.is_empty() {
        true => 0,
        false => message_len(tag, bytes.len()),
    }
}

fn string_len(tag: u32, text: &str) -> usize {
    bytes_len(tag, text.as_bytes())
}

fn varint_len(tag: u32, value: u64) -> usize {
    match value {
        0 => 0,
        v => key_len(tag) + encoded_len_varint(v),
    }
}

fn fixed64_len(tag: u32, value: u64) -> usize {
    match value {
        0 => 0,
        _ => key_len(tag) + 8,
    }
}

fn fixed32_len(tag: u32, value: u32) -> usize {
    match value {
        0 => 0,
        _ => key_len(tag) + 4,
    }
}

fn put_message_header(tag: u32, len: usize, buf: &mut Vec<u8>) {
    encode_key(tag, WireType::LengthDelimited, buf);
    encode_varint(len as u64, buf);
}

fn put_bytes(tag: u32, bytes: &[u8], buf: &mut Vec<u8>) {
    if !bytes.is_empty() {
        put_message_header(tag, bytes.len(), buf);
        buf.put_slice(bytes);
    }
}

fn put_string(tag: u32, text: &str, buf: &mut Vec<u8>) {
    put_bytes(tag, text.as_bytes(), buf);
}

fn put_varint(tag: u32, value: u64, buf: &mut Vec<u8>) {
    if value != 0 {
        encode_key(tag, WireType::Varint, buf);
        encode_varint(value, buf);
    }
}

fn put_fixed64(tag: u32, value: u64, buf: &mut Vec<u8>) {
    if value != 0 {
        encode_key(tag, WireType::SixtyFourBit, buf);
        buf.put_u64_le(value);
    }
}

fn put_fixed32(tag: u32, value: u32, buf: &mut Vec<u8>) {
    if value != 0 {
        encode_key(tag, WireType::ThirtyTwoBit, buf);
        buf.put_u32_le(value);
    }
}

/// `KeyValue { key = 1; value = 2 }`.
fn key_value_len(kv: &KeyValue) -> usize {
    string_len(1, kv.key.as_str()) + message_len(2, any_value_len(&kv.value))
}

fn attributes_len(tag: u32, attributes: &[KeyValue]) -> usize {
    attributes
        .iter()
        .map(|kv| message_len(tag, key_value_len(kv)))
        .sum()
}

fn put_attributes(tag: u32, attributes: &[KeyValue], buf: &mut Vec<u8>) {
    for kv in attributes {
        put_message_header(tag, key_value_len(kv), buf);
        put_string(1, kv.key.as_str(), buf);
        put_message_header(2, any_value_len(&kv.value), buf);
        put_any_value(&kv.value, buf);
    }
}

/// A value as `AnyValue`'s oneof: string 1, bool 2, int 3, double 4,
/// array 5. A value kind this code does not know goes as its text.
enum Scalar<'a> {
    Str(&'a str),
    Bool(bool),
    Int(i64),
    Double(f64),
}

fn scalar_len(value: &Scalar<'_>) -> usize {
    match value {
        Scalar::Str(s) => key_len(1) + encoded_len_varint(s.len() as u64) + s.len(),
        Scalar::Bool(_) => key_len(2) + 1,
        Scalar::Int(i) => key_len(3) + encoded_len_varint(*i as u64),
        Scalar::Double(_) => key_len(4) + 8,
    }
}

fn put_scalar(value: &Scalar<'_>, buf: &mut Vec<u8>) {
    match value {
        Scalar::Str(s) => {
            put_message_header(1, s.len(), buf);
            buf.put_slice(s.as_bytes());
        }
        Scalar::Bool(b) => {
            encode_key(2, WireType::Varint, buf);
            encode_varint(u64::from(*b), buf);
        }
        Scalar::Int(i) => {
            encode_key(3, WireType::Varint, buf);
            encode_varint(*i as u64, buf);
        }
        Scalar::Double(d) => {
            encode_key(4, WireType::SixtyFourBit, buf);
            buf.put_f64_le(*d);
        }
    }
}

/// The items of an array as scalars.
fn items(array: &Array) -> Vec<Scalar<'_>> {
    match array {
        Array::Bool(v) => v.iter().map(|b| Scalar::Bool(*b)).collect(),
        Array::I64(v) => v.iter().map(|i| Scalar::Int(*i)).collect(),
        Array::F64(v) => v.iter().map(|d| Scalar::Double(*d)).collect(),
        Array::String(v) => v
            .iter()
            .map(|s| Scalar::Str(StringValue::as_str(s)))
            .collect(),
        _ => Vec::new(),
    }
}

/// `ArrayValue { repeated AnyValue values = 1; }`.
fn array_len(items: &[Scalar<'_>]) -> usize {
    items.iter().map(|i| message_len(1, scalar_len(i))).sum()
}

fn any_value_len(value: &Value) -> usize {
    match value {
        Value::Bool(b) => scalar_len(&Scalar::Bool(*b)),
        Value::I64(i) => scalar_len(&Scalar::Int(*i)),
        Value::F64(d) => scalar_len(&Scalar::Double(*d)),
        Value::String(s) => scalar_len(&Scalar::Str(s.as_str())),
        Value::Array(a) => message_len(5, array_len(&items(a))),
        other => scalar_len(&Scalar::Str(&other.to_string())),
    }
}

fn put_any_value(value: &Value, buf: &mut Vec<u8>) {
    match value {
        Value::Bool(b) => put_scalar(&Scalar::Bool(*b), buf),
        Value::I64(i) => put_scalar(&Scalar::Int(*i), buf),
        Value::F64(d) => put_scalar(&Scalar::Double(*d), buf),
        Value::String(s) => put_scalar(&Scalar::Str(s.as_str()), buf),
        Value::Array(a) => {
            let items = items(a);
            put_message_header(5, array_len(&items), buf);
            for item in &items {
                put_message_header(1, scalar_len(item), buf);
                put_scalar(item, buf);
            }
        }
        other => put_scalar(&Scalar::Str(&other.to_string()), buf),
    }
}

#[cfg(test)]
mod tests {
    use std::borrow::Cow;
    use std::time::Duration;

    use opentelemetry::trace::{Event, Link, SpanContext, SpanId, TraceFlags, TraceId, TraceState};
    use opentelemetry::InstrumentationScope;
    use opentelemetry_proto::tonic::trace::v1::Span as ProtoSpan;
    use opentelemetry_sdk::trace::{SpanEvents, SpanLinks};
    use prost::Message;

    use super::*;

    fn context(trace: u128, span: u64, remote: bool, state: &str) -> SpanContext {
        SpanContext::new(
            TraceId::from(trace),
            SpanId::from(span),
            TraceFlags::SAMPLED,
            remote,
            state.parse::<TraceState>().unwrap_or_default(),
        )
    }

    fn span(name: &'static str, attributes: Vec<KeyValue>, status: Status) -> SpanData {
        let at = UNIX_EPOCH + Duration::from_nanos(1_764_000_000_123_456_789);
        SpanData {
            span_context: context(0xbe0c_0001, 0x1234, false, ""),
            parent_span_id: SpanId::from(0x00f0_67aa_0ba9_02b7),
            parent_span_is_remote: true,
            span_kind: SpanKind::Internal,
            name: Cow::Borrowed(name),
            start_time: at,
            end_time: at + Duration::from_micros(1500),
            attributes,
            dropped_attributes_count: 0,
            events: SpanEvents::default(),
            links: SpanLinks::default(),
            status,
            instrumentation_scope: InstrumentationScope::builder("t").build(),
        }
    }

    /// Our bytes are opentelemetry-proto's, byte for byte.
    fn check(span: SpanData) {
        let ours = encode(&span);
        let theirs = ProtoSpan::from(span).encode_to_vec();
        assert_eq!(ours, theirs);
    }

    #[test]
    fn the_bench_shape_and_every_value_kind() {
        check(span(
            "step_script",
            vec![
                KeyValue::new("ci.stage.status", "success"),
                KeyValue::new("ci.cache.key", "bench-cache-key-3"),
                KeyValue::new("ci.cache.hit", true),
                KeyValue::new("ci.cache.size_bytes", 3072_i64),
                KeyValue::new("ci.function.name", "gitlab.com/components/bench/step"),
            ],
            Status::Ok,
        ));
        check(span(
            "all",
            vec![
                KeyValue::new("f", false),
                KeyValue::new("zero", 0_i64),
                KeyValue::new("negative", -5_i64),
                KeyValue::new("pi", 3.25_f64),
                KeyValue::new("nothing", 0.0_f64),
                KeyValue::new("empty", ""),
                KeyValue::new("", "no key"),
                KeyValue::new("é", "ünïcode"),
                KeyValue::new("long", "x".repeat(300)),
                KeyValue::new("bools", Value::Array(Array::Bool(vec![true, false]))),
                KeyValue::new("ints", Value::Array(Array::I64(vec![0, -1, 1 << 40]))),
                KeyValue::new("floats", Value::Array(Array::F64(vec![0.5, -2.0]))),
                KeyValue::new(
                    "strings",
                    Value::Array(Array::String(vec!["a".into(), "".into()])),
                ),
                KeyValue::new("none", Value::Array(Array::String(vec![]))),
            ],
            Status::error("script_failure: exit code 1"),
        ));
        check(span("", vec![], Status::Unset));
    }

    #[test]
    fn roots_kinds_events_links_and_counts() {
        for kind in [
            SpanKind::Internal,
            SpanKind::Server,
            SpanKind::Client,
            SpanKind::Producer,
            SpanKind::Consumer,
        ] {
            let mut s = span("job_execution", vec![KeyValue::new("a", 1_i64)], Status::Ok);
            s.span_kind = kind;
            s.parent_span_id = SpanId::INVALID;
            s.parent_span_is_remote = false;
            s.span_context = context(7, 9, false, "vendor=value,other=x");
            s.dropped_attributes_count = 3;
            s.events.events = vec![
                Event::new(
                    "exception",
                    UNIX_EPOCH + Duration::from_secs(5),
                    vec![KeyValue::new("exception.message", "boom")],
                    2,
                ),
                Event::new("", UNIX_EPOCH, vec![], 0),
            ];
            s.events.dropped_count = 4;
            s.links.links = vec![
                Link::new(
                    context(1, 2, true, "k=v"),
                    vec![KeyValue::new("l", true)],
                    1,
                ),
                Link::new(context(3, 4, false, ""), vec![], 0),
            ];
            s.links.dropped_count = 5;
            check(s);
        }
    }
}

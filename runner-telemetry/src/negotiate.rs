//! Telemetry negotiation: from a job payload, decide whether this job emits
//! telemetry and where its spans hang.
//!
//! Two contracts are accepted (`docs/contract.md` §1):
//!
//! * **v1** (the first design): `features.job_telemetry == true` plus a top-level
//!   `trace_context {trace_id, parent_span_id}`. Spans go to the runner
//!   manager's static endpoint (see [`crate::config`]).
//! * **v2** (GitLab Runner today): `features.tracing {trace_id,
//!   span_parent_id, otel_endpoints[{url, auth}]}`. A present object means the
//!   pipeline was sampled; its endpoints replace the static one.
//!
//! When `features.tracing` is present (and not `null`) it alone decides; v1
//! fields are only looked at when it is absent.
//!
//! IDs are validated once, here, into a [`TraceContext`]; nothing downstream
//! checks them again. IDs must be lowercase hex of the exact length and not
//! all zero. **Uppercase hex is rejected**, not normalised: W3C Trace Context
//! says a `traceparent` with uppercase hex is invalid, and GitLab Runner's Go
//! `TraceIDFromHex` rejects it too, so every runner reaches the same decision
//! for the same payload.
//!
//! Every way a payload can fail ends in [`Negotiation::Disabled`] with a
//! one-line [`DisabledReason`]; negotiation never panics and never fails the
//! job.
//!
//! **Fallback for old GitLab** (opt-in, [`NegotiationOptions`], carried by
//! [`crate::config::ExportSettings::negotiation`]): a v1 payload
//! with `features.job_telemetry: true` but no `trace_context` (a GitLab that
//! predates it) can still be traced: the trace ID is derived with the Rails
//! formula, `format!("{:032x}", root_pipeline_id)` (`job_info.root_pipeline_id`
//! when GitLab sends it, else `job_info.pipeline_id`), and `job_execution`
//! becomes a root span ([`TraceContext::is_root`]), so every job of a
//! pipeline joins one trace. Limits: there are no Rails spans to join (the
//! jobs are sibling roots, queue time only as `ci.job.queued_duration`); a
//! child pipeline, whose `pipeline_id` is not the root's, gets a trace of its
//! own unless GitLab sends `root_pipeline_id`; a payload whose
//! `trace_context` is present but invalid is still disabled (that is a bad
//! payload, not an old GitLab).

use std::fmt;

use opentelemetry::trace::{SpanContext, SpanId, TraceFlags, TraceId, TraceState};
use serde_json::Value;

/// At most this many payload endpoints are used (contract v2).
pub const MAX_PAYLOAD_ENDPOINTS: usize = 2;

/// The outcome of negotiation for one job.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Negotiation {
    Disabled(DisabledReason),
    Enabled(TelemetryPlan),
}

impl Negotiation {
    pub fn is_enabled(&self) -> bool {
        matches!(self, Negotiation::Enabled(_))
    }
}

impl fmt::Display for Negotiation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Negotiation::Disabled(reason) => write!(f, "disabled: {reason}"),
            Negotiation::Enabled(plan) => write!(f, "enabled: {plan}"),
        }
    }
}

/// Why a job emits no telemetry. `Display` is one line, meant for the
/// runner's log (`Telemetry disabled: <reason> job_id=42`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DisabledReason {
    /// The payload is not a JSON object.
    PayloadNotObject,
    /// Neither `features.tracing` nor `features.job_telemetry` are there.
    FeaturesMissing,
    /// A field has the wrong JSON type; `expected` names the type.
    WrongType {
        field: &'static str,
        expected: &'static str,
    },
    /// A required field is missing.
    FieldMissing(&'static str),
    /// `features.job_telemetry` is `false`.
    FlagFalse,
    /// A trace or span ID failed validation.
    InvalidId { field: &'static str, error: IdError },
    /// v2: `otel_endpoints` is missing or empty.
    NoEndpoints,
    /// v2: every endpoint was skipped; the reasons are joined.
    AllEndpointsSkipped(Vec<SkippedEndpoint>),
    /// Decided by the runner rather than the payload (configuration, a failed
    /// exporter build).
    Runner(RunnerReason),
}

impl fmt::Display for DisabledReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DisabledReason::PayloadNotObject => write!(f, "the job payload is not a JSON object"),
            DisabledReason::FeaturesMissing => write!(
                f,
                "features.job_telemetry and features.tracing are both missing"
            ),
            DisabledReason::WrongType { field, expected } => {
                write!(f, "{field} is not {expected}")
            }
            DisabledReason::FieldMissing(field) => write!(f, "{field} is missing"),
            DisabledReason::FlagFalse => write!(f, "features.job_telemetry is false"),
            DisabledReason::InvalidId { field, error } => write!(f, "{field} {error}"),
            DisabledReason::NoEndpoints => {
                write!(f, "features.tracing.otel_endpoints is empty")
            }
            DisabledReason::AllEndpointsSkipped(skipped) => {
                write!(f, "every OTLP endpoint was skipped: ")?;
                for (i, s) in skipped.iter().enumerate() {
                    if i > 0 {
                        write!(f, "; ")?;
                    }
                    write!(f, "{s}")?;
                }
                Ok(())
            }
            DisabledReason::Runner(reason) => write!(f, "{reason}"),
        }
    }
}

/// How a hex ID failed validation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IdError {
    WrongLength { expected: usize, actual: usize },
    NotLowercaseHex,
    AllZero,
}

impl fmt::Display for IdError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            IdError::WrongLength { expected, actual } => {
                write!(f, "has {actual} characters, expected {expected}")
            }
            IdError::NotLowercaseHex => write!(f, "is not lowercase hex"),
            IdError::AllZero => write!(f, "is all zeros"),
        }
    }
}

/// A validated W3C trace context from the payload: a trace ID and the span ID
/// of the parent (the Rails `job_running` span). Both are valid and non-zero
/// by construction, except for a trace ID derived from the pipeline (the old
/// GitLab fallback), which has no parent: [`TraceContext::is_root`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TraceContext {
    trace_id: TraceId,
    parent_span_id: SpanId,
}

impl TraceContext {
    /// Validates lowercase hex IDs (32 and 16 characters, not all zero).
    pub fn from_hex(trace_id: &str, parent_span_id: &str) -> Result<Self, (IdField, IdError)> {
        let trace = parse_hex::<16>(trace_id).map_err(|e| (IdField::TraceId, e))?;
        let span = parse_hex::<8>(parent_span_id).map_err(|e| (IdField::ParentSpanId, e))?;
        Ok(TraceContext {
            trace_id: TraceId::from_bytes(trace),
            parent_span_id: SpanId::from_bytes(span),
        })
    }

    /// The Rails trace ID of a root pipeline, `format!("{:032x}", id)`, with
    /// no parent. `None` for a pipeline ID of 0 (an invalid trace ID).
    pub fn derived_from_pipeline(root_pipeline_id: u64) -> Option<Self> {
        if root_pipeline_id == 0 {
            return None;
        }
        Some(TraceContext {
            trace_id: TraceId::from_bytes(u128::from(root_pipeline_id).to_be_bytes()),
            parent_span_id: SpanId::INVALID,
        })
    }

    pub fn trace_id(&self) -> TraceId {
        self.trace_id
    }

    /// The parent's span ID; `0000000000000000` for a root.
    pub fn parent_span_id(&self) -> SpanId {
        self.parent_span_id
    }

    /// No parent: the trace ID was derived from the pipeline and
    /// `job_execution` is a root span.
    pub fn is_root(&self) -> bool {
        self.parent_span_id == SpanId::INVALID
    }

    /// The parent as OpenTelemetry sees it: remote and sampled (the runner
    /// keeps everything it is given; sampling happened in Rails).
    pub fn span_context(&self) -> SpanContext {
        SpanContext::new(
            self.trace_id,
            self.parent_span_id,
            TraceFlags::SAMPLED,
            true,
            TraceState::default(),
        )
    }
}

/// Which of the two IDs of a [`TraceContext`] failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IdField {
    TraceId,
    ParentSpanId,
}

fn parse_hex<const N: usize>(hex: &str) -> Result<[u8; N], IdError> {
    let bytes = hex.as_bytes();
    if bytes.len() != N * 2 {
        return Err(IdError::WrongLength {
            expected: N * 2,
            actual: hex.chars().count(),
        });
    }
    let mut out = [0u8; N];
    for (i, pair) in bytes.chunks_exact(2).enumerate() {
        let hi = hex_digit(pair[0]).ok_or(IdError::NotLowercaseHex)?;
        let lo = hex_digit(pair[1]).ok_or(IdError::NotLowercaseHex)?;
        out[i] = (hi << 4) | lo;
    }
    if out.iter().all(|b| *b == 0) {
        return Err(IdError::AllZero);
    }
    Ok(out)
}

fn hex_digit(c: u8) -> Option<u8> {
    match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        _ => None,
    }
}

/// Which contract the payload used.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ContractVersion {
    V1,
    V2,
}

/// What an enabled job does: where its spans hang, and where they go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TelemetryPlan {
    pub contract: ContractVersion,
    pub trace_context: TraceContext,
    /// Contract v2 endpoints, at most [`MAX_PAYLOAD_ENDPOINTS`]. Empty for v1:
    /// the runner's static endpoint is used.
    pub endpoints: Vec<PayloadEndpoint>,
    /// v2 endpoints that were not used, with why.
    pub skipped: Vec<SkippedEndpoint>,
}

impl fmt::Display for TelemetryPlan {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let version = match self.contract {
            ContractVersion::V1 => "v1",
            ContractVersion::V2 => "v2",
        };
        write!(
            f,
            "contract {version} trace_id={} parent={}",
            self.trace_context.trace_id(),
            self.trace_context.parent_span_id()
        )?;
        if self.contract == ContractVersion::V1 {
            write!(f, " endpoint=static")?;
        }
        for endpoint in &self.endpoints {
            write!(f, " endpoint={endpoint}")?;
        }
        for skipped in &self.skipped {
            write!(f, " skipped=[{skipped}]")?;
        }
        Ok(())
    }
}

/// OTLP transport, from the URL scheme of a payload endpoint or from
/// configuration.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Transport {
    /// OTLP/HTTP with protobuf bodies; the URL is used as-is (path kept).
    HttpProtobuf,
    /// OTLP/gRPC; the URL is `scheme://host:port`.
    Grpc,
}

impl fmt::Display for Transport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Transport::HttpProtobuf => write!(f, "http/protobuf"),
            Transport::Grpc => write!(f, "grpc"),
        }
    }
}

/// Authentication a payload endpoint asks for.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum EndpointAuth {
    None,
    /// `http_bearer_gcp_oidc`: a GCP ID token for `audience` as a bearer
    /// token, fetched and cached per audience by [`crate::export::auth`].
    HttpBearerGcpOidc {
        audience: String,
    },
}

/// A usable contract v2 endpoint.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct PayloadEndpoint {
    pub transport: Transport,
    /// For HTTP, the full URL (`http://host:4318/v1/traces`); for gRPC,
    /// `http://host:port` (`grpc`) or `https://host:port` (`grpcs`).
    pub url: String,
    /// Whether the endpoint wants TLS (`https`, `grpcs`).
    pub tls: bool,
    pub auth: EndpointAuth,
}

impl fmt::Display for PayloadEndpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}+{}",
            self.transport,
            crate::secrets::strip_credentials(&self.url)
        )?;
        if let EndpointAuth::HttpBearerGcpOidc { .. } = self.auth {
            write!(f, "(auth=http_bearer_gcp_oidc)")?;
        }
        Ok(())
    }
}

/// A payload endpoint that was not used.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SkippedEndpoint {
    /// Index in `otel_endpoints`.
    pub index: usize,
    pub reason: SkipReason,
}

/// Why a payload endpoint was not used (shown after `otel_endpoints[i] `).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum SkipReason {
    #[error("is not an object")]
    NotObject,
    #[error("has no url")]
    NoUrl,
    #[error("url is not a string")]
    UrlNotString,
    #[error("url is invalid: {0}")]
    InvalidUrl(String),
    #[error("has unsupported scheme `{0}`")]
    UnsupportedScheme(String),
    #[error("url has no host")]
    NoHost,
    #[error("url carries credentials")]
    Credentials,
    #[error("auth is not an object")]
    AuthNotObject,
    #[error("auth.type is not a string")]
    AuthTypeNotString,
    #[error("auth http_bearer_gcp_oidc has no audience")]
    NoAudience,
    #[error("has unsupported auth type `{0}`")]
    UnsupportedAuthType(String),
    #[error("is beyond the limit of {0} endpoints")]
    BeyondLimit(usize),
}

/// Why the runner, not the payload, disabled a job's telemetry.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum RunnerReason {
    /// `disabled` in the runner's configuration.
    #[error("telemetry is disabled in the runner configuration")]
    Configured,
    /// Every endpoint failed to set up.
    #[error("no exporter could be built: {}", .0.iter().map(|e| format!("skipped=[{e}]")).collect::<Vec<_>>().join(" "))]
    NoExporter(Vec<crate::export::error::SetupError>),
    /// The SDK did not start the job span.
    #[error("the job span could not be started")]
    SpanNotStarted,
}

impl fmt::Display for SkippedEndpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "otel_endpoints[{}] {}", self.index, self.reason)
    }
}

/// What the runner manager's configuration changes in negotiation.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct NegotiationOptions {
    /// The old-GitLab fallback (see the module docs): off by default.
    pub derive_trace_id_from_pipeline: bool,
}

/// Decides telemetry for one job payload with the default options (no
/// old-GitLab fallback). Never panics.
pub fn negotiate(payload: &Value) -> Negotiation {
    negotiate_with(payload, NegotiationOptions::default())
}

/// Decides telemetry for one job payload with explicit options. Never
/// panics.
pub fn negotiate_with(payload: &Value, options: NegotiationOptions) -> Negotiation {
    match negotiate_inner(payload, options) {
        Ok(plan) => Negotiation::Enabled(plan),
        Err(reason) => Negotiation::Disabled(reason),
    }
}

/// The trace ID the old-GitLab fallback would use for this payload:
/// `job_info.root_pipeline_id`, else `job_info.pipeline_id` (a positive
/// integer or a string of one).
pub fn derived_trace_context(payload: &Value) -> Option<TraceContext> {
    let info = payload.get("job_info")?.as_object()?;
    let id = |key: &str| match info.get(key)? {
        Value::Number(n) => n.as_u64(),
        Value::String(s) => s.trim().parse::<u64>().ok(),
        _ => None,
    };
    let pipeline = id("root_pipeline_id").or_else(|| id("pipeline_id"))?;
    TraceContext::derived_from_pipeline(pipeline)
}

fn negotiate_inner(
    payload_value: &Value,
    options: NegotiationOptions,
) -> Result<TelemetryPlan, DisabledReason> {
    let payload = payload_value;
    let payload = payload
        .as_object()
        .ok_or(DisabledReason::PayloadNotObject)?;
    let features = match payload.get("features") {
        None | Some(Value::Null) => return Err(DisabledReason::FeaturesMissing),
        Some(Value::Object(features)) => features,
        Some(_) => {
            return Err(DisabledReason::WrongType {
                field: "features",
                expected: "an object",
            })
        }
    };
    match features.get("tracing") {
        None | Some(Value::Null) => {}
        Some(Value::Object(tracing)) => return negotiate_v2(tracing),
        Some(_) => {
            return Err(DisabledReason::WrongType {
                field: "features.tracing",
                expected: "an object",
            })
        }
    }
    let plan = negotiate_v1(payload, features);
    match plan {
        Err(DisabledReason::FieldMissing("trace_context"))
            if options.derive_trace_id_from_pipeline =>
        {
            let trace_context =
                derived_trace_context(payload_value).ok_or(DisabledReason::FieldMissing(
                    "trace_context (and job_info.pipeline_id to derive a trace id from)",
                ))?;
            Ok(TelemetryPlan {
                contract: ContractVersion::V1,
                trace_context,
                endpoints: Vec::new(),
                skipped: Vec::new(),
            })
        }
        other => other,
    }
}

type Object = serde_json::Map<String, Value>;

fn negotiate_v1(payload: &Object, features: &Object) -> Result<TelemetryPlan, DisabledReason> {
    match features.get("job_telemetry") {
        None | Some(Value::Null) => return Err(DisabledReason::FeaturesMissing),
        Some(Value::Bool(true)) => {}
        Some(Value::Bool(false)) => return Err(DisabledReason::FlagFalse),
        Some(_) => {
            return Err(DisabledReason::WrongType {
                field: "features.job_telemetry",
                expected: "a boolean",
            })
        }
    }
    let context = match payload.get("trace_context") {
        None | Some(Value::Null) => return Err(DisabledReason::FieldMissing("trace_context")),
        Some(Value::Object(context)) => context,
        Some(_) => {
            return Err(DisabledReason::WrongType {
                field: "trace_context",
                expected: "an object",
            })
        }
    };
    let trace_context = trace_context_from(
        context,
        ("trace_id", "trace_context.trace_id"),
        ("parent_span_id", "trace_context.parent_span_id"),
    )?;
    Ok(TelemetryPlan {
        contract: ContractVersion::V1,
        trace_context,
        endpoints: Vec::new(),
        skipped: Vec::new(),
    })
}

fn negotiate_v2(tracing: &Object) -> Result<TelemetryPlan, DisabledReason> {
    let trace_context = trace_context_from(
        tracing,
        ("trace_id", "features.tracing.trace_id"),
        ("span_parent_id", "features.tracing.span_parent_id"),
    )?;
    let entries = match tracing.get("otel_endpoints") {
        None | Some(Value::Null) => return Err(DisabledReason::NoEndpoints),
        Some(Value::Array(entries)) if entries.is_empty() => {
            return Err(DisabledReason::NoEndpoints)
        }
        Some(Value::Array(entries)) => entries,
        Some(_) => {
            return Err(DisabledReason::WrongType {
                field: "features.tracing.otel_endpoints",
                expected: "an array",
            })
        }
    };
    let mut endpoints = Vec::new();
    let mut skipped = Vec::new();
    for (index, entry) in entries.iter().enumerate() {
        match payload_endpoint(entry) {
            Ok(_) if endpoints.len() == MAX_PAYLOAD_ENDPOINTS => skipped.push(SkippedEndpoint {
                index,
                reason: SkipReason::BeyondLimit(MAX_PAYLOAD_ENDPOINTS),
            }),
            Ok(endpoint) => endpoints.push(endpoint),
            Err(reason) => skipped.push(SkippedEndpoint { index, reason }),
        }
    }
    if endpoints.is_empty() {
        return Err(DisabledReason::AllEndpointsSkipped(skipped));
    }
    Ok(TelemetryPlan {
        contract: ContractVersion::V2,
        trace_context,
        endpoints,
        skipped,
    })
}

fn trace_context_from(
    object: &Object,
    (trace_key, trace_field): (&str, &'static str),
    (span_key, span_field): (&str, &'static str),
) -> Result<TraceContext, DisabledReason> {
    let trace_id = string_field(object, trace_key, trace_field)?;
    let span_id = string_field(object, span_key, span_field)?;
    TraceContext::from_hex(trace_id, span_id).map_err(|(which, error)| {
        let field = match which {
            IdField::TraceId => trace_field,
            IdField::ParentSpanId => span_field,
        };
        DisabledReason::InvalidId { field, error }
    })
}

fn string_field<'a>(
    object: &'a Object,
    key: &str,
    field: &'static str,
) -> Result<&'a str, DisabledReason> {
    match object.get(key) {
        None | Some(Value::Null) => Err(DisabledReason::FieldMissing(field)),
        Some(Value::String(s)) => Ok(s),
        Some(_) => Err(DisabledReason::WrongType {
            field,
            expected: "a string",
        }),
    }
}

fn payload_endpoint(entry: &Value) -> Result<PayloadEndpoint, SkipReason> {
    let entry = entry.as_object().ok_or(SkipReason::NotObject)?;
    let raw_url = match entry.get("url") {
        Some(Value::String(url)) if !url.is_empty() => url,
        Some(Value::String(_)) | None | Some(Value::Null) => return Err(SkipReason::NoUrl),
        Some(_) => return Err(SkipReason::UrlNotString),
    };
    let url = url::Url::parse(raw_url).map_err(|e| SkipReason::InvalidUrl(e.to_string()))?;
    let auth = endpoint_auth(entry.get("auth"))?;
    let scheme = url.scheme();
    let (transport, tls) = match scheme {
        "http" => (Transport::HttpProtobuf, false),
        "https" => (Transport::HttpProtobuf, true),
        "grpc" => (Transport::Grpc, false),
        "grpcs" => (Transport::Grpc, true),
        other => return Err(SkipReason::UnsupportedScheme(other.to_string())),
    };
    let host = match url.host_str() {
        Some(host) if !host.is_empty() => host,
        _ => return Err(SkipReason::NoHost),
    };
    if !url.username().is_empty() || url.password().is_some() {
        return Err(SkipReason::Credentials);
    }
    let url = match transport {
        Transport::HttpProtobuf => url.to_string(),
        Transport::Grpc => {
            let port = url.port().unwrap_or(4317);
            let scheme = if tls { "https" } else { "http" };
            format!("{scheme}://{host}:{port}")
        }
    };
    Ok(PayloadEndpoint {
        transport,
        url,
        tls,
        auth,
    })
}

fn endpoint_auth(auth: Option<&Value>) -> Result<EndpointAuth, SkipReason> {
    let auth = match auth {
        None | Some(Value::Null) => return Ok(EndpointAuth::None),
        Some(Value::Object(auth)) => auth,
        Some(_) => return Err(SkipReason::AuthNotObject),
    };
    let kind = match auth.get("type") {
        None | Some(Value::Null) => return Ok(EndpointAuth::None),
        Some(Value::String(kind)) => kind.as_str(),
        Some(_) => return Err(SkipReason::AuthTypeNotString),
    };
    match kind {
        "" | "none" => Ok(EndpointAuth::None),
        "http_bearer_gcp_oidc" => {
            let audience = auth
                .get("http_bearer_gcp_oidc")
                .and_then(|o| o.get("audience"))
                .and_then(Value::as_str)
                .filter(|a| !a.is_empty())
                .ok_or(SkipReason::NoAudience)?;
            Ok(EndpointAuth::HttpBearerGcpOidc {
                audience: audience.to_string(),
            })
        }
        other => Err(SkipReason::UnsupportedAuthType(other.to_string())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    const T: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
    const P: &str = "00f067aa0ba902b7";

    /// Negotiates `input` and compares the one-line summary with `expected`.
    fn check(input: Value, expected: &str) {
        let actual = negotiate(&input).to_string();
        assert_eq!(actual, expected, "input: {input}");
    }

    fn v1(trace_context: Value) -> Value {
        json!({"id": 1, "features": {"job_telemetry": true}, "trace_context": trace_context})
    }

    fn v2(endpoints: Value) -> Value {
        json!({"features": {"tracing": {"trace_id": T, "span_parent_id": P, "otel_endpoints": endpoints}}})
    }

    #[test]
    fn v1_cases() {
        check(
            v1(json!({"trace_id": T, "parent_span_id": P})),
            &format!("enabled: contract v1 trace_id={T} parent={P} endpoint=static"),
        );
        check(json!([]), "disabled: the job payload is not a JSON object");
        check(
            json!(null),
            "disabled: the job payload is not a JSON object",
        );
        check(
            json!({"id": 1}),
            "disabled: features.job_telemetry and features.tracing are both missing",
        );
        check(
            json!({"features": {}}),
            "disabled: features.job_telemetry and features.tracing are both missing",
        );
        check(
            json!({"features": null}),
            "disabled: features.job_telemetry and features.tracing are both missing",
        );
        check(
            json!({"features": "yes"}),
            "disabled: features is not an object",
        );
        check(
            json!({"features": {"job_telemetry": false}, "trace_context": {"trace_id": T, "parent_span_id": P}}),
            "disabled: features.job_telemetry is false",
        );
        check(
            json!({"features": {"job_telemetry": "true"}}),
            "disabled: features.job_telemetry is not a boolean",
        );
        check(
            json!({"features": {"job_telemetry": 1}}),
            "disabled: features.job_telemetry is not a boolean",
        );
        check(
            json!({"features": {"job_telemetry": true}}),
            "disabled: trace_context is missing",
        );
        check(
            v1(json!("00-4bf9-01")),
            "disabled: trace_context is not an object",
        );
        check(
            v1(json!({"parent_span_id": P})),
            "disabled: trace_context.trace_id is missing",
        );
        check(
            v1(json!({"trace_id": T})),
            "disabled: trace_context.parent_span_id is missing",
        );
        check(
            v1(json!({"trace_id": 42, "parent_span_id": P})),
            "disabled: trace_context.trace_id is not a string",
        );
        check(
            v1(json!({"trace_id": T, "parent_span_id": ["x"]})),
            "disabled: trace_context.parent_span_id is not a string",
        );
        check(
            v1(json!({"trace_id": "00000000000000000000000000000000", "parent_span_id": P})),
            "disabled: trace_context.trace_id is all zeros",
        );
        check(
            v1(json!({"trace_id": T, "parent_span_id": "0000000000000000"})),
            "disabled: trace_context.parent_span_id is all zeros",
        );
        check(
            v1(json!({"trace_id": "4bf92f3577b34da6", "parent_span_id": P})),
            "disabled: trace_context.trace_id has 16 characters, expected 32",
        );
        check(
            v1(json!({"trace_id": T, "parent_span_id": T})),
            "disabled: trace_context.parent_span_id has 32 characters, expected 16",
        );
        check(
            v1(json!({"trace_id": "4BF92F3577B34DA6A3CE929D0E0E4736", "parent_span_id": P})),
            "disabled: trace_context.trace_id is not lowercase hex",
        );
        check(
            v1(json!({"trace_id": "4bf92f3577b34da6a3ce929d0e0e473g", "parent_span_id": P})),
            "disabled: trace_context.trace_id is not lowercase hex",
        );
        check(
            v1(json!({"trace_id": T, "parent_span_id": " 0f067aa0ba902b7"})),
            "disabled: trace_context.parent_span_id is not lowercase hex",
        );
        // Multi-byte characters: 32 bytes in 16 characters, and a short one.
        check(
            v1(json!({"trace_id": "é".repeat(16), "parent_span_id": P})),
            "disabled: trace_context.trace_id is not lowercase hex",
        );
        check(
            v1(json!({"trace_id": "é".repeat(15), "parent_span_id": P})),
            "disabled: trace_context.trace_id has 15 characters, expected 32",
        );
    }

    #[test]
    fn v2_cases() {
        check(
            v2(json!([{"url": "http://collector:4318/v1/traces"}])),
            &format!("enabled: contract v2 trace_id={T} parent={P} endpoint=http/protobuf+http://collector:4318/v1/traces"),
        );
        check(
            v2(json!([{"url": "https://collector.example.com/custom/path", "auth": {"type": "http_bearer_gcp_oidc", "http_bearer_gcp_oidc": {"audience": "aud"}}}])),
            &format!("enabled: contract v2 trace_id={T} parent={P} endpoint=http/protobuf+https://collector.example.com/custom/path(auth=http_bearer_gcp_oidc)"),
        );
        check(
            v2(json!([{"url": "grpc://collector:4317"}, {"url": "grpcs://other"}])),
            &format!("enabled: contract v2 trace_id={T} parent={P} endpoint=grpc+http://collector:4317 endpoint=grpc+https://other:4317"),
        );
        check(
            v2(json!([{"url": "kafka://broker:9092"}, {"url": "http://c:4318/v1/traces", "auth": {"type": "mtls"}}, {"url": "grpc://c:4317"}])),
            &format!("enabled: contract v2 trace_id={T} parent={P} endpoint=grpc+http://c:4317 skipped=[otel_endpoints[0] has unsupported scheme `kafka`] skipped=[otel_endpoints[1] has unsupported auth type `mtls`]"),
        );
        check(
            v2(json!([{"url": "http://a/v1/traces"}, {"url": "http://b/v1/traces"}, {"url": "http://c/v1/traces"}])),
            &format!("enabled: contract v2 trace_id={T} parent={P} endpoint=http/protobuf+http://a/v1/traces endpoint=http/protobuf+http://b/v1/traces skipped=[otel_endpoints[2] is beyond the limit of 2 endpoints]"),
        );
        check(
            v2(json!([])),
            "disabled: features.tracing.otel_endpoints is empty",
        );
        check(
            v2(json!(null)),
            "disabled: features.tracing.otel_endpoints is empty",
        );
        check(
            v2(json!({"url": "http://a"})),
            "disabled: features.tracing.otel_endpoints is not an array",
        );
        check(
            v2(json!([{"url": "ftp://a"}, "http://b", {"url": 3}, {}, {"url": "http://c", "auth": {"type": "http_bearer_aws_oidc"}}, {"url": "not a url"}, {"url": "http://d", "auth": {"type": "http_bearer_gcp_oidc"}}, {"url": "http://u:p@e/v1/traces"}])),
            "disabled: every OTLP endpoint was skipped: otel_endpoints[0] has unsupported scheme `ftp`; otel_endpoints[1] is not an object; otel_endpoints[2] url is not a string; otel_endpoints[3] has no url; otel_endpoints[4] has unsupported auth type `http_bearer_aws_oidc`; otel_endpoints[5] url is invalid: relative URL without a base; otel_endpoints[6] auth http_bearer_gcp_oidc has no audience; otel_endpoints[7] url carries credentials",
        );
        check(
            json!({"features": {"tracing": {"span_parent_id": P, "otel_endpoints": [{"url": "http://a"}]}}}),
            "disabled: features.tracing.trace_id is missing",
        );
        check(
            json!({"features": {"tracing": {"trace_id": T, "span_parent_id": "zz", "otel_endpoints": [{"url": "http://a"}]}}}),
            "disabled: features.tracing.span_parent_id has 2 characters, expected 16",
        );
        check(
            json!({"features": {"tracing": true}}),
            "disabled: features.tracing is not an object",
        );
        // v2 decides when present, even if v1 says yes.
        check(
            json!({"features": {"job_telemetry": true, "tracing": {"trace_id": T, "span_parent_id": P, "otel_endpoints": []}}, "trace_context": {"trace_id": T, "parent_span_id": P}}),
            "disabled: features.tracing.otel_endpoints is empty",
        );
        // `tracing: null` falls back to v1.
        check(
            json!({"features": {"job_telemetry": true, "tracing": null}, "trace_context": {"trace_id": T, "parent_span_id": P}}),
            &format!("enabled: contract v1 trace_id={T} parent={P} endpoint=static"),
        );
    }

    /// With the old-GitLab fallback on.
    fn check_derived(input: Value, expected: &str) {
        let options = NegotiationOptions {
            derive_trace_id_from_pipeline: true,
        };
        assert_eq!(
            negotiate_with(&input, options).to_string(),
            expected,
            "input: {input}"
        );
    }

    #[test]
    fn derived_trace_id_cases() {
        let old =
            |job_info: Value| json!({"features": {"job_telemetry": true}, "job_info": job_info});
        check_derived(
            old(json!({"pipeline_id": 506})),
            "enabled: contract v1 trace_id=000000000000000000000000000001fa parent=0000000000000000 endpoint=static",
        );
        check_derived(
            old(json!({"pipeline_id": 7, "root_pipeline_id": "5"})),
            "enabled: contract v1 trace_id=00000000000000000000000000000005 parent=0000000000000000 endpoint=static",
        );
        check_derived(
            old(json!({"pipeline_id": 0})),
            "disabled: trace_context (and job_info.pipeline_id to derive a trace id from) is missing",
        );
        check_derived(
            old(json!({})),
            "disabled: trace_context (and job_info.pipeline_id to derive a trace id from) is missing",
        );
        // A trace context that is there wins, and a bad one stays disabled.
        check_derived(
            v1(json!({"trace_id": T, "parent_span_id": P})),
            &format!("enabled: contract v1 trace_id={T} parent={P} endpoint=static"),
        );
        check_derived(
            v1(json!({"trace_id": "XYZ", "parent_span_id": P})),
            "disabled: trace_context.trace_id has 3 characters, expected 32",
        );
        check_derived(
            json!({"features": {"job_telemetry": false}, "job_info": {"pipeline_id": 5}}),
            "disabled: features.job_telemetry is false",
        );
        // Off by default, and after a scope.
        check(
            old(json!({"pipeline_id": 506})),
            "disabled: trace_context is missing",
        );
        let tc = TraceContext::derived_from_pipeline(506).unwrap();
        assert!(tc.is_root());
        assert!(!TraceContext::from_hex(T, P).unwrap().is_root());
        assert_eq!(TraceContext::derived_from_pipeline(0), None);
    }

    #[test]
    fn trace_context_exposes_a_remote_sampled_span_context() {
        let tc = TraceContext::from_hex(T, P).unwrap();
        let sc = tc.span_context();
        assert!(sc.is_remote());
        assert!(sc.is_sampled());
        assert!(sc.is_valid());
        assert_eq!(sc.trace_id().to_string(), T);
        assert_eq!(sc.span_id().to_string(), P);
    }

    proptest::proptest! {
        #[test]
        fn negotiate_never_panics(value in arb_json()) {
            let _ = negotiate(&value).to_string();
            // Also inside the places the contract looks at.
            let _ = negotiate(&json!({"features": {"job_telemetry": true, "tracing": value.clone()}, "trace_context": value.clone()}));
            let _ = negotiate(&json!({"features": {"tracing": {"trace_id": T, "span_parent_id": P, "otel_endpoints": [value.clone(), {"url": "http://a", "auth": value.clone()}]}}}));
        }
    }

    fn arb_json() -> impl proptest::strategy::Strategy<Value = Value> {
        use proptest::prelude::*;
        let leaf = prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::Bool),
            any::<i64>().prop_map(Value::from),
            any::<f64>().prop_map(Value::from),
            "[a-zA-Z0-9:/._ -]{0,40}".prop_map(Value::String),
            Just(Value::String(T.into())),
            Just(Value::String(P.into())),
            Just(Value::String("grpc://collector:4317".into())),
        ];
        leaf.prop_recursive(4, 64, 8, |inner| {
            let keys = prop_oneof![
                Just("features".to_string()),
                Just("job_telemetry".to_string()),
                Just("tracing".to_string()),
                Just("trace_context".to_string()),
                Just("trace_id".to_string()),
                Just("parent_span_id".to_string()),
                Just("span_parent_id".to_string()),
                Just("otel_endpoints".to_string()),
                Just("url".to_string()),
                Just("auth".to_string()),
                Just("type".to_string()),
                "[a-z]{1,8}",
            ];
            prop_oneof![
                proptest::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
                proptest::collection::btree_map(keys, inner, 0..6)
                    .prop_map(|m| Value::Object(m.into_iter().collect())),
            ]
        })
    }
}

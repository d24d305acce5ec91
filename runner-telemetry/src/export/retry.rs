//! Which failed exports are retried, and when.
//!
//! The OpenTelemetry Protocol specification (`specification/protocol/otlp.md`,
//! "Failures" and "Throttling" of OTLP/HTTP and OTLP/gRPC) decides:
//!
//! * OTLP/HTTP: "The client SHOULD interpret HTTP 429, 502, 503 and 504 as
//!   retryable; all other 4xx and 5xx as not retryable." The server signals
//!   throttling with 429 or 503 and MAY add `Retry-After` (delay-seconds or an
//!   HTTP-date), which the client SHOULD honour. A client that cannot connect
//!   SHOULD retry with exponential backoff; a request that timed out is
//!   treated the same way (the collector may be stalled, not gone).
//! * OTLP/gRPC: retryable are `CANCELLED`, `DEADLINE_EXCEEDED`, `ABORTED`,
//!   `OUT_OF_RANGE`, `UNAVAILABLE` and `DATA_LOSS`; `RESOURCE_EXHAUSTED` only
//!   when the status carries a `google.rpc.RetryInfo` ("the server signals
//!   that the recovery from resource exhaustion is possible"), whose
//!   `retry_delay` the client SHOULD wait; every other code is permanent.
//!
//! Delays: a server's delay (`Retry-After`, `RetryInfo`) is used as given,
//! capped at [`MAX_SERVER_DELAY`]; otherwise [`Backoff`]: exponential,
//! doubling from the initial delay to the maximum, with "equal jitter" (a
//! random delay in the upper half of the step), so that runners that failed
//! together do not retry together and each delay is at least the previous one.

use std::time::{Duration, SystemTime};

use prost::Message;

use super::error::{ExportError, RequestError};

/// The longest delay a server may ask for; longer requests are cut to this.
pub const MAX_SERVER_DELAY: Duration = Duration::from_secs(30);

/// What to do after a failed export request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Try again: after the server's delay if it gave one (already capped),
    /// else after the next backoff step.
    Retry { after: Option<Duration> },
    /// Do not try again: the spans are dropped as `permanent_error`.
    Permanent,
}

/// Classifies a failed export attempt by its kind: the collector's answer
/// by [`classify_http`] or [`classify_grpc`]; no connection, a broken one or
/// no answer in time, and a credential not to be had (a token file being
/// rewritten, a metadata server restarting) are retried; a target that
/// cannot be used or a request that cannot be built is not.
pub fn classify(error: &ExportError, now: SystemTime) -> Verdict {
    match error {
        ExportError::Http {
            status,
            retry_after,
            ..
        } => classify_http(status.as_u16(), retry_after.as_deref(), now),
        ExportError::Grpc { code, details, .. } => classify_grpc(*code, details),
        ExportError::Request(RequestError::InvalidRequest(_)) | ExportError::Setup(_) => {
            Verdict::Permanent
        }
        ExportError::Request(_) | ExportError::Auth(_) | ExportError::Stopped => {
            Verdict::Retry { after: None }
        }
    }
}

/// Classifies an OTLP/HTTP answer that is not 2xx.
pub fn classify_http(status: u16, retry_after: Option<&str>, now: SystemTime) -> Verdict {
    match status {
        // Throttling: the server may say when to come back.
        429 | 503 => Verdict::Retry {
            after: retry_after.and_then(|v| parse_retry_after(v, now)),
        },
        // Bad gateway, gateway timeout: a proxy in front of a collector that
        // is restarting.
        502 | 504 => Verdict::Retry { after: None },
        _ => Verdict::Permanent,
    }
}

/// Classifies an OTLP/gRPC status that is not `OK`. `details` is the
/// status's binary details (an encoded `google.rpc.Status`).
pub fn classify_grpc(code: tonic::Code, details: &[u8]) -> Verdict {
    use tonic::Code;
    match code {
        Code::Cancelled
        | Code::DeadlineExceeded
        | Code::Aborted
        | Code::OutOfRange
        | Code::Unavailable
        | Code::DataLoss => Verdict::Retry {
            after: retry_info_delay(details),
        },
        Code::ResourceExhausted => match retry_info_delay(details) {
            Some(delay) => Verdict::Retry { after: Some(delay) },
            None => Verdict::Permanent,
        },
        _ => Verdict::Permanent,
    }
}

/// Parses `Retry-After`: delay-seconds or an HTTP-date (RFC 9110 10.2.3),
/// as a delay from `now`, capped at [`MAX_SERVER_DELAY`]. A date in the past
/// means "now".
pub fn parse_retry_after(value: &str, now: SystemTime) -> Option<Duration> {
    let value = value.trim();
    let delay = if !value.is_empty() && value.bytes().all(|b| b.is_ascii_digit()) {
        Duration::from_secs(value.parse::<u64>().unwrap_or(u64::MAX))
    } else {
        let date = httpdate::parse_http_date(value).ok()?;
        date.duration_since(now).unwrap_or(Duration::ZERO)
    };
    Some(delay.min(MAX_SERVER_DELAY))
}

/// `google.rpc.Status` (as gRPC servers put it in `grpc-status-details-bin`)
/// and `google.rpc.RetryInfo`, from `tonic-types`; `google.protobuf.Any` and
/// `Duration` from `prost-types`.
pub use prost_types::{Any as ProtoAny, Duration as ProtoDuration};
pub use tonic_types::pb::{RetryInfo, Status as RpcStatus};

pub const RETRY_INFO_TYPE_URL: &str = "type.googleapis.com/google.rpc.RetryInfo";

/// The `RetryInfo` delay in a gRPC status's details, capped; `None` when
/// there is none (or the details do not decode). A negative delay is zero.
pub fn retry_info_delay(details: &[u8]) -> Option<Duration> {
    if details.is_empty() {
        return None;
    }
    let status = RpcStatus::decode(details).ok()?;
    let any = status
        .details
        .iter()
        .find(|d| d.type_url.ends_with("google.rpc.RetryInfo"))?;
    let info = RetryInfo::decode(any.value.as_slice()).ok()?;
    let delay = info.retry_delay.unwrap_or_default();
    let secs = u64::try_from(delay.seconds).unwrap_or(0);
    let nanos = u32::try_from(delay.nanos).unwrap_or(0).min(999_999_999);
    Some(Duration::new(secs, nanos).min(MAX_SERVER_DELAY))
}

/// Encodes a `google.rpc.Status` with a `RetryInfo`, as a server would (for
/// tests and fakes).
pub fn retry_info_details(code: i32, message: &str, delay: Duration) -> Vec<u8> {
    let info = RetryInfo {
        retry_delay: Some(ProtoDuration {
            seconds: delay.as_secs() as i64,
            nanos: delay.subsec_nanos() as i32,
        }),
    };
    RpcStatus {
        code,
        message: message.to_string(),
        details: vec![ProtoAny {
            type_url: RETRY_INFO_TYPE_URL.to_string(),
            value: info.encode_to_vec(),
        }],
    }
    .encode_to_vec()
}

/// Exponential backoff with equal jitter: step `n` waits a random time in
/// `[d/2, d]` where `d = min(initial * 2^n, max)`. Each delay is at least
/// the previous one (until the maximum is reached, where they stay in
/// `[max/2, max]`).
#[derive(Debug, Clone)]
pub struct Backoff {
    initial: Duration,
    max: Duration,
    next: Duration,
    /// Failures since the last success.
    pub failures: u32,
}

impl Backoff {
    pub fn new(initial: Duration, max: Duration) -> Backoff {
        let initial = initial.max(Duration::from_millis(1));
        Backoff {
            initial,
            max: max.max(initial),
            next: initial,
            failures: 0,
        }
    }

    /// The delay before the next attempt; advances the schedule.
    pub fn next_delay(&mut self) -> Duration {
        let step = self.next;
        self.next = self.next.saturating_mul(2).min(self.max);
        self.failures = self.failures.saturating_add(1);
        let half = step / 2;
        let jitter_nanos = rand::random_range(0..=half.as_nanos().min(u64::MAX as u128) as u64);
        half + Duration::from_nanos(jitter_nanos)
    }

    /// A failure whose delay the server chose: counts, and advances the
    /// schedule all the same.
    pub fn server_delay(&mut self, delay: Duration) -> Duration {
        self.failures = self.failures.saturating_add(1);
        self.next = self.next.saturating_mul(2).min(self.max);
        delay
    }

    pub fn reset(&mut self) {
        self.next = self.initial;
        self.failures = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn render(v: Verdict) -> String {
        match v {
            Verdict::Retry { after: None } => "retry(backoff)".into(),
            Verdict::Retry { after: Some(d) } => format!("retry({d:?})"),
            Verdict::Permanent => "permanent".into(),
        }
    }

    #[test]
    fn http_statuses() {
        // 1 November 2026 00:00:00 UTC.
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_793_491_200);
        let check = |status: u16, retry_after: Option<&str>, expected: &str| {
            assert_eq!(
                render(classify_http(status, retry_after, now)),
                expected,
                "{status} {retry_after:?}"
            );
        };
        // otlp.md, OTLP/HTTP Throttling: 429 and 503 with Retry-After.
        check(429, None, "retry(backoff)");
        check(429, Some("1"), "retry(1s)");
        check(503, Some("7"), "retry(7s)");
        check(503, Some(" 2 "), "retry(2s)");
        // Capped.
        check(429, Some("3600"), "retry(30s)");
        check(429, Some("99999999999999999999999"), "retry(30s)");
        // HTTP-date, in the future, in the past.
        check(503, Some("Sun, 01 Nov 2026 00:00:05 GMT"), "retry(5s)");
        check(503, Some("Sat, 31 Oct 2026 23:00:00 GMT"), "retry(0ns)");
        // Unparseable: the backoff decides.
        check(429, Some("soon"), "retry(backoff)");
        check(429, Some("-1"), "retry(backoff)");
        check(429, Some(""), "retry(backoff)");
        // otlp.md, OTLP/HTTP Failures: 502 and 504 retryable (Retry-After
        // is for throttling answers only).
        check(502, None, "retry(backoff)");
        check(504, Some("5"), "retry(backoff)");
        // Every other status is permanent.
        for status in [
            400, 401, 403, 404, 405, 413, 415, 500, 501, 505, 599, 300, 302,
        ] {
            check(status, Some("1"), "permanent");
        }
    }

    #[test]
    fn grpc_codes() {
        use tonic::Code;
        let info = retry_info_details(8, "slow down", Duration::from_millis(1500));
        let check = |code: Code, details: &[u8], expected: &str| {
            assert_eq!(render(classify_grpc(code, details)), expected, "{code:?}");
        };
        // otlp.md, OTLP/gRPC Failures: the retryable codes.
        for code in [
            Code::Cancelled,
            Code::DeadlineExceeded,
            Code::Aborted,
            Code::OutOfRange,
            Code::Unavailable,
            Code::DataLoss,
        ] {
            check(code, &[], "retry(backoff)");
        }
        // OTLP/gRPC Throttling: the server's RetryInfo delay.
        check(Code::Unavailable, &info, "retry(1.5s)");
        // RESOURCE_EXHAUSTED only with RetryInfo.
        check(Code::ResourceExhausted, &[], "permanent");
        check(Code::ResourceExhausted, b"garbage", "permanent");
        check(Code::ResourceExhausted, &info, "retry(1.5s)");
        let long = retry_info_details(8, "", Duration::from_secs(600));
        check(Code::ResourceExhausted, &long, "retry(30s)");
        // Everything else is permanent.
        for code in [
            Code::Unknown,
            Code::InvalidArgument,
            Code::NotFound,
            Code::AlreadyExists,
            Code::PermissionDenied,
            Code::FailedPrecondition,
            Code::Unimplemented,
            Code::Internal,
            Code::Unauthenticated,
        ] {
            check(code, &info, "permanent");
        }
    }

    #[test]
    fn errors_by_kind() {
        use crate::export::error::{AuthError, SetupError};
        use http::StatusCode;
        let now = SystemTime::UNIX_EPOCH;
        let check = |error: ExportError, expected: &str| {
            assert_eq!(render(classify(&error, now)), expected, "{error}");
        };
        let http = |status: StatusCode, retry_after: Option<&str>| ExportError::Http {
            status,
            retry_after: retry_after.map(str::to_string),
            message: None,
        };
        // No connection, a broken one, no answer: the collector may be back.
        check(
            RequestError::Connect("refused".into()).into(),
            "retry(backoff)",
        );
        check(RequestError::Io("reset".into()).into(), "retry(backoff)");
        check(RequestError::Body("eof".into()).into(), "retry(backoff)");
        check(
            RequestError::Timeout(Duration::from_secs(5)).into(),
            "retry(backoff)",
        );
        check(ExportError::Stopped, "retry(backoff)");
        // A token file being rewritten, a metadata server restarting.
        check(AuthError::NotHeaderSafe.into(), "retry(backoff)");
        // Nothing a retry can change.
        check(
            RequestError::InvalidRequest("uri".into()).into(),
            "permanent",
        );
        check(SetupError::Tls("no roots".into()).into(), "permanent");
        // The collector's answer, by its status.
        check(
            http(StatusCode::SERVICE_UNAVAILABLE, Some("2")),
            "retry(2s)",
        );
        check(http(StatusCode::BAD_REQUEST, Some("2")), "permanent");
        let grpc = |code: tonic::Code| ExportError::Grpc {
            code,
            details: bytes::Bytes::new(),
            message: None,
        };
        check(grpc(tonic::Code::Unavailable), "retry(backoff)");
        check(grpc(tonic::Code::InvalidArgument), "permanent");
        // Only a refused credential invalidates the cached token.
        assert!(http(StatusCode::UNAUTHORIZED, None).is_unauthenticated());
        assert!(grpc(tonic::Code::Unauthenticated).is_unauthenticated());
        assert!(!http(StatusCode::FORBIDDEN, None).is_unauthenticated());
        // The messages are the one-liners the logs and reports show.
        let busy = ExportError::Http {
            status: StatusCode::SERVICE_UNAVAILABLE,
            retry_after: None,
            message: Some("busy".into()),
        };
        assert_eq!(busy.to_string(), "HTTP 503 Service Unavailable: busy");
        assert_eq!(
            grpc(tonic::Code::Unavailable).to_string(),
            "gRPC Unavailable"
        );
        assert_eq!(
            ExportError::from(RequestError::Timeout(Duration::from_millis(250))).to_string(),
            "no answer within 250ms"
        );
    }

    #[test]
    fn backoff_grows_with_jitter_and_resets() {
        let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_millis(1000));
        for _ in 0..50 {
            backoff.reset();
            let delays: Vec<Duration> = (0..8).map(|_| backoff.next_delay()).collect();
            let steps = [100u64, 200, 400, 800, 1000, 1000, 1000, 1000];
            for (delay, step) in delays.iter().zip(steps) {
                let step = Duration::from_millis(step);
                assert!(*delay >= step / 2 && *delay <= step, "{delays:?}");
            }
            for pair in delays[..4].windows(2) {
                assert!(pair[1] >= pair[0], "{delays:?}");
            }
            assert_eq!(backoff.failures, 8);
        }
        backoff.reset();
        assert!(backoff.next_delay() <= Duration::from_millis(100));
    }
}

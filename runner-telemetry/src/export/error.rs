//! Why an export target cannot be set up ([`SetupError`]), and why one
//! export request failed ([`ExportError`], with its [`RequestError`] and
//! [`AuthError`]). One line each, naming files and header names, never a
//! header value or a token.

use std::path::PathBuf;

/// An export target that cannot be used (the job's telemetry then goes to
/// its other endpoints, or is disabled with this reason).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum SetupError {
    /// `build` was called outside a tokio runtime.
    #[error("no tokio runtime to export from")]
    NoRuntime,
    /// The CA file cannot be read (I/O).
    #[error("cannot read the CA file `{}`: {message}", path.display())]
    CaFileUnreadable {
        path: PathBuf,
        kind: std::io::ErrorKind,
        message: String,
    },
    /// The CA file was read but holds no usable certificate.
    #[error("the CA file `{}` {reason}", path.display())]
    CaFileInvalid { path: PathBuf, reason: String },
    /// The TLS configuration was refused.
    #[error("TLS: {0}")]
    Tls(String),
    /// A static header's name is not a valid HTTP header name.
    #[error("header name `{0}` is not valid")]
    HeaderName(String),
    /// A static header's value is not valid (the value is not shown).
    #[error("the value of header `{0}` is not valid")]
    HeaderValue(String),
    /// The gRPC endpoint URL is not usable.
    #[error("invalid gRPC endpoint: {0}")]
    GrpcEndpoint(String),
    /// One of the above, for this target (`transport+url`).
    #[error("{target}: {source}")]
    Target {
        target: String,
        #[source]
        source: Box<SetupError>,
    },
}

impl SetupError {
    pub(crate) fn ca_file_unreadable(path: &std::path::Path, error: &std::io::Error) -> Self {
        SetupError::CaFileUnreadable {
            path: path.to_path_buf(),
            kind: error.kind(),
            message: error.to_string(),
        }
    }

    pub(crate) fn for_target(self, target: impl std::fmt::Display) -> Self {
        SetupError::Target {
            target: target.to_string(),
            source: Box::new(self),
        }
    }
}

/// Why one request of the plain HTTP client failed (an export request, or
/// a token request to the metadata server). One line, no credentials.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum RequestError {
    /// The connection could not be made (refused, unreachable, DNS, TLS
    /// handshake); the innermost cause.
    #[error("cannot connect: {0}")]
    Connect(String),
    /// The connection broke while the request was sent or answered.
    #[error("request failed: {0}")]
    Io(String),
    /// The answer's body could not be read.
    #[error("reading the answer failed: {0}")]
    Body(String),
    /// No answer within the request's timeout.
    #[error("no answer within {}", human(*.0))]
    Timeout(std::time::Duration),
    /// The request could not be built (a URL or header the client refused).
    #[error("invalid request: {0}")]
    InvalidRequest(String),
}

/// Why a credential for an export request could not be had. Names the
/// file, server or audience, never a token.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum AuthError {
    /// The bearer token file cannot be read (I/O).
    #[error("cannot read the bearer token file `{}`: {message}", path.display())]
    TokenFileUnreadable {
        path: PathBuf,
        kind: std::io::ErrorKind,
        message: String,
    },
    /// The bearer token file holds nothing but white space.
    #[error("the bearer token file `{}` is empty", path.display())]
    TokenFileEmpty { path: PathBuf },
    /// The bearer token file holds more than one line.
    #[error("the bearer token file `{}` holds more than one line", path.display())]
    TokenFileLines { path: PathBuf },
    /// The metadata server's URL is not usable.
    #[error("the metadata server URL `{base}` is invalid: {message}")]
    MetadataUrl { base: String, message: String },
    /// The metadata server could not be asked.
    #[error("cannot get an ID token for audience `{audience}` from {base}: {source}")]
    MetadataRequest {
        audience: String,
        base: String,
        #[source]
        source: RequestError,
    },
    /// The metadata server answered with an error status.
    #[error("cannot get an ID token for audience `{audience}`: {base} answered {status}")]
    MetadataStatus {
        audience: String,
        base: String,
        status: http::StatusCode,
    },
    /// The metadata server's answer is not a JWT with an `exp` claim.
    #[error("cannot get an ID token for audience `{audience}`: {base} did not answer with a JWT carrying `exp`")]
    NotAJwt { audience: String, base: String },
    /// The token cannot be sent in an HTTP header (`Authorization`).
    #[error("the bearer token has characters a header cannot carry")]
    NotHeaderSafe,
    /// The token cannot be sent as gRPC metadata (`authorization`).
    #[error("the bearer token has characters gRPC metadata cannot carry")]
    NotMetadataSafe,
}

/// Why one export attempt failed; [`super::retry::classify`] decides from
/// it whether the batch is retried. Server text in it is cut and has every
/// credential of the request redacted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ExportError {
    /// Connection, I/O or timeout (OTLP/HTTP, or connecting over gRPC).
    #[error(transparent)]
    Request(#[from] RequestError),
    /// The target cannot be used (TLS, endpoint).
    #[error(transparent)]
    Setup(#[from] SetupError),
    /// No credential for the request.
    #[error(transparent)]
    Auth(#[from] AuthError),
    /// The collector answered OTLP/HTTP with a status that is not 2xx.
    #[error("HTTP {status}{}", suffix(message))]
    Http {
        status: http::StatusCode,
        /// The `Retry-After` header, as sent.
        retry_after: Option<String>,
        message: Option<String>,
    },
    /// The collector answered OTLP/gRPC with a status that is not `OK`.
    #[error("gRPC {code:?}{}", suffix(message))]
    Grpc {
        code: tonic::Code,
        /// The status's binary details (an encoded `google.rpc.Status`).
        details: bytes::Bytes,
        message: Option<String>,
    },
    /// The runner's shutdown deadline passed first.
    #[error("the runner stopped before the collector answered")]
    Stopped,
}

impl ExportError {
    /// The collector refused the credential (HTTP 401, gRPC
    /// `UNAUTHENTICATED`): a cached token may be stale.
    pub fn is_unauthenticated(&self) -> bool {
        match self {
            ExportError::Http { status, .. } => *status == http::StatusCode::UNAUTHORIZED,
            ExportError::Grpc { code, .. } => *code == tonic::Code::Unauthenticated,
            _ => false,
        }
    }
}

fn suffix(message: &Option<String>) -> String {
    match message {
        Some(m) if !m.is_empty() => format!(": {m}"),
        _ => String::new(),
    }
}

/// `5s`, `250ms`.
pub(crate) fn human(d: std::time::Duration) -> String {
    if d.subsec_millis() == 0 {
        format!("{}s", d.as_secs())
    } else {
        format!("{}ms", d.as_millis())
    }
}

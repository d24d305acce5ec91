//! Why an export target cannot be set up: [`SetupError`]. One line each,
//! naming files and header names, never a header value or a token.

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

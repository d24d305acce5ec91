//! One export request over OTLP/HTTP (protobuf `POST`) or OTLP/gRPC
//! (`TraceService/Export`), with TLS when the URL says `https`.
//!
//! TLS: rustls with the ring provider, trusting the system's CA certificates
//! plus those of `ca_file` (`OTEL_EXPORTER_OTLP_CERTIFICATE`). HTTP goes
//! through one pooled hyper client per runner, gRPC through one lazily
//! connected tonic channel per endpoint.

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use http::header::{HeaderName, HeaderValue};
use http::StatusCode;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceResponse;
use prost::Message;

use super::encode::RawExportRequest;
use super::error::{AuthError, ExportError, RequestError, SetupError};
use super::logs_encode::Signal;
pub use super::logs_encode::GRPC_EXPORT_PATH;
use super::retry::{classify, Verdict};
use crate::negotiate::Transport;
use crate::secrets::{redact_all, url_credentials, Secret};

/// Longest server message kept in an error.
const MAX_MESSAGE: usize = 200;

/// How one attempt went.
#[derive(Debug)]
pub enum Attempt {
    /// The collector took the request; `rejected` spans of it were refused
    /// (partial success).
    Delivered { rejected: u64, message: String },
    Failed {
        /// From [`classify`] of `error`.
        verdict: Verdict,
        /// One line, without credentials.
        error: ExportError,
        /// 401/`UNAUTHENTICATED`: the credential may be stale.
        unauthenticated: bool,
    },
}

impl Attempt {
    /// A failed attempt, classified by the kind of its error.
    pub fn failed(error: impl Into<ExportError>) -> Attempt {
        let error = error.into();
        Attempt::Failed {
            verdict: classify(&error, SystemTime::now()),
            unauthenticated: error.is_unauthenticated(),
            error,
        }
    }
}

/// A response of the plain HTTP client.
#[derive(Debug)]
pub struct HttpAnswer {
    pub status: StatusCode,
    pub headers: http::HeaderMap,
    pub body: Bytes,
}

type HyperClient = Client<hyper_rustls::HttpsConnector<HttpConnector>, Full<Bytes>>;

/// A pooled HTTP/1.1 client, `http` and `https`.
#[derive(Clone)]
pub struct HttpClient {
    client: HyperClient,
}

impl std::fmt::Debug for HttpClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("HttpClient")
    }
}

/// The root certificates: the system's and the CA file's.
pub fn tls_roots(ca_file: Option<&Path>) -> Result<rustls::RootCertStore, SetupError> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::CertificateDer;
    let mut roots = rustls::RootCertStore::empty();
    let native = rustls_native_certs::load_native_certs();
    let _ = roots.add_parsable_certificates(native.certs);
    if let Some(path) = ca_file {
        let pem = std::fs::read(path).map_err(|e| SetupError::ca_file_unreadable(path, &e))?;
        let invalid = |reason: String| SetupError::CaFileInvalid {
            path: path.to_path_buf(),
            reason,
        };
        let mut added = 0;
        for cert in CertificateDer::pem_slice_iter(&pem) {
            let cert = cert.map_err(|e| invalid(format!("is not valid PEM: {e}")))?;
            roots
                .add(cert)
                .map_err(|e| invalid(format!("holds an unusable certificate: {e}")))?;
            added += 1;
        }
        if added == 0 {
            return Err(invalid("holds no certificate".into()));
        }
    }
    Ok(roots)
}

impl HttpClient {
    pub fn new(
        ca_file: Option<&Path>,
        connect_timeout: Duration,
    ) -> Result<HttpClient, SetupError> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let tls = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| SetupError::Tls(e.to_string()))?
            .with_root_certificates(tls_roots(ca_file)?)
            .with_no_client_auth();
        let mut http = HttpConnector::new();
        http.enforce_http(false);
        http.set_connect_timeout(Some(connect_timeout));
        http.set_nodelay(true);
        let connector = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(tls)
            .https_or_http()
            .enable_http1()
            .wrap_connector(http);
        let client = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(60))
            .build(connector);
        Ok(HttpClient { client })
    }

    /// One request, bounded by `timeout`; the error is one line.
    pub async fn request(
        &self,
        request: http::Request<Full<Bytes>>,
        timeout: Duration,
    ) -> Result<HttpAnswer, RequestError> {
        let exchange = async {
            let response = self.client.request(request).await.map_err(describe_hyper)?;
            let (parts, body) = response.into_parts();
            let body = body
                .collect()
                .await
                .map_err(|e| RequestError::Body(e.to_string()))?
                .to_bytes();
            Ok(HttpAnswer {
                status: parts.status,
                headers: parts.headers,
                body,
            })
        };
        match tokio::time::timeout(timeout, exchange).await {
            Ok(result) => result,
            Err(_) => Err(RequestError::Timeout(timeout)),
        }
    }

    /// A `GET` with headers.
    pub async fn get(
        &self,
        url: &str,
        headers: &[(&str, &str)],
        timeout: Duration,
    ) -> Result<HttpAnswer, RequestError> {
        let mut builder = http::Request::get(url);
        for (k, v) in headers {
            builder = builder.header(*k, *v);
        }
        let request = builder
            .body(Full::new(Bytes::new()))
            .map_err(|e| RequestError::InvalidRequest(e.to_string()))?;
        self.request(request, timeout).await
    }
}

/// The innermost cause of a client error ("Connection refused (os error
/// 111)"), which says more than the outer ones.
fn describe_hyper(e: hyper_util::client::legacy::Error) -> RequestError {
    let mut source: &dyn std::error::Error = &e;
    while let Some(next) = source.source() {
        source = next;
    }
    if e.is_connect() {
        RequestError::Connect(source.to_string())
    } else {
        RequestError::Io(source.to_string())
    }
}

/// Headers of a target, validated once.
pub type Headers = Vec<(HeaderName, HeaderValue)>;

/// Validates `(name, value)` pairs; the error names the header, never its
/// value.
pub fn validate_headers(headers: &[(String, String)]) -> Result<Headers, SetupError> {
    let mut out = Vec::new();
    for (key, value) in headers {
        let name = HeaderName::from_bytes(key.trim().as_bytes())
            .map_err(|_| SetupError::HeaderName(key.clone()))?;
        let mut value =
            HeaderValue::from_str(value).map_err(|_| SetupError::HeaderValue(key.clone()))?;
        value.set_sensitive(true);
        out.push((name, value));
    }
    Ok(out)
}

/// Text a collector answered, with every credential this request carried
/// redacted: header values, the bearer token, the URL's userinfo.
fn redact_answer(text: &str, url: &str, headers: &Headers, bearer: Option<&Secret>) -> String {
    let from_url = url_credentials(url);
    let values = headers
        .iter()
        .filter_map(|(_, value)| value.to_str().ok())
        .chain(bearer.map(Secret::expose))
        .chain(from_url.iter().map(String::as_str));
    redact_all(text, values)
}

fn bearer_value(token: &Secret) -> Result<HeaderValue, AuthError> {
    let mut value = HeaderValue::from_str(&format!("Bearer {}", token.expose()))
        .map_err(|_| AuthError::NotHeaderSafe)?;
    value.set_sensitive(true);
    Ok(value)
}

/// Sends export requests for one runner.
pub struct Transports {
    http: HttpClient,
    ca_file: Option<std::path::PathBuf>,
    grpc: Mutex<HashMap<String, tonic::transport::Channel>>,
    grpc_tls_roots: OnceLock<Result<Vec<tonic::transport::Certificate>, SetupError>>,
    export_timeout: Duration,
}

impl std::fmt::Debug for Transports {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Transports")
            .field("export_timeout", &self.export_timeout)
            .finish_non_exhaustive()
    }
}

impl Transports {
    pub fn new(ca_file: Option<&Path>, export_timeout: Duration) -> Result<Transports, SetupError> {
        Ok(Transports {
            http: HttpClient::new(ca_file, export_timeout.min(Duration::from_secs(5)))?,
            ca_file: ca_file.map(Path::to_path_buf),
            grpc: Mutex::new(HashMap::new()),
            grpc_tls_roots: OnceLock::new(),
            export_timeout,
        })
    }

    pub fn http(&self) -> &HttpClient {
        &self.http
    }

    pub fn export_timeout(&self) -> Duration {
        self.export_timeout
    }

    /// The gRPC channel of `url` (`http://host:port` or `https://...`),
    /// created on first use and connected lazily.
    pub fn grpc_channel(&self, url: &str) -> Result<tonic::transport::Channel, SetupError> {
        let mut channels = self.grpc.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(channel) = channels.get(url) {
            return Ok(channel.clone());
        }
        let mut endpoint = tonic::transport::Endpoint::from_shared(url.to_string())
            .map_err(|e| SetupError::GrpcEndpoint(e.to_string()))?
            .timeout(self.export_timeout)
            .connect_timeout(self.export_timeout.min(Duration::from_secs(5)));
        if url.starts_with("https://") {
            let extra = self
                .grpc_tls_roots
                .get_or_init(|| match &self.ca_file {
                    None => Ok(Vec::new()),
                    Some(path) => std::fs::read(path)
                        .map(|pem| vec![tonic::transport::Certificate::from_pem(pem)])
                        .map_err(|e| SetupError::ca_file_unreadable(path, &e)),
                })
                .clone()?;
            let tls = tonic::transport::ClientTlsConfig::new()
                .with_native_roots()
                .ca_certificates(extra);
            endpoint = endpoint
                .tls_config(tls)
                .map_err(|e| SetupError::Tls(e.to_string()))?;
        }
        let channel = endpoint.connect_lazy();
        channels.insert(url.to_string(), channel.clone());
        Ok(channel)
    }

    /// One export attempt, bounded by the export timeout.
    pub async fn send(
        &self,
        transport: Transport,
        url: &str,
        headers: &Headers,
        bearer: Option<&Secret>,
        request: RawExportRequest,
    ) -> Attempt {
        self.send_signal(Signal::Traces, transport, url, headers, bearer, request)
            .await
    }

    /// One export attempt of `signal` (the gRPC method differs; an HTTP URL
    /// already has the signal's path).
    pub async fn send_signal(
        &self,
        signal: Signal,
        transport: Transport,
        url: &str,
        headers: &Headers,
        bearer: Option<&Secret>,
        request: RawExportRequest,
    ) -> Attempt {
        let attempt = async {
            match transport {
                Transport::HttpProtobuf => self.send_http(url, headers, bearer, request).await,
                Transport::Grpc => {
                    self.send_grpc(signal.grpc_path(), url, headers, bearer, request)
                        .await
                }
            }
        };
        match tokio::time::timeout(self.export_timeout, attempt).await {
            Ok(attempt) => attempt,
            Err(_) => Attempt::failed(RequestError::Timeout(self.export_timeout)),
        }
    }

    async fn send_http(
        &self,
        url: &str,
        headers: &Headers,
        bearer: Option<&Secret>,
        request: RawExportRequest,
    ) -> Attempt {
        let mut builder = http::Request::post(url)
            .header(http::header::CONTENT_TYPE, "application/x-protobuf")
            .header(
                http::header::USER_AGENT,
                concat!("ci-runner-telemetry/", env!("CARGO_PKG_VERSION")),
            );
        for (name, value) in headers {
            builder = builder.header(name, value);
        }
        if let Some(token) = bearer {
            match bearer_value(token) {
                Ok(value) => builder = builder.header(http::header::AUTHORIZATION, value),
                Err(e) => return Attempt::failed(e),
            }
        }
        let body = Full::new(Bytes::from(request.encode_to_vec()));
        let request = match builder.body(body) {
            Ok(r) => r,
            Err(e) => return Attempt::failed(RequestError::InvalidRequest(e.to_string())),
        };
        let answer = match self.http.request(request, self.export_timeout).await {
            Ok(a) => a,
            Err(e) => return Attempt::failed(e),
        };
        if answer.status.is_success() {
            // A body that does not decode (empty, JSON) is a full success.
            let response = ExportTraceServiceResponse::decode(answer.body).unwrap_or_default();
            return delivered(response, url, headers, bearer);
        }
        let retry_after = answer
            .headers
            .get(http::header::RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string);
        let mut message = None;
        let text = String::from_utf8_lossy(&answer.body);
        let text = text.trim();
        if !text.is_empty() && text.is_char_boundary(text.len().min(MAX_MESSAGE)) {
            let cut: String = text.chars().take(MAX_MESSAGE).collect();
            if cut.chars().all(|c| !c.is_control() || c == ' ') {
                message = Some(redact_answer(&cut, url, headers, bearer));
            }
        }
        Attempt::failed(ExportError::Http {
            status: answer.status,
            retry_after,
            message,
        })
    }

    async fn send_grpc(
        &self,
        method: &'static str,
        url: &str,
        headers: &Headers,
        bearer: Option<&Secret>,
        request: RawExportRequest,
    ) -> Attempt {
        let channel = match self.grpc_channel(url) {
            Ok(c) => c,
            Err(error) => return Attempt::failed(error),
        };
        let mut grpc = tonic::client::Grpc::new(channel);
        if let Err(e) = grpc.ready().await {
            return Attempt::failed(RequestError::Connect(e.to_string()));
        }
        let mut request = tonic::Request::new(request);
        request.set_timeout(self.export_timeout);
        let metadata = request.metadata_mut();
        for (name, value) in headers {
            let key = match tonic::metadata::AsciiMetadataKey::from_bytes(
                name.as_str().to_ascii_lowercase().as_bytes(),
            ) {
                Ok(k) => k,
                Err(_) => continue,
            };
            if let Ok(value) = tonic::metadata::AsciiMetadataValue::try_from(value.as_bytes()) {
                metadata.insert(key, value);
            }
        }
        if let Some(token) = bearer {
            match tonic::metadata::AsciiMetadataValue::try_from(format!(
                "Bearer {}",
                token.expose()
            )) {
                Ok(value) => {
                    metadata.insert("authorization", value);
                }
                Err(_) => return Attempt::failed(AuthError::NotMetadataSafe),
            }
        }
        let codec =
            tonic_prost::ProstCodec::<RawExportRequest, ExportTraceServiceResponse>::default();
        let path = http::uri::PathAndQuery::from_static(method);
        match grpc.unary(request, path, codec).await {
            Ok(response) => delivered(response.into_inner(), url, headers, bearer),
            Err(status) => {
                let message: String = status.message().chars().take(MAX_MESSAGE).collect();
                Attempt::failed(ExportError::Grpc {
                    code: status.code(),
                    details: Bytes::copy_from_slice(status.details()),
                    message: (!message.is_empty())
                        .then(|| redact_answer(&message, url, headers, bearer)),
                })
            }
        }
    }
}

fn delivered(
    response: ExportTraceServiceResponse,
    url: &str,
    headers: &Headers,
    bearer: Option<&Secret>,
) -> Attempt {
    let (rejected, message) = match response.partial_success {
        Some(p) => (
            u64::try_from(p.rejected_spans).unwrap_or(0),
            redact_answer(
                &p.error_message
                    .chars()
                    .take(MAX_MESSAGE)
                    .collect::<String>(),
                url,
                headers,
                bearer,
            ),
        ),
        None => (0, String::new()),
    };
    Attempt::Delivered { rejected, message }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn setup_errors_are_typed_and_name_no_value() {
        let missing = tls_roots(Some(Path::new("/nonexistent/ca.pem"))).unwrap_err();
        assert!(
            matches!(
                &missing,
                SetupError::CaFileUnreadable {
                    kind: std::io::ErrorKind::NotFound,
                    ..
                }
            ),
            "{missing:?}"
        );
        let dir = tempfile::tempdir().unwrap();
        let empty = dir.path().join("ca.pem");
        std::fs::write(&empty, "no certificate here").unwrap();
        assert!(matches!(
            tls_roots(Some(&empty)),
            Err(SetupError::CaFileInvalid { .. })
        ));
        let bad_value = validate_headers(&[("x-key".into(), "secret\nvalue".into())]).unwrap_err();
        assert_eq!(bad_value, SetupError::HeaderValue("x-key".into()));
        assert_eq!(
            bad_value.to_string(),
            "the value of header `x-key` is not valid"
        );
        assert_eq!(
            validate_headers(&[("bad name".into(), "v".into())]).unwrap_err(),
            SetupError::HeaderName("bad name".into())
        );
    }
}

//! Credentials of export requests: a bearer token from a file, and GCP ID
//! tokens (`http_bearer_gcp_oidc`, contract v2) from a GCP-metadata-compatible
//! server.
//!
//! * **Token file** (`bearer_token_file`, for the static endpoint): read
//!   when first needed and again whenever its modification time or size
//!   changes, and at least every [`TOKEN_FILE_RECHECK`] (a rewrite within
//!   the same second and of the same size is still picked up). Kubernetes
//!   projected service account tokens are rotated this way.
//! * **GCP ID token** (payload endpoints with `auth.type =
//!   http_bearer_gcp_oidc`): `GET <metadata>/computeMetadata/v1/instance/
//!   service-accounts/default/identity?audience=<audience>` with
//!   `Metadata-Flavor: Google`, as on a GCE VM or GKE node. The answer is a
//!   JWT; its `exp` claim is read (not verified: the collector verifies) and
//!   the token is cached per audience until [`refresh_margin`] before it.
//!
//! **Tokens never reach a log line, a span or an error message:** they live
//! in [`Secret`] (no `Display`, a redacted `Debug`), errors name the file or
//! server and never the content, header values are marked sensitive, and
//! whatever a server answers is passed through [`redact`] before it is shown
//! (both in [`crate::secrets`]).

use std::collections::HashMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use base64::Engine;

use super::error::AuthError;
use super::transport::HttpClient;
use crate::secrets::Secret;

/// How often a token file is read even when it looks unchanged.
pub const TOKEN_FILE_RECHECK: Duration = Duration::from_secs(60);

/// The credential an export target sends.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Auth {
    None,
    /// `Authorization: Bearer <content of the file>`.
    BearerTokenFile(PathBuf),
    /// `Authorization: Bearer <GCP ID token for audience>`.
    GcpOidc {
        audience: String,
    },
}

impl fmt::Display for Auth {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Auth::None => write!(f, "none"),
            Auth::BearerTokenFile(path) => write!(f, "bearer_token_file({})", path.display()),
            Auth::GcpOidc { audience } => write!(f, "http_bearer_gcp_oidc(audience={audience})"),
        }
    }
}

/// How long before `exp` a cached ID token is replaced: a quarter of its
/// lifetime, at most a minute (a 1 h token is refreshed a minute early, a
/// 4 s token after 3 s).
pub fn refresh_margin(lifetime: Duration) -> Duration {
    (lifetime / 4).min(Duration::from_secs(60))
}

/// The `exp` claim of a compact JWT, without verifying anything.
pub fn jwt_expiry(token: &str) -> Option<SystemTime> {
    let mut parts = token.split('.');
    let (_header, payload, _signature) = (parts.next()?, parts.next()?, parts.next()?);
    if parts.next().is_some() {
        return None;
    }
    let json = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(payload.trim_end_matches('='))
        .ok()?;
    let claims: serde_json::Value = serde_json::from_slice(&json).ok()?;
    let exp = claims.get("exp")?.as_f64()?;
    if !exp.is_finite() || exp < 0.0 {
        return None;
    }
    SystemTime::UNIX_EPOCH.checked_add(Duration::try_from_secs_f64(exp).ok()?)
}

#[derive(Debug)]
struct FileToken {
    modified: Option<SystemTime>,
    len: u64,
    read_at: Instant,
    token: Secret,
}

#[derive(Debug)]
struct TokenFile {
    path: PathBuf,
    cached: Mutex<Option<FileToken>>,
}

impl TokenFile {
    async fn token(&self) -> Result<Secret, AuthError> {
        let path = &self.path;
        let unreadable = |e: std::io::Error| AuthError::TokenFileUnreadable {
            path: path.clone(),
            kind: e.kind(),
            message: e.to_string(),
        };
        let meta = tokio::fs::metadata(path).await.map_err(unreadable)?;
        let modified = meta.modified().ok();
        {
            let cached = self.cached.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(c) = cached.as_ref() {
                if c.modified == modified
                    && c.len == meta.len()
                    && c.read_at.elapsed() < TOKEN_FILE_RECHECK
                {
                    return Ok(c.token.clone());
                }
            }
        }
        let text = tokio::fs::read_to_string(path).await.map_err(unreadable)?;
        let token = text.trim();
        if token.is_empty() {
            return Err(AuthError::TokenFileEmpty { path: path.clone() });
        }
        if token.chars().any(|c| c.is_control()) {
            return Err(AuthError::TokenFileLines { path: path.clone() });
        }
        let token = Secret::new(token);
        *self.cached.lock().unwrap_or_else(|e| e.into_inner()) = Some(FileToken {
            modified,
            len: meta.len(),
            read_at: Instant::now(),
            token: token.clone(),
        });
        Ok(token)
    }
}

#[derive(Debug)]
struct CachedIdToken {
    token: Secret,
    refresh_at: Instant,
}

/// Tokens of one runner: token files and ID tokens per audience.
pub struct Authenticator {
    metadata_url: String,
    timeout: Duration,
    files: Mutex<HashMap<PathBuf, Arc<TokenFile>>>,
    id_tokens: tokio::sync::Mutex<HashMap<String, CachedIdToken>>,
    id_token_fetches: AtomicU64,
}

impl fmt::Debug for Authenticator {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Authenticator")
            .field("metadata_url", &self.metadata_url)
            .finish_non_exhaustive()
    }
}

impl Authenticator {
    pub fn new(metadata_url: &str, timeout: Duration) -> Authenticator {
        Authenticator {
            metadata_url: metadata_url.trim_end_matches('/').to_string(),
            timeout,
            files: Mutex::new(HashMap::new()),
            id_tokens: tokio::sync::Mutex::new(HashMap::new()),
            id_token_fetches: AtomicU64::new(0),
        }
    }

    /// ID tokens fetched from the metadata server so far.
    pub fn id_token_fetches(&self) -> u64 {
        self.id_token_fetches.load(Ordering::Relaxed)
    }

    /// The bearer token for `auth`, if it has one. Errors are one line and
    /// never contain a token.
    pub async fn bearer(
        &self,
        auth: &Auth,
        http: &HttpClient,
    ) -> Result<Option<Secret>, AuthError> {
        match auth {
            Auth::None => Ok(None),
            Auth::BearerTokenFile(path) => self.token_file(path).token().await.map(Some),
            Auth::GcpOidc { audience } => self.id_token(audience, http).await.map(Some),
        }
    }

    /// Forgets a cached token the collector refused (401), so the next
    /// attempt fetches or reads a fresh one.
    pub async fn invalidate(&self, auth: &Auth) {
        match auth {
            Auth::None => {}
            Auth::BearerTokenFile(path) => {
                *self
                    .token_file(path)
                    .cached
                    .lock()
                    .unwrap_or_else(|e| e.into_inner()) = None;
            }
            Auth::GcpOidc { audience } => {
                self.id_tokens.lock().await.remove(audience);
            }
        }
    }

    fn token_file(&self, path: &Path) -> Arc<TokenFile> {
        self.files
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(path.to_path_buf())
            .or_insert_with(|| {
                Arc::new(TokenFile {
                    path: path.to_path_buf(),
                    cached: Mutex::new(None),
                })
            })
            .clone()
    }

    async fn id_token(&self, audience: &str, http: &HttpClient) -> Result<Secret, AuthError> {
        // One fetch at a time: concurrent exports wait for it and share it.
        let mut tokens = self.id_tokens.lock().await;
        if let Some(cached) = tokens.get(audience) {
            if Instant::now() < cached.refresh_at {
                return Ok(cached.token.clone());
            }
        }
        let base = &self.metadata_url;
        let mut url = url::Url::parse(&format!(
            "{base}/computeMetadata/v1/instance/service-accounts/default/identity"
        ))
        .map_err(|e| AuthError::MetadataUrl {
            base: base.clone(),
            message: e.to_string(),
        })?;
        url.query_pairs_mut().append_pair("audience", audience);
        self.id_token_fetches.fetch_add(1, Ordering::Relaxed);
        let answer = http
            .get(url.as_str(), &[("metadata-flavor", "Google")], self.timeout)
            .await
            .map_err(|source| AuthError::MetadataRequest {
                audience: audience.to_string(),
                base: base.clone(),
                source,
            })?;
        if !answer.status.is_success() {
            return Err(AuthError::MetadataStatus {
                audience: audience.to_string(),
                base: base.clone(),
                status: answer.status,
            });
        }
        let text = String::from_utf8_lossy(&answer.body).trim().to_string();
        let Some(exp) = jwt_expiry(&text) else {
            return Err(AuthError::NotAJwt {
                audience: audience.to_string(),
                base: base.clone(),
            });
        };
        let token = Secret::new(&text);
        let lifetime = exp
            .duration_since(SystemTime::now())
            .unwrap_or(Duration::ZERO);
        tokens.insert(
            audience.to_string(),
            CachedIdToken {
                token: token.clone(),
                refresh_at: Instant::now() + lifetime.saturating_sub(refresh_margin(lifetime)),
            },
        );
        Ok(token)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn jwt(claims: &str) -> String {
        let b64 = |s: &str| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(s);
        format!("{}.{}.c2ln", b64(r#"{"alg":"RS256"}"#), b64(claims))
    }

    #[test]
    fn jwt_expiry_cases() {
        let check = |token: &str, expected: Option<u64>| {
            let actual = jwt_expiry(token)
                .map(|t| t.duration_since(SystemTime::UNIX_EPOCH).unwrap().as_secs());
            assert_eq!(actual, expected, "{token}");
        };
        check(&jwt(r#"{"exp":1793491200,"aud":"a"}"#), Some(1_793_491_200));
        check(&jwt(r#"{"exp":1793491200.5}"#), Some(1_793_491_200));
        check(&jwt(r#"{"aud":"a"}"#), None);
        check(&jwt(r#"{"exp":"soon"}"#), None);
        check(&jwt(r#"{"exp":-5}"#), None);
        check(&jwt("not json"), None);
        check("a.b", None);
        check("a.b.c.d", None);
        check("", None);
        check("....", None);
    }

    #[test]
    fn margins() {
        assert_eq!(
            refresh_margin(Duration::from_secs(3600)),
            Duration::from_secs(60)
        );
        assert_eq!(
            refresh_margin(Duration::from_secs(4)),
            Duration::from_secs(1)
        );
        assert_eq!(refresh_margin(Duration::ZERO), Duration::ZERO);
    }

    proptest::proptest! {
        #[test]
        fn jwt_expiry_never_panics(text in "\\PC{0,80}") {
            let _ = jwt_expiry(&text);
            let _ = jwt_expiry(&jwt(&text));
        }
    }
}

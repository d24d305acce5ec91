//! HTTP handlers, grouped as GitLab groups its API (each module brings its
//! `routes()`), plus the shared error type and request extractors, admin
//! authentication ([`Admin`]) among them (every rejection becomes a JSON
//! `{message}`).

pub mod entities;
pub mod features;
pub mod identity;
pub mod projects;
pub mod runners;
pub mod telemetry;
pub mod users;

use std::collections::HashMap;

use axum::extract::{FromRequest, FromRequestParts, Request};
use axum::http::header::CONTENT_TYPE;
use axum::http::request::Parts;
use axum::http::{HeaderMap, HeaderName, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::de::DeserializeOwned;

use crate::app::AppState;

/// A GitLab-style error: a status and `{"message": "..."}`.
#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub message: String,
    pub headers: Vec<(HeaderName, String)>,
}

pub type ApiResult<T> = Result<T, ApiError>;

impl ApiError {
    pub fn new(status: StatusCode, message: impl Into<String>) -> Self {
        ApiError {
            status,
            message: message.into(),
            headers: Vec::new(),
        }
    }

    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, message)
    }

    pub fn unauthorized() -> Self {
        Self::new(StatusCode::UNAUTHORIZED, "401 Unauthorized")
    }

    pub fn forbidden() -> Self {
        Self::new(StatusCode::FORBIDDEN, "403 Forbidden")
    }

    pub fn forbidden_because(reason: &str) -> Self {
        Self::new(StatusCode::FORBIDDEN, format!("403 Forbidden - {reason}"))
    }

    /// `404 <What> Not Found`, as GitLab words it.
    pub fn not_found(what: &str) -> Self {
        Self::new(StatusCode::NOT_FOUND, format!("404 {what} Not Found"))
    }

    pub fn with_header(mut self, name: HeaderName, value: impl Into<String>) -> Self {
        self.headers.push((name, value.into()));
        self
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut response = (
            self.status,
            Json(serde_json::json!({ "message": self.message })),
        )
            .into_response();
        for (name, value) in self.headers {
            if let Ok(value) = HeaderValue::from_str(&value) {
                response.headers_mut().insert(name, value);
            }
        }
        response
    }
}

/// Request parameters the way Grape sees them: the query string merged with
/// a JSON, form-urlencoded or multipart body (the body wins), deserialized
/// into `T`. Form values are strings; use the `lenient` helpers for others.
pub struct Params<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequest<S> for Params<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        let mut map = serde_json::Map::new();
        if let Some(query) = req.uri().query() {
            for (k, v) in url::form_urlencoded::parse(query.as_bytes()) {
                map.insert(k.into_owned(), serde_json::Value::String(v.into_owned()));
            }
        }
        let content_type = req
            .headers()
            .get(CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_ascii_lowercase();
        if content_type.starts_with("multipart/form-data") {
            let mut multipart = axum::extract::Multipart::from_request(req, state)
                .await
                .map_err(|e| ApiError::new(e.status(), e.body_text()))?;
            while let Some(field) = multipart
                .next_field()
                .await
                .map_err(|e| ApiError::new(e.status(), e.body_text()))?
            {
                let name = field.name().unwrap_or_default().to_string();
                let text = field
                    .text()
                    .await
                    .map_err(|e| ApiError::new(e.status(), e.body_text()))?;
                map.insert(name, serde_json::Value::String(text));
            }
        } else {
            let body = axum::body::Bytes::from_request(req, state)
                .await
                .map_err(|e| ApiError::new(e.status(), e.body_text()))?;
            if !body.iter().all(u8::is_ascii_whitespace) {
                if content_type.starts_with("application/x-www-form-urlencoded") {
                    for (k, v) in url::form_urlencoded::parse(&body) {
                        map.insert(k.into_owned(), serde_json::Value::String(v.into_owned()));
                    }
                } else {
                    // JSON is the default, as for Grape.
                    let value: serde_json::Value = serde_json::from_slice(&body).map_err(|e| {
                        ApiError::bad_request(format!(
                            "400 Bad request - body is not valid JSON: {e}"
                        ))
                    })?;
                    let serde_json::Value::Object(body) = value else {
                        return Err(ApiError::bad_request(
                            "400 Bad request - body should be a JSON object",
                        ));
                    };
                    map.extend(body);
                }
            }
        }
        serde_json::from_value(serde_json::Value::Object(map))
            .map(Params)
            .map_err(|e| ApiError::bad_request(format!("400 Bad request - {e}")))
    }
}

/// The query string as pairs; never rejects.
pub struct QueryPairs(pub HashMap<String, String>);

impl<S: Send + Sync> FromRequestParts<S> for QueryPairs {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Self, Self::Rejection> {
        let pairs = parts
            .uri
            .query()
            .map(|q| {
                url::form_urlencoded::parse(q.as_bytes())
                    .into_owned()
                    .collect()
            })
            .unwrap_or_default();
        Ok(QueryPairs(pairs))
    }
}

/// The admin's personal access token in `PRIVATE-TOKEN` (or
/// `Authorization: Bearer`), checked before the handler runs; anything else
/// is a 401.
pub struct Admin;

impl FromRequestParts<AppState> for Admin {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &AppState,
    ) -> Result<Self, Self::Rejection> {
        let given = header(&parts.headers, "private-token").or_else(|| {
            header(&parts.headers, "authorization")
                .and_then(|v| v.strip_prefix("Bearer ").map(str::trim))
        });
        match given {
            Some(token) if state.is_admin_token(token) => Ok(Admin),
            _ => Err(ApiError::unauthorized()),
        }
    }
}

/// Parses an id path segment; anything else is a 404 like an unknown id.
pub fn parse_id(segment: &str, what: &str) -> ApiResult<u64> {
    segment
        .parse::<u64>()
        .map_err(|_| ApiError::not_found(what))
}

pub fn header<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers
        .get(name)
        .and_then(|v| v.to_str().ok())
        .map(str::trim)
        .filter(|v| !v.is_empty())
}

/// Deserializers that accept form strings as well as JSON scalars.
pub mod lenient {
    use serde::{Deserialize, Deserializer};
    use serde_json::Value;

    fn scalar_text(value: &Value) -> Option<String> {
        match value {
            Value::String(s) => Some(s.trim().to_string()),
            Value::Number(n) => Some(n.to_string()),
            Value::Bool(b) => Some(b.to_string()),
            _ => None,
        }
    }

    pub fn opt_bool<'de, D: Deserializer<'de>>(d: D) -> Result<Option<bool>, D::Error> {
        let value = Option::<Value>::deserialize(d)?;
        match value.as_ref().and_then(scalar_text).as_deref() {
            None | Some("") => Ok(None),
            Some("true" | "1") => Ok(Some(true)),
            Some("false" | "0") => Ok(Some(false)),
            Some(other) => Err(serde::de::Error::custom(format!(
                "`{other}` is not a boolean"
            ))),
        }
    }

    pub fn opt_u64<'de, D: Deserializer<'de>>(d: D) -> Result<Option<u64>, D::Error> {
        let value = Option::<Value>::deserialize(d)?;
        match value.as_ref().and_then(scalar_text).as_deref() {
            None | Some("") => Ok(None),
            Some(text) => text.parse().map(Some).map_err(|_| {
                serde::de::Error::custom(format!("`{text}` is not a non-negative integer"))
            }),
        }
    }

    pub fn opt_i64<'de, D: Deserializer<'de>>(d: D) -> Result<Option<i64>, D::Error> {
        let value = Option::<Value>::deserialize(d)?;
        match value.as_ref().and_then(scalar_text).as_deref() {
            None | Some("") => Ok(None),
            Some(text) => text
                .parse()
                .map(Some)
                .map_err(|_| serde::de::Error::custom(format!("`{text}` is not an integer"))),
        }
    }

    /// Any scalar as text; an empty string is absent (Go clients send `""` for unset).
    pub fn opt_string<'de, D: Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
        let value = Option::<Value>::deserialize(d)?;
        match &value {
            None | Some(Value::Null) => Ok(None),
            Some(v) => scalar_text(v)
                .map(|s| (!s.is_empty()).then_some(s))
                .ok_or_else(|| serde::de::Error::custom("expected a string")),
        }
    }

    /// A JSON array of strings or a comma-separated string.
    pub fn string_list<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<String>, D::Error> {
        let value = Option::<Value>::deserialize(d)?;
        match value {
            None | Some(Value::Null) => Ok(Vec::new()),
            Some(Value::String(s)) => Ok(s
                .split(',')
                .map(|t| t.trim().to_string())
                .filter(|t| !t.is_empty())
                .collect()),
            Some(Value::Array(items)) => items
                .iter()
                .map(|v| {
                    scalar_text(v)
                        .ok_or_else(|| serde::de::Error::custom("expected an array of strings"))
                })
                .collect(),
            Some(_) => Err(serde::de::Error::custom("expected an array of strings")),
        }
    }
}

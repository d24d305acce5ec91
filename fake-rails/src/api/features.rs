//! GitLab's Features API (`/api/v4/features`), for the project-level flags.

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::Value;

use super::{lenient, Admin, ApiError, ApiResult, Params};
use crate::app::AppState;
use crate::flags::{project_flipper_id, Feature};

/// Feature flags (the Flipper API).
pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/api/v4/features", get(list))
        .route("/api/v4/features/{name}", post(set).delete(remove))
}

#[derive(Debug, Deserialize)]
pub struct SetParams {
    #[serde(default)]
    value: Option<Value>,
    #[serde(default, deserialize_with = "lenient::opt_string")]
    key: Option<String>,
    #[serde(default, deserialize_with = "lenient::opt_string")]
    project: Option<String>,
    #[serde(default, deserialize_with = "lenient::opt_string")]
    user: Option<String>,
    #[serde(default, deserialize_with = "lenient::opt_string")]
    group: Option<String>,
    #[serde(default, deserialize_with = "lenient::opt_string")]
    namespace: Option<String>,
    #[serde(default, deserialize_with = "lenient::opt_string")]
    repository: Option<String>,
    #[serde(default, deserialize_with = "lenient::opt_string")]
    feature_group: Option<String>,
}

enum Gate {
    Boolean(bool),
    Percentage(f64),
}

fn parse_value(value: Option<&Value>) -> ApiResult<Gate> {
    let invalid = || {
        ApiError::bad_request(
            "400 Bad request - value is invalid (true, false or a percentage 0-100)",
        )
    };
    let gate = match value {
        None | Some(Value::Null) => {
            return Err(ApiError::bad_request("400 Bad request - value is missing"))
        }
        Some(Value::Bool(b)) => Gate::Boolean(*b),
        Some(Value::Number(n)) => Gate::Percentage(n.as_f64().ok_or_else(invalid)?),
        Some(Value::String(s)) => match s.trim() {
            "true" => Gate::Boolean(true),
            "false" => Gate::Boolean(false),
            number => Gate::Percentage(number.parse::<f64>().map_err(|_| invalid())?),
        },
        Some(_) => return Err(invalid()),
    };
    if let Gate::Percentage(p) = gate {
        if !(0.0..=100.0).contains(&p) || p.is_nan() {
            return Err(invalid());
        }
    }
    Ok(gate)
}

/// `POST /api/v4/features/:name` with `value` (true, false or a percentage),
/// optional `key` (`percentage_of_actors`, the default here, or
/// `percentage_of_time`) and optional `project` (full paths, comma-separated).
pub async fn set(
    State(state): State<AppState>,
    _: Admin,
    Path(name): Path<String>,
    Params(p): Params<SetParams>,
) -> ApiResult<Response> {
    if name.is_empty()
        || !name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
    {
        return Err(ApiError::bad_request(
            "400 Bad request - the feature name can contain only a-z, 0-9 and '_'",
        ));
    }
    if p.user.is_some()
        || p.group.is_some()
        || p.namespace.is_some()
        || p.repository.is_some()
        || p.feature_group.is_some()
    {
        return Err(ApiError::bad_request(
            "400 Bad request - fake-rails supports only `project` actors",
        ));
    }
    let gate = parse_value(p.value.as_ref())?;
    let percentage_of_time = match p.key.as_deref() {
        None | Some("percentage_of_actors") => false,
        Some("percentage_of_time") => true,
        Some(_) => {
            return Err(ApiError::bad_request(
                "400 Bad request - key does not have a valid value",
            ))
        }
    };
    let mut store = state.lock();
    let actors = match &p.project {
        None => Vec::new(),
        Some(paths) => paths
            .split(',')
            .map(str::trim)
            .filter(|p| !p.is_empty())
            .map(|path| {
                store
                    .project_by_ref(path)
                    .map(|project| project_flipper_id(project.id))
                    .ok_or_else(|| {
                        ApiError::bad_request(format!(
                            "400 Bad request - project `{path}` not found"
                        ))
                    })
            })
            .collect::<ApiResult<Vec<_>>>()?,
    };
    if p.project.is_some() && actors.is_empty() {
        return Err(ApiError::bad_request("400 Bad request - project is empty"));
    }
    let mut feature = store.features.get(&name).cloned().unwrap_or_default();
    match (gate, actors.is_empty()) {
        (Gate::Percentage(_), false) => {
            return Err(ApiError::bad_request(
                "400 Bad request - a percentage cannot be combined with actors",
            ));
        }
        // Flipper: the boolean gate clears every other gate.
        (Gate::Boolean(on), true) => {
            feature = Feature {
                boolean: on,
                ..Feature::default()
            }
        }
        (Gate::Boolean(true), false) => feature.actors.extend(actors),
        (Gate::Boolean(false), false) => {
            for actor in &actors {
                feature.actors.remove(actor);
            }
        }
        (Gate::Percentage(p), true) => {
            let value = (p > 0.0).then_some(p);
            if percentage_of_time {
                feature.percentage_of_time = value;
            } else {
                feature.percentage_of_actors = value;
            }
        }
    }
    let body = feature.to_api(&name);
    store.features.insert(name.clone(), feature);
    drop(store);
    tracing::debug!("Feature flag `{name}` is now {}", body.state);
    Ok((StatusCode::CREATED, Json(body)).into_response())
}

/// `GET /api/v4/features`.
pub async fn list(State(state): State<AppState>, _: Admin) -> ApiResult<Response> {
    let store = state.lock();
    let list: Vec<_> = store
        .features
        .iter()
        .map(|(name, f)| f.to_api(name))
        .collect();
    Ok(Json(list).into_response())
}

/// `DELETE /api/v4/features/:name`.
pub async fn remove(
    State(state): State<AppState>,
    _: Admin,
    Path(name): Path<String>,
) -> ApiResult<StatusCode> {
    state.lock().features.remove(&name);
    Ok(StatusCode::NO_CONTENT)
}

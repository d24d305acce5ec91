//! `GET /api/v4/user`: the user a token belongs to. API clients call it
//! first to check their token; the admin's token is `root`'s.

use axum::extract::State;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};

use super::{entities, Admin, ApiResult};
use crate::app::AppState;

pub fn routes() -> Router<AppState> {
    Router::new().route("/api/v4/user", get(current_user))
}

/// `GET /api/v4/user` with the admin's `PRIVATE-TOKEN` (or bearer token);
/// any other token is a 401, as GitLab answers an unknown token.
async fn current_user(State(state): State<AppState>, _: Admin) -> ApiResult<Response> {
    let mut user = entities::user(state.settings());
    if let Some(fields) = user.as_object_mut() {
        fields.insert("is_admin".into(), true.into());
    }
    Ok(Json(user).into_response())
}

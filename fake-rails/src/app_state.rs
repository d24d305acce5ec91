//! What every handler needs and that depends on nothing: GitLab's version,
//! the body limits and GitLab's time format.
//!
//! The bottom of the crate: this module imports nothing from it. The shared
//! state the handlers get (`app::AppState`, `app::Settings`)
//! sits above the models, in `app`.

use time::OffsetDateTime;

/// The GitLab version fake-rails claims (`CI_SERVER_VERSION`, `/api/v4/version`).
pub const GITLAB_VERSION: &str = "18.6.0";
pub const GITLAB_REVISION: &str = "fakerails";

/// Limit of JSON, form and multipart bodies.
pub const JSON_BODY_LIMIT: usize = 10 * 1024 * 1024;
/// Limit of one trace PATCH.
pub const TRACE_BODY_LIMIT: usize = 16 * 1024 * 1024;
/// Limit of one artifact upload.
pub const ARTIFACT_BODY_LIMIT: usize = 128 * 1024 * 1024;

/// `2026-01-02T03:04:05.678Z`, the way GitLab's API prints times.
pub fn format_time(t: OffsetDateTime) -> String {
    let t = t.to_offset(time::UtcOffset::UTC);
    format!(
        "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}.{:03}Z",
        t.year(),
        u8::from(t.month()),
        t.day(),
        t.hour(),
        t.minute(),
        t.second(),
        t.millisecond()
    )
}

pub fn now() -> OffsetDateTime {
    OffsetDateTime::now_utc()
}

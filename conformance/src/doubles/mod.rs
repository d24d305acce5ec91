//! Test doubles shared by every crate's tests (feature `doubles`): recording
//! OTLP collectors ([`otlp`]) and [`eventually`]. Real components are used
//! wherever a test does not need to script a failure; these stand in where
//! it does, or where a test must see exactly what arrived.

pub mod otlp;

use std::time::Duration;

/// Polls `check` until it returns `Some`, at most `deadline`, pausing
/// `every` between tries; the last `None` is an error naming `what`. For
/// state that gives no signal when it changes (files, processes, counters).
pub async fn eventually<T>(
    what: &str,
    deadline: Duration,
    every: Duration,
    mut check: impl FnMut() -> Option<T>,
) -> Result<T, String> {
    let until = tokio::time::Instant::now() + deadline;
    loop {
        if let Some(value) = check() {
            return Ok(value);
        }
        if tokio::time::Instant::now() >= until {
            return Err(format!("{what}: not within {deadline:?}"));
        }
        tokio::time::sleep(every).await;
    }
}

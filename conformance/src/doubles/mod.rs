//! Test doubles shared by every crate's tests (feature `doubles`): the
//! scriptable recording OTLP collector ([`otlp`]), input generators for
//! the robustness tests ([`inputs`]), and [`eventually`] (with
//! [`eventually_blocking`] for tests without a runtime), the one way a test
//! polls until a deadline. Real components are used
//! wherever a test does not need to script a failure; these stand in where
//! it does, or where a test must see exactly what arrived.

pub mod inputs;
pub mod otlp;

use std::time::Duration;

/// Polls `check` until it returns `Some`, at most `deadline`, and panics
/// naming `what` if it never does. For state that gives no signal when it
/// changes (counters, files, processes); a collector's arrivals have
/// [`otlp::Collector::wait_for`].
pub async fn eventually<T, F, Fut>(what: &str, deadline: Duration, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let until = tokio::time::Instant::now() + deadline;
    loop {
        if let Some(value) = check().await {
            return value;
        }
        assert!(
            tokio::time::Instant::now() < until,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// [`eventually`] for synchronous tests: polls `check` until it returns
/// `Some`, at most `deadline`, and panics naming `what` if it never does.
/// The same loop as the harness's [`crate::process::wait_for`].
pub fn eventually_blocking<T>(
    what: &str,
    deadline: Duration,
    mut check: impl FnMut() -> Option<T>,
) -> T {
    crate::process::wait_for(what, deadline, || Ok(check())).unwrap_or_else(|e| panic!("{e:#}"))
}

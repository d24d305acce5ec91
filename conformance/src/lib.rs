//! The conformance suite for CI job telemetry, and the harness it runs on.
//!
//! The library half is the harness: it installs and starts the embedded stack
//! (chDB behind a ClickHouse HTTP endpoint, and the rotel collector), or the
//! Docker stack of `compose/` through testcontainers (`docker`), queries
//! ClickHouse, and starts the other processes a test needs (fake-rails, the
//! runner under test), all tied to the test's lifetime. `cargo xtask` uses the
//! same code for `stack up|down|status` and the demo. The tests themselves live
//! in `tests/`. With the `doubles` feature, [`doubles`] holds the test doubles
//! every crate's tests share.

pub mod clickhouse;
pub mod cluster;
pub mod docker;
pub mod docker_stack;
#[cfg(feature = "doubles")]
pub mod doubles;
pub mod endpoints;
pub mod gitlab;
pub mod load;
pub mod log_lines;
pub mod paths;
pub mod process;
pub mod proxy;
pub mod runner;
pub mod stack;
pub mod trace;
pub mod venv;
pub mod world;

pub use clickhouse::ClickHouse;
pub use stack::{Endpoints, Stack, StackOptions};

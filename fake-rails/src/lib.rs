//! `fake-rails`: a GitLab-compatible runner API that negotiates CI job
//! telemetry like Rails and emits the Rails side of every job's trace.
//!
//! Run it in-process with [`serve`] (tests, the conformance suite) or as the
//! `fake-rails` binary. The Rails ID formulas are in [`ids`]; feature flag
//! gates in [`flags`]; the `.gitlab-ci.yml` subset in [`ci_config`].
//!
//! ```no_run
//! # async fn demo() -> anyhow::Result<()> {
//! let server = fake_rails::serve(fake_rails::Config::default()).await?;
//! println!("GitLab at {} (registration token {})", server.url(), server.registration_token());
//! # Ok(()) }
//! ```

mod api;
mod app;
mod app_state;
pub mod ci_config;
pub mod cli;
pub mod config;
pub mod export;
pub mod flags;
mod git;
pub mod identity;
pub mod ids;
mod pages;
mod payload;
mod server;
mod state;
pub mod telemetry;
mod tokens;

pub use app::{AppState, Settings};
pub use app_state::{format_time, GITLAB_VERSION};
pub use cli::{Cli, GeneratedTokens};
pub use config::{Config, Contract, SigningKeySource};
pub use export::ExportStatsSnapshot;
pub use server::{app, gitlab_path, serve, RunningServer};

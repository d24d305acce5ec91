//! The runner under test. By default the reference `ci-runner`; any other
//! runner implementation can be checked by the same suite by naming its
//! command line in `CONFORMANCE_RUNNER_CMD`, with these placeholders:
//!
//! - `{url}`         the GitLab-compatible API (fake-rails)
//! - `{token}`       a runner authentication token already registered there
//! - `{builds_dir}`  a fresh directory for builds
//!
//! The telemetry endpoint reaches the runner through the standard
//! `OTEL_EXPORTER_OTLP_ENDPOINT` / `OTEL_EXPORTER_OTLP_PROTOCOL` variables, and
//! the flush deadline through `CI_TELEMETRY_FLUSH_TIMEOUT` (seconds).

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Result};

use crate::paths;
use crate::process::{Lifetime, ManagedProcess};

pub const RUNNER_CMD_VAR: &str = "CONFORMANCE_RUNNER_CMD";

/// Where the runner sends telemetry.
#[derive(Debug, Clone, Default)]
pub struct RunnerOptions {
    /// `OTEL_EXPORTER_OTLP_ENDPOINT`; None leaves telemetry to the payload (v2).
    pub otlp_endpoint: Option<String>,
    /// `OTEL_EXPORTER_OTLP_PROTOCOL`: `http/protobuf` or `grpc`.
    pub otlp_protocol: Option<String>,
    /// Seconds the runner may spend flushing telemetry after a job.
    pub flush_timeout_secs: Option<u64>,
    pub extra_env: Vec<(String, String)>,
}

/// A running runner process.
#[derive(Debug)]
pub struct Runner {
    process: ManagedProcess,
    pub builds_dir: PathBuf,
}

impl Runner {
    pub fn start(
        dir: &Path,
        url: &str,
        token: &str,
        options: &RunnerOptions,
        lifetime: Lifetime,
    ) -> Result<Runner> {
        let builds_dir = dir.join("builds");
        std::fs::create_dir_all(&builds_dir)?;
        let template = match std::env::var(RUNNER_CMD_VAR) {
            Ok(cmd) if !cmd.trim().is_empty() => cmd,
            _ => format!(
                "{} run --url {{url}} --token {{token}} --builds-dir {{builds_dir}} --concurrent 4 --check-interval 100",
                paths::workspace_binary("ci-runner")?.display()
            ),
        };
        let words: Vec<String> = template
            .split_whitespace()
            .map(|w| {
                w.replace("{url}", url)
                    .replace("{token}", token)
                    .replace("{builds_dir}", &builds_dir.to_string_lossy())
            })
            .collect();
        let Some((program, args)) = words.split_first() else {
            bail!("{RUNNER_CMD_VAR} is empty");
        };
        let mut cmd = Command::new(program);
        cmd.args(args);
        for var in [
            "OTEL_EXPORTER_OTLP_ENDPOINT",
            "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
            "OTEL_EXPORTER_OTLP_PROTOCOL",
            "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL",
            "OTEL_EXPORTER_OTLP_HEADERS",
            "OTEL_EXPORTER_OTLP_LOGS_ENDPOINT",
            "OTEL_EXPORTER_OTLP_LOGS_PROTOCOL",
            "OTEL_EXPORTER_OTLP_LOGS_HEADERS",
            "OTEL_EXPORTER_OTLP_LOGS_TIMEOUT",
            "OTEL_EXPORTER_OTLP_LOGS_COMPRESSION",
            "OTEL_EXPORTER_OTLP_COMPRESSION",
            "OTEL_EXPORTER_OTLP_TIMEOUT",
            "CI_TELEMETRY_LOGS",
            "GITLAB_TRACING",
        ] {
            cmd.env_remove(var);
        }
        if let Some(endpoint) = &options.otlp_endpoint {
            cmd.env("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint);
        }
        if let Some(protocol) = &options.otlp_protocol {
            cmd.env("OTEL_EXPORTER_OTLP_PROTOCOL", protocol);
        }
        if let Some(secs) = options.flush_timeout_secs {
            cmd.env("CI_TELEMETRY_FLUSH_TIMEOUT", secs.to_string());
        }
        cmd.envs(options.extra_env.iter().cloned());
        let process = ManagedProcess::spawn(
            "runner",
            cmd,
            &dir.join("logs").join("runner.log"),
            lifetime,
        )?;
        Ok(Runner {
            process,
            builds_dir,
        })
    }

    pub fn log_path(&self) -> &Path {
        &self.process.log
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.process.log).unwrap_or_default()
    }

    /// The runner process's ID (to read its memory use, say).
    pub fn pid(&self) -> u32 {
        self.process.pid()
    }

    pub fn check_alive(&mut self) -> Result<()> {
        self.process.check_alive()
    }

    pub fn release(self) -> u32 {
        self.process.release()
    }
}

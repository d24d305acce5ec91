//! `ci-runner`: the reference runner.
//!
//! ```text
//! ci-runner register --url URL --registration-token T [--config PATH] [--name N] [--builds-dir DIR]
//! ci-runner run [--config PATH] [--url URL --token RUNNER_TOKEN] [--builds-dir DIR]
//!               [--concurrent N] [--max-jobs N] [--check-interval MS]
//!               [--otlp-endpoint URL] [--otlp-protocol grpc|http/protobuf]
//!               [--flush-timeout SECS] [--telemetry-disabled] [--metrics-listen ADDR]
//!               [--cache-dir DIR] [--derive-trace-id-from-pipeline]
//!               [--final-update-limit SECS] [--shutdown-timeout SECS]
//! ```
//!
//! Logs go to stderr, one event per line; `CI_RUNNER_LOG` takes a
//! `tracing` filter (default `info`).

use std::path::PathBuf;
use std::time::Duration;

use ci_runner::{api, config, manager};
use clap::{Parser, Subcommand};
use runner_telemetry::config::{ProcessEnv, TelemetryOverrides};

#[derive(Debug, Parser)]
#[command(
    name = "ci-runner",
    version,
    about = "Reference GitLab runner with CI job telemetry"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Register a runner with GitLab and write it to the config file.
    Register {
        /// GitLab URL, e.g. `https://gitlab.example.com`
        #[arg(long)]
        url: String,
        #[arg(long)]
        registration_token: String,
        /// Config file (default: ~/.gitlab-runner/config.toml).
        #[arg(long)]
        config: Option<PathBuf>,
        /// Runner name (default: the host name).
        #[arg(long)]
        name: Option<String>,
        #[arg(long)]
        builds_dir: Option<PathBuf>,
    },
    /// Poll GitLab for jobs and run them.
    Run(RunArgs),
}

#[derive(Debug, clap::Args)]
struct RunArgs {
    /// Config file (default: ~/.gitlab-runner/config.toml, if it exists).
    #[arg(long)]
    config: Option<PathBuf>,
    /// GitLab URL; with --token no config file is needed.
    #[arg(long)]
    url: Option<String>,
    /// Runner authentication token.
    #[arg(long)]
    token: Option<String>,
    #[arg(long)]
    builds_dir: Option<PathBuf>,
    /// Jobs to run at once.
    #[arg(long)]
    concurrent: Option<usize>,
    /// Exit 0 after this many jobs have been processed.
    #[arg(long)]
    max_jobs: Option<u64>,
    /// Milliseconds between job requests when idle (default 1000).
    #[arg(long)]
    check_interval: Option<u64>,
    /// Static OTLP endpoint (the full traces URL for http/protobuf).
    #[arg(long)]
    otlp_endpoint: Option<String>,
    /// `grpc` or `http/protobuf`.
    #[arg(long)]
    otlp_protocol: Option<String>,
    /// Seconds the background telemetry flush may take after a job.
    #[arg(long)]
    flush_timeout: Option<f64>,
    /// No telemetry for any job.
    #[arg(long)]
    telemetry_disabled: bool,
    /// Export job logs as OTLP log records too (or `logs = true` in
    /// `[runners.telemetry]`, or `CI_TELEMETRY_LOGS=true`).
    #[arg(long)]
    telemetry_logs: bool,
    /// Serve Prometheus metrics (`GET /metrics`) on `HOST:PORT` or `:PORT`.
    #[arg(long, env = "CI_RUNNER_METRICS_LISTEN")]
    metrics_listen: Option<String>,
    /// Local cache directory (default: `<builds_dir>/../cache`).
    #[arg(long)]
    cache_dir: Option<PathBuf>,
    /// Old GitLab without trace context: derive the trace id from the
    /// pipeline id and make `job_execution` a root span (off by default).
    #[arg(long, env = "CI_RUNNER_DERIVE_TRACE_ID_FROM_PIPELINE")]
    derive_trace_id_from_pipeline: bool,
    /// Seconds a job's final status and the end of its log are retried
    /// while GitLab fails (default 3600); then the job is lost and the
    /// runner exits 2.
    #[arg(long)]
    final_update_limit: Option<f64>,
    /// Seconds a job's final status is still retried after the first
    /// SIGTERM/SIGINT (default: the config file's `shutdown_timeout`, or 30).
    #[arg(long)]
    shutdown_timeout: Option<f64>,
}

fn init_logging() {
    let filter =
        tracing_subscriber::EnvFilter::try_from_env("CI_RUNNER_LOG").unwrap_or_else(|_| {
            tracing_subscriber::EnvFilter::new("info,opentelemetry=error,opentelemetry_sdk=error")
        });
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(false)
        .with_target(false)
        .init();
}

fn main() {
    let cli = Cli::parse();
    init_logging();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            tracing::error!("Cannot start the async runtime: {e}");
            std::process::exit(1);
        }
    };
    let code = runtime.block_on(async {
        match cli.command {
            Command::Register {
                url,
                registration_token,
                config,
                name,
                builds_dir,
            } => register(url, registration_token, config, name, builds_dir).await,
            Command::Run(args) => run(args).await,
        }
    });
    // Do not wait for stray blocking tasks.
    runtime.shutdown_timeout(Duration::from_millis(100));
    std::process::exit(code);
}

async fn register(
    url: String,
    registration_token: String,
    config_path: Option<PathBuf>,
    name: Option<String>,
    builds_dir: Option<PathBuf>,
) -> i32 {
    let path = config_path.unwrap_or_else(config::default_config_path);
    let name = name.unwrap_or_else(config::hostname);
    let client = match api::GitLabClient::new(&url) {
        Ok(client) => client,
        Err(e) => {
            tracing::error!("{e}");
            return 1;
        }
    };
    let info = api::runner_info(&name, "shell", "bash", true);
    match client.register(&registration_token, &name, info).await {
        Ok((id, token)) => {
            if let Err(e) =
                config::write_registration(&path, &name, &url, id, &token, builds_dir.as_deref())
            {
                tracing::error!("Registered, but {e}");
                return 1;
            }
            tracing::info!(
                runner = %name,
                runner_id = id,
                config = %path.display(),
                "Runner registered"
            );
            0
        }
        Err(api::ApiError::Forbidden) => {
            tracing::error!(
                "Registration refused by {}: 403 Forbidden (is the registration token right?)",
                runner_telemetry::secrets::strip_credentials(&url)
            );
            1
        }
        Err(e) => {
            tracing::error!(
                "Registration at {} failed: {e}",
                runner_telemetry::secrets::strip_credentials(&url)
            );
            1
        }
    }
}

async fn run(args: RunArgs) -> i32 {
    let flush_timeout = match args.flush_timeout.map(Duration::try_from_secs_f64) {
        None => None,
        Some(Ok(d)) => Some(d),
        Some(Err(_)) => {
            tracing::error!("--flush-timeout must be a non-negative number of seconds");
            return 1;
        }
    };
    let seconds = |flag: &str, value: Option<f64>| match value.map(Duration::try_from_secs_f64) {
        None => Ok(None),
        Some(Ok(d)) => Ok(Some(d)),
        Some(Err(_)) => Err(format!("--{flag} must be a non-negative number of seconds")),
    };
    let (final_update_limit, shutdown_timeout) = match (
        seconds("final-update-limit", args.final_update_limit),
        seconds("shutdown-timeout", args.shutdown_timeout),
    ) {
        (Ok(a), Ok(b)) => (a, b),
        (Err(e), _) | (_, Err(e)) => {
            tracing::error!("{e}");
            return 1;
        }
    };
    let flags = config::RunFlags {
        config: args.config.clone(),
        url: args.url,
        token: args.token,
        builds_dir: args.builds_dir,
        concurrent: args.concurrent,
        max_jobs: args.max_jobs,
        check_interval: args.check_interval.map(Duration::from_millis),
        telemetry: TelemetryOverrides {
            endpoint: args.otlp_endpoint,
            protocol: args.otlp_protocol,
            flush_timeout,
            disabled: args.telemetry_disabled,
            logs: args.telemetry_logs,
        },
        metrics_listen: args.metrics_listen,
        cache_dir: args.cache_dir,
        derive_trace_id_from_pipeline: args.derive_trace_id_from_pipeline,
        final_update_limit,
        shutdown_timeout,
    };
    let file = match &args.config {
        Some(path) => match config::load(path) {
            Ok(file) => Some(file),
            Err(e) => {
                tracing::error!("{e}");
                return 1;
            }
        },
        None => {
            let path = config::default_config_path();
            if flags.token.is_none() && path.exists() {
                match config::load(&path) {
                    Ok(file) => Some(file),
                    Err(e) => {
                        tracing::error!("{e}");
                        return 1;
                    }
                }
            } else {
                None
            }
        }
    };
    let config = match config::resolve(file, &flags, &ProcessEnv) {
        Ok(config) => config,
        Err(e) => {
            tracing::error!("{e}");
            return 1;
        }
    };
    manager::run(config).await
}

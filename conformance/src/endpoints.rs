//! Where a stack's services listen ([`Endpoints`], `endpoints.env`) and how
//! to start one ([`StackOptions`]): what both backends of [`crate::Stack`]
//! share, below them.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result};

use crate::clickhouse::ClickHouse;
use crate::docker::Backend;
use crate::paths;
use crate::process::Lifetime;

/// The ClickHouse user the stack configures.
pub const CLICKHOUSE_USER: &str = "default";

/// How to start a stack.
#[derive(Debug, Clone)]
pub struct StackOptions {
    /// Data, logs, PID files and `endpoints.env` go here.
    pub dir: PathBuf,
    pub lifetime: Lifetime,
    /// How long each component may take to answer.
    pub start_timeout: Duration,
    /// Embedded processes or the Docker images (`CONFORMANCE_STACK`).
    pub backend: Backend,
}

impl StackOptions {
    /// A stack of its own for one test: a new directory under
    /// `target/test-stacks/`, owned by the caller.
    pub fn isolated() -> StackOptions {
        static COUNTER: AtomicUsize = AtomicUsize::new(0);
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0);
        let name = format!(
            "{}-{}-{nanos:08x}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::Relaxed)
        );
        StackOptions {
            dir: paths::target_dir().join("test-stacks").join(name),
            lifetime: Lifetime::Owned,
            start_timeout: Duration::from_secs(60),
            backend: Backend::from_env().unwrap_or(Backend::Embedded),
        }
    }

    /// The long-lived stack of `cargo xtask stack up`.
    pub fn detached(dir: &Path) -> StackOptions {
        StackOptions {
            dir: dir.to_path_buf(),
            lifetime: Lifetime::Detached,
            start_timeout: Duration::from_secs(60),
            backend: Backend::Embedded,
        }
    }
}

/// Where the stack's services listen; written to `endpoints.env`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoints {
    pub clickhouse_url: String,
    pub clickhouse_user: String,
    pub clickhouse_password: String,
    /// OTLP/HTTP base URL; traces go to `<this>/v1/traces`.
    pub otlp_http: String,
    /// OTLP/gRPC endpoint, `http://127.0.0.1:<port>`.
    pub otlp_grpc: String,
}

impl Endpoints {
    pub fn to_env_file(&self) -> String {
        format!(
            "# Written by the embedded stack; source it or pass it to `env`.\n\
             CLICKHOUSE_URL={}\nCLICKHOUSE_USER={}\nCLICKHOUSE_PASSWORD={}\n\
             OTLP_HTTP_ENDPOINT={}\nOTLP_GRPC_ENDPOINT={}\n",
            self.clickhouse_url,
            self.clickhouse_user,
            self.clickhouse_password,
            self.otlp_http,
            self.otlp_grpc
        )
    }

    pub fn from_env_file(text: &str) -> Result<Endpoints> {
        let get = |key: &str| -> Result<String> {
            text.lines()
                .find_map(|l| l.strip_prefix(key)?.strip_prefix('='))
                .map(str::to_string)
                .with_context(|| format!("`{key}=` is missing from endpoints.env"))
        };
        Ok(Endpoints {
            clickhouse_url: get("CLICKHOUSE_URL")?,
            clickhouse_user: get("CLICKHOUSE_USER")?,
            clickhouse_password: get("CLICKHOUSE_PASSWORD")?,
            otlp_http: get("OTLP_HTTP_ENDPOINT")?,
            otlp_grpc: get("OTLP_GRPC_ENDPOINT")?,
        })
    }

    pub(crate) fn port_of(url: &str) -> Option<u16> {
        url.rsplit(':').next()?.trim_end_matches('/').parse().ok()
    }

    pub fn clickhouse(&self) -> ClickHouse {
        ClickHouse::new(
            &self.clickhouse_url,
            &self.clickhouse_user,
            &self.clickhouse_password,
        )
    }
}

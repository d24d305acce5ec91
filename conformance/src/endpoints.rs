//! Where a stack's services listen ([`Endpoints`], `endpoints.env`) and the
//! ClickHouse user it configures: what both the embedded stack
//! ([`crate::stack`]) and the Docker stack ([`crate::docker`]) hand out.

use anyhow::{Context, Result};

use crate::clickhouse::ClickHouse;

/// The ClickHouse user the stack configures.
pub const CLICKHOUSE_USER: &str = "default";

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

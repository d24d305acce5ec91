//! The command line of the `fake-rails` binary.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;

use crate::config::{Config, Contract, SigningKeySource};

/// A GitLab-compatible job API that negotiates CI job telemetry and emits the
/// Rails side of every trace.
#[derive(Debug, Parser)]
#[command(name = "fake-rails", version, about)]
pub struct Cli {
    /// Address to listen on (IP:PORT); port 0 picks a free port.
    #[arg(long, default_value = "127.0.0.1:3000", env = "FAKE_RAILS_LISTEN")]
    pub listen: SocketAddr,

    /// Base URL for CI_SERVER_URL, job URLs and the OIDC issuer [default: http://<bound address>].
    #[arg(long, env = "FAKE_RAILS_PUBLIC_URL")]
    pub public_url: Option<String>,

    /// Runner registration token [default: generated and printed on stdout].
    #[arg(long, env = "FAKE_RAILS_REGISTRATION_TOKEN", hide_env_values = true)]
    pub registration_token: Option<String>,

    /// PRIVATE-TOKEN for projects, pipelines and features [default: generated and printed on stdout].
    #[arg(long, env = "FAKE_RAILS_ADMIN_TOKEN", hide_env_values = true)]
    pub admin_token: Option<String>,

    /// Job payload contract: v1 (features.job_telemetry + trace_context) or v2 (features.tracing).
    #[arg(long, default_value = "v1", env = "FAKE_RAILS_CONTRACT")]
    pub contract: Contract,

    /// Collector endpoint(s) put into v2 payloads (comma-separated, at most 2).
    #[arg(long, value_delimiter = ',', env = "FAKE_RAILS_OTEL_ENDPOINT")]
    pub otel_endpoint: Vec<String>,

    /// v2: authenticate to the endpoints with a GCP OIDC token for this audience.
    #[arg(long, env = "FAKE_RAILS_OTEL_AUDIENCE")]
    pub otel_audience: Option<String>,

    /// OTLP/HTTP base URL where fake-rails exports its own Rails spans (POST <URL>/v1/traces).
    #[arg(long, env = "FAKE_RAILS_OTLP_ENDPOINT")]
    pub otlp_endpoint: Option<String>,

    /// Rails-side sampling rate in 0.0..=1.0, deterministic per root pipeline id.
    #[arg(long, default_value_t = 1.0, value_parser = parse_rate, env = "FAKE_RAILS_SAMPLING_RATE")]
    pub sampling_rate: f64,

    /// Lifetime of ID tokens minted by the identity endpoint, in seconds.
    #[arg(long, default_value_t = 3600, env = "FAKE_RAILS_ID_TOKEN_TTL")]
    pub id_token_ttl: u64,

    /// First pipeline and job id (trace ids derive from pipeline ids: give each run against
    /// a persistent backend its own range, e.g. `$(date +%s)000`).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u64).range(1..), env = "FAKE_RAILS_FIRST_ID")]
    pub first_id: u64,

    /// PEM file (PKCS#8 or PKCS#1) of the RSA key that signs ID tokens
    /// [default: the embedded test-only key].
    #[arg(
        long,
        conflicts_with = "generate_signing_key",
        env = "FAKE_RAILS_SIGNING_KEY"
    )]
    pub signing_key: Option<PathBuf>,

    /// Generate a fresh RSA 2048 signing key at startup (takes seconds in debug builds).
    #[arg(long)]
    pub generate_signing_key: bool,

    /// ClickHouse HTTP URL the telemetry API and pages read traces from [default: none, they answer 503].
    #[arg(long, env = "FAKE_RAILS_CLICKHOUSE_URL")]
    pub clickhouse_url: Option<String>,

    /// ClickHouse user for reading traces.
    #[arg(long, default_value = crate::telemetry::DEFAULT_USER, env = "FAKE_RAILS_CLICKHOUSE_USER")]
    pub clickhouse_user: String,

    /// File holding the ClickHouse password [default: empty password].
    #[arg(long, env = "FAKE_RAILS_CLICKHOUSE_PASSWORD_FILE")]
    pub clickhouse_password_file: Option<PathBuf>,

    /// ClickHouse database of the telemetry tables.
    #[arg(long, default_value = crate::telemetry::DEFAULT_DATABASE, env = "FAKE_RAILS_CLICKHOUSE_DATABASE")]
    pub clickhouse_database: String,
}

fn parse_rate(text: &str) -> Result<f64, String> {
    let rate: f64 = text
        .parse()
        .map_err(|_| format!("`{text}` is not a number"))?;
    if (0.0..=1.0).contains(&rate) {
        Ok(rate)
    } else {
        Err(format!("{rate} is outside 0.0..=1.0"))
    }
}

/// Tokens the CLI made up, to be printed at startup.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct GeneratedTokens {
    pub registration_token: Option<String>,
    pub admin_token: Option<String>,
}

impl Cli {
    pub fn into_config(self) -> (Config, GeneratedTokens) {
        let defaults = Config::default();
        let mut generated = GeneratedTokens::default();
        let registration_token = self.registration_token.unwrap_or_else(|| {
            generated.registration_token = Some(defaults.registration_token.clone());
            defaults.registration_token.clone()
        });
        let admin_token = self.admin_token.unwrap_or_else(|| {
            generated.admin_token = Some(defaults.admin_token.clone());
            defaults.admin_token.clone()
        });
        let signing_key = match (self.signing_key, self.generate_signing_key) {
            (Some(path), _) => SigningKeySource::PemFile(path),
            (None, true) => SigningKeySource::Generate,
            (None, false) => SigningKeySource::EmbeddedTestKey,
        };
        let config = Config {
            listen: self.listen,
            public_url: self.public_url,
            registration_token,
            admin_token,
            contract: self.contract,
            otel_endpoints: self
                .otel_endpoint
                .into_iter()
                .filter(|e| !e.trim().is_empty())
                .collect(),
            otel_audience: self.otel_audience,
            otlp_endpoint: self.otlp_endpoint,
            sampling_rate: self.sampling_rate,
            id_token_ttl: Duration::from_secs(self.id_token_ttl),
            first_id: self.first_id,
            signing_key,
            clickhouse: self
                .clickhouse_url
                .map(|url| crate::telemetry::ClickHouseSettings {
                    url,
                    user: self.clickhouse_user,
                    password_file: self.clickhouse_password_file,
                    database: self.clickhouse_database,
                }),
            ..defaults
        };
        (config, generated)
    }
}

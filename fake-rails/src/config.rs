//! Server configuration: what the CLI sets, usable directly from tests.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

/// Which job payload contract fake-rails speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Contract {
    /// Contract v1 (`docs/contract.md` §1.1): `features.job_telemetry` +
    /// top-level `trace_context`.
    #[default]
    V1,
    /// GitLab's shipped contract: `features.tracing{trace_id, span_parent_id, otel_endpoints}`.
    V2,
}

impl FromStr for Contract {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "v1" | "1" => Ok(Contract::V1),
            "v2" | "2" => Ok(Contract::V2),
            _ => Err(format!("unknown contract `{s}` (expected v1 or v2)")),
        }
    }
}

impl std::fmt::Display for Contract {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Contract::V1 => "v1",
            Contract::V2 => "v2",
        })
    }
}

/// Where the RS256 key that signs ID tokens comes from.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum SigningKeySource {
    /// The fixed test-only key in `fake-rails/keys/test-signing-key.pem`.
    #[default]
    EmbeddedTestKey,
    /// A PEM file (PKCS#8 or PKCS#1).
    PemFile(PathBuf),
    /// A fresh 2048-bit key made at startup (slow in debug builds).
    Generate,
}

/// Everything `serve` needs.
#[derive(Debug, Clone)]
pub struct Config {
    /// Address to bind; port 0 picks a free port.
    pub listen: SocketAddr,
    /// Base URL put into `CI_SERVER_URL`, job URLs and the OIDC issuer.
    /// `None`: `http://<bound address>`.
    pub public_url: Option<String>,
    /// Token runners register with (`POST /api/v4/runners`).
    pub registration_token: String,
    /// `PRIVATE-TOKEN` of the admin user, for projects, pipelines and features.
    pub admin_token: String,
    pub contract: Contract,
    /// Endpoints put into v2 payloads (`features.tracing.otel_endpoints`), at most 2.
    pub otel_endpoints: Vec<String>,
    /// v2: adds `auth: {type: http_bearer_gcp_oidc, ...}` with this audience.
    pub otel_audience: Option<String>,
    /// Where fake-rails exports its own Rails spans (OTLP/HTTP protobuf base URL).
    pub otlp_endpoint: Option<String>,
    /// Rails-side sampling rate, deterministic per root pipeline id.
    pub sampling_rate: f64,
    /// Lifetime of minted ID tokens.
    pub id_token_ttl: Duration,
    /// First id of pipelines and jobs (trace ids derive from pipeline ids, so
    /// runs against a persistent backend should not all start at 1).
    pub first_id: u64,
    pub signing_key: SigningKeySource,
    /// Capacity of the Rails span export queue; full means dropped and counted.
    pub export_queue_capacity: usize,
    /// Per-request timeout of the Rails span export.
    pub export_timeout: Duration,
    /// Where the telemetry API and pages read stored traces; `None`: they answer 503.
    pub clickhouse: Option<crate::telemetry::ClickHouseSettings>,
}

impl Default for Config {
    /// Loopback on a free port, fresh random tokens, contract v1, no export.
    fn default() -> Self {
        Config {
            listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            public_url: None,
            registration_token: crate::tokens::registration_token(),
            admin_token: crate::tokens::admin_token(),
            contract: Contract::V1,
            otel_endpoints: Vec::new(),
            otel_audience: None,
            otlp_endpoint: None,
            sampling_rate: 1.0,
            id_token_ttl: Duration::from_secs(3600),
            first_id: 1,
            signing_key: SigningKeySource::EmbeddedTestKey,
            export_queue_capacity: 1024,
            export_timeout: Duration::from_secs(2),
            clickhouse: None,
        }
    }
}

impl Config {
    /// Checks what types cannot: rates, endpoint counts, URLs.
    pub fn validate(&self) -> Result<(), String> {
        if !(0.0..=1.0).contains(&self.sampling_rate) {
            return Err(format!(
                "sampling rate {} is outside 0.0..=1.0",
                self.sampling_rate
            ));
        }
        if self.otel_endpoints.len() > 2 {
            return Err(format!(
                "at most 2 OTel endpoints are allowed, got {}",
                self.otel_endpoints.len()
            ));
        }
        for endpoint in self
            .otel_endpoints
            .iter()
            .chain(&self.otlp_endpoint)
            .chain(&self.public_url)
            .chain(self.clickhouse.as_ref().map(|c| &c.url))
        {
            url::Url::parse(endpoint).map_err(|e| format!("`{endpoint}` is not a URL: {e}"))?;
        }
        if self.registration_token.is_empty() || self.admin_token.is_empty() {
            return Err("tokens must not be empty".to_string());
        }
        if self.first_id == 0 {
            return Err("first id must be at least 1".to_string());
        }
        if self.export_queue_capacity == 0 {
            return Err("export queue capacity must be at least 1".to_string());
        }
        Ok(())
    }
}

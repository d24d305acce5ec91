//! The shared state every handler gets: [`AppState`] (the store, the Rails
//! span exporter, the identity key) and the [`Settings`] it was started with.
//!
//! Above the models (`config`, `state`, `export`, `identity`, `telemetry`),
//! which import none of `app`, `server`, `api` or `payload`; below the
//! handlers (`api`, `payload`, `server`).

use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use crate::config::{Config, Contract};
use crate::export::{ExportStats, ExportStatsSnapshot, SpanExporter};
use crate::identity::IdentityKey;
use crate::state::Store;

/// Configuration after startup: what handlers read.
#[derive(Debug, Clone)]
pub struct Settings {
    /// Without a trailing slash.
    pub public_url: String,
    pub registration_token: String,
    pub admin_token: String,
    pub contract: Contract,
    pub otel_endpoints: Vec<String>,
    pub otel_audience: Option<String>,
    pub sampling_rate: f64,
    pub id_token_ttl: Duration,
    pub instance_uuid: String,
    /// Where the telemetry API and pages read stored traces; `None`: they answer 503.
    pub clickhouse: Option<crate::telemetry::ClickHouseSettings>,
}

pub(crate) struct Inner {
    pub settings: Settings,
    pub store: Mutex<Store>,
    pub exporter: Option<SpanExporter>,
    pub export_stats: Arc<ExportStats>,
    pub identity: IdentityKey,
}

/// Shared state of the app. Cloning is cheap.
#[derive(Clone)]
pub struct AppState(pub(crate) Arc<Inner>);

impl AppState {
    /// Builds the state; with an OTLP endpoint, spawns the export task on
    /// the current tokio runtime. `public_url` is the resolved base URL.
    pub fn new(config: &Config, public_url: &str) -> anyhow::Result<Self> {
        config.validate().map_err(anyhow::Error::msg)?;
        let export_stats = Arc::new(ExportStats::default());
        let exporter = match &config.otlp_endpoint {
            Some(endpoint) => Some(SpanExporter::start(
                endpoint,
                config.export_queue_capacity,
                config.export_timeout,
                Arc::clone(&export_stats),
            )?),
            None => None,
        };
        let identity = IdentityKey::load(&config.signing_key)?;
        let settings = Settings {
            public_url: public_url.trim_end_matches('/').to_string(),
            registration_token: config.registration_token.clone(),
            admin_token: config.admin_token.clone(),
            contract: config.contract,
            otel_endpoints: config.otel_endpoints.clone(),
            otel_audience: config.otel_audience.clone(),
            sampling_rate: config.sampling_rate,
            id_token_ttl: config.id_token_ttl,
            instance_uuid: crate::tokens::instance_uuid(),
            clickhouse: config.clickhouse.clone(),
        };
        Ok(AppState(Arc::new(Inner {
            settings,
            store: Mutex::new(Store::new(config.first_id)),
            exporter,
            export_stats,
            identity,
        })))
    }

    pub fn settings(&self) -> &Settings {
        &self.0.settings
    }

    /// The store. Never hold the guard across an `.await`.
    pub(crate) fn lock(&self) -> MutexGuard<'_, Store> {
        self.0
            .store
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    pub fn export_stats(&self) -> ExportStatsSnapshot {
        self.0.export_stats.snapshot()
    }

    pub(crate) fn export(&self, item: Option<crate::export::ExportItem>) {
        if let (Some(exporter), Some(item)) = (&self.0.exporter, item) {
            exporter.submit(item);
        }
    }

    pub fn identity(&self) -> &IdentityKey {
        &self.0.identity
    }

    /// Whether `token` is the admin's personal access token.
    pub(crate) fn is_admin_token(&self, token: &str) -> bool {
        !token.is_empty() && token == self.0.settings.admin_token
    }
}

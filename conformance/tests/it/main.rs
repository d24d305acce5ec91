//! The conformance suite, one test binary (ARCHITECTURE.md lists what each
//! module checks): the embedded stack itself ([`stack`]), Phase 1
//! ([`phase1`]), Phases 2 and 3 ([`phase2`]), job logs in `otel_logs`
//! ([`logs`]), the export client against real outages and the OIDC issuer
//! ([`export`]), GitLab faults, hostile input and credential leaks
//! ([`faults`]), the dashboards' SQL ([`dashboards`]), the `clickhouse`
//! crate against chDB ([`clickhouse_clients`]), the telemetry API and pages
//! ([`telemetry_pages`]), the Docker stack statically ([`compose`]), the
//! cluster schema ([`cluster`]), volume and accounting ([`volume`]), what the
//! collector stores ([`collector_output`]) and, only with the `docker`
//! feature, what needs a Docker engine ([`docker`]).

mod clickhouse_clients;
mod cluster;
mod collector_output;
mod compose;
mod dashboards;
#[cfg(feature = "docker")]
mod docker;
mod export;
mod faults;
mod logs;
mod phase1;
mod phase2;
mod stack;
mod telemetry_pages;
mod volume;

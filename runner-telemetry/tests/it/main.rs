//! runner-telemetry's integration tests, one binary: span export to
//! recording collectors ([`export`]), credentials and TLS ([`export_auth`]),
//! retries, buffering and accounting against scripted collectors
//! ([`export_retry`]), input robustness ([`export_input_proptest`]), and job log records
//! through the same buffer ([`logs`]).

#![allow(dead_code)]

mod export;
mod export_auth;
mod export_input_proptest;
mod export_retry;
mod export_support;
mod logs;

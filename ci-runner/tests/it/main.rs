//! ci-runner's integration tests, one binary: the binary against an in-test
//! job API ([`runner`], [`stages`]) and input robustness
//! ([`config_input_proptest`]). The OTLP collectors come from
//! `conformance::doubles`.

mod config_input_proptest;
mod job_api;
mod runner;
mod stages;

//! fake-rails' integration tests, one binary: the runner API, pipelines,
//! payloads and negotiation, identity, concurrency, the Rails spans and the
//! binary. Shared setup in [`common`]; OTLP collectors from
//! `conformance::doubles`.

#![allow(dead_code)]

mod binary;
mod common;
mod concurrency;
mod identity;
mod negotiation;
mod payloads;
mod pipelines;
mod rails_spans;
mod runner_api;

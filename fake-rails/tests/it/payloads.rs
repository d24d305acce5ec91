//! Snapshots of job payloads as runners receive them: contract v1, contract
//! v2 (with an OIDC audience), and the flag off.

use crate::common;

use common::{variable, Gitlab};
use fake_rails::ids::{self, RailsSpan};
use fake_rails::{Config, Contract};
use serde_json::Value;

const CI_CONFIG: &str = r#"
stages: [build, test]
variables:
  GLOBAL_VAR: "global"
  NUMBER: 42
default:
  image: ruby:3.3
  before_script:
    - echo default before
build:
  stage: build
  script:
    - echo building
    - make
  after_script: [echo cleanup]
  variables:
    JOB_VAR: "job"
    RAW_VAR: {value: "$NOT_EXPANDED", expand: false}
  services:
    - postgres:16
    - name: redis:7
      alias: cache
  artifacts:
    name: build-output
    paths: [out/]
    expire_in: 1 week
  cache:
    key: gems
    paths: [vendor/]
    policy: pull-push
  timeout: 1h 30m
test:
  stage: test
  script: echo test
"#;

/// Replaces what varies between runs with stable placeholders.
fn normalize(payload: &Value, gitlab: &Gitlab) -> Value {
    let token = payload["token"].as_str().unwrap().to_string();
    let text = payload
        .to_string()
        .replace(&gitlab.url, "http://fake-rails.test")
        .replace(&token, "[job-token]");
    let text = text.replace(&gitlab.server.addr().port().to_string(), "[port]");
    let mut value: Value = serde_json::from_str(&text).unwrap();
    for var in value["variables"].as_array_mut().unwrap() {
        if var["key"] == "CI_JOB_STARTED_AT" || var["key"] == "CI_PIPELINE_CREATED_AT" {
            var["value"] = Value::String("[timestamp]".into());
        }
    }
    value
}

async fn first_payload(gitlab: &Gitlab) -> Value {
    let project = gitlab.create_project("demo").await;
    gitlab
        .create_pipeline(project["id"].as_u64().unwrap(), CI_CONFIG)
        .await;
    let runner = gitlab.register_runner().await;
    let job = gitlab.request_job(&runner).await.expect("a job");
    job.payload
}

/// The payload with what changes from run to run replaced by a placeholder.
fn redacted(mut payload: Value) -> Value {
    if let Some(info) = payload["job_info"].as_object_mut() {
        for (key, placeholder) in [
            ("time_in_queue_seconds", "[seconds]"),
            ("instance_uuid", "[uuid]"),
        ] {
            if let Some(value) = info.get_mut(key) {
                *value = Value::String(placeholder.into());
            }
        }
    }
    payload
}

macro_rules! assert_payload_snapshot {
    ($name:expr, $value:expr) => {
        insta::assert_yaml_snapshot!($name, redacted($value))
    };
}

#[tokio::test]
async fn v1_payload_carries_job_telemetry_and_trace_context() {
    let gitlab = Gitlab::start_default().await;
    gitlab.set_flag("true", None).await;
    let payload = first_payload(&gitlab).await;

    let pipeline_id = payload["job_info"]["pipeline_id"].as_u64().unwrap();
    let job_id = payload["id"].as_u64().unwrap();
    assert_eq!(payload["features"]["job_telemetry"], true);
    assert_eq!(
        payload["trace_context"]["trace_id"],
        ids::trace_id(pipeline_id)
    );
    assert_eq!(
        payload["trace_context"]["parent_span_id"],
        ids::span_id(pipeline_id, job_id, RailsSpan::Running)
    );
    assert!(payload["features"].get("tracing").is_none());
    assert_payload_snapshot!("v1_payload", normalize(&payload, &gitlab));
}

#[tokio::test]
async fn v2_payload_carries_tracing_with_endpoints_and_oidc_audience() {
    let config = Config {
        contract: Contract::V2,
        otel_endpoints: vec![
            "https://collector.example:4318/v1/traces".into(),
            "grpc://collector.example:4317".into(),
        ],
        otel_audience: Some("https://collector.example".into()),
        ..Config::default()
    };
    let gitlab = Gitlab::start(config).await;
    gitlab.set_flag("true", None).await;
    let payload = first_payload(&gitlab).await;

    let pipeline_id = payload["job_info"]["pipeline_id"].as_u64().unwrap();
    let job_id = payload["id"].as_u64().unwrap();
    let tracing = &payload["features"]["tracing"];
    assert_eq!(tracing["trace_id"], ids::trace_id(pipeline_id));
    assert_eq!(
        tracing["span_parent_id"],
        ids::span_id(pipeline_id, job_id, RailsSpan::Running)
    );
    assert_eq!(
        tracing["otel_endpoints"][0]["auth"]["http_bearer_gcp_oidc"]["audience"],
        "https://collector.example"
    );
    assert!(payload.get("trace_context").is_none());
    assert!(payload["features"].get("job_telemetry").is_none());
    assert_payload_snapshot!("v2_payload", normalize(&payload, &gitlab));
}

#[tokio::test]
async fn v2_without_endpoints_sends_no_tracing_even_when_enabled() {
    let gitlab = Gitlab::start(Config {
        contract: Contract::V2,
        ..Config::default()
    })
    .await;
    gitlab.set_flag("true", None).await;
    let payload = first_payload(&gitlab).await;
    assert!(payload["features"].get("tracing").is_none());
    assert_eq!(payload["features"]["trace_sections"], true);
}

#[tokio::test]
async fn flag_off_payload_has_no_telemetry() {
    let gitlab = Gitlab::start_default().await;
    let payload = first_payload(&gitlab).await;
    assert!(payload["features"].get("job_telemetry").is_none());
    assert!(payload.get("trace_context").is_none());
    assert!(payload["features"].get("tracing").is_none());
    assert_payload_snapshot!("flag_off_payload", normalize(&payload, &gitlab));
}

#[tokio::test]
async fn payload_follows_gitlab_conventions() {
    let gitlab = Gitlab::start_default().await;
    let payload = first_payload(&gitlab).await;
    let token = payload["token"].as_str().unwrap();
    let job_token = variable(&payload, "CI_JOB_TOKEN").unwrap();
    assert_eq!(job_token["value"], token);
    assert_eq!(job_token["masked"], true);
    assert_eq!(job_token["public"], false);
    assert_eq!(variable(&payload, "RAW_VAR").unwrap()["raw"], true);
    assert_eq!(variable(&payload, "NUMBER").unwrap()["value"], "42");
    assert_eq!(
        variable(&payload, "CI_SERVER_URL").unwrap()["value"],
        gitlab.url.as_str()
    );
    // before_script + script in one `script` step; after_script separate, `always`.
    assert_eq!(payload["steps"][0]["name"], "script");
    assert_eq!(
        payload["steps"][0]["script"],
        serde_json::json!(["echo default before", "echo building", "make"])
    );
    assert_eq!(payload["steps"][1]["name"], "after_script");
    assert_eq!(payload["steps"][1]["when"], "always");
    assert_eq!(payload["runner_info"]["timeout"], 5400);
    assert_eq!(payload["steps"][0]["timeout"], 5400);
    assert_eq!(payload["cache"][0]["key"], "gems-protected");
    assert_eq!(payload["image"]["name"], "ruby:3.3");
    assert_eq!(payload["services"][1]["alias"], "cache");
}

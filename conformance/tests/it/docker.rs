//! What only the Docker stack has: the gateway's OIDC authentication, with
//! tokens from the issuer it trusts. Built and run only with the `docker`
//! feature (`cargo xtask e2e --stack docker`), never part of the default
//! suite; without a Docker engine these tests fail, they do not skip.

use std::time::{Duration, SystemTime};

use conformance::docker::{Backend, OIDC_AUDIENCE};
use conformance::docker_stack::DockerStack;
use conformance::process::wait_for;
use conformance::{Stack, StackOptions};

fn docker_stack() -> Stack {
    let mut options = StackOptions::isolated();
    options.backend = Backend::Docker;
    Stack::start(options).expect("the Docker stack starts (is a Docker engine running?)")
}

fn id_token(docker: &DockerStack, audience: &str) -> String {
    let url = format!(
        "{}/computeMetadata/v1/instance/service-accounts/default/identity?audience={audience}",
        docker.issuer_url()
    );
    ureq::get(&url)
        .header("Metadata-Flavor", "Google")
        .call()
        .expect("the issuer mints a token")
        .body_mut()
        .read_to_string()
        .unwrap()
}

/// POSTs one span as OTLP/HTTP JSON; returns the status.
fn post_span(url: &str, token: Option<&str>, trace_id: &str) -> u16 {
    let now = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    let body = serde_json::json!({"resourceSpans": [{
        "resource": {"attributes": [{"key": "service.name", "value": {"stringValue": "gitlab-ci-runner"}}]},
        "scopeSpans": [{"scope": {"name": "conformance"}, "spans": [{
            "traceId": trace_id, "spanId": "00f067aa0ba902b7", "name": "job_execution", "kind": 1,
            "startTimeUnixNano": (now - 1_000_000).to_string(), "endTimeUnixNano": now.to_string()
        }]}]
    }]});
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .build()
        .into();
    let mut request = agent
        .post(&format!("{url}/v1/traces"))
        .header("Content-Type", "application/json");
    if let Some(token) = token {
        request = request.header("Authorization", &format!("Bearer {token}"));
    }
    request.send(body.to_string()).unwrap().status().as_u16()
}

#[test]
fn the_gateway_accepts_only_tokens_of_its_issuer_for_its_audience() {
    let stack = docker_stack();
    let docker = stack.docker().expect("the Docker backend");
    let gateway = docker.authenticated_otlp_http();
    let trace_id = format!("{:032x}", rand::random::<u128>().max(1));

    assert_eq!(post_span(gateway, None, &trace_id), 401, "no token");
    let wrong = id_token(docker, "someone-else");
    assert_eq!(
        post_span(gateway, Some(&wrong), &trace_id),
        401,
        "wrong audience"
    );
    let token = id_token(docker, OIDC_AUDIENCE);
    assert_eq!(
        post_span(gateway, Some(&token), &trace_id),
        200,
        "the issuer's token"
    );

    let clickhouse = stack.clickhouse();
    let landed = wait_for("the span to land", Duration::from_secs(60), || {
        let n = clickhouse.count(&format!(
            "SELECT count() FROM otel.otel_traces WHERE TraceId = '{trace_id}'"
        ))?;
        Ok((n > 0).then_some(n))
    })
    .unwrap();
    assert_eq!(landed, 1, "exactly the authenticated span");
}

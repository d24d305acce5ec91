//! Workload identity: ID tokens verify against the JWKS; the telemetry gateway check.

use crate::common;

use std::time::Duration;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use common::Gitlab;
use fake_rails::Config;
use reqwest::StatusCode;
use rsa::pkcs1v15::{Signature, VerifyingKey};
use rsa::signature::Verifier;
use rsa::{BigUint, RsaPublicKey};
use serde_json::{json, Value};
use sha2::Sha256;

const IDENTITY: &str = "/computeMetadata/v1/instance/service-accounts/default/identity";

fn b64(part: &str) -> Vec<u8> {
    URL_SAFE_NO_PAD.decode(part).expect("base64url")
}

/// The issuer's published keys, found through OIDC discovery.
async fn jwks(gitlab: &Gitlab) -> Value {
    let discovery: Value = gitlab
        .client
        .get(format!("{}/.well-known/openid-configuration", gitlab.url))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(discovery["issuer"], gitlab.server.public_url());
    assert_eq!(
        discovery["id_token_signing_alg_values_supported"],
        json!(["RS256"])
    );
    gitlab
        .client
        .get(discovery["jwks_uri"].as_str().unwrap())
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap()
}

/// Verifies a compact RS256 JWT against a JWKS; returns the claims.
fn verify(jwks: &Value, token: &str) -> Result<Value, String> {
    let parts: Vec<&str> = token.split('.').collect();
    if parts.len() != 3 {
        return Err("not a compact JWS".into());
    }
    let header: Value = serde_json::from_slice(&b64(parts[0])).map_err(|e| e.to_string())?;
    if header["alg"] != "RS256" {
        return Err(format!("alg is {}", header["alg"]));
    }
    let jwk = jwks["keys"]
        .as_array()
        .and_then(|keys| keys.iter().find(|k| k["kid"] == header["kid"]))
        .ok_or("the token's kid is not in the JWKS")?;
    if jwk["kty"] != "RSA" {
        return Err("not an RSA key".into());
    }
    let public = RsaPublicKey::new(
        BigUint::from_bytes_be(&b64(jwk["n"].as_str().ok_or("no n")?)),
        BigUint::from_bytes_be(&b64(jwk["e"].as_str().ok_or("no e")?)),
    )
    .map_err(|e| e.to_string())?;
    let signature = Signature::try_from(b64(parts[2]).as_slice()).map_err(|e| e.to_string())?;
    VerifyingKey::<Sha256>::new(public)
        .verify(format!("{}.{}", parts[0], parts[1]).as_bytes(), &signature)
        .map_err(|e| format!("bad signature: {e}"))?;
    serde_json::from_slice(&b64(parts[1])).map_err(|e| e.to_string())
}

#[tokio::test]
async fn id_tokens_verify_against_the_jwks_with_the_audience() {
    let gitlab = Gitlab::start(Config {
        id_token_ttl: Duration::from_secs(120),
        ..Config::default()
    })
    .await;
    let url = format!(
        "{}{IDENTITY}?audience=https://collector.example&format=full",
        gitlab.url
    );

    let without_header = gitlab.client.get(&url).send().await.unwrap();
    assert_eq!(without_header.status(), StatusCode::FORBIDDEN);
    let without_audience = gitlab
        .client
        .get(format!("{}{IDENTITY}", gitlab.url))
        .header("Metadata-Flavor", "Google")
        .send()
        .await
        .unwrap();
    assert_eq!(without_audience.status(), StatusCode::BAD_REQUEST);

    let response = gitlab
        .client
        .get(&url)
        .header("Metadata-Flavor", "Google")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(response.headers()["metadata-flavor"], "Google");
    let token = response.text().await.unwrap();
    let jwks = jwks(&gitlab).await;
    let claims = verify(&jwks, &token).expect("the token verifies against the JWKS");
    assert_eq!(claims["aud"], "https://collector.example");
    assert_eq!(claims["iss"], gitlab.server.public_url());
    assert!(claims["sub"].as_str().is_some_and(|s| !s.is_empty()));
    assert_eq!(claims["email_verified"], true);
    let iat = claims["iat"].as_i64().unwrap();
    assert_eq!(claims["exp"].as_i64().unwrap() - iat, 120);
    let now = time::OffsetDateTime::now_utc().unix_timestamp();
    assert!((iat - now).abs() < 60);

    // A tampered payload does not verify.
    let parts: Vec<&str> = token.split('.').collect();
    let forged_claims = URL_SAFE_NO_PAD.encode(json!({"aud": "someone-else"}).to_string());
    let forged = format!("{}.{}.{}", parts[0], forged_claims, parts[2]);
    assert!(
        verify(&jwks, &forged).is_err(),
        "a forged token must not verify"
    );
}

#[tokio::test]
async fn telemetry_auth_checks_runner_and_job_tokens() {
    let gitlab = Gitlab::start_default().await;
    let project = gitlab.create_project("demo").await;
    let project_id = project["id"].as_u64().unwrap();
    gitlab.set_flag("true", Some("root/demo")).await;
    gitlab
        .create_pipeline(project_id, "build:\n  script: make\n  timeout: 20m\n")
        .await;
    let runner = gitlab.register_runner().await;
    let other_runner = gitlab.register_runner().await;
    let job = gitlab.request_job(&runner).await.unwrap();
    let auth = |body: Value| {
        gitlab
            .client
            .post(gitlab.api("/internal/ci/telemetry/auth"))
            .json(&body)
            .send()
    };

    let ok = auth(json!({"runner_token": runner.token, "job_token": job.token}))
        .await
        .unwrap();
    assert_eq!(ok.status(), StatusCode::OK);
    let max_age: u64 = ok.headers()["cache-control"]
        .to_str()
        .unwrap()
        .strip_prefix("max-age=")
        .unwrap()
        .parse()
        .unwrap();
    assert!(
        (1_100..=1_200).contains(&max_age),
        "max-age is the job's remaining timeout, got {max_age}"
    );
    assert_eq!(
        ok.json::<Value>().await.unwrap()["trace_id"],
        job.payload["trace_context"]["trace_id"]
    );

    let via_headers = gitlab
        .client
        .post(gitlab.api("/internal/ci/telemetry/auth"))
        .header("Runner-Token", &runner.token)
        .header("Job-Token", &job.token)
        .send()
        .await
        .unwrap();
    assert_eq!(via_headers.status(), StatusCode::OK);

    for (body, expected) in [
        (json!({}), StatusCode::UNAUTHORIZED),
        (
            json!({"runner_token": runner.token}),
            StatusCode::UNAUTHORIZED,
        ),
        (
            json!({"runner_token": "glrt-bad", "job_token": job.token}),
            StatusCode::UNAUTHORIZED,
        ),
        (
            json!({"runner_token": runner.token, "job_token": "glcbt-bad"}),
            StatusCode::UNAUTHORIZED,
        ),
        (
            json!({"runner_token": other_runner.token, "job_token": job.token}),
            StatusCode::FORBIDDEN,
        ),
    ] {
        assert_eq!(
            auth(body.clone()).await.unwrap().status(),
            expected,
            "{body}"
        );
    }

    gitlab.finish_job(&job, "success").await;
    let finished = auth(json!({"runner_token": runner.token, "job_token": job.token}))
        .await
        .unwrap();
    assert_eq!(finished.status(), StatusCode::FORBIDDEN);

    // Telemetry off for the project: 403.
    let other = gitlab.create_project("quiet").await["id"].as_u64().unwrap();
    gitlab
        .create_pipeline(other, "build:\n  script: make\n")
        .await;
    let quiet = gitlab.request_job(&runner).await.unwrap();
    assert!(quiet.payload.get("trace_context").is_none());
    let disabled = auth(json!({"runner_token": runner.token, "job_token": quiet.token}))
        .await
        .unwrap();
    assert_eq!(disabled.status(), StatusCode::FORBIDDEN);
}

//! Credentials and TLS of the export client: a bearer token file re-read when
//! it changes, GCP ID tokens cached per audience and refreshed when they
//! expire, tokens kept out of logs and errors, and `https`/`grpcs`
//! collectors behind a private CA.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::export_support::*;
use axum::extract::Query;
use axum::http::{HeaderMap, StatusCode};
use base64::Engine;
use conformance::doubles::eventually;
use runner_telemetry::negotiate::Transport;
use runner_telemetry::{DropReason, RunnerTelemetry};

fn authorization(received: &Received) -> String {
    received
        .headers
        .get("authorization")
        .cloned()
        .unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bearer_token_file_is_reread_when_it_changes() {
    let dir = tempfile::tempdir().unwrap();
    let token_file = dir.path().join("token");
    std::fs::write(&token_file, "first-token-AAAA\n").unwrap();
    let collector = Collector::start().await;
    let mut settings = http_settings(&collector);
    settings.bearer_token_file = Some(token_file.clone());
    let telemetry = RunnerTelemetry::new(settings, runner());

    let report = flush_v1_job(&telemetry, 1).await;
    assert_eq!(report.exported(), 1, "{report}");
    // Rotated (as a projected Kubernetes token is): a new size and mtime.
    std::fs::write(&token_file, "second-token-BBBBBBBB\n").unwrap();
    let report = flush_v1_job(&telemetry, 2).await;
    assert_eq!(report.exported(), 1, "{report}");

    let seen: Vec<String> = collector.received().iter().map(authorization).collect();
    assert_eq!(
        seen,
        ["Bearer first-token-AAAA", "Bearer second-token-BBBBBBBB"]
    );

    // A missing file is an export error that names the file, and is retried.
    std::fs::remove_file(&token_file).unwrap();
    let mut settings = http_settings(&collector);
    settings.bearer_token_file = Some(token_file.clone());
    settings.flush_timeout = Duration::from_millis(300);
    let missing = RunnerTelemetry::new(settings, runner());
    let report = missing
        .flush_job(run_job(&missing, 3, &v1_payload(), &[]))
        .await;
    assert_eq!(report.buffered(), 1, "{report}");
    let error = report.endpoints[0].error.clone().unwrap();
    assert!(
        error.starts_with("cannot read the bearer token file") && error.contains("token"),
        "{error}"
    );
    // It appears: the next attempt sends it.
    std::fs::write(&token_file, "third-token-C").unwrap();
    let received = collector.wait_for_requests(3, Duration::from_secs(5)).await;
    assert_eq!(authorization(&received[2]), "Bearer third-token-C");
    for t in [&telemetry, &missing] {
        assert_invariant(t);
    }
    for secret in ["first-token-AAAA", "second-token-BBBBBBBB", "third-token-C"] {
        assert!(!logs().contains(secret), "a token reached the log");
        assert!(!format!("{report} {report:?}").contains(secret));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_echoed_by_the_collector_is_redacted() {
    // The collector refuses the token and quotes it back.
    let collector = scripted_collector(vec![Answer::with_body(
        401,
        "invalid token echoed-SECRET-42",
    )])
    .await;
    let dir = tempfile::tempdir().unwrap();
    let token_file = dir.path().join("token");
    std::fs::write(&token_file, "echoed-SECRET-42").unwrap();
    let mut settings = http_settings(&collector);
    settings.bearer_token_file = Some(token_file);
    let telemetry = RunnerTelemetry::new(settings, runner());
    let report = flush_v1_job(&telemetry, 4).await;
    assert_eq!(
        report.dropped_for(DropReason::PermanentError),
        1,
        "{report}"
    );
    let error = report.endpoints[0].error.clone().unwrap();
    assert_eq!(error, "HTTP 401 Unauthorized: invalid token [REDACTED]");
    assert!(!format!("{report} {report:?}").contains("echoed-SECRET-42"));
    assert!(!logs().contains("echoed-SECRET-42"), "{}", logs());
    assert!(logs().contains("[REDACTED]"), "{}", logs());
    assert_invariant(&telemetry);
}

/// Serves `router` on a free local port; its base URL.
async fn serve(router: axum::Router) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr: SocketAddr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        let _ = axum::serve(listener, router).await;
    });
    format!("http://{addr}")
}

/// A GCP-metadata-compatible server minting unsigned JWTs that expire
/// `ttl` after they are made, for `audience` and requests with
/// `Metadata-Flavor: Google` only (others get 404); its URL and the tokens
/// it minted.
async fn metadata_server(
    audience: &'static str,
    ttl: Duration,
) -> (String, Arc<Mutex<Vec<String>>>) {
    let minted = Arc::new(Mutex::new(Vec::new()));
    let record = minted.clone();
    let identity = move |headers: HeaderMap, query: Query<HashMap<String, String>>| {
        let record = record.clone();
        async move {
            let flavor = headers.get("metadata-flavor").and_then(|v| v.to_str().ok());
            if flavor != Some("Google")
                || query.get("audience").map(String::as_str) != Some(audience)
            {
                return (StatusCode::NOT_FOUND, String::new());
            }
            let mut minted = record.lock().unwrap();
            let b64 = |s: String| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(s);
            let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap();
            let claims = format!(
                r#"{{"aud":"{audience}","iat":{},"exp":{:.3},"n":{}}}"#,
                now.as_secs(),
                (now + ttl).as_secs_f64(),
                minted.len()
            );
            let token = format!(
                "{}.{}.sig{}",
                b64(r#"{"alg":"RS256"}"#.into()),
                b64(claims),
                minted.len()
            );
            minted.push(token.clone());
            (StatusCode::OK, token)
        }
    };
    let router = axum::Router::new().route(
        "/computeMetadata/v1/instance/service-accounts/default/identity",
        axum::routing::get(identity),
    );
    (serve(router).await, minted)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gcp_id_tokens_are_cached_per_audience_and_refreshed_when_expired() {
    const AUDIENCE: &str = "https://collector.example.com";
    let (metadata, minted) = metadata_server(AUDIENCE, Duration::from_secs(2)).await;
    let collector = Collector::start().await;
    let mut settings = settings(Transport::HttpProtobuf, "http://static.invalid/v1/traces");
    settings.gcp_metadata_url = metadata;
    let telemetry = RunnerTelemetry::new(settings, runner());
    let payload = v2_payload(&collector.http_endpoint(), Some(AUDIENCE));

    // Two jobs in a row: one token, fetched once.
    for job in [1, 2] {
        let report = telemetry
            .flush_job(run_job(&telemetry, job, &payload, &[]))
            .await;
        assert_eq!(report.exported(), 1, "{report}");
    }
    let first = minted.lock().unwrap()[0].clone();
    assert_eq!(minted.lock().unwrap().len(), 1);
    let seen: Vec<String> = collector.received().iter().map(authorization).collect();
    assert_eq!(seen, [format!("Bearer {first}"), format!("Bearer {first}")]);

    // Past its expiry (2 s; refreshed from 1.5 s), a new one is fetched.
    // (Its `exp` is on the wall clock: the test waits for that to pass.)
    let expiry = SystemTime::now() + Duration::from_secs(2);
    eventually("the first token to expire", Duration::from_secs(10), || {
        std::future::ready((SystemTime::now() >= expiry).then_some(()))
    })
    .await;
    let report = telemetry
        .flush_job(run_job(&telemetry, 3, &payload, &[]))
        .await;
    assert_eq!(report.exported(), 1, "{report}");
    let tokens = minted.lock().unwrap().clone();
    assert_eq!(tokens.len(), 2);
    assert_ne!(tokens[0], tokens[1]);
    assert_eq!(
        authorization(&collector.received()[2]),
        format!("Bearer {}", tokens[1])
    );
    assert_eq!(telemetry.hub().id_token_fetches(), 2);
    for token in &tokens {
        assert!(!logs().contains(token.as_str()), "a token reached the log");
        assert!(!logs().contains(token.split('.').nth(2).unwrap()));
    }
    assert_invariant(&telemetry);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_metadata_server_that_refuses_is_an_error_without_a_token() {
    let metadata = serve(
        axum::Router::new().fallback(|| async { (StatusCode::FORBIDDEN, "no Metadata-Flavor") }),
    )
    .await;
    let collector = Collector::start().await;
    let mut settings = settings(Transport::HttpProtobuf, "http://static.invalid/v1/traces");
    settings.gcp_metadata_url = metadata;
    settings.flush_timeout = Duration::from_millis(300);
    let telemetry = RunnerTelemetry::new(settings, runner());
    let payload = v2_payload(&collector.http_endpoint(), Some("aud-x"));
    let report = telemetry
        .flush_job(run_job(&telemetry, 5, &payload, &[]))
        .await;
    // Retried (the metadata server may come back), never sent without one.
    assert_eq!(report.buffered(), 1, "{report}");
    let error = report.endpoints[0].error.clone().unwrap();
    assert!(
        error.starts_with("cannot get an ID token for audience `aud-x`") && error.contains("403"),
        "{error}"
    );
    assert!(collector.received().is_empty());
    telemetry.shutdown().await;
    assert_invariant(&telemetry);
}

/// A CA and a server certificate for 127.0.0.1 / localhost signed by it.
struct Pki {
    ca_pem: String,
    cert_pem: String,
    key_pem: String,
}

fn pki() -> Pki {
    use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair};
    let ca_key = KeyPair::generate().unwrap();
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca_pem = ca_params.self_signed(&ca_key).unwrap().pem();
    let issuer = Issuer::new(ca_params, ca_key);
    let key = KeyPair::generate().unwrap();
    let params =
        CertificateParams::new(vec!["localhost".to_string(), "127.0.0.1".to_string()]).unwrap();
    let cert = params.signed_by(&key, &issuer).unwrap();
    Pki {
        ca_pem,
        cert_pem: cert.pem(),
        key_pem: key.serialize_pem(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn https_and_grpcs_collectors_behind_a_private_ca() {
    let pki = pki();
    let dir = tempfile::tempdir().unwrap();
    let ca_file = dir.path().join("ca.pem");
    std::fs::write(&ca_file, &pki.ca_pem).unwrap();

    // HTTPS with the CA file: delivered.
    let collector = Collector::start_tls(&pki.cert_pem, &pki.key_pem).await;
    let url = collector.http_endpoint();
    let mut trusted = settings(Transport::HttpProtobuf, &url);
    trusted.ca_file = Some(ca_file.clone());
    let telemetry = RunnerTelemetry::new(trusted, runner());
    let report = flush_v1_job(&telemetry, 1).await;
    assert_eq!(report.exported(), 1, "{report}");
    let names: Vec<String> = collector.spans().into_iter().map(|s| s.name).collect();
    assert_eq!(names, ["job_execution"]);
    assert_invariant(&telemetry);

    // Without it the certificate is not trusted: retried, never sent.
    let mut untrusted = settings(Transport::HttpProtobuf, &url);
    untrusted.flush_timeout = Duration::from_millis(400);
    let telemetry = RunnerTelemetry::new(untrusted, runner());
    let report = flush_v1_job(&telemetry, 2).await;
    assert_eq!(report.buffered(), 1, "{report}");
    let error = report.endpoints[0].error.clone().unwrap();
    assert!(error.contains("certificate"), "{error}");
    telemetry.shutdown().await;
    assert_invariant(&telemetry);

    // gRPC over TLS (`grpcs` in a v2 payload).
    let grpcs = Collector::start_tls(&pki.cert_pem, &pki.key_pem).await;
    let port = grpcs.addr.unwrap().port();
    let mut trusted = settings(Transport::HttpProtobuf, "http://static.invalid/v1/traces");
    trusted.ca_file = Some(ca_file);
    let telemetry = RunnerTelemetry::new(trusted, runner());
    let payload = v2_payload(&format!("grpcs://localhost:{port}"), None);
    let report = telemetry
        .flush_job(run_job(&telemetry, 3, &payload, &[]))
        .await;
    assert_eq!(report.exported(), 1, "{report}");
    let received = grpcs.received();
    assert_eq!(received.len(), 1);
    assert!(received[0].grpc);
    assert_eq!(received[0].spans().len(), 1);
    assert_invariant(&telemetry);
}

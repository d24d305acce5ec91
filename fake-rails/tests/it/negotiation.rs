//! Telemetry negotiation as Rails does it: the project-level flag (boolean,
//! actors, percentage of actors) and the sampling rate per root pipeline.

use crate::common;

use std::collections::BTreeSet;

use common::Gitlab;
use fake_rails::flags::{percentage_of_actors_open, project_flipper_id, CI_JOB_TELEMETRY};
use fake_rails::{ids, Config};
use reqwest::StatusCode;
use serde_json::json;

const PROJECTS: usize = 40;

/// Creates the projects, one pipeline each, and returns the ids of the
/// projects whose job came with a trace context.
async fn traced_projects(gitlab: &Gitlab, flag: &[(&str, &str)]) -> BTreeSet<u64> {
    let mut ids = Vec::new();
    for i in 0..PROJECTS {
        ids.push(
            gitlab.create_project(&format!("p{i}")).await["id"]
                .as_u64()
                .unwrap(),
        );
    }
    let response = gitlab
        .admin(reqwest::Method::POST, "/features/ci_job_telemetry")
        .form(flag)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::CREATED);
    let runner = gitlab.register_runner().await;
    let mut traced = BTreeSet::new();
    for id in ids {
        gitlab.create_pipeline(id, "a:\n  script: x\n").await;
        let job = gitlab.request_job(&runner).await.unwrap();
        assert_eq!(job.payload["job_info"]["project_id"], id);
        if job.payload["features"]["job_telemetry"] == true {
            assert!(job.payload["trace_context"].is_object());
            traced.insert(id);
        } else {
            assert!(job.payload.get("trace_context").is_none());
        }
    }
    traced
}

#[tokio::test]
async fn percentage_of_actors_is_deterministic_per_project() {
    let first = traced_projects(&Gitlab::start_default().await, &[("value", "50")]).await;
    let second = traced_projects(
        &Gitlab::start_default().await,
        &[("value", "50"), ("key", "percentage_of_actors")],
    )
    .await;
    assert_eq!(first, second, "the same projects, on every server");
    let expected: BTreeSet<u64> = (1..=PROJECTS as u64)
        .filter(|id| percentage_of_actors_open(CI_JOB_TELEMETRY, &project_flipper_id(*id), 50.0))
        .collect();
    assert_eq!(first, expected, "Flipper's formula");
    assert!(
        !first.is_empty() && first.len() < PROJECTS,
        "50% is neither none nor all: {first:?}"
    );
}

#[tokio::test]
async fn zero_and_hundred_percent() {
    assert!(
        traced_projects(&Gitlab::start_default().await, &[("value", "0")])
            .await
            .is_empty()
    );
    assert_eq!(
        traced_projects(&Gitlab::start_default().await, &[("value", "100")])
            .await
            .len(),
        PROJECTS
    );
}

#[tokio::test]
async fn project_gate_and_features_api_shapes() {
    let gitlab = Gitlab::start_default().await;
    let one = gitlab.create_project("one").await["id"].as_u64().unwrap();
    let two = gitlab.create_project("two").await["id"].as_u64().unwrap();

    let feature = gitlab.set_flag("true", Some("root/one")).await;
    assert_eq!(feature["name"], "ci_job_telemetry");
    assert_eq!(feature["state"], "conditional");
    assert_eq!(
        feature["gates"],
        json!([{"key": "boolean", "value": false}, {"key": "actors", "value": ["Project:1"]}])
    );

    let runner = gitlab.register_runner().await;
    gitlab.create_pipeline(one, "a:\n  script: x\n").await;
    assert_eq!(
        gitlab.request_job(&runner).await.unwrap().payload["features"]["job_telemetry"],
        true
    );
    gitlab.create_pipeline(two, "a:\n  script: x\n").await;
    assert!(
        gitlab.request_job(&runner).await.unwrap().payload["features"]
            .get("job_telemetry")
            .is_none()
    );

    let unknown = gitlab
        .admin(reqwest::Method::POST, "/features/ci_job_telemetry")
        .form(&[("value", "true"), ("project", "root/nope")])
        .send()
        .await
        .unwrap();
    assert_eq!(unknown.status(), StatusCode::BAD_REQUEST);
    let mixed = gitlab
        .admin(reqwest::Method::POST, "/features/ci_job_telemetry")
        .json(&json!({"value": 30, "project": "root/one"}))
        .send()
        .await
        .unwrap();
    assert_eq!(mixed.status(), StatusCode::BAD_REQUEST);

    // Project gate off again; then globally on (JSON boolean).
    assert_eq!(
        gitlab.set_flag("false", Some("root/one")).await["state"],
        "off"
    );
    let on = gitlab
        .admin(reqwest::Method::POST, "/features/ci_job_telemetry")
        .json(&json!({"value": true}))
        .send()
        .await
        .unwrap();
    assert_eq!(on.status(), StatusCode::CREATED);
    let listed = gitlab.get_json("/features").await;
    assert_eq!(listed[0]["state"], "on");
    let delete = gitlab
        .admin(reqwest::Method::DELETE, "/features/ci_job_telemetry")
        .send()
        .await
        .unwrap();
    assert_eq!(delete.status(), StatusCode::NO_CONTENT);
    assert!(gitlab
        .get_json("/features")
        .await
        .as_array()
        .unwrap()
        .is_empty());
}

#[tokio::test]
async fn sampling_rate_is_deterministic_per_root_pipeline() {
    let gitlab = Gitlab::start(Config {
        sampling_rate: 0.5,
        ..Config::default()
    })
    .await;
    gitlab.set_flag("true", None).await;
    let project = gitlab.create_project("sampled").await["id"]
        .as_u64()
        .unwrap();
    let runner = gitlab.register_runner().await;
    let mut sampled = 0;
    for _ in 0..30 {
        let pipeline = gitlab
            .create_pipeline(project, "a:\n  script: x\nb:\n  script: y\n")
            .await;
        let pipeline_id = pipeline["id"].as_u64().unwrap();
        let expected = ids::pipeline_sampled(pipeline_id, 0.5);
        // Both jobs of a pipeline share the decision.
        for _ in 0..2 {
            let job = gitlab.request_job(&runner).await.unwrap();
            assert_eq!(job.payload["job_info"]["pipeline_id"], pipeline_id);
            assert_eq!(
                job.payload["features"]["job_telemetry"] == true,
                expected,
                "pipeline {pipeline_id}"
            );
        }
        sampled += usize::from(expected);
    }
    assert!(
        sampled > 0 && sampled < 30,
        "50% keeps some and drops some: {sampled}"
    );
}

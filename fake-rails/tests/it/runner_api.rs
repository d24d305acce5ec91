//! The runner API's status codes, headers and error bodies, as GitLab answers them.

use crate::common;

use common::Gitlab;
use reqwest::StatusCode;
use serde_json::{json, Value};

const ONE_JOB: &str = "build:\n  script: echo hi\n";

async fn gitlab_with_job() -> (Gitlab, u64, common::TestRunner, common::ReceivedJob) {
    let gitlab = Gitlab::start_default().await;
    let project = gitlab.create_project("demo").await["id"].as_u64().unwrap();
    gitlab.create_pipeline(project, ONE_JOB).await;
    let runner = gitlab.register_runner().await;
    let job = gitlab.request_job(&runner).await.expect("a job");
    (gitlab, project, runner, job)
}

async fn message(response: reqwest::Response) -> String {
    let body: Value = response.json().await.expect("a JSON error body");
    body["message"].as_str().expect("a message").to_string()
}

#[tokio::test]
async fn registration_and_verification() {
    let gitlab = Gitlab::start_default().await;
    let cases = [
        (
            json!({"token": gitlab.server.registration_token()}),
            StatusCode::CREATED,
        ),
        (json!({"token": "wrong"}), StatusCode::FORBIDDEN),
        (json!({}), StatusCode::BAD_REQUEST),
        (
            json!({"token": gitlab.server.registration_token(), "maximum_timeout": 5}),
            StatusCode::BAD_REQUEST,
        ),
        (
            json!({"token": gitlab.server.registration_token(), "run_untagged": false}),
            StatusCode::BAD_REQUEST,
        ),
    ];
    for (body, expected) in cases {
        let response = gitlab
            .client
            .post(gitlab.api("/runners"))
            .json(&body)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), expected, "register with {body}");
    }
    // Form-encoded, like `curl --data`.
    let response = gitlab
        .client
        .post(gitlab.api("/runners"))
        .form(&[
            ("token", gitlab.server.registration_token()),
            ("tag_list", "a,b"),
        ])
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::CREATED);
    let runner: Value = response.json().await.unwrap();
    assert!(runner["token"].as_str().unwrap().starts_with("glrt-"));

    let verify = |token: Value| {
        gitlab
            .client
            .post(gitlab.api("/runners/verify"))
            .json(&json!({"token": token}))
            .send()
    };
    let ok = verify(runner["token"].clone()).await.unwrap();
    assert_eq!(ok.status(), StatusCode::OK);
    assert_eq!(ok.json::<Value>().await.unwrap()["id"], runner["id"]);
    assert_eq!(
        verify(json!("glrt-nope")).await.unwrap().status(),
        StatusCode::FORBIDDEN
    );

    // GitLab 16+: an admin creates the runner, the runner only verifies its token.
    let created = gitlab
        .admin(reqwest::Method::POST, "/user/runners")
        .json(&json!({"runner_type": "instance_type", "description": "new style"}))
        .send()
        .await
        .unwrap();
    assert_eq!(created.status(), StatusCode::CREATED);
    let created: Value = created.json().await.unwrap();
    assert_eq!(
        verify(created["token"].clone()).await.unwrap().status(),
        StatusCode::OK
    );
    let anonymous = gitlab
        .client
        .post(gitlab.api("/user/runners"))
        .json(&json!({"runner_type": "instance_type"}))
        .send()
        .await
        .unwrap();
    assert_eq!(anonymous.status(), StatusCode::UNAUTHORIZED);

    let delete = gitlab
        .client
        .delete(gitlab.api("/runners"))
        .json(&json!({"token": runner["token"]}))
        .send()
        .await
        .unwrap();
    assert_eq!(delete.status(), StatusCode::NO_CONTENT);
    assert_eq!(
        verify(runner["token"].clone()).await.unwrap().status(),
        StatusCode::FORBIDDEN
    );
}

#[tokio::test]
async fn job_request_answers_201_204_403() {
    let gitlab = Gitlab::start_default().await;
    let runner = gitlab.register_runner().await;

    let empty = gitlab.request_job_raw(&runner).await;
    assert_eq!(empty.status(), StatusCode::NO_CONTENT);
    let before = empty.headers()["x-gitlab-last-update"]
        .to_str()
        .unwrap()
        .to_string();

    let project = gitlab.create_project("demo").await["id"].as_u64().unwrap();
    gitlab.create_pipeline(project, ONE_JOB).await;
    let job = gitlab.request_job_raw(&runner).await;
    assert_eq!(job.status(), StatusCode::CREATED);

    let none_left = gitlab.request_job_raw(&runner).await;
    assert_eq!(none_left.status(), StatusCode::NO_CONTENT);
    let after = none_left.headers()["x-gitlab-last-update"]
        .to_str()
        .unwrap()
        .to_string();
    assert_ne!(before, after, "queueing a job changes X-GitLab-Last-Update");

    let bad = gitlab
        .client
        .post(gitlab.api("/jobs/request"))
        .json(&json!({"token": "glrt-bad"}))
        .send()
        .await
        .unwrap();
    assert_eq!(bad.status(), StatusCode::FORBIDDEN);
    assert_eq!(message(bad).await, "403 Forbidden");
}

#[tokio::test]
async fn tagged_jobs_go_only_to_runners_with_the_tags() {
    let gitlab = Gitlab::start_default().await;
    let project = gitlab.create_project("demo").await["id"].as_u64().unwrap();
    gitlab
        .create_pipeline(project, "gpu:\n  tags: [gpu]\n  script: nvidia-smi\n")
        .await;
    let plain = gitlab.register_runner().await;
    let gpu = gitlab
        .register_runner_with(json!({"tag_list": ["gpu", "linux"]}))
        .await;
    assert!(gitlab.request_job(&plain).await.is_none());
    let job = gitlab
        .request_job(&gpu)
        .await
        .expect("the gpu runner gets the job");
    assert_eq!(job.payload["job_info"]["name"], "gpu");
}

#[tokio::test]
async fn job_updates_and_the_finished_job_403() {
    let (gitlab, project, _runner, job) = gitlab_with_job().await;

    let wrong_token = gitlab
        .client
        .put(gitlab.api(&format!("/jobs/{}", job.id)))
        .json(&json!({"token": "glcbt-nope", "state": "success"}))
        .send()
        .await
        .unwrap();
    assert_eq!(wrong_token.status(), StatusCode::FORBIDDEN);

    let unknown = gitlab
        .client
        .put(gitlab.api("/jobs/999999"))
        .json(&json!({"token": job.token}))
        .send()
        .await
        .unwrap();
    assert_eq!(unknown.status(), StatusCode::NOT_FOUND);

    let bad_state = gitlab.update_job(&job, json!({"state": "exploded"})).await;
    assert_eq!(bad_state.status(), StatusCode::BAD_REQUEST);
    let bad_reason = gitlab
        .update_job(
            &job,
            json!({"state": "failed", "failure_reason": "gremlins"}),
        )
        .await;
    assert_eq!(bad_reason.status(), StatusCode::BAD_REQUEST);
    assert_eq!(
        gitlab.job(project, job.id).await["status"],
        "running",
        "bad input changes nothing"
    );

    // Keep-alive (Go clients send empty strings for unset fields), then the header form of the token.
    let keep_alive = gitlab
        .update_job(&job, json!({"state": "running", "failure_reason": ""}))
        .await;
    assert_eq!(keep_alive.status(), StatusCode::OK);
    assert_eq!(
        gitlab
            .update_job(&job, json!({"state": "running"}))
            .await
            .status(),
        StatusCode::OK
    );
    let via_header = gitlab
        .client
        .put(gitlab.api(&format!("/jobs/{}", job.id)))
        .header("JOB-TOKEN", &job.token)
        .json(&json!({"state": "failed", "failure_reason": "script_failure", "exit_code": 2}))
        .send()
        .await
        .unwrap();
    assert_eq!(via_header.status(), StatusCode::OK);

    let again = gitlab.update_job(&job, json!({"state": "success"})).await;
    assert_eq!(again.status(), StatusCode::FORBIDDEN);
    assert_eq!(again.headers()["job-status"], "failed");

    let read = gitlab.job(project, job.id).await;
    assert_eq!(read["status"], "failed");
    assert_eq!(read["failure_reason"], "script_failure");
    assert!(read["duration"].as_f64().is_some());
    assert!(read["queued_duration"].as_f64().is_some());
    assert_eq!(read["runner"]["id"].as_u64(), Some(1));
    assert_eq!(read["pipeline"]["status"], "failed");
}

#[tokio::test]
async fn trace_content_range_rules() {
    let (gitlab, project, _runner, job) = gitlab_with_job().await;

    let first = gitlab.patch_trace(&job, Some("0-5"), "hello\n").await;
    assert_eq!(first.status(), StatusCode::ACCEPTED);
    assert_eq!(first.headers()["range"], "0-6");
    assert_eq!(first.headers()["job-status"], "running");

    let wrong_offset = gitlab.patch_trace(&job, Some("3-8"), "again\n").await;
    assert_eq!(wrong_offset.status(), StatusCode::RANGE_NOT_SATISFIABLE);
    assert_eq!(wrong_offset.headers()["range"], "0-6");

    let missing = gitlab.patch_trace(&job, None, "x").await;
    assert_eq!(missing.status(), StatusCode::BAD_REQUEST);
    assert_eq!(message(missing).await, "400 Missing header Content-Range");

    let garbage = gitlab.patch_trace(&job, Some("zero-five"), "x").await;
    assert_eq!(garbage.status(), StatusCode::BAD_REQUEST);

    let second = gitlab.patch_trace(&job, Some("6-11"), "world\n").await;
    assert_eq!(second.status(), StatusCode::ACCEPTED);
    assert_eq!(second.headers()["range"], "0-12");

    let wrong_token = gitlab
        .client
        .patch(gitlab.api(&format!("/jobs/{}/trace", job.id)))
        .header("JOB-TOKEN", "glcbt-nope")
        .header("Content-Range", "12-13")
        .body("no")
        .send()
        .await
        .unwrap();
    assert_eq!(wrong_token.status(), StatusCode::FORBIDDEN);

    let log = gitlab
        .admin(
            reqwest::Method::GET,
            &format!("/projects/{project}/jobs/{}/trace", job.id),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(log.text().await.unwrap(), "hello\nworld\n");

    gitlab.finish_job(&job, "success").await;
    let after = gitlab.patch_trace(&job, Some("12-13"), "late").await;
    assert_eq!(after.status(), StatusCode::FORBIDDEN);
    assert_eq!(after.headers()["job-status"], "success");
}

fn multipart(boundary: &str, filename: &str, data: &[u8]) -> Vec<u8> {
    let mut body = Vec::new();
    body.extend_from_slice(
        format!(
            "--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"{filename}\"\r\nContent-Type: application/octet-stream\r\n\r\n"
        )
        .as_bytes(),
    );
    body.extend_from_slice(data);
    body.extend_from_slice(format!("\r\n--{boundary}--\r\n").as_bytes());
    body
}

#[tokio::test]
async fn artifacts_are_kept_and_downloadable() {
    let gitlab = Gitlab::start_default().await;
    let project = gitlab.create_project("demo").await["id"].as_u64().unwrap();
    gitlab
        .create_pipeline(project, "stages: [build, test]\nbuild:\n  stage: build\n  script: make\n  artifacts: {paths: [out/]}\ntest:\n  stage: test\n  script: test\n")
        .await;
    let runner = gitlab.register_runner().await;
    let build = gitlab.request_job(&runner).await.unwrap();
    let data = b"PK\x03\x04 not really a zip".to_vec();
    let upload = |token: &str, body: Vec<u8>| {
        gitlab
            .client
            .post(gitlab.api(&format!(
                "/jobs/{}/artifacts?artifact_format=zip&artifact_type=archive&expire_in=1+day",
                build.id
            )))
            .header("JOB-TOKEN", token)
            .header("Content-Type", "multipart/form-data; boundary=XyZ")
            .body(body)
            .send()
    };
    assert_eq!(
        upload("glcbt-nope", multipart("XyZ", "artifacts.zip", &data))
            .await
            .unwrap()
            .status(),
        StatusCode::FORBIDDEN
    );
    let created = upload(&build.token, multipart("XyZ", "artifacts.zip", &data))
        .await
        .unwrap();
    assert_eq!(created.status(), StatusCode::CREATED);
    let duplicate = upload(&build.token, multipart("XyZ", "artifacts.zip", &data))
        .await
        .unwrap();
    assert_eq!(duplicate.status(), StatusCode::BAD_REQUEST);
    gitlab.finish_job(&build, "success").await;

    // The next stage sees it as a dependency and downloads it with its own token.
    let test = gitlab.request_job(&runner).await.unwrap();
    let dependency = &test.payload["dependencies"][0];
    assert_eq!(dependency["id"], build.id);
    assert_eq!(dependency["artifacts_file"]["filename"], "artifacts.zip");
    assert_eq!(dependency["artifacts_file"]["size"], data.len());
    let download = gitlab
        .client
        .get(gitlab.api(&format!("/jobs/{}/artifacts", build.id)))
        .header("JOB-TOKEN", &test.token)
        .send()
        .await
        .unwrap();
    assert_eq!(download.status(), StatusCode::OK);
    assert_eq!(download.bytes().await.unwrap().as_ref(), data.as_slice());
    let no_token = gitlab
        .client
        .get(gitlab.api(&format!("/jobs/{}/artifacts", build.id)))
        .send()
        .await
        .unwrap();
    assert_eq!(no_token.status(), StatusCode::UNAUTHORIZED);

    let admin = gitlab
        .admin(
            reqwest::Method::GET,
            &format!("/projects/{project}/jobs/{}/artifacts", build.id),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(admin.status(), StatusCode::OK);
    assert_eq!(admin.bytes().await.unwrap().as_ref(), data.as_slice());
    let job = gitlab.job(project, build.id).await;
    assert_eq!(job["artifacts_file"]["size"], data.len());
    assert!(job["artifacts_expire_at"].is_string());
}

#[tokio::test]
async fn bad_input_is_a_4xx_json_error_and_changes_nothing() {
    let gitlab = Gitlab::start_default().await;
    let raw = |method: reqwest::Method, path: &str, body: &'static str| {
        gitlab
            .client
            .request(method, gitlab.api(path))
            .header("PRIVATE-TOKEN", gitlab.server.admin_token())
            .header("Content-Type", "application/json")
            .body(body)
            .send()
    };
    let cases = [
        (raw(reqwest::Method::POST, "/runners", "{not json").await.unwrap(), StatusCode::BAD_REQUEST),
        (raw(reqwest::Method::POST, "/runners", "[1, 2]").await.unwrap(), StatusCode::BAD_REQUEST),
        (raw(reqwest::Method::POST, "/projects", "{\"name\": 5}").await.unwrap(), StatusCode::CREATED),
        (raw(reqwest::Method::POST, "/projects", "{\"path\": \"-bad\"}").await.unwrap(), StatusCode::BAD_REQUEST),
        (raw(reqwest::Method::POST, "/projects", "{\"name\": \"5\"}").await.unwrap(), StatusCode::BAD_REQUEST),
        (raw(reqwest::Method::GET, "/projects/77", "").await.unwrap(), StatusCode::NOT_FOUND),
        (raw(reqwest::Method::GET, "/projects/1/jobs/abc", "").await.unwrap(), StatusCode::NOT_FOUND),
        (raw(reqwest::Method::PUT, "/jobs/abc", "{}").await.unwrap(), StatusCode::NOT_FOUND),
        (raw(reqwest::Method::GET, "/no/such/route", "").await.unwrap(), StatusCode::NOT_FOUND),
        (raw(reqwest::Method::DELETE, "/jobs/request", "").await.unwrap(), StatusCode::METHOD_NOT_ALLOWED),
        (raw(reqwest::Method::POST, "/projects/1/pipeline", "{\"ref\": \"main\"}").await.unwrap(), StatusCode::BAD_REQUEST),
        (raw(reqwest::Method::POST, "/projects/1/pipeline", "{\"ref\": \"main\", \"ci_config\": \"a: [\"}").await.unwrap(), StatusCode::BAD_REQUEST),
        (
            raw(reqwest::Method::POST, "/projects/1/pipeline", "{\"ref\": \"main\", \"ci_config\": \"a:\\n  script: x\", \"variables\": [{\"key\": \"BAD KEY\", \"value\": \"v\"}]}")
                .await
                .unwrap(),
            StatusCode::BAD_REQUEST,
        ),
        (raw(reqwest::Method::POST, "/features/ci_job_telemetry", "{\"value\": \"maybe\"}").await.unwrap(), StatusCode::BAD_REQUEST),
        (raw(reqwest::Method::POST, "/features/ci_job_telemetry", "{\"value\": 101}").await.unwrap(), StatusCode::BAD_REQUEST),
    ];
    for (i, (response, expected)) in cases.into_iter().enumerate() {
        let status = response.status();
        let body: Value = response
            .json()
            .await
            .unwrap_or_else(|e| panic!("case {i}: body is not JSON: {e}"));
        assert_eq!(status, expected, "case {i}: {body}");
        if !status.is_success() {
            assert!(body["message"].is_string(), "case {i}: {body}");
        }
    }
    // Nothing but the one valid project was created; no pipeline, no flag.
    let projects = gitlab.get_json("/projects").await;
    assert_eq!(projects.as_array().unwrap().len(), 1);
    assert!(gitlab
        .get_json("/projects/1/pipelines")
        .await
        .as_array()
        .unwrap()
        .is_empty());
    assert!(gitlab
        .get_json("/features")
        .await
        .as_array()
        .unwrap()
        .is_empty());

    // Admin calls need the PRIVATE-TOKEN.
    let anonymous = gitlab
        .client
        .get(gitlab.api("/projects"))
        .send()
        .await
        .unwrap();
    assert_eq!(anonymous.status(), StatusCode::UNAUTHORIZED);
    let wrong = gitlab
        .client
        .get(gitlab.api("/projects"))
        .header("PRIVATE-TOKEN", "glpat-wrong")
        .send()
        .await
        .unwrap();
    assert_eq!(wrong.status(), StatusCode::UNAUTHORIZED);
}

#[tokio::test]
async fn oversized_bodies_are_413_json() {
    let gitlab = Gitlab::start_default().await;
    let big = format!("{{\"token\": \"{}\"}}", "x".repeat(11 * 1024 * 1024));
    let response = gitlab
        .client
        .post(gitlab.api("/runners"))
        .header("Content-Type", "application/json")
        .body(big)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::PAYLOAD_TOO_LARGE);
    assert!(response.json::<Value>().await.unwrap()["message"].is_string());
}

/// GitLab ignores a trailing slash and repeated slashes, and answers
/// `GET /api/v4/user` for the token's user: clients written against GitLab
/// rely on both (a runner registering at `/runners/`, an API client listing
/// `/features/` or setting `/features//NAME`, checking its token first).
#[tokio::test]
async fn paths_match_as_gitlab_matches_them_and_the_user_endpoint_answers() {
    let gitlab = Gitlab::start_default().await;
    let response = gitlab
        .client
        .post(gitlab.api("/runners/"))
        .json(&json!({"token": gitlab.server.registration_token()}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::CREATED, "POST /runners/");

    // The query string survives the rewrite: `value` travels in it.
    let response = gitlab
        .admin(
            reqwest::Method::POST,
            "/features//ci_job_telemetry?value=true",
        )
        .send()
        .await
        .unwrap();
    assert_eq!(
        response.status(),
        StatusCode::CREATED,
        "POST /features//NAME"
    );
    for path in ["/features/", "//features", "/features//"] {
        let response = gitlab
            .admin(reqwest::Method::GET, path)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::OK, "GET {path}");
        let list: Value = response.json().await.unwrap();
        let names: Vec<&str> = list
            .as_array()
            .unwrap()
            .iter()
            .filter_map(|f| f["name"].as_str())
            .collect();
        assert_eq!(names, ["ci_job_telemetry"], "GET {path}");
    }

    let response = gitlab
        .admin(reqwest::Method::GET, "/user")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let user: Value = response.json().await.unwrap();
    assert_eq!(user["username"], "root");
    assert_eq!(user["is_admin"], true);
    let bearer = gitlab
        .client
        .get(gitlab.api("/user/"))
        .bearer_auth(gitlab.server.admin_token())
        .send()
        .await
        .unwrap();
    assert_eq!(
        bearer.status(),
        StatusCode::OK,
        "bearer token, trailing slash"
    );
    for token in [None, Some("wrong")] {
        let mut request = gitlab.client.get(gitlab.api("/user"));
        if let Some(token) = token {
            request = request.header("PRIVATE-TOKEN", token);
        }
        let response = request.send().await.unwrap();
        assert_eq!(
            response.status(),
            StatusCode::UNAUTHORIZED,
            "token {token:?}"
        );
        assert_eq!(message(response).await, "401 Unauthorized");
    }
    // Unknown paths stay 404, with or without a slash.
    for path in ["/nothing", "/nothing/"] {
        let response = gitlab
            .admin(reqwest::Method::GET, path)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::NOT_FOUND, "GET {path}");
    }
}

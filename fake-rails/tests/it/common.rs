//! Shared test harness: a real fake-rails on a real port, driven with reqwest.

use fake_rails::{Config, RunningServer};
use reqwest::{RequestBuilder, Response, StatusCode};
use serde_json::{json, Value};

pub struct Gitlab {
    pub server: RunningServer,
    pub client: reqwest::Client,
    pub url: String,
}

/// A runner registered against the server.
#[derive(Debug, Clone)]
pub struct TestRunner {
    pub id: u64,
    pub token: String,
}

/// A job as a runner received it.
#[derive(Debug, Clone)]
pub struct ReceivedJob {
    pub id: u64,
    pub token: String,
    pub payload: Value,
}

impl Gitlab {
    pub async fn start(config: Config) -> Gitlab {
        let server = fake_rails::serve(config).await.expect("fake-rails starts");
        let url = server.url();
        Gitlab {
            server,
            client: reqwest::Client::new(),
            url,
        }
    }

    pub async fn start_default() -> Gitlab {
        Self::start(Config::default()).await
    }

    pub fn api(&self, path: &str) -> String {
        format!("{}/api/v4{path}", self.url)
    }

    /// A request with the admin `PRIVATE-TOKEN`.
    pub fn admin(&self, method: reqwest::Method, path: &str) -> RequestBuilder {
        self.client
            .request(method, self.api(path))
            .header("PRIVATE-TOKEN", self.server.admin_token())
    }

    pub async fn register_runner(&self) -> TestRunner {
        self.register_runner_with(json!({})).await
    }

    pub async fn register_runner_with(&self, extra: Value) -> TestRunner {
        let mut body =
            json!({"token": self.server.registration_token(), "description": "test runner"});
        body.as_object_mut()
            .unwrap()
            .extend(extra.as_object().unwrap().clone());
        let response = self
            .client
            .post(self.api("/runners"))
            .json(&body)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::CREATED);
        let body: Value = response.json().await.unwrap();
        TestRunner {
            id: body["id"].as_u64().unwrap(),
            token: body["token"].as_str().unwrap().to_string(),
        }
    }

    pub async fn create_project(&self, name: &str) -> Value {
        let response = self
            .admin(reqwest::Method::POST, "/projects")
            .json(&json!({"name": name}))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::CREATED);
        response.json().await.unwrap()
    }

    pub async fn try_create_pipeline(&self, project: u64, yaml: &str) -> Response {
        self.admin(
            reqwest::Method::POST,
            &format!("/projects/{project}/pipeline"),
        )
        .json(&json!({"ref": "main", "ci_config": yaml}))
        .send()
        .await
        .unwrap()
    }

    pub async fn create_pipeline(&self, project: u64, yaml: &str) -> Value {
        let response = self.try_create_pipeline(project, yaml).await;
        let status = response.status();
        let body: Value = response.json().await.unwrap();
        assert_eq!(status, StatusCode::CREATED, "{body}");
        body
    }

    pub async fn set_flag(&self, value: &str, project: Option<&str>) -> Value {
        let mut form = vec![("value", value.to_string())];
        if let Some(project) = project {
            form.push(("project", project.to_string()));
        }
        let response = self
            .admin(reqwest::Method::POST, "/features/ci_job_telemetry")
            .form(&form)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::CREATED);
        response.json().await.unwrap()
    }

    pub async fn request_job_raw(&self, runner: &TestRunner) -> Response {
        self.client
            .post(self.api("/jobs/request"))
            .json(&json!({"token": runner.token, "info": {"name": "gitlab-runner", "version": "18.6.0", "executor": "shell"}}))
            .send()
            .await
            .unwrap()
    }

    /// The next job for the runner, or `None` on 204.
    pub async fn request_job(&self, runner: &TestRunner) -> Option<ReceivedJob> {
        let response = self.request_job_raw(runner).await;
        match response.status() {
            StatusCode::NO_CONTENT => None,
            StatusCode::CREATED => {
                let payload: Value = response.json().await.unwrap();
                Some(ReceivedJob {
                    id: payload["id"].as_u64().unwrap(),
                    token: payload["token"].as_str().unwrap().to_string(),
                    payload,
                })
            }
            other => panic!("unexpected status {other} from /jobs/request"),
        }
    }

    pub async fn update_job(&self, job: &ReceivedJob, body: Value) -> Response {
        let mut body = body;
        body["token"] = json!(job.token);
        self.client
            .put(self.api(&format!("/jobs/{}", job.id)))
            .json(&body)
            .send()
            .await
            .unwrap()
    }

    pub async fn finish_job(&self, job: &ReceivedJob, state: &str) {
        let body = match state {
            "failed" => {
                json!({"state": "failed", "failure_reason": "script_failure", "exit_code": 1})
            }
            other => json!({"state": other, "exit_code": 0}),
        };
        let response = self.update_job(job, body).await;
        assert_eq!(
            response.status(),
            StatusCode::OK,
            "finishing job {}",
            job.id
        );
    }

    pub async fn patch_trace(
        &self,
        job: &ReceivedJob,
        range: Option<&str>,
        body: &str,
    ) -> Response {
        let mut request = self
            .client
            .patch(self.api(&format!("/jobs/{}/trace", job.id)))
            .header("JOB-TOKEN", &job.token)
            .header("Content-Type", "text/plain")
            .body(body.to_string());
        if let Some(range) = range {
            request = request.header("Content-Range", range);
        }
        request.send().await.unwrap()
    }

    pub async fn get_json(&self, path: &str) -> Value {
        let response = self.admin(reqwest::Method::GET, path).send().await.unwrap();
        assert_eq!(response.status(), StatusCode::OK, "GET {path}");
        response.json().await.unwrap()
    }

    pub async fn job(&self, project: u64, job: u64) -> Value {
        self.get_json(&format!("/projects/{project}/jobs/{job}"))
            .await
    }

    pub async fn pipeline(&self, project: u64, pipeline: u64) -> Value {
        self.get_json(&format!("/projects/{project}/pipelines/{pipeline}"))
            .await
    }

    /// `POST /projects/:id/jobs/:job_id/play` as the admin.
    pub async fn play_job(&self, project: u64, job: u64) -> Response {
        self.admin(
            reqwest::Method::POST,
            &format!("/projects/{project}/jobs/{job}/play"),
        )
        .send()
        .await
        .unwrap()
    }

    /// The jobs of a pipeline, as `GET .../pipelines/:id/jobs` lists them.
    pub async fn pipeline_jobs(&self, project: u64, pipeline: u64) -> Vec<Value> {
        let jobs = self
            .get_json(&format!("/projects/{project}/pipelines/{pipeline}/jobs"))
            .await;
        jobs.as_array().unwrap().clone()
    }

    /// The job of `pipeline` named `name` (it must exist).
    pub async fn pipeline_job(&self, project: u64, pipeline: u64, name: &str) -> Value {
        let jobs = self.pipeline_jobs(project, pipeline).await;
        jobs.iter()
            .find(|j| j["name"] == name)
            .unwrap_or_else(|| panic!("no job {name} in {jobs:?}"))
            .clone()
    }

    /// `{job name: status}` of a pipeline.
    pub async fn job_statuses(
        &self,
        project: u64,
        pipeline: u64,
    ) -> std::collections::BTreeMap<String, String> {
        self.pipeline_jobs(project, pipeline)
            .await
            .iter()
            .map(|j| {
                (
                    j["name"].as_str().unwrap().to_string(),
                    j["status"].as_str().unwrap().to_string(),
                )
            })
            .collect()
    }
}

/// The payload's value of a variable.
pub fn variable<'a>(payload: &'a Value, key: &str) -> Option<&'a Value> {
    payload["variables"]
        .as_array()?
        .iter()
        .rev()
        .find(|v| v["key"] == key)
}

pub use conformance::doubles::eventually;

//! 100 runners polling at once: every job of a big pipeline is handed out exactly once.

use crate::common;

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::Gitlab;

const RUNNERS: usize = 100;
const JOBS_PER_STAGE: usize = 100;
const STAGES: [&str; 3] = ["build", "test", "deploy"];

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn hundred_runners_get_every_job_exactly_once() {
    let gitlab = Arc::new(Gitlab::start_default().await);
    let project = gitlab.create_project("big").await["id"].as_u64().unwrap();
    let mut yaml = format!("stages: [{}]\n", STAGES.join(", "));
    for stage in STAGES {
        for i in 0..JOBS_PER_STAGE {
            yaml.push_str(&format!(
                "{stage}_{i}:\n  stage: {stage}\n  script: echo {i}\n"
            ));
        }
    }
    let pipeline = gitlab.create_pipeline(project, &yaml).await;
    let pipeline_id = pipeline["id"].as_u64().unwrap();
    let total = STAGES.len() * JOBS_PER_STAGE;

    let mut runners = Vec::new();
    for _ in 0..RUNNERS {
        runners.push(gitlab.register_runner().await);
    }
    let handed_out = Arc::new(Mutex::new(Vec::<(u64, String)>::new()));
    let mut tasks = Vec::new();
    for runner in runners {
        let gitlab = Arc::clone(&gitlab);
        let handed_out = Arc::clone(&handed_out);
        tasks.push(tokio::spawn(async move {
            while handed_out.lock().unwrap().len() < total {
                match gitlab.request_job(&runner).await {
                    Some(job) => {
                        let stage = job.payload["job_info"]["stage"]
                            .as_str()
                            .unwrap()
                            .to_string();
                        handed_out.lock().unwrap().push((job.id, stage));
                        gitlab.finish_job(&job, "success").await;
                    }
                    None => tokio::task::yield_now().await,
                }
            }
        }));
    }
    // A deadline for a pipeline that never drains, not a timing claim.
    let drained = tokio::time::timeout(Duration::from_secs(60), async {
        for task in tasks {
            task.await.expect("runner task");
        }
    })
    .await;
    assert!(
        drained.is_ok(),
        "runners did not drain the pipeline in time"
    );

    let handed_out = handed_out.lock().unwrap().clone();
    let ids: BTreeSet<u64> = handed_out.iter().map(|(id, _)| *id).collect();
    assert_eq!(
        handed_out.len(),
        total,
        "no job handed out twice, none missed"
    );
    assert_eq!(ids.len(), total, "no duplicates");

    let jobs = gitlab
        .get_json(&format!("/projects/{project}/pipelines/{pipeline_id}/jobs"))
        .await;
    let expected: BTreeSet<u64> = jobs
        .as_array()
        .unwrap()
        .iter()
        .map(|j| j["id"].as_u64().unwrap())
        .collect();
    assert_eq!(ids, expected);
    assert!(jobs
        .as_array()
        .unwrap()
        .iter()
        .all(|j| j["status"] == "success"));
    assert_eq!(
        gitlab.pipeline(project, pipeline_id).await["status"],
        "success"
    );

    // Stage order held under concurrency: no test job before every build job finished...
    // which shows as: the first `test` job handed out comes after the last `build` one.
    let position = |stage: &str, last: bool| {
        let mut it = handed_out
            .iter()
            .enumerate()
            .filter(|(_, (_, s))| s == stage)
            .map(|(i, _)| i);
        if last {
            it.next_back().unwrap()
        } else {
            it.next().unwrap()
        }
    };
    assert!(position("build", true) < position("test", false));
    assert!(position("test", true) < position("deploy", false));
}

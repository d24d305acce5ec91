//! JSON shapes of GitLab's REST API entities (projects, pipelines, jobs, runners).

use serde_json::{json, Value};
use time::OffsetDateTime;

use crate::app::Settings;
use crate::app_state::format_time;
use crate::state::{Job, JobStatus, Pipeline, Project, Runner, Store};

fn time_or_null(t: Option<OffsetDateTime>) -> Value {
    t.map(format_time).map(Value::String).unwrap_or(Value::Null)
}

fn seconds(from: Option<OffsetDateTime>, to: Option<OffsetDateTime>) -> Value {
    match (from, to) {
        (Some(from), Some(to)) => {
            json!(((to - from).as_seconds_f64().max(0.0) * 1000.0).round() / 1000.0)
        }
        _ => Value::Null,
    }
}

pub fn user(settings: &Settings) -> Value {
    json!({
        "id": 1,
        "username": "root",
        "name": "Administrator",
        "state": "active",
        "web_url": format!("{}/root", settings.public_url),
    })
}

pub fn project(p: &Project, settings: &Settings) -> Value {
    let full_path = p.full_path();
    let web_url = format!("{}/{full_path}", settings.public_url);
    json!({
        "id": p.id,
        "name": p.name,
        "name_with_namespace": format!("{} / {}", p.namespace, p.name),
        "path": p.path,
        "path_with_namespace": full_path,
        "description": p.description,
        "default_branch": p.default_branch,
        "visibility": "private",
        "created_at": format_time(p.created_at),
        "web_url": web_url,
        "http_url_to_repo": format!("{web_url}.git"),
        "namespace": {"id": 1, "name": p.namespace, "path": p.namespace, "kind": "user", "full_path": p.namespace},
        "build_timeout": p.build_timeout,
        "ci_config_path": null,
        "repository_path": p.repository.as_ref().map(|r| r.display().to_string()),
    })
}

fn pipeline_web_url(p: &Pipeline, store: &Store, settings: &Settings) -> String {
    let full_path = store
        .projects
        .get(&p.project_id)
        .map(Project::full_path)
        .unwrap_or_default();
    format!("{}/{full_path}/-/pipelines/{}", settings.public_url, p.id)
}

/// The short pipeline object embedded in jobs and lists.
pub fn pipeline_basic(p: &Pipeline, store: &Store, settings: &Settings) -> Value {
    json!({
        "id": p.id,
        "iid": p.iid,
        "project_id": p.project_id,
        "sha": p.commit.sha,
        "ref": p.git_ref,
        "status": p.status,
        "source": p.source,
        "created_at": format_time(p.created_at),
        "updated_at": format_time(p.updated_at),
        "web_url": pipeline_web_url(p, store, settings),
    })
}

pub fn pipeline(p: &Pipeline, store: &Store, settings: &Settings, now: OffsetDateTime) -> Value {
    let mut v = pipeline_basic(p, store, settings);
    let first_queued = p
        .job_ids
        .iter()
        .filter_map(|id| store.jobs.get(id))
        .filter_map(|j| j.queued_at)
        .min();
    let extra = json!({
        "before_sha": p.commit.before_sha,
        "tag": p.tag,
        "yaml_errors": null,
        "user": user(settings),
        "started_at": time_or_null(p.started_at),
        "finished_at": time_or_null(p.finished_at),
        "committed_at": if p.commit.timestamp.is_empty() { Value::Null } else { json!(p.commit.timestamp) },
        "duration": seconds(p.started_at, p.finished_at.or(p.started_at.map(|_| now))),
        "queued_duration": seconds(first_queued, p.started_at.or(first_queued.map(|_| now))),
        "coverage": null,
        "root_pipeline_id": p.root_id,
    });
    if let (Value::Object(base), Value::Object(extra)) = (&mut v, extra) {
        base.extend(extra);
    }
    v
}

pub fn runner(r: &Runner) -> Value {
    json!({
        "id": r.id,
        "description": r.description,
        "ip_address": null,
        "active": !r.paused,
        "paused": r.paused,
        "is_shared": true,
        "runner_type": "instance_type",
        "locked": r.locked,
        "access_level": r.access_level,
        "created_at": format_time(r.created_at),
        "contacted_at": time_or_null(r.contacted_at),
        "name": r.info.get("name").cloned().unwrap_or(Value::Null),
        "online": true,
        "status": "online",
    })
}

pub fn job(j: &Job, store: &Store, settings: &Settings, now: OffsetDateTime) -> Value {
    let pipeline = store.pipelines.get(&j.pipeline_id);
    let full_path = store
        .projects
        .get(&j.project_id)
        .map(Project::full_path)
        .unwrap_or_default();
    let running_end = match j.status {
        JobStatus::Running => Some(now),
        _ => j.finished_at,
    };
    let queued_end = match j.status {
        JobStatus::Pending => Some(now),
        _ => j.started_at,
    };
    let commit = pipeline.map(|p| {
        json!({
            "id": p.commit.sha,
            "short_id": p.commit.sha.chars().take(8).collect::<String>(),
            "title": p.commit.title(),
            "message": p.commit.message,
            "author_name": p.commit.author_name,
            "author_email": p.commit.author_email,
            "created_at": p.commit.timestamp,
        })
    });
    let mut v = json!({
        "id": j.id,
        "name": j.spec.name,
        "stage": j.spec.stage,
        "status": j.status.as_str(),
        "ref": pipeline.map(|p| p.git_ref.clone()),
        "tag": pipeline.is_some_and(|p| p.tag),
        "coverage": null,
        "allow_failure": j.allow_failure(),
        "created_at": format_time(j.created_at),
        "started_at": time_or_null(j.started_at),
        "finished_at": time_or_null(j.finished_at),
        "erased_at": null,
        "duration": seconds(j.started_at, running_end),
        "queued_duration": seconds(j.queued_at, queued_end),
        "user": user(settings),
        "commit": commit,
        "pipeline": pipeline.map(|p| pipeline_basic(p, store, settings)),
        "web_url": format!("{}/{full_path}/-/jobs/{}", settings.public_url, j.id),
        "project": {"ci_job_token_scope_enabled": false},
        "artifacts": j.artifacts.iter().map(|a| json!({
            "file_type": a.artifact_type,
            "size": a.data.len(),
            "filename": a.filename,
            "file_format": a.artifact_format,
        })).collect::<Vec<_>>(),
        "artifacts_expire_at": time_or_null(j.archive().and_then(|a| a.expire_at)),
        "archived": false,
        "tag_list": j.spec.tags,
        "when": j.spec.when.as_str(),
        "runner": j.runner_id.and_then(|id| store.runners.get(&id)).map(runner),
        "runner_manager": null,
    });
    if let Value::Object(map) = &mut v {
        if let Some(archive) = j.archive() {
            map.insert(
                "artifacts_file".into(),
                json!({"filename": archive.filename, "size": archive.data.len()}),
            );
        }
        if j.status == JobStatus::Failed {
            map.insert("failure_reason".into(), json!(j.failure_reason));
        }
    }
    v
}

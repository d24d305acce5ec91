//! The job payload of `POST /api/v4/jobs/request` (GitLab Runner's
//! `spec.Job`), read leniently: unknown fields are ignored, missing optional
//! fields take defaults, and a field of the wrong type is treated as missing
//! unless the job cannot run without it (`id`, `token`, `steps`).
//!
//! A model: this module imports nothing from the rest of the runner. The
//! CI Functions of `run` are parsed here ([`parse_run`]); [`crate::functions`]
//! resolves and runs them.

use std::collections::BTreeMap;

use serde_json::{Map, Value};

use runner_telemetry::job::JobSpanInfo;
use runner_telemetry::secrets::strip_credentials;

/// Default job timeout when `runner_info.timeout` is missing (GitLab's).
pub const DEFAULT_JOB_TIMEOUT_SECS: u64 = 3600;
/// The longest timeout a job (or one of its steps) can have: GitLab refuses
/// more (`Project::MAX_BUILD_TIMEOUT`, one month of 30.436875 days, the bound
/// of the project setting and of the `timeout` keyword); a larger value in
/// a payload is clamped to it, so no deadline can overflow.
pub const MAX_JOB_TIMEOUT_SECS: u64 = 2_629_746;
/// Caches a job can have (GitLab's `cache` keyword allows four); more in a
/// payload are ignored.
pub const MAX_CACHES: usize = 4;

#[derive(Clone, Default, PartialEq)]
pub struct JobPayload {
    pub id: i64,
    pub token: String,
    pub allow_git_fetch: bool,
    pub job_info: JobInfo,
    pub git_info: GitInfo,
    /// `runner_info.timeout`, seconds.
    pub timeout_secs: u64,
    pub variables: Vec<Variable>,
    pub steps: Vec<Step>,
    /// `image.name`, if any (the shell executor ignores it).
    pub image: Option<String>,
    /// `cache[]` (GitLab allows up to 4).
    pub caches: Vec<CacheEntry>,
    /// `artifacts[]`: the archive and any reports.
    pub artifacts: Vec<ArtifactEntry>,
    /// `run` (CI Functions), in order; `None` when the job has a script.
    pub run: Option<Vec<FunctionCall>>,
}

impl std::fmt::Debug for JobPayload {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The job token never reaches a log, even through `{:?}`.
        f.debug_struct("JobPayload")
            .field("id", &self.id)
            .field("job_info", &self.job_info)
            .field("git_info", &self.git_info)
            .field("timeout_secs", &self.timeout_secs)
            .field("variables", &self.variables)
            .field("steps", &self.steps)
            .field("image", &self.image)
            .field("caches", &self.caches)
            .field("artifacts", &self.artifacts)
            .field("run", &self.run.as_ref().map(Vec::len))
            .finish_non_exhaustive()
    }
}

/// One `cache` entry of the payload.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CacheEntry {
    /// As sent (variables are expanded by the runner).
    pub key: String,
    pub untracked: bool,
    pub paths: Vec<String>,
    /// `pull-push` (default), `pull` or `push`.
    pub policy: String,
    /// `on_success` (default), `on_failure` or `always`.
    pub when: String,
    pub fallback_keys: Vec<String>,
}

/// One `artifacts` entry of the payload.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ArtifactEntry {
    /// Empty when not given (the runner then uses `artifacts`).
    pub name: String,
    pub untracked: bool,
    pub paths: Vec<String>,
    pub exclude: Vec<String>,
    /// `on_success` (default), `on_failure` or `always`.
    pub when: String,
    pub expire_in: Option<String>,
    /// `archive` (default), `junit`, `dotenv`, ...
    pub artifact_type: String,
    /// `zip` (default) or `gzip`.
    pub artifact_format: String,
}

#[derive(Debug, Clone, Default, PartialEq)]
pub struct JobInfo {
    pub name: String,
    pub stage: String,
    pub pipeline_id: Option<i64>,
    pub project_id: Option<i64>,
    pub project_name: String,
    pub project_full_path: String,
    pub time_in_queue_seconds: Option<f64>,
}

#[derive(Clone, Default, PartialEq)]
pub struct GitInfo {
    pub repo_url: String,
    pub git_ref: String,
    pub sha: String,
    pub before_sha: String,
    pub ref_type: String,
    pub refspecs: Vec<String>,
    pub depth: i64,
}

impl std::fmt::Debug for GitInfo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GitInfo")
            .field("repo_url", &strip_credentials(&self.repo_url))
            .field("git_ref", &self.git_ref)
            .field("sha", &self.sha)
            .field("depth", &self.depth)
            .finish_non_exhaustive()
    }
}

#[derive(Clone, Default, PartialEq)]
pub struct Variable {
    pub key: String,
    pub value: String,
    pub public: bool,
    pub masked: bool,
    pub file: bool,
    pub raw: bool,
}

impl std::fmt::Debug for Variable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Values never reach a log, even through `{:?}`.
        f.debug_struct("Variable")
            .field("key", &self.key)
            .field("masked", &self.masked)
            .field("file", &self.file)
            .field("raw", &self.raw)
            .finish_non_exhaustive()
    }
}

#[derive(Debug, Clone, Default, PartialEq)]
pub struct Step {
    /// `script`, `after_script`, `release`, ...
    pub name: String,
    pub script: Vec<String>,
    pub timeout_secs: Option<u64>,
    /// `on_success`, `on_failure`, `always`.
    pub when: String,
    pub allow_failure: bool,
}

/// Why a payload cannot be run, and, when they could be read, the job's ID
/// and token so the failure can still be reported to GitLab.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PayloadError {
    pub message: String,
    pub id_and_token: Option<(i64, String)>,
}

impl std::fmt::Display for PayloadError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

fn int(v: Option<&Value>) -> Option<i64> {
    match v? {
        Value::Number(n) => n.as_i64().or_else(|| n.as_f64().map(|f| f as i64)),
        Value::String(s) => s.trim().parse().ok(),
        _ => None,
    }
}

fn float(v: Option<&Value>) -> Option<f64> {
    match v? {
        Value::Number(n) => n.as_f64(),
        Value::String(s) => s.trim().parse().ok(),
        _ => None,
    }
}

fn text(v: Option<&Value>) -> String {
    match v {
        Some(Value::String(s)) => s.clone(),
        Some(Value::Number(n)) => n.to_string(),
        Some(Value::Bool(b)) => b.to_string(),
        _ => String::new(),
    }
}

fn flag(v: Option<&Value>) -> bool {
    match v {
        Some(Value::Bool(b)) => *b,
        Some(Value::String(s)) => s == "true",
        _ => false,
    }
}

fn object(v: Option<&Value>) -> Map<String, Value> {
    match v {
        Some(Value::Object(o)) => o.clone(),
        _ => Map::new(),
    }
}

/// A list of strings; a single string is a list of one; other items are
/// skipped.
fn strings(v: Option<&Value>) -> Vec<String> {
    match v {
        Some(Value::String(s)) => vec![s.clone()],
        Some(Value::Array(items)) => items
            .iter()
            .filter_map(|i| i.as_str().map(String::from))
            .collect(),
        _ => Vec::new(),
    }
}

fn text_or(v: Option<&Value>, default: &str) -> String {
    let t = text(v);
    if t.is_empty() {
        default.to_string()
    } else {
        t
    }
}

/// The objects of an array field; anything else is no entries.
fn entries(v: Option<&Value>) -> Vec<Map<String, Value>> {
    match v {
        Some(Value::Array(items)) => items
            .iter()
            .filter_map(|i| i.as_object().cloned())
            .collect(),
        _ => Vec::new(),
    }
}

impl JobPayload {
    pub fn from_value(value: &Value) -> Result<JobPayload, PayloadError> {
        let Some(root) = value.as_object() else {
            return Err(PayloadError {
                message: "the job payload is not a JSON object".into(),
                id_and_token: None,
            });
        };
        let id = int(root.get("id"));
        let token = match root.get("token") {
            Some(Value::String(t)) if !t.is_empty() => Some(t.clone()),
            _ => None,
        };
        let (id, token) = match (id, token) {
            (Some(id), Some(token)) => (id, token),
            (None, _) => {
                return Err(PayloadError {
                    message: "the job payload has no numeric `id`".into(),
                    id_and_token: None,
                })
            }
            (Some(_), None) => {
                return Err(PayloadError {
                    message: "the job payload has no `token`".into(),
                    id_and_token: None,
                })
            }
        };
        let fail = |message: String| PayloadError {
            message,
            id_and_token: Some((id, token.clone())),
        };

        let info = object(root.get("job_info"));
        let job_info = JobInfo {
            name: text(info.get("name")),
            stage: text(info.get("stage")),
            pipeline_id: int(info.get("pipeline_id")),
            project_id: int(info.get("project_id")),
            project_name: text(info.get("project_name")),
            project_full_path: text(info.get("project_full_path")),
            time_in_queue_seconds: float(info.get("time_in_queue_seconds")),
        };
        let git = object(root.get("git_info"));
        let git_info = GitInfo {
            repo_url: text(git.get("repo_url")),
            git_ref: text(git.get("ref")),
            sha: text(git.get("sha")),
            before_sha: text(git.get("before_sha")),
            ref_type: text(git.get("ref_type")),
            refspecs: match git.get("refspecs") {
                Some(Value::Array(a)) => a
                    .iter()
                    .filter_map(|v| v.as_str().map(String::from))
                    .collect(),
                _ => Vec::new(),
            },
            depth: int(git.get("depth")).unwrap_or(0).max(0),
        };
        let runner_info = object(root.get("runner_info"));
        let timeout_secs = int(runner_info.get("timeout"))
            .filter(|t| *t > 0)
            .map(|t| (t as u64).min(MAX_JOB_TIMEOUT_SECS))
            .unwrap_or(DEFAULT_JOB_TIMEOUT_SECS);

        let variables = match root.get("variables") {
            Some(Value::Array(items)) => items
                .iter()
                .filter_map(|v| v.as_object())
                .filter_map(|v| {
                    let key = text(v.get("key"));
                    if key.is_empty() {
                        return None;
                    }
                    Some(Variable {
                        key,
                        value: text(v.get("value")),
                        public: flag(v.get("public")),
                        masked: flag(v.get("masked")),
                        file: flag(v.get("file")),
                        raw: flag(v.get("raw")),
                    })
                })
                .collect(),
            _ => Vec::new(),
        };

        let steps = match root.get("steps") {
            None | Some(Value::Null) => Vec::new(),
            Some(Value::Array(items)) => {
                let mut steps = Vec::new();
                for (i, item) in items.iter().enumerate() {
                    let Some(step) = item.as_object() else {
                        return Err(fail(format!("steps[{i}] is not an object")));
                    };
                    let script = match step.get("script") {
                        None | Some(Value::Null) => Vec::new(),
                        Some(Value::Array(lines)) => {
                            let mut script = Vec::new();
                            for line in lines {
                                match line {
                                    Value::String(s) => script.push(s.clone()),
                                    _ => {
                                        return Err(fail(format!(
                                            "steps[{i}].script has a line that is not a string"
                                        )))
                                    }
                                }
                            }
                            script
                        }
                        Some(_) => return Err(fail(format!("steps[{i}].script is not an array"))),
                    };
                    let when = text(step.get("when"));
                    steps.push(Step {
                        name: text(step.get("name")),
                        script,
                        timeout_secs: int(step.get("timeout"))
                            .filter(|t| *t > 0)
                            .map(|t| (t as u64).min(MAX_JOB_TIMEOUT_SECS)),
                        when: if when.is_empty() {
                            "on_success".into()
                        } else {
                            when
                        },
                        allow_failure: flag(step.get("allow_failure")),
                    });
                }
                steps
            }
            Some(_) => return Err(fail("`steps` is not an array".into())),
        };

        let image = match root.get("image") {
            Some(Value::Object(image)) => Some(text(image.get("name"))).filter(|n| !n.is_empty()),
            Some(Value::String(name)) if !name.is_empty() => Some(name.clone()),
            _ => None,
        };
        let caches = entries(root.get("cache"))
            .iter()
            .take(MAX_CACHES)
            .map(|c| CacheEntry {
                key: text_or(c.get("key"), "default"),
                untracked: flag(c.get("untracked")),
                paths: strings(c.get("paths")),
                policy: text_or(c.get("policy"), "pull-push"),
                when: text_or(c.get("when"), "on_success"),
                fallback_keys: strings(c.get("fallback_keys")),
            })
            .collect();
        let artifacts = entries(root.get("artifacts"))
            .iter()
            .map(|a| ArtifactEntry {
                name: text(a.get("name")),
                untracked: flag(a.get("untracked")),
                paths: strings(a.get("paths")),
                exclude: strings(a.get("exclude")),
                when: text_or(a.get("when"), "on_success"),
                expire_in: Some(text(a.get("expire_in"))).filter(|e| !e.is_empty()),
                artifact_type: text_or(a.get("artifact_type"), "archive"),
                artifact_format: text_or(a.get("artifact_format"), "zip"),
            })
            .collect();
        let run = match root.get("run") {
            None | Some(Value::Null) => None,
            Some(Value::String(s)) if s.trim().is_empty() => None,
            Some(value) => Some(parse_run(value).map_err(|e| fail(format!("`run`: {e}")))?),
        };

        Ok(JobPayload {
            id,
            token,
            allow_git_fetch: flag(root.get("allow_git_fetch")),
            job_info,
            git_info,
            timeout_secs,
            variables,
            steps,
            image,
            caches,
            artifacts,
            run,
        })
    }

    /// The value of a job variable, if set.
    pub fn variable(&self, key: &str) -> Option<&str> {
        self.variables
            .iter()
            .rev()
            .find(|v| v.key == key)
            .map(|v| v.value.as_str())
    }

    pub fn step(&self, name: &str) -> Option<&Step> {
        self.steps.iter().find(|s| s.name == name)
    }

    /// Values that must never leave the process: masked variables and the
    /// job token.
    pub fn secrets(&self) -> Vec<String> {
        let mut secrets: Vec<String> = self
            .variables
            .iter()
            .filter(|v| v.masked && !v.value.is_empty())
            .map(|v| v.value.clone())
            .collect();
        secrets.push(self.token.clone());
        secrets
    }

    /// What the `job_execution` span says about this job.
    pub fn span_info(&self, gitlab_url: &str) -> JobSpanInfo {
        let non_empty = |s: &str| (!s.is_empty()).then(|| s.to_string());
        let project_path = non_empty(&self.job_info.project_full_path);
        let job_url = project_path.as_ref().map(|p| {
            format!(
                "{}/{p}/-/jobs/{}",
                gitlab_url.trim_end_matches('/'),
                self.id
            )
        });
        JobSpanInfo {
            job_id: self.id,
            job_name: self.job_info.name.clone(),
            stage: self.job_info.stage.clone(),
            pipeline_id: self.job_info.pipeline_id,
            pipeline_source: self.variable("CI_PIPELINE_SOURCE").and_then(non_empty),
            project_id: self.job_info.project_id,
            project_path,
            git_ref: non_empty(&self.git_info.git_ref),
            sha: non_empty(&self.git_info.sha),
            repo_url: non_empty(&self.git_info.repo_url),
            job_url,
        }
    }
}

/// One invocation in `run`.
#[derive(Clone, PartialEq)]
pub struct FunctionCall {
    pub name: String,
    pub kind: FunctionKind,
    pub inputs: BTreeMap<String, Value>,
    pub env: Vec<(String, String)>,
}

impl std::fmt::Debug for FunctionCall {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Input and env values may be secrets: names only.
        f.debug_struct("FunctionCall")
            .field("name", &self.name)
            .field("kind", &self.kind)
            .field("inputs", &self.inputs.keys().collect::<Vec<_>>())
            .field("env", &self.env.iter().map(|(k, _)| k).collect::<Vec<_>>())
            .finish()
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FunctionKind {
    /// `script:` lines.
    Script(Vec<String>),
    /// `step:` or `func:` (the keyword) and the reference.
    Reference {
        keyword: &'static str,
        reference: String,
    },
}

impl FunctionCall {
    /// `script`, `step` or `func`.
    pub fn kind_name(&self) -> &'static str {
        match &self.kind {
            FunctionKind::Script(_) => "script",
            FunctionKind::Reference { keyword, .. } => keyword,
        }
    }

    /// `v1` for `name@v1`; `local` for scripts and local paths; empty for a
    /// remote reference without a version.
    pub fn version(&self) -> String {
        match &self.kind {
            FunctionKind::Script(_) => "local".into(),
            FunctionKind::Reference { reference, .. } if is_local(reference) => "local".into(),
            FunctionKind::Reference { reference, .. } => {
                split_version(reference).1.unwrap_or_default().to_string()
            }
        }
    }

    /// The reference without its version, credentials stripped.
    pub fn reference(&self) -> Option<String> {
        match &self.kind {
            FunctionKind::Script(_) => None,
            FunctionKind::Reference { reference, .. } if is_local(reference) => {
                Some(reference.clone())
            }
            FunctionKind::Reference { reference, .. } => {
                Some(strip_credentials(split_version(reference).0))
            }
        }
    }

    /// Input names, sorted.
    pub fn input_names(&self) -> Vec<String> {
        self.inputs.keys().cloned().collect()
    }
}

pub(crate) fn is_local(reference: &str) -> bool {
    reference.starts_with("./") || reference.starts_with("../") || reference.starts_with('/')
}

/// `gitlab.com/org/fn@v1` -> (`gitlab.com/org/fn`, `v1`). An `@` before the
/// last `/` (credentials in a URL) is not a version.
pub(crate) fn split_version(reference: &str) -> (&str, Option<&str>) {
    match reference.rsplit_once('@') {
        Some((base, version)) if !version.contains('/') && !version.is_empty() => {
            (base, Some(version))
        }
        _ => (reference, None),
    }
}

/// Reads `run`: a JSON string holding the list, or the list itself.
pub fn parse_run(value: &Value) -> Result<Vec<FunctionCall>, String> {
    let parsed;
    let list = match value {
        Value::String(text) => {
            parsed = serde_json::from_str::<Value>(text)
                .map_err(|e| format!("is not valid JSON: {e}"))?;
            &parsed
        }
        other => other,
    };
    let Value::Array(items) = list else {
        return Err("is not a list of functions".into());
    };
    if items.is_empty() {
        return Err("is an empty list".into());
    }
    items
        .iter()
        .enumerate()
        .map(|(i, item)| parse_call(item).map_err(|e| format!("run[{i}] {e}")))
        .collect()
}

fn parse_call(item: &Value) -> Result<FunctionCall, String> {
    let Value::Object(call) = item else {
        return Err("is not an object".into());
    };
    let name = match call.get("name") {
        Some(Value::String(n)) if !n.trim().is_empty() => n.trim().to_string(),
        _ => return Err("has no `name`".into()),
    };
    let script = call.get("script").filter(|v| !v.is_null());
    let step = call.get("step").filter(|v| !v.is_null());
    let func = call.get("func").filter(|v| !v.is_null());
    let kind = match (script, step, func) {
        (Some(script), None, None) => FunctionKind::Script(match script {
            Value::String(s) => vec![s.clone()],
            Value::Array(lines) => lines
                .iter()
                .map(|l| {
                    l.as_str()
                        .map(String::from)
                        .ok_or_else(|| format!("(`{name}`) has a script line that is not a string"))
                })
                .collect::<Result<_, _>>()?,
            _ => return Err(format!("(`{name}`) script is not a string or a list")),
        }),
        (None, Some(reference), None) | (None, None, Some(reference)) => {
            let keyword = if step.is_some() { "step" } else { "func" };
            match reference {
                Value::String(r) if !r.trim().is_empty() => FunctionKind::Reference {
                    keyword,
                    reference: r.trim().to_string(),
                },
                _ => return Err(format!("(`{name}`) {keyword} is not a reference string")),
            }
        }
        _ => {
            return Err(format!(
                "(`{name}`) needs exactly one of `script`, `step` or `func`"
            ))
        }
    };
    let inputs = match call.get("inputs") {
        None | Some(Value::Null) => BTreeMap::new(),
        Some(Value::Object(inputs)) => inputs.iter().map(|(k, v)| (k.clone(), v.clone())).collect(),
        Some(_) => return Err(format!("(`{name}`) inputs is not an object")),
    };
    let env = match call.get("env") {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::Object(env)) => env
            .iter()
            .map(|(k, v)| (k.clone(), value_text(v)))
            .collect(),
        Some(_) => return Err(format!("(`{name}`) env is not an object")),
    };
    Ok(FunctionCall {
        name,
        kind,
        inputs,
        env,
    })
}

/// A value as text: strings as they are, anything else as JSON.
pub(crate) fn value_text(value: &Value) -> String {
    match value {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn counts_and_sizes_are_bounded() {
        let caches: Vec<Value> = (0..10).map(|i| json!({"key": format!("k{i}")})).collect();
        let payload = JobPayload::from_value(&json!({
            "id": 1, "token": "t", "cache": caches, "git_info": {"depth": -5},
            "steps": [{"name": "script", "script": ["true"], "timeout": 1e300}],
        }))
        .unwrap();
        assert_eq!(payload.caches.len(), MAX_CACHES);
        assert_eq!(payload.git_info.depth, 0);
        assert_eq!(payload.steps[0].timeout_secs, Some(MAX_JOB_TIMEOUT_SECS));
    }

    fn check(input: Value, expected: &str) {
        let actual = match JobPayload::from_value(&input) {
            Ok(p) => format!(
                "ok id={} name={} pipeline={:?} timeout={} vars={} steps={}",
                p.id,
                p.job_info.name,
                p.job_info.pipeline_id,
                p.timeout_secs,
                p.variables
                    .iter()
                    .map(|v| v.key.as_str())
                    .collect::<Vec<_>>()
                    .join(","),
                p.steps
                    .iter()
                    .map(|s| format!("{}:{}:{}", s.name, s.when, s.script.join(";")))
                    .collect::<Vec<_>>()
                    .join("|")
            ),
            Err(e) => format!(
                "error({}) {e}",
                e.id_and_token
                    .as_ref()
                    .map(|(id, _)| id.to_string())
                    .unwrap_or("-".into())
            ),
        };
        assert_eq!(actual, expected);
    }

    #[test]
    fn payloads() {
        check(
            json!({"id": 7, "token": "t", "job_info": {"name": "build", "pipeline_id": 3, "extra": 1},
                   "runner_info": {"timeout": 60}, "variables": [{"key": "A", "value": "1"}, {"value": "nokey"}, 5],
                   "steps": [{"name": "script", "script": ["echo hi", "ls"], "timeout": 60, "when": "on_success"},
                             {"name": "after_script", "script": ["echo bye"], "when": "always"}],
                   "unknown_field": {"x": 1}}),
            "ok id=7 name=build pipeline=Some(3) timeout=60 vars=A steps=script:on_success:echo hi;ls|after_script:always:echo bye",
        );
        // Lenient types: string IDs, missing sections, wrong-typed optional fields.
        check(
            json!({"id": 9, "token": "t", "runner_info": {"timeout": 18446744073709551615_u64}}),
            "ok id=9 name= pipeline=None timeout=2629746 vars= steps=",
        );
        check(
            json!({"id": 10, "token": "t", "runner_info": {"timeout": 1e300}}),
            "ok id=10 name= pipeline=None timeout=2629746 vars= steps=",
        );
        check(
            json!({"id": "8", "token": "t", "job_info": "oops", "runner_info": {"timeout": "x"}, "variables": {}}),
            "ok id=8 name= pipeline=None timeout=3600 vars= steps=",
        );
        check(
            json!({"token": "t"}),
            "error(-) the job payload has no numeric `id`",
        );
        check(json!({"id": 1}), "error(-) the job payload has no `token`");
        check(
            json!("job"),
            "error(-) the job payload is not a JSON object",
        );
        check(
            json!({"id": 1, "token": "t", "steps": "echo"}),
            "error(1) `steps` is not an array",
        );
        check(
            json!({"id": 1, "token": "t", "steps": [{"name": "script", "script": [1]}]}),
            "error(1) steps[0].script has a line that is not a string",
        );
        check(
            json!({"id": 1, "token": "t", "steps": [{"name": "script", "script": "echo"}]}),
            "error(1) steps[0].script is not an array",
        );
    }

    #[test]
    fn secrets_and_span_info() {
        let p = JobPayload::from_value(&json!({
            "id": 42, "token": "job-token-123",
            "job_info": {"name": "test", "stage": "test", "pipeline_id": 5, "project_id": 6, "project_full_path": "g/p"},
            "git_info": {"repo_url": "https://gitlab-ci-token:job-token-123@gitlab.example.com/g/p.git", "ref": "main", "sha": "abc"},
            "variables": [{"key": "PASSWORD", "value": "hunter22", "masked": true},
                          {"key": "CI_PIPELINE_SOURCE", "value": "push"},
                          {"key": "EMPTY", "value": "", "masked": true}]
        }))
        .unwrap();
        assert_eq!(
            p.secrets(),
            vec!["hunter22".to_string(), "job-token-123".to_string()]
        );
        let info = p.span_info("http://gitlab.example.com/");
        assert_eq!(info.pipeline_source.as_deref(), Some("push"));
        assert_eq!(
            info.job_url.as_deref(),
            Some("http://gitlab.example.com/g/p/-/jobs/42")
        );
        assert!(!format!("{p:?}").contains("hunter22"));
    }
}

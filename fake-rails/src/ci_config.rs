//! The common subset of `.gitlab-ci.yml` that fake-rails understands.
//!
//! Parsing goes YAML text -> `serde_yaml::Value` (anchors resolved, `<<`
//! merge keys applied) -> `extends` and `default` resolved on the raw
//! mappings -> typed [`CiConfig`]. Every error names the key it is about,
//! GitLab style (`jobs:build config contains unknown keys: scriptt`), and the
//! line when it can be found; a YAML syntax error names its line and column.

use std::collections::{HashMap, HashSet};
use std::fmt;

use serde_yaml::{Mapping, Value};

/// The stages GitLab uses when a config has no `stages:`.
pub const DEFAULT_STAGES: [&str; 3] = ["build", "test", "deploy"];

/// A parsed pipeline configuration.
#[derive(Debug, Clone, PartialEq)]
pub struct CiConfig {
    /// All stages in order, `.pre` first and `.post` last.
    pub stages: Vec<String>,
    /// Global `variables:`.
    pub variables: Vec<YamlVariable>,
    /// Visible jobs in file order; `when: never` jobs are left out.
    pub jobs: Vec<JobSpec>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct YamlVariable {
    pub key: String,
    pub value: String,
    /// `expand: false`.
    pub raw: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum When {
    OnSuccess,
    OnFailure,
    Always,
    Manual,
}

impl When {
    pub fn as_str(self) -> &'static str {
        match self {
            When::OnSuccess => "on_success",
            When::OnFailure => "on_failure",
            When::Always => "always",
            When::Manual => "manual",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct AllowFailure {
    pub allowed: bool,
    /// With `allow_failure: {exit_codes: [...]}`, only these exit codes are allowed to fail.
    pub exit_codes: Vec<i64>,
}

impl AllowFailure {
    /// Whether a failure with this exit code is tolerated.
    pub fn tolerates(&self, exit_code: Option<i64>) -> bool {
        if self.allowed {
            return true;
        }
        matches!(exit_code, Some(code) if self.exit_codes.contains(&code))
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct ArtifactSpec {
    pub name: Option<String>,
    pub untracked: bool,
    pub paths: Vec<String>,
    pub exclude: Vec<String>,
    pub when: String,
    pub expire_in: Option<String>,
    pub artifact_type: String,
    pub artifact_format: String,
}

#[derive(Debug, Clone, PartialEq)]
pub enum CacheKey {
    Literal(String),
    Files {
        files: Vec<String>,
        prefix: Option<String>,
    },
}

#[derive(Debug, Clone, PartialEq)]
pub struct CacheSpec {
    pub key: CacheKey,
    pub untracked: bool,
    pub paths: Vec<String>,
    pub policy: String,
    pub when: String,
    pub fallback_keys: Vec<String>,
    pub unprotect: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Need {
    pub job: String,
    pub artifacts: bool,
    pub optional: bool,
}

#[derive(Debug, Clone, PartialEq)]
pub struct ImageSpec {
    pub name: String,
    pub alias: Option<String>,
    pub entrypoint: Option<Vec<String>>,
    pub command: Option<Vec<String>>,
    pub pull_policy: Option<Vec<String>>,
    pub executor_opts: Option<serde_json::Value>,
    pub variables: Vec<(String, String)>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct JobSpec {
    pub name: String,
    pub stage: String,
    pub stage_idx: usize,
    pub script: Vec<String>,
    pub before_script: Vec<String>,
    pub after_script: Vec<String>,
    pub variables: Vec<YamlVariable>,
    pub when: When,
    pub allow_failure: AllowFailure,
    pub artifacts: Vec<ArtifactSpec>,
    pub cache: Vec<CacheSpec>,
    /// `None`: stage ordering; `Some(vec![])`: starts at once.
    pub needs: Option<Vec<Need>>,
    pub dependencies: Option<Vec<String>>,
    /// Seconds.
    pub timeout: Option<u64>,
    pub image: Option<ImageSpec>,
    pub services: Vec<ImageSpec>,
    /// CI Functions (`run:`), as the JSON list sent to the runner.
    pub run: Option<serde_json::Value>,
    pub tags: Vec<String>,
}

/// A configuration error, worded like GitLab's.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for ConfigError {}

type Result<T> = std::result::Result<T, ConfigError>;

const UNSUPPORTED_TOP_LEVEL: [&str; 4] = ["include", "workflow", "types", "spec"];
const JOB_KEYS: [&str; 19] = [
    "script",
    "before_script",
    "after_script",
    "stage",
    "variables",
    "when",
    "allow_failure",
    "artifacts",
    "cache",
    "needs",
    "dependencies",
    "timeout",
    "image",
    "services",
    "run",
    "tags",
    "extends",
    "interruptible",
    "coverage",
];
const UNSUPPORTED_JOB_KEYS: [&str; 19] = [
    "rules",
    "only",
    "except",
    "retry",
    "environment",
    "trigger",
    "parallel",
    "resource_group",
    "release",
    "secrets",
    "id_tokens",
    "hooks",
    "inherit",
    "pages",
    "start_in",
    "identity",
    "manual_confirmation",
    "inputs",
    "dast_configuration",
];
const DEFAULT_KEYS: [&str; 9] = [
    "after_script",
    "artifacts",
    "before_script",
    "cache",
    "image",
    "services",
    "tags",
    "timeout",
    "interruptible",
];
const MAX_EXTENDS_DEPTH: usize = 11;

/// GitLab's limits on a `.gitlab-ci.yml`, at their defaults (the instance
/// limits page, "Maximum size and depth of CI/CD configuration YAML files":
/// application settings `max_yaml_size_bytes` and `max_yaml_depth`), and the
/// job timeout bound (`Project::MAX_BUILD_TIMEOUT`, one month).
pub mod limits {
    /// `max_yaml_size_bytes`: 2 MB. GitLab measures the loaded YAML in
    /// memory; fake-rails measures the text, which is smaller.
    pub const MAX_YAML_SIZE_BYTES: usize = 2 * 1024 * 1024;
    /// `max_yaml_depth`: nesting of mappings and sequences.
    pub const MAX_YAML_DEPTH: usize = 100;
    /// A job's `timeout` may not exceed one month (30.436875 days).
    pub const MAX_JOB_TIMEOUT_SECS: u64 = 2_629_746;
    /// GitLab's message for a config over the size or depth limit.
    pub const TOO_BIG: &str = "The parsed YAML is too big";
}

/// Parses a `.gitlab-ci.yml`.
pub fn parse(text: &str) -> Result<CiConfig> {
    Parser { text }.parse()
}

struct Parser<'a> {
    text: &'a str,
}

fn error(message: impl Into<String>) -> ConfigError {
    ConfigError {
        message: message.into(),
    }
}

impl Parser<'_> {
    /// `message`, with ` (line N)` when the key can be found in the text.
    fn error_at(&self, job: Option<&str>, key: &str, message: String) -> ConfigError {
        match find_key_line(self.text, job, key) {
            Some(line) => error(format!("{message} (line {line})")),
            None => error(message),
        }
    }

    fn parse(&self) -> Result<CiConfig> {
        if self.text.len() > limits::MAX_YAML_SIZE_BYTES {
            return Err(error(limits::TOO_BIG));
        }
        let mut root: Value =
            serde_yaml::from_str(self.text).map_err(|e| error(format!("Invalid YAML: {e}")))?;
        if depth(&root) > limits::MAX_YAML_DEPTH {
            return Err(error(limits::TOO_BIG));
        }
        root.apply_merge()
            .map_err(|e| error(format!("Invalid YAML: {e}")))?;
        reject_tags(&root, "root")?;
        let Value::Mapping(root) = root else {
            return Err(error(
                "Invalid configuration format: the root of the config should be a hash",
            ));
        };

        let mut stages: Option<Vec<String>> = None;
        let mut variables = Vec::new();
        let mut defaults = Mapping::new();
        let mut raw_jobs: Vec<(String, Value)> = Vec::new();

        for (key, value) in &root {
            let key = key_string(key)
                .ok_or_else(|| error("Invalid configuration format: keys should be strings"))?;
            match key.as_str() {
                "stages" => stages = Some(string_list(value, "stages")?),
                "variables" => variables = parse_variables(value, "variables", true)?,
                "default" => {
                    let Value::Mapping(map) = value else {
                        return Err(error("default config should be a hash"));
                    };
                    for (k, v) in map {
                        let k = key_string(k).unwrap_or_default();
                        if !DEFAULT_KEYS.contains(&k.as_str()) {
                            let message = if ["hooks", "id_tokens", "retry"].contains(&k.as_str()) {
                                format!(
                                    "default config uses `{k}`, which fake-rails does not support"
                                )
                            } else {
                                format!("default config contains unknown keys: {k}")
                            };
                            return Err(self.error_at(Some("default"), &k, message));
                        }
                        defaults.insert(Value::String(k), v.clone());
                    }
                }
                "image" | "services" | "before_script" | "after_script" | "cache" => {
                    // Deprecated global keywords: the same as `default:`, which wins.
                    let k = Value::String(key.clone());
                    if !defaults.contains_key(&k) {
                        defaults.insert(k, value.clone());
                    }
                }
                k if UNSUPPORTED_TOP_LEVEL.contains(&k) => {
                    return Err(self.error_at(
                        None,
                        k,
                        format!("`{k}` is a GitLab keyword that fake-rails does not support"),
                    ));
                }
                _ => raw_jobs.push((key, value.clone())),
            }
        }
        // `default:` wins over deprecated global keywords declared before it.
        if let Some(Value::Mapping(map)) = root.get("default") {
            for (k, v) in map {
                defaults.insert(k.clone(), v.clone());
            }
        }

        let stages = {
            let mut all = vec![".pre".to_string()];
            let declared =
                stages.unwrap_or_else(|| DEFAULT_STAGES.iter().map(|s| s.to_string()).collect());
            // Linear in the number of stages (a set, not a scan per stage).
            let mut seen = std::collections::HashSet::new();
            for s in declared {
                if s != ".pre" && s != ".post" && seen.insert(s.clone()) {
                    all.push(s);
                }
            }
            all.push(".post".to_string());
            all
        };
        let stage_index: HashMap<&str, usize> = stages
            .iter()
            .enumerate()
            .map(|(i, s)| (s.as_str(), i))
            .collect();

        let templates: HashMap<&str, &Value> =
            raw_jobs.iter().map(|(k, v)| (k.as_str(), v)).collect();
        let mut jobs = Vec::new();
        let mut any_visible = false;
        for (name, value) in &raw_jobs {
            if name.starts_with('.') {
                continue;
            }
            any_visible = true;
            let Value::Mapping(_) = value else {
                return Err(self.error_at(
                    None,
                    name,
                    format!("jobs:{name} config should be a hash"),
                ));
            };
            let resolved = resolve_extends(name, &templates, &mut Vec::new())?;
            let mut job = resolved;
            for (k, v) in &defaults {
                if !job.contains_key(k) {
                    job.insert(k.clone(), v.clone());
                }
            }
            if let Some(spec) = self.parse_job(name, &job, &stages, &stage_index)? {
                jobs.push(spec);
            }
        }
        if !any_visible {
            return Err(error("jobs config should contain at least one visible job"));
        }
        if jobs.is_empty() {
            return Err(error(
                "Pipeline will not run for the selected trigger. The rules configuration prevented any jobs from being added to the pipeline.",
            ));
        }
        validate_needs(&jobs)?;
        Ok(CiConfig {
            stages,
            variables,
            jobs,
        })
    }

    fn parse_job(
        &self,
        name: &str,
        job: &Mapping,
        stages: &[String],
        stage_index: &HashMap<&str, usize>,
    ) -> Result<Option<JobSpec>> {
        let mut unknown = Vec::new();
        for key in job.keys() {
            let key = key_string(key).unwrap_or_default();
            if UNSUPPORTED_JOB_KEYS.contains(&key.as_str()) {
                return Err(self.error_at(
                    Some(name),
                    &key,
                    format!("jobs:{name} config uses `{key}`, which fake-rails does not support"),
                ));
            }
            if !JOB_KEYS.contains(&key.as_str()) {
                unknown.push(key);
            }
        }
        if let Some(first) = unknown.first() {
            return Err(self.error_at(
                Some(name),
                first,
                format!(
                    "jobs:{name} config contains unknown keys: {}",
                    unknown.join(", ")
                ),
            ));
        }
        let path = |key: &str| format!("jobs:{name}:{key}");
        let get = |key: &str| job.get(key).filter(|v| !v.is_null());

        let when = match get("when") {
            None => None,
            Some(v) => match v.as_str() {
                Some("on_success") => Some(When::OnSuccess),
                Some("on_failure") => Some(When::OnFailure),
                Some("always") => Some(When::Always),
                Some("manual") => Some(When::Manual),
                Some("never") => return Ok(None),
                Some("delayed") => {
                    return Err(error(format!(
                        "{}: `delayed` is not supported by fake-rails",
                        path("when")
                    )));
                }
                _ => {
                    return Err(error(format!(
                        "{} config should be on_success, on_failure, always, manual or never",
                        path("when")
                    )));
                }
            },
        }
        .unwrap_or(When::OnSuccess);

        let script = match get("script") {
            Some(v) => script_lines(v, &path("script"), false)?,
            None => Vec::new(),
        };
        let run = match get("run") {
            Some(v) => Some(parse_run(v, &path("run"))?),
            None => None,
        };
        if script.is_empty() && run.is_none() {
            return Err(error(format!(
                "jobs:{name} config should implement the script: or run: keyword"
            )));
        }
        if !script.is_empty() && run.is_some() {
            return Err(error(format!(
                "jobs:{name} config: `script` and `run` cannot be used together"
            )));
        }

        let stage = match get("stage") {
            Some(v) => v
                .as_str()
                .ok_or_else(|| error(format!("{} config should be a string", path("stage"))))?
                .to_string(),
            None => "test".to_string(),
        };
        let stage_idx = stage_index.get(stage.as_str()).copied().ok_or_else(|| {
            self.error_at(
                Some(name),
                "stage",
                format!(
                    "{name} job: chosen stage {stage} does not exist; available stages are {}",
                    stages.join(", ")
                ),
            )
        })?;

        let allow_failure = match get("allow_failure") {
            None => AllowFailure {
                allowed: when == When::Manual,
                exit_codes: Vec::new(),
            },
            Some(Value::Bool(b)) => AllowFailure {
                allowed: *b,
                exit_codes: Vec::new(),
            },
            Some(Value::Mapping(m)) => {
                let codes = match m.get("exit_codes") {
                    Some(Value::Number(n)) => vec![n.as_i64().unwrap_or_default()],
                    Some(Value::Sequence(seq)) => seq
                        .iter()
                        .map(|v| {
                            v.as_i64().ok_or_else(|| {
                                error(format!(
                                    "{} exit_codes should be integers",
                                    path("allow_failure")
                                ))
                            })
                        })
                        .collect::<Result<_>>()?,
                    _ => {
                        return Err(error(format!(
                            "{} config should be a boolean or a hash with exit_codes",
                            path("allow_failure")
                        )))
                    }
                };
                if m.len() != 1 {
                    return Err(error(format!(
                        "{} config contains unknown keys",
                        path("allow_failure")
                    )));
                }
                AllowFailure {
                    allowed: false,
                    exit_codes: codes,
                }
            }
            Some(_) => {
                return Err(error(format!(
                    "{} config should be a boolean or a hash with exit_codes",
                    path("allow_failure")
                )))
            }
        };

        let before_script = match get("before_script") {
            Some(v) => script_lines(v, &path("before_script"), true)?,
            None => Vec::new(),
        };
        let after_script = match get("after_script") {
            Some(v) => script_lines(v, &path("after_script"), true)?,
            None => Vec::new(),
        };
        let variables = match get("variables") {
            Some(v) => parse_variables(v, &path("variables"), false)?,
            None => Vec::new(),
        };
        let artifacts = match get("artifacts") {
            Some(v) => parse_artifacts(v, &path("artifacts"))?,
            None => Vec::new(),
        };
        let cache = match get("cache") {
            Some(Value::Sequence(seq)) => {
                if seq.len() > 4 {
                    return Err(error(format!(
                        "{} config no more than 4 caches can be created",
                        path("cache")
                    )));
                }
                seq.iter()
                    .map(|c| parse_cache(c, &path("cache")))
                    .collect::<Result<_>>()?
            }
            Some(v) => vec![parse_cache(v, &path("cache"))?],
            None => Vec::new(),
        };
        let needs = match get("needs") {
            None => match job.get("needs") {
                Some(Value::Null) => Some(Vec::new()),
                _ => None,
            },
            Some(v) => Some(parse_needs(v, &path("needs"))?),
        };
        let dependencies = match get("dependencies") {
            Some(v) => Some(string_list(v, &path("dependencies"))?),
            None => None,
        };
        let timeout = match get("timeout") {
            Some(Value::Number(n)) => Some(n.as_u64().ok_or_else(|| {
                error(format!("{} config should be a duration", path("timeout")))
            })?),
            Some(Value::String(s)) => Some(parse_duration(s).ok_or_else(|| {
                error(format!(
                    "{} config should be a duration, got `{s}`",
                    path("timeout")
                ))
            })?),
            Some(_) => {
                return Err(error(format!(
                    "{} config should be a duration",
                    path("timeout")
                )))
            }
            None => None,
        };
        if timeout.is_some_and(|t| t > limits::MAX_JOB_TIMEOUT_SECS) {
            return Err(self.error_at(
                Some(name),
                "timeout",
                format!("jobs:{name} timeout should not exceed the limit"),
            ));
        }
        let image = match get("image") {
            Some(v) => Some(parse_image(v, &path("image"), false)?),
            None => None,
        };
        let services = match get("services") {
            Some(Value::Sequence(seq)) => seq
                .iter()
                .map(|s| parse_image(s, &path("services"), true))
                .collect::<Result<_>>()?,
            Some(_) => {
                return Err(error(format!(
                    "{} config should be an array",
                    path("services")
                )))
            }
            None => Vec::new(),
        };
        let tags = match get("tags") {
            Some(v) => string_list(v, &path("tags"))?,
            None => Vec::new(),
        };
        if let Some(v) = get("interruptible") {
            if !v.is_bool() {
                return Err(error(format!(
                    "{} config should be a boolean value",
                    path("interruptible")
                )));
            }
        }

        Ok(Some(JobSpec {
            name: name.to_string(),
            stage,
            stage_idx,
            script,
            before_script,
            after_script,
            variables,
            when,
            allow_failure,
            artifacts,
            cache,
            needs,
            dependencies,
            timeout,
            image,
            services,
            run,
            tags,
        }))
    }
}

fn key_string(key: &Value) -> Option<String> {
    match key {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        Value::Bool(b) => Some(b.to_string()),
        _ => None,
    }
}

fn scalar_string(value: &Value) -> Option<String> {
    match value {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        _ => None,
    }
}

fn reject_tags(value: &Value, path: &str) -> Result<()> {
    match value {
        Value::Tagged(tagged) => Err(error(format!(
            "{path}: the YAML tag `{}` (e.g. `!reference`) is not supported by fake-rails",
            tagged.tag
        ))),
        Value::Sequence(seq) => seq.iter().try_for_each(|v| reject_tags(v, path)),
        Value::Mapping(map) => map.iter().try_for_each(|(k, v)| {
            let key = key_string(k).unwrap_or_else(|| "?".to_string());
            let child = if path == "root" {
                key
            } else {
                format!("{path}:{key}")
            };
            reject_tags(v, &child)
        }),
        _ => Ok(()),
    }
}

/// A string or a list of strings.
fn string_list(value: &Value, path: &str) -> Result<Vec<String>> {
    match value {
        Value::String(s) => Ok(vec![s.clone()]),
        Value::Sequence(seq) => seq
            .iter()
            .map(|v| {
                scalar_string(v)
                    .ok_or_else(|| error(format!("{path} config should be an array of strings")))
            })
            .collect(),
        _ => Err(error(format!(
            "{path} config should be an array of strings"
        ))),
    }
}

/// `script:`-like: a string or a nested array of strings, flattened.
fn script_lines(value: &Value, path: &str, allow_empty: bool) -> Result<Vec<String>> {
    fn walk(value: &Value, depth: usize, out: &mut Vec<String>) -> bool {
        match value {
            Value::String(s) => {
                out.push(s.clone());
                true
            }
            Value::Sequence(seq) if depth < 10 => seq.iter().all(|v| walk(v, depth + 1, out)),
            _ => false,
        }
    }
    let mut out = Vec::new();
    if !walk(value, 0, &mut out) {
        return Err(error(format!(
            "{path} config should be a string or a nested array of strings up to 10 levels deep"
        )));
    }
    if out.is_empty() && !allow_empty {
        return Err(error(format!("{path} config can't be blank")));
    }
    Ok(out)
}

fn parse_variables(value: &Value, path: &str, global: bool) -> Result<Vec<YamlVariable>> {
    let Value::Mapping(map) = value else {
        return Err(error(format!(
            "{path} config should be a hash of key value pairs"
        )));
    };
    let mut out = Vec::new();
    for (k, v) in map {
        let key = key_string(k)
            .ok_or_else(|| error(format!("{path} config should be a hash of key value pairs")))?;
        let (value, raw) = match v {
            Value::Mapping(m) => {
                for mk in m.keys() {
                    let mk = key_string(mk).unwrap_or_default();
                    let allowed: &[&str] = if global { &["value", "description", "expand", "options"] } else { &["value", "expand"] };
                    if !allowed.contains(&mk.as_str()) {
                        return Err(error(format!("{path}:{key} config contains unknown keys: {mk}")));
                    }
                }
                let value = match m.get("value") {
                    Some(v) => scalar_string(v).ok_or_else(|| error(format!("{path}:{key} value should be a string")))?,
                    None => String::new(),
                };
                let raw = matches!(m.get("expand"), Some(Value::Bool(false)));
                (value, raw)
            }
            other => (
                scalar_string(other).ok_or_else(|| {
                    error(format!("{path} config should be a hash of key value pairs, value can be a hash (`{key}`)"))
                })?,
                false,
            ),
        };
        out.push(YamlVariable { key, value, raw });
    }
    Ok(out)
}

fn check_keys(map: &Mapping, allowed: &[&str], path: &str) -> Result<()> {
    let unknown: Vec<String> = map
        .keys()
        .map(|k| key_string(k).unwrap_or_default())
        .filter(|k| !allowed.contains(&k.as_str()))
        .collect();
    if unknown.is_empty() {
        Ok(())
    } else {
        Err(error(format!(
            "{path} config contains unknown keys: {}",
            unknown.join(", ")
        )))
    }
}

fn one_of(value: Option<&Value>, allowed: &[&str], default: &str, path: &str) -> Result<String> {
    match value {
        None | Some(Value::Null) => Ok(default.to_string()),
        Some(Value::String(s)) if allowed.contains(&s.as_str()) => Ok(s.clone()),
        Some(_) => Err(error(format!(
            "{path} config should be {}",
            allowed.join(", ")
        ))),
    }
}

fn bool_of(value: Option<&Value>, path: &str) -> Result<bool> {
    match value {
        None | Some(Value::Null) => Ok(false),
        Some(Value::Bool(b)) => Ok(*b),
        Some(_) => Err(error(format!("{path} config should be a boolean value"))),
    }
}

fn parse_artifacts(value: &Value, path: &str) -> Result<Vec<ArtifactSpec>> {
    let Value::Mapping(map) = value else {
        return Err(error(format!("{path} config should be a hash")));
    };
    check_keys(
        map,
        &[
            "paths",
            "exclude",
            "name",
            "untracked",
            "when",
            "expire_in",
            "reports",
        ],
        path,
    )?;
    let paths = match map.get("paths") {
        Some(v) => string_list(v, &format!("{path}:paths"))?,
        None => Vec::new(),
    };
    let exclude = match map.get("exclude") {
        Some(v) => string_list(v, &format!("{path}:exclude"))?,
        None => Vec::new(),
    };
    let name = match map.get("name") {
        Some(v) => Some(
            scalar_string(v).ok_or_else(|| error(format!("{path}:name config should be a string"))),
        )
        .transpose()?,
        None => None,
    };
    let expire_in = match map.get("expire_in") {
        Some(v) => {
            let s = scalar_string(v)
                .ok_or_else(|| error(format!("{path}:expire_in config should be a duration")))?;
            if s != "never" && parse_duration(&s).is_none() {
                return Err(error(format!(
                    "{path}:expire_in config should be a duration, got `{s}`"
                )));
            }
            Some(s)
        }
        None => None,
    };
    let untracked = bool_of(map.get("untracked"), &format!("{path}:untracked"))?;
    let when = one_of(
        map.get("when"),
        &["on_success", "on_failure", "always"],
        "on_success",
        &format!("{path}:when"),
    )?;

    let mut out = Vec::new();
    if !paths.is_empty() || untracked {
        out.push(ArtifactSpec {
            name,
            untracked,
            paths,
            exclude,
            when,
            expire_in: expire_in.clone(),
            artifact_type: "archive".to_string(),
            artifact_format: "zip".to_string(),
        });
    }
    if let Some(reports) = map.get("reports") {
        let Value::Mapping(reports) = reports else {
            return Err(error(format!("{path}:reports config should be a hash")));
        };
        for (k, v) in reports {
            let kind = key_string(k).unwrap_or_default();
            if kind != "junit" && kind != "dotenv" {
                return Err(error(format!(
                    "{path}:reports:{kind} is not supported by fake-rails (junit and dotenv are)"
                )));
            }
            out.push(ArtifactSpec {
                name: None,
                untracked: false,
                paths: string_list(v, &format!("{path}:reports:{kind}"))?,
                exclude: Vec::new(),
                when: "always".to_string(),
                expire_in: expire_in.clone(),
                artifact_type: kind,
                artifact_format: "gzip".to_string(),
            });
        }
    }
    Ok(out)
}

fn parse_cache(value: &Value, path: &str) -> Result<CacheSpec> {
    let Value::Mapping(map) = value else {
        return Err(error(format!("{path} config should be a hash")));
    };
    check_keys(
        map,
        &[
            "key",
            "paths",
            "untracked",
            "policy",
            "when",
            "fallback_keys",
            "unprotect",
        ],
        path,
    )?;
    let key = match map.get("key") {
        None | Some(Value::Null) => CacheKey::Literal("default".to_string()),
        Some(Value::Mapping(k)) => {
            check_keys(k, &["files", "prefix"], &format!("{path}:key"))?;
            let files = match k.get("files") {
                Some(v) => string_list(v, &format!("{path}:key:files"))?,
                None => return Err(error(format!("{path}:key config requires `files`"))),
            };
            if files.is_empty() || files.len() > 2 {
                return Err(error(format!(
                    "{path}:key:files config has too many items (maximum is 2)"
                )));
            }
            let prefix = k.get("prefix").and_then(scalar_string);
            CacheKey::Files { files, prefix }
        }
        Some(v) => {
            let s = scalar_string(v)
                .ok_or_else(|| error(format!("{path}:key config should be a string or a hash")))?;
            if s.contains('/') || s == "." || s == ".." {
                return Err(error(format!(
                    "{path}:key config cannot contain the \"/\" character"
                )));
            }
            CacheKey::Literal(s)
        }
    };
    let paths = match map.get("paths") {
        Some(v) => string_list(v, &format!("{path}:paths"))?,
        None => Vec::new(),
    };
    let fallback_keys = match map.get("fallback_keys") {
        Some(v) => string_list(v, &format!("{path}:fallback_keys"))?,
        None => Vec::new(),
    };
    Ok(CacheSpec {
        key,
        untracked: bool_of(map.get("untracked"), &format!("{path}:untracked"))?,
        paths,
        policy: one_of(
            map.get("policy"),
            &["pull-push", "pull", "push"],
            "pull-push",
            &format!("{path}:policy"),
        )?,
        when: one_of(
            map.get("when"),
            &["on_success", "on_failure", "always"],
            "on_success",
            &format!("{path}:when"),
        )?,
        fallback_keys,
        unprotect: bool_of(map.get("unprotect"), &format!("{path}:unprotect"))?,
    })
}

fn parse_needs(value: &Value, path: &str) -> Result<Vec<Need>> {
    let Value::Sequence(seq) = value else {
        return Err(error(format!("{path} config should be an array")));
    };
    seq.iter()
        .map(|item| match item {
            Value::String(job) => Ok(Need {
                job: job.clone(),
                artifacts: true,
                optional: false,
            }),
            Value::Mapping(m) => {
                check_keys(m, &["job", "artifacts", "optional"], path)?;
                let job = m.get("job").and_then(Value::as_str).ok_or_else(|| {
                    error(format!("{path} config: each need should name a `job`"))
                })?;
                Ok(Need {
                    job: job.to_string(),
                    artifacts: m.get("artifacts").and_then(Value::as_bool).unwrap_or(true),
                    optional: m.get("optional").and_then(Value::as_bool).unwrap_or(false),
                })
            }
            _ => Err(error(format!(
                "{path} config should be an array of strings or hashes"
            ))),
        })
        .collect()
}

fn yaml_to_json(value: &Value, path: &str) -> Result<serde_json::Value> {
    serde_json::to_value(value).map_err(|e| error(format!("{path}: {e}")))
}

fn parse_image(value: &Value, path: &str, service: bool) -> Result<ImageSpec> {
    let list = |v: &Value, p: &str| -> Result<Vec<String>> { string_list(v, p) };
    match value {
        Value::String(name) => Ok(ImageSpec {
            name: name.clone(),
            alias: None,
            entrypoint: None,
            command: None,
            pull_policy: None,
            executor_opts: None,
            variables: Vec::new(),
        }),
        Value::Mapping(map) => {
            let allowed: &[&str] = if service {
                &[
                    "name",
                    "alias",
                    "entrypoint",
                    "command",
                    "variables",
                    "pull_policy",
                    "docker",
                    "kubernetes",
                ]
            } else {
                &["name", "entrypoint", "pull_policy", "docker", "kubernetes"]
            };
            check_keys(map, allowed, path)?;
            let name = map
                .get("name")
                .and_then(scalar_string)
                .ok_or_else(|| error(format!("{path} config should have a `name`")))?;
            let mut executor_opts = serde_json::Map::new();
            for executor in ["docker", "kubernetes"] {
                if let Some(v) = map.get(executor) {
                    executor_opts.insert(executor.to_string(), yaml_to_json(v, path)?);
                }
            }
            let variables = match map.get("variables") {
                Some(v) => parse_variables(v, &format!("{path}:variables"), false)?
                    .into_iter()
                    .map(|v| (v.key, v.value))
                    .collect(),
                None => Vec::new(),
            };
            Ok(ImageSpec {
                name,
                alias: map.get("alias").and_then(scalar_string),
                entrypoint: map
                    .get("entrypoint")
                    .map(|v| list(v, &format!("{path}:entrypoint")))
                    .transpose()?,
                command: map
                    .get("command")
                    .map(|v| list(v, &format!("{path}:command")))
                    .transpose()?,
                pull_policy: map
                    .get("pull_policy")
                    .map(|v| list(v, &format!("{path}:pull_policy")))
                    .transpose()?,
                executor_opts: (!executor_opts.is_empty())
                    .then_some(serde_json::Value::Object(executor_opts)),
                variables,
            })
        }
        _ => Err(error(format!("{path} config should be a hash or a string"))),
    }
}

/// `run:` (CI Functions): a list of `{name, step|script|func, inputs, env}`.
fn parse_run(value: &Value, path: &str) -> Result<serde_json::Value> {
    let Value::Sequence(seq) = value else {
        return Err(error(format!("{path} config should be an array of steps")));
    };
    if seq.is_empty() {
        return Err(error(format!("{path} config can't be blank")));
    }
    for (i, item) in seq.iter().enumerate() {
        let item_path = format!("{path}[{i}]");
        let Value::Mapping(map) = item else {
            return Err(error(format!("{item_path} config should be a hash")));
        };
        check_keys(
            map,
            &["name", "step", "script", "func", "inputs", "env"],
            &item_path,
        )?;
        if map.get("name").and_then(Value::as_str).is_none() {
            return Err(error(format!("{item_path} config should have a `name`")));
        }
        let kinds = ["step", "script", "func"]
            .iter()
            .filter(|k| map.contains_key(**k))
            .count();
        if kinds != 1 {
            return Err(error(format!(
                "{item_path} config should have exactly one of `step`, `script` or `func`"
            )));
        }
        if let Some(inputs) = map.get("inputs") {
            if !inputs.is_mapping() {
                return Err(error(format!("{item_path}:inputs config should be a hash")));
            }
        }
        if let Some(env) = map.get("env") {
            if !env.is_mapping() {
                return Err(error(format!("{item_path}:env config should be a hash")));
            }
        }
    }
    yaml_to_json(value, path)
}

/// Resolves `extends` (deep-merging hashes, replacing everything else).
fn resolve_extends(
    name: &str,
    jobs: &HashMap<&str, &Value>,
    stack: &mut Vec<String>,
) -> Result<Mapping> {
    if stack.iter().any(|s| s == name) {
        return Err(error(format!(
            "jobs:{name}: circular dependency detected in `extends`"
        )));
    }
    if stack.len() >= MAX_EXTENDS_DEPTH {
        return Err(error(format!(
            "jobs:{name}: nesting too deep in `extends` (maximum is {MAX_EXTENDS_DEPTH})"
        )));
    }
    let Some(Value::Mapping(own)) = jobs.get(name).copied() else {
        let parent = stack.last().cloned().unwrap_or_default();
        return Err(error(format!(
            "jobs:{parent}:extends key may not be used with `{name}`: unknown or not a hash"
        )));
    };
    let bases = match own.get("extends") {
        None => Vec::new(),
        Some(v) => string_list(v, &format!("jobs:{name}:extends"))?,
    };
    stack.push(name.to_string());
    let mut merged = Mapping::new();
    for base in bases {
        let resolved = resolve_extends(&base, jobs, stack)?;
        deep_merge(&mut merged, &resolved);
    }
    stack.pop();
    let mut own = own.clone();
    own.remove("extends");
    deep_merge(&mut merged, &own);
    Ok(merged)
}

fn deep_merge(into: &mut Mapping, from: &Mapping) {
    for (k, v) in from {
        match (into.get_mut(k), v) {
            (Some(Value::Mapping(a)), Value::Mapping(b)) => deep_merge(a, b),
            _ => {
                into.insert(k.clone(), v.clone());
            }
        }
    }
}

fn validate_needs(jobs: &[JobSpec]) -> Result<()> {
    let by_name: HashMap<&str, &JobSpec> = jobs.iter().map(|j| (j.name.as_str(), j)).collect();
    for job in jobs {
        for need in job.needs.iter().flatten() {
            match by_name.get(need.job.as_str()) {
                None if need.optional => {}
                None => {
                    return Err(error(format!(
                        "'{}' job needs '{}' job, but '{}' does not exist in the pipeline. This might be because of the only, except, or rules keywords. To need a job that sometimes does not exist in the pipeline, use needs:optional.",
                        job.name, need.job, need.job
                    )));
                }
                Some(needed) if needed.stage_idx > job.stage_idx => {
                    return Err(error(format!(
                        "{} job: need {} is not defined in current or prior stages",
                        job.name, need.job
                    )));
                }
                Some(_) => {}
            }
        }
        for dep in job.dependencies.iter().flatten() {
            match by_name.get(dep.as_str()) {
                Some(d) if d.stage_idx < job.stage_idx => {}
                _ => {
                    return Err(error(format!(
                        "{} job: undefined dependency: {dep}",
                        job.name
                    )));
                }
            }
        }
    }
    // Needs within a stage may form a cycle.
    fn visit<'a>(
        name: &'a str,
        by_name: &HashMap<&str, &'a JobSpec>,
        done: &mut HashSet<&'a str>,
        path: &mut Vec<&'a str>,
    ) -> Result<()> {
        if done.contains(name) {
            return Ok(());
        }
        if path.contains(&name) {
            return Err(error(format!(
                "circular dependency detected in `needs`: {}",
                path.join(" -> ")
            )));
        }
        path.push(name);
        if let Some(job) = by_name.get(name) {
            for need in job.needs.iter().flatten() {
                if let Some(needed) = by_name.get(need.job.as_str()) {
                    visit(&needed.name, by_name, done, path)?;
                }
            }
        }
        path.pop();
        done.insert(name);
        Ok(())
    }
    let mut done = HashSet::new();
    for job in jobs {
        visit(&job.name, &by_name, &mut done, &mut Vec::new())?;
    }
    Ok(())
}

/// Nesting depth of `value` (a scalar is 1), without recursion.
fn depth(value: &Value) -> usize {
    let mut deepest = 0;
    let mut stack = vec![(value, 1usize)];
    while let Some((value, level)) = stack.pop() {
        deepest = deepest.max(level);
        match value {
            Value::Sequence(items) => stack.extend(items.iter().map(|v| (v, level + 1))),
            Value::Mapping(map) => stack.extend(map.values().map(|v| (v, level + 1))),
            Value::Tagged(tagged) => stack.push((&tagged.value, level)),
            _ => {}
        }
    }
    deepest
}

/// Durations like GitLab's (ChronicDuration): `3600`, `1h 30m`, `2 hours`,
/// `10 minutes 30 seconds`, `1d`, `1 week`. Returns seconds.
pub fn parse_duration(text: &str) -> Option<u64> {
    let text = text.trim().to_ascii_lowercase();
    if text.is_empty() {
        return None;
    }
    if let Ok(secs) = text.parse::<u64>() {
        return Some(secs);
    }
    let mut total: u64 = 0;
    let mut rest = text.as_str();
    let mut any = false;
    loop {
        rest = rest.trim_start_matches(|c: char| c.is_whitespace() || c == ',');
        if rest.is_empty() {
            break;
        }
        let rest_after_and = rest.strip_prefix("and ").unwrap_or(rest);
        rest = rest_after_and.trim_start();
        let digits = rest
            .find(|c: char| !c.is_ascii_digit() && c != '.')
            .unwrap_or(rest.len());
        if digits == 0 {
            return None;
        }
        let number: f64 = rest[..digits].parse().ok()?;
        rest = rest[digits..].trim_start();
        let unit_len = rest
            .find(|c: char| !c.is_ascii_alphabetic())
            .unwrap_or(rest.len());
        let unit = &rest[..unit_len];
        rest = &rest[unit_len..];
        let factor = match unit {
            "" | "s" | "sec" | "secs" | "second" | "seconds" => 1.0,
            "m" | "min" | "mins" | "minute" | "minutes" => 60.0,
            "h" | "hr" | "hrs" | "hour" | "hours" => 3_600.0,
            "d" | "day" | "days" => 86_400.0,
            "w" | "wk" | "wks" | "week" | "weeks" => 604_800.0,
            "mo" | "mon" | "mos" | "month" | "months" => 2_592_000.0,
            "y" | "yr" | "yrs" | "year" | "years" => 31_557_600.0,
            _ => return None,
        };
        total = total.checked_add((number * factor).round() as u64)?;
        any = true;
    }
    any.then_some(total)
}

/// The 1-based line of `key:` inside the top-level `job:` block (or at the
/// top level when `job` is `None`), for block-style YAML.
fn find_key_line(text: &str, job: Option<&str>, key: &str) -> Option<usize> {
    let is_key_line = |line: &str, key: &str| {
        let trimmed = line.trim_start().trim_start_matches("- ");
        let unquoted = trimmed.trim_start_matches(['"', '\'']);
        unquoted.strip_prefix(key).is_some_and(|after| {
            let after = after.trim_start_matches(['"', '\'']).trim_start();
            after.starts_with(':')
        })
    };
    let lines: Vec<&str> = text.lines().collect();
    let (start, indent_limit) = match job {
        None => (0, None),
        Some(job) => {
            let at = lines
                .iter()
                .position(|l| !l.starts_with([' ', '\t']) && is_key_line(l, job))?;
            (at + 1, Some(()))
        }
    };
    for (i, line) in lines.iter().enumerate().skip(start) {
        let top_level = !line.is_empty() && !line.starts_with([' ', '\t', '#']);
        match indent_limit {
            Some(()) => {
                if top_level {
                    return None;
                }
                if is_key_line(line, key) {
                    return Some(i + 1);
                }
            }
            None => {
                if top_level && is_key_line(line, key) {
                    return Some(i + 1);
                }
            }
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gitlab_limits() {
        let refused = |yaml: &str| parse(yaml).unwrap_err().to_string();
        let big = format!(
            "a:\n  script: [\"{}\"]\n",
            "x".repeat(limits::MAX_YAML_SIZE_BYTES)
        );
        assert_eq!(refused(&big), limits::TOO_BIG);
        let deep = format!(
            "a:\n  script: [echo]\n  variables:\n    V: {}{}\n",
            "[".repeat(100),
            "]".repeat(100)
        );
        assert_eq!(refused(&deep), limits::TOO_BIG);
        assert!(
            refused("a:\n  timeout: 99999999999999999999 years\n  script: [echo]\n")
                .starts_with("jobs:a timeout should not exceed the limit")
        );
        assert!(parse("a:\n  timeout: 1 month\n  script: [echo]\n").is_ok());
        let mut many = String::from("stages:\n");
        for i in 0..20_000 {
            many.push_str(&format!("  - s{i}\n  - s{i}\n"));
        }
        many.push_str("a:\n  stage: s19999\n  script: [echo]\n");
        let config = parse(&many).unwrap();
        assert_eq!(config.stages.len(), 20_002);
    }

    #[test]
    fn durations() {
        for (text, secs) in [
            ("3600", Some(3600)),
            ("1h 30m", Some(5400)),
            ("1h30m", Some(5400)),
            ("2 hours", Some(7200)),
            ("10 minutes 30 seconds", Some(630)),
            ("1 day", Some(86_400)),
            ("1 week", Some(604_800)),
            ("1h and 5m", Some(3900)),
            ("soon", None),
            ("", None),
            ("5 fortnights", None),
        ] {
            assert_eq!(parse_duration(text), secs, "{text}");
        }
    }

    #[test]
    fn key_lines() {
        let text = "stages: [a]\nbuild:\n  stage: a\n  scriptt: echo\ntest:\n  script: x\n";
        assert_eq!(find_key_line(text, Some("build"), "scriptt"), Some(4));
        assert_eq!(find_key_line(text, Some("test"), "scriptt"), None);
        assert_eq!(find_key_line(text, None, "test"), Some(5));
    }
}

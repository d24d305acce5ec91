//! CI Functions (GitLab's `run:` keyword, formerly "steps"): the payload's
//! `run`, a JSON string (or array) of `{name, script|step|func, inputs,
//! env}`, run in order in place of the job script. The first function that
//! fails fails the job (`script_failure`); the ones after it do not run.
//!
//! What a function can be here:
//!
//! * `script:` (a string or a list of lines): run with bash in the build
//!   directory like `script:`, with the job's variables and the function's
//!   `env` exported.
//! * `step:`/`func:` with a **local** reference (`./path`, relative to the
//!   build directory, or an absolute path): a directory holding `step.yml`
//!   (or `func.yml`), two YAML documents as in GitLab's step runner: a `spec`
//!   (`spec: {inputs: {NAME: {type, default}}}`) and an `exec` definition
//!   (`exec: {command: [argv...], work_dir}`, plus `env`). The command runs
//!   directly (no shell), with the inputs checked against the spec (unknown
//!   input, missing required input: the function fails).
//! * Any other reference (`gitlab.com/org/fn@v1`, `registry.../fn:1`, a
//!   composite `run`/`steps` definition) cannot be resolved by this runner:
//!   the function fails with a message saying so.
//!
//! Inputs reach a function through the step runner's expressions, in
//! `script` lines, `exec.command`, `work_dir` and `env` values:
//! `${{ inputs.NAME }}`, `${{ env.NAME }}` (the function's env, then the
//! job's variables), `${{ job.NAME }}` (a job variable) and
//! `${{ step_dir }}` (the local function's directory). An unknown expression
//! fails the function. Inputs are not exported as environment variables.
//!
//! Telemetry sees input NAMES only, never their values.
//!
//! The `run` model ([`FunctionCall`]) and its parsing live in
//! [`crate::payload`]; this module resolves and runs the calls.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde_json::Value;

use super::payload::{is_local, split_version, value_text, FunctionCall, FunctionKind};
use super::shell::{shell_quote, ExportVar};
use runner_telemetry::secrets::strip_credentials;

/// What expressions can see.
pub struct Scope<'a> {
    pub inputs: &'a BTreeMap<String, Value>,
    pub env: &'a [(String, String)],
    pub job: &'a [ExportVar],
    pub step_dir: Option<&'a Path>,
}

/// Replaces `${{ expr }}` in `text`.
pub fn interpolate(text: &str, scope: &Scope<'_>) -> Result<String, String> {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(start) = rest.find("${{") {
        out.push_str(&rest[..start]);
        let after = &rest[start + 3..];
        let end = after
            .find("}}")
            .ok_or_else(|| format!("unclosed expression in `{}`", text.trim()))?;
        let expr = after[..end].trim();
        out.push_str(&evaluate(expr, scope)?);
        rest = &after[end + 2..];
    }
    out.push_str(rest);
    Ok(out)
}

fn evaluate(expr: &str, scope: &Scope<'_>) -> Result<String, String> {
    let job = |name: &str| {
        scope
            .job
            .iter()
            .rev()
            .find(|v| v.key == name)
            .map(|v| v.value.clone())
    };
    if expr == "step_dir" {
        if let Some(dir) = scope.step_dir {
            return Ok(dir.to_string_lossy().into_owned());
        }
    }
    if let Some(name) = expr.strip_prefix("inputs.") {
        return scope
            .inputs
            .get(name)
            .map(value_text)
            .ok_or_else(|| format!("`${{{{ {expr} }}}}`: no input named `{name}`"));
    }
    if let Some(name) = expr.strip_prefix("env.") {
        let own = scope.env.iter().rev().find(|(k, _)| k == name);
        return Ok(own
            .map(|(_, v)| v.clone())
            .or_else(|| job(name))
            .unwrap_or_default());
    }
    if let Some(name) = expr.strip_prefix("job.") {
        return Ok(job(name).unwrap_or_default());
    }
    Err(format!(
        "`${{{{ {expr} }}}}` is not an expression this runner knows (inputs.NAME, env.NAME, job.NAME, step_dir)"
    ))
}

/// A function ready to run.
#[derive(Clone, PartialEq, Eq)]
pub enum Resolved {
    /// Bash lines, echoed like `script:`.
    Script {
        commands: Vec<String>,
        env: Vec<ExportVar>,
    },
    /// A command run without a shell.
    Exec {
        argv: Vec<String>,
        work_dir: Option<PathBuf>,
        env: Vec<ExportVar>,
    },
}

impl std::fmt::Debug for Resolved {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Resolved::Script { commands, .. } => f
                .debug_struct("Script")
                .field("lines", &commands.len())
                .finish_non_exhaustive(),
            Resolved::Exec { argv, .. } => f
                .debug_struct("Exec")
                .field("program", &argv.first())
                .finish_non_exhaustive(),
        }
    }
}

impl Resolved {
    /// The bash script that runs it: job variables and the function's env
    /// exported, in `dir` (or the exec's `work_dir`).
    pub fn script(&self, exports: &[ExportVar], dir: &Path) -> String {
        match self {
            Resolved::Script { commands, env } => {
                let mut all = exports.to_vec();
                all.extend(env.iter().cloned());
                super::shell::build_script(&all, dir, commands)
            }
            Resolved::Exec {
                argv,
                work_dir,
                env,
            } => {
                let mut all = exports.to_vec();
                all.extend(env.iter().cloned());
                let dir = work_dir.as_deref().unwrap_or(dir);
                let mut script = super::shell::build_script(&all, dir, &[]);
                let quoted: Vec<String> = argv.iter().map(|a| shell_quote(a)).collect();
                script.push_str(&format!("exec {}\n", quoted.join(" ")));
                script
            }
        }
    }
}

/// Resolves a call against the build directory and the job's variables.
/// Input values may themselves use `${{ env.X }}`/`${{ job.X }}`.
pub fn resolve(
    call: &FunctionCall,
    build_dir: &Path,
    job: &[ExportVar],
) -> Result<Resolved, String> {
    let no_inputs = BTreeMap::new();
    let outer = Scope {
        inputs: &no_inputs,
        env: &call.env,
        job,
        step_dir: None,
    };
    let inputs: BTreeMap<String, Value> = call
        .inputs
        .iter()
        .map(|(name, value)| match value {
            Value::String(text) => interpolate(text, &outer)
                .map(|t| (name.clone(), Value::String(t)))
                .map_err(|e| format!("input `{name}`: {e}")),
            other => Ok((name.clone(), other.clone())),
        })
        .collect::<Result<_, _>>()?;
    let call = &FunctionCall {
        inputs,
        ..call.clone()
    };
    match &call.kind {
        FunctionKind::Script(lines) => {
            let scope = Scope {
                inputs: &call.inputs,
                env: &call.env,
                job,
                step_dir: None,
            };
            let commands = lines
                .iter()
                .map(|l| interpolate(l, &scope))
                .collect::<Result<_, _>>()?;
            let env = exports_of(&call.env, &scope)?;
            Ok(Resolved::Script { commands, env })
        }
        FunctionKind::Reference { keyword, reference } => {
            if !is_local(reference) {
                let (base, version) = split_version(reference);
                let shown = match version {
                    Some(v) => format!("{}@{v}", strip_credentials(base)),
                    None => strip_credentials(base),
                };
                return Err(format!(
                    "cannot resolve {keyword} `{shown}`: this runner runs only local functions (`./path` with a step.yml), not remote references"
                ));
            }
            resolve_local(call, reference, build_dir, job)
        }
    }
}

fn exports_of(env: &[(String, String)], scope: &Scope<'_>) -> Result<Vec<ExportVar>, String> {
    env.iter()
        .map(|(key, value)| {
            if !super::shell::is_valid_name(key) {
                return Err(format!("env `{key}` is not a valid variable name"));
            }
            Ok(ExportVar {
                key: key.clone(),
                value: interpolate(value, scope)?,
            })
        })
        .collect()
}

fn resolve_local(
    call: &FunctionCall,
    reference: &str,
    build_dir: &Path,
    job: &[ExportVar],
) -> Result<Resolved, String> {
    let path = build_dir.join(reference);
    let (dir, file) = if path.is_dir() {
        let file = ["step.yml", "func.yml"]
            .iter()
            .map(|f| path.join(f))
            .find(|f| f.is_file())
            .ok_or_else(|| {
                format!("cannot resolve `{reference}`: no step.yml in that directory")
            })?;
        (path.clone(), file)
    } else if path.is_file() {
        (
            path.parent().unwrap_or(build_dir).to_path_buf(),
            path.clone(),
        )
    } else {
        return Err(format!(
            "cannot resolve `{reference}`: no such function in the project directory"
        ));
    };
    let text =
        std::fs::read_to_string(&file).map_err(|e| format!("cannot read `{reference}`: {e}"))?;
    let documents: Vec<serde_yaml::Value> = serde_yaml::Deserializer::from_str(&text)
        .map(serde::Deserialize::deserialize)
        .collect::<Result<_, _>>()
        .map_err(|e| format!("`{reference}` is not valid YAML: {e}"))?;
    let (spec, definition) = match documents.as_slice() {
        [spec, definition] => (spec, definition),
        _ => {
            return Err(format!(
                "`{reference}` must hold two YAML documents, a spec and a definition"
            ))
        }
    };
    let inputs = merge_inputs(reference, spec, &call.inputs)?;
    if definition.get("run").is_some() || definition.get("steps").is_some() {
        return Err(format!(
            "`{reference}` is a composite function (`run`/`steps`), which this runner does not run"
        ));
    }
    let exec = definition
        .get("exec")
        .ok_or_else(|| format!("`{reference}` has no `exec` definition"))?;
    let command: Vec<String> = match exec.get("command") {
        Some(serde_yaml::Value::Sequence(items)) if !items.is_empty() => items
            .iter()
            .map(yaml_text)
            .collect::<Option<_>>()
            .ok_or_else(|| format!("`{reference}`: exec.command must be a list of strings"))?,
        _ => {
            return Err(format!(
                "`{reference}`: exec.command must be a non-empty list"
            ))
        }
    };
    let mut env: Vec<(String, String)> = match definition.get("env") {
        Some(serde_yaml::Value::Mapping(m)) => m
            .iter()
            .filter_map(|(k, v)| Some((yaml_text(k)?, yaml_text(v)?)))
            .collect(),
        _ => Vec::new(),
    };
    env.extend(call.env.iter().cloned());
    let scope = Scope {
        inputs: &inputs,
        env: &env,
        job,
        step_dir: Some(&dir),
    };
    let argv = command
        .iter()
        .map(|a| interpolate(a, &scope))
        .collect::<Result<_, _>>()?;
    let work_dir = match exec.get("work_dir").and_then(yaml_text) {
        Some(w) => {
            let w = interpolate(&w, &scope)?;
            Some(build_dir.join(w))
        }
        None => None,
    };
    let env = exports_of(&env, &scope)?;
    Ok(Resolved::Exec {
        argv,
        work_dir,
        env,
    })
}

fn yaml_text(value: &serde_yaml::Value) -> Option<String> {
    match value {
        serde_yaml::Value::String(s) => Some(s.clone()),
        serde_yaml::Value::Number(n) => Some(n.to_string()),
        serde_yaml::Value::Bool(b) => Some(b.to_string()),
        _ => None,
    }
}

/// The call's inputs checked against the spec, with the spec's defaults.
fn merge_inputs(
    reference: &str,
    spec: &serde_yaml::Value,
    given: &BTreeMap<String, Value>,
) -> Result<BTreeMap<String, Value>, String> {
    let declared = match spec.get("spec").and_then(|s| s.get("inputs")) {
        Some(serde_yaml::Value::Mapping(m)) => m.clone(),
        _ => serde_yaml::Mapping::new(),
    };
    let mut inputs = BTreeMap::new();
    for (key, declaration) in &declared {
        let Some(name) = yaml_text(key) else { continue };
        match (given.get(&name), declaration.get("default")) {
            (Some(value), _) => {
                inputs.insert(name, value.clone());
            }
            (None, Some(default)) => {
                let value = serde_json::to_value(default)
                    .map_err(|e| format!("`{reference}`: default of `{name}`: {e}"))?;
                inputs.insert(name, value);
            }
            (None, None) => {
                return Err(format!("`{reference}`: input `{name}` is required"));
            }
        }
    }
    for name in given.keys() {
        if !inputs.contains_key(name) {
            return Err(format!("`{reference}`: unknown input `{name}`"));
        }
    }
    Ok(inputs)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::payload::parse_run;
    use serde_json::json;

    fn summary(calls: &[FunctionCall]) -> String {
        calls
            .iter()
            .map(|c| {
                format!(
                    "{}:{}:{}:{}:[{}]",
                    c.name,
                    c.kind_name(),
                    c.reference().unwrap_or_default(),
                    c.version(),
                    c.input_names().join(",")
                )
            })
            .collect::<Vec<_>>()
            .join(" ")
    }

    fn check(input: Value, expected: &str) {
        let actual = match parse_run(&input) {
            Ok(calls) => summary(&calls),
            Err(e) => format!("error: {e}"),
        };
        assert_eq!(actual, expected, "{input}");
    }

    #[test]
    fn parsing() {
        check(
            json!(
                r#"[{"name":"hello","script":"echo hi"},{"name":"x","step":"gitlab.com/org/fn@v1.2","inputs":{"b":1,"a":"s"}}]"#
            ),
            "hello:script::local:[] x:step:gitlab.com/org/fn:v1.2:[a,b]",
        );
        check(
            json!([{"name": "l", "func": "./fns/greet", "inputs": {"who": "x"}}, {"name": "r", "func": "registry.example.com/fn"}]),
            "l:func:./fns/greet:local:[who] r:func:registry.example.com/fn::[]",
        );
        check(
            json!([{"name": "u", "step": "https://user:pw@host/fn@v2"}]),
            "u:step:https://host/fn:v2:[]",
        );
        check(
            json!("not json"),
            "error: is not valid JSON: expected ident at line 1 column 2",
        );
        check(json!({"name": "x"}), "error: is not a list of functions");
        check(json!([]), "error: is an empty list");
        check(json!([{"script": "x"}]), "error: run[0] has no `name`");
        check(
            json!([{"name": "a", "script": "x", "step": "y"}]),
            "error: run[0] (`a`) needs exactly one of `script`, `step` or `func`",
        );
        check(
            json!([{"name": "a", "script": [1]}]),
            "error: run[0] (`a`) has a script line that is not a string",
        );
        check(
            json!([{"name": "a", "script": "x", "inputs": []}]),
            "error: run[0] (`a`) inputs is not an object",
        );
    }

    #[test]
    fn expressions() {
        let inputs: BTreeMap<String, Value> = [
            ("who".to_string(), json!("world")),
            ("n".to_string(), json!(3)),
        ]
        .into();
        let env = vec![("GREETING".to_string(), "hello".to_string())];
        let job = vec![ExportVar {
            key: "CI_JOB_NAME".into(),
            value: "build".into(),
        }];
        let scope = Scope {
            inputs: &inputs,
            env: &env,
            job: &job,
            step_dir: Some(Path::new("/s")),
        };
        let check = |text: &str, expected: Result<&str, &str>| {
            assert_eq!(
                interpolate(text, &scope),
                expected.map(String::from).map_err(String::from),
                "{text}"
            );
        };
        check(
            "${{ env.GREETING }}, ${{inputs.who}} x${{ inputs.n }}",
            Ok("hello, world x3"),
        );
        check(
            "${{ job.CI_JOB_NAME }} ${{ env.CI_JOB_NAME }} [${{ job.NOPE }}]",
            Ok("build build []"),
        );
        check("${{ step_dir }}/run.sh", Ok("/s/run.sh"));
        check("plain $HOME", Ok("plain $HOME"));
        check(
            "${{ inputs.missing }}",
            Err("`${{ inputs.missing }}`: no input named `missing`"),
        );
        check("${{ steps.a.outputs.b }}", Err("`${{ steps.a.outputs.b }}` is not an expression this runner knows (inputs.NAME, env.NAME, job.NAME, step_dir)"));
        check(
            "${{ inputs.who",
            Err("unclosed expression in `${{ inputs.who`"),
        );
    }

    #[test]
    fn local_functions_resolve_with_defaults_and_checks() {
        let build = tempfile::tempdir().unwrap();
        let dir = build.path().join("fns/greet");
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(
            dir.join("step.yml"),
            "spec:\n  inputs:\n    who:\n      type: string\n    punct:\n      default: '!'\n---\nexec:\n  command: [echo, 'hi ${{ inputs.who }}${{ inputs.punct }}']\nenv:\n  FROM_STEP: yes\n",
        )
        .unwrap();
        let call = |inputs: Value| FunctionCall {
            name: "g".into(),
            kind: FunctionKind::Reference {
                keyword: "step",
                reference: "./fns/greet".into(),
            },
            inputs: inputs
                .as_object()
                .unwrap()
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
            env: vec![],
        };
        match resolve(&call(json!({"who": "you"})), build.path(), &[]).unwrap() {
            Resolved::Exec { argv, env, .. } => {
                assert_eq!(argv, vec!["echo", "hi you!"]);
                assert_eq!(env[0].key, "FROM_STEP");
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(
            resolve(&call(json!({})), build.path(), &[]).unwrap_err(),
            "`./fns/greet`: input `who` is required"
        );
        assert_eq!(
            resolve(&call(json!({"who": "a", "extra": 1})), build.path(), &[]).unwrap_err(),
            "`./fns/greet`: unknown input `extra`"
        );
        let remote = FunctionCall {
            kind: FunctionKind::Reference {
                keyword: "func",
                reference: "gitlab.com/org/fn@v1".into(),
            },
            ..call(json!({}))
        };
        assert_eq!(
            resolve(&remote, build.path(), &[]).unwrap_err(),
            "cannot resolve func `gitlab.com/org/fn@v1`: this runner runs only local functions (`./path` with a step.yml), not remote references"
        );
        let missing = FunctionCall {
            kind: FunctionKind::Reference {
                keyword: "step",
                reference: "./nope".into(),
            },
            ..call(json!({}))
        };
        assert_eq!(
            resolve(&missing, build.path(), &[]).unwrap_err(),
            "cannot resolve `./nope`: no such function in the project directory"
        );
    }
}

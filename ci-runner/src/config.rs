//! `config.toml`, shaped like GitLab Runner's:
//!
//! ```toml
//! concurrent = 4          # jobs at once, over all runners
//! check_interval = 3      # seconds between job requests when idle (0 = default)
//!
//! [[runners]]
//!   name = "my-runner"
//!   url = "https://gitlab.example.com"
//!   id = 12
//!   token = "glrt-..."
//!   executor = "shell"
//!   shell = "bash"
//!   builds_dir = "/var/lib/ci-runner/builds"
//!   [runners.telemetry]
//!     endpoint = "http://collector:4318/v1/traces"
//!     protocol = "http/protobuf"
//!     flush_timeout = 5
//! ```
//!
//! Unknown keys elsewhere are ignored (a GitLab Runner config has many), but
//! `[runners.telemetry]` is ours and rejects typos. Command-line flags win
//! over the file: `--url`/`--token` replace the first runner's (and with
//! `--token` only that runner runs); `--builds-dir` and the telemetry flags
//! apply to every runner.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use runner_telemetry::config::{
    self as telemetry_config, DurationValue, Env, ExportSettings, TelemetryOverrides,
    TelemetrySettings,
};

/// Default time between job requests when there is no job.
pub const DEFAULT_CHECK_INTERVAL: Duration = Duration::from_millis(1000);
/// How long a job's final status and log are retried while GitLab fails.
pub const DEFAULT_FINAL_UPDATE_LIMIT: Duration = Duration::from_secs(3600);
/// How long, after the first signal, a job's final status and log are still
/// retried (GitLab Runner's `shutdown_timeout` default).
pub const DEFAULT_SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Debug, Clone, Default, Deserialize, Serialize)]
pub struct ConfigFile {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub concurrent: Option<usize>,
    /// Seconds, as GitLab Runner has it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub check_interval: Option<DurationValue>,
    /// Where to serve Prometheus metrics (`GET /metrics`), `HOST:PORT` or
    /// `:PORT`, as GitLab Runner's `listen_address`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub listen_address: Option<String>,
    /// Seconds a job's final status and log are still retried after the
    /// first signal (GitLab Runner's `shutdown_timeout`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shutdown_timeout: Option<DurationValue>,
    #[serde(default)]
    pub runners: Vec<RunnerSection>,
}

#[derive(Clone, Default, Deserialize, Serialize)]
pub struct RunnerSection {
    #[serde(default)]
    pub name: Option<String>,
    #[serde(default)]
    pub url: Option<String>,
    #[serde(default)]
    pub id: Option<i64>,
    #[serde(default)]
    pub token: Option<String>,
    #[serde(default)]
    pub executor: Option<String>,
    #[serde(default)]
    pub shell: Option<String>,
    #[serde(default)]
    pub builds_dir: Option<String>,
    /// The local cache (GitLab Runner's `cache_dir`); default
    /// `<builds_dir>/../cache`.
    #[serde(default)]
    pub cache_dir: Option<String>,
    #[serde(default)]
    pub telemetry: Option<TelemetrySettings>,
}

impl std::fmt::Debug for RunnerSection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RunnerSection")
            .field("name", &self.name)
            .field(
                "url",
                &self
                    .url
                    .as_deref()
                    .map(runner_telemetry::secrets::strip_credentials),
            )
            .field("id", &self.id)
            .field("executor", &self.executor)
            .finish_non_exhaustive()
    }
}

/// Command-line settings of `ci-runner run`.
#[derive(Debug, Clone, Default)]
pub struct RunFlags {
    pub config: Option<PathBuf>,
    pub url: Option<String>,
    pub token: Option<String>,
    pub builds_dir: Option<PathBuf>,
    pub concurrent: Option<usize>,
    pub max_jobs: Option<u64>,
    pub check_interval: Option<Duration>,
    pub telemetry: TelemetryOverrides,
    /// `--metrics-listen`: wins over the file's `listen_address`.
    pub metrics_listen: Option<String>,
    /// `--cache-dir`: for every runner, wins over the file.
    pub cache_dir: Option<PathBuf>,
    /// `--derive-trace-id-from-pipeline`: the old-GitLab fallback of
    /// negotiation, for every runner (see `runner_telemetry::negotiate`).
    pub derive_trace_id_from_pipeline: bool,
    /// `--final-update-limit`: how long a job's final status and log are
    /// retried while GitLab fails.
    pub final_update_limit: Option<Duration>,
    /// `--shutdown-timeout`: wins over the file's `shutdown_timeout`.
    pub shutdown_timeout: Option<Duration>,
}

/// One runner, ready to run.
#[derive(Clone)]
pub struct RunnerConfig {
    pub name: String,
    pub url: String,
    pub id: Option<i64>,
    pub token: String,
    pub executor: String,
    pub shell: String,
    pub builds_dir: PathBuf,
    pub cache_dir: PathBuf,
    /// Export and negotiation settings (`telemetry.negotiation` carries
    /// `--derive-trace-id-from-pipeline`).
    pub telemetry: ExportSettings,
}

impl std::fmt::Debug for RunnerConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RunnerConfig")
            .field("name", &self.name)
            .field(
                "url",
                &runner_telemetry::secrets::strip_credentials(&self.url),
            )
            .field("id", &self.id)
            .field("builds_dir", &self.builds_dir)
            .field("telemetry", &self.telemetry)
            .finish_non_exhaustive()
    }
}

/// Everything `run` needs.
#[derive(Debug, Clone)]
pub struct RunConfig {
    pub concurrent: usize,
    pub check_interval: Duration,
    pub max_jobs: Option<u64>,
    pub runners: Vec<RunnerConfig>,
    /// Where to serve Prometheus metrics, if anywhere.
    pub metrics_listen: Option<std::net::SocketAddr>,
    /// How long a job's final status and log are retried while GitLab fails.
    pub final_update_limit: Duration,
    /// How long they are still retried after the first signal.
    pub shutdown_timeout: Duration,
}

/// The default config path: `$HOME/.gitlab-runner/config.toml` (GitLab
/// Runner's user-mode location), or `./config.toml` without a home.
pub fn default_config_path() -> PathBuf {
    match std::env::var_os("HOME") {
        Some(home) => Path::new(&home).join(".gitlab-runner").join("config.toml"),
        None => PathBuf::from("config.toml"),
    }
}

pub fn load(path: &Path) -> Result<ConfigFile, String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("cannot read `{}`: {e}", path.display()))?;
    parse(&text).map_err(|e| format!("`{}`: {e}", path.display()))
}

pub fn parse(text: &str) -> Result<ConfigFile, String> {
    toml::from_str(text).map_err(|e| e.message().to_string())
}

/// This machine's host name, for the default runner name.
pub fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .or_else(|_| std::fs::read_to_string("/etc/hostname"))
        .map(|s| s.trim().to_string())
        .ok()
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "ci-runner".into())
}

/// Merges the file (if any) with the flags and the environment.
pub fn resolve(
    file: Option<ConfigFile>,
    flags: &RunFlags,
    env: &dyn Env,
) -> Result<RunConfig, String> {
    let file = file.unwrap_or_default();
    let mut sections = file.runners.clone();
    if flags.url.is_some() || flags.token.is_some() {
        let mut first = sections.first().cloned().unwrap_or_default();
        if let Some(url) = &flags.url {
            first.url = Some(url.clone());
        }
        if let Some(token) = &flags.token {
            first.token = Some(token.clone());
            sections = vec![first];
        } else if sections.is_empty() {
            sections.push(first);
        } else {
            sections[0] = first;
        }
    }
    if sections.is_empty() {
        return Err(
            "no runner configured: give --url and --token, or a config file with [[runners]]"
                .into(),
        );
    }
    let cwd = std::env::current_dir().unwrap_or_else(|_| PathBuf::from("."));
    let mut runners = Vec::new();
    for (i, section) in sections.into_iter().enumerate() {
        let name = section
            .name
            .clone()
            .filter(|n| !n.is_empty())
            .unwrap_or_else(hostname);
        let what = format!("runner #{} (`{name}`)", i + 1);
        let url = section
            .url
            .clone()
            .filter(|u| !u.is_empty())
            .ok_or(format!("{what} has no url"))?;
        let token = section
            .token
            .clone()
            .filter(|t| !t.is_empty())
            .ok_or(format!("{what} has no token"))?;
        let executor = section.executor.clone().unwrap_or_else(|| "shell".into());
        if executor != "shell" {
            return Err(format!(
                "{what}: executor `{executor}` is not supported, only `shell`"
            ));
        }
        let shell = section.shell.clone().unwrap_or_else(|| "bash".into());
        if shell != "bash" {
            return Err(format!(
                "{what}: shell `{shell}` is not supported, only `bash`"
            ));
        }
        let builds_dir = match (&flags.builds_dir, &section.builds_dir) {
            (Some(dir), _) => dir.clone(),
            (None, Some(dir)) if !dir.is_empty() => PathBuf::from(dir),
            _ => PathBuf::from("builds"),
        };
        let builds_dir = if builds_dir.is_absolute() {
            builds_dir
        } else {
            cwd.join(builds_dir)
        };
        let cache_dir = match (&flags.cache_dir, &section.cache_dir) {
            (Some(dir), _) => dir.clone(),
            (None, Some(dir)) if !dir.is_empty() => PathBuf::from(dir),
            _ => builds_dir
                .parent()
                .map(|p| p.join("cache"))
                .unwrap_or_else(|| PathBuf::from("cache")),
        };
        let cache_dir = if cache_dir.is_absolute() {
            cache_dir
        } else {
            cwd.join(cache_dir)
        };
        let mut telemetry = telemetry_config::resolve(
            &section.telemetry.clone().unwrap_or_default(),
            &flags.telemetry,
            env,
        )
        .map_err(|e| format!("{what} [runners.telemetry]: {e}"))?;
        telemetry.negotiation.derive_trace_id_from_pipeline = flags.derive_trace_id_from_pipeline;
        runners.push(RunnerConfig {
            name,
            url,
            id: section.id,
            token,
            executor,
            shell,
            builds_dir,
            cache_dir,
            telemetry,
        });
    }
    let check_interval = match (flags.check_interval, &file.check_interval) {
        (Some(interval), _) => interval,
        (None, Some(value)) => match value
            .to_duration()
            .map_err(|e| format!("check_interval: {e}"))?
        {
            d if d.is_zero() => DEFAULT_CHECK_INTERVAL,
            d => d,
        },
        (None, None) => DEFAULT_CHECK_INTERVAL,
    };
    let concurrent = flags.concurrent.or(file.concurrent).unwrap_or(1).max(1);
    let metrics_listen = match flags
        .metrics_listen
        .as_deref()
        .or(file.listen_address.as_deref())
        .map(str::trim)
        .filter(|a| !a.is_empty())
    {
        Some(address) => Some(parse_listen_address(address)?),
        None => None,
    };
    let shutdown_timeout = match (flags.shutdown_timeout, &file.shutdown_timeout) {
        (Some(timeout), _) => timeout,
        (None, Some(value)) => value
            .to_duration()
            .map_err(|e| format!("shutdown_timeout: {e}"))?,
        (None, None) => DEFAULT_SHUTDOWN_TIMEOUT,
    };
    Ok(RunConfig {
        concurrent,
        check_interval,
        max_jobs: flags.max_jobs,
        runners,
        metrics_listen,
        final_update_limit: flags
            .final_update_limit
            .unwrap_or(DEFAULT_FINAL_UPDATE_LIMIT),
        shutdown_timeout,
    })
}

/// `HOST:PORT`, or `:PORT` for every interface (GitLab Runner's form).
pub fn parse_listen_address(address: &str) -> Result<std::net::SocketAddr, String> {
    let full = match address.strip_prefix(':') {
        Some(port) => format!("0.0.0.0:{port}"),
        None => address.to_string(),
    };
    full.parse()
        .map_err(|_| format!("metrics listen address `{address}` is not HOST:PORT or :PORT"))
}

/// Adds (or updates, same `url` and `name`) a runner in the config file at
/// `path`, keeping everything else in it. The file is written with mode
/// 0600: it holds tokens.
pub fn write_registration(
    path: &Path,
    name: &str,
    url: &str,
    id: Option<i64>,
    token: &str,
    builds_dir: Option<&Path>,
) -> Result<(), String> {
    let mut table: toml::Table = match std::fs::read_to_string(path) {
        Ok(text) => text
            .parse()
            .map_err(|e: toml::de::Error| format!("`{}`: {}", path.display(), e.message()))?,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => toml::Table::new(),
        Err(e) => return Err(format!("cannot read `{}`: {e}", path.display())),
    };
    table.entry("concurrent").or_insert(toml::Value::Integer(1));
    table
        .entry("check_interval")
        .or_insert(toml::Value::Integer(0));
    let runners = table
        .entry("runners")
        .or_insert_with(|| toml::Value::Array(Vec::new()));
    let toml::Value::Array(runners) = runners else {
        return Err(format!(
            "`{}`: `runners` is not an array of tables",
            path.display()
        ));
    };
    let same = |r: &toml::Value| {
        r.get("url").and_then(toml::Value::as_str) == Some(url)
            && r.get("name").and_then(toml::Value::as_str) == Some(name)
    };
    let index = match runners.iter().position(same) {
        Some(i) => i,
        None => {
            runners.push(toml::Value::Table(toml::Table::new()));
            runners.len() - 1
        }
    };
    let toml::Value::Table(entry) = &mut runners[index] else {
        return Err(format!(
            "`{}`: a `[[runners]]` entry is not a table",
            path.display()
        ));
    };
    entry.insert("name".into(), name.into());
    entry.insert("url".into(), url.into());
    match id {
        Some(id) => {
            entry.insert("id".into(), id.into());
        }
        None => {
            entry.remove("id");
        }
    }
    entry.insert("token".into(), token.into());
    entry.insert("executor".into(), "shell".into());
    entry.insert("shell".into(), "bash".into());
    if let Some(dir) = builds_dir {
        entry.insert(
            "builds_dir".into(),
            dir.to_string_lossy().into_owned().into(),
        );
    }
    let text =
        toml::to_string_pretty(&table).map_err(|e| format!("cannot write the config: {e}"))?;
    if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent)
            .map_err(|e| format!("cannot create `{}`: {e}", parent.display()))?;
    }
    write_private(path, text.as_bytes())
        .map_err(|e| format!("cannot write `{}`: {e}", path.display()))
}

/// Writes `path` as 0600, also when it existed with a wider mode.
fn write_private(path: &Path, data: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::PermissionsExt;
    let mut file = super::shell::create_private(path)?;
    file.set_permissions(std::fs::Permissions::from_mode(0o600))?;
    file.write_all(data)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    fn check(file: Option<&str>, flags: RunFlags, expected: &str) {
        let file = match file.map(parse).transpose() {
            Ok(file) => file,
            Err(e) => return assert_eq!(format!("error: {e}"), expected),
        };
        let actual = match resolve(file, &flags, &BTreeMap::new()) {
            Ok(c) => {
                let runners: Vec<String> = c
                    .runners
                    .iter()
                    .map(|r| {
                        format!(
                            "{}@{} id={:?} token={} dir={} telemetry={}{}",
                            r.name,
                            r.url,
                            r.id,
                            r.token,
                            r.builds_dir.display(),
                            r.telemetry.endpoint,
                            if r.telemetry.enabled {
                                ""
                            } else {
                                " (disabled)"
                            }
                        )
                    })
                    .collect();
                format!(
                    "concurrent={} interval={:?} max={:?} [{}]",
                    c.concurrent,
                    c.check_interval,
                    c.max_jobs,
                    runners.join("; ")
                )
            }
            Err(e) => format!("error: {e}"),
        };
        assert_eq!(actual, expected);
    }

    const FILE: &str = r#"
concurrent = 3
check_interval = 2
listen_address = ":9252"   # unknown to us: ignored

[[runners]]
  name = "a"
  url = "http://gitlab-a"
  id = 5
  token = "tok-a"
  executor = "shell"
  builds_dir = "/b/a"
  limit = 2
  [runners.cache]
    Type = "s3"
  [runners.telemetry]
    endpoint = "http://collector:4318/v1/traces"

[[runners]]
  name = "b"
  url = "http://gitlab-b"
  token = "tok-b"
  builds_dir = "/b/b"
  [runners.telemetry]
    disabled = true
"#;

    #[test]
    fn resolution() {
        check(
            Some(FILE),
            RunFlags::default(),
            "concurrent=3 interval=2s max=None [a@http://gitlab-a id=Some(5) token=tok-a dir=/b/a telemetry=http/protobuf+http://collector:4318/v1/traces; b@http://gitlab-b id=None token=tok-b dir=/b/b telemetry=http/protobuf+http://localhost:4318/v1/traces (disabled)]",
        );
        let flags = RunFlags {
            url: Some("http://flag".into()),
            token: Some("tok-flag".into()),
            builds_dir: Some("/flag/builds".into()),
            concurrent: Some(8),
            max_jobs: Some(2),
            check_interval: Some(Duration::from_millis(100)),
            telemetry: TelemetryOverrides {
                endpoint: Some("http://flagcollector:4318/v1/traces".into()),
                ..Default::default()
            },
            ..Default::default()
        };
        check(
            Some(FILE),
            flags.clone(),
            "concurrent=8 interval=100ms max=Some(2) [a@http://flag id=Some(5) token=tok-flag dir=/flag/builds telemetry=http/protobuf+http://flagcollector:4318/v1/traces]",
        );
        check(
            None,
            flags,
            &format!("concurrent=8 interval=100ms max=Some(2) [{}@http://flag id=None token=tok-flag dir=/flag/builds telemetry=http/protobuf+http://flagcollector:4318/v1/traces]", hostname()),
        );
        check(None, RunFlags::default(), "error: no runner configured: give --url and --token, or a config file with [[runners]]");
        check(
            Some("[[runners]]\nname='x'\nurl='http://g'"),
            RunFlags::default(),
            "error: runner #1 (`x`) has no token",
        );
        check(
            Some("[[runners]]\nname='x'\nurl='http://g'\ntoken='t'\nexecutor='docker'"),
            RunFlags::default(),
            "error: runner #1 (`x`): executor `docker` is not supported, only `shell`",
        );
        check(Some("[[runners]]\nname='x'\nurl='http://g'\ntoken='t'\n[runners.telemetry]\nendpont='typo'"), RunFlags::default(), "error: unknown field `endpont`, expected one of `disabled`, `logs`, `endpoint`, `protocol`, `headers`, `timeout`, `flush_timeout`, `service_name`, `connection_string`, `buffer_max_spans`, `buffer_max_bytes`, `max_age`, `retry_initial_backoff`, `retry_max_backoff`, `shutdown_timeout`, `ca_file`, `bearer_token_file`, `gcp_metadata_url`");
    }

    #[test]
    fn registration_updates_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub/config.toml");
        write_registration(&path, "r1", "http://g", Some(1), "tok1", None).unwrap();
        write_registration(
            &path,
            "r2",
            "http://g",
            Some(2),
            "tok2",
            Some(Path::new("/builds")),
        )
        .unwrap();
        write_registration(&path, "r1", "http://g", Some(3), "tok3", None).unwrap();
        let file = load(&path).unwrap();
        let summary: Vec<String> = file
            .runners
            .iter()
            .map(|r| {
                format!(
                    "{}:{:?}:{}",
                    r.name.clone().unwrap(),
                    r.id,
                    r.token.clone().unwrap()
                )
            })
            .collect();
        assert_eq!(summary, vec!["r1:Some(3):tok3", "r2:Some(2):tok2"]);
        assert_eq!(file.concurrent, Some(1));
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(
            std::fs::metadata(&path).unwrap().permissions().mode() & 0o777,
            0o600
        );
    }
}

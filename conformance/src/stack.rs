//! The embedded stack: the real ClickHouse engine (chDB, hosted by
//! `compose/chdb-server/chdb_http.py`, which speaks ClickHouse's HTTP
//! interface) and a real OpenTelemetry collector (rotel, with its ClickHouse
//! exporter), both from package registries, no Docker.
//!
//! Two ways to hold one:
//! - tests call [`Stack::start`] with [`StackOptions::isolated`]: free ports,
//!   a fresh data directory, everything stopped when the handle drops (also
//!   when the test panics, and by the kernel if the test process dies);
//! - `cargo xtask stack up` starts a detached stack in `target/stack/` and
//!   records PID files that [`down`] uses to stop exactly those processes.
//!
//! With `CONFORMANCE_STACK=docker` ([`StackOptions::isolated`] reads it), the
//! same handle holds the Docker stack of `compose/` instead
//! ([`crate::docker`]): the tests run unchanged against either.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context, Result};

use crate::clickhouse::ClickHouse;
use crate::docker::{Backend, DockerStack};
pub use crate::endpoints::{Endpoints, CLICKHOUSE_USER};
use crate::paths;
use crate::process::{self, Lifetime, ManagedProcess};
use crate::venv::{self, Venv};

const CHDB: &str = "chdb-http";
const COLLECTOR: &str = "rotel";

/// How to start a stack.
#[derive(Debug, Clone)]
pub struct StackOptions {
    /// Data, logs, PID files and `endpoints.env` go here.
    pub dir: PathBuf,
    pub lifetime: Lifetime,
    /// How long each component may take to answer.
    pub start_timeout: Duration,
    /// Embedded processes or the Docker images (`CONFORMANCE_STACK`).
    pub backend: Backend,
}

impl StackOptions {
    /// A stack of its own for one test: a new directory under
    /// `target/test-stacks/`, owned by the caller.
    pub fn isolated() -> StackOptions {
        static COUNTER: AtomicUsize = AtomicUsize::new(0);
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0);
        let name = format!(
            "{}-{}-{nanos:08x}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::Relaxed)
        );
        StackOptions {
            dir: paths::target_dir().join("test-stacks").join(name),
            lifetime: Lifetime::Owned,
            start_timeout: Duration::from_secs(60),
            backend: Backend::from_env().unwrap_or(Backend::Embedded),
        }
    }

    /// The long-lived stack of `cargo xtask stack up`.
    pub fn detached(dir: &Path) -> StackOptions {
        StackOptions {
            dir: dir.to_path_buf(),
            lifetime: Lifetime::Detached,
            start_timeout: Duration::from_secs(60),
            backend: Backend::Embedded,
        }
    }
}

/// A running stack.
#[derive(Debug)]
pub struct Stack {
    options: StackOptions,
    /// None for the Docker backend.
    venv: Option<Venv>,
    endpoints: Endpoints,
    chdb: Option<ManagedProcess>,
    collector: Option<ManagedProcess>,
    docker: Option<DockerStack>,
}

impl Stack {
    /// Installs what is missing, starts chDB, applies the schema, starts the
    /// collector, and waits until each answers. On failure, whatever was
    /// started is stopped and the error carries the tail of the failing
    /// component's log.
    pub fn start(options: StackOptions) -> Result<Stack> {
        Stack::start_with_progress(options, &mut |_| {})
    }

    pub fn start_with_progress(
        options: StackOptions,
        progress: &mut dyn FnMut(&str),
    ) -> Result<Stack> {
        // A mistyped CONFORMANCE_STACK is an error, not the default.
        Backend::from_env()?;
        if options.backend == Backend::Docker {
            return Stack::start_docker(options, progress);
        }
        let venv = venv::ensure(progress)?;
        fs::create_dir_all(options.dir.join("logs"))
            .with_context(|| format!("creating {}", options.dir.display()))?;
        let password = stack_password(&options.dir)?;

        progress("Starting ClickHouse (chDB)");
        let (chdb, clickhouse_url) = start_chdb(&options, &venv, &password)?;
        let clickhouse = ClickHouse::new(&clickhouse_url, CLICKHOUSE_USER, &password);
        let statements = clickhouse
            .apply_schema(&paths::sql_dir())
            .context("applying the schema from compose/sql")?;
        progress(&format!(
            "Applied {statements} schema statements from compose/sql"
        ));

        let mut stack = Stack {
            endpoints: Endpoints {
                clickhouse_url,
                clickhouse_user: CLICKHOUSE_USER.to_string(),
                clickhouse_password: password,
                otlp_http: String::new(),
                otlp_grpc: String::new(),
            },
            options,
            venv: Some(venv),
            chdb: Some(chdb),
            collector: None,
            docker: None,
        };
        progress("Starting the collector (rotel)");
        stack.start_collector_on(None)?;
        fs::write(
            stack.options.dir.join("endpoints.env"),
            stack.endpoints.to_env_file(),
        )?;
        fs::set_permissions(
            stack.options.dir.join("endpoints.env"),
            fs::Permissions::from_mode(0o600),
        )?;
        Ok(stack)
    }

    /// The Docker stack of `compose/` on the official images (see
    /// [`crate::docker`]), behind the same handle.
    fn start_docker(options: StackOptions, progress: &mut dyn FnMut(&str)) -> Result<Stack> {
        fs::create_dir_all(options.dir.join("logs"))
            .with_context(|| format!("creating {}", options.dir.display()))?;
        let password = stack_password(&options.dir)?;
        progress("Starting the Docker stack (ClickHouse, two backend collectors, the gateway)");
        let docker = DockerStack::start(&options.dir, options.start_timeout, &password)?;
        Ok(Stack {
            endpoints: docker.endpoints().clone(),
            options,
            venv: None,
            chdb: None,
            collector: None,
            docker: Some(docker),
        })
    }

    /// The Docker backend's handle, when the stack runs on Docker.
    pub fn docker(&self) -> Option<&DockerStack> {
        self.docker.as_ref()
    }

    pub fn endpoints(&self) -> &Endpoints {
        &self.endpoints
    }

    /// The file holding the ClickHouse password (mode 0600).
    pub fn password_file(&self) -> PathBuf {
        password_file(&self.options.dir)
    }

    pub fn dir(&self) -> &Path {
        &self.options.dir
    }

    pub fn clickhouse(&self) -> ClickHouse {
        self.endpoints.clickhouse()
    }

    /// (component, PID) of the running components, e.g. to sample their memory.
    pub fn pids(&self) -> Vec<(&str, u32)> {
        [&self.chdb, &self.collector]
            .into_iter()
            .flatten()
            .map(|p| (p.name.as_str(), p.pid()))
            .collect()
    }

    /// Stops the collector only (an outage); [`Stack::start_collector`] brings
    /// it back on the same ports.
    pub fn stop_collector(&mut self) {
        if let Some(docker) = &mut self.docker {
            return docker.stop_gateway();
        }
        if let Some(mut collector) = self.collector.take() {
            collector.stop(Duration::from_secs(5));
        }
    }

    pub fn start_collector(&mut self) -> Result<()> {
        if let Some(docker) = &mut self.docker {
            return docker.start_gateway();
        }
        let ports = (
            Endpoints::port_of(&self.endpoints.otlp_grpc),
            Endpoints::port_of(&self.endpoints.otlp_http),
        );
        match ports {
            (Some(grpc), Some(http)) => self.start_collector_on(Some((grpc, http))),
            _ => self.start_collector_on(None),
        }
    }

    fn start_collector_on(&mut self, ports: Option<(u16, u16)>) -> Result<()> {
        // A free port may be taken by someone else before rotel binds it:
        // try fresh ones a few times unless the caller asked for given ports.
        let attempts = if ports.is_some() { 1 } else { 3 };
        let mut last_error = None;
        for _ in 0..attempts {
            let (grpc, http) = match ports {
                Some(p) => p,
                None => (process::free_port()?, process::free_port()?),
            };
            let venv = self
                .venv
                .as_ref()
                .context("the embedded stack has a venv")?;
            match start_collector(&self.options, venv, &self.endpoints, grpc, http) {
                Ok(collector) => {
                    self.collector = Some(collector);
                    self.endpoints.otlp_grpc = format!("http://127.0.0.1:{grpc}");
                    self.endpoints.otlp_http = format!("http://127.0.0.1:{http}");
                    return Ok(());
                }
                Err(e) => last_error = Some(e),
            }
        }
        Err(last_error.expect("at least one attempt"))
    }

    /// Leaves the processes running (for `stack up`), recording their PIDs in
    /// `<dir>/pids/`.
    pub fn detach(mut self) -> Result<Endpoints> {
        if self.docker.is_some() {
            bail!("the Docker stack is not detached: run `docker compose up` in compose/");
        }
        let pids = self.options.dir.join("pids");
        fs::create_dir_all(&pids)?;
        for process in [self.chdb.take(), self.collector.take()]
            .into_iter()
            .flatten()
        {
            let name = process.name.clone();
            let pid = process.release();
            fs::write(pids.join(format!("{name}.pid")), format!("{pid}\n"))?;
        }
        Ok(self.endpoints.clone())
    }
}

impl Drop for Stack {
    fn drop(&mut self) {
        if std::thread::panicking() {
            // Leave the logs where a person can read them.
            eprintln!(
                "Embedded stack logs kept in {}",
                self.options.dir.join("logs").display()
            );
        }
        self.stop_collector();
        if let Some(mut chdb) = self.chdb.take() {
            chdb.stop(Duration::from_secs(10));
        }
        if self.options.lifetime == Lifetime::Owned && !std::thread::panicking() {
            let _ = fs::remove_dir_all(&self.options.dir);
        }
    }
}

fn start_chdb(
    options: &StackOptions,
    venv: &Venv,
    password: &str,
) -> Result<(ManagedProcess, String)> {
    let log = options.dir.join("logs").join(format!("{CHDB}.log"));
    let data = options.dir.join("clickhouse");
    let mut cmd = Command::new(venv.python());
    cmd.arg(
        paths::compose_dir()
            .join("chdb-server")
            .join("chdb_http.py"),
    )
    .args(["--listen", "127.0.0.1:0", "--data"])
    .arg(&data)
    .args(["--user", CLICKHOUSE_USER])
    // The collector's inserts (async_insert=1) are answered once they are
    // on disk here and committed in large groups (compose/README.md).
    .arg("--insert-spool")
    .arg(options.dir.join("insert-spool"))
    .args(["--wait-for-async-insert", "0"])
    .env("CHDB_HTTP_PASSWORD", password)
    .env("PYTHONUNBUFFERED", "1");
    let mut chdb = ManagedProcess::spawn(CHDB, cmd, &log, options.lifetime)?;
    let url = chdb
        .wait_for_line("chdb-http listening on ", options.start_timeout)
        .map_err(|e| component_failed(CHDB, &log, e))?;
    let clickhouse = ClickHouse::new(&url, CLICKHOUSE_USER, password);
    process::wait_for("ClickHouse to answer", options.start_timeout, || {
        chdb.check_alive()?;
        Ok(clickhouse.execute("SELECT 1").ok())
    })
    .map_err(|e| component_failed(CHDB, &log, e))?;
    Ok((chdb, url))
}

fn start_collector(
    options: &StackOptions,
    venv: &Venv,
    endpoints: &Endpoints,
    grpc: u16,
    http: u16,
) -> Result<ManagedProcess> {
    let log = options.dir.join("logs").join(format!("{COLLECTOR}.log"));
    let mut cmd = Command::new(venv.rotel_agent()?);
    // rotel reads ROTEL_* variables; only ours may count.
    for (key, _) in std::env::vars_os() {
        if key.to_string_lossy().starts_with("ROTEL_") {
            cmd.env_remove(key);
        }
    }
    cmd.arg("start")
        .args(["--exporter", "clickhouse"])
        .args(["--clickhouse-exporter-endpoint", &endpoints.clickhouse_url])
        .args(["--clickhouse-exporter-database", "otel"])
        .args(["--clickhouse-exporter-user", &endpoints.clickhouse_user])
        .env(
            "ROTEL_CLICKHOUSE_EXPORTER_PASSWORD",
            &endpoints.clickhouse_password,
        )
        // chDB's endpoint does not implement ClickHouse's compressed blocks.
        .args(["--clickhouse-exporter-compression", "none"])
        .args(["--clickhouse-exporter-async-insert", "true"])
        .args(["--otlp-grpc-endpoint", &format!("127.0.0.1:{grpc}")])
        .args(["--otlp-http-endpoint", &format!("127.0.0.1:{http}")])
        // rotel 0.0.1a15's batcher stores the piece of a resource's spans that
        // completes a batch without its resource (ServiceName '', no
        // ResourceAttributes), and drops requests larger than two batches;
        // fixed upstream after the last PyPI release (compose/README.md).
        // Without batching that code never runs: each OTLP request becomes
        // one INSERT, and chdb-http commits concurrent INSERTs together.
        .arg("--disable-batching");
    let mut collector = ManagedProcess::spawn(COLLECTOR, cmd, &log, options.lifetime)?;
    let ready = process::wait_for(
        "the collector's OTLP receivers to accept connections",
        options.start_timeout,
        || {
            collector.check_alive()?;
            Ok((process::port_open(grpc) && process::port_open(http)).then_some(()))
        },
    );
    match ready {
        Ok(()) => Ok(collector),
        Err(e) => Err(component_failed(COLLECTOR, &log, e)),
    }
}

fn component_failed(name: &str, log: &Path, error: anyhow::Error) -> anyhow::Error {
    anyhow::anyhow!(
        "{name} did not come up: {error:#}\nlast lines of {}:\n{}",
        log.display(),
        process::log_tail(log, 20)
    )
}

/// The file holding the ClickHouse password of the stack in `dir`.
pub fn password_file(dir: &Path) -> PathBuf {
    dir.join("credentials")
}

/// The ClickHouse password of the stack in `dir`: kept in `dir/credentials`
/// (mode 0600) so a stack brought down and up again keeps it.
fn stack_password(dir: &Path) -> Result<String> {
    let file = password_file(dir);
    if let Ok(existing) = fs::read_to_string(&file) {
        let existing = existing.trim();
        if !existing.is_empty() {
            return Ok(existing.to_string());
        }
    }
    let mut bytes = [0u8; 16];
    fs::File::open("/dev/urandom")
        .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut bytes))
        .context("reading /dev/urandom")?;
    let password: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    fs::write(&file, format!("{password}\n"))?;
    fs::set_permissions(&file, fs::Permissions::from_mode(0o600))?;
    Ok(password)
}

/// What `down` and `status` know about one component of a detached stack.
#[derive(Debug)]
pub struct ComponentState {
    pub name: String,
    pub pid: Option<u32>,
    /// The PID file names a live process that is really this component.
    pub running: bool,
}

/// Components of the detached stack in `dir`, by their PID files. A PID file
/// whose process is gone, or now belongs to another program, is stale.
pub fn components(dir: &Path) -> Vec<ComponentState> {
    [CHDB, COLLECTOR]
        .iter()
        .map(|name| {
            let pid = fs::read_to_string(dir.join("pids").join(format!("{name}.pid")))
                .ok()
                .and_then(|s| s.trim().parse::<u32>().ok());
            let running = pid.is_some_and(|pid| is_component(pid, name, dir));
            ComponentState {
                name: name.to_string(),
                pid,
                running,
            }
        })
        .collect()
}

fn is_component(pid: u32, name: &str, dir: &Path) -> bool {
    if !process::alive(pid) {
        return false;
    }
    let Some(cmdline) = process::cmdline(pid) else {
        return false;
    };
    match name {
        CHDB => {
            cmdline.contains("chdb_http.py")
                && cmdline.contains(&dir.join("clickhouse").to_string_lossy().to_string())
        }
        _ => cmdline.contains("rotel-agent"),
    }
}

/// Stops the detached stack in `dir`: exactly the processes its PID files
/// name, if they are still ours. Returns one line per component.
pub fn down(dir: &Path) -> Result<Vec<String>> {
    let mut report = Vec::new();
    // The collector first, so it does not write into a stopped ClickHouse.
    for component in components(dir).into_iter().rev() {
        let pid_file = dir.join("pids").join(format!("{}.pid", component.name));
        let line = match (component.pid, component.running) {
            (Some(pid), true) => {
                process::terminate(pid, Duration::from_secs(10));
                if process::alive(pid) {
                    bail!("{} (pid {pid}) did not stop", component.name);
                }
                format!("Stopped {} (pid {pid})", component.name)
            }
            (Some(pid), false) => format!("{} was not running (stale pid {pid})", component.name),
            (None, _) => format!("{} was not running", component.name),
        };
        let _ = fs::remove_file(&pid_file);
        report.push(line);
    }
    Ok(report)
}

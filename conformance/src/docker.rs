//! The Docker backend of [`crate::Stack`]: the Docker stack of `compose/` on
//! the official images, started with testcontainers, for users who have a
//! Docker engine. Selected with `CONFORMANCE_STACK=docker` (what `cargo xtask
//! e2e --stack docker` sets); the embedded stack stays the default.
//!
//! It runs the very files of `compose/`: the image tags of `compose/.env`,
//! the schema of `compose/sql` (ClickHouse's init directory), and the
//! collector configurations of `compose/collector` (a gateway in front of two
//! backends). What differs from `docker compose up` is only what a test
//! needs: ports published on free host ports, containers reaching each other
//! by address (`/etc/hosts` entries for the names the configurations use),
//! and an OIDC issuer for the gateway (a fake-rails process on this host,
//! reached as `host.docker.internal`).
//!
//! The harness sends spans the way the embedded stack's tests do, without a
//! token, to the gateway's internal receivers (4316 gRPC, 4319 HTTP); the
//! OIDC-authenticated receivers (4317, 4318) are reachable through
//! [`DockerStack::authenticated_otlp_http`] and the issuer's token endpoint.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use testcontainers::core::{AccessMode, Host, IntoContainerPort, Mount};
use testcontainers::runners::SyncRunner;
use testcontainers::{Container, GenericImage, ImageExt};

use crate::clickhouse::ClickHouse;
use crate::endpoints::{Endpoints, CLICKHOUSE_USER};
use crate::paths;
use crate::process::{self, wait_for, Lifetime, ManagedProcess};

/// Selects the stack behind [`crate::Stack`]: `embedded` (default) or `docker`.
pub const STACK_ENV: &str = "CONFORMANCE_STACK";

/// The audience the gateway accepts ID tokens for (compose/.env's default).
pub const OIDC_AUDIENCE: &str = "ci-job-telemetry";

/// Where the collector image finds the configurations (compose mounts
/// `compose/collector` at the same place).
const CONFIG_DIR: &str = "/etc/otelcol-contrib/ci";
/// Names the configurations use for the other services.
const BACKEND_HOSTS: [&str; 2] = ["otel-backend-1", "otel-backend-2"];
const ISSUER_HOST: &str = "host.docker.internal";
/// Docker's default bridge, named: containers then report their address on
/// it (`get_bridge_ip_address` inspects the network the container names).
const NETWORK: &str = "bridge";

/// Which stack the harness runs against.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    /// chDB + rotel as processes (needs Python, no Docker).
    Embedded,
    /// The official images through a Docker engine.
    Docker,
}

impl Backend {
    /// From [`STACK_ENV`]; unset means embedded.
    pub fn from_env() -> Result<Backend> {
        match std::env::var(STACK_ENV).as_deref() {
            Err(_) | Ok("") | Ok("embedded") => Ok(Backend::Embedded),
            Ok("docker") => Ok(Backend::Docker),
            Ok(other) => bail!("{STACK_ENV}={other:?}: expected `embedded` or `docker`"),
        }
    }
}

/// The address of the Docker engine the client would use: `DOCKER_HOST`
/// (unix:// or tcp://), else the default socket.
fn engine_address() -> String {
    std::env::var("DOCKER_HOST")
        .ok()
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "unix:///var/run/docker.sock".into())
}

/// Whether a Docker engine answers its `/_ping` with `OK`. One short
/// request, no engine state changed.
pub fn engine_answers() -> Result<()> {
    let address = engine_address();
    let request = b"GET /_ping HTTP/1.0\r\nHost: docker\r\n\r\n";
    let timeout = Some(Duration::from_secs(3));
    let mut answer = Vec::new();
    if let Some(path) = address.strip_prefix("unix://") {
        let mut stream = std::os::unix::net::UnixStream::connect(path)
            .with_context(|| format!("no Docker engine answers at {address}"))?;
        stream.set_read_timeout(timeout)?;
        stream.write_all(request)?;
        stream.read_to_end(&mut answer)?;
    } else if let Some(host) = address.strip_prefix("tcp://") {
        let mut stream = std::net::TcpStream::connect(host)
            .with_context(|| format!("no Docker engine answers at {address}"))?;
        stream.set_read_timeout(timeout)?;
        stream.write_all(request)?;
        stream.read_to_end(&mut answer)?;
    } else {
        bail!("DOCKER_HOST={address}: only unix:// and tcp:// are supported here");
    }
    let answer = String::from_utf8_lossy(&answer);
    if answer.starts_with("HTTP/1.") && answer.trim_end().ends_with("OK") {
        Ok(())
    } else {
        Err(anyhow!(
            "the Docker engine at {address} did not answer its ping"
        ))
    }
}

/// An image reference of `compose/.env` (`name:tag`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageRef {
    pub name: String,
    pub tag: String,
}

/// The value of `key` in `compose/.env`.
pub fn dot_env_value(key: &str) -> Result<String> {
    let file = paths::compose_dir().join(".env");
    let text =
        std::fs::read_to_string(&file).with_context(|| format!("reading {}", file.display()))?;
    text.lines()
        .find_map(|l| l.trim().strip_prefix(key)?.strip_prefix('='))
        .map(str::to_string)
        .with_context(|| format!("`{key}=` is missing from {}", file.display()))
}

fn image(key: &str) -> Result<ImageRef> {
    let reference = dot_env_value(key)?;
    let (name, tag) = reference
        .rsplit_once(':')
        .with_context(|| format!("{key}={reference} has no tag"))?;
    Ok(ImageRef {
        name: name.to_string(),
        tag: tag.to_string(),
    })
}

type Running = Container<GenericImage>;

/// The Docker stack of one test: ClickHouse, two backend collectors, the
/// gateway and its OIDC issuer. Dropping it removes the containers.
pub struct DockerStack {
    endpoints: Endpoints,
    issuer_url: String,
    issuer_public_url: String,
    authenticated_http: String,
    gateway: Option<Running>,
    gateway_ports: GatewayPorts,
    gateway_hosts: Vec<(String, Host)>,
    backends: Vec<Running>,
    clickhouse: Running,
    issuer: ManagedProcess,
    start_timeout: Duration,
    logs: PathBuf,
}

impl std::fmt::Debug for DockerStack {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DockerStack")
            .field("endpoints", &self.endpoints.otlp_http)
            .field("clickhouse", &self.endpoints.clickhouse_url)
            .finish_non_exhaustive()
    }
}

/// Host ports of the gateway, fixed so a restarted gateway keeps them.
#[derive(Debug, Clone, Copy)]
struct GatewayPorts {
    internal_grpc: u16,
    internal_http: u16,
    grpc: u16,
    http: u16,
    health: u16,
}

impl DockerStack {
    /// Starts the stack with its data and logs in `dir`, each container
    /// given at least `start_timeout` to answer.
    pub fn start(dir: &Path, start_timeout: Duration, password: &str) -> Result<DockerStack> {
        engine_answers()?;
        let collector_image = image("OTELCOL_IMAGE")?;
        let clickhouse_image = image("CLICKHOUSE_IMAGE")?;
        let logs = dir.join("logs");
        let timeout = start_timeout.max(Duration::from_secs(120));

        // The issuer first: the gateway's oidc extension reads its discovery
        // document when it starts.
        let (issuer, issuer_url, issuer_public_url) = start_issuer(dir)?;

        let clickhouse = GenericImage::new(&clickhouse_image.name, &clickhouse_image.tag)
            .with_exposed_port(8123.tcp())
            .with_network(NETWORK)
            .with_env_var("CLICKHOUSE_USER", CLICKHOUSE_USER)
            .with_env_var("CLICKHOUSE_PASSWORD", password)
            .with_env_var("CLICKHOUSE_DEFAULT_ACCESS_MANAGEMENT", "1")
            .with_mount(read_only(&paths::sql_dir(), "/docker-entrypoint-initdb.d"))
            .with_ulimit("nofile", 262_144, Some(262_144))
            .with_startup_timeout(timeout)
            .start()
            .context("starting ClickHouse (compose/.env CLICKHOUSE_IMAGE)")?;
        let clickhouse_url = format!(
            "http://127.0.0.1:{}",
            clickhouse.get_host_port_ipv4(8123.tcp())?
        );
        let client = ClickHouse::new(&clickhouse_url, CLICKHOUSE_USER, password);
        // The image runs compose/sql on first start, then restarts the server.
        wait_for("ClickHouse to apply compose/sql", timeout, || {
            let views = client.count(
                "SELECT count() FROM system.tables WHERE database = 'otel' \
                 AND name = 'ci_job_telemetry_traces_mv'",
            );
            Ok(views.ok().filter(|n| *n == 1).map(|_| ()))
        })
        .map_err(|e| container_failed("clickhouse", &clickhouse, e))?;
        let clickhouse_ip = clickhouse.get_bridge_ip_address()?;

        let mut backends = Vec::new();
        let mut gateway_hosts = vec![(ISSUER_HOST.to_string(), Host::HostGateway)];
        for name in BACKEND_HOSTS {
            let backend = collector(&collector_image, "backend.yaml", timeout)
                .with_mapped_port(process::free_port()?, 13133.tcp())
                .with_env_var("CLICKHOUSE_HOST", "clickhouse")
                .with_env_var("CLICKHOUSE_PASSWORD", password)
                .with_env_var("TAIL_SAMPLING_SLOW_MS", "2000")
                .with_host("clickhouse", Host::Addr(clickhouse_ip))
                .start()
                .with_context(|| format!("starting {name}"))?;
            wait_healthy(&backend, name, timeout)?;
            gateway_hosts.push((
                name.to_string(),
                Host::Addr(backend.get_bridge_ip_address()?),
            ));
            backends.push(backend);
        }

        let gateway_ports = GatewayPorts {
            internal_grpc: process::free_port()?,
            internal_http: process::free_port()?,
            grpc: process::free_port()?,
            http: process::free_port()?,
            health: process::free_port()?,
        };
        let mut stack = DockerStack {
            endpoints: Endpoints {
                clickhouse_url,
                clickhouse_user: CLICKHOUSE_USER.to_string(),
                clickhouse_password: password.to_string(),
                otlp_http: format!("http://127.0.0.1:{}", gateway_ports.internal_http),
                otlp_grpc: format!("http://127.0.0.1:{}", gateway_ports.internal_grpc),
            },
            authenticated_http: format!("http://127.0.0.1:{}", gateway_ports.http),
            issuer_url,
            issuer_public_url,
            gateway: None,
            gateway_ports,
            gateway_hosts,
            backends,
            clickhouse,
            issuer,
            start_timeout: timeout,
            logs,
        };
        stack.start_gateway()?;
        Ok(stack)
    }

    pub fn endpoints(&self) -> &Endpoints {
        &self.endpoints
    }

    /// The gateway's OIDC-authenticated OTLP/HTTP base URL (published 4318).
    pub fn authenticated_otlp_http(&self) -> &str {
        &self.authenticated_http
    }

    /// The issuer the gateway trusts (fake-rails on this host), on loopback;
    /// its tokens name it by [`DockerStack::issuer_public_url`]. Its
    /// `/computeMetadata/v1/instance/service-accounts/default/identity`
    /// endpoint mints ID tokens.
    pub fn issuer_url(&self) -> &str {
        &self.issuer_url
    }

    /// The issuer's URL as containers reach it: the tokens' `iss`.
    pub fn issuer_public_url(&self) -> &str {
        &self.issuer_public_url
    }

    /// Stops the gateway only (an outage); [`DockerStack::start_gateway`]
    /// brings it back on the same ports.
    pub fn stop_gateway(&mut self) {
        if let Some(gateway) = self.gateway.take() {
            self.save_log("otel-gateway", &gateway);
            let _ = gateway.rm();
        }
    }

    pub fn start_gateway(&mut self) -> Result<()> {
        let ports = self.gateway_ports;
        let image = image("OTELCOL_IMAGE")?;
        let mut request = collector(&image, "gateway.yaml", self.start_timeout)
            .with_env_var("OIDC_ISSUER_URL", &self.issuer_public_url)
            .with_env_var("OIDC_AUDIENCE", OIDC_AUDIENCE)
            .with_env_var("SAMPLING_PERCENTAGE", "100")
            .with_mapped_port(ports.internal_grpc, 4316.tcp())
            .with_mapped_port(ports.grpc, 4317.tcp())
            .with_mapped_port(ports.http, 4318.tcp())
            .with_mapped_port(ports.internal_http, 4319.tcp())
            .with_mapped_port(ports.health, 13133.tcp());
        for (name, host) in &self.gateway_hosts {
            request = request.with_host(name.clone(), host.clone());
        }
        let gateway = request.start().context("starting otel-gateway")?;
        let health = format!("http://127.0.0.1:{}/", ports.health);
        wait_for("otel-gateway to report healthy", self.start_timeout, || {
            Ok(http_ok(&health).then_some(()))
        })
        .map_err(|e| container_failed("otel-gateway", &gateway, e))?;
        self.gateway = Some(gateway);
        Ok(())
    }

    fn save_log(&self, name: &str, container: &Running) {
        let mut text = container.stdout_to_vec().unwrap_or_default();
        text.extend(container.stderr_to_vec().unwrap_or_default());
        let _ = std::fs::write(self.logs.join(format!("{name}.log")), text);
    }
}

impl Drop for DockerStack {
    fn drop(&mut self) {
        // The containers' output, for a person reading a failed test.
        if std::thread::panicking() {
            if let Some(gateway) = &self.gateway {
                self.save_log("otel-gateway", gateway);
            }
            for (i, backend) in self.backends.iter().enumerate() {
                self.save_log(BACKEND_HOSTS[i], backend);
            }
            self.save_log("clickhouse", &self.clickhouse);
        }
        self.issuer.stop(Duration::from_secs(5));
    }
}

fn read_only(host: &Path, container: &str) -> Mount {
    Mount::bind_mount(host.to_string_lossy(), container).with_access_mode(AccessMode::ReadOnly)
}

/// A collector container running `config` from compose/collector.
fn collector(
    image: &ImageRef,
    config: &str,
    timeout: Duration,
) -> testcontainers::ContainerRequest<GenericImage> {
    GenericImage::new(&image.name, &image.tag)
        .with_network(NETWORK)
        .with_cmd([format!("--config={CONFIG_DIR}/{config}")])
        .with_mount(read_only(
            &paths::compose_dir().join("collector"),
            CONFIG_DIR,
        ))
        .with_startup_timeout(timeout)
}

fn wait_healthy(container: &Running, name: &str, timeout: Duration) -> Result<()> {
    let health = format!(
        "http://127.0.0.1:{}/",
        container.get_host_port_ipv4(13133.tcp())?
    );
    wait_for(&format!("{name} to report healthy"), timeout, || {
        Ok(http_ok(&health).then_some(()))
    })
    .map_err(|e| container_failed(name, container, e))
}

fn http_ok(url: &str) -> bool {
    ureq::get(url)
        .config()
        .timeout_global(Some(Duration::from_secs(2)))
        .build()
        .call()
        .is_ok_and(|r| r.status() == 200)
}

fn container_failed(name: &str, container: &Running, error: anyhow::Error) -> anyhow::Error {
    let stderr = container.stderr_to_vec().unwrap_or_default();
    let text = String::from_utf8_lossy(&stderr);
    let tail: Vec<&str> = text.lines().rev().take(20).collect();
    let tail: Vec<&str> = tail.into_iter().rev().collect();
    anyhow!(
        "{name} did not come up: {error:#}\nlast lines of its output:\n{}",
        tail.join("\n")
    )
}

/// fake-rails on this host as the gateway's OIDC issuer, listening where
/// containers reach it, with its public URL (the tokens' `iss`) being the
/// address containers use.
/// Returns the process, its loopback URL and its public URL.
fn start_issuer(dir: &Path) -> Result<(ManagedProcess, String, String)> {
    let port = process::free_port()?;
    let public_url = format!("http://{ISSUER_HOST}:{port}");
    let mut cmd = Command::new(paths::workspace_binary("fake-rails")?);
    cmd.args(["--listen", &format!("0.0.0.0:{port}")])
        .args(["--public-url", &public_url]);
    let log = dir.join("logs").join("oidc-issuer.log");
    let mut issuer = ManagedProcess::spawn("oidc-issuer", cmd, &log, Lifetime::Owned)?;
    issuer.wait_for_line("fake-rails listening on ", Duration::from_secs(30))?;
    // The harness reaches it on loopback; containers as host.docker.internal.
    Ok((issuer, format!("http://127.0.0.1:{port}"), public_url))
}

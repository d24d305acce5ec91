//! Which stack backs [`crate::Stack`] ([`Backend`]): the embedded one (the
//! default) or the Docker stack of `compose/` on the official images
//! (`CONFORMANCE_STACK=docker`, what `cargo xtask e2e --stack docker` sets),
//! whether a Docker engine answers, and the image tags of `compose/.env`.
//! The containers themselves are [`crate::docker_stack`], built only with
//! the `docker` feature so the default build carries no Docker client.

use std::io::{Read, Write};
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};

use crate::paths;

/// Selects the stack behind [`crate::Stack`]: `embedded` (default) or `docker`.
pub const STACK_ENV: &str = "CONFORMANCE_STACK";

/// The audience the gateway accepts ID tokens for (compose/.env's default).
pub const OIDC_AUDIENCE: &str = "ci-job-telemetry";

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

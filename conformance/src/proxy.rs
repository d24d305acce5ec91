//! The one proxy in front of the job API, how the suite scripts a broken
//! GitLab without teaching fake-rails to misbehave:
//!
//! * it rewrites the job payloads `POST /api/v4/jobs/request` hands out
//!   (missing `features`, malformed trace context), when started with
//!   [`Proxy::rewriting`];
//! * the test switches it between passing requests through, answering a
//!   status of its choice (502 for an outage, 429 with `Retry-After` for
//!   throttling) to all requests or only to `POST /api/v4/jobs/request`, and
//!   being down (its port closed: connections are refused).
//!
//! It records every request it saw, with what it answered, and the bodies of
//! `PUT /api/v4/jobs/:id` that GitLab accepted (the final status and the
//! log's checksum and size).
//!
//! HTTP/1.1 with `Connection: close`, one thread per connection: enough for
//! a runner under test.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use serde_json::Value;

/// What the proxy does with a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Mode {
    /// Forward to fake-rails.
    Pass,
    /// Answer `status` (with `Retry-After: retry_after` seconds when set)
    /// without forwarding.
    Answer {
        status: u16,
        retry_after: Option<u64>,
        /// Only `POST /api/v4/jobs/request`; everything else passes.
        jobs_request_only: bool,
    },
    /// The port is closed: connections are refused.
    Down,
    /// Answer the next request `status` with its request line and headers
    /// quoted in the body (as servers do echo), then `Pass`.
    EchoOnce { status: u16 },
}

/// One request the proxy saw.
#[derive(Debug, Clone)]
pub struct Seen {
    pub at: Instant,
    pub method: String,
    pub path: String,
    /// What the client got (0 when forwarding failed).
    pub status: u16,
}

type Rewrite = dyn Fn(&mut Value) + Send + Sync;

struct State {
    mode: Mode,
    seen: Vec<Seen>,
    /// `(job id, body)` of every `PUT /api/v4/jobs/:id` answered 200.
    accepted_updates: Vec<(u64, Value)>,
    /// Applied to every job payload handed out.
    rewrite: Option<Arc<Rewrite>>,
}

/// A running proxy; stops when dropped.
pub struct Proxy {
    pub url: String,
    state: Arc<Mutex<State>>,
    stop: Arc<std::sync::atomic::AtomicBool>,
}

impl Proxy {
    /// Proxies to `upstream` (fake-rails' URL), passing everything at first.
    pub fn start(upstream: &str) -> Result<Proxy> {
        Self::serve(upstream, None)
    }

    /// Proxies to `upstream`, applying `rewrite` to every job payload that
    /// `POST /api/v4/jobs/request` returns.
    pub fn rewriting(
        upstream: &str,
        rewrite: impl Fn(&mut Value) + Send + Sync + 'static,
    ) -> Result<Proxy> {
        Self::serve(upstream, Some(Arc::new(rewrite)))
    }

    fn serve(upstream: &str, rewrite: Option<Arc<Rewrite>>) -> Result<Proxy> {
        let listener = TcpListener::bind("127.0.0.1:0")?;
        let addr = listener.local_addr()?;
        let state = Arc::new(Mutex::new(State {
            mode: Mode::Pass,
            seen: Vec::new(),
            accepted_updates: Vec::new(),
            rewrite,
        }));
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let upstream = upstream.trim_end_matches('/').to_string();
        {
            let state = state.clone();
            let stop = stop.clone();
            std::thread::spawn(move || accept_loop(listener, addr, &upstream, state, stop));
        }
        Ok(Proxy {
            url: format!("http://{addr}"),
            state,
            stop,
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn set_mode(&self, mode: Mode) {
        self.lock().mode = mode;
    }

    /// Every request seen so far.
    pub fn seen(&self) -> Vec<Seen> {
        self.lock().seen.clone()
    }

    /// The accepted `PUT /api/v4/jobs/:id` bodies of `job`.
    pub fn accepted_updates(&self, job: u64) -> Vec<Value> {
        self.lock()
            .accepted_updates
            .iter()
            .filter(|(id, _)| *id == job)
            .map(|(_, body)| body.clone())
            .collect()
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
    }
}

fn accept_loop(
    listener: TcpListener,
    addr: SocketAddr,
    upstream: &str,
    state: Arc<Mutex<State>>,
    stop: Arc<std::sync::atomic::AtomicBool>,
) {
    let mut listener = Some(listener);
    while !stop.load(std::sync::atomic::Ordering::Relaxed) {
        let down = state.lock().unwrap_or_else(|e| e.into_inner()).mode == Mode::Down;
        if down {
            // Closing the socket makes connections fail with "refused".
            listener = None;
            std::thread::sleep(Duration::from_millis(20));
            continue;
        }
        let Some(current) = &listener else {
            match TcpListener::bind(addr) {
                Ok(l) => {
                    let _ = l.set_nonblocking(true);
                    listener = Some(l);
                }
                Err(_) => std::thread::sleep(Duration::from_millis(20)),
            }
            continue;
        };
        let _ = current.set_nonblocking(true);
        match current.accept() {
            Ok((stream, _)) => {
                let _ = stream.set_nonblocking(false);
                let upstream = upstream.to_string();
                let state = state.clone();
                std::thread::spawn(move || {
                    let _ = serve(stream, &upstream, &state);
                });
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                std::thread::sleep(Duration::from_millis(5));
            }
            Err(_) => std::thread::sleep(Duration::from_millis(5)),
        }
    }
}

/// The job id of `PUT /api/v4/jobs/:id`.
fn update_job_id(method: &str, path: &str) -> Option<u64> {
    if method != "PUT" {
        return None;
    }
    path.strip_prefix("/api/v4/jobs/")?.parse().ok()
}

fn serve(stream: TcpStream, upstream: &str, state: &Mutex<State>) -> Result<()> {
    stream.set_read_timeout(Some(Duration::from_secs(30)))?;
    let mut reader = BufReader::new(stream.try_clone()?);
    let mut request_line = String::new();
    reader.read_line(&mut request_line)?;
    let mut parts = request_line.split_whitespace();
    let method = parts.next().context("no method")?.to_string();
    let target = parts.next().context("no target")?.to_string();
    let path = target.split('?').next().unwrap_or_default().to_string();
    let mut headers = Vec::new();
    let mut length = 0usize;
    loop {
        let mut line = String::new();
        reader.read_line(&mut line)?;
        let line = line.trim_end();
        if line.is_empty() {
            break;
        }
        if let Some((name, value)) = line.split_once(':') {
            let (name, value) = (name.trim().to_string(), value.trim().to_string());
            if name.eq_ignore_ascii_case("content-length") {
                length = value.parse().unwrap_or(0);
            }
            headers.push((name, value));
        }
    }
    let mut body = vec![0u8; length];
    reader.read_exact(&mut body)?;

    let mode = state.lock().unwrap_or_else(|e| e.into_inner()).mode.clone();
    let is_jobs_request = method == "POST" && path == "/api/v4/jobs/request";
    let record = |status: u16| {
        state
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .seen
            .push(Seen {
                at: Instant::now(),
                method: method.clone(),
                path: path.clone(),
                status,
            });
    };
    let mut out = stream;
    if let Mode::EchoOnce { status } = mode {
        {
            let mut state = state.lock().unwrap_or_else(|e| e.into_inner());
            if state.mode == mode {
                state.mode = Mode::Pass;
            }
        }
        record(status);
        let quoted: Vec<String> = headers.iter().map(|(n, v)| format!("{n}: {v}")).collect();
        let text = format!(
            "overloaded; you sent {:?} with {}",
            request_line.trim_end(),
            quoted.join("; ")
        );
        write!(
            out,
            "HTTP/1.1 {status} Echo\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{text}",
            text.len()
        )?;
        out.flush()?;
        return Ok(());
    }
    if let Mode::Answer {
        status,
        retry_after,
        jobs_request_only,
    } = mode
    {
        if is_jobs_request || !jobs_request_only {
            record(status);
            let retry = retry_after
                .map(|s| format!("Retry-After: {s}\r\n"))
                .unwrap_or_default();
            let text = format!("{status} injected by the fault proxy");
            write!(
                out,
                "HTTP/1.1 {status} Injected\r\n{retry}Content-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{text}",
                text.len()
            )?;
            out.flush()?;
            return Ok(());
        }
    }

    let agent: ureq::Agent = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(Duration::from_secs(30)))
        .build()
        .into();
    let mut request = http::Request::builder()
        .method(method.as_str())
        .uri(format!("{upstream}{target}"));
    for (name, value) in &headers {
        let lower = name.to_ascii_lowercase();
        if !["host", "content-length", "connection", "transfer-encoding"].contains(&lower.as_str())
        {
            request = request.header(name.as_str(), value.as_str());
        }
    }
    let mut response = match agent.run(request.body(body.clone())?) {
        Ok(r) => r,
        Err(e) => {
            record(0);
            return Err(e.into());
        }
    };
    let status = response.status();
    record(status.as_u16());
    if status == 200 {
        if let Some(job) = update_job_id(&method, &path) {
            if let Ok(value) = serde_json::from_slice::<Value>(&body) {
                state
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .accepted_updates
                    .push((job, value));
            }
        }
    }
    let response_headers: Vec<(String, String)> = response
        .headers()
        .iter()
        .filter(|(n, _)| {
            !["content-length", "connection", "transfer-encoding"].contains(&n.as_str())
        })
        .map(|(n, v)| (n.to_string(), v.to_str().unwrap_or_default().to_string()))
        .collect();
    let mut payload = response.body_mut().read_to_vec()?;
    if is_jobs_request && status == 201 {
        let rewrite = state
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .rewrite
            .clone();
        if let Some(rewrite) = rewrite {
            if let Ok(mut job) = serde_json::from_slice::<Value>(&payload) {
                rewrite(&mut job);
                payload = serde_json::to_vec(&job)?;
            }
        }
    }
    write!(
        out,
        "HTTP/1.1 {} {}\r\n",
        status.as_u16(),
        status.canonical_reason().unwrap_or("")
    )?;
    for (name, value) in response_headers {
        write!(out, "{name}: {value}\r\n")?;
    }
    write!(
        out,
        "Content-Length: {}\r\nConnection: close\r\n\r\n",
        payload.len()
    )?;
    out.write_all(&payload)?;
    out.flush()?;
    Ok(())
}

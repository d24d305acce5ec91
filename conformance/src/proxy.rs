//! A proxy in front of the job API that rewrites the job payloads it hands
//! out: how the suite scripts a broken GitLab (missing `features`, malformed
//! trace context) without teaching fake-rails to misbehave. Everything else
//! passes through unchanged. HTTP/1.1 with `Connection: close`, one thread
//! per connection: enough for a runner under test.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use serde_json::Value;

type Rewrite = dyn Fn(&mut Value) + Send + Sync;

/// A running proxy; stops accepting when dropped.
pub struct PayloadProxy {
    pub url: String,
    stop: Arc<AtomicBool>,
}

impl PayloadProxy {
    /// Proxies to `upstream`, applying `rewrite` to every job payload that
    /// `POST /api/v4/jobs/request` returns.
    pub fn start(
        upstream: &str,
        rewrite: impl Fn(&mut Value) + Send + Sync + 'static,
    ) -> Result<PayloadProxy> {
        let listener = TcpListener::bind("127.0.0.1:0")?;
        let url = format!("http://{}", listener.local_addr()?);
        let stop = Arc::new(AtomicBool::new(false));
        let upstream = upstream.trim_end_matches('/').to_string();
        let rewrite: Arc<Rewrite> = Arc::new(rewrite);
        let stopping = stop.clone();
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                if stopping.load(Ordering::Relaxed) {
                    break;
                }
                let Ok(stream) = stream else { continue };
                let upstream = upstream.clone();
                let rewrite = rewrite.clone();
                std::thread::spawn(move || {
                    let _ = serve(stream, &upstream, rewrite.as_ref());
                });
            }
        });
        Ok(PayloadProxy { url, stop })
    }
}

impl Drop for PayloadProxy {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        // Wake the accept loop so it sees the flag.
        if let Some(addr) = self.url.strip_prefix("http://") {
            let _ = TcpStream::connect_timeout(&addr.parse().unwrap(), Duration::from_millis(200));
        }
    }
}

fn serve(stream: TcpStream, upstream: &str, rewrite: &Rewrite) -> Result<()> {
    stream.set_read_timeout(Some(Duration::from_secs(30)))?;
    let mut reader = BufReader::new(stream.try_clone()?);
    let mut request_line = String::new();
    reader.read_line(&mut request_line)?;
    let mut parts = request_line.split_whitespace();
    let method = parts.next().context("no method")?.to_string();
    let target = parts.next().context("no target")?.to_string();
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
    let mut response = agent.run(request.body(body)?)?;
    let status = response.status();
    let response_headers: Vec<(String, String)> = response
        .headers()
        .iter()
        .filter(|(n, _)| {
            !["content-length", "connection", "transfer-encoding"].contains(&n.as_str())
        })
        .map(|(n, v)| (n.to_string(), v.to_str().unwrap_or_default().to_string()))
        .collect();
    let mut payload = response.body_mut().read_to_vec()?;
    if method == "POST" && target.starts_with("/api/v4/jobs/request") && status == 201 {
        if let Ok(mut job) = serde_json::from_slice::<Value>(&payload) {
            rewrite(&mut job);
            payload = serde_json::to_vec(&job)?;
        }
    }
    let mut out = stream;
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

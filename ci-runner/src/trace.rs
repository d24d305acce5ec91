//! The job log: masking, buffering, and incremental upload with
//! `PATCH /api/v4/jobs/:id/trace`.
//!
//! Masking happens on the way in, before a byte is stored: a secret that
//! straddles two writes is held back until it can be decided, so nothing
//! that leaves the process (a PATCH, the checksum) ever contains it.
//!
//! With log export on, the same masked bytes are also handed, as they come
//! (chunks, not lines), to the job's OTLP log records
//! ([`runner_telemetry::logs`]), whose own task splits them into lines: one
//! record per line, with the stream it came from (`stdout`/`stderr` from
//! the script, `runner` for the runner's own lines) and the time its first
//! byte arrived (the scripts run with `exec 2>&1`, as GitLab Runner's
//! shell executor runs them, so their lines are `stdout`). Records are not cut by [`OUTPUT_LIMIT`]: GitLab's copy
//! stops there, the records go on (the buffer bounds them).
//!
//! The upload sends what is new every [`PATCH_INTERVAL`], or sooner when more
//! than [`PATCH_THRESHOLD`] bytes wait, with `Content-Range: start-end`
//! (inclusive). GitLab answers `202` with `Range: 0-N`, N being the size it
//! has; on `416` the runner resyncs from that N.

use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use runner_telemetry::logs::{JobLogs, Stream};

use tokio::sync::{watch, Notify};

use super::api::GitLabClient;
use super::deliver::{Attempts, Patience};

/// What replaces a secret in the log.
pub const MASK: &[u8] = runner_telemetry::secrets::MASKED.as_bytes();
/// How often new log content is sent.
pub const PATCH_INTERVAL: Duration = Duration::from_secs(1);
/// Send early when this much is waiting.
pub const PATCH_THRESHOLD: usize = 64 * 1024;
/// Largest single PATCH body.
pub const MAX_PATCH: usize = 1024 * 1024;
/// Log size limit (GitLab Runner's `output_limit` default, 4 MiB).
pub const OUTPUT_LIMIT: usize = 4 * 1024 * 1024;

/// Replaces secrets in a byte stream, also across chunk boundaries.
#[derive(Debug, Clone)]
pub struct Masker {
    /// Longest first, so the longest match wins.
    secrets: Vec<Vec<u8>>,
    pending: Vec<u8>,
}

impl Masker {
    pub fn new(secrets: impl IntoIterator<Item = String>) -> Self {
        let mut secrets: Vec<Vec<u8>> = secrets
            .into_iter()
            .filter(|s| !s.is_empty())
            .map(String::into_bytes)
            .collect();
        secrets.sort_by(|a, b| b.len().cmp(&a.len()).then(a.cmp(b)));
        secrets.dedup();
        Masker {
            secrets,
            pending: Vec::new(),
        }
    }

    /// Feeds bytes; returns what can be emitted now.
    pub fn push(&mut self, data: &[u8]) -> Vec<u8> {
        self.pending.extend_from_slice(data);
        self.process(false)
    }

    /// Emits everything held back (the stream ended).
    pub fn finish(&mut self) -> Vec<u8> {
        self.process(true)
    }

    fn process(&mut self, last: bool) -> Vec<u8> {
        let data = &self.pending;
        let mut out = Vec::with_capacity(data.len());
        let mut i = 0;
        'scan: while i < data.len() {
            let rest = &data[i..];
            // A longer secret may still complete here: wait for more input.
            if !last
                && self
                    .secrets
                    .iter()
                    .any(|s| s.len() > rest.len() && s.starts_with(rest))
            {
                break;
            }
            for secret in &self.secrets {
                if rest.starts_with(secret) {
                    out.extend_from_slice(MASK);
                    i += secret.len();
                    continue 'scan;
                }
            }
            out.push(data[i]);
            i += 1;
        }
        self.pending.drain(..i);
        out
    }
}

/// CRC-32 (IEEE), for the `output.checksum` GitLab verifies.
pub fn crc32(data: &[u8]) -> u32 {
    let mut crc = 0xffff_ffffu32;
    for &byte in data {
        crc ^= u32::from(byte);
        for _ in 0..8 {
            let mask = (crc & 1).wrapping_neg();
            crc = (crc >> 1) ^ (0xedb8_8320 & mask);
        }
    }
    !crc
}

#[derive(Debug)]
struct LogState {
    masker: Masker,
    /// The masked log.
    data: Vec<u8>,
    /// Bytes GitLab confirmed.
    sent: usize,
    truncated: bool,
    closed: bool,
    /// OTLP log records, when exported.
    records: Option<JobLogs>,
}

/// The log of one job, shared by the executor (writing) and the uploader.
#[derive(Debug, Clone)]
pub struct JobLog {
    state: Arc<Mutex<LogState>>,
    wake: Arc<Notify>,
    limit: usize,
}

impl JobLog {
    pub fn new(secrets: impl IntoIterator<Item = String>) -> Self {
        Self::with_limit(secrets, OUTPUT_LIMIT)
    }

    pub fn with_limit(secrets: impl IntoIterator<Item = String>, limit: usize) -> Self {
        JobLog {
            state: Arc::new(Mutex::new(LogState {
                masker: Masker::new(secrets),
                data: Vec::new(),
                sent: 0,
                truncated: false,
                closed: false,
                records: None,
            })),
            wake: Arc::new(Notify::new()),
            limit,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, LogState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// From now on, every line also goes to `records` (OTLP log records).
    pub fn export_records(&self, records: JobLogs) {
        self.lock().records = Some(records);
    }

    /// Appends raw output written by the runner itself (masked on the way
    /// in).
    pub fn write(&self, bytes: &[u8]) {
        self.write_stream(bytes, Stream::Runner);
    }

    /// Appends raw output of `stream` (masked on the way in).
    pub fn write_stream(&self, bytes: &[u8], stream: Stream) {
        let mut state = self.lock();
        if state.closed {
            return;
        }
        let masked = state.masker.push(bytes);
        self.append(&mut state, &masked);
        to_records(&mut state, masked, stream);
    }

    fn append(&self, state: &mut LogState, masked: &[u8]) {
        if state.truncated {
            return;
        }
        let room = self.limit.saturating_sub(state.data.len());
        if masked.len() > room {
            state.data.extend_from_slice(&masked[..room]);
            state.data.extend_from_slice(
                format!("\n\x1b[31;1mJob's log exceeded limit of {} bytes.\nJob execution will continue but no more output will be collected.\x1b[0;m\n", self.limit).as_bytes(),
            );
            state.truncated = true;
        } else {
            state.data.extend_from_slice(masked);
        }
        if state.data.len() - state.sent >= PATCH_THRESHOLD {
            self.wake.notify_one();
        }
    }

    /// Appends a line written by the runner itself (masked too).
    pub fn line(&self, text: &str) {
        let mut bytes = text.as_bytes().to_vec();
        bytes.push(b'\n');
        self.write(&bytes);
    }

    /// A GitLab collapsible section header.
    pub fn section_start(&self, name: &str, header: &str) {
        let now = unix_now();
        self.write(
            format!("section_start:{now}:{name}\r\x1b[0K\x1b[0K\x1b[36;1m{header}\x1b[0;m\n")
                .as_bytes(),
        );
    }

    pub fn section_end(&self, name: &str) {
        let now = unix_now();
        self.write(format!("section_end:{now}:{name}\r\x1b[0K\n").as_bytes());
    }

    /// Ends the log: flushes what the masker held back; later writes are
    /// ignored.
    pub fn close(&self) {
        let mut state = self.lock();
        if state.closed {
            return;
        }
        let rest = state.masker.finish();
        self.append(&mut state, &rest);
        to_records(&mut state, rest, Stream::Runner);
        if let Some(records) = state.records.as_ref() {
            records.end_output();
        }
        state.closed = true;
        drop(state);
        self.wake.notify_one();
    }

    /// The whole masked log so far.
    pub fn contents(&self) -> Vec<u8> {
        self.lock().data.clone()
    }

    /// `crc32:<hex>` and size of the log, for the final update.
    pub fn checksum(&self) -> (String, usize) {
        let state = self.lock();
        (
            format!("crc32:{:08x}", crc32(&state.data)),
            state.data.len(),
        )
    }

    fn unsent(&self) -> Option<(usize, Vec<u8>)> {
        let state = self.lock();
        if state.sent >= state.data.len() {
            return None;
        }
        let end = state.data.len().min(state.sent + MAX_PATCH);
        Some((state.sent, state.data[state.sent..end].to_vec()))
    }

    fn set_sent(&self, sent: usize) {
        let mut state = self.lock();
        state.sent = sent.min(state.data.len());
    }

    fn is_closed(&self) -> bool {
        self.lock().closed
    }

    /// Bytes GitLab confirmed, and the log's size.
    fn progress(&self) -> (usize, usize) {
        let state = self.lock();
        (state.sent, state.data.len())
    }

    fn is_fully_sent(&self) -> bool {
        let state = self.lock();
        state.sent >= state.data.len()
    }
}

/// Hands `masked` (owned: moved into the records' queue, not copied) to the
/// job's log records, when they are exported.
fn to_records(state: &mut LogState, masked: Vec<u8>, stream: Stream) {
    if masked.is_empty() {
        return;
    }
    if let Some(records) = state.records.as_ref() {
        records.push_output(masked, stream, SystemTime::now());
    }
}

fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Why the uploader asks the job to stop.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopRequest {
    /// GitLab says the job was canceled.
    Canceled,
}

/// Uploads `log` until it is closed and fully sent. Once it is closed, the
/// rest is retried (with backoff, honouring `Retry-After`) for as long as
/// `patience` allows. Sends a [`StopRequest`] when GitLab says the job was
/// canceled. Returns whether GitLab has the whole log (or refused it for
/// good: 403/404, the job is gone).
pub async fn upload(
    client: GitLabClient,
    job_id: i64,
    job_token: String,
    log: JobLog,
    stop: watch::Sender<Option<StopRequest>>,
    patience: Patience,
) -> bool {
    let mut final_attempts: Option<Attempts> = None;
    loop {
        let closed = log.is_closed();
        if closed && log.is_fully_sent() {
            return true;
        }
        let mut progressed = false;
        let mut retry_after = None;
        while let Some((start, chunk)) = log.unsent() {
            let len = chunk.len();
            match client.patch_trace(job_id, &job_token, start, chunk).await {
                Ok(result) => {
                    if matches!(result.job_status.as_deref(), Some("canceled" | "canceling")) {
                        let _ = stop.send(Some(StopRequest::Canceled));
                    }
                    match result.status {
                        202 | 200 => {
                            log.set_sent(result.remote_size.unwrap_or(start + len));
                            progressed = true;
                        }
                        416 => match result.remote_size {
                            Some(size) if size != start => {
                                tracing::info!(
                                    job_id,
                                    "Job log offset resynced from {start} to {size}"
                                );
                                log.set_sent(size);
                            }
                            _ => break,
                        },
                        403 => {
                            // The job is no longer running (canceled or gone).
                            let _ = stop.send(Some(StopRequest::Canceled));
                            return true;
                        }
                        404 => return true,
                        status => {
                            tracing::debug!(job_id, status, "Job log `PATCH` answered {status}");
                            retry_after = result.retry_after;
                            break;
                        }
                    }
                }
                Err(e) => {
                    tracing::debug!(job_id, "Job log `PATCH` failed: {e}");
                    retry_after = e.retry_after();
                    break;
                }
            }
        }
        if closed {
            if log.is_fully_sent() {
                return true;
            }
            let attempts = final_attempts.get_or_insert_with(|| patience.start());
            if progressed && retry_after.is_none() {
                continue;
            }
            if !attempts.wait(retry_after).await {
                let (sent, size) = log.progress();
                tracing::error!(
                    job_id,
                    attempts = attempts.attempts(),
                    "Could not send the end of the job log to GitLab: {sent} of {size} bytes sent after {} attempts",
                    attempts.attempts()
                );
                return false;
            }
            continue;
        }
        let pause = retry_after.unwrap_or(PATCH_INTERVAL);
        tokio::select! {
            _ = tokio::time::sleep(pause) => {}
            _ = log.wake.notified(), if retry_after.is_none() => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Feeds `chunks` through a masker for `secrets` and compares the output.
    fn check(secrets: &[&str], chunks: &[&str], expected: &str) {
        let mut masker = Masker::new(secrets.iter().map(|s| s.to_string()));
        let mut out = Vec::new();
        for chunk in chunks {
            out.extend(masker.push(chunk.as_bytes()));
        }
        out.extend(masker.finish());
        assert_eq!(
            String::from_utf8(out).unwrap(),
            expected,
            "chunks: {chunks:?}"
        );
    }

    #[test]
    fn masking() {
        check(&["hunter22"], &["pw=hunter22\n"], "pw=[MASKED]\n");
        check(&["hunter22"], &["pw=hun", "ter22\n"], "pw=[MASKED]\n");
        check(
            &["hunter22"],
            &["pw=h", "u", "n", "t", "e", "r", "2", "2", "!"],
            "pw=[MASKED]!",
        );
        check(&["hunter22"], &["hunter2"], "hunter2");
        check(&["hunter22"], &["hunter2", "3"], "hunter23");
        check(&["abc", "abcdef"], &["xabcd", "ef"], "x[MASKED]");
        check(&["abc", "abcdef"], &["xabcd", "e!"], "x[MASKED]de!");
        check(&["aa"], &["aaaaa"], "[MASKED][MASKED]a");
        check(
            &["tok", "secret"],
            &["secret tok secrettok"],
            "[MASKED] [MASKED] [MASKED][MASKED]",
        );
        check(&[""], &["nothing"], "nothing");
        check(&["é"], &["caf\u{e9}"], "caf[MASKED]");
    }

    #[test]
    fn masking_every_split_point() {
        let text = "before SECRET-VALUE-123 middle SECRET-VALUE-123 after";
        for i in 0..text.len() {
            for j in i..text.len() {
                check(
                    &["SECRET-VALUE-123"],
                    &[&text[..i], &text[i..j], &text[j..]],
                    "before [MASKED] middle [MASKED] after",
                );
            }
        }
    }

    #[test]
    fn crc32_known_values() {
        assert_eq!(crc32(b""), 0);
        assert_eq!(crc32(b"123456789"), 0xcbf4_3926);
        assert_eq!(
            crc32(b"The quick brown fox jumps over the lazy dog"),
            0x414f_a339
        );
    }

    #[test]
    fn log_masks_and_limits() {
        let log = JobLog::with_limit(vec!["s3cr3t".to_string()], 40);
        log.write(b"a s3c");
        log.write(b"r3t b\n");
        log.line("runner line s3cr3t");
        log.write(&[b'x'; 100]);
        log.close();
        let text = String::from_utf8(log.contents()).unwrap();
        assert!(
            text.starts_with("a [MASKED] b\nrunner line [MASKED]\nxx"),
            "{text}"
        );
        assert!(
            text.contains("Job's log exceeded limit of 40 bytes."),
            "{text}"
        );
        assert!(!text.contains("s3cr3t"));
        let (checksum, size) = log.checksum();
        assert_eq!(size, text.len());
        assert_eq!(checksum, format!("crc32:{:08x}", crc32(text.as_bytes())));
    }
}

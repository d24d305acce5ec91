//! The account of every span: per job and endpoint here, per process in
//! [`crate::metrics::Metrics`].
//!
//! Each span a job ends is counted once per endpoint it goes to (`created`),
//! and ends in exactly one of: `exported`, or dropped for one
//! [`DropReason`]. Until then it is `buffered`. So at any moment, per job and
//! endpoint, `created = exported + dropped + buffered`, and the same holds
//! for the process's totals. A buffered span that is destroyed without a
//! decision (its task aborted, the runtime gone) counts as `shutdown`, so
//! nothing leaves the account unseen.

use std::fmt;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use tokio::sync::Notify;

/// Why a span was not exported.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DropReason {
    /// The buffer was full (spans or bytes) when the span ended.
    QueueFull,
    /// Not exported within `max_age` of ending.
    MaxAge,
    /// The collector refused the request for good (e.g. HTTP 400,
    /// `INVALID_ARGUMENT`, or `RESOURCE_EXHAUSTED` without `RetryInfo`).
    PermanentError,
    /// The collector took the request but rejected these spans (partial
    /// success, `rejected_spans`).
    Rejected,
    /// Still buffered when the runner stopped and its final attempt ended.
    Shutdown,
}

impl DropReason {
    pub const ALL: [DropReason; 5] = [
        DropReason::QueueFull,
        DropReason::MaxAge,
        DropReason::PermanentError,
        DropReason::Rejected,
        DropReason::Shutdown,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            DropReason::QueueFull => "queue_full",
            DropReason::MaxAge => "max_age",
            DropReason::PermanentError => "permanent_error",
            DropReason::Rejected => "rejected",
            DropReason::Shutdown => "shutdown",
        }
    }

    pub fn index(self) -> usize {
        self as usize
    }
}

impl fmt::Display for DropReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// How a span's export ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Exported,
    Dropped(DropReason),
}

/// One job's spans at one endpoint.
#[derive(Debug)]
pub struct EndpointAccount {
    pub label: String,
    created: AtomicU64,
    exported: AtomicU64,
    dropped: [AtomicU64; DropReason::ALL.len()],
    first_error: Mutex<Option<String>>,
    /// A permanent failure was logged for this job and endpoint.
    pub(crate) permanent_logged: AtomicBool,
}

impl EndpointAccount {
    fn new(label: String) -> EndpointAccount {
        EndpointAccount {
            label,
            created: AtomicU64::new(0),
            exported: AtomicU64::new(0),
            dropped: Default::default(),
            first_error: Mutex::new(None),
            permanent_logged: AtomicBool::new(false),
        }
    }

    fn report(&self) -> EndpointReport {
        // Decisions first, then `created`: a span is created before it can be
        // decided, so `buffered` is never negative.
        let exported = self.exported.load(Ordering::Acquire);
        let mut dropped_by = [0u64; DropReason::ALL.len()];
        for (slot, counter) in dropped_by.iter_mut().zip(&self.dropped) {
            *slot = counter.load(Ordering::Acquire);
        }
        let created = self.created.load(Ordering::Acquire);
        let dropped: u64 = dropped_by.iter().sum();
        EndpointReport {
            label: self.label.clone(),
            spans: created,
            exported,
            dropped,
            dropped_by,
            buffered: created.saturating_sub(exported + dropped),
            queue_full: dropped_by[DropReason::QueueFull.index()],
            error: self
                .first_error
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .clone(),
        }
    }
}

/// The account of one job: its spans, per endpoint.
#[derive(Debug)]
pub struct JobAccount {
    pub job_id: Option<i64>,
    spans: AtomicU64,
    endpoints: Vec<EndpointAccount>,
    changed: Notify,
    /// The flush stopped waiting with spans still buffered: whoever settles
    /// the last of them logs the job's final line.
    awaiting: AtomicBool,
    flush_started: Mutex<Option<Instant>>,
}

impl JobAccount {
    pub fn new(job_id: Option<i64>, labels: Vec<String>) -> JobAccount {
        JobAccount {
            job_id,
            spans: AtomicU64::new(0),
            endpoints: labels.into_iter().map(EndpointAccount::new).collect(),
            changed: Notify::new(),
            awaiting: AtomicBool::new(false),
            flush_started: Mutex::new(None),
        }
    }

    pub fn endpoint(&self, index: usize) -> &EndpointAccount {
        &self.endpoints[index]
    }

    pub(crate) fn span_ended(&self) {
        self.spans.fetch_add(1, Ordering::AcqRel);
    }

    pub(crate) fn span_created(&self, endpoint: usize) {
        self.endpoints[endpoint]
            .created
            .fetch_add(1, Ordering::AcqRel);
    }

    /// [`Self::span_ended`] and [`Self::span_created`] at every endpoint,
    /// for `n` items at once.
    pub(crate) fn items_handed_over(&self, n: u64) {
        self.spans.fetch_add(n, Ordering::AcqRel);
        for endpoint in &self.endpoints {
            endpoint.created.fetch_add(n, Ordering::AcqRel);
        }
    }

    /// Records the outcome of `n` spans at `endpoint`.
    pub(crate) fn record(&self, endpoint: usize, outcome: Outcome, n: u64) {
        if n == 0 {
            return;
        }
        let account = &self.endpoints[endpoint];
        match outcome {
            Outcome::Exported => account.exported.fetch_add(n, Ordering::AcqRel),
            Outcome::Dropped(reason) => {
                account.dropped[reason.index()].fetch_add(n, Ordering::AcqRel)
            }
        };
        self.changed.notify_waiters();
        if self.awaiting.load(Ordering::Acquire) && self.buffered() == 0 {
            if let Some(job_id) = self.job_id {
                if self.awaiting.swap(false, Ordering::AcqRel) {
                    let report = self.report(self.since_flush(), false);
                    log_settled(job_id, &report);
                }
            }
        }
    }

    /// Keeps the first error message seen at `endpoint`.
    pub(crate) fn note_error(&self, endpoint: usize, error: &dyn std::fmt::Display) {
        let mut first = self.endpoints[endpoint]
            .first_error
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        if first.is_none() {
            *first = Some(error.to_string());
        }
    }

    /// Spans not yet exported or dropped, all endpoints together.
    pub fn buffered(&self) -> u64 {
        self.endpoints.iter().map(|e| e.report().buffered).sum()
    }

    fn since_flush(&self) -> Duration {
        self.flush_started
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .map(|t| t.elapsed())
            .unwrap_or_default()
    }

    pub fn report(&self, elapsed: Duration, timed_out: bool) -> FlushReport {
        let endpoints: Vec<EndpointReport> =
            self.endpoints.iter().map(EndpointAccount::report).collect();
        FlushReport {
            spans: self.spans.load(Ordering::Acquire),
            endpoints,
            elapsed,
            timed_out,
            panicked: false,
            log_records: None,
        }
    }

    /// Waits until every span is exported or dropped, at most `deadline`.
    /// With spans left, the job's final line is logged when the last of them
    /// is decided (by a retry that succeeds, `max_age`, or shutdown).
    pub async fn flush(&self, deadline: Duration) -> FlushReport {
        let started = Instant::now();
        *self.flush_started.lock().unwrap_or_else(|e| e.into_inner()) = Some(started);
        let now = tokio::time::Instant::now();
        let until = now
            .checked_add(deadline)
            .unwrap_or(now + Duration::from_secs(100 * 365 * 24 * 3600));
        loop {
            let changed = self.changed.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            if self.buffered() == 0 {
                return self.report(started.elapsed(), false);
            }
            if tokio::time::timeout_at(until, changed).await.is_err() {
                break;
            }
        }
        self.awaiting.store(true, Ordering::Release);
        let report = self.report(started.elapsed(), true);
        if report.buffered() == 0 {
            // Settled just now: this report is the final one.
            self.awaiting.store(false, Ordering::Release);
            return FlushReport {
                timed_out: false,
                ..report
            };
        }
        report
    }
}

fn log_settled(job_id: i64, report: &FlushReport) {
    if report.dropped() == 0 {
        tracing::info!(job_id, "Telemetry settled {report}");
    } else {
        tracing::warn!(job_id, "Telemetry settled with drops {report}");
    }
}

/// What happened to one endpoint's copy of the job's spans.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EndpointReport {
    pub label: String,
    /// Spans handed to this endpoint.
    pub spans: u64,
    pub exported: u64,
    /// Dropped for any reason (see `dropped_by`).
    pub dropped: u64,
    /// Dropped, by [`DropReason::index`].
    pub dropped_by: [u64; DropReason::ALL.len()],
    /// Neither yet: still in the buffer, retried in the background.
    pub buffered: u64,
    /// Of `dropped`, those refused by a full buffer.
    pub queue_full: u64,
    /// The first export error, if any (never credentials).
    pub error: Option<String>,
}

impl EndpointReport {
    pub fn dropped_for(&self, reason: DropReason) -> u64 {
        self.dropped_by[reason.index()]
    }
}

/// The account of one job's telemetry.
///
/// Per endpoint, `spans == exported + dropped + buffered`. The report's
/// `exported`, `dropped` and `buffered` add up the endpoints, so with two
/// endpoints they sum to twice `spans`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FlushReport {
    /// Spans that ended.
    pub spans: u64,
    pub endpoints: Vec<EndpointReport>,
    pub elapsed: Duration,
    /// The deadline passed with spans still buffered (they stay in the
    /// runner's buffer and are retried until `max_age`).
    pub timed_out: bool,
    /// Kept for compatibility; a panicking export counts its spans as
    /// dropped instead.
    pub panicked: bool,
    /// The same account for the job's log records (`spans` counts records),
    /// when log export is on.
    pub log_records: Option<Box<FlushReport>>,
}

impl FlushReport {
    pub fn exported(&self) -> u64 {
        self.endpoints.iter().map(|e| e.exported).sum()
    }

    pub fn dropped(&self) -> u64 {
        self.endpoints.iter().map(|e| e.dropped).sum()
    }

    pub fn buffered(&self) -> u64 {
        self.endpoints.iter().map(|e| e.buffered).sum()
    }

    pub fn dropped_for(&self, reason: DropReason) -> u64 {
        self.endpoints.iter().map(|e| e.dropped_for(reason)).sum()
    }

    /// `spans * endpoints == exported + dropped + buffered`, per endpoint.
    pub fn is_consistent(&self) -> bool {
        self.endpoints
            .iter()
            .all(|e| e.spans == self.spans && e.spans == e.exported + e.dropped + e.buffered)
    }
}

fn write_reasons(f: &mut fmt::Formatter<'_>, by: &[u64; DropReason::ALL.len()]) -> fmt::Result {
    let mut first = true;
    for reason in DropReason::ALL {
        let n = by[reason.index()];
        if n > 0 {
            write!(f, "{}{}={n}", if first { "" } else { "," }, reason)?;
            first = false;
        }
    }
    Ok(())
}

impl fmt::Display for FlushReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "spans={} exported={} dropped={}",
            self.spans,
            self.exported(),
            self.dropped()
        )?;
        if self.buffered() > 0 {
            write!(f, " buffered={}", self.buffered())?;
        }
        write!(f, " elapsed={}ms", self.elapsed.as_millis())?;
        if self.timed_out {
            write!(f, " deadline_exceeded=true")?;
        }
        if self.dropped() > 0 {
            let mut by = [0u64; DropReason::ALL.len()];
            for e in &self.endpoints {
                for (slot, n) in by.iter_mut().zip(e.dropped_by) {
                    *slot += n;
                }
            }
            write!(f, " dropped_by=")?;
            write_reasons(f, &by)?;
        }
        if let Some(logs) = &self.log_records {
            write!(
                f,
                " log_records={} log_records_exported={} log_records_dropped={}",
                logs.spans,
                logs.exported(),
                logs.dropped()
            )?;
            if logs.buffered() > 0 {
                write!(f, " log_records_buffered={}", logs.buffered())?;
            }
            if logs.dropped() > 0 {
                let mut by = [0u64; DropReason::ALL.len()];
                for e in &logs.endpoints {
                    for (slot, n) in by.iter_mut().zip(e.dropped_by) {
                        *slot += n;
                    }
                }
                write!(f, " log_records_dropped_by=")?;
                write_reasons(f, &by)?;
            }
        }
        for e in &self.endpoints {
            if self.endpoints.len() > 1 || e.dropped > 0 || e.buffered > 0 {
                write!(
                    f,
                    " endpoint={} (exported={} dropped={}",
                    e.label, e.exported, e.dropped
                )?;
                if e.buffered > 0 {
                    write!(f, " buffered={}", e.buffered)?;
                }
                if let Some(error) = &e.error {
                    write!(f, " error=\"{}\"", error.replace('"', "'"))?;
                }
                write!(f, ")")?;
            }
        }
        Ok(())
    }
}

//! Job logs as OTLP log records (opt-in per runner).
//!
//! One record per line of the job log **as the user sees it**: the runner
//! hands over the log after masking (the same bytes GitLab receives), split
//! at `\n`, and [`visible_line`] renders each line the way GitLab's log view
//! shows it:
//!
//! * a trailing `\r` (CRLF) is removed;
//! * carriage returns rewrite the line (progress bars): the record keeps the
//!   last `\r`-separated segment that has visible text;
//! * GitLab's section markers (`section_start:<ts>:<name>` and
//!   `section_end:<ts>:<name>` before a `\r`) are hidden, as GitLab hides
//!   them; a line that shows nothing at all (a `section_end` line) gives no
//!   record, while an empty line (`echo`) gives an empty record;
//! * ANSI escape sequences (colours, `\x1b[0K`) are removed: the body is
//!   plain text;
//! * bytes that are not UTF-8 become U+FFFD.
//!
//! A line whose visible text is longer than [`MAX_BODY_BYTES`] is split
//! into records of at most that size (at character boundaries), each with
//! `ci.log.chunk.index` (0, 1, ...) and `ci.log.chunk.count`. A line still
//! open after [`MAX_PENDING_LINE`] bytes is processed in pieces of that size
//! (each piece chunked the same way), so memory stays bounded.
//!
//! Each record carries `Timestamp` (when the line's first byte arrived),
//! `ObservedTimestamp` (when the record was emitted), a severity (INFO for
//! the job's output, WARN/ERROR for the runner's own `WARNING:`/`ERROR:`
//! lines), `ci.log.stream` (`stdout`, `stderr` or `runner`),
//! `ci.log.line_number` (1, 2, ... per job), the job's
//! `ci.job.id`, `ci.pipeline.id`, `ci.project.id`, and the `TraceId` and
//! `SpanId` of the span the line was printed in: the innermost stage or
//! function span open at that moment, else `job_execution`. The resource is
//! the job's spans' resource.
//!
//! The job's output path hands the masked bytes over in chunks
//! ([`JobLogs::push_output`]); a per-job task does the line splitting,
//! rendering, encoding and batching (see [`JobLogs`], [`LOG_QUEUE_BYTES`],
//! [`LOG_DRAIN_PATIENCE`]), and lets output wait as bytes while the
//! runner's buffer is half full.
//!
//! Records go through the runner's export buffer like spans ([`crate::export`]):
//! never blocking the job, every record exported or dropped for a reason
//! and counted per job ([`JobLogs::report`]). When the job ends with records
//! dropped, a final WARN record says how many lines are missing; it uses the
//! room the buffer holds for the job's root items, so it is kept.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use opentelemetry::trace::{SpanId, TraceId};
use opentelemetry_proto::tonic::common::v1::KeyValue as ProtoKeyValue;
use prost::Message;

use crate::export::accounting::JobAccount;
use crate::export::encode::EncodedSpan;
use crate::export::logs_encode::{
    int_attribute, severity, string_attribute, string_body, RawLogRecord,
};
use crate::export::{FlushReport, ResourceBlock, ScopeBlock, SpanSink};
use crate::keys;

/// Most bytes of visible text in one record; longer lines are chunked.
pub const MAX_BODY_BYTES: usize = 8 * 1024;
/// A line without `\n` is processed in pieces of this size.
pub const MAX_PENDING_LINE: usize = 1024 * 1024;
/// Record attribute: `stdout`, `stderr` or `runner`.
pub const CI_LOG_STREAM: &str = "ci.log.stream";
/// Record attribute: the line's number in the job's log records, from 1
/// (lines arriving in one read share a `Timestamp`; this orders them).
pub const CI_LOG_LINE_NUMBER: &str = "ci.log.line_number";
/// Record attribute on the chunks of a long line: 0, 1, ...
pub const CI_LOG_CHUNK_INDEX: &str = "ci.log.chunk.index";
/// Record attribute on the chunks of a long line: how many chunks.
pub const CI_LOG_CHUNK_COUNT: &str = "ci.log.chunk.count";
/// On `job_execution`: the job's log records not exported, int (set when
/// log export is on; known drops at the job's end).
pub const CI_TELEMETRY_DROPPED_LOG_RECORDS: &str = "ci.telemetry.dropped_log_records";

/// Where a line came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stream {
    Stdout,
    Stderr,
    /// The runner's own lines (section headers, warnings, ...).
    Runner,
}

impl Stream {
    pub fn as_str(self) -> &'static str {
        match self {
            Stream::Stdout => "stdout",
            Stream::Stderr => "stderr",
            Stream::Runner => "runner",
        }
    }
}

/// The span a job's lines belong to: the innermost open child, else
/// `job_execution`. Shared by a job's spans (they push and pop) and its log.
#[derive(Debug)]
pub(crate) struct SpanStack {
    trace_id: TraceId,
    root: SpanId,
    open: Mutex<Vec<SpanId>>,
}

impl SpanStack {
    pub(crate) fn new(trace_id: TraceId, root: SpanId) -> SpanStack {
        SpanStack {
            trace_id,
            root,
            open: Mutex::new(Vec::new()),
        }
    }

    pub(crate) fn push(&self, span: SpanId) {
        self.open
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(span);
    }

    /// Removes `span` wherever it is (spans may end out of order).
    pub(crate) fn remove(&self, span: SpanId) {
        let mut open = self.open.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(i) = open.iter().rposition(|s| *s == span) {
            open.remove(i);
        }
    }

    fn current(&self) -> SpanId {
        self.open
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .last()
            .copied()
            .unwrap_or(self.root)
    }
}

/// Bytes of job output a job may have waiting for its log task; past this,
/// the job's own thread renders what is waiting (it never waits itself,
/// nor drops anything uncounted). Bounds each job's queued output.
pub const LOG_QUEUE_BYTES: usize = 16 * 1024 * 1024;
/// The log task renders at most this many queued bytes per turn, so that it
/// holds the job's log state briefly.
const LOG_TASK_ROUND: usize = 4 * 1024;
/// Output gathers this long, from the first new piece, before the log task
/// renders it: while a job pours out lines, their rendering, encoding and
/// export (and the collector's and the database's work on them) do not
/// compete with the job for the CPU piece by piece; they run in one burst a
/// second, or after the job's final status when it ended sooner. It is also
/// the most a record waits before its export starts, unless
/// [`LOG_RENDER_AT`] bytes are waiting or the job finished, which render at
/// once.
pub const LOG_GATHER: Duration = Duration::from_secs(1);
/// Waiting output of this many bytes is rendered without waiting out
/// [`LOG_GATHER`], well before the job's own thread would have to
/// ([`LOG_QUEUE_BYTES`]).
pub const LOG_RENDER_AT: usize = LOG_QUEUE_BYTES / 2;
/// While the runner's buffer is half full, the log task checks this often
/// for room (output waits as compact masked bytes, not as records).
const LOG_ROOM_POLL: Duration = Duration::from_millis(2);
/// After the job finished, its log task waits for room in the buffer at
/// most this long; then it renders the rest (records finding the buffer
/// full are dropped `queue_full`, counted).
pub const LOG_DRAIN_PATIENCE: Duration = Duration::from_secs(60);

/// The log record side of one job. Cheap to clone; every clone emits into
/// the same account.
///
/// The job's output reaches it as masked chunks ([`JobLogs::push_output`]),
/// with their arrival time and the span open then; a per-job task splits
/// them into lines, renders, encodes and hands the records to the sinks in
/// batches. Nothing of that runs on the job's thread unless the task falls
/// [`LOG_QUEUE_BYTES`] behind.
#[derive(Clone)]
pub struct JobLogs {
    inner: Arc<LogsInner>,
}

struct LogsInner {
    spans: Arc<SpanStack>,
    /// Locked before `pending`.
    work: Mutex<Work>,
    pending: Mutex<Pending>,
    /// Whether a task renders `pending`; without one, the writer does.
    task: bool,
    wake: Arc<tokio::sync::Notify>,
    /// Set (and `rendered` notified) once the job's last record was handed
    /// over.
    done: std::sync::atomic::AtomicBool,
    rendered: tokio::sync::Notify,
    account: Arc<JobAccount>,
    resource: Arc<ResourceBlock>,
    scope: Arc<ScopeBlock>,
    /// `ci.job.id`, `ci.pipeline.id`, `ci.project.id`.
    ids: Vec<ProtoKeyValue>,
    template: Template,
    lines: AtomicU64,
}

impl LogsInner {
    /// Whether waiting output is rendered without gathering more: the job
    /// finished (its records follow its final status at once), or
    /// [`LOG_RENDER_AT`] bytes wait.
    fn render_now(&self) -> bool {
        let pending = self.pending.lock().unwrap_or_else(|e| e.into_inner());
        pending.bytes >= LOG_RENDER_AT
            || matches!(pending.pieces.back(), Some(Piece::Finish { .. }))
    }
}

impl Drop for LogsInner {
    fn drop(&mut self) {
        // Ends the task.
        self.wake.notify_one();
    }
}

/// The job's line splitter and sinks; `sinks` is `None` once the job
/// finished: later output is ignored.
struct Work {
    assembler: LineAssembler,
    sinks: Option<Vec<Box<dyn SpanSink>>>,
    /// When the job finished, while its output is still being rendered.
    finishing: Option<std::time::Instant>,
}

/// Output handed over and not yet rendered, in order.
#[derive(Default)]
struct Pending {
    pieces: std::collections::VecDeque<Piece>,
    bytes: usize,
}

enum Piece {
    Output {
        bytes: Vec<u8>,
        stream: Stream,
        at: SystemTime,
        span: SpanId,
    },
    /// The output ended: an unterminated last line is emitted.
    End { span: SpanId },
    /// The job finished at `end_time`: see [`JobLogs::finish`].
    Finish { end_time: SystemTime },
}

impl Piece {
    fn len(&self) -> usize {
        match self {
            Piece::Output { bytes, .. } => bytes.len(),
            Piece::End { .. } | Piece::Finish { .. } => 0,
        }
    }
}

/// The constant parts of a job's records, encoded once: the protobuf of a
/// record is written field by field, in field order, exactly as
/// [`RawLogRecord::encode_bytes`] writes it.
struct Template {
    /// Fields 2 and 3, by [`Severity`].
    severity: [Vec<u8>; 3],
    /// Field 6 `ci.log.stream`, by [`Stream`].
    stream: [Vec<u8>; 3],
    /// Field 6 for each of the job's ids.
    ids: Vec<u8>,
    /// Fields 8 (flags) and 9 (trace id).
    trace: Vec<u8>,
}

impl Template {
    fn new(trace_id: TraceId, ids: &[ProtoKeyValue]) -> Template {
        let severity = [Severity::Info, Severity::Warn, Severity::Error].map(|s| {
            RawLogRecord {
                severity_number: s.number(),
                severity_text: s.as_str().into(),
                ..Default::default()
            }
            .encode_to_vec()
        });
        let stream = [Stream::Stdout, Stream::Stderr, Stream::Runner].map(|s| {
            RawLogRecord {
                attributes: vec![string_attribute(CI_LOG_STREAM, s.as_str())],
                ..Default::default()
            }
            .encode_to_vec()
        });
        let ids = RawLogRecord {
            attributes: ids.to_vec(),
            ..Default::default()
        }
        .encode_to_vec();
        let trace = RawLogRecord {
            flags: 1,
            trace_id: trace_id.to_bytes().to_vec(),
            ..Default::default()
        }
        .encode_to_vec();
        Template {
            severity,
            stream,
            ids,
            trace,
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn encode(
        &self,
        text: &str,
        severity: Severity,
        stream: Stream,
        number: u64,
        chunk: Option<(usize, usize)>,
        time: u64,
        observed: u64,
        span: SpanId,
    ) -> bytes::Bytes {
        use prost::encoding::{encode_key, encode_varint, encoded_len_varint, WireType};
        let mut buf = Vec::with_capacity(text.len() + 160);
        if time != 0 {
            prost::encoding::fixed64::encode(1, &time, &mut buf);
        }
        buf.extend_from_slice(&self.severity[severity_index(severity)]);
        // Field 5: AnyValue { string_value (1) }.
        let any_len = 1 + encoded_len_varint(text.len() as u64) + text.len();
        encode_key(5, WireType::LengthDelimited, &mut buf);
        encode_varint(any_len as u64, &mut buf);
        encode_key(1, WireType::LengthDelimited, &mut buf);
        encode_varint(text.len() as u64, &mut buf);
        buf.extend_from_slice(text.as_bytes());
        buf.extend_from_slice(&self.stream[stream_index(stream)]);
        // Field 6: KeyValue { key (1), value (2): AnyValue { int_value (3) } }.
        let key = CI_LOG_LINE_NUMBER.as_bytes();
        let int_len = 1 + encoded_len_varint(number);
        let kv_len = 1 + encoded_len_varint(key.len() as u64) + key.len() + 1 + 1 + int_len;
        encode_key(6, WireType::LengthDelimited, &mut buf);
        encode_varint(kv_len as u64, &mut buf);
        encode_key(1, WireType::LengthDelimited, &mut buf);
        encode_varint(key.len() as u64, &mut buf);
        buf.extend_from_slice(key);
        encode_key(2, WireType::LengthDelimited, &mut buf);
        encode_varint(int_len as u64, &mut buf);
        encode_key(3, WireType::Varint, &mut buf);
        encode_varint(number, &mut buf);
        buf.extend_from_slice(&self.ids);
        if let Some((index, count)) = chunk {
            for kv in [
                int_attribute(CI_LOG_CHUNK_INDEX, index as i64),
                int_attribute(CI_LOG_CHUNK_COUNT, count as i64),
            ] {
                prost::encoding::message::encode(6, &kv, &mut buf);
            }
        }
        buf.extend_from_slice(&self.trace);
        prost::encoding::bytes::encode(10, &span.to_bytes().to_vec(), &mut buf);
        if observed != 0 {
            prost::encoding::fixed64::encode(11, &observed, &mut buf);
        }
        buf.into()
    }
}

fn severity_index(severity: Severity) -> usize {
    match severity {
        Severity::Info => 0,
        Severity::Warn => 1,
        Severity::Error => 2,
    }
}

fn stream_index(stream: Stream) -> usize {
    match stream {
        Stream::Stdout => 0,
        Stream::Stderr => 1,
        Stream::Runner => 2,
    }
}

impl std::fmt::Debug for JobLogs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JobLogs")
            .field("job_id", &self.inner.account.job_id)
            .finish_non_exhaustive()
    }
}

/// What [`JobLogs::start`] needs.
pub(crate) struct JobLogsStart {
    pub sinks: Vec<Box<dyn SpanSink>>,
    pub resource: Arc<ResourceBlock>,
    pub scope: Arc<ScopeBlock>,
    pub spans: Arc<SpanStack>,
    pub job_id: i64,
    pub pipeline_id: Option<i64>,
    pub project_id: Option<i64>,
}

/// What one turn of the log task did.
enum Turn {
    Idle,
    /// The buffer is half full: output waits.
    Wait,
    Rendered,
    Finished,
}

impl JobLogs {
    /// Starts the job's log side; its task runs on `runtime` (without one,
    /// output is rendered where it is handed over).
    pub(crate) fn start(start: JobLogsStart, runtime: Option<&tokio::runtime::Handle>) -> JobLogs {
        let labels = start.sinks.iter().map(|s| s.label()).collect();
        let mut ids = vec![int_attribute(keys::CI_JOB_ID, start.job_id)];
        if let Some(id) = start.pipeline_id {
            ids.push(int_attribute(keys::CI_PIPELINE_ID, id));
        }
        if let Some(id) = start.project_id {
            ids.push(int_attribute(keys::CI_PROJECT_ID, id));
        }
        let wake = Arc::new(tokio::sync::Notify::new());
        let logs = JobLogs {
            inner: Arc::new(LogsInner {
                template: Template::new(start.spans.trace_id, &ids),
                spans: start.spans,
                work: Mutex::new(Work {
                    assembler: LineAssembler::new(),
                    sinks: Some(start.sinks),
                    finishing: None,
                }),
                pending: Mutex::new(Pending::default()),
                task: runtime.is_some(),
                wake: wake.clone(),
                done: std::sync::atomic::AtomicBool::new(false),
                rendered: tokio::sync::Notify::new(),
                account: Arc::new(JobAccount::new(Some(start.job_id), labels)),
                resource: start.resource,
                scope: start.scope,
                ids,
                lines: AtomicU64::new(0),
            }),
        };
        if let Some(runtime) = runtime {
            runtime.spawn(render_task(Arc::downgrade(&logs.inner), wake));
        }
        logs
    }

    fn work(&self) -> std::sync::MutexGuard<'_, Work> {
        self.inner.work.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn pending(&self) -> std::sync::MutexGuard<'_, Pending> {
        self.inner.pending.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Hands over masked job output of `stream` that arrived at `at`, in
    /// any chunks: the job's task splits it into lines, each rendered by
    /// [`visible_line`] and attributed to the span open now. Never blocks
    /// on export; see [`LOG_QUEUE_BYTES`]. An owned chunk is queued as it is
    /// (a slice is copied).
    pub fn push_output(&self, masked: impl Into<Vec<u8>>, stream: Stream, at: SystemTime) {
        let masked = masked.into();
        if masked.is_empty() {
            return;
        }
        self.enqueue(Piece::Output {
            bytes: masked,
            stream,
            at,
            span: self.inner.spans.current(),
        });
    }

    /// The output ended: an unterminated last line becomes a record.
    pub fn end_output(&self) {
        self.enqueue(Piece::End {
            span: self.inner.spans.current(),
        });
    }

    fn enqueue(&self, piece: Piece) {
        if self.inner.task {
            let mut pending = self.pending();
            if pending.bytes + piece.len() <= LOG_QUEUE_BYTES {
                let before = pending.bytes;
                pending.bytes += piece.len();
                let was_empty = pending.pieces.is_empty();
                pending.pieces.push_back(piece);
                let urgent = before < LOG_RENDER_AT && pending.bytes >= LOG_RENDER_AT;
                drop(pending);
                if was_empty || urgent {
                    self.inner.wake.notify_one();
                }
                return;
            }
        }
        // No task, or it fell behind: render what waits, then this.
        let mut work = self.work();
        let mut pieces = self.take_pending(usize::MAX);
        pieces.push(piece);
        self.render(&mut work, pieces);
    }

    /// Takes up to `max` bytes of waiting output (at least one piece).
    /// Called with `work` locked, so pieces are rendered in order.
    fn take_pending(&self, max: usize) -> Vec<Piece> {
        let mut pending = self.pending();
        let mut taken = Vec::new();
        let mut bytes = 0;
        while let Some(piece) = pending.pieces.front() {
            if !taken.is_empty() && bytes + piece.len() > max {
                break;
            }
            bytes += piece.len();
            taken.extend(pending.pieces.pop_front());
        }
        pending.bytes -= bytes;
        taken
    }

    /// One turn of the job's task. While the runner's buffer is half full,
    /// output waits (unless three quarters of [`LOG_QUEUE_BYTES`] wait, or the
    /// job finished [`LOG_DRAIN_PATIENCE`] ago), so that a job's lines are
    /// not dropped only because they came faster than the export.
    fn turn(&self) -> Turn {
        let mut work = self.work();
        let Some(sinks) = work.sinks.as_ref() else {
            return Turn::Finished;
        };
        let (queued, empty) = {
            let pending = self.pending();
            (pending.bytes, pending.pieces.is_empty())
        };
        if empty {
            return Turn::Idle;
        }
        let patient = work
            .finishing
            .is_none_or(|at| at.elapsed() < LOG_DRAIN_PATIENCE);
        if patient && queued < LOG_QUEUE_BYTES / 4 * 3 && sinks.iter().any(|s| s.half_full()) {
            return Turn::Wait;
        }
        let pieces = self.take_pending(LOG_TASK_ROUND);
        match self.render(&mut work, pieces) {
            true => Turn::Finished,
            false => Turn::Rendered,
        }
    }

    /// Splits, renders and encodes `pieces`, and hands the records to the
    /// sinks in one batch. True when the job's log ended (a
    /// [`Piece::Finish`]).
    fn render(&self, work: &mut Work, pieces: Vec<Piece>) -> bool {
        let mut finished = None;
        {
            let Work {
                assembler, sinks, ..
            } = &mut *work;
            let Some(sinks) = sinks.as_ref() else {
                return true;
            };
            let observed = unix_nanos(SystemTime::now());
            let mut batch = Vec::new();
            for piece in pieces {
                match piece {
                    Piece::Output {
                        bytes,
                        stream,
                        at,
                        span,
                    } => assembler.push(&bytes, stream, at, |line, stream, at| {
                        self.render_line(line, stream, at, span, observed, &mut batch)
                    }),
                    Piece::End { span } => assembler.finish(|line, stream, at| {
                        self.render_line(line, stream, at, span, observed, &mut batch)
                    }),
                    Piece::Finish { end_time } => {
                        finished = Some(end_time);
                        break;
                    }
                }
            }
            self.deliver(sinks, batch);
        }
        match finished {
            Some(end_time) => {
                self.finish_now(work, end_time);
                true
            }
            None => false,
        }
    }

    fn render_line(
        &self,
        raw: &[u8],
        stream: Stream,
        at: SystemTime,
        span: SpanId,
        observed: u64,
        batch: &mut Vec<EncodedSpan>,
    ) {
        let Some(text) = visible_line(raw) else {
            return;
        };
        let severity = match stream {
            Stream::Runner => runner_severity(&text),
            _ => Severity::Info,
        };
        self.render_text(
            &text,
            stream,
            severity,
            unix_nanos(at),
            span,
            observed,
            batch,
        );
    }

    #[allow(clippy::too_many_arguments)]
    fn render_text(
        &self,
        text: &str,
        stream: Stream,
        severity: Severity,
        time: u64,
        span: SpanId,
        observed: u64,
        batch: &mut Vec<EncodedSpan>,
    ) {
        let number = self.inner.lines.fetch_add(1, Ordering::Relaxed) + 1;
        let chunks = split_chunks(text, MAX_BODY_BYTES);
        let count = chunks.len();
        for (index, chunk) in chunks.into_iter().enumerate() {
            let part = (count > 1).then_some((index, count));
            batch.push(EncodedSpan {
                span: self
                    .inner
                    .template
                    .encode(chunk, severity, stream, number, part, time, observed, span),
                resource: self.inner.resource.clone(),
                scope: self.inner.scope.clone(),
            });
        }
    }

    /// Accounts for `batch` and hands it to every sink.
    fn deliver(&self, sinks: &[Box<dyn SpanSink>], batch: Vec<EncodedSpan>) {
        if batch.is_empty() {
            return;
        }
        let account = &self.inner.account;
        account.items_handed_over(batch.len() as u64);
        let last = sinks.len().saturating_sub(1);
        let mut batch = Some(batch);
        for (index, sink) in sinks.iter().enumerate() {
            let items = match index == last {
                true => batch.take().unwrap_or_default(),
                false => batch.clone().unwrap_or_default(),
            };
            sink.accept_batch(items, account, index);
        }
    }

    /// Emits one raw line of the (masked) job log, without its `\n`,
    /// rendered by [`visible_line`], right away (the job's output goes
    /// through [`Self::push_output`]). `first_byte` is when its first byte
    /// arrived. Never blocks on export.
    pub fn emit_raw_line(&self, raw: &[u8], stream: Stream, first_byte: SystemTime) {
        let work = self.work();
        let Some(sinks) = work.sinks.as_ref() else {
            return;
        };
        let mut batch = Vec::new();
        let observed = unix_nanos(SystemTime::now());
        let span = self.inner.spans.current();
        self.render_line(raw, stream, first_byte, span, observed, &mut batch);
        self.deliver(sinks, batch);
    }

    /// Emits one visible line (chunked when longer than [`MAX_BODY_BYTES`]).
    pub fn emit_text(&self, text: &str, stream: Stream, severity: Severity, time: SystemTime) {
        let work = self.work();
        let Some(sinks) = work.sinks.as_ref() else {
            return;
        };
        let mut batch = Vec::new();
        let observed = unix_nanos(SystemTime::now());
        let span = self.inner.spans.current();
        self.render_text(
            text,
            stream,
            severity,
            unix_nanos(time),
            span,
            observed,
            &mut batch,
        );
        self.deliver(sinks, batch);
    }

    fn record(
        &self,
        text: &str,
        severity: Severity,
        time: SystemTime,
        observed: SystemTime,
        span: SpanId,
        attributes: Vec<ProtoKeyValue>,
    ) -> RawLogRecord {
        RawLogRecord {
            time_unix_nano: unix_nanos(time),
            severity_number: severity.number(),
            severity_text: severity.as_str().into(),
            body: string_body(text),
            attributes,
            dropped_attributes_count: 0,
            // W3C trace flags: sampled (the job's spans are all sampled).
            flags: 1,
            trace_id: self.inner.spans.trace_id.to_bytes().to_vec(),
            span_id: span.to_bytes().to_vec(),
            observed_time_unix_nano: unix_nanos(observed),
        }
    }

    fn hand_over_root(&self, sinks: &[Box<dyn SpanSink>], record: RawLogRecord) {
        let encoded = EncodedSpan {
            span: record.encode_bytes(),
            resource: self.inner.resource.clone(),
            scope: self.inner.scope.clone(),
        };
        let account = &self.inner.account;
        account.span_ended();
        for (index, sink) in sinks.iter().enumerate() {
            account.span_created(index);
            sink.accept_root(encoded.clone(), account, index);
        }
    }

    /// Lines emitted so far (a chunked line counts once).
    pub fn lines(&self) -> u64 {
        self.inner.lines.load(Ordering::Relaxed)
    }

    /// Records dropped so far (the largest count over the endpoints).
    pub fn dropped(&self) -> u64 {
        let report = self.inner.account.report(Duration::ZERO, false);
        report
            .endpoints
            .iter()
            .map(|e| e.dropped)
            .max()
            .unwrap_or(0)
    }

    /// The account of the job's records (`spans` counts records here).
    pub fn report(&self) -> FlushReport {
        self.inner.account.report(Duration::ZERO, false)
    }

    pub(crate) fn account(&self) -> &Arc<JobAccount> {
        &self.inner.account
    }

    /// Ends the job's log. Output still waiting for the job's task is
    /// rendered there (the job does not wait for it), and the log ends
    /// after it; otherwise it ends now. When the log ends with records
    /// dropped, a final WARN record (kept: it uses the job's reserved room)
    /// says how many; the sinks are closed and later lines ignored. Returns
    /// the records known dropped now.
    pub(crate) fn finish(&self, end_time: SystemTime) -> u64 {
        let mut work = self.work();
        if work.sinks.is_none() {
            return self.dropped();
        }
        {
            let mut pending = self.pending();
            if self.inner.task && !pending.pieces.is_empty() {
                pending.pieces.push_back(Piece::Finish { end_time });
                work.finishing = Some(std::time::Instant::now());
                drop(pending);
                self.inner.wake.notify_one();
                return self.dropped();
            }
        }
        let pieces = self.take_pending(usize::MAX);
        self.render(&mut work, pieces);
        self.finish_now(&mut work, end_time)
    }

    /// Waits, at most `deadline`, until the job's last record was handed
    /// over (its account then counts every line).
    pub(crate) async fn rendered(&self, deadline: Duration) {
        let until =
            tokio::time::Instant::now() + deadline.min(Duration::from_secs(365 * 24 * 3600));
        loop {
            let notified = self.inner.rendered.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if self.inner.done.load(Ordering::Acquire) {
                return;
            }
            if tokio::time::timeout_at(until, notified).await.is_err() {
                return;
            }
        }
    }

    /// Ends the log now (see [`Self::finish`]).
    fn finish_now(&self, work: &mut Work, end_time: SystemTime) -> u64 {
        let dropped = self.dropped();
        let Some(sinks) = work.sinks.take() else {
            return dropped;
        };
        if dropped > 0 {
            let text = format!(
                "WARNING: {dropped} log lines of this job were not exported (the runner's telemetry buffer was full or the collector unreachable); this log is incomplete"
            );
            let number = self.inner.lines.fetch_add(1, Ordering::Relaxed) + 1;
            let mut attributes = vec![
                string_attribute(CI_LOG_STREAM, Stream::Runner.as_str()),
                int_attribute(CI_LOG_LINE_NUMBER, number as i64),
            ];
            attributes.extend(self.inner.ids.iter().cloned());
            attributes.push(int_attribute(
                CI_TELEMETRY_DROPPED_LOG_RECORDS,
                dropped as i64,
            ));
            let record = self.record(
                &text,
                Severity::Warn,
                end_time,
                SystemTime::now(),
                self.inner.spans.root,
                attributes,
            );
            self.hand_over_root(&sinks, record);
        }
        self.inner.done.store(true, Ordering::Release);
        self.inner.rendered.notify_waiters();
        self.inner.wake.notify_one();
        dropped
    }
}

/// The job's log task: renders handed-over output in turns until the job
/// finished or its log is gone. New output first gathers for
/// [`LOG_GATHER`], unless it is urgent ([`LogsInner::render_now`]).
async fn render_task(logs: std::sync::Weak<LogsInner>, wake: Arc<tokio::sync::Notify>) {
    loop {
        wake.notified().await;
        let gathered = tokio::time::sleep(LOG_GATHER);
        tokio::pin!(gathered);
        loop {
            match logs.upgrade() {
                Some(inner) if !inner.render_now() => {}
                Some(_) => break,
                None => return,
            }
            tokio::select! {
                _ = &mut gathered => break,
                _ = wake.notified() => {}
            }
        }
        loop {
            let Some(inner) = logs.upgrade() else {
                return;
            };
            let turn = JobLogs { inner }.turn();
            match turn {
                Turn::Idle => break,
                Turn::Finished => return,
                Turn::Rendered => tokio::task::yield_now().await,
                Turn::Wait => tokio::time::sleep(LOG_ROOM_POLL).await,
            }
        }
    }
}

/// Severity of a record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Severity {
    Info,
    Warn,
    Error,
}

impl Severity {
    pub fn as_str(self) -> &'static str {
        match self {
            Severity::Info => "INFO",
            Severity::Warn => "WARN",
            Severity::Error => "ERROR",
        }
    }

    pub fn number(self) -> i32 {
        match self {
            Severity::Info => severity::INFO,
            Severity::Warn => severity::WARN,
            Severity::Error => severity::ERROR,
        }
    }
}

/// WARN for the runner's `WARNING:` lines, ERROR for its `ERROR:` lines.
fn runner_severity(text: &str) -> Severity {
    let text = text.trim_start();
    if text.starts_with("WARNING") {
        Severity::Warn
    } else if text.starts_with("ERROR") {
        Severity::Error
    } else {
        Severity::Info
    }
}

fn unix_nanos(time: SystemTime) -> u64 {
    time.duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0)
}

/// Splits `text` into pieces of at most `max` bytes at character
/// boundaries (one piece for a short or empty text).
pub fn split_chunks(text: &str, max: usize) -> Vec<&str> {
    if text.len() <= max {
        return vec![text];
    }
    let mut out = Vec::new();
    let mut rest = text;
    while !rest.is_empty() {
        let mut end = rest.len().min(max);
        while !rest.is_char_boundary(end) {
            end -= 1;
        }
        if end == 0 {
            // `max` smaller than one character: take the character.
            end = rest
                .chars()
                .next()
                .map(char::len_utf8)
                .unwrap_or(rest.len());
        }
        out.push(&rest[..end]);
        rest = &rest[end..];
    }
    out
}

/// The line as GitLab's log view shows it (see the module docs); `None`
/// when it shows nothing (and is not an empty line).
pub fn visible_line(raw: &[u8]) -> Option<String> {
    let raw = raw.strip_suffix(b"\r").unwrap_or(raw);
    if raw.is_empty() {
        return Some(String::new());
    }
    // Fast path: plain text.
    if !raw.iter().any(|b| *b == b'\r' || *b == 0x1b) {
        return Some(String::from_utf8_lossy(raw).into_owned());
    }
    let mut shown: Option<String> = None;
    for segment in raw.split(|b| *b == b'\r') {
        if is_section_marker(segment) {
            continue;
        }
        let text = strip_ansi(segment);
        if !text.is_empty() {
            shown = Some(text);
        }
    }
    shown
}

/// `section_start:<digits>:<name>` or `section_end:<digits>:<name>`.
fn is_section_marker(segment: &[u8]) -> bool {
    let rest = segment
        .strip_prefix(b"section_start:")
        .or_else(|| segment.strip_prefix(b"section_end:"));
    let Some(rest) = rest else {
        return false;
    };
    let digits = rest.iter().take_while(|b| b.is_ascii_digit()).count();
    digits > 0 && rest.get(digits) == Some(&b':')
}

/// Removes CSI (`ESC [ ... final`), OSC (`ESC ] ... BEL|ESC \`) and
/// two-byte escape sequences.
fn strip_ansi(bytes: &[u8]) -> String {
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] != 0x1b {
            out.push(bytes[i]);
            i += 1;
            continue;
        }
        match bytes.get(i + 1) {
            Some(b'[') => {
                i += 2;
                while i < bytes.len() && !(0x40..=0x7e).contains(&bytes[i]) {
                    i += 1;
                }
                i += 1;
            }
            Some(b']') => {
                i += 2;
                while i < bytes.len() {
                    if bytes[i] == 0x07 {
                        i += 1;
                        break;
                    }
                    if bytes[i] == 0x1b && bytes.get(i + 1) == Some(&b'\\') {
                        i += 2;
                        break;
                    }
                    i += 1;
                }
            }
            Some(_) => i += 2,
            None => i += 1,
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Splits a byte stream into lines, remembering when each line's first byte
/// arrived and from which stream. A runner feeds it the masked log.
#[derive(Debug, Default)]
pub struct LineAssembler {
    pending: Vec<u8>,
    first: Option<(SystemTime, Stream)>,
}

impl LineAssembler {
    pub fn new() -> LineAssembler {
        LineAssembler::default()
    }

    /// Feeds bytes that arrived at `now` from `stream`; calls `line` for
    /// every complete line (without its `\n`).
    pub fn push(
        &mut self,
        bytes: &[u8],
        stream: Stream,
        now: SystemTime,
        mut line: impl FnMut(&[u8], Stream, SystemTime),
    ) {
        let mut rest = bytes;
        while !rest.is_empty() {
            let (time, from) = *self.first.get_or_insert((now, stream));
            match rest.iter().position(|b| *b == b'\n') {
                Some(end) => {
                    if self.pending.is_empty() {
                        line(&rest[..end], from, time);
                    } else {
                        self.pending.extend_from_slice(&rest[..end]);
                        line(&self.pending, from, time);
                        self.pending.clear();
                    }
                    self.first = None;
                    rest = &rest[end + 1..];
                }
                None => {
                    self.pending.extend_from_slice(rest);
                    rest = &[];
                    if self.pending.len() >= MAX_PENDING_LINE {
                        line(&self.pending, from, time);
                        self.pending.clear();
                        self.first = None;
                    }
                }
            }
        }
    }

    /// The stream ended: emits an unterminated last line.
    pub fn finish(&mut self, mut line: impl FnMut(&[u8], Stream, SystemTime)) {
        if let Some((time, from)) = self.first.take() {
            if !self.pending.is_empty() {
                line(&self.pending, from, time);
            }
        }
        self.pending.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(raw: &str, expected: Option<&str>) {
        assert_eq!(
            visible_line(raw.as_bytes()).as_deref(),
            expected,
            "raw: {raw:?}"
        );
    }

    #[test]
    fn visible_lines() {
        check("plain text", Some("plain text"));
        check("", Some(""));
        check("crlf\r", Some("crlf"));
        check("\x1b[32;1mgreen\x1b[0;m done", Some("green done"));
        check(
            "section_start:1700000000:step_script\r\x1b[0K\x1b[0K\x1b[36;1mExecuting \"step_script\"\x1b[0;m",
            Some("Executing \"step_script\""),
        );
        check("section_end:1700000000:step_script\r\x1b[0K", None);
        check("10%\r20%\r30%", Some("30%"));
        check("done\r", Some("done"));
        check("progress 50%\r\x1b[0K", Some("progress 50%"));
        check("\x1b]0;title\x07text", Some("text"));
        check("\x1b[0K", None);
        check("not a marker section_start:1:x\rshown", Some("shown"));
        check("section_start:x:y\rshown", Some("shown"));
    }

    #[test]
    fn invalid_utf8_is_replaced() {
        assert_eq!(visible_line(b"a\xffb").as_deref(), Some("a\u{fffd}b"));
    }

    #[test]
    fn chunks_at_char_boundaries() {
        assert_eq!(split_chunks("", 4), [""]);
        assert_eq!(split_chunks("abcd", 4), ["abcd"]);
        assert_eq!(split_chunks("abcdefghi", 4), ["abcd", "efgh", "i"]);
        assert_eq!(split_chunks("aéé", 2), ["a", "é", "é"]);
        let long = "x".repeat(MAX_BODY_BYTES * 2 + 1);
        let chunks = split_chunks(&long, MAX_BODY_BYTES);
        assert_eq!(chunks.len(), 3);
        assert_eq!(chunks.concat(), long);
    }

    #[test]
    fn assembler_keeps_first_byte_time_and_stream() {
        let t = |s| SystemTime::UNIX_EPOCH + Duration::from_secs(s);
        let mut lines = Vec::new();
        let mut a = LineAssembler::new();
        let mut record = |l: &[u8], s: Stream, at: SystemTime| {
            lines.push((
                String::from_utf8_lossy(l).into_owned(),
                s,
                at.duration_since(SystemTime::UNIX_EPOCH).unwrap().as_secs(),
            ))
        };
        a.push(b"one\ntw", Stream::Stdout, t(1), &mut record);
        a.push(b"o\n\nthree", Stream::Stderr, t(2), &mut record);
        a.finish(&mut record);
        assert_eq!(
            lines,
            [
                ("one".to_string(), Stream::Stdout, 1),
                ("two".to_string(), Stream::Stdout, 1),
                ("".to_string(), Stream::Stderr, 2),
                ("three".to_string(), Stream::Stderr, 2),
            ]
        );
    }

    #[test]
    fn the_template_encodes_as_prost_does() {
        let trace_id = TraceId::from_bytes([7; 16]);
        let span = SpanId::from_bytes([3; 8]);
        let ids = vec![
            int_attribute(keys::CI_JOB_ID, 42),
            int_attribute(keys::CI_PIPELINE_ID, -1),
        ];
        let template = Template::new(trace_id, &ids);
        let long = "é".repeat(100);
        for (text, severity, stream, number, chunk, time, observed) in [
            ("hello", Severity::Info, Stream::Stdout, 1, None, 5, 6),
            ("", Severity::Warn, Stream::Runner, 300, None, 0, 0),
            (
                long.as_str(),
                Severity::Error,
                Stream::Stderr,
                u64::from(u32::MAX) + 9,
                Some((1, 3)),
                u64::MAX,
                1,
            ),
        ] {
            let mut attributes = vec![
                string_attribute(CI_LOG_STREAM, stream.as_str()),
                int_attribute(CI_LOG_LINE_NUMBER, number as i64),
            ];
            attributes.extend(ids.iter().cloned());
            if let Some((index, count)) = chunk {
                attributes.push(int_attribute(CI_LOG_CHUNK_INDEX, index as i64));
                attributes.push(int_attribute(CI_LOG_CHUNK_COUNT, count as i64));
            }
            let expected = RawLogRecord {
                time_unix_nano: time,
                severity_number: severity.number(),
                severity_text: severity.as_str().into(),
                body: string_body(text),
                attributes,
                dropped_attributes_count: 0,
                flags: 1,
                trace_id: trace_id.to_bytes().to_vec(),
                span_id: span.to_bytes().to_vec(),
                observed_time_unix_nano: observed,
            };
            let encoded =
                template.encode(text, severity, stream, number, chunk, time, observed, span);
            assert_eq!(encoded, expected.encode_bytes(), "{text:?}");
        }
    }

    #[test]
    fn runner_severities() {
        assert_eq!(runner_severity("WARNING: x"), Severity::Warn);
        assert_eq!(runner_severity("ERROR: x"), Severity::Error);
        assert_eq!(runner_severity("Running with"), Severity::Info);
    }
}

//! The runner-wide export buffer and one export task per endpoint.
//!
//! ```text
//! job A ─┐  accept (never blocks)       ┌─ queue ─ worker ─ HTTP/gRPC ─> collector 1
//! job B ─┼──── budget: spans + bytes ───┤
//! job C ─┘  (full: dropped, queue_full) └─ queue ─ worker ─ HTTP/gRPC ─> collector 2
//! ```
//!
//! * **One buffer per runner, not per job**, bounded in spans and in bytes
//!   over all its endpoints together, so a 30 s outage spanning many jobs is
//!   ridden out and memory stays bounded whatever the number of jobs or
//!   endpoints. A job's flush deadline only bounds how long the runner waits
//!   at the job's end; its spans stay buffered and keep being retried.
//! * **Drop newest when full**: a span that does not fit is dropped when it
//!   ends (`queue_full`) and the buffer is left alone. Taking the oldest
//!   instead would throw away spans that already waited longest and are
//!   closest to delivery (or in flight), and would blame an older job for a
//!   newer one's overflow; the oldest leave by themselves at `max_age` anyway.
//! * **Per endpoint, one request at a time**: a worker takes up to
//!   [`MAX_BATCH`] spans (at most [`MAX_REQUEST_BYTES`]; log records:
//!   [`MAX_LOG_BATCH`], [`MAX_LOG_BATCH_BYTES`], gathered for at most
//!   [`LOG_LINGER`] unless a full batch waits or the buffer is half full),
//!   sends them, and
//!   retries the same batch per [`super::retry`] until it is delivered,
//!   refused for good, or every span in it is older than `max_age`. A
//!   stalled collector costs one export timeout per attempt.
//! * **Shutdown**: remaining spans get one final attempt per batch within
//!   `shutdown_timeout`; whatever is left is dropped as `shutdown`.
//! * **Spans and log records share the buffer** (one budget, counted in
//!   items and bytes); each endpoint has one worker per [`Signal`].
//! * **A trace keeps its root.** Drop-newest alone would drop a job's
//!   `job_execution` span (the last to end) first, orphaning its stage spans.
//!   So every job's sink holds a reservation of one item and
//!   [`ROOT_RESERVE_BYTES`] from the moment the job starts (when the buffer
//!   has room for it then): ordinary items only fit in the room left after
//!   all reservations, and the job's root item (its `job_execution` span, or
//!   its final log record) is admitted into its own reservation. So a root
//!   is kept over the children of the same and of later jobs; it can still
//!   be dropped when the buffer was already full when its job started (no
//!   reservation then) or when it is larger than the reservation and does
//!   not fit otherwise. A reservation not used is given back when the job's
//!   sink is dropped.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use tokio::sync::{watch, Notify};
use tokio::task::JoinHandle;

use super::accounting::{DropReason, JobAccount, Outcome};
use super::auth::Authenticator;
use super::encode::{build_request, EncodedSpan, SpanRef};
use super::error::{ExportError, SetupError};
use super::logs_encode::Signal;
use super::retry::{Backoff, Verdict};
use super::sink::{ExportTarget, SpanSink};
use super::transport::{validate_headers, Attempt, Headers, Transports};
use crate::config::{BufferSettings, ExportSettings};
use crate::metrics::Metrics;

/// Most spans in one export request.
pub const MAX_BATCH: usize = 512;
/// Most log records in one export request (a record is a line, about
/// 150 bytes: 4096 of them stay far below [`MAX_REQUEST_BYTES`]).
pub const MAX_LOG_BATCH: usize = 4096;
/// Most bytes of log records in one export request.
pub const MAX_LOG_BATCH_BYTES: usize = 2 * 1024 * 1024;
/// A logs worker finding fewer than a full batch of records ([`MAX_LOG_BATCH`]
/// or [`MAX_LOG_BATCH_BYTES`]) waits at most this long for more before
/// sending (a job prints lines one by one: without it, each line would cost
/// a request and a wake-up); a full batch goes at once.
pub const LOG_LINGER: Duration = Duration::from_millis(100);
/// Most bytes of spans in one export request (OTLP collectors commonly
/// accept 4 MiB messages).
pub const MAX_REQUEST_BYTES: usize = 4 * 1024 * 1024;
/// Bytes counted per buffered span on top of its encoding (the entry and its
/// references).
pub const SPAN_OVERHEAD: usize = std::mem::size_of::<Item>() + 16;
/// The longest final attempt at shutdown, whatever the configuration says.
pub const MAX_SHUTDOWN: Duration = Duration::from_secs(3600);
/// A worker with nothing to do for this long ends (a new span restarts it).
pub const IDLE_EXIT: Duration = Duration::from_secs(300);
/// Bytes held per job and endpoint for its root item (`job_execution` with
/// its 4 KB of attributes, or the final log record), see the module docs.
pub const ROOT_RESERVE_BYTES: usize = 16 * 1024;

/// Spans and bytes in the buffer, against the limits.
#[derive(Debug)]
struct Budget {
    limits: BufferSettings,
    used: Mutex<(usize, usize)>,
    /// Items and bytes held for roots not yet ended. Locked after `used`.
    held: Mutex<(usize, usize)>,
    metrics: Arc<Metrics>,
}

impl Budget {
    /// Takes room for one item of `bytes`, from the room left after every
    /// reservation; with `own` (a reservation's bytes), that reservation is
    /// given up first, so the item may use it.
    fn reserve_from(&self, bytes: usize, own: Option<usize>) -> bool {
        let mut used = self.used.lock().unwrap_or_else(|e| e.into_inner());
        let mut held = self.held.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(own) = own {
            held.0 = held.0.saturating_sub(1);
            held.1 = held.1.saturating_sub(own);
        }
        if used.0 + held.0 + 1 > self.limits.max_spans
            || used.1 + held.1 + bytes > self.limits.max_bytes
        {
            return false;
        }
        used.0 += 1;
        used.1 += bytes;
        self.metrics.buffer_add(1, bytes as i64);
        true
    }

    /// Holds room for a root item; false when the buffer has none left.
    fn hold(&self, bytes: usize) -> bool {
        let used = self.used.lock().unwrap_or_else(|e| e.into_inner());
        let mut held = self.held.lock().unwrap_or_else(|e| e.into_inner());
        if used.0 + held.0 + 1 > self.limits.max_spans
            || used.1 + held.1 + bytes > self.limits.max_bytes
        {
            return false;
        }
        held.0 += 1;
        held.1 += bytes;
        true
    }

    fn unhold(&self, bytes: usize) {
        let mut held = self.held.lock().unwrap_or_else(|e| e.into_inner());
        held.0 = held.0.saturating_sub(1);
        held.1 = held.1.saturating_sub(bytes);
    }

    /// Half the room is taken (or held): jobs' log output then waits
    /// instead of being rendered (see [`crate::logs`]).
    fn half_full(&self) -> bool {
        let used = self.used.lock().unwrap_or_else(|e| e.into_inner());
        let held = self.held.lock().unwrap_or_else(|e| e.into_inner());
        (used.0 + held.0) * 2 >= self.limits.max_spans
            || (used.1 + held.1) * 2 >= self.limits.max_bytes
    }

    fn release(&self, bytes: usize) {
        let mut used = self.used.lock().unwrap_or_else(|e| e.into_inner());
        used.0 = used.0.saturating_sub(1);
        used.1 = used.1.saturating_sub(bytes);
        self.metrics.buffer_add(-1, -(bytes as i64));
    }
}

/// A buffered span. Deciding its fate ([`Item::resolve`]) accounts for it
/// and frees its room; dropping it undecided counts it as `shutdown`.
struct Item {
    span: EncodedSpan,
    account: Arc<JobAccount>,
    endpoint: usize,
    enqueued: Instant,
    cost: usize,
    budget: Arc<Budget>,
    decided: bool,
    signal: Signal,
}

impl std::fmt::Debug for Item {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Item")
            .field("cost", &self.cost)
            .finish_non_exhaustive()
    }
}

impl Item {
    fn resolve(mut self, outcome: Outcome) {
        self.decide(outcome);
    }

    fn decide(&mut self, outcome: Outcome) {
        if self.decided {
            return;
        }
        self.decided = true;
        self.budget.release(self.cost);
        match outcome {
            Outcome::Exported => self.budget.metrics.exported_signal(self.signal, 1),
            Outcome::Dropped(reason) => self.budget.metrics.dropped_signal(self.signal, reason, 1),
        }
        self.account.record(self.endpoint, outcome, 1);
    }

    fn expired(&self, max_age: Duration, now: Instant) -> bool {
        now.duration_since(self.enqueued) >= max_age
    }
}

impl Drop for Item {
    fn drop(&mut self) {
        self.decide(Outcome::Dropped(DropReason::Shutdown));
    }
}

#[derive(Debug, Default)]
struct Queue {
    items: VecDeque<Item>,
    /// Encoded bytes of `items`.
    bytes: usize,
    /// The worker ended; a new one takes over.
    closed: bool,
}

impl Queue {
    fn push(&mut self, item: Item) {
        self.bytes += item.span.span.len();
        self.items.push_back(item);
    }

    fn pop(&mut self) -> Option<Item> {
        let item = self.items.pop_front()?;
        self.bytes -= item.span.span.len();
        Some(item)
    }

    /// Whether a full batch of `signal` waits.
    fn full(&self, signal: Signal) -> bool {
        let (items, bytes) = batch_limits(signal);
        self.items.len() >= items || self.bytes >= bytes
    }
}

/// Most items and bytes in one request of `signal`.
fn batch_limits(signal: Signal) -> (usize, usize) {
    match signal {
        Signal::Traces => (MAX_BATCH, MAX_REQUEST_BYTES),
        Signal::Logs => (MAX_LOG_BATCH, MAX_LOG_BATCH_BYTES),
    }
}

/// One endpoint's queue and export task.
#[derive(Debug)]
struct Worker {
    target: ExportTarget,
    signal: Signal,
    label: String,
    headers: Headers,
    queue: Mutex<Queue>,
    wake: Notify,
}

impl Worker {
    fn lock(&self) -> std::sync::MutexGuard<'_, Queue> {
        self.queue.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Removes expired spans from the front of the queue (oldest first).
    fn expire_queue(&self, max_age: Duration) {
        let now = Instant::now();
        let mut expired = Vec::new();
        {
            let mut queue = self.lock();
            while queue
                .items
                .front()
                .is_some_and(|item| item.expired(max_age, now))
            {
                expired.extend(queue.pop());
            }
        }
        for item in expired {
            item.resolve(Outcome::Dropped(DropReason::MaxAge));
        }
    }

    fn drain_queue(&self, reason: DropReason) {
        let items: Vec<Item> = {
            let mut queue = self.lock();
            queue.bytes = 0;
            queue.items.drain(..).collect()
        };
        for item in items {
            item.resolve(Outcome::Dropped(reason));
        }
    }

    fn take_batch(queue: &mut Queue, signal: Signal) -> Vec<Item> {
        let (max_batch, max_bytes) = batch_limits(signal);
        let mut batch = Vec::new();
        let mut bytes = 0;
        while let Some(item) = queue.items.front() {
            let size = item.span.span.len();
            if !batch.is_empty() && (batch.len() >= max_batch || bytes + size > max_bytes) {
                break;
            }
            bytes += size;
            batch.extend(queue.pop());
        }
        batch
    }
}

pub(crate) struct HubInner {
    limits: BufferSettings,
    /// One export attempt's bound, by signal (the transports' own bound is
    /// the larger of the two).
    timeouts: [Duration; 2],
    shutdown_timeout: Duration,
    transports: Result<Transports, SetupError>,
    auth: Authenticator,
    budget: Arc<Budget>,
    metrics: Arc<Metrics>,
    workers: Mutex<HashMap<(ExportTarget, Signal), Arc<Worker>>>,
    runtime: OnceLock<tokio::runtime::Handle>,
    /// `Some(deadline)` once shutting down.
    shutdown: watch::Sender<Option<Instant>>,
    tasks: Mutex<Vec<JoinHandle<()>>>,
}

/// The export client of one runner: buffer, workers, credentials.
#[derive(Clone)]
pub struct ExportHub {
    inner: Arc<HubInner>,
}

impl std::fmt::Debug for ExportHub {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ExportHub")
            .field("limits", &self.inner.limits)
            .finish_non_exhaustive()
    }
}

/// What the final export attempt left.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ShutdownReport {
    pub dropped: u64,
    pub elapsed: Duration,
}

impl ExportHub {
    pub fn new(settings: &ExportSettings, metrics: Arc<Metrics>) -> ExportHub {
        let timeouts = [settings.export_timeout, settings.logs_export_timeout];
        let transports = Transports::new(
            settings.ca_file.as_deref(),
            settings.export_timeout.max(settings.logs_export_timeout),
        );
        let (shutdown, _) = watch::channel(None);
        ExportHub {
            inner: Arc::new(HubInner {
                limits: settings.buffer,
                timeouts,
                shutdown_timeout: settings.shutdown_timeout,
                transports,
                auth: Authenticator::new(&settings.gcp_metadata_url, settings.export_timeout),
                budget: Arc::new(Budget {
                    limits: settings.buffer,
                    used: Mutex::new((0, 0)),
                    held: Mutex::new((0, 0)),
                    metrics: metrics.clone(),
                }),
                metrics,
                workers: Mutex::new(HashMap::new()),
                runtime: OnceLock::new(),
                shutdown,
                tasks: Mutex::new(Vec::new()),
            }),
        }
    }

    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.inner.metrics
    }

    /// ID tokens fetched so far (tests).
    pub fn id_token_fetches(&self) -> u64 {
        self.inner.auth.id_token_fetches()
    }

    /// Spans and bytes in the buffer now.
    pub fn buffered(&self) -> (usize, usize) {
        *self
            .inner
            .budget
            .used
            .lock()
            .unwrap_or_else(|e| e.into_inner())
    }

    /// A sink for `target`. Needs a tokio runtime (the worker runs there).
    /// The error is one line, without credentials.
    pub fn build(&self, target: &ExportTarget) -> Result<Box<dyn SpanSink>, SetupError> {
        self.build_signal(target, Signal::Traces)
    }

    /// A sink for one job's items of `signal` at `target` (`url` is the
    /// signal's URL for HTTP). It holds the job's root reservation until the
    /// root is handed over or the sink is dropped.
    pub fn build_signal(
        &self,
        target: &ExportTarget,
        signal: Signal,
    ) -> Result<Box<dyn SpanSink>, SetupError> {
        let runtime = tokio::runtime::Handle::try_current().map_err(|_| SetupError::NoRuntime)?;
        let _ = self.inner.runtime.set(runtime);
        let transports = self
            .inner
            .transports
            .as_ref()
            .map_err(|e| e.clone().for_target(target))?;
        validate_headers(&target.headers).map_err(|e| e.for_target(target))?;
        if target.transport == crate::negotiate::Transport::Grpc {
            transports
                .grpc_channel(&target.url)
                .map_err(|e| e.for_target(target))?;
        }
        let worker = self.inner.worker(target, signal)?;
        let held = self
            .inner
            .budget
            .hold(ROOT_RESERVE_BYTES)
            .then_some(ROOT_RESERVE_BYTES);
        Ok(Box::new(EndpointSink {
            hub: self.inner.clone(),
            worker: Mutex::new(worker),
            label: target.to_string(),
            signal,
            held: Mutex::new(held),
        }))
    }

    /// Stops exporting: one final attempt per batch within the shutdown
    /// timeout, then everything left is dropped as `shutdown`. Spans ending
    /// afterwards are dropped at once. Logs one line.
    pub async fn shutdown(&self) -> ShutdownReport {
        let started = Instant::now();
        let before = self.inner.metrics.snapshot().dropped(DropReason::Shutdown);
        let deadline = started + self.inner.shutdown_timeout.min(MAX_SHUTDOWN);
        self.inner.shutdown.send_replace(Some(deadline));
        let tasks: Vec<_> =
            std::mem::take(&mut *self.inner.tasks.lock().unwrap_or_else(|e| e.into_inner()));
        let until = tokio::time::Instant::from_std(deadline + Duration::from_millis(200));
        for mut task in tasks {
            if tokio::time::timeout_at(until, &mut task).await.is_err() {
                task.abort();
                let _ = task.await;
            }
        }
        let workers: Vec<_> = self
            .inner
            .workers
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .values()
            .cloned()
            .collect();
        for worker in workers {
            worker.lock().closed = true;
            worker.drain_queue(DropReason::Shutdown);
        }
        let dropped = self.inner.metrics.snapshot().dropped(DropReason::Shutdown) - before;
        let report = ShutdownReport {
            dropped,
            elapsed: started.elapsed(),
        };
        let s = self.inner.metrics.snapshot();
        let line = format!(
            "Telemetry stopped spans={} exported={} dropped={} shutdown_dropped={} elapsed={}ms",
            s.spans,
            s.exported,
            s.dropped_total(),
            dropped,
            report.elapsed.as_millis()
        );
        if dropped == 0 {
            tracing::info!("{line}");
        } else {
            tracing::warn!("{line}");
        }
        report
    }
}

impl HubInner {
    fn shutting_down(&self) -> Option<Instant> {
        *self.shutdown.borrow()
    }

    /// The worker of `target`, started if needed.
    fn worker(
        self: &Arc<Self>,
        target: &ExportTarget,
        signal: Signal,
    ) -> Result<Arc<Worker>, SetupError> {
        let mut workers = self.workers.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(worker) = workers.get(&(target.clone(), signal)) {
            return Ok(worker.clone());
        }
        let runtime = self
            .runtime
            .get()
            .cloned()
            .or_else(|| tokio::runtime::Handle::try_current().ok())
            .ok_or(SetupError::NoRuntime)?;
        let worker = Arc::new(Worker {
            target: target.clone(),
            signal,
            label: target.to_string(),
            headers: validate_headers(&target.headers)?,
            queue: Mutex::new(Queue::default()),
            wake: Notify::new(),
        });
        workers.insert((target.clone(), signal), worker.clone());
        let task = runtime.spawn(run_worker(self.clone(), worker.clone()));
        let mut tasks = self.tasks.lock().unwrap_or_else(|e| e.into_inner());
        tasks.retain(|t| !t.is_finished());
        tasks.push(task);
        Ok(worker)
    }

    /// Ends an idle worker unless a span arrived meanwhile.
    fn retire(&self, worker: &Arc<Worker>) -> bool {
        let mut workers = self.workers.lock().unwrap_or_else(|e| e.into_inner());
        let mut queue = worker.lock();
        if !queue.items.is_empty() {
            return false;
        }
        queue.closed = true;
        let key = (worker.target.clone(), worker.signal);
        if workers.get(&key).is_some_and(|w| Arc::ptr_eq(w, worker)) {
            workers.remove(&key);
        }
        true
    }
}

/// A job's handle on one endpoint's queue.
struct EndpointSink {
    hub: Arc<HubInner>,
    worker: Mutex<Arc<Worker>>,
    label: String,
    signal: Signal,
    /// Bytes of the root reservation, while held.
    held: Mutex<Option<usize>>,
}

impl Drop for EndpointSink {
    fn drop(&mut self) {
        if let Some(bytes) = self
            .held
            .get_mut()
            .unwrap_or_else(|e| e.into_inner())
            .take()
        {
            self.hub.budget.unhold(bytes);
        }
    }
}

impl SpanSink for EndpointSink {
    fn label(&self) -> String {
        self.label.clone()
    }

    fn accept(&self, span: EncodedSpan, account: &Arc<JobAccount>, endpoint: usize) {
        self.push(span, account, endpoint, false);
    }

    fn accept_root(&self, span: EncodedSpan, account: &Arc<JobAccount>, endpoint: usize) {
        self.push(span, account, endpoint, true);
    }

    fn accept_batch(&self, spans: Vec<EncodedSpan>, account: &Arc<JobAccount>, endpoint: usize) {
        self.push_batch(spans, account, endpoint);
    }

    fn half_full(&self) -> bool {
        self.hub.budget.half_full()
    }
}

impl EndpointSink {
    /// [`Self::push`] of several non-root items, with one budget lock and
    /// one queue lock for the whole batch.
    fn push_batch(&self, spans: Vec<EncodedSpan>, account: &Arc<JobAccount>, endpoint: usize) {
        let hub = &self.hub;
        let signal = self.signal;
        let total = spans.len() as u64;
        if total == 0 {
            return;
        }
        for _ in 0..total {
            hub.metrics.created(signal);
        }
        if hub.shutting_down().is_some() {
            hub.metrics
                .dropped_signal(signal, DropReason::Shutdown, total);
            account.record(endpoint, Outcome::Dropped(DropReason::Shutdown), total);
            return;
        }
        let now = Instant::now();
        let mut items = Vec::with_capacity(spans.len());
        {
            let budget = &hub.budget;
            let mut used = budget.used.lock().unwrap_or_else(|e| e.into_inner());
            let held = budget.held.lock().unwrap_or_else(|e| e.into_inner());
            let (mut added, mut added_bytes) = (0usize, 0usize);
            for span in spans {
                let cost = span.span.len() + SPAN_OVERHEAD;
                if used.0 + held.0 + 1 > budget.limits.max_spans
                    || used.1 + held.1 + cost > budget.limits.max_bytes
                {
                    continue;
                }
                used.0 += 1;
                used.1 += cost;
                added += 1;
                added_bytes += cost;
                items.push(Item {
                    span,
                    account: account.clone(),
                    endpoint,
                    enqueued: now,
                    cost,
                    budget: budget.clone(),
                    decided: false,
                    signal,
                });
            }
            if added > 0 {
                budget.metrics.buffer_add(added as i64, added_bytes as i64);
            }
        }
        let full = total - items.len() as u64;
        if full > 0 {
            hub.metrics
                .dropped_signal(signal, DropReason::QueueFull, full);
            account.record(endpoint, Outcome::Dropped(DropReason::QueueFull), full);
        }
        if items.is_empty() {
            return;
        }
        self.enqueue(items);
    }

    fn push(&self, span: EncodedSpan, account: &Arc<JobAccount>, endpoint: usize, root: bool) {
        let hub = &self.hub;
        let signal = self.signal;
        hub.metrics.created(signal);
        let own = match root {
            true => self.held.lock().unwrap_or_else(|e| e.into_inner()).take(),
            false => None,
        };
        let drop_now = |reason: DropReason| {
            if let Some(bytes) = own {
                hub.budget.unhold(bytes);
            }
            hub.metrics.dropped_signal(signal, reason, 1);
            account.record(endpoint, Outcome::Dropped(reason), 1);
        };
        if hub.shutting_down().is_some() {
            return drop_now(DropReason::Shutdown);
        }
        let cost = span.span.len() + SPAN_OVERHEAD;
        if !hub.budget.reserve_from(cost, own) {
            hub.metrics.dropped_signal(signal, DropReason::QueueFull, 1);
            account.record(endpoint, Outcome::Dropped(DropReason::QueueFull), 1);
            return;
        }
        self.enqueue(vec![Item {
            span,
            account: account.clone(),
            endpoint,
            enqueued: Instant::now(),
            cost,
            budget: hub.budget.clone(),
            decided: false,
            signal,
        }]);
    }

    /// Queues `items` on this endpoint's worker, under one lock and with one
    /// wake-up; a worker that retired since the last call is replaced (at
    /// most twice). Items no worker can take are dropped as `shutdown`.
    fn enqueue(&self, items: Vec<Item>) {
        for _ in 0..2 {
            let worker = self
                .worker
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .clone();
            {
                let mut queue = worker.lock();
                if !queue.closed {
                    for item in items {
                        queue.push(item);
                    }
                    drop(queue);
                    worker.wake.notify_one();
                    return;
                }
            }
            match self.hub.worker(&worker.target, self.signal) {
                Ok(fresh) => *self.worker.lock().unwrap_or_else(|e| e.into_inner()) = fresh,
                Err(_) => break,
            }
        }
        for mut item in items {
            item.decide(Outcome::Dropped(DropReason::Shutdown));
        }
    }
}

async fn run_worker(hub: Arc<HubInner>, worker: Arc<Worker>) {
    let limits = hub.limits;
    let mut backoff = Backoff::new(limits.initial_backoff, limits.max_backoff);
    let mut failing_since: Option<Instant> = None;
    let mut shutdown = hub.shutdown.subscribe();
    loop {
        let Some(batch) = next_batch(&hub, &worker, &mut shutdown).await else {
            return;
        };
        export_batch(
            &hub,
            &worker,
            batch,
            &mut backoff,
            &mut failing_since,
            &mut shutdown,
        )
        .await;
    }
}

async fn next_batch(
    hub: &Arc<HubInner>,
    worker: &Arc<Worker>,
    shutdown: &mut watch::Receiver<Option<Instant>>,
) -> Option<Vec<Item>> {
    // Logs: when fewer than a full batch wait, more are gathered until the
    // batch is full or LOG_LINGER after they were first seen; not while the
    // buffer is half full (jobs' output waits for room then: no more come).
    let mut linger_until: Option<tokio::time::Instant> = None;
    loop {
        let woken = worker.wake.notified();
        tokio::pin!(woken);
        woken.as_mut().enable();
        worker.expire_queue(hub.limits.max_age);
        // Read before the queue is locked (the budget is never locked
        // under a queue's lock).
        let half_full = worker.signal == Signal::Logs && hub.budget.half_full();
        {
            let mut queue = worker.lock();
            if queue.items.is_empty() {
                linger_until = None;
                if hub.shutting_down().is_some() || queue.closed {
                    queue.closed = true;
                    return None;
                }
            } else {
                let now = tokio::time::Instant::now();
                let send = worker.signal == Signal::Traces
                    || queue.full(worker.signal)
                    || hub.shutting_down().is_some()
                    || linger_until.is_some_and(|until| now >= until)
                    || half_full;
                if send {
                    return Some(Worker::take_batch(&mut queue, worker.signal));
                }
                linger_until.get_or_insert(now + LOG_LINGER);
            }
        }
        match linger_until {
            Some(until) => tokio::select! {
                _ = &mut woken => {}
                _ = shutdown.changed() => {}
                _ = tokio::time::sleep_until(until) => {}
            },
            None => tokio::select! {
                _ = &mut woken => {}
                _ = shutdown.changed() => {}
                _ = tokio::time::sleep(IDLE_EXIT) => {
                    if hub.retire(worker) {
                        return None;
                    }
                }
            },
        }
    }
}

/// Resolves `items`, attributing partial rejections to the last ones.
fn resolve_all(items: Vec<Item>, outcome: Outcome) {
    for item in items {
        item.resolve(outcome);
    }
}

/// Spans per job account in a batch, for one log line per job.
fn per_job(batch: &[Item]) -> Vec<(Arc<JobAccount>, usize, u64)> {
    let mut out: Vec<(Arc<JobAccount>, usize, u64)> = Vec::new();
    for item in batch {
        match out
            .iter_mut()
            .find(|(a, e, _)| Arc::ptr_eq(a, &item.account) && *e == item.endpoint)
        {
            Some(entry) => entry.2 += 1,
            None => out.push((item.account.clone(), item.endpoint, 1)),
        }
    }
    out
}

async fn export_batch(
    hub: &Arc<HubInner>,
    worker: &Arc<Worker>,
    mut batch: Vec<Item>,
    backoff: &mut Backoff,
    failing_since: &mut Option<Instant>,
    shutdown: &mut watch::Receiver<Option<Instant>>,
) {
    let max_age = hub.limits.max_age;
    let label = &worker.label;
    let mut final_attempt_done = false;
    loop {
        let now = Instant::now();
        let (expired, keep): (Vec<Item>, Vec<Item>) =
            batch.into_iter().partition(|i| i.expired(max_age, now));
        batch = keep;
        resolve_all(expired, Outcome::Dropped(DropReason::MaxAge));
        if batch.is_empty() {
            return;
        }
        if let Some(deadline) = hub.shutting_down() {
            if final_attempt_done || Instant::now() >= deadline {
                resolve_all(batch, Outcome::Dropped(DropReason::Shutdown));
                worker.drain_queue(DropReason::Shutdown);
                return;
            }
        }
        let Ok(transports) = hub.transports.as_ref() else {
            resolve_all(batch, Outcome::Dropped(DropReason::PermanentError));
            return;
        };
        let http = transports.http();
        let timeout = hub.timeouts[usize::from(worker.signal == Signal::Logs)];
        let attempt = async {
            let bearer = match hub.auth.bearer(&worker.target.auth, http).await {
                Ok(b) => b,
                Err(error) => return Attempt::failed(error),
            };
            let request = build_request(batch.iter().map(|i| SpanRef {
                span: &i.span.span,
                resource: &i.span.resource,
                scope: &i.span.scope,
            }));
            let send = transports.send_signal(
                worker.signal,
                worker.target.transport,
                &worker.target.url,
                &worker.headers,
                bearer.as_ref(),
                request,
            );
            match tokio::time::timeout(timeout, send).await {
                Ok(attempt) => attempt,
                Err(_) => Attempt::failed(super::error::RequestError::Timeout(timeout)),
            }
        };
        let deadline_passed = async {
            loop {
                let current = *shutdown.borrow_and_update();
                if let Some(deadline) = current {
                    tokio::time::sleep_until(tokio::time::Instant::from_std(deadline)).await;
                    return;
                }
                if shutdown.changed().await.is_err() {
                    std::future::pending::<()>().await;
                }
            }
        };
        let attempt = tokio::select! {
            attempt = attempt => attempt,
            _ = deadline_passed => Attempt::failed(ExportError::Stopped),
        };
        if hub.shutting_down().is_some() {
            final_attempt_done = true;
        }
        match attempt {
            Attempt::Delivered { rejected, message } => {
                if let Some(since) = failing_since.take() {
                    tracing::info!(
                        "Telemetry export to `{label}` recovered after {} failed attempts in {:.1}s",
                        backoff.failures,
                        since.elapsed().as_secs_f64()
                    );
                }
                backoff.reset();
                let rejected = (rejected as usize).min(batch.len());
                let refused = batch.split_off(batch.len() - rejected);
                if !refused.is_empty() {
                    for (account, endpoint, n) in per_job(&refused) {
                        account.note_error(endpoint, &format!("partial success: {message}"));
                        if let Some(job) = account.job_id {
                            tracing::warn!(
                                job_id = job,
                                rejected = n,
                                "Telemetry collector `{label}` rejected {n} spans (partial success): {message}"
                            );
                        }
                    }
                }
                resolve_all(batch, Outcome::Exported);
                resolve_all(refused, Outcome::Dropped(DropReason::Rejected));
                return;
            }
            Attempt::Failed {
                verdict: Verdict::Permanent,
                error,
                unauthenticated,
            } => {
                hub.metrics.export_error();
                if unauthenticated {
                    hub.auth.invalidate(&worker.target.auth).await;
                }
                // The collector answered: it is up.
                failing_since.take();
                backoff.reset();
                for (account, endpoint, n) in per_job(&batch) {
                    account.note_error(endpoint, &error);
                    let first = !account
                        .endpoint(endpoint)
                        .permanent_logged
                        .swap(true, std::sync::atomic::Ordering::AcqRel);
                    if first {
                        match account.job_id {
                            Some(job) => tracing::error!(
                                job_id = job,
                                dropped = n,
                                "Telemetry export to `{label}` failed permanently, {n} spans dropped (further drops for this job are counted, not logged): {error}"
                            ),
                            None => tracing::error!(
                                dropped = n,
                                "Telemetry export to `{label}` failed permanently, {n} spans dropped: {error}"
                            ),
                        }
                    }
                }
                resolve_all(batch, Outcome::Dropped(DropReason::PermanentError));
                return;
            }
            Attempt::Failed {
                verdict: Verdict::Retry { after },
                error,
                unauthenticated,
            } => {
                hub.metrics.export_error();
                if unauthenticated {
                    hub.auth.invalidate(&worker.target.auth).await;
                }
                for (account, endpoint, _) in per_job(&batch) {
                    account.note_error(endpoint, &error);
                }
                if failing_since.is_none() {
                    *failing_since = Some(Instant::now());
                    tracing::warn!(
                        "Telemetry export to `{label}` failed, retrying with backoff (spans stay buffered up to max_age={}s): {error}",
                        max_age.as_secs()
                    );
                }
                let delay = match after {
                    Some(d) => backoff.server_delay(d),
                    None => backoff.next_delay(),
                };
                tracing::debug!(
                    "Telemetry export to `{label}` attempt {} failed, next in {}ms: {error}",
                    backoff.failures,
                    delay.as_millis()
                );
                if hub.shutting_down().is_none() {
                    tokio::select! {
                        _ = tokio::time::sleep(delay) => {}
                        _ = shutdown.wait_for(Option::is_some) => {}
                    }
                }
                worker.expire_queue(max_age);
            }
        }
    }
}

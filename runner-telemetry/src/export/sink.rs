//! What the job side of export sees of an endpoint: the [`SpanSink`] it hands
//! ended spans to, and the [`ExportTarget`] a sink sends to.

use std::fmt;
use std::sync::Arc;

use super::accounting::JobAccount;
use super::auth::Auth;
use super::encode::EncodedSpan;
use crate::negotiate::Transport;

/// Where spans can be handed for export: one endpoint's side of the
/// runner-wide buffer.
pub trait SpanSink: Send + Sync + 'static {
    /// For logs: transport and URL, never credentials.
    fn label(&self) -> String;
    /// Takes one ended span without blocking. From here on the sink accounts
    /// for it in `account` at `endpoint`: exported, or dropped with a reason.
    fn accept(&self, span: EncodedSpan, account: &Arc<JobAccount>, endpoint: usize);
    /// Takes the job's root item (its `job_execution` span, or its final
    /// log record), which may use the room the sink holds for it (see
    /// [`super::hub`]: a trace keeps its root).
    fn accept_root(&self, span: EncodedSpan, account: &Arc<JobAccount>, endpoint: usize) {
        self.accept(span, account, endpoint)
    }
    /// Whether the buffer behind this sink is half full or more (items or
    /// bytes): a job's log task then waits before rendering more, leaving
    /// room for spans (see [`crate::logs`]).
    fn half_full(&self) -> bool {
        false
    }
    /// Takes several items at once, in order, as [`Self::accept`] would one
    /// by one (an endpoint takes its locks once for the batch).
    fn accept_batch(&self, spans: Vec<EncodedSpan>, account: &Arc<JobAccount>, endpoint: usize) {
        for span in spans {
            self.accept(span, account, endpoint);
        }
    }
}

/// Where one job's spans go. `Debug` shows header names, not values.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct ExportTarget {
    pub transport: Transport,
    /// HTTP: full traces URL. gRPC: `http://host:port` or `https://host:port`.
    pub url: String,
    pub tls: bool,
    /// Sent with every request. Values are never logged.
    pub headers: Vec<(String, String)>,
    pub auth: Auth,
}

impl fmt::Debug for ExportTarget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let names: Vec<&str> = self.headers.iter().map(|(k, _)| k.as_str()).collect();
        f.debug_struct("ExportTarget")
            .field("transport", &self.transport)
            .field("url", &crate::secrets::strip_credentials(&self.url))
            .field("tls", &self.tls)
            .field("headers", &names)
            .field("auth", &self.auth)
            .finish()
    }
}

impl fmt::Display for ExportTarget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}+{}",
            self.transport,
            crate::secrets::strip_credentials(&self.url)
        )
    }
}

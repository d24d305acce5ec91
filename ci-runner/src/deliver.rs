//! How long the runner keeps trying to deliver a job's outcome (the end of
//! its log, then its final status) while GitLab fails.
//!
//! GitLab Runner never gives up on a job's final update while GitLab answers
//! 5xx, 429 or nothing at all: it retries with backoff until GitLab accepts
//! or refuses it. Here the retries last up to `final_update_limit` (default
//! one hour) from the job's end; once the runner has been asked to stop, at
//! most `shutdown_timeout` more. A job whose outcome could not be delivered
//! is reported in an ERROR line by the caller, and the process exits
//! non-zero.

use std::time::Duration;

use tokio::sync::watch;
use tokio::time::Instant;

/// First wait between attempts.
pub const INITIAL_BACKOFF: Duration = Duration::from_millis(250);
/// Longest wait between attempts (unless GitLab's `Retry-After` asks for more).
pub const MAX_BACKOFF: Duration = Duration::from_secs(5);

/// The runner's delivery settings, shared by its jobs.
#[derive(Debug, Clone)]
pub struct Patience {
    /// How long from the first attempt.
    pub limit: Duration,
    /// How long from the first stop signal.
    pub shutdown_timeout: Duration,
    /// Turns true at the first stop signal.
    pub shutdown: watch::Receiver<bool>,
}

impl Patience {
    /// Patience that never sees a shutdown (tests, one-off deliveries).
    pub fn without_shutdown(limit: Duration) -> Patience {
        let (tx, shutdown) = watch::channel(false);
        // The sender is dropped: `changed()` then returns at once with an
        // error, which [`Attempts::wait`] treats as "no signal".
        drop(tx);
        Patience {
            limit,
            shutdown_timeout: limit,
            shutdown,
        }
    }

    /// Starts counting attempts now.
    pub fn start(&self) -> Attempts {
        Attempts {
            deadline: Instant::now() + self.limit.min(Duration::from_secs(10 * 365 * 86_400)),
            shutdown_timeout: self.shutdown_timeout,
            shutdown: self.shutdown.clone(),
            stop_deadline: None,
            delay: INITIAL_BACKOFF,
            attempts: 0,
        }
    }
}

/// The attempts at delivering one thing.
#[derive(Debug)]
pub struct Attempts {
    deadline: Instant,
    shutdown_timeout: Duration,
    shutdown: watch::Receiver<bool>,
    stop_deadline: Option<Instant>,
    delay: Duration,
    attempts: u32,
}

impl Attempts {
    /// Attempts made so far (calls to [`Attempts::wait`]).
    pub fn attempts(&self) -> u32 {
        self.attempts
    }

    fn effective_deadline(&mut self) -> Instant {
        if self.stop_deadline.is_none() && *self.shutdown.borrow() {
            self.stop_deadline = Some(Instant::now() + self.shutdown_timeout);
        }
        match self.stop_deadline {
            Some(stop) => stop.min(self.deadline),
            None => self.deadline,
        }
    }

    /// Waits before the next attempt: exponential backoff, or `retry_after`
    /// when GitLab asked for it. Returns false, at once or when the deadline
    /// comes, when there must be no next attempt.
    pub async fn wait(&mut self, retry_after: Option<Duration>) -> bool {
        self.attempts += 1;
        let wait = retry_after.unwrap_or(self.delay);
        self.delay = (self.delay * 2).min(MAX_BACKOFF);
        let until = Instant::now() + wait;
        loop {
            let deadline = self.effective_deadline();
            if Instant::now() >= deadline {
                return false;
            }
            let sleep_until = until.min(deadline);
            let mut shutdown = self.shutdown.clone();
            let signalled = self.stop_deadline.is_none();
            tokio::select! {
                _ = tokio::time::sleep_until(sleep_until) => {
                    if sleep_until == until {
                        return Instant::now() < self.effective_deadline();
                    }
                }
                signal = async { shutdown.wait_for(|s| *s).await.is_ok() }, if signalled => {
                    if !signal {
                        // No sender: no signal will ever come.
                        tokio::time::sleep_until(sleep_until).await;
                        if sleep_until == until {
                            return Instant::now() < self.effective_deadline();
                        }
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn retries_until_the_limit() {
        let patience = Patience::without_shutdown(Duration::from_secs(60));
        let mut attempts = patience.start();
        let started = Instant::now();
        while attempts.wait(None).await {}
        let took = started.elapsed();
        assert!(
            took >= Duration::from_secs(55) && took <= Duration::from_secs(60),
            "{took:?}"
        );
        assert!(attempts.attempts() > 10);
    }

    #[tokio::test(start_paused = true)]
    async fn retry_after_is_honoured() {
        let patience = Patience::without_shutdown(Duration::from_secs(60));
        let mut attempts = patience.start();
        let started = Instant::now();
        assert!(attempts.wait(Some(Duration::from_secs(7))).await);
        assert_eq!(started.elapsed().as_secs(), 7);
    }

    #[tokio::test(start_paused = true)]
    async fn a_signal_shortens_the_limit_to_the_shutdown_timeout() {
        let (tx, shutdown) = watch::channel(false);
        let patience = Patience {
            limit: Duration::from_secs(3600),
            shutdown_timeout: Duration::from_secs(10),
            shutdown,
        };
        let mut attempts = patience.start();
        let started = Instant::now();
        assert!(attempts.wait(None).await);
        tx.send(true).unwrap();
        while attempts.wait(None).await {}
        let took = started.elapsed();
        assert!(took <= Duration::from_secs(11), "{took:?}");
    }
}

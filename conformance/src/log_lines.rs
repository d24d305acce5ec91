//! Reading the runner's log lines: tracing-subscriber's `fmt` prints an
//! event as `<time> <LEVEL> <message> <field>=<value> ...`, the fields after
//! the message (the field names are listed in ci-runner's README, "Logs").

/// The value of `name` in `line` (`name=value`, up to the next space), from
/// the message's `key=value` pairs or the event's fields.
pub fn field<'a>(line: &'a str, name: &str) -> Option<&'a str> {
    line.split_whitespace()
        .find_map(|word| word.strip_prefix(name)?.strip_prefix('='))
}

/// Whether `line` is about job `job` (its `job_id` field).
pub fn is_job(line: &str, job: u64) -> bool {
    field(line, "job_id").and_then(|v| v.parse::<u64>().ok()) == Some(job)
}

/// The first line of `log` about job `job` that contains `text`.
pub fn job_line<'a>(log: &'a str, job: u64, text: &str) -> Option<&'a str> {
    log.lines().find(|l| l.contains(text) && is_job(l, job))
}

/// Job `job`'s log-record account from the runner's `Telemetry flushed`
/// line: `(log_records, exported, dropped)` (a count the line leaves out is
/// 0); None until that line is written.
pub fn log_account(log: &str, job: u64) -> Option<(u64, u64, u64)> {
    let line = log
        .lines()
        .find(|l| l.contains("Telemetry flush") && l.contains("log_records=") && is_job(l, job))?;
    let count = |name: &str| field(line, name).and_then(|v| v.parse::<u64>().ok());
    Some((
        count("log_records")?,
        count("log_records_exported").unwrap_or(0),
        count("log_records_dropped").unwrap_or(0),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fields_and_jobs() {
        let log = "2026-12-02T09:29:18Z  INFO Job succeeded job_id=12 duration=0.5s\n\
                   2026-12-02T09:29:18Z  INFO Job succeeded job_id=1 duration=0.25s\n";
        let line = job_line(log, 1, "Job succeeded").unwrap();
        assert_eq!(field(line, "duration"), Some("0.25s"));
        assert_eq!(field(line, "job"), None);
        assert!(job_line(log, 2, "Job succeeded").is_none());
        assert!(job_line(log, 12, "Job failed").is_none());
    }

    #[test]
    fn a_jobs_log_record_account() {
        let log = "2026-12-02T09:29:18Z  INFO Telemetry flushed spans=9 exported=9 dropped=0 \
                   log_records=7 log_records_exported=5 log_records_dropped=2 elapsed=3ms job_id=4\n\
                   2026-12-02T09:29:18Z  INFO Telemetry flushed spans=1 exported=1 dropped=0 \
                   elapsed=3ms job_id=5\n";
        assert_eq!(log_account(log, 4), Some((7, 5, 2)));
        assert_eq!(log_account(log, 5), None, "no log records: no account");
        assert_eq!(log_account(log, 6), None);
    }
}

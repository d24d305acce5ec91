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
}

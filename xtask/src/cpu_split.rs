//! Where the CPU goes: core-seconds per process and per thread group, from
//! `/proc/<pid>/stat` and `/proc/<pid>/task/*/stat` read before and after a
//! phase of `cargo xtask bench ingest`, next to the whole machine's busy time
//! (`/proc/stat`), so the stack's landed rate can be explained by what each
//! part costs per landed row.
//!
//! Threads are grouped by their name (`comm`, digits removed), which the
//! caller may map to groups of its own (`Watched::classify`). A thread that
//! ended during the phase counts under its name with what it had used when
//! last seen (`Snapshot::update` between the two snapshots); the rest of its
//! time is only in its process's total (`ended threads`).

use std::collections::BTreeMap;
use std::fs;

/// One process to watch: a label and its pid.
#[derive(Debug, Clone)]
pub struct Watched {
    pub label: String,
    pub pid: u32,
    /// The group a thread's name (digits removed) belongs to.
    pub classify: fn(&str) -> String,
}

/// Threads grouped by their name (digits removed).
pub fn by_name(name: &str) -> String {
    name.to_string()
}

/// Per thread id: its name and CPU ticks.
type Threads = BTreeMap<u32, (String, u64)>;

/// A process's core-seconds: (label, total, [(thread group, core-seconds)]).
pub type ProcessCpu = (String, f64, Vec<(String, f64)>);

/// CPU ticks (user + system) at one moment.
#[derive(Debug, Clone, Default)]
pub struct Snapshot {
    /// Per watched process: its total, and per thread id (name, ticks).
    processes: Vec<(u64, Threads)>,
    /// The machine: busy and total ticks over all cores.
    machine_busy: u64,
    machine_total: u64,
}

pub fn snapshot(watched: &[Watched]) -> Snapshot {
    let processes = watched
        .iter()
        .map(|w| {
            let total = stat_ticks(&format!("/proc/{}/stat", w.pid))
                .map(|(_, t)| t)
                .unwrap_or(0);
            let mut threads = BTreeMap::new();
            if let Ok(entries) = fs::read_dir(format!("/proc/{}/task", w.pid)) {
                for entry in entries.flatten() {
                    let Some(tid) = entry.file_name().to_str().and_then(|s| s.parse().ok()) else {
                        continue;
                    };
                    if let Some((name, ticks)) =
                        stat_ticks(&format!("/proc/{}/task/{tid}/stat", w.pid))
                    {
                        threads.insert(tid, (name, ticks));
                    }
                }
            }
            (total, threads)
        })
        .collect();
    let (machine_busy, machine_total) = machine_ticks().unwrap_or((0, 0));
    Snapshot {
        processes,
        machine_busy,
        machine_total,
    }
}

impl Snapshot {
    /// Takes `newer`'s totals, and its threads over this one's: a thread
    /// that ended since keeps what it had used when last seen, under its
    /// name. Sampling often this way leaves little under `ended threads`.
    pub fn update(&mut self, newer: Snapshot) {
        if self.processes.len() != newer.processes.len() {
            *self = newer;
            return;
        }
        for ((total, threads), (new_total, new_threads)) in
            self.processes.iter_mut().zip(newer.processes)
        {
            *total = new_total;
            threads.extend(new_threads);
        }
        self.machine_busy = newer.machine_busy;
        self.machine_total = newer.machine_total;
    }
}

/// The CPU used between two snapshots, in core-seconds.
#[derive(Debug, Clone)]
pub struct Split {
    /// (process label, its core-seconds, [(thread group, core-seconds)]).
    pub processes: Vec<ProcessCpu>,
    /// Busy core-seconds of the whole machine (every process, not only ours).
    pub machine_busy: f64,
    /// Core-seconds the machine had (cores x wall time).
    pub machine_total: f64,
}

pub fn split(watched: &[Watched], before: &Snapshot, after: &Snapshot) -> Split {
    let hz = ticks_per_second();
    let processes = watched
        .iter()
        .enumerate()
        .map(|(i, w)| {
            let empty = (0, BTreeMap::new());
            let (b_total, b_threads) = before.processes.get(i).unwrap_or(&empty);
            let (a_total, a_threads) = after.processes.get(i).unwrap_or(&empty);
            let total = a_total.saturating_sub(*b_total);
            let mut groups: BTreeMap<String, u64> = BTreeMap::new();
            let mut live = 0u64;
            for (tid, (name, ticks)) in a_threads {
                let start = b_threads.get(tid).map(|(_, t)| *t).unwrap_or(0);
                let used = ticks.saturating_sub(start);
                live += used;
                *groups.entry((w.classify)(&group_name(name))).or_default() += used;
            }
            let ended = total.saturating_sub(live);
            if ended > 0 {
                *groups.entry("ended threads".into()).or_default() += ended;
            }
            let mut groups: Vec<(String, f64)> = groups
                .into_iter()
                .filter(|(_, t)| *t > 0)
                .map(|(n, t)| (n, t as f64 / hz))
                .collect();
            groups.sort_by(|a, b| b.1.total_cmp(&a.1));
            (w.label.clone(), total as f64 / hz, groups)
        })
        .collect();
    Split {
        processes,
        machine_busy: after.machine_busy.saturating_sub(before.machine_busy) as f64 / hz,
        machine_total: after.machine_total.saturating_sub(before.machine_total) as f64 / hz,
    }
}

impl Split {
    /// Lines for the bench's output: core-seconds, share of the machine, and
    /// core-seconds per 100,000 landed rows.
    pub fn lines(&self, landed_rows: u64, max_groups: usize) -> Vec<String> {
        let per_100k = |s: f64| s * 100_000.0 / landed_rows.max(1) as f64;
        let mut lines = vec![format!(
            "{:<34} {:>8} {:>14}",
            "CPU (user+system)", "core-s", "per 100k rows"
        )];
        let mut ours = 0.0;
        for (label, total, groups) in &self.processes {
            ours += total;
            lines.push(format!(
                "{label:<34} {total:>8.1} {:>14.2}",
                per_100k(*total)
            ));
            let shown = groups.len().min(max_groups);
            for (name, secs) in &groups[..shown] {
                lines.push(format!(
                    "  {:<32} {secs:>8.1} {:>14.2}",
                    name,
                    per_100k(*secs)
                ));
            }
            let rest: f64 = groups[shown..].iter().map(|g| g.1).sum();
            if rest > 0.0 {
                lines.push(format!(
                    "  {:<32} {rest:>8.1} {:>14.2}",
                    format!("{} other thread groups", groups.len() - shown),
                    per_100k(rest)
                ));
            }
        }
        let others = (self.machine_busy - ours).max(0.0);
        lines.push(format!(
            "{:<34} {others:>8.1} {:>14.2}",
            "rest of the machine (other users)",
            per_100k(others)
        ));
        lines.push(format!(
            "machine: {:.1} of {:.1} core-s busy ({:.0}%)",
            self.machine_busy,
            self.machine_total,
            100.0 * self.machine_busy / self.machine_total.max(1e-9)
        ));
        lines
    }
}

/// A thread's name without its digits (`QueryPipelineEx` and `BgSchPool`
/// stay, `chdb-req-12` becomes `chdb-req`).
fn group_name(comm: &str) -> String {
    let name: String = comm.chars().filter(|c| !c.is_ascii_digit()).collect();
    let name = name.trim_end_matches(['-', '_', ' ', '.', '#']);
    if name.is_empty() {
        comm.to_string()
    } else {
        name.to_string()
    }
}

/// (name, utime + stime) of a `/proc/.../stat` file.
fn stat_ticks(path: &str) -> Option<(String, u64)> {
    let (name, fields) = stat_fields(path)?;
    Some((name, fields.get(UTIME)? + fields.get(STIME)?))
}

// Indexes in `stat_fields`'s numbers: the state (field 3 of the file) is 0.
const MINFLT: usize = 7;
const UTIME: usize = 11;
const STIME: usize = 12;

/// The command name and the numeric fields after it of a `/proc/.../stat`
/// file (the state, a letter, counts as 0 to keep field positions).
fn stat_fields(path: &str) -> Option<(String, Vec<u64>)> {
    let text = fs::read_to_string(path).ok()?;
    let open = text.find('(')?;
    let close = text.rfind(')')?;
    let name = text.get(open + 1..close)?.to_string();
    let fields = text
        .get(close + 1..)?
        .split_whitespace()
        .map(|f| f.parse().unwrap_or(0))
        .collect();
    Some((name, fields))
}

/// Process `pid`'s user + system CPU time so far, in seconds.
pub fn cpu_seconds(pid: u32) -> Option<f64> {
    Some(stat_ticks(&format!("/proc/{pid}/stat"))?.1 as f64 / ticks_per_second())
}

/// Process `pid`'s minor page faults so far (memory it touched for the
/// first time).
pub fn minor_faults(pid: u32) -> Option<u64> {
    stat_fields(&format!("/proc/{pid}/stat"))?
        .1
        .get(MINFLT)
        .copied()
}

/// (busy, total) ticks of all cores, from the first line of `/proc/stat`.
fn machine_ticks() -> Option<(u64, u64)> {
    let text = fs::read_to_string("/proc/stat").ok()?;
    let line = text.lines().next()?;
    let values: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .take(8)
        .filter_map(|v| v.parse().ok())
        .collect();
    let total: u64 = values.iter().sum();
    let idle = values.get(3).copied().unwrap_or(0) + values.get(4).copied().unwrap_or(0);
    Some((total - idle, total))
}

fn ticks_per_second() -> f64 {
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if hz > 0 {
        hz as f64
    } else {
        100.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_this_process_and_its_threads() {
        let watched = [Watched {
            label: "self".into(),
            pid: std::process::id(),
            classify: by_name,
        }];
        let before = snapshot(&watched);
        let spin = || {
            // Spins until it has used a few ticks of its own.
            let own = || stat_ticks("/proc/thread-self/stat").unwrap().1;
            let start = own();
            let mut x = 0u64;
            while own() < start + 3 {
                for _ in 0..100_000 {
                    x = x.wrapping_mul(31).wrapping_add(7);
                }
                std::hint::black_box(x);
            }
        };
        // One thread is seen while it runs, the other only ends.
        let (spun, seen) = (std::sync::mpsc::channel(), std::sync::mpsc::channel());
        let named = std::thread::Builder::new()
            .name("spin-seen".into())
            .spawn(move || {
                spin();
                spun.0.send(()).unwrap();
                seen.1.recv().unwrap();
            })
            .unwrap();
        std::thread::Builder::new()
            .name("spin-unseen".into())
            .spawn(spin)
            .unwrap()
            .join()
            .unwrap();
        spun.1.recv().unwrap();
        let mut after = snapshot(&watched);
        seen.0.send(()).unwrap();
        named.join().unwrap();
        after.update(snapshot(&watched));
        let split = split(&watched, &before, &after);
        let (_, total, groups) = &split.processes[0];
        let group = |name: &str| groups.iter().find(|g| g.0 == name).map(|g| g.1);
        assert!(group("spin-seen").is_some_and(|s| s > 0.0), "{groups:?}");
        assert!(
            group("ended threads").is_some_and(|s| s > 0.0),
            "{groups:?}"
        );
        assert!(*total >= group("spin-seen").unwrap(), "{split:?}");
        assert!(split.machine_total > 0.0);
        assert_eq!(group_name("chdb-req-12"), "chdb-req");
        assert_eq!(group_name("BgSchPool"), "BgSchPool");
    }
}

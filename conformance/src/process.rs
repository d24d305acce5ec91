//! Child processes owned by a test or by the stack: started with their output
//! in a log file, stopped on drop, and (unless detached) killed by the kernel
//! if the owning process dies without running destructors.

use std::fs::{self, File};
use std::io::{Read, Seek, SeekFrom};
use std::net::{TcpListener, TcpStream};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};

/// Polls `check` until it returns `Some`, or fails after `timeout` with the
/// last error it saw. The one way tests and the stack wait for something.
pub fn wait_for<T>(
    what: &str,
    timeout: Duration,
    mut check: impl FnMut() -> Result<Option<T>>,
) -> Result<T> {
    let deadline = Instant::now() + timeout;
    let mut delay = Duration::from_millis(10);
    let mut last_error = None;
    loop {
        match check() {
            Ok(Some(value)) => return Ok(value),
            Ok(None) => {}
            Err(e) => last_error = Some(e),
        }
        if Instant::now() >= deadline {
            return Err(match last_error {
                Some(e) => e.context(format!("timed out after {timeout:?} waiting for {what}")),
                None => anyhow!("timed out after {timeout:?} waiting for {what}"),
            });
        }
        std::thread::sleep(delay);
        delay = (delay * 2).min(Duration::from_millis(200));
    }
}

/// A free TCP port on 127.0.0.1 (bound and released: callers that pass it to
/// another process retry when that process cannot bind it).
pub fn free_port() -> Result<u16> {
    let listener = TcpListener::bind("127.0.0.1:0").context("binding an ephemeral port")?;
    Ok(listener.local_addr()?.port())
}

/// True when something accepts TCP connections on `127.0.0.1:port`.
pub fn port_open(port: u16) -> bool {
    TcpStream::connect_timeout(
        &std::net::SocketAddr::from(([127, 0, 0, 1], port)),
        Duration::from_millis(200),
    )
    .is_ok()
}

/// The last `lines` lines of a log file, for error messages.
pub fn log_tail(path: &Path, lines: usize) -> String {
    let text = fs::read_to_string(path).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    let start = all.len().saturating_sub(lines);
    all[start..]
        .iter()
        .map(|l| format!("    {l}"))
        .collect::<Vec<_>>()
        .join("\n")
}

/// How a process is tied to its owner.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lifetime {
    /// Stopped when the handle drops; killed by the kernel if the owning
    /// process dies first.
    Owned,
    /// Survives its owner (`cargo xtask stack up`): own session, PID file.
    Detached,
}

/// A running child process with its output in `log`.
#[derive(Debug)]
pub struct ManagedProcess {
    pub name: String,
    pub log: PathBuf,
    /// Where this run's output starts in `log` (logs are appended to across
    /// restarts, e.g. `stack down` then `up`).
    log_start: u64,
    child: Option<Child>,
    lifetime: Lifetime,
}

impl ManagedProcess {
    /// Starts `cmd` with stdout and stderr appended to `log`.
    pub fn spawn(
        name: &str,
        mut cmd: Command,
        log: &Path,
        lifetime: Lifetime,
    ) -> Result<ManagedProcess> {
        if let Some(dir) = log.parent() {
            fs::create_dir_all(dir)?;
        }
        let out = File::options()
            .create(true)
            .append(true)
            .open(log)
            .with_context(|| format!("opening {}", log.display()))?;
        let log_start = out.metadata()?.len();
        cmd.stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out);
        let child = match lifetime {
            Lifetime::Owned => spawn_tied(cmd),
            Lifetime::Detached => {
                // SAFETY: setsid is async-signal-safe.
                unsafe {
                    cmd.pre_exec(|| {
                        libc::setsid();
                        Ok(())
                    });
                }
                cmd.spawn()
            }
        }
        .with_context(|| format!("starting {name}"))?;
        Ok(ManagedProcess {
            name: name.to_string(),
            log: log.to_path_buf(),
            log_start,
            child: Some(child),
            lifetime,
        })
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().map(|c| c.id()).unwrap_or(0)
    }

    /// Fails with the log's tail if the process has exited.
    pub fn check_alive(&mut self) -> Result<()> {
        let Some(child) = self.child.as_mut() else {
            bail!("{} was stopped", self.name);
        };
        if let Some(status) = child.try_wait()? {
            bail!(
                "{} exited ({status}); last lines of {}:\n{}",
                self.name,
                self.log.display(),
                log_tail(&self.log, 20)
            );
        }
        Ok(())
    }

    /// Waits until the log contains a line starting with `prefix` and returns
    /// the rest of that line.
    pub fn wait_for_line(&mut self, prefix: &str, timeout: Duration) -> Result<String> {
        let log = self.log.clone();
        let start = self.log_start;
        wait_for(
            &format!("{} to print `{prefix}`", self.name),
            timeout,
            || {
                let mut text = String::new();
                let mut file = File::open(&log)?;
                file.seek(SeekFrom::Start(start))?;
                file.read_to_string(&mut text)?;
                if let Some(rest) = text.lines().find_map(|l| l.strip_prefix(prefix)) {
                    return Ok(Some(rest.trim().to_string()));
                }
                self.check_alive()?;
                Ok(None)
            },
        )
    }

    /// Lets the process outlive this handle (used by `stack up`).
    pub fn release(mut self) -> u32 {
        let pid = self.pid();
        self.child = None;
        pid
    }

    /// SIGTERM, then SIGKILL after `grace`.
    pub fn stop(&mut self, grace: Duration) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        terminate(child.id(), grace);
        let _ = child.wait();
    }
}

impl Drop for ManagedProcess {
    fn drop(&mut self) {
        if self.lifetime == Lifetime::Owned || self.child.is_some() {
            self.stop(Duration::from_secs(5));
        }
    }
}

/// Sends SIGTERM to `pid`, waits up to `grace` for it to go, then SIGKILLs it.
/// Returns false if there was no such process.
pub fn terminate(pid: u32, grace: Duration) -> bool {
    let pid = pid as libc::pid_t;
    // SAFETY: plain kill(2) calls on a pid.
    if unsafe { libc::kill(pid, libc::SIGTERM) } != 0 {
        return false;
    }
    let deadline = Instant::now() + grace;
    while Instant::now() < deadline {
        if !alive(pid as u32) {
            return true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    unsafe { libc::kill(pid, libc::SIGKILL) };
    true
}

/// True if `pid` exists and is not a zombie.
pub fn alive(pid: u32) -> bool {
    match fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => {
            // The state follows the parenthesised command name.
            let state = stat
                .rsplit(')')
                .next()
                .and_then(|s| s.split_whitespace().next());
            !matches!(state, Some("Z") | Some("X") | None)
        }
        Err(_) => false,
    }
}

/// The command line of `pid`, with NULs turned into spaces.
pub fn cmdline(pid: u32) -> Option<String> {
    let raw = fs::read(format!("/proc/{pid}/cmdline")).ok()?;
    Some(String::from_utf8_lossy(&raw).replace('\0', " "))
}

/// Spawns with PR_SET_PDEATHSIG so the child dies with us. The kernel sends
/// that signal when the *thread* that forked exits, so all such children are
/// forked by one thread that lives as long as the process.
fn spawn_tied(cmd: Command) -> std::io::Result<Child> {
    type Request = (Command, mpsc::Sender<std::io::Result<Child>>);
    static SPAWNER: OnceLock<std::sync::Mutex<mpsc::Sender<Request>>> = OnceLock::new();
    let spawner = SPAWNER.get_or_init(|| {
        let (tx, rx) = mpsc::channel::<Request>();
        std::thread::Builder::new()
            .name("conformance-spawner".into())
            .spawn(move || {
                for (mut cmd, reply) in rx {
                    // SAFETY: prctl is async-signal-safe.
                    unsafe {
                        cmd.pre_exec(|| {
                            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                            Ok(())
                        });
                    }
                    let _ = reply.send(cmd.spawn());
                }
            })
            .expect("spawning the process-spawner thread");
        std::sync::Mutex::new(tx)
    });
    let (reply_tx, reply_rx) = mpsc::channel();
    spawner
        .lock()
        .map_err(|_| std::io::Error::other("spawner poisoned"))?
        .send((cmd, reply_tx))
        .map_err(|_| std::io::Error::other("spawner thread is gone"))?;
    reply_rx
        .recv()
        .map_err(|_| std::io::Error::other("spawner thread is gone"))?
}

//! `cargo xtask stack up|down|status [--dir DIR]`.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{bail, Result};
use conformance::paths;
use conformance::stack::{self, Endpoints, Stack, StackOptions};

pub fn run(args: &[String]) -> Result<()> {
    let (command, dir) = parse(args)?;
    match command.as_str() {
        "up" => up(&dir).map(|_| ()),
        "down" => down(&dir),
        "status" => status(&dir),
        other => bail!("unknown stack command `{other}`: expected up, down or status"),
    }
}

fn parse(args: &[String]) -> Result<(String, PathBuf)> {
    let mut command = None;
    let mut dir = paths::target_dir().join("stack");
    let mut rest = args.iter();
    while let Some(arg) = rest.next() {
        match arg.as_str() {
            "--dir" => match rest.next() {
                Some(d) => dir = PathBuf::from(d),
                None => bail!("--dir needs a directory"),
            },
            a if a.starts_with("--dir=") => dir = PathBuf::from(&a["--dir=".len()..]),
            a if command.is_none() && !a.starts_with('-') => command = Some(a.to_string()),
            a => bail!("unexpected argument `{a}`"),
        }
    }
    let Some(command) = command else {
        bail!("usage: cargo xtask stack up|down|status [--dir DIR]");
    };
    let dir = if dir.is_relative() {
        std::env::current_dir()?.join(dir)
    } else {
        dir
    };
    Ok((command, dir))
}

/// Starts the detached stack in `dir`, or reports the one already running.
pub fn up(dir: &std::path::Path) -> Result<Endpoints> {
    let started = Instant::now();
    let states = stack::components(dir);
    if states.iter().all(|c| c.running) {
        let endpoints =
            Endpoints::from_env_file(&std::fs::read_to_string(dir.join("endpoints.env"))?)?;
        println!("The stack in {} is already running.", dir.display());
        print_endpoints(dir, &endpoints);
        return Ok(endpoints);
    }
    if states.iter().any(|c| c.running) {
        // Half a stack is no use: stop what is left and start afresh.
        stack::down(dir)?;
    }
    let stack = Stack::start_with_progress(StackOptions::detached(dir), &mut |line| {
        println!("  {line}")
    })?;
    let endpoints = stack.detach()?;
    println!(
        "Stack up in {:.1}s ({}).",
        started.elapsed().as_secs_f64(),
        dir.display()
    );
    print_endpoints(dir, &endpoints);
    Ok(endpoints)
}

fn print_endpoints(dir: &std::path::Path, endpoints: &Endpoints) {
    println!(
        "  ClickHouse (HTTP): {}  user {}",
        endpoints.clickhouse_url, endpoints.clickhouse_user
    );
    println!("  OTLP/HTTP:         {}", endpoints.otlp_http);
    println!("  OTLP/gRPC:         {}", endpoints.otlp_grpc);
    println!(
        "  Endpoints and the ClickHouse password: {}",
        dir.join("endpoints.env").display()
    );
    println!("  Logs: {}", dir.join("logs").display());
}

fn down(dir: &std::path::Path) -> Result<()> {
    // The demo's fake-rails reads the stack: it goes first.
    if let Some(line) = stop_demo_rails(dir)? {
        println!("{line}");
    }
    for line in stack::down(dir)? {
        println!("{line}");
    }
    Ok(())
}

fn status(dir: &std::path::Path) -> Result<()> {
    let states = stack::components(dir);
    for c in &states {
        match (c.pid, c.running) {
            (Some(pid), true) => println!("{:<10} running (pid {pid})", c.name),
            (Some(pid), false) => println!("{:<10} not running (stale pid {pid})", c.name),
            (None, _) => println!("{:<10} not running", c.name),
        }
    }
    if let Some(pid) = demo_rails_pid(dir) {
        println!("{:<10} running (pid {pid}, the demo's)", "fake-rails");
    }
    if states.iter().all(|c| c.running) {
        if let Ok(text) = std::fs::read_to_string(dir.join("endpoints.env")) {
            let endpoints = Endpoints::from_env_file(&text)?;
            print_endpoints(dir, &endpoints);
        }
        Ok(())
    } else {
        bail!("the stack in {} is not (fully) running", dir.display())
    }
}

/// The demo's fake-rails, kept running with the stack, in `<stack>/pids/`.
pub const RAILS_PID_FILE: &str = "fake-rails.pid";

/// Stops the fake-rails an earlier demo left running with the stack in
/// `stack_dir` (exactly the process its PID file names, if it is still
/// fake-rails); says what it did.
pub fn stop_demo_rails(stack_dir: &std::path::Path) -> Result<Option<String>> {
    let pid_file = stack_dir.join("pids").join(RAILS_PID_FILE);
    let Some(pid) = std::fs::read_to_string(&pid_file)
        .ok()
        .and_then(|s| s.trim().parse::<u32>().ok())
    else {
        return Ok(None);
    };
    let ours = conformance::process::alive(pid)
        && conformance::process::cmdline(pid).is_some_and(|c| c.contains("fake-rails"));
    let line = if ours {
        conformance::process::terminate(pid, std::time::Duration::from_secs(10));
        if conformance::process::alive(pid) {
            bail!("fake-rails (pid {pid}) did not stop");
        }
        format!("Stopped the demo's fake-rails (pid {pid})")
    } else {
        format!("The demo's fake-rails was not running (stale pid {pid})")
    };
    let _ = std::fs::remove_file(&pid_file);
    Ok(Some(line))
}

/// Whether the demo's fake-rails is running with the stack in `stack_dir`.
pub fn demo_rails_pid(stack_dir: &std::path::Path) -> Option<u32> {
    let pid = std::fs::read_to_string(stack_dir.join("pids").join(RAILS_PID_FILE))
        .ok()?
        .trim()
        .parse::<u32>()
        .ok()?;
    (conformance::process::alive(pid)
        && conformance::process::cmdline(pid).is_some_and(|c| c.contains("fake-rails")))
    .then_some(pid)
}

//! `cargo xtask e2e --stack docker` where no Docker engine answers: a
//! failure in one line that says how to run the embedded default, never a
//! run that looks like a pass.

use std::process::Command;

fn xtask(args: &[&str], docker_host: &str) -> (bool, String, String) {
    let output = Command::new(env!("CARGO_BIN_EXE_xtask"))
        .args(args)
        .env("DOCKER_HOST", docker_host)
        .output()
        .unwrap();
    (
        output.status.success(),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

#[test]
fn without_a_docker_engine_e2e_on_docker_fails_in_one_line() {
    let socket = std::env::temp_dir().join(format!("no-docker-{}.sock", std::process::id()));
    let (success, stdout, stderr) = xtask(
        &["e2e", "--stack", "docker"],
        &format!("unix://{}", socket.display()),
    );
    assert!(!success);
    assert_eq!(stdout, "", "nothing ran");
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(stderr.contains("no Docker engine answers"), "{stderr}");
    assert!(stderr.contains("cargo xtask e2e"), "{stderr}");
}

#[test]
fn an_unknown_stack_is_an_error() {
    let (success, _, stderr) = xtask(&["e2e", "--stack", "podman"], "unix:///nonexistent");
    assert!(!success);
    assert!(
        stderr.contains("expected `embedded` or `docker`"),
        "{stderr}"
    );
}

//! The `fake-rails` binary: its machine-readable startup lines and its logs.

use std::process::Stdio;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncReadExt, BufReader};
use tokio::process::Command;

#[tokio::test]
async fn startup_lines_are_machine_readable_and_logs_hold_no_tokens() {
    let mut child = Command::new(env!("CARGO_BIN_EXE_fake-rails"))
        .args([
            "--listen",
            "127.0.0.1:0",
            "--contract",
            "v2",
            "--sampling-rate",
            "0.5",
        ])
        .env("RUST_LOG", "debug")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("the binary starts");
    let mut stdout = BufReader::new(child.stdout.take().unwrap()).lines();
    let read_line = async { stdout.next_line().await.unwrap().expect("a line") };
    let first = tokio::time::timeout(Duration::from_secs(20), read_line)
        .await
        .expect("startup line in time");
    let url = first
        .strip_prefix("fake-rails listening on ")
        .expect(&first)
        .to_string();
    let addr: std::net::SocketAddr = url
        .strip_prefix("http://")
        .unwrap()
        .parse()
        .expect("http://IP:PORT");
    assert_ne!(addr.port(), 0);
    let registration = stdout.next_line().await.unwrap().unwrap();
    let admin = stdout.next_line().await.unwrap().unwrap();
    let registration_token = registration
        .strip_prefix("registration-token: ")
        .expect(&registration)
        .to_string();
    let admin_token = admin
        .strip_prefix("admin-token: ")
        .expect(&admin)
        .to_string();

    let client = reqwest::Client::new();
    assert_eq!(
        client
            .get(format!("{url}/-/health"))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap(),
        "GitLab OK"
    );
    let runner = client
        .post(format!("{url}/api/v4/runners"))
        .json(&serde_json::json!({"token": registration_token}))
        .send()
        .await
        .unwrap();
    assert_eq!(runner.status(), reqwest::StatusCode::CREATED);
    let runner_token = runner.json::<serde_json::Value>().await.unwrap()["token"]
        .as_str()
        .unwrap()
        .to_string();
    let projects = client
        .get(format!("{url}/api/v4/projects"))
        .header("PRIVATE-TOKEN", &admin_token)
        .send()
        .await
        .unwrap();
    assert_eq!(projects.status(), reqwest::StatusCode::OK);

    child.start_kill().expect("stop the server");
    let _ = child.wait().await;
    let mut stderr = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut stderr)
        .await
        .unwrap();
    assert!(
        stderr.contains("POST /api/v4/runners status=201"),
        "one line per request:\n{stderr}"
    );
    assert!(
        stderr.contains("without `--otel-endpoint`"),
        "v2 without endpoints is announced:\n{stderr}"
    );
    assert!(!stderr.contains('\u{1b}'), "no ANSI colours");
    for secret in [&registration_token, &admin_token, &runner_token] {
        assert!(
            !stderr.contains(secret.as_str()),
            "a token leaked into the logs"
        );
    }
}

#[tokio::test]
async fn bad_flags_are_rejected() {
    for args in [
        &["--sampling-rate", "1.5"][..],
        &["--contract", "v3"],
        &["--listen", "nowhere"],
        &["--first-id", "0"],
    ] {
        let output = Command::new(env!("CARGO_BIN_EXE_fake-rails"))
            .args(args)
            .output()
            .await
            .unwrap();
        assert!(!output.status.success(), "{args:?} should fail");
        assert!(output.stdout.is_empty(), "{args:?} printed no startup line");
    }
}

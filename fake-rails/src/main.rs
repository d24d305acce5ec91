//! `fake-rails`: see `fake-rails --help` and fake-rails/README.md.

use std::io::Write;
use std::process::ExitCode;

use clap::Parser;
use tracing_subscriber::EnvFilter;

#[tokio::main]
async fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(false)
        .with_env_filter(
            EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")),
        )
        .init();
    let (config, generated) = fake_rails::Cli::parse().into_config();
    let server = match fake_rails::serve(config).await {
        Ok(server) => server,
        Err(error) => {
            eprintln!("fake-rails: {error:#}");
            return ExitCode::FAILURE;
        }
    };
    {
        // Machine-readable: the first stdout line is exactly this.
        let mut out = std::io::stdout().lock();
        let _ = writeln!(out, "fake-rails listening on {}", server.url());
        if let Some(token) = &generated.registration_token {
            let _ = writeln!(out, "registration-token: {token}");
        }
        if let Some(token) = &generated.admin_token {
            let _ = writeln!(out, "admin-token: {token}");
        }
        let _ = out.flush();
    }
    match server.run_until(shutdown_signal()).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("fake-rails: {error:#}");
            ExitCode::FAILURE
        }
    }
}

async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(term) => term,
                Err(_) => {
                    let _ = ctrl_c.await;
                    return;
                }
            };
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
    tracing::info!("Shutting down");
}

//! The headless browser the page tests drive: Debian's `chromium`,
//! installed with apt when missing (CI runs as root on a fresh machine).

use std::path::Path;
use std::process::Command;

use anyhow::{bail, Context, Result};

/// Where Debian puts it.
const CHROMIUM: &str = "/usr/bin/chromium";

/// Makes sure a Chromium is there for `conformance/tests/it/telemetry_pages.rs`:
/// `CHROMIUM` if set, else Debian's package, installed when missing.
pub fn ensure_chromium() -> Result<()> {
    if let Some(path) = std::env::var_os("CHROMIUM") {
        if Path::new(&path).exists() {
            return Ok(());
        }
        bail!("CHROMIUM={} does not exist", Path::new(&path).display());
    }
    if Path::new(CHROMIUM).exists() {
        return Ok(());
    }
    if !Path::new("/usr/bin/apt-get").exists() {
        bail!(
            "the page tests need Chromium: install Debian's `chromium` \
             (`apt-get install -y chromium`) or set CHROMIUM=/path/to/chrome"
        );
    }
    println!("==> apt-get install chromium (the page tests' headless browser)");
    let install = |update: bool| -> Result<bool> {
        if update {
            Command::new("apt-get")
                .args(["update", "-q"])
                .env("DEBIAN_FRONTEND", "noninteractive")
                .status()
                .context("running apt-get update")?;
        }
        Ok(Command::new("apt-get")
            .args(["install", "-y", "-q", "--no-install-recommends", "chromium"])
            .env("DEBIAN_FRONTEND", "noninteractive")
            .status()
            .context("running apt-get install")?
            .success())
    };
    // A fresh machine may have no package lists yet.
    if !install(false)? && !install(true)? {
        bail!(
            "apt-get could not install chromium (it needs root): run \
             `apt-get install -y chromium` or set CHROMIUM=/path/to/chrome"
        );
    }
    if !Path::new(CHROMIUM).exists() {
        bail!("apt-get installed chromium but {CHROMIUM} is missing");
    }
    Ok(())
}

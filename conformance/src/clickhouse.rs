//! A small ClickHouse HTTP client for the harness: enough to apply the schema
//! and read rows back as JSON. Speaks to the embedded stack's chDB endpoint
//! and to a real ClickHouse server alike.

use std::time::Duration;

use anyhow::{bail, Context, Result};
use serde_json::Value;

/// Where ClickHouse is and how to log in.
#[derive(Debug, Clone)]
pub struct ClickHouse {
    pub url: String,
    pub user: String,
    pub password: String,
    agent: ureq::Agent,
}

impl ClickHouse {
    pub fn new(url: &str, user: &str, password: &str) -> ClickHouse {
        let agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_global(Some(Duration::from_secs(30)))
            .build()
            .into();
        ClickHouse {
            url: url.trim_end_matches('/').to_string(),
            user: user.to_string(),
            password: password.to_string(),
            agent,
        }
    }

    /// Runs one statement; the answer body on success, ClickHouse's message
    /// (with its exception code) on failure.
    pub fn execute(&self, sql: &str) -> Result<String> {
        let mut response = self
            .agent
            .post(&format!("{}/", self.url))
            .header("X-ClickHouse-User", &self.user)
            .header("X-ClickHouse-Key", &self.password)
            .send(sql.as_bytes())
            .with_context(|| format!("sending a query to ClickHouse at {}", self.url))?;
        let status = response.status();
        let code = response
            .headers()
            .get("X-ClickHouse-Exception-Code")
            .and_then(|v| v.to_str().ok())
            .map(str::to_string);
        let body = response.body_mut().read_to_string()?;
        if status != 200 {
            let code = code.unwrap_or_else(|| "?".into());
            bail!(
                "ClickHouse answered {status} (exception code {code}): {}",
                body.trim()
            );
        }
        Ok(body)
    }

    /// Runs a SELECT and returns its rows as JSON objects.
    pub fn rows(&self, select: &str) -> Result<Vec<Value>> {
        let body = self.execute(&format!("{select}\nFORMAT JSONEachRow"))?;
        body.lines()
            .filter(|l| !l.trim().is_empty())
            .map(|l| serde_json::from_str(l).with_context(|| format!("parsing row {l}")))
            .collect()
    }

    /// Runs a query returning a single number.
    pub fn count(&self, select: &str) -> Result<u64> {
        let body = self.execute(&format!("{select}\nFORMAT TabSeparated"))?;
        body.trim()
            .parse()
            .with_context(|| format!("expected a number, got {body:?}"))
    }

    /// Applies the SQL files of `dir` in lexical order, statement by statement.
    /// The files are written to be idempotent (`IF NOT EXISTS`).
    pub fn apply_schema(&self, dir: &std::path::Path) -> Result<usize> {
        let mut files: Vec<_> = std::fs::read_dir(dir)
            .with_context(|| format!("reading {}", dir.display()))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|e| e == "sql"))
            .collect();
        files.sort();
        let mut applied = 0;
        for file in files {
            let text = std::fs::read_to_string(&file)?;
            for statement in split_statements(&text) {
                self.execute(&statement).with_context(|| {
                    format!("applying {} (statement {})", file.display(), applied + 1)
                })?;
                applied += 1;
            }
        }
        Ok(applied)
    }
}

/// Splits a SQL file into statements: a statement ends with `;` at the end of
/// a line; lines starting with `--` are comments.
pub fn split_statements(text: &str) -> Vec<String> {
    let mut statements = Vec::new();
    let mut current = String::new();
    for line in text.lines() {
        if line.trim_start().starts_with("--") {
            continue;
        }
        let trimmed = line.trim_end();
        if let Some(body) = trimmed.strip_suffix(';') {
            current.push_str(body);
            if !current.trim().is_empty() {
                statements.push(current.trim().to_string());
            }
            current.clear();
        } else {
            current.push_str(line);
            current.push('\n');
        }
    }
    if !current.trim().is_empty() {
        statements.push(current.trim().to_string());
    }
    statements
}

#[cfg(test)]
mod tests {
    use super::split_statements;

    fn check(input: &str, expected: &[&str]) {
        assert_eq!(split_statements(input), expected);
    }

    #[test]
    fn splits_on_trailing_semicolons_and_skips_comments() {
        check(
            "-- a comment\nCREATE DATABASE x;\n\n",
            &["CREATE DATABASE x"],
        );
        check(
            "CREATE TABLE t (\n  a String -- inline\n);\nSELECT ';' ;\nSELECT 2",
            &[
                "CREATE TABLE t (\n  a String -- inline\n)",
                "SELECT ';'",
                "SELECT 2",
            ],
        );
        check("\n-- only comments\n", &[]);
    }
}

//! The harness's ClickHouse: the `clickhouse` crate (ClickHouse's own Rust
//! client, at its defaults: lz4 compression, schema validation of typed rows)
//! behind a small synchronous facade, so the harness and its tests stay
//! synchronous. Speaks to the embedded stack's chDB endpoint and to a real
//! ClickHouse server alike.
//!
//! Reads are typed: `fetch_all::<T>` with `#[derive(clickhouse::Row,
//! Deserialize)]` rows (see `trace::StoredSpan` and the rows in `rows`).
//! `execute` and `json_rows` remain for statements and for SQL whose columns
//! are not known in advance (the dashboards' queries).

use std::future::Future;
use std::sync::OnceLock;

use anyhow::{Context, Result};
use clickhouse::{Client, Row, RowOwned, RowRead};
use serde_json::Value;

/// Where ClickHouse is and how to log in, with a client ready to use.
#[derive(Clone)]
pub struct ClickHouse {
    pub url: String,
    pub user: String,
    pub password: String,
    client: Client,
}

impl std::fmt::Debug for ClickHouse {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClickHouse")
            .field("url", &self.url)
            .field("user", &self.user)
            .finish_non_exhaustive()
    }
}

impl ClickHouse {
    pub fn new(url: &str, user: &str, password: &str) -> ClickHouse {
        let url = url.trim_end_matches('/').to_string();
        let client = Client::default()
            .with_url(&url)
            .with_user(user)
            .with_password(password);
        ClickHouse {
            url,
            user: user.to_string(),
            password: password.to_string(),
            client,
        }
    }

    /// The underlying client, for what the facade does not cover (inserts,
    /// parameters); run its futures with [`ClickHouse::block_on`].
    pub fn client(&self) -> &Client {
        &self.client
    }

    /// Runs a future of the `clickhouse` crate to completion, from sync code
    /// or from inside another tokio runtime.
    pub fn block_on<F>(&self, future: F) -> F::Output
    where
        F: Future + Send,
        F::Output: Send,
    {
        block_on(future)
    }

    /// Rows of a SELECT, typed. `?` in `sql` is not a placeholder here.
    pub fn fetch_all<T>(&self, sql: &str) -> Result<Vec<T>>
    where
        T: Row + RowOwned + RowRead + Send,
    {
        let query = self.client.query_raw(sql);
        self.block_on(query.fetch_all::<T>())
            .with_context(|| format!("ClickHouse at {} failed: {}", self.url, short(sql)))
    }

    /// Runs one statement; its answer as text (TabSeparated), ClickHouse's
    /// message (with its exception code) on failure.
    pub fn execute(&self, sql: &str) -> Result<String> {
        self.fetch_text(sql, "TabSeparated")
    }

    fn fetch_text(&self, sql: &str, format: &str) -> Result<String> {
        let query = self.client.query_raw(sql);
        let bytes = self
            .block_on(async move { query.fetch_bytes(format)?.collect().await })
            .with_context(|| format!("ClickHouse at {} failed: {}", self.url, short(sql)))?;
        Ok(String::from_utf8_lossy(&bytes).into_owned())
    }

    /// Runs a SELECT whose columns are not known in advance and returns its
    /// rows as JSON objects. Prefer [`ClickHouse::fetch_all`].
    pub fn json_rows(&self, select: &str) -> Result<Vec<Value>> {
        let body = self.fetch_text(select, "JSONEachRow")?;
        body.lines()
            .filter(|l| !l.trim().is_empty())
            .map(|l| serde_json::from_str(l).with_context(|| format!("parsing row {l}")))
            .collect()
    }

    /// Runs a query returning a single number (any integer type).
    pub fn count(&self, select: &str) -> Result<u64> {
        let sql = format!("SELECT toUInt64(ifNull(({select}), 0))");
        let query = self.client.query_raw(&sql);
        self.block_on(query.fetch_one::<u64>())
            .with_context(|| format!("ClickHouse at {} failed: {}", self.url, short(&sql)))
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
                let query = self.client.query_raw(&statement);
                self.block_on(query.execute()).with_context(|| {
                    format!("applying {} (statement {})", file.display(), applied + 1)
                })?;
                applied += 1;
            }
        }
        Ok(applied)
    }
}

fn short(sql: &str) -> String {
    let one_line: String = sql.split_whitespace().collect::<Vec<_>>().join(" ");
    match one_line.char_indices().nth(120) {
        Some((at, _)) => format!("{}...", &one_line[..at]),
        None => one_line,
    }
}

/// Runs `future` on the harness's ClickHouse runtime: one small tokio
/// runtime for the process (one worker; the harness waits on its queries),
/// built on first use and never shut down.
fn block_on<F>(future: F) -> F::Output
where
    F: Future + Send,
    F::Output: Send,
{
    static RUNTIME: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    let runtime = RUNTIME.get_or_init(|| {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("clickhouse-client")
            .enable_all()
            .build()
            .expect("the ClickHouse client's tokio runtime can be built")
    });
    if tokio::runtime::Handle::try_current().is_err() {
        return runtime.block_on(future);
    }
    // Called from async code (a `#[tokio::test]`), where blocking the thread
    // on another runtime is not allowed: wait on a thread of our own.
    std::thread::scope(|scope| {
        scope
            .spawn(|| runtime.block_on(future))
            .join()
            .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
    })
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

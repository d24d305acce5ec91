//! The schema for a ClickHouse cluster, generated from the one copy in
//! `compose/sql` (never written by hand, so it cannot drift from it).
//!
//! Each table becomes two: `otel.<name>_local`, a `Replicated*MergeTree` on
//! every replica of every shard, and `otel.<name>`, a `Distributed` table over
//! the locals, sharded by the trace id (`cityHash64(TraceId)`, or
//! `cityHash64(trace_id)` for the CI table), so every span of a trace lives on
//! one shard. Writers (the collectors) and readers (Grafana, queries) keep
//! using `otel.<name>`. Each materialized view is created on every shard,
//! reading the local source and writing the local target: a span inserted
//! through the distributed table reaches its shard's local table and fires the
//! view there, and the per-trace lookup (`GROUP BY TraceId`) stays correct
//! because a trace never spans two shards.
//!
//! `cargo xtask cluster-schema --cluster NAME` prints it; docs/scaling.md
//! explains when to use it.

use anyhow::{bail, Context, Result};

use crate::clickhouse::split_statements;

/// What the generated DDL needs to know about the cluster.
#[derive(Debug, Clone)]
pub struct ClusterOptions {
    /// The cluster's name in `remote_servers` (`ON CLUSTER`, `Distributed`).
    pub cluster: String,
    /// ZooKeeper/Keeper path of each local table; `{shard}` and `{replica}`
    /// are the servers' macros.
    pub zookeeper_prefix: String,
}

impl ClusterOptions {
    pub fn new(cluster: &str) -> ClusterOptions {
        ClusterOptions {
            cluster: cluster.to_string(),
            zookeeper_prefix: "/clickhouse/tables/{shard}".to_string(),
        }
    }
}

/// The cluster variant of the SQL files of `dir`, statement by statement.
pub fn cluster_schema_of_dir(
    dir: &std::path::Path,
    options: &ClusterOptions,
) -> Result<Vec<String>> {
    let mut files: Vec<_> = std::fs::read_dir(dir)
        .with_context(|| format!("reading {}", dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "sql"))
        .collect();
    files.sort();
    let mut statements = Vec::new();
    for file in files {
        let text = std::fs::read_to_string(&file)?;
        statements.extend(split_statements(&text));
    }
    cluster_schema(&statements, options)
}

/// The cluster variant of single-server `statements` (as in `compose/sql`:
/// `CREATE DATABASE`, `CREATE TABLE ... ENGINE = <X>MergeTree()`, `CREATE
/// MATERIALIZED VIEW ... TO ...`, all qualified with their database).
pub fn cluster_schema(statements: &[String], options: &ClusterOptions) -> Result<Vec<String>> {
    let cluster = &options.cluster;
    let mut out = Vec::new();
    for statement in statements {
        let (head, body) = statement.split_once('\n').unwrap_or((statement, ""));
        let head = head.trim_end();
        if let Some(database) = head.strip_prefix("CREATE DATABASE IF NOT EXISTS ") {
            out.push(format!(
                "CREATE DATABASE IF NOT EXISTS {database} ON CLUSTER '{cluster}'"
            ));
        } else if let Some(table) = head.strip_prefix("CREATE TABLE IF NOT EXISTS ") {
            let (database, name) = qualified(table)?;
            let local = format!("{name}_local");
            let engine = replicated_engine(body, database, &local, options)
                .with_context(|| format!("table {table}"))?;
            out.push(format!(
                "CREATE TABLE IF NOT EXISTS {database}.{local} ON CLUSTER '{cluster}'\n{engine}"
            ));
            out.push(format!(
                "CREATE TABLE IF NOT EXISTS {database}.{name} ON CLUSTER '{cluster}'\n\
                 AS {database}.{local}\n\
                 ENGINE = Distributed('{cluster}', '{database}', '{local}', {})",
                sharding_key(body)
            ));
        } else if let Some(view) = head.strip_prefix("CREATE MATERIALIZED VIEW IF NOT EXISTS ") {
            let (target, select) = body
                .trim_start()
                .strip_prefix("TO ")
                .and_then(|rest| rest.split_once('\n'))
                .with_context(|| format!("view {view} has no `TO <table>` line"))?;
            let select = local_sources(select)?;
            out.push(format!(
                "CREATE MATERIALIZED VIEW IF NOT EXISTS {view} ON CLUSTER '{cluster}'\n\
                 TO {}_local\n{select}",
                target.trim()
            ));
        } else {
            bail!("no cluster variant for the statement starting `{head}`");
        }
    }
    Ok(out)
}

fn qualified(name: &str) -> Result<(&str, &str)> {
    name.trim()
        .split_once('.')
        .with_context(|| format!("`{name}` is not qualified with its database"))
}

/// The table body with its engine made replicated:
/// `MergeTree()` -> `ReplicatedMergeTree('<path>/<db>/<table>', '{replica}')`.
fn replicated_engine(
    body: &str,
    database: &str,
    local: &str,
    options: &ClusterOptions,
) -> Result<String> {
    let marker = "ENGINE = ";
    let at = body.find(marker).context("no `ENGINE = `")?;
    let rest = &body[at + marker.len()..];
    let open = rest
        .find("()")
        .context("the engine takes no arguments here")?;
    let engine = &rest[..open];
    if !engine.ends_with("MergeTree") {
        bail!("engine {engine} is not a MergeTree");
    }
    Ok(format!(
        "{}ENGINE = Replicated{engine}('{}/{database}/{local}', '{{replica}}'){}",
        &body[..at],
        options.zookeeper_prefix,
        &rest[open + 2..]
    ))
}

/// `cityHash64` of the table's trace id column, so a trace stays on one shard.
fn sharding_key(body: &str) -> String {
    let has = |column: &str| {
        body.lines()
            .any(|l| l.trim_start().starts_with(&format!("{column} ")))
    };
    if has("TraceId") {
        "cityHash64(TraceId)".into()
    } else if has("trace_id") {
        "cityHash64(trace_id)".into()
    } else {
        "rand()".into()
    }
}

/// The view's SELECT reading the local table of its source.
fn local_sources(select: &str) -> Result<String> {
    let mut replaced = 0;
    let lines: Vec<String> = select
        .lines()
        .map(|line| match line.trim_start().strip_prefix("FROM ") {
            Some(source) if !source.contains(' ') && source.contains('.') => {
                replaced += 1;
                line.replace(source, &format!("{source}_local"))
            }
            _ => line.to_string(),
        })
        .collect();
    if replaced != 1 {
        bail!("expected one `FROM <db>.<table>` line in the view, found {replaced}");
    }
    Ok(lines.join("\n"))
}

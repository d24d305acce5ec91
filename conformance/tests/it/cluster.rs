//! The cluster variant of the schema (docs/scaling.md) is generated from
//! compose/sql; its shape is checked here, statement by statement (no
//! cluster runs on this machine: `ON CLUSTER` and replication need Keeper and
//! several servers).

use conformance::clickhouse::split_statements;
use conformance::cluster::{cluster_schema, cluster_schema_of_dir, ClusterOptions};
use conformance::paths;

const CLUSTER: &str = "ci_telemetry";

fn single_server() -> Vec<String> {
    let mut files: Vec<_> = std::fs::read_dir(paths::sql_dir())
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "sql"))
        .collect();
    files.sort();
    files
        .iter()
        .flat_map(|f| split_statements(&std::fs::read_to_string(f).unwrap()))
        .collect()
}

#[test]
fn every_table_becomes_a_replicated_local_table_and_a_distributed_one_sharded_by_trace() {
    let original = single_server();
    let cluster = cluster_schema_of_dir(&paths::sql_dir(), &ClusterOptions::new(CLUSTER)).unwrap();
    let tables: Vec<&String> = original
        .iter()
        .filter(|s| s.starts_with("CREATE TABLE"))
        .collect();
    let views = original
        .iter()
        .filter(|s| s.starts_with("CREATE MATERIALIZED VIEW"))
        .count();
    assert_eq!(
        tables.len(),
        4,
        "otel_traces, its lookup, otel_logs, the CI table"
    );
    assert_eq!(cluster.len(), 1 + 2 * tables.len() + views, "{cluster:#?}");
    for statement in &cluster {
        let head = statement.lines().next().unwrap();
        assert!(
            head.ends_with(&format!(" ON CLUSTER '{CLUSTER}'")),
            "{head}"
        );
    }

    for table in tables {
        let name = table.lines().next().unwrap().rsplit(' ').next().unwrap();
        let short = name.strip_prefix("otel.").unwrap();
        let local = cluster
            .iter()
            .find(|s| s.starts_with(&format!("CREATE TABLE IF NOT EXISTS {name}_local ")))
            .unwrap_or_else(|| panic!("no local table for {name}"));
        // The local table is the original, with only its name and engine changed.
        let engine = if table.contains("ENGINE = AggregatingMergeTree()") {
            "AggregatingMergeTree"
        } else {
            "MergeTree"
        };
        let replicated = format!(
            "ENGINE = Replicated{engine}('/clickhouse/tables/{{shard}}/otel/{short}_local', '{{replica}}')"
        );
        assert!(local.contains(&replicated), "{local}");
        let back = local
            .replace(&format!("{name}_local ON CLUSTER '{CLUSTER}'"), name)
            .replace(&replicated, &format!("ENGINE = {engine}()"));
        assert_eq!(&back, table, "columns, keys, TTL and settings are kept");

        let distributed = cluster
            .iter()
            .find(|s| s.starts_with(&format!("CREATE TABLE IF NOT EXISTS {name} ")))
            .unwrap_or_else(|| panic!("no distributed table {name}"));
        let key = if short == "ci_job_telemetry_traces" {
            "cityHash64(trace_id)"
        } else {
            "cityHash64(TraceId)"
        };
        assert!(
            distributed.ends_with(&format!(
                "AS {name}_local\nENGINE = Distributed('{CLUSTER}', 'otel', '{short}_local', {key})"
            )),
            "{distributed}"
        );
    }
}

#[test]
fn materialized_views_read_and_write_the_shard_local_tables() {
    let cluster = cluster_schema_of_dir(&paths::sql_dir(), &ClusterOptions::new(CLUSTER)).unwrap();
    let views: Vec<&String> = cluster
        .iter()
        .filter(|s| s.starts_with("CREATE MATERIALIZED VIEW"))
        .collect();
    assert_eq!(views.len(), 2);
    for view in views {
        let lines: Vec<&str> = view.lines().collect();
        assert!(
            lines[1].starts_with("TO otel.") && lines[1].ends_with("_local"),
            "{view}"
        );
        assert!(lines.contains(&"FROM otel.otel_traces_local"), "{view}");
    }
}

#[test]
fn statements_it_cannot_translate_are_errors() {
    let options = ClusterOptions::new(CLUSTER);
    let unknown = cluster_schema(&["DROP TABLE otel.x".to_string()], &options);
    assert!(unknown
        .unwrap_err()
        .to_string()
        .contains("DROP TABLE otel.x"));
    let unqualified = cluster_schema(
        &["CREATE TABLE IF NOT EXISTS t\n(a String) ENGINE = MergeTree() ORDER BY a".to_string()],
        &options,
    );
    assert!(unqualified
        .unwrap_err()
        .to_string()
        .contains("not qualified"));
}

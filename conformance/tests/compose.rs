//! The Docker stack cannot run here (no Docker engine), so it is checked
//! statically: it mounts the one copy of the schema and the dashboards, its
//! collector writes the tables that schema creates, and Grafana's datasource
//! is the one the dashboards name.

use std::path::Path;

use conformance::clickhouse::split_statements;
use conformance::paths;
use serde_yaml::Value;

fn yaml(path: &Path) -> Value {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_yaml::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn volumes(compose: &Value, service: &str) -> Vec<String> {
    compose["services"][service]["volumes"]
        .as_sequence()
        .unwrap_or_else(|| panic!("service {service} has no volumes"))
        .iter()
        .filter_map(|v| v.as_str().map(str::to_string))
        .collect()
}

fn schema_statements() -> Vec<String> {
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
fn the_docker_stack_mounts_the_shared_schema_and_dashboards() {
    let compose = yaml(&paths::compose_dir().join("docker-compose.yml"));
    assert!(
        volumes(&compose, "clickhouse")
            .contains(&"./sql:/docker-entrypoint-initdb.d:ro".to_string()),
        "ClickHouse runs compose/sql at first start"
    );
    let grafana = volumes(&compose, "grafana");
    assert!(grafana.contains(&"../dashboards:/var/lib/grafana/dashboards:ro".to_string()));
    assert!(grafana.contains(&"./grafana/provisioning:/etc/grafana/provisioning:ro".to_string()));
    let provider =
        yaml(&paths::compose_dir().join("grafana/provisioning/dashboards/dashboards.yaml"));
    assert_eq!(
        provider["providers"][0]["options"]["path"].as_str(),
        Some("/var/lib/grafana/dashboards")
    );
    for mount in volumes(&compose, "clickhouse").iter().chain(&grafana) {
        let source = mount.split(':').next().unwrap();
        if source.starts_with('.') {
            assert!(
                paths::compose_dir().join(source).exists(),
                "{source} is mounted but does not exist"
            );
        }
    }
}

#[test]
fn the_collector_writes_tables_the_schema_creates() {
    let config = yaml(&paths::compose_dir().join("otel-collector.yaml"));
    let exporter = &config["exporters"]["clickhouse"];
    assert_eq!(
        exporter["create_schema"].as_bool(),
        Some(false),
        "the schema is ours"
    );
    let database = exporter["database"].as_str().unwrap();
    let statements = schema_statements();
    for key in ["traces_table_name", "logs_table_name"] {
        let table = exporter[key].as_str().unwrap();
        let wanted = format!("CREATE TABLE IF NOT EXISTS {database}.{table}");
        assert!(
            statements.iter().any(|s| s.starts_with(&wanted)),
            "compose/sql creates {database}.{table}"
        );
    }
    let pipelines = &config["service"]["pipelines"];
    for signal in ["traces", "logs"] {
        let exporters = pipelines[signal]["exporters"].as_sequence().unwrap();
        assert!(exporters.iter().any(|e| e.as_str() == Some("clickhouse")));
    }
}

#[test]
fn every_schema_statement_is_idempotent_and_qualified() {
    let statements = schema_statements();
    assert!(statements.len() >= 6, "{statements:#?}");
    for statement in statements {
        let head = statement.lines().next().unwrap_or_default();
        assert!(head.contains("IF NOT EXISTS"), "not idempotent: {head}");
        assert!(
            head.contains("otel"),
            "not qualified with the `otel` database: {head}"
        );
    }
}

#[test]
fn dashboards_use_the_provisioned_datasource() {
    let datasources =
        yaml(&paths::compose_dir().join("grafana/provisioning/datasources/clickhouse.yaml"));
    let uid = datasources["datasources"][0]["uid"]
        .as_str()
        .unwrap()
        .to_string();
    let dir = paths::repo_root().join("dashboards");
    let mut checked = 0;
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_none_or(|e| e != "json") {
            continue;
        }
        let dashboard: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
        for panel in dashboard["panels"].as_array().unwrap() {
            assert_eq!(
                panel["datasource"]["uid"].as_str(),
                Some(uid.as_str()),
                "{}",
                panel["title"]
            );
            checked += 1;
        }
    }
    assert!(checked > 0);
}

//! Every dashboard panel's SQL runs against the real ClickHouse engine after a
//! real pipeline, with Grafana's ClickHouse macros expanded as the datasource
//! expands them; the panels that summarise jobs return rows.

use conformance::gitlab::FakeRailsOptions;
use conformance::paths;
use conformance::world::World;
use serde_json::Value;

const PIPELINE: &str = "
build:
  stage: build
  script:
    - echo building
test:
  stage: test
  script:
    - echo testing
    - exit 1
";

/// Expands the macros of grafana-clickhouse-datasource for a 1-day window.
fn expand(sql: &str, trace_id: &str, job_id: &str) -> String {
    let mut out = sql
        .replace("${job_id}", job_id)
        .replace("${trace_id}", trace_id)
        .replace("$trace_id", trace_id)
        .replace("$__fromTime", "toDateTime(now() - INTERVAL 1 DAY)")
        .replace("$__toTime", "toDateTime(now() + INTERVAL 1 HOUR)")
        .replace("$__interval_s", "60");
    for (name, expansion) in [
        (
            "$__timeFilter(",
            "{c} >= toDateTime(now() - INTERVAL 1 DAY) AND {c} <= toDateTime(now() + INTERVAL 1 HOUR)",
        ),
        ("$__timeInterval(", "toStartOfInterval(toDateTime({c}), INTERVAL 60 second)"),
    ] {
        while let Some(start) = out.find(name) {
            let rest = &out[start + name.len()..];
            let end = rest.find(')').expect("a closing parenthesis");
            let column = rest[..end].trim().to_string();
            let replacement = expansion.replace("{c}", &column);
            out.replace_range(start..start + name.len() + end + 1, &replacement);
        }
    }
    out
}

#[test]
fn every_panel_query_runs_and_the_job_panels_have_data() {
    let mut world = World::new(FakeRailsOptions::default()).unwrap();
    let project = world.create_project_with_flag("dashboards", true).unwrap();
    let mut options = world.to_collector();
    // The job log panel reads the runner's log records.
    options
        .extra_env
        .push(("CI_TELEMETRY_LOGS".into(), "true".into()));
    world.start_runner(options).unwrap();
    let (pipeline, jobs) = world.run_pipeline(project, PIPELINE).unwrap();
    for job in &jobs {
        world.job_execution(job["id"].as_u64().unwrap()).unwrap();
    }
    let trace_id = format!("{pipeline:032x}");
    let job_id = jobs[0]["id"].as_u64().unwrap().to_string();
    // The job's log records are exported before its span, but land in
    // their own table: wait for them too.
    conformance::process::wait_for(
        "the job's log records",
        conformance::world::SPAN_DEADLINE,
        || {
            let n = world.stack.clickhouse().count(&format!(
                "SELECT count() FROM otel.otel_logs WHERE LogAttributes['ci.job.id'] = '{job_id}'"
            ))?;
            Ok((n > 0).then_some(()))
        },
    )
    .unwrap();
    let clickhouse = world.stack.clickhouse();

    let dir = paths::repo_root().join("dashboards");
    let mut ran = 0;
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_none_or(|e| e != "json") {
            continue;
        }
        let dashboard: Value =
            serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
        for panel in dashboard["panels"].as_array().unwrap() {
            let title = panel["title"].as_str().unwrap_or("?");
            for target in panel["targets"].as_array().unwrap() {
                let sql = expand(target["rawSql"].as_str().unwrap(), &trace_id, &job_id);
                let rows = clickhouse.json_rows(&sql).unwrap_or_else(|e| {
                    panic!("panel `{title}` of {}: {e:#}\n{sql}", path.display())
                });
                ran += 1;
                if [
                    "Jobs by status",
                    "Slowest jobs",
                    "Trace",
                    "Queue time (job_pending, s)",
                    "Job log",
                ]
                .contains(&title)
                {
                    assert!(
                        !rows.is_empty(),
                        "panel `{title}` shows nothing after a pipeline:\n{sql}"
                    );
                }
                if title == "Slowest jobs" {
                    let statuses: Vec<&str> = rows
                        .iter()
                        .filter_map(|r| r["job_status"].as_str())
                        .collect();
                    assert!(
                        statuses.contains(&"success") && statuses.contains(&"failed"),
                        "{rows:#?}"
                    );
                }
            }
        }
    }
    assert!(ran >= 8, "ran {ran} panel queries");
}

//! The Docker stack cannot run here (no Docker engine), so it is checked as
//! far as the tools allow: every file parses, the collector configurations
//! use only components of the pinned collector-contrib version (under their
//! current names), every variable they or docker-compose.yml reference is
//! set, every mounted path exists, the topology is the MVC's (OIDC at the
//! gateway, sampling there, load balancing by trace id to the backends, the
//! backends writing tables the one schema creates), Grafana's provisioning
//! uses keys the plugin documents, and the dashboards name the provisioned
//! datasource. What only a Docker engine can show (the images start, the
//! collector accepts these files, the pipeline runs end to end) is left to
//! `cargo xtask e2e --stack docker`.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use conformance::clickhouse::split_statements;
use conformance::paths;
use serde_yaml::{Mapping, Value};

/// The collector-contrib release the Docker stack pins (`OTELCOL_IMAGE` in
/// compose/.env).
const PINNED_CONTRIB_VERSION: &str = "0.159.0";

/// Component types (the name before any `/`) of otelcol-contrib v0.159.0 that
/// the configurations may use: the ones this stack has a use for, each
/// checked against its source. Sources: the otelcol-contrib distribution
/// manifest (open-telemetry/opentelemetry-collector-releases,
/// distributions/otelcol-contrib/manifest.yaml: oidcauthextension,
/// healthcheckextension, otlpreceiver, batchprocessor,
/// memorylimiterprocessor, probabilisticsamplerprocessor,
/// tailsamplingprocessor, clickhouseexporter, loadbalancingexporter,
/// otlpexporter, otlphttpexporter, debugexporter) and the renames of core
/// v0.144.0 (`otlp` exporter -> `otlp_grpc`, `otlphttp` -> `otlp_http`) and
/// contrib v0.153.0 (`loadbalancing` -> `load_balancing`). The manifest read
/// was an older release's; the names were checked against each component's
/// documentation of 2026. Add a component here only with its source.
const PINNED_COMPONENTS: &[(&str, &[&str])] = &[
    ("extensions", &["health_check", "oidc"]),
    ("receivers", &["otlp"]),
    (
        "processors",
        &[
            "batch",
            "memory_limiter",
            "probabilistic_sampler",
            "tail_sampling",
        ],
    ),
    (
        "exporters",
        &[
            "clickhouse",
            "load_balancing",
            "otlp_grpc",
            "otlp_http",
            "debug",
        ],
    ),
];

/// Names that still work in v0.159.0 but log a deprecation warning at start.
const DEPRECATED_COMPONENTS: &[(&str, &str, &str)] = &[
    ("exporters", "otlp", "otlp_grpc"),
    ("exporters", "otlphttp", "otlp_http"),
    ("exporters", "loadbalancing", "load_balancing"),
];

/// Every `jsonData` / `secureJsonData` key grafana-clickhouse-datasource 4.x
/// documents. Source: the plugin's generated configuration reference
/// (grafana/clickhouse-datasource, generated from `dsconfig.json`).
const PLUGIN_JSON_DATA_KEYS: &[&str] = &[
    "host",
    "port",
    "protocol",
    "secure",
    "path",
    "username",
    "tlsSkipVerify",
    "tlsAuth",
    "tlsAuthWithCACert",
    "configMode",
    "signalType",
    "defaultDatabase",
    "defaultTable",
    "dialTimeout",
    "queryTimeout",
    "connMaxLifetime",
    "maxIdleConns",
    "maxOpenConns",
    "validateSql",
    "enableMapKeysDiscovery",
    "logs.defaultDatabase",
    "logs.defaultTable",
    "logs.otelEnabled",
    "logs.otelVersion",
    "logs.filterTimeColumn",
    "logs.timeColumn",
    "logs.levelColumn",
    "logs.messageColumn",
    "logs.selectContextColumns",
    "logs.contextColumns",
    "logs.showLogLinks",
    "traces.defaultDatabase",
    "traces.defaultTable",
    "traces.otelEnabled",
    "traces.otelVersion",
    "traces.traceIdColumn",
    "traces.spanIdColumn",
    "traces.operationNameColumn",
    "traces.parentSpanIdColumn",
    "traces.serviceNameColumn",
    "traces.durationColumn",
    "traces.durationUnit",
    "traces.startTimeColumn",
    "traces.tagsColumn",
    "traces.serviceTagsColumn",
    "traces.kindColumn",
    "traces.statusCodeColumn",
    "traces.statusMessageColumn",
    "traces.stateColumn",
    "traces.instrumentationLibraryNameColumn",
    "traces.instrumentationLibraryVersionColumn",
    "traces.flattenNested",
    "traces.traceEventsColumnPrefix",
    "traces.traceLinksColumnPrefix",
    "traces.showTraceLinks",
    "traces.traceTimestampTableSuffix",
    "httpHeaders",
    "forwardGrafanaHeaders",
    "customSettings",
    "aliasTables",
    "enableRowLimit",
    "rowLimit",
    "hideTableNameInAdhocFilters",
    "version",
    "enableSchemaCache",
    "schemaCacheTTLSeconds",
];
const PLUGIN_SECURE_KEYS: &[&str] = &["password", "tlsCACert", "tlsClientCert", "tlsClientKey"];

fn compose_dir() -> PathBuf {
    paths::compose_dir()
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn yaml(path: &Path) -> Value {
    serde_yaml::from_str(&read(path)).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn compose() -> Value {
    let mut compose = yaml(&compose_dir().join("docker-compose.yml"));
    // Resolve `<<: *anchor` merge keys the way compose does, including merges
    // of anchors that merge others themselves.
    loop {
        let before = compose.clone();
        compose.apply_merge().unwrap();
        if compose == before {
            return compose;
        }
    }
}

/// compose/.env as key -> value.
fn dot_env() -> BTreeMap<String, String> {
    read(&compose_dir().join(".env"))
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(|l| {
            let (k, v) = l.split_once('=').unwrap_or_else(|| panic!(".env: {l}"));
            (k.to_string(), v.to_string())
        })
        .collect()
}

fn services(compose: &Value) -> &Mapping {
    compose["services"].as_mapping().expect("services")
}

fn strings(value: &Value) -> Vec<String> {
    value
        .as_sequence()
        .map(|s| {
            s.iter()
                .filter_map(|v| v.as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default()
}

fn environment(service: &Value) -> BTreeSet<String> {
    match &service["environment"] {
        Value::Mapping(m) => m
            .keys()
            .filter_map(|k| k.as_str().map(str::to_string))
            .collect(),
        Value::Sequence(s) => s
            .iter()
            .filter_map(|v| v.as_str())
            .map(|v| v.split('=').next().unwrap().to_string())
            .collect(),
        _ => BTreeSet::new(),
    }
}

/// `${NAME}` / `${NAME:-default}` references of docker-compose.yml (not `$$`).
fn compose_variables(text: &str) -> BTreeSet<String> {
    let mut found = BTreeSet::new();
    let bytes = text.as_bytes();
    let mut i = 0;
    while i + 1 < bytes.len() {
        if bytes[i] == b'$' && bytes[i + 1] == b'$' {
            i += 2;
            continue;
        }
        if bytes[i] == b'$' && bytes[i + 1] == b'{' {
            let rest = &text[i + 2..];
            let end = rest
                .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                .unwrap();
            found.insert(rest[..end].to_string());
        }
        i += 1;
    }
    found
}

/// `${env:NAME}` references of a collector configuration.
fn collector_variables(text: &str) -> BTreeSet<String> {
    text.match_indices("${env:")
        .map(|(i, m)| {
            let rest = &text[i + m.len()..];
            rest[..rest.find(['}', ':']).unwrap()].to_string()
        })
        .collect()
}

/// The collector's merge of several `--config` files: maps key by key, the
/// later file's lists and scalars win.
fn merge(base: &mut Value, overlay: &Value) {
    match (base, overlay) {
        (Value::Mapping(base), Value::Mapping(overlay)) => {
            for (key, value) in overlay {
                match base.get_mut(key) {
                    Some(existing) => merge(existing, value),
                    None => {
                        base.insert(key.clone(), value.clone());
                    }
                }
            }
        }
        (base, overlay) => *base = overlay.clone(),
    }
}

/// A collector service: its `--config` files, as paths in compose/.
struct Collector {
    service: String,
    files: Vec<PathBuf>,
    environment: BTreeSet<String>,
}

impl Collector {
    fn config(&self) -> Value {
        let mut merged = Value::Mapping(Mapping::new());
        for file in &self.files {
            merge(&mut merged, &yaml(file));
        }
        merged
    }
}

/// Every service running the collector image, with its configuration files
/// mapped back from the container path through its mounts.
fn collectors(compose: &Value) -> Vec<Collector> {
    let mut found = Vec::new();
    for (name, service) in services(compose) {
        if service["image"].as_str() != Some("${OTELCOL_IMAGE}") {
            continue;
        }
        let mounts: Vec<(String, String)> = strings(&service["volumes"])
            .iter()
            .map(|m| {
                let mut parts = m.split(':');
                (
                    parts.next().unwrap().to_string(),
                    parts.next().unwrap().to_string(),
                )
            })
            .collect();
        let files = strings(&service["command"])
            .iter()
            .filter_map(|arg| arg.strip_prefix("--config="))
            .map(|in_container| {
                let (source, target) = mounts
                    .iter()
                    .find(|(_, target)| in_container.starts_with(target.as_str()))
                    .unwrap_or_else(|| panic!("{name:?}: {in_container} is not mounted"));
                compose_dir()
                    .join(source)
                    .join(in_container[target.len()..].trim_start_matches('/'))
            })
            .collect::<Vec<_>>();
        assert!(
            !files.is_empty(),
            "{name:?} runs the collector without --config"
        );
        found.push(Collector {
            service: name.as_str().unwrap().to_string(),
            files,
            environment: environment(service),
        });
    }
    found
}

fn collector(compose: &Value, service: &str) -> Value {
    collectors(compose)
        .into_iter()
        .find(|c| c.service == service)
        .unwrap_or_else(|| panic!("no collector service {service}"))
        .config()
}

#[test]
fn every_compose_variable_is_set_in_dot_env() {
    let text = read(&compose_dir().join("docker-compose.yml"));
    let env = dot_env();
    let missing: Vec<_> = compose_variables(&text)
        .into_iter()
        .filter(|v| !env.contains_key(v))
        .collect();
    assert!(
        missing.is_empty(),
        "used in docker-compose.yml, not set in .env: {missing:?}"
    );
    assert!(env.len() >= 10, "{env:?}");
}

#[test]
fn images_are_pinned_and_the_collector_is_the_pinned_contrib_release() {
    let env = dot_env();
    for key in ["OTELCOL_IMAGE", "CLICKHOUSE_IMAGE", "GRAFANA_IMAGE"] {
        let image = &env[key];
        let tag = image.rsplit_once(':').map(|(_, t)| t).unwrap_or("");
        assert!(
            !tag.is_empty() && tag != "latest" && tag.chars().next().unwrap().is_ascii_digit(),
            "{key}={image} is not pinned to a version"
        );
    }
    assert_eq!(
        env["OTELCOL_IMAGE"],
        format!("otel/opentelemetry-collector-contrib:{PINNED_CONTRIB_VERSION}")
    );
    assert!(env["GRAFANA_CLICKHOUSE_PLUGIN"].starts_with("grafana-clickhouse-datasource@4."));
    for (name, service) in services(&compose()) {
        let image = service["image"].as_str().unwrap_or_default();
        assert!(
            image.starts_with("${") || image.ends_with(":local"),
            "{name:?}: image {image:?} is not one of the pins in .env"
        );
    }
}

#[test]
fn every_mounted_path_and_build_file_exists() {
    let compose = compose();
    let mut checked = 0;
    for (name, service) in services(&compose) {
        for mount in strings(&service["volumes"]) {
            let source = mount.split(':').next().unwrap();
            if source.starts_with('.') {
                assert!(
                    compose_dir().join(source).exists(),
                    "{name:?} mounts {source}, which does not exist"
                );
                checked += 1;
            }
        }
        if let Some(build) = service["build"].as_mapping() {
            let context = compose_dir().join(build["context"].as_str().unwrap());
            assert!(
                context.join("Cargo.toml").exists(),
                "the build context is the workspace"
            );
            assert!(context.join(build["dockerfile"].as_str().unwrap()).exists());
        }
    }
    assert!(checked >= 6, "{checked} mounts checked");
    let compose_text = read(&compose_dir().join("docker-compose.yml"));
    assert!(compose_text.contains("./sql:/docker-entrypoint-initdb.d:ro"));
    assert!(compose_text.contains("../dashboards:/var/lib/grafana/dashboards:ro"));
    let provider = yaml(&compose_dir().join("grafana/provisioning/dashboards/dashboards.yaml"));
    assert_eq!(
        provider["providers"][0]["options"]["path"].as_str(),
        Some("/var/lib/grafana/dashboards")
    );
    // The demo service runs this script from its mount.
    assert!(compose_dir().join("demo/run-demo.sh").exists());
    assert!(compose_dir().join("demo/.gitlab-ci.yml").exists());
}

#[test]
fn collector_configs_use_only_pinned_components_under_their_current_names() {
    let compose = compose();
    let collectors = collectors(&compose);
    assert!(
        collectors.len() >= 5,
        "gateway and two backends per profile"
    );
    for collector in &collectors {
        let config = collector.config();
        let service = &collector.service;
        // No section the list does not cover (connectors, say) goes unchecked.
        for key in config.as_mapping().unwrap().keys() {
            let key = key.as_str().unwrap();
            assert!(
                key == "service" || PINNED_COMPONENTS.iter().any(|(kind, _)| *kind == key),
                "{service}: section `{key}` is not checked by this test"
            );
        }
        let mut defined = BTreeSet::new();
        for (kind, known) in PINNED_COMPONENTS {
            let Some(section) = config[*kind].as_mapping() else {
                continue;
            };
            for key in section.keys() {
                let id = key.as_str().unwrap();
                let kind_name = id.split('/').next().unwrap();
                if let Some((_, old, new)) = DEPRECATED_COMPONENTS
                    .iter()
                    .find(|(k, old, _)| k == kind && *old == kind_name)
                {
                    panic!("{service}: {kind} `{old}` is deprecated, use `{new}`");
                }
                assert!(
                    known.contains(&kind_name),
                    "{service}: {kind} `{kind_name}` is not a component of otelcol-contrib {PINNED_CONTRIB_VERSION} this stack knows"
                );
                defined.insert(format!("{kind}:{id}"));
            }
        }
        // Everything the service section names is defined, and everything
        // defined is used.
        let mut used = BTreeSet::new();
        for ext in strings(&config["service"]["extensions"]) {
            used.insert(format!("extensions:{ext}"));
        }
        let pipelines = config["service"]["pipelines"]
            .as_mapping()
            .expect("pipelines");
        for (_, pipeline) in pipelines {
            for kind in ["receivers", "processors", "exporters"] {
                for id in strings(&pipeline[kind]) {
                    used.insert(format!("{kind}:{id}"));
                }
            }
        }
        // A receiver's authenticator must be an enabled extension.
        for (id, receiver) in config["receivers"].as_mapping().unwrap() {
            for (_, protocol) in receiver["protocols"].as_mapping().into_iter().flatten() {
                if let Some(auth) = protocol["auth"]["authenticator"].as_str() {
                    assert!(
                        used.contains(&format!("extensions:{auth}")),
                        "{service}: receiver {id:?} authenticates with {auth}, which is not enabled"
                    );
                }
            }
        }
        let undefined: Vec<_> = used.difference(&defined).collect();
        assert!(
            undefined.is_empty(),
            "{service}: used but not defined: {undefined:?}"
        );
        let unused: Vec<_> = defined.difference(&used).collect();
        assert!(
            unused.is_empty(),
            "{service}: defined but not used: {unused:?}"
        );
    }
}

#[test]
fn every_variable_a_collector_config_references_is_set_for_its_service() {
    let compose = compose();
    for collector in collectors(&compose) {
        for file in &collector.files {
            for variable in collector_variables(&read(file)) {
                assert!(
                    collector.environment.contains(&variable),
                    "{}: {} references ${{env:{variable}}}, which compose does not set",
                    collector.service,
                    file.display()
                );
            }
        }
    }
}

#[test]
fn the_gateway_authenticates_samples_and_routes_by_trace_id() {
    let compose = compose();
    let gateway = collector(&compose, "otel-gateway");
    let provider = &gateway["extensions"]["oidc"]["providers"][0];
    assert_eq!(
        provider["issuer_url"].as_str(),
        Some("${env:OIDC_ISSUER_URL}")
    );
    assert_eq!(provider["audience"].as_str(), Some("${env:OIDC_AUDIENCE}"));
    // fake-rails is the issuer, and the audience is the one it puts in payloads.
    let services = services(&compose);
    let gateway_env = &services["otel-gateway"]["environment"];
    let rails_env = &services["fake-rails"]["environment"];
    assert_eq!(
        gateway_env["OIDC_ISSUER_URL"],
        rails_env["FAKE_RAILS_PUBLIC_URL"]
    );
    assert_eq!(
        gateway_env["OIDC_AUDIENCE"],
        rails_env["FAKE_RAILS_OTEL_AUDIENCE"]
    );
    assert!(rails_env["FAKE_RAILS_OTEL_ENDPOINT"]
        .as_str()
        .unwrap()
        .starts_with("http://otel-gateway:4318/"));
    assert_eq!(rails_env["FAKE_RAILS_CONTRACT"].as_str(), Some("v2"));

    // The receivers runners reach are authenticated; the published ports are theirs.
    for protocol in ["grpc", "http"] {
        assert_eq!(
            gateway["receivers"]["otlp"]["protocols"][protocol]["auth"]["authenticator"].as_str(),
            Some("oidc"),
            "otlp {protocol}"
        );
    }
    let published = strings(&services["otel-gateway"]["ports"]);
    assert_eq!(
        published,
        ["${OTLP_GRPC_PORT}:4317", "${OTLP_HTTP_PORT}:4318"]
    );

    let sampler = &gateway["processors"]["probabilistic_sampler"];
    assert_eq!(
        sampler["sampling_percentage"].as_str(),
        Some("${env:SAMPLING_PERCENTAGE}")
    );
    assert_eq!(
        sampler["mode"].as_str(),
        Some("hash_seed"),
        "trace ids are pipeline ids, not random"
    );
    let traces = strings(&gateway["service"]["pipelines"]["traces"]["processors"]);
    assert!(traces.contains(&"probabilistic_sampler".to_string()));

    let balancer = &gateway["exporters"]["load_balancing"];
    assert_eq!(balancer["routing_key"].as_str(), Some("traceID"));
    let backends = strings(&balancer["resolver"]["static"]["hostnames"]);
    assert_eq!(backends.len(), 2);
    // Each backend host answers in every profile: as a service or an alias.
    for profile in ["keep-all", "tail-sampling"] {
        for host in &backends {
            let name = host.split(':').next().unwrap();
            let answers = services.iter().any(|(service, s)| {
                strings(&s["profiles"]).contains(&profile.to_string())
                    && (service.as_str() == Some(name)
                        || strings(&s["networks"]["default"]["aliases"])
                            .contains(&name.to_string()))
            });
            assert!(answers, "no {profile} service answers as {name}");
        }
    }
}

#[test]
fn the_backends_write_tables_the_schema_creates_with_retry_and_a_queue() {
    let compose = compose();
    let statements = schema_statements();
    for service in ["otel-backend-1", "otel-backend-1-tail-sampling"] {
        let config = collector(&compose, service);
        let exporter = &config["exporters"]["clickhouse"];
        assert_eq!(
            exporter["create_schema"].as_bool(),
            Some(false),
            "the schema is ours"
        );
        assert_eq!(
            exporter["retry_on_failure"]["enabled"].as_bool(),
            Some(true)
        );
        assert_eq!(exporter["sending_queue"]["enabled"].as_bool(), Some(true));
        let database = exporter["database"].as_str().unwrap();
        for key in ["traces_table_name", "logs_table_name"] {
            let table = exporter[key].as_str().unwrap();
            let wanted = format!("CREATE TABLE IF NOT EXISTS {database}.{table}");
            assert!(
                statements.iter().any(|s| s.starts_with(&wanted)),
                "compose/sql creates {database}.{table}"
            );
        }
        for signal in ["traces", "logs"] {
            let exporters = strings(&config["service"]["pipelines"][signal]["exporters"]);
            assert_eq!(exporters, ["clickhouse"], "{service} {signal}");
        }
    }
    // The tail-sampling profile keeps failed jobs and slow ones.
    let tail = collector(&compose, "otel-backend-2-tail-sampling");
    let policies = tail["processors"]["tail_sampling"]["policies"]
        .as_sequence()
        .unwrap();
    let kinds: Vec<_> = policies
        .iter()
        .map(|p| p["type"].as_str().unwrap())
        .collect();
    assert_eq!(kinds, ["status_code", "latency"]);
    assert_eq!(
        strings(&policies[0]["status_code"]["status_codes"]),
        ["ERROR"]
    );
    assert!(
        strings(&tail["service"]["pipelines"]["traces"]["processors"])
            .contains(&"tail_sampling".to_string())
    );
    let plain = collector(&compose, "otel-backend-2");
    assert!(plain["processors"].get("tail_sampling").is_none());
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
        .flat_map(|f| split_statements(&read(f)))
        .collect()
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

/// Dotted paths of every leaf key under `value` (`traces.otelEnabled`).
fn key_paths(value: &Value, prefix: &str, out: &mut Vec<String>) {
    if let Value::Mapping(map) = value {
        for (key, child) in map {
            let path = format!("{prefix}{}", key.as_str().unwrap());
            if child.is_mapping() {
                key_paths(child, &format!("{path}."), out);
            } else {
                out.push(path);
            }
        }
    }
}

#[test]
fn grafana_provisioning_uses_only_keys_the_plugin_documents() {
    let datasources = yaml(&compose_dir().join("grafana/provisioning/datasources/clickhouse.yaml"));
    let datasource = &datasources["datasources"][0];
    assert_eq!(
        datasource["type"].as_str(),
        Some("grafana-clickhouse-datasource")
    );
    let mut keys = Vec::new();
    key_paths(&datasource["jsonData"], "", &mut keys);
    assert!(keys.len() > 10, "{keys:?}");
    for key in &keys {
        assert!(
            PLUGIN_JSON_DATA_KEYS.contains(&key.as_str()),
            "jsonData.{key} is not documented"
        );
    }
    let mut secure = Vec::new();
    key_paths(&datasource["secureJsonData"], "", &mut secure);
    for key in &secure {
        assert!(
            PLUGIN_SECURE_KEYS.contains(&key.as_str()),
            "secureJsonData.{key}"
        );
    }
    // The password comes from the environment compose gives Grafana.
    let password = datasource["secureJsonData"]["password"].as_str().unwrap();
    let variable = password.trim_start_matches('$');
    assert!(environment(&services(&compose())["grafana"]).contains(variable));
}

#[test]
fn dashboards_use_the_provisioned_datasource() {
    let datasources = yaml(&compose_dir().join("grafana/provisioning/datasources/clickhouse.yaml"));
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
        let dashboard: serde_json::Value = serde_json::from_str(&read(&path)).unwrap();
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

//! The operations files under `ops/` stay valid and in step with the code: `promtool` checks the
//! alerting rules, runs their unit tests and checks the Prometheus configuration and every query
//! of the Grafana dashboard; every metric they name must be one the code records, and the
//! dashboard must show every metric the code records.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Command;

/// The crates whose metrics are exported.
const CRATES: [&str; 5] = [
    "outbox",
    "outbox-relay",
    "consumer-lib",
    "gateway",
    "notifier",
];
/// Every metric of the project starts with one of these.
const PREFIXES: [&str; 4] = ["outbox_", "consumer_", "gateway_", "notifier_"];
const MACROS: [&str; 6] = [
    "counter!(",
    "gauge!(",
    "histogram!(",
    "describe_counter!(",
    "describe_gauge!(",
    "describe_histogram!(",
];

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace root")
        .to_path_buf()
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap_or_else(|e| panic!("read {}: {e}", dir.display())) {
        let path = entry.unwrap().path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// `pub const NAME: &str = "value";` definitions, by name.
fn string_constants(sources: &[(PathBuf, String)]) -> BTreeMap<String, String> {
    let mut constants = BTreeMap::new();
    for (_, text) in sources {
        for line in text.lines() {
            let line = line.trim();
            let Some(rest) = line
                .strip_prefix("pub const ")
                .or_else(|| line.strip_prefix("pub(crate) const "))
                .or_else(|| line.strip_prefix("const "))
            else {
                continue;
            };
            let Some((name, value)) = rest.split_once(": &str = \"") else {
                continue;
            };
            if let Some(value) = value.strip_suffix("\";") {
                constants.insert(name.trim().to_owned(), value.to_owned());
            }
        }
    }
    constants
}

/// Every metric name the code records or describes: the first argument of each `metrics`
/// macro, a string literal or a string constant. An argument it cannot read fails the test,
/// so a metric can never be missed silently.
fn code_metrics() -> BTreeSet<String> {
    let mut files = Vec::new();
    for krate in CRATES {
        rust_files(&root().join(krate).join("src"), &mut files);
    }
    let sources: Vec<(PathBuf, String)> = files
        .into_iter()
        .map(|p| {
            let text = std::fs::read_to_string(&p).unwrap();
            (p, text)
        })
        .collect();
    let constants = string_constants(&sources);
    let mut names = BTreeSet::new();
    for (path, text) in &sources {
        for mac in MACROS {
            for (at, _) in text.match_indices(mac) {
                // `counter!(` inside `describe_counter!(` is found by both patterns; only
                // the whole word counts for each.
                let before = text[..at].chars().next_back();
                if before.is_some_and(|c| c.is_alphanumeric() || c == '_') {
                    continue;
                }
                let arg = text[at + mac.len()..].trim_start();
                let name = if let Some(lit) = arg.strip_prefix('"') {
                    lit[..lit.find('"').unwrap()].to_owned()
                } else {
                    let path_expr: String = arg
                        .chars()
                        .take_while(|c| c.is_alphanumeric() || *c == '_' || *c == ':')
                        .collect();
                    let ident = path_expr.rsplit("::").next().unwrap();
                    constants.get(ident).cloned().unwrap_or_else(|| {
                        panic!(
                            "{}: metric name {path_expr:?} is neither a literal nor a string constant",
                            path.display()
                        )
                    })
                };
                assert!(
                    PREFIXES.iter().any(|p| name.starts_with(p)),
                    "{}: metric {name} lacks a project prefix",
                    path.display()
                );
                names.insert(name);
            }
        }
    }
    names
}

/// Identifiers in `text` that look like project metrics (`outbox_...`, `consumer_...`, ...).
fn referenced_metrics(text: &str) -> BTreeSet<String> {
    let mut found = BTreeSet::new();
    let bytes = text.as_bytes();
    let word = |b: u8| b.is_ascii_alphanumeric() || b == b'_';
    let mut i = 0;
    while i < bytes.len() {
        if word(bytes[i]) && (i == 0 || !word(bytes[i - 1])) {
            let end = (i..bytes.len())
                .find(|&j| !word(bytes[j]))
                .unwrap_or(bytes.len());
            let token = &text[i..end];
            if PREFIXES.iter().any(|p| token.starts_with(p)) {
                found.insert(token.to_owned());
            }
            i = end;
        } else {
            i += 1;
        }
    }
    found
}

/// The recorded metric a referenced series belongs to: itself, or a histogram's or summary's
/// `_bucket` / `_sum` / `_count` series.
fn resolve<'a>(series: &str, known: &'a BTreeSet<String>) -> Option<&'a String> {
    known.get(series).or_else(|| {
        ["_bucket", "_sum", "_count"]
            .iter()
            .find_map(|s| series.strip_suffix(s).and_then(|base| known.get(base)))
    })
}

fn read(relative: &str) -> String {
    std::fs::read_to_string(root().join(relative))
        .unwrap_or_else(|e| panic!("read {relative}: {e}"))
}

fn promtool(args: &[&str]) -> String {
    let output = Command::new("promtool")
        .args(args)
        .current_dir(root())
        .output()
        .unwrap_or_else(|e| {
            panic!("promtool: {e}. scripts/services installs it (Debian package `prometheus`)")
        });
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(
        output.status.success(),
        "promtool {}: {text}",
        args.join(" ")
    );
    text
}

fn dashboard() -> serde_json::Value {
    serde_json::from_str(&read("ops/grafana/outbox.json")).expect("ops/grafana/outbox.json is JSON")
}

/// Every (panel title, query) of the dashboard, rows' nested panels included.
fn dashboard_queries(dash: &serde_json::Value) -> Vec<(String, String)> {
    fn walk(panels: &serde_json::Value, out: &mut Vec<(String, String)>) {
        for panel in panels.as_array().into_iter().flatten() {
            let title = panel["title"].as_str().unwrap_or_default().to_owned();
            for target in panel["targets"].as_array().into_iter().flatten() {
                let expr = target["expr"].as_str().expect("every target has an expr");
                out.push((title.clone(), expr.to_owned()));
            }
            walk(&panel["panels"], out);
        }
    }
    let mut out = Vec::new();
    walk(&dash["panels"], &mut out);
    out
}

#[test]
fn metric_names_in_rules_and_dashboard_exist_in_the_code() {
    let known = code_metrics();
    assert!(
        known.len() >= 30,
        "the source scan found only {} metrics: {known:?}",
        known.len()
    );
    for file in [
        "ops/prometheus/alerts.yml",
        "ops/prometheus/alerts.test.yml",
        "ops/grafana/outbox.json",
    ] {
        let referenced = referenced_metrics(&read(file));
        assert!(!referenced.is_empty(), "{file} names no metric");
        let unknown: Vec<_> = referenced
            .iter()
            .filter(|s| resolve(s, &known).is_none())
            .collect();
        assert!(
            unknown.is_empty(),
            "{file} names metrics the code does not record: {unknown:?}\n(known: {known:?})"
        );
    }
    // The other way round: a metric added to the code without a panel fails here.
    let shown: BTreeSet<&String> = referenced_metrics(&read("ops/grafana/outbox.json"))
        .iter()
        .filter_map(|s| resolve(s, &known))
        .collect();
    let missing: Vec<_> = known.iter().filter(|m| !shown.contains(m)).collect();
    assert!(
        missing.is_empty(),
        "metrics without a dashboard panel: {missing:?}"
    );
    // Each part that exports metrics has alerts.
    let alerted: BTreeSet<String> = referenced_metrics(&read("ops/prometheus/alerts.yml"));
    for prefix in PREFIXES {
        assert!(
            alerted.iter().any(|m| m.starts_with(prefix)),
            "no alert on any {prefix}* metric"
        );
    }
}

#[test]
fn promtool_accepts_the_rules_their_unit_tests_and_the_config() {
    let checked = promtool(&["check", "rules", "ops/prometheus/alerts.yml"]);
    assert!(checked.contains("SUCCESS"), "{checked}");
    let tested = promtool(&["test", "rules", "ops/prometheus/alerts.test.yml"]);
    assert!(tested.contains("SUCCESS"), "{tested}");
    promtool(&["check", "config", "ops/prometheus/prometheus.yml"]);
}

#[test]
fn every_dashboard_query_is_valid_promql() {
    let dash = dashboard();
    let queries = dashboard_queries(&dash);
    assert!(queries.len() >= 20, "only {} queries", queries.len());
    let variables: BTreeSet<String> = dash["templating"]["list"]
        .as_array()
        .expect("templating variables")
        .iter()
        .map(|v| v["name"].as_str().unwrap().to_owned())
        .collect();
    // promtool parses PromQL in rule files: make each query a recording rule, with Grafana's
    // variables replaced by what Grafana would substitute.
    let mut rules = String::from("groups:\n  - name: dashboard\n    rules:\n");
    for (i, (title, expr)) in queries.iter().enumerate() {
        let mut promql = expr.replace("$__rate_interval", "5m");
        for var in &variables {
            promql = promql.replace(&format!("${var}"), ".*");
        }
        assert!(
            !promql.contains('$'),
            "panel {title:?}: unknown variable in {expr}"
        );
        rules.push_str(&format!(
            "      - record: dashboard:query_{i}\n        expr: {}\n",
            serde_json::to_string(&promql).unwrap()
        ));
    }
    let dir = std::env::temp_dir().join(format!("ops-files-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("dashboard-queries.yml");
    std::fs::write(&file, rules).unwrap();
    let result = Command::new("promtool")
        .args(["check", "rules"])
        .arg(&file)
        .output()
        .expect("promtool (scripts/services installs Debian's prometheus package)");
    std::fs::remove_dir_all(&dir).ok();
    assert!(
        result.status.success(),
        "a dashboard query is not valid PromQL:\n{}{}",
        String::from_utf8_lossy(&result.stdout),
        String::from_utf8_lossy(&result.stderr)
    );
}

#[test]
fn dashboard_is_a_well_formed_grafana_dashboard() {
    let dash = dashboard();
    assert_eq!(dash["uid"], "outbox-middleware");
    assert!(dash["schemaVersion"].as_u64().unwrap() >= 36);
    let mut ids = BTreeSet::new();
    let mut titles = BTreeSet::new();
    for panel in dash["panels"].as_array().expect("panels") {
        let id = panel["id"].as_u64().expect("panel id");
        assert!(ids.insert(id), "panel id {id} used twice");
        let title = panel["title"].as_str().expect("panel title");
        assert!(!title.is_empty());
        let pos = &panel["gridPos"];
        let (x, w) = (pos["x"].as_u64().unwrap(), pos["w"].as_u64().unwrap());
        assert!(x + w <= 24, "panel {title:?} is wider than the grid");
        if panel["type"] != "row" {
            assert!(
                titles.insert(title.to_owned()),
                "two panels titled {title:?}"
            );
            assert_eq!(
                panel["datasource"]["uid"], "${datasource}",
                "panel {title:?} must use the dashboard's data source variable"
            );
            assert!(
                !panel["targets"].as_array().unwrap().is_empty(),
                "panel {title:?} has no query"
            );
        }
    }
}

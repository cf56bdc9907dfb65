//! The operator files in `deploy/`: the Prometheus alerting rules pass `promtool check rules`
//! and their own `promtool test rules` unit tests (a firing and a quiet case for every alert);
//! the Grafana dashboard has a query in every panel, unique panel ids and the template
//! variables it promises, and every query parses as PromQL (checked by promtool as recording
//! rules, with the template variables filled in). Every metric name the rules and the
//! dashboard query is one that Picket or Flink's reporter really produces: taken from the
//! plugins', agent's and aggregator's sources and from the recorded Flink 2.3 reporter output.
//!
//! Needs `promtool` (Debian package `prometheus`; `scripts/test` installs it).

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Command;

use picket_tests::dashboard;
use picket_tests::servers::require;
use serde_json::Value;

const RULES: &str = "deploy/prometheus/picket-alerts.yml";
const RULE_TESTS: &str = "deploy/prometheus/picket-alerts.test.yml";
const DASHBOARD: &str = "deploy/grafana/picket-fleet-and-flink.json";

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ lives in the repository")
        .to_path_buf()
}

fn read(relative: &str) -> String {
    let path = repo().join(relative);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// Runs promtool and fails the test with its whole output unless it succeeds.
fn promtool(args: &[&str], file: &Path) -> String {
    let output = Command::new(require("promtool", "prometheus"))
        .args(args)
        .arg(file)
        .output()
        .expect("run promtool");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(
        output.status.success(),
        "promtool {} {} failed ({}):\n{text}",
        args.join(" "),
        file.display(),
        output.status
    );
    text
}

#[test]
fn alert_rules_pass_promtool_check() {
    let out = promtool(&["check", "rules"], &repo().join(RULES));
    assert!(out.contains("SUCCESS"), "{out}");
}

#[test]
fn alert_rules_pass_their_unit_tests() {
    let out = promtool(&["test", "rules"], &repo().join(RULE_TESTS));
    assert!(out.contains("SUCCESS"), "{out}");
}

// ---------------------------------------------------------------------------------------
// The rule files, read line by line (their layout is ours: `- alert:` and `expr:` keys, a
// test case's `alertname:` followed by its `exp_alerts:`).

/// The value of `key:` on a line, if the line (without its indentation or a leading `- `)
/// starts with that key.
fn key_value<'a>(line: &'a str, key: &str) -> Option<&'a str> {
    let trimmed = line.trim_start();
    let trimmed = trimmed.strip_prefix("- ").unwrap_or(trimmed);
    trimmed
        .strip_prefix(key)
        .and_then(|rest| rest.strip_prefix(':'))
        .map(str::trim)
}

fn alert_names(rules: &str) -> BTreeSet<String> {
    rules
        .lines()
        .filter_map(|line| key_value(line, "alert"))
        .map(str::to_owned)
        .collect()
}

/// Every `expr:`, one line or a block scalar (`|`, `>` and their variants).
fn rule_exprs(rules: &str) -> Vec<String> {
    let lines: Vec<&str> = rules.lines().collect();
    let mut exprs = Vec::new();
    for (i, line) in lines.iter().enumerate() {
        let Some(value) = key_value(line, "expr") else {
            continue;
        };
        if value.starts_with('|') || value.starts_with('>') {
            let indent = line.len() - line.trim_start().len();
            let block: Vec<&str> = lines[i + 1..]
                .iter()
                .take_while(|l| l.trim().is_empty() || l.len() - l.trim_start().len() > indent)
                .map(|l| l.trim())
                .collect();
            exprs.push(block.join("\n").trim().to_owned());
        } else {
            let unquoted = value
                .strip_prefix('"')
                .and_then(|v| v.strip_suffix('"'))
                .or_else(|| value.strip_prefix('\'').and_then(|v| v.strip_suffix('\'')))
                .unwrap_or(value);
            exprs.push(unquoted.to_owned());
        }
    }
    exprs
}

#[test]
fn every_alert_has_a_firing_and_a_quiet_test_case() {
    let rules = read(RULES);
    let names = alert_names(&rules);
    assert!(names.len() >= 10, "only {} alerts found", names.len());
    let rule_count = rules
        .lines()
        .filter(|l| key_value(l, "alert").is_some())
        .count();
    assert_eq!(rule_exprs(&rules).len(), rule_count, "one expr per rule");

    let tests = read(RULE_TESTS);
    let lines: Vec<&str> = tests.lines().collect();
    let mut firing: BTreeSet<String> = BTreeSet::new();
    let mut quiet: BTreeSet<String> = BTreeSet::new();
    for (i, line) in lines.iter().enumerate() {
        let Some(name) = key_value(line, "alertname") else {
            continue;
        };
        let expected = lines[i + 1..]
            .iter()
            .find_map(|l| key_value(l, "exp_alerts"))
            .unwrap_or_else(|| panic!("{RULE_TESTS}:{}: no exp_alerts after it", i + 1));
        assert!(names.contains(name), "{RULE_TESTS}: no alert named {name}");
        if expected == "[]" {
            quiet.insert(name.to_owned());
        } else {
            firing.insert(name.to_owned());
        }
    }
    let never_fired: Vec<_> = names.difference(&firing).collect();
    let never_quiet: Vec<_> = names.difference(&quiet).collect();
    assert!(
        never_fired.is_empty() && never_quiet.is_empty(),
        "alerts without a firing case: {never_fired:?}; without a quiet case: {never_quiet:?}"
    );
}

// ---------------------------------------------------------------------------------------
// The dashboard.

fn dashboard() -> Value {
    serde_json::from_str(&read(DASHBOARD)).expect("the dashboard is JSON")
}

/// (record name, expression) of every target of every panel.
fn panel_exprs(dashboard: &Value) -> Vec<(String, String)> {
    let mut out = Vec::new();
    for panel in dashboard::all_panels(dashboard) {
        for target in panel["targets"].as_array().into_iter().flatten() {
            if let Some(expr) = target["expr"].as_str() {
                let record = format!(
                    "dashboard:panel_{}_{}",
                    panel["id"],
                    target["refId"].as_str().unwrap_or("X")
                );
                out.push((record, expr.to_owned()));
            }
        }
    }
    out
}

fn variable<'a>(dashboard: &'a Value, name: &str) -> &'a Value {
    dashboard["templating"]["list"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|v| v["name"] == name)
        .unwrap_or_else(|| panic!("no template variable {name}"))
}

#[test]
fn dashboard_is_importable_with_its_variables() {
    let d = dashboard();
    assert!(d["schemaVersion"].as_u64().unwrap_or(0) >= 36);
    assert!(!d["title"].as_str().unwrap_or("").is_empty());
    assert!(!d["uid"].as_str().unwrap_or("").is_empty());

    let ds = variable(&d, "datasource");
    assert_eq!(ds["type"], "datasource");
    assert_eq!(ds["query"], "prometheus");
    for name in ["instance", "job_name"] {
        let v = variable(&d, name);
        assert_eq!(v["type"], "query", "{name}");
        assert_eq!(v["datasource"]["uid"], "${datasource}", "{name}");
        let query = v["query"].as_str().unwrap_or("");
        assert!(query.starts_with("label_values("), "{name}: {query}");
        assert!(query.contains(&format!(", {name})")), "{name}: {query}");
    }
}

#[test]
fn every_panel_has_a_query_on_the_datasource_variable_and_a_unique_id() {
    let d = dashboard();
    let panels = dashboard::all_panels(&d);
    let mut ids: BTreeMap<u64, String> = BTreeMap::new();
    let mut queried = 0;
    for panel in &panels {
        let name = dashboard::panel_name(panel);
        let id = panel["id"]
            .as_u64()
            .unwrap_or_else(|| panic!("{name}: no numeric id"));
        if let Some(other) = ids.insert(id, name.clone()) {
            panic!("{name} and {other} share id {id}");
        }
        if panel["type"] == "row" {
            assert!(panel.get("targets").is_none(), "{name}: a row with queries");
            continue;
        }
        assert_eq!(panel["datasource"]["uid"], "${datasource}", "{name}");
        let targets = panel["targets"]
            .as_array()
            .unwrap_or_else(|| panic!("{name}: no targets"));
        let exprs: Vec<&str> = targets
            .iter()
            .filter_map(|t| t["expr"].as_str())
            .filter(|e| !e.trim().is_empty())
            .collect();
        assert!(!exprs.is_empty(), "{name}: no target with an expr");
        for target in targets {
            if let Some(ds) = target.get("datasource") {
                assert_eq!(ds["uid"], "${datasource}", "{name}: target datasource");
            }
        }
        queried += 1;
    }
    // Nested panels are found too: the JVM row is collapsed.
    assert!(
        panels
            .iter()
            .any(|p| p["type"] == "row" && p["collapsed"] == true && p["panels"] != Value::Null),
        "expected a collapsed row with nested panels"
    );
    assert!(queried >= 30, "only {queried} panels with queries");
}

fn template_values(dashboard: &Value) -> BTreeMap<&'static str, &'static str> {
    let mut values = BTreeMap::from([
        ("__rate_interval", "5m"),
        ("__interval", "1m"),
        ("__interval_ms", "60000"),
        ("__range", "6h"),
        ("__range_s", "21600"),
        ("instance", "pi-07"),
        ("job_name", "picket-datagen-blackhole"),
    ]);
    // Every variable the dashboard defines must have a value here.
    for v in dashboard["templating"]["list"]
        .as_array()
        .into_iter()
        .flatten()
    {
        let name = v["name"].as_str().unwrap_or("");
        if name == "datasource" {
            values.insert("datasource", "prometheus");
        } else {
            assert!(
                values.contains_key(name),
                "no test value for the template variable {name:?}"
            );
        }
    }
    values
}

#[test]
fn substitution_fills_every_variable_form() {
    let values = BTreeMap::from([("a", "x"), ("__rate_interval", "5m")]);
    assert_eq!(
        dashboard::substitute(
            r#"rate(m{l=~"$a", k="${a}", j="${a:regex}", i="[[a]]"}[$__rate_interval])"#,
            &values
        ),
        r#"rate(m{l=~"x", k="x", j="x", i="x"}[5m])"#
    );
    assert_eq!(dashboard::substitute("m[5m:1m]", &values), "m[5m:1m]");
}

#[test]
fn every_dashboard_query_parses() {
    let d = dashboard();
    let values = template_values(&d);
    let exprs = panel_exprs(&d);
    assert!(!exprs.is_empty());
    let mut rules = String::from("groups:\n  - name: dashboard-queries\n    rules:\n");
    for (record, expr) in &exprs {
        let concrete = dashboard::substitute(expr, &values);
        assert!(!concrete.contains('$'), "{record}: {concrete}");
        // A JSON string is a YAML double-quoted scalar.
        let quoted = serde_json::to_string(&concrete).unwrap();
        rules.push_str(&format!(
            "      - record: {record}\n        expr: {quoted}\n"
        ));
    }
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("dashboard-queries.yml");
    std::fs::write(&file, &rules).unwrap();
    let out = promtool(&["check", "rules"], &file);
    assert!(
        out.contains(&format!("SUCCESS: {} rules found", exprs.len())),
        "{out}\n{rules}"
    );
}

// ---------------------------------------------------------------------------------------
// Metric names: what the queries use against what Picket and Flink produce.

/// PromQL aggregation operators and keywords: words in an expression that are not metrics.
const NOT_METRICS: &[&str] = &[
    "sum",
    "min",
    "max",
    "avg",
    "group",
    "stddev",
    "stdvar",
    "count",
    "count_values",
    "bottomk",
    "topk",
    "quantile",
    "by",
    "without",
    "on",
    "ignoring",
    "group_left",
    "group_right",
    "and",
    "or",
    "unless",
    "bool",
    "offset",
    "atan2",
    "inf",
    "nan",
];

/// Keywords followed by a parenthesised list of label names.
const GROUPING: &[&str] = &[
    "by",
    "without",
    "on",
    "ignoring",
    "group_left",
    "group_right",
];

/// The metric names an expression selects. Strings, label matchers (`{...}`), ranges
/// (`[...]`), grouping label lists (`by (...)` and the like), numbers, function calls and
/// keywords are skipped; every other identifier is a metric name.
fn metric_names(expr: &str) -> BTreeSet<String> {
    // Blank out strings, braces and brackets (strings first, so a `}` in a regex is safe).
    let mut cleaned = String::with_capacity(expr.len());
    let mut chars = expr.chars().peekable();
    let mut depth_brace = 0;
    let mut depth_bracket = 0;
    while let Some(c) = chars.next() {
        match c {
            '"' | '\'' | '`' => {
                while let Some(d) = chars.next() {
                    if d == '\\' && c != '`' {
                        chars.next();
                    } else if d == c {
                        break;
                    }
                }
                cleaned.push(' ');
            }
            '{' => depth_brace += 1,
            '}' => depth_brace -= 1,
            '[' => depth_bracket += 1,
            ']' => depth_bracket -= 1,
            _ if depth_brace > 0 || depth_bracket > 0 => {}
            _ => cleaned.push(c),
        }
        if matches!(c, '}' | ']') {
            cleaned.push(' ');
        }
    }

    // Tokens: identifiers, numbers (including durations after `offset`), single characters.
    let is_ident_start = |c: char| c.is_ascii_alphabetic() || c == '_' || c == ':';
    let is_ident = |c: char| c.is_ascii_alphanumeric() || c == '_' || c == ':';
    let mut tokens: Vec<String> = Vec::new();
    let chars: Vec<char> = cleaned.chars().collect();
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        if c.is_whitespace() {
            i += 1;
        } else if is_ident_start(c) || c.is_ascii_digit() || c == '.' {
            let start = i;
            while i < chars.len() && (is_ident(chars[i]) || chars[i] == '.') {
                i += 1;
            }
            tokens.push(chars[start..i].iter().collect());
        } else {
            tokens.push(c.to_string());
            i += 1;
        }
    }

    let mut names = BTreeSet::new();
    let mut i = 0;
    while i < tokens.len() {
        let token = &tokens[i];
        let next = tokens.get(i + 1).map(String::as_str);
        let first = token.chars().next().unwrap_or(' ');
        if GROUPING.contains(&token.as_str()) && next == Some("(") {
            // Skip the label list.
            let mut depth = 0;
            i += 1;
            while i < tokens.len() {
                match tokens[i].as_str() {
                    "(" => depth += 1,
                    ")" => depth -= 1,
                    _ => {}
                }
                i += 1;
                if depth == 0 {
                    break;
                }
            }
            continue;
        }
        let is_word = is_ident_start(first);
        let is_call = next == Some("(");
        if is_word && !is_call && !NOT_METRICS.contains(&token.as_str()) {
            names.insert(token.clone());
        }
        i += 1;
    }
    names
}

#[test]
fn metric_names_are_found_in_expressions() {
    let names = metric_names(
        r#"sum by (instance, job) (rate(a_total{x="}", y=~"b|c"}[5m] offset 1h)) / on (instance) group_left (k) max(b:rec) > bool 0.5 and time() - c_seconds{l="1"} > 1e3 or vector(0)"#,
    );
    assert_eq!(
        names,
        BTreeSet::from(["a_total".into(), "b:rec".into(), "c_seconds".into()])
    );
}

/// Names written as whole string literals (`"name"`) in Rust sources under `dir` that start
/// with one of `prefixes`.
fn literal_names(dir: &Path, prefixes: &[&str], out: &mut BTreeSet<String>) {
    let entries = std::fs::read_dir(dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display()));
    for entry in entries {
        let path = entry.unwrap().path();
        if path.is_dir() {
            literal_names(&path, prefixes, out);
            continue;
        }
        if path.extension().and_then(|e| e.to_str()) != Some("rs") {
            continue;
        }
        let text = std::fs::read_to_string(&path).unwrap();
        for (i, piece) in text.split('"').enumerate() {
            // Odd pieces sit between two quotes.
            let is_name = !piece.is_empty()
                && piece
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':');
            if i % 2 == 1 && is_name && prefixes.iter().any(|p| piece.starts_with(p)) {
                out.insert(piece.to_owned());
            }
        }
    }
}

/// Every metric name Picket and Flink's PrometheusReporter are known to produce.
fn known_metric_names() -> BTreeSet<String> {
    let root = repo();
    let mut known = BTreeSet::new();
    // The agent's and aggregator's own metrics, the prometheus plugin's scrape health.
    literal_names(&root.join("agent/src"), &["picket_"], &mut known);
    literal_names(&root.join("aggregator/src"), &["picket_"], &mut known);
    literal_names(
        &root.join("plugins/prometheus/src"),
        &["picket_scrape_"],
        &mut known,
    );
    // The first-party plugins.
    literal_names(
        &root.join("plugins/host/src"),
        &["node_", "picket_host_"],
        &mut known,
    );
    literal_names(&root.join("plugins/rpi/src"), &["rpi_"], &mut known);
    let mut flink = BTreeSet::new();
    literal_names(&root.join("plugins/flink/src"), &["flink_"], &mut flink);
    known.extend(
        flink.into_iter().filter(|n| {
            !n.starts_with("flink_jobmanager_") && !n.starts_with("flink_taskmanager_")
        }),
    );
    // The host plugin names /proc/meminfo fields as node_exporter does.
    for line in read("plugins/host/fixtures/proc-meminfo.txt").lines() {
        let Some((field, value)) = line.split_once(':') else {
            continue;
        };
        let field = field.replace('(', "_").replace(')', "");
        if value.trim_end().ends_with("kB") {
            known.insert(format!("node_memory_{field}_bytes"));
        } else {
            known.insert(format!("node_memory_{field}"));
        }
    }
    // Flink's reporter, as recorded from Flink 2.3.
    for file in ["reporter-jobmanager.txt", "reporter-taskmanager.txt"] {
        for line in read(&format!("plugins/flink/fixtures/{file}")).lines() {
            if line.starts_with('#') || line.trim().is_empty() {
                continue;
            }
            let end = line.find(['{', ' ']).unwrap_or(line.len());
            known.insert(line[..end].to_owned());
        }
    }
    known
}

#[test]
fn known_metric_names_come_from_every_source() {
    let known = known_metric_names();
    for name in [
        "picket_agent_collections_total",
        "picket_plugin_up",
        "picket_aggregator_agent_up",
        "picket_sink_samples_total",
        "picket_scrape_up",
        "flink_job_state",
        "flink_vertex_backpressured_time_ms_per_second",
        "flink_jobmanager_numRunningJobs",
        "flink_taskmanager_job_task_operator_numRecordsOut",
        "node_filesystem_avail_bytes",
        "node_memory_MemAvailable_bytes",
        "rpi_throttled",
    ] {
        assert!(known.contains(name), "{name} missing from the known names");
    }
}

#[test]
fn rules_and_dashboard_query_only_metrics_that_exist() {
    let known = known_metric_names();
    let d = dashboard();
    let values = template_values(&d);
    let mut queries: Vec<(String, String)> = panel_exprs(&d)
        .into_iter()
        .map(|(record, expr)| (record, dashboard::substitute(&expr, &values)))
        .collect();
    for (n, expr) in rule_exprs(&read(RULES)).into_iter().enumerate() {
        queries.push((format!("{RULES} expr #{}", n + 1), expr));
    }
    let mut unknown: Vec<String> = Vec::new();
    let mut used = BTreeSet::new();
    for (place, expr) in &queries {
        let names = metric_names(expr);
        assert!(!names.is_empty(), "{place}: no metric in {expr}");
        for name in names {
            if !known.contains(&name) {
                unknown.push(format!("{place}: {name}"));
            }
            used.insert(name);
        }
    }
    assert!(
        unknown.is_empty(),
        "metrics that neither Picket nor Flink's reporter produce:\n{}",
        unknown.join("\n")
    );
    assert!(
        used.len() >= 50,
        "only {} distinct metrics used",
        used.len()
    );
}

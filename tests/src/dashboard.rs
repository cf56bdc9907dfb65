//! Reading the Grafana dashboard in `deploy/grafana/`: its panels (rows and the panels
//! nested in collapsed rows included) and their PromQL with Grafana's template variables
//! filled in, for the tests that check the queries parse and return data.

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde_json::Value;

/// The dashboard file, relative to the repository root.
pub const DASHBOARD: &str = "deploy/grafana/picket-fleet-and-flink.json";

/// The repository root.
pub fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ has a parent")
        .to_path_buf()
}

/// The parsed dashboard.
pub fn load() -> Value {
    let path = repo().join(DASHBOARD);
    let text =
        std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
    serde_json::from_str(&text).expect("the dashboard is JSON")
}

/// Every panel, rows and the panels nested in (collapsed) rows included.
pub fn all_panels(dashboard: &Value) -> Vec<&Value> {
    fn walk<'a>(panels: &'a Value, out: &mut Vec<&'a Value>) {
        for panel in panels.as_array().into_iter().flatten() {
            out.push(panel);
            if let Some(nested) = panel.get("panels") {
                walk(nested, out);
            }
        }
    }
    let mut out = Vec::new();
    walk(&dashboard["panels"], &mut out);
    out
}

/// `panel <id> "<title>"`, for messages.
pub fn panel_name(panel: &Value) -> String {
    format!(
        "panel {} {:?}",
        panel["id"],
        panel["title"].as_str().unwrap_or("")
    )
}

/// The `expr` of every target of `panel`.
pub fn exprs(panel: &Value) -> Vec<&str> {
    panel["targets"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|t| t["expr"].as_str())
        .collect()
}

/// `expr` with Grafana's variable forms (`$name`, `${name}`, `${name:format}`, `[[name]]`)
/// replaced from `values`; panics on a variable it has no value for.
pub fn substitute(expr: &str, values: &BTreeMap<&str, &str>) -> String {
    let lookup = |name: &str| -> &str {
        values
            .get(name)
            .copied()
            .unwrap_or_else(|| panic!("unknown template variable {name:?} in {expr}"))
    };
    let is_name = |c: char| c.is_ascii_alphanumeric() || c == '_';
    let mut out = String::with_capacity(expr.len());
    let mut rest = expr;
    while let Some(pos) = rest.find(['$', '[']) {
        out.push_str(&rest[..pos]);
        let tail = &rest[pos..];
        if let Some(inner) = tail.strip_prefix("${") {
            let end = inner
                .find('}')
                .unwrap_or_else(|| panic!("unclosed ${{ in {expr}"));
            let name = inner[..end].split(':').next().unwrap_or("");
            out.push_str(lookup(name));
            rest = &inner[end + 1..];
        } else if let Some(inner) = tail.strip_prefix("[[") {
            let end = inner
                .find("]]")
                .unwrap_or_else(|| panic!("unclosed [[ in {expr}"));
            out.push_str(lookup(inner[..end].split(':').next().unwrap_or("")));
            rest = &inner[end + 2..];
        } else if let Some(inner) = tail.strip_prefix('$') {
            let end = inner.find(|c: char| !is_name(c)).unwrap_or(inner.len());
            assert!(end > 0, "a lone $ in {expr}");
            out.push_str(lookup(&inner[..end]));
            rest = &inner[end..];
        } else {
            out.push('[');
            rest = &tail[1..];
        }
    }
    out.push_str(rest);
    out
}

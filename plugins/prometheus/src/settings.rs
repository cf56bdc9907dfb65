//! The plugin's settings: the JSON object `init` receives (the instance's `settings` table in
//! the agent config), checked up front so a typo is a configuration error the operator sees
//! at start, not a silent gap in the data later.
//!
//! ```json
//! {
//!   "targets": ["http://127.0.0.1:9249/metrics", "http://127.0.0.1:9250-9260/metrics"],
//!   "target_label": "target",
//!   "honor_timestamps": true,
//!   "keep_metrics": [],
//!   "drop_metrics": ["flink_taskmanager_job_task_operator_.*_latency"],
//!   "keep_series": [{ "label": "job_name", "regex": "orders|payments" }],
//!   "drop_series": [],
//!   "drop_labels": ["task_attempt_id"],
//!   "max_label_value_bytes": 4096
//! }
//! ```
//!
//! Every key is optional (the defaults are [`Settings::default`]); unknown keys are refused.
//! What the relabelling keys do is described in [`crate::relabel`].

use serde::{Deserialize, Serialize};

/// A port range covers at most this many ports, so that `1-65535` is a typo caught at start
/// rather than 65,535 requests every collection.
pub const MAX_PORTS_PER_RANGE: u32 = 256;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Settings {
    /// URLs to scrape, in order. The port may be a range, `9250-9260`, which stands for one
    /// target per port (Flink's PrometheusReporter takes the first free port of its range).
    pub targets: Vec<String>,
    /// The label naming the target on every scraped series, `host:port`; empty to add none.
    pub target_label: String,
    /// Keep the timestamps targets write; false: every sample is stamped at collection.
    pub honor_timestamps: bool,
    /// Regexes; when any is given, only families whose name matches one are kept.
    pub keep_metrics: Vec<String>,
    /// Regexes; families whose name matches any are dropped.
    pub drop_metrics: Vec<String>,
    /// Series are kept only when they match every one of these.
    pub keep_series: Vec<LabelMatch>,
    /// Series matching any of these are dropped.
    pub drop_series: Vec<LabelMatch>,
    /// Labels removed from every series.
    pub drop_labels: Vec<String>,
    /// Longer label values are cut to this many bytes (at a character boundary). Keep it at or
    /// below the instance's `max_label_value_bytes`: the agent refuses a whole collection with
    /// one longer value.
    pub max_label_value_bytes: usize,
}

/// A label name and a regex its value must match; a missing label has the value "".
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LabelMatch {
    pub label: String,
    pub regex: String,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            // Flink's PrometheusReporter's default port.
            targets: vec!["http://127.0.0.1:9249/metrics".to_owned()],
            target_label: "target".to_owned(),
            honor_timestamps: true,
            keep_metrics: Vec::new(),
            drop_metrics: Vec::new(),
            keep_series: Vec::new(),
            drop_series: Vec::new(),
            // Flink gives every task attempt a fresh random id, so each restart or failover
            // would start new series for every task and operator metric of the job; job_id,
            // task_id and subtask_index already tell subtasks apart. `tm_id` stays: dropping
            // it could merge two task managers' series on one host.
            drop_labels: vec!["task_attempt_id".to_owned()],
            // The agent's default per-instance cap.
            max_label_value_bytes: 4096,
        }
    }
}

impl Settings {
    /// Reads and checks the settings JSON. An empty string means all defaults.
    pub fn from_json(json: &str) -> Result<Settings, String> {
        let json = if json.trim().is_empty() { "{}" } else { json };
        let value: serde_json::Value =
            serde_json::from_str(json).map_err(|e| format!("invalid settings JSON: {e}"))?;
        // Serde would also read a struct from an array; settings are an object with names.
        if !value.is_object() {
            return Err("invalid settings: expected a JSON object".to_owned());
        }
        let settings: Settings =
            serde_json::from_value(value).map_err(|e| format!("invalid settings: {e}"))?;
        settings.check()?;
        Ok(settings)
    }

    /// The defaults as JSON, for `describe`.
    pub fn default_json() -> String {
        // Serialising plain strings, bools and numbers cannot fail; fall back to "{}" (which
        // means the same thing) rather than panic in a guest.
        serde_json::to_string(&Settings::default()).unwrap_or_else(|_| "{}".to_owned())
    }

    fn check(&self) -> Result<(), String> {
        if self.targets.is_empty() {
            return Err("settings: targets is empty; give at least one URL".to_owned());
        }
        if !self.target_label.is_empty() {
            check_label_name("target_label", &self.target_label)?;
            if self.target_label == "instance" {
                return Err(
                    "settings: target_label cannot be \"instance\": the agent sets that label"
                        .to_owned(),
                );
            }
        }
        for name in &self.drop_labels {
            check_label_name("drop_labels", name)?;
        }
        for rule in self.keep_series.iter().chain(&self.drop_series) {
            check_label_name("keep_series/drop_series", &rule.label)?;
        }
        if self.max_label_value_bytes == 0 {
            return Err("settings: max_label_value_bytes must be at least 1".to_owned());
        }
        Ok(())
    }
}

fn check_label_name(setting: &str, name: &str) -> Result<(), String> {
    let mut chars = name.chars();
    let valid = matches!(chars.next(), Some(c) if c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
        && !name.starts_with("__");
    if valid {
        Ok(())
    } else {
        Err(format!(
            "settings: {setting}: {name:?} is not a label name ([a-zA-Z_][a-zA-Z0-9_]*, not \
             starting with __)"
        ))
    }
}

/// One URL to scrape.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TargetUrl {
    pub url: String,
    /// The value of the target label: `host:port`, or `host:port/path` when another target
    /// has the same host and port.
    pub label: String,
    /// Came from a port range, where unused ports are expected.
    pub from_range: bool,
}

/// Expands port ranges and works out each target's label. Refuses malformed URLs, schemes
/// other than http(s), user information, empty or oversized ranges and URLs listed twice.
pub fn expand_targets(targets: &[String]) -> Result<Vec<TargetUrl>, String> {
    let mut expanded: Vec<(TargetUrl, String)> = Vec::new();
    for spec in targets {
        for (target, path) in
            expand_one(spec).map_err(|e| format!("settings: target {spec:?}: {e}"))?
        {
            if expanded.iter().any(|(t, _)| t.url == target.url) {
                return Err(format!(
                    "settings: target {} is listed twice (overlapping port ranges?)",
                    target.url
                ));
            }
            expanded.push((target, path));
        }
    }
    let labels: Vec<String> = expanded.iter().map(|(t, _)| t.label.clone()).collect();
    Ok(expanded
        .into_iter()
        .map(|(mut target, path)| {
            if labels.iter().filter(|l| **l == target.label).count() > 1 {
                target.label.push_str(&path);
            }
            target
        })
        .collect())
}

/// One target spec → its URLs, each with the path part (for telling apart targets that
/// share a host and port).
fn expand_one(spec: &str) -> Result<Vec<(TargetUrl, String)>, String> {
    let (scheme, after_scheme) = spec
        .split_once("://")
        .ok_or("not a URL (expected http://host:port/path)")?;
    let default_port = match scheme.to_ascii_lowercase().as_str() {
        "http" => 80,
        "https" => 443,
        _ => return Err(format!("scheme {scheme:?} is not http or https")),
    };
    let authority_end = after_scheme
        .find(['/', '?', '#'])
        .unwrap_or(after_scheme.len());
    let (authority, path) = after_scheme.split_at(authority_end);
    if authority.contains('@') {
        return Err("user information in URLs is refused by the http capability".to_owned());
    }
    let (host, port) = split_host_port(authority)?;
    let ports = match port {
        None => vec![default_port],
        Some(port) => parse_ports(port)?,
    };
    let from_range = port.is_some_and(|p| p.contains('-'));
    Ok(ports
        .into_iter()
        .map(|number| {
            let url = match port {
                // No port written: keep the URL exactly as the operator wrote it.
                None => spec.to_owned(),
                Some(_) => format!("{scheme}://{host}:{number}{path}"),
            };
            let label = format!("{host}:{number}");
            (
                TargetUrl {
                    url,
                    label,
                    from_range,
                },
                path.to_owned(),
            )
        })
        .collect())
}

/// `host`, `host:port`, `[v6]` or `[v6]:port`.
fn split_host_port(authority: &str) -> Result<(&str, Option<&str>), String> {
    if authority.is_empty() {
        return Err("has no host".to_owned());
    }
    if authority.starts_with('[') {
        let close = authority
            .find(']')
            .ok_or("IPv6 address has no closing ']'")?;
        let (host, rest) = authority.split_at(close + 1);
        return match rest {
            "" => Ok((host, None)),
            _ => match rest.strip_prefix(':') {
                Some(port) => Ok((host, Some(port))),
                None => Err(format!("unexpected {rest:?} after the IPv6 address")),
            },
        };
    }
    match authority.split_once(':') {
        None => Ok((authority, None)),
        Some(("", _)) => Err("has no host".to_owned()),
        Some((host, port)) => Ok((host, Some(port))),
    }
}

/// `9249` or `9250-9260`.
fn parse_ports(text: &str) -> Result<Vec<u16>, String> {
    let parse = |p: &str| {
        p.parse::<u16>()
            .ok()
            .filter(|&p| p > 0)
            .ok_or_else(|| format!("port {p:?} is not a number from 1 to 65535"))
    };
    let Some((first, last)) = text.split_once('-') else {
        return Ok(vec![parse(text)?]);
    };
    let (first, last) = (parse(first)?, parse(last)?);
    if first > last {
        return Err(format!("port range {first}-{last} runs backwards"));
    }
    let count = u32::from(last) - u32::from(first) + 1;
    if count > MAX_PORTS_PER_RANGE {
        return Err(format!(
            "port range {first}-{last} covers {count} ports, more than {MAX_PORTS_PER_RANGE}"
        ));
    }
    Ok((first..=last).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn urls(targets: &[&str]) -> Result<Vec<TargetUrl>, String> {
        expand_targets(&targets.iter().map(|t| t.to_string()).collect::<Vec<_>>())
    }

    #[test]
    fn empty_settings_mean_the_defaults() {
        assert_eq!(Settings::from_json("{}").unwrap(), Settings::default());
        assert_eq!(Settings::from_json("").unwrap(), Settings::default());
        assert_eq!(Settings::default().drop_labels, ["task_attempt_id"]);
        assert_eq!(Settings::default().target_label, "target");
        assert!(Settings::default().honor_timestamps);
    }

    #[test]
    fn default_json_round_trips_and_names_every_key() {
        let json = Settings::default_json();
        assert_eq!(Settings::from_json(&json).unwrap(), Settings::default());
        for key in [
            "targets",
            "target_label",
            "honor_timestamps",
            "keep_metrics",
            "drop_metrics",
            "keep_series",
            "drop_series",
            "drop_labels",
            "max_label_value_bytes",
        ] {
            assert!(
                json.contains(&format!("\"{key}\"")),
                "{key} missing from {json}"
            );
        }
    }

    #[test]
    fn reads_every_key() {
        let s = Settings::from_json(
            r#"{"targets":["http://a:1/m"],"target_label":"scrape","honor_timestamps":false,
                "keep_metrics":["flink_.*"],"drop_metrics":["x"],
                "keep_series":[{"label":"job_name","regex":"a|b"}],
                "drop_series":[{"label":"host","regex":"h"}],
                "drop_labels":["tm_id"],"max_label_value_bytes":100}"#,
        )
        .unwrap();
        assert_eq!(s.targets, ["http://a:1/m"]);
        assert_eq!(s.target_label, "scrape");
        assert!(!s.honor_timestamps);
        assert_eq!(s.keep_metrics, ["flink_.*"]);
        assert_eq!(s.drop_metrics, ["x"]);
        assert_eq!(s.keep_series[0].label, "job_name");
        assert_eq!(s.drop_series[0].regex, "h");
        assert_eq!(s.drop_labels, ["tm_id"]);
        assert_eq!(s.max_label_value_bytes, 100);
    }

    #[test]
    fn unknown_keys_are_refused_by_name() {
        let e = Settings::from_json(r#"{"target":["http://a:1/"]}"#).unwrap_err();
        assert!(e.contains("unknown field `target`"), "{e}");
        assert!(
            e.contains("targets"),
            "the message lists the known keys: {e}"
        );
        let e = Settings::from_json(r#"{"keep_series":[{"label":"a","regexp":"b"}]}"#).unwrap_err();
        assert!(e.contains("unknown field `regexp`"), "{e}");
    }

    #[test]
    fn wrong_types_and_bad_values_are_refused() {
        let e = Settings::from_json(r#"{"targets":"http://a:1/"}"#).unwrap_err();
        assert!(e.contains("invalid type"), "{e}");
        let e = Settings::from_json("[]").unwrap_err();
        assert!(e.contains("expected a JSON object"), "{e}");
        assert!(Settings::from_json("not json").is_err());
        let e = Settings::from_json(r#"{"targets":[]}"#).unwrap_err();
        assert!(e.contains("targets is empty"), "{e}");
        let e = Settings::from_json(r#"{"target_label":"instance"}"#).unwrap_err();
        assert!(e.contains("instance"), "{e}");
        let e = Settings::from_json(r#"{"target_label":"a-b"}"#).unwrap_err();
        assert!(e.contains("not a label name"), "{e}");
        let e = Settings::from_json(r#"{"drop_labels":["task-attempt-id"]}"#).unwrap_err();
        assert!(e.contains("drop_labels"), "{e}");
        let e = Settings::from_json(r#"{"drop_series":[{"label":"__name__","regex":"x"}]}"#)
            .unwrap_err();
        assert!(e.contains("__name__"), "{e}");
        let e = Settings::from_json(r#"{"max_label_value_bytes":0}"#).unwrap_err();
        assert!(e.contains("at least 1"), "{e}");
        assert!(Settings::from_json(r#"{"max_label_value_bytes":-1}"#).is_err());
    }

    #[test]
    fn an_empty_target_label_is_allowed() {
        let s = Settings::from_json(r#"{"target_label":""}"#).unwrap();
        assert_eq!(s.target_label, "");
    }

    #[test]
    fn a_plain_url_is_one_target_labelled_host_port() {
        let t = urls(&["http://127.0.0.1:9249/metrics"]).unwrap();
        assert_eq!(
            t,
            [TargetUrl {
                url: "http://127.0.0.1:9249/metrics".into(),
                label: "127.0.0.1:9249".into(),
                from_range: false,
            }]
        );
    }

    #[test]
    fn a_port_range_expands_to_one_target_per_port() {
        let t = urls(&["http://127.0.0.1:9250-9260/metrics"]).unwrap();
        assert_eq!(t.len(), 11);
        assert_eq!(t[0].url, "http://127.0.0.1:9250/metrics");
        assert_eq!(t[10].url, "http://127.0.0.1:9260/metrics");
        assert_eq!(t[3].label, "127.0.0.1:9253");
        assert!(t.iter().all(|t| t.from_range));
        let one = urls(&["http://h:9250-9250/m"]).unwrap();
        assert_eq!(one.len(), 1);
        assert!(one[0].from_range);
    }

    #[test]
    fn default_ports_ipv6_and_queries() {
        let t = urls(&["http://example.org/metrics", "https://secure/m"]).unwrap();
        assert_eq!(t[0].url, "http://example.org/metrics");
        assert_eq!(t[0].label, "example.org:80");
        assert_eq!(t[1].label, "secure:443");
        let t = urls(&["http://[::1]:9100-9101/metrics?x=1", "http://[::1]/m"]).unwrap();
        assert_eq!(t[0].url, "http://[::1]:9100/metrics?x=1");
        assert_eq!(t[1].url, "http://[::1]:9101/metrics?x=1");
        assert_eq!(t[0].label, "[::1]:9100");
        assert_eq!(t[2].url, "http://[::1]/m");
        assert_eq!(t[2].label, "[::1]:80");
        let t = urls(&["http://h:8080"]).unwrap();
        assert_eq!(t[0].url, "http://h:8080");
    }

    #[test]
    fn targets_sharing_host_and_port_get_the_path_in_their_label() {
        let t = urls(&[
            "http://h:10250/metrics",
            "http://h:10250/metrics/cadvisor",
            "http://g:1/",
        ])
        .unwrap();
        assert_eq!(t[0].label, "h:10250/metrics");
        assert_eq!(t[1].label, "h:10250/metrics/cadvisor");
        assert_eq!(t[2].label, "g:1");
    }

    #[test]
    fn malformed_targets_are_refused_with_the_reason() {
        let cases = [
            ("127.0.0.1:9249/metrics", "not a URL"),
            ("ftp://h:1/", "not http or https"),
            ("http://user:pw@h:1/", "user information"),
            ("http:///metrics", "no host"),
            ("http://:9249/metrics", "no host"),
            ("http://h:port/", "not a number"),
            ("http://h:0/", "not a number"),
            ("http://h:70000/", "not a number"),
            ("http://h:/", "not a number"),
            ("http://h:9260-9250/", "backwards"),
            ("http://h:1-1000/", "more than 256"),
            ("http://h:1-x/", "not a number"),
            ("http://[::1/", "closing"),
            ("http://[::1]x/", "after the IPv6"),
        ];
        for (spec, expected) in cases {
            let e = urls(&[spec]).unwrap_err();
            assert!(e.contains(expected), "{spec}: {e}");
            assert!(e.contains(spec), "the message names the target: {e}");
        }
    }

    #[test]
    fn a_url_listed_twice_is_refused() {
        let e = urls(&["http://h:9250-9255/m", "http://h:9255/m"]).unwrap_err();
        assert!(e.contains("http://h:9255/m is listed twice"), "{e}");
    }
}

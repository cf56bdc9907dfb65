//! The instance settings, handed to `init` as JSON by the agent (`settings = { ... }` in the
//! agent config).
//!
//! Unknown keys are refused rather than ignored: a misspelt `max_job` silently falling back to
//! the default would be found only when the series count surprises someone.

use serde::Deserialize;

/// The defaults, as `describe()` reports them to tooling.
pub const DEFAULT_SETTINGS_JSON: &str =
    r#"{"url":"http://127.0.0.1:8081","backpressure":true,"max_jobs":20}"#;

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Settings {
    /// Base URL of the JobManager's REST endpoint (the web UI address), without a trailing
    /// slash after [`Settings::parse`].
    pub url: String,
    /// Value of a `cluster` label on every series, to tell clusters apart when one agent
    /// watches several. No label when unset.
    pub cluster: Option<String>,
    /// Fetch `/backpressure` for every vertex of every running job (one request each).
    pub backpressure: bool,
    /// At most this many unfinished jobs get per-job and per-vertex series; the rest are
    /// counted in `flink_jobs_skipped`. 0 keeps only the cluster-wide series.
    pub max_jobs: usize,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            url: "http://127.0.0.1:8081".to_owned(),
            cluster: None,
            backpressure: true,
            max_jobs: 20,
        }
    }
}

impl Settings {
    /// Parses and checks the settings. Errors are meant for the operator, so they name the
    /// setting and what is wrong with it.
    pub fn parse(json: &str) -> Result<Settings, String> {
        // No settings at all reads as all defaults.
        let json = if json.trim().is_empty() { "{}" } else { json };
        let mut settings: Settings =
            serde_json::from_str(json).map_err(|e| format!("flink settings: {e}"))?;

        let url = settings.url.trim().to_owned();
        if !(url.starts_with("http://") || url.starts_with("https://")) {
            return Err(format!(
                "flink settings: url {url:?} must start with http:// or https://"
            ));
        }
        if url.contains(['?', '#']) || url.chars().any(char::is_whitespace) {
            return Err(format!(
                "flink settings: url {url:?} must be a plain base URL (no query, fragment or spaces)"
            ));
        }
        // Paths are appended as "/overview", so keep exactly one slash between the two.
        settings.url = url.trim_end_matches('/').to_owned();
        let host = settings
            .url
            .split_once("://")
            .map(|(_, rest)| rest)
            .unwrap_or_default();
        if host.is_empty() || host.starts_with('/') {
            return Err(format!("flink settings: url {url:?} has no host"));
        }

        if let Some(cluster) = &settings.cluster {
            if cluster.trim().is_empty() {
                return Err(
                    "flink settings: cluster must not be empty (leave it out for no label)"
                        .to_owned(),
                );
            }
            if cluster.len() > 128 {
                return Err("flink settings: cluster must be at most 128 bytes".to_owned());
            }
        }
        Ok(settings)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_and_default_json_give_the_defaults() {
        assert_eq!(Settings::parse("").unwrap(), Settings::default());
        assert_eq!(Settings::parse("{}").unwrap(), Settings::default());
        assert_eq!(
            Settings::parse(DEFAULT_SETTINGS_JSON).unwrap(),
            Settings::default()
        );
    }

    #[test]
    fn reads_every_setting_and_trims_the_url() {
        let s = Settings::parse(
            r#"{"url":"https://flink.example:8443/proxy/","cluster":"prod","backpressure":false,"max_jobs":3}"#,
        )
        .unwrap();
        assert_eq!(s.url, "https://flink.example:8443/proxy");
        assert_eq!(s.cluster.as_deref(), Some("prod"));
        assert!(!s.backpressure);
        assert_eq!(s.max_jobs, 3);
    }

    #[test]
    fn null_cluster_means_no_label() {
        let s = Settings::parse(r#"{"cluster":null}"#).unwrap();
        assert_eq!(s.cluster, None);
    }

    #[test]
    fn unknown_keys_are_refused_by_name() {
        let err = Settings::parse(r#"{"max_job":3}"#).unwrap_err();
        assert!(err.contains("unknown field `max_job`"), "{err}");
        assert!(err.contains("max_jobs"), "lists the valid keys: {err}");
    }

    #[test]
    fn wrong_types_and_bad_values_are_explained() {
        let err = Settings::parse(r#"{"max_jobs":-1}"#).unwrap_err();
        assert!(err.starts_with("flink settings:"), "{err}");
        let err = Settings::parse(r#"{"backpressure":"yes"}"#).unwrap_err();
        assert!(err.contains("invalid type"), "{err}");
        let err = Settings::parse(r#"{"url":"127.0.0.1:8081"}"#).unwrap_err();
        assert!(err.contains("http://"), "{err}");
        let err = Settings::parse(r#"{"url":"http://"}"#).unwrap_err();
        assert!(err.contains("no host"), "{err}");
        let err = Settings::parse(r#"{"url":"http://h:1/?x=1"}"#).unwrap_err();
        assert!(err.contains("plain base URL"), "{err}");
        let err = Settings::parse(r#"{"cluster":" "}"#).unwrap_err();
        assert!(err.contains("cluster"), "{err}");
        let err = Settings::parse("[1]").unwrap_err();
        assert!(err.starts_with("flink settings:"), "{err}");
        let err = Settings::parse("{").unwrap_err();
        assert!(err.starts_with("flink settings:"), "{err}");
    }
}

//! The instance's settings, as handed to `init` by the agent (a JSON object), and their
//! compiled form.
//!
//! Every key is optional; a missing key keeps node_exporter's default. A list given replaces
//! the default list rather than adding to it (as node_exporter's flags do), so the defaults
//! can also be switched off: `"network_exclude": []`. Unknown keys are refused rather than
//! ignored: a misspelt `disk_exclude` would otherwise silently keep the default and the
//! operator would wonder why their loop devices still show.

use serde::{Deserialize, Serialize};

use crate::filters::{self, Pattern};

/// Which groups of metrics to report (all by default). Each maps to the node_exporter
/// collector(s) of the same metrics, named in the README.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct Collectors {
    pub cpu: bool,
    pub load: bool,
    pub memory: bool,
    pub filesystem: bool,
    pub disk: bool,
    pub network: bool,
    pub stat: bool,
    pub hwmon: bool,
    pub thermal: bool,
}

impl Default for Collectors {
    fn default() -> Self {
        Collectors {
            cpu: true,
            load: true,
            memory: true,
            filesystem: true,
            disk: true,
            network: true,
            stat: true,
            hwmon: true,
            thermal: true,
        }
    }
}

impl Collectors {
    fn any(&self) -> bool {
        let Collectors {
            cpu,
            load,
            memory,
            filesystem,
            disk,
            network,
            stat,
            hwmon,
            thermal,
        } = *self;
        cpu || load || memory || filesystem || disk || network || stat || hwmon || thermal
    }
}

/// The settings as the operator writes them.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct Settings {
    pub collectors: Collectors,
    /// Filesystem types left out, as patterns (see `filters`).
    pub filesystem_exclude_fstypes: Vec<String>,
    /// Mount points left out, as path prefixes (see `filters`).
    pub filesystem_exclude_mountpoints: Vec<String>,
    /// Block devices left out, as patterns.
    pub disk_exclude: Vec<String>,
    /// Network interfaces left out, as patterns. node_exporter leaves none out by default,
    /// so neither does this (`lo` included).
    pub network_exclude: Vec<String>,
}

fn owned(list: &[&str]) -> Vec<String> {
    list.iter().map(|s| (*s).to_owned()).collect()
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            collectors: Collectors::default(),
            filesystem_exclude_fstypes: owned(filters::DEFAULT_FSTYPE_EXCLUDE),
            filesystem_exclude_mountpoints: owned(filters::DEFAULT_MOUNTPOINT_EXCLUDE),
            disk_exclude: owned(filters::DEFAULT_DISK_EXCLUDE),
            network_exclude: Vec::new(),
        }
    }
}

impl Settings {
    /// The defaults as JSON, for `describe()`. Built from [`Settings::default`] so the two
    /// cannot drift apart; a test checks that `init` accepts it.
    pub fn default_json() -> String {
        // Serialising plain strings, lists and booleans cannot fail; `{}` would mean the
        // same defaults anyway.
        serde_json::to_string(&Settings::default()).unwrap_or_else(|_| "{}".to_owned())
    }
}

/// The settings, checked and compiled for [`crate::metrics::families`].
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    pub collectors: Collectors,
    pub fstype_exclude: Vec<Pattern>,
    pub mountpoint_exclude: Vec<String>,
    pub disk_exclude: Vec<Pattern>,
    pub network_exclude: Vec<Pattern>,
}

impl Default for Config {
    fn default() -> Self {
        // The defaults are constants that the tests compile; should that ever fail, no
        // filtering is the safer way to be wrong than no metrics.
        Config::from_settings(Settings::default()).unwrap_or(Config {
            collectors: Collectors::default(),
            fstype_exclude: Vec::new(),
            mountpoint_exclude: Vec::new(),
            disk_exclude: Vec::new(),
            network_exclude: Vec::new(),
        })
    }
}

impl Config {
    /// Parses and checks the settings JSON, with an error meant for the operator that names
    /// the offending key.
    pub fn parse(json: &str) -> Result<Config, String> {
        // The agent always sends an object, but an empty string is unambiguous enough.
        let json = if json.trim().is_empty() { "{}" } else { json };
        let value: serde_json::Value =
            serde_json::from_str(json).map_err(|e| format!("invalid host settings: {e}"))?;
        // serde would also take a struct from a JSON array (by position); only an object
        // names its keys, which is what the checks and error messages rely on.
        if !value.is_object() {
            return Err("invalid host settings: expected a JSON object".to_owned());
        }
        let settings =
            Settings::deserialize(value).map_err(|e| format!("invalid host settings: {e}"))?;
        Config::from_settings(settings).map_err(|e| format!("invalid host settings: {e}"))
    }

    fn from_settings(settings: Settings) -> Result<Config, String> {
        if !settings.collectors.any() {
            return Err("every collector is off, so there is nothing to collect".to_owned());
        }
        for prefix in &settings.filesystem_exclude_mountpoints {
            filters::check_prefix("filesystem_exclude_mountpoints", prefix)?;
        }
        Ok(Config {
            collectors: settings.collectors,
            fstype_exclude: filters::compile(
                "filesystem_exclude_fstypes",
                &settings.filesystem_exclude_fstypes,
            )?,
            mountpoint_exclude: settings.filesystem_exclude_mountpoints,
            disk_exclude: filters::compile("disk_exclude", &settings.disk_exclude)?,
            network_exclude: filters::compile("network_exclude", &settings.network_exclude)?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_object_means_defaults() {
        assert_eq!(Config::parse("{}"), Ok(Config::default()));
        assert_eq!(Config::parse(" "), Ok(Config::default()));
        assert_eq!(
            Config::from_settings(Settings::default()).map(|c| c.disk_exclude.len()),
            Ok(filters::DEFAULT_DISK_EXCLUDE.len())
        );
    }

    #[test]
    fn default_json_round_trips() {
        let json = Settings::default_json();
        assert_eq!(Config::parse(&json), Ok(Config::default()));
        let back: Result<Settings, _> = serde_json::from_str(&json);
        assert_eq!(back.ok(), Some(Settings::default()));
        assert!(json.contains(r#""collectors":{"cpu":true,"#), "{json}");
        assert!(json.contains(r#""network_exclude":[]"#), "{json}");
    }

    #[test]
    fn reads_every_field() {
        let config = Config::parse(
            r#"{"collectors":{"hwmon":false,"thermal":false},
                "filesystem_exclude_fstypes":["tmpfs"],
                "filesystem_exclude_mountpoints":["/boot"],
                "disk_exclude":["mmcblk#p#"],
                "network_exclude":["lo","veth*"]}"#,
        );
        let config = match config {
            Ok(c) => c,
            Err(e) => panic!("{e}"),
        };
        assert!(!config.collectors.hwmon && !config.collectors.thermal);
        assert!(config.collectors.cpu && config.collectors.memory);
        assert!(filters::any_matches(&config.fstype_exclude, "tmpfs"));
        assert!(!filters::any_matches(&config.fstype_exclude, "squashfs"));
        assert_eq!(config.mountpoint_exclude, ["/boot"]);
        assert!(filters::any_matches(&config.disk_exclude, "mmcblk0p1"));
        assert!(!filters::any_matches(&config.disk_exclude, "loop0"));
        assert!(filters::any_matches(&config.network_exclude, "veth1a2b"));
    }

    #[test]
    fn unknown_keys_are_refused_by_name() {
        let e = Config::parse(r#"{"disk_excludes":["loop#"]}"#).unwrap_err();
        assert!(e.contains("unknown field `disk_excludes`"), "{e}");
        assert!(e.contains("disk_exclude"), "lists the known keys: {e}");
        let e = Config::parse(r#"{"collectors":{"diskstats":false}}"#).unwrap_err();
        assert!(e.contains("unknown field `diskstats`"), "{e}");
        assert!(e.contains("`disk`"), "lists the known collectors: {e}");
    }

    #[test]
    fn wrong_types_are_refused() {
        let e = Config::parse(r#"{"network_exclude":"lo"}"#).unwrap_err();
        assert!(e.contains("invalid type"), "{e}");
        let e = Config::parse(r#"{"collectors":{"cpu":"no"}}"#).unwrap_err();
        assert!(e.contains("invalid type"), "{e}");
        let e = Config::parse("[]").unwrap_err();
        assert!(e.contains("expected a JSON object"), "{e}");
        assert!(Config::parse("not json").is_err());
    }

    #[test]
    fn bad_entries_are_named() {
        let e = Config::parse(r#"{"disk_exclude":["sd[a-z#"]}"#).unwrap_err();
        assert!(e.contains("disk_exclude: pattern \"sd[a-z#\""), "{e}");
        let e = Config::parse(r#"{"filesystem_exclude_mountpoints":["boot"]}"#).unwrap_err();
        assert!(e.contains("filesystem_exclude_mountpoints"), "{e}");
        assert!(e.contains("\"boot\""), "{e}");
        let e = Config::parse(r#"{"filesystem_exclude_fstypes":[""]}"#).unwrap_err();
        assert!(e.contains("filesystem_exclude_fstypes"), "{e}");
    }

    #[test]
    fn all_collectors_off_is_refused() {
        let e = Config::parse(
            r#"{"collectors":{"cpu":false,"load":false,"memory":false,"filesystem":false,
                "disk":false,"network":false,"stat":false,"hwmon":false,"thermal":false}}"#,
        )
        .unwrap_err();
        assert!(e.contains("nothing to collect"), "{e}");
    }
}

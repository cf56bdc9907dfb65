//! The instance's settings, as handed to `init` by the agent (a JSON object).
//!
//! Unknown keys are refused rather than ignored: a misspelt `thermal_glob` would otherwise
//! silently fall back to the default and the operator would wonder why the grant they wrote
//! for their own path is never used.

use serde::{Deserialize, Serialize};

/// Where vcgencmd lives on Raspberry Pi OS (package `libraspberrypi-bin` / `raspi-utils`).
pub const DEFAULT_VCGENCMD: &str = "/usr/bin/vcgencmd";
/// Every kernel thermal zone; on a Pi, zone 0 is the SoC (`cpu-thermal`).
pub const DEFAULT_THERMAL_GLOB: &str = "/sys/class/thermal/thermal_zone*/temp";
/// [`Settings::default`] as JSON, for `describe()`. A test keeps the two in step.
pub const DEFAULT_SETTINGS_JSON: &str = r#"{"vcgencmd":"/usr/bin/vcgencmd","thermal_glob":"/sys/class/thermal/thermal_zone*/temp","fallback":true}"#;

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct Settings {
    /// Absolute path of vcgencmd. `null` turns vcgencmd off (sysfs only), which spares hosts
    /// without it a failed exec per command and round.
    pub vcgencmd: Option<String>,
    /// Glob of thermal-zone `temp` files (millidegrees Celsius) for the fallback. The `type`
    /// file next to each match names the sensor.
    pub thermal_glob: String,
    /// Read `thermal_glob` when vcgencmd gives no temperature.
    pub fallback: bool,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            vcgencmd: Some(DEFAULT_VCGENCMD.to_owned()),
            thermal_glob: DEFAULT_THERMAL_GLOB.to_owned(),
            fallback: true,
        }
    }
}

impl Settings {
    /// Parses and checks the settings, with an error meant for the operator.
    pub fn parse(json: &str) -> Result<Settings, String> {
        // The agent always sends an object, but an empty string is unambiguous enough.
        let json = if json.trim().is_empty() { "{}" } else { json };
        // serde would also read a struct from a JSON array (by position); settings are named.
        if !json.trim_start().starts_with('{') {
            return Err(format!(
                "invalid rpi settings: expected a JSON object like {DEFAULT_SETTINGS_JSON}"
            ));
        }
        let settings: Settings =
            serde_json::from_str(json).map_err(|e| format!("invalid rpi settings: {e}"))?;
        settings.check()?;
        Ok(settings)
    }

    fn check(&self) -> Result<(), String> {
        if let Some(program) = &self.vcgencmd {
            // The agent's exec grants match the program path exactly and never search PATH,
            // so a bare `vcgencmd` could never be granted.
            if !program.starts_with('/') {
                return Err(format!(
                    "invalid rpi settings: vcgencmd must be an absolute path (like \"{DEFAULT_VCGENCMD}\") or null, not {program:?}"
                ));
            }
        }
        let glob = &self.thermal_glob;
        if !glob.starts_with('/') || glob.split('/').any(|segment| segment == "..") {
            return Err(format!(
                "invalid rpi settings: thermal_glob must be an absolute path without `..` (like \"{DEFAULT_THERMAL_GLOB}\"), not {glob:?}"
            ));
        }
        if glob.contains("**") {
            // The agent refuses to list `**` patterns: they could walk the whole filesystem.
            return Err(format!(
                "invalid rpi settings: thermal_glob may not contain `**`, got {glob:?}"
            ));
        }
        if glob.ends_with('/') {
            return Err(format!(
                "invalid rpi settings: thermal_glob must match files (like \"{DEFAULT_THERMAL_GLOB}\"), not a directory: {glob:?}"
            ));
        }
        if self.vcgencmd.is_none() && !self.fallback {
            return Err(
                "invalid rpi settings: with vcgencmd = null and fallback = false there is nothing to collect"
                    .to_owned(),
            );
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_object_means_defaults() {
        assert_eq!(Settings::parse("{}"), Ok(Settings::default()));
        assert_eq!(Settings::parse(""), Ok(Settings::default()));
    }

    #[test]
    fn default_json_matches_the_defaults() {
        assert_eq!(
            Settings::parse(DEFAULT_SETTINGS_JSON),
            Ok(Settings::default())
        );
        assert_eq!(
            serde_json::to_string(&Settings::default()).ok().as_deref(),
            Some(DEFAULT_SETTINGS_JSON)
        );
    }

    #[test]
    fn reads_every_field() {
        let s = Settings::parse(
            r#"{"vcgencmd":"/opt/vc/bin/vcgencmd","thermal_glob":"/tmp/x/thermal_zone*/temp","fallback":false}"#,
        );
        assert_eq!(
            s,
            Ok(Settings {
                vcgencmd: Some("/opt/vc/bin/vcgencmd".into()),
                thermal_glob: "/tmp/x/thermal_zone*/temp".into(),
                fallback: false,
            })
        );
    }

    #[test]
    fn null_turns_vcgencmd_off() {
        let s = Settings::parse(r#"{"vcgencmd":null}"#).map(|s| s.vcgencmd);
        assert_eq!(s, Ok(None));
    }

    #[test]
    fn unknown_fields_are_refused_by_name() {
        let e = Settings::parse(r#"{"vcgencmd_path":"/usr/bin/vcgencmd"}"#).unwrap_err();
        assert!(e.contains("unknown field `vcgencmd_path`"), "{e}");
        assert!(e.contains("thermal_glob"), "lists the known fields: {e}");
    }

    #[test]
    fn wrong_types_are_refused() {
        let e = Settings::parse(r#"{"fallback":"yes"}"#).unwrap_err();
        assert!(e.contains("invalid type"), "{e}");
        assert!(Settings::parse("[]").is_err());
        assert!(Settings::parse("not json").is_err());
    }

    #[test]
    fn relative_program_is_refused() {
        let e = Settings::parse(r#"{"vcgencmd":"vcgencmd"}"#).unwrap_err();
        assert!(e.contains("absolute path"), "{e}");
    }

    #[test]
    fn bad_globs_are_refused() {
        for glob in [
            "thermal_zone*/temp",
            "/sys/class/thermal/../../etc/*",
            "/sys/**/temp",
            "/sys/class/thermal/",
        ] {
            let json = format!(r#"{{"thermal_glob":{glob:?}}}"#);
            assert!(Settings::parse(&json).is_err(), "{glob}");
        }
    }

    #[test]
    fn nothing_to_collect_is_refused() {
        let e = Settings::parse(r#"{"vcgencmd":null,"fallback":false}"#).unwrap_err();
        assert!(e.contains("nothing to collect"), "{e}");
    }
}

//! The first-party `host` plugin: the machine's own metrics under node_exporter's names.
//!
//! Once per round it asks the agent for a `host-stats` snapshot (CPU times, load, meminfo,
//! filesystems, disks, network interfaces, /proc/stat counters, hwmon and thermal-zone
//! temperatures, all read by the agent from /proc, /sys and statvfs) and reports it with
//! node_exporter's metric names, label names and units, so existing dashboards and alerts
//! work unchanged. The plugin itself needs no file grants: `host_stats = true` is enough.
//!
//! - [`settings`]: what the operator can change (collector groups, node_exporter's filters).
//! - [`filters`]: the name patterns and mount point prefixes behind those filters.
//! - [`metrics`]: the snapshot → families mapping, a pure function.
//!
//! Parts of the snapshot the agent could not read (`unavailable`, e.g. no /sys/class/hwmon
//! in a container) are logged once per instance and otherwise skipped: the same missing file
//! every round is worth one log line, not one per interval.
//!
//! The collection talks to the agent through the small [`Host`] trait so it can be tested
//! natively with a fake host; [`SdkHost`] is the real one.

pub mod filters;
pub mod metrics;
pub mod settings;

#[cfg(test)]
mod node_exporter_fixtures;

use std::cell::RefCell;
use std::collections::BTreeSet;

use picket_plugin_sdk::host::host_stats::{self, Snapshot};
use picket_plugin_sdk::host::log::{self, Level};
use picket_plugin_sdk::types::{Capability, Description, Family, HostError};
use picket_plugin_sdk::{Guest, error_message, export};

use settings::{Config, Settings};

/// The host calls the plugin makes. A trait so the collection can run against a fake host
/// in native tests; the wasm build uses [`SdkHost`].
pub trait Host {
    fn host_stats(&mut self) -> Result<Snapshot, HostError>;
    fn log(&mut self, level: Level, message: &str);
}

/// The agent, through the SDK's imports.
pub struct SdkHost;

impl Host for SdkHost {
    fn host_stats(&mut self) -> Result<Snapshot, HostError> {
        host_stats::read()
    }

    fn log(&mut self, level: Level, message: &str) {
        log::write(level, message);
    }
}

/// Messages already logged by this instance. Capped, so texts that differ every round (an
/// error with a changing number in it) cannot grow it without bound: past the cap the
/// plugin stays quiet rather than flooding the agent's log.
#[derive(Default)]
struct LogOnce {
    seen: BTreeSet<String>,
}

const MAX_LOGGED: usize = 64;

impl LogOnce {
    /// True the first time `message` is seen (and there is room to remember it).
    fn first(&mut self, message: &str) -> bool {
        if self.seen.len() >= MAX_LOGGED || self.seen.contains(message) {
            return false;
        }
        self.seen.insert(message.to_owned())
    }
}

/// One plugin instance: its settings and what it has already logged.
pub struct Collector {
    config: Config,
    logged: LogOnce,
}

impl Collector {
    pub fn new(config: Config) -> Self {
        Collector {
            config,
            logged: LogOnce::default(),
        }
    }

    /// One collection round. Fails when the snapshot cannot be had at all (not granted, the
    /// agent failed), or when the agent could read nothing of what it was asked for, so a
    /// plugin that is useless on this host counts as failing rather than silently empty.
    pub fn collect(&mut self, host: &mut impl Host) -> Result<Vec<Family>, String> {
        let snapshot = host
            .host_stats()
            .map_err(|e| format!("host-stats: {}", error_message(&e)))?;
        for part in &snapshot.unavailable {
            let message = format!(
                "host: the agent could not read {part}; skipping what it provides (logged once)"
            );
            if self.logged.first(&message) {
                host.log(Level::Warn, &message);
            }
        }
        let collected = metrics::families(&snapshot, &self.config);
        for note in &collected.notes {
            let message = format!("host: {note} (logged once)");
            if self.logged.first(&message) {
                host.log(Level::Warn, &message);
            }
        }
        if collected.families.is_empty() && !snapshot.unavailable.is_empty() {
            return Err(format!(
                "nothing measured; the agent could not read: {}",
                snapshot.unavailable.join("; ")
            ));
        }
        Ok(collected.families)
    }
}

thread_local! {
    /// The instance's collector, set by `init`. A wasm instance is single-threaded; this is
    /// only how a component keeps state between calls.
    static COLLECTOR: RefCell<Option<Collector>> = const { RefCell::new(None) };
}

pub struct HostPlugin;

impl Guest for HostPlugin {
    fn describe() -> Description {
        Description {
            name: "host".into(),
            version: env!("CARGO_PKG_VERSION").into(),
            capabilities: vec![Capability::HostStats, Capability::Log],
            default_settings: Settings::default_json(),
        }
    }

    fn init(settings: String) -> Result<(), String> {
        let config = Config::parse(&settings)?;
        COLLECTOR.with(|c| *c.borrow_mut() = Some(Collector::new(config)));
        Ok(())
    }

    fn collect() -> Result<Vec<Family>, String> {
        COLLECTOR.with(|c| match c.borrow_mut().as_mut() {
            Some(collector) => collector.collect(&mut SdkHost),
            None => Err("collect called before init".to_owned()),
        })
    }
}

export!(HostPlugin);

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::tests::{find, snapshot};

    /// A host answering from a prepared snapshot (or error) and recording log lines.
    struct FakeHost {
        answer: Result<Snapshot, HostError>,
        logs: Vec<(Level, String)>,
    }

    impl FakeHost {
        fn new(answer: Result<Snapshot, HostError>) -> Self {
            FakeHost {
                answer,
                logs: Vec::new(),
            }
        }
    }

    impl Host for FakeHost {
        fn host_stats(&mut self) -> Result<Snapshot, HostError> {
            self.answer.clone()
        }

        fn log(&mut self, level: Level, message: &str) {
            self.logs.push((level, message.to_owned()));
        }
    }

    #[test]
    fn describe_asks_for_host_stats_and_log_with_defaults_init_accepts() {
        let d = HostPlugin::describe();
        assert_eq!(d.name, "host");
        assert!(matches!(
            d.capabilities.as_slice(),
            [Capability::HostStats, Capability::Log]
        ));
        assert_eq!(Config::parse(&d.default_settings), Ok(Config::default()));
        assert!(HostPlugin::init(d.default_settings).is_ok());
    }

    #[test]
    fn init_reports_the_bad_key() {
        let e = HostPlugin::init(r#"{"colectors":{}}"#.into()).unwrap_err();
        assert!(e.contains("unknown field `colectors`"), "{e}");
    }

    #[test]
    fn collects_a_snapshot() {
        let mut host = FakeHost::new(Ok(snapshot()));
        let mut collector = Collector::new(Config::default());
        let families = match collector.collect(&mut host) {
            Ok(f) => f,
            Err(e) => panic!("{e}"),
        };
        assert!(find(&families, "node_cpu_seconds_total").is_some());
        assert!(find(&families, "node_thermal_zone_temp").is_some());
        assert!(host.logs.is_empty(), "{:?}", host.logs);
    }

    #[test]
    fn unavailable_parts_are_logged_once_each() {
        let mut s = snapshot();
        s.unavailable = vec![
            "/sys/class/hwmon: No such file or directory (os error 2)".into(),
            "/proc/diskstats: No such file or directory (os error 2)".into(),
        ];
        s.memory.push(metrics::tests::mem("Bad name", 1));
        let mut host = FakeHost::new(Ok(s));
        let mut collector = Collector::new(Config::default());
        for _ in 0..3 {
            assert!(collector.collect(&mut host).is_ok());
        }
        assert_eq!(host.logs.len(), 3, "{:?}", host.logs);
        assert!(host.logs.iter().all(|(level, _)| *level == Level::Warn));
        assert!(host.logs[0].1.contains("/sys/class/hwmon"));
        assert!(host.logs[1].1.contains("/proc/diskstats"));
        assert!(host.logs[2].1.contains("\"Bad name\""));
    }

    #[test]
    fn the_log_memory_is_capped() {
        let mut once = LogOnce::default();
        for i in 0..MAX_LOGGED {
            assert!(once.first(&i.to_string()));
        }
        assert!(!once.first("one more"));
        assert!(!once.first("0"));
    }

    #[test]
    fn a_denied_snapshot_fails_the_round_with_the_reason() {
        let mut host = FakeHost::new(Err(HostError::Denied(
            "host-stats is not granted (add host_stats = true)".into(),
        )));
        let e = Collector::new(Config::default())
            .collect(&mut host)
            .unwrap_err();
        assert!(e.starts_with("host-stats: denied:"), "{e}");
        assert!(e.contains("host_stats = true"), "{e}");
    }

    #[test]
    fn nothing_readable_fails_the_round() {
        let mut s = snapshot();
        s.unavailable = vec!["/sys/class/thermal: No such file or directory".into()];
        s.thermal_zones.clear();
        let config = match Config::parse(
            r#"{"collectors":{"cpu":false,"load":false,"memory":false,"filesystem":false,
                "disk":false,"network":false,"stat":false,"hwmon":false}}"#,
        ) {
            Ok(c) => c,
            Err(e) => panic!("{e}"),
        };
        let mut host = FakeHost::new(Ok(s));
        let e = Collector::new(config).collect(&mut host).unwrap_err();
        assert!(e.contains("/sys/class/thermal"), "{e}");
    }

    #[test]
    fn collect_before_init_is_an_error() {
        COLLECTOR.with(|c| *c.borrow_mut() = None);
        assert!(HostPlugin::collect().is_err());
    }
}

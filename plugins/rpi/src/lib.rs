//! The first-party `rpi` plugin: Raspberry Pi health from the VideoCore firmware.
//!
//! Every round it runs four fixed vcgencmd queries through the agent's `exec` capability
//! (`measure_temp`, `get_throttled`, `measure_clock arm`, `measure_volts core`) and reports
//! SoC temperature, throttling conditions, ARM clock and core voltage. When vcgencmd yields no
//! temperature (missing, not granted, failing) it reads the kernel's thermal zones through the
//! `read-file` capability instead. Metric names and the grants to write are in the README.
//!
//! Nothing here may panic on what vcgencmd or sysfs answer: a bad answer skips its metric, is
//! counted in `rpi_vcgencmd_errors_total`, and is logged once per kind so a broken firmware
//! tool cannot flood the agent's log every interval.
//!
//! The collection logic talks to the agent through the small [`Host`] trait so it can be
//! tested natively with a fake host; [`SdkHost`] is the real one.

pub mod settings;
pub mod thermal;
pub mod vcgencmd;

use std::cell::RefCell;
use std::collections::BTreeSet;

use picket_plugin_sdk::families::FamilyBuilder;
use picket_plugin_sdk::host::exec::Output;
use picket_plugin_sdk::host::log::Level;
use picket_plugin_sdk::host::{exec, files, log};
use picket_plugin_sdk::types::{Capability, Description, Family, HostError};
use picket_plugin_sdk::{Guest, error_message, export};

use settings::{DEFAULT_SETTINGS_JSON, Settings};
use vcgencmd::{Command, OutputError};

pub const TEMPERATURE: &str = "rpi_soc_temperature_celsius";
pub const THROTTLED: &str = "rpi_throttled";
pub const THROTTLED_RAW: &str = "rpi_throttled_raw";
pub const ARM_FREQUENCY: &str = "rpi_arm_frequency_hertz";
pub const CORE_VOLTAGE: &str = "rpi_core_voltage_volts";
pub const VCGENCMD_ERRORS: &str = "rpi_vcgencmd_errors_total";

/// The host calls the plugin makes. A trait so the collection can run against a fake host in
/// native tests; the wasm build uses [`SdkHost`].
pub trait Host {
    fn run(&mut self, program: &str, args: &[&str]) -> Result<Output, HostError>;
    fn glob(&mut self, pattern: &str) -> Result<Vec<String>, HostError>;
    fn read(&mut self, path: &str) -> Result<Vec<u8>, HostError>;
    fn log(&mut self, level: Level, message: &str);
}

/// The agent, through the SDK's imports.
pub struct SdkHost;

impl Host for SdkHost {
    fn run(&mut self, program: &str, args: &[&str]) -> Result<Output, HostError> {
        let args: Vec<String> = args.iter().map(|a| (*a).to_owned()).collect();
        exec::run(program, &args)
    }

    fn glob(&mut self, pattern: &str) -> Result<Vec<String>, HostError> {
        files::glob(pattern)
    }

    fn read(&mut self, path: &str) -> Result<Vec<u8>, HostError> {
        files::read(path)
    }

    fn log(&mut self, level: Level, message: &str) {
        log::write(level, message);
    }
}

/// Keys of messages already logged by this instance. Capped, so texts that differ every round
/// cannot grow it without bound: past the cap the plugin stays quiet.
#[derive(Default)]
struct LogOnce {
    seen: BTreeSet<String>,
}

const MAX_LOGGED_KEYS: usize = 64;

impl LogOnce {
    /// True the first time `key` is seen (and there is room to remember it).
    fn first(&mut self, key: String) -> bool {
        if self.seen.len() >= MAX_LOGGED_KEYS {
            return false;
        }
        self.seen.insert(key)
    }
}

/// How running one vcgencmd query went, before its output is parsed.
enum Run {
    /// Exit status 0: its stdout.
    Answered(String),
    /// Could not be started at all (missing program, not granted). Not vcgencmd's fault,
    /// so not counted as a vcgencmd error.
    Unavailable(String),
    /// Started but misbehaved: non-zero status, timeout, too much output.
    Failed { kind: &'static str, text: String },
}

/// One plugin instance: its settings and what it remembers between rounds.
pub struct Collector {
    settings: Settings,
    /// Per [`Command::index`], since the instance started (a counter: the agent restarts the
    /// instance from zero, which Prometheus reads as a counter reset).
    errors: [u64; Command::ALL.len()],
    logged: LogOnce,
}

impl Collector {
    pub fn new(settings: Settings) -> Self {
        Collector {
            settings,
            errors: [0; Command::ALL.len()],
            logged: LogOnce::default(),
        }
    }

    /// One collection round. Fails only when nothing at all could be measured, so the agent
    /// counts a plugin that is useless on this host as failing rather than silently empty.
    pub fn collect(&mut self, host: &mut impl Host) -> Result<Vec<Family>, String> {
        let mut temperature = FamilyBuilder::gauge(
            TEMPERATURE,
            "SoC temperature in degrees Celsius: from vcgencmd measure_temp (sensor=\"soc\"), or per kernel thermal zone (sensor=<type>, zone=<zone>) when vcgencmd gives none.",
        );
        let mut throttled = FamilyBuilder::gauge(
            THROTTLED,
            "1 while a vcgencmd get_throttled condition holds (when=\"now\") or if it has held since boot (when=\"since_boot\"), else 0.",
        );
        let mut throttled_raw = FamilyBuilder::gauge(
            THROTTLED_RAW,
            "The vcgencmd get_throttled bit field as a number (bits 0-3: now, bits 16-19: since boot).",
        );
        let mut frequency = FamilyBuilder::gauge(
            ARM_FREQUENCY,
            "ARM core clock in hertz as measured by the firmware (vcgencmd measure_clock arm).",
        );
        let mut voltage = FamilyBuilder::gauge(
            CORE_VOLTAGE,
            "VideoCore core voltage in volts (vcgencmd measure_volts core).",
        );
        // Why each missing measurement is missing, for the error when nothing was measured.
        let mut misses: Vec<String> = Vec::new();
        let mut no_temperature = None;

        if let Some(program) = self.settings.vcgencmd.clone() {
            for command in Command::ALL {
                let stdout = match self.run(host, &program, command) {
                    Ok(stdout) => stdout,
                    Err(why) => {
                        if command == Command::MeasureTemp {
                            no_temperature = Some(why.clone());
                        }
                        misses.push(format!("{}: {why}", command.label()));
                        continue;
                    }
                };
                // Parse errors share one path: count, log once, skip the metric.
                let parsed: Result<(), OutputError> = match command {
                    Command::MeasureTemp => vcgencmd::parse_temp(&stdout).map(|celsius| {
                        temperature.sample(&[("sensor", "soc")], celsius);
                    }),
                    Command::GetThrottled => vcgencmd::parse_throttled(&stdout).map(|raw| {
                        for flag in vcgencmd::decode_throttled(raw) {
                            throttled.sample(
                                &[("condition", flag.condition), ("when", flag.when.label())],
                                if flag.active { 1.0 } else { 0.0 },
                            );
                        }
                        throttled_raw.sample(&[], f64::from(raw));
                    }),
                    Command::MeasureClockArm => vcgencmd::parse_clock(&stdout).map(|hertz| {
                        // Clock rates are below 2^53, so the conversion is exact.
                        frequency.sample(&[], hertz as f64);
                    }),
                    Command::MeasureVoltsCore => vcgencmd::parse_volts(&stdout).map(|volts| {
                        voltage.sample(&[], volts);
                    }),
                };
                if let Err(e) = parsed {
                    let why = self.vcgencmd_error(host, command, e.kind(), e.to_string());
                    if command == Command::MeasureTemp {
                        no_temperature = Some(why.clone());
                    }
                    misses.push(format!("{}: {why}", command.label()));
                }
            }
        } else {
            no_temperature = Some("vcgencmd is off (settings: vcgencmd = null)".to_owned());
        }

        if temperature.is_empty() && self.settings.fallback {
            let why = no_temperature.unwrap_or_else(|| "no answer".to_owned());
            if let Err(miss) = self.fallback(host, &why, &mut temperature) {
                misses.push(format!("thermal fallback: {miss}"));
            }
        }

        let measured = [
            &temperature,
            &throttled,
            &throttled_raw,
            &frequency,
            &voltage,
        ]
        .iter()
        .any(|f| !f.is_empty());
        if !measured {
            return Err(format!("nothing measured ({})", misses.join("; ")));
        }

        let mut families: Vec<Family> = [temperature, throttled, throttled_raw, frequency, voltage]
            .into_iter()
            .filter(|f| !f.is_empty())
            .map(FamilyBuilder::build)
            .collect();
        if self.settings.vcgencmd.is_some() {
            let mut errors = FamilyBuilder::counter(
                VCGENCMD_ERRORS,
                "vcgencmd queries that ran but gave no usable answer (error line, unexpected or empty output, non-zero exit, timeout), by command, since the plugin instance started.",
            );
            for command in Command::ALL {
                errors.sample(
                    &[("command", command.label())],
                    self.errors[command.index()] as f64,
                );
            }
            families.push(errors.build());
        }
        Ok(families)
    }

    /// Runs one query: its stdout when it answered with status 0, else the reason (already
    /// counted and logged as appropriate).
    fn run(
        &mut self,
        host: &mut impl Host,
        program: &str,
        command: Command,
    ) -> Result<String, String> {
        let outcome = match host.run(program, command.args()) {
            Ok(output) => ran(&output),
            Err(HostError::Timeout) => Run::Failed {
                kind: "timeout",
                text: "timed out (the grant's exec_timeout)".to_owned(),
            },
            Err(HostError::TooLarge) => Run::Failed {
                kind: "too_large",
                text: "answered more than the grant's exec_max_output_bytes".to_owned(),
            },
            Err(e) => Run::Unavailable(error_message(&e)),
        };
        match outcome {
            Run::Answered(stdout) => Ok(stdout),
            Run::Failed { kind, text } => Err(self.vcgencmd_error(host, command, kind, text)),
            Run::Unavailable(text) => {
                // Keyed by the text alone: a missing program fails every command with the
                // same message, which is worth one line, not four.
                if self.logged.first(format!("unavailable {text}")) {
                    host.log(
                        Level::Warn,
                        &format!("rpi: cannot run vcgencmd: {text}; skipping what it measures"),
                    );
                }
                Err(text)
            }
        }
    }

    /// Counts a vcgencmd error, logs it once per command and kind, and returns its text.
    fn vcgencmd_error(
        &mut self,
        host: &mut impl Host,
        command: Command,
        kind: &str,
        text: String,
    ) -> String {
        let count = &mut self.errors[command.index()];
        *count = count.saturating_add(1);
        if self
            .logged
            .first(format!("error {} {kind}", command.label()))
        {
            host.log(
                Level::Warn,
                &format!(
                    "rpi: vcgencmd {}: {text}; skipping this metric (counted in {VCGENCMD_ERRORS}, logged once)",
                    command.args().join(" ")
                ),
            );
        }
        text
    }

    /// Adds the thermal zones' temperatures to `temperature`. Errs with the reason when none
    /// could be read.
    fn fallback(
        &mut self,
        host: &mut impl Host,
        why: &str,
        temperature: &mut FamilyBuilder,
    ) -> Result<(), String> {
        let glob = self.settings.thermal_glob.clone();
        if self.logged.first("fallback".to_owned()) {
            host.log(
                Level::Warn,
                &format!(
                    "rpi: no temperature from vcgencmd ({why}); reading {glob} instead (logged once)"
                ),
            );
        }
        let scan = match thermal::scan(host, &glob) {
            Ok(scan) => scan,
            Err(e) => {
                if self.logged.first(format!("fallback failed {e}")) {
                    host.log(Level::Warn, &format!("rpi: thermal fallback: {e}"));
                }
                return Err(e);
            }
        };
        for problem in &scan.problems {
            if self.logged.first(format!("fallback problem {problem}")) {
                host.log(
                    Level::Warn,
                    &format!("rpi: thermal fallback: {problem}; skipped"),
                );
            }
        }
        for reading in &scan.readings {
            temperature.sample(
                &[("sensor", &reading.sensor), ("zone", &reading.zone)],
                reading.celsius,
            );
        }
        if scan.readings.is_empty() {
            let e = format!("no readable thermal zone matches {glob}");
            if self.logged.first(format!("fallback empty {glob}")) {
                host.log(Level::Warn, &format!("rpi: thermal fallback: {e}"));
            }
            return Err(e);
        }
        Ok(())
    }
}

/// Sorts a finished run into an answer or a failure.
fn ran(output: &Output) -> Run {
    match output.exit_code {
        Some(0) => Run::Answered(String::from_utf8_lossy(&output.stdout).into_owned()),
        status => {
            // vcgencmd prints its complaints on either stream depending on the release.
            let said = [&output.stderr, &output.stdout]
                .into_iter()
                .map(|bytes| String::from_utf8_lossy(bytes).trim().to_owned())
                .find(|text| !text.is_empty())
                .map(|text| format!(": {}", vcgencmd::shorten(&text)))
                .unwrap_or_default();
            let text = match status {
                Some(code) => format!("exited with status {code}{said}"),
                None => format!("killed by a signal{said}"),
            };
            Run::Failed { kind: "exit", text }
        }
    }
}

thread_local! {
    /// The instance's collector, set by `init`. A wasm instance is single-threaded; this is
    /// only how a component keeps state between calls.
    static COLLECTOR: RefCell<Option<Collector>> = const { RefCell::new(None) };
}

pub struct Rpi;

impl Guest for Rpi {
    fn describe() -> Description {
        Description {
            name: "rpi".into(),
            version: env!("CARGO_PKG_VERSION").into(),
            capabilities: vec![Capability::Exec, Capability::ReadFile, Capability::Log],
            default_settings: DEFAULT_SETTINGS_JSON.into(),
        }
    }

    fn init(settings: String) -> Result<(), String> {
        let settings = Settings::parse(&settings)?;
        COLLECTOR.with(|c| *c.borrow_mut() = Some(Collector::new(settings)));
        Ok(())
    }

    fn collect() -> Result<Vec<Family>, String> {
        COLLECTOR.with(|c| match c.borrow_mut().as_mut() {
            Some(collector) => collector.collect(&mut SdkHost),
            None => Err("collect called before init".to_owned()),
        })
    }
}

export!(Rpi);

#[cfg(test)]
pub(crate) mod tests {
    use std::collections::BTreeMap;

    use picket_plugin_sdk::types::{MetricKind, Value};

    use super::*;

    /// A host answering from tables: exec by argument list, files by path, globs by pattern.
    /// Anything not in a table is refused the way the agent refuses ungranted calls.
    #[derive(Default)]
    pub struct FakeHost {
        exec: BTreeMap<String, Result<Output, HostError>>,
        files: BTreeMap<String, Vec<u8>>,
        globs: BTreeMap<String, Vec<String>>,
        /// The program exec answers for; others fail like a missing binary.
        program: Option<String>,
        pub runs: Vec<String>,
        pub logs: Vec<(Level, String)>,
    }

    impl FakeHost {
        /// A vcgencmd at `/usr/bin/vcgencmd` answering the four commands like a healthy Pi 4.
        pub fn pi() -> Self {
            FakeHost::default()
                .vcgencmd("measure_temp", 0, "temp=48.3'C\n")
                .vcgencmd("get_throttled", 0, "throttled=0x50005\n")
                .vcgencmd("measure_clock arm", 0, "frequency(48)=1500398464\n")
                .vcgencmd("measure_volts core", 0, "volt=0.8563V\n")
        }

        pub fn vcgencmd(mut self, args: &str, status: i32, stdout: &str) -> Self {
            self.program = Some("/usr/bin/vcgencmd".into());
            self.exec.insert(
                args.into(),
                Ok(Output {
                    exit_code: Some(status),
                    stdout: stdout.as_bytes().to_vec(),
                    stderr: Vec::new(),
                }),
            );
            self
        }

        pub fn exec_result(mut self, args: &str, result: Result<Output, HostError>) -> Self {
            self.program = Some("/usr/bin/vcgencmd".into());
            self.exec.insert(args.into(), result);
            self
        }

        pub fn file(mut self, path: &str, content: &str) -> Self {
            self.files.insert(path.into(), content.as_bytes().to_vec());
            self
        }

        pub fn glob(mut self, pattern: &str, paths: &[&str]) -> Self {
            self.globs
                .insert(pattern.into(), paths.iter().map(|p| (*p).into()).collect());
            self
        }

        /// The Pi's thermal zone 0 as sysfs shows it.
        pub fn thermal_zone0(self) -> Self {
            self.glob(
                "/sys/class/thermal/thermal_zone*/temp",
                &["/sys/class/thermal/thermal_zone0/temp"],
            )
            .file("/sys/class/thermal/thermal_zone0/temp", "48312\n")
            .file("/sys/class/thermal/thermal_zone0/type", "cpu-thermal\n")
        }

        fn warnings(&self) -> Vec<&str> {
            self.logs
                .iter()
                .filter(|(level, _)| *level == Level::Warn)
                .map(|(_, m)| m.as_str())
                .collect()
        }
    }

    impl Host for FakeHost {
        fn run(&mut self, program: &str, args: &[&str]) -> Result<Output, HostError> {
            let args = args.join(" ");
            self.runs.push(format!("{program} {args}"));
            if self.program.as_deref() != Some(program) {
                return Err(HostError::Failed(format!(
                    "{program}: No such file or directory (os error 2)"
                )));
            }
            self.exec.get(&args).cloned().unwrap_or_else(|| {
                Err(HostError::Denied(format!(
                    "exec {program} {args} is not granted (add exec = [...])"
                )))
            })
        }

        fn glob(&mut self, pattern: &str) -> Result<Vec<String>, HostError> {
            self.globs.get(pattern).cloned().ok_or_else(|| {
                HostError::Denied(format!("glob {pattern} is not granted (add read_file)"))
            })
        }

        fn read(&mut self, path: &str) -> Result<Vec<u8>, HostError> {
            self.files.get(path).cloned().ok_or_else(|| {
                HostError::Denied(format!("read-file {path} is not granted (add read_file)"))
            })
        }

        fn log(&mut self, level: Level, message: &str) {
            self.logs.push((level, message.to_owned()));
        }
    }

    /// Families as `name{label="value",...} value` lines, sorted labels, for comparing.
    fn lines(families: &[Family]) -> Vec<String> {
        let mut out = Vec::new();
        for f in families {
            for s in &f.samples {
                let mut labels: Vec<String> = s
                    .labels
                    .iter()
                    .map(|l| format!("{}=\"{}\"", l.name, l.value))
                    .collect();
                labels.sort();
                let value = match s.value {
                    Value::Number(v) => v,
                    _ => f64::NAN,
                };
                out.push(format!("{}{{{}}} {value}", f.name, labels.join(",")));
            }
        }
        out
    }

    fn value(families: &[Family], name: &str, labels: &str) -> Option<f64> {
        let prefix = format!("{name}{{{labels}}} ");
        lines(families)
            .iter()
            .find_map(|l| l.strip_prefix(&prefix).and_then(|v| v.parse().ok()))
    }

    fn collector(json: &str) -> Collector {
        Collector::new(Settings::parse(json).unwrap())
    }

    #[test]
    fn a_healthy_pi_reports_everything() {
        let mut host = FakeHost::pi();
        let families = collector("{}").collect(&mut host).unwrap();
        assert_eq!(
            lines(&families),
            [
                "rpi_soc_temperature_celsius{sensor=\"soc\"} 48.3",
                "rpi_throttled{condition=\"under_voltage\",when=\"now\"} 1",
                "rpi_throttled{condition=\"arm_frequency_capped\",when=\"now\"} 0",
                "rpi_throttled{condition=\"throttled\",when=\"now\"} 1",
                "rpi_throttled{condition=\"soft_temperature_limit\",when=\"now\"} 0",
                "rpi_throttled{condition=\"under_voltage\",when=\"since_boot\"} 1",
                "rpi_throttled{condition=\"arm_frequency_capped\",when=\"since_boot\"} 0",
                "rpi_throttled{condition=\"throttled\",when=\"since_boot\"} 1",
                "rpi_throttled{condition=\"soft_temperature_limit\",when=\"since_boot\"} 0",
                "rpi_throttled_raw{} 327685",
                "rpi_arm_frequency_hertz{} 1500398464",
                "rpi_core_voltage_volts{} 0.8563",
                "rpi_vcgencmd_errors_total{command=\"measure_temp\"} 0",
                "rpi_vcgencmd_errors_total{command=\"get_throttled\"} 0",
                "rpi_vcgencmd_errors_total{command=\"measure_clock_arm\"} 0",
                "rpi_vcgencmd_errors_total{command=\"measure_volts_core\"} 0",
            ]
        );
        let kinds: Vec<(String, MetricKind)> =
            families.iter().map(|f| (f.name.clone(), f.kind)).collect();
        assert_eq!(kinds.last().map(|k| k.1), Some(MetricKind::Counter));
        assert!(
            kinds[..kinds.len() - 1]
                .iter()
                .all(|k| k.1 == MetricKind::Gauge)
        );
        assert!(families.iter().all(|f| !f.help.is_empty()));
        assert_eq!(
            host.runs,
            [
                "/usr/bin/vcgencmd measure_temp",
                "/usr/bin/vcgencmd get_throttled",
                "/usr/bin/vcgencmd measure_clock arm",
                "/usr/bin/vcgencmd measure_volts core",
            ]
        );
        assert!(host.logs.is_empty(), "{:?}", host.logs);
    }

    #[test]
    fn the_program_path_comes_from_the_settings() {
        let mut host = FakeHost::pi();
        let mut c = collector(r#"{"vcgencmd":"/opt/vc/bin/vcgencmd","fallback":false}"#);
        // The fake only answers at /usr/bin/vcgencmd, so every query is unavailable.
        let e = c.collect(&mut host).unwrap_err();
        assert!(
            host.runs
                .iter()
                .all(|r| r.starts_with("/opt/vc/bin/vcgencmd "))
        );
        assert!(e.starts_with("nothing measured ("), "{e}");
        assert!(e.contains("No such file"), "{e}");
    }

    #[test]
    fn missing_vcgencmd_falls_back_to_sysfs_and_says_so_once() {
        let mut host = FakeHost::default().thermal_zone0();
        let mut c = collector("{}");
        for _ in 0..3 {
            let families = c.collect(&mut host).unwrap();
            assert_eq!(
                lines(&families),
                [
                    "rpi_soc_temperature_celsius{sensor=\"cpu-thermal\",zone=\"thermal_zone0\"} 48.312",
                    "rpi_vcgencmd_errors_total{command=\"measure_temp\"} 0",
                    "rpi_vcgencmd_errors_total{command=\"get_throttled\"} 0",
                    "rpi_vcgencmd_errors_total{command=\"measure_clock_arm\"} 0",
                    "rpi_vcgencmd_errors_total{command=\"measure_volts_core\"} 0",
                ]
            );
        }
        let warnings = host.warnings();
        assert_eq!(warnings.len(), 2, "{warnings:#?}");
        assert!(warnings[0].contains("cannot run vcgencmd"));
        assert!(warnings[0].contains("No such file"));
        assert!(warnings[1].contains("reading /sys/class/thermal/thermal_zone*/temp instead"));
        assert!(
            warnings[1].contains("No such file"),
            "says why: {}",
            warnings[1]
        );
    }

    #[test]
    fn ungranted_commands_are_skipped_not_counted() {
        // The operator granted only measure_temp.
        let mut host = FakeHost::default().vcgencmd("measure_temp", 0, "temp=51.0'C");
        let mut c = collector("{}");
        c.collect(&mut host).unwrap();
        let families = c.collect(&mut host).unwrap();
        assert_eq!(value(&families, TEMPERATURE, "sensor=\"soc\""), Some(51.0));
        assert!(!families.iter().any(|f| f.name == THROTTLED));
        assert_eq!(
            value(&families, VCGENCMD_ERRORS, "command=\"get_throttled\""),
            Some(0.0)
        );
        // One line per distinct denial, not per round.
        assert_eq!(host.warnings().len(), 3, "{:#?}", host.warnings());
        assert!(host.warnings().iter().all(|w| w.contains("not granted")));
    }

    #[test]
    fn an_unregistered_command_is_counted_and_logged_once() {
        let mut host = FakeHost::pi().vcgencmd(
            "measure_clock arm",
            0,
            "error=2 error_msg=\"Command not registered\"\n",
        );
        let mut c = collector("{}");
        let mut families = Vec::new();
        for _ in 0..3 {
            families = c.collect(&mut host).unwrap();
        }
        assert!(!families.iter().any(|f| f.name == ARM_FREQUENCY));
        assert_eq!(
            value(&families, VCGENCMD_ERRORS, "command=\"measure_clock_arm\""),
            Some(3.0)
        );
        assert_eq!(
            value(&families, VCGENCMD_ERRORS, "command=\"measure_temp\""),
            Some(0.0)
        );
        assert_eq!(value(&families, CORE_VOLTAGE, ""), Some(0.8563));
        assert_eq!(
            host.warnings(),
            [
                "rpi: vcgencmd measure_clock arm: vcgencmd reported error 2: Command not registered; skipping this metric (counted in rpi_vcgencmd_errors_total, logged once)"
            ]
        );
    }

    #[test]
    fn garbage_and_empty_answers_are_counted() {
        let mut host = FakeHost::pi().vcgencmd("get_throttled", 0, "").vcgencmd(
            "measure_volts core",
            0,
            "\u{1b}[2J\u{0}garbage",
        );
        let families = collector("{}").collect(&mut host).unwrap();
        assert!(!families.iter().any(|f| f.name == THROTTLED));
        assert!(!families.iter().any(|f| f.name == THROTTLED_RAW));
        assert!(!families.iter().any(|f| f.name == CORE_VOLTAGE));
        assert_eq!(
            value(&families, VCGENCMD_ERRORS, "command=\"get_throttled\""),
            Some(1.0)
        );
        assert_eq!(
            value(&families, VCGENCMD_ERRORS, "command=\"measure_volts_core\""),
            Some(1.0)
        );
        let warnings = host.warnings();
        assert_eq!(warnings.len(), 2);
        assert!(warnings[0].contains("get_throttled: empty output"));
        assert!(warnings[1].contains("expected volt=<volts>V"));
    }

    #[test]
    fn a_failing_vcgencmd_is_counted_and_the_temperature_falls_back() {
        // What vcgencmd does in a container without /dev/vchiq.
        let failing = Output {
            exit_code: Some(255),
            stdout: Vec::new(),
            stderr: b"VCHI initialization failed\n".to_vec(),
        };
        let mut host = FakeHost::default().thermal_zone0();
        for args in [
            "measure_temp",
            "get_throttled",
            "measure_clock arm",
            "measure_volts core",
        ] {
            host = host.exec_result(args, Ok(failing.clone()));
        }
        let mut c = collector("{}");
        c.collect(&mut host).unwrap();
        let families = c.collect(&mut host).unwrap();
        assert_eq!(
            value(
                &families,
                TEMPERATURE,
                "sensor=\"cpu-thermal\",zone=\"thermal_zone0\""
            ),
            Some(48.312)
        );
        for command in Command::ALL {
            let labels = format!("command=\"{}\"", command.label());
            assert_eq!(value(&families, VCGENCMD_ERRORS, &labels), Some(2.0));
        }
        let warnings = host.warnings();
        // Four commands, each logged once, then the fallback once.
        assert_eq!(warnings.len(), 5, "{warnings:#?}");
        assert!(warnings[0].contains("exited with status 255: VCHI initialization failed"));
        assert!(warnings[4].contains("VCHI initialization failed"));
        assert!(warnings[4].contains("instead"));
    }

    #[test]
    fn timeouts_oversized_answers_and_signals_are_errors() {
        let mut host = FakeHost::pi()
            .exec_result("measure_temp", Err(HostError::Timeout))
            .exec_result("get_throttled", Err(HostError::TooLarge))
            .exec_result(
                "measure_volts core",
                Ok(Output {
                    exit_code: None,
                    stdout: Vec::new(),
                    stderr: Vec::new(),
                }),
            );
        let families = collector(r#"{"fallback":false}"#)
            .collect(&mut host)
            .unwrap();
        assert_eq!(
            lines(&families),
            [
                "rpi_arm_frequency_hertz{} 1500398464",
                "rpi_vcgencmd_errors_total{command=\"measure_temp\"} 1",
                "rpi_vcgencmd_errors_total{command=\"get_throttled\"} 1",
                "rpi_vcgencmd_errors_total{command=\"measure_clock_arm\"} 0",
                "rpi_vcgencmd_errors_total{command=\"measure_volts_core\"} 1",
            ]
        );
        let warnings = host.warnings();
        assert!(warnings[0].contains("timed out"));
        assert!(warnings[1].contains("exec_max_output_bytes"));
        assert!(warnings[2].contains("killed by a signal"));
    }

    #[test]
    fn fallback_off_means_no_sysfs() {
        let mut host = FakeHost::pi()
            .vcgencmd("measure_temp", 1, "")
            .thermal_zone0();
        let families = collector(r#"{"fallback":false}"#)
            .collect(&mut host)
            .unwrap();
        assert!(!families.iter().any(|f| f.name == TEMPERATURE));
        assert!(families.iter().any(|f| f.name == THROTTLED));
    }

    #[test]
    fn vcgencmd_off_reads_only_sysfs() {
        let mut host = FakeHost::pi().thermal_zone0();
        let families = collector(r#"{"vcgencmd":null}"#)
            .collect(&mut host)
            .unwrap();
        assert_eq!(
            lines(&families),
            ["rpi_soc_temperature_celsius{sensor=\"cpu-thermal\",zone=\"thermal_zone0\"} 48.312"]
        );
        assert!(host.runs.is_empty());
        assert_eq!(host.warnings().len(), 1);
        assert!(host.warnings()[0].contains("vcgencmd is off"));
    }

    #[test]
    fn a_custom_glob_is_used() {
        let glob = "/tmp/fixtures/sys/class/thermal/thermal_zone*/temp";
        let mut host = FakeHost::default()
            .glob(
                glob,
                &["/tmp/fixtures/sys/class/thermal/thermal_zone3/temp"],
            )
            .file(
                "/tmp/fixtures/sys/class/thermal/thermal_zone3/temp",
                "61000",
            )
            .file(
                "/tmp/fixtures/sys/class/thermal/thermal_zone3/type",
                "soc-thermal",
            );
        let json = format!(r#"{{"vcgencmd":null,"thermal_glob":"{glob}"}}"#);
        let families = collector(&json).collect(&mut host).unwrap();
        assert_eq!(
            value(
                &families,
                TEMPERATURE,
                "sensor=\"soc-thermal\",zone=\"thermal_zone3\""
            ),
            Some(61.0)
        );
    }

    #[test]
    fn nothing_measurable_is_an_error_naming_every_reason() {
        let mut host = FakeHost::default().glob("/sys/class/thermal/thermal_zone*/temp", &[]);
        let mut c = collector("{}");
        let e = c.collect(&mut host).unwrap_err();
        assert!(
            e.contains("measure_temp: /usr/bin/vcgencmd: No such file"),
            "{e}"
        );
        assert!(
            e.contains("thermal fallback: no readable thermal zone"),
            "{e}"
        );
        // The glob not being granted is a reason too.
        let mut host = FakeHost::default();
        let e = c.collect(&mut host).unwrap_err();
        assert!(e.contains("thermal fallback: listing"), "{e}");
        assert!(e.contains("not granted"), "{e}");
    }

    #[test]
    fn the_log_once_memory_is_bounded() {
        let mut once = LogOnce::default();
        for i in 0..1000 {
            once.first(format!("key {i}"));
        }
        assert_eq!(once.seen.len(), MAX_LOGGED_KEYS);
        assert!(!once.first("another".into()));
    }

    #[test]
    fn describe_names_capabilities_and_defaults() {
        let d = Rpi::describe();
        assert_eq!(d.name, "rpi");
        assert_eq!(
            d.capabilities,
            [Capability::Exec, Capability::ReadFile, Capability::Log]
        );
        assert_eq!(
            Settings::parse(&d.default_settings),
            Ok(Settings::default())
        );
    }

    #[test]
    fn init_refuses_bad_settings_with_a_clear_error() {
        let e = Rpi::init(r#"{"thermal":"/x"}"#.into()).unwrap_err();
        assert!(
            e.starts_with("invalid rpi settings: unknown field `thermal`"),
            "{e}"
        );
        assert!(Rpi::init("{}".into()).is_ok());
    }
}

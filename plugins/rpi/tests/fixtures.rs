//! The fixtures (`fixtures/vcgencmd` and `fixtures/sys`) driven natively through the
//! collector: the fake vcgencmd really runs, and the thermal files are really read, much as
//! the agent would do for the wasm build. Keeps the fixtures and the parsers in step, so the
//! host-side tests built on these fixtures start from something known to work.

use std::path::{Path, PathBuf};
use std::process::Command;

use picket_plugin_rpi::settings::Settings;
use picket_plugin_rpi::{Collector, Host};
use picket_plugin_sdk::host::exec::Output;
use picket_plugin_sdk::host::log::Level;
use picket_plugin_sdk::types::{Family, HostError, Value};

/// Runs programs and reads files directly, with the agent's empty environment.
#[derive(Default)]
struct LocalHost {
    warnings: Vec<String>,
}

impl Host for LocalHost {
    fn run(&mut self, program: &str, args: &[&str]) -> Result<Output, HostError> {
        let output = Command::new(program)
            .args(args)
            .env_clear()
            .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
            .output()
            .map_err(|e| HostError::Failed(format!("{program}: {e}")))?;
        Ok(Output {
            exit_code: output.status.code(),
            stdout: output.stdout,
            stderr: output.stderr,
        })
    }

    /// Enough of a glob for `<dir>/thermal_zone*/temp`: one `*`, in one directory name.
    fn glob(&mut self, pattern: &str) -> Result<Vec<String>, HostError> {
        let (parent, rest) = pattern
            .split_once('*')
            .ok_or_else(|| HostError::Failed("no * in pattern".into()))?;
        let (parent, prefix) = parent.rsplit_once('/').unwrap_or(("", parent));
        let (suffix, file) = rest.split_once('/').unwrap_or((rest, ""));
        let mut found = Vec::new();
        let entries = std::fs::read_dir(parent).map_err(|e| HostError::Failed(e.to_string()))?;
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            let path = entry.path().join(file);
            if name.starts_with(prefix) && name.ends_with(suffix) && path.is_file() {
                found.push(path.to_string_lossy().into_owned());
            }
        }
        found.sort();
        Ok(found)
    }

    fn read(&mut self, path: &str) -> Result<Vec<u8>, HostError> {
        std::fs::read(path).map_err(|e| HostError::Failed(format!("{path}: {e}")))
    }

    fn log(&mut self, level: Level, message: &str) {
        if level == Level::Warn {
            self.warnings.push(message.to_owned());
        }
    }
}

/// A private copy of the fixtures (answers are edited per test), canonicalised as the
/// agent's symlink check would see it.
fn fixtures() -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().canonicalize().unwrap().join("fixtures");
    copy(
        &Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures"),
        &root,
    );
    (dir, root)
}

fn copy(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let target = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy(&entry.path(), &target);
        } else {
            // Keeps the executable bit of the script.
            std::fs::copy(entry.path(), &target).unwrap();
        }
    }
}

fn settings(root: &Path) -> Settings {
    let json = format!(
        r#"{{"vcgencmd":"{}/vcgencmd","thermal_glob":"{}/sys/class/thermal/thermal_zone*/temp"}}"#,
        root.display(),
        root.display()
    );
    Settings::parse(&json).unwrap()
}

fn lines(families: &[Family]) -> Vec<String> {
    let mut out = Vec::new();
    for f in families {
        for s in &f.samples {
            let labels: Vec<String> = s
                .labels
                .iter()
                .map(|l| format!("{}=\"{}\"", l.name, l.value))
                .collect();
            let Value::Number(v) = s.value else {
                panic!("not a number: {}", f.name)
            };
            out.push(format!("{}{{{}}} {v}", f.name, labels.join(",")));
        }
    }
    out
}

#[test]
fn the_fixtures_as_shipped_look_like_a_pi_4_with_a_weak_power_supply() {
    let (_dir, root) = fixtures();
    let mut host = LocalHost::default();
    let families = Collector::new(settings(&root)).collect(&mut host).unwrap();
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
    assert!(host.warnings.is_empty(), "{:?}", host.warnings);
}

#[test]
fn edited_answers_change_the_next_collection() {
    let (_dir, root) = fixtures();
    let answers = root.join("answers");
    let mut host = LocalHost::default();
    let mut collector = Collector::new(settings(&root));
    collector.collect(&mut host).unwrap();

    // VideoCore unreachable for measure_temp (as in a container), an old firmware without
    // `measure_clock`, and a Pi that ran hot earlier.
    std::fs::write(answers.join("measure_temp"), "").unwrap();
    std::fs::write(
        answers.join("measure_temp.stderr"),
        "VCHI initialization failed\n",
    )
    .unwrap();
    std::fs::write(answers.join("measure_temp.status"), "255\n").unwrap();
    std::fs::remove_file(answers.join("measure_clock_arm")).unwrap();
    std::fs::write(answers.join("get_throttled"), "throttled=0xe0000\n").unwrap();
    std::fs::write(answers.join("measure_volts_core"), "volt=1.2000V\n").unwrap();

    let families = collector.collect(&mut host).unwrap();
    let lines = lines(&families);
    assert!(lines.contains(
        &"rpi_soc_temperature_celsius{sensor=\"cpu-thermal\",zone=\"thermal_zone0\"} 48.312".into()
    ));
    assert!(lines.contains(&"rpi_throttled_raw{} 917504".into()));
    assert!(lines.contains(
        &"rpi_throttled{condition=\"soft_temperature_limit\",when=\"since_boot\"} 1".into()
    ));
    assert!(lines.contains(&"rpi_core_voltage_volts{} 1.2".into()));
    assert!(
        !lines
            .iter()
            .any(|l| l.starts_with("rpi_arm_frequency_hertz"))
    );
    assert!(lines.contains(&"rpi_vcgencmd_errors_total{command=\"measure_temp\"} 1".into()));
    assert!(lines.contains(&"rpi_vcgencmd_errors_total{command=\"measure_clock_arm\"} 1".into()));
    let warnings = host.warnings.join("\n");
    assert!(
        warnings.contains("exited with status 255: VCHI initialization failed"),
        "{warnings}"
    );
    assert!(
        warnings.contains("exited with status 2: error=2 error_msg=\"Command not registered\""),
        "{warnings}"
    );
    assert!(warnings.contains("instead (logged once)"), "{warnings}");
}

#[test]
fn without_the_program_only_the_thermal_zone_is_reported() {
    let (_dir, root) = fixtures();
    std::fs::remove_file(root.join("vcgencmd")).unwrap();
    let mut host = LocalHost::default();
    let families = Collector::new(settings(&root)).collect(&mut host).unwrap();
    assert_eq!(
        lines(&families)[0],
        "rpi_soc_temperature_celsius{sensor=\"cpu-thermal\",zone=\"thermal_zone0\"} 48.312"
    );
    assert_eq!(families.len(), 2, "temperature and the error counter");
}

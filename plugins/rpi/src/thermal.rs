//! The sysfs fallback: kernel thermal zones, for hosts where vcgencmd is missing, not granted
//! or not answering (a container without `/dev/vchiq`, a distribution without the firmware
//! tools, a non-Pi board).
//!
//! Each `temp` file holds one integer in millidegrees Celsius (`48312`); the `type` file next
//! to it names the sensor (`cpu-thermal` on a Pi). On a Pi, `/sys/class/thermal/thermal_zone0`
//! is a symlink into `/sys/devices/virtual/thermal/`, and the agent only reads through a
//! symlink whose target is granted too, so the operator grants both (see the README).

use crate::Host;
use picket_plugin_sdk::error_message;

/// One thermal zone's temperature.
#[derive(Debug, Clone, PartialEq)]
pub struct Reading {
    /// The zone's directory name, e.g. `thermal_zone0`.
    pub zone: String,
    /// The zone's `type`, e.g. `cpu-thermal`; the zone name when `type` is unreadable.
    pub sensor: String,
    pub celsius: f64,
}

/// What one pass over the zones found.
#[derive(Debug, Default, PartialEq)]
pub struct Scan {
    pub readings: Vec<Reading>,
    /// Zones (or their `type` files) that could not be read, described for the log.
    pub problems: Vec<String>,
}

/// Longest sensor name kept: kernel thermal-zone types are short identifiers.
const MAX_SENSOR_CHARS: usize = 64;

/// Lists `pattern` and reads every zone it matches. Fails only when the listing itself
/// fails; unreadable zones are skipped and described in [`Scan::problems`].
pub fn scan(host: &mut impl Host, pattern: &str) -> Result<Scan, String> {
    let paths = host
        .glob(pattern)
        .map_err(|e| format!("listing {pattern}: {}", error_message(&e)))?;
    let mut scan = Scan::default();
    for path in paths {
        let (dir, zone) = zone_of(&path);
        let celsius = match host.read(&path) {
            Ok(bytes) => match parse_millidegrees(&bytes) {
                Ok(c) => c,
                Err(e) => {
                    scan.problems.push(format!("{path}: {e}"));
                    continue;
                }
            },
            Err(e) => {
                scan.problems
                    .push(format!("reading {path}: {}", error_message(&e)));
                continue;
            }
        };
        let type_path = format!("{dir}/type");
        let sensor = match host.read(&type_path) {
            Ok(bytes) => sensor_name(&bytes).unwrap_or_else(|| zone.to_owned()),
            Err(e) => {
                // Still worth reporting the temperature; the zone name stands in.
                scan.problems
                    .push(format!("reading {type_path}: {}", error_message(&e)));
                zone.to_owned()
            }
        };
        // Two matches in differently named parents could share both labels; one series
        // per label set is all a collection may hold.
        if scan
            .readings
            .iter()
            .any(|r| r.zone == zone && r.sensor == sensor)
        {
            continue;
        }
        scan.readings.push(Reading {
            zone: zone.to_owned(),
            sensor,
            celsius,
        });
    }
    Ok(scan)
}

/// `/sys/class/thermal/thermal_zone0/temp` → (`/sys/class/thermal/thermal_zone0`,
/// `thermal_zone0`).
fn zone_of(path: &str) -> (&str, &str) {
    let dir = path.rsplit_once('/').map_or("", |(dir, _)| dir);
    let zone = dir.rsplit_once('/').map_or(dir, |(_, name)| name);
    (dir, zone)
}

/// A `temp` file's content, `48312\n` → 48.312.
pub fn parse_millidegrees(bytes: &[u8]) -> Result<f64, String> {
    let text = std::str::from_utf8(bytes)
        .map_err(|_| "expected millidegrees Celsius, got binary data".to_owned())?
        .trim();
    let digits = text.strip_prefix('-').unwrap_or(text);
    // `i64::from_str` would take a leading `+` too; the kernel never writes one.
    let plain = !digits.is_empty() && digits.bytes().all(|b| b.is_ascii_digit());
    plain
        .then(|| text.parse::<i64>().ok())
        .flatten()
        // Millidegrees are far below 2^53, so the conversion is exact.
        .map(|milli| milli as f64 / 1000.0)
        .ok_or_else(|| {
            format!(
                "expected millidegrees Celsius, got {:?}",
                crate::vcgencmd::shorten(text)
            )
        })
}

/// A `type` file's content as a label value: trimmed, restricted to the characters kernel
/// drivers use, and short. None when nothing usable is left.
pub fn sensor_name(bytes: &[u8]) -> Option<String> {
    let text = String::from_utf8_lossy(bytes);
    let name: String = text
        .trim()
        .chars()
        .filter(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        .take(MAX_SENSOR_CHARS)
        .collect();
    (!name.is_empty()).then_some(name)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tests::FakeHost;

    #[test]
    fn millidegrees() {
        assert_eq!(parse_millidegrees(b"48312\n"), Ok(48.312));
        assert_eq!(parse_millidegrees(b"0"), Ok(0.0));
        assert_eq!(parse_millidegrees(b"-5000\n"), Ok(-5.0));
        assert_eq!(parse_millidegrees(b"  85000 "), Ok(85.0));
    }

    #[test]
    fn millidegree_garbage() {
        for bad in [
            &b""[..],
            b"\n",
            b"48.3",
            b"+48312",
            b"48312 1",
            b"-",
            b"abc",
            b"99999999999999999999999",
            b"\xff\xfe",
        ] {
            assert!(parse_millidegrees(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn sensor_names() {
        assert_eq!(
            sensor_name(b"cpu-thermal\n").as_deref(),
            Some("cpu-thermal")
        );
        assert_eq!(
            sensor_name(b"x86_pkg_temp").as_deref(),
            Some("x86_pkg_temp")
        );
        assert_eq!(sensor_name(b"a\"b\x1b[31m").as_deref(), Some("ab31m"));
        assert_eq!(sensor_name(b"  \n"), None);
        assert_eq!(
            sensor_name("y".repeat(500).as_bytes()).map(|s| s.len()),
            Some(MAX_SENSOR_CHARS)
        );
    }

    #[test]
    fn zone_names() {
        assert_eq!(
            zone_of("/sys/class/thermal/thermal_zone0/temp"),
            ("/sys/class/thermal/thermal_zone0", "thermal_zone0")
        );
        assert_eq!(zone_of("temp"), ("", ""));
    }

    const GLOB: &str = "/sys/class/thermal/thermal_zone*/temp";

    #[test]
    fn reads_zones_with_their_types() {
        let mut host = FakeHost::default()
            .glob(
                GLOB,
                &[
                    "/sys/class/thermal/thermal_zone0/temp",
                    "/sys/class/thermal/thermal_zone1/temp",
                ],
            )
            .file("/sys/class/thermal/thermal_zone0/temp", "48312\n")
            .file("/sys/class/thermal/thermal_zone0/type", "cpu-thermal\n")
            .file("/sys/class/thermal/thermal_zone1/temp", "39000\n")
            .file("/sys/class/thermal/thermal_zone1/type", "gpu-thermal\n");
        let scan = scan(&mut host, GLOB);
        assert_eq!(
            scan,
            Ok(Scan {
                readings: vec![
                    Reading {
                        zone: "thermal_zone0".into(),
                        sensor: "cpu-thermal".into(),
                        celsius: 48.312,
                    },
                    Reading {
                        zone: "thermal_zone1".into(),
                        sensor: "gpu-thermal".into(),
                        celsius: 39.0,
                    },
                ],
                problems: vec![],
            })
        );
    }

    #[test]
    fn unreadable_zones_are_skipped_and_described() {
        let mut host = FakeHost::default()
            .glob(
                GLOB,
                &[
                    "/sys/class/thermal/thermal_zone0/temp",
                    "/sys/class/thermal/thermal_zone1/temp",
                    "/sys/class/thermal/thermal_zone2/temp",
                ],
            )
            // zone0: temp readable, type not granted.
            .file("/sys/class/thermal/thermal_zone0/temp", "50000")
            // zone1: a driver that answers nonsense.
            .file("/sys/class/thermal/thermal_zone1/temp", "n/a")
            .file("/sys/class/thermal/thermal_zone1/type", "acpitz");
        // zone2: temp cannot be read at all.
        let scan = scan(&mut host, GLOB).unwrap();
        assert_eq!(
            scan.readings,
            [Reading {
                zone: "thermal_zone0".into(),
                sensor: "thermal_zone0".into(),
                celsius: 50.0,
            }]
        );
        assert_eq!(scan.problems.len(), 3, "{:?}", scan.problems);
        assert!(scan.problems[0].contains("thermal_zone0/type"));
        assert!(scan.problems[1].contains("\"n/a\""));
        assert!(scan.problems[2].contains("thermal_zone2/temp"));
    }

    #[test]
    fn a_failed_listing_is_an_error() {
        let mut host = FakeHost::default();
        let e = scan(&mut host, GLOB).unwrap_err();
        assert!(e.contains("denied"), "{e}");
    }

    #[test]
    fn no_zones_is_an_empty_scan() {
        let mut host = FakeHost::default().glob(GLOB, &[]);
        assert_eq!(scan(&mut host, GLOB), Ok(Scan::default()));
    }
}

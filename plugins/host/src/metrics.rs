//! The snapshot → metric families mapping, as a pure function.
//!
//! Every name, label name and unit is node_exporter's, so dashboards and alerts written for
//! node_exporter (Grafana's "Node Exporter Full", the node-mixin alerts) work unchanged. The
//! README lists each family with the node_exporter collector it stands in for; the tests
//! check the names and label names against recorded node_exporter output.
//!
//! Families without samples are left out, as node_exporter leaves out what a host lacks.

use std::collections::{BTreeMap, BTreeSet};

use picket_plugin_sdk::families::FamilyBuilder;
use picket_plugin_sdk::host::host_stats::{Cpu, Disk, Filesystem, HwmonSensor, Snapshot};
use picket_plugin_sdk::types::Family;

use crate::filters;
use crate::settings::Config;

/// What one round produced: the families, and notes on what could not be reported as-is
/// (for the log, once each).
#[derive(Debug, Default)]
pub struct Collected {
    pub families: Vec<Family>,
    pub notes: Vec<String>,
}

/// The metric families for `snapshot` under `config`.
pub fn families(snapshot: &Snapshot, config: &Config) -> Collected {
    let mut out = Collected::default();
    let on = config.collectors;
    if on.cpu {
        cpu(&snapshot.cpus, &mut out);
    }
    if on.load {
        load(snapshot, &mut out);
    }
    if on.memory {
        memory(snapshot, &mut out);
    }
    if on.filesystem {
        filesystem(snapshot, config, &mut out);
    }
    if on.disk {
        disk(snapshot, config, &mut out);
    }
    if on.network {
        network(snapshot, config, &mut out);
    }
    if on.stat {
        stat(snapshot, &mut out);
    }
    if on.hwmon {
        hwmon(&snapshot.hwmon, &mut out);
    }
    if on.thermal {
        thermal(snapshot, &mut out);
    }
    out
}

impl Collected {
    fn add(&mut self, family: FamilyBuilder) {
        if !family.is_empty() {
            self.families.push(family.build());
        }
    }
}

/// node_exporter's `cpu` collector, plus `node_cpu_scaling_frequency_hertz` of its `cpufreq`
/// collector.
fn cpu(cpus: &[Cpu], out: &mut Collected) {
    let mut seconds = FamilyBuilder::counter(
        "node_cpu_seconds_total",
        "Seconds each CPU spent in each mode since boot.",
    );
    let mut frequency = FamilyBuilder::gauge(
        "node_cpu_scaling_frequency_hertz",
        "Current CPU frequency as set by cpufreq, in hertz.",
    );
    for c in cpus {
        // node_exporter's mode names, in /proc/stat's column order.
        let modes = [
            ("user", c.user),
            ("nice", c.nice),
            ("system", c.system),
            ("idle", c.idle),
            ("iowait", c.iowait),
            ("irq", c.irq),
            ("softirq", c.softirq),
            ("steal", c.steal),
        ];
        for (mode, value) in modes {
            seconds.sample(&[("cpu", &c.name), ("mode", mode)], value);
        }
        if let Some(hz) = c.frequency_hz {
            frequency.sample(&[("cpu", &c.name)], hz as f64);
        }
    }
    out.add(seconds);
    out.add(frequency);
}

/// node_exporter's `loadavg` collector.
fn load(snapshot: &Snapshot, out: &mut Collected) {
    // The snapshot holds zeros when /proc/loadavg could not be read, and a load of 0 is
    // also a real value: only the `unavailable` entry tells them apart.
    if mentions(&snapshot.unavailable, "loadavg") {
        return;
    }
    for (name, help, value) in [
        ("node_load1", "1m load average.", snapshot.load1),
        ("node_load5", "5m load average.", snapshot.load5),
        ("node_load15", "15m load average.", snapshot.load15),
    ] {
        let mut family = FamilyBuilder::gauge(name, help);
        family.sample(&[], value);
        out.add(family);
    }
}

fn mentions(unavailable: &[String], file: &str) -> bool {
    unavailable.iter().any(|u| u.contains(file))
}

/// /proc/meminfo lines without a unit: page counts, not kB. node_exporter names them
/// without `_bytes`, and the agent passes them on as they are.
fn is_unitless_meminfo(field: &str) -> bool {
    field.starts_with("HugePages_")
}

/// node_exporter's name for a /proc/meminfo field, or `None` when the field's name cannot
/// make a valid metric name.
///
/// The rule (node_exporter's meminfo collector): a parenthesised part becomes `_` plus its
/// contents (`Active(anon)` → `Active_anon`; the regex is `\((.*)\)`, from the first `(` to
/// the last `)`), then `_bytes` is appended to fields that have a unit, and the result is
/// prefixed with `node_memory_`.
pub fn meminfo_metric_name(field: &str) -> Option<String> {
    let renamed = match (field.find('('), field.rfind(')')) {
        (Some(open), Some(close)) if open < close => format!(
            "{}_{}{}",
            &field[..open],
            &field[open + 1..close],
            &field[close + 1..]
        ),
        _ => field.to_owned(),
    };
    let name = if is_unitless_meminfo(field) {
        format!("node_memory_{renamed}")
    } else {
        format!("node_memory_{renamed}_bytes")
    };
    let valid = !renamed.is_empty()
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':');
    valid.then_some(name)
}

/// node_exporter's `meminfo` collector: one family per /proc/meminfo field.
fn memory(snapshot: &Snapshot, out: &mut Collected) {
    let mut seen = BTreeSet::new();
    for field in &snapshot.memory {
        let Some(name) = meminfo_metric_name(&field.name) else {
            out.notes.push(format!(
                "meminfo field {:?} does not make a valid metric name; skipped",
                field.name
            ));
            continue;
        };
        if !seen.insert(name.clone()) {
            continue;
        }
        let help = format!("Memory information field {}.", field.name);
        // node_exporter types a field as a counter when its name ends in `_total`; no Linux
        // field does today, but a future one would be typed the same way.
        let mut family = if name.ends_with("_total") {
            FamilyBuilder::counter(&name, &help)
        } else {
            FamilyBuilder::gauge(&name, &help)
        };
        family.sample(&[], field.bytes as f64);
        out.add(family);
    }
}

/// One family of a per-device collector: its name, help, type, and how to read a row.
struct Column<T> {
    name: &'static str,
    help: &'static str,
    counter: bool,
    read: fn(&T) -> f64,
}

const fn gauge<T>(name: &'static str, help: &'static str, read: fn(&T) -> f64) -> Column<T> {
    Column {
        name,
        help,
        counter: false,
        read,
    }
}

const fn counter<T>(name: &'static str, help: &'static str, read: fn(&T) -> f64) -> Column<T> {
    Column {
        name,
        help,
        counter: true,
        read,
    }
}

/// One family per column, one sample per row (a row: the item and its labels).
fn add_columns<T>(columns: &[Column<T>], rows: &[(&T, Vec<(&str, &str)>)], out: &mut Collected) {
    for column in columns {
        let mut family = if column.counter {
            FamilyBuilder::counter(column.name, column.help)
        } else {
            FamilyBuilder::gauge(column.name, column.help)
        };
        for (item, labels) in rows {
            family.sample(labels, (column.read)(item));
        }
        out.add(family);
    }
}

/// node_exporter's `filesystem` collector, in name order.
const FILESYSTEM: [Column<Filesystem>; 6] = [
    gauge(
        "node_filesystem_avail_bytes",
        "Filesystem space available to non-root users in bytes.",
        |f| f.available_bytes as f64,
    ),
    gauge(
        "node_filesystem_files",
        "Filesystem total file nodes.",
        |f| f.files as f64,
    ),
    gauge(
        "node_filesystem_files_free",
        "Filesystem free file nodes.",
        |f| f.files_free as f64,
    ),
    gauge(
        "node_filesystem_free_bytes",
        "Filesystem free space in bytes.",
        |f| f.free_bytes as f64,
    ),
    gauge(
        "node_filesystem_readonly",
        "1 if the filesystem is mounted read-only, else 0.",
        |f| if f.read_only { 1.0 } else { 0.0 },
    ),
    gauge(
        "node_filesystem_size_bytes",
        "Filesystem size in bytes.",
        |f| f.size_bytes as f64,
    ),
];

fn filesystem(snapshot: &Snapshot, config: &Config, out: &mut Collected) {
    // One series per label set, the first mount winning, as in node_exporter: the same
    // device can be mounted at the same place twice (stacked mounts).
    let mut seen = BTreeSet::new();
    let rows: Vec<_> = snapshot
        .filesystems
        .iter()
        .filter(|fs| {
            !filters::any_matches(&config.fstype_exclude, &fs.fstype)
                && !config
                    .mountpoint_exclude
                    .iter()
                    .any(|prefix| filters::prefix_covers(prefix, &fs.mountpoint))
                && seen.insert((&fs.device, &fs.mountpoint, &fs.fstype))
        })
        .map(|fs| {
            let labels = vec![
                ("device", fs.device.as_str()),
                ("mountpoint", fs.mountpoint.as_str()),
                ("fstype", fs.fstype.as_str()),
            ];
            (fs, labels)
        })
        .collect();
    add_columns(&FILESYSTEM, &rows, out);
}

/// node_exporter's `diskstats` collector (the classic /proc/diskstats columns), in name
/// order.
const DISK: [Column<Disk>; 11] = [
    gauge("node_disk_io_now", "I/Os currently in progress.", |d| {
        d.io_in_progress as f64
    }),
    counter(
        "node_disk_io_time_seconds_total",
        "Seconds spent doing I/Os.",
        |d| d.io_time_seconds,
    ),
    counter(
        "node_disk_io_time_weighted_seconds_total",
        "Weighted seconds spent doing I/Os (each I/O's time times the I/Os in progress).",
        |d| d.io_time_weighted_seconds,
    ),
    counter(
        "node_disk_read_bytes_total",
        "Bytes read successfully.",
        |d| d.read_bytes as f64,
    ),
    counter(
        "node_disk_read_time_seconds_total",
        "Seconds spent by all reads.",
        |d| d.read_time_seconds,
    ),
    counter(
        "node_disk_reads_completed_total",
        "Reads completed successfully.",
        |d| d.reads_completed as f64,
    ),
    counter("node_disk_reads_merged_total", "Reads merged.", |d| {
        d.reads_merged as f64
    }),
    counter(
        "node_disk_write_time_seconds_total",
        "Seconds spent by all writes.",
        |d| d.write_time_seconds,
    ),
    counter(
        "node_disk_writes_completed_total",
        "Writes completed successfully.",
        |d| d.writes_completed as f64,
    ),
    counter("node_disk_writes_merged_total", "Writes merged.", |d| {
        d.writes_merged as f64
    }),
    counter(
        "node_disk_written_bytes_total",
        "Bytes written successfully.",
        |d| d.written_bytes as f64,
    ),
];

fn disk(snapshot: &Snapshot, config: &Config, out: &mut Collected) {
    let rows: Vec<_> = snapshot
        .disks
        .iter()
        .filter(|d| !filters::any_matches(&config.disk_exclude, &d.device))
        .map(|d| (d, vec![("device", d.device.as_str())]))
        .collect();
    add_columns(&DISK, &rows, out);
}

/// node_exporter's `netdev` collector (bytes, packets, errors and drops).
fn network(snapshot: &Snapshot, config: &Config, out: &mut Collected) {
    let mut families = [
        ("receive_bytes", "Bytes received."),
        ("receive_drop", "Received packets dropped."),
        ("receive_errs", "Receive errors."),
        ("receive_packets", "Packets received."),
        ("transmit_bytes", "Bytes transmitted."),
        ("transmit_drop", "Transmitted packets dropped."),
        ("transmit_errs", "Transmit errors."),
        ("transmit_packets", "Packets transmitted."),
    ]
    .map(|(stat, help)| {
        FamilyBuilder::counter(
            &format!("node_network_{stat}_total"),
            &format!("Network device statistic {stat}: {help}"),
        )
    });
    for n in &snapshot.networks {
        if filters::any_matches(&config.network_exclude, &n.device) {
            continue;
        }
        let labels = [("device", n.device.as_str())];
        let values = [
            n.receive_bytes,
            n.receive_drops,
            n.receive_errors,
            n.receive_packets,
            n.transmit_bytes,
            n.transmit_drops,
            n.transmit_errors,
            n.transmit_packets,
        ];
        for (family, value) in families.iter_mut().zip(values) {
            family.sample(&labels, value as f64);
        }
    }
    for family in families {
        out.add(family);
    }
}

/// node_exporter's `stat` collector (less the per-CPU part, which is `cpu` here), plus the
/// uptime under a Picket name: node_exporter has no uptime metric and dashboards compute it
/// from `node_time_seconds`, which this plugin does not report (the agent stamps samples).
fn stat(snapshot: &Snapshot, out: &mut Collected) {
    // Every /proc/stat has a boot time; zero means the agent could not read the file and
    // the other fields are zeros too, which must not reach a counter.
    if snapshot.boot_time_seconds > 0 {
        let scalars: [(&str, &str, bool, f64); 6] = [
            (
                "node_boot_time_seconds",
                "Node boot time, in seconds since the Unix epoch.",
                false,
                snapshot.boot_time_seconds as f64,
            ),
            (
                "node_context_switches_total",
                "Context switches since boot.",
                true,
                snapshot.context_switches as f64,
            ),
            (
                "node_forks_total",
                "Forks since boot.",
                true,
                snapshot.forks as f64,
            ),
            (
                "node_intr_total",
                "Interrupts serviced since boot.",
                true,
                snapshot.interrupts as f64,
            ),
            (
                "node_procs_blocked",
                "Processes blocked waiting for I/O to complete.",
                false,
                snapshot.procs_blocked as f64,
            ),
            (
                "node_procs_running",
                "Processes in runnable state.",
                false,
                snapshot.procs_running as f64,
            ),
        ];
        for (name, help, counter, value) in scalars {
            let mut family = if counter {
                FamilyBuilder::counter(name, help)
            } else {
                FamilyBuilder::gauge(name, help)
            };
            family.sample(&[], value);
            out.add(family);
        }
    }
    // A running machine has been up for more than zero seconds; zero means /proc/uptime
    // could not be read.
    if snapshot.uptime_seconds > 0.0 {
        let mut uptime = FamilyBuilder::gauge(
            "picket_host_uptime_seconds",
            "Seconds since the machine booted (/proc/uptime). Not a node_exporter metric.",
        );
        uptime.sample(&[], snapshot.uptime_seconds);
        out.add(uptime);
    }
}

/// node_exporter's name cleaning for hwmon chips: lower case, anything but `[a-z0-9:_]`
/// replaced by `_`, `_` trimmed from both ends.
pub fn clean_chip_name(name: &str) -> String {
    let replaced: String = name
        .to_lowercase()
        .chars()
        .map(|c| {
            if c.is_ascii_lowercase() || c.is_ascii_digit() || c == ':' || c == '_' {
                c
            } else {
                '_'
            }
        })
        .collect();
    replaced.trim_matches('_').to_owned()
}

/// node_exporter's `hwmon` collector, temperatures only.
///
/// The `chip` label: node_exporter names a chip after its device path where it has one
/// (`platform_coretemp_0`) and after its cleaned `name` file otherwise (`cpu_thermal` on a
/// Pi). The snapshot carries only the `name`, so that is the chip label here; dashboards
/// that show `node_hwmon_chip_names`' `chip_name` look the same.
///
/// Two chips can share a name (two NVMe drives are both `nvme`), which would give two
/// series the same labels. The agent lists a chip's inputs together, so an input name seen
/// again under the same chip name starts the next chip, reported as `nvme_1`, `nvme_2`, ...
fn hwmon(sensors: &[HwmonSensor], out: &mut Collected) {
    let mut temp = FamilyBuilder::gauge(
        "node_hwmon_temp_celsius",
        "Hardware monitor temperature input, in degrees Celsius.",
    );
    let mut sensor_label = FamilyBuilder::gauge(
        "node_hwmon_sensor_label",
        "Label of a hardware monitor input, from its _label file; always 1.",
    );
    let mut chip_names = FamilyBuilder::gauge(
        "node_hwmon_chip_names",
        "Human-readable name of a hardware monitor chip; always 1.",
    );

    // The chip being read: its cleaned name, its label and the inputs seen so far.
    let mut current: Option<(String, String, BTreeSet<&str>)> = None;
    // How many chips of each cleaned name have started.
    let mut chips: BTreeMap<String, usize> = BTreeMap::new();
    // Series already reported, against the collision below.
    let mut seen = BTreeSet::new();
    let mut named = BTreeSet::new();
    for s in sensors {
        let mut name = clean_chip_name(&s.chip);
        if name.is_empty() {
            name = "hwmon".to_owned();
        }
        let same_chip = match &current {
            Some((n, _, inputs)) => *n == name && !inputs.contains(s.sensor.as_str()),
            None => false,
        };
        if !same_chip {
            let count = chips.entry(name.clone()).or_insert(0);
            let chip = if *count == 0 {
                name.clone()
            } else {
                format!("{name}_{count}")
            };
            if *count == 1 {
                out.notes.push(format!(
                    "hwmon: more than one chip is named {name:?}; the later ones are reported as chip=\"{name}_1\", \"{name}_2\", ... in the order the agent lists them"
                ));
            }
            *count += 1;
            if named.insert(chip.clone()) {
                chip_names.sample(&[("chip", &chip), ("chip_name", &name)], 1.0);
            }
            current = Some((name, chip, BTreeSet::new()));
        }
        let Some((_, chip, inputs)) = current.as_mut() else {
            continue;
        };
        inputs.insert(s.sensor.as_str());
        // A chip literally named like a renamed one (`nvme_1`) could still collide.
        if !seen.insert((chip.clone(), s.sensor.clone())) {
            continue;
        }
        let labels = [("chip", chip.as_str()), ("sensor", s.sensor.as_str())];
        temp.sample(&labels, s.celsius);
        if let Some(label) = s.label.as_deref().filter(|l| !l.is_empty()) {
            sensor_label.sample(
                &[
                    ("chip", chip.as_str()),
                    ("sensor", s.sensor.as_str()),
                    ("label", label),
                ],
                1.0,
            );
        }
    }
    out.add(chip_names);
    out.add(sensor_label);
    out.add(temp);
}

/// node_exporter's `thermal_zone` collector.
fn thermal(snapshot: &Snapshot, out: &mut Collected) {
    let mut temp = FamilyBuilder::gauge(
        "node_thermal_zone_temp",
        "Thermal zone temperature, in degrees Celsius.",
    );
    for z in &snapshot.thermal_zones {
        temp.sample(&[("zone", &z.zone), ("type", &z.kind)], z.celsius);
    }
    out.add(temp);
}

#[cfg(test)]
pub(crate) mod tests {
    use picket_plugin_sdk::host::host_stats::{
        Disk, Filesystem, MeminfoField, Network, ThermalZone,
    };
    use picket_plugin_sdk::types::{Label, MetricKind, Value};

    use super::*;

    pub(crate) fn cpu(name: &str, base: f64, frequency_hz: Option<u64>) -> Cpu {
        Cpu {
            name: name.into(),
            user: base + 1.0,
            nice: base + 2.0,
            system: base + 3.0,
            idle: base + 4.0,
            iowait: base + 5.0,
            irq: base + 6.0,
            softirq: base + 7.0,
            steal: base + 8.0,
            frequency_hz,
        }
    }

    pub(crate) fn fs(device: &str, mountpoint: &str, fstype: &str) -> Filesystem {
        Filesystem {
            device: device.into(),
            mountpoint: mountpoint.into(),
            fstype: fstype.into(),
            size_bytes: 1000,
            free_bytes: 400,
            available_bytes: 300,
            files: 100,
            files_free: 60,
            read_only: false,
        }
    }

    pub(crate) fn disk(device: &str) -> Disk {
        Disk {
            device: device.into(),
            reads_completed: 1,
            reads_merged: 2,
            read_bytes: 3,
            read_time_seconds: 4.5,
            writes_completed: 5,
            writes_merged: 6,
            written_bytes: 7,
            write_time_seconds: 8.5,
            io_in_progress: 9,
            io_time_seconds: 10.5,
            io_time_weighted_seconds: 11.5,
        }
    }

    pub(crate) fn net(device: &str) -> Network {
        Network {
            device: device.into(),
            receive_bytes: 1,
            receive_packets: 2,
            receive_errors: 3,
            receive_drops: 4,
            transmit_bytes: 5,
            transmit_packets: 6,
            transmit_errors: 7,
            transmit_drops: 8,
        }
    }

    pub(crate) fn sensor(
        chip: &str,
        sensor: &str,
        label: Option<&str>,
        celsius: f64,
    ) -> HwmonSensor {
        HwmonSensor {
            chip: chip.into(),
            sensor: sensor.into(),
            label: label.map(Into::into),
            celsius,
        }
    }

    pub(crate) fn mem(name: &str, bytes: u64) -> MeminfoField {
        MeminfoField {
            name: name.into(),
            bytes,
        }
    }

    /// A Raspberry-Pi-like snapshot with a bit of everything.
    pub(crate) fn snapshot() -> Snapshot {
        Snapshot {
            cpus: vec![cpu("0", 0.0, Some(1_500_000_000)), cpu("1", 10.0, None)],
            load1: 0.5,
            load5: 0.25,
            load15: 0.125,
            memory: vec![
                mem("MemTotal", 8 << 30),
                mem("Active(anon)", 12 * 1024),
                mem("HugePages_Total", 4),
                mem("Committed_AS", 2048),
            ],
            filesystems: vec![
                fs("/dev/mmcblk0p2", "/", "ext4"),
                fs("/dev/mmcblk0p1", "/boot/firmware", "vfat"),
                fs("tmpfs", "/run", "tmpfs"),
                fs("devtmpfs", "/dev", "devtmpfs"),
                fs("overlay", "/var/lib/docker/overlay2/x/merged", "overlay"),
                fs("/dev/sda1", "/var/lib/docker", "ext4"),
                fs("/dev/mmcblk0p2", "/", "ext4"),
            ],
            disks: vec![
                disk("mmcblk0"),
                disk("mmcblk0p1"),
                disk("mmcblk0p2"),
                disk("sda"),
                disk("sda1"),
                disk("loop0"),
                disk("ram0"),
                disk("zram0"),
            ],
            networks: vec![net("lo"), net("eth0"), net("wlan0")],
            hwmon: vec![
                sensor("cpu_thermal", "temp1", None, 48.312),
                sensor("rp1_adc", "temp1", Some("RP1 die"), 50.0),
            ],
            thermal_zones: vec![ThermalZone {
                zone: "0".into(),
                kind: "cpu-thermal".into(),
                celsius: 48.312,
            }],
            boot_time_seconds: 1_700_000_000,
            uptime_seconds: 1234.5,
            context_switches: 111,
            forks: 222,
            interrupts: 333,
            procs_running: 3,
            procs_blocked: 1,
            unavailable: Vec::new(),
        }
    }

    pub(crate) fn find<'a>(families: &'a [Family], name: &str) -> Option<&'a Family> {
        families.iter().find(|f| f.name == name)
    }

    /// The family's samples as (labels, value), labels as `name=value` joined by `,`.
    pub(crate) fn samples(families: &[Family], name: &str) -> Vec<(String, f64)> {
        let Some(family) = find(families, name) else {
            return Vec::new();
        };
        family
            .samples
            .iter()
            .map(|s| {
                let labels: Vec<String> = s
                    .labels
                    .iter()
                    .map(|Label { name, value }| format!("{name}={value}"))
                    .collect();
                let value = match s.value {
                    Value::Number(v) => v,
                    _ => f64::NAN,
                };
                (labels.join(","), value)
            })
            .collect()
    }

    fn collect(snapshot: &Snapshot, config: &Config) -> Collected {
        families(snapshot, config)
    }

    fn config(json: &str) -> Config {
        match Config::parse(json) {
            Ok(c) => c,
            Err(e) => panic!("{e}"),
        }
    }

    fn names(families: &[Family]) -> Vec<&str> {
        families.iter().map(|f| f.name.as_str()).collect()
    }

    #[test]
    fn cpu_seconds_per_mode_and_frequency() {
        let out = collect(&snapshot(), &Config::default());
        let cpu = samples(&out.families, "node_cpu_seconds_total");
        assert_eq!(cpu.len(), 16);
        assert_eq!(cpu[0], ("cpu=0,mode=user".to_owned(), 1.0));
        assert_eq!(cpu[7], ("cpu=0,mode=steal".to_owned(), 8.0));
        let modes: Vec<&str> = cpu[8..]
            .iter()
            .map(|(l, _)| l.trim_start_matches("cpu=1,mode="))
            .collect();
        assert_eq!(
            modes,
            [
                "user", "nice", "system", "idle", "iowait", "irq", "softirq", "steal"
            ]
        );
        assert_eq!(cpu[11], ("cpu=1,mode=idle".to_owned(), 14.0));
        assert_eq!(
            find(&out.families, "node_cpu_seconds_total").map(|f| f.kind),
            Some(MetricKind::Counter)
        );
        // Only CPUs with cpufreq have a frequency.
        assert_eq!(
            samples(&out.families, "node_cpu_scaling_frequency_hertz"),
            [("cpu=0".to_owned(), 1.5e9)]
        );
    }

    #[test]
    fn no_frequency_no_family() {
        let mut s = snapshot();
        for c in &mut s.cpus {
            c.frequency_hz = None;
        }
        let out = collect(&s, &Config::default());
        assert!(find(&out.families, "node_cpu_scaling_frequency_hertz").is_none());
    }

    #[test]
    fn load_averages() {
        let out = collect(&snapshot(), &Config::default());
        assert_eq!(samples(&out.families, "node_load1"), [(String::new(), 0.5)]);
        assert_eq!(
            samples(&out.families, "node_load5"),
            [(String::new(), 0.25)]
        );
        assert_eq!(
            samples(&out.families, "node_load15"),
            [(String::new(), 0.125)]
        );
        assert_eq!(
            find(&out.families, "node_load1").map(|f| f.kind),
            Some(MetricKind::Gauge)
        );
    }

    #[test]
    fn unreadable_scalars_are_not_reported_as_zero() {
        let mut s = snapshot();
        s.load1 = 0.0;
        s.load5 = 0.0;
        s.load15 = 0.0;
        s.boot_time_seconds = 0;
        s.context_switches = 0;
        s.uptime_seconds = 0.0;
        s.unavailable = vec![
            "/proc/loadavg: No such file or directory (os error 2)".into(),
            "/proc/stat: No such file or directory (os error 2)".into(),
        ];
        let out = collect(&s, &Config::default());
        for name in [
            "node_load1",
            "node_boot_time_seconds",
            "node_context_switches_total",
            "node_procs_running",
            "picket_host_uptime_seconds",
        ] {
            assert!(find(&out.families, name).is_none(), "{name}");
        }
        assert!(find(&out.families, "node_memory_MemTotal_bytes").is_some());
    }

    #[test]
    fn meminfo_renaming() {
        for (field, metric) in [
            ("MemTotal", Some("node_memory_MemTotal_bytes")),
            ("Active(anon)", Some("node_memory_Active_anon_bytes")),
            ("Inactive(file)", Some("node_memory_Inactive_file_bytes")),
            ("NFS_Unstable", Some("node_memory_NFS_Unstable_bytes")),
            ("Committed_AS", Some("node_memory_Committed_AS_bytes")),
            ("DirectMap4k", Some("node_memory_DirectMap4k_bytes")),
            ("HugePages_Total", Some("node_memory_HugePages_Total")),
            ("HugePages_Surp", Some("node_memory_HugePages_Surp")),
            ("Hugepagesize", Some("node_memory_Hugepagesize_bytes")),
            // The regex runs from the first `(` to the last `)`, so this would be
            // `A_b)c(d`, which is no metric name: skipped.
            ("A(b)c(d)", None),
            ("Odd(", None),
            ("Has space", None),
            ("", None),
        ] {
            assert_eq!(meminfo_metric_name(field).as_deref(), metric, "{field}");
        }
        assert_eq!(
            meminfo_metric_name("Foo(bar)Baz").as_deref(),
            Some("node_memory_Foo_barBaz_bytes")
        );
    }

    #[test]
    fn memory_families() {
        let mut s = snapshot();
        s.memory.push(mem("Bad name", 1));
        s.memory.push(mem("MemTotal", 1));
        let out = collect(&s, &Config::default());
        assert_eq!(
            samples(&out.families, "node_memory_MemTotal_bytes"),
            [(String::new(), (8u64 << 30) as f64)],
            "the first of two equal names wins"
        );
        assert_eq!(
            samples(&out.families, "node_memory_Active_anon_bytes"),
            [(String::new(), 12288.0)]
        );
        assert_eq!(
            samples(&out.families, "node_memory_HugePages_Total"),
            [(String::new(), 4.0)]
        );
        let memory: Vec<&str> = names(&out.families)
            .into_iter()
            .filter(|n| n.starts_with("node_memory_"))
            .collect();
        assert_eq!(
            memory,
            [
                "node_memory_MemTotal_bytes",
                "node_memory_Active_anon_bytes",
                "node_memory_HugePages_Total",
                "node_memory_Committed_AS_bytes",
            ]
        );
        assert!(
            out.families
                .iter()
                .filter(|f| f.name.starts_with("node_memory_"))
                .all(|f| f.kind == MetricKind::Gauge)
        );
        assert_eq!(out.notes.len(), 1, "{:?}", out.notes);
        assert!(out.notes[0].contains("\"Bad name\""));
    }

    #[test]
    fn filesystems_filtered_like_node_exporter() {
        let out = collect(&snapshot(), &Config::default());
        let size = samples(&out.families, "node_filesystem_size_bytes");
        assert_eq!(
            size,
            [
                (
                    "device=/dev/mmcblk0p2,mountpoint=/,fstype=ext4".to_owned(),
                    1000.0
                ),
                (
                    "device=/dev/mmcblk0p1,mountpoint=/boot/firmware,fstype=vfat".to_owned(),
                    1000.0
                ),
                (
                    "device=tmpfs,mountpoint=/run,fstype=tmpfs".to_owned(),
                    1000.0
                ),
                // /var/lib/docker itself stays; only what is below it is left out.
                (
                    "device=/dev/sda1,mountpoint=/var/lib/docker,fstype=ext4".to_owned(),
                    1000.0
                ),
            ]
        );
        let first = |name| samples(&out.families, name).first().map(|(_, v)| *v);
        assert_eq!(first("node_filesystem_free_bytes"), Some(400.0));
        assert_eq!(first("node_filesystem_avail_bytes"), Some(300.0));
        assert_eq!(first("node_filesystem_files"), Some(100.0));
        assert_eq!(first("node_filesystem_files_free"), Some(60.0));
        assert_eq!(first("node_filesystem_readonly"), Some(0.0));
    }

    #[test]
    fn readonly_and_custom_filesystem_filters() {
        let mut s = snapshot();
        s.filesystems[1].read_only = true;
        let out = collect(&s, &Config::default());
        assert_eq!(samples(&out.families, "node_filesystem_readonly")[1].1, 1.0);
        let out = collect(
            &s,
            &config(
                r#"{"filesystem_exclude_fstypes":["tmpfs","vfat"],"filesystem_exclude_mountpoints":[]}"#,
            ),
        );
        let mounts: Vec<String> = samples(&out.families, "node_filesystem_size_bytes")
            .into_iter()
            .map(|(l, _)| l)
            .collect();
        assert_eq!(
            mounts,
            [
                "device=/dev/mmcblk0p2,mountpoint=/,fstype=ext4",
                "device=devtmpfs,mountpoint=/dev,fstype=devtmpfs",
                "device=overlay,mountpoint=/var/lib/docker/overlay2/x/merged,fstype=overlay",
                "device=/dev/sda1,mountpoint=/var/lib/docker,fstype=ext4",
            ]
        );
    }

    #[test]
    fn disks_filtered_like_node_exporter() {
        let out = collect(&snapshot(), &Config::default());
        let devices: Vec<String> = samples(&out.families, "node_disk_reads_completed_total")
            .into_iter()
            .map(|(l, _)| l)
            .collect();
        assert_eq!(
            devices,
            [
                "device=mmcblk0",
                "device=mmcblk0p1",
                "device=mmcblk0p2",
                "device=sda"
            ]
        );
        let value = |name| samples(&out.families, name).first().map(|(_, v)| *v);
        assert_eq!(value("node_disk_reads_completed_total"), Some(1.0));
        assert_eq!(value("node_disk_reads_merged_total"), Some(2.0));
        assert_eq!(value("node_disk_read_bytes_total"), Some(3.0));
        assert_eq!(value("node_disk_read_time_seconds_total"), Some(4.5));
        assert_eq!(value("node_disk_writes_completed_total"), Some(5.0));
        assert_eq!(value("node_disk_writes_merged_total"), Some(6.0));
        assert_eq!(value("node_disk_written_bytes_total"), Some(7.0));
        assert_eq!(value("node_disk_write_time_seconds_total"), Some(8.5));
        assert_eq!(value("node_disk_io_now"), Some(9.0));
        assert_eq!(value("node_disk_io_time_seconds_total"), Some(10.5));
        assert_eq!(
            value("node_disk_io_time_weighted_seconds_total"),
            Some(11.5)
        );
        assert_eq!(
            find(&out.families, "node_disk_io_now").map(|f| f.kind),
            Some(MetricKind::Gauge)
        );
        let out = collect(
            &snapshot(),
            &config(r#"{"disk_exclude":["mmcblk#p#","sd*"]}"#),
        );
        let devices: Vec<String> = samples(&out.families, "node_disk_io_now")
            .into_iter()
            .map(|(l, _)| l)
            .collect();
        assert_eq!(
            devices,
            [
                "device=mmcblk0",
                "device=loop0",
                "device=ram0",
                "device=zram0"
            ]
        );
    }

    #[test]
    fn network_keeps_lo_by_default() {
        let out = collect(&snapshot(), &Config::default());
        let value = |name: &str| samples(&out.families, name);
        assert_eq!(
            value("node_network_receive_bytes_total"),
            [
                ("device=lo".to_owned(), 1.0),
                ("device=eth0".to_owned(), 1.0),
                ("device=wlan0".to_owned(), 1.0)
            ]
        );
        assert_eq!(value("node_network_receive_packets_total")[1].1, 2.0);
        assert_eq!(value("node_network_receive_errs_total")[1].1, 3.0);
        assert_eq!(value("node_network_receive_drop_total")[1].1, 4.0);
        assert_eq!(value("node_network_transmit_bytes_total")[1].1, 5.0);
        assert_eq!(value("node_network_transmit_packets_total")[1].1, 6.0);
        assert_eq!(value("node_network_transmit_errs_total")[1].1, 7.0);
        assert_eq!(value("node_network_transmit_drop_total")[1].1, 8.0);
        let out = collect(&snapshot(), &config(r#"{"network_exclude":["lo","wl*"]}"#));
        assert_eq!(
            samples(&out.families, "node_network_transmit_drop_total"),
            [("device=eth0".to_owned(), 8.0)]
        );
    }

    #[test]
    fn stat_and_uptime() {
        let out = collect(&snapshot(), &Config::default());
        let value = |name| samples(&out.families, name);
        assert_eq!(value("node_boot_time_seconds"), [(String::new(), 1.7e9)]);
        assert_eq!(
            value("node_context_switches_total"),
            [(String::new(), 111.0)]
        );
        assert_eq!(value("node_forks_total"), [(String::new(), 222.0)]);
        assert_eq!(value("node_intr_total"), [(String::new(), 333.0)]);
        assert_eq!(value("node_procs_running"), [(String::new(), 3.0)]);
        assert_eq!(value("node_procs_blocked"), [(String::new(), 1.0)]);
        assert_eq!(
            value("picket_host_uptime_seconds"),
            [(String::new(), 1234.5)]
        );
        let kind = |name| find(&out.families, name).map(|f| f.kind);
        assert_eq!(kind("node_boot_time_seconds"), Some(MetricKind::Gauge));
        assert_eq!(kind("node_intr_total"), Some(MetricKind::Counter));
        assert_eq!(kind("node_procs_blocked"), Some(MetricKind::Gauge));
    }

    #[test]
    fn hwmon_temperatures_labels_and_chip_names() {
        let mut s = snapshot();
        s.hwmon = vec![
            sensor("coretemp", "temp1", Some("Package id 0"), 51.0),
            sensor("coretemp", "temp2", Some("Core 0"), 49.0),
            sensor("cpu_thermal", "temp1", None, 48.312),
            sensor("Weird Chip-1", "temp1", Some(""), 30.0),
        ];
        let out = collect(&s, &Config::default());
        assert_eq!(
            samples(&out.families, "node_hwmon_temp_celsius"),
            [
                ("chip=coretemp,sensor=temp1".to_owned(), 51.0),
                ("chip=coretemp,sensor=temp2".to_owned(), 49.0),
                ("chip=cpu_thermal,sensor=temp1".to_owned(), 48.312),
                ("chip=weird_chip_1,sensor=temp1".to_owned(), 30.0),
            ]
        );
        assert_eq!(
            samples(&out.families, "node_hwmon_sensor_label"),
            [
                (
                    "chip=coretemp,sensor=temp1,label=Package id 0".to_owned(),
                    1.0
                ),
                ("chip=coretemp,sensor=temp2,label=Core 0".to_owned(), 1.0),
            ]
        );
        assert_eq!(
            samples(&out.families, "node_hwmon_chip_names"),
            [
                ("chip=coretemp,chip_name=coretemp".to_owned(), 1.0),
                ("chip=cpu_thermal,chip_name=cpu_thermal".to_owned(), 1.0),
                ("chip=weird_chip_1,chip_name=weird_chip_1".to_owned(), 1.0),
            ]
        );
        assert!(out.notes.is_empty(), "{:?}", out.notes);
    }

    #[test]
    fn hwmon_chips_sharing_a_name_get_distinct_labels() {
        let mut s = snapshot();
        s.hwmon = vec![
            sensor("nvme", "temp1", Some("Composite"), 40.0),
            sensor("nvme", "temp2", Some("Sensor 1"), 41.0),
            sensor("nvme", "temp1", Some("Composite"), 42.0),
            sensor("coretemp", "temp1", None, 50.0),
            sensor("nvme", "temp1", None, 43.0),
        ];
        let out = collect(&s, &Config::default());
        assert_eq!(
            samples(&out.families, "node_hwmon_temp_celsius"),
            [
                ("chip=nvme,sensor=temp1".to_owned(), 40.0),
                ("chip=nvme,sensor=temp2".to_owned(), 41.0),
                ("chip=nvme_1,sensor=temp1".to_owned(), 42.0),
                ("chip=coretemp,sensor=temp1".to_owned(), 50.0),
                ("chip=nvme_2,sensor=temp1".to_owned(), 43.0),
            ]
        );
        assert_eq!(
            samples(&out.families, "node_hwmon_chip_names")
                .into_iter()
                .map(|(l, _)| l)
                .collect::<Vec<_>>(),
            [
                "chip=nvme,chip_name=nvme",
                "chip=nvme_1,chip_name=nvme",
                "chip=coretemp,chip_name=coretemp",
                "chip=nvme_2,chip_name=nvme",
            ]
        );
        assert_eq!(out.notes.len(), 1, "{:?}", out.notes);
        assert!(out.notes[0].contains("\"nvme\""));
    }

    #[test]
    fn thermal_zone_type_label() {
        let out = collect(&snapshot(), &Config::default());
        assert_eq!(
            samples(&out.families, "node_thermal_zone_temp"),
            [("zone=0,type=cpu-thermal".to_owned(), 48.312)]
        );
    }

    #[test]
    fn collectors_can_be_switched_off() {
        let all = collect(&snapshot(), &Config::default());
        let groups: [(&str, &[&str]); 9] = [
            ("cpu", &["node_cpu_"]),
            ("load", &["node_load"]),
            ("memory", &["node_memory_"]),
            ("filesystem", &["node_filesystem_"]),
            ("disk", &["node_disk_"]),
            ("network", &["node_network_"]),
            (
                "stat",
                &[
                    "node_boot_time_seconds",
                    "node_context_switches_total",
                    "node_forks_total",
                    "node_intr_total",
                    "node_procs_",
                    "picket_host_uptime_seconds",
                ],
            ),
            ("hwmon", &["node_hwmon_"]),
            ("thermal", &["node_thermal_zone_"]),
        ];
        // Every family belongs to exactly one group.
        for family in &all.families {
            let owners = groups
                .iter()
                .filter(|(_, prefixes)| prefixes.iter().any(|p| family.name.starts_with(p)))
                .count();
            assert_eq!(owners, 1, "{}", family.name);
        }
        for (group, prefixes) in groups {
            let off = collect(
                &snapshot(),
                &config(&format!(r#"{{"collectors":{{"{group}":false}}}}"#)),
            );
            let belongs = |name: &str| prefixes.iter().any(|p| name.starts_with(p));
            assert!(
                all.families.iter().any(|f| belongs(&f.name)),
                "{group} reports something by default"
            );
            assert!(
                !off.families.iter().any(|f| belongs(&f.name)),
                "{group} off still reports"
            );
            assert_eq!(
                off.families.len(),
                all.families.iter().filter(|f| !belongs(&f.name)).count(),
                "{group} off leaves the others alone"
            );
        }
    }

    #[test]
    fn empty_snapshot_gives_only_scalars_that_are_known() {
        let s = Snapshot {
            cpus: Vec::new(),
            load1: 0.0,
            load5: 0.0,
            load15: 0.0,
            memory: Vec::new(),
            filesystems: Vec::new(),
            disks: Vec::new(),
            networks: Vec::new(),
            hwmon: Vec::new(),
            thermal_zones: Vec::new(),
            boot_time_seconds: 0,
            uptime_seconds: 0.0,
            context_switches: 0,
            forks: 0,
            interrupts: 0,
            procs_running: 0,
            procs_blocked: 0,
            unavailable: Vec::new(),
        };
        let out = collect(&s, &Config::default());
        assert_eq!(
            names(&out.families),
            ["node_load1", "node_load5", "node_load15"]
        );
    }
}

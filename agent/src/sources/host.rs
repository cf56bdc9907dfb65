//! The built-in `host` source: CPU, memory, swap, load, filesystems, network and
//! temperatures via sysinfo, which works the same on x86_64, arm64 and armv7 Linux.
//!
//! Metric names follow node_exporter's where the meaning is the same (`node_load1`,
//! `node_memory_MemAvailable_bytes`, `node_filesystem_avail_bytes`, ...) so dashboards and
//! alert rules people already have keep working. CPU is reported as a busy ratio per core
//! because sysinfo measures usage between refreshes rather than cumulative time by mode; the
//! plugin issue's host plugin adds per-mode CPU time.

use std::collections::HashSet;

use picket_core::model::{Family, Labels, MetricType};
use sysinfo::{
    Components, CpuRefreshKind, Disks, MemoryRefreshKind, Networks, RefreshKind, System,
};

/// Filesystems that hold no user data; reporting their size only adds noise.
const PSEUDO_FILESYSTEMS: &[&str] = &[
    "tmpfs",
    "devtmpfs",
    "proc",
    "sysfs",
    "cgroup",
    "cgroup2",
    "overlay",
    "squashfs",
    "devpts",
    "mqueue",
    "debugfs",
    "tracefs",
    "securityfs",
    "pstore",
    "bpf",
    "autofs",
    "fusectl",
    "configfs",
    "hugetlbfs",
    "ramfs",
    "nsfs",
    "binfmt_misc",
    "efivarfs",
];

pub struct HostSource {
    system: System,
    disks: Disks,
    networks: Networks,
    components: Components,
    /// CPU usage needs two refreshes; the first round reports none rather than a fake 0.
    cpu_primed: bool,
}

impl HostSource {
    pub fn new() -> Self {
        let system = System::new_with_specifics(
            RefreshKind::nothing()
                .with_cpu(CpuRefreshKind::nothing().with_cpu_usage())
                .with_memory(MemoryRefreshKind::everything()),
        );
        HostSource {
            system,
            disks: Disks::new_with_refreshed_list(),
            networks: Networks::new_with_refreshed_list(),
            components: Components::new_with_refreshed_list(),
            cpu_primed: false,
        }
    }

    /// Collects one round, every point stamped `ts`. Blocking (reads /proc and /sys): run it
    /// off the async workers.
    pub fn collect(&mut self, ts: i64) -> Vec<Family> {
        self.system.refresh_cpu_usage();
        self.system.refresh_memory();
        self.disks.refresh(true);
        self.networks.refresh(true);
        self.components.refresh(true);
        let mut out = Vec::new();

        if self.cpu_primed {
            let mut cpu = Family::new(
                "host_cpu_busy_ratio",
                MetricType::Gauge,
                "Fraction of time the CPU was busy since the previous collection.",
            );
            cpu.push(
                Labels::from_pairs([("cpu", "total")]),
                ts,
                f64::from(self.system.global_cpu_usage()) / 100.0,
            );
            for (i, core) in self.system.cpus().iter().enumerate() {
                cpu.push(
                    Labels::from_pairs([("cpu", i.to_string())]),
                    ts,
                    f64::from(core.cpu_usage()) / 100.0,
                );
            }
            out.push(cpu);
        }
        self.cpu_primed = true;

        let load = System::load_average();
        for (name, value, help) in [
            ("node_load1", load.one, "1-minute load average."),
            ("node_load5", load.five, "5-minute load average."),
            ("node_load15", load.fifteen, "15-minute load average."),
        ] {
            out.push(gauge(name, help, ts, value));
        }
        let s = &self.system;
        for (name, value, help) in [
            (
                "node_memory_MemTotal_bytes",
                s.total_memory(),
                "Total memory.",
            ),
            (
                "node_memory_MemAvailable_bytes",
                s.available_memory(),
                "Memory available for new work without swapping.",
            ),
            (
                "node_memory_MemFree_bytes",
                s.free_memory(),
                "Unused memory.",
            ),
            ("node_memory_SwapTotal_bytes", s.total_swap(), "Total swap."),
            ("node_memory_SwapFree_bytes", s.free_swap(), "Unused swap."),
        ] {
            out.push(gauge(name, help, ts, value as f64));
        }
        out.push(gauge(
            "node_boot_time_seconds",
            "Boot time (Unix seconds).",
            ts,
            System::boot_time() as f64,
        ));
        out.push(gauge(
            "node_uptime_seconds",
            "Seconds since boot.",
            ts,
            System::uptime() as f64,
        ));

        out.extend(self.filesystems(ts));
        out.extend(self.network(ts));

        let mut temps = Family::new(
            "node_hwmon_temp_celsius",
            MetricType::Gauge,
            "Temperature reported by a hardware sensor.",
        );
        let mut seen = HashSet::new();
        for component in self.components.iter() {
            if let Some(t) = component.temperature().filter(|t| t.is_finite()) {
                let label = component.label().to_owned();
                // Two sensors may share a label; keep the first rather than send duplicates.
                if seen.insert(label.clone()) {
                    temps.push(Labels::from_pairs([("sensor", label)]), ts, f64::from(t));
                }
            }
        }
        if !temps.points.is_empty() {
            out.push(temps);
        }
        out
    }

    fn filesystems(&self, ts: i64) -> Vec<Family> {
        let mut size = Family::new(
            "node_filesystem_size_bytes",
            MetricType::Gauge,
            "Filesystem size.",
        );
        let mut avail = Family::new(
            "node_filesystem_avail_bytes",
            MetricType::Gauge,
            "Filesystem space available to unprivileged users.",
        );
        let mut seen = HashSet::new();
        for disk in self.disks.iter() {
            let fstype = disk.file_system().to_string_lossy().into_owned();
            if PSEUDO_FILESYSTEMS.contains(&fstype.as_str()) {
                continue;
            }
            let mountpoint = disk.mount_point().to_string_lossy().into_owned();
            if !seen.insert(mountpoint.clone()) {
                continue;
            }
            let labels = Labels::from_pairs([
                ("device", disk.name().to_string_lossy().into_owned()),
                ("fstype", fstype),
                ("mountpoint", mountpoint),
            ]);
            size.push(labels.clone(), ts, disk.total_space() as f64);
            avail.push(labels, ts, disk.available_space() as f64);
        }
        vec![size, avail]
            .into_iter()
            .filter(|f| !f.points.is_empty())
            .collect()
    }

    fn network(&self, ts: i64) -> Vec<Family> {
        let mut families = [
            ("node_network_receive_bytes_total", "Bytes received."),
            ("node_network_transmit_bytes_total", "Bytes sent."),
            ("node_network_receive_errs_total", "Receive errors."),
            ("node_network_transmit_errs_total", "Transmit errors."),
        ]
        .map(|(name, help)| Family::new(name, MetricType::Counter, help));
        let mut names: Vec<_> = self.networks.iter().collect();
        names.sort_by(|a, b| a.0.cmp(b.0));
        for (device, data) in names {
            let labels = Labels::from_pairs([("device", device.as_str())]);
            let values = [
                data.total_received(),
                data.total_transmitted(),
                data.total_errors_on_received(),
                data.total_errors_on_transmitted(),
            ];
            for (family, value) in families.iter_mut().zip(values) {
                family.push(labels.clone(), ts, value as f64);
            }
        }
        families
            .into_iter()
            .filter(|f| !f.points.is_empty())
            .collect()
    }
}

impl Default for HostSource {
    fn default() -> Self {
        Self::new()
    }
}

fn gauge(name: &str, help: &str, ts: i64, value: f64) -> Family {
    let mut f = Family::new(name, MetricType::Gauge, help);
    f.push(Labels::new(), ts, value);
    f
}

#[cfg(test)]
mod tests {
    use super::*;
    use picket_core::model::Value;

    fn value_of(families: &[Family], name: &str) -> Option<f64> {
        let f = families.iter().find(|f| f.name == name)?;
        match f.points.first()?.value {
            Value::Number(v) => Some(v),
            _ => None,
        }
    }

    #[test]
    fn reports_this_machine() {
        let mut source = HostSource::new();
        let first = source.collect(1);
        // CPU usage needs a baseline; the first round has none.
        assert!(first.iter().all(|f| f.name != "host_cpu_busy_ratio"));
        let total = value_of(&first, "node_memory_MemTotal_bytes").unwrap();
        let avail = value_of(&first, "node_memory_MemAvailable_bytes").unwrap();
        assert!(total > 0.0 && avail <= total, "total {total} avail {avail}");
        assert!(value_of(&first, "node_uptime_seconds").unwrap() > 0.0);
        assert!(first.iter().any(|f| {
            f.name == "node_network_receive_bytes_total"
                && f.points
                    .iter()
                    .any(|p| p.labels.get("device") == Some("lo"))
        }));

        std::thread::sleep(sysinfo::MINIMUM_CPU_UPDATE_INTERVAL);
        let second = source.collect(2);
        let cpu = second
            .iter()
            .find(|f| f.name == "host_cpu_busy_ratio")
            .unwrap();
        assert_eq!(cpu.points.len(), System::new_all().cpus().len() + 1);
        for p in &cpu.points {
            let Value::Number(v) = p.value else { panic!() };
            assert!((0.0..=1.0).contains(&v), "{v}");
        }
    }
}

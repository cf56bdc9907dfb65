//! The `host-stats` capability: one snapshot of the machine from /proc, /sys and statvfs.
//!
//! Read directly rather than through a portability crate because the host plugin reports
//! node_exporter's metrics (CPU seconds per mode, every meminfo field, inodes, disk I/O),
//! which only the kernel's own files carry, and all our targets are Linux. Each part is read
//! on its own: a part that cannot be read (no /sys/class/hwmon in a container) is named in
//! `unavailable` and the rest of the snapshot still arrives.

use std::ffi::CString;
use std::fs;
use std::path::Path;

use super::bindings::picket::plugin::host_stats::{
    Cpu, Disk, Filesystem, HwmonSensor, MeminfoField, Network, Snapshot, ThermalZone,
};

/// Where the kernel's files are; tests point it at a fixture tree.
pub struct Roots<'a> {
    pub proc: &'a Path,
    pub sys: &'a Path,
}

pub fn take() -> Snapshot {
    take_from(&Roots {
        proc: Path::new("/proc"),
        sys: Path::new("/sys"),
    })
}

pub fn take_from(roots: &Roots<'_>) -> Snapshot {
    let mut unavailable = Vec::new();
    let mut read = |path: &Path| match fs::read_to_string(path) {
        Ok(text) => Some(text),
        Err(e) => {
            unavailable.push(format!("{}: {e}", path.display()));
            None
        }
    };
    let stat = read(&roots.proc.join("stat"))
        .map(|t| parse_stat(&t, clock_ticks_per_second()))
        .unwrap_or_default();
    let (load1, load5, load15) = read(&roots.proc.join("loadavg"))
        .and_then(|t| parse_loadavg(&t))
        .unwrap_or_default();
    let memory = read(&roots.proc.join("meminfo"))
        .map(|t| parse_meminfo(&t))
        .unwrap_or_default();
    let disks = read(&roots.proc.join("diskstats"))
        .map(|t| parse_diskstats(&t))
        .unwrap_or_default();
    let networks = read(&roots.proc.join("net/dev"))
        .map(|t| parse_net_dev(&t))
        .unwrap_or_default();
    let uptime_seconds = read(&roots.proc.join("uptime"))
        .and_then(|t| t.split_whitespace().next()?.parse().ok())
        .unwrap_or_default();
    let mounts = read(&roots.proc.join("self/mounts"))
        .map(|t| parse_mounts(&t))
        .unwrap_or_default();
    let mut cpus = stat.cpus;
    for cpu in &mut cpus {
        let path = roots.sys.join(format!(
            "devices/system/cpu/cpu{}/cpufreq/scaling_cur_freq",
            cpu.name
        ));
        // kHz; absent on VMs and some boards, which is normal rather than unavailable.
        cpu.frequency_hz = fs::read_to_string(path)
            .ok()
            .and_then(|t| t.trim().parse::<u64>().ok())
            .map(|khz| khz * 1000);
    }
    let filesystems = mounts.into_iter().filter_map(statvfs).collect();
    Snapshot {
        cpus,
        load1,
        load5,
        load15,
        memory,
        filesystems,
        disks,
        networks,
        hwmon: hwmon(&roots.sys.join("class/hwmon")),
        thermal_zones: thermal_zones(&roots.sys.join("class/thermal")),
        boot_time_seconds: stat.boot_time,
        uptime_seconds,
        context_switches: stat.context_switches,
        forks: stat.forks,
        interrupts: stat.interrupts,
        procs_running: stat.procs_running,
        procs_blocked: stat.procs_blocked,
        unavailable,
    }
}

fn clock_ticks_per_second() -> f64 {
    // SAFETY: sysconf only reads a constant of the running system.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if ticks > 0 { ticks as f64 } else { 100.0 }
}

#[derive(Default)]
struct Stat {
    cpus: Vec<Cpu>,
    boot_time: u64,
    context_switches: u64,
    forks: u64,
    interrupts: u64,
    procs_running: u64,
    procs_blocked: u64,
}

fn parse_stat(text: &str, ticks_per_second: f64) -> Stat {
    let mut stat = Stat::default();
    for line in text.lines() {
        let mut fields = line.split_whitespace();
        let Some(key) = fields.next() else { continue };
        let first = |mut f: std::str::SplitWhitespace<'_>| {
            f.next().and_then(|v| v.parse::<u64>().ok()).unwrap_or(0)
        };
        match key {
            "btime" => stat.boot_time = first(fields),
            "ctxt" => stat.context_switches = first(fields),
            "processes" => stat.forks = first(fields),
            "intr" => stat.interrupts = first(fields),
            "procs_running" => stat.procs_running = first(fields),
            "procs_blocked" => stat.procs_blocked = first(fields),
            // `cpu` alone is the total; `cpuN` are the CPUs.
            _ if key.len() > 3 && key.starts_with("cpu") => {
                let seconds: Vec<f64> = fields
                    .map(|v| {
                        v.parse::<u64>()
                            .map_or(0.0, |t| t as f64 / ticks_per_second)
                    })
                    .collect();
                let at = |i: usize| seconds.get(i).copied().unwrap_or(0.0);
                stat.cpus.push(Cpu {
                    name: key[3..].to_owned(),
                    user: at(0),
                    nice: at(1),
                    system: at(2),
                    idle: at(3),
                    iowait: at(4),
                    irq: at(5),
                    softirq: at(6),
                    steal: at(7),
                    frequency_hz: None,
                });
            }
            _ => {}
        }
    }
    stat
}

fn parse_loadavg(text: &str) -> Option<(f64, f64, f64)> {
    let mut f = text.split_whitespace().map(|v| v.parse::<f64>().ok());
    Some((f.next()??, f.next()??, f.next()??))
}

fn parse_meminfo(text: &str) -> Vec<MeminfoField> {
    text.lines()
        .filter_map(|line| {
            let (name, rest) = line.split_once(':')?;
            let mut rest = rest.split_whitespace();
            let value: u64 = rest.next()?.parse().ok()?;
            // Sizes are in kB; counts (HugePages_Total) have no unit.
            let bytes = if rest.next() == Some("kB") {
                value.saturating_mul(1024)
            } else {
                value
            };
            Some(MeminfoField {
                name: name.trim().to_owned(),
                bytes,
            })
        })
        .collect()
}

fn parse_diskstats(text: &str) -> Vec<Disk> {
    // Sectors in /proc/diskstats are 512 bytes whatever the device's own sector size.
    const SECTOR: u64 = 512;
    text.lines()
        .filter_map(|line| {
            let f: Vec<&str> = line.split_whitespace().collect();
            let n = |i: usize| f.get(i).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
            let ms = |i: usize| n(i) as f64 / 1000.0;
            Some(Disk {
                device: (*f.get(2)?).to_owned(),
                reads_completed: n(3),
                reads_merged: n(4),
                read_bytes: n(5).saturating_mul(SECTOR),
                read_time_seconds: ms(6),
                writes_completed: n(7),
                writes_merged: n(8),
                written_bytes: n(9).saturating_mul(SECTOR),
                write_time_seconds: ms(10),
                io_in_progress: n(11),
                io_time_seconds: ms(12),
                io_time_weighted_seconds: ms(13),
            })
        })
        .collect()
}

fn parse_net_dev(text: &str) -> Vec<Network> {
    text.lines()
        .filter_map(|line| {
            let (device, counters) = line.split_once(':')?;
            let f: Vec<u64> = counters
                .split_whitespace()
                .map(|v| v.parse().unwrap_or(0))
                .collect();
            if f.len() < 16 {
                return None;
            }
            Some(Network {
                device: device.trim().to_owned(),
                receive_bytes: f[0],
                receive_packets: f[1],
                receive_errors: f[2],
                receive_drops: f[3],
                transmit_bytes: f[8],
                transmit_packets: f[9],
                transmit_errors: f[10],
                transmit_drops: f[11],
            })
        })
        .collect()
}

/// Filesystem types with nothing to measure, and network ones whose statvfs can hang for
/// minutes when the server is gone.
const SKIPPED_FSTYPES: &[&str] = &[
    "autofs",
    "binfmt_misc",
    "bpf",
    "cgroup",
    "cgroup2",
    "configfs",
    "debugfs",
    "devpts",
    "fusectl",
    "hugetlbfs",
    "mqueue",
    "nsfs",
    "proc",
    "pstore",
    "rpc_pipefs",
    "securityfs",
    "selinuxfs",
    "sysfs",
    "tracefs",
    "efivarfs",
    "nfs",
    "nfs4",
    "cifs",
    "smb3",
    "ceph",
    "smbfs",
    "afs",
    "lustre",
    "glusterfs",
    "davfs",
    "9p",
];

/// FUSE filesystems known to be local; every other `fuse.*` (sshfs, rclone, s3fs, ...) may
/// sit on a network and is skipped like NFS.
const LOCAL_FUSE: &[&str] = &["fuseblk", "fuse.ntfs-3g", "fuse.exfat", "fuse.mergerfs"];

struct Mount {
    device: String,
    mountpoint: String,
    fstype: String,
    read_only: bool,
}

fn parse_mounts(text: &str) -> Vec<Mount> {
    text.lines()
        .filter_map(|line| {
            let f: Vec<&str> = line.split_whitespace().collect();
            let (device, mountpoint, fstype, options) =
                (f.first()?, f.get(1)?, f.get(2)?, f.get(3)?);
            let remote_fuse = fstype.starts_with("fuse.") && !LOCAL_FUSE.contains(fstype);
            if SKIPPED_FSTYPES.contains(fstype) || remote_fuse {
                return None;
            }
            Some(Mount {
                device: unescape_mount_field(device),
                mountpoint: unescape_mount_field(mountpoint),
                fstype: (*fstype).to_owned(),
                read_only: options.split(',').any(|o| o == "ro"),
            })
        })
        .collect()
}

/// /proc/self/mounts writes space, tab, newline and backslash as three-digit octal escapes.
fn unescape_mount_field(field: &str) -> String {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let octal = bytes.get(i + 1..i + 4).and_then(|d| {
            let s = std::str::from_utf8(d).ok()?;
            u8::from_str_radix(s, 8).ok()
        });
        match (bytes[i], octal) {
            (b'\\', Some(c)) => {
                out.push(c);
                i += 4;
            }
            (b, _) => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn statvfs(mount: Mount) -> Option<Filesystem> {
    let path = CString::new(mount.mountpoint.as_bytes()).ok()?;
    // SAFETY: statvfs writes into the zeroed struct we own and reads the NUL-terminated path.
    let vfs = unsafe {
        let mut vfs: libc::statvfs = std::mem::zeroed();
        if libc::statvfs(path.as_ptr(), &mut vfs) != 0 {
            return None;
        }
        vfs
    };
    let block = vfs.f_frsize as u64;
    Some(Filesystem {
        device: mount.device,
        mountpoint: mount.mountpoint,
        fstype: mount.fstype,
        size_bytes: (vfs.f_blocks as u64).saturating_mul(block),
        free_bytes: (vfs.f_bfree as u64).saturating_mul(block),
        available_bytes: (vfs.f_bavail as u64).saturating_mul(block),
        files: vfs.f_files as u64,
        files_free: vfs.f_ffree as u64,
        read_only: mount.read_only,
    })
}

/// Millidegrees in a sysfs file → degrees Celsius.
fn read_millidegrees(path: &Path) -> Option<f64> {
    let milli: i64 = fs::read_to_string(path).ok()?.trim().parse().ok()?;
    Some(milli as f64 / 1000.0)
}

fn read_trimmed(path: &Path) -> Option<String> {
    Some(fs::read_to_string(path).ok()?.trim().to_owned())
}

fn sorted_entries(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut entries: Vec<_> = fs::read_dir(dir)
        .into_iter()
        .flatten()
        .filter_map(Result::ok)
        .map(|e| e.path())
        .collect();
    entries.sort();
    entries
}

fn hwmon(class: &Path) -> Vec<HwmonSensor> {
    let mut sensors = Vec::new();
    for chip_dir in sorted_entries(class) {
        let chip = read_trimmed(&chip_dir.join("name")).unwrap_or_else(|| {
            chip_dir
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default()
        });
        for input in sorted_entries(&chip_dir) {
            let Some(file) = input.file_name().and_then(|n| n.to_str()) else {
                continue;
            };
            let Some(sensor) = file
                .strip_prefix("temp")
                .and_then(|rest| rest.strip_suffix("_input"))
                .map(|n| format!("temp{n}"))
            else {
                continue;
            };
            let Some(celsius) = read_millidegrees(&input) else {
                continue;
            };
            sensors.push(HwmonSensor {
                chip: chip.clone(),
                label: read_trimmed(&chip_dir.join(format!("{sensor}_label"))),
                sensor,
                celsius,
            });
        }
    }
    sensors
}

fn thermal_zones(class: &Path) -> Vec<ThermalZone> {
    sorted_entries(class)
        .into_iter()
        .filter_map(|dir| {
            let name = dir.file_name()?.to_str()?;
            let zone = name.strip_prefix("thermal_zone")?.to_owned();
            Some(ThermalZone {
                zone,
                kind: read_trimmed(&dir.join("type")).unwrap_or_default(),
                celsius: read_millidegrees(&dir.join("temp"))?,
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_proc_stat() {
        let stat = parse_stat(
            "cpu  100 2 30 400 5 6 7 8 0 0\ncpu0 50 1 15 200 2 3 3 4 0 0\ncpu1 50 1 15 200 3 3 4 4\n\
             intr 12345 0 1\nctxt 999\nbtime 1700000000\nprocesses 4242\nprocs_running 3\nprocs_blocked 1\n",
            100.0,
        );
        assert_eq!(stat.cpus.len(), 2, "the `cpu` total line is not a CPU");
        assert_eq!(stat.cpus[1].name, "1");
        assert_eq!(stat.cpus[0].user, 0.5);
        assert_eq!(stat.cpus[1].iowait, 0.03);
        assert_eq!(stat.cpus[0].steal, 0.04);
        assert_eq!(
            (
                stat.boot_time,
                stat.context_switches,
                stat.forks,
                stat.interrupts
            ),
            (1_700_000_000, 999, 4242, 12345)
        );
        assert_eq!((stat.procs_running, stat.procs_blocked), (3, 1));
    }

    #[test]
    fn parses_meminfo_with_and_without_units() {
        let fields = parse_meminfo(
            "MemTotal:        8000 kB\nActive(anon):  12 kB\nHugePages_Total:       0\ngarbage\n",
        );
        assert_eq!(fields.len(), 3);
        assert_eq!(fields[0].name, "MemTotal");
        assert_eq!(fields[0].bytes, 8000 * 1024);
        assert_eq!(fields[1].name, "Active(anon)");
        assert_eq!(fields[2].bytes, 0);
    }

    #[test]
    fn parses_diskstats_and_net_dev() {
        let disks = parse_diskstats(
            " 179       0 mmcblk0 1000 20 8000 500 300 10 2400 900 1 1200 1400 0 0 0 0\n",
        );
        assert_eq!(disks[0].device, "mmcblk0");
        assert_eq!(disks[0].read_bytes, 8000 * 512);
        assert_eq!(disks[0].write_time_seconds, 0.9);
        assert_eq!(disks[0].io_in_progress, 1);
        assert_eq!(disks[0].io_time_weighted_seconds, 1.4);
        let nets = parse_net_dev(
            "Inter-|   Receive\n face |bytes\n  eth0: 100 2 3 4 0 0 0 0 200 5 6 7 0 0 0 0\n",
        );
        assert_eq!(nets.len(), 1);
        assert_eq!(nets[0].device, "eth0");
        assert_eq!((nets[0].receive_drops, nets[0].transmit_bytes), (4, 200));
    }

    #[test]
    fn mounts_skip_pseudo_and_network_filesystems_and_unescape() {
        let mounts = parse_mounts(
            "/dev/root / ext4 rw,noatime 0 0\nproc /proc proc rw 0 0\nsrv:/x /mnt/nfs nfs4 rw 0 0\n\
             remote: /mnt/s3 fuse.rclone rw 0 0\n\
             /dev/sda1 /media/my\\040disk vfat ro,relatime 0 0\n",
        );
        let points: Vec<_> = mounts.iter().map(|m| m.mountpoint.as_str()).collect();
        assert_eq!(points, ["/", "/media/my disk"]);
        assert!(mounts[1].read_only && !mounts[0].read_only);
    }

    #[test]
    fn a_missing_tree_is_reported_not_fatal() {
        let empty = tempfile::tempdir().unwrap();
        let snapshot = take_from(&Roots {
            proc: empty.path(),
            sys: empty.path(),
        });
        assert!(snapshot.cpus.is_empty());
        assert!(
            snapshot.unavailable.iter().any(|u| u.contains("meminfo")),
            "{:?}",
            snapshot.unavailable
        );
    }

    #[test]
    fn reads_sensors_from_sysfs() {
        let sys = tempfile::tempdir().unwrap();
        let zone = sys.path().join("class/thermal/thermal_zone0");
        let chip = sys.path().join("class/hwmon/hwmon0");
        fs::create_dir_all(&zone).unwrap();
        fs::create_dir_all(&chip).unwrap();
        fs::write(zone.join("temp"), "48312\n").unwrap();
        fs::write(zone.join("type"), "cpu-thermal\n").unwrap();
        fs::write(chip.join("name"), "coretemp\n").unwrap();
        fs::write(chip.join("temp1_input"), "51000\n").unwrap();
        fs::write(chip.join("temp1_label"), "Package id 0\n").unwrap();
        let zones = thermal_zones(&sys.path().join("class/thermal"));
        assert_eq!(
            (zones[0].zone.as_str(), zones[0].kind.as_str()),
            ("0", "cpu-thermal")
        );
        assert_eq!(zones[0].celsius, 48.312);
        let sensors = hwmon(&sys.path().join("class/hwmon"));
        assert_eq!(sensors[0].chip, "coretemp");
        assert_eq!(sensors[0].sensor, "temp1");
        assert_eq!(sensors[0].label.as_deref(), Some("Package id 0"));
        assert_eq!(sensors[0].celsius, 51.0);
    }

    #[test]
    fn this_machine_has_cpus_memory_and_a_root_filesystem() {
        let snapshot = take();
        assert!(!snapshot.cpus.is_empty(), "{:?}", snapshot.unavailable);
        assert!(
            snapshot
                .memory
                .iter()
                .any(|m| m.name == "MemTotal" && m.bytes > 0)
        );
        assert!(snapshot.boot_time_seconds > 1_000_000_000);
        assert!(snapshot.filesystems.iter().any(|f| f.size_bytes > 0));
    }
}

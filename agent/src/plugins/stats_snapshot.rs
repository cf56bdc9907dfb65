//! The `host-stats` capability: one sysinfo snapshot of the machine.

use std::sync::Mutex;

use sysinfo::{
    Components, CpuRefreshKind, Disks, MemoryRefreshKind, Networks, RefreshKind, System,
};

use super::bindings::picket::plugin::host_stats::{
    Cpu, Filesystem, Memory, Network, Sensor, Snapshot,
};

/// Kept between snapshots: CPU busy fractions are measured between two refreshes.
static SYSTEM: Mutex<Option<System>> = Mutex::new(None);

pub fn take() -> Snapshot {
    let mut guard = SYSTEM.lock().unwrap_or_else(|p| p.into_inner());
    let system = guard.get_or_insert_with(|| {
        System::new_with_specifics(
            RefreshKind::nothing()
                .with_cpu(CpuRefreshKind::nothing().with_cpu_usage().with_frequency())
                .with_memory(MemoryRefreshKind::everything()),
        )
    });
    system.refresh_cpu_all();
    system.refresh_memory();
    let load = System::load_average();
    let cpus = system
        .cpus()
        .iter()
        .enumerate()
        .map(|(i, c)| Cpu {
            name: i.to_string(),
            busy: f64::from(c.cpu_usage()) / 100.0,
            frequency_mhz: c.frequency(),
        })
        .collect();
    let filesystems = Disks::new_with_refreshed_list()
        .iter()
        .map(|d| Filesystem {
            device: d.name().to_string_lossy().into_owned(),
            mountpoint: d.mount_point().to_string_lossy().into_owned(),
            fstype: d.file_system().to_string_lossy().into_owned(),
            size_bytes: d.total_space(),
            available_bytes: d.available_space(),
        })
        .collect();
    let networks = Networks::new_with_refreshed_list()
        .iter()
        .map(|(name, n)| Network {
            device: name.clone(),
            receive_bytes: n.total_received(),
            transmit_bytes: n.total_transmitted(),
            receive_packets: n.total_packets_received(),
            transmit_packets: n.total_packets_transmitted(),
            receive_errors: n.total_errors_on_received(),
            transmit_errors: n.total_errors_on_transmitted(),
        })
        .collect();
    let sensors = Components::new_with_refreshed_list()
        .iter()
        .filter_map(|c| {
            let t = c.temperature().filter(|t| t.is_finite())?;
            Some(Sensor {
                label: c.label().to_owned(),
                celsius: f64::from(t),
            })
        })
        .collect();
    Snapshot {
        cpus,
        load1: load.one,
        load5: load.five,
        load15: load.fifteen,
        memory: Memory {
            total_bytes: system.total_memory(),
            available_bytes: system.available_memory(),
            free_bytes: system.free_memory(),
            swap_total_bytes: system.total_swap(),
            swap_free_bytes: system.free_swap(),
        },
        filesystems,
        networks,
        sensors,
        boot_time_seconds: System::boot_time(),
        uptime_seconds: System::uptime(),
    }
}

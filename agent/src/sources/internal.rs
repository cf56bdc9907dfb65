//! The built-in `internal` source: the agent's own health as `picket_agent_*` metrics.
//!
//! These answer the questions an operator has about an agent on a Pi they cannot log into:
//! is it connected, how much is waiting to be sent, and did it have to drop anything.

use picket_core::model::{Family, Labels, MetricType};

use crate::stats::AgentStats;

pub fn collect(stats: &AgentStats, ts: i64) -> Vec<Family> {
    let get = AgentStats::get;
    let one = |name: &str, kind: MetricType, help: &str, value: u64| {
        let mut f = Family::new(name, kind, help);
        f.push(Labels::new(), ts, value as f64);
        f
    };
    let mut dropped = Family::new(
        "picket_agent_dropped_samples_total",
        MetricType::Counter,
        "Samples the agent collected but could not deliver, by reason.",
    );
    for (reason, counter) in [
        ("buffer_full", &stats.dropped_samples_buffer_full),
        ("rejected", &stats.dropped_samples_rejected),
        ("shutdown", &stats.dropped_samples_shutdown),
    ] {
        dropped.push(
            Labels::from_pairs([("reason", reason)]),
            ts,
            get(counter) as f64,
        );
    }
    let mut spool_dropped = Family::new(
        "picket_agent_spool_dropped_samples_total",
        MetricType::Counter,
        "Samples dropped from the disk spool: the oldest when it was full, or records that could not be read back.",
    );
    for (reason, counter) in [
        ("full", &stats.spool_dropped_samples_full),
        ("unreadable", &stats.spool_dropped_samples_unreadable),
    ] {
        spool_dropped.push(
            Labels::from_pairs([("reason", reason)]),
            ts,
            get(counter) as f64,
        );
    }
    let mut build = Family::new(
        "picket_agent_build_info",
        MetricType::Gauge,
        "Agent version and CPU architecture.",
    );
    build.push(
        Labels::from_pairs([
            ("version", env!("CARGO_PKG_VERSION")),
            ("arch", std::env::consts::ARCH),
        ]),
        ts,
        1.0,
    );
    let mut families = vec![
        one(
            "picket_agent_collections_total",
            MetricType::Counter,
            "Collection rounds run.",
            get(&stats.collections),
        ),
        one(
            "picket_agent_collected_samples_total",
            MetricType::Counter,
            "Samples collected.",
            get(&stats.collected_samples),
        ),
        one(
            "picket_agent_batches_sent_total",
            MetricType::Counter,
            "Batches sent to an aggregator, resends included.",
            get(&stats.batches_sent),
        ),
        one(
            "picket_agent_batches_acked_total",
            MetricType::Counter,
            "Batches acknowledged by an aggregator.",
            get(&stats.batches_acked),
        ),
        one(
            "picket_agent_samples_acked_total",
            MetricType::Counter,
            "Samples acknowledged by an aggregator.",
            get(&stats.samples_acked),
        ),
        dropped,
        spool_dropped,
        one(
            "picket_agent_spool_bytes",
            MetricType::Gauge,
            "Bytes of unacknowledged batches in the disk spool.",
            get(&stats.spool_bytes),
        ),
        one(
            "picket_agent_spool_writes_total",
            MetricType::Counter,
            "Writes to the disk spool (each one write and one sync, for all due batches).",
            get(&stats.spool_writes),
        ),
        one(
            "picket_agent_spool_write_errors_total",
            MetricType::Counter,
            "Failed writes to the disk spool; the batches stayed in memory.",
            get(&stats.spool_write_errors),
        ),
        one(
            "picket_agent_spool_damaged_bytes_total",
            MetricType::Counter,
            "Bytes of spool records skipped at start-up because their checksum failed (torn writes after a power cut, damage).",
            get(&stats.spool_damaged_bytes),
        ),
        one(
            "picket_agent_pending_batches",
            MetricType::Gauge,
            "Batches waiting for an acknowledgement.",
            get(&stats.pending_batches),
        ),
        one(
            "picket_agent_pending_bytes",
            MetricType::Gauge,
            "Encoded size of batches waiting for an acknowledgement.",
            get(&stats.pending_bytes),
        ),
        one(
            "picket_agent_connected",
            MetricType::Gauge,
            "1 while a stream to an aggregator is open.",
            get(&stats.connected),
        ),
        one(
            "picket_agent_connects_total",
            MetricType::Counter,
            "Streams opened to an aggregator.",
            get(&stats.connects),
        ),
        one(
            "picket_agent_connection_failures_total",
            MetricType::Counter,
            "Failed connection attempts and broken streams.",
            get(&stats.connection_failures),
        ),
        one(
            "picket_agent_released_image_bytes_total",
            MetricType::Counter,
            "Bytes of mapped read-only pages (code, read-only data) of the agent's binary and libraries, and of plugins' compiled code mapped from a file, dropped from its resident memory once started plugins had collected; what it runs again maps back in.",
            get(&stats.released_image_bytes),
        ),
        {
            let mut f = Family::new(
                "picket_agent_collect_duration_seconds",
                MetricType::Gauge,
                "Duration of the previous collection round.",
            );
            f.push(
                Labels::new(),
                ts,
                get(&stats.last_collect_micros) as f64 / 1e6,
            );
            f
        },
        build,
    ];
    families.extend(plugin_families(stats, ts));
    families
}

/// `picket_plugin_*`: one series per plugin instance.
fn plugin_families(stats: &AgentStats, ts: i64) -> Vec<Family> {
    use crate::plugin_stats::PluginStats;
    let plugins = stats.plugins.lock().unwrap_or_else(|p| p.into_inner());
    if plugins.is_empty() {
        return Vec::new();
    }
    let mut up = Family::new(
        "picket_plugin_up",
        MetricType::Gauge,
        "1 while the plugin instance runs and its last collection succeeded.",
    );
    let mut duration = Family::new(
        "picket_plugin_collect_duration_seconds",
        MetricType::Gauge,
        "Duration of the instance's last collect call.",
    );
    let mut memory = Family::new(
        "picket_plugin_memory_bytes",
        MetricType::Gauge,
        "Linear memory the instance has grown to.",
    );
    let mut restarts = Family::new(
        "picket_plugin_restarts_total",
        MetricType::Counter,
        "Times the instance was torn down and started again.",
    );
    let mut errors = Family::new(
        "picket_plugin_errors_total",
        MetricType::Counter,
        "Plugin failures by kind: timeout, memory, trap, limit, denied, host_timeout, collect, init, instantiate, compile, log_dropped (each reported from 0).",
    );
    for (plugin, instance, s) in plugins.iter() {
        let labels = Labels::from_pairs([
            ("plugin", plugin.as_str()),
            ("plugin_instance", instance.as_str()),
        ]);
        up.push(labels.clone(), ts, PluginStats::get(&s.up) as f64);
        duration.push(
            labels.clone(),
            ts,
            PluginStats::get(&s.last_collect_micros) as f64 / 1e6,
        );
        memory.push(labels.clone(), ts, PluginStats::get(&s.memory_bytes) as f64);
        restarts.push(labels.clone(), ts, PluginStats::get(&s.restarts) as f64);
        for (kind, n) in s.errors() {
            let mut l = labels.clone();
            l.insert("kind", kind);
            errors.push(l, ts, n as f64);
        }
    }
    let mut out = vec![up, duration, memory, restarts];
    if !errors.points.is_empty() {
        out.push(errors);
    }
    out
}

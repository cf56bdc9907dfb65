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
    vec![
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
    ]
}

//! Accounting for the fault-injection suite: what an agent collected (from its own log), what
//! the aggregator accepted (its `file` journal) and what a database stored, and the report
//! table `scripts/test` prints after the tests (`<target>/fault-report.txt`).

use std::collections::{BTreeMap, BTreeSet};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::journal::Journal;
use crate::servers::Prometheus;

/// `key=value` fields of the first log line containing `message`, for every such line.
fn fields_of<'a>(
    log: &'a str,
    message: &'a str,
) -> impl Iterator<Item = BTreeMap<&'a str, &'a str>> {
    log.lines()
        .filter(move |l| l.contains(message))
        .map(|line| {
            line.split_whitespace()
                .filter_map(|token| token.split_once('='))
                .collect()
        })
}

fn number(fields: &BTreeMap<&str, &str>, key: &str) -> u64 {
    fields
        .get(key)
        .and_then(|v| v.trim_matches('"').parse().ok())
        .unwrap_or_else(|| panic!("log field {key} missing in {fields:?}"))
}

/// What one agent process said about its batches in its debug log.
#[derive(Debug, Default)]
pub struct AgentLog {
    /// sequence -> samples, for every batch sealed.
    pub sealed: BTreeMap<u64, u64>,
    /// Highest sequence written to the spool.
    pub spooled_through: u64,
    /// Highest sequence acknowledged.
    pub acked_through: u64,
    /// `collected_samples` from the "picket-agent stopped" line (clean exits only).
    pub collected_at_exit: Option<u64>,
    /// `spool_dropped` from the same line.
    pub spool_dropped_at_exit: Option<u64>,
}

impl AgentLog {
    pub fn parse(log: &str) -> AgentLog {
        let mut out = AgentLog::default();
        for f in fields_of(log, "batch sealed") {
            out.sealed
                .insert(number(&f, "sequence"), number(&f, "samples"));
        }
        for f in fields_of(log, "batches spooled") {
            out.spooled_through = out.spooled_through.max(number(&f, "through"));
        }
        for f in fields_of(log, "batches acknowledged") {
            out.acked_through = out.acked_through.max(number(&f, "through"));
        }
        if let Some(f) = fields_of(log, "picket-agent stopped").last() {
            out.collected_at_exit = Some(number(&f, "collected_samples"));
            out.spool_dropped_at_exit = Some(number(&f, "spool_dropped"));
        }
        out
    }

    pub fn read(path: &Path) -> AgentLog {
        AgentLog::parse(&std::fs::read_to_string(path).unwrap_or_default())
    }

    /// Samples in batches that reached safety before the process died: acknowledged, or in
    /// the spool (fsynced).
    pub fn durable_samples(&self) -> u64 {
        let through = self.spooled_through.max(self.acked_through);
        self.sealed.range(..=through).map(|(_, s)| s).sum()
    }

    pub fn sealed_samples(&self) -> u64 {
        self.sealed.values().sum()
    }
}

/// What the aggregator accepted from one agent: every point (stale markers included), and how
/// many were the same (series, timestamp) again.
pub struct Accepted {
    pub points: u64,
    pub duplicates: u64,
    /// Finite samples, per (series labels incl. `__name__`) → timestamps and values.
    pub finite: BTreeMap<BTreeMap<String, String>, Vec<(i64, f64)>>,
}

pub fn accepted(journal: &Journal, instance: &str) -> Accepted {
    let mut seen = BTreeSet::new();
    let mut out = Accepted {
        points: 0,
        duplicates: 0,
        finite: BTreeMap::new(),
    };
    for p in &journal.points {
        if p.labels.get("instance").map(String::as_str) != Some(instance) {
            continue;
        }
        out.points += 1;
        let mut labels = p.labels.clone();
        labels.insert("__name__".into(), p.name.clone());
        if !seen.insert((labels.clone(), p.timestamp_ms)) {
            out.duplicates += 1;
            continue;
        }
        if let Some(v) = p.value.filter(|v| v.is_finite()) {
            out.finite
                .entry(labels)
                .or_default()
                .push((p.timestamp_ms, v));
        }
    }
    for samples in out.finite.values_mut() {
        samples.sort_by_key(|s| s.0);
    }
    out
}

/// Finite samples Prometheus holds for `instance`, keyed like [`Accepted::finite`].
pub fn stored_in_prometheus(
    prom: &Prometheus,
    instance: &str,
) -> BTreeMap<BTreeMap<String, String>, Vec<(i64, f64)>> {
    prom.raw_samples(&format!("{{instance=\"{instance}\"}}"))
        .into_iter()
        .collect()
}

/// Asserts Prometheus holds exactly the finite samples the aggregator accepted for
/// `instance`, and returns how many.
pub fn assert_prometheus_has(prom: &Prometheus, instance: &str, accepted: &Accepted) -> u64 {
    let stored = stored_in_prometheus(prom, instance);
    for (series, samples) in &accepted.finite {
        assert_eq!(
            stored.get(series),
            Some(samples),
            "{instance}: Prometheus differs from what the aggregator accepted for {series:?}"
        );
    }
    let extra: Vec<_> = stored
        .keys()
        .filter(|k| !accepted.finite.contains_key(*k))
        .collect();
    assert!(
        extra.is_empty(),
        "{instance}: series nobody sent: {extra:?}"
    );
    stored.values().map(|v| v.len() as u64).sum()
}

/// One line of the fault report.
pub struct FaultRow<'a> {
    pub scenario: &'a str,
    /// Samples the agents collected.
    pub collected: u64,
    /// Samples the aggregator accepted (distinct).
    pub accepted: u64,
    /// Finite samples found in the database.
    pub stored: u64,
    pub lost: u64,
    pub duplicated: u64,
    pub recovery: Duration,
    /// What `lost` is explained by (a documented drop policy), or "".
    pub note: &'a str,
}

fn report_path() -> Option<PathBuf> {
    // <target>/debug/deps/<test binary>
    let exe = std::env::current_exe().ok()?;
    Some(exe.parent()?.parent()?.parent()?.join("fault-report.txt"))
}

/// Appends `row` to the report and prints it (visible with `--nocapture`).
pub fn report(row: &FaultRow) {
    let line = format!(
        "| {} | {} | {} | {} | {} | {} | {:.1} s | {} |",
        row.scenario,
        row.collected,
        row.accepted,
        row.stored,
        row.lost,
        row.duplicated,
        row.recovery.as_secs_f64(),
        row.note
    );
    eprintln!("{line}");
    if let Some(path) = report_path()
        && let Ok(mut file) = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
    {
        let _ = writeln!(file, "{line}");
    }
}

//! Reads the aggregator's `file` sink journal back for delivery assertions.

use std::collections::BTreeMap;
use std::path::Path;

#[derive(Debug, Clone, PartialEq)]
pub struct JournalPoint {
    pub name: String,
    pub labels: BTreeMap<String, String>,
    pub timestamp_ms: i64,
    /// `None` for a stale marker or a non-numeric value.
    pub value: Option<f64>,
}

#[derive(Debug, Default)]
pub struct Journal {
    pub points: Vec<JournalPoint>,
    /// (agent, session, sequence) of every committed batch, in file order.
    pub commits: Vec<(String, u64, u64)>,
}

pub fn read(path: &Path) -> Journal {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let mut journal = Journal::default();
    // The aggregator may be appending while a test reads: a last line without its newline
    // is still being written, not a record (every record the journal holds ends with one).
    let complete = match text.rfind('\n') {
        Some(end) => &text[..=end],
        None => "",
    };
    for line in complete.lines() {
        let v: serde_json::Value = serde_json::from_str(line)
            .unwrap_or_else(|e| panic!("journal line is not JSON ({e}): {line}"));
        if let Some(seq) = v.get("commit").and_then(|c| c.as_u64()) {
            journal.commits.push((
                v["agent"].as_str().unwrap_or_default().to_owned(),
                v["session"].as_u64().unwrap_or_default(),
                seq,
            ));
            continue;
        }
        let labels = v["labels"]
            .as_object()
            .map(|m| {
                m.iter()
                    .map(|(k, v)| (k.clone(), v.as_str().unwrap_or_default().to_owned()))
                    .collect()
            })
            .unwrap_or_default();
        journal.points.push(JournalPoint {
            name: v["name"].as_str().unwrap_or_default().to_owned(),
            labels,
            timestamp_ms: v["timestamp_ms"].as_i64().unwrap_or_default(),
            value: v["value"].as_f64(),
        });
    }
    journal
}

impl Journal {
    /// Points of one series (by name and `instance`), in journal order.
    pub fn series(&self, name: &str, instance: &str) -> Vec<&JournalPoint> {
        self.points
            .iter()
            .filter(|p| {
                p.name == name && p.labels.get("instance").map(String::as_str) == Some(instance)
            })
            .collect()
    }

    /// Asserts that within every series timestamps strictly increase: nothing arrived twice
    /// and nothing out of order.
    pub fn assert_each_series_once_in_order(&self) {
        let mut last: BTreeMap<(String, Vec<(String, String)>), i64> = BTreeMap::new();
        for p in &self.points {
            let key = (
                p.name.clone(),
                p.labels.clone().into_iter().collect::<Vec<_>>(),
            );
            if let Some(&prev) = last.get(&key) {
                assert!(
                    p.timestamp_ms > prev,
                    "series {} {:?}: timestamp {} after {} (duplicate or out of order)",
                    p.name,
                    p.labels,
                    p.timestamp_ms,
                    prev
                );
            }
            last.insert(key, p.timestamp_ms);
        }
    }
}

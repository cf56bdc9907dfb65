//! The parts of the Flink REST API responses this plugin reads, as serde structs.
//!
//! Flink's REST output is loose in practice: metric values in `/metrics?get=` answers are JSON
//! strings (`"50000"`, `"0.0"`, `"NaN"`), aggregated metrics put the string `"NaN"` where a
//! number usually is, fields come and go between versions, and a job that has not started
//! yet has `null` where objects are expected. So every field is optional, numbers go through
//! [`lenient_f64`] (number, numeric string, or nothing), and unknown fields are ignored. One
//! odd field then costs one metric, not the whole response. The shapes were taken from real
//! Flink 2.3 responses (`fixtures/`).

use serde::{Deserialize, Deserializer};
use serde_json::Value;

/// `GET /overview`: cluster-wide counts.
#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub struct Overview {
    #[serde(deserialize_with = "lenient_f64")]
    pub taskmanagers: Option<f64>,
    #[serde(rename = "slots-total", deserialize_with = "lenient_f64")]
    pub slots_total: Option<f64>,
    #[serde(rename = "slots-available", deserialize_with = "lenient_f64")]
    pub slots_available: Option<f64>,
    #[serde(rename = "flink-version", deserialize_with = "lenient_string")]
    pub flink_version: Option<String>,
    #[serde(rename = "flink-commit", deserialize_with = "lenient_string")]
    pub flink_commit: Option<String>,
}

/// `GET /jobs/overview`: every job the JobManager still knows, terminal ones included until
/// they expire from its job store.
#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub struct JobsOverview {
    #[serde(deserialize_with = "lenient_vec")]
    pub jobs: Vec<JobSummary>,
}

#[derive(Debug, Default, Clone, Deserialize)]
#[serde(default)]
pub struct JobSummary {
    #[serde(deserialize_with = "lenient_string")]
    pub jid: Option<String>,
    #[serde(deserialize_with = "lenient_string")]
    pub name: Option<String>,
    /// Upper case, e.g. `RUNNING`, `CANCELED`; may be a state this plugin has never heard of.
    #[serde(deserialize_with = "lenient_string")]
    pub state: Option<String>,
    /// Milliseconds since the epoch.
    #[serde(rename = "start-time", deserialize_with = "lenient_f64")]
    pub start_time: Option<f64>,
}

/// `GET /jobs/<id>`: the job's vertices (the tasks of the job graph after chaining).
#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub struct JobDetails {
    #[serde(deserialize_with = "lenient_string")]
    pub state: Option<String>,
    #[serde(deserialize_with = "lenient_vec")]
    pub vertices: Vec<Vertex>,
}

#[derive(Debug, Default, Clone, Deserialize)]
#[serde(default)]
pub struct Vertex {
    #[serde(deserialize_with = "lenient_string")]
    pub id: Option<String>,
    #[serde(deserialize_with = "lenient_string")]
    pub name: Option<String>,
    #[serde(deserialize_with = "lenient_f64")]
    pub parallelism: Option<f64>,
    /// Execution state of the vertex, e.g. `RUNNING`, `FINISHED` (a bounded source).
    #[serde(deserialize_with = "lenient_string")]
    pub status: Option<String>,
}

/// `GET /jobs/<id>/checkpoints`: checkpoint statistics.
#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub struct Checkpoints {
    #[serde(deserialize_with = "lenient_option")]
    pub counts: Option<CheckpointCounts>,
    #[serde(deserialize_with = "lenient_option")]
    pub latest: Option<LatestCheckpoints>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub struct CheckpointCounts {
    #[serde(deserialize_with = "lenient_f64")]
    pub restored: Option<f64>,
    #[serde(deserialize_with = "lenient_f64")]
    pub total: Option<f64>,
    #[serde(deserialize_with = "lenient_f64")]
    pub in_progress: Option<f64>,
    #[serde(deserialize_with = "lenient_f64")]
    pub completed: Option<f64>,
    #[serde(deserialize_with = "lenient_f64")]
    pub failed: Option<f64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub struct LatestCheckpoints {
    /// `null` until the first checkpoint completes.
    #[serde(deserialize_with = "lenient_option")]
    pub completed: Option<CompletedCheckpoint>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub struct CompletedCheckpoint {
    #[serde(deserialize_with = "lenient_f64")]
    pub id: Option<f64>,
    /// Milliseconds from trigger to the last acknowledgement.
    #[serde(deserialize_with = "lenient_f64")]
    pub end_to_end_duration: Option<f64>,
    /// Bytes written by this checkpoint (the increment, for incremental checkpoints).
    #[serde(deserialize_with = "lenient_f64")]
    pub checkpointed_size: Option<f64>,
    /// Bytes of the complete state this checkpoint represents.
    #[serde(deserialize_with = "lenient_f64")]
    pub state_size: Option<f64>,
    /// Milliseconds since the epoch.
    #[serde(deserialize_with = "lenient_f64")]
    pub latest_ack_timestamp: Option<f64>,
}

/// One entry of a `.../metrics?get=a,b` answer (job, vertex or TaskManager scope):
/// `{"id":"uptime","value":"50739"}`. The value is a string in every Flink version seen.
#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub struct MetricValue {
    #[serde(deserialize_with = "lenient_string")]
    pub id: Option<String>,
    #[serde(deserialize_with = "lenient_f64")]
    pub value: Option<f64>,
}

/// One entry of an aggregated answer (`.../subtasks/metrics?get=...`): the metric over all
/// subtasks of a vertex.
#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub struct AggregatedMetric {
    #[serde(deserialize_with = "lenient_string")]
    pub id: Option<String>,
    #[serde(deserialize_with = "lenient_f64")]
    pub min: Option<f64>,
    #[serde(deserialize_with = "lenient_f64")]
    pub max: Option<f64>,
    #[serde(deserialize_with = "lenient_f64")]
    pub avg: Option<f64>,
    #[serde(deserialize_with = "lenient_f64")]
    pub sum: Option<f64>,
}

/// `GET /jobs/<id>/vertices/<vid>/backpressure`.
///
/// Flink 2.3 sends the level twice, as `backpressureLevel` and `backpressure-level`. They are
/// separate fields here: a serde alias would make the second occurrence a "duplicate field"
/// error.
#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub struct Backpressure {
    /// `ok` when the numbers are valid; older Flink versions answer `deprecated` while a
    /// sample is being taken.
    #[serde(deserialize_with = "lenient_string")]
    pub status: Option<String>,
    #[serde(rename = "backpressure-level", deserialize_with = "lenient_string")]
    level_dashed: Option<String>,
    #[serde(rename = "backpressureLevel", deserialize_with = "lenient_string")]
    level_camel: Option<String>,
    #[serde(deserialize_with = "lenient_vec")]
    pub subtasks: Vec<SubtaskBackpressure>,
}

impl Backpressure {
    /// `ok`, `low` or `high` (lower case as Flink sends it), whichever spelling carried it.
    pub fn level(&self) -> Option<&str> {
        self.level_dashed.as_deref().or(self.level_camel.as_deref())
    }
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub struct SubtaskBackpressure {
    #[serde(deserialize_with = "lenient_f64")]
    pub subtask: Option<f64>,
    /// Fraction of time back-pressured, 0..1.
    #[serde(deserialize_with = "lenient_f64")]
    pub ratio: Option<f64>,
}

/// The body of a non-2xx answer: `{"errors":["<exception>: <message>\n\tat ..."]}`.
#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub struct ErrorBody {
    #[serde(deserialize_with = "lenient_vec")]
    pub errors: Vec<String>,
}

/// The gist of an error body: the first line of the first error (Flink appends a whole Java
/// stack trace), capped so it fits a log line. `None` if the body is not Flink's error JSON.
pub fn error_summary(body: &[u8]) -> Option<String> {
    let parsed: ErrorBody = serde_json::from_slice(body).ok()?;
    let first = parsed.errors.first()?.lines().next()?.trim();
    if first.is_empty() {
        return None;
    }
    Some(truncate(first, 300).to_owned())
}

/// At most `max` bytes of `s`, cut at a character boundary.
pub fn truncate(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

/// A number from a JSON number or a numeric string; `None` for anything else (missing, null,
/// `""`, an object). `"NaN"` and `"Infinity"` parse to the IEEE values: Flink uses them, and
/// callers decide what to do with them.
fn lenient_f64<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Option<f64>, D::Error> {
    Ok(number(&Value::deserialize(deserializer)?))
}

/// The number in a JSON value, as [`lenient_f64`] reads it.
pub fn number(value: &Value) -> Option<f64> {
    match value {
        Value::Number(n) => n.as_f64(),
        Value::String(s) => s.trim().parse::<f64>().ok(),
        _ => None,
    }
}

/// A string from a JSON string, or a number/bool rendered as text (ids have been numbers in
/// hand-written proxies); `None` for null, objects and arrays.
fn lenient_string<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Option<String>, D::Error> {
    Ok(match Value::deserialize(deserializer)? {
        Value::String(s) => Some(s),
        Value::Number(n) => Some(n.to_string()),
        Value::Bool(b) => Some(b.to_string()),
        _ => None,
    })
}

/// A list whose unreadable elements are dropped; `null` or a non-list is an empty list.
fn lenient_vec<'de, D, T>(deserializer: D) -> Result<Vec<T>, D::Error>
where
    D: Deserializer<'de>,
    T: serde::de::DeserializeOwned,
{
    Ok(match Value::deserialize(deserializer)? {
        Value::Array(items) => items
            .into_iter()
            .filter_map(|item| serde_json::from_value(item).ok())
            .collect(),
        _ => Vec::new(),
    })
}

/// A nested object, or `None` when it is null, not an object, or not of the expected shape.
fn lenient_option<'de, D, T>(deserializer: D) -> Result<Option<T>, D::Error>
where
    D: Deserializer<'de>,
    T: serde::de::DeserializeOwned,
{
    Ok(match Value::deserialize(deserializer)? {
        // Only objects: a list would otherwise fill the struct positionally.
        value @ Value::Object(_) => serde_json::from_value(value).ok(),
        _ => None,
    })
}

/// Parses a response body that must be a JSON object as `T`, with the serde error as a
/// readable message. The object check matters: serde would also fill a struct from a JSON
/// list, field by field, and take `[1,2]` for an overview with one TaskManager and two slots.
pub fn parse<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, String> {
    let value: Value = serde_json::from_slice(body).map_err(|e| format!("unexpected JSON: {e}"))?;
    if !value.is_object() {
        return Err(format!(
            "unexpected JSON: expected an object, got {}",
            kind_of(&value)
        ));
    }
    serde_json::from_value(value).map_err(|e| format!("unexpected JSON: {e}"))
}

/// Parses a top-level JSON list (the `/metrics?get=` answers), dropping elements that are not
/// of the expected shape rather than failing the whole list.
pub fn parse_list<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<Vec<T>, String> {
    let value: Value = serde_json::from_slice(body).map_err(|e| format!("unexpected JSON: {e}"))?;
    match value {
        Value::Array(items) => Ok(items
            .into_iter()
            .filter_map(|item| serde_json::from_value(item).ok())
            .collect()),
        other => Err(format!(
            "unexpected JSON: expected a list, got {}",
            kind_of(&other)
        )),
    }
}

fn kind_of(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "a list",
        Value::Object(_) => "an object",
    }
}

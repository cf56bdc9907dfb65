//! The `file` sink: a JSON-lines journal of every accepted sample.
//!
//! Each batch is written as one line per point followed by a commit line naming the batch
//! (agent, session, sequence), all in a single `write`. On start the sink reads its journal
//! back: a torn tail (the process died mid-write, or the power went) is cut off at the last
//! commit line, and the committed (agent, session) → sequence high-water marks are recovered.
//! A batch the agent resends because the aggregator died before acking it is therefore
//! recognised and written once, even across aggregator restarts.

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use picket_core::model::{Family, Value};
use serde::{Deserialize, Serialize};

#[derive(Debug, thiserror::Error)]
pub enum FileSinkError {
    #[error("file sink {0}: not a regular file (the journal is read back at start-up)")]
    NotAFile(PathBuf),
    #[error("file sink {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// Sessions remembered per agent. An agent starts a new session each time its process starts;
/// only the last few can still have batches in flight, and keeping all of them would let a
/// crash-looping agent grow this map forever.
const SESSIONS_PER_AGENT: usize = 8;

/// Per agent, the highest committed sequence of its most recent sessions (oldest first).
#[derive(Default)]
struct HighWaterMarks(HashMap<String, Vec<(u64, u64)>>);

impl HighWaterMarks {
    fn get(&self, agent: &str, session: u64) -> Option<u64> {
        let sessions = self.0.get(agent)?;
        sessions
            .iter()
            .find(|(s, _)| *s == session)
            .map(|(_, seq)| *seq)
    }

    fn record(&mut self, agent: &str, session: u64, sequence: u64) {
        let sessions = self.0.entry(agent.to_owned()).or_default();
        let previous = match sessions.iter().position(|(s, _)| *s == session) {
            Some(i) => sessions.remove(i).1,
            None => 0,
        };
        sessions.push((session, previous.max(sequence)));
        if sessions.len() > SESSIONS_PER_AGENT {
            sessions.remove(0);
        }
    }
}

pub struct FileSink {
    path: PathBuf,
    file: File,
    fsync: bool,
    /// Length of the journal up to the last committed batch; a failed write is cut back to it.
    len: u64,
    committed: HighWaterMarks,
}

/// One point as written to the journal.
#[derive(Serialize, Deserialize)]
struct PointLine<'a> {
    name: &'a str,
    #[serde(rename = "type")]
    kind: &'a str,
    labels: std::collections::BTreeMap<&'a str, &'a str>,
    timestamp_ms: i64,
    /// Numbers for gauges and counters; `null` marks a stale series; summaries and
    /// histograms are objects.
    value: serde_json::Value,
}

#[derive(Serialize, Deserialize)]
struct CommitLine {
    commit: u64,
    agent: String,
    session: u64,
    samples: usize,
}

impl FileSink {
    pub fn open(path: &Path, fsync: bool) -> Result<Self, FileSinkError> {
        let io = |source| FileSinkError::Io {
            path: path.to_owned(),
            source,
        };
        let mut file = OpenOptions::new()
            .read(true)
            .append(true)
            .create(true)
            .open(path)
            .map_err(io)?;
        if !file.metadata().map_err(io)?.is_file() {
            // Recovery reads the journal back; a device or FIFO would never end.
            return Err(FileSinkError::NotAFile(path.to_owned()));
        }
        let (committed, good_len) = recover(&file).map_err(io)?;
        let len = file.metadata().map_err(io)?.len();
        if good_len < len {
            tracing::warn!(
                path = %path.display(),
                bytes = len - good_len,
                "file sink: cutting off an uncommitted tail left by an interrupted write"
            );
            file.set_len(good_len).map_err(io)?;
            file.seek(SeekFrom::End(0)).map_err(io)?;
        }
        Ok(FileSink {
            path: path.to_owned(),
            file,
            fsync,
            len: good_len,
            committed,
        })
    }

    /// True when this batch is already in the journal.
    pub fn has(&self, agent: &str, session: u64, sequence: u64) -> bool {
        self.committed
            .get(agent, session)
            .is_some_and(|last| sequence <= last)
    }

    /// Appends a batch. Returns without writing when the batch is already journaled.
    pub fn write_batch(
        &mut self,
        agent: &str,
        session: u64,
        sequence: u64,
        families: &[Family],
    ) -> Result<(), FileSinkError> {
        if self.has(agent, session, sequence) {
            return Ok(());
        }
        let mut buf = Vec::with_capacity(4096);
        let mut samples = 0;
        for family in families {
            for point in &family.points {
                let line = PointLine {
                    name: &family.name,
                    kind: family.kind.as_str(),
                    labels: point.labels.iter().collect(),
                    timestamp_ms: point.timestamp_ms,
                    value: json_value(&point.value),
                };
                samples += point.value.sample_count();
                // Serialising our own structs to a Vec cannot fail.
                let _ = serde_json::to_writer(&mut buf, &line);
                buf.push(b'\n');
            }
        }
        let commit = CommitLine {
            commit: sequence,
            agent: agent.to_owned(),
            session,
            samples,
        };
        let _ = serde_json::to_writer(&mut buf, &commit);
        buf.push(b'\n');
        let io = |source| FileSinkError::Io {
            path: self.path.clone(),
            source,
        };
        let written = self.file.write_all(&buf).and_then(|()| {
            if self.fsync {
                self.file.sync_data()
            } else {
                Ok(())
            }
        });
        if let Err(e) = written {
            // Cut off whatever part of the batch made it (a full disk stops a write midway;
            // after a failed fsync the data's fate is unknown), so the agent's resend is the
            // only copy.
            if let Err(truncate) = self.file.set_len(self.len) {
                tracing::error!(path = %self.path.display(), error = %truncate,
                    "file sink: cannot cut off a failed write; the journal may hold a partial batch");
            }
            return Err(io(e));
        }
        self.len += buf.len() as u64;
        self.committed.record(agent, session, sequence);
        Ok(())
    }
}

#[cfg(test)]
impl FileSink {
    /// Swaps the journal handle for a read-only one, so every write fails as on a full disk.
    pub(crate) fn fail_writes_for_test(&mut self) {
        self.file = OpenOptions::new()
            .read(true)
            .open(&self.path)
            .expect("reopen journal read-only");
    }
}

fn json_value(value: &Value) -> serde_json::Value {
    use serde_json::json;
    let num = |v: f64| {
        serde_json::Number::from_f64(v).map_or_else(
            || serde_json::Value::String(picket_core::exposition::format_float(v)),
            serde_json::Value::Number,
        )
    };
    match value {
        Value::Number(v) => num(*v),
        Value::Stale => serde_json::Value::Null,
        Value::Summary(s) => json!({
            "count": s.count,
            "sum": num(s.sum),
            "quantiles": s.quantiles.iter().map(|(q, v)| json!([num(*q), num(*v)])).collect::<Vec<_>>(),
        }),
        Value::Histogram(h) => json!({
            "count": h.count,
            "sum": num(h.sum),
            "buckets": h.buckets.iter().map(|(le, c)| json!([num(*le), c])).collect::<Vec<_>>(),
        }),
    }
}

/// Reads the journal: committed high-water marks and the length up to the last commit line.
fn recover(file: &File) -> std::io::Result<(HighWaterMarks, u64)> {
    let mut reader = BufReader::new(file);
    reader.seek(SeekFrom::Start(0))?;
    let mut committed = HighWaterMarks::default();
    let mut offset = 0u64;
    let mut good_len = 0u64;
    let mut line = Vec::new();
    loop {
        line.clear();
        let n = reader.read_until(b'\n', &mut line)?;
        if n == 0 {
            break;
        }
        offset += n as u64;
        if line.last() != Some(&b'\n') {
            break;
        }
        if line.starts_with(b"{\"commit\":")
            && let Ok(c) = serde_json::from_slice::<CommitLine>(&line)
        {
            committed.record(&c.agent, c.session, c.commit);
            good_len = offset;
        }
    }
    Ok((committed, good_len))
}

#[cfg(test)]
mod tests {
    use super::*;
    use picket_core::model::{Labels, MetricType};

    fn family(v: f64) -> Family {
        let mut f = Family::new("m", MetricType::Gauge, "");
        f.push(Labels::from_pairs([("instance", "pi")]), 1000, v);
        f
    }

    #[test]
    fn refuses_special_files() {
        assert!(matches!(
            FileSink::open(Path::new("/dev/null"), false),
            Err(FileSinkError::NotAFile(_))
        ));
    }

    #[test]
    fn remembers_a_bounded_number_of_sessions_per_agent() {
        let mut marks = HighWaterMarks::default();
        for session in 1..=20 {
            marks.record("pi", session, 5);
        }
        assert_eq!(marks.0["pi"].len(), SESSIONS_PER_AGENT);
        assert_eq!(marks.get("pi", 20), Some(5));
        assert_eq!(marks.get("pi", 1), None);
        marks.record("pi", 20, 3);
        assert_eq!(
            marks.get("pi", 20),
            Some(5),
            "a high-water mark never goes back"
        );
    }

    #[test]
    fn recovers_commits_and_cuts_torn_tail() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("j.jsonl");
        {
            let mut sink = FileSink::open(&path, false).unwrap();
            sink.write_batch("pi", 7, 1, &[family(1.0)]).unwrap();
            sink.write_batch("pi", 7, 2, &[family(2.0)]).unwrap();
        }
        let good = std::fs::metadata(&path).unwrap().len();
        // A batch whose point line made it but whose commit did not, then half a line.
        let mut f = OpenOptions::new().append(true).open(&path).unwrap();
        f.write_all(b"{\"name\":\"m\",\"type\":\"gauge\",\"labels\":{},\"timestamp_ms\":1,\"value\":3}\n{\"na")
            .unwrap();
        drop(f);

        let mut sink = FileSink::open(&path, false).unwrap();
        assert_eq!(std::fs::metadata(&path).unwrap().len(), good);
        assert!(sink.has("pi", 7, 2));
        assert!(!sink.has("pi", 7, 3));
        assert!(!sink.has("pi", 8, 1));
        // A resend of batch 2 is not written again; batch 3 is.
        sink.write_batch("pi", 7, 2, &[family(2.0)]).unwrap();
        sink.write_batch("pi", 7, 3, &[family(3.0)]).unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        assert_eq!(text.matches("\"commit\"").count(), 3);
        assert_eq!(text.matches("\"value\":2").count(), 1);
    }
}

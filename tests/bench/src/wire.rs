//! What the simulated agents send, encoded once and patched per round.
//!
//! A load generator that encodes every batch from scratch spends as much CPU as the
//! aggregator it measures, on the same two cores. So each simulated agent encodes its batch
//! (or its remote-write request, for the peers) once, remembers where every point's
//! timestamp and value sit in the bytes, and per round only overwrites those. Every number is
//! encoded canonically: a millisecond timestamp between 2^35 and 2^42 (1971 to 2109) is
//! always a 6-byte varint, so patching never changes a length.

use bytes::{BufMut, Bytes, BytesMut};

/// Flink metric names the generated series use, as Flink's PrometheusReporter names them.
const FLINK_FAMILIES: [&str; 8] = [
    "flink_taskmanager_job_task_operator_numRecordsIn",
    "flink_taskmanager_job_task_operator_numRecordsOut",
    "flink_taskmanager_job_task_numBytesInPerSecond",
    "flink_taskmanager_job_task_busyTimeMsPerSecond",
    "flink_taskmanager_job_task_backPressuredTimeMsPerSecond",
    "flink_taskmanager_job_task_operator_currentOutputWatermark",
    "flink_taskmanager_Status_JVM_Memory_Heap_Used",
    "flink_taskmanager_job_task_checkpointAlignmentTime",
];

/// The shape of one simulated agent's series.
#[derive(Clone, Copy, Debug)]
pub struct SeriesShape {
    /// Series (one sample each) per batch.
    pub series: usize,
    /// Distinct jobs the series spread over (label cardinality per agent).
    pub jobs: usize,
}

/// One series: metric name and label pairs (without `instance`, which is common).
pub struct SeriesLabels {
    pub name: &'static str,
    pub labels: Vec<(&'static str, String)>,
}

/// The series of agent `agent`: Flink-like label sets (job, task, operator, subtask, task
/// manager), unique per agent.
pub fn flink_like_series(agent: usize, shape: SeriesShape) -> Vec<SeriesLabels> {
    let jobs = shape.jobs.max(1);
    (0..shape.series)
        .map(|i| {
            let family = FLINK_FAMILIES[i % FLINK_FAMILIES.len()];
            let slot = i / FLINK_FAMILIES.len();
            let job = slot % jobs;
            let subtask = slot / jobs;
            SeriesLabels {
                name: family,
                labels: vec![
                    (
                        "job_id",
                        format!("{:032x}", (agent as u128) << 64 | job as u128),
                    ),
                    ("job_name", format!("clickstream-enrichment-{job}")),
                    (
                        "operator_name",
                        format!("Window(TumblingEventTimeWindows)_{}", job % 7),
                    ),
                    ("subtask_index", subtask.to_string()),
                    ("task_name", format!("Source:_kafka-{}_->_Map", job % 5)),
                    ("tm_id", format!("tm-{agent}-{}", subtask % 4)),
                ],
            }
        })
        .collect()
}

/// Encoded bytes plus where each point's timestamp (6-byte varint) and value (little-endian
/// f64) are.
pub struct Template {
    pub bytes: Vec<u8>,
    /// (timestamp offset, value offset) per point.
    points: Vec<(usize, usize)>,
}

impl Template {
    /// Sets every point to `timestamp_ms` and `value + point index`.
    pub fn patch(&mut self, timestamp_ms: i64, value: f64) {
        let mut ts = [0u8; 6];
        encode_fixed_width_varint(timestamp_ms as u64, &mut ts);
        for (i, &(at_ts, at_value)) in self.points.iter().enumerate() {
            self.bytes[at_ts..at_ts + 6].copy_from_slice(&ts);
            let v = value + i as f64;
            self.bytes[at_value..at_value + 8].copy_from_slice(&v.to_le_bytes());
        }
    }

    pub fn samples(&self) -> usize {
        self.points.len()
    }

    fn append_nested(&mut self, field: u32, inner: Template) {
        put_tag(&mut self.bytes, field, WIRE_LEN);
        put_varint(&mut self.bytes, inner.bytes.len() as u64);
        let base = self.bytes.len();
        self.bytes.extend_from_slice(&inner.bytes);
        self.points
            .extend(inner.points.iter().map(|&(t, v)| (t + base, v + base)));
    }

    fn empty() -> Template {
        Template {
            bytes: Vec::new(),
            points: Vec::new(),
        }
    }
}

const WIRE_VARINT: u32 = 0;
const WIRE_FIXED64: u32 = 1;
const WIRE_LEN: u32 = 2;
/// Any time now fits: 2^35 ms is 1971, 2^42 ms is 2109.
const TS_PLACEHOLDER: u64 = 1 << 40;

fn put_varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

fn put_tag(out: &mut Vec<u8>, field: u32, wire: u32) {
    put_varint(out, u64::from(field << 3 | wire));
}

fn put_bytes(out: &mut Vec<u8>, field: u32, bytes: &[u8]) {
    put_tag(out, field, WIRE_LEN);
    put_varint(out, bytes.len() as u64);
    out.extend_from_slice(bytes);
}

fn encode_fixed_width_varint(v: u64, out: &mut [u8; 6]) {
    debug_assert!((1 << 35..1 << 42).contains(&v), "timestamp out of range");
    for (i, byte) in out.iter_mut().enumerate() {
        let group = ((v >> (7 * i)) & 0x7f) as u8;
        *byte = if i < 5 { group | 0x80 } else { group };
    }
}

/// Field `field` = a 6-byte timestamp varint; returns its offset.
fn put_timestamp(out: &mut Vec<u8>, field: u32) -> usize {
    put_tag(out, field, WIRE_VARINT);
    let at = out.len();
    let mut ts = [0u8; 6];
    encode_fixed_width_varint(TS_PLACEHOLDER, &mut ts);
    out.extend_from_slice(&ts);
    at
}

fn put_double(out: &mut Vec<u8>, field: u32) -> usize {
    put_tag(out, field, WIRE_FIXED64);
    let at = out.len();
    out.extend_from_slice(&0f64.to_le_bytes());
    at
}

fn put_packed(out: &mut Vec<u8>, field: u32, values: &[u32]) {
    let mut packed = Vec::with_capacity(values.len() * 2);
    for &v in values {
        put_varint(&mut packed, u64::from(v));
    }
    put_bytes(out, field, &packed);
}

/// A `picket.v1.Batch` without its sequence: symbols, `instance` as the common label, one
/// family per metric name (gauge), one point per series.
pub fn batch_template(instance: &str, series: &[SeriesLabels]) -> Template {
    let mut symbols: Vec<String> = vec![String::new()];
    let mut index = std::collections::HashMap::<String, u32>::new();
    index.insert(String::new(), 0);
    let mut intern = |s: &str, symbols: &mut Vec<String>| -> u32 {
        if let Some(&i) = index.get(s) {
            return i;
        }
        let i = symbols.len() as u32;
        symbols.push(s.to_owned());
        index.insert(s.to_owned(), i);
        i
    };
    let common = [
        intern("instance", &mut symbols),
        intern(instance, &mut symbols),
    ];
    // Family name -> encoded series, in first-seen order.
    let mut families: Vec<(u32, Vec<Template>)> = Vec::new();
    for s in series {
        let name = intern(s.name, &mut symbols);
        let mut labels = Vec::with_capacity(s.labels.len() * 2);
        for (k, v) in &s.labels {
            labels.push(intern(k, &mut symbols));
            labels.push(intern(v, &mut symbols));
        }
        let mut point = Template::empty();
        let ts = put_timestamp(&mut point.bytes, 1);
        let value = put_double(&mut point.bytes, 2);
        point.points.push((ts, value));
        let mut encoded = Template::empty();
        put_packed(&mut encoded.bytes, 1, &labels);
        encoded.append_nested(2, point);
        match families.iter_mut().find(|(n, _)| *n == name) {
            Some((_, list)) => list.push(encoded),
            None => families.push((name, vec![encoded])),
        }
    }
    let mut batch = Template::empty();
    for s in &symbols {
        put_bytes(&mut batch.bytes, 2, s.as_bytes());
    }
    put_packed(&mut batch.bytes, 3, &common);
    for (name, list) in families {
        let mut family = Template::empty();
        put_tag(&mut family.bytes, 1, WIRE_VARINT);
        put_varint(&mut family.bytes, u64::from(name));
        put_tag(&mut family.bytes, 2, WIRE_VARINT);
        put_varint(&mut family.bytes, 1); // METRIC_TYPE_GAUGE
        for s in list {
            family.append_nested(4, s);
        }
        batch.append_nested(4, family);
    }
    batch
}

/// `AgentMessage { batch: Batch { sequence, ..template } }`, ready for the raw gRPC codec.
pub fn agent_message(sequence: u64, batch: &Template) -> Bytes {
    let mut seq = Vec::with_capacity(11);
    put_tag(&mut seq, 1, WIRE_VARINT);
    put_varint(&mut seq, sequence);
    let inner_len = seq.len() + batch.bytes.len();
    let mut header = Vec::with_capacity(12);
    put_tag(&mut header, 2, WIRE_LEN);
    put_varint(&mut header, inner_len as u64);
    let mut out = BytesMut::with_capacity(header.len() + inner_len);
    out.put_slice(&header);
    out.put_slice(&seq);
    out.put_slice(&batch.bytes);
    out.freeze()
}

/// A Prometheus remote-write `WriteRequest` (uncompressed) carrying the same series, with
/// `instance` added, as a peer relay (vmagent) receives them.
pub fn remote_write_template(instance: &str, series: &[SeriesLabels]) -> Template {
    let mut request = Template::empty();
    for s in series {
        let mut labels: Vec<(&str, &str)> = vec![("__name__", s.name), ("instance", instance)];
        labels.extend(s.labels.iter().map(|(k, v)| (*k, v.as_str())));
        labels.sort_unstable();
        let mut ts = Template::empty();
        for (k, v) in labels {
            let mut label = Vec::new();
            put_bytes(&mut label, 1, k.as_bytes());
            put_bytes(&mut label, 2, v.as_bytes());
            put_bytes(&mut ts.bytes, 1, &label);
        }
        let mut sample = Template::empty();
        let value = put_double(&mut sample.bytes, 1);
        let at = put_timestamp(&mut sample.bytes, 2);
        sample.points.push((at, value));
        ts.append_nested(2, sample);
        request.append_nested(1, ts);
    }
    request
}

/// Reads a varint at the start of `buf`: (value, bytes used).
pub fn read_varint(buf: &[u8]) -> Option<(u64, usize)> {
    let mut v = 0u64;
    for (i, &b) in buf.iter().enumerate().take(10) {
        v |= u64::from(b & 0x7f) << (7 * i);
        if b & 0x80 == 0 {
            return Some((v, i + 1));
        }
    }
    None
}

/// Walks the fields of one protobuf message: calls `each(field, wire, payload)` where
/// payload is the bytes of a length-delimited field, or the raw 8 bytes of a fixed64, or
/// empty for a varint (whose value is passed as the payload length is not needed here).
pub fn for_each_field(mut buf: &[u8], mut each: impl FnMut(u32, u32, &[u8], u64)) -> Option<()> {
    while !buf.is_empty() {
        let (key, n) = read_varint(buf)?;
        buf = &buf[n..];
        let (field, wire) = ((key >> 3) as u32, (key & 7) as u32);
        match wire {
            WIRE_VARINT => {
                let (v, n) = read_varint(buf)?;
                buf = &buf[n..];
                each(field, wire, &[], v);
            }
            WIRE_FIXED64 => {
                let bytes = buf.get(..8)?;
                buf = &buf[8..];
                each(field, wire, bytes, 0);
            }
            WIRE_LEN => {
                let (len, n) = read_varint(buf)?;
                let end = n.checked_add(usize::try_from(len).ok()?)?;
                let bytes = buf.get(n..end)?;
                buf = &buf[end..];
                each(field, wire, bytes, 0);
            }
            5 => {
                buf = buf.get(4..)?;
            }
            _ => return None,
        }
    }
    Some(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use picket_core::codec::decode_batch;
    use picket_core::model::Value;
    use picket_proto::v1;
    use prost::Message;

    #[test]
    fn patched_batch_decodes_to_the_series_with_new_timestamps_and_values() {
        let series = flink_like_series(
            3,
            SeriesShape {
                series: 20,
                jobs: 2,
            },
        );
        let mut template = batch_template("bench-3", &series);
        template.patch(1_780_000_000_123, 10.0);
        let message = v1::AgentMessage::decode(agent_message(42, &template)).unwrap();
        let Some(v1::agent_message::Kind::Batch(batch)) = message.kind else {
            panic!("not a batch");
        };
        assert_eq!(batch.sequence, 42);
        let decoded = decode_batch(&batch).unwrap();
        assert_eq!(decoded.sample_count(), 20);
        assert_eq!(decoded.common_labels.get("instance"), Some("bench-3"));
        let mut values: Vec<f64> = Vec::new();
        for family in &decoded.families {
            for point in &family.points {
                assert_eq!(point.timestamp_ms, 1_780_000_000_123);
                // Six Flink-like labels plus the common `instance`.
                assert_eq!(point.labels.len(), 7);
                assert_eq!(point.labels.get("instance"), Some("bench-3"));
                let Value::Number(v) = point.value else {
                    panic!("not a number")
                };
                values.push(v);
            }
        }
        values.sort_by(f64::total_cmp);
        assert_eq!(values, (10..30).map(f64::from).collect::<Vec<_>>());
    }

    #[test]
    fn remote_write_template_counts_and_patches_every_sample() {
        let series = flink_like_series(0, SeriesShape { series: 9, jobs: 3 });
        let mut template = remote_write_template("bench-0", &series);
        template.patch(1_780_000_000_000, 1.0);
        let mut samples = 0;
        let mut timestamps = Vec::new();
        for_each_field(&template.bytes, |field, _, ts, _| {
            assert_eq!(field, 1);
            for_each_field(ts, |field, _, sample, _| {
                if field == 2 {
                    samples += 1;
                    for_each_field(sample, |field, _, _, v| {
                        if field == 2 {
                            timestamps.push(v);
                        }
                    });
                }
            });
        })
        .unwrap();
        assert_eq!(samples, 9);
        assert!(timestamps.iter().all(|&t| t == 1_780_000_000_000));
    }
}

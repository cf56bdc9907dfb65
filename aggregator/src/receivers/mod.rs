//! Receivers: HTTP endpoints on the aggregator's HTTP port for software that pushes its
//! metrics instead of being collected by an agent. Apache Flink on YARN is the case in
//! point: its task managers have no fixed address, so operators point Flink's
//! `PrometheusPushGatewayReporter` or `InfluxdbReporter` at a gateway. These receivers
//! speak those two protocols, so the reporters need nothing but a new URL.
//!
//! Pushed samples go through [`Sinks::deliver`] like an agent's batch: the same routing,
//! queues and guarantee. A push is answered with success only once every sink has it, and
//! a `block` queue that is full answers 503, as a busy server would.

pub mod influx_line;
pub mod influx_write;
pub mod pushgateway;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::http::StatusCode;
use picket_core::model::{Family, Labels, MetricType, now_ms};
use serde::Deserialize;

use crate::sinks::{SinkError, Sinks};

#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct ReceiversConfig {
    pub pushgateway: pushgateway::PushgatewayConfig,
    pub influxdb: influx_write::InfluxWriteConfig,
}

/// Hands pushed families to the sinks. Each push is one "batch" of a source named after the
/// receiver and its group (which keeps a group's series in one sink lane, in order), in a
/// session that starts with the process.
pub struct Intake {
    sinks: Arc<Sinks>,
    session: u64,
    /// The last sequence handed out. Held while a push is delivered, so sequences reach the
    /// sinks in order: the file journal skips a batch numbered at or below one it has.
    sequence: Arc<Mutex<u64>>,
    metrics: Mutex<BTreeMap<(&'static str, &'static str), u64>>,
    /// `http.body_read_timeout`: the longest a request body may take to arrive.
    body_read_timeout: Duration,
    body_timeouts: AtomicU64,
}

impl Intake {
    pub fn new(sinks: Arc<Sinks>, body_read_timeout: Duration) -> Intake {
        Intake {
            sinks,
            session: u64::try_from(now_ms()).unwrap_or_default(),
            sequence: Arc::new(Mutex::new(0)),
            metrics: Mutex::new(BTreeMap::new()),
            body_read_timeout,
            body_timeouts: AtomicU64::new(0),
        }
    }

    /// Reads a request body of at most `limit` bytes within `http.body_read_timeout`,
    /// counting the bodies that take longer.
    pub async fn read_body(
        &self,
        body: axum::body::Body,
        limit: usize,
    ) -> Result<bytes::Bytes, BodyError> {
        let result = read_body(body, limit, self.body_read_timeout).await;
        if matches!(result, Err(BodyError::TimedOut(_))) {
            self.body_timeouts.fetch_add(1, Ordering::Relaxed);
        }
        result
    }

    /// Delivers `families` to every sink, off the async workers (sinks write files).
    pub async fn deliver(&self, source: String, families: Vec<Family>) -> Result<(), SinkError> {
        if families.is_empty() {
            return Ok(());
        }
        let sinks = self.sinks.clone();
        let session = self.session;
        let sequence = self.sequence.clone();
        tokio::task::spawn_blocking(move || {
            let mut sequence = sequence.lock().unwrap_or_else(|e| e.into_inner());
            *sequence += 1;
            sinks.deliver(&source, session, *sequence, &families, None)
        })
        .await
        .unwrap_or_else(|e| Err(SinkError::Internal(e.to_string())))
    }

    /// Counts one request of `receiver` by outcome (`accepted`, `bad_request`,
    /// `unauthorized`, `unavailable`, ...).
    pub fn count(&self, receiver: &'static str, outcome: &'static str) {
        let mut metrics = self.metrics.lock().unwrap_or_else(|e| e.into_inner());
        *metrics.entry((receiver, outcome)).or_default() += 1;
    }

    /// `picket_receiver_requests_total{receiver,outcome}` and
    /// `picket_aggregator_http_body_timeouts_total`.
    pub fn families(&self) -> Vec<Family> {
        let ts = now_ms();
        let mut timeouts = Family::new(
            "picket_aggregator_http_body_timeouts_total",
            MetricType::Counter,
            "Request bodies not received within http.body_read_timeout (answered 408).",
        );
        timeouts.push(
            Labels::new(),
            ts,
            self.body_timeouts.load(Ordering::Relaxed) as f64,
        );
        let mut requests = Family::new(
            "picket_receiver_requests_total",
            MetricType::Counter,
            "Requests to the push receivers, by outcome.",
        );
        let metrics = self.metrics.lock().unwrap_or_else(|e| e.into_inner());
        for ((receiver, outcome), n) in metrics.iter() {
            requests.push(
                Labels::from_pairs([("receiver", *receiver), ("outcome", *outcome)]),
                ts,
                *n as f64,
            );
        }
        if requests.points.is_empty() {
            return vec![timeouts];
        }
        vec![requests, timeouts]
    }
}

/// Why a request body could not be read.
pub enum BodyError {
    /// Longer than the receiver's `max_body_bytes`.
    TooLarge,
    /// The client went away or broke the framing mid-body.
    Broken(String),
    /// Not all there within this long (`http.body_read_timeout`): a stalled or trickling
    /// client, which must not hold a connection and a buffer for ever.
    TimedOut(Duration),
}

impl BodyError {
    /// The status and message a receiver answers with; `what` names the body ("the push").
    pub fn answer(&self, what: &str, limit_key: &str, limit: usize) -> (StatusCode, String) {
        match self {
            BodyError::TooLarge => (
                StatusCode::PAYLOAD_TOO_LARGE,
                format!("{what} is larger than {limit_key} ({limit} bytes)"),
            ),
            BodyError::Broken(why) => (
                StatusCode::BAD_REQUEST,
                format!("cannot read {what}: {why}"),
            ),
            BodyError::TimedOut(after) => (
                StatusCode::REQUEST_TIMEOUT,
                format!(
                    "{what} did not arrive within {after:?} (http.body_read_timeout); send it faster or in smaller pieces"
                ),
            ),
        }
    }
}

/// Reads a request body of at most `limit` bytes, all of it within `timeout`.
pub async fn read_body(
    body: axum::body::Body,
    limit: usize,
    timeout: Duration,
) -> Result<bytes::Bytes, BodyError> {
    // One deadline for the whole body, not per chunk: a client trickling a byte at a time
    // would pass any per-chunk timeout.
    let read = tokio::time::timeout(timeout, axum::body::to_bytes(body, limit)).await;
    let Ok(read) = read else {
        return Err(BodyError::TimedOut(timeout));
    };
    read.map_err(|e| {
        let inner = e.into_inner();
        if inner
            .downcast_ref::<http_body_util::LengthLimitError>()
            .is_some()
        {
            BodyError::TooLarge
        } else {
            BodyError::Broken(inner.to_string())
        }
    })
}

/// Decodes `%XX` escapes (and leaves everything else, `+` included, as it is). `None` when
/// an escape is malformed or the result is not UTF-8.
pub fn percent_decode(s: &str) -> Option<String> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = bytes.get(i + 1..i + 3)?;
            let hex = std::str::from_utf8(hex).ok()?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

/// URL-safe base64 (RFC 4648 §5), padding optional; the standard alphabet's `+` and `/` are
/// read too.
pub fn decode_base64(text: &str) -> Option<String> {
    let digits = text.trim_end_matches('=');
    let mut out = Vec::with_capacity(digits.len() * 3 / 4);
    let mut buffer = 0u32;
    let mut bits = 0;
    for c in digits.bytes() {
        let v = match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'-' | b'+' => 62,
            b'_' | b'/' => 63,
            _ => return None,
        };
        buffer = (buffer << 6) | u32::from(v);
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((buffer >> bits) as u8);
            buffer &= (1 << bits) - 1;
        }
    }
    String::from_utf8(out).ok()
}

/// The query parameter `name` of `query` (`a=1&b=2`), percent-decoded (`+` as a space, as
/// forms encode it).
pub fn query_param(query: Option<&str>, name: &str) -> Option<String> {
    query?.split('&').find_map(|pair| {
        let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
        (key == name).then(|| percent_decode(&value.replace('+', " ")))?
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percent_decoding() {
        assert_eq!(percent_decode("a%2Fb%20c").as_deref(), Some("a/b c"));
        assert_eq!(percent_decode("caf%C3%A9").as_deref(), Some("café"));
        assert_eq!(percent_decode("a+b").as_deref(), Some("a+b"));
        assert_eq!(percent_decode("%2"), None);
        assert_eq!(percent_decode("%zz"), None);
        assert_eq!(percent_decode("%ff"), None);
    }

    #[test]
    fn base64() {
        assert_eq!(
            decode_base64("aGVsbG8gd29ybGQ").as_deref(),
            Some("hello world")
        );
        assert_eq!(
            decode_base64("aGVsbG8gd29ybGQ=").as_deref(),
            Some("hello world")
        );
        assert_eq!(decode_base64("Pz8_").as_deref(), Some("???"));
        assert_eq!(decode_base64("Pz8/").as_deref(), Some("???"));
        assert_eq!(decode_base64("").as_deref(), Some(""));
        assert_eq!(decode_base64("a b"), None);
    }

    #[test]
    fn query_parameters() {
        let q = Some("db=flink&u=us%3Aer&p=a+b&precision=ms&empty");
        assert_eq!(query_param(q, "db").as_deref(), Some("flink"));
        assert_eq!(query_param(q, "u").as_deref(), Some("us:er"));
        assert_eq!(query_param(q, "p").as_deref(), Some("a b"));
        assert_eq!(query_param(q, "empty").as_deref(), Some(""));
        assert_eq!(query_param(q, "rp"), None);
        assert_eq!(query_param(None, "db"), None);
    }
}

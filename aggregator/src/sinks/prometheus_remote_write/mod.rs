//! The `prometheus_remote_write` sink: Prometheus remote write 1.0 (protobuf `WriteRequest`,
//! snappy block compression) to Prometheus with `--web.enable-remote-write-receiver`,
//! VictoriaMetrics, Mimir, Thanos receive, or anything else that speaks it.
//!
//! Status handling follows Prometheus' own remote-write client: 5xx and 429 are retried
//! (honouring `Retry-After`), every other 4xx drops the request and counts it. A 400 for a
//! request of several agent batches is bisected first: Prometheus rolls back a whole request
//! on the first out-of-order sample, and after a restart the queue resends batches that were
//! already written, so the old batch is refused alone and the new ones still land.

pub mod encode;
mod label_cache;

use encode::{LaneEncoder, QueuedBatch};
use label_cache::LabelCache;

use std::time::Duration;

use hyper::header::{CONTENT_ENCODING, CONTENT_TYPE, HeaderName, HeaderValue, USER_AGENT};
use serde::Deserialize;

use super::driver::{BatchConfig, Delivered, Destination, RecordError, Retry, RetryConfig};
use super::http_client::{AuthConfig, ClientError, ClientTlsConfig, HttpClient};
use super::metrics::{LabelCacheUse, SinkMetrics, outcome};
use super::queue::{QueueConfig, Record};
use super::routing::RoutingConfig;
use std::sync::Arc;

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RemoteWriteConfig {
    /// Names the sink in metrics, logs and its queue directory.
    pub name: String,
    /// e.g. `http://127.0.0.1:9090/api/v1/write`.
    pub url: String,
    /// Sent as `X-Scope-OrgID` (Mimir, Cortex, Thanos receive tenants).
    #[serde(default)]
    pub tenant: Option<String>,
    /// Extra request headers.
    #[serde(default)]
    pub headers: std::collections::BTreeMap<String, String>,
    #[serde(default)]
    pub auth: AuthConfig,
    #[serde(default)]
    pub tls: ClientTlsConfig,
    #[serde(default = "default_timeout", with = "humantime_serde")]
    pub timeout: Duration,
    #[serde(default = "default_concurrency")]
    pub concurrency: usize,
    #[serde(default)]
    pub batch: BatchConfig,
    #[serde(default)]
    pub retry: RetryConfig,
    #[serde(default)]
    pub queue: QueueConfig,
    #[serde(default)]
    pub routing: RoutingConfig,
    /// Memory for the encoded label sets of recent batch shapes (`label_cache`); 0 turns the
    /// cache off.
    #[serde(default = "default_label_cache_bytes")]
    pub label_cache_bytes: u64,
}

fn default_label_cache_bytes() -> u64 {
    label_cache::DEFAULT_BYTES
}

/// Each lane's share of `label_cache_bytes` (the driver runs `concurrency.max(1)` lanes); a
/// share of 0 means no label caches.
fn label_cache_share(cache_bytes: u64, concurrency: usize) -> u64 {
    cache_bytes / concurrency.max(1) as u64
}

/// One encoder per lane, with a label cache of its share of `cache_bytes` if that is not 0.
fn lane_encoders(cache_bytes: u64, concurrency: usize) -> Vec<std::sync::Mutex<LaneEncoder>> {
    let share = label_cache_share(cache_bytes, concurrency);
    (0..concurrency.max(1))
        .map(|_| {
            let cache = (share > 0).then(|| LabelCache::new(share));
            std::sync::Mutex::new(LaneEncoder::new(cache))
        })
        .collect()
}

pub(crate) fn default_timeout() -> Duration {
    Duration::from_secs(30)
}

pub(crate) fn default_concurrency() -> usize {
    2
}

pub struct RemoteWrite {
    url: hyper::Uri,
    headers: Vec<(HeaderName, HeaderValue)>,
    client: HttpClient,
    metrics: Arc<SinkMetrics>,
    name: String,
    /// Per lane: the buffers requests are built in and the encoded label sets of recent
    /// batch shapes (see `label_cache`), with an equal share of `label_cache_bytes`. An
    /// agent's batches always go through the same lane, so its shapes are in that lane's
    /// cache, and lanes never wait for each other.
    lanes: Vec<std::sync::Mutex<LaneEncoder>>,
    /// Whether the lanes have label caches (whose use is then reported).
    caching: bool,
}

impl RemoteWrite {
    pub fn new(config: &RemoteWriteConfig, metrics: Arc<SinkMetrics>) -> Result<Self, ClientError> {
        let url: hyper::Uri = config
            .url
            .parse()
            .map_err(|e| ClientError::Config(format!("url {:?}: {e}", config.url)))?;
        let mut headers = vec![
            (
                CONTENT_TYPE,
                HeaderValue::from_static("application/x-protobuf"),
            ),
            (CONTENT_ENCODING, HeaderValue::from_static("snappy")),
            (
                HeaderName::from_static("x-prometheus-remote-write-version"),
                HeaderValue::from_static("0.1.0"),
            ),
            (
                USER_AGENT,
                HeaderValue::from_static(concat!("picket-aggregator/", env!("CARGO_PKG_VERSION"))),
            ),
        ];
        if let Some(tenant) = &config.tenant {
            headers.push((
                HeaderName::from_static("x-scope-orgid"),
                HeaderValue::from_str(tenant).map_err(|_| {
                    ClientError::Config(format!("tenant {tenant:?} is not a valid header value"))
                })?,
            ));
        }
        for (name, value) in &config.headers {
            let name = HeaderName::from_bytes(name.as_bytes())
                .map_err(|_| ClientError::Config(format!("header name {name:?} is invalid")))?;
            let value = HeaderValue::from_str(value)
                .map_err(|_| ClientError::Config(format!("header {name}: value is invalid")))?;
            headers.push((name, value));
        }
        Ok(RemoteWrite {
            url,
            headers,
            client: HttpClient::new(&config.tls, &config.auth, config.timeout)?,
            metrics,
            name: config.name.clone(),
            lanes: lane_encoders(config.label_cache_bytes, config.concurrency),
            caching: label_cache_share(config.label_cache_bytes, config.concurrency) > 0,
        })
    }

    /// Encodes `records` in lane `lane`'s encoder and counts its label cache's use.
    fn encode_in(
        &self,
        lane: usize,
        records: &[QueuedBatch<'_>],
        encoder: &mut LaneEncoder,
    ) -> encode::EncodedWrite {
        let counts = |c: &LabelCache| [c.hits(), c.cached()];
        let before = encoder.cache().map(counts);
        let encoded = encode::encode(records, Some(encoder));
        if let (Some(cache), Some(before)) = (encoder.cache(), before) {
            let [hits, cached] = counts(cache);
            let (hits, cached) = (hits - before[0], cached - before[1]);
            // Every record counts: one whose skeleton could not be read was not looked up.
            let batches = (records.len() as u64).max(hits + cached);
            self.metrics.label_cache(
                lane,
                LabelCacheUse {
                    hit: hits,
                    miss: cached,
                    uncached: batches - hits - cached,
                    busy: 0,
                },
                Some(cache.bytes()),
            );
        }
        encoded
    }

    async fn send_part(
        &self,
        lane: usize,
        records: &[QueuedBatch<'_>],
    ) -> Result<Delivered, Retry> {
        let lane = lane % self.lanes.len().max(1);
        let encoded = match self.lanes.get(lane).map(|l| l.try_lock()) {
            // Only this lane's one request at a time takes its lock (a retry or a bisected
            // half comes after it), so it is never busy; should it be, the request is built
            // without the lane's buffers and cache rather than wait.
            None | Some(Err(std::sync::TryLockError::WouldBlock)) => {
                if self.caching {
                    let busy = LabelCacheUse {
                        busy: records.len() as u64,
                        ..LabelCacheUse::default()
                    };
                    self.metrics.label_cache(lane, busy, None);
                }
                encode::encode(records, None)
            }
            // Poisoned: an encode panicked midway. The buffers are emptied before each use
            // and the cache holds whole shapes only (inserted after their batch), so the lane
            // stays usable.
            Some(Ok(mut encoder)) => self.encode_in(lane, records, &mut encoder),
            Some(Err(std::sync::TryLockError::Poisoned(poisoned))) => {
                self.encode_in(lane, records, &mut poisoned.into_inner())
            }
        };
        // Left out of the request for good: the records are committed with it.
        let unreadable: Vec<_> = (encoded.unreadable > 0)
            .then_some((outcome::DROPPED_CORRUPT, encoded.unreadable))
            .into_iter()
            .collect();
        if encoded.samples == 0 {
            return Ok(Delivered {
                sent: 0,
                dropped: unreadable,
            });
        }
        let response = self
            .client
            .post_counted(&self.metrics, &self.url, &self.headers, encoded.body)
            .await?;
        match response.status {
            200..=299 => Ok(Delivered {
                sent: encoded.samples as u64,
                dropped: unreadable,
            }),
            429 | 500..=599 => Err(Retry {
                reason: response.status.to_string(),
                detail: response.body,
                after: response.retry_after,
            }),
            status if records.len() > 1 => {
                // Find the batch the server objects to; the others still go through.
                tracing::debug!(sink = %self.name, status, "bisecting a refused request");
                let (left, right) = records.split_at(records.len() / 2);
                let mut delivered = Box::pin(self.send_part(lane, left)).await?;
                delivered.add(Box::pin(self.send_part(lane, right)).await?);
                Ok(delivered)
            }
            status => {
                tracing::warn!(sink = %self.name, status, samples = encoded.samples, response = %response.body,
                    "remote-write endpoint refused a batch; dropped (not retryable)");
                let mut dropped = unreadable;
                dropped.push((outcome::REJECTED, encoded.samples as u64));
                Ok(Delivered { sent: 0, dropped })
            }
        }
    }
}

impl Destination for RemoteWrite {
    /// Read when encoded: a batch whose skeleton is in the lane's label cache is read only
    /// that far ([`encode::encode`]), so reading it in full here would cost as much again.
    type Record<'a> = QueuedBatch<'a>;

    fn read<'a>(&self, record: &'a Record) -> Result<QueuedBatch<'a>, RecordError> {
        Ok(QueuedBatch {
            wire: &record.payload,
            samples: record.samples,
            source: record.shard_key,
        })
    }

    async fn send(&self, lane: usize, records: &[Self::Record<'_>]) -> Result<Delivered, Retry> {
        self.send_part(lane, records).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sinks::mock::MockServer;
    use picket_core::codec::BatchEncoder;
    use picket_core::model::{Family, Labels, MetricType};
    use prost::Message;

    fn config(url: String) -> RemoteWriteConfig {
        let text = format!(
            "name = \"rw\"\nurl = \"{url}\"\ntenant = \"team-a\"\n[auth]\nbearer_token = \"tok\"\n"
        );
        picket_core::config::parse("s.toml", &text).unwrap()
    }

    /// A one-sample queue record (its bytes live as long as the test process).
    fn record(instance: &str, ts: i64) -> QueuedBatch<'static> {
        let mut f = Family::new("m", MetricType::Gauge, "");
        f.push(Labels::from_pairs([("instance", instance)]), ts, 1.0);
        let mut encoder = BatchEncoder::new(&Labels::new());
        encoder.push(&f);
        let wire = encoder.finish(0).encode_to_vec();
        QueuedBatch {
            wire: Box::leak(wire.into_boxed_slice()),
            samples: 1,
            source: crate::sinks::shard_key(instance),
        }
    }

    fn sink(server: &MockServer) -> (RemoteWrite, Arc<SinkMetrics>) {
        let metrics = Arc::new(SinkMetrics::new("rw", "prometheus_remote_write"));
        let rw = RemoteWrite::new(&config(server.url("/api/v1/write")), metrics.clone()).unwrap();
        (rw, metrics)
    }

    #[tokio::test]
    async fn sends_the_required_headers_and_a_snappy_protobuf_body() {
        let server = MockServer::start().await;
        let (rw, metrics) = sink(&server);
        let delivered = rw.send(0, &[record("pi-1", 1000)]).await.unwrap();
        assert_eq!(delivered.sent, 1);
        let got = &server.received()[0];
        assert_eq!(got.target, "/api/v1/write");
        let h = |n: &str| {
            got.headers
                .get(n)
                .and_then(|v| v.to_str().ok())
                .unwrap_or("")
        };
        assert_eq!(h("content-encoding"), "snappy");
        assert_eq!(h("content-type"), "application/x-protobuf");
        assert_eq!(h("x-prometheus-remote-write-version"), "0.1.0");
        assert_eq!(h("x-scope-orgid"), "team-a");
        assert_eq!(h("authorization"), "Bearer tok");
        let raw = snap::raw::Decoder::new().decompress_vec(&got.body).unwrap();
        let request = encode::WriteRequest::decode(raw.as_slice()).unwrap();
        assert_eq!(request.timeseries.len(), 1);
        assert_eq!(request.timeseries[0].samples[0].timestamp, 1000);
        assert_eq!(
            metrics.sample_count(outcome::SENT),
            0,
            "the driver counts, not send"
        );
    }

    /// A record that cannot be read (here: a symbol that is not UTF-8, which the skeleton
    /// reading does not look at) is left out and counted; the request carries the others,
    /// whether their shapes are cached or not.
    #[tokio::test]
    async fn an_unreadable_record_is_left_out_and_counted() {
        let server = MockServer::start().await;
        let (rw, _) = sink(&server);
        let broken = QueuedBatch {
            wire: &[0x12, 0x01, 0xff],
            samples: 7,
            source: crate::sinks::shard_key("broken"),
        };
        for round in 0..2 {
            let records = [record("a", 1 + round), broken, record("b", 2 + round)];
            let delivered = rw.send(0, &records).await.unwrap();
            assert_eq!(delivered.sent, 2, "round {round}");
            assert_eq!(delivered.dropped, vec![(outcome::DROPPED_CORRUPT, 7)]);
        }
        let only_broken = rw.send(0, &[broken]).await.unwrap();
        assert_eq!(only_broken.sent, 0);
        assert_eq!(only_broken.dropped, vec![(outcome::DROPPED_CORRUPT, 7)]);
        assert_eq!(
            server.received().len(),
            2,
            "nothing sent for the broken record alone"
        );
    }

    /// The value of `picket_sink_label_cache_*` with `label` among its labels, if reported.
    fn label_cache_metric(metrics: &SinkMetrics, name: &str, label: Option<&str>) -> Option<f64> {
        let families = metrics.families(crate::sinks::queue::Depth::default(), 0);
        let family = families.iter().find(|f| f.name == name)?;
        let point = family.points.iter().find(|p| {
            label.is_none_or(|value| p.labels.iter().any(|(n, v)| n == "result" && v == value))
        })?;
        match point.value {
            picket_core::model::Value::Number(v) => Some(v),
            _ => None,
        }
    }

    /// Each lane has its own label cache: a later round of an agent replays its labels in
    /// the lane that cached them, and the hits, misses and size are counted. The requests
    /// carry each round's own timestamp either way.
    #[tokio::test]
    async fn label_caches_are_per_lane_and_counted() {
        let server = MockServer::start().await;
        let (rw, metrics) = sink(&server);
        assert_eq!(
            label_cache_metric(&metrics, "picket_sink_label_cache_bytes", None),
            None,
            "nothing reported before the first request"
        );
        for (lane, ts) in [(0, 1000), (0, 2000), (1, 3000), (1, 4000), (0, 5000)] {
            rw.send(lane, &[record("pi-1", ts)]).await.unwrap();
        }
        let stamps: Vec<i64> = server
            .received()
            .iter()
            .map(|got| {
                let raw = snap::raw::Decoder::new().decompress_vec(&got.body).unwrap();
                let request = encode::WriteRequest::decode(raw.as_slice()).unwrap();
                request.timeseries[0].samples[0].timestamp
            })
            .collect();
        assert_eq!(stamps, [1000, 2000, 3000, 4000, 5000]);
        let batches = |result| {
            label_cache_metric(
                &metrics,
                "picket_sink_label_cache_batches_total",
                Some(result),
            )
        };
        assert_eq!(batches("hit"), Some(3.0));
        assert_eq!(batches("miss"), Some(2.0), "one per lane");
        assert_eq!(batches("uncached"), Some(0.0));
        assert_eq!(batches("busy"), Some(0.0));
        let bytes = label_cache_metric(&metrics, "picket_sink_label_cache_bytes", None);
        assert!(bytes.is_some_and(|b| b > 0.0), "{bytes:?}");
    }

    /// Each lane gets an equal share of `label_cache_bytes`; a share of nothing is no cache.
    #[test]
    fn lanes_share_the_label_cache_bytes() {
        let limits = |bytes, concurrency| -> Vec<Option<usize>> {
            lane_encoders(bytes, concurrency)
                .iter()
                .map(|lane| {
                    let lane = lane.lock().unwrap();
                    lane.cache().map(|c| c.limit_bytes())
                })
                .collect()
        };
        assert_eq!(limits(100, 2), [Some(50), Some(50)]);
        assert_eq!(limits(100, 0), [Some(100)], "concurrency 0 runs one lane");
        assert_eq!(limits(1, 2), [None, None]);
        assert_eq!(limits(0, 3), [None, None, None]);
    }

    /// `label_cache_bytes = 0` turns the cache off; requests are unchanged.
    #[tokio::test]
    async fn the_label_cache_can_be_turned_off() {
        let server = MockServer::start().await;
        let metrics = Arc::new(SinkMetrics::new("rw", "prometheus_remote_write"));
        let mut config = config(server.url("/api/v1/write"));
        config.label_cache_bytes = 0;
        let rw = RemoteWrite::new(&config, metrics.clone()).unwrap();
        for ts in [1000, 2000] {
            let delivered = rw.send(0, &[record("pi-1", ts)]).await.unwrap();
            assert_eq!(delivered.sent, 1);
        }
        assert_eq!(server.received().len(), 2);
        assert_eq!(
            label_cache_metric(
                &metrics,
                "picket_sink_label_cache_batches_total",
                Some("miss")
            ),
            None
        );
    }

    #[tokio::test]
    async fn server_errors_and_429_are_retried_with_retry_after() {
        let server = MockServer::start().await;
        let (rw, _) = sink(&server);
        server.reply(503, &[], "overloaded");
        let retry = rw.send(0, &[record("pi-1", 1000)]).await.unwrap_err();
        assert_eq!(retry.reason, "503");
        assert_eq!(retry.after, None);
        server.reply(429, &[("retry-after", "7")], "slow down");
        let retry = rw.send(0, &[record("pi-1", 1000)]).await.unwrap_err();
        assert_eq!(retry.reason, "429");
        assert_eq!(retry.after, Some(Duration::from_secs(7)));
    }

    #[tokio::test]
    async fn a_refused_request_is_bisected_so_only_the_bad_batch_is_dropped() {
        let server = MockServer::start().await;
        let (rw, _) = sink(&server);
        // Whole request refused; left half (one batch) fine; right half (two) refused, then
        // its halves: first fine, second refused.
        server.reply(400, &[], "out of order sample");
        server.reply(204, &[], "");
        server.reply(400, &[], "out of order sample");
        server.reply(204, &[], "");
        server.reply(400, &[], "out of order sample");
        let records = [record("a", 1), record("b", 2), record("c", 3)];
        let delivered = rw.send(0, &records).await.unwrap();
        assert_eq!(delivered.sent, 2);
        assert_eq!(delivered.dropped, vec![(outcome::REJECTED, 1)]);
        assert_eq!(server.received().len(), 5);
    }

    #[tokio::test]
    async fn other_client_errors_are_dropped_not_retried() {
        let server = MockServer::start().await;
        let (rw, _) = sink(&server);
        server.reply(404, &[], "no such path");
        let delivered = rw.send(0, &[record("a", 1)]).await.unwrap();
        assert_eq!(delivered.dropped, vec![(outcome::REJECTED, 1)]);
    }

    #[tokio::test]
    async fn an_unreachable_server_is_a_transport_retry() {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let metrics = Arc::new(SinkMetrics::new("rw", "prometheus_remote_write"));
        let rw = RemoteWrite::new(
            &config(format!("http://127.0.0.1:{port}/api/v1/write")),
            metrics,
        )
        .unwrap();
        let retry = rw.send(0, &[record("a", 1)]).await.unwrap_err();
        assert_eq!(retry.reason, "transport");
        assert!(
            retry.detail.contains("onnection refused"),
            "{}",
            retry.detail
        );
    }
}

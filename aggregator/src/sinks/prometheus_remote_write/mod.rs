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

use std::time::Duration;

use hyper::header::{CONTENT_ENCODING, CONTENT_TYPE, HeaderName, HeaderValue, USER_AGENT};
use picket_proto::v1::{self, FlatBatch};
use serde::Deserialize;

use super::driver::{BatchConfig, Delivered, Destination, RecordError, Retry, RetryConfig};
use super::http_client::{AuthConfig, ClientError, ClientTlsConfig, HttpClient};
use super::metrics::{SinkMetrics, outcome};
use super::queue::QueueConfig;
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
        })
    }

    async fn send_part(&self, records: &[FlatBatch<'_>]) -> Result<Delivered, Retry> {
        let encoded = encode::encode(records);
        if encoded.samples == 0 {
            return Ok(Delivered::default());
        }
        let response = self
            .client
            .post_counted(&self.metrics, &self.url, &self.headers, encoded.body)
            .await?;
        match response.status {
            200..=299 => Ok(Delivered {
                sent: encoded.samples as u64,
                dropped: Vec::new(),
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
                let mut delivered = Box::pin(self.send_part(left)).await?;
                delivered.add(Box::pin(self.send_part(right)).await?);
                Ok(delivered)
            }
            status => {
                tracing::warn!(sink = %self.name, status, samples = encoded.samples, response = %response.body,
                    "remote-write endpoint refused a batch; dropped (not retryable)");
                Ok(Delivered {
                    sent: 0,
                    dropped: vec![(outcome::REJECTED, encoded.samples as u64)],
                })
            }
        }
    }
}

impl Destination for RemoteWrite {
    type Record<'a> = FlatBatch<'a>;

    fn read<'a>(&self, payload: &'a [u8]) -> Result<FlatBatch<'a>, RecordError> {
        let batch = v1::read_received_batch(payload)?;
        encode::check(&batch)?;
        Ok(batch)
    }

    async fn send(&self, records: &[Self::Record<'_>]) -> Result<Delivered, Retry> {
        self.send_part(records).await
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

    fn record(instance: &str, ts: i64) -> FlatBatch<'static> {
        let mut f = Family::new("m", MetricType::Gauge, "");
        f.push(Labels::from_pairs([("instance", instance)]), ts, 1.0);
        let mut encoder = BatchEncoder::new(&Labels::new());
        encoder.push(&f);
        FlatBatch::from_batch(encoder.finish(0))
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
        let delivered = rw.send(&[record("pi-1", 1000)]).await.unwrap();
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

    #[tokio::test]
    async fn server_errors_and_429_are_retried_with_retry_after() {
        let server = MockServer::start().await;
        let (rw, _) = sink(&server);
        server.reply(503, &[], "overloaded");
        let retry = rw.send(&[record("pi-1", 1000)]).await.unwrap_err();
        assert_eq!(retry.reason, "503");
        assert_eq!(retry.after, None);
        server.reply(429, &[("retry-after", "7")], "slow down");
        let retry = rw.send(&[record("pi-1", 1000)]).await.unwrap_err();
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
        let delivered = rw.send(&records).await.unwrap();
        assert_eq!(delivered.sent, 2);
        assert_eq!(delivered.dropped, vec![(outcome::REJECTED, 1)]);
        assert_eq!(server.received().len(), 5);
    }

    #[tokio::test]
    async fn other_client_errors_are_dropped_not_retried() {
        let server = MockServer::start().await;
        let (rw, _) = sink(&server);
        server.reply(404, &[], "no such path");
        let delivered = rw.send(&[record("a", 1)]).await.unwrap();
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
        let retry = rw.send(&[record("a", 1)]).await.unwrap_err();
        assert_eq!(retry.reason, "transport");
        assert!(
            retry.detail.contains("onnection refused"),
            "{}",
            retry.detail
        );
    }
}

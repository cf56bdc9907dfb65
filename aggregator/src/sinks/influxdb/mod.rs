//! The `influxdb` sink: line protocol to InfluxDB's v1 API (`/write`: database, retention
//! policy, user/password) or v2 API (`/api/v2/write`: org, bucket, token), which
//! VictoriaMetrics also accepts.
//!
//! Bodies are gzipped. A 413 splits the request in two until it fits; 429, 5xx (and 401/403/404,
//! which mean a wrong token or a missing database an operator can fix) are retried with the
//! data kept queued; a 400 (unparsable or a partial write such as a field type conflict) is
//! logged with InfluxDB's message and the refused points are counted, never retried.
//! Points carry the agent's millisecond timestamps (`precision=ms`), so a resend overwrites
//! the same points instead of duplicating them.

pub mod line_protocol;

use std::io::Write;
use std::sync::Arc;
use std::time::Duration;

use hyper::header::{
    AUTHORIZATION, CONTENT_ENCODING, CONTENT_TYPE, HeaderName, HeaderValue, USER_AGENT,
};
use picket_core::model::Family;
use serde::Deserialize;

use super::driver::{
    BatchConfig, Delivered, Destination, RecordError, Retry, RetryConfig, read_families,
};
use super::http_client::{AuthConfig, ClientError, ClientTlsConfig, HttpClient};
use super::metrics::{SinkMetrics, outcome};
use super::queue::{QueueConfig, Record};
use super::routing::RoutingConfig;
use line_protocol::Mapping;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ApiVersion {
    V1,
    V2,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum MappingKind {
    /// One measurement per metric family, field `value`.
    #[default]
    Family,
    /// Telegraf style: one measurement, a field per metric, points sharing tags and time merged.
    Grouped,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InfluxConfig {
    pub name: String,
    /// Base URL, e.g. `http://127.0.0.1:8086`.
    pub url: String,
    pub api: ApiVersion,
    /// v1: database and optional retention policy.
    #[serde(default)]
    pub database: Option<String>,
    #[serde(default)]
    pub retention_policy: Option<String>,
    /// v2: organisation and bucket.
    #[serde(default)]
    pub org: Option<String>,
    #[serde(default)]
    pub bucket: Option<String>,
    /// v2 token (`Authorization: Token ...`), inline or from a file.
    #[serde(default)]
    pub token: Option<String>,
    #[serde(default)]
    pub token_file: Option<std::path::PathBuf>,
    /// Name of an environment variable holding the v2 token.
    #[serde(default)]
    pub token_env: Option<String>,
    /// v1 user and password (`auth.username`, `auth.password` or `auth.password_file`).
    #[serde(default)]
    pub auth: AuthConfig,
    #[serde(default)]
    pub mapping: MappingKind,
    /// The measurement of `mapping = "grouped"`.
    #[serde(default = "default_measurement")]
    pub measurement: String,
    #[serde(default = "default_true")]
    pub gzip: bool,
    #[serde(default)]
    pub tls: ClientTlsConfig,
    #[serde(
        default = "super::prometheus_remote_write::default_timeout",
        with = "humantime_serde"
    )]
    pub timeout: Duration,
    #[serde(default = "super::prometheus_remote_write::default_concurrency")]
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

impl InfluxConfig {
    fn token_source(&self) -> picket_core::secret::SecretSource<'_> {
        picket_core::secret::SecretSource {
            inline: self.token.as_deref(),
            file: self.token_file.as_deref(),
            env: self.token_env.as_deref(),
        }
    }
}

fn default_measurement() -> String {
    "prometheus".into()
}

fn default_true() -> bool {
    true
}

impl InfluxConfig {
    /// The encoder's mapping from the flat `mapping` and `measurement` keys.
    fn line_mapping(&self) -> Mapping {
        match self.mapping {
            MappingKind::Family => Mapping::Family,
            MappingKind::Grouped => Mapping::Grouped {
                measurement: self.measurement.clone(),
            },
        }
    }

    /// What is missing for the chosen API, as (key, message).
    pub fn problem(&self) -> Option<(&'static str, String)> {
        match self.api {
            ApiVersion::V1 if self.database.is_none() => {
                Some(("database", "api = \"v1\" needs database = \"NAME\"".into()))
            }
            ApiVersion::V2 if self.org.is_none() || self.bucket.is_none() => Some((
                "bucket",
                "api = \"v2\" needs org = \"ORG\" and bucket = \"BUCKET\"".into(),
            )),
            ApiVersion::V2 if self.auth.username.is_some() => Some((
                "auth",
                "the v2 API authenticates with token or token_file, not auth.username".into(),
            )),
            _ if self.mapping == MappingKind::Grouped
                && line_protocol::measurement_problem(&self.measurement).is_some() =>
            {
                let why = line_protocol::measurement_problem(&self.measurement).unwrap_or_default();
                Some((
                    "measurement",
                    format!("measurement {:?}: {why}", self.measurement),
                ))
            }
            _ if [
                self.token.is_some(),
                self.token_file.is_some(),
                self.token_env.is_some(),
            ]
            .iter()
            .filter(|set| **set)
            .count()
                > 1 =>
            {
                Some((
                    "token",
                    "set only one of token, token_file and token_env".into(),
                ))
            }
            _ => None,
        }
    }
}

pub struct Influx {
    url: hyper::Uri,
    headers: Vec<(HeaderName, HeaderValue)>,
    mapping: Mapping,
    gzip: bool,
    client: HttpClient,
    metrics: Arc<SinkMetrics>,
    name: String,
}

impl Influx {
    pub fn new(config: &InfluxConfig, metrics: Arc<SinkMetrics>) -> Result<Self, ClientError> {
        let base = config.url.trim_end_matches('/');
        let mut query = Vec::new();
        let path = match config.api {
            ApiVersion::V1 => {
                query.push(("db", config.database.clone().unwrap_or_default()));
                if let Some(rp) = &config.retention_policy {
                    query.push(("rp", rp.clone()));
                }
                "/write"
            }
            ApiVersion::V2 => {
                query.push(("org", config.org.clone().unwrap_or_default()));
                query.push(("bucket", config.bucket.clone().unwrap_or_default()));
                "/api/v2/write"
            }
        };
        query.push(("precision", "ms".into()));
        let query: Vec<String> = query
            .iter()
            .map(|(k, v)| format!("{k}={}", percent_encode(v)))
            .collect();
        let url_text = format!("{base}{path}?{}", query.join("&"));
        let url: hyper::Uri = url_text
            .parse()
            .map_err(|e| ClientError::Config(format!("url {:?}: {e}", config.url)))?;
        let mut headers = vec![
            (
                CONTENT_TYPE,
                HeaderValue::from_static("text/plain; charset=utf-8"),
            ),
            (
                USER_AGENT,
                HeaderValue::from_static(concat!("picket-aggregator/", env!("CARGO_PKG_VERSION"))),
            ),
        ];
        if config.gzip {
            headers.push((CONTENT_ENCODING, HeaderValue::from_static("gzip")));
        }
        let token = config.token_source().resolve("token")?;
        if let Some(token) = token {
            let mut value = HeaderValue::from_str(&format!("Token {token}")).map_err(|_| {
                ClientError::Config("token contains characters not allowed in a header".into())
            })?;
            value.set_sensitive(true);
            headers.push((AUTHORIZATION, value));
        }
        Ok(Influx {
            url,
            headers,
            mapping: config.line_mapping(),
            gzip: config.gzip,
            client: HttpClient::new(&config.tls, &config.auth, config.timeout)?,
            metrics,
            name: config.name.clone(),
        })
    }

    /// Posts `lines` (whole lines), splitting on 413.
    async fn post_lines(&self, lines: &[u8], samples: u64) -> Result<Delivered, Retry> {
        let body = if self.gzip {
            let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
            // Writing to memory cannot fail, but an empty body would be "written" with 204
            // and lost, so a failure keeps the data queued instead.
            let compressed = gz.write_all(lines).and_then(|()| gz.finish());
            compressed.map_err(|e| Retry {
                reason: "gzip".into(),
                detail: e.to_string(),
                after: None,
            })?
        } else {
            lines.to_vec()
        };
        let response = self
            .client
            .post_counted(&self.metrics, &self.url, &self.headers, body)
            .await?;
        match response.status {
            200..=299 => Ok(Delivered {
                sent: samples,
                dropped: Vec::new(),
            }),
            413 => match split_lines(lines) {
                Some((left, right)) => {
                    let line_count = lines.iter().filter(|&&b| b == b'\n').count().max(1) as u64;
                    let left_lines = left.iter().filter(|&&b| b == b'\n').count() as u64;
                    let left_samples = samples * left_lines / line_count;
                    let mut delivered = Box::pin(self.post_lines(left, left_samples)).await?;
                    delivered.add(Box::pin(self.post_lines(right, samples - left_samples)).await?);
                    Ok(delivered)
                }
                None => {
                    tracing::warn!(sink = %self.name, bytes = lines.len(),
                        "InfluxDB refuses a single line as too large (413); dropped");
                    Ok(Delivered {
                        sent: 0,
                        dropped: vec![(outcome::REJECTED, samples)],
                    })
                }
            },
            400 | 422 => {
                let dropped =
                    partial_write_dropped(&response.body).map_or(samples, |n| n.min(samples));
                tracing::warn!(sink = %self.name, status = response.status, dropped, response = %response.body,
                    "InfluxDB refused points; they are dropped (not retryable)");
                Ok(Delivered {
                    sent: samples - dropped,
                    dropped: vec![(outcome::REJECTED, dropped)],
                })
            }
            status => Err(Retry {
                reason: status.to_string(),
                detail: response.body,
                after: response.retry_after,
            }),
        }
    }
}

impl Destination for Influx {
    type Record<'a> = Vec<Family>;

    fn read(&self, record: &Record) -> Result<Vec<Family>, RecordError> {
        read_families(&record.payload)
    }

    async fn send(&self, _lane: usize, records: &[Self::Record<'_>]) -> Result<Delivered, Retry> {
        let mut lines = Vec::with_capacity(64 * 1024);
        let stats = line_protocol::encode(records.iter().flatten(), &self.mapping, &mut lines);
        let mut dropped = Vec::new();
        if stats.dropped_non_finite > 0 {
            dropped.push((outcome::DROPPED_NON_FINITE, stats.dropped_non_finite as u64));
        }
        if stats.skipped_stale > 0 {
            dropped.push((outcome::SKIPPED_STALE, stats.skipped_stale as u64));
        }
        let mut delivered = if lines.is_empty() {
            Delivered::default()
        } else {
            self.post_lines(&lines, stats.samples as u64).await?
        };
        delivered.dropped.extend(dropped);
        Ok(delivered)
    }
}

/// Splits line protocol at the newline nearest the middle; `None` for a single line.
fn split_lines(lines: &[u8]) -> Option<(&[u8], &[u8])> {
    let middle = lines.len() / 2;
    let after = lines[middle..lines.len().saturating_sub(1)]
        .iter()
        .position(|&b| b == b'\n')
        .map(|i| middle + i + 1);
    let before = lines[..middle]
        .iter()
        .rposition(|&b| b == b'\n')
        .map(|i| i + 1);
    let cut = match (before, after) {
        (Some(b), Some(a)) => {
            if middle - b <= a - middle {
                b
            } else {
                a
            }
        }
        (b, a) => b.or(a)?,
    };
    (cut > 0 && cut < lines.len()).then(|| lines.split_at(cut))
}

/// InfluxDB 1.x reports `partial write: ... dropped=N` for points it refused.
fn partial_write_dropped(message: &str) -> Option<u64> {
    let at = message.rfind("dropped=")?;
    let digits: String = message[at + 8..]
        .chars()
        .take_while(char::is_ascii_digit)
        .collect();
    digits.parse().ok()
}

/// Percent-encodes a query parameter value (RFC 3986 unreserved characters pass).
fn percent_encode(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    for b in value.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mapping_keys() {
        let parse = |extra: serde_json::Value| {
            let mut config = serde_json::json!({"name": "i", "url": "http://127.0.0.1:8086", "api": "v1", "database": "d"});
            if let (Some(config), Some(extra)) = (config.as_object_mut(), extra.as_object()) {
                config.extend(extra.clone());
            }
            serde_json::from_value::<InfluxConfig>(config).map(|c| c.line_mapping())
        };
        assert_eq!(parse(serde_json::json!({})).unwrap(), Mapping::Family);
        assert_eq!(
            parse(serde_json::json!({"mapping": "grouped"})).unwrap(),
            Mapping::Grouped {
                measurement: "prometheus".into()
            }
        );
        assert_eq!(
            parse(serde_json::json!({"mapping": "grouped", "measurement": "flink"})).unwrap(),
            Mapping::Grouped {
                measurement: "flink".into()
            }
        );
        assert!(parse(serde_json::json!({"mapping": "other"})).is_err());
        assert!(parse(serde_json::json!({"measurment": "x"})).is_err());
    }

    #[test]
    fn splitting_keeps_whole_lines() {
        let body = b"a value=1 1\nb value=2 2\nc value=3 3\n";
        let (l, r) = split_lines(body).unwrap();
        assert!(l.ends_with(b"\n") && r.ends_with(b"\n"));
        assert_eq!([l, r].concat(), body);
        assert!(split_lines(b"only value=1 1\n").is_none());
    }

    #[test]
    fn partial_write_counts_are_read() {
        let msg = r#"{"error":"partial write: field type conflict: input field \"value\" on measurement \"m\" is type string, already exists as type float dropped=3"}"#;
        assert_eq!(partial_write_dropped(msg), Some(3));
        assert_eq!(partial_write_dropped("unable to parse"), None);
    }

    use crate::sinks::mock::MockServer;
    use picket_core::model::{Labels, MetricType};
    use std::io::Read;

    fn sink(server: &MockServer, extra: &str) -> Influx {
        let text = format!("name = \"influx\"\nurl = \"{}\"\n{extra}", server.url(""));
        let config: InfluxConfig = picket_core::config::parse("s.toml", &text).unwrap();
        assert_eq!(config.problem(), None);
        Influx::new(&config, Arc::new(SinkMetrics::new("influx", "influxdb"))).unwrap()
    }

    fn records(n: usize) -> Vec<Vec<Family>> {
        (0..n)
            .map(|i| {
                let mut f = Family::new("m", MetricType::Gauge, "");
                f.push(
                    Labels::from_pairs([("i", i.to_string())]),
                    1000 + i as i64,
                    i as f64,
                );
                vec![f]
            })
            .collect()
    }

    fn gunzip(body: &[u8]) -> String {
        let mut out = String::new();
        flate2::read::GzDecoder::new(body)
            .read_to_string(&mut out)
            .unwrap();
        out
    }

    #[tokio::test]
    async fn v1_writes_gzipped_lines_with_database_and_basic_auth() {
        let server = MockServer::start().await;
        let influx = sink(
            &server,
            "api = \"v1\"\ndatabase = \"my db\"\nretention_policy = \"rp1\"\n[auth]\nusername = \"u\"\npassword = \"p\"\n",
        );
        let delivered = influx.send(0, &records(2)).await.unwrap();
        assert_eq!(delivered.sent, 2);
        let got = &server.received()[0];
        assert_eq!(got.target, "/write?db=my%20db&rp=rp1&precision=ms");
        assert_eq!(got.headers["content-encoding"], "gzip");
        assert_eq!(got.headers["authorization"], "Basic dTpw");
        assert_eq!(
            gunzip(&got.body),
            "m,i=0 value=0 1000\nm,i=1 value=1 1001\n"
        );
    }

    #[tokio::test]
    async fn v2_sends_org_bucket_and_token() {
        let server = MockServer::start().await;
        let influx = sink(
            &server,
            "api = \"v2\"\norg = \"o\"\nbucket = \"b\"\ntoken = \"t0k\"\ngzip = false\n",
        );
        influx.send(0, &records(1)).await.unwrap();
        let got = &server.received()[0];
        assert_eq!(got.target, "/api/v2/write?org=o&bucket=b&precision=ms");
        assert_eq!(got.headers["authorization"], "Token t0k");
        assert_eq!(String::from_utf8_lossy(&got.body), "m,i=0 value=0 1000\n");
    }

    #[tokio::test]
    async fn a_413_splits_the_batch_until_it_fits() {
        let server = MockServer::start().await;
        let influx = sink(&server, "api = \"v1\"\ndatabase = \"d\"\ngzip = false\n");
        server.reply(413, &[], "request entity too large");
        server.reply(413, &[], "request entity too large");
        let delivered = influx.send(0, &records(4)).await.unwrap();
        assert_eq!(delivered.sent, 4);
        let bodies: Vec<String> = server
            .received()
            .iter()
            .map(|r| String::from_utf8_lossy(&r.body).into_owned())
            .collect();
        // Whole (4 lines), left half refused (2), its halves (1+1), right half (2).
        let lines: Vec<usize> = bodies.iter().map(|b| b.lines().count()).collect();
        assert_eq!(lines, [4, 2, 1, 1, 2]);
        let mut written: Vec<&str> = bodies[2..].iter().flat_map(|b| b.lines()).collect();
        written.sort();
        assert_eq!(written.len(), 4, "every line once: {written:?}");
        written.dedup();
        assert_eq!(written.len(), 4);
    }

    #[tokio::test]
    async fn a_partial_write_is_counted_and_not_retried_while_5xx_is() {
        let server = MockServer::start().await;
        let influx = sink(&server, "api = \"v1\"\ndatabase = \"d\"\n");
        server.reply(
            400,
            &[],
            r#"{"error":"partial write: field type conflict: input field \"value\" on measurement \"m\" is type integer, already exists as type float dropped=1"}"#,
        );
        let delivered = influx.send(0, &records(3)).await.unwrap();
        assert_eq!(delivered.sent, 2);
        assert_eq!(delivered.dropped, vec![(outcome::REJECTED, 1)]);
        server.reply(503, &[("retry-after", "2")], "");
        let retry = influx.send(0, &records(1)).await.unwrap_err();
        assert_eq!(
            (retry.reason.as_str(), retry.after),
            ("503", Some(Duration::from_secs(2)))
        );
        server.reply(404, &[], r#"{"error":"database not found: \"d\""}"#);
        let retry = influx.send(0, &records(1)).await.unwrap_err();
        assert_eq!(
            retry.reason, "404",
            "a missing database keeps the data queued"
        );
    }

    #[test]
    fn api_settings_are_checked() {
        let parse = |t: &str| picket_core::config::parse::<InfluxConfig>("s.toml", t).unwrap();
        let c = parse("name = \"i\"\nurl = \"http://x\"\napi = \"v1\"\n");
        assert_eq!(c.problem().map(|p| p.0), Some("database"));
        let c = parse("name = \"i\"\nurl = \"http://x\"\napi = \"v2\"\norg = \"o\"\n");
        assert_eq!(c.problem().map(|p| p.0), Some("bucket"));
    }

    #[test]
    fn query_values_are_encoded() {
        assert_eq!(percent_encode("my db/rp"), "my%20db%2Frp");
    }
}

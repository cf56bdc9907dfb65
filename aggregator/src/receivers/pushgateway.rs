//! A Pushgateway-compatible receiver: `PUT`, `POST` and `DELETE` on
//! `/metrics/job/<job>{/<label>/<value>}`, as Flink's `PrometheusPushGatewayReporter` (and
//! any Prometheus client's push support) sends them.
//!
//! What a push means follows the Pushgateway: the path names a *group* (the job plus the
//! grouping labels, which are added to every pushed series). `PUT` replaces everything the
//! group had, `POST` replaces only the metric families it contains, `DELETE` removes the
//! group (Flink sends it on shutdown with `deleteOnShutdown`). A segment name ending in
//! `@base64` carries its value in URL-safe base64, for values with `/` or empty ones.
//!
//! Where it differs, on purpose: a series that a push removes, or a group that stopped
//! pushing for `group_ttl`, gets a stale marker sent to the sinks and leaves `/metrics`, so
//! the series of a vanished task manager end instead of lingering forever as the
//! Pushgateway's do. Samples keep a timestamp they carry and are stamped with the arrival
//! time otherwise.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderMap, Method, StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use axum::routing::any;
use picket_core::model::{
    Family, Histogram, Labels, MetricType, Point, Summary, Value, is_valid_label_name, now_ms,
};
use picket_plugin_prometheus::parse::{self as exposition, Format};
use picket_plugin_sdk::types as sdk;
use serde::Deserialize;
use tokio::sync::Mutex;

use super::{Intake, decode_base64, percent_decode};

const RECEIVER: &str = "pushgateway";
/// Most `<label>/<value>` pairs a push path may carry, the job included.
const MAX_GROUPING_LABELS: usize = 32;
/// Grouping labels copied into every series may make at most this many times the body's
/// size (or of 64 KiB, for small bodies) in label bytes.
const EXPANSION_FACTOR: usize = 16;

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct PushgatewayConfig {
    /// Serve `/metrics/job/...` on the HTTP port.
    pub enabled: bool,
    /// A group that has not pushed for this long is removed and its series end. Make it a
    /// few times the pushers' interval (Flink reports every 10 s by default).
    #[serde(with = "humantime_serde")]
    pub group_ttl: Duration,
    /// The largest push body accepted (413 above).
    pub max_body_bytes: usize,
}

impl Default for PushgatewayConfig {
    fn default() -> Self {
        PushgatewayConfig {
            enabled: false,
            group_ttl: Duration::from_secs(120),
            max_body_bytes: 16 * 1024 * 1024,
        }
    }
}

/// A group's identity: `job` and the grouping labels, sorted.
type GroupKey = BTreeMap<String, String>;

/// What a group currently has: per family its type and series.
#[derive(Default)]
struct Group {
    families: HashMap<String, (MetricType, HashSet<Labels>)>,
    last_push: Option<Instant>,
}

impl Group {
    /// Stale markers for every series the group has (it is being deleted or expired).
    fn all_stale(&self) -> Vec<Family> {
        stale_markers(self.families.iter().map(|(n, (k, s))| (n, *k, s)))
    }
}

pub struct Pushgateway {
    config: PushgatewayConfig,
    intake: Arc<Intake>,
    groups: Mutex<HashMap<GroupKey, Group>>,
}

/// A refused request: status and the message the pusher gets.
#[derive(Debug)]
struct Refusal(StatusCode, String);

impl Refusal {
    fn bad(message: impl Into<String>) -> Refusal {
        Refusal(StatusCode::BAD_REQUEST, message.into())
    }
}

impl Pushgateway {
    pub fn new(config: PushgatewayConfig, intake: Arc<Intake>) -> Arc<Pushgateway> {
        Arc::new(Pushgateway {
            config,
            intake,
            groups: Mutex::new(HashMap::new()),
        })
    }

    pub fn router(self: &Arc<Self>) -> Router {
        Router::new()
            .route("/metrics/{*group}", any(handle))
            .with_state(self.clone())
    }

    /// Ends the series of groups that stopped pushing. Called every few seconds by a task of
    /// its own; a group whose stale markers cannot be delivered now is tried again.
    pub async fn expire(&self) {
        let mut groups = self.groups.lock().await;
        let expired: Vec<GroupKey> = groups
            .iter()
            .filter(|(_, g)| {
                g.last_push
                    .is_some_and(|t| t.elapsed() >= self.config.group_ttl)
            })
            .map(|(k, _)| k.clone())
            .collect();
        for key in expired {
            let Some(group) = groups.get(&key) else {
                continue;
            };
            match self
                .intake
                .deliver(source_name(&key), group.all_stale())
                .await
            {
                Ok(()) => {
                    tracing::info!(group = %render_group(&key), "push group expired: no push for group_ttl");
                    groups.remove(&key);
                }
                Err(e) => {
                    tracing::warn!(group = %render_group(&key), error = %e, "cannot end an expired push group's series yet");
                }
            }
        }
    }

    /// Reads, parses and converts a push body, before any lock is taken: a slow or stalled
    /// client holds up nobody else.
    async fn read_push(
        &self,
        key: &GroupKey,
        headers: &HeaderMap,
        body: Body,
    ) -> Result<Vec<Family>, Refusal> {
        let now = now_ms();
        let limit = self.config.max_body_bytes;
        let body = self.intake.read_body(body, limit).await.map_err(|e| {
            let (status, message) = e.answer(
                "the push body",
                "receivers.pushgateway.max_body_bytes",
                limit,
            );
            Refusal(status, message)
        })?;
        let content_type = headers
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok());
        if content_type.is_some_and(|t| t.contains("protobuf")) {
            return Err(Refusal(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "the protobuf format is not accepted; push the text format (text/plain; version=0.0.4)".into(),
            ));
        }
        let format = Format::from_content_type(content_type);
        let key = key.clone();
        tokio::task::spawn_blocking(move || parse_push(&body, format, &key, now))
            .await
            .unwrap_or_else(|e| {
                Err(Refusal(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    format!("parsing the push failed: {e}"),
                ))
            })
    }

    /// Applies a read push (`None`: a DELETE) to its group and the sinks. Pushes and expiry
    /// take turns on the groups: each one's stale markers follow from the state before it.
    async fn apply(
        &self,
        method: Method,
        key: GroupKey,
        pushed: Option<Vec<Family>>,
    ) -> Result<StatusCode, Refusal> {
        let mut groups = self.groups.lock().await;
        let Some(pushed) = pushed else {
            let Some(group) = groups.get(&key) else {
                return Ok(StatusCode::ACCEPTED);
            };
            self.deliver(&key, group.all_stale()).await?;
            groups.remove(&key);
            return Ok(StatusCode::ACCEPTED);
        };
        let no_families = HashMap::new();
        let current = groups.get(&key).map_or(&no_families, |g| &g.families);
        // Series the push removes: all of the group's for PUT, those of the pushed families
        // for POST.
        let replaced =
            |name: &String| method == Method::PUT || pushed.iter().any(|f| &f.name == name);
        // The group after the push: what it keeps, plus what was pushed.
        let mut next: HashMap<String, (MetricType, HashSet<Labels>)> = current
            .iter()
            .filter(|(name, _)| !replaced(name))
            .map(|(n, v)| (n.clone(), v.clone()))
            .collect();
        for family in &pushed {
            let series = family.points.iter().map(|p| p.labels.clone()).collect();
            next.insert(family.name.clone(), (family.kind, series));
        }
        // Series it had and no longer has (a family whose type changed loses all of its old
        // ones) get stale markers.
        let removed: Vec<(&String, MetricType, HashSet<Labels>)> = current
            .iter()
            .map(|(name, (kind, series))| {
                let kept = next.get(name).filter(|(k, _)| k == kind).map(|(_, s)| s);
                let gone = series
                    .iter()
                    .filter(|labels| kept.is_none_or(|s| !s.contains(*labels)))
                    .cloned()
                    .collect();
                (name, *kind, gone)
            })
            .collect();
        let mut families = stale_markers(removed.iter().map(|(n, k, s)| (*n, *k, s)));
        families.extend(pushed);
        self.deliver(&key, families).await?;
        let group = groups.entry(key).or_default();
        group.families = next;
        group.last_push = Some(Instant::now());
        Ok(StatusCode::OK)
    }

    async fn deliver(&self, key: &GroupKey, families: Vec<Family>) -> Result<(), Refusal> {
        self.intake
            .deliver(source_name(key), families)
            .await
            .map_err(|e| {
                Refusal(
                    StatusCode::SERVICE_UNAVAILABLE,
                    format!("the aggregator cannot store the push right now: {e}"),
                )
            })
    }
}

async fn handle(
    State(gateway): State<Arc<Pushgateway>>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Body,
) -> Response {
    if !matches!(method, Method::PUT | Method::POST | Method::DELETE) {
        return (
            StatusCode::METHOD_NOT_ALLOWED,
            [(header::ALLOW, "PUT, POST, DELETE")],
            "push with PUT or POST, remove a group with DELETE\n",
        )
            .into_response();
    }
    let result = match parse_group(uri.path()) {
        Ok(key) => push(gateway.clone(), method, key, headers, body).await,
        Err(message) => Err(Refusal::bad(message)),
    };
    match result {
        Ok(status) => {
            gateway.intake.count(RECEIVER, "accepted");
            status.into_response()
        }
        Err(Refusal(status, message)) => {
            gateway.intake.count(RECEIVER, outcome(status));
            tracing::warn!(path = %uri.path(), %status, %message, "push refused");
            (status, format!("{message}\n")).into_response()
        }
    }
}

async fn push(
    gateway: Arc<Pushgateway>,
    method: Method,
    key: GroupKey,
    headers: HeaderMap,
    body: Body,
) -> Result<StatusCode, Refusal> {
    let pushed = if method == Method::DELETE {
        None
    } else {
        Some(gateway.read_push(&key, &headers, body).await?)
    };
    // In a task of its own: a client that hangs up mid-delivery must not cancel the update
    // half way, leaving the group state and the sinks disagreeing.
    tokio::spawn(async move { gateway.apply(method, key, pushed).await })
        .await
        .unwrap_or_else(|e| {
            Err(Refusal(
                StatusCode::INTERNAL_SERVER_ERROR,
                format!("applying the push failed: {e}"),
            ))
        })
}

fn outcome(status: StatusCode) -> &'static str {
    match status {
        StatusCode::BAD_REQUEST => "bad_request",
        StatusCode::PAYLOAD_TOO_LARGE => "too_large",
        StatusCode::UNSUPPORTED_MEDIA_TYPE => "unsupported_format",
        StatusCode::SERVICE_UNAVAILABLE => "unavailable",
        StatusCode::REQUEST_TIMEOUT => "timeout",
        _ => "other",
    }
}

/// A push body → the group's families: parsed, bounded, converted. CPU work, off the async
/// workers.
fn parse_push(
    body: &[u8],
    format: Format,
    key: &GroupKey,
    now: i64,
) -> Result<Vec<Family>, Refusal> {
    let parsed = exposition::parse(body, format)
        .map_err(|e| Refusal::bad(format!("cannot parse the push: {e}")))?;
    // Grouping labels are copied into every series: bound what a long path times a long body
    // can make.
    let series: usize = parsed.families.iter().map(|f| f.samples.len()).sum();
    let group_bytes: usize = key.iter().map(|(k, v)| k.len() + v.len()).sum();
    let budget = EXPANSION_FACTOR * body.len().max(64 * 1024);
    if series.saturating_mul(group_bytes) > budget {
        return Err(Refusal(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!(
                "{series} series × {group_bytes} bytes of grouping labels is more than {budget} bytes; use fewer or shorter grouping labels"
            ),
        ));
    }
    convert(parsed.families, key, now)
}

/// `/metrics/job/<job>{/<label>/<value>}` (the raw, still percent-encoded path) → the group.
fn parse_group(path: &str) -> Result<GroupKey, String> {
    let rest = path
        .strip_prefix("/metrics/")
        .ok_or_else(|| format!("{path}: expected /metrics/job/<job>{{/<label>/<value>}}"))?;
    let segments: Vec<&str> = rest.split('/').collect();
    if !segments.len().is_multiple_of(2) || segments.len() < 2 {
        return Err(format!(
            "{path}: expected /metrics/job/<job> followed by <label>/<value> pairs"
        ));
    }
    if segments.len() / 2 > MAX_GROUPING_LABELS {
        return Err(format!(
            "{} grouping labels; at most {MAX_GROUPING_LABELS} are accepted",
            segments.len() / 2
        ));
    }
    let mut key = GroupKey::new();
    for (i, pair) in segments.chunks(2).enumerate() {
        let raw_name = percent_decode(pair[0]).ok_or_else(|| format!("{path}: bad % escape"))?;
        let (name, base64) = match raw_name.strip_suffix("@base64") {
            Some(name) => (name.to_owned(), true),
            None => (raw_name, false),
        };
        let value = if base64 {
            decode_base64(pair[1])
                .ok_or_else(|| format!("{path}: the value of {name} is not URL-safe base64"))?
        } else {
            percent_decode(pair[1]).ok_or_else(|| format!("{path}: bad % escape"))?
        };
        if i == 0 && name != "job" {
            return Err(format!(
                "{path}: the path must start with /metrics/job/<job>"
            ));
        }
        if i == 0 && value.is_empty() {
            return Err(format!("{path}: the job name must not be empty"));
        }
        if !is_valid_label_name(&name) || name.starts_with("__") {
            return Err(format!(
                "{path}: {name:?} is not a valid grouping label name"
            ));
        }
        if key.insert(name.clone(), value).is_some() {
            return Err(format!("{path}: grouping label {name} given twice"));
        }
    }
    Ok(key)
}

fn source_name(key: &GroupKey) -> String {
    format!("{RECEIVER}:{}", render_group(key))
}

fn render_group(key: &GroupKey) -> String {
    let pairs: Vec<String> = key.iter().map(|(k, v)| format!("{k}={v:?}")).collect();
    pairs.join(",")
}

/// Stale markers, now, for every listed series.
fn stale_markers<'a>(
    series: impl Iterator<Item = (&'a String, MetricType, &'a HashSet<Labels>)>,
) -> Vec<Family> {
    let now = now_ms();
    series
        .filter(|(_, _, s)| !s.is_empty())
        .map(|(name, kind, labels)| Family {
            name: name.clone(),
            kind,
            help: String::new(),
            points: labels
                .iter()
                .map(|l| Point {
                    labels: l.clone(),
                    timestamp_ms: now,
                    value: Value::Stale,
                })
                .collect(),
        })
        .collect()
}

/// The parser's families → Picket's, with the grouping labels added. A series whose own
/// label contradicts the grouping key is refused, as the Pushgateway does: which value is
/// right cannot be told.
fn convert(families: Vec<sdk::Family>, key: &GroupKey, now: i64) -> Result<Vec<Family>, Refusal> {
    let mut out = Vec::with_capacity(families.len());
    for family in families {
        let kind = match family.kind {
            sdk::MetricKind::Untyped => MetricType::Untyped,
            sdk::MetricKind::Gauge => MetricType::Gauge,
            sdk::MetricKind::Counter => MetricType::Counter,
            sdk::MetricKind::Summary => MetricType::Summary,
            sdk::MetricKind::Histogram => MetricType::Histogram,
        };
        let mut points = Vec::with_capacity(family.samples.len());
        for sample in family.samples {
            let mut labels = Labels::from_pairs(
                sample
                    .labels
                    .into_iter()
                    .filter(|l| !l.value.is_empty())
                    .map(|l| (l.name, l.value)),
            );
            // `__` names are Prometheus's own (`__name__` is the metric name); the sinks and
            // the wire codec take none, and the Pushgateway refuses them too.
            if let Some((name, _)) = labels.iter().find(|(name, _)| name.starts_with("__")) {
                return Err(Refusal::bad(format!(
                    "{}{labels}: label name {name} is reserved (names starting with __ are Prometheus's own)",
                    family.name
                )));
            }
            for (name, value) in key {
                match labels.get(name) {
                    Some(own) if own != value => {
                        return Err(Refusal::bad(format!(
                            "{}{labels} has {name}={own:?}, but the push path says {name}={value:?}",
                            family.name
                        )));
                    }
                    _ => labels.insert(name.as_str(), value.as_str()),
                }
            }
            let value = match sample.value {
                sdk::Value::Number(v) => Value::Number(v),
                sdk::Value::Summary(s) => Value::Summary(Summary {
                    count: s.count,
                    sum: s.sum,
                    quantiles: s.quantiles.iter().map(|q| (q.quantile, q.value)).collect(),
                }),
                sdk::Value::Histogram(h) => Value::Histogram(Histogram {
                    count: h.count,
                    sum: h.sum,
                    buckets: h
                        .buckets
                        .iter()
                        .map(|b| (b.upper_bound, b.cumulative_count))
                        .collect(),
                }),
            };
            if let Err(why) = value.check(kind) {
                return Err(Refusal::bad(format!("{}{labels}: {why}", family.name)));
            }
            points.push(Point {
                labels,
                timestamp_ms: sample.timestamp_ms.unwrap_or(now),
                value,
            });
        }
        out.push(Family {
            name: family.name,
            kind,
            help: family.help,
            points,
        });
    }
    Ok(out)
}

/// What the fuzz targets (`fuzz/`, docs/fuzzing.md) call: the request handling that needs no
/// server or state. Built only with `--cfg fuzzing`, as `cargo fuzz` sets it.
#[cfg(fuzzing)]
pub mod fuzzing {
    use super::*;

    /// A push path → its group (job and grouping labels).
    pub fn parse_group(path: &str) -> Result<BTreeMap<String, String>, String> {
        super::parse_group(path)
    }

    /// A `PUT`/`POST` as the handler reads it before it touches any group: path, content
    /// type and body → the families delivered to the sinks.
    pub fn read_push(
        path: &str,
        content_type: Option<&str>,
        body: &[u8],
        now: i64,
    ) -> Result<Vec<Family>, String> {
        let key = super::parse_group(path)?;
        if content_type.is_some_and(|t| t.contains("protobuf")) {
            return Err("protobuf".into());
        }
        let format = Format::from_content_type(content_type);
        parse_push(body, format, &key, now).map_err(|Refusal(_, message)| message)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn group_paths() {
        let key = parse_group("/metrics/job/flink/host/tm%201/cluster@base64/cHJvZC9ldQ").unwrap();
        assert_eq!(
            key.into_iter().collect::<Vec<_>>(),
            [
                ("cluster".into(), "prod/eu".into()),
                ("host".into(), "tm 1".into()),
                ("job".into(), "flink".into())
            ]
        );
        let key = parse_group("/metrics/job@base64/Zmxpbms=/empty@base64/=").unwrap();
        assert_eq!(key["job"], "flink");
        assert_eq!(key["empty"], "");
        for bad in [
            "/metrics/job",
            "/metrics/job/",
            "/metrics/instance/x",
            "/metrics/job/x/host",
            "/metrics/job/x/job/y",
            "/metrics/job/x/__name__/y",
            "/metrics/job/x/1bad/y",
            "/metrics/job/x%zz",
            "/metrics/job@base64/***",
            &format!("/metrics/job/x{}", "/l/v".repeat(MAX_GROUPING_LABELS)),
        ] {
            assert!(parse_group(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn grouping_labels_are_added_and_contradictions_refused() {
        let parsed = exposition::parse_str(
            "# TYPE up gauge\nup{host=\"a\"} 1\nup{host=\"b\",job=\"flink\"} 0 1000\n",
            Format::Text,
        )
        .unwrap();
        let key = parse_group("/metrics/job/flink/dc/eu").unwrap();
        let families = convert(parsed.families, &key, 5).unwrap();
        let points = &families[0].points;
        assert_eq!(
            points[0].labels,
            Labels::from_pairs([("dc", "eu"), ("host", "a"), ("job", "flink")])
        );
        assert_eq!(points[0].timestamp_ms, 5);
        assert_eq!(points[1].timestamp_ms, 1000);

        let parsed = exposition::parse_str("up{job=\"other\"} 1\n", Format::Text).unwrap();
        let Err(Refusal(status, message)) = convert(parsed.families, &key, 5) else {
            panic!("a contradicting job label must be refused");
        };
        assert_eq!(status, StatusCode::BAD_REQUEST);
        assert!(message.contains("job=\"other\""), "{message}");
    }

    /// Found by the `pushgateway_push` fuzz target: a series label starting with `__` went
    /// through to the sinks, which never take one from an agent.
    #[test]
    fn reserved_label_names_are_refused() {
        let key = parse_group("/metrics/job/flinkjqb_id/host/tm-1").unwrap();
        for body in [
            "flink_records_total{__host=\"tm-9\"} 1\n",
            "up{__name__=\"up\"} 1\n",
        ] {
            let Err(Refusal(status, message)) = parse_push(body.as_bytes(), Format::Text, &key, 5)
            else {
                panic!("{body:?}: a reserved label name must be refused");
            };
            assert_eq!(status, StatusCode::BAD_REQUEST);
            assert!(message.contains("is reserved"), "{message}");
        }
        // An empty value means no label at all, as everywhere else.
        let families = parse_push(b"up{__x=\"\"} 1\n", Format::Text, &key, 5).unwrap();
        assert!(!families[0].points[0].labels.contains("__x"));
    }
}

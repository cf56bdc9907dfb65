//! The aggregator's HTTP port: `/metrics` (the latest sample of every live series plus the
//! aggregator's own `picket_aggregator_*` metrics), `/healthz` (the process is alive) and
//! `/readyz` (the gRPC listener is up and every sink is usable), plus the push receivers.
//!
//! The port is served here connection by connection (hyper's HTTP/1 server rather than
//! `axum::serve`, which sets no limits) because it faces software we do not control: a
//! request head must arrive within `http.header_read_timeout` (slow-loris clients, and idle
//! keep-alive connections, are closed), at most `http.max_connections` connections are open
//! at once (more are closed as soon as they are accepted), and the receivers read a body for
//! at most `http.body_read_timeout` (`receivers::read_body`, answered 408).

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use picket_core::exposition::{self, Format};
use picket_core::model::{Family, Labels, MetricType, now_ms};
use serde::Deserialize;
use tokio::net::TcpListener;
use tokio::sync::{Semaphore, watch};

use crate::agents::Registry;
use crate::grpc_listener::GrpcConnections;
use crate::receivers::Intake;
use crate::sinks::Sinks;

/// After an accept error that is not about one connection (out of file descriptors, say),
/// wait this long before accepting again rather than spinning on the error.
const ACCEPT_ERROR_PAUSE: Duration = Duration::from_millis(100);

/// The most `max_connections` may be (for either port): far above what one process can hold
/// open, and small enough to count in a semaphore.
pub const MAX_CONNECTIONS_LIMIT: usize = 1_000_000;

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct HttpConfig {
    /// Health (`/healthz`, `/readyz`), Prometheus exposition (`/metrics`) and the receivers.
    pub listen: SocketAddr,
    /// A request head (request line and headers) must arrive within this, counted from its
    /// first byte or, on a kept-alive connection, from the end of the previous response.
    #[serde(with = "humantime_serde")]
    pub header_read_timeout: Duration,
    /// A receiver's request body must arrive completely within this (408 otherwise).
    #[serde(with = "humantime_serde")]
    pub body_read_timeout: Duration,
    /// Open connections at most; more are closed as soon as they are accepted.
    pub max_connections: usize,
}

impl Default for HttpConfig {
    fn default() -> Self {
        HttpConfig {
            listen: SocketAddr::from(([127, 0, 0, 1], 7401)),
            header_read_timeout: Duration::from_secs(10),
            body_read_timeout: Duration::from_secs(60),
            max_connections: 1024,
        }
    }
}

impl HttpConfig {
    /// The first invalid key and why.
    pub fn problem(&self) -> Option<(&'static str, String)> {
        for (key, value) in [
            ("header_read_timeout", self.header_read_timeout),
            ("body_read_timeout", self.body_read_timeout),
        ] {
            if value < Duration::from_secs(1) {
                return Some((
                    key,
                    format!("{value:?} is too short for a client on a slow link; use at least 1s"),
                ));
            }
        }
        if !(1..=MAX_CONNECTIONS_LIMIT).contains(&self.max_connections) {
            return Some((
                "max_connections",
                format!(
                    "must be between 1 and {MAX_CONNECTIONS_LIMIT} (Prometheus and each pusher hold one)"
                ),
            ));
        }
        None
    }
}

/// Connection counters of the HTTP port.
#[derive(Default)]
pub struct HttpStats {
    open: AtomicU64,
    accepted: AtomicU64,
    refused: AtomicU64,
    header_timeouts: AtomicU64,
    accept_errors: AtomicU64,
}

impl HttpStats {
    fn families(&self) -> Vec<Family> {
        let ts = now_ms();
        let counter = |name: &str, kind: MetricType, help: &str, value: &AtomicU64| {
            let mut family = Family::new(name, kind, help);
            family.push(Labels::new(), ts, value.load(Ordering::Relaxed) as f64);
            family
        };
        vec![
            counter(
                "picket_aggregator_http_connections",
                MetricType::Gauge,
                "Open connections on the HTTP port.",
                &self.open,
            ),
            counter(
                "picket_aggregator_http_connections_accepted_total",
                MetricType::Counter,
                "Connections accepted on the HTTP port.",
                &self.accepted,
            ),
            counter(
                "picket_aggregator_http_connections_refused_total",
                MetricType::Counter,
                "Connections closed at once because http.max_connections were open.",
                &self.refused,
            ),
            counter(
                "picket_aggregator_http_header_timeouts_total",
                MetricType::Counter,
                "Connections closed because a request head did not arrive within http.header_read_timeout.",
                &self.header_timeouts,
            ),
            counter(
                "picket_aggregator_http_accept_errors_total",
                MetricType::Counter,
                "Failed accepts on the HTTP port (a peer gone before the accept, or no file descriptors left).",
                &self.accept_errors,
            ),
        ]
    }
}

pub struct HttpState {
    pub registry: Arc<Registry>,
    pub sinks: Arc<Sinks>,
    pub grpc_listening: AtomicBool,
    pub intake: Arc<Intake>,
    pub grpc_connections: Arc<GrpcConnections>,
    pub http_stats: Arc<HttpStats>,
    /// The gRPC port's reloading TLS (`None` with `tls.insecure`).
    pub tls: Option<Arc<crate::tls_reload::ReloadingTls>>,
}

/// Resolves once `shutdown` turns true (or its sender is gone).
async fn stopped(shutdown: &mut watch::Receiver<bool>) {
    let _ = shutdown.wait_for(|stop| *stop).await;
}

/// Serves `router` on `listener` with `config`'s limits until `shutdown` turns true; then
/// stops accepting, lets open connections finish their request and returns once all are
/// closed.
pub async fn serve(
    listener: TcpListener,
    router: Router,
    config: HttpConfig,
    stats: Arc<HttpStats>,
    mut shutdown: watch::Receiver<bool>,
) {
    let max = config.max_connections;
    let permits = Arc::new(Semaphore::new(max));
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(config.header_read_timeout);
    loop {
        let accepted = tokio::select! {
            _ = stopped(&mut shutdown) => break,
            accepted = listener.accept() => accepted,
        };
        let (stream, _) = match accepted {
            Ok(accepted) => accepted,
            Err(e) => {
                stats.accept_errors.fetch_add(1, Ordering::Relaxed);
                if !matches!(
                    e.kind(),
                    std::io::ErrorKind::ConnectionAborted
                        | std::io::ErrorKind::ConnectionReset
                        | std::io::ErrorKind::Interrupted
                ) {
                    tracing::warn!(error = %e, "cannot accept HTTP connections");
                    tokio::time::sleep(ACCEPT_ERROR_PAUSE).await;
                }
                continue;
            }
        };
        // Closing an excess connection at once costs the client one round trip and us
        // nothing; queueing it would let a flood hold file descriptors.
        let Ok(permit) = permits.clone().try_acquire_owned() else {
            stats.refused.fetch_add(1, Ordering::Relaxed);
            tracing::debug!(
                max,
                "refusing an HTTP connection: http.max_connections open"
            );
            continue;
        };
        let _ = stream.set_nodelay(true);
        stats.accepted.fetch_add(1, Ordering::Relaxed);
        stats.open.fetch_add(1, Ordering::Relaxed);
        let connection = builder.serve_connection(
            TokioIo::new(stream),
            TowerToHyperService::new(router.clone()),
        );
        let stats = stats.clone();
        let mut stop = shutdown.clone();
        tokio::spawn(async move {
            let mut connection = std::pin::pin!(connection);
            let result = tokio::select! {
                result = connection.as_mut() => result,
                _ = stopped(&mut stop) => {
                    // Finishes the request in progress, then closes.
                    connection.as_mut().graceful_shutdown();
                    connection.await
                }
            };
            if let Err(e) = result {
                if e.is_timeout() {
                    stats.header_timeouts.fetch_add(1, Ordering::Relaxed);
                    tracing::debug!(
                        "closed an HTTP connection: no request head within http.header_read_timeout"
                    );
                } else {
                    tracing::debug!(error = %e, "HTTP connection ended with an error");
                }
            }
            stats.open.fetch_sub(1, Ordering::Relaxed);
            drop(permit);
        });
    }
    drop(listener);
    // Every connection holds a permit until it closes.
    let _ = permits
        .acquire_many(u32::try_from(max).unwrap_or(u32::MAX))
        .await;
}

/// The routes, plus `receivers`' (the enabled push receivers), which bring their own state.
pub fn router(state: Arc<HttpState>, receivers: Vec<Router>) -> Router {
    let mut router = Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .with_state(state);
    for receiver in receivers {
        router = router.merge(receiver);
    }
    router
}

/// Text 0.0.4 or OpenMetrics, as the scraper's `Accept` header asks. Agents' samples keep
/// their collection timestamps, so Prometheus stores when a value was measured rather than
/// when it was scraped.
async fn metrics(
    State(state): State<Arc<HttpState>>,
    headers: axum::http::HeaderMap,
) -> impl IntoResponse {
    let format = Format::negotiate(headers.get(header::ACCEPT).and_then(|v| v.to_str().ok()));
    let mut body = String::with_capacity(64 * 1024);
    exposition::write_families_as(&mut body, &state.sinks.latest.snapshot(), true, format);
    exposition::write_families_as(&mut body, &self_metrics(&state), false, format);
    exposition::finish(&mut body, format);
    ([(header::CONTENT_TYPE, format.content_type())], body)
}

fn self_metrics(state: &HttpState) -> Vec<Family> {
    let ts = now_ms();
    let mut families = state.registry.families();
    let mut series = Family::new(
        "picket_aggregator_series",
        MetricType::Gauge,
        "Live series served at /metrics.",
    );
    series.push(Labels::new(), ts, state.sinks.latest.series_count() as f64);
    let mut build = Family::new(
        "picket_aggregator_build_info",
        MetricType::Gauge,
        "Aggregator version.",
    );
    build.push(
        Labels::from_pairs([("version", env!("CARGO_PKG_VERSION"))]),
        ts,
        1.0,
    );
    families.extend(state.sinks.families());
    families.extend(state.intake.families());
    families.extend(state.grpc_connections.families());
    families.extend(state.http_stats.families());
    if let Some(tls) = &state.tls {
        families.extend(tls.families());
    }
    families.push(series);
    families.push(build);
    families
}

async fn readyz(State(state): State<Arc<HttpState>>) -> (StatusCode, &'static str) {
    if !state.grpc_listening.load(Ordering::Relaxed) {
        (StatusCode::SERVICE_UNAVAILABLE, "grpc listener not up\n")
    } else if !state.sinks.healthy() {
        (StatusCode::SERVICE_UNAVAILABLE, "a sink is failing\n")
    } else {
        (StatusCode::OK, "ready\n")
    }
}

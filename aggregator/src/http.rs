//! The aggregator's HTTP port: `/metrics` (the latest sample of every live series plus the
//! aggregator's own `picket_aggregator_*` metrics), `/healthz` (the process is alive) and
//! `/readyz` (the gRPC listener is up and every sink is usable).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use picket_core::exposition::{self, Format};
use picket_core::model::{Family, Labels, MetricType, now_ms};

use crate::agents::Registry;
use crate::receivers::Intake;
use crate::sinks::Sinks;

pub struct HttpState {
    pub registry: Arc<Registry>,
    pub sinks: Arc<Sinks>,
    pub grpc_listening: AtomicBool,
    pub intake: Arc<Intake>,
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

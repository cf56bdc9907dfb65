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
use picket_core::exposition;
use picket_core::model::{Family, Labels, MetricType, now_ms};

use crate::agents::Registry;
use crate::sinks::Sinks;

pub struct HttpState {
    pub registry: Arc<Registry>,
    pub sinks: Arc<Sinks>,
    pub grpc_listening: AtomicBool,
}

pub fn router(state: Arc<HttpState>) -> Router {
    Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .with_state(state)
}

async fn metrics(State(state): State<Arc<HttpState>>) -> impl IntoResponse {
    let mut body = String::with_capacity(64 * 1024);
    exposition::write_families(&mut body, &state.sinks.latest.snapshot(), true);
    exposition::write_families(&mut body, &self_metrics(&state), false);
    ([(header::CONTENT_TYPE, exposition::CONTENT_TYPE)], body)
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

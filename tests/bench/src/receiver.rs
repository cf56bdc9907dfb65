//! A remote-write endpoint that keeps nothing: it decompresses and parses each request and
//! counts its samples. Both relays under
//! test (the aggregator and vmagent) write to it, so neither is limited by a database.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use anyhow::{Context, Result};
use axum::body::Bytes;
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::post;

use crate::wire::for_each_field;

#[derive(Default)]
pub struct Received {
    pub samples: AtomicU64,
    pub requests: AtomicU64,
    pub bad_requests: AtomicU64,
}

pub struct NullReceiver {
    pub addr: SocketAddr,
    pub received: Arc<Received>,
    task: tokio::task::JoinHandle<()>,
}

impl NullReceiver {
    pub async fn start() -> Result<NullReceiver> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .context("bind the null receiver")?;
        let addr = listener.local_addr()?;
        let received = Arc::new(Received::default());
        let app = axum::Router::new()
            .route("/api/v1/write", post(write))
            .with_state(received.clone());
        let task = tokio::spawn(async move {
            if let Err(e) = axum::serve(listener, app).await {
                eprintln!("null receiver stopped: {e}");
            }
        });
        Ok(NullReceiver {
            addr,
            received,
            task,
        })
    }

    pub fn url(&self) -> String {
        format!("http://{}/api/v1/write", self.addr)
    }

    pub fn samples(&self) -> u64 {
        self.received.samples.load(Ordering::Relaxed)
    }
}

impl Drop for NullReceiver {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn write(State(received): State<Arc<Received>>, body: Bytes) -> StatusCode {
    let Ok(raw) = snap::raw::Decoder::new().decompress_vec(&body) else {
        received.bad_requests.fetch_add(1, Ordering::Relaxed);
        return StatusCode::BAD_REQUEST;
    };
    let mut samples = 0u64;
    let parsed = for_each_field(&raw, |field, _, series, _| {
        if field != 1 {
            return;
        }
        for_each_field(series, |field, _, _, _| {
            if field == 2 {
                samples += 1;
            }
        });
    });
    if parsed.is_none() {
        received.bad_requests.fetch_add(1, Ordering::Relaxed);
        return StatusCode::BAD_REQUEST;
    }
    received.samples.fetch_add(samples, Ordering::Relaxed);
    received.requests.fetch_add(1, Ordering::Relaxed);
    StatusCode::NO_CONTENT
}

//! A scripted HTTP server for the sinks' error-path tests: statuses a real database will not
//! produce on demand (429 with `Retry-After`, 413, 503). Answers from a script, then 204.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, Uri};
use axum::response::IntoResponse;

#[derive(Clone, Debug)]
pub struct Received {
    pub target: String,
    pub headers: HeaderMap,
    pub body: Vec<u8>,
}

/// Status, extra headers, body.
type Reply = (u16, Vec<(&'static str, String)>, String);

#[derive(Default)]
struct Script {
    replies: VecDeque<Reply>,
    received: Vec<Received>,
}

#[derive(Clone)]
pub struct MockServer {
    pub addr: SocketAddr,
    script: Arc<Mutex<Script>>,
}

impl MockServer {
    pub async fn start() -> MockServer {
        let script = Arc::new(Mutex::new(Script::default()));
        let app = axum::Router::new()
            .fallback(axum::routing::post(handle))
            .with_state(script.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        MockServer { addr, script }
    }

    /// Queues one reply.
    pub fn reply(&self, status: u16, headers: &[(&'static str, &str)], body: &str) {
        let headers = headers.iter().map(|(k, v)| (*k, v.to_string())).collect();
        self.script
            .lock()
            .unwrap()
            .replies
            .push_back((status, headers, body.to_owned()));
    }

    pub fn received(&self) -> Vec<Received> {
        self.script.lock().unwrap().received.clone()
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }
}

async fn handle(
    State(script): State<Arc<Mutex<Script>>>,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> impl IntoResponse {
    let mut script = script.lock().unwrap();
    script.received.push(Received {
        target: uri.to_string(),
        headers,
        body: body.to_vec(),
    });
    let (status, extra, body) =
        script
            .replies
            .pop_front()
            .unwrap_or((204, Vec::new(), String::new()));
    let mut response = (StatusCode::from_u16(status).unwrap(), body).into_response();
    for (name, value) in extra {
        response.headers_mut().insert(name, value.parse().unwrap());
    }
    response
}

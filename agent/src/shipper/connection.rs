//! One gRPC stream to one aggregator: connecting (TLS, mutual TLS, compression, keepalives),
//! sending batches, and receiving acks.
//!
//! TLS files are read at every connection attempt, so certificates renewed on disk are picked
//! up on the next reconnect and an agent installed before its certificates arrive starts
//! working as soon as they do.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use picket_proto::v1::{self, agent_message, ingest_client::IngestClient};
use tokio::sync::mpsc;
use tokio::sync::mpsc::error::TrySendError;
use tokio::time::Instant;
use tokio_stream::wrappers::ReceiverStream;
use tonic::codec::{CompressionEncoding, Streaming};
use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, Identity};

use crate::config::{AgentConfig, Compression, TlsLink};

#[derive(Debug, thiserror::Error)]
pub enum ConnectionError {
    #[error("TLS set-up: {0}")]
    Tls(String),
    #[error("invalid endpoint: {0}")]
    Endpoint(String),
    #[error("connect: {0}")]
    Connect(String),
    #[error("timed out after {0:?}")]
    Timeout(Duration),
    #[error("aggregator answered {code:?}: {message}")]
    Status { code: tonic::Code, message: String },
    #[error("aggregator closed the stream")]
    Closed,
    #[error("no acknowledgement within {0:?}")]
    AckTimeout(Duration),
}

impl ConnectionError {
    /// The aggregator refused a message as larger than its `grpc.max_message_bytes`.
    pub fn batch_too_large(&self) -> bool {
        matches!(
            self,
            ConnectionError::Status {
                code: tonic::Code::OutOfRange,
                ..
            }
        )
    }

    /// Whether to try the next endpoint rather than this one again.
    pub fn rotate_endpoint(&self) -> bool {
        !self.batch_too_large()
    }
}

impl From<tonic::Status> for ConnectionError {
    fn from(status: tonic::Status) -> Self {
        ConnectionError::Status {
            code: status.code(),
            message: status.message().to_owned(),
        }
    }
}

pub type Connecting = Pin<Box<dyn Future<Output = Result<Connection, ConnectionError>> + Send>>;

pub struct Connection {
    pub endpoint: String,
    tx: mpsc::Sender<v1::AgentMessage>,
    acks: Streaming<v1::Ack>,
    /// Highest sequence sent on this connection.
    pub sent_through: u64,
    /// Since when the oldest unacked batch on this connection has waited.
    waiting_since: Option<Instant>,
    ack_timeout: Duration,
}

impl Connection {
    /// Queues a batch on the stream. `Ok(false)` when the send window is full.
    pub fn try_send(&mut self, batch: v1::Batch) -> Result<bool, ConnectionError> {
        let sequence = batch.sequence;
        let message = v1::AgentMessage {
            kind: Some(agent_message::Kind::Batch(batch)),
        };
        match self.tx.try_send(message) {
            Ok(()) => {
                self.sent_through = sequence;
                self.waiting_since.get_or_insert_with(Instant::now);
                Ok(true)
            }
            Err(TrySendError::Full(_)) => Ok(false),
            Err(TrySendError::Closed(_)) => Err(ConnectionError::Closed),
        }
    }

    pub async fn next_ack(&mut self) -> Result<v1::Ack, ConnectionError> {
        match self.acks.message().await {
            Ok(Some(ack)) => {
                // Progress: restart the clock for whatever is still in flight.
                self.waiting_since = (ack.sequence < self.sent_through).then(Instant::now);
                Ok(ack)
            }
            Ok(None) => Err(ConnectionError::Closed),
            Err(status) => Err(status.into()),
        }
    }

    /// When the connection is considered dead if no ack arrives.
    pub fn ack_deadline(&self) -> Option<Instant> {
        self.waiting_since.map(|t| t + self.ack_timeout)
    }
}

/// Starts connecting to `endpoint`; the future resolves once the stream is open and the hello
/// is queued.
pub fn connect(config: Arc<AgentConfig>, endpoint: String, hello: v1::Hello) -> Connecting {
    Box::pin(async move {
        let link = &config.aggregator;
        let mut ep = Endpoint::from_shared(endpoint.clone())
            .map_err(|e| ConnectionError::Endpoint(format!("{endpoint}: {e}")))?
            .connect_timeout(link.connect_timeout)
            .tcp_nodelay(true)
            .http2_keep_alive_interval(link.keepalive_interval)
            .keep_alive_timeout(link.keepalive_timeout)
            .keep_alive_while_idle(true)
            .user_agent(format!("picket-agent/{}", env!("CARGO_PKG_VERSION")))
            .map_err(|e| ConnectionError::Endpoint(e.to_string()))?;
        if !link.tls.insecure {
            ep = ep
                .tls_config(client_tls(&link.tls)?)
                .map_err(|e| ConnectionError::Tls(error_chain(&e)))?;
        }
        let channel = tokio::time::timeout(link.connect_timeout, ep.connect())
            .await
            .map_err(|_| ConnectionError::Timeout(link.connect_timeout))?
            .map_err(|e| ConnectionError::Connect(error_chain(&e)))?;
        let mut client = IngestClient::new(channel);
        client = match link.compression {
            Compression::None => client,
            Compression::Gzip => client.send_compressed(CompressionEncoding::Gzip),
            Compression::Zstd => client.send_compressed(CompressionEncoding::Zstd),
        };
        let (tx, rx) = mpsc::channel(link.max_in_flight.get() + 1);
        let hello = v1::AgentMessage {
            kind: Some(agent_message::Kind::Hello(hello)),
        };
        tx.try_send(hello).map_err(|_| ConnectionError::Closed)?;
        let response =
            tokio::time::timeout(link.connect_timeout, client.stream(ReceiverStream::new(rx)))
                .await
                .map_err(|_| ConnectionError::Timeout(link.connect_timeout))??;
        Ok(Connection {
            endpoint,
            tx,
            acks: response.into_inner(),
            sent_through: 0,
            waiting_since: None,
            ack_timeout: link.ack_timeout,
        })
    })
}

fn client_tls(tls: &TlsLink) -> Result<ClientTlsConfig, ConnectionError> {
    let bad = |key: &str, e: picket_core::tls::TlsFileError| {
        ConnectionError::Tls(format!("aggregator.tls.{key}: {e}"))
    };
    let ca = picket_core::tls::read_certificates(&tls.ca).map_err(|e| bad("ca", e))?;
    let mut config = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(ca.pem));
    if let (Some(cert), Some(key)) = (&tls.cert, &tls.key) {
        let cert = picket_core::tls::read_certificates(cert).map_err(|e| bad("cert", e))?;
        let key = picket_core::tls::read_private_key(key).map_err(|e| bad("key", e))?;
        config = config.identity(Identity::from_pem(cert.pem, key));
    }
    if let Some(name) = &tls.server_name {
        config = config.domain_name(name.clone());
    }
    Ok(config)
}

/// "a: b: c" from an error and its sources; tonic's top-level transport errors alone say
/// little ("transport error").
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        out.push_str(": ");
        out.push_str(&s.to_string());
        source = s.source();
    }
    out
}

//! A bare gRPC client for protocol tests: lets a test send exactly the messages it wants,
//! including ones a real agent never would.

use std::path::Path;
use std::time::Duration;

use picket_core::codec::BatchEncoder;
use picket_core::model::{Family, Labels, MetricType};
use picket_proto::v1::{self, agent_message, ingest_client::IngestClient};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::codec::Streaming;
use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, Identity};

/// One Ingest stream: `M` is what the test sends, an `AgentMessage` or, to send bytes no
/// agent would, a `ReceivedAgentMessage` (the same wire form, with a batch as raw bytes).
pub struct RawStream<M = v1::AgentMessage> {
    pub tx: mpsc::Sender<M>,
    pub acks: Streaming<v1::Ack>,
}

pub struct ClientTls<'a> {
    pub ca: &'a Path,
    pub identity: Option<(&'a Path, &'a Path)>,
}

/// Opens a channel to `endpoint`, with TLS when `tls` is given.
pub async fn channel(
    endpoint: &str,
    tls: Option<ClientTls<'_>>,
) -> Result<tonic::transport::Channel, String> {
    let mut ep = Endpoint::from_shared(endpoint.to_owned())
        .map_err(|e| e.to_string())?
        .connect_timeout(Duration::from_secs(5));
    if let Some(tls) = tls {
        let ca = std::fs::read(tls.ca).map_err(|e| e.to_string())?;
        let mut config = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(ca));
        if let Some((cert, key)) = tls.identity {
            let cert = std::fs::read(cert).map_err(|e| e.to_string())?;
            let key = std::fs::read(key).map_err(|e| e.to_string())?;
            config = config.identity(Identity::from_pem(cert, key));
        }
        ep = ep.tls_config(config).map_err(|e| e.to_string())?;
    }
    ep.connect().await.map_err(|e| format!("{e:?}"))
}

/// Opens a stream and sends `hello` (if any) as its first message.
pub async fn open(
    channel: tonic::transport::Channel,
    hello: Option<v1::Hello>,
) -> Result<RawStream, tonic::Status> {
    open_compressed(channel, hello, None).await
}

/// [`open`], with the stream's messages compressed with `compression`, as agents send them.
pub async fn open_compressed(
    channel: tonic::transport::Channel,
    hello: Option<v1::Hello>,
    compression: Option<tonic::codec::CompressionEncoding>,
) -> Result<RawStream, tonic::Status> {
    let (tx, rx) = mpsc::channel(64);
    if let Some(hello) = hello {
        tx.send(v1::AgentMessage {
            kind: Some(agent_message::Kind::Hello(hello)),
        })
        .await
        .map_err(|_| tonic::Status::internal("channel closed"))?;
    }
    let mut client = IngestClient::new(channel).max_encoding_message_size(64 * 1024 * 1024);
    if let Some(compression) = compression {
        client = client.send_compressed(compression);
    }
    let response = client.stream(ReceiverStream::new(rx)).await?;
    Ok(RawStream {
        tx,
        acks: response.into_inner(),
    })
}

/// Opens a stream that sends [`v1::ReceivedAgentMessage`]s, starting with `hello`: a batch
/// is whatever bytes the test puts in it.
pub async fn open_bytes(
    channel: tonic::transport::Channel,
    hello: v1::Hello,
) -> Result<RawStream<v1::ReceivedAgentMessage>, tonic::Status> {
    let (tx, rx) = mpsc::channel(64);
    tx.send(v1::ReceivedAgentMessage {
        kind: Some(v1::received_agent_message::Kind::Hello(hello)),
    })
    .await
    .map_err(|_| tonic::Status::internal("channel closed"))?;
    let mut grpc = tonic::client::Grpc::new(channel);
    grpc.ready()
        .await
        .map_err(|e| tonic::Status::unavailable(e.to_string()))?;
    let codec = tonic_prost::ProstCodec::<v1::ReceivedAgentMessage, v1::Ack>::default();
    let path = http::uri::PathAndQuery::from_static("/picket.v1.Ingest/Stream");
    let response = grpc
        .streaming(tonic::Request::new(ReceiverStream::new(rx)), path, codec)
        .await?;
    Ok(RawStream {
        tx,
        acks: response.into_inner(),
    })
}

pub fn hello(instance: &str, session_id: u64) -> v1::Hello {
    v1::Hello {
        protocol_revision: picket_proto::PROTOCOL_REVISION,
        instance: instance.to_owned(),
        session_id,
        agent_version: "raw-test-client".into(),
        interval_ms: 1000,
    }
}

/// A valid batch of `series` gauge series named `name`, all at `timestamp_ms`.
pub fn batch(
    sequence: u64,
    instance: &str,
    name: &str,
    series: usize,
    timestamp_ms: i64,
) -> v1::Batch {
    let mut family = Family::new(name, MetricType::Gauge, "test gauge");
    for i in 0..series {
        family.push(
            Labels::from_pairs([("n", i.to_string())]),
            timestamp_ms,
            i as f64,
        );
    }
    let mut encoder = BatchEncoder::new(&Labels::from_pairs([("instance", instance)]));
    encoder.push(&family);
    encoder.finish(sequence)
}

impl RawStream {
    pub async fn send_batch(&self, batch: v1::Batch) {
        let _ = self
            .tx
            .send(v1::AgentMessage {
                kind: Some(agent_message::Kind::Batch(batch)),
            })
            .await;
    }
}

impl<M> RawStream<M> {
    /// The next ack, or the status that ended the stream.
    pub async fn next(&mut self) -> Result<v1::Ack, tonic::Status> {
        match tokio::time::timeout(Duration::from_secs(15), self.acks.message()).await {
            Err(_) => Err(tonic::Status::deadline_exceeded("test: no ack within 15s")),
            Ok(Ok(Some(ack))) => Ok(ack),
            Ok(Ok(None)) => Err(tonic::Status::cancelled("test: stream ended")),
            Ok(Err(status)) => Err(status),
        }
    }
}

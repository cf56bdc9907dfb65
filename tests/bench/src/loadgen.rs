//! Simulated agents: N gRPC streams over TLS (one connection each, as real agents have),
//! speaking the agent protocol (hello, numbered batches, in-order acks) with pre-encoded
//! batches from [`crate::wire`], so the generator's own CPU stays small next to the
//! aggregator's.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use anyhow::{Context, Result, anyhow};
use bytes::{Buf, BufMut, Bytes};
use picket_proto::v1;
use prost::Message;
use tokio::sync::{Semaphore, mpsc};
use tokio_stream::wrappers::ReceiverStream;
use tonic::codec::{Codec, CompressionEncoding, DecodeBuf, Decoder, EncodeBuf, Encoder};
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint};

use crate::wire::{self, SeriesShape, Template};

/// How the simulated agents send.
#[derive(Clone, Copy, Debug)]
pub enum Pace {
    /// As fast as acks come back, with up to `window` batches unacknowledged per stream.
    Flood { window: usize },
    /// One batch per agent every `interval` (agents spread evenly over it), as real agents do.
    Every { interval: Duration },
}

#[derive(Clone, Debug)]
pub struct LoadSpec {
    /// `https://127.0.0.1:PORT`
    pub endpoint: String,
    /// CA that signed the aggregator's certificate.
    pub ca: PathBuf,
    pub agents: usize,
    pub shape: SeriesShape,
    pub pace: Pace,
    /// zstd, as agents send by default.
    pub compress: bool,
    /// Instance names are `<prefix>-<n>`.
    pub prefix: String,
    /// Batches each agent sends before it stops by itself (None: until [`Load::stop`]).
    pub rounds: Option<u64>,
}

/// Counters shared by every simulated agent.
#[derive(Default)]
pub struct LoadStats {
    pub sent_batches: AtomicU64,
    pub acked_samples: AtomicU64,
    pub acked_batches: AtomicU64,
    pub duplicates: AtomicU64,
    pub rejected: AtomicU64,
    /// Paced rounds skipped because the agent's window was full (the aggregator fell behind).
    pub skipped_rounds: AtomicU64,
    pub stream_errors: AtomicU64,
}

/// A running load: stop it with [`Load::stop`].
pub struct Load {
    pub stats: Arc<LoadStats>,
    stop: Arc<AtomicBool>,
    tasks: Vec<tokio::task::JoinHandle<Result<()>>>,
}

/// Connects every simulated agent (64 handshakes at a time) and starts sending.
pub async fn start(spec: &LoadSpec) -> Result<Load> {
    let ca = std::fs::read(&spec.ca).with_context(|| format!("read {}", spec.ca.display()))?;
    let tls = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(ca));
    let stats = Arc::new(LoadStats::default());
    let stop = Arc::new(AtomicBool::new(false));
    let handshakes = Arc::new(Semaphore::new(64));
    let mut connecting = Vec::with_capacity(spec.agents);
    for n in 0..spec.agents {
        let endpoint = Endpoint::from_shared(spec.endpoint.clone())?
            .connect_timeout(Duration::from_secs(30))
            .tls_config(tls.clone())?;
        let handshakes = handshakes.clone();
        connecting.push(tokio::spawn(async move {
            let _permit = handshakes.acquire().await;
            endpoint
                .connect()
                .await
                .map_err(|e| anyhow!("agent {n}: connect: {e:?}"))
        }));
    }
    let mut channels = Vec::with_capacity(spec.agents);
    for c in connecting {
        channels.push(c.await??);
    }
    let mut tasks = Vec::with_capacity(spec.agents);
    for (n, channel) in channels.into_iter().enumerate() {
        let instance = format!("{}-{n}", spec.prefix);
        let series = wire::flink_like_series(n, spec.shape);
        let template = wire::batch_template(&instance, &series);
        let agent = SimulatedAgent {
            instance,
            template,
            pace: spec.pace,
            // Real agents start at random points of their interval; spread them evenly.
            offset: match spec.pace {
                Pace::Every { interval } => interval.mul_f64(n as f64 / spec.agents as f64),
                Pace::Flood { .. } => Duration::ZERO,
            },
            stats: stats.clone(),
            stop: stop.clone(),
            rounds: spec.rounds.unwrap_or(u64::MAX),
            last_timestamp: 0,
        };
        tasks.push(tokio::spawn(agent.run(channel, spec.compress)));
    }
    Ok(Load { stats, stop, tasks })
}

impl Load {
    /// Stops sending, waits for the outstanding acks, and reports the first stream error.
    pub async fn stop(self) -> Result<Arc<LoadStats>> {
        self.stop.store(true, Ordering::Relaxed);
        let mut first_error = None;
        for task in self.tasks {
            if let Err(e) = task.await? {
                first_error.get_or_insert(e);
            }
        }
        match first_error {
            Some(e) => Err(e),
            None => Ok(self.stats),
        }
    }
}

struct SimulatedAgent {
    instance: String,
    template: Template,
    pace: Pace,
    offset: Duration,
    stats: Arc<LoadStats>,
    stop: Arc<AtomicBool>,
    rounds: u64,
    last_timestamp: i64,
}

impl SimulatedAgent {
    async fn run(mut self, channel: Channel, compress: bool) -> Result<()> {
        let result = self.stream(channel, compress).await;
        if result.is_err() {
            self.stats.stream_errors.fetch_add(1, Ordering::Relaxed);
        }
        result.with_context(|| format!("simulated agent {}", self.instance))
    }

    async fn stream(&mut self, channel: Channel, compress: bool) -> Result<()> {
        let window = match self.pace {
            Pace::Flood { window } => window.max(1),
            Pace::Every { .. } => 8,
        };
        let (tx, rx) = mpsc::channel::<Bytes>(window + 1);
        let hello = v1::AgentMessage {
            kind: Some(v1::agent_message::Kind::Hello(v1::Hello {
                protocol_revision: picket_proto::PROTOCOL_REVISION,
                instance: self.instance.clone(),
                session_id: fastrand::u64(..),
                agent_version: "picket-bench".into(),
                interval_ms: match self.pace {
                    Pace::Every { interval } => interval.as_millis() as u32,
                    Pace::Flood { .. } => 1000,
                },
            })),
        };
        tx.send(hello.encode_to_vec().into())
            .await
            .map_err(|_| anyhow!("stream closed before hello"))?;
        let mut grpc = tonic::client::Grpc::new(channel).max_encoding_message_size(64 << 20);
        if compress {
            grpc = grpc.send_compressed(CompressionEncoding::Zstd);
        }
        grpc.ready().await.context("channel not ready")?;
        let path = http::uri::PathAndQuery::from_static("/picket.v1.Ingest/Stream");
        let response = grpc
            .streaming(tonic::Request::new(ReceiverStream::new(rx)), path, RawCodec)
            .await
            .context("open stream")?;
        let mut acks = response.into_inner();
        let samples = self.template.samples() as u64;
        let mut in_flight = std::collections::VecDeque::<u64>::new();
        let mut sequence = 0u64;
        let mut ticker = match self.pace {
            Pace::Every { interval } => {
                let mut t =
                    tokio::time::interval_at(tokio::time::Instant::now() + self.offset, interval);
                t.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
                Some(t)
            }
            Pace::Flood { .. } => None,
        };
        loop {
            let stopping = self.stop.load(Ordering::Relaxed) || sequence >= self.rounds;
            if stopping && in_flight.is_empty() {
                return Ok(());
            }
            let may_send = !stopping && in_flight.len() < window;
            let ack = match &mut ticker {
                None if may_send => {
                    sequence += 1;
                    self.send(&tx, sequence, &mut in_flight).await?;
                    continue;
                }
                None => acks.message().await,
                Some(ticker) => {
                    tokio::select! {
                        _ = ticker.tick(), if !stopping => {
                            if may_send {
                                sequence += 1;
                                self.send(&tx, sequence, &mut in_flight).await?;
                            } else {
                                self.stats.skipped_rounds.fetch_add(1, Ordering::Relaxed);
                            }
                            continue;
                        }
                        ack = acks.message() => ack,
                        // Wake up now and then to notice `stop` while idle.
                        _ = tokio::time::sleep(Duration::from_millis(100)), if stopping || in_flight.is_empty() => continue,
                    }
                }
            };
            let ack = ack
                .context("ack stream")?
                .ok_or_else(|| anyhow!("aggregator ended the stream"))?;
            let Some(expected) = in_flight.pop_front() else {
                return Err(anyhow!("ack {} for nothing in flight", ack.sequence));
            };
            if ack.sequence != expected {
                return Err(anyhow!("ack {} while {expected} was next", ack.sequence));
            }
            match ack.outcome {
                Some(v1::ack::Outcome::Accepted(a)) => {
                    if a.duplicate {
                        self.stats.duplicates.fetch_add(1, Ordering::Relaxed);
                    } else {
                        self.stats
                            .acked_samples
                            .fetch_add(samples, Ordering::Relaxed);
                        self.stats.acked_batches.fetch_add(1, Ordering::Relaxed);
                    }
                }
                _ => {
                    self.stats.rejected.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
    }

    async fn send(
        &mut self,
        tx: &mpsc::Sender<Bytes>,
        sequence: u64,
        in_flight: &mut std::collections::VecDeque<u64>,
    ) -> Result<()> {
        // Strictly increasing per agent, as a real agent's rounds are: two batches in the
        // same millisecond would be the same sample twice to a database.
        let now = crate::now_ms().max(self.last_timestamp + 1);
        self.last_timestamp = now;
        self.template.patch(now, sequence as f64);
        tx.send(wire::agent_message(sequence, &self.template))
            .await
            .map_err(|_| anyhow!("stream closed"))?;
        in_flight.push_back(sequence);
        self.stats.sent_batches.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }
}

/// A gRPC codec that sends pre-encoded `AgentMessage` bytes and decodes `Ack`s.
#[derive(Clone, Copy, Default)]
pub struct RawCodec;

pub struct RawEncoder;
pub struct AckDecoder;

impl Codec for RawCodec {
    type Encode = Bytes;
    type Decode = v1::Ack;
    type Encoder = RawEncoder;
    type Decoder = AckDecoder;

    fn encoder(&mut self) -> RawEncoder {
        RawEncoder
    }

    fn decoder(&mut self) -> AckDecoder {
        AckDecoder
    }
}

impl Encoder for RawEncoder {
    type Item = Bytes;
    type Error = tonic::Status;

    fn encode(&mut self, item: Bytes, dst: &mut EncodeBuf<'_>) -> Result<(), tonic::Status> {
        dst.put(item);
        Ok(())
    }
}

impl Decoder for AckDecoder {
    type Item = v1::Ack;
    type Error = tonic::Status;

    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<v1::Ack>, tonic::Status> {
        let len = src.remaining();
        v1::Ack::decode(src.copy_to_bytes(len))
            .map(Some)
            .map_err(|e| tonic::Status::internal(format!("bad ack: {e}")))
    }
}

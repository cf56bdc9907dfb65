//! The `picket.v1.Ingest` gRPC service: one long-lived stream per agent connection.
//!
//! A stream must open with a `Hello`; then each batch is validated, de-duplicated, handed to
//! the sinks and only then acknowledged, in order. A malformed batch gets a `Rejected` ack (the
//! agent drops it; resending cannot help) while the stream carries on. Protocol violations end
//! only the offending stream with a precise gRPC status, so one bad agent never disturbs the
//! others.

use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use picket_core::codec::{common_label, decode_flat_batch, validate_flat_batch, validate_points};
use picket_proto::v1::{
    self, BatchTemplate, FlatBatch, ingest_server::Ingest, received_agent_message as received,
};
use tokio::sync::mpsc;
use tokio_stream::Stream;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

use crate::agents::{Registry, SequenceCheck};
use crate::grpc_listener::{GrpcConnections, StreamGuard};
use crate::identity::common_name;
use crate::sinks::Sinks;
use crate::store::StoreRoute;

/// Acks queued per stream before the stream stops reading batches: a client that never reads
/// its acks stalls only itself.
const ACK_QUEUE: usize = 64;

pub struct IngestService {
    pub registry: Arc<Registry>,
    pub sinks: Arc<Sinks>,
    pub hello_timeout: Duration,
    /// A stream that sends nothing for this long, or does not take its acks for this long,
    /// is closed (the agent reconnects if alive).
    pub idle_timeout: Duration,
    /// Told about each stream, so a connection with one is not closed as idle.
    pub connections: Arc<GrpcConnections>,
}

type AckStream = Pin<Box<dyn Stream<Item = Result<v1::Ack, Status>> + Send>>;

#[tonic::async_trait]
impl Ingest for IngestService {
    type StreamStream = AckStream;

    async fn stream(
        &self,
        request: Request<Streaming<v1::ReceivedAgentMessage>>,
    ) -> Result<Response<AckStream>, Status> {
        let cert_identity = match request.peer_certs() {
            Some(certs) => match certs.first().and_then(|c| common_name(c.as_ref())) {
                Some(cn) => Some(cn),
                None => {
                    // A verified certificate without a name must not fall back to the name
                    // the hello claims: that would let it write as any agent.
                    self.registry.stream_rejected("certificate_without_name");
                    return Err(Status::unauthenticated(
                        "the client certificate has no common name; issue agent certificates with `picket-aggregator certs issue-agent NAME`",
                    ));
                }
            },
            None => None,
        };
        let peer = request.remote_addr();
        let connection = self.connections.stream_opened(peer);
        let remote = peer.map_or_else(|| "unknown".to_owned(), |a| a.to_string());
        let inbound = request.into_inner();
        let (tx, rx) = mpsc::channel(ACK_QUEUE);
        let session = StreamSession {
            registry: self.registry.clone(),
            sinks: self.sinks.clone(),
            hello_timeout: self.hello_timeout,
            idle_timeout: self.idle_timeout,
            cert_identity,
            remote,
            _connection: connection,
        };
        tokio::spawn(session.run(inbound, tx));
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }
}

struct StreamSession {
    registry: Arc<Registry>,
    sinks: Arc<Sinks>,
    hello_timeout: Duration,
    idle_timeout: Duration,
    cert_identity: Option<String>,
    remote: String,
    /// Held while the session runs: its connection has a stream.
    _connection: Option<StreamGuard>,
}

type AckSender = mpsc::Sender<Result<v1::Ack, Status>>;

impl StreamSession {
    async fn run(self, mut inbound: Streaming<v1::ReceivedAgentMessage>, tx: AckSender) {
        let hello = match tokio::time::timeout(self.hello_timeout, inbound.message()).await {
            Err(_) => {
                self.refuse(
                    &tx,
                    "hello_timeout",
                    Status::deadline_exceeded(format!(
                        "no Hello within {:?}; a stream must start with Hello",
                        self.hello_timeout
                    )),
                )
                .await;
                return;
            }
            Ok(Err(status)) => {
                tracing::debug!(remote = %self.remote, %status, "stream ended before hello");
                self.registry.stream_rejected("transport");
                return;
            }
            Ok(Ok(None)) => return,
            Ok(Ok(Some(v1::ReceivedAgentMessage {
                kind: Some(received::Kind::Hello(hello)),
            }))) => hello,
            Ok(Ok(Some(_))) => {
                self.refuse(
                    &tx,
                    "no_hello",
                    Status::failed_precondition("the first message of a stream must be Hello"),
                )
                .await;
                return;
            }
        };
        if hello.protocol_revision < 1 {
            self.refuse(
                &tx,
                "protocol",
                Status::failed_precondition(format!(
                    "protocol revision {} is not supported; this aggregator speaks revision {}",
                    hello.protocol_revision,
                    picket_proto::PROTOCOL_REVISION
                )),
            )
            .await;
            return;
        }
        let agent = match (&self.cert_identity, hello.instance.as_str()) {
            (Some(cn), claimed) => {
                if claimed != cn {
                    tracing::warn!(remote = %self.remote, certificate = %cn, claimed,
                        "agent's configured instance differs from its certificate; using the certificate's name");
                }
                cn.clone()
            }
            (None, "") => {
                self.refuse(
                    &tx,
                    "no_identity",
                    Status::invalid_argument(
                        "Hello.instance is empty and the connection has no client certificate",
                    ),
                )
                .await;
                return;
            }
            (None, claimed) => claimed.to_owned(),
        };
        let interval = Duration::from_millis(u64::from(hello.interval_ms.max(1000)));
        self.registry
            .connected(&agent, interval, &hello.agent_version);
        tracing::info!(%agent, remote = %self.remote, version = %hello.agent_version, "agent connected");
        let result = self
            .batches(&agent, hello.session_id, &mut inbound, &tx)
            .await;
        self.registry.disconnected(&agent);
        match result {
            Ok(()) => tracing::info!(%agent, "agent stream closed"),
            Err(status) => {
                tracing::warn!(%agent, %status, "agent stream ended with an error");
                // A peer that stopped reading acks would block a plain send forever.
                let _ = tx.try_send(Err(status));
            }
        }
    }

    async fn refuse(&self, tx: &AckSender, reason: &'static str, status: Status) {
        tracing::warn!(remote = %self.remote, %status, "refusing stream");
        self.registry.stream_rejected(reason);
        let _ = tx.try_send(Err(status));
    }

    async fn batches(
        &self,
        agent: &str,
        session: u64,
        inbound: &mut Streaming<v1::ReceivedAgentMessage>,
        tx: &AckSender,
    ) -> Result<(), Status> {
        let mut last_sequence = 0u64;
        // Only batches queued as received, unchanged, can skip the full validation: a file
        // sink or routing rules decode every batch anyway (constant for these sinks).
        let templates = !self.sinks.needs_families();
        let mut known = KnownBatch::default();
        loop {
            let next = tokio::time::timeout(self.idle_timeout, inbound.message()).await;
            let message = match next {
                Err(_) => {
                    return Err(Status::deadline_exceeded(format!(
                        "nothing received for {:?} (grpc.idle_timeout); closing the stream",
                        self.idle_timeout
                    )));
                }
                Ok(Ok(Some(m))) => m,
                Ok(Ok(None)) => return Ok(()),
                Ok(Err(status)) => {
                    // Oversized or undecodable messages arrive here. The status is passed back
                    // to the agent so it knows why.
                    return Err(status);
                }
            };
            let wire = match message.kind {
                Some(received::Kind::Batch(b)) => b.into_bytes(),
                Some(received::Kind::Hello(_)) => {
                    return Err(Status::failed_precondition(
                        "Hello sent twice on one stream",
                    ));
                }
                None => return Err(Status::invalid_argument("empty AgentMessage")),
            };
            // The batch arrives encoded (so it can be queued as sent). Bytes that are not a
            // Batch at all have no sequence to reject under: like any undecodable message,
            // they end the stream.
            let undecodable = |e: prost::DecodeError| {
                Status::invalid_argument(format!(
                    "AgentMessage.batch is not a valid picket.v1.Batch: {e}"
                ))
            };
            let reading = match known.read(&wire, templates) {
                Some(samples) => Reading::Known {
                    sequence: known.template.last_read().sequence,
                    samples,
                },
                None => Reading::Full(v1::read_received_batch(&wire).map_err(undecodable)?),
            };
            let sequence = reading.sequence();
            if sequence <= last_sequence {
                return Err(Status::invalid_argument(format!(
                    "batch sequence {sequence} does not increase (previous {last_sequence})"
                )));
            }
            last_sequence = sequence;
            // Queue appends and journal writes without fsync land in the page cache and
            // return in microseconds, so they run right here. `block_in_place` for every
            // batch moved the runtime's worker role to another thread each time, which spread
            // allocations over all of glibc's malloc arenas: 3-4x the relay's peak memory for
            // no throughput (docs/performance.md). When writes may wait for the disk (a file
            // sink fsyncs each batch, or recent writes were slow), the work moves off the
            // async workers, so a slow disk stalls other agents and keepalives at most for
            // the write that showed it.
            let outcome = if self.sinks.delivery_may_block() {
                tokio::task::block_in_place(|| {
                    self.accept(agent, session, &reading, &wire, &mut known)
                })?
            } else {
                self.accept(agent, session, &reading, &wire, &mut known)?
            };
            let ack = v1::Ack {
                sequence,
                outcome: Some(outcome),
            };
            // Done with the batch: not held while the peer takes its time reading acks.
            drop(reading);
            drop(wire);
            // A peer that stops reading acks fills its queue and then waits here; without a
            // bound it would hold its task and connection for ever.
            match tokio::time::timeout(self.idle_timeout, tx.send(Ok(ack))).await {
                Ok(Ok(())) => {}
                Ok(Err(_)) => return Ok(()),
                Err(_) => {
                    return Err(Status::deadline_exceeded(format!(
                        "acks not read for {:?} (grpc.idle_timeout); closing the stream",
                        self.idle_timeout
                    )));
                }
            }
        }
    }

    /// Validates and delivers one batch (`wire` is its encoding as received); the returned
    /// outcome is what the agent is told. `known` learns a batch that passed in full and is
    /// queued as received.
    fn accept(
        &self,
        agent: &str,
        session: u64,
        reading: &Reading,
        wire: &[u8],
        known: &mut KnownBatch,
    ) -> Result<v1::ack::Outcome, Status> {
        let sequence = reading.sequence();
        let duplicate = v1::ack::Outcome::Accepted(v1::Accepted { duplicate: true });
        if self.registry.check_sequence(agent, session, sequence) == SequenceCheck::AlreadyAccepted
            || self.sinks.already_delivered(agent, session, sequence)
        {
            self.registry.duplicate(agent);
            return Ok(duplicate);
        }
        let rejected = |e: picket_core::codec::DecodeError| {
            tracing::warn!(%agent, sequence, error = %e, "rejecting malformed batch");
            self.registry.rejected(agent);
            Ok(v1::ack::Outcome::Rejected(v1::Rejected {
                reason: e.to_string(),
            }))
        };
        let cannot_store = |e: crate::sinks::SinkError| {
            tracing::error!(%agent, error = %e, "a sink refused a batch; the agent will resend it");
            Status::unavailable(format!("aggregator cannot store the batch right now: {e}"))
        };
        let accepted = v1::ack::Outcome::Accepted(v1::Accepted { duplicate: false });
        let batch = match reading {
            Reading::Known { samples, .. } => {
                self.sinks
                    .deliver_wire(agent, session, sequence, wire, *samples)
                    .map_err(cannot_store)?;
                self.registry.accepted(agent, session, sequence, *samples);
                let latest = &self.sinks.latest;
                let points = known.template.last_read();
                if latest.is_enabled() && !latest.apply_points(points, &known.route) {
                    // The route is out of date (or the batch removes series): the full way,
                    // which routes again. It reads like a batch that was read in full, so
                    // this read cannot fail.
                    match v1::read_received_batch(wire) {
                        Ok(batch) => latest.apply_flat(&batch, &mut known.route),
                        Err(e) => {
                            tracing::error!(%agent, sequence, error = %e, "a batch read through its stream's template could not be read in full; not applied to /metrics");
                        }
                    }
                }
                return Ok(accepted);
            }
            Reading::Full(batch) => batch,
        };
        // When nothing needs the samples as label sets (no file sink or routing rules), the
        // batch is only validated, queued as received and applied to the `/metrics` store as
        // read in place: decoding it into label sets was the largest cost per sample (its
        // removal made the relay 1.77x cheaper relaying only, 1.28x with the store on).
        if !self.sinks.needs_families() {
            let samples = match validate_flat_batch(batch) {
                Ok(samples) => samples,
                Err(e) => return rejected(e),
            };
            let relabel =
                self.cert_identity.is_some() && common_label(batch, "instance") != Some(agent);
            if !relabel {
                self.sinks
                    .deliver_wire(agent, session, sequence, wire, samples)
                    .map_err(cannot_store)?;
                self.registry.accepted(agent, session, sequence, samples);
                // The route is this batch's from here on, so the known batch no longer
                // matches it until this batch is learnt.
                known.forget();
                self.sinks.latest.apply_flat(batch, &mut known.route);
                // Relabelling depends on the common labels only, which a batch read through
                // the template has: later batches like it are not relabelled either.
                known.learn(wire, samples);
                return Ok(accepted);
            }
            // The series need the certificate's name: decoded below like any batch.
        }
        let mut decoded = match decode_flat_batch(batch) {
            Ok(d) => d,
            Err(e) => return rejected(e),
        };
        let relabelled =
            self.cert_identity.is_some() && decoded.common_labels.get("instance") != Some(agent);
        if relabelled {
            for family in &mut decoded.families {
                for point in &mut family.points {
                    point.labels.insert("instance", agent);
                }
            }
        }
        let samples = decoded.sample_count();
        self.sinks
            .deliver(
                agent,
                session,
                sequence,
                &decoded.families,
                (!relabelled).then_some(wire),
            )
            .map_err(cannot_store)?;
        self.registry.accepted(agent, session, sequence, samples);
        Ok(accepted)
    }
}

/// A batch as ingest read it.
enum Reading<'w> {
    /// Read in full, to be validated.
    Full(FlatBatch<'w>),
    /// Read through the stream's template ([`KnownBatch::read`]): it reads like the stream's
    /// last batch that passed in full, and its points (`known.template.last_read()`) passed:
    /// valid, with that batch's sample count.
    Known { sequence: u64, samples: usize },
}

impl Reading<'_> {
    fn sequence(&self) -> u64 {
        match self {
            Reading::Full(batch) => batch.sequence,
            Reading::Known { sequence, .. } => *sequence,
        }
    }
}

/// An agent sends the same series every round, so each batch on a stream is mostly the one
/// before with other numbers: the same bytes but for the sequence, timestamps and values
/// ([`BatchTemplate`]). Checking symbols, label names and duplicates, types and sizes again
/// for it would find what it found last time; only the points need checking. And its series
/// are where the last one's went in the `/metrics` store, so its values go there by the route
/// that batch left ([`StoreRoute`]). Reading batches through templates (here and in the
/// remote-write sink) instead of reading their skeletons made a relaying aggregator 1.2×
/// cheaper per sample, and its null-sink ingest ten times per CPU-second (docs/performance.md).
///
/// It costs each stream its last batch that passed in full as a template (its bytes, where
/// its numbers are, its points as read: about 115 bytes per series of Flink-like batches) and
/// a route (12 bytes per series). A batch larger than [`KnownBatch::KEPT_BYTES`], or whose
/// template would take more than [`KnownBatch::KEPT_TEMPLATE_BYTES`] (a batch of bare points
/// costs up to about 20 times its size), is not learnt.
#[derive(Default)]
struct KnownBatch {
    /// The last batch that passed in full and was queued as received.
    template: BatchTemplate,
    /// That batch's samples (`None` before the first one, or after [`KnownBatch::forget`]).
    samples: Option<usize>,
    /// Where that batch's series are in the store.
    route: StoreRoute,
}

impl KnownBatch {
    /// Batches larger than this (more than about 10,000 series) are not learnt: such batches
    /// are checked in full each time, as they were before templates, rather than each stream
    /// holding a few times their size.
    const KEPT_BYTES: usize = 384 * 1024;

    /// Templates larger than this are not kept (about 3.3 times the batch for Flink-like
    /// series: 1.3 MiB for the largest batch kept).
    const KEPT_TEMPLATE_BYTES: usize = 2 << 20;

    /// Reads `wire` through the template (with `enabled`): `Some`, with the sample count,
    /// when it reads like the known batch and its points pass, so nothing more needs
    /// checking; its points are then `self.template.last_read()`.
    fn read(&mut self, wire: &[u8], enabled: bool) -> Option<usize> {
        if !enabled {
            return None;
        }
        let samples = self.samples?;
        let points = self.template.read(wire)?;
        // Same structure, same count (`validate_points` counts as the full validation does);
        // a difference would mean the two disagree, and the full validation decides.
        (validate_points(points)? == samples).then_some(samples)
    }

    /// Before the route is rewritten for a batch that may not be learnt: until
    /// [`KnownBatch::learn`], no batch matches.
    fn forget(&mut self) {
        self.samples = None;
        self.template.forget();
    }

    /// `wire` passed in full, with `samples`, and [`KnownBatch::route`] is its route: it
    /// becomes the template (if it is not too large).
    fn learn(&mut self, wire: &[u8], samples: usize) {
        if wire.len() <= Self::KEPT_BYTES
            && self.template.learn(wire)
            && self.template.heap_bytes() <= Self::KEPT_TEMPLATE_BYTES
        {
            self.samples = Some(samples);
        } else {
            // Of no use without a template, and possibly large.
            self.template = BatchTemplate::default();
            self.route = StoreRoute::default();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use picket_core::codec::BatchEncoder;
    use picket_core::model::{Family, Labels, MetricType};
    use prost::Message;

    /// A round of one gauge family whose one label value is `value`.
    fn round(sequence: u64, value: &str, reading: f64) -> Vec<u8> {
        let mut family = Family::new("m", MetricType::Gauge, "");
        family.push(
            Labels::from_pairs([("k", value)]),
            1_000 + sequence as i64,
            reading,
        );
        let mut encoder = BatchEncoder::new(&Labels::from_pairs([("instance", "pi")]));
        encoder.push(&family);
        encoder.finish(sequence).encode_to_vec()
    }

    /// Only a learnt batch matches, and only until it is forgotten; a later round of it
    /// with other readings matches, another label value does not.
    #[test]
    fn a_batch_matches_once_learnt_and_until_forgotten() {
        let mut known = KnownBatch::default();
        let first = round(1, "a", 1.0);
        assert!(known.read(&first, true).is_none(), "nothing learnt yet");
        known.learn(&first, 1);
        let samples = known.read(&round(2, "a", 2.0), true);
        assert_eq!(samples, Some(1), "the next round");
        let points = known.template.last_read();
        assert_eq!(points.sequence, 2);
        let family = &points.families()[0];
        let point = points.points(&points.series(family)[0])[0];
        assert_eq!(point.timestamp_ms, 1_002);
        assert!(matches!(point.value(), Some(v1::FlatValue::Number(v)) if v == 2.0));
        assert!(
            known.read(&round(3, "b", 2.0), true).is_none(),
            "another label value"
        );
        assert!(
            known.read(&round(4, "a", 2.0), false).is_none(),
            "reading through templates off"
        );
        // A batch about to be applied in full rewrites the route: nothing matches until it
        // is learnt.
        known.forget();
        assert!(known.read(&round(6, "a", 3.0), true).is_none());
        known.learn(&round(6, "a", 3.0), 1);
        assert!(known.read(&round(7, "a", 3.0), true).is_some());
    }

    /// A batch over `KEPT_BYTES` is not learnt, and the template's buffers are let go.
    #[test]
    fn a_batch_too_large_to_keep_is_not_learnt() {
        let mut known = KnownBatch::default();
        known.learn(&round(1, "a", 1.0), 1);
        let huge = "x".repeat(KnownBatch::KEPT_BYTES + 1);
        let big = round(2, &huge, 1.0);
        assert!(known.read(&big, true).is_none());
        known.forget();
        known.learn(&big, 1);
        assert!(
            known.read(&round(3, &huge, 2.0), true).is_none(),
            "not learnt"
        );
        assert_eq!(known.template.heap_bytes(), 0);

        // Under KEPT_BYTES, but bare stale points (six bytes each, 40 read): the template
        // would be ten times the batch.
        let points = 65_000;
        let point = [0x12, 0x04, 0x08, 0x01, 0x2a, 0x00];
        let series_len = points * point.len();
        let mut series = vec![0x22];
        prost::encoding::encode_varint(series_len as u64, &mut series);
        series.extend(point.repeat(points));
        let mut bare = vec![0x22];
        prost::encoding::encode_varint(series.len() as u64, &mut bare);
        bare.extend(series);
        assert!(bare.len() <= KnownBatch::KEPT_BYTES);
        let mut alone = BatchTemplate::default();
        assert!(
            alone.learn(&bare),
            "readable: refused by the cap, not the reading"
        );
        assert!(alone.heap_bytes() > KnownBatch::KEPT_TEMPLATE_BYTES);
        known.learn(&round(4, "a", 1.0), 1);
        known.forget();
        known.learn(&bare, points);
        assert!(known.read(&bare, true).is_none(), "not learnt");
        assert_eq!(known.template.heap_bytes(), 0);
    }
}

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
    self, FlatBatch, ingest_server::Ingest, received_agent_message as received,
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
        let skeletons = !self.sinks.needs_families();
        let mut known = KnownSkeleton::default();
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
            let reading = match known.read(&wire, skeletons) {
                Some((points, samples)) => Reading::Known { points, samples },
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
    /// outcome is what the agent is told. `known` learns the skeleton of a batch that passed
    /// in full and is queued as received.
    fn accept(
        &self,
        agent: &str,
        session: u64,
        reading: &Reading,
        wire: &[u8],
        known: &mut KnownSkeleton,
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
            Reading::Known { points, samples } => {
                self.sinks
                    .deliver_wire(agent, session, sequence, wire, *samples)
                    .map_err(cannot_store)?;
                self.registry.accepted(agent, session, sequence, *samples);
                let latest = &self.sinks.latest;
                if latest.is_enabled() && !latest.apply_points(points, &known.route) {
                    // The route is out of date (or the batch removes series): the full way,
                    // which routes again. The batch read so far, so this read cannot fail.
                    match v1::read_received_batch(wire) {
                        Ok(batch) => latest.apply_flat(&batch, &mut known.route),
                        Err(e) => {
                            tracing::error!(%agent, sequence, error = %e, "a batch read as a skeleton could not be read in full; not applied to /metrics");
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
                // The route is this batch's from here on, so the known skeleton no longer
                // matches it until this batch's is learnt.
                known.forget();
                self.sinks.latest.apply_flat(batch, &mut known.route);
                // Relabelling depends on the common labels only, which the skeleton holds:
                // later batches of this skeleton are not relabelled either.
                known.learn(samples);
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
    /// Its skeleton is the one of the stream's last batch that passed in full, and its points
    /// (`points`, read by `FlatBatch::parse_skeleton`) passed ([`KnownSkeleton::read`]):
    /// valid, with that batch's sample count.
    Known {
        points: FlatBatch<'w>,
        samples: usize,
    },
}

impl Reading<'_> {
    fn sequence(&self) -> u64 {
        match self {
            Reading::Full(batch) | Reading::Known { points: batch, .. } => batch.sequence,
        }
    }
}

/// An agent sends the same series every round, so each batch on a stream mostly has the
/// skeleton of the one before ([`FlatBatch::parse_skeleton`]: everything but timestamps and
/// values). Checking symbols, label names and duplicates, types and sizes again for it would
/// find what it found last time; only the points need checking. And its series are where the
/// last one's went in the `/metrics` store, so its values go there by the route that batch
/// left ([`StoreRoute`]). Skipping the full read and check made a relaying aggregator 1.36×
/// cheaper per sample together with the sink's use of skeletons, and the route 1.8× with the
/// store on (docs/performance.md).
///
/// It costs each stream two skeletons (the known one, and the batch being read) and a route:
/// about 20 and 12 bytes per series of Flink-like batches. A batch whose skeleton is larger
/// than [`KnownSkeleton::KEPT_BYTES`] is not learnt, and its buffer not kept.
#[derive(Default)]
struct KnownSkeleton {
    /// The skeleton of the last batch that passed in full and was queued as received.
    skeleton: Vec<u8>,
    /// That batch's samples (`None` before the first one, or after [`KnownSkeleton::forget`]).
    samples: Option<usize>,
    /// Where that batch's series are in the store.
    route: StoreRoute,
    /// The skeleton of the batch being accepted, and whether it could be read and is small
    /// enough to keep.
    current: Vec<u8>,
    current_read: bool,
}

impl KnownSkeleton {
    /// Skeletons larger than this (batches of more than about 10,000 series) are not kept:
    /// such batches are checked in full each time, as they were before skeletons, rather than
    /// each stream holding copies of them.
    const KEPT_BYTES: usize = 256 * 1024;

    /// Reads `wire`'s skeleton (with `enabled`) and, if it is the known one, its points:
    /// `Some`, with the sample count, when they pass too and nothing more needs checking.
    fn read<'w>(&mut self, wire: &'w [u8], enabled: bool) -> Option<(FlatBatch<'w>, usize)> {
        self.current_read = false;
        if !enabled {
            return None;
        }
        if self.current.capacity() > Self::KEPT_BYTES {
            self.current = Vec::new();
        }
        let points = FlatBatch::parse_skeleton(wire, &mut self.current)?;
        self.current_read = self.current.len() <= Self::KEPT_BYTES;
        let samples = self.samples?;
        if self.current != self.skeleton {
            return None;
        }
        // Same skeleton, same count (`validate_points` counts as the full validation does);
        // a difference would mean the two disagree, and the full validation decides.
        (validate_points(&points)? == samples).then_some((points, samples))
    }

    /// Before the route is rewritten for a batch that may not be learnt: until
    /// [`KnownSkeleton::learn`], no batch matches.
    fn forget(&mut self) {
        self.samples = None;
    }

    /// The batch just read passed in full, with `samples`, and [`KnownSkeleton::route`] is
    /// its route: its skeleton is the known one (if it was read and not too large).
    fn learn(&mut self, samples: usize) {
        if self.current_read {
            std::mem::swap(&mut self.skeleton, &mut self.current);
            self.samples = Some(samples);
        } else {
            // Of no use without its skeleton, and possibly large.
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

    /// Only a learnt skeleton matches, and only until it is forgotten; a later round of it
    /// with other readings matches, another skeleton does not.
    #[test]
    fn a_skeleton_matches_once_learnt_and_until_forgotten() {
        let mut known = KnownSkeleton::default();
        let first = round(1, "a", 1.0);
        assert!(known.read(&first, true).is_none(), "nothing learnt yet");
        known.learn(1);
        let second = round(2, "a", 2.0);
        let (points, samples) = known.read(&second, true).expect("same skeleton");
        assert_eq!((points.sequence, samples), (2, 1));
        assert!(
            known.read(&round(3, "b", 2.0), true).is_none(),
            "another label value"
        );
        assert!(
            known.read(&round(4, "a", 2.0), false).is_none(),
            "reading skeletons off"
        );
        // A batch about to be applied in full rewrites the route: nothing matches until its
        // skeleton is learnt.
        known.read(&round(5, "a", 3.0), true);
        known.forget();
        assert!(known.read(&round(6, "a", 3.0), true).is_none());
        known.learn(1);
        assert!(known.read(&round(7, "a", 3.0), true).is_some());
    }

    /// A skeleton over `KEPT_BYTES` is not learnt, and the buffer it was read into is not
    /// kept for the next batch; the known one stays.
    #[test]
    fn a_skeleton_too_large_to_keep_is_not_learnt() {
        let mut known = KnownSkeleton::default();
        known.read(&round(1, "a", 1.0), true);
        known.learn(1);
        let huge = "x".repeat(KnownSkeleton::KEPT_BYTES + 1);
        let big = round(2, &huge, 1.0);
        assert!(known.read(&big, true).is_none());
        known.learn(1);
        assert!(
            known.read(&round(3, &huge, 2.0), true).is_none(),
            "not learnt"
        );
        assert!(known.current.capacity() > KnownSkeleton::KEPT_BYTES);
        // The known skeleton is the small one still, and the large buffer is let go.
        assert!(known.read(&round(4, "a", 2.0), true).is_some());
        assert!(known.current.capacity() <= KnownSkeleton::KEPT_BYTES);
    }
}

//! The shipper: batches collected rounds and streams them to an aggregator, resending until
//! each batch is acknowledged.
//!
//! One task owns all the state (the open batch, the pending queue, the connection), so there
//! are no locks and the order of events is explicit in one `select!`:
//!
//! - rounds from the collector go into the open batch, which is sealed when it reaches
//!   `batch.max_samples` or `batch.max_delay`, then joins the bounded pending queue;
//! - pending batches are sent on the current stream, at most `max_in_flight` unacked;
//! - acks release batches; a connection that breaks (or leaves a batch unacked for
//!   `ack_timeout`) is dropped, and every unacked batch is sent again on the next one;
//! - connection attempts rotate through the endpoint list with exponential backoff.
//!
//! On shutdown the open batch is sealed and the shipper keeps going until the queue is empty
//! or `shutdown_timeout` has passed.

mod backoff;
mod connection;
pub mod pending;

use picket_core::codec::BatchEncoder;
use picket_core::model::{Family, Labels};
use picket_proto::v1;
use std::sync::Arc;
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;

use crate::config::AgentConfig;
use crate::stats::AgentStats;
use backoff::Backoff;
use connection::{Connection, ConnectionError};
use pending::{Dropped, PendingQueue};

struct OpenBatch {
    encoder: BatchEncoder,
    deadline: Instant,
}

pub struct Shipper {
    config: Arc<AgentConfig>,
    stats: Arc<AgentStats>,
    common_labels: Labels,
    open: Option<OpenBatch>,
    pending: PendingQueue,
    next_sequence: u64,
    session_id: u64,
    endpoint_index: usize,
    backoff: Backoff,
}

impl Shipper {
    pub fn new(config: Arc<AgentConfig>, stats: Arc<AgentStats>) -> Self {
        let link = &config.aggregator;
        Shipper {
            common_labels: config.common_labels(),
            pending: PendingQueue::new(config.buffer.max_bytes.get()),
            backoff: Backoff::new(link.backoff_initial, link.backoff_max),
            open: None,
            next_sequence: 1,
            // Never 0, so an aggregator can tell "no session" apart.
            session_id: fastrand::u64(1..),
            endpoint_index: 0,
            config,
            stats,
        }
    }

    /// Runs until the collector's channel closes (shutdown), then drains for at most
    /// `shutdown_timeout`.
    pub async fn run(
        mut self,
        mut rounds: mpsc::Receiver<Vec<Family>>,
        mut config_rx: watch::Receiver<Arc<AgentConfig>>,
    ) {
        let mut connection: Option<Connection> = None;
        let mut connecting: Option<connection::Connecting> = None;
        let mut reconnect_at = Some(Instant::now());
        let mut drain_deadline: Option<Instant> = None;
        let mut config_open = true;

        loop {
            if let Some(conn) = connection.as_mut()
                && let Err(e) = self.fill_window(conn)
            {
                self.connection_lost(&mut connection, &mut reconnect_at, e);
                continue;
            }
            if let Some(deadline) = drain_deadline {
                if self.pending.is_empty() && self.open.is_none() {
                    tracing::info!("all pending batches delivered; exiting");
                    return;
                }
                if Instant::now() >= deadline {
                    let lost = self.pending.samples();
                    AgentStats::add(&self.stats.dropped_samples_shutdown, lost as u64);
                    tracing::warn!(
                        batches = self.pending.len(),
                        samples = lost,
                        "shutdown timeout reached with batches still unacknowledged; they are lost"
                    );
                    return;
                }
            }
            self.publish_gauges();

            let flush_at = self.open.as_ref().map(|o| o.deadline);
            let ack_deadline = connection.as_ref().and_then(|c| c.ack_deadline());
            tokio::select! {
                round = rounds.recv(), if drain_deadline.is_none() => match round {
                    Some(families) => self.add_round(&families),
                    None => {
                        self.seal();
                        drain_deadline = Some(Instant::now() + self.config.aggregator.shutdown_timeout);
                        if connection.is_none() && connecting.is_none() {
                            reconnect_at = Some(Instant::now());
                        }
                    }
                },
                _ = sleep_until_opt(flush_at) => self.seal(),
                // Wakes the loop so the drain deadline is honoured even while waiting for a
                // reconnect or an ack.
                _ = sleep_until_opt(drain_deadline) => {}
                changed = config_rx.changed(), if config_open => match changed {
                    Ok(()) => {
                        let new = config_rx.borrow_and_update().clone();
                        if self.reconfigure(new) {
                            connection = None;
                            connecting = None;
                            AgentStats::set(&self.stats.connected, 0);
                            reconnect_at = Some(Instant::now());
                        }
                    }
                    Err(_) => config_open = false,
                },
                ack = next_ack(&mut connection) => match ack {
                    Ok(ack) => {
                        let sent_through = connection.as_ref().map_or(0, |c| c.sent_through);
                        self.handle_ack(ack, sent_through);
                    }
                    Err(e) => self.connection_lost(&mut connection, &mut reconnect_at, e),
                },
                _ = sleep_until_opt(ack_deadline) => {
                    let e = ConnectionError::AckTimeout(self.config.aggregator.ack_timeout);
                    self.connection_lost(&mut connection, &mut reconnect_at, e);
                }
                result = next_connect(&mut connecting) => {
                    connecting = None;
                    match result {
                        Ok(conn) => {
                            tracing::info!(endpoint = %conn.endpoint, "connected to aggregator");
                            AgentStats::add(&self.stats.connects, 1);
                            AgentStats::set(&self.stats.connected, 1);
                            connection = Some(conn);
                        }
                        Err(e) => self.connect_failed(&mut reconnect_at, e),
                    }
                }
                _ = sleep_until_opt(reconnect_at), if connection.is_none() && connecting.is_none() => {
                    reconnect_at = None;
                    let endpoint = self.config.aggregator.endpoints[self.endpoint_index].clone();
                    let hello = self.hello();
                    connecting = Some(connection::connect(self.config.clone(), endpoint, hello));
                }
            }
        }
    }

    fn hello(&self) -> v1::Hello {
        v1::Hello {
            protocol_revision: picket_proto::PROTOCOL_REVISION,
            instance: self.config.instance(),
            session_id: self.session_id,
            agent_version: format!(
                "picket-agent {} ({})",
                env!("CARGO_PKG_VERSION"),
                std::env::consts::ARCH
            ),
            interval_ms: self.config.interval.as_millis().min(u128::from(u32::MAX)) as u32,
        }
    }

    fn add_round(&mut self, families: &[Family]) {
        let max_delay = self.config.batch.max_delay;
        let labels = &self.common_labels;
        let open = self.open.get_or_insert_with(|| OpenBatch {
            encoder: BatchEncoder::new(labels),
            deadline: Instant::now() + max_delay,
        });
        for family in families {
            open.encoder.push(family);
        }
        if open.encoder.sample_count() >= self.config.batch.max_samples.get() {
            self.seal();
        }
    }

    /// Closes the open batch and queues it.
    fn seal(&mut self) {
        let Some(open) = self.open.take() else {
            return;
        };
        if open.encoder.is_empty() {
            return;
        }
        let samples = open.encoder.sample_count();
        let batch = open.encoder.finish(self.next_sequence);
        self.next_sequence += 1;
        let dropped = self.pending.push(batch, samples);
        self.count_buffer_drops(dropped);
    }

    fn count_buffer_drops(&self, dropped: Dropped) {
        if dropped.batches > 0 {
            AgentStats::add(
                &self.stats.dropped_samples_buffer_full,
                dropped.samples as u64,
            );
            tracing::warn!(
                batches = dropped.batches,
                samples = dropped.samples,
                max_bytes = self.config.buffer.max_bytes.get(),
                "pending buffer full: dropped the oldest batches (raise buffer.max_bytes to keep more during outages)"
            );
        }
    }

    /// Sends pending batches the connection has not carried yet, within the in-flight window.
    fn fill_window(&mut self, conn: &mut Connection) -> Result<(), ConnectionError> {
        let max_in_flight = self.config.aggregator.max_in_flight.get();
        let in_flight = self.pending.count_through(conn.sent_through);
        let mut to_send = Vec::new();
        for pending in self.pending.after(conn.sent_through) {
            if in_flight + to_send.len() >= max_in_flight {
                break;
            }
            to_send.push(pending.batch.clone());
        }
        for batch in to_send {
            let sequence = batch.sequence;
            if !conn.try_send(batch)? {
                break;
            }
            tracing::debug!(sequence, endpoint = %conn.endpoint, "batch sent");
            AgentStats::add(&self.stats.batches_sent, 1);
        }
        Ok(())
    }

    fn handle_ack(&mut self, ack: v1::Ack, sent_through: u64) {
        if ack.sequence > sent_through {
            // An ack for a batch this connection never carried would release batches that
            // were never delivered.
            tracing::warn!(
                sequence = ack.sequence,
                sent_through,
                "ignoring an ack for a batch not sent on this connection"
            );
            return;
        }
        self.backoff.reset();
        match ack.outcome {
            Some(v1::ack::Outcome::Rejected(rejected)) => {
                let removed = self.pending.remove_through(ack.sequence);
                AgentStats::add(&self.stats.dropped_samples_rejected, removed.samples as u64);
                tracing::error!(sequence = ack.sequence, reason = %rejected.reason,
                    "aggregator rejected a batch as malformed; it was dropped (this is a bug worth reporting)");
            }
            _ => {
                let removed = self.pending.remove_through(ack.sequence);
                AgentStats::add(&self.stats.batches_acked, removed.batches as u64);
                AgentStats::add(&self.stats.samples_acked, removed.samples as u64);
            }
        }
    }

    fn connection_lost(
        &mut self,
        connection: &mut Option<Connection>,
        reconnect_at: &mut Option<Instant>,
        error: ConnectionError,
    ) {
        let endpoint = connection
            .as_ref()
            .map(|c| c.endpoint.clone())
            .unwrap_or_default();
        *connection = None;
        AgentStats::set(&self.stats.connected, 0);
        AgentStats::add(&self.stats.connection_failures, 1);
        if error.batch_too_large() {
            // The stream died decoding the oldest unacked batch: acks are in order, so every
            // earlier batch was acknowledged. Resending it would fail the same way.
            if let Some(front) = self.pending.front() {
                let sequence = front.sequence();
                let removed = self.pending.remove_through(sequence);
                AgentStats::add(&self.stats.dropped_samples_rejected, removed.samples as u64);
                tracing::error!(
                    sequence,
                    samples = removed.samples,
                    "aggregator refused a batch as too large; dropped it (lower batch.max_samples or raise the aggregator's grpc.max_message_bytes)"
                );
            }
        }
        if error.rotate_endpoint() {
            self.rotate_endpoint();
        }
        let delay = self.backoff.next_delay();
        tracing::warn!(%endpoint, error = %error, retry_in = ?delay, pending = self.pending.len(),
            "connection to aggregator lost; unacknowledged batches will be resent");
        *reconnect_at = Some(Instant::now() + delay);
    }

    fn connect_failed(&mut self, reconnect_at: &mut Option<Instant>, error: ConnectionError) {
        AgentStats::add(&self.stats.connection_failures, 1);
        let endpoint = self.config.aggregator.endpoints[self.endpoint_index].clone();
        self.rotate_endpoint();
        let delay = self.backoff.next_delay();
        tracing::warn!(%endpoint, error = %error, retry_in = ?delay, "cannot connect to aggregator");
        *reconnect_at = Some(Instant::now() + delay);
    }

    fn rotate_endpoint(&mut self) {
        let count = self.config.aggregator.endpoints.len();
        self.endpoint_index = (self.endpoint_index + 1) % count.max(1);
    }

    /// Applies a reloaded config. Returns true when the connection must be re-established.
    fn reconfigure(&mut self, new: Arc<AgentConfig>) -> bool {
        let reconnect =
            new.aggregator != self.config.aggregator || new.instance != self.config.instance;
        let labels = new.common_labels();
        if labels != self.common_labels {
            // The open batch carries the old labels as its common labels; close it first.
            self.seal();
            self.common_labels = labels;
        }
        let dropped = self.pending.set_max_bytes(new.buffer.max_bytes.get());
        self.config = new;
        self.count_buffer_drops(dropped);
        if reconnect {
            let link = &self.config.aggregator;
            self.backoff = Backoff::new(link.backoff_initial, link.backoff_max);
            self.endpoint_index = 0;
            tracing::info!("aggregator settings changed; reconnecting");
        }
        reconnect
    }

    fn publish_gauges(&self) {
        AgentStats::set(&self.stats.pending_batches, self.pending.len() as u64);
        AgentStats::set(&self.stats.pending_bytes, self.pending.bytes() as u64);
        AgentStats::set(&self.stats.pending_samples, self.pending.samples() as u64);
    }
}

async fn sleep_until_opt(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

async fn next_ack(connection: &mut Option<Connection>) -> Result<v1::Ack, ConnectionError> {
    match connection {
        Some(conn) => conn.next_ack().await,
        None => std::future::pending().await,
    }
}

async fn next_connect(
    connecting: &mut Option<connection::Connecting>,
) -> Result<Connection, ConnectionError> {
    match connecting {
        Some(fut) => fut.await,
        None => std::future::pending().await,
    }
}

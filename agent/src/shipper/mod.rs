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
//! - with a disk spool (`spool.rs`), batches left unacknowledged for `spool.flush_interval`
//!   are written to disk on a timer, batches pushed out of memory by `buffer.max_bytes` go to
//!   disk instead of being dropped, and a restart resends what the spool holds first.
//!
//! On shutdown the open batch is sealed and written to the spool, and the shipper keeps going
//! until the queue is empty or `shutdown_timeout` has passed; what is still unacknowledged
//! then stays in the spool for the next start.

mod backoff;
mod connection;
pub mod pending;
pub mod spool;

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
use spool::Spool;

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
    spool: Option<Spool>,
    /// When the spool timer next writes due batches and checkpoints acknowledgements.
    spool_tick: Option<Instant>,
    /// Highest sequence sent on the current connection (0 without one): the spool's cap
    /// never deletes a batch whose ack may still arrive.
    in_flight_through: u64,
}

impl Shipper {
    /// A shipper with the disk spool `config.spool` asks for. A spool directory the operator
    /// set that cannot be used is an error; the default one only earns a warning, so an agent
    /// started by hand without privileges still runs (memory only).
    pub fn open(config: Arc<AgentConfig>, stats: Arc<AgentStats>) -> anyhow::Result<Self> {
        let mut shipper = Shipper::new(config.clone(), stats);
        if !config.spool.enabled {
            return Ok(shipper);
        }
        let (spool, next_sequence, recovery) = match Spool::open(&config.spool) {
            Ok(opened) => opened,
            Err(e) if config.spool.directory.is_none() => {
                tracing::warn!(error = %e,
                    "running without a disk spool: unacknowledged batches live in memory only and are lost if the agent stops (set spool.directory to a writable directory, or spool.enabled = false)");
                return Ok(shipper);
            }
            Err(e) => {
                return Err(anyhow::Error::new(e).context(
                    "cannot use spool.directory (make it writable by the agent, or set spool.enabled = false)",
                ));
            }
        };
        let samples: usize = recovery.batches.iter().map(|b| b.samples).sum();
        if !recovery.batches.is_empty() || recovery.skipped_bytes > 0 {
            tracing::info!(directory = %spool.directory().display(), batches = recovery.batches.len(),
                samples, renumbered = recovery.renumbered, skipped_bytes = recovery.skipped_bytes,
                "spooled batches from a previous run will be sent first");
        }
        AgentStats::add(&shipper.stats.spool_damaged_bytes, recovery.skipped_bytes);
        for b in recovery.batches {
            shipper
                .pending
                .push_spooled(b.sequence, b.samples, b.bytes, b.location);
        }
        shipper.session_id = spool.session();
        shipper.next_sequence = next_sequence;
        shipper.spool_tick = Some(Instant::now() + config.spool.flush_interval);
        shipper.spool = Some(spool);
        Ok(shipper)
    }

    /// A shipper that keeps unacknowledged batches in memory only.
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
            spool: None,
            spool_tick: None,
            in_flight_through: 0,
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
                    self.checkpoint_spool();
                    tracing::info!("all pending batches delivered; exiting");
                    return;
                }
                if Instant::now() >= deadline {
                    self.spill_all();
                    self.checkpoint_spool();
                    let lost = self.pending.unspooled_samples();
                    AgentStats::add(&self.stats.dropped_samples_shutdown, lost as u64);
                    if lost > 0 {
                        tracing::warn!(
                            batches = self.pending.len(),
                            samples = lost,
                            "shutdown timeout reached with batches still unacknowledged and no spool to keep them; they are lost"
                        );
                    } else {
                        tracing::info!(
                            batches = self.pending.len(),
                            samples = self.pending.samples(),
                            "shutdown timeout reached; unacknowledged batches stay in the spool for the next start"
                        );
                    }
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
                        // Safe on disk before the drain, in case the drain is cut short.
                        self.spill_all();
                        drain_deadline = Some(Instant::now() + self.config.aggregator.shutdown_timeout);
                        if connection.is_none() && connecting.is_none() {
                            reconnect_at = Some(Instant::now());
                        }
                    }
                },
                _ = sleep_until_opt(flush_at) => self.seal(),
                _ = sleep_until_opt(self.spool_tick) => self.on_spool_tick(),
                // Wakes the loop so the drain deadline is honoured even while waiting for a
                // reconnect or an ack.
                _ = sleep_until_opt(drain_deadline) => {}
                changed = config_rx.changed(), if config_open => match changed {
                    Ok(()) => {
                        let new = config_rx.borrow_and_update().clone();
                        if self.reconfigure(new) {
                            connection = None;
                            self.in_flight_through = 0;
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
        // Waiting for `max_delay` only pays when another round can join the batch before it;
        // when the next round is due later than that, waiting would only delay this one
        // (by up to a second with the defaults: most of an end-to-end latency budget).
        if open.encoder.sample_count() >= self.config.batch.max_samples.get()
            || self.config.interval >= max_delay
        {
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
        tracing::debug!(sequence = self.next_sequence, samples, "batch sealed");
        self.next_sequence += 1;
        self.pending.push(batch, samples);
        if let Some(spool) = self.spool.as_mut()
            && let Err(e) = spool.reserve(self.next_sequence)
        {
            // Retried at the next seal: the reservation is still short.
            AgentStats::add(&self.stats.spool_write_errors, 1);
            tracing::error!(error = %e, "cannot reserve sequence numbers in the spool state");
        }
        self.enforce_memory_bound();
    }

    /// Gets the in-memory queue back under `buffer.max_bytes`: batches that must leave
    /// memory go to the spool when there is one, and are dropped (counted) otherwise.
    fn enforce_memory_bound(&mut self) {
        if self.spool.is_some() {
            let over = self.pending.over_bound();
            if !over.is_empty() {
                self.spill(&over);
            }
        }
        let dropped = self.pending.enforce_bound();
        self.count_buffer_drops(dropped);
    }

    /// The spool timer: writes batches unacknowledged for `flush_interval`, deletes
    /// acknowledged segments and records the acknowledged sequence.
    fn on_spool_tick(&mut self) {
        let interval = self.config.spool.flush_interval;
        let now = Instant::now();
        self.spool_tick = self.spool.as_ref().map(|_| now + interval);
        // Acknowledged segments go first, so they do not count against the cap below.
        self.checkpoint_spool();
        if let Some(due) = now.checked_sub(interval) {
            let sequences: Vec<u64> = self.pending.unspooled(due).map(|b| b.sequence).collect();
            if !sequences.is_empty() {
                self.spill(&sequences);
            }
        }
    }

    /// Writes every batch that is only in memory to the spool (at shutdown).
    fn spill_all(&mut self) {
        if self.spool.is_none() {
            return;
        }
        let sequences: Vec<u64> = self
            .pending
            .unspooled(Instant::now())
            .map(|b| b.sequence)
            .collect();
        if !sequences.is_empty() {
            self.spill(&sequences);
        }
    }

    fn checkpoint_spool(&mut self) {
        if let Some(spool) = self.spool.as_mut()
            && let Err(e) = blocking(|| spool.checkpoint())
        {
            AgentStats::add(&self.stats.spool_write_errors, 1);
            tracing::warn!(error = %e, "cannot checkpoint the spool; acknowledged batches may be resent after a restart (the aggregator recognises them)");
        }
    }

    /// Writes the given in-memory batches (sorted sequences) to the spool in one append, then
    /// applies the spool's size cap, dropping (and counting) the oldest batches.
    fn spill(&mut self, sequences: &[u64]) {
        // Acknowledged segments go first, so they do not count against the cap.
        self.checkpoint_spool();
        let Some(disk) = self.spool.as_mut() else {
            return;
        };
        let items: Vec<(u64, usize, &v1::Batch)> = self
            .pending
            .after(0)
            .filter(|b| sequences.binary_search(&b.sequence).is_ok())
            .filter_map(|b| b.batch.as_ref().map(|batch| (b.sequence, b.samples, batch)))
            .collect();
        let (locations, error) = blocking(|| disk.append(&items));
        let written: Vec<(u64, spool::Location)> = items
            .iter()
            .map(|(sequence, _, _)| *sequence)
            .zip(locations)
            .collect();
        AgentStats::add(&self.stats.spool_writes, 1);
        if let Some((last, _)) = written.last() {
            tracing::debug!(batches = written.len(), through = *last, "batches spooled");
        }
        if let Some(e) = error {
            AgentStats::add(&self.stats.spool_write_errors, 1);
            tracing::error!(error = %e, not_written = items.len() - written.len(),
                "cannot write to the spool; those batches stay in memory only");
        }
        let in_flight = self.in_flight_through;
        let mut dropped: Vec<u64> = blocking(|| disk.enforce_cap(in_flight))
            .into_iter()
            .map(|(s, _)| s)
            .collect();
        for (sequence, location) in written {
            self.pending.mark_spooled(sequence, location);
        }
        if !dropped.is_empty() {
            dropped.sort_unstable();
            let removed = self.pending.remove(&dropped);
            AgentStats::add(
                &self.stats.spool_dropped_samples_full,
                removed.samples as u64,
            );
            tracing::warn!(
                batches = removed.batches,
                samples = removed.samples,
                max_bytes = self.config.spool.max_bytes.get(),
                "spool full: dropped the oldest batches (raise spool.max_bytes to keep more during outages)"
            );
        }
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
        let mut unreadable = Vec::new();
        // A sequence above the spool's reservation could be used again after a restart (the
        // reservation write failed): such batches wait until a reservation succeeds.
        let sendable_through = self
            .spool
            .as_ref()
            .map_or(u64::MAX, Spool::reserved_through);
        for pending in self.pending.after(conn.sent_through) {
            if in_flight + to_send.len() >= max_in_flight || pending.sequence > sendable_through {
                break;
            }
            match (&pending.batch, pending.spooled, &self.spool) {
                (Some(batch), _, _) => to_send.push(batch.clone()),
                // A few records read back per ack round trip.
                (None, Some(at), Some(spool)) => {
                    match blocking(|| spool.read(at, pending.sequence)) {
                        Ok(batch) => to_send.push(batch),
                        Err(e) => {
                            tracing::error!(error = %e, sequence = pending.sequence,
                            "cannot read a spooled batch back; dropping it");
                            unreadable.push(pending.sequence);
                        }
                    }
                }
                _ => unreadable.push(pending.sequence),
            }
        }
        if !unreadable.is_empty() {
            let removed = self.pending.remove(&unreadable);
            AgentStats::add(
                &self.stats.spool_dropped_samples_unreadable,
                removed.samples as u64,
            );
        }
        for batch in to_send {
            let sequence = batch.sequence;
            if !conn.try_send(batch)? {
                break;
            }
            tracing::debug!(sequence, endpoint = %conn.endpoint, "batch sent");
            AgentStats::add(&self.stats.batches_sent, 1);
        }
        self.in_flight_through = conn.sent_through;
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
                self.spool_acked(ack.sequence);
                let removed = self.pending.remove_through(ack.sequence);
                AgentStats::add(&self.stats.dropped_samples_rejected, removed.samples as u64);
                tracing::error!(sequence = ack.sequence, reason = %rejected.reason,
                    "aggregator rejected a batch as malformed; it was dropped (this is a bug worth reporting)");
            }
            _ => {
                self.spool_acked(ack.sequence);
                let removed = self.pending.remove_through(ack.sequence);
                tracing::debug!(through = ack.sequence, "batches acknowledged");
                AgentStats::add(&self.stats.batches_acked, removed.batches as u64);
                AgentStats::add(&self.stats.samples_acked, removed.samples as u64);
            }
        }
    }

    fn spool_acked(&mut self, sequence: u64) {
        if let Some(spool) = self.spool.as_mut() {
            spool.acked(sequence);
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
        self.in_flight_through = 0;
        AgentStats::set(&self.stats.connected, 0);
        AgentStats::add(&self.stats.connection_failures, 1);
        if error.batch_too_large() {
            // The stream died decoding the oldest unacked batch: acks are in order, so every
            // earlier batch was acknowledged. Resending it would fail the same way.
            if let Some(front) = self.pending.front() {
                let sequence = front.sequence();
                self.spool_acked(sequence);
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
        if new.spool != self.config.spool {
            tracing::warn!("spool settings changed; they take effect when the agent restarts");
        }
        self.pending.set_max_bytes(new.buffer.max_bytes.get());
        self.config = new;
        self.enforce_memory_bound();
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
        let spool_bytes = self.spool.as_ref().map_or(0, |s| s.bytes());
        AgentStats::set(&self.stats.spool_bytes, spool_bytes);
    }
}

/// Runs disk work (spool writes with `fdatasync`, reads) without stalling the runtime's other
/// tasks: on the multi-threaded runtime the agent runs on, this worker hands its other tasks
/// over while it waits for the disk.
fn blocking<T>(work: impl FnOnce() -> T) -> T {
    use tokio::runtime::{Handle, RuntimeFlavor};
    match Handle::try_current().map(|h| h.runtime_flavor()) {
        Ok(RuntimeFlavor::MultiThread) => tokio::task::block_in_place(work),
        _ => work(),
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

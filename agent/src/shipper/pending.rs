//! Batches waiting for an acknowledgement.
//!
//! A batch stays here from the moment it is sealed (or found in the spool at start-up) until
//! an aggregator acks it, across any number of reconnects. Its payload is in memory, on disk
//! in the spool, or both: memory is bounded by `buffer.max_bytes` (encoded size of payloads
//! held in memory). Past the bound the oldest payloads leave memory: written to the spool
//! first when there is one (the shipper does that), dropped and counted otherwise (recent data
//! is worth more to an operator during an outage).

use std::collections::VecDeque;

use picket_proto::v1;
use prost::Message;
use tokio::time::Instant;

use super::spool::Location;

pub struct PendingBatch {
    pub sequence: u64,
    /// In memory; `None` once only the spool holds it.
    pub batch: Option<v1::Batch>,
    /// In the spool.
    pub spooled: Option<Location>,
    pub samples: usize,
    pub bytes: usize,
    pub sealed_at: Instant,
}

impl PendingBatch {
    pub fn sequence(&self) -> u64 {
        self.sequence
    }
}

pub struct PendingQueue {
    batches: VecDeque<PendingBatch>,
    /// Encoded bytes of the payloads held in memory.
    memory_bytes: usize,
    samples: usize,
    max_bytes: usize,
}

/// What had to be dropped to make room, or what an ack released.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Dropped {
    pub batches: usize,
    pub samples: usize,
}

impl PendingQueue {
    pub fn new(max_bytes: usize) -> Self {
        PendingQueue {
            batches: VecDeque::new(),
            memory_bytes: 0,
            samples: 0,
            max_bytes,
        }
    }

    pub fn set_max_bytes(&mut self, max_bytes: usize) {
        self.max_bytes = max_bytes;
    }

    /// Adds a sealed batch (memory only). The caller then calls [`Self::enforce_bound`],
    /// after spilling [`Self::over_bound`] batches to the spool if it has one.
    pub fn push(&mut self, batch: v1::Batch, samples: usize) {
        let bytes = batch.encoded_len();
        self.memory_bytes += bytes;
        self.samples += samples;
        self.batches.push_back(PendingBatch {
            sequence: batch.sequence,
            batch: Some(batch),
            spooled: None,
            samples,
            bytes,
            sealed_at: Instant::now(),
        });
    }

    /// Adds a batch that is only in the spool (found there at start-up).
    pub fn push_spooled(&mut self, sequence: u64, samples: usize, bytes: usize, at: Location) {
        self.samples += samples;
        self.batches.push_back(PendingBatch {
            sequence,
            batch: None,
            spooled: Some(at),
            samples,
            bytes,
            sealed_at: Instant::now(),
        });
    }

    /// Sequences of the in-memory, not yet spooled batches that must leave memory to get back
    /// under the bound, oldest first. The newest batch always stays.
    pub fn over_bound(&self) -> Vec<u64> {
        let mut excess = self.memory_bytes.saturating_sub(self.max_bytes);
        let newest = self.batches.back().map(|b| b.sequence);
        let mut out = Vec::new();
        for b in &self.batches {
            if excess == 0 || Some(b.sequence) == newest {
                break;
            }
            if b.batch.is_some() {
                excess = excess.saturating_sub(b.bytes);
                if b.spooled.is_none() {
                    out.push(b.sequence);
                }
            }
        }
        out
    }

    /// Gets back under the bound: payloads that are also in the spool leave memory, the
    /// others are dropped. Returns what was dropped.
    pub fn enforce_bound(&mut self) -> Dropped {
        let mut dropped = Dropped::default();
        let newest = self.batches.back().map(|b| b.sequence);
        let mut index = 0;
        while self.memory_bytes > self.max_bytes && index < self.batches.len() {
            let b = &mut self.batches[index];
            if Some(b.sequence) == newest {
                break;
            }
            if b.batch.is_none() {
                index += 1;
                continue;
            }
            self.memory_bytes -= b.bytes;
            if b.spooled.is_some() {
                b.batch = None;
                index += 1;
            } else if let Some(old) = self.batches.remove(index) {
                self.samples -= old.samples;
                dropped.batches += 1;
                dropped.samples += old.samples;
            }
        }
        dropped
    }

    /// In-memory batches not yet in the spool that were sealed at or before `due`, oldest first.
    pub fn unspooled(&self, due: Instant) -> impl Iterator<Item = &PendingBatch> {
        self.batches
            .iter()
            .filter(move |b| b.spooled.is_none() && b.batch.is_some() && b.sealed_at <= due)
    }

    /// The oldest sealing time among batches not yet in the spool.
    pub fn oldest_unspooled(&self) -> Option<Instant> {
        self.batches
            .iter()
            .find(|b| b.spooled.is_none())
            .map(|b| b.sealed_at)
    }

    /// Records that `sequence` was written to the spool at `at`.
    pub fn mark_spooled(&mut self, sequence: u64, at: Location) {
        if let Some(b) = self.batches.iter_mut().find(|b| b.sequence == sequence) {
            b.spooled = Some(at);
        }
    }

    /// Removes the given batches (dropped from the spool with its oldest segments).
    pub fn remove(&mut self, sequences: &[u64]) -> Dropped {
        let mut removed = Dropped::default();
        self.batches.retain(|b| {
            if sequences.binary_search(&b.sequence).is_err() {
                return true;
            }
            removed.batches += 1;
            removed.samples += b.samples;
            false
        });
        self.recount();
        removed
    }

    fn recount(&mut self) {
        self.samples = self.batches.iter().map(|b| b.samples).sum();
        self.memory_bytes = self
            .batches
            .iter()
            .filter(|b| b.batch.is_some())
            .map(|b| b.bytes)
            .sum();
    }

    fn pop_front(&mut self) -> Option<PendingBatch> {
        let b = self.batches.pop_front()?;
        if b.batch.is_some() {
            self.memory_bytes -= b.bytes;
        }
        self.samples -= b.samples;
        Some(b)
    }

    /// Removes every batch up to and including `sequence` (acks arrive in order), returning
    /// how many batches and samples that released.
    pub fn remove_through(&mut self, sequence: u64) -> Dropped {
        let mut removed = Dropped::default();
        while self
            .batches
            .front()
            .is_some_and(|b| b.sequence() <= sequence)
        {
            if let Some(b) = self.pop_front() {
                removed.batches += 1;
                removed.samples += b.samples;
            }
        }
        removed
    }

    /// The oldest batch, if any.
    pub fn front(&self) -> Option<&PendingBatch> {
        self.batches.front()
    }

    /// Batches with a sequence above `after`, oldest first.
    pub fn after(&self, after: u64) -> impl Iterator<Item = &PendingBatch> {
        self.batches.iter().filter(move |b| b.sequence() > after)
    }

    /// Batches with a sequence up to `through` (those in flight on a connection).
    pub fn count_through(&self, through: u64) -> usize {
        self.batches
            .iter()
            .take_while(|b| b.sequence() <= through)
            .count()
    }

    pub fn len(&self) -> usize {
        self.batches.len()
    }

    pub fn is_empty(&self) -> bool {
        self.batches.is_empty()
    }

    /// Encoded bytes held in memory.
    pub fn bytes(&self) -> usize {
        self.memory_bytes
    }

    pub fn samples(&self) -> usize {
        self.samples
    }

    /// Samples of batches held only in memory (lost if the agent exits now).
    pub fn unspooled_samples(&self) -> usize {
        self.batches
            .iter()
            .filter(|b| b.spooled.is_none())
            .map(|b| b.samples)
            .sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn batch(sequence: u64, payload: usize) -> v1::Batch {
        v1::Batch {
            sequence,
            symbols: vec![String::new(), "x".repeat(payload)],
            common_labels: vec![],
            families: vec![],
        }
    }

    fn location() -> Location {
        Location::for_tests()
    }

    #[test]
    fn acks_release_in_order() {
        let mut q = PendingQueue::new(1 << 20);
        for s in 1..=5 {
            q.push(batch(s, 10), 3);
        }
        assert_eq!(
            q.remove_through(3),
            Dropped {
                batches: 3,
                samples: 9
            }
        );
        assert_eq!(q.front().map(|b| b.sequence()), Some(4));
        assert_eq!(
            q.after(4).map(|b| b.sequence()).collect::<Vec<_>>(),
            vec![5]
        );
        assert_eq!(q.count_through(4), 1);
        // An ack for a batch already gone (dropped for space) releases nothing.
        assert_eq!(q.remove_through(2), Dropped::default());
        assert_eq!(q.samples(), 6);
    }

    #[test]
    fn bound_drops_oldest_and_counts() {
        let one = batch(1, 1000).encoded_len();
        let mut q = PendingQueue::new(one * 3);
        for s in 1..=3 {
            q.push(batch(s, 1000), 10);
            assert_eq!(q.enforce_bound(), Dropped::default());
        }
        q.push(batch(4, 1000), 10);
        assert_eq!(q.over_bound(), vec![1]);
        assert_eq!(
            q.enforce_bound(),
            Dropped {
                batches: 1,
                samples: 10
            }
        );
        assert_eq!(q.front().map(|b| b.sequence()), Some(2));
        assert!(q.bytes() <= one * 3);
        // A single oversized batch is kept rather than lost outright.
        let mut tiny = PendingQueue::new(10);
        tiny.push(batch(1, 1000), 5);
        assert_eq!(tiny.enforce_bound(), Dropped::default());
        assert_eq!(tiny.len(), 1);
    }

    #[test]
    fn spooled_batches_leave_memory_instead_of_being_dropped() {
        let one = batch(1, 1000).encoded_len();
        let mut q = PendingQueue::new(one * 2);
        for s in 1..=4 {
            q.push(batch(s, 1000), 10);
        }
        assert_eq!(q.over_bound(), vec![1, 2]);
        q.mark_spooled(1, location());
        q.mark_spooled(2, location());
        assert_eq!(q.enforce_bound(), Dropped::default());
        assert_eq!(q.len(), 4, "nothing dropped");
        assert_eq!(q.bytes(), one * 2);
        assert_eq!(q.samples(), 40);
        assert!(
            q.front()
                .is_some_and(|b| b.batch.is_none() && b.spooled.is_some())
        );
        assert_eq!(q.unspooled_samples(), 20);
        // The spool dropping its oldest segment removes those batches for good.
        assert_eq!(
            q.remove(&[1]),
            Dropped {
                batches: 1,
                samples: 10
            }
        );
        assert_eq!(q.front().map(|b| b.sequence()), Some(2));
        assert_eq!(q.bytes(), one * 2);
    }
}

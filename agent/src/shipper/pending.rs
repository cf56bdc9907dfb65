//! Batches waiting for an acknowledgement, bounded in memory.
//!
//! A batch stays here from the moment it is sealed until an aggregator acks it, across any
//! number of reconnects. When the encoded size of everything waiting exceeds the bound, the
//! oldest batches go first (recent data is worth more to an operator during an outage) and
//! their samples are counted as dropped.

use std::collections::VecDeque;

use picket_proto::v1;
use prost::Message;

pub struct PendingBatch {
    pub batch: v1::Batch,
    pub samples: usize,
    pub bytes: usize,
}

impl PendingBatch {
    pub fn sequence(&self) -> u64 {
        self.batch.sequence
    }
}

pub struct PendingQueue {
    batches: VecDeque<PendingBatch>,
    bytes: usize,
    samples: usize,
    max_bytes: usize,
}

/// What had to be dropped to make room.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Dropped {
    pub batches: usize,
    pub samples: usize,
}

impl PendingQueue {
    pub fn new(max_bytes: usize) -> Self {
        PendingQueue {
            batches: VecDeque::new(),
            bytes: 0,
            samples: 0,
            max_bytes,
        }
    }

    pub fn set_max_bytes(&mut self, max_bytes: usize) -> Dropped {
        self.max_bytes = max_bytes;
        self.enforce_bound()
    }

    /// Adds a sealed batch, dropping the oldest ones if the bound is exceeded.
    pub fn push(&mut self, batch: v1::Batch, samples: usize) -> Dropped {
        let bytes = batch.encoded_len();
        self.bytes += bytes;
        self.samples += samples;
        self.batches.push_back(PendingBatch {
            batch,
            samples,
            bytes,
        });
        self.enforce_bound()
    }

    fn enforce_bound(&mut self) -> Dropped {
        let mut dropped = Dropped::default();
        // The newest batch always stays, even if it alone exceeds the bound.
        while self.bytes > self.max_bytes && self.batches.len() > 1 {
            if let Some(old) = self.pop_front() {
                dropped.batches += 1;
                dropped.samples += old.samples;
            }
        }
        dropped
    }

    fn pop_front(&mut self) -> Option<PendingBatch> {
        let b = self.batches.pop_front()?;
        self.bytes -= b.bytes;
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

    pub fn bytes(&self) -> usize {
        self.bytes
    }

    pub fn samples(&self) -> usize {
        self.samples
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
            assert_eq!(q.push(batch(s, 1000), 10), Dropped::default());
        }
        let dropped = q.push(batch(4, 1000), 10);
        assert_eq!(
            dropped,
            Dropped {
                batches: 1,
                samples: 10
            }
        );
        assert_eq!(q.front().map(|b| b.sequence()), Some(2));
        assert!(q.bytes() <= one * 3);
        // A single oversized batch is kept rather than lost outright.
        let mut tiny = PendingQueue::new(10);
        assert_eq!(tiny.push(batch(1, 1000), 5), Dropped::default());
        assert_eq!(tiny.len(), 1);
    }
}

//! The agent's disk spool: batches no aggregator has acknowledged, kept on disk so that an
//! aggregator outage, an agent restart or a Pi losing power does not lose them.
//!
//! Layout of `spool.directory`:
//! - `LOCK`: locked while an agent uses the spool, so two agents never share one.
//! - `state`: the session the spooled batches belong to, the highest sequence number reserved
//!   for that session and the highest one acknowledged; replaced atomically (write, sync,
//!   rename), never edited in place.
//! - `<segment number, 20 digits>.seg`: append-only segment files of records
//!   `"PKS1" | payload length u32 LE | CRC-32 of the payload u32 LE | payload`, where the
//!   payload is `session u64 LE | sequence u64 LE | samples u32 LE | Batch protobuf`.
//!
//! **Sessions.** The aggregator recognises a resent batch by (session, sequence). A restarted
//! agent resumes the session in `state` and numbers its new batches above every sequence it
//! may have used before: it reserves sequence numbers in ranges of [`RESERVE_STEP`] (one
//! `state` write per range), so a batch the aggregator accepted just before a crash is never
//! confused with a new one. Records of another session (only after `state` was lost) are
//! renumbered into the current one; the databases overwrite any point that is sent twice.
//!
//! **SD cards.** Nothing is written while acks arrive promptly. A batch is written only once it
//! has waited `flush_interval` unacknowledged, all due batches together in one `write` and one
//! `fdatasync`. Segments are deleted whole once everything in them is acknowledged.
//!
//! **Damage.** Recovery checks every record's checksum and skips what does not verify (a torn
//! write at the end of a segment after a power cut, a bad sector), resynchronising on the next
//! record marker. New records always go to a new segment, never after a torn tail.

use std::collections::VecDeque;
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::num::NonZeroUsize;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::time::Duration;

use picket_proto::v1;
use prost::Message;
use serde::Deserialize;

/// Where the spool lives unless `spool.directory` says otherwise: inside the systemd unit's
/// `StateDirectory=picket`.
pub const DEFAULT_DIRECTORY: &str = "/var/lib/picket/spool";

/// Sequence numbers reserved per `state` write.
pub const RESERVE_STEP: u64 = 100_000;

const RECORD_MAGIC: &[u8; 4] = b"PKS1";
const RECORD_HEADER: usize = 12;
const PAYLOAD_PREFIX: usize = 20;
const STATE_MAGIC: &str = "picket-spool 1";
/// A record larger than this is damage, not data: the aggregator refuses far smaller batches.
const MAX_RECORD_PAYLOAD: usize = 256 * 1024 * 1024;
/// Sequence and segment numbers read from disk above this are damage: real ones never come
/// near, and arithmetic on them must not overflow.
const MAX_NUMBER: u64 = u64::MAX / 4;

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct SpoolConfig {
    /// Keep unacknowledged batches on disk. Without the spool they live only in memory
    /// (`buffer.max_bytes`) and are lost when the agent stops.
    pub enabled: bool,
    /// Default: `/var/lib/picket/spool`. If the default cannot be used the agent warns and
    /// runs without a spool; a directory set here that cannot be used stops the agent.
    pub directory: Option<PathBuf>,
    /// Disk space for spooled batches. When full, the oldest batches go first and their
    /// samples are counted in `picket_agent_spool_dropped_samples_total`.
    pub max_bytes: NonZeroUsize,
    /// A batch unacknowledged this long is written to the spool; due batches are written
    /// together, at most once per interval. Also the durability window on power loss.
    #[serde(with = "humantime_serde")]
    pub flush_interval: Duration,
    /// `fdatasync` after each write. Turning it off trades the power-loss guarantee for fewer
    /// flash erase cycles; an agent crash still loses nothing that was written.
    pub sync: bool,
}

impl Default for SpoolConfig {
    fn default() -> Self {
        SpoolConfig {
            enabled: true,
            directory: None,
            max_bytes: NonZeroUsize::new(64 * 1024 * 1024).unwrap_or(NonZeroUsize::MIN),
            flush_interval: Duration::from_secs(10),
            sync: true,
        }
    }
}

impl SpoolConfig {
    pub fn directory(&self) -> PathBuf {
        self.directory
            .clone()
            .unwrap_or_else(|| PathBuf::from(DEFAULT_DIRECTORY))
    }

    /// Segment size: small enough that dropping the oldest segment at the cap costs a
    /// sixteenth of the spool, large enough to keep file counts low.
    fn segment_bytes(&self) -> u64 {
        (self.max_bytes.get() as u64 / 16).clamp(64 * 1024, 4 * 1024 * 1024)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SpoolError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path} is in use by another picket-agent (give each agent its own spool.directory)")]
    Locked { path: PathBuf },
    #[error("{path}: damaged record at offset {offset}: {reason}")]
    Damaged {
        path: PathBuf,
        offset: u64,
        reason: String,
    },
}

fn io_error(path: &Path) -> impl FnOnce(std::io::Error) -> SpoolError + '_ {
    move |source| SpoolError::Io {
        path: path.to_owned(),
        source,
    }
}

/// Where a spooled batch's record is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Location {
    segment: u64,
    offset: u64,
    len: u32,
}

impl Location {
    #[cfg(test)]
    pub fn for_tests() -> Location {
        Location {
            segment: 0,
            offset: 0,
            len: 0,
        }
    }
}

/// A batch found on disk at start-up, to be sent before anything new.
#[derive(Debug)]
pub struct RecoveredBatch {
    /// The sequence to send it under (its own, or a new one when renumbered).
    pub sequence: u64,
    pub samples: usize,
    pub bytes: usize,
    pub location: Location,
}

/// What start-up found in the spool.
#[derive(Debug, Default)]
pub struct Recovery {
    pub batches: Vec<RecoveredBatch>,
    /// Records from another session given new sequence numbers.
    pub renumbered: usize,
    /// Bytes skipped because they did not verify (torn writes, damage).
    pub skipped_bytes: u64,
}

struct Segment {
    number: u64,
    path: PathBuf,
    bytes: u64,
    /// (sequence, samples) of the batches written to it, in order.
    batches: Vec<(u64, usize)>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct State {
    session: u64,
    reserved_through: u64,
    acked_through: u64,
}

pub struct Spool {
    directory: PathBuf,
    config: SpoolConfig,
    _lock: File,
    state: State,
    /// `acked_through` as last written to `state`.
    persisted_acked: u64,
    segments: VecDeque<Segment>,
    /// The segment new records are appended to; `None` after an error or at start-up.
    writer: Option<(u64, File)>,
    next_segment: u64,
    bytes: u64,
}

impl Spool {
    /// Opens (creating if needed) and locks the spool, reads what a previous run left, and
    /// reserves sequence numbers for this run. Returns the spool, the first sequence number
    /// new batches may use, and the batches to resend.
    pub fn open(config: &SpoolConfig) -> Result<(Spool, u64, Recovery), SpoolError> {
        let directory = config.directory();
        std::fs::create_dir_all(&directory).map_err(io_error(&directory))?;
        let lock_path = directory.join("LOCK");
        let lock = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .mode(0o600)
            .open(&lock_path)
            .map_err(io_error(&lock_path))?;
        match lock.try_lock() {
            Ok(()) => {}
            Err(std::fs::TryLockError::WouldBlock) => {
                return Err(SpoolError::Locked { path: directory });
            }
            Err(std::fs::TryLockError::Error(e)) => return Err(io_error(&lock_path)(e)),
        }

        let state_path = directory.join("state");
        let previous = match std::fs::read_to_string(&state_path) {
            Ok(text) => match parse_state(&text) {
                Some(state) => Some(state),
                None => {
                    tracing::error!(path = %state_path.display(),
                        "spool state is damaged; spooled batches will be resent in a new session");
                    None
                }
            },
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
            Err(e) => return Err(io_error(&state_path)(e)),
        };
        let mut state = previous.unwrap_or(State {
            // Never 0, so an aggregator can tell "no session" apart.
            session: fastrand::u64(1..),
            reserved_through: 0,
            acked_through: 0,
        });

        let mut recovery = Recovery::default();
        let mut segments = VecDeque::new();
        let mut kept_max = state.reserved_through;
        let mut foreign = Vec::new();
        let mut numbers = segment_numbers(&directory)?;
        numbers.sort_unstable();
        let mut seen = std::collections::HashSet::new();
        for number in &numbers {
            let path = segment_path(&directory, *number);
            let data = match std::fs::read(&path) {
                Ok(data) => data,
                Err(e) => {
                    // An unreadable segment (I/O error, not a file) is damage: skip it, as a
                    // torn record would be, rather than keep the agent from starting.
                    tracing::error!(path = %path.display(), error = %e,
                        "cannot read a spool segment; skipping it");
                    recovery.skipped_bytes += std::fs::metadata(&path).map_or(0, |m| m.len());
                    continue;
                }
            };
            let scan = scan_records(&data);
            recovery.skipped_bytes += scan.skipped_bytes;
            if scan.skipped_bytes > 0 {
                tracing::warn!(path = %path.display(), skipped_bytes = scan.skipped_bytes,
                    "spool segment has damaged or torn records; skipped them");
            }
            let mut segment = Segment {
                number: *number,
                path,
                bytes: data.len() as u64,
                batches: Vec::new(),
            };
            for record in scan.records {
                // A batch written twice (a sync that failed after the data reached the file,
                // then a retry) is sent once.
                if record.sequence > MAX_NUMBER || !seen.insert((record.session, record.sequence)) {
                    continue;
                }
                let location = Location {
                    segment: *number,
                    offset: record.offset,
                    len: record.len,
                };
                if record.session == state.session {
                    if record.sequence <= state.acked_through {
                        continue;
                    }
                    kept_max = kept_max.max(record.sequence);
                    segment.batches.push((record.sequence, record.samples));
                    recovery.batches.push(RecoveredBatch {
                        sequence: record.sequence,
                        samples: record.samples,
                        bytes: record.len as usize,
                        location,
                    });
                } else {
                    foreign.push((segments.len(), record, location));
                }
            }
            segments.push_back(segment);
        }
        // Renumber records of other sessions above everything this session may have used.
        let mut next_sequence = kept_max + 1;
        recovery.renumbered = foreign.len();
        for (segment_index, record, location) in foreign {
            let sequence = next_sequence;
            next_sequence += 1;
            if let Some(segment) = segments.get_mut(segment_index) {
                segment.batches.push((sequence, record.samples));
            }
            recovery.batches.push(RecoveredBatch {
                sequence,
                samples: record.samples,
                bytes: record.len as usize,
                location,
            });
        }
        recovery.batches.sort_by_key(|b| b.sequence);
        for segment in &mut segments {
            segment.batches.sort_by_key(|(sequence, _)| *sequence);
        }
        let bytes = segments.iter().map(|s| s.bytes).sum();
        let next_segment = numbers.last().map_or(1, |n| n + 1);

        let persisted_acked = state.acked_through;
        state.reserved_through = next_sequence - 1;
        let mut spool = Spool {
            directory,
            config: config.clone(),
            _lock: lock,
            state,
            persisted_acked,
            segments,
            writer: None,
            next_segment,
            bytes,
        };
        spool.reserve(next_sequence)?;
        // Segments holding nothing left to send (all acknowledged) can go now.
        spool.delete_finished_segments();
        Ok((spool, next_sequence, recovery))
    }

    pub fn session(&self) -> u64 {
        self.state.session
    }

    /// The highest sequence that may be sent: a restart continues above it, so nothing above
    /// it may reach an aggregator.
    pub fn reserved_through(&self) -> u64 {
        self.state.reserved_through
    }

    pub fn directory(&self) -> &Path {
        &self.directory
    }

    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    /// Makes sure `sequence` is reserved, writing `state` with a new range once less than
    /// half a range is left, so a failing write is retried long before sequences run out.
    pub fn reserve(&mut self, sequence: u64) -> Result<(), SpoolError> {
        if sequence.saturating_add(RESERVE_STEP / 2) <= self.state.reserved_through {
            return Ok(());
        }
        let mut state = self.state;
        state.reserved_through = sequence.saturating_add(RESERVE_STEP);
        self.write_state(state)?;
        self.state = state;
        Ok(())
    }

    /// Appends batches (sequence, samples, batch), in one write and one sync per segment
    /// touched. Returns the locations of those written, in order: all of them, or a prefix and
    /// the error that stopped the rest.
    pub fn append(
        &mut self,
        batches: &[(u64, usize, &v1::Batch)],
    ) -> (Vec<Location>, Option<SpoolError>) {
        let mut locations = Vec::with_capacity(batches.len());
        let mut rest = batches;
        while !rest.is_empty() {
            let (number, start) = match self.writable_segment() {
                Ok(segment) => segment,
                Err(e) => return (locations, Some(e)),
            };
            let room = self.config.segment_bytes().saturating_sub(start);
            let mut buffer = Vec::new();
            let mut taken = 0;
            for (sequence, samples, batch) in rest {
                let needed = (RECORD_HEADER + PAYLOAD_PREFIX + batch.encoded_len()) as u64;
                // A fresh segment takes at least one record, however large.
                if buffer.len() as u64 + needed > room && (taken > 0 || start > 0) {
                    break;
                }
                let offset = start + buffer.len() as u64;
                let len =
                    encode_record(&mut buffer, self.state.session, *sequence, *samples, batch);
                locations.push(Location {
                    segment: number,
                    offset,
                    len,
                });
                taken += 1;
            }
            if taken == 0 {
                // The current segment is full: the next round opens a new one.
                self.writer = None;
                continue;
            }
            if let Err(e) = self.write_to_segment(number, &buffer) {
                // Whatever reached the file is a torn tail or, if only the sync failed, whole
                // records that recovery will find (once: it keeps one copy per sequence).
                // Count the bytes either way, and start a new segment next time.
                self.writer = None;
                if let Some(segment) = self.segments.back_mut()
                    && let Ok(meta) = std::fs::metadata(&segment.path)
                {
                    let grown = meta.len().saturating_sub(segment.bytes);
                    segment.bytes += grown;
                    self.bytes += grown;
                }
                locations.truncate(locations.len() - taken);
                return (locations, Some(e));
            }
            if let Some(segment) = self.segments.back_mut() {
                segment.bytes += buffer.len() as u64;
                segment
                    .batches
                    .extend(rest[..taken].iter().map(|(s, n, _)| (*s, *n)));
            }
            self.bytes += buffer.len() as u64;
            rest = &rest[taken..];
        }
        (locations, None)
    }

    fn writable_segment(&mut self) -> Result<(u64, u64), SpoolError> {
        if let Some((number, _)) = &self.writer
            && let Some(segment) = self.segments.back()
            && segment.number == *number
            && segment.bytes < self.config.segment_bytes()
        {
            return Ok((*number, segment.bytes));
        }
        let number = self.next_segment;
        let path = segment_path(&self.directory, number);
        let file = OpenOptions::new()
            .create_new(true)
            .append(true)
            .mode(0o600)
            .open(&path)
            .map_err(io_error(&path))?;
        self.next_segment += 1;
        if self.config.sync {
            // The new file's directory entry must survive a power cut too.
            sync_directory(&self.directory)?;
        }
        self.segments.push_back(Segment {
            number,
            path,
            bytes: 0,
            batches: Vec::new(),
        });
        self.writer = Some((number, file));
        Ok((number, 0))
    }

    fn write_to_segment(&mut self, number: u64, buffer: &[u8]) -> Result<(), SpoolError> {
        let path = segment_path(&self.directory, number);
        let Some((_, file)) = self.writer.as_mut() else {
            return Err(SpoolError::Io {
                path,
                source: std::io::Error::other("segment closed"),
            });
        };
        file.write_all(buffer).map_err(io_error(&path))?;
        if self.config.sync {
            file.sync_data().map_err(io_error(&path))?;
        }
        Ok(())
    }

    /// Reads a spooled batch back, checking its record again; `sequence` is the one it is
    /// sent under.
    pub fn read(&self, location: Location, sequence: u64) -> Result<v1::Batch, SpoolError> {
        let path = segment_path(&self.directory, location.segment);
        let file = File::open(&path).map_err(io_error(&path))?;
        let mut record = vec![0u8; RECORD_HEADER + location.len as usize];
        file.read_exact_at(&mut record, location.offset)
            .map_err(io_error(&path))?;
        let damaged = |reason: &str| SpoolError::Damaged {
            path: path.clone(),
            offset: location.offset,
            reason: reason.to_owned(),
        };
        let Some(parsed) = parse_record(&record, 0) else {
            return Err(damaged("checksum or length does not verify"));
        };
        let payload = &record[RECORD_HEADER + PAYLOAD_PREFIX..RECORD_HEADER + parsed.len as usize];
        let mut batch =
            v1::Batch::decode(payload).map_err(|e| damaged(&format!("not a batch: {e}")))?;
        batch.sequence = sequence;
        Ok(batch)
    }

    /// Everything through `sequence` is acknowledged. Kept in memory until [`Self::checkpoint`].
    pub fn acked(&mut self, sequence: u64) {
        self.state.acked_through = self.state.acked_through.max(sequence);
    }

    /// Deletes segments whose batches are all acknowledged and records the acknowledged
    /// sequence in `state`, so a restart does not resend them. Called on the flush timer and at
    /// exit, not per ack.
    pub fn checkpoint(&mut self) -> Result<(), SpoolError> {
        self.delete_finished_segments();
        // With no segment left, the acknowledged sequence filters nothing (anything written
        // later has a higher sequence): no write, so a healthy agent never touches the disk.
        if !self.segments.is_empty() && self.state.acked_through != self.persisted_acked {
            let state = self.state;
            self.write_state(state)?;
            self.persisted_acked = state.acked_through;
        }
        Ok(())
    }

    fn delete_finished_segments(&mut self) {
        let acked = self.state.acked_through;
        let writer = self.writer.as_ref().map(|(n, _)| *n);
        let mut kept = VecDeque::with_capacity(self.segments.len());
        while let Some(segment) = self.segments.pop_front() {
            let finished = segment.batches.iter().all(|(s, _)| *s <= acked);
            if finished {
                if writer == Some(segment.number) {
                    self.writer = None;
                }
                if let Err(e) = std::fs::remove_file(&segment.path)
                    && e.kind() != std::io::ErrorKind::NotFound
                {
                    tracing::warn!(path = %segment.path.display(), error = %e,
                        "cannot delete an acknowledged spool segment");
                    kept.push_back(segment);
                    continue;
                }
                self.bytes -= segment.bytes;
            } else {
                kept.push_back(segment);
            }
        }
        self.segments = kept;
    }

    /// Deletes the oldest segments until the spool fits `max_bytes`, but none holding a batch
    /// in flight (unacknowledged with a sequence up to `in_flight_through`): its ack may be on
    /// the way. Returns the (sequence, samples) of every unacknowledged batch deleted.
    pub fn enforce_cap(&mut self, in_flight_through: u64) -> Vec<(u64, usize)> {
        let mut dropped = Vec::new();
        let acked = self.state.acked_through;
        while self.bytes > self.config.max_bytes.get() as u64 && self.segments.len() > 1 {
            let in_flight = self.segments.front().is_some_and(|s| {
                s.batches
                    .iter()
                    .any(|(seq, _)| *seq > acked && *seq <= in_flight_through)
            });
            if in_flight {
                break;
            }
            let Some(segment) = self.segments.pop_front() else {
                break;
            };
            if self
                .writer
                .as_ref()
                .is_some_and(|(n, _)| *n == segment.number)
            {
                self.writer = None;
            }
            if let Err(e) = std::fs::remove_file(&segment.path) {
                tracing::warn!(path = %segment.path.display(), error = %e,
                    "cannot delete a spool segment to make room");
            }
            self.bytes -= segment.bytes;
            dropped.extend(segment.batches.into_iter().filter(|(s, _)| *s > acked));
        }
        dropped
    }

    fn write_state(&self, state: State) -> Result<(), SpoolError> {
        let text = format_state(&state);
        let path = self.directory.join("state");
        let temporary = self.directory.join("state.tmp");
        let mut file = OpenOptions::new()
            .create(true)
            .truncate(true)
            .write(true)
            .mode(0o600)
            .open(&temporary)
            .map_err(io_error(&temporary))?;
        file.write_all(text.as_bytes())
            .map_err(io_error(&temporary))?;
        if self.config.sync {
            file.sync_data().map_err(io_error(&temporary))?;
        }
        std::fs::rename(&temporary, &path).map_err(io_error(&path))?;
        if self.config.sync {
            sync_directory(&self.directory)?;
        }
        Ok(())
    }
}

fn sync_directory(directory: &Path) -> Result<(), SpoolError> {
    File::open(directory)
        .and_then(|d| d.sync_all())
        .map_err(io_error(directory))
}

fn segment_path(directory: &Path, number: u64) -> PathBuf {
    directory.join(format!("{number:020}.seg"))
}

fn segment_numbers(directory: &Path) -> Result<Vec<u64>, SpoolError> {
    let mut numbers = Vec::new();
    for entry in std::fs::read_dir(directory).map_err(io_error(directory))? {
        let entry = entry.map_err(io_error(directory))?;
        let name = entry.file_name();
        let Some(name) = name.to_str() else { continue };
        // Only names this module writes: 20 digits, within range.
        if let Some(stem) = name.strip_suffix(".seg")
            && stem.len() == 20
            && stem.bytes().all(|b| b.is_ascii_digit())
            && let Ok(number) = stem.parse::<u64>()
            && number <= MAX_NUMBER
            && entry.file_type().is_ok_and(|t| t.is_file())
        {
            numbers.push(number);
        }
    }
    Ok(numbers)
}

fn format_state(state: &State) -> String {
    let body = format!(
        "{STATE_MAGIC}\nsession {}\nreserved_through {}\nacked_through {}\n",
        state.session, state.reserved_through, state.acked_through
    );
    let crc = crc32fast::hash(body.as_bytes());
    format!("{body}crc {crc}\n")
}

fn parse_state(text: &str) -> Option<State> {
    let (body, crc_line) = text.trim_end_matches('\n').rsplit_once('\n')?;
    let crc: u32 = crc_line.strip_prefix("crc ")?.parse().ok()?;
    let body = format!("{body}\n");
    if crc32fast::hash(body.as_bytes()) != crc {
        return None;
    }
    let mut lines = body.lines();
    if lines.next()? != STATE_MAGIC {
        return None;
    }
    let mut field = |name: &str| -> Option<u64> {
        lines
            .next()?
            .strip_prefix(name)?
            .strip_prefix(' ')?
            .parse()
            .ok()
    };
    let state = State {
        session: field("session")?,
        reserved_through: field("reserved_through")?,
        acked_through: field("acked_through")?,
    };
    let sane = state.session != 0
        && state.reserved_through <= MAX_NUMBER
        && state.acked_through <= MAX_NUMBER;
    sane.then_some(state)
}

/// Appends one record; returns the payload length.
fn encode_record(
    out: &mut Vec<u8>,
    session: u64,
    sequence: u64,
    samples: usize,
    batch: &v1::Batch,
) -> u32 {
    let mut payload = Vec::with_capacity(PAYLOAD_PREFIX + batch.encoded_len());
    payload.extend_from_slice(&session.to_le_bytes());
    payload.extend_from_slice(&sequence.to_le_bytes());
    payload.extend_from_slice(&(samples.min(u32::MAX as usize) as u32).to_le_bytes());
    // Encoding into a Vec cannot run out of room.
    let _ = batch.encode(&mut payload);
    let len = payload.len() as u32;
    out.extend_from_slice(RECORD_MAGIC);
    out.extend_from_slice(&len.to_le_bytes());
    out.extend_from_slice(&crc32fast::hash(&payload).to_le_bytes());
    out.extend_from_slice(&payload);
    len
}

struct ScannedRecord {
    offset: u64,
    len: u32,
    session: u64,
    sequence: u64,
    samples: usize,
}

struct Scan {
    records: Vec<ScannedRecord>,
    skipped_bytes: u64,
}

/// A verified record at `offset`, or `None`.
fn parse_record(data: &[u8], offset: usize) -> Option<ScannedRecord> {
    let header = data.get(offset..offset + RECORD_HEADER)?;
    if &header[..4] != RECORD_MAGIC {
        return None;
    }
    let len = u32::from_le_bytes(header[4..8].try_into().ok()?);
    let crc = u32::from_le_bytes(header[8..12].try_into().ok()?);
    if (len as usize) < PAYLOAD_PREFIX || len as usize > MAX_RECORD_PAYLOAD {
        return None;
    }
    let start = offset + RECORD_HEADER;
    let payload = data.get(start..start + len as usize)?;
    if crc32fast::hash(payload) != crc {
        return None;
    }
    Some(ScannedRecord {
        offset: offset as u64,
        len,
        session: u64::from_le_bytes(payload[0..8].try_into().ok()?),
        sequence: u64::from_le_bytes(payload[8..16].try_into().ok()?),
        samples: u32::from_le_bytes(payload[16..20].try_into().ok()?) as usize,
    })
}

/// Every verified record in a segment; bytes between them that do not verify are skipped,
/// searching for the next record marker.
fn scan_records(data: &[u8]) -> Scan {
    let mut scan = Scan {
        records: Vec::new(),
        skipped_bytes: 0,
    };
    let mut offset = 0;
    while offset < data.len() {
        if let Some(record) = parse_record(data, offset) {
            offset += RECORD_HEADER + record.len as usize;
            scan.records.push(record);
            continue;
        }
        let next = data[offset + 1..]
            .windows(RECORD_MAGIC.len())
            .position(|w| w == RECORD_MAGIC)
            .map_or(data.len(), |p| offset + 1 + p);
        scan.skipped_bytes += (next - offset) as u64;
        offset = next;
    }
    scan
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(dir: &Path, max_bytes: usize) -> SpoolConfig {
        SpoolConfig {
            enabled: true,
            directory: Some(dir.join("spool")),
            max_bytes: NonZeroUsize::new(max_bytes).unwrap(),
            flush_interval: Duration::from_secs(1),
            sync: true,
        }
    }

    fn batch(sequence: u64, payload: usize) -> v1::Batch {
        v1::Batch {
            sequence,
            symbols: vec![String::new(), "x".repeat(payload)],
            common_labels: vec![],
            families: vec![],
        }
    }

    fn append(
        spool: &mut Spool,
        sequences: std::ops::RangeInclusive<u64>,
        payload: usize,
    ) -> Vec<Location> {
        let batches: Vec<v1::Batch> = sequences.clone().map(|s| batch(s, payload)).collect();
        let items: Vec<(u64, usize, &v1::Batch)> =
            batches.iter().map(|b| (b.sequence, 10, b)).collect();
        let (locations, error) = spool.append(&items);
        assert!(error.is_none(), "{error:?}");
        locations
    }

    #[test]
    fn batches_survive_a_restart_in_the_same_session() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = config(dir.path(), 1 << 20);
        let (mut spool, first, recovery) = Spool::open(&cfg).unwrap();
        assert_eq!(first, 1);
        assert!(recovery.batches.is_empty());
        let session = spool.session();
        let locations = append(&mut spool, 1..=5, 100);
        assert_eq!(spool.read(locations[2], 3).unwrap(), batch(3, 100));
        spool.acked(2);
        spool.checkpoint().unwrap();
        drop(spool);

        let (spool, next, recovery) = Spool::open(&cfg).unwrap();
        assert_eq!(spool.session(), session, "the session is resumed");
        let sequences: Vec<u64> = recovery.batches.iter().map(|b| b.sequence).collect();
        assert_eq!(
            sequences,
            vec![3, 4, 5],
            "acknowledged batches are not resent"
        );
        assert!(
            next > RESERVE_STEP,
            "new sequences start above the reserved range"
        );
        let again = spool.read(recovery.batches[0].location, 3).unwrap();
        assert_eq!(again, batch(3, 100));
        assert_eq!(recovery.batches[0].samples, 10);
    }

    #[test]
    fn a_second_agent_cannot_share_the_spool() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = config(dir.path(), 1 << 20);
        let (_spool, _, _) = Spool::open(&cfg).unwrap();
        match Spool::open(&cfg) {
            Err(SpoolError::Locked { .. }) => {}
            other => panic!("expected Locked, got {:?}", other.map(|_| ())),
        }
    }

    #[test]
    fn torn_tail_and_damage_are_skipped() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = config(dir.path(), 1 << 20);
        let (mut spool, _, _) = Spool::open(&cfg).unwrap();
        append(&mut spool, 1..=4, 50);
        let segment = spool.segments.back().unwrap().path.clone();
        drop(spool);
        let mut data = std::fs::read(&segment).unwrap();
        let record = data.len() / 4;
        // Flip a byte inside record 2's payload, and tear record 4 in half.
        data[record + RECORD_HEADER + 30] ^= 0xff;
        data.truncate(data.len() - record / 2);
        std::fs::write(&segment, &data).unwrap();

        let (mut spool, _, recovery) = Spool::open(&cfg).unwrap();
        let sequences: Vec<u64> = recovery.batches.iter().map(|b| b.sequence).collect();
        assert_eq!(sequences, vec![1, 3]);
        assert_eq!(
            recovery.skipped_bytes,
            (record + record - record / 2) as u64
        );
        // New records go to a new segment, not after the torn tail.
        append(&mut spool, 10..=10, 50);
        assert_eq!(spool.segments.len(), 2);
        drop(spool);
        let (_, _, recovery) = Spool::open(&cfg).unwrap();
        let sequences: Vec<u64> = recovery.batches.iter().map(|b| b.sequence).collect();
        assert_eq!(sequences, vec![1, 3, 10]);
    }

    #[test]
    fn the_cap_drops_the_oldest_segments_and_reports_them() {
        let dir = tempfile::tempdir().unwrap();
        // 64 KiB segments (the minimum), 200 KiB cap: records of ~20 KiB, three per segment.
        let cfg = config(dir.path(), 200 * 1024);
        let (mut spool, _, _) = Spool::open(&cfg).unwrap();
        for s in 1..=30 {
            append(&mut spool, s..=s, 20 * 1024);
            let dropped = spool.enforce_cap(0);
            assert!(spool.bytes() <= 200 * 1024, "{}", spool.bytes());
            if s <= 9 {
                assert!(dropped.is_empty(), "{s}: {dropped:?}");
            }
        }
        drop(spool);
        let (_, _, recovery) = Spool::open(&cfg).unwrap();
        let sequences: Vec<u64> = recovery.batches.iter().map(|b| b.sequence).collect();
        assert_eq!(*sequences.last().unwrap(), 30, "the newest data stays");
        assert!(
            sequences.windows(2).all(|w| w[1] == w[0] + 1),
            "{sequences:?}"
        );
        assert!(sequences.len() >= 6, "{sequences:?}");
    }

    #[test]
    fn the_cap_never_deletes_a_batch_in_flight() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = config(dir.path(), 200 * 1024);
        let (mut spool, _, _) = Spool::open(&cfg).unwrap();
        // Three records per 64 KiB segment: five segments, over the 200 KiB cap.
        for s in 1..=15 {
            append(&mut spool, s..=s, 20 * 1024);
        }
        // Batches 1..=3 (the oldest segment) are on the wire: the cap waits for their acks.
        assert!(spool.enforce_cap(3).is_empty());
        assert!(spool.bytes() > 200 * 1024);
        // Acknowledged, their segment goes uncounted, and the next one (4..=6) is dropped.
        spool.acked(3);
        let dropped: Vec<u64> = spool.enforce_cap(3).into_iter().map(|(s, _)| s).collect();
        assert!(spool.bytes() <= 200 * 1024);
        assert_eq!(dropped, vec![4, 5, 6]);
    }

    #[test]
    fn reservations_are_renewed_half_way() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = config(dir.path(), 1 << 20);
        let (mut spool, first, _) = Spool::open(&cfg).unwrap();
        let reserved = spool.reserved_through();
        assert!(reserved >= first + RESERVE_STEP / 2);
        spool.reserve(reserved - RESERVE_STEP / 2 + 1).unwrap();
        assert!(
            spool.reserved_through() > reserved,
            "renewed before running out"
        );
    }

    #[test]
    fn odd_files_in_the_directory_do_not_stop_recovery() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = config(dir.path(), 1 << 20);
        let (mut spool, _, _) = Spool::open(&cfg).unwrap();
        append(&mut spool, 1..=2, 10);
        let spool_dir = spool.directory().to_owned();
        drop(spool);
        std::fs::create_dir(spool_dir.join("00000000000000000099.seg")).unwrap();
        std::fs::write(spool_dir.join("+5.seg"), b"x").unwrap();
        std::fs::write(spool_dir.join("18446744073709551615.seg"), b"x").unwrap();
        let (_, _, recovery) = Spool::open(&cfg).unwrap();
        assert_eq!(recovery.batches.len(), 2);
    }

    #[test]
    fn a_lost_state_file_renumbers_into_a_new_session() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = config(dir.path(), 1 << 20);
        let (mut spool, _, _) = Spool::open(&cfg).unwrap();
        let old_session = spool.session();
        append(&mut spool, 1..=3, 10);
        drop(spool);
        std::fs::write(dir.path().join("spool/state"), "garbage").unwrap();
        let (spool, next, recovery) = Spool::open(&cfg).unwrap();
        assert_ne!(spool.session(), old_session);
        assert_eq!(recovery.renumbered, 3);
        let sequences: Vec<u64> = recovery.batches.iter().map(|b| b.sequence).collect();
        assert_eq!(sequences, vec![1, 2, 3]);
        assert_eq!(next, 4);
        let read = spool.read(recovery.batches[1].location, 2).unwrap();
        assert_eq!(read.sequence, 2);
    }

    #[test]
    fn acknowledged_segments_are_deleted() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = config(dir.path(), 200 * 1024);
        let (mut spool, _, _) = Spool::open(&cfg).unwrap();
        for s in 1..=6 {
            append(&mut spool, s..=s, 20 * 1024);
        }
        assert!(spool.segments.len() >= 2);
        spool.acked(6);
        spool.checkpoint().unwrap();
        assert_eq!(spool.bytes(), 0);
        assert!(segment_numbers(spool.directory()).unwrap().is_empty());
    }

    #[test]
    fn state_text_round_trips_and_rejects_damage() {
        let state = State {
            session: 42,
            reserved_through: 100,
            acked_through: 7,
        };
        let text = format_state(&state);
        assert_eq!(parse_state(&text), Some(state));
        assert_eq!(parse_state(&text.replace("100", "900")), None);
        assert_eq!(parse_state(""), None);
    }
}

//! A network sink's durable queue: an append-only log of batches on disk, split into
//! segment files, with a committed read cursor.
//!
//! The aggregator acknowledges a batch to its agent once every network sink has appended it
//! here, so the queue is what makes an ack mean "safe" while a database is down or the
//! aggregator restarts. Each sink has its own queue directory:
//!
//! ```text
//! <queue.directory>/<sink name>/00000000000000000001.seg   records, appended
//! <queue.directory>/<sink name>/cursor                     "<segment> <offset>" delivered so far
//! ```
//!
//! A record is `[payload length u32][crc32 u32][samples u32][shard key u64][payload]`, the
//! checksum covering everything after itself. At start-up every segment is scanned: a torn
//! tail (the process or the power died mid-append) is cut off, and a corrupt record in an
//! older segment ends that segment's readable part (logged with the bytes skipped).
//!
//! Delivery is at least once: the cursor is saved after each delivered request, so a crash
//! between a request and its cursor update resends those batches. Sample timestamps come from
//! the agents, so a resend overwrites the same points in Prometheus and InfluxDB.
//!
//! When the queue reaches `max_bytes` the policy decides: `drop_oldest` deletes whole
//! segments, oldest first among those not yet being read, and counts their samples;
//! `block` refuses the append, so the aggregator stops acking and agents keep (and later
//! resend) their batches.

use std::collections::VecDeque;
use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Duration;

use serde::Deserialize;

const HEADER_BYTES: u64 = 20;
/// A record larger than this is corrupt (the aggregator's own batches are bounded by
/// `grpc.max_message_bytes`, far below).
const MAX_RECORD_BYTES: u64 = 512 * 1024 * 1024;
/// Finished segments left for [`Queue::sync`] to fsync; more only pile up if it stopped.
const MAX_UNSYNCED_SEGMENTS: usize = 4;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum WhenFull {
    /// Delete the oldest queued data that is not being sent, counting its samples.
    DropOldest,
    /// Refuse new batches: agents are not acked and keep their data until the sink drains.
    Block,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct QueueConfig {
    /// Most bytes waiting on disk for this sink.
    pub max_bytes: u64,
    /// Size at which a new segment file is started; whole segments are the unit of dropping.
    pub segment_bytes: u64,
    pub when_full: WhenFull,
    /// Flush appended data to the disk (fsync) this often. A crash of the process loses
    /// nothing either way; a power cut can lose what was appended since the last flush.
    #[serde(with = "humantime_serde")]
    pub fsync_interval: Duration,
}

impl Default for QueueConfig {
    fn default() -> Self {
        QueueConfig {
            max_bytes: 1024 * 1024 * 1024,
            segment_bytes: 16 * 1024 * 1024,
            when_full: WhenFull::DropOldest,
            fsync_interval: Duration::from_secs(1),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum QueueError {
    #[error("queue {dir}: {source}")]
    Io {
        dir: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "queue {dir} is full ({bytes} bytes waiting, queue.max_bytes = {max}) and queue.when_full = \"block\""
    )]
    Full { dir: PathBuf, bytes: u64, max: u64 },
}

/// Where a record ends: the cursor value that commits it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Position {
    pub segment: u64,
    pub offset: u64,
}

/// One record read back for delivery.
#[derive(Debug)]
pub struct Record {
    pub end: Position,
    pub samples: u32,
    pub shard_key: u64,
    pub payload: Vec<u8>,
}

/// What an append did besides storing the record.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Appended {
    /// Samples deleted to make room (policy `drop_oldest`).
    pub dropped_samples: u64,
}

#[derive(Debug)]
struct Segment {
    id: u64,
    /// Readable bytes (after recovery: up to the last good record).
    bytes: u64,
    samples: u64,
}

struct State {
    segments: VecDeque<Segment>,
    writer: Option<File>,
    /// Delivered up to here.
    cursor: Position,
    /// Samples of the cursor's segment already delivered, for the depth gauge.
    cursor_samples: u64,
    /// The segment the reader is in; it and everything before it are never dropped.
    reading: u64,
    dirty: bool,
    /// Segments finished since the last [`Queue::sync`], still to be fsynced by it.
    finished: Vec<File>,
}

pub struct Queue {
    dir: PathBuf,
    config: QueueConfig,
    state: Mutex<State>,
    appended: tokio::sync::Notify,
}

/// A snapshot for the queue gauges.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Depth {
    pub bytes: u64,
    pub samples: u64,
}

impl Queue {
    /// Opens (or creates) the queue in `dir`, recovering what an earlier process left.
    pub fn open(dir: &Path, config: QueueConfig) -> Result<Queue, QueueError> {
        let io = |source| QueueError::Io {
            dir: dir.to_owned(),
            source,
        };
        fs::create_dir_all(dir).map_err(io)?;
        let mut ids = Vec::new();
        for entry in fs::read_dir(dir).map_err(io)? {
            let entry = entry.map_err(io)?;
            let name = entry.file_name();
            let Some(id) = name
                .to_str()
                .and_then(|n| n.strip_suffix(".seg"))
                .and_then(|n| n.parse::<u64>().ok())
            else {
                continue;
            };
            ids.push(id);
        }
        ids.sort_unstable();
        let cursor = read_cursor(&dir.join("cursor")).map_err(io)?;
        let mut segments = VecDeque::new();
        let last = ids.last().copied();
        for id in ids {
            if id < cursor.segment {
                // Fully delivered; the process died before deleting it.
                let _ = fs::remove_file(segment_path(dir, id));
                continue;
            }
            let path = segment_path(dir, id);
            let (bytes, samples, file_len) = scan_segment(&path).map_err(io)?;
            if bytes < file_len {
                if Some(id) == last {
                    tracing::warn!(path = %path.display(), bytes = file_len - bytes,
                        "sink queue: cutting off a torn record left by an interrupted append");
                    OpenOptions::new()
                        .write(true)
                        .open(&path)
                        .and_then(|f| f.set_len(bytes))
                        .map_err(io)?;
                } else {
                    tracing::error!(path = %path.display(), bytes = file_len - bytes,
                        "sink queue: a corrupt record ends this segment early; the bytes after it are skipped");
                }
            }
            segments.push_back(Segment { id, bytes, samples });
        }
        let mut cursor_samples = 0;
        let cursor = match segments.front() {
            Some(first) if first.id == cursor.segment => {
                let offset = cursor.offset.min(first.bytes);
                cursor_samples =
                    samples_before(&segment_path(dir, first.id), offset).map_err(io)?;
                Position {
                    segment: first.id,
                    offset,
                }
            }
            Some(first) => Position {
                segment: first.id,
                offset: 0,
            },
            None => Position {
                segment: cursor.segment.max(1),
                offset: 0,
            },
        };
        let queue = Queue {
            dir: dir.to_owned(),
            config,
            state: Mutex::new(State {
                segments,
                writer: None,
                cursor,
                cursor_samples,
                reading: cursor.segment,
                dirty: false,
                finished: Vec::new(),
            }),
            appended: tokio::sync::Notify::new(),
        };
        Ok(queue)
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Bytes and samples not yet delivered.
    pub fn depth(&self) -> Depth {
        let state = self.lock();
        depth_of(&state)
    }

    /// Whether `bytes` more would exceed `max_bytes` under the `block` policy.
    pub fn would_block(&self, bytes: usize) -> bool {
        self.config.when_full == WhenFull::Block
            && refuses(
                depth_of(&self.lock()).bytes,
                HEADER_BYTES + bytes as u64,
                self.config.max_bytes,
            )
    }

    /// The error a `block` queue gives when it has no room.
    pub fn full_error(&self) -> QueueError {
        QueueError::Full {
            dir: self.dir.clone(),
            bytes: self.depth().bytes,
            max: self.config.max_bytes,
        }
    }

    /// Appends one record. Returns once the bytes are in the file (in the page cache: safe
    /// from a process crash; `fsync_interval` bounds what a power cut can take).
    pub fn append(
        &self,
        payload: &[u8],
        samples: u32,
        shard_key: u64,
    ) -> Result<Appended, QueueError> {
        let io = |source| QueueError::Io {
            dir: self.dir.clone(),
            source,
        };
        let record_bytes = HEADER_BYTES + payload.len() as u64;
        let mut state = self.lock();
        let mut appended = Appended::default();
        let depth = depth_of(&state).bytes;
        if depth + record_bytes > self.config.max_bytes {
            match self.config.when_full {
                WhenFull::Block if refuses(depth, record_bytes, self.config.max_bytes) => {
                    return Err(QueueError::Full {
                        dir: self.dir.clone(),
                        bytes: depth,
                        max: self.config.max_bytes,
                    });
                }
                // An empty queue takes a record larger than the limit.
                WhenFull::Block => {}
                WhenFull::DropOldest => {
                    appended.dropped_samples = self.make_room(&mut state, record_bytes);
                    if depth_of(&state).bytes + record_bytes > self.config.max_bytes {
                        // Everything left is being sent right now: the new record is the
                        // one that cannot be kept.
                        appended.dropped_samples += u64::from(samples);
                        return Ok(appended);
                    }
                }
            }
        }
        if state.segments.is_empty() {
            let id = state.cursor.segment.max(1);
            state.segments.push_back(Segment {
                id,
                bytes: 0,
                samples: 0,
            });
            state.writer = None;
        }
        if let Some(last) = state.segments.back()
            && last.bytes > 0
            && last.bytes + record_bytes > self.config.segment_bytes
        {
            let id = last.id + 1;
            if let Some(old) = state.writer.take() {
                // Appends run on the async workers, so the finished segment's fsync waits
                // for the next `sync`, which runs on a blocking thread. Should that stop
                // running, the append syncs and closes the oldest itself rather than keep
                // open (and undeletable) files without end.
                state.finished.push(old);
                if state.finished.len() > MAX_UNSYNCED_SEGMENTS {
                    let oldest = state.finished.remove(0);
                    let _ = oldest.sync_data();
                }
            }
            state.segments.push_back(Segment {
                id,
                bytes: 0,
                samples: 0,
            });
        }
        if state.writer.is_none() {
            // A new segment, or the last one recovered after a restart.
            let id = state.segments.back().map_or(1, |s| s.id);
            let file = OpenOptions::new()
                .create(true)
                .append(true)
                .open(segment_path(&self.dir, id))
                .map_err(io)?;
            state.writer = Some(file);
        }
        let mut record = Vec::with_capacity(record_bytes as usize);
        record.extend_from_slice(&(payload.len() as u32).to_le_bytes());
        record.extend_from_slice(&[0; 4]);
        record.extend_from_slice(&samples.to_le_bytes());
        record.extend_from_slice(&shard_key.to_le_bytes());
        record.extend_from_slice(payload);
        let crc = crc32fast::hash(&record[8..]);
        record[4..8].copy_from_slice(&crc.to_le_bytes());
        let Some(writer) = state.writer.as_mut() else {
            return Err(io(std::io::Error::other("no open segment")));
        };
        if let Err(e) = writer.write_all(&record) {
            // Cut a partial record back so the segment stays readable.
            let good = state.segments.back().map_or(0, |s| s.bytes);
            if let Some(w) = state.writer.as_ref() {
                let _ = w.set_len(good);
            }
            return Err(io(e));
        }
        if let Some(last) = state.segments.back_mut() {
            last.bytes += record_bytes;
            last.samples += u64::from(samples);
        }
        state.dirty = true;
        drop(state);
        self.appended.notify_waiters();
        Ok(appended)
    }

    /// Deletes whole segments after the one being read, oldest first, until `needed` more
    /// bytes fit. Returns the samples deleted.
    fn make_room(&self, state: &mut State, needed: u64) -> u64 {
        let mut dropped = 0;
        while depth_of(state).bytes + needed > self.config.max_bytes {
            let reading = state.reading.max(state.cursor.segment);
            let Some(index) = state.segments.iter().position(|s| s.id > reading) else {
                break;
            };
            let is_last = index + 1 == state.segments.len();
            if is_last {
                // The segment being written: close it; the next append starts a fresh one.
                state.writer = None;
            }
            let Some(segment) = state.segments.remove(index) else {
                break;
            };
            if is_last {
                // Keep the id sequence increasing: leave an empty placeholder.
                state.segments.push_back(Segment {
                    id: segment.id + 1,
                    bytes: 0,
                    samples: 0,
                });
            }
            let _ = fs::remove_file(segment_path(&self.dir, segment.id));
            tracing::warn!(dir = %self.dir.display(), samples = segment.samples,
                "sink queue full: dropped its oldest waiting segment (queue.when_full = \"drop_oldest\")");
            dropped += segment.samples;
        }
        dropped
    }

    /// fsyncs what was appended since the last call: the segment being written and the
    /// segments finished since. The fsyncs run on duplicated handles after the lock is
    /// released, so appends (on the async workers) never wait for the disk here.
    pub fn sync(&self) {
        let (current, finished) = {
            let mut state = self.lock();
            let current = if std::mem::take(&mut state.dirty) {
                state.writer.as_ref().map(File::try_clone)
            } else {
                None
            };
            (current, std::mem::take(&mut state.finished))
        };
        let current = match current {
            Some(Ok(file)) => Some(file),
            Some(Err(e)) => {
                tracing::warn!(dir = %self.dir.display(), error = %e, "sink queue: cannot fsync");
                self.lock().dirty = true;
                None
            }
            None => None,
        };
        for file in finished.iter().chain(current.as_ref()) {
            if let Err(e) = file.sync_data() {
                tracing::warn!(dir = %self.dir.display(), error = %e, "sink queue: fsync failed");
            }
        }
    }

    pub fn fsync_interval(&self) -> Duration {
        self.config.fsync_interval
    }

    /// Marks records delivered (in order, by their end and sample count): saves the cursor
    /// and deletes finished segments. The file work happens outside the lock, so appends do
    /// not wait for it; the new cursor is written before the queue reports it (in `depth`)
    /// and before segments are deleted. One caller at a time (the sink's dispatcher).
    pub fn commit(&self, delivered: &[(Position, u32)]) -> Result<(), QueueError> {
        let (mut cursor, mut cursor_samples) = {
            let state = self.lock();
            (state.cursor, state.cursor_samples)
        };
        for &(end, samples) in delivered {
            if end <= cursor {
                continue;
            }
            if end.segment != cursor.segment {
                cursor_samples = 0;
            }
            cursor = end;
            cursor_samples += u64::from(samples);
        }
        let written = write_cursor(&self.dir, cursor);
        let done = {
            let mut state = self.lock();
            state.cursor = cursor;
            state.cursor_samples = cursor_samples;
            let mut done = Vec::new();
            while state
                .segments
                .front()
                .is_some_and(|s| s.id < cursor.segment)
            {
                if let Some(segment) = state.segments.pop_front() {
                    done.push(segment.id);
                }
            }
            done
        };
        for id in done {
            let _ = fs::remove_file(segment_path(&self.dir, id));
        }
        written.map_err(|source| QueueError::Io {
            dir: self.dir.clone(),
            source,
        })
    }

    /// A reader starting at the committed cursor. One per queue: the sink's dispatcher.
    pub fn reader(&self) -> Reader<'_> {
        let cursor = self.lock().cursor;
        Reader {
            queue: self,
            position: cursor,
            files: Vec::new(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Whether a `block` queue holding `depth` bytes refuses a record of `record_bytes`. An
/// empty queue takes any record, even one larger than `max_bytes`: refusing it would stop
/// its agent for good, since the agent resends the same batch until it is accepted.
fn refuses(depth: u64, record_bytes: u64, max_bytes: u64) -> bool {
    depth > 0 && depth + record_bytes > max_bytes
}

fn depth_of(state: &State) -> Depth {
    let mut depth = Depth::default();
    for s in &state.segments {
        if s.id < state.cursor.segment {
            continue;
        }
        if s.id == state.cursor.segment {
            depth.bytes += s.bytes.saturating_sub(state.cursor.offset);
            depth.samples += s.samples.saturating_sub(state.cursor_samples);
        } else {
            depth.bytes += s.bytes;
            depth.samples += s.samples;
        }
    }
    depth
}

/// Reads records in order, waiting for appends at the end.
///
/// A record can be read whole ([`Reader::next`]) or in two steps: its header first
/// ([`Reader::next_header`], which moves past the record), and its payload later
/// ([`Reader::payload`]). The sink driver uses the second form to pass over a record whose
/// worker has no room yet without holding its bytes in memory.
pub struct Reader<'a> {
    queue: &'a Queue,
    position: Position,
    /// Open segment files, newest last. Payloads read later may sit in older segments than
    /// the one being read; those cannot be deleted while records in them are uncommitted.
    files: Vec<(u64, File)>,
}

/// A record's place and header, without its payload.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RecordHeader {
    pub start: Position,
    /// The cursor value that commits the record.
    pub end: Position,
    pub samples: u32,
    pub shard_key: u64,
    /// Payload bytes.
    pub len: u32,
}

/// Segment files a reader keeps open: the one being read and a few older ones holding
/// records whose payloads are read later.
const OPEN_SEGMENTS: usize = 4;

impl Reader<'_> {
    /// The next record, or `None` when everything appended so far has been read. On an error
    /// the reader stays where it was.
    pub fn try_next(&mut self) -> Result<Option<Record>, QueueError> {
        let Some(header) = self.try_next_header()? else {
            return Ok(None);
        };
        let payload = self
            .payload(&header)
            .inspect_err(|_| self.position = header.start)?;
        Ok(Some(Record {
            end: header.end,
            samples: header.samples,
            shard_key: header.shard_key,
            payload,
        }))
    }

    /// The next record, waiting for one to be appended. On an error the reader stays where
    /// it was.
    pub async fn next(&mut self) -> Result<Record, QueueError> {
        let header = self.next_header().await?;
        let payload = self
            .payload(&header)
            .inspect_err(|_| self.position = header.start)?;
        Ok(Record {
            end: header.end,
            samples: header.samples,
            shard_key: header.shard_key,
            payload,
        })
    }

    /// The next record's header, waiting for one to be appended. The reader moves past the
    /// record; its payload stays readable with [`Reader::payload`] until it is committed.
    pub async fn next_header(&mut self) -> Result<RecordHeader, QueueError> {
        loop {
            let appended = self.queue.appended.notified();
            tokio::pin!(appended);
            appended.as_mut().enable();
            if let Some(header) = self.try_next_header()? {
                return Ok(header);
            }
            appended.await;
        }
    }

    /// The next record's header, or `None` when everything appended so far has been read.
    /// On an error the reader stays where it was.
    pub fn try_next_header(&mut self) -> Result<Option<RecordHeader>, QueueError> {
        let io = |source| QueueError::Io {
            dir: self.queue.dir.clone(),
            source,
        };
        loop {
            let (readable, next_segment) = {
                let mut state = self.queue.lock();
                let current = state
                    .segments
                    .iter()
                    .find(|s| s.id == self.position.segment);
                let readable = current.map(|s| s.bytes);
                let next = state
                    .segments
                    .iter()
                    .find(|s| s.id > self.position.segment)
                    .map(|s| s.id);
                state.reading = self.position.segment;
                (readable, next)
            };
            match readable {
                Some(bytes) if self.position.offset < bytes => {
                    let header = self.header_at(bytes).map_err(io)?;
                    self.position = header.end;
                    return Ok(Some(header));
                }
                _ => match next_segment {
                    // This segment is done (or was dropped): move on.
                    Some(next) => {
                        self.position = Position {
                            segment: next,
                            offset: 0,
                        };
                    }
                    None => return Ok(None),
                },
            }
        }
    }

    /// The payload of a record this reader has passed and the queue has not committed.
    pub fn payload(&mut self, header: &RecordHeader) -> Result<Vec<u8>, QueueError> {
        let io = |source| QueueError::Io {
            dir: self.queue.dir.clone(),
            source,
        };
        let file = self.file(header.start.segment).map_err(io)?;
        let mut payload = vec![0; header.len as usize];
        file.read_exact_at(&mut payload, header.start.offset + HEADER_BYTES)
            .map_err(io)?;
        Ok(payload)
    }

    fn header_at(&mut self, readable: u64) -> std::io::Result<RecordHeader> {
        let start = self.position;
        let file = self.file(start.segment)?;
        let mut header = [0u8; HEADER_BYTES as usize];
        file.read_exact_at(&mut header, start.offset)?;
        let (len, samples, shard_key) = parse_header(&header);
        let end = start.offset + HEADER_BYTES + u64::from(len);
        if end > readable {
            return Err(std::io::Error::other(format!(
                "record at {}:{} runs past the segment's end",
                start.segment, start.offset
            )));
        }
        Ok(RecordHeader {
            start,
            end: Position {
                segment: start.segment,
                offset: end,
            },
            samples,
            shard_key,
            len,
        })
    }

    fn file(&mut self, segment: u64) -> std::io::Result<&File> {
        let index = match self.files.iter().position(|(id, _)| *id == segment) {
            Some(index) => index,
            None => {
                let file = File::open(segment_path(&self.queue.dir, segment))?;
                let committed = self.queue.lock().cursor.segment;
                // Segments before the cursor's are deleted or about to be.
                self.files.retain(|(id, _)| *id >= committed);
                if self.files.len() >= OPEN_SEGMENTS {
                    self.files.remove(0);
                }
                self.files.push((segment, file));
                self.files.sort_unstable_by_key(|(id, _)| *id);
                self.files
                    .iter()
                    .position(|(id, _)| *id == segment)
                    .unwrap_or_default()
            }
        };
        Ok(&self.files[index].1)
    }
}

fn parse_header(header: &[u8; HEADER_BYTES as usize]) -> (u32, u32, u64) {
    let u32_at =
        |i: usize| u32::from_le_bytes([header[i], header[i + 1], header[i + 2], header[i + 3]]);
    let mut key = [0u8; 8];
    key.copy_from_slice(&header[12..20]);
    (u32_at(0), u32_at(8), u64::from_le_bytes(key))
}

fn segment_path(dir: &Path, id: u64) -> PathBuf {
    dir.join(format!("{id:020}.seg"))
}

/// Scans a segment: (bytes up to the last good record, samples in them, file length).
fn scan_segment(path: &Path) -> std::io::Result<(u64, u64, u64)> {
    let data = fs::read(path)?;
    let mut offset = 0usize;
    let mut samples = 0u64;
    while data.len() - offset >= HEADER_BYTES as usize {
        let mut header = [0u8; HEADER_BYTES as usize];
        header.copy_from_slice(&data[offset..offset + HEADER_BYTES as usize]);
        let (len, record_samples, _) = parse_header(&header);
        let crc = u32::from_le_bytes([header[4], header[5], header[6], header[7]]);
        let end = offset as u64 + HEADER_BYTES + u64::from(len);
        if u64::from(len) > MAX_RECORD_BYTES || end > data.len() as u64 {
            break;
        }
        if crc32fast::hash(&data[offset + 8..end as usize]) != crc {
            break;
        }
        samples += u64::from(record_samples);
        offset = end as usize;
    }
    Ok((offset as u64, samples, data.len() as u64))
}

/// Samples in the records of a segment before `offset`.
fn samples_before(path: &Path, offset: u64) -> std::io::Result<u64> {
    let data = fs::read(path)?;
    let mut at = 0u64;
    let mut samples = 0;
    while at + HEADER_BYTES <= offset.min(data.len() as u64) {
        let mut header = [0u8; HEADER_BYTES as usize];
        header.copy_from_slice(&data[at as usize..(at + HEADER_BYTES) as usize]);
        let (len, record_samples, _) = parse_header(&header);
        at += HEADER_BYTES + u64::from(len);
        if at > offset {
            break;
        }
        samples += u64::from(record_samples);
    }
    Ok(samples)
}

fn read_cursor(path: &Path) -> std::io::Result<Position> {
    match fs::read_to_string(path) {
        Ok(text) => {
            let mut parts = text.split_whitespace().map(str::parse::<u64>);
            match (parts.next(), parts.next()) {
                (Some(Ok(segment)), Some(Ok(offset))) => Ok(Position { segment, offset }),
                _ => {
                    // A cursor is only a hint of progress: without it everything still queued
                    // is sent again, which the databases absorb (same timestamps).
                    tracing::warn!(path = %path.display(), "sink queue: unreadable cursor; resending from the oldest segment");
                    Ok(Position {
                        segment: 0,
                        offset: 0,
                    })
                }
            }
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Position {
            segment: 0,
            offset: 0,
        }),
        Err(e) => Err(e),
    }
}

fn write_cursor(dir: &Path, position: Position) -> std::io::Result<()> {
    // Write-then-rename so a crash leaves the old cursor or the new one, never half of one.
    let tmp = dir.join("cursor.tmp");
    fs::write(&tmp, format!("{} {}\n", position.segment, position.offset))?;
    fs::rename(&tmp, dir.join("cursor"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(max_bytes: u64, segment_bytes: u64, when_full: WhenFull) -> QueueConfig {
        QueueConfig {
            max_bytes,
            segment_bytes,
            when_full,
            fsync_interval: Duration::from_secs(1),
        }
    }

    fn drain(queue: &Queue) -> Vec<Record> {
        let mut reader = queue.reader();
        let mut out = Vec::new();
        while let Some(r) = reader.try_next().unwrap() {
            out.push(r);
        }
        out
    }

    #[test]
    fn records_come_back_in_order_across_segments_and_restarts() {
        let dir = tempfile::tempdir().unwrap();
        let q = Queue::open(dir.path(), config(1 << 20, 100, WhenFull::Block)).unwrap();
        for i in 0..10u32 {
            q.append(format!("batch-{i}").as_bytes(), i, u64::from(i))
                .unwrap();
        }
        assert_eq!(q.depth().samples, 45);
        let records = drain(&q);
        let payloads: Vec<_> = records
            .iter()
            .map(|r| String::from_utf8(r.payload.clone()).unwrap())
            .collect();
        assert_eq!(payloads[0], "batch-0");
        assert_eq!(payloads[9], "batch-9");
        assert!(records[9].end.segment > records[0].end.segment, "rotated");
        // Deliver the first four, then "crash".
        q.commit(
            &records[..4]
                .iter()
                .map(|r| (r.end, r.samples))
                .collect::<Vec<_>>(),
        )
        .unwrap();
        assert_eq!(q.depth().samples, 45 - 6);
        drop(q);
        let q = Queue::open(dir.path(), config(1 << 20, 100, WhenFull::Block)).unwrap();
        assert_eq!(q.depth().samples, 45 - 6);
        let again = drain(&q);
        assert_eq!(again.len(), 6);
        assert_eq!(again[0].payload, b"batch-4");
        assert_eq!(again[0].shard_key, 4);
        // Appends after a restart continue behind the old records.
        q.append(b"batch-10", 10, 0).unwrap();
        let all = drain(&q);
        assert_eq!(all.last().unwrap().payload, b"batch-10");
    }

    #[test]
    fn a_torn_tail_is_cut_and_appends_continue() {
        let dir = tempfile::tempdir().unwrap();
        let q = Queue::open(dir.path(), QueueConfig::default()).unwrap();
        q.append(b"one", 1, 0).unwrap();
        q.append(b"two", 1, 0).unwrap();
        drop(q);
        let seg = fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().path())
            .find(|p| p.extension().is_some_and(|e| e == "seg"))
            .unwrap();
        let len = fs::metadata(&seg).unwrap().len();
        // Half of the second record made it to disk.
        OpenOptions::new()
            .write(true)
            .open(&seg)
            .unwrap()
            .set_len(len - 5)
            .unwrap();
        let q = Queue::open(dir.path(), QueueConfig::default()).unwrap();
        q.append(b"three", 1, 0).unwrap();
        let got: Vec<_> = drain(&q).into_iter().map(|r| r.payload).collect();
        assert_eq!(got, vec![b"one".to_vec(), b"three".to_vec()]);
    }

    #[test]
    fn a_flipped_bit_is_detected() {
        let dir = tempfile::tempdir().unwrap();
        let q = Queue::open(dir.path(), QueueConfig::default()).unwrap();
        q.append(b"good", 1, 0).unwrap();
        q.append(b"soon-bad", 1, 0).unwrap();
        drop(q);
        let seg = segment_path(dir.path(), 1);
        let mut data = fs::read(&seg).unwrap();
        let last = data.len() - 1;
        data[last] ^= 0x40;
        fs::write(&seg, data).unwrap();
        let q = Queue::open(dir.path(), QueueConfig::default()).unwrap();
        let got: Vec<_> = drain(&q).into_iter().map(|r| r.payload).collect();
        assert_eq!(got, vec![b"good".to_vec()]);
    }

    #[test]
    fn block_policy_refuses_when_full() {
        let dir = tempfile::tempdir().unwrap();
        let q = Queue::open(dir.path(), config(200, 100, WhenFull::Block)).unwrap();
        let payload = [7u8; 40];
        let mut stored = 0;
        while q.append(&payload, 1, 0).is_ok() {
            stored += 1;
            assert!(stored < 100, "never refused");
        }
        assert_eq!(stored, 200 / 60);
        assert!(q.would_block(40));
        let records = drain(&q);
        q.commit(&[(records[0].end, 1)]).unwrap();
        assert!(!q.would_block(40));
        q.append(&payload, 1, 0).unwrap();
    }

    #[test]
    fn block_policy_takes_an_oversized_record_into_an_empty_queue_only() {
        let dir = tempfile::tempdir().unwrap();
        let q = Queue::open(dir.path(), config(200, 100, WhenFull::Block)).unwrap();
        let huge = [9u8; 500];
        assert!(!q.would_block(huge.len()));
        q.append(&huge, 3, 0).unwrap();
        assert!(q.would_block(1));
        assert!(q.append(&[1], 1, 0).is_err());
        let records = drain(&q);
        assert_eq!(records.len(), 1);
        assert_eq!(records[0].payload, huge.to_vec());
        q.commit(&[(records[0].end, 3)]).unwrap();
        assert!(!q.would_block(40));
    }

    #[test]
    fn drop_oldest_counts_exactly_what_it_deletes_and_spares_the_segment_being_read() {
        let dir = tempfile::tempdir().unwrap();
        // 60-byte records, two per segment, at most ten records.
        let q = Queue::open(dir.path(), config(600, 120, WhenFull::DropOldest)).unwrap();
        let payload = [1u8; 40];
        let mut reader = q.reader();
        let mut dropped = 0;
        for i in 0..10u32 {
            dropped += q.append(&payload, i, 0).unwrap().dropped_samples;
        }
        assert_eq!(dropped, 0);
        // The sender is busy with the first record.
        let first = reader.try_next().unwrap().unwrap();
        assert_eq!(first.samples, 0);
        for i in 10..14u32 {
            dropped += q.append(&payload, i, 0).unwrap().dropped_samples;
        }
        // Segments 2 and 3 (records 2..6: samples 2+3+4+5) went; segment 1 is being read.
        assert_eq!(dropped, 2 + 3 + 4 + 5);
        let rest: Vec<u32> = std::iter::from_fn(|| reader.try_next().unwrap())
            .map(|r| r.samples)
            .collect();
        assert_eq!(rest, vec![1, 6, 7, 8, 9, 10, 11, 12, 13]);
        let total: u64 = (0..14).sum();
        let delivered: u64 = rest.iter().map(|&s| u64::from(s)).sum::<u64>();
        assert_eq!(
            delivered + dropped,
            total,
            "every sample is delivered or counted"
        );
    }

    #[test]
    fn a_passed_records_payload_stays_readable_until_committed() {
        let dir = tempfile::tempdir().unwrap();
        // 60-byte records, two per segment, at most ten records.
        let q = Queue::open(dir.path(), config(600, 120, WhenFull::DropOldest)).unwrap();
        for i in 0..6u8 {
            q.append(&[i; 40], 1, 0).unwrap();
        }
        let mut reader = q.reader();
        let headers: Vec<RecordHeader> =
            std::iter::from_fn(|| reader.try_next_header().unwrap()).collect();
        assert_eq!(headers.len(), 6);
        assert_eq!(headers[0].start.segment, 1);
        assert_eq!(headers[5].start.segment, 3);
        // Appends past the limit drop waiting segments, never those behind the reader.
        for i in 6..12u8 {
            q.append(&[i; 40], 1, 0).unwrap();
        }
        for (i, header) in headers.iter().enumerate() {
            assert_eq!(reader.payload(header).unwrap(), vec![i as u8; 40]);
        }
    }

    #[test]
    fn a_reader_keeps_few_segments_open_and_reopens_older_ones() {
        let dir = tempfile::tempdir().unwrap();
        // 60-byte records, two per segment: twelve records make six segments.
        let q = Queue::open(dir.path(), config(1 << 20, 120, WhenFull::Block)).unwrap();
        for i in 0..12u8 {
            q.append(&[i; 40], 1, 0).unwrap();
        }
        let mut reader = q.reader();
        let headers: Vec<RecordHeader> =
            std::iter::from_fn(|| reader.try_next_header().unwrap()).collect();
        assert_eq!(headers.last().map(|h| h.start.segment), Some(6));
        let open: Vec<u64> = reader.files.iter().map(|(id, _)| *id).collect();
        assert_eq!(open, [3, 4, 5, 6], "the oldest handles were closed");
        assert_eq!(reader.payload(&headers[0]).unwrap(), vec![0; 40]);
        assert_eq!(reader.files.len(), OPEN_SEGMENTS);
        assert!(reader.files.iter().any(|(id, _)| *id == 1), "reopened");
    }

    #[test]
    fn finished_segments_are_fsynced_by_the_next_sync_not_by_the_append() {
        let dir = tempfile::tempdir().unwrap();
        let q = Queue::open(dir.path(), config(1 << 20, 120, WhenFull::Block)).unwrap();
        for i in 0..5u8 {
            q.append(&[i; 40], 1, 0).unwrap();
        }
        // Five records, two per segment: two segments were finished by appends.
        assert_eq!(q.lock().finished.len(), 2);
        assert!(q.lock().dirty);
        q.sync();
        assert!(q.lock().finished.is_empty());
        assert!(!q.lock().dirty);
        // Without syncs, appends close what exceeds the cap themselves.
        for i in 0..12u8 {
            q.append(&[i; 40], 1, 0).unwrap();
        }
        assert_eq!(q.lock().finished.len(), MAX_UNSYNCED_SEGMENTS);
    }

    #[tokio::test]
    async fn next_waits_for_an_append() {
        let dir = tempfile::tempdir().unwrap();
        let q = std::sync::Arc::new(Queue::open(dir.path(), QueueConfig::default()).unwrap());
        let writer = q.clone();
        let handle = tokio::spawn(async move {
            tokio::task::yield_now().await;
            writer.append(b"late", 3, 0).unwrap();
        });
        let mut reader = q.reader();
        let record = tokio::time::timeout(Duration::from_secs(10), reader.next())
            .await
            .expect("the append wakes the reader")
            .unwrap();
        assert_eq!(record.payload, b"late");
        handle.await.unwrap();
    }
}

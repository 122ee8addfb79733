//! The replayer: reads records back in order across segments, skips and counts damaged
//! ones, records durable progress and deletes segments that are wholly done.
//!
//! It reads a segment only up to the length the writer has published, so a record being
//! written is never mistaken for a torn one. Damage at the end of a segment that no more
//! appends go to is a torn tail (a crash in the middle of a write); damage followed by a
//! readable record is corruption. Either way the reader looks for the next record start
//! (its magic bytes and a header checksum seeded with the segment's salt) and goes on.

use std::fs::File;
use std::io::{self, Read, Seek, SeekFrom};
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use super::format::{
    self, RECORD_HEADER_LEN, RECORD_MAGIC, RecordHeader, SEGMENT_HEADER_LEN, decode_record_header,
    decode_segment_header, payload_matches,
};
use super::progress::Progress;
use super::{Counters, Position, Record, Shared, SpoolError, SpoolStats, io_error};

/// Bytes read at a time while looking for the next record after a damaged one.
const SCAN_CHUNK: usize = 64 * 1024;

/// The reading half of a spool: one per spool, used by one task.
///
/// ```no_run
/// # async fn replay(mut replayer: ingest::spool::Replayer) -> Result<(), ingest::spool::SpoolError> {
/// loop {
///     let record = replayer.recv().await?;
///     // decode record.batch.body with record.batch.limits, prepare with
///     // record.batch.received_at, apply to Redis (retrying until it succeeds), then:
///     replayer.ack(record.end).await?;
/// }
/// # }
/// ```
pub struct Replayer {
    shared: Arc<Shared>,
    state: Arc<Mutex<ReadState>>,
}

impl std::fmt::Debug for Replayer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Replayer")
            .field("dir", &self.shared.dir)
            .finish_non_exhaustive()
    }
}

struct ReadState {
    /// The durable progress: every record before `progress.position` is done.
    progress: Progress,
    /// Where reading goes on.
    cursor: Position,
    /// The segment the cursor is in, once opened.
    segment: Option<OpenSegment>,
    /// A record read but not yet handed out (kept if the caller's future was dropped).
    peeked: Option<Record>,
    /// The end of the last record handed out since open.
    returned_end: Option<Position>,
}

struct OpenSegment {
    sequence: u64,
    file: File,
    path: PathBuf,
    /// The checksum seed of its records; `None` when its header is unreadable (the whole
    /// segment is then skipped).
    seed: Option<u32>,
}

enum Probe {
    Record {
        header: RecordHeader,
        payload: Vec<u8>,
        end: u64,
    },
    Damaged,
}

impl Replayer {
    pub(super) fn new(shared: Arc<Shared>, progress: Progress) -> Self {
        let cursor = progress.position;
        Self {
            shared,
            state: Arc::new(Mutex::new(ReadState {
                progress,
                cursor,
                segment: None,
                peeked: None,
                returned_end: None,
            })),
        }
    }

    /// The next record, or `None` when every record written so far has been returned.
    /// Cancel-safe: a record read when the call is dropped is returned by the next call.
    ///
    /// # Errors
    /// [`SpoolError::Io`], or [`SpoolError::UnsupportedVersion`] (returned again by every
    /// call: the replayer does not skip a record it cannot read). Back off and retry.
    pub async fn try_recv(&mut self) -> Result<Option<Record>, SpoolError> {
        let shared = self.shared.clone();
        let state = self.state.clone();
        tokio::task::spawn_blocking(move || lock(&state).fill(&shared))
            .await
            .map_err(|e| join_error(&self.shared, e))??;
        let mut state = lock(&self.state);
        let record = state.peeked.take();
        if let Some(r) = &record {
            state.returned_end = Some(r.end);
            Counters::add(&self.shared.counters.replayed, 1);
        }
        let done = state.done();
        self.shared.lock().done = done;
        Ok(record)
    }

    /// The next record, waiting for one to be appended if need be. Cancel-safe; once the
    /// writer is closed and everything is read it waits forever, so select it against
    /// shutdown.
    ///
    /// # Errors
    /// As [`Replayer::try_recv`].
    pub async fn recv(&mut self) -> Result<Record, SpoolError> {
        loop {
            if let Some(record) = self.try_recv().await? {
                return Ok(record);
            }
            // The writer stores a wake-up when nobody waits, so an append made between the
            // look above and this wait is not missed.
            self.shared.appended.notified().await;
        }
    }

    /// Records durably (fdatasync) that every record up to the one ending at `end` is
    /// applied, then deletes the segment files wholly before it. Acknowledge after
    /// applying; one call may cover many records (each call costs a sync). After a
    /// restart, replay resumes at the last acknowledged position.
    ///
    /// # Errors
    /// [`SpoolError::AckAhead`] for a position past the last record returned, or
    /// [`SpoolError::Io`] (the acknowledgement is then not recorded).
    pub async fn ack(&mut self, end: Position) -> Result<(), SpoolError> {
        let shared = self.shared.clone();
        let state = self.state.clone();
        tokio::task::spawn_blocking(move || lock(&state).ack(&shared, end))
            .await
            .map_err(|e| join_error(&self.shared, e))?
    }

    /// Whether every record appended so far is acknowledged or skipped.
    pub fn is_drained(&self) -> bool {
        self.shared.is_drained()
    }

    /// Counters and sizes now.
    pub fn stats(&self) -> SpoolStats {
        self.shared.stats()
    }
}

fn lock(state: &Mutex<ReadState>) -> MutexGuard<'_, ReadState> {
    state.lock().unwrap_or_else(PoisonError::into_inner)
}

fn join_error(shared: &Shared, e: tokio::task::JoinError) -> SpoolError {
    SpoolError::Io {
        path: shared.dir.clone(),
        offset: None,
        action: "replay",
        source: Arc::new(io::Error::other(e)),
    }
}

impl ReadState {
    /// Everything before this is acknowledged or skipped.
    fn done(&self) -> Position {
        let outstanding = self
            .returned_end
            .is_some_and(|r| r > self.progress.position);
        if outstanding {
            return self.progress.position;
        }
        let reached = self.peeked.as_ref().map_or(self.cursor, |p| p.start);
        reached.max(self.progress.position)
    }

    fn ack(&mut self, shared: &Shared, end: Position) -> Result<(), SpoolError> {
        if end <= self.progress.position {
            return Ok(());
        }
        let returned = match self.returned_end {
            Some(r) if end <= r => r,
            other => {
                return Err(SpoolError::AckAhead {
                    acked: end,
                    returned: other.unwrap_or_default(),
                });
            }
        };
        // Acknowledging the last record returned also covers what was skipped after it.
        let target = if end == returned {
            self.peeked
                .as_ref()
                .map_or(self.cursor, |p| p.start)
                .max(end)
        } else {
            end
        };
        self.commit(shared, target)?;
        let done = self.done();
        shared.lock().done = done;
        Ok(())
    }

    /// Stores `target` as the progress and deletes the segments wholly before it.
    fn commit(&mut self, shared: &Shared, target: Position) -> Result<(), SpoolError> {
        if target > self.progress.position {
            self.progress.store(target)?;
        }
        let doomed: Vec<(u64, u64)> = shared
            .lock()
            .segments
            .iter()
            .filter(|(s, i)| {
                i.sealed
                    && (**s < target.segment || (**s == target.segment && target.offset >= i.len))
            })
            .map(|(s, i)| (*s, i.len))
            .collect();
        for (sequence, len) in doomed {
            if self
                .segment
                .as_ref()
                .is_some_and(|s| s.sequence == sequence)
            {
                self.segment = None;
            }
            let path = shared.segment_path(sequence);
            match std::fs::remove_file(&path) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(io_error(&path, None, "delete")(e)),
            }
            let mut state = shared.lock();
            state.segments.remove(&sequence);
            state.used = state.used.saturating_sub(len);
        }
        Ok(())
    }

    /// Moves past segment `sequence`, recording progress when nothing returned is
    /// outstanding (so that empty or damaged segments are deleted too).
    fn next_segment(&mut self, shared: &Shared, sequence: u64) -> Result<(), SpoolError> {
        self.cursor = Position {
            segment: sequence + 1,
            offset: 0,
        };
        self.segment = None;
        let done = self.done();
        if done.segment > self.progress.position.segment {
            self.commit(shared, done)?;
        }
        Ok(())
    }

    /// Reads the next whole record into `peeked`, skipping damage; leaves it `None` when
    /// the cursor is at the published end.
    fn fill(&mut self, shared: &Shared) -> Result<(), SpoolError> {
        if self.peeked.is_some() {
            return Ok(());
        }
        let c = &shared.counters;
        loop {
            let found = shared
                .lock()
                .segments
                .range(self.cursor.segment..)
                .next()
                .map(|(s, i)| (*s, *i));
            let Some((sequence, info)) = found else {
                return Ok(());
            };
            if sequence != self.cursor.segment {
                self.cursor = Position {
                    segment: sequence,
                    offset: 0,
                };
            }
            if self.segment.as_ref().map(|s| s.sequence) != Some(sequence) {
                if info.len < SEGMENT_HEADER_LEN {
                    if !info.sealed {
                        // The writer publishes a segment with its header: not reached.
                        return Ok(());
                    }
                    if info.len > 0 {
                        let path = shared.segment_path(sequence);
                        tracing::warn!(file = %path.display(), bytes = info.len, "torn spool segment header skipped");
                        Counters::add(&c.torn_tails, 1);
                        Counters::add(&c.skipped_bytes, info.len);
                    }
                    self.next_segment(shared, sequence)?;
                    continue;
                }
                match open_segment(shared, sequence)? {
                    Some(segment) => self.segment = Some(segment),
                    None => {
                        // Deleted behind our back: nothing to read in it.
                        let mut state = shared.lock();
                        state.segments.remove(&sequence);
                        state.used = state.used.saturating_sub(info.len);
                        drop(state);
                        self.next_segment(shared, sequence)?;
                        continue;
                    }
                }
            }
            self.cursor.offset = self.cursor.offset.max(SEGMENT_HEADER_LEN);
            let at = self.cursor.offset;
            let Some(segment) = self.segment.as_ref() else {
                return Ok(()); // opened just above
            };
            let Some(seed) = segment.seed else {
                // An unreadable header (counted when opened): skip what the segment holds.
                Counters::add(&c.skipped_bytes, info.len.saturating_sub(at));
                self.cursor.offset = info.len;
                if info.sealed {
                    self.next_segment(shared, sequence)?;
                    continue;
                }
                return Ok(());
            };
            if at >= info.len {
                if info.sealed {
                    self.next_segment(shared, sequence)?;
                    continue;
                }
                return Ok(());
            }
            let position = |offset| Position {
                segment: sequence,
                offset,
            };
            let read = io_error(&segment.path, Some(at), "read");
            match probe(&segment.file, at, info.len, seed).map_err(read)? {
                Probe::Record {
                    header,
                    payload,
                    end,
                } => {
                    if !header.supported() {
                        return Err(SpoolError::UnsupportedVersion {
                            path: segment.path.clone(),
                            offset: at,
                            version: header.version,
                            flags: header.flags,
                        });
                    }
                    self.cursor.offset = end;
                    match format::decode_payload(&payload) {
                        Ok(batch) => {
                            self.peeked = Some(Record {
                                start: position(at),
                                end: position(end),
                                batch,
                            });
                            return Ok(());
                        }
                        Err(problem) => {
                            tracing::warn!(file = %segment.path.display(), offset = at, problem, "undecodable spool record skipped");
                            Counters::add(&c.corrupt, 1);
                            Counters::add(&c.skipped_bytes, end - at);
                        }
                    }
                }
                Probe::Damaged => {
                    let scan = io_error(&segment.path, Some(at), "read");
                    let next = find_next(&segment.file, at + 1, info.len, seed).map_err(scan)?;
                    let path = segment.path.display().to_string();
                    match next {
                        Some(next) => {
                            tracing::warn!(file = %path, offset = at, bytes = next - at, "corrupt spool record skipped");
                            Counters::add(&c.corrupt, 1);
                            Counters::add(&c.skipped_bytes, next - at);
                            self.cursor.offset = next;
                        }
                        None if info.sealed => {
                            tracing::warn!(file = %path, offset = at, bytes = info.len - at, "torn spool record at the end of a segment skipped");
                            Counters::add(&c.torn_tails, 1);
                            Counters::add(&c.skipped_bytes, info.len - at);
                            self.next_segment(shared, sequence)?;
                        }
                        None => {
                            // The segment being written ends with whole records, so this is
                            // damage after the write, not a torn write.
                            tracing::warn!(file = %path, offset = at, bytes = info.len - at, "corrupt spool records skipped");
                            Counters::add(&c.corrupt, 1);
                            Counters::add(&c.skipped_bytes, info.len - at);
                            self.cursor.offset = info.len;
                        }
                    }
                }
            }
        }
    }
}

/// Opens segment `sequence` and reads its header; `None` if the file is gone. A header
/// that does not check is counted as corruption and leaves `seed` empty.
fn open_segment(shared: &Shared, sequence: u64) -> Result<Option<OpenSegment>, SpoolError> {
    let path = shared.segment_path(sequence);
    let file = match File::open(&path) {
        Ok(file) => file,
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            tracing::warn!(file = %path.display(), "spool segment disappeared");
            return Ok(None);
        }
        Err(e) => return Err(io_error(&path, None, "open")(e)),
    };
    let mut header = [0u8; SEGMENT_HEADER_LEN as usize];
    read_at(&file, 0, &mut header).map_err(io_error(&path, Some(0), "read"))?;
    let seed = match decode_segment_header(&header) {
        Ok(h) if h.sequence == sequence => Some(h.seed),
        Ok(h) => {
            tracing::warn!(file = %path.display(), sequence = h.sequence, "spool segment header names another sequence; segment skipped");
            None
        }
        Err(problem) => {
            tracing::warn!(file = %path.display(), problem, "spool segment header unreadable; segment skipped");
            None
        }
    };
    if seed.is_none() {
        Counters::add(&shared.counters.corrupt, 1);
        Counters::add(&shared.counters.skipped_bytes, SEGMENT_HEADER_LEN);
    }
    Ok(Some(OpenSegment {
        sequence,
        file,
        path,
        seed,
    }))
}

fn read_at(mut file: &File, offset: u64, buf: &mut [u8]) -> io::Result<()> {
    file.seek(SeekFrom::Start(offset))?;
    file.read_exact(buf)
}

/// The record at `at` if it is whole and its checksums match, reading no further than
/// `limit`.
fn probe(file: &File, at: u64, limit: u64, seed: u32) -> io::Result<Probe> {
    if at + RECORD_HEADER_LEN > limit {
        return Ok(Probe::Damaged);
    }
    let mut h = [0u8; RECORD_HEADER_LEN as usize];
    if let Some(damaged) = eof_is_damage(read_at(file, at, &mut h))? {
        return Ok(damaged);
    }
    let Some(header) = decode_record_header(&h, seed) else {
        return Ok(Probe::Damaged);
    };
    let end = at + RECORD_HEADER_LEN + u64::from(header.len);
    if end > limit {
        return Ok(Probe::Damaged);
    }
    let mut payload = vec![0u8; header.len as usize];
    if let Some(damaged) = eof_is_damage(read_at(file, at + RECORD_HEADER_LEN, &mut payload))? {
        return Ok(damaged);
    }
    if !payload_matches(&header, &payload) {
        return Ok(Probe::Damaged);
    }
    Ok(Probe::Record {
        header,
        payload,
        end,
    })
}

/// A file shorter than its published length (truncated by someone else) reads as damage.
fn eof_is_damage(read: io::Result<()>) -> io::Result<Option<Probe>> {
    match read {
        Ok(()) => Ok(None),
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => Ok(Some(Probe::Damaged)),
        Err(e) => Err(e),
    }
}

/// The offset of the first whole, checked record in `from..limit`.
fn find_next(file: &File, from: u64, limit: u64, seed: u32) -> io::Result<Option<u64>> {
    let mut buf = vec![0u8; SCAN_CHUNK];
    let mut pos = from;
    while pos + RECORD_HEADER_LEN <= limit {
        let n = SCAN_CHUNK.min((limit - pos) as usize);
        if eof_is_damage(read_at(file, pos, &mut buf[..n]))?.is_some() {
            return Ok(None);
        }
        for i in 0..n - (RECORD_MAGIC.len() - 1) {
            if buf[i..i + RECORD_MAGIC.len()] == RECORD_MAGIC {
                let candidate = pos + i as u64;
                if let Probe::Record { .. } = probe(file, candidate, limit, seed)? {
                    return Ok(Some(candidate));
                }
            }
        }
        // Overlap by three bytes so a magic split across two chunks is seen.
        pos += (n - (RECORD_MAGIC.len() - 1)) as u64;
    }
    Ok(None)
}

//! The spool's single writer: a task that takes appends from a channel, writes those that
//! wait together as one group into the active segment, fsyncs the group once, publishes
//! the new length to the replayer and answers every append.
//!
//! File I/O runs in `spawn_blocking`; the writer's state moves into the blocking closure
//! and back, so no lock is held across an await.

use std::fs::File;
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, oneshot};
use tokio::time::{Instant, Interval, MissedTickBehavior};

use super::format::{SEGMENT_HEADER_LEN, encode_segment_header};
use super::{
    Appended, Counters, FsyncPolicy, MAX_GROUP_BYTES, MAX_GROUP_RECORDS, Position, SegmentInfo,
    Shared, SpoolConfig, SpoolError, io_error, private_file, segment_name, sync_dir,
};

/// A request to the writer.
pub(super) enum Command {
    /// Write an encoded record.
    Append {
        record: Vec<u8>,
        reply: oneshot::Sender<Result<Appended, SpoolError>>,
    },
    /// Fsync what is written.
    Flush {
        reply: oneshot::Sender<Result<(), SpoolError>>,
    },
    /// Fsync, then stop.
    Close {
        reply: oneshot::Sender<Result<(), SpoolError>>,
    },
}

/// The active segment and the writer's view of the spool.
pub(super) struct Writer {
    shared: Arc<Shared>,
    file: File,
    path: PathBuf,
    sequence: u64,
    /// Bytes of the active segment written and published.
    len: u64,
    /// `len` at the last successful fdatasync.
    synced: u64,
    /// A write or a sync of the active segment failed: what it holds past `synced` is in
    /// doubt, so the next append starts a new segment.
    broken: bool,
    salt: u64,
    segment_size: u64,
    max_size: u64,
    policy: FsyncPolicy,
}

/// Records of one group that share one write.
#[derive(Default)]
struct Chunk {
    bytes: Vec<u8>,
    /// (index in the group, start, end).
    members: Vec<(usize, Position, Position)>,
}

type Results = Vec<Option<Result<Appended, SpoolError>>>;

impl Writer {
    pub(super) fn new(
        shared: Arc<Shared>,
        file: File,
        sequence: u64,
        salt: u64,
        config: &SpoolConfig,
    ) -> Self {
        let path = shared.segment_path(sequence);
        Self {
            shared,
            file,
            path,
            sequence,
            len: SEGMENT_HEADER_LEN,
            synced: SEGMENT_HEADER_LEN,
            broken: false,
            salt,
            segment_size: config.segment_size.0,
            max_size: config.max_size.0,
            policy: config.fsync,
        }
    }

    fn dirty(&self) -> bool {
        self.len > self.synced
    }

    fn position(&self, pending: usize) -> Position {
        Position {
            segment: self.sequence,
            offset: self.len + pending as u64,
        }
    }

    /// Writes `records` in order, rolling to new segments as needed; one result each.
    fn append_group(&mut self, records: &[Vec<u8>]) -> Vec<Result<Appended, SpoolError>> {
        let mut results: Results = records.iter().map(|_| None).collect();
        let mut chunk = Chunk::default();
        for (i, record) in records.iter().enumerate() {
            let need = record.len() as u64;
            let end = self.len + chunk.bytes.len() as u64;
            let roll = self.broken || (end + need > self.segment_size && end > SEGMENT_HEADER_LEN);
            let needed = need + if roll { SEGMENT_HEADER_LEN } else { 0 };
            let used = self.shared.lock().used + chunk.bytes.len() as u64;
            if used + needed > self.max_size {
                Counters::add(&self.shared.counters.full, 1);
                results[i] = Some(Err(SpoolError::Full {
                    dir: self.shared.dir.clone(),
                    used,
                    limit: self.max_size,
                    needed,
                }));
                continue;
            }
            if roll {
                self.commit(&mut chunk, &mut results);
                if let Err(e) = self.roll() {
                    results[i] = Some(Err(e));
                    continue;
                }
            }
            let start = self.position(chunk.bytes.len());
            chunk.bytes.extend_from_slice(record);
            let end = self.position(chunk.bytes.len());
            chunk.members.push((i, start, end));
        }
        self.commit(&mut chunk, &mut results);
        // Every index was answered above; `Closed` stands in should that ever change.
        results
            .into_iter()
            .map(|r| r.unwrap_or(Err(SpoolError::Closed)))
            .collect()
    }

    /// Writes `chunk` to the active segment, publishes it, syncs it with `always`, and
    /// answers its members.
    fn commit(&mut self, chunk: &mut Chunk, results: &mut Results) {
        if chunk.bytes.is_empty() {
            return;
        }
        let bytes = std::mem::take(&mut chunk.bytes);
        let members = std::mem::take(&mut chunk.members);
        let offset = self.len;
        if let Err(e) = self.file.write_all(&bytes) {
            // Take back the part that reached the file so the segment ends with a whole
            // record. Should that fail too, the segment still ends for this process at
            // `offset` (the published length), and a replay after a restart skips the rest
            // as a torn tail.
            let _ = self.file.set_len(offset);
            self.broken = true;
            fail(results, &members, &self.path, offset, "write", e);
            return;
        }
        self.len += bytes.len() as u64;
        self.publish(bytes.len() as u64, members.len() as u64);
        let durable = match self.policy {
            FsyncPolicy::Always => match self.sync() {
                Ok(()) => true,
                Err(e) => {
                    // Published all the same: a record that is replayed although its
                    // append failed is applied once (the client's retry is a duplicate).
                    fail(results, &members, &self.path, offset, "sync", e);
                    return;
                }
            },
            FsyncPolicy::Interval => false,
        };
        for (i, start, end) in members {
            results[i] = Some(Ok(Appended {
                start,
                end,
                durable,
            }));
        }
    }

    fn publish(&mut self, bytes: u64, records: u64) {
        {
            let mut state = self.shared.lock();
            state.used += bytes;
            if let Some(s) = state.segments.get_mut(&self.sequence) {
                s.len = self.len;
            }
            state.write_end = self.position(0);
        }
        let c = &self.shared.counters;
        Counters::add(&c.appended, records);
        Counters::add(&c.appended_bytes, bytes);
        Counters::add(&c.groups, 1);
        self.shared.appended.notify_one();
    }

    fn sync(&mut self) -> io::Result<()> {
        self.sync_data().inspect_err(|_| self.broken = true)?;
        self.synced = self.len;
        Counters::add(&self.shared.counters.fsyncs, 1);
        Ok(())
    }

    fn sync_data(&self) -> io::Result<()> {
        #[cfg(test)]
        if self.shared.take_injected_sync_failure() {
            return Err(io::Error::other("injected sync failure"));
        }
        self.file.sync_data()
    }

    /// Seals the active segment and starts the next one.
    fn roll(&mut self) -> Result<(), SpoolError> {
        if self.dirty()
            && let Err(e) = self.sync()
        {
            // Only `interval` appends (answered as not durable) or appends already failed
            // are in doubt.
            tracing::error!(file = %self.path.display(), cause = %e, "spool segment sync failed");
        }
        let next = self.sequence + 1;
        let file = create_segment(&self.shared.dir, next, self.salt)?;
        {
            let mut state = self.shared.lock();
            if let Some(s) = state.segments.get_mut(&self.sequence) {
                s.sealed = true;
            }
            state.segments.insert(
                next,
                SegmentInfo {
                    len: SEGMENT_HEADER_LEN,
                    sealed: false,
                },
            );
            state.used += SEGMENT_HEADER_LEN;
            state.write_end = Position {
                segment: next,
                offset: SEGMENT_HEADER_LEN,
            };
        }
        self.file = file;
        self.path = self.shared.segment_path(next);
        self.sequence = next;
        self.len = SEGMENT_HEADER_LEN;
        self.synced = SEGMENT_HEADER_LEN;
        self.broken = false;
        self.shared.appended.notify_one();
        Ok(())
    }

    /// Fsyncs what is written.
    fn flush(&mut self) -> Result<(), SpoolError> {
        if self.broken {
            // After a failed fsync the kernel may have dropped the dirty pages and a second
            // fsync would report success: say so instead.
            return Err(io_error(&self.path, Some(self.synced), "sync")(
                io::Error::other("an earlier write or sync of this segment failed"),
            ));
        }
        if self.dirty() {
            let offset = self.synced;
            self.sync()
                .map_err(io_error(&self.path, Some(offset), "sync"))?;
        }
        Ok(())
    }

    /// The `interval` policy's fsync.
    fn periodic_sync(&mut self) {
        if self.dirty()
            && !self.broken
            && let Err(e) = self.sync()
        {
            tracing::error!(
                file = %self.path.display(),
                cause = %e,
                "spool segment sync failed; appends since the last sync may be lost on power loss"
            );
        }
    }
}

fn fail(
    results: &mut Results,
    members: &[(usize, Position, Position)],
    path: &Path,
    offset: u64,
    action: &'static str,
    e: io::Error,
) {
    let source = Arc::new(e);
    for (i, ..) in members {
        results[*i] = Some(Err(SpoolError::Io {
            path: path.to_path_buf(),
            offset: Some(offset),
            action,
            source: source.clone(),
        }));
    }
}

/// Creates segment `sequence` with its header, durably (file and directory entry).
pub(super) fn create_segment(dir: &Path, sequence: u64, salt: u64) -> Result<File, SpoolError> {
    let path = dir.join(segment_name(sequence));
    let mut file = private_file()
        .append(true)
        .create_new(true)
        .open(&path)
        .map_err(io_error(&path, None, "create"))?;
    let written = file
        .write_all(&encode_segment_header(sequence, salt))
        .map_err(io_error(&path, Some(0), "write"))
        .and_then(|()| file.sync_all().map_err(io_error(&path, Some(0), "sync")))
        .and_then(|()| sync_dir(dir));
    if let Err(e) = written {
        let _ = std::fs::remove_file(&path);
        return Err(e);
    }
    Ok(file)
}

/// Runs `f` on the writer in a blocking thread; `None` if that thread panicked.
async fn blocking<T: Send + 'static>(
    mut writer: Writer,
    f: impl FnOnce(&mut Writer) -> T + Send + 'static,
) -> Option<(Writer, T)> {
    match tokio::task::spawn_blocking(move || {
        let t = f(&mut writer);
        (writer, t)
    })
    .await
    {
        Ok(done) => Some(done),
        Err(e) => {
            tracing::error!(cause = %e, "spool writer stopped");
            None
        }
    }
}

async fn tick(ticker: &mut Option<Interval>) {
    match ticker {
        Some(t) => {
            t.tick().await;
        }
        None => std::future::pending().await,
    }
}

/// The writer task: runs until [`Command::Close`] or until every [`super::Spool`] is
/// dropped, fsyncing before it stops.
pub(super) async fn run(
    mut writer: Writer,
    mut commands: mpsc::Receiver<Command>,
    interval: Option<Duration>,
) {
    let mut ticker = interval.map(|d| {
        let mut t = tokio::time::interval_at(Instant::now() + d, d);
        t.set_missed_tick_behavior(MissedTickBehavior::Delay);
        t
    });
    // A flush or close found while gathering a group; it runs after the group.
    let mut next: Option<Command> = None;
    loop {
        let command = match next.take() {
            Some(command) => command,
            None => tokio::select! {
                command = commands.recv() => match command {
                    Some(command) => command,
                    None => {
                        if let Some((w, Err(e))) = blocking(writer, Writer::flush).await {
                            tracing::error!(file = %w.path.display(), cause = %e, "spool sync at stop failed");
                        }
                        return;
                    }
                },
                () = tick(&mut ticker), if writer.dirty() => {
                    match blocking(writer, Writer::periodic_sync).await {
                        Some((w, ())) => writer = w,
                        None => return,
                    }
                    continue;
                }
            },
        };
        match command {
            Command::Append { record, reply } => {
                let mut bytes = record.len();
                let mut records = vec![record];
                let mut replies = vec![reply];
                while records.len() < MAX_GROUP_RECORDS && bytes < MAX_GROUP_BYTES {
                    match commands.try_recv() {
                        Ok(Command::Append { record, reply }) => {
                            bytes += record.len();
                            records.push(record);
                            replies.push(reply);
                        }
                        Ok(other) => {
                            next = Some(other);
                            break;
                        }
                        Err(_) => break,
                    }
                }
                let Some((w, results)) = blocking(writer, move |w| w.append_group(&records)).await
                else {
                    for reply in replies {
                        let _ = reply.send(Err(SpoolError::Closed));
                    }
                    return;
                };
                writer = w;
                for (reply, result) in replies.into_iter().zip(results) {
                    // The caller may have gone (cancelled): the record stays written.
                    let _ = reply.send(result);
                }
            }
            Command::Flush { reply } => {
                let Some((w, result)) = blocking(writer, Writer::flush).await else {
                    let _ = reply.send(Err(SpoolError::Closed));
                    return;
                };
                writer = w;
                let _ = reply.send(result);
            }
            Command::Close { reply } => {
                let result = match blocking(writer, Writer::flush).await {
                    Some((_, result)) => result,
                    None => Err(SpoolError::Closed),
                };
                commands.close();
                while let Ok(command) = commands.try_recv() {
                    answer_closed(command);
                }
                let _ = reply.send(result);
                return;
            }
        }
    }
}

fn answer_closed(command: Command) {
    match command {
        Command::Append { reply, .. } => {
            let _ = reply.send(Err(SpoolError::Closed));
        }
        Command::Flush { reply } | Command::Close { reply } => {
            let _ = reply.send(Err(SpoolError::Closed));
        }
    }
}

#[cfg(test)]
impl Shared {
    /// Makes the next segment sync fail (tests only).
    pub(super) fn inject_sync_failure(&self) {
        self.inject_sync_failure
            .store(true, std::sync::atomic::Ordering::SeqCst);
    }

    fn take_injected_sync_failure(&self) -> bool {
        self.inject_sync_failure
            .swap(false, std::sync::atomic::Ordering::SeqCst)
    }
}

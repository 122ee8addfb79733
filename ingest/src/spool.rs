//! The collector's local spool: verified batches written and fsynced to disk when Redis
//! cannot take them, and replayed in order when it can.
//!
//! A spool is a directory of append-only segment files (`00000000000000000001.seg`, ...),
//! a `progress` file and a `LOCK` file. [`Spool::open`] returns the two halves:
//!
//! - [`Spool`] (cheap to clone, one per handler): [`Spool::append`] hands a
//!   [`SpooledBatch`] to a single writer task, which writes the records that arrive
//!   together as one group and, with [`FsyncPolicy::Always`], fsyncs them with one
//!   `fdatasync` before any of their appends return (group commit).
//! - [`Replayer`] (one): [`Replayer::recv`] yields the records in append order across
//!   segments; [`Replayer::ack`] records durably that everything up to a record is
//!   applied and deletes segment files that are wholly done.
//!
//! # Guarantees
//! - With [`FsyncPolicy::Always`], a record whose [`Appended::durable`] is true is on disk
//!   (data and length fdatasync'ed, the segment's directory entry fsynced when it was
//!   created): it survives a process crash and a power loss. Only then may the collector
//!   acknowledge the batch. With [`FsyncPolicy::Interval`], `durable` is false: records
//!   survive a process crash but a power loss can lose the last `fsync_interval`.
//! - The replayer returns only whole records whose checksums match, each once per
//!   process, in the order of the appends that returned them. A damaged or torn record is
//!   skipped and counted ([`SpoolStats::torn_tails`], [`SpoolStats::corrupt`]), never
//!   returned in part.
//! - After a restart, replay resumes at the last acknowledged position: records returned
//!   but not acknowledged are returned again. Applying is idempotent by message id, so the
//!   replay of a record applied before the crash counts nothing twice.
//! - The segment files never take more than `max_size` ([`SpoolError::Full`] instead).
//!
//! # Errors
//! Every error names the file and, where one applies, the offset.
//!
//! The files hold request bodies (profile ids, traits) and write keys: the directory is
//! created with mode 0700 and the files with 0600.

mod format;
mod progress;
mod reader;
#[cfg(test)]
mod tests;
mod writer;

use std::collections::BTreeMap;
use std::fmt;
use std::fs::{File, OpenOptions, TryLockError};
use std::io;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use axum::body::Bytes;
use serde::{Deserialize, Serialize};
use time::OffsetDateTime;
use tokio::sync::{Notify, mpsc, oneshot};

pub use reader::Replayer;

use format::{PAYLOAD_FIXED_LEN, RECORD_HEADER_LEN, SEGMENT_HEADER_LEN};
use progress::Progress;

/// Where the spool lives when `dir` is not set: relative to the working directory.
pub const DEFAULT_DIR: &str = "spool";
/// Default segment size: large enough that rolling (one extra fsync of the directory) is
/// rare, small enough that a replayed segment is deleted soon.
pub const DEFAULT_SEGMENT_SIZE: ByteSize = ByteSize::mib(64);
/// The smallest segment size accepted.
pub const MIN_SEGMENT_SIZE: ByteSize = ByteSize::kib(64);
/// The largest segment size accepted (record lengths are 32-bit).
pub const MAX_SEGMENT_SIZE: ByteSize = ByteSize::gib(1);
/// Default bound on the segment files together.
pub const DEFAULT_MAX_SIZE: ByteSize = ByteSize::gib(1);
/// The largest bound accepted.
pub const MAX_MAX_SIZE: ByteSize = ByteSize::tib(16);
/// Default fsync policy: the only one that lets the collector acknowledge spooled batches.
pub const DEFAULT_FSYNC: FsyncPolicy = FsyncPolicy::Always;
/// Default time between fsyncs with [`FsyncPolicy::Interval`].
pub const DEFAULT_FSYNC_INTERVAL: Duration = Duration::from_millis(100);
/// The shortest fsync interval accepted.
pub const MIN_FSYNC_INTERVAL: Duration = Duration::from_millis(1);
/// The longest fsync interval accepted: what a power loss may cost.
pub const MAX_FSYNC_INTERVAL: Duration = Duration::from_secs(10);
/// The longest write key a record holds (configured keys are short tokens).
pub const MAX_WRITE_KEY_BYTES: usize = 1024;
/// Appends waiting for the writer before [`Spool::append`] waits for room.
pub const QUEUE_CAPACITY: usize = 4096;
/// The most records one group commit writes.
pub const MAX_GROUP_RECORDS: usize = 1024;
/// The most bytes one group commit writes (a group ends after the record that crosses it).
pub const MAX_GROUP_BYTES: usize = 8 * 1024 * 1024;

const LOCK_FILE: &str = "LOCK";
const SEGMENT_SUFFIX: &str = ".seg";

/// The `[spool]` settings.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SpoolConfig {
    /// Whether batches that Redis cannot take now are spooled (else answered with 503).
    /// Default false.
    pub enabled: bool,
    /// The spool directory, created if missing; one collector process per directory.
    /// Default `spool`.
    pub dir: PathBuf,
    /// A segment file is closed and a new one started when the next record would make it
    /// larger. Default 64 MiB, from 64 KiB to 1 GiB.
    pub segment_size: ByteSize,
    /// The most the segment files may take together; appends beyond it fail with
    /// [`SpoolError::Full`]. Default 1 GiB, at least twice `segment_size`.
    pub max_size: ByteSize,
    /// When appends are fsynced. Default `always`.
    pub fsync: FsyncPolicy,
    /// With `fsync = "interval"`, the time between fsyncs. Default 100 ms, from 1 ms to
    /// 10 s.
    #[serde(with = "humantime_serde")]
    pub fsync_interval: Duration,
}

impl Default for SpoolConfig {
    fn default() -> Self {
        Self {
            enabled: false,
            dir: PathBuf::from(DEFAULT_DIR),
            segment_size: DEFAULT_SEGMENT_SIZE,
            max_size: DEFAULT_MAX_SIZE,
            fsync: DEFAULT_FSYNC,
            fsync_interval: DEFAULT_FSYNC_INTERVAL,
        }
    }
}

/// A setting of [`SpoolConfig`] that makes no sense.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {problem}")]
pub struct SpoolConfigError {
    /// The setting, e.g. `segment_size`.
    pub field: &'static str,
    /// What is wrong, with the limit.
    pub problem: String,
}

impl SpoolConfig {
    /// Checks the bounds of every setting.
    ///
    /// # Errors
    /// The first setting out of bounds.
    pub fn validate(&self) -> Result<(), SpoolConfigError> {
        let bad = |field, problem: String| Err(SpoolConfigError { field, problem });
        if self.dir.as_os_str().is_empty() {
            return bad("dir", "is empty".into());
        }
        if self.segment_size < MIN_SEGMENT_SIZE || self.segment_size > MAX_SEGMENT_SIZE {
            return bad(
                "segment_size",
                format!(
                    "{} is not between {MIN_SEGMENT_SIZE} and {MAX_SEGMENT_SIZE}",
                    self.segment_size
                ),
            );
        }
        let twice = ByteSize(self.segment_size.0 * 2);
        if self.max_size < twice || self.max_size > MAX_MAX_SIZE {
            return bad(
                "max_size",
                format!(
                    "{} is not between twice segment_size ({twice}) and {MAX_MAX_SIZE}",
                    self.max_size
                ),
            );
        }
        if !(MIN_FSYNC_INTERVAL..=MAX_FSYNC_INTERVAL).contains(&self.fsync_interval) {
            return bad(
                "fsync_interval",
                format!(
                    "{:?} is not between {MIN_FSYNC_INTERVAL:?} and {MAX_FSYNC_INTERVAL:?}",
                    self.fsync_interval
                ),
            );
        }
        Ok(())
    }

    /// The largest request body a record can hold with these settings (one record must
    /// fit in one segment). The collector's body limit must not exceed it.
    pub fn max_body_bytes(&self) -> u64 {
        self.segment_size.0.saturating_sub(
            SEGMENT_HEADER_LEN + RECORD_HEADER_LEN + PAYLOAD_FIXED_LEN + MAX_WRITE_KEY_BYTES as u64,
        )
    }
}

/// When appended records are fsynced.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FsyncPolicy {
    /// Every append group is fdatasync'ed before its appends return: a returned append is
    /// durable and the batch may be acknowledged.
    Always,
    /// Appends return once written to the page cache; the writer fsyncs every
    /// `fsync_interval`. A process crash loses nothing, a power loss (or kernel crash) can
    /// lose the last interval: not enough to acknowledge a batch.
    Interval,
}

/// A number of bytes. Reads an integer (bytes) or a string with a unit: `B`, `KiB`,
/// `MiB`, `GiB`, `TiB` (powers of 1024) or `kB`, `MB`, `GB`, `TB` (powers of 1000), e.g.
/// `"64MiB"` or `"512 KiB"`. Writes the largest binary unit that is exact.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct ByteSize(pub u64);

impl ByteSize {
    /// `n` bytes.
    pub const fn bytes(n: u64) -> Self {
        Self(n)
    }
    /// `n` KiB.
    pub const fn kib(n: u64) -> Self {
        Self(n << 10)
    }
    /// `n` MiB.
    pub const fn mib(n: u64) -> Self {
        Self(n << 20)
    }
    /// `n` GiB.
    pub const fn gib(n: u64) -> Self {
        Self(n << 30)
    }
    /// `n` TiB.
    pub const fn tib(n: u64) -> Self {
        Self(n << 40)
    }
    /// The number of bytes.
    pub const fn as_u64(self) -> u64 {
        self.0
    }
}

const UNITS: [(&str, u64); 9] = [
    ("B", 1),
    ("KiB", 1 << 10),
    ("MiB", 1 << 20),
    ("GiB", 1 << 30),
    ("TiB", 1 << 40),
    ("kB", 1_000),
    ("MB", 1_000_000),
    ("GB", 1_000_000_000),
    ("TB", 1_000_000_000_000),
];

impl fmt::Display for ByteSize {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (unit, size) = UNITS[..5]
            .iter()
            .rev()
            .find(|(_, size)| self.0 != 0 && self.0.is_multiple_of(*size))
            .copied()
            .unwrap_or(("B", 1));
        write!(f, "{}{unit}", self.0 / size)
    }
}

impl FromStr for ByteSize {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let bad = || format!("{s:?} is not a size like 64MiB, 512 KiB or 1048576");
        let t = s.trim();
        let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
        let (digits, unit) = t.split_at(split);
        let n: u64 = digits.parse().map_err(|_| bad())?;
        let unit = unit.trim();
        let size = if unit.is_empty() {
            1
        } else {
            UNITS
                .iter()
                .find(|(u, _)| *u == unit)
                .map(|(_, size)| *size)
                .ok_or_else(bad)?
        };
        n.checked_mul(size)
            .map(ByteSize)
            .ok_or_else(|| format!("{s:?} is more than {} bytes", u64::MAX))
    }
}

impl Serialize for ByteSize {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for ByteSize {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl serde::de::Visitor<'_> for Visitor {
            type Value = ByteSize;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a number of bytes or a size like \"64MiB\"")
            }
            fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<ByteSize, E> {
                Ok(ByteSize(v))
            }
            fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<ByteSize, E> {
                u64::try_from(v)
                    .map(ByteSize)
                    .map_err(|_| E::custom(format!("{v} is negative")))
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<ByteSize, E> {
                v.parse().map_err(E::custom)
            }
        }
        deserializer.deserialize_any(Visitor)
    }
}

/// A verified request body and what the collector needs to apply it later exactly as it
/// would have been applied at once.
///
/// `collect` decodes the body with the configured limits, checks the write key and the
/// origin, then calls `pipeline::prepare(batch, received_at)`. Replaying needs the body,
/// the limits it was decoded with (the configuration may change before the replay) and
/// the received-at time (the clock-skew correction depends on it). The write key it was
/// authorised under is kept for the record; the origin check passed before the batch was
/// spooled and does not change the updates, so the origin is not kept.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SpooledBatch {
    /// When the collector received it (`Clock::now` in the handler); stored to the
    /// nanosecond, read back in UTC.
    pub received_at: OffsetDateTime,
    /// The write key the batch was authorised under.
    pub write_key: String,
    /// The limits the body was verified with.
    pub limits: wire::Limits,
    /// The request body, as received.
    pub body: Bytes,
}

/// A place in the spool: a segment's sequence number and a byte offset in its file.
/// Positions order as the records they point to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Position {
    /// The segment's sequence number (its file name).
    pub segment: u64,
    /// Bytes from the start of the segment file.
    pub offset: u64,
}

impl fmt::Display for Position {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} offset {}", segment_name(self.segment), self.offset)
    }
}

/// What [`Spool::append`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Appended {
    /// Where the record starts.
    pub start: Position,
    /// Where the next record starts.
    pub end: Position,
    /// Whether the record is on disk ([`FsyncPolicy::Always`]); only then may the batch be
    /// acknowledged.
    pub durable: bool,
}

/// A record the replayer read back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    /// Where the record starts.
    pub start: Position,
    /// Where the next record starts: pass it to [`Replayer::ack`] once the batch is applied.
    pub end: Position,
    /// The batch, as appended.
    pub batch: SpooledBatch,
}

/// Counters since the spool was opened, and its size now.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct SpoolStats {
    /// Records appended.
    pub appended: u64,
    /// Bytes of those records.
    pub appended_bytes: u64,
    /// Append groups written (each is one write, and one fdatasync with `always`).
    pub groups: u64,
    /// fdatasync calls on segment files.
    pub fsyncs: u64,
    /// Appends refused with [`SpoolError::Full`].
    pub full: u64,
    /// Records returned by the replayer.
    pub replayed: u64,
    /// Damaged bytes at the end of a segment (a crash in the middle of a write) skipped.
    pub torn_tails: u64,
    /// Damaged records (or runs of damaged bytes) followed by a readable record skipped,
    /// and segments whose header is unreadable.
    pub corrupt: u64,
    /// Bytes skipped for either reason.
    pub skipped_bytes: u64,
    /// Bytes of the segment files now.
    pub used_bytes: u64,
    /// Segment files now, the one being written included.
    pub segments: u64,
}

/// Why a spool operation failed.
#[derive(Debug, thiserror::Error)]
pub enum SpoolError {
    /// The segment files would exceed `max_size`: answer 503 with `Retry-After` and let
    /// the replayer make room.
    #[error("spool {} is full: {used} of {limit} bytes used, the record needs {needed}", .dir.display())]
    Full {
        /// The spool directory.
        dir: PathBuf,
        /// Bytes of the segment files.
        used: u64,
        /// `max_size`.
        limit: u64,
        /// Bytes the record (and a new segment header) would add.
        needed: u64,
    },
    /// A record larger than a segment can hold.
    #[error("record is {bytes} bytes, a segment of this spool holds at most {limit}")]
    TooLarge {
        /// The record's bytes.
        bytes: u64,
        /// The most a segment holds.
        limit: u64,
    },
    /// A write key longer than [`MAX_WRITE_KEY_BYTES`].
    #[error("write key is {bytes} bytes, limit {MAX_WRITE_KEY_BYTES}")]
    WriteKeyTooLong {
        /// The key's bytes.
        bytes: usize,
    },
    /// A file operation failed.
    #[error("{}{}: {action} failed: {source}", .path.display(), at(.offset))]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// Where in the file, when it applies.
        offset: Option<u64>,
        /// What was done: `open`, `write`, `sync`, ...
        action: &'static str,
        /// The cause (shared: one failed group write fails every append of the group).
        #[source]
        source: Arc<io::Error>,
    },
    /// Another process (or another open spool) holds the directory.
    #[error("spool directory {} is in use by another process (it holds {LOCK_FILE})", .dir.display())]
    Locked {
        /// The spool directory.
        dir: PathBuf,
    },
    /// A record written by a newer build. The replayer stops before it (returning this
    /// error again on every call) rather than skip it: run a build that reads it.
    #[error("{} offset {offset}: record version {version} (flags {flags:#x}) is not supported, this build reads version 1", .path.display())]
    UnsupportedVersion {
        /// The segment file.
        path: PathBuf,
        /// The record's offset.
        offset: u64,
        /// Its version.
        version: u16,
        /// Its flags.
        flags: u16,
    },
    /// [`Replayer::ack`] with a position past the last record returned.
    #[error("acknowledged {acked}, but the last record returned ends at {returned}")]
    AckAhead {
        /// The position given.
        acked: Position,
        /// The end of the last record returned (0 offset 0 when none was).
        returned: Position,
    },
    /// The writer has stopped ([`Spool::close`], or a failure reported before).
    #[error("the spool writer has stopped")]
    Closed,
    /// The configuration is out of bounds.
    #[error("spool configuration: {0}")]
    Config(#[from] SpoolConfigError),
}

fn at(offset: &Option<u64>) -> String {
    offset.map_or_else(String::new, |o| format!(" at offset {o}"))
}

/// A closure mapping an [`io::Error`] to [`SpoolError::Io`].
fn io_error(
    path: &Path,
    offset: Option<u64>,
    action: &'static str,
) -> impl FnOnce(io::Error) -> SpoolError {
    let path = path.to_path_buf();
    move |e| SpoolError::Io {
        path,
        offset,
        action,
        source: Arc::new(e),
    }
}

/// The appending half of a spool; clone it freely.
#[derive(Clone)]
pub struct Spool {
    shared: Arc<Shared>,
    commands: mpsc::Sender<writer::Command>,
    seed: u32,
    max_record: u64,
}

impl fmt::Debug for Spool {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Spool")
            .field("dir", &self.shared.dir)
            .finish_non_exhaustive()
    }
}

impl Spool {
    /// Opens the spool in `config.dir` (creating it), takes its lock, and starts the
    /// writer task (so it must run inside a Tokio runtime). A directory left by a crashed
    /// process is fine: its segments are replayed first, torn tails skipped, and appends
    /// go to a new segment.
    ///
    /// # Errors
    /// The configuration is out of bounds, the directory is locked by another process,
    /// or a file operation fails.
    pub async fn open(config: &SpoolConfig) -> Result<(Spool, Replayer), SpoolError> {
        config.validate()?;
        let config = config.clone();
        let opened = tokio::task::spawn_blocking(move || open_dir(&config))
            .await
            .map_err(|e| SpoolError::Io {
                path: PathBuf::new(),
                offset: None,
                action: "open",
                source: Arc::new(io::Error::other(e)),
            })??;
        let Opened {
            shared,
            writer,
            progress,
            seed,
            config,
        } = opened;
        let (commands, receiver) = mpsc::channel(QUEUE_CAPACITY);
        let interval = (config.fsync == FsyncPolicy::Interval).then_some(config.fsync_interval);
        tokio::spawn(writer::run(writer, receiver, interval));
        let spool = Spool {
            shared: shared.clone(),
            commands,
            seed,
            max_record: config.segment_size.0 - SEGMENT_HEADER_LEN,
        };
        Ok((spool, Replayer::new(shared, progress)))
    }

    /// Writes `batch` as one record (and, with [`FsyncPolicy::Always`], fsyncs it) before
    /// returning. Appends that wait together are written and synced together. Cancelling
    /// the call may still leave the record written (it is then replayed: harmless).
    ///
    /// # Errors
    /// [`SpoolError::Full`], [`SpoolError::TooLarge`], [`SpoolError::WriteKeyTooLong`],
    /// [`SpoolError::Closed`], or [`SpoolError::Io`] when the write or the sync fails (the
    /// record is then not durable; it may still be replayed).
    pub async fn append(&self, batch: &SpooledBatch) -> Result<Appended, SpoolError> {
        if batch.write_key.len() > MAX_WRITE_KEY_BYTES {
            return Err(SpoolError::WriteKeyTooLong {
                bytes: batch.write_key.len(),
            });
        }
        let bytes = format::record_len(batch);
        if bytes > self.max_record {
            return Err(SpoolError::TooLarge {
                bytes,
                limit: self.max_record,
            });
        }
        let record = format::encode_record(batch, self.seed);
        let (reply, answer) = oneshot::channel();
        self.commands
            .send(writer::Command::Append { record, reply })
            .await
            .map_err(|_| SpoolError::Closed)?;
        answer.await.map_err(|_| SpoolError::Closed)?
    }

    /// Fsyncs what was appended so far (for shutdown, or with [`FsyncPolicy::Interval`]).
    ///
    /// # Errors
    /// [`SpoolError::Closed`], or [`SpoolError::Io`] when the sync fails.
    pub async fn flush(&self) -> Result<(), SpoolError> {
        let (reply, answer) = oneshot::channel();
        self.commands
            .send(writer::Command::Flush { reply })
            .await
            .map_err(|_| SpoolError::Closed)?;
        answer.await.map_err(|_| SpoolError::Closed)?
    }

    /// Fsyncs and stops the writer once the appends queued before are written; later
    /// appends fail with [`SpoolError::Closed`]. The directory stays locked until every
    /// [`Spool`] clone and the [`Replayer`] are dropped.
    ///
    /// # Errors
    /// [`SpoolError::Closed`] when it was already closed, or the final sync fails.
    pub async fn close(&self) -> Result<(), SpoolError> {
        let (reply, answer) = oneshot::channel();
        self.commands
            .send(writer::Command::Close { reply })
            .await
            .map_err(|_| SpoolError::Closed)?;
        answer.await.map_err(|_| SpoolError::Closed)?
    }

    /// Whether every record appended so far has been acknowledged by the replayer (or
    /// skipped as damaged). While it is false, new batches should go to the spool too so
    /// that a profile's batches are applied in order.
    pub fn is_drained(&self) -> bool {
        self.shared.is_drained()
    }

    /// Counters and sizes now.
    pub fn stats(&self) -> SpoolStats {
        self.shared.stats()
    }

    /// The spool directory.
    pub fn dir(&self) -> &Path {
        &self.shared.dir
    }
}

/// What the writer and the replayer share.
struct Shared {
    dir: PathBuf,
    state: Mutex<State>,
    /// Woken after every published write, for the replayer.
    appended: Notify,
    counters: Counters,
    /// Holds the directory's lock while any handle lives.
    _lock: File,
    /// Makes the next segment sync fail.
    #[cfg(test)]
    inject_sync_failure: std::sync::atomic::AtomicBool,
}

/// Published sizes, changed by the writer (appends, new segments) and the replayer
/// (deleted segments).
#[derive(Debug, Default)]
struct State {
    /// Every segment file, by sequence number.
    segments: BTreeMap<u64, SegmentInfo>,
    /// Bytes of all of them.
    used: u64,
    /// Where the next append goes.
    write_end: Position,
    /// Everything before this is acknowledged or skipped.
    done: Position,
}

#[derive(Debug, Clone, Copy)]
struct SegmentInfo {
    /// Bytes written and visible to the replayer (the file size for sealed segments found
    /// at open).
    len: u64,
    /// No more appends go to it.
    sealed: bool,
}

#[derive(Debug, Default)]
struct Counters {
    appended: AtomicU64,
    appended_bytes: AtomicU64,
    groups: AtomicU64,
    fsyncs: AtomicU64,
    full: AtomicU64,
    replayed: AtomicU64,
    torn_tails: AtomicU64,
    corrupt: AtomicU64,
    skipped_bytes: AtomicU64,
}

impl Counters {
    fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        // Nothing panics while holding it; should something, the sizes are still usable.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn is_drained(&self) -> bool {
        let state = self.lock();
        state.done >= state.write_end
    }

    fn stats(&self) -> SpoolStats {
        let c = &self.counters;
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let (used_bytes, segments) = {
            let state = self.lock();
            (state.used, state.segments.len() as u64)
        };
        SpoolStats {
            appended: get(&c.appended),
            appended_bytes: get(&c.appended_bytes),
            groups: get(&c.groups),
            fsyncs: get(&c.fsyncs),
            full: get(&c.full),
            replayed: get(&c.replayed),
            torn_tails: get(&c.torn_tails),
            corrupt: get(&c.corrupt),
            skipped_bytes: get(&c.skipped_bytes),
            used_bytes,
            segments,
        }
    }

    fn segment_path(&self, sequence: u64) -> PathBuf {
        self.dir.join(segment_name(sequence))
    }
}

/// `00000000000000000042.seg`: zero-padded so that names sort as numbers.
fn segment_name(sequence: u64) -> String {
    format!("{sequence:020}{SEGMENT_SUFFIX}")
}

fn parse_segment_name(name: &str) -> Option<u64> {
    let digits = name.strip_suffix(SEGMENT_SUFFIX)?;
    if digits.len() != 20 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

struct Opened {
    shared: Arc<Shared>,
    writer: writer::Writer,
    progress: Progress,
    seed: u32,
    config: SpoolConfig,
}

fn open_dir(config: &SpoolConfig) -> Result<Opened, SpoolError> {
    let dir = config.dir.clone();
    let mut builder = std::fs::DirBuilder::new();
    builder.recursive(true);
    #[cfg(unix)]
    std::os::unix::fs::DirBuilderExt::mode(&mut builder, 0o700);
    builder
        .create(&dir)
        .map_err(io_error(&dir, None, "create directory"))?;
    let lock_path = dir.join(LOCK_FILE);
    let lock = private_file()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&lock_path)
        .map_err(io_error(&lock_path, None, "open"))?;
    match lock.try_lock() {
        Ok(()) => {}
        Err(TryLockError::WouldBlock) => return Err(SpoolError::Locked { dir }),
        Err(TryLockError::Error(e)) => return Err(io_error(&lock_path, None, "lock")(e)),
    }
    let progress = Progress::open(&dir)?;
    let mut segments = BTreeMap::new();
    let entries = std::fs::read_dir(&dir).map_err(io_error(&dir, None, "list"))?;
    for entry in entries {
        let entry = entry.map_err(io_error(&dir, None, "list"))?;
        let Some(sequence) = entry.file_name().to_str().and_then(parse_segment_name) else {
            continue;
        };
        let path = entry.path();
        if sequence < progress.position.segment {
            // Done before a crash that came between recording the progress and deleting.
            std::fs::remove_file(&path).map_err(io_error(&path, None, "delete"))?;
            continue;
        }
        let len = entry
            .metadata()
            .map_err(io_error(&path, None, "stat"))?
            .len();
        segments.insert(sequence, SegmentInfo { len, sealed: true });
    }
    let last = segments.keys().next_back().copied().unwrap_or(0);
    let sequence = last.max(progress.position.segment) + 1;
    let salt = new_salt();
    let seed = format::salt_seed(salt);
    let file = writer::create_segment(&dir, sequence, salt)?;
    let had_data = !segments.is_empty();
    segments.insert(
        sequence,
        SegmentInfo {
            len: SEGMENT_HEADER_LEN,
            sealed: false,
        },
    );
    let used = segments.values().map(|s| s.len).sum();
    let write_end = Position {
        segment: sequence,
        offset: SEGMENT_HEADER_LEN,
    };
    let state = State {
        segments,
        used,
        write_end,
        done: if had_data {
            progress.position
        } else {
            write_end
        },
    };
    let shared = Arc::new(Shared {
        dir: dir.clone(),
        state: Mutex::new(state),
        appended: Notify::new(),
        counters: Counters::default(),
        _lock: lock,
        #[cfg(test)]
        inject_sync_failure: Default::default(),
    });
    let writer = writer::Writer::new(shared.clone(), file, sequence, salt, config);
    Ok(Opened {
        shared,
        writer,
        progress,
        seed,
        config: config.clone(),
    })
}

/// Open options for a file only this user may read.
fn private_file() -> OpenOptions {
    #[allow(unused_mut)]
    let mut options = OpenOptions::new();
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    options
}

/// A salt for this process's segments: it only needs to be unguessable by clients.
fn new_salt() -> u64 {
    uuid::Uuid::new_v4().as_u64_pair().0
}

/// Makes a new or deleted directory entry durable.
fn sync_dir(dir: &Path) -> Result<(), SpoolError> {
    // Windows cannot open a directory as a file; there the entry is durable with the file.
    #[cfg(unix)]
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io_error(dir, None, "sync directory"))?;
    #[cfg(not(unix))]
    let _ = dir;
    Ok(())
}

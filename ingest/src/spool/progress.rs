//! The replayer's durable progress: the position before which every record is done.
//!
//! The file `progress` holds two 40-byte slots written in turn, each with a generation
//! number and a checksum, so a crash while writing one slot leaves the other intact:
//!
//! ```text
//! 0  magic "PZPG"   4  version u16 = 1   6  reserved u16
//! 8  generation u64   16 segment u64   24 offset u64   32 reserved u32
//! 36 crc32c of bytes 0..36
//! ```
//!
//! Reading takes the valid slot with the higher generation; with no valid slot the replay
//! starts from the oldest segment, which re-applies records that were done: harmless, as
//! applying is idempotent by message id.

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use super::{Position, SpoolError, io_error};

/// The progress file's name in the spool directory.
pub(super) const PROGRESS_FILE: &str = "progress";

const MAGIC: [u8; 4] = *b"PZPG";
const VERSION: u16 = 1;
const SLOT_LEN: usize = 40;

/// The open progress file.
#[derive(Debug)]
pub(super) struct Progress {
    file: File,
    path: PathBuf,
    generation: u64,
    /// Where replay resumes: every record before it is done.
    pub(super) position: Position,
}

impl Progress {
    /// Opens (or creates) the progress file of `dir`.
    ///
    /// # Errors
    /// The file cannot be opened or read.
    pub(super) fn open(dir: &Path) -> Result<Progress, SpoolError> {
        let path = dir.join(PROGRESS_FILE);
        let existed = path.exists();
        let mut options = OpenOptions::new();
        options.read(true).write(true).create(true).truncate(false);
        #[cfg(unix)]
        std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
        let mut file = options.open(&path).map_err(io_error(&path, None, "open"))?;
        let mut bytes = Vec::with_capacity(2 * SLOT_LEN);
        (&mut file)
            .take(2 * SLOT_LEN as u64)
            .read_to_end(&mut bytes)
            .map_err(io_error(&path, Some(0), "read"))?;
        let best = bytes
            .chunks(SLOT_LEN)
            .filter_map(decode_slot)
            .max_by_key(|(generation, _)| *generation);
        if existed && best.is_none() && !bytes.is_empty() {
            tracing::warn!(
                file = %path.display(),
                "spool progress unreadable, replaying from the oldest segment"
            );
        }
        let (generation, position) = best.unwrap_or_default();
        Ok(Progress {
            file,
            path,
            generation,
            position,
        })
    }

    /// Records `position` durably (written and fdatasync'ed) before returning.
    ///
    /// # Errors
    /// The write or the sync fails; the position in memory is then unchanged.
    pub(super) fn store(&mut self, position: Position) -> Result<(), SpoolError> {
        let generation = self.generation + 1;
        let offset = (generation % 2) * SLOT_LEN as u64;
        let slot = encode_slot(generation, position);
        self.file
            .seek(SeekFrom::Start(offset))
            .and_then(|_| self.file.write_all(&slot))
            .map_err(io_error(&self.path, Some(offset), "write"))?;
        self.file
            .sync_data()
            .map_err(io_error(&self.path, Some(offset), "sync"))?;
        self.generation = generation;
        self.position = position;
        Ok(())
    }
}

fn encode_slot(generation: u64, position: Position) -> [u8; SLOT_LEN] {
    let mut s = [0u8; SLOT_LEN];
    s[0..4].copy_from_slice(&MAGIC);
    s[4..6].copy_from_slice(&VERSION.to_le_bytes());
    s[8..16].copy_from_slice(&generation.to_le_bytes());
    s[16..24].copy_from_slice(&position.segment.to_le_bytes());
    s[24..32].copy_from_slice(&position.offset.to_le_bytes());
    let crc = crc32c::crc32c(&s[0..36]);
    s[36..40].copy_from_slice(&crc.to_le_bytes());
    s
}

fn decode_slot(s: &[u8]) -> Option<(u64, Position)> {
    if s.len() < SLOT_LEN || s[0..4] != MAGIC || s[4..6] != VERSION.to_le_bytes() {
        return None;
    }
    let word = |at: usize| {
        let mut b = [0u8; 8];
        b.copy_from_slice(&s[at..at + 8]);
        u64::from_le_bytes(b)
    };
    let mut crc = [0u8; 4];
    crc.copy_from_slice(&s[36..40]);
    if crc32c::crc32c(&s[0..36]) != u32::from_le_bytes(crc) {
        return None;
    }
    Some((
        word(8),
        Position {
            segment: word(16),
            offset: word(24),
        },
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(segment: u64, offset: u64) -> Position {
        Position { segment, offset }
    }

    #[test]
    fn progress_survives_reopening() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut p = Progress::open(dir.path()).expect("open");
        assert_eq!(p.position, at(0, 0));
        p.store(at(3, 100)).expect("store");
        p.store(at(4, 32)).expect("store");
        p.store(at(4, 900)).expect("store");
        drop(p);
        let p = Progress::open(dir.path()).expect("reopen");
        assert_eq!(p.position, at(4, 900));
        assert_eq!(p.generation, 3);
    }

    #[test]
    fn a_torn_slot_falls_back_to_the_other_one() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut p = Progress::open(dir.path()).expect("open");
        p.store(at(1, 50)).expect("store"); // generation 1, slot 1
        p.store(at(2, 60)).expect("store"); // generation 2, slot 0
        drop(p);
        let path = dir.path().join(PROGRESS_FILE);
        let mut bytes = std::fs::read(&path).expect("read");
        bytes[20] ^= 0xFF; // damage slot 0 (generation 2)
        std::fs::write(&path, &bytes).expect("write");
        let p = Progress::open(dir.path()).expect("reopen");
        assert_eq!(p.position, at(1, 50));
    }

    #[test]
    fn unreadable_progress_starts_from_the_beginning() {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(dir.path().join(PROGRESS_FILE), [7u8; 80]).expect("write");
        let p = Progress::open(dir.path()).expect("open");
        assert_eq!(p.position, at(0, 0));
    }
}

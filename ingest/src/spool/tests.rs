//! The spool against real files: round trips, restarts, torn and corrupt records, the size
//! bound, concurrent appends, fsync policies, and a property test of truncation.

use std::collections::{BTreeMap, HashSet};
use std::path::Path;
use std::time::{Duration, Instant};

use axum::body::Bytes;
use proptest::prelude::*;
use time::macros::datetime;

use super::format::{self, RECORD_HEADER_LEN, SEGMENT_HEADER_LEN};
use super::*;

/// Every key of [`batch`] is this long, so a record is `97 + body` bytes.
const RECORD_OVERHEAD: u64 = RECORD_HEADER_LEN + format::PAYLOAD_FIXED_LEN + 5;

fn config(
    dir: &Path,
    segment_size: ByteSize,
    max_size: ByteSize,
    fsync: FsyncPolicy,
) -> SpoolConfig {
    SpoolConfig {
        enabled: true,
        dir: dir.to_path_buf(),
        segment_size,
        max_size,
        fsync,
        fsync_interval: Duration::from_secs(10),
    }
}

/// 64 KiB segments, 16 MiB in all, fsync on every append.
fn small(dir: &Path) -> SpoolConfig {
    config(
        dir,
        ByteSize::kib(64),
        ByteSize::mib(16),
        FsyncPolicy::Always,
    )
}

/// Batch `i`: its body starts with `i:` and is `len` bytes long (at least the prefix) of
/// ASCII, so no body byte can begin a record header (0xC7).
fn batch(i: u64, len: usize) -> SpooledBatch {
    let mut body = format!("{i}:").into_bytes();
    let filler = b"abcdefghijklmnopqrstuvwxyz0123456789";
    while body.len() < len {
        body.push(filler[(i as usize + body.len()) % filler.len()]);
    }
    SpooledBatch {
        received_at: datetime!(2026-05-01 10:00 UTC)
            + time::Duration::milliseconds(i as i64)
            + time::Duration::nanoseconds(i as i64 % 997),
        write_key: format!("key-{}", i % 3),
        limits: wire::Limits {
            max_events: 500 + i as usize,
            ..wire::Limits::default()
        },
        body: Bytes::from(body),
    }
}

fn tempdir() -> tempfile::TempDir {
    tempfile::tempdir().expect("temp dir")
}

async fn open(config: &SpoolConfig) -> (Spool, Replayer) {
    Spool::open(config).await.expect("open spool")
}

async fn append_all(spool: &Spool, batches: &[SpooledBatch]) -> Vec<Appended> {
    let mut receipts = Vec::new();
    for b in batches {
        receipts.push(spool.append(b).await.expect("append"));
    }
    receipts
}

/// Every record the replayer has now.
async fn read_all(replayer: &mut Replayer) -> Vec<Record> {
    let mut out = Vec::new();
    while let Some(record) = replayer.try_recv().await.expect("read") {
        out.push(record);
    }
    out
}

/// Closes the spool and drops both halves, releasing the directory.
async fn shut(spool: Spool, replayer: Replayer) {
    spool.close().await.expect("close");
    drop(spool);
    drop(replayer);
}

fn segment_files(dir: &Path) -> Vec<u64> {
    let mut seqs: Vec<u64> = std::fs::read_dir(dir)
        .expect("list")
        .filter_map(|e| parse_segment_name(e.expect("entry").file_name().to_str()?))
        .collect();
    seqs.sort_unstable();
    seqs
}

fn segment_path(dir: &Path, sequence: u64) -> std::path::PathBuf {
    dir.join(segment_name(sequence))
}

fn at(segment: u64, offset: u64) -> Position {
    Position { segment, offset }
}

#[tokio::test]
async fn many_records_round_trip_across_segments() {
    let dir = tempdir();
    let (spool, mut replayer) = open(&small(dir.path())).await;
    let batches: Vec<SpooledBatch> = (0..300)
        .map(|i| batch(i, 1000 + (i as usize * 37) % 500))
        .collect();
    let receipts = append_all(&spool, &batches).await;

    // Where each record must be: a segment is rolled when the next record would pass 64 KiB.
    let (mut segment, mut len, mut used) = (1u64, SEGMENT_HEADER_LEN, SEGMENT_HEADER_LEN);
    for (b, receipt) in batches.iter().zip(&receipts) {
        let bytes = RECORD_OVERHEAD + b.body.len() as u64;
        if len + bytes > 65_536 {
            segment += 1;
            len = SEGMENT_HEADER_LEN;
            used += SEGMENT_HEADER_LEN;
        }
        assert_eq!(receipt.start, at(segment, len));
        assert_eq!(receipt.end, at(segment, len + bytes));
        assert!(receipt.durable);
        len += bytes;
        used += bytes;
    }
    assert_eq!(segment, 7, "the records fill seven segments");
    assert_eq!(segment_files(dir.path()), (1..=7).collect::<Vec<_>>());

    let records = read_all(&mut replayer).await;
    assert_eq!(records.len(), 300);
    for (i, r) in records.iter().enumerate() {
        assert_eq!(r.batch, batches[i], "record {i}");
        assert_eq!((r.start, r.end), (receipts[i].start, receipts[i].end));
    }
    let stats = spool.stats();
    assert_eq!(
        (
            stats.appended,
            stats.replayed,
            stats.torn_tails,
            stats.corrupt
        ),
        (300, 300, 0, 0)
    );
    assert_eq!((stats.used_bytes, stats.segments), (used, 7));
    assert!(!spool.is_drained(), "nothing acknowledged yet");
    replayer.ack(records[299].end).await.expect("ack");
    assert!(spool.is_drained());
    assert_eq!(
        segment_files(dir.path()),
        vec![7],
        "replayed segments are deleted"
    );
    shut(spool, replayer).await;
}

#[tokio::test]
async fn restart_resumes_after_the_last_acknowledged_record() {
    let dir = tempdir();
    let (spool, mut replayer) = open(&small(dir.path())).await;
    // 3,097-byte records: 21 fit a 64 KiB segment, so records 0-20, 21-41 and 42-49.
    let batches: Vec<SpooledBatch> = (0..50).map(|i| batch(i, 3000)).collect();
    append_all(&spool, &batches).await;
    assert_eq!(segment_files(dir.path()), vec![1, 2, 3]);

    let mut records = Vec::new();
    for _ in 0..30 {
        records.push(replayer.recv().await.expect("recv"));
    }
    replayer.ack(records[9].end).await.expect("ack 9");
    assert_eq!(segment_files(dir.path()), vec![1, 2, 3]);
    replayer.ack(records[20].end).await.expect("ack 20");
    assert_eq!(
        segment_files(dir.path()),
        vec![2, 3],
        "segment 1 is deleted once its last record is acknowledged"
    );
    replayer.ack(records[24].end).await.expect("ack 24");
    // Acknowledging an earlier record again changes nothing.
    replayer.ack(records[3].end).await.expect("ack 3");
    // Records 25-29 were returned but not acknowledged when the process stops.
    shut(spool, replayer).await;

    let (spool, mut replayer) = open(&small(dir.path())).await;
    assert_eq!(segment_files(dir.path()), vec![2, 3, 4]);
    let again = read_all(&mut replayer).await;
    let got: Vec<&SpooledBatch> = again.iter().map(|r| &r.batch).collect();
    let want: Vec<&SpooledBatch> = batches[25..].iter().collect();
    assert_eq!(got, want);
    assert_eq!(again[0].start, records[24].end);
    shut(spool, replayer).await;
}

/// Five 197-byte records in one segment, as a crashed process would have left them.
async fn five_record_segment() -> (Vec<SpooledBatch>, Vec<u8>) {
    let dir = tempdir();
    let (spool, replayer) = open(&small(dir.path())).await;
    let batches: Vec<SpooledBatch> = (0..5).map(|i| batch(i, 100)).collect();
    append_all(&spool, &batches).await;
    shut(spool, replayer).await;
    let bytes = std::fs::read(segment_path(dir.path(), 1)).expect("read segment");
    assert_eq!(bytes.len(), 32 + 5 * 197);
    (batches, bytes)
}

#[tokio::test]
async fn a_torn_tail_is_skipped_at_every_cut() {
    let (batches, bytes) = five_record_segment().await;
    let ends: Vec<usize> = (0..=5).map(|k| 32 + 197 * k).collect();
    let last = ends[4];
    // Every cut inside the last record, and inside the segment header.
    for cut in (1..32).chain(last..bytes.len()) {
        let dir = tempdir();
        std::fs::write(segment_path(dir.path(), 1), &bytes[..cut]).expect("write");
        let (spool, mut replayer) = open(&small(dir.path())).await;
        let records = read_all(&mut replayer).await;
        let whole = ends.iter().filter(|&&e| e <= cut).count().saturating_sub(1);
        let got: Vec<&SpooledBatch> = records.iter().map(|r| &r.batch).collect();
        let want: Vec<&SpooledBatch> = batches[..whole].iter().collect();
        assert_eq!(got, want, "cut at {cut}");
        let stats = replayer.stats();
        let torn = u64::from(!ends.contains(&cut));
        let intact = if cut < 32 { 0 } else { ends[whole] };
        assert_eq!(
            (stats.torn_tails, stats.corrupt, stats.skipped_bytes),
            (torn, 0, (cut - intact) as u64),
            "cut at {cut}"
        );
        // The reopened spool takes appends and replays them after the old records.
        let receipt = spool.append(&batches[0]).await.expect("append");
        assert_eq!(receipt.start, at(2, 32));
        let next = replayer.try_recv().await.expect("read").expect("a record");
        assert_eq!(next.batch, batches[0]);
        replayer.ack(next.end).await.expect("ack");
        assert_eq!(segment_files(dir.path()), vec![2], "cut at {cut}");
        shut(spool, replayer).await;
    }
}

#[tokio::test]
async fn a_record_being_written_is_not_read_and_is_a_torn_tail_after_a_crash() {
    let dir = tempdir();
    let (spool, mut replayer) = open(&small(dir.path())).await;
    spool.append(&batch(0, 100)).await.expect("append");
    // Half a record past the published end, as while a write is under way.
    let half = &format::encode_record(&batch(1, 100), 0)[..90];
    let path = segment_path(dir.path(), 1);
    let mut file = std::fs::OpenOptions::new()
        .append(true)
        .open(&path)
        .expect("open");
    std::io::Write::write_all(&mut file, half).expect("write");
    let records = read_all(&mut replayer).await;
    assert_eq!(records.len(), 1);
    let stats = replayer.stats();
    assert_eq!(
        (stats.torn_tails, stats.corrupt, stats.skipped_bytes),
        (0, 0, 0)
    );
    // The process dies there: the next one finds a torn tail.
    shut(spool, replayer).await;
    let (spool, mut replayer) = open(&small(dir.path())).await;
    let records = read_all(&mut replayer).await;
    assert_eq!(records.len(), 1);
    let stats = replayer.stats();
    assert_eq!(
        (stats.torn_tails, stats.corrupt, stats.skipped_bytes),
        (1, 0, 90)
    );
    shut(spool, replayer).await;
}

#[tokio::test]
async fn a_flipped_byte_in_a_middle_record_is_skipped_and_counted() {
    let (batches, bytes) = five_record_segment().await;
    let (start, end) = (32 + 2 * 197, 32 + 3 * 197);
    for i in start..end {
        let dir = tempdir();
        let mut damaged = bytes.clone();
        damaged[i] ^= 0xFF;
        std::fs::write(segment_path(dir.path(), 1), &damaged).expect("write");
        let (spool, mut replayer) = open(&small(dir.path())).await;
        let records = read_all(&mut replayer).await;
        let got: Vec<&SpooledBatch> = records.iter().map(|r| &r.batch).collect();
        let want = vec![&batches[0], &batches[1], &batches[3], &batches[4]];
        assert_eq!(got, want, "byte {i} flipped");
        assert_eq!(records[2].start, at(1, end as u64));
        let stats = replayer.stats();
        assert_eq!(
            (stats.corrupt, stats.torn_tails, stats.skipped_bytes),
            (1, 0, 197),
            "byte {i} flipped"
        );
        shut(spool, replayer).await;
    }
}

#[tokio::test]
async fn an_unreadable_segment_header_skips_that_segment_only() {
    let dir = tempdir();
    let (spool, replayer) = open(&small(dir.path())).await;
    // 3,097-byte records, 21 per segment: segment 1 holds 0-20, segment 2 holds 21-24.
    let batches: Vec<SpooledBatch> = (0..25).map(|i| batch(i, 3000)).collect();
    append_all(&spool, &batches).await;
    shut(spool, replayer).await;
    let path = segment_path(dir.path(), 1);
    let mut bytes = std::fs::read(&path).expect("read");
    bytes[3] ^= 0x01;
    std::fs::write(&path, &bytes).expect("write");

    let (spool, mut replayer) = open(&small(dir.path())).await;
    let records = read_all(&mut replayer).await;
    let got: Vec<&SpooledBatch> = records.iter().map(|r| &r.batch).collect();
    assert_eq!(got, batches[21..].iter().collect::<Vec<_>>());
    let stats = replayer.stats();
    assert_eq!((stats.corrupt, stats.torn_tails), (1, 0));
    assert_eq!(stats.skipped_bytes, bytes.len() as u64);
    shut(spool, replayer).await;
}

#[tokio::test]
async fn a_full_spool_refuses_appends_until_replay_deletes_segments() {
    let dir = tempdir();
    let config = config(
        dir.path(),
        ByteSize::kib(64),
        ByteSize::kib(128),
        FsyncPolicy::Always,
    );
    let (spool, mut replayer) = open(&config).await;
    // 4,097-byte records: 15 fit a segment (32 + 15 * 4,097 = 61,487 bytes), so 30 fill
    // two segments: 122,974 bytes.
    for i in 0..30 {
        spool.append(&batch(i, 4000)).await.expect("room");
    }
    assert_eq!(spool.stats().used_bytes, 122_974);
    // An 8,080-byte record would fit (131,054 bytes) but for the header of the segment it
    // needs (131,086 > 131,072).
    let refusal = spool.append(&batch(30, 7983)).await.expect_err("full");
    match &refusal {
        SpoolError::Full {
            used,
            limit,
            needed,
            ..
        } => assert_eq!((*used, *limit, *needed), (122_974, 131_072, 8_112)),
        other => panic!("expected Full, got {other:?}"),
    }
    assert_eq!(
        refusal.to_string(),
        format!(
            "spool {} is full: 122974 of 131072 bytes used, the record needs 8112",
            dir.path().display()
        )
    );
    // A 4,097-byte one fits in a third segment (127,103 bytes); one more would make
    // 131,200.
    spool.append(&batch(30, 4000)).await.expect("room");
    for _ in 0..2 {
        assert!(matches!(
            spool.append(&batch(31, 4000)).await,
            Err(SpoolError::Full {
                used: 127_103,
                needed: 4_097,
                ..
            })
        ));
    }
    let stats = spool.stats();
    assert_eq!(
        (stats.full, stats.appended, stats.used_bytes),
        (3, 31, 127_103),
        "refusing wrote nothing"
    );

    let records = read_all(&mut replayer).await;
    assert_eq!(records.len(), 31);
    replayer.ack(records[30].end).await.expect("ack");
    assert_eq!(segment_files(dir.path()), vec![3]);
    assert_eq!(spool.stats().used_bytes, 32 + 4_097);
    let receipt = spool.append(&batch(31, 4000)).await.expect("room again");
    assert_eq!(receipt.start, at(3, 32 + 4_097));
    shut(spool, replayer).await;
}

#[tokio::test]
async fn oversized_records_and_keys_are_refused() {
    let dir = tempdir();
    let (spool, replayer) = open(&small(dir.path())).await;
    let too_big = batch(0, 65_536);
    let err = spool.append(&too_big).await.expect_err("too large");
    assert_eq!(
        err.to_string(),
        "record is 65633 bytes, a segment of this spool holds at most 65504"
    );
    // The largest body the configuration promises fits.
    let fits = SpooledBatch {
        write_key: "k".repeat(MAX_WRITE_KEY_BYTES),
        body: Bytes::from(vec![b'x'; small(dir.path()).max_body_bytes() as usize]),
        ..batch(1, 0)
    };
    spool.append(&fits).await.expect("largest body fits");
    let long_key = SpooledBatch {
        write_key: "k".repeat(MAX_WRITE_KEY_BYTES + 1),
        ..batch(2, 10)
    };
    assert_eq!(
        spool
            .append(&long_key)
            .await
            .expect_err("long key")
            .to_string(),
        "write key is 1025 bytes, limit 1024"
    );
    shut(spool, replayer).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_appends_are_read_back_once_in_append_order() {
    const TASKS: u64 = 16;
    const EACH: u64 = 100;
    let dir = tempdir();
    let (spool, mut replayer) = open(&small(dir.path())).await;
    // The replayer reads (and acknowledges, deleting segments) while the appends go on.
    let reader = tokio::spawn(async move {
        let mut records = Vec::new();
        while records.len() < (TASKS * EACH) as usize {
            let record = replayer.recv().await.expect("recv");
            if records.len() % 100 == 99 {
                replayer.ack(record.end).await.expect("ack");
            }
            records.push(record);
        }
        (records, replayer)
    });
    let mut writers = Vec::new();
    for task in 0..TASKS {
        let spool = spool.clone();
        writers.push(tokio::spawn(async move {
            let mut receipts = Vec::new();
            for n in 0..EACH {
                let id = task * 1000 + n;
                let receipt = spool.append(&batch(id, 200)).await.expect("append");
                receipts.push((id, receipt));
            }
            receipts
        }));
    }
    let mut receipts = BTreeMap::new();
    for w in writers {
        receipts.extend(w.await.expect("writer task"));
    }
    let (records, replayer) = reader.await.expect("reader task");

    let ids: Vec<u64> = records
        .iter()
        .map(|r| {
            let body = std::str::from_utf8(&r.batch.body).expect("ascii");
            body.split(':')
                .next()
                .and_then(|n| n.parse().ok())
                .expect("id")
        })
        .collect();
    assert_eq!(ids.iter().collect::<HashSet<_>>().len(), 1600, "each once");
    for (record, id) in records.iter().zip(&ids) {
        assert_eq!(record.batch, batch(*id, 200));
        assert_eq!(
            record.start, receipts[id].start,
            "record {id} where its append said"
        );
    }
    assert!(
        records
            .windows(2)
            .all(|w| w[0].end == w[1].start || w[0].end.segment < w[1].start.segment)
    );
    for task in 0..TASKS {
        let mine: Vec<u64> = ids.iter().copied().filter(|id| id / 1000 == task).collect();
        assert_eq!(mine, (0..EACH).map(|n| task * 1000 + n).collect::<Vec<_>>());
    }
    let stats = spool.stats();
    assert_eq!((stats.appended, stats.replayed), (1600, 1600));
    assert_eq!(
        stats.fsyncs, stats.groups,
        "one fsync per group with always"
    );
    shut(spool, replayer).await;
}

#[tokio::test]
async fn appends_waiting_together_share_one_write_and_one_fsync() {
    let dir = tempdir();
    let (spool, replayer) = open(&small(dir.path())).await;
    let batches: Vec<SpooledBatch> = (0..20).map(|i| batch(i, 300)).collect();
    // On this single-threaded runtime every append is queued before the writer runs.
    let results = futures::future::join_all(batches.iter().map(|b| spool.append(b))).await;
    let mut starts: Vec<Position> = results
        .iter()
        .map(|r| {
            let a = r.as_ref().expect("append");
            assert!(a.durable);
            a.start
        })
        .collect();
    starts.sort();
    let expected: Vec<Position> = (0..20).map(|k| at(1, 32 + k * 397)).collect();
    assert_eq!(starts, expected);
    let stats = spool.stats();
    assert_eq!((stats.groups, stats.fsyncs, stats.appended), (1, 1, 20));
    shut(spool, replayer).await;
}

#[tokio::test]
async fn always_fsyncs_before_each_append_returns() {
    let dir = tempdir();
    let (spool, replayer) = open(&small(dir.path())).await;
    for i in 0..5 {
        let receipt = spool.append(&batch(i, 50)).await.expect("append");
        assert!(receipt.durable);
        assert_eq!(spool.stats().fsyncs, i + 1);
    }
    shut(spool, replayer).await;
}

#[tokio::test]
async fn interval_appends_are_not_durable_until_synced() {
    let dir = tempdir();
    let config = config(
        dir.path(),
        ByteSize::kib(64),
        ByteSize::mib(1),
        FsyncPolicy::Interval,
    );
    let (spool, replayer) = open(&config).await;
    for i in 0..3 {
        let receipt = spool.append(&batch(i, 50)).await.expect("append");
        assert!(!receipt.durable);
    }
    assert_eq!(spool.stats().fsyncs, 0, "the 10 s interval has not passed");
    spool.flush().await.expect("flush");
    assert_eq!(spool.stats().fsyncs, 1);
    spool.flush().await.expect("flush");
    assert_eq!(spool.stats().fsyncs, 1, "nothing new to sync");
    shut(spool, replayer).await;

    let dir = tempdir();
    let config = SpoolConfig {
        fsync_interval: Duration::from_millis(20),
        ..config
    };
    let config = SpoolConfig {
        dir: dir.path().to_path_buf(),
        ..config
    };
    let (spool, replayer) = open(&config).await;
    spool.append(&batch(0, 50)).await.expect("append");
    let deadline = Instant::now() + Duration::from_secs(5);
    while spool.stats().fsyncs == 0 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(spool.stats().fsyncs, 1, "one sync for one dirty interval");
    shut(spool, replayer).await;
}

#[tokio::test]
async fn a_failed_sync_fails_the_append_and_starts_a_new_segment() {
    let dir = tempdir();
    let (spool, mut replayer) = open(&small(dir.path())).await;
    spool.append(&batch(0, 100)).await.expect("append");
    spool.shared.inject_sync_failure();
    let err = spool.append(&batch(1, 100)).await.expect_err("sync fails");
    assert_eq!(
        err.to_string(),
        format!(
            "{}/00000000000000000001.seg at offset 229: sync failed: injected sync failure",
            dir.path().display()
        )
    );
    assert!(matches!(err, SpoolError::Io { action: "sync", .. }));
    assert!(spool.flush().await.is_err(), "the failure is not forgotten");
    let receipt = spool.append(&batch(2, 100)).await.expect("append");
    assert_eq!(receipt.start, at(2, 32));
    assert!(receipt.durable);
    // The record whose sync failed was written; replaying it is harmless (its client
    // retries, and the retry is a duplicate by message id).
    let records = read_all(&mut replayer).await;
    let got: Vec<&SpooledBatch> = records.iter().map(|r| &r.batch).collect();
    assert_eq!(got, vec![&batch(0, 100), &batch(1, 100), &batch(2, 100)]);
    shut(spool, replayer).await;
}

#[tokio::test]
async fn a_record_of_a_newer_version_stops_the_replayer() {
    let dir = tempdir();
    let salt = 99;
    let seed = format::salt_seed(salt);
    let mut bytes = format::encode_segment_header(1, salt).to_vec();
    bytes.extend(format::encode_record(&batch(0, 40), seed));
    let mut newer = format::encode_record(&batch(1, 40), seed);
    newer[4..6].copy_from_slice(&2u16.to_le_bytes());
    let crc = crc32c::crc32c_append(seed, &newer[0..16]);
    newer[16..20].copy_from_slice(&crc.to_le_bytes());
    bytes.extend(newer);
    std::fs::write(segment_path(dir.path(), 1), &bytes).expect("write");

    let (spool, mut replayer) = open(&small(dir.path())).await;
    let first = replayer.try_recv().await.expect("read").expect("record");
    assert_eq!(first.batch, batch(0, 40));
    for _ in 0..2 {
        let err = replayer.try_recv().await.expect_err("unsupported");
        assert_eq!(
            err.to_string(),
            format!(
                "{} offset 169: record version 2 (flags 0x0) is not supported, this build reads version 1",
                segment_path(dir.path(), 1).display()
            )
        );
    }
    shut(spool, replayer).await;
}

#[tokio::test]
async fn acknowledging_ahead_of_the_reader_is_refused() {
    let dir = tempdir();
    let (spool, mut replayer) = open(&small(dir.path())).await;
    let receipt = spool.append(&batch(0, 10)).await.expect("append");
    let err = replayer.ack(receipt.end).await.expect_err("ahead");
    assert_eq!(
        err.to_string(),
        "acknowledged 00000000000000000001.seg offset 139, but the last record returned ends at 00000000000000000000.seg offset 0"
    );
    let record = replayer.recv().await.expect("recv");
    replayer.ack(record.end).await.expect("ack");
    shut(spool, replayer).await;
}

#[tokio::test]
async fn a_directory_is_opened_by_one_spool_at_a_time() {
    let dir = tempdir();
    let (spool, replayer) = open(&small(dir.path())).await;
    let err = Spool::open(&small(dir.path())).await.expect_err("locked");
    assert!(matches!(err, SpoolError::Locked { .. }), "{err}");
    shut(spool, replayer).await;
    let (spool, replayer) = open(&small(dir.path())).await;
    shut(spool, replayer).await;
}

#[tokio::test]
async fn appends_after_close_are_refused() {
    let dir = tempdir();
    let (spool, _replayer) = open(&small(dir.path())).await;
    spool.close().await.expect("close");
    assert!(matches!(
        spool.append(&batch(0, 10)).await,
        Err(SpoolError::Closed)
    ));
    assert!(matches!(spool.close().await, Err(SpoolError::Closed)));
}

#[test]
fn config_reads_units_and_checks_bounds() {
    use figment::Figment;
    use figment::providers::{Format, Toml};
    let config: SpoolConfig = Figment::from(Toml::string(
        r#"
        enabled = true
        dir = "/var/lib/ingest/spool"
        segment_size = "128 MiB"
        max_size = 4294967296
        fsync = "interval"
        fsync_interval = "20ms"
        "#,
    ))
    .extract()
    .expect("parse");
    assert_eq!(
        config,
        SpoolConfig {
            enabled: true,
            dir: "/var/lib/ingest/spool".into(),
            segment_size: ByteSize::mib(128),
            max_size: ByteSize::gib(4),
            fsync: FsyncPolicy::Interval,
            fsync_interval: Duration::from_millis(20),
        }
    );
    assert_eq!(config.validate(), Ok(()));
    assert_eq!(SpoolConfig::default().validate(), Ok(()));
    assert_eq!(
        SpoolConfig::default().max_body_bytes(),
        64 * 1024 * 1024 - 32 - 20 - 72 - 1024
    );
    assert!(SpoolConfig::default().max_body_bytes() >= wire::decode::MAX_BATCH_BYTES as u64);

    let unknown = Figment::from(Toml::string("segment_bytes = 1")).extract::<SpoolConfig>();
    assert!(unknown.is_err());
    let bad_unit = Figment::from(Toml::string("max_size = \"2 GiBs\"")).extract::<SpoolConfig>();
    let message = bad_unit.expect_err("bad unit").to_string();
    assert!(
        message.contains("\"2 GiBs\" is not a size like 64MiB, 512 KiB or 1048576"),
        "{message}"
    );

    let check = |c: SpoolConfig| c.validate().map_err(|e| e.to_string());
    let d = SpoolConfig::default;
    assert_eq!(
        check(SpoolConfig {
            segment_size: ByteSize::kib(32),
            ..d()
        }),
        Err("segment_size: 32KiB is not between 64KiB and 1GiB".into())
    );
    assert_eq!(
        check(SpoolConfig {
            max_size: ByteSize::mib(127),
            ..d()
        }),
        Err("max_size: 127MiB is not between twice segment_size (128MiB) and 16TiB".into())
    );
    assert_eq!(
        check(SpoolConfig {
            fsync_interval: Duration::ZERO,
            ..d()
        }),
        Err("fsync_interval: 0ns is not between 1ms and 10s".into())
    );
    assert_eq!(
        check(SpoolConfig {
            dir: "".into(),
            ..d()
        }),
        Err("dir: is empty".into())
    );
}

#[test]
fn config_survives_a_serialize_round_trip() {
    // Figment's defaults are the serialized `Default`: it must read back the same.
    use figment::Figment;
    use figment::providers::Serialized;
    let config = SpoolConfig {
        max_size: ByteSize(1_500_000_001),
        ..SpoolConfig::default()
    };
    let back: SpoolConfig = Figment::from(Serialized::defaults(&config))
        .extract()
        .expect("round trip");
    assert_eq!(back, config);
}

#[test]
fn byte_sizes_parse_and_print_with_units() {
    let parse = |s: &str| s.parse::<ByteSize>();
    assert_eq!(parse("64MiB"), Ok(ByteSize(64 << 20)));
    assert_eq!(parse(" 512 KiB "), Ok(ByteSize(512 << 10)));
    assert_eq!(parse("10MB"), Ok(ByteSize(10_000_000)));
    assert_eq!(parse("1kB"), Ok(ByteSize(1_000)));
    assert_eq!(parse("4096"), Ok(ByteSize(4096)));
    assert_eq!(parse("7B"), Ok(ByteSize(7)));
    assert_eq!(
        parse("1.5GiB"),
        Err("\"1.5GiB\" is not a size like 64MiB, 512 KiB or 1048576".into())
    );
    assert_eq!(
        parse("16777216TiB"),
        Err(format!("\"16777216TiB\" is more than {} bytes", u64::MAX))
    );
    assert_eq!(ByteSize::gib(1).to_string(), "1GiB");
    assert_eq!(ByteSize(2048).to_string(), "2KiB");
    assert_eq!(ByteSize(1536).to_string(), "1536B");
    assert_eq!(ByteSize(1000).to_string(), "1000B");
    assert_eq!(ByteSize(0).to_string(), "0B");
}

/// Where [`truncation_case`] cuts: anywhere, near a record's end, or in a segment header.
#[derive(Debug, Clone, Copy)]
enum Cut {
    Anywhere(u64),
    NearRecordEnd { record: usize, delta: i64 },
    InSegmentHeader { segment: usize, offset: u64 },
}

fn cuts() -> impl Strategy<Value = Cut> {
    prop_oneof![
        any::<u64>().prop_map(Cut::Anywhere),
        (any::<usize>(), -25i64..25)
            .prop_map(|(record, delta)| Cut::NearRecordEnd { record, delta }),
        (any::<usize>(), 0u64..=SEGMENT_HEADER_LEN)
            .prop_map(|(segment, offset)| Cut::InSegmentHeader { segment, offset }),
    ]
}

/// One appended run, truncated at `cut` bytes into the concatenation of its segment files,
/// then reopened: the replayer returns the whole records before the cut, and then what is
/// appended after the reopening.
async fn truncation_case(bodies: &[usize], cut: Cut) -> Result<(), TestCaseError> {
    let dir = tempdir();
    let config = config(
        dir.path(),
        ByteSize::kib(64),
        ByteSize::mib(16),
        FsyncPolicy::Interval,
    );
    let (spool, replayer) = open(&config).await;
    let batches: Vec<SpooledBatch> = bodies
        .iter()
        .enumerate()
        .map(|(i, len)| batch(i as u64, *len))
        .collect();
    let receipts = append_all(&spool, &batches).await;
    shut(spool, replayer).await;

    let files: Vec<(u64, u64)> = segment_files(dir.path())
        .into_iter()
        .map(|s| {
            let len = std::fs::metadata(segment_path(dir.path(), s))
                .expect("stat")
                .len();
            (s, len)
        })
        .collect();
    let mut base = BTreeMap::new();
    let mut total = 0;
    for (s, len) in &files {
        base.insert(*s, total);
        total += len;
    }
    let global = |p: Position| base[&p.segment] + p.offset;
    let cut = match cut {
        Cut::Anywhere(seed) => seed % (total + 1),
        Cut::NearRecordEnd { record, delta } => {
            let end = global(receipts[record % receipts.len()].end);
            end.saturating_add_signed(delta).min(total)
        }
        Cut::InSegmentHeader { segment, offset } => {
            let (s, _) = files[segment % files.len()];
            base[&s] + offset
        }
    };
    let mut torn = false;
    for (s, len) in &files {
        let path = segment_path(dir.path(), *s);
        let start = base[s];
        if start + len <= cut {
            continue;
        }
        if start >= cut {
            std::fs::remove_file(&path).expect("delete");
            continue;
        }
        let keep = cut - start;
        let boundary = keep == SEGMENT_HEADER_LEN
            || receipts
                .iter()
                .any(|r| r.end.segment == *s && r.end.offset == keep);
        torn = !boundary;
        let file = std::fs::OpenOptions::new()
            .write(true)
            .open(&path)
            .expect("open");
        file.set_len(keep).expect("truncate");
    }
    let expected: Vec<&SpooledBatch> = batches
        .iter()
        .zip(&receipts)
        .filter(|(_, r)| global(r.end) <= cut)
        .map(|(b, _)| b)
        .collect();

    let (spool, mut replayer) = open(&config).await;
    let records = read_all(&mut replayer).await;
    let got: Vec<&SpooledBatch> = records.iter().map(|r| &r.batch).collect();
    prop_assert_eq!(got, expected, "cut at {} of {}", cut, total);
    let stats = replayer.stats();
    prop_assert_eq!(stats.torn_tails, u64::from(torn));
    prop_assert_eq!(stats.corrupt, 0);
    let after = batch(1_000, 10);
    spool.append(&after).await.expect("append after reopening");
    let next = replayer.try_recv().await.expect("read");
    prop_assert_eq!(next.map(|r| r.batch), Some(after));
    shut(spool, replayer).await;
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 128, ..ProptestConfig::default() })]

    /// Whatever was appended and wherever a crash cut the files, the replayer returns
    /// exactly the records that were whole before the cut, in order, and nothing else.
    #[test]
    fn truncation_never_yields_a_record_that_was_not_appended_whole(
        bodies in prop::collection::vec(0usize..6000, 1..40),
        cut in cuts(),
    ) {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        runtime.block_on(truncation_case(&bodies, cut))?;
    }
}

/// Appends per second on this machine: `cargo test -p ingest --test spool --release --
/// --ignored --nocapture measure`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a measurement, not a check"]
async fn measure_append_rate() {
    const BODY: usize = 3_700;
    for (policy, tasks, total) in [
        (FsyncPolicy::Always, 1, 2_000),
        (FsyncPolicy::Always, 16, 10_000),
        (FsyncPolicy::Always, 64, 20_000),
        (FsyncPolicy::Interval, 1, 50_000),
        (FsyncPolicy::Interval, 64, 50_000),
    ] {
        let dir = tempdir();
        let config = SpoolConfig {
            fsync_interval: DEFAULT_FSYNC_INTERVAL,
            ..config(dir.path(), DEFAULT_SEGMENT_SIZE, ByteSize::gib(2), policy)
        };
        let (spool, replayer) = open(&config).await;
        let started = Instant::now();
        let mut handles = Vec::new();
        for t in 0..tasks {
            let spool = spool.clone();
            handles.push(tokio::spawn(async move {
                for n in 0..total / tasks {
                    spool
                        .append(&batch(t * 1_000_000 + n, BODY))
                        .await
                        .expect("append");
                }
            }));
        }
        for h in handles {
            h.await.expect("task");
        }
        let elapsed = started.elapsed();
        let stats = spool.stats();
        println!(
            "{policy:?}, {tasks} task(s): {} appends of {} bytes in {:.2} s = {:.0} appends/s, {:.1} MB/s; {} groups, {} fsyncs",
            stats.appended,
            RECORD_OVERHEAD as usize + BODY,
            elapsed.as_secs_f64(),
            stats.appended as f64 / elapsed.as_secs_f64(),
            stats.appended_bytes as f64 / elapsed.as_secs_f64() / 1e6,
            stats.groups,
            stats.fsyncs,
        );
        shut(spool, replayer).await;
    }
}

//! `profiles watch`: segment transitions as JSON lines, through a consumer group.
//!
//! Each batch is written to standard output and flushed, and only then acknowledged: a
//! process that dies in between leaves the batch pending, and its next run under the same
//! consumer name prints it again first (at least once). The writing happens on a thread of
//! its own, so that Ctrl-C and SIGTERM stop the process even while a reader that does not
//! read holds the write up; a batch whose write did not finish is not acknowledged. While
//! Redis does not answer (a restart), it says so once and tries again every second.

use std::io::{self, Write as _};
use std::num::NonZeroUsize;
use std::sync::mpsc;
use std::time::Duration;

use anyhow::Context as _;
use profile_cache::{
    GroupStart, ProfileConfig, StoreError, Transition, TransitionBatch, TransitionConsumer,
};
use serde::Serialize;
use time::OffsetDateTime;
use tokio::signal::unix::{Signal, SignalKind, signal};
use tokio::sync::oneshot;

pub const ABOUT: &str = "\
Print segment transitions (who entered or left which segment) as JSON lines, as they happen.

Reads stream:transitions as consumer --consumer of the Redis consumer group --group, which it \
creates if missing: reading entries added from then on, or every entry the stream still holds \
with --from-start (an existing group goes on where it was). Each line is written and flushed \
before its entry is acknowledged (XACK), so an entry is printed at least once: one read by a \
run that stopped before acknowledging it is printed again, first, by the next run with the \
same group and consumer. Several processes with one group and different consumer names share \
the entries between them.

Each line: {\"id\" (the stream entry id), \"profile\", \"segment\", \"change\" (enter or exit), \
\"at\" (RFC 3339), \"at_ms\", \"reason\" (event, deadline, redefined, removed, or a later \
one)}. Runs until Ctrl-C, SIGTERM or the reader closes standard output, each a clean stop \
(exit status 0); while Redis does not answer (a restart), it says so and tries again every \
second.";

pub const EXAMPLE: &str = "\
Example:
  profiles watch --group esp-sync --consumer worker-1 | my-esp-sync";

#[derive(Debug, clap::Args)]
pub struct Args {
    /// The consumer group: one per application that needs every transition.
    #[arg(long)]
    group: String,

    /// This process's name in the group; a restart under the same name gets the entries it
    /// had read but not acknowledged.
    #[arg(long, default_value = "profiles")]
    consumer: String,

    /// Create a missing group at the oldest entry the stream holds instead of at new
    /// entries.
    #[arg(long)]
    from_start: bool,

    /// Entries read, written and acknowledged at a time.
    #[arg(long, default_value = "100", value_parser = batch_size)]
    batch: NonZeroUsize,
}

/// How long a batch being written may take once a stop is asked for, before the process
/// stops without acknowledging it.
const STOP_GRACE: Duration = Duration::from_secs(1);

pub async fn run(url: &str, config: &ProfileConfig, args: Args) -> anyhow::Result<()> {
    // Installed first: from here on Ctrl-C and SIGTERM ask for a stop instead of killing.
    let stop = Stop {
        interrupt: signal(SignalKind::interrupt()).context("handling SIGINT")?,
        terminate: signal(SignalKind::terminate()).context("handling SIGTERM")?,
    };
    let start = if args.from_start {
        GroupStart::Oldest
    } else {
        GroupStart::New
    };
    let (consumer, created) =
        TransitionConsumer::connect(url, config, &args.group, &args.consumer, start)
            .await
            .context("joining the consumer group (--redis-url, REDIS_URL)")?;
    if !created && args.from_start {
        eprintln!(
            "note: consumer group {:?} exists: it goes on where it was (--from-start only \
             applies to a group it creates)",
            args.group
        );
    }
    let mut watcher = Watcher {
        consumer,
        stop,
        outage: false,
    };
    let output = Output::spawn();
    loop {
        let Some(batch) = watcher.next_batch(args.batch).await? else {
            return Ok(());
        };
        if batch.is_empty() {
            // Nothing came within the wait: a good moment to notice a reader that left.
            if output_closed() {
                return Ok(());
            }
            continue;
        }
        if !batch.trimmed.is_empty() {
            let (n, one) = (batch.trimmed.len(), batch.trimmed.len() == 1);
            eprintln!(
                "warning: {n} {} read earlier but not acknowledged left the stream (its length \
                 cap) before {} could be printed again: {}",
                if one { "entry" } else { "entries" },
                if one { "it" } else { "they" },
                batch.trimmed.join(", ")
            );
        }
        let mut lines = Vec::new();
        for t in &batch.transitions {
            serde_json::to_writer(&mut lines, &Line::from(t)).context("encoding a transition")?;
            lines.push(b'\n');
        }
        let ids = batch_ids(&batch);
        let mut written = output.write(lines);
        let result = tokio::select! {
            biased;
            // A closed channel: the output thread is gone, which it never is while
            // `output` lives.
            result = &mut written => result.unwrap_or_else(|_| Err(io::Error::other("the output thread stopped"))),
            () = watcher.stop.requested() => {
                // Acknowledged only if the write finishes soon; else it stays pending.
                if let Ok(Ok(Ok(()))) = tokio::time::timeout(STOP_GRACE, written).await {
                    watcher.consumer.ack(&ids).await.context(ACK)?;
                }
                return Ok(());
            }
        };
        match result {
            Ok(()) => {}
            // The reader left: what it did not read stays pending.
            Err(e) if e.kind() == io::ErrorKind::BrokenPipe => return Ok(()),
            Err(e) => return Err(e).context("writing to standard output"),
        }
        if !watcher.ack(&ids).await? {
            return Ok(());
        }
    }
}

const ACK: &str = "acknowledging the printed transitions (XACK)";

/// How often a watcher tries Redis again while it does not answer.
const RETRY: Duration = Duration::from_secs(1);

/// Ctrl-C and SIGTERM.
struct Stop {
    interrupt: Signal,
    terminate: Signal,
}

impl Stop {
    /// Resolves when a stop is asked for.
    async fn requested(&mut self) {
        tokio::select! {
            _ = self.interrupt.recv() => {}
            _ = self.terminate.recv() => {}
        }
    }
}

/// The consumer, its stop signals, and whether Redis is known to be unavailable: a
/// watcher waits out a Redis restart (the connection reconnects by itself) rather than
/// ending the pipeline it feeds.
struct Watcher {
    consumer: TransitionConsumer,
    stop: Stop,
    outage: bool,
}

impl Watcher {
    /// The next batch, trying again while Redis is unavailable; `None` once a stop is
    /// asked for.
    async fn next_batch(&mut self, count: NonZeroUsize) -> anyhow::Result<Option<TransitionBatch>> {
        loop {
            let result = tokio::select! {
                biased;
                () = self.stop.requested() => return Ok(None),
                result = self.consumer.next_batch(count) => result,
            };
            match result {
                Ok(batch) => {
                    self.back();
                    return Ok(Some(batch));
                }
                Err(StoreError::Unavailable(e)) => {
                    if !self.wait_out(&e).await {
                        return Ok(None);
                    }
                }
                Err(e) => {
                    return Err(e).with_context(|| {
                        format!(
                            "reading stream:transitions as {:?} in group {:?}",
                            self.consumer.consumer(),
                            self.consumer.group()
                        )
                    });
                }
            }
        }
    }

    /// Acknowledges `ids`, trying again while Redis is unavailable; `false` when a stop
    /// was asked for first (the entries stay pending).
    async fn ack(&mut self, ids: &[String]) -> anyhow::Result<bool> {
        loop {
            match self.consumer.ack(ids).await {
                Ok(_) => {
                    self.back();
                    return Ok(true);
                }
                Err(StoreError::Unavailable(e)) => {
                    if !self.wait_out(&e).await {
                        return Ok(false);
                    }
                }
                Err(e) => return Err(e).context(ACK),
            }
        }
    }

    /// Says once per outage that Redis does not answer, then waits [`RETRY`]; `false` when
    /// a stop is asked for meanwhile.
    async fn wait_out(&mut self, err: &redis::RedisError) -> bool {
        if !self.outage {
            eprintln!("warning: Redis does not answer ({err}); trying again every second");
            self.outage = true;
        }
        tokio::select! {
            () = self.stop.requested() => false,
            () = tokio::time::sleep(RETRY) => true,
        }
    }

    /// Says that Redis answers again, after an outage.
    fn back(&mut self) {
        if self.outage {
            eprintln!("note: Redis answers again");
            self.outage = false;
        }
    }
}

/// The entries of a batch to acknowledge: those printed and those the stream dropped.
fn batch_ids(batch: &TransitionBatch) -> Vec<String> {
    batch
        .transitions
        .iter()
        .map(|t| t.entry_id.clone())
        .chain(batch.trimmed.iter().cloned())
        .collect()
}

fn batch_size(text: &str) -> Result<NonZeroUsize, String> {
    text.parse::<usize>()
        .ok()
        .filter(|n| (1..=10_000).contains(n))
        .and_then(NonZeroUsize::new)
        .ok_or_else(|| format!("{text:?} is not a whole number from 1 to 10000"))
}

/// A transition as printed.
#[derive(Debug, Serialize)]
struct Line<'a> {
    id: &'a str,
    profile: &'a str,
    segment: &'a str,
    change: &'static str,
    #[serde(with = "time::serde::rfc3339")]
    at: OffsetDateTime,
    at_ms: i64,
    reason: &'a str,
}

impl<'a> From<&'a Transition> for Line<'a> {
    fn from(t: &'a Transition) -> Self {
        Line {
            id: &t.entry_id,
            profile: t.profile.as_str(),
            segment: &t.segment,
            change: t.change.as_str(),
            at: t.at,
            // Transition times are whole milliseconds within ±10^4 years.
            at_ms: (t.at.unix_timestamp_nanos() / 1_000_000) as i64,
            reason: &t.reason,
        }
    }
}

/// Standard output, written on a thread of its own (see the module docs).
struct Output {
    batches: mpsc::Sender<(Vec<u8>, oneshot::Sender<io::Result<()>>)>,
}

impl Output {
    fn spawn() -> Self {
        let (batches, receive) = mpsc::channel::<(Vec<u8>, oneshot::Sender<io::Result<()>>)>();
        std::thread::spawn(move || {
            let stdout = io::stdout();
            for (bytes, done) in receive {
                let mut out = stdout.lock();
                let _ = done.send(out.write_all(&bytes).and_then(|()| out.flush()));
            }
        });
        Self { batches }
    }

    /// Writes and flushes `bytes`; the receiver gets the outcome.
    fn write(&self, bytes: Vec<u8>) -> oneshot::Receiver<io::Result<()>> {
        let (done, outcome) = oneshot::channel();
        if let Err(mpsc::SendError((_, done))) = self.batches.send((bytes, done)) {
            let _ = done.send(Err(io::Error::other("the output thread stopped")));
        }
        outcome
    }
}

/// Whether standard output is a pipe or socket whose reader has gone (`poll` reports an
/// error or a hang-up), without writing to it.
fn output_closed() -> bool {
    use rustix::event::{PollFd, PollFlags, Timespec, poll};
    let stdout = io::stdout();
    let mut fds = [PollFd::new(&stdout, PollFlags::OUT)];
    let now = Timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    match poll(&mut fds, Some(&now)) {
        Ok(_) => fds[0].revents().intersects(PollFlags::ERR | PollFlags::HUP),
        Err(_) => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use profile_cache::{Change, ProfileId};
    use time::macros::datetime;

    #[test]
    fn a_transition_prints_as_one_json_object() {
        let t = Transition {
            entry_id: "1795953600000-0".into(),
            profile: ProfileId::anonymous("7f3a").unwrap(),
            segment: "cart_abandoners_30m".into(),
            change: Change::Enter,
            at: datetime!(2026-11-29 12:00:00 UTC),
            reason: "deadline".into(),
        };
        assert_eq!(
            serde_json::to_string(&Line::from(&t)).unwrap(),
            r#"{"id":"1795953600000-0","profile":"a:7f3a","segment":"cart_abandoners_30m","change":"enter","at":"2026-11-29T12:00:00Z","at_ms":1795953600000,"reason":"deadline"}"#
        );
    }

    #[test]
    fn batch_sizes_are_bounded() {
        assert_eq!(batch_size("100").unwrap().get(), 100);
        assert!(batch_size("0").is_err());
        assert!(batch_size("10001").is_err());
    }
}

//! `profiles segment list` and the segment checks `export` shares.
//!
//! Segments are what Redis records: `meta:{segments}:definitions` names each segment whose
//! memberships are complete, with its fingerprint, and `segment:{NAME}:members` holds its
//! members. The collector's segments file is not needed: the definitions (conditions and
//! descriptions) are only in it, and the collector's `GET /v1/segments` shows them.

use std::io::{self, Write as _};

use anyhow::Context as _;
use clap::Subcommand;
use profile_cache::{RecordedSegments, RedisProfiles};

use crate::export;

#[derive(Debug, Subcommand)]
pub enum Command {
    /// List the segments with their sizes.
    ///
    /// The segments are those recorded in Redis (meta:{segments}:definitions): every
    /// segment whose memberships are complete, by name. A segment the collector was
    /// configured with since is listed once its rebuild finishes (a note on standard error
    /// says when one is running). Columns: SEGMENT, MEMBERS; with --json, one JSON object
    /// per line: {"name", "members", "fingerprint"}.
    List {
        /// One JSON object per segment and line instead of a table.
        #[arg(long)]
        json: bool,
    },

    /// Export a segment's members as CSV or JSON lines.
    #[command(long_about = export::ABOUT, after_help = export::EXAMPLE)]
    Export(export::Args),
}

pub async fn run(store: &RedisProfiles, command: Command) -> anyhow::Result<()> {
    match command {
        Command::List { json } => list(store, json).await,
        Command::Export(args) => export::run(store, args).await,
    }
}

async fn list(store: &RedisProfiles, json: bool) -> anyhow::Result<()> {
    let recorded = recorded(store).await?;
    let names = recorded.names();
    let sizes = store
        .segment_sizes(&names)
        .await
        .context("reading the segment sizes")?;
    if recorded.segments.is_empty() {
        eprintln!("note: {}", no_segments());
    }
    note_rebuild(&recorded);
    let mut out = io::BufWriter::new(io::stdout().lock());
    if json {
        for (segment, members) in recorded.segments.iter().zip(&sizes) {
            let line = serde_json::json!({
                "name": segment.name,
                "members": members,
                "fingerprint": segment.fingerprint,
            });
            writeln!(out, "{line}").context("writing the list")?;
        }
    } else if !names.is_empty() {
        let name_width = names.iter().map(|n| n.len()).max().unwrap_or(0).max(7);
        let size_width = sizes
            .iter()
            .map(|s| s.to_string().len())
            .max()
            .unwrap_or(0)
            .max(7);
        writeln!(out, "{:name_width$}  {:>size_width$}", "SEGMENT", "MEMBERS")
            .context("writing the list")?;
        for (name, members) in names.iter().zip(&sizes) {
            writeln!(out, "{name:name_width$}  {members:>size_width$}")
                .context("writing the list")?;
        }
    }
    out.flush().context("writing the list")
}

/// The recorded segments.
pub async fn recorded(store: &RedisProfiles) -> anyhow::Result<RecordedSegments> {
    store
        .recorded_segments()
        .await
        .context("reading the recorded segments (meta:{segments}:definitions)")
}

/// Says on standard error that a rebuild is running, when one is.
pub fn note_rebuild(recorded: &RecordedSegments) {
    if recorded.rebuilding {
        eprintln!(
            "note: a rebuild of the segment memberships is running (meta:{{segments}}:rebuild): \
             a segment added to the collector's configuration is listed once it finishes, \
             and a changed one's members mix its old and new condition until then"
        );
    }
}

/// The error for a segment Redis does not record.
pub fn unknown(name: &str, recorded: &RecordedSegments) -> anyhow::Error {
    let mut message = if recorded.segments.is_empty() {
        format!("unknown segment {name:?}: {}", no_segments())
    } else {
        format!(
            "unknown segment {name:?}; the segments are: {}",
            recorded.names().join(", ")
        )
    };
    if recorded.rebuilding {
        message.push_str(
            " (a rebuild is running: a segment just added to the collector's configuration \
             is known once it finishes)",
        );
    }
    anyhow::Error::msg(message)
}

fn no_segments() -> &'static str {
    "no segments are recorded in this Redis (meta:{segments}:definitions is empty): \
     no collector with segments has finished a rebuild against it"
}

//! `profiles`: customer profiles and segments from the collector's Redis, for the people who
//! wire email platforms (Mailchimp, Klaviyo, Braze, an SMTP sender) to them. A reader: it
//! writes nothing of the key schema, only the consumer group state of `profiles watch`.
//!
//! - `get`: one profile as JSON.
//! - `segment list` / `segment export` ([`segment`]): the recorded segments with their sizes,
//!   and a segment's members streamed page by page as CSV or JSON lines.
//! - `watch` ([`watch`]): segment transitions as JSON lines, through a consumer group,
//!   acknowledged once written.

// A binary's root resolves modules next to it, not in a folder named after it.
#[path = "profiles/export.rs"]
mod export;
#[path = "profiles/segment.rs"]
mod segment;
#[path = "profiles/watch.rs"]
mod watch;

use std::io::{self, Write as _};
use std::process::ExitCode;

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use profile_cache::{ProfileConfig, ProfileId, RedisProfiles};
use time::OffsetDateTime;

/// Customer profiles and segments from the collector's Redis, for ESP connectors.
///
/// Reads the Redis key schema (docs/KEY_SCHEMA.md) directly; the collector need not run.
/// Writes nothing there but the consumer group of `watch` (with an empty
/// `stream:transitions` when there is none yet). Errors go to standard error and end with
/// exit status 1; a closed standard output (`| head`) ends a command quietly with status 0.
#[derive(Debug, Parser)]
#[command(name = "profiles", version, about, long_about, after_help = EXAMPLES)]
struct Cli {
    /// The collector's Redis.
    #[arg(
        long,
        env = "REDIS_URL",
        default_value = "redis://127.0.0.1:6379",
        global = true,
        hide_env_values = true
    )]
    redis_url: String,

    #[command(subcommand)]
    command: Command,
}

const EXAMPLES: &str = "\
Examples:
  profiles get ada@example.com
  profiles segment list
  profiles segment export cart_abandoners_30m --format csv --traits email,first_name > audience.csv
  profiles watch --group esp-sync --consumer worker-1";

#[derive(Debug, Subcommand)]
enum Command {
    /// Print a profile as JSON.
    ///
    /// ID is looked up as the collector's API does (GET /v1/profiles/{id}): as a user id,
    /// then as an anonymous id; failing both, a profile id as `export` and `watch` print
    /// it (`u:<user id>`, `a:<anonymous id>`) is looked up as such. The lifecycle stage is
    /// computed with the default thresholds (new 14 days, dormant 30, churned 90). Exit
    /// status 1 when there is no such profile.
    #[command(after_help = "Example:\n  profiles get ada@example.com | jq .traits.email")]
    Get {
        /// User id, anonymous id, or profile id (`u:...`, `a:...`).
        id: String,
    },

    /// List segments or export a segment's members.
    #[command(subcommand)]
    Segment(segment::Command),

    /// Print segment transitions as JSON lines, as they happen.
    #[command(long_about = watch::ABOUT, after_help = watch::EXAMPLE)]
    Watch(watch::Args),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")
        .and_then(|runtime| runtime.block_on(run(cli)));
    match result {
        Ok(()) => ExitCode::SUCCESS,
        // Whoever read our output stopped reading (`| head`): not an error.
        Err(err) if is_broken_pipe(&err) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("error: {err:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Get { id } => get(&connect(&cli.redis_url).await?, &id).await,
        Command::Segment(command) => segment::run(&connect(&cli.redis_url).await?, command).await,
        Command::Watch(args) => watch::run(&cli.redis_url, &ProfileConfig::default(), args).await,
    }
}

/// A reader on the collector's Redis: it checks the key schema version and writes nothing.
async fn connect(url: &str) -> anyhow::Result<RedisProfiles> {
    RedisProfiles::connect_reader(url, ProfileConfig::default())
        .await
        .context("connecting to Redis (--redis-url, REDIS_URL)")
}

/// `profiles get`.
async fn get(store: &RedisProfiles, id: &str) -> anyhow::Result<()> {
    let now = OffsetDateTime::now_utc();
    let mut profile = store
        .find(id, now)
        .await
        .with_context(|| format!("reading profile {id:?}"))?;
    if profile.is_none()
        && let Some(pid) = explicit_profile_id(id)
    {
        profile = store
            .profile(&pid, now)
            .await
            .with_context(|| format!("reading profile {pid}"))?;
    }
    let profile = profile.with_context(|| {
        format!("no profile {id:?}: looked up as a user id, an anonymous id and a profile id")
    })?;
    let mut out = io::stdout().lock();
    serde_json::to_writer_pretty(&mut out, &profile).context("writing the profile")?;
    writeln!(out)
        .and_then(|()| out.flush())
        .context("writing the profile")
}

/// `u:<user id>` or `a:<anonymous id>` as a profile id.
fn explicit_profile_id(text: &str) -> Option<ProfileId> {
    match text.split_once(':')? {
        ("u", id) => ProfileId::user(id).ok(),
        ("a", id) => ProfileId::anonymous(id).ok(),
        _ => None,
    }
}

/// Whether the error comes from writing to a reader that went away.
fn is_broken_pipe(err: &anyhow::Error) -> bool {
    let broken = |kind: io::ErrorKind| kind == io::ErrorKind::BrokenPipe;
    err.chain().any(|e| {
        e.downcast_ref::<io::Error>()
            .is_some_and(|e| broken(e.kind()))
            || e.downcast_ref::<serde_json::Error>()
                .and_then(serde_json::Error::io_error_kind)
                .is_some_and(broken)
            || e.downcast_ref::<csv::Error>()
                .is_some_and(|e| matches!(e.kind(), csv::ErrorKind::Io(io) if broken(io.kind())))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn profile_ids_are_read_in_both_forms() {
        assert_eq!(
            explicit_profile_id("u:ada@example.com"),
            Some(ProfileId::user("ada@example.com").unwrap())
        );
        assert_eq!(
            explicit_profile_id("a:7f3a"),
            Some(ProfileId::anonymous("7f3a").unwrap())
        );
        assert_eq!(explicit_profile_id("ada"), None);
        assert_eq!(explicit_profile_id("x:ada"), None);
        assert_eq!(explicit_profile_id("a:{x}"), None);
    }

    #[test]
    fn broken_pipes_are_found_behind_context() {
        let pipe = anyhow::Error::from(io::Error::from(io::ErrorKind::BrokenPipe))
            .context("writing the profile");
        assert!(is_broken_pipe(&pipe));
        let csv = anyhow::Error::from(csv::Error::from(io::Error::from(io::ErrorKind::BrokenPipe)));
        assert!(is_broken_pipe(&csv));
        let json = anyhow::Error::from(serde_json::Error::io(io::Error::from(
            io::ErrorKind::BrokenPipe,
        )));
        assert!(is_broken_pipe(&json));
        let other = anyhow::Error::from(io::Error::from(io::ErrorKind::PermissionDenied));
        assert!(!is_broken_pipe(&other));
    }

    #[test]
    fn the_command_line_is_consistent() {
        use clap::CommandFactory as _;
        Cli::command().debug_assert();
    }
}

//! `profiles segment export`: a segment's members, streamed page by page.
//!
//! Pages come from the member cursor of the segment reads (`segment_members`: stable while
//! profiles enter and leave, every member present throughout returned exactly once), and
//! each page is written and flushed before the next is read, so memory holds one page
//! whatever the segment's size. A member whose profile was deleted after its page was read
//! (an erasure) is left out: each page asks which profiles still exist.

use std::collections::BTreeMap;
use std::io::{self, Write};
use std::num::NonZeroUsize;

use anyhow::{Context as _, bail};
use clap::ValueEnum;
use profile_cache::{MembersRequest, ProfileId, RedisProfiles, SegmentMember};
use serde::Serialize;
use time::OffsetDateTime;

use crate::segment;

pub const ABOUT: &str = "\
Export a segment's members as CSV or JSON lines, to standard output.

Members come in the order they entered the segment, read page by page with a stable cursor \
and written as they come: a segment of millions is never held in memory, and a member \
present during the whole export is written exactly once, whoever enters or leaves meanwhile. \
A member whose profile is deleted during the export is left out. A summary goes to standard \
error.

CSV (RFC 4180: comma, double quotes where needed, CRLF line ends, UTF-8) has a header row and \
one column per trait: the `email` trait first, headed `Email Address` (Mailchimp's name for it; \
--email-header sets another, e.g. `email` for Braze), then the other traits in the order \
given, headed by their names. A trait the profile does not have is an empty cell.

JSON lines: one object per member, as the collector's API pages them: \
{\"id\", \"entered_at\" (RFC 3339), \"entered_at_ms\", \"traits\": {name: value}}, \
leaving out traits the profile does not have.

An unknown segment is an error (exit status 1) naming the known ones.";

pub const EXAMPLE: &str = "\
Examples:
  profiles segment export cart_abandoners_30m --traits email,first_name > audience.csv
  profiles segment export high_value --format jsonl --traits email,plan | jq -r .traits.email";

#[derive(Debug, clap::Args)]
pub struct Args {
    /// The segment, as `segment list` names it.
    name: String,

    /// Output format.
    #[arg(long, value_enum, default_value_t = Format::Csv)]
    format: Format,

    /// Traits to export, comma-separated, as stored by `identify` (names are case-sensitive).
    #[arg(long, value_delimiter = ',', default_value = "email")]
    traits: Vec<String>,

    /// The CSV header of the `email` trait's column.
    #[arg(long, default_value = "Email Address")]
    email_header: String,

    /// Leave out members that lack any of the traits (an ESP import rejects a row without
    /// an email address).
    #[arg(long)]
    skip_incomplete: bool,

    /// Members read per page: each page is three Redis round trips.
    #[arg(long, default_value = "1000", value_parser = page_size)]
    page_size: NonZeroUsize,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Format {
    /// Comma-separated values with a header row, for ESP imports.
    Csv,
    /// One JSON object per line.
    Jsonl,
}

/// The trait whose column leads a CSV export, under `--email-header`.
const EMAIL_TRAIT: &str = "email";

/// The largest `--page-size`: a page is read in one atomic call, which holds Redis up for
/// as long; beyond this a page saves nothing worth that.
const MAX_PAGE_SIZE: usize = 10_000;

pub async fn run(store: &RedisProfiles, args: Args) -> anyhow::Result<()> {
    let traits = trait_names(&args.traits)?;
    let recorded = segment::recorded(store).await?;
    if !recorded.contains(&args.name) {
        return Err(segment::unknown(&args.name, &recorded));
    }
    segment::note_rebuild(&recorded);
    let mut out = match args.format {
        Format::Csv => Out::csv(io::stdout(), &traits, &args.email_header)?,
        Format::Jsonl => Out::Jsonl(io::BufWriter::new(io::stdout())),
    };
    let mut request = MembersRequest {
        after: None,
        limit: args.page_size,
        traits: traits.clone(),
    };
    let mut tally = Tally::default();
    loop {
        let page = store
            .segment_members(&args.name, &request)
            .await
            .with_context(|| format!("reading the members of segment {:?}", args.name))?;
        let ids: Vec<ProfileId> = page.members.iter().map(|m| m.id.clone()).collect();
        let exist = store
            .profiles_exist(&ids)
            .await
            .context("checking that the members' profiles exist")?;
        for (member, exists) in page.members.iter().zip(exist) {
            if !exists {
                tally.gone += 1;
            } else if args.skip_incomplete && traits.iter().any(|t| !member.traits.contains_key(t))
            {
                tally.incomplete += 1;
            } else {
                out.member(member)?;
                tally.written += 1;
            }
        }
        out.flush()?;
        match page.next {
            Some(next) => request.after = Some(next),
            None => break,
        }
    }
    eprintln!("{}", tally.summary(&args.name));
    Ok(())
}

/// The `--traits` names: trimmed, each once, in the order given.
fn trait_names(given: &[String]) -> anyhow::Result<Vec<String>> {
    let mut names: Vec<String> = Vec::with_capacity(given.len());
    for (i, name) in given.iter().enumerate() {
        let name = name.trim();
        if name.is_empty() {
            bail!("--traits: name {} is empty", i + 1);
        }
        if name.chars().any(char::is_control) {
            bail!("--traits: name {name:?} contains a control character");
        }
        if !names.iter().any(|n| n == name) {
            names.push(name.into());
        }
    }
    Ok(names)
}

fn page_size(text: &str) -> Result<NonZeroUsize, String> {
    text.parse::<usize>()
        .ok()
        .filter(|n| (1..=MAX_PAGE_SIZE).contains(n))
        .and_then(NonZeroUsize::new)
        .ok_or_else(|| format!("{text:?} is not a whole number from 1 to {MAX_PAGE_SIZE}"))
}

/// What the export wrote and left out.
#[derive(Debug, Default)]
struct Tally {
    written: u64,
    gone: u64,
    incomplete: u64,
}

impl Tally {
    fn summary(&self, segment: &str) -> String {
        let mut text = format!(
            "exported {} member{} of segment {segment}",
            self.written,
            plural(self.written)
        );
        if self.gone > 0 {
            text.push_str(&format!(
                "; left out {} whose profile was deleted meanwhile",
                self.gone
            ));
        }
        if self.incomplete > 0 {
            text.push_str(&format!(
                "; left out {} lacking a trait (--skip-incomplete)",
                self.incomplete
            ));
        }
        text
    }
}

fn plural(n: u64) -> &'static str {
    if n == 1 { "" } else { "s" }
}

/// Where members go, in the chosen format.
enum Out<W: Write> {
    Csv {
        /// Boxed: its buffers make it far larger than the other variant.
        writer: Box<csv::Writer<W>>,
        /// The traits in column order.
        columns: Vec<String>,
    },
    Jsonl(io::BufWriter<W>),
}

/// A member as a JSON line: the shape of the collector's `GET /v1/segments/{name}/members`.
#[derive(Serialize)]
struct MemberLine<'a> {
    id: &'a ProfileId,
    #[serde(with = "time::serde::rfc3339")]
    entered_at: OffsetDateTime,
    entered_at_ms: i64,
    traits: &'a BTreeMap<String, String>,
}

impl<W: Write> Out<W> {
    /// A CSV writer whose header row is written at once: the email column first, headed
    /// `email_header`.
    fn csv(inner: W, traits: &[String], email_header: &str) -> anyhow::Result<Self> {
        let mut columns: Vec<String> = traits.to_vec();
        if let Some(i) = columns.iter().position(|t| t == EMAIL_TRAIT) {
            let email = columns.remove(i);
            columns.insert(0, email);
        }
        let mut writer = csv::WriterBuilder::new()
            .terminator(csv::Terminator::CRLF)
            .from_writer(inner);
        let header = columns.iter().map(|c| {
            if c == EMAIL_TRAIT {
                email_header
            } else {
                c.as_str()
            }
        });
        writer
            .write_record(header)
            .context("writing the CSV header")?;
        Ok(Out::Csv {
            writer: Box::new(writer),
            columns,
        })
    }

    fn member(&mut self, member: &SegmentMember) -> anyhow::Result<()> {
        match self {
            Out::Csv { writer, columns } => {
                let row = columns
                    .iter()
                    .map(|c| member.traits.get(c).map_or("", String::as_str));
                writer.write_record(row).context("writing a CSV row")
            }
            Out::Jsonl(out) => {
                let line = MemberLine {
                    id: &member.id,
                    entered_at: member.entered_at,
                    // Entered-at times are whole milliseconds within ±10^4 years.
                    entered_at_ms: (member.entered_at.unix_timestamp_nanos() / 1_000_000) as i64,
                    traits: &member.traits,
                };
                serde_json::to_writer(&mut *out, &line).context("writing a JSON line")?;
                out.write_all(b"\n").context("writing a JSON line")
            }
        }
    }

    fn flush(&mut self) -> anyhow::Result<()> {
        match self {
            Out::Csv { writer, .. } => writer.flush(),
            Out::Jsonl(out) => out.flush(),
        }
        .context("writing to standard output")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use time::macros::datetime;

    fn member(id: &str, traits: &[(&str, &str)]) -> SegmentMember {
        SegmentMember {
            id: ProfileId::user(id).unwrap(),
            entered_at: datetime!(2026-11-29 12:00:00.5 UTC),
            traits: traits
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        }
    }

    fn names(list: &[&str]) -> Vec<String> {
        list.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn csv_puts_the_email_column_first_and_quotes_what_needs_it() {
        let traits = names(&["first_name", "email", "plan"]);
        let mut out = Out::csv(Vec::new(), &traits, "Email Address").unwrap();
        out.member(&member(
            "ada",
            &[
                ("email", "ada@example.com"),
                ("first_name", "Ada, \"the\" first"),
                ("plan", "line\nbreak"),
            ],
        ))
        .unwrap();
        out.member(&member("bob", &[("first_name", "Bob")]))
            .unwrap();
        let Out::Csv { writer, .. } = out else {
            unreachable!()
        };
        let text = String::from_utf8(writer.into_inner().unwrap()).unwrap();
        assert_eq!(
            text,
            "Email Address,first_name,plan\r\n\
             ada@example.com,\"Ada, \"\"the\"\" first\",\"line\nbreak\"\r\n\
             ,Bob,\r\n"
        );
    }

    #[test]
    fn json_lines_follow_the_api_shape() {
        let mut out: Out<Vec<u8>> = Out::Jsonl(io::BufWriter::new(Vec::new()));
        out.member(&member("ada", &[("email", "ada@example.com")]))
            .unwrap();
        let Out::Jsonl(buf) = out else { unreachable!() };
        assert_eq!(
            String::from_utf8(buf.into_inner().unwrap()).unwrap(),
            "{\"id\":\"u:ada\",\"entered_at\":\"2026-11-29T12:00:00.5Z\",\
             \"entered_at_ms\":1795953600500,\"traits\":{\"email\":\"ada@example.com\"}}\n"
        );
    }

    #[test]
    fn trait_names_are_trimmed_and_deduplicated() {
        assert_eq!(
            trait_names(&names(&["email", " first_name ", "email"])).unwrap(),
            names(&["email", "first_name"])
        );
        assert_eq!(
            trait_names(&names(&["email", " "]))
                .unwrap_err()
                .to_string(),
            "--traits: name 2 is empty"
        );
    }

    #[test]
    fn page_sizes_are_bounded() {
        assert_eq!(page_size("1").unwrap().get(), 1);
        assert_eq!(page_size("10000").unwrap().get(), 10_000);
        assert_eq!(
            page_size("0").unwrap_err(),
            "\"0\" is not a whole number from 1 to 10000"
        );
        assert!(page_size("10001").is_err());
        assert!(page_size("ten").is_err());
    }

    #[test]
    fn the_summary_counts_what_was_left_out() {
        let tally = Tally {
            written: 1,
            gone: 2,
            incomplete: 3,
        };
        assert_eq!(
            tally.summary("vip"),
            "exported 1 member of segment vip; left out 2 whose profile was deleted \
             meanwhile; left out 3 lacking a trait (--skip-incomplete)"
        );
        assert_eq!(
            Tally::default().summary("vip"),
            "exported 0 members of segment vip"
        );
    }
}

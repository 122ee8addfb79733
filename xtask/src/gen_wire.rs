//! `gen-wire`: regenerate the Rust code for `wire/schema/events.fbs` with the pinned flatc,
//! or check that the checked-in code is what that flatc generates.

use std::collections::BTreeSet;
use std::path::Path;
use std::process::Command;

use anyhow::{Context as _, bail};

use crate::process;
use crate::tools::{self, FLATC_INSTALL, FLATC_VERSION};
use crate::workspace::Workspace;

/// The schema, relative to the workspace root.
const SCHEMA: &str = "wire/schema/events.fbs";
/// Where the generated code is checked in, relative to the workspace root.
const GENERATED_DIR: &str = "wire/src/generated";

/// Regenerates into a temporary directory, then overwrites the checked-in files (or, with
/// `check`, fails if they differ).
///
/// # Errors
/// flatc is missing or another version, flatc fails, or (with `check`) the code differs.
pub fn run(check: bool) -> anyhow::Result<()> {
    let ws = Workspace::locate()?;
    let flatc = tools::require("flatc", FLATC_INSTALL)?;
    check_version(&flatc)?;

    let out = tempfile::tempdir().context("creating a temporary directory")?;
    // Same arguments, relative schema path included, as the documented command, so the
    // output is byte for byte what a developer gets by hand.
    process::run(
        Command::new(&flatc)
            .arg("--rust")
            .arg("-o")
            .arg(out.path())
            .arg(SCHEMA)
            .current_dir(&ws.root),
    )?;

    let checked_in = ws.root.join(GENERATED_DIR);
    let fresh = file_names(out.path())?;
    let old = file_names(&checked_in)?;
    let mut stale = Vec::new();
    for name in &fresh {
        let new = std::fs::read(out.path().join(name))?;
        let current = std::fs::read(checked_in.join(name)).ok();
        if current.as_deref() != Some(new.as_slice()) {
            stale.push(name.clone());
            if !check {
                std::fs::write(checked_in.join(name), &new)
                    .with_context(|| format!("writing {GENERATED_DIR}/{name}"))?;
            }
        }
    }
    // Files flatc no longer generates are left alone: the crate may hold hand-written ones.
    let unknown: Vec<_> = old.difference(&fresh).collect();
    if !unknown.is_empty() {
        eprintln!("note: {GENERATED_DIR} also holds files flatc did not generate: {unknown:?}");
    }

    match (check, stale.is_empty()) {
        (_, true) => {
            eprintln!("{GENERATED_DIR} is up to date with {SCHEMA} (flatc {FLATC_VERSION})")
        }
        (true, false) => bail!(
            "{GENERATED_DIR}/{} differs from what flatc {FLATC_VERSION} generates from {SCHEMA}; \
             run `cargo xtask gen-wire` and commit the result",
            stale.join(", ")
        ),
        (false, false) => eprintln!("regenerated {GENERATED_DIR}/{}", stale.join(", ")),
    }
    Ok(())
}

/// Requires `flatc --version` to report exactly [`FLATC_VERSION`]: other versions generate
/// code that does not match (or does not compile against) the pinned `flatbuffers` crate.
fn check_version(flatc: &Path) -> anyhow::Result<()> {
    let output = Command::new(flatc)
        .arg("--version")
        .output()
        .with_context(|| format!("running {} --version", flatc.display()))?;
    let stdout = String::from_utf8_lossy(&output.stdout);
    let version = stdout.trim().strip_prefix("flatc version ").map(str::trim);
    match version {
        Some(v) if output.status.success() && v == FLATC_VERSION => Ok(()),
        Some(v) if output.status.success() => bail!(
            "{} is flatc {v}, need exactly {FLATC_VERSION}; install it with: {FLATC_INSTALL}",
            flatc.display()
        ),
        _ => bail!(
            "{} --version did not report a flatc version ({}{}); install flatc {FLATC_VERSION} with: {FLATC_INSTALL}",
            flatc.display(),
            stdout.trim(),
            String::from_utf8_lossy(&output.stderr).trim()
        ),
    }
}

fn file_names(dir: &Path) -> anyhow::Result<BTreeSet<String>> {
    let mut names = BTreeSet::new();
    for entry in std::fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))? {
        let entry = entry?;
        if entry.file_type()?.is_file() {
            names.insert(entry.file_name().to_string_lossy().into_owned());
        }
    }
    Ok(names)
}

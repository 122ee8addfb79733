//! `test`: every suite, as a list of steps run in order until one fails, then a summary of
//! what ran, how long each step took, and the test counts.
//!
//! The end-to-end tests start the real binaries; they find them through `INGEST_BIN` and
//! `LOADGEN_BIN`, which point at the debug builds made by the first build step.

use std::io::{BufRead as _, BufReader, Write as _};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};

use crate::browser;
use crate::build_tracker;
use crate::process;
use crate::segment_clients;
use crate::tools;
use crate::workspace::Workspace;

/// Test counts, summed over libtest's `test result:` lines.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
struct Counts {
    passed: u64,
    failed: u64,
    ignored: u64,
}

impl Counts {
    fn add(&mut self, other: Counts) {
        self.passed += other.passed;
        self.failed += other.failed;
        self.ignored += other.ignored;
    }
}

/// One step of the run. Steps that run tests add to the counts they are given, failing
/// or not.
struct Step {
    name: &'static str,
    run: fn(&Workspace, &mut Counts) -> anyhow::Result<()>,
}

/// The steps, in order. Cheap checks first; each later step may rely on earlier ones.
const STEPS: &[Step] = &[
    Step {
        name: "tools (redis-server)",
        run: |_, _| tools::require_redis_server().map(|_| ()),
    },
    Step {
        name: "wire builds for wasm32-unknown-unknown",
        run: |ws, _| {
            tools::require_rust_target(tools::WASM_TARGET)?;
            let args = [
                "build",
                "-p",
                "wire",
                "--target",
                tools::WASM_TARGET,
                "--release",
            ];
            process::run(ws.cargo().args(args))
        },
    },
    Step {
        name: "browser test tools (chromium, node, npm ci)",
        run: |ws, _| browser::prepare(ws),
    },
    Step {
        name: "Segment client libraries (npm ci, pip install into a virtualenv)",
        run: |ws, _| segment_clients::prepare(ws),
    },
    // `cargo xtask build-tracker --check`: builds www/t, prints the sizes and fails when the
    // tracker is over its size budget or a page's inline snippet is stale. It compares and
    // never writes: CI tests a fresh clone, where rewriting the pages would hide a stale
    // committed one.
    Step {
        name: "build-tracker --check (www/t, size budget, inline snippets)",
        run: |_, _| build_tracker::run(true),
    },
    Step {
        name: "cargo build -p ingest --bins",
        run: |ws, _| process::run(ws.cargo().args(["build", "-p", "ingest", "--bins"])),
    },
    Step {
        name: "cargo test --workspace --all-targets",
        run: |ws, counts| {
            let mut cmd = ws.cargo();
            // --no-fail-fast: one failing suite must not hide the results of the others.
            cmd.args(["test", "--workspace", "--all-targets", "--no-fail-fast"])
                .env("INGEST_BIN", ws.bin("debug", "ingest"))
                .env("LOADGEN_BIN", ws.bin("debug", "loadgen"))
                .env("SEGMENT_PYTHON", segment_clients::python(ws));
            cargo_test(&mut cmd, counts)
        },
    },
    Step {
        name: "cargo test --workspace --doc",
        run: |ws, counts| {
            let args = ["test", "--workspace", "--doc", "--no-fail-fast"];
            cargo_test(ws.cargo().args(args), counts)
        },
    },
];

/// Runs [`STEPS`] and prints the summary.
///
/// # Errors
/// The first step that fails.
pub fn run() -> anyhow::Result<()> {
    let ws = Workspace::locate()?;
    let started = Instant::now();
    let mut results: Vec<(&str, Duration, Counts, anyhow::Result<()>)> = Vec::new();
    for step in STEPS {
        eprintln!("\n== {} ==", step.name);
        let t = Instant::now();
        let mut counts = Counts::default();
        let result = (step.run)(&ws, &mut counts);
        let failed = result.is_err();
        results.push((step.name, t.elapsed(), counts, result));
        if failed {
            break;
        }
    }

    let ran = results.len();
    let mut total = Counts::default();
    let mut error = None;
    println!("\nxtask test summary:");
    for (name, took, counts, result) in results {
        let secs = took.as_secs_f64();
        total.add(counts);
        let detail = if counts == Counts::default() {
            String::new()
        } else {
            format!(
                ": {} passed, {} failed, {} ignored",
                counts.passed, counts.failed, counts.ignored
            )
        };
        match result {
            Ok(()) => println!("  ok     {secs:>7.1}s  {name}{detail}"),
            Err(err) => {
                println!("  FAILED {secs:>7.1}s  {name}{detail}");
                error = Some(err.context(format!("step `{name}` failed")));
            }
        }
    }
    for step in &STEPS[ran..] {
        println!("  skipped           {}", step.name);
    }
    println!("total {:.1}s", started.elapsed().as_secs_f64());
    println!(
        "tests: {} passed, {} failed, {} skipped",
        total.passed, total.failed, total.ignored
    );
    match error {
        Some(err) => Err(err),
        None => Ok(()),
    }
}

/// Runs a `cargo test` command, passing its output through, and adds its `test result:`
/// lines to `counts`.
fn cargo_test(cmd: &mut Command, counts: &mut Counts) -> anyhow::Result<()> {
    let line = process::describe(cmd);
    eprintln!("$ {line}");
    let mut child = cmd
        .stdout(Stdio::piped())
        .spawn()
        .with_context(|| format!("starting `{line}`"))?;
    let stdout = child.stdout.take().context("no stdout pipe")?;
    let mut out = std::io::stdout();
    for text in BufReader::new(stdout).lines() {
        let text = text.context("reading cargo test output")?;
        writeln!(out, "{text}")?;
        if let Some(c) = parse_test_result(&text) {
            counts.add(c);
        }
    }
    let status = child.wait()?;
    if !status.success() {
        bail!("`{line}` failed ({status})");
    }
    Ok(())
}

/// Parses `test result: ok. 5 passed; 0 failed; 1 ignored; 0 measured; 0 filtered out; ...`.
fn parse_test_result(line: &str) -> Option<Counts> {
    let rest = line.trim().strip_prefix("test result: ")?;
    let (_, rest) = rest.split_once(". ")?;
    let mut counts = Counts::default();
    for part in rest.split(';') {
        let mut words = part.split_whitespace();
        let (Some(n), Some(what)) = (words.next(), words.next()) else {
            continue;
        };
        let Ok(n) = n.parse::<u64>() else { continue };
        match what {
            "passed" => counts.passed = n,
            "failed" => counts.failed = n,
            "ignored" => counts.ignored = n,
            _ => {}
        }
    }
    Some(counts)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn libtest_result_line_is_parsed() {
        let line = "test result: FAILED. 12 passed; 2 failed; 3 ignored; 0 measured; 4 filtered out; finished in 0.52s";
        assert_eq!(
            parse_test_result(line),
            Some(Counts {
                passed: 12,
                failed: 2,
                ignored: 3
            })
        );
        assert_eq!(parse_test_result("running 3 tests"), None);
    }
}

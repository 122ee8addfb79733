//! `cargo xtask`: the project's tasks, in Rust so they run the same on every machine.
//!
//! - [`gen_wire`]: regenerate (or check) the FlatBuffers code checked in under `wire`.
//! - [`build_tracker`]: the browser tracker into `www/t/`, with its gzip sizes, and its
//!   snippet inline in the demo pages.
//! - [`demo`]: the collector and a private Redis, serving the demo shop until Ctrl-C.
//! - [`test`]: every test suite, in order, with the binaries the end-to-end tests start.
//! - [`bench`]: the collector under load, next to a raw Redis baseline; `pz.track()` in a
//!   browser page, next to `dataLayer.push()`.
//! - [`workspace`], [`tools`], [`process`]: paths, required tools, child processes.

use std::ffi::OsString;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

mod bench;
mod browser;
mod build_tracker;
mod demo;
mod gen_wire;
mod process;
mod segment_clients;
mod test;
mod tools;
mod workspace;

/// Project tasks for the personalization pipeline.
#[derive(Parser)]
#[command(
    name = "xtask",
    bin_name = "cargo xtask",
    about,
    disable_version_flag = true
)]
struct Cli {
    #[command(subcommand)]
    task: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Regenerate wire/src/generated from wire/schema/events.fbs with flatc 25.12.19.
    GenWire {
        /// Fail if the checked-in code differs from what flatc generates, change nothing.
        #[arg(long)]
        check: bool,
    },
    /// Build the browser tracker into www/t/, print its gzip -9 sizes and write the minified
    /// snippet inline into the www/*.html pages that differ.
    ///
    /// Installs what it needs under target/tools on first use: the wasm32 target,
    /// wasm-bindgen-cli matching the wasm-bindgen crate, wasm-opt and terser from npm.
    BuildTracker {
        /// Change no page: fail when a page's inline snippet differs from the built one or
        /// when the files are over the size budget (`cargo xtask test` runs this).
        #[arg(long)]
        check: bool,
    },
    /// Build the tracker, then run the collector and a private Redis at
    /// http://127.0.0.1:8080 until Ctrl-C.
    ///
    /// Redis data is kept under target/demo/redis. With REDIS_URL set, that Redis is used
    /// instead and no redis-server is started.
    Demo,
    /// Build the tracker and the binaries, then run every test suite (end-to-end ones included).
    Test,
    /// Measure the collector under load against a raw pipelined-Redis baseline, then what
    /// `pz.track()` costs a demo page in headless Chromium against `dataLayer.push()`.
    ///
    /// Arguments after `--` go to the loadgen runs, e.g.
    /// `cargo xtask bench -- --events 50000 --concurrency 16`.
    Bench {
        /// Run one benchmark only.
        #[arg(long, value_enum)]
        only: Option<bench::Only>,
        /// Run Redis with this configuration file (e.g. `ingest/redis.conf`, append-only file
        /// fsynced every second) instead of without persistence.
        #[arg(long, value_name = "FILE")]
        redis_conf: Option<std::path::PathBuf>,
        /// Extra loadgen arguments (--events, --visitors, --batch, --concurrency, --seed).
        #[arg(last = true)]
        loadgen_args: Vec<OsString>,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.task {
        Task::GenWire { check } => gen_wire::run(check),
        Task::BuildTracker { check } => build_tracker::run(check),
        Task::Demo => demo::run(),
        Task::Test => test::run(),
        Task::Bench {
            only,
            redis_conf,
            loadgen_args,
        } => bench::run(only, redis_conf.as_deref(), &loadgen_args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("error: {err:#}");
            ExitCode::FAILURE
        }
    }
}

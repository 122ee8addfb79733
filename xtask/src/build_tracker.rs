//! `build-tracker`: builds the browser tracker into `www/t/` (`snippet.min.js`, `pz.js`,
//! `pz_bg.wasm`) and reports what a page loads, gzip -9.
//!
//! Tools are installed under `target/tools` on first use and reused while their versions
//! match: the wasm32 target (rustup), `wasm-bindgen-cli` of exactly the version of the
//! `wasm-bindgen` crate in `Cargo.lock` (`cargo install --root target/tools`), and the npm
//! packages pinned by `tracker-wasm/js/package-lock.json` (binaryen's `wasm-opt`, `terser`).

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context as _, bail};

use crate::process;
use crate::tools::{self, WASM_TARGET};
use crate::workspace::Workspace;

/// The cargo profile of the shipped wasm (size-optimised; see the root manifest).
const PROFILE: &str = "wasm-release";
/// Where the demo serves the tracker from, relative to the workspace root.
pub const OUT_DIR: &str = "www/t";
/// The most that snippet, JS glue and wasm together may weigh, gzip -9 (Snowplow's browser
/// tracker, the smallest peer with batching and consent, is 17.4 KB).
pub const TOTAL_BUDGET: u64 = 16 * 1024;
/// The most the minified snippet may weigh, uncompressed: it is inlined into every page.
pub const SNIPPET_BUDGET: u64 = 1024;
/// The size the tracker aims for, gzip -9.
pub const TOTAL_TARGET: u64 = 10 * 1024;
/// The wasm features rustc enables for wasm32 by default; wasm-opt must accept them.
const WASM_FEATURES: &[&str] = &[
    "--enable-bulk-memory",
    "--enable-nontrapping-float-to-int",
    "--enable-sign-ext",
    "--enable-mutable-globals",
    "--enable-reference-types",
    "--enable-multivalue",
];
const NPM_INSTALL: &str = "Node.js 18+ with npm (Debian: sudo apt-get install -y nodejs npm)";

/// One built file: name, bytes, gzip -9 bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Built {
    /// File name inside [`OUT_DIR`].
    pub name: &'static str,
    /// Size in bytes.
    pub raw: u64,
    /// Size after `gzip -9`.
    pub gzip: u64,
}

/// Builds the tracker, prints the sizes and returns them.
///
/// # Errors
/// A tool is missing or cannot be installed, or a build step fails.
pub fn run() -> anyhow::Result<Vec<Built>> {
    let ws = Workspace::locate()?;
    let built = build(&ws)?;
    print_sizes(&built);
    Ok(built)
}

/// Builds `www/t/` and returns the size of each file.
///
/// # Errors
/// A tool is missing or cannot be installed, or a build step fails.
pub fn build(ws: &Workspace) -> anyhow::Result<Vec<Built>> {
    tools::require_rust_target(WASM_TARGET)?;
    tools::require("gzip", "sudo apt-get install -y gzip")?;
    let wasm_bindgen = ensure_wasm_bindgen(ws)?;
    let npm_bin = ensure_npm_tools(ws)?;

    process::run(ws.cargo().args([
        "build",
        "-p",
        "tracker-wasm",
        "--target",
        WASM_TARGET,
        "--profile",
        PROFILE,
    ]))?;
    let wasm = ws
        .target_dir
        .join(WASM_TARGET)
        .join(PROFILE)
        .join("tracker_wasm.wasm");

    let work = ws.target_dir.join("tracker");
    let _ = std::fs::remove_dir_all(&work);
    std::fs::create_dir_all(&work).with_context(|| format!("creating {}", work.display()))?;
    // no-modules: a classic script, so the snippet can load it from any origin without
    // CORS, and its glue minifies smaller than --target web's (measured: 2.2 vs 2.4 KB).
    process::run(
        Command::new(&wasm_bindgen)
            .args([
                "--target",
                "no-modules",
                "--no-typescript",
                "--out-name",
                "pz",
                "--out-dir",
            ])
            .arg(&work)
            .arg(&wasm),
    )?;

    let out = ws.root.join(OUT_DIR);
    std::fs::create_dir_all(&out).with_context(|| format!("creating {}", out.display()))?;
    process::run(
        Command::new(npm_bin.join("wasm-opt"))
            .arg("-Oz")
            .args(WASM_FEATURES)
            .arg(work.join("pz_bg.wasm"))
            .arg("-o")
            .arg(out.join("pz_bg.wasm")),
    )?;

    // pz.js: the glue and the loader in one function scope, so that nothing but `pz` is
    // global (the glue's own `let wasm_bindgen` would clash with a page that has one).
    let glue = read(&work.join("pz.js"))?;
    let loader = read(&ws.root.join("tracker-wasm/js/loader.js"))?;
    let combined = work.join("pz.full.js");
    write(
        &combined,
        &format!("(function () {{\n{glue}\n{loader}\n}})();\n"),
    )?;
    minify(&npm_bin, &combined, &out.join("pz.js"))?;
    minify(
        &npm_bin,
        &ws.root.join("tracker-wasm/snippet.js"),
        &out.join("snippet.min.js"),
    )?;
    write(
        &out.join(".gitignore"),
        "# Built by `cargo xtask build-tracker` (which `cargo xtask demo` and `test` run).\n*\n!.gitignore\n",
    )?;

    measure(ws)
}

/// The sizes of the files in `www/t/` as built last.
///
/// # Errors
/// A file is missing (the tracker was not built) or gzip fails.
pub fn measure(ws: &Workspace) -> anyhow::Result<Vec<Built>> {
    let out = ws.root.join(OUT_DIR);
    ["snippet.min.js", "pz.js", "pz_bg.wasm"]
        .into_iter()
        .map(|name| {
            let path = out.join(name);
            Ok(Built {
                name,
                raw: std::fs::metadata(&path)
                    .with_context(|| format!("reading {}", path.display()))?
                    .len(),
                gzip: gzip_size(&path)?,
            })
        })
        .collect()
}

/// Prints the size table.
pub fn print_sizes(built: &[Built]) {
    println!("\ntracker files in {OUT_DIR}/ (what a page loads):");
    for b in built {
        println!("  {:<16} {:>7} bytes  {:>6} gzip -9", b.name, b.raw, b.gzip);
    }
    let total: u64 = built.iter().map(|b| b.gzip).sum();
    println!(
        "  {:<16} {:>7}        {:>6} gzip -9  (budget {TOTAL_BUDGET}, target {TOTAL_TARGET})",
        "total", "", total
    );
}

/// Fails when the files are over budget: snippet + glue + wasm above [`TOTAL_BUDGET`]
/// gzip -9, or the minified snippet above [`SNIPPET_BUDGET`].
///
/// # Errors
/// As above, with the figures.
pub fn check_budget(built: &[Built]) -> anyhow::Result<()> {
    let total: u64 = built.iter().map(|b| b.gzip).sum();
    let mut problems = Vec::new();
    if total > TOTAL_BUDGET {
        problems.push(format!(
            "snippet + pz.js + pz_bg.wasm are {total} bytes gzip -9, budget {TOTAL_BUDGET}"
        ));
    }
    if let Some(s) = built.iter().find(|b| b.name == "snippet.min.js")
        && s.raw > SNIPPET_BUDGET
    {
        problems.push(format!(
            "snippet.min.js is {} bytes, budget {SNIPPET_BUDGET}",
            s.raw
        ));
    }
    if problems.is_empty() {
        Ok(())
    } else {
        bail!("tracker over its size budget: {}", problems.join("; "))
    }
}

/// The version of the `wasm-bindgen` crate in `Cargo.lock`: the CLI must match it exactly.
fn locked_wasm_bindgen_version(ws: &Workspace) -> anyhow::Result<String> {
    let lock = read(&ws.root.join("Cargo.lock"))?;
    locked_version(&lock, "wasm-bindgen").context("Cargo.lock has no wasm-bindgen package")
}

/// The version of package `name` in a `Cargo.lock` text.
fn locked_version(lock: &str, name: &str) -> Option<String> {
    let wanted = format!("name = \"{name}\"");
    let mut lines = lock.lines();
    while let Some(line) = lines.next() {
        if line.trim() == wanted {
            let version = lines.next()?.trim().strip_prefix("version = \"")?;
            return Some(version.trim_end_matches('"').to_string());
        }
    }
    None
}

/// `target/tools/bin/wasm-bindgen` of the locked version, installed when missing or another
/// version.
fn ensure_wasm_bindgen(ws: &Workspace) -> anyhow::Result<PathBuf> {
    let version = locked_wasm_bindgen_version(ws)?;
    let root = ws.target_dir.join("tools");
    let bin = root.join("bin").join("wasm-bindgen");
    let installed = Command::new(&bin)
        .arg("--version")
        .output()
        .ok()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string());
    if installed.as_deref() == Some(format!("wasm-bindgen {version}").as_str()) {
        return Ok(bin);
    }
    eprintln!(
        "installing wasm-bindgen-cli {version} into {} (a few minutes, once)",
        root.display()
    );
    process::run(
        ws.cargo()
            .args(["install", "wasm-bindgen-cli", "--force", "--version"])
            .arg(format!("={version}"))
            .arg("--root")
            .arg(&root),
    )?;
    Ok(bin)
}

/// `target/tools/npm/node_modules/.bin`, with the packages of
/// `tracker-wasm/js/package-lock.json` installed (`npm ci`) unless already there.
fn ensure_npm_tools(ws: &Workspace) -> anyhow::Result<PathBuf> {
    let dir = ws.target_dir.join("tools").join("npm");
    let bin = dir.join("node_modules").join(".bin");
    let source = ws.root.join("tracker-wasm").join("js");
    let lock = read(&source.join("package-lock.json"))?;
    let current = std::fs::read_to_string(dir.join("package-lock.json")).ok();
    if current.as_deref() == Some(lock.as_str())
        && bin.join("wasm-opt").exists()
        && bin.join("terser").exists()
    {
        return Ok(bin);
    }
    let npm = tools::require("npm", NPM_INSTALL)?;
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    for file in ["package.json", "package-lock.json"] {
        std::fs::copy(source.join(file), dir.join(file))
            .with_context(|| format!("copying {file} to {}", dir.display()))?;
    }
    process::run(
        Command::new(npm)
            .args(["ci", "--no-audit", "--no-fund"])
            .current_dir(&dir),
    )?;
    Ok(bin)
}

fn minify(npm_bin: &Path, input: &Path, output: &Path) -> anyhow::Result<()> {
    process::run(
        Command::new(npm_bin.join("terser"))
            .arg(input)
            .args(["--compress", "passes=2", "--mangle", "--output"])
            .arg(output),
    )
}

/// The size of `path` after `gzip -9`.
fn gzip_size(path: &Path) -> anyhow::Result<u64> {
    let out = Command::new("gzip")
        .args(["-9", "-c"])
        .arg(path)
        .output()
        .with_context(|| format!("running gzip on {}", path.display()))?;
    if !out.status.success() {
        bail!("gzip -9 {} failed ({})", path.display(), out.status);
    }
    Ok(out.stdout.len() as u64)
}

fn read(path: &Path) -> anyhow::Result<String> {
    std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))
}

fn write(path: &Path, text: &str) -> anyhow::Result<()> {
    std::fs::write(path, text).with_context(|| format!("writing {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_locked_version_is_found() {
        let lock = "[[package]]\nname = \"wasm-bindgen-macro\"\nversion = \"0.2.1\"\n\n\
                    [[package]]\nname = \"wasm-bindgen\"\nversion = \"0.2.130\"\nsource = \"x\"\n";
        assert_eq!(
            locked_version(lock, "wasm-bindgen").as_deref(),
            Some("0.2.130")
        );
        assert_eq!(locked_version(lock, "web-sys"), None);
    }

    fn built(snippet: u64, gzips: [u64; 3]) -> Vec<Built> {
        vec![
            Built {
                name: "snippet.min.js",
                raw: snippet,
                gzip: gzips[0],
            },
            Built {
                name: "pz.js",
                raw: 1,
                gzip: gzips[1],
            },
            Built {
                name: "pz_bg.wasm",
                raw: 1,
                gzip: gzips[2],
            },
        ]
    }

    #[test]
    fn the_budget_counts_all_three_files_and_the_raw_snippet() {
        assert!(check_budget(&built(1024, [400, 2000, 13_984])).is_ok());
        let err = check_budget(&built(1024, [400, 2000, 13_985])).unwrap_err();
        assert_eq!(
            err.to_string(),
            "tracker over its size budget: snippet + pz.js + pz_bg.wasm are 16385 bytes gzip -9, budget 16384"
        );
        let err = check_budget(&built(1025, [400, 2000, 1000])).unwrap_err();
        assert_eq!(
            err.to_string(),
            "tracker over its size budget: snippet.min.js is 1025 bytes, budget 1024"
        );
    }
}

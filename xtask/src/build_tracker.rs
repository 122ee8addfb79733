//! `build-tracker`: builds the browser tracker into `www/t/` (`snippet.min.js`, `pz.js`,
//! `pz_bg.wasm`), inlines the minified snippet into the demo pages and reports what a page
//! loads, gzip -9.
//!
//! Every demo page (`www/*.html`) carries the snippet inline, in a block between
//! `<!-- pz tracker snippet: BEGIN ... -->` and `<!-- pz tracker snippet: END -->`: the
//! markers, `<script>` + `www/t/snippet.min.js` + `</script>`, and the page's `pz.init` call.
//! The pages are committed with that block, so they work as they are; terser is pinned, so
//! the same `snippet.js` always gives the same block.
//!
//! Who writes the block and who only compares:
//! - `cargo xtask build-tracker` and `cargo xtask demo` rewrite the blocks that differ
//!   ([`Pages::Write`]), so a developer who changes `snippet.js` just rebuilds and commits.
//! - `cargo xtask build-tracker --check` and `cargo xtask test` change no page: they compare
//!   ([`Pages::Check`]) and fail naming the stale pages and the command that fixes them. CI
//!   runs `cargo xtask test` on a fresh clone; if the test run rewrote the pages it would test
//!   the fresh block and a stale committed page would pass unnoticed.
//!
//! `www/t/` is not committed and is rebuilt every time, `snippet.min.js` included (the size
//! report measures it, and a site can copy it from there). `--check` also enforces the size
//! budget; `cargo xtask test` runs it as one of its steps.
//!
//! Tools are installed under `target/tools` on first use and reused while their versions
//! match: the wasm32 target (rustup), `wasm-bindgen-cli` of exactly the version of the
//! `wasm-bindgen` crate in `Cargo.lock` (`cargo install --root target/tools`), and the npm
//! packages pinned by `tracker-wasm/js/package-lock.json` (binaryen's `wasm-opt`, `terser`).

use std::fmt;
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
/// The demo pages, relative to the workspace root: every `*.html` file in it has a snippet block.
const PAGES_DIR: &str = "www";
/// How a page's snippet block starts; the rest of that comment is rewritten with the block.
const BEGIN_MARKER: &str = "<!-- pz tracker snippet: BEGIN";
/// How a page's snippet block ends.
const END_MARKER: &str = "<!-- pz tracker snippet: END -->";
/// The first line of the block as written.
const BEGIN_LINE: &str = "<!-- pz tracker snippet: BEGIN (written by cargo xtask build-tracker \
                          from tracker-wasm/snippet.js; edit that, not this) -->";
/// The demo pages' init call, the same on every page, right after the snippet (which defines
/// `pz`, so no guard is needed).
const PAGE_INIT: &str = "<script>pz.init({writeKey: 'demo', endpoint: '/v1/fb'});</script>";

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

/// `cargo xtask build-tracker [--check]`: builds `www/t/` and prints the sizes, then writes
/// the pages' snippet blocks that differ; with `check`, changes no page and fails when a
/// block is stale or the tracker is over its size budget (reporting both).
///
/// # Errors
/// A tool is missing or cannot be installed, a build step fails, a page has no snippet
/// block, or (with `check`) as above.
pub fn run(check: bool) -> anyhow::Result<()> {
    let ws = Workspace::locate()?;
    let built = build_files(&ws)?;
    print_sizes(&built);
    if !check {
        return inline_snippet(&ws, Pages::Write);
    }
    let mut problems: Vec<anyhow::Error> =
        [inline_snippet(&ws, Pages::Check), check_budget(&built)]
            .into_iter()
            .filter_map(Result::err)
            .collect();
    match problems.len() {
        0 => Ok(()),
        1 => Err(problems.remove(0)),
        n => {
            let list: Vec<String> = problems.iter().map(|p| format!("  - {p:#}")).collect();
            bail!("{n} problems:\n{}", list.join("\n"))
        }
    }
}

/// Builds `www/t/`, writes the pages' snippet blocks that differ, and returns the size of
/// each file: a developer's build (`cargo xtask demo`).
///
/// # Errors
/// A tool is missing or cannot be installed, a build step fails, or a page has no snippet
/// block.
pub fn build(ws: &Workspace) -> anyhow::Result<Vec<Built>> {
    let built = build_files(ws)?;
    inline_snippet(ws, Pages::Write)?;
    Ok(built)
}

/// Builds `www/t/` and returns the size of each file; the pages are left alone.
///
/// # Errors
/// A tool is missing or cannot be installed, or a build step fails.
pub fn build_files(ws: &Workspace) -> anyhow::Result<Vec<Built>> {
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
                // Every browser that runs wasm with reference types has encodeInto: no
                // fallback path in the glue.
                "--encode-into",
                "always",
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
            // Flattening and re-running the relooper before -Oz, then -Oz again until nothing
            // changes: about 1% smaller, gzip, than -Oz alone on this module.
            .args(["--flatten", "--rereloop", "-Oz", "-Oz", "--converge"])
            .args(WASM_FEATURES)
            // Metadata no browser reads: the toolchain versions and the feature list.
            .args(["--strip-producers", "--strip-target-features"])
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

/// What [`inline_snippet`] does with a page whose snippet block differs from the built one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pages {
    /// Rewrite the block (only pages that change are written).
    Write,
    /// Change nothing; fail naming the stale pages.
    Check,
}

/// Puts the snippet built last (`www/t/snippet.min.js`) inline into the snippet block of
/// every `www/*.html` page, or with [`Pages::Check`] checks that it is already there.
///
/// # Errors
/// The snippet has not been built, a page has no block or a broken one (the error names
/// the page), or, with [`Pages::Check`], some blocks differ (the error names the pages and
/// the command that rewrites them).
pub fn inline_snippet(ws: &Workspace, mode: Pages) -> anyhow::Result<()> {
    let minified = read(&ws.root.join(OUT_DIR).join("snippet.min.js"))?;
    update_pages(&ws.root, &snippet_block(&minified)?, mode)
}

/// [`inline_snippet`] on the pages under `root`, with the block to write.
fn update_pages(root: &Path, block: &str, mode: Pages) -> anyhow::Result<()> {
    let dir = root.join(PAGES_DIR);
    let mut pages = Vec::new();
    for entry in std::fs::read_dir(&dir).with_context(|| format!("reading {}", dir.display()))? {
        let path = entry
            .with_context(|| format!("reading {}", dir.display()))?
            .path();
        if path.extension().is_some_and(|e| e == "html") {
            pages.push(path);
        }
    }
    if pages.is_empty() {
        bail!("{PAGES_DIR}/ has no .html pages to put the tracker snippet in");
    }
    pages.sort();

    // Every page is read and rewritten in memory first, so a broken page stops all writes.
    let mut stale = Vec::new();
    for path in pages {
        let name = path
            .strip_prefix(root)
            .unwrap_or(&path)
            .display()
            .to_string();
        let page = read(&path)?;
        let updated = replace_block(&page, block).with_context(|| name.clone())?;
        if updated != page {
            stale.push((path, name, updated));
        }
    }
    match mode {
        Pages::Write => {
            for (path, name, updated) in stale {
                write(&path, &updated)?;
                println!("updated the tracker snippet in {name}");
            }
            Ok(())
        }
        Pages::Check if stale.is_empty() => Ok(()),
        Pages::Check => {
            let names: Vec<&str> = stale.iter().map(|(_, name, _)| name.as_str()).collect();
            bail!(
                "stale tracker snippet in {} (not what `cargo xtask build-tracker` writes from \
                 tracker-wasm/snippet.js): run `cargo xtask build-tracker` and commit the result",
                names.join(", ")
            )
        }
    }
}

/// The snippet block of every page: the markers around the minified snippet, inline, and
/// the init call.
///
/// # Errors
/// The snippet contains text that would end or disturb an inline `<script>` element.
fn snippet_block(minified: &str) -> anyhow::Result<String> {
    let code = minified.trim();
    // An HTML parser ends a script element at the first `</script`, whatever the JS means
    // there, and `<!--` in a script changes how it looks for that end.
    let lower = code.to_ascii_lowercase();
    if lower.contains("</script") || code.contains("<!--") {
        bail!("snippet.min.js contains `</script` or `<!--`, so it cannot be inlined in a page");
    }
    Ok(format!(
        "{BEGIN_LINE}\n<script>{code}</script>\n{PAGE_INIT}\n{END_MARKER}"
    ))
}

/// Why a page's snippet block cannot be found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum BlockError {
    /// No BEGIN marker.
    NoBegin,
    /// A BEGIN marker with no END marker after it.
    NoEnd,
    /// More than one BEGIN marker.
    TwoBegins,
}

impl fmt::Display for BlockError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            BlockError::NoBegin => write!(f, "no `{BEGIN_MARKER} -->` marker"),
            BlockError::NoEnd => write!(
                f,
                "`{BEGIN_MARKER} -->` marker with no `{END_MARKER}` after it"
            ),
            BlockError::TwoBegins => write!(f, "more than one `{BEGIN_MARKER} -->` marker"),
        }
    }
}

impl std::error::Error for BlockError {}

/// `page` with its snippet block, from the start of the BEGIN marker to the end of the END
/// marker, replaced by `block`. Everything else is kept byte for byte.
fn replace_block(page: &str, block: &str) -> Result<String, BlockError> {
    let start = page.find(BEGIN_MARKER).ok_or(BlockError::NoBegin)?;
    let rest = &page[start + BEGIN_MARKER.len()..];
    if rest.contains(BEGIN_MARKER) {
        return Err(BlockError::TwoBegins);
    }
    let end = page.len() - rest.len()
        + rest.find(END_MARKER).ok_or(BlockError::NoEnd)?
        + END_MARKER.len();
    Ok(format!("{}{block}{}", &page[..start], &page[end..]))
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

    const MINIFIED: &str = "!function(w){w.pz={}}(window);\n";

    fn page(block: &str) -> String {
        format!(
            "<head>\n<title>x</title>\n{block}\n<link rel=\"stylesheet\" href=\"a.css\">\n</head>\n"
        )
    }

    const OLD_BLOCK: &str = "<!-- pz tracker snippet: BEGIN (the same two lines on every page) -->\n\
                             <script src=\"/t/snippet.min.js\"></script>\n\
                             <script>window.pz && pz.init({writeKey: 'demo', endpoint: '/v1/fb'});</script>\n\
                             <!-- pz tracker snippet: END -->";

    #[test]
    fn the_block_is_the_snippet_inline_then_the_init_call() {
        assert_eq!(
            snippet_block(MINIFIED).unwrap(),
            "<!-- pz tracker snippet: BEGIN (written by cargo xtask build-tracker from \
             tracker-wasm/snippet.js; edit that, not this) -->\n\
             <script>!function(w){w.pz={}}(window);</script>\n\
             <script>pz.init({writeKey: 'demo', endpoint: '/v1/fb'});</script>\n\
             <!-- pz tracker snippet: END -->"
        );
    }

    #[test]
    fn a_snippet_that_would_end_its_script_element_is_refused() {
        for code in ["var s='</SCRIPT>';", "var s='<!--';"] {
            let err = snippet_block(code).unwrap_err();
            assert_eq!(
                err.to_string(),
                "snippet.min.js contains `</script` or `<!--`, so it cannot be inlined in a page"
            );
        }
    }

    #[test]
    fn only_the_text_from_begin_to_end_marker_is_replaced() {
        let block = snippet_block(MINIFIED).unwrap();
        assert_eq!(
            replace_block(&page(OLD_BLOCK), &block).unwrap(),
            page(&block)
        );
        // Text before the marker on its line (indentation) and after END stays.
        assert_eq!(
            replace_block(
                "  <!-- pz tracker snippet: BEGIN --> old <!-- pz tracker snippet: END --> after",
                "NEW"
            )
            .unwrap(),
            "  NEW after"
        );
    }

    #[test]
    fn rewriting_is_idempotent() {
        let block = snippet_block(MINIFIED).unwrap();
        let once = replace_block(&page(OLD_BLOCK), &block).unwrap();
        assert_eq!(replace_block(&once, &block).unwrap(), once);
    }

    #[test]
    fn a_page_without_a_whole_block_is_an_error() {
        let block = "NEW";
        assert_eq!(
            replace_block("<head></head>", block),
            Err(BlockError::NoBegin)
        );
        assert_eq!(
            replace_block(
                "<!-- pz tracker snippet: END --><!-- pz tracker snippet: BEGIN -->",
                block
            ),
            Err(BlockError::NoEnd)
        );
        assert_eq!(
            replace_block(
                &page(OLD_BLOCK).replace("<!-- pz tracker snippet: END -->", ""),
                block
            ),
            Err(BlockError::NoEnd)
        );
        assert_eq!(
            replace_block(&format!("{OLD_BLOCK}\n{OLD_BLOCK}"), block),
            Err(BlockError::TwoBegins)
        );
        assert_eq!(
            BlockError::NoEnd.to_string(),
            "`<!-- pz tracker snippet: BEGIN -->` marker with no `<!-- pz tracker snippet: END -->` after it"
        );
    }

    /// A workspace root with `www/` holding `pages` (name, text) and a stylesheet.
    fn site(pages: &[(&str, &str)]) -> tempfile::TempDir {
        let root = tempfile::tempdir().unwrap();
        let www = root.path().join("www");
        std::fs::create_dir(&www).unwrap();
        std::fs::write(www.join("styles.css"), "p {}").unwrap();
        for (name, text) in pages {
            std::fs::write(www.join(name), text).unwrap();
        }
        root
    }

    fn mtime(path: &Path) -> std::time::SystemTime {
        std::fs::metadata(path).unwrap().modified().unwrap()
    }

    #[test]
    fn check_names_the_stale_pages_and_changes_nothing() {
        let block = snippet_block(MINIFIED).unwrap();
        let (stale, current) = (page(OLD_BLOCK), page(&block));
        let root = site(&[("b.html", &stale), ("a.html", &current), ("c.html", &stale)]);
        let err = update_pages(root.path(), &block, Pages::Check).unwrap_err();
        assert_eq!(
            format!("{err:#}"),
            "stale tracker snippet in www/b.html, www/c.html (not what `cargo xtask build-tracker` \
             writes from tracker-wasm/snippet.js): run `cargo xtask build-tracker` and commit the result"
        );
        let read_page =
            |name: &str| std::fs::read_to_string(root.path().join("www").join(name)).unwrap();
        assert_eq!(read_page("b.html"), stale);
        assert_eq!(read_page("c.html"), stale);
    }

    #[test]
    fn write_rewrites_only_the_stale_pages_then_check_passes() {
        let block = snippet_block(MINIFIED).unwrap();
        let current = page(&block);
        let root = site(&[("a.html", &current), ("b.html", &page(OLD_BLOCK))]);
        let www = root.path().join("www");
        let long_ago =
            std::time::SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(1_000_000);
        std::fs::File::options()
            .write(true)
            .open(www.join("a.html"))
            .unwrap()
            .set_modified(long_ago)
            .unwrap();

        update_pages(root.path(), &block, Pages::Write).unwrap();
        assert_eq!(
            std::fs::read_to_string(www.join("b.html")).unwrap(),
            current
        );
        assert_eq!(
            mtime(&www.join("a.html")),
            long_ago,
            "a current page is not written"
        );
        update_pages(root.path(), &block, Pages::Check).unwrap();
    }

    #[test]
    fn a_page_without_markers_is_named() {
        let block = snippet_block(MINIFIED).unwrap();
        let root = site(&[("a.html", &page(OLD_BLOCK)), ("bad.html", "<head></head>")]);
        for mode in [Pages::Write, Pages::Check] {
            let err = update_pages(root.path(), &block, mode).unwrap_err();
            assert_eq!(
                format!("{err:#}"),
                "www/bad.html: no `<!-- pz tracker snippet: BEGIN -->` marker"
            );
        }
        let a = std::fs::read_to_string(root.path().join("www/a.html")).unwrap();
        assert_eq!(
            a,
            page(OLD_BLOCK),
            "a broken page stops the rewrite of all pages"
        );
        let empty = site(&[]);
        let err = update_pages(empty.path(), &block, Pages::Write).unwrap_err();
        assert_eq!(
            err.to_string(),
            "www/ has no .html pages to put the tracker snippet in"
        );
    }
}

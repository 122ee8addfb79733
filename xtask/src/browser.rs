//! What the browser end-to-end tests need: Debian's Chromium (a system package, so only
//! checked, with the install command) and playwright-core from npm (installed here, pinned
//! by `tests/browser/package-lock.json`).

use std::path::Path;

use anyhow::Context as _;

use crate::process;
use crate::tools;
use crate::workspace::Workspace;

/// How to install Chromium on the project's machines (Debian).
pub const CHROMIUM_INSTALL: &str = "sudo apt-get install -y chromium chromium-driver";
/// How to install Node.js and npm (Debian).
pub const NODE_INSTALL: &str = "sudo apt-get install -y nodejs npm";

/// Checks Chromium and Node.js, then installs the pinned npm packages of the browser suite.
///
/// # Errors
/// A system package is missing (the message says how to install it), or `npm ci` fails.
pub fn prepare(ws: &Workspace) -> anyhow::Result<()> {
    tools::require("chromium", CHROMIUM_INSTALL)?;
    tools::require("node", NODE_INSTALL)?;
    npm_ci(ws)
}

/// As [`prepare`], but runs `npm ci` only when the installed packages differ from the lock
/// file: `npm ci` empties `node_modules` first, which would pull it from under a browser
/// suite already running from the same checkout.
///
/// # Errors
/// A system package is missing (the message says how to install it), or `npm ci` fails.
pub fn prepare_if_stale(ws: &Workspace) -> anyhow::Result<()> {
    tools::require("chromium", CHROMIUM_INSTALL)?;
    tools::require("node", NODE_INSTALL)?;
    if installed_as_locked(&ws.root.join("tests/browser")) {
        return Ok(());
    }
    npm_ci(ws)
}

/// Whether every package in `suite`'s `package-lock.json` is installed at the locked version,
/// according to the record npm keeps in `node_modules/.package-lock.json`.
pub fn installed_as_locked(suite: &Path) -> bool {
    let read = |path: &Path| -> Option<serde_json::Value> {
        serde_json::from_str(&std::fs::read_to_string(path).ok()?).ok()
    };
    let (Some(lock), Some(installed)) = (
        read(&suite.join("package-lock.json")),
        read(&suite.join("node_modules/.package-lock.json")),
    ) else {
        return false;
    };
    let (Some(wanted), Some(have)) = (
        lock["packages"].as_object(),
        installed["packages"].as_object(),
    ) else {
        return false;
    };
    // The "" entry is the suite itself, not an installed package.
    wanted
        .iter()
        .filter(|(name, _)| !name.is_empty())
        .all(|(name, want)| {
            have.get(name).is_some_and(|got| {
                got["version"] == want["version"] && got["integrity"] == want["integrity"]
            })
        })
}

/// `npm ci` in the browser suite.
fn npm_ci(ws: &Workspace) -> anyhow::Result<()> {
    let npm = tools::require("npm", NODE_INSTALL)?;
    let suite = ws.root.join("tests/browser");
    process::run(
        std::process::Command::new(npm)
            .args(["ci", "--no-audit", "--no-fund", "--loglevel=error"])
            .current_dir(&suite),
    )
    .with_context(|| {
        format!(
            "installing the browser tests' npm packages in {}",
            suite.display()
        )
    })
}

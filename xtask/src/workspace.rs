//! Where things are: the workspace root, the (possibly shared) target directory, cargo.

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{Context as _, bail};

/// The workspace, as cargo sees it.
pub struct Workspace {
    /// The directory holding the root `Cargo.toml`.
    pub root: PathBuf,
    /// Absolute path of the target directory (honours `CARGO_TARGET_DIR` and cargo config).
    pub target_dir: PathBuf,
    cargo: OsString,
}

impl Workspace {
    /// Finds the workspace root from this crate's location and asks cargo for the target
    /// directory.
    ///
    /// # Errors
    /// `cargo metadata` fails or answers something unexpected.
    pub fn locate() -> anyhow::Result<Workspace> {
        let root = Path::new(env!("CARGO_MANIFEST_DIR"))
            .parent()
            .context("xtask has no parent directory")?
            .to_path_buf();
        // `cargo xtask` runs us through cargo, which tells us which cargo it is.
        let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
        let output = Command::new(&cargo)
            .args([
                "metadata",
                "--format-version",
                "1",
                "--no-deps",
                "--offline",
            ])
            .current_dir(&root)
            .stderr(Stdio::inherit())
            .output()
            .context("running cargo metadata")?;
        if !output.status.success() {
            bail!("cargo metadata failed ({})", output.status);
        }
        let metadata: serde_json::Value =
            serde_json::from_slice(&output.stdout).context("parsing cargo metadata")?;
        let target_dir = metadata["target_directory"]
            .as_str()
            .context("cargo metadata has no target_directory")?
            .into();
        Ok(Workspace {
            root,
            target_dir,
            cargo,
        })
    }

    /// A `cargo` command run from the workspace root.
    pub fn cargo(&self) -> Command {
        let mut cmd = Command::new(&self.cargo);
        cmd.current_dir(&self.root);
        cmd
    }

    /// The path of binary `name` built with `profile` (`debug` or `release`).
    pub fn bin(&self, profile: &str, name: &str) -> PathBuf {
        self.target_dir.join(profile).join(name)
    }
}

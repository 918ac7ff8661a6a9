//! Support for the end-to-end tests in `tests/`: the project's binaries, built once per run.

use std::{path::PathBuf, process::Command, sync::OnceLock};

/// Path of a workspace binary (`sync-daemon`, `lab-api`), built on first use with the same
/// cargo and profile as the tests, so plain `cargo test` never runs a stale binary.
pub fn binary(name: &str) -> PathBuf {
    static BUILT: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    let dir = BUILT
        .get_or_init(|| {
            let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
            let out = Command::new(cargo)
                .args(["build", "--quiet", "-p", "sync-daemon", "-p", "lab-api"])
                .output()
                .map_err(|e| format!("cannot run cargo: {e}"))?;
            if !out.status.success() {
                return Err(format!(
                    "cargo build failed:\n{}",
                    String::from_utf8_lossy(&out.stderr)
                ));
            }
            // The test executable lives in target/<profile>/deps/.
            let exe = std::env::current_exe().map_err(|e| e.to_string())?;
            exe.parent()
                .and_then(|deps| deps.parent())
                .map(PathBuf::from)
                .ok_or_else(|| "cannot locate the target directory".to_owned())
        })
        .as_ref()
        .unwrap_or_else(|e| panic!("{e}"));
    let path = dir.join(name);
    assert!(path.is_file(), "{} was not built", path.display());
    path
}

/// A command for a project binary with a clean environment: no `CML_LABS_*` leaks in from the
/// developer's shell.
pub fn command(name: &str) -> Command {
    let mut cmd = Command::new(binary(name));
    cmd.env_clear();
    for key in ["PATH", "HOME", "TMPDIR"] {
        if let Ok(v) = std::env::var(key) {
            cmd.env(key, v);
        }
    }
    cmd
}

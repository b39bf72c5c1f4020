//! Helpers for the cluster-level tests in `tests/`: where the `switchyard` binary and the
//! reference fixtures are, and a child process that is killed when dropped.

use std::{
    path::{Path, PathBuf},
    process::{Child, Command, Output},
};

/// The `switchyard` binary of this build (`SWITCHYARD_BIN` overrides). The test script builds
/// it before the tests run; `cargo test` alone does not build other packages' binaries.
#[must_use]
pub fn bin() -> PathBuf {
    if let Some(p) = std::env::var_os("SWITCHYARD_BIN") {
        return PathBuf::from(p);
    }
    // target/<profile>/deps/<test-binary> → target/<profile>/switchyard
    let exe = std::env::current_exe().expect("the test binary knows its own path");
    let profile_dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("test binaries live in target/<profile>/deps");
    let bin = profile_dir.join("switchyard");
    assert!(
        bin.exists(),
        "{} not found: build it first (`cargo build -p switchyard`), or set SWITCHYARD_BIN",
        bin.display()
    );
    bin
}

/// The reference fixtures (`SWITCHYARD_FIXTURES` overrides; default `../shared/fixtures`).
#[must_use]
pub fn fixtures() -> PathBuf {
    let dir = std::env::var_os("SWITCHYARD_FIXTURES")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../../shared/fixtures"));
    assert!(
        dir.join("tiny-mixtral/golden.json").exists(),
        "reference fixtures not found at {} (set SWITCHYARD_FIXTURES)",
        dir.display()
    );
    dir
}

/// Runs `switchyard args...` to completion.
pub fn run(args: &[&str]) -> Output {
    Command::new(bin())
        .args(args)
        .env("SWITCHYARD_THREADS", "2")
        .output()
        .expect("switchyard binary runs")
}

/// Runs `switchyard args...`, asserting success, and returns stdout.
pub fn run_ok(args: &[&str]) -> String {
    let out = run(args);
    assert!(
        out.status.success(),
        "switchyard {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("stdout is UTF-8")
}

/// A child process killed (and reaped) when dropped, so a failing test leaves nothing running.
pub struct Proc(pub Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

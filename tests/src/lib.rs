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

/// A `switchyard worker` on a free loopback port, killed when dropped.
pub struct Worker {
    pub proc: Proc,
    pub addr: String,
    _dir: tempfile::TempDir,
}

impl Worker {
    /// Starts a worker hosting `experts` of `model` and waits (up to 60 s) until it serves.
    pub fn start(model: &Path, experts: &str) -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        let ready = dir.path().join("ready");
        let log = std::fs::File::create(dir.path().join("log")).expect("log file");
        let child = Command::new(bin())
            .args(["worker", "--listen", "127.0.0.1:0", "--experts", experts])
            .arg("--model")
            .arg(model)
            .arg("--ready-file")
            .arg(&ready)
            .env("SWITCHYARD_THREADS", "1")
            .env("SWITCHYARD_LOG", "warn")
            .stderr(log)
            .spawn()
            .expect("worker starts");
        let proc = Proc(child);
        let addr = wait_for_file(&ready, std::time::Duration::from_secs(60), || {
            std::fs::read_to_string(dir.path().join("log")).unwrap_or_default()
        });
        Self {
            proc,
            addr,
            _dir: dir,
        }
    }

    /// SIGKILL, as a crash would.
    pub fn kill(&mut self) {
        let _ = self.proc.0.kill();
        let _ = self.proc.0.wait();
    }

    /// Resident memory of the worker process in bytes (Linux).
    #[must_use]
    pub fn rss_bytes(&self) -> Option<u64> {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.proc.0.id())).ok()?;
        let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
        let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
        Some(kb * 1024)
    }
}

/// Polls until `path` holds a non-empty line, then returns it; panics with `log()` on timeout.
pub fn wait_for_file(
    path: &Path,
    timeout: std::time::Duration,
    log: impl Fn() -> String,
) -> String {
    let start = std::time::Instant::now();
    loop {
        if let Ok(s) = std::fs::read_to_string(path) {
            if !s.trim().is_empty() {
                return s.trim().to_string();
            }
        }
        assert!(
            start.elapsed() < timeout,
            "{} did not appear in time; log:\n{}",
            path.display(),
            log()
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

/// A child process killed (and reaped) when dropped, so a failing test leaves nothing running.
pub struct Proc(pub Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

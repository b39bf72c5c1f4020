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
        Self::start_with(model, &["--experts", experts])
    }

    /// Starts a worker of `model` with extra arguments and waits (up to 60 s) until it serves.
    pub fn start_with(model: &Path, args: &[&str]) -> Self {
        Self::start_env(model, args, &[])
    }

    /// [`Worker::start_with`] with extra environment variables.
    pub fn start_env(model: &Path, args: &[&str], env: &[(&str, &str)]) -> Self {
        Self::start_at(model, "127.0.0.1:0", args, env)
    }

    /// [`Worker::start_env`] listening on `listen` (e.g. another loopback address).
    pub fn start_at(model: &Path, listen: &str, args: &[&str], env: &[(&str, &str)]) -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        let ready = dir.path().join("ready");
        let log = std::fs::File::create(dir.path().join("log")).expect("log file");
        let child = Command::new(bin())
            .args(["worker", "--listen", listen])
            .args(args)
            .arg("--model")
            .arg(model)
            .arg("--ready-file")
            .arg(&ready)
            .env("SWITCHYARD_THREADS", "1")
            .env("SWITCHYARD_LOG", "info")
            .envs(env.iter().copied())
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

    /// The worker's log so far.
    #[must_use]
    pub fn log(&self) -> String {
        std::fs::read_to_string(self._dir.path().join("log")).unwrap_or_default()
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

/// A free loopback port (bound, then released: a small race other tests do not hit).
#[must_use]
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

/// A real single-member etcd (Debian's `etcd-server`, installed by `scripts/setup.sh`) on free
/// loopback ports with its data in a temp dir; killed when dropped.
pub struct Etcd {
    proc: Option<Proc>,
    pub endpoint: String,
    client_port: u16,
    peer_port: u16,
    /// Plaintext /health (etcd's metrics listener), which answers also when clients need TLS.
    health_port: u16,
    /// Serve clients over TLS with etcd.crt from this dev CA folder, requiring client
    /// certificates it signed.
    tls: Option<std::path::PathBuf>,
    dir: tempfile::TempDir,
}

impl Etcd {
    pub fn start() -> Self {
        Self::start_with(None)
    }

    /// An etcd whose clients must present a certificate signed by the dev CA in `ca_dir`
    /// (`deploy/tls/make-dev-ca.sh`); `endpoint` is then `https://127.0.0.1:port`.
    pub fn start_tls(ca_dir: &Path) -> Self {
        Self::start_with(Some(ca_dir.to_path_buf()))
    }

    fn start_with(tls: Option<std::path::PathBuf>) -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        let mut e = Self {
            proc: None,
            endpoint: String::new(),
            client_port: free_port(),
            peer_port: free_port(),
            health_port: free_port(),
            tls,
            dir,
        };
        // A port found free can be taken by a test running beside this one before etcd binds
        // it: then etcd exits at once, and the first start tries other ports.
        for attempt in 0.. {
            e.endpoint = match e.tls {
                Some(_) => format!("https://127.0.0.1:{}", e.client_port),
                None => format!("127.0.0.1:{}", e.client_port),
            };
            match e.try_start() {
                Ok(()) => break,
                Err(log) if attempt < 4 && log.contains("address already in use") => {
                    e.proc = None;
                    let _ = std::fs::remove_dir_all(e.dir.path().join("data"));
                    let _ = std::fs::remove_file(e.dir.path().join("log"));
                    (e.client_port, e.peer_port, e.health_port) =
                        (free_port(), free_port(), free_port());
                }
                Err(log) => panic!("etcd did not become healthy: {log}"),
            }
        }
        e
    }

    /// (Re)starts etcd on the same ports and data, and waits until it answers.
    pub fn restart(&mut self) {
        if let Err(log) = self.try_start() {
            panic!("etcd did not become healthy: {log}");
        }
    }

    /// Starts etcd on this one's ports and data and waits until it answers; its log if it
    /// exits or does not answer within 30 s.
    fn try_start(&mut self) -> Result<(), String> {
        let bin = std::env::var_os("SWITCHYARD_ETCD_BIN").unwrap_or_else(|| "etcd".into());
        let scheme = if self.tls.is_some() { "https" } else { "http" };
        let client = format!("{scheme}://127.0.0.1:{}", self.client_port);
        let peer = format!("http://127.0.0.1:{}", self.peer_port);
        let health = format!("http://127.0.0.1:{}", self.health_port);
        let tls_args: Vec<String> = match &self.tls {
            Some(ca) => vec![
                format!("--cert-file={}", ca.join("etcd.crt").display()),
                format!("--key-file={}", ca.join("etcd.key").display()),
                format!("--trusted-ca-file={}", ca.join("ca.crt").display()),
                "--client-cert-auth".into(),
            ],
            None => Vec::new(),
        };
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join("log"))
            .expect("log file");
        let child = Command::new(&bin)
            .arg("--data-dir")
            .arg(self.dir.path().join("data"))
            .args(["--name", "default"])
            .args([
                "--listen-client-urls",
                &client,
                "--advertise-client-urls",
                &client,
            ])
            .args([
                "--listen-peer-urls",
                &peer,
                "--initial-advertise-peer-urls",
                &peer,
            ])
            .args(["--initial-cluster", &format!("default={peer}")])
            .args(["--listen-metrics-urls", &health])
            .args(&tls_args)
            .stdout(log.try_clone().expect("log file"))
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| {
                panic!(
                    "cannot start {bin:?} ({e}): run scripts/setup.sh, which installs etcd-server"
                )
            });
        self.proc = Some(Proc(child));
        let start = std::time::Instant::now();
        let log = || std::fs::read_to_string(self.dir.path().join("log")).unwrap_or_default();
        loop {
            if let Ok(mut r) = ureq::get(&format!("{health}/health")).call() {
                if r.body_mut()
                    .read_to_string()
                    .unwrap_or_default()
                    .contains("true")
                {
                    return Ok(());
                }
            }
            let exited = self
                .proc
                .as_mut()
                .is_some_and(|p| p.0.try_wait().ok().flatten().is_some());
            if exited || start.elapsed() > std::time::Duration::from_secs(30) {
                return Err(log());
            }
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
    }

    /// SIGKILL (an outage).
    pub fn kill(&mut self) {
        self.proc = None;
    }
}

/// A `switchyard serve` on a free loopback port, killed when dropped.
pub struct Server {
    pub proc: Proc,
    /// `127.0.0.1:port`
    pub addr: String,
    dir: tempfile::TempDir,
}

impl Server {
    /// Serves `model` with extra arguments and waits (up to 60 s) until it listens.
    pub fn start(model: &Path, args: &[&str]) -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        let ready = dir.path().join("ready");
        let log = std::fs::File::create(dir.path().join("log")).expect("log file");
        let child = Command::new(bin())
            .arg("serve")
            .arg(model)
            .args(["--port", "0", "--ready-file"])
            .arg(&ready)
            .args(args)
            .env("SWITCHYARD_THREADS", "2")
            .env(
                "SWITCHYARD_LOG",
                std::env::var("SWITCHYARD_TEST_SERVER_LOG").unwrap_or_else(|_| "info".into()),
            )
            .stderr(log)
            .spawn()
            .expect("server starts");
        let proc = Proc(child);
        let addr = wait_for_file(&ready, std::time::Duration::from_secs(60), || {
            std::fs::read_to_string(dir.path().join("log")).unwrap_or_default()
        });
        Self { proc, addr, dir }
    }

    /// The server's log so far.
    #[must_use]
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("log")).unwrap_or_default()
    }

    /// GET `path`: (status, body).
    #[must_use]
    pub fn get(&self, path: &str) -> (u16, String) {
        let mut r = agent()
            .get(&format!("http://{}{path}", self.addr))
            .call()
            .expect("GET answers");
        let status = r.status().as_u16();
        (status, r.body_mut().read_to_string().unwrap_or_default())
    }

    /// POST a JSON body to `path`: (status, body).
    #[must_use]
    pub fn post(&self, path: &str, body: &serde_json::Value) -> (u16, String) {
        let mut r = agent()
            .post(&format!("http://{}{path}", self.addr))
            .send_json(body)
            .expect("POST answers");
        let status = r.status().as_u16();
        (status, r.body_mut().read_to_string().unwrap_or_default())
    }

    /// A streamed completion: (status, concatenated text, whether `[DONE]` arrived, error
    /// events). `on_first` runs once the first token arrives.
    #[must_use]
    pub fn stream(
        &self,
        body: &serde_json::Value,
        on_first: impl FnOnce(),
    ) -> (u16, String, bool, Vec<String>) {
        use std::io::BufRead;
        let mut body = body.clone();
        body["stream"] = serde_json::Value::Bool(true);
        let r = agent()
            .post(&format!("http://{}/v1/completions", self.addr))
            .send_json(&body)
            .expect("POST answers");
        let status = r.status().as_u16();
        let reader = std::io::BufReader::new(r.into_body().into_reader());
        let (mut text, mut done, mut errors) = (String::new(), false, Vec::new());
        let mut on_first = Some(on_first);
        for line in reader.lines() {
            let Ok(line) = line else { break };
            let Some(data) = line.strip_prefix("data: ") else {
                continue;
            };
            if data == "[DONE]" {
                done = true;
                break;
            }
            let v: serde_json::Value = serde_json::from_str(data).unwrap_or_default();
            if v.get("error").is_some() {
                errors.push(v["error"].to_string());
                continue;
            }
            if let Some(t) = v["choices"][0]["text"].as_str() {
                text.push_str(t);
                if let Some(f) = on_first.take() {
                    f();
                }
            }
        }
        (status, text, done, errors)
    }
}

fn agent() -> ureq::Agent {
    ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(std::time::Duration::from_secs(120)))
        .build()
        .into()
}

/// 32 completion bodies: prompts of different lengths; even ones greedy, odd ones sampled at
/// temperature 0.9 with a seed of their own; 12 tokens each with the top 2 logprobs.
pub fn completion_bodies() -> Vec<serde_json::Value> {
    let words = [
        "the", "cat", "sat", "on", "a", "warm", "mat", "while", "rain", "fell", "over", "town",
    ];
    (0..32usize)
        .map(|i| {
            let prompt: Vec<&str> = (0..3 + i % 11)
                .map(|k| words[(k * 5 + i * 7) % words.len()])
                .collect();
            let mut body = serde_json::json!({
                "model": "tiny-mixtral-trained",
                "prompt": prompt.join(" "),
                "max_tokens": 12,
                "logprobs": 2,
                "temperature": 0.0,
                "ignore_eos": true,
            });
            if i % 2 == 1 {
                body["temperature"] = serde_json::json!(0.9);
                body["seed"] = serde_json::json!(i * 1000 + 7);
            }
            body
        })
        .collect()
}

/// A completion's text and logprobs (tokens, their logprobs and the top 2 of each step), as
/// the server wrote them: an f32 prints as the shortest decimal that reads back to it, so equal
/// text means equal bits.
pub fn answer(server: &Server, body: &serde_json::Value) -> (String, String) {
    let (status, text) = server.post("/v1/completions", body);
    assert_eq!(status, 200, "{text}");
    let v: serde_json::Value = serde_json::from_str(&text).expect("a JSON answer");
    let choice = &v["choices"][0];
    (
        choice["text"].as_str().expect("a text").to_string(),
        choice["logprobs"].to_string(),
    )
}

/// Every body sent at once, each on its own connection.
pub fn together(server: &Server, bodies: &[serde_json::Value]) -> Vec<(String, String)> {
    std::thread::scope(|s| {
        let calls: Vec<_> = bodies
            .iter()
            .map(|b| s.spawn(move || answer(server, b)))
            .collect();
        calls
            .into_iter()
            .map(|c| c.join().expect("a request thread"))
            .collect()
    })
}

/// Every body sent alone, one after another.
pub fn one_by_one(server: &Server, bodies: &[serde_json::Value]) -> Vec<(String, String)> {
    bodies.iter().map(|b| answer(server, b)).collect()
}

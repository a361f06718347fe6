//! Starting `elite-ort serve` on an ephemeral loopback port for the server tests, and talking
//! to it. The tests synchronise on the server's own events: its stdout announces the bound
//! address and then readiness; every other wait is for a response.
#![allow(dead_code)] // each test binary uses its own subset

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

pub fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

pub fn golden_image(name: &str) -> PathBuf {
    root().join("tests/golden/images").join(name)
}

/// The `elite-ort` binary with its cache in the build tree (shared by every test binary).
pub fn elite() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_elite-ort"));
    c.env(
        "ELITE_ORT_CACHE_DIR",
        Path::new(env!("CARGO_TARGET_TMPDIR")).join("elite-ort-cache"),
    );
    c
}

/// `elite-ort serve` on the tiny bundle, an ephemeral loopback port and `concept_dir`, with
/// `extra` flags.
fn serve_command(concept_dir: &Path, extra: &[&str]) -> Command {
    let mut c = elite();
    c.args(["serve", "--bundle"])
        .arg(root().join("onnx/tiny"))
        .args(["--listen", "127.0.0.1:0", "--concept-dir"])
        .arg(concept_dir)
        .args(extra)
        .env("RUST_LOG", "warn");
    c
}

/// A running server; killed when dropped.
pub struct Server {
    pub child: Child,
    pub base: String,
    pub concept_dir: PathBuf,
    _stdout: std::thread::JoinHandle<()>,
}

/// How long a start may take (loading the tiny bundle takes about 2 s).
const START_TIMEOUT: Duration = Duration::from_secs(120);

impl Server {
    /// Starts the server on the tiny bundle with `extra` flags; waits for readiness.
    pub fn start(concept_dir: &Path, extra: &[&str]) -> Server {
        let mut child = serve_command(concept_dir, extra)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("server starts");
        let stdout = child.stdout.take().expect("stdout");
        let (tx, rx) = mpsc::channel();
        let reader = std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let mut base = None;
        loop {
            let line = rx
                .recv_timeout(START_TIMEOUT)
                .expect("the server announces its address and readiness");
            if let Some(addr) = line.strip_prefix("listening on ") {
                base = Some(addr.to_string());
            }
            if line.starts_with("ready after") {
                break;
            }
        }
        Server {
            child,
            base: base.expect("address before readiness"),
            concept_dir: concept_dir.to_path_buf(),
            _stdout: reader,
        }
    }

    /// Starts the server with `extra` flags that must keep it from starting; returns its exit
    /// status and stderr. A server that starts anyway is killed after [`START_TIMEOUT`] and
    /// the test fails.
    pub fn fails_to_start(
        concept_dir: &Path,
        extra: &[&str],
    ) -> (std::process::ExitStatus, String) {
        let child = serve_command(concept_dir, extra)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("server process starts");
        let pid = child.id() as i32;
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let _ = tx.send(child.wait_with_output());
        });
        match rx.recv_timeout(START_TIMEOUT) {
            Ok(output) => {
                let output = output.expect("server output");
                (
                    output.status,
                    String::from_utf8_lossy(&output.stderr).into_owned(),
                )
            }
            Err(_) => {
                // SAFETY: kill(2) on our own child's pid.
                unsafe {
                    libc::kill(pid, libc::SIGKILL);
                }
                panic!("the server was expected to refuse to start with {extra:?}, but it ran");
            }
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    /// Sends a signal (SIGTERM, SIGKILL).
    pub fn signal(&self, signal: i32) {
        // SAFETY: kill(2) on our own child's pid.
        unsafe {
            libc::kill(self.pid(), signal);
        }
    }

    /// Waits for the process to exit and returns its status code.
    pub fn wait(&mut self) -> Option<i32> {
        self.child.wait().ok().and_then(|s| s.code())
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A blocking client with a generous timeout (a debug-build server on two shared cores).
pub fn client() -> reqwest::blocking::Client {
    reqwest::blocking::Client::builder()
        .timeout(Duration::from_secs(300))
        .build()
        .expect("client")
}

/// A client whose connections are never reused (closing a response closes its socket).
pub fn fresh_client() -> reqwest::blocking::Client {
    reqwest::blocking::Client::builder()
        .timeout(Duration::from_secs(300))
        .pool_max_idle_per_host(0)
        .build()
        .expect("client")
}

/// The value of a Prometheus sample (`name{labels}` exactly as rendered), or 0 when absent.
pub fn metric(text: &str, sample: &str) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .find_map(|l| {
            let (name, value) = l.rsplit_once(' ')?;
            (name == sample).then(|| value.parse().ok()).flatten()
        })
        .unwrap_or(0.0)
}

/// Reads Server-Sent Events from a response until `stop` returns true for an event name;
/// returns every (event, data) seen.
pub fn read_events(
    response: reqwest::blocking::Response,
    mut stop: impl FnMut(&str, &str) -> bool,
) -> (
    Vec<(String, String)>,
    BufReader<reqwest::blocking::Response>,
) {
    let mut reader = BufReader::new(response);
    let mut events = Vec::new();
    let mut event = String::new();
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line).unwrap_or(0) == 0 {
            break;
        }
        let line = line.trim_end();
        if let Some(name) = line.strip_prefix("event: ") {
            event = name.to_string();
        } else if let Some(data) = line.strip_prefix("data: ") {
            let done = stop(&event, data);
            events.push((event.clone(), data.to_string()));
            if done {
                break;
            }
        }
    }
    (events, reader)
}

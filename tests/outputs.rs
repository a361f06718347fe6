//! Hostile input against the CLI's outputs and options (issue 9): a failed or interrupted run
//! leaves no new file in the output location; SIGKILL leaves only temporaries that the next
//! run removes; absurd options are refused with a message naming the option and the rule.

use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn command(args: &[&str]) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_elite-ort"));
    c.args(args).env(
        "ELITE_ORT_CACHE_DIR",
        Path::new(env!("CARGO_TARGET_TMPDIR")).join("elite-ort-cache"),
    );
    c
}

fn s(path: &Path) -> String {
    path.to_str().expect("utf-8").to_string()
}

/// A cheap run on the tiny bundle writing `out`, with extra flags.
fn run_args(out: &Path, extra: &[&str]) -> Vec<String> {
    let mut v: Vec<String> = [
        "run",
        "--bundle",
        &s(&root().join("onnx/tiny")),
        "--image",
        &s(&root().join("tests/golden/images/chelsea.png")),
        "--prompt",
        "a photo of S",
        "--steps",
        "1",
        "--height",
        "64",
        "--width",
        "64",
        "--quiet",
        "--out",
        &s(out),
    ]
    .iter()
    .map(|a| a.to_string())
    .collect();
    v.extend(extra.iter().map(|a| a.to_string()));
    v
}

fn output(args: &[String]) -> Output {
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    command(&args).output().expect("runs")
}

/// Expects exit status 1 with every needle in stderr and no panic.
fn fails(args: &[String], needles: &[&str]) -> String {
    let out = output(args);
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(out.status.code(), Some(1), "{args:?}\n{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
    for n in needles {
        assert!(stderr.contains(n), "stderr lacks {n:?}:\n{stderr}");
    }
    stderr
}

fn names(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

#[test]
fn absurd_options_are_refused_naming_the_option() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("o.png");
    fails(
        &run_args(&out, &["--threads", "100000"]),
        &["threads", "per available core"],
    );
    fails(&run_args(&out, &["--threads", "0"]), &["threads"]);
    fails(
        &run_args(&out, &["--device-id", "1"]),
        &["--device-id", "cpu"],
    );
    fails(&run_args(&out, &["--max-batch", "0"]), &["--max-batch"]);
    let encode = [
        "encode".to_string(),
        "--bundle".into(),
        s(&root().join("onnx/tiny")),
        "--image".into(),
        s(&root().join("tests/golden/images/chelsea.png")),
        "--out".into(),
        s(&dir.path().join("c.png")),
    ];
    fails(&encode, &["c.png", ".safetensors"]);
    assert!(names(dir.path()).is_empty(), "{:?}", names(dir.path()));
}

#[test]
fn output_paths_that_cannot_work_fail_before_the_run() {
    let dir = tempfile::tempdir().unwrap();
    let link = dir.path().join("dangling.png");
    std::os::unix::fs::symlink(dir.path().join("nowhere/x.png"), &link).unwrap();
    let start = Instant::now();
    fails(
        &run_args(&link, &[]),
        &["dangling.png", "dangling symbolic link"],
    );
    assert!(start.elapsed() < Duration::from_secs(30));
    assert!(
        std::fs::symlink_metadata(&link).is_ok(),
        "the link was touched"
    );
    // A name of 253 bytes (the file system allows 255) has room for its temporary.
    let long = dir.path().join(format!("{}.png", "x".repeat(249)));
    let out = output(&run_args(&long, &[]));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(long.is_file());
}

/// Starts a long run (1000 steps) writing into `dir` and returns once it is under way: it has
/// swept `dir` of a dead process's temporary planted there (an event, not a delay).
fn start_long_run(dir: &Path) -> std::process::Child {
    let mut args = run_args(&dir.join("o.png"), &["--prompt", "S in the snow"]);
    let i = args.iter().position(|a| a == "--steps").unwrap();
    args[i + 1] = "1000".into();
    let planted = dir.join(".elite-4194305-0.tmp");
    std::fs::write(&planted, b"from a killed run").unwrap();
    let argv: Vec<&str> = args.iter().map(String::as_str).collect();
    let mut child = command(&argv).spawn().expect("starts");
    let deadline = Instant::now() + Duration::from_secs(120);
    while planted.exists() {
        if let Ok(Some(status)) = child.try_wait() {
            panic!("ended before it swept its output directory: {status}");
        }
        assert!(
            Instant::now() < deadline,
            "the run never swept its output directory"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    child
}

#[test]
fn an_interrupted_run_leaves_no_new_file() {
    for signal in [libc::SIGINT, libc::SIGTERM] {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("before.txt"), b"kept").unwrap();
        let mut child = start_long_run(dir.path());
        // SAFETY: kill(2) on our own child.
        unsafe {
            libc::kill(child.id() as i32, signal);
        }
        let status = child.wait().unwrap();
        assert_eq!(status.code(), Some(130), "signal {signal}: {status:?}");
        assert_eq!(
            names(dir.path()),
            vec!["before.txt".to_string()],
            "signal {signal}: a file was left behind"
        );
    }
}

#[test]
fn sigkill_leaves_only_temporaries_which_the_next_run_removes() {
    let dir = tempfile::tempdir().unwrap();
    let mut child = start_long_run(dir.path());
    child.kill().unwrap();
    let status = child.wait().unwrap();
    assert_eq!(status.signal(), Some(libc::SIGKILL));
    let left = names(dir.path());
    assert!(
        left.iter()
            .all(|n| n.starts_with(".elite-") && n.ends_with(".tmp")),
        "only temporaries may remain after SIGKILL: {left:?}"
    );
    // The next run removes temporaries of processes that are gone, and writes its image.
    std::fs::write(dir.path().join(".elite-4194305-1.tmp"), b"stale").unwrap();
    let out = output(&run_args(&dir.path().join("o.png"), &[]));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(names(dir.path()), vec!["o.png".to_string()]);
}

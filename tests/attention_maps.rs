//! Attention maps (DESIGN.md §6): parity with the PyTorch reference on the tiny bundle, maps
//! off changes nothing, batched equals alone, older bundles, and the CLI's PNG files.
//!
//! Reference: `tests/golden/second_edit/attention_maps_steps.npy` and
//! `placeholder_gate_steps.npy`, written by `python -m export golden` from the reference
//! pipeline's conditional UNet call of every step (export/attention_maps.py aggregates the
//! processor's own `P_g` and its gate `A / M`, the tensor ELITE multiplies into the local
//! branch). The job starts from the case's text embeddings and initial latents, as
//! tests/golden.rs's denoising test does.
//!
//! Tolerances: per call the graph's maps match PyTorch's to 4e-7 of their largest value
//! (measured by the exporter's check); over a run they follow the latents, which the golden
//! tests hold to 1e-4 of their largest value after the last step, so the maps averaged over
//! steps are held to the same 1e-4 of their largest value (measured: see the printed errors).
//! Batched vs alone: the tolerance of tests/engine.rs (1e-5 of the largest value): rows are
//! independent, only the kernels' blocking differs.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;

use common::{cases, open, rel_err, root, run_job, Case, SERIAL};
use elite_ort::attention_maps::{AttentionMaps, StepWindow};
use elite_ort::call_size::CallSizing;
use elite_ort::engine::{Engine, EngineConfig};
use elite_ort::error::Error;
use elite_ort::job::{Generation, Job, Outcome};
use ndarray::{s, Array4, Axis, Ix4};

fn second_edit() -> Case {
    cases()
        .into_iter()
        .find(|c| c.name == "second_edit")
        .expect("golden case second_edit")
}

/// The golden case's job, from its recorded text embeddings and initial latents, with maps
/// over `window` (None: no maps).
fn case_job(engine: &mut Engine, case: &Case, window: Option<StepWindow>) -> Job {
    let mut request = case.request(engine);
    request.attention_maps = window;
    let request = engine.validate(request).expect("valid request");
    let text = |key: &str| case.f32::<ndarray::Ix3>(key).index_axis_move(Axis(0), 0);
    engine
        .new_job(request, Arc::new(case.concept()))
        .expect("job")
        .with_initial_latents(case.f32("init_latents"))
        .expect("latents of the request's shape")
        .with_text(text("text_cond"), text("text_uncond"))
}

/// The reference's maps averaged over steps `first..=last` (1-based).
fn reference_mean(case: &Case, key: &str, first: usize, last: usize) -> Array4<f32> {
    let steps: Array4<f32> = case.f32::<Ix4>(key);
    let window = steps.slice(s![first - 1..last, .., .., ..]);
    window
        .mean_axis(Axis(0))
        .expect("a step")
        .insert_axis(Axis(0))
}

fn maps_of(generation: &Generation) -> &AttentionMaps {
    generation
        .attention_maps
        .as_ref()
        .expect("the job asked for maps")
}

#[test]
fn maps_match_the_pytorch_reference_and_the_gate_is_elites() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let mut engine = open();
    assert!(engine.supports_attention_maps().unwrap());
    let case = second_edit();
    for (first, last) in [(1, case.steps), (4, 9)] {
        let window = StepWindow {
            first,
            last: Some(last),
        };
        let job = case_job(&mut engine, &case, Some(window));
        let generation = run_job(&mut engine, job);
        let maps = maps_of(&generation);
        assert_eq!((maps.first_step, maps.last_step), (first, last));
        let want = reference_mean(&case, "attention_maps_steps", first, last);
        let tokens = want.dim().1;
        let got = maps.tokens.slice(s![.., ..tokens, .., ..]).to_owned();
        let label = format!("{} maps, steps {first}..{last}", case.name);
        assert!(rel_err(&label, &got, &want) <= 1e-4);
        // The gate is A / M, the placeholder's column over its max: the tensor the reference
        // recorded from ELITE's processor.
        let want = reference_mean(&case, "placeholder_gate_steps", first, last);
        let label = format!("{} placeholder gate, steps {first}..{last}", case.name);
        assert!(rel_err(&label, &maps.gate, &want) <= 1e-4);
        assert!(maps.gate.iter().all(|&v| (0.0..=1.0).contains(&v)));
        // Every pixel's 77 token maps sum to 1 up to float32 rounding: they are softmax
        // probabilities averaged (the bicubic weights sum to 1; the clamp at 0 acts only where
        // a map undershoots).
        let sums = maps.tokens.sum_axis(Axis(1));
        let worst = sums.iter().map(|v| (v - 1.0).abs()).fold(0.0f32, f32::max);
        println!("token maps sum to 1 within {worst:.2e}");
        assert!(worst <= 1e-4, "sums off by {worst}");
    }
}

#[test]
fn maps_off_leaves_the_images_and_latents_bit_identical() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let mut engine = open();
    let case = second_edit();
    let off_job = case_job(&mut engine, &case, None);
    let off = run_job(&mut engine, off_job);
    assert!(off.attention_maps.is_none());
    let on_job = case_job(&mut engine, &case, Some(StepWindow::default()));
    let on = run_job(&mut engine, on_job);
    assert_eq!(off.trace.latents, on.trace.latents);
    assert_eq!(off.images, on.images);
}

/// A job of the batching test: the case's settings at 6 steps, `n` images, a seed, maps.
fn batch_job(engine: &mut Engine, n: usize, seed: u64, window: Option<StepWindow>) -> Job {
    let case = second_edit();
    let mut request = case.request(engine);
    request.steps = 6;
    request.num_images = n;
    request.seed = seed;
    request.record_steps = Vec::new();
    request.attention_maps = window;
    let request = engine.validate(request).expect("valid request");
    engine
        .new_job(request, Arc::new(case.concept()))
        .expect("job")
}

fn engine_with_batch(max_batch: usize) -> Engine {
    let config = EngineConfig {
        verify_checksums: true,
        max_batch: Some(max_batch),
        // Calls as full as max_batch allows: the mix this test is about.
        call_sizing: CallSizing::Fixed,
        ..EngineConfig::default()
    };
    Engine::open(root().join(common::BUNDLE), &config).expect("tiny bundle opens")
}

#[test]
fn maps_in_a_mixed_batch_equal_the_maps_alone() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let windows = [
        Some(StepWindow::default()),
        None,
        Some(StepWindow {
            first: 2,
            last: Some(4),
        }),
    ];
    let specs = [(2, 7), (1, 8), (1, 9)];
    let mut alone = Vec::new();
    let mut engine = open();
    for (&(n, seed), window) in specs.iter().zip(windows) {
        let job = batch_job(&mut engine, n, seed, window);
        alone.push(run_job(&mut engine, job));
    }
    // Three rows per call: the first job's four rows span two calls, and calls mix rows that
    // want maps (conditional rows of jobs 0 and 2 in their windows) with rows that do not.
    let mut engine = engine_with_batch(3);
    let ids: Vec<_> = specs
        .iter()
        .zip(windows)
        .map(|(&(n, seed), window)| {
            let job = batch_job(&mut engine, n, seed, window);
            engine.submit(job)
        })
        .collect();
    engine.run_until_idle(&|| false);
    assert!(engine.stats().shared_calls > 0);
    let mut finished = engine.take_finished();
    finished.sort_by_key(|j| j.id);
    for ((job, id), want) in finished.into_iter().zip(ids).zip(&alone) {
        assert_eq!(job.id, id);
        let Outcome::Done(got) = job.outcome else {
            panic!("{id}: {:?}", job.outcome)
        };
        assert_eq!(got.images.len(), want.images.len());
        for (a, b) in got.images.iter().zip(&want.images) {
            let worst = a
                .as_raw()
                .iter()
                .zip(b.as_raw())
                .map(|(x, y)| x.abs_diff(*y))
                .max()
                .unwrap_or(0);
            assert!(worst <= 1, "{id}: image values {worst} apart");
        }
        match (&got.attention_maps, &want.attention_maps) {
            (Some(g), Some(w)) => {
                assert_eq!((g.first_step, g.last_step), (w.first_step, w.last_step));
                assert!(rel_err(&format!("{id} maps batched"), &g.tokens, &w.tokens) <= 1e-5);
                assert!(rel_err(&format!("{id} gate batched"), &g.gate, &w.gate) <= 1e-5);
            }
            (None, None) => {}
            other => panic!("{id}: maps {:?}", other.0.is_some()),
        }
    }
}

/// A copy of onnx/tiny whose UNet has the signature of bundles exported before attention
/// maps (export/fixtures_runtime.py's `unet_tiny_before_maps.onnx`: trivial maths).
fn older_bundle() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    for entry in std::fs::read_dir(root().join(common::BUNDLE)).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), dir.path().join(entry.file_name())).unwrap();
    }
    let unet = dir.path().join("unet.onnx");
    std::fs::copy(
        root().join("tests/fixtures/runtime/unet_tiny_before_maps.onnx"),
        &unet,
    )
    .unwrap();
    // The manifest lists the new file, as the exporter of that time would have.
    let manifest = dir.path().join("elite.json");
    let mut doc: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&manifest).unwrap()).unwrap();
    doc["files"]["unet.onnx"] = serde_json::json!({
        "sha256": elite_ort::bundle::sha256_file(&unet).unwrap(),
        "bytes": std::fs::metadata(&unet).unwrap().len(),
    });
    std::fs::write(&manifest, serde_json::to_string_pretty(&doc).unwrap()).unwrap();
    dir
}

#[test]
fn an_older_bundle_runs_and_says_it_has_no_maps() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let bundle = older_bundle();
    let config = EngineConfig {
        verify_checksums: true,
        ..EngineConfig::default()
    };
    let mut engine = Engine::open(bundle.path(), &config).expect("older bundle opens");
    assert!(!engine.supports_attention_maps().unwrap());
    let case = second_edit();
    let mut request = case.request(&engine);
    request.steps = 2;
    request.attention_maps = Some(StepWindow::default());
    let request = engine.validate(request).expect("valid request");
    let err = engine
        .new_job(request, Arc::new(case.concept()))
        .expect_err("maps refused");
    let Error::InvalidRequest { field, message } = &err else {
        panic!("{err}")
    };
    assert_eq!(*field, "attention_maps");
    assert!(message.contains("cannot give attention maps"), "{message}");
    assert!(message.contains("want_attention_maps"), "{message}");
    // Without maps it runs as before.
    let mut request = case.request(&engine);
    request.steps = 2;
    let request = engine.validate(request).expect("valid request");
    let job = engine
        .new_job(request, Arc::new(case.concept()))
        .expect("job");
    let generation = run_job(&mut engine, job);
    assert_eq!(generation.images.len(), 1);
    assert!(generation.attention_maps.is_none());
}

// ----- the CLI -----

fn elite<S: AsRef<std::ffi::OsStr>>(args: &[S]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_elite-ort"))
        .args(args)
        .env(
            "ELITE_ORT_CACHE_DIR",
            Path::new(env!("CARGO_TARGET_TMPDIR")).join("elite-ort-cache"),
        )
        .output()
        .expect("binary runs")
}

fn p(path: &Path) -> &str {
    path.to_str().expect("utf-8 path")
}

fn run_args(bundle: &Path, out: &Path, maps: &Path, extra: &[&str]) -> Vec<String> {
    let chelsea = root().join("tests/golden/images/chelsea.png");
    let mut args: Vec<String> = [
        "run",
        "--bundle",
        p(bundle),
        "--image",
        p(&chelsea),
        "--prompt",
        "a photo of S wearing a hat",
        "--steps",
        "3",
        "--height",
        "128",
        "--width",
        "192",
        "--quiet",
        "--out",
        p(out),
        "--attention-maps",
        p(maps),
    ]
    .map(String::from)
    .to_vec();
    args.extend(extra.iter().map(|a| a.to_string()));
    args
}

fn files(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

#[test]
fn cli_writes_the_maps_with_the_images_and_refuses_existing_files() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let dir = tempfile::tempdir().unwrap();
    let maps = dir.path().join("maps");
    std::fs::create_dir(&maps).unwrap();
    let out = dir.path().join("cat.png");
    let bundle = root().join(common::BUNDLE);
    let run = elite(&run_args(&bundle, &out, &maps, &[]));
    assert!(
        run.status.success(),
        "{}",
        String::from_utf8_lossy(&run.stderr)
    );
    let written = files(&maps);
    // <start> a photo of s wearing a hat <end>: 8 tokens, the gate, the sheet.
    let want: Vec<String> = [
        "cat-00-start.png",
        "cat-01-a.png",
        "cat-02-photo.png",
        "cat-03-of.png",
        "cat-04-s.png",
        "cat-05-wearing.png",
        "cat-06-a.png",
        "cat-07-hat.png",
        "cat-08-end.png",
        "cat-placeholder.png",
        "cat-sheet.png",
    ]
    .map(String::from)
    .to_vec();
    assert_eq!(written, want);
    for name in &written[..10] {
        let img = image::open(maps.join(name)).expect("a PNG");
        assert_eq!((img.width(), img.height()), (192, 128), "{name}");
    }
    let sheet = image::open(maps.join("cat-sheet.png")).expect("a PNG");
    assert!(sheet.width() > 192 && sheet.height() > 128);
    let before = std::fs::read(maps.join("cat-04-s.png")).unwrap();

    // Again, the image into a fresh directory and the maps into the same one: the maps'
    // names exist, so nothing is written, not even the new image, and no temporary is left.
    let fresh = dir.path().join("fresh");
    std::fs::create_dir(&fresh).unwrap();
    let fresh_out = fresh.join("cat.png");
    let refused = elite(&run_args(&bundle, &fresh_out, &maps, &[]));
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(!refused.status.success());
    assert!(
        stderr.contains("already exists") && stderr.contains("--force"),
        "{stderr}"
    );
    assert!(
        files(&fresh).is_empty(),
        "the image was written: {:?}",
        files(&fresh)
    );
    assert_eq!(files(&maps), want, "temporaries or new files left");
    // With --force they are replaced (the same run: the same bytes).
    let forced = elite(&run_args(&bundle, &fresh_out, &maps, &["--force"]));
    assert!(
        forced.status.success(),
        "{}",
        String::from_utf8_lossy(&forced.stderr)
    );
    assert_eq!(std::fs::read(maps.join("cat-04-s.png")).unwrap(), before);
}

#[test]
fn cli_refuses_bad_map_requests_before_any_work() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("cat.png");
    let bundle = root().join(common::BUNDLE);
    let expect_failure = |args: Vec<String>, needles: &[&str]| {
        let run = elite(&args);
        let stderr = String::from_utf8_lossy(&run.stderr).into_owned();
        assert!(!run.status.success(), "{args:?} succeeded");
        assert!(!stderr.contains("panicked"), "{stderr}");
        for needle in needles {
            assert!(stderr.contains(needle), "{needle:?} not in: {stderr}");
        }
        assert!(
            files(dir.path()).iter().all(|f| f == "older"),
            "{:?}",
            files(dir.path())
        );
    };
    let missing: PathBuf = dir.path().join("no-such-dir");
    expect_failure(
        run_args(&bundle, &out, &missing, &[]),
        &["no-such-dir", "does not exist"],
    );
    let maps = dir.path();
    expect_failure(
        run_args(&bundle, &out, maps, &["--attention-steps", "5..9"]),
        &["--attention-steps", "after the last of the 3 steps"],
    );
    expect_failure(
        run_args(&bundle, &out, maps, &["--attention-steps", "two"]),
        &["--attention-steps", "a..b"],
    );
    let no_maps = [
        "run",
        "--bundle",
        p(&bundle),
        "--image",
        "x.png",
        "--prompt",
        "a S",
        "--out",
        p(&out),
        "--attention-steps",
        "1..2",
    ];
    expect_failure(no_maps.map(String::from).to_vec(), &["--attention-maps"]);
    // A bundle exported before attention maps says so, and nothing is written.
    let older = older_bundle();
    let older_dir = dir.path().join("older");
    std::fs::create_dir(&older_dir).unwrap();
    expect_failure(
        run_args(older.path(), &out, &older_dir, &["--no-cache"]),
        &[
            "--attention-maps",
            "cannot give attention maps",
            "re-export",
        ],
    );
    assert!(files(&older_dir).is_empty());
}

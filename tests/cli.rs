//! The `elite-ort` binary: one golden case end to end, concept reuse, and every bad input the
//! runtime issue lists — each must exit non-zero with its own message, never panic, and leave
//! no output file behind.

mod cpu_bf16;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use cpu_bf16::{bf16_here, Bf16Here};
use ndarray::{Array3, ArrayD};
use ndarray_npy::ReadNpyExt;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn tiny() -> PathBuf {
    root().join("onnx/tiny")
}

fn chelsea() -> PathBuf {
    root().join("tests/golden/images/chelsea.png")
}

fn elite(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_elite-ort"))
        .args(args)
        // The binary's cache (checksum stamps, optimised graphs) stays in the build tree.
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

/// Runs and expects success (stderr shown otherwise); returns the output.
fn succeeds(args: &[&str]) -> Output {
    let out = elite(args);
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// Two files with the same bytes.
fn assert_same_bytes(a: &Path, b: &Path) {
    assert_eq!(std::fs::read(a).unwrap(), std::fs::read(b).unwrap());
}

/// Runs and expects failure whose stderr contains every `needle`; returns stderr.
fn fails(args: &[&str], needles: &[&str]) -> String {
    let out = elite(args);
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(!out.status.success(), "succeeded: {args:?}\n{stderr}");
    assert!(!stderr.contains("panicked"), "panicked: {args:?}\n{stderr}");
    for n in needles {
        assert!(
            stderr.contains(n),
            "{args:?}: stderr lacks {n:?}:\n{stderr}"
        );
    }
    stderr
}

/// `run` on the tiny bundle with cheap settings and extra flags.
fn run_args<'a>(out: &'a str, extra: &[&'a str]) -> Vec<&'a str> {
    let bundle: &'static str = Box::leak(tiny().to_string_lossy().into_owned().into_boxed_str());
    let image: &'static str = Box::leak(chelsea().to_string_lossy().into_owned().into_boxed_str());
    let mut v = vec![
        "run",
        "--bundle",
        bundle,
        "--image",
        image,
        "--prompt",
        "a photo of S",
        "--steps",
        "2",
        "--height",
        "64",
        "--width",
        "64",
        "--out",
        out,
        "--quiet",
    ];
    v.extend_from_slice(extra);
    v
}

/// Replaces `--flag value` in an argument list.
fn with<'a>(mut args: Vec<&'a str>, flag: &str, value: &'a str) -> Vec<&'a str> {
    let i = args.iter().position(|a| *a == flag).expect("flag present");
    args[i + 1] = value;
    args
}

fn copy_bundle(dst: &Path) {
    std::fs::create_dir_all(dst).unwrap();
    for entry in std::fs::read_dir(tiny()).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), dst.join(entry.file_name())).unwrap();
    }
}

/// Max level difference and count of values more than one level off, vs a golden image.
fn compare_with_golden(got: &image::RgbImage, golden: &Path) -> (i32, usize) {
    let file = std::fs::File::open(golden).unwrap();
    let want: Array3<u8> = ArrayD::<u8>::read_npy(file)
        .unwrap()
        .into_dimensionality()
        .unwrap();
    assert_eq!((got.height() as usize, got.width() as usize, 3), want.dim());
    let mut worst = 0i32;
    let mut off = 0usize;
    for (x, y, px) in got.enumerate_pixels() {
        for c in 0..3 {
            let d = (i32::from(px.0[c]) - i32::from(want[[y as usize, x as usize, c]])).abs();
            worst = worst.max(d);
            off += usize::from(d > 1);
        }
    }
    (worst, off)
}

#[test]
fn every_golden_case_end_to_end_through_the_cli() {
    let cases: serde_json::Value =
        serde_json::from_slice(&std::fs::read(root().join("tests/golden/cases.json")).unwrap())
            .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let bundle = tiny();
    for case in cases["cases"].as_array().expect("cases") {
        let field = |k: &str| match &case[k] {
            serde_json::Value::String(s) => s.clone(),
            v => v.to_string(),
        };
        let name = field("name");
        let out = dir.path().join(format!("{name}.png"));
        let image = root().join("tests/golden").join(field("image"));
        let mut args: Vec<String> = vec![
            "run".into(),
            "--bundle".into(),
            p(&bundle).into(),
            "--image".into(),
            p(&image).into(),
            "--out".into(),
            p(&out).into(),
            "--timings".into(),
            "json".into(),
        ];
        if let Some(mask) = case["mask"].as_str() {
            args.extend([
                "--mask".into(),
                p(&root().join("tests/golden").join(mask)).into(),
            ]);
        }
        for (flag, key) in [
            ("--scheduler", "scheduler"),
            ("--prompt", "prompt"),
            ("--placeholder", "placeholder"),
            ("--seed", "seed"),
            ("--steps", "steps"),
            ("--guidance", "guidance"),
            ("--lambda", "lam"),
            ("--height", "height"),
            ("--width", "width"),
        ] {
            args.extend([flag.to_string(), field(key)]);
        }
        let argv: Vec<&str> = args.iter().map(String::as_str).collect();
        let result = elite(&argv);
        let stderr = String::from_utf8_lossy(&result.stderr);
        assert!(result.status.success(), "{name}: {stderr}");
        assert!(
            stderr.contains("random weights"),
            "no random-weights notice: {stderr}"
        );
        let timings: serde_json::Value =
            serde_json::from_slice(&result.stdout).expect("timings JSON on stdout");
        assert!(timings["denoise"].as_f64().is_some(), "{timings}");

        let golden = root()
            .join("tests/golden")
            .join(name.as_str())
            .join("image.npy");
        let (worst, off) = compare_with_golden(&image::open(&out).unwrap().to_rgb8(), &golden);
        println!("{name}: cli image vs golden: {off} values > 1 level off, worst {worst}");
        let total = 3
            * field("height").parse::<usize>().unwrap()
            * field("width").parse::<usize>().unwrap();
        assert!(off as f64 <= 1e-3 * total as f64 && worst <= 3, "{name}");

        // The same output again without --force is refused and the file is untouched.
        let before = std::fs::read(&out).unwrap();
        fails(&argv, &["already exists", "--force"]);
        assert_eq!(std::fs::read(&out).unwrap(), before);
    }
}

#[test]
fn encoded_concept_reproduces_the_direct_run() {
    let dir = tempfile::tempdir().unwrap();
    let concept = dir.path().join("cat.safetensors");
    let mask = root().join("tests/golden/images/chelsea_mask.png");
    let (bundle, image) = (tiny(), chelsea());
    succeeds(&[
        "encode",
        "--bundle",
        p(&bundle),
        "--image",
        p(&image),
        "--mask",
        p(&mask),
        "--out",
        p(&concept),
        "--quiet",
    ]);
    let direct = dir.path().join("direct.png");
    let reused = dir.path().join("reused.png");
    let mut a = run_args(p(&direct), &["--mask", p(&mask)]);
    succeeds(&a);
    a = run_args(p(&reused), &[]);
    let i = a.iter().position(|x| *x == "--image").unwrap();
    a[i] = "--concept";
    a[i + 1] = p(&concept);
    succeeds(&a);
    assert_same_bytes(&direct, &reused);
}

#[test]
fn info_lists_manifest_and_providers() {
    let bundle = tiny();
    let out = succeeds(&["info", "--bundle", p(&bundle)]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    for needle in [
        "elite-tiny",
        "unet.onnx",
        "CPUExecutionProvider",
        "random      true",
    ] {
        assert!(stdout.contains(needle), "info lacks {needle}:\n{stdout}");
    }
}

#[test]
fn bad_images_and_masks() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("o.png");
    let o = p(&out);
    let missing = dir.path().join("missing.png");
    fails(
        &with(run_args(o, &[]), "--image", p(&missing)),
        &["missing.png"],
    );
    let corrupt = dir.path().join("corrupt.png");
    std::fs::write(&corrupt, b"\x89PNG\r\n\x1a\nthis is not a png").unwrap();
    fails(
        &with(run_args(o, &[]), "--image", p(&corrupt)),
        &["corrupt.png"],
    );
    let empty = dir.path().join("empty.jpg");
    std::fs::write(&empty, b"").unwrap();
    fails(
        &with(run_args(o, &[]), "--image", p(&empty)),
        &["empty.jpg", "empty"],
    );
    let wrong = root().join("tests/golden/images/coffee_mask.png");
    fails(&run_args(o, &["--mask", p(&wrong)]), &["600", "451"]);
    assert!(!out.exists(), "an output file was written");
}

#[test]
fn bad_prompts_and_numbers() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("o.png");
    let o = p(&out);
    fails(
        &with(run_args(o, &[]), "--prompt", "a photo of a cat"),
        &["placeholder", "`S`"],
    );
    let long = "a photo of S ".to_string() + &"very ".repeat(80);
    fails(
        &with(run_args(o, &[]), "--prompt", &long),
        &["tokens", "77"],
    );
    fails(&with(run_args(o, &[]), "--steps", "0"), &["--steps"]);
    fails(&with(run_args(o, &[]), "--steps", "100000"), &["--steps"]);
    fails(&run_args(o, &["--lambda", "NaN"]), &["--lambda"]);
    fails(&run_args(o, &["--lambda", "-0.5"]), &["--lambda"]);
    fails(&run_args(o, &["--guidance", "-1"]), &["--guidance"]);
    fails(&run_args(o, &["--guidance", "inf"]), &["--guidance"]);
    fails(
        &with(run_args(o, &[]), "--height", "100"),
        &["--height", "64"],
    );
    fails(&run_args(o, &["-n", "0"]), &["--num-images"]);
    fails(
        &with(run_args(o, &[]), "--steps", "abc"),
        &["invalid value"],
    );
    assert!(!out.exists(), "an output file was written");
}

#[test]
fn bad_outputs() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("plain-file");
    std::fs::write(&file, b"x").unwrap();
    let under_file = file.join("o.png");
    // Issue 9: the parent is a file, and the message says so (it used to say "does not exist").
    fails(
        &run_args(p(&under_file), &[]),
        &["plain-file", "not a directory"],
    );
    fails(&run_args(p(&dir.path().join("o.jpg")), &[]), &[".png"]);
    let latents = dir.path().join("noise.npy");
    std::fs::write(&latents, b"not npy").unwrap();
    fails(
        &run_args(
            p(&dir.path().join("o.png")),
            &["--init-latents", p(&latents)],
        ),
        &["noise.npy"],
    );
    assert_eq!(
        std::fs::read_dir(dir.path()).unwrap().count(),
        2,
        "stray files left"
    );
}

#[test]
fn bad_bundles() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("o.png");
    let o = p(&out);

    let missing = dir.path().join("missing-file");
    copy_bundle(&missing);
    std::fs::remove_file(missing.join("vae_decoder.onnx")).unwrap();
    fails(
        &with(run_args(o, &[]), "--bundle", p(&missing)),
        &["vae_decoder.onnx"],
    );

    let tampered = dir.path().join("tampered");
    copy_bundle(&tampered);
    let unet = tampered.join("unet.onnx");
    let mut bytes = std::fs::read(&unet).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0xff;
    std::fs::write(&unet, bytes).unwrap();
    fails(
        &with(run_args(o, &[]), "--bundle", p(&tampered)),
        &["unet.onnx", "sha256"],
    );

    // A graph with the wrong signature, listed with its true hash so only the signature fails.
    let wrong = dir.path().join("wrong-signature");
    copy_bundle(&wrong);
    let fixture = root().join("tests/fixtures/runtime/global_mapper_renamed.onnx");
    std::fs::copy(&fixture, wrong.join("global_mapper.onnx")).unwrap();
    let manifest_path = wrong.join("elite.json");
    let mut manifest: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&manifest_path).unwrap()).unwrap();
    let bytes = std::fs::read(&fixture).unwrap();
    manifest["files"]["global_mapper.onnx"] = serde_json::json!({
        "sha256": elite_ort::bundle::sha256_file(&fixture).unwrap(),
        "bytes": bytes.len(),
    });
    std::fs::write(
        &manifest_path,
        serde_json::to_vec_pretty(&manifest).unwrap(),
    )
    .unwrap();
    fails(
        &with(run_args(o, &[]), "--bundle", p(&wrong)),
        &["global_mapper.onnx", "image_features"],
    );

    fails(
        &with(run_args(o, &[]), "--bundle", p(&dir.path().join("nowhere"))),
        &["nowhere"],
    );
    assert!(!out.exists(), "an output file was written");
}

#[test]
fn unavailable_provider_is_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("o.png");
    fails(&run_args(p(&out), &["--device", "cuda"]), &["CUDA"]);
    fails(
        &run_args(p(&out), &["--ort-lib", "/nonexistent/libonnxruntime.so"]),
        &["/nonexistent/libonnxruntime.so"],
    );
    assert!(!out.exists());
}

fn rgb(path: &Path) -> image::RgbImage {
    image::open(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .to_rgb8()
}

fn max_level_diff(a: &image::RgbImage, b: &image::RgbImage) -> i32 {
    a.as_raw()
        .iter()
        .zip(b.as_raw())
        .map(|(x, y)| (i32::from(*x) - i32::from(*y)).abs())
        .max()
        .unwrap_or(0)
}

#[test]
fn several_images_and_explicit_initial_noise() {
    let dir = tempfile::tempdir().unwrap();
    let single = dir.path().join("single.png");
    succeeds(&run_args(p(&single), &[]));

    // -n 2 numbers the files; torch's randn([2, 4, 8, 8]) begins with randn([1, 4, 8, 8]) (whole
    // 16-value blocks), so image 0 is the single run's image, computed at batch 4 instead of 2.
    let multi = dir.path().join("multi.png");
    succeeds(&run_args(p(&multi), &["-n", "2"]));
    let (first, second) = (
        rgb(&dir.path().join("multi-0.png")),
        rgb(&dir.path().join("multi-1.png")),
    );
    assert!(
        max_level_diff(&first, &rgb(&single)) <= 1,
        "image 0 of -n 2 differs from the single run"
    );
    assert!(
        max_level_diff(&first, &second) > 10,
        "the two images share their noise"
    );

    // --init-latents with seed-42 noise reproduces the seeded run exactly.
    let noise =
        ndarray::Array4::from_shape_vec((1, 4, 8, 8), elite_ort::noise::torch_randn(42, 256))
            .unwrap();
    let npy = dir.path().join("noise.npy");
    ndarray_npy::WriteNpyExt::write_npy(&noise, std::fs::File::create(&npy).unwrap()).unwrap();
    let explicit = dir.path().join("explicit.png");
    succeeds(&run_args(
        p(&explicit),
        &["--init-latents", p(&npy), "--seed", "7"],
    ));
    assert_same_bytes(&explicit, &single);

    // Noise of the wrong shape for -n / the size is refused before anything runs.
    let wrong = dir.path().join("wrong.png");
    fails(
        &run_args(p(&wrong), &["--init-latents", p(&npy), "-n", "2"]),
        &["shape"],
    );
    assert!(!wrong.exists());
}

/// The `"unet calls"` counters of a `--timings json` run.
fn unet_calls(out: &Output) -> (u64, u64) {
    let timings: serde_json::Value =
        serde_json::from_slice(&out.stdout).expect("timings JSON on stdout");
    let calls = &timings["unet calls"];
    (
        calls["calls"].as_u64().expect("calls"),
        calls["rows"].as_u64().expect("rows"),
    )
}

#[test]
fn several_prompts_are_jobs_that_share_every_unet_call() {
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = (dir.path().join("a.png"), dir.path().join("b.png"));
    succeeds(&run_args(p(&a), &[]));
    succeeds(&with(run_args(p(&b), &[]), "--prompt", "S on the beach"));
    let both = dir.path().join("both.png");
    let out = succeeds(&run_args(
        p(&both),
        &[
            "--prompt",
            "S on the beach",
            "--timings",
            "json",
            "--call-sizing",
            "fixed",
        ],
    ));
    // 2 steps; each step's call holds both jobs' conditional and unconditional rows.
    assert_eq!(unet_calls(&out), (2, 8), "one UNet call per step");
    for (single, batched) in [(&a, "both-0.png"), (&b, "both-1.png")] {
        let d = max_level_diff(&rgb(single), &rgb(&dir.path().join(batched)));
        assert!(d <= 1, "{batched}: {d} levels from the separate run");
    }
    // --max-batch 2 puts each job in calls of its own (two calls per step), same images.
    let split = dir.path().join("split.png");
    let out = succeeds(&run_args(
        p(&split),
        &[
            "--prompt",
            "S on the beach",
            "--timings",
            "json",
            "--max-batch",
            "2",
        ],
    ));
    assert_eq!(unet_calls(&out), (4, 8));
    assert_same_bytes(
        &dir.path().join("split-1.png"),
        &dir.path().join("both-1.png"),
    );
}

#[test]
fn prompts_pair_with_one_concept_for_all_or_one_each() {
    let dir = tempfile::tempdir().unwrap();
    let coffee = root().join("tests/golden/images/coffee.png");
    let coffee_mask = root().join("tests/golden/images/coffee_mask.png");
    let chelsea_mask = root().join("tests/golden/images/chelsea_mask.png");
    let alone = dir.path().join("coffee.png");
    succeeds(&with(
        run_args(p(&alone), &["--mask", p(&coffee_mask)]),
        "--image",
        p(&coffee),
    ));
    // Two prompts, two images with their masks, in order: job 1 is the coffee run.
    let pair = dir.path().join("pair.png");
    succeeds(&run_args(
        p(&pair),
        &[
            "--mask",
            p(&chelsea_mask),
            "--prompt",
            "a photo of S",
            "--image",
            p(&coffee),
            "--mask",
            p(&coffee_mask),
        ],
    ));
    let d = max_level_diff(&rgb(&alone), &rgb(&dir.path().join("pair-1.png")));
    assert!(d <= 1, "{d} levels");
    let three = dir.path().join("three.png");
    fails(
        &run_args(
            p(&three),
            &[
                "--prompt",
                "S",
                "--prompt",
                "S again",
                "--image",
                p(&coffee),
            ],
        ),
        &["3 prompts and 2 concepts", "one per prompt"],
    );
    fails(
        &run_args(
            p(&three),
            &["--image", p(&coffee), "--mask", p(&coffee_mask)],
        ),
        &["1 --mask for 2 --image"],
    );
    assert!(!three.exists() && !dir.path().join("three-0.png").exists());
}

/// `--precision bf16`: refused on a GPU device and with a plugin that is not there, each with
/// a message naming the option and the rule; nothing is written.
#[test]
fn precision_bf16_errors() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("o.png");
    let o = p(&out);
    fails(
        &run_args(o, &["--precision", "bf16", "--device", "cuda"]),
        &["--precision bf16", "cuda"],
    );
    if let Bf16Here::Refused(why) = bf16_here() {
        fails(
            &run_args(o, &["--precision", "bf16"]),
            &["--precision bf16", why],
        );
    } else {
        fails(
            &run_args(
                o,
                &[
                    "--precision",
                    "bf16",
                    "--openvino-lib",
                    "/nonexistent/plugin.so",
                ],
            ),
            &["/nonexistent/plugin.so", "not found"],
        );
    }
    fails(&run_args(o, &["--precision", "fp16"]), &["fp16"]);
    assert!(!out.exists(), "no output after a refused precision");
}

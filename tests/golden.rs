//! Parity with the PyTorch reference, stage by stage, on every case in `tests/golden/`.
//!
//! The golden data is written by `python -m export golden` (the reference pipeline in fp32 on
//! the tiny model's PyTorch weights); nothing here is produced by the code under test. Each
//! stage is fed the *golden* inputs of that stage, so an error is pinned to one stage instead of
//! compounding; `end_to_end_*` then runs the whole pipeline from the image files.
//!
//! Tolerances (fp32 ONNX Runtime vs fp32 PyTorch on the tiny bundle):
//! - graph outputs (CLIP features → embeddings, text encoder): max |Δ| ≤ 1e-4 · max |ref|.
//!   Kernels differ only in summation order (measured ~1e-6); 1e-4 leaves margin, not slack
//!   for a wrong formula, which moves values by O(1).
//! - scheduler σ / timesteps / coefficients: 1e-6 relative (DESIGN.md §5: f32 emulation).
//! - noise: 1e-6 absolute (torch's own vectorised maths explains the last ulps).
//! - latents after steps 1, 2 and the last: max |Δ| ≤ 1e-4 · max |ref|.
//! - image: ≥ 99.9 % of values within one level, none more than 3 levels off.
//! - preprocessing: Pillow-compatible resize, so pixels within one uint8 level after
//!   normalisation (1/255/std ≈ 0.0146), and the mask grid exactly.

mod common;

use std::sync::Arc;

use common::{assert_image_close, cases, open, rel_err, root, run_job, Case, BUNDLE, SERIAL};
use elite_ort::engine::{Engine, EngineConfig};
use elite_ort::guidance::CfgMode;
use elite_ort::job::Trace;
use elite_ort::noise::TorchGenerator;
use elite_ort::preprocess::{self, ConceptInputs, PreprocessParams};
use elite_ort::scheduler::{LmsConfig, SchedulerConfig, SchedulerKind};
use ndarray::{Array1, Array2, Array3, Array4, Axis};

fn params() -> PreprocessParams {
    PreprocessParams::default()
}

#[test]
fn preprocessing_matches_pillow_reference() {
    for case in cases() {
        let rgb = preprocess::load_rgb(case.image_path()).expect("image");
        let mask = case
            .mask_path()
            .map(|m| preprocess::load_mask(m, rgb.width(), rgb.height()).expect("mask"));
        let inputs = ConceptInputs::new(&rgb, mask.as_ref(), &params()).expect("preprocess");
        let level = 1.0 / 255.0 / 0.2613 + 1e-5; // one uint8 level after the smallest std
        for (key, got) in [
            ("pixels_global", &inputs.global_pixels),
            ("pixels_local", &inputs.local_pixels),
        ] {
            let want: Array3<f32> = case.f32::<ndarray::Ix4>(key).index_axis_move(Axis(0), 0);
            let worst = got
                .iter()
                .zip(&want)
                .map(|(a, b)| (a - b).abs())
                .fold(0.0f32, f32::max);
            let exact = got
                .iter()
                .zip(&want)
                .filter(|(a, b)| (*a - *b).abs() < 1e-6)
                .count();
            println!(
                "{} {key}: max abs {worst:.2e}, {exact}/{} exact",
                case.name,
                want.len()
            );
            assert!(worst <= level, "{} {key}: {worst} > one level", case.name);
        }
        let grid: Array1<f32> = case
            .f32::<ndarray::Ix2>("mask_grid")
            .index_axis_move(Axis(0), 0);
        assert_eq!(inputs.mask_grid, grid, "{}: mask grid", case.name);
    }
}

#[test]
fn concept_encoding_matches_reference() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let mut engine = open();
    for case in cases() {
        let global: Array3<f32> = case
            .f32::<ndarray::Ix4>("pixels_global")
            .index_axis_move(Axis(0), 0);
        let local: Array3<f32> = case
            .f32::<ndarray::Ix4>("pixels_local")
            .index_axis_move(Axis(0), 0);
        let grid: Array1<f32> = case
            .f32::<ndarray::Ix2>("mask_grid")
            .index_axis_move(Axis(0), 0);
        let got = engine
            .encode_pixels(&global, &local, &grid)
            .expect("encode");
        let want = case.concept();
        assert!(
            rel_err(
                &format!("{} word_embeddings", case.name),
                &got.word_embeddings,
                &want.word_embeddings
            ) <= 1e-4
        );
        assert!(
            rel_err(
                &format!("{} local_embeddings", case.name),
                &got.local_embeddings,
                &want.local_embeddings
            ) <= 1e-4
        );
    }
}

#[test]
fn tokens_and_text_embeddings_match_reference() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let mut engine = open();
    for case in cases() {
        let (ids, index) = engine
            .tokenize(&case.prompt, &case.placeholder, false)
            .expect("tokenize");
        let want_ids = case.npy::<i64>("input_ids");
        assert_eq!(
            ids.to_vec(),
            want_ids.iter().copied().collect::<Vec<_>>(),
            "{}: ids",
            case.name
        );
        assert_eq!(
            index, case.placeholder_index,
            "{}: placeholder index",
            case.name
        );
        let (cond, uncond) = engine
            .prompt_embeddings(&case.concept(), &ids, index)
            .expect("text");
        assert!(
            rel_err(
                &format!("{} text_cond", case.name),
                &cond,
                &case.f32("text_cond")
            ) <= 1e-4
        );
        assert!(
            rel_err(
                &format!("{} text_uncond", case.name),
                &uncond,
                &case.f32("text_uncond")
            ) <= 1e-4
        );
    }
}

#[test]
fn scheduler_and_noise_match_reference() {
    for case in cases() {
        let scheduler = SchedulerConfig::default()
            .build(case.scheduler(), case.steps, TorchGenerator::new(case.seed))
            .expect("scheduler");
        let check = |label: &str, got: &[f32], want: &[f32]| {
            assert_eq!(got.len(), want.len(), "{label}");
            for (i, (g, w)) in got.iter().zip(want).enumerate() {
                let tol = 1e-6 * w.abs().max(1e-3);
                assert!(
                    (g - w).abs() <= tol,
                    "{} {label}[{i}]: {g} vs {w}",
                    case.name
                );
            }
        };
        let sigmas = case.npy::<f32>("sigmas");
        check(
            "sigmas",
            scheduler.sigmas(),
            sigmas.as_slice().expect("contiguous"),
        );
        let timesteps = case.npy::<f32>("timesteps");
        check(
            "timesteps",
            scheduler.timesteps(),
            timesteps.as_slice().expect("contiguous"),
        );
        // LMS cases also pin the coefficients of each step (the other schedulers are checked
        // step by step against diffusers in their unit tests and through the latents here).
        if case.scheduler() == SchedulerKind::Lms {
            check_lms_coefficients(&case);
        }
        let init: Array4<f32> = case.f32("init_latents");
        let noise = elite_ort::noise::torch_randn(case.seed, init.len());
        let sigma = scheduler.init_noise_sigma();
        let worst = noise
            .iter()
            .zip(&init)
            .map(|(n, w)| (n * sigma - w).abs() / sigma)
            .fold(0.0f32, f32::max);
        println!(
            "{} noise vs torch: max abs {worst:.2e} (before × σ)",
            case.name
        );
        assert!(
            worst <= 1e-6,
            "{}: noise differs from torch by {worst}",
            case.name
        );
    }
}

fn check_lms_coefficients(case: &Case) {
    let lms = LmsConfig::default().build(case.steps).expect("LMS");
    let table: Array2<f64> = case
        .npy::<f64>("lms_coefficients")
        .into_dimensionality()
        .expect("2d");
    for (k, row) in table.outer_iter().enumerate() {
        for (j, c) in lms.coefficients(k).iter().enumerate() {
            let w = row[j];
            assert!(
                (c - w).abs() <= 1e-6 * w.abs().max(1e-6),
                "{} coefficient [{k}][{j}]: {c} vs {w}",
                case.name
            );
        }
    }
}

/// Runs the golden case's denoising loop from its recorded inputs (text embeddings and initial
/// latents) as one job; the trace holds the latents.
fn denoise_case(engine: &mut Engine, case: &Case) -> Trace {
    let request = engine
        .validate(case.request(engine))
        .expect("valid request");
    let text = |key: &str| case.f32::<ndarray::Ix3>(key).index_axis_move(Axis(0), 0);
    let job = engine
        .new_job(request, Arc::new(case.concept()))
        .expect("job")
        .with_initial_latents(case.f32("init_latents"))
        .expect("latents of the request's shape")
        .with_text(text("text_cond"), text("text_uncond"));
    run_job(engine, job).trace
}

#[test]
fn denoising_and_decode_match_reference() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let mut engine = open();
    for case in cases() {
        let trace = denoise_case(&mut engine, &case);
        for (k, key) in [
            (1, "latents_step1"),
            (2, "latents_step2"),
            (case.steps, "latents_last"),
        ] {
            let got = trace
                .latents
                .get(&k)
                .unwrap_or_else(|| panic!("step {k} not recorded"));
            assert!(rel_err(&format!("{} {key}", case.name), got, &case.f32(key)) <= 1e-4);
        }
        // Decode the golden final latents so the image check is about the decoder alone.
        let images = engine.decode(&case.f32("latents_last")).expect("decode");
        assert_image_close(
            &format!("{} decode", case.name),
            &images[0],
            &case.npy::<u8>("image"),
        );
    }
}

#[test]
fn end_to_end_from_image_files() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let mut engine = open();
    for case in cases() {
        check_end_to_end(&mut engine, &case, "end-to-end");
    }
}

/// The whole pipeline from the case's image files: final latents and image against the golden.
fn check_end_to_end(engine: &mut Engine, case: &Case, label: &str) {
    let concept = engine
        .encode_concept(&case.image_path(), case.mask_path().as_deref())
        .expect("concept");
    let request = engine
        .validate(case.request(engine))
        .expect("valid request");
    let job = engine.new_job(request, Arc::new(concept)).expect("job");
    let generation = run_job(engine, job);
    assert_eq!(generation.trace.placeholder_index, case.placeholder_index);
    let last = &generation.trace.latents[&case.steps];
    assert!(
        rel_err(
            &format!("{} {label}: latents_last", case.name),
            last,
            &case.f32("latents_last")
        ) <= 1e-4
    );
    assert_image_close(
        &format!("{} {label}: image", case.name),
        &generation.images[0],
        &case.npy::<u8>("image"),
    );
}

/// The optimised-graph cache (first start writes it, second start loads from it) and the
/// checksum stamps change nothing: the cheapest case end to end, both times.
#[test]
fn end_to_end_through_the_graph_cache() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let cache = tempfile::tempdir().expect("temp dir");
    let case = cases()
        .into_iter()
        .min_by_key(|c| c.steps * c.height * c.width)
        .expect("a case");
    for start in ["first start (writes the cache)", "second start (reads it)"] {
        // The engine keeps optimised graphs in `graphs/` of its cache directory.
        let config = EngineConfig {
            verify_checksums: true,
            cache_dir: Some(cache.path().to_path_buf()),
            ..EngineConfig::default()
        };
        let mut engine = Engine::open(root().join(BUNDLE), &config).expect("tiny bundle opens");
        check_end_to_end(&mut engine, &case, start);
        let entries = std::fs::read_dir(cache.path().join("graphs"))
            .expect("graph cache written")
            .filter_map(|e| e.ok())
            .filter(|e| e.path().is_dir() && !e.file_name().to_string_lossy().contains("tmp"))
            .count();
        assert_eq!(entries, 6, "{start}: one cache entry per graph");
    }
}

/// Guidance as two batch-1 UNet calls (`--cfg split`) gives the reference's latents too; the
/// other golden tests run the default, one batch-2 call.
#[test]
fn split_guidance_matches_reference() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let case = cases()
        .into_iter()
        .min_by_key(|c| c.steps * c.height * c.width)
        .expect("a case");
    for mode in [CfgMode::Batched, CfgMode::Split] {
        let config = EngineConfig {
            cfg: mode,
            ..EngineConfig::default()
        };
        let mut engine = Engine::open(root().join(BUNDLE), &config).expect("tiny bundle opens");
        assert_eq!(engine.cfg_mode(), mode);
        let trace = denoise_case(&mut engine, &case);
        let got = &trace.latents[&case.steps];
        let label = format!("{} {mode:?} latents_last", case.name);
        assert!(rel_err(&label, got, &case.f32("latents_last")) <= 1e-4);
    }
}

/// A JPEG gives the concept of Pillow's decoding of it (what the official code sees): the
/// decoder reproduces Pillow's pixels exactly (tests/jpeg_matrix.rs), so everything after it
/// is the same computation on the same input. Tolerance 1e-6 relative, as the issue states;
/// measured: identical.
#[test]
fn a_jpeg_gives_the_concept_of_pillows_decoding_of_it() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let mut engine = open();
    let images = root().join("tests/golden/images");
    let mask = images.join("chelsea_mask.png");
    let from_jpeg = engine
        .encode_concept(&images.join("chelsea.jpg"), Some(&mask))
        .expect("jpeg concept");
    let from_png = engine
        .encode_concept(&images.join("chelsea_jpeg_pillow.png"), Some(&mask))
        .expect("png concept");
    for (label, a, b) in [
        (
            "word",
            &from_jpeg.word_embeddings,
            &from_png.word_embeddings,
        ),
        (
            "local",
            &from_jpeg.local_embeddings,
            &from_png.local_embeddings,
        ),
    ] {
        let rel = rel_err(&format!("jpeg vs Pillow-decoded png: {label}"), a, b);
        assert!(rel <= 1e-6, "{label}: {rel}");
    }
}

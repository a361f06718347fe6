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
//! - scheduler σ / timesteps / coefficients: 1e-6 relative (RUNTIME_NOTES: f32 emulation).
//! - noise: 1e-6 absolute (torch's own vectorised maths explains the last ulps).
//! - latents after steps 1, 2 and the last: max |Δ| ≤ 1e-4 · max |ref|.
//! - image: ≥ 99.9 % of values within one level, none more than 3 levels off.
//! - preprocessing: Pillow-compatible resize, so pixels within one uint8 level after
//!   normalisation (1/255/std ≈ 0.0146), and the mask grid exactly.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Mutex;

use elite_ort::concept::{Concept, ConceptSource};
use elite_ort::pipeline::{CfgMode, Elite, GenerateOptions, LoadOptions, Trace};
use elite_ort::preprocess::{self, ConceptInputs, PreprocessParams};
use elite_ort::scheduler::LmsConfig;
use ndarray::{Array1, Array2, Array3, Array4, ArrayD, Axis};
use ndarray_npy::ReadNpyExt;
use serde::Deserialize;

const GOLDEN: &str = "tests/golden";
const BUNDLE: &str = "onnx/tiny";

#[derive(Debug, Deserialize)]
struct Cases {
    cases: Vec<Case>,
}

#[derive(Debug, Deserialize)]
#[allow(dead_code)]
struct Case {
    name: String,
    image: String,
    mask: Option<String>,
    prompt: String,
    placeholder: String,
    seed: u64,
    steps: usize,
    guidance: f32,
    lam: f32,
    height: usize,
    width: usize,
    note: String,
    placeholder_index: usize,
    official_word_index: usize,
    files: BTreeMap<String, String>,
    #[serde(default)]
    scheduler: Option<String>,
}

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn cases() -> Vec<Case> {
    let text = std::fs::read_to_string(root().join(GOLDEN).join("cases.json")).expect("cases.json");
    serde_json::from_str::<Cases>(&text)
        .expect("cases.json parses")
        .cases
        .into_iter()
        // non-LMS cases: wired with the engine
        .filter(|c| c.scheduler.as_deref().is_none_or(|s| s == "lms"))
        .collect()
}

impl Case {
    fn npy<T: ndarray_npy::ReadableElement>(&self, key: &str) -> ArrayD<T> {
        let rel = self
            .files
            .get(key)
            .unwrap_or_else(|| panic!("{}: no {key}", self.name));
        let file = std::fs::File::open(root().join(GOLDEN).join(rel)).expect("golden file");
        ArrayD::<T>::read_npy(file).unwrap_or_else(|e| panic!("{rel}: {e}"))
    }

    fn f32<D: ndarray::Dimension>(&self, key: &str) -> ndarray::Array<f32, D> {
        self.npy::<f32>(key)
            .into_dimensionality::<D>()
            .expect("rank")
    }

    fn image_path(&self) -> PathBuf {
        root().join(GOLDEN).join(&self.image)
    }

    fn mask_path(&self) -> Option<PathBuf> {
        self.mask.as_ref().map(|m| root().join(GOLDEN).join(m))
    }

    fn options(&self, elite: &Elite) -> GenerateOptions {
        let mut o = GenerateOptions::new(self.prompt.clone(), elite.bundle());
        o.placeholder = self.placeholder.clone();
        o.seed = self.seed;
        o.steps = self.steps;
        o.guidance = self.guidance;
        o.lambda = self.lam;
        o.height = self.height;
        o.width = self.width;
        o.record_steps = vec![1, 2];
        o
    }

    fn concept(&self) -> Concept {
        Concept {
            word_embeddings: self
                .f32::<ndarray::Ix3>("word_embeddings")
                .index_axis_move(Axis(0), 0),
            local_embeddings: self
                .f32::<ndarray::Ix3>("local_embeddings")
                .index_axis_move(Axis(0), 0),
            mask_grid: self
                .f32::<ndarray::Ix2>("mask_grid")
                .index_axis_move(Axis(0), 0),
            source: ConceptSource {
                bundle: "elite-tiny".into(),
                image_name: self.image.clone(),
                ..ConceptSource::default()
            },
        }
    }
}

/// ONNX Runtime allows one environment per process; tests share it and take turns on the CPU.
static SERIAL: Mutex<()> = Mutex::new(());

fn open() -> Elite {
    let options = LoadOptions {
        verify_checksums: true,
        ..LoadOptions::default()
    };
    Elite::open(root().join(BUNDLE), &options).expect("tiny bundle opens")
}

/// max |a − b| / max |b|, printed with its label.
fn rel_err<D: ndarray::Dimension>(
    label: &str,
    got: &ndarray::Array<f32, D>,
    want: &ndarray::Array<f32, D>,
) -> f32 {
    assert_eq!(got.shape(), want.shape(), "{label}: shape");
    let diff = got
        .iter()
        .zip(want)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0f32, f32::max);
    let scale = want
        .iter()
        .map(|v| v.abs())
        .fold(0.0f32, f32::max)
        .max(1e-12);
    let rel = diff / scale;
    println!("{label}: max abs {diff:.3e}, rel {rel:.3e}");
    rel
}

fn assert_image_close(label: &str, got: &image::RgbImage, want: &ArrayD<u8>) {
    let want = want
        .view()
        .into_dimensionality::<ndarray::Ix3>()
        .expect("HWC");
    assert_eq!(
        (got.height() as usize, got.width() as usize, 3),
        want.dim(),
        "{label}: size"
    );
    let mut off_by_one = 0usize;
    let mut worst = 0i32;
    for (y, x, px) in got
        .enumerate_pixels()
        .map(|(x, y, p)| (y as usize, x as usize, p))
    {
        for c in 0..3 {
            let d = (i32::from(px.0[c]) - i32::from(want[[y, x, c]])).abs();
            worst = worst.max(d);
            if d > 1 {
                off_by_one += 1;
            }
        }
    }
    let frac = off_by_one as f64 / want.len() as f64;
    println!(
        "{label}: {off_by_one} values more than one level off ({:.4} %), worst {worst}",
        frac * 100.0
    );
    assert!(
        frac <= 1e-3,
        "{label}: {frac} of values more than one level off"
    );
    assert!(worst <= 3, "{label}: a value is {worst} levels off");
}

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
    let mut elite = open();
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
        let got = elite.encode_pixels(&global, &local, &grid).expect("encode");
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
    let mut elite = open();
    for case in cases() {
        let (ids, index) = elite
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
        let (cond, uncond) = elite
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
        let scheduler = LmsConfig::default().build(case.steps).expect("scheduler");
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
        let table: Array2<f64> = case
            .npy::<f64>("lms_coefficients")
            .into_dimensionality()
            .expect("2d");
        for (k, row) in table.outer_iter().enumerate() {
            for (j, c) in scheduler.coefficients(k).iter().enumerate() {
                let w = row[j];
                assert!(
                    (c - w).abs() <= 1e-6 * w.abs().max(1e-6),
                    "{} coefficient [{k}][{j}]: {c} vs {w}",
                    case.name
                );
            }
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

/// Runs the golden case's denoising loop from its recorded inputs; the trace holds the latents.
fn denoise_case(elite: &mut Elite, case: &Case) -> Trace {
    let mut scheduler = LmsConfig::default().build(case.steps).expect("scheduler");
    let mut trace = Trace::default();
    let options = case.options(elite);
    elite
        .denoise(
            &case.concept(),
            &case.f32("text_cond"),
            &case.f32("text_uncond"),
            case.placeholder_index,
            case.f32("init_latents"),
            &options,
            &mut scheduler,
            &mut trace,
            &mut |_| {},
        )
        .expect("denoise");
    trace
}

#[test]
fn denoising_and_decode_match_reference() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let mut elite = open();
    for case in cases() {
        let trace = denoise_case(&mut elite, &case);
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
        let images = elite.decode(&case.f32("latents_last")).expect("decode");
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
    let mut elite = open();
    for case in cases() {
        check_end_to_end(&mut elite, &case, "end-to-end");
    }
}

/// The whole pipeline from the case's image files: final latents and image against the golden.
fn check_end_to_end(elite: &mut Elite, case: &Case, label: &str) {
    let concept = elite
        .encode_concept(&case.image_path(), case.mask_path().as_deref())
        .expect("concept");
    let generation = elite
        .generate(&concept, &case.options(elite), &mut |_| {})
        .expect("generate");
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
        let mut options = LoadOptions {
            verify_checksums: true,
            cache_dir: Some(cache.path().to_path_buf()),
            ..LoadOptions::default()
        };
        options.execution.graph_cache = Some(cache.path().join("graphs"));
        let mut elite = Elite::open(root().join(BUNDLE), &options).expect("tiny bundle opens");
        check_end_to_end(&mut elite, &case, start);
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
        let options = LoadOptions {
            cfg: mode,
            ..LoadOptions::default()
        };
        let mut elite = Elite::open(root().join(BUNDLE), &options).expect("tiny bundle opens");
        assert_eq!(elite.cfg_mode(), mode);
        let trace = denoise_case(&mut elite, &case);
        let got = &trace.latents[&case.steps];
        let label = format!("{} {mode:?} latents_last", case.name);
        assert!(rel_err(&label, got, &case.f32("latents_last")) <= 1e-4);
    }
}

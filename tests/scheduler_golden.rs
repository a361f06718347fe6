//! The golden cases of the schedulers other than LMS (`tests/golden/cases.json`, `scheduler` ≠
//! "lms") end to end through the tiny bundle's UNet and VAE, with the library's schedulers and
//! torch-compatible generator.
//!
//! The engine does not run these schedulers yet (tests/golden.rs and tests/cli.rs skip these
//! cases until it does), so this drives the UNet graph itself, as the reference pipeline does:
//! two batch-1 calls per step (conditional with the local branch and λ, unconditional with
//! λ = 0, which is exactly the global-only UNet), guidance `uncond + g·(cond − uncond)` in f32,
//! then the scheduler's step. The inputs are the golden stages (text and local embeddings,
//! placeholder index), so what is under test is the noise, the scheduler and their order. The
//! golden data is written by `python -m export golden` (export/golden.py) from diffusers'
//! scheduler objects; nothing here is produced by the code under test.
//!
//! Tolerances, as tests/golden.rs for the LMS cases:
//! - timesteps: exact; σ: 1e-6 relative (our σ table can sit one float32 ulp from the one of
//!   the machine that wrote the golden data: torch's square root is MKL's, CPU-dependent).
//! - initial noise: 1e-6 absolute (torch's vectorised Box–Muller, see src/noise.rs).
//! - latents after steps 1, 2 and the last: max |Δ| ≤ 1e-4 · max |ref| (ONNX Runtime vs
//!   PyTorch kernels differ in summation order, ~1e-6).
//! - image: ≥ 99.9 % of values within one level, none more than 3 levels off.

use std::collections::BTreeMap;
use std::path::PathBuf;

use elite_ort::noise::TorchGenerator;
use elite_ort::pipeline::{Elite, LoadOptions};
use elite_ort::runtime::{create_session, init_environment, ExecutionConfig};
use elite_ort::scheduler::{Scheduler, SchedulerConfig, SchedulerKind};
use ndarray::{Array1, Array3, Array4, ArrayD, Ix3, Ix4};
use ndarray_npy::ReadNpyExt;
use ort::session::Session;
use ort::value::Tensor;
use serde::Deserialize;

const GOLDEN: &str = "tests/golden";
const BUNDLE: &str = "onnx/tiny";

#[derive(Debug, Deserialize)]
struct Cases {
    cases: Vec<Case>,
}

#[derive(Debug, Deserialize)]
struct Case {
    name: String,
    seed: u64,
    steps: usize,
    guidance: f32,
    lam: f32,
    placeholder_index: usize,
    files: BTreeMap<String, String>,
    #[serde(default)]
    scheduler: Option<String>,
}

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

impl Case {
    fn npy<T: ndarray_npy::ReadableElement>(&self, key: &str) -> ArrayD<T> {
        let rel = &self.files[key];
        let file = std::fs::File::open(root().join(GOLDEN).join(rel)).expect("golden file");
        ArrayD::<T>::read_npy(file).unwrap_or_else(|e| panic!("{rel}: {e}"))
    }

    fn f32<D: ndarray::Dimension>(&self, key: &str) -> ndarray::Array<f32, D> {
        self.npy::<f32>(key)
            .into_dimensionality::<D>()
            .expect("rank")
    }

    fn kind(&self) -> Option<SchedulerKind> {
        let name = self.scheduler.as_deref().unwrap_or("lms");
        let kind: SchedulerKind = name.parse().expect("a known scheduler");
        (kind != SchedulerKind::Lms).then_some(kind)
    }
}

fn other_cases() -> Vec<(SchedulerKind, Case)> {
    let text = std::fs::read_to_string(root().join(GOLDEN).join("cases.json")).expect("cases");
    serde_json::from_str::<Cases>(&text)
        .expect("cases.json parses")
        .cases
        .into_iter()
        .filter_map(|c| c.kind().map(|k| (k, c)))
        .collect()
}

/// max |a − b| / max |b|, printed with its label.
fn rel_err(label: &str, got: &[f32], want: &[f32]) -> f32 {
    assert_eq!(got.len(), want.len(), "{label}: length");
    let diff = got
        .iter()
        .zip(want)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0f32, f32::max);
    let scale = want.iter().fold(1e-12f32, |m, v| m.max(v.abs()));
    println!("{label}: max abs {diff:.3e}, rel {:.3e}", diff / scale);
    diff / scale
}

/// One UNet call at batch 1.
fn unet(
    session: &mut Session,
    sample: &Array4<f32>,
    t: f32,
    text: &Array3<f32>,
    local: &Array3<f32>,
    index: usize,
    lambda: f32,
) -> Array4<f32> {
    let outputs = session
        .run(ort::inputs![
            "sample" => Tensor::from_array(sample.clone()).unwrap(),
            "timestep" => Tensor::from_array(Array1::from_elem(1, t)).unwrap(),
            "encoder_hidden_states" => Tensor::from_array(text.clone()).unwrap(),
            "local_embeddings" => Tensor::from_array(local.clone()).unwrap(),
            "local_index" => Tensor::from_array(Array1::from_elem(1, index as i64)).unwrap(),
            "local_lambda" => Tensor::from_array(Array1::from_elem(1, lambda)).unwrap(),
        ])
        .expect("unet runs");
    outputs["noise_pred"]
        .try_extract_array::<f32>()
        .expect("f32 noise_pred")
        .into_dimensionality::<Ix4>()
        .expect("rank 4")
        .to_owned()
}

/// Schedule and initial noise against the golden stages; returns the scheduler built on the
/// generator that drew the noise (euler-a continues its stream), and the initial latents.
fn start(kind: SchedulerKind, case: &Case) -> (Box<dyn Scheduler>, Array4<f32>) {
    let init: Array4<f32> = case.f32("init_latents");
    let mut generator = TorchGenerator::new(case.seed);
    let noise = generator.randn(init.len());
    let scheduler = SchedulerConfig::default()
        .build(kind, case.steps, generator)
        .expect("scheduler");
    let timesteps = case.npy::<f32>("timesteps");
    assert_eq!(
        scheduler.timesteps(),
        timesteps.as_slice().unwrap(),
        "{}",
        case.name
    );
    let sigmas = case.npy::<f32>("sigmas");
    for (i, (a, b)) in scheduler.sigmas().iter().zip(sigmas.iter()).enumerate() {
        assert!(
            (a - b).abs() <= 1e-6 * b.abs().max(1e-3),
            "{} σ[{i}]: {a} vs {b}",
            case.name
        );
    }
    let sigma = scheduler.init_noise_sigma();
    let worst = noise
        .iter()
        .zip(&init)
        .map(|(n, w)| (n * sigma - w).abs() / sigma)
        .fold(0.0f32, f32::max);
    println!("{} initial noise vs torch: max abs {worst:.2e}", case.name);
    assert!(worst <= 1e-6, "{}: noise differs by {worst}", case.name);
    let latents = Array4::from_shape_vec(init.dim(), noise.iter().map(|n| n * sigma).collect())
        .expect("shape");
    (scheduler, latents)
}

#[test]
fn other_schedulers_reproduce_their_golden_cases() {
    let cases = other_cases();
    assert!(
        cases
            .iter()
            .any(|(k, _)| *k == SchedulerKind::DpmPp2mKarras)
            && cases
                .iter()
                .any(|(k, _)| *k == SchedulerKind::EulerAncestral),
        "the golden data has the dpmpp-2m-karras and euler-a cases"
    );
    let env = init_environment(None).unwrap_or_else(|e| panic!("{e}"));
    let bundle = root().join(BUNDLE);
    let mut session = create_session(env, &bundle.join("unet.onnx"), &ExecutionConfig::default())
        .expect("unet session");
    let mut elite = Elite::open(&bundle, &LoadOptions::default()).expect("tiny bundle opens");
    for (kind, case) in &cases {
        let (mut scheduler, mut latents) = start(*kind, case);
        let cond: Array3<f32> = case.f32("text_cond");
        let uncond: Array3<f32> = case.f32("text_uncond");
        let local: Array3<f32> = case.f32::<Ix3>("local_embeddings");
        let steps = scheduler.num_steps();
        for k in 0..steps {
            let t = scheduler.timesteps()[k];
            let mut scaled = latents.clone();
            scheduler.scale_model_input(k, scaled.as_slice_mut().unwrap());
            let index = case.placeholder_index;
            let c = unet(&mut session, &scaled, t, &cond, &local, index, case.lam);
            let u = unet(&mut session, &scaled, t, &uncond, &local, index, 0.0);
            let guided = ndarray::Zip::from(&c)
                .and(&u)
                .map_collect(|&ec, &eu| eu + case.guidance * (ec - eu));
            scheduler
                .step(
                    k,
                    guided.as_slice().unwrap(),
                    latents.as_slice_mut().unwrap(),
                )
                .expect("step");
            let key = match k + 1 {
                done if done == steps => "latents_last",
                1 => "latents_step1",
                2 => "latents_step2",
                _ => continue,
            };
            let want: Array4<f32> = case.f32(key);
            let label = format!("{} ({kind}) {key}", case.name);
            let err = rel_err(
                &label,
                latents.as_slice().unwrap(),
                want.as_slice().unwrap(),
            );
            assert!(err <= 1e-4, "{label}");
        }
        let images = elite.decode(&latents).expect("decode");
        let want = case
            .npy::<u8>("image")
            .into_dimensionality::<Ix3>()
            .expect("HWC");
        let (mut off, mut worst) = (0usize, 0i32);
        for (x, y, px) in images[0].enumerate_pixels() {
            for c in 0..3 {
                let d = (i32::from(px.0[c]) - i32::from(want[[y as usize, x as usize, c]])).abs();
                worst = worst.max(d);
                off += usize::from(d > 1);
            }
        }
        println!(
            "{} image: {off} values more than one level off, worst {worst}",
            case.name
        );
        assert!(
            off as f64 <= 1e-3 * want.len() as f64 && worst <= 3,
            "{}",
            case.name
        );
    }
}

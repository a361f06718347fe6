//! Shared by the integration tests: the golden cases (`tests/golden/cases.json`, written by
//! `python -m export golden`), the tiny bundle, and the comparisons with their tolerances.
#![allow(dead_code)] // each test binary uses its own subset

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Mutex;

use elite_ort::concept::{Concept, ConceptSource};
use elite_ort::engine::{Engine, EngineConfig};
use elite_ort::job::{Generation, Job, Outcome};
use elite_ort::request::GenerateRequest;
use elite_ort::scheduler::SchedulerKind;
use ndarray::{ArrayD, Axis};
use ndarray_npy::ReadNpyExt;
use serde::Deserialize;

pub const GOLDEN: &str = "tests/golden";
pub const BUNDLE: &str = "onnx/tiny";

#[derive(Debug, Deserialize)]
struct Cases {
    cases: Vec<Case>,
}

#[derive(Debug, Deserialize)]
#[allow(dead_code)]
pub struct Case {
    pub name: String,
    pub image: String,
    pub mask: Option<String>,
    pub prompt: String,
    pub placeholder: String,
    pub seed: u64,
    pub steps: usize,
    pub guidance: f32,
    pub lam: f32,
    pub height: usize,
    pub width: usize,
    pub note: String,
    pub placeholder_index: usize,
    pub official_word_index: usize,
    pub files: BTreeMap<String, String>,
    /// A scheduler name; absent in cases written before schedulers other than LMS existed.
    #[serde(default)]
    pub scheduler: Option<String>,
}

pub fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

pub fn cases() -> Vec<Case> {
    let text = std::fs::read_to_string(root().join(GOLDEN).join("cases.json")).expect("cases.json");
    serde_json::from_str::<Cases>(&text)
        .expect("cases.json parses")
        .cases
}

impl Case {
    pub fn npy<T: ndarray_npy::ReadableElement>(&self, key: &str) -> ArrayD<T> {
        let rel = self
            .files
            .get(key)
            .unwrap_or_else(|| panic!("{}: no {key}", self.name));
        let file = std::fs::File::open(root().join(GOLDEN).join(rel)).expect("golden file");
        ArrayD::<T>::read_npy(file).unwrap_or_else(|e| panic!("{rel}: {e}"))
    }

    pub fn f32<D: ndarray::Dimension>(&self, key: &str) -> ndarray::Array<f32, D> {
        self.npy::<f32>(key)
            .into_dimensionality::<D>()
            .expect("rank")
    }

    pub fn image_path(&self) -> PathBuf {
        root().join(GOLDEN).join(&self.image)
    }

    pub fn mask_path(&self) -> Option<PathBuf> {
        self.mask.as_ref().map(|m| root().join(GOLDEN).join(m))
    }

    /// The case's scheduler (LMS when the case names none).
    pub fn scheduler(&self) -> SchedulerKind {
        self.scheduler
            .as_deref()
            .map_or(SchedulerKind::Lms, |s| s.parse().expect("a scheduler name"))
    }

    pub fn request(&self, engine: &Engine) -> GenerateRequest {
        let mut o = GenerateRequest::new(self.prompt.clone(), engine.bundle());
        o.scheduler = self.scheduler();
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

    pub fn concept(&self) -> Concept {
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
pub static SERIAL: Mutex<()> = Mutex::new(());

pub fn open() -> Engine {
    let config = EngineConfig {
        verify_checksums: true,
        ..EngineConfig::default()
    };
    Engine::open(root().join(BUNDLE), &config).expect("tiny bundle opens")
}

/// Runs one job through the engine to its end and returns its result.
pub fn run_job(engine: &mut Engine, job: Job) -> Generation {
    let id = engine.submit(job);
    engine.run_until_idle(&|| false);
    let finished = engine.take_finished();
    let job = finished
        .into_iter()
        .find(|j| j.id == id)
        .expect("the job finished");
    match job.outcome {
        Outcome::Done(generation) => *generation,
        other => panic!("{id}: {other:?}"),
    }
}

/// max |a − b| / max |b|, printed with its label.
pub fn rel_err<D: ndarray::Dimension>(
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

pub fn assert_image_close(label: &str, got: &image::RgbImage, want: &ArrayD<u8>) {
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

//! Step-level batching leaves every job's result unchanged: a job batched with others — which
//! start at other steps and have other schedulers, step counts, sizes, λ (0 included),
//! guidance, seeds, prompts and concepts, and one of which fails and one of which is cancelled
//! mid-way — ends
//! with the latents and image it gets alone, and alone it still matches the golden data.
//!
//! Tolerances: rows of different jobs are independent in the UNet (every input is per row and
//! ELITE's attention max is per sample), so batching changes only which kernels' blocking the
//! rows share; measured differences are at the float32 rounding level. Latents: max |Δ| ≤
//! 1e-5 · max |alone|; images: no value more than one level apart (uint8 rounding of the VAE
//! output can flip at a .5 boundary). The job alone is held to the golden tolerances of
//! tests/golden.rs (latents 1e-4 · max, images ≥ 99.9 % within one level, none over 3).

mod common;

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use common::{assert_image_close, cases, open, rel_err, Case, SERIAL};
use elite_ort::call_size::CallSizing;
use elite_ort::concept::Concept;
use elite_ort::engine::{Engine, EngineConfig, Work};
use elite_ort::job::{CancelToken, Generation, Job, JobEvent, JobId, Outcome};
use elite_ort::request::GenerateRequest;
use elite_ort::scheduler::SchedulerKind;
use ndarray::Array4;

/// A job of the test: a golden case's settings, or variations of them.
#[derive(Clone)]
struct Spec {
    label: &'static str,
    concept: Arc<Concept>,
    prompt: String,
    steps: usize,
    guidance: f32,
    lambda: f32,
    height: usize,
    width: usize,
    seed: u64,
    images: usize,
    scheduler: SchedulerKind,
}

impl Spec {
    fn from_case(label: &'static str, case: &Case) -> Spec {
        Spec {
            label,
            concept: Arc::new(case.concept()),
            prompt: case.prompt.clone(),
            steps: case.steps,
            guidance: case.guidance,
            lambda: case.lam,
            height: case.height,
            width: case.width,
            seed: case.seed,
            images: 1,
            scheduler: case.scheduler(),
        }
    }

    fn request(&self, engine: &Engine) -> GenerateRequest {
        let mut r = GenerateRequest::new(self.prompt.clone(), engine.bundle());
        r.steps = self.steps;
        r.guidance = self.guidance;
        r.lambda = self.lambda;
        r.height = self.height;
        r.width = self.width;
        r.seed = self.seed;
        r.num_images = self.images;
        r.scheduler = self.scheduler;
        r
    }

    fn job(&self, engine: &mut Engine) -> Job {
        let request = engine
            .validate(self.request(engine))
            .expect("valid request");
        engine.new_job(request, self.concept.clone()).expect("job")
    }
}

fn case(name: &str) -> Case {
    cases()
        .into_iter()
        .find(|c| c.name == name)
        .unwrap_or_else(|| panic!("golden case {name}"))
}

fn final_latents(g: &Generation) -> &Array4<f32> {
    g.trace.latents.values().last().expect("last latents")
}

fn done(outcome: Outcome, label: &str) -> Generation {
    match outcome {
        Outcome::Done(g) => *g,
        other => panic!("{label}: {other:?}"),
    }
}

/// Each spec alone, one engine run per job.
fn alone(engine: &mut Engine, specs: &[Spec]) -> Vec<Generation> {
    specs
        .iter()
        .map(|spec| {
            let job = spec.job(engine);
            engine.submit(job);
            engine.run_until_idle(&|| false);
            let mut finished = engine.take_finished();
            assert_eq!(finished.len(), 1);
            done(finished.remove(0).outcome, spec.label)
        })
        .collect()
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
fn batched_jobs_match_the_same_jobs_alone() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let nomask = case("cat_nomask");
    let edit = case("second_edit");
    let multi = case("multitoken_word");
    let mut local_zero = Spec::from_case("λ 0, guidance 2, seed 3", &nomask);
    local_zero.concept = Arc::new(edit.concept());
    local_zero.lambda = 0.0;
    local_zero.guidance = 2.0;
    local_zero.seed = 3;
    local_zero.steps = 5;
    local_zero.prompt = "S in the snow".into();
    local_zero.scheduler = SchedulerKind::DpmPp2mKarras;
    let mut two_images = Spec::from_case("-n 2, 6 steps", &nomask);
    two_images.images = 2;
    two_images.steps = 6;
    two_images.seed = 11;
    // Its own generator draws fresh noise every step, whatever shares its calls.
    two_images.scheduler = SchedulerKind::EulerAncestral;
    let specs = [
        Spec::from_case("cat_nomask", &nomask),
        Spec::from_case("second_edit", &edit),
        Spec::from_case("multitoken_word", &multi),
        local_zero,
        two_images,
    ];
    // The two fast schedulers' golden cases (other schedulers, other step counts).
    let karras = case("cat_dpmpp_karras");
    let ancestral = case("edit_euler_a");
    let specs = [
        specs.to_vec(),
        vec![
            Spec::from_case("cat_dpmpp_karras", &karras),
            Spec::from_case("edit_euler_a", &ancestral),
        ],
    ]
    .concat();
    let golden = [
        Some(&nomask),
        Some(&edit),
        Some(&multi),
        None,
        None,
        Some(&karras),
        Some(&ancestral),
    ];

    let mut engine = open();
    let alone = alone(&mut engine, &specs);
    for ((spec, generation), case) in specs.iter().zip(&alone).zip(golden) {
        if let Some(case) = case {
            let rel = rel_err(
                &format!("{} alone: latents_last", spec.label),
                final_latents(generation),
                &case.f32("latents_last"),
            );
            assert!(rel <= 1e-4, "{}: {rel}", spec.label);
            assert_image_close(
                &format!("{} alone: image", spec.label),
                &generation.images[0],
                &case.npy::<u8>("image"),
            );
        }
    }

    // Batched: 6 rows per call, so jobs share calls, a call holds parts of jobs, and the 2-image
    // job (4 rows) spans calls. Jobs join at different times, so they run at different steps.
    let config = EngineConfig {
        verify_checksums: true,
        max_batch: Some(6),
        // Every call as full as it can be (not what the clock prefers): the mix under test.
        call_sizing: CallSizing::Fixed,
        ..EngineConfig::default()
    };
    let mut engine = Engine::open(common::root().join(common::BUNDLE), &config).expect("opens");
    let mut ids: BTreeMap<JobId, usize> = BTreeMap::new();
    let mut submit = |engine: &mut Engine, i: usize| {
        let job = specs[i].job(engine);
        ids.insert(engine.submit(job), i);
    };
    submit(&mut engine, 0);
    submit(&mut engine, 3);

    // A job that fails validation never joins; the others are not disturbed.
    let mut bad = specs[0].request(&engine);
    bad.steps = 0;
    assert!(engine.validate(bad).is_err());

    // A job cancelled after its second step.
    let cancel = CancelToken::new();
    let token = cancel.clone();
    let cancelled_steps = Arc::new(Mutex::new(0usize));
    let counter = cancelled_steps.clone();
    let cancelled = specs[1]
        .job(&mut engine)
        .with_cancel(cancel)
        .with_events(Box::new(move |event: JobEvent| {
            if let JobEvent::Step { step, .. } = event {
                *counter.lock().unwrap() = step;
                if step == 2 {
                    token.cancel();
                }
            }
        }));
    let cancelled_id = engine.submit(cancelled);

    // A job whose concept makes its rows non-finite fails alone, mid-batch.
    let mut poisoned = (*specs[0].concept).clone();
    poisoned.local_embeddings.fill(f32::NAN);
    let request = engine.validate(specs[0].request(&engine)).unwrap();
    let failing = engine.new_job(request, Arc::new(poisoned)).expect("job");
    let failing_id = engine.submit(failing);

    let mut ticks = 0;
    let mut later = vec![1, 2, 4, 5, 6];
    while engine.active() > 0 || !later.is_empty() {
        ticks += 1;
        assert!(ticks < 10_000, "the engine does not finish");
        // Every third tick another job joins, at whatever step the others are.
        if ticks % 3 == 0 {
            if let Some(i) = later.pop() {
                submit(&mut engine, i);
            }
        }
        if engine.tick() == Work::Idle && later.is_empty() {
            break;
        }
    }
    let mut outcomes: BTreeMap<JobId, Outcome> = engine
        .take_finished()
        .into_iter()
        .map(|f| (f.id, f.outcome))
        .collect();
    assert!(
        matches!(outcomes.remove(&cancelled_id), Some(Outcome::Cancelled)),
        "the cancelled job"
    );
    assert_eq!(
        *cancelled_steps.lock().unwrap(),
        2,
        "cancelled after step 2"
    );
    match outcomes.remove(&failing_id) {
        Some(Outcome::Failed(e)) => {
            let message = e.to_string();
            assert!(message.contains("NaN"), "{message}");
        }
        other => panic!("the poisoned job: {other:?}"),
    }
    let stats = engine.stats().clone();
    println!("batched run: {stats:?}");
    assert!(stats.shared_calls > 0, "no call held several jobs");
    assert!(stats.batch_sizes.keys().any(|&rows| rows > 2), "{stats:?}");
    assert!(stats.batch_sizes.keys().all(|&rows| rows <= 6), "{stats:?}");

    for (id, outcome) in outcomes {
        let i = ids[&id];
        let spec = &specs[i];
        let batched = done(outcome, spec.label);
        let rel = rel_err(
            &format!("{} batched vs alone: final latents", spec.label),
            final_latents(&batched),
            final_latents(&alone[i]),
        );
        assert!(rel <= 1e-5, "{}: {rel}", spec.label);
        assert_eq!(batched.images.len(), spec.images);
        for (a, b) in batched.images.iter().zip(&alone[i].images) {
            let d = max_level_diff(a, b);
            println!(
                "{} batched vs alone: image max level difference {d}",
                spec.label
            );
            assert!(d <= 1, "{}: {d} levels", spec.label);
        }
    }
}

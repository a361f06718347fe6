//! The diffusers parity check every scheduler's tests run (test builds only).
//!
//! References: diffusers 0.42.1 / torch 2.15 (CPU, AVX512 machine, MKL) / numpy 2.4, written by
//! `export/fixtures_schedulers.py` into `tests/fixtures/schedulers/` from diffusers' own
//! scheduler objects configured as `export/schedulers.py` (SD v1-4's scheduler config):
//! - `runs.json`: per run (scheduler, config overrides, step count) the timesteps, σ,
//!   `init_noise_sigma`, the divisor `scale_model_input` applied at each step, and where its
//!   step outputs start in `outputs.npy`; schedule-only entries for other timestep spacings.
//! - `inputs.npy`: per step count, the unscaled initial noise and one model output per step.
//! - `fingerprints.npy`: digests of the timesteps and σ of every step count 1..1000.
//! - `train_sigmas.npy`: torch's training σ table on the machine that wrote the fixtures.
//!
//! torch's float32 square root on x86 is MKL's, and MKL's rounding depends on the CPU it runs
//! on: SD v1's σ table computed by torch on the machine that wrote the LMS fixtures differs from
//! the correctly rounded one in 190 places, on the one that wrote these in 6. So every run is
//! built twice: on the fixture machine's own table (`train_sigmas.npy`), where everything else
//! must match bit for bit, and on the runtime's table (the LMS reference machine's,
//! [`super::numerics`]), where σ may differ by that one ulp.
//!
//! Tolerances, and why:
//! - timesteps: bit-exact (numpy float64 arithmetic cast to float32, reproduced); on our table
//!   Euler's fractional Karras timesteps, which follow from σ, within 2e-5 (see below).
//! - σ: bit-exact on torch's table; within one ulp on the runtime's (the CPU-dependent root).
//! - `init_noise_sigma`: as σ, plus one ulp where it is itself a torch scalar root (Euler and
//!   Euler ancestral with `leading` spacing: `(σ_max² + 1) ** 0.5`).
//! - the `scale_model_input` divisor `(σ² + 1) ** 0.5`: within one ulp (MKL's scalar root
//!   rounds ~0.7% of inputs one ulp away from IEEE `sqrt`).
//! - each step's output: within 1e-6 of the step's scale (the largest magnitude among the
//!   sample before and after the step, at least 1), fed diffusers' own previous sample
//!   ("teacher-forced") and on its own trajectory ("free-running"). The per-step scalars use
//!   correctly rounded `sqrt`/`exp`/`expm1` where torch uses MKL's (about 1% of inputs one ulp
//!   away), so a coefficient can differ by an ulp; the update adds terms of the sample's size,
//!   so such an ulp moves the output by ~1e-7 of that scale. Measured values are printed.

use std::collections::BTreeMap;
use std::path::PathBuf;

use ndarray::{Array2, Array3};
use ndarray_npy::read_npy;
use serde_json::Value;
use sha2::{Digest, Sha256};

use super::{FinalSigmas, Scheduler, SchedulerConfig, SchedulerKind, TimestepSpacing};
use crate::noise::TorchGenerator;

/// Timesteps on our σ table: bit-exact except Euler's fractional Karras timesteps, which
/// follow from σ: σ an ulp apart (6e-8 relative) moves `t` by up to that over the smallest
/// step of log σ between training timesteps (0.0033): 2e-5, plus an ulp of `t`'s own float32
/// rounding.
const KARRAS_T_TOLERANCE: f32 = 2e-5;

/// Step outputs within this much of the step's scale on torch's own σ table (see the module
/// docs): the float32 arithmetic, up to MKL's scalar roundings.
const STEP_TOLERANCE: f64 = 1e-6;
/// The same on the runtime's σ table, whose entries can sit one ulp from this machine's torch
/// (see the module docs). The multistep solvers divide by differences of λ (h ≈ 0.03 at 100
/// steps), so an ulp in σ becomes ~1e-6 relative in a coefficient, and the fixtures' random
/// model outputs (consecutive data predictions tens apart, where a denoiser's are close) make
/// the terms it multiplies large: measured up to ~1.2e-6 of the step's scale per step.
const NATIVE_STEP_TOLERANCE: f64 = 5e-6;

fn dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/schedulers")
}

fn runs_json() -> Value {
    let path = dir().join("runs.json");
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path:?}: {e}"));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{path:?}: {e}"))
}

fn npy<T: ndarray_npy::ReadableElement, D: ndarray::Dimension>(name: &str) -> ndarray::Array<T, D> {
    let path = dir().join(name);
    read_npy(&path).unwrap_or_else(|e| panic!("reading {path:?}: {e}"))
}

fn f32s(v: &Value) -> Vec<f32> {
    v.as_array()
        .expect("array")
        .iter()
        .map(|x| x.as_f64().expect("number") as f32)
        .collect()
}

/// The runtime config for a fixture entry's diffusers overrides.
fn config(overrides: &Value) -> SchedulerConfig {
    let mut c = SchedulerConfig::default();
    for (key, value) in overrides.as_object().expect("overrides object") {
        match key.as_str() {
            "timestep_spacing" => {
                c.timestep_spacing = Some(match value.as_str().expect("spacing") {
                    "linspace" => TimestepSpacing::Linspace,
                    "leading" => TimestepSpacing::Leading,
                    "trailing" => TimestepSpacing::Trailing,
                    other => panic!("spacing {other}"),
                })
            }
            "solver_order" => c.solver_order = Some(value.as_u64().expect("order") as usize),
            "use_karras_sigmas" => c.use_karras_sigmas = value.as_bool(),
            "steps_offset" => c.steps_offset = value.as_u64().expect("offset") as usize,
            "final_sigmas_type" => {
                c.final_sigmas_type = Some(match value.as_str().expect("final") {
                    "zero" => FinalSigmas::Zero,
                    "sigma_min" => FinalSigmas::SigmaMin,
                    other => panic!("final_sigmas_type {other}"),
                })
            }
            other => panic!("fixture override {other} not mapped"),
        }
    }
    c
}

fn ulps(a: f32, b: f32) -> i64 {
    (i64::from(a.to_bits() as i32) - i64::from(b.to_bits() as i32)).abs()
}

fn kind_of(entry: &Value) -> SchedulerKind {
    entry["kind"]
        .as_str()
        .expect("kind")
        .parse()
        .expect("known kind")
}

/// Which training σ table a test builds on (see the module docs).
#[derive(Clone, Copy, PartialEq)]
enum Table {
    /// torch's, from the machine that wrote the fixtures: everything bit-exact.
    Torch,
    /// The runtime's own: σ within one ulp.
    Native,
}

fn torch_table() -> Vec<f32> {
    npy::<f32, ndarray::Ix1>("train_sigmas.npy").to_vec()
}

fn build(entry: &Value, generator: TorchGenerator, table: Table) -> Box<dyn Scheduler> {
    let steps = entry["steps"].as_u64().expect("steps") as usize;
    let table = (table == Table::Torch).then(torch_table);
    config(&entry["overrides"])
        .build_with_table(kind_of(entry), steps, generator, table)
        .unwrap_or_else(|e| panic!("{}: {e}", label(entry)))
}

/// The largest ulp distance between two equally long float32 slices.
fn max_ulps(a: &[f32], b: &[f32]) -> i64 {
    a.iter()
        .zip(b)
        .map(|(&x, &y)| ulps(x, y))
        .max()
        .unwrap_or(0)
}

fn label(entry: &Value) -> String {
    format!(
        "{} {} steps {}",
        entry["kind"].as_str().unwrap_or("?"),
        entry["steps"],
        entry["overrides"]
    )
}

/// Timesteps bit-exact; σ and `init_noise_sigma` bit-exact on torch's table, within one ulp on
/// ours; `init_noise_sigma` one ulp more where it is a torch scalar root.
fn check_schedule(entry: &Value, s: &dyn Scheduler, table: Table) {
    let what = label(entry);
    let sigma_ulps = if table == Table::Torch { 0 } else { 1 };
    let timesteps = f32s(&entry["timesteps"]);
    assert_eq!(s.timesteps().len(), timesteps.len(), "{what}: timesteps");
    assert_eq!(s.num_steps(), s.timesteps().len(), "{what}");
    if table == Table::Torch {
        assert_eq!(s.timesteps(), &timesteps[..], "{what}: timesteps");
    } else {
        for (k, (&a, &b)) in s.timesteps().iter().zip(&timesteps).enumerate() {
            // Plus the float32 rounding of t itself, which a shift that small can flip.
            let ulp = f32::from_bits(b.abs().to_bits() + 1) - b.abs();
            assert!(
                (a - b).abs() <= KARRAS_T_TOLERANCE + ulp,
                "{what}: timestep {k}: {a} vs {b}"
            );
        }
    }
    if let Some(sigmas) = entry.get("sigmas") {
        let want = f32s(sigmas);
        assert_eq!(s.sigmas().len(), want.len(), "{what}: sigmas");
        let off = max_ulps(s.sigmas(), &want);
        assert!(
            off <= sigma_ulps,
            "{what}: sigmas {off} ulps off:\n{:?}\n{want:?}",
            s.sigmas()
        );
    } else {
        assert!(s.sigmas().is_empty(), "{what}");
    }
    let init = entry["init_noise_sigma"].as_f64().expect("init") as f32;
    let leading = entry["overrides"]["timestep_spacing"] == "leading";
    let root = i64::from(leading && s.init_noise_sigma() != 1.0);
    assert!(
        ulps(s.init_noise_sigma(), init) <= sigma_ulps + root,
        "{what}: init_noise_sigma {} vs {init}",
        s.init_noise_sigma()
    );
}

/// The divisor our `scale_model_input` applies at step `k` (1 for the identity): `(σ² + 1)`'s
/// IEEE square root on our σ, checked against what `scale_model_input` does to a probe.
fn divisor(s: &dyn Scheduler, k: usize) -> f32 {
    const PROBE: f32 = 3.0;
    let mut probe = [PROBE];
    s.scale_model_input(k, &mut probe);
    if probe[0] == PROBE {
        return 1.0;
    }
    let sigma = s.sigmas()[k];
    let d = (sigma * sigma + 1.0).sqrt();
    assert_eq!(
        probe[0],
        PROBE / d,
        "{} step {k}: scale_model_input",
        s.kind()
    );
    d
}

/// Largest |a − b| over the step's scale.
fn step_error(got: &[f32], want: &[f32], before: &[f32]) -> f64 {
    let scale = before
        .iter()
        .chain(want)
        .fold(1.0_f32, |m, v| m.max(v.abs()));
    got.iter()
        .zip(want)
        .map(|(a, b)| f64::from((a - b).abs() / scale))
        .fold(0.0, f64::max)
}

struct RunErrors {
    teacher: f64,
    free: f64,
    inexact_divisors: usize,
    bit_exact_steps: usize,
}

/// The fixture's inputs of a run: the unscaled initial noise and the model outputs.
fn run_inputs(
    entry: &Value,
    inputs: &Array2<f32>,
    offsets: &BTreeMap<usize, usize>,
) -> (Vec<f32>, Vec<Vec<f32>>) {
    let steps = entry["steps"].as_u64().expect("steps") as usize;
    let row = offsets[&steps];
    let noise = inputs.row(row).to_vec();
    let eps = (1..=steps).map(|k| inputs.row(row + k).to_vec()).collect();
    (noise, eps)
}

fn check_run(
    entry: &Value,
    (noise, eps): &(Vec<f32>, Vec<Vec<f32>>),
    outputs: &Array2<f32>,
    table: Table,
) -> RunErrors {
    let what = label(entry);
    let steps = eps.len();
    let seed = entry["generator_seed"].as_u64().unwrap_or(0);
    let first = entry["output_row"].as_u64().expect("output_row") as usize;
    let want: Vec<Vec<f32>> = (0..steps)
        .map(|k| outputs.row(first + k).to_vec())
        .collect();

    let mut teacher = build(entry, TorchGenerator::new(seed), table);
    check_schedule(entry, teacher.as_ref(), table);
    let divisors = f32s(&entry["scale_divisors"]);
    let mut inexact_divisors = 0;
    // One ulp for MKL's root, one more on our table where σ itself can be an ulp apart.
    let divisor_ulps = if table == Table::Torch { 1 } else { 2 };
    for (k, &d) in divisors.iter().enumerate() {
        let ours = divisor(teacher.as_ref(), k);
        let off = ulps(ours, d);
        assert!(
            off <= divisor_ulps,
            "{what}: scale divisor {k}: {ours} vs {d}"
        );
        inexact_divisors += usize::from(off > 0);
    }
    let tolerance = if table == Table::Torch {
        STEP_TOLERANCE
    } else {
        NATIVE_STEP_TOLERANCE
    };
    let init = teacher.init_noise_sigma();
    let start: Vec<f32> = noise.iter().map(|&n| n * init).collect();

    let mut errors = RunErrors {
        teacher: 0.0,
        free: 0.0,
        inexact_divisors,
        bit_exact_steps: 0,
    };
    let mut free = build(entry, TorchGenerator::new(seed), table);
    let mut own = start.clone();
    for k in 0..steps {
        let before = if k == 0 { &start } else { &want[k - 1] };
        let mut x = before.clone();
        teacher
            .step(k, &eps[k], &mut x)
            .unwrap_or_else(|e| panic!("{what}: {e}"));
        let e = step_error(&x, &want[k], before);
        assert!(
            e <= tolerance,
            "{what}: step {k} (teacher-forced) off by {e:e}"
        );
        errors.teacher = errors.teacher.max(e);
        errors.bit_exact_steps += usize::from(x == want[k]);

        let own_before = own.clone();
        free.step(k, &eps[k], &mut own)
            .unwrap_or_else(|e| panic!("{what}: {e}"));
        let e = step_error(&own, &want[k], &own_before);
        assert!(
            e <= tolerance,
            "{what}: step {k} (free-running) off by {e:e}"
        );
        errors.free = errors.free.max(e);
    }
    errors
}

/// Every fixture run and schedule of `kind`, on both tables, and its fingerprints for step
/// counts 1..1000.
pub(super) fn check_kind(kind: SchedulerKind) {
    let doc = runs_json();
    let inputs: Array2<f32> = npy("inputs.npy");
    let outputs: Array2<f32> = npy("outputs.npy");
    let mut offsets = BTreeMap::new();
    let mut row = 0;
    for n in doc["counts"].as_array().expect("counts") {
        let n = n.as_u64().expect("count") as usize;
        offsets.insert(n, row);
        row += n + 1;
    }
    let mut runs = 0;
    for entry in doc["runs"].as_array().expect("runs") {
        if kind_of(entry) != kind {
            continue;
        }
        let run = run_inputs(entry, &inputs, &offsets);
        for (table, name) in [(Table::Torch, "torch's σ table"), (Table::Native, "ours")] {
            let e = check_run(entry, &run, &outputs, table);
            eprintln!(
                "{} ({name}): step max error {:.1e} teacher-forced, {:.1e} free-running; \
                 {}/{} steps bit-exact; {} scale divisors off by an ulp or two",
                label(entry),
                e.teacher,
                e.free,
                e.bit_exact_steps,
                run.1.len(),
                e.inexact_divisors,
            );
        }
        runs += 1;
    }
    assert!(runs > 0, "no fixture runs for {kind}");
    for entry in doc["schedules"].as_array().expect("schedules") {
        if kind_of(entry) == kind {
            for table in [Table::Torch, Table::Native] {
                check_schedule(
                    entry,
                    build(entry, TorchGenerator::new(0), table).as_ref(),
                    table,
                );
            }
        }
    }
    check_fingerprints(kind, &doc);
}

fn digest32(values: &[f32]) -> u32 {
    let bytes: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
    let d = Sha256::digest(&bytes);
    u32::from_le_bytes([d[0], d[1], d[2], d[3]])
}

/// Timesteps and σ of every step count 1..1000 bit-exact (on torch's table), by their digests.
fn check_fingerprints(kind: SchedulerKind, doc: &Value) {
    let kinds: Vec<&str> = doc["kinds"]
        .as_array()
        .expect("kinds")
        .iter()
        .map(|k| k.as_str().expect("kind"))
        .collect();
    let index = kinds.iter().position(|&k| k == kind.name()).expect("kind");
    let table: Array3<u32> = npy("fingerprints.npy");
    let config = SchedulerConfig::default();
    let torch = torch_table();
    let mut mismatches = Vec::new();
    for n in 1..=table.shape()[1] {
        let row = table.slice(ndarray::s![index, n - 1, ..]);
        let s = match config.build_with_table(kind, n, TorchGenerator::new(0), Some(torch.clone()))
        {
            Ok(s) => s,
            // DDIM's leading spacing with steps_offset 1 at 1000 steps asks for ᾱ[1000]: diffusers
            // builds the schedule but fails at its first step; we refuse to build it.
            Err(_) if kind == SchedulerKind::Ddim && n == 1000 => continue,
            Err(e) => panic!("{kind} {n} steps: {e}"),
        };
        let sigmas = if kind == SchedulerKind::Ddim {
            0
        } else {
            digest32(s.sigmas())
        };
        if row[0] as usize != s.num_steps() || row[1] != digest32(s.timesteps()) || row[2] != sigmas
        {
            mismatches.push(n);
        }
    }
    assert!(
        mismatches.is_empty(),
        "{kind}: step counts not bit-exact: {mismatches:?}"
    );
}

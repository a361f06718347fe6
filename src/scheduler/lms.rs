//! The LMS discrete scheduler, numerically matched to diffusers' `LMSDiscreteScheduler`.
//!
//! ELITE samples with diffusers' LMS scheduler (ELITE_REFERENCE.md §7). To reproduce its latents
//! the σ table has to agree with diffusers to the float32 ulp, so the table is built the way
//! torch builds it on the CPU — float32 `linspace`, float32 squaring, a `cumprod` that
//! accumulates in f64 and stores f32, a float32 square root, then numpy's f64 `interp` cast back
//! to f32 — instead of in plain f64 (which is 1.3e-5 off at σ_max). The step is done in f32 in
//! diffusers' operation order for the same reason. Only the LMS coefficients are computed in f64:
//! diffusers integrates them numerically, and the integrand is a polynomial of degree ≤ 3, so a
//! 3-point Gauss–Legendre rule gives the exact integral.
//!
//! One step of torch's path is not IEEE arithmetic: on x86 builds torch's float32 square root
//! is MKL's `vmsSqrt`, which is not correctly rounded, so on the machine that wrote the LMS
//! fixtures and golden data 190 of the 1000 SD training σ differ by one ulp from the correctly
//! rounded root (MKL's rounding depends on the CPU; another x86 CPU differs in 6). For SD v1's
//! betas those 190 places are recorded (`TORCH_SQRT_ULPS` in [`super::numerics`], generated
//! from torch by `python -m export.torch_sqrt_table`), which makes the σ table that machine's
//! diffusers' bit for bit and the coefficients equal to within its own quadrature noise. Other
//! beta schedules use the correctly rounded root (within 2 ulps of torch).
//!
//! Split as in candle: a plain [`LmsConfig`] (one field per diffusers config key) builds a
//! stateful [`LmsScheduler`] for a number of inference steps.

use std::collections::VecDeque;

use super::numerics::TrainSchedule;
use super::timesteps::{self, interp};
use super::{
    check_step, BetaSchedule, PredictionType, Scheduler, SchedulerError, SchedulerKind,
    TimestepSpacing,
};

/// LMS configuration: one field per diffusers `LMSDiscreteScheduler` config key, plus the LMS
/// `order` that diffusers takes as an argument of `step` (default 4).
#[derive(Debug, Clone, PartialEq)]
pub struct LmsConfig {
    /// `num_train_timesteps`.
    pub num_train_timesteps: usize,
    /// `beta_start`.
    pub beta_start: f64,
    /// `beta_end`.
    pub beta_end: f64,
    /// `beta_schedule`.
    pub beta_schedule: BetaSchedule,
    /// `prediction_type`.
    pub prediction_type: PredictionType,
    /// `timestep_spacing` (only `linspace` is implemented).
    pub timestep_spacing: TimestepSpacing,
    /// Order of the linear multistep method (`order` argument of diffusers' `step`).
    pub order: usize,
}

impl Default for LmsConfig {
    /// Stable Diffusion v1's scheduler, as ELITE uses it.
    fn default() -> Self {
        Self {
            num_train_timesteps: 1000,
            beta_start: 0.00085,
            beta_end: 0.012,
            beta_schedule: BetaSchedule::ScaledLinear,
            prediction_type: PredictionType::Epsilon,
            timestep_spacing: TimestepSpacing::Linspace,
            order: 4,
        }
    }
}

impl LmsConfig {
    /// Builds the scheduler for `steps` inference steps (diffusers' `set_timesteps`).
    pub fn build(&self, steps: usize) -> Result<LmsScheduler, SchedulerError> {
        self.validate()?;
        if steps == 0 || steps > self.num_train_timesteps {
            return Err(SchedulerError::InvalidStepCount {
                steps,
                train: self.num_train_timesteps,
            });
        }
        let table = train_sigmas(self)?;
        self.build_from_table(steps, &table)
    }

    /// The part of `build` after the training σ table: timesteps, interpolated σ, coefficients.
    pub(crate) fn build_from_table(
        &self,
        steps: usize,
        table: &[f32],
    ) -> Result<LmsScheduler, SchedulerError> {
        let timesteps = timesteps::fractional(
            TimestepSpacing::Linspace,
            self.num_train_timesteps,
            steps,
            0,
        );
        let mut sigmas: Vec<f32> = timesteps.iter().map(|&t| interp(t, table)).collect();
        sigmas.push(0.0);
        let coefficients = (0..steps)
            .map(|k| lms_coefficients(&sigmas, k, self.order.min(k + 1)))
            .collect::<Result<Vec<_>, _>>()?;
        let init_noise_sigma = sigmas.iter().copied().fold(0.0_f32, f32::max);
        Ok(LmsScheduler {
            timesteps,
            sigmas,
            coefficients,
            init_noise_sigma,
            order: self.order,
            derivatives: VecDeque::with_capacity(self.order),
            next_step: 0,
        })
    }

    fn validate(&self) -> Result<(), SchedulerError> {
        self.train().validate(SchedulerKind::Lms.name())?;
        if self.order == 0 {
            return Err(SchedulerError::InvalidConfig(
                "lms: order is 0; it must be at least 1".into(),
            ));
        }
        if self.timestep_spacing != TimestepSpacing::Linspace {
            return Err(SchedulerError::InvalidConfig(
                "lms: timestep_spacing must be linspace".into(),
            ));
        }
        Ok(())
    }

    fn train(&self) -> TrainSchedule {
        TrainSchedule {
            num_train_timesteps: self.num_train_timesteps,
            beta_start: self.beta_start,
            beta_end: self.beta_end,
            beta_schedule: self.beta_schedule,
        }
    }
}

/// LMS state for one run of a fixed number of inference steps.
#[derive(Debug, Clone)]
pub struct LmsScheduler {
    timesteps: Vec<f32>,
    sigmas: Vec<f32>,
    coefficients: Vec<Vec<f64>>,
    init_noise_sigma: f32,
    order: usize,
    /// Derivatives of the last `order` steps, oldest first.
    derivatives: VecDeque<Vec<f32>>,
    next_step: usize,
}

impl LmsScheduler {
    /// Number of inference steps.
    pub fn len(&self) -> usize {
        self.timesteps.len()
    }

    /// Always false: a schedule has at least one step.
    pub fn is_empty(&self) -> bool {
        self.timesteps.is_empty()
    }

    /// The UNet timesteps, from high noise to low; fractional (999.0, 988.909…), never rounded.
    pub fn timesteps(&self) -> &[f32] {
        &self.timesteps
    }

    /// σ for each step plus a trailing 0 (`len() + 1` values).
    pub fn sigmas(&self) -> &[f32] {
        &self.sigmas
    }

    /// Standard deviation of the initial latent noise (the largest σ).
    pub fn init_noise_sigma(&self) -> f32 {
        self.init_noise_sigma
    }

    /// `1 / sqrt(σ² + 1)`: the factor that turns the latent into the UNet input at a step.
    ///
    /// diffusers divides by `sqrt(σ² + 1)` instead; multiplying by this factor can differ from
    /// that by one ulp. [`LmsScheduler::scale_model_input`] does the exact division.
    ///
    /// # Panics
    /// If `step_index >= len()`, like slice indexing.
    pub fn scale_model_input_factor(&self, step_index: usize) -> f32 {
        1.0 / self.scale_model_input_divisor(step_index)
    }

    /// Scales `sample` in place for the UNet as diffusers' `scale_model_input` does: divided
    /// by `sqrt(σ² + 1)` in f32 (whose square root MKL-backed torch may round one ulp apart).
    ///
    /// # Panics
    /// If `step_index >= len()`, like slice indexing.
    pub fn scale_model_input(&self, step_index: usize, sample: &mut [f32]) {
        let divisor = self.scale_model_input_divisor(step_index);
        sample.iter_mut().for_each(|x| *x /= divisor);
    }

    fn scale_model_input_divisor(&self, step_index: usize) -> f32 {
        let sigma = self.sigmas[step_index];
        (sigma * sigma + 1.0).sqrt()
    }

    /// The LMS coefficients of a step, for the derivatives newest first; there are
    /// `min(step_index + 1, order)` of them. Empty for an index outside the schedule.
    pub fn coefficients(&self, step_index: usize) -> &[f64] {
        self.coefficients.get(step_index).map_or(&[], Vec::as_slice)
    }

    /// Forgets the derivative history so that a new run can start at step 0.
    pub fn reset(&mut self) {
        self.derivatives.clear();
        self.next_step = 0;
    }

    /// One LMS step: updates `sample` (the latent at `σ[step_index]`) in place to the latent at
    /// `σ[step_index + 1]`, given the model's noise prediction. Steps must run in order.
    ///
    /// Arithmetic is f32 in diffusers' order: `x0 = x − σ·ε`, `d = (x − x0)/σ`, then the
    /// coefficient terms (coefficients rounded to f32, as torch does when it multiplies a
    /// float32 tensor by a Python float) summed newest first and added to `x`.
    pub fn step(
        &mut self,
        step_index: usize,
        noise_pred: &[f32],
        sample: &mut [f32],
    ) -> Result<(), SchedulerError> {
        self.check_step(step_index, noise_pred, sample)?;
        let sigma = self.sigmas[step_index];
        let mut derivative = self.recycled_buffer(sample.len());
        derivative.extend(noise_pred.iter().zip(sample.iter()).map(|(&eps, &x)| {
            let x0 = x - sigma * eps;
            (x - x0) / sigma
        }));
        self.derivatives.push_back(derivative);
        let coeffs: Vec<f32> = self.coefficients[step_index]
            .iter()
            .map(|&c| c as f32)
            .collect();
        for (i, x) in sample.iter_mut().enumerate() {
            let mut acc = 0.0_f32;
            for (c, d) in coeffs.iter().zip(self.derivatives.iter().rev()) {
                acc += c * d[i];
            }
            *x += acc;
        }
        self.next_step += 1;
        Ok(())
    }

    fn check_step(
        &self,
        step_index: usize,
        noise_pred: &[f32],
        sample: &[f32],
    ) -> Result<(), SchedulerError> {
        let run_len = self.derivatives.back().map(Vec::len);
        check_step(
            step_index,
            self.next_step,
            self.len(),
            noise_pred,
            sample,
            run_len,
        )
    }

    /// An empty buffer for the next derivative, reusing the oldest one once the history is full.
    fn recycled_buffer(&mut self, len: usize) -> Vec<f32> {
        if self.derivatives.len() >= self.order {
            if let Some(mut oldest) = self.derivatives.pop_front() {
                oldest.clear();
                return oldest;
            }
        }
        Vec::with_capacity(len)
    }
}

impl Scheduler for LmsScheduler {
    fn num_steps(&self) -> usize {
        LmsScheduler::len(self)
    }

    fn timesteps(&self) -> &[f32] {
        LmsScheduler::timesteps(self)
    }

    fn init_noise_sigma(&self) -> f32 {
        LmsScheduler::init_noise_sigma(self)
    }

    fn scale_model_input(&self, step_index: usize, sample: &mut [f32]) {
        LmsScheduler::scale_model_input(self, step_index, sample)
    }

    fn step(
        &mut self,
        step_index: usize,
        noise_pred: &[f32],
        sample: &mut [f32],
    ) -> Result<(), SchedulerError> {
        LmsScheduler::step(self, step_index, noise_pred, sample)
    }

    fn kind(&self) -> SchedulerKind {
        SchedulerKind::Lms
    }

    fn sigmas(&self) -> &[f32] {
        LmsScheduler::sigmas(self)
    }
}

/// The training σ table as torch computes it (see [`TrainSchedule::sigmas`]).
fn train_sigmas(config: &LmsConfig) -> Result<Vec<f32>, SchedulerError> {
    config.train().sigmas(SchedulerKind::Lms.name())
}

/// Nodes and weights of the 3-point Gauss–Legendre rule on [−1, 1]: exact for polynomials of
/// degree ≤ 5, and the LMS integrand has degree `order − 1 ≤ 3`.
const GAUSS_LEGENDRE_3: [(f64, f64); 3] = [
    (-0.774_596_669_241_483_4, 5.0 / 9.0),
    (0.0, 8.0 / 9.0),
    (0.774_596_669_241_483_4, 5.0 / 9.0),
];

/// The `order` LMS coefficients of step `k` (newest derivative first): the integral over
/// `[σ_k, σ_{k+1}]` of the Lagrange basis polynomial of each of the nodes `σ_k … σ_{k−order+1}`.
fn lms_coefficients(sigmas: &[f32], k: usize, order: usize) -> Result<Vec<f64>, SchedulerError> {
    let nodes: Vec<f64> = (0..order).map(|j| f64::from(sigmas[k - j])).collect();
    let (a, b) = (f64::from(sigmas[k]), f64::from(sigmas[k + 1]));
    let (half, mid) = ((b - a) / 2.0, (a + b) / 2.0);
    let coefficients: Vec<f64> = (0..order)
        .map(|j| {
            let basis = |tau: f64| {
                (0..order)
                    .filter(|&m| m != j)
                    .map(|m| (tau - nodes[m]) / (nodes[j] - nodes[m]))
                    .product::<f64>()
            };
            half * GAUSS_LEGENDRE_3
                .iter()
                .map(|&(x, w)| w * basis(half * x + mid))
                .sum::<f64>()
        })
        .collect();
    if coefficients.iter().all(|c| c.is_finite()) {
        Ok(coefficients)
    } else {
        Err(SchedulerError::InvalidConfig(format!(
            "LMS coefficients of step {k} are not finite (two σ values coincide)"
        )))
    }
}

#[cfg(test)]
mod tests {
    //! References come from diffusers 0.42.1 / torch 2.15 (CPU; AVX512 kernels, MKL) /
    //! numpy 2.4 through `export/fixtures_numerics.py` (section `lms`).

    use super::*;
    use ndarray::{Array1, Array2};
    use ndarray_npy::read_npy;

    fn fixture<T: ndarray_npy::ReadableElement, D: ndarray::Dimension>(
        name: &str,
    ) -> ndarray::Array<T, D> {
        let path = format!(
            "{}/tests/fixtures/numerics/{name}",
            env!("CARGO_MANIFEST_DIR")
        );
        read_npy(&path).unwrap_or_else(|e| panic!("reading {path}: {e}"))
    }

    fn sd() -> LmsConfig {
        LmsConfig::default()
    }

    /// |a − b| / max(|b|, floor): relative error, absolute below `floor`.
    fn rel_err(a: f64, b: f64, floor: f64) -> f64 {
        (a - b).abs() / b.abs().max(floor)
    }

    fn ulps(a: f32, b: f32) -> i64 {
        (i64::from(a.to_bits() as i32) - i64::from(b.to_bits() as i32)).abs()
    }

    /// diffusers' σ and timesteps for each fully stored step count.
    fn diffusers_schedules() -> Vec<(usize, Vec<f32>, Vec<f32>)> {
        let counts: Array1<i64> = fixture("lms_counts.npy");
        let sigmas: Array1<f32> = fixture("lms_sigmas.npy");
        let timesteps: Array1<f32> = fixture("lms_timesteps.npy");
        let (mut so, mut to) = (0, 0);
        let mut out = Vec::new();
        for &n in &counts {
            let n = n as usize;
            let s = sigmas.slice(ndarray::s![so..so + n + 1]).to_vec();
            let t = timesteps.slice(ndarray::s![to..to + n]).to_vec();
            out.push((n, s, t));
            (so, to) = (so + n + 1, to + n);
        }
        out
    }

    /// torch's training σ table. Its square root is MKL's (`vmsSqrt`, high-accuracy mode, not
    /// correctly rounded), so it differs from ours by one ulp in places.
    fn torch_table() -> Vec<f32> {
        fixture::<f32, ndarray::Ix1>("lms_train_sigmas.npy").to_vec()
    }

    #[test]
    fn train_sigma_table_is_torchs_bit_for_bit() {
        let expected = torch_table();
        let table = train_sigmas(&sd()).unwrap();
        assert_eq!(table.len(), expected.len());
        let off = table
            .iter()
            .zip(&expected)
            .filter(|(a, b)| a.to_bits() != b.to_bits())
            .count();
        assert_eq!(off, 0, "{off}/1000 training σ differ from torch's");
        // Without the MKL rounding table the correctly rounded roots differ in 190 places.
        let mut plain = sd();
        plain.beta_end += 1e-12; // not SD v1 any more: no table applied
        assert_ne!(train_sigmas(&plain).unwrap(), table);
    }

    #[test]
    fn sigmas_and_timesteps_match_diffusers() {
        let init: Array1<f32> = fixture("lms_init_noise_sigma.npy");
        let mut worst = 0.0_f64;
        for (c, (n, sigmas, timesteps)) in diffusers_schedules().into_iter().enumerate() {
            let s = sd().build(n).unwrap();
            assert_eq!(s.len(), n);
            assert_eq!(s.sigmas().len(), n + 1);
            assert_eq!(s.sigmas()[n], 0.0);
            assert_eq!(s.timesteps(), &timesteps[..], "{n} steps: timesteps differ");
            for (i, (&a, &b)) in s.sigmas().iter().zip(&sigmas).enumerate() {
                let e = rel_err(a.into(), b.into(), 1e-3);
                worst = worst.max(e);
                assert!(e <= 1e-6, "{n} steps: σ[{i}] = {a}, diffusers {b}");
            }
            assert!(
                ulps(s.init_noise_sigma(), init[c]) <= 1,
                "{n} steps: init σ"
            );
        }
        eprintln!("σ vs diffusers, counts 1..1000 (12 counts): max rel error {worst:e}");
    }

    /// FNV-1a 64 of little-endian f32 bytes, the fingerprint the fixture script stores.
    fn fnv1a64(values: &[f32]) -> u64 {
        values
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .fold(0xcbf2_9ce4_8422_2325, |h, byte| {
                (h ^ u64::from(byte)).wrapping_mul(0x0000_0100_0000_01b3)
            })
    }

    /// For every step count 1..=1000: timesteps bit-exact, and σ bit-exact when interpolated
    /// from torch's table. With the table test above, this bounds σ for every count.
    #[test]
    fn every_step_count_is_bit_exact_given_torch_table() {
        let hashes: Array2<u64> = fixture("lms_hashes.npy");
        let table = torch_table();
        let mismatches: Vec<usize> = (1..=1000)
            .filter(|&n| {
                let s = sd().build_from_table(n, &table).unwrap();
                fnv1a64(s.sigmas()) != hashes[[n - 1, 0]]
                    || fnv1a64(s.timesteps()) != hashes[[n - 1, 1]]
            })
            .collect();
        assert!(
            mismatches.is_empty(),
            "step counts not bit-exact: {mismatches:?}"
        );
    }

    #[test]
    fn every_step_count_sigma_is_bit_exact() {
        // Our σ for count n vs σ interpolated from torch's own training table: the table is
        // torch's bit for bit (above), so every count 1..=1000 must agree exactly.
        let table = torch_table();
        for n in 1..=1000 {
            let ours = sd().build(n).unwrap();
            let theirs = sd().build_from_table(n, &table).unwrap();
            assert_eq!(ours.sigmas(), theirs.sigmas(), "{n} steps");
            assert_eq!(ours.timesteps(), theirs.timesteps(), "{n} steps");
        }
    }

    /// Rows: [steps, step, j, diffusers' coefficient, exact integral (rational arithmetic)].
    fn coefficient_rows() -> Array2<f64> {
        fixture("lms_coefficients.npy")
    }

    /// Our coefficient of a fixture row, computed on diffusers' own σ.
    fn coefficient_on_diffusers_sigmas(
        row: &[f64],
        schedules: &[(usize, Vec<f32>, Vec<f32>)],
    ) -> f64 {
        let (n, k, j) = (row[0] as usize, row[1] as usize, row[2] as usize);
        let sigmas = &schedules.iter().find(|s| s.0 == n).unwrap().1;
        lms_coefficients(sigmas, k, (k + 1).min(4)).unwrap()[j]
    }

    #[test]
    fn coefficients_are_the_exact_integral() {
        let schedules = diffusers_schedules();
        let mut worst = 0.0_f64;
        for row in coefficient_rows().rows() {
            let row = row.to_vec();
            let ours = coefficient_on_diffusers_sigmas(&row, &schedules);
            let e = rel_err(ours, row[4], 1e-6);
            worst = worst.max(e);
            assert!(e <= 1e-10, "row {row:?}: ours {ours}");
        }
        eprintln!("coefficients vs exact rational integral (diffusers' σ): max rel {worst:e}");
    }

    /// diffusers integrates a float32 integrand with scipy's `quad`, which leaves up to 7.7e-6
    /// relative noise at ~1000 steps (1e-7 at 10 steps, 6e-7 at 100). Ours must be within
    /// 1e-6 of diffusers, or no farther from it than the exact integral is.
    #[test]
    fn coefficients_match_diffusers() {
        let schedules = diffusers_schedules();
        let mut worst = std::collections::BTreeMap::new();
        for row in coefficient_rows().rows() {
            let row = row.to_vec();
            let ours = coefficient_on_diffusers_sigmas(&row, &schedules);
            let (diffusers, exact) = (row[3], row[4]);
            let e = rel_err(ours, diffusers, 1e-6);
            let reference_noise = rel_err(exact, diffusers, 1e-6);
            let w = worst.entry(row[0] as usize).or_insert(0.0_f64);
            *w = w.max(e);
            if row[0] <= 100.0 {
                assert!(e <= 1e-6, "row {row:?}: ours {ours}");
            }
            assert!(
                e <= 1e-6 + 1.01 * reference_noise,
                "row {row:?}: ours {ours}"
            );
        }
        eprintln!("coefficients vs diffusers (diffusers' σ), max rel by count: {worst:?}");
    }

    /// Built end to end (our σ, which equal torch's), the coefficients meet the same bound as
    /// when computed on diffusers' σ: 1e-6 relative up to 100 steps, and beyond that no farther
    /// from diffusers than the exact integral is (diffusers' own quadrature noise).
    #[test]
    fn built_coefficients_match_diffusers() {
        let mut worst = std::collections::BTreeMap::new();
        for row in coefficient_rows().rows() {
            let (n, k, j) = (row[0] as usize, row[1] as usize, row[2] as usize);
            let s = sd().build(n).unwrap();
            let ours = s.coefficients(k);
            assert_eq!(ours.len(), (k + 1).min(4));
            let (diffusers, exact) = (row[3], row[4]);
            let e = rel_err(ours[j], diffusers, 1e-6);
            let w = worst.entry(n).or_insert(0.0_f64);
            *w = w.max(e);
            if n <= 100 {
                assert!(e <= 1e-6, "{n} steps, step {k}, c{j}: {}", ours[j]);
            }
            let reference_noise = rel_err(exact, diffusers, 1e-6);
            assert!(
                e <= 1e-6 + 1.01 * reference_noise,
                "{n} steps, step {k}, c{j}: {}",
                ours[j]
            );
        }
        eprintln!("built coefficients vs diffusers, max rel by count: {worst:?}");
    }

    /// Runs diffusers' recorded denoising loop; returns (ours per step, diffusers per step).
    fn run_steps(steps: usize, s: &mut LmsScheduler) -> (Vec<Vec<f32>>, Array2<f32>, Vec<f32>) {
        let sample0: Array1<f32> = fixture(&format!("lms_step{steps}_sample0.npy"));
        let eps: Array2<f32> = fixture(&format!("lms_step{steps}_noise_pred.npy"));
        let expected: Array2<f32> = fixture(&format!("lms_step{steps}_samples.npy"));
        let mut x = sample0.to_vec();
        let mut outputs = Vec::new();
        for (k, row) in eps.rows().into_iter().enumerate() {
            s.step(k, &row.to_vec(), &mut x).unwrap();
            outputs.push(x.clone());
        }
        (outputs, expected, sample0.to_vec())
    }

    /// Largest error, relative to the largest magnitude in the sample before the step (the
    /// update adds terms of that size, so that is the scale of its rounding).
    fn max_rel_diff(outputs: &[Vec<f32>], expected: &Array2<f32>, sample0: &[f32]) -> f64 {
        let mut worst = 0.0_f64;
        let mut before: Vec<f32> = sample0.to_vec();
        for (k, out) in outputs.iter().enumerate() {
            let scale = before.iter().fold(1.0_f32, |m, v| m.max(v.abs()));
            for (i, &a) in out.iter().enumerate() {
                worst = worst.max(f64::from((a - expected[[k, i]]).abs() / scale));
            }
            before = expected.row(k).to_vec();
        }
        worst
    }

    #[test]
    fn step_matches_diffusers() {
        let table = torch_table();
        for steps in [10, 100] {
            // Same σ as diffusers: isolates the step arithmetic.
            let mut same_sigmas = sd().build_from_table(steps, &table).unwrap();
            let (outputs, expected, x0) = run_steps(steps, &mut same_sigmas);
            let isolated = max_rel_diff(&outputs, &expected, &x0);
            // Fully native.
            let (outputs, _, _) = run_steps(steps, &mut sd().build(steps).unwrap());
            let native = max_rel_diff(&outputs, &expected, &x0);
            eprintln!("{steps} steps: step() max rel error {isolated:e} (torch σ), {native:e}");
            assert!(isolated <= 1e-6, "{steps} steps: {isolated}");
            assert!(native <= 1e-6, "{steps} steps: {native}");
        }
    }

    #[test]
    fn anchors_from_runtime_notes() {
        let s = sd().build(100).unwrap();
        assert_eq!(s.timesteps()[0], 999.0);
        assert!((s.timesteps()[1] - 988.909_1).abs() < 1e-4);
        assert!((s.init_noise_sigma() - 14.614_647).abs() < 1e-5);
        assert!((s.sigmas()[1] - 13.752_512).abs() < 1e-5);
        assert!((s.sigmas()[98] - 0.098_703_3).abs() < 1e-6);
        assert!((s.sigmas()[99] - 0.029_167_5).abs() < 1e-6);
        let c0 = s.coefficients(0)[0];
        assert!((c0 - f64::from(s.sigmas()[1] - s.sigmas()[0])).abs() < 1e-6);
        assert!(s.coefficients(100).is_empty());
    }

    #[test]
    fn invalid_configs_are_errors() {
        for steps in [0, 1001] {
            let err = sd().build(steps).unwrap_err();
            assert!(
                matches!(err, SchedulerError::InvalidStepCount { .. }),
                "{err}"
            );
        }
        let bad = LmsConfig {
            beta_end: 1.5,
            ..sd()
        };
        assert!(matches!(
            bad.build(10),
            Err(SchedulerError::InvalidConfig(_))
        ));
        let bad = LmsConfig { order: 0, ..sd() };
        assert!(matches!(
            bad.build(10),
            Err(SchedulerError::InvalidConfig(_))
        ));
    }

    #[test]
    fn linear_schedule_builds() {
        let linear = LmsConfig {
            beta_start: 0.0001,
            beta_end: 0.02,
            beta_schedule: BetaSchedule::Linear,
            ..sd()
        };
        let s = linear.build(50).unwrap();
        assert!(s.sigmas().windows(2).all(|w| w[0] > w[1]));
    }

    #[test]
    fn step_checks_order_and_lengths() {
        let mut s = sd().build(5).unwrap();
        let eps = vec![0.1_f32; 8];
        let mut x = vec![1.0_f32; 8];
        let err = s.step(1, &eps, &mut x).unwrap_err();
        assert!(matches!(
            err,
            SchedulerError::OutOfOrder {
                index: 1,
                expected: 0
            }
        ));
        let err = s.step(0, &eps[..4], &mut x).unwrap_err();
        assert!(matches!(err, SchedulerError::LengthMismatch { .. }));
        s.step(0, &eps, &mut x).unwrap();
        let err = s.step(1, &eps[..4], &mut x[..4]).unwrap_err();
        assert!(matches!(
            err,
            SchedulerError::SampleSizeChanged { before: 8, now: 4 }
        ));
        let err = s.step(7, &eps, &mut x).unwrap_err();
        assert!(matches!(err, SchedulerError::StepIndexOutOfRange { .. }));
        s.reset();
        let mut y = vec![1.0_f32; 8];
        s.step(0, &eps, &mut y).unwrap();
        let mut z = vec![1.0_f32; 8];
        sd().build(5).unwrap().step(0, &eps, &mut z).unwrap();
        assert_eq!(y, z, "reset() restarts the run");
    }

    #[test]
    fn scale_model_input_matches_its_factor() {
        let s = sd().build(50).unwrap();
        let sigma = s.sigmas()[0];
        let mut x = vec![sigma; 3];
        s.scale_model_input(0, &mut x);
        let factor = s.scale_model_input_factor(0);
        assert!((x[0] - sigma * factor).abs() <= 1e-6 * x[0].abs());
        assert!((factor - 1.0 / (sigma * sigma + 1.0).sqrt()).abs() < 1e-7);
    }
}

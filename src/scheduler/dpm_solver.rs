//! DPM-Solver++ (Lu et al. 2022), multistep, order 1 or 2: diffusers'
//! `DPMSolverMultistepScheduler` with `algorithm_type="dpmsolver++"`, `solver_type="midpoint"`.
//!
//! The solver works on the data prediction `x₀ = (x − σ_t·ε)/α_t` and steps in the half
//! log-SNR `λ = log α − log σ`: first order is DDIM, second order adds the finite difference of
//! the last two `x₀`. All of it is float32 in diffusers' order of operations; the scalar
//! coefficients (α, σ_t, λ, `exp(−h) − 1`) are computed as torch computes them on 0-d float32
//! tensors ([`numerics`](super::numerics)).

use super::numerics::{alpha_sigma, exp_f32, lambda, TrainSchedule};
use super::timesteps::{self, interp};
use super::{check_step, FinalSigmas, Scheduler, SchedulerError, SchedulerKind, TimestepSpacing};

/// DPM-Solver++ configuration: one field per diffusers config key honoured. The others are
/// diffusers' defaults: `algorithm_type="dpmsolver++"`, `solver_type="midpoint"`,
/// `euler_at_final=False`, `lambda_min_clipped=-inf`, no thresholding, epsilon prediction.
#[derive(Debug, Clone, PartialEq)]
pub struct DpmSolverConfig {
    pub(crate) train: TrainSchedule,
    /// `solver_order`: 1 or 2.
    pub solver_order: usize,
    /// `use_karras_sigmas`.
    pub use_karras_sigmas: bool,
    /// `timestep_spacing` (ignored with Karras σ, whose timesteps follow from σ).
    pub timestep_spacing: TimestepSpacing,
    /// `steps_offset` (used by `leading` spacing).
    pub steps_offset: usize,
    /// `final_sigmas_type`.
    pub final_sigmas_type: FinalSigmas,
    /// `lower_order_final`.
    pub lower_order_final: bool,
}

impl DpmSolverConfig {
    fn kind(&self) -> SchedulerKind {
        if self.use_karras_sigmas {
            SchedulerKind::DpmPp2mKarras
        } else {
            SchedulerKind::DpmPp2m
        }
    }

    /// Builds the scheduler for `steps` inference steps (diffusers' `set_timesteps`).
    pub fn build(&self, steps: usize) -> Result<DpmSolverScheduler, SchedulerError> {
        let name = self.kind().name();
        self.train.validate(name)?;
        self.build_with_table(steps, &self.train.sigmas(name)?)
    }

    /// [`DpmSolverConfig::build`] on a given training σ table (validated config).
    pub(crate) fn build_with_table(
        &self,
        steps: usize,
        table: &[f32],
    ) -> Result<DpmSolverScheduler, SchedulerError> {
        let name = self.kind().name();
        let train = self.train.num_train_timesteps;
        let (timesteps, mut sigmas): (Vec<f32>, Vec<f32>) = if self.use_karras_sigmas {
            let (sigmas, timesteps) = timesteps::karras_schedule(
                f64::from(table[0]),
                f64::from(table[train - 1]),
                table,
                steps,
                true,
            );
            (
                timesteps.into_iter().map(|t| t as f32).collect(),
                sigmas.into_iter().map(|s| s as f32).collect(),
            )
        } else {
            let ts = timesteps::multistep(self.timestep_spacing, train, steps, self.steps_offset);
            timesteps::check_range(name, &ts, train)?;
            let ts: Vec<f32> = ts.into_iter().map(|t| t as f32).collect();
            let sigmas = ts.iter().map(|&t| interp(t, table)).collect();
            (ts, sigmas)
        };
        sigmas.push(match self.final_sigmas_type {
            FinalSigmas::Zero => 0.0,
            // ((1 − ᾱ₀)/ᾱ₀) ** 0.5 on a 0-d tensor: the table's first entry.
            FinalSigmas::SigmaMin => table[0],
        });
        Ok(DpmSolverScheduler {
            config: self.clone(),
            timesteps,
            sigmas,
            previous_x0: None,
            next_step: 0,
        })
    }
}

/// DPM-Solver++ state for one run.
#[derive(Debug, Clone)]
pub struct DpmSolverScheduler {
    config: DpmSolverConfig,
    timesteps: Vec<f32>,
    sigmas: Vec<f32>,
    /// The previous step's data prediction (second order only); `None` before the first step,
    /// which is diffusers' `lower_order_nums < 1` warm-up.
    previous_x0: Option<Vec<f32>>,
    next_step: usize,
}

impl DpmSolverScheduler {
    /// Whether step `i` is first order although a previous prediction exists: diffusers'
    /// `lower_order_final` rule (the last step of a schedule ending at σ = 0, or of one shorter
    /// than 15 steps) and order 1.
    fn first_order(&self, i: usize) -> bool {
        let n = self.timesteps.len();
        let final_step = i == n - 1
            && ((self.config.lower_order_final && n < 15)
                || self.config.final_sigmas_type == FinalSigmas::Zero);
        self.config.solver_order == 1 || final_step
    }

    /// `x₀ = (x − σ_t·ε)/α_t` at step `i`, elementwise in f32.
    fn data_prediction(&self, i: usize, noise_pred: &[f32], sample: &[f32]) -> Vec<f32> {
        let (alpha_t, sigma_t) = alpha_sigma(self.sigmas[i]);
        noise_pred
            .iter()
            .zip(sample)
            .map(|(&eps, &x)| (x - sigma_t * eps) / alpha_t)
            .collect()
    }

    /// First order (DDIM): `x ← (σ_t/σ_s)·x − (α_t·(e^{−h} − 1))·x₀`.
    fn first_order_update(&self, i: usize, x0: &[f32], sample: &mut [f32]) {
        let (alpha_t, sigma_t) = alpha_sigma(self.sigmas[i + 1]);
        let (alpha_s, sigma_s) = alpha_sigma(self.sigmas[i]);
        let h = lambda(alpha_t, sigma_t) - lambda(alpha_s, sigma_s);
        let ratio = sigma_t / sigma_s;
        let c = alpha_t * (exp_f32(-h) - 1.0);
        for (x, &d0) in sample.iter_mut().zip(x0) {
            *x = ratio * *x - c * d0;
        }
    }

    /// Second order, midpoint: `D1 = (1/r₀)·(m₀ − m₁)`,
    /// `x ← (σ_t/σ_s0)·x − c·D0 − (0.5·c)·D1` with `c = α_t·(e^{−h} − 1)`.
    fn second_order_update(&self, i: usize, m1: &[f32], m0: &[f32], sample: &mut [f32]) {
        let (alpha_t, sigma_t) = alpha_sigma(self.sigmas[i + 1]);
        let (alpha_s0, sigma_s0) = alpha_sigma(self.sigmas[i]);
        let (alpha_s1, sigma_s1) = alpha_sigma(self.sigmas[i - 1]);
        let lambda_t = lambda(alpha_t, sigma_t);
        let lambda_s0 = lambda(alpha_s0, sigma_s0);
        let lambda_s1 = lambda(alpha_s1, sigma_s1);
        let (h, h_0) = (lambda_t - lambda_s0, lambda_s0 - lambda_s1);
        let r0 = h_0 / h;
        // torch: `1.0 / r0` is `r0.reciprocal() * 1.0`.
        let inv_r0 = 1.0 / r0;
        let ratio = sigma_t / sigma_s0;
        let c = alpha_t * (exp_f32(-h) - 1.0);
        let half_c = 0.5 * c;
        for ((x, &d0), &prev) in sample.iter_mut().zip(m0).zip(m1) {
            let d1 = inv_r0 * (d0 - prev);
            *x = (ratio * *x - c * d0) - half_c * d1;
        }
    }
}

impl Scheduler for DpmSolverScheduler {
    fn num_steps(&self) -> usize {
        self.timesteps.len()
    }

    fn timesteps(&self) -> &[f32] {
        &self.timesteps
    }

    /// 1: DPM-Solver works on variance-preserving latents.
    fn init_noise_sigma(&self) -> f32 {
        1.0
    }

    /// The identity: the UNet takes the variance-preserving latent as it is.
    fn scale_model_input(&self, _step_index: usize, _sample: &mut [f32]) {}

    fn step(
        &mut self,
        step_index: usize,
        noise_pred: &[f32],
        sample: &mut [f32],
    ) -> Result<(), SchedulerError> {
        // Every step's sample has the first step's length: the first prediction fixes it.
        let run_len = self.previous_x0.as_ref().map(Vec::len);
        check_step(
            step_index,
            self.next_step,
            self.timesteps.len(),
            noise_pred,
            sample,
            run_len,
        )?;
        let x0 = self.data_prediction(step_index, noise_pred, sample);
        match self.previous_x0.take() {
            Some(previous) if !self.first_order(step_index) => {
                self.second_order_update(step_index, &previous, &x0, sample);
            }
            _ => self.first_order_update(step_index, &x0, sample),
        }
        self.previous_x0 = Some(x0);
        self.next_step += 1;
        Ok(())
    }

    fn kind(&self) -> SchedulerKind {
        self.config.kind()
    }

    fn sigmas(&self) -> &[f32] {
        &self.sigmas
    }
}

#[cfg(test)]
mod tests {
    use super::super::{parity, SchedulerKind};

    #[test]
    fn dpmpp_2m_matches_diffusers() {
        parity::check_kind(SchedulerKind::DpmPp2m);
    }

    #[test]
    fn dpmpp_2m_karras_matches_diffusers() {
        parity::check_kind(SchedulerKind::DpmPp2mKarras);
    }
}

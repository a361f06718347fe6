//! Euler's method on the probability-flow ODE in σ (Karras et al. 2022, Algorithm 2 without
//! churn): diffusers' `EulerDiscreteScheduler`.
//!
//! The σ schedule is LMS's (the same fractional `linspace` timesteps and interpolated float32
//! table, or Karras σ); each step is `x ← x + ((x − x₀)/σ)·(σ_next − σ)` with
//! `x₀ = x − σ·ε`, in float32 and in that order, as diffusers writes it.

use super::numerics::TrainSchedule;
use super::timesteps::{self, interp};
use super::{check_step, FinalSigmas, Scheduler, SchedulerError, SchedulerKind, TimestepSpacing};

/// Euler configuration: one field per diffusers config key honoured. The others are diffusers'
/// defaults: `interpolation_type="linear"`, `timestep_type="discrete"`, and `step`'s
/// `s_churn=0` (no noise is added, so the method is deterministic).
#[derive(Debug, Clone, PartialEq)]
pub struct EulerConfig {
    pub(crate) train: TrainSchedule,
    /// `use_karras_sigmas` (timesteps then follow from σ and stay fractional).
    pub use_karras_sigmas: bool,
    /// `timestep_spacing`.
    pub timestep_spacing: TimestepSpacing,
    /// `steps_offset` (used by `leading` spacing).
    pub steps_offset: usize,
    /// `final_sigmas_type`.
    pub final_sigmas_type: FinalSigmas,
}

/// σ-parameterised schedule shared by Euler and Euler ancestral: timesteps, σ (plus the final
/// one) and `init_noise_sigma`, as their `set_timesteps` and `init_noise_sigma` compute them.
#[derive(Debug, Clone)]
pub(crate) struct SigmaSchedule {
    pub timesteps: Vec<f32>,
    pub sigmas: Vec<f32>,
    pub init_noise_sigma: f32,
}

impl SigmaSchedule {
    /// The schedule for `steps` steps on the training σ `table`.
    pub fn build(
        train: &TrainSchedule,
        table: &[f32],
        spacing: TimestepSpacing,
        steps_offset: usize,
        steps: usize,
        karras: bool,
        final_sigmas: FinalSigmas,
    ) -> Self {
        let mut timesteps =
            timesteps::fractional(spacing, train.num_train_timesteps, steps, steps_offset);
        let mut sigmas: Vec<f32> = timesteps.iter().map(|&t| interp(t, table)).collect();
        if karras {
            // diffusers converts the interpolated σ (float64) and inverts each Karras σ to a
            // fractional timestep, which it keeps unrounded.
            let interpolated: Vec<f64> = timesteps.iter().map(|&t| interp_f64(t, table)).collect();
            let (sigma_min, sigma_max) = (interpolated[interpolated.len() - 1], interpolated[0]);
            let (k_sigmas, k_timesteps) =
                timesteps::karras_schedule(sigma_min, sigma_max, table, steps, false);
            sigmas = k_sigmas.into_iter().map(|s| s as f32).collect();
            timesteps = k_timesteps.into_iter().map(|t| t as f32).collect();
        }
        sigmas.push(match final_sigmas {
            FinalSigmas::Zero => 0.0,
            FinalSigmas::SigmaMin => table[0],
        });
        let max = sigmas.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let init_noise_sigma = match spacing {
            TimestepSpacing::Linspace | TimestepSpacing::Trailing => max,
            // (σ_max² + 1) ** 0.5 on a 0-d float32 tensor.
            TimestepSpacing::Leading => (max * max + 1.0).sqrt(),
        };
        Self {
            timesteps,
            sigmas,
            init_noise_sigma,
        }
    }
}

/// `np.interp` kept in float64 (what `_convert_to_karras` receives before the float32 cast).
fn interp_f64(t: f32, table: &[f32]) -> f64 {
    let x = f64::from(t);
    let last = table.len() - 1;
    if x <= 0.0 {
        return f64::from(table[0]);
    }
    let j = (x.floor() as usize).min(last);
    if j == last {
        return f64::from(table[last]);
    }
    let (lo, hi) = (f64::from(table[j]), f64::from(table[j + 1]));
    (hi - lo) * (x - j as f64) + lo
}

impl EulerConfig {
    /// Builds the scheduler for `steps` inference steps (diffusers' `set_timesteps`).
    pub fn build(&self, steps: usize) -> Result<EulerScheduler, SchedulerError> {
        let name = SchedulerKind::Euler.name();
        self.train.validate(name)?;
        self.build_with_table(steps, &self.train.sigmas(name)?)
    }

    /// [`EulerConfig::build`] on a given training σ table (validated config).
    pub(crate) fn build_with_table(
        &self,
        steps: usize,
        table: &[f32],
    ) -> Result<EulerScheduler, SchedulerError> {
        let schedule = SigmaSchedule::build(
            &self.train,
            table,
            self.timestep_spacing,
            self.steps_offset,
            steps,
            self.use_karras_sigmas,
            self.final_sigmas_type,
        );
        Ok(EulerScheduler {
            schedule,
            next_step: 0,
        })
    }
}

/// Euler state for one run (only the step counter: the method has no history).
#[derive(Debug, Clone)]
pub struct EulerScheduler {
    schedule: SigmaSchedule,
    next_step: usize,
}

/// `sample / ((σ² + 1) ** 0.5)` in f32 (torch's root is MKL's: it can round one ulp apart).
pub(crate) fn scale_by_sigma(sigma: f32, sample: &mut [f32]) {
    let divisor = (sigma * sigma + 1.0).sqrt();
    sample.iter_mut().for_each(|x| *x /= divisor);
}

impl Scheduler for EulerScheduler {
    fn num_steps(&self) -> usize {
        self.schedule.timesteps.len()
    }

    fn timesteps(&self) -> &[f32] {
        &self.schedule.timesteps
    }

    fn init_noise_sigma(&self) -> f32 {
        self.schedule.init_noise_sigma
    }

    fn scale_model_input(&self, step_index: usize, sample: &mut [f32]) {
        scale_by_sigma(self.schedule.sigmas[step_index], sample);
    }

    fn step(
        &mut self,
        step_index: usize,
        noise_pred: &[f32],
        sample: &mut [f32],
    ) -> Result<(), SchedulerError> {
        check_step(
            step_index,
            self.next_step,
            self.num_steps(),
            noise_pred,
            sample,
            None,
        )?;
        // γ = 0: σ̂ = σ · (0 + 1) = σ exactly.
        let sigma = self.schedule.sigmas[step_index];
        let dt = self.schedule.sigmas[step_index + 1] - sigma;
        for (x, &eps) in sample.iter_mut().zip(noise_pred) {
            let x0 = *x - sigma * eps;
            let derivative = (*x - x0) / sigma;
            *x += derivative * dt;
        }
        self.next_step += 1;
        Ok(())
    }

    fn kind(&self) -> SchedulerKind {
        SchedulerKind::Euler
    }

    fn sigmas(&self) -> &[f32] {
        &self.schedule.sigmas
    }
}

#[cfg(test)]
mod tests {
    use super::super::{parity, SchedulerKind};

    #[test]
    fn matches_diffusers() {
        parity::check_kind(SchedulerKind::Euler);
    }
}

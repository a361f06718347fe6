//! Denoising diffusion implicit models (Song et al. 2021) with η = 0: diffusers' `DDIMScheduler`.
//!
//! DDIM works on ᾱ directly: `x₀ = (x − √(1−ᾱ_t)·ε)/√ᾱ_t`, then
//! `x ← √ᾱ_prev·x₀ + √(1−ᾱ_prev)·ε`, where `prev = t − T/N` (diffusers takes that difference for
//! every spacing, not the next timestep of the schedule). The square roots are torch's on 0-d
//! float32 tensors, MKL's on x86, which round ~0.7% of inputs one ulp apart from IEEE `sqrt`.

use super::numerics::TrainSchedule;
use super::timesteps;
use super::{check_step, Scheduler, SchedulerError, SchedulerKind, TimestepSpacing};

/// DDIM configuration: one field per diffusers config key honoured. The others are diffusers'
/// defaults for SD v1-4: `clip_sample=False`, no thresholding, epsilon prediction, and `step`'s
/// `eta=0` (deterministic).
#[derive(Debug, Clone, PartialEq)]
pub struct DdimConfig {
    pub(crate) train: TrainSchedule,
    /// `timestep_spacing` (diffusers' DDIM default is `leading`).
    pub timestep_spacing: TimestepSpacing,
    /// `steps_offset` (1 in SD v1-4's config; used by `leading` spacing).
    pub steps_offset: usize,
    /// `set_alpha_to_one`: ᾱ after the last step is 1 rather than `alphas_cumprod[0]`.
    pub set_alpha_to_one: bool,
}

impl DdimConfig {
    /// Builds the scheduler for `steps` inference steps (diffusers' `set_timesteps`).
    pub fn build(&self, steps: usize) -> Result<DdimScheduler, SchedulerError> {
        let name = SchedulerKind::Ddim.name();
        self.train.validate(name)?;
        let train = self.train.num_train_timesteps;
        let ts = timesteps::ddim(self.timestep_spacing, train, steps, self.steps_offset);
        timesteps::check_range(name, &ts, train)?;
        let alphas_cumprod = self.train.alphas_cumprod();
        if alphas_cumprod
            .iter()
            .any(|&a| a.is_nan() || a <= 0.0 || a >= 1.0)
        {
            return Err(SchedulerError::InvalidConfig(format!(
                "{name}: the beta schedule gives ᾱ outside (0, 1)"
            )));
        }
        let final_alpha_cumprod = if self.set_alpha_to_one {
            1.0
        } else {
            alphas_cumprod[0]
        };
        Ok(DdimScheduler {
            float_timesteps: ts.iter().map(|&t| t as f32).collect(),
            timesteps: ts,
            step_ratio: (train / steps) as i64,
            alphas_cumprod,
            final_alpha_cumprod,
            next_step: 0,
        })
    }
}

/// DDIM state for one run (only the step counter: η = 0 keeps no history).
#[derive(Debug, Clone)]
pub struct DdimScheduler {
    timesteps: Vec<i64>,
    float_timesteps: Vec<f32>,
    /// `num_train_timesteps // num_inference_steps`: how far back each step looks.
    step_ratio: i64,
    alphas_cumprod: Vec<f32>,
    final_alpha_cumprod: f32,
    next_step: usize,
}

impl DdimScheduler {
    /// `alphas_cumprod[t]` with Python's negative indexing (`trailing` spacing can yield −1).
    fn alpha_at(&self, t: i64) -> f32 {
        let n = self.alphas_cumprod.len() as i64;
        self.alphas_cumprod[t.rem_euclid(n) as usize]
    }
}

impl Scheduler for DdimScheduler {
    fn num_steps(&self) -> usize {
        self.timesteps.len()
    }

    fn timesteps(&self) -> &[f32] {
        &self.float_timesteps
    }

    /// 1: DDIM works on variance-preserving latents.
    fn init_noise_sigma(&self) -> f32 {
        1.0
    }

    /// The identity.
    fn scale_model_input(&self, _step_index: usize, _sample: &mut [f32]) {}

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
        let t = self.timesteps[step_index];
        let prev = t - self.step_ratio;
        let alpha_t = self.alpha_at(t);
        let alpha_prev = if prev >= 0 {
            self.alpha_at(prev)
        } else {
            self.final_alpha_cumprod
        };
        let sqrt_beta_t = (1.0 - alpha_t).sqrt();
        let sqrt_alpha_t = alpha_t.sqrt();
        let sqrt_alpha_prev = alpha_prev.sqrt();
        // (1 − ᾱ_prev − σ_η²) ** 0.5 with σ_η = η·… = 0.
        let direction = (1.0 - alpha_prev - 0.0).sqrt();
        for (x, &eps) in sample.iter_mut().zip(noise_pred) {
            let x0 = (*x - sqrt_beta_t * eps) / sqrt_alpha_t;
            *x = sqrt_alpha_prev * x0 + direction * eps;
        }
        self.next_step += 1;
        Ok(())
    }

    fn kind(&self) -> SchedulerKind {
        SchedulerKind::Ddim
    }
}

#[cfg(test)]
mod tests {
    use super::super::{parity, SchedulerKind};

    #[test]
    fn matches_diffusers() {
        parity::check_kind(SchedulerKind::Ddim);
    }
}

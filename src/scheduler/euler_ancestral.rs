//! Ancestral sampling with Euler steps: diffusers' `EulerAncestralDiscreteScheduler`.
//!
//! Each step moves deterministically to `σ_down` and then adds fresh noise of standard deviation
//! `σ_up`, with `σ_up² + σ_down² = σ_next²`. The noise is `torch.randn` of the sample's shape
//! drawn from the job's generator, which is why the scheduler owns a [`TorchGenerator`]: built
//! from the one that drew the initial latents, it continues that stream exactly as diffusers'
//! pipeline passes its `generator` on to every `step`, so a seed gives diffusers' image.

use super::euler::{scale_by_sigma, SigmaSchedule};
use super::numerics::TrainSchedule;
use super::{check_step, FinalSigmas, Scheduler, SchedulerError, SchedulerKind, TimestepSpacing};
use crate::noise::TorchGenerator;

/// Euler ancestral configuration: one field per diffusers config key honoured (the class has
/// no Karras σ, no `final_sigmas_type`: it always ends at σ = 0).
#[derive(Debug, Clone, PartialEq)]
pub struct EulerAncestralConfig {
    pub(crate) train: TrainSchedule,
    /// `timestep_spacing`.
    pub timestep_spacing: TimestepSpacing,
    /// `steps_offset` (used by `leading` spacing).
    pub steps_offset: usize,
}

impl EulerAncestralConfig {
    /// Builds the scheduler for `steps` inference steps; its per-step noise comes from
    /// `generator` (see the module docs).
    pub fn build(
        &self,
        steps: usize,
        generator: TorchGenerator,
    ) -> Result<EulerAncestralScheduler, SchedulerError> {
        let name = SchedulerKind::EulerAncestral.name();
        self.train.validate(name)?;
        self.build_with_table(steps, generator, &self.train.sigmas(name)?)
    }

    /// [`EulerAncestralConfig::build`] on a given training σ table (validated config).
    pub(crate) fn build_with_table(
        &self,
        steps: usize,
        generator: TorchGenerator,
        table: &[f32],
    ) -> Result<EulerAncestralScheduler, SchedulerError> {
        let schedule = SigmaSchedule::build(
            &self.train,
            table,
            self.timestep_spacing,
            self.steps_offset,
            steps,
            false,
            FinalSigmas::Zero,
        );
        Ok(EulerAncestralScheduler {
            schedule,
            generator,
            next_step: 0,
        })
    }
}

/// Euler ancestral state for one run: the step counter and the generator.
#[derive(Debug, Clone)]
pub struct EulerAncestralScheduler {
    schedule: SigmaSchedule,
    generator: TorchGenerator,
    next_step: usize,
}

impl Scheduler for EulerAncestralScheduler {
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

    /// diffusers' order: `x₀ = x − σ·ε`, `d = (x − x₀)/σ`, `x + d·(σ_down − σ)`, then one
    /// `randn(len)` from the generator times `σ_up` added; all f32.
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
        let sigma = self.schedule.sigmas[step_index];
        let sigma_to = self.schedule.sigmas[step_index + 1];
        let to2 = sigma_to * sigma_to;
        let from2 = sigma * sigma;
        let sigma_up = (to2 * (from2 - to2) / from2).sqrt();
        let sigma_down = (to2 - sigma_up * sigma_up).sqrt();
        let dt = sigma_down - sigma;
        let noise = self.generator.randn(sample.len());
        for ((x, &eps), &n) in sample.iter_mut().zip(noise_pred).zip(&noise) {
            let x0 = *x - sigma * eps;
            let derivative = (*x - x0) / sigma;
            *x = (*x + derivative * dt) + n * sigma_up;
        }
        self.next_step += 1;
        Ok(())
    }

    fn kind(&self) -> SchedulerKind {
        SchedulerKind::EulerAncestral
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
        parity::check_kind(SchedulerKind::EulerAncestral);
    }
}

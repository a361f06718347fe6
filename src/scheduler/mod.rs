//! Diffusion schedulers, each numerically matched to its diffusers 0.42.1 counterpart.
//!
//! Split as in candle's `stable_diffusion/schedulers.rs`: plain configuration data
//! ([`SchedulerConfig`], one field per diffusers config key the runtime honours) builds, for a
//! [`SchedulerKind`] and a step count, a stateful [`Scheduler`] that one generation job owns.
//! Jobs with different schedulers and step counts can share UNet calls, because the UNet takes
//! a timestep per row and everything a scheduler keeps between steps lives in its own value.
//!
//! | name | diffusers class | default steps |
//! |---|---|---|
//! | `lms` (default) | `LMSDiscreteScheduler` | 100 |
//! | `dpmpp-2m` | `DPMSolverMultistepScheduler` (dpmsolver++, order 2) | 20 |
//! | `dpmpp-2m-karras` | the same with `use_karras_sigmas=True` | 20 |
//! | `euler` | `EulerDiscreteScheduler` | 50 |
//! | `euler-a` | `EulerAncestralDiscreteScheduler` | 50 |
//! | `ddim` | `DDIMScheduler` (η = 0) | 50 |
//! | `unipc` | `UniPCMultistepScheduler` (bh2, order 2) | 20 |
//!
//! Each matches diffusers' float32 path: timesteps and σ bit for bit (torch's float32 table
//! construction, numpy's float64 schedule arithmetic cast to float32), the steps in float32 in
//! diffusers' order of operations. What is not bit-exact is measured in the parity tests
//! (`tests/fixtures/schedulers/`, written from diffusers by `export/fixtures_schedulers.py`) and
//! explained there: torch's float32 `sqrt`/`exp`/`expm1` on x86 are MKL's, which round about
//! 1% of scalar inputs one ulp away from the correctly rounded values used here, and whose
//! rounding depends on the CPU (the σ table follows the machine that wrote the LMS reference
//! data; `numerics.rs` explains).

mod ddim;
mod dpm_solver;
mod euler;
mod euler_ancestral;
mod lms;
mod numerics;
#[cfg(test)]
mod parity;
mod timesteps;
mod unipc;

use std::fmt;
use std::str::FromStr;

use serde::Deserialize;

pub use ddim::{DdimConfig, DdimScheduler};
pub use dpm_solver::{DpmSolverConfig, DpmSolverScheduler};
pub use euler::{EulerConfig, EulerScheduler};
pub use euler_ancestral::{EulerAncestralConfig, EulerAncestralScheduler};
pub use lms::{LmsConfig, LmsScheduler};
pub use unipc::{UniPcConfig, UniPcScheduler};

use crate::noise::TorchGenerator;
use numerics::TrainSchedule;

/// Errors from building or stepping a scheduler.
#[derive(Debug, thiserror::Error)]
pub enum SchedulerError {
    /// The requested number of inference steps is outside `1..=num_train_timesteps`.
    #[error(
        "scheduler: {steps} inference steps requested; it must be between 1 and \
         num_train_timesteps ({train})"
    )]
    InvalidStepCount { steps: usize, train: usize },
    /// The configuration cannot produce a valid noise schedule (names the scheduler and field).
    #[error("scheduler: invalid configuration: {0}")]
    InvalidConfig(String),
    /// A config key is set to a value this scheduler does not implement.
    #[error("{scheduler} scheduler: {key} = {value} is not supported ({supported})")]
    Unsupported {
        scheduler: &'static str,
        key: &'static str,
        value: String,
        supported: &'static str,
    },
    /// A scheduler name that is not one of [`SchedulerKind::ALL`].
    #[error("unknown scheduler `{name}`; valid names: {}", SchedulerKind::names())]
    UnknownKind { name: String },
    /// `step` was called with an index outside the schedule.
    #[error("scheduler: step index {index} is out of range for a {steps}-step schedule")]
    StepIndexOutOfRange { index: usize, steps: usize },
    /// `step` was called out of order: multistep state only fits consecutive steps.
    #[error(
        "scheduler: step {index} called but step {expected} is next (steps must run in order, \
         once each)"
    )]
    OutOfOrder { index: usize, expected: usize },
    /// The model output and the sample do not have the same number of elements.
    #[error("scheduler: noise_pred has {noise_pred} elements but sample has {sample}")]
    LengthMismatch { noise_pred: usize, sample: usize },
    /// The sample size changed between steps of one run.
    #[error(
        "scheduler: sample has {now} elements but earlier steps of this run had {before} (build \
         a new scheduler for a new run)"
    )]
    SampleSizeChanged { before: usize, now: usize },
}

/// What the engine needs of a diffusion scheduler: each generation job owns one, built for its
/// step count, so jobs with different schedulers and step counts can share UNet calls (the UNet
/// takes a timestep per row). Modelled on candle's `Scheduler` trait.
pub trait Scheduler: Send + fmt::Debug {
    /// Number of inference steps: the length of [`Scheduler::timesteps`]. Usually the requested
    /// count; diffusers' `trailing` spacing yields one more for some counts (61, 103, …; the
    /// extra last timestep is −1), and so does this. Loop over this, not the requested count.
    fn num_steps(&self) -> usize;

    /// The UNet timestep of each step, from high noise to low. Fractional for LMS and Euler
    /// (999.0, 988.909…, never rounded), whole numbers for the others.
    fn timesteps(&self) -> &[f32];

    /// Standard deviation of the initial latent noise (the unscaled noise is multiplied by it).
    fn init_noise_sigma(&self) -> f32;

    /// Turns the latent at a step into the UNet input, in place (diffusers'
    /// `scale_model_input`). `step_index < num_steps()`; an index past the end panics, like
    /// slice indexing.
    fn scale_model_input(&self, step_index: usize, sample: &mut [f32]);

    /// One step: updates `sample` in place from the latent at `step_index` to the next, given
    /// the (guided) noise prediction. Steps run in order, once each.
    fn step(
        &mut self,
        step_index: usize,
        noise_pred: &[f32],
        sample: &mut [f32],
    ) -> Result<(), SchedulerError>;

    /// Which scheduler this is.
    fn kind(&self) -> SchedulerKind;

    /// σ of each step plus the final one (`num_steps() + 1` values) for the σ-parameterised
    /// schedulers; empty for DDIM, which works on ᾱ directly.
    fn sigmas(&self) -> &[f32] {
        &[]
    }
}

/// The schedulers the runtime offers, by their command-line names (also the names the
/// manifest's `scheduler.kind` takes).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, serde::Deserialize)]
#[serde(try_from = "String")]
pub enum SchedulerKind {
    /// `lms`: diffusers' `LMSDiscreteScheduler`, order 4 — what ELITE's official code uses.
    #[default]
    Lms,
    /// `dpmpp-2m`: `DPMSolverMultistepScheduler` (DPM-Solver++, second order, multistep).
    DpmPp2m,
    /// `dpmpp-2m-karras`: the same on Karras et al.'s σ schedule (`use_karras_sigmas=True`).
    DpmPp2mKarras,
    /// `euler`: `EulerDiscreteScheduler` (Karras et al.'s Euler method, deterministic).
    Euler,
    /// `euler-a`: `EulerAncestralDiscreteScheduler` (adds fresh noise every step).
    EulerAncestral,
    /// `ddim`: `DDIMScheduler` with η = 0 (deterministic).
    Ddim,
    /// `unipc`: `UniPCMultistepScheduler` (UniP-2 predictor with the UniC corrector, bh2).
    UniPc,
}

impl SchedulerKind {
    /// Every scheduler, the default first.
    pub const ALL: [SchedulerKind; 7] = [
        Self::Lms,
        Self::DpmPp2m,
        Self::DpmPp2mKarras,
        Self::Euler,
        Self::EulerAncestral,
        Self::Ddim,
        Self::UniPc,
    ];

    /// The command-line name (`--scheduler NAME`).
    pub fn name(self) -> &'static str {
        match self {
            Self::Lms => "lms",
            Self::DpmPp2m => "dpmpp-2m",
            Self::DpmPp2mKarras => "dpmpp-2m-karras",
            Self::Euler => "euler",
            Self::EulerAncestral => "euler-a",
            Self::Ddim => "ddim",
            Self::UniPc => "unipc",
        }
    }

    /// The diffusers class it reproduces.
    pub fn diffusers_class(self) -> &'static str {
        match self {
            Self::Lms => "LMSDiscreteScheduler",
            Self::DpmPp2m | Self::DpmPp2mKarras => "DPMSolverMultistepScheduler",
            Self::Euler => "EulerDiscreteScheduler",
            Self::EulerAncestral => "EulerAncestralDiscreteScheduler",
            Self::Ddim => "DDIMScheduler",
            Self::UniPc => "UniPCMultistepScheduler",
        }
    }

    /// The step count to use when none is given.
    pub fn default_steps(self) -> usize {
        match self {
            // ELITE's official inference scripts (and its paper's evaluation) run 100 LMS steps.
            Self::Lms => 100,
            // diffusers' DPMSolverMultistepScheduler docs: "DPMSolver sampling with only 20
            // steps can generate high-quality samples" (DPM-Solver++, Lu et al. 2022: guided
            // sampling in 15–20 steps).
            Self::DpmPp2m | Self::DpmPp2mKarras => 20,
            // diffusers' StableDiffusionPipeline default (num_inference_steps=50); DDIM's
            // paper reports its Stable-Diffusion-era quality at 50 steps as well.
            Self::Euler | Self::EulerAncestral | Self::Ddim => 50,
            // UniPC is DPM-Solver++'s multistep update plus a corrector (diffusers builds it
            // from that scheduler) and its docs give no count: DPM-Solver++'s 20.
            Self::UniPc => 20,
        }
    }

    /// Whether its steps draw noise from the job's generator (euler-a).
    pub fn is_stochastic(self) -> bool {
        self == Self::EulerAncestral
    }

    /// The valid names, comma-separated (for messages and `--help`).
    pub fn names() -> String {
        Self::ALL.map(Self::name).join(", ")
    }
}

impl fmt::Display for SchedulerKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl TryFrom<String> for SchedulerKind {
    type Error = SchedulerError;

    fn try_from(name: String) -> Result<Self, Self::Error> {
        name.parse()
    }
}

impl FromStr for SchedulerKind {
    type Err = SchedulerError;

    fn from_str(name: &str) -> Result<Self, Self::Err> {
        Self::ALL
            .into_iter()
            .find(|k| k.name() == name)
            .ok_or_else(|| SchedulerError::UnknownKind {
                name: name.to_string(),
            })
    }
}

/// How the betas are spaced over the training timesteps (diffusers' `beta_schedule`; the
/// manifest's `scheduler.beta_schedule` uses the same names).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BetaSchedule {
    /// `"linear"`: `linspace(beta_start, beta_end)` in float32.
    Linear,
    /// `"scaled_linear"`: `linspace(sqrt(beta_start), sqrt(beta_end))²` in float32 (SD v1).
    ScaledLinear,
}

/// What the model predicts (diffusers' `prediction_type`). ELITE's UNet predicts noise.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PredictionType {
    /// `"epsilon"`: the model output is the noise ε.
    Epsilon,
}

/// How inference timesteps are placed over the training ones (diffusers' `timestep_spacing`,
/// Table 2 of Lin et al. 2023, "Common Diffusion Noise Schedules and Sample Steps are Flawed").
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TimestepSpacing {
    /// `"linspace"`: evenly from `T − 1` down to 0 (fractional for LMS and Euler).
    Linspace,
    /// `"leading"`: multiples of `T / N` from 0, shifted by `steps_offset` (DDIM's default).
    Leading,
    /// `"trailing"`: multiples of `T / N` down from `T`, minus one.
    Trailing,
}

impl TimestepSpacing {
    fn name(self) -> &'static str {
        match self {
            Self::Linspace => "linspace",
            Self::Leading => "leading",
            Self::Trailing => "trailing",
        }
    }
}

/// The σ after the last step (diffusers' `final_sigmas_type`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FinalSigmas {
    /// `"zero"`: denoise completely (diffusers' default).
    Zero,
    /// `"sigma_min"`: stop at the training schedule's smallest σ.
    SigmaMin,
}

/// Scheduler configuration: one field per diffusers config key the runtime honours.
///
/// [`SchedulerConfig::default`] is what diffusers builds from Stable Diffusion v1-4's
/// `scheduler_config.json` (`Class.from_config(config)`): the keys that file sets apply to
/// every scheduler, and `None` means "the scheduler class's own default", as a key absent from
/// that file does (see each field). Keys a scheduler does not have are ignored, as diffusers
/// ignores them; a value a scheduler cannot honour is a [`SchedulerError::Unsupported`].
#[derive(Debug, Clone, PartialEq)]
pub struct SchedulerConfig {
    /// `num_train_timesteps` (1000).
    pub num_train_timesteps: usize,
    /// `beta_start` (0.00085).
    pub beta_start: f64,
    /// `beta_end` (0.012).
    pub beta_end: f64,
    /// `beta_schedule` (`scaled_linear`).
    pub beta_schedule: BetaSchedule,
    /// `prediction_type` (`epsilon`).
    pub prediction_type: PredictionType,
    /// `steps_offset` (1 in SD v1-4's file): added to `leading` timesteps.
    pub steps_offset: usize,
    /// `set_alpha_to_one` (false in SD v1-4's file; DDIM): the ᾱ after the last step is
    /// `alphas_cumprod[0]` rather than 1.
    pub set_alpha_to_one: bool,
    /// `clip_sample` (false in SD v1-4's file; DDIM). Only false is supported.
    pub clip_sample: bool,
    /// `timestep_spacing`; `None`: `leading` for DDIM, `linspace` for the others.
    pub timestep_spacing: Option<TimestepSpacing>,
    /// `use_karras_sigmas`; `None`: true for `dpmpp-2m-karras`, false otherwise. Honoured by
    /// DPM-Solver++, Euler and UniPC.
    pub use_karras_sigmas: Option<bool>,
    /// `solver_order` of DPM-Solver++ and UniPC (1 or 2); `None`: 2. (LMS's order is
    /// [`LmsConfig::order`].)
    pub solver_order: Option<usize>,
    /// `final_sigmas_type` of DPM-Solver++, Euler and UniPC; `None`: `zero`.
    pub final_sigmas_type: Option<FinalSigmas>,
    /// `lower_order_final` of DPM-Solver++ and UniPC (true): first-order final steps.
    pub lower_order_final: bool,
}

impl Default for SchedulerConfig {
    fn default() -> Self {
        Self {
            num_train_timesteps: 1000,
            beta_start: 0.00085,
            beta_end: 0.012,
            beta_schedule: BetaSchedule::ScaledLinear,
            prediction_type: PredictionType::Epsilon,
            steps_offset: 1,
            set_alpha_to_one: false,
            clip_sample: false,
            timestep_spacing: None,
            use_karras_sigmas: None,
            solver_order: None,
            final_sigmas_type: None,
            lower_order_final: true,
        }
    }
}

impl SchedulerConfig {
    /// Builds the `kind` scheduler for `steps` inference steps (diffusers' `set_timesteps`).
    ///
    /// `generator` is the job's torch-compatible generator *after* it drew the initial noise
    /// (a fresh one when the caller supplies the initial latents): euler-a draws its per-step
    /// noise from it, as diffusers' pipeline passes its `generator` to the scheduler's `step`.
    /// The deterministic schedulers drop it.
    pub fn build(
        &self,
        kind: SchedulerKind,
        steps: usize,
        generator: TorchGenerator,
    ) -> Result<Box<dyn Scheduler>, SchedulerError> {
        self.build_with_table(kind, steps, generator, None)
    }

    /// [`SchedulerConfig::build`] on a given training σ table instead of the one computed
    /// from the betas (tests use torch's own table: its square roots are MKL's, whose rounding
    /// depends on the CPU). DDIM, which has no σ table, ignores it.
    pub(crate) fn build_with_table(
        &self,
        kind: SchedulerKind,
        steps: usize,
        generator: TorchGenerator,
        table: Option<Vec<f32>>,
    ) -> Result<Box<dyn Scheduler>, SchedulerError> {
        if steps == 0 || steps > self.num_train_timesteps {
            return Err(SchedulerError::InvalidStepCount {
                steps,
                train: self.num_train_timesteps,
            });
        }
        let name = kind.name();
        let train = self.train();
        train.validate(name)?;
        let table = match (table, kind) {
            (_, SchedulerKind::Ddim) => Vec::new(),
            (Some(table), _) if table.len() == self.num_train_timesteps => table,
            (Some(table), _) => {
                return Err(SchedulerError::InvalidConfig(format!(
                    "{name}: a σ table of {} values for {} training timesteps",
                    table.len(),
                    self.num_train_timesteps
                )))
            }
            (None, _) => train.sigmas(name)?,
        };
        Ok(match kind {
            SchedulerKind::Lms => Box::new(self.lms()?.build_from_table(steps, &table)?),
            SchedulerKind::DpmPp2m | SchedulerKind::DpmPp2mKarras => {
                Box::new(self.dpm_solver(kind)?.build_with_table(steps, &table)?)
            }
            SchedulerKind::Euler => Box::new(self.euler()?.build_with_table(steps, &table)?),
            SchedulerKind::EulerAncestral => Box::new(
                self.euler_ancestral()?
                    .build_with_table(steps, generator, &table)?,
            ),
            SchedulerKind::Ddim => Box::new(self.ddim()?.build(steps)?),
            SchedulerKind::UniPc => Box::new(self.unipc()?.build_with_table(steps, &table)?),
        })
    }

    fn train(&self) -> TrainSchedule {
        TrainSchedule {
            num_train_timesteps: self.num_train_timesteps,
            beta_start: self.beta_start,
            beta_end: self.beta_end,
            beta_schedule: self.beta_schedule,
        }
    }

    /// The LMS configuration (order 4, as diffusers' `step` defaults to).
    pub fn lms(&self) -> Result<LmsConfig, SchedulerError> {
        let name = SchedulerKind::Lms.name();
        self.reject_karras(name)?;
        self.reject_solver_order(name)?;
        self.reject_final_sigmas(name)?;
        if let Some(spacing) = self
            .timestep_spacing
            .filter(|&s| s != TimestepSpacing::Linspace)
        {
            return Err(unsupported(
                name,
                "timestep_spacing",
                spacing.name(),
                "LMS runs linspace timesteps",
            ));
        }
        Ok(LmsConfig {
            num_train_timesteps: self.num_train_timesteps,
            beta_start: self.beta_start,
            beta_end: self.beta_end,
            beta_schedule: self.beta_schedule,
            prediction_type: self.prediction_type,
            timestep_spacing: TimestepSpacing::Linspace,
            ..LmsConfig::default()
        })
    }

    /// The DPM-Solver++ configuration of `dpmpp-2m` or `dpmpp-2m-karras`.
    pub fn dpm_solver(&self, kind: SchedulerKind) -> Result<DpmSolverConfig, SchedulerError> {
        let karras = kind == SchedulerKind::DpmPp2mKarras;
        if karras && self.use_karras_sigmas == Some(false) {
            return Err(unsupported(
                kind.name(),
                "use_karras_sigmas",
                "false",
                "dpmpp-2m-karras is dpmpp-2m with Karras σ; use dpmpp-2m",
            ));
        }
        Ok(DpmSolverConfig {
            train: self.train(),
            solver_order: self.solver_order(kind.name())?,
            use_karras_sigmas: self.use_karras_sigmas.unwrap_or(karras),
            timestep_spacing: self.timestep_spacing.unwrap_or(TimestepSpacing::Linspace),
            steps_offset: self.steps_offset,
            final_sigmas_type: self.final_sigmas_type.unwrap_or(FinalSigmas::Zero),
            lower_order_final: self.lower_order_final,
        })
    }

    /// The Euler configuration.
    pub fn euler(&self) -> Result<EulerConfig, SchedulerError> {
        self.reject_solver_order(SchedulerKind::Euler.name())?;
        Ok(EulerConfig {
            train: self.train(),
            use_karras_sigmas: self.use_karras_sigmas.unwrap_or(false),
            timestep_spacing: self.timestep_spacing.unwrap_or(TimestepSpacing::Linspace),
            steps_offset: self.steps_offset,
            final_sigmas_type: self.final_sigmas_type.unwrap_or(FinalSigmas::Zero),
        })
    }

    /// The Euler ancestral configuration.
    pub fn euler_ancestral(&self) -> Result<EulerAncestralConfig, SchedulerError> {
        let name = SchedulerKind::EulerAncestral.name();
        self.reject_karras(name)?;
        self.reject_solver_order(name)?;
        self.reject_final_sigmas(name)?;
        Ok(EulerAncestralConfig {
            train: self.train(),
            timestep_spacing: self.timestep_spacing.unwrap_or(TimestepSpacing::Linspace),
            steps_offset: self.steps_offset,
        })
    }

    /// The DDIM configuration (η = 0).
    pub fn ddim(&self) -> Result<DdimConfig, SchedulerError> {
        let name = SchedulerKind::Ddim.name();
        self.reject_karras(name)?;
        self.reject_solver_order(name)?;
        self.reject_final_sigmas(name)?;
        if self.clip_sample {
            return Err(unsupported(
                name,
                "clip_sample",
                "true",
                "latent diffusion does not clip x₀; SD v1-4's config sets false",
            ));
        }
        Ok(DdimConfig {
            train: self.train(),
            timestep_spacing: self.timestep_spacing.unwrap_or(TimestepSpacing::Leading),
            steps_offset: self.steps_offset,
            set_alpha_to_one: self.set_alpha_to_one,
        })
    }

    /// The UniPC configuration (bh2).
    pub fn unipc(&self) -> Result<UniPcConfig, SchedulerError> {
        let name = SchedulerKind::UniPc.name();
        Ok(UniPcConfig {
            train: self.train(),
            solver_order: self.solver_order(name)?,
            use_karras_sigmas: self.use_karras_sigmas.unwrap_or(false),
            timestep_spacing: self.timestep_spacing.unwrap_or(TimestepSpacing::Linspace),
            steps_offset: self.steps_offset,
            final_sigmas_type: self.final_sigmas_type.unwrap_or(FinalSigmas::Zero),
            lower_order_final: self.lower_order_final,
        })
    }

    fn solver_order(&self, name: &'static str) -> Result<usize, SchedulerError> {
        match self.solver_order.unwrap_or(2) {
            order @ (1 | 2) => Ok(order),
            order => Err(unsupported(
                name,
                "solver_order",
                &order.to_string(),
                "1 or 2; diffusers recommends 2 for guided sampling",
            )),
        }
    }

    fn reject_karras(&self, name: &'static str) -> Result<(), SchedulerError> {
        match self.use_karras_sigmas {
            Some(true) => Err(unsupported(
                name,
                "use_karras_sigmas",
                "true",
                "Karras σ are offered by dpmpp-2m-karras, euler and unipc",
            )),
            _ => Ok(()),
        }
    }

    fn reject_solver_order(&self, name: &'static str) -> Result<(), SchedulerError> {
        match self.solver_order {
            Some(order) => Err(unsupported(
                name,
                "solver_order",
                &order.to_string(),
                "only dpmpp-2m, dpmpp-2m-karras and unipc have a solver order",
            )),
            None => Ok(()),
        }
    }

    fn reject_final_sigmas(&self, name: &'static str) -> Result<(), SchedulerError> {
        match self.final_sigmas_type {
            Some(FinalSigmas::SigmaMin) => Err(unsupported(
                name,
                "final_sigmas_type",
                "sigma_min",
                "only dpmpp-2m, dpmpp-2m-karras, euler and unipc end at sigma_min",
            )),
            _ => Ok(()),
        }
    }
}

fn unsupported(
    scheduler: &'static str,
    key: &'static str,
    value: &str,
    supported: &'static str,
) -> SchedulerError {
    SchedulerError::Unsupported {
        scheduler,
        key,
        value: value.to_string(),
        supported,
    }
}

/// Checks shared by every scheduler's `step`: the index is the next one and the buffers agree
/// in length (with each other and, for stateful schedulers, with the run's earlier steps).
pub(crate) fn check_step(
    step_index: usize,
    next_step: usize,
    steps: usize,
    noise_pred: &[f32],
    sample: &[f32],
    run_len: Option<usize>,
) -> Result<(), SchedulerError> {
    if step_index >= steps {
        return Err(SchedulerError::StepIndexOutOfRange {
            index: step_index,
            steps,
        });
    }
    if step_index != next_step {
        return Err(SchedulerError::OutOfOrder {
            index: step_index,
            expected: next_step,
        });
    }
    if noise_pred.len() != sample.len() {
        return Err(SchedulerError::LengthMismatch {
            noise_pred: noise_pred.len(),
            sample: sample.len(),
        });
    }
    match run_len {
        Some(before) if before != sample.len() => Err(SchedulerError::SampleSizeChanged {
            before,
            now: sample.len(),
        }),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_and_unknown_lists_all() {
        for kind in SchedulerKind::ALL {
            assert_eq!(kind.name().parse::<SchedulerKind>().unwrap(), kind);
            assert_eq!(kind.to_string(), kind.name());
            assert!(kind.default_steps() >= 1);
        }
        assert_eq!(SchedulerKind::default(), SchedulerKind::Lms);
        let err = "dpm++".parse::<SchedulerKind>().unwrap_err().to_string();
        for kind in SchedulerKind::ALL {
            assert!(err.contains(kind.name()), "{err}");
        }
        assert!(err.contains("dpm++"), "{err}");
    }

    #[test]
    fn every_kind_builds_with_the_sd_defaults() {
        let config = SchedulerConfig::default();
        for kind in SchedulerKind::ALL {
            let s = config.build(kind, 10, TorchGenerator::new(0)).unwrap();
            assert_eq!(s.kind(), kind);
            assert_eq!(s.num_steps(), 10);
            assert_eq!(s.timesteps().len(), 10);
            let expected_sigmas = if kind == SchedulerKind::Ddim { 0 } else { 11 };
            assert_eq!(s.sigmas().len(), expected_sigmas, "{kind}");
        }
    }

    #[test]
    fn step_counts_and_unsupported_values_are_errors() {
        let config = SchedulerConfig::default();
        for steps in [0, 1001] {
            for kind in SchedulerKind::ALL {
                let err = config
                    .build(kind, steps, TorchGenerator::new(0))
                    .unwrap_err();
                assert!(matches!(err, SchedulerError::InvalidStepCount { .. }));
            }
        }
        let cases = [
            (
                SchedulerKind::Lms,
                SchedulerConfig {
                    timestep_spacing: Some(TimestepSpacing::Leading),
                    ..SchedulerConfig::default()
                },
            ),
            (
                SchedulerKind::Ddim,
                SchedulerConfig {
                    clip_sample: true,
                    ..SchedulerConfig::default()
                },
            ),
            (
                SchedulerKind::EulerAncestral,
                SchedulerConfig {
                    use_karras_sigmas: Some(true),
                    ..SchedulerConfig::default()
                },
            ),
            (
                SchedulerKind::UniPc,
                SchedulerConfig {
                    solver_order: Some(3),
                    ..SchedulerConfig::default()
                },
            ),
            (
                SchedulerKind::Euler,
                SchedulerConfig {
                    solver_order: Some(2),
                    ..SchedulerConfig::default()
                },
            ),
            (
                SchedulerKind::DpmPp2mKarras,
                SchedulerConfig {
                    use_karras_sigmas: Some(false),
                    ..SchedulerConfig::default()
                },
            ),
        ];
        for (kind, config) in cases {
            let err = config.build(kind, 10, TorchGenerator::new(0)).unwrap_err();
            assert!(
                matches!(err, SchedulerError::Unsupported { .. }),
                "{kind}: {err}"
            );
            assert!(err.to_string().contains(kind.name()), "{err}");
        }
        // DDIM at 1000 steps with steps_offset 1 would index ᾱ[1000] (diffusers: IndexError).
        let err = SchedulerConfig::default()
            .build(SchedulerKind::Ddim, 1000, TorchGenerator::new(0))
            .unwrap_err();
        assert!(matches!(err, SchedulerError::InvalidConfig(_)), "{err}");
    }

    #[test]
    fn beta_schedule_reads_the_manifest_names() {
        let parse = |s: &str| serde_json::from_str::<BetaSchedule>(s);
        assert_eq!(
            parse("\"scaled_linear\"").unwrap(),
            BetaSchedule::ScaledLinear
        );
        assert_eq!(parse("\"linear\"").unwrap(), BetaSchedule::Linear);
        assert!(parse("\"squaredcos_cap_v2\"").is_err());
    }
}

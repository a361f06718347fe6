//! UniPC (Zhao et al. 2023), B(h) = e^h − 1 ("bh2"), data prediction, order 1 or 2: diffusers'
//! `UniPCMultistepScheduler`.
//!
//! Each step first *corrects* the sample it is given (UniC: the previous predictor step redone
//! with the model output at its result, so no extra UNet call), then *predicts* the next sample
//! (UniP, an Adams–Bashforth-like multistep update in λ = log α − log σ). Orders warm up from 1
//! and drop back to 1 for the final step (`lower_order_final`). As in diffusers the corrector of
//! order 2 solves its 2×2 system in float32 (`torch.linalg.solve`, LAPACK's LU with partial
//! pivoting); everything else is float32 scalar arithmetic in diffusers' order.

use super::numerics::{alpha_sigma, expm1_f32, lambda, TrainSchedule};
use super::timesteps::{self, interp};
use super::{check_step, FinalSigmas, Scheduler, SchedulerError, SchedulerKind, TimestepSpacing};

/// UniPC configuration: one field per diffusers config key honoured. The others are diffusers'
/// defaults: `solver_type="bh2"`, `predict_x0=True`, `disable_corrector=[]`, no `solver_p`,
/// no thresholding, epsilon prediction.
#[derive(Debug, Clone, PartialEq)]
pub struct UniPcConfig {
    pub(crate) train: TrainSchedule,
    /// `solver_order`: 1 or 2 (the corrector then has order 1 or 2 too).
    pub solver_order: usize,
    /// `use_karras_sigmas`.
    pub use_karras_sigmas: bool,
    /// `timestep_spacing` (ignored with Karras σ).
    pub timestep_spacing: TimestepSpacing,
    /// `steps_offset` (used by `leading` spacing).
    pub steps_offset: usize,
    /// `final_sigmas_type`.
    pub final_sigmas_type: FinalSigmas,
    /// `lower_order_final`.
    pub lower_order_final: bool,
}

impl UniPcConfig {
    /// Builds the scheduler for `steps` inference steps (diffusers' `set_timesteps`).
    pub fn build(&self, steps: usize) -> Result<UniPcScheduler, SchedulerError> {
        let name = SchedulerKind::UniPc.name();
        self.train.validate(name)?;
        self.build_with_table(steps, &self.train.sigmas(name)?)
    }

    /// [`UniPcConfig::build`] on a given training σ table (validated config).
    pub(crate) fn build_with_table(
        &self,
        steps: usize,
        table: &[f32],
    ) -> Result<UniPcScheduler, SchedulerError> {
        let name = SchedulerKind::UniPc.name();
        let train = self.train.num_train_timesteps;
        let (timesteps, sigmas) = if self.use_karras_sigmas {
            let (sigmas, timesteps) = timesteps::karras_schedule(
                f64::from(table[0]),
                f64::from(table[train - 1]),
                table,
                steps,
                true,
            );
            let mut sigmas: Vec<f32> = sigmas.iter().map(|&s| s as f32).collect();
            // diffusers: `sigma_last = sigmas[-1]` (the last Karras σ, i.e. the table's first).
            let last = sigmas[sigmas.len() - 1];
            sigmas.push(match self.final_sigmas_type {
                FinalSigmas::Zero => 0.0,
                FinalSigmas::SigmaMin => last,
            });
            (timesteps.into_iter().map(|t| t as f32).collect(), sigmas)
        } else {
            let ts = timesteps::multistep(self.timestep_spacing, train, steps, self.steps_offset);
            timesteps::check_range(name, &ts, train)?;
            let ts: Vec<f32> = ts.into_iter().map(|t| t as f32).collect();
            let mut sigmas: Vec<f32> = ts.iter().map(|&t| interp(t, table)).collect();
            sigmas.push(match self.final_sigmas_type {
                FinalSigmas::Zero => 0.0,
                FinalSigmas::SigmaMin => table[0],
            });
            (ts, sigmas)
        };
        Ok(UniPcScheduler {
            config: self.clone(),
            timesteps,
            sigmas,
            outputs: Vec::with_capacity(2),
            last_sample: None,
            this_order: 0,
            next_step: 0,
        })
    }
}

/// UniPC state for one run.
#[derive(Debug, Clone)]
pub struct UniPcScheduler {
    config: UniPcConfig,
    timesteps: Vec<f32>,
    sigmas: Vec<f32>,
    /// Data predictions of the last `solver_order` steps, oldest first.
    outputs: Vec<Vec<f32>>,
    /// The (corrected) sample the last predictor started from.
    last_sample: Option<Vec<f32>>,
    /// The order the last predictor used; the corrector reuses it.
    this_order: usize,
    next_step: usize,
}

/// The quantities of one UniP/UniC update from σ_s0 (index `s0`) to σ_t (index `t`).
struct Coefficients {
    /// σ_t / σ_s0.
    ratio: f32,
    /// α_t · h·φ₁(h) = α_t · (e^{−h} − 1).
    phi: f32,
    /// α_t · B(h), B(h) = e^{−h} − 1 (bh2).
    b_h: f32,
    /// `rk = (λ_s1 − λ_s0)/h` of the step before `s0` (order 2).
    rk: f32,
    /// The right-hand side `b` of the order conditions (for the order-2 corrector).
    rhs: [f32; 2],
}

impl UniPcScheduler {
    fn lambda_at(&self, i: usize) -> f32 {
        let (alpha, sigma) = alpha_sigma(self.sigmas[i]);
        lambda(alpha, sigma)
    }

    /// diffusers' `multistep_uni_{p,c}_bh_update` scalars, in its float32 operation order.
    /// `s1` is the index of the step before `s0` (used from order 2).
    fn coefficients(&self, t: usize, s0: usize, s1: Option<usize>) -> Coefficients {
        let (alpha_t, sigma_t) = alpha_sigma(self.sigmas[t]);
        let (_, sigma_s0) = alpha_sigma(self.sigmas[s0]);
        let lambda_t = lambda(alpha_t, sigma_t);
        let lambda_s0 = self.lambda_at(s0);
        let h = lambda_t - lambda_s0;
        let rk = s1.map_or(1.0, |s1| (self.lambda_at(s1) - lambda_s0) / h);
        let hh = -h;
        let h_phi_1 = expm1_f32(hh);
        let b_h = expm1_f32(hh);
        // b_i = h_phi_k · i! / B(h), h_phi_k ← h_phi_k / hh − 1/(i+1)!
        let mut h_phi_k = h_phi_1 / hh - 1.0;
        let b1 = h_phi_k * 1.0 / b_h;
        h_phi_k = h_phi_k / hh - 0.5;
        let b2 = h_phi_k * 2.0 / b_h;
        Coefficients {
            ratio: sigma_t / sigma_s0,
            phi: alpha_t * h_phi_1,
            b_h: alpha_t * b_h,
            rk,
            rhs: [b1, b2],
        }
    }

    /// Data prediction `x₀ = (x − σ_t·ε)/α_t` at step `i`.
    fn data_prediction(&self, i: usize, noise_pred: &[f32], sample: &[f32]) -> Vec<f32> {
        let (alpha_t, sigma_t) = alpha_sigma(self.sigmas[i]);
        noise_pred
            .iter()
            .zip(sample)
            .map(|(&eps, &x)| (x - sigma_t * eps) / alpha_t)
            .collect()
    }

    /// UniC at step `i`: redoes the last predictor step from `last_sample` with the new model
    /// output `m_t` (at the sample it produced), writing the corrected sample into `sample`.
    fn correct(&self, i: usize, m_t: &[f32], last_sample: &[f32], sample: &mut [f32]) {
        let order = self.this_order;
        let m0 = &self.outputs[self.outputs.len() - 1];
        let previous = (order == 2).then(|| &self.outputs[self.outputs.len() - 2]);
        let c = self.coefficients(i, i - 1, previous.map(|_| i - 2));
        let (rho_d1, rho_t) = match previous {
            Some(_) => solve_order2(c.rk, c.rhs),
            None => (0.0, 0.5),
        };
        for (k, x) in sample.iter_mut().enumerate() {
            let x_t_ = c.ratio * last_sample[k] - c.phi * m0[k];
            let d1_t = m_t[k] - m0[k];
            let inner = match previous {
                // einsum over one column: ρ₀·D1 with D1 = (m₁ − m₀)/rk.
                Some(m1) => rho_d1 * ((m1[k] - m0[k]) / c.rk) + rho_t * d1_t,
                None => rho_t * d1_t,
            };
            *x = x_t_ - c.b_h * inner;
        }
    }

    /// UniP at step `i` of the given order: from the (corrected) `sample` at σ_i to σ_{i+1}.
    fn predict(&self, i: usize, order: usize, sample: &mut [f32]) {
        let m0 = &self.outputs[self.outputs.len() - 1];
        let previous = (order == 2).then(|| &self.outputs[self.outputs.len() - 2]);
        let c = self.coefficients(i + 1, i, previous.map(|_| i - 1));
        for (k, x) in sample.iter_mut().enumerate() {
            let x_t_ = c.ratio * *x - c.phi * m0[k];
            *x = match previous {
                // ρ = 0.5 for order 2 (diffusers' simplified predictor).
                Some(m1) => x_t_ - c.b_h * (0.5 * ((m1[k] - m0[k]) / c.rk)),
                None => x_t_,
            };
        }
    }
}

/// `torch.linalg.solve([[1, 1], [rk, 1]], [b1, b2])` in float32 as torch's LAPACK (MKL's
/// `sgesv`) does it: LU with partial pivoting, the forward substitution as one fused
/// multiply-add, the back substitution multiplying by reciprocals of the pivots. (Measured
/// against torch on 5000 random systems of this form: bit-exact; a textbook substitution with
/// divisions differs in half of them.) Returns `(ρ₀, ρ₁)`.
fn solve_order2(rk: f32, b: [f32; 2]) -> (f32, f32) {
    let (mut a, mut rhs) = ([[1.0_f32, 1.0], [rk, 1.0]], b);
    if rk.abs() > 1.0 {
        a.swap(0, 1);
        rhs.swap(0, 1);
    }
    let inv_pivot = 1.0 / a[0][0];
    let l = a[1][0] * inv_pivot;
    // a[0][1] is 1 in either row order, so these products are exact.
    let u11 = a[1][1] - l * a[0][1];
    let y1 = (-l).mul_add(rhs[0], rhs[1]);
    let x1 = y1 * (1.0 / u11);
    let x0 = (rhs[0] - x1 * a[0][1]) * inv_pivot;
    (x0, x1)
}

impl Scheduler for UniPcScheduler {
    fn num_steps(&self) -> usize {
        self.timesteps.len()
    }

    fn timesteps(&self) -> &[f32] {
        &self.timesteps
    }

    /// 1: UniPC works on variance-preserving latents.
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
        let run_len = self.outputs.last().map(Vec::len);
        check_step(
            step_index,
            self.next_step,
            self.timesteps.len(),
            noise_pred,
            sample,
            run_len,
        )?;
        let i = step_index;
        let m_t = self.data_prediction(i, noise_pred, sample);
        if let Some(last) = self.last_sample.take() {
            self.correct(i, &m_t, &last, sample);
        }
        if self.outputs.len() == self.config.solver_order {
            self.outputs.remove(0);
        }
        let warmed_up = self.outputs.len() + 1;
        self.outputs.push(m_t);
        let order = if self.config.lower_order_final {
            self.config.solver_order.min(self.timesteps.len() - i)
        } else {
            self.config.solver_order
        };
        self.this_order = order.min(warmed_up);
        self.last_sample = Some(sample.to_vec());
        self.predict(i, self.this_order, sample);
        self.next_step += 1;
        Ok(())
    }

    fn kind(&self) -> SchedulerKind {
        SchedulerKind::UniPc
    }

    fn sigmas(&self) -> &[f32] {
        &self.sigmas
    }
}

#[cfg(test)]
mod tests {
    use super::super::{parity, SchedulerKind};

    #[test]
    fn matches_diffusers() {
        parity::check_kind(SchedulerKind::UniPc);
    }
}

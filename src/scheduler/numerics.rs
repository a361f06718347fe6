//! What torch computes for the schedulers, in float32: betas, ᾱ, the training σ table and the
//! scalar arithmetic of the multistep solvers.
//!
//! Every diffusers scheduler builds its tables with float32 torch ops (`torch.linspace`, `**2`,
//! `cumprod`, `** 0.5`) and does its per-step scalar arithmetic on 0-dimensional float32
//! tensors. Reproducing that to the ulp is what makes the σ tables bit-exact and the steps agree
//! with diffusers to float32 rounding; the pieces that are not IEEE arithmetic are documented
//! where they are reproduced (the FMA-contracted `linspace`, `cumprod`'s f64 accumulator, MKL's
//! square root on the SD v1 table).
//!
//! MKL's float32 square root is not correctly rounded, and how it rounds depends on the CPU it
//! dispatches for: SD v1's σ table as torch computes it differs from IEEE `sqrt` in 190 places
//! on the machine that wrote the LMS fixtures and golden data, in 6 on another x86 CPU (with
//! AVX512-FP16). The table here is the former's ([`TORCH_SQRT_ULPS`]), so LMS stays bit-exact
//! against its committed reference; against diffusers on another CPU σ can be one ulp apart
//! (the scheduler parity tests measure both).

use super::{BetaSchedule, SchedulerError};

/// The training noise schedule: what every scheduler derives its tables from (diffusers'
/// `num_train_timesteps`, `beta_start`, `beta_end`, `beta_schedule`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct TrainSchedule {
    pub num_train_timesteps: usize,
    pub beta_start: f64,
    pub beta_end: f64,
    pub beta_schedule: BetaSchedule,
}

impl TrainSchedule {
    /// Stable Diffusion v1's schedule, the one [`TORCH_SQRT_ULPS`] was measured on.
    pub const SD_V1: Self = Self {
        num_train_timesteps: 1000,
        beta_start: 0.00085,
        beta_end: 0.012,
        beta_schedule: BetaSchedule::ScaledLinear,
    };

    /// The checks every scheduler needs before it builds a table (`scheduler` names it).
    pub fn validate(&self, scheduler: &'static str) -> Result<(), SchedulerError> {
        let bad = |reason: String| {
            Err(SchedulerError::InvalidConfig(format!(
                "{scheduler}: {reason}"
            )))
        };
        if self.num_train_timesteps < 2 || self.num_train_timesteps > 1 << 20 {
            return bad(format!(
                "num_train_timesteps is {}; it must be between 2 and 2^20",
                self.num_train_timesteps
            ));
        }
        for (name, beta) in [("beta_start", self.beta_start), ("beta_end", self.beta_end)] {
            if !(beta.is_finite() && beta > 0.0 && beta < 1.0) {
                return bad(format!(
                    "{name} is {beta}; it must lie strictly between 0 and 1"
                ));
            }
        }
        Ok(())
    }

    /// The betas as diffusers computes them, in float32.
    pub fn betas(&self) -> Vec<f32> {
        let n = self.num_train_timesteps;
        match self.beta_schedule {
            BetaSchedule::Linear => {
                torch_linspace_f32(self.beta_start as f32, self.beta_end as f32, n)
            }
            BetaSchedule::ScaledLinear => {
                let (start, end) = (self.beta_start.sqrt() as f32, self.beta_end.sqrt() as f32);
                let mut betas = torch_linspace_f32(start, end, n);
                betas.iter_mut().for_each(|b| *b *= *b);
                betas
            }
        }
    }

    /// `alphas_cumprod = torch.cumprod(1 - betas)`: `1 − β` in f32, and torch's CPU `cumprod`
    /// accumulates in f64 and stores each partial product as f32.
    pub fn alphas_cumprod(&self) -> Vec<f32> {
        let mut cumulative = 1.0_f64;
        self.betas()
            .into_iter()
            .map(|beta| {
                cumulative *= f64::from(1.0 - beta);
                cumulative as f32
            })
            .collect()
    }

    /// The training σ table `((1 − ᾱ)/ᾱ) ** 0.5`, float32 as torch computes it (with torch's
    /// own square-root rounding on SD v1's table, see [`TORCH_SQRT_ULPS`]).
    pub fn sigmas(&self, scheduler: &'static str) -> Result<Vec<f32>, SchedulerError> {
        let mut table: Vec<f32> = self
            .alphas_cumprod()
            .into_iter()
            .map(|alpha_bar| ((1.0 - alpha_bar) / alpha_bar).sqrt())
            .collect();
        if *self == Self::SD_V1 {
            for &(index, ulps) in &TORCH_SQRT_ULPS {
                let root = &mut table[usize::from(index)];
                *root = f32::from_bits(root.to_bits().wrapping_add_signed(i32::from(ulps)));
            }
        }
        if table.iter().all(|s| s.is_finite() && *s > 0.0) {
            Ok(table)
        } else {
            Err(SchedulerError::InvalidConfig(format!(
                "{scheduler}: the beta schedule gives a non-finite or zero σ (ᾱ underflowed or \
                 reached 1)"
            )))
        }
    }
}

/// `torch.linspace(start, end, n, dtype=float32)` on the CPU, bit for bit.
///
/// torch fills the first half forwards from `start` and the second half backwards from `end`,
/// each value as one multiply-add with a float32 step. torch's AVX2/AVX512 CPU kernels (what
/// x86-64 machines run) are compiled with FMA contraction, so each value is rounded once; this
/// uses `mul_add` to do the same. (torch's generic kernel rounds twice and differs by one ulp
/// in about 15% of the values.)
pub(crate) fn torch_linspace_f32(start: f32, end: f32, n: usize) -> Vec<f32> {
    if n == 1 {
        return vec![start];
    }
    let step = (end - start) / (n - 1) as f32;
    let halfway = n / 2;
    (0..n)
        .map(|i| {
            if i < halfway {
                step.mul_add(i as f32, start)
            } else {
                (-step).mul_add((n - 1 - i) as f32, end)
            }
        })
        .collect()
}

/// Where torch's float32 square root (MKL's on x86, not correctly rounded) differs from the
/// correctly rounded one on SD v1's training σ table: `(index, ulps)`. Generated from torch by
/// `python -m export.torch_sqrt_table`; `export/tests` checks it still matches torch. With it
/// the σ table — and the LMS coefficients, which divide by σ differences — equal diffusers'.
#[rustfmt::skip]
const TORCH_SQRT_ULPS: [(u16, i8); 190] = [
    (0, 1), (3, 1), (21, -1), (23, -1), (33, 1), (36, 1), (44, 1), (48, 1), (51, -1), (52, 1),
    (54, 1), (85, 1), (92, 1), (107, 1), (108, 1), (114, -1), (126, 1), (129, 1), (133, -1),
    (135, -1), (137, -1), (147, -1), (148, -1), (155, 1), (159, 1), (162, -1), (167, -1),
    (168, 1), (169, -1), (170, 1), (171, -1), (175, 1), (182, -1), (183, 1), (187, 1),
    (189, 1), (193, -1), (201, 1), (205, -1), (212, 1), (213, -1), (228, -1), (240, -1),
    (246, -1), (256, 1), (260, -1), (263, 1), (273, -1), (280, 1), (283, 1), (287, 1),
    (288, 1), (289, -1), (291, -1), (292, -1), (293, 1), (295, 1), (311, -1), (313, 1),
    (315, 1), (321, -1), (323, 1), (324, -1), (330, -1), (331, -1), (333, 1), (334, 1),
    (336, 1), (337, 1), (338, 1), (340, -1), (342, -1), (343, -1), (345, 1), (346, 1),
    (348, 1), (349, 1), (351, 1), (353, 1), (354, 1), (356, -1), (358, -1), (363, -1),
    (364, -1), (375, 1), (379, -1), (383, -1), (389, -1), (404, -1), (408, -1), (414, -1),
    (429, -1), (433, -1), (444, -1), (461, 1), (464, -1), (467, 1), (470, 1), (471, -1),
    (479, 1), (489, -1), (490, 1), (496, 1), (498, 1), (502, 1), (503, 1), (514, 1), (515, 1),
    (518, 1), (519, 1), (522, 1), (525, 1), (529, 1), (530, 1), (532, -1), (534, 1), (535, -1),
    (537, 1), (540, 1), (542, -1), (546, 1), (548, -1), (554, 1), (557, -1), (558, -1),
    (560, 1), (563, -1), (565, 1), (566, 1), (586, -1), (593, -1), (597, -1), (602, -1),
    (615, 1), (639, -1), (660, 1), (663, 1), (671, -1), (675, 1), (677, 1), (688, 1), (692, 1),
    (695, -1), (704, -1), (706, -1), (708, 1), (713, 1), (716, -1), (717, -1), (719, -1),
    (721, -1), (722, 1), (736, -1), (739, 1), (742, -1), (750, -1), (754, 1), (763, 1),
    (765, -1), (774, 1), (778, -1), (779, 1), (782, 1), (803, 1), (806, -1), (835, 1),
    (836, 1), (841, 1), (846, 1), (853, -1), (863, 1), (875, 1), (880, 1), (881, 1), (883, 1),
    (887, 1), (888, -1), (897, -1), (900, -1), (914, -1), (937, -1), (960, 1), (964, -1),
    (975, -1), (986, 1), (989, -1), (992, -1), (996, 1), (997, 1), (998, 1),
];

/// diffusers' `_sigma_to_alpha_sigma_t` on a 0-d float32 tensor: `α = 1 / (σ² + 1) ** 0.5`,
/// `σ_t = σ · α`, each operation rounded to f32. (torch's scalar square root is MKL's, which
/// rounds about 0.7% of arbitrary inputs one ulp away from this correctly rounded one.)
pub(crate) fn alpha_sigma(sigma: f32) -> (f32, f32) {
    let alpha = 1.0 / (sigma * sigma + 1.0).sqrt();
    (alpha, sigma * alpha)
}

/// `torch.log(α) − torch.log(σ_t)` in f32: the half log-SNR λ the DPM-Solver family steps in.
/// `σ_t = 0` (the final step) gives +∞, as in torch.
pub(crate) fn lambda(alpha: f32, sigma_t: f32) -> f32 {
    ln_f32(alpha) - ln_f32(sigma_t)
}

/// float32 `torch.log`, correctly rounded (torch's agreed with it on every scalar we sampled).
pub(crate) fn ln_f32(x: f32) -> f32 {
    f64::from(x).ln() as f32
}

/// float32 `torch.exp`, correctly rounded (MKL's rounds ~1% of inputs one ulp away).
pub(crate) fn exp_f32(x: f32) -> f32 {
    f64::from(x).exp() as f32
}

/// float32 `torch.expm1`, correctly rounded (MKL's rounds ~0.1% of inputs one ulp away).
pub(crate) fn expm1_f32(x: f32) -> f32 {
    f64::from(x).exp_m1() as f32
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scalar_helpers_handle_the_final_zero_sigma() {
        // The last step of a "zero" schedule: σ = 0 gives α = 1, σ_t = 0, λ = +∞, as torch does.
        let (alpha, sigma_t) = alpha_sigma(0.0);
        assert_eq!((alpha, sigma_t), (1.0, 0.0));
        assert_eq!(lambda(alpha, sigma_t), f32::INFINITY);
        assert_eq!(exp_f32(f32::NEG_INFINITY), 0.0);
        assert_eq!(expm1_f32(f32::NEG_INFINITY), -1.0);
    }

    #[test]
    fn validation_names_the_field() {
        let bad = TrainSchedule {
            beta_end: 1.5,
            ..TrainSchedule::SD_V1
        };
        let err = bad.validate("ddim").unwrap_err().to_string();
        assert!(err.contains("beta_end") && err.contains("ddim"), "{err}");
        let bad = TrainSchedule {
            num_train_timesteps: 1,
            ..TrainSchedule::SD_V1
        };
        assert!(bad.validate("euler").is_err());
    }
}

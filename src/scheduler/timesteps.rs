//! What numpy computes for the schedulers: the timestep spacings, σ interpolation, the Karras
//! schedule and its σ → t inversion.
//!
//! diffusers' `set_timesteps` builds the schedule with numpy in float64 (`linspace`, `arange`,
//! `round`, `interp`) and casts to float32 at the end; each function here reproduces one numpy
//! expression operation for operation, including numpy's rounding (half to even), `arange`'s
//! length rule and its fill (`start + i·((start + step) − start)`), and the float32 `np.log` of
//! the σ table, which is numpy's own SIMD kernel rather than a correctly rounded logarithm.

use super::{SchedulerError, TimestepSpacing};

/// `np.linspace(start, stop, num)` in f64: `i · step + start` (two roundings), the last value
/// set to `stop`.
pub(crate) fn numpy_linspace(start: f64, stop: f64, num: usize) -> Vec<f64> {
    if num == 0 {
        return Vec::new();
    }
    if num == 1 {
        return vec![start];
    }
    let div = (num - 1) as f64;
    let step = (stop - start) / div;
    let mut values: Vec<f64> = (0..num)
        .map(|i| {
            if step == 0.0 {
                i as f64 / div * (stop - start) + start
            } else {
                i as f64 * step + start
            }
        })
        .collect();
    values[num - 1] = stop;
    values
}

/// `np.arange(start, stop, step)` for float64: `ceil((stop − start)/step)` values, `start`,
/// `start + step`, then `start + i·delta` with `delta = (start + step) − start` (numpy's fill).
///
/// The length rule is why `trailing` spacing yields one timestep more than asked for some step
/// counts (61, 103, 121, … of 1000): diffusers does the same.
pub(crate) fn numpy_arange(start: f64, stop: f64, step: f64) -> Vec<f64> {
    let len = ((stop - start) / step).ceil();
    // NaN (step 0) and non-positive lengths are empty, as numpy's are.
    if len.is_nan() || len <= 0.0 {
        return Vec::new();
    }
    let len = len as usize;
    let second = start + step;
    let delta = second - start;
    (0..len)
        .map(|i| match i {
            0 => start,
            1 => second,
            _ => start + i as f64 * delta,
        })
        .collect()
}

/// numpy's `round` (half to even).
pub(crate) fn round_even(x: f64) -> f64 {
    x.round_ties_even()
}

/// The timesteps of LMS, Euler and Euler ancestral (`N` float32 values, fractional for
/// `linspace`), as their `set_timesteps` places them.
pub(crate) fn fractional(
    spacing: TimestepSpacing,
    train: usize,
    steps: usize,
    offset: usize,
) -> Vec<f32> {
    let t = train as f64;
    match spacing {
        TimestepSpacing::Linspace => numpy_linspace(0.0, t - 1.0, steps)
            .into_iter()
            .rev()
            .map(|v| v as f32)
            .collect(),
        TimestepSpacing::Leading => {
            let ratio = (train / steps) as f64;
            (0..steps)
                .rev()
                .map(|i| round_even(i as f64 * ratio) as f32 + offset as f32)
                .collect()
        }
        TimestepSpacing::Trailing => numpy_arange(t, 0.0, -(t / steps as f64))
            .into_iter()
            .map(|v| round_even(v) as f32 - 1.0)
            .collect(),
    }
}

/// The integer timesteps of DPM-Solver++ and UniPC: `N + 1` points, the last dropped.
pub(crate) fn multistep(
    spacing: TimestepSpacing,
    train: usize,
    steps: usize,
    offset: usize,
) -> Vec<i64> {
    let t = train as f64;
    match spacing {
        TimestepSpacing::Linspace => {
            let mut v: Vec<i64> = numpy_linspace(0.0, t - 1.0, steps + 1)
                .into_iter()
                .map(|x| round_even(x) as i64)
                .collect();
            v.reverse();
            v.pop();
            v
        }
        TimestepSpacing::Leading => {
            let ratio = (train / (steps + 1)) as i64;
            (1..=steps as i64)
                .rev()
                .map(|i| i * ratio + offset as i64)
                .collect()
        }
        TimestepSpacing::Trailing => trailing_integers(t, steps),
    }
}

/// The integer timesteps of DDIM: `N` points.
pub(crate) fn ddim(
    spacing: TimestepSpacing,
    train: usize,
    steps: usize,
    offset: usize,
) -> Vec<i64> {
    let t = train as f64;
    match spacing {
        TimestepSpacing::Linspace => numpy_linspace(0.0, t - 1.0, steps)
            .into_iter()
            .rev()
            .map(|x| round_even(x) as i64)
            .collect(),
        TimestepSpacing::Leading => {
            let ratio = (train / steps) as i64;
            (0..steps as i64)
                .rev()
                .map(|i| i * ratio + offset as i64)
                .collect()
        }
        TimestepSpacing::Trailing => trailing_integers(t, steps),
    }
}

/// `np.arange(T, 0, −T/N).round().astype(int64) − 1`.
fn trailing_integers(t: f64, steps: usize) -> Vec<i64> {
    numpy_arange(t, 0.0, -(t / steps as f64))
        .into_iter()
        .map(|v| round_even(v) as i64 - 1)
        .collect()
}

/// `np.interp(t, arange(len), table)` in f64, cast to f32; clamped to the ends outside
/// `[0, len − 1]` as numpy clamps.
///
/// With unit spacing numpy's `slope·(t − j) + table[j]` has an exact product, so this
/// reproduces it bit for bit.
pub(crate) fn interp(t: f32, table: &[f32]) -> f32 {
    let x = f64::from(t);
    let last = table.len() - 1;
    if x <= 0.0 {
        return table[0];
    }
    let j = (x.floor() as usize).min(last);
    if j == last {
        return table[last];
    }
    let (lo, hi) = (f64::from(table[j]), f64::from(table[j + 1]));
    ((hi - lo) * (x - j as f64) + lo) as f32
}

/// Karras et al.'s σ schedule (ρ = 7) between the table's ends, in f64, as diffusers'
/// `_convert_to_karras`.
pub(crate) fn karras(sigma_min: f64, sigma_max: f64, steps: usize) -> Vec<f64> {
    const RHO: f64 = 7.0;
    let min_inv = sigma_min.powf(1.0 / RHO);
    let max_inv = sigma_max.powf(1.0 / RHO);
    numpy_linspace(0.0, 1.0, steps)
        .into_iter()
        .map(|ramp| (max_inv + ramp * (min_inv - max_inv)).powf(RHO))
        .collect()
}

/// diffusers' `_sigma_to_t`: the fractional training timestep of a σ, by linear interpolation
/// of the log σ table. The table is float32, so `low − high` is a float32 subtraction.
pub(crate) fn sigma_to_t(sigma: f64, log_sigmas: &[f32]) -> f64 {
    let log_sigma = sigma.max(1e-10).ln();
    // numpy: cumsum(dists >= 0).argmax(): the last index at or below log σ, 0 if none.
    let below = log_sigmas
        .iter()
        .rposition(|&l| log_sigma - f64::from(l) >= 0.0)
        .unwrap_or(0);
    let low_idx = below.min(log_sigmas.len() - 2);
    let high_idx = low_idx + 1;
    let (low, high) = (log_sigmas[low_idx], log_sigmas[high_idx]);
    let w = ((f64::from(low) - log_sigma) / f64::from(low - high)).clamp(0.0, 1.0);
    (1.0 - w) * low_idx as f64 + w * high_idx as f64
}

/// The Karras σ from `sigma_max` down to `sigma_min` and their timesteps on the training σ
/// `table`, as DPM-Solver++ and UniPC (timesteps `round`ed) and Euler (not) derive them.
pub(crate) fn karras_schedule(
    sigma_min: f64,
    sigma_max: f64,
    table: &[f32],
    steps: usize,
    round: bool,
) -> (Vec<f64>, Vec<f64>) {
    let log_sigmas: Vec<f32> = table.iter().map(|&s| numpy_log_f32(s)).collect();
    let sigmas = karras(sigma_min, sigma_max, steps);
    let timesteps = sigmas
        .iter()
        .map(|&s| {
            let t = sigma_to_t(s, &log_sigmas);
            if round {
                round_even(t)
            } else {
                t
            }
        })
        .collect();
    (sigmas, timesteps)
}

/// Checks that every integer timestep indexes the training tables (`steps_offset` can push the
/// first one past the end: `leading` spacing at 1000 steps with offset 1 gives 1000).
pub(crate) fn check_range(
    scheduler: &'static str,
    timesteps: &[i64],
    train: usize,
) -> Result<(), SchedulerError> {
    match timesteps
        .iter()
        .find(|&&t| t >= train as i64 || t < -(train as i64))
    {
        Some(t) => Err(SchedulerError::InvalidConfig(format!(
            "{scheduler}: timestep {t} lies outside the {train} training timesteps (lower \
             steps_offset or the step count)"
        ))),
        None => Ok(()),
    }
}

/// numpy's float32 `np.log` on x86-64 (its AVX2/AVX512F kernel), for positive normal inputs:
/// `x = m·2^e` with `m ∈ (√½, √2]`, then `e·ln 2 + P(m − 1)/Q(m − 1)` with degree-5
/// polynomials evaluated by fused multiply-adds. Up to 3.8 ulp from the true logarithm, so a
/// correctly rounded log would move Karras timesteps across a rounding boundary.
pub(crate) fn numpy_log_f32(x: f32) -> f32 {
    // numpy's NPY_COEFF_{P,Q}{0..5}_LOGf, NPY_SQRT1_2f and NPY_LOGE2f (C float literals).
    #[allow(clippy::excessive_precision)]
    const P: [f32; 6] = [
        0.0,
        9.999999999999998702752e-01,
        2.112677543073053063722e+00,
        1.480000633576506585156e+00,
        3.808837741388407920751e-01,
        2.589979117907922693523e-02,
    ];
    #[allow(clippy::excessive_precision)]
    const Q: [f32; 6] = [
        1.0,
        2.612677543073109236779e+00,
        2.453006071784736363091e+00,
        9.864942958519418960339e-01,
        1.546476374983906719538e-01,
        5.875095403124574342950e-03,
    ];
    let bits = x.to_bits();
    let mut e = ((bits >> 23) as i32 - 126) as f32;
    let mut m = f32::from_bits((bits & 0x007f_ffff) | 0x3f00_0000);
    if m <= std::f32::consts::FRAC_1_SQRT_2 {
        m += m;
        e -= 1.0;
    }
    let y = m - 1.0;
    let num = P[..5].iter().rev().fold(P[5], |acc, &p| acc.mul_add(y, p));
    let den = Q[..5].iter().rev().fold(Q[5], |acc, &q| acc.mul_add(y, q));
    e.mul_add(std::f32::consts::LN_2, num / den)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numpy_expressions() {
        // np.linspace(0, 999, 3) -> [0, 499.5, 999]; round -> [0, 500, 999] (half to even).
        assert_eq!(numpy_linspace(0.0, 999.0, 3), vec![0.0, 499.5, 999.0]);
        assert_eq!(round_even(2.5), 2.0);
        assert_eq!(round_even(499.5), 500.0);
        // np.arange(1000, 0, -1000/61) has 62 values (the length rule), np.arange(1000, 0,
        // -500.0) two.
        assert_eq!(numpy_arange(1000.0, 0.0, -1000.0 / 61.0).len(), 62);
        assert_eq!(numpy_arange(1000.0, 0.0, -500.0), vec![1000.0, 500.0]);
        assert!(numpy_arange(0.0, 10.0, -1.0).is_empty());
    }

    #[test]
    fn interp_clamps_like_numpy() {
        let table = [1.0_f32, 2.0, 4.0];
        assert_eq!(interp(-1.0, &table), 1.0);
        assert_eq!(interp(0.5, &table), 1.5);
        assert_eq!(interp(2.0, &table), 4.0);
        assert_eq!(interp(7.0, &table), 4.0);
    }

    /// numpy's float32 log of torch's SD v1 σ table (`export/fixtures_schedulers.py`), bit for
    /// bit; a correctly rounded log differs from it in some places, which is why it is emulated.
    #[test]
    fn numpy_log_matches_numpy_on_the_sigma_table() {
        let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/schedulers");
        let table: ndarray::Array1<f32> =
            ndarray_npy::read_npy(format!("{dir}/train_sigmas.npy")).unwrap();
        let numpy: ndarray::Array1<f32> =
            ndarray_npy::read_npy(format!("{dir}/train_log_sigmas.npy")).unwrap();
        let ours: Vec<f32> = table.iter().map(|&s| numpy_log_f32(s)).collect();
        assert_eq!(ours, numpy.to_vec());
        let rounded = table
            .iter()
            .zip(&numpy)
            .filter(|(&s, &l)| (f64::from(s).ln() as f32) != l)
            .count();
        eprintln!("numpy's f32 log differs from the correctly rounded one on {rounded}/1000 σ");
    }

    #[test]
    fn range_check_names_the_timestep() {
        let err = check_range("ddim", &[1000, 1], 1000)
            .unwrap_err()
            .to_string();
        assert!(err.contains("1000") && err.contains("ddim"), "{err}");
        assert!(check_range("ddim", &[999, -1], 1000).is_ok());
    }
}

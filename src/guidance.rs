//! Classifier-free guidance: how a job's conditional and unconditional rows are laid out in UNet
//! calls, and how their noise predictions are combined.
//!
//! Each image of a job needs two UNet rows per step: a conditional row (the prompt's text
//! embeddings, ELITE's local branch weighted by λ) and an unconditional row (the empty prompt,
//! λ = 0, which makes the graph compute exactly the reference's global-only unconditional call).
//! The UNet's attention max is taken per sample (README, Design), so rows are independent: any
//! rows of any jobs can share a call and each still gets exactly its own result.

use ndarray::{ArrayView3, Zip};

/// How a job's guidance rows may share UNet calls.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum CfgMode {
    /// A job's conditional and unconditional rows may go into the same call (one call at batch
    /// 2n for a job alone): fewer, larger calls, which is what a GPU wants.
    #[default]
    Batched,
    /// A job's conditional rows and unconditional rows always go into separate calls (two calls
    /// at batch n for a job alone), as the official scripts do. On a CPU the GEMMs are already
    /// large at batch 1, so this is about as fast and holds half the activations.
    Split,
}

/// Which half of the guidance a UNet row belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RowKind {
    /// The prompt with the concept's word injected; local branch at the job's λ.
    Conditional,
    /// The empty prompt; λ = 0.
    Unconditional,
}

impl RowKind {
    /// Row `r` of a job with `n` images: rows `0..n` are conditional, `n..2n` unconditional;
    /// both halves hold image `r % n`.
    pub fn of_row(row: usize, images: usize) -> RowKind {
        if row < images {
            RowKind::Conditional
        } else {
            RowKind::Unconditional
        }
    }
}

/// `uncond + g · (cond − uncond)` element by element in f32, the reference's order of
/// operations, written into `out`.
pub fn combine(
    cond: ArrayView3<f32>,
    uncond: ArrayView3<f32>,
    guidance: f32,
    out: ndarray::ArrayViewMut3<f32>,
) {
    Zip::from(out)
        .and(cond)
        .and(uncond)
        .for_each(|o, &c, &u| *o = u + guidance * (c - u));
}

#[cfg(test)]
mod tests {
    use super::*;
    use ndarray::Array3;

    #[test]
    fn rows_split_into_halves() {
        assert_eq!(RowKind::of_row(0, 2), RowKind::Conditional);
        assert_eq!(RowKind::of_row(1, 2), RowKind::Conditional);
        assert_eq!(RowKind::of_row(2, 2), RowKind::Unconditional);
        assert_eq!(RowKind::of_row(3, 2), RowKind::Unconditional);
    }

    #[test]
    fn combine_follows_the_reference_formula() {
        let cond = Array3::from_elem((1, 1, 2), 3.0f32);
        let uncond = Array3::from_elem((1, 1, 2), 1.0f32);
        let mut out = Array3::zeros((1, 1, 2));
        combine(cond.view(), uncond.view(), 5.0, out.view_mut());
        assert_eq!(out[[0, 0, 1]], 1.0 + 5.0 * 2.0);
        combine(cond.view(), uncond.view(), 0.0, out.view_mut());
        assert_eq!(
            out[[0, 0, 0]],
            1.0,
            "guidance 0 gives the unconditional prediction"
        );
    }
}

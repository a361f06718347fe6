//! Step-level batching: which rows of which jobs go into the next UNet call, and the assembly of
//! that call's inputs from the rows. Pure data structures, no ONNX Runtime, so the policy is
//! tested on its own (as text-generation-inference tests its `State::next_batch`).
//!
//! A job with `n` images needs `2n` UNet rows per denoising step (see [`crate::guidance`]). Rows
//! of *different* jobs — at different steps, with different prompts, concepts, λ, guidance,
//! schedulers and step counts — can share a call, because every input of the UNet is per row
//! and its attention max is per sample. The policy:
//!
//! - a call holds at most `max_rows` rows, all of one latent size (the graph's `sample` is one
//!   tensor); how many it takes below that is the call sizing's choice ([`crate::call_size`]:
//!   adaptive, the count with the lowest measured time per row, or fixed, always full);
//! - latent sizes take turns call by call (round-robin in order of first appearance), so a job
//!   of a rare size waits for at most one call per other size, never starves;
//! - within a size, jobs are served in admission order, each from its next uncomputed row, so a
//!   job larger than `max_rows` simply spans several calls of the same step;
//! - [`CfgMode::Split`]: a job's conditional and unconditional rows never share a call;
//! - a job marked `solo` (its rows made a shared call fail, see the engine) gets calls of its
//!   own, so one bad job cannot fail the others.

use std::ops::Range;
use std::time::Duration;

use ndarray::{s, Array1, Array3, Array4, ArrayView2, ArrayView3, ArrayView4, Axis};

use crate::call_size::{CallSizer, CallSizing};
use crate::guidance::CfgMode;
use crate::job::JobId;

/// Latent height and width of a UNet call (`[B, 4, h, w]`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct LatentSize {
    pub height: usize,
    pub width: usize,
}

/// What the planner needs to know of one denoising job whose current step has rows left.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PendingRows {
    pub job: JobId,
    pub size: LatentSize,
    /// Rows of the current step not yet computed: always a suffix `next..2n` of the job's rows.
    pub rows: Range<usize>,
    /// Images of the job (`n`): rows `0..n` are conditional, `n..2n` unconditional.
    pub images: usize,
    pub cfg: CfgMode,
    /// Run this job's rows in calls of their own.
    pub solo: bool,
}

/// A contiguous run of one job's rows inside a call.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Part {
    pub job: JobId,
    pub rows: Range<usize>,
}

/// The rows of one UNet call, in call order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CallPlan {
    pub size: LatentSize,
    pub parts: Vec<Part>,
}

impl CallPlan {
    /// Rows in the call.
    pub fn rows(&self) -> usize {
        self.parts.iter().map(|p| p.rows.len()).sum()
    }

    /// The jobs in the call, each once, in call order.
    pub fn jobs(&self) -> impl Iterator<Item = JobId> + '_ {
        self.parts.iter().map(|p| p.job)
    }

    /// Row offset of each part in the call's batch, with the part.
    pub fn offsets(&self) -> impl Iterator<Item = (Range<usize>, &Part)> {
        self.parts.iter().scan(0, |start, part| {
            let range = *start..*start + part.rows.len();
            *start = range.end;
            Some((range, part))
        })
    }
}

/// Chooses the rows of the next UNet call (see the module documentation for the policy).
#[derive(Debug, Clone)]
pub struct Planner {
    /// How many rows a call of each size takes (at most `max_rows`).
    sizer: CallSizer,
    /// Size of the previous call, for the round-robin between sizes.
    last_size: Option<LatentSize>,
}

impl Planner {
    /// Calls as full as `max_rows` allows; `max_rows` ≥ 1 (a smaller value is treated as 1).
    pub fn new(max_rows: usize) -> Planner {
        Planner::with_sizing(CallSizing::Fixed, max_rows)
    }

    /// Calls of at most `max_rows` rows, sized by `sizing` ([`crate::call_size`]).
    pub fn with_sizing(sizing: CallSizing, max_rows: usize) -> Planner {
        Planner {
            sizer: CallSizer::new(sizing, max_rows),
            last_size: None,
        }
    }

    pub fn max_rows(&self) -> usize {
        self.sizer.max_rows()
    }

    /// A planned call ran in `took` (`with_maps`: it computed attention maps).
    pub fn record(&mut self, plan: &CallPlan, took: Duration, with_maps: bool) {
        self.sizer.record(plan.size, plan.rows(), took, with_maps);
    }

    /// The next call over `pending` (in admission order), or None when no job has rows left.
    pub fn next_call(&mut self, pending: &[PendingRows]) -> Option<CallPlan> {
        let size = self.next_size(pending)?;
        self.last_size = Some(size);
        let max_rows = self.sizer.room(size);
        let mut of_size = pending
            .iter()
            .filter(|p| p.size == size && !p.rows.is_empty());
        let first = of_size.next()?;
        let mut parts = vec![Part {
            job: first.job,
            rows: self.take(first, max_rows),
        }];
        if !first.solo {
            let mut room = max_rows - parts[0].rows.len();
            for p in of_size.filter(|p| !p.solo) {
                if room == 0 {
                    break;
                }
                let rows = self.take(p, room);
                room -= rows.len();
                parts.push(Part { job: p.job, rows });
            }
        }
        Some(CallPlan { size, parts })
    }

    /// Up to `room` of a job's pending rows, stopping at the conditional/unconditional boundary
    /// for split guidance.
    fn take(&self, p: &PendingRows, room: usize) -> Range<usize> {
        let mut end = p.rows.end.min(p.rows.start + room);
        if p.cfg == CfgMode::Split && p.rows.start < p.images {
            end = end.min(p.images);
        }
        p.rows.start..end
    }

    /// Sizes in order of first appearance; the one after the previous call's, cyclically.
    fn next_size(&self, pending: &[PendingRows]) -> Option<LatentSize> {
        let mut sizes: Vec<LatentSize> = Vec::new();
        for p in pending.iter().filter(|p| !p.rows.is_empty()) {
            if !sizes.contains(&p.size) {
                sizes.push(p.size);
            }
        }
        let after = self
            .last_size
            .and_then(|last| sizes.iter().position(|s| *s == last))
            .map_or(0, |i| i + 1);
        sizes.get(after % sizes.len().max(1)).copied()
    }
}

/// One UNet row: every graph input of one sample.
#[derive(Debug, Clone)]
pub struct UnetRow<'a> {
    /// `[4, h, w]`, already scaled by the job's scheduler.
    pub sample: ArrayView3<'a, f32>,
    pub timestep: f32,
    /// `[77, C_txt]`.
    pub text: ArrayView2<'a, f32>,
    /// `[256, C_txt]`.
    pub local: ArrayView2<'a, f32>,
    pub local_index: i64,
    pub lambda: f32,
    /// This row's attention maps are wanted at this step (a conditional row of a job that asks
    /// for maps, inside its step window).
    pub want_maps: bool,
}

/// The inputs of one call that stay the same while the call's composition (its [`Part`]s) does:
/// a job's text and local embeddings, placeholder index and λ do not change between steps.
/// Kept apart from [`StepInputs`] so that they are built and bound once per composition.
#[derive(Debug, Clone, PartialEq)]
pub struct ConstantInputs {
    /// `[R, 77, C_txt]`.
    pub text: Array3<f32>,
    /// `[R, 256, C_txt]`.
    pub local: Array3<f32>,
    pub local_index: Array1<i64>,
    pub lambda: Array1<f32>,
}

/// The inputs that change every step.
#[derive(Debug, Clone, PartialEq)]
pub struct StepInputs {
    /// `[R, 4, h, w]`.
    pub sample: Array4<f32>,
    pub timestep: Array1<f32>,
    /// `want_attention_maps`: 1 for the rows whose maps are wanted (per step, so that a job's
    /// step window switches them on and off).
    pub want_maps: Array1<i64>,
}

impl StepInputs {
    /// Whether any row of the call wants its attention maps (then the graph computes them
    /// for every row of the call, and the call fetches them).
    pub fn any_maps(&self) -> bool {
        self.want_maps.iter().any(|&w| w != 0)
    }
}

/// Stacks rows into the call's constant inputs. Every row must have the same shapes.
pub fn constant_inputs(rows: &[UnetRow<'_>]) -> Result<ConstantInputs, ndarray::ShapeError> {
    let text: Vec<_> = rows.iter().map(|r| r.text).collect();
    let local: Vec<_> = rows.iter().map(|r| r.local).collect();
    Ok(ConstantInputs {
        text: ndarray::stack(Axis(0), &text)?,
        local: ndarray::stack(Axis(0), &local)?,
        local_index: rows.iter().map(|r| r.local_index).collect(),
        lambda: rows.iter().map(|r| r.lambda).collect(),
    })
}

/// Stacks rows into the call's per-step inputs.
pub fn step_inputs(rows: &[UnetRow<'_>]) -> Result<StepInputs, ndarray::ShapeError> {
    let sample: Vec<_> = rows.iter().map(|r| r.sample).collect();
    Ok(StepInputs {
        sample: ndarray::stack(Axis(0), &sample)?,
        timestep: rows.iter().map(|r| r.timestep).collect(),
        want_maps: rows.iter().map(|r| i64::from(r.want_maps)).collect(),
    })
}

/// The rows of a per-row output (`noise_pred` `[R, 4, h, w]`, `attention_maps`
/// `[R, T, h, w]`, …) that belong to each part of `plan`.
pub fn split_output<'a>(
    plan: &'a CallPlan,
    output: ArrayView4<'a, f32>,
) -> impl Iterator<Item = (&'a Part, ArrayView4<'a, f32>)> {
    plan.offsets()
        .map(move |(range, part)| (part, output.slice_move(s![range, .., .., ..])))
}

#[cfg(test)]
mod tests {
    use super::*;
    use ndarray::Array2;

    const SMALL: LatentSize = LatentSize {
        height: 8,
        width: 8,
    };
    const TALL: LatentSize = LatentSize {
        height: 16,
        width: 8,
    };

    fn pending(job: u64, size: LatentSize, images: usize) -> PendingRows {
        PendingRows {
            job: JobId(job),
            size,
            rows: 0..2 * images,
            images,
            cfg: CfgMode::Batched,
            solo: false,
        }
    }

    fn parts(plan: &CallPlan) -> Vec<(u64, Range<usize>)> {
        plan.parts
            .iter()
            .map(|p| (p.job.0, p.rows.clone()))
            .collect()
    }

    #[test]
    fn fills_a_call_with_rows_of_several_jobs_in_admission_order() {
        let mut planner = Planner::new(8);
        let plan = planner
            .next_call(&[
                pending(1, SMALL, 1),
                pending(2, SMALL, 2),
                pending(3, SMALL, 2),
            ])
            .unwrap();
        assert_eq!(plan.size, SMALL);
        assert_eq!(parts(&plan), vec![(1, 0..2), (2, 0..4), (3, 0..2)]);
        assert_eq!(plan.rows(), 8);
    }

    #[test]
    fn a_job_larger_than_a_call_spans_calls_from_its_next_row() {
        let mut planner = Planner::new(4);
        let mut job = pending(1, SMALL, 3);
        let plan = planner.next_call(std::slice::from_ref(&job)).unwrap();
        assert_eq!(parts(&plan), vec![(1, 0..4)]);
        job.rows = 4..6;
        let plan = planner.next_call(&[job]).unwrap();
        assert_eq!(parts(&plan), vec![(1, 4..6)]);
        assert!(planner.next_call(&[]).is_none());
    }

    #[test]
    fn sizes_take_turns_so_none_starves() {
        let mut planner = Planner::new(2);
        let jobs = [
            pending(1, SMALL, 1),
            pending(2, SMALL, 1),
            pending(3, TALL, 1),
        ];
        let sizes: Vec<LatentSize> = (0..4)
            .map(|_| planner.next_call(&jobs).unwrap().size)
            .collect();
        assert_eq!(sizes, vec![SMALL, TALL, SMALL, TALL]);
        // A size that disappears is skipped; the turn moves on to what is left.
        let plan = planner.next_call(&jobs[2..]).unwrap();
        assert_eq!(plan.size, TALL);
    }

    #[test]
    fn split_guidance_keeps_a_jobs_halves_in_separate_calls() {
        let mut planner = Planner::new(8);
        let mut a = pending(1, SMALL, 2);
        a.cfg = CfgMode::Split;
        let b = pending(2, SMALL, 1);
        let plan = planner.next_call(&[a.clone(), b.clone()]).unwrap();
        assert_eq!(parts(&plan), vec![(1, 0..2), (2, 0..2)]);
        a.rows = 2..4;
        let plan = planner.next_call(&[a]).unwrap();
        assert_eq!(parts(&plan), vec![(1, 2..4)]);
    }

    #[test]
    fn solo_jobs_get_calls_of_their_own() {
        let mut planner = Planner::new(8);
        let mut bad = pending(2, SMALL, 1);
        bad.solo = true;
        let jobs = [pending(1, SMALL, 1), bad, pending(3, SMALL, 1)];
        let plan = planner.next_call(&jobs).unwrap();
        assert_eq!(parts(&plan), vec![(1, 0..2), (3, 0..2)]);
        let plan = planner.next_call(&jobs[1..2]).unwrap();
        assert_eq!(parts(&plan), vec![(2, 0..2)]);
    }

    #[test]
    fn inputs_stack_rows_and_the_output_splits_back_per_part() {
        let sample =
            Array3::<f32>::from_shape_fn((4, 2, 2), |(c, y, x)| (c * 4 + y * 2 + x) as f32);
        let text = Array2::<f32>::from_elem((3, 2), 1.0);
        let local = Array2::<f32>::from_elem((5, 2), 2.0);
        let row = |lambda: f32, index: i64| UnetRow {
            sample: sample.view(),
            timestep: 999.0,
            text: text.view(),
            local: local.view(),
            local_index: index,
            lambda,
            want_maps: index == 3,
        };
        let rows = [row(0.8, 5), row(0.0, 5), row(0.6, 3)];
        let constants = constant_inputs(&rows).unwrap();
        assert_eq!(constants.text.shape(), &[3, 3, 2]);
        assert_eq!(constants.local.shape(), &[3, 5, 2]);
        assert_eq!(constants.lambda.to_vec(), vec![0.8, 0.0, 0.6]);
        assert_eq!(constants.local_index.to_vec(), vec![5, 5, 3]);
        let step = step_inputs(&rows).unwrap();
        assert_eq!(step.sample.shape(), &[3, 4, 2, 2]);
        assert_eq!(step.sample.slice(s![2, .., .., ..]), sample);
        assert_eq!(step.want_maps.to_vec(), vec![0, 0, 1]);
        assert!(step.any_maps());

        let plan = CallPlan {
            size: SMALL,
            parts: vec![
                Part {
                    job: JobId(7),
                    rows: 0..2,
                },
                Part {
                    job: JobId(9),
                    rows: 1..2,
                },
            ],
        };
        let out = Array4::<f32>::from_shape_fn((3, 1, 1, 1), |(r, ..)| r as f32);
        let pieces: Vec<(u64, Vec<f32>)> = split_output(&plan, out.view())
            .map(|(part, view)| (part.job.0, view.iter().copied().collect()))
            .collect();
        assert_eq!(pieces, vec![(7, vec![0.0, 1.0]), (9, vec![2.0])]);
    }
}

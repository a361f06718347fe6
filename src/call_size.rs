//! How many rows the next UNet call takes: as many as `max_batch` allows (`Fixed`), or the
//! number that has cost the least time per row so far on this machine (`Adaptive`).
//!
//! Why adaptive: whether a bigger call pays depends on the device and the model, not on the
//! request mix. On a GPU a batch-2 call leaves most of the device idle, so the largest call
//! wins; on two CPU cores a tiny model's call costs 3–8 % more per row at 8 rows than at 2
//! (bench/RESULTS.md, batching), so filling calls lowers the throughput of a busy server.
//! Since a job's numbers do not depend on which rows share its call (tests/engine.rs), the
//! call size is free to follow what the clock says.
//!
//! The policy, per latent size (costs differ with the size): the candidate sizes are the powers
//! of two from 2 below `max_rows`, and `max_rows` itself. Each call's seconds per row go into
//! an exponential moving average for its row count (calls that computed attention maps are
//! left out: they cost more and are not the norm). Untried candidates are tried first, largest
//! first; then the next call takes the candidate with the lowest average, except that every
//! [`EXPLORE_EVERY`]-th call tries the candidates in turn, its measurement replacing that
//! candidate's stale average, so that the choice follows a machine whose load changes within
//! a few rounds. A noisy exploration that looks better is corrected by the calls that follow
//! it (each of them moves the average). Pure data, no clock: the engine hands in each call's time, so
//! the policy is tested on its own.

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use crate::batch::LatentSize;

/// How the engine sizes UNet calls.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum CallSizing {
    /// The size with the lowest measured time per row, up to `max_batch`.
    #[default]
    Adaptive,
    /// Always as many rows as there are, up to `max_batch` (for tests and measurements that
    /// need calls of a known size).
    Fixed,
}

/// Every this many calls of a size, one tries the next candidate instead of the best.
pub const EXPLORE_EVERY: u64 = 32;

/// Weight of a new measurement in the moving average.
const EMA_WEIGHT: f64 = 0.25;

/// Chooses the room of the next call (see the module documentation).
#[derive(Debug, Clone)]
pub struct CallSizer {
    sizing: CallSizing,
    max_rows: usize,
    candidates: Vec<usize>,
    costs: HashMap<LatentSize, SizeCosts>,
}

/// What one latent size's calls have cost.
#[derive(Debug, Clone, Default)]
struct SizeCosts {
    /// Seconds per row, by row count (candidates only).
    per_row: BTreeMap<usize, f64>,
    calls: u64,
    /// Index of the next candidate to explore.
    explore: usize,
    /// The candidate the last exploration call tried: its next measurement replaces its
    /// (stale) average instead of moving it.
    exploring: Option<usize>,
}

impl CallSizer {
    pub fn new(sizing: CallSizing, max_rows: usize) -> CallSizer {
        let max_rows = max_rows.max(1);
        let mut candidates: Vec<usize> = std::iter::successors(Some(2usize), |c| c.checked_mul(2))
            .take_while(|&c| c < max_rows)
            .collect();
        candidates.push(max_rows);
        CallSizer {
            sizing,
            max_rows,
            candidates,
            costs: HashMap::new(),
        }
    }

    pub fn max_rows(&self) -> usize {
        self.max_rows
    }

    pub fn sizing(&self) -> CallSizing {
        self.sizing
    }

    /// The candidate row counts, ascending.
    pub fn candidates(&self) -> &[usize] {
        &self.candidates
    }

    /// Most rows the next call of `size` should take.
    pub fn room(&mut self, size: LatentSize) -> usize {
        if self.sizing == CallSizing::Fixed || self.candidates.len() == 1 {
            return self.max_rows;
        }
        let candidates = &self.candidates;
        let costs = self.costs.entry(size).or_default();
        if let Some(&untried) = candidates
            .iter()
            .rev()
            .find(|c| !costs.per_row.contains_key(c))
        {
            return untried;
        }
        if costs.calls > 0 && costs.calls.is_multiple_of(EXPLORE_EVERY) {
            let pick = candidates[costs.explore % candidates.len()];
            costs.explore += 1;
            costs.exploring = Some(pick);
            return pick;
        }
        costs
            .per_row
            .iter()
            .min_by(|a, b| a.1.total_cmp(b.1))
            .map_or(self.max_rows, |(&rows, _)| rows)
    }

    /// A call of `rows` rows of `size` took `took`; `with_maps`: it computed attention maps.
    pub fn record(&mut self, size: LatentSize, rows: usize, took: Duration, with_maps: bool) {
        if self.sizing == CallSizing::Fixed || rows == 0 {
            return;
        }
        let costs = self.costs.entry(size).or_default();
        costs.calls += 1;
        if with_maps || !self.candidates.contains(&rows) {
            return;
        }
        let per_row = took.as_secs_f64() / rows as f64;
        let fresh = costs.exploring.take() == Some(rows);
        costs
            .per_row
            .entry(rows)
            .and_modify(|avg| {
                *avg = if fresh {
                    per_row
                } else {
                    *avg + EMA_WEIGHT * (per_row - *avg)
                }
            })
            .or_insert(per_row);
    }

    /// The measured seconds per row of `size`'s calls, by row count.
    pub fn costs(&self, size: LatentSize) -> Vec<(usize, f64)> {
        self.costs
            .get(&size)
            .map(|c| c.per_row.iter().map(|(&r, &s)| (r, s)).collect())
            .unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SIZE: LatentSize = LatentSize {
        height: 32,
        width: 32,
    };

    /// Runs `calls` calls, each as big as the sizer says, costing `per_row(rows)` per row.
    fn drive(sizer: &mut CallSizer, calls: usize, per_row: impl Fn(usize) -> f64) -> Vec<usize> {
        (0..calls)
            .map(|_| {
                let rows = sizer.room(SIZE);
                let took = Duration::from_secs_f64(per_row(rows) * rows as f64);
                sizer.record(SIZE, rows, took, false);
                rows
            })
            .collect()
    }

    #[test]
    fn candidates_are_powers_of_two_up_to_the_maximum() {
        assert_eq!(
            CallSizer::new(CallSizing::Adaptive, 16).candidates(),
            [2, 4, 8, 16]
        );
        assert_eq!(
            CallSizer::new(CallSizing::Adaptive, 12).candidates(),
            [2, 4, 8, 12]
        );
        assert_eq!(CallSizer::new(CallSizing::Adaptive, 2).candidates(), [2]);
        assert_eq!(CallSizer::new(CallSizing::Adaptive, 1).candidates(), [1]);
    }

    #[test]
    fn fixed_sizing_always_fills_the_call() {
        let mut sizer = CallSizer::new(CallSizing::Fixed, 8);
        assert!(drive(&mut sizer, 50, |r| r as f64).iter().all(|&r| r == 8));
    }

    #[test]
    fn tries_every_candidate_largest_first_then_keeps_the_cheapest_per_row() {
        // A CPU-like cost: bigger calls cost a little more per row.
        let mut sizer = CallSizer::new(CallSizing::Adaptive, 8);
        let rows = drive(&mut sizer, 100, |r| 1.0 + 0.01 * r as f64);
        assert_eq!(rows[..3], [8, 4, 2]);
        let settled: Vec<usize> = rows[3..].to_vec();
        let explored = settled.iter().filter(|&&r| r != 2).count();
        // Only the exploration calls (one in EXPLORE_EVERY) leave the best size.
        assert!(explored <= 100 / EXPLORE_EVERY as usize, "{settled:?}");
        assert_eq!(sizer.costs(SIZE).len(), 3);
    }

    #[test]
    fn a_gpu_like_cost_keeps_the_largest_call() {
        // Fixed cost per call: the more rows, the cheaper each.
        let mut sizer = CallSizer::new(CallSizing::Adaptive, 16);
        let rows = drive(&mut sizer, 100, |r| 1.0 / r as f64);
        let best = rows[4..].iter().filter(|&&r| r == 16).count();
        assert!(best >= 96 - 100 / EXPLORE_EVERY as usize, "{rows:?}");
    }

    #[test]
    fn exploration_follows_a_machine_whose_costs_change() {
        let mut sizer = CallSizer::new(CallSizing::Adaptive, 8);
        drive(&mut sizer, 40, |r| 1.0 + 0.01 * r as f64);
        assert_eq!(sizer.room(SIZE), 2);
        // Now big calls are cheap: exploration finds it within a few rounds.
        let rows = drive(&mut sizer, 400, |r| 1.0 / r as f64);
        assert!(
            rows[300..].iter().filter(|&&r| r == 8).count() >= 90,
            "{rows:?}"
        );
    }

    #[test]
    fn calls_with_maps_or_of_other_sizes_do_not_count() {
        let mut sizer = CallSizer::new(CallSizing::Adaptive, 8);
        sizer.record(SIZE, 8, Duration::from_secs(80), true);
        sizer.record(SIZE, 6, Duration::from_secs(6), false);
        assert!(sizer.costs(SIZE).is_empty());
        let other = LatentSize {
            height: 64,
            width: 64,
        };
        sizer.record(other, 8, Duration::from_secs(8), false);
        assert_eq!(sizer.costs(other), [(8, 1.0)]);
        assert!(sizer.costs(SIZE).is_empty());
    }
}

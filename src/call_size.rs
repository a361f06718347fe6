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
//! of two from 2 below `max_rows`, and `max_rows` itself. Each call's seconds per row join the
//! last [`WINDOW`] measurements of its row count (calls that computed attention maps are left
//! out: they cost more and are not the norm); a candidate's cost is their minimum. On a busy
//! server other work shares the cores (HTTP threads, PNG encoding, the clients themselves) and
//! only ever adds time to a call, in bursts: a mean or a median of the current choice's recent
//! calls rises in a burst while the other candidates' windows, measured earlier, do not, and
//! the choice moves away on noise (measured: a median of 5 flipped a busy tiny server from 2
//! to 4-8 rows). The minimum over a window longer than a burst is what the size costs when
//! nothing interferes.
//!
//! First every candidate gets [`FILL`] calls (the emptiest window first, largest size first;
//! a size already [`CLEARLY_WORSE`] than the best gets no more than its first); then the next
//! call takes the current choice unless another candidate's cost is lower by more than
//! [`HYSTERESIS`] (so that two nearly equal sizes do not alternate), except that every
//! [`EXPLORE_EVERY`]-th call tries the other candidates in turn, so that the choice follows a
//! machine whose costs change. Each exploration that leaves the choice where it was doubles the
//! interval to the next (up to [`EXPLORE_EVERY_MAX`]) and a change of choice resets it: on a
//! machine whose costs stay put, exploring is what a settled server loses against the best
//! fixed size (measured on the tiny model at 16 rows: one call in 128 at 4-16 rows was 3.5 % of
//! the rows, at 13-16 % more per row), so it should become rare, while a machine whose costs
//! move is still followed within [`EXPLORE_EVERY`] calls of the first exploration that sees
//! it. Pure data, no clock: the engine hands in each call's time, so the policy is tested on
//! its own.

use std::collections::{BTreeMap, HashMap, VecDeque};
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

/// Every this many calls of a size, one tries the next candidate instead of the best (at
/// first, and again after the choice changed).
pub const EXPLORE_EVERY: u64 = 128;

/// The longest interval between explorations that the doubling reaches.
pub const EXPLORE_EVERY_MAX: u64 = 2048;

/// Measurements kept per candidate: more calls than a burst of other work lasts (on a busy
/// tiny server the PNG encoding of a wave of finished jobs slows a dozen calls in a row, and a
/// window of 5 then forgot what the current size costs undisturbed).
pub const WINDOW: usize = 32;

/// Measurements each candidate gets before the first choice: enough for a minimum that a
/// burst of other work does not decide, few enough that a fresh server spends few calls on
/// the sizes it will not keep (a clearly worse one gets only its first). 3 was too few once
/// explorations became rare: the current choice's minimum keeps falling as its window fills
/// while a candidate measured 3 times keeps its first, so a first choice made on 3 calls each
/// stayed for hundreds of calls (tiny bundle, 16 rows: 2.08 rows per call, 3 % more per row).
pub const FILL: usize = 8;

/// A candidate whose calls already cost this much more per row than the best is not filled.
pub const CLEARLY_WORSE: f64 = 0.10;

/// A candidate replaces the current choice only when its cost is lower by more than this.
pub const HYSTERESIS: f64 = 0.02;

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
    /// The last [`WINDOW`] seconds per row, by row count (candidates only).
    per_row: BTreeMap<usize, VecDeque<f64>>,
    calls: u64,
    /// Index of the next candidate to explore.
    explore: usize,
    /// Calls between explorations now ([`EXPLORE_EVERY`] doubling to [`EXPLORE_EVERY_MAX`]).
    interval: u64,
    /// The call count at which the next exploration is due; None until every candidate is
    /// filled.
    explore_at: Option<u64>,
    /// The row count chosen last (outside exploration).
    current: Option<usize>,
}

impl SizeCosts {
    /// The next exploration comes `interval` calls from now.
    fn explore_in(&mut self, interval: u64) {
        self.interval = interval;
        self.explore_at = Some(self.calls + interval);
    }

    /// Seconds per row of `rows`-row calls: the least of the window.
    fn cost(&self, rows: usize) -> Option<f64> {
        self.per_row
            .get(&rows)?
            .iter()
            .copied()
            .min_by(f64::total_cmp)
    }
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
        // Give every candidate FILL calls first, the emptiest (then the largest) first, so that
        // no choice rests on one sample (a size's first call also pays for its allocations);
        // one that already costs CLEARLY_WORSE more than the best is not filled further.
        let samples = |c: usize| costs.per_row.get(&c).map_or(0, VecDeque::len);
        let best_yet = candidates
            .iter()
            .filter_map(|&c| costs.cost(c))
            .min_by(f64::total_cmp);
        let clearly_worse = |c: usize| match (costs.cost(c), best_yet) {
            (Some(cost), Some(best)) => cost > best * (1.0 + CLEARLY_WORSE),
            _ => false,
        };
        if let Some(&unfilled) = candidates
            .iter()
            .rev()
            .filter(|&&c| samples(c) == 0 || (samples(c) < FILL && !clearly_worse(c)))
            .min_by_key(|&&c| samples(c))
        {
            return unfilled;
        }
        if costs.explore_at.is_none() {
            // Filled: explorations start from here.
            costs.explore_in(EXPLORE_EVERY);
        }
        if costs.explore_at.is_some_and(|at| costs.calls >= at) {
            let others: Vec<usize> = candidates
                .iter()
                .copied()
                .filter(|&c| Some(c) != costs.current)
                .collect();
            let pick = others[costs.explore % others.len()];
            costs.explore += 1;
            // Doubled now; reset below if what this call measures changes the choice.
            costs.explore_in((costs.interval * 2).min(EXPLORE_EVERY_MAX));
            return pick;
        }
        let measured: Vec<(usize, f64)> = candidates
            .iter()
            .filter_map(|&c| costs.cost(c).map(|m| (c, m)))
            .collect();
        let Some(&(best, best_cost)) = measured.iter().min_by(|a, b| a.1.total_cmp(&b.1)) else {
            return self.max_rows;
        };
        let keep = costs.current.and_then(|current| {
            let cost = costs.cost(current)?;
            (best_cost > cost * (1.0 - HYSTERESIS)).then_some(current)
        });
        let choice = keep.unwrap_or(best);
        if costs.current.is_some_and(|c| c != choice) {
            costs.explore_in(EXPLORE_EVERY);
        }
        if costs.current != Some(choice) {
            tracing::debug!(
                latent = ?(size.height, size.width),
                rows = choice,
                seconds_per_row = ?measured,
                "call size"
            );
        }
        costs.current = Some(choice);
        choice
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
        let window = costs.per_row.entry(rows).or_default();
        if window.len() == WINDOW {
            window.pop_front();
        }
        window.push_back(took.as_secs_f64() / rows as f64);
    }

    /// The measured seconds per row of `size`'s calls (the least of the last [`WINDOW`]),
    /// by row count.
    pub fn costs(&self, size: LatentSize) -> Vec<(usize, f64)> {
        self.costs
            .get(&size)
            .map(|c| {
                c.per_row
                    .keys()
                    .filter_map(|&r| c.cost(r).map(|m| (r, m)))
                    .collect()
            })
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
        assert_eq!(rows[..6], [8, 4, 2, 8, 4, 2]);
        let settled: Vec<usize> = rows[3 * FILL..].to_vec();
        let explored = settled.iter().filter(|&&r| r != 2).count();
        // Only the exploration calls (one in EXPLORE_EVERY) leave the best size.
        assert!(explored <= 100 / EXPLORE_EVERY as usize, "{settled:?}");
        assert_eq!(sizer.costs(SIZE).len(), 3);
    }

    #[test]
    fn a_clearly_worse_size_is_not_filled() {
        // Per row: 2 rows 1.1, 4 rows 1.2 (9 % more), 8 rows 1.4 (27 % more).
        let mut sizer = CallSizer::new(CallSizing::Adaptive, 8);
        let rows = drive(&mut sizer, 2 * FILL + 4, |r| 1.0 + 0.05 * r as f64);
        assert_eq!(rows[..3], [8, 4, 2]);
        assert_eq!(rows.iter().filter(|&&r| r == 8).count(), 1, "{rows:?}");
        assert_eq!(rows.iter().filter(|&&r| r == 4).count(), FILL, "{rows:?}");
    }

    #[test]
    fn a_gpu_like_cost_keeps_the_largest_call() {
        // Fixed cost per call: the more rows, the cheaper each.
        let mut sizer = CallSizer::new(CallSizing::Adaptive, 16);
        let rows = drive(&mut sizer, 100, |r| 1.0 / r as f64);
        // After the 4 candidates' windows are filled, only explorations leave 16 rows.
        let fill = 4 * FILL;
        let best = rows[fill..].iter().filter(|&&r| r == 16).count();
        assert!(
            best >= 100 - fill - 100 / EXPLORE_EVERY as usize,
            "{rows:?}"
        );
    }

    #[test]
    fn exploration_follows_a_machine_whose_costs_change() {
        let mut sizer = CallSizer::new(CallSizing::Adaptive, 8);
        drive(&mut sizer, 40, |r| 1.0 + 0.01 * r as f64);
        assert_eq!(sizer.room(SIZE), 2);
        // Now big calls are cheap: exploration finds it within a few rounds.
        let rows = drive(&mut sizer, 4000, |r| 1.0 / r as f64);
        assert!(
            rows[3900..].iter().filter(|&&r| r == 8).count() >= 95,
            "{rows:?}"
        );
    }

    #[test]
    fn exploration_backs_off_while_the_choice_holds() {
        // CPU-like: 2 rows stays the cheapest; explorations double their interval each time.
        let mut sizer = CallSizer::new(CallSizing::Adaptive, 16);
        let calls = 20_000;
        let rows = drive(&mut sizer, calls, |r| 1.0 + 0.01 * r as f64);
        let fill = 4 * FILL;
        let explored = rows[fill..].iter().filter(|&&r| r != 2).count();
        // 128, 256, 512, 1024 and then every 2048 calls: 4 + 20000 / 2048 at most.
        let most = 4 + calls / EXPLORE_EVERY_MAX as usize + 1;
        assert!(
            (4..=most).contains(&explored),
            "{explored} explorations in {calls} calls"
        );
        // Without the back-off it would have been one in EXPLORE_EVERY.
        assert!(explored * 10 < calls / EXPLORE_EVERY as usize);
    }

    #[test]
    fn noisy_timings_do_not_move_the_choice() {
        // 2 rows is 10 % cheaper per row; one call in four is slowed 50 % by other work.
        let mut sizer = CallSizer::new(CallSizing::Adaptive, 8);
        let n = std::cell::Cell::new(0u32);
        let rows = drive(&mut sizer, 400, |r| {
            n.set(n.get() + 1);
            let base = if r == 2 { 1.0 } else { 1.1 };
            if n.get().is_multiple_of(4) {
                base * 1.5
            } else {
                base
            }
        });
        let off = rows[50..].iter().filter(|&&r| r != 2).count();
        assert!(
            off <= 350 / EXPLORE_EVERY as usize + 1,
            "{off} calls off the best size"
        );
    }

    #[test]
    fn nearly_equal_sizes_do_not_alternate() {
        let mut sizer = CallSizer::new(CallSizing::Adaptive, 4);
        let n = std::cell::Cell::new(0u32);
        // 2 and 4 rows within 1 %, the cheaper one swapping every call.
        let rows = drive(&mut sizer, 200, |r| {
            n.set(n.get() + 1);
            1.0 + if n.get().is_multiple_of(2) == (r == 2) {
                0.005
            } else {
                0.0
            }
        });
        let switches = rows[2 * FILL..].windows(2).filter(|w| w[0] != w[1]).count();
        assert!(
            switches <= 2 * (200 - 2 * FILL) / EXPLORE_EVERY as usize + 2,
            "{switches} switches"
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

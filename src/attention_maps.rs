//! Attention maps of one job: which step window it asked for, and the per-image average of its
//! conditional rows' maps over those steps (DESIGN.md §6).
//!
//! The UNet (a bundle exported with attention maps) returns, per row and call, every prompt
//! token's cross-attention map and ELITE's placeholder gate `A / M` at the latent size, each
//! already averaged over heads and the 16 `attn2` layers. A job that asks keeps a
//! [`MapAccumulator`]: the engine hands it its conditional rows' maps of each step inside the
//! window, whichever calls those rows came in; the unconditional rows (the empty prompt) are
//! never accumulated. The result, [`AttentionMaps`], is the mean over the window's steps.

use std::fmt;
use std::str::FromStr;

use ndarray::{s, Array4, ArrayView3, Axis};

/// Steps of the denoising loop whose maps are averaged: 1-based, both ends included; `last`
/// None = to the final step. The default is every step.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StepWindow {
    pub first: usize,
    pub last: Option<usize>,
}

impl Default for StepWindow {
    fn default() -> Self {
        StepWindow {
            first: 1,
            last: None,
        }
    }
}

/// A step window that cannot be used, with the rule it breaks.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WindowError {
    #[error("`{text}` is not a step window: write `a..b` (steps a to b, 1-based, both included), `a..` or `..b`")]
    Syntax { text: String },
    #[error("the window starts at step {first}: steps count from 1")]
    Zero { first: usize },
    #[error("the window {window} is empty: its first step is after its last")]
    Empty { window: StepWindow },
    #[error("the window {window} starts after the last of the {steps} steps")]
    PastEnd { window: StepWindow, steps: usize },
}

impl StepWindow {
    /// The window's steps for a run of `steps` steps: `(first, last)`, checked (a window that
    /// ends past the final step is cut there; one that starts past it is an error).
    pub fn resolve(&self, steps: usize) -> Result<(usize, usize), WindowError> {
        if self.first == 0 {
            return Err(WindowError::Zero { first: 0 });
        }
        if self.last.is_some_and(|last| last < self.first) {
            return Err(WindowError::Empty { window: *self });
        }
        let last = self.last.unwrap_or(steps);
        if self.first > steps {
            return Err(WindowError::PastEnd {
                window: *self,
                steps,
            });
        }
        Ok((self.first, last.min(steps)))
    }
}

impl fmt::Display for StepWindow {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.last {
            Some(last) => write!(f, "{}..{last}", self.first),
            None => write!(f, "{}..", self.first),
        }
    }
}

impl FromStr for StepWindow {
    type Err = WindowError;

    /// `a..b`, `a..` or `..b` (steps are 1-based and both ends are included).
    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let syntax = || WindowError::Syntax {
            text: text.chars().take(64).collect(),
        };
        let (a, b) = text.trim().split_once("..").ok_or_else(syntax)?;
        let number = |t: &str| t.trim().parse::<usize>().map_err(|_| syntax());
        let first = if a.trim().is_empty() { 1 } else { number(a)? };
        let last = if b.trim().is_empty() {
            None
        } else {
            Some(number(b)?)
        };
        let window = StepWindow { first, last };
        if first == 0 {
            return Err(WindowError::Zero { first });
        }
        if last.is_some_and(|l| l < first) {
            return Err(WindowError::Empty { window });
        }
        Ok(window)
    }
}

/// A job's maps, averaged over the steps of its window.
#[derive(Debug, Clone, PartialEq)]
pub struct AttentionMaps {
    /// `[n, T, h, w]`: per image, every token's map (T = 77: the prompt's tokens, then the
    /// padding). Averaged over heads, layers and steps: at each latent pixel the 77 values sum
    /// to about 1 (they come from a softmax over the tokens).
    pub tokens: Array4<f32>,
    /// `[n, 1, h, w]`: ELITE's gate of the local branch, `A / M` (the placeholder's column
    /// divided by its max over heads and pixels), averaged the same way; in [0, 1].
    pub gate: Array4<f32>,
    /// The steps averaged (1-based, both included).
    pub first_step: usize,
    pub last_step: usize,
}

/// What went wrong handing maps to an accumulator.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MapsError {
    #[error("attention maps of shape {found:?} for image {image}, expected {expected:?}")]
    Shape {
        image: usize,
        found: Vec<usize>,
        expected: Vec<usize>,
    },
    #[error("attention maps of image {image} contain NaN or infinity")]
    NotFinite { image: usize },
    #[error("image {image} of {images}: no such image")]
    NoImage { image: usize, images: usize },
    #[error("no step of the window {first}..{last} has run for image {image}")]
    Incomplete {
        image: usize,
        first: usize,
        last: usize,
    },
}

/// Sums of one job's conditional rows' maps over the steps of its window.
#[derive(Debug, Clone)]
pub struct MapAccumulator {
    first: usize,
    last: usize,
    /// `[n, T + 1, h, w]`: token maps, then the gate; f64 so that a long window adds up
    /// without rounding drift.
    sums: Array4<f64>,
    /// Steps added per image.
    counts: Vec<usize>,
}

impl MapAccumulator {
    /// For `images` images of `tokens` tokens at latent `h × w`, over the window's steps
    /// `first..=last` (from [`StepWindow::resolve`]).
    pub fn new(
        images: usize,
        tokens: usize,
        latent: (usize, usize),
        (first, last): (usize, usize),
    ) -> MapAccumulator {
        MapAccumulator {
            first,
            last,
            sums: Array4::zeros((images, tokens + 1, latent.0, latent.1)),
            counts: vec![0; images],
        }
    }

    /// Whether the maps of `step` (1-based) are accumulated.
    pub fn wants(&self, step: usize) -> bool {
        (self.first..=self.last).contains(&step)
    }

    /// Adds image `image`'s maps of one step: `tokens` `[T, h, w]`, `gate` `[1, h, w]`.
    pub fn add(
        &mut self,
        image: usize,
        tokens: ArrayView3<f32>,
        gate: ArrayView3<f32>,
    ) -> Result<(), MapsError> {
        let images = self.counts.len();
        if image >= images {
            return Err(MapsError::NoImage { image, images });
        }
        let (_, channels, h, w) = self.sums.dim();
        for (found, expected) in [
            (tokens.shape(), [channels - 1, h, w]),
            (gate.shape(), [1, h, w]),
        ] {
            if found != expected {
                return Err(MapsError::Shape {
                    image,
                    found: found.to_vec(),
                    expected: expected.to_vec(),
                });
            }
        }
        if tokens.iter().chain(gate.iter()).any(|v| !v.is_finite()) {
            return Err(MapsError::NotFinite { image });
        }
        let mut sums = self.sums.index_axis_mut(Axis(0), image);
        sums.slice_mut(s![..channels - 1, .., ..])
            .zip_mut_with(&tokens, |acc, &v| *acc += f64::from(v));
        sums.slice_mut(s![channels - 1.., .., ..])
            .zip_mut_with(&gate, |acc, &v| *acc += f64::from(v));
        self.counts[image] += 1;
        Ok(())
    }

    /// The means over the steps added (every image must have had at least one).
    pub fn finish(&self) -> Result<AttentionMaps, MapsError> {
        let (n, channels, h, w) = self.sums.dim();
        let mut mean = Array4::<f32>::zeros((n, channels, h, w));
        for (image, &count) in self.counts.iter().enumerate() {
            if count == 0 {
                return Err(MapsError::Incomplete {
                    image,
                    first: self.first,
                    last: self.last,
                });
            }
            let scale = 1.0 / count as f64;
            mean.index_axis_mut(Axis(0), image)
                .zip_mut_with(&self.sums.index_axis(Axis(0), image), |m, &s| {
                    *m = (s * scale) as f32
                });
        }
        Ok(AttentionMaps {
            tokens: mean.slice(s![.., ..channels - 1, .., ..]).to_owned(),
            gate: mean.slice(s![.., channels - 1.., .., ..]).to_owned(),
            first_step: self.first,
            last_step: self.last,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ndarray::Array3;

    #[test]
    fn windows_parse_and_resolve_with_their_rules_named() {
        let w: StepWindow = "3..5".parse().unwrap();
        assert_eq!(w.resolve(10), Ok((3, 5)));
        assert_eq!("..4".parse::<StepWindow>().unwrap().resolve(10), Ok((1, 4)));
        assert_eq!(
            "7..".parse::<StepWindow>().unwrap().resolve(10),
            Ok((7, 10))
        );
        // A window past the end is cut at the last step; one starting past it is refused.
        assert_eq!(
            "8..20".parse::<StepWindow>().unwrap().resolve(10),
            Ok((8, 10))
        );
        let late = "11.."
            .parse::<StepWindow>()
            .unwrap()
            .resolve(10)
            .unwrap_err();
        assert!(
            late.to_string().contains("after the last of the 10 steps"),
            "{late}"
        );
        for bad in ["3", "a..b", "3..x", "-1..2", ""] {
            let e = bad.parse::<StepWindow>().unwrap_err();
            assert!(matches!(e, WindowError::Syntax { .. }), "{bad}: {e}");
        }
        assert!(matches!(
            "0..3".parse::<StepWindow>(),
            Err(WindowError::Zero { .. })
        ));
        assert!(matches!(
            "5..3".parse::<StepWindow>(),
            Err(WindowError::Empty { .. })
        ));
        assert_eq!(StepWindow::default().resolve(4), Ok((1, 4)));
    }

    #[test]
    fn accumulates_the_mean_per_image_over_its_window() {
        let mut acc = MapAccumulator::new(2, 2, (1, 2), (2, 3));
        assert!(!acc.wants(1) && acc.wants(2) && acc.wants(3) && !acc.wants(4));
        let tokens = |v: f32| Array3::from_elem((2, 1, 2), v);
        let gate = |v: f32| Array3::from_elem((1, 1, 2), v);
        // Image 1 first (rows of a job may arrive in any call order).
        acc.add(1, tokens(4.0).view(), gate(0.5).view()).unwrap();
        acc.add(0, tokens(1.0).view(), gate(0.2).view()).unwrap();
        assert!(acc.finish().is_ok());
        acc.add(0, tokens(3.0).view(), gate(0.4).view()).unwrap();
        let maps = acc.finish().unwrap();
        assert_eq!(maps.tokens.shape(), &[2, 2, 1, 2]);
        assert_eq!(maps.tokens[[0, 1, 0, 1]], 2.0);
        assert_eq!(maps.tokens[[1, 0, 0, 0]], 4.0);
        assert!((maps.gate[[0, 0, 0, 0]] - 0.3).abs() < 1e-7);
        assert_eq!((maps.first_step, maps.last_step), (2, 3));
    }

    #[test]
    fn bad_maps_are_refused_without_changing_the_sums() {
        let mut acc = MapAccumulator::new(1, 2, (2, 2), (1, 1));
        let gate = Array3::<f32>::zeros((1, 2, 2));
        let wrong = Array3::<f32>::zeros((3, 2, 2));
        assert!(matches!(
            acc.add(0, wrong.view(), gate.view()),
            Err(MapsError::Shape { .. })
        ));
        let mut nan = Array3::<f32>::zeros((2, 2, 2));
        nan[[1, 1, 1]] = f32::NAN;
        assert!(matches!(
            acc.add(0, nan.view(), gate.view()),
            Err(MapsError::NotFinite { .. })
        ));
        assert!(matches!(
            acc.add(1, nan.view(), gate.view()),
            Err(MapsError::NoImage { .. })
        ));
        assert!(matches!(acc.finish(), Err(MapsError::Incomplete { .. })));
    }
}

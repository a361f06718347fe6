//! Concept image preprocessing: Pillow-compatible bicubic squash to 224×224, CLIP
//! normalisation, the 16×16 mask grid. Decoding lives in `image_decode` (and `jpeg`), the mask
//! in `mask`; their path functions are re-exported here under their old names.
//!
//! ELITE's CLIP inputs come from Pillow (README, "Differences from the official code"):
//! `Image.resize((224, 224), BICUBIC)` on uint8 pixels, then `/255` and CLIP mean/std. CLIP
//! features are sensitive to the exact pixels, so the resize here is a transcription of
//! Pillow's `ImagingResample` (filter a = −0.5, support widened by the downscale factor,
//! coefficients normalised and converted to 22-bit fixed point, a horizontal then a vertical
//! uint8 pass with rounding and clipping), verified bit for bit against Pillow 13. The
//! normalisation is float32 in torchvision's order (`x/255`, then `(x − mean)/std`).

use image::RgbImage;
use ndarray::{Array1, Array3};

pub use crate::image_decode::load_rgb;
pub use crate::mask::{load_mask, BinaryMask};

/// Errors from preprocessing decoded pixels.
#[derive(Debug, thiserror::Error)]
pub enum PreprocessError {
    /// A mask given in memory does not have the image's size.
    #[error("mask is {mask_width}×{mask_height} but the image is {image_width}×{image_height}")]
    MaskShape {
        mask_width: u32,
        mask_height: u32,
        image_width: u32,
        image_height: u32,
    },
    /// The preprocessing parameters (from the bundle manifest) are unusable.
    #[error("invalid preprocessing parameters: {0}")]
    InvalidParams(String),
}

/// The preprocessing constants, from the bundle manifest (`dims.image_size`,
/// `dims.patch_grid`, `image_mean`, `image_std`).
#[derive(Debug, Clone, PartialEq)]
pub struct PreprocessParams {
    /// Side of the square CLIP input (224).
    pub size: u32,
    /// Side of the CLIP patch grid (16 for ViT-L/14 at 224).
    pub grid: u32,
    /// Per-channel mean, applied after `/255`.
    pub mean: [f32; 3],
    /// Per-channel standard deviation.
    pub std: [f32; 3],
}

impl Default for PreprocessParams {
    /// CLIP ViT-L/14 as ELITE uses it.
    fn default() -> Self {
        Self {
            size: 224,
            grid: 16,
            // The float32 values of CLIP's (0.48145466, 0.4578275, 0.40821073) and
            // (0.26862954, 0.26130258, 0.27577711), as torch holds them.
            mean: [0.481_454_67, 0.457_827_5, 0.408_210_72],
            std: [0.268_629_55, 0.261_302_6, 0.275_777_1],
        }
    }
}

impl PreprocessParams {
    fn validate(&self) -> Result<(), PreprocessError> {
        let bad = |msg: String| Err(PreprocessError::InvalidParams(msg));
        if self.size == 0 || self.grid == 0 {
            return bad(format!(
                "size {} and grid {} must be positive",
                self.size, self.grid
            ));
        }
        if self.mean.iter().chain(&self.std).any(|v| !v.is_finite()) {
            return bad(format!(
                "mean {:?} / std {:?} must be finite",
                self.mean, self.std
            ));
        }
        if self.std.contains(&0.0) {
            return bad(format!("std {:?} must not contain 0", self.std));
        }
        Ok(())
    }
}

/// What the image encoder and local mapper need from a concept image.
#[derive(Debug, Clone, PartialEq)]
pub struct ConceptInputs {
    /// The whole image, squashed to `size × size`, normalised: `[3, size, size]`.
    pub global_pixels: Array3<f32>,
    /// `image × mask` (background exactly 0), squashed and normalised: `[3, size, size]`.
    pub local_pixels: Array3<f32>,
    /// `mask[floor(i·H/grid), floor(j·W/grid)] > 0` on channel 0, row-major: `[grid²]`.
    pub mask_grid: Array1<f32>,
}

impl ConceptInputs {
    /// Preprocesses a concept image as ELITE's test-time dataset does. Without a mask the
    /// whole image is the object (then `local_pixels == global_pixels`).
    pub fn new(
        image: &RgbImage,
        mask: Option<&BinaryMask>,
        params: &PreprocessParams,
    ) -> Result<Self, PreprocessError> {
        params.validate()?;
        let full;
        let mask = match mask {
            Some(m) => m,
            None => {
                full = BinaryMask::full(image.width(), image.height());
                &full
            }
        };
        if (mask.width(), mask.height()) != image.dimensions() {
            return Err(PreprocessError::MaskShape {
                mask_width: mask.width(),
                mask_height: mask.height(),
                image_width: image.width(),
                image_height: image.height(),
            });
        }
        let squash = |im: &RgbImage| resize_bicubic(im, params.size, params.size);
        Ok(Self {
            global_pixels: normalize(&squash(image), params),
            local_pixels: normalize(&squash(&mask.apply(image)), params),
            mask_grid: mask_grid(mask, params.grid),
        })
    }
}

/// `ToTensor` then `Normalize` in float32: `(v/255 − mean)/std`, channels first.
fn normalize(image: &RgbImage, params: &PreprocessParams) -> Array3<f32> {
    let (w, h) = image.dimensions();
    Array3::from_shape_fn((3, h as usize, w as usize), |(c, y, x)| {
        let v = f32::from(image.get_pixel(x as u32, y as u32).0[c]) / 255.0;
        (v - params.mean[c]) / params.std[c]
    })
}

/// The `grid × grid` mask on channel 0 by nearest sampling, as torch's legacy `nearest`
/// resize to 128 and then to 16 comes out: `mask[floor(i·H/grid), floor(j·W/grid)]`.
fn mask_grid(mask: &BinaryMask, grid: u32) -> Array1<f32> {
    let (w, h, g) = (
        u64::from(mask.width()),
        u64::from(mask.height()),
        u64::from(grid),
    );
    let cell = |k: usize| {
        let (i, j) = ((k as u64) / g, (k as u64) % g);
        let (y, x) = ((i * h / g) as u32, (j * w / g) as u32);
        f32::from(u8::from(mask.get(x, y, 0)))
    };
    Array1::from_shape_fn((grid * grid) as usize, cell)
}

/// Pillow's fixed-point precision for 8-bit resampling.
const PRECISION_BITS: u32 = 32 - 8 - 2;

/// Pillow's bicubic kernel, a = −0.5.
fn bicubic_filter(x: f64) -> f64 {
    const A: f64 = -0.5;
    let x = x.abs();
    if x < 1.0 {
        ((A + 2.0) * x - (A + 3.0)) * x * x + 1.0
    } else if x < 2.0 {
        (((x - 5.0) * x + 8.0) * x - 4.0) * A
    } else {
        0.0
    }
}

/// Per output sample of one axis: the first input index, and the fixed-point weights of the
/// inputs from there on (Pillow's `precompute_coeffs` + `normalize_coeffs_8bpc`).
struct AxisWeights {
    taps: Vec<(usize, Vec<i32>)>,
}

impl AxisWeights {
    fn new(in_size: u32, out_size: u32) -> Self {
        let scale = f64::from(in_size) / f64::from(out_size);
        let filterscale = scale.max(1.0);
        let support = 2.0 * filterscale;
        let taps = (0..out_size)
            .map(|xx| {
                let center = (f64::from(xx) + 0.5) * scale;
                // C `(int)` truncates towards zero.
                let xmin = ((center - support + 0.5) as i64).max(0);
                let xmax = ((center + support + 0.5) as i64).min(i64::from(in_size)) - xmin;
                let ss = 1.0 / filterscale;
                let weights: Vec<f64> = (0..xmax.max(0))
                    .map(|x| bicubic_filter(((x + xmin) as f64 - center + 0.5) * ss))
                    .collect();
                let total: f64 = weights.iter().sum();
                let fixed = weights
                    .iter()
                    .map(|&w| to_fixed(if total != 0.0 { w / total } else { w }))
                    .collect();
                (xmin as usize, fixed)
            })
            .collect();
        Self { taps }
    }

    /// Input indices `[first, last)` used by any output sample.
    fn span(&self) -> (usize, usize) {
        let first = self.taps.first().map_or(0, |t| t.0);
        let last = self.taps.last().map_or(0, |t| t.0 + t.1.len());
        (first, last)
    }
}

/// A normalised weight in Pillow's fixed point, rounded half away from zero then truncated.
fn to_fixed(w: f64) -> i32 {
    let scaled = w * f64::from(1_u32 << PRECISION_BITS);
    if w < 0.0 {
        (scaled - 0.5) as i32
    } else {
        (scaled + 0.5) as i32
    }
}

/// Pillow's `clip8`: the fixed-point accumulator back to a byte (floor, then clamp).
fn clip8(acc: i64) -> u8 {
    (acc >> PRECISION_BITS).clamp(0, 255) as u8
}

/// One output sample: `Σ in(k) · w_k` from a starting accumulator of one half (rounding).
fn convolve(weights: &[i32], input: impl Fn(usize) -> u8) -> u8 {
    let acc = weights
        .iter()
        .enumerate()
        .fold(1_i64 << (PRECISION_BITS - 1), |acc, (k, &w)| {
            acc + i64::from(input(k)) * i64::from(w)
        });
    clip8(acc)
}

/// `Image.resize((width, height), Image.BICUBIC)` of Pillow 13, bit for bit. A zero size on
/// either side gives an empty image.
///
/// An axis whose size does not change is not resampled. Pillow 13 runs the vertical pass
/// first when the height shrinks by more than twice as many pixels as the width does, and
/// the horizontal pass first otherwise (over the rows the vertical pass will read). Older
/// Pillow (9.4, which the ELITE reference pinned) always went horizontal first, so for images
/// much taller than wide the two Pillows themselves disagree by a few levels.
pub fn resize_bicubic(image: &RgbImage, width: u32, height: u32) -> RgbImage {
    let (in_w, in_h) = image.dimensions();
    if width == 0 || height == 0 || in_w == 0 || in_h == 0 {
        return RgbImage::new(width, height);
    }
    let (need_h, need_v) = (width != in_w, height != in_h);
    let shrink_h = i64::from(in_h) - i64::from(height);
    let shrink_w = i64::from(in_w) - i64::from(width);
    let vertical = AxisWeights::new(in_h, height);
    if shrink_h > 0 && shrink_h > 2 * shrink_w {
        let tmp = if need_v {
            vertical_pass(image, &vertical, 0)
        } else {
            image.clone()
        };
        return if need_h {
            horizontal_pass(&tmp, &AxisWeights::new(in_w, width), 0, tmp.height())
        } else {
            tmp
        };
    }
    let (first, last) = vertical.span();
    let (first, last) = (first as u32, last as u32);
    let tmp = if need_h {
        horizontal_pass(image, &AxisWeights::new(in_w, width), first, last)
    } else {
        image::imageops::crop_imm(image, 0, first, in_w, last - first).to_image()
    };
    if need_v {
        vertical_pass(&tmp, &vertical, first)
    } else {
        tmp
    }
}

/// Resamples rows `first..last` of `src` horizontally.
fn horizontal_pass(src: &RgbImage, weights: &AxisWeights, first: u32, last: u32) -> RgbImage {
    let width = weights.taps.len() as u32;
    RgbImage::from_fn(width, last - first, |xx, y| {
        let (xmin, w) = &weights.taps[xx as usize];
        image::Rgb(std::array::from_fn(|c| {
            convolve(w, |k| src.get_pixel((xmin + k) as u32, y + first).0[c])
        }))
    })
}

/// Resamples `src` vertically; `src` row 0 is input row `row_offset`.
fn vertical_pass(src: &RgbImage, weights: &AxisWeights, row_offset: u32) -> RgbImage {
    let height = weights.taps.len() as u32;
    RgbImage::from_fn(src.width(), height, |x, yy| {
        let (ymin, w) = &weights.taps[yy as usize];
        let top = *ymin as u32 - row_offset;
        image::Rgb(std::array::from_fn(|c| {
            convolve(w, |k| src.get_pixel(x, top + k as u32).0[c])
        }))
    })
}

#[cfg(test)]
mod tests {
    //! References: Pillow 13 (`Image.resize(..., BICUBIC)`, `convert("RGB")`,
    //! `ImageOps.exif_transpose`), torch 2.15 (ToTensor/Normalize as float32 ops, legacy
    //! `nearest` interpolation for the grid), numpy 2.4, written by
    //! `export/fixtures_numerics.py` (section `preprocess`).

    use super::*;
    use crate::test_support::{as_array, diff, fixture, load, path};
    use ndarray::{s, Array1, Array3};

    #[test]
    fn resize_is_bit_exact_with_pillow() {
        let cases = [
            ("noise", 23, 15),
            ("noise", 80, 29),
            ("noise", 53, 20),
            ("noise", 30, 37),
            ("noise", 9, 120),
            ("noise", 60, 20),
            ("noise", 50, 36),
            ("noise", 45, 12),
            ("tiny3x2", 7, 5),
            ("tiny1x1", 4, 3),
            ("tiny5x4", 1, 1),
            ("concept", 224, 224),
        ];
        for (source, w, h) in cases {
            let src = load(&format!("resize_src_{source}.png"));
            let ours = resize_bicubic(&src, w, h);
            let pillow = load(&format!("resize_{source}_{w}x{h}.png"));
            let (worst, count) = diff(&ours, &as_array(&pillow));
            assert_eq!(
                worst, 0,
                "{source} → {w}×{h}: {count} samples differ, max {worst}"
            );
        }
    }

    #[test]
    fn resize_to_same_size_is_identity() {
        let src = load("resize_src_noise.png");
        assert_eq!(resize_bicubic(&src, src.width(), src.height()), src);
        assert_eq!(resize_bicubic(&src, 0, 5).dimensions(), (0, 5));
    }

    fn concept() -> RgbImage {
        load("resize_src_concept.png")
    }

    fn assert_close(ours: &Array3<f32>, reference: &Array3<f32>, what: &str) -> f32 {
        let sub = ours.slice(s![.., 3..;11, 3..;11]);
        assert_eq!(sub.dim(), reference.dim(), "{what}: subsample shape");
        let worst = sub
            .iter()
            .zip(reference.iter())
            .fold(0.0_f32, |m, (a, b)| m.max((a - b).abs()));
        assert!(worst <= 1e-6, "{what}: max error {worst}");
        worst
    }

    #[test]
    fn concept_inputs_match_official_processing() {
        let image = concept();
        let params = PreprocessParams::default();
        for (case, mask_file) in [
            ("concept_l", "concept_mask.png"),
            ("concept_rgb", "concept_mask_rgb.png"),
        ] {
            let mask = load_mask(path(mask_file), image.width(), image.height()).unwrap();
            let inputs = ConceptInputs::new(&image, Some(&mask), &params).unwrap();
            assert_eq!(inputs.global_pixels.dim(), (3, 224, 224));
            assert_eq!(inputs.local_pixels.dim(), (3, 224, 224));
            let g = assert_close(
                &inputs.global_pixels,
                &fixture("concept_global_sub.npy"),
                case,
            );
            let l = assert_close(
                &inputs.local_pixels,
                &fixture(&format!("{case}_local_sub.npy")),
                case,
            );
            let grid: Array1<f32> = fixture(&format!("{case}_grid.npy"));
            assert_eq!(inputs.mask_grid, grid, "{case}: mask grid");
            eprintln!("{case}: normalised pixels max error global {g:e}, local {l:e}");
        }
    }

    #[test]
    fn masked_squash_matches_pillow() {
        let image = concept();
        let mask = load_mask(path("concept_mask.png"), image.width(), image.height()).unwrap();
        let ours = resize_bicubic(&mask.apply(&image), 224, 224);
        let pillow = load("concept_l_local_224.png");
        assert_eq!(diff(&ours, &as_array(&pillow)), (0, 0));
    }

    #[test]
    fn no_mask_means_whole_image() {
        let image = concept();
        let inputs = ConceptInputs::new(&image, None, &PreprocessParams::default()).unwrap();
        assert_eq!(inputs.local_pixels, inputs.global_pixels);
        assert!(inputs.mask_grid.iter().all(|&v| v == 1.0));
        assert_eq!(inputs.mask_grid.len(), 256);
    }

    #[test]
    fn parameters_come_from_the_caller() {
        let image = concept();
        let params = PreprocessParams {
            size: 32,
            grid: 4,
            ..PreprocessParams::default()
        };
        let inputs = ConceptInputs::new(&image, None, &params).unwrap();
        assert_eq!(inputs.global_pixels.dim(), (3, 32, 32));
        assert_eq!(inputs.mask_grid.len(), 16);
        for bad in [
            PreprocessParams {
                size: 0,
                ..params.clone()
            },
            PreprocessParams {
                std: [1.0, 0.0, 1.0],
                ..params.clone()
            },
            PreprocessParams {
                mean: [f32::NAN, 0.0, 0.0],
                ..params.clone()
            },
        ] {
            let err = ConceptInputs::new(&image, None, &bad).unwrap_err();
            assert!(matches!(err, PreprocessError::InvalidParams(_)), "{err}");
        }
        let small = BinaryMask::full(3, 3);
        let err = ConceptInputs::new(&image, Some(&small), &params).unwrap_err();
        assert!(matches!(err, PreprocessError::MaskShape { .. }), "{err}");
    }
}

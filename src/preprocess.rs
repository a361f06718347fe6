//! Concept image and mask: decoding, EXIF orientation, Pillow-compatible bicubic squash to
//! 224×224, CLIP normalisation, the 16×16 mask grid.
//!
//! ELITE's CLIP inputs come from Pillow (ELITE_REFERENCE.md §2): `Image.resize((224, 224),
//! BICUBIC)` on uint8 pixels, then `/255` and CLIP mean/std. CLIP features are sensitive to the
//! exact pixels, so the resize here is a transcription of Pillow's `ImagingResample` (filter
//! a = −0.5, support widened by the downscale factor, coefficients normalised and converted to
//! 22-bit fixed point, a horizontal then a vertical uint8 pass with rounding and clipping),
//! verified bit for bit against Pillow 13. The normalisation is float32 in torchvision's order
//! (`x/255`, then `(x − mean)/std`).
//!
//! Deliberate differences from the official code (which calls `Image.open(...).convert("RGB")`):
//! the EXIF orientation is applied (a phone photo is encoded sideways; the reference would
//! squash it sideways), and a 16-bit grayscale image keeps its high byte like every other
//! 16-bit image, where Pillow clips its values to 255 (a nearly all-white image).

use std::path::{Path, PathBuf};

use image::{DynamicImage, ImageDecoder, ImageReader, RgbImage};
use ndarray::{Array1, Array3};

/// Errors from loading and preprocessing the concept image and mask.
#[derive(Debug, thiserror::Error)]
pub enum PreprocessError {
    /// The file does not exist.
    #[error("image file {} does not exist", path.display())]
    NotFound { path: PathBuf },
    /// The file exists but has no bytes.
    #[error("image file {} is empty (0 bytes)", path.display())]
    Empty { path: PathBuf },
    /// The file could not be read.
    #[error("cannot read image file {}: {source}", path.display())]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    /// The bytes are not an image format this build decodes.
    #[error(
        "image file {} is not in a supported format (png, jpeg, webp, bmp, tiff, gif): {reason}",
        path.display()
    )]
    UnsupportedFormat { path: PathBuf, reason: String },
    /// The image is truncated or corrupt.
    #[error("image file {} is corrupt or truncated: {source}", path.display())]
    Corrupt {
        path: PathBuf,
        source: image::ImageError,
    },
    /// The mask does not have the image's size.
    #[error(
        "mask {} is {mask_width}×{mask_height} but the image is {image_width}×{image_height}; \
         they must be the same size",
        path.display()
    )]
    MaskSizeMismatch {
        path: PathBuf,
        mask_width: u32,
        mask_height: u32,
        image_width: u32,
        image_height: u32,
    },
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

/// Reads an image as 8-bit RGB, as Pillow's `Image.open(path).convert("RGB")` does, after
/// applying its EXIF orientation.
///
/// Alpha is dropped without compositing, grayscale is replicated to three channels, 16-bit
/// samples keep their high byte (Pillow's unpacking of 16-bit PNGs).
pub fn load_rgb(path: impl AsRef<Path>) -> Result<RgbImage, PreprocessError> {
    let path = path.as_ref();
    Ok(to_rgb8_like_pillow(decode_oriented(path)?))
}

/// Reads a mask for an image of `expected_width × expected_height`: decoded like [`load_rgb`]
/// (a one-channel mask counts for all three channels), then binarised `> 0` per channel.
pub fn load_mask(
    path: impl AsRef<Path>,
    expected_width: u32,
    expected_height: u32,
) -> Result<BinaryMask, PreprocessError> {
    let path = path.as_ref();
    let rgb = load_rgb(path)?;
    if rgb.dimensions() != (expected_width, expected_height) {
        return Err(PreprocessError::MaskSizeMismatch {
            path: path.to_path_buf(),
            mask_width: rgb.width(),
            mask_height: rgb.height(),
            image_width: expected_width,
            image_height: expected_height,
        });
    }
    Ok(BinaryMask::from_rgb(&rgb))
}

/// Decodes a file (format from its content) and applies its EXIF orientation.
fn decode_oriented(path: &Path) -> Result<DynamicImage, PreprocessError> {
    let read_error = |source: std::io::Error| match source.kind() {
        std::io::ErrorKind::NotFound => PreprocessError::NotFound {
            path: path.to_path_buf(),
        },
        _ => PreprocessError::Read {
            path: path.to_path_buf(),
            source,
        },
    };
    if std::fs::metadata(path).map_err(read_error)?.len() == 0 {
        return Err(PreprocessError::Empty {
            path: path.to_path_buf(),
        });
    }
    // The format comes from the content only, so a misnamed file still decodes.
    let file = std::fs::File::open(path).map_err(read_error)?;
    let reader = ImageReader::new(std::io::BufReader::new(file))
        .with_guessed_format()
        .map_err(read_error)?;
    if reader.format().is_none() {
        return Err(PreprocessError::UnsupportedFormat {
            path: path.to_path_buf(),
            reason: "the content matches no known image signature".into(),
        });
    }
    let image_error = |source: image::ImageError| match source {
        image::ImageError::Unsupported(e) => PreprocessError::UnsupportedFormat {
            path: path.to_path_buf(),
            reason: e.to_string(),
        },
        image::ImageError::IoError(io) if io.kind() != std::io::ErrorKind::UnexpectedEof => {
            read_error(io)
        }
        // Decoding errors, and the end of the file before the image ends.
        _ => PreprocessError::Corrupt {
            path: path.to_path_buf(),
            source,
        },
    };
    let mut decoder = reader.into_decoder().map_err(image_error)?;
    let orientation = decoder.orientation().map_err(image_error)?;
    let mut image = DynamicImage::from_decoder(decoder).map_err(image_error)?;
    image.apply_orientation(orientation);
    Ok(image)
}

/// Pillow's `convert("RGB")` for the layouts the decoders produce.
fn to_rgb8_like_pillow(image: DynamicImage) -> RgbImage {
    let (w, h) = (image.width(), image.height());
    let from_fn = |f: &dyn Fn(u32, u32) -> [u8; 3]| RgbImage::from_fn(w, h, |x, y| f(x, y).into());
    let high = |v: u16| (v >> 8) as u8;
    match image {
        DynamicImage::ImageRgb8(rgb) => rgb,
        DynamicImage::ImageRgba8(im) => from_fn(&|x, y| {
            let p = im.get_pixel(x, y).0;
            [p[0], p[1], p[2]]
        }),
        DynamicImage::ImageLuma8(im) => from_fn(&|x, y| [im.get_pixel(x, y).0[0]; 3]),
        DynamicImage::ImageLumaA8(im) => from_fn(&|x, y| [im.get_pixel(x, y).0[0]; 3]),
        DynamicImage::ImageRgb16(im) => from_fn(&|x, y| im.get_pixel(x, y).0.map(high)),
        DynamicImage::ImageRgba16(im) => from_fn(&|x, y| {
            let p = im.get_pixel(x, y).0;
            [high(p[0]), high(p[1]), high(p[2])]
        }),
        DynamicImage::ImageLuma16(im) => from_fn(&|x, y| [high(im.get_pixel(x, y).0[0]); 3]),
        DynamicImage::ImageLumaA16(im) => from_fn(&|x, y| [high(im.get_pixel(x, y).0[0]); 3]),
        // Float images (e.g. 32-bit TIFF): the image crate's clamp-and-scale.
        other => other.to_rgb8(),
    }
}

/// A per-channel 0/1 mask (`mask > 0`), stored row-major as RGB bytes of 0 or 1.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BinaryMask {
    values: RgbImage,
}

impl BinaryMask {
    /// Binarises an RGB image `> 0` per channel.
    pub fn from_rgb(rgb: &RgbImage) -> Self {
        let mut values = rgb.clone();
        values.iter_mut().for_each(|v| *v = u8::from(*v > 0));
        Self { values }
    }

    /// The mask of a whole image (all ones): what "no mask" means.
    pub fn full(width: u32, height: u32) -> Self {
        Self {
            values: RgbImage::from_pixel(width, height, image::Rgb([1, 1, 1])),
        }
    }

    /// Width in pixels.
    pub fn width(&self) -> u32 {
        self.values.width()
    }

    /// Height in pixels.
    pub fn height(&self) -> u32 {
        self.values.height()
    }

    /// Whether channel `c` of pixel (x, y) is inside the mask; false outside the image.
    pub fn get(&self, x: u32, y: u32, c: usize) -> bool {
        self.values
            .get_pixel_checked(x, y)
            .is_some_and(|p| p.0.get(c).is_some_and(|&v| v > 0))
    }

    /// `image × mask` per channel at full resolution: masked-out samples become exactly 0.
    fn apply(&self, image: &RgbImage) -> RgbImage {
        let mut out = image.clone();
        for (o, &m) in out.iter_mut().zip(self.values.iter()) {
            *o *= m;
        }
        out
    }
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
    use ndarray::{s, Array1, Array3};
    use ndarray_npy::read_npy;

    fn path(name: &str) -> PathBuf {
        PathBuf::from(format!(
            "{}/tests/fixtures/numerics/{name}",
            env!("CARGO_MANIFEST_DIR")
        ))
    }

    fn fixture<T: ndarray_npy::ReadableElement, D: ndarray::Dimension>(
        name: &str,
    ) -> ndarray::Array<T, D> {
        let p = path(name);
        read_npy(&p).unwrap_or_else(|e| panic!("reading {}: {e}", p.display()))
    }

    fn load(name: &str) -> RgbImage {
        load_rgb(path(name)).unwrap()
    }

    /// (max |a − b|, number of differing samples) between an image and a [H, W, 3] array.
    fn diff(a: &RgbImage, b: &Array3<u8>) -> (u8, usize) {
        assert_eq!(
            (a.height() as usize, a.width() as usize, 3),
            b.dim(),
            "image sizes differ"
        );
        let mut worst = (0, 0);
        for (x, y, p) in a.enumerate_pixels() {
            for c in 0..3 {
                let d = p.0[c].abs_diff(b[[y as usize, x as usize, c]]);
                worst = (worst.0.max(d), worst.1 + usize::from(d > 0));
            }
        }
        worst
    }

    fn as_array(image: &RgbImage) -> Array3<u8> {
        let (w, h) = image.dimensions();
        Array3::from_shape_vec((h as usize, w as usize, 3), image.as_raw().clone()).unwrap()
    }

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

    #[test]
    fn decoding_matches_pillow_convert_rgb() {
        for name in ["decode_rgba", "decode_la", "decode_gray", "decode_rgb16"] {
            let ours = load(&format!("{name}.png"));
            let pillow: Array3<u8> = fixture(&format!("{name}_rgb.npy"));
            assert_eq!(diff(&ours, &pillow), (0, 0), "{name}");
        }
    }

    #[test]
    fn other_formats_decode_like_pillow() {
        for ext in ["bmp", "tiff", "webp", "gif"] {
            let ours = load(&format!("format.{ext}"));
            let pillow: Array3<u8> = fixture(&format!("format_{ext}_rgb.npy"));
            assert_eq!(diff(&ours, &pillow), (0, 0), "{ext}");
        }
    }

    #[test]
    fn gray16_keeps_the_high_byte() {
        let ours = load("decode_gray16.png");
        let expected: Array3<u8> = fixture("decode_gray16_rgb.npy");
        assert_eq!(diff(&ours, &expected), (0, 0));
    }

    #[test]
    fn format_comes_from_content_not_name() {
        let dir = tempfile::tempdir().unwrap();
        let misnamed = dir.path().join("photo.png");
        std::fs::copy(path("format.bmp"), &misnamed).unwrap();
        assert_eq!(load_rgb(&misnamed).unwrap(), load("format.bmp"));
    }

    #[test]
    fn exif_orientation_is_applied() {
        // PNG (eXIf chunk): lossless, so exact.
        let ours = load("exif6.png");
        let pillow: Array3<u8> = fixture("exif6_png_upright.npy");
        assert_eq!(
            (ours.width(), ours.height()),
            (24, 32),
            "rotated to portrait"
        );
        assert_eq!(diff(&ours, &pillow), (0, 0));
        // JPEG: zune-jpeg and libjpeg-turbo differ slightly in IDCT rounding.
        let ours = load("exif6.jpg");
        let pillow: Array3<u8> = fixture("exif6_jpg_upright.npy");
        let (worst, count) = diff(&ours, &pillow);
        eprintln!("EXIF-6 JPEG vs Pillow: max diff {worst}, {count} samples differ");
        assert!(worst <= 3, "JPEG decode differs by {worst}");
    }

    #[test]
    fn one_channel_mask_counts_for_all_channels() {
        let mask = load_mask(path("concept_mask.png"), 300, 200).unwrap();
        // Row 65 lies in the band of value 1, row 125 in the band of 128: both count.
        for (x, y) in [(170, 65), (170, 125), (170, 95)] {
            assert!((0..3).all(|c| mask.get(x, y, c)), "({x}, {y})");
        }
        assert!(!(0..3).any(|c| mask.get(5, 5, c)));
        assert!(!mask.get(300, 0, 0), "outside the image");
    }

    #[test]
    fn mask_of_another_size_is_an_error() {
        let err = load_mask(path("concept_mask_small.png"), 300, 200).unwrap_err();
        let msg = err.to_string();
        assert!(
            matches!(err, PreprocessError::MaskSizeMismatch { .. }),
            "{msg}"
        );
        assert!(msg.contains("150×100") && msg.contains("300×200"), "{msg}");
        assert!(msg.contains("concept_mask_small.png"), "{msg}");
    }

    #[test]
    fn unreadable_files_give_specific_errors() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("missing.png");
        let err = load_rgb(&missing).unwrap_err();
        assert!(matches!(err, PreprocessError::NotFound { .. }), "{err}");
        assert!(err.to_string().contains("missing.png"));

        let empty = dir.path().join("empty.png");
        std::fs::write(&empty, b"").unwrap();
        let err = load_rgb(&empty).unwrap_err();
        assert!(matches!(err, PreprocessError::Empty { .. }), "{err}");
        assert!(err.to_string().contains("empty.png"));

        let png = std::fs::read(path("resize_src_noise.png")).unwrap();
        let truncated = dir.path().join("truncated.png");
        std::fs::write(&truncated, &png[..png.len() / 2]).unwrap();
        let err = load_rgb(&truncated).unwrap_err();
        assert!(matches!(err, PreprocessError::Corrupt { .. }), "{err}");
        assert!(err.to_string().contains("truncated.png"));

        let text = dir.path().join("notes.png");
        std::fs::write(&text, b"this is not an image at all").unwrap();
        let err = load_rgb(&text).unwrap_err();
        assert!(
            matches!(err, PreprocessError::UnsupportedFormat { .. }),
            "{err}"
        );
        assert!(err.to_string().contains("notes.png"));

        let err = load_rgb(dir.path()).unwrap_err();
        assert!(
            err.to_string().contains(&dir.path().display().to_string()),
            "{err}"
        );
    }
}

//! The subject's object mask: decoded like the image, checked against it, binarised `> 0`.
//!
//! The official code reads the mask with `convert("RGB")` and uses `mask > 0` per channel (a
//! one-channel mask counts for all three). Here the mask's header is checked against the
//! image's upright size *before* the mask is decoded, so a mask bomb costs nothing, and a mask
//! with no object pixel is an error rather than a run with no subject.

use std::path::Path;

use image::metadata::Orientation;
use image::{DynamicImage, GenericImageView, RgbImage};

use crate::files;
use crate::image_decode::{self, DecodeError, ImageHeader, ImageLimits, Input, Role};

/// A per-channel 0/1 mask (`mask > 0`), stored row-major as RGB bytes of 0 or 1.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BinaryMask {
    values: RgbImage,
}

impl BinaryMask {
    /// Binarises an RGB image `> 0` per channel.
    pub fn from_rgb(rgb: &RgbImage) -> Self {
        Self::binarise(rgb.clone())
    }

    fn binarise(mut values: RgbImage) -> Self {
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

    /// Whether no sample of any channel is inside the mask.
    pub fn is_empty(&self) -> bool {
        self.values.iter().all(|&v| v == 0)
    }

    /// `image × mask` per channel at full resolution: masked-out samples become exactly 0.
    pub(crate) fn apply(&self, image: &RgbImage) -> RgbImage {
        let mut out = image.clone();
        for (o, &m) in out.iter_mut().zip(self.values.iter()) {
            *o *= m;
        }
        out
    }
}

/// Decodes a mask in memory for the image whose header is `image`: the mask's declared size
/// (after its own EXIF orientation) must be the image's upright size, checked before any
/// pixel is decoded; then the size limit, decoding, `> 0` per channel, and at least one object
/// pixel. `name` names the mask in errors.
pub fn decode_mask(
    bytes: &[u8],
    name: &str,
    image: &ImageHeader,
    limits: &ImageLimits,
) -> Result<BinaryMask, DecodeError> {
    let input = Input::new(Role::Mask, name);
    let header = image_decode::read_header(bytes, &input)?;
    check_size(&input, &header, image)?;
    let decoded = image_decode::decode_checked(bytes, &input, &header, limits)?;
    let alpha = alpha_channel(&decoded);
    let mask = BinaryMask::binarise(image_decode::to_rgb8_like_pillow(decoded));
    if mask.is_empty() {
        return Err(DecodeError::MaskEmpty {
            input,
            hint: empty_hint(alpha),
        });
    }
    Ok(mask)
}

/// [`decode_mask`] of a file read through [`files::read_capped`].
pub fn load_mask_for(
    path: &Path,
    image: &ImageHeader,
    limits: &ImageLimits,
) -> Result<BinaryMask, DecodeError> {
    let bytes = files::read_capped(path, Role::Mask.file_kind())?;
    decode_mask(&bytes, &path.display().to_string(), image, limits)
}

/// Reads a mask for an upright image of `expected_width × expected_height` with the default
/// limits (see [`decode_mask`]).
pub fn load_mask(
    path: impl AsRef<Path>,
    expected_width: u32,
    expected_height: u32,
) -> Result<BinaryMask, DecodeError> {
    load_mask_for(
        path.as_ref(),
        &ImageHeader::upright(expected_width, expected_height),
        &ImageLimits::default(),
    )
}

fn check_size(input: &Input, mask: &ImageHeader, image: &ImageHeader) -> Result<(), DecodeError> {
    if (mask.width(), mask.height()) == (image.width(), image.height()) {
        return Ok(());
    }
    Err(DecodeError::MaskSizeMismatch {
        input: input.clone(),
        mask_width: mask.width(),
        mask_height: mask.height(),
        image_width: image.width(),
        image_height: image.height(),
        hint: size_hint(mask, image),
    })
}

/// Explains a mismatch that EXIF orientation causes: one of the two is stored sideways and
/// says so in its EXIF data, the other is not.
fn size_hint(mask: &ImageHeader, image: &ImageHeader) -> String {
    let stored = |h: &ImageHeader| (h.stored_width, h.stored_height);
    if image.transposes() && (mask.width(), mask.height()) == stored(image) {
        format!(
            " (the image is stored as {}×{} and its EXIF orientation {} turns it upright to \
             {}×{}; the mask has no such orientation: give the mask the image's EXIF \
             orientation, or draw it on the upright image)",
            image.stored_width,
            image.stored_height,
            describe(image.orientation),
            image.width(),
            image.height()
        )
    } else if mask.transposes() && stored(mask) == (image.width(), image.height()) {
        format!(
            " (the mask is stored as {}×{} and its EXIF orientation {} turns it to {}×{}; \
             the image has no such orientation: remove the mask's EXIF orientation)",
            mask.stored_width,
            mask.stored_height,
            describe(mask.orientation),
            mask.width(),
            mask.height()
        )
    } else {
        String::new()
    }
}

fn describe(orientation: Orientation) -> String {
    let what = match orientation {
        Orientation::NoTransforms => "none",
        Orientation::Rotate90 => "rotate 90° clockwise",
        Orientation::Rotate180 => "rotate 180°",
        Orientation::Rotate270 => "rotate 90° counter-clockwise",
        Orientation::FlipHorizontal => "mirror",
        Orientation::FlipVertical => "flip",
        Orientation::Rotate90FlipH => "rotate 90° clockwise and mirror",
        Orientation::Rotate270FlipH => "rotate 90° counter-clockwise and mirror",
    };
    format!("{} ({what})", orientation.to_exif())
}

/// What a mask's alpha channel holds, for the message about an empty mask.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Alpha {
    None,
    Uniform,
    Varies,
}

fn alpha_channel(image: &DynamicImage) -> Alpha {
    if !image.color().has_alpha() {
        return Alpha::None;
    }
    let mut values = image.pixels().map(|(_, _, p)| p.0[3]);
    let first = values.next();
    if values.any(|a| Some(a) != first) {
        Alpha::Varies
    } else {
        Alpha::Uniform
    }
}

fn empty_hint(alpha: Alpha) -> String {
    match alpha {
        Alpha::None => "; white (non-zero) marks the object".into(),
        Alpha::Uniform => {
            "; white (non-zero) marks the object (the alpha channel is ignored)".into()
        }
        Alpha::Varies => "; its alpha channel varies, so the object may be drawn only there, but \
                          the alpha channel is ignored (as the official code's convert(\"RGB\") \
                          ignores it): draw the object white on black in the colour channels"
            .into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_support::path;

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
        assert!(matches!(err, DecodeError::MaskSizeMismatch { .. }), "{msg}");
        assert!(msg.contains("150×100") && msg.contains("300×200"), "{msg}");
        assert!(msg.contains("concept_mask_small.png: mask"), "{msg}");
    }
}

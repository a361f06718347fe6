//! Decoding a subject image from bytes as Pillow's `Image.open(f).convert("RGB")` does, with
//! every size limit checked from the header before anything large is allocated.
//!
//! - Formats: JPEG through libjpeg-turbo's decoder with Pillow's settings ([`crate::jpeg`]),
//!   PNG, WebP, BMP, TIFF and GIF through the `image` crate; the format comes from the content,
//!   never from the file name.
//! - Limits ([`ImageLimits`]): Pillow's decompression-bomb rule, from the size the header
//!   declares, before decoding: an image of more than `2 × Image.MAX_IMAGE_PIXELS` =
//!   178,956,970 pixels is refused (Pillow raises `DecompressionBombError` there). The decoders'
//!   own allocations are capped from the same number.
//! - EXIF orientation is applied (a deliberate difference from the official code, README).
//! - `convert("RGB")`: alpha dropped without compositing, grayscale replicated, 16-bit samples
//!   keep their high byte, CMYK as Pillow converts it ([`crate::jpeg`]).
//!
//! Every error names the input (file name, or the name an in-memory caller gives) and its role
//! (image or mask), so a server can pass bytes and still get a message a user can act on.

use std::fmt;
use std::io::Cursor;
use std::path::Path;

use image::metadata::Orientation;
use image::{DynamicImage, ImageDecoder, ImageFormat, ImageReader, RgbImage};

use crate::files::{self, FileError, FileKind};
use crate::jpeg;

/// Pillow's `Image.MAX_IMAGE_PIXELS`; Pillow refuses images of more than twice this.
pub const PILLOW_MAX_IMAGE_PIXELS: u64 = 89_478_485;

/// What the decoders may be asked to do; from the caller (the CLI's `--max-image-pixels`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ImageLimits {
    /// Largest accepted `width × height` as the header declares it.
    pub max_pixels: u64,
}

impl Default for ImageLimits {
    /// Pillow's decompression-bomb limit, `2 × MAX_IMAGE_PIXELS` = 178,956,970 pixels.
    fn default() -> Self {
        Self {
            max_pixels: 2 * PILLOW_MAX_IMAGE_PIXELS,
        }
    }
}

impl ImageLimits {
    /// Largest decoder allocation: the biggest layout a decoder produces is four float32
    /// channels (16 bytes a pixel, TIFF), plus room for palettes, metadata and row buffers.
    fn max_alloc_bytes(&self) -> u64 {
        self.max_pixels.saturating_mul(16).saturating_add(64 << 20)
    }

    fn check(&self, input: &Input, width: u32, height: u32) -> Result<(), DecodeError> {
        let pixels = u64::from(width) * u64::from(height);
        if pixels > self.max_pixels {
            return Err(DecodeError::TooManyPixels {
                input: input.clone(),
                width,
                height,
                pixels,
                limit: self.max_pixels,
            });
        }
        if pixels == 0 {
            return Err(DecodeError::Corrupt {
                input: input.clone(),
                reason: format!("the header declares a {width}×{height} image"),
            });
        }
        Ok(())
    }
}

/// Which input an error is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// The subject image.
    Image,
    /// Its object mask.
    Mask,
}

impl Role {
    /// The size cap and name used when reading a file of this role.
    pub fn file_kind(self) -> FileKind {
        match self {
            Self::Image => files::IMAGE,
            Self::Mask => files::MASK,
        }
    }

    fn as_str(self) -> &'static str {
        match self {
            Self::Image => "image",
            Self::Mask => "mask",
        }
    }
}

impl DecodeError {
    /// Whether the error is about the image or the mask (None for file errors, which name the
    /// file and its role in their message).
    pub fn role(&self) -> Option<Role> {
        match self {
            Self::File(_) => None,
            Self::UnsupportedFormat { input, .. }
            | Self::UnsupportedFeature { input, .. }
            | Self::Corrupt { input, .. }
            | Self::TooManyPixels { input, .. }
            | Self::MaskSizeMismatch { input, .. }
            | Self::MaskEmpty { input, .. } => Some(input.role),
        }
    }
}

/// An input's role and name (a path as given, or a name an in-memory caller chose).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Input {
    pub role: Role,
    pub name: String,
}

impl Input {
    pub fn new(role: Role, name: impl Into<String>) -> Self {
        Self {
            role,
            name: name.into(),
        }
    }
}

impl fmt::Display for Input {
    /// `name: role`, the shape of [`FileError`]'s messages.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.name, self.role.as_str())
    }
}

/// Errors from reading and decoding the subject image or its mask.
#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    /// Missing, not a regular file, empty, over the size cap, unreadable.
    #[error(transparent)]
    File(#[from] FileError),
    /// The bytes are not in a format this build decodes.
    #[error("{input} is not in a supported format (png, jpeg, webp, bmp, tiff, gif): {reason}")]
    UnsupportedFormat { input: Input, reason: String },
    /// A valid file of a supported format using a feature this build does not decode.
    #[error("{input} uses a feature that is not supported: {reason}")]
    UnsupportedFeature { input: Input, reason: String },
    /// The image is truncated or corrupt.
    #[error("{input} is corrupt or truncated: {reason}")]
    Corrupt { input: Input, reason: String },
    /// The header declares more pixels than the limit (Pillow's decompression-bomb rule).
    #[error(
        "{input} is {width}×{height} = {pixels} pixels, over the limit of {limit} pixels \
         (Pillow's decompression-bomb limit, 2 × 89,478,485); if the file is trusted, raise \
         the limit with --max-image-pixels"
    )]
    TooManyPixels {
        input: Input,
        width: u32,
        height: u32,
        pixels: u64,
        limit: u64,
    },
    /// The mask's upright size differs from the image's.
    #[error(
        "{input} is {mask_width}×{mask_height} but the image is {image_width}×{image_height}; \
         they must be the same size{hint}"
    )]
    MaskSizeMismatch {
        input: Input,
        mask_width: u32,
        mask_height: u32,
        image_width: u32,
        image_height: u32,
        /// Why the sizes may differ (EXIF orientation), or empty.
        hint: String,
    },
    /// The mask marks no pixel as object.
    #[error("{input} has no object pixels: every R, G and B value is 0{hint}")]
    MaskEmpty {
        input: Input,
        /// What to do about it (e.g. the object is only in the alpha channel), or empty.
        hint: String,
    },
}

/// What an image's header says, read before any pixel is decoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ImageHeader {
    /// `None` for pixels that did not come from a file (see [`ImageHeader::upright`]).
    pub format: Option<ImageFormat>,
    /// Width and height as stored, before the EXIF orientation.
    pub stored_width: u32,
    pub stored_height: u32,
    /// The EXIF orientation (applied by the decoding functions here).
    pub orientation: Orientation,
}

impl ImageHeader {
    /// The header of upright pixels of `width × height` with no file behind them.
    pub fn upright(width: u32, height: u32) -> Self {
        Self {
            format: None,
            stored_width: width,
            stored_height: height,
            orientation: Orientation::NoTransforms,
        }
    }

    /// Whether the orientation swaps width and height.
    pub fn transposes(&self) -> bool {
        matches!(
            self.orientation,
            Orientation::Rotate90
                | Orientation::Rotate270
                | Orientation::Rotate90FlipH
                | Orientation::Rotate270FlipH
        )
    }

    /// Width after the orientation is applied.
    pub fn width(&self) -> u32 {
        if self.transposes() {
            self.stored_height
        } else {
            self.stored_width
        }
    }

    /// Height after the orientation is applied.
    pub fn height(&self) -> u32 {
        if self.transposes() {
            self.stored_width
        } else {
            self.stored_height
        }
    }
}

/// Decoded pixels and the header they came from.
#[derive(Debug, Clone)]
pub struct DecodedImage {
    /// Upright (EXIF orientation applied) 8-bit RGB.
    pub rgb: RgbImage,
    pub header: ImageHeader,
}

/// Reads the header of an image in memory: format, stored size, EXIF orientation. Reads no
/// pixel data and allocates nothing in proportion to the declared size.
pub fn read_header(bytes: &[u8], input: &Input) -> Result<ImageHeader, DecodeError> {
    let format = sniff(bytes, input)?;
    if format == ImageFormat::Jpeg {
        let h = jpeg::read_header(bytes).map_err(|e| jpeg_error(input, e))?;
        let orientation = h
            .exif
            .as_deref()
            .and_then(Orientation::from_exif_chunk)
            .unwrap_or(Orientation::NoTransforms);
        return Ok(ImageHeader {
            format: Some(format),
            stored_width: h.width,
            stored_height: h.height,
            orientation,
        });
    }
    let mut decoder = other_decoder(bytes, format, input, HEADER_MAX_ALLOC)?;
    let (stored_width, stored_height) = decoder.dimensions();
    let orientation = decoder.orientation().map_err(|e| image_error(input, e))?;
    Ok(ImageHeader {
        format: Some(format),
        stored_width,
        stored_height,
        orientation,
    })
}

/// Decodes an image in memory to upright 8-bit RGB as Pillow's `convert("RGB")` does, after
/// checking its declared size against `limits`. `name` names the input in errors.
pub fn decode_rgb(
    bytes: &[u8],
    name: &str,
    limits: &ImageLimits,
) -> Result<DecodedImage, DecodeError> {
    let input = Input::new(Role::Image, name);
    let header = read_header(bytes, &input)?;
    let image = decode_checked(bytes, &input, &header, limits)?;
    Ok(DecodedImage {
        rgb: to_rgb8_like_pillow(image),
        header,
    })
}

/// [`decode_rgb`] of a file read through [`files::read_capped`] (regular file, size cap).
pub fn load_image(path: &Path, limits: &ImageLimits) -> Result<DecodedImage, DecodeError> {
    let bytes = files::read_capped(path, Role::Image.file_kind())?;
    decode_rgb(&bytes, &path.display().to_string(), limits)
}

/// Reads an image file as upright 8-bit RGB with the default [`ImageLimits`] (see
/// [`load_image`]).
pub fn load_rgb(path: impl AsRef<Path>) -> Result<RgbImage, DecodeError> {
    Ok(load_image(path.as_ref(), &ImageLimits::default())?.rgb)
}

/// Checks `header` against `limits`, then decodes and applies the orientation. The format's
/// own decoder (not the header) decides the final pixels; a decoder that disagrees with the
/// header it was checked against is an error.
pub(crate) fn decode_checked(
    bytes: &[u8],
    input: &Input,
    header: &ImageHeader,
    limits: &ImageLimits,
) -> Result<DynamicImage, DecodeError> {
    limits.check(input, header.stored_width, header.stored_height)?;
    let mut image = match header.format {
        Some(ImageFormat::Jpeg) => jpeg::decode(bytes, &jpeg_limits(limits))
            .map(jpeg::Decoded::into_dynamic)
            .map_err(|e| jpeg_error(input, e))?,
        Some(format) => {
            let decoder = other_decoder(bytes, format, input, limits.max_alloc_bytes())?;
            if decoder.dimensions() != (header.stored_width, header.stored_height) {
                return Err(DecodeError::Corrupt {
                    input: input.clone(),
                    reason: "the decoder disagrees with the header on the size".into(),
                });
            }
            DynamicImage::from_decoder(decoder).map_err(|e| image_error(input, e))?
        }
        None => {
            return Err(DecodeError::UnsupportedFormat {
                input: input.clone(),
                reason: "no format".into(),
            })
        }
    };
    image.apply_orientation(header.orientation);
    Ok(image)
}

/// The format from the content's signature.
fn sniff(bytes: &[u8], input: &Input) -> Result<ImageFormat, DecodeError> {
    if bytes.is_empty() {
        // Files are refused as empty by `files`; this is for bytes given in memory.
        return Err(DecodeError::Corrupt {
            input: input.clone(),
            reason: "no data (0 bytes)".into(),
        });
    }
    let unsupported = |reason: String| DecodeError::UnsupportedFormat {
        input: input.clone(),
        reason,
    };
    let format = image::guess_format(bytes)
        .map_err(|_| unsupported("the content matches no known image signature".into()))?;
    match format {
        ImageFormat::Png
        | ImageFormat::Jpeg
        | ImageFormat::WebP
        | ImageFormat::Bmp
        | ImageFormat::Tiff
        | ImageFormat::Gif => Ok(format),
        other => Err(unsupported(format!(
            "{other:?} images are not decoded by this build"
        ))),
    }
}

/// What reading a header may allocate: palettes, text and ICC chunks, never pixels.
const HEADER_MAX_ALLOC: u64 = 64 << 20;

/// Progressive JPEG scans accepted: libjpeg-turbo's own fuzzers stop at 500; ordinary files
/// have about 10 (each scan is a pass over the coefficients, so this bounds the work).
const JPEG_MAX_SCANS: i32 = 500;

fn jpeg_limits(limits: &ImageLimits) -> jpeg::JpegLimits {
    jpeg::JpegLimits {
        max_pixels: limits.max_pixels,
        max_scans: JPEG_MAX_SCANS,
        max_memory_bytes: limits.max_alloc_bytes(),
    }
}

/// An `image` crate decoder for a non-JPEG format whose allocations are capped at
/// `max_alloc` bytes.
fn other_decoder<'a>(
    bytes: &'a [u8],
    format: ImageFormat,
    input: &Input,
    max_alloc: u64,
) -> Result<impl ImageDecoder + 'a, DecodeError> {
    let mut reader = ImageReader::with_format(Cursor::new(bytes), format);
    let mut image_limits = image::Limits::default();
    image_limits.max_alloc = Some(max_alloc);
    reader.limits(image_limits);
    reader.into_decoder().map_err(|e| image_error(input, e))
}

fn image_error(input: &Input, source: image::ImageError) -> DecodeError {
    match source {
        image::ImageError::Unsupported(e) => DecodeError::UnsupportedFormat {
            input: input.clone(),
            reason: e.to_string(),
        },
        // Decoding errors, limits, the end of the data before the image ends.
        other => DecodeError::Corrupt {
            input: input.clone(),
            reason: other.to_string(),
        },
    }
}

fn jpeg_error(input: &Input, source: jpeg::JpegError) -> DecodeError {
    match source {
        jpeg::JpegError::Unsupported(reason) => DecodeError::UnsupportedFeature {
            input: input.clone(),
            reason,
        },
        jpeg::JpegError::Decode(reason) => DecodeError::Corrupt {
            input: input.clone(),
            reason,
        },
    }
}

/// Pillow's `convert("RGB")` for the layouts the decoders produce.
pub(crate) fn to_rgb8_like_pillow(image: DynamicImage) -> RgbImage {
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

#[cfg(test)]
mod tests {
    //! References: Pillow 13 `convert("RGB")` and `ImageOps.exif_transpose`, written by
    //! `export/fixtures_numerics.py` (section `preprocess`). The JPEG matrix has its own test
    //! (`tests/jpeg_matrix.rs`); crafted hostile inputs are in `tests/image_limits.rs`.

    use super::*;
    use crate::files::FileError;
    use crate::test_support::{diff, fixture, load, path};
    use ndarray::Array3;

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
    fn exif_orientation_is_applied_exactly() {
        // PNG (eXIf chunk) and JPEG (APP1): both exact, the JPEG through libjpeg-turbo.
        for (file, reference) in [
            ("exif6.png", "exif6_png_upright.npy"),
            ("exif6.jpg", "exif6_jpg_upright.npy"),
        ] {
            let ours = load(file);
            let pillow: Array3<u8> = fixture(reference);
            assert_eq!((ours.width(), ours.height()), (24, 32), "{file}: portrait");
            assert_eq!(diff(&ours, &pillow), (0, 0), "{file}");
        }
        let bytes = std::fs::read(path("exif6.jpg")).unwrap();
        let header = read_header(&bytes, &Input::new(Role::Image, "exif6.jpg")).unwrap();
        assert_eq!(header.orientation, Orientation::Rotate90);
        assert_eq!(
            (header.stored_width, header.stored_height, header.width()),
            (32, 24, 24)
        );
    }

    #[test]
    fn decoding_from_memory_names_the_input() {
        let bytes = std::fs::read(path("format.bmp")).unwrap();
        let decoded = decode_rgb(&bytes, "upload #3", &ImageLimits::default()).unwrap();
        assert_eq!(decoded.rgb, load("format.bmp"));
        let err = decode_rgb(&bytes[..40], "upload #3", &ImageLimits::default()).unwrap_err();
        assert!(err.to_string().starts_with("upload #3: image"), "{err}");
        let err = decode_rgb(b"", "upload #4", &ImageLimits::default()).unwrap_err();
        assert!(err.to_string().contains("upload #4"), "{err}");
    }

    #[test]
    fn the_pixel_limit_is_a_parameter() {
        let bytes = std::fs::read(path("format.bmp")).unwrap();
        let header = read_header(&bytes, &Input::new(Role::Image, "b")).unwrap();
        let exact = u64::from(header.stored_width) * u64::from(header.stored_height);
        let ok = ImageLimits { max_pixels: exact };
        assert!(decode_rgb(&bytes, "b", &ok).is_ok());
        let tight = ImageLimits {
            max_pixels: exact - 1,
        };
        let err = decode_rgb(&bytes, "b", &tight).unwrap_err();
        let msg = err.to_string();
        assert!(matches!(err, DecodeError::TooManyPixels { .. }), "{msg}");
        assert!(msg.contains(&format!("limit of {}", exact - 1)), "{msg}");
        assert!(msg.contains("--max-image-pixels"), "{msg}");
        assert_eq!(ImageLimits::default().max_pixels, 178_956_970);
    }

    #[test]
    fn unreadable_files_give_specific_errors() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("missing.png");
        let err = load_rgb(&missing).unwrap_err();
        assert!(
            matches!(err, DecodeError::File(FileError::NotFound { .. })),
            "{err}"
        );
        assert!(err.to_string().contains("missing.png"));

        let empty = dir.path().join("empty.png");
        std::fs::write(&empty, b"").unwrap();
        let err = load_rgb(&empty).unwrap_err();
        assert!(
            matches!(err, DecodeError::File(FileError::Empty { .. })),
            "{err}"
        );
        assert!(err.to_string().contains("empty.png"));

        for source in ["resize_src_noise.png", "exif6.jpg"] {
            let bytes = std::fs::read(path(source)).unwrap();
            let truncated = dir.path().join(format!("truncated-{source}"));
            std::fs::write(&truncated, &bytes[..bytes.len() / 2]).unwrap();
            let err = load_rgb(&truncated).unwrap_err();
            assert!(matches!(err, DecodeError::Corrupt { .. }), "{err}");
            assert!(err.to_string().contains("truncated-"), "{err}");
        }

        let text = dir.path().join("notes.png");
        std::fs::write(&text, b"this is not an image at all").unwrap();
        let err = load_rgb(&text).unwrap_err();
        assert!(
            matches!(err, DecodeError::UnsupportedFormat { .. }),
            "{err}"
        );
        assert!(err.to_string().contains("notes.png"));

        let err = load_rgb(dir.path()).unwrap_err();
        assert!(err.to_string().contains("a directory"), "{err}");
    }
}

//! JPEG decoding exactly as Pillow 13 does it: libjpeg-turbo's decoder with Pillow's settings,
//! then Pillow's conversion of CMYK to RGB.
//!
//! Pillow (what the official ELITE code decodes with) uses libjpeg-turbo; the `image` crate's
//! zune-jpeg differs from it by up to 4 levels on 8–24 % of the samples of ordinary photos,
//! enough to move ELITE's concept by 1e-2 relative. The decoder here is libjpeg-turbo's, built
//! from the C source that `mozjpeg-sys` vendors (mozjpeg is a fork of libjpeg-turbo 2.1 whose
//! changes are in the encoder; it needs only a C compiler, no cmake or nasm). Its output is
//! measured equal to Pillow's, sample for sample, on the matrix in `tests/fixtures/jpeg/`
//! (`export/jpeg_matrix.py`): baseline and progressive, 4:4:4 / 4:2:2 / 4:2:0 / 4:4:0 / 4:1:1,
//! grayscale, restart intervals, Adobe CMYK and YCCK, odd sizes.
//!
//! The C side (`src/jpeg_shim.c`) holds libjpeg's setjmp error boundary; this side sizes the
//! output from the header and applies Pillow's conventions:
//! - 1, 3 or 4 components decode to L, RGB or CMYK (Pillow's modes); others are refused, as
//!   Pillow refuses them, and so is a sample precision other than 8 bits.
//! - CMYK is read "Adobe-inverted" as Pillow always reads it (`CMYK;I`), then converted with
//!   Pillow's `cmyk2rgb` with its integer `MULDIV255` rounding (see [`cmyk_to_rgb`]).
//! - Warnings (recoverable corrupt data) are ignored as Pillow ignores them; data ending
//!   before the last scanline is an error, as in Pillow ("image file is truncated").

use std::ffi::{c_char, c_int, CStr};

use image::{DynamicImage, GrayImage, RgbImage};

// Links libjpeg (the C library the shim calls); nothing of its Rust API is used.
use mozjpeg_sys as _;

/// Room for libjpeg's messages (its own limit is 200 bytes).
const MESSAGE_LEN: usize = 256;
/// Largest EXIF payload of one APP1 marker.
const EXIF_CAPACITY: usize = 65_535;

const STATUS_OK: c_int = 0;
const STATUS_BAD_BUFFER: c_int = 2;

/// Mirrors `elite_jpeg_header` in jpeg_shim.c.
#[repr(C)]
struct RawHeader {
    width: u32,
    height: u32,
    components: i32,
    color_space: i32,
    progressive: i32,
    saw_adobe: i32,
    adobe_transform: i32,
    exif: *mut u8,
    exif_capacity: usize,
    exif_len: usize,
}

/// Mirrors `elite_jpeg_limits` in jpeg_shim.c.
#[repr(C)]
struct RawLimits {
    max_scans: i32,
    max_memory_bytes: u64,
}

extern "C" {
    fn elite_jpeg_read_header(
        data: *const u8,
        len: usize,
        header: *mut RawHeader,
        message: *mut c_char,
        message_len: usize,
    ) -> c_int;

    #[allow(clippy::too_many_arguments)]
    fn elite_jpeg_decode(
        data: *const u8,
        len: usize,
        limits: *const RawLimits,
        out: *mut u8,
        out_len: usize,
        expect_width: u32,
        expect_height: u32,
        expect_channels: i32,
        message: *mut c_char,
        message_len: usize,
    ) -> c_int;
}

/// Why a JPEG could not be decoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum JpegError {
    /// A valid JPEG of a kind Pillow does not decode either (or this build does not).
    #[error("{0}")]
    Unsupported(String),
    /// libjpeg's message for corrupt or truncated data, or a limit hit while decoding.
    #[error("{0}")]
    Decode(String),
}

/// The colour space libjpeg infers for the file (`J_COLOR_SPACE`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ColorSpace {
    Grayscale,
    Rgb,
    YCbCr,
    Cmyk,
    Ycck,
    Other(i32),
}

impl ColorSpace {
    fn from_raw(value: i32) -> Self {
        match value {
            1 => Self::Grayscale,
            2 => Self::Rgb,
            3 => Self::YCbCr,
            4 => Self::Cmyk,
            5 => Self::Ycck,
            other => Self::Other(other),
        }
    }
}

/// A JPEG's header, as libjpeg reads it (up to the first scan).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JpegHeader {
    pub width: u32,
    pub height: u32,
    pub components: u8,
    pub color_space: ColorSpace,
    pub progressive: bool,
    /// The Adobe APP14 marker's transform flag, when there is one.
    pub adobe_transform: Option<u8>,
    /// The first `Exif\0\0` APP1 payload without those six bytes (TIFF data), as Pillow's
    /// `info["exif"]` holds it.
    pub exif: Option<Vec<u8>>,
}

impl JpegHeader {
    /// Pillow's mode for the component count: L, RGB or CMYK, as output channels.
    fn channels(&self) -> Result<usize, JpegError> {
        match self.components {
            1 | 3 | 4 => Ok(usize::from(self.components)),
            n => Err(JpegError::Unsupported(format!(
                "a JPEG with {n} colour components (Pillow decodes 1, 3 or 4)"
            ))),
        }
    }
}

/// Limits for [`decode`], checked before libjpeg allocates its buffers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct JpegLimits {
    /// Largest `width × height`.
    pub max_pixels: u64,
    /// Largest number of progressive scans.
    pub max_scans: i32,
    /// Cap on libjpeg's own large buffers (the progressive coefficient store).
    pub max_memory_bytes: u64,
}

/// Decoded samples in Pillow's mode for the file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decoded {
    /// One component: Pillow's mode L.
    Gray(GrayImage),
    /// Three components: mode RGB (libjpeg did the YCbCr conversion).
    Rgb(RgbImage),
    /// Four components: mode CMYK, already Adobe-inverted as Pillow's `CMYK;I` reads it.
    Cmyk {
        width: u32,
        height: u32,
        samples: Vec<u8>,
    },
}

impl Decoded {
    /// As an `image` crate image: L and RGB as they are, CMYK through [`cmyk_to_rgb`].
    pub fn into_dynamic(self) -> DynamicImage {
        match self {
            Self::Gray(g) => DynamicImage::ImageLuma8(g),
            Self::Rgb(rgb) => DynamicImage::ImageRgb8(rgb),
            Self::Cmyk {
                width,
                height,
                samples,
            } => DynamicImage::ImageRgb8(cmyk_to_rgb(width, height, &samples)),
        }
    }
}

fn message_text(buffer: &[c_char]) -> String {
    // SAFETY: the shim always writes a NUL-terminated string into the zeroed buffer.
    let text = unsafe { CStr::from_ptr(buffer.as_ptr()) };
    text.to_string_lossy().into_owned()
}

/// Reads a JPEG's header. Allocates nothing in proportion to the declared size.
pub fn read_header(bytes: &[u8]) -> Result<JpegHeader, JpegError> {
    let mut exif = vec![0_u8; EXIF_CAPACITY];
    let mut raw = RawHeader {
        width: 0,
        height: 0,
        components: 0,
        color_space: 0,
        progressive: 0,
        saw_adobe: 0,
        adobe_transform: 0,
        exif: exif.as_mut_ptr(),
        exif_capacity: exif.len(),
        exif_len: 0,
    };
    let mut message = [0 as c_char; MESSAGE_LEN];
    // SAFETY: `bytes` is valid for `len` bytes; `raw.exif` for `exif_capacity` bytes; the
    // shim writes at most `MESSAGE_LEN` bytes (NUL included) into `message`.
    let status = unsafe {
        elite_jpeg_read_header(
            bytes.as_ptr(),
            bytes.len(),
            &mut raw,
            message.as_mut_ptr(),
            message.len(),
        )
    };
    if status != STATUS_OK {
        return Err(classify(message_text(&message)));
    }
    exif.truncate(raw.exif_len.min(EXIF_CAPACITY));
    Ok(JpegHeader {
        width: raw.width,
        height: raw.height,
        components: u8::try_from(raw.components).unwrap_or(u8::MAX),
        color_space: ColorSpace::from_raw(raw.color_space),
        progressive: raw.progressive != 0,
        adobe_transform: (raw.saw_adobe != 0).then_some(raw.adobe_transform as u8),
        exif: (raw.exif_len > 0).then_some(exif),
    })
}

/// libjpeg's messages for valid JPEGs it does not decode, as opposed to corrupt ones.
fn classify(message: String) -> JpegError {
    if message.contains("SOF type 0xc3") {
        return JpegError::Unsupported(
            "lossless JPEG (SOF3) is not decoded by this build's libjpeg-turbo 2.1 decoder \
             (Pillow 13's libjpeg-turbo 3 decodes it); convert the file to PNG"
                .into(),
        );
    }
    const UNSUPPORTED: [&str; 3] = [
        "Unsupported JPEG data precision",
        "Unsupported marker type",
        "Unsupported JPEG process",
    ];
    if UNSUPPORTED.iter().any(|m| message.starts_with(m)) {
        JpegError::Unsupported(message)
    } else {
        JpegError::Decode(message)
    }
}

/// Decodes a JPEG as Pillow does, into Pillow's mode for the file (see the module docs).
pub fn decode(bytes: &[u8], limits: &JpegLimits) -> Result<Decoded, JpegError> {
    let header = read_header(bytes)?;
    let channels = header.channels()?;
    let (width, height) = (header.width, header.height);
    let pixels = u64::from(width) * u64::from(height);
    if pixels > limits.max_pixels || pixels == 0 {
        return Err(JpegError::Decode(format!(
            "{width}×{height} is outside 1..={} pixels",
            limits.max_pixels
        )));
    }
    let len = usize::try_from(pixels)
        .ok()
        .and_then(|p| p.checked_mul(channels))
        .ok_or_else(|| JpegError::Decode(format!("{width}×{height} does not fit in memory")))?;
    // Zeroed pages are mapped lazily, so a file that fails early touches little of this.
    let mut samples = vec![0_u8; len];
    let raw_limits = RawLimits {
        max_scans: limits.max_scans,
        max_memory_bytes: limits.max_memory_bytes,
    };
    let mut message = [0 as c_char; MESSAGE_LEN];
    // SAFETY: `samples` is valid for `len` bytes and the shim writes at most
    // width × height × channels of them (it checks the header against these values again);
    // `bytes` and `message` as in `read_header`.
    let status = unsafe {
        elite_jpeg_decode(
            bytes.as_ptr(),
            bytes.len(),
            &raw_limits,
            samples.as_mut_ptr(),
            samples.len(),
            width,
            height,
            channels as i32,
            message.as_mut_ptr(),
            message.len(),
        )
    };
    match status {
        STATUS_OK => {}
        STATUS_BAD_BUFFER => {
            return Err(JpegError::Decode(
                "the header changed between two reads of the same bytes".into(),
            ))
        }
        _ => return Err(classify(message_text(&message))),
    }
    let bad_len = || JpegError::Decode("decoded buffer has the wrong length".into());
    Ok(match channels {
        1 => Decoded::Gray(GrayImage::from_raw(width, height, samples).ok_or_else(bad_len)?),
        3 => Decoded::Rgb(RgbImage::from_raw(width, height, samples).ok_or_else(bad_len)?),
        _ => {
            // Pillow's `CMYK;I` unpacker: every byte inverted ("assume adobe conventions").
            samples.iter_mut().for_each(|v| *v = !*v);
            Decoded::Cmyk {
                width,
                height,
                samples,
            }
        }
    })
}

/// Pillow's `cmyk2rgb` (Convert.c): `nk = 255 − K`, `R = clip(nk − MULDIV255(C, nk))`, where
/// `MULDIV255(a, b) = ((t >> 8) + t) >> 8` with `t = a·b + 128`.
pub fn cmyk_to_rgb(width: u32, height: u32, cmyk: &[u8]) -> RgbImage {
    let muldiv255 = |a: i32, b: i32| {
        let t = a * b + 128;
        ((t >> 8) + t) >> 8
    };
    let mut rgb = RgbImage::new(width, height);
    for (out, p) in rgb.pixels_mut().zip(cmyk.chunks_exact(4)) {
        let nk = 255 - i32::from(p[3]);
        out.0 = std::array::from_fn(|c| {
            let v = nk - muldiv255(i32::from(p[c]), nk);
            v.clamp(0, 255) as u8
        });
    }
    rgb
}

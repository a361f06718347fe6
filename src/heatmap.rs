//! Pictures of attention maps (DAAM-style heat maps): a latent-size map upsampled to the image,
//! colour-mapped and blended over the generated image, and a contact sheet of every token's map
//! with its word as a label.
//!
//! - Upsampling: PyTorch's bicubic (`F.interpolate(mode="bicubic", align_corners=False)`,
//!   a = -0.75, edge pixels repeated), as DAAM expands its maps, then clamped at 0.
//! - Colour: matplotlib's `jet`, blended as DAAM draws it: `(1 - v) · image + v · jet(v)`, so
//!   the image shows through where the map is low.
//! - Scale: a token's map is stretched to its own min..max (DAAM's default), so every map
//!   shows where its token looks; its label gives the peak value, the fraction of the
//!   attention the token gets there (the 77 maps sum to about 1 at each pixel). The
//!   placeholder's gate `A / M` is drawn on its absolute scale, 0..1: 1 = ELITE's local branch
//!   at full strength.
//! - Labels: an 8×8 bitmap font (`font8x8`, the IBM PC's glyphs), ASCII only: no system font.

use font8x8::legacy::BASIC_LEGACY;
use image::{imageops, Rgb, RgbImage};
use ndarray::{Array2, ArrayView2, Axis};

use crate::attention_maps::AttentionMaps;

/// One prompt token: its position in the 77 and how it is shown.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenLabel {
    pub index: usize,
    pub text: String,
}

/// How a map's values become colours.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scale {
    /// Stretched to the map's own min..max.
    Relative,
    /// 0..1 as they are (clamped).
    Absolute,
}

/// The pictures of one image's maps.
#[derive(Debug, Clone)]
pub struct MapPictures {
    /// One per prompt token, in order.
    pub tokens: Vec<RgbImage>,
    /// ELITE's placeholder gate.
    pub placeholder: RgbImage,
    /// The image, every token's map and the gate, labelled.
    pub sheet: RgbImage,
}

/// The file names of one image's pictures, for an image saved as `<stem>.png`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MapFileNames {
    /// `<stem>-<index>-<token>.png`, per prompt token.
    pub tokens: Vec<String>,
    /// `<stem>-placeholder.png`.
    pub placeholder: String,
    /// `<stem>-sheet.png`.
    pub sheet: String,
}

/// What cannot be drawn.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HeatmapError {
    #[error("image {image} of {images}: no attention maps for it")]
    NoImage { image: usize, images: usize },
    #[error("token index {index} is outside the {tokens} token maps")]
    NoToken { index: usize, tokens: usize },
}

/// The names of `tokens`' pictures and the others, for the image file stem `stem`.
pub fn file_names(stem: &str, tokens: &[TokenLabel]) -> MapFileNames {
    MapFileNames {
        tokens: tokens
            .iter()
            .map(|t| format!("{stem}-{:02}-{}.png", t.index, file_word(&t.text)))
            .collect(),
        placeholder: format!("{stem}-placeholder.png"),
        sheet: format!("{stem}-sheet.png"),
    }
}

/// A token's text as part of a file name: lowercase ASCII letters and digits, anything else
/// one `_`, at most 24 bytes (`<start>` → `start`, `don't` → `don_t`).
fn file_word(text: &str) -> String {
    let mut word = String::new();
    for c in text.chars().flat_map(char::to_lowercase) {
        if c.is_ascii_alphanumeric() {
            word.push(c);
        } else if !word.is_empty() && !word.ends_with('_') {
            word.push('_');
        }
        if word.len() >= 24 {
            break;
        }
    }
    let word = word.trim_end_matches('_');
    if word.is_empty() {
        "x".into()
    } else {
        word.into()
    }
}

/// The pictures of image `image` of a job: `tokens` are the prompt's tokens (their maps),
/// `placeholder` the placeholder's label (for the gate's).
pub fn render(
    picture: &RgbImage,
    maps: &AttentionMaps,
    image: usize,
    tokens: &[TokenLabel],
    placeholder: &str,
) -> Result<MapPictures, HeatmapError> {
    let images = maps.tokens.dim().0;
    if image >= images {
        return Err(HeatmapError::NoImage { image, images });
    }
    let all = maps.tokens.index_axis(Axis(0), image);
    let (width, height) = picture.dimensions();
    let mut pictures = Vec::with_capacity(tokens.len());
    let mut labels = vec![("image".to_string(), String::new())];
    for token in tokens {
        let map = all
            .axis_iter(Axis(0))
            .nth(token.index)
            .ok_or(HeatmapError::NoToken {
                index: token.index,
                tokens: all.dim().0,
            })?;
        let heat = upsample_bicubic(map, height as usize, width as usize);
        pictures.push(overlay(picture, heat.view(), Scale::Relative));
        labels.push((
            format!("{} {}", token.index, token.text),
            format!("peak {:.3}", max(map)),
        ));
    }
    let gate = maps.gate.index_axis(Axis(0), image);
    let gate = gate.index_axis(Axis(0), 0);
    let heat = upsample_bicubic(gate, height as usize, width as usize);
    let gate_picture = overlay(picture, heat.view(), Scale::Absolute);
    labels.push((
        format!("{placeholder} gate A/M"),
        format!("peak {:.3}", max(gate)),
    ));
    let tiles: Vec<&RgbImage> = std::iter::once(picture)
        .chain(&pictures)
        .chain(std::iter::once(&gate_picture))
        .collect();
    let sheet = contact_sheet(&tiles, &labels);
    Ok(MapPictures {
        tokens: pictures,
        placeholder: gate_picture,
        sheet,
    })
}

fn max(map: ArrayView2<f32>) -> f32 {
    map.iter().copied().fold(0.0, f32::max)
}

/// PyTorch's bicubic weights (a = -0.75) for the fraction `t` of the way past a source pixel.
fn cubic_weights(t: f32) -> [f32; 4] {
    const A: f32 = -0.75;
    let near = |x: f32| ((A + 2.0) * x - (A + 3.0)) * x * x + 1.0;
    let far = |x: f32| ((A * x - 5.0 * A) * x + 8.0 * A) * x - 4.0 * A;
    [far(t + 1.0), near(t), near(1.0 - t), far(2.0 - t)]
}

/// Resamples one axis (`axis` 0: rows, 1: columns) to `out` samples.
fn resample_axis(map: ArrayView2<f32>, axis: usize, out: usize) -> Array2<f32> {
    let len = map.shape()[axis];
    let mut shape = [map.nrows(), map.ncols()];
    shape[axis] = out;
    let mut result = Array2::<f32>::zeros(shape);
    let scale = len as f32 / out as f32;
    for o in 0..out {
        // Half-pixel centres; the source index is not clamped before the taps (PyTorch's
        // bicubic), only each tap is (edge pixels repeated).
        let src = (o as f32 + 0.5) * scale - 0.5;
        let base = src.floor();
        let weights = cubic_weights(src - base);
        let mut lane = result.index_axis_mut(Axis(axis), o);
        for (k, weight) in weights.iter().enumerate() {
            let tap = (base as isize + k as isize - 1).clamp(0, len as isize - 1) as usize;
            lane.scaled_add(*weight, &map.index_axis(Axis(axis), tap));
        }
    }
    result
}

/// A map upsampled (bicubic, as PyTorch) to `height × width`, clamped at 0 (the bicubic kernel
/// undershoots).
pub fn upsample_bicubic(map: ArrayView2<f32>, height: usize, width: usize) -> Array2<f32> {
    let rows = resample_axis(map, 0, height);
    let mut both = resample_axis(rows.view(), 1, width);
    both.mapv_inplace(|v| v.max(0.0));
    both
}

/// matplotlib's `jet`: dark blue → blue → cyan → yellow → red → dark red over 0..1.
pub fn jet(v: f32) -> [u8; 3] {
    let v = v.clamp(0.0, 1.0);
    let channel = |centre: f32| ((1.5 - (4.0 * v - centre).abs()).clamp(0.0, 1.0) * 255.0) as u8;
    [channel(3.0), channel(2.0), channel(1.0)]
}

/// `heat` (the picture's size) colour-mapped and blended over `picture`.
pub fn overlay(picture: &RgbImage, heat: ArrayView2<f32>, scale: Scale) -> RgbImage {
    let (lo, hi) = match scale {
        Scale::Relative => heat
            .iter()
            .fold((f32::INFINITY, f32::NEG_INFINITY), |(lo, hi), &v| {
                (lo.min(v), hi.max(v))
            }),
        Scale::Absolute => (0.0, 1.0),
    };
    let span = (hi - lo).max(1e-12);
    let mut out = picture.clone();
    for (x, y, pixel) in out.enumerate_pixels_mut() {
        let v = ((heat[[y as usize, x as usize]] - lo) / span).clamp(0.0, 1.0);
        let colour = jet(v);
        for (c, p) in pixel.0.iter_mut().enumerate() {
            *p = ((1.0 - v) * f32::from(*p) + v * f32::from(colour[c])).round() as u8;
        }
    }
    out
}

/// Longest side of a tile of the contact sheet.
const TILE: u32 = 192;
/// Height of a tile's label strip: two lines of the 8×8 font with a margin.
const LABEL: u32 = 22;
const MARGIN: u32 = 4;

/// Tiles (scaled to [`TILE`]) in a grid, each with its two label lines below.
pub fn contact_sheet(tiles: &[&RgbImage], labels: &[(String, String)]) -> RgbImage {
    let Some(first) = tiles.first() else {
        return RgbImage::new(1, 1);
    };
    let (w, h) = first.dimensions();
    let factor = TILE as f32 / w.max(h) as f32;
    let (tw, th) = (
        ((w as f32 * factor).round() as u32).max(1),
        ((h as f32 * factor).round() as u32).max(1),
    );
    let count = tiles.len() as u32;
    let columns = (count as f32).sqrt().ceil().clamp(1.0, 8.0) as u32;
    let rows = count.div_ceil(columns);
    let cell = (tw + MARGIN, th + LABEL + MARGIN);
    let mut sheet = RgbImage::from_pixel(
        columns * cell.0 + MARGIN,
        rows * cell.1 + MARGIN,
        Rgb([255, 255, 255]),
    );
    for (i, tile) in tiles.iter().enumerate() {
        let (col, row) = (i as u32 % columns, i as u32 / columns);
        let (x, y) = (MARGIN + col * cell.0, MARGIN + row * cell.1);
        let small = imageops::resize(*tile, tw, th, imageops::FilterType::Triangle);
        imageops::replace(&mut sheet, &small, i64::from(x), i64::from(y));
        if let Some((top, bottom)) = labels.get(i) {
            let chars = (tw / 8) as usize;
            draw_text(&mut sheet, x, y + th + 2, top, chars);
            draw_text(&mut sheet, x, y + th + 12, bottom, chars);
        }
    }
    sheet
}

/// Writes `text` (at most `max_chars`, non-ASCII as `?`) in black with its top-left at `x, y`.
pub fn draw_text(image: &mut RgbImage, x: u32, y: u32, text: &str, max_chars: usize) {
    for (i, c) in text.chars().take(max_chars).enumerate() {
        let code = if c.is_ascii() && !c.is_ascii_control() {
            c as usize
        } else {
            usize::from(b'?')
        };
        for (dy, bits) in BASIC_LEGACY[code].iter().enumerate() {
            for dx in 0..8u32 {
                // Bit 0 is the leftmost pixel of the glyph's row.
                if bits & (1 << dx) != 0 {
                    let (px, py) = (x + i as u32 * 8 + dx, y + dy as u32);
                    if px < image.width() && py < image.height() {
                        image.put_pixel(px, py, Rgb([0, 0, 0]));
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ndarray::{array, Array4};

    #[test]
    // The expected values as PyTorch printed them (float32 repr: more digits than f32 keeps).
    #[allow(clippy::excessive_precision)]
    fn bicubic_matches_pytorch() {
        // x = torch.arange(12.).reshape(1, 1, 3, 4) ** 1.5; F.interpolate(x, size=(7, 5),
        // mode="bicubic", align_corners=False).clamp(min=0), PyTorch 2 (float32): a
        // non-integer scale on each axis, undershoot at the corner clamped. Tolerance 1e-6 of
        // the map's largest value (39): the taps are f32 sums in another order than PyTorch's.
        let x = Array2::from_shape_fn((3, 4), |(r, c)| ((r * 4 + c) as f32).powf(1.5));
        let up = upsample_bicubic(x.view(), 7, 5);
        let want = [
            [0.0, 0.0, 0.5732692, 2.3282828, 3.8736095],
            [0.70021206, 1.4534609, 2.9130914, 4.9708118, 6.7263236],
            [2.9761679, 4.3522272, 6.5015545, 9.1003885, 11.229712],
            [7.806796, 9.905324, 12.878359, 16.151352, 18.752525],
            [14.74309, 17.34107, 20.922375, 24.73771, 27.727842],
            [20.703972, 23.534489, 27.42848, 31.55425, 34.77314],
            [23.953077, 26.950253, 31.057304, 35.38386, 38.748852],
        ];
        for (y, row) in want.iter().enumerate() {
            for (x, &v) in row.iter().enumerate() {
                let got = up[[y, x]];
                assert!((got - v).abs() <= 1e-6 * 39.0, "{y},{x}: {got} vs {v}");
            }
        }
        // Same size: the identity.
        let m = array![[0.25f32, 0.5], [0.75, 1.0]];
        assert_eq!(upsample_bicubic(m.view(), 2, 2), m);
    }

    #[test]
    fn jet_runs_from_blue_to_red() {
        assert_eq!(jet(0.0), [0, 0, 127]);
        assert_eq!(jet(0.5), [127, 255, 127]);
        assert_eq!(jet(1.0), [127, 0, 0]);
    }

    #[test]
    fn names_are_safe_and_ordered() {
        let tokens = [
            TokenLabel {
                index: 0,
                text: "<start>".into(),
            },
            TokenLabel {
                index: 12,
                text: "don't/../".into(),
            },
            TokenLabel {
                index: 3,
                text: "🙂".into(),
            },
        ];
        let names = file_names("elite-42-0", &tokens);
        assert_eq!(
            names.tokens,
            [
                "elite-42-0-00-start.png",
                "elite-42-0-12-don_t.png",
                "elite-42-0-03-x.png"
            ]
        );
        assert_eq!(names.sheet, "elite-42-0-sheet.png");
    }

    #[test]
    fn renders_every_token_the_gate_and_a_labelled_sheet() {
        let picture = RgbImage::from_pixel(64, 32, Rgb([100, 100, 100]));
        let mut tokens = Array4::<f32>::zeros((1, 3, 8, 4));
        tokens[[0, 1, 2, 3]] = 0.5;
        let maps = AttentionMaps {
            tokens,
            gate: Array4::from_elem((1, 1, 8, 4), 1.0),
            first_step: 1,
            last_step: 1,
        };
        let labels = [0, 1].map(|index| TokenLabel {
            index,
            text: format!("t{index}"),
        });
        let out = render(&picture, &maps, 0, &labels, "S").unwrap();
        assert_eq!(out.tokens.len(), 2);
        assert_eq!(out.tokens[1].dimensions(), (64, 32));
        // A full gate is dark red everywhere; a flat map stays the image.
        assert_eq!(out.placeholder.get_pixel(5, 5).0, [127, 0, 0]);
        assert_eq!(out.tokens[0].get_pixel(5, 5).0, [100, 100, 100]);
        // Its hottest pixel (latent row 2, column 3: image x ≈ 56, y ≈ 10) is red.
        let hot = out.tokens[1].get_pixel(60, 10).0;
        assert!(hot[0] > 100 && hot[2] < 60, "{hot:?}");
        // 4 tiles (image, 2 tokens, gate): 2×2 of 192×96 with labels.
        assert_eq!(out.sheet.dimensions(), (2 * 196 + 4, 2 * (96 + 22 + 4) + 4));
        let black = out.sheet.pixels().filter(|p| p.0 == [0, 0, 0]).count();
        assert!(black > 50, "labels drawn: {black} black pixels");
        assert!(matches!(
            render(&picture, &maps, 1, &labels, "S"),
            Err(HeatmapError::NoImage { .. })
        ));
    }
}

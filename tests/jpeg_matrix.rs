//! Every JPEG of the matrix in `tests/fixtures/jpeg/` decodes exactly as Pillow 13 decodes it.
//!
//! `matrix.json` is written by `export/jpeg_matrix.py` from Pillow's own decoding
//! (`ImageOps.exif_transpose(Image.open(f)).convert("RGB")`), never by this code: per file the
//! sha256 and shape of Pillow's uint8 `[H, W, 3]` pixels, or the error Pillow raised.
//! Tolerance: none. The sha256 of our pixels must be Pillow's; where Pillow fails we must fail.
//! The one file where we knowingly differ from Pillow is listed in `KNOWN_DIFFERENCES` with
//! the reason (the README's "Differences from the official code" says the same).

use std::path::PathBuf;

use elite_ort::image_decode::{self, DecodeError, ImageLimits};
use serde::Deserialize;
use sha2::{Digest, Sha256};

#[derive(Debug, Deserialize)]
struct Matrix {
    files: Vec<Entry>,
}

#[derive(Debug, Deserialize)]
struct Entry {
    file: String,
    what: String,
    rgb_shape: Option<[usize; 3]>,
    rgb_sha256: Option<String>,
    pillow_error: Option<String>,
}

/// Files Pillow decodes and we refuse, with why.
const KNOWN_DIFFERENCES: [(&str, &str); 1] = [(
    "cat_lossless.jpg",
    "lossless JPEG (SOF3) needs libjpeg-turbo 3; the vendored decoder is libjpeg-turbo 2.1's",
)];

fn dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/jpeg")
}

fn matrix() -> Matrix {
    let text = std::fs::read_to_string(dir().join("matrix.json")).expect("matrix.json");
    serde_json::from_str(&text).expect("matrix.json parses")
}

fn sha256_hex(bytes: &[u8]) -> String {
    Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

#[test]
fn every_jpeg_decodes_exactly_as_pillow() {
    let matrix = matrix();
    assert!(matrix.files.len() >= 40, "the matrix lost files");
    let mut failures = Vec::new();
    for entry in &matrix.files {
        let path = dir().join(&entry.file);
        let ours = image_decode::load_image(&path, &ImageLimits::default());
        let known = KNOWN_DIFFERENCES.iter().find(|(f, _)| *f == entry.file);
        let verdict = match (&ours, &entry.pillow_error, known) {
            (Err(e), None, Some((_, why))) => {
                println!("{}: refused as documented ({why}): {e}", entry.file);
                continue;
            }
            (Ok(_), _, Some(_)) => "decodes now: remove it from KNOWN_DIFFERENCES".to_string(),
            (Err(_), Some(_), Some(_)) => "Pillow fails too: not a difference".to_string(),
            (Err(e), Some(pillow), None) => {
                println!("{}: both fail. Pillow: {pillow}. Ours: {e}", entry.file);
                continue;
            }
            (Ok(_), Some(pillow), None) => format!("we decode it, Pillow fails: {pillow}"),
            (Err(e), None, None) => format!("we fail, Pillow decodes it: {e}"),
            (Ok(decoded), None, None) => {
                let rgb = &decoded.rgb;
                let shape = [rgb.height() as usize, rgb.width() as usize, 3];
                let sha = sha256_hex(rgb.as_raw());
                if Some(shape) == entry.rgb_shape && Some(&sha) == entry.rgb_sha256.as_ref() {
                    println!("{}: identical to Pillow ({})", entry.file, entry.what);
                    continue;
                }
                format!(
                    "pixels differ: ours {shape:?} {sha}, Pillow {:?} {:?}",
                    entry.rgb_shape, entry.rgb_sha256
                )
            }
        };
        failures.push(format!("{} ({}): {verdict}", entry.file, entry.what));
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn refused_jpegs_say_why() {
    let path = dir().join("cat_lossless.jpg");
    let err = image_decode::load_image(&path, &ImageLimits::default()).unwrap_err();
    assert!(
        matches!(err, DecodeError::UnsupportedFeature { .. }),
        "{err}"
    );
    let msg = err.to_string();
    assert!(
        msg.contains("cat_lossless.jpg: image") && msg.contains("lossless"),
        "{msg}"
    );
    for (file, needle) in [
        ("cat_truncated.jpg", "truncated"),
        ("cat_progressive_truncated.jpg", "truncated"),
        ("cat_precision12.jpg", "precision 12"),
    ] {
        let err = image_decode::load_image(&dir().join(file), &ImageLimits::default())
            .unwrap_err()
            .to_string();
        assert!(err.contains(file) && err.contains(needle), "{file}: {err}");
    }
}

#[test]
fn a_raised_pixel_limit_still_decodes_progressive_files() {
    // The limit also caps libjpeg's coefficient store; an unbounded limit must not turn into a
    // negative cap (which would ask libjpeg for a backing store it does not have).
    let path = dir().join("cat_cmyk_progressive.jpg");
    let unlimited = ImageLimits {
        max_pixels: u64::MAX,
    };
    let a = image_decode::load_image(&path, &unlimited).expect("decodes");
    let b = image_decode::load_image(&path, &ImageLimits::default()).expect("decodes");
    assert_eq!(a.rgb, b.rgb);
}

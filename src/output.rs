//! Writing results: uint8 conversion, PNG encoding through a temporary file and an atomic rename.
//!
//! Every output path is decided and checked before any model runs, so a run that would clobber a
//! file or write into a missing directory fails in milliseconds, not after the denoising loop. A
//! PNG is encoded in memory, written to a hidden temporary file beside its destination, then
//! moved into place: an interrupted run leaves no half-written image under the final name.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

use image::{ImageFormat, RgbImage};
use ndarray::ArrayView3;

#[derive(Debug, thiserror::Error)]
pub enum OutputError {
    #[error("{path}: already exists (pass --force to overwrite)")]
    Exists { path: PathBuf },
    #[error("{path}: output directory does not exist")]
    NoDirectory { path: PathBuf },
    #[error("{path}: cannot write here: {source}")]
    NotWritable {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: output must be a .png file or a directory")]
    NotPng { path: PathBuf },
    #[error("{path}: writing failed: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("PNG encoding failed: {0}")]
    Encode(#[from] image::ImageError),
}

/// `round(clamp(x / 2 + 0.5, 0, 1) · 255)` per element, `[3, H, W]` in [-1, 1] → RGB8.
///
/// Same f32 arithmetic as the reference (`(x / 2 + 0.5).clamp(0, 1)`, `* 255`, numpy's
/// round-half-to-even), so an identical decoder output gives identical bytes.
pub fn to_rgb8(decoded: ArrayView3<f32>) -> RgbImage {
    let (_, height, width) = decoded.dim();
    RgbImage::from_fn(width as u32, height as u32, |x, y| {
        let px = |c: usize| {
            let v = (decoded[[c, y as usize, x as usize]] / 2.0 + 0.5).clamp(0.0, 1.0);
            (v * 255.0).round_ties_even() as u8
        };
        image::Rgb([px(0), px(1), px(2)])
    })
}

/// The files a run will write: `--out x.png` for one image (`x-0.png`, `x-1.png`, … for
/// several), or a directory, which gets `elite-<seed>-<i>.png`. Checked up front.
pub fn plan_outputs(
    out: &Path,
    count: usize,
    seed: u64,
    force: bool,
) -> Result<Vec<PathBuf>, OutputError> {
    let paths = if out.is_dir() || out.as_os_str().to_string_lossy().ends_with('/') {
        (0..count)
            .map(|i| out.join(format!("elite-{seed}-{i}.png")))
            .collect()
    } else {
        let is_png = out
            .extension()
            .is_some_and(|e| e.eq_ignore_ascii_case("png"));
        if !is_png {
            return Err(OutputError::NotPng {
                path: out.to_path_buf(),
            });
        }
        if count == 1 {
            vec![out.to_path_buf()]
        } else {
            let stem = out.file_stem().unwrap_or_default().to_string_lossy();
            (0..count)
                .map(|i| out.with_file_name(format!("{stem}-{i}.png")))
                .collect()
        }
    };
    for path in &paths {
        check_destination(path, force)?;
    }
    Ok(paths)
}

fn parent_dir(path: &Path) -> &Path {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    }
}

/// The destination's directory exists and accepts a file; the file itself is absent or `force`.
pub fn check_destination(path: &Path, force: bool) -> Result<(), OutputError> {
    let dir = parent_dir(path);
    if !dir.is_dir() {
        return Err(OutputError::NoDirectory {
            path: dir.to_path_buf(),
        });
    }
    if path.exists() && !force {
        return Err(OutputError::Exists {
            path: path.to_path_buf(),
        });
    }
    let probe = temp_path(path);
    fs::File::create(&probe)
        .and_then(|_| fs::remove_file(&probe))
        .map_err(|source| OutputError::NotWritable {
            path: dir.to_path_buf(),
            source,
        })
}

fn temp_path(path: &Path) -> PathBuf {
    let name = path.file_name().unwrap_or_default().to_string_lossy();
    parent_dir(path).join(format!(".{name}.{}.tmp", std::process::id()))
}

/// Writes `bytes` to `path` through a temporary file; without `force` it never replaces a file
/// (the final step is a hard link, which fails if the name exists).
pub fn write_atomic(path: &Path, bytes: &[u8], force: bool) -> Result<(), OutputError> {
    let tmp = temp_path(path);
    let io = |source| OutputError::Io {
        path: path.to_path_buf(),
        source,
    };
    let result = (|| {
        let mut file = fs::File::create(&tmp).map_err(io)?;
        file.write_all(bytes).map_err(io)?;
        file.sync_all().map_err(io)?;
        drop(file);
        if force {
            fs::rename(&tmp, path).map_err(io)
        } else {
            fs::hard_link(&tmp, path).map_err(|e| match e.kind() {
                std::io::ErrorKind::AlreadyExists => OutputError::Exists {
                    path: path.to_path_buf(),
                },
                _ => io(e),
            })
        }
    })();
    let _ = fs::remove_file(&tmp); // gone already after a rename
    result
}

/// Encodes a PNG in memory and writes it atomically.
pub fn write_png(path: &Path, img: &RgbImage, force: bool) -> Result<(), OutputError> {
    let mut bytes = Vec::new();
    img.write_to(&mut std::io::Cursor::new(&mut bytes), ImageFormat::Png)?;
    write_atomic(path, &bytes, force)
}

#[cfg(test)]
mod tests {
    use super::*;
    use ndarray::Array3;

    #[test]
    fn rgb8_rounds_half_to_even_and_clamps() {
        // x/2+0.5 = 0.5 → 127.5 → 128 (even); -3 → 0; 3 → 255.
        let a = Array3::from_shape_vec((3, 1, 1), vec![0.0f32, -3.0, 3.0]).unwrap();
        let img = to_rgb8(a.view());
        assert_eq!(img.get_pixel(0, 0).0, [128, 0, 255]);
    }

    #[test]
    fn plans_numbered_files_and_refuses_overwrite() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("a.png");
        let paths = plan_outputs(&out, 2, 7, false).unwrap();
        assert_eq!(paths[1], dir.path().join("a-1.png"));
        fs::write(&out, b"x").unwrap();
        let err = plan_outputs(&out, 1, 7, false).unwrap_err();
        assert!(err.to_string().contains("--force"), "{err}");
        assert!(plan_outputs(&out, 1, 7, true).is_ok());
        let dirs = plan_outputs(dir.path(), 1, 7, false).unwrap();
        assert_eq!(dirs[0], dir.path().join("elite-7-0.png"));
        assert!(matches!(
            plan_outputs(&dir.path().join("a.jpg"), 1, 7, false),
            Err(OutputError::NotPng { .. })
        ));
        assert!(matches!(
            plan_outputs(&dir.path().join("nope/a.png"), 1, 7, false),
            Err(OutputError::NoDirectory { .. })
        ));
    }

    #[test]
    fn atomic_write_does_not_clobber() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x.png");
        write_atomic(&path, b"one", false).unwrap();
        assert!(matches!(
            write_atomic(&path, b"two", false),
            Err(OutputError::Exists { .. })
        ));
        assert_eq!(fs::read(&path).unwrap(), b"one");
        write_atomic(&path, b"two", true).unwrap();
        assert_eq!(fs::read(&path).unwrap(), b"two");
        let leftovers = fs::read_dir(dir.path()).unwrap().count();
        assert_eq!(leftovers, 1, "temporary files left behind");
    }
}

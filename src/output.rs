//! Writing results: uint8 conversion, PNG encoding through a temporary file and an atomic rename.
//!
//! Every output path is decided and checked before any model runs, so a run that would clobber a
//! file or write into a missing directory fails in milliseconds, not after the denoising loop.
//! Outputs are written as one transaction ([`OutputSet`]): each file is encoded in memory and
//! written to a hidden temporary beside its destination, and only when all are written are they
//! moved into place, so a failed or interrupted run leaves no new file under a final name. A
//! process killed outright (SIGKILL) can leave only `.elite-<pid>-<n>.tmp` files, which the next
//! run removes ([`crate::files::remove_stale_temporaries`]).

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use image::{ImageFormat, RgbImage};
use ndarray::ArrayView3;

#[derive(Debug, thiserror::Error)]
pub enum OutputError {
    #[error("{path}: already exists (pass --force to overwrite)")]
    Exists { path: PathBuf },
    #[error("{path}: output directory does not exist")]
    NoDirectory { path: PathBuf },
    #[error("{path}: is a file, not a directory, so no output can be written under it")]
    NotADirectory { path: PathBuf },
    #[error("{path}: is a directory; give a .png file name or write into the directory")]
    IsDirectory { path: PathBuf },
    #[error("{path}: already exists as a dangling symbolic link (pass --force to replace it)")]
    DanglingLink { path: PathBuf },
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

/// How many images one job of a run writes, and its seed (for directory names).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct JobOutputs {
    pub seed: u64,
    pub count: usize,
}

/// The files a run will write, per job, checked up front.
///
/// - One job: `--out x.png` for one image (`x-0.png`, `x-1.png`, … for several), or a
///   directory, which gets `elite-<seed>-<i>.png`.
/// - Several jobs (several prompts or concepts): `x-<j>.png` for one image per job
///   (`x-<j>-<i>.png` for several), or in a directory `elite-<seed>-<j>-<i>.png`.
pub fn plan_outputs(
    out: &Path,
    jobs: &[JobOutputs],
    force: bool,
) -> Result<Vec<Vec<PathBuf>>, OutputError> {
    let is_dir = out.is_dir() || out.as_os_str().to_string_lossy().ends_with('/');
    if !is_dir
        && !out
            .extension()
            .is_some_and(|e| e.eq_ignore_ascii_case("png"))
    {
        return Err(OutputError::NotPng {
            path: out.to_path_buf(),
        });
    }
    let stem = out.file_stem().unwrap_or_default().to_string_lossy();
    let several = jobs.len() > 1;
    let name = |j: usize, job: &JobOutputs, i: usize| -> PathBuf {
        match (is_dir, several, job.count) {
            (true, false, _) => out.join(format!("elite-{}-{i}.png", job.seed)),
            (true, true, _) => out.join(format!("elite-{}-{j}-{i}.png", job.seed)),
            (false, false, 1) => out.to_path_buf(),
            (false, false, _) => out.with_file_name(format!("{stem}-{i}.png")),
            (false, true, 1) => out.with_file_name(format!("{stem}-{j}.png")),
            (false, true, _) => out.with_file_name(format!("{stem}-{j}-{i}.png")),
        }
    };
    let paths: Vec<Vec<PathBuf>> = jobs
        .iter()
        .enumerate()
        .map(|(j, job)| (0..job.count).map(|i| name(j, job, i)).collect())
        .collect();
    for path in paths.iter().flatten() {
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

/// The destination's directory exists and accepts a file; the file itself is absent (a dangling
/// symbolic link counts as present) or `force` and not a directory.
pub fn check_destination(path: &Path, force: bool) -> Result<(), OutputError> {
    let dir = parent_dir(path);
    match fs::metadata(dir) {
        Ok(m) if m.is_dir() => {}
        Ok(_) => {
            return Err(OutputError::NotADirectory {
                path: dir.to_path_buf(),
            })
        }
        Err(_) => {
            return Err(OutputError::NoDirectory {
                path: dir.to_path_buf(),
            })
        }
    }
    if let Ok(existing) = fs::symlink_metadata(path) {
        if fs::metadata(path).is_ok_and(|m| m.is_dir()) {
            return Err(OutputError::IsDirectory {
                path: path.to_path_buf(),
            });
        }
        if !force {
            return Err(if existing.file_type().is_symlink() && !path.exists() {
                OutputError::DanglingLink {
                    path: path.to_path_buf(),
                }
            } else {
                OutputError::Exists {
                    path: path.to_path_buf(),
                }
            });
        }
    }
    let probe = temp_path(dir);
    fs::File::create(&probe)
        .and_then(|_| fs::remove_file(&probe))
        .map_err(|source| OutputError::NotWritable {
            path: dir.to_path_buf(),
            source,
        })
}

/// Prefix of the temporary files written beside outputs: `.elite-<pid>-<n>.tmp`. Short and
/// independent of the destination's name, so that a destination name near the file system's
/// 255-byte limit still has a temporary.
const TEMP_PREFIX: &str = ".elite-";
const TEMP_SUFFIX: &str = ".tmp";

fn temp_path(dir: &Path) -> PathBuf {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    dir.join(format!(
        "{TEMP_PREFIX}{}-{n}{TEMP_SUFFIX}",
        std::process::id()
    ))
}

/// Outputs written as one transaction: every file goes to a temporary beside its destination
/// first ([`OutputSet::stage`]); [`OutputSet::commit`] moves them all into place, and a set
/// dropped without a commit (an error, an interruption) removes its temporaries, so that a
/// failed run leaves no new file behind.
#[derive(Debug)]
pub struct OutputSet {
    force: bool,
    staged: Vec<(PathBuf, PathBuf)>,
}

impl OutputSet {
    /// Without `force`, committing never replaces an existing file.
    pub fn new(force: bool) -> OutputSet {
        OutputSet {
            force,
            staged: Vec::new(),
        }
    }

    /// Writes `bytes` (synced) to a temporary beside `dest`.
    pub fn stage(&mut self, dest: &Path, bytes: &[u8]) -> Result<(), OutputError> {
        let tmp = temp_path(parent_dir(dest));
        let io = |source| OutputError::Io {
            path: dest.to_path_buf(),
            source,
        };
        // Registered before it exists, so that a failed write is cleaned up too.
        self.staged.push((tmp.clone(), dest.to_path_buf()));
        let mut file = fs::File::create(&tmp).map_err(io)?;
        file.write_all(bytes).map_err(io)?;
        file.sync_all().map_err(io)
    }

    /// Encodes a PNG in memory and stages it.
    pub fn stage_png(&mut self, dest: &Path, img: &RgbImage) -> Result<(), OutputError> {
        let mut bytes = Vec::new();
        img.write_to(&mut std::io::Cursor::new(&mut bytes), ImageFormat::Png)?;
        self.stage(dest, &bytes)
    }

    /// Moves every staged file into place. Without `force` each is a hard link (which fails if
    /// the name exists) and, if one fails, the files this commit already placed are removed
    /// again; with `force` each is a rename over the old file.
    pub fn commit(mut self) -> Result<Vec<PathBuf>, OutputError> {
        let staged = std::mem::take(&mut self.staged);
        let mut placed: Vec<PathBuf> = Vec::with_capacity(staged.len());
        let mut result = Ok(());
        for (tmp, dest) in &staged {
            let moved = if self.force {
                fs::rename(tmp, dest)
            } else {
                fs::hard_link(tmp, dest)
            };
            match moved {
                Ok(()) => placed.push(dest.clone()),
                Err(e) => {
                    result = Err(match e.kind() {
                        std::io::ErrorKind::AlreadyExists => {
                            OutputError::Exists { path: dest.clone() }
                        }
                        _ => OutputError::Io {
                            path: dest.clone(),
                            source: e,
                        },
                    });
                    break;
                }
            }
        }
        for (tmp, _) in &staged {
            let _ = fs::remove_file(tmp); // gone already after a rename
        }
        match result {
            Ok(()) => Ok(placed),
            Err(e) => {
                if !self.force {
                    for dest in &placed {
                        let _ = fs::remove_file(dest);
                    }
                }
                Err(e)
            }
        }
    }
}

impl Drop for OutputSet {
    fn drop(&mut self) {
        for (tmp, _) in &self.staged {
            let _ = fs::remove_file(tmp);
        }
    }
}

/// Writes `bytes` to `path` through a temporary file; without `force` it never replaces a file.
pub fn write_atomic(path: &Path, bytes: &[u8], force: bool) -> Result<(), OutputError> {
    let mut set = OutputSet::new(force);
    set.stage(path, bytes)?;
    set.commit().map(|_| ())
}

/// Encodes a PNG in memory and writes it atomically.
pub fn write_png(path: &Path, img: &RgbImage, force: bool) -> Result<(), OutputError> {
    let mut set = OutputSet::new(force);
    set.stage_png(path, img)?;
    set.commit().map(|_| ())
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

    fn one(seed: u64, count: usize) -> Vec<JobOutputs> {
        vec![JobOutputs { seed, count }]
    }

    #[test]
    fn plans_numbered_files_and_refuses_overwrite() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("a.png");
        let paths = plan_outputs(&out, &one(7, 2), false).unwrap();
        assert_eq!(paths[0][1], dir.path().join("a-1.png"));
        fs::write(&out, b"x").unwrap();
        let err = plan_outputs(&out, &one(7, 1), false).unwrap_err();
        assert!(err.to_string().contains("--force"), "{err}");
        assert!(plan_outputs(&out, &one(7, 1), true).is_ok());
        let dirs = plan_outputs(dir.path(), &one(7, 1), false).unwrap();
        assert_eq!(dirs[0][0], dir.path().join("elite-7-0.png"));
        assert!(matches!(
            plan_outputs(&dir.path().join("a.jpg"), &one(7, 1), false),
            Err(OutputError::NotPng { .. })
        ));
        assert!(matches!(
            plan_outputs(&dir.path().join("nope/a.png"), &one(7, 1), false),
            Err(OutputError::NoDirectory { .. })
        ));
    }

    #[test]
    fn several_jobs_number_files_by_job_then_image() {
        let dir = tempfile::tempdir().unwrap();
        let jobs = [
            JobOutputs { seed: 1, count: 1 },
            JobOutputs { seed: 1, count: 1 },
        ];
        let paths = plan_outputs(&dir.path().join("b.png"), &jobs, false).unwrap();
        assert_eq!(paths[1], vec![dir.path().join("b-1.png")]);
        let jobs = [
            JobOutputs { seed: 1, count: 2 },
            JobOutputs { seed: 1, count: 2 },
        ];
        let paths = plan_outputs(&dir.path().join("b.png"), &jobs, false).unwrap();
        assert_eq!(paths[1][0], dir.path().join("b-1-0.png"));
        let paths = plan_outputs(dir.path(), &jobs, false).unwrap();
        assert_eq!(paths[0][1], dir.path().join("elite-1-0-1.png"));
    }

    #[test]
    fn destinations_that_cannot_work_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("file");
        fs::write(&file, b"x").unwrap();
        let err = check_destination(&file.join("o.png"), false).unwrap_err();
        assert!(matches!(err, OutputError::NotADirectory { .. }), "{err}");
        let link = dir.path().join("dangling.png");
        std::os::unix::fs::symlink(dir.path().join("nowhere"), &link).unwrap();
        let err = check_destination(&link, false).unwrap_err();
        assert!(err.to_string().contains("dangling"), "{err}");
        let long = dir.path().join(format!("{}.png", "x".repeat(251)));
        check_destination(&long, false).expect("a 255-byte name has a temporary");
        write_atomic(&long, b"ok", false).unwrap();
    }

    #[test]
    fn an_uncommitted_set_leaves_nothing_and_a_commit_is_all_or_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let (a, b) = (dir.path().join("a.png"), dir.path().join("b.png"));
        let mut set = OutputSet::new(false);
        set.stage(&a, b"a").unwrap();
        drop(set);
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 0);

        fs::write(&b, b"old").unwrap();
        let mut set = OutputSet::new(false);
        set.stage(&a, b"a").unwrap();
        set.stage(&b, b"b").unwrap();
        assert!(matches!(set.commit(), Err(OutputError::Exists { .. })));
        assert!(!a.exists(), "a partial commit was left behind");
        assert_eq!(fs::read(&b).unwrap(), b"old");
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 1);
    }

    #[test]
    fn stale_temporaries_of_dead_processes_are_removed() {
        let dir = tempfile::tempdir().unwrap();
        // pid 4194305 is above Linux's pid_max limit (2^22): never alive.
        let dead = dir.path().join(".elite-4194305-0.tmp");
        let alive = dir
            .path()
            .join(format!(".elite-{}-9.tmp", std::process::id()));
        let other = dir.path().join(".elite-notes.tmp");
        for f in [&dead, &alive, &other] {
            fs::write(f, b"x").unwrap();
        }
        assert_eq!(crate::files::remove_stale_temporaries(dir.path()).len(), 1);
        assert!(!dead.exists() && alive.exists() && other.exists());
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

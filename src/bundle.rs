//! The model bundle on disk: elite.json manifest (strict serde), file presence and sha256 checks.
//!
//! [`Bundle::open`] checks everything that can be checked without ONNX Runtime: the manifest
//! (DESIGN.md §2; unknown fields rejected, `format_version` 1), that every required file is
//! listed and present with the listed size, and optionally (streamed) sha256 checksums.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{self, Read};
use std::path::{Path, PathBuf};

use serde::Deserialize;
use sha2::{Digest, Sha256};

use crate::cache::VerifiedFiles;
use crate::graphs::Graph;

/// diffusers' `beta_schedule`: the scheduler's own enum, deserialised from the same names.
pub use crate::scheduler::BetaSchedule;

/// The manifest's file name inside a bundle.
pub const MANIFEST_FILE: &str = "elite.json";
/// The tokenizer's file name inside a bundle.
pub const TOKENIZER_FILE: &str = "tokenizer.json";
/// The only manifest format this runtime reads.
pub const FORMAT_VERSION: u64 = 1;

#[derive(Debug, thiserror::Error)]
pub enum BundleError {
    #[error("model bundle {dir} is not a directory")]
    NotADirectory { dir: PathBuf },

    #[error("{path}: manifest not found (a bundle directory holds elite.json, tokenizer.json and six .onnx graphs)")]
    ManifestMissing { path: PathBuf },

    #[error("{path}: cannot read: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: io::Error,
    },

    #[error("{path}: invalid manifest at line {line}, column {column}: {message}")]
    ManifestParse {
        path: PathBuf,
        line: usize,
        column: usize,
        message: String,
    },

    #[error(
        "{path}: unsupported format_version {found}: this runtime reads format_version {expected} \
         (re-export the bundle with a matching exporter)"
    )]
    UnsupportedFormatVersion {
        path: PathBuf,
        found: String,
        expected: u64,
    },

    #[error("{path}: invalid `{field}`: {reason}")]
    InvalidField {
        path: PathBuf,
        field: String,
        reason: String,
    },

    #[error("{path}: required file `{file}` is not listed in `files`")]
    NotListed { path: PathBuf, file: &'static str },

    #[error("{path}: listed in {manifest} but missing")]
    FileMissing { path: PathBuf, manifest: PathBuf },

    #[error("{path}: size mismatch: {manifest} lists {expected} bytes, the file has {actual}")]
    SizeMismatch {
        path: PathBuf,
        manifest: PathBuf,
        expected: u64,
        actual: u64,
    },

    #[error(
        "{path}: sha256 mismatch: {manifest} lists {expected}, the file hashes to {actual} \
         (corrupt or modified; re-export or re-download the bundle)"
    )]
    ChecksumMismatch {
        path: PathBuf,
        manifest: PathBuf,
        expected: String,
        actual: String,
    },
}

/// Weight precision inside the graphs (their inputs and outputs are f32/i64 either way).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Precision {
    Fp32,
    Fp16,
}

/// Where the weights came from (informational, except `random_weights`).
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Source {
    pub unet: String,
    pub clip: String,
    pub global_mapper: String,
    pub local_mapper: String,
    pub exporter: String,
    /// True for test bundles with random weights: their images are noise by design.
    pub random_weights: bool,
}

/// Model dimensions.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Dims {
    /// `C_txt`: width of text embeddings (768 for SD v1).
    pub text_hidden: usize,
    /// `C_img`: width of CLIP vision features (1024 for ViT-L/14).
    pub image_hidden: usize,
    /// Side of the square CLIP input (224).
    pub image_size: usize,
    /// Side of the patch grid (16): local embeddings are `patch_grid²` tokens.
    pub patch_grid: usize,
    pub latent_channels: usize,
    /// Pixels per latent cell (8).
    pub vae_scale_factor: usize,
    /// Output height and width must be multiples of this (64).
    pub size_multiple: usize,
    /// Tokenizer length (77).
    pub max_tokens: usize,
}

/// Noise scheduler kind.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SchedulerKind {
    /// diffusers' LMSDiscreteScheduler.
    Lms,
}

/// The scheduler section of the manifest (diffusers config keys).
#[derive(Debug, Clone, Copy, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SchedulerSpec {
    pub kind: SchedulerKind,
    pub beta_start: f64,
    pub beta_end: f64,
    pub beta_schedule: BetaSchedule,
    pub num_train_timesteps: usize,
}

/// Generation defaults.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Defaults {
    pub steps: usize,
    pub guidance_scale: f64,
    /// λ for plain generation prompts.
    pub lambda_generate: f64,
    /// λ for editing prompts.
    pub lambda_edit: f64,
    /// Placeholder word in prompts (`S`).
    pub placeholder: String,
    pub height: usize,
    pub width: usize,
}

/// One file of the bundle as listed in the manifest.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileEntry {
    /// Lowercase hex sha256 of the file.
    pub sha256: String,
    /// Size in bytes.
    pub bytes: u64,
}

/// `elite.json`, exactly as DESIGN.md §2.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    pub format_version: u64,
    pub name: String,
    pub precision: Precision,
    pub source: Source,
    pub dims: Dims,
    /// CLIP layers feeding the mappers, in image_features order (24, 4, 8, 12, 16).
    pub clip_layers: Vec<usize>,
    pub image_mean: [f64; 3],
    pub image_std: [f64; 3],
    pub scheduler: SchedulerSpec,
    pub vae_scaling_factor: f64,
    pub defaults: Defaults,
    /// Every file of the bundle (graphs, external data, tokenizer) by file name.
    pub files: BTreeMap<String, FileEntry>,
}

/// Only `format_version`, read before the strict parse so that a newer format gets its own
/// error instead of "unknown field".
#[derive(Deserialize)]
struct VersionProbe {
    format_version: Option<serde_json::Value>,
}

impl Manifest {
    /// Parses and validates manifest text; `path` only names it in errors.
    pub fn from_json(text: &str, path: &Path) -> Result<Manifest, BundleError> {
        let parse_error = |e: serde_json::Error| BundleError::ManifestParse {
            path: path.to_path_buf(),
            line: e.line(),
            column: e.column(),
            message: strip_position(&e),
        };
        let probe: VersionProbe = serde_json::from_str(text).map_err(parse_error)?;
        match probe.format_version {
            None => {
                return Err(BundleError::InvalidField {
                    path: path.to_path_buf(),
                    field: "format_version".into(),
                    reason: format!("missing (expected {FORMAT_VERSION})"),
                })
            }
            Some(v) if v.as_u64() == Some(FORMAT_VERSION) => {}
            Some(v) => {
                return Err(BundleError::UnsupportedFormatVersion {
                    path: path.to_path_buf(),
                    found: v.to_string(),
                    expected: FORMAT_VERSION,
                })
            }
        }
        let manifest: Manifest = serde_json::from_str(text).map_err(parse_error)?;
        manifest.validate(path)?;
        Ok(manifest)
    }

    fn validate(&self, path: &Path) -> Result<(), BundleError> {
        let invalid = |field: &str, reason: String| BundleError::InvalidField {
            path: path.to_path_buf(),
            field: field.to_string(),
            reason,
        };
        let d = &self.dims;
        let positive = [
            ("dims.text_hidden", d.text_hidden),
            ("dims.image_hidden", d.image_hidden),
            ("dims.image_size", d.image_size),
            ("dims.patch_grid", d.patch_grid),
            ("dims.latent_channels", d.latent_channels),
            ("dims.vae_scale_factor", d.vae_scale_factor),
            ("dims.size_multiple", d.size_multiple),
            ("dims.max_tokens", d.max_tokens),
            (
                "scheduler.num_train_timesteps",
                self.scheduler.num_train_timesteps,
            ),
            ("defaults.steps", self.defaults.steps),
        ];
        for (field, value) in positive {
            if value == 0 {
                return Err(invalid(field, "must be positive".into()));
            }
        }
        if self.clip_layers.len() != 5 {
            return Err(invalid(
                "clip_layers",
                format!(
                    "expected 5 layers (image_features has 5), found {}",
                    self.clip_layers.len()
                ),
            ));
        }
        if let Some(s) = self
            .image_std
            .iter()
            .find(|s| !(s.is_finite() && **s > 0.0))
        {
            return Err(invalid(
                "image_std",
                format!("{s} is not a positive number"),
            ));
        }
        let s = &self.scheduler;
        if !(s.beta_start > 0.0 && s.beta_start < s.beta_end && s.beta_end < 1.0) {
            return Err(invalid(
                "scheduler",
                format!(
                    "expected 0 < beta_start < beta_end < 1, found {} and {}",
                    s.beta_start, s.beta_end
                ),
            ));
        }
        if !(self.vae_scaling_factor.is_finite() && self.vae_scaling_factor > 0.0) {
            return Err(invalid(
                "vae_scaling_factor",
                format!("{} is not a positive number", self.vae_scaling_factor),
            ));
        }
        for (field, size) in [
            ("defaults.height", self.defaults.height),
            ("defaults.width", self.defaults.width),
        ] {
            if size == 0 || size % d.size_multiple != 0 {
                return Err(invalid(
                    field,
                    format!("{size} is not a positive multiple of {}", d.size_multiple),
                ));
            }
        }
        if self.defaults.placeholder.trim().is_empty() {
            return Err(invalid("defaults.placeholder", "is empty".into()));
        }
        for (name, entry) in &self.files {
            if !is_plain_file_name(name) {
                return Err(invalid(
                    &format!("files.{name}"),
                    "must be a plain file name inside the bundle (no directories, no ..)".into(),
                ));
            }
            let hex_ok = entry.sha256.len() == 64
                && entry
                    .sha256
                    .bytes()
                    .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
            if !hex_ok {
                return Err(invalid(
                    &format!("files.{name}.sha256"),
                    format!("`{}` is not 64 lowercase hex digits", entry.sha256),
                ));
            }
        }
        Ok(())
    }
}

/// serde_json's message without its trailing " at line L column C" (reported separately).
fn strip_position(e: &serde_json::Error) -> String {
    let text = e.to_string();
    let suffix = format!(" at line {} column {}", e.line(), e.column());
    text.strip_suffix(&suffix).unwrap_or(&text).to_string()
}

fn is_plain_file_name(name: &str) -> bool {
    !name.is_empty()
        && name != "."
        && name != ".."
        && !name.contains(['/', '\\'])
        && !name.contains('\0')
}

/// The files a bundle must list and contain besides any others it lists.
pub fn required_files() -> impl Iterator<Item = &'static str> {
    Graph::ALL
        .into_iter()
        .map(Graph::file_name)
        .chain(std::iter::once(TOKENIZER_FILE))
}

/// A checked model bundle.
#[derive(Debug, Clone)]
pub struct Bundle {
    dir: PathBuf,
    manifest: Manifest,
}

impl Bundle {
    /// Opens the bundle in `dir`: parses `elite.json`, checks that every required file (the six
    /// graphs and tokenizer.json) is listed, that every listed file exists with the listed size,
    /// and, when `verify_checksums`, that its sha256 matches.
    pub fn open(dir: impl AsRef<Path>, verify_checksums: bool) -> Result<Bundle, BundleError> {
        let checksums = if verify_checksums {
            Checksums::Verify
        } else {
            Checksums::Skip
        };
        Bundle::open_checked(dir, &checksums)
    }

    /// [`Bundle::open`] with the checksum policy spelled out.
    pub fn open_checked(
        dir: impl AsRef<Path>,
        checksums: &Checksums,
    ) -> Result<Bundle, BundleError> {
        let dir = dir.as_ref().to_path_buf();
        if !dir.is_dir() {
            return Err(BundleError::NotADirectory { dir });
        }
        let manifest_path = dir.join(MANIFEST_FILE);
        let text = match std::fs::read_to_string(&manifest_path) {
            Ok(text) => text,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                return Err(BundleError::ManifestMissing {
                    path: manifest_path,
                })
            }
            Err(source) => {
                return Err(BundleError::Read {
                    path: manifest_path,
                    source,
                })
            }
        };
        let manifest = Manifest::from_json(&text, &manifest_path)?;
        for file in required_files() {
            if !manifest.files.contains_key(file) {
                return Err(BundleError::NotListed {
                    path: manifest_path,
                    file,
                });
            }
        }
        let mut stamps = match checksums {
            Checksums::VerifyCached(cache) => Some(VerifiedFiles::load(cache, &dir)),
            _ => None,
        };
        for (name, entry) in &manifest.files {
            let path = dir.join(name);
            let metadata = check_file(&path, entry, &manifest_path)?;
            let verify = match (checksums, &stamps) {
                (Checksums::Skip, _) => false,
                (_, Some(stamps)) => !stamps.is_verified(name, &metadata, &entry.sha256),
                (_, None) => true,
            };
            if verify {
                verify_checksum(&path, entry, &manifest_path)?;
                if let Some(stamps) = &mut stamps {
                    stamps.record(name, &metadata, &entry.sha256);
                }
            }
        }
        if let Some(stamps) = stamps {
            stamps.save();
        }
        Ok(Bundle { dir, manifest })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn manifest(&self) -> &Manifest {
        &self.manifest
    }

    /// Path of a graph's `.onnx` file (its external data, if any, sits beside it).
    pub fn graph_path(&self, graph: Graph) -> PathBuf {
        self.dir.join(graph.file_name())
    }

    /// What identifies a graph's contents: the manifest's sha256 of its `.onnx` file and, when
    /// listed, of its external data. None if the graph is not listed.
    pub fn content_id(&self, graph: Graph) -> Option<String> {
        let name = graph.file_name();
        let main = self.manifest.files.get(name)?;
        let mut id = format!("{name} {}", main.sha256);
        let data = format!("{name}.data");
        if let Some(entry) = self.manifest.files.get(&data) {
            id.push_str(&format!("\n{data} {}", entry.sha256));
        }
        Some(id)
    }

    pub fn tokenizer_path(&self) -> PathBuf {
        self.dir.join(TOKENIZER_FILE)
    }

    pub fn name(&self) -> &str {
        &self.manifest.name
    }

    pub fn precision(&self) -> Precision {
        self.manifest.precision
    }

    pub fn dims(&self) -> &Dims {
        &self.manifest.dims
    }

    pub fn clip_layers(&self) -> &[usize] {
        &self.manifest.clip_layers
    }

    pub fn image_mean(&self) -> [f64; 3] {
        self.manifest.image_mean
    }

    pub fn image_std(&self) -> [f64; 3] {
        self.manifest.image_std
    }

    pub fn scheduler(&self) -> &SchedulerSpec {
        &self.manifest.scheduler
    }

    pub fn vae_scaling_factor(&self) -> f64 {
        self.manifest.vae_scaling_factor
    }

    pub fn defaults(&self) -> &Defaults {
        &self.manifest.defaults
    }

    /// True for bundles with random weights, whose images are noise by design.
    pub fn random_weights(&self) -> bool {
        self.manifest.source.random_weights
    }
}

/// Whether [`Bundle::open_checked`] hashes the bundle's files.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Checksums {
    /// Sizes only.
    Skip,
    /// Hash every file.
    Verify,
    /// Hash the files that changed (size, mtime or inode) since they last matched, as recorded
    /// in this cache directory (see [`crate::cache`]).
    VerifyCached(PathBuf),
}

/// Checks that a listed file exists with the listed size; returns its metadata.
fn check_file(
    path: &Path,
    entry: &FileEntry,
    manifest: &Path,
) -> Result<std::fs::Metadata, BundleError> {
    let metadata = match std::fs::metadata(path) {
        Ok(m) if m.is_file() => m,
        Ok(_) => {
            return Err(BundleError::FileMissing {
                path: path.to_path_buf(),
                manifest: manifest.to_path_buf(),
            })
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            return Err(BundleError::FileMissing {
                path: path.to_path_buf(),
                manifest: manifest.to_path_buf(),
            })
        }
        Err(source) => {
            return Err(BundleError::Read {
                path: path.to_path_buf(),
                source,
            })
        }
    };
    if metadata.len() != entry.bytes {
        return Err(BundleError::SizeMismatch {
            path: path.to_path_buf(),
            manifest: manifest.to_path_buf(),
            expected: entry.bytes,
            actual: metadata.len(),
        });
    }
    Ok(metadata)
}

fn verify_checksum(path: &Path, entry: &FileEntry, manifest: &Path) -> Result<(), BundleError> {
    let actual = sha256_file(path).map_err(|source| BundleError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    if actual != entry.sha256 {
        return Err(BundleError::ChecksumMismatch {
            path: path.to_path_buf(),
            manifest: manifest.to_path_buf(),
            expected: entry.sha256.clone(),
            actual,
        });
    }
    Ok(())
}

/// Lowercase hex sha256 of a file, read in 1 MiB chunks.
pub fn sha256_file(path: &Path) -> io::Result<String> {
    let mut file = File::open(path)?;
    let mut hasher = Sha256::new();
    let mut buffer = vec![0u8; 1 << 20];
    loop {
        let n = file.read(&mut buffer)?;
        if n == 0 {
            break;
        }
        hasher.update(&buffer[..n]);
    }
    Ok(hasher
        .finalize()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    const FIXTURE: &str = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/runtime/bundle/elite.json"
    );

    fn fixture_text() -> String {
        std::fs::read_to_string(FIXTURE).unwrap()
    }

    fn edit(f: impl FnOnce(&mut serde_json::Value)) -> String {
        let mut value: serde_json::Value = serde_json::from_str(&fixture_text()).unwrap();
        f(&mut value);
        serde_json::to_string_pretty(&value).unwrap()
    }

    fn parse(text: &str) -> Result<Manifest, BundleError> {
        Manifest::from_json(text, Path::new("x/elite.json"))
    }

    #[test]
    fn fixture_manifest_parses() {
        let m = parse(&fixture_text()).unwrap();
        assert_eq!(m.format_version, 1);
        assert_eq!(m.precision, Precision::Fp32);
        assert_eq!(m.clip_layers, [24, 4, 8, 12, 16]);
        assert_eq!(m.scheduler.kind, SchedulerKind::Lms);
        assert_eq!(m.scheduler.beta_schedule, BetaSchedule::ScaledLinear);
        assert_eq!(m.scheduler.num_train_timesteps, 1000);
        assert_eq!(m.defaults.placeholder, "S");
        assert!((m.vae_scaling_factor - 0.18215).abs() < 1e-12);
        assert!(m.source.random_weights);
        assert_eq!(m.files.len(), 7);
    }

    #[test]
    fn unknown_field_is_rejected_with_its_position() {
        let text = edit(|v| {
            v["dims"]["extra_dim"] = 3.into();
        });
        let err = parse(&text).unwrap_err();
        let msg = err.to_string();
        assert!(
            matches!(err, BundleError::ManifestParse { line, .. } if line > 1),
            "{msg}"
        );
        assert!(
            msg.starts_with("x/elite.json: invalid manifest at line"),
            "{msg}"
        );
        assert!(msg.contains("unknown field `extra_dim`"), "{msg}");
    }

    #[test]
    fn format_version_is_checked_before_fields() {
        let text = edit(|v| {
            v["format_version"] = 2.into();
            v["new_in_v2"] = true.into();
        });
        let err = parse(&text).unwrap_err();
        assert!(
            matches!(&err, BundleError::UnsupportedFormatVersion { found, .. } if found == "2"),
            "{err}"
        );
        assert!(
            err.to_string().contains("unsupported format_version 2"),
            "{err}"
        );

        let text = edit(|v| {
            v.as_object_mut().unwrap().remove("format_version");
        });
        let err = parse(&text).unwrap_err().to_string();
        assert!(err.contains("invalid `format_version`: missing"), "{err}");
    }

    #[test]
    fn syntax_error_names_line_and_column() {
        let err = parse("{\n  \"format_version\": 1,\n  oops\n}").unwrap_err();
        assert!(
            matches!(
                err,
                BundleError::ManifestParse {
                    line: 3,
                    column: 3,
                    ..
                }
            ),
            "{err}"
        );
    }

    #[test]
    fn bad_values_are_rejected() {
        type Edit = fn(&mut serde_json::Value);
        let cases: [(Edit, &str); 5] = [
            (|v| v["precision"] = "int8".into(), "unknown variant `int8`"),
            (
                |v| v["clip_layers"] = serde_json::json!([24]),
                "invalid `clip_layers`",
            ),
            (
                |v| v["defaults"]["height"] = 500.into(),
                "invalid `defaults.height`",
            ),
            (
                |v| {
                    v["files"]["../evil.onnx"] =
                        serde_json::json!({"sha256": "0".repeat(64), "bytes": 1})
                },
                "invalid `files.../evil.onnx`",
            ),
            (
                |v| v["files"]["unet.onnx"]["sha256"] = "ABC".into(),
                "invalid `files.unet.onnx.sha256`",
            ),
        ];
        for (change, expected) in cases {
            let err = parse(&edit(change)).unwrap_err().to_string();
            assert!(err.contains(expected), "{err} (wanted {expected})");
        }
    }

    #[test]
    fn sha256_of_a_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("abc");
        std::fs::write(&path, b"abc").unwrap();
        assert_eq!(
            sha256_file(&path).unwrap(),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }
}

//! The model bundle on disk: elite.json manifest (strict serde, bounded values), file presence and sha256 checks.
//!
//! [`Bundle::open`] checks everything that can be checked without ONNX Runtime: the manifest
//! (DESIGN.md §2; unknown fields rejected, `format_version` 1, every value within the bounds
//! of [`crate::limits`]), that every required file is listed and present as a regular file of
//! the listed size, and optionally (streamed) sha256 checksums.
//!
//! The manifest is as untrusted as any input: its dimensions size every buffer the runtime
//! allocates, so each is bounded here, when the bundle opens (and `info` shows it), rather than
//! failing later as an allocation of terabytes or an ONNX Runtime kernel error.

use std::collections::{BTreeMap, BTreeSet};
use std::io::{self, Read};
use std::ops::RangeInclusive;
use std::path::{Path, PathBuf};

use serde::Deserialize;
use sha2::{Digest, Sha256};

use crate::cache::VerifiedFiles;
use crate::display::{escape, needs_escape};
use crate::files::{self, FileError, FileKind};
use crate::graphs::{Graph, CLIP_LAYERS};
use crate::limits;
use crate::tokenizer::MAX_TOKENS;

/// diffusers' `beta_schedule`: the scheduler's own enum, deserialised from the same names.
pub use crate::scheduler::{BetaSchedule, SchedulerKind};

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

    /// The manifest or a listed file is not a regular file, too large, or unreadable.
    #[error(transparent)]
    File(#[from] FileError),

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

    #[error("{path}: invalid `{}`: {}", escape(.field), escape(.reason))]
    InvalidField {
        path: PathBuf,
        field: String,
        reason: String,
    },

    /// A manifest value outside the bounds this runtime accepts (see [`crate::limits`]).
    #[error("{path}: `{}` is {value}, must be {rule}", escape(.field))]
    OutOfRange {
        path: PathBuf,
        field: String,
        value: String,
        rule: String,
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

impl Dims {
    /// Local embedding tokens, one per CLIP patch: `patch_grid²` (256).
    pub fn patches(&self) -> usize {
        self.patch_grid * self.patch_grid
    }

    /// CLIP vision tokens per layer: the class token and the patches (257).
    pub fn image_tokens(&self) -> usize {
        self.patches() + 1
    }

    /// The shape of the initial latents for `num_images` images of `height × width` pixels:
    /// `[num_images, latent_channels, height / vae_scale_factor, width / vae_scale_factor]`.
    pub fn latent_shape(&self, num_images: usize, height: usize, width: usize) -> [usize; 4] {
        [
            num_images,
            self.latent_channels,
            height / self.vae_scale_factor,
            width / self.vae_scale_factor,
        ]
    }
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

    /// Checks every value against the bounds in [`crate::limits`] and the rules that tie values
    /// together; the first violation is reported, naming the field, its value and the rule.
    fn validate(&self, path: &Path) -> Result<(), BundleError> {
        self.validate_dims(path)?;
        self.validate_scheduler(path)?;
        self.validate_image_statistics(path)?;
        self.validate_defaults(path)?;
        self.validate_files(path)
    }

    fn validate_dims(&self, path: &Path) -> Result<(), BundleError> {
        let d = &self.dims;
        within(
            path,
            "dims.text_hidden",
            d.text_hidden,
            1..=limits::MAX_HIDDEN,
        )?;
        within(
            path,
            "dims.image_hidden",
            d.image_hidden,
            1..=limits::MAX_HIDDEN,
        )?;
        within(
            path,
            "dims.image_size",
            d.image_size,
            1..=limits::MAX_CLIP_IMAGE_SIZE,
        )?;
        within(
            path,
            "dims.patch_grid",
            d.patch_grid,
            1..=limits::MAX_PATCH_GRID,
        )?;
        if !d.image_size.is_multiple_of(d.patch_grid) {
            return Err(out_of_range(
                path,
                "dims.image_size",
                d.image_size,
                format!(
                    "a multiple of dims.patch_grid ({}): CLIP's patches tile its input",
                    d.patch_grid
                ),
            ));
        }
        within(
            path,
            "dims.latent_channels",
            d.latent_channels,
            1..=limits::MAX_LATENT_CHANNELS,
        )?;
        within(
            path,
            "dims.vae_scale_factor",
            d.vae_scale_factor,
            1..=limits::MAX_VAE_SCALE_FACTOR,
        )?;
        within(
            path,
            "dims.size_multiple",
            d.size_multiple,
            1..=limits::MAX_IMAGE_SIDE,
        )?;
        if !d.size_multiple.is_multiple_of(d.vae_scale_factor) {
            return Err(out_of_range(
                path,
                "dims.size_multiple",
                d.size_multiple,
                format!(
                    "a multiple of dims.vae_scale_factor ({}): every output size must be \
                     whole latent cells",
                    d.vae_scale_factor
                ),
            ));
        }
        if d.max_tokens != MAX_TOKENS {
            return Err(out_of_range(
                path,
                "dims.max_tokens",
                d.max_tokens,
                format!("{MAX_TOKENS}: the CLIP tokenizer's fixed sequence length"),
            ));
        }
        if self.clip_layers.len() != CLIP_LAYERS {
            return Err(invalid_field(
                path,
                "clip_layers",
                format!(
                    "expected {CLIP_LAYERS} layers (image_features has {CLIP_LAYERS}), found {}",
                    self.clip_layers.len()
                ),
            ));
        }
        for (i, &layer) in self.clip_layers.iter().enumerate() {
            if layer > limits::MAX_CLIP_LAYER || self.clip_layers[..i].contains(&layer) {
                return Err(invalid_field(
                    path,
                    "clip_layers",
                    format!(
                        "layer {layer} must be a distinct CLIP layer index in 0..={}",
                        limits::MAX_CLIP_LAYER
                    ),
                ));
            }
        }
        Ok(())
    }

    fn validate_scheduler(&self, path: &Path) -> Result<(), BundleError> {
        let s = &self.scheduler;
        within(
            path,
            "scheduler.num_train_timesteps",
            s.num_train_timesteps,
            2..=limits::MAX_TRAIN_TIMESTEPS,
        )?;
        if !(s.beta_start > 0.0 && s.beta_start < s.beta_end && s.beta_end < 1.0) {
            return Err(invalid_field(
                path,
                "scheduler",
                format!(
                    "expected 0 < beta_start < beta_end < 1, found {} and {}",
                    s.beta_start, s.beta_end
                ),
            ));
        }
        Ok(())
    }

    fn validate_image_statistics(&self, path: &Path) -> Result<(), BundleError> {
        for &mean in &self.image_mean {
            within(path, "image_mean", mean, 0.0..=1.0)?;
        }
        let (lo, hi) = limits::IMAGE_STD;
        for &std in &self.image_std {
            within(path, "image_std", std, lo..=hi)?;
        }
        let (lo, hi) = limits::VAE_SCALING_FACTOR;
        within(path, "vae_scaling_factor", self.vae_scaling_factor, lo..=hi)
    }

    fn validate_defaults(&self, path: &Path) -> Result<(), BundleError> {
        let df = &self.defaults;
        let train = self.scheduler.num_train_timesteps;
        if !(1..=train).contains(&df.steps) {
            return Err(out_of_range(
                path,
                "defaults.steps",
                df.steps,
                format!("1..=scheduler.num_train_timesteps ({train})"),
            ));
        }
        within(
            path,
            "defaults.guidance_scale",
            df.guidance_scale,
            0.0..=limits::MAX_GUIDANCE,
        )?;
        within(
            path,
            "defaults.lambda_generate",
            df.lambda_generate,
            0.0..=limits::MAX_LAMBDA,
        )?;
        within(
            path,
            "defaults.lambda_edit",
            df.lambda_edit,
            0.0..=limits::MAX_LAMBDA,
        )?;
        let m = self.dims.size_multiple;
        for (field, size) in [("defaults.height", df.height), ("defaults.width", df.width)] {
            if size == 0 || !size.is_multiple_of(m) || size > limits::MAX_IMAGE_SIDE {
                return Err(out_of_range(
                    path,
                    field,
                    size,
                    format!(
                        "a positive multiple of dims.size_multiple ({m}) up to {}",
                        limits::MAX_IMAGE_SIDE
                    ),
                ));
            }
        }
        let p = &df.placeholder;
        if p.is_empty()
            || p.len() > limits::MAX_PLACEHOLDER_BYTES
            || p.chars().any(|c| c.is_whitespace() || needs_escape(c))
        {
            return Err(invalid_field(
                path,
                "defaults.placeholder",
                format!(
                    "{p:?} must be one word of 1..={} bytes, without spaces or control characters",
                    limits::MAX_PLACEHOLDER_BYTES
                ),
            ));
        }
        if self.name.is_empty() || self.name.len() > limits::MAX_NAME_BYTES {
            return Err(out_of_range(
                path,
                "name",
                format!("{} bytes long", self.name.len()),
                format!("1..={} bytes", limits::MAX_NAME_BYTES),
            ));
        }
        Ok(())
    }

    fn validate_files(&self, path: &Path) -> Result<(), BundleError> {
        if self.files.len() > limits::MAX_LISTED_FILES {
            return Err(out_of_range(
                path,
                "files",
                format!("{} entries", self.files.len()),
                format!("at most {} entries", limits::MAX_LISTED_FILES),
            ));
        }
        for (name, entry) in &self.files {
            if !is_plain_file_name(name) {
                return Err(invalid_field(
                    path,
                    &format!("files.{name}"),
                    "must be a plain file name inside the bundle (no directories, no .., \
                     no control characters, at most 255 bytes)"
                        .into(),
                ));
            }
            let hex_ok = entry.sha256.len() == 64
                && entry
                    .sha256
                    .bytes()
                    .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
            if !hex_ok {
                return Err(invalid_field(
                    path,
                    &format!("files.{name}.sha256"),
                    format!("`{}` is not 64 lowercase hex digits", entry.sha256),
                ));
            }
            if !(1..=files::BUNDLE_FILE.max_bytes).contains(&entry.bytes) {
                return Err(out_of_range(
                    path,
                    &format!("files.{name}.bytes"),
                    entry.bytes,
                    format!(
                        "1..={} (the limit for a bundle file)",
                        files::BUNDLE_FILE.max_bytes
                    ),
                ));
            }
        }
        Ok(())
    }
}

fn invalid_field(path: &Path, field: &str, reason: String) -> BundleError {
    BundleError::InvalidField {
        path: path.to_path_buf(),
        field: field.to_string(),
        reason,
    }
}

fn out_of_range(
    path: &Path,
    field: &str,
    value: impl std::fmt::Display,
    rule: impl Into<String>,
) -> BundleError {
    BundleError::OutOfRange {
        path: path.to_path_buf(),
        field: field.to_string(),
        value: value.to_string(),
        rule: rule.into(),
    }
}

/// `value` must lie in `range` (NaN never does).
fn within<T: PartialOrd + std::fmt::Display>(
    path: &Path,
    field: &str,
    value: T,
    range: RangeInclusive<T>,
) -> Result<(), BundleError> {
    if range.contains(&value) {
        Ok(())
    } else {
        let rule = format!("{}..={}", range.start(), range.end());
        Err(out_of_range(path, field, value, rule))
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
        && name.len() <= 255
        && name != "."
        && name != ".."
        && !name.contains(['/', '\\'])
        && !name.chars().any(needs_escape)
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
    /// Listed files whose sha256 was checked in this run (hashed now, or unchanged since a
    /// hash matched, see [`crate::cache`]); empty with [`Checksums::Skip`].
    verified: BTreeSet<String>,
    /// Entries of the bundle directory that the manifest does not list (the first few).
    unlisted: Vec<String>,
}

/// How many unlisted directory entries [`Bundle::unlisted_files`] names.
const UNLISTED_SHOWN: usize = 8;

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
        let text =
            files::read_capped_string(&manifest_path, files::MANIFEST).map_err(|e| match e {
                FileError::NotFound { path, .. } => BundleError::ManifestMissing { path },
                e => BundleError::File(e),
            })?;
        let manifest = Manifest::from_json(&text, &manifest_path)?;
        for file in required_files() {
            if !manifest.files.contains_key(file) {
                return Err(BundleError::NotListed {
                    path: manifest_path,
                    file,
                });
            }
        }
        let verified = check_listed_files(&dir, &manifest, &manifest_path, checksums)?;
        let unlisted = unlisted_entries(&dir, &manifest);
        Ok(Bundle {
            dir,
            manifest,
            verified,
            unlisted,
        })
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

    /// Bytes of a graph's files as the manifest lists them (`.onnx` and external data): what
    /// its session must read, which orders parallel loading.
    pub fn graph_bytes(&self, graph: Graph) -> u64 {
        let name = graph.file_name();
        [name.to_string(), format!("{name}.data")]
            .iter()
            .filter_map(|f| self.manifest.files.get(f))
            .map(|e| e.bytes)
            .sum()
    }

    /// What identifies a graph's contents, for the caches of optimised graphs and TensorRT
    /// engines: the manifest's sha256 of its `.onnx` file and, when listed, of its external
    /// data (`<graph>.onnx.data`).
    ///
    /// None — no cache may be read or written for the graph — unless every one of those files
    /// had its hash checked in this run, and the bundle directory holds nothing the manifest
    /// does not list (an unlisted file could be external data of a graph, which the key would
    /// not cover). A cache keyed by what was only claimed, not checked, would let a tampered
    /// graph opened with `--no-verify` be served later to a verified run of the pristine bundle.
    pub fn content_id(&self, graph: Graph) -> Option<String> {
        if !self.unlisted.is_empty() {
            return None;
        }
        let name = graph.file_name();
        let main = self.manifest.files.get(name)?;
        if !self.verified.contains(name) {
            return None;
        }
        let mut id = format!("{name} {}", main.sha256);
        let data = format!("{name}.data");
        if let Some(entry) = self.manifest.files.get(&data) {
            if !self.verified.contains(&data) {
                return None;
            }
            id.push_str(&format!("\n{data} {}", entry.sha256));
        }
        Some(id)
    }

    /// True when `file` (a name the manifest lists) had its sha256 checked in this run.
    pub fn is_verified(&self, file: &str) -> bool {
        self.verified.contains(file)
    }

    /// Entries of the bundle directory that the manifest does not list (the first 8; escape
    /// them with [`crate::display::escape`] to print them). Non-empty means that no graph is
    /// cached (see [`Bundle::content_id`]), which the CLI can say.
    pub fn unlisted_files(&self) -> &[String] {
        &self.unlisted
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

/// Checks every listed file (a regular file of the listed size) and, as `checksums` asks, its
/// sha256; returns the names whose hash was checked.
fn check_listed_files(
    dir: &Path,
    manifest: &Manifest,
    manifest_path: &Path,
    checksums: &Checksums,
) -> Result<BTreeSet<String>, BundleError> {
    let mut stamps = match checksums {
        Checksums::VerifyCached(cache) => Some(VerifiedFiles::load(cache, dir)),
        _ => None,
    };
    let mut verified = BTreeSet::new();
    for (name, entry) in &manifest.files {
        let path = dir.join(name);
        let metadata = check_file(&path, entry, manifest_path)?;
        if matches!(checksums, Checksums::Skip) {
            continue;
        }
        let unchanged = stamps
            .as_ref()
            .is_some_and(|s| s.is_verified(name, &metadata, &entry.sha256));
        if !unchanged {
            verify_checksum(&path, entry, manifest_path)?;
            if let Some(stamps) = &mut stamps {
                stamps.record(name, &metadata, &entry.sha256);
            }
        }
        verified.insert(name.clone());
    }
    if let Some(stamps) = stamps {
        stamps.save();
    }
    Ok(verified)
}

/// The first few entries of `dir` besides the manifest that `manifest` does not list. The scan
/// stops there: a directory of millions of entries costs no more than a few.
fn unlisted_entries(dir: &Path, manifest: &Manifest) -> Vec<String> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        // Unreadable now though it was read a moment ago: treat as unlisted, i.e. no caching.
        return vec![".".into()];
    };
    entries
        .map(|e| {
            e.map(|e| e.file_name().to_string_lossy().into_owned())
                .unwrap_or_else(|_| "?".into())
        })
        .filter(|name| name != MANIFEST_FILE && !manifest.files.contains_key(name))
        .take(UNLISTED_SHOWN)
        .collect()
}

/// Checks that a listed file is a regular file (after links) of the listed size; returns its
/// metadata.
fn check_file(
    path: &Path,
    entry: &FileEntry,
    manifest: &Path,
) -> Result<std::fs::Metadata, BundleError> {
    let metadata = files::check_regular(path, files::BUNDLE_FILE).map_err(|e| match e {
        FileError::NotFound { .. } => BundleError::FileMissing {
            path: path.to_path_buf(),
            manifest: manifest.to_path_buf(),
        },
        // An empty file is reported as what it is: a file of the wrong size.
        FileError::Empty { .. } => size_mismatch(path, entry, manifest, 0),
        e => BundleError::File(e),
    })?;
    if metadata.len() != entry.bytes {
        return Err(size_mismatch(path, entry, manifest, metadata.len()));
    }
    Ok(metadata)
}

fn size_mismatch(path: &Path, entry: &FileEntry, manifest: &Path, actual: u64) -> BundleError {
    BundleError::SizeMismatch {
        path: path.to_path_buf(),
        manifest: manifest.to_path_buf(),
        expected: entry.bytes,
        actual,
    }
}

fn verify_checksum(path: &Path, entry: &FileEntry, manifest: &Path) -> Result<(), BundleError> {
    // The file is read up to its listed size only: one that grew since it was checked is
    // caught by the count, and is never read to its end.
    let kind = FileKind {
        role: files::BUNDLE_FILE.role,
        max_bytes: entry.bytes,
    };
    let (actual, bytes) = sha256_capped(path, kind)?;
    if bytes != entry.bytes {
        return Err(size_mismatch(path, entry, manifest, bytes));
    }
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

/// Lowercase hex sha256 of a regular file of at most `kind.max_bytes`, read in 1 MiB chunks,
/// and how many bytes were hashed (at most `kind.max_bytes + 1`: a file that grows while it is
/// read is not followed).
pub fn sha256_capped(path: &Path, kind: FileKind) -> Result<(String, u64), FileError> {
    let (file, _) = files::open_regular(path, kind)?;
    let mut reader = file.take(kind.max_bytes.saturating_add(1));
    let mut hasher = Sha256::new();
    let mut buffer = vec![0u8; 1 << 20];
    let mut total = 0u64;
    loop {
        let n = match reader.read(&mut buffer) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(source) => {
                return Err(FileError::Io {
                    path: path.to_path_buf(),
                    role: kind.role,
                    source,
                })
            }
        };
        hasher.update(&buffer[..n]);
        total += n as u64;
    }
    let hex = hasher
        .finalize()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    Ok((hex, total))
}

/// Lowercase hex sha256 of a regular file (of at most [`files::BUNDLE_FILE`]'s size).
pub fn sha256_file(path: &Path) -> io::Result<String> {
    sha256_capped(path, files::BUNDLE_FILE)
        .map(|(hex, _)| hex)
        .map_err(io::Error::other)
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
                "`defaults.height` is 500, must be a positive multiple of dims.size_multiple (64)",
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

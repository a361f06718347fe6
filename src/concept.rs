//! A concept: the word embeddings and masked local embeddings of one subject image, saved as safetensors.
//!
//! Encoding a concept (two CLIP passes and the mappers) is the part of ELITE that replaces
//! fine-tuning. Saving its result lets `run --concept` generate many prompts without loading the
//! image encoder at all. The file records what it was made from (image and mask sha256, bundle
//! name and widths) so that a concept from another bundle is refused instead of misused.

use std::collections::HashMap;
use std::path::Path;

use ndarray::{Array1, Array2};
use safetensors::tensor::{Dtype, SafeTensors, TensorView};

use crate::bundle::Bundle;
use crate::display::escape;
use crate::files::{self, FileError};
use crate::graphs::CLIP_LAYERS;
use crate::{limits, output};

const FORMAT: &str = "elite-ort-concept";
const VERSION: &str = "1";

/// The tensors of a concept file, and nothing else.
const TENSORS: [&str; 3] = ["word_embeddings", "local_embeddings", "mask_grid"];
/// The metadata keys `save` writes; `mask_sha256` only with a mask.
const METADATA_KEYS: [&str; 7] = [
    "format",
    "version",
    "bundle",
    "image_sha256",
    "mask_sha256",
    "image",
    "preprocessing",
];
/// Longest metadata value (the preprocessing description is about 150 bytes).
const MAX_METADATA_BYTES: usize = 4096;

#[derive(Debug, thiserror::Error)]
pub enum ConceptError {
    /// The file is not a regular file, too large, or unreadable.
    #[error(transparent)]
    File(#[from] FileError),
    /// Not a concept file `encode` writes, or one with impossible contents; `name` is the
    /// file's path (or an upload's name), `message` the rule it breaks.
    #[error("{name}: not an elite-ort concept file: {message}")]
    Invalid { name: String, message: String },
    #[error(
        "{name}: concept was encoded with bundle `{}` (text width {width}, {patches} local \
         tokens), this bundle is `{}` (text width {expected}, {expected_patches} local tokens); \
         encode it again with this bundle",
        escape(.made_with),
        escape(.bundle)
    )]
    Incompatible {
        name: String,
        made_with: String,
        width: usize,
        patches: usize,
        bundle: String,
        expected: usize,
        expected_patches: usize,
    },
    #[error("saving concept: {0}")]
    Serialize(String),
    #[error(transparent)]
    Write(#[from] output::OutputError),
}

/// Where a concept came from.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ConceptSource {
    pub bundle: String,
    pub image_sha256: String,
    pub mask_sha256: Option<String>,
    pub image_name: String,
    /// How the image was preprocessed (size, normalisation, grid), for the record.
    pub preprocessing: String,
}

/// The output of concept encoding for one image.
#[derive(Debug, Clone, PartialEq)]
pub struct Concept {
    /// `[5, C_txt]`: one word per CLIP layer (24, 4, 8, 12, 16); generation injects row 0.
    pub word_embeddings: Array2<f32>,
    /// `[256, C_txt]`: local embeddings, already multiplied by the mask grid.
    pub local_embeddings: Array2<f32>,
    /// `[256]`: the 16×16 mask grid (1 = object).
    pub mask_grid: Array1<f32>,
    pub source: ConceptSource,
}

fn f32_bytes(values: &[f32]) -> Vec<u8> {
    values.iter().flat_map(|v| v.to_le_bytes()).collect()
}

impl Concept {
    /// The injected word `w0` (`[C_txt]`).
    pub fn word(&self) -> ndarray::ArrayView1<'_, f32> {
        self.word_embeddings.row(0)
    }

    pub fn text_hidden(&self) -> usize {
        self.word_embeddings.ncols()
    }

    /// Refuses a concept whose widths do not fit `bundle`; `path` names the concept in the
    /// error (a file's path, or an upload's name).
    pub fn check_compatible(&self, bundle: &Bundle, path: &Path) -> Result<(), ConceptError> {
        let dims = bundle.dims();
        let patches = self.local_embeddings.nrows();
        if self.text_hidden() != dims.text_hidden || patches != dims.patches() {
            return Err(ConceptError::Incompatible {
                name: path.display().to_string(),
                made_with: self.source.bundle.clone(),
                width: self.text_hidden(),
                patches,
                bundle: bundle.name().to_string(),
                expected: dims.text_hidden,
                expected_patches: dims.patches(),
            });
        }
        Ok(())
    }

    /// Writes the concept as safetensors (atomically; refuses to overwrite without `force`).
    pub fn save(&self, path: &Path, force: bool) -> Result<(), ConceptError> {
        let tensors = [
            ("word_embeddings", &self.word_embeddings.clone().into_dyn()),
            (
                "local_embeddings",
                &self.local_embeddings.clone().into_dyn(),
            ),
            ("mask_grid", &self.mask_grid.clone().into_dyn()),
        ];
        let data: Vec<(String, Vec<usize>, Vec<u8>)> = tensors
            .iter()
            .map(|(name, a)| {
                let flat: Vec<f32> = a.iter().copied().collect();
                (name.to_string(), a.shape().to_vec(), f32_bytes(&flat))
            })
            .collect();
        let views = data
            .iter()
            .map(|(name, shape, bytes)| {
                TensorView::new(Dtype::F32, shape.clone(), bytes)
                    .map(|v| (name.clone(), v))
                    .map_err(|e| ConceptError::Serialize(e.to_string()))
            })
            .collect::<Result<Vec<_>, _>>()?;
        let mut meta = HashMap::from([
            ("format".to_string(), FORMAT.to_string()),
            ("version".to_string(), VERSION.to_string()),
            ("bundle".to_string(), self.source.bundle.clone()),
            ("image_sha256".to_string(), self.source.image_sha256.clone()),
            ("image".to_string(), self.source.image_name.clone()),
            (
                "preprocessing".to_string(),
                self.source.preprocessing.clone(),
            ),
        ]);
        if let Some(mask) = &self.source.mask_sha256 {
            meta.insert("mask_sha256".to_string(), mask.clone());
        }
        let bytes = safetensors::serialize(views, Some(meta))
            .map_err(|e| ConceptError::Serialize(e.to_string()))?;
        output::check_destination(path, force)?;
        output::write_atomic(path, &bytes, force)?;
        Ok(())
    }

    /// Reads a concept written by [`Concept::save`]: a regular file of at most
    /// [`files::CONCEPT`]'s size, checked as [`Concept::from_bytes`] checks it.
    pub fn load(path: &Path) -> Result<Concept, ConceptError> {
        let bytes = files::read_capped(path, files::CONCEPT)?;
        Concept::from_bytes(&bytes, &path.display().to_string())
    }

    /// Parses and checks a concept file's bytes; `name` names it in errors (its path, or an
    /// upload's name). Everything a file can hold is checked: the safetensors header, the
    /// metadata (`format`, `version`, known keys only, bounded strings, hex digests), exactly
    /// the three tensors as f32 of consistent shapes (5 words of width 1..=8192, 1..=4096
    /// local tokens), every value finite and within ±[`limits::MAX_ABS_VALUE`], `mask_grid`
    /// only 0 or 1, and the local embeddings zero where the mask is (the local mapper's output
    /// is already multiplied by it).
    pub fn from_bytes(bytes: &[u8], name: &str) -> Result<Concept, ConceptError> {
        let invalid = |message: String| ConceptError::Invalid {
            name: name.to_string(),
            message,
        };
        let (_, metadata) = SafeTensors::read_metadata(bytes)
            .map_err(|e| invalid(format!("not a safetensors file: {e}")))?;
        let meta = metadata.metadata().clone().unwrap_or_default();
        let source = read_metadata(&meta).map_err(invalid)?;
        let st = SafeTensors::deserialize(bytes)
            .map_err(|e| invalid(format!("not a safetensors file: {e}")))?;
        if let Some(extra) = st.names().into_iter().find(|n| !TENSORS.contains(n)) {
            return Err(invalid(format!(
                "unexpected tensor `{}` (a concept holds {})",
                escape(extra),
                TENSORS.join(", ")
            )));
        }
        let words = read_tensor(&st, "word_embeddings", 2).map_err(invalid)?;
        let locals = read_tensor(&st, "local_embeddings", 2).map_err(invalid)?;
        let mask = read_tensor(&st, "mask_grid", 1).map_err(invalid)?;
        let (word_embeddings, local_embeddings, mask_grid) =
            shape_tensors(words, locals, mask).map_err(invalid)?;
        check_values(&word_embeddings, &local_embeddings, &mask_grid).map_err(invalid)?;
        Ok(Concept {
            word_embeddings,
            local_embeddings,
            mask_grid,
            source,
        })
    }
}

/// The metadata of a concept file as a [`ConceptSource`], or the rule it breaks.
fn read_metadata(meta: &HashMap<String, String>) -> Result<ConceptSource, String> {
    if meta.get("format").map(String::as_str) != Some(FORMAT) {
        return Err(format!("metadata `format` is not `{FORMAT}`"));
    }
    match meta.get("version") {
        Some(v) if v == VERSION => {}
        Some(v) => return Err(format!("unsupported version `{}`", escape(v))),
        None => return Err("metadata `version` is missing".into()),
    }
    let mut keys: Vec<&String> = meta.keys().collect();
    keys.sort();
    for key in keys {
        if !METADATA_KEYS.contains(&key.as_str()) {
            return Err(format!("unexpected metadata key `{}`", escape(key)));
        }
        if meta[key].len() > MAX_METADATA_BYTES {
            return Err(format!(
                "metadata `{key}` is {} bytes, over the limit of {MAX_METADATA_BYTES}",
                meta[key].len()
            ));
        }
    }
    let text = |key: &str| meta.get(key).cloned().unwrap_or_default();
    let image_sha256 = text("image_sha256");
    // `encode` records an empty digest when the image could not be hashed.
    if !image_sha256.is_empty() && !is_sha256(&image_sha256) {
        return Err("metadata `image_sha256` is not 64 lowercase hex digits".into());
    }
    let mask_sha256 = meta.get("mask_sha256").cloned();
    if mask_sha256.as_deref().is_some_and(|m| !is_sha256(m)) {
        return Err("metadata `mask_sha256` is not 64 lowercase hex digits".into());
    }
    Ok(ConceptSource {
        bundle: text("bundle"),
        image_sha256,
        mask_sha256,
        image_name: text("image"),
        preprocessing: text("preprocessing"),
    })
}

fn is_sha256(text: &str) -> bool {
    text.len() == 64 && text.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

/// Shape and values of one f32 tensor of rank `rank`, or the rule it breaks.
fn read_tensor(
    st: &SafeTensors<'_>,
    name: &str,
    rank: usize,
) -> Result<(Vec<usize>, Vec<f32>), String> {
    let t = st
        .tensor(name)
        .map_err(|_| format!("tensor `{name}` is missing"))?;
    if t.dtype() != Dtype::F32 || t.shape().len() != rank {
        return Err(format!(
            "tensor `{name}` is {:?} of shape {:?}, must be F32 of rank {rank}",
            t.dtype(),
            t.shape()
        ));
    }
    let values = t
        .data()
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect();
    Ok((t.shape().to_vec(), values))
}

type Tensor = (Vec<usize>, Vec<f32>);
/// Word embeddings, local embeddings, mask grid.
type Arrays = (Array2<f32>, Array2<f32>, Array1<f32>);

/// The three tensors as arrays, their shapes checked against each other and the bounds.
fn shape_tensors((ws, wv): Tensor, (ls, lv): Tensor, (ms, mv): Tensor) -> Result<Arrays, String> {
    let (words, width) = (ws[0], ws[1]);
    if words != CLIP_LAYERS || !(1..=limits::MAX_HIDDEN).contains(&width) {
        return Err(format!(
            "tensor `word_embeddings` has shape {ws:?}, must be [{CLIP_LAYERS}, C] with C in \
             1..={}",
            limits::MAX_HIDDEN
        ));
    }
    let max_patches = limits::MAX_PATCH_GRID * limits::MAX_PATCH_GRID;
    if ls[1] != width || !(1..=max_patches).contains(&ls[0]) {
        return Err(format!(
            "tensor `local_embeddings` has shape {ls:?}, must be [P, {width}] (the words' width) \
             with P in 1..={max_patches}"
        ));
    }
    if ms[0] != ls[0] {
        return Err(format!(
            "tensor `mask_grid` has shape {ms:?}, must be [{}] (one value per local token)",
            ls[0]
        ));
    }
    // safetensors checked that each tensor's data is exactly its shape's size.
    let shape_err = |e: ndarray::ShapeError| e.to_string();
    Ok((
        Array2::from_shape_vec((words, width), wv).map_err(shape_err)?,
        Array2::from_shape_vec((ls[0], ls[1]), lv).map_err(shape_err)?,
        Array1::from_vec(mv),
    ))
}

/// Finite, bounded values; a 0/1 mask; local embeddings zero where the mask is.
fn check_values(
    words: &Array2<f32>,
    locals: &Array2<f32>,
    mask: &Array1<f32>,
) -> Result<(), String> {
    let max = limits::MAX_ABS_VALUE;
    for (name, values) in [("word_embeddings", words), ("local_embeddings", locals)] {
        if let Some((index, v)) = values
            .indexed_iter()
            .find(|(_, v)| !(v.is_finite() && v.abs() <= max))
        {
            return Err(format!(
                "tensor `{name}` holds {v} at {:?}; values must be finite and within ±{max}",
                [index.0, index.1]
            ));
        }
    }
    if let Some((i, v)) = mask
        .iter()
        .enumerate()
        .find(|(_, v)| **v != 0.0 && **v != 1.0)
    {
        return Err(format!(
            "tensor `mask_grid` holds {v} at [{i}]; its values must be 0 or 1"
        ));
    }
    for (i, row) in locals.outer_iter().enumerate() {
        if mask[i] == 0.0 && row.iter().any(|v| *v != 0.0) {
            return Err(format!(
                "tensor `local_embeddings` row {i} is not zero where `mask_grid` is 0 (local \
                 embeddings are already multiplied by the mask)"
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Concept {
        Concept {
            word_embeddings: Array2::from_shape_fn((5, 4), |(i, j)| (i * 4 + j) as f32 * 0.5),
            // Zero where the mask is, as the local mapper's output is.
            local_embeddings: Array2::from_shape_fn((256, 4), |(i, j)| ((i % 2) * (i + j)) as f32),
            mask_grid: Array1::from_shape_fn(256, |i| (i % 2) as f32),
            source: ConceptSource {
                bundle: "elite-tiny".into(),
                image_sha256: "ab".repeat(32),
                mask_sha256: None,
                image_name: "cat.png".into(),
                preprocessing: "squash 224".into(),
            },
        }
    }

    #[test]
    fn round_trips_through_safetensors() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.safetensors");
        let c = sample();
        c.save(&path, false).unwrap();
        assert_eq!(Concept::load(&path).unwrap(), c);
        assert!(c.save(&path, false).is_err(), "overwrote without force");
    }

    #[test]
    fn rejects_foreign_files() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x.safetensors");
        std::fs::write(&path, b"not safetensors").unwrap();
        let err = Concept::load(&path).unwrap_err().to_string();
        assert!(err.contains("not an elite-ort concept"), "{err}");
    }
}

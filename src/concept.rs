//! A concept: the word embeddings and masked local embeddings of one subject image, saved as safetensors.
//!
//! Encoding a concept (two CLIP passes and the mappers) is the part of ELITE that replaces
//! fine-tuning. Saving its result lets `run --concept` generate many prompts without loading the
//! image encoder at all. The file records what it was made from (image and mask sha256, bundle
//! name and widths) so that a concept from another bundle is refused instead of misused.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use ndarray::{Array1, Array2};
use safetensors::tensor::{Dtype, SafeTensors, TensorView};

use crate::bundle::Bundle;
use crate::output;

const FORMAT: &str = "elite-ort-concept";
const VERSION: &str = "1";

#[derive(Debug, thiserror::Error)]
pub enum ConceptError {
    #[error("{path}: cannot read concept file: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: not an elite-ort concept file: {message}")]
    Invalid { path: PathBuf, message: String },
    #[error(
        "{path}: concept was encoded with bundle `{made_with}` (text width {width}), \
         this bundle is `{bundle}` (text width {expected}); encode it again with this bundle"
    )]
    Incompatible {
        path: PathBuf,
        made_with: String,
        width: usize,
        bundle: String,
        expected: usize,
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

    /// Refuses a concept whose widths do not fit `bundle`.
    pub fn check_compatible(&self, bundle: &Bundle, path: &Path) -> Result<(), ConceptError> {
        let dims = bundle.dims();
        let patches = dims.patch_grid * dims.patch_grid;
        if self.text_hidden() != dims.text_hidden || self.local_embeddings.nrows() != patches {
            return Err(ConceptError::Incompatible {
                path: path.to_path_buf(),
                made_with: self.source.bundle.clone(),
                width: self.text_hidden(),
                bundle: bundle.name().to_string(),
                expected: dims.text_hidden,
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

    /// Reads a concept written by [`Concept::save`].
    pub fn load(path: &Path) -> Result<Concept, ConceptError> {
        let bytes = std::fs::read(path).map_err(|source| ConceptError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        let invalid = |message: String| ConceptError::Invalid {
            path: path.to_path_buf(),
            message,
        };
        let (_, metadata) =
            SafeTensors::read_metadata(&bytes).map_err(|e| invalid(e.to_string()))?;
        let meta = metadata.metadata().clone().unwrap_or_default();
        if meta.get("format").map(String::as_str) != Some(FORMAT) {
            return Err(invalid("metadata `format` is missing".into()));
        }
        if meta.get("version").map(String::as_str) != Some(VERSION) {
            return Err(invalid(format!(
                "unsupported version {:?}",
                meta.get("version")
            )));
        }
        let st = SafeTensors::deserialize(&bytes).map_err(|e| invalid(e.to_string()))?;
        let read = |name: &str, rank: usize| -> Result<(Vec<usize>, Vec<f32>), ConceptError> {
            let t = st
                .tensor(name)
                .map_err(|_| invalid(format!("tensor `{name}` is missing")))?;
            if t.dtype() != Dtype::F32 || t.shape().len() != rank {
                return Err(invalid(format!(
                    "tensor `{name}` must be f32 of rank {rank}"
                )));
            }
            let values = t
                .data()
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect();
            Ok((t.shape().to_vec(), values))
        };
        let (ws, wv) = read("word_embeddings", 2)?;
        let (ls, lv) = read("local_embeddings", 2)?;
        let (_, mv) = read("mask_grid", 1)?;
        let shape_err = |e: ndarray::ShapeError| invalid(e.to_string());
        let concept = Concept {
            word_embeddings: Array2::from_shape_vec((ws[0], ws[1]), wv).map_err(shape_err)?,
            local_embeddings: Array2::from_shape_vec((ls[0], ls[1]), lv).map_err(shape_err)?,
            mask_grid: Array1::from_vec(mv),
            source: ConceptSource {
                bundle: meta.get("bundle").cloned().unwrap_or_default(),
                image_sha256: meta.get("image_sha256").cloned().unwrap_or_default(),
                mask_sha256: meta.get("mask_sha256").cloned(),
                image_name: meta.get("image").cloned().unwrap_or_default(),
                preprocessing: meta.get("preprocessing").cloned().unwrap_or_default(),
            },
        };
        if concept.local_embeddings.ncols() != concept.text_hidden()
            || concept.mask_grid.len() != concept.local_embeddings.nrows()
        {
            return Err(invalid("tensor shapes disagree".into()));
        }
        Ok(concept)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Concept {
        Concept {
            word_embeddings: Array2::from_shape_fn((5, 4), |(i, j)| (i * 4 + j) as f32 * 0.5),
            local_embeddings: Array2::from_shape_fn((256, 4), |(i, j)| (i + j) as f32),
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

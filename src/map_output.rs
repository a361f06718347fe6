//! Where a run's attention-map pictures go: their paths, planned and checked together with the
//! images' before any model runs, and the pictures rendered ([`crate::heatmap`]) and staged in
//! the run's [`OutputSet`], so that they are written in the same transaction as the images
//! (atomic, refused over existing files without `force`, nothing left on failure).

use std::path::{Path, PathBuf};

use image::RgbImage;

use crate::attention_maps::AttentionMaps;
use crate::heatmap::{self, TokenLabel};
use crate::output::{check_destination, OutputError, OutputSet};
use crate::tokenizer::{ClipTokenizer, TokenIds};

/// The picture files of one image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MapPaths {
    /// One per prompt token, in token order.
    pub tokens: Vec<PathBuf>,
    pub placeholder: PathBuf,
    pub sheet: PathBuf,
}

impl MapPaths {
    pub fn all(&self) -> impl Iterator<Item = &PathBuf> {
        self.tokens.iter().chain([&self.placeholder, &self.sheet])
    }
}

/// The prompt's tokens (start to end token) with the labels the pictures show.
pub fn prompt_tokens(tokenizer: &ClipTokenizer, ids: &TokenIds) -> Vec<TokenLabel> {
    ids[..tokenizer.prompt_len(ids)]
        .iter()
        .enumerate()
        .map(|(index, &id)| TokenLabel {
            index,
            text: tokenizer.token_label(id),
        })
        .collect()
}

/// The picture paths in `dir` for each image of `images` (per job, as
/// [`crate::output::plan_outputs`] returns them), named after the image file, each checked
/// like the images' (`dir` must exist; an existing file is refused without `force`).
pub fn plan_map_outputs(
    dir: &Path,
    images: &[Vec<PathBuf>],
    tokens: &[Vec<TokenLabel>],
    force: bool,
) -> Result<Vec<Vec<MapPaths>>, OutputError> {
    if !dir.is_dir() {
        return Err(if dir.exists() {
            OutputError::NotADirectory {
                path: dir.to_path_buf(),
            }
        } else {
            OutputError::NoDirectory {
                path: dir.to_path_buf(),
            }
        });
    }
    let plans: Vec<Vec<MapPaths>> = images
        .iter()
        .zip(tokens)
        .map(|(paths, tokens)| {
            paths
                .iter()
                .map(|image| {
                    let stem = image.file_stem().unwrap_or_default().to_string_lossy();
                    let names = heatmap::file_names(&stem, tokens);
                    MapPaths {
                        tokens: names.tokens.iter().map(|n| dir.join(n)).collect(),
                        placeholder: dir.join(names.placeholder),
                        sheet: dir.join(names.sheet),
                    }
                })
                .collect()
        })
        .collect();
    for path in plans.iter().flatten().flat_map(MapPaths::all) {
        check_destination(path, force)?;
    }
    Ok(plans)
}

/// Renders image `image`'s pictures and stages them at `paths`.
pub fn stage_maps(
    staged: &mut OutputSet,
    paths: &MapPaths,
    picture: &RgbImage,
    maps: &AttentionMaps,
    image: usize,
    tokens: &[TokenLabel],
    placeholder: &str,
) -> Result<(), crate::error::Error> {
    let pictures = heatmap::render(picture, maps, image, tokens, placeholder)
        .map_err(|e| crate::error::Error::Internal(e.to_string()))?;
    for (path, png) in paths.tokens.iter().zip(&pictures.tokens) {
        staged.stage_png(path, png)?;
    }
    staged.stage_png(&paths.placeholder, &pictures.placeholder)?;
    staged.stage_png(&paths.sheet, &pictures.sheet)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels() -> Vec<TokenLabel> {
        ["<start>", "a", "s", "<end>"]
            .iter()
            .enumerate()
            .map(|(index, t)| TokenLabel {
                index,
                text: t.to_string(),
            })
            .collect()
    }

    #[test]
    fn paths_follow_the_images_and_existing_files_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let images = vec![vec![dir.path().join("out/elite-42-0.png")]];
        let maps = dir.path().join("maps");
        let err = plan_map_outputs(&maps, &images, &[labels()], false).unwrap_err();
        assert!(matches!(err, OutputError::NoDirectory { .. }), "{err}");
        std::fs::create_dir(&maps).unwrap();
        let plan = plan_map_outputs(&maps, &images, &[labels()], false).unwrap();
        let p = &plan[0][0];
        assert_eq!(p.tokens[2], maps.join("elite-42-0-02-s.png"));
        assert_eq!(p.placeholder, maps.join("elite-42-0-placeholder.png"));
        assert_eq!(p.all().count(), 6);
        std::fs::write(&p.sheet, b"old").unwrap();
        let err = plan_map_outputs(&maps, &images, &[labels()], false).unwrap_err();
        assert!(matches!(err, OutputError::Exists { .. }), "{err}");
        assert!(plan_map_outputs(&maps, &images, &[labels()], true).is_ok());
    }
}

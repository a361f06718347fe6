//! The concept store: encoded concepts on disk, one safetensors file per concept (the same file
//! `elite-ort encode` writes), named by a content address.
//!
//! An id is the sha256 of the bundle's identity (the sha256 of every file the manifest lists),
//! the uploaded bytes and the preprocessing, so the same upload gives the same id on every
//! replica of the same bundle, and ids never need coordination. Ids are exactly 64 lowercase hex
//! characters; nothing else from a request ever becomes a path. Files are written atomically
//! (temporary, then a hard link that fails if the name exists), so concurrent uploads of one
//! image leave one file and a process killed mid-write leaves only a temporary, removed at the
//! next start.

use std::collections::HashMap;
use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use sha2::{Digest, Sha256};

use crate::bundle::Bundle;
use crate::concept::Concept;
use crate::files::remove_stale_temporaries;
use crate::output::{write_atomic, OutputError};

/// Concepts kept in memory after first use (each is ~0.8 MB at SD's widths).
const MEMORY_CACHE: usize = 64;

pub struct ConceptStore {
    dir: PathBuf,
    bundle: Bundle,
    /// sha256 over the bundle's listed files: what makes a concept valid for this bundle.
    identity: String,
    cache: Mutex<HashMap<String, Arc<Concept>>>,
}

/// Why an id does not name a stored concept.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("concept id must be 64 lowercase hexadecimal characters (a sha256), got {0:?}")]
    BadId(String),
    #[error("no concept {0} in the store")]
    Unknown(String),
    #[error(transparent)]
    Concept(#[from] crate::concept::ConceptError),
    #[error(transparent)]
    Write(#[from] OutputError),
    #[error("concept store: {0}")]
    Io(#[from] io::Error),
}

/// A valid concept id (checked on construction).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ConceptId(String);

impl ConceptId {
    pub fn parse(text: &str) -> Result<ConceptId, StoreError> {
        let ok = text.len() == 64
            && text
                .bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
        if ok {
            Ok(ConceptId(text.to_string()))
        } else {
            Err(StoreError::BadId(text.chars().take(80).collect()))
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

fn hex(bytes: &[u8]) -> String {
    crate::cache::sha256_hex(bytes)
}

impl ConceptStore {
    pub fn open(dir: &Path, bundle: &Bundle) -> io::Result<ConceptStore> {
        fs::create_dir_all(dir)?;
        remove_stale_temporaries(dir);
        let mut identity = Sha256::new();
        for (name, entry) in &bundle.manifest().files {
            identity.update(format!("{name} {}\n", entry.sha256));
        }
        let identity = identity
            .finalize()
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        Ok(ConceptStore {
            dir: dir.to_path_buf(),
            bundle: bundle.clone(),
            identity,
            cache: Mutex::new(HashMap::new()),
        })
    }

    /// How this bundle preprocesses an upload (part of its id).
    pub fn preprocessing(&self, has_mask: bool) -> String {
        crate::engine::preprocessing_description(&self.bundle, has_mask)
    }

    /// The id of an image (and mask) upload encoded with `preprocessing`.
    pub fn image_id(&self, image: &[u8], mask: Option<&[u8]>, preprocessing: &str) -> ConceptId {
        let key = format!(
            "elite-ort concept v1\nbundle {}\nimage {}\nmask {}\npreprocessing {preprocessing}\n",
            self.identity,
            hex(image),
            mask.map_or_else(|| "none".to_string(), hex),
        );
        ConceptId(hex(key.as_bytes()))
    }

    /// The id of an uploaded concept file.
    pub fn file_id(&self, file: &[u8]) -> ConceptId {
        let key = format!(
            "elite-ort concept file v1\nbundle {}\nfile {}\n",
            self.identity,
            hex(file)
        );
        ConceptId(hex(key.as_bytes()))
    }

    fn path(&self, id: &ConceptId) -> PathBuf {
        self.dir.join(format!("{}.safetensors", id.as_str()))
    }

    pub fn contains(&self, id: &ConceptId) -> bool {
        self.path(id).is_file()
    }

    /// Stores a concept under `id` (atomically; an existing file with this id is kept: by
    /// construction it holds the same concept).
    pub fn put(&self, id: &ConceptId, concept: Concept) -> Result<Arc<Concept>, StoreError> {
        let path = self.path(id);
        let concept = Arc::new(concept);
        match concept.save(&path, false) {
            Ok(()) => {}
            Err(crate::concept::ConceptError::Write(OutputError::Exists { .. })) => {}
            Err(e) => return Err(e.into()),
        }
        self.remember(id, concept.clone());
        Ok(concept)
    }

    /// Stores the bytes of an uploaded concept file after checking it loads and fits this
    /// bundle.
    pub fn put_file(&self, bytes: &[u8]) -> Result<(ConceptId, Arc<Concept>), StoreError> {
        let id = self.file_id(bytes);
        let name = format!("upload {}", id.as_str());
        let concept = Concept::from_bytes(bytes, &name)?;
        concept.check_compatible(&self.bundle, Path::new(&name))?;
        match write_atomic(&self.path(&id), bytes, false) {
            Ok(()) | Err(OutputError::Exists { .. }) => {}
            Err(e) => return Err(e.into()),
        }
        let concept = Arc::new(concept);
        self.remember(&id, concept.clone());
        Ok((id, concept))
    }

    /// The concept with this id.
    pub fn get(&self, id: &ConceptId) -> Result<Arc<Concept>, StoreError> {
        if let Some(c) = self.lock().get(id.as_str()) {
            return Ok(c.clone());
        }
        let path = self.path(id);
        if !path.is_file() {
            return Err(StoreError::Unknown(id.as_str().to_string()));
        }
        let concept = Concept::load(&path)?;
        concept.check_compatible(&self.bundle, &path)?;
        let concept = Arc::new(concept);
        self.remember(id, concept.clone());
        Ok(concept)
    }

    /// Removes a concept; false when there was none.
    pub fn delete(&self, id: &ConceptId) -> Result<bool, StoreError> {
        self.lock().remove(id.as_str());
        match fs::remove_file(self.path(id)) {
            Ok(()) => Ok(true),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
            Err(e) => Err(e.into()),
        }
    }

    /// Size of the stored file.
    pub fn bytes(&self, id: &ConceptId) -> u64 {
        fs::metadata(self.path(id)).map_or(0, |m| m.len())
    }

    /// (number of concepts, bytes on disk).
    pub fn usage(&self) -> (usize, u64) {
        let Ok(entries) = fs::read_dir(&self.dir) else {
            return (0, 0);
        };
        entries
            .filter_map(|e| e.ok())
            .filter(|e| {
                e.file_name()
                    .to_str()
                    .and_then(|n| n.strip_suffix(".safetensors"))
                    .is_some_and(|id| ConceptId::parse(id).is_ok())
            })
            .fold((0, 0), |(n, b), e| {
                (n + 1, b + e.metadata().map_or(0, |m| m.len()))
            })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Arc<Concept>>> {
        self.cache.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn remember(&self, id: &ConceptId, concept: Arc<Concept>) {
        let mut cache = self.lock();
        if cache.len() >= MEMORY_CACHE {
            cache.clear(); // simple bound; concepts reload from disk in milliseconds
        }
        cache.insert(id.as_str().to_string(), concept);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_64_lowercase_hex_and_nothing_else() {
        assert!(ConceptId::parse(&"a".repeat(64)).is_ok());
        for bad in [
            "../../etc/passwd".to_string(),
            "A".repeat(64),
            "a".repeat(63),
            format!("{}/", "a".repeat(63)),
            String::new(),
        ] {
            assert!(ConceptId::parse(&bad).is_err(), "{bad}");
        }
    }
}

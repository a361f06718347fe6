//! The local cache: which bundle files were already checksummed, and ONNX Runtime's optimised graphs.
//!
//! Both only ever save work: a cache that is missing, unreadable or stale is ignored (and
//! rewritten), never an error. Location, in order: an explicit directory (the CLI's
//! `--cache-dir`), `ELITE_ORT_CACHE_DIR`, `$XDG_CACHE_HOME/elite-ort`, `~/.cache/elite-ort`.
//!
//! - `verified/<dir hash>.json`: for each file of a bundle whose sha256 matched the manifest, its
//!   size, modification and change times, device and inode then. A file whose stamp is
//!   unchanged is not hashed again (as `git status` trusts its index); any change means a full
//!   hash. The change time (ctime) is what makes this safe: `touch -r` can put back the mtime
//!   of a file edited in place, but any write or metadata change sets its ctime to now.
//! - `graphs/<key>/<graph>.onnx` (+ `.data`): a graph as ONNX Runtime optimised it, keyed by the
//!   graph's sha256, the ONNX Runtime version, the optimisation settings and the CPU.
//! - `tensorrt/<key>/`: TensorRT engines and timing cache of one graph, keyed by the graph's
//!   sha256, fp16 and the optimisation profile. ONNX Runtime names engines after the model path
//!   and node names, not the weights, so one directory per content keeps a re-exported bundle
//!   at the same path from loading a stale engine.
//!
//! Graphs are cached only under a key of hashes checked in this run
//! ([`crate::bundle::Bundle::content_id`]). Temporaries left by a killed process
//! (`graphs/<key>.tmp-<pid>`, `.<name>.<pid>.tmp`) are removed by
//! [`crate::files::remove_stale_temporaries`] once their process is gone.

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::time::UNIX_EPOCH;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::files;

/// Environment variable naming the cache directory.
pub const CACHE_ENV: &str = "ELITE_ORT_CACHE_DIR";

/// The default cache directory: `ELITE_ORT_CACHE_DIR`, else `$XDG_CACHE_HOME/elite-ort`, else
/// `$HOME/.cache/elite-ort`; None when none of these is set.
pub fn default_cache_dir() -> Option<PathBuf> {
    let var = |name: &str| std::env::var_os(name).filter(|v| !v.is_empty());
    if let Some(dir) = var(CACHE_ENV) {
        return Some(PathBuf::from(dir));
    }
    if let Some(xdg) = var("XDG_CACHE_HOME") {
        return Some(PathBuf::from(xdg).join("elite-ort"));
    }
    var("HOME").map(|home| PathBuf::from(home).join(".cache").join("elite-ort"))
}

/// The TensorRT engine directory of one graph under `base` (see the module documentation).
pub fn tensorrt_cache_dir(
    base: &Path,
    content_id: &str,
    fp16: bool,
    profile: Option<&crate::graphs::TrtProfile>,
) -> PathBuf {
    let key = format!("{content_id}\nfp16 {fp16}\nprofile {profile:?}");
    base.join(&sha256_hex(key.as_bytes())[..16])
}

/// Lowercase hex sha256 of some bytes.
pub fn sha256_hex(bytes: &[u8]) -> String {
    Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// What identifies a file's contents without reading it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Stamp {
    bytes: u64,
    mtime_secs: u64,
    mtime_nanos: u32,
    /// Set by the kernel on every write and metadata change; cannot be set back by a user.
    ctime_secs: i64,
    ctime_nanos: i64,
    device: u64,
    inode: u64,
    sha256: String,
}

impl Stamp {
    fn of(metadata: &fs::Metadata, sha256: &str) -> Option<Stamp> {
        use std::os::unix::fs::MetadataExt;
        let mtime = metadata.modified().ok()?.duration_since(UNIX_EPOCH).ok()?;
        Some(Stamp {
            bytes: metadata.len(),
            mtime_secs: mtime.as_secs(),
            mtime_nanos: mtime.subsec_nanos(),
            ctime_secs: metadata.ctime(),
            ctime_nanos: metadata.ctime_nsec(),
            device: metadata.dev(),
            inode: metadata.ino(),
            sha256: sha256.to_string(),
        })
    }
}

#[derive(Debug, Default, Serialize, Deserialize)]
struct StampFile {
    dir: PathBuf,
    files: BTreeMap<String, Stamp>,
}

/// The checksum stamps of one bundle directory.
#[derive(Debug)]
pub struct VerifiedFiles {
    path: Option<PathBuf>,
    stamps: StampFile,
    dirty: bool,
}

impl VerifiedFiles {
    /// Reads the stamps of bundle directory `dir` from `cache` (none if unreadable).
    pub fn load(cache: &Path, dir: &Path) -> VerifiedFiles {
        let Ok(dir) = fs::canonicalize(dir) else {
            return VerifiedFiles {
                path: None,
                stamps: StampFile::default(),
                dirty: false,
            };
        };
        let key = sha256_hex(dir.to_string_lossy().as_bytes());
        // Records of older versions (stamps without ctime) fail to parse and are rewritten.
        let path = cache.join("verified").join(format!("{}.json", &key[..32]));
        let stamps = files::read_capped(&path, files::CACHE_RECORD)
            .ok()
            .and_then(|bytes| serde_json::from_slice::<StampFile>(&bytes).ok())
            .filter(|s| s.dir == dir)
            .unwrap_or(StampFile {
                dir,
                files: BTreeMap::new(),
            });
        VerifiedFiles {
            path: Some(path),
            stamps,
            dirty: false,
        }
    }

    /// True when `name` was verified to hash to `sha256` and looks unchanged since.
    pub fn is_verified(&self, name: &str, metadata: &fs::Metadata, sha256: &str) -> bool {
        match (self.stamps.files.get(name), Stamp::of(metadata, sha256)) {
            (Some(old), Some(now)) => *old == now,
            _ => false,
        }
    }

    /// Records that `name` (as `metadata` describes it) hashes to `sha256`.
    pub fn record(&mut self, name: &str, metadata: &fs::Metadata, sha256: &str) {
        if let Some(stamp) = Stamp::of(metadata, sha256) {
            self.stamps.files.insert(name.to_string(), stamp);
            self.dirty = true;
        }
    }

    /// Writes the stamps back if anything was recorded; failures are ignored (a cache).
    pub fn save(&self) {
        let Some(path) = &self.path else { return };
        if !self.dirty {
            return;
        }
        if let Some(dir) = path.parent() {
            if fs::create_dir_all(dir).is_err() {
                return; // a cache that cannot be written is ignored
            }
            crate::files::remove_stale_temporaries(dir);
        }
        if let Ok(json) = serde_json::to_vec_pretty(&self.stamps) {
            // A reader never sees half a record: temporary, then a rename over the old one.
            let _ = crate::output::write_atomic(path, &json, true);
        }
    }
}

/// A short description of this CPU for cache keys: optimised CPU graphs use the vector width
/// of the machine that optimised them (e.g. NCHWc blocks of 16 floats with AVX-512, 8 with AVX2).
pub fn cpu_signature() -> String {
    let info = fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let field = |name: &str| {
        info.lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_once(':'))
            .map(|(_, v)| v.trim().to_string())
            .unwrap_or_default()
    };
    format!(
        "{} {} {}",
        std::env::consts::ARCH,
        field("model name"),
        field("flags")
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stamps_survive_a_round_trip_and_notice_changes() {
        let cache = tempfile::tempdir().unwrap();
        let bundle = tempfile::tempdir().unwrap();
        let file = bundle.path().join("a.onnx");
        fs::write(&file, b"graph").unwrap();
        let meta = fs::metadata(&file).unwrap();

        let mut stamps = VerifiedFiles::load(cache.path(), bundle.path());
        assert!(!stamps.is_verified("a.onnx", &meta, "abc"));
        stamps.record("a.onnx", &meta, "abc");
        stamps.save();

        let stamps = VerifiedFiles::load(cache.path(), bundle.path());
        assert!(stamps.is_verified("a.onnx", &meta, "abc"));
        // Another expected hash (a new manifest) is not covered by the stamp.
        assert!(!stamps.is_verified("a.onnx", &meta, "def"));
        // Rewriting the file changes its size or mtime.
        std::thread::sleep(std::time::Duration::from_millis(20));
        fs::write(&file, b"graph!").unwrap();
        let changed = fs::metadata(&file).unwrap();
        assert!(!stamps.is_verified("a.onnx", &changed, "abc"));
        // Another bundle directory has its own stamps.
        let other = tempfile::tempdir().unwrap();
        assert!(
            !VerifiedFiles::load(cache.path(), other.path()).is_verified("a.onnx", &meta, "abc")
        );
    }

    #[test]
    fn tensorrt_engines_are_kept_apart_by_content_precision_and_profile() {
        let base = Path::new("/cache/tensorrt");
        let profile = crate::graphs::TrtProfile {
            min: "sample:1x4x32x32".into(),
            opt: "sample:2x4x64x64".into(),
            max: "sample:8x4x128x128".into(),
        };
        let dir = |id: &str, fp16: bool, p: Option<&crate::graphs::TrtProfile>| {
            tensorrt_cache_dir(base, id, fp16, p)
        };
        let a = dir("unet.onnx aaa", true, Some(&profile));
        assert!(a.starts_with(base));
        assert_eq!(a, dir("unet.onnx aaa", true, Some(&profile)));
        assert_ne!(a, dir("unet.onnx bbb", true, Some(&profile)));
        assert_ne!(a, dir("unet.onnx aaa", false, Some(&profile)));
        assert_ne!(a, dir("unet.onnx aaa", true, None));
    }

    #[test]
    fn unreadable_stamps_are_ignored() {
        let cache = tempfile::tempdir().unwrap();
        let bundle = tempfile::tempdir().unwrap();
        let stamps = VerifiedFiles::load(cache.path(), bundle.path());
        let path = stamps.path.clone().unwrap();
        fs::create_dir_all(path.parent().unwrap()).unwrap();
        fs::write(&path, b"{ not json").unwrap();
        let stamps = VerifiedFiles::load(cache.path(), bundle.path());
        assert!(stamps.stamps.files.is_empty());
    }

    #[test]
    fn an_in_place_edit_with_the_mtime_put_back_is_noticed() {
        let cache = tempfile::tempdir().unwrap();
        let bundle = tempfile::tempdir().unwrap();
        let file = bundle.path().join("unet.onnx");
        fs::write(&file, b"pristine").unwrap();
        let before = fs::metadata(&file).unwrap();
        let mut stamps = VerifiedFiles::load(cache.path(), bundle.path());
        stamps.record("unet.onnx", &before, "abc");
        // Timestamps come from a coarse clock (one tick is up to 10 ms): let one pass.
        std::thread::sleep(std::time::Duration::from_millis(30));
        // Same size, same inode, and the mtime put back as `touch -r` would.
        let edited = fs::OpenOptions::new().write(true).open(&file).unwrap();
        std::io::Write::write_all(&mut &edited, b"tampered").unwrap();
        edited
            .set_times(fs::FileTimes::new().set_modified(before.modified().unwrap()))
            .unwrap();
        drop(edited);
        let after = fs::metadata(&file).unwrap();
        assert_eq!(
            (after.len(), after.modified().unwrap()),
            (before.len(), before.modified().unwrap())
        );
        assert!(!stamps.is_verified("unet.onnx", &after, "abc"));
    }
}

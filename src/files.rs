//! Reading input files that may come from strangers: regular files only, size capped before
//! reading, and a read that stops at the cap even if the file grows meanwhile.
//!
//! Every file the runtime reads goes through [`open_regular`] or [`read_capped`], so that a
//! symlink to `/dev/zero`, a FIFO (which would block `open` forever), a directory or a sparse
//! gigabyte file gets a specific error naming the file, its role and the rule, before any large
//! allocation. `open` itself uses `O_NONBLOCK`, so that a FIFO swapped in after the check cannot
//! hang the process either (it has no effect on regular files).

use std::fs::{self, File, Metadata, OpenOptions};
use std::io::{self, Read};
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

/// One kind of input file and the largest size the runtime reads of it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FileKind {
    /// What the file is, for messages ("manifest", "concept file", "image").
    pub role: &'static str,
    /// Largest accepted size in bytes.
    pub max_bytes: u64,
}

const MIB: u64 = 1 << 20;

/// `elite.json`: a few kB in practice.
pub const MANIFEST: FileKind = FileKind {
    role: "manifest",
    max_bytes: 4 * MIB,
};
/// `tokenizer.json`: CLIP's BPE vocabulary is 1.7 MB.
pub const TOKENIZER: FileKind = FileKind {
    role: "tokenizer",
    max_bytes: 64 * MIB,
};
/// A concept saved by `encode`: 262 × C_txt floats (0.8 MB at C_txt = 768).
pub const CONCEPT: FileKind = FileKind {
    role: "concept file",
    max_bytes: 64 * MIB,
};
/// A subject image. Pillow's pixel limit (178,956,970) as a PNG or JPEG of a photograph is
/// well under 256 MiB; the pixel limit itself is checked from the header (image_decode.rs).
pub const IMAGE: FileKind = FileKind {
    role: "image",
    max_bytes: 256 * MIB,
};
/// The subject's object mask: an image of the same size.
pub const MASK: FileKind = FileKind {
    role: "mask",
    max_bytes: 256 * MIB,
};
/// A cache record (checksum stamps).
pub const CACHE_RECORD: FileKind = FileKind {
    role: "cache record",
    max_bytes: 4 * MIB,
};
/// A graph, its external data or another file a manifest lists: the full-size fp32 UNet's
/// external data is 3.4 GB, SDXL's 10 GB. These are hashed in a streaming loop, never held.
pub const BUNDLE_FILE: FileKind = FileKind {
    role: "bundle file",
    max_bytes: 64 * 1024 * MIB,
};
/// `--init-latents` (`.npy`): the largest latents a run takes, 64 × 4 × 512 × 512 float64
/// values (537 MB), fit; the exact size is checked against the header's shape before reading.
pub const INIT_LATENTS: FileKind = FileKind {
    role: "initial latents",
    max_bytes: 1024 * MIB,
};

#[derive(Debug, thiserror::Error)]
pub enum FileError {
    #[error("{path}: {role} not found")]
    NotFound { path: PathBuf, role: &'static str },

    #[error("{path}: {role} is not a regular file (it is {found}); give a regular file")]
    NotRegular {
        path: PathBuf,
        role: &'static str,
        found: &'static str,
    },

    #[error("{path}: {role} is empty (0 bytes)")]
    Empty { path: PathBuf, role: &'static str },

    #[error("{path}: {role} is {bytes} bytes, over the limit of {limit} bytes for a {role}")]
    TooLarge {
        path: PathBuf,
        role: &'static str,
        bytes: u64,
        limit: u64,
    },

    #[error("{path}: cannot read {role}: {source}")]
    Io {
        path: PathBuf,
        role: &'static str,
        #[source]
        source: io::Error,
    },
}

impl FileError {
    /// The file the error is about.
    pub fn path(&self) -> &Path {
        match self {
            Self::NotFound { path, .. }
            | Self::NotRegular { path, .. }
            | Self::Empty { path, .. }
            | Self::TooLarge { path, .. }
            | Self::Io { path, .. } => path,
        }
    }
}

/// What a non-regular file is, for the message.
fn describe(metadata: &Metadata) -> &'static str {
    let t = metadata.file_type();
    if t.is_dir() {
        "a directory"
    } else if t.is_fifo() {
        "a FIFO"
    } else if t.is_char_device() {
        "a character device"
    } else if t.is_block_device() {
        "a block device"
    } else if t.is_socket() {
        "a socket"
    } else {
        "not a regular file"
    }
}

/// Checks that `path` (after following links) is a non-empty regular file of at most
/// `kind.max_bytes`, without opening it; returns its metadata.
pub fn check_regular(path: &Path, kind: FileKind) -> Result<Metadata, FileError> {
    let metadata = std::fs::metadata(path).map_err(|source| match source.kind() {
        io::ErrorKind::NotFound => FileError::NotFound {
            path: path.to_path_buf(),
            role: kind.role,
        },
        _ => FileError::Io {
            path: path.to_path_buf(),
            role: kind.role,
            source,
        },
    })?;
    check_metadata(path, kind, &metadata)?;
    Ok(metadata)
}

fn check_metadata(path: &Path, kind: FileKind, metadata: &Metadata) -> Result<(), FileError> {
    if !metadata.is_file() {
        return Err(FileError::NotRegular {
            path: path.to_path_buf(),
            role: kind.role,
            found: describe(metadata),
        });
    }
    if metadata.len() == 0 {
        return Err(FileError::Empty {
            path: path.to_path_buf(),
            role: kind.role,
        });
    }
    if metadata.len() > kind.max_bytes {
        return Err(FileError::TooLarge {
            path: path.to_path_buf(),
            role: kind.role,
            bytes: metadata.len(),
            limit: kind.max_bytes,
        });
    }
    Ok(())
}

/// Opens a regular file of at most `kind.max_bytes` for reading (see [`check_regular`]); the
/// opened file is checked again, so a file swapped after the first check is caught too.
pub fn open_regular(path: &Path, kind: FileKind) -> Result<(File, Metadata), FileError> {
    check_regular(path, kind)?;
    let io_err = |source| FileError::Io {
        path: path.to_path_buf(),
        role: kind.role,
        source,
    };
    let file = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(path)
        .map_err(io_err)?;
    let metadata = file.metadata().map_err(io_err)?;
    check_metadata(path, kind, &metadata)?;
    Ok((file, metadata))
}

/// Reads a whole regular file of at most `kind.max_bytes`. The read itself stops one byte past
/// the cap, so a file that grows after the size check cannot make it allocate more.
pub fn read_capped(path: &Path, kind: FileKind) -> Result<Vec<u8>, FileError> {
    let (file, metadata) = open_regular(path, kind)?;
    let mut bytes = Vec::with_capacity(metadata.len() as usize);
    file.take(kind.max_bytes + 1)
        .read_to_end(&mut bytes)
        .map_err(|source| FileError::Io {
            path: path.to_path_buf(),
            role: kind.role,
            source,
        })?;
    if bytes.len() as u64 > kind.max_bytes {
        return Err(FileError::TooLarge {
            path: path.to_path_buf(),
            role: kind.role,
            bytes: bytes.len() as u64,
            limit: kind.max_bytes,
        });
    }
    Ok(bytes)
}

/// The process id a temporary's name carries, if it is one of ours: `<key>.tmp-<pid>` (a graph
/// being saved into the cache), `.elite-<pid>-<n>.tmp` (a file being written atomically, see
/// [`crate::output`]) or `.<name>.<pid>.tmp` (the older form of the latter).
fn temporary_owner(name: &str) -> Option<u32> {
    let pid = if let Some((stem, pid)) = name.rsplit_once(".tmp-") {
        (!stem.is_empty()).then_some(pid)?
    } else if let Some(rest) = name
        .strip_prefix(".elite-")
        .and_then(|r| r.strip_suffix(".tmp"))
    {
        let (pid, n) = rest.split_once('-')?;
        n.bytes().all(|b| b.is_ascii_digit()).then_some(pid)?
    } else {
        let inner = name.strip_prefix('.')?.strip_suffix(".tmp")?;
        let (stem, pid) = inner.rsplit_once('.')?;
        (!stem.is_empty()).then_some(pid)?
    };
    // Digits only: `u32::from_str` would also take a leading `+`.
    if pid.is_empty() || !pid.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    pid.parse().ok()
}

/// True while process `pid` exists (in this PID namespace).
fn process_alive(pid: u32) -> bool {
    Path::new("/proc").join(pid.to_string()).exists()
}

/// Removes the temporaries in `dir` (not below it) that a process left behind when it was
/// killed before it could rename or remove them: entries named like ours (see
/// [`temporary_owner`]) whose process no longer exists. Temporaries of running processes,
/// including this one, are kept. Returns what was removed; failures are ignored (another
/// process may be cleaning up too).
///
/// Call it on the graph cache directory (`<cache>/graphs`) before saving a graph, and on an
/// output directory before writing outputs there. Across PID namespaces (containers sharing a
/// cache) a live process of another namespace looks dead: share a cache only within one.
pub fn remove_stale_temporaries(dir: &Path) -> Vec<PathBuf> {
    let Ok(entries) = fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut removed = Vec::new();
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(pid) = name.to_str().and_then(temporary_owner) else {
            continue;
        };
        if pid == std::process::id() || process_alive(pid) {
            continue;
        }
        let path = entry.path();
        // The entry itself, never what a symbolic link points to.
        let gone = match entry.file_type() {
            Ok(t) if t.is_dir() => fs::remove_dir_all(&path).is_ok(),
            Ok(_) => fs::remove_file(&path).is_ok(),
            Err(_) => false,
        };
        if gone {
            removed.push(path);
        }
    }
    removed
}

/// [`read_capped`] for text files: the bytes must be UTF-8.
pub fn read_capped_string(path: &Path, kind: FileKind) -> Result<String, FileError> {
    let bytes = read_capped(path, kind)?;
    String::from_utf8(bytes).map_err(|e| FileError::Io {
        path: path.to_path_buf(),
        role: kind.role,
        source: io::Error::new(io::ErrorKind::InvalidData, e.utf8_error()),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const SMALL: FileKind = FileKind {
        role: "test file",
        max_bytes: 8,
    };

    #[test]
    fn reads_small_regular_files() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a");
        std::fs::write(&path, b"12345678").unwrap();
        assert_eq!(read_capped(&path, SMALL).unwrap(), b"12345678");
        let link = dir.path().join("link");
        std::os::unix::fs::symlink(&path, &link).unwrap();
        assert_eq!(read_capped(&link, SMALL).unwrap(), b"12345678");
    }

    #[test]
    fn refuses_what_is_not_a_small_regular_file() {
        let dir = tempfile::tempdir().unwrap();
        let big = dir.path().join("big");
        std::fs::write(&big, b"123456789").unwrap();
        let err = read_capped(&big, SMALL).unwrap_err().to_string();
        assert!(err.contains("over the limit of 8 bytes"), "{err}");

        let empty = dir.path().join("empty");
        std::fs::write(&empty, b"").unwrap();
        assert!(matches!(
            read_capped(&empty, SMALL),
            Err(FileError::Empty { .. })
        ));

        let zero = dir.path().join("zero");
        std::os::unix::fs::symlink("/dev/zero", &zero).unwrap();
        let err = read_capped(&zero, SMALL).unwrap_err().to_string();
        assert!(err.contains("a character device"), "{err}");

        let fifo = dir.path().join("fifo");
        let name = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
        // SAFETY: a valid NUL-terminated path.
        assert_eq!(unsafe { libc::mkfifo(name.as_ptr(), 0o600) }, 0);
        let err = read_capped(&fifo, SMALL).unwrap_err().to_string();
        assert!(err.contains("a FIFO"), "{err}");

        let err = read_capped(dir.path(), SMALL).unwrap_err().to_string();
        assert!(err.contains("a directory"), "{err}");
        assert!(matches!(
            read_capped(&dir.path().join("nope"), SMALL),
            Err(FileError::NotFound { .. })
        ));
    }

    /// A process id that cannot exist (Linux's pid_max is at most 2^22).
    const DEAD: u32 = 4_000_000_000;

    #[test]
    fn temporary_names_carry_their_owner() {
        assert_eq!(temporary_owner("0123abcd.tmp-4242"), Some(4242));
        assert_eq!(temporary_owner(".o-0.png.77.tmp"), Some(77));
        assert_eq!(temporary_owner(".abc.json.5.tmp"), Some(5));
        assert_eq!(temporary_owner(".elite-77-3.tmp"), Some(77));
        assert_eq!(temporary_owner(".elite-notes.tmp"), None);
        for name in [
            "o.png",
            ".tmp-5",
            "x.tmp-",
            "x.tmp-+5",
            "x.tmp-5a",
            "..5.tmp",
            ".x.tmp",
            ".x.+5.tmp",
            "x.5.tmp",
        ] {
            assert_eq!(temporary_owner(name), None, "{name}");
        }
    }

    #[test]
    fn stale_temporaries_of_dead_processes_are_removed() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let stale_dir = d.join(format!("0123abcd.tmp-{DEAD}"));
        fs::create_dir(&stale_dir).unwrap();
        fs::write(stale_dir.join("unet.onnx"), b"half").unwrap();
        let stale_file = d.join(format!(".o-0.png.{DEAD}.tmp"));
        fs::write(&stale_file, b"half").unwrap();
        // Kept: ours, a live process's (pid 1 always exists), and anything not named like ours.
        let mine = d.join(format!(".o-1.png.{}.tmp", std::process::id()));
        let live = d.join("0123abcd.tmp-1");
        let other = d.join(format!("notes.{DEAD}.tmp"));
        let entry = d.join("0123abcd");
        for path in [&mine, &live, &other] {
            fs::write(path, b"x").unwrap();
        }
        fs::create_dir(&entry).unwrap();
        // A link named like a stale temporary is removed itself, not its target.
        let target = d.join("target");
        fs::create_dir(&target).unwrap();
        fs::write(target.join("keep"), b"x").unwrap();
        let link = d.join(format!("ffff.tmp-{DEAD}"));
        std::os::unix::fs::symlink(&target, &link).unwrap();

        let mut removed = crate::files::remove_stale_temporaries(d);
        removed.sort();
        let mut expected = vec![stale_dir, stale_file, link];
        expected.sort();
        assert_eq!(removed, expected);
        for kept in [&mine, &live, &other, &entry, &target.join("keep")] {
            assert!(kept.exists(), "{}", kept.display());
        }
        assert!(crate::files::remove_stale_temporaries(&d.join("missing")).is_empty());
    }
}

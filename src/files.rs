//! Reading input files that may come from strangers: regular files only, size capped before
//! reading, and a read that stops at the cap even if the file grows meanwhile.
//!
//! Every file the runtime reads goes through [`open_regular`] or [`read_capped`], so that a
//! symlink to `/dev/zero`, a FIFO (which would block `open` forever), a directory or a sparse
//! gigabyte file gets a specific error naming the file, its role and the rule, before any large
//! allocation. `open` itself uses `O_NONBLOCK`, so that a FIFO swapped in after the check cannot
//! hang the process either (it has no effect on regular files).

use std::fs::{File, Metadata, OpenOptions};
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
}

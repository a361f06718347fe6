//! `--init-latents`: the initial noise of a run from a NumPy `.npy` file, read without trusting it.
//!
//! The header is parsed here (not by a general `.npy` reader) so that everything it declares is
//! checked before the data is read: the shape must be the run's latent shape — a header that
//! claims 10¹⁵ elements is refused before anything is allocated — and the file's size must be
//! exactly the header plus that many values. Any valid NumPy layout is taken: C or Fortran order
//! (returned in standard layout either way), little- or big-endian, float16, float32 or float64
//! (converted to float32). Every value must be finite and within ±[`limits::MAX_ABS_VALUE`]
//! after conversion, so that NaN is blamed on the file rather than on the UNet's output.

use std::io::Read;
use std::path::Path;

use ndarray::{Array4, ShapeBuilder};

use crate::files::{self, FileError};
use crate::limits;

/// Longest header accepted (NumPy itself refuses headers over 10 000 bytes by default).
pub const MAX_HEADER_BYTES: usize = 10_000;

const MAGIC: &[u8] = b"\x93NUMPY";

#[derive(Debug, thiserror::Error)]
pub enum LatentsError {
    /// Not a regular file, too large, or unreadable.
    #[error(transparent)]
    File(#[from] FileError),
    /// Not a `.npy` file of float latents; `message` is the rule it breaks.
    #[error("{name}: invalid initial latents (.npy): {message}")]
    Invalid { name: String, message: String },
    /// A valid array of another shape than the run's latents.
    #[error(
        "{name}: initial latents have shape {found:?}, this run needs {expected:?} \
         ([num_images, latent_channels, height / vae_scale_factor, width / vae_scale_factor])"
    )]
    Shape {
        name: String,
        found: Vec<usize>,
        expected: [usize; 4],
    },
}

/// Byte order of the stored values.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ByteOrder {
    Little,
    Big,
}

/// What a `.npy` header declares.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NpyHeader {
    pub order: ByteOrder,
    /// Bytes per value: 2, 4 or 8 (float16, float32, float64).
    pub float_bytes: usize,
    pub fortran_order: bool,
    pub shape: Vec<usize>,
    /// Where the data starts: magic, version, length field and header.
    pub data_offset: usize,
}

/// Reads initial latents of shape `expected` from the `.npy` file at `path`: a regular file
/// within [`files::INIT_LATENTS`]'s cap whose header is checked before its data is read.
pub fn read_init_latents(path: &Path, expected: [usize; 4]) -> Result<Array4<f32>, LatentsError> {
    let name = path.display().to_string();
    let invalid = |message: String| LatentsError::Invalid {
        name: name.clone(),
        message,
    };
    let (file, metadata) = files::open_regular(path, files::INIT_LATENTS)?;
    let io = |source| FileError::Io {
        path: path.to_path_buf(),
        role: files::INIT_LATENTS.role,
        source,
    };
    // The header first, then exactly the data it implies.
    let prefix_len = (metadata.len() as usize).min(12 + MAX_HEADER_BYTES);
    let mut reader = file.take(metadata.len());
    let mut prefix = vec![0u8; prefix_len];
    reader.read_exact(&mut prefix).map_err(io)?;
    let header = parse_header(&prefix).map_err(invalid)?;
    let data_len = check_header(&header, &name, expected)?;
    check_file_size(header.data_offset, data_len, metadata.len()).map_err(invalid)?;
    let mut bytes = prefix;
    bytes.resize(header.data_offset + data_len, 0);
    reader
        .read_exact(&mut bytes[prefix_len..])
        .map_err(|e| match e.kind() {
            std::io::ErrorKind::UnexpectedEof => {
                invalid("the file shrank while it was read".into())
            }
            _ => LatentsError::File(io(e)),
        })?;
    decode_data(&header, &bytes[header.data_offset..], &name)
}

/// [`read_init_latents`] for a `.npy` file already in memory (an upload); `name` names it in
/// errors.
pub fn decode_init_latents(
    bytes: &[u8],
    name: &str,
    expected: [usize; 4],
) -> Result<Array4<f32>, LatentsError> {
    let invalid = |message: String| LatentsError::Invalid {
        name: name.to_string(),
        message,
    };
    let header = parse_header(bytes).map_err(invalid)?;
    let data_len = check_header(&header, name, expected)?;
    check_file_size(header.data_offset, data_len, bytes.len() as u64).map_err(invalid)?;
    decode_data(&header, &bytes[header.data_offset..], name)
}

/// Checks the declared shape against `expected` (before any data is read); returns the data's
/// length in bytes.
fn check_header(
    header: &NpyHeader,
    name: &str,
    expected: [usize; 4],
) -> Result<usize, LatentsError> {
    if header.shape != expected {
        return Err(LatentsError::Shape {
            name: name.to_string(),
            found: header.shape.clone(),
            expected,
        });
    }
    expected
        .iter()
        .try_fold(header.float_bytes, |n, &d| n.checked_mul(d))
        .ok_or_else(|| LatentsError::Invalid {
            name: name.to_string(),
            message: format!("shape {expected:?} does not fit in memory"),
        })
}

fn check_file_size(offset: usize, data_len: usize, file_len: u64) -> Result<(), String> {
    let want = offset as u64 + data_len as u64;
    match file_len.cmp(&want) {
        std::cmp::Ordering::Equal => Ok(()),
        std::cmp::Ordering::Less => Err(format!(
            "truncated: the header declares {data_len} bytes of data, the file has {}",
            file_len.saturating_sub(offset as u64)
        )),
        std::cmp::Ordering::Greater => Err(format!(
            "{} bytes follow the {data_len} bytes of data the header declares",
            file_len - want
        )),
    }
}

/// The values of `data` (exactly the header's size) as float32 in standard layout, checked.
fn decode_data(header: &NpyHeader, data: &[u8], name: &str) -> Result<Array4<f32>, LatentsError> {
    let values: Vec<f32> = match (header.float_bytes, header.order) {
        (2, order) => data
            .chunks_exact(2)
            .map(|c| f16_to_f32(u16_from(c, order)))
            .collect(),
        (4, order) => data
            .chunks_exact(4)
            .map(|c| f32::from_bits(u32_from(c, order)))
            .collect(),
        (_, order) => data
            .chunks_exact(8)
            .map(|c| f64::from_bits(u64_from(c, order)) as f32)
            .collect(),
    };
    let s = &header.shape;
    let shape = (s[0], s[1], s[2], s[3]);
    let array = if header.fortran_order {
        Array4::from_shape_vec(shape.f(), values)
    } else {
        Array4::from_shape_vec(shape, values)
    }
    .map_err(|e| LatentsError::Invalid {
        name: name.to_string(),
        message: e.to_string(),
    })?;
    // Fortran order is valid NumPy: the rest of the runtime wants standard layout.
    let array = array.as_standard_layout().into_owned();
    let max = limits::MAX_ABS_VALUE;
    if let Some((index, v)) = array
        .indexed_iter()
        .find(|(_, v)| !(v.is_finite() && v.abs() <= max))
    {
        return Err(LatentsError::Invalid {
            name: name.to_string(),
            message: format!(
                "value {v} at {:?} (as float32); values must be finite and within ±{max}",
                [index.0, index.1, index.2, index.3]
            ),
        });
    }
    Ok(array)
}

fn u16_from(c: &[u8], order: ByteOrder) -> u16 {
    let b = [c[0], c[1]];
    match order {
        ByteOrder::Little => u16::from_le_bytes(b),
        ByteOrder::Big => u16::from_be_bytes(b),
    }
}

fn u32_from(c: &[u8], order: ByteOrder) -> u32 {
    let b = [c[0], c[1], c[2], c[3]];
    match order {
        ByteOrder::Little => u32::from_le_bytes(b),
        ByteOrder::Big => u32::from_be_bytes(b),
    }
}

fn u64_from(c: &[u8], order: ByteOrder) -> u64 {
    let b = [c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]];
    match order {
        ByteOrder::Little => u64::from_le_bytes(b),
        ByteOrder::Big => u64::from_be_bytes(b),
    }
}

/// IEEE half precision to single (exact: every half is a single).
fn f16_to_f32(bits: u16) -> f32 {
    let negative = bits >> 15 == 1;
    let exp = u32::from((bits >> 10) & 0x1f);
    let mant = u32::from(bits & 0x3ff);
    let magnitude = match exp {
        // Zero and subnormals: mant · 2⁻²⁴, exact in single precision.
        0 => mant as f32 * f32::powi(2.0, -24),
        0x1f => f32::from_bits((0xff << 23) | (mant << 13)),
        e => f32::from_bits(((e + 127 - 15) << 23) | (mant << 13)),
    };
    if negative {
        -magnitude
    } else {
        magnitude
    }
}

/// Parses the magic, version, header length and header dictionary at the start of `bytes`
/// (which may hold more, e.g. the data); the rule broken otherwise.
pub fn parse_header(bytes: &[u8]) -> Result<NpyHeader, String> {
    if bytes.len() < 10 || &bytes[..6] != MAGIC {
        return Err("no .npy magic (\\x93NUMPY) at the start".into());
    }
    let (major, minor) = (bytes[6], bytes[7]);
    let (len, start) = match major {
        1 => (usize::from(u16::from_le_bytes([bytes[8], bytes[9]])), 10),
        2 | 3 if bytes.len() >= 12 => {
            let n = u32::from_le_bytes([bytes[8], bytes[9], bytes[10], bytes[11]]);
            (usize::try_from(n).unwrap_or(usize::MAX), 12)
        }
        2 | 3 => return Err("truncated header".into()),
        _ => return Err(format!("unsupported .npy version {major}.{minor}")),
    };
    if len > MAX_HEADER_BYTES {
        return Err(format!(
            "header of {len} bytes, over the limit of {MAX_HEADER_BYTES}"
        ));
    }
    let end = start + len;
    let text = bytes
        .get(start..end)
        .ok_or_else(|| format!("truncated: the header declares {len} bytes"))?;
    // Versions 1 and 2 are latin-1, 3 is UTF-8; the keys and values we accept are ASCII.
    let text = std::str::from_utf8(text).map_err(|_| "header is not ASCII text".to_string())?;
    let dict = parse_dict(text)?;
    let (order, float_bytes) = parse_descr(&dict.descr)?;
    Ok(NpyHeader {
        order,
        float_bytes,
        fortran_order: dict.fortran_order,
        shape: dict.shape,
        data_offset: end,
    })
}

struct Dict {
    descr: String,
    fortran_order: bool,
    shape: Vec<usize>,
}

/// The dtype string: a byte order and `f2`, `f4` or `f8`.
fn parse_descr(descr: &str) -> Result<(ByteOrder, usize), String> {
    let native = if cfg!(target_endian = "big") {
        ByteOrder::Big
    } else {
        ByteOrder::Little
    };
    let refuse = || {
        format!(
            "dtype `{}` is not a float type; initial latents are float32 (float16 and float64 \
             are converted)",
            crate::display::escape(descr)
        )
    };
    let mut chars = descr.chars();
    let order = match chars.next() {
        Some('<') => ByteOrder::Little,
        Some('>') => ByteOrder::Big,
        Some('=') => native,
        _ => return Err(refuse()),
    };
    let bytes = match chars.as_str() {
        "f2" => 2,
        "f4" => 4,
        "f8" => 8,
        _ => return Err(refuse()),
    };
    Ok((order, bytes))
}

/// A cursor over the header's Python dict literal.
struct Cursor<'a> {
    text: &'a [u8],
    at: usize,
}

impl Cursor<'_> {
    fn skip_space(&mut self) {
        while self.text.get(self.at).is_some_and(u8::is_ascii_whitespace) {
            self.at += 1;
        }
    }

    fn peek(&mut self) -> Option<u8> {
        self.skip_space();
        self.text.get(self.at).copied()
    }

    fn expect(&mut self, c: u8) -> Result<(), String> {
        if self.peek() == Some(c) {
            self.at += 1;
            Ok(())
        } else {
            Err(format!(
                "header is not a Python dict literal: expected `{}` at byte {}",
                c as char, self.at
            ))
        }
    }

    fn string(&mut self) -> Result<String, String> {
        let quote = match self.peek() {
            Some(q @ (b'\'' | b'"')) => q,
            _ => return Err(format!("expected a string at byte {}", self.at)),
        };
        let start = self.at + 1;
        let len = self.text[start..]
            .iter()
            .position(|&b| b == quote || b == b'\\')
            .ok_or("unterminated string in the header")?;
        if self.text[start + len] == b'\\' {
            return Err("escapes in header strings are not supported".into());
        }
        self.at = start + len + 1;
        Ok(String::from_utf8_lossy(&self.text[start..start + len]).into_owned())
    }

    fn word(&mut self) -> &[u8] {
        self.skip_space();
        let start = self.at;
        while self
            .text
            .get(self.at)
            .is_some_and(u8::is_ascii_alphanumeric)
        {
            self.at += 1;
        }
        &self.text[start..self.at]
    }

    fn boolean(&mut self) -> Result<bool, String> {
        match self.word() {
            b"True" => Ok(true),
            b"False" => Ok(false),
            _ => Err("`fortran_order` must be True or False".into()),
        }
    }

    /// A tuple of non-negative integers: `()`, `(5,)`, `(1, 4, 64, 64)`.
    fn shape(&mut self) -> Result<Vec<usize>, String> {
        self.expect(b'(')
            .map_err(|_| "`shape` must be a tuple of integers".to_string())?;
        let mut dims = Vec::new();
        loop {
            if self.peek() == Some(b')') {
                self.at += 1;
                return Ok(dims);
            }
            let digits = self.word();
            if digits.is_empty() || digits.len() > 19 || !digits.iter().all(u8::is_ascii_digit) {
                return Err("`shape` must be a tuple of non-negative integers".into());
            }
            let n: u64 = std::str::from_utf8(digits)
                .ok()
                .and_then(|d| d.parse().ok())
                .ok_or("`shape` must be a tuple of non-negative integers")?;
            dims.push(usize::try_from(n).map_err(|_| "`shape` entry too large".to_string())?);
            if dims.len() > 32 {
                return Err("`shape` has more than 32 dimensions".into());
            }
            match self.peek() {
                Some(b',') => self.at += 1,
                Some(b')') => {}
                _ => return Err("`shape` must be a tuple of integers".into()),
            }
        }
    }
}

/// `{'descr': '<f4', 'fortran_order': False, 'shape': (1, 4, 64, 64), }` and its padding:
/// exactly these three keys, once each.
fn parse_dict(text: &str) -> Result<Dict, String> {
    let mut c = Cursor {
        text: text.as_bytes(),
        at: 0,
    };
    let (mut descr, mut fortran, mut shape) = (None, None, None);
    c.expect(b'{')?;
    loop {
        if c.peek() == Some(b'}') {
            c.at += 1;
            break;
        }
        let key = c.string()?;
        c.expect(b':')?;
        let duplicate = match key.as_str() {
            "descr" => {
                if c.peek() == Some(b'[') {
                    return Err("structured dtypes are not supported; use a float32 array".into());
                }
                descr.replace(c.string()?).is_some()
            }
            "fortran_order" => fortran.replace(c.boolean()?).is_some(),
            "shape" => shape.replace(c.shape()?).is_some(),
            other => {
                return Err(format!(
                    "unexpected header key `{}`",
                    crate::display::escape(other)
                ))
            }
        };
        if duplicate {
            return Err(format!("header key `{key}` appears twice"));
        }
        match c.peek() {
            Some(b',') => c.at += 1,
            Some(b'}') => {}
            _ => return Err("header is not a Python dict literal".into()),
        }
    }
    if c.peek().is_some() {
        return Err("text after the header's dict".into());
    }
    Ok(Dict {
        descr: descr.ok_or("header has no `descr`")?,
        fortran_order: fortran.ok_or("header has no `fortran_order`")?,
        shape: shape.ok_or("header has no `shape`")?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn half_precision_converts_exactly() {
        for (bits, value) in [
            (0x3c00u16, 1.0f32),
            (0xc000, -2.0),
            (0x3555, 0.333_251_95),
            (0x7bff, 65504.0),
            (0x0001, 5.960_464_5e-8),
            (0x8001, -5.960_464_5e-8),
            (0x0000, 0.0),
        ] {
            assert_eq!(f16_to_f32(bits), value, "{bits:#06x}");
        }
        assert_eq!(f16_to_f32(0x8000).to_bits(), (-0.0f32).to_bits());
        assert_eq!(f16_to_f32(0x7c00), f32::INFINITY);
        assert!(f16_to_f32(0x7e00).is_nan());
    }

    #[test]
    fn headers_numpy_writes_parse() {
        let header = |dict: &str| {
            let mut bytes = MAGIC.to_vec();
            bytes.extend([1, 0]);
            bytes.extend((dict.len() as u16).to_le_bytes());
            bytes.extend(dict.as_bytes());
            parse_header(&bytes)
        };
        let h = header("{'descr': '<f4', 'fortran_order': False, 'shape': (1, 4, 8, 8), }   \n")
            .unwrap();
        assert_eq!(
            (h.order, h.float_bytes, h.fortran_order, h.shape),
            (ByteOrder::Little, 4, false, vec![1, 4, 8, 8])
        );
        let h = header("{'descr': '>f8', 'fortran_order': True, 'shape': (3,), }\n").unwrap();
        assert_eq!(
            (h.order, h.float_bytes, h.shape),
            (ByteOrder::Big, 8, vec![3])
        );
        assert_eq!(
            header("{'shape': (), 'descr': '<f2', 'fortran_order': False}").map(|h| h.shape),
            Ok(vec![])
        );
        for (dict, rule) in [
            (
                "{'descr': '<i8', 'fortran_order': False, 'shape': (1,)}",
                "dtype `<i8` is not a float type",
            ),
            (
                "{'descr': [('a', '<f4')], 'fortran_order': False, 'shape': (1,)}",
                "structured dtypes",
            ),
            ("{'descr': '<f4', 'fortran_order': False}", "no `shape`"),
            (
                "{'descr': '<f4', 'descr': '<f4', 'fortran_order': False, 'shape': (1,)}",
                "appears twice",
            ),
            (
                "{'descr': '<f4', 'fortran_order': 0, 'shape': (1,)}",
                "True or False",
            ),
            (
                "{'descr': '<f4', 'fortran_order': False, 'shape': (-1,)}",
                "non-negative",
            ),
            (
                "{'descr': '<f4', 'fortran_order': False, 'shape': (99999999999999999999,)}",
                "non-negative",
            ),
            (
                "{'descr': '<f4', 'fortran_order': False, 'shape': (1,), 'x': 1}",
                "unexpected header key `x`",
            ),
            (
                "{'descr': '<f4', 'fortran_order': False, 'shape': (1,)} x",
                "text after",
            ),
            (
                "{'descr': '<f\\4', 'fortran_order': False, 'shape': (1,)}",
                "escapes",
            ),
        ] {
            let err = header(dict).unwrap_err();
            assert!(err.contains(rule), "{dict}: {err}");
        }
    }
}

//! Hostile images and masks (issue 9, image classes): every limit is checked from the header
//! before anything large is allocated, and every refusal names the input and the rule.
//!
//! The bombs are crafted here in memory (a few bytes to a few hundred kB each; nothing large in
//! git). `bombs_fail_fast_under_a_4_gib_address_space` re-runs this test binary as a child with
//! its address space capped at 4 GiB (`setrlimit(RLIMIT_AS)`, what `prlimit --as=4294967296`
//! does): an allocation the size of a bomb's declared image then aborts the child instead of
//! succeeding on a large machine, so the test fails if any limit is checked too late.

use std::io::Write;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use elite_ort::files::FileError;
use elite_ort::image_decode::{self, DecodeError, ImageHeader, ImageLimits};
use elite_ort::mask;

const CHILD_ENV: &str = "ELITE_IMAGE_LIMITS_CHILD";
const ADDRESS_SPACE: u64 = 4 << 30;
/// Each refusal reads a header only: microseconds. One second is generous for a debug build
/// on a loaded machine and still far below the 73 s the full decode of the 30000² PNG took.
const FAST: Duration = Duration::from_secs(1);

fn jpeg_fixture(name: &str) -> Vec<u8> {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/jpeg")
        .join(name);
    std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

// ---- crafted files ----------------------------------------------------------------------

fn crc32(bytes: &[u8]) -> u32 {
    let mut crc = !0_u32;
    for &b in bytes {
        crc ^= u32::from(b);
        for _ in 0..8 {
            crc = if crc & 1 != 0 {
                (crc >> 1) ^ 0xEDB8_8320
            } else {
                crc >> 1
            };
        }
    }
    !crc
}

fn png_chunk(out: &mut Vec<u8>, kind: &[u8; 4], data: &[u8]) {
    out.extend_from_slice(&(data.len() as u32).to_be_bytes());
    let start = out.len();
    out.extend_from_slice(kind);
    out.extend_from_slice(data);
    let crc = crc32(&out[start..]);
    out.extend_from_slice(&crc.to_be_bytes());
}

/// LSB-first bit writer for a deflate stream.
struct Bits {
    out: Vec<u8>,
    acc: u64,
    n: u32,
}

impl Bits {
    fn put(&mut self, value: u32, len: u32) {
        self.acc |= u64::from(value) << self.n;
        self.n += len;
        while self.n >= 8 {
            self.out.push(self.acc as u8);
            self.acc >>= 8;
            self.n -= 8;
        }
    }

    /// A Huffman code is sent most significant bit first.
    fn code(&mut self, code: u32, len: u32) {
        let reversed = code.reverse_bits() >> (32 - len);
        self.put(reversed, len);
    }
}

/// A zlib stream of `n` zero bytes (n ≥ 1): one fixed-Huffman block with a literal 0, then
/// back-references of length 258 at distance 1 (13 bits per 258 bytes), as a real bomb has.
fn zlib_zeros(n: u64) -> Vec<u8> {
    let mut bits = Bits {
        out: vec![0x78, 0xDA],
        acc: 0,
        n: 0,
    };
    bits.put(1, 1); // BFINAL
    bits.put(1, 2); // fixed Huffman
    bits.code(0x30, 8); // literal 0
    let mut left = n - 1;
    while left >= 258 {
        bits.code(0b1100_0101, 8); // length code 285 = 258
        bits.code(0, 5); // distance code 0 = 1
        left -= 258;
    }
    while left >= 3 {
        // length codes 257..=264 are lengths 3..=10, seven bits each
        let len = left.min(10);
        bits.code(1 + (len as u32 - 3), 7);
        bits.code(0, 5);
        left -= len;
    }
    for _ in 0..left {
        bits.code(0x30, 8);
    }
    bits.code(0, 7); // end of block
    if bits.n > 0 {
        bits.put(0, 8 - bits.n);
    }
    // Adler-32 of n zeros: a = 1, b = n mod 65521.
    let adler = ((n % 65_521) as u32) << 16 | 1;
    bits.out.extend_from_slice(&adler.to_be_bytes());
    bits.out
}

/// A complete, valid 1-bit grayscale PNG of `width × height` zeros.
fn png_bomb(width: u32, height: u32) -> Vec<u8> {
    let mut png = b"\x89PNG\r\n\x1a\n".to_vec();
    let mut ihdr = Vec::new();
    ihdr.extend_from_slice(&width.to_be_bytes());
    ihdr.extend_from_slice(&height.to_be_bytes());
    ihdr.extend_from_slice(&[1, 0, 0, 0, 0]); // 1 bit, grayscale
    png_chunk(&mut png, b"IHDR", &ihdr);
    let raw = u64::from(height) * (1 + u64::from(width).div_ceil(8));
    png_chunk(&mut png, b"IDAT", &zlib_zeros(raw));
    png_chunk(&mut png, b"IEND", b"");
    png
}

/// A PNG whose header declares `width × height` RGB but whose data stops after `pad` bytes.
fn png_header_only(width: u32, height: u32, pad: usize) -> Vec<u8> {
    let mut png = b"\x89PNG\r\n\x1a\n".to_vec();
    let mut ihdr = Vec::new();
    ihdr.extend_from_slice(&width.to_be_bytes());
    ihdr.extend_from_slice(&height.to_be_bytes());
    ihdr.extend_from_slice(&[8, 2, 0, 0, 0]);
    png_chunk(&mut png, b"IHDR", &ihdr);
    png_chunk(&mut png, b"IDAT", &vec![0x55; pad]);
    png
}

fn encode_png(image: &image::DynamicImage) -> Vec<u8> {
    let mut out = std::io::Cursor::new(Vec::new());
    image
        .write_to(&mut out, image::ImageFormat::Png)
        .expect("encode");
    out.into_inner()
}

/// A GIF whose logical screen and only frame declare `size × size`, 48 bytes in all.
fn gif_bomb(size: u16) -> Vec<u8> {
    let mut gif = b"GIF89a".to_vec();
    gif.extend_from_slice(&size.to_le_bytes());
    gif.extend_from_slice(&size.to_le_bytes());
    gif.extend_from_slice(&[0x80, 0, 0]); // global colour table of 2 entries
    gif.extend_from_slice(&[0, 0, 0, 255, 255, 255]);
    gif.push(0x2C);
    gif.extend_from_slice(&[0, 0, 0, 0]);
    gif.extend_from_slice(&size.to_le_bytes());
    gif.extend_from_slice(&size.to_le_bytes());
    gif.push(0);
    gif.push(2); // LZW minimum code size
    let data = [0x44_u8; 15]; // LZW codes; never reached
    gif.push(data.len() as u8);
    gif.extend_from_slice(&data);
    gif.push(0); // end of the frame's data
    gif.push(0x3B); // trailer

    gif
}

/// A JPEG with its SOF dimensions replaced.
fn jpeg_claiming(mut jpeg: Vec<u8>, width: u16, height: u16) -> Vec<u8> {
    let mut i = 2;
    while i + 9 < jpeg.len() {
        let marker = jpeg[i + 1];
        let len = usize::from(u16::from_be_bytes([jpeg[i + 2], jpeg[i + 3]]));
        if (0xC0..=0xC2).contains(&marker) {
            jpeg[i + 5..i + 7].copy_from_slice(&height.to_be_bytes());
            jpeg[i + 7..i + 9].copy_from_slice(&width.to_be_bytes());
            return jpeg;
        }
        i += 2 + len;
    }
    panic!("no SOF marker");
}

/// A progressive JPEG with its last scan repeated until there are `scans` scans: libjpeg
/// warns about the bogus progression and goes on, one pass over the image per scan.
fn jpeg_scan_bomb(jpeg: &[u8], scans: usize) -> Vec<u8> {
    let sos: Vec<usize> = (0..jpeg.len() - 1)
        .filter(|&i| jpeg[i] == 0xFF && jpeg[i + 1] == 0xDA)
        .collect();
    let last = *sos.last().expect("a scan");
    let eoi = jpeg.len() - 2;
    let mut out = jpeg[..eoi].to_vec();
    for _ in sos.len()..scans {
        out.extend_from_slice(&jpeg[last..eoi]);
    }
    out.extend_from_slice(b"\xFF\xD9");
    out
}

// ---- checks -----------------------------------------------------------------------------

fn assert_too_many_pixels(result: Result<impl Sized, DecodeError>, what: &str, took: Duration) {
    let err = match result {
        Ok(_) => panic!("{what}: decoded"),
        Err(e) => e,
    };
    let msg = err.to_string();
    assert!(
        matches!(err, DecodeError::TooManyPixels { .. }),
        "{what}: {msg}"
    );
    for needle in ["limit of 178956970 pixels", "--max-image-pixels", what] {
        assert!(msg.contains(needle), "{what}: lacks {needle:?}: {msg}");
    }
    assert!(took < FAST, "{what}: took {took:?}");
    println!("{what}: refused in {took:?}: {msg}");
}

fn write(dir: &Path, name: &str, bytes: &[u8]) -> PathBuf {
    let path = dir.join(name);
    std::fs::File::create(&path)
        .and_then(|mut f| f.write_all(bytes))
        .expect("write");
    path
}

/// The bombs of issue 9, from files and from memory. Runs in the capped child.
fn refuse_bombs() {
    let dir = tempfile::tempdir().unwrap();
    let limits = ImageLimits::default();
    let bombs: Vec<(&str, Vec<u8>)> = vec![
        (
            "png-100000.png",
            png_header_only(100_000, 100_000, 1_200_000),
        ),
        ("png-30000.png", png_bomb(30_000, 30_000)),
        (
            "jpeg-65500.jpg",
            jpeg_claiming(jpeg_fixture("chelsea_420_q75.jpg"), 65_500, 65_500),
        ),
        (
            "jpeg-progressive-65500.jpg",
            jpeg_claiming(jpeg_fixture("cat_420_progressive.jpg"), 65_500, 65_500),
        ),
        ("gif-65535.gif", gif_bomb(65_535)),
    ];
    for (name, bytes) in &bombs {
        println!("{name}: {} bytes", bytes.len());
        let path = write(dir.path(), name, bytes);
        let start = Instant::now();
        let result = image_decode::load_image(&path, &limits);
        assert_too_many_pixels(result, name, start.elapsed());
        let start = Instant::now();
        let result = image_decode::decode_rgb(bytes, name, &limits);
        assert_too_many_pixels(result, name, start.elapsed());
        // As a mask of a small image: refused on its header's size, before its pixels.
        let start = Instant::now();
        let err = mask::decode_mask(bytes, name, &ImageHeader::upright(64, 48), &limits)
            .expect_err("mask bomb decoded");
        assert!(
            matches!(err, DecodeError::MaskSizeMismatch { .. }),
            "{name}: {err}"
        );
        assert!(
            start.elapsed() < FAST,
            "{name} as a mask: {:?}",
            start.elapsed()
        );
    }
    assert_eq!(bombs[4].1.len(), 48, "the GIF bomb is 48 bytes");
    // The PNG bomb is a valid PNG: the same construction at a small size decodes to zeros.
    let small = image_decode::decode_rgb(&png_bomb(301, 7), "small.png", &limits).unwrap();
    assert_eq!(small.rgb.dimensions(), (301, 7));
    assert!(small.rgb.iter().all(|&v| v == 0));
    // A mask bomb of the image's own declared size is refused by the pixel limit.
    let header = ImageHeader::upright(30_000, 30_000);
    let start = Instant::now();
    let result = mask::decode_mask(&bombs[1].1, "png-30000.png", &header, &limits);
    assert_too_many_pixels(result, "png-30000.png", start.elapsed());

    // Scans: a progressive file repeating its last scan 600 times stops at the scan limit.
    let scans = jpeg_scan_bomb(&jpeg_fixture("cat_420_progressive.jpg"), 600);
    let start = Instant::now();
    let err = image_decode::decode_rgb(&scans, "scans.jpg", &limits).unwrap_err();
    let msg = err.to_string();
    assert!(msg.contains("more than 500 progressive scans"), "{msg}");
    assert!(start.elapsed() < FAST, "scan bomb: {:?}", start.elapsed());
    println!(
        "scans.jpg: {} bytes, refused in {:?}: {msg}",
        scans.len(),
        start.elapsed()
    );
}

#[test]
fn bombs_fail_fast_under_a_4_gib_address_space() {
    if std::env::var_os(CHILD_ENV).is_some() {
        refuse_bombs();
        return;
    }
    let exe = std::env::current_exe().expect("test binary");
    let mut child = Command::new(exe);
    child
        .args([
            "--exact",
            "bombs_fail_fast_under_a_4_gib_address_space",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(CHILD_ENV, "1");
    // SAFETY: setrlimit is async-signal-safe; nothing else runs between fork and exec.
    unsafe {
        child.pre_exec(|| {
            let limit = libc::rlimit {
                rlim_cur: ADDRESS_SPACE,
                rlim_max: ADDRESS_SPACE,
            };
            if libc::setrlimit(libc::RLIMIT_AS, &limit) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let start = Instant::now();
    let out = child.output().expect("run the capped child");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    println!("{stdout}");
    assert!(
        out.status.success(),
        "capped child failed ({:?}):\n{stdout}\n{stderr}",
        out.status
    );
    assert!(
        stdout.contains("1 passed"),
        "the child ran no test:\n{stdout}"
    );
    println!("child under a 4 GiB address space: {:?}", start.elapsed());
}

#[test]
fn masks_without_object_pixels_are_errors() {
    let limits = ImageLimits::default();
    let image = ImageHeader::upright(8, 6);
    let black = image::DynamicImage::ImageRgb8(image::RgbImage::new(8, 6));
    let err = mask::decode_mask(&encode_png(&black), "black.png", &image, &limits).unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, DecodeError::MaskEmpty { .. }), "{msg}");
    assert!(
        msg.contains("black.png: mask has no object pixels"),
        "{msg}"
    );
    assert!(!msg.contains("alpha"), "{msg}");

    // The object drawn only in the alpha channel (black, transparent around it).
    let alpha_only = image::RgbaImage::from_fn(8, 6, |x, _| {
        image::Rgba([0, 0, 0, if x < 4 { 255 } else { 0 }])
    });
    let png = encode_png(&image::DynamicImage::ImageRgba8(alpha_only));
    let msg = mask::decode_mask(&png, "alpha.png", &image, &limits)
        .unwrap_err()
        .to_string();
    assert!(
        msg.contains("no object pixels") && msg.contains("alpha channel"),
        "{msg}"
    );

    // One object pixel is enough.
    let mut one = image::GrayImage::new(8, 6);
    one.put_pixel(3, 2, image::Luma([1]));
    let png = encode_png(&image::DynamicImage::ImageLuma8(one));
    let m = mask::decode_mask(&png, "one.png", &image, &limits).unwrap();
    assert!(m.get(3, 2, 0) && m.get(3, 2, 2) && !m.get(0, 0, 0));
}

#[test]
fn an_empty_mask_file_says_mask() {
    let dir = tempfile::tempdir().unwrap();
    let empty = write(dir.path(), "empty_mask.png", b"");
    let err = mask::load_mask(&empty, 8, 6).unwrap_err();
    let msg = err.to_string();
    assert!(
        matches!(err, DecodeError::File(FileError::Empty { .. })),
        "{msg}"
    );
    assert!(msg.contains("empty_mask.png: mask is empty"), "{msg}");
}

#[test]
fn a_mask_of_the_stored_size_of_an_exif_rotated_image_mentions_exif() {
    // cat_exif6.jpg is stored 96×64 with EXIF orientation 6: upright it is 64×96.
    let jpeg = jpeg_fixture("cat_exif6.jpg");
    let limits = ImageLimits::default();
    let image = image_decode::decode_rgb(&jpeg, "cat_exif6.jpg", &limits).unwrap();
    assert_eq!(image.rgb.dimensions(), (64, 96));
    let stored =
        image::DynamicImage::ImageLuma8(image::GrayImage::from_pixel(96, 64, [255].into()));
    let err = mask::decode_mask(&encode_png(&stored), "m.png", &image.header, &limits).unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, DecodeError::MaskSizeMismatch { .. }), "{msg}");
    for needle in [
        "m.png: mask is 96×64",
        "64×96",
        "EXIF orientation 6",
        "stored as 96×64",
    ] {
        assert!(msg.contains(needle), "lacks {needle:?}: {msg}");
    }
    let upright =
        image::DynamicImage::ImageLuma8(image::GrayImage::from_pixel(64, 96, [255].into()));
    assert!(mask::decode_mask(&encode_png(&upright), "m.png", &image.header, &limits).is_ok());
}

#[test]
fn image_files_are_regular_and_size_capped() {
    let dir = tempfile::tempdir().unwrap();
    let sparse = dir.path().join("huge.png");
    std::fs::File::create(&sparse)
        .and_then(|f| f.set_len(300 << 20))
        .unwrap();
    let msg = image_decode::load_rgb(&sparse).unwrap_err().to_string();
    assert!(
        msg.contains("huge.png: image is") && msg.contains("over the limit"),
        "{msg}"
    );
    let zero = dir.path().join("zero.png");
    std::os::unix::fs::symlink("/dev/zero", &zero).unwrap();
    let msg = image_decode::load_rgb(&zero).unwrap_err().to_string();
    assert!(msg.contains("a character device"), "{msg}");
    let msg = mask::load_mask(&zero, 8, 6).unwrap_err().to_string();
    assert!(
        msg.contains("zero.png: mask is not a regular file"),
        "{msg}"
    );
}

//! Fuzzing of image and mask decoding and preprocessing, as a bounded stable-Rust test.
//!
//! Seeds: small images in every format the runtime reads (PNG, JPEG baseline and progressive,
//! CMYK and restart-marker JPEGs from the matrix, GIF, BMP, WebP, TIFF). Each case mutates one
//! seed deterministically (fixed-seed PRNG): bit flips, interesting byte values, insertions,
//! deletions, truncation, duplicated spans, and on purpose the header's dimension fields; a
//! PNG's chunk CRCs are recomputed in half of the cases so that mutations reach the decoder
//! behind the checksum. Each input is decoded as an image, then as a mask of the seed's size,
//! and what decodes is preprocessed (squash, normalisation, mask grid).
//!
//! Asserted per case: no panic (the case is reported with its index and its bytes are written
//! to `$ELITE_FUZZ_ARTIFACTS` or the temporary directory), at most `CASE_TIME` per case. The
//! cases run in a child process whose address space is capped at 4 GiB (`RLIMIT_AS`, as
//! `prlimit --as=4294967296` sets it), so an unbounded allocation aborts the child and fails
//! the test. The images' pixel limit is 1 Mpx here (a parameter of the decoders; the default
//! is Pillow's 179 Mpx, tested from the header in `tests/image_limits.rs`), which bounds each
//! case's time and memory.
//!
//! `ELITE_FUZZ_CASES` sets the number of cases (default 2000, a few seconds);
//! `ELITE_FUZZ_SEED` the PRNG seed. The long run and its result are in `tests/FUZZING.md`.

use std::io::Cursor;
use std::os::unix::process::CommandExt;
use std::panic::AssertUnwindSafe;
use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use elite_ort::image_decode::{self, ImageHeader, ImageLimits};
use elite_ort::mask;
use elite_ort::preprocess::{ConceptInputs, PreprocessParams};
use image::{DynamicImage, ImageFormat, Rgba, RgbaImage};

const CHILD_ENV: &str = "ELITE_FUZZ_IMAGES_CHILD";
const ADDRESS_SPACE: u64 = 4 << 30;
const DEFAULT_CASES: u64 = 2000;
const DEFAULT_SEED: u64 = 0x5EED_1A6E;
/// Per case: decoding at most 1 Mpx twice and a 32² squash take milliseconds in a release
/// build and well under a second in a debug one; two seconds flags a hang or a blow-up.
const CASE_TIME: Duration = Duration::from_secs(2);
const LIMITS: ImageLimits = ImageLimits {
    max_pixels: 1 << 20,
};

/// splitmix64: small, fixed, and the same on every machine.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }

    fn byte(&mut self) -> u8 {
        self.next() as u8
    }
}

struct Seed {
    name: String,
    bytes: Vec<u8>,
}

fn pattern(width: u32, height: u32) -> RgbaImage {
    RgbaImage::from_fn(width, height, |x, y| {
        Rgba([
            (x * 37 + y * 11) as u8,
            ((x * 5) ^ (y * 23)) as u8,
            ((x + y) * 19) as u8,
            if (x / 3 + y / 2) % 3 == 0 { 0 } else { 255 },
        ])
    })
}

fn encode(image: &DynamicImage, format: ImageFormat) -> Vec<u8> {
    let mut out = Cursor::new(Vec::new());
    image.write_to(&mut out, format).expect("encode seed");
    out.into_inner()
}

fn seeds() -> Vec<Seed> {
    let rgba = DynamicImage::ImageRgba8(pattern(13, 9));
    let rgb = DynamicImage::ImageRgb8(DynamicImage::ImageRgba8(pattern(17, 11)).to_rgb8());
    let gray = DynamicImage::ImageLuma8(rgb.to_luma8());
    let mut seeds = vec![
        ("rgba.png", encode(&rgba, ImageFormat::Png)),
        ("gray.png", encode(&gray, ImageFormat::Png)),
        ("rgb.jpg", encode(&rgb, ImageFormat::Jpeg)),
        ("gray.jpg", encode(&gray, ImageFormat::Jpeg)),
        ("rgba.gif", encode(&rgba, ImageFormat::Gif)),
        ("rgb.bmp", encode(&rgb, ImageFormat::Bmp)),
        ("rgba.webp", encode(&rgba, ImageFormat::WebP)),
        ("rgb.tiff", encode(&rgb, ImageFormat::Tiff)),
        ("gray.tiff", encode(&gray, ImageFormat::Tiff)),
    ]
    .into_iter()
    .map(|(name, bytes)| Seed {
        name: name.into(),
        bytes,
    })
    .collect::<Vec<_>>();
    // Pillow-written JPEGs of the matrix: progressive, CMYK, restart markers, EXIF.
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/jpeg");
    for name in [
        "odd_422_progressive.jpg",
        "cat_cmyk_progressive.jpg",
        "cup_ycck_adobe.jpg",
        "odd_444_restart_rows.jpg",
        "odd_440_q90.jpg",
        "odd_exif8_progressive.jpg",
        "column_420_progressive.jpg",
    ] {
        let bytes = std::fs::read(dir.join(name)).expect("matrix fixture");
        seeds.push(Seed {
            name: name.into(),
            bytes,
        });
    }
    seeds
}

/// Offsets of the dimension fields in a seed's header (format-aware), to mutate on purpose.
fn dimension_fields(bytes: &[u8]) -> Vec<(usize, usize)> {
    match image::guess_format(bytes) {
        Ok(ImageFormat::Png) => vec![(16, 4), (20, 4)],
        Ok(ImageFormat::Gif) => vec![(6, 2), (8, 2), (18, 2), (20, 2)],
        Ok(ImageFormat::Bmp) => vec![(18, 4), (22, 4)],
        Ok(ImageFormat::WebP) => vec![(24, 3), (27, 3), (21, 4)],
        Ok(ImageFormat::Jpeg) => {
            let mut fields = Vec::new();
            let mut i = 2;
            while i + 9 < bytes.len() && bytes[i] == 0xFF {
                let len = usize::from(u16::from_be_bytes([bytes[i + 2], bytes[i + 3]]));
                if (0xC0..=0xCF).contains(&bytes[i + 1])
                    && ![0xC4, 0xC8, 0xCC].contains(&bytes[i + 1])
                {
                    fields.extend([(i + 5, 2), (i + 7, 2), (i + 9, 1)]);
                }
                if bytes[i + 1] == 0xDA {
                    break;
                }
                i += 2 + len;
            }
            fields
        }
        Ok(ImageFormat::Tiff) => (0..bytes.len().saturating_sub(12))
            .filter(|&i| {
                bytes[i + 1] == 0x01 && matches!(bytes[i], 0x00 | 0x01) && bytes[i + 2] != 0
            })
            .take(4)
            .map(|i| (i + 8, 4))
            .collect(),
        _ => Vec::new(),
    }
}

fn interesting(rng: &mut Rng, len: usize) -> u64 {
    const VALUES: [u64; 10] = [0, 1, 2, 7, 8, 255, 256, 0x7FFF, 0xFFFF, 0xFFFF_FFFF];
    if rng.below(3) == 0 {
        rng.next() & ((1_u64 << (8 * len.min(7))) - 1)
    } else {
        VALUES[rng.below(VALUES.len())]
    }
}

fn mutate(seed: &[u8], rng: &mut Rng) -> Vec<u8> {
    let mut data = seed.to_vec();
    for _ in 0..1 + rng.below(4) {
        let len = data.len().max(1);
        match rng.below(9) {
            0 | 1 => {
                let i = rng.below(len);
                if let Some(b) = data.get_mut(i) {
                    *b ^= 1 << rng.below(8);
                }
            }
            2 => {
                let i = rng.below(len);
                if let Some(b) = data.get_mut(i) {
                    *b = [0, 0xFF, 0x7F, 0x80, 0x01][rng.below(5)];
                }
            }
            3 => {
                let i = rng.below(len + 1).min(data.len());
                let n = 1 + rng.below(16);
                let junk: Vec<u8> = (0..n).map(|_| rng.byte()).collect();
                data.splice(i..i, junk);
            }
            4 => {
                let i = rng.below(len).min(data.len());
                let end = (i + 1 + rng.below(32)).min(data.len());
                data.drain(i..end);
            }
            5 => data.truncate(rng.below(len + 1)),
            6 => {
                let i = rng.below(len).min(data.len());
                let end = (i + 1 + rng.below(64)).min(data.len());
                let span = data[i..end].to_vec();
                let at = rng.below(data.len() + 1).min(data.len());
                data.splice(at..at, span);
            }
            _ => {
                let fields = dimension_fields(&data);
                if fields.is_empty() {
                    continue;
                }
                let (at, width) = fields[rng.below(fields.len())];
                let value = interesting(rng, width);
                for k in 0..width {
                    if let Some(b) = data.get_mut(at + k) {
                        // Big-endian for PNG/JPEG, little for the others: both get exercised.
                        *b = (value >> (8 * k)) as u8;
                    }
                }
            }
        }
    }
    data
}

/// Recomputes every PNG chunk's CRC, so a mutation reaches the decoder behind the checksum.
fn fix_png_crcs(data: &mut [u8]) {
    let mut i = 8;
    while i + 12 <= data.len() {
        let len = u32::from_be_bytes([data[i], data[i + 1], data[i + 2], data[i + 3]]) as usize;
        let Some(end) = (i + 8).checked_add(len).filter(|&e| e + 4 <= data.len()) else {
            return;
        };
        let crc = crc32(&data[i + 4..end]);
        data[end..end + 4].copy_from_slice(&crc.to_be_bytes());
        i = end + 4;
    }
}

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

/// What one case exercises: image decoding, mask decoding against the seed's size, and the
/// preprocessing of whatever decoded.
fn run_case(input: &[u8], seed_header: &ImageHeader) -> (bool, bool) {
    let params = PreprocessParams {
        size: 32,
        grid: 4,
        ..PreprocessParams::default()
    };
    let image = image_decode::decode_rgb(input, "fuzz", &LIMITS);
    let mask = mask::decode_mask(input, "fuzz", seed_header, &LIMITS);
    if let Ok(image) = &image {
        ConceptInputs::new(&image.rgb, None, &params).expect("preprocess a decoded image");
        if let Ok(mask) = &mask {
            if (mask.width(), mask.height()) == image.rgb.dimensions() {
                ConceptInputs::new(&image.rgb, Some(mask), &params).expect("with its mask");
            }
        }
    }
    (image.is_ok(), mask.is_ok())
}

fn fuzz(cases: u64, seed: u64) {
    let seeds = seeds();
    let headers: Vec<ImageHeader> = seeds
        .iter()
        .map(|s| {
            image_decode::decode_rgb(&s.bytes, &s.name, &LIMITS)
                .unwrap_or_else(|e| panic!("seed {} does not decode: {e}", s.name))
                .header
        })
        .collect();
    // Silence the default hook: a panic is caught and reported with its case below.
    std::panic::set_hook(Box::new(|_| {}));
    let mut rng = Rng(seed);
    let (mut decoded, mut masks, mut slowest) = (0_u64, 0_u64, Duration::ZERO);
    let start = Instant::now();
    for case in 0..cases {
        let which = rng.below(seeds.len());
        let mut input = mutate(&seeds[which].bytes, &mut rng);
        if input.starts_with(b"\x89PNG") && rng.below(2) == 0 {
            fix_png_crcs(&mut input);
        }
        let t = Instant::now();
        let outcome =
            std::panic::catch_unwind(AssertUnwindSafe(|| run_case(&input, &headers[which])));
        let took = t.elapsed();
        let failure = match &outcome {
            Err(panic) => Some(format!(
                "panicked: {}",
                panic
                    .downcast_ref::<String>()
                    .cloned()
                    .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                    .unwrap_or_default()
            )),
            Ok(_) if took > CASE_TIME => Some(format!("took {took:?}")),
            Ok(_) => None,
        };
        if let Some(failure) = failure {
            let dir = std::env::var_os("ELITE_FUZZ_ARTIFACTS")
                .map(PathBuf::from)
                .unwrap_or_else(std::env::temp_dir);
            let path = dir.join(format!("fuzz-images-{seed:x}-{case}.bin"));
            let _ = std::fs::write(&path, &input);
            let _ = std::panic::take_hook();
            panic!(
                "case {case} (seed {}, PRNG seed {seed:#x}) {failure}; input written to {}",
                seeds[which].name,
                path.display()
            );
        }
        let (image_ok, mask_ok) = outcome.unwrap_or_default();
        decoded += u64::from(image_ok);
        masks += u64::from(mask_ok);
        slowest = slowest.max(took);
    }
    let _ = std::panic::take_hook();
    println!(
        "fuzz_images: {cases} cases from {} seeds (PRNG seed {seed:#x}) in {:?}: 0 failures; \
         {decoded} decoded as images, {masks} as masks; slowest case {slowest:?}",
        seeds.len(),
        start.elapsed()
    );
}

fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .map(|v| {
            let v = v.trim();
            match v.strip_prefix("0x") {
                Some(hex) => u64::from_str_radix(hex, 16),
                None => v.parse(),
            }
            .unwrap_or_else(|_| panic!("{name}={v} is not a number"))
        })
        .unwrap_or(default)
}

#[test]
fn fuzz_image_and_mask_decoding() {
    let cases = env_u64("ELITE_FUZZ_CASES", DEFAULT_CASES);
    let seed = env_u64("ELITE_FUZZ_SEED", DEFAULT_SEED);
    if std::env::var_os(CHILD_ENV).is_some() {
        fuzz(cases, seed);
        return;
    }
    let exe = std::env::current_exe().expect("test binary");
    let mut child = Command::new(exe);
    child
        .args([
            "--exact",
            "fuzz_image_and_mask_decoding",
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
    let out = child.output().expect("run the capped child");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    println!("{stdout}");
    assert!(
        out.status.success(),
        "fuzz child under a 4 GiB address space failed ({:?}):\n{stdout}\n{stderr}",
        out.status
    );
    assert!(
        stdout.contains("0 failures"),
        "the child ran no cases:\n{stdout}"
    );
}

/// The seeds themselves are the images they claim to be (a broken seed fuzzes nothing).
#[test]
fn seeds_decode() {
    for s in seeds() {
        let image = image_decode::decode_rgb(&s.bytes, &s.name, &LIMITS)
            .unwrap_or_else(|e| panic!("{}: {e}", s.name));
        assert!(image.rgb.width() > 0, "{}", s.name);
    }
}

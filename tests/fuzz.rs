//! Fuzz harness on stable Rust: deterministic, generated inputs for the parsers that take files
//! or text from strangers — concept files, `.npy` initial latents, the manifest, and prompt
//! tokenization with placeholder lookup. See tests/FUZZING.md for the long run.
//!
//! Each target starts from real seed inputs (the files of onnx/tiny, tests/golden and the
//! fixtures, plus crafted ones) and mutates them with a fixed-seed PRNG: byte-level mutations
//! (bit flips, interesting integers, insertions, deletions, splices, truncation) and
//! structure-aware ones (safetensors header fields, `.npy` header fields, JSON values, prompt
//! text). Every case must return — a value or an error — without a panic, within
//! `CASE_LIMIT`; a failing input is saved under `$CARGO_TARGET_TMPDIR/fuzz-failures/` and can
//! be replayed with `ELITE_FUZZ_REPLAY=<file>`.
//!
//! Environment: `ELITE_FUZZ_CASES` cases per target (default 1000, a few seconds in CI),
//! `ELITE_FUZZ_SEED` to explore other inputs (default 0).

use std::collections::BTreeMap;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{mpsc, Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use elite_ort::bundle::{BetaSchedule, Manifest};
use elite_ort::concept::Concept;
use elite_ort::graphs::{Graph, ShapeRange};
use elite_ort::latents_file::{decode_init_latents, parse_header};
use elite_ort::scheduler::{self, LmsConfig};
use elite_ort::tokenizer::ClipTokenizer;
use safetensors::tensor::Dtype;

/// Cases per target when `ELITE_FUZZ_CASES` is not set.
const DEFAULT_CASES: usize = 1000;
/// The longest any one case may take. Debug builds with optimised dependencies parse the
/// largest seeds (a full-width concept, 0.8 MB) in milliseconds; a second means a pathology.
const CASE_LIMIT: Duration = Duration::from_secs(2);
/// Mutated inputs are kept below this size (the caps of the parsers are far above; growth
/// beyond it only slows the run without reaching new code).
const MAX_INPUT: usize = 2 << 20;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

// ---------------------------------------------------------------------------------------------
// Deterministic generation.

/// xoshiro256** seeded through SplitMix64: fast, and the same sequence on every machine.
struct Rng([u64; 4]);

impl Rng {
    fn new(seed: u64) -> Rng {
        let mut x = seed;
        let mut next = || {
            x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
            let mut z = x;
            z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
            z ^ (z >> 31)
        };
        Rng([next(), next(), next(), next()])
    }

    fn next_u64(&mut self) -> u64 {
        let s = &mut self.0;
        let result = s[1].wrapping_mul(5).rotate_left(7).wrapping_mul(9);
        let t = s[1] << 17;
        s[2] ^= s[0];
        s[3] ^= s[1];
        s[1] ^= s[2];
        s[0] ^= s[3];
        s[2] ^= t;
        s[3] = s[3].rotate_left(45);
        result
    }

    /// Uniform in `0..n` (n > 0).
    fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n as u64) as usize
    }

    fn chance(&mut self, one_in: usize) -> bool {
        self.below(one_in) == 0
    }

    fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.below(items.len())]
    }
}

/// Integers that find boundary bugs.
const INTERESTING: &[u64] = &[
    0,
    1,
    2,
    3,
    4,
    5,
    7,
    8,
    16,
    64,
    77,
    127,
    128,
    255,
    256,
    257,
    1000,
    4096,
    65535,
    65536,
    1 << 31,
    u32::MAX as u64,
    1 << 32,
    1_000_000_000_000,
    1_000_000_000_000_000,
    i64::MAX as u64,
    u64::MAX,
];

/// Byte-level mutations of `input`, `rounds` of them; `others` are spliced from.
fn mutate_bytes(rng: &mut Rng, input: &[u8], others: &[Vec<u8>]) -> Vec<u8> {
    let mut data = input.to_vec();
    for _ in 0..1 + rng.below(4) {
        let len = data.len();
        match rng.below(9) {
            0 if len > 0 => {
                let i = rng.below(len);
                data[i] ^= 1 << rng.below(8);
            }
            1 if len > 0 => {
                let i = rng.below(len);
                data[i] = *rng.pick(&[0, 1, 0x7f, 0x80, 0xff, b'"', b'{', b'\\', b'\n', 0x1b]);
            }
            2 if len >= 8 => {
                let i = rng.below(len - 7);
                let v = *rng.pick(INTERESTING);
                let bytes = if rng.chance(2) {
                    v.to_le_bytes()
                } else {
                    v.to_be_bytes()
                };
                let width = *rng.pick(&[2usize, 4, 8]);
                data[i..i + width].copy_from_slice(&bytes[..width]);
            }
            3 => {
                let i = rng.below(len + 1);
                let n = 1 + rng.below(16);
                let bytes: Vec<u8> = (0..n).map(|_| rng.next_u64() as u8).collect();
                data.splice(i..i, bytes);
            }
            4 if len > 0 => {
                let i = rng.below(len);
                let n = 1 + rng.below((len - i).min(64));
                data.drain(i..i + n);
            }
            5 if len > 0 => {
                // Duplicate a range (grows repetitive structure, e.g. JSON arrays).
                let i = rng.below(len);
                let n = 1 + rng.below((len - i).min(256));
                let copy = data[i..i + n].to_vec();
                let at = rng.below(data.len() + 1);
                data.splice(at..at, copy);
            }
            6 if len > 0 => data.truncate(rng.below(len)),
            7 if !others.is_empty() => {
                let other = rng.pick(others);
                if !other.is_empty() && len > 0 {
                    let from = rng.below(other.len());
                    let n = 1 + rng.below((other.len() - from).min(512));
                    let at = rng.below(len);
                    let end = (at + n).min(len);
                    data.splice(at..end, other[from..from + n].iter().copied());
                }
            }
            _ => {
                // Overwrite a float with a special value.
                if len >= 4 {
                    let i = rng.below(len - 3) & !3;
                    let v = *rng.pick(&[f32::NAN, f32::INFINITY, -f32::INFINITY, 1e30, -0.0, 0.5]);
                    data[i..i + 4].copy_from_slice(&v.to_le_bytes());
                }
            }
        }
    }
    data.truncate(MAX_INPUT);
    data
}

/// A random JSON value for structure-aware mutations.
fn random_json(rng: &mut Rng) -> serde_json::Value {
    use serde_json::json;
    match rng.below(12) {
        0 => json!(*rng.pick(INTERESTING)),
        1 => json!(-(rng.below(1000) as i64) - 1),
        2 => json!(*rng.pick(&[0.0, -1.0, 0.5, 1e-9, 1e300, -1e300, 3.5, 1e4])),
        3 => json!(rng.below(5000)),
        4 => json!(*rng.pick(&[
            "",
            "S",
            "a b",
            "\u{1b}[31m",
            "x\ny",
            "../evil",
            "lms",
            "fp16"
        ])),
        5 => json!(null),
        6 => json!(rng.chance(2)),
        7 => json!([]),
        8 => json!({}),
        9 => json!([24, 4, 8, 12, 16]),
        10 => json!("a".repeat(rng.below(2000))),
        _ => json!([rng.below(100), rng.below(100)]),
    }
}

/// Every path to a value in `value` (object keys and array indices).
fn json_paths(value: &serde_json::Value, prefix: &mut Vec<String>, out: &mut Vec<Vec<String>>) {
    match value {
        serde_json::Value::Object(map) => {
            for (k, v) in map {
                prefix.push(k.clone());
                out.push(prefix.clone());
                json_paths(v, prefix, out);
                prefix.pop();
            }
        }
        serde_json::Value::Array(items) => {
            for (i, v) in items.iter().enumerate() {
                prefix.push(i.to_string());
                out.push(prefix.clone());
                json_paths(v, prefix, out);
                prefix.pop();
            }
        }
        _ => {}
    }
}

fn json_at<'a>(
    value: &'a mut serde_json::Value,
    path: &[String],
) -> Option<&'a mut serde_json::Value> {
    path.iter().try_fold(value, |v, key| match v {
        serde_json::Value::Object(map) => map.get_mut(key),
        serde_json::Value::Array(items) => key.parse::<usize>().ok().and_then(|i| items.get_mut(i)),
        _ => None,
    })
}

/// Replaces, removes or adds values of a JSON document.
fn mutate_json(rng: &mut Rng, value: &mut serde_json::Value) {
    for _ in 0..1 + rng.below(3) {
        let mut paths = Vec::new();
        json_paths(value, &mut Vec::new(), &mut paths);
        if paths.is_empty() {
            *value = random_json(rng);
            return;
        }
        let path = rng.pick(&paths).clone();
        match rng.below(5) {
            0 => {
                // A nearby number: plausible values keep reaching the code behind validation.
                if let Some(v) = json_at(value, &path) {
                    if let Some(n) = v.as_f64() {
                        let m = *rng.pick(&[0.5, 2.0, 8.0, -1.0, 1.0 + 1e-9]);
                        *v = match v.as_u64() {
                            Some(u) if rng.chance(2) => {
                                serde_json::json!(u.saturating_add(*rng.pick(&[1, 2, 64])))
                            }
                            _ => serde_json::json!(n * m),
                        };
                    }
                }
            }
            1 | 2 => {
                if let Some(v) = json_at(value, &path) {
                    *v = random_json(rng);
                }
            }
            3 => {
                let (last, parent) = path.split_last().expect("non-empty path");
                if let Some(serde_json::Value::Object(map)) = json_at(value, parent) {
                    map.remove(last);
                }
            }
            _ => {
                let (_, parent) = path.split_last().expect("non-empty path");
                if let Some(serde_json::Value::Object(map)) = json_at(value, parent) {
                    let key = rng
                        .pick(&["extra", "bytes", "sha256", "steps", "\u{1b}"])
                        .to_string();
                    map.insert(key, random_json(rng));
                }
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The driver.

/// What one case did (for the summary: a fuzzer that only ever hits errors tests little).
#[derive(Clone, Copy, PartialEq, Eq)]
enum Outcome {
    Accepted,
    Refused,
}

/// A mutator: (rng, input, the seeds to splice from) → a new input.
type Mutator = fn(&mut Rng, &[u8], &[Vec<u8>]) -> Vec<u8>;

struct Target {
    name: &'static str,
    seeds: Vec<Vec<u8>>,
    mutate: Mutator,
    run: fn(&[u8]) -> Outcome,
}

fn failure_dir() -> PathBuf {
    Path::new(env!("CARGO_TARGET_TMPDIR")).join("fuzz-failures")
}

fn save_failure(target: &str, case: usize, input: &[u8]) -> PathBuf {
    let dir = failure_dir();
    let _ = std::fs::create_dir_all(&dir);
    let path = dir.join(format!("{target}-{case}.bin"));
    let _ = std::fs::write(&path, input);
    path
}

/// Runs `cases` generated inputs through `target` and asserts that none panicked or ran long.
/// A watchdog fails the test if one case never returns (its input is saved first).
fn fuzz(target: Target) {
    let cases = env_usize("ELITE_FUZZ_CASES", DEFAULT_CASES);
    let seed = env_usize("ELITE_FUZZ_SEED", 0) as u64;
    let name = target.name;
    let current = Arc::new(Mutex::new(Vec::new()));
    let case_no = Arc::new(AtomicUsize::new(0));
    let (tx, rx) = mpsc::channel();
    {
        let (current, case_no) = (Arc::clone(&current), Arc::clone(&case_no));
        std::thread::spawn(move || {
            let _ = tx.send(drive(&target, cases, seed, &current, &case_no));
        });
    }
    let mut last_seen = (usize::MAX, Instant::now());
    let report = loop {
        match rx.recv_timeout(Duration::from_millis(250)) {
            Ok(report) => break report,
            Err(mpsc::RecvTimeoutError::Disconnected) => panic!("{name}: driver died"),
            Err(mpsc::RecvTimeoutError::Timeout) => {
                let now = case_no.load(Ordering::SeqCst);
                if now != last_seen.0 {
                    last_seen = (now, Instant::now());
                } else if last_seen.1.elapsed() > CASE_LIMIT * 10 {
                    let input = current.lock().map(|c| c.clone()).unwrap_or_default();
                    let path = save_failure(name, now, &input);
                    panic!(
                        "{name}: case {now} hangs; input saved to {}",
                        path.display()
                    );
                }
            }
        }
    };
    println!(
        "{name}: {} cases (seed {seed}), {} accepted, {} refused, slowest {:.1} ms, {} failures",
        report.cases,
        report.accepted,
        report.cases - report.accepted - report.failures.len(),
        report.slowest.as_secs_f64() * 1e3,
        report.failures.len()
    );
    assert!(
        report.failures.is_empty(),
        "{name}: {} failing inputs: {:#?}",
        report.failures.len(),
        report.failures
    );
}

struct Report {
    cases: usize,
    accepted: usize,
    slowest: Duration,
    failures: Vec<String>,
}

fn drive(
    target: &Target,
    cases: usize,
    seed: u64,
    current: &Mutex<Vec<u8>>,
    case_no: &AtomicUsize,
) -> Report {
    // One stream per target, so that adding a target does not change the others' inputs.
    let salt = target
        .name
        .bytes()
        .fold(seed, |h, b| h.wrapping_mul(31) ^ u64::from(b));
    let mut rng = Rng::new(salt);
    let mut report = Report {
        cases: 0,
        accepted: 0,
        slowest: Duration::ZERO,
        failures: Vec::new(),
    };
    for case in 0..cases {
        // The seeds themselves first, then mutants of one to three generations.
        let input = if case < target.seeds.len() {
            target.seeds[case].clone()
        } else {
            let mut input = rng.pick(&target.seeds).clone();
            for _ in 0..1 + rng.below(3) {
                input = (target.mutate)(&mut rng, &input, &target.seeds);
            }
            input
        };
        if let Ok(mut c) = current.lock() {
            c.clone_from(&input);
        }
        case_no.store(case, Ordering::SeqCst);
        let start = Instant::now();
        let result = catch_unwind(AssertUnwindSafe(|| (target.run)(&input)));
        let elapsed = start.elapsed();
        report.cases += 1;
        report.slowest = report.slowest.max(elapsed);
        match result {
            Ok(outcome) if elapsed <= CASE_LIMIT => {
                report.accepted += usize::from(outcome == Outcome::Accepted);
            }
            Ok(_) => {
                let path = save_failure(target.name, case, &input);
                report
                    .failures
                    .push(format!("case {case} took {elapsed:?}: {}", path.display()));
            }
            Err(_) => {
                let path = save_failure(target.name, case, &input);
                report
                    .failures
                    .push(format!("case {case} panicked: {}", path.display()));
            }
        }
    }
    report
}

/// `ELITE_FUZZ_REPLAY=<file>` runs one saved input through the target its name starts with.
#[test]
fn replay() {
    let Some(path) = std::env::var_os("ELITE_FUZZ_REPLAY") else {
        return;
    };
    let path = PathBuf::from(path);
    let input = std::fs::read(&path).unwrap();
    let name = path.file_name().unwrap().to_string_lossy().into_owned();
    let run: fn(&[u8]) -> Outcome = match name.split('-').next() {
        Some("concept") => run_concept,
        Some("npy") => run_npy,
        Some("manifest") => run_manifest,
        Some("prompt") => run_prompt,
        other => panic!("unknown target {other:?}"),
    };
    run(&input);
}

// ---------------------------------------------------------------------------------------------
// Target: concept files (Concept::from_bytes).

fn npy_f32(path: &Path) -> (Vec<usize>, Vec<f32>) {
    let bytes = std::fs::read(path).unwrap();
    let header = parse_header(&bytes).unwrap();
    let values = bytes[header.data_offset..]
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect();
    (header.shape, values)
}

/// A safetensors file with its header keys in sorted order. (`safetensors::serialize` writes
/// the metadata in `HashMap` order, which differs between processes: the generated inputs,
/// and so a recorded run, would not be reproducible.)
fn write_safetensors(parts: &[Part], meta: &BTreeMap<String, String>) -> Vec<u8> {
    let mut sorted: Vec<&Part> = parts.iter().collect();
    sorted.sort_by(|a, b| a.0.cmp(&b.0));
    let mut header = serde_json::Map::new();
    if !meta.is_empty() {
        header.insert("__metadata__".into(), serde_json::json!(meta));
    }
    let mut offset = 0;
    for (name, dtype, shape, data) in &sorted {
        header.insert(
            name.clone(),
            serde_json::json!({
                "dtype": format!("{dtype:?}"),
                "shape": shape,
                "data_offsets": [offset, offset + data.len()],
            }),
        );
        offset += data.len();
    }
    let mut text = serde_json::to_vec(&serde_json::Value::Object(header)).expect("serialisable");
    // safetensors pads the header with spaces to a multiple of 8.
    while !text.len().is_multiple_of(8) {
        text.push(b' ');
    }
    let mut out = (text.len() as u64).to_le_bytes().to_vec();
    out.extend(text);
    for part in sorted {
        out.extend(&part.3);
    }
    out
}

fn concept_file(tensors: &[(&str, Vec<usize>, Vec<f32>)], meta: &[(&str, &str)]) -> Vec<u8> {
    let parts: Vec<Part> = tensors
        .iter()
        .map(|(n, s, v)| {
            let bytes = v.iter().flat_map(|x| x.to_le_bytes()).collect();
            (n.to_string(), Dtype::F32, s.clone(), bytes)
        })
        .collect();
    let meta = meta
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    write_safetensors(&parts, &meta)
}

fn concept_seeds() -> Vec<Vec<u8>> {
    let meta = [
        ("format", "elite-ort-concept"),
        ("version", "1"),
        ("bundle", "elite-tiny"),
        (
            "image_sha256",
            "ab12ab12ab12ab12ab12ab12ab12ab12ab12ab12ab12ab12ab12ab12ab12ab12",
        ),
        ("image", "chelsea.png"),
        ("preprocessing", "Pillow-bicubic squash to 224x224"),
    ];
    let mut seeds = Vec::new();
    // The golden concepts of the tiny model (as the reference pipeline computed them).
    for case in ["cat_generate", "cat_nomask", "second_edit"] {
        let dir = root().join("tests/golden").join(case);
        let (ws, w) = npy_f32(&dir.join("word_embeddings.npy"));
        let (ls, l) = npy_f32(&dir.join("local_embeddings.npy"));
        let (_, m) = npy_f32(&dir.join("mask_grid.npy"));
        let c = *ws.last().unwrap();
        let p = ls[ls.len() - 2];
        seeds.push(concept_file(
            &[
                ("word_embeddings", vec![5, c], w),
                ("local_embeddings", vec![p, c], l),
                ("mask_grid", vec![p], m),
            ],
            &meta,
        ));
    }
    // Full SD v1 width (768), as `encode` writes for a real bundle, with a mask sha256.
    let mask: Vec<f32> = (0..256).map(|i| f32::from(u8::from(i % 3 != 0))).collect();
    let local: Vec<f32> = (0..256 * 768).map(|k| mask[k / 768] * 0.01).collect();
    let mut full_meta = meta.to_vec();
    full_meta.push((
        "mask_sha256",
        "00ff00ff00ff00ff00ff00ff00ff00ff00ff00ff00ff00ff00ff00ff00ff00ff",
    ));
    seeds.push(concept_file(
        &[
            ("word_embeddings", vec![5, 768], vec![0.5; 5 * 768]),
            ("local_embeddings", vec![256, 768], local),
            ("mask_grid", vec![256], mask),
        ],
        &full_meta,
    ));
    seeds
}

/// One tensor of a concept file being mutated: name, dtype, shape, bytes.
type Part = (String, Dtype, Vec<usize>, Vec<u8>);

/// Edits a concept as tensors and metadata and writes it again, so that shapes, dtypes and
/// offsets stay consistent and the checks behind the safetensors parser are reached.
fn mutate_concept_tensors(rng: &mut Rng, input: &[u8]) -> Option<Vec<u8>> {
    let st = safetensors::SafeTensors::deserialize(input).ok()?;
    let (_, meta) = safetensors::SafeTensors::read_metadata(input).ok()?;
    let mut meta: BTreeMap<String, String> = meta
        .metadata()
        .clone()
        .unwrap_or_default()
        .into_iter()
        .collect();
    let mut parts: Vec<Part> = st
        .tensors()
        .into_iter()
        .map(|(n, t)| (n, t.dtype(), t.shape().to_vec(), t.data().to_vec()))
        .collect();
    parts.sort_by(|a, b| a.0.cmp(&b.0));
    const DIMS: &[usize] = &[0, 1, 2, 4, 5, 6, 15, 16, 17, 255, 256, 257, 768, 4096, 4097];
    let resize = |part: &mut Part| {
        let n: usize = part.2.iter().product::<usize>().min(1 << 20);
        let size = part.1.bitsize().div_ceil(8);
        let old = std::mem::take(&mut part.3);
        part.3 = (0..n * size)
            .map(|i| old.get(i % old.len().max(1)).copied().unwrap_or(0))
            .collect();
    };
    if parts.is_empty() {
        return None;
    }
    let i = rng.below(parts.len());
    match rng.below(7) {
        0 if !parts[i].2.is_empty() => {
            let d = rng.below(parts[i].2.len());
            parts[i].2[d] = *rng.pick(DIMS);
            resize(&mut parts[i]);
        }
        1 => {
            if rng.chance(2) {
                parts[i].2.push(*rng.pick(&[1, 2, 5]));
            } else {
                parts[i].2.pop();
            }
            resize(&mut parts[i]);
        }
        2 => {
            parts[i].1 = *rng.pick(&[
                Dtype::F16,
                Dtype::BF16,
                Dtype::F64,
                Dtype::I64,
                Dtype::U8,
                Dtype::BOOL,
            ]);
            resize(&mut parts[i]);
        }
        3 => {
            // Special values, including ones a mask must not hold.
            for _ in 0..1 + rng.below(3) {
                let n = parts[i].3.len() / 4;
                if n > 0 {
                    let at = 4 * rng.below(n);
                    let v = *rng.pick(&[
                        f32::NAN,
                        f32::INFINITY,
                        -f32::INFINITY,
                        1e30,
                        0.5,
                        -0.0,
                        2.0,
                        1e-45,
                    ]);
                    parts[i].3[at..at + 4].copy_from_slice(&v.to_le_bytes());
                }
            }
        }
        4 => {
            if rng.chance(2) {
                parts.remove(i);
            } else {
                let name = rng
                    .pick(&["extra", "word_embeddings", "mask_grid", "\u{1b}x"])
                    .to_string();
                parts.push((name, Dtype::F32, vec![1], vec![0; 4]));
            }
        }
        5 => {
            let keys = [
                "format",
                "version",
                "bundle",
                "image_sha256",
                "mask_sha256",
                "image",
                "preprocessing",
                "other",
            ];
            let key = rng.pick(&keys).to_string();
            if rng.chance(3) {
                meta.remove(&key);
            } else {
                let value = match rng.below(4) {
                    0 => "x".repeat(rng.below(6000)),
                    1 => "ab".repeat(32),
                    2 => "\u{1b}]0;t\u{7}\n".to_string(),
                    _ => rng
                        .pick(&["", "1", "2", "elite-ort-concept", "ABC"])
                        .to_string(),
                };
                meta.insert(key, value);
            }
        }
        _ => {
            parts[i].0 = rng
                .pick(&["word_embeddings", "local_embeddings", "mask_grid", "w"])
                .to_string();
        }
    }
    let mut names: Vec<&str> = parts.iter().map(|p| p.0.as_str()).collect();
    names.sort_unstable();
    names.dedup();
    if names.len() != parts.len() {
        return None;
    }
    Some(write_safetensors(&parts, &meta))
}

/// Tensor-level edits, header edits (a JSON document after an 8-byte length, rest kept) or
/// byte-level mutations.
fn mutate_concept(rng: &mut Rng, input: &[u8], others: &[Vec<u8>]) -> Vec<u8> {
    if rng.chance(2) {
        if let Some(out) = mutate_concept_tensors(rng, input) {
            return out;
        }
    }
    let header = input
        .get(..8)
        .map(|b| u64::from_le_bytes(b.try_into().expect("8 bytes")) as usize)
        .and_then(|n| input.get(8..8usize.checked_add(n)?).map(|h| (n, h)));
    let Some((n, header)) = header.filter(|_| rng.chance(2)) else {
        return mutate_bytes(rng, input, others);
    };
    let Ok(mut json) = serde_json::from_slice::<serde_json::Value>(header) else {
        return mutate_bytes(rng, input, others);
    };
    mutate_json(rng, &mut json);
    let text = serde_json::to_vec(&json).expect("serialisable");
    let mut out = (text.len() as u64).to_le_bytes().to_vec();
    if rng.chance(8) {
        // A length field that lies.
        out = (*rng.pick(INTERESTING)).to_le_bytes().to_vec();
    }
    out.extend(text);
    out.extend(&input[8 + n..]);
    out.truncate(MAX_INPUT);
    out
}

fn tiny_bundle() -> &'static elite_ort::bundle::Bundle {
    static BUNDLE: OnceLock<elite_ort::bundle::Bundle> = OnceLock::new();
    BUNDLE.get_or_init(|| elite_ort::bundle::Bundle::open(root().join("onnx/tiny"), false).unwrap())
}

fn run_concept(input: &[u8]) -> Outcome {
    match Concept::from_bytes(input, "fuzz.safetensors") {
        Ok(c) => {
            // What generation does with a concept: take the word, check it against a bundle.
            assert_eq!(c.word().len(), c.text_hidden());
            assert_eq!(c.local_embeddings.nrows(), c.mask_grid.len());
            let _ = c.check_compatible(tiny_bundle(), Path::new("fuzz.safetensors"));
            Outcome::Accepted
        }
        Err(e) => {
            let _ = e.to_string();
            Outcome::Refused
        }
    }
}

#[test]
fn fuzz_concept_files() {
    let seeds = concept_seeds();
    // Mutants of valid files reach the checks behind the parser.
    assert!(seeds.iter().all(|s| run_concept(s) == Outcome::Accepted));
    fuzz(Target {
        name: "concept",
        seeds,
        mutate: mutate_concept,
        run: run_concept,
    });
}

// ---------------------------------------------------------------------------------------------
// Target: `.npy` initial latents (decode_init_latents; every 16th case also through a file).

fn npy_file(descr: &str, fortran: bool, shape: &[usize], data: &[u8]) -> Vec<u8> {
    let dims: Vec<String> = shape.iter().map(|d| d.to_string()).collect();
    let tuple = if dims.len() == 1 {
        format!("({},)", dims[0])
    } else {
        format!("({})", dims.join(", "))
    };
    let dict = format!(
        "{{'descr': '{descr}', 'fortran_order': {}, 'shape': {tuple}, }}\n",
        if fortran { "True" } else { "False" }
    );
    let mut bytes = b"\x93NUMPY\x01\x00".to_vec();
    bytes.extend((dict.len() as u16).to_le_bytes());
    bytes.extend(dict.as_bytes());
    bytes.extend(data);
    bytes
}

fn npy_seeds() -> Vec<Vec<u8>> {
    let mut seeds = Vec::new();
    for case in ["cat_generate", "second_edit", "multitoken_word"] {
        for file in [
            "init_latents.npy",
            "latents_step1.npy",
            "timesteps.npy",
            "image.npy",
        ] {
            seeds.push(std::fs::read(root().join("tests/golden").join(case).join(file)).unwrap());
        }
    }
    let values: Vec<f32> = (0..256).map(|i| (i as f32 * 0.37).sin()).collect();
    let le: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
    let be: Vec<u8> = values.iter().flat_map(|v| v.to_be_bytes()).collect();
    let f8: Vec<u8> = values
        .iter()
        .flat_map(|v| f64::from(*v).to_be_bytes())
        .collect();
    let f2: Vec<u8> = (0..256u16)
        .flat_map(|i| (0x3000 + i).to_le_bytes())
        .collect();
    let shape = [1, 4, 8, 8];
    seeds.push(npy_file("<f4", false, &shape, &le));
    seeds.push(npy_file("<f4", true, &shape, &le));
    seeds.push(npy_file(">f4", false, &shape, &be));
    seeds.push(npy_file(">f8", true, &shape, &f8));
    seeds.push(npy_file("<f2", false, &shape, &f2));
    seeds
}

/// Rewrites a field of the `.npy` header (descr, order, shape, length field, version).
fn mutate_npy(rng: &mut Rng, input: &[u8], others: &[Vec<u8>]) -> Vec<u8> {
    let header = match parse_header(input) {
        Ok(h) if !rng.chance(3) => h,
        _ => return mutate_bytes(rng, input, others),
    };
    let data = input.get(header.data_offset..).unwrap_or_default();
    let descr = *rng.pick(&[
        "<f4", ">f4", "=f4", "<f8", ">f8", "<f2", "|u1", "<i8", "<c8", "|b1", "O", "<f16", "",
    ]);
    let mut shape = header.shape.clone();
    match rng.below(4) {
        0 if !shape.is_empty() => {
            let i = rng.below(shape.len());
            shape[i] = *rng.pick(INTERESTING) as usize;
        }
        1 => shape.push(rng.below(9)),
        2 if !shape.is_empty() => {
            shape.pop();
        }
        _ => {}
    }
    let keep_descr = rng.chance(2);
    let descr = if keep_descr {
        match (header.order, header.float_bytes) {
            (elite_ort::latents_file::ByteOrder::Big, n) => format!(">f{n}"),
            (_, n) => format!("<f{n}"),
        }
    } else {
        descr.to_string()
    };
    let fortran = if rng.chance(4) {
        !header.fortran_order
    } else {
        header.fortran_order
    };
    let mut out = npy_file(&descr, fortran, &shape, data);
    match rng.below(6) {
        0 => out[6] = *rng.pick(&[0, 2, 3, 4, 255]), // version
        1 => {
            let v = *rng.pick(INTERESTING) as u16;
            out[8..10].copy_from_slice(&v.to_le_bytes());
        }
        _ => {}
    }
    out.truncate(MAX_INPUT);
    out
}

/// The shape a case expects: the one its header declares when that is 4-D and of a size a run
/// could have (so that mutants reach the data checks), else the smallest run's.
fn expected_shape(input: &[u8]) -> [usize; 4] {
    parse_header(input)
        .ok()
        .and_then(|h| <[usize; 4]>::try_from(h.shape).ok())
        .filter(|s| {
            s.iter()
                .try_fold(1usize, |n, &d| n.checked_mul(d))
                .is_some_and(|n| n <= 1 << 20)
        })
        .unwrap_or([1, 4, 8, 8])
}

fn run_npy(input: &[u8]) -> Outcome {
    static CASE: AtomicUsize = AtomicUsize::new(0);
    let expected = expected_shape(input);
    let result = if CASE.fetch_add(1, Ordering::Relaxed).is_multiple_of(16) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("l.npy");
        std::fs::write(&path, input).unwrap();
        elite_ort::latents_file::read_init_latents(&path, expected)
    } else {
        decode_init_latents(input, "fuzz.npy", expected)
    };
    match result {
        Ok(a) => {
            assert_eq!(a.shape(), expected);
            assert!(a.is_standard_layout());
            assert!(a.iter().all(|v| v.is_finite()));
            Outcome::Accepted
        }
        Err(e) => {
            let _ = e.to_string();
            Outcome::Refused
        }
    }
}

#[test]
fn fuzz_init_latents() {
    fuzz(Target {
        name: "npy",
        seeds: npy_seeds(),
        mutate: mutate_npy,
        run: run_npy,
    });
}

// ---------------------------------------------------------------------------------------------
// Target: the manifest (Manifest::from_json, then what the runtime derives from it).

fn manifest_seeds() -> Vec<Vec<u8>> {
    [
        "onnx/tiny/elite.json",
        "tests/fixtures/runtime/bundle/elite.json",
    ]
    .iter()
    .map(|p| std::fs::read(root().join(p)).unwrap())
    .collect()
}

fn mutate_manifest(rng: &mut Rng, input: &[u8], others: &[Vec<u8>]) -> Vec<u8> {
    match serde_json::from_slice::<serde_json::Value>(input) {
        Ok(mut json) if !rng.chance(4) => {
            mutate_json(rng, &mut json);
            if rng.chance(2) {
                serde_json::to_vec_pretty(&json).expect("serialisable")
            } else {
                serde_json::to_vec(&json).expect("serialisable")
            }
        }
        _ => mutate_bytes(rng, input, others),
    }
}

fn run_manifest(input: &[u8]) -> Outcome {
    let text = String::from_utf8_lossy(input);
    match Manifest::from_json(&text, Path::new("fuzz/elite.json")) {
        Ok(m) => {
            // Everything the runtime sizes from a manifest before any graph runs.
            let d = m.dims;
            let _ = (d.patches(), d.image_tokens());
            let _ = d.latent_shape(64, m.defaults.height, m.defaults.width);
            for graph in Graph::ALL {
                let range = ShapeRange {
                    batch: [1, 2, 8],
                    latent: [32, 64, 128],
                };
                let _ = graph.spec().trt_profile(&range, &d);
                for output in graph.spec().outputs {
                    let _ = output.shape_for(&d, 8, (128, 128));
                }
            }
            let config = LmsConfig {
                num_train_timesteps: m.scheduler.num_train_timesteps,
                beta_start: m.scheduler.beta_start,
                beta_end: m.scheduler.beta_end,
                beta_schedule: match m.scheduler.beta_schedule {
                    BetaSchedule::ScaledLinear => scheduler::BetaSchedule::ScaledLinear,
                    BetaSchedule::Linear => scheduler::BetaSchedule::Linear,
                },
                ..LmsConfig::default()
            };
            // The default step count must build (or be refused), never panic.
            let _ = config.build(m.defaults.steps);
            let _ = elite_ort::display::escape(&m.name).to_string();
            Outcome::Accepted
        }
        Err(e) => {
            let _ = e.to_string();
            Outcome::Refused
        }
    }
}

#[test]
fn fuzz_manifest() {
    let seeds = manifest_seeds();
    assert!(seeds.iter().all(|s| run_manifest(s) == Outcome::Accepted));
    fuzz(Target {
        name: "manifest",
        seeds,
        mutate: mutate_manifest,
        run: run_manifest,
    });
}

// ---------------------------------------------------------------------------------------------
// Target: prompt tokenization and placeholder lookup (the tiny bundle's real CLIP tokenizer).

fn tokenizer() -> &'static ClipTokenizer {
    static TOKENIZER: OnceLock<ClipTokenizer> = OnceLock::new();
    TOKENIZER
        .get_or_init(|| ClipTokenizer::from_file(root().join("onnx/tiny/tokenizer.json")).unwrap())
}

/// A case is `placeholder \0 truncate-flag \0 prompt`.
fn prompt_case(placeholder: &str, truncate: bool, prompt: &str) -> Vec<u8> {
    format!("{placeholder}\0{}\0{prompt}", u8::from(truncate)).into_bytes()
}

fn prompt_seeds() -> Vec<Vec<u8>> {
    let cases: serde_json::Value =
        serde_json::from_slice(&std::fs::read(root().join("tests/golden/cases.json")).unwrap())
            .unwrap();
    let mut seeds: Vec<Vec<u8>> = cases["cases"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| {
            prompt_case(
                c["placeholder"].as_str().unwrap(),
                false,
                c["prompt"].as_str().unwrap(),
            )
        })
        .collect();
    for (placeholder, prompt) in [
        ("S", "a photo of a S"),
        ("S", "S's hat and the S-shaped road"),
        ("*", "a photo of a *."),
        ("sks", "a sks dog wearing sunglasses"),
        ("S", "emoji 🐱🚀 and symbols © ™ ° ± 日本語のテキスト"),
        ("S", "multiple     spaces\tand\ttabs\nand newlines S"),
        ("S", &"a photo of a S ".repeat(20)),
        ("S", &format!("{}S", "a ".repeat(80))),
        ("<|endoftext|>", "a photo of <|endoftext|>"),
        ("", "a photo of S"),
    ] {
        seeds.push(prompt_case(placeholder, true, prompt));
    }
    seeds
}

/// Text edits: insert characters from a hostile pool, repeat, delete, change case.
fn mutate_prompt(rng: &mut Rng, input: &[u8], others: &[Vec<u8>]) -> Vec<u8> {
    let text = String::from_utf8_lossy(input).into_owned();
    let mut parts: Vec<String> = text.splitn(3, '\0').map(str::to_owned).collect();
    if parts.len() != 3 || rng.chance(8) {
        return mutate_bytes(rng, input, others);
    }
    const POOL: &[&str] = &[
        "S",
        "s",
        " ",
        "  ",
        "\t",
        "\n",
        "\u{1b}[31m",
        "\u{202e}",
        "\u{0301}",
        "\u{200b}",
        "🐱",
        "日本",
        "<|endoftext|>",
        "<|startoftext|>",
        "'s",
        "'ll",
        "-",
        ".",
        "*",
        "sks",
        "a ",
        "\u{fffd}",
        "\0",
        "ﬁ",
        "Ａ",
    ];
    let field = if rng.chance(4) { 0 } else { 2 };
    let s = &mut parts[field];
    let mut chars: Vec<char> = s.chars().collect();
    match rng.below(6) {
        0 | 1 => {
            let at = rng.below(chars.len() + 1);
            chars.splice(at..at, rng.pick(POOL).chars());
        }
        2 if !chars.is_empty() => {
            let at = rng.below(chars.len());
            let n = 1 + rng.below((chars.len() - at).min(20));
            chars.drain(at..at + n);
        }
        3 if !chars.is_empty() => {
            // Repeat a span: long prompts, many placeholders, the 16 KiB cap.
            let at = rng.below(chars.len());
            let n = 1 + rng.below((chars.len() - at).min(40));
            let span: Vec<char> = chars[at..at + n].to_vec();
            for _ in 0..rng.below(200) {
                chars.splice(at..at, span.iter().copied());
            }
        }
        4 => chars = chars.iter().flat_map(|c| c.to_uppercase()).collect(),
        _ => {
            parts[1] = if parts[1] == "1" {
                "0".into()
            } else {
                "1".into()
            }
        }
    }
    parts[field] = chars.into_iter().collect();
    let mut out = parts.join("\0").into_bytes();
    out.truncate(64 * 1024);
    out
}

fn run_prompt(input: &[u8]) -> Outcome {
    let text = String::from_utf8_lossy(input);
    let mut parts = text.splitn(3, '\0');
    let (placeholder, truncate, prompt) = match (parts.next(), parts.next(), parts.next()) {
        (Some(p), Some(t), Some(prompt)) => (p, t == "1", prompt),
        _ => ("S", false, text.as_ref()),
    };
    let t = tokenizer();
    let _ = t.encode(prompt, truncate).map_err(|e| e.to_string());
    match t.tokenize(prompt, placeholder, truncate) {
        Ok((ids, index)) => {
            let token = t.placeholder_token(placeholder).expect("tokenize found it");
            assert_eq!(ids[index], token);
            // Never the start token (the placeholder is an ordinary token), always in range.
            assert!((1..ids.len()).contains(&index));
            assert_eq!(t.locate_placeholder(&ids, placeholder).ok(), Some(index));
            Outcome::Accepted
        }
        Err(e) => {
            let _ = e.to_string();
            Outcome::Refused
        }
    }
}

#[test]
fn fuzz_prompts() {
    fuzz(Target {
        name: "prompt",
        seeds: prompt_seeds(),
        mutate: mutate_prompt,
        run: run_prompt,
    });
}

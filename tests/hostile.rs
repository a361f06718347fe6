//! Hostile input (issue 9): every crafted input here must end in a specific error that names the
//! input and the rule, within seconds, without a panic or a large allocation. Inputs are made by
//! the tests themselves and kept small (sparse files cost no disk).
//!
//! Sections: bundle manifest and special files; graph dims against the manifest.

use std::fs;
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::time::Duration;

use elite_ort::bundle::{Bundle, Checksums, Manifest, MANIFEST_FILE};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The small runtime fixture bundle (valid graphs of toy widths).
fn fixture_bundle() -> PathBuf {
    root().join("tests/fixtures/runtime/bundle")
}

/// A writable copy of the fixture bundle.
fn bundle_copy() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    for entry in fs::read_dir(fixture_bundle()).unwrap() {
        let entry = entry.unwrap();
        fs::copy(entry.path(), dir.path().join(entry.file_name())).unwrap();
    }
    dir
}

fn manifest_value() -> serde_json::Value {
    serde_json::from_slice(&fs::read(fixture_bundle().join(MANIFEST_FILE)).unwrap()).unwrap()
}

fn edit_manifest(dir: &Path, f: impl FnOnce(&mut serde_json::Value)) {
    let mut value = manifest_value();
    f(&mut value);
    fs::write(
        dir.join(MANIFEST_FILE),
        serde_json::to_vec_pretty(&value).unwrap(),
    )
    .unwrap();
}

/// Runs `f` on another thread and fails the test if it takes longer than `secs` (a FIFO that
/// blocks `open` would otherwise hang the whole test run).
fn within_seconds<T: Send + 'static>(secs: u64, f: impl FnOnce() -> T + Send + 'static) -> T {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(f());
    });
    rx.recv_timeout(Duration::from_secs(secs))
        .unwrap_or_else(|_| panic!("did not finish within {secs} s"))
}

fn open_error(dir: &Path) -> String {
    let dir = dir.to_path_buf();
    within_seconds(10, move || match Bundle::open(&dir, true) {
        Ok(_) => panic!("{} opened", dir.display()),
        Err(e) => e.to_string(),
    })
}

fn mkfifo(path: &Path) {
    let name = std::ffi::CString::new(path.to_str().unwrap()).unwrap();
    // SAFETY: a valid NUL-terminated path.
    assert_eq!(unsafe { libc::mkfifo(name.as_ptr(), 0o600) }, 0);
}

// ---------------------------------------------------------------------------------------------
// Bundle manifest: bounds checked when the bundle opens (and so by `info`).

type Edit = fn(&mut serde_json::Value);

/// (edit, the exact message after `<dir>/elite.json: `)
const OUT_OF_BOUNDS: &[(Edit, &str)] = &[
    (
        |v| v["defaults"]["steps"] = 5000.into(),
        "`defaults.steps` is 5000, must be 1..=scheduler.num_train_timesteps (1000)",
    ),
    (
        |v| v["dims"]["latent_channels"] = 100_000_000.into(),
        "`dims.latent_channels` is 100000000, must be 1..=64",
    ),
    (
        |v| v["dims"]["image_size"] = 1_000_000_000_000u64.into(),
        "`dims.image_size` is 1000000000000, must be 1..=1024",
    ),
    (
        |v| v["scheduler"]["num_train_timesteps"] = 1_000_000_000_000u64.into(),
        "`scheduler.num_train_timesteps` is 1000000000000, must be 2..=10000",
    ),
    (
        |v| v["dims"]["text_hidden"] = 0.into(),
        "`dims.text_hidden` is 0, must be 1..=8192",
    ),
    (
        |v| v["dims"]["image_hidden"] = 100_000.into(),
        "`dims.image_hidden` is 100000, must be 1..=8192",
    ),
    (
        |v| v["dims"]["patch_grid"] = 1000.into(),
        "`dims.patch_grid` is 1000, must be 1..=64",
    ),
    (
        |v| v["dims"]["image_size"] = 225.into(),
        "`dims.image_size` is 225, must be a multiple of dims.patch_grid (16): CLIP's patches \
         tile its input",
    ),
    (
        |v| v["dims"]["vae_scale_factor"] = 1000.into(),
        "`dims.vae_scale_factor` is 1000, must be 1..=64",
    ),
    (
        |v| v["dims"]["size_multiple"] = 60.into(),
        "`dims.size_multiple` is 60, must be a multiple of dims.vae_scale_factor (8): every \
         output size must be whole latent cells",
    ),
    (
        |v| v["dims"]["max_tokens"] = 100.into(),
        "`dims.max_tokens` is 100, must be 77: the CLIP tokenizer's fixed sequence length",
    ),
    (
        |v| v["defaults"]["guidance_scale"] = 1000.0.into(),
        "`defaults.guidance_scale` is 1000, must be 0..=100",
    ),
    (
        |v| v["defaults"]["lambda_generate"] = (-1.0).into(),
        "`defaults.lambda_generate` is -1, must be 0..=10",
    ),
    (
        |v| v["defaults"]["lambda_edit"] = 11.0.into(),
        "`defaults.lambda_edit` is 11, must be 0..=10",
    ),
    (
        |v| v["defaults"]["height"] = 8192.into(),
        "`defaults.height` is 8192, must be a positive multiple of dims.size_multiple (64) up \
         to 4096",
    ),
    (
        |v| v["defaults"]["width"] = 100.into(),
        "`defaults.width` is 100, must be a positive multiple of dims.size_multiple (64) up to \
         4096",
    ),
    (
        |v| v["vae_scaling_factor"] = 1e-9.into(),
        "`vae_scaling_factor` is 0.000000001, must be 0.001..=100",
    ),
    (
        |v| v["image_std"] = serde_json::json!([0.27, 1e-9, 0.27]),
        "`image_std` is 0.000000001, must be 0.001..=1",
    ),
    (
        |v| v["image_mean"] = serde_json::json!([0.5, 2.0, 0.5]),
        "`image_mean` is 2, must be 0..=1",
    ),
    (
        |v| v["name"] = "".into(),
        "`name` is 0 bytes long, must be 1..=256 bytes",
    ),
    (
        |v| v["files"]["tokenizer.json"]["bytes"] = 1_000_000_000_000_000u64.into(),
        "`files.tokenizer.json.bytes` is 1000000000000000, must be 1..=68719476736 (the limit \
         for a bundle file)",
    ),
    (
        |v| v["clip_layers"] = serde_json::json!([24, 4, 8, 12, 99]),
        "invalid `clip_layers`: layer 99 must be a distinct CLIP layer index in 0..=64",
    ),
    (
        |v| v["clip_layers"] = serde_json::json!([24, 4, 8, 8, 16]),
        "invalid `clip_layers`: layer 8 must be a distinct CLIP layer index in 0..=64",
    ),
    (
        |v| v["defaults"]["placeholder"] = "a b".into(),
        "invalid `defaults.placeholder`: \"a b\" must be one word of 1..=64 bytes, without \
         spaces or control characters",
    ),
    (
        |v| v["scheduler"]["beta_end"] = 2.0.into(),
        "invalid `scheduler`: expected 0 < beta_start < beta_end < 1, found 0.00085 and 2",
    ),
];

#[test]
fn manifest_values_out_of_bounds_name_the_field_and_the_rule() {
    let path = Path::new("b/elite.json");
    for (edit, expected) in OUT_OF_BOUNDS {
        let mut value = manifest_value();
        edit(&mut value);
        let text = serde_json::to_string(&value).unwrap();
        let err = Manifest::from_json(&text, path).unwrap_err().to_string();
        assert_eq!(err, format!("b/elite.json: {expected}"));
    }
}

#[test]
fn out_of_range_defaults_are_blamed_on_the_manifest_by_open_and_info() {
    let dir = bundle_copy();
    edit_manifest(dir.path(), |v| v["defaults"]["steps"] = 5000.into());
    let err = open_error(dir.path());
    assert!(
        err.ends_with("elite.json: `defaults.steps` is 5000, must be 1..=scheduler.num_train_timesteps (1000)"),
        "{err}"
    );
    // `info` opens the bundle the same way.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_elite-ort"))
        .args(["info", "--bundle", dir.path().to_str().unwrap()])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("`defaults.steps` is 5000"), "{stderr}");
    assert!(!stderr.contains("--steps"), "{stderr}");
}

#[test]
fn control_characters_from_the_manifest_are_escaped_in_messages() {
    let path = Path::new("b/elite.json");
    let mut value = manifest_value();
    value["files"]["evil\u{1b}[2J\nerror: forged.onnx"] =
        serde_json::json!({"sha256": "0".repeat(64), "bytes": 1});
    let err = Manifest::from_json(&value.to_string(), path)
        .unwrap_err()
        .to_string();
    assert!(!err.contains('\u{1b}') && !err.contains('\n'), "{err:?}");
    assert!(
        err.contains("files.evil\\u{1b}[2J\\nerror: forged.onnx"),
        "{err}"
    );
    let mut value = manifest_value();
    value["defaults"]["placeholder"] = "S\u{1b}[31m".into();
    let err = Manifest::from_json(&value.to_string(), path)
        .unwrap_err()
        .to_string();
    assert!(!err.contains('\u{1b}'), "{err:?}");
}

// ---------------------------------------------------------------------------------------------
// Special files and size caps.

#[test]
fn manifest_that_is_a_device_fifo_directory_or_huge_is_refused_without_reading_it() {
    let dir = bundle_copy();
    let manifest = dir.path().join(MANIFEST_FILE);

    fs::remove_file(&manifest).unwrap();
    std::os::unix::fs::symlink("/dev/zero", &manifest).unwrap();
    let err = open_error(dir.path());
    assert!(
        err.ends_with("elite.json: manifest is not a regular file (it is a character device); give a regular file"),
        "{err}"
    );

    fs::remove_file(&manifest).unwrap();
    mkfifo(&manifest);
    let err = open_error(dir.path());
    assert!(
        err.contains("elite.json: manifest is not a regular file (it is a FIFO)"),
        "{err}"
    );

    fs::remove_file(&manifest).unwrap();
    fs::create_dir(&manifest).unwrap();
    let err = open_error(dir.path());
    assert!(err.contains("(it is a directory)"), "{err}");

    // A 1 GB sparse file: refused from its size, never read.
    fs::remove_dir(&manifest).unwrap();
    fs::File::create(&manifest)
        .unwrap()
        .set_len(1 << 30)
        .unwrap();
    let err = open_error(dir.path());
    assert!(
        err.ends_with(
            "elite.json: manifest is 1073741824 bytes, over the limit of 4194304 bytes for a manifest"
        ),
        "{err}"
    );
}

#[test]
fn listed_files_must_be_regular_files_of_the_listed_size() {
    let dir = bundle_copy();
    let unet = dir.path().join("unet.onnx");
    fs::remove_file(&unet).unwrap();
    mkfifo(&unet);
    let err = open_error(dir.path());
    assert!(
        err.contains("unet.onnx: bundle file is not a regular file (it is a FIFO)"),
        "{err}"
    );

    fs::remove_file(&unet).unwrap();
    std::os::unix::fs::symlink("/dev/zero", &unet).unwrap();
    let err = open_error(dir.path());
    assert!(
        err.contains("unet.onnx: bundle file is not a regular file (it is a character device)"),
        "{err}"
    );

    // The tokenizer as a sparse gigabyte: a size mismatch, found from metadata alone.
    let tokenizer = dir.path().join("tokenizer.json");
    fs::remove_file(&unet).unwrap();
    fs::copy(fixture_bundle().join("unet.onnx"), &unet).unwrap();
    fs::OpenOptions::new()
        .write(true)
        .open(&tokenizer)
        .unwrap()
        .set_len(1 << 30)
        .unwrap();
    let err = open_error(dir.path());
    assert!(
        err.contains("tokenizer.json: size mismatch") && err.contains("the file has 1073741824"),
        "{err}"
    );
}

#[test]
fn hashing_stops_at_the_listed_size() {
    // The streaming hash reads at most the listed size plus one byte.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("g.onnx");
    fs::write(&path, vec![7u8; 4096]).unwrap();
    let kind = elite_ort::files::FileKind {
        role: "bundle file",
        max_bytes: 4096,
    };
    let (_, bytes) = elite_ort::bundle::sha256_capped(&path, kind).unwrap();
    assert_eq!(bytes, 4096);
    let small = elite_ort::files::FileKind {
        max_bytes: 100,
        ..kind
    };
    let err = elite_ort::bundle::sha256_capped(&path, small).unwrap_err();
    assert!(
        err.to_string().contains("over the limit of 100 bytes"),
        "{err}"
    );
}

// ---------------------------------------------------------------------------------------------
// Graph dims against the manifest.

#[test]
fn manifest_widths_that_disagree_with_the_graphs_are_named() {
    use elite_ort::graphs::{check_session, Graph};
    use elite_ort::runtime::{create_session, init_environment, ExecutionConfig};

    let dir = bundle_copy();
    // The fixture's graphs are 4 wide (text) and 8 wide (image); the manifest now says 6 and 8.
    edit_manifest(dir.path(), |v| v["dims"]["text_hidden"] = 6.into());
    let bundle = Bundle::open_checked(dir.path(), &Checksums::Verify).unwrap();
    let env = init_environment(None).unwrap_or_else(|e| panic!("{e}"));
    let config = ExecutionConfig {
        threads: Some(1),
        ..ExecutionConfig::default()
    };
    let session = create_session(env, &bundle.graph_path(Graph::TextEncoder), &config).unwrap();
    let err = check_session(Graph::TextEncoder.spec(), &session, bundle.dims())
        .unwrap_err()
        .to_string();
    assert!(
        err.starts_with(
            "text_encoder.onnx: input `inj_embedding` expected f32 shape [B,6] (the manifest's \
             dims.text_hidden), found f32 shape [?,4]"
        ),
        "{err}"
    );
    assert!(err.contains("output `last_hidden_state`"), "{err}");

    let err = match Bundle::open(dir.path(), false) {
        Ok(b) => {
            let session = create_session(env, &b.graph_path(Graph::ImageEncoder), &config).unwrap();
            let dims = elite_ort::bundle::Dims {
                image_size: 256,
                ..*b.dims()
            };
            check_session(Graph::ImageEncoder.spec(), &session, &dims)
                .unwrap_err()
                .to_string()
        }
        Err(e) => panic!("{e}"),
    };
    assert!(
        err.contains("expected f32 shape [B,3,256,256] (the manifest's dims.image_size)"),
        "{err}"
    );
}

#[test]
fn a_vae_scale_factor_that_disagrees_with_the_decoder_is_named() {
    use elite_ort::graphs::{check_output_shape, VAE_DECODER};
    use elite_ort::runtime::{create_session, init_environment, ExecutionConfig};
    use ort::value::Tensor;

    // The tiny decoder upsamples 8x; its image side is dynamic, so only its output tells.
    let dims = elite_ort::bundle::Dims {
        vae_scale_factor: 16,
        ..*Bundle::open(root().join("onnx/tiny"), false)
            .unwrap()
            .dims()
    };
    let env = init_environment(None).unwrap_or_else(|e| panic!("{e}"));
    let config = ExecutionConfig {
        threads: Some(1),
        ..ExecutionConfig::default()
    };
    let mut session =
        create_session(env, &root().join("onnx/tiny/vae_decoder.onnx"), &config).unwrap();
    let latents = ndarray::Array4::<f32>::zeros((1, 4, 8, 8));
    let outputs = session
        .run(ort::inputs!["latent_sample" => Tensor::from_array(latents).unwrap()])
        .unwrap();
    let shape: Vec<usize> = outputs["sample"]
        .try_extract_array::<f32>()
        .unwrap()
        .shape()
        .to_vec();
    let err = check_output_shape(&VAE_DECODER, "sample", &shape, &dims, 1, (8, 8))
        .unwrap_err()
        .to_string();
    assert_eq!(
        err,
        "vae_decoder.onnx: output `sample` has shape [1, 3, 64, 64], expected [1, 3, 128, 128] \
         (the manifest's dims.vae_scale_factor)"
    );
}

// ---------------------------------------------------------------------------------------------
// Concept files.

use elite_ort::concept::Concept;
use safetensors::tensor::{Dtype, TensorView};
use std::collections::HashMap;

/// One tensor of a crafted concept file: name, dtype, shape, little-endian bytes.
struct Part {
    name: &'static str,
    dtype: Dtype,
    shape: Vec<usize>,
    data: Vec<u8>,
}

fn f32_part(name: &'static str, shape: &[usize], values: impl IntoIterator<Item = f32>) -> Part {
    Part {
        name,
        dtype: Dtype::F32,
        shape: shape.to_vec(),
        data: values.into_iter().flat_map(f32::to_le_bytes).collect(),
    }
}

/// A valid concept for a bundle of text width `c` (onnx/tiny: 16) with the left half of the
/// 16x16 grid as object.
fn good_parts(c: usize) -> Vec<Part> {
    let mask: Vec<f32> = (0..256).map(|i| f32::from(u8::from(i % 16 < 8))).collect();
    let locals: Vec<f32> = (0..256 * c)
        .map(|k| mask[k / c] * ((k % 7) as f32 - 3.0) / 4.0)
        .collect();
    vec![
        f32_part(
            "word_embeddings",
            &[5, c],
            (0..5 * c).map(|k| (k as f32).sin()),
        ),
        f32_part("local_embeddings", &[256, c], locals),
        f32_part("mask_grid", &[256], mask),
    ]
}

fn good_metadata() -> HashMap<String, String> {
    HashMap::from(
        [
            ("format", "elite-ort-concept"),
            ("version", "1"),
            ("bundle", "elite-tiny"),
            ("image_sha256", &"ab".repeat(32)),
            ("image", "cat.png"),
            ("preprocessing", "squash 224"),
        ]
        .map(|(k, v)| (k.to_string(), v.to_string())),
    )
}

fn concept_bytes(parts: &[Part], meta: &HashMap<String, String>) -> Vec<u8> {
    let views = parts
        .iter()
        .map(|p| {
            (
                p.name.to_string(),
                TensorView::new(p.dtype, p.shape.clone(), &p.data).unwrap(),
            )
        })
        .collect::<Vec<_>>();
    safetensors::serialize(views, Some(meta.clone())).unwrap()
}

fn concept_error(bytes: &[u8]) -> String {
    match Concept::from_bytes(bytes, "c.safetensors") {
        Ok(_) => panic!("accepted"),
        Err(e) => e.to_string(),
    }
}

fn with_part(mut parts: Vec<Part>, part: Part) -> Vec<Part> {
    match parts.iter_mut().find(|p| p.name == part.name) {
        Some(p) => *p = part,
        None => parts.push(part),
    }
    parts
}

#[test]
fn good_concept_bytes_parse() {
    let c = Concept::from_bytes(&concept_bytes(&good_parts(16), &good_metadata()), "c").unwrap();
    assert_eq!(c.word_embeddings.dim(), (5, 16));
    assert_eq!(c.source.bundle, "elite-tiny");
}

#[test]
fn concept_shapes_that_cannot_work_are_refused() {
    let prefix = "c.safetensors: not an elite-ort concept file: ";
    let cases: Vec<(Part, &str)> = vec![
        (
            f32_part("word_embeddings", &[0, 16], []),
            "tensor `word_embeddings` has shape [0, 16], must be [5, C] with C in 1..=8192",
        ),
        (
            f32_part("word_embeddings", &[5, 0], []),
            "tensor `word_embeddings` has shape [5, 0], must be [5, C] with C in 1..=8192",
        ),
        (
            f32_part("word_embeddings", &[5, 8], vec![0.0; 40]),
            "tensor `local_embeddings` has shape [256, 16], must be [P, 8] (the words' width) \
             with P in 1..=4096",
        ),
        (
            f32_part("local_embeddings", &[0, 16], []),
            "tensor `local_embeddings` has shape [0, 16], must be [P, 16] (the words' width) \
             with P in 1..=4096",
        ),
        (
            f32_part("mask_grid", &[255], vec![1.0; 255]),
            "tensor `mask_grid` has shape [255], must be [256] (one value per local token)",
        ),
        (
            f32_part("mask_grid", &[16, 16], vec![1.0; 256]),
            "tensor `mask_grid` is F32 of shape [16, 16], must be F32 of rank 1",
        ),
        (
            Part {
                name: "word_embeddings",
                dtype: Dtype::F16,
                shape: vec![5, 16],
                data: vec![0; 160],
            },
            "tensor `word_embeddings` is F16 of shape [5, 16], must be F32 of rank 2",
        ),
        (
            f32_part("extra", &[1], [0.0]),
            "unexpected tensor `extra` (a concept holds word_embeddings, local_embeddings, \
             mask_grid)",
        ),
    ];
    for (part, expected) in cases {
        let err = concept_error(&concept_bytes(
            &with_part(good_parts(16), part),
            &good_metadata(),
        ));
        assert_eq!(err, format!("{prefix}{expected}"));
    }
    let mut parts = good_parts(16);
    parts.remove(2);
    let err = concept_error(&concept_bytes(&parts, &good_metadata()));
    assert!(err.ends_with("tensor `mask_grid` is missing"), "{err}");
}

#[test]
fn concept_values_are_checked_and_blamed_on_the_file() {
    let set = |name: &'static str, index: usize, value: f32| {
        let mut parts = good_parts(16);
        let part = parts.iter_mut().find(|p| p.name == name).unwrap();
        part.data[4 * index..4 * index + 4].copy_from_slice(&value.to_le_bytes());
        concept_error(&concept_bytes(&parts, &good_metadata()))
    };
    let err = set("word_embeddings", 3, f32::NAN);
    assert_eq!(
        err,
        "c.safetensors: not an elite-ort concept file: tensor `word_embeddings` holds NaN at \
         [0, 3]; values must be finite and within ±10000"
    );
    assert!(set("local_embeddings", 17, f32::INFINITY).contains("holds inf at [1, 1]"));
    assert!(set("local_embeddings", 16, -1e30)
        .contains("holds -1000000000000000000000000000000 at [1, 0]"));
    assert!(set("mask_grid", 5, 0.5)
        .contains("tensor `mask_grid` holds 0.5 at [5]; its values must be 0 or 1"));
    // Row 8 is background (mask 0): its local embedding must be zero.
    assert!(set("local_embeddings", 8 * 16 + 2, 0.25)
        .contains("tensor `local_embeddings` row 8 is not zero where `mask_grid` is 0"));
}

#[test]
fn concept_metadata_is_checked_and_escaped() {
    let with_meta = |key: &str, value: Option<&str>| {
        let mut meta = good_metadata();
        match value {
            Some(v) => meta.insert(key.to_string(), v.to_string()),
            None => meta.remove(key),
        };
        Concept::from_bytes(&concept_bytes(&good_parts(16), &meta), "c.safetensors")
            .map_err(|e| e.to_string())
    };
    let err = |key: &str, value: Option<&str>| with_meta(key, value).unwrap_err();
    assert!(err("format", Some("other")).ends_with("metadata `format` is not `elite-ort-concept`"));
    assert!(err("version", Some("2")).ends_with("unsupported version `2`"));
    assert!(err("version", None).ends_with("metadata `version` is missing"));
    assert!(
        err("comment\u{1b}[2J", Some("x")).ends_with("unexpected metadata key `comment\\u{1b}[2J`")
    );
    assert!(err("image", Some(&"x".repeat(5000)))
        .ends_with("metadata `image` is 5000 bytes, over the limit of 4096"));
    assert!(err("image_sha256", Some("xyz"))
        .ends_with("metadata `image_sha256` is not 64 lowercase hex digits"));
    assert!(err("mask_sha256", Some("AB"))
        .ends_with("metadata `mask_sha256` is not 64 lowercase hex digits"));

    // A bundle name with a terminal escape and a newline loads (it is only a record), and is
    // escaped wherever an error quotes it.
    let mut meta = good_metadata();
    meta.insert(
        "bundle".into(),
        "evil\u{1b}]0;pwned\u{7}\nerror: forged".into(),
    );
    let concept = Concept::from_bytes(&concept_bytes(&good_parts(16), &meta), "c").unwrap();
    let fixture = Bundle::open(fixture_bundle(), false).unwrap();
    let err = concept
        .check_compatible(&fixture, Path::new("c.safetensors"))
        .unwrap_err()
        .to_string();
    assert_eq!(
        err,
        "c.safetensors: concept was encoded with bundle `evil\\u{1b}]0;pwned\\u{7}\\nerror: \
         forged` (text width 16, 256 local tokens), this bundle is `runtime-fixture` (text \
         width 4, 256 local tokens); encode it again with this bundle"
    );
}

#[test]
fn broken_safetensors_are_refused() {
    let good = concept_bytes(&good_parts(16), &good_metadata());
    for cut in [0, 7, 8, 100, good.len() - 1] {
        let err = concept_error(&good[..cut]);
        assert!(err.contains("not a safetensors file"), "{cut}: {err}");
    }
    // A header that declares a tensor far beyond the data.
    let header = br#"{"word_embeddings":{"dtype":"F32","shape":[1000000000,1000000000],"data_offsets":[0,4]}}"#;
    let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
    bytes.extend_from_slice(header);
    bytes.extend_from_slice(&[0; 4]);
    assert!(concept_error(&bytes).contains("not a safetensors file"));
    // A header length of 2^64 - 1.
    assert!(concept_error(&[0xff; 16]).contains("not a safetensors file"));
}

#[test]
fn concept_files_that_are_special_or_huge_are_refused_before_reading() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("c.safetensors");
    let load = |path: &Path| {
        let path = path.to_path_buf();
        within_seconds(10, move || {
            Concept::load(&path).map(|_| ()).unwrap_err().to_string()
        })
    };
    std::os::unix::fs::symlink("/dev/zero", &path).unwrap();
    assert!(load(&path).contains("concept file is not a regular file (it is a character device)"));
    fs::remove_file(&path).unwrap();
    mkfifo(&path);
    assert!(load(&path).contains("concept file is not a regular file (it is a FIFO)"));
    fs::remove_file(&path).unwrap();
    fs::File::create(&path).unwrap().set_len(1 << 30).unwrap();
    assert!(load(&path).ends_with(
        "c.safetensors: concept file is 1073741824 bytes, over the limit of 67108864 bytes for a concept file"
    ));
    fs::write(&path, concept_bytes(&good_parts(16), &good_metadata())).unwrap();
    assert!(Concept::load(&path).is_ok());
}

// ---------------------------------------------------------------------------------------------
// Through the binary, for the paths main.rs routes to the library checks above.

fn tiny() -> PathBuf {
    root().join("onnx/tiny")
}

/// Runs the CLI with its cache in `cache` (inside the build tree unless a test gives its own),
/// killing it if it runs for more than two minutes (a hang must fail the test, not stall it).
fn elite_in(cache: &Path, args: &[&str]) -> std::process::Output {
    use std::process::{Command, Stdio};
    let mut child = Command::new(env!("CARGO_BIN_EXE_elite-ort"))
        .args(args)
        .env("ELITE_ORT_CACHE_DIR", cache)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("binary runs");
    let start = std::time::Instant::now();
    while child.try_wait().expect("wait").is_none() {
        if start.elapsed() > Duration::from_secs(120) {
            let _ = child.kill();
            panic!("{args:?} did not finish within 120 s");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    child.wait_with_output().expect("output")
}

fn shared_cache() -> PathBuf {
    Path::new(env!("CARGO_TARGET_TMPDIR")).join("elite-ort-cache")
}

/// Expects exit status 1 (an error, not a panic or a signal) and returns stderr.
fn fails_with(out: &std::process::Output) -> String {
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
    stderr
}

fn s(path: &Path) -> &str {
    path.to_str().unwrap()
}

#[test]
fn bad_concepts_through_the_cli_name_the_concept_file() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("o.png");
    let bundle = tiny();
    let run = |concept: &Path| {
        elite_in(
            &shared_cache(),
            &[
                "run",
                "--bundle",
                s(&bundle),
                "--concept",
                s(concept),
                "--prompt",
                "a photo of S",
                "--steps",
                "1",
                "--height",
                "64",
                "--width",
                "64",
                "--out",
                s(&out),
                "--quiet",
            ],
        )
    };
    // The issue's panic: word_embeddings with 0 rows.
    let zero_rows = dir.path().join("zero.safetensors");
    let parts = with_part(good_parts(16), f32_part("word_embeddings", &[0, 16], []));
    fs::write(&zero_rows, concept_bytes(&parts, &good_metadata())).unwrap();
    let err = fails_with(&run(&zero_rows));
    assert!(
        err.contains("zero.safetensors: not an elite-ort concept file: tensor `word_embeddings` has shape [0, 16]"),
        "{err}"
    );
    // NaN is blamed on the concept, not on text_encoder.onnx.
    let nan = dir.path().join("nan.safetensors");
    let mut parts = good_parts(16);
    parts[0].data[..4].copy_from_slice(&f32::NAN.to_le_bytes());
    fs::write(&nan, concept_bytes(&parts, &good_metadata())).unwrap();
    let err = fails_with(&run(&nan));
    assert!(err.contains("nan.safetensors: not an elite-ort concept file: tensor `word_embeddings` holds NaN at [0, 0]"), "{err}");
    assert!(!err.contains("text_encoder"), "{err}");
    // A FIFO as --concept does not hang.
    let fifo = dir.path().join("fifo.safetensors");
    mkfifo(&fifo);
    let err = fails_with(&run(&fifo));
    assert!(
        err.contains("concept file is not a regular file (it is a FIFO)"),
        "{err}"
    );
    assert!(!out.exists());
}

// ---------------------------------------------------------------------------------------------
// `.npy` initial latents.

use elite_ort::latents_file::{decode_init_latents, read_init_latents};

/// A `.npy` file (version 1) with this header and data.
fn npy(descr: &str, fortran: bool, shape: &[usize], data: &[u8]) -> Vec<u8> {
    let dims: Vec<String> = shape.iter().map(|d| d.to_string()).collect();
    let tuple = match dims.len() {
        1 => format!("({},)", dims[0]),
        _ => format!("({})", dims.join(", ")),
    };
    let mut dict = format!(
        "{{'descr': '{descr}', 'fortran_order': {}, 'shape': {tuple}, }}",
        if fortran { "True" } else { "False" }
    );
    // NumPy pads the header so that the data starts at a multiple of 64.
    while (10 + dict.len() + 1) % 64 != 0 {
        dict.push(' ');
    }
    dict.push('\n');
    let mut bytes = b"\x93NUMPY\x01\x00".to_vec();
    bytes.extend((dict.len() as u16).to_le_bytes());
    bytes.extend(dict.as_bytes());
    bytes.extend(data);
    bytes
}

const SHAPE: [usize; 4] = [1, 4, 8, 8];

/// Distinct values, so that any reordering shows.
fn latents() -> ndarray::Array4<f32> {
    ndarray::Array4::from_shape_fn(SHAPE, |(n, c, h, w)| {
        (n * 256 + c * 64 + h * 8 + w) as f32 / 100.0 - 1.0
    })
}

fn le_f32(values: impl Iterator<Item = f32>) -> Vec<u8> {
    values.flat_map(f32::to_le_bytes).collect()
}

#[test]
fn every_numpy_float_layout_reads_as_the_same_latents() {
    let a = latents();
    let c_order = npy("<f4", false, &SHAPE, &le_f32(a.iter().copied()));
    // Fortran order: the first index varies fastest, i.e. the transpose's C order.
    let f_order = npy("<f4", true, &SHAPE, &le_f32(a.t().iter().copied()));
    let big: Vec<u8> = a.iter().flat_map(|v| v.to_be_bytes()).collect();
    let f64s: Vec<u8> = a.iter().flat_map(|v| f64::from(*v).to_le_bytes()).collect();
    let f64_big: Vec<u8> = a
        .t()
        .iter()
        .flat_map(|v| f64::from(*v).to_be_bytes())
        .collect();
    // Halves of the values: k/100 - 1 is not a half, so compare with a half-exact grid.
    let halves =
        ndarray::Array4::from_shape_fn(SHAPE, |(_, c, h, w)| (c * 64 + h * 8 + w) as f32 / 64.0);
    let f16s: Vec<u8> = halves
        .iter()
        .flat_map(|v| half_bits(*v).to_le_bytes())
        .collect();
    for (name, bytes, expected) in [
        ("c", c_order, &a),
        ("fortran", f_order, &a),
        ("big-endian", npy(">f4", false, &SHAPE, &big), &a),
        ("float64", npy("<f8", false, &SHAPE, &f64s), &a),
        (
            "float64 big-endian fortran",
            npy(">f8", true, &SHAPE, &f64_big),
            &a,
        ),
        ("float16", npy("<f2", false, &SHAPE, &f16s), &halves),
    ] {
        let got = decode_init_latents(&bytes, name, SHAPE).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(&got, expected, "{name}");
        assert!(got.is_standard_layout(), "{name}");
        // The same through the file reader.
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("l.npy");
        fs::write(&path, &bytes).unwrap();
        assert_eq!(
            &read_init_latents(&path, SHAPE).unwrap(),
            expected,
            "{name}"
        );
    }
}

/// float16 bits of a value that is exactly a half in 0..64 (test data only).
fn half_bits(v: f32) -> u16 {
    if v == 0.0 {
        return 0;
    }
    let bits = v.to_bits();
    let exp = ((bits >> 23) & 0xff) as i32 - 127 + 15;
    ((exp as u16) << 10) | ((bits >> 13) & 0x3ff) as u16
}

#[test]
fn the_golden_latents_file_reads_as_numpy_wrote_it() {
    let path = root().join("tests/golden/cat_generate/init_latents.npy");
    let bytes = fs::read(&path).unwrap();
    let header = elite_ort::latents_file::parse_header(&bytes).unwrap();
    let shape: [usize; 4] = header.shape.clone().try_into().unwrap();
    let a = read_init_latents(&path, shape).unwrap();
    assert_eq!(a.shape(), &shape);
    assert_eq!(decode_init_latents(&bytes, "golden", shape).unwrap(), a);
}

#[test]
fn latents_headers_are_checked_before_the_data_is_read() {
    let a = latents();
    let good = le_f32(a.iter().copied());
    let err = |bytes: &[u8]| {
        decode_init_latents(bytes, "l.npy", SHAPE)
            .unwrap_err()
            .to_string()
    };
    // A header claiming 10^15 elements in a file of a few hundred bytes: a shape error, with
    // nothing allocated for the data.
    let huge = npy("<f4", false, &[1_000_000, 1000, 1000, 1000], &[0; 16]);
    assert_eq!(
        err(&huge),
        "l.npy: initial latents have shape [1000000, 1000, 1000, 1000], this run needs [1, 4, 8, \
         8] ([num_images, latent_channels, height / vae_scale_factor, width / vae_scale_factor])"
    );
    assert!(err(&npy("<f4", false, &[1, 4, 8], &good)).contains("have shape [1, 4, 8]"));
    assert!(err(&npy("<i4", false, &SHAPE, &good)).ends_with(
        "dtype `<i4` is not a float type; initial latents are float32 (float16 and float64 are \
         converted)"
    ));
    assert!(err(&npy("|b1", false, &SHAPE, &good)).contains("dtype `|b1` is not a float type"));
    assert!(err(&npy("<f4", false, &SHAPE, &good[..good.len() - 4]))
        .ends_with("truncated: the header declares 1024 bytes of data, the file has 1020"));
    let mut long = npy("<f4", false, &SHAPE, &good);
    long.extend([0; 3]);
    assert!(err(&long).ends_with("3 bytes follow the 1024 bytes of data the header declares"));
    assert!(err(b"not numpy at all").contains("no .npy magic"));
    let mut v9 = npy("<f4", false, &SHAPE, &good);
    v9[6] = 9;
    assert!(err(&v9).contains("unsupported .npy version 9.0"));
    // Version 2 with a 4 GB header length.
    let mut v2 = b"\x93NUMPY\x02\x00".to_vec();
    v2.extend(u32::MAX.to_le_bytes());
    assert!(err(&v2).contains("header of 4294967295 bytes, over the limit of 10000"));
}

#[test]
fn non_finite_latents_are_blamed_on_the_file() {
    let mut values: Vec<f32> = latents().iter().copied().collect();
    values[64 + 2 * 8 + 3] = f32::NAN; // [0, 1, 2, 3]
    let err = decode_init_latents(
        &npy("<f4", false, &SHAPE, &le_f32(values.into_iter())),
        "l.npy",
        SHAPE,
    )
    .unwrap_err()
    .to_string();
    assert_eq!(
        err,
        "l.npy: invalid initial latents (.npy): value NaN at [0, 1, 2, 3] (as float32); values \
         must be finite and within ±10000"
    );
    // float64 beyond float32's range becomes infinite in conversion.
    let mut f64s: Vec<f64> = latents().iter().map(|v| f64::from(*v)).collect();
    f64s[5] = 1e300;
    let bytes: Vec<u8> = f64s.iter().flat_map(|v| v.to_le_bytes()).collect();
    let err = decode_init_latents(&npy("<f8", false, &SHAPE, &bytes), "l.npy", SHAPE)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("value inf at [0, 0, 0, 5] (as float32)"),
        "{err}"
    );
}

#[test]
fn latents_files_that_are_special_or_huge_are_refused_without_reading_them() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("l.npy");
    let read = |path: &Path| {
        let path = path.to_path_buf();
        within_seconds(10, move || {
            read_init_latents(&path, SHAPE).unwrap_err().to_string()
        })
    };
    std::os::unix::fs::symlink("/dev/zero", &path).unwrap();
    assert!(
        read(&path).contains("initial latents is not a regular file (it is a character device)")
    );
    fs::remove_file(&path).unwrap();
    mkfifo(&path);
    assert!(read(&path).contains("(it is a FIFO)"));
    fs::remove_file(&path).unwrap();
    // Sparse: 2 GiB is over the cap; 1 GiB is within it but only its header is read.
    fs::File::create(&path).unwrap().set_len(2 << 30).unwrap();
    assert!(
        read(&path).contains("initial latents is 2147483648 bytes, over the limit of 1073741824")
    );
    fs::File::create(&path).unwrap().set_len(1 << 30).unwrap();
    assert!(read(&path).contains("no .npy magic"));
    // A valid header over a sparse gigabyte: refused from the sizes, before the data is read.
    let mut file = fs::File::create(&path).unwrap();
    std::io::Write::write_all(&mut file, &npy("<f4", false, &SHAPE, &[])).unwrap();
    file.set_len(1 << 30).unwrap();
    assert!(read(&path).contains("bytes follow the 1024 bytes of data the header declares"));
}

#[test]
fn fortran_order_latents_run_like_c_order_and_nan_latents_are_blamed_on_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let a = latents();
    let c_path = dir.path().join("c.npy");
    let f_path = dir.path().join("f.npy");
    fs::write(
        &c_path,
        npy("<f4", false, &SHAPE, &le_f32(a.iter().copied())),
    )
    .unwrap();
    fs::write(
        &f_path,
        npy("<f4", true, &SHAPE, &le_f32(a.t().iter().copied())),
    )
    .unwrap();
    let bundle = tiny();
    let image = root().join("tests/golden/images/chelsea.png");
    let run = |latents: &Path, out: &Path| {
        elite_in(
            &shared_cache(),
            &[
                "run",
                "--bundle",
                s(&bundle),
                "--image",
                s(&image),
                "--prompt",
                "a photo of S",
                "--steps",
                "2",
                "--height",
                "64",
                "--width",
                "64",
                "--init-latents",
                s(latents),
                "--out",
                s(out),
                "--quiet",
            ],
        )
    };
    let (c_out, f_out) = (dir.path().join("c.png"), dir.path().join("f.png"));
    for (latents, out) in [(&c_path, &c_out), (&f_path, &f_out)] {
        let result = run(latents, out);
        assert!(
            result.status.success(),
            "{}",
            String::from_utf8_lossy(&result.stderr)
        );
    }
    assert_eq!(fs::read(&c_out).unwrap(), fs::read(&f_out).unwrap());

    let mut values: Vec<f32> = a.iter().copied().collect();
    values[7] = f32::INFINITY;
    let bad = dir.path().join("inf.npy");
    fs::write(&bad, npy("<f4", false, &SHAPE, &le_f32(values.into_iter()))).unwrap();
    let out = dir.path().join("o.png");
    let err = fails_with(&run(&bad, &out));
    assert!(
        err.contains("inf.npy: invalid initial latents (.npy): value inf at [0, 0, 0, 7]"),
        "{err}"
    );
    assert!(!err.contains("unet"), "{err}");
    // A header claiming 10^15 elements: refused at once, nothing allocated.
    let huge = dir.path().join("huge.npy");
    fs::write(
        &huge,
        npy("<f4", false, &[1_000_000, 1000, 1000, 1000], &[0; 64]),
    )
    .unwrap();
    let err = fails_with(&run(&huge, &out));
    assert!(err.contains("huge.npy: initial latents have shape [1000000, 1000, 1000, 1000], this run needs [1, 4, 8, 8]"), "{err}");
    assert!(!out.exists());
}

// ---------------------------------------------------------------------------------------------
// Tokenizer: the file, prompt sizes, truncation.

use elite_ort::tokenizer::{ClipTokenizer, TokenizerError};

fn clip_tokenizer() -> ClipTokenizer {
    ClipTokenizer::from_file(root().join("tests/fixtures/tokenizer/tokenizer.json"))
        .unwrap_or_else(|e| panic!("{e}"))
}

#[test]
fn a_placeholder_cut_off_by_truncation_is_reported_as_such() {
    let t = clip_tokenizer();
    // 80 tokens of "a", then S: S is token 81 of the untruncated prompt.
    let prompt = format!("{}S", "a ".repeat(80));
    let err = t.tokenize(&prompt, "S", true).unwrap_err();
    assert!(
        matches!(
            err,
            TokenizerError::PlaceholderTruncated {
                position: 81,
                limit: 77,
                ..
            }
        ),
        "{err:?}"
    );
    assert_eq!(
        err.to_string(),
        "the placeholder `S` is token 81 of the prompt, beyond the 77-token limit, and was cut \
         off by truncation; move it earlier or shorten the prompt"
    );
    // At the last kept position (76) it is replaced by the end token: cut off as well.
    let prompt = format!("{}S", "a ".repeat(75));
    assert!(matches!(
        t.tokenize(&prompt, "S", true),
        Err(TokenizerError::PlaceholderTruncated { position: 76, .. })
    ));
    // Kept when it comes before the cut; absent is still absent.
    let prompt = format!("a photo of S {}", "a ".repeat(100));
    assert_eq!(t.tokenize(&prompt, "S", true).map(|(_, i)| i).ok(), Some(4));
    assert!(matches!(
        t.tokenize(&"a ".repeat(100), "S", true),
        Err(TokenizerError::PlaceholderAbsent { .. })
    ));
    // Without --truncate the length error comes first, as before.
    assert!(matches!(
        t.tokenize(&format!("{}S", "a ".repeat(80)), "S", false),
        Err(TokenizerError::PromptTooLong { tokens: 83, .. })
    ));
}

#[test]
fn huge_prompts_and_placeholders_are_refused_before_tokenizing() {
    let t = clip_tokenizer();
    let prompt = "S ".repeat(1 << 20);
    let start = std::time::Instant::now();
    let err = t.tokenize(&prompt, "S", true).unwrap_err().to_string();
    assert_eq!(
        err,
        "prompt is 2097152 bytes, over the limit of 16384 bytes (the text encoder reads 77 tokens)"
    );
    assert!(start.elapsed() < Duration::from_secs(1));
    let err = t
        .placeholder_token(&"s".repeat(100_000))
        .unwrap_err()
        .to_string();
    assert!(err.contains("(100000 bytes)"), "{err}");
    // Terminal escapes in a placeholder are escaped in the message.
    let err = t
        .tokenize("a photo of S", "x\u{1b}[2J", false)
        .unwrap_err()
        .to_string();
    assert!(!err.contains('\u{1b}'), "{err:?}");
}

#[test]
fn tokenizer_files_that_are_special_huge_or_deep_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tokenizer.json");
    let load = |path: &Path| {
        let path = path.to_path_buf();
        within_seconds(10, move || {
            ClipTokenizer::from_file(&path)
                .map(|_| ())
                .unwrap_err()
                .to_string()
        })
    };
    std::os::unix::fs::symlink("/dev/zero", &path).unwrap();
    assert!(load(&path).contains("tokenizer is not a regular file (it is a character device)"));
    fs::remove_file(&path).unwrap();
    mkfifo(&path);
    assert!(load(&path).contains("tokenizer is not a regular file (it is a FIFO)"));
    fs::remove_file(&path).unwrap();
    fs::File::create(&path).unwrap().set_len(1 << 30).unwrap();
    assert!(load(&path).contains("tokenizer is 1073741824 bytes, over the limit of 67108864"));
    // JSON nested a million deep: a parse error (serde_json's depth limit), not a stack overflow.
    fs::write(&path, "[".repeat(1_000_000)).unwrap();
    assert!(load(&path).contains("cannot load tokenizer"));
}

#[test]
fn a_default_placeholder_the_tokenizer_cannot_use_is_blamed_on_the_manifest() {
    // The tiny bundle's real tokenizer with a manifest whose placeholder is two tokens.
    let dir = tempfile::tempdir().unwrap();
    for entry in fs::read_dir(tiny()).unwrap() {
        let entry = entry.unwrap();
        let name = entry.file_name();
        if name == "elite.json" || name == "tokenizer.json" {
            fs::copy(entry.path(), dir.path().join(&name)).unwrap();
        } else {
            std::os::unix::fs::symlink(entry.path(), dir.path().join(&name)).unwrap();
        }
    }
    let manifest = dir.path().join("elite.json");
    let mut value: serde_json::Value =
        serde_json::from_slice(&fs::read(&manifest).unwrap()).unwrap();
    value["defaults"]["placeholder"] = "photograph-of".into();
    fs::write(&manifest, serde_json::to_vec(&value).unwrap()).unwrap();
    let bundle = Bundle::open(dir.path(), false).unwrap();
    let err = ClipTokenizer::for_bundle(&bundle).unwrap_err().to_string();
    assert!(
        err.contains("elite.json: `defaults.placeholder` cannot be used: placeholder \"photograph-of\" encodes to"),
        "{err}"
    );
    value["defaults"]["placeholder"] = "S".into();
    fs::write(&manifest, serde_json::to_vec(&value).unwrap()).unwrap();
    let bundle = Bundle::open(dir.path(), false).unwrap();
    assert!(ClipTokenizer::for_bundle(&bundle).is_ok());
}

// ---------------------------------------------------------------------------------------------
// Cache poisoning: graphs are cached only under hashes checked in this run.

fn copy_tiny(dst: &Path) {
    fs::create_dir_all(dst).unwrap();
    for entry in fs::read_dir(tiny()).unwrap() {
        let entry = entry.unwrap();
        fs::copy(entry.path(), dst.join(entry.file_name())).unwrap();
    }
}

/// Entries under `<cache>/graphs` and `<cache>/tensorrt` (none when missing).
fn cached_graphs(cache: &Path) -> Vec<PathBuf> {
    ["graphs", "tensorrt"]
        .iter()
        .flat_map(|d| fs::read_dir(cache.join(d)).into_iter().flatten())
        .map(|e| e.unwrap().path())
        .collect()
}

#[test]
fn unverified_graphs_are_never_cached_nor_served_from_the_cache() {
    let dir = tempfile::tempdir().unwrap();
    let cache = dir.path().join("cache");
    let image = root().join("tests/golden/images/chelsea.png");
    let run = |bundle: &Path, out: &Path, extra: &[&str]| {
        let mut args = vec![
            "run",
            "--bundle",
            s(bundle),
            "--image",
            s(&image),
            "--prompt",
            "a photo of S",
            "--steps",
            "2",
            "--height",
            "64",
            "--width",
            "64",
            "--out",
            s(out),
            "--quiet",
        ];
        args.extend_from_slice(extra);
        elite_in(&cache, &args)
    };
    let ok = |out: std::process::Output| {
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    };

    // A tampered but valid UNet (one weight's low bit flipped; the size is unchanged, so only
    // its hash tells), opened with --no-verify: it runs, and nothing is cached for it.
    let tampered = dir.path().join("tampered");
    copy_tiny(&tampered);
    let unet = tampered.join("unet.onnx");
    let mut bytes = fs::read(&unet).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x01;
    fs::write(&unet, &bytes).unwrap();
    ok(run(&tampered, &dir.path().join("t.png"), &["--no-verify"]));
    assert_eq!(cached_graphs(&cache), Vec::<PathBuf>::new());

    // The pristine bundle, verified, with the same cache: now its graphs are cached.
    let pristine = dir.path().join("pristine");
    copy_tiny(&pristine);
    ok(run(&pristine, &dir.path().join("c.png"), &[]));
    assert!(!cached_graphs(&cache).is_empty());

    // With the cache warm, random bytes of the same size in place of unet.onnx under
    // --no-verify are read from the bundle (and fail), not served the cached graph.
    let cached_before = cached_graphs(&cache);
    let unet = pristine.join("unet.onnx");
    let size = fs::metadata(&unet).unwrap().len() as usize;
    let mut state = 0x9e37_79b9_7f4a_7c15u64;
    let noise: Vec<u8> = (0..size)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state as u8
        })
        .collect();
    fs::write(&unet, noise).unwrap();
    let out = dir.path().join("r.png");
    let err = fails_with(&run(&pristine, &out, &["--no-verify"]));
    assert!(err.contains("unet.onnx"), "{err}");
    assert!(!out.exists());
    // Verified, the same file is a checksum error; the cache is as it was.
    let err = fails_with(&run(&pristine, &out, &[]));
    assert!(err.contains("unet.onnx: sha256 mismatch"), "{err}");
    assert_eq!(cached_graphs(&cache), cached_before);
}

#[test]
fn a_bundle_with_unlisted_files_is_not_cached() {
    let dir = tempfile::tempdir().unwrap();
    let bundle = dir.path().join("b");
    copy_tiny(&bundle);
    let opened = Bundle::open(&bundle, true).unwrap();
    assert!(opened.content_id(elite_ort::graphs::Graph::Unet).is_some());
    // A file the manifest does not list could be external data of a graph.
    fs::write(bundle.join("weights.bin"), b"x").unwrap();
    let opened = Bundle::open(&bundle, true).unwrap();
    assert_eq!(opened.unlisted_files(), ["weights.bin"]);
    assert!(opened.content_id(elite_ort::graphs::Graph::Unet).is_none());
    let unverified = Bundle::open(&bundle, false).unwrap();
    assert!(unverified
        .content_id(elite_ort::graphs::Graph::Unet)
        .is_none());
    fs::remove_file(bundle.join("weights.bin")).unwrap();
    let unverified = Bundle::open(&bundle, false).unwrap();
    assert!(unverified
        .content_id(elite_ort::graphs::Graph::Unet)
        .is_none());
    assert!(!unverified.is_verified("unet.onnx"));
    // Verified through the stamps: content ids again.
    let cache = dir.path().join("cache");
    for _ in 0..2 {
        let stamped =
            Bundle::open_checked(&bundle, &Checksums::VerifyCached(cache.clone())).unwrap();
        assert!(stamped.content_id(elite_ort::graphs::Graph::Unet).is_some());
    }
}

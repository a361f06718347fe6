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

//! Bundle checks, sessions and graph signatures on the fixtures written by
//! `export/fixtures_runtime.py` (tests/fixtures/runtime/).
//!
//! Session tests load ONNX Runtime through `ORT_DYLIB_PATH` or the provisioned copy; all of
//! them share the process's one environment.

use std::fs;
use std::path::{Path, PathBuf};

use elite_ort::bundle::{Bundle, BundleError, Dims, Precision, MANIFEST_FILE};
use elite_ort::graphs::{check_session, has_optional, Graph, GraphError, GLOBAL_MAPPER, UNET};
use elite_ort::runtime::{
    create_session, init_environment, Device, ExecutionConfig, OrtEnv, RuntimeError, CUDA_PROVIDER,
    TENSORRT_PROVIDER,
};

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/runtime")
}

fn fixture_bundle() -> PathBuf {
    fixtures().join("bundle")
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

fn edit_manifest(dir: &Path, f: impl FnOnce(&mut serde_json::Value)) {
    let path = dir.join(MANIFEST_FILE);
    let mut value: serde_json::Value =
        serde_json::from_str(&fs::read_to_string(&path).unwrap()).unwrap();
    f(&mut value);
    fs::write(&path, serde_json::to_string_pretty(&value).unwrap()).unwrap();
}

/// The fixture bundle's dims (text width 4, image width 8).
fn fixture_dims() -> Dims {
    *Bundle::open(fixture_bundle(), false).unwrap().dims()
}

fn env() -> &'static OrtEnv {
    init_environment(None).unwrap_or_else(|e| panic!("{e}"))
}

fn cpu() -> ExecutionConfig {
    ExecutionConfig {
        threads: Some(1),
        ..ExecutionConfig::default()
    }
}

#[test]
fn good_bundle_opens_with_checksums() {
    let bundle = Bundle::open(fixture_bundle(), true).unwrap();
    assert_eq!(bundle.name(), "runtime-fixture");
    assert_eq!(bundle.precision(), Precision::Fp32);
    assert_eq!(bundle.dims().text_hidden, 4);
    assert_eq!(bundle.dims().image_hidden, 8);
    assert_eq!(bundle.clip_layers(), [24, 4, 8, 12, 16]);
    assert_eq!(bundle.defaults().steps, 100);
    assert!(bundle.random_weights());
    for graph in Graph::ALL {
        assert!(bundle.graph_path(graph).is_file(), "{graph}");
    }
    assert!(bundle.tokenizer_path().is_file());
}

#[test]
fn missing_manifest_names_the_file() {
    let dir = bundle_copy();
    fs::remove_file(dir.path().join(MANIFEST_FILE)).unwrap();
    let err = Bundle::open(dir.path(), true).unwrap_err();
    assert!(matches!(err, BundleError::ManifestMissing { .. }), "{err}");
    assert!(
        err.to_string().contains("elite.json: manifest not found"),
        "{err}"
    );
}

#[test]
fn unknown_field_in_manifest_file() {
    let dir = bundle_copy();
    edit_manifest(dir.path(), |v| v["comment"] = "hi".into());
    let err = Bundle::open(dir.path(), true).unwrap_err().to_string();
    assert!(
        err.contains("elite.json: invalid manifest at line"),
        "{err}"
    );
    assert!(err.contains("unknown field `comment`"), "{err}");
}

#[test]
fn wrong_format_version_in_manifest_file() {
    let dir = bundle_copy();
    edit_manifest(dir.path(), |v| v["format_version"] = 7.into());
    let err = Bundle::open(dir.path(), true).unwrap_err();
    assert!(
        matches!(err, BundleError::UnsupportedFormatVersion { .. }),
        "{err}"
    );
}

#[test]
fn missing_graph_file() {
    let dir = bundle_copy();
    fs::remove_file(dir.path().join("vae_decoder.onnx")).unwrap();
    let err = Bundle::open(dir.path(), false).unwrap_err();
    assert!(matches!(err, BundleError::FileMissing { .. }), "{err}");
    let msg = err.to_string();
    assert!(msg.contains("vae_decoder.onnx: listed in"), "{msg}");
}

#[test]
fn required_file_not_listed() {
    let dir = bundle_copy();
    edit_manifest(dir.path(), |v| {
        v["files"].as_object_mut().unwrap().remove("tokenizer.json");
    });
    let err = Bundle::open(dir.path(), false).unwrap_err().to_string();
    assert!(
        err.contains("required file `tokenizer.json` is not listed"),
        "{err}"
    );
}

#[test]
fn extra_listed_file_must_exist() {
    let dir = bundle_copy();
    edit_manifest(dir.path(), |v| {
        v["files"]["unet.onnx.data"] = serde_json::json!({"sha256": "0".repeat(64), "bytes": 8});
    });
    let err = Bundle::open(dir.path(), false).unwrap_err().to_string();
    assert!(err.contains("unet.onnx.data: listed in"), "{err}");
}

#[test]
fn size_mismatch() {
    let dir = bundle_copy();
    let path = dir.path().join("tokenizer.json");
    let mut bytes = fs::read(&path).unwrap();
    bytes.push(b'\n');
    fs::write(&path, bytes).unwrap();
    let err = Bundle::open(dir.path(), false).unwrap_err();
    assert!(
        matches!(err, BundleError::SizeMismatch { expected, actual, .. } if actual == expected + 1),
        "{err}"
    );
    assert!(
        err.to_string().contains("tokenizer.json: size mismatch"),
        "{err}"
    );
}

#[test]
fn tampered_file_fails_checksum_unless_opted_out() {
    let dir = bundle_copy();
    let path = dir.path().join("unet.onnx");
    let mut bytes = fs::read(&path).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 0x01;
    fs::write(&path, bytes).unwrap();
    let expected_hash =
        elite_ort::bundle::sha256_file(&fixture_bundle().join("unet.onnx")).unwrap();
    let actual_hash = elite_ort::bundle::sha256_file(&path).unwrap();

    let err = Bundle::open(dir.path(), true).unwrap_err();
    let msg = err.to_string();
    match err {
        BundleError::ChecksumMismatch {
            path: p,
            expected,
            actual,
            ..
        } => {
            assert_eq!(p, path);
            assert_eq!(expected, expected_hash);
            assert_eq!(actual, actual_hash);
        }
        other => panic!("expected a checksum mismatch, got {other}"),
    }
    assert!(msg.contains("unet.onnx: sha256 mismatch"), "{msg}");
    assert!(
        msg.contains(&expected_hash) && msg.contains(&actual_hash),
        "{msg}"
    );

    // Opting out of checksums still checks presence and size, which are unchanged here.
    Bundle::open(dir.path(), false).unwrap();
}

#[test]
fn every_fixture_graph_matches_its_spec_on_cpu() {
    let env = env();
    let bundle = Bundle::open(fixture_bundle(), true).unwrap();
    for graph in Graph::ALL {
        let session = create_session(env, &bundle.graph_path(graph), &cpu())
            .unwrap_or_else(|e| panic!("{e}"));
        check_session(graph.spec(), &session, bundle.dims()).unwrap_or_else(|e| panic!("{e}"));
    }
}

#[test]
fn cpu_session_runs() {
    use ort::value::Tensor;

    let env = env();
    let path = fixture_bundle().join(GLOBAL_MAPPER.file);
    let mut session = create_session(env, &path, &cpu()).unwrap();
    let features = ndarray::Array4::<f32>::from_elem((2, 5, 257, 8), 1.0);
    let outputs = session
        .run(ort::inputs!["image_features" => Tensor::from_array(features).unwrap()])
        .unwrap();
    let words = outputs["word_embeddings"]
        .try_extract_array::<f32>()
        .unwrap();
    assert_eq!(words.shape(), &[2, 5, 4]);
    // Column j of the toy weight matrix sums (i - j) / 10 over i = 0..8.
    for ((_, _, j), value) in words
        .view()
        .into_dimensionality::<ndarray::Ix3>()
        .unwrap()
        .indexed_iter()
    {
        let expected = (28.0 - 8.0 * j as f32) / 10.0;
        assert!((value - expected).abs() < 1e-5, "{value} vs {expected}");
    }
}

#[test]
fn wrong_input_type_is_named() {
    let session = create_session(env(), &fixtures().join("unet_lambda_i64.onnx"), &cpu()).unwrap();
    let err = check_session(&UNET, &session, &fixture_dims()).unwrap_err();
    assert_eq!(
        err.to_string(),
        "unet.onnx: input `local_lambda` expected f32 rank 1, found i64 rank 1"
    );
}

#[test]
fn optional_attention_maps_are_all_or_nothing() {
    // Without them (a bundle exported before attention maps): accepted, and reported absent.
    let before = create_session(env(), &fixture_bundle().join("unet.onnx"), &cpu()).unwrap();
    check_session(&UNET, &before, &fixture_dims()).unwrap();
    assert!(!has_optional(&UNET, &before));
    // Part of the group: refused, naming what is missing.
    let partial =
        create_session(env(), &fixtures().join("unet_maps_partial.onnx"), &cpu()).unwrap();
    let err = check_session(&UNET, &partial, &fixture_dims()).unwrap_err();
    assert_eq!(
        err.to_string(),
        "unet.onnx: has some of the attention maps tensors but not `attention_maps`, \
         `placeholder_gate` (all or none)"
    );
    // All of it: the committed tiny bundle's UNet.
    let tiny = Path::new(env!("CARGO_MANIFEST_DIR")).join("onnx/tiny");
    let dims = *Bundle::open(&tiny, false).unwrap().dims();
    let full = create_session(env(), &tiny.join("unet.onnx"), &cpu()).unwrap();
    check_session(&UNET, &full, &dims).unwrap();
    assert!(has_optional(&UNET, &full));
}

#[test]
fn renamed_input_and_wrong_rank_are_all_listed() {
    let session = create_session(
        env(),
        &fixtures().join("global_mapper_renamed.onnx"),
        &cpu(),
    )
    .unwrap();
    let err = check_session(&GLOBAL_MAPPER, &session, &fixture_dims()).unwrap_err();
    let GraphError::Signature { file, problems } = err else {
        panic!("expected a signature error, got {err}")
    };
    assert_eq!(file, "global_mapper.onnx");
    let text: Vec<String> = problems.iter().map(ToString::to_string).collect();
    assert_eq!(
        text,
        [
            "missing input `image_features` (expected f32 rank 4)",
            "unexpected input `features` (f32 rank 4), not in the graph table",
            "output `word_embeddings` expected f32 rank 3, found f32 rank 2",
        ]
    );
}

#[test]
fn graph_of_another_kind_is_rejected() {
    let session =
        create_session(env(), &fixture_bundle().join("global_mapper.onnx"), &cpu()).unwrap();
    let err = check_session(Graph::LocalMapper.spec(), &session, &fixture_dims())
        .unwrap_err()
        .to_string();
    assert!(
        err.starts_with("local_mapper.onnx: missing input `mask`"),
        "{err}"
    );
    assert!(err.contains("missing output `local_embeddings`"), "{err}");
}

#[test]
fn missing_model_file() {
    let err = create_session(env(), &fixtures().join("nope.onnx"), &cpu()).unwrap_err();
    assert!(matches!(err, RuntimeError::ModelNotFound { .. }), "{err}");
    assert!(err.to_string().contains("nope.onnx"), "{err}");
}

#[test]
fn gpu_provider_without_gpu_library_is_an_error() {
    let env = env();
    let providers = env.available_providers().unwrap();
    let path = fixture_bundle().join(GLOBAL_MAPPER.file);
    for (device, provider) in [
        (Device::Cuda, CUDA_PROVIDER),
        (Device::TensorRt, TENSORRT_PROVIDER),
    ] {
        if providers.iter().any(|p| p == provider) {
            eprintln!(
                "{provider} is built into {}; skipping",
                env.library().path.display()
            );
            continue;
        }
        let config = ExecutionConfig { device, ..cpu() };
        let err = create_session(env, &path, &config).unwrap_err();
        let msg = err.to_string();
        assert!(
            matches!(&err, RuntimeError::ProviderUnavailable { provider, .. } if *provider == device),
            "{msg}"
        );
        assert!(msg.contains(&device.to_string()), "{msg}");
        assert!(msg.contains("global_mapper.onnx"), "{msg}");
        assert!(msg.contains("provision_ort.py --gpu"), "{msg}");

        // With fallback the session runs on the CPU.
        let config = ExecutionConfig {
            allow_fallback: true,
            ..config
        };
        let session = create_session(env, &path, &config).unwrap();
        check_session(&GLOBAL_MAPPER, &session, &fixture_dims()).unwrap();
    }
}

/// Sessions created together load on parallel threads; whatever order the threads finish in,
/// a failure is the first failing graph in the order asked for, the graphs that loaded are
/// kept, and asking again retries only the ones that failed.
#[test]
fn sessions_created_together_report_the_first_failure_in_order() {
    use elite_ort::engine::{Engine, EngineConfig};
    use elite_ort::sessions::Phase;

    let all = [Phase::Concept, Phase::Text, Phase::Denoise, Phase::Decode];
    let config = EngineConfig {
        execution: cpu(),
        verify_checksums: false,
        ..EngineConfig::default()
    };
    let tiny = Path::new(env!("CARGO_MANIFEST_DIR")).join("onnx/tiny");
    let mut engine = Engine::open(&tiny, &config).unwrap();
    engine.preload(&all).unwrap_or_else(|e| panic!("{e}"));
    let timings: Vec<String> = engine.timings().into_iter().map(|(k, _)| k).collect();
    for graph in Graph::ALL {
        let key = format!("load {}", graph.file_name());
        assert!(timings.contains(&key), "{key} missing from {timings:?}");
    }
    assert!(
        timings.contains(&"load sessions".to_string()),
        "{timings:?}"
    );

    // Two graphs with the wrong signature (listed with their true size): the mapper comes
    // first in the order asked for, whichever of the two threads fails first.
    let dir = tempfile::tempdir().unwrap();
    for entry in fs::read_dir(&tiny).unwrap() {
        let entry = entry.unwrap();
        fs::copy(entry.path(), dir.path().join(entry.file_name())).unwrap();
    }
    let wrong = fixtures().join("global_mapper_renamed.onnx");
    let bytes = fs::metadata(&wrong).unwrap().len();
    for file in ["global_mapper.onnx", "vae_decoder.onnx"] {
        fs::copy(&wrong, dir.path().join(file)).unwrap();
        edit_manifest(dir.path(), |m| m["files"][file]["bytes"] = bytes.into());
    }
    let mut engine = Engine::open(dir.path(), &config).unwrap();
    let err = engine.preload(&all).unwrap_err().to_string();
    assert!(err.starts_with("global_mapper.onnx: "), "{err}");
    let unet_load = |engine: &Engine| {
        let timings = engine.timings();
        timings
            .into_iter()
            .find(|(k, _)| k == "load unet.onnx")
            .map(|(_, d)| d)
    };
    let before = unet_load(&engine).expect("the UNet loaded");
    // Kept: asking for it again creates nothing.
    engine.preload(&[Phase::Text, Phase::Denoise]).unwrap();
    assert_eq!(unet_load(&engine), Some(before));
    let err = engine.preload(&[Phase::Decode]).unwrap_err().to_string();
    assert!(err.starts_with("vae_decoder.onnx: "), "{err}");
}

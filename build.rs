//! Provisions the ONNX Runtime CPU library (scripts/provision_ort.py) when it is missing and
//! bakes its absolute path into the crate as `ELITE_ORT_PROVISIONED_LIB`.
//!
//! Failure to provision is a warning, not a build error: the runtime then reports every place
//! it looked for the library. `ELITE_ORT_SKIP_PROVISION=1` skips the download.

use std::env;
use std::path::{Path, PathBuf};
use std::process::Command;

/// Must match `ORT_VERSION` in scripts/provision_ort.py and `runtime::ORT_VERSION`.
const ORT_VERSION: &str = "1.31.1";
/// Must match `OPENVINO_EP_VERSION` in scripts/provision_ort.py.
const OPENVINO_EP_VERSION: &str = "1.8.1";
const SCRIPT: &str = "scripts/provision_ort.py";
const SKIP_ENV: &str = "ELITE_ORT_SKIP_PROVISION";

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    compile_jpeg_shim();
    println!("cargo:rerun-if-changed={SCRIPT}");
    println!("cargo:rerun-if-env-changed={SKIP_ENV}");

    let Some(root) = env::var_os("CARGO_MANIFEST_DIR").map(PathBuf::from) else {
        println!("cargo:warning=CARGO_MANIFEST_DIR is not set; ONNX Runtime not provisioned");
        return;
    };
    let os = env::var("CARGO_CFG_TARGET_OS").unwrap_or_default();
    let arch = env::var("CARGO_CFG_TARGET_ARCH").unwrap_or_default();
    if os != "linux" || arch != "x86_64" {
        println!(
            "cargo:warning=ONNX Runtime is provisioned for x86_64 Linux only (target: {arch}-{os}); \
             pass --ort-lib or set ORT_DYLIB_PATH to an ONNX Runtime {ORT_VERSION} library"
        );
        return;
    }

    let ort_dir = root.join(".ort");
    let lib = ort_dir
        .join(format!("onnxruntime-{ORT_VERSION}"))
        .join(format!("libonnxruntime.so.{ORT_VERSION}"));
    let gpu_lib = ort_dir
        .join(format!("onnxruntime-gpu-{ORT_VERSION}"))
        .join(format!("libonnxruntime.so.{ORT_VERSION}"));
    // A missing file makes cargo rerun this script on every build, so a failed provisioning
    // is retried; once present, the script reruns only if the library changes.
    println!("cargo:rerun-if-changed={}", lib.display());
    println!(
        "cargo:rustc-env=ELITE_ORT_PROVISIONED_LIB={}",
        lib.display()
    );
    // Where `provision_ort.py --openvino` puts the OpenVINO plugin (`--precision bf16`),
    // provisioned on demand only: 110 MB that most builds never load.
    println!(
        "cargo:rustc-env=ELITE_ORT_PROVISIONED_OPENVINO_EP={}",
        ort_dir
            .join(format!("onnxruntime-ep-openvino-{OPENVINO_EP_VERSION}"))
            .join("libonnxruntime_providers_openvino_plugin.so")
            .display()
    );
    // Where `provision_ort.py --gpu` puts the GPU build: only named in error hints.
    println!(
        "cargo:rustc-env=ELITE_ORT_PROVISIONED_GPU_LIB={}",
        gpu_lib.display()
    );

    if lib.is_file() {
        return;
    }
    if env::var_os(SKIP_ENV).is_some_and(|v| v == "1") {
        println!(
            "cargo:warning={SKIP_ENV}=1: not provisioning ONNX Runtime; {} is missing",
            lib.display()
        );
        return;
    }
    if let Err(message) = provision(&root) {
        println!("cargo:warning=ONNX Runtime provisioning failed: {message}");
        println!(
            "cargo:warning=run `python3 {SCRIPT}` by hand, or pass --ort-lib / set ORT_DYLIB_PATH at run time"
        );
    } else if !lib.is_file() {
        println!(
            "cargo:warning=ONNX Runtime provisioning reported success but {} is missing",
            lib.display()
        );
    }
}

/// Compiles src/jpeg_shim.c (libjpeg's setjmp error boundary, see src/jpeg.rs) against the
/// headers of the libjpeg that mozjpeg-sys builds (it exports their directories as
/// `DEP_JPEG_INCLUDE`).
fn compile_jpeg_shim() {
    println!("cargo:rerun-if-changed=src/jpeg_shim.c");
    let Some(include) = env::var_os("DEP_JPEG_INCLUDE") else {
        panic!("mozjpeg-sys did not export its include directories (DEP_JPEG_INCLUDE)");
    };
    let mut build = cc::Build::new();
    for dir in env::split_paths(&include) {
        build.include(dir);
    }
    build
        .file("src/jpeg_shim.c")
        .warnings(true)
        .extra_warnings(true)
        .compile("elite_jpeg_shim");
}

fn provision(root: &Path) -> Result<(), String> {
    let output = Command::new("python3")
        .arg(root.join(SCRIPT))
        .arg("--root")
        .arg(root)
        .output()
        .map_err(|e| format!("could not run python3 {SCRIPT}: {e}"))?;
    if output.status.success() {
        return Ok(());
    }
    let stderr = String::from_utf8_lossy(&output.stderr);
    let tail: Vec<&str> = stderr.lines().rev().take(6).collect();
    let detail = tail.into_iter().rev().collect::<Vec<_>>().join(" | ");
    Err(format!(
        "python3 {SCRIPT} exited with {}: {detail}",
        output.status
    ))
}

//! `--precision bf16`: the UNet and the VAE decoder through ONNX Runtime's OpenVINO execution
//! provider, loaded as a plugin library, with OpenVINO's CPU device computing their matmuls and
//! convolutions in bf16 (fp32 accumulation) on Intel CPUs that have bf16 arithmetic
//! (AVX512_BF16, AMX); the plugin offers Intel devices only ([`ensure_available`]). CLIP, the
//! text encoder and the mappers (run once per image or prompt, small) stay on the CPU provider
//! in fp32.
//!
//! ONNX Runtime's own CPU provider has no bf16 GEMM; through OpenVINO a full-size UNet step is
//! 3.4× and a decode 2.6× faster on such a CPU (bench/RESULTS.md, issue 14). The plugin (`onnxruntime-ep-openvino`
//! from the package registry, which bundles the OpenVINO runtime) is provisioned on demand by
//! `python3 scripts/provision_ort.py --openvino`; ONNX Runtime 1.31 registers it into its
//! environment at run time (`RegisterExecutionProviderLibrary`), so the same ONNX Runtime
//! library serves both precisions.

use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::{Mutex, PoisonError};

use ort::memory::DeviceType;
use ort::session::builder::SessionBuilder;

use crate::runtime::{OrtEnv, RuntimeError, CPU_PROVIDER};

/// ONNX Runtime's name of the provider (the plugin's `get_ep_name()`).
pub const OPENVINO_PROVIDER: &str = "OpenVINOExecutionProvider";

/// Where `scripts/provision_ort.py --openvino` puts the plugin, baked in by `build.rs`.
const PROVISIONED_PLUGIN: Option<&str> = option_env!("ELITE_ORT_PROVISIONED_OPENVINO_EP");

/// The name the plugin is registered under in the environment (any unique name).
const REGISTRATION: &str = "elite-ort-openvino";

/// The arithmetic of the UNet and the VAE decoder.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Precision {
    /// fp32 on the chosen device (ONNX Runtime's CPU, CUDA or TensorRT provider).
    #[default]
    Fp32,
    /// bf16 matmuls and convolutions through OpenVINO on the CPU (this module).
    Bf16,
}

impl Precision {
    /// The name used on the command line.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Fp32 => "fp32",
            Self::Bf16 => "bf16",
        }
    }
}

impl fmt::Display for Precision {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Precision {
    type Err = RuntimeError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.to_ascii_lowercase().as_str() {
            "fp32" => Ok(Self::Fp32),
            "bf16" => Ok(Self::Bf16),
            _ => Err(RuntimeError::InvalidConfig(format!(
                "unknown precision `{s}`: expected fp32 or bf16"
            ))),
        }
    }
}

/// Whether this CPU computes in bf16 natively. Without it OpenVINO would emulate bf16 more
/// slowly than fp32, so `--precision bf16` is refused rather than silently slower.
pub fn cpu_has_bf16() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        // Every CPU with AMX-BF16 (Sapphire Rapids on) also has AVX512_BF16, whose detection
        // is stable Rust (AMX's is not yet).
        std::arch::is_x86_feature_detected!("avx512bf16")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// The plugin library to load: `explicit` (the CLI's `--openvino-lib`), else the provisioned
/// copy. A missing file is an error that says how to provision it.
pub fn plugin_path(explicit: Option<&Path>) -> Result<PathBuf, RuntimeError> {
    let path = explicit
        .map(Path::to_path_buf)
        .or_else(|| PROVISIONED_PLUGIN.map(PathBuf::from))
        .ok_or_else(|| {
            RuntimeError::InvalidConfig(
                "--precision bf16 needs the OpenVINO plugin library: pass --openvino-lib (no \
                 provisioned copy for this build target)"
                    .into(),
            )
        })?;
    if path.is_file() {
        return Ok(path);
    }
    let how = if explicit.is_some() {
        "(--openvino-lib)".to_string()
    } else {
        "(the provisioned copy): run `python3 scripts/provision_ort.py --openvino` in the \
         repository, or pass --openvino-lib"
            .to_string()
    };
    Err(RuntimeError::InvalidConfig(format!(
        "--precision bf16: OpenVINO plugin library {} not found {how}",
        path.display()
    )))
}

/// Registers the plugin into the environment once per process (ONNX Runtime refuses a second
/// registration under the same name); later calls with the same library are no-ops, another
/// library is an error.
fn register(env: &OrtEnv, library: &Path) -> Result<(), RuntimeError> {
    static REGISTERED: Mutex<Option<PathBuf>> = Mutex::new(None);
    let mut registered = REGISTERED.lock().unwrap_or_else(PoisonError::into_inner);
    match registered.as_deref() {
        Some(done) if done == library => return Ok(()),
        Some(done) => {
            return Err(RuntimeError::InvalidConfig(format!(
                "the OpenVINO plugin {} is already loaded in this process; it cannot also be \
                 loaded from {}",
                done.display(),
                library.display()
            )))
        }
        None => {}
    }
    env.environment()
        .register_ep_library(REGISTRATION, library)
        .map_err(|e| unavailable(library, e.to_string()))?;
    *registered = Some(library.to_path_buf());
    Ok(())
}

fn unavailable(library: &Path, message: String) -> RuntimeError {
    RuntimeError::OpenVinoUnavailable {
        library: library.to_path_buf(),
        message: message.trim_end().to_string(),
    }
}

/// The OpenVINO properties of a bf16 session: `INFERENCE_PRECISION_HINT` set explicitly (on a
/// CPU with bf16 OpenVINO's default already is bf16, but the choice must not depend on it).
/// No `CACHE_DIR`: OpenVINO's model cache saved 0.3 s of load at full size but held its
/// imported blobs beside ONNX Runtime's initializers, +1.5 GB (bench/RESULTS.md).
fn load_config() -> String {
    r#"{"CPU":{"INFERENCE_PRECISION_HINT":"bf16"}}"#.to_string()
}

/// Whether ONNX Runtime's device list holds OpenVINO's CPU device.
fn is_openvino_cpu(d: &ort::device::Device<'_>) -> bool {
    d.ep().is_ok_and(|name| name == OPENVINO_PROVIDER)
        && d.hardware_device().ty() == DeviceType::CPU
}

/// Loads the plugin (once per process) and checks that it offers this CPU, so that
/// `--precision bf16` fails before any session is created rather than after the first graphs
/// loaded. The plugin offers Intel devices only (its factory skips every hardware device whose
/// vendor id is not Intel's, 0x8086): on an AMD CPU with AVX512_BF16 (Zen 4 and later) it
/// loads and offers nothing, and the error says so.
pub fn ensure_available(env: &OrtEnv, explicit_library: Option<&Path>) -> Result<(), RuntimeError> {
    let library = plugin_path(explicit_library)?;
    ensure_cpu_device(env, &library)
}

fn ensure_cpu_device(env: &OrtEnv, library: &Path) -> Result<(), RuntimeError> {
    register(env, library)?;
    if env.environment().devices().any(|d| is_openvino_cpu(&d)) {
        return Ok(());
    }
    let vendor = env
        .environment()
        .devices()
        .map(|d| d.hardware_device())
        .find(|h| h.ty() == DeviceType::CPU)
        .and_then(|h| h.vendor().ok().map(str::to_string));
    let message = match vendor {
        Some(vendor) if !vendor.eq_ignore_ascii_case("intel") => format!(
            "the plugin offers Intel devices only, and this CPU is from {vendor} (as ONNX Runtime \
             reports it); --precision bf16 is not available on it"
        ),
        _ => "the plugin loaded but offers no CPU device".into(),
    };
    Err(unavailable(library, message))
}

/// Adds OpenVINO's CPU device to `builder`, bf16, `threads` inference threads (None:
/// OpenVINO's choice, one per core). Nodes OpenVINO does not take stay on ONNX Runtime's CPU
/// provider.
pub fn append(
    env: &OrtEnv,
    builder: SessionBuilder,
    library: &Path,
    threads: Option<usize>,
) -> Result<SessionBuilder, RuntimeError> {
    ensure_cpu_device(env, library)?;
    let key = |name: &str| format!("{OPENVINO_PROVIDER}.{name}");
    let mut options = vec![(key("load_config"), load_config())];
    if let Some(threads) = threads {
        options.push((key("num_of_threads"), threads.to_string()));
    }
    builder
        .with_devices(
            env.environment().devices().filter(is_openvino_cpu),
            Some(&options),
        )
        .map_err(|e| unavailable(library, e.to_string()))
}

/// Puts the session of a graph that stays in fp32 explicitly on ONNX Runtime's CPU provider.
/// A session with no provider named is left to ONNX Runtime's automatic choice among the
/// environment's devices, and once the plugin is registered that hands OpenVINO the other
/// graphs too (there in OpenVINO's default precision, bf16 on such a CPU), including Level3
/// graphs full of the CPU provider's own layouts, which it can only take in pieces (full
/// size: decode 2.0 → 2.3–3.1 s).
pub fn keep_on_cpu_provider(
    env: &OrtEnv,
    builder: SessionBuilder,
) -> Result<SessionBuilder, RuntimeError> {
    let cpu = |d: &ort::device::Device<'_>| d.ep().is_ok_and(|name| name == CPU_PROVIDER);
    builder
        .with_devices(env.environment().devices().filter(cpu), None)
        .map_err(|e| RuntimeError::InvalidConfig(format!("cannot select the CPU provider: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn precision_names_round_trip() {
        for p in [Precision::Fp32, Precision::Bf16] {
            assert_eq!(p.as_str().parse::<Precision>().unwrap(), p);
        }
        assert_eq!("BF16".parse::<Precision>().unwrap(), Precision::Bf16);
        let err = "fp16".parse::<Precision>().unwrap_err().to_string();
        assert!(err.contains("fp32 or bf16"), "{err}");
    }

    #[test]
    fn a_missing_plugin_says_how_to_provision_it() {
        let err = plugin_path(Some(Path::new("/nonexistent/plugin.so")))
            .unwrap_err()
            .to_string();
        assert!(err.contains("/nonexistent/plugin.so") && err.contains("--openvino-lib"));
    }

    #[test]
    fn the_load_config_is_json_with_the_bf16_hint() {
        let value: serde_json::Value = serde_json::from_str(&load_config()).unwrap();
        assert_eq!(value["CPU"]["INFERENCE_PRECISION_HINT"], "bf16");
    }
}

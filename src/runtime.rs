//! ONNX Runtime: loading the shared library (provisioned, --ort-lib, ORT_DYLIB_PATH), the one process-wide Environment, execution providers and session construction.
//!
//! The library is chosen, in order, from an explicit path (the CLI's `--ort-lib`), the
//! `ORT_DYLIB_PATH` environment variable, and the copy `build.rs` provisioned from the official
//! wheel. The first place that names a library decides: a named library that does not exist is
//! an error listing every place, never a silent switch to another library.
//!
//! `ort` loads the library lazily on its first API call and panics if that fails, so every use
//! of `ort` in this crate must come after [`init_environment`] succeeded.

use std::ffi::{c_char, c_int, CStr, OsString};
use std::fmt;
use std::fs;
use std::path::{Path, PathBuf};
use std::ptr;
use std::str::FromStr;
use std::sync::{Mutex, OnceLock, PoisonError};

use ort::environment::Environment;
use ort::ep::{self, ExecutionProviderDispatch};
use ort::session::builder::{GraphOptimizationLevel, SessionBuilder};
use ort::session::Session;

pub use crate::openvino::Precision;

/// The ONNX Runtime release this crate is built against (`ort` rc.15 with `api-31`).
pub const ORT_VERSION: &str = "1.31.1";

/// The environment variable `ort` itself honours; consulted after `--ort-lib`.
pub const ORT_DYLIB_ENV: &str = "ORT_DYLIB_PATH";

/// Absolute path of the provisioned CPU library, baked in by `build.rs` (None on targets that
/// are not provisioned).
const PROVISIONED_LIB: Option<&str> = option_env!("ELITE_ORT_PROVISIONED_LIB");

/// Where `scripts/provision_ort.py --gpu` puts the GPU build; only used in hints.
const PROVISIONED_GPU_LIB: Option<&str> = option_env!("ELITE_ORT_PROVISIONED_GPU_LIB");

/// File names tried, in order, when a library option names a directory.
const LIBRARY_NAMES: [&str; 3] = [
    "libonnxruntime.so.1.31.1",
    "libonnxruntime.so.1",
    "libonnxruntime.so",
];

/// ONNX Runtime's names of the execution providers used here.
pub const CPU_PROVIDER: &str = "CPUExecutionProvider";
pub const CUDA_PROVIDER: &str = "CUDAExecutionProvider";
pub const TENSORRT_PROVIDER: &str = "TensorrtExecutionProvider";

#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    #[error("ONNX Runtime shared library not found; looked at, in order:{}", PlacesList(.places))]
    LibraryNotFound { places: Vec<LibraryPlace> },

    #[error("cannot load the ONNX Runtime library {path} (from {source_kind}): {message}")]
    Load {
        path: PathBuf,
        source_kind: LibrarySource,
        message: String,
    },

    #[error("cannot create the ONNX Runtime environment from {path}: {message}")]
    Environment { path: PathBuf, message: String },

    #[error(
        "ONNX Runtime was already loaded from {loaded} in this process; it cannot also be loaded \
         from {requested} (one library and one environment per process)"
    )]
    AlreadyInitialised { loaded: PathBuf, requested: PathBuf },

    #[error("cannot list the execution providers of {path}: {message}")]
    Providers { path: PathBuf, message: String },

    #[error("model file {path} not found")]
    ModelNotFound { path: PathBuf },

    #[error("{path}: cannot configure the ONNX Runtime session: {message}")]
    SessionOptions { path: PathBuf, message: String },

    #[error("invalid execution configuration: {0}")]
    InvalidConfig(String),

    #[error("cannot create the TensorRT cache directory {path}: {source}")]
    CacheDir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    #[error(
        "{model}: the {provider} execution provider could not be registered with ONNX Runtime \
         {library}: {message}\n{hint}"
    )]
    ProviderUnavailable {
        provider: Device,
        model: PathBuf,
        library: PathBuf,
        message: String,
        hint: String,
    },

    #[error("{path}: ONNX Runtime cannot create a session: {message}")]
    Session { path: PathBuf, message: String },

    #[error(
        "--precision bf16: the OpenVINO execution provider plugin {library} could not be \
         used: {message}"
    )]
    OpenVinoUnavailable { library: PathBuf, message: String },
}

/// Where a library path came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LibrarySource {
    /// An explicit path (the CLI's `--ort-lib`).
    OrtLibOption,
    /// The `ORT_DYLIB_PATH` environment variable.
    EnvVar,
    /// The copy provisioned by `build.rs` / `scripts/provision_ort.py`.
    Provisioned,
}

impl fmt::Display for LibrarySource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::OrtLibOption => "--ort-lib",
            Self::EnvVar => ORT_DYLIB_ENV,
            Self::Provisioned => "the provisioned copy",
        })
    }
}

/// What one place in the search order held.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PlaceState {
    /// The place names no library (option not given, variable unset or empty, no provisioned
    /// copy for this target).
    NotSet,
    /// It names a path where no library is.
    Missing(PathBuf),
    /// It names an existing library file.
    Found(PathBuf),
}

/// One place in the library search order and what it held.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LibraryPlace {
    pub source: LibrarySource,
    pub state: PlaceState,
}

struct PlacesList<'a>(&'a [LibraryPlace]);

impl fmt::Display for PlacesList<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let decided = self.0.iter().position(|p| p.state != PlaceState::NotSet);
        for (i, place) in self.0.iter().enumerate() {
            write!(f, "\n  {}: ", place.source)?;
            match &place.state {
                PlaceState::NotSet => match place.source {
                    LibrarySource::OrtLibOption => f.write_str("not given")?,
                    LibrarySource::EnvVar => f.write_str("not set")?,
                    LibrarySource::Provisioned => {
                        f.write_str("none for this build target (x86_64 Linux only)")?
                    }
                },
                PlaceState::Missing(path) => {
                    write!(f, "{} (no such file)", path.display())?;
                    if place.source == LibrarySource::Provisioned {
                        f.write_str(
                            "; provisioning failed or was skipped at build time: run \
                             `python3 scripts/provision_ort.py` in the repository",
                        )?;
                    }
                }
                PlaceState::Found(path) => {
                    write!(f, "{} (exists", path.display())?;
                    if decided.is_some_and(|d| d < i) {
                        f.write_str(", not used: an earlier place named a library")?;
                    }
                    f.write_str(")")?;
                }
            }
        }
        Ok(())
    }
}

/// The library chosen by [`resolve_library`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResolvedLibrary {
    /// Absolute path of the library file (symlinks not resolved: ONNX Runtime looks for its
    /// provider libraries beside the path it was loaded from).
    pub path: PathBuf,
    pub source: LibrarySource,
}

/// Chooses the ONNX Runtime library: `ort_lib`, then `ORT_DYLIB_PATH`, then the provisioned
/// copy. A path may name the library file or a directory holding `libonnxruntime.so*`.
pub fn resolve_library(ort_lib: Option<&Path>) -> Result<ResolvedLibrary, RuntimeError> {
    resolve_library_from(
        ort_lib,
        std::env::var_os(ORT_DYLIB_ENV),
        PROVISIONED_LIB.map(Path::new),
    )
}

/// [`resolve_library`] with its inputs explicit (for tests).
fn resolve_library_from(
    ort_lib: Option<&Path>,
    env_value: Option<OsString>,
    provisioned: Option<&Path>,
) -> Result<ResolvedLibrary, RuntimeError> {
    let env_path = env_value.filter(|v| !v.is_empty()).map(PathBuf::from);
    let candidates = [
        (LibrarySource::OrtLibOption, ort_lib.map(Path::to_path_buf)),
        (LibrarySource::EnvVar, env_path),
        (
            LibrarySource::Provisioned,
            provisioned.map(Path::to_path_buf),
        ),
    ];
    let places: Vec<LibraryPlace> = candidates
        .into_iter()
        .map(|(source, path)| LibraryPlace {
            source,
            state: match path {
                None => PlaceState::NotSet,
                Some(path) => {
                    let path = absolute(&path);
                    match find_library_file(&path) {
                        Some(file) => PlaceState::Found(file),
                        None => PlaceState::Missing(path),
                    }
                }
            },
        })
        .collect();
    match places.iter().find(|p| p.state != PlaceState::NotSet) {
        Some(LibraryPlace {
            source,
            state: PlaceState::Found(path),
        }) => Ok(ResolvedLibrary {
            path: path.clone(),
            source: *source,
        }),
        _ => Err(RuntimeError::LibraryNotFound { places }),
    }
}

fn absolute(path: &Path) -> PathBuf {
    if path.is_absolute() {
        return path.to_path_buf();
    }
    std::env::current_dir()
        .map(|cwd| cwd.join(path))
        .unwrap_or_else(|_| path.to_path_buf())
}

fn find_library_file(path: &Path) -> Option<PathBuf> {
    if path.is_file() {
        return Some(path.to_path_buf());
    }
    if path.is_dir() {
        return LIBRARY_NAMES
            .iter()
            .map(|name| path.join(name))
            .find(|candidate| candidate.is_file());
    }
    None
}

/// The process-wide ONNX Runtime environment and the library it came from.
pub struct OrtEnv {
    environment: Environment,
    library: ResolvedLibrary,
    canonical: PathBuf,
}

impl fmt::Debug for OrtEnv {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("OrtEnv")
            .field("library", &self.library)
            .finish_non_exhaustive()
    }
}

static ORT_ENV: OnceLock<OrtEnv> = OnceLock::new();
/// Canonical path `ort` loaded its library from; set even if building the environment failed
/// afterwards, because `ort` keeps the library loaded.
static LOADED_LIBRARY: OnceLock<PathBuf> = OnceLock::new();
static INIT_LOCK: Mutex<()> = Mutex::new(());

/// Loads ONNX Runtime (see [`resolve_library`]) and creates the process's one environment, or
/// returns the existing one. Asking for a different library once one is loaded is an error.
pub fn init_environment(ort_lib: Option<&Path>) -> Result<&'static OrtEnv, RuntimeError> {
    init_environment_with(resolve_library(ort_lib)?)
}

/// [`init_environment`] with the library already chosen.
pub fn init_environment_with(library: ResolvedLibrary) -> Result<&'static OrtEnv, RuntimeError> {
    let canonical = fs::canonicalize(&library.path).map_err(|e| RuntimeError::Load {
        path: library.path.clone(),
        source_kind: library.source,
        message: e.to_string(),
    })?;
    let _guard = INIT_LOCK.lock().unwrap_or_else(PoisonError::into_inner);
    if let Some(env) = ORT_ENV.get() {
        return if env.canonical == canonical {
            Ok(env)
        } else {
            Err(RuntimeError::AlreadyInitialised {
                loaded: env.library.path.clone(),
                requested: library.path,
            })
        };
    }
    if let Some(loaded) = LOADED_LIBRARY.get() {
        if *loaded != canonical {
            return Err(RuntimeError::AlreadyInitialised {
                loaded: loaded.clone(),
                requested: library.path,
            });
        }
    }
    let builder = ort::init_from(&library.path).map_err(|e| RuntimeError::Load {
        path: library.path.clone(),
        source_kind: library.source,
        message: load_error_message(&e),
    })?;
    // `ort` now holds the library for the rest of the process.
    let _ = LOADED_LIBRARY.set(canonical.clone());
    let environment = builder
        .with_name("elite-ort")
        .with_telemetry(false)
        .build()
        .map_err(|e| RuntimeError::Environment {
            path: library.path.clone(),
            message: e.to_string(),
        })?;
    Ok(ORT_ENV.get_or_init(|| OrtEnv {
        environment,
        library,
        canonical,
    }))
}

/// `ort`'s load error with the dynamic loader's own text (its Display alone says only
/// "dlopen failed").
fn load_error_message(error: &ort::LoadDynamicError) -> String {
    let mut message = error.to_string();
    if let ort::LoadDynamicError::Dlopen { error, .. } = error {
        let mut source = std::error::Error::source(error);
        while let Some(cause) = source {
            message.push_str(": ");
            message.push_str(&cause.to_string());
            source = cause.source();
        }
    }
    message
}

impl OrtEnv {
    /// The `ort` environment, for building sessions directly.
    pub fn environment(&self) -> &Environment {
        &self.environment
    }

    /// The library this environment was loaded from.
    pub fn library(&self) -> &ResolvedLibrary {
        &self.library
    }

    /// ONNX Runtime's build description (version, git commit, build flags).
    pub fn build_info(&self) -> &'static str {
        ort::info()
    }

    /// The execution providers the loaded library was built with, in ONNX Runtime's order
    /// (e.g. `TensorrtExecutionProvider`, `CUDAExecutionProvider`, `CPUExecutionProvider`).
    /// Being listed does not mean the provider's own dependencies (CUDA, TensorRT) load.
    pub fn available_providers(&self) -> Result<Vec<String>, RuntimeError> {
        let fail = |message: String| RuntimeError::Providers {
            path: self.library.path.clone(),
            message,
        };
        let api = ort::api();
        let mut names: *mut *mut c_char = ptr::null_mut();
        let mut count: c_int = 0;
        // SAFETY: the library is loaded (this environment exists); both out-pointers are valid.
        let status = unsafe { (api.GetAvailableProviders)(&mut names, &mut count) };
        status_result(status).map_err(fail)?;
        if names.is_null() {
            return Ok(Vec::new());
        }
        let len = usize::try_from(count).unwrap_or(0);
        // SAFETY: on success ONNX Runtime returned `count` valid NUL-terminated strings.
        let providers = (0..len)
            .map(|i| unsafe { CStr::from_ptr(*names.add(i)) })
            .map(|name| name.to_string_lossy().into_owned())
            .collect();
        // SAFETY: releases exactly what GetAvailableProviders returned.
        let status = unsafe { (api.ReleaseAvailableProviders)(names, count) };
        status_result(status).map_err(fail)?;
        Ok(providers)
    }
}

/// Turns an `OrtStatus` into its message, releasing it.
fn status_result(status: ort::sys::OrtStatusPtr) -> Result<(), String> {
    if status.0.is_null() {
        return Ok(());
    }
    let api = ort::api();
    // SAFETY: a non-null status from the API; its message lives until ReleaseStatus.
    let message = unsafe {
        let raw = (api.GetErrorMessage)(status.0);
        let message = if raw.is_null() {
            String::from("unknown ONNX Runtime error")
        } else {
            CStr::from_ptr(raw).to_string_lossy().into_owned()
        };
        (api.ReleaseStatus)(status.0);
        message
    };
    Err(message)
}

/// Where the graphs run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Device {
    #[default]
    Cpu,
    /// ONNX Runtime's CUDA execution provider.
    Cuda,
    /// ONNX Runtime's TensorRT execution provider, with CUDA registered after it for the nodes
    /// TensorRT does not take.
    TensorRt,
}

impl Device {
    /// The name used on the command line.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Cpu => "cpu",
            Self::Cuda => "cuda",
            Self::TensorRt => "tensorrt",
        }
    }
}

impl fmt::Display for Device {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Cpu => "CPU",
            Self::Cuda => "CUDA",
            Self::TensorRt => "TensorRT",
        })
    }
}

impl FromStr for Device {
    type Err = RuntimeError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.to_ascii_lowercase().as_str() {
            "cpu" => Ok(Self::Cpu),
            "cuda" => Ok(Self::Cuda),
            "tensorrt" | "trt" => Ok(Self::TensorRt),
            _ => Err(RuntimeError::InvalidConfig(format!(
                "unknown device `{s}`: expected cpu, cuda or tensorrt"
            ))),
        }
    }
}

/// Where and how the graphs run, as the user chooses it: device, threads, TensorRT precision,
/// fallback policy. Per-graph settings (cache locations, TensorRT profiles, weight packing) are
/// [`SessionOptions`], derived by the engine's session set.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ExecutionConfig {
    pub device: Device,
    /// GPU ordinal for CUDA / TensorRT.
    pub device_id: u32,
    /// Intra-op threads; None lets ONNX Runtime choose.
    pub threads: Option<usize>,
    /// TensorRT: build fp16 engines.
    pub trt_fp16: bool,
    /// When a GPU provider cannot be registered, warn on stderr and go on with the next one
    /// (TensorRT, then CUDA, then CPU) instead of failing.
    pub allow_fallback: bool,
    /// The UNet's and VAE decoder's arithmetic; bf16 runs them through OpenVINO on the CPU
    /// (crate::openvino).
    pub precision: Precision,
    /// The OpenVINO plugin library for bf16; None: the provisioned copy.
    pub openvino_lib: Option<PathBuf>,
}

/// Most intra-op threads per available core: more only oversubscribes the cores, and absurd
/// counts (100000) crash ONNX Runtime's thread pool.
pub const MAX_THREADS_PER_CORE: usize = 4;

impl ExecutionConfig {
    /// Rejects settings that cannot work, before ONNX Runtime sees them; returns a warning for
    /// settings that work badly (more threads than cores).
    pub fn validate(&self) -> Result<Option<String>, RuntimeError> {
        if self.device == Device::Cpu && self.device_id != 0 {
            return Err(RuntimeError::InvalidConfig(format!(
                "device id {} given with the CPU device; a device id selects a GPU (cuda,                  tensorrt)",
                self.device_id
            )));
        }
        if self.precision == Precision::Bf16 {
            if self.device != Device::Cpu {
                return Err(RuntimeError::InvalidConfig(format!(
                    "--precision bf16 runs the UNet and decoder through OpenVINO on the CPU, not with \
                     --device {} (on a GPU, --device tensorrt --trt-fp16 is the fast precision)",
                    self.device.as_str()
                )));
            }
            if !crate::openvino::cpu_has_bf16() {
                return Err(RuntimeError::InvalidConfig(
                    "--precision bf16 needs a CPU with bf16 arithmetic (AVX512_BF16 or \
                     AMX-BF16); this one has neither, and emulated bf16 is slower than fp32"
                        .into(),
                ));
            }
        }
        if i32::try_from(self.device_id).is_err() {
            return Err(RuntimeError::InvalidConfig(format!(
                "device id {} is too large",
                self.device_id
            )));
        }
        let Some(threads) = self.threads else {
            return Ok(None);
        };
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        let max = MAX_THREADS_PER_CORE * cores;
        if threads == 0 || threads > max {
            return Err(RuntimeError::InvalidConfig(format!(
                "threads must be 1..={max} ({MAX_THREADS_PER_CORE} per available core, {cores}                  cores here), got {threads}"
            )));
        }
        Ok((threads > cores).then(|| {
            format!(
                "{threads} intra-op threads on {cores} available cores oversubscribes them;                  {cores} is usually fastest"
            )
        }))
    }
}

/// Per-graph session settings (chosen by the engine's session set, not by the user).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct SessionOptions {
    /// CPU: keep the graph as ONNX Runtime optimised it in this directory (see
    /// [`create_session_with`]), so that later starts skip the optimisation. None: no cache.
    pub graph_cache: Option<PathBuf>,
    /// CPU: do not pre-pack weights into the GEMM kernels' layout, neither at session
    /// creation nor in the graph cache. Packing costs about as much as a few runs of a graph
    /// and saves a little on every run after: worth it for the UNet (one call per step), not
    /// for graphs that run once per image (full-size CLIP vision tower: load + one run 2.0 s
    /// packed, 1.2 s not). This holds for cached graphs too: ONNX Runtime 1.31 packs the
    /// weights again and hashes them (MurmurHash3) on every load, also when the cached graph
    /// stores them pre-packed, so storing them saves nothing (cached CLIP vision tower: load
    /// 0.84 s packed, 0.14 s not; first run 1.15 s, 1.37 s; bench/RESULTS.md, issue 14).
    pub no_prepacking: bool,
    /// Let ONNX Runtime plan all intermediate buffers of a run as one block per input shape
    /// (its default). Off here: the block holds more than the peak of live tensors (full-size
    /// UNet at 512², batch 2: 7.8 GB peak RSS with the pattern, 5.6 GB without; VAE decoder
    /// 2.3 → 1.4 GB) and the arena serves the buffers as fast without it.
    pub memory_pattern: bool,
    /// TensorRT: the optimisation profile of the graph; None lets TensorRT build an engine per
    /// input shape it sees.
    pub trt_profile: Option<crate::graphs::TrtProfile>,
    /// TensorRT: directory for this graph's engine and timing caches (created if missing).
    pub trt_cache_dir: Option<PathBuf>,
    /// Run this graph through OpenVINO in bf16 (`--precision bf16`: UNet, VAE decoder): from the
    /// bundle's graph as it is, since OpenVINO optimises it itself (ONNX Runtime's Level3
    /// layouts are its CPU provider's), so without the graph cache.
    pub openvino_bf16: bool,
}

/// Where [`create_session_with`] keeps a graph: `<cache>/<key>/<file name>` (+ `.data`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CachedGraph {
    pub dir: PathBuf,
    pub model: PathBuf,
}

impl CachedGraph {
    /// The cache entry for the graph at `path` whose contents `content_id` identifies (e.g. the
    /// manifest's sha256 of the graph and of its external data). The key also covers the ONNX
    /// Runtime version, the optimisation level, this CPU (optimised CPU graphs hold
    /// hardware-specific layouts) and whether the entry stores pre-packed weights
    /// (`prepacked`; see [`SessionOptions::no_prepacking`]).
    pub fn locate(cache: &Path, path: &Path, content_id: &str, prepacked: bool) -> CachedGraph {
        let packing = if prepacked { "prepacked" } else { "unpacked" };
        let key = crate::cache::sha256_hex(
            format!(
                "elite-ort graph cache v3\n{ORT_VERSION}\nlevel3\n{packing}\n{content_id}\n{}",
                crate::cache::cpu_signature()
            )
            .as_bytes(),
        );
        let dir = cache.join(&key[..32]);
        let name = path
            .file_name()
            .map(PathBuf::from)
            .unwrap_or_else(|| "graph.onnx".into());
        CachedGraph {
            model: dir.join(name),
            dir,
        }
    }

    /// True once a complete entry was written (the directory appears by an atomic rename).
    pub fn is_complete(&self) -> bool {
        self.model.is_file()
    }
}

/// Creates a session for the model at `path` (GraphOptimizationLevel::Level3) with the
/// providers `config` asks for and default [`SessionOptions`]. A requested GPU provider that
/// cannot be registered is an error carrying ONNX Runtime's message (which names the missing
/// library), unless `config.allow_fallback`.
pub fn create_session(
    env: &OrtEnv,
    path: &Path,
    config: &ExecutionConfig,
) -> Result<Session, RuntimeError> {
    create_session_with(env, path, None, config, &SessionOptions::default())
}

/// [`create_session`] with per-graph options, through the optimised-graph cache of
/// `options.graph_cache` (CPU only; `content_id` identifies the graph's verified contents,
/// None = no caching).
///
/// The first start optimises the graph (Level3) and has ONNX Runtime save the result, weights
/// as external data (with their pre-packed GEMM layouts unless `options.no_prepacking`), into
/// a temporary directory that is then renamed into place. Later starts load that graph with
/// only basic optimisations: no graph transformations, and the weights are memory mapped
/// instead of parsed out of the protobuf (full-size UNet: 7.6 s → 1.6 s, of which about 1 s
/// is ONNX Runtime packing and hashing its weights again; CLIP vision, not packed:
/// 2.4 s → 0.14 s). Numerics are those of the Level3 session (the same kernels on the same
/// graph). A cache that cannot be written is ignored. The entries take the graphs' size on
/// disk plus the UNet's packed weights (full-size bundle: 6.4 GB).
pub fn create_session_with(
    env: &OrtEnv,
    path: &Path,
    content_id: Option<&str>,
    config: &ExecutionConfig,
    options: &SessionOptions,
) -> Result<Session, RuntimeError> {
    if !path.is_file() {
        return Err(RuntimeError::ModelNotFound {
            path: path.to_path_buf(),
        });
    }
    let cached = match (&options.graph_cache, content_id, config.device) {
        _ if options.openvino_bf16 => None,
        (Some(cache), Some(id), Device::Cpu) => {
            Some(CachedGraph::locate(cache, path, id, !options.no_prepacking))
        }
        _ => None,
    };
    let Some(cached) = cached else {
        return build_session(env, path, config, options, Level::Full);
    };
    if cached.is_complete() {
        return build_session(env, &cached.model, config, options, Level::Preoptimised);
    }
    let tmp = cached
        .dir
        .with_extension(format!("tmp-{}", std::process::id()));
    let _ = fs::remove_dir_all(&tmp);
    let saved = fs::create_dir_all(&tmp).ok().and_then(|()| {
        let file = tmp.join(cached.model.file_name()?);
        build_session(env, path, config, options, Level::FullSavedTo(&file)).ok()
    });
    match saved {
        Some(session) => {
            // Another process may have won the race; its entry is as good as ours.
            if fs::rename(&tmp, &cached.dir).is_err() {
                let _ = fs::remove_dir_all(&tmp);
            }
            Ok(session)
        }
        None => {
            let _ = fs::remove_dir_all(&tmp);
            build_session(env, path, config, options, Level::Full)
        }
    }
}

/// How [`build_session`] optimises.
#[derive(Clone, Copy)]
enum Level<'a> {
    /// Level3, nothing saved.
    Full,
    /// Level3, and the optimised graph saved here with its weights as `<file>.data`.
    FullSavedTo(&'a Path),
    /// A graph that Level3 already optimised: basic optimisations only.
    Preoptimised,
}

fn build_session(
    env: &OrtEnv,
    path: &Path,
    config: &ExecutionConfig,
    options: &SessionOptions,
    level: Level<'_>,
) -> Result<Session, RuntimeError> {
    let options_err = |message: String| RuntimeError::SessionOptions {
        path: path.to_path_buf(),
        message,
    };
    let opt_level = match level {
        // ONNX Runtime's fusions would hand OpenVINO its CPU provider's contrib ops.
        _ if options.openvino_bf16 => GraphOptimizationLevel::Disable,
        Level::Preoptimised => GraphOptimizationLevel::Level1,
        Level::Full | Level::FullSavedTo(_) => GraphOptimizationLevel::Level3,
    };
    let mut builder = Session::builder(env.environment())
        .map_err(|e| options_err(e.to_string()))?
        .with_optimization_level(opt_level)
        .map_err(|e| options_err(e.to_string()))?;
    if let Level::FullSavedTo(file) = level {
        let data = format!(
            "{}.data",
            file.file_name().unwrap_or_default().to_string_lossy()
        );
        builder = builder
            .with_optimized_model_path(file)
            .map_err(|e| options_err(e.to_string()))?;
        let mut entries = vec![
            (
                "session.optimized_model_external_initializers_file_name",
                data.as_str(),
            ),
            (
                "session.optimized_model_external_initializers_min_size_in_bytes",
                "1024",
            ),
        ];
        if !options.no_prepacking {
            entries.push(("session.save_external_prepacked_constant_initializers", "1"));
        }
        for (key, value) in entries {
            builder = builder
                .with_config_entry(key, value)
                .map_err(|e| options_err(e.to_string()))?;
        }
    }
    if let Some(threads) = config.threads {
        builder = builder
            .with_intra_threads(threads)
            .map_err(|e| options_err(e.to_string()))?;
    }
    if !options.memory_pattern {
        builder = builder
            .with_memory_pattern(false)
            .map_err(|e| options_err(e.to_string()))?;
    }
    if options.no_prepacking {
        builder = builder
            .with_prepacking(false)
            .map_err(|e| options_err(e.to_string()))?;
    }
    builder = if options.openvino_bf16 {
        let library = crate::openvino::plugin_path(config.openvino_lib.as_deref())?;
        crate::openvino::append(env, builder, &library, config.threads)?
    } else if config.precision == Precision::Bf16 {
        crate::openvino::keep_on_cpu_provider(env, builder)?
    } else {
        register_providers(env, builder, path, config, options)?
    };
    builder
        .commit_from_file(path)
        .map_err(|e| RuntimeError::Session {
            path: path.to_path_buf(),
            message: e.to_string(),
        })
}

fn register_providers(
    env: &OrtEnv,
    mut builder: SessionBuilder,
    path: &Path,
    config: &ExecutionConfig,
    options: &SessionOptions,
) -> Result<SessionBuilder, RuntimeError> {
    let device_id = i32::try_from(config.device_id).map_err(|_| {
        RuntimeError::InvalidConfig(format!("device id {} is too large", config.device_id))
    })?;
    let mut providers: Vec<(Device, ExecutionProviderDispatch)> = Vec::new();
    if config.device == Device::TensorRt {
        providers.push((
            Device::TensorRt,
            tensorrt_provider(config, options, device_id)?,
        ));
    }
    if matches!(config.device, Device::TensorRt | Device::Cuda) {
        let cuda = ep::CUDA::default().with_device_id(device_id).build();
        providers.push((Device::Cuda, cuda));
    }
    for (device, provider) in providers {
        builder = match builder.with_execution_providers([provider.error_on_failure()]) {
            Ok(builder) => builder,
            Err(error) => {
                let message = error.to_string().trim_end().to_string();
                if !config.allow_fallback {
                    return Err(RuntimeError::ProviderUnavailable {
                        provider: device,
                        model: path.to_path_buf(),
                        library: env.library.path.clone(),
                        hint: provider_hint(env, device),
                        message,
                    });
                }
                warn_fallback_once(device, path, &message);
                error.recover()
            }
        };
    }
    Ok(builder)
}

/// Says once per provider and process that it fell back (every session would repeat it).
fn warn_fallback_once(device: Device, path: &Path, message: &str) {
    static WARNED: Mutex<Vec<Device>> = Mutex::new(Vec::new());
    let mut warned = WARNED.lock().unwrap_or_else(|e| e.into_inner());
    if warned.contains(&device) {
        return;
    }
    warned.push(device);
    eprintln!(
        "warning: {}: the {device} execution provider could not be registered ({message}); \
         falling back for every graph",
        path.display()
    );
}

fn tensorrt_provider(
    config: &ExecutionConfig,
    options: &SessionOptions,
    device_id: i32,
) -> Result<ExecutionProviderDispatch, RuntimeError> {
    let mut trt = ep::TensorRT::default()
        .with_device_id(device_id)
        .with_fp16(config.trt_fp16);
    if let Some(profile) = &options.trt_profile {
        trt = trt
            .with_profile_min_shapes(&profile.min)
            .with_profile_opt_shapes(&profile.opt)
            .with_profile_max_shapes(&profile.max);
    }
    if let Some(dir) = &options.trt_cache_dir {
        fs::create_dir_all(dir).map_err(|source| RuntimeError::CacheDir {
            path: dir.clone(),
            source,
        })?;
        let dir_str = dir.to_str().ok_or_else(|| {
            RuntimeError::InvalidConfig(format!(
                "TensorRT cache directory {} is not valid UTF-8",
                dir.display()
            ))
        })?;
        trt = trt
            .with_engine_cache(true)
            .with_engine_cache_path(dir_str)
            .with_timing_cache(true)
            .with_timing_cache_path(dir_str);
    }
    Ok(trt.build())
}

/// What to do about a provider that failed to register.
fn provider_hint(env: &OrtEnv, device: Device) -> String {
    let name = match device {
        Device::Cpu => CPU_PROVIDER,
        Device::Cuda => CUDA_PROVIDER,
        Device::TensorRt => TENSORRT_PROVIDER,
    };
    let built_in = env
        .available_providers()
        .map(|list| list.iter().any(|p| p == name))
        .unwrap_or(true);
    if built_in {
        format!(
            "{name} is built into this library, but its own dependencies did not load (the \
             message above names the missing one): make the CUDA 13 / cuDNN 9{} libraries \
             findable (LD_LIBRARY_PATH), or pass --allow-fallback to run on the CPU",
            if device == Device::TensorRt {
                " / TensorRT 10"
            } else {
                ""
            }
        )
    } else {
        format!(
            "this library was built without {name} (CPU only). Provision the GPU build with \
             `python3 scripts/provision_ort.py --gpu` and pass --ort-lib {} (or set {ORT_DYLIB_ENV}), \
             or pass --allow-fallback to run on the CPU",
            PROVISIONED_GPU_LIB.unwrap_or("<repo>/.ort/onnxruntime-gpu-1.31.1/libonnxruntime.so.1.31.1")
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn touch(path: &Path) {
        std::fs::write(path, b"not a library").unwrap();
    }

    #[test]
    fn explicit_option_wins_over_env_and_provisioned() {
        let dir = tempfile::tempdir().unwrap();
        let a = dir.path().join("a.so");
        let b = dir.path().join("b.so");
        let c = dir.path().join("c.so");
        for p in [&a, &b, &c] {
            touch(p);
        }
        let got = resolve_library_from(Some(&a), Some(b.clone().into()), Some(&c)).unwrap();
        assert_eq!(
            got,
            ResolvedLibrary {
                path: a,
                source: LibrarySource::OrtLibOption
            }
        );
        let got = resolve_library_from(None, Some(b.clone().into()), Some(&c)).unwrap();
        assert_eq!(
            got,
            ResolvedLibrary {
                path: b,
                source: LibrarySource::EnvVar
            }
        );
        let got = resolve_library_from(None, Some(OsString::new()), Some(&c)).unwrap();
        assert_eq!(
            got,
            ResolvedLibrary {
                path: c,
                source: LibrarySource::Provisioned
            }
        );
    }

    #[test]
    fn directory_option_finds_the_versioned_library() {
        let dir = tempfile::tempdir().unwrap();
        let lib = dir.path().join("libonnxruntime.so.1.31.1");
        touch(&lib);
        let got = resolve_library_from(Some(dir.path()), None, None).unwrap();
        assert_eq!(got.path, lib);
    }

    #[test]
    fn missing_named_library_is_an_error_listing_every_place() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("nope.so");
        let provisioned = dir.path().join("provisioned.so");
        touch(&provisioned);
        let err = resolve_library_from(Some(&missing), None, Some(&provisioned)).unwrap_err();
        let text = err.to_string();
        assert!(
            matches!(err, RuntimeError::LibraryNotFound { .. }),
            "{text}"
        );
        assert!(
            text.contains(&format!("--ort-lib: {} (no such file)", missing.display())),
            "{text}"
        );
        assert!(text.contains("ORT_DYLIB_PATH: not set"), "{text}");
        assert!(
            text.contains("not used: an earlier place named a library"),
            "{text}"
        );

        let err = resolve_library_from(None, None, Some(&missing))
            .unwrap_err()
            .to_string();
        assert!(err.contains("--ort-lib: not given"), "{err}");
        assert!(err.contains("scripts/provision_ort.py"), "{err}");

        let err = resolve_library_from(None, None, None)
            .unwrap_err()
            .to_string();
        assert!(err.contains("none for this build target"), "{err}");
    }

    #[test]
    fn device_parses_cli_names() {
        assert_eq!("cpu".parse::<Device>().unwrap(), Device::Cpu);
        assert_eq!("CUDA".parse::<Device>().unwrap(), Device::Cuda);
        assert_eq!("tensorrt".parse::<Device>().unwrap(), Device::TensorRt);
        let err = "tpu".parse::<Device>().unwrap_err().to_string();
        assert!(err.contains("unknown device `tpu`"), "{err}");
    }

    /// The only test in this binary that loads ONNX Runtime: one environment per process, so
    /// the load-failure, success and mismatch cases run in a fixed order here.
    #[test]
    fn environment_lifecycle() {
        let dir = tempfile::tempdir().unwrap();
        let fake = dir.path().join("libonnxruntime.so.1.31.1");
        touch(&fake);

        // An existing file that is not a library: an error from dlopen, not a panic.
        let err = init_environment(Some(&fake)).unwrap_err();
        assert!(matches!(err, RuntimeError::Load { .. }), "{err}");
        let text = err.to_string();
        assert!(text.contains(&fake.display().to_string()), "{text}");
        // The loader's own reason, not just "dlopen failed".
        assert!(text.contains("dlopen failed: "), "{text}");

        // A path that does not exist never reaches ort.
        let err = init_environment(Some(&dir.path().join("missing.so"))).unwrap_err();
        assert!(matches!(err, RuntimeError::LibraryNotFound { .. }), "{err}");

        // The real library (ORT_DYLIB_PATH or the provisioned copy) loads after the failure.
        let library = resolve_library(None).unwrap_or_else(|e| panic!("{e}"));
        let env = init_environment_with(library.clone()).unwrap();
        assert_eq!(env.library(), &library);
        let again = init_environment_with(library).unwrap();
        assert!(std::ptr::eq(env, again));

        // Another library once one is loaded: a clear error.
        let err = init_environment(Some(&fake)).unwrap_err();
        assert!(
            matches!(err, RuntimeError::AlreadyInitialised { .. }),
            "{err}"
        );

        let providers = env.available_providers().unwrap();
        assert!(providers.iter().any(|p| p == CPU_PROVIDER), "{providers:?}");
        assert!(
            env.build_info().contains("ORT Build Info"),
            "{}",
            env.build_info()
        );
    }
}

//! `elite-ort`: the command-line front end. It parses flags into library values, runs them
//! through the engine, and reports; all behaviour lives in the library.

use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use clap::{Args, Parser, Subcommand, ValueEnum};
use elite_ort::attention_maps::StepWindow;
use elite_ort::cache::default_cache_dir;
use elite_ort::call_size::CallSizing;
use elite_ort::concept::Concept;
use elite_ort::display::escape;
use elite_ort::engine::{Engine, EngineConfig};
use elite_ort::error::Error;
use elite_ort::files::remove_stale_temporaries;
use elite_ort::guidance::CfgMode;
use elite_ort::image_decode::ImageLimits;
use elite_ort::job::{FinishedJob, JobEvent, JobId, JobTimings, Outcome, Stage};
use elite_ort::map_output::{plan_map_outputs, prompt_tokens, stage_maps};
use elite_ort::output::{plan_outputs, JobOutputs, OutputSet};
use elite_ort::request::{default_steps, GenerateRequest};
use elite_ort::runtime::{Device, ExecutionConfig, Precision};
use elite_ort::scheduler::SchedulerKind;
use elite_ort::sessions::{MemoryPolicy, Phase};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

#[derive(Parser)]
#[command(
    name = "elite-ort",
    version,
    about = "ELITE (ICCV 2023) concept-driven Stable Diffusion on ONNX Runtime"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Generate images of a concept: `--prompt "a photo of S on the beach" --image cat.jpg`.
    Run(RunArgs),
    /// Encode a concept image once and save it (safetensors) for `run --concept`.
    Encode(EncodeArgs),
    /// Show a bundle's manifest and the execution providers ONNX Runtime offers.
    Info(InfoArgs),
    /// Serve the bundle over HTTP (native JSON API and KServe Open Inference Protocol v2), with
    /// step-level batching of concurrent requests.
    Serve(ServeArgs),
}

#[derive(Args, Clone)]
struct EngineArgs {
    /// Model bundle directory (e.g. onnx/tiny).
    #[arg(long)]
    bundle: PathBuf,
    /// Execution provider.
    #[arg(long, value_enum, default_value_t = DeviceArg::Cpu)]
    device: DeviceArg,
    /// GPU ordinal for cuda / tensorrt.
    #[arg(long)]
    device_id: Option<u32>,
    /// Intra-op threads (default: ONNX Runtime's choice, the physical cores); at most 4 per
    /// available core.
    #[arg(long)]
    threads: Option<usize>,
    /// TensorRT: build fp16 engines.
    #[arg(long)]
    trt_fp16: bool,
    /// TensorRT: directory for engine and timing caches (one subdirectory per graph contents,
    /// precision and profile). Default: `tensorrt/` in the cache directory (none with
    /// --no-cache).
    #[arg(long)]
    trt_cache: Option<PathBuf>,
    /// Fall back to the next provider (TensorRT → CUDA → CPU) instead of failing.
    #[arg(long)]
    allow_fallback: bool,
    /// The arithmetic of the UNet and the VAE decoder. `bf16` runs them through ONNX Runtime's
    /// OpenVINO provider on a CPU with bf16 arithmetic (AVX512_BF16 or AMX): about 3× faster
    /// per step, images within a few levels of fp32 (README, "Precision"). Needs `python3 scripts/provision_ort.py
    /// --openvino` once.
    #[arg(long, value_enum, default_value_t = PrecisionArg::Fp32)]
    precision: PrecisionArg,
    /// OpenVINO plugin library for --precision bf16 (default: the provisioned copy).
    #[arg(long)]
    openvino_lib: Option<PathBuf>,
    /// ONNX Runtime shared library (else ORT_DYLIB_PATH, else the provisioned copy).
    #[arg(long)]
    ort_lib: Option<PathBuf>,
    /// Skip the sha256 check of the bundle files.
    #[arg(long)]
    no_verify: bool,
    /// Cache directory: bundle files already checksummed are not hashed again while unchanged,
    /// and graphs are kept as ONNX Runtime optimised them (CPU; as much disk as the bundle).
    /// Default: ELITE_ORT_CACHE_DIR, else $XDG_CACHE_HOME/elite-ort, else ~/.cache/elite-ort.
    #[arg(long, conflicts_with = "no_cache")]
    cache_dir: Option<PathBuf>,
    /// Use no cache: hash every file and optimise every graph on every start.
    #[arg(long)]
    no_cache: bool,
    /// Guidance: a job's conditional and unconditional UNet rows may share a call (`batched`:
    /// one call at batch 2n for one prompt) or never do (`split`: two calls at batch n, as the
    /// official scripts do); both give the same images. `split` holds half the UNet
    /// activations at about the same CPU speed: use it when memory is tight.
    #[arg(long, value_enum, default_value_t = CfgArg::Batched)]
    cfg: CfgArg,
    /// Most UNet rows per call (each image needs 2 per step: conditional and unconditional);
    /// the rows of all prompts share calls up to this. Default: 8 on the CPU, 16 on a GPU.
    #[arg(long)]
    max_batch: Option<usize>,
    /// How many of those rows a call takes: `adaptive` learns, per latent size, the call size
    /// with the lowest time per row on this machine (GPUs: the largest; two CPU cores and a
    /// small model: often 2); `fixed` fills every call up to --max-batch.
    #[arg(long, value_enum, default_value_t = CallSizingArg::Adaptive)]
    call_sizing: CallSizingArg,
    /// Largest concept image or mask, in pixels (width × height as its header declares them,
    /// checked before anything is decoded). Default: Pillow's decompression-bomb limit,
    /// 178956970 (2 × 89478485); raise it only for trusted files.
    #[arg(long)]
    max_image_pixels: Option<u64>,
    /// No progress bar or notices on stderr.
    #[arg(long, short)]
    quiet: bool,
    /// Print per-stage timings (text on stderr, or JSON on stdout).
    #[arg(long, value_enum, num_args = 0..=1, default_missing_value = "text")]
    timings: Option<TimingsFormat>,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum PrecisionArg {
    Fp32,
    Bf16,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum DeviceArg {
    Cpu,
    Cuda,
    Tensorrt,
}

#[derive(Clone, Copy, ValueEnum)]
enum CfgArg {
    Batched,
    Split,
}

#[derive(Clone, Copy, ValueEnum)]
enum CallSizingArg {
    Adaptive,
    Fixed,
}

#[derive(Clone, Copy, ValueEnum)]
enum TimingsFormat {
    Text,
    Json,
}

#[derive(Args)]
struct RunArgs {
    #[command(flatten)]
    engine: EngineArgs,
    /// Prompt containing the placeholder word, e.g. "a photo of S on the beach". Repeat for
    /// several prompts: each is a job, and all jobs share the UNet calls.
    #[arg(long, required = true)]
    prompt: Vec<String>,
    /// Concept image (any format the image crate reads). One for all prompts, or one per
    /// prompt (in order).
    #[arg(long, required_unless_present = "concept", conflicts_with = "concept")]
    image: Vec<PathBuf>,
    /// Object mask of the same size (white = object); default: the whole image. One per
    /// --image, in order.
    #[arg(long, requires = "image")]
    mask: Vec<PathBuf>,
    /// A concept saved by `elite-ort encode` (skips CLIP). One for all prompts, or one per
    /// prompt.
    #[arg(long)]
    concept: Vec<PathBuf>,
    /// Output PNG file, or a directory (see the README for the names of several images).
    #[arg(long)]
    out: PathBuf,
    /// Overwrite existing output files.
    #[arg(long)]
    force: bool,
    /// Placeholder word (default: the bundle's, "S").
    #[arg(long)]
    placeholder: Option<String>,
    /// Sampler: lms (the bundle's default, what the official code uses), dpmpp-2m,
    /// dpmpp-2m-karras, euler, euler-a, ddim, unipc (see the README's Schedulers section).
    #[arg(long, value_parser = parse_scheduler)]
    scheduler: Option<SchedulerKind>,
    /// Denoising steps (default: the bundle's 100 for LMS, else the scheduler's default: 20
    /// for dpmpp-2m, dpmpp-2m-karras and unipc, 50 for euler, euler-a and ddim).
    #[arg(long)]
    steps: Option<usize>,
    /// Classifier-free guidance scale (default 5).
    #[arg(long, allow_negative_numbers = true)]
    guidance: Option<f32>,
    /// λ, weight of the local (detail) branch: 0.8 for generation prompts, 0.6 for editing.
    #[arg(long = "lambda", allow_negative_numbers = true)]
    lambda: Option<f32>,
    /// Image height in pixels, a multiple of 64 (default: the bundle's, 512).
    #[arg(long)]
    height: Option<usize>,
    /// Image width in pixels, a multiple of 64 (default: the bundle's, 512).
    #[arg(long)]
    width: Option<usize>,
    /// Seed of torch-compatible noise: the same seed gives the official scripts' image. Every
    /// prompt uses it.
    #[arg(long, default_value_t = 42)]
    seed: u64,
    /// Images per prompt.
    #[arg(long, short = 'n', default_value_t = 1)]
    num_images: usize,
    /// Unscaled initial noise [n, 4, h, w] as .npy (replaces --seed noise; every prompt uses it).
    #[arg(long)]
    init_latents: Option<PathBuf>,
    /// Cut prompts over 77 tokens instead of refusing them.
    #[arg(long)]
    truncate: bool,
    /// Also write attention maps into this (existing) directory: per image, one PNG per prompt
    /// token (`<image>-<index>-<token>.png`), one of ELITE's placeholder gate
    /// (`<image>-placeholder.png`) and a contact sheet (`<image>-sheet.png`). Needs a bundle
    /// exported with attention maps.
    #[arg(long)]
    attention_maps: Option<PathBuf>,
    /// Denoising steps whose maps are averaged: `a..b` (1-based, both included), `a..` or
    /// `..b`. Default: every step.
    #[arg(long, requires = "attention_maps")]
    attention_steps: Option<StepWindow>,
}

#[derive(Args)]
struct EncodeArgs {
    #[command(flatten)]
    engine: EngineArgs,
    /// Concept image.
    #[arg(long)]
    image: PathBuf,
    /// Object mask of the same size (white = object); default: the whole image.
    #[arg(long)]
    mask: Option<PathBuf>,
    /// Output .safetensors file.
    #[arg(long)]
    out: PathBuf,
    /// Overwrite an existing output file.
    #[arg(long)]
    force: bool,
}

#[derive(Args)]
struct ServeArgs {
    #[command(flatten)]
    engine: EngineArgs,
    /// Address to listen on. The default is loopback only: expose the server on purpose
    /// (e.g. `0.0.0.0:8080`), preferably with --auth-token-file.
    #[arg(long, default_value = "127.0.0.1:8080")]
    listen: std::net::SocketAddr,
    /// Most jobs admitted at once (queued or running); further requests get 429.
    #[arg(long, default_value_t = 64)]
    queue: usize,
    /// Concept store (content-addressed safetensors files). Default: `concepts/` in the cache
    /// directory.
    #[arg(long)]
    concept_dir: Option<PathBuf>,
    /// File holding a bearer token that every route except /v2/health/* requires.
    #[arg(long)]
    auth_token_file: Option<PathBuf>,
    /// Per-request deadline in seconds: after it the request gets 504 and its job is cancelled.
    #[arg(long, default_value_t = 600.0)]
    request_timeout: f64,
    /// Seconds in-flight requests may take to finish after SIGTERM/SIGINT.
    #[arg(long, default_value_t = 60.0)]
    drain_timeout: f64,
    /// Largest request body in bytes (checked before it is read).
    #[arg(long, default_value_t = 32 << 20)]
    max_body_bytes: usize,
    /// Log format on stderr.
    #[arg(long, value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Args)]
struct InfoArgs {
    /// Model bundle directory.
    #[arg(long)]
    bundle: PathBuf,
    /// ONNX Runtime shared library (else ORT_DYLIB_PATH, else the provisioned copy).
    #[arg(long)]
    ort_lib: Option<PathBuf>,
    /// Skip the sha256 check of the bundle files.
    #[arg(long)]
    no_verify: bool,
}

fn parse_scheduler(name: &str) -> Result<SchedulerKind, String> {
    name.parse::<SchedulerKind>().map_err(|e| e.to_string())
}

/// The CLI's name for a request field, for error messages.
fn flag_of(field: &str) -> String {
    match field {
        "num_images" => "--num-images".into(),
        "init_latents" => "--init-latents".into(),
        "max_batch" => "--max-batch".into(),
        "image" => "--image".into(),
        "attention_maps" => "--attention-maps".into(),
        other => format!("--{}", other.replace('_', "-")),
    }
}

/// Set by SIGINT/SIGTERM: the run stops at the next step boundary and writes nothing.
static INTERRUPTED: std::sync::LazyLock<Arc<AtomicBool>> =
    std::sync::LazyLock::new(|| Arc::new(AtomicBool::new(false)));

fn interrupted() -> bool {
    INTERRUPTED.load(Ordering::Relaxed)
}

/// First SIGINT/SIGTERM: stop cleanly (cancel the jobs, remove temporaries, exit 130). A second
/// one exits at once (what is left is only `.tmp` files, which the next run removes).
fn install_signal_handlers() {
    for signal in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        let _ = signal_hook::flag::register_conditional_shutdown(signal, 130, INTERRUPTED.clone());
        let _ = signal_hook::flag::register(signal, INTERRUPTED.clone());
    }
}

fn engine_config(e: &EngineArgs, memory: MemoryPolicy) -> EngineConfig {
    let cache = if e.no_cache {
        None
    } else {
        e.cache_dir.clone().or_else(default_cache_dir)
    };
    EngineConfig {
        ort_lib: e.ort_lib.clone(),
        execution: ExecutionConfig {
            device: match e.device {
                DeviceArg::Cpu => Device::Cpu,
                DeviceArg::Cuda => Device::Cuda,
                DeviceArg::Tensorrt => Device::TensorRt,
            },
            device_id: e.device_id.unwrap_or(0),
            threads: e.threads,
            trt_fp16: e.trt_fp16,
            allow_fallback: e.allow_fallback,
            precision: match e.precision {
                PrecisionArg::Fp32 => Precision::Fp32,
                PrecisionArg::Bf16 => Precision::Bf16,
            },
            openvino_lib: e.openvino_lib.clone(),
        },
        verify_checksums: !e.no_verify,
        trt_cache_dir: e.trt_cache.clone(),
        cache_dir: cache,
        cfg: match e.cfg {
            CfgArg::Batched => CfgMode::Batched,
            CfgArg::Split => CfgMode::Split,
        },
        max_batch: e.max_batch,
        call_sizing: match e.call_sizing {
            CallSizingArg::Adaptive => CallSizing::Adaptive,
            CallSizingArg::Fixed => CallSizing::Fixed,
        },
        memory,
        image_limits: e
            .max_image_pixels
            .map_or_else(ImageLimits::default, |max_pixels| ImageLimits {
                max_pixels,
            }),
        ..EngineConfig::default()
    }
}

fn open(e: &EngineArgs) -> Result<Engine, Error> {
    let config = engine_config(e, MemoryPolicy::LowPeak);
    if e.device == DeviceArg::Cpu && e.device_id.is_some() {
        return Err(Error::Runtime(
            elite_ort::runtime::RuntimeError::InvalidConfig(
                "--device-id selects a GPU; it cannot be used with --device cpu".into(),
            ),
        ));
    }
    if let Some(warning) = config.execution.validate()? {
        if !e.quiet {
            eprintln!("warning: --threads: {warning}");
        }
    }
    let engine = Engine::open(&e.bundle, &config)?;
    if engine.bundle().random_weights() && !e.quiet {
        eprintln!(
            "note: bundle `{}` has random weights (a test model): its images are noise-like by design",
            escape(engine.bundle().name())
        );
    }
    Ok(engine)
}

/// Timings as `--timings` prints them: engine stages, then the jobs' stages (summed over jobs),
/// the total, and each denoising step of the first job.
fn report_timings(
    engine: &Engine,
    jobs: &[(JobId, JobTimings)],
    format: Option<TimingsFormat>,
    total: Instant,
) {
    let Some(format) = format else { return };
    let mut stages: Vec<(String, f64)> = engine
        .timings()
        .into_iter()
        .map(|(s, d)| (s, d.as_secs_f64()))
        .collect();
    for stage in [Stage::Text, Stage::Denoise, Stage::Decode] {
        let secs: f64 = jobs.iter().map(|(_, t)| t.get(stage).as_secs_f64()).sum();
        if !jobs.is_empty() {
            stages.push((stage.name().to_string(), secs));
        }
    }
    stages.push(("total".into(), total.elapsed().as_secs_f64()));
    let steps: Vec<f64> = jobs
        .first()
        .map(|(_, t)| t.steps.iter().map(|d| d.as_secs_f64()).collect())
        .unwrap_or_default();
    let stats = engine.stats();
    match format {
        TimingsFormat::Text => {
            for (stage, secs) in stages {
                eprintln!("{stage:>24}: {:>9.3} ms", secs * 1e3);
            }
            if !steps.is_empty() {
                let mut sorted = steps.clone();
                sorted.sort_by(f64::total_cmp);
                let median = sorted[sorted.len() / 2];
                eprintln!("{:>24}: {:>9.3} ms", "denoise step (median)", median * 1e3);
            }
            if stats.unet_calls > 0 {
                eprintln!(
                    "{:>24}: {} calls, {} rows ({:?} calls by batch size)",
                    "unet", stats.unet_calls, stats.unet_rows, stats.batch_sizes
                );
            }
        }
        TimingsFormat::Json => {
            let mut map: serde_json::Map<String, serde_json::Value> = stages
                .into_iter()
                .map(|(s, v)| (s, serde_json::json!(v)))
                .collect();
            if !steps.is_empty() {
                map.insert("denoise step".into(), serde_json::json!(steps));
            }
            map.insert(
                "unet calls".into(),
                serde_json::json!({
                    "calls": stats.unet_calls,
                    "rows": stats.unet_rows,
                    "seconds": stats.unet_time.as_secs_f64(),
                    "by batch size": stats.batch_sizes,
                }),
            );
            if jobs.len() > 1 {
                let per_job: Vec<serde_json::Value> = jobs
                    .iter()
                    .map(|(id, t)| {
                        let mut m = serde_json::Map::new();
                        m.insert("job".into(), serde_json::json!(id.0));
                        for stage in Stage::ALL {
                            m.insert(
                                stage.name().into(),
                                serde_json::json!(t.get(stage).as_secs_f64()),
                            );
                        }
                        m.insert("unet time".into(), serde_json::json!(t.batch.as_secs_f64()));
                        m.insert("unet calls".into(), serde_json::json!(t.unet_calls));
                        serde_json::Value::Object(m)
                    })
                    .collect();
                map.insert("jobs".into(), serde_json::json!(per_job));
            }
            println!("{}", serde_json::Value::Object(map));
        }
    }
}

fn progress_bar(quiet: bool, steps: usize) -> ProgressBar {
    if quiet || !std::io::stderr().is_terminal() {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::with_draw_target(Some(steps as u64), ProgressDrawTarget::stderr());
    bar.set_style(
        ProgressStyle::with_template(
            "denoising {bar:40} {pos}/{len} [{elapsed_precise} < {eta_precise}]",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    bar
}

fn read_init_latents(path: &Path, expected: [usize; 4]) -> Result<ndarray::Array4<f32>, Error> {
    Ok(elite_ort::latents_file::read_init_latents(path, expected)?)
}

/// Where a run's concepts come from: images (with optional masks) or saved concept files.
enum ConceptInput<'a> {
    Image(&'a Path, Option<&'a Path>),
    Saved(&'a Path),
}

/// Pairs prompts with concepts: one concept for all prompts, or one per prompt.
fn concept_inputs(args: &RunArgs) -> Result<Vec<ConceptInput<'_>>, Error> {
    let usage = |message: String| Error::InvalidRequest {
        field: "concept",
        message,
    };
    let inputs: Vec<ConceptInput<'_>> = if args.concept.is_empty() {
        if !args.mask.is_empty() && args.mask.len() != args.image.len() {
            return Err(usage(format!(
                "{} --mask for {} --image: give one mask per image, in order, or none",
                args.mask.len(),
                args.image.len()
            )));
        }
        args.image
            .iter()
            .enumerate()
            .map(|(i, image)| ConceptInput::Image(image, args.mask.get(i).map(PathBuf::as_path)))
            .collect()
    } else {
        args.concept
            .iter()
            .map(|c| ConceptInput::Saved(c))
            .collect()
    };
    let (prompts, concepts) = (args.prompt.len(), inputs.len());
    if concepts != 1 && concepts != prompts {
        return Err(usage(format!(
            "{prompts} prompts and {concepts} concepts: give one concept (--image or --concept) \
             for all prompts, or one per prompt"
        )));
    }
    Ok(inputs)
}

fn run(args: RunArgs) -> Result<(), Error> {
    let total = Instant::now();
    let inputs = concept_inputs(&args)?;
    let mut engine = open(&args.engine)?;
    let d = engine.bundle().defaults().clone();
    // Everything that can be checked without running a model is checked first.
    let mut requests = args
        .prompt
        .iter()
        .map(|prompt| {
            let mut r = GenerateRequest::new(prompt.clone(), engine.bundle());
            r.placeholder = args.placeholder.clone().unwrap_or(d.placeholder.clone());
            r.scheduler = args.scheduler.unwrap_or(r.scheduler);
            r.steps = args
                .steps
                .unwrap_or_else(|| default_steps(engine.bundle(), r.scheduler));
            r.guidance = args.guidance.unwrap_or(d.guidance_scale as f32);
            r.lambda = args.lambda.unwrap_or(d.lambda_generate as f32);
            r.height = args.height.unwrap_or(d.height);
            r.width = args.width.unwrap_or(d.width);
            r.seed = args.seed;
            r.num_images = args.num_images;
            r.truncate = args.truncate;
            r.attention_maps = args
                .attention_maps
                .as_ref()
                .map(|_| args.attention_steps.unwrap_or_default());
            engine.validate(r)
        })
        .collect::<Result<Vec<_>, _>>()?;
    engine.check_memory(&requests.iter().collect::<Vec<_>>())?;
    // The initial latents are read after the sizes they must match were checked.
    if let (Some(path), Some(first)) = (&args.init_latents, requests.first()) {
        let noise = read_init_latents(path, first.latent_shape())?;
        for request in &mut requests {
            request.set_init_noise(noise.clone())?;
        }
    }
    let counts: Vec<JobOutputs> = requests
        .iter()
        .map(|r| JobOutputs {
            seed: r.seed(),
            count: r.num_images(),
        })
        .collect();
    let outputs = plan_outputs(&args.out, &counts, args.force)?;
    let tokens: Vec<_> = requests
        .iter()
        .map(|r| prompt_tokens(engine.tokenizer(), r.input_ids()))
        .collect();
    let map_paths = match &args.attention_maps {
        Some(dir) => {
            let paths = plan_map_outputs(dir, &outputs, &tokens, args.force)?;
            engine.check_attention_maps()?;
            paths
        }
        None => Vec::new(),
    };
    if let Some(dir) = outputs
        .first()
        .and_then(|o| o.first())
        .and_then(|p| p.parent())
    {
        remove_stale_temporaries(if dir.as_os_str().is_empty() {
            Path::new(".")
        } else {
            dir
        });
    }
    let concepts = load_concepts(&mut engine, &inputs)?;
    // Sessions first, so that the stages time the graphs, not their loading, and a provider
    // that cannot load fails before any work.
    engine.preload(&[Phase::Text, Phase::Denoise, Phase::Decode])?;
    let total_steps: usize = requests.iter().map(|r| r.steps()).sum();
    let bar = progress_bar(args.engine.quiet, total_steps);
    let mut ids = Vec::with_capacity(requests.len());
    for (i, request) in requests.into_iter().enumerate() {
        let concept = concepts[if concepts.len() == 1 { 0 } else { i }].clone();
        let job = engine.new_job(request, concept)?;
        let bar = bar.clone();
        ids.push(
            engine.submit(job.with_events(Box::new(move |event: JobEvent| {
                if let JobEvent::Step { .. } = event {
                    bar.inc(1);
                }
            }))),
        );
    }
    let mut staged = OutputSet::new(args.force);
    let mut finished: Vec<FinishedJob> = Vec::new();
    let mut first_error: Option<Error> = None;
    while engine.active() > 0 {
        if interrupted() {
            engine.cancel_all();
        }
        engine.tick();
        for job in engine.take_finished() {
            match job.outcome {
                Outcome::Done(ref generation) => {
                    let index = ids.iter().position(|&id| id == job.id).unwrap_or(0);
                    let paths = &outputs[index];
                    for (i, (img, path)) in generation.images.iter().zip(paths).enumerate() {
                        staged.stage_png(path, img)?;
                        if let (Some(maps), Some(to)) = (
                            &generation.attention_maps,
                            map_paths.get(index).and_then(|p| p.get(i)),
                        ) {
                            let placeholder = args.placeholder.as_deref().unwrap_or(&d.placeholder);
                            stage_maps(&mut staged, to, img, maps, i, &tokens[index], placeholder)?;
                        }
                    }
                }
                Outcome::Failed(_) | Outcome::Cancelled => engine.cancel_all(),
            }
            finished.push(job);
        }
    }
    bar.finish_and_clear();
    finished.sort_by_key(|j| j.id);
    for job in &mut finished {
        if let Outcome::Failed(e) = std::mem::replace(&mut job.outcome, Outcome::Cancelled) {
            first_error.get_or_insert(e);
        }
    }
    if let Some(e) = first_error {
        return Err(e);
    }
    if interrupted() {
        return Err(Error::Cancelled);
    }
    for path in staged.commit()? {
        if !args.engine.quiet {
            eprintln!("wrote {}", path.display());
        }
    }
    let timings: Vec<(JobId, JobTimings)> =
        finished.into_iter().map(|j| (j.id, j.timings)).collect();
    report_timings(&engine, &timings, args.engine.timings, total);
    Ok(())
}

/// Encodes (or loads) the run's concepts; the concept graphs are released afterwards.
fn load_concepts(
    engine: &mut Engine,
    inputs: &[ConceptInput<'_>],
) -> Result<Vec<Arc<Concept>>, Error> {
    if inputs.iter().any(|i| matches!(i, ConceptInput::Image(..))) {
        engine.preload(&[Phase::Concept])?;
    }
    let concepts = inputs
        .iter()
        .map(|input| match input {
            ConceptInput::Saved(path) => {
                let c = Concept::load(path)?;
                c.check_compatible(engine.bundle(), path)?;
                Ok(Arc::new(c))
            }
            ConceptInput::Image(image, mask) => Ok(Arc::new(engine.encode_concept(image, *mask)?)),
        })
        .collect::<Result<Vec<_>, Error>>()?;
    engine.enter(Phase::Text);
    Ok(concepts)
}

fn encode(args: EncodeArgs) -> Result<(), Error> {
    let total = Instant::now();
    let is_safetensors = args
        .out
        .extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("safetensors"));
    if !is_safetensors {
        return Err(Error::InvalidRequest {
            field: "out",
            message: format!(
                "{}: a concept is written as safetensors; name it `.safetensors`",
                args.out.display()
            ),
        });
    }
    elite_ort::output::check_destination(&args.out, args.force)?;
    let mut engine = open(&args.engine)?;
    let concept = engine.encode_concept(&args.image, args.mask.as_deref())?;
    if interrupted() {
        return Err(Error::Cancelled);
    }
    concept.save(&args.out, args.force)?;
    if !args.engine.quiet {
        eprintln!("wrote {}", args.out.display());
    }
    report_timings(&engine, &[], args.engine.timings, total);
    Ok(())
}

fn info(args: InfoArgs) -> Result<(), Error> {
    let bundle = elite_ort::bundle::Bundle::open(&args.bundle, !args.no_verify)?;
    let m = bundle.manifest();
    println!(
        "bundle      {} ({})",
        escape(bundle.name()),
        bundle.dir().display()
    );
    println!("format      {}", m.format_version);
    println!(
        "precision   {}",
        match bundle.precision() {
            elite_ort::bundle::Precision::Fp32 => "fp32",
            elite_ort::bundle::Precision::Fp16 => "fp16",
        }
    );
    println!("random      {}", bundle.random_weights());
    let d = bundle.dims();
    println!(
        "dims        text {} · image {} · CLIP {}px, {}x{} patches · latent ×{} · sizes multiple of {}",
        d.text_hidden, d.image_hidden, d.image_size, d.patch_grid, d.patch_grid, d.vae_scale_factor, d.size_multiple
    );
    let df = bundle.defaults();
    println!(
        "defaults    {} steps · guidance {} · λ {} (edit {}) · {}x{} · placeholder {}",
        df.steps,
        df.guidance_scale,
        df.lambda_generate,
        df.lambda_edit,
        df.width,
        df.height,
        escape(&df.placeholder)
    );
    for (name, entry) in &m.files {
        println!(
            "file        {:<22} {:>12} bytes  sha256 {}",
            escape(name).to_string(),
            entry.bytes,
            &entry.sha256.get(..16).unwrap_or(&entry.sha256)
        );
    }
    for kind in SchedulerKind::ALL {
        println!(
            "scheduler   {:<16} {:<30} {} steps by default{}",
            kind.name(),
            kind.diffusers_class(),
            default_steps(&bundle, kind),
            if kind == bundle.scheduler().kind {
                " (the bundle's)"
            } else {
                ""
            }
        );
    }
    let env = elite_ort::runtime::init_environment(args.ort_lib.as_deref())?;
    println!(
        "onnxruntime {} ({})",
        env.build_info().lines().next().unwrap_or(""),
        env.library().path.display()
    );
    println!("providers   {}", env.available_providers()?.join(", "));
    Ok(())
}

fn seconds(name: &'static str, value: f64) -> Result<std::time::Duration, Error> {
    if value.is_finite() && value > 0.0 && value <= 86_400.0 {
        Ok(std::time::Duration::from_secs_f64(value))
    } else {
        Err(Error::InvalidRequest {
            field: name,
            message: format!("must be a number of seconds in (0, 86400], got {value}"),
        })
    }
}

fn serve(args: ServeArgs) -> Result<(), Error> {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let logs = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match args.log_format {
        LogFormat::Text => logs.init(),
        LogFormat::Json => logs.json().init(),
    }
    let e = &args.engine;
    if e.device == DeviceArg::Cpu && e.device_id.is_some() {
        return Err(Error::Runtime(
            elite_ort::runtime::RuntimeError::InvalidConfig(
                "--device-id selects a GPU; it cannot be used with --device cpu".into(),
            ),
        ));
    }
    let engine = engine_config(e, MemoryPolicy::Resident);
    if let Some(warning) = engine.execution.validate()? {
        tracing::warn!("--threads: {warning}");
    }
    let concept_dir = args
        .concept_dir
        .clone()
        .or_else(|| engine.cache_dir.as_ref().map(|c| c.join("concepts")))
        .ok_or_else(|| Error::InvalidRequest {
            field: "concept_dir",
            message: "no cache directory to put the concept store in; pass --concept-dir".into(),
        })?;
    let config = elite_ort::server::ServerConfig {
        bundle: e.bundle.clone(),
        engine,
        listen: args.listen,
        queue: args.queue,
        concept_dir,
        auth_token_file: args.auth_token_file.clone(),
        request_timeout: seconds("request_timeout", args.request_timeout)?,
        drain_timeout: seconds("drain_timeout", args.drain_timeout)?,
        max_body_bytes: args.max_body_bytes,
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| Error::Internal(format!("cannot start the async runtime: {e}")))?;
    runtime
        .block_on(elite_ort::server::serve(config))
        .map_err(|e| Error::Internal(e.to_string()))
}

fn report(e: &Error) {
    match e {
        Error::InvalidRequest { field, message } => {
            eprintln!("error: invalid {}: {message}", flag_of(field))
        }
        Error::Cancelled => eprintln!("error: interrupted; no output was written"),
        _ => eprintln!("error: {e}"),
    }
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        eprintln!("  caused by: {s}");
        source = s.source();
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if !matches!(cli.command, Command::Serve(_)) {
        install_signal_handlers();
        // `elite-ort info | head`: end quietly when stdout's reader goes away, as Unix tools do
        // (Rust ignores SIGPIPE, and println! would panic). Not for the server, whose sockets
        // must see EPIPE as an error instead.
        // SAFETY: restoring a signal's default disposition, before any other thread exists.
        unsafe {
            libc::signal(libc::SIGPIPE, libc::SIG_DFL);
        }
    }
    let result = match cli.command {
        Command::Run(a) => run(a),
        Command::Encode(a) => encode(a),
        Command::Info(a) => info(a),
        Command::Serve(a) => serve(a),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            report(&e);
            if matches!(e, Error::Cancelled) {
                ExitCode::from(130)
            } else {
                ExitCode::FAILURE
            }
        }
    }
}

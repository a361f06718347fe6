//! `elite-ort`: the command-line front end. It parses flags into library options, runs, and
//! reports; all behaviour lives in the library.

use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Instant;

use clap::{Args, Parser, Subcommand, ValueEnum};
use elite_ort::cache::default_cache_dir;
use elite_ort::concept::Concept;
use elite_ort::error::Error;
use elite_ort::graphs::Graph;
use elite_ort::output::{plan_outputs, write_png};
use elite_ort::pipeline::{CfgMode, Elite, GenerateOptions, LoadOptions, Progress};
use elite_ort::runtime::{Device, ExecutionConfig};
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
    #[arg(long, default_value_t = 0)]
    device_id: u32,
    /// Intra-op threads (default: ONNX Runtime's choice).
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
    /// Guidance: one UNet call at batch 2n (`batched`) or two at batch n (`split`, as the
    /// official scripts do); both give the same images. `split` holds half the UNet
    /// activations at about the same CPU speed: use it when memory is tight.
    #[arg(long, value_enum, default_value_t = CfgArg::Batched)]
    cfg: CfgArg,
    /// No progress bar or notices on stderr.
    #[arg(long, short)]
    quiet: bool,
    /// Print per-stage timings (text on stderr, or JSON on stdout).
    #[arg(long, value_enum, num_args = 0..=1, default_missing_value = "text")]
    timings: Option<TimingsFormat>,
}

#[derive(Clone, Copy, ValueEnum)]
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
enum TimingsFormat {
    Text,
    Json,
}

#[derive(Args)]
struct RunArgs {
    #[command(flatten)]
    engine: EngineArgs,
    /// Prompt containing the placeholder word, e.g. "a photo of S on the beach".
    #[arg(long)]
    prompt: String,
    /// Concept image (any format the image crate reads).
    #[arg(long, required_unless_present = "concept", conflicts_with = "concept")]
    image: Option<PathBuf>,
    /// Object mask of the same size (white = object); default: the whole image.
    #[arg(long, requires = "image")]
    mask: Option<PathBuf>,
    /// A concept saved by `elite-ort encode` (skips CLIP).
    #[arg(long)]
    concept: Option<PathBuf>,
    /// Output PNG file, or a directory.
    #[arg(long)]
    out: PathBuf,
    /// Overwrite existing output files.
    #[arg(long)]
    force: bool,
    /// Placeholder word (default: the bundle's, "S").
    #[arg(long)]
    placeholder: Option<String>,
    /// Denoising steps (default: the bundle's, 100).
    #[arg(long)]
    steps: Option<usize>,
    /// Classifier-free guidance scale (default 5).
    #[arg(long, allow_negative_numbers = true)]
    guidance: Option<f32>,
    /// λ, weight of the local (detail) branch: 0.8 for generation prompts, 0.6 for editing.
    #[arg(long = "lambda", allow_negative_numbers = true)]
    lambda: Option<f32>,
    #[arg(long)]
    height: Option<usize>,
    #[arg(long)]
    width: Option<usize>,
    /// Seed of torch-compatible noise: the same seed gives the official scripts' image.
    #[arg(long, default_value_t = 42)]
    seed: u64,
    /// Images per prompt.
    #[arg(long, short = 'n', default_value_t = 1)]
    num_images: usize,
    /// Unscaled initial noise [n, 4, h, w] as .npy (replaces --seed noise).
    #[arg(long)]
    init_latents: Option<PathBuf>,
    /// Cut prompts over 77 tokens instead of refusing them.
    #[arg(long)]
    truncate: bool,
}

#[derive(Args)]
struct EncodeArgs {
    #[command(flatten)]
    engine: EngineArgs,
    #[arg(long)]
    image: PathBuf,
    #[arg(long)]
    mask: Option<PathBuf>,
    /// Output .safetensors file.
    #[arg(long)]
    out: PathBuf,
    #[arg(long)]
    force: bool,
}

#[derive(Args)]
struct InfoArgs {
    #[arg(long)]
    bundle: PathBuf,
    #[arg(long)]
    ort_lib: Option<PathBuf>,
    #[arg(long)]
    no_verify: bool,
}

fn load_options(e: &EngineArgs) -> LoadOptions {
    let cache = if e.no_cache {
        None
    } else {
        e.cache_dir.clone().or_else(default_cache_dir)
    };
    LoadOptions {
        ort_lib: e.ort_lib.clone(),
        execution: ExecutionConfig {
            device: match e.device {
                DeviceArg::Cpu => Device::Cpu,
                DeviceArg::Cuda => Device::Cuda,
                DeviceArg::Tensorrt => Device::TensorRt,
            },
            device_id: e.device_id,
            threads: e.threads,
            trt_fp16: e.trt_fp16,
            // Engines are cached by default, beside the CPU graph cache.
            trt_cache_dir: e
                .trt_cache
                .clone()
                .or_else(|| cache.as_ref().map(|c| c.join("tensorrt"))),
            allow_fallback: e.allow_fallback,
            graph_cache: cache.as_ref().map(|c| c.join("graphs")),
            no_prepacking: false,
            memory_pattern: false,
            trt_profile: None,
        },
        verify_checksums: !e.no_verify,
        cache_dir: cache,
        cfg: match e.cfg {
            CfgArg::Batched => CfgMode::Batched,
            CfgArg::Split => CfgMode::Split,
        },
    }
}

fn open(e: &EngineArgs) -> Result<Elite, Error> {
    let elite = Elite::open(&e.bundle, &load_options(e))?;
    if elite.bundle().random_weights() && !e.quiet {
        eprintln!(
            "note: bundle `{}` has random weights (a test model): its images are noise-like by design",
            elite.bundle().name()
        );
    }
    Ok(elite)
}

fn report_timings(elite: &Elite, format: Option<TimingsFormat>, total: Instant) {
    let Some(format) = format else { return };
    let mut stages: Vec<(String, f64)> = elite
        .timings
        .stages
        .iter()
        .map(|(s, d)| (s.clone(), d.as_secs_f64()))
        .collect();
    stages.push(("total".into(), total.elapsed().as_secs_f64()));
    let steps: Vec<f64> = elite
        .timings
        .denoise_steps
        .iter()
        .map(|d| d.as_secs_f64())
        .collect();
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
        }
        TimingsFormat::Json => {
            let mut map: serde_json::Map<String, serde_json::Value> = stages
                .into_iter()
                .map(|(s, v)| (s, serde_json::json!(v)))
                .collect();
            if !steps.is_empty() {
                map.insert("denoise step".into(), serde_json::json!(steps));
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

fn run(args: RunArgs) -> Result<(), Error> {
    let total = Instant::now();
    let mut elite = open(&args.engine)?;
    let mut options = GenerateOptions::new(args.prompt.clone(), elite.bundle());
    let d = elite.bundle().defaults().clone();
    options.placeholder = args.placeholder.clone().unwrap_or(d.placeholder);
    options.steps = args.steps.unwrap_or(d.steps);
    options.guidance = args.guidance.unwrap_or(d.guidance_scale as f32);
    options.lambda = args.lambda.unwrap_or(d.lambda_generate as f32);
    options.height = args.height.unwrap_or(d.height);
    options.width = args.width.unwrap_or(d.width);
    options.seed = args.seed;
    options.num_images = args.num_images;
    options.truncate = args.truncate;
    // Everything that can be checked without running a model is checked first; the initial
    // latents after the sizes they must match.
    options.validate(elite.bundle())?;
    if let Some(path) = &args.init_latents {
        let shape =
            elite
                .bundle()
                .dims()
                .latent_shape(options.num_images, options.height, options.width);
        options.init_noise = Some(read_init_latents(path, shape)?);
    }
    elite.tokenize(&options.prompt, &options.placeholder, options.truncate)?;
    let outputs = plan_outputs(&args.out, options.num_images, options.seed, args.force)?;

    let concept = match (&args.concept, &args.image) {
        (Some(path), _) => {
            let c = Concept::load(path)?;
            c.check_compatible(elite.bundle(), path)?;
            c
        }
        (None, Some(image)) => {
            // Sessions first, so that `encode concept` times the graphs, not their loading.
            elite.preload(&[Graph::ImageEncoder, Graph::GlobalMapper, Graph::LocalMapper])?;
            let c = elite.encode_concept(image, args.mask.as_deref())?;
            // The concept graphs are not needed for denoising: give their memory back.
            for g in [Graph::ImageEncoder, Graph::GlobalMapper, Graph::LocalMapper] {
                elite.release(g);
            }
            c
        }
        (None, None) => unreachable!("clap requires --image or --concept"),
    };
    elite.preload(&[Graph::TextEncoder, Graph::Unet, Graph::VaeDecoder])?;
    let bar = progress_bar(args.engine.quiet, options.steps);
    let mut on_progress = |p: Progress| bar.set_position(p.step as u64);
    let (latents, _trace) = elite.generate_latents(&concept, &options, &mut on_progress)?;
    bar.finish_and_clear();
    // The UNet's weights and the activations its arena keeps would otherwise stay resident
    // under the VAE decoder's (full-size bundle at 512²: peak RSS 7.2 GB → 6.0 GB).
    for g in [Graph::TextEncoder, Graph::Unet] {
        elite.release(g);
    }
    let images = elite.decode(&latents)?;
    for (img, path) in images.iter().zip(&outputs) {
        write_png(path, img, args.force)?;
        if !args.engine.quiet {
            eprintln!("wrote {}", path.display());
        }
    }
    report_timings(&elite, args.engine.timings, total);
    Ok(())
}

fn encode(args: EncodeArgs) -> Result<(), Error> {
    let total = Instant::now();
    elite_ort::output::check_destination(&args.out, args.force)?;
    let mut elite = open(&args.engine)?;
    let concept = elite.encode_concept(&args.image, args.mask.as_deref())?;
    concept.save(&args.out, args.force)?;
    if !args.engine.quiet {
        eprintln!("wrote {}", args.out.display());
    }
    report_timings(&elite, args.engine.timings, total);
    Ok(())
}

fn info(args: InfoArgs) -> Result<(), Error> {
    let bundle = elite_ort::bundle::Bundle::open(&args.bundle, !args.no_verify)?;
    let m = bundle.manifest();
    println!("bundle      {} ({})", bundle.name(), bundle.dir().display());
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
        df.placeholder
    );
    for (name, entry) in &m.files {
        println!(
            "file        {name:<22} {:>12} bytes  sha256 {}",
            entry.bytes,
            &entry.sha256[..16]
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

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Run(a) => run(a),
        Command::Encode(a) => encode(a),
        Command::Info(a) => info(a),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            let mut source = std::error::Error::source(&e);
            while let Some(s) = source {
                eprintln!("  caused by: {s}");
                source = s.source();
            }
            ExitCode::FAILURE
        }
    }
}

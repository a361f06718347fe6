//! The engine: one bundle's tokenizer and sessions, loaded once, and the loop that moves many
//! generation jobs through their states with step-level batching.
//!
//! ```text
//!   submit ─▶ Text ──(one text-encoder call for all new jobs)──▶ Denoising ─┐
//!                                                                          │ each tick: one UNet
//!                       rows of any jobs of one latent size ◀──────────────┘ call (batch.rs)
//!             Denoising ──(last step)──▶ Decoding ──(VAE, in chunks)──▶ Done / Failed / Cancelled
//! ```
//!
//! [`Engine::tick`] does one unit of work: encode the prompts of newly submitted jobs, or run
//! one UNet call over rows chosen by the [`Planner`], or decode (a chunk of) one job. Jobs join
//! at any step boundary and leave when they finish, fail or are cancelled; a job's result does
//! not depend on which other jobs shared its calls (tested in `tests/engine.rs`). The CLI
//! submits its jobs and ticks until idle; a server's model thread ticks while it admits new
//! jobs between ticks.
//!
//! Failure isolation: a job whose rows come out non-finite fails alone. When a UNet call that
//! held several jobs fails, each of them is retried in calls of its own, so only the job that
//! actually fails is failed.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use image::RgbImage;
use ndarray::{s, Array1, Array2, Array3, Array4, ArrayView1, Axis, Ix4};
use ort::session::IoBinding;

use crate::batch::{self, CallPlan, LatentSize, Part, Planner};
use crate::bundle::{Bundle, Checksums};
use crate::call_size::CallSizing;
use crate::concept::{Concept, ConceptSource};
use crate::error::{invalid, Error, Result};
use crate::files;
use crate::graphs::{self, check_output_shape, Graph, CLIP_LAYERS};
use crate::guidance::CfgMode;
use crate::image_decode::{self, DecodeError, ImageLimits, Role};
use crate::job::{CancelToken, FinishedJob, Job, JobEvents, JobId, JobState, TextEmbeddings};
use crate::memory::{self, MemoryEstimate, RunShape};
use crate::noise::TorchGenerator;
use crate::output::to_rgb8;
use crate::preprocess;
use crate::request::{GenerateRequest, RequestLimits, ValidRequest, Validator};
use crate::runtime::{init_environment, Device, ExecutionConfig};
use crate::scheduler::{Scheduler, SchedulerConfig};
use crate::sessions::{
    bad_output, input, ort_err, output_view, owned, MemoryPolicy, Phase, SessionConfig, SessionSet,
};
use crate::tokenizer::{ClipTokenizer, TokenIds};

/// UNet rows per call when `max_batch` is not given: on a CPU the GEMMs are large enough at
/// batch 2 that bigger batches gain little and cost memory; a GPU wants large batches.
pub const CPU_MAX_BATCH: usize = 8;
pub const GPU_MAX_BATCH: usize = 16;

/// How to open a bundle and run it.
#[derive(Debug, Clone, Default)]
pub struct EngineConfig {
    /// ONNX Runtime library (`--ort-lib`); else `ORT_DYLIB_PATH`, else the provisioned copy.
    pub ort_lib: Option<PathBuf>,
    pub execution: ExecutionConfig,
    /// Verify every file's sha256 against the manifest (on by default in the CLI).
    pub verify_checksums: bool,
    /// Local cache (see [`crate::cache`]): checksum stamps, optimised graphs, and TensorRT
    /// engines unless `trt_cache_dir` says otherwise. None: no cache.
    pub cache_dir: Option<PathBuf>,
    /// TensorRT engine and timing caches (default: `tensorrt/` in the cache directory).
    pub trt_cache_dir: Option<PathBuf>,
    /// How a job's guidance rows may share UNet calls (per job; this is the default).
    pub cfg: CfgMode,
    /// Most UNet rows per call (and the TensorRT profile's largest batch); None: 8 on the CPU,
    /// 16 on a GPU.
    pub max_batch: Option<usize>,
    /// How many of those rows a call takes ([`crate::call_size`]): adaptive by default.
    pub call_sizing: CallSizing,
    /// Most images per VAE decode call; None: 1 on the CPU (decoding is memory-bound there and
    /// no faster in batches), 4 on a GPU.
    pub decode_batch: Option<usize>,
    pub memory: MemoryPolicy,
    /// Decoder limits for concept images and masks (Pillow's decompression-bomb limit by
    /// default).
    pub image_limits: ImageLimits,
    /// Largest size and image count per request; None: [`RequestLimits::for_device`].
    pub limits: Option<RequestLimits>,
}

impl EngineConfig {
    fn max_batch(&self) -> usize {
        self.max_batch.unwrap_or(match self.execution.device {
            Device::Cpu => CPU_MAX_BATCH,
            Device::Cuda | Device::TensorRt => GPU_MAX_BATCH,
        })
    }

    fn limits(&self) -> RequestLimits {
        self.limits
            .unwrap_or_else(|| RequestLimits::for_device(self.execution.device))
    }

    fn decode_batch(&self) -> usize {
        self.decode_batch
            .unwrap_or(match self.execution.device {
                Device::Cpu => 1,
                Device::Cuda | Device::TensorRt => 4,
            })
            .clamp(1, self.max_batch())
    }
}

/// What one [`Engine::tick`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Work {
    /// No job has anything to do.
    Idle,
    /// Encoded the prompts of these jobs (one text-encoder call).
    Text { jobs: usize },
    /// One UNet call of `rows` rows from `jobs` jobs.
    Unet { rows: usize, jobs: usize },
    /// Decoded `images` images of one job.
    Decode { job: JobId, images: usize },
    /// Dropped cancelled jobs.
    Cancelled { jobs: usize },
}

/// Counters of the engine's UNet calls, for metrics and tests.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct EngineStats {
    pub unet_calls: u64,
    pub unet_rows: u64,
    /// Calls by batch size (rows).
    pub batch_sizes: BTreeMap<usize, u64>,
    /// Calls that held rows of more than one job.
    pub shared_calls: u64,
    /// Time spent in UNet calls.
    pub unet_time: Duration,
    pub jobs_done: u64,
    pub jobs_failed: u64,
    pub jobs_cancelled: u64,
}

/// The UNet inputs bound for a call composition, kept while the composition repeats (a job
/// alone has the same composition at every step: its constant inputs are bound once).
struct BoundCall {
    parts: Vec<Part>,
    binding: IoBinding,
    /// The attention-map outputs are bound (the previous call of this binding wanted them).
    maps_bound: bool,
}

/// Conditional embeddings of several prompts (`[77, C]` each) and the shared unconditional ones.
type PromptEmbeddings = (Vec<Array2<f32>>, Arc<Array2<f32>>);

/// A loaded bundle and the jobs in flight.
pub struct Engine {
    bundle: Bundle,
    tokenizer: ClipTokenizer,
    sessions: SessionSet,
    cfg: CfgMode,
    limits: RequestLimits,
    image_limits: ImageLimits,
    decode_batch: usize,
    planner: Planner,
    jobs: Vec<Job>,
    finished: Vec<FinishedJob>,
    next_id: u64,
    /// Text embeddings of the empty prompt: the same for every job.
    uncond: Option<Arc<Array2<f32>>>,
    bound: HashMap<LatentSize, BoundCall>,
    /// Whether the bundle's UNet has the attention-map outputs (known once its session was
    /// created).
    unet_maps: Option<bool>,
    stats: EngineStats,
    /// Engine-level stages (opening, concept encoding), summed.
    timings: BTreeMap<&'static str, Duration>,
}

impl Engine {
    /// Opens and checks a bundle; sessions are created on first use (or [`Engine::preload`]).
    pub fn open(dir: impl AsRef<Path>, config: &EngineConfig) -> Result<Engine> {
        let mut timings = BTreeMap::new();
        let checksums = match (&config.cache_dir, config.verify_checksums) {
            (_, false) => Checksums::Skip,
            (Some(cache), true) => Checksums::VerifyCached(cache.clone()),
            (None, true) => Checksums::Verify,
        };
        let start = Instant::now();
        let bundle = Bundle::open_checked(dir, &checksums)?;
        timings.insert("open bundle", start.elapsed());
        let start = Instant::now();
        let env = init_environment(config.ort_lib.as_deref())?;
        if config.execution.precision == crate::runtime::Precision::Bf16 {
            crate::openvino::ensure_available(env, config.execution.openvino_lib.as_deref())?;
        }
        timings.insert("load onnxruntime", start.elapsed());
        let start = Instant::now();
        let tokenizer = ClipTokenizer::for_bundle(&bundle)?;
        timings.insert("load tokenizer", start.elapsed());
        if let Some(cache) = &config.cache_dir {
            // A first start killed while it saved a graph leaves `<key>.tmp-<pid>` behind.
            files::remove_stale_temporaries(&cache.join("graphs"));
        }
        let max_batch = config.max_batch();
        if max_batch == 0 || max_batch > 1024 {
            return Err(invalid(
                "max_batch",
                format!("must be 1..=1024, got {max_batch}"),
            ));
        }
        let sessions = SessionSet::new(
            env,
            bundle.clone(),
            SessionConfig {
                execution: config.execution.clone(),
                graph_cache: config.cache_dir.as_ref().map(|c| c.join("graphs")),
                trt_cache: config
                    .trt_cache_dir
                    .clone()
                    .or_else(|| config.cache_dir.as_ref().map(|c| c.join("tensorrt"))),
                policy: config.memory,
                max_batch,
                max_latent: config.limits().max_side / bundle.dims().vae_scale_factor.max(1),
            },
        );
        Ok(Engine {
            bundle,
            tokenizer,
            sessions,
            cfg: config.cfg,
            limits: config.limits(),
            image_limits: config.image_limits,
            decode_batch: config.decode_batch(),
            planner: Planner::with_sizing(config.call_sizing, max_batch),
            jobs: Vec::new(),
            finished: Vec::new(),
            next_id: 0,
            uncond: None,
            bound: HashMap::new(),
            unet_maps: None,
            stats: EngineStats::default(),
            timings,
        })
    }

    pub fn bundle(&self) -> &Bundle {
        &self.bundle
    }

    pub fn tokenizer(&self) -> &ClipTokenizer {
        &self.tokenizer
    }

    /// The default guidance layout of new jobs.
    pub fn cfg_mode(&self) -> CfgMode {
        self.cfg
    }

    /// Most UNet rows per call.
    pub fn max_batch(&self) -> usize {
        self.planner.max_rows()
    }

    pub fn limits(&self) -> &RequestLimits {
        &self.limits
    }

    pub fn stats(&self) -> &EngineStats {
        &self.stats
    }

    /// Engine-level stage times (opening, preprocessing, concept encoding), each graph's
    /// session creation time (`load <graph>.onnx`; graphs created together overlap) and the
    /// wall time of all session creation (`load sessions`).
    pub fn timings(&self) -> Vec<(String, Duration)> {
        let mut all: Vec<(String, Duration)> = self
            .timings
            .iter()
            .map(|(k, v)| (k.to_string(), *v))
            .collect();
        all.extend(
            self.sessions
                .load_times()
                .iter()
                .map(|(g, d)| (format!("load {}", g.file_name()), *d)),
        );
        if !self.sessions.load_times().is_empty() {
            all.push(("load sessions".into(), self.sessions.loading_time()));
        }
        all
    }

    fn add_time(&mut self, stage: &'static str, since: Instant) {
        *self.timings.entry(stage).or_default() += since.elapsed();
    }

    /// Creates every session of these phases now: their load time is then not counted in a
    /// later stage, and a provider that cannot load fails before any work.
    /// The sessions are created together (in parallel; see [`SessionSet::preload`]).
    pub fn preload(&mut self, phases: &[Phase]) -> Result<()> {
        let graphs: Vec<Graph> = phases.iter().flat_map(|p| p.graphs()).copied().collect();
        self.sessions.preload(&graphs)
    }

    /// Tells the session set the run has moved to `phase` (releases earlier phases' sessions
    /// under [`MemoryPolicy::LowPeak`]). The UNet's bindings keep its session alive, so they go
    /// when the UNet may go.
    pub fn enter(&mut self, phase: Phase) {
        if phase != Phase::Denoise && self.sessions.config().policy == MemoryPolicy::LowPeak {
            self.bound.clear();
        }
        self.sessions.enter(phase);
    }

    /// Checks a request against the bundle and this engine's limits, and tokenizes it.
    pub fn validate(&self, request: GenerateRequest) -> Result<ValidRequest> {
        request.validate(&self.bundle, &self.tokenizer, &self.limits)
    }

    /// A validator for other threads (the same checks as [`Engine::validate`], the memory
    /// estimate counting the sessions as loaded).
    pub fn validator(&self) -> Validator {
        let run = RunShape {
            weights_loaded: true,
            ..self.run_shape()
        };
        Validator::new(
            self.bundle.clone(),
            self.tokenizer.clone(),
            self.limits,
            run,
        )
    }

    fn run_shape(&self) -> RunShape {
        RunShape {
            max_batch: self.max_batch(),
            decode_batch: self.decode_batch,
            policy: self.sessions.config().policy,
            weights_loaded: false,
        }
    }

    /// Refuses a run whose estimated memory (all its requests at once: weights, the largest
    /// graph call's activations, latents and images) exceeds what the machine has available,
    /// before any model runs (see [`crate::memory`]).
    pub fn check_memory(&self, requests: &[&ValidRequest]) -> Result<MemoryEstimate> {
        let estimate = memory::estimate(&self.bundle, requests, self.run_shape());
        memory::check(&estimate)?;
        Ok(estimate)
    }

    /// Tokenizes a prompt and finds the placeholder's token index.
    pub fn tokenize(
        &self,
        prompt: &str,
        placeholder: &str,
        truncate: bool,
    ) -> Result<(TokenIds, usize)> {
        Ok(self.tokenizer.tokenize(prompt, placeholder, truncate)?)
    }

    // ----- concepts -----

    /// Reads the subject image (and mask) files, then [`Engine::encode_concept_bytes`].
    pub fn encode_concept(&mut self, image: &Path, mask: Option<&Path>) -> Result<Concept> {
        let read = |path: &Path, role: Role| {
            files::read_capped(path, role.file_kind()).map_err(DecodeError::from)
        };
        let image_bytes = read(image, Role::Image)?;
        let mask_bytes = mask.map(|m| read(m, Role::Mask)).transpose()?;
        let mask_name = mask.map(|m| m.display().to_string()).unwrap_or_default();
        let mut concept = self.encode_concept_bytes(
            &image_bytes,
            &image.display().to_string(),
            mask_bytes.as_deref().map(|b| (b, mask_name.as_str())),
        )?;
        concept.source.image_name = image
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        Ok(concept)
    }

    /// Decodes the subject image (and mask) as Pillow does — limits from the headers checked
    /// before any pixel is decoded, the mask's size checked against the image's first —
    /// preprocesses them and encodes the concept. `image_name` and the mask's name appear in
    /// errors and in the concept's record.
    pub fn encode_concept_bytes(
        &mut self,
        image: &[u8],
        image_name: &str,
        mask: Option<(&[u8], &str)>,
    ) -> Result<Concept> {
        let start = Instant::now();
        let dims = *self.bundle.dims();
        let decoded = image_decode::decode_rgb(image, image_name, &self.image_limits)?;
        let mask01 = mask
            .map(|(bytes, name)| {
                crate::mask::decode_mask(bytes, name, &decoded.header, &self.image_limits)
            })
            .transpose()?;
        let params = preprocess::PreprocessParams {
            size: dims.image_size as u32,
            grid: dims.patch_grid as u32,
            mean: self.bundle.image_mean().map(|v| v as f32),
            std: self.bundle.image_std().map(|v| v as f32),
        };
        let inputs = preprocess::ConceptInputs::new(&decoded.rgb, mask01.as_ref(), &params)?;
        self.add_time("preprocess", start);
        let source = ConceptSource {
            bundle: self.bundle.name().to_string(),
            image_sha256: crate::cache::sha256_hex(image),
            mask_sha256: mask.map(|(bytes, _)| crate::cache::sha256_hex(bytes)),
            image_name: image_name.to_string(),
            preprocessing: preprocessing_description(&self.bundle, mask.is_some()),
        };
        let mut concept = self.encode_pixels(
            &inputs.global_pixels,
            &inputs.local_pixels,
            &inputs.mask_grid,
        )?;
        concept.source = source;
        Ok(concept)
    }

    /// Runs the CLIP image encoder on the global and local pixels (one batch of 2) and the two
    /// mappers. `pixels`: `[3, S, S]` normalised; `mask_grid`: `[grid²]` 0/1.
    pub fn encode_pixels(
        &mut self,
        global: &Array3<f32>,
        local: &Array3<f32>,
        mask_grid: &Array1<f32>,
    ) -> Result<Concept> {
        let start = Instant::now();
        self.enter(Phase::Concept);
        let pixels = ndarray::stack(Axis(0), &[global.view(), local.view()])
            .map_err(|e| invalid("image", e.to_string()))?;
        let g = Graph::ImageEncoder;
        let features: Array4<f32> = self.sessions.run(
            g,
            vec![input(g, "pixel_values", pixels.view())?],
            "image_features",
        )?;
        let d = self.bundle.dims();
        let expected = [2, CLIP_LAYERS, d.image_tokens(), d.image_hidden];
        if features.shape() != expected {
            return Err(bad_output(
                g,
                "image_features",
                format!("has shape {:?}, expected {expected:?}", features.shape()),
            ));
        }
        // Row 0: the whole image (global path); row 1: image × mask (local path).
        let global_feats = features.slice(s![0..1, .., .., ..]);
        let local_feats = features.slice(s![1..2, .., .., ..]);
        let g = Graph::GlobalMapper;
        let words: Array3<f32> = self.sessions.run(
            g,
            vec![input(g, "image_features", global_feats)?],
            "word_embeddings",
        )?;
        let mask = mask_grid.view().insert_axis(Axis(0));
        let g = Graph::LocalMapper;
        let locals: Array3<f32> = self.sessions.run(
            g,
            vec![
                input(g, "image_features", local_feats)?,
                input(g, "mask", mask)?,
            ],
            "local_embeddings",
        )?;
        self.add_time("encode concept", start);
        Ok(Concept {
            word_embeddings: words.index_axis_move(Axis(0), 0),
            local_embeddings: locals.index_axis_move(Axis(0), 0),
            mask_grid: mask_grid.clone(),
            source: ConceptSource {
                bundle: self.bundle.name().to_string(),
                ..ConceptSource::default()
            },
        })
    }

    // ----- text -----

    /// Text encoder at batch N: row i injects `inj_embedding[i]` at `inj_index[i]` (-1: none).
    fn run_text_encoder(
        &mut self,
        ids: &[TokenIds],
        inj_embedding: Array2<f32>,
        inj_index: &[i64],
    ) -> Result<Array3<f32>> {
        let g = Graph::TextEncoder;
        let flat: Vec<i64> = ids.iter().flat_map(|r| r.iter().copied()).collect();
        let ids = Array2::from_shape_vec((ids.len(), self.bundle.dims().max_tokens), flat)
            .map_err(|e| Error::Internal(format!("input ids: {e}")))?;
        self.sessions.run(
            g,
            vec![
                input(g, "input_ids", ids.view())?,
                input(g, "inj_embedding", inj_embedding.view())?,
                input(g, "inj_index", ArrayView1::from(inj_index))?,
            ],
            "last_hidden_state",
        )
    }

    /// Conditional embeddings of each prompt (`[77, C]`, its concept's word injected at its
    /// placeholder index), and the shared unconditional ones, in one text-encoder call (the
    /// unconditional row only until it is cached).
    fn encode_prompts(
        &mut self,
        prompts: &[(TokenIds, usize, Array1<f32>)],
    ) -> Result<PromptEmbeddings> {
        self.enter(Phase::Text);
        let width = self.bundle.dims().text_hidden;
        let mut ids = Vec::with_capacity(prompts.len() + 1);
        let mut index = Vec::with_capacity(prompts.len() + 1);
        let mut words = Vec::with_capacity(prompts.len() + 1);
        let need_uncond = self.uncond.is_none();
        if need_uncond {
            ids.push(self.tokenizer.encode("", false)?);
            index.push(-1);
            words.push(Array1::zeros(width));
        }
        for (prompt_ids, placeholder, word) in prompts {
            ids.push(*prompt_ids);
            index.push(*placeholder as i64);
            words.push(word.clone());
        }
        let views: Vec<_> = words.iter().map(|w| w.view()).collect();
        let inj = ndarray::stack(Axis(0), &views).map_err(|e| invalid("concept", e.to_string()))?;
        let out = self.run_text_encoder(&ids, inj, &index)?;
        let mut rows = out.outer_iter().map(|r| r.to_owned());
        if need_uncond {
            let uncond = rows
                .next()
                .ok_or_else(|| Error::Internal("text encoder returned no rows".into()))?;
            self.uncond = Some(Arc::new(uncond));
        }
        let uncond = self
            .uncond
            .clone()
            .ok_or_else(|| Error::Internal("no unconditional embeddings".into()))?;
        Ok((rows.collect(), uncond))
    }

    /// Text encoding for one prompt: `(cond [1,77,C], uncond [1,77,C])`.
    pub fn prompt_embeddings(
        &mut self,
        concept: &Concept,
        ids: &TokenIds,
        index: usize,
    ) -> Result<(Array3<f32>, Array3<f32>)> {
        let (mut conds, uncond) =
            self.encode_prompts(&[(*ids, index, concept.word().to_owned())])?;
        let cond = conds
            .pop()
            .ok_or_else(|| Error::Internal("text encoder returned no rows".into()))?;
        Ok((
            cond.insert_axis(Axis(0)),
            uncond.as_ref().clone().insert_axis(Axis(0)),
        ))
    }

    // ----- jobs -----

    /// A new job for a validated request: its own scheduler and initial latents (the request's
    /// `init_noise`, else torch-compatible noise from its seed, × init_noise_sigma).
    /// Adjust it with the `Job::with_*` methods, then [`Engine::submit`] it.
    pub fn new_job(&mut self, mut request: ValidRequest, concept: Arc<Concept>) -> Result<Job> {
        let dims = self.bundle.dims();
        let patches = dims.patch_grid * dims.patch_grid;
        if concept.text_hidden() != dims.text_hidden || concept.local_embeddings.nrows() != patches
        {
            return Err(invalid(
                "concept",
                format!(
                    "has text width {} and {} local tokens; this bundle needs {} and {patches}",
                    concept.text_hidden(),
                    concept.local_embeddings.nrows(),
                    dims.text_hidden
                ),
            ));
        }
        if request.attention_map_steps().is_some() {
            self.check_attention_maps()?;
        }
        // One torch-compatible generator per job, as diffusers' pipeline has one: it draws the
        // initial latents (unless given), then euler-a's per-step noise.
        let mut generator = TorchGenerator::new(request.seed());
        let shape = request.latent_shape();
        let noise = match request.take_init_noise() {
            Some(noise) => noise, // shape checked by validate()
            None => {
                let numel = shape.iter().product();
                Array4::from_shape_vec(shape, generator.randn(numel))
                    .map_err(|e| Error::Internal(format!("noise: {e}")))?
            }
        };
        let scheduler: Box<dyn Scheduler> = scheduler_config(&self.bundle).build(
            request.scheduler(),
            request.steps(),
            generator,
        )?;
        let sigma = scheduler.init_noise_sigma();
        let latents = noise.mapv(|v| v * sigma);
        let id = JobId(self.next_id);
        self.next_id += 1;
        Ok(Job::new(id, request, concept, self.cfg, scheduler, latents))
    }

    /// Adds a job; it joins the next UNet call that has room for it.
    pub fn submit(&mut self, job: Job) -> JobId {
        let id = job.id();
        self.jobs.push(job);
        id
    }

    /// [`Engine::new_job`] and [`Engine::submit`] with a listener and a cancellation token.
    pub fn submit_request(
        &mut self,
        request: ValidRequest,
        concept: Arc<Concept>,
        events: Option<Box<dyn JobEvents>>,
        cancel: Option<CancelToken>,
    ) -> Result<JobId> {
        let mut job = self.new_job(request, concept)?;
        if let Some(events) = events {
            job = job.with_events(events);
        }
        if let Some(cancel) = cancel {
            job = job.with_cancel(cancel);
        }
        Ok(self.submit(job))
    }

    /// Jobs in flight (not yet finished).
    pub fn active(&self) -> usize {
        self.jobs.len()
    }

    /// Rows of all jobs in flight per step (2 per image), for metrics.
    pub fn active_rows(&self) -> usize {
        self.jobs
            .iter()
            .filter(|j| j.state() == JobState::Denoising)
            .map(|j| 2 * j.images())
            .sum()
    }

    /// Cancels a job (it leaves at the next tick).
    pub fn cancel(&mut self, id: JobId) {
        if let Some(job) = self.jobs.iter().find(|j| j.id() == id) {
            job.cancel_token().cancel();
        }
    }

    /// Cancels every job.
    pub fn cancel_all(&mut self) {
        for job in &self.jobs {
            job.cancel_token().cancel();
        }
    }

    /// The jobs that left the engine since the last call.
    pub fn take_finished(&mut self) -> Vec<FinishedJob> {
        std::mem::take(&mut self.finished)
    }

    /// Ticks until no job is left. `interrupted` is polled before each tick; when it returns
    /// true every job is cancelled.
    pub fn run_until_idle(&mut self, interrupted: &dyn Fn() -> bool) {
        loop {
            if interrupted() {
                self.cancel_all();
            }
            if self.tick() == Work::Idle {
                break;
            }
        }
    }

    /// One unit of work (see the module documentation).
    pub fn tick(&mut self) -> Work {
        let cancelled = self.reap_cancelled();
        if cancelled > 0 {
            return Work::Cancelled { jobs: cancelled };
        }
        if self.jobs.iter().any(|j| j.state() == JobState::Text) {
            return self.text_tick();
        }
        let resident = self.sessions.config().policy == MemoryPolicy::Resident;
        if resident {
            if let Some(work) = self.decode_tick() {
                return work;
            }
        }
        if let Some(work) = self.unet_tick() {
            return work;
        }
        self.decode_tick().unwrap_or(Work::Idle)
    }

    fn reap_cancelled(&mut self) -> usize {
        let mut count = 0;
        let mut i = 0;
        while i < self.jobs.len() {
            if self.jobs[i].is_cancelled() {
                let job = self.jobs.remove(i);
                self.finish(job, None);
                count += 1;
            } else {
                i += 1;
            }
        }
        count
    }

    /// Moves a job out; `error` None = done or cancelled (see [`Job::finish`]).
    fn finish(&mut self, job: Job, error: Option<Error>) {
        match (&error, job.state()) {
            (Some(_), _) => self.stats.jobs_failed += 1,
            (None, JobState::Done) => self.stats.jobs_done += 1,
            (None, _) => self.stats.jobs_cancelled += 1,
        }
        self.finished.push(job.finish(error));
        self.prune_bindings();
    }

    /// Drops the bindings that hold rows of jobs no longer denoising (they hold the jobs'
    /// constant inputs, and would never be reused).
    fn prune_bindings(&mut self) {
        let denoising: Vec<JobId> = self
            .jobs
            .iter()
            .filter(|j| j.state() == JobState::Denoising)
            .map(|j| j.id())
            .collect();
        self.bound
            .retain(|_, b| b.parts.iter().all(|p| denoising.contains(&p.job)));
    }

    fn fail(&mut self, id: JobId, error: Error) {
        if let Some(i) = self.jobs.iter().position(|j| j.id() == id) {
            let job = self.jobs.remove(i);
            self.finish(job, Some(error));
        }
    }

    /// Encodes the prompts of every job still in the text state (up to `max_batch` per call).
    fn text_tick(&mut self) -> Work {
        let start = Instant::now();
        let max = self.max_batch();
        let ids: Vec<JobId> = self
            .jobs
            .iter()
            .filter(|j| j.state() == JobState::Text)
            .take(max)
            .map(|j| j.id())
            .collect();
        let prompts: Vec<(TokenIds, usize, Array1<f32>)> = self
            .jobs
            .iter()
            .filter(|j| ids.contains(&j.id()))
            .map(|j| {
                let r = j.request();
                (
                    *r.input_ids(),
                    r.placeholder_index(),
                    j.concept().word().to_owned(),
                )
            })
            .collect();
        match self.encode_prompts(&prompts) {
            Ok((conds, uncond)) => {
                let took = start.elapsed();
                let mut conds = conds.into_iter();
                for job in self.jobs.iter_mut().filter(|j| ids.contains(&j.id())) {
                    let Some(cond) = conds.next() else { break };
                    job.record_text_time(start, took);
                    job.start_denoising(TextEmbeddings {
                        cond,
                        uncond: uncond.clone(),
                    });
                }
            }
            Err(error) => {
                let error = Arc::new(error);
                for id in &ids {
                    self.fail(*id, Error::Shared(error.clone()));
                }
            }
        }
        Work::Text { jobs: ids.len() }
    }

    /// One UNet call over the rows the planner picks; None when no job has rows left.
    fn unet_tick(&mut self) -> Option<Work> {
        let pending: Vec<_> = self.jobs.iter().filter_map(|j| j.pending()).collect();
        let plan = self.planner.next_call(&pending)?;
        let jobs = plan.parts.len();
        let rows = plan.rows();
        let start = Instant::now();
        match self.run_unet(&plan) {
            Ok(out) => {
                let took = start.elapsed();
                self.record_call(&plan, took);
                self.planner.record(&plan, took, out.maps.is_some());
                let mut failures = Vec::new();
                if let Some(maps) = &out.maps {
                    let parts = batch::split_output(&plan, maps.tokens.view())
                        .zip(batch::split_output(&plan, maps.gate.view()));
                    for ((part, tokens), (_, gate)) in parts {
                        if let Some(job) = self.jobs.iter_mut().find(|j| j.id() == part.job) {
                            if let Err(e) = job.accept_maps(part.rows.clone(), tokens, gate) {
                                failures.push((part.job, e));
                            }
                        }
                    }
                }
                for (part, view) in batch::split_output(&plan, out.noise_pred.view()) {
                    if failures.iter().any(|(id, _)| *id == part.job) {
                        continue;
                    }
                    if let Some(job) = self.jobs.iter_mut().find(|j| j.id() == part.job) {
                        if let Err(e) = job.accept(part.rows.clone(), view, took) {
                            failures.push((part.job, e));
                        }
                    }
                }
                for (id, e) in failures {
                    self.fail(id, e);
                }
                self.prune_bindings();
            }
            Err(_) if jobs > 1 => {
                // Retry each job alone, so that only the job that fails is failed.
                self.bound.remove(&plan.size);
                for id in plan.jobs() {
                    if let Some(job) = self.jobs.iter_mut().find(|j| j.id() == id) {
                        job.isolate();
                    }
                }
            }
            Err(error) => {
                self.bound.remove(&plan.size);
                self.fail(plan.parts[0].job, error);
            }
        }
        Some(Work::Unet { rows, jobs })
    }

    fn record_call(&mut self, plan: &CallPlan, took: Duration) {
        let rows = plan.rows();
        self.stats.unet_time += took;
        self.stats.unet_calls += 1;
        self.stats.unet_rows += rows as u64;
        *self.stats.batch_sizes.entry(rows).or_default() += 1;
        if plan.parts.len() > 1 {
            self.stats.shared_calls += 1;
        }
    }

    /// Runs one UNet call. The constant inputs are bound once per call composition and size;
    /// per call only the samples, timesteps and (in a bundle with maps) the rows' map flags
    /// are bound. Returns `noise_pred` `[R, 4, h, w]`, and the attention maps when a row of the
    /// call wants them (only then are they computed and fetched).
    fn run_unet(&mut self, plan: &CallPlan) -> Result<UnetOutputs> {
        let g = Graph::Unet;
        let rows = self.rows_of(plan)?;
        let step = batch::step_inputs(&rows).map_err(|e| Error::Internal(e.to_string()))?;
        let reuse = self
            .bound
            .get(&plan.size)
            .is_some_and(|b| b.parts == plan.parts);
        if !reuse {
            let constants =
                batch::constant_inputs(&rows).map_err(|e| Error::Internal(e.to_string()))?;
            drop(rows);
            self.enter(Phase::Denoise);
            let session = self.sessions.get(g)?;
            let mut binding = session.create_binding().map_err(ort_err(g, "bind"))?;
            for (name, value) in [
                ("encoder_hidden_states", owned(g, constants.text)?),
                ("local_embeddings", owned(g, constants.local)?),
                ("local_index", owned(g, constants.local_index)?),
                ("local_lambda", owned(g, constants.lambda)?),
            ] {
                binding
                    .bind_input(name, &value)
                    .map_err(ort_err(g, "bind"))?;
            }
            bind_unet_outputs(&mut binding, session, false)?;
            self.bound.insert(
                plan.size,
                BoundCall {
                    parts: plan.parts.clone(),
                    binding,
                    maps_bound: false,
                },
            );
        } else {
            drop(rows);
        }
        let has_maps = self.unet_has_maps()?;
        let want_maps = step.any_maps();
        if want_maps && !has_maps {
            return Err(Error::Internal(
                "attention maps wanted from a UNet without them".into(),
            ));
        }
        let bound = self
            .bound
            .get_mut(&plan.size)
            .ok_or_else(|| Error::Internal("UNet binding vanished".into()))?;
        bound
            .binding
            .bind_input("sample", &owned(g, step.sample)?)
            .map_err(ort_err(g, "bind"))?;
        bound
            .binding
            .bind_input("timestep", &owned(g, step.timestep)?)
            .map_err(ort_err(g, "bind"))?;
        if has_maps {
            bound
                .binding
                .bind_input(MAPS_FLAG, &owned(g, step.want_maps)?)
                .map_err(ort_err(g, "bind"))?;
        }
        let session = self.sessions.get(g)?;
        if bound.maps_bound != want_maps {
            bind_unet_outputs(&mut bound.binding, session, want_maps)?;
            bound.maps_bound = want_maps;
        }
        let out = session
            .run_binding(&bound.binding)
            .map_err(ort_err(g, "run"))?;
        let (h, w) = (plan.size.height, plan.size.width);
        let channels = self.bundle.dims().latent_channels;
        let noise_pred = per_row_output(&out, "noise_pred", [plan.rows(), channels, h, w])?;
        let maps = if want_maps {
            let tokens = self.bundle.dims().max_tokens;
            Some(CallMaps {
                tokens: per_row_output(&out, "attention_maps", [plan.rows(), tokens, h, w])?,
                gate: per_row_output(&out, "placeholder_gate", [plan.rows(), 1, h, w])?,
            })
        } else {
            None
        };
        Ok(UnetOutputs { noise_pred, maps })
    }

    /// Whether the bundle's UNet has the optional attention-map input and outputs (creates its
    /// session if needed: the answer is in the graph's signature).
    pub fn supports_attention_maps(&mut self) -> Result<bool> {
        self.unet_has_maps()
    }

    /// An error naming the bundle when its UNet has no attention maps (exported before them,
    /// or with `--no-attention-maps`): the check behind a request for maps.
    pub fn check_attention_maps(&mut self) -> Result<()> {
        if self.unet_has_maps()? {
            return Ok(());
        }
        Err(invalid(
            "attention_maps",
            format!(
                "bundle `{}` cannot give attention maps: its unet.onnx has no `{MAPS_FLAG}` \
                 input (it was exported before attention maps, or with --no-attention-maps); \
                 re-export it with `python -m export` to get them",
                self.bundle.name().escape_debug()
            ),
        ))
    }

    fn unet_has_maps(&mut self) -> Result<bool> {
        if let Some(has) = self.unet_maps {
            return Ok(has);
        }
        let session = self.sessions.get(Graph::Unet)?;
        let has = graphs::has_optional(Graph::Unet.spec(), session);
        self.unet_maps = Some(has);
        Ok(has)
    }

    /// The UNet rows of a plan, in call order.
    fn rows_of(&self, plan: &CallPlan) -> Result<Vec<batch::UnetRow<'_>>> {
        let mut rows = Vec::with_capacity(plan.rows());
        for part in &plan.parts {
            let job = self
                .jobs
                .iter()
                .find(|j| j.id() == part.job)
                .ok_or_else(|| Error::Internal(format!("{} is not in flight", part.job)))?;
            for r in part.rows.clone() {
                rows.push(
                    job.row(r)
                        .ok_or_else(|| Error::Internal(format!("{} has no row {r}", part.job)))?,
                );
            }
        }
        Ok(rows)
    }

    /// Decodes up to `decode_batch` images of the first job waiting for its decode.
    fn decode_tick(&mut self) -> Option<Work> {
        let i = self
            .jobs
            .iter()
            .position(|j| j.state() == JobState::Decoding)?;
        let start = Instant::now();
        let job = &self.jobs[i];
        let (id, from) = (job.id(), job.decoded());
        let to = (from + self.decode_batch).min(job.images());
        let latents = job.latents().slice(s![from..to, .., .., ..]).to_owned();
        match self.decode(&latents) {
            Ok(images) => {
                let job = &mut self.jobs[i];
                job.add_images(images, start.elapsed());
                if job.state() == JobState::Done {
                    let job = self.jobs.remove(i);
                    self.finish(job, None);
                }
            }
            Err(e) => self.fail(id, e),
        }
        Some(Work::Decode {
            job: id,
            images: to - from,
        })
    }

    /// VAE decode of final latents `[B, 4, h, w]` to RGB8 images.
    pub fn decode(&mut self, latents: &Array4<f32>) -> Result<Vec<RgbImage>> {
        self.enter(Phase::Decode);
        let scale = self.bundle.vae_scaling_factor() as f32;
        let scaled = latents.mapv(|v| v / scale);
        let g = Graph::VaeDecoder;
        let decoded: Array4<f32> =
            self.sessions
                .run(g, vec![input(g, "latent_sample", scaled.view())?], "sample")?;
        let (b, _, h, w) = latents.dim();
        // The image side is dynamic in the graph: only the output shows a manifest whose
        // vae_scale_factor disagrees with the decoder.
        check_output_shape(
            g.spec(),
            "sample",
            decoded.shape(),
            self.bundle.dims(),
            b,
            (h, w),
        )?;
        Ok(decoded.outer_iter().map(to_rgb8).collect())
    }
}

/// The UNet's input that switches the attention maps on (DESIGN.md §2).
const MAPS_FLAG: &str = "want_attention_maps";

/// What one UNet call returned.
struct UnetOutputs {
    /// `[R, 4, h, w]`.
    noise_pred: Array4<f32>,
    /// Present when a row of the call wanted its maps.
    maps: Option<CallMaps>,
}

/// The attention-map outputs of one call: `[R, T, h, w]` and `[R, 1, h, w]`.
struct CallMaps {
    tokens: Array4<f32>,
    gate: Array4<f32>,
}

/// Binds the UNet's outputs to the session's device: `noise_pred`, and the attention maps
/// too when `maps` (an output left unbound is not fetched).
fn bind_unet_outputs(
    binding: &mut IoBinding,
    session: &ort::session::Session,
    maps: bool,
) -> Result<()> {
    let g = Graph::Unet;
    binding.clear_outputs();
    let memory = session.allocator().memory_info();
    let names: &[&str] = if maps {
        &["noise_pred", "attention_maps", "placeholder_gate"]
    } else {
        &["noise_pred"]
    };
    for name in names {
        binding
            .bind_output_to_device(*name, memory)
            .map_err(ort_err(g, "bind"))?;
    }
    Ok(())
}

/// A per-row f32 output of a UNet call, owned, checked to have the shape `expected` (finiteness
/// is checked per job, so that one job's NaN fails only that job).
fn per_row_output(
    out: &ort::session::SessionOutputs<'_>,
    tensor: &'static str,
    expected: [usize; 4],
) -> Result<Array4<f32>> {
    let g = Graph::Unet;
    let view = output_view(out, g, tensor)?
        .into_dimensionality::<Ix4>()
        .map_err(|e| bad_output(g, tensor, e.to_string()))?;
    if view.shape() != expected {
        return Err(bad_output(
            g,
            tensor,
            format!("has shape {:?}, expected {expected:?}", view.shape()),
        ));
    }
    Ok(view.to_owned())
}

/// How a concept's image is preprocessed for this bundle, for the record in concept files and
/// in the server's content-addressed concept ids.
pub fn preprocessing_description(bundle: &Bundle, has_mask: bool) -> String {
    let d = bundle.dims();
    format!(
        "Pillow-bicubic squash to {0}x{0}, mean {1:?}, std {2:?}, mask grid {3}x{3}{4}",
        d.image_size,
        bundle.image_mean().map(|v| v as f32),
        bundle.image_std().map(|v| v as f32),
        d.patch_grid,
        if has_mask {
            ""
        } else {
            " (no mask: whole image)"
        }
    )
}

/// The manifest's noise schedule as the schedulers' configuration (SD v1-4's other keys).
fn scheduler_config(bundle: &Bundle) -> SchedulerConfig {
    let s = bundle.scheduler();
    SchedulerConfig {
        num_train_timesteps: s.num_train_timesteps,
        beta_start: s.beta_start,
        beta_end: s.beta_end,
        beta_schedule: s.beta_schedule,
        ..SchedulerConfig::default()
    }
}

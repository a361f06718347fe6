//! The ELITE generation pipeline: text encoding with injection, batched classifier-free guidance with lambda, LMS denoising, VAE decode.
//!
//! Deliberate difference from the official scripts (DESIGN.md §1): guidance runs as **one** UNet
//! call per step at batch 2B — rows `0..B` conditional with λ, rows `B..2B` unconditional with
//! λ = 0 — instead of two batch-B calls. The graph's attention max is per sample, so this is
//! exactly the reference's computation, at roughly half the per-step overhead. `CfgMode::Split`
//! (two batch-B calls, as the official scripts do) is the opt-in for tight memory.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use image::RgbImage;
use ndarray::{
    concatenate, s, Array, Array1, Array2, Array3, Array4, ArrayView, ArrayView1, ArrayView2,
    ArrayView3, Axis, Dimension, Ix4,
};
use ort::session::{IoBinding, Session, SessionInputValue, SessionOutputs};
use ort::value::{PrimitiveTensorElementType, Tensor, TensorRef};

use crate::bundle::{BetaSchedule as ManifestBeta, Bundle, Checksums};
use crate::concept::{Concept, ConceptSource};
use crate::error::{invalid, Error, Result};
use crate::graphs::{check_session, Graph, ShapeRange};
use crate::noise::torch_randn;
use crate::output::to_rgb8;
use crate::preprocess;
use crate::runtime::{create_session_cached, init_environment, Device, ExecutionConfig, OrtEnv};
use crate::scheduler::{BetaSchedule, LmsConfig, LmsScheduler};
use crate::tokenizer::{ClipTokenizer, TokenIds};

/// How to open a bundle.
#[derive(Debug, Clone, Default)]
pub struct LoadOptions {
    /// ONNX Runtime library (`--ort-lib`); else `ORT_DYLIB_PATH`, else the provisioned copy.
    pub ort_lib: Option<PathBuf>,
    pub execution: ExecutionConfig,
    /// Verify every file's sha256 against the manifest (on by default in the CLI).
    pub verify_checksums: bool,
    /// Local cache (see [`crate::cache`]): files already verified are not hashed again while
    /// unchanged, and optimised graphs are kept. None: no cache.
    pub cache_dir: Option<PathBuf>,
    /// How guidance calls the UNet: one batch-2B call (default) or two batch-B calls.
    pub cfg: CfgMode,
}

/// Everything one generation call needs besides the concept. Build with [`GenerateOptions::new`]
/// (bundle defaults), adjust fields, then [`Elite::generate`].
#[derive(Debug, Clone)]
pub struct GenerateOptions {
    pub prompt: String,
    pub placeholder: String,
    pub steps: usize,
    pub guidance: f32,
    /// λ: weight of the local branch (0.8 for generation prompts, 0.6 for editing prompts).
    pub lambda: f32,
    pub height: usize,
    pub width: usize,
    pub seed: u64,
    pub num_images: usize,
    /// Cut prompts over 77 tokens instead of refusing them.
    pub truncate: bool,
    /// Unscaled initial noise `[B, 4, h, w]` (diffusers' `latents=`): replaces the seeded noise.
    pub init_noise: Option<Array4<f32>>,
    /// Steps (1-based) after which to keep a copy of the latents in the trace.
    pub record_steps: Vec<usize>,
}

impl GenerateOptions {
    pub fn new(prompt: impl Into<String>, bundle: &Bundle) -> Self {
        let d = bundle.defaults();
        Self {
            prompt: prompt.into(),
            placeholder: d.placeholder.clone(),
            steps: d.steps,
            guidance: d.guidance_scale as f32,
            lambda: d.lambda_generate as f32,
            height: d.height,
            width: d.width,
            seed: 42,
            num_images: 1,
            truncate: false,
            init_noise: None,
            record_steps: Vec::new(),
        }
    }

    /// Rejects values that cannot produce a meaningful image, naming the option.
    pub fn validate(&self, bundle: &Bundle) -> Result<()> {
        let dims = bundle.dims();
        let train = bundle.scheduler().num_train_timesteps;
        if self.steps == 0 || self.steps > train {
            return Err(invalid(
                "--steps",
                format!("must be 1..={train}, got {}", self.steps),
            ));
        }
        if !self.guidance.is_finite() || !(0.0..=100.0).contains(&self.guidance) {
            return Err(invalid(
                "--guidance",
                format!("must be a number in 0..=100, got {}", self.guidance),
            ));
        }
        if !self.lambda.is_finite() || !(0.0..=10.0).contains(&self.lambda) {
            return Err(invalid(
                "--lambda",
                format!("must be a number in 0..=10, got {}", self.lambda),
            ));
        }
        for (name, v) in [("--height", self.height), ("--width", self.width)] {
            let m = dims.size_multiple;
            if v == 0 || v % m != 0 || v > 4096 {
                return Err(invalid(
                    name,
                    format!("must be a positive multiple of {m} up to 4096, got {v}"),
                ));
            }
        }
        if self.num_images == 0 || self.num_images > 64 {
            return Err(invalid(
                "--num-images",
                format!("must be 1..=64, got {}", self.num_images),
            ));
        }
        if self.placeholder.trim().is_empty() {
            return Err(invalid("--placeholder", "must not be empty"));
        }
        let shape = self.latent_shape(bundle);
        if let Some(noise) = &self.init_noise {
            if noise.shape() != shape {
                return Err(invalid(
                    "--init-latents",
                    format!(
                        "shape {:?}, expected {shape:?} for this size and -n",
                        noise.shape()
                    ),
                ));
            }
        }
        Ok(())
    }

    fn latent_shape(&self, bundle: &Bundle) -> [usize; 4] {
        let d = bundle.dims();
        [
            self.num_images,
            d.latent_channels,
            self.height / d.vae_scale_factor,
            self.width / d.vae_scale_factor,
        ]
    }
}

/// Intermediate values of one generation, for parity tests and debugging.
#[derive(Debug, Clone, Default)]
pub struct Trace {
    pub input_ids: Vec<i64>,
    pub placeholder_index: usize,
    /// `[1, 77, C_txt]` each.
    pub text_cond: Option<Array3<f32>>,
    pub text_uncond: Option<Array3<f32>>,
    /// Initial latents, already × init_noise_sigma.
    pub init_latents: Option<Array4<f32>>,
    /// Latents after step k (1-based), for the steps in `record_steps` and the last one.
    pub latents: BTreeMap<usize, Array4<f32>>,
}

/// Wall-clock time per stage, for `--timings`.
#[derive(Debug, Clone, Default)]
pub struct Timings {
    pub stages: Vec<(String, Duration)>,
    /// One entry per denoising step: the UNet call, guidance and the scheduler step.
    pub denoise_steps: Vec<Duration>,
}

impl Timings {
    fn add(&mut self, stage: &str, since: Instant) {
        self.stages.push((stage.to_string(), since.elapsed()));
    }
}

pub struct Generation {
    pub images: Vec<RgbImage>,
    pub trace: Trace,
}

/// Progress of the denoising loop (`step` is 1-based).
#[derive(Debug, Clone, Copy)]
pub struct Progress {
    pub step: usize,
    pub steps: usize,
}

/// How classifier-free guidance calls the UNet. Both give the reference's numbers: the graph's
/// attention max is per sample (DESIGN.md §1.5), so batch rows are independent.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum CfgMode {
    /// One call at batch 2B (conditional rows with λ, unconditional rows with λ = 0), as
    /// DESIGN.md §1 specifies: fewer, larger calls, which is what a GPU wants.
    #[default]
    Batched,
    /// Two calls at batch B, conditional then unconditional, as the official scripts do. On a
    /// CPU the GEMMs are already large at batch 1, so this is about as fast and holds half the
    /// activations: the option for tight memory.
    Split,
}

/// The UNet inputs that stay the same for every step of one generation, for one UNet call of
/// the guidance (see [`CfgMode`]): `blocks` of B rows each, every block with its own text
/// embeddings and λ (λ = 0 makes the graph compute exactly the global-only attention of the
/// reference's unconditional call).
struct GuidanceBatch {
    text: Array3<f32>,
    local: Array3<f32>,
    local_index: Array1<i64>,
    lambda: Array1<f32>,
}

impl GuidanceBatch {
    fn new(
        b: usize,
        blocks: &[(&Array3<f32>, f32)],
        local: &Array2<f32>,
        index: usize,
    ) -> Result<GuidanceBatch> {
        // One-time copies per generation; every step then reuses these without copying.
        let rows = |a: ArrayView3<f32>| -> Result<Array3<f32>> {
            let (_, t, c) = a.dim();
            a.broadcast((b, t, c))
                .map(|v| v.to_owned())
                .ok_or_else(|| invalid("embeddings", format!("cannot repeat {:?}", a.shape())))
        };
        let stack = |parts: Vec<Array3<f32>>| {
            let views: Vec<_> = parts.iter().map(|p| p.view()).collect();
            concatenate(Axis(0), &views).map_err(|e| invalid("embeddings", e.to_string()))
        };
        let local = local.view().insert_axis(Axis(0));
        let n = b * blocks.len();
        Ok(GuidanceBatch {
            text: stack(
                blocks
                    .iter()
                    .map(|(text, _)| rows(text.view()))
                    .collect::<Result<_>>()?,
            )?,
            local: stack(vec![rows(local)?; blocks.len()])?,
            local_index: Array1::from_elem(n, index as i64),
            lambda: blocks
                .iter()
                .flat_map(|&(_, lambda)| std::iter::repeat_n(lambda, b))
                .collect(),
        })
    }

    fn rows(&self) -> usize {
        self.lambda.len()
    }

    /// An [`IoBinding`] with the constant inputs bound: ONNX Runtime copies them to the
    /// execution provider's device here, once, not on every step.
    fn bind(self, session: &Session) -> Result<IoBinding> {
        let g = Graph::Unet;
        let mut binding = session.create_binding().map_err(ort_err(g, "bind"))?;
        let mut bind = |name: &str, value: ort::value::DynValue| {
            binding.bind_input(name, &value).map_err(ort_err(g, "bind"))
        };
        bind("encoder_hidden_states", owned(g, self.text)?)?;
        bind("local_embeddings", owned(g, self.local)?)?;
        bind("local_index", owned(g, self.local_index)?)?;
        bind("local_lambda", owned(g, self.lambda)?)?;
        binding
            .bind_output_to_device("noise_pred", session.allocator().memory_info())
            .map_err(ort_err(g, "bind"))?;
        Ok(binding)
    }
}

/// A loaded bundle: manifest, tokenizer and lazily created ONNX Runtime sessions.
pub struct Elite {
    bundle: Bundle,
    tokenizer: ClipTokenizer,
    env: &'static OrtEnv,
    execution: ExecutionConfig,
    cfg: CfgMode,
    sessions: HashMap<Graph, Session>,
    pub timings: Timings,
}

fn scheduler_config(bundle: &Bundle) -> LmsConfig {
    let s = bundle.scheduler();
    LmsConfig {
        num_train_timesteps: s.num_train_timesteps,
        beta_start: s.beta_start,
        beta_end: s.beta_end,
        beta_schedule: match s.beta_schedule {
            ManifestBeta::ScaledLinear => BetaSchedule::ScaledLinear,
            ManifestBeta::Linear => BetaSchedule::Linear,
        },
        ..LmsConfig::default()
    }
}

/// Output `tensor` of a graph run as an owned f32 array of the expected rank, checked finite.
fn output_array<D: ndarray::Dimension>(
    outputs: &SessionOutputs<'_>,
    graph: Graph,
    tensor: &'static str,
) -> Result<ndarray::Array<f32, D>> {
    output_view(outputs, graph, tensor)?
        .to_owned()
        .into_dimensionality::<D>()
        .map_err(|e| Error::BadOutput {
            graph: graph.file_name(),
            tensor,
            message: e.to_string(),
        })
}

/// Output `tensor` of a graph run as a view, checked finite.
fn output_view<'a>(
    outputs: &'a SessionOutputs<'_>,
    graph: Graph,
    tensor: &'static str,
) -> Result<ndarray::ArrayViewD<'a, f32>> {
    let bad = |message: String| Error::BadOutput {
        graph: graph.file_name(),
        tensor,
        message,
    };
    let value = outputs
        .get(tensor)
        .ok_or_else(|| bad("is missing".into()))?;
    let view = value
        .try_extract_array::<f32>()
        .map_err(|e| bad(e.to_string()))?;
    if view.iter().any(|v| !v.is_finite()) {
        return Err(bad("contains NaN or infinity".into()));
    }
    Ok(view)
}

/// An owned ONNX Runtime value (bound once; no copy of borrowed data by `IoBinding`).
fn owned<T, A>(graph: Graph, array: A) -> Result<ort::value::DynValue>
where
    T: ort::value::PrimitiveTensorElementType + std::fmt::Debug,
    A: ort::value::OwnedTensorArrayData<T>,
{
    Ok(Tensor::from_array(array)
        .map_err(ort_err(graph, "input"))?
        .into_dyn())
}

fn ort_err(graph: Graph, action: &'static str) -> impl FnOnce(ort::Error) -> Error {
    move |source| Error::Inference {
        graph: graph.file_name(),
        action,
        source,
    }
}

/// One named graph input, borrowed from an ndarray (no copy: constant inputs such as the text
/// embeddings are built once and lent to every step).
type Input<'a> = (&'static str, SessionInputValue<'a>);

fn input<'a, T, D>(
    graph: Graph,
    name: &'static str,
    array: ArrayView<'a, T, D>,
) -> Result<Input<'a>>
where
    T: PrimitiveTensorElementType + std::fmt::Debug + Clone + 'static,
    D: Dimension + 'static,
{
    let tensor = TensorRef::from_array_view(array).map_err(ort_err(graph, "input"))?;
    Ok((name, tensor.into()))
}

impl Elite {
    /// Opens and checks a bundle; sessions are created on first use.
    pub fn open(dir: impl AsRef<Path>, options: &LoadOptions) -> Result<Elite> {
        let checksums = match (&options.cache_dir, options.verify_checksums) {
            (_, false) => Checksums::Skip,
            (Some(cache), true) => Checksums::VerifyCached(cache.clone()),
            (None, true) => Checksums::Verify,
        };
        let mut timings = Timings::default();
        let start = Instant::now();
        let bundle = Bundle::open_checked(dir, &checksums)?;
        timings.add("open bundle", start);
        let start = Instant::now();
        let env = init_environment(options.ort_lib.as_deref())?;
        timings.add("load onnxruntime", start);
        let start = Instant::now();
        let tokenizer = ClipTokenizer::from_file(bundle.tokenizer_path())?;
        timings.add("load tokenizer", start);
        Ok(Elite {
            bundle,
            tokenizer,
            env,
            execution: options.execution.clone(),
            cfg: options.cfg,
            sessions: HashMap::new(),
            timings,
        })
    }

    pub fn bundle(&self) -> &Bundle {
        &self.bundle
    }

    pub fn tokenizer(&self) -> &ClipTokenizer {
        &self.tokenizer
    }

    /// Creates (once) and returns the session of a graph, its signature checked.
    fn session(&mut self, graph: Graph) -> Result<&mut Session> {
        if !self.sessions.contains_key(&graph) {
            let start = Instant::now();
            let content_id = self.bundle.content_id(graph);
            // Only the UNet runs often enough per image to repay weight pre-packing.
            let dims = self.bundle.dims();
            // One TensorRT engine for batch 1..8 and 256²..1024² images (512² typical).
            let trt_profile = (self.execution.device == Device::TensorRt).then(|| {
                graph.spec().trt_profile(
                    &ShapeRange {
                        batch: [1, 2, 8],
                        latent: [32, 64, 128],
                    },
                    dims,
                )
            });
            // Engines of this graph's contents only; no engine cache for an unlisted graph.
            let trt_cache_dir = match (&self.execution.trt_cache_dir, &content_id) {
                (Some(base), Some(id)) => Some(crate::cache::tensorrt_cache_dir(
                    base,
                    id,
                    self.execution.trt_fp16,
                    trt_profile.as_ref(),
                )),
                _ => None,
            };
            let execution = ExecutionConfig {
                no_prepacking: self.execution.no_prepacking || graph != Graph::Unet,
                trt_profile,
                trt_cache_dir,
                ..self.execution.clone()
            };
            let session = create_session_cached(
                self.env,
                &self.bundle.graph_path(graph),
                content_id.as_deref(),
                &execution,
            )?;
            check_session(graph.spec(), &session, self.bundle.dims())?;
            self.sessions.insert(graph, session);
            self.timings
                .add(&format!("load {}", graph.file_name()), start);
        }
        Ok(self.sessions.get_mut(&graph).expect("inserted above"))
    }

    /// Runs a graph and returns its one f32 output, checked for rank and finiteness.
    fn run<D: Dimension>(
        &mut self,
        graph: Graph,
        inputs: Vec<Input<'_>>,
        output: &'static str,
    ) -> Result<Array<f32, D>> {
        let session = self.session(graph)?;
        let outputs = session.run(inputs).map_err(ort_err(graph, "run"))?;
        output_array::<D>(&outputs, graph, output)
    }

    /// Creates every session the given work needs up front (so load time is not counted later).
    pub fn preload(&mut self, graphs: &[Graph]) -> Result<()> {
        for &g in graphs {
            self.session(g)?;
        }
        Ok(())
    }

    /// Drops a session to return its memory (the concept graphs before denoising).
    pub fn release(&mut self, graph: Graph) {
        self.sessions.remove(&graph);
    }

    /// Preprocesses the subject image (and mask) and encodes the concept.
    pub fn encode_concept(&mut self, image: &Path, mask: Option<&Path>) -> Result<Concept> {
        let start = Instant::now();
        let dims = *self.bundle.dims();
        let rgb = preprocess::load_rgb(image)?;
        let mask01 = match mask {
            Some(m) => Some(preprocess::load_mask(m, rgb.width(), rgb.height())?),
            None => None,
        };
        let params = preprocess::PreprocessParams {
            size: dims.image_size as u32,
            grid: dims.patch_grid as u32,
            mean: self.bundle.image_mean().map(|v| v as f32),
            std: self.bundle.image_std().map(|v| v as f32),
        };
        let inputs = preprocess::ConceptInputs::new(&rgb, mask01.as_ref(), &params)?;
        self.timings.add("preprocess", start);
        let source = ConceptSource {
            bundle: self.bundle.name().to_string(),
            image_sha256: crate::bundle::sha256_file(image).unwrap_or_default(),
            mask_sha256: mask.and_then(|m| crate::bundle::sha256_file(m).ok()),
            image_name: image
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default(),
            preprocessing: format!(
                "Pillow-bicubic squash to {0}x{0}, mean {1:?}, std {2:?}, mask grid {3}x{3}{4}",
                params.size,
                params.mean,
                params.std,
                params.grid,
                if mask.is_some() {
                    ""
                } else {
                    " (no mask: whole image)"
                }
            ),
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
        let pixels = ndarray::stack(Axis(0), &[global.view(), local.view()])
            .map_err(|e| invalid("concept image", e.to_string()))?;
        let g = Graph::ImageEncoder;
        let features: Array4<f32> = self.run(
            g,
            vec![input(g, "pixel_values", pixels.view())?],
            "image_features",
        )?;
        let expected = features_dims(self.bundle.dims(), 2);
        if features.shape() != expected {
            return Err(Error::BadOutput {
                graph: g.file_name(),
                tensor: "image_features",
                message: format!("has shape {:?}, expected {expected:?}", features.shape()),
            });
        }
        // Row 0: the whole image (global path); row 1: image × mask (local path).
        let global_feats = features.slice(s![0..1, .., .., ..]);
        let local_feats = features.slice(s![1..2, .., .., ..]);
        let g = Graph::GlobalMapper;
        let words: Array3<f32> = self.run(
            g,
            vec![input(g, "image_features", global_feats)?],
            "word_embeddings",
        )?;
        let mask = mask_grid.view().insert_axis(Axis(0));
        let g = Graph::LocalMapper;
        let locals: Array3<f32> = self.run(
            g,
            vec![
                input(g, "image_features", local_feats)?,
                input(g, "mask", mask)?,
            ],
            "local_embeddings",
        )?;
        self.timings.add("encode concept", start);
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

    /// Text encoder at batch N: `inj_index[i] = -1` means no injection for row i.
    pub fn encode_text(
        &mut self,
        ids: &[TokenIds],
        inj_embedding: ArrayView2<f32>,
        inj_index: &[i64],
    ) -> Result<Array3<f32>> {
        let g = Graph::TextEncoder;
        let flat: Vec<i64> = ids.iter().flat_map(|r| r.iter().copied()).collect();
        let ids = Array2::from_shape_vec((ids.len(), self.bundle.dims().max_tokens), flat)
            .map_err(|e| invalid("input ids", e.to_string()))?;
        let index = ArrayView1::from(inj_index);
        self.run(
            g,
            vec![
                input(g, "input_ids", ids.view())?,
                input(g, "inj_embedding", inj_embedding)?,
                input(g, "inj_index", index)?,
            ],
            "last_hidden_state",
        )
    }

    /// Tokenizes the prompt and finds the placeholder's token index.
    pub fn tokenize(
        &self,
        prompt: &str,
        placeholder: &str,
        truncate: bool,
    ) -> Result<(TokenIds, usize)> {
        let ids = self.tokenizer.encode(prompt, truncate)?;
        let index = self.tokenizer.locate_placeholder(&ids, placeholder)?;
        Ok((ids, index))
    }

    /// Text encoding for a prompt: `(cond [1,77,C], uncond [1,77,C])` in one batch-2 call.
    pub fn prompt_embeddings(
        &mut self,
        concept: &Concept,
        ids: &TokenIds,
        index: usize,
    ) -> Result<(Array3<f32>, Array3<f32>)> {
        let start = Instant::now();
        let empty = self.tokenizer.encode("", false)?;
        let word = concept.word();
        let inj = ndarray::stack(Axis(0), &[word, Array1::zeros(word.len()).view()])
            .map_err(|e| invalid("word embedding", e.to_string()))?;
        let both = self.encode_text(&[*ids, empty], inj.view(), &[index as i64, -1])?;
        self.timings.add("encode text", start);
        Ok((
            both.slice(s![0..1, .., ..]).to_owned(),
            both.slice(s![1..2, .., ..]).to_owned(),
        ))
    }

    fn initial_latents(
        &self,
        options: &GenerateOptions,
        scheduler: &LmsScheduler,
    ) -> Result<Array4<f32>> {
        let shape = options.latent_shape(&self.bundle);
        let noise = match &options.init_noise {
            Some(n) => n.clone(), // shape checked by validate()
            None => {
                let numel = shape.iter().product();
                Array4::from_shape_vec(shape, torch_randn(options.seed, numel))
                    .map_err(|e| invalid("noise", e.to_string()))?
            }
        };
        let sigma = scheduler.init_noise_sigma();
        Ok(noise.mapv(|v| v * sigma))
    }

    /// Runs the whole generation for a concept.
    pub fn generate(
        &mut self,
        concept: &Concept,
        options: &GenerateOptions,
        on_progress: &mut dyn FnMut(Progress),
    ) -> Result<Generation> {
        let (latents, trace) = self.generate_latents(concept, options, on_progress)?;
        let images = self.decode(&latents)?;
        Ok(Generation { images, trace })
    }

    /// [`Elite::generate`] up to the final latents (not yet divided by the VAE scaling factor),
    /// for callers that free the text encoder and UNet sessions before [`Elite::decode`].
    pub fn generate_latents(
        &mut self,
        concept: &Concept,
        options: &GenerateOptions,
        on_progress: &mut dyn FnMut(Progress),
    ) -> Result<(Array4<f32>, Trace)> {
        options.validate(&self.bundle)?;
        let (ids, index) =
            self.tokenize(&options.prompt, &options.placeholder, options.truncate)?;
        let (cond, uncond) = self.prompt_embeddings(concept, &ids, index)?;
        let mut scheduler = scheduler_config(&self.bundle).build(options.steps)?;
        let latents = self.initial_latents(options, &scheduler)?;
        let mut trace = Trace {
            input_ids: ids.to_vec(),
            placeholder_index: index,
            text_cond: Some(cond.clone()),
            text_uncond: Some(uncond.clone()),
            init_latents: Some(latents.clone()),
            latents: BTreeMap::new(),
        };
        let latents = self.denoise(
            concept,
            &cond,
            &uncond,
            index,
            latents,
            options,
            &mut scheduler,
            &mut trace,
            on_progress,
        )?;
        Ok((latents, trace))
    }

    /// The LMS loop with classifier-free guidance (see [`CfgMode`]).
    ///
    /// Constant inputs (text embeddings, local embeddings, placeholder index, λ) are built and
    /// bound once per UNet call shape through an [`IoBinding`]: ONNX Runtime copies them to the
    /// execution provider's device when they are bound, not on every step. Per step only the
    /// scaled latents and the timestep are bound, and the output is read in place.
    #[allow(clippy::too_many_arguments)]
    pub fn denoise(
        &mut self,
        concept: &Concept,
        cond: &Array3<f32>,
        uncond: &Array3<f32>,
        index: usize,
        mut latents: Array4<f32>,
        options: &GenerateOptions,
        scheduler: &mut LmsScheduler,
        trace: &mut Trace,
        on_progress: &mut dyn FnMut(Progress),
    ) -> Result<Array4<f32>> {
        let start = Instant::now();
        let (b, c, h, w) = latents.dim();
        let g = Graph::Unet;
        // One UNet call per entry; each lists its row blocks as (text embeddings, λ).
        let calls: Vec<Vec<(&Array3<f32>, f32)>> = match self.cfg {
            CfgMode::Batched => vec![vec![(cond, options.lambda), (uncond, 0.0)]],
            CfgMode::Split => vec![vec![(cond, options.lambda)], vec![(uncond, 0.0)]],
        };
        let mut bindings = Vec::with_capacity(calls.len());
        for blocks in &calls {
            let batch = GuidanceBatch::new(b, blocks, &concept.local_embeddings, index)?;
            let rows = batch.rows();
            bindings.push((batch.bind(self.session(g)?)?, rows));
        }
        let guidance = options.guidance;
        let steps = scheduler.len();
        // eps rows: 0..B conditional, B..2B unconditional, whichever way the calls split them.
        let mut eps = Array4::<f32>::zeros((2 * b, c, h, w));
        for k in 0..steps {
            let step_start = Instant::now();
            let mut scaled = latents.clone();
            scheduler.scale_model_input(k, scaled.as_slice_mut().expect("standard layout"));
            let t = scheduler.timesteps()[k];
            let mut row = 0;
            for (binding, rows) in &mut bindings {
                let rows = *rows;
                // Per step only the sample and the timestep change.
                let sample = scaled
                    .broadcast((rows / b, b, c, h, w))
                    .ok_or_else(|| invalid("latents", "cannot repeat".to_string()))?
                    .to_shape((rows, c, h, w))
                    .map_err(|e| invalid("latents", e.to_string()))?
                    .into_owned();
                binding
                    .bind_input("sample", &owned(g, sample)?)
                    .map_err(ort_err(g, "bind"))?;
                binding
                    .bind_input("timestep", &owned(g, Array1::from_elem(rows, t))?)
                    .map_err(ort_err(g, "bind"))?;
                let session = self.session(g)?;
                let out = session.run_binding(binding).map_err(ort_err(g, "run"))?;
                let view = output_view(&out, g, "noise_pred")?
                    .into_dimensionality::<Ix4>()
                    .map_err(|e| Error::BadOutput {
                        graph: g.file_name(),
                        tensor: "noise_pred",
                        message: e.to_string(),
                    })?;
                eps.slice_mut(s![row..row + rows, .., .., ..]).assign(&view);
                row += rows;
            }
            let eps_cond = eps.slice(s![0..b, .., .., ..]);
            let eps_uncond = eps.slice(s![b.., .., .., ..]);
            // Reference order: uncond + g · (cond − uncond), in f32.
            let guided = ndarray::Zip::from(&eps_cond)
                .and(&eps_uncond)
                .map_collect(|&ec, &eu| eu + guidance * (ec - eu));
            scheduler.step(
                k,
                guided.as_slice().expect("standard layout"),
                latents.as_slice_mut().expect("standard layout"),
            )?;
            self.timings.denoise_steps.push(step_start.elapsed());
            let done = k + 1;
            if options.record_steps.contains(&done) || done == steps {
                trace.latents.insert(done, latents.clone());
            }
            on_progress(Progress { step: done, steps });
        }
        self.timings.add("denoise", start);
        Ok(latents)
    }

    /// How guidance calls the UNet (see [`CfgMode`]).
    pub fn cfg_mode(&self) -> CfgMode {
        self.cfg
    }

    /// VAE decode of final latents `[B, 4, h, w]` to RGB8 images.
    pub fn decode(&mut self, latents: &Array4<f32>) -> Result<Vec<RgbImage>> {
        let start = Instant::now();
        let scale = self.bundle.vae_scaling_factor() as f32;
        let scaled = latents.mapv(|v| v / scale);
        let g = Graph::VaeDecoder;
        let decoded: Array4<f32> =
            self.run(g, vec![input(g, "latent_sample", scaled.view())?], "sample")?;
        let images = decoded.outer_iter().map(to_rgb8).collect();
        self.timings.add("decode", start);
        Ok(images)
    }
}

fn features_dims(d: &crate::bundle::Dims, batch: usize) -> [usize; 4] {
    [batch, 5, d.patch_grid * d.patch_grid + 1, d.image_hidden]
}

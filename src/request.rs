//! A generation request as a caller states it ([`GenerateRequest`]: plain data, built the same
//! way by the CLI and the server) and as the engine accepts it ([`ValidRequest`]: checked once,
//! tokenized once, holding the token ids and the placeholder index).
//!
//! Errors name the request's fields (`steps`, `num_images`), not the CLI's flags: the CLI maps
//! fields to flags, the server to JSON field names.

use ndarray::Array4;

use crate::bundle::Bundle;
use crate::error::{invalid, Result};
use crate::memory::RunShape;
use crate::scheduler::SchedulerKind;
use crate::tokenizer::{ClipTokenizer, TokenIds};

/// The largest images a request may ask for and how many per request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RequestLimits {
    /// Largest height or width in pixels.
    pub max_side: usize,
    /// Most images per request (`num_images`).
    pub max_images: usize,
}

impl Default for RequestLimits {
    fn default() -> Self {
        RequestLimits {
            max_side: crate::limits::MAX_IMAGE_SIDE,
            max_images: 64,
        }
    }
}

impl RequestLimits {
    /// The defaults for a device: TensorRT builds its engines for the whole range of sizes it
    /// may see (its optimisation profile), so it gets SD's usual 64²..1024² instead of 4096².
    pub fn for_device(device: crate::runtime::Device) -> RequestLimits {
        match device {
            crate::runtime::Device::TensorRt => RequestLimits {
                max_side: 1024,
                ..RequestLimits::default()
            },
            _ => RequestLimits::default(),
        }
    }
}

/// Everything one generation needs besides the concept. Build with [`GenerateRequest::new`]
/// (the bundle's defaults), adjust fields, then validate with the engine.
#[derive(Debug, Clone)]
pub struct GenerateRequest {
    pub prompt: String,
    pub placeholder: String,
    /// The sampler (the bundle's, LMS, by default); the job owns its own instance.
    pub scheduler: SchedulerKind,
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
    /// Unscaled initial noise `[n, 4, h, w]` (diffusers' `latents=`): replaces the seeded noise.
    pub init_noise: Option<Array4<f32>>,
    /// Steps (1-based) after which to keep a copy of the latents in the trace.
    pub record_steps: Vec<usize>,
}

impl GenerateRequest {
    /// A request with the bundle's defaults (its scheduler and step count) and seed 42 (the
    /// official scripts').
    pub fn new(prompt: impl Into<String>, bundle: &Bundle) -> Self {
        let d = bundle.defaults();
        Self {
            prompt: prompt.into(),
            placeholder: d.placeholder.clone(),
            scheduler: bundle.scheduler().kind,
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

    /// `[n, latent_channels, h / 8, w / 8]`.
    pub fn latent_shape(&self, bundle: &Bundle) -> [usize; 4] {
        let d = bundle.dims();
        [
            self.num_images,
            d.latent_channels,
            self.height / d.vae_scale_factor,
            self.width / d.vae_scale_factor,
        ]
    }

    /// Checks every field, tokenizes the prompt and finds the placeholder: the one validation
    /// of a request. Nothing runs a model.
    pub fn validate(
        self,
        bundle: &Bundle,
        tokenizer: &ClipTokenizer,
        limits: &RequestLimits,
    ) -> Result<ValidRequest> {
        self.check_numbers(bundle, limits)?;
        if self.placeholder.trim().is_empty() {
            return Err(invalid("placeholder", "must not be empty"));
        }
        let (input_ids, placeholder_index) =
            tokenizer.tokenize(&self.prompt, &self.placeholder, self.truncate)?;
        let latent_shape = self.latent_shape(bundle);
        if let Some(noise) = &self.init_noise {
            check_init_noise(noise, latent_shape)?;
        }
        Ok(ValidRequest {
            request: self,
            input_ids,
            placeholder_index,
            latent_shape,
        })
    }

    fn check_numbers(&self, bundle: &Bundle, limits: &RequestLimits) -> Result<()> {
        let train = bundle.scheduler().num_train_timesteps;
        if self.steps == 0 || self.steps > train {
            return Err(invalid(
                "steps",
                format!("must be 1..={train}, got {}", self.steps),
            ));
        }
        let max_guidance = crate::limits::MAX_GUIDANCE as f32;
        if !self.guidance.is_finite() || !(0.0..=max_guidance).contains(&self.guidance) {
            return Err(invalid(
                "guidance",
                format!(
                    "must be a number in 0..={max_guidance}, got {}",
                    self.guidance
                ),
            ));
        }
        let max_lambda = crate::limits::MAX_LAMBDA as f32;
        if !self.lambda.is_finite() || !(0.0..=max_lambda).contains(&self.lambda) {
            return Err(invalid(
                "lambda",
                format!("must be a number in 0..={max_lambda}, got {}", self.lambda),
            ));
        }
        let m = bundle.dims().size_multiple;
        for (name, v) in [("height", self.height), ("width", self.width)] {
            if v == 0 || v % m != 0 || v > limits.max_side {
                return Err(invalid(
                    name,
                    format!(
                        "must be a positive multiple of {m} up to {}, got {v}",
                        limits.max_side
                    ),
                ));
            }
        }
        if self.num_images == 0 || self.num_images > limits.max_images {
            return Err(invalid(
                "num_images",
                format!("must be 1..={}, got {}", limits.max_images, self.num_images),
            ));
        }
        if let Some(&k) = self
            .record_steps
            .iter()
            .find(|&&k| k == 0 || k > self.steps)
        {
            return Err(invalid(
                "record_steps",
                format!("step {k} is outside 1..={}", self.steps),
            ));
        }
        Ok(())
    }
}

/// What validation needs, apart from the engine: a server validates requests on its HTTP
/// threads with a clone of this, before anything is queued for the model thread.
#[derive(Debug, Clone)]
pub struct Validator {
    bundle: Bundle,
    tokenizer: ClipTokenizer,
    limits: RequestLimits,
    run: RunShape,
}

impl Validator {
    pub fn new(
        bundle: Bundle,
        tokenizer: ClipTokenizer,
        limits: RequestLimits,
        run: RunShape,
    ) -> Validator {
        Validator {
            bundle,
            tokenizer,
            limits,
            run,
        }
    }

    pub fn bundle(&self) -> &Bundle {
        &self.bundle
    }

    pub fn limits(&self) -> &RequestLimits {
        &self.limits
    }

    /// A request with the bundle's defaults.
    pub fn request(&self, prompt: impl Into<String>) -> GenerateRequest {
        GenerateRequest::new(prompt, &self.bundle)
    }

    /// The step count a request with `scheduler` gets when it names none: the bundle's for its
    /// own scheduler (ELITE's 100 LMS steps), else the scheduler's documented default.
    pub fn default_steps(&self, scheduler: SchedulerKind) -> usize {
        default_steps(&self.bundle, scheduler)
    }

    /// The request's checks, then its memory against what the machine has left.
    pub fn validate(&self, request: GenerateRequest) -> Result<ValidRequest> {
        let valid = request.validate(&self.bundle, &self.tokenizer, &self.limits)?;
        crate::memory::check(&crate::memory::estimate(&self.bundle, &[&valid], self.run))?;
        Ok(valid)
    }
}

/// See [`Validator::default_steps`].
pub fn default_steps(bundle: &Bundle, scheduler: SchedulerKind) -> usize {
    if scheduler == bundle.scheduler().kind {
        bundle.defaults().steps
    } else {
        scheduler.default_steps()
    }
}

fn check_init_noise(noise: &Array4<f32>, latent_shape: [usize; 4]) -> Result<()> {
    if noise.shape() != latent_shape {
        return Err(invalid(
            "init_latents",
            format!(
                "shape {:?}, expected {latent_shape:?} for this size and number of images",
                noise.shape()
            ),
        ));
    }
    if noise.iter().any(|v| !v.is_finite()) {
        return Err(invalid("init_latents", "contains NaN or infinity"));
    }
    Ok(())
}

/// A request that passed [`GenerateRequest::validate`], with its tokens.
#[derive(Debug, Clone)]
pub struct ValidRequest {
    request: GenerateRequest,
    input_ids: TokenIds,
    placeholder_index: usize,
    latent_shape: [usize; 4],
}

impl ValidRequest {
    pub fn request(&self) -> &GenerateRequest {
        &self.request
    }

    pub fn input_ids(&self) -> &TokenIds {
        &self.input_ids
    }

    /// Token index of the placeholder (start token = 0).
    pub fn placeholder_index(&self) -> usize {
        self.placeholder_index
    }

    /// `[n, 4, h / 8, w / 8]`.
    pub fn latent_shape(&self) -> [usize; 4] {
        self.latent_shape
    }

    pub fn steps(&self) -> usize {
        self.request.steps
    }

    pub fn scheduler(&self) -> SchedulerKind {
        self.request.scheduler
    }

    pub fn guidance(&self) -> f32 {
        self.request.guidance
    }

    pub fn lambda(&self) -> f32 {
        self.request.lambda
    }

    pub fn seed(&self) -> u64 {
        self.request.seed
    }

    pub fn num_images(&self) -> usize {
        self.request.num_images
    }

    pub fn record_steps(&self) -> &[usize] {
        &self.request.record_steps
    }

    /// Sets the unscaled initial noise (`[n, 4, h, w]`, finite), replacing the seeded noise.
    pub fn set_init_noise(&mut self, noise: Array4<f32>) -> Result<()> {
        check_init_noise(&noise, self.latent_shape)?;
        self.request.init_noise = Some(noise);
        Ok(())
    }

    pub(crate) fn take_init_noise(&mut self) -> Option<Array4<f32>> {
        self.request.init_noise.take()
    }
}

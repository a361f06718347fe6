//! The bounds this runtime puts on the values it reads, in one place (the README lists them).
//!
//! A bundle's manifest sizes every buffer the runtime allocates, so each dimension is bounded
//! when the bundle opens: wide enough for every Stable Diffusion and CLIP model in use, narrow
//! enough that no buffer sized by them can exhaust memory. File size caps are with the file
//! kinds, in [`crate::files`].

/// Largest text or image hidden width (`dims.text_hidden`, `dims.image_hidden`): SD v1's text
/// width is 768, SDXL's 2048; CLIP ViT-L's image width 1024, ViT-bigG's 1664.
pub const MAX_HIDDEN: usize = 8192;
/// Largest CLIP input side (`dims.image_size`): 224 for ViT-L/14, 336 for its @336 variant.
pub const MAX_CLIP_IMAGE_SIZE: usize = 1024;
/// Largest CLIP patch grid side (`dims.patch_grid`): 16 for ViT-L/14 at 224, 24 at 336.
pub const MAX_PATCH_GRID: usize = 64;
/// Largest `dims.latent_channels`: 4 for SD v1/v2/XL, 16 for SD3 and Flux.
pub const MAX_LATENT_CHANNELS: usize = 64;
/// Largest `dims.vae_scale_factor` (8 for every SD VAE).
pub const MAX_VAE_SCALE_FACTOR: usize = 64;
/// Largest output side in pixels (`defaults.height/width`, `--height/--width`).
pub const MAX_IMAGE_SIDE: usize = 4096;
/// Largest `scheduler.num_train_timesteps` (1000 for SD); the scheduler's tables are this long.
pub const MAX_TRAIN_TIMESTEPS: usize = 10_000;
/// Largest CLIP layer index in `clip_layers` (ViT-L has 24 layers, ViT-bigG 48).
pub const MAX_CLIP_LAYER: usize = 64;
/// Largest guidance scale (`defaults.guidance_scale`, `--guidance`).
pub const MAX_GUIDANCE: f64 = 100.0;
/// Largest λ (`defaults.lambda_*`, `--lambda`).
pub const MAX_LAMBDA: f64 = 10.0;
/// Bounds of `vae_scaling_factor` (SD v1 0.18215, SDXL 0.13025, SD3 1.5305): latents are
/// divided by it, so a tiny one would blow them up.
pub const VAE_SCALING_FACTOR: (f64, f64) = (1e-3, 100.0);
/// Bounds of each `image_std` entry (CLIP's are about 0.27): pixels in 0..1 are divided by it.
pub const IMAGE_STD: (f64, f64) = (1e-3, 1.0);
/// Most files a manifest may list (a bundle has 7 or 8).
pub const MAX_LISTED_FILES: usize = 64;
/// Longest bundle name, in bytes.
pub const MAX_NAME_BYTES: usize = 256;
/// Longest placeholder word, in bytes (it must be one CLIP token anyway).
pub const MAX_PLACEHOLDER_BYTES: usize = 64;
/// Largest magnitude accepted in a concept's embeddings or in initial latents. Embeddings in
/// CLIP's text space and unscaled Gaussian noise are of order 1 (|x| > 10 has probability
/// 1e-23 for N(0, 1)); values this far beyond are not such data, and would only come back as a
/// graph's "NaN or infinity" output blamed on the graph instead of the file.
pub const MAX_ABS_VALUE: f32 = 1e4;

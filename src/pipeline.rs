//! The ELITE generation pipeline: text encoding with injection, batched classifier-free guidance with lambda, LMS denoising, VAE decode.

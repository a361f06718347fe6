//! elite-ort: ELITE (Wei et al., ICCV 2023) on ONNX Runtime.
//!
//! The module list reads like the pipeline: a bundle of graphs is loaded into ONNX Runtime
//! sessions, the prompt is tokenized, the concept image decoded (as Pillow decodes it) and preprocessed and encoded, noise drawn,
//! the LMS scheduler steps the latents and the result is written out.

pub mod bundle;
pub mod cache;
pub mod concept;
pub mod error;
pub mod files;
pub mod graphs;
pub mod image_decode;
pub mod jpeg;
pub mod mask;
pub mod noise;
pub mod output;
pub mod pipeline;
pub mod preprocess;
pub mod runtime;
pub mod scheduler;
pub mod tokenizer;

#[cfg(test)]
mod test_support;

//! elite-ort: ELITE (Wei et al., ICCV 2023) on ONNX Runtime.
//!
//! The module list reads like the pipeline: a bundle of graphs is loaded into ONNX Runtime
//! sessions, the prompt is tokenized, the concept image preprocessed and encoded, noise drawn,
//! a scheduler (LMS, ELITE's, by default) steps the latents and the result is written out.

pub mod bundle;
pub mod cache;
pub mod concept;
pub mod error;
pub mod files;
pub mod graphs;
pub mod noise;
pub mod output;
pub mod pipeline;
pub mod preprocess;
pub mod runtime;
pub mod scheduler;
pub mod tokenizer;

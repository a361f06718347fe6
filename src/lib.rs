//! elite-ort: ELITE (Wei et al., ICCV 2023) on ONNX Runtime.
//!
//! The module list reads like the runtime: a bundle of graphs is loaded into ONNX Runtime
//! sessions; a request is validated and tokenized; the concept image is decoded (as Pillow
//! decodes it), preprocessed and encoded; each generation is a job with its own scheduler (LMS,
//! ELITE's, by default) and noise; the engine runs the rows of many jobs in each UNet call
//! (step-level batching) and writes the results out.
//!
//! ```no_run
//! use std::sync::Arc;
//! use elite_ort::engine::{Engine, EngineConfig};
//! use elite_ort::request::GenerateRequest;
//! use elite_ort::job::Outcome;
//!
//! # fn main() -> elite_ort::error::Result<()> {
//! let mut engine = Engine::open("onnx/tiny", &EngineConfig::default())?;
//! let concept = Arc::new(engine.encode_concept("cat.png".as_ref(), None)?);
//! for prompt in ["a photo of S on the beach", "a painting of S"] {
//!     let mut request = GenerateRequest::new(prompt, engine.bundle());
//!     request.steps = 25;
//!     let request = engine.validate(request)?;
//!     let job = engine.new_job(request, concept.clone())?;
//!     engine.submit(job);
//! }
//! engine.run_until_idle(&|| false); // both jobs share every UNet call
//! for finished in engine.take_finished() {
//!     if let Outcome::Done(generation) = finished.outcome {
//!         println!("{}: {} images", finished.id, generation.images.len());
//!     }
//! }
//! # Ok(())
//! # }
//! ```

pub mod attention_maps;
pub mod batch;
pub mod bundle;
pub mod cache;
pub mod call_size;
pub mod concept;
pub mod display;
pub mod engine;
pub mod error;
pub mod files;
pub mod graphs;
pub mod guidance;
pub mod heatmap;
pub mod image_decode;
pub mod job;
pub mod jpeg;
pub mod latents_file;
pub mod limits;
pub mod map_output;
pub mod mask;
pub mod memory;
pub mod noise;
pub mod openvino;
pub mod output;
pub mod preprocess;
pub mod request;
pub mod runtime;
pub mod scheduler;
pub mod server;
pub mod sessions;
pub mod tokenizer;

#[cfg(test)]
mod test_support;

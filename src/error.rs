//! Library-level error type: wraps each module's own error so the CLI can report one thing.

use crate::bundle::BundleError;
use crate::concept::ConceptError;
use crate::graphs::GraphError;
use crate::latents_file::LatentsError;
use crate::noise::NoiseError;
use crate::output::OutputError;
use crate::preprocess::PreprocessError;
use crate::runtime::RuntimeError;
use crate::scheduler::SchedulerError;
use crate::tokenizer::TokenizerError;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Bundle(#[from] BundleError),
    #[error(transparent)]
    Runtime(#[from] RuntimeError),
    #[error(transparent)]
    Graph(#[from] GraphError),
    #[error(transparent)]
    Tokenizer(#[from] TokenizerError),
    #[error(transparent)]
    Preprocess(#[from] PreprocessError),
    #[error(transparent)]
    Scheduler(#[from] SchedulerError),
    #[error(transparent)]
    Noise(#[from] NoiseError),
    #[error(transparent)]
    Concept(#[from] ConceptError),
    #[error(transparent)]
    Output(#[from] OutputError),
    /// `--init-latents` is not a usable `.npy` file (see [`crate::latents_file`]).
    #[error(transparent)]
    Latents(#[from] LatentsError),
    /// An option value that cannot work (names the option and the accepted range).
    #[error("invalid {option}: {message}")]
    InvalidOption {
        option: &'static str,
        message: String,
    },
    /// ONNX Runtime failed while running a graph.
    #[error("{graph}: {action} failed: {source}")]
    Inference {
        graph: &'static str,
        action: &'static str,
        #[source]
        source: ort::Error,
    },
    /// A graph returned something other than what the contract promises.
    #[error("{graph}: output `{tensor}` {message}")]
    BadOutput {
        graph: &'static str,
        tensor: &'static str,
        message: String,
    },
    /// `--init-latents` could not be read or has the wrong shape.
    #[error("{path}: {message}")]
    InitLatents { path: String, message: String },
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

pub(crate) fn invalid(option: &'static str, message: impl Into<String>) -> Error {
    Error::InvalidOption {
        option,
        message: message.into(),
    }
}

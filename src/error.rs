//! Library-level error type: wraps each module's own error so the CLI can report one thing, with
//! a [`ErrorKind`] that says whose fault it is (the CLI maps it to a message, the server to an
//! HTTP status) and, for a bad request, the request field at fault.

use crate::bundle::BundleError;
use crate::concept::ConceptError;
use crate::graphs::GraphError;
use crate::image_decode::DecodeError;
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
    Image(#[from] DecodeError),
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
    /// A request field whose value cannot work (names the field and the accepted range).
    #[error("invalid `{field}`: {message}")]
    InvalidRequest {
        field: &'static str,
        message: String,
    },
    /// The job was cancelled (its listener went away, a deadline, a shutdown).
    #[error("cancelled")]
    Cancelled,
    /// One error that failed several jobs (every job gets the same error).
    #[error(transparent)]
    Shared(std::sync::Arc<Error>),
    /// A broken internal invariant: a bug, never the caller's fault.
    #[error("internal error: {0}")]
    Internal(String),
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
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Whose fault an error is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// The request (its fields, images, concept, prompt) cannot be served as given.
    InvalidRequest,
    /// The engine cannot serve anything like it now: bundle, ONNX Runtime, provider, cache.
    Unavailable,
    /// The job was cancelled.
    Cancelled,
    /// A failure inside a graph run or a broken invariant.
    Internal,
}

impl Error {
    pub fn kind(&self) -> ErrorKind {
        use crate::tokenizer::TokenizerError as T;
        match self {
            Error::InvalidRequest { .. }
            | Error::Image(_)
            | Error::Preprocess(_)
            | Error::Concept(_)
            | Error::Output(_)
            | Error::Latents(_)
            | Error::Tokenizer(
                T::PromptTooLong { .. }
                | T::PlaceholderAbsent { .. }
                | T::PlaceholderNotOneToken { .. }
                | T::PlaceholderIsSpecial { .. }
                | T::Encode { .. },
            ) => ErrorKind::InvalidRequest,
            Error::Bundle(_) | Error::Runtime(_) | Error::Graph(_) | Error::Tokenizer(_) => {
                ErrorKind::Unavailable
            }
            Error::Cancelled => ErrorKind::Cancelled,
            Error::Shared(e) => e.kind(),
            Error::Scheduler(_)
            | Error::Noise(_)
            | Error::Inference { .. }
            | Error::BadOutput { .. }
            | Error::Internal(_) => ErrorKind::Internal,
        }
    }

    /// The request field at fault, for errors of kind [`ErrorKind::InvalidRequest`] that have one.
    pub fn field(&self) -> Option<&'static str> {
        use crate::tokenizer::TokenizerError as T;
        match self {
            Error::InvalidRequest { field, .. } => Some(field),
            Error::Shared(e) => e.field(),
            Error::Image(e) => Some(match e.role() {
                Some(crate::image_decode::Role::Mask) => "mask",
                _ => "image",
            }),
            Error::Latents(_) => Some("init_latents"),
            Error::Tokenizer(T::PlaceholderNotOneToken { .. } | T::PlaceholderIsSpecial { .. }) => {
                Some("placeholder")
            }
            Error::Tokenizer(
                T::PromptTooLong { .. } | T::PlaceholderAbsent { .. } | T::Encode { .. },
            ) => Some("prompt"),
            _ => None,
        }
    }
}

/// An [`Error::InvalidRequest`] for `field`.
pub(crate) fn invalid(field: &'static str, message: impl Into<String>) -> Error {
    Error::InvalidRequest {
        field,
        message: message.into(),
    }
}

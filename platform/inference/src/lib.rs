//! Model serving. Loads ONNX models into ONNX Runtime sessions (through `ort`, with the runtime library
//! loaded from a path, never downloaded), tokenizes text off the async runtime, and feeds each model's
//! sessions from a batcher so that concurrent calls share one run.
//!
//! Only this crate knows ort.

mod arena;
mod batcher;
mod catalog;
mod engine;
mod scheduler;
mod screen;
mod tensor;
/// Where a request's time went (shared with the ledger, which times itself too).
pub use plinth_core::timing;
mod tokenizer;

pub use catalog::{BASE_MODEL, Catalog, Tier, builtin_embedding_files, load_builtin};
pub use engine::{
    Embedder, Engine, EngineSettings, ExecutionProvider, LoadedModel, MAX_TEXTS, ModelFiles, cache_dir,
    check_tensors, check_texts, fetched_ort_dylib, lower_this_thread_priority,
};
pub use scheduler::{Scheduling, Share};
pub use tensor::{DataType, Tensor, TensorData};

/// Why an inference call failed.
#[derive(Debug, thiserror::Error)]
pub enum InferenceError {
    /// The caller's input does not fit the model (shape, datatype, count, length).
    #[error("{0}")]
    InvalidInput(String),
    /// The model cannot do what was asked (e.g. classify with an embedding model).
    #[error("{0}")]
    WrongTask(String),
    /// Too many calls queued for this model, or other tenants' models held the run memory for as long
    /// as the caller waits; retry shortly.
    #[error("the model cannot take the call now; retry shortly")]
    Overloaded,
    /// The tenant has this many calls queued for the model already, its most; retry shortly.
    #[error("this tenant already has {0} calls waiting for the model, its most; retry shortly")]
    TenantQueueFull(usize),
    /// The call waited longer than the configured timeout.
    #[error("inference timed out")]
    Timeout,
    /// The model file or manifest is unusable.
    #[error("{0}")]
    InvalidModel(String),
    /// ONNX Runtime or the runtime environment failed.
    #[error("{0}")]
    Runtime(String),
}

impl InferenceError {
    /// The API's code for this failure.
    #[must_use]
    pub fn code(&self) -> plinth_core::ErrorCode {
        use plinth_core::ErrorCode;
        match self {
            Self::InvalidInput(_) => ErrorCode::InvalidInput,
            Self::WrongTask(_) => ErrorCode::UnsupportedTask,
            Self::InvalidModel(_) => ErrorCode::InvalidModel,
            Self::Overloaded => ErrorCode::Overloaded,
            Self::TenantQueueFull(_) => ErrorCode::TenantQueueFull,
            Self::Timeout => ErrorCode::InferenceTimeout,
            Self::Runtime(_) => ErrorCode::Internal,
        }
    }

    /// The same failure for another caller of the same batch.
    pub(crate) fn for_another_caller(&self) -> Self {
        match self {
            Self::InvalidInput(message) => Self::InvalidInput(message.clone()),
            Self::WrongTask(message) => Self::WrongTask(message.clone()),
            Self::Overloaded => Self::Overloaded,
            Self::TenantQueueFull(most) => Self::TenantQueueFull(*most),
            Self::Timeout => Self::Timeout,
            Self::InvalidModel(message) => Self::InvalidModel(message.clone()),
            Self::Runtime(message) => Self::Runtime(message.clone()),
        }
    }
}

impl From<ort::Error> for InferenceError {
    fn from(err: ort::Error) -> Self {
        Self::Runtime(err.to_string())
    }
}

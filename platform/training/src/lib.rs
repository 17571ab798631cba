//! Fine-tuning, the parts that need no server: tenants' datasets parsed and checked, stratified
//! splits, a classification head trained over a base model's embeddings, its evaluation, and the
//! head appended to the base ONNX graph as one exportable model.

#![forbid(unsafe_code)]

pub mod dataset;
pub mod evaluate;
pub mod head;
pub mod onnx;
pub mod split;

pub use dataset::{DatasetError, Example, Format, Limits};
pub use head::{Checkpoint, Head, Settings};

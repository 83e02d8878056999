//! The Rust runtime: models on candle-core tensors, loaded from safetensors, with quantized
//! linear layers chosen at load time and a record of every layer's output for cross-validation.
pub mod bert;
pub mod layers;
pub mod multitask;
pub mod ops;
pub mod weights;

use crate::Error;

/// A candle error as a lowbit error (candle checks shapes and dtypes of every op).
pub(crate) fn ce(e: candle_core::Error) -> Error {
    Error::value(format!("runtime: {e}"))
}

/// Layer outputs by name, in the order the layers ran.
pub type Record = Vec<(String, candle_core::Tensor)>;

//! The Rust runtime: models on candle-core tensors, loaded from safetensors, with quantized
//! linear layers chosen at load time and a record of every layer's output for cross-validation.
pub mod bert;
mod inputs;
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

/// Pushes layer outputs onto a record when there is one (names built only then).
pub(crate) struct Recorder<'a>(pub Option<&'a mut Record>);

impl Recorder<'_> {
    pub fn add(&mut self, name: impl FnOnce() -> String, t: &candle_core::Tensor) {
        if let Some(r) = self.0.as_deref_mut() {
            r.push((name(), t.clone()));
        }
    }

    pub fn is_on(&self) -> bool {
        self.0.is_some()
    }
}

//! lowbit: low-bit quantization kernels with a thin Python layer (see `py`).

pub mod bitnet;
pub mod calib;
pub mod config;
pub mod error;
pub mod gguf;
pub mod isa;
pub mod names;
pub mod nas;
pub mod pool;
pub mod ptq;
pub mod quant;
pub mod runtime;

#[cfg(feature = "python")]
mod py;

pub use error::{Error, Result};

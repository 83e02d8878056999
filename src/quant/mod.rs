//! Affine quantization (per tensor / channel / group), fake-quant, bit packing and the
//! quantized safetensors format. Every kernel here is plain Rust over ndarray views.

pub mod affine;
pub mod checkpoint;
pub mod elem;
pub mod extremes;
pub mod integrity;
pub mod pack;
pub mod simd;
pub mod spec;

pub use affine::{
    dequantize_per_channel, dequantize_per_tensor, fake_quantize_per_channel,
    fake_quantize_per_tensor, quantize_per_channel, quantize_per_tensor, Code, LearnableGrad,
    QRange,
};
pub use elem::{Elem, Real};
pub use spec::{Granularity, QuantSpec, QuantizedTensor};

pub use simd::simd_level;

/// Elements per parallel task: large enough to amortise rayon, small enough to balance 2..64 cores.
pub(crate) const CHUNK: usize = 1 << 15;

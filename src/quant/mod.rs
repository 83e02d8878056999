//! Affine quantization (per tensor / channel / group), fake-quant, bit packing and the
//! quantized safetensors format. Every kernel here is plain Rust over ndarray views.

pub mod affine;
pub mod checkpoint;
pub mod elem;
pub mod pack;
pub mod spec;

pub use affine::{
    dequantize_per_channel, dequantize_per_tensor, fake_quantize_per_channel,
    fake_quantize_per_tensor, quantize_per_channel, quantize_per_tensor, Code, QRange,
};
pub use elem::{Elem, Real};
pub use spec::{Granularity, QuantSpec, QuantizedTensor};

/// The x86 instruction set the kernels use: 2 = AVX2 + FMA, 1 = SSE4.1, 0 = baseline.
/// `LOWBIT_SIMD=scalar|sse4.1|avx2` caps it (for tests of every path); read once.
pub fn simd_level() -> u8 {
    use std::sync::OnceLock;
    static LEVEL: OnceLock<u8> = OnceLock::new();
    *LEVEL.get_or_init(|| {
        #[cfg(target_arch = "x86_64")]
        let hw = if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma") {
            2
        } else if std::is_x86_feature_detected!("sse4.1") {
            1
        } else {
            0
        };
        #[cfg(not(target_arch = "x86_64"))]
        let hw = 0;
        let cap = match std::env::var("LOWBIT_SIMD").as_deref() {
            Ok("scalar") => 0,
            Ok("sse4.1") => 1,
            _ => 2,
        };
        hw.min(cap)
    })
}

/// Elements per parallel task: large enough to amortise rayon, small enough to balance 2..64 cores.
pub(crate) const CHUNK: usize = 1 << 15;

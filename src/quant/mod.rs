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

/// Runs `f` compiled with AVX2 when the CPU has it, so the generic loops inside inline into a
/// body that LLVM vectorizes with `vroundps`; elsewhere (NEON is baseline on aarch64) it runs as is.
#[inline(always)]
pub(crate) fn with_simd<R>(f: impl FnOnce() -> R) -> R {
    #[cfg(target_arch = "x86_64")]
    {
        #[target_feature(enable = "avx2,fma")]
        unsafe fn avx2<R>(f: impl FnOnce() -> R) -> R {
            f()
        }
        #[target_feature(enable = "sse4.1")]
        unsafe fn sse41<R>(f: impl FnOnce() -> R) -> R {
            f()
        }
        if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma") {
            // SAFETY: the CPU supports the features the function is compiled for.
            return unsafe { avx2(f) };
        }
        if std::is_x86_feature_detected!("sse4.1") {
            // SAFETY: as above.
            return unsafe { sse41(f) };
        }
    }
    f()
}

/// Elements per parallel task: large enough to amortise rayon, small enough to balance 2..64 cores.
pub(crate) const CHUNK: usize = 1 << 15;

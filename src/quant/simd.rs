//! Runtime instruction-set dispatch for generic kernels.
//!
//! A kernel is a value whose `run` is `#[inline(always)]` generic code; `dispatch` calls it
//! from a function compiled for AVX2 (or SSE4.1), so LLVM vectorizes the inlined body for that
//! target: `vroundps` instead of a `rintf`/`floor` call per element. aarch64 has NEON's `frintn`
//! and `frintm` as baseline and runs the portable copy.

/// A kernel invocation: everything it needs, consumed by `run`.
pub trait Kernel {
    type Output;
    fn run(self) -> Self::Output;
}

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

/// Runs `k` compiled for the best instruction set available (capped by `LOWBIT_SIMD`).
#[inline]
pub fn dispatch<K: Kernel>(k: K) -> K::Output {
    #[cfg(target_arch = "x86_64")]
    {
        #[target_feature(enable = "avx2,fma")]
        unsafe fn avx2<K: Kernel>(k: K) -> K::Output {
            k.run()
        }
        #[target_feature(enable = "sse4.1")]
        unsafe fn sse41<K: Kernel>(k: K) -> K::Output {
            k.run()
        }
        match simd_level() {
            // SAFETY: the CPU has AVX2 and FMA.
            2 => return unsafe { avx2(k) },
            // SAFETY: the CPU has SSE4.1.
            1 => return unsafe { sse41(k) },
            _ => {}
        }
    }
    k.run()
}

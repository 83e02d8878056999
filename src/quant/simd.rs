//! Runtime instruction-set dispatch for generic kernels.
//!
//! A kernel is a value whose `run` is `#[inline(always)]` generic code; `dispatch` calls it
//! from a function compiled for AVX-512, AVX2 (or SSE4.1), so LLVM vectorizes the inlined body for that
//! target: `vroundps` instead of a `rintf`/`floor` call per element. aarch64 has NEON's `frintn`,
//! `frintm` and `fmla` as baseline, so its portable copy is compiled with [`WithFma`]. Kernels
//! that must be bit-exact across machines (quantization, calibration) never call [`Isa::fma`];
//! the float runtime's `exp`/`erf` do, and agree across instruction sets to within rounding.

/// A kernel invocation: everything it needs, consumed by `run`.
pub trait Kernel {
    type Output;
    /// The kernel compiled for an instruction set whose fused multiply-add `S` names.
    fn run<S: Isa>(self) -> Self::Output;
}

/// What a kernel may ask of the instruction set it is compiled for.
pub trait Isa {
    /// `a * b + c`: one fused, singly rounded instruction where the CPU has FMA (inlined into
    /// an AVX2 + FMA function it vectorizes as `vfmadd`), a multiply and an add where not (a
    /// `mul_add` there would be a libm call per element).
    fn fma(a: f32, b: f32, c: f32) -> f32;
}

/// AVX2 + FMA on x86_64, and aarch64 (FMA is part of its base NEON).
pub struct WithFma;

/// The x86_64 baseline and SSE4.1.
pub struct NoFma;

impl Isa for WithFma {
    #[inline(always)]
    fn fma(a: f32, b: f32, c: f32) -> f32 {
        a.mul_add(b, c)
    }
}

impl Isa for NoFma {
    #[inline(always)]
    fn fma(a: f32, b: f32, c: f32) -> f32 {
        a * b + c
    }
}

/// The x86 instruction set these generic kernels use: 3 = AVX-512 (F/BW/VL/DQ, 512-bit
/// vectors), 2 = AVX2 + FMA (and AVX-VNNI, which adds nothing here), 1 = SSE4.1, 0 = baseline;
/// from [`crate::isa::level`] (so `LOWBIT_ISA` caps it).
pub fn simd_level() -> u8 {
    let l = crate::isa::level();
    if l == crate::isa::Level::Avx512Vnni {
        3
    } else if l.has_avx2() {
        2
    } else if l == crate::isa::Level::Sse41 {
        1
    } else {
        0
    }
}

/// Runs `k` compiled for the best instruction set available (capped by `LOWBIT_ISA`).
#[inline]
pub fn dispatch<K: Kernel>(k: K) -> K::Output {
    #[cfg(target_arch = "x86_64")]
    {
        #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,avx2,fma")]
        unsafe fn avx512<K: Kernel>(k: K) -> K::Output {
            k.run::<WithFma>()
        }
        #[target_feature(enable = "avx2,fma")]
        unsafe fn avx2<K: Kernel>(k: K) -> K::Output {
            k.run::<WithFma>()
        }
        #[target_feature(enable = "sse4.1")]
        unsafe fn sse41<K: Kernel>(k: K) -> K::Output {
            k.run::<NoFma>()
        }
        match simd_level() {
            // SAFETY: the CPU has AVX-512 F/BW/VL/DQ, AVX2 and FMA.
            3 => return unsafe { avx512(k) },
            // SAFETY: the CPU has AVX2 and FMA.
            2 => return unsafe { avx2(k) },
            // SAFETY: the CPU has SSE4.1.
            1 => return unsafe { sse41(k) },
            _ => {}
        }
        k.run::<NoFma>()
    }
    #[cfg(target_arch = "aarch64")]
    {
        k.run::<WithFma>()
    }
    #[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
    {
        k.run::<NoFma>()
    }
}

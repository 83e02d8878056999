//! Elementwise functions (exp, erf, tanh, the activations) and the vectorizing reductions the
//! row kernels share.
use crate::quant::simd::{dispatch, Isa, Kernel};
use crate::{Error, Result};
use rayon::prelude::*;

// ---------------------------------------------------------------------------------------------
// Elementwise functions written so that LLVM vectorizes them (no branches, no libm calls).

const LN2_HI: f32 = 0.693_359_4;
const LN2_LO: f32 = -2.121_944_4e-4;

/// e^x to about 2 ulp (Cephes' polynomial); 0 below -87.3, +inf above 88.7. `S` says whether
/// the polynomial's multiply-adds are fused (see `Isa`).
#[inline(always)]
pub fn exp<S: Isa>(x: f32) -> f32 {
    let xc = x.clamp(-87.3, 88.7);
    // Round to nearest with the 1.5 * 2^23 trick: `t`'s low mantissa bits then hold n as an
    // integer, which builds 2^n without a float-to-int conversion (all of it vectorizes).
    let t = S::fma(xc, std::f32::consts::LOG2_E, 12_582_912.0);
    let n = t - 12_582_912.0;
    let r = S::fma(-n, LN2_LO, S::fma(-n, LN2_HI, xc));
    let mut p = 1.987_569_1e-4_f32;
    for c in [
        1.398_199_9e-3,
        8.333_452e-3,
        4.166_579_6e-2,
        1.666_666_5e-1,
        0.5,
    ] {
        p = S::fma(p, r, c);
    }
    let y = S::fma(p, r * r, r) + 1.0;
    let two_n = f32::from_bits(t.to_bits().wrapping_sub(0x4B40_0000 - 127) << 23);
    let v = y * two_n;
    // Selects, not branches, so that loops over slices vectorize.
    let v = if x < -87.3 { 0.0 } else { v };
    if x > 88.7 {
        f32::INFINITY
    } else {
        v
    }
}

/// erf(x) with absolute error below 4e-7 in float32: `x P(x^2) / Q(x^2)` on [-4, 4] (beyond
/// it erf is ±1 in float32), the rational approximation Eigen and XLA use. One division and
/// no exponential: GELU's erf was a tenth of a BERT pass with the exp-based form.
#[inline(always)]
pub fn erf<S: Isa>(x: f32) -> f32 {
    let (sat, x) = (1f32.copysign(x), x.clamp(-4.0, 4.0));
    let x2 = x * x;
    let mut p = -2.726_142_3e-10_f32;
    for c in [
        2.770_681_4e-8,
        -2.101_024e-6,
        -5.692_506_4e-5,
        -7.349_906_3e-4,
        -2.954_600_2e-3,
        -1.609_603_3e-2,
    ] {
        p = S::fma(p, x2, c);
    }
    let mut q = -1.456_607_2e-5_f32;
    for c in [-2.133_740_6e-4, -1.682_827e-3, -7.373_329e-3, -1.426_474e-2] {
        q = S::fma(q, x2, c);
    }
    // From 3.92 on erf rounds to 1 in float32; the rational form is 1 ulp short there.
    if x.abs() >= 3.92 {
        sat
    } else {
        x * p / q
    }
}

/// tanh(x) = 1 - 2 / (e^{2x} + 1), exact to a few ulp of 1 (absolute error ~1e-7).
#[inline(always)]
pub fn tanh<S: Isa>(x: f32) -> f32 {
    1.0 - 2.0 / (exp::<S>(2.0 * x) + 1.0)
}

/// The activation functions of the runtime's layers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Activation {
    /// erf form (PyTorch `nn.GELU()`, transformers "gelu").
    Gelu,
    /// tanh approximation (transformers "gelu_new" / "gelu_pytorch_tanh").
    GeluTanh,
    Relu,
    Silu,
}

impl Activation {
    pub fn parse(s: &str) -> Result<Self> {
        Ok(match s {
            "gelu" => Activation::Gelu,
            "gelu_new" | "gelu_pytorch_tanh" | "gelu_fast" => Activation::GeluTanh,
            "relu" => Activation::Relu,
            "silu" | "swish" => Activation::Silu,
            _ => {
                return Err(Error::value(format!(
                "unsupported activation {s:?}; supported: gelu, gelu_new, gelu_pytorch_tanh, relu, silu"
            )))
            }
        })
    }

    /// Plain `for` loops, not `for_each`: a closure-taking iterator method is a separate
    /// generic function that LLVM may leave un-inlined, compiled for the baseline target
    /// instead of the caller's AVX2 (GELU ran 4 lanes wide, 4x slower, that way).
    #[inline(always)]
    fn apply_slice<S: Isa>(self, v: &mut [f32]) {
        match self {
            Activation::Gelu => {
                for x in v {
                    *x = 0.5 * *x * (1.0 + erf::<S>(*x * std::f32::consts::FRAC_1_SQRT_2));
                }
            }
            Activation::GeluTanh => {
                for x in v {
                    let u = 0.797_884_6 * (*x + 0.044_715 * *x * *x * *x);
                    *x = 0.5 * *x * (1.0 + tanh::<S>(u));
                }
            }
            Activation::Relu => {
                for x in v {
                    *x = x.max(0.0);
                }
            }
            Activation::Silu => {
                for x in v {
                    *x = *x / (1.0 + exp::<S>(-*x));
                }
            }
        }
    }

    /// Applies the activation in place, in parallel chunks compiled for the CPU's vectors.
    pub fn apply(self, v: &mut [f32]) {
        v.par_chunks_mut(1 << 14).for_each(|c| self.apply_seq(c));
    }

    /// `apply` on this thread (for a kernel's task that already runs on one).
    pub fn apply_seq(self, v: &mut [f32]) {
        dispatch(ActKernel { act: self, v })
    }
}

struct ActKernel<'a> {
    act: Activation,
    v: &'a mut [f32],
}

impl Kernel for ActKernel<'_> {
    type Output = ();
    #[inline(always)]
    fn run<S: crate::quant::simd::Isa>(self) {
        self.act.apply_slice::<S>(self.v)
    }
}
/// Sum with eight independent accumulators (vectorizes; torch also sums in blocks).
#[inline(always)]
pub(super) fn sum(x: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let chunks = x.chunks_exact(8);
    let rest: f32 = chunks.remainder().iter().sum();
    for c in chunks {
        for i in 0..8 {
            acc[i] += c[i];
        }
    }
    acc.iter().sum::<f32>() + rest
}

/// Maximum with eight independent lanes (NaN-free inputs; vectorizes).
#[inline(always)]
pub(super) fn max(x: &[f32]) -> f32 {
    let mut acc = [f32::NEG_INFINITY; 8];
    let chunks = x.chunks_exact(8);
    let rest = chunks
        .remainder()
        .iter()
        .fold(f32::NEG_INFINITY, |a, &b| if b > a { b } else { a });
    for c in chunks {
        for i in 0..8 {
            acc[i] = if c[i] > acc[i] { c[i] } else { acc[i] };
        }
    }
    acc.iter().fold(rest, |a, &b| if b > a { b } else { a })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn erf64(x: f64) -> f64 {
        // Maclaurin series (|x| < 3) or the continued fraction of erfc, to 1e-15.
        if x.abs() < 3.0 {
            let (mut term, mut s, mut n) = (x, x, 0.0);
            while term.abs() > 1e-17 {
                n += 1.0;
                term *= -x * x / n;
                s += term / (2.0 * n + 1.0);
            }
            s * 2.0 / std::f64::consts::PI.sqrt()
        } else {
            let a = x.abs();
            let mut f = 0.0;
            for k in (1..60).rev() {
                f = (k as f64 / 2.0) / (a + f);
            }
            let erfc = (-a * a).exp() / (a + f) / std::f64::consts::PI.sqrt();
            (1.0 - erfc).copysign(x)
        }
    }
    #[test]
    fn exp_erf_tanh_are_accurate() {
        use crate::quant::simd::{NoFma, WithFma};
        fn check<S: Isa>() {
            let mut worst = (0f64, 0f64, 0f64);
            for i in -200_000..=200_000 {
                let x = i as f32 * 1e-3;
                if x.abs() < 87.0 {
                    let e = (x as f64).exp();
                    worst.0 = worst.0.max(((exp::<S>(x) as f64) - e).abs() / e);
                }
                worst.1 = worst.1.max((erf::<S>(x) as f64 - erf64(x as f64)).abs());
                worst.2 = worst.2.max((tanh::<S>(x) as f64 - (x as f64).tanh()).abs());
            }
            // Near zero erf is relative: erf(x) ~ 2x / sqrt(pi).
            for i in 1..=2000 {
                let x = i as f32 * 1e-7;
                let want = erf64(x as f64);
                assert!(
                    ((erf::<S>(x) as f64 - want) / want).abs() < 1e-6,
                    "erf({x})"
                );
                assert_eq!(erf::<S>(-x), -erf::<S>(x));
            }
            assert!(worst.0 < 4e-7, "exp rel err {}", worst.0);
            assert!(worst.1 < 4e-7, "erf abs err {}", worst.1);
            assert!(worst.2 < 3e-7, "tanh abs err {}", worst.2);
            assert_eq!(exp::<S>(-100.0), 0.0);
            assert_eq!(exp::<S>(100.0), f32::INFINITY);
            assert_eq!(exp::<S>(f32::NEG_INFINITY), 0.0);
            assert_eq!(erf::<S>(0.0), 0.0);
            assert_eq!(erf::<S>(10.0), 1.0);
            assert_eq!(erf::<S>(f32::NEG_INFINITY), -1.0);
        }
        check::<NoFma>();
        check::<WithFma>();
    }
}

//! Fused CPU kernels on the float32 data of candle tensors: GEMM with bias (the `gemm` crate
//! that candle itself uses, called with the weights in place), activations, residual layer
//! norm and multi-head attention with masks. Rows are split over rayon's threads.
use super::ce;
use crate::quant::simd::{dispatch, Kernel};
use crate::{Error, Result};
use candle_core::{CpuStorage, Device, Shape, Storage, Tensor};
use rayon::prelude::*;

/// Calls `f` with the float32 elements of `t` in row-major order (copying only when `t` is a
/// strided view).
pub fn with_f32<R>(t: &Tensor, f: impl FnOnce(&[f32]) -> R) -> Result<R> {
    let t = if t.is_contiguous() {
        t.clone()
    } else {
        t.contiguous().map_err(ce)?
    };
    let (s, l) = t.storage_and_layout();
    match &*s {
        Storage::Cpu(CpuStorage::F32(v)) => {
            let o = l.start_offset();
            Ok(f(&v[o..o + l.shape().elem_count()]))
        }
        _ => Err(Error::value(format!(
            "runtime tensors are float32 on the CPU, got {:?} on {:?}",
            t.dtype(),
            t.device().location()
        ))),
    }
}

/// A CPU tensor owning `v` (no copy).
pub fn tensor(v: Vec<f32>, shape: impl Into<Shape>) -> Result<Tensor> {
    Tensor::from_vec(v, shape, &Device::Cpu).map_err(ce)
}

/// Rows per rayon task so that each task has at least `grain` elements of work.
fn rows_per_task(rows: usize, width: usize, grain: usize) -> usize {
    (grain / width.max(1)).clamp(1, rows.max(1))
}

fn parallelism(flops: usize) -> gemm::Parallelism {
    let n = rayon::current_num_threads();
    if n > 1 && flops >= 1 << 20 {
        gemm::Parallelism::Rayon(n)
    } else {
        gemm::Parallelism::None
    }
}

/// A row-major or transposed operand: element (i, j) at `ptr[i * rs + j * cs]`.
#[derive(Clone, Copy)]
struct Mat {
    ptr: *const f32,
    rs: isize,
    cs: isize,
}

/// `dst (m, n; row stride dst_rs) = [dst +] scale * a (m, k) · b (k, n)`.
///
/// # Safety
/// Every element the strides address must lie inside the caller's buffers, and `dst` must not
/// alias `a` or `b`.
#[allow(clippy::too_many_arguments)]
unsafe fn gemm_into(
    m: usize,
    n: usize,
    k: usize,
    dst: *mut f32,
    dst_rs: usize,
    accumulate: bool,
    a: Mat,
    b: Mat,
    scale: f32,
    par: gemm::Parallelism,
) {
    gemm::gemm(
        m,
        n,
        k,
        dst,
        1,
        dst_rs as isize,
        accumulate,
        a.ptr,
        a.cs,
        a.rs,
        b.ptr,
        b.cs,
        b.rs,
        1.0,
        scale,
        false,
        false,
        false,
        par,
    )
}

/// `x (rows, k) @ w.T + bias` with `w` stored (n, k) as PyTorch keeps it.
pub fn linear(x: &[f32], k: usize, w: &[f32], n: usize, bias: Option<&[f32]>) -> Vec<f32> {
    assert!(k > 0 && x.len() % k == 0 && w.len() == n * k);
    let rows = x.len() / k;
    let mut out = match bias {
        Some(b) => {
            assert_eq!(b.len(), n);
            let mut o = Vec::with_capacity(rows * n);
            for _ in 0..rows {
                o.extend_from_slice(b);
            }
            o
        }
        None => vec![0.0; rows * n],
    };
    if rows == 0 || n == 0 {
        return out;
    }
    // SAFETY: x is (rows, k) row-major, w is (n, k) row-major read as its transpose (k, n),
    // out is (rows, n) row-major and a fresh allocation.
    unsafe {
        gemm_into(
            rows,
            n,
            k,
            out.as_mut_ptr(),
            n,
            bias.is_some(),
            Mat {
                ptr: x.as_ptr(),
                rs: k as isize,
                cs: 1,
            },
            Mat {
                ptr: w.as_ptr(),
                rs: 1,
                cs: k as isize,
            },
            1.0,
            parallelism(rows * n * k),
        )
    };
    out
}

// ---------------------------------------------------------------------------------------------
// Elementwise functions written so that LLVM vectorizes them (no branches, no libm calls).

const LN2_HI: f32 = 0.693_359_4;
const LN2_LO: f32 = -2.121_944_4e-4;

/// e^x to about 2 ulp (Cephes' polynomial); 0 below -87.3, +inf above 88.7.
#[inline(always)]
pub fn exp(x: f32) -> f32 {
    let xc = x.clamp(-87.3, 88.7);
    // Round to nearest with the 1.5 * 2^23 trick: `t`'s low mantissa bits then hold n as an
    // integer, which builds 2^n without a float-to-int conversion (all of it vectorizes).
    let t = xc * std::f32::consts::LOG2_E + 12_582_912.0;
    let n = t - 12_582_912.0;
    let r = xc - n * LN2_HI - n * LN2_LO;
    let mut p = 1.987_569_1e-4_f32;
    p = p * r + 1.398_199_9e-3;
    p = p * r + 8.333_452e-3;
    p = p * r + 4.166_579_6e-2;
    p = p * r + 1.666_666_5e-1;
    p = p * r + 0.5;
    let y = p * r * r + r + 1.0;
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

/// erf(x) with absolute error below 6e-7 in float32 (Abramowitz & Stegun 7.1.26, 1.5e-7 in
/// exact arithmetic, with `exp` above).
#[inline(always)]
pub fn erf(x: f32) -> f32 {
    let a = x.abs();
    let t = 1.0 / (1.0 + 0.327_591_1 * a);
    let poly = t
        * (0.254_829_6
            + t * (-0.284_496_74 + t * (1.421_413_7 + t * (-1.453_152_1 + t * 1.061_405_4))));
    let far = 1.0 - poly * exp(-a * a);
    // Near zero the Maclaurin series is exact to float32 (and keeps erf(0) = 0).
    let a2 = a * a;
    let near = a
        * std::f32::consts::FRAC_2_SQRT_PI
        * (1.0
            + a2 * (-1.0 / 3.0
                + a2 * (0.1 + a2 * (-1.0 / 42.0 + a2 * (1.0 / 216.0 - a2 / 1320.0)))));
    let y = if a < 0.5 { near } else { far };
    y.copysign(x)
}

/// tanh(x) = 1 - 2 / (e^{2x} + 1), exact to a few ulp of 1 (absolute error ~1e-7).
#[inline(always)]
pub fn tanh(x: f32) -> f32 {
    1.0 - 2.0 / (exp(2.0 * x) + 1.0)
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
    fn apply_slice(self, v: &mut [f32]) {
        match self {
            Activation::Gelu => {
                for x in v {
                    *x = 0.5 * *x * (1.0 + erf(*x * std::f32::consts::FRAC_1_SQRT_2));
                }
            }
            Activation::GeluTanh => {
                for x in v {
                    let u = 0.797_884_6 * (*x + 0.044_715 * *x * *x * *x);
                    *x = 0.5 * *x * (1.0 + tanh(u));
                }
            }
            Activation::Relu => {
                for x in v {
                    *x = x.max(0.0);
                }
            }
            Activation::Silu => {
                for x in v {
                    *x = *x / (1.0 + exp(-*x));
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
    fn run(self) {
        self.act.apply_slice(self.v)
    }
}

/// Scores of one (batch, head): the key bias added, later keys hidden (causal), softmax.
struct SoftmaxRows<'a> {
    scores: &'a mut [f32],
    lk: usize,
    bias: Option<&'a [f32]>,
    /// Query i sees keys up to i + offset.
    causal: Option<usize>,
}

impl Kernel for SoftmaxRows<'_> {
    type Output = ();
    #[inline(always)]
    fn run(self) {
        for (i, row) in self.scores.chunks_exact_mut(self.lk).enumerate() {
            if let Some(m) = self.bias {
                for (x, b) in row.iter_mut().zip(m) {
                    *x += b;
                }
            }
            if let Some(off) = self.causal {
                let from = (i + off + 1).min(self.lk);
                row[from..].fill(f32::NEG_INFINITY);
            }
            softmax_row(row);
        }
    }
}

/// Sum with eight independent accumulators (vectorizes; torch also sums in blocks).
#[inline(always)]
fn sum(x: &[f32]) -> f32 {
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
fn max(x: &[f32]) -> f32 {
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

/// `LayerNorm(x [+ residual])` over rows of `h` features (two-pass mean and variance).
pub fn layer_norm(
    x: &[f32],
    residual: Option<&[f32]>,
    weight: &[f32],
    bias: &[f32],
    eps: f32,
) -> Vec<f32> {
    let h = weight.len();
    assert!(h > 0 && x.len() % h == 0 && bias.len() == h);
    let mut out = match residual {
        Some(r) => {
            assert_eq!(r.len(), x.len());
            x.par_iter().zip(r.par_iter()).map(|(a, b)| a + b).collect()
        }
        None => x.to_vec(),
    };
    let per = rows_per_task(x.len() / h, h, 1 << 14);
    out.par_chunks_mut(per * h).for_each(|block| {
        dispatch(NormRows {
            block,
            weight,
            bias,
            eps,
        })
    });
    out
}

struct NormRows<'a> {
    block: &'a mut [f32],
    weight: &'a [f32],
    bias: &'a [f32],
    eps: f32,
}

impl Kernel for NormRows<'_> {
    type Output = ();
    #[inline(always)]
    fn run(self) {
        let h = self.weight.len();
        for row in self.block.chunks_exact_mut(h) {
            let mean = sum(row) / h as f32;
            for v in row.iter_mut() {
                *v -= mean;
            }
            let var = row.iter().map(|v| v * v).sum::<f32>() / h as f32;
            let inv = 1.0 / (var + self.eps).sqrt();
            for ((v, w), b) in row.iter_mut().zip(self.weight).zip(self.bias) {
                *v = *v * inv * w + b;
            }
        }
    }
}

/// Softmax of one row in place (max-subtracted).
#[inline(always)]
pub fn softmax_row(row: &mut [f32]) {
    let m = max(row);
    for v in row.iter_mut() {
        *v = exp(*v - m);
    }
    let inv = 1.0 / sum(row);
    for v in row.iter_mut() {
        *v *= inv;
    }
}

/// Shapes of a multi-head attention: queries (batch, lq, heads * dim) and keys / values
/// (batch, lk, heads * dim), all row-major and contiguous.
#[derive(Clone, Copy, Debug)]
pub struct AttnShape {
    pub batch: usize,
    pub lq: usize,
    pub lk: usize,
    pub heads: usize,
    pub dim: usize,
}

/// Scaled dot-product attention, `softmax(q k^T / sqrt(dim) + mask) v`, per (batch, head).
/// `mask` is added to the scores: (batch, lk) for key padding (0 or a large negative number);
/// `causal` hides key j from query i when j > i + lk - lq. Returns (batch, lq, heads * dim).
pub fn attention(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    s: AttnShape,
    mask: Option<&[f32]>,
    causal: bool,
) -> Vec<f32> {
    let h = s.heads * s.dim;
    assert_eq!(q.len(), s.batch * s.lq * h);
    assert!(k.len() == s.batch * s.lk * h && v.len() == k.len());
    if let Some(m) = mask {
        assert_eq!(m.len(), s.batch * s.lk);
    }
    let scale = 1.0 / (s.dim as f32).sqrt();
    let heads: Vec<Vec<f32>> = (0..s.batch * s.heads)
        .into_par_iter()
        .map(|task| {
            let (b, hd) = (task / s.heads, task % s.heads);
            let qo = b * s.lq * h + hd * s.dim;
            let ko = b * s.lk * h + hd * s.dim;
            let mut scores = vec![0f32; s.lq * s.lk];
            // SAFETY: q/k rows are h floats apart and this head's dim columns start at qo/ko,
            // all inside q and k (checked above); scores is (lq, lk).
            unsafe {
                gemm_into(
                    s.lq,
                    s.lk,
                    s.dim,
                    scores.as_mut_ptr(),
                    s.lk,
                    false,
                    Mat {
                        ptr: q.as_ptr().add(qo),
                        rs: h as isize,
                        cs: 1,
                    },
                    Mat {
                        ptr: k.as_ptr().add(ko),
                        rs: 1,
                        cs: h as isize,
                    },
                    scale,
                    gemm::Parallelism::None,
                )
            };
            dispatch(SoftmaxRows {
                scores: &mut scores,
                lk: s.lk,
                bias: mask.map(|m| &m[b * s.lk..(b + 1) * s.lk]),
                causal: causal.then(|| s.lk.saturating_sub(s.lq)),
            });
            let mut ctx = vec![0f32; s.lq * s.dim];
            // SAFETY: as above for v; ctx is (lq, dim).
            unsafe {
                gemm_into(
                    s.lq,
                    s.dim,
                    s.lk,
                    ctx.as_mut_ptr(),
                    s.dim,
                    false,
                    Mat {
                        ptr: scores.as_ptr(),
                        rs: s.lk as isize,
                        cs: 1,
                    },
                    Mat {
                        ptr: v.as_ptr().add(ko),
                        rs: h as isize,
                        cs: 1,
                    },
                    1.0,
                    gemm::Parallelism::None,
                )
            };
            ctx
        })
        .collect();
    let mut out = vec![0f32; s.batch * s.lq * h];
    for (task, ctx) in heads.iter().enumerate() {
        let (b, hd) = (task / s.heads, task % s.heads);
        for (i, row) in ctx.chunks_exact(s.dim).enumerate() {
            let o = (b * s.lq + i) * h + hd * s.dim;
            out[o..o + s.dim].copy_from_slice(row);
        }
    }
    out
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
        let mut worst = (0f64, 0f64, 0f64);
        for i in -200_000..=200_000 {
            let x = i as f32 * 1e-3;
            if x.abs() < 87.0 {
                let e = (x as f64).exp();
                worst.0 = worst.0.max(((exp(x) as f64) - e).abs() / e);
            }
            worst.1 = worst.1.max((erf(x) as f64 - erf64(x as f64)).abs());
            worst.2 = worst.2.max((tanh(x) as f64 - (x as f64).tanh()).abs());
        }
        assert!(worst.0 < 4e-7, "exp rel err {}", worst.0);
        assert!(worst.1 < 6e-7, "erf abs err {}", worst.1);
        assert!(worst.2 < 3e-7, "tanh abs err {}", worst.2);
        assert_eq!(exp(-100.0), 0.0);
        assert_eq!(exp(100.0), f32::INFINITY);
        assert_eq!(exp(f32::NEG_INFINITY), 0.0);
        assert_eq!(erf(0.0), 0.0);
        assert_eq!(erf(10.0), 1.0);
    }

    #[test]
    fn attention_matches_naive() {
        let s = AttnShape {
            batch: 2,
            lq: 5,
            lk: 7,
            heads: 3,
            dim: 4,
        };
        let h = s.heads * s.dim;
        let f = |n: usize, seed: usize| -> Vec<f32> {
            (0..n)
                .map(|i| (((i * 7919 + seed * 104_729) % 1000) as f32 / 500.0) - 1.0)
                .collect()
        };
        let (q, k, v) = (f(2 * 5 * h, 1), f(2 * 7 * h, 2), f(2 * 7 * h, 3));
        let mut mask = vec![0f32; 2 * 7];
        mask[7 + 6] = f32::MIN;
        for causal in [false, true] {
            let out = attention(&q, &k, &v, s, Some(&mask), causal);
            for b in 0..2 {
                for hd in 0..3 {
                    for i in 0..5 {
                        let mut sc: Vec<f64> = (0..7)
                            .map(|j| {
                                let d: f64 = (0..4)
                                    .map(|c| {
                                        q[(b * 5 + i) * h + hd * 4 + c] as f64
                                            * k[(b * 7 + j) * h + hd * 4 + c] as f64
                                    })
                                    .sum();
                                let hidden = mask[b * 7 + j] < 0.0 || (causal && j > i + 2);
                                if hidden {
                                    f64::NEG_INFINITY
                                } else {
                                    d / 2.0
                                }
                            })
                            .collect();
                        let m = sc.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                        sc.iter_mut().for_each(|x| *x = (*x - m).exp());
                        let z: f64 = sc.iter().sum();
                        for c in 0..4 {
                            let want: f64 = (0..7)
                                .map(|j| sc[j] / z * v[(b * 7 + j) * h + hd * 4 + c] as f64)
                                .sum();
                            let got = out[(b * 5 + i) * h + hd * 4 + c] as f64;
                            assert!((got - want).abs() < 1e-6, "{got} vs {want}");
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn linear_and_layer_norm_match_naive() {
        let (rows, k, n) = (33, 19, 7);
        let x: Vec<f32> = (0..rows * k)
            .map(|i| ((i % 11) as f32 - 5.0) / 3.0)
            .collect();
        let w: Vec<f32> = (0..n * k).map(|i| ((i % 13) as f32 - 6.0) / 7.0).collect();
        let b: Vec<f32> = (0..n).map(|i| i as f32 - 3.0).collect();
        let y = linear(&x, k, &w, n, Some(&b));
        for r in 0..rows {
            for j in 0..n {
                let want: f64 = b[j] as f64
                    + (0..k)
                        .map(|c| x[r * k + c] as f64 * w[j * k + c] as f64)
                        .sum::<f64>();
                assert!((y[r * n + j] as f64 - want).abs() < 1e-4);
            }
        }
        let g: Vec<f32> = (0..n).map(|i| 1.0 + i as f32 / 10.0).collect();
        let ln = layer_norm(&y, Some(&y), &g, &b, 1e-5);
        for (r, row) in ln.chunks_exact(n).enumerate() {
            let src: Vec<f64> = y[r * n..(r + 1) * n]
                .iter()
                .map(|v| 2.0 * *v as f64)
                .collect();
            let mean = src.iter().sum::<f64>() / n as f64;
            let var = src.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / n as f64;
            for j in 0..n {
                let want = (src[j] - mean) / (var + 1e-5).sqrt() * g[j] as f64 + b[j] as f64;
                assert!((row[j] as f64 - want).abs() < 1e-5);
            }
        }
    }
}

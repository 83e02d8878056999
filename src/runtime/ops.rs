//! Fused CPU kernels on the float32 data of candle tensors: GEMM with bias (the `gemm` crate
//! that candle itself uses, called with the weights in place), activations, residual layer
//! norm and multi-head attention with masks. Rows are split over rayon's threads.
use super::ce;
use crate::quant::simd::{dispatch, Isa, Kernel};
use crate::{Error, Result};
use candle_core::{CpuStorage, Device, Shape, Storage, Tensor};
use rayon::prelude::*;
use std::mem::MaybeUninit;

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

/// `a + b` with `b` broadcast over the leading dimensions of `a` (its shape a suffix of
/// `a`'s, leading ones allowed): residual connections and position tables. On rayon's threads,
/// not candle's: candle's own pool spins for a while after each large elementwise op, on a
/// core the next of our kernels wants.
pub fn add(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    let (da, db) = (a.dims(), b.dims());
    let lead = db.iter().take_while(|&&d| d == 1).count();
    let rest = &db[lead..];
    if rest.len() > da.len() || da[da.len() - rest.len()..] != *rest {
        return Err(Error::value(format!(
            "cannot add a tensor of shape {db:?} to one of shape {da:?}"
        )));
    }
    let out = with_f32(a, |xs| {
        with_f32(b, |ys| {
            let mut out = uninit(xs.len());
            if !ys.is_empty() {
                let per = rows_per_task(xs.len() / ys.len(), ys.len(), 1 << 14) * ys.len();
                out.par_chunks_mut(per)
                    .zip(xs.par_chunks(per))
                    .for_each(|(o, x)| {
                        for ((o, x), y) in o.iter_mut().zip(x).zip(ys.iter().cycle()) {
                            *o = MaybeUninit::new(x + y);
                        }
                    });
            }
            // SAFETY: every element was written (`ys` is empty only when `xs` is).
            unsafe { assume_init(out) }
        })
    })??;
    tensor(out, a.shape().clone())
}

/// A vector of `n` floats to be written before it is read (no memset).
fn uninit(n: usize) -> Vec<MaybeUninit<f32>> {
    let mut v = Vec::with_capacity(n);
    // SAFETY: MaybeUninit needs no initialization.
    unsafe { v.set_len(n) };
    v
}

/// # Safety
/// Every element of `v` must have been written.
unsafe fn assume_init(v: Vec<MaybeUninit<f32>>) -> Vec<f32> {
    let mut v = std::mem::ManuallyDrop::new(v);
    // SAFETY: initialized (the caller's promise); MaybeUninit<f32> has f32's layout.
    unsafe { Vec::from_raw_parts(v.as_mut_ptr() as *mut f32, v.len(), v.capacity()) }
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
    fn run<S: crate::quant::simd::Isa>(self) {
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
            softmax_row::<S>(row);
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

/// `LayerNorm(x [+ residual])` over rows of `h` features (two-pass mean and variance). The
/// sum is formed row by row inside the kernel, never stored, and the output written once.
pub fn layer_norm(
    x: &[f32],
    residual: Option<&[f32]>,
    weight: &[f32],
    bias: &[f32],
    eps: f32,
) -> Vec<f32> {
    let h = weight.len();
    assert!(h > 0 && x.len() % h == 0 && bias.len() == h);
    if let Some(r) = residual {
        assert_eq!(r.len(), x.len());
    }
    let mut out = uninit(x.len());
    let per = rows_per_task(x.len() / h, h, 1 << 14) * h;
    out.par_chunks_mut(per).enumerate().for_each(|(i, out)| {
        let at = i * per..i * per + out.len();
        dispatch(NormRows {
            x: &x[at.clone()],
            residual: residual.map(|r| &r[at]),
            out,
            weight,
            bias,
            eps,
        })
    });
    // SAFETY: NormRows wrote every element of every block.
    unsafe { assume_init(out) }
}

struct NormRows<'a> {
    x: &'a [f32],
    residual: Option<&'a [f32]>,
    out: &'a mut [MaybeUninit<f32>],
    weight: &'a [f32],
    bias: &'a [f32],
    eps: f32,
}

impl Kernel for NormRows<'_> {
    type Output = ();
    #[inline(always)]
    fn run<S: crate::quant::simd::Isa>(self) {
        let h = self.weight.len();
        let mut sum_row = vec![0f32; h];
        for (r, (x, out)) in self
            .x
            .chunks_exact(h)
            .zip(self.out.chunks_exact_mut(h))
            .enumerate()
        {
            let row: &[f32] = match self.residual {
                Some(res) => {
                    for ((s, a), b) in sum_row.iter_mut().zip(x).zip(&res[r * h..(r + 1) * h]) {
                        *s = a + b;
                    }
                    &sum_row
                }
                None => x,
            };
            let mean = sum(row) / h as f32;
            let mut var = [0f32; 8];
            let chunks = row.chunks_exact(8);
            let mut tail = 0f32;
            for v in chunks.remainder() {
                tail += (v - mean) * (v - mean);
            }
            for c in chunks {
                for i in 0..8 {
                    var[i] += (c[i] - mean) * (c[i] - mean);
                }
            }
            let var = (var.iter().sum::<f32>() + tail) / h as f32;
            let inv = 1.0 / (var + self.eps).sqrt();
            for (((o, v), w), b) in out.iter_mut().zip(row).zip(self.weight).zip(self.bias) {
                *o = MaybeUninit::new((v - mean) * inv * w + b);
            }
        }
    }
}

/// Softmax of one row in place (max-subtracted).
#[inline(always)]
pub fn softmax_row<S: Isa>(row: &mut [f32]) {
    let m = max(row);
    for v in row.iter_mut() {
        *v = exp::<S>(*v - m);
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
    #[cfg(target_arch = "x86_64")]
    let avx2 = crate::quant::simd::simd_level() >= 2;
    let heads: Vec<Vec<f32>> = (0..s.batch * s.heads)
        .into_par_iter()
        .map(|task| {
            let (b, hd) = (task / s.heads, task % s.heads);
            let qo = b * s.lq * h + hd * s.dim;
            let ko = b * s.lk * h + hd * s.dim;
            let mut scores = vec![0f32; s.lq * s.lk];
            let mut ctx = vec![0f32; s.lq * s.dim];
            let bias = mask.map(|m| &m[b * s.lk..(b + 1) * s.lk]);
            let causal = causal.then(|| s.lk.saturating_sub(s.lq));
            let softmax = |scores: &mut [f32]| {
                dispatch(SoftmaxRows {
                    scores,
                    lk: s.lk,
                    bias,
                    causal,
                })
            };
            #[cfg(target_arch = "x86_64")]
            if avx2 {
                // This head's keys transposed and its values, each row zero-padded to a whole
                // number of vectors, so that the register tiles read whole vectors.
                let (lkp, dp) = (s.lk.next_multiple_of(8), s.dim.next_multiple_of(8));
                let mut kt = vec![0f32; s.dim * lkp];
                let mut vp = vec![0f32; s.lk * dp];
                // SAFETY: as for the products below.
                unsafe { small_gemm::transpose(s.lk, s.dim, (&k[ko..], h), (&mut kt, lkp)) };
                for (j, row) in vp.chunks_exact_mut(dp).enumerate() {
                    row[..s.dim].copy_from_slice(&v[ko + j * h..][..s.dim]);
                }
                let qh = &q[qo..];
                // SAFETY: the CPU has AVX2 and FMA; the operands' shapes are as stated.
                unsafe {
                    small_gemm::gemm(
                        s.lq,
                        s.lk,
                        s.dim,
                        (qh, h),
                        (&kt, lkp),
                        scale,
                        (&mut scores, s.lk),
                    );
                }
                softmax(&mut scores);
                // SAFETY: as above.
                unsafe {
                    small_gemm::gemm(
                        s.lq,
                        s.dim,
                        s.lk,
                        (&scores, s.lk),
                        (&vp, dp),
                        1.0,
                        (&mut ctx, s.dim),
                    );
                }
                return ctx;
            }
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
            softmax(&mut scores);
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
    out.par_chunks_mut((s.lq * h).max(1))
        .enumerate()
        .for_each(|(b, dst)| {
            for (hd, ctx) in heads[b * s.heads..(b + 1) * s.heads].iter().enumerate() {
                for (i, row) in ctx.chunks_exact(s.dim).enumerate() {
                    dst[i * h + hd * s.dim..][..s.dim].copy_from_slice(row);
                }
            }
        });
    out
}

/// Register-tiled float32 products for attention's many small matrices (one pair per batch
/// and head, 128 x 128 x 32 in BERT-small): a general GEMM's packing and dispatch cost more
/// than such a product itself.
#[cfg(target_arch = "x86_64")]
mod small_gemm {
    use std::arch::x86_64::*;

    /// Rows per register tile (6 x 16 accumulators, 2 vectors of `b` and a broadcast: 15 of
    /// the 16 vector registers).
    const MR: usize = 6;

    /// `c[i * crs + j] = alpha * Σ_k a[i * ars + k] b[k * brs + j]` for `i < m`, `j < n`, from
    /// `(slice, row stride)` operands; `b`'s rows must hold `n` rounded up to 8 readable columns
    /// (zero padding).
    ///
    /// # Safety
    /// The CPU must have AVX2 and FMA.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn gemm(
        m: usize,
        n: usize,
        kc: usize,
        (a, ars): (&[f32], usize),
        (b, brs): (&[f32], usize),
        alpha: f32,
        (c, crs): (&mut [f32], usize),
    ) {
        if m == 0 || n == 0 {
            return;
        }
        let n8 = n.next_multiple_of(8);
        // Every load and store below stays inside these bounds.
        assert!(kc == 0 || (m - 1) * ars + kc <= a.len());
        assert!(brs >= n8 && (kc == 0 || (kc - 1) * brs + n8 <= b.len()));
        assert!(crs >= n && (m - 1) * crs + n <= c.len());
        let mut j = 0;
        while j < n {
            let nv = if n - j > 8 { 2 } else { 1 };
            let w = (n - j).min(8 * nv);
            let mut i = 0;
            while i < m {
                let r = (m - i).min(MR);
                let (ap, bp) = (a.as_ptr().add(i * ars), b.as_ptr().add(j));
                let mut buf = [[0f32; 16]; MR];
                macro_rules! run {
                    ($($r:literal)*) => {
                        match (r, nv) {
                            $(($r, 2) => tile::<$r, 2>(ap, ars, bp, brs, kc, alpha, &mut buf),
                              ($r, _) => tile::<$r, 1>(ap, ars, bp, brs, kc, alpha, &mut buf),)*
                            _ => unreachable!(),
                        }
                    };
                }
                run!(1 2 3 4 5 6);
                for (rr, row) in buf.iter().take(r).enumerate() {
                    c[(i + rr) * crs + j..][..w].copy_from_slice(&row[..w]);
                }
                i += r;
            }
            j += 8 * nv;
        }
    }

    /// `dst[j * drs + i] = src[i * srs + j]` for `i < rows`, `j < cols`, in 8 x 8 blocks of
    /// register shuffles (element by element, one of the two sides strides across cache lines
    /// and the transpose cost a third as much as attention's products).
    ///
    /// # Safety
    /// The CPU must have AVX2.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn transpose(
        rows: usize,
        cols: usize,
        (src, srs): (&[f32], usize),
        (dst, drs): (&mut [f32], usize),
    ) {
        if rows == 0 || cols == 0 {
            return;
        }
        // Every load and store below stays inside these bounds.
        assert!(srs >= cols && (rows - 1) * srs + cols <= src.len());
        assert!(drs >= rows && (cols - 1) * drs + rows <= dst.len());
        let (r8, c8) = (rows / 8 * 8, cols / 8 * 8);
        for i in (0..r8).step_by(8) {
            for j in (0..c8).step_by(8) {
                let p = src.as_ptr().add(i * srs + j);
                let r: [__m256; 8] = std::array::from_fn(|x| _mm256_loadu_ps(p.add(x * srs)));
                // Pairs of rows interleaved, then pairs of pairs, then the 128-bit halves.
                let t0 = _mm256_unpacklo_ps(r[0], r[1]);
                let t1 = _mm256_unpackhi_ps(r[0], r[1]);
                let t2 = _mm256_unpacklo_ps(r[2], r[3]);
                let t3 = _mm256_unpackhi_ps(r[2], r[3]);
                let t4 = _mm256_unpacklo_ps(r[4], r[5]);
                let t5 = _mm256_unpackhi_ps(r[4], r[5]);
                let t6 = _mm256_unpacklo_ps(r[6], r[7]);
                let t7 = _mm256_unpackhi_ps(r[6], r[7]);
                let u0 = _mm256_shuffle_ps::<0x44>(t0, t2);
                let u1 = _mm256_shuffle_ps::<0xEE>(t0, t2);
                let u2 = _mm256_shuffle_ps::<0x44>(t1, t3);
                let u3 = _mm256_shuffle_ps::<0xEE>(t1, t3);
                let u4 = _mm256_shuffle_ps::<0x44>(t4, t6);
                let u5 = _mm256_shuffle_ps::<0xEE>(t4, t6);
                let u6 = _mm256_shuffle_ps::<0x44>(t5, t7);
                let u7 = _mm256_shuffle_ps::<0xEE>(t5, t7);
                let out = [
                    _mm256_permute2f128_ps::<0x20>(u0, u4),
                    _mm256_permute2f128_ps::<0x20>(u1, u5),
                    _mm256_permute2f128_ps::<0x20>(u2, u6),
                    _mm256_permute2f128_ps::<0x20>(u3, u7),
                    _mm256_permute2f128_ps::<0x31>(u0, u4),
                    _mm256_permute2f128_ps::<0x31>(u1, u5),
                    _mm256_permute2f128_ps::<0x31>(u2, u6),
                    _mm256_permute2f128_ps::<0x31>(u3, u7),
                ];
                let q = dst.as_mut_ptr().add(j * drs + i);
                for (x, v) in out.into_iter().enumerate() {
                    _mm256_storeu_ps(q.add(x * drs), v);
                }
            }
        }
        // The edges, element by element.
        for i in 0..rows {
            let from = if i < r8 { c8 } else { 0 };
            for j in from..cols {
                dst[j * drs + i] = src[i * srs + j];
            }
        }
    }

    /// `R` rows by `8 NV` columns, accumulated over `kc` in registers, scaled into `buf`.
    #[target_feature(enable = "avx2,fma")]
    #[allow(clippy::needless_range_loop)] // `acc[r][v]` reads best as the register block it is
    unsafe fn tile<const R: usize, const NV: usize>(
        a: *const f32,
        ars: usize,
        b: *const f32,
        brs: usize,
        kc: usize,
        alpha: f32,
        buf: &mut [[f32; 16]; MR],
    ) {
        let mut acc = [[_mm256_setzero_ps(); NV]; R];
        for k in 0..kc {
            let mut bv = [_mm256_setzero_ps(); NV];
            for v in 0..NV {
                bv[v] = _mm256_loadu_ps(b.add(k * brs + 8 * v));
            }
            for r in 0..R {
                let av = _mm256_broadcast_ss(&*a.add(r * ars + k));
                for v in 0..NV {
                    acc[r][v] = _mm256_fmadd_ps(av, bv[v], acc[r][v]);
                }
            }
        }
        let al = _mm256_set1_ps(alpha);
        for r in 0..R {
            for v in 0..NV {
                _mm256_storeu_ps(buf[r][8 * v..].as_mut_ptr(), _mm256_mul_ps(acc[r][v], al));
            }
        }
    }
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
    fn add_broadcasts_like_candle() {
        let t = |n: usize, shape: &[usize]| {
            tensor((0..n).map(|i| (i as f32 * 0.37).sin()).collect(), shape).unwrap()
        };
        let a = t(5 * 700 * 24, &[5, 700, 24]);
        for b in [
            t(5 * 700 * 24, &[5, 700, 24]),
            t(700 * 24, &[1, 700, 24]),
            t(700 * 24, &[700, 24]),
            t(24, &[24]),
        ] {
            let want = a.broadcast_add(&b).unwrap();
            let got = add(&a, &b).unwrap();
            assert_eq!(got.dims(), want.dims());
            let flat = |t: &Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            assert_eq!(flat(&got), flat(&want));
        }
        assert!(add(&a, &t(23, &[23])).is_err());
        assert!(add(&a, &t(2 * 24, &[2, 1, 24])).is_err());
        let empty = t(0, &[0, 24]);
        assert_eq!(add(&empty, &t(24, &[24])).unwrap().dims(), &[0, 24]);
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

    fn check_attention(s: AttnShape) {
        let (h, (lq, lk, dim)) = (s.heads * s.dim, (s.lq, s.lk, s.dim));
        let f = |n: usize, seed: usize| -> Vec<f32> {
            (0..n)
                .map(|i| (((i * 7919 + seed * 104_729) % 1000) as f32 / 500.0) - 1.0)
                .collect()
        };
        let (q, k, v) = (
            f(s.batch * lq * h, 1),
            f(s.batch * lk * h, 2),
            f(s.batch * lk * h, 3),
        );
        let mut mask = vec![0f32; s.batch * lk];
        mask[s.batch * lk - 1] = f32::MIN;
        for causal in [false, true] {
            let out = attention(&q, &k, &v, s, Some(&mask), causal);
            for b in 0..s.batch {
                for hd in 0..s.heads {
                    for i in 0..lq {
                        let mut sc: Vec<f64> = (0..lk)
                            .map(|j| {
                                let d: f64 = (0..dim)
                                    .map(|c| {
                                        q[(b * lq + i) * h + hd * dim + c] as f64
                                            * k[(b * lk + j) * h + hd * dim + c] as f64
                                    })
                                    .sum();
                                let hidden = mask[b * lk + j] < 0.0
                                    || (causal && j > i + lk.saturating_sub(lq));
                                if hidden {
                                    f64::NEG_INFINITY
                                } else {
                                    d / (dim as f64).sqrt()
                                }
                            })
                            .collect();
                        let m = sc.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                        sc.iter_mut().for_each(|x| *x = (*x - m).exp());
                        let z: f64 = sc.iter().sum();
                        for c in 0..dim {
                            let want: f64 = (0..lk)
                                .map(|j| sc[j] / z * v[(b * lk + j) * h + hd * dim + c] as f64)
                                .sum();
                            let got = out[(b * lq + i) * h + hd * dim + c] as f64;
                            assert!((got - want).abs() < 2e-6, "{s:?} {got} vs {want}");
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn attention_matches_naive() {
        // Partial register tiles in both directions, one-vector and padded columns, and BERT's
        // head shape.
        for (batch, lq, lk, heads, dim) in [
            (2, 5, 7, 3, 4),
            (1, 13, 37, 2, 20),
            (2, 17, 9, 1, 8),
            (1, 1, 40, 2, 24),
            (2, 32, 32, 2, 32),
        ] {
            check_attention(AttnShape {
                batch,
                lq,
                lk,
                heads,
                dim,
            });
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

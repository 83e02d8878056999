//! The W8A8 / W4A8 GEMM: weights kept as a `QuantizedTensor` stores them (any width up to 8
//! bits, symmetric or not, one scale per tensor, per output channel or per group of inputs),
//! activations quantized per row to int8 as BitNet does (absmax), exact int32 dot products per
//! group and a float rescale.
//!
//! Layout: output columns in panels of `NR` = 16; inputs in groups (the spec's, or chunks of
//! `CHUNK` for one scale per channel), each padded to a multiple of 8. Within a group, step `s`
//! holds inputs `4 s .. 4 s + 4` of the panel's 16 columns in 64 bytes: byte `4 j + t` is input
//! `4 s + t` of column `j`, the stored unsigned code `u = q - quant_min`. Widths up to 4 bits
//! keep two steps per 64 bytes, step `2 i` in the low nibbles and `2 i + 1` in the high ones,
//! so an int4 matrix takes half a byte per weight, as in its file. A broadcast of four
//! activation bytes against one such vector is one `vpdpbusd` (u8 x s8 into int32) for 4 inputs
//! x 16 columns.
//!
//! With `o = zero_point - quant_min` (the offset of the stored codes), a group's exact integer
//! product is `d = Σ (u - o) a = Σ u a - o Σ a`; the kernels start each group's accumulator at
//! `-o Σ a` (the activation sums per group come with the activations). Each path then computes,
//! in this order, `f = fma(d as f32, scale, f)` over the groups and `y = f * (1 / s_x) + bias`
//! in f64, rounded to f32, so every path gives the same bits.
use super::quant::quantize_row;
use super::ternary::RowFn;
use crate::quant::pack;
use crate::quant::spec::{Granularity, QuantizedTensor};
use crate::{ensure, Result};
use ndarray::{Array2, ArrayView2, ArrayViewMut2, Axis};
use rayon::prelude::*;
use std::mem::MaybeUninit;

/// Output columns per panel: the int32 lanes of one 512-bit vector.
pub const NR: usize = 16;
/// Inputs summed exactly in int32 before one float rescale, with one scale per channel: below
/// 2^31 / (255 x 128) inputs, so no product of 8-bit codes can overflow it.
pub const CHUNK: usize = 16384;

/// A kernel family.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Path {
    /// Plain Rust (vectorized by LLVM where it can); the reference every other path equals.
    Portable,
    /// AVX2 `maddubs` on codes split into nibbles (no 16-bit saturation).
    Avx2,
    /// AVX-VNNI: the AVX2 tile with the 256-bit `vpdpbusd` (CPUs with VNNI but no AVX-512:
    /// Intel's client cores since Alder Lake, and a cap of `LOWBIT_ISA=avxvnni`).
    AvxVnni,
    /// AVX-512 VNNI `vpdpbusd` on 512-bit vectors.
    Avx512,
}

impl Path {
    /// Every path, slowest first.
    pub const ALL: [Path; 4] = [Path::Portable, Path::Avx2, Path::AvxVnni, Path::Avx512];

    /// Whether the CPU and `LOWBIT_ISA` allow this path.
    pub fn allowed(self) -> bool {
        let l = crate::isa::level();
        match self {
            Path::Portable => true,
            Path::Avx2 => l.has_avx2(),
            Path::AvxVnni => crate::isa::avx_vnni(),
            Path::Avx512 => l == crate::isa::Level::Avx512Vnni,
        }
    }

    /// The fastest path the CPU and `LOWBIT_ISA` allow.
    pub fn best() -> Path {
        Path::ALL
            .into_iter()
            .rev()
            .find(|p| p.allowed())
            .unwrap_or(Path::Portable)
    }

    /// Every path this machine can run, slowest first (for tests).
    pub fn available() -> Vec<Path> {
        Path::ALL.into_iter().filter(|p| p.allowed()).collect()
    }

    /// The path `name()` calls `name`.
    pub fn from_name(name: &str) -> Result<Path> {
        Path::ALL
            .into_iter()
            .find(|p| p.name() == name)
            .ok_or_else(|| {
                crate::Error::value(format!(
                    "path must be 'avx512vnni', 'avxvnni', 'avx2' or 'portable', got {name:?}"
                ))
            })
    }

    pub fn name(self) -> &'static str {
        match self {
            Path::Portable => "portable",
            Path::Avx2 => "avx2",
            Path::AvxVnni => "avxvnni",
            Path::Avx512 => "avx512vnni",
        }
    }
}

/// A quantized weight matrix (out_features x in_features) laid out for the kernels.
#[derive(Clone, Debug)]
pub struct IntMatrix {
    pub n: usize,
    pub k: usize,
    /// Inputs per group (the spec's group size, or `CHUNK` / `k` with one scale per channel).
    pub group: usize,
    /// `group` rounded up to a multiple of 8: a group's stride in panels and activation rows.
    gs: usize,
    ng: usize,
    /// Panels of `NR` columns.
    np: usize,
    /// Two codes per byte (widths up to 4 bits).
    nibbles: bool,
    /// Code bytes of one group of one panel.
    gb: usize,
    /// Bytes of a block's scales and offsets: `4 NR` scales, and `4 NR` offsets unless every
    /// column and group shares one (`off`, as symmetric specs do).
    meta: usize,
    /// The negated code offset `quant_min - zero_point` when it is the same everywhere.
    off: Option<i32>,
    /// Panels of `ng` blocks, each a group's `NR` scales (f32, 0 for padding columns) and `NR`
    /// negated code offsets `quant_min - zero_point` (i32; left out when `off` holds the one
    /// offset), then its `gb` code bytes: one sequential stream per panel, read in order.
    packed: Vec<u8>,
}

impl IntMatrix {
    /// Whether the kernels take a tensor of this spec and shape: 2-D (out, in), or any shape
    /// flattened to (out, rest) with one scale per tensor or per output channel (axis 0).
    pub fn supports(t: &QuantizedTensor) -> bool {
        let s = &t.spec;
        match s.granularity {
            _ if t.shape.len() < 2 || t.shape[1..].iter().product::<usize>() == 0 => false,
            Granularity::Tensor => true,
            Granularity::Channel => s.axis == 0 || s.axis == -(t.shape.len() as i64),
            Granularity::Group => t.shape.len() == 2,
        }
    }

    /// The kernels' layout of a quantized tensor (its codes as stored, never re-quantized).
    pub fn from_quantized(t: &QuantizedTensor) -> Result<Self> {
        t.validate()?;
        ensure!(
            Self::supports(t),
            "the integer GEMM takes (out, in) weights quantized per tensor, per output channel \
             or per group of inputs; got shape {:?} with {:?} granularity (axis {})",
            t.shape,
            t.spec.granularity,
            t.spec.axis
        );
        let n = t.shape[0];
        let k: usize = t.shape[1..].iter().product();
        let group = match t.spec.granularity {
            Granularity::Group => t.spec.group_size.unwrap_or(k),
            _ => k.min(CHUNK),
        }
        .clamp(1, k.max(1));
        ensure!(
            group <= CHUNK,
            "groups of {group} inputs are more than the integer GEMM sums exactly ({CHUNK})"
        );
        let ng = k.div_ceil(group);
        let gs = group.next_multiple_of(8);
        let np = n.div_ceil(NR);
        let nibbles = t.spec.bits <= 4;
        let gb = gs * NR / if nibbles { 2 } else { 1 };
        let zps_in: Vec<i32> = t.zero_points.iter().copied().collect();
        let off = match zps_in.first() {
            Some(&z) if zps_in.iter().all(|&v| v == z) => Some(t.spec.range().min - z),
            _ => None,
        };
        let meta = if off.is_some() { 4 * NR } else { 8 * NR };
        let pb = ng * (gb + meta);
        let u = pack::unpack(&t.codes, t.spec.bits, t.numel())?;
        let qmin = t.spec.range().min;
        // The (scale, offset) of column c's group g, whatever the granularity.
        let qp = |c: usize, g: usize| -> usize {
            match t.spec.granularity {
                Granularity::Tensor => 0,
                Granularity::Channel => c,
                Granularity::Group => c * ng + g,
            }
        };
        let scales_in: Vec<f32> = t.scales.iter().copied().collect();
        let mut packed = vec![0u8; np * pb];
        packed
            .par_chunks_mut(pb.max(1))
            .enumerate()
            .for_each(|(p, dst)| {
                for j in 0..NR.min(n - p * NR) {
                    let c = p * NR + j;
                    for g in 0..ng {
                        let m = &mut dst[g * (gb + meta)..][..meta];
                        m[4 * j..4 * j + 4].copy_from_slice(&scales_in[qp(c, g)].to_ne_bytes());
                        if off.is_none() {
                            let no = qmin - zps_in[qp(c, g)];
                            m[4 * (NR + j)..4 * (NR + j) + 4].copy_from_slice(&no.to_ne_bytes());
                        }
                    }
                    let row = &u[c * k..(c + 1) * k];
                    for (i, &v) in row.iter().enumerate() {
                        let (g, t) = (i / group, i % group);
                        let (s, b) = (t / 4, t % 4);
                        let blk = g * (gb + meta) + meta;
                        if nibbles {
                            dst[blk + s / 2 * 64 + 4 * j + b] |= v << (4 * (s % 2));
                        } else {
                            dst[blk + s * 64 + 4 * j + b] = v;
                        }
                    }
                }
            });
        Ok(IntMatrix {
            n,
            k,
            group,
            gs,
            ng,
            np,
            nibbles,
            gb,
            meta,
            off,
            packed,
        })
    }

    /// Bytes the weights take in memory: codes, scales and offsets.
    pub fn nbytes(&self) -> usize {
        self.packed.len()
    }

    /// Group `g` of panel `p`: its scales and offsets, then its code bytes.
    #[inline(always)]
    fn block(&self, p: usize, g: usize) -> &[u8] {
        let bs = self.gb + self.meta;
        &self.packed[(p * self.ng + g) * bs..(p * self.ng + g + 1) * bs]
    }

    /// Quantizes `x` (rows x k) per row to int8 (absmax, `activation_quant(x, 8)`) straight into
    /// this matrix's activation layout.
    pub fn quantize(&self, x: ArrayView2<'_, f32>) -> Result<IntActs> {
        let (m, k) = x.dim();
        ensure!(
            k == self.k,
            "activations have {k} features, the weights {}",
            self.k
        );
        let acts = IntActs::build(m, self, |r, dst| quantize_row(x.row(r), dst, 8));
        ensure!(
            acts.scales.iter().all(|s| !s.is_nan()),
            "x contains NaN or Inf"
        );
        Ok(acts)
    }

    /// int8 activation codes (m x k) with their per-row multipliers `s_x` (x ≈ q / s_x).
    pub fn acts_from_codes(&self, q: ArrayView2<'_, i8>, s_x: &[f32]) -> Result<IntActs> {
        let (m, k) = q.dim();
        ensure!(
            k == self.k && s_x.len() == m,
            "codes of shape ({m}, {k}) with {} multipliers for {} inputs",
            s_x.len(),
            self.k
        );
        ensure!(
            s_x.iter().all(|s| s.is_finite() && *s > 0.0),
            "multipliers must be finite and positive"
        );
        Ok(IntActs::build(m, self, |r, dst| {
            dst.iter_mut().zip(q.row(r)).for_each(|(d, s)| *d = *s);
            s_x[r]
        }))
    }

    /// `y = act_codes @ dequantized(w).T / s_x + bias`, then `post` on each finished row.
    pub fn matmul(
        &self,
        acts: &IntActs,
        bias: Option<&[f32]>,
        post: Option<&RowFn>,
        path: Path,
    ) -> Result<Array2<f32>> {
        ensure!(
            acts.k == self.k && acts.gs == self.gs && acts.ng == self.ng,
            "activations laid out for {} inputs in groups of {}, the weights {} in groups of {}",
            acts.k,
            acts.gs,
            self.k,
            self.gs
        );
        if let Some(b) = bias {
            ensure!(b.len() == self.n, "bias must have {} entries", self.n);
        }
        ensure!(
            path.allowed(),
            "the {} kernel needs an instruction set this CPU (or LOWBIT_ISA) does not allow",
            path.name()
        );
        let (m, n) = (acts.m, self.n);
        if m == 0 || n == 0 {
            return Ok(Array2::zeros((m, n)));
        }
        let inv: Vec<f64> = acts.scales.iter().map(|&s| 1.0 / s as f64).collect();
        // Tasks own ranges of whole panels (all rows), written straight into `out`.
        let per_thread = if m <= 2 { 4 } else { 8 };
        let tasks = rayon::current_num_threads().max(1) * per_thread;
        let cols = (self.np.div_ceil(tasks) * NR).max(NR);
        let ctx = Ctx {
            w: self,
            a: acts,
            inv: &inv,
            bias,
            post,
            path,
        };
        // Not cleared first: every task writes each element of its columns once (a cleared
        // output is a pass over fresh pages of its own, page faults included).
        let mut out = Array2::<f32>::uninit((m, n));
        out.axis_chunks_iter_mut(Axis(1), cols)
            .into_par_iter()
            .enumerate()
            .for_each(|(t, mut dst)| ctx.task(t * cols / NR, &mut dst));
        // SAFETY: the tasks cover every column, and each writes every row of its columns.
        Ok(unsafe { out.assume_init() })
    }
}

/// int8 activations in an `IntMatrix`'s layout: rows of `ng` groups of `gs` bytes (zeros past
/// each group's inputs) plus a cache line, their sums per group and their multipliers.
pub struct IntActs {
    pub m: usize,
    pub k: usize,
    gs: usize,
    ng: usize,
    stride: usize,
    q: Vec<i8>,
    sums: Vec<i32>,
    /// Per row, `s_x` with `x ≈ q / s_x`.
    pub scales: Vec<f32>,
}

impl IntActs {
    /// `fill(r, row)` writes row `r`'s k codes and returns its multiplier.
    fn build(m: usize, w: &IntMatrix, fill: impl Fn(usize, &mut [i8]) -> f32 + Sync) -> IntActs {
        let (k, gs, ng, group) = (w.k, w.gs, w.ng, w.group);
        let stride = ng * gs + 64;
        let mut q = vec![0i8; m * stride];
        let mut sums = vec![0i32; m * ng];
        let row = |(r, (dst, sum)): (usize, (&mut [i8], &mut [i32]))| -> f32 {
            let s = if gs == group || ng == 1 {
                fill(r, &mut dst[..k])
            } else {
                let mut tmp = vec![0i8; k];
                let s = fill(r, &mut tmp);
                for (g, src) in tmp.chunks(group).enumerate() {
                    dst[g * gs..g * gs + src.len()].copy_from_slice(src);
                }
                s
            };
            for (g, out) in sum.iter_mut().enumerate() {
                *out = dst[g * gs..(g + 1) * gs].iter().map(|&v| v as i32).sum();
            }
            s
        };
        let it = q.chunks_mut(stride).zip(sums.chunks_mut(ng.max(1)));
        let scales = if m * k < 1 << 16 {
            it.enumerate().map(row).collect()
        } else {
            q.par_chunks_mut(stride)
                .zip(sums.par_chunks_mut(ng.max(1)))
                .enumerate()
                .map(row)
                .collect()
        };
        IntActs {
            m,
            k,
            gs,
            ng,
            stride,
            q,
            sums,
            scales,
        }
    }
}

/// What every task of one `matmul` reads.
struct Ctx<'a> {
    w: &'a IntMatrix,
    a: &'a IntActs,
    inv: &'a [f64],
    bias: Option<&'a [f32]>,
    post: Option<&'a RowFn>,
    path: Path,
}

/// `out = acc * inv + bias` in f64, rounded to f32: one stretch of an output row, compiled for
/// the CPU's vectors.
struct Rescale<'a> {
    out: &'a mut [MaybeUninit<f32>],
    acc: &'a [f32],
    inv: f64,
    bias: Option<&'a [f32]>,
}

impl crate::quant::simd::Kernel for Rescale<'_> {
    type Output = ();
    #[inline(always)]
    fn run<S: crate::quant::simd::Isa>(self) {
        let inv = self.inv;
        match self.bias {
            Some(b) => {
                for ((o, &f), &b) in self.out.iter_mut().zip(self.acc).zip(b) {
                    *o = MaybeUninit::new((f as f64 * inv + b as f64) as f32);
                }
            }
            None => {
                for (o, &f) in self.out.iter_mut().zip(self.acc) {
                    *o = MaybeUninit::new((f as f64 * inv) as f32);
                }
            }
        }
    }
}

/// Rows per register tile.
const MR: usize = 6;
/// Panels per register tile, at most.
const PMAX: usize = 4;

impl Ctx<'_> {
    /// Panels `p0 ..` (as many as `dst` has columns) for every activation row.
    fn task(&self, p0: usize, dst: &mut ArrayViewMut2<'_, MaybeUninit<f32>>) {
        let (m, cols) = dst.dim();
        let mut buf = [[0f32; PMAX * NR]; MR];
        // Few rows: four panels at once, so enough accumulators are in flight.
        let wide = if m <= 2 { PMAX } else { 2 };
        let mut c = 0;
        while c < cols {
            let left = (cols - c).div_ceil(NR);
            let panels = if left >= wide {
                wide
            } else if left >= 2 {
                2
            } else {
                1
            };
            let p = p0 + c / NR;
            let mut r0 = 0;
            while r0 < m {
                let rows = (m - r0).min(MR);
                self.tile(rows, panels, r0, p, &mut buf);
                for (i, acc) in buf.iter().take(rows).enumerate() {
                    let r = r0 + i;
                    let width = (cols - c).min(panels * NR);
                    let mut out = dst.row_mut(r);
                    let out = out.as_slice_mut().expect("task columns are contiguous");
                    let out = &mut out[c..c + width];
                    let col0 = p0 * NR + c;
                    crate::quant::simd::dispatch(Rescale {
                        out,
                        acc,
                        inv: self.inv[r],
                        bias: self.bias.map(|b| &b[col0..col0 + width]),
                    });
                }
                r0 += rows;
            }
            c += panels * NR;
        }
        if let Some(post) = self.post {
            for mut row in dst.rows_mut() {
                let row = row.as_slice_mut().expect("task columns are contiguous");
                // SAFETY: every element of the row was written above; `MaybeUninit<f32>` has
                // `f32`'s layout.
                post(unsafe { &mut *(row as *mut [MaybeUninit<f32>] as *mut [f32]) });
            }
        }
    }

    /// The float accumulators of `rows` activation rows from `r0` against `panels` panels from
    /// `p`, into `buf[r][..panels * NR]`.
    fn tile(
        &self,
        rows: usize,
        panels: usize,
        r0: usize,
        p: usize,
        buf: &mut [[f32; PMAX * NR]; MR],
    ) {
        macro_rules! go {
            ($f:ident) => {
                match (rows, panels) {
                    (2, 4) => $f::<2, 4>(self, r0, p, buf),
                    (1, 4) => $f::<1, 4>(self, r0, p, buf),
                    (6, 2) => $f::<6, 2>(self, r0, p, buf),
                    (5, 2) => $f::<5, 2>(self, r0, p, buf),
                    (4, 2) => $f::<4, 2>(self, r0, p, buf),
                    (3, 2) => $f::<3, 2>(self, r0, p, buf),
                    (2, 2) => $f::<2, 2>(self, r0, p, buf),
                    (1, 2) => $f::<1, 2>(self, r0, p, buf),
                    (6, _) => $f::<6, 1>(self, r0, p, buf),
                    (5, _) => $f::<5, 1>(self, r0, p, buf),
                    (4, _) => $f::<4, 1>(self, r0, p, buf),
                    (3, _) => $f::<3, 1>(self, r0, p, buf),
                    (2, _) => $f::<2, 1>(self, r0, p, buf),
                    _ => $f::<1, 1>(self, r0, p, buf),
                }
            };
        }
        match self.path {
            Path::Portable => go!(portable),
            // SAFETY: `matmul` admits these paths only where the CPU has the features.
            #[cfg(target_arch = "x86_64")]
            Path::Avx512 => unsafe { go!(avx512) },
            #[cfg(target_arch = "x86_64")]
            Path::Avx2 => unsafe { go!(avx2) },
            #[cfg(target_arch = "x86_64")]
            Path::AvxVnni => unsafe { go!(avxvnni) },
            #[cfg(not(target_arch = "x86_64"))]
            _ => go!(portable),
        }
    }

    fn act_row(&self, r: usize) -> &[i8] {
        &self.a.q[r * self.a.stride..(r + 1) * self.a.stride]
    }
}

/// The stored code of input `4 s + t` of column `j` in a group's bytes `g`.
#[inline(always)]
fn code(g: &[u8], nibbles: bool, s: usize, j: usize, t: usize) -> i32 {
    if nibbles {
        ((g[s / 2 * 64 + 4 * j + t] >> (4 * (s % 2))) & 15) as i32
    } else {
        g[s * 64 + 4 * j + t] as i32
    }
}

/// The reference: the same sums in the same order, one column at a time.
fn portable<const R: usize, const P: usize>(
    ctx: &Ctx<'_>,
    r0: usize,
    p: usize,
    buf: &mut [[f32; PMAX * NR]; MR],
) {
    let w = ctx.w;
    let word = |b: &[u8], i: usize| [b[4 * i], b[4 * i + 1], b[4 * i + 2], b[4 * i + 3]];
    for (r, out) in buf.iter_mut().take(R).enumerate() {
        let a = ctx.act_row(r0 + r);
        let sums = &ctx.a.sums[(r0 + r) * w.ng..(r0 + r + 1) * w.ng];
        for pp in 0..P {
            for j in 0..NR {
                let mut f = 0f32;
                for g in 0..w.ng {
                    let (meta, bytes) = w.block(p + pp, g).split_at(w.meta);
                    let ag = &a[g * w.gs..(g + 1) * w.gs];
                    let scale = f32::from_ne_bytes(word(meta, j));
                    let no = w
                        .off
                        .unwrap_or_else(|| i32::from_ne_bytes(word(meta, NR + j)));
                    let mut d = no.wrapping_mul(sums[g]);
                    for s in 0..w.gs / 4 {
                        for t in 0..4 {
                            d = d.wrapping_add(
                                code(bytes, w.nibbles, s, j, t) * ag[4 * s + t] as i32,
                            );
                        }
                    }
                    f = (d as f32).mul_add(scale, f);
                }
                out[pp * NR + j] = f;
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
use std::arch::x86_64::*;

/// Four activation bytes at `p + i` as one 32-bit word (to broadcast).
///
/// # Safety
/// `p + i .. p + i + 4` must be readable.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn word(p: *const i8, i: usize) -> i32 {
    // SAFETY: the caller's promise.
    unsafe { p.add(i).cast::<i32>().read_unaligned() }
}

/// AVX-512 VNNI: `R` rows against `P` panels, one `vpdpbusd` per 64-byte step and row.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
#[allow(clippy::needless_range_loop)] // `g` walks the blocks and the sums alike
unsafe fn avx512<const R: usize, const P: usize>(
    ctx: &Ctx<'_>,
    r0: usize,
    p: usize,
    buf: &mut [[f32; PMAX * NR]; MR],
) {
    let w = ctx.w;
    let (stride, ng) = (ctx.a.stride, w.ng);
    // Every activation and sum read below lies inside rows r0 .. r0 + R (checked once).
    assert!((r0 + R) * stride <= ctx.a.q.len() && (r0 + R) * ng <= ctx.a.sums.len());
    // SAFETY: inside `q` and `sums` (the assert).
    let (q0, s0) = unsafe {
        (
            ctx.a.q.as_ptr().add(r0 * stride),
            ctx.a.sums.as_ptr().add(r0 * ng),
        )
    };
    let bs = w.gb + w.meta;
    // Every block read below lies inside panels p .. p + P (checked once: pointers, not slices,
    // in the group loop).
    assert!((p + P) * w.ng * bs <= w.packed.len());
    let mut base = [w.packed.as_ptr(); P];
    for (pp, b) in base.iter_mut().enumerate() {
        // SAFETY: inside `packed` (the assert).
        *b = unsafe { b.add((p + pp) * w.ng * bs) };
    }
    let mut accf = [[_mm512_setzero_ps(); P]; R];
    let nib = _mm512_set1_epi8(15);
    for g in 0..w.ng {
        let mut metas = base;
        let mut blocks = base;
        for pp in 0..P {
            // SAFETY: block g of panel p + pp, inside `packed` (the assert).
            metas[pp] = unsafe { base[pp].add(g * bs) };
            blocks[pp] = unsafe { metas[pp].add(w.meta) };
        }
        let mut acc = [[_mm512_setzero_si512(); P]; R];
        for pp in 0..P {
            for (r, a) in acc.iter_mut().enumerate() {
                // SAFETY: row r0 + r's sum of group g (the assert).
                let sum = unsafe { *s0.add(r * ng + g) };
                a[pp] = match w.off {
                    Some(o) => _mm512_set1_epi32(o.wrapping_mul(sum)),
                    None => {
                        // SAFETY: the block's meta holds NR scales, then NR offsets.
                        let no = unsafe { _mm512_loadu_si512(metas[pp].add(4 * NR).cast()) };
                        _mm512_mullo_epi32(no, _mm512_set1_epi32(sum))
                    }
                };
            }
        }
        let a0 = g * w.gs;
        if w.nibbles {
            for i in 0..w.gs / 8 {
                let mut lo = [_mm512_setzero_si512(); P];
                let mut hi = [_mm512_setzero_si512(); P];
                for pp in 0..P {
                    // SAFETY: step pair i of the group: 64 of its `gb` code bytes.
                    let v = unsafe { _mm512_loadu_si512(blocks[pp].add(64 * i).cast()) };
                    lo[pp] = _mm512_and_si512(v, nib);
                    hi[pp] = _mm512_and_si512(_mm512_srli_epi16::<4>(v), nib);
                }
                for r in 0..R {
                    // SAFETY: 8 bytes of row r0 + r inside its `stride` (the assert).
                    let x0 = _mm512_set1_epi32(unsafe { word(q0, r * stride + a0 + 8 * i) });
                    let x1 = _mm512_set1_epi32(unsafe { word(q0, r * stride + a0 + 8 * i + 4) });
                    for pp in 0..P {
                        acc[r][pp] = _mm512_dpbusd_epi32(acc[r][pp], lo[pp], x0);
                        acc[r][pp] = _mm512_dpbusd_epi32(acc[r][pp], hi[pp], x1);
                    }
                }
            }
        } else {
            for s in 0..w.gs / 4 {
                let mut v = [_mm512_setzero_si512(); P];
                for pp in 0..P {
                    // SAFETY: step s of the group: 64 of its `gb` code bytes.
                    v[pp] = unsafe { _mm512_loadu_si512(blocks[pp].add(64 * s).cast()) };
                }
                for r in 0..R {
                    // SAFETY: 4 bytes of row r0 + r inside its `stride` (the assert).
                    let x = _mm512_set1_epi32(unsafe { word(q0, r * stride + a0 + 4 * s) });
                    for pp in 0..P {
                        acc[r][pp] = _mm512_dpbusd_epi32(acc[r][pp], v[pp], x);
                    }
                }
            }
        }
        for pp in 0..P {
            // SAFETY: as for the offsets.
            let sc = unsafe { _mm512_loadu_ps(metas[pp].cast()) };
            for r in 0..R {
                accf[r][pp] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(acc[r][pp]), sc, accf[r][pp]);
            }
        }
    }
    for r in 0..R {
        for pp in 0..P {
            // SAFETY: `buf[r]` has room for PMAX panels.
            unsafe { _mm512_storeu_ps(buf[r][pp * NR..].as_mut_ptr(), accf[r][pp]) };
        }
    }
}

/// AVX2: each 64-byte step as two 256-bit halves (8 columns each), see [`ymm`].
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn avx2<const R: usize, const P: usize>(
    ctx: &Ctx<'_>,
    r0: usize,
    p: usize,
    buf: &mut [[f32; PMAX * NR]; MR],
) {
    // SAFETY: the caller's promise; this function has the features `ymm` needs.
    unsafe { ymm::<R, P, false>(ctx, r0, p, buf) }
}

/// AVX-VNNI: the AVX2 tile with the 256-bit `vpdpbusd`, see [`ymm`].
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,avxvnni")]
unsafe fn avxvnni<const R: usize, const P: usize>(
    ctx: &Ctx<'_>,
    r0: usize,
    p: usize,
    buf: &mut [[f32; PMAX * NR]; MR],
) {
    // SAFETY: the caller's promise; this function has the features `ymm` needs.
    unsafe { ymm::<R, P, true>(ctx, r0, p, buf) }
}

/// The 256-bit tile: each 64-byte step as two halves (8 columns each). With `VNNI`, one
/// `vpdpbusd` per half and step (u8 codes x s8 activations, summed in int32: no saturation);
/// without, `maddubs` takes the codes as its unsigned operand, split into nibbles first so that
/// a pair of products stays within `2 x 15 x 128` and the int16 lanes never saturate. Both give
/// the same int32 sums.
///
/// # Safety
/// The CPU has AVX2 and FMA (and AVX-VNNI with `VNNI`); inlined only into [`avx2`] and
/// [`avxvnni`], which enable them.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
#[allow(clippy::needless_range_loop)] // `r` walks the activation rows and the accumulators alike
unsafe fn ymm<const R: usize, const P: usize, const VNNI: bool>(
    ctx: &Ctx<'_>,
    r0: usize,
    p: usize,
    buf: &mut [[f32; PMAX * NR]; MR],
) {
    let w = ctx.w;
    let (stride, ng) = (ctx.a.stride, w.ng);
    // Every activation and sum read below lies inside rows r0 .. r0 + R (checked once).
    assert!((r0 + R) * stride <= ctx.a.q.len() && (r0 + R) * ng <= ctx.a.sums.len());
    // SAFETY: inside `q` and `sums` (the assert).
    let (q0, s0) = unsafe {
        (
            ctx.a.q.as_ptr().add(r0 * stride),
            ctx.a.sums.as_ptr().add(r0 * ng),
        )
    };
    let nib = _mm256_set1_epi8(15);
    let ones = _mm256_set1_epi16(1);
    let sixteen = _mm256_set1_epi16(16);
    let bs = w.gb + w.meta;
    // Every block read below lies inside panels p .. p + P (checked once: pointers, not slices,
    // in the group loop).
    assert!((p + P) * w.ng * bs <= w.packed.len());
    // Panels one at a time, halves as the inner register dimension (16 registers only).
    for pp in 0..P {
        let mut accf = [[_mm256_setzero_ps(); 2]; R];
        // SAFETY: inside `packed` (the assert).
        let base = unsafe { w.packed.as_ptr().add((p + pp) * w.ng * bs) };
        for g in 0..w.ng {
            // SAFETY: block g of the panel, inside `packed` (the assert).
            let meta = unsafe { base.add(g * bs) };
            let bytes = unsafe { meta.add(w.meta) };
            let mut acc = [[_mm256_setzero_si256(); 2]; R];
            for h in 0..2 {
                for (r, a) in acc.iter_mut().enumerate() {
                    // SAFETY: row r0 + r's sum of group g (the assert).
                    let sum = unsafe { *s0.add(r * ng + g) };
                    a[h] = match w.off {
                        Some(o) => _mm256_set1_epi32(o.wrapping_mul(sum)),
                        None => {
                            // SAFETY: the block's meta holds NR scales, then NR offsets.
                            let no =
                                unsafe { _mm256_loadu_si256(meta.add(4 * (NR + 8 * h)).cast()) };
                            _mm256_mullo_epi32(no, _mm256_set1_epi32(sum))
                        }
                    };
                }
            }
            let a0 = g * w.gs;
            if w.nibbles {
                for i in 0..w.gs / 8 {
                    let mut lo = [_mm256_setzero_si256(); 2];
                    let mut hi = [_mm256_setzero_si256(); 2];
                    for h in 0..2 {
                        // SAFETY: 32 bytes of step pair i inside `bytes`.
                        let v = unsafe { _mm256_loadu_si256(bytes.add(64 * i + 32 * h).cast()) };
                        lo[h] = _mm256_and_si256(v, nib);
                        hi[h] = _mm256_and_si256(_mm256_srli_epi16::<4>(v), nib);
                    }
                    for r in 0..R {
                        // SAFETY: 8 bytes of row r0 + r inside its `stride` (the assert).
                        let x0 = _mm256_set1_epi32(unsafe { word(q0, r * stride + a0 + 8 * i) });
                        let x1 =
                            _mm256_set1_epi32(unsafe { word(q0, r * stride + a0 + 8 * i + 4) });
                        for h in 0..2 {
                            acc[r][h] = if VNNI {
                                let a = _mm256_dpbusd_avx_epi32(acc[r][h], lo[h], x0);
                                _mm256_dpbusd_avx_epi32(a, hi[h], x1)
                            } else {
                                let s = _mm256_add_epi16(
                                    _mm256_maddubs_epi16(lo[h], x0),
                                    _mm256_maddubs_epi16(hi[h], x1),
                                );
                                _mm256_add_epi32(acc[r][h], _mm256_madd_epi16(s, ones))
                            };
                        }
                    }
                }
            } else {
                for s in 0..w.gs / 4 {
                    let mut v = [_mm256_setzero_si256(); 2];
                    let mut lo = [_mm256_setzero_si256(); 2];
                    let mut hi = [_mm256_setzero_si256(); 2];
                    for h in 0..2 {
                        // SAFETY: 32 bytes of step s inside `bytes`.
                        v[h] = unsafe { _mm256_loadu_si256(bytes.add(64 * s + 32 * h).cast()) };
                        if !VNNI {
                            lo[h] = _mm256_and_si256(v[h], nib);
                            hi[h] = _mm256_and_si256(_mm256_srli_epi16::<4>(v[h]), nib);
                        }
                    }
                    for r in 0..R {
                        // SAFETY: 4 bytes of row r0 + r inside its `stride` (the assert).
                        let x = _mm256_set1_epi32(unsafe { word(q0, r * stride + a0 + 4 * s) });
                        if VNNI {
                            for h in 0..2 {
                                acc[r][h] = _mm256_dpbusd_avx_epi32(acc[r][h], v[h], x);
                            }
                            continue;
                        }
                        for h in 0..2 {
                            let l = _mm256_madd_epi16(_mm256_maddubs_epi16(lo[h], x), ones);
                            let u = _mm256_madd_epi16(_mm256_maddubs_epi16(hi[h], x), sixteen);
                            acc[r][h] = _mm256_add_epi32(acc[r][h], _mm256_add_epi32(l, u));
                        }
                    }
                }
            }
            for h in 0..2 {
                // SAFETY: as for the offsets.
                let sc = unsafe { _mm256_loadu_ps(meta.add(32 * h).cast()) };
                for r in 0..R {
                    accf[r][h] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(acc[r][h]), sc, accf[r][h]);
                }
            }
        }
        for r in 0..R {
            for h in 0..2 {
                // SAFETY: `buf[r]` has room for PMAX panels.
                unsafe { _mm256_storeu_ps(buf[r][pp * NR + 8 * h..].as_mut_ptr(), accf[r][h]) };
            }
        }
    }
}

/// The int8 multiply-accumulate rate of one thread in a tight loop of the best instruction the
/// CPU and `LOWBIT_ISA` allow (AVX-512 VNNI `vpdpbusd`, AVX-VNNI's 256-bit one, else AVX2
/// `maddubs`), twelve
/// independent accumulators in registers, no memory traffic: the ceiling the integer GEMMs are
/// measured against. Returns the instruction's name and MAC/s (`None` on the portable path).
pub fn peak_mac_rate(seconds: f64) -> Option<(&'static str, f64)> {
    #[cfg(target_arch = "x86_64")]
    {
        const ACC: usize = 12;
        #[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
        unsafe fn vnni(n: usize) -> i32 {
            let (a, b) = (
                std::hint::black_box(_mm512_set1_epi8(1)),
                std::hint::black_box(_mm512_set1_epi8(2)),
            );
            let mut acc = [_mm512_setzero_si512(); ACC];
            for _ in 0..n {
                for x in acc.iter_mut() {
                    *x = _mm512_dpbusd_epi32(*x, a, b);
                }
            }
            acc.iter().map(|&v| _mm512_reduce_add_epi32(v)).sum()
        }
        #[target_feature(enable = "avx2,avxvnni")]
        unsafe fn vnni256(n: usize) -> i32 {
            let (a, b) = (
                std::hint::black_box(_mm256_set1_epi8(1)),
                std::hint::black_box(_mm256_set1_epi8(2)),
            );
            let mut acc = [_mm256_setzero_si256(); ACC];
            for _ in 0..n {
                for x in acc.iter_mut() {
                    *x = _mm256_dpbusd_avx_epi32(*x, a, b);
                }
            }
            let mut out = [0i32; 8];
            let s = acc
                .iter()
                .fold(_mm256_setzero_si256(), |s, &v| _mm256_add_epi32(s, v));
            // SAFETY: `out` holds 32 bytes.
            unsafe { _mm256_storeu_si256(out.as_mut_ptr().cast(), s) };
            out.iter().fold(0i32, |s, &v| s.wrapping_add(v))
        }
        #[target_feature(enable = "avx2")]
        unsafe fn maddubs(n: usize) -> i32 {
            let b = std::hint::black_box(_mm256_set1_epi8(2));
            let mut acc = [std::hint::black_box(_mm256_set1_epi8(1)); ACC];
            for _ in 0..n {
                for x in acc.iter_mut() {
                    // Each product reads its accumulator, so none can be hoisted out of the loop.
                    *x = _mm256_add_epi16(*x, _mm256_maddubs_epi16(*x, b));
                }
            }
            let mut out = [0i16; 16];
            let s = acc
                .iter()
                .fold(_mm256_setzero_si256(), |s, &v| _mm256_add_epi16(s, v));
            // SAFETY: `out` holds 32 bytes.
            unsafe { _mm256_storeu_si256(out.as_mut_ptr().cast(), s) };
            out.iter().map(|&v| v as i32).sum()
        }
        let (name, macs, run): (&str, usize, unsafe fn(usize) -> i32) = match Path::best() {
            Path::Avx512 => ("avx512vnni vpdpbusd", 64, vnni),
            Path::AvxVnni => ("avxvnni vpdpbusd", 32, vnni256),
            Path::Avx2 => ("avx2 maddubs", 32, maddubs),
            Path::Portable => return None,
        };
        // Grow the count until one run lasts a tenth of the time, then take the best of runs.
        let mut n = 1 << 12;
        let mut best = f64::MAX;
        let start = std::time::Instant::now();
        while start.elapsed().as_secs_f64() < seconds {
            let t = std::time::Instant::now();
            // SAFETY: `Path::best()` found the instruction set on this CPU.
            std::hint::black_box(unsafe { run(n) });
            let dt = t.elapsed().as_secs_f64();
            if dt < seconds / 10.0 {
                n *= 2;
                continue;
            }
            best = best.min(dt / n as f64);
        }
        (best < f64::MAX).then(|| (name, (ACC * macs) as f64 / best))
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = seconds;
        None
    }
}

/// A linear layer on an `IntMatrix`: int8 activations per row, the integer GEMM, a bias.
#[derive(Clone, Debug)]
pub struct IntLinear {
    pub w: IntMatrix,
    pub bias: Option<Vec<f32>>,
}

impl IntLinear {
    pub fn new(t: &QuantizedTensor, bias: Option<Vec<f32>>) -> Result<Self> {
        let w = IntMatrix::from_quantized(t)?;
        super::linear::check_bias(w.n, bias.as_deref())?;
        Ok(IntLinear { w, bias })
    }

    /// `y = q_x @ dequantized(w).T / s_x + bias` for x (rows, in_features), then `post` on each
    /// finished stretch of an output row.
    pub fn forward_post(
        &self,
        x: ArrayView2<'_, f32>,
        post: Option<&RowFn>,
    ) -> Result<Array2<f32>> {
        self.forward_on(x, post, Path::best())
    }

    /// `forward_post` on a chosen kernel path (tests and benches compare them).
    pub fn forward_on(
        &self,
        x: ArrayView2<'_, f32>,
        post: Option<&RowFn>,
        path: Path,
    ) -> Result<Array2<f32>> {
        let acts = self.w.quantize(x)?;
        self.w.matmul(&acts, self.bias.as_deref(), post, path)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::quant::spec::{quantize, QuantSpec};
    use ndarray::{Array2, ArrayD, IxDyn};

    fn lcg(seed: u64) -> impl FnMut() -> u64 {
        let mut s = seed;
        move || {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            s >> 33
        }
    }

    fn floats(n: usize, k: usize, seed: u64) -> Array2<f32> {
        let mut r = lcg(seed);
        Array2::from_shape_fn((n, k), |_| (r() % 2001) as f32 / 1000.0 - 1.0)
    }

    fn spec(bits: u32, sym: bool, gran: Granularity, g: Option<usize>) -> QuantSpec {
        QuantSpec::new(bits, sym, gran, 0, g).unwrap()
    }

    /// An independent reference from the dequantization formula: per group, the exact
    /// integer sum of (q - zp) a, then the documented float steps.
    fn reference(
        t: &QuantizedTensor,
        a: &Array2<i8>,
        s_x: &[f32],
        bias: Option<&[f32]>,
        group: usize,
    ) -> Array2<f32> {
        let (n, k) = (t.shape[0], t.shape[1..].iter().product::<usize>());
        let u = pack::unpack(&t.codes, t.spec.bits, t.numel()).unwrap();
        let qmin = t.spec.range().min;
        let sc: Vec<f32> = t.scales.iter().copied().collect();
        let zp: Vec<i32> = t.zero_points.iter().copied().collect();
        let ng = k.div_ceil(group);
        let at = |c: usize, g: usize| match t.spec.granularity {
            Granularity::Tensor => 0,
            Granularity::Channel => c,
            Granularity::Group => c * ng + g,
        };
        Array2::from_shape_fn((a.nrows(), n), |(r, c)| {
            let mut f = 0f32;
            for g in 0..ng {
                let mut d = 0i64;
                for i in g * group..((g + 1) * group).min(k) {
                    let q = u[c * k + i] as i64 + qmin as i64 - zp[at(c, g)] as i64;
                    d += q * a[[r, i]] as i64;
                }
                f = (d as i32 as f32).mul_add(sc[at(c, g)], f);
            }
            (f as f64 * (1.0 / s_x[r] as f64) + bias.map_or(0.0, |b| b[c] as f64)) as f32
        })
    }

    fn check(t: &QuantizedTensor, a: &Array2<i8>, with_bias: bool) {
        let w = IntMatrix::from_quantized(t).unwrap();
        let s_x: Vec<f32> = (0..a.nrows()).map(|r| 1.0 + r as f32 / 7.0).collect();
        let bias: Vec<f32> = (0..w.n).map(|c| c as f32 / 10.0 - 1.0).collect();
        let bias = with_bias.then_some(&bias[..]);
        let want = reference(t, a, &s_x, bias, w.group);
        let acts = w.acts_from_codes(a.view(), &s_x).unwrap();
        for path in Path::available() {
            let got = w.matmul(&acts, bias, None, path).unwrap();
            let bits = |x: &Array2<f32>| x.mapv(f32::to_bits);
            assert!(
                bits(&got) == bits(&want),
                "{} path differs: {:?} bits {}, shape {:?}, acts {:?}",
                path.name(),
                t.spec.granularity,
                t.spec.bits,
                t.shape,
                a.dim()
            );
        }
    }

    fn codes(m: usize, k: usize, seed: u64) -> Array2<i8> {
        let mut r = lcg(seed);
        Array2::from_shape_fn((m, k), |_| (r() % 256) as i64 as i8)
    }

    #[test]
    fn every_path_equals_the_reference() {
        eprintln!(
            "integer GEMM paths run here: {:?}",
            Path::available()
                .iter()
                .map(|p| p.name())
                .collect::<Vec<_>>()
        );
        for (m, n, k) in [
            (1, 1, 1),
            (1, 16, 32),
            (3, 17, 40),
            (5, 33, 100),
            (9, 48, 256),
            (2, 7, 3),
            (6, 40, 96),
        ] {
            let x = floats(n, k, (m * n * k) as u64);
            let a = codes(m, k, 3 + k as u64);
            for bits in [2, 3, 4, 5, 8] {
                for sym in [true, false] {
                    for (gran, g) in [
                        (Granularity::Tensor, None),
                        (Granularity::Channel, None),
                        (Granularity::Group, Some(32)),
                        (Granularity::Group, Some(12)),
                    ] {
                        let t =
                            quantize(x.view().into_dyn(), spec(bits, sym, gran, g), None).unwrap();
                        check(&t, &a, (m + bits as usize).is_multiple_of(2));
                    }
                }
            }
        }
    }

    #[test]
    fn extreme_codes_stay_exact() {
        // Every activation -128 or 127 against every weight at its extreme, k past 65,536.
        for k in [4097, 65543] {
            for (av, wv) in [(-128i8, 127f32), (127, -1.0), (-128, -1.0)] {
                let a = Array2::from_elem((3, k), av);
                let x = Array2::from_elem((5, k), wv);
                for bits in [8, 4] {
                    let t = quantize(
                        x.view().into_dyn(),
                        spec(bits, true, Granularity::Channel, None),
                        None,
                    )
                    .unwrap();
                    check(&t, &a, true);
                }
            }
        }
        // Asymmetric codes at 0 and 255 (zero points at either end).
        let mut x = floats(20, 300, 9);
        x.row_mut(0).fill(1.0);
        x.row_mut(1).fill(-1.0);
        let t = quantize(
            x.view().into_dyn(),
            spec(8, false, Granularity::Group, Some(64)),
            None,
        )
        .unwrap();
        check(&t, &codes(7, 300, 1), false);
    }

    #[test]
    fn the_peak_probe_reports_a_rate_where_a_simd_path_runs() {
        match (Path::best(), peak_mac_rate(0.05)) {
            (Path::Portable, r) => assert!(r.is_none()),
            (_, Some((name, rate))) => {
                eprintln!("{name}: {:.1} G MAC/s per thread", rate / 1e9);
                assert!(rate.is_finite() && rate > 1e8);
            }
            (p, None) => panic!("no rate on the {} path", p.name()),
        }
    }

    #[test]
    fn quantized_forward_tracks_the_float_product() {
        let (m, n, k) = (6, 37, 200);
        let w = floats(n, k, 5);
        let x = floats(m, k, 6);
        let t = quantize(
            w.view().into_dyn(),
            spec(4, true, Granularity::Group, Some(32)),
            None,
        )
        .unwrap();
        let deq = t.dequantize().unwrap();
        let deq = deq.into_shape_with_order((n, k)).unwrap();
        let lin = IntLinear::new(&t, None).unwrap();
        let y = lin.forward_post(x.view(), None).unwrap();
        let (q, s) = super::super::quant::activation_quant(x.view(), 8).unwrap();
        let xf = Array2::from_shape_fn((m, k), |(r, i)| q[[r, i]] as f32 / s[r]);
        let want = xf.dot(&deq.t());
        for (a, b) in y.iter().zip(want.iter()) {
            assert!((a - b).abs() <= 1e-5 * (1.0 + b.abs()), "{a} vs {b}");
        }
        // A shape the kernels do not take, and a NaN input, are errors.
        let conv = ArrayD::from_shape_fn(IxDyn(&[4, 3, 8]), |_| 0.5f32);
        let t = quantize(
            conv.view(),
            spec(4, true, Granularity::Group, Some(4)),
            None,
        )
        .unwrap();
        assert!(IntMatrix::from_quantized(&t).is_err());
        let mut bad = x.clone();
        bad[[1, 3]] = f32::NAN;
        assert!(lin.forward_post(bad.view(), None).is_err());
    }
}

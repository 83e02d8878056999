//! Ternary weights packed for the W1.58 A8 kernel, and the integer GEMM / GEMV.
//!
//! Layout: each weight row is padded to a multiple of 128 with zero codes and stored as
//! `u = code + 1` in 2 bits. A block of 128 weights takes 32 bytes; byte `j` holds weight
//! `32 g + j` of the block in bits `2g..2g+2` (g = 0..4), so four shifts and masks give four
//! vectors of 32 consecutive weights, ready for `maddubs` against 32 int8 activations.
//! Since `Σ u q = Σ code q + Σ q`, the activation row sum is subtracted at the end.
use crate::{ensure, Result};
use ndarray::{Array2, ArrayView2, ArrayViewMut2, Axis};
use rayon::prelude::*;
use std::mem::MaybeUninit;

pub const BLOCK: usize = 128;

/// A ternary weight matrix (out_features x in_features), packed at 2 bits per weight.
#[derive(Clone, Debug)]
pub struct TernaryMatrix {
    pub n: usize,
    pub k: usize,
    /// `k` rounded up to a multiple of `BLOCK`.
    pub kp: usize,
    /// `n * kp / 4` bytes.
    pub packed: Vec<u8>,
}

impl TernaryMatrix {
    /// Packs int8 codes in {-1, 0, 1}.
    pub fn from_codes(codes: ArrayView2<'_, i8>) -> Result<Self> {
        let (n, k) = codes.dim();
        ensure!(
            codes.iter().all(|c| (-1..=1).contains(c)),
            "ternary codes must be -1, 0 or 1"
        );
        let kp = k.div_ceil(BLOCK) * BLOCK;
        let mut packed = vec![0u8; n * kp / 4];
        packed
            .par_chunks_mut((kp / 4).max(1))
            .zip(codes.outer_iter().into_par_iter())
            .for_each(|(dst, row)| {
                let u = |i: usize| if i < k { (row[i] + 1) as u8 } else { 1 };
                for (b, blk) in dst.chunks_mut(BLOCK / 4).enumerate() {
                    for (j, byte) in blk.iter_mut().enumerate() {
                        let base = b * BLOCK + j;
                        *byte = u(base) | u(base + 32) << 2 | u(base + 64) << 4 | u(base + 96) << 6;
                    }
                }
            });
        Ok(TernaryMatrix { n, k, kp, packed })
    }

    /// The codes back (for checks and serialisation).
    pub fn codes(&self) -> Array2<i8> {
        Array2::from_shape_fn((self.n, self.k), |(r, i)| {
            let (b, w) = (i / BLOCK, i % BLOCK);
            let byte = self.packed[r * self.kp / 4 + b * BLOCK / 4 + w % 32];
            ((byte >> (2 * (w / 32))) & 3) as i8 - 1
        })
    }

    /// Bytes the packed weights take.
    pub fn nbytes(&self) -> usize {
        self.packed.len()
    }

    /// Exact `q @ codes.T` in int32 for int8 activations `q` (m x k).
    pub fn matmul(&self, q: ArrayView2<'_, i8>) -> Result<Array2<i32>> {
        self.matmul_with(q, &Exact, super::use_avx2())
    }

    /// `matmul` on a chosen kernel path (tests compare them).
    pub fn matmul_on(&self, q: ArrayView2<'_, i8>, avx2: bool) -> Result<Array2<i32>> {
        self.matmul_with(q, &Exact, avx2)
    }

    /// `q @ codes.T` with each exact int32 product passed through `epi` as it leaves the
    /// kernel's registers (no int32 matrix in between).
    pub fn matmul_with<E: Epilogue>(
        &self,
        q: ArrayView2<'_, i8>,
        epi: &E,
        avx2: bool,
    ) -> Result<Array2<E::Out>> {
        let k = q.ncols();
        ensure!(
            k == self.k,
            "activations have {k} features, the weights {}",
            self.k
        );
        self.matmul_acts(&Acts::from_codes(q), epi, avx2)
    }

    /// `matmul_with` on activations already laid out for the kernels (quantized once for
    /// several layers that share an input, say).
    pub fn matmul_acts<E: Epilogue>(
        &self,
        acts: &Acts,
        epi: &E,
        avx2: bool,
    ) -> Result<Array2<E::Out>> {
        ensure!(
            acts.k == self.k,
            "activations have {} features, the weights {}",
            acts.k,
            self.k
        );
        let (m, n) = (acts.m, self.n);
        // Not cleared first: every task writes each element of its block once, while the
        // block's lines are in cache (clearing 1024 x 1536 floats was a pass over memory of
        // its own, 3% of a BERT forward).
        let mut out = Array2::<E::Out>::uninit((m, n));
        self.matmul_into(acts, epi, avx2, &mut out);
        // SAFETY: `matmul_into` wrote every element (each path covers all rows and columns).
        Ok(unsafe { out.assume_init() })
    }

    fn matmul_into<E: Epilogue>(
        &self,
        acts: &Acts,
        epi: &E,
        avx2: bool,
        out: &mut Array2<MaybeUninit<E::Out>>,
    ) {
        let (m, n) = out.dim();
        if m == 0 || n == 0 {
            return;
        }
        let (qp, qs, sums) = (&acts.qp, acts.qs, &acts.sums);
        #[cfg(target_arch = "x86_64")]
        if avx2 && uses_panels(m, self.k) {
            panels::gemm(self, qp, qs, sums, epi, out);
            return;
        }
        // Tasks own a range of weight rows (output columns), written straight into `out`.
        // A GEMV gets a few large tasks per thread (it is over in microseconds, and each task
        // costs a steal); a GEMM gets more, smaller ones so both cores finish together.
        let per_thread = if m <= 2 { 4 } else { 8 };
        let tasks = rayon::current_num_threads().max(1) * per_thread;
        let rows_per_task = n.div_ceil(tasks).next_multiple_of(4);
        let vnni = avx2 && super::use_vnni();
        let (qz, qzs) = if vnni {
            zmm_layout(qp, qs, m, self.kp)
        } else {
            (Vec::new(), 0)
        };
        let ctx = Ctx {
            w: self,
            qp,
            qs,
            sums,
            epi,
            avx2,
            vnni,
            vnni256: avx2 && super::use_avx_vnni(),
            qz: &qz,
            qzs,
        };
        out.axis_chunks_iter_mut(Axis(1), rows_per_task)
            .into_par_iter()
            .enumerate()
            .for_each(|(t, mut dst)| {
                ctx.task(t * rows_per_task, &mut dst);
                // SAFETY: the task wrote every element of `dst`.
                unsafe { finish_rows(epi, &mut dst) };
            });
    }
}

/// int8 activations as the kernels read them: rows zero-padded (zeros contribute nothing) to
/// `qs = k rounded up to BLOCK, + 64` bytes, and their row sums. The extra cache line per row
/// keeps the rows of a tile out of one another's L1 sets (with k = 4096 a plain stride of
/// 4 KiB maps them all to one set).
pub struct Acts {
    pub m: usize,
    pub k: usize,
    qs: usize,
    qp: Vec<i8>,
    sums: Vec<i32>,
}

impl Acts {
    /// `fill(r, row)` writes row `r`'s k codes; its results come back in row order.
    fn build<T: Send>(
        m: usize,
        k: usize,
        fill: impl Fn(usize, &mut [i8]) -> T + Sync,
    ) -> (Acts, Vec<T>) {
        let qs = k.div_ceil(BLOCK) * BLOCK + 64;
        let mut qp = vec![0i8; m * qs];
        let row = |(r, dst): (usize, &mut [i8])| -> (i32, T) {
            let t = fill(r, &mut dst[..k]);
            // A slice sums in vector lanes (an ndarray iterator went a byte at a time).
            (dst[..k].iter().map(|&v| v as i32).sum(), t)
        };
        // Small inputs (a decode step's rows) stay on this thread.
        let (sums, out) = if m * k < 1 << 16 {
            qp.chunks_mut(qs).enumerate().map(row).unzip()
        } else {
            qp.par_chunks_mut(qs).enumerate().map(row).unzip()
        };
        (Acts { m, k, qs, qp, sums }, out)
    }

    /// int8 codes (m x k), copied.
    pub fn from_codes(q: ArrayView2<'_, i8>) -> Acts {
        let (m, k) = q.dim();
        Acts::build(m, k, |r, dst| {
            let row = q.row(r);
            match row.as_slice() {
                Some(src) => dst.copy_from_slice(src),
                None => dst.iter_mut().zip(row).for_each(|(d, s)| *d = *s),
            }
        })
        .0
    }

    /// `activation_quant(x, 8)` written straight into the kernels' layout; also returns the
    /// per-row multipliers.
    pub fn quantize(x: ArrayView2<'_, f32>) -> Result<(Acts, Vec<f32>)> {
        let (m, k) = x.dim();
        let (acts, scales) =
            Acts::build(m, k, |r, dst| super::quant::quantize_row(x.row(r), dst, 8));
        ensure!(scales.iter().all(|s| !s.is_nan()), "x contains NaN or Inf");
        Ok((acts, scales))
    }
}

/// What a ternary GEMM writes for output `(r, c)` given its exact product `v`.
pub trait Epilogue: Sync {
    type Out: Copy + Default + Send + Sync;
    fn out(&self, r: usize, c: usize, v: i32) -> Self::Out;

    /// `out[i] = out(r, c0 + i, v[i] - sub)`; inlined into a loop compiled for the CPU's
    /// vectors.
    #[inline(always)]
    fn row(&self, r: usize, c0: usize, v: &[i32], sub: i32, out: &mut [MaybeUninit<Self::Out>]) {
        for (i, (o, &v)) in out.iter_mut().zip(v).enumerate() {
            *o = MaybeUninit::new(self.out(r, c0 + i, v - sub));
        }
    }

    /// Runs once on each finished stretch of an output row, while it is in cache (an
    /// activation function, say).
    #[inline(always)]
    fn finish(&self, _out: &mut [Self::Out]) {}
}

/// `Epilogue::finish` on every row of a task's finished block.
///
/// # Safety
/// Every element of `dst` must have been written.
unsafe fn finish_rows<E: Epilogue>(epi: &E, dst: &mut ArrayViewMut2<'_, MaybeUninit<E::Out>>) {
    for mut row in dst.rows_mut() {
        let row = row.as_slice_mut().expect("task columns are contiguous");
        // SAFETY: initialized (the caller's promise); `MaybeUninit<T>` has `T`'s layout.
        epi.finish(unsafe { &mut *(row as *mut [MaybeUninit<E::Out>] as *mut [E::Out]) });
    }
}

/// The exact int32 products.
pub struct Exact;

impl Epilogue for Exact {
    type Out = i32;
    #[inline(always)]
    fn out(&self, _: usize, _: usize, v: i32) -> i32 {
        v
    }
}

/// `v * (row[r] * col[c]) + bias[c]`, evaluated in f64 and rounded to f32, then `post` on each
/// finished stretch of a row.
pub struct Rescale<'a> {
    pub row: &'a [f64],
    pub col: &'a [f64],
    pub bias: &'a [f64],
    pub post: Option<&'a RowFn>,
}

/// A function run on finished output rows (see `Epilogue::finish`).
pub type RowFn = dyn Fn(&mut [f32]) + Sync;

impl Epilogue for Rescale<'_> {
    type Out = f32;
    #[inline(always)]
    fn out(&self, r: usize, c: usize, v: i32) -> f32 {
        (v as f64 * (self.row[r] * self.col[c]) + self.bias[c]) as f32
    }

    #[inline(always)]
    fn row(&self, r: usize, c0: usize, v: &[i32], sub: i32, out: &mut [MaybeUninit<f32>]) {
        let n = out.len();
        let (col, bias, rs) = (&self.col[c0..c0 + n], &self.bias[c0..c0 + n], self.row[r]);
        for (((o, &v), &c), &b) in out.iter_mut().zip(v).zip(col).zip(bias) {
            *o = MaybeUninit::new(((v - sub) as f64 * (rs * c) + b) as f32);
        }
    }

    #[inline(always)]
    fn finish(&self, out: &mut [f32]) {
        if let Some(post) = self.post {
            post(out)
        }
    }
}

/// One output row of a task through its epilogue, compiled per instruction set.
#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
struct RowEpilogue<'a, E: Epilogue> {
    epi: &'a E,
    r: usize,
    c0: usize,
    v: &'a [i32],
    sub: i32,
    out: &'a mut [MaybeUninit<E::Out>],
}

impl<E: Epilogue> crate::quant::simd::Kernel for RowEpilogue<'_, E> {
    type Output = ();
    #[inline(always)]
    fn run<S: crate::quant::simd::Isa>(self) {
        self.epi.row(self.r, self.c0, self.v, self.sub, self.out)
    }
}

/// What every task of one `matmul_with` call reads.
struct Ctx<'a, E> {
    w: &'a TernaryMatrix,
    /// Activations, `m` rows of `qs` bytes (zero-padded beyond `k`).
    qp: &'a [i8],
    qs: usize,
    #[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
    sums: &'a [i32],
    epi: &'a E,
    #[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
    avx2: bool,
    /// The AVX2 tiles take AVX-512 VNNI (`avx2` and `use_vnni()`).
    #[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
    vnni: bool,
    /// Without `vnni`, the AVX2 tiles take AVX-VNNI's 256-bit `vpdpbusd` (`use_avx_vnni()`).
    #[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
    vnni256: bool,
    /// With `vnni` on the row tiles, the activations again in `zmm_layout`'s order, rows
    /// `qzs` bytes apart (empty for the panels, which read the plain layout).
    #[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
    qz: &'a [i8],
    #[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
    qzs: usize,
}

impl<E: Epilogue> Ctx<'_, E> {
    /// Output columns `n0 .. n0 + dst.ncols()` for every activation row.
    fn task(&self, n0: usize, dst: &mut ArrayViewMut2<'_, MaybeUninit<E::Out>>) {
        let (m, nrows) = dst.dim();
        let (kp, wrow) = (self.w.kp, self.w.kp / 4);
        let rows = &self.w.packed[n0 * wrow..(n0 + nrows) * wrow];
        #[cfg(target_arch = "x86_64")]
        if self.avx2 {
            // Activation rows four at a time (4 kp bytes, in L1 while the task's weight rows
            // stream past) against one weight row: each unpacked weight vector feeds four
            // `maddubs`, and the four accumulators with their operands fit in the 16 vector
            // registers. (A 4 x 2 tile spills accumulators to the stack in the inner loop and
            // ran at 60% of this speed.) The four sums of each weight row go to `buf`, one row of
            // it per activation row, and the epilogue then runs along whole rows, vectorized. Leftover rows go two at a
            // time against two weight rows, then one at a time against four, so that every
            // load still feeds several.
            let mut buf = vec![0i32; 4 * nrows];
            let mut r0 = 0;
            while r0 + 4 <= m {
                let q = &self.qp[r0 * self.qs..(r0 + 4) * self.qs];
                for (i, w) in rows.chunks_exact(wrow).enumerate() {
                    // SAFETY: this path is taken only when use_avx2() found AVX2 on the CPU.
                    let acc = unsafe {
                        if self.vnni {
                            let qz = &self.qz[r0 * self.qzs..(r0 + 4) * self.qzs];
                            zmm_row_tile::<4, 1>(w, wrow, qz, self.qzs)
                        } else if self.vnni256 {
                            avxvnni_row_tile::<4, 1>(w, wrow, q, self.qs)
                        } else {
                            avx2_tile::<4, 1>(w, wrow, q, self.qs)
                        }
                    };
                    for (r, v) in acc[0].into_iter().enumerate() {
                        buf[r * nrows + i] = v;
                    }
                }
                for r in 0..4 {
                    let mut row = dst.row_mut(r0 + r);
                    let out = row.as_slice_mut().expect("task columns are contiguous");
                    crate::quant::simd::dispatch(RowEpilogue {
                        epi: self.epi,
                        r: r0 + r,
                        c0: n0,
                        v: &buf[r * nrows..(r + 1) * nrows],
                        sub: self.sums[r0 + r],
                        out,
                    });
                }
                r0 += 4;
            }
            while r0 < m {
                let rs = if m - r0 >= 2 { 2 } else { 1 };
                let step = 4 / rs;
                let mut i = 0;
                while i < nrows {
                    let ws = (nrows - i).min(step);
                    let t = Tile {
                        ctx: self,
                        w: &rows[i * wrow..(i + ws) * wrow],
                        r0,
                        n0,
                        i,
                    };
                    // SAFETY: this path is taken only when use_avx2() found AVX2 on the CPU.
                    unsafe {
                        match (rs, ws) {
                            (2, 2) => t.run::<2, 2>(dst),
                            (2, _) => t.run::<2, 1>(dst),
                            (_, 4) => t.run::<1, 4>(dst),
                            (_, 3) => t.run::<1, 3>(dst),
                            (_, 2) => t.run::<1, 2>(dst),
                            _ => t.run::<1, 1>(dst),
                        }
                    }
                    i += ws;
                }
                r0 += rs;
            }
            return;
        }
        for (i, w) in rows.chunks(wrow).enumerate() {
            for r in 0..m {
                let v = dot_scalar(w, &self.qp[r * self.qs..r * self.qs + kp]);
                dst[[r, i]] = MaybeUninit::new(self.epi.out(r, n0 + i, v));
            }
        }
    }
}

/// `R` activation rows from `r0` against `W` consecutive weight rows (task column `i`).
#[cfg(target_arch = "x86_64")]
struct Tile<'a, E> {
    ctx: &'a Ctx<'a, E>,
    w: &'a [u8],
    r0: usize,
    /// The task's first output column; the tile's first is `n0 + i`.
    n0: usize,
    i: usize,
}

#[cfg(target_arch = "x86_64")]
impl<E: Epilogue> Tile<'_, E> {
    unsafe fn run<const R: usize, const W: usize>(
        &self,
        dst: &mut ArrayViewMut2<'_, MaybeUninit<E::Out>>,
    ) {
        let (wrow, qs) = (self.ctx.w.kp / 4, self.ctx.qs);
        let q = &self.ctx.qp[self.r0 * qs..(self.r0 + R) * qs];
        let acc = unsafe {
            if self.ctx.vnni {
                let zs = self.ctx.qzs;
                let qz = &self.ctx.qz[self.r0 * zs..(self.r0 + R) * zs];
                zmm_row_tile::<R, W>(self.w, wrow, qz, zs)
            } else if self.ctx.vnni256 {
                avxvnni_row_tile::<R, W>(self.w, wrow, q, qs)
            } else {
                avx2_tile::<R, W>(self.w, wrow, q, qs)
            }
        };
        for (j, a) in acc.iter().enumerate() {
            for (r, v) in a.iter().enumerate() {
                let row = self.r0 + r;
                let v = v - self.ctx.sums[row];
                dst[[row, self.i + j]] =
                    MaybeUninit::new(self.ctx.epi.out(row, self.n0 + self.i + j, v));
            }
        }
    }
}

/// From this many activation rows on, the AVX2 path unpacks the weights into panels (below):
/// below it the unpacking (one pass over the weights per call) costs more than the panels save
/// (MiniLM's 32 x 384 -> 1536: 107 G MAC/s per core on the row tiles, 69 on panels, with VNNI;
/// at 256 rows 108 against 146).
pub const PANEL_MIN_ROWS: usize = 128;

/// Past this many inputs the panels (blocked over k, see `panels::task`) pay for their unpacking
/// only from `2 * PANEL_MIN_ROWS` rows: below, the row tiles, which read the packed codes
/// directly, are faster (4096 -> 4096 per core, row tiles against panels: 128 rows 194 vs 163
/// G MAC/s; 256 rows 194 vs 205; 1024 x 4096 -> 1024: 182 vs 232).
pub const PANEL_MAX_K: usize = 2048;

/// Whether a product of `m` activation rows and `k` inputs takes the panel path.
pub fn uses_panels(m: usize, k: usize) -> bool {
    m >= PANEL_MIN_ROWS && (k <= PANEL_MAX_K || m >= 2 * PANEL_MIN_ROWS)
}

/// The batched AVX2 GEMM. A task unpacks the 2-bit codes of its output columns into panels of
/// 16 columns, `u = code + 1` one byte each, interleaved four inputs at a time: bytes
/// `64 s + 4 j + t` of a panel hold input `4 s + t` of column `j` (j < 8 in the first 32 bytes,
/// the rest in the next). A broadcast of four activation bytes against the two vectors of step
/// `s` then gives, in one `maddubs` each, the products of 4 inputs x 16 columns; a tile of six
/// activation rows keeps 12 such accumulators in registers and loads each weight vector once for
/// six rows. The unpacking (one pass over the task's weights) is spread over the task's
/// activation rows, so this path is for `m >= PANEL_MIN_ROWS` (twice that past `PANEL_MAX_K`
/// inputs, see `uses_panels`); the row-tile path reads the packed codes directly.
#[cfg(target_arch = "x86_64")]
mod panels {
    use super::{Ctx, Epilogue, RowEpilogue, TernaryMatrix, BLOCK};
    use ndarray::{Array2, ArrayViewMut2, Axis};
    use rayon::prelude::*;
    use std::arch::x86_64::*;
    use std::mem::MaybeUninit;

    /// Columns per panel.
    const NR: usize = 16;
    /// Activation rows per register tile.
    const MR: usize = 6;
    /// Panels a task unpacks (64 columns).
    const GROUP: usize = 4;
    /// Inputs per block of the panels: 16 KiB per panel, 64 KiB for a task's four (in L2).
    const KB: usize = 1024;
    /// Steps of four inputs summed in 16-bit lanes before widening: a lane adds
    /// `u0 q0 + u1 q1` in [-512, 508] per step, so 64 steps stay in [-32768, 32512].
    const SPAN: usize = 64;

    pub(super) fn gemm<E: Epilogue>(
        w: &TernaryMatrix,
        qp: &[i8],
        qs: usize,
        sums: &[i32],
        epi: &E,
        out: &mut Array2<MaybeUninit<E::Out>>,
    ) {
        let (m, n) = out.dim();
        let cols = NR * GROUP;
        // Enough tasks for every thread to get several: split the rows when there are few
        // column groups (each row block unpacks its columns again, a small cost next to its
        // share of the products).
        let groups = n.div_ceil(cols);
        let want = rayon::current_num_threads().max(1) * 4;
        let blocks = want.div_ceil(groups).clamp(1, m.div_ceil(8 * MR));
        let rows = m.div_ceil(blocks).next_multiple_of(MR);
        let ctx = Ctx {
            w,
            qp,
            qs,
            sums,
            epi,
            avx2: true,
            vnni: super::super::use_vnni(),
            vnni256: super::super::use_avx_vnni(),
            qz: &[],
            qzs: 0,
        };
        out.axis_chunks_iter_mut(Axis(0), rows)
            .into_par_iter()
            .enumerate()
            .for_each(|(b, mut block)| {
                block
                    .axis_chunks_iter_mut(Axis(1), cols)
                    .into_par_iter()
                    .enumerate()
                    .for_each(|(g, mut dst)| {
                        task(&ctx, b * rows, g * cols, &mut dst);
                        // SAFETY: the task wrote every element of `dst`.
                        unsafe { super::finish_rows(epi, &mut dst) };
                    })
            });
    }

    /// Rows `r0 ..` and columns `c0 ..` of the output, as `dst` frames them. The inputs go in
    /// blocks of `KB`: a block's panels (16 KiB each) stay in L1/L2 while every row of the task
    /// passes them, and each row's sums add up over the blocks.
    fn task<E: Epilogue>(
        ctx: &Ctx<'_, E>,
        r0: usize,
        c0: usize,
        dst: &mut ArrayViewMut2<'_, MaybeUninit<E::Out>>,
    ) {
        thread_local! {
            static SCRATCH: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
        }
        let (m, nc) = dst.dim();
        // Panels stop at k rounded up to a step of four inputs, not at the packing's block
        // (for k = 96 that is 96 codes instead of 128).
        let kp = ctx.w.k.next_multiple_of(4);
        let np = nc.div_ceil(NR);
        let mut dots = vec![[0i32; NR * GROUP]; m];
        SCRATCH.with_borrow_mut(|panels| {
            let mut buf = vec![[0i32; NR * GROUP]; MR];
            for k0 in (0..kp).step_by(KB) {
                let kb = (kp - k0).min(KB);
                panels.resize(np * NR * kb, 0);
                for p in 0..np {
                    unpack(
                        ctx.w,
                        c0 + p * NR,
                        k0,
                        &mut panels[p * NR * kb..(p + 1) * NR * kb],
                    );
                }
                let mut r = 0;
                while r < m {
                    let rs = (m - r).min(MR);
                    let q = &ctx.qp[(r0 + r) * ctx.qs + k0..];
                    tiles(ctx, panels, kb, np, rs, q, &mut buf);
                    for (acc, v) in dots[r..r + rs].iter_mut().zip(&buf) {
                        for (a, &b) in acc[..nc].iter_mut().zip(&v[..nc]) {
                            *a = a.wrapping_add(b);
                        }
                    }
                    r += rs;
                }
            }
        });
        for (i, v) in dots.iter().enumerate() {
            let mut row = dst.row_mut(i);
            crate::quant::simd::dispatch(RowEpilogue {
                epi: ctx.epi,
                r: r0 + i,
                c0,
                v: &v[..nc],
                sub: ctx.sums[r0 + i],
                out: row.as_slice_mut().expect("task columns are contiguous"),
            });
        }
    }

    /// The sums of `rs` activation rows (from `q`, `ctx.qs` bytes apart) against the `np` panels
    /// of `kb` inputs each in `panels`, into `buf[..rs]`.
    fn tiles<E: Epilogue>(
        ctx: &Ctx<'_, E>,
        panels: &[u8],
        kb: usize,
        np: usize,
        rs: usize,
        q: &[i8],
        buf: &mut [[i32; NR * GROUP]],
    ) {
        if ctx.vnni {
            // Two panels at a time: 2 x rs independent accumulators in flight.
            let mut p = 0;
            while p < np {
                let two = np - p >= 2;
                let panel = &panels[p * NR * kb..(p + 1 + two as usize) * NR * kb];
                macro_rules! go {
                    ($p:literal) => {
                        match rs {
                            6 => vnni_tile::<6, $p>(panel, q, ctx.qs, p, buf),
                            5 => vnni_tile::<5, $p>(panel, q, ctx.qs, p, buf),
                            4 => vnni_tile::<4, $p>(panel, q, ctx.qs, p, buf),
                            3 => vnni_tile::<3, $p>(panel, q, ctx.qs, p, buf),
                            2 => vnni_tile::<2, $p>(panel, q, ctx.qs, p, buf),
                            _ => vnni_tile::<1, $p>(panel, q, ctx.qs, p, buf),
                        }
                    };
                }
                // SAFETY: `use_vnni()` found AVX-512 F/BW/VNNI on the CPU.
                unsafe {
                    if two {
                        go!(2)
                    } else {
                        go!(1)
                    }
                }
                p += 1 + two as usize;
            }
            return;
        }
        for p in 0..np {
            let panel = &panels[p * NR * kb..(p + 1) * NR * kb];
            macro_rules! go {
                ($f:ident) => {
                    match rs {
                        6 => $f::<6>(panel, q, ctx.qs, p, buf),
                        5 => $f::<5>(panel, q, ctx.qs, p, buf),
                        4 => $f::<4>(panel, q, ctx.qs, p, buf),
                        3 => $f::<3>(panel, q, ctx.qs, p, buf),
                        2 => $f::<2>(panel, q, ctx.qs, p, buf),
                        _ => $f::<1>(panel, q, ctx.qs, p, buf),
                    }
                };
            }
            // SAFETY: `gemm` is only called when use_avx2() found AVX2 on the CPU, and
            // `vnni256` is set only where `avx_vnni()` found AVX-VNNI.
            unsafe {
                if ctx.vnni256 {
                    go!(avxvnni_tile)
                } else {
                    go!(tile)
                }
            }
        }
    }

    /// The panel of columns `c0 .. c0 + 16` (columns past the matrix get code 0), its
    /// `panel.len() / 16` inputs from input `k0` (a multiple of the packing's block).
    fn unpack(w: &TernaryMatrix, c0: usize, k0: usize, panel: &mut [u8]) {
        debug_assert_eq!(k0 % BLOCK, 0);
        let wrow = w.kp / 4;
        let steps = panel.len() / (4 * NR);
        let span = (4 * steps).next_multiple_of(BLOCK);
        let mut row = vec![1u8; span];
        for j in 0..NR {
            let c = c0 + j;
            if c < w.n {
                // 32 bytes of a block give its 128 codes, group g in bits 2g..2g+2.
                let src = &w.packed[c * wrow + k0 / 4..(c + 1) * wrow];
                for (blk, out) in src.chunks_exact(BLOCK / 4).zip(row.chunks_exact_mut(BLOCK)) {
                    for g in 0..4 {
                        for (o, &b) in out[32 * g..32 * (g + 1)].iter_mut().zip(blk) {
                            *o = (b >> (2 * g)) & 3;
                        }
                    }
                }
            } else {
                row.fill(1);
            }
            for (s, four) in row.chunks_exact(4).take(steps).enumerate() {
                panel[s * 4 * NR + 4 * j..s * 4 * NR + 4 * j + 4].copy_from_slice(four);
            }
        }
    }

    /// AVX-512 VNNI: `tile` for `P` consecutive panels, one 64-byte step of a panel (4 inputs x 16
    /// columns) per `vpdpbusd` into int32 lanes (no 16-bit span to widen).
    #[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
    unsafe fn vnni_tile<const R: usize, const P: usize>(
        panels: &[u8],
        q: &[i8],
        qs: usize,
        p: usize,
        buf: &mut [[i32; NR * GROUP]],
    ) {
        let stride = panels.len() / P;
        let steps = stride / (4 * NR);
        // Every load below stays inside `panels` and `q`.
        assert!(
            R <= buf.len() && q.len() >= (R - 1) * qs + 4 * steps && (p + P) * NR <= NR * GROUP
        );
        let (wp, qp) = (panels.as_ptr(), q.as_ptr());
        let mut acc = [[_mm512_setzero_si512(); P]; R];
        for s in 0..steps {
            let mut w = [_mm512_setzero_si512(); P];
            for (pp, w) in w.iter_mut().enumerate() {
                // SAFETY: step s of panel pp is 64 bytes inside `panels`.
                *w = unsafe { _mm512_loadu_si512(wp.add(pp * stride + s * 4 * NR).cast()) };
            }
            for (r, acc) in acc.iter_mut().enumerate() {
                // SAFETY: four bytes of row r inside `q` (the assert).
                let a = unsafe { (qp.add(r * qs + 4 * s) as *const i32).read_unaligned() };
                let a = _mm512_set1_epi32(a);
                for pp in 0..P {
                    acc[pp] = _mm512_dpbusd_epi32(acc[pp], w[pp], a);
                }
            }
        }
        for (r, acc) in acc.iter().enumerate() {
            for (pp, v) in acc.iter().enumerate() {
                // SAFETY: `buf[r]` holds NR * GROUP lanes; `(p + P) * NR` fit (the assert).
                unsafe { _mm512_storeu_si512(buf[r][(p + pp) * NR..].as_mut_ptr().cast(), *v) };
            }
        }
    }

    /// `buf[r][16 p + j] = Σ u q` of `R` activation rows (`qs` bytes apart in `q`) and the 16
    /// columns of `panel`, by AVX2 `maddubs` (see [`ymm_tile`]).
    #[target_feature(enable = "avx2")]
    unsafe fn tile<const R: usize>(
        panel: &[u8],
        q: &[i8],
        qs: usize,
        p: usize,
        buf: &mut [[i32; NR * GROUP]],
    ) {
        // SAFETY: the caller's promise; this function has AVX2.
        unsafe { ymm_tile::<R, false>(panel, q, qs, p, buf) }
    }

    /// [`tile`] by AVX-VNNI's 256-bit `vpdpbusd` (see [`ymm_tile`]).
    #[target_feature(enable = "avx2,avxvnni")]
    unsafe fn avxvnni_tile<const R: usize>(
        panel: &[u8],
        q: &[i8],
        qs: usize,
        p: usize,
        buf: &mut [[i32; NR * GROUP]],
    ) {
        // SAFETY: the caller's promise; this function has AVX2 and AVX-VNNI.
        unsafe { ymm_tile::<R, true>(panel, q, qs, p, buf) }
    }

    /// The 256-bit panel tile. With `VNNI`, each step's products go straight into int32 lanes
    /// (`vpdpbusd`); without, `maddubs` sums them in int16 lanes for `SPAN` steps, then widens.
    ///
    /// # Safety
    /// The CPU has AVX2 (and AVX-VNNI with `VNNI`); inlined only into [`tile`] and
    /// [`avxvnni_tile`], which enable them.
    #[inline(always)]
    #[allow(clippy::needless_range_loop)] // `acc[r][v]` reads best as the register block it is
    unsafe fn ymm_tile<const R: usize, const VNNI: bool>(
        panel: &[u8],
        q: &[i8],
        qs: usize,
        p: usize,
        buf: &mut [[i32; NR * GROUP]],
    ) {
        let steps = panel.len() / (4 * NR);
        // Every load below stays inside `panel` and `q`.
        assert!(R <= buf.len() && q.len() >= (R - 1) * qs + 4 * steps);
        let (wp, qp) = (panel.as_ptr(), q.as_ptr());
        let ones = _mm256_set1_epi16(1);
        let mut acc32 = [[_mm256_setzero_si256(); 2]; R];
        let mut s0 = 0;
        while s0 < steps {
            let s1 = (s0 + SPAN).min(steps);
            let mut acc = [[_mm256_setzero_si256(); 2]; R];
            for s in s0..s1 {
                // SAFETY: step s of the panel and four bytes of each row (the assert).
                let (w0, w1) = unsafe {
                    (
                        _mm256_loadu_si256(wp.add(s * 4 * NR) as *const __m256i),
                        _mm256_loadu_si256(wp.add(s * 4 * NR + 32) as *const __m256i),
                    )
                };
                for r in 0..R {
                    let a = unsafe { (qp.add(r * qs + 4 * s) as *const i32).read_unaligned() };
                    let a = _mm256_set1_epi32(a);
                    if VNNI {
                        acc32[r][0] = _mm256_dpbusd_avx_epi32(acc32[r][0], w0, a);
                        acc32[r][1] = _mm256_dpbusd_avx_epi32(acc32[r][1], w1, a);
                    } else {
                        acc[r][0] = _mm256_add_epi16(acc[r][0], _mm256_maddubs_epi16(w0, a));
                        acc[r][1] = _mm256_add_epi16(acc[r][1], _mm256_maddubs_epi16(w1, a));
                    }
                }
            }
            if VNNI {
                s0 = s1;
                continue;
            }
            for r in 0..R {
                for v in 0..2 {
                    acc32[r][v] = _mm256_add_epi32(acc32[r][v], _mm256_madd_epi16(acc[r][v], ones));
                }
            }
            s0 = s1;
        }
        for r in 0..R {
            for v in 0..2 {
                let dst = buf[r][p * NR + 8 * v..].as_mut_ptr() as *mut __m256i;
                // SAFETY: `buf[r]` holds NR * GROUP lanes, panel p's 16 among them.
                unsafe { _mm256_storeu_si256(dst, acc32[r][v]) };
            }
        }
    }
}

/// `Σ code q` for one packed weight row and one padded activation row (the portable path).
fn dot_scalar(w: &[u8], q: &[i8]) -> i32 {
    let mut acc = 0i32;
    for (b, blk) in w.chunks(BLOCK / 4).enumerate() {
        for (j, &byte) in blk.iter().enumerate() {
            for g in 0..4 {
                let code = ((byte >> (2 * g)) & 3) as i32 - 1;
                acc += code * q[b * BLOCK + g * 32 + j] as i32;
            }
        }
    }
    acc
}

/// Blocks whose `maddubs` products are summed in 16-bit lanes before being widened to 32 bits.
/// A lane of `maddubs(u, q)` is `u0 q0 + u1 q1` with u in 0..=2 and q in -128..=127, so it lies in
/// [-512, 508]; each block adds four of them to a lane (one per 32-weight group), so 16 blocks
/// add at most 64 terms, in [-32768, 32512]: still exact in i16 (the minimum is reached when
/// every weight is +1 and every activation -128, which the tests check).
#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
const SPAN: usize = 16;

/// The sum of the eight i32 lanes.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
#[inline]
unsafe fn hsum_epi32(v: std::arch::x86_64::__m256i) -> i32 {
    use std::arch::x86_64::*;
    let s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
    let s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0b01_00_11_10));
    let s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0b10_11_00_01));
    _mm_cvtsi128_si32(s)
}

/// The lane sums of four vectors, by a tree of horizontal adds.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
#[inline]
unsafe fn hsum4(v: [std::arch::x86_64::__m256i; 4]) -> [i32; 4] {
    use std::arch::x86_64::*;
    // [a lo, b lo, c lo, d lo | a hi, b hi, c hi, d hi] (sums of 128-bit halves), then the halves.
    let s = _mm256_hadd_epi32(_mm256_hadd_epi32(v[0], v[1]), _mm256_hadd_epi32(v[2], v[3]));
    let s = _mm_add_epi32(_mm256_castsi256_si128(s), _mm256_extracti128_si256(s, 1));
    let mut out = [0i32; 4];
    _mm_storeu_si128(out.as_mut_ptr() as *mut __m128i, s);
    out
}

/// The activations of `m` rows (`qs` bytes apart in `qp`, `kp` of them used) for
/// `zmm_row_tile`: per pair of 128-input blocks, group g's 32 inputs of the first block, then
/// those of the second (zeros when the pair has one block), so that one 512-bit load meets the
/// two blocks' group-g weights of one 64-byte load. Rows are `qzs` bytes apart.
fn zmm_layout(qp: &[i8], qs: usize, m: usize, kp: usize) -> (Vec<i8>, usize) {
    let blocks = kp / BLOCK;
    let qzs = blocks.div_ceil(2) * 2 * BLOCK + 64;
    let mut qz = vec![0i8; m * qzs];
    for (dst, src) in qz.chunks_exact_mut(qzs).zip(qp.chunks(qs)) {
        for b in 0..blocks {
            let (j, half) = (b / 2, b % 2);
            for g in 0..4 {
                let (to, from) = (j * 2 * BLOCK + 64 * g + 32 * half, b * BLOCK + 32 * g);
                dst[to..to + 32].copy_from_slice(&src[from..from + 32]);
            }
        }
    }
    (qz, qzs)
}

/// AVX-512 VNNI row tiles: `avx2_tile`'s products with `vpdpbusd` into int32 lanes, two
/// 128-input blocks of a weight row per 64-byte load (a masked load for an odd last block:
/// nothing past the row is read) against activations in `zmm_layout`; even and odd groups go to
/// two accumulator sets (a 256-bit version with one set was latency-bound: 117 G MAC/s at
/// 8 x 4096 against AVX2's 150).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
#[allow(clippy::needless_range_loop)] // `acc[s][i][r]` reads best as the register block it is
unsafe fn zmm_row_tile<const R: usize, const W: usize>(
    w: &[u8],
    wrow: usize,
    qz: &[i8],
    qzs: usize,
) -> [[i32; R]; W] {
    use std::arch::x86_64::*;
    let blocks = wrow * 4 / BLOCK;
    let pairs = blocks.div_ceil(2);
    // Every load below stays inside `w` and `qz`.
    assert!(R > 0 && w.len() >= W * wrow && qz.len() >= (R - 1) * qzs + pairs * 2 * BLOCK);
    let (wp, qp) = (w.as_ptr(), qz.as_ptr());
    let mask = _mm512_set1_epi8(3);
    let mut acc = [[[_mm512_setzero_si512(); R]; W]; 2];
    for j in 0..pairs {
        let full = 2 * j + 1 < blocks;
        let mut wv = [_mm512_setzero_si512(); W];
        for (i, v) in wv.iter_mut().enumerate() {
            // SAFETY: 64 bytes of row i (32 for a last odd block, the rest masked) inside `w`.
            *v = unsafe {
                let at = wp.add(i * wrow + j * 64);
                if full {
                    _mm512_loadu_si512(at.cast())
                } else {
                    _mm512_maskz_loadu_epi8(0xFFFF_FFFF, at.cast())
                }
            };
        }
        for g in 0..4 {
            let mut wg = [_mm512_setzero_si512(); W];
            for i in 0..W {
                wg[i] = _mm512_and_si512(wv[i], mask);
                wv[i] = _mm512_srli_epi16::<2>(wv[i]);
            }
            for r in 0..R {
                // SAFETY: 64 bytes of row r inside `qz` (the assert).
                let a =
                    unsafe { _mm512_loadu_si512(qp.add(r * qzs + j * 2 * BLOCK + 64 * g).cast()) };
                for i in 0..W {
                    acc[g % 2][i][r] = _mm512_dpbusd_epi32(acc[g % 2][i][r], wg[i], a);
                }
            }
        }
    }
    let mut out = [[0i32; R]; W];
    for i in 0..W {
        for r in 0..R {
            out[i][r] = _mm512_reduce_add_epi32(_mm512_add_epi32(acc[0][i][r], acc[1][i][r]));
        }
    }
    out
}

/// `acc[j][r] = Σ u_j q_r` for `W` packed weight rows (consecutive in `w`, `kp / 4` bytes each)
/// and `R` padded activation rows (`qs` bytes apart in `q`); the caller subtracts
/// the activation row sums. Every unpacked weight vector serves `R` activation rows and every
/// activation load `W` weight rows; products are summed in i16 for `SPAN` blocks at a time.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn avx2_tile<const R: usize, const W: usize>(
    w: &[u8],
    wrow: usize,
    q: &[i8],
    qs: usize,
) -> [[i32; R]; W] {
    // SAFETY: the caller's promise; this function has AVX2.
    unsafe { ymm_row_tile::<R, W, false>(w, wrow, q, qs) }
}

/// [`avx2_tile`] by AVX-VNNI's 256-bit `vpdpbusd`: products straight into int32 lanes.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,avxvnni")]
unsafe fn avxvnni_row_tile<const R: usize, const W: usize>(
    w: &[u8],
    wrow: usize,
    q: &[i8],
    qs: usize,
) -> [[i32; R]; W] {
    // SAFETY: the caller's promise; this function has AVX2 and AVX-VNNI.
    unsafe { ymm_row_tile::<R, W, true>(w, wrow, q, qs) }
}

/// The body of [`avx2_tile`] (`VNNI` false) and [`avxvnni_row_tile`] (true).
///
/// # Safety
/// The CPU has AVX2 (and AVX-VNNI with `VNNI`); inlined only into the two, which enable them.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
#[allow(clippy::needless_range_loop)] // `acc[j][r]` reads best as the register block it is
unsafe fn ymm_row_tile<const R: usize, const W: usize, const VNNI: bool>(
    w: &[u8],
    wrow: usize,
    q: &[i8],
    qs: usize,
) -> [[i32; R]; W] {
    use std::arch::x86_64::*;
    // Every load below stays inside `w` and `q`.
    let blocks = wrow * 4 / BLOCK;
    assert!(R > 0 && w.len() >= W * wrow && q.len() >= (R - 1) * qs + blocks * BLOCK);
    let (wp, qp) = (w.as_ptr(), q.as_ptr());
    let mask = _mm256_set1_epi8(3);
    let ones = _mm256_set1_epi16(1);
    let mut acc32 = [[_mm256_setzero_si256(); R]; W];
    let mut b0 = 0;
    while b0 < blocks {
        let b1 = (b0 + SPAN).min(blocks);
        let mut acc = [[_mm256_setzero_si256(); R]; W];
        for b in b0..b1 {
            let mut wv = [_mm256_setzero_si256(); W];
            for (j, v) in wv.iter_mut().enumerate() {
                *v = _mm256_loadu_si256(wp.add(j * wrow + b * 32) as *const __m256i);
            }
            for g in 0..4 {
                // Group g: weights 32 g .. 32 g + 32 of the block, u in bits 2g..2g+2.
                let mut wg = [_mm256_setzero_si256(); W];
                for j in 0..W {
                    wg[j] = _mm256_and_si256(wv[j], mask);
                    wv[j] = _mm256_srli_epi16::<2>(wv[j]);
                }
                for r in 0..R {
                    let a =
                        _mm256_loadu_si256(qp.add(r * qs + b * BLOCK + 32 * g) as *const __m256i);
                    for j in 0..W {
                        if VNNI && g % 2 == 0 {
                            acc32[j][r] = _mm256_dpbusd_avx_epi32(acc32[j][r], wg[j], a);
                        } else if VNNI {
                            // Odd groups into a second set: twice the sums in flight against
                            // `vpdpbusd`'s latency (its accumulator is an input).
                            acc[j][r] = _mm256_dpbusd_avx_epi32(acc[j][r], wg[j], a);
                        } else {
                            acc[j][r] = _mm256_add_epi16(acc[j][r], _mm256_maddubs_epi16(wg[j], a));
                        }
                    }
                }
            }
        }
        if VNNI {
            for j in 0..W {
                for r in 0..R {
                    acc32[j][r] = _mm256_add_epi32(acc32[j][r], acc[j][r]);
                }
            }
            b0 = b1;
            continue;
        }
        for j in 0..W {
            for r in 0..R {
                acc32[j][r] = _mm256_add_epi32(acc32[j][r], _mm256_madd_epi16(acc[j][r], ones));
            }
        }
        b0 = b1;
    }
    let mut out = [[0i32; R]; W];
    if R * W == 4 {
        let mut v = [_mm256_setzero_si256(); 4];
        for j in 0..W {
            for r in 0..R {
                v[j * R + r] = acc32[j][r];
            }
        }
        let s = hsum4(v);
        for j in 0..W {
            for r in 0..R {
                out[j][r] = s[j * R + r];
            }
        }
        return out;
    }
    for j in 0..W {
        for r in 0..R {
            out[j][r] = hsum_epi32(acc32[j][r]);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn codes(n: usize, k: usize, seed: u64) -> Array2<i8> {
        let mut s = seed;
        Array2::from_shape_fn((n, k), |_| {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((s >> 33) % 3) as i8 - 1
        })
    }

    #[test]
    fn packs_round_trip_and_matmul_is_exact() {
        for (m, n, k) in [
            (1, 5, 7),
            (3, 17, 128),
            (4, 9, 300),
            (9, 33, 1000),
            (1, 1, 1),
            (5, 4, 256),
            // Below PANEL_MIN_ROWS: the row tiles.
            (16, 16, 4),
            (17, 13, 130),
            (23, 65, 1000),
            (97, 100, 257),
            // The panel path (uses_panels): partial panels, tiles (two panels and one on
            // VNNI) and row blocks.
            (128, 16, 4),
            (129, 13, 130),
            (131, 65, 1000),
            (200, 5, 384),
            (227, 100, 257),
            (133, 33, 64),
            // Panels cut at k rounded up to 4, not at the 128-wide packing block.
            (140, 40, 96),
            // Panels in several blocks of inputs, the last one partial.
            (130, 37, 2500),
            (129, 16, 1025),
            // Long rows on the row tiles, and on panels from 256 rows.
            (257, 21, 2100),
            (18, 9, 4100),
            (33, 5, 2049),
            (37, 20, 6),
            (33, 18, 2),
        ] {
            let w = codes(n, k, 1);
            let t = TernaryMatrix::from_codes(w.view()).unwrap();
            assert_eq!(t.codes(), w);
            assert_eq!(t.nbytes(), n * k.div_ceil(128) * 32);
            let q = codes(m, k, 2).mapv(|v| (v as i32 * 127 - (v == 0) as i32 * 128) as i8);
            let want = q.mapv(|v| v as i32).dot(&w.t().mapv(|v| v as i32));
            assert_eq!(t.matmul_on(q.view(), false).unwrap(), want);
            if crate::bitnet::use_avx2() {
                assert_eq!(t.matmul_on(q.view(), true).unwrap(), want);
            }
        }
        assert!(TernaryMatrix::from_codes(ndarray::arr2(&[[2i8]]).view()).is_err());
    }

    /// Every kernel path against an i64 reference.
    fn check_all_paths(w: &Array2<i8>, q: &Array2<i8>) {
        let t = TernaryMatrix::from_codes(w.view()).unwrap();
        let want = q.mapv(|v| v as i64).dot(&w.t().mapv(|v| v as i64));
        let mut paths = vec![false];
        if crate::bitnet::use_avx2() {
            paths.push(true);
        }
        let (m, n) = (q.nrows(), w.nrows());
        let row: Vec<f64> = (0..m).map(|i| 1.0 / (i as f64 + 3.0)).collect();
        let col: Vec<f64> = (0..n).map(|j| 0.01 * (j as f64 + 1.0)).collect();
        let bias: Vec<f64> = (0..n).map(|j| j as f64 - 2.5).collect();
        let scaled = Array2::from_shape_fn((m, n), |(i, j)| {
            (want[[i, j]] as f64 * (row[i] * col[j]) + bias[j]) as f32
        });
        let epi = Rescale {
            row: &row,
            col: &col,
            bias: &bias,
            post: None,
        };
        for avx2 in paths {
            let got = t.matmul_on(q.view(), avx2).unwrap().mapv(|v| v as i64);
            assert_eq!(got, want, "avx2={avx2} m={m} n={n} k={}", w.ncols());
            // The fused rescale gives the bits of the formula on the exact products.
            let got = t.matmul_with(q.view(), &epi, avx2).unwrap();
            assert_eq!(got, scaled, "rescaled, avx2={avx2} m={m} n={n}");
        }
    }

    /// The extremes of the 16-bit accumulation: every activation -128 (and 127) against weights
    /// all +1, all -1 or alternating, over k spanning many blocks and every register-block
    /// remainder of m (1..=9) and of the weight rows (odd n).
    #[test]
    fn extreme_values_stay_exact() {
        for k in [2047, 2048, 2049, 4096, 65536 + 7] {
            let n = 5;
            let weights = [
                Array2::<i8>::from_elem((n, k), 1),
                Array2::<i8>::from_elem((n, k), -1),
                Array2::from_shape_fn((n, k), |(r, i)| if (r + i) % 2 == 0 { 1 } else { -1 }),
            ];
            for w in &weights {
                for m in [1, 3, 8, 9, 16, 23] {
                    check_all_paths(w, &Array2::from_elem((m, k), -128));
                }
                check_all_paths(w, &Array2::from_elem((2, k), 127));
                check_all_paths(w, &Array2::from_elem((17, k), 127));
            }
        }
        // The panel path over several blocks of inputs (rows enough for panels at any k).
        for k in [2049, 4099] {
            for w in [
                Array2::<i8>::from_elem((19, k), 1),
                Array2::<i8>::from_elem((19, k), -1),
            ] {
                check_all_paths(&w, &Array2::from_elem((257, k), -128));
                check_all_paths(&w, &Array2::from_elem((263, k), 127));
            }
        }
        let k = 4096;
        for m in (1..=9).chain(16..=21) {
            for n in [1, 2, 3, 4, 5, 7, 9, 13, 17] {
                let w = codes(n, k, m as u64);
                // Random values with a run of -128s and a run of 127s in every row.
                let mut q = codes(m, k, 7 + n as u64).mapv(|v| (v as i32 * 100) as i8);
                for mut row in q.outer_iter_mut() {
                    row.slice_mut(ndarray::s![..2100]).fill(-128);
                    row.slice_mut(ndarray::s![3000..3100]).fill(127);
                }
                check_all_paths(&w, &q);
                check_all_paths(&w.mapv(|_| 1), &q.mapv(|_| -128));
            }
        }
    }
}

//! GEMM: float linear layers on weights packed once at load for register-tiled kernels
//! (`PackedWeights`, CPUs with AVX2 + FMA), the `gemm` crate called on operands in place
//! elsewhere (linear layers without AVX2, attention's general case), and register-tiled kernels
//! for attention's many small products.

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
pub(super) struct Mat {
    pub(super) ptr: *const f32,
    pub(super) rs: isize,
    pub(super) cs: isize,
}

/// `dst (m, n; row stride dst_rs) = [dst +] scale * a (m, k) · b (k, n)`.
///
/// # Safety
/// Every element the strides address must lie inside the caller's buffers, and `dst` must not
/// alias `a` or `b`.
#[allow(clippy::too_many_arguments)]
pub(super) unsafe fn gemm_into(
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

/// Float weights (n, k) packed once for `small_gemm::tile`: panels of 16 output columns, each
/// `k` rows of 16 contiguous floats (columns past `n` zero), so a tile streams one panel in
/// order instead of gathering 16 columns per input from a (n, k) matrix, and nothing is
/// repacked per call (the `gemm` crate packs its operands on every call: 41% of a MiniLM
/// forward at 1 x 32 tokens).
pub struct PackedWeights {
    pub n: usize,
    pub k: usize,
    panels: Vec<f32>,
}

/// Columns per panel of `PackedWeights`.
const PANEL: usize = 16;
/// Rows per register tile of `small_gemm` (6 x 16 accumulators, 2 vectors of `b` and a
/// broadcast: 15 of the 16 vector registers), and so of `PackedWeights::linear`.
const MR: usize = 6;

impl PackedWeights {
    /// Packs `w` (n, k) row-major; None where the CPU lacks AVX2 + FMA (the `gemm` crate runs).
    pub fn new(w: &[f32], n: usize, k: usize) -> Option<Self> {
        if !cfg!(target_arch = "x86_64") || !crate::isa::level().has_avx2() || k == 0 {
            return None;
        }
        assert_eq!(w.len(), n * k);
        use rayon::prelude::*;
        let np = n.div_ceil(PANEL);
        let mut panels = vec![0f32; np * k * PANEL];
        panels
            .par_chunks_mut(k * PANEL)
            .enumerate()
            .for_each(|(p, dst)| {
                for j in 0..PANEL.min(n - p * PANEL) {
                    let row = &w[(p * PANEL + j) * k..(p * PANEL + j + 1) * k];
                    for (i, &v) in row.iter().enumerate() {
                        dst[i * PANEL + j] = v;
                    }
                }
            });
        Some(PackedWeights { n, k, panels })
    }

    /// `x (rows, k) @ w.T + bias`, each output the sum over `k` in input order by fused
    /// multiply-adds (the same bits whatever the number of rows); the rows split over rayon's
    /// threads, or the panels when there are few rows.
    pub fn linear(&self, x: &[f32], bias: Option<&[f32]>) -> Vec<f32> {
        use ndarray::{ArrayViewMut2, Axis};
        use rayon::prelude::*;
        let (n, k) = (self.n, self.k);
        assert!(x.len().is_multiple_of(k));
        let rows = x.len() / k;
        let mut out = vec![0f32; rows * n];
        if rows == 0 || n == 0 {
            return out;
        }
        let np = n.div_ceil(PANEL);
        // (row block, panel range) tasks, several per thread.
        let want = rayon::current_num_threads().max(1) * 4;
        let rb = rows.div_ceil(want.div_ceil(np).max(1)).next_multiple_of(MR);
        let pb = np.div_ceil(want.div_ceil(rows.div_ceil(rb))).max(1);
        // Rows `r0 ..` and panels `p0 ..` of the output, as `dst` frames them.
        let task = |r0: usize, p0: usize, mut dst: ArrayViewMut2<'_, f32>| {
            let (nr, nc) = dst.dim();
            #[cfg_attr(not(target_arch = "x86_64"), allow(unused_mut))]
            let mut buf = [[0f32; 16]; MR];
            for (pi, c) in (0..nc).step_by(PANEL).enumerate() {
                let p = p0 + pi;
                let panel = &self.panels[p * k * PANEL..(p + 1) * k * PANEL];
                let w = PANEL.min(nc - c);
                let mut i = 0;
                while i < nr {
                    let r = (nr - i).min(MR);
                    let a = &x[(r0 + i) * k..(r0 + i + r) * k];
                    // SAFETY: `new` packed only where the CPU has AVX2 and FMA; `a` holds `r`
                    // rows of `k`, `panel` `k` rows of 16.
                    #[cfg(target_arch = "x86_64")]
                    unsafe {
                        let (ap, bp) = (a.as_ptr(), panel.as_ptr());
                        match r {
                            6 => small_gemm::tile::<6, 2>(ap, k, bp, PANEL, k, 1.0, &mut buf),
                            5 => small_gemm::tile::<5, 2>(ap, k, bp, PANEL, k, 1.0, &mut buf),
                            4 => small_gemm::tile::<4, 2>(ap, k, bp, PANEL, k, 1.0, &mut buf),
                            3 => small_gemm::tile::<3, 2>(ap, k, bp, PANEL, k, 1.0, &mut buf),
                            2 => small_gemm::tile::<2, 2>(ap, k, bp, PANEL, k, 1.0, &mut buf),
                            _ => small_gemm::tile::<1, 2>(ap, k, bp, PANEL, k, 1.0, &mut buf),
                        }
                    }
                    #[cfg(not(target_arch = "x86_64"))]
                    let _ = (a, panel); // `new` packs nothing off x86-64
                    for (rr, acc) in buf.iter().take(r).enumerate() {
                        let mut row = dst.row_mut(i + rr);
                        let o =
                            &mut row.as_slice_mut().expect("task columns are contiguous")[c..c + w];
                        match bias {
                            Some(b) => {
                                for ((o, &v), &b) in o.iter_mut().zip(acc).zip(&b[p * PANEL..]) {
                                    *o = v + b;
                                }
                            }
                            None => o.copy_from_slice(&acc[..w]),
                        }
                    }
                    i += r;
                }
            }
        };
        let mut view = ArrayViewMut2::from_shape((rows, n), &mut out[..]).expect("rows x n");
        view.axis_chunks_iter_mut(Axis(0), rb)
            .into_par_iter()
            .enumerate()
            .for_each(|(b, mut block)| {
                block
                    .axis_chunks_iter_mut(Axis(1), pb * PANEL)
                    .into_par_iter()
                    .enumerate()
                    .for_each(|(g, dst)| task(b * rb, g * pb, dst));
            });
        out
    }
}

/// `x (rows, k) @ w.T + bias` with `w` stored (n, k) as PyTorch keeps it.
pub fn linear(x: &[f32], k: usize, w: &[f32], n: usize, bias: Option<&[f32]>) -> Vec<f32> {
    assert!(k > 0 && x.len().is_multiple_of(k) && w.len() == n * k);
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

/// Register-tiled float32 products for attention's many small matrices (one pair per batch
/// and head, 128 x 128 x 32 in BERT-small): a general GEMM's packing and dispatch cost more
/// than such a product itself.
#[cfg(target_arch = "x86_64")]
pub(super) mod small_gemm {
    use std::arch::x86_64::*;

    use super::MR;

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
    ///
    /// # Safety
    /// The CPU must have AVX2 and FMA; `a` must hold `R` rows of `kc` (`ars` apart) and `b`
    /// `kc` rows of `8 NV` (`brs` apart).
    #[target_feature(enable = "avx2,fma")]
    #[allow(clippy::needless_range_loop)] // `acc[r][v]` reads best as the register block it is
    pub(super) unsafe fn tile<const R: usize, const NV: usize>(
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

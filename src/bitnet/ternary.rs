//! Ternary weights packed for the W1.58 A8 kernel, and the integer GEMM / GEMV.
//!
//! Layout: each weight row is padded to a multiple of 128 with zero codes and stored as
//! `u = code + 1` in 2 bits. A block of 128 weights takes 32 bytes; byte `j` holds weight
//! `32 g + j` of the block in bits `2g..2g+2` (g = 0..4), so four shifts and masks give four
//! vectors of 32 consecutive weights, ready for `maddubs` against 32 int8 activations.
//! Since `Σ u q = Σ code q + Σ q`, the activation row sum is subtracted at the end.
use crate::{ensure, Result};
use ndarray::{Array2, ArrayView2};
use rayon::prelude::*;

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
        self.matmul_on(q, super::use_avx2())
    }

    /// `matmul` on a chosen kernel path (tests compare them).
    pub fn matmul_on(&self, q: ArrayView2<'_, i8>, avx2: bool) -> Result<Array2<i32>> {
        let (m, k) = q.dim();
        ensure!(
            k == self.k,
            "activations have {k} features, the weights {}",
            self.k
        );
        // Activations padded to kp (zeros contribute nothing) and their row sums.
        let mut qp = vec![0i8; m * self.kp];
        for (dst, row) in qp.chunks_mut(self.kp.max(1)).zip(q.outer_iter()) {
            for (d, s) in dst.iter_mut().zip(row.iter()) {
                *d = *s;
            }
        }
        let sums: Vec<i32> = q
            .outer_iter()
            .map(|r| r.iter().map(|&v| v as i32).sum())
            .collect();
        // out^T (n x m), filled in parallel over weight rows, then transposed.
        let mut out_t = vec![0i32; self.n * m];
        let rows_per_task = (4096 / m.max(1)).clamp(1, 64);
        let (wrow, kp) = (self.kp / 4, self.kp);
        // Activation rows in tiles that stay in L1 while every weight row of the task passes.
        let tile = (32 * 1024 / kp.max(1)).clamp(2, m.max(2));
        out_t
            .par_chunks_mut((rows_per_task * m).max(1))
            .enumerate()
            .for_each(|(t, dst)| {
                let n0 = t * rows_per_task;
                let nrows = dst.len() / m.max(1);
                for r0 in (0..m).step_by(tile) {
                    let r1 = (r0 + tile).min(m);
                    let (q_t, s_t) = (&qp[r0 * kp..r1 * kp], &sums[r0..r1]);
                    let mut i = 0;
                    while i < nrows {
                        let w = &self.packed[(n0 + i) * wrow..(n0 + i + 1) * wrow];
                        // Two weight rows at a time share every activation load (AVX2 path).
                        #[cfg(target_arch = "x86_64")]
                        if avx2 && i + 1 < nrows && r1 - r0 > 1 {
                            let w2 = &self.packed[(n0 + i + 1) * wrow..(n0 + i + 2) * wrow];
                            let (a, b) = dst[i * m..(i + 2) * m].split_at_mut(m);
                            let (o, o2) = (&mut a[r0..r1], &mut b[r0..r1]);
                            // SAFETY: use_avx2() checked the CPU.
                            unsafe { avx2_rows2(w, w2, q_t, kp, o, o2) };
                            for (v, s) in
                                o.iter_mut().chain(o2.iter_mut()).zip(s_t.iter().chain(s_t))
                            {
                                *v -= s;
                            }
                            i += 2;
                            continue;
                        }
                        dot_rows(w, q_t, kp, s_t, &mut dst[i * m + r0..i * m + r1], avx2);
                        i += 1;
                    }
                }
            });
        let mut out = Array2::<i32>::zeros((m, self.n));
        for (j, col) in out_t.chunks(m.max(1)).enumerate().take(self.n) {
            for (i, &v) in col.iter().enumerate() {
                out[[i, j]] = v;
            }
        }
        Ok(out)
    }
}

/// One packed weight row against every activation row: `o[r] = Σ code q[r]`.
fn dot_rows(w: &[u8], q: &[i8], kp: usize, sums: &[i32], o: &mut [i32], avx2: bool) {
    #[cfg(target_arch = "x86_64")]
    if avx2 {
        // SAFETY: use_avx2() checked the CPU.
        unsafe { avx2_rows(w, q, kp, o) };
        for (v, s) in o.iter_mut().zip(sums) {
            *v -= s;
        }
        return;
    }
    let _ = (avx2, sums);
    for (r, v) in o.iter_mut().enumerate() {
        let qr = &q[r * kp..(r + 1) * kp];
        let mut acc = 0i32;
        for (b, blk) in w.chunks(BLOCK / 4).enumerate() {
            for (j, &byte) in blk.iter().enumerate() {
                for g in 0..4 {
                    let code = ((byte >> (2 * g)) & 3) as i32 - 1;
                    acc += code * qr[b * BLOCK + g * 32 + j] as i32;
                }
            }
        }
        *v = acc;
    }
}

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

/// `o[r] = Σ u q[r]` (the caller subtracts the row sums), four activation rows per pass so each
/// unpacked weight block is reused.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn avx2_rows(w: &[u8], q: &[i8], kp: usize, o: &mut [i32]) {
    use std::arch::x86_64::*;
    let mask = _mm256_set1_epi8(3);
    let ones = _mm256_set1_epi16(1);
    let blocks = kp / BLOCK;
    let m = o.len();
    let mut r = 0;
    while r < m {
        let rows = (m - r).min(4);
        let mut acc = [_mm256_setzero_si256(); 4];
        for b in 0..blocks {
            let wv = _mm256_loadu_si256(w.as_ptr().add(b * 32) as *const __m256i);
            let w0 = _mm256_and_si256(wv, mask);
            let w1 = _mm256_and_si256(_mm256_srli_epi16(wv, 2), mask);
            let w2 = _mm256_and_si256(_mm256_srli_epi16(wv, 4), mask);
            let w3 = _mm256_and_si256(_mm256_srli_epi16(wv, 6), mask);
            for (i, a) in acc.iter_mut().enumerate().take(rows) {
                let p = q.as_ptr().add((r + i) * kp + b * BLOCK);
                let a0 = _mm256_loadu_si256(p as *const __m256i);
                let a1 = _mm256_loadu_si256(p.add(32) as *const __m256i);
                let a2 = _mm256_loadu_si256(p.add(64) as *const __m256i);
                let a3 = _mm256_loadu_si256(p.add(96) as *const __m256i);
                // u in 0..=2 times q in -128..=127: pairs sum to at most 512, four blocks to 2048.
                let s = _mm256_add_epi16(
                    _mm256_add_epi16(_mm256_maddubs_epi16(w0, a0), _mm256_maddubs_epi16(w1, a1)),
                    _mm256_add_epi16(_mm256_maddubs_epi16(w2, a2), _mm256_maddubs_epi16(w3, a3)),
                );
                *a = _mm256_add_epi32(*a, _mm256_madd_epi16(s, ones));
            }
        }
        for i in 0..rows {
            o[r + i] = hsum_epi32(acc[i]);
        }
        r += rows;
    }
}

/// `avx2_rows` for two weight rows at once: each activation block is loaded once for both.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn avx2_rows2(wa: &[u8], wb: &[u8], q: &[i8], kp: usize, oa: &mut [i32], ob: &mut [i32]) {
    use std::arch::x86_64::*;
    let mask = _mm256_set1_epi8(3);
    let ones = _mm256_set1_epi16(1);
    let unpack = |p: *const u8| {
        let v = _mm256_loadu_si256(p as *const __m256i);
        [
            _mm256_and_si256(v, mask),
            _mm256_and_si256(_mm256_srli_epi16(v, 2), mask),
            _mm256_and_si256(_mm256_srli_epi16(v, 4), mask),
            _mm256_and_si256(_mm256_srli_epi16(v, 6), mask),
        ]
    };
    let blocks = kp / BLOCK;
    let m = oa.len();
    let mut r = 0;
    while r < m {
        let rows = (m - r).min(2);
        let mut acc = [_mm256_setzero_si256(); 4];
        for b in 0..blocks {
            let x = unpack(wa.as_ptr().add(b * 32));
            let y = unpack(wb.as_ptr().add(b * 32));
            for i in 0..rows {
                let p = q.as_ptr().add((r + i) * kp + b * BLOCK);
                let mut sa = _mm256_setzero_si256();
                let mut sb = _mm256_setzero_si256();
                for g in 0..4 {
                    let a = _mm256_loadu_si256(p.add(32 * g) as *const __m256i);
                    sa = _mm256_add_epi16(sa, _mm256_maddubs_epi16(x[g], a));
                    sb = _mm256_add_epi16(sb, _mm256_maddubs_epi16(y[g], a));
                }
                acc[2 * i] = _mm256_add_epi32(acc[2 * i], _mm256_madd_epi16(sa, ones));
                acc[2 * i + 1] = _mm256_add_epi32(acc[2 * i + 1], _mm256_madd_epi16(sb, ones));
            }
        }
        for i in 0..rows {
            oa[r + i] = hsum_epi32(acc[2 * i]);
            ob[r + i] = hsum_epi32(acc[2 * i + 1]);
        }
        r += rows;
    }
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
}

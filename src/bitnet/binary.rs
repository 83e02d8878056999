//! Sign matrices packed one bit per value, and the XNOR-popcount product
//! `a · b = K - 2 popcount(a xor b)` over ±1 entries.
use crate::{ensure, Result};
use ndarray::{Array2, ArrayView2};
use rayon::prelude::*;

/// Rows of ±1 signs, packed along the row: bit `i % 64` of word `i / 64` is 1 for +1. Padding
/// bits are 0 in every row, so they cancel in `xor`.
#[derive(Clone, Debug, PartialEq)]
pub struct SignMatrix {
    pub rows: usize,
    pub k: usize,
    pub words: usize,
    pub bits: Vec<u64>,
}

impl SignMatrix {
    /// Signs of a float matrix, with sign(0) = +1 (and -0.0 counts as 0). NaN is an error.
    pub fn from_floats(x: ArrayView2<'_, f32>) -> Result<Self> {
        ensure!(
            !x.iter().any(|v| v.is_nan()),
            "the input contains NaN, which has no sign"
        );
        Ok(Self::pack(x.dim(), |r, i| x[[r, i]] >= 0.0))
    }

    /// Packs int8 signs (+1 / -1).
    pub fn from_signs(s: ArrayView2<'_, i8>) -> Result<Self> {
        ensure!(
            s.iter().all(|&v| v == 1 || v == -1),
            "signs must be +1 or -1"
        );
        Ok(Self::pack(s.dim(), |r, i| s[[r, i]] > 0))
    }

    fn pack(dim: (usize, usize), positive: impl Fn(usize, usize) -> bool + Sync) -> Self {
        let (rows, k) = dim;
        let words = k.div_ceil(64);
        let mut bits = vec![0u64; rows * words];
        bits.par_chunks_mut(words.max(1))
            .enumerate()
            .take(rows)
            .for_each(|(r, dst)| {
                for (w, word) in dst.iter_mut().enumerate() {
                    let mut v = 0u64;
                    for b in 0..64.min(k - w * 64) {
                        v |= (positive(r, w * 64 + b) as u64) << b;
                    }
                    *word = v;
                }
            });
        SignMatrix {
            rows,
            k,
            words,
            bits,
        }
    }

    pub fn nbytes(&self) -> usize {
        self.bits.len() * 8
    }

    fn row(&self, r: usize) -> &[u64] {
        &self.bits[r * self.words..(r + 1) * self.words]
    }

    /// `self (m x k) · other.T (n x k)` over ±1 entries, exactly, in int32.
    pub fn matmul(&self, other: &SignMatrix) -> Result<Array2<i32>> {
        let path = if crate::isa::avx512_popcnt() {
            Path::Avx512
        } else if super::use_avx2() {
            Path::Avx2
        } else {
            Path::Portable
        };
        self.matmul_on(other, path)
    }

    /// `matmul` on a chosen kernel path (tests compare them; the caller checks the CPU has it).
    pub fn matmul_on(&self, other: &SignMatrix, path: Path) -> Result<Array2<i32>> {
        ensure!(
            self.k == other.k,
            "inner dimensions differ: {} and {}",
            self.k,
            other.k
        );
        let (m, n, k) = (self.rows, other.rows, self.k as i32);
        let mut out = Array2::<i32>::zeros((m, n));
        out.as_slice_mut()
            .expect("fresh arrays are contiguous")
            .par_chunks_mut(n.max(1))
            .enumerate()
            .take(m)
            .for_each(|(i, o)| {
                let a = self.row(i);
                row_dots(a, other, o, k, path);
            });
        Ok(out)
    }
}

/// The XNOR-popcount kernel paths.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Path {
    /// `count_ones` per word (the compiler's best for the build target).
    Portable,
    /// AVX2 nibble-lookup popcounts (needs AVX2 and POPCNT).
    Avx2,
    /// AVX-512 `vpopcntq` on 512-bit blocks (needs AVX-512 F and VPOPCNTDQ).
    Avx512,
}

fn row_dots(a: &[u64], b: &SignMatrix, o: &mut [i32], k: i32, path: Path) {
    #[cfg(target_arch = "x86_64")]
    match path {
        // SAFETY: the caller checked the CPU has the path's instructions (`matmul` asks isa).
        Path::Avx512 => return unsafe { row_dots_vpopcnt(a, b, o, k) },
        Path::Avx2 => return unsafe { row_dots_popcnt(a, b, o, k) },
        Path::Portable => {}
    }
    let _ = path;
    row_dots_portable(a, b, o, k, 0)
}

/// AVX-512 VPOPCNTDQ: four `b` rows per pass share each 512-bit load of `a`; `vpopcntq` counts
/// each XOR's eight words into 64-bit lanes (no overflow to manage), the last partial block
/// through a masked load.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512vpopcntdq")]
unsafe fn row_dots_vpopcnt(a: &[u64], b: &SignMatrix, o: &mut [i32], k: i32) {
    use std::arch::x86_64::*;
    let words = a.len();
    let full = words / 8 * 8;
    let rest = (words - full) as u32;
    let mask: __mmask8 = ((1u32 << rest) - 1) as __mmask8;
    let n = o.len();
    let mut j = 0;
    while j < n {
        let m = (n - j).min(4);
        let rows: [&[u64]; 4] = std::array::from_fn(|i| b.row(j + i.min(m - 1)));
        let mut acc = [_mm512_setzero_si512(); 4];
        let mut w = 0;
        while w < full {
            let va = _mm512_loadu_si512(a.as_ptr().add(w) as *const _);
            for (c, r) in acc.iter_mut().zip(&rows) {
                let vb = _mm512_loadu_si512(r.as_ptr().add(w) as *const _);
                *c = _mm512_add_epi64(*c, _mm512_popcnt_epi64(_mm512_xor_si512(va, vb)));
            }
            w += 8;
        }
        if rest > 0 {
            let va = _mm512_maskz_loadu_epi64(mask, a.as_ptr().add(full) as *const _);
            for (c, r) in acc.iter_mut().zip(&rows) {
                let vb = _mm512_maskz_loadu_epi64(mask, r.as_ptr().add(full) as *const _);
                *c = _mm512_add_epi64(*c, _mm512_popcnt_epi64(_mm512_xor_si512(va, vb)));
            }
        }
        for i in 0..m {
            o[j + i] = k - 2 * _mm512_reduce_add_epi64(acc[i]) as i32;
        }
        j += m;
    }
}

/// `o[j] = a · b.row(first + j)`.
#[inline(always)]
fn row_dots_portable(a: &[u64], b: &SignMatrix, o: &mut [i32], k: i32, first: usize) {
    for (j, v) in o.iter_mut().enumerate() {
        let d: u32 = a
            .iter()
            .zip(b.row(first + j))
            .map(|(x, y)| (x ^ y).count_ones())
            .sum();
        *v = k - 2 * d as i32;
    }
}

/// AVX2: four `b` rows per pass share each load of `a`; popcounts of 256-bit blocks by the
/// nibble lookup (`pshufb`), summed per byte and folded with `psadbw`; leftover words by `popcnt`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "popcnt,avx2")]
unsafe fn row_dots_popcnt(a: &[u64], b: &SignMatrix, o: &mut [i32], k: i32) {
    use std::arch::x86_64::*;
    let lut = _mm256_setr_epi8(
        0, 1, 1, 2, 1, 2, 2, 3, 1, 2, 2, 3, 2, 3, 3, 4, 0, 1, 1, 2, 1, 2, 2, 3, 1, 2, 2, 3, 2, 3,
        3, 4,
    );
    let low = _mm256_set1_epi8(0x0f);
    let count = |x: __m256i| {
        let lo = _mm256_shuffle_epi8(lut, _mm256_and_si256(x, low));
        let hi = _mm256_shuffle_epi8(lut, _mm256_and_si256(_mm256_srli_epi16(x, 4), low));
        _mm256_add_epi8(lo, hi)
    };
    let fold = |v: __m256i| -> u64 {
        let s = _mm256_sad_epu8(v, _mm256_setzero_si256());
        let t = _mm_add_epi64(_mm256_castsi256_si128(s), _mm256_extracti128_si256(s, 1));
        (_mm_cvtsi128_si64(t) + _mm_extract_epi64(t, 1)) as u64
    };
    let words = a.len();
    let full = words / 4 * 4;
    let tail = |j: usize| -> u64 {
        a[full..]
            .iter()
            .zip(&b.row(j)[full..])
            .map(|(x, y)| (x ^ y).count_ones() as u64)
            .sum()
    };
    let n = o.len();
    let mut j = 0;
    while j + 4 <= n {
        let rows = [b.row(j), b.row(j + 1), b.row(j + 2), b.row(j + 3)];
        let mut total = [0u64; 4];
        let mut w = 0;
        while w < full {
            // at most 8 per byte per block: 31 blocks fit a byte before folding
            let stop = (w + 31 * 4).min(full);
            let mut acc = [_mm256_setzero_si256(); 4];
            while w < stop {
                let va = _mm256_loadu_si256(a.as_ptr().add(w) as *const __m256i);
                for (c, r) in acc.iter_mut().zip(&rows) {
                    let vb = _mm256_loadu_si256(r.as_ptr().add(w) as *const __m256i);
                    *c = _mm256_add_epi8(*c, count(_mm256_xor_si256(va, vb)));
                }
                w += 4;
            }
            for (t, c) in total.iter_mut().zip(acc) {
                *t += fold(c);
            }
        }
        for i in 0..4 {
            o[j + i] = k - 2 * (total[i] + tail(j + i)) as i32;
        }
        j += 4;
    }
    row_dots_portable(a, b, &mut o[j..], k, j);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn xnor_matmul_equals_integer_matmul_of_signs() {
        let mut s = 7u64;
        let mut f = || {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((s >> 33) % 7) as f32 - 3.0
        };
        for (m, n, k) in [
            (1, 1, 1),
            (3, 5, 63),
            (4, 7, 64),
            (2, 3, 65),
            (5, 9, 1000),
            (3, 8, 300),
            (2, 13, 8000),
            (3, 6, 511),
            (1, 4, 512),
            (2, 5, 65_543),
        ] {
            let a = Array2::from_shape_fn((m, k), |_| f());
            let b = Array2::from_shape_fn((n, k), |_| f());
            let sign = |x: &Array2<f32>| x.mapv(|v| if v >= 0.0 { 1i32 } else { -1 });
            let want = sign(&a).dot(&sign(&b).t());
            let (pa, pb) = (
                SignMatrix::from_floats(a.view()).unwrap(),
                SignMatrix::from_floats(b.view()).unwrap(),
            );
            assert_eq!(pa.matmul_on(&pb, Path::Portable).unwrap(), want);
            if crate::bitnet::use_avx2() {
                assert_eq!(pa.matmul_on(&pb, Path::Avx2).unwrap(), want);
            }
            if crate::isa::avx512_popcnt() {
                assert_eq!(pa.matmul_on(&pb, Path::Avx512).unwrap(), want);
            }
        }
        assert!(SignMatrix::from_floats(ndarray::arr2(&[[f32::NAN]]).view()).is_err());
    }
}

//! Min and max of float data at memory speed: the scan behind every min-max range (observers,
//! `QuantSpec` ranges) and the histogram's pass.
//!
//! Data is taken in blocks that stay in L1 (converted to float32 first where it is not
//! float32). Each block is reduced with AVX2 where the CPU has it: `vminps` / `vmaxps` (which
//! pass NaN over) and an unordered compare that notes NaN, on two vectors at a time. LLVM does
//! not vectorize float min / max reductions by itself (they are not associative under NaN), so
//! the portable path is a plain loop.
use super::elem::Elem;
use super::simd::{dispatch, Isa, Kernel};
use super::CHUNK;
use crate::{ensure, Result};
use ndarray::{ArrayViewD, Axis};
use std::mem::MaybeUninit;

/// Values per block: 4 KiB of float32, in L1 for the loops that read it again.
pub(crate) const BLOCK: usize = 1024;

/// Running extremes of the non-NaN values seen, and whether a NaN was seen.
#[derive(Clone, Copy)]
pub(crate) struct Extremes {
    lo: [f32; 8],
    hi: [f32; 8],
    nan: bool,
}

impl Extremes {
    pub(crate) fn new() -> Self {
        Extremes {
            lo: [f32::INFINITY; 8],
            hi: [f32::NEG_INFINITY; 8],
            nan: false,
        }
    }

    /// Adds a block.
    #[inline(always)]
    pub(crate) fn add(&mut self, vs: &[f32]) {
        #[cfg(target_arch = "x86_64")]
        if super::simd::simd_level() >= 2 {
            // SAFETY: the CPU has AVX2.
            unsafe { self.add_avx2(vs) };
            return;
        }
        self.add_portable(vs);
    }

    fn add_portable(&mut self, vs: &[f32]) {
        let (mut lo, mut hi) = (self.lo[0], self.hi[0]);
        for &v in vs {
            lo = if v < lo { v } else { lo };
            hi = if v > hi { v } else { hi };
            self.nan |= v.is_nan();
        }
        self.lo[0] = lo;
        self.hi[0] = hi;
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2")]
    fn add_avx2(&mut self, vs: &[f32]) {
        use std::arch::x86_64::*;
        let pairs = vs.chunks_exact(16);
        let rest = pairs.remainder();
        // SAFETY: every load reads 8 floats inside a chunk of 16; the lane arrays are 8 floats.
        unsafe {
            let (mut lo0, mut hi0) = (
                _mm256_loadu_ps(self.lo.as_ptr()),
                _mm256_loadu_ps(self.hi.as_ptr()),
            );
            let (mut lo1, mut hi1) = (lo0, hi0);
            let (mut nan0, mut nan1) = (_mm256_setzero_ps(), _mm256_setzero_ps());
            for c in pairs {
                let a = _mm256_loadu_ps(c.as_ptr());
                let b = _mm256_loadu_ps(c.as_ptr().add(8));
                // min(v, lo) is `v < lo ? v : lo`: a NaN v leaves lo as it is.
                lo0 = _mm256_min_ps(a, lo0);
                lo1 = _mm256_min_ps(b, lo1);
                hi0 = _mm256_max_ps(a, hi0);
                hi1 = _mm256_max_ps(b, hi1);
                nan0 = _mm256_or_ps(nan0, _mm256_cmp_ps::<_CMP_UNORD_Q>(a, a));
                nan1 = _mm256_or_ps(nan1, _mm256_cmp_ps::<_CMP_UNORD_Q>(b, b));
            }
            _mm256_storeu_ps(self.lo.as_mut_ptr(), _mm256_min_ps(lo1, lo0));
            _mm256_storeu_ps(self.hi.as_mut_ptr(), _mm256_max_ps(hi1, hi0));
            self.nan |= _mm256_movemask_ps(_mm256_or_ps(nan0, nan1)) != 0;
        }
        self.add_portable(rest);
    }

    /// Whether a NaN was seen.
    pub(crate) fn nan(&self) -> bool {
        self.nan
    }

    /// `(min, max)` of the values that are not NaN: `(inf, -inf)` when there were none.
    pub(crate) fn finish(&self) -> (f32, f32) {
        let lo = self.lo.iter().fold(f32::INFINITY, |a, &b| a.min(b));
        let hi = self.hi.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b));
        (lo, hi)
    }
}

/// `xs` in blocks of at most [`BLOCK`] float32 values: float32 input is passed through as it
/// is, other types are converted into a buffer first. A loop, not a closure, so that the body
/// stays in the caller's instruction set (a closure does not inherit `target_feature`):
/// `let mut b = Blocks::new(xs); while let Some(vs) = b.next() { .. }`.
pub(crate) struct Blocks<'a, E> {
    rest: &'a [E],
    /// Converted values (written before they are read; never cleared, as a short input, a
    /// quantization group, should not pay for 4 KiB).
    buf: [MaybeUninit<f32>; BLOCK],
}

impl<'a, E: Elem> Blocks<'a, E> {
    #[inline(always)]
    pub(crate) fn new(xs: &'a [E]) -> Self {
        Blocks {
            rest: xs,
            buf: [const { MaybeUninit::uninit() }; BLOCK],
        }
    }

    #[inline(always)]
    #[allow(clippy::should_implement_trait)] // a lending iterator: the block borrows `self`
    pub(crate) fn next(&mut self) -> Option<&[f32]> {
        if self.rest.is_empty() {
            return None;
        }
        let (block, rest) = self.rest.split_at(self.rest.len().min(BLOCK));
        self.rest = rest;
        prefetch(&rest[..rest.len().min(BLOCK)]);
        Some(match E::as_f32s(block) {
            Some(vs) => vs,
            None => {
                for (d, x) in self.buf.iter_mut().zip(block) {
                    d.write(x.to_f32());
                }
                // SAFETY: the first `block.len()` values were just written.
                unsafe { std::slice::from_raw_parts(self.buf.as_ptr().cast::<f32>(), block.len()) }
            }
        })
    }
}

/// Asks for `xs` to be brought into the cache, one request per 64-byte line: the next block
/// arrives while the caller works on this one (the hardware prefetcher alone runs only a few
/// lines ahead of a loop that reads in bursts).
#[inline(always)]
fn prefetch<E>(xs: &[E]) {
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::x86_64::{_mm_prefetch, _MM_HINT_T0};
        let p = xs.as_ptr() as *const i8;
        for off in (0..std::mem::size_of_val(xs)).step_by(64) {
            // SAFETY: a prefetch is only a hint; the address lies within `xs`. SSE is part of
            // x86_64's baseline.
            unsafe { _mm_prefetch::<_MM_HINT_T0>(p.add(off)) };
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = xs;
}

/// Min, max and whether any value is NaN or ±Inf, in one pass over `xs`.
struct Scan<'a, E>(&'a [E]);

impl<E: Elem> Kernel for Scan<'_, E> {
    type Output = (f32, f32, bool);
    #[inline(always)]
    fn run<S: Isa>(self) -> Self::Output {
        let mut ext = Extremes::new();
        let mut blocks = Blocks::new(self.0);
        while let Some(vs) = blocks.next() {
            ext.add(vs);
        }
        let (lo, hi) = ext.finish();
        // ±Inf shows as an extreme.
        let bad = ext.nan() || lo == f32::NEG_INFINITY || hi == f32::INFINITY;
        (lo, hi, bad)
    }
}

/// `(min, max, any NaN or ±Inf)` of a slice (`(inf, -inf, false)` when empty).
pub fn scan<E: Elem>(xs: &[E]) -> (f32, f32, bool) {
    dispatch(Scan(xs))
}

/// `(min, max)` of a slice, refusing NaN and ±Inf; `(0, 0)` when empty.
pub fn finite<E: Elem>(xs: &[E]) -> Result<(f32, f32)> {
    finish(scan(xs))
}

fn finish((lo, hi, bad): (f32, f32, bool)) -> Result<(f32, f32)> {
    ensure!(
        !bad,
        "the input contains NaN or Inf: no quantization range can be derived from it (pass scales explicitly)"
    );
    Ok(if lo > hi { (0.0, 0.0) } else { (lo, hi) })
}

/// Min and max of a view, refusing NaN and ±Inf (no range can be derived from them).
pub fn finite_minmax<E: Elem>(x: &ArrayViewD<'_, E>) -> Result<(f32, f32)> {
    let merge = |a: (f32, f32, bool), b: (f32, f32, bool)| (a.0.min(b.0), a.1.max(b.1), a.2 || b.2);
    let init = (f32::INFINITY, f32::NEG_INFINITY, false);
    finish(match x.as_slice_memory_order() {
        Some(s) => {
            let per_task = s.len().div_ceil(rayon::current_num_threads()).max(CHUNK);
            crate::pool::share_chunks(s, per_task, |pieces| pieces.map(scan).fold(init, merge))
                .into_iter()
                .fold(init, merge)
        }
        None => x
            .lanes(Axis(x.ndim().max(1) - 1))
            .into_iter()
            .fold(init, |a, l| {
                merge(a, l.as_slice().map_or_else(|| scan(&l.to_vec()), scan))
            }),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use half::{bf16, f16};

    /// The plain definition, value by value.
    fn reference(xs: &[f32]) -> (f32, f32, bool) {
        let bad = xs.iter().any(|v| !v.is_finite());
        let fin: Vec<f32> = xs.iter().copied().filter(|v| !v.is_nan()).collect();
        let lo = fin.iter().fold(f32::INFINITY, |a, &b| a.min(b));
        let hi = fin.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b));
        (lo, hi, bad)
    }

    #[test]
    fn scan_equals_the_definition_at_every_length_and_position() {
        let mut s = 12345u64;
        let mut next = || {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((s >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 100.0
        };
        for n in [0usize, 1, 7, 15, 16, 17, 1023, 1024, 1025, 3000] {
            let base: Vec<f32> = (0..n).map(|_| next()).collect();
            assert_eq!(scan(&base), reference(&base), "n={n}");
            for special in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY, -0.0, 1e-45] {
                for at in [0, n / 2, n.saturating_sub(1)] {
                    if n == 0 {
                        continue;
                    }
                    let mut v = base.clone();
                    v[at] = special;
                    let (lo, hi, bad) = scan(&v);
                    let (rlo, rhi, rbad) = reference(&v);
                    assert_eq!(bad, rbad, "n={n} at={at} {special}");
                    if !bad {
                        assert_eq!((lo, hi), (rlo, rhi), "n={n} at={at} {special}");
                    }
                }
            }
        }
        let all_nan = vec![f32::NAN; 40];
        assert!(scan(&all_nan).2);
        assert!(finite(&all_nan).is_err());
        assert_eq!(finite::<f32>(&[]).unwrap(), (0.0, 0.0));
        assert_eq!(finite(&[3.0f32; 33]).unwrap(), (3.0, 3.0));
    }

    /// Every path this CPU has gives the same extremes and NaN flag, whatever `LOWBIT_ISA` says.
    #[test]
    fn every_instruction_set_agrees() {
        let base: Vec<f32> = (0..777)
            .map(|i| ((i * 7919) % 1000) as f32 * 0.25 - 100.0)
            .collect();
        for special in [
            None,
            Some(f32::NAN),
            Some(f32::INFINITY),
            Some(f32::NEG_INFINITY),
        ] {
            for at in [0usize, 15, 16, 500, 775, 776] {
                let mut v = base.clone();
                if let Some(x) = special {
                    v[at] = x;
                }
                let mut p = Extremes::new();
                p.add_portable(&v);
                #[cfg_attr(not(target_arch = "x86_64"), allow(unused_variables))]
                let want = (p.finish(), p.nan());
                #[cfg(target_arch = "x86_64")]
                if std::is_x86_feature_detected!("avx2") {
                    let mut a = Extremes::new();
                    // SAFETY: the CPU has AVX2.
                    unsafe { a.add_avx2(&v) };
                    assert_eq!((a.finish(), a.nan()), want, "{special:?} at {at}");
                } else {
                    eprintln!("skipped the AVX2 path: this CPU lacks AVX2");
                }
            }
        }
    }

    #[test]
    fn half_and_double_inputs_convert_first() {
        let v: Vec<f32> = (0..2500).map(|i| (i as f32 * 0.37).sin() * 7.0).collect();
        let h: Vec<f16> = v.iter().map(|&x| f16::from_f32(x)).collect();
        let b: Vec<bf16> = v.iter().map(|&x| bf16::from_f32(x)).collect();
        let d: Vec<f64> = v.iter().map(|&x| x as f64 + 1e-12).collect();
        let hf: Vec<f32> = h.iter().map(|x| x.to_f32()).collect();
        let bf: Vec<f32> = b.iter().map(|x| x.to_f32()).collect();
        let df: Vec<f32> = d.iter().map(|&x| x as f32).collect();
        assert_eq!(scan(&h), reference(&hf));
        assert_eq!(scan(&b), reference(&bf));
        assert_eq!(scan(&d), reference(&df));
    }
}

//! A streaming histogram on a power-of-two grid, so that it grows and merges without losing
//! or moving a single count.
//!
//! Bins have width `w = 2^exp` and edges at integer multiples of `w`; bin `k` covers
//! `[(start + k) w, (start + k + 1) w)`. A value's bin is `floor(x / w)`, computed exactly (a
//! power-of-two scaling of a float32 in float64). Growing the range doubles `w`, which merges
//! pairs of bins exactly. The grid is canonical: `exp` is the smallest exponent whose grid covers
//! `[min, max]` in `bins` bins, so the state depends only on the data seen, not on how it was
//! split into batches or observers: `merge(a, b)` equals one histogram over both inputs.
use crate::quant::Elem;
use crate::{ensure, Error, Result};
use ndarray::{ArrayViewD, Axis};
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Histogram {
    /// Number of bins (capacity); the data occupies between `bins / 2` and `bins` of them.
    pub bins: usize,
    /// Counts per bin; empty until the first value arrives.
    pub counts: Vec<u64>,
    /// Bin width `2^exp`.
    pub exp: i32,
    /// Grid index of bin 0.
    pub start: i64,
    /// Exact extremes of the data seen.
    pub min: f32,
    pub max: f32,
    pub total: u64,
}

/// Values per parallel binning task.
const TASK: usize = 1 << 16;

/// `floor(g / 2^d)` for `d >= 0`, without overflowing the shift.
fn shift_floor(g: i64, d: i32) -> i64 {
    if d >= 63 {
        if g < 0 {
            -1
        } else {
            0
        }
    } else {
        g >> d
    }
}

fn pow2(e: i32) -> f64 {
    2f64.powi(e)
}

fn grid_index(x: f32, e: i32) -> i64 {
    (x as f64 * pow2(-e)).floor() as i64
}

/// Adds values to counts on a grid, vectorized: bin indices a block at a time, then the counts.
struct Binner<'a, E> {
    xs: &'a [E],
    exp: i32,
    start: i64,
    counts: &'a mut [u64],
}

impl<E: Elem> crate::quant::simd::Kernel for Binner<'_, E> {
    type Output = ();
    #[inline(always)]
    fn run<S: crate::quant::simd::Isa>(self) {
        const BLOCK: usize = 256;
        let mut idx = [0u32; BLOCK];
        let top = (self.counts.len() - 1) as f32;
        // With bins no wider than 1, x * 2^-exp is exact in float32 (a power-of-two scaling
        // that cannot underflow) and so is its floor; wider bins take float64 for the same
        // exactness on tiny values. `start` has at most 24 significant bits either way.
        let (inv32, start32) = (2f32.powi(-self.exp.clamp(-127, 127)), self.start as f32);
        let (inv64, start64) = (pow2(-self.exp), self.start as f64);
        let narrow = self.exp <= 0 && self.exp > -100;
        for chunk in self.xs.chunks(BLOCK) {
            let n = chunk.len();
            if narrow {
                for (d, v) in idx[..n].iter_mut().zip(chunk) {
                    let k = ((v.to_f32() * inv32).floor() - start32).max(0.0).min(top);
                    // SAFETY: k is an integer in [0, bins - 1].
                    *d = unsafe { k.to_int_unchecked::<u32>() };
                }
            } else {
                for (d, v) in idx[..n].iter_mut().zip(chunk) {
                    let k = ((v.to_f32() as f64 * inv64).floor() - start64)
                        .max(0.0)
                        .min(top as f64);
                    // SAFETY: as above.
                    *d = unsafe { k.to_int_unchecked::<u32>() };
                }
            }
            for &i in &idx[..n] {
                self.counts[i as usize] += 1;
            }
        }
    }
}

impl Histogram {
    pub fn new(bins: usize) -> Result<Self> {
        ensure!(
            (16..=1 << 20).contains(&bins),
            "bins must be between 16 and 1048576, got {bins}"
        );
        Ok(Histogram {
            bins,
            counts: vec![],
            exp: i32::MIN,
            start: 0,
            min: f32::INFINITY,
            max: f32::NEG_INFINITY,
            total: 0,
        })
    }

    pub fn is_empty(&self) -> bool {
        self.total == 0
    }

    /// Left edge of bin 0 and the bin width.
    pub fn grid(&self) -> (f64, f64) {
        let w = pow2(self.exp);
        (self.start as f64 * w, w)
    }

    /// The canonical exponent for data in `[lo, hi]`: the smallest that fits `bins` bins, and
    /// coarse enough that grid indices stay far inside i64.
    fn exponent_for(&self, lo: f32, hi: f32) -> i32 {
        let amax = lo.abs().max(hi.abs()) as f64;
        let mut e = if amax > 0.0 {
            amax.log2().ceil() as i32 - 60
        } else {
            -1074
        };
        let span = hi as f64 - lo as f64;
        if span > 0.0 {
            e = e.max((span / self.bins as f64).log2().floor() as i32);
        }
        while grid_index(hi, e) - grid_index(lo, e) >= self.bins as i64 {
            e += 1;
        }
        e
    }

    /// Moves the counts onto the grid for `[lo, hi]` with exponent at least `min_exp` (and never
    /// finer than the current one).
    fn regrid(&mut self, lo: f32, hi: f32, min_exp: i32) {
        let current = if self.counts.is_empty() {
            i32::MIN
        } else {
            self.exp
        };
        let e = self.exponent_for(lo, hi).max(min_exp).max(current);
        let start = grid_index(lo, e);
        if !self.counts.is_empty() && e == self.exp && start == self.start {
            return;
        }
        let mut counts = vec![0u64; self.bins];
        if !self.counts.is_empty() {
            let d = e - self.exp;
            for (k, &c) in self.counts.iter().enumerate() {
                if c > 0 {
                    let g = shift_floor(self.start + k as i64, d);
                    counts[(g - start) as usize] += c;
                }
            }
        }
        self.counts = counts;
        self.exp = e;
        self.start = start;
    }

    /// Adds a batch. NaN or ±Inf refuses the whole batch and leaves the histogram unchanged;
    /// an empty batch is a no-op.
    pub fn update<E: Elem>(&mut self, x: &ArrayViewD<'_, E>) -> Result<()> {
        if x.is_empty() {
            return Ok(());
        }
        let (lo, hi) = crate::quant::spec::finite_minmax(x)?;
        let (lo, hi) = (lo.min(self.min), hi.max(self.max));
        self.regrid(lo, hi, i32::MIN);
        let bins = self.bins;
        let bin = |h: &mut Vec<u64>, s: &[E]| {
            crate::quant::simd::dispatch(Binner {
                xs: s,
                exp: self.exp,
                start: self.start,
                counts: h,
            })
        };
        let add = |mut a: Vec<u64>, b: Vec<u64>| {
            a.iter_mut().zip(&b).for_each(|(a, b)| *a += b);
            a
        };
        let local = match x.as_slice_memory_order() {
            Some(s) => s
                .par_chunks(TASK)
                .fold(
                    || vec![0u64; bins],
                    |mut h, c| {
                        bin(&mut h, c);
                        h
                    },
                )
                .reduce(|| vec![0u64; bins], add),
            None => {
                let lanes: Vec<_> = x.lanes(Axis(x.ndim() - 1)).into_iter().collect();
                lanes
                    .par_iter()
                    .fold(
                        || vec![0u64; bins],
                        |mut h, l| {
                            bin(&mut h, &l.to_vec());
                            h
                        },
                    )
                    .reduce(|| vec![0u64; bins], add)
            }
        };
        self.counts = add(std::mem::take(&mut self.counts), local);
        self.min = lo;
        self.max = hi;
        self.total += x.len() as u64;
        Ok(())
    }

    /// Adds another histogram's counts: the result equals one histogram over both inputs.
    pub fn merge(&mut self, other: &Histogram) -> Result<()> {
        ensure!(
            self.bins == other.bins,
            "cannot merge histograms of {} and {} bins",
            self.bins,
            other.bins
        );
        if other.is_empty() {
            return Ok(());
        }
        if self.is_empty() {
            *self = other.clone();
            return Ok(());
        }
        // Both onto the grid of the union, at least as coarse as either: that is the canonical
        // grid of the union, because each side's exponent is at most the union's.
        let (lo, hi) = (self.min.min(other.min), self.max.max(other.max));
        let e = self.exp.max(other.exp);
        let mut o = other.clone();
        self.regrid(lo, hi, e);
        o.regrid(lo, hi, e);
        debug_assert!(o.exp == self.exp && o.start == self.start);
        self.counts
            .iter_mut()
            .zip(&o.counts)
            .for_each(|(a, b)| *a += b);
        self.min = lo;
        self.max = hi;
        self.total += o.total;
        Ok(())
    }

    /// Checks a state read from `load_state_dict` / pickle: it must be one that `update` and
    /// `merge` can produce (the canonical grid of `[min, max]`, counts only between them), as
    /// they rely on it.
    pub fn validate(&self) -> Result<()> {
        let bad = |m: &str| Err(Error::value(format!("invalid histogram state: {m}")));
        if !(16..=1 << 20).contains(&self.bins) {
            return bad("bins must be between 16 and 1048576");
        }
        if self.total == 0 {
            return if self.counts.iter().all(|&c| c == 0) {
                Ok(())
            } else {
                bad("counts without a total")
            };
        }
        if self.counts.len() != self.bins {
            return bad("counts length differs from bins");
        }
        let sum = self.counts.iter().try_fold(0u64, |a, &c| a.checked_add(c));
        if sum != Some(self.total) {
            return bad("counts do not add up to total");
        }
        if !(self.min.is_finite() && self.max.is_finite() && self.min <= self.max) {
            return bad("min/max");
        }
        if self.exp != self.exponent_for(self.min, self.max)
            || self.start != grid_index(self.min, self.exp)
        {
            return bad("the grid is not the one of [min, max]");
        }
        let last = grid_index(self.max, self.exp) - self.start;
        if self.counts.iter().skip(last as usize + 1).any(|&c| c > 0) {
            return bad("counts outside [min, max]");
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ndarray::ArrayD;

    fn arr(v: &[f32]) -> ArrayD<f32> {
        ArrayD::from_shape_vec(ndarray::IxDyn(&[v.len()]), v.to_vec()).unwrap()
    }

    fn lcg(n: usize, seed: u64, scale: f32) -> Vec<f32> {
        let mut s = seed;
        (0..n)
            .map(|_| {
                s = s
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                ((s >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * scale
            })
            .collect()
    }

    #[test]
    fn batches_and_merges_give_the_same_state() {
        let a = lcg(10_000, 1, 2.0);
        let b = lcg(7_000, 2, 50.0);
        let c: Vec<f32> = lcg(3_000, 3, 0.01).iter().map(|v| v + 100.0).collect();
        let mut one = Histogram::new(256).unwrap();
        let all: Vec<f32> = a.iter().chain(&b).chain(&c).copied().collect();
        one.update(&arr(&all).view()).unwrap();
        let mut streamed = Histogram::new(256).unwrap();
        for part in [&c, &a, &b] {
            streamed.update(&arr(part).view()).unwrap();
        }
        assert_eq!(one, streamed);
        let (mut h1, mut h2, mut h3) = (
            Histogram::new(256).unwrap(),
            Histogram::new(256).unwrap(),
            Histogram::new(256).unwrap(),
        );
        h1.update(&arr(&a).view()).unwrap();
        h2.update(&arr(&b).view()).unwrap();
        h3.update(&arr(&c).view()).unwrap();
        h3.merge(&h1).unwrap();
        h3.merge(&h2).unwrap();
        assert_eq!(one, h3);
        assert_eq!(one.total, 20_000);
        one.validate().unwrap();
        // every count sits in the bin that holds its value
        let (left, w) = one.grid();
        let mut want = vec![0u64; 256];
        for v in &all {
            want[((*v as f64 - left) / w).floor() as usize] += 1;
        }
        assert_eq!(one.counts, want);
    }

    #[test]
    fn nan_batches_are_refused_without_damage() {
        let mut h = Histogram::new(64).unwrap();
        h.update(&arr(&[1.0, 2.0]).view()).unwrap();
        let before = h.clone();
        assert!(h.update(&arr(&[3.0, f32::NAN]).view()).is_err());
        assert!(h.update(&arr(&[f32::INFINITY]).view()).is_err());
        assert_eq!(h, before);
        h.update(&arr(&[]).view()).unwrap();
        assert_eq!(h, before);
    }

    #[test]
    fn constant_and_tiny_data() {
        let mut h = Histogram::new(64).unwrap();
        h.update(&arr(&[0.0; 10]).view()).unwrap();
        h.update(&arr(&[1e-30, -1e-30]).view()).unwrap();
        h.update(&arr(&[3e38, -3e38]).view()).unwrap();
        h.validate().unwrap();
        assert_eq!(h.total, 14);
    }
}

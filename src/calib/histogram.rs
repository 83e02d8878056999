//! A streaming histogram on a power-of-two grid, so that it grows and merges without losing
//! or moving a single count.
//!
//! Bins have width `w = 2^exp` and edges at integer multiples of `w`; bin `k` covers
//! `[(start + k) w, (start + k + 1) w)`. A value's bin is `floor(x / w)`, computed exactly (a
//! power-of-two scaling of a float32 in float64). Growing the range doubles `w`, which merges
//! pairs of bins exactly. The grid is canonical: `exp` is the smallest exponent whose grid covers
//! `[min, max]` in `bins` bins, so the state depends only on the data seen, not on how it was
//! split into batches or observers: `merge(a, b)` equals one histogram over both inputs.
use crate::quant::extremes::{Blocks, Extremes, BLOCK};
use crate::quant::Elem;
use crate::{ensure, Error, Result};
use ndarray::ArrayViewD;
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

/// Fewest values a parallel binning task takes.
const TASK: usize = 1 << 14;

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

/// A grid's cell index relative to its bin 0, `floor(x / 2^exp) - start`, computed exactly in
/// the float type of its variant (an integer result is exact, a result outside `[0, bins)`
/// stays outside; NaN stays NaN).
trait Cells: Copy {
    fn cell(self, v: f32) -> f32;
}

/// Bins no wider than 1 (and not tiny): `x * 2^-exp` is exact in float32 (a power-of-two
/// scaling that cannot underflow) and so is its floor; `start` has at most 24 significant bits.
#[derive(Clone, Copy)]
struct Narrow {
    inv: f32,
    start: f32,
}

/// Wider bins, or tiny ones: float64 keeps the scaling exact.
#[derive(Clone, Copy)]
struct Wide {
    inv: f64,
    start: f64,
}

impl Cells for Narrow {
    #[inline(always)]
    fn cell(self, v: f32) -> f32 {
        (v * self.inv).floor() - self.start
    }
}

impl Cells for Wide {
    #[inline(always)]
    fn cell(self, v: f32) -> f32 {
        ((v as f64 * self.inv).floor() - self.start) as f32
    }
}

/// The grid `(exp, start)` in the form `Cells` computes with.
#[derive(Clone, Copy)]
enum Grid {
    Narrow(Narrow),
    Wide(Wide),
}

impl Grid {
    fn new(exp: i32, start: i64) -> Self {
        if exp <= 0 && exp > -100 {
            Grid::Narrow(Narrow {
                inv: 2f32.powi(-exp),
                start: start as f32,
            })
        } else {
            // Only a grid of zeros has 2^-exp beyond float64 (exp = -1074): MAX still sends 0
            // to cell 0 and every other float32 far outside.
            Grid::Wide(Wide {
                inv: pow2(-exp).min(f64::MAX),
                start: start as f64,
            })
        }
    }
}

/// One pass over a slice: the extremes, and counts of the values on `grid` in `LANES`
/// interleaved count arrays of `bins + 1` cells (value `i` goes to lane `i % LANES`, so a run
/// of equal values does not wait on its own increments). Cell `bins` of each lane counts the
/// values outside `grid`, which are also collected in `outside` (they are rare: a batch that
/// widens the range), so that only they need a second pass on the widened grid.
struct Pass<'a, E> {
    xs: &'a [E],
    grid: Grid,
    bins: usize,
    counts: &'a mut [u32],
    outside: &'a mut Vec<f32>,
}

impl<E: Elem> Pass<'_, E> {
    #[inline(always)]
    fn go<const LANES: usize, G: Cells>(self, g: G) -> (f32, f32, bool) {
        let (bins, stride) = (self.bins, self.bins + 1);
        let (top, out) = ((bins - 1) as f32, bins as f32);
        assert_eq!(self.counts.len(), LANES * stride);
        let mut ext = Extremes::new();
        let mut idx = [0u32; BLOCK];
        // The cell of `v`, or `bins` for a value that is not counted.
        let index = |v: f32| -> u32 {
            let k = g.cell(v);
            let counted = (k >= 0.0) & (k <= top); // false for NaN too
            let k = if k > 0.0 { k } else { 0.0 };
            let k = if k < top { k } else { top };
            let k = if counted { k } else { out };
            // SAFETY: k is an integer in [0, bins], within i32.
            unsafe { k.to_int_unchecked::<i32>() as u32 }
        };
        let mut blocks = Blocks::new(self.xs);
        while let Some(vs) = blocks.next() {
            let n = vs.len();
            ext.add(vs);
            for (d, &v) in idx.iter_mut().zip(vs) {
                *d = index(v);
            }
            let before: u32 = (0..LANES).map(|l| self.counts[l * stride + bins]).sum();
            let whole = idx[..n].chunks_exact(LANES);
            let tail = whole.remainder();
            for ks in whole {
                for (l, &k) in ks.iter().enumerate() {
                    // SAFETY: k <= bins, so l * stride + k < LANES * stride = counts.len().
                    unsafe { *self.counts.get_unchecked_mut(l * stride + k as usize) += 1 };
                }
            }
            for &k in tail {
                self.counts[k as usize] += 1;
            }
            let after: u32 = (0..LANES).map(|l| self.counts[l * stride + bins]).sum();
            if after != before {
                let o = bins as u32;
                self.outside.extend(
                    vs.iter()
                        .zip(&idx[..n])
                        .filter(|(_, &k)| k == o)
                        .map(|(&v, _)| v),
                );
            }
        }
        let (lo, hi) = ext.finish();
        let bad = ext.nan() || !lo.is_finite() || !hi.is_finite();
        (lo, hi, bad)
    }
}

impl<E: Elem> crate::quant::simd::Kernel for Pass<'_, E> {
    type Output = (f32, f32, bool);
    #[inline(always)]
    fn run<S: crate::quant::simd::Isa>(self) -> Self::Output {
        macro_rules! lanes {
            ($g:expr) => {
                if self.counts.len() == 4 * (self.bins + 1) {
                    self.go::<4, _>($g)
                } else {
                    self.go::<1, _>($g)
                }
            };
        }
        match self.grid {
            Grid::Narrow(g) => lanes!(g),
            Grid::Wide(g) => lanes!(g),
        }
    }
}

/// What a parallel pass over a batch returns.
struct Tally {
    /// Per task, its `lanes * (bins + 1)` counts.
    parts: Vec<Vec<u32>>,
    /// The values not counted (outside the grid).
    outside: Vec<f32>,
    lo: f32,
    hi: f32,
    bad: bool,
}

impl Tally {
    /// Values not counted (cell `bins` of every lane).
    fn uncounted(&self, bins: usize) -> u64 {
        self.parts
            .iter()
            .flat_map(|p| p.chunks_exact(bins + 1).map(|l| l[bins] as u64))
            .sum()
    }

    /// Adds the counted values to `counts` (`bins` cells).
    fn add_to(&self, counts: &mut [u64]) {
        for p in &self.parts {
            for lane in p.chunks_exact(counts.len() + 1) {
                counts
                    .iter_mut()
                    .zip(lane)
                    .for_each(|(a, &b)| *a += b as u64);
            }
        }
    }
}

/// Runs `Pass` over `xs` on the caller and the pool's threads, each with its own counts, taking
/// `TASK`-sized pieces from a shared queue. A thread's counts are u32: it counts at most `2^31`
/// values (larger inputs go in several rounds).
fn tally<E: Elem>(xs: &[E], bins: usize, grid: Grid) -> Tally {
    let n = xs.len();
    // Four count arrays pay for themselves when they stay in L1/L2 and the batch is large.
    let lanes = if bins <= 4096 && n >= 64 * bins { 4 } else { 1 };
    // A thread joins only if there are pieces enough to outweigh clearing and adding up its
    // counts.
    let piece = TASK.max(lanes * (bins + 1) / 2);
    let share = |pieces: crate::pool::Pieces<'_, E>| {
        let mut counts = vec![0u32; lanes * (bins + 1)];
        let mut outside = vec![];
        let (mut lo, mut hi, mut bad) = (f32::INFINITY, f32::NEG_INFINITY, false);
        for c in pieces {
            let (l, h, b) = crate::quant::simd::dispatch(Pass {
                xs: c,
                grid,
                bins,
                counts: &mut counts,
                outside: &mut outside,
            });
            (lo, hi, bad) = (lo.min(l), hi.max(h), bad | b);
        }
        (counts, outside, lo, hi, bad)
    };
    let mut t = Tally {
        parts: vec![],
        outside: vec![],
        lo: f32::INFINITY,
        hi: f32::NEG_INFINITY,
        bad: false,
    };
    for round in xs.chunks(1 << 31) {
        for (c, outside, lo, hi, bad) in crate::pool::share_chunks(round, piece, share) {
            t.parts.push(c);
            t.outside.extend(outside);
            t.lo = t.lo.min(lo);
            t.hi = t.hi.max(hi);
            t.bad |= bad;
        }
    }
    t
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
        let x = x.as_standard_layout();
        let xs = x.as_slice().expect("standard layout is contiguous");
        let (lo, hi) = if self.is_empty() || self.counts.is_empty() {
            let (lo, hi) = crate::quant::extremes::finite_minmax(&x.view())?;
            let (lo, hi) = (lo.min(self.min), hi.max(self.max));
            self.regrid(lo, hi, i32::MIN);
            let t = tally(xs, self.bins, Grid::new(self.exp, self.start));
            debug_assert_eq!(t.uncounted(self.bins), 0, "the grid covers the batch");
            t.add_to(&mut self.counts);
            (lo, hi)
        } else {
            self.update_in_one_pass(xs)?
        };
        self.min = lo;
        self.max = hi;
        self.total += xs.len() as u64;
        Ok(())
    }

    /// Counts a batch on the current grid while finding its extremes: when the batch keeps the
    /// grid (the common case) that is the whole update. Otherwise the counted values move to
    /// the new grid exactly (its cells are unions of the old ones, `regrid`) and a second pass
    /// adds the values that fell outside the old grid. Returns the new `[min, max]`.
    fn update_in_one_pass<E: Elem>(&mut self, xs: &[E]) -> Result<(f32, f32)> {
        let old = Grid::new(self.exp, self.start);
        let t = tally(xs, self.bins, old);
        if t.bad {
            // The same refusal, with the same message, as a batch that arrives first.
            let v = ndarray::ArrayView1::from(xs).into_dyn();
            return Err(match crate::quant::extremes::finite_minmax(&v) {
                Err(e) => e,
                Ok(_) => Error::value("the input contains NaN or Inf"),
            });
        }
        let (lo, hi) = (t.lo.min(self.min), t.hi.max(self.max));
        t.add_to(&mut self.counts);
        self.regrid(lo, hi, i32::MIN);
        if t.uncounted(self.bins) > 0 {
            // Only the values the old grid did not count, now on the widened grid (which
            // covers them all).
            debug_assert_eq!(t.outside.len() as u64, t.uncounted(self.bins));
            let new = Grid::new(self.exp, self.start);
            let u = tally(&t.outside, self.bins, new);
            debug_assert_eq!(u.uncounted(self.bins), 0, "the new grid covers the batch");
            u.add_to(&mut self.counts);
        }
        Ok((lo, hi))
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

    /// The canonical grid `(exp, start)` of a batch whose finite extremes are `lo <= hi`: where
    /// a device that holds the batch counts it (`add_counts`).
    pub fn grid_of(&self, lo: f32, hi: f32) -> (i32, i64) {
        let e = self.exponent_for(lo, hi);
        (e, grid_index(lo, e))
    }

    /// Adds a batch counted elsewhere (on the device that holds it): `counts` of its values on
    /// its canonical grid (`grid_of(lo, hi)`), `lo` and `hi` its extremes. The result is the
    /// one `update` with the batch gives (a merge of canonical histograms is exact). A bad
    /// summary changes nothing.
    pub fn add_counts(&mut self, counts: Vec<u64>, lo: f32, hi: f32) -> Result<()> {
        ensure!(
            lo.is_finite() && hi.is_finite() && lo <= hi,
            "the input contains NaN or Inf: no quantization range can be derived from it (pass scales explicitly)"
        );
        ensure!(
            counts.len() == self.bins,
            "{} counts for a histogram of {} bins",
            counts.len(),
            self.bins
        );
        let total = counts
            .iter()
            .try_fold(0u64, |a, &c| a.checked_add(c))
            .ok_or_else(|| Error::value("the counts overflow"))?;
        if total == 0 {
            return Ok(());
        }
        let (exp, start) = self.grid_of(lo, hi);
        let batch = Histogram {
            bins: self.bins,
            counts,
            exp,
            start,
            min: lo,
            max: hi,
            total,
        };
        batch.validate()?;
        self.merge(&batch)
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

    /// What a device does with a batch: its extremes, its canonical grid, a count per cell.
    fn device_counts(h: &Histogram, v: &[f32]) -> (Vec<u64>, f32, f32) {
        let lo = v.iter().copied().fold(f32::INFINITY, f32::min);
        let hi = v.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let (e, start) = h.grid_of(lo, hi);
        let mut counts = vec![0u64; h.bins];
        for &x in v {
            counts[(grid_index(x, e) - start) as usize] += 1;
        }
        (counts, lo, hi)
    }

    #[test]
    fn counts_from_a_device_equal_the_update() {
        let batches = [
            lcg(5000, 1, 1.0),
            lcg(300, 2, 40.0),
            vec![7.0; 100],
            vec![0.0; 10],
            vec![1e-30, 2e-30, -1e-38],
            lcg(1000, 3, 1e-3),
        ];
        for bins in [16, 2048] {
            let (mut a, mut b) = (Histogram::new(bins).unwrap(), Histogram::new(bins).unwrap());
            for v in &batches {
                a.update(&arr(v).view()).unwrap();
                let (c, lo, hi) = device_counts(&b, v);
                b.add_counts(c, lo, hi).unwrap();
                assert_eq!(a, b);
            }
        }
        let mut h = Histogram::new(16).unwrap();
        assert!(h.add_counts(vec![1; 16], f32::NAN, 1.0).is_err());
        assert!(h.add_counts(vec![1; 15], 0.0, 1.0).is_err());
        assert!(h.add_counts(vec![1; 16], 0.0, 1e-6).is_err()); // counts outside [lo, hi]
        assert!(h.is_empty());
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

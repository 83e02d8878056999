//! The BitNet quantizers (Hugging Face transformers' BitNet recipe, round half to even).
use super::aten_sum::{self, SumOrder};
use crate::{ensure, Result};
use ndarray::{Array2, ArrayView1, ArrayView2, ArrayViewMut1, Axis};
use rayon::prelude::*;

fn check_finite(x: &ArrayView2<'_, f32>, what: &str) -> Result<()> {
    ensure!(
        x.iter().all(|v| v.is_finite()),
        "{what} contains NaN or Inf"
    );
    Ok(())
}

/// |w| in the layout it has (memory order when dense, like torch's reduction), as one run.
fn abs_run<'a>(w: impl Iterator<Item = &'a f32>) -> Vec<f32> {
    w.map(|x| x.abs()).collect()
}

/// BitNet b1.58 absmean: `s = 1 / max(mean(|w|), 1e-5)`, codes `clamp(round(w * s), -1, 1)`,
/// the mean added in torch's float32 order (`order`; see `aten_sum`), as the transformers recipe
/// computes it. Returns int8 codes and `scale = 1 / s` (one, or one per row with `per_channel`).
pub fn ternary_quantize(
    w: ArrayView2<'_, f32>,
    per_channel: bool,
    order: SumOrder,
) -> Result<(Array2<i8>, Vec<f32>)> {
    check_finite(&w, "w")?;
    let inv = |m: f32| 1.0f32 / m.max(1e-5);
    let s: Vec<f32> = if per_channel {
        w.axis_iter(Axis(0))
            .map(|r| inv(aten_sum::row_mean(&abs_run(r.iter()), order.lanes)))
            .collect()
    } else {
        let a = match w.as_slice_memory_order() {
            Some(s) => abs_run(s.iter()),
            None => abs_run(w.iter()),
        };
        vec![if a.is_empty() {
            inv(0.0) // no codes to scale (torch's mean of nothing is NaN)
        } else {
            inv(aten_sum::mean(&a, order))
        }]
    };
    let codes = Array2::from_shape_fn(w.raw_dim(), |(i, j)| {
        let si = s[if per_channel { i } else { 0 }];
        (w[[i, j]] * si).round_ties_even().clamp(-1.0, 1.0) as i8
    });
    Ok((codes, s.iter().map(|&v| 1.0 / v).collect()))
}

/// Per-row absmax to `bits`-bit integers: `s = Qb / max(max|x|, 1e-5)` (as torch evaluates it,
/// `(1 / max) * Qb`) with `Qb = 2^(bits-1) - 1`,
/// `q = clamp(round(x * s), -Qb - 1, Qb)`. Returns the codes and the multipliers `s`.
pub fn activation_quant(x: ArrayView2<'_, f32>, bits: u32) -> Result<(Array2<i8>, Vec<f32>)> {
    ensure!(
        (2..=8).contains(&bits),
        "bits must be between 2 and 8, got {bits}"
    );
    let (rows, k) = x.dim();
    let mut q = Array2::<i8>::zeros((rows, k));
    let row = |(mut qr, xr): (ArrayViewMut1<'_, i8>, ArrayView1<'_, f32>)| {
        quantize_row(
            xr,
            qr.as_slice_mut().expect("fresh arrays are contiguous"),
            bits,
        )
    };
    // Small inputs (a decode step's single row) stay on this thread: waking the pool would
    // cost more than the work.
    // NaN / Inf are found by the row kernel (a non-finite max) in the same pass.
    let scales: Vec<f32> = if rows * k < 1 << 16 {
        q.axis_iter_mut(Axis(0))
            .zip(x.axis_iter(Axis(0)))
            .map(row)
            .collect()
    } else {
        q.axis_iter_mut(Axis(0))
            .into_par_iter()
            .zip(x.axis_iter(Axis(0)).into_par_iter())
            .map(row)
            .collect()
    };
    ensure!(scales.iter().all(|s| !s.is_nan()), "x contains NaN or Inf");
    Ok((q, scales))
}

/// One row of `activation_quant` (`bits` already checked) into `q`; returns the multiplier,
/// NaN for a row with NaN or Inf.
pub(crate) fn quantize_row(x: ArrayView1<'_, f32>, q: &mut [i8], bits: u32) -> f32 {
    let qb = ((1i32 << (bits - 1)) - 1) as f32;
    let owned;
    let xs = match x.as_slice() {
        Some(s) => s,
        None => {
            owned = x.to_vec();
            &owned
        }
    };
    crate::quant::simd::dispatch(RowQuant { x: xs, q, qb })
}

/// `max(m, a)` that keeps a NaN from either side (branch-free, vectorizes).
#[inline(always)]
fn nan_max(m: f32, a: f32) -> f32 {
    if a > m || a.is_nan() {
        a
    } else {
        m
    }
}

/// One row of `activation_quant`, compiled per instruction set (`vroundps` for the rounding).
struct RowQuant<'a> {
    x: &'a [f32],
    q: &'a mut [i8],
    qb: f32,
}

impl crate::quant::simd::Kernel for RowQuant<'_> {
    type Output = f32;
    #[inline(always)]
    fn run<S: crate::quant::simd::Isa>(self) -> f32 {
        // max |x| in eight lanes (vectorizes); a NaN wins, so a non-finite row ends with a
        // non-finite max and the multiplier returned is NaN.
        let mut lanes = [0f32; 8];
        let chunks = self.x.chunks_exact(8);
        let mut amax = 0f32;
        for v in chunks.remainder() {
            let a = v.abs();
            amax = nan_max(amax, a);
        }
        for c in chunks {
            for i in 0..8 {
                let a = c[i].abs();
                lanes[i] = nan_max(lanes[i], a);
            }
        }
        for l in lanes {
            amax = nan_max(amax, l);
        }
        if !amax.is_finite() {
            return f32::NAN;
        }
        // `127.0 / t` in torch is `t.reciprocal() * 127.0`: two float32 roundings.
        let s = (1.0 / amax.max(1e-5)) * self.qb;
        let lo = -self.qb - 1.0;
        for (o, v) in self.q.iter_mut().zip(self.x) {
            let c = (v * s).round_ties_even().max(lo).min(self.qb);
            // SAFETY: the row is finite (checked above), so `c` is an integer in [lo, qb]. The
            // saturating `as` casts compile to scalar code; this one vectorizes.
            *o = unsafe { c.to_int_unchecked::<i32>() } as i8;
        }
        s
    }
}

/// BitNet 1-bit / XNOR-Net weights: signs of `w - mean(w)` (the mean of the whole tensor, or 0
/// without `center`), sign(0) = +1, and per-row scales `mean(|w|)`, each mean added in torch's
/// float32 order on one thread (`aten_sum`).
pub fn binary_quantize(w: ArrayView2<'_, f32>, center: bool) -> Result<(Array2<i8>, Vec<f32>)> {
    check_finite(&w, "w")?;
    let order = SumOrder::default();
    let mu = if center && !w.is_empty() {
        let v: Vec<f32> = match w.as_slice_memory_order() {
            Some(s) => s.to_vec(),
            None => w.iter().copied().collect(),
        };
        aten_sum::mean(&v, order)
    } else {
        0.0
    };
    let signs = w.mapv(|v| if v - mu >= 0.0 { 1i8 } else { -1 });
    let scales = w
        .axis_iter(Axis(0))
        .map(|r| {
            if r.is_empty() {
                0.0
            } else {
                aten_sum::row_mean(&abs_run(r.iter()), order.lanes)
            }
        })
        .collect();
    Ok((signs, scales))
}

//! AWQ (Lin et al., 2023): activation-aware per-input-channel scales. Input channel `j` of a
//! layer is scaled by `s_j = a_j^α` (`a_j` its mean absolute activation on the calibration
//! data), the weight quantized as `Q(W diag(s))` and the input divided by `s`, so that salient
//! channels (large activations) get finer grid steps. `α` is searched on a grid in `[0, 1)`
//! for the least output error `Σ (W - Ŵ) H (W - Ŵ)ᵀ` on the calibration inputs (`H = Σ x xᵀ`),
//! with `Ŵ = Q(W diag(s)) diag(s)⁻¹`: the objective the published search evaluates by running
//! the layer on those inputs. `α = 0` is plain rounding, so the search never loses to it.
use super::gptq::output_error;
use crate::ensure;
use crate::quant::spec::{quantize, QuantSpec};
use crate::{Error, Result};
use ndarray::{Array2, ArrayView2, Axis};
use rayon::prelude::*;

/// What [`search`] finds.
#[derive(Debug)]
pub struct Scales {
    /// `s_j`, one per input feature (normalized: `max(s) · min(s) = 1`).
    pub scales: Vec<f32>,
    /// The exponent of the best grid point.
    pub alpha: f64,
    /// The layer's output error with those scales.
    pub error: f64,
}

/// The scales of `activation^α` for each `α = i / grid` (`i < grid`), normalized as the
/// reference does (`s / √(max s · min s)`) and kept above 1e-4 of the largest.
fn candidate(activation: &[f64], alpha: f64) -> Vec<f32> {
    let s: Vec<f64> = activation
        .iter()
        .map(|&a| a.max(0.0).powf(alpha).max(1e-4))
        .collect();
    let (lo, hi) = s.iter().fold((f64::INFINITY, 0.0f64), |(lo, hi), &v| {
        (lo.min(v), hi.max(v))
    });
    let norm = (lo * hi).sqrt();
    s.iter().map(|&v| (v / norm) as f32).collect()
}

/// `w diag(s)`, or with `inverse` `w diag(s)⁻¹`.
fn scale_columns(w: ArrayView2<'_, f32>, s: &[f32], inverse: bool) -> Array2<f32> {
    let mut out = w.to_owned();
    for mut row in out.axis_iter_mut(Axis(0)) {
        for (v, &sj) in row.iter_mut().zip(s) {
            *v = if inverse { *v / sj } else { *v * sj };
        }
    }
    out
}

/// The weight `Q(w diag(s)) diag(s)⁻¹` a layer computes with scales `s`, on min-max grids.
fn dequantized(w: ArrayView2<'_, f32>, s: &[f32], spec: QuantSpec) -> Result<Array2<f32>> {
    let ws = scale_columns(w, s, false);
    let q = quantize(ws.view().into_dyn(), spec, None)?
        .dequantize()?
        .into_dimensionality()
        .map_err(|e| Error::value(e.to_string()))?;
    Ok(scale_columns(q.view(), s, true))
}

/// The AWQ scales of weight `w` (out, in) whose inputs have Hessian `h` (in, in) and mean
/// absolute values `activation` (in): the best of `grid` exponents, on min-max grids (a
/// searched grid, like AWQ's clipping search, comes after the scales, on the scaled weight).
pub fn search(
    w: ArrayView2<'_, f32>,
    h: ArrayView2<'_, f64>,
    activation: &[f64],
    spec: QuantSpec,
    grid: usize,
) -> Result<Scales> {
    let n = w.ncols();
    ensure!(
        h.dim() == (n, n),
        "the Hessian must be ({n}, {n}), got {:?}",
        h.dim()
    );
    ensure!(
        activation.len() == n,
        "the activation statistics must have {n} values, got {}",
        activation.len()
    );
    ensure!(
        activation.iter().all(|a| a.is_finite() && *a >= 0.0),
        "the activation statistics must be finite and non-negative"
    );
    ensure!(grid >= 1, "the grid needs at least one point");
    let tried: Vec<Result<(f64, Vec<f32>, f64)>> = (0..grid)
        .into_par_iter()
        .map(|i| {
            let alpha = i as f64 / grid as f64;
            let s = candidate(activation, alpha);
            let q = dequantized(w, &s, spec)?;
            Ok((alpha, s, output_error(w, q.view(), h)?))
        })
        .collect();
    let mut best: Option<(f64, Vec<f32>, f64)> = None;
    for t in tried {
        let t = t?;
        // The first (smallest α) of equal errors: plain rounding unless scaling helps.
        if best.as_ref().is_none_or(|b| t.2 < b.2) {
            best = Some(t);
        }
    }
    let (alpha, scales, error) = best.expect("grid >= 1");
    Ok(Scales {
        scales,
        alpha,
        error,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::quant::spec::Granularity;

    /// Inputs with a few salient channels (large activations), and their statistics.
    fn layer(rows: usize, cols: usize, seed: u64) -> (Array2<f32>, Array2<f64>, Vec<f64>) {
        let mut state = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        let mut next = move || {
            state = state
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((state >> 11) as f64 / (1u64 << 53) as f64) * 2.0 - 1.0
        };
        let w = Array2::from_shape_fn((rows, cols), |_| next() as f32);
        let x = Array2::from_shape_fn((256, cols), |(_, j)| {
            next() * if j % 7 == 0 { 20.0 } else { 1.0 }
        });
        let h = x.t().dot(&x);
        let act = (0..cols)
            .map(|j| x.column(j).iter().map(|v| v.abs()).sum::<f64>() / 256.0)
            .collect();
        (w, h, act)
    }

    #[test]
    fn scales_never_lose_to_rounding_and_help_salient_channels() {
        let spec = QuantSpec::new(3, false, Granularity::Group, 1, Some(16)).unwrap();
        let (w, h, act) = layer(24, 64, 3);
        let r = search(w.view(), h.view(), &act, spec, 20).unwrap();
        let plain = dequantized(w.view(), &[1.0; 64], spec).unwrap();
        let plain = output_error(w.view(), plain.view(), h.view()).unwrap();
        assert!(r.error < plain, "{} !< {plain}", r.error);
        assert!(r.alpha > 0.0 && r.scales.len() == 64);
        // Salient channels scaled up.
        assert!(r.scales[0] > r.scales[1]);
        let prod = r.scales.iter().cloned().fold(f32::MIN, f32::max)
            * r.scales.iter().cloned().fold(f32::MAX, f32::min);
        assert!((prod - 1.0).abs() < 1e-4);
    }

    #[test]
    fn dead_channels_and_bad_input() {
        let spec = QuantSpec::new(4, false, Granularity::Channel, 0, None).unwrap();
        let (w, mut h, mut act) = layer(8, 32, 5);
        act[3] = 0.0;
        h.row_mut(3).fill(0.0);
        h.column_mut(3).fill(0.0);
        let r = search(w.view(), h.view(), &act, spec, 10).unwrap();
        assert!(r.error.is_finite() && r.scales.iter().all(|s| s.is_finite() && *s > 0.0));
        assert!(search(w.view(), h.view(), &act[1..], spec, 10).is_err());
        act[0] = f64::NAN;
        assert!(search(w.view(), h.view(), &act, spec, 10).is_err());
        assert!(search(w.view(), h.view(), &[1.0; 32], spec, 0).is_err());
    }
}

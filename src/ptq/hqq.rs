//! HQQ (Badri & Shaji, 2023): half-quadratic quantization, calibration-free. Each grid (scale
//! `s`, zero point `z`) is fitted to its weights under a sparsity-promoting `ℓp` error model
//! (`p < 1`: a few large errors cost less than many small ones) by half-quadratic splitting:
//! alternately the error `e = shrink_p(w - s (q - z), β)` (the generalized soft threshold) and
//! the grid that best reconstructs `w - e` from the codes `q`, with `β` growing by `κ` each
//! step, until the mean absolute error stops falling.
//!
//! The published solver updates a fractional zero point only; lowbit's grids have integer zero
//! points (as every runtime stores them), so each step fits the scale and zero point by least
//! squares on the codes, rounds the zero point and refits the scale for it (symmetric grids
//! keep their zero point and fit the scale alone). The first grid is min-max's, and a grid is
//! only kept while the error falls, so HQQ's is never worse than min-max's on that measure.
use super::gptq::{check_axis, group_size};
use crate::ensure;
use crate::quant::affine::QRange;
use crate::quant::spec::{qparams_from_minmax, quantize, Granularity, QuantSpec, QuantizedTensor};
use crate::Result;
use ndarray::{Array2, ArrayView2, Axis};
use rayon::prelude::*;

/// Solver settings (the published defaults).
#[derive(Clone, Debug, PartialEq)]
pub struct Config {
    /// The error model's `p`.
    pub lp: f64,
    /// The first `β` of the shrinkage.
    pub beta: f64,
    /// `β`'s growth per step.
    pub kappa: f64,
    /// At most this many steps.
    pub iters: usize,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            lp: 0.7,
            beta: 10.0,
            kappa: 1.01,
            iters: 20,
        }
    }
}

type Grid = (f32, i32);

fn code(v: f64, (s, z): Grid, r: QRange) -> f64 {
    ((v / s as f64).round_ties_even() + z as f64).clamp(r.min as f64, r.max as f64)
}

/// Mean `|v - s (q - z)|` of the values on grid `g`.
fn mean_abs_error(values: &[f64], g: Grid, r: QRange) -> f64 {
    let e: f64 = values
        .iter()
        .map(|&v| (v - g.0 as f64 * (code(v, g, r) - g.1 as f64)).abs())
        .sum();
    e / values.len().max(1) as f64
}

/// `sign(x) · max(|x| - |x|^(p-1) / β, 0)`: the proximal step of `|x|^p`.
fn shrink(x: f64, beta: f64, p: f64) -> f64 {
    let a = x.abs();
    if a == 0.0 {
        return 0.0;
    }
    x.signum() * (a - a.powf(p - 1.0) / beta).max(0.0)
}

/// The HQQ grid of one group's values.
fn fit(values: &[f64], r: QRange, symmetric: bool, cfg: &Config) -> Grid {
    let (lo, hi) = values
        .iter()
        .fold((f32::INFINITY, f32::NEG_INFINITY), |(lo, hi), &v| {
            (lo.min(v as f32), hi.max(v as f32))
        });
    let mut g = qparams_from_minmax(lo, hi, r, symmetric);
    let mut best = mean_abs_error(values, g, r);
    let mut beta = cfg.beta;
    let n = values.len() as f64;
    for _ in 0..cfg.iters {
        let q: Vec<f64> = values.iter().map(|&v| code(v, g, r)).collect();
        // The target the grid reconstructs: the weights less their sparse error.
        let t: Vec<f64> = values
            .iter()
            .zip(&q)
            .map(|(&v, &qi)| v - shrink(v - g.0 as f64 * (qi - g.1 as f64), beta, cfg.lp))
            .collect();
        beta *= cfg.kappa;
        let z = if symmetric {
            g.1
        } else {
            // Least squares t ≈ a q + b, i.e. s = a, z = -b / a; z rounded into the range.
            let (mq, mt) = (q.iter().sum::<f64>() / n, t.iter().sum::<f64>() / n);
            let sqq: f64 = q.iter().map(|qi| (qi - mq).powi(2)).sum();
            let sqt: f64 = q.iter().zip(&t).map(|(qi, ti)| (qi - mq) * (ti - mt)).sum();
            if sqq <= 0.0 || sqt <= 0.0 {
                break; // one code, or no increasing fit: nothing to refine
            }
            let a = sqt / sqq;
            let z = (mq - mt / a).round_ties_even();
            if !z.is_finite() {
                break;
            }
            (z as i32).clamp(r.min, r.max)
        };
        // The scale for that zero point: Σ t (q - z) / Σ (q - z)².
        let (num, den) = q.iter().zip(&t).fold((0.0, 0.0), |(num, den), (qi, ti)| {
            let d = qi - z as f64;
            (num + ti * d, den + d * d)
        });
        let s = (num / den) as f32;
        if !(s.is_finite() && s > 0.0) {
            break;
        }
        let next = (s, z);
        let e = mean_abs_error(values, next, r);
        if e >= best {
            break;
        }
        (g, best) = (next, e);
    }
    g
}

/// `w` (out, in) quantized on HQQ's grids of `spec`: per tensor, per output channel or per
/// group of input features; rows in parallel.
pub fn hqq(w: ArrayView2<'_, f32>, spec: QuantSpec, cfg: &Config) -> Result<QuantizedTensor> {
    let (rows, cols) = w.dim();
    check_axis(&spec, "HQQ")?;
    ensure!(
        w.iter().all(|v| v.is_finite()),
        "the weight holds NaN or Inf"
    );
    ensure!(
        cfg.lp > 0.0 && cfg.lp <= 1.0 && cfg.beta > 0.0 && cfg.kappa >= 1.0,
        "HQQ needs 0 < lp <= 1, beta > 0 and kappa >= 1"
    );
    let (r, sym) = (spec.range(), spec.symmetric);
    let grids = match spec.granularity {
        Granularity::Tensor => {
            let v: Vec<f64> = w.iter().map(|&x| x as f64).collect();
            let (s, z) = if v.is_empty() {
                (1.0, 0)
            } else {
                fit(&v, r, sym, cfg)
            };
            (ndarray::arr0(s).into_dyn(), ndarray::arr0(z).into_dyn())
        }
        _ => {
            let gs = group_size(&spec, cols);
            let groups = cols.div_ceil(gs);
            let per_row: Vec<Vec<Grid>> = w
                .axis_iter(Axis(0))
                .into_par_iter()
                .map(|row| {
                    let v: Vec<f64> = row.iter().map(|&x| x as f64).collect();
                    v.chunks(gs).map(|c| fit(c, r, sym, cfg)).collect()
                })
                .collect();
            let s = Array2::from_shape_fn((rows, groups), |(i, j)| per_row[i][j].0);
            let z = Array2::from_shape_fn((rows, groups), |(i, j)| per_row[i][j].1);
            if spec.granularity == Granularity::Channel {
                (
                    s.column(0).to_owned().into_dyn(),
                    z.column(0).to_owned().into_dyn(),
                )
            } else {
                (s.into_dyn(), z.into_dyn())
            }
        }
    };
    quantize(w.into_dyn(), spec, Some(grids))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn weights(rows: usize, cols: usize, seed: u64) -> Array2<f32> {
        let mut state = seed.wrapping_add(0x9e37_79b9_7f4a_7c15);
        Array2::from_shape_fn((rows, cols), |_| {
            state = state
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            let u = ((state >> 11) as f64 / (1u64 << 53) as f64) * 2.0 - 1.0;
            (u * u * u) as f32 // heavy-tailed, as trained weights are
        })
    }

    fn mean_abs(w: &Array2<f32>, q: &QuantizedTensor) -> f64 {
        let d = q.dequantize().unwrap();
        w.iter()
            .zip(d.iter())
            .map(|(a, b)| (a - b).abs() as f64)
            .sum::<f64>()
            / w.len() as f64
    }

    #[test]
    fn never_worse_than_min_max_and_usually_better() {
        for (bits, sym, gran, gs) in [
            (4, false, Granularity::Group, Some(32)),
            (3, false, Granularity::Group, Some(16)),
            (2, false, Granularity::Group, Some(16)),
            (4, true, Granularity::Channel, None),
            (3, false, Granularity::Tensor, None),
        ] {
            let spec = QuantSpec::new(bits, sym, gran, 0, gs).unwrap();
            let w = weights(16, 64, bits as u64);
            let q = hqq(w.view(), spec, &Config::default()).unwrap();
            q.validate().unwrap();
            let rtn = quantize(w.view().into_dyn(), spec, None).unwrap();
            let (e, e_rtn) = (mean_abs(&w, &q), mean_abs(&w, &rtn));
            assert!(e <= e_rtn * (1.0 + 1e-12), "{bits} {gran:?}: {e} > {e_rtn}");
            if !sym && gran == Granularity::Group {
                assert!(e < e_rtn, "{bits}: no gain");
            }
        }
    }

    #[test]
    fn degenerate_groups_and_bad_input() {
        let spec = QuantSpec::new(3, false, Granularity::Group, 1, Some(8)).unwrap();
        let mut w = Array2::<f32>::zeros((3, 20)); // zeros, constants, one value
        w.row_mut(1).fill(0.25);
        w[[2, 5]] = -3.0;
        let q = hqq(w.view(), spec, &Config::default()).unwrap();
        let d = q.dequantize().unwrap();
        assert!(d.iter().all(|v| v.is_finite()));
        assert_eq!(d[[0, 0]], 0.0);
        w[[0, 0]] = f32::NAN;
        assert!(hqq(w.view(), spec, &Config::default()).is_err());
        let bad = Config {
            lp: 0.0,
            ..Config::default()
        };
        assert!(hqq(Array2::zeros((2, 8)).view(), spec, &bad).is_err());
    }
}

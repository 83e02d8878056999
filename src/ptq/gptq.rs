//! GPTQ (Frantar et al., 2022): weights quantized one input column at a time, each column's
//! rounding error fed back into the columns not yet quantized through the upper Cholesky factor
//! of the inverse Hessian `H = Σ x xᵀ` of the layer's calibration inputs.
//!
//! Rows (output features) are independent given that factor, so the solver runs over chunks of
//! rows in parallel and each chunk reads the factor once per column (the role the published
//! algorithm's lazy block updates play). Arithmetic is float64; the grid is lowbit's (the
//! torch.ao min-max formula in float32), so the result is a `QuantizedTensor` of `spec`.
//!
//! Grids: per tensor and per channel from the weights as given; per group from the weights at
//! the moment the group's first column is reached (the published algorithm), or, with
//! `act_order`, from the weights as given ("static groups": groups stay runs of consecutive
//! input features, as a `QuantizedTensor` stores them, while columns are visited in order of
//! decreasing Hessian diagonal).
use super::linalg::inverse_cholesky_upper;
use crate::ensure;
use crate::quant::affine::QRange;
use crate::quant::pack::pack;
use crate::quant::simd::{dispatch, Isa, Kernel};
use crate::quant::spec::{qparams_from_minmax, Granularity, QuantSpec, QuantizedTensor};
use crate::{Error, Result};
use ndarray::linalg::general_mat_mul;
use ndarray::{s, Array2, ArrayView2, ArrayViewMut2, Axis};
use rayon::prelude::*;

/// Rows solved together: each row of the factor is read once per chunk.
const ROWS_PER_CHUNK: usize = 32;

/// Columns per lazy batch update (the reference's block size).
const BLOCK: usize = 128;

/// Columns of a lazy-update block: [`BLOCK`], or with dynamic groups (grids taken from the
/// weights as feedback left them when a group's first column is reached) a whole number of
/// groups, or one group where a group is wider, so that every column of a group has taken the
/// errors of every column before it when the group's grid is chosen.
fn block_columns(gs: usize, dynamic: bool) -> usize {
    match (dynamic, gs >= BLOCK) {
        (false, _) => BLOCK,
        (true, true) => gs,
        (true, false) => BLOCK / gs * gs,
    }
}

/// Solver settings.
#[derive(Clone, Debug, PartialEq)]
pub struct Config {
    /// Added to the Hessian's diagonal, as a fraction of its mean (the reference's `percdamp`).
    pub damp: f64,
    /// Visit columns in order of decreasing Hessian diagonal.
    pub act_order: bool,
    /// Each grid is the shrunk min-max range (`p * [min, max]`, `p` from 1 down to 0.2 in steps
    /// of 0.01) with the least squared error weighted by the Hessian diagonal, instead of the
    /// min-max range itself (never worse than it, on that measure).
    pub mse_grid: bool,
    /// Feed each column's rounding error into the columns not yet quantized (GPTQ); without
    /// it, every weight is rounded to its grid (round to nearest).
    pub feedback: bool,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            damp: 0.01,
            act_order: true,
            mse_grid: false,
            feedback: true,
        }
    }
}

/// What `gptq` returns.
#[derive(Debug)]
pub struct Solution {
    pub tensor: QuantizedTensor,
    /// `tensor` dequantized: what the layer computes with.
    pub dequantized: Array2<f32>,
    /// Input features whose Hessian diagonal is 0 (never active in the calibration data): their
    /// weights are set to 0, as in the reference.
    pub dead: usize,
}

/// The grid of one (row, group): scale and zero point.
type Grid = (f32, i32);

/// Shrink factors of the MSE grid search: 1.00, 0.99, ..., 0.20.
const SHRINKS: usize = 81;

/// The grid of `values` (whose importances are `weights`): min-max, or with `mse` the shrunk
/// min-max range of least weighted squared error (the first, least shrunk, on ties). Inlined
/// into the dispatched kernels below (`vroundpd` there, not a libm call per value).
#[inline(always)]
fn search_grid(values: &[f64], weights: &[f64], r: QRange, symmetric: bool, mse: bool) -> Grid {
    let (lo, hi) = values
        .iter()
        .fold((f32::INFINITY, f32::NEG_INFINITY), |(lo, hi), &v| {
            (lo.min(v as f32), hi.max(v as f32))
        });
    let base = qparams_from_minmax(lo, hi, r, symmetric);
    if !mse {
        return base;
    }
    let cost = |g: Grid| grid_cost(values, weights, g, r);
    let (mut best, mut best_cost) = (base, cost(base));
    for i in 1..SHRINKS {
        let p = 1.0 - i as f32 / 100.0;
        let g = qparams_from_minmax(lo * p, hi * p, r, symmetric);
        let c = cost(g);
        if c < best_cost {
            (best, best_cost) = (g, c);
        }
    }
    best
}

/// `Σ weight (value - its grid point)²`, in eight independent lanes (vectorizes).
#[inline(always)]
fn grid_cost(values: &[f64], weights: &[f64], g: Grid, r: QRange) -> f64 {
    let mut acc = [0.0f64; 8];
    let (cv, cw) = (values.chunks_exact(8), weights.chunks_exact(8));
    let tail: f64 = cv
        .remainder()
        .iter()
        .zip(cw.remainder())
        .map(|(&v, &wt)| wt * (v - round_to_grid(v, g, r).1).powi(2))
        .sum();
    for (v, wt) in cv.zip(cw) {
        for l in 0..8 {
            let d = v[l] - round_to_grid(v[l], g, r).1;
            acc[l] += wt[l] * d * d;
        }
    }
    acc.iter().sum::<f64>() + tail
}

#[inline(always)]
fn round_to_grid(w: f64, (s, zp): Grid, r: QRange) -> (i32, f64) {
    let s = s as f64;
    let q = ((w / s).round_ties_even() + zp as f64).clamp(r.min as f64, r.max as f64);
    (q as i32, (q - zp as f64) * s)
}

/// A per-channel `spec` of a weight matrix must run along its output channels (axis 0).
pub(super) fn check_axis(spec: &QuantSpec, solver: &str) -> Result<()> {
    if spec.granularity == Granularity::Channel {
        ensure!(
            spec.axis == 0 || spec.axis == -2,
            "{solver} quantizes per output channel (axis 0) or per group of input features, got axis {}",
            spec.axis
        );
    }
    Ok(())
}

/// Columns per group of `spec` (all of them for per-channel and per-tensor grids).
pub(super) fn group_size(spec: &QuantSpec, cols: usize) -> usize {
    match spec.granularity {
        Granularity::Tensor | Granularity::Channel => cols.max(1),
        Granularity::Group => spec.group_size.expect("a group spec has a group size"),
    }
}

/// The per-tensor grid search, compiled for the CPU's instruction set.
struct TensorGrid<'a> {
    values: &'a [f64],
    weights: &'a [f64],
    r: QRange,
    sym: bool,
    mse: bool,
}

impl Kernel for TensorGrid<'_> {
    type Output = Grid;

    #[inline(always)]
    fn run<S: Isa>(self) -> Grid {
        search_grid(self.values, self.weights, self.r, self.sym, self.mse)
    }
}

/// What every chunk of rows shares.
struct Common<'a> {
    w: ArrayView2<'a, f32>,
    /// Visiting order of the input columns.
    perm: &'a [usize],
    dead: &'a [bool],
    /// Importance of each input for the MSE grid search.
    imp: &'a [f64],
    /// Upper Cholesky factor of the damped inverse Hessian, in visiting order.
    u: &'a Array2<f64>,
    feedback: bool,
    r: QRange,
    sym: bool,
    mse: bool,
    gs: usize,
    dynamic: bool,
    tensor_grid: Option<Grid>,
    block: usize,
}

/// GPTQ on rows `r0..` of the weight (as many as `codes` has), compiled for the CPU's
/// instruction set; rows are independent given the factor.
struct Rows<'a> {
    c: &'a Common<'a>,
    r0: usize,
    codes: ArrayViewMut2<'a, i32>,
    scales: ArrayViewMut2<'a, f32>,
    zs: ArrayViewMut2<'a, i32>,
}

impl Kernel for Rows<'_> {
    type Output = ();

    #[inline(always)]
    fn run<S: Isa>(self) {
        let Rows {
            c,
            r0,
            mut codes,
            mut scales,
            mut zs,
        } = self;
        let (n, cols) = codes.dim();
        let (r, gs, u) = (c.r, c.gs, c.u);
        // This chunk's rows in visiting order, in float64.
        let mut wk = Array2::from_shape_fn((n, cols), |(k, i)| {
            let j = c.perm[i];
            if c.dead[j] && c.feedback {
                0.0
            } else {
                c.w[[r0 + k, j]] as f64
            }
        });
        // Static grids, from the weights as given.
        if !c.dynamic {
            for k in 0..n {
                for g in 0..scales.ncols() {
                    let grid = c.tensor_grid.unwrap_or_else(|| {
                        let end = ((g + 1) * gs).min(cols);
                        let v: Vec<f64> = (g * gs..end).map(|j| c.w[[r0 + k, j]] as f64).collect();
                        search_grid(&v, &c.imp[g * gs..end], r, c.sym, c.mse)
                    });
                    (scales[[k, g]], zs[[k, g]]) = grid;
                }
            }
        }
        // Lazy batch updates: a block's columns take each column's error at once; the
        // columns after the block take the whole block's errors in one product at its end.
        for b0 in (0..cols).step_by(c.block) {
            let b1 = (b0 + c.block).min(cols);
            let mut err = Array2::<f64>::zeros((n, b1 - b0));
            for i in b0..b1 {
                let col = c.perm[i];
                let g = col / gs;
                let tail = &u.row(i).to_slice().expect("the factor is row-major")[i + 1..b1];
                for k in 0..n {
                    let mut wrow = wk.row_mut(k);
                    let wrow = wrow.as_slice_mut().expect("row-major");
                    if c.dynamic && col.is_multiple_of(gs) {
                        // No act-order, so `col == i`, and the group lies in this block: its
                        // weights as error feedback left them.
                        let end = (col + gs).min(cols);
                        (scales[[k, g]], zs[[k, g]]) =
                            search_grid(&wrow[col..end], &c.imp[col..end], r, c.sym, c.mse);
                    }
                    let (q, deq) = round_to_grid(wrow[i], (scales[[k, g]], zs[[k, g]]), r);
                    codes[[k, col]] = q;
                    if c.feedback {
                        let e = (wrow[i] - deq) / u[[i, i]];
                        err[[k, i - b0]] = e;
                        if e != 0.0 {
                            for (wj, uj) in wrow[i + 1..b1].iter_mut().zip(tail) {
                                *wj -= e * uj;
                            }
                        }
                    }
                }
            }
            if c.feedback && b1 < cols {
                let (_, mut rest) = wk.view_mut().split_at(Axis(1), b1);
                general_mat_mul(-1.0, &err, &u.slice(s![b0..b1, b1..]), 1.0, &mut rest);
            }
        }
    }
}

/// Quantizes the weight `w` (out_features, in_features) of a layer whose calibration inputs have
/// the Hessian `h` (in_features, in_features, `Σ x xᵀ` up to a constant factor).
pub fn gptq(
    w: ArrayView2<'_, f32>,
    h: ArrayView2<'_, f64>,
    spec: QuantSpec,
    cfg: &Config,
) -> Result<Solution> {
    let (rows, cols) = w.dim();
    ensure!(
        h.dim() == (cols, cols),
        "the Hessian must be ({cols}, {cols}) for a weight with {cols} input features, got {:?}",
        h.dim()
    );
    ensure!(
        cfg.damp.is_finite() && cfg.damp >= 0.0,
        "damp must be a finite number >= 0, got {}",
        cfg.damp
    );
    check_axis(&spec, "GPTQ")?;
    ensure!(
        w.iter().all(|v| v.is_finite()),
        "the weight holds NaN or Inf"
    );
    ensure!(
        h.iter().all(|v| v.is_finite()),
        "the Hessian holds NaN or Inf"
    );
    let r = spec.range();
    let sym = spec.symmetric;
    let gs = group_size(&spec, cols);

    // Dead inputs: a zero diagonal makes the Hessian singular; the reference sets it to 1 and
    // the weights to 0.
    let mut hd = h.to_owned();
    let dead: Vec<bool> = (0..cols).map(|i| hd[[i, i]] == 0.0).collect();
    for (i, &d) in dead.iter().enumerate() {
        if d {
            hd[[i, i]] = 1.0;
        }
    }
    let perm: Vec<usize> = if cfg.act_order {
        let mut p: Vec<usize> = (0..cols).collect();
        p.sort_by(|&a, &b| hd[[b, b]].total_cmp(&hd[[a, a]])); // stable: ties keep their order
        p
    } else {
        (0..cols).collect()
    };
    let mut hp = Array2::<f64>::from_shape_fn((cols, cols), |(i, j)| hd[[perm[i], perm[j]]]);
    let mean_diag = (0..cols).map(|i| hp[[i, i]]).sum::<f64>() / cols.max(1) as f64;
    for i in 0..cols {
        hp[[i, i]] += cfg.damp * mean_diag;
    }
    let u = if cols == 0 {
        Array2::zeros((0, 0))
    } else {
        inverse_cholesky_upper(&hp).map_err(|e| {
            Error::value(format!(
                "{e}; raise damp (now {}) or calibrate on more data",
                cfg.damp
            ))
        })?
    };

    let ngroups = cols.div_ceil(gs);
    // Importance of each input feature for the MSE grid: its Hessian diagonal (0 when dead).
    let imp: Vec<f64> = (0..cols)
        .map(|j| if dead[j] { 0.0 } else { h[[j, j]] })
        .collect();
    let mse = cfg.mse_grid;
    let tensor_grid = (spec.granularity == Granularity::Tensor).then(|| {
        let v: Vec<f64> = w.iter().map(|&v| v as f64).collect();
        let wt: Vec<f64> = (0..rows).flat_map(|_| imp.iter().copied()).collect();
        dispatch(TensorGrid {
            values: &v,
            weights: &wt,
            r,
            sym,
            mse,
        })
    });
    // Grids from the weights as given (per tensor, per channel, or act-order groups), or
    // dynamic: from the weights as feedback left them, when a group's first column is reached.
    let dynamic = spec.granularity == Granularity::Group && !cfg.act_order && cfg.feedback;

    let mut codes = Array2::<i32>::zeros((rows, cols));
    let mut grids = Array2::<f32>::zeros((rows, ngroups));
    let mut zps = Array2::<i32>::zeros((rows, ngroups));
    let common = Common {
        w,
        perm: &perm,
        dead: &dead,
        imp: &imp,
        u: &u,
        feedback: cfg.feedback,
        r,
        sym,
        mse,
        gs,
        dynamic,
        tensor_grid,
        block: block_columns(gs, dynamic),
    };
    codes
        .axis_chunks_iter_mut(Axis(0), ROWS_PER_CHUNK)
        .into_par_iter()
        .zip(grids.axis_chunks_iter_mut(Axis(0), ROWS_PER_CHUNK))
        .zip(zps.axis_chunks_iter_mut(Axis(0), ROWS_PER_CHUNK))
        .enumerate()
        .for_each(|(c, ((codes, scales), zs))| {
            dispatch(Rows {
                c: &common,
                r0: c * ROWS_PER_CHUNK,
                codes,
                scales,
                zs,
            })
        });

    // The grid tables in the spec's shape, and the codes packed as stored (offsets from the
    // range's minimum, as `quant::spec::quantize` packs them).
    let (scales, zero_points) = match spec.granularity {
        Granularity::Tensor => {
            let (s, z) = tensor_grid.unwrap_or((1.0, 0));
            (ndarray::arr0(s).into_dyn(), ndarray::arr0(z).into_dyn())
        }
        Granularity::Channel => (
            grids.column(0).to_owned().into_dyn(),
            zps.column(0).to_owned().into_dyn(),
        ),
        Granularity::Group => (grids.into_dyn(), zps.into_dyn()),
    };
    let offsets: Vec<u8> = codes.iter().map(|&q| (q - r.min) as u8).collect();
    let tensor = QuantizedTensor {
        spec,
        shape: vec![rows, cols],
        codes: pack(&offsets, spec.bits)?,
        scales,
        zero_points,
    };
    tensor.validate()?;
    let dequantized = tensor
        .dequantize()?
        .into_dimensionality()
        .expect("a 2-D tensor");
    Ok(Solution {
        tensor,
        dequantized,
        dead: dead.iter().filter(|&&d| d).count(),
    })
}

/// `Σ_rows (w - q) H (w - q)ᵀ`: the layer's squared output error over the calibration inputs
/// whose Hessian is `h` (GPTQ's objective), for comparing solvers on one layer.
pub fn output_error(
    w: ArrayView2<'_, f32>,
    q: ArrayView2<'_, f32>,
    h: ArrayView2<'_, f64>,
) -> Result<f64> {
    ensure!(
        w.dim() == q.dim(),
        "the weights differ in shape: {:?} and {:?}",
        w.dim(),
        q.dim()
    );
    ensure!(
        h.dim() == (w.ncols(), w.ncols()),
        "the Hessian must be ({0}, {0}), got {1:?}",
        w.ncols(),
        h.dim()
    );
    let d = Array2::from_shape_fn(w.dim(), |ij| w[ij] as f64 - q[ij] as f64);
    // Chunks of rows in parallel, their sums added in order (the same on any thread count).
    let parts: Vec<f64> = d
        .axis_chunks_iter(Axis(0), ROWS_PER_CHUNK)
        .into_par_iter()
        .map(|c| c.dot(&h).iter().zip(c.iter()).map(|(a, b)| a * b).sum())
        .collect();
    Ok(parts.iter().sum())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::quant::spec::quantize;
    use ndarray::Array2;

    fn data(rows: usize, cols: usize, samples: usize, seed: u64) -> (Array2<f32>, Array2<f64>) {
        let mut s = seed;
        let mut next = move || {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((s >> 11) as f64 / (1u64 << 53) as f64) - 0.5
        };
        let w = Array2::from_shape_fn((rows, cols), |_| next() as f32);
        // Correlated inputs: a shared component makes the Hessian far from diagonal.
        let x = Array2::from_shape_fn((samples, cols), |_| next());
        let shared = Array2::from_shape_fn((samples, 1), |_| next());
        let x = &x + &(shared * 2.0);
        (w, x.t().dot(&x))
    }

    fn rtn(w: &Array2<f32>, spec: QuantSpec) -> Array2<f32> {
        quantize(w.view().into_dyn(), spec, None)
            .unwrap()
            .dequantize()
            .unwrap()
            .into_dimensionality()
            .unwrap()
    }

    #[test]
    fn gptq_beats_round_to_nearest_on_correlated_inputs() {
        let (w, h) = data(24, 64, 256, 1);
        for spec in [
            QuantSpec::new(4, true, Granularity::Channel, 0, None).unwrap(),
            QuantSpec::new(3, false, Granularity::Group, 0, Some(16)).unwrap(),
            QuantSpec::new(2, false, Granularity::Channel, 0, None).unwrap(),
        ] {
            for act_order in [false, true] {
                let cfg = Config {
                    act_order,
                    ..Config::default()
                };
                let s = gptq(w.view(), h.view(), spec, &cfg).unwrap();
                let e_gptq = output_error(w.view(), s.dequantized.view(), h.view()).unwrap();
                let e_rtn = output_error(w.view(), rtn(&w, spec).view(), h.view()).unwrap();
                assert!(
                    e_gptq < e_rtn,
                    "{spec:?} act_order={act_order}: gptq {e_gptq} >= rtn {e_rtn}"
                );
            }
        }
    }

    #[test]
    fn without_feedback_it_is_round_to_nearest_and_mse_grids_only_help() {
        let (w, h) = data(24, 64, 256, 3);
        for spec in [
            QuantSpec::new(4, true, Granularity::Channel, 0, None).unwrap(),
            QuantSpec::new(3, false, Granularity::Group, 0, Some(16)).unwrap(),
            QuantSpec::new(2, false, Granularity::Group, 0, Some(32)).unwrap(),
            QuantSpec::new(2, true, Granularity::Tensor, 0, None).unwrap(),
        ] {
            let plain = Config {
                feedback: false,
                ..Config::default()
            };
            let s = gptq(w.view(), h.view(), spec, &plain).unwrap();
            // Round to nearest (in float64: a weight exactly between two codes may round the
            // other way than the float32 quantizer rounds it, nothing else).
            let r = rtn(&w, spec);
            let differ = s.dequantized.iter().zip(&r).filter(|(a, b)| a != b).count();
            assert!(
                differ * 200 <= r.len(),
                "{spec:?}: {differ} of {} differ from RTN",
                r.len()
            );
            let e_rtn = output_error(w.view(), s.dequantized.view(), h.view()).unwrap();
            // The MSE grid minimises each group's diagonal-weighted error: never above min-max's.
            let mse = Config {
                mse_grid: true,
                ..plain.clone()
            };
            let m = gptq(w.view(), h.view(), spec, &mse).unwrap();
            let diag = |d: &Array2<f32>| -> f64 {
                (0..w.nrows())
                    .flat_map(|i| (0..w.ncols()).map(move |j| (i, j)))
                    .map(|(i, j)| h[[j, j]] * (w[[i, j]] as f64 - d[[i, j]] as f64).powi(2))
                    .sum()
            };
            assert!(
                diag(&m.dequantized) <= diag(&s.dequantized) * (1.0 + 1e-12),
                "{spec:?}"
            );
            let e_mse = output_error(w.view(), m.dequantized.view(), h.view()).unwrap();
            assert!(e_mse.is_finite() && e_rtn.is_finite());
            // And GPTQ on MSE grids stays below RTN.
            let both = Config {
                mse_grid: true,
                ..Config::default()
            };
            let g = gptq(w.view(), h.view(), spec, &both).unwrap();
            let e_g = output_error(w.view(), g.dequantized.view(), h.view()).unwrap();
            assert!(e_g < e_rtn, "{spec:?}: gptq+mse {e_g} >= rtn {e_rtn}");
        }
    }

    #[test]
    fn dead_inputs_singular_hessians_and_bad_input() {
        let (w, mut h) = data(8, 16, 64, 2);
        for j in 0..16 {
            h[[3, j]] = 0.0;
            h[[j, 3]] = 0.0;
        }
        let spec = QuantSpec::new(4, false, Granularity::Channel, 0, None).unwrap();
        let s = gptq(w.view(), h.view(), spec, &Config::default()).unwrap();
        assert_eq!(s.dead, 1);
        assert!(s.dequantized.column(3).iter().all(|&v| v == 0.0));
        assert!(s.dequantized.iter().all(|v| v.is_finite()));
        // Rank one (duplicated features): damping makes it solvable.
        let ones = Array2::<f64>::ones((16, 16));
        let s = gptq(w.view(), ones.view(), spec, &Config::default()).unwrap();
        assert!(s.dequantized.iter().all(|v| v.is_finite()));
        // Without damping it is refused with a clear error, not NaN.
        let cfg = Config {
            damp: 0.0,
            act_order: false,
            ..Config::default()
        };
        let e = gptq(w.view(), ones.view(), spec, &cfg)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("not positive definite") && e.contains("raise damp"),
            "{e}"
        );
        let mut bad = h.clone();
        bad[[0, 1]] = f64::NAN;
        assert!(gptq(w.view(), bad.view(), spec, &Config::default()).is_err());
        let small = Array2::<f64>::eye(3);
        assert!(gptq(w.view(), small.view(), spec, &Config::default()).is_err());
    }

    #[test]
    fn codes_are_the_tensor_codes() {
        let (w, h) = data(5, 40, 100, 3);
        let spec = QuantSpec::new(4, true, Granularity::Group, 0, Some(16)).unwrap();
        let s = gptq(w.view(), h.view(), spec, &Config::default()).unwrap();
        assert_eq!(s.tensor.scales.shape(), &[5, 3]);
        let back: Array2<f32> = s
            .tensor
            .dequantize()
            .unwrap()
            .into_dimensionality()
            .unwrap();
        assert_eq!(back, s.dequantized);
    }
}

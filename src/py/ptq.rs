//! Bindings of `crate::ptq`. `lowbit.ptq` checks dtypes and shapes first.
use super::detach;
use super::quant::{QuantSpec, QuantizedTensor};
use crate::ptq;
use numpy::{IntoPyArray, PyReadonlyArray1, PyReadonlyArray2};
use pyo3::prelude::*;

/// GPTQ on one layer (round to nearest without `feedback`; MSE-searched grids with
/// `mse_grid`): `(QuantizedTensor, dequantized float32 weight, dead input count)`.
#[pyfunction]
#[pyo3(signature = (w, h, spec, damp=0.01, act_order=true, mse_grid=false, feedback=true))]
#[allow(clippy::too_many_arguments)]
pub fn gptq<'py>(
    py: Python<'py>,
    w: PyReadonlyArray2<'py, f32>,
    h: PyReadonlyArray2<'py, f64>,
    spec: &QuantSpec,
    damp: f64,
    act_order: bool,
    mse_grid: bool,
    feedback: bool,
) -> PyResult<(QuantizedTensor, Bound<'py, PyAny>, usize)> {
    let (w, h, spec) = (w.as_array(), h.as_array(), spec.0);
    let cfg = ptq::GptqConfig {
        damp,
        act_order,
        mse_grid,
        feedback,
    };
    let s = detach(py, || ptq::gptq(w, h, spec, &cfg))?;
    Ok((
        QuantizedTensor(s.tensor),
        s.dequantized.into_pyarray(py).into_any(),
        s.dead,
    ))
}

/// AWQ's per-input scales of `w` for inputs of Hessian `h` and mean absolute values
/// `activation`: `(scales, alpha, output error)`, the best of `grid` exponents.
#[pyfunction]
#[pyo3(signature = (w, h, activation, spec, grid=20))]
pub fn awq_search<'py>(
    py: Python<'py>,
    w: PyReadonlyArray2<'py, f32>,
    h: PyReadonlyArray2<'py, f64>,
    activation: PyReadonlyArray1<'py, f64>,
    spec: &QuantSpec,
    grid: usize,
) -> PyResult<(Bound<'py, PyAny>, f64, f64)> {
    let (w, h, spec) = (w.as_array(), h.as_array(), spec.0);
    let act = activation.as_array().to_vec();
    let s = detach(py, || ptq::awq::search(w, h, &act, spec, grid))?;
    Ok((s.scales.into_pyarray(py).into_any(), s.alpha, s.error))
}

/// HQQ's calibration-free grids of `spec` for `w` (out, in).
#[pyfunction]
#[pyo3(signature = (w, spec, lp=0.7, beta=10.0, kappa=1.01, iters=20))]
pub fn hqq(
    py: Python<'_>,
    w: PyReadonlyArray2<'_, f32>,
    spec: &QuantSpec,
    lp: f64,
    beta: f64,
    kappa: f64,
    iters: usize,
) -> PyResult<QuantizedTensor> {
    let (w, spec) = (w.as_array(), spec.0);
    let cfg = ptq::hqq::Config {
        lp,
        beta,
        kappa,
        iters,
    };
    Ok(QuantizedTensor(detach(py, || {
        ptq::hqq::hqq(w, spec, &cfg)
    })?))
}

/// `Σ_rows (w - q) H (w - q)ᵀ`.
#[pyfunction]
pub fn output_error(
    py: Python<'_>,
    w: PyReadonlyArray2<'_, f32>,
    q: PyReadonlyArray2<'_, f32>,
    h: PyReadonlyArray2<'_, f64>,
) -> PyResult<f64> {
    let (w, q, h) = (w.as_array(), q.as_array(), h.as_array());
    detach(py, || ptq::output_error(w, q, h))
}

/// `x R` (or `x Rᵀ` with `inverse`) for the randomized Hadamard rotation of `x`'s columns
/// whose signs `seed` draws.
#[pyfunction]
#[pyo3(signature = (x, seed, inverse=false))]
pub fn hadamard_rotate<'py>(
    py: Python<'py>,
    x: PyReadonlyArray2<'py, f64>,
    seed: u64,
    inverse: bool,
) -> PyResult<Bound<'py, PyAny>> {
    let mut x = x.as_array().as_standard_layout().into_owned();
    detach(py, || {
        ptq::Rotation::new(x.ncols(), seed)?.apply(x.view_mut(), inverse)
    })?;
    Ok(x.into_pyarray(py).into_any())
}

/// `Rᵀ h R`: the Hessian of the rotated inputs.
#[pyfunction]
pub fn hadamard_conjugate<'py>(
    py: Python<'py>,
    h: PyReadonlyArray2<'py, f64>,
    seed: u64,
) -> PyResult<Bound<'py, PyAny>> {
    let h = h.as_array().to_owned();
    let out = detach(py, || ptq::Rotation::new(h.ncols(), seed)?.conjugate(&h))?;
    Ok(out.into_pyarray(py).into_any())
}

//! Bindings of `crate::calib`: the `Observer` core class (`lowbit.calib` gives it its names).
use super::convert::{float_in, with_float};
use super::{detach_locked, to_pyerr};
use crate::calib::{Observer as Core, ObserverConfig, QParams};
use crate::Result;
use numpy::IntoPyArray;
use pyo3::prelude::*;
use std::sync::Mutex;

/// The settings and state of one calibration observer (min-max, moving average, per channel
/// or histogram). Thread-safe: concurrent `update`s from several Python threads are serialised
/// on a lock taken with the GIL released, so no count is lost and no call fails.
#[pyclass(module = "lowbit._lowbit", frozen)]
pub struct Observer {
    inner: Mutex<Core>,
}

impl Observer {
    /// Runs `f` on the state with the GIL released (the lock is taken without the GIL, so a
    /// thread waiting for it never blocks one that needs the GIL to finish).
    fn with<T: Send>(
        &self,
        py: Python<'_>,
        f: impl FnOnce(&mut Core) -> Result<T> + Send,
    ) -> PyResult<T> {
        detach_locked(py, &self.inner, f)
    }
}

#[pymethods]
impl Observer {
    #[new]
    #[pyo3(signature = (kind, bits=8, symmetric=false, averaging_constant=0.01, axis=0, method="mse", percentile=99.99, bins=2048))]
    #[allow(clippy::too_many_arguments)]
    fn new(
        kind: &str,
        bits: u32,
        symmetric: bool,
        averaging_constant: f64,
        axis: i64,
        method: &str,
        percentile: f64,
        bins: usize,
    ) -> PyResult<Self> {
        let config = ObserverConfig {
            bits,
            symmetric,
            method: method.to_string(),
            percentile,
        };
        let core = Core::new(kind, config, averaging_constant, axis, bins).map_err(to_pyerr)?;
        Ok(Observer {
            inner: Mutex::new(core),
        })
    }

    /// Whether the observer has seen any value.
    #[getter]
    fn observed(&self, py: Python<'_>) -> PyResult<bool> {
        self.with(py, |o| Ok(o.observed()))
    }

    #[getter]
    fn quant_min(&self, py: Python<'_>) -> PyResult<i32> {
        self.with(py, |o| Ok(o.range().min))
    }

    #[getter]
    fn quant_max(&self, py: Python<'_>) -> PyResult<i32> {
        self.with(py, |o| Ok(o.range().max))
    }

    #[pyo3(signature = (x, bf16=false))]
    fn update(&self, py: Python<'_>, x: &Bound<'_, PyAny>, bf16: bool) -> PyResult<()> {
        with_float!(float_in(x, bf16, "x")?, |v| self.with(py, |o| o.update(v)))
    }

    /// (scale, zero_point): floats for per-tensor observers, float32 / int32 arrays per channel.
    fn qparams<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        Ok(match self.with(py, |o| o.qparams())? {
            QParams::Tensor(s, z) => (s, z).into_pyobject(py)?.into_any(),
            QParams::Channel(s, z) => (
                ndarray::Array1::from(s).into_pyarray(py),
                ndarray::Array1::from(z).into_pyarray(py),
            )
                .into_pyobject(py)?
                .into_any(),
        })
    }

    /// The clip range `(lo, hi)` the qparams represent (per-tensor histogram observers).
    fn clip_range(&self, py: Python<'_>) -> PyResult<(f64, f64)> {
        self.with(py, |o| Ok(o.search()?.clip))
    }

    /// Adds `other`'s state: histograms and min-max exactly (the result equals one observer over
    /// both inputs); moving averages by a batch-weighted mean of the running ranges.
    fn merge(&self, py: Python<'_>, other: &Observer) -> PyResult<()> {
        // A snapshot first, so that merging an observer into itself cannot deadlock.
        let theirs = other.with(py, |o| Ok(o.clone()))?;
        self.with(py, |o| o.merge(&theirs))
    }

    /// The whole state as JSON (settings and data), for `state_dict` and pickling.
    fn to_json(&self, py: Python<'_>) -> PyResult<String> {
        self.with(py, |o| Ok(o.to_json()))
    }

    #[staticmethod]
    fn from_json(s: &str) -> PyResult<Observer> {
        Ok(Observer {
            inner: Mutex::new(Core::from_json(s).map_err(to_pyerr)?),
        })
    }

    /// The channel axis of per-channel observers (None for the others).
    #[getter]
    fn axis(&self, py: Python<'_>) -> PyResult<Option<i64>> {
        self.with(py, |o| Ok(o.axis()))
    }

    /// Histogram observers: the canonical grids `(exps, starts, bins)` on which a device counts
    /// a batch whose extremes (per tensor, or per channel) are `lo`, `hi`.
    fn histogram_grids(
        &self,
        py: Python<'_>,
        lo: Vec<f32>,
        hi: Vec<f32>,
    ) -> PyResult<(Vec<i32>, Vec<i64>, usize)> {
        self.with(py, |o| o.histogram_grids(&lo, &hi))
    }

    /// Histogram observers: adds a batch a device counted on `histogram_grids`.
    fn add_histogram_counts(
        &self,
        py: Python<'_>,
        counts: Vec<u64>,
        lo: Vec<f32>,
        hi: Vec<f32>,
    ) -> PyResult<()> {
        self.with(py, |o| o.add_histogram_counts(counts, &lo, &hi))
    }

    /// Per-tensor histogram observers: (counts, left edge, bin width, min, max).
    fn histogram<'py>(&self, py: Python<'py>) -> PyResult<(Bound<'py, PyAny>, f64, f64, f32, f32)> {
        let h = self.with(py, |o| o.histogram().cloned())?;
        let (left, w) = h.grid();
        Ok((
            ndarray::Array1::from(h.counts).into_pyarray(py).into_any(),
            left,
            w,
            h.min,
            h.max,
        ))
    }
}

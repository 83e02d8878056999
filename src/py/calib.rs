//! Bindings of `crate::calib`: one `Observer` core class; `lowbit.calib` gives it its names.
use super::quant::{float_in, FloatIn};
use super::{detach_locked, to_pyerr, value_error};
use crate::calib::{search, Histogram, Method, MinMax, PerChannelMinMax};
use crate::quant::affine::check_axis;
use crate::quant::{Elem, QRange};
use crate::{ensure, Error, Result};
use ndarray::{ArrayViewD, Axis};
use numpy::IntoPyArray;
use pyo3::prelude::*;
use rayon::prelude::*;
use serde::{Deserialize, Serialize};
use std::sync::Mutex;

#[derive(Clone, Debug, Serialize, Deserialize)]
enum State {
    MinMax(MinMax),
    MovingAverage {
        mm: MinMax,
        averaging_constant: f32,
    },
    PerChannel(PerChannelMinMax),
    Histogram(Histogram),
    PerChannelHistogram {
        axis: i64,
        bins: usize,
        channels: Vec<Histogram>,
    },
}

#[derive(Clone, Debug, Serialize, Deserialize)]
struct Config {
    bits: u32,
    symmetric: bool,
    method: String,
    percentile: f64,
}

/// The settings and state of one observer.
#[derive(Clone, Debug, Serialize, Deserialize)]
struct Inner {
    config: Config,
    state: State,
}

fn method(c: &Config) -> Result<Method> {
    Ok(match c.method.parse::<Method>()? {
        Method::Percentile(_) => Method::Percentile(c.percentile),
        m => m,
    })
}

fn update_channels<E: Elem>(
    x: &ArrayViewD<'_, E>,
    axis: i64,
    bins: usize,
    channels: &mut Vec<Histogram>,
) -> Result<()> {
    let a = check_axis(axis, x.ndim())?;
    let c = x.len_of(Axis(a));
    if channels.is_empty() {
        *channels = (0..c)
            .map(|_| Histogram::new(bins))
            .collect::<Result<_>>()?;
    }
    ensure!(
        channels.len() == c,
        "this observer has {} channels, the batch has {c} along axis {axis}",
        channels.len()
    );
    // Every channel is checked before any changes, so a bad batch leaves all histograms intact.
    x.axis_iter(Axis(a))
        .into_par_iter()
        .try_for_each(|v| crate::quant::spec::finite_minmax(&v).map(|_| ()))?;
    channels
        .par_iter_mut()
        .zip(x.axis_iter(Axis(a)).into_par_iter())
        .try_for_each(|(h, v)| h.update(&v))
}

/// Per-tensor or per-channel qparams.
enum QParams {
    Tensor(f32, i32),
    Channel(Vec<f32>, Vec<i32>),
}

impl Inner {
    fn new(
        kind: &str,
        config: Config,
        averaging_constant: f64,
        axis: i64,
        bins: usize,
    ) -> Result<Self> {
        let bits = config.bits;
        ensure!(
            (2..=8).contains(&bits),
            "bits must be between 2 and 8, got {bits}"
        );
        method(&config)?;
        let p = config.percentile;
        ensure!(
            p > 0.0 && p <= 100.0,
            "percentile must be in (0, 100], got {p}"
        );
        let state = match kind {
            "minmax" => State::MinMax(MinMax::default()),
            "moving_average" => {
                ensure!(
                    averaging_constant > 0.0 && averaging_constant <= 1.0,
                    "averaging_constant must be in (0, 1], got {averaging_constant}"
                );
                State::MovingAverage {
                    mm: MinMax::default(),
                    averaging_constant: averaging_constant as f32,
                }
            }
            "per_channel" => State::PerChannel(PerChannelMinMax::new(axis)),
            "histogram" => State::Histogram(Histogram::new(bins)?),
            "per_channel_histogram" => {
                Histogram::new(bins)?;
                State::PerChannelHistogram {
                    axis,
                    bins,
                    channels: vec![],
                }
            }
            _ => return Err(Error::value(format!("unknown observer kind {kind:?}"))),
        };
        Ok(Inner { config, state })
    }

    /// Whether any value has been observed (torch.ao's default qparams apply until then).
    fn observed(&self) -> bool {
        match &self.state {
            State::MinMax(mm) | State::MovingAverage { mm, .. } => mm.batches > 0,
            State::PerChannel(pc) => pc.batches > 0,
            State::Histogram(h) => !h.is_empty(),
            State::PerChannelHistogram { channels, .. } => !channels.is_empty(),
        }
    }

    fn range(&self) -> QRange {
        QRange::for_bits(self.config.bits, self.config.symmetric).expect("bits validated in new()")
    }

    fn update<E: Elem>(&mut self, x: ArrayViewD<'_, E>) -> Result<()> {
        // Each state refuses a bad batch before changing anything.
        match &mut self.state {
            State::MinMax(m) => m.update(&x),
            State::MovingAverage {
                mm,
                averaging_constant,
            } => mm.update_moving(&x, *averaging_constant),
            State::PerChannel(m) => m.update(&x),
            State::Histogram(h) => h.update(&x),
            State::PerChannelHistogram {
                axis,
                bins,
                channels,
            } => update_channels(&x, *axis, *bins, channels),
        }
    }

    fn qparams(&self) -> Result<QParams> {
        let (r, sym, m) = (self.range(), self.config.symmetric, method(&self.config)?);
        Ok(match &self.state {
            State::MinMax(mm) | State::MovingAverage { mm, .. } => {
                let (s, z) = mm.qparams(r, sym)?;
                QParams::Tensor(s, z)
            }
            State::PerChannel(pc) => {
                let (s, z) = pc.qparams(r, sym)?;
                QParams::Channel(s, z)
            }
            State::Histogram(h) => {
                let res = search::search(h, r, sym, m)?;
                QParams::Tensor(res.scale, res.zero_point)
            }
            State::PerChannelHistogram { channels, .. } => {
                ensure!(!channels.is_empty(), "the observer has seen no data yet");
                let res = channels
                    .par_iter()
                    .map(|h| search::search(h, r, sym, m))
                    .collect::<Result<Vec<_>>>()?;
                QParams::Channel(
                    res.iter().map(|x| x.scale).collect(),
                    res.iter().map(|x| x.zero_point).collect(),
                )
            }
        })
    }

    fn histogram(&self) -> Result<&Histogram> {
        match &self.state {
            State::Histogram(h) => Ok(h),
            _ => Err(Error::value(
                "only per-tensor histogram observers have a histogram and a clip range",
            )),
        }
    }

    fn merge(&mut self, other: &Inner) -> Result<()> {
        let same =
            serde_json::to_string(&self.config).ok() == serde_json::to_string(&other.config).ok();
        ensure!(same, "cannot merge observers with different settings");
        match (&mut self.state, &other.state) {
            (State::MinMax(a), State::MinMax(b)) => a.merge(b),
            (State::MovingAverage { mm: a, .. }, State::MovingAverage { mm: b, .. }) => {
                if a.batches == 0 {
                    *a = b.clone();
                } else if b.batches > 0 {
                    let (wa, wb) = (a.batches as f32, b.batches as f32);
                    a.min = (a.min * wa + b.min * wb) / (wa + wb);
                    a.max = (a.max * wa + b.max * wb) / (wa + wb);
                    a.batches += b.batches;
                }
            }
            (State::PerChannel(a), State::PerChannel(b)) => a.merge(b)?,
            (State::Histogram(a), State::Histogram(b)) => a.merge(b)?,
            (
                State::PerChannelHistogram { channels: a, .. },
                State::PerChannelHistogram { channels: b, .. },
            ) => {
                if a.is_empty() {
                    *a = b.clone();
                } else if !b.is_empty() {
                    ensure!(
                        a.len() == b.len(),
                        "cannot merge observers with {} and {} channels",
                        a.len(),
                        b.len()
                    );
                    for (x, y) in a.iter_mut().zip(b) {
                        x.merge(y)?;
                    }
                }
            }
            _ => return Err(Error::value("cannot merge observers of different kinds")),
        }
        Ok(())
    }

    fn validate(&self) -> Result<()> {
        ensure!(
            (2..=8).contains(&self.config.bits),
            "invalid observer state: bits"
        );
        method(&self.config)?;
        match &self.state {
            State::Histogram(h) => h.validate(),
            State::PerChannelHistogram { channels, .. } => {
                channels.iter().try_for_each(|h| h.validate())
            }
            State::PerChannel(p) => {
                ensure!(
                    p.min.len() == p.max.len(),
                    "invalid observer state: channels"
                );
                Ok(())
            }
            _ => Ok(()),
        }
    }
}

/// The settings and state of one calibration observer (min-max, moving average, per channel
/// or histogram). Thread-safe: concurrent `update`s from several Python threads are serialised
/// on a lock taken with the GIL released, so no count is lost and no call fails.
#[pyclass(module = "lowbit._lowbit", frozen)]
pub struct Observer {
    inner: Mutex<Inner>,
}

impl Observer {
    /// Runs `f` on the state with the GIL released (the lock is taken without the GIL, so a
    /// thread waiting for it never blocks one that needs the GIL to finish).
    fn with<T: Send>(
        &self,
        py: Python<'_>,
        f: impl FnOnce(&mut Inner) -> Result<T> + Send,
    ) -> PyResult<T> {
        detach_locked(py, &self.inner, f)
    }

    fn snapshot(&self, py: Python<'_>) -> PyResult<Inner> {
        self.with(py, |i| Ok(i.clone()))
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
        let config = Config {
            bits,
            symmetric,
            method: method.to_string(),
            percentile,
        };
        let inner = Inner::new(kind, config, averaging_constant, axis, bins).map_err(to_pyerr)?;
        Ok(Observer {
            inner: Mutex::new(inner),
        })
    }

    /// Whether the observer has seen any value.
    #[getter]
    fn observed(&self, py: Python<'_>) -> PyResult<bool> {
        self.with(py, |i| Ok(i.observed()))
    }

    #[getter]
    fn quant_min(&self, py: Python<'_>) -> PyResult<i32> {
        self.with(py, |i| Ok(i.range().min))
    }

    #[getter]
    fn quant_max(&self, py: Python<'_>) -> PyResult<i32> {
        self.with(py, |i| Ok(i.range().max))
    }

    #[pyo3(signature = (x, bf16=false))]
    fn update(&self, py: Python<'_>, x: &Bound<'_, PyAny>, bf16: bool) -> PyResult<()> {
        match float_in(x, bf16, "x")? {
            FloatIn::F32(a) => {
                let v = a.as_array();
                self.with(py, |i| i.update(v))
            }
            FloatIn::F64(a) => {
                let v = a.as_array();
                self.with(py, |i| i.update(v))
            }
            FloatIn::F16(a) => {
                let v = a.as_array();
                self.with(py, |i| i.update(v))
            }
            FloatIn::BF16(a) => {
                let v = super::quant::bf16_view(a.as_array());
                self.with(py, |i| i.update(v))
            }
        }
    }

    /// (scale, zero_point): floats for per-tensor observers, float32 / int32 arrays per channel.
    fn qparams<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        Ok(match self.with(py, |i| i.qparams())? {
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
        self.with(py, |i| {
            let (r, sym, m) = (i.range(), i.config.symmetric, method(&i.config)?);
            Ok(search::search(i.histogram()?, r, sym, m)?.clip)
        })
    }

    /// Adds `other`'s state: histograms and min-max exactly (the result equals one observer over
    /// both inputs); moving averages by a batch-weighted mean of the running ranges.
    fn merge(&self, py: Python<'_>, other: &Observer) -> PyResult<()> {
        let o = other.snapshot(py)?; // first, so that merging an observer into itself cannot deadlock
        self.with(py, |i| i.merge(&o))
    }

    /// The whole state as JSON (settings and data), for `state_dict` and pickling.
    fn to_json(&self, py: Python<'_>) -> PyResult<String> {
        self.with(py, |i| {
            serde_json::to_string(&*i).map_err(|e| Error::value(e.to_string()))
        })
    }

    #[staticmethod]
    fn from_json(s: &str) -> PyResult<Observer> {
        let inner: Inner = serde_json::from_str(s)
            .map_err(|e| value_error(format!("invalid observer state: {e}")))?;
        inner.validate().map_err(to_pyerr)?;
        Ok(Observer {
            inner: Mutex::new(inner),
        })
    }

    /// Per-tensor histogram observers: (counts, left edge, bin width, min, max).
    fn histogram<'py>(&self, py: Python<'py>) -> PyResult<(Bound<'py, PyAny>, f64, f64, f32, f32)> {
        let h = self.with(py, |i| i.histogram().cloned())?;
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

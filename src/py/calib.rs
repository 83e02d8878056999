//! Bindings of `crate::calib`: one `Observer` core class; `lowbit.calib` gives it its names.
use super::quant::{float_in, FloatIn};
use super::{detach, to_pyerr, value_error};
use crate::calib::{search, Histogram, Method, MinMax, PerChannelMinMax};
use crate::quant::affine::check_axis;
use crate::quant::{Elem, QRange};
use crate::{ensure, Error, Result};
use ndarray::{ArrayViewD, Axis};
use numpy::IntoPyArray;
use pyo3::prelude::*;
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

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

/// The state and settings of one observer (min-max, moving average, per channel or histogram).
#[pyclass(module = "lowbit._lowbit")]
#[derive(Clone)]
pub struct Observer {
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

impl Observer {
    fn range(&self) -> QRange {
        QRange::for_bits(self.config.bits, self.config.symmetric).expect("bits validated in new()")
    }

    fn update_view<E: Elem>(&mut self, x: ArrayViewD<'_, E>) -> Result<()> {
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
        let check = || -> Result<State> {
            ensure!(
                (2..=8).contains(&bits),
                "bits must be between 2 and 8, got {bits}"
            );
            self::method(&config)?;
            ensure!(
                percentile > 0.0 && percentile <= 100.0,
                "percentile must be in (0, 100], got {percentile}"
            );
            Ok(match kind {
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
            })
        };
        let state = check().map_err(to_pyerr)?;
        Ok(Observer { config, state })
    }

    #[getter]
    fn quant_min(&self) -> i32 {
        self.range().min
    }

    #[getter]
    fn quant_max(&self) -> i32 {
        self.range().max
    }

    #[pyo3(signature = (x, bf16=false))]
    fn update(&mut self, py: Python<'_>, x: &Bound<'_, PyAny>, bf16: bool) -> PyResult<()> {
        // Each state refuses a bad batch before changing anything.
        match float_in(x, bf16, "x")? {
            FloatIn::F32(a) => {
                let v = a.as_array();
                detach(py, || self.update_view(v))
            }
            FloatIn::F64(a) => {
                let v = a.as_array();
                detach(py, || self.update_view(v))
            }
            FloatIn::F16(a) => {
                let v = a.as_array();
                detach(py, || self.update_view(v))
            }
            FloatIn::BF16(a) => {
                let v = super::quant::bf16_view(a.as_array());
                detach(py, || self.update_view(v))
            }
        }
    }

    /// (scale, zero_point): floats for per-tensor observers, float32 / int32 arrays per channel.
    fn qparams<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        let (r, sym) = (self.range(), self.config.symmetric);
        let m = method(&self.config).map_err(to_pyerr)?;
        let per_tensor = |s: f32, z: i32| Ok((s, z).into_pyobject(py)?.into_any());
        let per_channel = |s: Vec<f32>, z: Vec<i32>| -> PyResult<Bound<'py, PyAny>> {
            Ok((
                ndarray::Array1::from(s).into_pyarray(py),
                ndarray::Array1::from(z).into_pyarray(py),
            )
                .into_pyobject(py)?
                .into_any())
        };
        match &self.state {
            State::MinMax(mm) | State::MovingAverage { mm, .. } => {
                let (s, z) = mm.qparams(r, sym).map_err(to_pyerr)?;
                per_tensor(s, z)
            }
            State::PerChannel(pc) => {
                let (s, z) = pc.qparams(r, sym).map_err(to_pyerr)?;
                per_channel(s, z)
            }
            State::Histogram(h) => {
                let res = detach(py, || search::search(h, r, sym, m))?;
                per_tensor(res.scale, res.zero_point)
            }
            State::PerChannelHistogram { channels, .. } => {
                if channels.is_empty() {
                    return Err(value_error("the observer has seen no data yet"));
                }
                let res: Vec<_> = detach(py, || {
                    channels
                        .par_iter()
                        .map(|h| search::search(h, r, sym, m))
                        .collect::<Result<Vec<_>>>()
                })?;
                per_channel(
                    res.iter().map(|x| x.scale).collect(),
                    res.iter().map(|x| x.zero_point).collect(),
                )
            }
        }
    }

    /// The clip range `(lo, hi)` the observer's qparams represent (histogram observers).
    fn clip_range(&self, py: Python<'_>) -> PyResult<(f64, f64)> {
        let State::Histogram(h) = &self.state else {
            return Err(value_error(
                "clip_range is available for per-tensor histogram observers",
            ));
        };
        let (r, sym, m) = (
            self.range(),
            self.config.symmetric,
            method(&self.config).map_err(to_pyerr)?,
        );
        Ok(detach(py, || search::search(h, r, sym, m))?.clip)
    }

    /// Combines `other`'s state into this observer: histograms and min-max exactly (the result
    /// equals one observer over both inputs); moving averages by a batch-weighted mean.
    fn merge(&mut self, other: &Observer) -> PyResult<()> {
        let same =
            serde_json::to_string(&self.config).ok() == serde_json::to_string(&other.config).ok();
        let r = (|| -> Result<()> {
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
        })();
        r.map_err(to_pyerr)
    }

    /// The whole state as JSON (settings and data), for `state_dict` and pickling.
    fn to_json(&self) -> String {
        serde_json::json!({"config": self.config, "state": self.state}).to_string()
    }

    #[staticmethod]
    fn from_json(s: &str) -> PyResult<Observer> {
        #[derive(Deserialize)]
        struct Saved {
            config: Config,
            state: State,
        }
        let saved: Saved = serde_json::from_str(s)
            .map_err(|e| value_error(format!("invalid observer state: {e}")))?;
        let o = Observer {
            config: saved.config,
            state: saved.state,
        };
        let check = || -> Result<()> {
            ensure!(
                (2..=8).contains(&o.config.bits),
                "invalid observer state: bits"
            );
            method(&o.config)?;
            match &o.state {
                State::Histogram(h) => h.validate()?,
                State::PerChannelHistogram { channels, .. } => {
                    channels.iter().try_for_each(|h| h.validate())?
                }
                State::PerChannel(p) => ensure!(
                    p.min.len() == p.max.len(),
                    "invalid observer state: channels"
                ),
                _ => {}
            }
            Ok(())
        };
        check().map_err(to_pyerr)?;
        Ok(o)
    }

    /// Histogram observers: (counts, left edge, bin width, min, max) for plotting.
    fn histogram<'py>(&self, py: Python<'py>) -> PyResult<(Bound<'py, PyAny>, f64, f64, f32, f32)> {
        let State::Histogram(h) = &self.state else {
            return Err(value_error(
                "histogram() is available for per-tensor histogram observers",
            ));
        };
        let (left, w) = h.grid();
        let counts = ndarray::Array1::from(h.counts.clone())
            .into_pyarray(py)
            .into_any();
        Ok((counts, left, w, h.min, h.max))
    }
}

//! One calibration observer: its settings and state (min-max, moving average, per channel,
//! histogram or per-channel histogram), updates, merging, qparams and the state JSON that
//! `state_dict` and pickling carry. The bindings only convert arrays and release the GIL.
use super::{search, Histogram, Method, MinMax, PerChannelMinMax, SearchResult};
use crate::quant::affine::check_axis;
use crate::quant::{Elem, QRange};
use crate::{ensure, Error, Result};
use ndarray::{ArrayViewD, Axis};
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
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

/// The settings every observer kind shares.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Config {
    pub bits: u32,
    pub symmetric: bool,
    /// The histogram search: `mse`, `sqnr`, `percentile` or `entropy`.
    pub method: String,
    /// The percentile (0, 100] of `method="percentile"`.
    pub percentile: f64,
}

impl Config {
    fn method(&self) -> Result<Method> {
        Ok(match self.method.parse::<Method>()? {
            Method::Percentile(_) => Method::Percentile(self.percentile),
            m => m,
        })
    }

    fn validate(&self) -> Result<()> {
        let (bits, p) = (self.bits, self.percentile);
        ensure!(
            (2..=8).contains(&bits),
            "bits must be between 2 and 8, got {bits}"
        );
        self.method()?;
        ensure!(
            p > 0.0 && p <= 100.0,
            "percentile must be in (0, 100], got {p}"
        );
        Ok(())
    }
}

/// Per-tensor or per-channel qparams.
#[derive(Clone, Debug, PartialEq)]
pub enum QParams {
    Tensor(f32, i32),
    Channel(Vec<f32>, Vec<i32>),
}

/// The settings and state of one observer.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Observer {
    config: Config,
    state: State,
}

fn check_averaging_constant(c: f64) -> Result<()> {
    ensure!(
        c > 0.0 && c <= 1.0,
        "averaging_constant must be in (0, 1], got {c}"
    );
    Ok(())
}

impl Observer {
    /// An observer of `kind` (`minmax`, `moving_average`, `per_channel`, `histogram` or
    /// `per_channel_histogram`); `averaging_constant`, `axis` and `bins` apply to the kinds
    /// that use them.
    pub fn new(
        kind: &str,
        config: Config,
        averaging_constant: f64,
        axis: i64,
        bins: usize,
    ) -> Result<Self> {
        config.validate()?;
        let state = match kind {
            "minmax" => State::MinMax(MinMax::default()),
            "moving_average" => {
                check_averaging_constant(averaging_constant)?;
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
            _ => {
                return Err(Error::value(format!(
                    "kind must be 'minmax', 'moving_average', 'per_channel', 'histogram' or \
                     'per_channel_histogram', got {kind:?}"
                )))
            }
        };
        Ok(Observer { config, state })
    }

    pub fn config(&self) -> &Config {
        &self.config
    }

    /// Whether any value has been observed (torch.ao's default qparams apply until then).
    pub fn observed(&self) -> bool {
        match &self.state {
            State::MinMax(mm) | State::MovingAverage { mm, .. } => mm.batches > 0,
            State::PerChannel(pc) => pc.batches > 0,
            State::Histogram(h) => !h.is_empty(),
            State::PerChannelHistogram { channels, .. } => !channels.is_empty(),
        }
    }

    /// The integer range of the codes.
    pub fn range(&self) -> QRange {
        QRange::for_bits(self.config.bits, self.config.symmetric)
            .expect("bits are validated on construction")
    }

    /// Adds a batch; a bad batch (NaN, Inf, wrong channel count) changes nothing.
    pub fn update<E: Elem>(&mut self, x: ArrayViewD<'_, E>) -> Result<()> {
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

    pub fn qparams(&self) -> Result<QParams> {
        let (r, sym, m) = (self.range(), self.config.symmetric, self.config.method()?);
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

    /// The histogram of a per-tensor histogram observer.
    pub fn histogram(&self) -> Result<&Histogram> {
        match &self.state {
            State::Histogram(h) => Ok(h),
            _ => Err(Error::value(
                "only per-tensor histogram observers have a histogram and a clip range",
            )),
        }
    }

    /// The channel axis of per-channel observers.
    pub fn axis(&self) -> Option<i64> {
        match &self.state {
            State::PerChannel(m) => Some(m.axis),
            State::PerChannelHistogram { axis, .. } => Some(*axis),
            _ => None,
        }
    }

    /// Histogram observers: the canonical grids `(exps, starts)` on which a device counts a
    /// batch whose extremes are `lo[i]..hi[i]` (one entry per tensor, or per channel), and the
    /// number of bins (see `Histogram::add_counts`).
    pub fn histogram_grids(&self, lo: &[f32], hi: &[f32]) -> Result<(Vec<i32>, Vec<i64>, usize)> {
        let bins = match &self.state {
            State::Histogram(h) => h.bins,
            State::PerChannelHistogram { bins, .. } => *bins,
            _ => return Err(Error::value("only histogram observers count on a grid")),
        };
        ensure!(
            lo.len() == hi.len(),
            "{} minima and {} maxima",
            lo.len(),
            hi.len()
        );
        let h = Histogram::new(bins)?;
        let (e, s): (Vec<i32>, Vec<i64>) =
            lo.iter().zip(hi).map(|(&l, &u)| h.grid_of(l, u)).unzip();
        Ok((e, s, bins))
    }

    /// Adds a batch that a device counted on `histogram_grids(lo, hi)` (`counts`: `bins` per
    /// tensor or channel, channel after channel): the same state as `update` with the batch
    /// itself. A bad summary (NaN or Inf extremes, a wrong channel count) changes nothing.
    pub fn add_histogram_counts(&mut self, counts: Vec<u64>, lo: &[f32], hi: &[f32]) -> Result<()> {
        match &mut self.state {
            State::Histogram(h) => {
                ensure!(
                    lo.len() == 1 && hi.len() == 1,
                    "a per-tensor histogram takes one range"
                );
                h.add_counts(counts, lo[0], hi[0])
            }
            State::PerChannelHistogram {
                bins,
                channels,
                axis,
            } => {
                let c = lo.len();
                ensure!(
                    hi.len() == c && counts.len() == c * *bins,
                    "{} counts for {c} channels of {bins} bins",
                    counts.len()
                );
                ensure!(
                    channels.is_empty() || channels.len() == c,
                    "this observer has {} channels, the batch has {c} along axis {axis}",
                    channels.len()
                );
                // Every channel's summary is checked (into a fresh histogram) before any changes.
                let mut batch = (0..c)
                    .map(|_| Histogram::new(*bins))
                    .collect::<Result<Vec<_>>>()?;
                for (i, h) in batch.iter_mut().enumerate() {
                    h.add_counts(counts[i * *bins..(i + 1) * *bins].to_vec(), lo[i], hi[i])?;
                }
                if channels.is_empty() {
                    *channels = (0..c)
                        .map(|_| Histogram::new(*bins))
                        .collect::<Result<_>>()?;
                }
                channels
                    .iter_mut()
                    .zip(&batch)
                    .try_for_each(|(a, b)| a.merge(b))
            }
            _ => Err(Error::value(
                "only histogram observers take histogram counts",
            )),
        }
    }

    /// The search result (qparams and the clip range they represent) of a per-tensor
    /// histogram observer.
    pub fn search(&self) -> Result<SearchResult> {
        let (r, sym, m) = (self.range(), self.config.symmetric, self.config.method()?);
        search::search(self.histogram()?, r, sym, m)
    }

    /// Adds `other`'s state: histograms and min-max exactly (the result equals one observer over
    /// both inputs); moving averages by a batch-weighted mean of the running ranges. Fails, and
    /// changes nothing, on observers of different kinds, settings or channel counts.
    pub fn merge(&mut self, other: &Observer) -> Result<()> {
        ensure!(
            self.config == other.config,
            "cannot merge observers with different settings"
        );
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
                    // Merged into a copy first, so that a failure leaves `self` unchanged.
                    let mut merged = a.clone();
                    for (x, y) in merged.iter_mut().zip(b) {
                        x.merge(y)?;
                    }
                    *a = merged;
                }
            }
            _ => return Err(Error::value("cannot merge observers of different kinds")),
        }
        Ok(())
    }

    /// The whole state as JSON (settings and data).
    pub fn to_json(&self) -> String {
        serde_json::to_string(self).expect("observer state serializes")
    }

    /// An observer from `to_json`'s text; anything `new` and `update` could not have produced
    /// is refused.
    pub fn from_json(s: &str) -> Result<Self> {
        let o: Observer = serde_json::from_str(s)
            .map_err(|e| Error::value(format!("invalid observer state: {e}")))?;
        o.validate()
            .map_err(|e| Error::value(format!("invalid observer state: {e}")))?;
        Ok(o)
    }

    fn validate(&self) -> Result<()> {
        self.config.validate()?;
        match &self.state {
            State::MinMax(mm) => validate_minmax(mm),
            State::MovingAverage {
                mm,
                averaging_constant,
            } => {
                check_averaging_constant(*averaging_constant as f64)?;
                validate_minmax(mm)
            }
            State::Histogram(h) => h.validate(),
            State::PerChannelHistogram { bins, channels, .. } => {
                Histogram::new(*bins)?;
                ensure!(
                    channels.iter().all(|h| h.bins == *bins),
                    "channels with another bin count"
                );
                channels.iter().try_for_each(|h| h.validate())
            }
            State::PerChannel(p) => {
                ensure!(p.min.len() == p.max.len(), "channels");
                ensure!(
                    (p.batches == 0) == p.min.is_empty(),
                    "channels without batches"
                );
                p.min
                    .iter()
                    .zip(&p.max)
                    .try_for_each(|(&lo, &hi)| validate_range(lo, hi))
            }
        }
    }
}

fn validate_range(lo: f32, hi: f32) -> Result<()> {
    ensure!(
        lo.is_finite() && hi.is_finite() && lo <= hi,
        "range [{lo}, {hi}]"
    );
    Ok(())
}

fn validate_minmax(mm: &MinMax) -> Result<()> {
    if mm.batches > 0 {
        validate_range(mm.min, mm.max)?;
    }
    Ok(())
}

fn update_channels<E: Elem>(
    x: &ArrayViewD<'_, E>,
    axis: i64,
    bins: usize,
    channels: &mut Vec<Histogram>,
) -> Result<()> {
    let a = check_axis(axis, x.ndim())?;
    let c = x.len_of(Axis(a));
    ensure!(
        channels.is_empty() || channels.len() == c,
        "this observer has {} channels, the batch has {c} along axis {axis}",
        channels.len()
    );
    // Every channel is checked before any changes, so a bad batch leaves all histograms intact.
    x.axis_iter(Axis(a))
        .into_par_iter()
        .try_for_each(|v| crate::quant::extremes::finite_minmax(&v).map(|_| ()))?;
    if channels.is_empty() {
        *channels = (0..c)
            .map(|_| Histogram::new(bins))
            .collect::<Result<_>>()?;
    }
    channels
        .par_iter_mut()
        .zip(x.axis_iter(Axis(a)).into_par_iter())
        .try_for_each(|(h, v)| h.update(&v))
}

#[cfg(test)]
mod tests {
    use super::*;
    use ndarray::{arr1, arr2};

    fn config(bits: u32, symmetric: bool, method: &str) -> Config {
        Config {
            bits,
            symmetric,
            method: method.into(),
            percentile: 99.99,
        }
    }

    fn obs(kind: &str) -> Observer {
        Observer::new(kind, config(8, false, "mse"), 0.01, 0, 256).unwrap()
    }

    const KINDS: [&str; 5] = [
        "minmax",
        "moving_average",
        "per_channel",
        "histogram",
        "per_channel_histogram",
    ];

    fn batch(seed: u32) -> ndarray::ArrayD<f32> {
        let v: Vec<f32> = (0..24)
            .map(|i| (((i * 7 + seed * 13) % 19) as f32 - 6.0) * 0.37)
            .collect();
        ndarray::Array::from_shape_vec((4, 6), v)
            .unwrap()
            .into_dyn()
    }

    #[test]
    fn bad_settings_are_refused() {
        let bad = [
            Observer::new("minmax", config(9, false, "mse"), 0.01, 0, 256),
            Observer::new("minmax", config(1, false, "mse"), 0.01, 0, 256),
            Observer::new("minmax", config(8, false, "median"), 0.01, 0, 256),
            Observer::new("moving_average", config(8, false, "mse"), 0.0, 0, 256),
            Observer::new("moving_average", config(8, false, "mse"), 1.5, 0, 256),
            Observer::new("histogram", config(8, false, "mse"), 0.01, 0, 0),
            Observer::new("per_channel_histogram", config(8, false, "mse"), 0.01, 0, 0),
            Observer::new("median", config(8, false, "mse"), 0.01, 0, 256),
        ];
        for b in bad {
            assert!(matches!(b, Err(Error::Value(_))), "{b:?}");
        }
        let mut c = config(8, false, "percentile");
        c.percentile = 0.0;
        assert!(Observer::new("histogram", c, 0.01, 0, 256).is_err());
        // Settings a kind does not use are not checked for it.
        assert!(Observer::new("minmax", config(8, false, "mse"), f64::NAN, 0, 256).is_ok());
    }

    #[test]
    fn unobserved_then_observed() {
        for k in KINDS {
            let mut o = obs(k);
            assert!(!o.observed(), "{k}");
            o.update(batch(0).view()).unwrap();
            assert!(o.observed(), "{k}");
            assert!(o.qparams().is_ok(), "{k}");
        }
    }

    #[test]
    fn minmax_qparams_are_the_core_min_max() {
        let mut o = obs("minmax");
        let mut mm = MinMax::default();
        for s in 0..3 {
            o.update(batch(s).view()).unwrap();
            mm.update(&batch(s).view()).unwrap();
        }
        let (s, z) = mm.qparams(o.range(), false).unwrap();
        assert_eq!(o.qparams().unwrap(), QParams::Tensor(s, z));
    }

    #[test]
    fn merging_halves_equals_one_observer_over_all() {
        for k in [
            "minmax",
            "per_channel",
            "histogram",
            "per_channel_histogram",
        ] {
            let (mut a, mut b, mut all) = (obs(k), obs(k), obs(k));
            for s in 0..4 {
                let x = batch(s);
                if s % 2 == 0 { &mut a } else { &mut b }
                    .update(x.view())
                    .unwrap();
                all.update(x.view()).unwrap();
            }
            a.merge(&b).unwrap();
            assert_eq!(a.qparams().unwrap(), all.qparams().unwrap(), "{k}");
        }
    }

    #[test]
    fn moving_averages_merge_by_batch_weight() {
        let (mut a, mut b) = (obs("moving_average"), obs("moving_average"));
        a.update(arr1(&[-1.0f32, 1.0]).into_dyn().view()).unwrap();
        b.update(arr1(&[-4.0f32, 4.0]).into_dyn().view()).unwrap();
        b.update(arr1(&[-4.0f32, 4.0]).into_dyn().view()).unwrap();
        a.merge(&b).unwrap();
        let State::MovingAverage { mm, .. } = &a.state else {
            unreachable!()
        };
        assert_eq!((mm.min, mm.max, mm.batches), (-3.0, 3.0, 3));
        // An empty side takes the other's state.
        let mut e = obs("moving_average");
        e.merge(&a).unwrap();
        assert_eq!(e, a);
    }

    #[test]
    fn merge_refuses_other_kinds_settings_and_channel_counts() {
        let mut a = obs("histogram");
        assert!(a.merge(&obs("minmax")).is_err());
        let other = Observer::new("histogram", config(4, false, "mse"), 0.01, 0, 256).unwrap();
        assert!(a.merge(&other).is_err());
        let (mut p, mut q) = (obs("per_channel_histogram"), obs("per_channel_histogram"));
        p.update(batch(0).view()).unwrap();
        q.update(batch(0).t()).unwrap();
        let before = p.clone();
        assert!(p.merge(&q).is_err());
        assert_eq!(p, before);
    }

    #[test]
    fn a_bad_batch_changes_nothing() {
        for k in KINDS {
            let mut o = obs(k);
            o.update(batch(1).view()).unwrap();
            let before = o.clone();
            let mut x = batch(2);
            x[[3, 5]] = f32::NAN;
            assert!(o.update(x.view()).is_err(), "{k}");
            assert_eq!(o, before, "{k}");
            if k.starts_with("per_channel") {
                assert!(o.update(arr2(&[[1.0f32, 2.0]]).into_dyn().view()).is_err());
                assert_eq!(o, before, "{k}");
            }
        }
    }

    #[test]
    fn state_json_round_trips() {
        for k in KINDS {
            let mut o = obs(k);
            for s in 0..3 {
                o.update(batch(s).view()).unwrap();
            }
            let back = Observer::from_json(&o.to_json()).unwrap();
            assert_eq!(back, o, "{k}");
            assert_eq!(back.qparams().unwrap(), o.qparams().unwrap(), "{k}");
        }
    }

    #[test]
    fn invalid_state_json_is_refused() {
        let mut o = obs("histogram");
        o.update(batch(0).view()).unwrap();
        let good = o.to_json();
        for (from, to) in [
            ("\"bits\":8", "\"bits\":9"),
            ("\"method\":\"mse\"", "\"method\":\"median\""),
            ("\"percentile\":99.99", "\"percentile\":1000.0"),
            ("\"percentile\":99.99", "\"percentile\":-1.0"),
            ("\"total\":", "\"total\":1"),
        ] {
            assert!(good.contains(from), "{from}");
            let bad = good.replacen(from, to, 1);
            let e = Observer::from_json(&bad).unwrap_err();
            assert!(e.to_string().contains("invalid observer state"), "{e}");
        }
        let mut m = obs("moving_average");
        m.update(batch(0).view()).unwrap();
        let j = m.to_json();
        assert!(Observer::from_json(&j.replace("0.01", "2.0")).is_err());
        for text in ["", "{}", "null", "[1,2]", "{\"config\":1,\"state\":2}"] {
            assert!(Observer::from_json(text).is_err(), "{text}");
        }
    }

    #[test]
    fn search_is_for_per_tensor_histograms_only() {
        let mut h = obs("histogram");
        h.update(arr1(&[1.0f32, 1.5, 2.0]).into_dyn().view())
            .unwrap();
        let r = h.search().unwrap();
        assert!(r.clip.0 <= r.clip.1);
        assert!(obs("minmax").search().is_err());
        assert!(obs("per_channel_histogram").search().is_err());
    }
}

//! Min-max state with the arithmetic of torch.ao's MinMaxObserver family.
use crate::quant::extremes::finite_minmax;
use crate::quant::spec::qparams_from_minmax;
use crate::quant::{Elem, QRange};
use crate::{ensure, Result};
use ndarray::{ArrayViewD, Axis};
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

/// Running min and max of everything observed (or their moving average).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct MinMax {
    pub min: f32,
    pub max: f32,
    /// Batches that contributed (0: nothing observed yet).
    pub batches: u64,
}

impl Default for MinMax {
    fn default() -> Self {
        MinMax {
            min: f32::INFINITY,
            max: f32::NEG_INFINITY,
            batches: 0,
        }
    }
}

impl MinMax {
    /// `MinMaxObserver.forward`: running min / max. Empty batches are skipped (as torch does);
    /// NaN or Inf is refused and leaves the state unchanged.
    pub fn update<E: Elem>(&mut self, x: &ArrayViewD<'_, E>) -> Result<()> {
        if x.is_empty() {
            return Ok(());
        }
        let (lo, hi) = finite_minmax(x)?;
        self.min = self.min.min(lo);
        self.max = self.max.max(hi);
        self.batches += 1;
        Ok(())
    }

    /// `MovingAverageMinMaxObserver.forward`: the first batch sets the range, later ones move it
    /// by `c * (current - running)` in float32, in torch's operation order.
    pub fn update_moving<E: Elem>(&mut self, x: &ArrayViewD<'_, E>, c: f32) -> Result<()> {
        if x.is_empty() {
            return Ok(());
        }
        let (lo, hi) = finite_minmax(x)?;
        if self.batches == 0 {
            (self.min, self.max) = (lo, hi);
        } else {
            self.min += c * (lo - self.min);
            self.max += c * (hi - self.max);
        }
        self.batches += 1;
        Ok(())
    }

    /// Combines two running min-max states (exact: min of mins, max of maxes).
    pub fn merge(&mut self, other: &MinMax) {
        self.min = self.min.min(other.min);
        self.max = self.max.max(other.max);
        self.batches += other.batches;
    }

    pub fn qparams(&self, r: QRange, symmetric: bool) -> Result<(f32, i32)> {
        ensure!(self.batches > 0, "the observer has seen no data yet");
        Ok(qparams_from_minmax(self.min, self.max, r, symmetric))
    }
}

/// Per-channel running min and max along `axis` (`PerChannelMinMaxObserver`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PerChannelMinMax {
    pub axis: i64,
    pub min: Vec<f32>,
    pub max: Vec<f32>,
    pub batches: u64,
}

impl PerChannelMinMax {
    pub fn new(axis: i64) -> Self {
        PerChannelMinMax {
            axis,
            min: vec![],
            max: vec![],
            batches: 0,
        }
    }

    pub fn update<E: Elem>(&mut self, x: &ArrayViewD<'_, E>) -> Result<()> {
        let axis = crate::quant::affine::check_axis(self.axis, x.ndim())?;
        let c = x.len_of(Axis(axis));
        ensure!(
            self.batches == 0 || c == self.min.len(),
            "this observer has {} channels, the batch has {c} along axis {}",
            self.min.len(),
            self.axis
        );
        if x.is_empty() {
            return Ok(());
        }
        let cur: Vec<(f32, f32)> = x
            .axis_iter(Axis(axis))
            .into_par_iter()
            .map(|v| finite_minmax(&v))
            .collect::<Result<_>>()?;
        if self.batches == 0 {
            self.min = vec![f32::INFINITY; c];
            self.max = vec![f32::NEG_INFINITY; c];
        }
        for (i, (lo, hi)) in cur.into_iter().enumerate() {
            self.min[i] = self.min[i].min(lo);
            self.max[i] = self.max[i].max(hi);
        }
        self.batches += 1;
        Ok(())
    }

    pub fn merge(&mut self, other: &PerChannelMinMax) -> Result<()> {
        if other.batches == 0 {
            return Ok(());
        }
        if self.batches == 0 {
            *self = other.clone();
            return Ok(());
        }
        ensure!(
            self.min.len() == other.min.len(),
            "cannot merge observers with {} and {} channels",
            self.min.len(),
            other.min.len()
        );
        for i in 0..self.min.len() {
            self.min[i] = self.min[i].min(other.min[i]);
            self.max[i] = self.max[i].max(other.max[i]);
        }
        self.batches += other.batches;
        Ok(())
    }

    pub fn qparams(&self, r: QRange, symmetric: bool) -> Result<(Vec<f32>, Vec<i32>)> {
        ensure!(self.batches > 0, "the observer has seen no data yet");
        Ok(self
            .min
            .iter()
            .zip(&self.max)
            .map(|(&lo, &hi)| qparams_from_minmax(lo, hi, r, symmetric))
            .unzip())
    }
}

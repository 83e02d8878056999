//! Integer ranges of codes and the checks of scales, zero points and axes.
use crate::{ensure, Result};

/// An integer range `[min, max]` of quantized codes, validated on construction.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct QRange {
    pub min: i32,
    pub max: i32,
}

/// Fake-quant ranges go up to 2^24 so that every integer in them is exact in float32.
const FAKE_QUANT_LIMIT: i64 = 1 << 24;

impl QRange {
    /// A range for fake-quant: `quant_min <= quant_max`, both within ±2^24.
    pub fn new(quant_min: i64, quant_max: i64) -> Result<Self> {
        ensure!(
            quant_min <= quant_max,
            "quant_min ({quant_min}) must be less than or equal to quant_max ({quant_max})"
        );
        ensure!(
            quant_min >= -FAKE_QUANT_LIMIT && quant_max <= FAKE_QUANT_LIMIT,
            "quant_min/quant_max ({quant_min}, {quant_max}) must lie within ±2^24: lowbit clamps in \
             float32, exact only there (torch also takes qint32's range)"
        );
        Ok(QRange {
            min: quant_min as i32,
            max: quant_max as i32,
        })
    }

    /// A range whose codes fit one byte: int8 when `quant_min < 0`, uint8 otherwise.
    pub fn codes(quant_min: i64, quant_max: i64) -> Result<Self> {
        let r = Self::new(quant_min, quant_max)?;
        ensure!(
            (r.min >= 0 && r.max <= 255) || (r.min >= -128 && r.max <= 127),
            "quant_min/quant_max ({quant_min}, {quant_max}) must fit int8 (-128..127) or uint8 (0..255)"
        );
        Ok(r)
    }

    /// Range of a `bits`-wide code: signed `-2^(b-1)..2^(b-1)-1` or unsigned `0..2^b-1`.
    pub fn for_bits(bits: u32, signed: bool) -> Result<Self> {
        ensure!(
            (1..=8).contains(&bits),
            "bits must be between 1 and 8, got {bits}"
        );
        let levels = 1i64 << bits;
        if signed {
            Self::codes(-levels / 2, levels / 2 - 1)
        } else {
            Self::codes(0, levels - 1)
        }
    }

    pub fn is_signed(&self) -> bool {
        self.min < 0
    }

    /// Number of bits a code of this range needs.
    pub fn bits(&self) -> u32 {
        let span = (self.max as i64 - self.min as i64) as u64;
        64 - span.leading_zeros()
    }
}

/// Validates a scale and rounds it to float32 as ATen does (`float sc = scale`).
pub fn check_scale(what: &str, scale: f64) -> Result<f32> {
    ensure!(
        scale.is_finite() && scale > 0.0,
        "{what} must be a finite positive number, got {scale}"
    );
    let s = scale as f32;
    ensure!(
        s > 0.0 && s.is_finite(),
        "{what} ({scale}) is 0 or Inf in float32, the precision the kernels (torch's too) compute \
         in: torch would return zeros or NaN"
    );
    Ok(s)
}

/// Validates a zero point against its range (PyTorch's own check).
pub fn check_zero_point(what: &str, zp: i64, r: QRange) -> Result<i32> {
    ensure!(
        zp >= r.min as i64 && zp <= r.max as i64,
        "{what} ({zp}) must be between quant_min ({}) and quant_max ({})",
        r.min,
        r.max
    );
    Ok(zp as i32)
}

/// Normalises a possibly negative axis.
pub fn check_axis(axis: i64, ndim: usize) -> Result<usize> {
    let n = ndim as i64;
    ensure!(
        ndim > 0 && axis >= -n && axis < n,
        "axis {axis} is out of range for an array with {ndim} dimensions"
    );
    Ok(if axis < 0 { axis + n } else { axis } as usize)
}

/// Validates per-channel scales and zero points against the array's channel count.
pub(crate) fn channel_params(
    shape: &[usize],
    axis: usize,
    scales: &[f64],
    zero_points: &[i64],
    r: QRange,
) -> Result<(Vec<f32>, Vec<i32>)> {
    let c = shape[axis];
    ensure!(
        scales.len() == c,
        "scales has {} entries but axis {axis} of shape {shape:?} has {c}",
        scales.len()
    );
    ensure!(
        zero_points.len() == c,
        "zero_points has {} entries but axis {axis} of shape {shape:?} has {c}",
        zero_points.len()
    );
    // Names are formatted only for the error: there can be millions of groups.
    let s = scales
        .iter()
        .enumerate()
        .map(|(i, &v)| check_scale("", v).or_else(|_| check_scale(&format!("scales[{i}]"), v)))
        .collect::<Result<Vec<_>>>()?;
    let z = zero_points
        .iter()
        .enumerate()
        .map(|(i, &v)| {
            check_zero_point("", v, r)
                .or_else(|_| check_zero_point(&format!("zero_points[{i}]"), v, r))
        })
        .collect::<Result<Vec<_>>>()?;
    Ok((s, z))
}

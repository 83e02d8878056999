//! `QuantSpec` (bits, symmetric, granularity) and `QuantizedTensor` (packed codes + qparams).
use super::affine::{self, check_axis, Code, Codes, QRange};
use super::elem::Elem;
use super::pack;
use crate::{ensure, Error, Result};
use ndarray::{ArrayD, ArrayViewD, Axis, IxDyn};
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Granularity {
    Tensor,
    Channel,
    Group,
}

impl std::str::FromStr for Granularity {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "tensor" => Ok(Granularity::Tensor),
            "channel" => Ok(Granularity::Channel),
            "group" => Ok(Granularity::Group),
            _ => Err(Error::value(format!(
                "granularity must be 'tensor', 'channel' or 'group', got {s:?}"
            ))),
        }
    }
}

impl Granularity {
    pub fn as_str(&self) -> &'static str {
        match self {
            Granularity::Tensor => "tensor",
            Granularity::Channel => "channel",
            Granularity::Group => "group",
        }
    }
}

/// How to quantize: `bits` wide codes, symmetric (signed codes, zero point 0) or asymmetric
/// (unsigned codes), one scale per tensor, per channel along `axis`, or per `group_size`
/// consecutive elements of the last axis (the last group may be shorter).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct QuantSpec {
    pub bits: u32,
    pub symmetric: bool,
    pub granularity: Granularity,
    pub axis: i64,
    pub group_size: Option<usize>,
}

impl QuantSpec {
    pub fn new(
        bits: u32,
        symmetric: bool,
        granularity: Granularity,
        axis: i64,
        group_size: Option<usize>,
    ) -> Result<Self> {
        ensure!(
            (2..=8).contains(&bits),
            "bits must be between 2 and 8, got {bits}"
        );
        let group_size = match granularity {
            Granularity::Group => {
                let g = group_size.ok_or_else(|| {
                    Error::value("group_size is required when granularity is 'group'")
                })?;
                ensure!(g > 0, "group_size must be positive, got {g}");
                Some(g)
            }
            _ => {
                ensure!(
                    group_size.is_none(),
                    "group_size is only valid with granularity 'group'"
                );
                None
            }
        };
        Ok(QuantSpec {
            bits,
            symmetric,
            granularity,
            axis,
            group_size,
        })
    }

    /// Symmetric specs use the signed range `-2^(b-1)..2^(b-1)-1`, asymmetric ones `0..2^b-1`
    /// (torch's qint8 / quint8 conventions).
    pub fn range(&self) -> QRange {
        QRange::for_bits(self.bits, self.symmetric).expect("bits validated in new()")
    }

    /// Shape of the scales / zero points for an input of `shape`.
    pub fn qparams_shape(&self, shape: &[usize]) -> Result<Vec<usize>> {
        Ok(match self.granularity {
            Granularity::Tensor => vec![],
            Granularity::Channel => vec![shape[check_axis(self.axis, shape.len())?]],
            Granularity::Group => {
                ensure!(
                    !shape.is_empty(),
                    "group quantization needs at least one dimension"
                );
                let mut s = shape.to_vec();
                let k = s.pop().unwrap_or(0);
                s.push(k.div_ceil(self.group_size.unwrap_or(1)));
                s
            }
        })
    }
}

const EPS: f32 = f32::EPSILON;

/// Scale and zero point for the range `[min, max]`, with `torch.ao`'s min-max observer formula:
/// the range is widened to include 0, symmetric scale is `amax / ((qmax - qmin) / 2)`,
/// asymmetric `(max - min) / (qmax - qmin)`, both at least float32 eps.
pub fn qparams_from_minmax(min: f32, max: f32, r: QRange, symmetric: bool) -> (f32, i32) {
    let lo = min.min(0.0);
    let hi = max.max(0.0);
    if symmetric {
        let amax = (-lo).max(hi);
        let s = (amax / ((r.max - r.min) as f32 / 2.0)).max(EPS);
        let zp = if r.is_signed() {
            0
        } else {
            (r.min + r.max) / 2
        };
        (s, zp)
    } else {
        let s = ((hi - lo) / (r.max - r.min) as f32).max(EPS);
        let zp = (r.min as f32 - (lo / s).round_ties_even()) as i32;
        (s, zp.clamp(r.min, r.max))
    }
}

/// Min and max of a view, refusing NaN and ±Inf (no range can be derived from them).
pub fn finite_minmax<E: Elem>(x: &ArrayViewD<'_, E>) -> Result<(f32, f32)> {
    let fold =
        |(lo, hi, bad): (f32, f32, bool), v: f32| (lo.min(v), hi.max(v), bad || !v.is_finite());
    let init = (f32::INFINITY, f32::NEG_INFINITY, false);
    let (lo, hi, bad) = match x.as_slice_memory_order() {
        Some(s) if s.len() > super::CHUNK => s
            .par_chunks(super::CHUNK)
            .map(|c| c.iter().fold(init, |a, v| fold(a, v.to_f32())))
            .reduce(|| init, |a, b| (a.0.min(b.0), a.1.max(b.1), a.2 || b.2)),
        _ => x.iter().fold(init, |a, v| fold(a, v.to_f32())),
    };
    ensure!(
        !bad,
        "the input contains NaN or Inf: no quantization range can be derived from it (pass scales explicitly)"
    );
    Ok(if lo > hi { (0.0, 0.0) } else { (lo, hi) })
}

/// A quantized array: codes packed at `spec.bits` bits (stored as `code - quant_min`, see
/// `pack`), float32 scales and integer zero points shaped by `QuantSpec::qparams_shape`.
#[derive(Clone, Debug, PartialEq)]
pub struct QuantizedTensor {
    pub spec: QuantSpec,
    pub shape: Vec<usize>,
    pub codes: Vec<u8>,
    pub scales: ArrayD<f32>,
    pub zero_points: ArrayD<i32>,
}

impl QuantizedTensor {
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }

    /// Bytes a file stores: packed codes, 4 per scale, 1 per zero point.
    pub fn nbytes(&self) -> usize {
        self.codes.len() + 4 * self.scales.len() + self.zero_points.len()
    }

    /// Checks that codes and qparams agree with the shape and spec (for data read from files).
    pub fn validate(&self) -> Result<()> {
        let n = self.numel();
        let want = pack::packed_len(n, self.spec.bits);
        ensure!(
            self.codes.len() == want,
            "codes hold {} bytes but shape {:?} at {} bits needs {want}",
            self.codes.len(),
            self.shape,
            self.spec.bits
        );
        let qs = self.spec.qparams_shape(&self.shape)?;
        ensure!(
            self.scales.shape() == qs.as_slice() && self.zero_points.shape() == qs.as_slice(),
            "scales {:?} / zero_points {:?} do not match the expected shape {qs:?}",
            self.scales.shape(),
            self.zero_points.shape()
        );
        ensure!(
            self.scales.iter().all(|s| s.is_finite() && *s > 0.0),
            "scales must be finite and positive"
        );
        let r = self.spec.range();
        ensure!(
            self.zero_points.iter().all(|z| (r.min..=r.max).contains(z)),
            "zero points must lie in [{}, {}]",
            r.min,
            r.max
        );
        Ok(())
    }

    /// Integer codes in `[quant_min, quant_max]` (int8 for symmetric specs, uint8 otherwise).
    pub fn int_codes(&self) -> Result<Codes> {
        let u = pack::unpack(&self.codes, self.spec.bits, self.numel())?;
        let r = self.spec.range();
        let dim = IxDyn(&self.shape);
        let shape_err = |e: ndarray::ShapeError| Error::value(e.to_string());
        Ok(if r.is_signed() {
            let v = u.iter().map(|&c| (c as i32 + r.min) as i8).collect();
            Codes::I8(ArrayD::from_shape_vec(dim, v).map_err(shape_err)?)
        } else {
            Codes::U8(ArrayD::from_shape_vec(dim, u).map_err(shape_err)?)
        })
    }

    /// Float32 reconstruction `(q - zero_point) * scale`.
    pub fn dequantize(&self) -> Result<ArrayD<f32>> {
        self.validate()?;
        match self.int_codes()? {
            Codes::I8(q) => self.dequantize_codes(q.view()),
            Codes::U8(q) => self.dequantize_codes(q.view()),
        }
    }

    fn dequantize_codes<Q: Code>(&self, q: ArrayViewD<'_, Q>) -> Result<ArrayD<f32>> {
        let s: Vec<f64> = self.scales.iter().map(|&v| v as f64).collect();
        let z: Vec<i64> = self.zero_points.iter().map(|&v| v as i64).collect();
        match self.spec.granularity {
            Granularity::Tensor => affine::dequantize_per_tensor(q, s[0], z[0]),
            Granularity::Channel => affine::dequantize_per_channel(q, &s, &z, self.spec.axis),
            Granularity::Group => {
                let g = self.spec.group_size.unwrap_or(1);
                let ng = self.shape[self.shape.len() - 1].div_ceil(g);
                let sc: Vec<f32> = self.scales.iter().copied().collect();
                let zp: Vec<i32> = self.zero_points.iter().copied().collect();
                let out = map_rows(q.view(), |r, qs| {
                    qs.chunks(g)
                        .enumerate()
                        .flat_map(|(j, c)| {
                            let (s, z) = (sc[r * ng + j], zp[r * ng + j]);
                            c.iter().map(move |&q| (q.to_i32() - z) as f32 * s)
                        })
                        .collect()
                });
                ArrayD::from_shape_vec(q.raw_dim(), out).map_err(|e| Error::value(e.to_string()))
            }
        }
    }
}

/// Maps every row (lane of the last axis) of `x` to a `Vec`, in parallel, and concatenates
/// the results in C order. Strided rows are copied to a buffer one at a time.
fn map_rows<I, R, F>(x: ArrayViewD<'_, I>, f: F) -> Vec<R>
where
    I: Copy + Sync,
    R: Send,
    F: Fn(usize, &[I]) -> Vec<R> + Sync,
{
    let rows: Vec<_> = x.lanes(Axis(x.ndim() - 1)).into_iter().collect();
    let parts: Vec<Vec<R>> = rows
        .par_iter()
        .enumerate()
        .map(|(r, row)| match row.as_slice() {
            Some(xs) => f(r, xs),
            None => f(r, &row.to_vec()),
        })
        .collect();
    parts.into_iter().flatten().collect()
}

/// Quantizes `x` with `spec`. Scales and zero points come from the min-max of each tensor /
/// channel / group unless given (shaped as `spec.qparams_shape`).
pub fn quantize<E: Elem>(
    x: ArrayViewD<'_, E>,
    spec: QuantSpec,
    qparams: Option<(ArrayD<f32>, ArrayD<i32>)>,
) -> Result<QuantizedTensor> {
    let r = spec.range();
    let qshape = spec.qparams_shape(x.shape())?;
    let (scales, zps) = match qparams {
        Some((s, z)) => {
            ensure!(
                s.shape() == qshape.as_slice() && z.shape() == qshape.as_slice(),
                "scales {:?} and zero_points {:?} must have shape {qshape:?} for this spec",
                s.shape(),
                z.shape()
            );
            (s, z)
        }
        None => derive_qparams(&x, &spec, &qshape, r)?,
    };
    let s64: Vec<f64> = scales.iter().map(|&v| v as f64).collect();
    let z64: Vec<i64> = zps.iter().map(|&v| v as i64).collect();
    // Offsets `q - quant_min` in 0..2^bits, ready to pack.
    let offsets: Vec<u8> = match spec.granularity {
        Granularity::Tensor => codes_to_offsets(
            affine::quantize_per_tensor(x.view(), s64[0], z64[0], r.min as i64, r.max as i64)?,
            r,
        ),
        Granularity::Channel => codes_to_offsets(
            affine::quantize_per_channel(
                x.view(),
                &s64,
                &z64,
                spec.axis,
                r.min as i64,
                r.max as i64,
            )?,
            r,
        ),
        Granularity::Group => {
            let (s, z) = affine::channel_params(&[s64.len()], 0, &s64, &z64, r)?;
            let g = spec.group_size.unwrap_or(1);
            let ng = x.shape()[x.ndim() - 1].div_ceil(g);
            map_rows(x.view(), |row, xs| {
                xs.chunks(g)
                    .enumerate()
                    .flat_map(|(j, c)| {
                        let k =
                            affine::QuantChannel::new(&[s[row * ng + j]], &[z[row * ng + j]], r);
                        c.iter()
                            .map(move |v| (k.one(v.to_f32(), k.inv[0], k.zp[0]) - r.min) as u8)
                    })
                    .collect()
            })
        }
    };
    let qt = QuantizedTensor {
        spec,
        shape: x.shape().to_vec(),
        codes: pack::pack_unchecked(&offsets, spec.bits),
        scales,
        zero_points: zps,
    };
    qt.validate()?;
    Ok(qt)
}

fn codes_to_offsets(c: Codes, r: QRange) -> Vec<u8> {
    match c {
        Codes::I8(a) => a.iter().map(|&q| (q as i32 - r.min) as u8).collect(),
        Codes::U8(a) => a.iter().map(|&q| (q as i32 - r.min) as u8).collect(),
    }
}

fn derive_qparams<E: Elem>(
    x: &ArrayViewD<'_, E>,
    spec: &QuantSpec,
    qshape: &[usize],
    r: QRange,
) -> Result<(ArrayD<f32>, ArrayD<i32>)> {
    let pairs: Vec<(f32, f32)> = match spec.granularity {
        Granularity::Tensor => vec![finite_minmax(x)?],
        Granularity::Channel => {
            let axis = check_axis(spec.axis, x.ndim())?;
            x.axis_iter(Axis(axis))
                .into_par_iter()
                .map(|v| finite_minmax(&v))
                .collect::<Result<_>>()?
        }
        Granularity::Group => {
            let g = spec.group_size.unwrap_or(1);
            map_rows(x.view(), |_, xs| {
                xs.chunks(g)
                    .map(|c| finite_minmax(&ndarray::aview1(c).into_dyn()))
                    .collect()
            })
            .into_iter()
            .collect::<Result<_>>()?
        }
    };
    let (s, z): (Vec<f32>, Vec<i32>) = pairs
        .iter()
        .map(|&(lo, hi)| qparams_from_minmax(lo, hi, r, spec.symmetric))
        .unzip();
    let dim = IxDyn(qshape);
    let err = |e: ndarray::ShapeError| Error::value(e.to_string());
    Ok((
        ArrayD::from_shape_vec(dim.clone(), s).map_err(err)?,
        ArrayD::from_shape_vec(dim, z).map_err(err)?,
    ))
}

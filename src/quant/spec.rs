//! `QuantSpec` (bits, symmetric, granularity) and `QuantizedTensor` (packed codes + qparams).
use super::affine::{self, check_axis, Codes, QRange};
use super::elem::Elem;
use super::extremes::{self, finite_minmax};
use super::pack;
use crate::names::string_enum;
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

string_enum!(Granularity, "granularity", {
    "tensor" => Tensor,
    "channel" => Channel,
    "group" => Group,
});

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

    /// How the kernels walk an input of `shape` for this spec.
    pub(crate) fn layout(&self, shape: &[usize]) -> Result<affine::Layout> {
        Ok(match self.granularity {
            Granularity::Tensor => affine::Layout::per_tensor(shape.iter().product()),
            Granularity::Channel => {
                affine::Layout::per_channel(shape, check_axis(self.axis, shape.len())?)
            }
            Granularity::Group => {
                ensure!(
                    !shape.is_empty(),
                    "group quantization needs at least one dimension"
                );
                affine::Layout::groups(shape, self.group_size.unwrap_or(1))
            }
        })
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

/// Elements of an array of `shape`, or None when no array can have it (its non-zero sizes
/// multiply past `isize::MAX`, ndarray's limit).
fn array_numel(shape: &[usize]) -> Option<usize> {
    let n = shape
        .iter()
        .filter(|&&d| d != 0)
        .try_fold(1usize, |a, &d| a.checked_mul(d))
        .filter(|&n| n <= isize::MAX as usize)?;
    Some(if shape.contains(&0) { 0 } else { n })
}

impl QuantizedTensor {
    /// Elements (saturating: `validate` refuses shapes no array can have).
    pub fn numel(&self) -> usize {
        array_numel(&self.shape).unwrap_or(usize::MAX)
    }

    /// Bytes a file stores: packed codes, 4 per scale, 1 per zero point.
    pub fn nbytes(&self) -> usize {
        self.codes.len() + 4 * self.scales.len() + self.zero_points.len()
    }

    /// Checks that codes and qparams agree with the shape and spec (for data read from files).
    pub fn validate(&self) -> Result<()> {
        let n = array_numel(&self.shape)
            .ok_or_else(|| Error::value(format!("shape {:?} has too many elements", self.shape)))?;
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

    /// The unsigned offsets `code - quant_min`, unpacked.
    fn offsets(&self) -> Result<ArrayD<u8>> {
        let u = pack::unpack(&self.codes, self.spec.bits, self.numel())?;
        ArrayD::from_shape_vec(IxDyn(&self.shape), u).map_err(|e| Error::value(e.to_string()))
    }

    /// Integer codes in `[quant_min, quant_max]` (int8 for symmetric specs, uint8 otherwise).
    pub fn int_codes(&self) -> Result<Codes> {
        let u = self.offsets()?;
        let r = self.spec.range();
        Ok(if r.is_signed() {
            Codes::I8(u.mapv(|c| (c as i32 + r.min) as i8))
        } else {
            Codes::U8(u)
        })
    }

    /// Float32 reconstruction `(q - zero_point) * scale`.
    pub fn dequantize(&self) -> Result<ArrayD<f32>> {
        self.validate()?;
        let u = self.offsets()?;
        let qmin = self.spec.range().min;
        // (u + qmin - zp) * s == (u - (zp - qmin)) * s, exactly, in integers.
        let k = affine::Dequant {
            scale: self.scales.iter().copied().collect(),
            zp: self.zero_points.iter().map(|&z| z - qmin).collect(),
        };
        Ok(affine::drive(&u.view(), &self.spec.layout(&self.shape)?, &k, false).0)
    }
}

/// Quantizes `x` with `spec`. Scales and zero points come from the min-max of each tensor /
/// channel / group unless given (shaped as `spec.qparams_shape`). Codes follow PyTorch's
/// per-channel rule at every granularity: `clamp(zp + nearbyint(x * (1/scale)))`, NaN to 0.
pub fn quantize<E: Elem>(
    x: ArrayViewD<'_, E>,
    spec: QuantSpec,
    qparams: Option<(ArrayD<f32>, ArrayD<i32>)>,
) -> Result<QuantizedTensor> {
    let r = spec.range();
    let qshape = spec.qparams_shape(x.shape())?;
    let lay = spec.layout(x.shape())?;
    let (scales, zps) = match qparams {
        Some((s, z)) => {
            ensure!(
                s.shape() == qshape.as_slice() && z.shape() == qshape.as_slice(),
                "scales {:?} and zero_points {:?} must have shape {qshape:?} for this spec and x of \
                 shape {:?}",
                s.shape(),
                z.shape(),
                x.shape()
            );
            (s, z)
        }
        None => derive_qparams(&x, &spec, &qshape, r)?,
    };
    let s64: Vec<f64> = scales.iter().map(|&v| v as f64).collect();
    let z64: Vec<i64> = zps.iter().map(|&v| v as i64).collect();
    let (s32, z32) = affine::channel_params(&[s64.len()], 0, &s64, &z64, r)?;
    let k = affine::QuantChannel::new(&s32, &z32, r).offsets();
    let (offsets, _) = affine::drive::<E, u8, _>(&x, &lay, &k, false);
    let offsets = offsets.as_standard_layout();
    let qt = QuantizedTensor {
        spec,
        shape: x.shape().to_vec(),
        codes: pack::pack_unchecked(offsets.as_slice().expect("standard layout"), spec.bits),
        scales,
        zero_points: zps,
    };
    qt.validate()?;
    Ok(qt)
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
            let k = x.shape()[x.ndim() - 1];
            let per_row = |row: &[E]| -> Vec<Result<(f32, f32)>> {
                row.chunks(g).map(extremes::finite).collect()
            };
            let rows: Vec<Vec<Result<(f32, f32)>>> = match x.as_slice() {
                Some(xs) if k > 0 => xs.par_chunks(k).map(per_row).collect(),
                _ => {
                    let lanes: Vec<_> = x.lanes(Axis(x.ndim() - 1)).into_iter().collect();
                    lanes.par_iter().map(|l| per_row(&l.to_vec())).collect()
                }
            };
            rows.into_iter().flatten().collect::<Result<_>>()?
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

#[cfg(test)]
mod tests {
    use super::*;
    use ndarray::Array2;

    /// The JSON state (serde) and the Python strings (`string_enum!`) use the same names.
    #[test]
    fn granularity_names_agree_with_serde() {
        for name in Granularity::NAMES {
            let g: Granularity = name.parse().unwrap();
            assert_eq!(serde_json::to_string(&g).unwrap(), format!("{name:?}"));
            assert_eq!(g.to_string(), *name);
        }
        let err = "row".parse::<Granularity>().unwrap_err().to_string();
        assert!(err.contains("'tensor', 'channel' or 'group'"), "{err}");
    }

    /// Group quantization equals per-tensor quantization of every group on its own, for
    /// contiguous and strided input and a short last group.
    #[test]
    fn groups_are_independent_tensors() {
        let (rows, k, g) = (7, 50, 16);
        let w = Array2::from_shape_fn((rows, k), |(r, c)| {
            ((r * 31 + c * 17) % 23) as f32 * 0.1 - 1.1 + r as f32
        });
        let spec = QuantSpec::new(3, false, Granularity::Group, 0, Some(g)).unwrap();
        let wt = w.t().to_owned();
        for x in [w.view().into_dyn(), wt.t().into_dyn()] {
            let q = quantize(x.view(), spec, None).unwrap();
            let d = q.dequantize().unwrap();
            for r in 0..rows {
                for j in 0..k.div_ceil(g) {
                    let cols = j * g..((j + 1) * g).min(k);
                    let part = w.slice(ndarray::s![r, cols.clone()]).to_owned().into_dyn();
                    let one = quantize(
                        part.view(),
                        QuantSpec::new(3, false, Granularity::Tensor, 0, None).unwrap(),
                        None,
                    )
                    .unwrap();
                    assert_eq!(q.scales[[r, j]], one.scales[[]]);
                    assert_eq!(q.zero_points[[r, j]], one.zero_points[[]]);
                    let dd = one.dequantize().unwrap();
                    for (a, b) in d.slice(ndarray::s![r, cols]).iter().zip(dd.iter()) {
                        assert_eq!(a.to_bits(), b.to_bits());
                    }
                }
            }
        }
    }

    #[test]
    fn qparams_follow_torch_minmax_formula() {
        let r = QRange::for_bits(8, true).unwrap();
        assert_eq!(qparams_from_minmax(-1.0, 2.0, r, true), (2.0 / 127.5, 0));
        let u = QRange::for_bits(8, false).unwrap();
        let (s, z) = qparams_from_minmax(-1.0, 2.0, u, false);
        assert_eq!(s, 3.0 / 255.0);
        assert_eq!(z, (0.0f32 - (-1.0f32 / s).round_ties_even()) as i32);
        // all-zero input: eps scale, zero point in range
        assert_eq!(qparams_from_minmax(0.0, 0.0, u, false), (f32::EPSILON, 0));
    }
}

//! Quantize to integer codes and dequantize them, each with the rule of its PyTorch entry point.
use super::drivers::{drive, Layout, RunKernel};
use super::ranges::{channel_params, check_axis, check_scale, check_zero_point, QRange};
use crate::quant::elem::{Elem, Real};
use crate::{ensure, Result};
use ndarray::{ArrayD, ArrayViewD};
use std::mem::MaybeUninit;

/// A byte-wide integer code type.
pub trait Code: Copy + Send + Sync + 'static {
    fn from_i32(v: i32) -> Self;
    fn to_i32(self) -> i32;
}
impl Code for i8 {
    #[inline(always)]
    fn from_i32(v: i32) -> i8 {
        v as i8
    }
    #[inline(always)]
    fn to_i32(self) -> i32 {
        self as i32
    }
}
impl Code for u8 {
    #[inline(always)]
    fn from_i32(v: i32) -> u8 {
        v as u8
    }
    #[inline(always)]
    fn to_i32(self) -> i32 {
        self as i32
    }
}

// ---------------------------------------------------------------------------------------------
// Quantize to integer codes

/// Per tensor, PyTorch quantizes with FBGEMM's vector rule: `x * inv` is capped at
/// 2147483520 (NaN becomes the cap too), converted to int32, and the zero point is added
/// with int32 wrap-around before the clamp.
struct QuantTensor {
    inv: f32,
    zp: i32,
    r: QRange,
}

/// Per channel, PyTorch uses the scalar rule: `zp + nearbyint(x * inv)` in float, clamped; NaN
/// converts to the raw code 0.
pub(crate) struct QuantChannel {
    inv: Vec<f32>,
    zp: Vec<f32>,
    r: QRange,
    /// Subtracted from every code: `quant_min` gives the unsigned offsets that get packed.
    offset: i32,
}

const FBGEMM_CAP: f32 = 2_147_483_520.0; // largest float32 below i32::MAX

impl QuantTensor {
    #[inline(always)]
    fn one(&self, x: f32) -> i32 {
        let t = x * self.inv;
        let t = if t <= FBGEMM_CAP { t } else { FBGEMM_CAP };
        // Below -2^31 the conversion gives i32::MIN, like cvtps2dq's "integer indefinite".
        let t = t.rne().max(-2_147_483_648.0);
        // SAFETY: t is finite and within [-2^31, 2^31 - 128].
        let v: i32 = unsafe { t.to_int_unchecked() };
        v.wrapping_add(self.zp).clamp(self.r.min, self.r.max)
    }
}

impl QuantChannel {
    pub(crate) fn new(scales: &[f32], zps: &[i32], r: QRange) -> Self {
        QuantChannel {
            inv: scales.iter().map(|&s| 1.0 / s).collect(),
            zp: zps.iter().map(|&z| z as f32).collect(),
            r,
            offset: 0,
        }
    }

    /// The same kernel writing `code - quant_min`.
    pub(crate) fn offsets(mut self) -> Self {
        self.offset = self.r.min;
        self
    }

    #[inline(always)]
    fn one(&self, x: f32, inv: f32, zp: f32) -> i32 {
        let t = zp + (x * inv).rne();
        let (lo, hi) = (self.r.min as f32, self.r.max as f32);
        // NaN converts to the raw code 0 before the clamp. (f32::clamp's assert would keep
        // this loop from vectorizing, hence max/min.)
        let t = if t.is_nan() { 0.0 } else { t };
        let t = t.max(lo).min(hi);
        // SAFETY: t is an integer-valued float within the i32 range [lo, hi].
        let q: i32 = unsafe { t.to_int_unchecked() };
        q - self.offset
    }
}

impl<E: Elem, Q: Code> RunKernel<E, Q> for QuantTensor {
    #[inline(always)]
    fn uniform(
        &self,
        x: &[E],
        o: &mut [MaybeUninit<Q>],
        _: Option<&mut [MaybeUninit<bool>]>,
        _: usize,
    ) {
        for (o, x) in o.iter_mut().zip(x) {
            o.write(Q::from_i32(self.one(x.to_f32())));
        }
    }
    #[inline(always)]
    fn varying(
        &self,
        x: &[E],
        o: &mut [MaybeUninit<Q>],
        m: Option<&mut [MaybeUninit<bool>]>,
        c0: usize,
    ) {
        <Self as RunKernel<E, Q>>::uniform(self, x, o, m, c0)
    }
}

impl<E: Elem, Q: Code> RunKernel<E, Q> for QuantChannel {
    #[inline(always)]
    fn uniform(
        &self,
        x: &[E],
        o: &mut [MaybeUninit<Q>],
        _: Option<&mut [MaybeUninit<bool>]>,
        c: usize,
    ) {
        let (inv, zp) = (self.inv[c], self.zp[c]);
        for (o, x) in o.iter_mut().zip(x) {
            o.write(Q::from_i32(self.one(x.to_f32(), inv, zp)));
        }
    }
    #[inline(always)]
    fn varying(
        &self,
        x: &[E],
        o: &mut [MaybeUninit<Q>],
        _: Option<&mut [MaybeUninit<bool>]>,
        c0: usize,
    ) {
        let n = x.len();
        let (inv, zp) = (&self.inv[c0..c0 + n], &self.zp[c0..c0 + n]);
        for (i, o) in o[..n].iter_mut().enumerate() {
            o.write(Q::from_i32(self.one(x[i].to_f32(), inv[i], zp[i])));
        }
    }
}

/// Integer codes of an array, either int8 or uint8 depending on the range.
#[derive(Clone, Debug, PartialEq)]
pub enum Codes {
    I8(ArrayD<i8>),
    U8(ArrayD<u8>),
}

/// `torch.quantize_per_tensor(x, scale, zp, dtype).int_repr()` clamped to `[quant_min, quant_max]`;
/// int8 codes when `quant_min < 0`, uint8 otherwise. Input is rounded to float32 first.
pub fn quantize_per_tensor<E: Elem>(
    x: ArrayViewD<'_, E>,
    scale: f64,
    zero_point: i64,
    quant_min: i64,
    quant_max: i64,
) -> Result<Codes> {
    let r = QRange::codes(quant_min, quant_max)?;
    let s = check_scale("scale", scale)?;
    let zp = check_zero_point("zero_point", zero_point, r)?;
    let k = QuantTensor {
        inv: 1.0 / s,
        zp,
        r,
    };
    let lay = Layout::per_tensor(x.len());
    Ok(if r.is_signed() {
        Codes::I8(drive(&x, &lay, &k, false).0)
    } else {
        Codes::U8(drive(&x, &lay, &k, false).0)
    })
}

/// `torch.quantize_per_channel(...).int_repr()` clamped to `[quant_min, quant_max]`.
pub fn quantize_per_channel<E: Elem>(
    x: ArrayViewD<'_, E>,
    scales: &[f64],
    zero_points: &[i64],
    axis: i64,
    quant_min: i64,
    quant_max: i64,
) -> Result<Codes> {
    let r = QRange::codes(quant_min, quant_max)?;
    let axis = check_axis(axis, x.ndim())?;
    let (s, zp) = channel_params(x.shape(), axis, scales, zero_points, r)?;
    let k = QuantChannel::new(&s, &zp, r);
    let lay = Layout::per_channel(x.shape(), axis);
    Ok(if r.is_signed() {
        Codes::I8(drive(&x, &lay, &k, false).0)
    } else {
        Codes::U8(drive(&x, &lay, &k, false).0)
    })
}

// ---------------------------------------------------------------------------------------------
// Dequantize

pub(crate) struct Dequant {
    pub(crate) scale: Vec<f32>,
    pub(crate) zp: Vec<i32>,
}

impl<Q: Code> RunKernel<Q, f32> for Dequant {
    #[inline(always)]
    fn uniform(
        &self,
        x: &[Q],
        o: &mut [MaybeUninit<f32>],
        _: Option<&mut [MaybeUninit<bool>]>,
        c: usize,
    ) {
        let (s, zp) = (self.scale[c], self.zp[c]);
        for (o, x) in o.iter_mut().zip(x) {
            o.write((x.to_i32() - zp) as f32 * s);
        }
    }
    #[inline(always)]
    fn varying(
        &self,
        x: &[Q],
        o: &mut [MaybeUninit<f32>],
        _: Option<&mut [MaybeUninit<bool>]>,
        c0: usize,
    ) {
        let n = x.len();
        let (s, zp) = (&self.scale[c0..c0 + n], &self.zp[c0..c0 + n]);
        for (i, o) in o[..n].iter_mut().enumerate() {
            o.write((x[i].to_i32() - zp[i]) as f32 * s[i]);
        }
    }
}

/// `(q - zero_point) * scale` in float32, as `torch.dequantize` computes it.
pub fn dequantize_per_tensor<Q: Code>(
    q: ArrayViewD<'_, Q>,
    scale: f64,
    zero_point: i64,
) -> Result<ArrayD<f32>> {
    let s = check_scale("scale", scale)?;
    ensure!(
        (i32::MIN as i64..=i32::MAX as i64).contains(&zero_point),
        "zero_point ({zero_point}) does not fit int32"
    );
    let k = Dequant {
        scale: vec![s],
        zp: vec![zero_point as i32],
    };
    Ok(drive(&q, &Layout::per_tensor(q.len()), &k, false).0)
}

/// Per-channel `(q - zero_points[c]) * scales[c]` along `axis`.
pub fn dequantize_per_channel<Q: Code>(
    q: ArrayViewD<'_, Q>,
    scales: &[f64],
    zero_points: &[i64],
    axis: i64,
) -> Result<ArrayD<f32>> {
    let axis = check_axis(axis, q.ndim())?;
    let wide = QRange {
        min: i32::MIN,
        max: i32::MAX,
    };
    let (_, zp) = channel_params(q.shape(), axis, scales, zero_points, wide)?;
    let k = DequantF64 {
        scale: scales.to_vec(),
        zp,
    };
    Ok(drive(&q, &Layout::per_channel(q.shape(), axis), &k, false).0)
}

/// Per-channel dequantization as ATen's per-channel kernel computes it: `(q - zp)` in float32
/// times the float64 scale, rounded once to float32 (per-tensor `torch.dequantize` multiplies
/// by the scale rounded to float32 instead: `Dequant`).
struct DequantF64 {
    scale: Vec<f64>,
    zp: Vec<i32>,
}

impl<Q: Code> RunKernel<Q, f32> for DequantF64 {
    #[inline(always)]
    fn uniform(
        &self,
        x: &[Q],
        o: &mut [MaybeUninit<f32>],
        _: Option<&mut [MaybeUninit<bool>]>,
        c: usize,
    ) {
        let (s, zp) = (self.scale[c], self.zp[c]);
        for (o, x) in o.iter_mut().zip(x) {
            o.write(((x.to_i32() - zp) as f32 as f64 * s) as f32);
        }
    }
    #[inline(always)]
    fn varying(
        &self,
        x: &[Q],
        o: &mut [MaybeUninit<f32>],
        _: Option<&mut [MaybeUninit<bool>]>,
        c0: usize,
    ) {
        let n = x.len();
        let (s, zp) = (&self.scale[c0..c0 + n], &self.zp[c0..c0 + n]);
        for (i, o) in o[..n].iter_mut().enumerate() {
            o.write(((x[i].to_i32() - zp[i]) as f32 as f64 * s[i]) as f32);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ndarray::{arr1, ArrayD, IxDyn};

    #[test]
    fn quantize_codes_follow_torch_edge_rules() {
        let x = arr1(&[
            f32::NAN,
            f32::INFINITY,
            f32::NEG_INFINITY,
            1e30,
            3e9,
            2.5,
            -0.5,
        ])
        .into_dyn();
        let Codes::U8(q) = quantize_per_tensor(x.view(), 1.0, 3, 0, 255).unwrap() else {
            panic!()
        };
        assert_eq!(q.as_slice().unwrap(), &[255, 255, 0, 255, 255, 5, 3]);
        let Codes::U8(q) = quantize_per_tensor(x.view(), 1.0, 200, 0, 255).unwrap() else {
            panic!()
        };
        assert_eq!(q.as_slice().unwrap(), &[0, 0, 0, 0, 0, 202, 200]); // FBGEMM's int32 wrap-around
        let x2 = x.clone().into_shape_with_order(IxDyn(&[1, 7])).unwrap();
        let Codes::I8(q) = quantize_per_channel(x2.view(), &[1.0], &[0], 0, -128, 127).unwrap()
        else {
            panic!()
        };
        assert_eq!(q.as_slice().unwrap(), &[0, 127, -128, 127, 127, 2, 0]);
    }

    #[test]
    fn dequantize_inverts_quantize_within_half_a_step() {
        let x: Vec<f32> = (0..1000).map(|i| (i as f32 * 0.731).cos() * 2.0).collect();
        let xa = ArrayD::from_shape_vec(IxDyn(&[10, 100]), x.clone()).unwrap();
        let Codes::I8(q) = quantize_per_tensor(xa.view(), 2.0 / 127.0, 0, -128, 127).unwrap()
        else {
            panic!()
        };
        let d = dequantize_per_tensor(q.view(), 2.0 / 127.0, 0).unwrap();
        for (a, b) in d.iter().zip(&x) {
            assert!((a - b).abs() <= 0.5 * 2.0 / 127.0 + 1e-6);
        }
    }
}

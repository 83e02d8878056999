//! Fake-quant (quantize and dequantize in one pass) and its clip mask.
use super::drivers::{drive, drive_in_place, drive_into, Layout, RunKernel};
use super::ranges::{channel_params, check_axis, check_scale, check_zero_point, QRange};
use crate::quant::elem::{Elem, Real};
use crate::{ensure, Result};
use ndarray::{ArrayD, ArrayViewD};
use std::mem::MaybeUninit;

/// Per-channel parameters in the compute type (one entry for per-tensor).
struct FakeQuant<C> {
    inv: Vec<C>,
    scale: Vec<C>,
    zp: Vec<C>,
    qmin: C,
    qmax: C,
    /// Largest `zp + round(x/s)` still clamped to `qmax`; beyond it the value goes to `qmin`.
    /// Per tensor ATen clamps in float (∞); per channel it converts to int64 first, and an
    /// overflowing conversion yields INT64_MIN, hence `qmin`.
    hi: C,
    /// ATen's per-tensor kernel multiplies `(q - zp) * scale` in float32 even for float64
    /// input; the per-channel one multiplies in the input's type.
    product_f32: bool,
}

impl<C: Real> FakeQuant<C> {
    fn new(scales: &[f32], zps: &[i32], r: QRange, hi: C, product_f32: bool) -> Self {
        FakeQuant {
            product_f32,
            inv: scales.iter().map(|&s| C::from_f32(1.0f32 / s)).collect(),
            scale: scales.iter().map(|&s| C::from_f32(s)).collect(),
            zp: zps.iter().map(|&z| C::from_i32(z)).collect(),
            qmin: C::from_i32(r.min),
            qmax: C::from_i32(r.max),
            hi,
        }
    }

    #[inline(always)]
    fn one(&self, x: C, inv: C, scale: C, zp: C) -> (C, bool) {
        let t = zp + (x * inv).rne();
        let inside = (t >= self.qmin) & (t <= self.qmax);
        // Three selects, no branch: a branch per element mispredicts whenever values clamp
        // (10x slower at int4), and these compile to maxps / minps / blendv. NaN fails
        // `t > qmin`, so it maps to qmin, as do values below the range and int64 overflows.
        let q = if t > self.qmin { t } else { self.qmin };
        let q = if q < self.qmax { q } else { self.qmax };
        let q = if t > self.hi { self.qmin } else { q };
        let out = if self.product_f32 {
            C::from_f32((q - zp).to_f32() * scale.to_f32())
        } else {
            (q - zp) * scale
        };
        (out, inside)
    }
}

impl<E: Elem> RunKernel<E, E> for FakeQuant<E::C> {
    #[inline(always)]
    fn uniform(
        &self,
        x: &[E],
        o: &mut [MaybeUninit<E>],
        m: Option<&mut [MaybeUninit<bool>]>,
        c: usize,
    ) {
        let (inv, s, zp) = (self.inv[c], self.scale[c], self.zp[c]);
        match m {
            Some(m) => {
                for ((o, m), x) in o.iter_mut().zip(m.iter_mut()).zip(x) {
                    let (v, inside) = self.one(x.load(), inv, s, zp);
                    o.write(E::store(v));
                    m.write(inside);
                }
            }
            None => {
                for (o, x) in o.iter_mut().zip(x) {
                    o.write(E::store(self.one(x.load(), inv, s, zp).0));
                }
            }
        }
    }

    #[inline(always)]
    fn varying(
        &self,
        x: &[E],
        o: &mut [MaybeUninit<E>],
        m: Option<&mut [MaybeUninit<bool>]>,
        c0: usize,
    ) {
        let n = x.len();
        let (inv, s, zp) = (
            &self.inv[c0..c0 + n],
            &self.scale[c0..c0 + n],
            &self.zp[c0..c0 + n],
        );
        // Equal lengths, visible to LLVM: no bounds check keeps the loop from vectorizing.
        let o = &mut o[..n];
        match m {
            Some(m) => {
                for (i, (o, m)) in o.iter_mut().zip(m[..n].iter_mut()).enumerate() {
                    let (v, inside) = self.one(x[i].load(), inv[i], s[i], zp[i]);
                    o.write(E::store(v));
                    m.write(inside);
                }
            }
            None => {
                for (i, o) in o.iter_mut().enumerate() {
                    o.write(E::store(self.one(x[i].load(), inv[i], s[i], zp[i]).0));
                }
            }
        }
    }
}

/// Output of a fake-quant kernel: the rounded values and, when asked for, the
/// straight-through mask `quant_min <= zp + round(x / scale) <= quant_max`.
pub type FakeQuantOutput<E> = (ArrayD<E>, Option<ArrayD<bool>>);

/// A validated fake-quant operation for arrays of one shape, runnable into a new array, into a
/// caller's buffer, or in place.
pub struct FakeQuantOp<C> {
    k: FakeQuant<C>,
    lay: Layout,
    shape: Vec<usize>,
}

impl<C: Real> FakeQuantOp<C> {
    /// `torch.fake_quantize_per_tensor_affine`, bit for bit: NaN maps to `quant_min`, ±Inf and
    /// out-of-range values clamp; the mask is false for all of them.
    pub fn per_tensor(
        shape: &[usize],
        scale: f64,
        zero_point: i64,
        quant_min: i64,
        quant_max: i64,
    ) -> Result<Self> {
        let r = QRange::new(quant_min, quant_max)?;
        let s = check_scale("scale", scale)?;
        let zp = check_zero_point("zero_point", zero_point, r)?;
        let n = shape.iter().product();
        Ok(FakeQuantOp {
            k: FakeQuant::new(&[s], &[zp], r, C::INFINITY, true),
            lay: Layout::per_tensor(n),
            shape: shape.to_vec(),
        })
    }

    /// `torch.fake_quantize_per_channel_affine`, bit for bit, including its int64 conversion:
    /// values whose `zp + round(x/s)` reaches 2^63 (and +Inf) map to `quant_min`, like NaN.
    pub fn per_channel(
        shape: &[usize],
        scales: &[f64],
        zero_points: &[i64],
        axis: i64,
        quant_min: i64,
        quant_max: i64,
    ) -> Result<Self> {
        let r = QRange::new(quant_min, quant_max)?;
        let axis = check_axis(axis, shape.len())?;
        let (s, zp) = channel_params(shape, axis, scales, zero_points, r)?;
        Ok(FakeQuantOp {
            k: FakeQuant::new(&s, &zp, r, C::I64_SAFE_MAX, false),
            lay: Layout::per_channel(shape, axis),
            shape: shape.to_vec(),
        })
    }

    fn check(&self, shape: &[usize], what: &str) -> Result<()> {
        ensure!(
            shape == self.shape.as_slice(),
            "{what} has shape {shape:?}, expected {:?}",
            self.shape
        );
        Ok(())
    }

    /// Fake-quantizes `x` into a new array (and mask).
    pub fn run<E: Elem<C = C>>(
        &self,
        x: ArrayViewD<'_, E>,
        with_mask: bool,
    ) -> Result<FakeQuantOutput<E>> {
        self.check(x.shape(), "x")?;
        Ok(drive(&x, &self.lay, &self.k, with_mask))
    }

    /// Fake-quantizes `x` into `out` (C order, `x.len()` elements) and optionally a mask.
    pub fn run_into<E: Elem<C = C>>(
        &self,
        x: ArrayViewD<'_, E>,
        out: &mut [E],
        mask: Option<&mut [bool]>,
    ) -> Result<()> {
        self.check(x.shape(), "x")?;
        ensure!(
            out.len() == x.len(),
            "out has {} elements, expected {}",
            out.len(),
            x.len()
        );
        // SAFETY: MaybeUninit<T> has T's layout; kernels only write initialized values.
        let o = unsafe { &mut *(out as *mut [E] as *mut [MaybeUninit<E>]) };
        let m = mask.map(|m| unsafe { &mut *(m as *mut [bool] as *mut [MaybeUninit<bool>]) });
        drive_into(&x, &self.lay, &self.k, o, m);
        Ok(())
    }

    /// Fake-quantizes a C-contiguous buffer of this op's shape in place.
    pub fn run_in_place<E: Elem<C = C>>(
        &self,
        data: &mut [E],
        mask: Option<&mut [bool]>,
    ) -> Result<()> {
        let n: usize = self.shape.iter().product();
        ensure!(
            data.len() == n,
            "the buffer has {} elements, expected {n}",
            data.len()
        );
        // SAFETY: as in run_into.
        let m = mask.map(|m| unsafe { &mut *(m as *mut [bool] as *mut [MaybeUninit<bool>]) });
        drive_in_place(data, &self.lay, &self.k, m);
        Ok(())
    }
}

/// `FakeQuantOp::per_tensor(..).run(x, with_mask)`.
pub fn fake_quantize_per_tensor<E: Elem>(
    x: ArrayViewD<'_, E>,
    scale: f64,
    zero_point: i64,
    quant_min: i64,
    quant_max: i64,
    with_mask: bool,
) -> Result<FakeQuantOutput<E>> {
    FakeQuantOp::<E::C>::per_tensor(x.shape(), scale, zero_point, quant_min, quant_max)?
        .run(x, with_mask)
}

/// `FakeQuantOp::per_channel(..).run(x, with_mask)`.
pub fn fake_quantize_per_channel<E: Elem>(
    x: ArrayViewD<'_, E>,
    scales: &[f64],
    zero_points: &[i64],
    axis: i64,
    quant_min: i64,
    quant_max: i64,
    with_mask: bool,
) -> Result<FakeQuantOutput<E>> {
    FakeQuantOp::<E::C>::per_channel(x.shape(), scales, zero_points, axis, quant_min, quant_max)?
        .run(x, with_mask)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::quant::CHUNK;
    use ndarray::{arr1, Array2, ArrayD, IxDyn};

    /// ATen's scalar loop, written out the way the C++ does it (int64 conversion included).
    fn aten_fq(x: f32, s: f32, zp: i64, qmin: i64, qmax: i64, per_channel: bool) -> f32 {
        let inv = 1.0f32 / s;
        let t = zp as f32 + (x * inv).round_ties_even();
        let q = if t.is_nan() || (per_channel && t >= 9.223_372e18) {
            qmin
        } else {
            (t.clamp(qmin as f32, qmax as f32)) as i64
        };
        ((q - zp) as f64 * s as f64) as f32
    }

    #[test]
    fn per_tensor_matches_reference_on_ties_and_specials() {
        let s = 0.1f32;
        let mut xs: Vec<f32> = (-300..300).map(|i| (i as f32 + 0.5) * s).collect();
        xs.extend([
            f32::NAN,
            f32::INFINITY,
            f32::NEG_INFINITY,
            1e30,
            -1e30,
            0.0,
            -0.0,
            1e-45,
        ]);
        let x = arr1(&xs).into_dyn();
        for (qmin, qmax, zp) in [
            (-2, 1, 0),
            (0, 3, 1),
            (-8, 7, 0),
            (0, 15, 3),
            (-128, 127, -5),
            (0, 255, 128),
        ] {
            let (out, mask) =
                fake_quantize_per_tensor(x.view(), s as f64, zp, qmin, qmax, true).unwrap();
            let mask = mask.unwrap();
            for (i, &v) in xs.iter().enumerate() {
                let want = aten_fq(v, s, zp, qmin, qmax, false);
                assert_eq!(
                    out[i].to_bits(),
                    want.to_bits(),
                    "x={v} range {qmin}..{qmax}"
                );
                let t = zp as f32 + (v / s).round_ties_even();
                let _ = t;
                let tq = zp as f32 + (v * (1.0 / s)).round_ties_even();
                assert_eq!(mask[i], tq >= qmin as f32 && tq <= qmax as f32);
            }
        }
    }

    #[test]
    fn per_channel_every_axis_and_strided_input() {
        let shape = [3usize, 4, 5];
        let n: usize = shape.iter().product();
        let data: Vec<f32> = (0..n)
            .map(|i| ((i * 7919) % 101) as f32 * 0.37 - 18.0)
            .collect();
        let x = ArrayD::from_shape_vec(IxDyn(&shape), data).unwrap();
        for axis in 0..3 {
            let c = shape[axis];
            let scales: Vec<f64> = (0..c).map(|i| 0.05 + 0.1 * i as f64).collect();
            let zps: Vec<i64> = (0..c).map(|i| i as i64).collect();
            let (out, _) =
                fake_quantize_per_channel(x.view(), &scales, &zps, axis as i64, 0, 15, false)
                    .unwrap();
            // The strided path (a transposed view) must agree with the contiguous one.
            let xt = x.view().reversed_axes();
            let (out_t, _) =
                fake_quantize_per_channel(xt, &scales, &zps, (2 - axis) as i64, 0, 15, false)
                    .unwrap();
            for (idx, &v) in x.indexed_iter() {
                let ch = idx[axis];
                let want = aten_fq(v, scales[ch] as f32, zps[ch], 0, 15, true);
                assert_eq!(out[&idx].to_bits(), want.to_bits());
                let ti = IxDyn(&[idx[2], idx[1], idx[0]]);
                assert_eq!(out_t[&ti].to_bits(), want.to_bits());
            }
        }
    }

    #[test]
    fn large_input_crosses_chunks() {
        let n = CHUNK * 3 + 17;
        let x: Vec<f32> = (0..n).map(|i| (i as f32).sin() * 3.0).collect();
        let xa = ArrayD::from_shape_vec(IxDyn(&[n]), x.clone()).unwrap();
        let (out, _) = fake_quantize_per_tensor(xa.view(), 0.02, 3, -8, 7, false).unwrap();
        for i in 0..n {
            assert_eq!(
                out[i].to_bits(),
                aten_fq(x[i], 0.02, 3, -8, 7, false).to_bits()
            );
        }
        // innermost-axis per channel with a row length that does not divide the chunk
        let cols = 1000;
        let rows = n / cols;
        let m = Array2::from_shape_vec((rows, cols), x[..rows * cols].to_vec())
            .unwrap()
            .into_dyn();
        let scales: Vec<f64> = (0..cols).map(|i| 0.01 + i as f64 * 1e-4).collect();
        let zps = vec![0i64; cols];
        let (out, _) = fake_quantize_per_channel(m.view(), &scales, &zps, 1, -8, 7, false).unwrap();
        for ((r, c), &v) in m
            .clone()
            .into_dimensionality::<ndarray::Ix2>()
            .unwrap()
            .indexed_iter()
        {
            let want = aten_fq(v, scales[c] as f32, 0, -8, 7, true);
            assert_eq!(out[[r, c]].to_bits(), want.to_bits());
        }
    }

    #[test]
    fn into_and_in_place_agree_with_a_fresh_output() {
        let n = CHUNK * 2 + 333;
        let x: Vec<f32> = (0..n).map(|i| (i as f32 * 0.37).sin() * 4.0).collect();
        let xa = ArrayD::from_shape_vec(IxDyn(&[n / 3, 3]), x[..n / 3 * 3].to_vec()).unwrap();
        for op in [
            FakeQuantOp::<f32>::per_tensor(xa.shape(), 0.03, 1, -8, 7).unwrap(),
            FakeQuantOp::<f32>::per_channel(xa.shape(), &[0.01, 0.02, 0.05], &[0, 1, -1], 1, -8, 7)
                .unwrap(),
        ] {
            let (want, mask) = op.run(xa.view(), true).unwrap();
            let mut out = vec![0f32; xa.len()];
            let mut m = vec![false; xa.len()];
            op.run_into(xa.view(), &mut out, Some(&mut m)).unwrap();
            assert_eq!(out.as_slice(), want.as_slice().unwrap());
            assert_eq!(m.as_slice(), mask.unwrap().as_slice().unwrap());
            let mut inplace = xa.as_slice().unwrap().to_vec();
            op.run_in_place(&mut inplace, None).unwrap();
            assert_eq!(inplace.as_slice(), want.as_slice().unwrap());
            assert!(op.run_into(xa.view(), &mut out[1..], None).is_err());
        }
    }
}

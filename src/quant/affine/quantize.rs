//! Quantize to integer codes and dequantize them, each with the rule of its PyTorch entry point.
use super::drivers::{drive, Layout, RunKernel};
use super::ranges::{channel_params, check_axis, check_scale, check_zero_point, QRange};
use crate::quant::elem::{Elem, Real};
use crate::{ensure, Result};
use ndarray::{ArrayD, ArrayViewD};
use std::mem::MaybeUninit;

/// A byte-wide integer code type.
pub trait Code: Copy + Send + Sync + 'static {
    /// int8 (packed from int16 with signed saturation) or uint8 (unsigned saturation).
    const SIGNED: bool;
    fn from_i32(v: i32) -> Self;
    fn to_i32(self) -> i32;
}
impl Code for i8 {
    const SIGNED: bool = true;
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
    const SIGNED: bool = false;
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
        // max/min, not Ord::clamp: its min <= max assert keeps the loop from vectorizing.
        v.wrapping_add(self.zp).max(self.r.min).min(self.r.max)
    }
}

#[cfg(target_arch = "x86_64")]
impl QuantTensor {
    /// `one` on 32 values at a time, packed to bytes with saturating packs (exact: the codes are
    /// already clamped to a byte range) and stored as one vector. Returns how many it wrote;
    /// the caller does the rest with `one`.
    #[target_feature(enable = "avx2")]
    fn avx2<Q: Code>(&self, xs: &[f32], o: &mut [MaybeUninit<Q>]) -> usize {
        use std::arch::x86_64::*;
        assert!(std::mem::size_of::<Q>() == 1 && o.len() >= xs.len());
        let n = xs.len() / 32 * 32;
        let (inv, cap) = (_mm256_set1_ps(self.inv), _mm256_set1_ps(FBGEMM_CAP));
        let floor = _mm256_set1_ps(-2_147_483_648.0);
        let zp = _mm256_set1_epi32(self.zp);
        let (lo, hi) = (_mm256_set1_epi32(self.r.min), _mm256_set1_epi32(self.r.max));
        // packs work within 128-bit halves: this puts the 8 groups of 4 codes back in order.
        let order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
        let code = |p: *const f32| {
            // SAFETY (for the caller): p points at 8 readable floats.
            let t = _mm256_mul_ps(unsafe { _mm256_loadu_ps(p) }, inv);
            // min(t, cap) is `t < cap ? t : cap`: NaN becomes the cap, as in `one`.
            let t = _mm256_min_ps(t, cap);
            let t = _mm256_round_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(t);
            let v = _mm256_cvtps_epi32(_mm256_max_ps(t, floor));
            _mm256_min_epi32(_mm256_max_epi32(_mm256_add_epi32(v, zp), lo), hi)
        };
        let out = o.as_mut_ptr().cast::<u8>();
        for i in (0..n).step_by(32) {
            // SAFETY: i + 32 <= n <= xs.len() <= o.len().
            unsafe {
                let p = xs.as_ptr().add(i);
                let (a, b, c, d) = (code(p), code(p.add(8)), code(p.add(16)), code(p.add(24)));
                let (ab, cd) = (_mm256_packs_epi32(a, b), _mm256_packs_epi32(c, d));
                let bytes = if Q::SIGNED {
                    _mm256_packs_epi16(ab, cd)
                } else {
                    _mm256_packus_epi16(ab, cd)
                };
                let bytes = _mm256_permutevar8x32_epi32(bytes, order);
                _mm256_storeu_si256(out.add(i).cast(), bytes);
            }
        }
        n
    }
}

#[cfg(target_arch = "x86_64")]
impl QuantTensor {
    /// [`Self::avx2`] on 64 values at a time in 512-bit registers: the same instructions, one
    /// rule (`vminps` returns its second operand for NaN, `vcvtps2dq` gives `i32::MIN` out of
    /// range), so the same codes.
    #[target_feature(enable = "avx512f,avx512bw")]
    fn avx512<Q: Code>(&self, xs: &[f32], o: &mut [MaybeUninit<Q>]) -> usize {
        use std::arch::x86_64::*;
        assert!(std::mem::size_of::<Q>() == 1 && o.len() >= xs.len());
        let n = xs.len() / 64 * 64;
        let (inv, cap) = (_mm512_set1_ps(self.inv), _mm512_set1_ps(FBGEMM_CAP));
        let floor = _mm512_set1_ps(-2_147_483_648.0);
        let zp = _mm512_set1_epi32(self.zp);
        let (lo, hi) = (_mm512_set1_epi32(self.r.min), _mm512_set1_epi32(self.r.max));
        // packs work within 128-bit lanes: this puts the 16 groups of 4 codes back in order.
        let order = _mm512_setr_epi32(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15);
        let code = |p: *const f32| {
            // SAFETY (for the caller): p points at 16 readable floats.
            let t = _mm512_mul_ps(unsafe { _mm512_loadu_ps(p) }, inv);
            let t = _mm512_min_ps(t, cap);
            let t = _mm512_roundscale_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(t);
            let v = _mm512_cvtps_epi32(_mm512_max_ps(t, floor));
            _mm512_min_epi32(_mm512_max_epi32(_mm512_add_epi32(v, zp), lo), hi)
        };
        let out = o.as_mut_ptr().cast::<u8>();
        for i in (0..n).step_by(64) {
            // SAFETY: i + 64 <= n <= xs.len() <= o.len().
            unsafe {
                let p = xs.as_ptr().add(i);
                let (a, b, c, d) = (code(p), code(p.add(16)), code(p.add(32)), code(p.add(48)));
                let (ab, cd) = (_mm512_packs_epi32(a, b), _mm512_packs_epi32(c, d));
                let bytes = if Q::SIGNED {
                    _mm512_packs_epi16(ab, cd)
                } else {
                    _mm512_packus_epi16(ab, cd)
                };
                let bytes = _mm512_permutexvar_epi32(order, bytes);
                _mm512_storeu_si512(out.add(i).cast(), bytes);
            }
        }
        n
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
        #[cfg_attr(not(target_arch = "x86_64"), allow(unused_mut))]
        let mut done = 0;
        #[cfg(target_arch = "x86_64")]
        if let Some(xs) = E::as_f32s(x) {
            let level = crate::quant::simd::simd_level();
            if level >= 3 {
                // SAFETY: the CPU has AVX-512 F/BW; `o` holds one byte-wide code per element.
                done = unsafe { self.avx512::<Q>(xs, o) };
            } else if level >= 2 {
                // SAFETY: the CPU has AVX2; `o` holds one byte-wide code per element of `xs`.
                done = unsafe { self.avx2::<Q>(xs, o) };
            }
        }
        for (o, x) in o[done..].iter_mut().zip(&x[done..]) {
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

    /// The AVX2 and AVX-512 paths equal `one`, value by value, for int8 and uint8 ranges, narrow ranges,
    /// zero points that wrap, and every special value (whatever `LOWBIT_ISA` says).
    #[test]
    fn vector_paths_equal_the_scalar_rule() {
        #[cfg(target_arch = "x86_64")]
        {
            if !std::is_x86_feature_detected!("avx2") {
                eprintln!("skipped the AVX2 path: this CPU lacks AVX2");
                return;
            }
            let mut xs: Vec<f32> = (0..1000)
                .map(|i| ((i * 7919) % 2001) as f32 * 0.37 - 370.0)
                .collect();
            let specials = [
                f32::NAN,
                f32::INFINITY,
                f32::NEG_INFINITY,
                1e30,
                -1e30,
                3e9,
                -3e9,
                0.5,
                -0.5,
                1.5,
                -0.0,
            ];
            for (i, v) in specials.iter().enumerate() {
                xs[i * 37] = *v;
            }
            for wide in [false, true] {
                if wide && !std::is_x86_feature_detected!("avx512bw") {
                    eprintln!("skipped the AVX-512 path: this CPU lacks AVX-512 BW");
                    continue;
                }
                for (scale, zp, lo, hi) in [
                    (1.0f32, 3, 0, 255),
                    (1.0, 200, 0, 255),
                    (0.05, 0, -128, 127),
                    (3.0, -100, -8, 7),
                    (1e-3, 127, -128, 127),
                    (7.0, 1 << 30, 0, 15),
                ] {
                    let k = QuantTensor {
                        inv: 1.0 / scale,
                        zp,
                        r: QRange::codes(lo, hi).unwrap(),
                    };
                    let want: Vec<i32> = xs.iter().map(|&x| k.one(x)).collect();
                    let mut o8 = vec![MaybeUninit::<i8>::uninit(); xs.len()];
                    let mut u8s = vec![MaybeUninit::<u8>::uninit(); xs.len()];
                    // SAFETY: the CPU has AVX2 (and AVX-512 F/BW where `wide` is set).
                    let (n8, nu) = unsafe {
                        if wide {
                            (k.avx512::<i8>(&xs, &mut o8), k.avx512::<u8>(&xs, &mut u8s))
                        } else {
                            (k.avx2::<i8>(&xs, &mut o8), k.avx2::<u8>(&xs, &mut u8s))
                        }
                    };
                    assert_eq!((n8, nu), if wide { (960, 960) } else { (992, 992) });
                    for i in 0..n8 {
                        // SAFETY: the first n8 codes were written.
                        let (a, b) = unsafe { (o8[i].assume_init(), u8s[i].assume_init()) };
                        if lo < 0 {
                            assert_eq!(a as i32, want[i], "x={} scale={scale} zp={zp}", xs[i]);
                        } else {
                            assert_eq!(b as i32, want[i], "x={} scale={scale} zp={zp}", xs[i]);
                        }
                    }
                }
            }
        }
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

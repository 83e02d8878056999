//! The backward of learnable fake-quant (LSQ): the gradients of `x`, of the scale and of the
//! zero point, element by element, as ATen's `_fake_quantize_learnable_per_{tensor,channel}_affine_backward`
//! computes them on the CPU before it sums the last two.
//!
//! ATen's CPU kernel rounds `zp + x * (1/scale)` (the sum taken in float32, then
//! `nearbyint`), converts to int64, and branches on the clamp:
//!
//! * inside `[qmin, qmax]`: `dx = dy`, `dscale = dy * (x̂ - x) * (1/scale) * grad_factor` with
//!   `x̂ = (q - zp) * scale`, `dzp = 0`;
//! * below (and NaN, whose int64 conversion is INT64_MIN, like values at or beyond 2^63):
//!   `dx = dy * 0`, `dscale = dy * (qmin - zp) * grad_factor`, `dzp = dy * -1 * scale * grad_factor`;
//! * above: the same with `qmax - zp`.
//!
//! Products are taken left to right in float32. ATen's kernel is C++ compiled per CPU capability,
//! and GCC contracts `zp + x * inv` and `x̂ - x` (with `x̂ = (q - zp) * scale`) into fused
//! multiply-adds where the capability has FMA (AVX2, AVX-512, every aarch64): `fused` selects
//! those two roundings, the rest is the same either way.
use super::drivers::{advise_huge_pages, Layout};
use super::ranges::{check_axis, check_scale, check_zero_point, QRange};
use crate::quant::CHUNK;
use crate::{ensure, Result};
use rayon::prelude::*;
use std::mem::MaybeUninit;

/// 2^63 in float32: the first value whose int64 conversion overflows (to INT64_MIN on x86).
const TWO_63: f32 = 9.223_372e18;

/// Per-channel parameters (one entry for per-tensor) of the LSQ backward.
pub struct LearnableGrad {
    scale: Vec<f32>,
    inv: Vec<f32>,
    zp: Vec<f32>,
    qmin: f32,
    qmax: f32,
    grad_factor: f32,
    fused: bool,
    lay: Layout,
    n: usize,
}

impl LearnableGrad {
    /// The backward for `shape` with one `(scale, zero_point)` per channel of `axis` (`None`:
    /// per tensor, one pair). Zero points are the values ATen's backward uses: per tensor
    /// `trunc(clamp(zp + 0.5))`, per channel `clamp(round(zp))`, already in `[qmin, qmax]`.
    /// `fused`: round as the FMA builds of ATen do (see the module docs).
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        shape: &[usize],
        axis: Option<usize>,
        scales: &[f32],
        zero_points: &[f32],
        quant_min: i64,
        quant_max: i64,
        grad_factor: f32,
        fused: bool,
    ) -> Result<Self> {
        let r = QRange::new(quant_min, quant_max)?;
        ensure!(
            r.min <= 0 && r.max >= 0,
            "the quantization range [{quant_min}, {quant_max}] must include 0 (as torch requires for learnable fake-quant)"
        );
        let channels = match axis {
            None => 1,
            Some(a) => shape[check_axis(a as i64, shape.len())?],
        };
        ensure!(
            scales.len() == channels && zero_points.len() == channels,
            "{} scales and {} zero points for {channels} channels",
            scales.len(),
            zero_points.len()
        );
        for &s in scales {
            check_scale("scale", f64::from(s))?;
        }
        for &z in zero_points {
            ensure!(z == z.round(), "zero_point {z} must be an integer");
            check_zero_point("zero_point", z as i64, r)?;
        }
        let n = shape.iter().product();
        Ok(LearnableGrad {
            inv: scales.iter().map(|&s| 1.0f32 / s).collect(),
            scale: scales.to_vec(),
            zp: zero_points.to_vec(),
            qmin: r.min as f32,
            qmax: r.max as f32,
            grad_factor,
            fused,
            lay: match axis {
                None => Layout::per_tensor(n),
                Some(a) => Layout::per_channel(shape, a),
            },
            n,
        })
    }

    /// `(dx, dscale, dzp)` of one element whose channel has `(scale, inv, zp)`.
    // `dy * -1.0`, not `-dy`: ATen multiplies, which keeps a NaN's sign where negation flips it.
    #[allow(clippy::neg_multiply)]
    #[inline(always)]
    fn one<const FUSED: bool>(
        &self,
        x: f32,
        dy: f32,
        scale: f32,
        inv: f32,
        zp: f32,
    ) -> (f32, f32, f32) {
        // `mul_add` is one vfmadd in the FMA build `run` dispatches to (a libm call elsewhere).
        let t = if FUSED {
            x.mul_add(inv, zp)
        } else {
            zp + x * inv
        }
        .round_ties_even();
        let inside = (t >= self.qmin) & (t <= self.qmax);
        // NaN and int64 overflows convert to INT64_MIN: below the range.
        let above = (t > self.qmax) & (t < TWO_63);
        let g = self.grad_factor;
        let dx = dy * if inside { 1.0f32 } else { 0.0f32 };
        let err = if FUSED {
            (t - zp).mul_add(scale, -x)
        } else {
            (t - zp) * scale - x
        };
        let ds_in = dy * err * inv * g;
        let ds_out = dy * (if above { self.qmax } else { self.qmin } - zp) * g;
        let dz_out = dy * -1.0f32 * scale * g;
        // Selects, not branches: the loop vectorizes.
        (
            dx,
            if inside { ds_in } else { ds_out },
            if inside { 0.0 } else { dz_out },
        )
    }

    #[inline(always)]
    fn run_chunk<const FUSED: bool>(&self, start: usize, x: &[f32], dy: &[f32], out: Outs<'_>) {
        let (dx, ds, dz) = out;
        let mut i = 0;
        while i < x.len() {
            let (c, len, varying) = self.lay.run_at(start + i, x.len() - i);
            let r = i..i + len;
            let (x, dy) = (&x[r.clone()], &dy[r.clone()]);
            let (dx, ds, dz) = (&mut dx[r.clone()], &mut ds[r.clone()], &mut dz[r]);
            if varying {
                for j in 0..len {
                    let (a, b, d) = self.one::<FUSED>(
                        x[j],
                        dy[j],
                        self.scale[c + j],
                        self.inv[c + j],
                        self.zp[c + j],
                    );
                    dx[j].write(a);
                    ds[j].write(b);
                    dz[j].write(d);
                }
            } else {
                let (s, inv, zp) = (self.scale[c], self.inv[c], self.zp[c]);
                for j in 0..len {
                    let (a, b, d) = self.one::<FUSED>(x[j], dy[j], s, inv, zp);
                    dx[j].write(a);
                    ds[j].write(b);
                    dz[j].write(d);
                }
            }
            i += len;
        }
    }

    /// The three elementwise gradients `(dx, dscale, dzp)` of C-contiguous `x` and `dy`, each
    /// `x.len()` long, computed in parallel chunks into fresh (huge-page backed) buffers.
    pub fn run(&self, x: &[f32], dy: &[f32]) -> Result<(Vec<f32>, Vec<f32>, Vec<f32>)> {
        for (what, len) in [("x", x.len()), ("dy", dy.len())] {
            ensure!(
                len == self.n,
                "{what} has {len} elements, expected {}",
                self.n
            );
        }
        let fresh = || {
            let mut v = Vec::<MaybeUninit<f32>>::with_capacity(self.n);
            // SAFETY: MaybeUninit needs no initialization.
            unsafe { v.set_len(self.n) };
            advise_huge_pages(&mut v);
            v
        };
        let (mut dx, mut ds, mut dz) = (fresh(), fresh(), fresh());
        x.par_chunks(CHUNK)
            .zip(dy.par_chunks(CHUNK))
            .zip(dx.par_chunks_mut(CHUNK))
            .zip(ds.par_chunks_mut(CHUNK))
            .zip(dz.par_chunks_mut(CHUNK))
            .enumerate()
            .for_each(|(i, ((((x, dy), dx), ds), dz))| {
                crate::quant::simd::dispatch(Chunk {
                    k: self,
                    start: i * CHUNK,
                    x,
                    dy,
                    out: (dx, ds, dz),
                })
            });
        // SAFETY: the chunks cover every element and the kernel writes each one.
        let done = |v: Vec<MaybeUninit<f32>>| unsafe {
            let mut v = std::mem::ManuallyDrop::new(v);
            Vec::from_raw_parts(v.as_mut_ptr() as *mut f32, v.len(), v.capacity())
        };
        Ok((done(dx), done(ds), done(dz)))
    }
}

/// The three gradient outputs of a chunk, written once each.
type Outs<'a> = (
    &'a mut [MaybeUninit<f32>],
    &'a mut [MaybeUninit<f32>],
    &'a mut [MaybeUninit<f32>],
);

/// One chunk of [`LearnableGrad::run`], compiled for the CPU's instruction set.
struct Chunk<'a> {
    k: &'a LearnableGrad,
    start: usize,
    x: &'a [f32],
    dy: &'a [f32],
    out: Outs<'a>,
}

impl crate::quant::simd::Kernel for Chunk<'_> {
    type Output = ();
    #[inline(always)]
    fn run<S: crate::quant::simd::Isa>(self) {
        if self.k.fused {
            self.k
                .run_chunk::<true>(self.start, self.x, self.dy, self.out)
        } else {
            self.k
                .run_chunk::<false>(self.start, self.x, self.dy, self.out)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// ATen's scalar loop, transcribed with int64 arithmetic and x86's conversion rule.
    #[allow(clippy::too_many_arguments, clippy::neg_multiply)]
    fn reference(
        x: f32,
        dy: f32,
        s: f32,
        zp: f32,
        qmin: i64,
        qmax: i64,
        g: f32,
        fused: bool,
    ) -> (f32, f32, f32) {
        let inv = 1.0f32 / s;
        let t = if fused {
            x.mul_add(inv, zp)
        } else {
            zp + x * inv
        }
        .round_ties_even();
        let xq: i64 = if t.is_nan() || !(-TWO_63..TWO_63).contains(&t) {
            i64::MIN
        } else {
            t as i64
        };
        let dx = dy * if xq >= qmin && xq <= qmax { 1.0 } else { 0.0 };
        let a = xq.clamp(qmin, qmax) as f32 - zp;
        let err = if fused { a.mul_add(s, -x) } else { a * s - x };
        if xq < qmin || xq > qmax {
            let small = qmin as f32 - zp;
            let big = qmax as f32 - zp;
            (
                dx,
                dy * if xq < qmin { small } else { big } * g,
                dy * -1.0 * s * g,
            )
        } else {
            (dx, dy * err * inv * g, 0.0)
        }
    }

    #[test]
    fn equals_the_scalar_loop_on_edges() {
        let xs = [
            0.0f32,
            -0.0,
            0.05,
            0.15,
            0.25,
            -0.35,
            1.27,
            1.28,
            -1.29,
            100.0,
            -100.0,
            f32::NAN,
            f32::INFINITY,
            f32::NEG_INFINITY,
            1e30,
            -1e30,
            1e-40,
            9.3e18,
        ];
        let dys = [1.0f32, -2.5, 0.0, f32::INFINITY, f32::NAN, 3.0e-39];
        for (qmin, qmax, zp, fused) in [
            (-128i64, 127i64, 0.0f32, false),
            (0, 255, 0.0, true),
            (-8, 7, 3.0, false),
            (-8, 7, 3.0, true),
            (-2, 1, -2.0, true),
            (0, 15, 0.0, false),
        ] {
            let g = 0.37f32;
            let s = 0.01f32;
            let k = LearnableGrad::new(
                &[xs.len() * dys.len()],
                None,
                &[s],
                &[zp],
                qmin,
                qmax,
                g,
                fused,
            )
            .unwrap();
            let x: Vec<f32> = dys.iter().flat_map(|_| xs).collect();
            let dy: Vec<f32> = dys
                .iter()
                .flat_map(|&d| xs.iter().map(move |_| d))
                .collect();
            let n = x.len();
            let (dx, ds, dz) = k.run(&x, &dy).unwrap();
            for i in 0..n {
                let want = reference(x[i], dy[i], s, zp, qmin, qmax, g, fused);
                let got = (dx[i], ds[i], dz[i]);
                for (a, b) in [(got.0, want.0), (got.1, want.1), (got.2, want.2)] {
                    assert!(
                        a.to_bits() == b.to_bits() || (a.is_nan() && b.is_nan()),
                        "x={} dy={}: {got:?} vs {want:?}",
                        x[i],
                        dy[i]
                    );
                }
            }
        }
    }

    #[test]
    fn per_channel_uses_each_channels_parameters() {
        let shape = [3usize, 4];
        let x: Vec<f32> = (0..12).map(|i| i as f32 * 0.3 - 1.7).collect();
        let dy: Vec<f32> = (0..12).map(|i| 1.0 + i as f32).collect();
        let (s, zp) = ([0.1f32, 0.2, 0.05], [0.0f32, 1.0, -3.0]);
        for axis in [0usize, 1] {
            let (ss, zz): (Vec<f32>, Vec<f32>) = if axis == 0 {
                (s.to_vec(), zp.to_vec())
            } else {
                (
                    [0.1f32, 0.2, 0.05, 0.3].to_vec(),
                    [0.0f32, 1.0, -3.0, 2.0].to_vec(),
                )
            };
            let k = LearnableGrad::new(&shape, Some(axis), &ss, &zz, -8, 7, 1.0, true).unwrap();
            let (dx, ds, dz) = k.run(&x, &dy).unwrap();
            for i in 0..12 {
                let c = if axis == 0 { i / 4 } else { i % 4 };
                let want = reference(x[i], dy[i], ss[c], zz[c], -8, 7, 1.0, true);
                assert_eq!(
                    (dx[i].to_bits(), ds[i].to_bits(), dz[i].to_bits()),
                    (want.0.to_bits(), want.1.to_bits(), want.2.to_bits())
                );
            }
        }
    }

    #[test]
    fn bad_parameters_are_errors() {
        assert!(LearnableGrad::new(&[4], None, &[0.0], &[0.0], -8, 7, 1.0, false).is_err());
        assert!(LearnableGrad::new(&[4], None, &[1.0], &[9.0], -8, 7, 1.0, false).is_err());
        assert!(LearnableGrad::new(&[4], None, &[1.0], &[0.0], 1, 7, 1.0, false).is_err());
        assert!(LearnableGrad::new(&[4], Some(1), &[1.0], &[0.0], -8, 7, 1.0, false).is_err());
        assert!(LearnableGrad::new(&[4, 2], Some(1), &[1.0], &[0.0], -8, 7, 1.0, false).is_err());
        let k = LearnableGrad::new(&[4], None, &[1.0], &[0.0], -8, 7, 1.0, false).unwrap();
        assert!(k.run(&[0.0; 4], &[0.0; 3]).is_err());
        assert!(k.run(&[0.0; 4], &[0.0; 4]).is_ok());
    }
}

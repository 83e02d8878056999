//! A GGUF tensor as lowbit holds it: a `QuantizedTensor` with GGML's codes and scales, or the
//! float32 values `gguf.quants.dequantize` gives.
//!
//! | GGML   | QuantizedTensor                                                     |
//! |--------|---------------------------------------------------------------------|
//! | Q8_0   | 8-bit symmetric (int8 codes), groups of 32, zero point 0            |
//! | Q4_0   | 4-bit asymmetric (codes 0..15), groups of 32, zero point 8 (or 7)   |
//! | TQ1_0, TQ2_0 | 2-bit symmetric, codes -1/0/1, groups of 256, zero point 0    |
//!
//! Both sides compute one float32 product, `float(code - zero point) * scale` against gguf's
//! `float(q - offset) * float(d)`, so they agree bit for bit wherever `scale = d`. A
//! QuantizedTensor's scales are positive, so a block with a negative `d` is stored with its codes
//! negated (`-q * -d` is the same float; Q4_0's codes `15 - q` with zero point 7 do that within
//! 0..15), and a block of `d = ±0` (all its values zero) as codes at the zero point with scale 1.
//! The one difference no positive scale can avoid is the sign of zero: where gguf multiplies a
//! zero code by a negative `d` (or any code by `d = -0`) it gives `-0.0`, the QuantizedTensor
//! `+0.0`. Q8_0 and the ternary types never write a negative `d` (theirs is `amax / 127` and
//! `amax`), so their tensors are bit-exact; Q4_0's `d` is `-max / 8` with `max` the element of
//! largest magnitude, negative for about half the blocks. `Loaded::exact` tells, and
//! `dequantize` of the raw bytes gives gguf's values bit for bit in every case. A block whose
//! `d` is NaN or infinite, or a TQ2_0 code 3 beside a positive `d` (a value outside the ternary
//! range), makes the tensor come back as those float32 values.
use super::codec::{block_codes, dequantize, Codec};
use super::parse::{Gguf, TensorInfo};
use crate::quant::spec::{Granularity, QuantSpec, QuantizedTensor};
use crate::quant::{pack, QRange};
use crate::{Error, Result};
use ndarray::{ArrayD, IxDyn};
use rayon::prelude::*;

/// Blocks per parallel task.
const PAR: usize = 1024;

/// A GGUF tensor in lowbit's terms.
#[derive(Clone, Debug)]
#[allow(clippy::large_enum_variant)] // one per tensor; boxing buys nothing
pub enum Loaded {
    /// `exact`: its dequantize equals gguf's values bit for bit (else up to the sign of zero).
    Quantized {
        tensor: QuantizedTensor,
        exact: bool,
    },
    Float(ArrayD<f32>),
}

impl Loaded {
    /// The float32 values (`gguf.quants.dequantize`'s).
    pub fn values(&self) -> Result<ArrayD<f32>> {
        match self {
            Loaded::Quantized { tensor, .. } => tensor.dequantize(),
            Loaded::Float(a) => Ok(a.clone()),
        }
    }
}

/// The QuantSpec lowbit uses for a GGML block type, and the zero point of blocks with a
/// positive and a negative `d`.
fn spec_of(c: Codec) -> Option<(QuantSpec, i32, i32)> {
    let g = |bits, symmetric, group| {
        QuantSpec::new(bits, symmetric, Granularity::Group, -1, Some(group)).expect("valid spec")
    };
    Some(match c {
        Codec::Q8_0 => (g(8, true, 32), 0, 0),
        Codec::Q4_0 => (g(4, false, 32), 8, 7),
        Codec::TQ1_0 | Codec::TQ2_0 => (g(2, true, 256), 0, 0),
        _ => return None,
    })
}

/// Codes (as offsets from the range's minimum), scale and zero point for one block, or None when
/// no positive scale gives its values (up to the sign of zero).
fn block(q: &[i8], d: f32, r: QRange, zp: (i32, i32), off: &mut [u8]) -> Option<(f32, i32)> {
    let (sign, scale, z) = if d.is_finite() && d > 0.0 {
        (1, d, zp.0)
    } else if d.is_finite() && d < 0.0 {
        (-1, -d, zp.1)
    } else if d == 0.0 {
        (0, 1.0, zp.0)
    } else {
        return None;
    };
    for (o, &v) in off.iter_mut().zip(q) {
        let c = z + sign * v as i32;
        if c < r.min || c > r.max {
            return None;
        }
        *o = (c - r.min) as u8;
    }
    Some((scale, z))
}

/// Tensor `t` of `g` as a QuantizedTensor where one holds it exactly (see the module docs),
/// else as its float32 values; types lowbit has no codec for are a `Format` error naming it.
pub fn to_lowbit(g: &Gguf<'_>, t: &TensorInfo) -> Result<Loaded> {
    let c = Codec::of(t.ty).ok_or_else(|| {
        Error::format(format!(
            "tensor {:?} has GGML type {}, which lowbit does not decode (it reads {})",
            t.name,
            t.ty.name,
            Codec::NAMES.join(", ")
        ))
    })?;
    let bytes = g.data(t);
    let shape = t.shape();
    let float = || -> Result<Loaded> {
        let v = dequantize(bytes, t.ty)?;
        Ok(Loaded::Float(
            ArrayD::from_shape_vec(IxDyn(&shape), v).map_err(|e| Error::format(e.to_string()))?,
        ))
    };
    let Some((spec, zp_pos, zp_neg)) = spec_of(c) else {
        return float();
    };
    let r = spec.range();
    let n = t.numel();
    let nblocks = n / t.ty.block;
    let mut offsets = vec![0u8; n];
    let mut scales = vec![0f32; nblocks];
    let mut zps = vec![0i32; nblocks];
    // Each task converts PAR blocks; None when one of them has no QuantizedTensor form.
    let exact = offsets
        .par_chunks_mut(t.ty.block * PAR)
        .zip(bytes.par_chunks(t.ty.size * PAR))
        .zip(scales.par_chunks_mut(PAR).zip(zps.par_chunks_mut(PAR)))
        .map(|((off, bs), (ss, zs))| {
            let mut q = vec![0i8; t.ty.block];
            let mut exact = true;
            for (i, (b, off)) in bs
                .chunks_exact(t.ty.size)
                .zip(off.chunks_exact_mut(t.ty.block))
                .enumerate()
            {
                let d = block_codes(c, b, &mut q);
                // where gguf's product is -0.0: zero times a negative d, a negative code times
                // +0, a non-negative code times -0
                exact &= match (d == 0.0, d.is_sign_negative()) {
                    (false, false) => true,
                    (false, true) => !q.contains(&0),
                    (true, false) => q.iter().all(|&v| v >= 0),
                    (true, true) => q.iter().all(|&v| v < 0),
                };
                (ss[i], zs[i]) = block(&q, d, r, (zp_pos, zp_neg), off)?;
            }
            Some(exact)
        })
        .try_reduce(|| true, |a, b| Some(a && b));
    let Some(exact) = exact else {
        return float();
    };
    let qshape = spec.qparams_shape(&shape)?;
    let err = |e: ndarray::ShapeError| Error::format(format!("tensor {:?}: {e}", t.name));
    let qt = QuantizedTensor {
        spec,
        shape: shape.clone(),
        codes: pack::pack(&offsets, spec.bits)?,
        scales: ArrayD::from_shape_vec(IxDyn(&qshape), scales).map_err(err)?,
        zero_points: ArrayD::from_shape_vec(IxDyn(&qshape), zps).map_err(err)?,
    };
    qt.validate()?;
    Ok(Loaded::Quantized { tensor: qt, exact })
}

#[cfg(test)]
mod tests {
    use super::super::parse::{parse, tests::file};
    use super::super::{quantize, GgmlType};
    use super::*;

    fn load(name: &str, dims: &[u64], x: &[f32]) -> (Loaded, Vec<f32>) {
        let ty = GgmlType::from_name(name).unwrap();
        let data = quantize(x, ty, "x").unwrap();
        let want = dequantize(&data, ty).unwrap();
        let b = file(&[], &[("t", dims, ty.id, data)]);
        let g = parse(&b).unwrap();
        (to_lowbit(&g, &g.tensors[0]).unwrap(), want)
    }

    fn same_bits(a: &ArrayD<f32>, b: &[f32]) -> bool {
        a.len() == b.len() && a.iter().zip(b).all(|(x, y)| x.to_bits() == y.to_bits())
    }

    #[test]
    fn block_types_load_as_exact_quantized_tensors() {
        let x: Vec<f32> = (0..1024)
            .map(|i| ((i * 7919 % 1013) as f32 / 1013.0 - 0.5) * (1 + i % 5) as f32)
            .collect();
        for name in ["Q8_0", "Q4_0", "TQ1_0", "TQ2_0"] {
            let (l, want) = load(name, &[256, 4], &x);
            let Loaded::Quantized { tensor: q, exact } = &l else {
                panic!("{name} came back as floats")
            };
            assert_eq!(q.shape, vec![4, 256]);
            let got = q.dequantize().unwrap();
            assert_eq!(*exact, same_bits(&got, &want), "{name}");
            assert_eq!(*exact, name != "Q4_0", "{name}");
            assert!(got.iter().zip(&want).all(|(a, b)| a == b), "{name}");
        }
        // zero blocks stay quantized (Q4_0's has d = -0, so its values are gguf's -0.0)
        let mut z = x.clone();
        z[..256].fill(0.0);
        for name in ["Q8_0", "TQ2_0", "Q4_0"] {
            let (l, want) = load(name, &[1024], &z);
            assert!(matches!(l, Loaded::Quantized { exact, .. } if exact == (name != "Q4_0")));
            assert!(l.values().unwrap().iter().zip(&want).all(|(a, b)| a == b));
        }
        // a non-finite d: float values
        let ty = GgmlType::from_name("Q8_0").unwrap();
        let mut data = quantize(&x[..32], ty, "x").unwrap();
        data[..2].copy_from_slice(&0x7e00u16.to_le_bytes());
        let b = file(&[], &[("t", &[32], ty.id, data.clone())]);
        let g = parse(&b).unwrap();
        let l = to_lowbit(&g, &g.tensors[0]).unwrap();
        assert!(matches!(l, Loaded::Float(_)));
        assert!(l.values().unwrap().iter().all(|v| v.is_nan()));
    }

    /// Tensors of many parallel tasks, one of them with a block no QuantizedTensor holds.
    #[test]
    fn large_tensors_convert_in_parallel() {
        let x: Vec<f32> = (0..32 * 2500)
            .map(|i| ((i * 7919 % 1013) as f32) - 506.0)
            .collect();
        let (l, want) = load("Q8_0", &[32, 2500], &x);
        assert!(matches!(&l, Loaded::Quantized { exact: true, .. }));
        assert!(same_bits(&l.values().unwrap(), &want));
        let ty = GgmlType::from_name("Q8_0").unwrap();
        let mut data = quantize(&x, ty, "x").unwrap();
        data[34 * 2100..34 * 2100 + 2].copy_from_slice(&0x7c00u16.to_le_bytes()); // d = inf
        let b = file(&[], &[("t", &[32, 2500], ty.id, data.clone())]);
        let g = parse(&b).unwrap();
        let l = to_lowbit(&g, &g.tensors[0]).unwrap();
        assert!(matches!(l, Loaded::Float(_)));
        assert!(same_bits(
            &l.values().unwrap(),
            &dequantize(&data, ty).unwrap()
        ));
    }

    #[test]
    fn float_types_and_unsupported_types() {
        let (l, want) = load("F16", &[3], &[1.0, -2.5, 1e-7]);
        assert!(matches!(l, Loaded::Float(_)) && same_bits(&l.values().unwrap(), &want));
        let b = file(&[], &[("k", &[256], 12, vec![0; 144])]);
        let g = parse(&b).unwrap();
        let e = to_lowbit(&g, &g.tensors[0]).unwrap_err().to_string();
        assert!(e.contains("\"k\"") && e.contains("Q4_K"), "{e}");
    }
}

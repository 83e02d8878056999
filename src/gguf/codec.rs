//! GGML's block codecs, float32 in and out, equal to `gguf.quants` (`gguf-py`, the reference):
//!
//! | type  | block | bytes | layout                                                   | value        |
//! |-------|-------|-------|----------------------------------------------------------|--------------|
//! | Q8_0  | 32    | 34    | f16 d, 32 × i8 q                                          | `q * d`      |
//! | Q4_0  | 32    | 18    | f16 d, 16 bytes: element j low nibble, j+16 high nibble  | `(q - 8) * d`|
//! | TQ2_0 | 256   | 66    | 64 bytes of 2-bit q (byte 32c+m, bits 2l: element 128c+32l+m), f16 d | `(q - 1) * d` |
//! | TQ1_0 | 256   | 54    | 48 bytes of 5 trits + 4 bytes of 4 trits (base 3, scaled to 256), f16 d | `(q - 1) * d` |
//!
//! Quantizing follows `gguf.quants` operation by operation in float32 (`d` rounded to f16 to
//! nearest even; Q8_0 and the ternary types round `x * (1/d)` half away from zero, Q4_0 truncates
//! `x * (1/d) + 8.5`). Where that reference converts NaN or infinity to an integer (NaN or ±Inf
//! in the input, or a block so close to zero that `1/d` overflows to infinity) its result is
//! undefined behaviour in C and in NumPy, so lowbit refuses the input with a `Value` error.
use super::GgmlType;
use crate::{Error, Result};
use half::f16;
use rayon::prelude::*;

/// The types lowbit encodes and decodes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Codec {
    F32,
    F16,
    BF16,
    Q8_0,
    Q4_0,
    TQ1_0,
    TQ2_0,
}

impl Codec {
    pub const NAMES: &'static [&'static str] =
        &["F32", "F16", "BF16", "Q8_0", "Q4_0", "TQ1_0", "TQ2_0"];

    pub fn of(t: GgmlType) -> Option<Codec> {
        Some(match t.name {
            "F32" => Codec::F32,
            "F16" => Codec::F16,
            "BF16" => Codec::BF16,
            "Q8_0" => Codec::Q8_0,
            "Q4_0" => Codec::Q4_0,
            "TQ1_0" => Codec::TQ1_0,
            "TQ2_0" => Codec::TQ2_0,
            _ => return None,
        })
    }
}

fn codec(t: GgmlType) -> Result<Codec> {
    Codec::of(t).ok_or_else(|| {
        Error::value(format!(
            "lowbit has no codec for GGML type {}: it handles {}",
            t.name,
            Codec::NAMES.join(", ")
        ))
    })
}

/// float16 bits to float32 as NumPy's `astype(np.float32)` does: exact, NaN payloads kept.
pub fn f16_to_f32(h: u16) -> f32 {
    if h & 0x7c00 == 0x7c00 && h & 0x03ff != 0 {
        let sign = (h as u32 & 0x8000) << 16;
        f32::from_bits(sign | 0x7f80_0000 | ((h as u32 & 0x03ff) << 13))
    } else {
        f16::from_bits(h).to_f32()
    }
}

/// float32 to float16 bits as NumPy's `astype(np.float16)` does: round to nearest even,
/// overflow to infinity, a NaN keeps its sign and top payload bits (and stays a NaN).
pub fn f32_to_f16(x: f32) -> u16 {
    if x.is_nan() {
        let b = x.to_bits();
        let sign = ((b >> 16) & 0x8000) as u16;
        let mut h = 0x7c00 | ((b & 0x007f_ffff) >> 13) as u16;
        if h == 0x7c00 {
            h += 1;
        }
        sign | h
    } else {
        f16::from_f32(x).to_bits()
    }
}

/// float32 to bfloat16 bits as `gguf.quants.BF16` (ggml's `ggml_compute_fp32_to_bf16`): NaN
/// made quiet, then round to nearest even on the bits.
pub fn f32_to_bf16(x: f32) -> u16 {
    let mut n = x.to_bits();
    if n & 0x7fff_ffff > 0x7f80_0000 {
        n = (n & 0xffff_0000) | (64 << 16);
    }
    ((n as u64 + (0x7fff + ((n >> 16) & 1)) as u64) >> 16) as u16
}

/// `abs(block).max()` (only called on finite blocks).
fn amax(b: &[f32]) -> f32 {
    b.iter().fold(0.0f32, |m, &v| m.max(v.abs()))
}

/// `np.where(d == 0, 0, 1 / d)`, refusing the block where `1 / d` overflows (see the module docs).
fn inverse(d: f32, what: &str, block: usize) -> Result<f32> {
    if d == 0.0 {
        return Ok(0.0);
    }
    let id = 1.0 / d;
    if id.is_infinite() {
        return Err(Error::value(format!(
            "{what}: block {block} is too close to zero for GGML's scale (1/d overflows float32; \
             the reference quantizer would convert infinity to an integer)"
        )));
    }
    Ok(id)
}

fn put_d(out: &mut [u8], d: f32) {
    out.copy_from_slice(&f32_to_f16(d).to_le_bytes());
}

fn q8_0(x: &[f32], out: &mut [u8], what: &str, i: usize) -> Result<()> {
    let d = amax(x) / 127.0;
    let id = inverse(d, what, i)?;
    put_d(&mut out[..2], d);
    for (o, &v) in out[2..].iter_mut().zip(x) {
        *o = (v * id).round() as i8 as u8;
    }
    Ok(())
}

fn q4_0(x: &[f32], out: &mut [u8], what: &str, i: usize) -> Result<()> {
    // the first element of largest magnitude, with its sign (NumPy's argmax of abs)
    let mut max = x[0];
    for &v in &x[1..] {
        if v.abs() > max.abs() {
            max = v;
        }
    }
    let d = max / -8.0;
    let id = inverse(d, what, i)?;
    put_d(&mut out[..2], d);
    let q = |v: f32| ((v * id + 8.5).trunc() as u8).min(15);
    for j in 0..16 {
        out[2 + j] = q(x[j]) | (q(x[j + 16]) << 4);
    }
    Ok(())
}

/// Ternary codes `round(x / amax) + 1` in {0, 1, 2} and `d = amax`.
fn trits(x: &[f32], t: &mut [u8; 256], what: &str, i: usize) -> Result<f32> {
    let d = amax(x);
    let id = inverse(d, what, i)?;
    for (t, &v) in t.iter_mut().zip(x) {
        *t = ((v * id).round() as i8 + 1) as u8;
    }
    Ok(d)
}

fn tq2_0(x: &[f32], out: &mut [u8], what: &str, i: usize) -> Result<()> {
    let mut t = [0u8; 256];
    let d = trits(x, &mut t, what, i)?;
    for c in 0..2 {
        for m in 0..32 {
            let mut b = 0u8;
            for l in 0..4 {
                b |= t[128 * c + 32 * l + m] << (2 * l);
            }
            out[32 * c + m] = b;
        }
    }
    put_d(&mut out[64..66], d);
    Ok(())
}

const POW3: [u8; 5] = [1, 3, 9, 27, 81];

/// `ceil(v * 256 / 243)`: the base-3 number `v` (5 trits) as a fraction of a byte, so that
/// `(byte * 3^k mod 256) * 3 >> 8` reads trit k back.
fn trit_byte(v: u16) -> u8 {
    (v * 256).div_ceil(243) as u8
}

fn tq1_0(x: &[f32], out: &mut [u8], what: &str, i: usize) -> Result<()> {
    let mut t = [0u8; 256];
    let d = trits(x, &mut t, what, i)?;
    // (first element, stride, bytes, trits per byte) of the three parts
    for (base, stride, at, n) in [(0, 32, 0, 5), (160, 16, 32, 5), (240, 4, 48, 4)] {
        for m in 0..stride {
            let v: u16 = (0..n)
                .map(|k| t[base + k * stride + m] as u16 * POW3[4 - k] as u16)
                .sum();
            out[at + m] = trit_byte(v);
        }
    }
    put_d(&mut out[52..54], d);
    Ok(())
}

/// Blocks per parallel task.
const PAR_BLOCKS: usize = 1024;

/// Quantizes `x` (a whole number of blocks, row after row) to `ty`'s bytes, as
/// `gguf.quants.quantize` does. `what` names the input in errors.
pub fn quantize(x: &[f32], ty: GgmlType, what: &str) -> Result<Vec<u8>> {
    let c = codec(ty)?;
    if !x.len().is_multiple_of(ty.block) {
        return Err(Error::value(format!(
            "{what}: {} elements are not a whole number of {}-element {} blocks",
            x.len(),
            ty.block,
            ty.name
        )));
    }
    match c {
        Codec::F32 => return Ok(x.iter().flat_map(|v| v.to_le_bytes()).collect()),
        Codec::F16 => {
            return Ok(x
                .iter()
                .flat_map(|v| f32_to_f16(*v).to_le_bytes())
                .collect())
        }
        Codec::BF16 => {
            return Ok(x
                .iter()
                .flat_map(|v| f32_to_bf16(*v).to_le_bytes())
                .collect())
        }
        _ => {}
    }
    if let Some(i) = x.iter().position(|v| !v.is_finite()) {
        return Err(Error::value(format!(
            "{what}: element {i} is {}; GGML's reference quantizer converts it to an integer with \
             undefined behaviour, so lowbit refuses non-finite values for {}",
            x[i], ty.name
        )));
    }
    let block: fn(&[f32], &mut [u8], &str, usize) -> Result<()> = match c {
        Codec::Q8_0 => q8_0,
        Codec::Q4_0 => q4_0,
        Codec::TQ1_0 => tq1_0,
        _ => tq2_0,
    };
    let nblocks = x.len() / ty.block;
    let mut out = vec![0u8; nblocks * ty.size];
    out.par_chunks_mut(ty.size * PAR_BLOCKS)
        .zip(x.par_chunks(ty.block * PAR_BLOCKS))
        .enumerate()
        .try_for_each(|(task, (o, xs))| {
            for (j, (ob, xb)) in o.chunks_mut(ty.size).zip(xs.chunks(ty.block)).enumerate() {
                block(xb, ob, what, task * PAR_BLOCKS + j)?;
            }
            Ok(())
        })?;
    Ok(out)
}

fn d_at(b: &[u8], at: usize) -> f32 {
    f16_to_f32(u16::from_le_bytes([b[at], b[at + 1]]))
}

fn tq1_trit(v: u8) -> i8 {
    ((v as u16 * 3) >> 8) as i8 - 1
}

/// The scale `d` of block `b` and its signed integer codes `q` (the value of element i is
/// `q[i] * d`: `q` is the stored code less the type's offset, 8 for Q4_0, 1 for the ternary types).
pub(crate) fn block_codes(c: Codec, b: &[u8], q: &mut [i8]) -> f32 {
    match c {
        Codec::Q8_0 => {
            for (q, &v) in q.iter_mut().zip(&b[2..34]) {
                *q = v as i8;
            }
            d_at(b, 0)
        }
        Codec::Q4_0 => {
            for j in 0..16 {
                q[j] = (b[2 + j] & 15) as i8 - 8;
                q[j + 16] = (b[2 + j] >> 4) as i8 - 8;
            }
            d_at(b, 0)
        }
        Codec::TQ2_0 => {
            for c in 0..2 {
                for l in 0..4 {
                    for m in 0..32 {
                        q[128 * c + 32 * l + m] = ((b[32 * c + m] >> (2 * l)) & 3) as i8 - 1;
                    }
                }
            }
            d_at(b, 64)
        }
        Codec::TQ1_0 => {
            for (base, stride, at, n) in [(0, 32, 0, 5), (160, 16, 32, 5), (240, 4, 48, 4)] {
                for k in 0..n {
                    for m in 0..stride {
                        q[base + k * stride + m] = tq1_trit(b[at + m].wrapping_mul(POW3[k]));
                    }
                }
            }
            d_at(b, 52)
        }
        Codec::F32 | Codec::F16 | Codec::BF16 => unreachable!("float types have no blocks"),
    }
}

fn dequantize_block(c: Codec, b: &[u8], o: &mut [f32]) {
    let mut q = [0i8; 256];
    let q = &mut q[..o.len()];
    let d = block_codes(c, b, q);
    // gguf-py: float32(code) * float32(d), one rounding (the order of a product is immaterial)
    for (o, &q) in o.iter_mut().zip(q.iter()) {
        *o = q as f32 * d;
    }
}

/// Decodes `bytes` (whole blocks of `ty`) to float32, as `gguf.quants.dequantize` does.
pub fn dequantize(bytes: &[u8], ty: GgmlType) -> Result<Vec<f32>> {
    let c = codec(ty)?;
    if !bytes.len().is_multiple_of(ty.size) {
        return Err(Error::value(format!(
            "{} bytes are not a whole number of {}-byte {} blocks",
            bytes.len(),
            ty.size,
            ty.name
        )));
    }
    match c {
        Codec::F32 => {
            return Ok(bytes
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                .collect())
        }
        Codec::F16 => {
            return Ok(bytes
                .chunks_exact(2)
                .map(|b| f16_to_f32(u16::from_le_bytes([b[0], b[1]])))
                .collect())
        }
        Codec::BF16 => {
            return Ok(bytes
                .chunks_exact(2)
                .map(|b| f32::from_bits((u16::from_le_bytes([b[0], b[1]]) as u32) << 16))
                .collect())
        }
        _ => {}
    }
    let nblocks = bytes.len() / ty.size;
    let mut out = vec![0f32; nblocks * ty.block];
    out.par_chunks_mut(ty.block * PAR_BLOCKS)
        .zip(bytes.par_chunks(ty.size * PAR_BLOCKS))
        .for_each(|(o, bs)| {
            for (ob, b) in o.chunks_mut(ty.block).zip(bs.chunks(ty.size)) {
                dequantize_block(c, b, ob);
            }
        });
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ty(name: &str) -> GgmlType {
        GgmlType::from_name(name).unwrap()
    }

    fn ramp(n: usize) -> Vec<f32> {
        (0..n)
            .map(|i| ((i * 37 % 101) as f32 - 50.0) * 0.013)
            .collect()
    }

    /// Every ternary code survives the byte layouts, at every position of a block.
    #[test]
    fn ternary_layouts_round_trip_codes() {
        for name in ["TQ1_0", "TQ2_0"] {
            let x: Vec<f32> = (0..512).map(|i| ((i * 7 % 3) as f32 - 1.0) * 0.5).collect();
            let b = quantize(&x, ty(name), "x").unwrap();
            assert_eq!(b.len(), 2 * ty(name).size);
            assert_eq!(dequantize(&b, ty(name)).unwrap(), x, "{name}");
        }
    }

    #[test]
    fn q8_0_and_q4_0_are_close_and_laid_out_as_documented() {
        let x = ramp(64);
        let q8 = dequantize(&quantize(&x, ty("Q8_0"), "x").unwrap(), ty("Q8_0")).unwrap();
        let q4 = dequantize(&quantize(&x, ty("Q4_0"), "x").unwrap(), ty("Q4_0")).unwrap();
        for i in 0..64 {
            assert!((q8[i] - x[i]).abs() <= 0.65 / 127.0 * 0.51 + 1e-3, "{i}");
            assert!((q4[i] - x[i]).abs() <= 0.65 / 8.0 + 1e-3, "{i}");
        }
        // Q4_0: element 0 in the low nibble of byte 2, element 16 in its high nibble
        let mut one = [0f32; 32];
        one[16] = -1.0; // max magnitude, negative: d = 1/8, q = 0
        let b = quantize(&one, ty("Q4_0"), "x").unwrap();
        assert_eq!(f16_to_f32(u16::from_le_bytes([b[0], b[1]])), 0.125);
        assert_eq!(b[2], 0x08);
        assert_eq!(b[3], 0x88);
    }

    #[test]
    fn refuses_what_the_reference_leaves_undefined() {
        let mut x = vec![0.5f32; 32];
        x[3] = f32::NAN;
        let e = quantize(&x, ty("Q8_0"), "w").unwrap_err().to_string();
        assert!(e.contains("element 3"), "{e}");
        let tiny = vec![1e-40f32; 256];
        let e = quantize(&tiny, ty("TQ2_0"), "w").unwrap_err().to_string();
        assert!(e.contains("block 0"), "{e}");
        assert!(quantize(&[0.0; 31], ty("Q8_0"), "w").is_err());
        assert!(dequantize(&[0; 33], ty("Q8_0")).is_err());
        assert!(GgmlType::from_name("Q4_K").is_err());
        // floats pass NaN through
        assert!(quantize(&[f32::NAN], ty("F16"), "w").is_ok());
    }

    #[test]
    fn float_conversions() {
        assert_eq!(f32_to_f16(65520.0), 0x7c00); // rounds to infinity
        assert_eq!(f32_to_f16(-0.0), 0x8000);
        assert_eq!(f16_to_f32(0x0001), 2f32.powi(-24));
        assert_eq!(f16_to_f32(0x7c01).to_bits(), 0x7f80_2000); // payload kept
        assert_eq!(f32_to_bf16(1.0 + 2f32.powi(-8)), 0x3f80); // tie to even
        assert_eq!(f32_to_bf16(f32::from_bits(0x7f80_0001)), 0x7fc0);
    }
}

//! Bit packing of unsigned codes: a little-endian bit stream, code `i` in bits
//! `[i*bits, (i+1)*bits)` counted from the least significant bit of byte 0.
//! For 1, 2 and 4 bits this is the usual "first code in the low bits" byte layout.
use crate::{ensure, Result};

/// Bytes needed for `n` codes of `bits` bits (`usize::MAX` when that does not fit a `usize`,
/// so that a length read from a file never matches it).
pub fn packed_len(n: usize, bits: u32) -> usize {
    // ceil(n * bits / 8) without forming n * bits, which overflows for huge claimed sizes
    (n / 8)
        .saturating_mul(bits as usize)
        .saturating_add((n % 8 * bits as usize).div_ceil(8))
}

/// Packs codes `< 2^bits` (`1 <= bits <= 8`). Codes with higher bits set are an error.
pub fn pack(codes: &[u8], bits: u32) -> Result<Vec<u8>> {
    ensure!(
        (1..=8).contains(&bits),
        "bits must be between 1 and 8, got {bits}"
    );
    if bits < 8 {
        let limit = 1u16 << bits;
        if let Some(i) = codes.iter().position(|&c| c as u16 >= limit) {
            return Err(crate::Error::value(format!(
                "code {} at index {i} does not fit in {bits} bits",
                codes[i]
            )));
        }
    }
    Ok(pack_unchecked(codes, bits))
}

/// Codes per parallel task: a multiple of 8, so every task starts on a byte boundary.
const PAR: usize = 1 << 16;

/// `pack` without the range check, in parallel.
pub(crate) fn pack_unchecked(codes: &[u8], bits: u32) -> Vec<u8> {
    use rayon::prelude::*;
    let mut out = vec![0u8; packed_len(codes.len(), bits)];
    out.par_chunks_mut(PAR / 8 * bits as usize)
        .zip(codes.par_chunks(PAR))
        .for_each(|(o, c)| pack_into(c, bits, o));
    out
}

fn pack_into(codes: &[u8], bits: u32, out: &mut [u8]) {
    match bits {
        8 => out.copy_from_slice(codes),
        4 => pack_fixed::<4>(codes, out),
        2 => pack_fixed::<2>(codes, out),
        1 => pack_fixed::<1>(codes, out),
        _ => {
            let (mut acc, mut nacc, mut w) = (0u64, 0u32, 0usize);
            for &c in codes {
                acc |= (c as u64) << nacc;
                nacc += bits;
                while nacc >= 8 {
                    out[w] = acc as u8;
                    w += 1;
                    acc >>= 8;
                    nacc -= 8;
                }
            }
            if nacc > 0 {
                out[w] = acc as u8;
            }
        }
    }
}

/// Byte-aligned widths: `8 / BITS` codes per byte, first code in the low bits.
fn pack_fixed<const BITS: usize>(codes: &[u8], out: &mut [u8]) {
    let per = 8 / BITS;
    let full = codes.chunks_exact(per);
    let rest = full.remainder();
    for (o, c) in out.iter_mut().zip(full) {
        let mut b = 0u8;
        for (j, &v) in c.iter().enumerate() {
            b |= v << (j * BITS);
        }
        *o = b;
    }
    if !rest.is_empty() {
        let b = rest
            .iter()
            .enumerate()
            .fold(0u8, |a, (j, &v)| a | (v << (j * BITS)));
        out[codes.len() / per] = b;
    }
}

/// Unpacks `n` codes of `bits` bits; `packed` must hold exactly `packed_len(n, bits)` bytes.
pub fn unpack(packed: &[u8], bits: u32, n: usize) -> Result<Vec<u8>> {
    ensure!(
        (1..=8).contains(&bits),
        "bits must be between 1 and 8, got {bits}"
    );
    let want = packed_len(n, bits);
    ensure!(
        packed.len() == want,
        "{n} codes of {bits} bits take {want} bytes, got {}",
        packed.len()
    );
    use rayon::prelude::*;
    let mut out = vec![0u8; n];
    out.par_chunks_mut(PAR)
        .zip(packed.par_chunks(PAR / 8 * bits as usize))
        .for_each(|(o, p)| unpack_into(p, bits, o));
    Ok(out)
}

fn unpack_into(packed: &[u8], bits: u32, out: &mut [u8]) {
    let mask = ((1u16 << bits) - 1) as u8;
    match bits {
        8 => out.copy_from_slice(packed),
        1 | 2 | 4 => {
            let per = (8 / bits) as usize;
            for (chunk, &b) in out.chunks_mut(per).zip(packed) {
                for (j, o) in chunk.iter_mut().enumerate() {
                    *o = (b >> (j * bits as usize)) & mask;
                }
            }
        }
        _ => {
            let (mut acc, mut nacc, mut r) = (0u64, 0u32, 0usize);
            for o in out.iter_mut() {
                while nacc < bits {
                    acc |= (packed[r] as u64) << nacc;
                    r += 1;
                    nacc += 8;
                }
                *o = acc as u8 & mask;
                acc >>= bits;
                nacc -= bits;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_every_width_and_length() {
        for bits in 1..=8u32 {
            for n in [0usize, 1, 2, 3, 7, 8, 9, 63, 64, 65, 1000] {
                let codes: Vec<u8> = (0..n)
                    .map(|i| ((i * 2654435761) >> 7) as u8 & ((1u16 << bits) - 1) as u8)
                    .collect();
                let p = pack(&codes, bits).unwrap();
                assert_eq!(p.len(), packed_len(n, bits));
                assert_eq!(unpack(&p, bits, n).unwrap(), codes);
            }
        }
    }

    #[test]
    fn layout_is_lsb_first() {
        assert_eq!(pack(&[1, 2, 3, 0], 2).unwrap(), vec![0b00_11_10_01]);
        assert_eq!(pack(&[0xA, 0x5], 4).unwrap(), vec![0x5A]);
        // 3-bit stream: 0b101, 0b011, 0b111 -> bits 101 011 111 (LSB first) = 0b1_011_101, 0b11
        assert_eq!(pack(&[5, 3, 7], 3).unwrap(), vec![0b1101_1101, 0b1]);
    }

    #[test]
    fn rejects_wide_codes_and_wrong_lengths() {
        assert!(pack(&[4], 2).is_err());
        assert!(unpack(&[0, 0, 0], 4, 3).is_err());
        assert!(pack(&[0], 0).is_err());
    }

    #[test]
    fn huge_claimed_lengths_are_refused() {
        assert_eq!(packed_len(usize::MAX, 8), usize::MAX);
        assert_eq!(packed_len(usize::MAX, 1), usize::MAX.div_ceil(8));
        assert!(unpack(&[0; 8], 8, usize::MAX).is_err());
    }
}

//! Row-wise packing along the last axis: each row starts on a byte boundary.
//!
//! * `bits` = 1, 2, 4 (or any width 1..8): code `i` of a row in bits `[i*bits, (i+1)*bits)`,
//!   least significant bit first (`quant::pack`'s layout, applied per row).
//! * `tq1`: ternary codes as base-3 digits, five per byte: `byte = Σ_j (code_j + 1) 3^j` for
//!   the codes `5i .. 5i+5` of the row (j = 0 first); a short last group is padded with code 0.
use crate::quant::pack::{pack, packed_len, unpack};
use crate::{ensure, Result};
use ndarray::{Array2, ArrayView2};
use rayon::prelude::*;

fn rows_of(a: &ArrayView2<'_, u8>) -> Vec<Vec<u8>> {
    a.outer_iter().map(|r| r.to_vec()).collect()
}

/// Packs unsigned codes (< 2^bits) row by row.
pub fn pack_rows(codes: ArrayView2<'_, u8>, bits: u32) -> Result<Array2<u8>> {
    let (n, k) = codes.dim();
    let width = packed_len(k, bits);
    let rows: Vec<Vec<u8>> = rows_of(&codes)
        .par_iter()
        .map(|r| pack(r, bits))
        .collect::<Result<_>>()?;
    Ok(
        Array2::from_shape_vec((n, width), rows.concat())
            .expect("each row packs to the same width"),
    )
}

/// Refuses `n` rows of `k` codes when they cannot make one array (a size claimed by a file).
fn check_rows(n: usize, k: usize) -> Result<()> {
    let max = isize::MAX as usize;
    ensure!(
        k <= max && n.checked_mul(k).is_some_and(|t| t <= max),
        "{n} rows of {k} codes are too many for one array"
    );
    Ok(())
}

/// Unpacks `k` codes per row.
pub fn unpack_rows(packed: ArrayView2<'_, u8>, bits: u32, k: usize) -> Result<Array2<u8>> {
    let n = packed.nrows();
    check_rows(n, k)?;
    let rows: Vec<Vec<u8>> = rows_of(&packed)
        .par_iter()
        .map(|r| unpack(r, bits, k))
        .collect::<Result<_>>()?;
    Ok(Array2::from_shape_vec((n, k), rows.concat()).expect("each row unpacks to k codes"))
}

/// Ternary codes (-1, 0, 1) to base-3 bytes, five per byte.
pub fn pack_tq1(codes: ArrayView2<'_, i8>) -> Result<Array2<u8>> {
    ensure!(
        codes.iter().all(|c| (-1..=1).contains(c)),
        "ternary codes must be -1, 0 or 1"
    );
    let (n, k) = codes.dim();
    let width = k.div_ceil(5);
    Ok(Array2::from_shape_fn((n, width), |(r, b)| {
        (0..5).rev().fold(0u8, |acc, j| {
            let i = b * 5 + j;
            let t = if i < k { (codes[[r, i]] + 1) as u8 } else { 1 };
            acc * 3 + t
        })
    }))
}

/// `k` ternary codes per row back from base-3 bytes.
pub fn unpack_tq1(packed: ArrayView2<'_, u8>, k: usize) -> Result<Array2<i8>> {
    let (n, width) = packed.dim();
    check_rows(n, k)?;
    ensure!(
        width == k.div_ceil(5),
        "{k} ternary codes take {} bytes per row, got {width}",
        k.div_ceil(5)
    );
    ensure!(
        packed.iter().all(|&b| b < 243),
        "tq1 bytes must be below 243 (3^5)"
    );
    Ok(Array2::from_shape_fn((n, k), |(r, i)| {
        let mut v = packed[[r, i / 5]];
        for _ in 0..i % 5 {
            v /= 3;
        }
        (v % 3) as i8 - 1
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rows_and_tq1_round_trip() {
        let codes = Array2::from_shape_fn((3, 11), |(r, i)| ((r * 7 + i * 3) % 3) as i8 - 1);
        let p = pack_tq1(codes.view()).unwrap();
        assert_eq!(p.dim(), (3, 3));
        assert_eq!(unpack_tq1(p.view(), 11).unwrap(), codes);
        // first byte: digits (code + 1) of codes 0..5, least significant first
        let want: u32 = (0..5)
            .map(|j| (codes[[0, j]] + 1) as u32 * 3u32.pow(j as u32))
            .sum();
        assert_eq!(p[[0, 0]] as u32, want);
        for bits in [1, 2, 4] {
            let u = codes.mapv(|c| ((c + 1) as u8) & ((1 << bits) - 1));
            let p = pack_rows(u.view(), bits).unwrap();
            assert_eq!(p.ncols(), packed_len(11, bits));
            assert_eq!(unpack_rows(p.view(), bits, 11).unwrap(), u);
        }
        assert!(pack_tq1(ndarray::arr2(&[[2i8]]).view()).is_err());
        assert!(unpack_tq1(ndarray::arr2(&[[250u8]]).view(), 5).is_err());
    }
}
